//! The read-only view of the host's filesystem of a `readonly_root` instance, built by its
//! init inside the instance's own mount namespace (the host's mounts are never touched) with
//! the new mount API: `open_tree` to copy a subtree, `mount_setattr` to flip read-only on a
//! whole tree at once, `move_mount` to put a copy in place.
//!
//! What the instance gets:
//! - every mount read-only, recursively (`/`, `/usr`, `/var`, `/dev`, `/sys`, `/dev/shm`...);
//!   device nodes such as `/dev/null` stay usable (a read-only mount refuses changes to the
//!   filesystem, not writes to a device);
//! - `/proc` writable again (the process's own files, `/proc/self/oom_score_adj`...), except
//!   the kernel's knobs (`/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq`, `/proc/bus`,
//!   `/proc/fs`), which stay read-only;
//! - `/tmp` and `workdir` (unless it is `/`) writable, as copies taken before anything was
//!   made read-only, so they keep the host's own flags (a read-only mount inside them stays
//!   read-only);
//!
//! Built by every init with a mount namespace, before that (see [`confine`]): the agent's own
//! directories masked, a minimal `/dev` with `nodev` everywhere else, and the kernel's files
//! under `/proc` and `/sys` masked or read-only, with the cgroup filesystems mounted again so
//! that they show the instance's own cgroup as their root.
//!
//! Imports from the crate: nothing but `super` (the init's configuration).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The kernel's knobs under `/proc` that stay read-only in a `readonly_root` instance (the
/// ones container runtimes keep read-only).
pub(super) const PROC_READONLY: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

/// The places a `readonly_root` instance may write: `/tmp`, and `workdir` unless it is `/`;
/// outer ones first, so that one inside another is put in place after it.
pub(super) fn writable_paths(workdir: &Path) -> Vec<&Path> {
    let mut paths = vec![Path::new("/tmp")];
    if workdir.parent().is_some() && !paths.contains(&workdir) {
        paths.push(workdir);
    }
    paths.sort_by_key(|p| p.components().count());
    paths
}

/// Builds the read-only view (see the module's documentation) in the calling process's
/// mount namespace, which must be its own, with private propagation. `knobs_readonly`: the
/// kernel's knobs under `/proc` are read-only mounts already.
pub(super) fn readonly_root(workdir: &Path, knobs_readonly: bool) -> Result<(), String> {
    let writable = writable_paths(workdir);
    let copies = writable
        .iter()
        .map(|path| {
            copy_tree(path, true)
                .map(|fd| (*path, fd))
                .map_err(|e| format!("copying {} to keep it writable: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;

    set_readonly(libc::AT_FDCWD, Path::new("/"), true, true)
        .map_err(|e| format!("making / read-only: {e}"))?;

    // The /proc mount itself only: mounts below it keep their flags.
    set_readonly(libc::AT_FDCWD, Path::new("/proc"), false, false)
        .map_err(|e| format!("making /proc writable again: {e}"))?;
    for knob in PROC_READONLY.iter().filter(|_| !knobs_readonly) {
        match copy_tree(Path::new(knob), true) {
            Ok(fd) => {
                set_readonly(fd.as_raw_fd(), Path::new(""), true, true)
                    .and_then(|()| move_tree(&fd, Path::new(knob)))
                    .map_err(|e| format!("keeping {knob} read-only: {e}"))?;
            }
            // Not every kernel has every one of them.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(format!("keeping {knob} read-only: {e}")),
        }
    }

    for (path, fd) in &copies {
        move_tree(fd, path).map_err(|e| format!("keeping {} writable: {e}", path.display()))?;
    }
    Ok(())
}

/// A directory handle on a private copy of the mount holding `dir`, detached from every
/// namespace: whatever is done to the namespace's mounts later (made read-only) does not
/// apply to it. The copy lives as long as the handle (and its duplicates). An `O_PATH`
/// handle: for `openat`, `renameat` and friends.
pub(super) fn detached(dir: &Path) -> io::Result<OwnedFd> {
    copy_tree(dir, false)
}

pub(super) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

/// `open_tree(OPEN_TREE_CLONE)`: a detached copy of the mount at `path` (and of every mount
/// below it when `recursive`).
pub(super) fn copy_tree(path: &Path, recursive: bool) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: open_tree(2) with a NUL-terminated path; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from open_tree that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(crate::num::syscall_int(fd)) })
}

/// `mount_setattr(2)`: sets (`readonly`) or clears the read-only flag of the mount at `path`
/// relative to `dirfd` (the mount `dirfd` refers to when `path` is empty), and of every mount
/// below it when `recursive`.
fn set_readonly(dirfd: RawFd, path: &Path, recursive: bool, readonly: bool) -> io::Result<()> {
    let (set, clear) = if readonly {
        (libc::MOUNT_ATTR_RDONLY, 0)
    } else {
        (0, libc::MOUNT_ATTR_RDONLY)
    };
    set_attr(dirfd, path, recursive, set, clear)
}

/// `mount_setattr(2)`: sets the `MOUNT_ATTR_*` flags `set` and clears `clear` on the mount at
/// `path` relative to `dirfd`, and on every mount below it when `recursive`.
pub(super) fn set_attr(
    dirfd: RawFd,
    path: &Path,
    recursive: bool,
    set: u64,
    clear: u64,
) -> io::Result<()> {
    let c = c_path(path)?;
    let mut flags = 0;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    if path.as_os_str().is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) with a NUL-terminated path and a mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            c.as_ptr(),
            flags.cast_unsigned(),
            &raw const attr,
            size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mount_setattr(2)` on the detached mount `mount`: idmapped with the user namespace `userns`
/// (ids owned on disk are shown through its maps), and `nosuid`, `nodev`.
pub(super) fn idmap(mount: &OwnedFd, userns: &OwnedFd) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::from(userns.as_raw_fd().cast_unsigned()),
    };
    // SAFETY: mount_setattr(2) on an fd we own (empty path) with a mount_attr of the size
    // passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &raw const attr,
            size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `move_mount(2)`: puts the detached tree `fd` on top of `path`.
pub(super) fn move_tree(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: move_mount(2) from an fd we own (with an empty path) onto a NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this kernel has `mount_setattr(2)` (Linux 5.12), the newest call the read-only
/// view, `nodev` and the read-only kernel files need.
pub(super) fn kernel_supports_readonly_root() -> bool {
    // SAFETY: mount_setattr(2) with an invalid fd and no attributes: it can only fail.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            -1,
            c"".as_ptr(),
            0,
            std::ptr::null::<libc::mount_attr>(),
            0,
        )
    };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_paths_are_tmp_and_workdir() {
        let cases: &[(&str, &[&str])] = &[
            ("/", &["/tmp"]),
            ("/srv/web", &["/tmp", "/srv/web"]),
            ("/tmp", &["/tmp"]),
            ("/tmp/app", &["/tmp", "/tmp/app"]),
            ("/a", &["/tmp", "/a"]),
        ];
        for (workdir, expected) in cases {
            let got = writable_paths(Path::new(workdir));
            let got: Vec<&str> = got.iter().map(|p| p.to_str().expect("utf-8")).collect();
            assert_eq!(got, *expected, "{workdir}");
        }
    }

    #[test]
    fn this_kernel_is_asked() {
        // The development and CI kernels are far newer than 5.12; this proves the probe
        // does not mistake an available call for a missing one.
        assert!(kernel_supports_readonly_root());
    }
}
