//! Taking over from an earlier agent run: the saved services, the saved instances (those
//! still running adopted, those that ended meanwhile reported with their true end), their
//! listening sockets, and a stop for every process in the tree that no record explains.

use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lifecycle::remove_when_empty;
use super::records::{DELETING, InstanceRecord, RecordedState, SERVICES};
use super::slots::{Service, Slot};
use super::{Driver, cgroup_of};
use crate::cgroups::{CgroupBackend, CgroupPath};
use crate::events::EventKind;
use crate::rollout::record::State as RolloutState;
use crate::runtime::{InitExit, ProcessRef, ProcessStatus, Processes, Spawned};
use crate::spec::{self, InstanceKey};
use crate::supervisor::instance::{Instance, State, derived_incarnation};

/// Wait for instances left by an earlier agent run at most this long after their grace.
const LEFTOVER_KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// What stopping one leftover cgroup came to: whether it held processes, or why it failed.
type LeftoverStop = JoinHandle<(CgroupPath, Result<bool, String>)>;

impl Driver {
    /// Take over from an earlier agent run: load the desired state, adopt every instance that
    /// still runs (the same PID *and* start time, in its cgroup), report with their true end
    /// those that ended meanwhile, and stop what no record explains.
    pub async fn restore(&mut self) {
        self.load_services();
        self.resume_deletes();
        self.load_runs();
        self.adopt_instances();
        self.open_usage_files();
        self.acquire_sockets();
        self.stop_leftovers().await;
        self.resume_rollouts();
        self.resume_jobs();
    }

    fn load_services(&mut self) {
        for (name, desired) in self.saved_services() {
            match desired {
                Ok(d) if d.spec.name == name => {
                    if let Some(r) = d.running() {
                        tracing::info!(service = %name, rollout = %r.id, "resuming an interrupted rollout");
                    }
                    self.services.insert(name, Service::new(d));
                }
                Ok(d) => self.quarantine(
                    &name,
                    &format!("the record names another service ({:?})", d.spec.name),
                ),
                Err(e) => self.quarantine(&name, &e),
            }
        }
    }

    /// Deletes an earlier run began and did not finish (it was killed midway): each service
    /// is loaded as being deleted, so that what is left of it (running instances, their
    /// cgroups, records, files, sockets) goes the way of any delete, and nothing of it is
    /// adopted as live. The delete wins over a service record still there (the agent was
    /// killed between saving the delete and removing the record).
    fn resume_deletes(&mut self) {
        for (name, saved) in self.saved_deletes() {
            let from_record = self.services.remove(&name).map(|s| s.d);
            self.quarantined.remove(&name);
            if let Err(e) = self.deps.store.delete(SERVICES, &name) {
                tracing::error!(service = %name, error = %e, "cannot remove the record of a service being deleted");
            }
            let mut d = match (saved, from_record) {
                (Ok(d), _) if d.spec.name == name => d,
                (_, Some(d)) => d,
                (Ok(d), None) => {
                    self.abandon_delete(
                        &name,
                        &format!("it names another service ({:?})", d.spec.name),
                    );
                    continue;
                }
                (Err(e), None) => {
                    self.abandon_delete(&name, &e);
                    continue;
                }
            };
            // A rollout it had stops with the delete, as in the run that began it.
            let _ = d.finish_running(
                RolloutState::Cancelled,
                "the service is being deleted",
                SystemTime::now(),
            );
            tracing::info!(service = %name, "finishing a delete an earlier run began");
            let mut svc = Service::new(d);
            svc.deleting = true;
            self.services.insert(name, svc);
        }
    }

    /// A delete whose saved record cannot be read: the service is not loaded, so its
    /// processes and cgroups are stopped as leftovers; the record is set aside.
    fn abandon_delete(&mut self, name: &str, why: &str) {
        let moved = match self.deps.store.quarantine(DELETING, name) {
            Ok(to) => format!("set aside as {to}"),
            Err(e) => format!("could not be set aside ({e})"),
        };
        tracing::error!(service = %name, error = %why, record = %moved, "the saved delete is unreadable: what is left of the service is stopped as leftovers, its logs are kept");
    }

    /// A service whose record cannot be read: the file set aside (kept), its instances left
    /// running as they are (not adopted, not stopped) until an apply repairs it, and that
    /// reported in the log, an event and Node.
    fn quarantine(&mut self, name: &str, why: &str) {
        let moved = match self.deps.store.quarantine(SERVICES, name) {
            Ok(to) => format!("set aside as {to}"),
            Err(e) => format!("could not be set aside ({e})"),
        };
        tracing::error!(service = %name, error = %why, record = %moved, "the service's saved record is unreadable: its instances are left running as they are until `corral apply` repairs it");
        self.emit(
            name,
            None,
            EventKind::RecordQuarantined {
                record: moved.clone(),
                reason: why.to_string(),
            },
        );
        self.quarantined
            .insert(name.to_string(), format!("record {moved}: {why}"));
    }

