//! What an instance with a mount namespace sees of the host, built by its init in that
//! namespace (the host's mounts are never touched), in this order:
//!
//! 1. `nodev` on every mount (`isolation.devices = "minimal"`): a device node found anywhere
//!    on the host's filesystems cannot be opened;
//! 2. a minimal `/dev`: a fresh tmpfs with `null`, `zero`, `full`, `random`, `urandom` and
//!    `tty`, its own `devpts` (`/dev/ptmx` -> `pts/ptmx`), `/dev/shm`, `/dev/mqueue` and the
//!    `fd`/`stdin`/`stdout`/`stderr` links — what runc and crun give by default;
//! 3. the agent's own directories (its state, logs and run state, and the API socket's
//!    directory) covered by an empty read-only tmpfs: nothing below them can be seen or
//!    reached, whatever the agent later does to the files there (a socket unlinked and bound
//!    again on a restart stays covered, since the directory is);
//! 4. `isolation.system_paths = "masked"`: the OCI default masks (`/proc/kcore`, `/proc/keys`,
//!    `/proc/timer_list`, ... covered by `/dev/null`; `/proc/acpi`, `/proc/scsi`,
//!    `/sys/firmware`, ... by an empty directory), `/proc/sys`, `/proc/sysrq-trigger`,
//!    `/proc/irq`, `/proc/bus`, `/proc/fs` and all of `/sys` read-only, and, with a cgroup
//!    namespace, on each cgroup filesystem's mount point (read-only) the instance's cgroup
//!    as its root: the directory bound from the host's tree where the agent knows it, else
//!    the filesystem mounted again in the instance's cgroup namespace.
//!
//! Imports from the crate: nothing but `super` (the init's configuration).

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::CgroupMount;
use super::mounts::{PROC_READONLY, copy_tree, move_tree, set_attr};

/// Files under `/proc` covered by `/dev/null` (OCI's default masked paths).
const PROC_MASKED_FILES: [&str; 6] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
];

/// Directories covered by an empty one (OCI's default masked paths).
const MASKED_DIRS: [&str; 4] = ["/proc/acpi", "/proc/asound", "/proc/scsi", "/sys/firmware"];

