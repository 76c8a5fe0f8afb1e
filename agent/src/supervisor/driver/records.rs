//! What the driver saves so that a later agent run can take over: each service's desired
//! state (a [`Record`] under [`SERVICES`]) and each instance's record (an [`InstanceRecord`]
//! under [`INSTANCES`]: which process it is, or when it is due to start again, and its
//! history). Fields may be added, with defaults, but never renamed: a new agent reads what an
//! older one wrote.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Driver;
use super::slots::Slot;
use crate::spec::InstanceKey;
use crate::supervisor::SupervisorError;
use crate::supervisor::desired::{Desired, Record};
use crate::supervisor::instance::{History, State};

/// Store kind of the desired services.
pub(super) const SERVICES: &str = "services";

/// Store kind of the instance records.
pub(super) const INSTANCES: &str = "instances";

/// Store kind of the deletes in progress: a service's record saved here (durably) before the
/// first destructive step of its delete and removed after the last, so that an agent killed
/// in between finishes the delete at its next start instead of adopting what is left.
pub(super) const DELETING: &str = "deleting";

/// One instance as saved.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct InstanceRecord {
    pub service: String,
    pub index: u32,
    pub revision: u64,
    /// Absent in records written before rollouts existed.
    #[serde(default)]
    pub epoch: u64,
    pub state: RecordedState,
    #[serde(flatten)]
    pub history: History,
    pub ports: BTreeMap<String, u16>,
    /// The run's incarnation id; absent (0) in records written before incarnations existed.
    #[serde(default)]
    pub incarnation: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(super) enum RecordedState {
    Running {
        pid: i32,
        start_time: u64,
        boot_id: String,
    },
    Backoff {
        until: SystemTime,
    },
    Exited,
}

impl InstanceRecord {
    /// The record of a slot in a state a later run can take over from: running (with its
    /// process known), in backoff, or exited. `None` for the states in between.
    fn of(key: &InstanceKey, slot: &Slot, boot_id: &str) -> Option<InstanceRecord> {
        let inst = &slot.instance;
        let state = match inst.state {
            State::Running { .. } => {
                let live = slot.live.as_ref()?;
                RecordedState::Running {
                    pid: live.process.pid,
                    start_time: live.start_time,
                    boot_id: boot_id.to_string(),
                }
            }
            State::Backoff { until } => RecordedState::Backoff {
                until: SystemTime::now() + until.saturating_duration_since(Instant::now()),
            },
            State::Exited => RecordedState::Exited,
            _ => return None,
        };
        Some(InstanceRecord {
            service: key.service.clone(),
            index: key.index,
            revision: inst.revision,
            epoch: inst.epoch,
            state,
            history: inst.history.clone(),
            ports: slot
                .live
                .as_ref()
                .map(|l| l.ports.clone())
                .unwrap_or_default(),
            incarnation: inst.incarnation,
        })
    }
}

impl Driver {
    /// Save a service's desired state; until it is saved, nothing of a change takes effect.
    pub(super) fn persist(&self, name: &str, d: &Desired) -> Result<(), SupervisorError> {
        let bytes = serde_json::to_vec_pretty(&d.to_record())
            .map_err(|source| SupervisorError::Encoding { source })?;
        self.deps
            .store
            .put(SERVICES, name, &bytes)
            .map_err(|source| SupervisorError::Storage { source })
    }

    /// Save a service's desired state in place (a later agent run on this boot reads it) but
    /// not yet durably: [`Driver::sync_service`] must follow before the change is answered.
    pub(super) fn persist_unsynced(&self, name: &str, d: &Desired) -> Result<(), SupervisorError> {
        let bytes = serde_json::to_vec_pretty(&d.to_record())
            .map_err(|source| SupervisorError::Encoding { source })?;
        self.deps
            .store
            .put_atomic(SERVICES, name, &bytes)
            .map_err(|source| SupervisorError::Storage { source })
    }

    /// Make a service's record durable, as [`Driver::persist`] would have. When the sync
    /// fails, the current desired state is written again durably once before giving up.
    pub(super) fn sync_service(&self, name: &str) -> Result<(), SupervisorError> {
        let Err(first) = self.deps.store.sync(SERVICES, name) else {
            return Ok(());
        };
        tracing::warn!(service = %name, error = %first, "cannot sync the desired state; writing it again");
        match self.services.get(name) {
            Some(svc) => self.persist(name, &svc.d),
            None => Err(SupervisorError::Storage { source: first }),
        }
    }

