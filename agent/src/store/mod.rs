//! Crash-safe persistence of the agent's desired state: a small key-value store of files
//! under `--state-dir`. A write goes to a temp file, is fsynced, renamed over the old value,
//! and the directory is fsynced, so after a crash (of the agent or the host) every key holds
//! either its old or its new value, never a torn one. Keys are `kind/name` with names the
//! spec validated (`[a-z0-9-]`), so they cannot walk out of the directory.
//!
//! Imports from the crate: nothing.

#[cfg(any(test, feature = "testkit"))]
mod memory;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[cfg(any(test, feature = "testkit"))]
pub use memory::MemStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state {key}: invalid key")]
    InvalidKey { key: String },
    #[error("state {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("state directory {path} is in use by another corrald (pid {holder})")]
    Locked { path: PathBuf, holder: String },
}

/// Where the agent keeps what must survive it.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Every key of `kind` with its value.
    fn list(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Write `value` under `kind/name`, durably, before returning.
    fn put(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Remove `kind/name` durably; absent keys are fine.
    fn delete(&self, kind: &str, name: &str) -> Result<(), StoreError>;

    /// Write `value` under `kind/name` atomically (a reader sees the old or the new value,
    /// also after the agent crashes) but without waiting for the disk: for records that
    /// describe processes, which a power loss ends anyway.
    fn put_atomic(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Remove `kind/name` at once (gone for every reader, also after the agent crashes) but
    /// without waiting for the disk: for keys written with [`Store::put_atomic`], which a
    /// power loss may bring back in an older state anyway. Absent keys are fine.
    fn delete_atomic(&self, kind: &str, name: &str) -> Result<(), StoreError>;

    /// Make what [`Store::put_atomic`] wrote under `kind/name` durable (its data and its
    /// name): after it returns, the value survives a host crash as `put` would have made it.
    /// A key removed since is fine: its removal is what gets synced.
    fn sync(&self, kind: &str, name: &str) -> Result<(), StoreError>;

    /// Set `kind/name` aside, kept but no longer listed (a value that cannot be read):
    /// returns where it is now.
    fn quarantine(&self, kind: &str, name: &str) -> Result<String, StoreError>;
}

fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The file-backed store: `<dir>/<kind>/<name>.json`.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    _lock: File,
}

impl FileStore {
    /// Open (creating if needed) the store in `dir` and take its lock: a second agent on the
    /// same state directory is refused instead of fighting the first over the instances.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        let io_err = |what, source| StoreError::Io {
            path: dir.to_path_buf(),
            what,
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| io_err("creating the directory", e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| io_err("opening the lock file", e))?;
        let mut lock = lock_when_free(lock, &lock_path).map_err(|holder| StoreError::Locked {
            path: dir.to_path_buf(),
            holder,
        })?;
        let _ = lock.set_len(0);
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(FileStore {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn path(&self, kind: &str, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_component(kind) || !valid_component(name) {
            return Err(StoreError::InvalidKey {
                key: format!("{kind}/{name}"),
            });
        }
        Ok(self.dir.join(kind).join(format!("{name}.json")))
    }
}

/// flock(LOCK_EX|LOCK_NB) on a file we keep: the lock lives as long as the fd.
fn lock_exclusive(f: File) -> Result<File, (File, io::Error)> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err((f, io::Error::last_os_error()));
    }
    Ok(f)
}

/// How long a lock whose agent is dead may still be held: by a child that agent cloned
/// and that has not executed yet (the descriptor is close-on-exec, so it goes at its exec).
const DEAD_HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The lock, once free. Held by a live agent: refused at once, with the holder's pid. Held
/// although the agent that wrote its pid is dead (killed while it was starting a process):
/// waited for a moment.
fn lock_when_free(mut f: File, path: &Path) -> Result<File, String> {
    let deadline = std::time::Instant::now() + DEAD_HOLDER_GRACE;
    loop {
        match lock_exclusive(f) {
            Ok(l) => return Ok(l),
            Err((back, _)) => f = back,
        }
        let holder = fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string();
        let dead = holder
            .parse::<i32>()
            .is_ok_and(|pid| pid > 0 && !Path::new(&format!("/proc/{pid}")).exists());
        if !dead || std::time::Instant::now() >= deadline {
            return Err(holder);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store for FileStore {
    fn list(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if !valid_component(kind) {
            return Err(StoreError::InvalidKey { key: kind.into() });
        }
        let dir = self.dir.join(kind);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: dir,
                    what: "listing",
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue; // temp files of an interrupted write, foreign files
            };
            if !valid_component(name) {
                continue;
            }
            let path = entry.path();
            let value = fs::read(&path).map_err(|source| StoreError::Io {
                path: path.clone(),
                what: "reading",
                source,
            })?;
            out.push((name.to_string(), value));
        }
        out.sort();
        Ok(out)
    }

    fn put(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(kind, name, value, true)
    }

    fn put_atomic(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(kind, name, value, false)
    }

    fn delete(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.remove(kind, name, true)
    }

    fn delete_atomic(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.remove(kind, name, false)
    }

    fn sync(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        let err = |what, source| StoreError::Io {
            path: path.clone(),
            what,
            source,
        };
        match File::open(&path) {
            Ok(f) => f.sync_all().map_err(|e| err("fsync", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("opening for fsync", e)),
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        match fsync_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err("fsync of the directory", e)),
            _ => Ok(()),
        }
    }

    fn quarantine(&self, kind: &str, name: &str) -> Result<String, StoreError> {
        let path = self.path(kind, name)?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Not `.json` any more: never listed, never overwritten by a later put.
        let aside = path.with_file_name(format!("{name}.json.unreadable-{secs}"));
        let err = |what, source| StoreError::Io {
            path: path.clone(),
            what,
            source,
        };
        fs::rename(&path, &aside).map_err(|e| err("setting aside", e))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        fsync_dir(&dir).map_err(|e| err("fsync of the directory", e))?;
        Ok(aside.display().to_string())
    }
}

impl FileStore {
    fn write(&self, kind: &str, name: &str, value: &[u8], durable: bool) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let err = |what, source| StoreError::Io {
            path: path.clone(),
            what,
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(|e| err("creating the directory", e))?;
        let tmp = dir.join(format!(".{name}.json.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(|e| err("creating a temp file", e))?;
        f.write_all(value).map_err(|e| err("writing", e))?;
        if durable {
            f.sync_all().map_err(|e| err("fsync", e))?;
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| err("renaming into place", e))?;
        if durable {
            fsync_dir(&dir).map_err(|e| err("fsync of the directory", e))?;
        }
        Ok(())
    }

    /// Unlinks `kind/name`; `durable`: then syncs its directory, so the removal survives a
    /// host crash.
    fn remove(&self, kind: &str, name: &str, durable: bool) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    what: "removing",
                    source,
                });
            }
        }
        if !durable {
            return Ok(());
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        fsync_dir(&dir).map_err(|source| StoreError::Io {
            path: dir,
            what: "fsync of the directory",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_atomic_removes_at_once_and_absent_keys_are_fine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::open(dir.path()).expect("open");
        s.put_atomic("instances", "web-0", b"one").expect("put");
        s.put_atomic("instances", "web-1", b"two").expect("put");
        s.delete_atomic("instances", "web-0").expect("delete");
        s.delete_atomic("instances", "web-0")
            .expect("absent is fine");
        s.delete_atomic("instances", "never")
            .expect("absent is fine");
        assert_eq!(
            s.list("instances").expect("list"),
            vec![("web-1".to_string(), b"two".to_vec())]
        );
        assert!(
            s.delete_atomic("instances", "../escape").is_err(),
            "keys are checked as for every other call"
        );
    }

    #[test]
    fn put_list_delete_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::open(dir.path()).expect("open");
        s.put("services", "web", b"one").expect("put");
        s.put("services", "web", b"two").expect("overwrite");
        s.put("services", "api", b"three").expect("put");
        assert_eq!(
            s.list("services").expect("list"),
            vec![
                ("api".into(), b"three".to_vec()),
                ("web".into(), b"two".to_vec())
            ]
        );
        s.delete("services", "web").expect("delete");
        s.delete("services", "web").expect("delete again is fine");
        assert_eq!(s.list("services").expect("list").len(), 1);
        assert!(s.list("nothing").expect("list").is_empty());
    }

    #[test]
    fn an_atomic_put_is_synced_later_and_a_removed_key_syncs_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::open(dir.path()).expect("open");
        s.put_atomic("services", "web", b"one").expect("put_atomic");
        assert_eq!(
            s.list("services").expect("list"),
            vec![("web".into(), b"one".to_vec())],
            "readable before its sync"
        );
        s.sync("services", "web").expect("sync");
        s.delete("services", "web").expect("delete");
        s.sync("services", "web").expect("a removed key syncs");
        s.sync("nothing", "web")
            .expect("a kind never written syncs");
        assert!(matches!(
            s.sync("services", "../x"),
            Err(StoreError::InvalidKey { .. })
        ));
    }

    #[test]
    fn keys_cannot_walk_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::open(dir.path()).expect("open");
        for bad in ["../x", "a/b", "", ".", "x y"] {
            assert!(
                matches!(
                    s.put("services", bad, b"v"),
                    Err(StoreError::InvalidKey { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn leftover_temp_files_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::open(dir.path()).expect("open");
        s.put("services", "web", b"good").expect("put");
        fs::write(dir.path().join("services/.web.json.tmp"), b"torn").expect("write");
        assert_eq!(
            s.list("services").expect("list"),
            vec![("web".into(), b"good".to_vec())]
        );
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = FileStore::open(dir.path()).expect("open");
        let second = FileStore::open(dir.path());
        assert!(
            matches!(second, Err(StoreError::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        FileStore::open(dir.path()).expect("free again once the first is gone");
    }
}
