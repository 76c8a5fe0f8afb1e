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

    /// The stored value of `name` of `kind`, if any.
    pub fn get(&self, kind: &str, name: &str) -> Option<Vec<u8>> {
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(kind.to_string(), name.to_string()))
            .cloned()
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
        Ok(())
    }

    fn put_atomic(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put(kind, name, value)
    }

    fn delete(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.check()?;
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(kind.to_string(), name.to_string()));
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