    /// After an apply created a service that was quarantined: its instances that still run
    /// are adopted as running the applied spec (nothing is restarted for the repair), those
    /// that ended meanwhile are handled by its restart policy.
    pub(super) fn repair_quarantined(&mut self, name: &str) {
        if self.quarantined.remove(name).is_none() {
            return;
        }
        let Some(d) = self.services.get(name).map(|s| (s.d.revision, s.d.epoch)) else {
            return;
        };
        tracing::info!(service = %name, "the service's record is repaired: taking over its instances");
        let ended: Vec<(InstanceKey, String)> = self
            .saved_instances()
            .into_iter()
            .filter(|(key, _)| key.service == name)
            .filter_map(|(key, mut rec)| {
                (rec.revision, rec.epoch) = d;
                Some(key.clone()).zip(self.restore_slot(key, rec))
            })
            .collect();
        for (key, why) in ended {
            self.ended_while_away(&key, &why);
        }
    }

    /// Every saved instance back in its slot; then those that ended while no agent ran are
    /// handled by their restart policy.
    fn adopt_instances(&mut self) {
        let ended: Vec<(InstanceKey, String)> = self
            .saved_instances()
            .into_iter()
            .filter_map(|(key, rec)| Some(key.clone()).zip(self.restore_slot(key, rec)))
            .collect();
        for (key, why) in ended {
            self.ended_while_away(&key, &why);
        }
    }

    /// Open the adopted instances' cgroup stat files on a blocking thread while the restore
    /// goes on: the first status after a restart then reads through held descriptors instead
    /// of opening some 7 cgroupfs files per instance itself. It opens in the reverse of the
    /// listing's order, so that a listing that comes first meets it halfway.
    fn open_usage_files(&self) {
        let paths: Vec<CgroupPath> = self
            .services
            .iter()
            .flat_map(|(name, svc)| {
                svc.slots
                    .values()
                    .filter(|slot| slot.live.is_some())
                    .map(|slot| cgroup_of(&InstanceKey::new(name, slot.instance.index)))
            })
            .collect();
        if paths.is_empty() {
            return;
        }
        let cgroups = self.deps.cgroups.clone();
        tokio::task::spawn_blocking(move || {
            for path in paths.iter().rev() {
                // A cgroup that cannot be read now is read (and reported) by the status
                // that needs it.
                let _ = cgroups.stats(path);
            }
        });
    }

    /// Put a saved instance back in its slot, taking over a running one. Returns why a
    /// running one could not be taken over.
    fn restore_slot(&mut self, key: InstanceKey, rec: InstanceRecord) -> Option<String> {
        if self.quarantined.contains_key(&key.service) {
            // Kept as it is until the service's record is repaired.
            return None;
        }
        let Some(svc) = self.services.get_mut(&key.service) else {
            // Its service was deleted: its cgroup, if any, is a leftover.
            self.forget_record(&key.to_string());
            return None;
        };
        let instance = restored_instance(svc, &key, &rec);
        svc.slots.insert(key.index, Slot::new(instance));
        let RecordedState::Running {
            pid,
            start_time,
            boot_id,
        } = rec.state
        else {
            return None;
        };
        match self.take_over(&key, pid, start_time, &boot_id) {
            Ok(spawned) => {
                tracing::info!(instance = %key, pid, "adopted a running instance");
                let id = key.to_string();
                self.emit(&key.service, Some(&id), EventKind::Adopted { pid });
                self.watch(&key, 1, spawned, rec.ports);
                // It may have been adopted in the middle of a capped start: the cap is
                // lifted as for a new instance, at its first readiness or once no rollout
                // runs.
                if let Some(slot) = self.services.slot_mut(&key) {
                    slot.start_cap = slot.instance.spec.rollout.start_cpu;
                }
                if rec.incarnation == 0 {
                    // Save the derived id once.
                    self.persist_instance(&key);
                }
                None
            }
            Err(why) => Some(why),
        }
    }

    /// The instance's init, if it is still the process that was recorded: same boot, in
    /// the instance's cgroup, same PID and start time.
    fn take_over(
        &self,
        key: &InstanceKey,
        pid: i32,
        start_time: u64,
        boot_id: &str,
    ) -> Result<Spawned, String> {
        if boot_id != self.boot_id {
            return Err("recorded before the host rebooted".to_string());
        }
        let path = cgroup_of(key);
        if !self.deps.cgroups.holds(&path, pid).unwrap_or(false) {
            return Err(format!("its init (pid {pid}) is no longer in {path}"));
        }
        self.deps
            .processes
            .adopt(&key.to_string(), pid, start_time)
            .map_err(|e| e.to_string())
    }

    /// An instance that ended while no agent ran: its end as its init recorded it (else as
    /// its cgroup tells, else lost, with `why`).
    fn ended_while_away(&mut self, key: &InstanceKey, why: &str) {
        tracing::info!(instance = %key, reason = %why, "instance ended while the agent was away");
        let exit = InitExit {
            status: ProcessStatus::Unknown,
            record: self.deps.files.exit_record(&key.to_string()),
            spawn_error: None,
        };
        let unobserved = format!("ended while the agent was away and left no exit record: {why}");
        self.ended(key, exit, false, Some(unobserved));
    }

