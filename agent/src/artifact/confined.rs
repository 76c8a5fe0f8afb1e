//! File operations confined beneath one directory, whatever the entries already written there
//! contain: every lookup goes through `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or a
//! component-by-component walk with `O_NOFOLLOW` where the kernel has no `openat2`, and every
//! final component is created relative to its parent's descriptor with `O_EXCL`/`O_NOFOLLOW`.
//! No path string is ever resolved from `/`, so an archive that first creates `x -> /etc` and
//! then writes `x/passwd` gets an error instead of the host's file.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Longest entry path accepted (`PATH_MAX` less the NUL).
pub(crate) const MAX_PATH_BYTES: usize = 4095;
/// Longest file name (`NAME_MAX`).
const MAX_NAME_BYTES: usize = 255;

/// Set once `openat2` answered `ENOSYS`: walk instead from then on.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// An archive path made safe: `a/b/c`, relative, without `.`/`..`/empty components.
/// `Ok(None)` is the archive's root itself (`./`).
pub(crate) fn normalize(raw: &[u8]) -> Result<Option<Vec<u8>>, String> {
    // `/` alone is the root (umoci writes it so); any other absolute path is refused.
    if raw.first() == Some(&b'/') && raw.iter().any(|b| *b != b'/' && *b != b'.') {
        return Err("an absolute path (entries must stay inside the tree)".into());
    }
    let mut out = Vec::with_capacity(raw.len());
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err("a \"..\" component (entries must stay inside the tree)".into()),
            c if c.len() > MAX_NAME_BYTES => {
                return Err(format!(
                    "a name of {} bytes (at most {MAX_NAME_BYTES})",
                    c.len()
                ));
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    if out.len() > MAX_PATH_BYTES {
        return Err(format!(
            "a path of {} bytes (at most {MAX_PATH_BYTES})",
            out.len()
        ));
    }
    Ok((!out.is_empty()).then_some(out))
}

/// `a/b/c` -> (`a/b`, `c`); `c` -> (``, `c`).
pub(crate) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// A path for messages.
pub(crate) fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn os(path: &[u8]) -> &OsStr {
    OsStr::from_bytes(path)
}

/// The directory everything happens beneath.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Opens `path`, which must be a directory (not a symlink to one).
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens directory `rel` (normalized; empty for the root) beneath the root without
    /// following any symlink. With `create`, missing directories are made (mode 0755 until the
    /// archive says otherwise). `ELOOP`: a component is a symlink; `ENOTDIR`: not a directory.
    pub(crate) fn dir(&self, rel: &[u8], create: bool) -> Result<OwnedFd, Errno> {
        let rel = if rel.is_empty() { b"." as &[u8] } else { rel };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let how = OpenHow::new().flags(flags).resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
            match openat2(self.fd.as_fd(), os(rel), how) {
                Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(Errno::ENOENT) if create => return self.walk(rel, true),
                // openat2 may fail with EAGAIN when a rename raced the lookup; walking is safe.
                Err(Errno::EAGAIN) => return self.walk(rel, create),
                other => return other,
            }
        }
        self.walk(rel, create)
    }

    /// One component at a time, each opened with `O_NOFOLLOW` relative to the previous one.
    pub(crate) fn walk(&self, rel: &[u8], create: bool) -> Result<OwnedFd, Errno> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut current = openat(self.fd.as_fd(), ".", flags, Mode::empty())?;
        for component in rel.split(|b| *b == b'/') {
            if component.is_empty() || component == b"." {
                continue;
            }
            if component == b".." {
                return Err(Errno::EXDEV);
            }
            let next = match openat(current.as_fd(), os(component), flags, Mode::empty()) {
                Err(Errno::ENOENT) if create => {
                    match nix::sys::stat::mkdirat(
                        current.as_fd(),
                        os(component),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e),
                    }
                    openat(current.as_fd(), os(component), flags, Mode::empty())
                }
                other => other,
            };
            current = match next {
                // O_NOFOLLOW|O_DIRECTORY on a symlink gives ENOTDIR on some kernels: tell
                // the two apart so the message is right.
                Err(Errno::ENOTDIR) if is_symlink(current.as_fd(), component) => {
                    return Err(Errno::ELOOP);
                }
                other => other?,
            };
        }
        Ok(current)
    }

    /// Opens the file `rel` for reading; symlinks are followed only while they stay beneath
    /// the root. `Ok(None)` when it does not exist.
    pub(crate) fn open_file(&self, rel: &str) -> io::Result<Option<std::fs::File>> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match openat2(self.fd.as_fd(), rel, how) {
            Err(Errno::ENOSYS) => {
                let (parent, name) = split(rel.as_bytes());
                self.walk(parent, false).and_then(|dir| {
                    openat(
                        dir.as_fd(),
                        os(name),
                        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                })
            }
            other => other,
        };
        match fd {
            Ok(fd) => Ok(Some(fd.into())),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a file as the image would see it: symlinks resolved with the root as `/`.
    pub(crate) fn read_in_root(&self, rel: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match openat2(self.fd.as_fd(), rel, how) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ENOSYS) => {
                // Without openat2 only a symlink-free path is read.
                let (parent, name) = split(rel.as_bytes());
                let dir = match self.walk(parent, false) {
                    Ok(d) => d,
                    Err(Errno::ENOENT) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                match openat(
                    dir.as_fd(),
                    os(name),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        std::fs::File::from(fd)
            .take(max + 1)
            .read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::other(format!(
                "{rel} is larger than {max} bytes"
            )));
        }
        Ok(Some(out))
    }
}

/// Whether `name` in `dir` is a symlink (not following it).
pub(crate) fn is_symlink(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    kind(dir, name) == Some(SFlag::S_IFLNK)
}

/// The file type of `name` in `dir`, not following a symlink; `None` when absent.
pub(crate) fn kind(dir: BorrowedFd<'_>, name: &[u8]) -> Option<SFlag> {
    fstatat(dir, os(name), AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()))
}