    /// Save what a later agent run needs to take this instance over; a failed save is
    /// retried until it succeeds ([`super::unsaved`]).
    pub(super) fn persist_instance(&mut self, key: &InstanceKey) {
        let Some(slot) = self.services.slot(key) else {
            return;
        };
        let Some(record) = InstanceRecord::of(key, slot, &self.boot_id) else {
            return;
        };
        let id = &slot.instance.id;
        let result = serde_json::to_vec(&record)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.deps
                    .store
                    .put_atomic(INSTANCES, id, &b)
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => self.record_saved(key),
            Err(e) => self.record_unsaved(key, e),
        }
    }

    /// Drop an instance's record (its slot is gone). Not synced, as records are not: after a
    /// power loss no instance of the record's boot is left to adopt.
    pub(super) fn forget_record(&self, id: &str) {
        if let Err(e) = self.deps.store.delete_atomic(INSTANCES, id) {
            tracing::warn!(instance = %id, error = %e, "cannot remove the instance record");
        }
    }

    /// Every saved service, by name.
    pub(super) fn saved_services(&self) -> Vec<(String, Result<Desired, String>)> {
        self.saved_records(SERVICES)
    }

    /// Every service whose delete was begun and not finished, by name.
    pub(super) fn saved_deletes(&self) -> Vec<(String, Result<Desired, String>)> {
        self.saved_records(DELETING)
    }

    fn saved_records(&self, kind: &str) -> Vec<(String, Result<Desired, String>)> {
        match self.deps.store.list(kind) {
            Ok(records) => records
                .into_iter()
                .map(|(name, bytes)| {
                    let d = serde_json::from_slice::<Record>(&bytes)
                        .map_err(|e| e.to_string())
                        .and_then(Desired::from_record);
                    (name, d)
                })
                .collect(),
            Err(e) => {
                tracing::error!(kind, error = %e, "cannot read the saved services");
                Vec::new()
            }
        }
    }

    /// Mark `name` as being deleted, durably, before anything of it is removed.
    pub(super) fn save_delete(&self, name: &str, d: &Desired) -> Result<(), SupervisorError> {
        let bytes = serde_json::to_vec_pretty(&d.to_record())
            .map_err(|source| SupervisorError::Encoding { source })?;
        self.deps
            .store
            .put(DELETING, name, &bytes)
            .map_err(|source| SupervisorError::Storage { source })
    }

    /// `name`'s delete is finished (or a new service of that name is created): no delete of
    /// it to finish at the next start.
    pub(super) fn clear_delete(&self, name: &str) -> Result<(), SupervisorError> {
        self.deps
            .store
            .delete(DELETING, name)
            .map_err(|source| SupervisorError::Storage { source })
    }

    /// Every saved instance record whose name matches its content; others are dropped.
    pub(super) fn saved_instances(&self) -> Vec<(InstanceKey, InstanceRecord)> {
        let records = match self.deps.store.list(INSTANCES) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the instance records");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (id, bytes) in records {
            match decode_instance(&id, &bytes) {
                Some(found) => out.push(found),
                None => {
                    tracing::warn!(instance = %id, "unreadable instance record; dropped");
                    self.forget_record(&id);
                }
            }
        }
        out
    }
}

/// The record stored as `id`, when it is one and names that very instance.
fn decode_instance(id: &str, bytes: &[u8]) -> Option<(InstanceKey, InstanceRecord)> {
    let rec = serde_json::from_slice::<InstanceRecord>(bytes).ok()?;
    let key = InstanceKey::new(&rec.service, rec.index);
    (key.to_string() == id).then_some((key, rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::ExitClass;

    const RELEASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/release-0.1");

    fn read(path: &str) -> Vec<u8> {
        std::fs::read(format!("{RELEASE}/{path}")).expect("a file of the release")
    }

    /// Instance records as 0.1.0 wrote them: backoff, exited and running.
    #[test]
    fn instance_records_of_the_last_release_decode() {
        let (key, crash) =
            decode_instance("crash-0", &read("instances/crash-0.json")).expect("a backoff record");
        assert_eq!(key, InstanceKey::new("crash", 0));
        assert!(matches!(crash.state, RecordedState::Backoff { .. }));
        let exit = crash.history.last_exit.expect("its last end");
        assert_eq!(
            (exit.class, crash.history.restarts),
            (ExitClass::Exited(3), 1)
        );

        let (_, done) =
            decode_instance("done-0", &read("instances/done-0.json")).expect("an exited record");
        assert!(matches!(done.state, RecordedState::Exited));

        let (key, web) =
            decode_instance("web-1", &read("instances/web-1.json")).expect("a running record");
        assert_eq!((key.index, web.revision, web.epoch), (1, 1, 3));
        match web.state {
            RecordedState::Running { pid, boot_id, .. } => {
                assert!(pid > 0 && !boot_id.is_empty())
            }
            other => panic!("running expected, got {other:?}"),
        }
        // A record saved under another instance's name is not taken for it.
        assert!(decode_instance("web-2", &read("instances/web-1.json")).is_none());
    }

    /// Service records as 0.1.0 wrote them, with a finished rollout and kept revisions.
    #[test]
    fn service_records_of_the_last_release_decode() {
        let record: Record =
            serde_json::from_slice(&read("services/web.json")).expect("a service record");
        let d = Desired::from_record(record).expect("valid");
        assert_eq!((d.spec.name.as_str(), d.revision), ("web", 1));
        assert_eq!(d.revisions(), vec![1, 2]);
        let last = d.rollout.as_ref().expect("its last rollout");
        assert_eq!(last.id, "web-r2");
        assert!(!last.is_running() && !last.steps.is_empty());
        assert_eq!(d.past.len(), 1);

        let record: Record =
            serde_json::from_slice(&read("services/crash.json")).expect("a service record");
        assert!(Desired::from_record(record).is_ok());
    }
}
