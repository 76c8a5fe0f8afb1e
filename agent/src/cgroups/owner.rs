//! One agent per cgroup tree. The agent stops every process in its tree that no record of its
//! own explains, so a second agent on the same `--cgroup-parent` (with another state
//! directory, whose lock it does not see) would kill the first one's instances. The tree's
//! directory is therefore locked with `flock` for the agent's life (cgroupfs supports it, v1
//! and v2): the kernel drops the lock when its holder dies, so a dead agent's tree is taken
//! over at once, and a live holder is named from `/proc/locks` (its pid) and from the
//! `trusted.corral.owner` attribute it set on the directory (its state directory).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::CgroupError;

const OWNER_XATTR: &str = "trusted.corral.owner";

/// The lock on a cgroup tree, held while this value lives.
#[derive(Debug)]
pub struct TreeLock {
    _fd: OwnedFd,
}

/// Lock the cgroup tree at `dir` for this agent (whose state directory is `state_dir`), or say
/// which live agent holds it.
pub fn lock_tree(dir: &Path, state_dir: &Path) -> Result<TreeLock, CgroupError> {
    let setup = |what: String| CgroupError::Setup(what);
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| setup(format!("opening the cgroup tree {}: {e}", dir.display())))?;
    // SAFETY: flock(2) on a descriptor we own.
    let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(setup(format!(
                "locking the cgroup tree {}: {e}",
                dir.display()
            )));
        }
        let pid = holder_pid(&fd).map_or_else(|| "unknown".to_string(), |p| p.to_string());
        let state = read_owner(dir).unwrap_or_else(|| "unknown".to_string());
        return Err(setup(format!(
            "the cgroup tree {} belongs to another running corrald (pid {pid}, state directory {state}); \
             it would stop that agent's instances as its own leftovers: give this agent another --cgroup-parent",
            dir.display()
        )));
    }
    // Who holds it, for the next agent that finds it locked. Best effort: a kernel without
    // trusted xattrs on cgroupfs still has the lock.
    if let Err(e) = write_owner(dir, state_dir) {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot mark the cgroup tree's owner");
    }
    Ok(TreeLock { _fd: fd })
}

/// The pid holding a `FLOCK` on the file `fd` is open on, from `/proc/locks`.
fn holder_pid(fd: &OwnedFd) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let dev = meta.dev();
    // `MAJOR:MINOR:INODE` in hex:hex:decimal.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // `1: FLOCK  ADVISORY  WRITE 1234 00:1c:5678 0 EOF`
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

fn write_owner(dir: &Path, state_dir: &Path) -> std::io::Result<()> {
    let path = c_path(dir)?;
    let name = CString::new(OWNER_XATTR).map_err(std::io::Error::other)?;
    let state = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let value = state.as_os_str().as_bytes();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_owner(dir: &Path) -> Option<String> {
    let path = c_path(dir).ok()?;
    let name = CString::new(OWNER_XATTR).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_one_is_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock_tree(dir.path(), Path::new("/var/lib/a")).expect("first");
        let e = lock_tree(dir.path(), Path::new("/var/lib/b")).expect_err("second");
        let text = e.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id()))
                && text.contains("--cgroup-parent"),
            "{text}"
        );
        drop(first);
        lock_tree(dir.path(), Path::new("/var/lib/b")).expect("taken over once released");
    }
}
