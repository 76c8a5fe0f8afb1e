//! Instance records that could not be saved (a full disk, an I/O error): each is kept here
//! and saved again, after a delay doubling from [`FIRST_RETRY`] to [`MAX_RETRY`], until a
//! save succeeds or the instance's slot is gone. Without it, an agent restart would find an
//! older record (or none) and take a healthy instance for lost. The first failure of each
//! instance is reported in the log and as a `record_unsaved` event, and the records not saved
//! yet in the node report (how many, since when); the save that ends the run of failures is
//! logged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Driver;
use crate::events::EventKind;
use crate::spec::InstanceKey;
use crate::supervisor::UnsavedRecords;

/// The first retry of a failed save, after this.
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Retries are at most this far apart.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(10);

/// The instance records waiting to be saved again.
#[derive(Debug)]
pub(super) struct Unsaved {
    /// Each instance whose last save failed: why, and since when it has been unsaved.
    keys: BTreeMap<InstanceKey, (String, SystemTime)>,
    retry_at: Option<Instant>,
    delay: Duration,
    /// The last failed save's error (empty once every record is saved).
    last_error: String,
}

impl Default for Unsaved {
    fn default() -> Self {
        Unsaved {
            keys: BTreeMap::new(),
            retry_at: None,
            delay: FIRST_RETRY,
            last_error: String::new(),
        }
    }
}

impl Unsaved {
    /// When the driver should wake up to retry.
    pub(super) fn wake(&self) -> Option<Instant> {
        self.retry_at
    }

    /// For the node report: how many, since when, the last error.
    pub(super) fn report(&self) -> UnsavedRecords {
        UnsavedRecords {
            count: crate::num::count_u32(self.keys.len()),
            since: self.keys.values().map(|(_, since)| *since).min(),
            error: self.last_error.clone(),
        }
    }
}

impl Driver {
    /// A save of `key`'s record failed with `error`: keep it for a retry, and report the
    /// first failure of the instance.
    pub(super) fn record_unsaved(&mut self, key: &InstanceKey, error: String) {
        let since = self.unsaved.keys.get(key).map(|(_, since)| *since);
        let first = since.is_none();
        let since = since.unwrap_or_else(SystemTime::now);
        self.unsaved
            .keys
            .insert(key.clone(), (error.clone(), since));
        self.unsaved.last_error.clone_from(&error);
        if self.unsaved.retry_at.is_none() {
            self.unsaved.retry_at = Some(Instant::now() + self.unsaved.delay);
        }
        if first {
            tracing::error!(instance = %key, error = %error, "cannot save the instance record: retrying until it is saved (until then an agent restart could not take the instance over)");
            let id = key.to_string();
            self.emit(&key.service, Some(&id), EventKind::RecordUnsaved { error });
        }
    }

    /// `key`'s record is saved (or its slot is gone): no retry for it.
    pub(super) fn record_saved(&mut self, key: &InstanceKey) {
        if self.unsaved.keys.remove(key).is_some() {
            tracing::info!(instance = %key, "instance record saved after earlier failures");
        }
        if self.unsaved.keys.is_empty() {
            self.unsaved.retry_at = None;
            self.unsaved.delay = FIRST_RETRY;
            self.unsaved.last_error.clear();
        }
    }

    /// Save again the records that failed, once their retry is due.
    pub(super) fn retry_unsaved(&mut self) {
        if self.unsaved.retry_at.is_none_or(|t| t > Instant::now()) {
            return;
        }
        self.unsaved.retry_at = None;
        self.unsaved.delay = (self.unsaved.delay * 2).min(MAX_RETRY);
        let keys: Vec<InstanceKey> = self.unsaved.keys.keys().cloned().collect();
        for key in keys {
            if self.services.slot(&key).is_none() {
                self.record_saved(&key);
                continue;
            }
            self.persist_instance(&key);
        }
        if !self.unsaved.keys.is_empty() && self.unsaved.retry_at.is_none() {
            self.unsaved.retry_at = Some(Instant::now() + self.unsaved.delay);
        }
    }
}