/// The character devices of the minimal `/dev`: name, major, minor.
pub(super) const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Links of the minimal `/dev`: link, target.
const LINKS: [(&str, &str); 5] = [
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

fn step(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn c(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `nodev` on every mount of this namespace. A kernel without `mount_setattr(2)` (before
/// 5.12) is left as it is: the cgroup's device control still refuses the devices.
pub(super) fn nodev_everywhere() -> Result<(), String> {
    match set_attr(
        libc::AT_FDCWD,
        Path::new("/"),
        true,
        libc::MOUNT_ATTR_NODEV,
        0,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(()),
        other => other.map_err(step("setting nodev on the host's mounts")),
    }
}

/// The host's device nodes of the minimal `/dev`, each as a detached mount (a bind of the node
/// taken with the flags its mount has now), for an instance in a user namespace, which cannot
/// make device nodes: [`minimal_dev`] puts them in place.
pub(super) fn host_devices() -> Result<Vec<(&'static str, OwnedFd)>, String> {
    DEVICES
        .iter()
        .map(|(name, _, _)| {
            let path = format!("/dev/{name}");
            copy_tree(Path::new(&path), false)
                .map(|fd| (*name, fd))
                .map_err(step(format!("taking the host's {path}")))
        })
        .collect()
}

/// Builds the minimal `/dev` (see the module's documentation): device nodes made with
/// `mknod`, or the host's nodes bound (`host`, from [`host_devices`]).
pub(super) fn minimal_dev(host: Option<Vec<(&'static str, OwnedFd)>>) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| format!("mounting a tmpfs on /dev: {e}"))?;
    // SAFETY: umask(2) cannot fail; the previous mask is restored below.
    let old = unsafe { libc::umask(0) };
    let made = (|| -> Result<(), String> {
        for (name, node) in host.iter().flatten() {
            let path = format!("/dev/{name}");
            std::fs::File::create(&path)
                .and_then(|_| move_tree(node, Path::new(&path)))
                .map_err(step(format!("binding the host's {path}")))?;
        }
        for (name, major, minor) in DEVICES.iter().filter(|_| host.is_none()) {
            let path = c(&format!("/dev/{name}")).map_err(step(name))?;
            // SAFETY: mknod(2) with a NUL-terminated path.
            let r = unsafe {
                libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(*major, *minor),
                )
            };
            if r != 0 {
                return Err(format!(
                    "creating /dev/{name}: {}",
                    io::Error::last_os_error()
                ));
            }
        }
        for (dir, mode) in [
            ("/dev/pts", 0o755),
            ("/dev/shm", 0o1777),
            ("/dev/mqueue", 0o755),
        ] {
            let path = c(dir).map_err(step(dir))?;
            // SAFETY: mkdir(2) with a NUL-terminated path.
            if unsafe { libc::mkdir(path.as_ptr(), mode) } != 0 {
                return Err(format!("creating {dir}: {}", io::Error::last_os_error()));
            }
        }
        Ok(())
    })();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    made?;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .map_err(|e| format!("mounting /dev/pts: {e}"))?;
    mount(
        Some("shm"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777"),
    )
    .map_err(|e| format!("mounting /dev/shm: {e}"))?;
    mount(
        Some("mqueue"),
        "/dev/mqueue",
        Some("mqueue"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /dev/mqueue: {e}"))?;
    for (link, target) in LINKS {
        std::os::unix::fs::symlink(target, link).map_err(step(format!("linking {link}")))?;
    }
    Ok(())
}

/// Covers directories with an empty, read-only tmpfs (the first one mounted, the others bound
/// from it) and files with `/dev/null`. Paths that do not exist here are skipped.
///
/// Each path costs one `mount(2)`, without a `stat` first: the kernel refuses to put a
/// directory on a file or a file on a directory (`ENOTDIR`), and the other kind is then
/// tried, and a path that does not exist fails with `ENOENT`.
#[derive(Debug, Default)]
pub(super) struct Masker {
    /// The first masked directory: the others are bind mounts of it.
    empty: Option<PathBuf>,
}

/// What one masking mount did.
enum Masked {
    Done,
    /// The path is of the other kind (a file where a directory was expected, or the reverse).
    OtherKind,
    Missing,
}

fn masked(result: nix::Result<()>, path: &Path) -> Result<Masked, String> {
    match result {
        Ok(()) => Ok(Masked::Done),
        Err(nix::errno::Errno::ENOTDIR) => Ok(Masked::OtherKind),
        Err(nix::errno::Errno::ENOENT) => Ok(Masked::Missing),
        Err(e) => Err(format!("masking {}: {e}", path.display())),
    }
}

impl Masker {
    pub(super) fn dir(&mut self, dir: &Path) -> Result<(), String> {
        self.mask_dir(dir, true)
    }

    pub(super) fn file(&mut self, file: &Path) -> Result<(), String> {
        self.mask_file(file, true)
    }

    fn mask_dir(&mut self, dir: &Path, or_file: bool) -> Result<(), String> {
        let done = match &self.empty {
            Some(empty) => mount(
                Some(empty.as_path()),
                dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            None => mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=000,size=4k,nr_inodes=1"),
            ),
        };
        match masked(done, dir)? {
            Masked::Done => {
                if self.empty.is_none() {
                    self.empty = Some(dir.to_path_buf());
                }
                Ok(())
            }
            Masked::OtherKind if or_file => self.mask_file(dir, false),
            Masked::OtherKind => Err(format!(
                "masking {}: neither a file nor a directory can be mounted on it",
                dir.display()
            )),
            Masked::Missing => Ok(()),
        }
    }

    fn mask_file(&mut self, file: &Path, or_dir: bool) -> Result<(), String> {
        let done = mount(
            Some("/dev/null"),
            file,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
        match masked(done, file)? {
            Masked::Done | Masked::Missing => Ok(()),
            Masked::OtherKind if or_dir => self.mask_dir(file, false),
            Masked::OtherKind => Err(format!(
                "masking {}: neither a file nor a directory can be mounted on it",
                file.display()
            )),
        }
    }
}

/// Bind `path` onto itself (so that it is a mount of its own) and make it read-only,
/// recursively. Skipped when it does not exist.
fn readonly(path: &str) -> Result<(), String> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        other => other.map_err(|e| format!("keeping {path} read-only: {e}"))?,
    }
    set_attr(
        libc::AT_FDCWD,
        Path::new(path),
        true,
        libc::MOUNT_ATTR_RDONLY,
        0,
    )
    .map_err(step(format!("keeping {path} read-only")))
}

/// `path` and every mount below it read-only. Where `path` is a mount of its own (`/sys` in a
/// namespace copied from any host that has one), on those mounts themselves: they are this
/// namespace's copies, and one call sets them all. Else as [`readonly`] does, bound first.
fn readonly_tree(path: &str) -> Result<(), String> {
    match set_attr(
        libc::AT_FDCWD,
        Path::new(path),
        true,
        libc::MOUNT_ATTR_RDONLY,
        0,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        // Not a mount's root.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => readonly(path),
        Err(e) => Err(format!("keeping {path} read-only: {e}")),
    }
}

/// `isolation.system_paths = "masked"` (see the module's documentation). `cgroup_mounts`:
/// the cgroup filesystems to mount again, when the instance has its own cgroup namespace.
pub(super) fn system_paths(
    masker: &mut Masker,
    cgroup_mounts: &[CgroupMount],
) -> Result<(), String> {
    for file in PROC_MASKED_FILES {
        masker.file(Path::new(file))?;
    }
    for dir in MASKED_DIRS {
        masker.dir(Path::new(dir))?;
    }
    for knob in PROC_READONLY {
        readonly(knob)?;
    }
    readonly_tree("/sys")?;
    if !cgroup_mounts.is_empty() {
        cgroup_views(cgroup_mounts)?;
    }
    Ok(())
}

/// Where the cgroup filesystems are.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The instance's cgroup as the root of each cgroup filesystem it sees, read-only: each
/// instance's directory bound over its hierarchy's mount point when every one is known (one
/// bind each, about half the cost of mounting a v1 hierarchy again), else
/// [`mounted_views`].
fn cgroup_views(cgroup_mounts: &[CgroupMount]) -> Result<(), String> {
    let bound = cgroup_mounts.iter().try_for_each(|m| match &m.root {
        // The mount shows that directory already (the agent's own cgroup is the root of a
        // hierarchy it did not make one in): nothing to bind.
        Some(root) if root.as_path() == m.path.as_path() => Ok(()),
        Some(root) => mount(
            Some(root.as_path()),
            m.path.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
        None => Err(nix::errno::Errno::ENOENT),
    });
    if bound.is_err() {
        // A directory gone (the agent moved to another cgroup since it started) or not
        // known: the tmpfs of the other way covers whatever was bound.
        return mounted_views(cgroup_mounts);
    }
    set_attr(
        libc::AT_FDCWD,
        Path::new(CGROUP_ROOT),
        true,
        libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC,
        0,
    )
    .map_err(|e| format!("keeping the instance's cgroup views read-only: {e}"))
}

/// The cgroup filesystems mounted again in the instance's cgroup namespace, read-only, on a
/// fresh tmpfs over `/sys/fs/cgroup` (the same filesystem cannot be mounted again right on
/// the mount point where it already is).
fn mounted_views(cgroup_mounts: &[CgroupMount]) -> Result<(), String> {
    let what = |path: &Path| format!("mounting the instance's cgroup view on {}", path.display());
    mount(
        Some("tmpfs"),
        CGROUP_ROOT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755,size=4k"),
    )
    .map_err(|e| format!("{}: {e}", what(Path::new(CGROUP_ROOT))))?;
    for m in cgroup_mounts {
        if m.path != Path::new(CGROUP_ROOT) {
            std::fs::create_dir(&m.path).map_err(|e| format!("{}: {e}", what(&m.path)))?;
        }
        // The superblock is the host's and stays writable (asking for a read-only one would
        // be refused with EBUSY): read-only is set per mount below.
        mount(
            Some("cgroup"),
            m.path.as_path(),
            Some(m.fstype.as_str()),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(m.options.as_str()).filter(|o| !o.is_empty()),
        )
        .map_err(|e| format!("{}: {e}", what(&m.path)))?;
    }
    set_attr(
        libc::AT_FDCWD,
        Path::new(CGROUP_ROOT),
        true,
        libc::MOUNT_ATTR_RDONLY,
        0,
    )
    .map_err(|e| format!("{}: {e}", what(Path::new(CGROUP_ROOT))))
}
