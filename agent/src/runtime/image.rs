//! A service's `[image]` as its instances' root filesystem.
//!
//! The agent side ([`plan`]) turns the image's config into the instance's defaults, which the
//! spec overrides: `command` replaces `Entrypoint` + `Cmd`, `env` entries replace the
//! image's of the same name (the image's `PATH` replaces the agent's default one), a `workdir`
//! other than `/` replaces `WorkingDir`, `user` replaces `User` and is looked up in the
//! image's `/etc/passwd`, not the host's. Each instance gets `<run dir>/image/` holding the
//! overlay's writable `upper/` and `work/` and the mount point `root/`; [`discard_layer`]
//! removes it when the instance ends (and before it starts again) unless `persist = true`.
//!
//! The init side ([`enter`]) runs in the instance's own mount namespace, with private
//! propagation, like crun and youki: an overlay (the store's rootfs as the read-only lower
//! layer) is mounted on `root/`, the init `fchdir`s into it, `pivot_root(".", ".")` stacks
//! the old root under the new one, `umount2(".", MNT_DETACH)` drops it and `chdir("/")`. Only
//! then are `/proc`, a minimal `/dev` (a tmpfs with null, zero, full, random, urandom and tty
//! made by mknod, `/dev/pts`, `/dev/shm`), `/tmp` and `/etc/{hostname,hosts,resolv.conf}` put
//! in place: every path is resolved inside the image, so a hostile image's symlink
//! (`/proc -> /host/somewhere`) can only point within itself. The host's `/etc/resolv.conf`
//! is read before the pivot.
//!
//! The init binary is never looked up inside the image: `corral-init` is executed by the agent
//! from the host before the instance's mounts change, and only the service's command is
//! executed after the pivot, so an image needs no copy of corral. The init keeps the fds it
//! opened on the host (its run and log directories) across the pivot.
//!
//! Imports from the crate: `spec` only.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde::{Deserialize, Serialize};

use crate::spec::artifact::Package;
use crate::spec::{ServiceSpec, UserSpec};

/// An image's defaults for its instances, from its config (given by the store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRun {
    /// The image's root filesystem in the store, read-only.
    pub rootfs: PathBuf,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` each.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// The config's `User`, resolved in the image: (uid, gid).
    pub user: Option<(u32, u32)>,
}

/// What the init mounts for `[image]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRoot {
    /// The store's rootfs: the overlay's lower layer.
    pub rootfs: PathBuf,
    /// `<run dir>/image`: `upper/`, `work/`, `root/`.
    pub layer: PathBuf,
    /// Keep `upper/` when the instance ends.
    pub persist: bool,
    /// For `/etc/hostname` and `/etc/hosts`.
    pub hostname: String,
    /// The host's `/etc/resolv.conf`, copied in.
    pub resolv_conf: String,
}

/// The directory of an instance's image layer, inside its run directory.
pub const LAYER_DIR: &str = "image";

/// How an image instance runs: its argv, workdir, extra environment and user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub command: Vec<String>,
    pub workdir: PathBuf,
    /// The image's variables the spec does not set, to lay under the service's environment.
    pub env: Vec<(String, String)>,
    /// (uid, gid, name, home) the service runs as; `None`: the agent's own (root).
    pub user: Option<(u32, u32, Option<String>, Option<String>)>,
}

/// Whether `spec` runs from an image.
pub fn is_image(spec: &ServiceSpec) -> bool {
    matches!(spec.package, Some(Package::Image(_)))
}

/// The image's `persist` setting.
pub fn persist(spec: &ServiceSpec) -> bool {
    matches!(&spec.package, Some(Package::Image(i)) if i.persist)
}

/// The instance's command, workdir, image variables and user, from the spec over the image's
/// config. Errors name the field.
pub fn plan(spec: &ServiceSpec, image: &ImageRun) -> Result<Plan, String> {
    let command = if spec.command.is_empty() {
        let argv: Vec<String> = image.entrypoint.iter().chain(&image.cmd).cloned().collect();
        if argv.is_empty() {
            return Err(
                "command: the spec gives none and the image's config has no Entrypoint or Cmd"
                    .into(),
            );
        }
        argv
    } else {
        spec.command.clone()
    };
    let workdir = match &image.working_dir {
        Some(dir) if spec.workdir == Path::new("/") && dir.starts_with('/') => PathBuf::from(dir),
        _ => spec.workdir.clone(),
    };
    let env = image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| !k.is_empty() && !spec.env.contains_key(*k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let passwd = || fs::read_to_string(image.rootfs.join("etc/passwd")).unwrap_or_default();
    let user = match &spec.user {
        None => image.user.map(|(uid, gid)| {
            let entry = lookup(&passwd(), |e| e.uid == uid);
            (
                uid,
                gid,
                entry.as_ref().map(|e| e.name.clone()),
                entry.map(|e| e.home),
            )
        }),
        Some(UserSpec::Name(name)) => {
            let e = lookup(&passwd(), |e| e.name == *name).ok_or_else(|| {
                format!("user: {name:?}: the image's /etc/passwd has no such user")
            })?;
            Some((e.uid, e.gid, Some(e.name), Some(e.home)))
        }
        Some(UserSpec::Id { uid, gid }) => {
            let entry = lookup(&passwd(), |e| e.uid == *uid);
            let g = gid.or(entry.as_ref().map(|e| e.gid)).unwrap_or(*uid);
            Some((
                *uid,
                g,
                entry.as_ref().map(|e| e.name.clone()),
                entry.map(|e| e.home),
            ))
        }
    };
    Ok(Plan {
        command,
        workdir,
        env,
        user,
    })
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// The first `/etc/passwd` line that `matches`.
fn lookup(passwd: &str, matches: impl Fn(&PasswdEntry) -> bool) -> Option<PasswdEntry> {
    passwd
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: (*f.first()?).to_owned(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: (*f.get(5)?).to_owned(),
            })
        })
        .find(|e| matches(e))
}