/// Removes `name` from `dir`, a whole tree if it is a directory, never following a symlink.
/// Directories are made writable first, so read-only trees can be removed by their owner.
pub(crate) fn remove(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    match unlinkat(dir, os(name), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR | Errno::EPERM) => {}
        Err(e) => return Err(e),
    }
    let sub = openat(
        dir,
        os(name),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    empty_dir(sub)?;
    match unlinkat(dir, os(name), UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything inside the directory `fd`.
pub(crate) fn empty_dir(fd: OwnedFd) -> Result<(), Errno> {
    let _ = fchmod(fd.as_fd(), Mode::from_bits_truncate(0o700));
    let names = children(&fd)?;
    for name in names {
        remove(fd.as_fd(), &name)?;
    }
    Ok(())
}

/// The names in directory `fd`, without `.` and `..`.
pub(crate) fn children(fd: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let dup = fd
        .try_clone()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let mut dir = nix::dir::Dir::from_fd(dup)?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Removes the directory at `path` and everything in it (absent is fine), without following
/// symlinks inside it.
pub(crate) fn remove_path(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other(format!(
            "{} cannot be removed",
            path.display()
        )));
    };
    let parent = match Root::open(parent) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove(parent.fd(), name.as_bytes()).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_table() {
        let ok: &[(&[u8], Option<&[u8]>)] = &[
            (b"a/b/c", Some(b"a/b/c")),
            (b"./a//b/", Some(b"a/b")),
            (b"./", None),
            (b".", None),
            (b"/", None),
            (b"/./", None),
            (b"a/./b", Some(b"a/b")),
            (b".wh..wh..opq", Some(b".wh..wh..opq")),
            (b"..a/b..", Some(b"..a/b..")),
        ];
        for (raw, want) in ok {
            assert_eq!(
                normalize(raw).expect("valid").as_deref(),
                *want,
                "{}",
                show(raw)
            );
        }
        for raw in [b"/etc/passwd" as &[u8], b"../x", b"a/../../x", b"a/.."] {
            assert!(normalize(raw).is_err(), "{}", show(raw));
        }
        assert!(normalize(&[b'a'; 256]).is_err());
        let long: Vec<u8> = std::iter::repeat_n(b"abc/" as &[u8], 1100)
            .flatten()
            .copied()
            .collect();
        assert!(normalize(&long).is_err());
    }

    #[test]
    fn split_table() {
        assert_eq!(split(b"a/b/c"), (b"a/b" as &[u8], b"c" as &[u8]));
        assert_eq!(split(b"c"), (b"" as &[u8], b"c" as &[u8]));
    }

    #[test]
    fn lookups_never_leave_the_root_through_a_symlink() {
        let outside = tempfile::tempdir().expect("tempdir");
        let root_dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), root_dir.path().join("escape"))
            .expect("symlink");
        std::fs::create_dir(root_dir.path().join("real")).expect("mkdir");
        let root = Root::open(root_dir.path()).expect("open");
        for create in [false, true] {
            assert_eq!(root.dir(b"escape", create).err(), Some(Errno::ELOOP));
            assert_eq!(root.walk(b"escape/sub", create).err(), Some(Errno::ELOOP));
            assert!(root.dir(b"real", create).is_ok());
        }
        // Nothing was created through the link.
        assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0);
        root.dir(b"new/deeper", true).expect("created");
        assert!(root_dir.path().join("new/deeper").is_dir());
    }

    #[test]
    fn remove_takes_trees_and_not_what_links_point_to() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("keep"), b"x").expect("write");
        let root_dir = tempfile::tempdir().expect("tempdir");
        let t = root_dir.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).expect("mkdir");
        std::fs::write(t.join("a/b/f"), b"x").expect("write");
        std::os::unix::fs::symlink(outside.path(), t.join("a/link")).expect("symlink");
        std::fs::set_permissions(
            t.join("a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .expect("chmod");
        remove_path(&t).expect("removed");
        assert!(!t.exists());
        assert!(outside.path().join("keep").exists());
    }
}
