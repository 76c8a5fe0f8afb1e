//! The files a cgroup's usage is read from, opened once and read again at every `stats()`
//! with one `pread` at offset 0. cgroupfs (kernfs) makes a control file's content anew for
//! every read that starts at offset 0, so a held descriptor gives the current value without
//! the path walk, open and close of each read (about 1 µs a file instead of 8 µs).
//!
//! The descriptors of a cgroup are dropped when it is created again or removed
//! ([`StatFiles::forget`]), and when a read through them fails (a cgroup removed behind the
//! agent's back reads `ENODEV`): then the files are opened afresh once. At most a budget of
//! descriptors is held (a quarter of the open-file limit); cgroups beyond it are read by
//! opening their files each time, as before. Used by the v1 and v2 backends only; knows
//! nothing of controllers or file formats.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::fsutil::{invalid_data, read_err};
use super::{CgroupError, CgroupPath};

/// One file of a cgroup that `stats()` reads, named by the backend's `K`.
#[derive(Debug)]
pub(super) struct Wanted<K> {
    pub kind: K,
    pub file: PathBuf,
    pub need: Need,
}

/// What a missing or unreadable file means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Missing or unreadable: the cgroup is gone, `stats()` fails.
    Required,
    /// Missing (a file an older kernel does not have) reads as `None`; unreadable fails.
    Optional,
    /// Missing or unreadable reads as `None` and is no reason to reopen the others: a file
    /// the kernel may refuse to read while the cgroup is fine (a PSI file with PSI off).
    BestEffort,
}

/// The files of one cgroup as opened: `None` for an optional file that does not exist.
#[derive(Debug)]
struct Opened<K> {
    files: Vec<(K, PathBuf, Need, Option<File>)>,
}

impl<K> Opened<K> {
    fn fds(&self) -> usize {
        self.files.iter().filter(|(.., f)| f.is_some()).count()
    }
}

/// Why a read through [`Opened`] failed.
enum Failed {
    /// Reading a file failed (a stale descriptor, or a cgroup that is gone).
    Io(CgroupError),
    /// The backend could not understand what it read.
    Parse(CgroupError),
}

#[derive(Debug)]
struct Held<K> {
    by_path: HashMap<CgroupPath, Arc<Opened<K>>>,
    fds: usize,
    /// Counts [`StatFiles::forget`] calls: files opened before one are not kept, as their
    /// cgroup may be the one removed (reads run on several threads).
    forgets: u64,
}

/// The stat files of every cgroup read so far, within a budget of descriptors.
#[derive(Debug)]
pub(super) struct StatFiles<K> {
    budget: usize,
    held: Mutex<Held<K>>,
}

/// A quarter of the soft open-file limit: the rest stays for the instances' pipes, pidfds,
/// sockets and the API's connections.
fn budget_from_rlimit() -> usize {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| usize::try_from(soft / 4).unwrap_or(usize::MAX))
        .unwrap_or(0)
}

impl<K: Copy> StatFiles<K> {
    /// Holding at most a quarter of this process's open-file limit.
    pub fn new() -> StatFiles<K> {
        StatFiles::with_budget(budget_from_rlimit())
    }