/// Lays the image's variables under the service's environment: the image's `PATH` replaces
/// the agent's default; every other variable already set (the spec's, corral's own) stays.
pub fn merge_env(env: &mut Vec<(String, String)>, image_env: &[(String, String)]) {
    for (k, v) in image_env {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) if k == "PATH" => slot.1 = v.clone(),
            Some(_) => {}
            None => env.push((k.clone(), v.clone())),
        }
    }
    env.sort();
}

/// Prepares `<run dir>/image`: a fresh writable layer unless `persist` (then the one left by
/// the instance's previous run, if any). Refuses store and run paths overlayfs options cannot
/// carry.
pub fn prepare_layer(run_dir: &Path, rootfs: &Path, persist: bool) -> io::Result<PathBuf> {
    for p in [run_dir, rootfs] {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{s:?} holds ',', ':' or '\\', which an overlay mount's options cannot carry"
                ),
            ));
        }
    }
    let layer = run_dir.join(LAYER_DIR);
    if !persist {
        discard(&layer)?;
    }
    for d in ["upper", "work", "root"] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(layer.join(d))?;
    }
    Ok(layer)
}

fn discard(layer: &Path) -> io::Result<()> {
    match fs::remove_dir_all(layer) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// After an instance's init ended: removes its writable layer unless its `[image]` says
/// `persist` (read from the init config it ran with).
pub fn discard_layer(run_dir: &Path) {
    let config = fs::read(run_dir.join(super::INIT_CONFIG))
        .ok()
        .and_then(|b| serde_json::from_slice::<super::InitConfig>(&b).ok());
    let Some(root) = config.and_then(|c| c.image) else {
        return;
    };
    if root.persist {
        return;
    }
    if let Err(e) = discard(&root.layer) {
        tracing::warn!(layer = %root.layer.display(), error = %e, "cannot remove the instance's writable layer");
    }
}

/// The host's `/etc/resolv.conf`, for the image (empty when unreadable).
pub fn host_resolv_conf() -> String {
    fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
}

/// In the init, in the instance's mount namespace with private propagation: the overlay, the
/// pivot, then `/proc`, `/dev`, `/tmp` and `/etc` files inside the image (see the module
/// docs).
pub(super) fn enter(root: &ImageRoot, private_tmp: bool) -> Result<(), String> {
    let target = root.layer.join("root");
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        root.rootfs.display(),
        root.layer.join("upper").display(),
        root.layer.join("work").display()
    );
    mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| format!("mounting the image's overlay on {}: {e}", target.display()))?;
    pivot(&target)?;

    let mkdir = |p: &str, mode: u32| -> Result<(), String> {
        match fs::DirBuilder::new().recursive(true).mode(mode).create(p) {
            Ok(()) => Ok(()),
            Err(e) => Err(format!("creating {p} in the image: {e}")),
        }
    };
    mkdir("/proc", 0o555)?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
    minimal_dev(&mkdir)?;
    mkdir("/tmp", 0o1777)?;
    if private_tmp {
        mount(
            Some("tmpfs"),
            "/tmp",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )
        .map_err(|e| format!("mounting a private /tmp: {e}"))?;
    }
    mkdir("/etc", 0o755)?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
        root.hostname
    );
    for (path, text) in [
        ("/etc/hostname", format!("{}\n", root.hostname)),
        ("/etc/hosts", hosts),
        ("/etc/resolv.conf", root.resolv_conf.clone()),
    ] {
        // A symlink the image left there is replaced, not written through.
        let _ = fs::remove_file(path);
        fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

/// `pivot_root` onto `target` (a mount point), the old root detached.
fn pivot(target: &Path) -> Result<(), String> {
    let new_root = nix::fcntl::open(
        target,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the image's root {}: {e}", target.display()))?;
    nix::unistd::fchdir(&new_root).map_err(|e| format!("entering the image's root: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    // The old root now sits on top of the new one, here: detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the host's root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// A tmpfs `/dev` with the usual character devices, `/dev/pts`, `/dev/shm` and the fd links.
fn minimal_dev(mkdir: &dyn Fn(&str, u32) -> Result<(), String>) -> Result<(), String> {
    mkdir("/dev", 0o755)?;
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| format!("mounting /dev: {e}"))?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = format!("/dev/{name}");
        mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| format!("creating {path}: {e}"))?;
        // The umask trimmed the mode given to mknod.
        let c = CString::new(path.as_str()).map_err(|e| e.to_string())?;
        // SAFETY: chmod(2) on a NUL-terminated path we own.
        if unsafe { libc::chmod(c.as_ptr(), 0o666) } < 0 {
            return Err(format!("chmod {path}: {}", io::Error::last_os_error()));
        }
    }
    mkdir("/dev/pts", 0o755)?;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| format!("mounting /dev/pts: {e}"))?;
    symlink("pts/ptmx", "/dev/ptmx").map_err(|e| format!("linking /dev/ptmx: {e}"))?;
    mkdir("/dev/shm", 0o1777)?;
    mount(
        Some("tmpfs"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| format!("mounting /dev/shm: {e}"))?;
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, link).map_err(|e| format!("linking {link}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> ServiceSpec {
        crate::spec::parse_toml(&format!(
            "name = \"web\"\n{extra}\n[image]\nurl = \"/srv/web.oci.tar\"\ndigest = \"sha256:{}\"\n",
            "a".repeat(64)
        ))
        .expect("valid spec")
    }

    fn image(rootfs: &Path) -> ImageRun {
        ImageRun {
            rootfs: rootfs.to_path_buf(),
            entrypoint: vec!["/bin/httpd".into()],
            cmd: vec!["-f".into(), "-p".into(), "80".into()],
            env: vec!["PATH=/usr/local/bin:/bin".into(), "MODE=image".into()],
            working_dir: Some("/srv".into()),
            user: Some((1000, 1000)),
        }
    }

    #[test]
    fn the_image_config_is_the_default_and_the_spec_overrides_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("etc")).expect("etc");
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:34::/var/www:/bin/sh\n",
        )
        .expect("passwd");
        let img = image(dir.path());

        let p = plan(&spec(""), &img).expect("plan");
        assert_eq!(p.command, ["/bin/httpd", "-f", "-p", "80"]);
        assert_eq!(p.workdir, Path::new("/srv"));
        assert_eq!(
            p.user,
            Some((1000, 1000, Some("app".into()), Some("/home/app".into())))
        );
        let mut env = vec![
            ("PATH".to_owned(), "/usr/bin".to_owned()),
            ("CORRAL_SERVICE".to_owned(), "web".to_owned()),
        ];
        merge_env(&mut env, &p.env);
        assert_eq!(
            env,
            [
                ("CORRAL_SERVICE".to_owned(), "web".to_owned()),
                ("MODE".to_owned(), "image".to_owned()),
                ("PATH".to_owned(), "/usr/local/bin:/bin".to_owned()),
            ]
        );

        let p = plan(
            &spec("command = [\"/bin/sh\", \"-c\", \"x\"]\nworkdir = \"/opt\"\nuser = \"web\"\nenv = { MODE = \"spec\" }"),
            &img,
        )
        .expect("plan");
        assert_eq!(p.command, ["/bin/sh", "-c", "x"]);
        assert_eq!(p.workdir, Path::new("/opt"));
        assert_eq!(p.user.map(|u| (u.0, u.1)), Some((33, 34)));
        assert!(p.env.iter().all(|(k, _)| k != "MODE"), "{:?}", p.env);

        let err = plan(&spec("user = \"nobody\""), &img).expect_err("unknown user");
        assert_eq!(
            err,
            "user: \"nobody\": the image's /etc/passwd has no such user"
        );
        let empty = ImageRun {
            entrypoint: vec![],
            cmd: vec![],
            ..img
        };
        assert!(
            plan(&spec(""), &empty)
                .expect_err("no command")
                .starts_with("command:")
        );
    }

    #[test]
    fn a_layer_is_fresh_unless_persisted_and_paths_overlay_cannot_carry_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        let run = dir.path().join("run");
        let layer = prepare_layer(&run, &rootfs, false).expect("layer");
        fs::write(layer.join("upper/left"), "x").expect("write");
        prepare_layer(&run, &rootfs, true).expect("layer");
        assert!(layer.join("upper/left").exists(), "persist keeps it");
        prepare_layer(&run, &rootfs, false).expect("layer");
        assert!(!layer.join("upper/left").exists(), "a fresh layer");
        let err = prepare_layer(&dir.path().join("a,b"), &rootfs, false).expect_err("comma");
        assert!(err.to_string().contains("overlay"), "{err}");
    }
}
