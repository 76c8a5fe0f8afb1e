//! An in-memory [`Store`] for tests (built for `cfg(test)` and the `testkit` feature only).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{Store, StoreError};

/// An in-memory store for tests; can be told to fail writes.
#[derive(Debug, Default)]
pub struct MemStore {
    data: Mutex<BTreeMap<(String, String), Vec<u8>>>,
    /// Values set aside, by their key.
    quarantined: Mutex<BTreeMap<(String, String), Vec<u8>>>,
    fail_writes: Mutex<bool>,
    /// Names whose `put` fails (one service's record on a failing disk sector).
    fail_names: Mutex<Vec<String>>,
    /// Keys written by `put_atomic` and not synced since.
    unsynced: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Run at each `sync`, before it: a test observes what happened before durability.
    on_sync: Mutex<Hook>,
    fail_syncs: Mutex<bool>,
    /// `put` fails but `put_atomic` does not: the disk takes no flush (EIO at fsync).
    fail_flushes: Mutex<bool>,
}

/// What [`MemStore::on_sync`] runs, with the key synced.
pub type SyncHook = Box<dyn Fn(&str, &str) + Send>;

#[derive(Default)]
struct Hook(Option<SyncHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(set)"
        } else {
            "Hook(none)"
        })
    }
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Make every following `put`/`delete` fail (a full disk).
    pub fn fail_writes(&self, fail: bool) {
        *self.fail_writes.lock().unwrap_or_else(|p| p.into_inner()) = fail;
    }

    /// Make every following `put` of `name` fail.
    pub fn fail_writes_of(&self, name: &str) {
        self.fail_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
    }

    /// Run `hook` at each following `sync`.
    pub fn on_sync(&self, hook: SyncHook) {
        *self.on_sync.lock().unwrap_or_else(|p| p.into_inner()) = Hook(Some(hook));
    }

    /// Make every following `sync` fail (an I/O error on the disk).
    pub fn fail_syncs(&self, fail: bool) {
        *self.fail_syncs.lock().unwrap_or_else(|p| p.into_inner()) = fail;
    }

    /// Make every following durable `put` and `sync` fail while `put_atomic` still writes:
    /// a disk that takes no flush.
    pub fn fail_flushes(&self, fail: bool) {
        *self.fail_flushes.lock().unwrap_or_else(|p| p.into_inner()) = fail;
        self.fail_syncs(fail);
    }

    /// Whether the value of `name` of `kind` would survive a host crash.
    pub fn is_durable(&self, kind: &str, name: &str) -> bool {
        self.get(kind, name).is_some()
            && !self
                .unsynced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&(kind.to_string(), name.to_string()))
    }

    /// The stored value of `name` of `kind`, if any.
    pub fn get(&self, kind: &str, name: &str) -> Option<Vec<u8>> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(kind.to_string(), name.to_string()))
            .cloned()
    }

    /// Write `value` in place, as every put does.
    fn write(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.check()?;
        if self
            .fail_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n == name)
        {
            return Err(StoreError::Io {
                path: PathBuf::from(format!("(memory)/{kind}/{name}")),
                what: "writing",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((kind.into(), name.into()), value.to_vec());
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kind.to_string(), name.to_string()));
        Ok(())
    }

    fn check(&self) -> Result<(), StoreError> {
        if *self.fail_writes.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StoreError::Io {
                path: PathBuf::from("(memory)"),
                what: "writing",
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(())
    }
}

impl Store for MemStore {
    fn list(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        Ok(data
            .iter()
            .filter(|((k, _), _)| k == kind)
            .map(|((_, n), v)| (n.clone(), v.clone()))
            .collect())
    }

    fn put(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError> {
        if *self.fail_flushes.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StoreError::Io {
                path: PathBuf::from(format!("(memory)/{kind}/{name}")),
                what: "fsync",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.write(kind, name, value)
    }

    fn put_atomic(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(kind, name, value)?;
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((kind.to_string(), name.to_string()));
        Ok(())
    }

    fn sync(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        if let Some(hook) = &self.on_sync.lock().unwrap_or_else(|p| p.into_inner()).0 {
            hook(kind, name);
        }
        if *self.fail_syncs.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(StoreError::Io {
                path: PathBuf::from(format!("(memory)/{kind}/{name}")),
                what: "fsync",
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kind.to_string(), name.to_string()));
        Ok(())
    }

    fn delete(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.check()?;
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kind.to_string(), name.to_string()));
        Ok(())
    }

    fn delete_atomic(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.delete(kind, name)?;
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((kind.to_string(), name.to_string()));
        Ok(())
    }

    fn quarantine(&self, kind: &str, name: &str) -> Result<String, StoreError> {
        self.check()?;
        let key = (kind.to_string(), name.to_string());
        let value = self
            .data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
            .unwrap_or_default();
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, value);
        Ok(format!("(memory)/{kind}/{name}.unreadable"))
    }
}