    /// Instances found in the cgroup tree at start belong to an earlier agent run. Each gets
    /// its stop signal, its grace period, then SIGKILL; then its cgroup is removed.
    async fn stop_leftovers(&self) {
        let cg = &self.deps.cgroups;
        let services: Vec<String> = cg
            .children(&CgroupPath::root())
            .unwrap_or_default()
            .into_iter()
            .filter(|svc| spec::valid_service_name(svc))
            // A quarantined service's instances run on, untouched.
            .filter(|svc| !self.quarantined.contains_key(svc))
            .collect();
        let tasks: Vec<LeftoverStop> = services
            .iter()
            .flat_map(|svc| self.stop_leftovers_of(svc))
            .collect();
        let mut stopped = 0;
        for t in tasks {
            match t.await {
                Ok((path, Ok(true))) => {
                    stopped += 1;
                    tracing::info!(cgroup = %path, "stopped an instance no record explains");
                }
                Ok((_, Ok(false))) => {}
                Ok((path, Err(e))) => {
                    tracing::error!(cgroup = %path, error = %e, "cannot clean up")
                }
                Err(e) => tracing::error!(error = %e, "leftover cleanup task failed"),
            }
        }
        for svc in services.iter().filter(|s| !self.services.contains(s)) {
            if let Err(e) = cg.remove(&CgroupPath::service(svc)) {
                tracing::warn!(service = %svc, error = %e, "cannot remove the cgroup of a deleted service");
            }
        }
        if stopped > 0 {
            tracing::info!(stopped, "instances without a record were stopped");
        }
    }

    /// Stop, each in a task, the instance cgroups of `svc` no slot explains.
    fn stop_leftovers_of(&self, svc: &str) -> Vec<LeftoverStop> {
        let known = self.services.get(svc);
        let (signal, grace) = match known {
            Some(s) => (s.d.spec.stop.signal, s.d.spec.stop.grace),
            None => (libc::SIGTERM, Duration::from_secs(10)),
        };
        let cg = &self.deps.cgroups;
        cg.children(&CgroupPath::service(svc))
            .unwrap_or_default()
            .into_iter()
            .filter(|inst| known.is_none_or(|s| !s.instances().any(|i| i.id == *inst)))
            .map(|inst| {
                let path = CgroupPath::service(svc).child(&inst);
                let (cg, rt) = (cg.clone(), self.deps.processes.clone());
                tokio::spawn(async move {
                    let stopped = stop_leftover(&*cg, &*rt, &path, signal, grace).await;
                    (path, stopped)
                })
            })
            .collect()
    }
}

/// A saved instance as a slot's state machine: in backoff until the same wall-clock time,
/// exited, or running as run 1 of this agent.
fn restored_instance(svc: &Service, key: &InstanceKey, rec: &InstanceRecord) -> Instance {
    // The spec of the revision it runs (the current one if no longer kept).
    let spec = svc
        .d
        .spec_of(rec.revision)
        .unwrap_or_else(|| svc.d.spec.clone());
    let mut inst =
        Instance::new(key.index, key.to_string(), spec, rec.revision).with_epoch(rec.epoch);
    inst.history = rec.history.clone();
    inst.incarnation = match (&rec.state, rec.incarnation) {
        // A run recorded before incarnations existed: the same id on every adoption.
        (
            RecordedState::Running {
                pid,
                start_time,
                boot_id,
            },
            0,
        ) => derived_incarnation(boot_id, *pid, *start_time),
        (_, id) => id,
    };
    let (now, wall) = (Instant::now(), SystemTime::now());
    inst.state = match rec.state {
        RecordedState::Backoff { until } => State::Backoff {
            until: now + until.duration_since(wall).unwrap_or_default(),
        },
        RecordedState::Exited => State::Exited,
        RecordedState::Running { pid, .. } => {
            let ago = |t: SystemTime| wall.duration_since(t).unwrap_or_default();
            inst.pid = Some(pid);
            inst.generation = 1;
            State::Running {
                since: rec
                    .history
                    .started_at
                    .map_or(now, |t| now.checked_sub(ago(t)).unwrap_or(now)),
            }
        }
    };
    inst
}

/// Stop one instance cgroup left by an earlier run: stop signal to its init, grace, SIGKILL,
/// removal. Ok(true) when processes were found and stopped.
async fn stop_leftover(
    cg: &dyn CgroupBackend,
    rt: &dyn Processes,
    path: &CgroupPath,
    signal: i32,
    grace: Duration,
) -> Result<bool, String> {
    let pids = cg.procs(path).map_err(|e| e.to_string())?;
    let had = !pids.is_empty();
    if had {
        for root in rt.roots(&pids) {
            let _ = rt.signal(
                &ProcessRef {
                    pid: root,
                    pidfd: None,
                },
                signal,
            );
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if cg.procs(path).map(|p| p.is_empty()).unwrap_or(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    remove_when_empty(cg, path, LEFTOVER_KILL_TIMEOUT).await?;
    Ok(had)
}