    pub fn with_budget(budget: usize) -> StatFiles<K> {
        StatFiles {
            budget,
            held: Mutex::new(Held {
                by_path: HashMap::new(),
                fds: 0,
                forgets: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held<K>> {
        // Nothing panics while holding it; a poisoned map is still a consistent map.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Read every file of `cg`, calling `each` with its kind, its path and its text (`None`:
    /// an optional file that does not exist). `wanted` lists the files, in the order `each`
    /// gets them; it is called only when they must be opened.
    pub fn read(
        &self,
        cg: &CgroupPath,
        wanted: impl FnOnce() -> Vec<Wanted<K>>,
        mut each: impl FnMut(K, &Path, Option<&str>) -> Result<(), CgroupError>,
    ) -> Result<(), CgroupError> {
        let mut buf = Vec::with_capacity(512);
        let (found, forgets) = {
            let held = self.lock();
            (held.by_path.get(cg).cloned(), held.forgets)
        };
        if let Some(opened) = found {
            match read_all(cg, &opened, &mut buf, &mut each) {
                Ok(()) => return Ok(()),
                Err(Failed::Parse(e)) => return Err(e),
                // Stale: open the files again, once.
                Err(Failed::Io(_)) => self.drop_if_same(cg, &opened),
            }
        }
        let opened = Arc::new(open_all(cg, wanted())?);
        match read_all(cg, &opened, &mut buf, &mut each) {
            Ok(()) => {}
            Err(Failed::Io(e) | Failed::Parse(e)) => return Err(e),
        }
        self.keep(cg, opened, forgets);
        Ok(())
    }

    /// Hold `opened` for `cg`, unless a cgroup was forgotten since the read began (`forgets`
    /// then): the files may be those of a cgroup removed meanwhile, which nothing would read
    /// again to find them stale.
    fn keep(&self, cg: &CgroupPath, opened: Arc<Opened<K>>, forgets: u64) {
        let n = opened.fds();
        let mut held = self.lock();
        if held.fds + n > self.budget || held.forgets != forgets {
            return;
        }
        if let Some(old) = held.by_path.insert(cg.clone(), opened) {
            held.fds -= old.fds();
        }
        held.fds += n;
    }

    fn drop_if_same(&self, cg: &CgroupPath, opened: &Arc<Opened<K>>) {
        let mut held = self.lock();
        if held.by_path.get(cg).is_some_and(|o| Arc::ptr_eq(o, opened)) {
            held.by_path.remove(cg);
            held.fds -= opened.fds();
        }
    }

    /// Whether the files of `cg` are open (a `read` of them reads through descriptors).
    pub fn is_held(&self, cg: &CgroupPath) -> bool {
        self.lock().by_path.contains_key(cg)
    }

    /// Drop the descriptors of `cg` and of every cgroup below it: it is being removed, or
    /// made anew.
    pub fn forget(&self, cg: &CgroupPath) {
        let mut held = self.lock();
        held.forgets += 1;
        let below = |p: &CgroupPath| p.components().starts_with(cg.components());
        if !held.by_path.keys().any(below) {
            return;
        }
        let mut dropped = 0;
        held.by_path.retain(|p, o| {
            let keep = !below(p);
            if !keep {
                dropped += o.fds();
            }
            keep
        });
        held.fds -= dropped;
    }

    /// Descriptors held now.
    #[cfg(test)]
    pub fn held_fds(&self) -> usize {
        self.lock().fds
    }
}

fn open_all<K: Copy>(cg: &CgroupPath, wanted: Vec<Wanted<K>>) -> Result<Opened<K>, CgroupError> {
    let mut files = Vec::with_capacity(wanted.len());
    let mut dir = Dir::default();
    for w in wanted {
        let f = match dir.open(&w.file) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && w.need == Need::Optional => None,
            Err(_) if w.need == Need::BestEffort => None,
            Err(e) => return Err(read_err(&cg.to_string(), &w.file, e)),
        };
        files.push((w.kind, w.file, w.need, f));
    }
    Ok(Opened { files })
}

/// The directory the last file was opened in. The files of one directory are opened
/// relative to it: one walk of the cgroup's long path for the directory, not one for each of
/// its files (on v1, one walk per hierarchy: 3 or 4 for an instance's 7 stat files).
#[derive(Default)]
struct Dir {
    path: PathBuf,
    fd: Option<OwnedFd>,
}

impl Dir {
    fn open(&mut self, file: &Path) -> io::Result<File> {
        let (Some(parent), Some(name)) = (file.parent(), file.file_name()) else {
            return File::open(file);
        };
        if self.path != parent {
            self.path = parent.to_path_buf();
            // A directory that cannot be opened: each file is opened by its path, which
            // fails (or not) with the file's own error.
            self.fd = nix::fcntl::open(
                parent,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ok();
        }
        match &self.fd {
            Some(fd) => {
                nix::fcntl::openat(fd, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map(File::from)
                    .map_err(io::Error::from)
            }
            None => File::open(file),
        }
    }
}

fn read_all<K: Copy>(
    cg: &CgroupPath,
    opened: &Opened<K>,
    buf: &mut Vec<u8>,
    each: &mut impl FnMut(K, &Path, Option<&str>) -> Result<(), CgroupError>,
) -> Result<(), Failed> {
    for (kind, path, need, file) in &opened.files {
        let text = match file {
            None => None,
            Some(f) => {
                match pread_whole(f, buf) {
                    Ok(()) => {}
                    Err(_) if *need == Need::BestEffort => {
                        each(*kind, path, None).map_err(Failed::Parse)?;
                        continue;
                    }
                    Err(e) => return Err(Failed::Io(read_err(&cg.to_string(), path, e))),
                }
                let text = std::str::from_utf8(buf).map_err(|e| {
                    Failed::Parse(read_err(
                        &cg.to_string(),
                        path,
                        invalid_data(format!("not text: {e}")),
                    ))
                })?;
                Some(text)
            }
        };
        each(*kind, path, text).map_err(Failed::Parse)?;
    }
    Ok(())
}

/// The whole content of `f` from offset 0 into `buf`: one `pread` for a control file (a few
/// hundred bytes at most), more only when it fills the buffer.
fn pread_whole(f: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    loop {
        let start = buf.len();
        if buf.capacity() - start < 256 {
            buf.reserve(buf.capacity().max(512));
        }
        buf.resize(buf.capacity(), 0);
        let n = match f.read_at(&mut buf[start..], start as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        };
        let full = n == buf.len() - start;
        buf.truncate(start + n);
        if !full || n == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum F {
        A,
        B,
    }

    fn wanted(dir: &Path) -> Vec<Wanted<F>> {
        vec![
            Wanted {
                kind: F::A,
                file: dir.join("a"),
                need: Need::Required,
            },
            Wanted {
                kind: F::B,
                file: dir.join("b"),
                need: Need::Optional,
            },
        ]
    }

    fn read(s: &StatFiles<F>, cg: &CgroupPath, dir: &Path) -> Result<Vec<String>, CgroupError> {
        let mut out = Vec::new();
        s.read(
            cg,
            || wanted(dir),
            |k, _, t| {
                out.push(format!("{k:?}={}", t.unwrap_or("-")));
                Ok(())
            },
        )?;
        Ok(out)
    }

    #[test]
    fn files_are_held_reread_and_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let cg = CgroupPath::instance("web", "web-0");
        let s = StatFiles::with_budget(10);
        fs::write(dir.join("a"), "1\n").expect("a");
        assert_eq!(read(&s, &cg, dir).expect("read"), ["A=1\n", "B=-"]);
        assert_eq!(s.held_fds(), 1, "a held, b absent");
        // Rewritten in place, as the kernel's values change: the held descriptor reads it.
        fs::write(dir.join("a"), "22\n").expect("a");
        assert_eq!(read(&s, &cg, dir).expect("read"), ["A=22\n", "B=-"]);
        // Longer than the first buffer: read whole.
        let long = "x".repeat(5000);
        fs::write(dir.join("a"), &long).expect("a");
        assert_eq!(read(&s, &cg, dir).expect("read")[0], format!("A={long}"));
        // Removing the service drops its instances' descriptors.
        s.forget(&CgroupPath::service("web"));
        assert_eq!(s.held_fds(), 0);
        fs::remove_file(dir.join("a")).expect("rm");
        let e = read(&s, &cg, dir).expect_err("gone");
        assert!(
            matches!(&e, CgroupError::Read { file, .. } if file.ends_with("a")),
            "{e}"
        );
        assert_eq!(s.held_fds(), 0, "nothing kept for a cgroup that is gone");
        // Another cgroup's descriptors are kept when one is forgotten.
        fs::write(dir.join("a"), "3").expect("a");
        fs::write(dir.join("b"), "4").expect("b");
        let other = CgroupPath::instance("api", "api-0");
        read(&s, &other, dir).expect("read");
        read(&s, &cg, dir).expect("read");
        assert_eq!(s.held_fds(), 4);
        s.forget(&cg);
        assert_eq!(s.held_fds(), 2);
    }

    #[test]
    fn a_best_effort_file_that_cannot_be_read_is_none_and_the_rest_stays_held() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fs::write(dir.join("a"), "1").expect("a");
        // A directory opens read-only but every read fails (EISDIR), like a PSI file with
        // PSI off (EOPNOTSUPP).
        fs::create_dir(dir.join("p")).expect("p");
        let cg = CgroupPath::instance("web", "web-0");
        let s = StatFiles::with_budget(10);
        let opens = std::cell::Cell::new(0);
        let wanted = || {
            opens.set(opens.get() + 1);
            vec![
                Wanted {
                    kind: F::A,
                    file: dir.join("a"),
                    need: Need::Required,
                },
                Wanted {
                    kind: F::B,
                    file: dir.join("p"),
                    need: Need::BestEffort,
                },
            ]
        };
        for round in 0..2 {
            let mut out = Vec::new();
            s.read(&cg, wanted, |k, _, t| {
                out.push(format!("{k:?}={}", t.unwrap_or("-")));
                Ok(())
            })
            .expect("read");
            assert_eq!(out, ["A=1", "B=-"], "round {round}");
            assert_eq!(s.held_fds(), 2, "both held: round {round}");
        }
        assert_eq!(
            opens.get(),
            1,
            "a failed best-effort read is no reason to reopen"
        );
        // Missing altogether: still not an error.
        let other = CgroupPath::instance("web", "web-1");
        let gone = || {
            vec![Wanted {
                kind: F::B,
                file: dir.join("missing"),
                need: Need::BestEffort,
            }]
        };
        s.read(&other, gone, |_, _, t| {
            assert_eq!(t, None);
            Ok(())
        })
        .expect("read");
    }

    #[test]
    fn files_opened_across_a_forget_are_read_but_not_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fs::write(dir.join("a"), "1").expect("a");
        let cg = CgroupPath::instance("web", "web-0");
        let s = StatFiles::with_budget(10);
        // The cgroup is removed (and forgotten) on another thread while this read opens its
        // files: the reading stands, the descriptors are not held.
        let racing = || {
            s.forget(&CgroupPath::service("web"));
            wanted(dir)
        };
        let mut out = Vec::new();
        s.read(&cg, racing, |k, _, t| {
            out.push(format!("{k:?}={}", t.unwrap_or("-")));
            Ok(())
        })
        .expect("read");
        assert_eq!(out, ["A=1", "B=-"]);
        assert_eq!(s.held_fds(), 0);
        // The next read holds them.
        read(&s, &cg, dir).expect("read");
        assert_eq!(s.held_fds(), 1);
    }

    #[test]
    fn files_of_several_directories_are_opened_in_each() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (d1, d2) = (tmp.path().join("memory"), tmp.path().join("pids"));
        for (d, v) in [(&d1, "1"), (&d2, "2")] {
            fs::create_dir(d).expect("dir");
            fs::write(d.join("x"), v).expect("x");
        }
        let s = StatFiles::with_budget(10);
        let files = |names: &[(&Path, &str)]| -> Vec<Wanted<F>> {
            names
                .iter()
                .map(|(d, n)| Wanted {
                    kind: F::A,
                    file: d.join(n),
                    need: Need::Required,
                })
                .collect()
        };
        let mut got = Vec::new();
        let cg = CgroupPath::instance("web", "web-0");
        s.read(
            &cg,
            || files(&[(&d1, "x"), (&d2, "x"), (&d1, "x")]),
            |_, p, t| {
                got.push((p.to_path_buf(), t.map(str::to_string)));
                Ok(())
            },
        )
        .expect("read");
        let want =
            [(&d1, "1"), (&d2, "2"), (&d1, "1")].map(|(d, v)| (d.join("x"), Some(v.to_string())));
        assert_eq!(got, want);
        // A directory that is gone: the error names the file, as an open by its path would.
        let gone = tmp.path().join("cpu");
        let other = CgroupPath::instance("web", "web-1");
        let e = s
            .read(&other, || files(&[(&gone, "x")]), |_, _, _| Ok(()))
            .expect_err("gone");
        assert!(
            matches!(&e, CgroupError::Read { file, source, .. }
                if *file == gone.join("x") && source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
    }

    #[test]
    fn no_more_than_the_budget_is_held() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fs::write(dir.join("a"), "1").expect("a");
        fs::write(dir.join("b"), "2").expect("b");
        let s = StatFiles::with_budget(5);
        for i in 0..4 {
            let cg = CgroupPath::instance("web", &format!("web-{i}"));
            assert_eq!(read(&s, &cg, dir).expect("read"), ["A=1", "B=2"]);
        }
        assert_eq!(s.held_fds(), 4, "two cgroups of two files fit in 5");
        // Those beyond it are still read, opened each time.
        fs::write(dir.join("b"), "7").expect("b");
        let cg = CgroupPath::instance("web", "web-3");
        assert_eq!(read(&s, &cg, dir).expect("read"), ["A=1", "B=7"]);
    }

    #[test]
    fn a_parse_error_is_reported_and_a_stale_descriptor_reopened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fs::write(dir.join("a"), "1").expect("a");
        let cg = CgroupPath::instance("web", "web-0");
        let s = StatFiles::with_budget(10);
        read(&s, &cg, dir).expect("read");
        let e = s
            .read(
                &cg,
                || wanted(dir),
                |_, p, _| Err(read_err("x", p, invalid_data("bad".into()))),
            )
            .expect_err("parse");
        assert!(e.to_string().contains("bad"), "{e}");
        assert_eq!(
            s.held_fds(),
            1,
            "a value it cannot parse is no reason to reopen"
        );
        // A file that appears later (held as absent) is seen once the cgroup is made anew.
        fs::write(dir.join("b"), "2").expect("b");
        assert_eq!(read(&s, &cg, dir).expect("read"), ["A=1", "B=-"]);
        s.forget(&cg);
        assert_eq!(read(&s, &cg, dir).expect("read"), ["A=1", "B=2"]);
    }
}
