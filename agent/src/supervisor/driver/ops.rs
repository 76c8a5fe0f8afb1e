//! The operations the API asks for: apply a spec, restart, roll back, scale, delete, signal
//! an instance, look up a rollout. Each checks what it is asked against the desired state
//! and the host, saves the new desired state before anything takes effect, and leaves the
//! rest to reconciling.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::records::SERVICES;
use super::rolling::{present, to_replace};
use super::slots::Service;
use super::sockets::SocketMap;
use super::{Driver, Reply, answer};
use crate::events::EventKind;
use crate::rollout::record::{Kind, Rollout, State as RolloutState};
use crate::runtime::ProcessRef;
use crate::runtime::init::FORWARDED;
use crate::spec::{self, InstanceKey, ServiceSpec};
use crate::supervisor::desired::{Desired, Target};
use crate::supervisor::instance::State;
use crate::supervisor::{
    ApplyKind, ApplyOutcome, Deleted, Owner, RolloutStarted, Scaled, Signaled, SupervisorError,
};

/// What an apply changes, decided before anything is done.
struct ApplyPlan {
    kind: ApplyKind,
    revision: u64,
    changes: Vec<String>,
    replaces: bool,
}

impl Driver {
    pub(super) fn apply(
        &mut self,
        from: Owner,
        spec: ServiceSpec,
        dry_run: bool,
        force: bool,
    ) -> Result<ApplyOutcome, SupervisorError> {
        let name = spec.name.clone();
        self.check_owner(&name, from, force)?;
        let plan = self.plan_apply(&spec)?;
        let mut outcome = ApplyOutcome {
            name: name.clone(),
            revision: plan.revision,
            kind: plan.kind,
            changes: plan.changes,
            replaces_instances: plan.replaces,
            rollout_id: None,
        };
        if plan.kind != ApplyKind::Unchanged {
            self.admission(&spec)?;
        }
        if dry_run || plan.kind == ApplyKind::Unchanged {
            return Ok(outcome);
        }
        if plan.kind == ApplyKind::Updated {
            self.check_running(&name, force)?;
        }
        // Bound before anything is saved: an address in use refuses the apply whole.
        let sockets = self.sockets_for(&spec)?;
        let superseded =
            self.commit_apply(from, Arc::new(spec), plan.kind, sockets, &mut outcome)?;
        tracing::info!(service = %name, revision = outcome.revision, outcome = outcome.kind.as_str(), "applied");
        self.emit(
            &name,
            None,
            EventKind::Applied {
                revision: outcome.revision,
                outcome: outcome.kind,
                changes: outcome.changes.clone(),
            },
        );
        if outcome.rollout_id.is_some() || superseded.is_some() {
            self.announce_rollout(&name, superseded);
        }
        Ok(outcome)
    }

    /// Created, unchanged, scaled (only `replicas` differs) or updated (a new revision).
    fn plan_apply(&self, spec: &ServiceSpec) -> Result<ApplyPlan, SupervisorError> {
        let plan = |kind, revision, changes, replaces| ApplyPlan {
            kind,
            revision,
            changes,
            replaces,
        };
        Ok(match self.services.get(&spec.name) {
            Some(svc) if svc.deleting => {
                return Err(SupervisorError::Deleting {
                    name: spec.name.clone(),
                });
            }
            Some(svc) => {
                let (d, changes) = (&svc.d, spec.changes_from(&svc.d.spec));
                if changes.is_empty() {
                    plan(ApplyKind::Unchanged, d.revision, changes, false)
                } else if spec.same_except_replicas(&d.spec) {
                    plan(ApplyKind::Scaled, d.revision, changes, false)
                } else {
                    let replaces = svc.instances().any(present);
                    plan(ApplyKind::Updated, d.last_revision + 1, changes, replaces)
                }
            }
            None => plan(ApplyKind::Created, 1, Vec::new(), false),
        })
    }

    /// Save and make current the applied spec; an update begins a rollout when instances
    /// run that it replaces. Returns the rollout it superseded, if any.
    fn commit_apply(
        &mut self,
        from: Owner,
        spec: Arc<ServiceSpec>,
        kind: ApplyKind,
        sockets: SocketMap,
        outcome: &mut ApplyOutcome,
    ) -> Result<Option<String>, SupervisorError> {
        let name = spec.name.clone();
        let Some(svc) = self.services.get(&name) else {
            let d = Desired::new(spec, from);
            self.persist(&name, &d)?;
            let mut svc = Service::new(d);
            svc.sockets.extend(sockets);
            self.services.insert(name, svc);
            return Ok(None);
        };
        let mut d = svc.d.clone();
        let mut superseded = None;
        if kind == ApplyKind::Scaled {
            if let Some(r) = d.running_mut() {
                r.replicas = spec.replicas;
            }
            d.spec = spec;
        } else {
            let target = d.new_revision(spec);
            let n = to_replace(svc.instances(), (target.revision, target.epoch));
            let now = SystemTime::now();
            if n == 0 {
                // Nothing runs that would be replaced: no rollout.
                superseded = d.retarget(target, now);
            } else {
                let (id, old) = d.begin(&name, Kind::Update, target, n, now);
                outcome.rollout_id = Some(id);
                superseded = old;
            }
        }
        self.persist(&name, &d)?;
        if let Some(svc) = self.services.get_mut(&name) {
            svc.d = d;
            svc.sockets.extend(sockets);
        }
        Ok(superseded)
    }

    pub(super) fn restart(
        &mut self,
        name: &str,
        force: bool,
    ) -> Result<RolloutStarted, SupervisorError> {
        let svc = self.service_for_rollout(name)?;
        self.check_running(name, force)?;
        let mut d = svc.d.clone();
        let target = Target {
            revision: d.revision,
            epoch: d.new_epoch(),
            spec: d.spec.clone(),
        };
        let n = to_replace(svc.instances(), (target.revision, target.epoch));
        self.start_rollout(name, d, Kind::Restart, target, n)
    }

    pub(super) fn rollback(
        &mut self,
        from: Owner,
        name: &str,
        revision: Option<u64>,
        force: bool,
    ) -> Result<RolloutStarted, SupervisorError> {
        let svc = self.service_for_rollout(name)?;
        self.check_owner(name, from, force)?;
        self.check_running(name, force)?;
        let rev = rollback_revision(name, &svc.d, revision)?;
        let spec = svc
            .d
            .spec_of(rev)
            .ok_or_else(|| SupervisorError::RevisionNotKept {
                revision: rev,
                kept: svc.d.revisions(),
            })?;
        self.admission(&spec)?;
        let sockets = self.sockets_for(&spec)?;
        let svc = self.service_for_rollout(name)?;
        let mut d = svc.d.clone();
        // Instances that already run that revision are kept: the rollout targets their epoch.
        let epoch = kept_epoch(svc, rev).unwrap_or_else(|| d.new_epoch());
        let target = Target {
            revision: rev,
            epoch,
            spec,
        };
        let n = to_replace(svc.instances(), (target.revision, target.epoch));
        let out = self.start_rollout(name, d, Kind::Rollback, target, n)?;
        if let Some(svc) = self.services.get_mut(name) {
            svc.sockets.extend(sockets);
        }
        Ok(out)
    }

    /// Begin a rollout on a copy of the desired state, save it, then make it current.
    fn start_rollout(
        &mut self,
        name: &str,
        mut d: Desired,
        kind: Kind,
        target: Target,
        to_replace: u32,
    ) -> Result<RolloutStarted, SupervisorError> {
        let revision = target.revision;
        let (id, superseded) = d.begin(name, kind, target, to_replace, SystemTime::now());
        self.persist(name, &d)?;
        if let Some(svc) = self.services.get_mut(name) {
            svc.d = d;
        }
        self.announce_rollout(name, superseded);
        Ok(RolloutStarted {
            name: name.to_string(),
            revision,
            rollout_id: id,
        })
    }

    pub(super) fn get_rollout(&self, id: &str) -> Result<Rollout, SupervisorError> {
        let not_found = || SupervisorError::RolloutNotFound { id: id.to_string() };
        let (service, _) = id.rsplit_once("-r").ok_or_else(not_found)?;
        self.services
            .get(service)
            .and_then(|s| s.d.find(id))
            .cloned()
            .ok_or_else(not_found)
    }

    pub(super) fn scale(
        &mut self,
        from: Owner,
        name: &str,
        replicas: u32,
        force: bool,
    ) -> Result<Scaled, SupervisorError> {
        if replicas > spec::MAX_REPLICAS {
            return Err(SupervisorError::ReplicasOutOfRange {
                replicas,
                max: spec::MAX_REPLICAS,
            });
        }
        self.check_owner(name, from, force)?;
        let svc = self.service_for_rollout(name)?;
        let previous = svc.d.spec.replicas;
        if previous != replicas {
            let mut d = svc.d.clone();
            let mut spec = (*d.spec).clone();
            spec.replicas = replicas;
            // Some rules depend on the instance count (a fixed port cannot be shared by
            // instances on the host's network): the scaled spec must be one Apply accepts.
            spec.to_raw().validate()?;
            d.spec = Arc::new(spec);
            if let Some(r) = d.running_mut() {
                r.replicas = replicas;
            }
            self.persist(name, &d)?;
            tracing::info!(service = %name, previous, replicas, "scaled");
            let (from, to) = (previous, replicas);
            self.emit(name, None, EventKind::Scaled { from, to });
            if let Some(svc) = self.services.get_mut(name) {
                svc.d = d;
            }
        }
        Ok(Scaled {
            name: name.into(),
            previous,
            replicas,
        })
    }

    /// Begin deleting a service: its record goes first, then every instance is stopped;
    /// `reply` is answered once they are gone ([`Driver::finish_delete`]).
    pub(super) fn delete(&mut self, from: Owner, name: &str, force: bool, reply: Reply<Deleted>) {
        if let Err(e) = self.check_owner(name, from, force) {
            return answer(reply, Err(e));
        }
        let Some(svc) = self.services.get_mut(name) else {
            return answer(reply, Err(SupervisorError::NotFound { name: name.into() }));
        };
        if !svc.deleting {
            if let Err(e) = self.deps.store.delete(SERVICES, name) {
                return answer(reply, Err(SupervisorError::Storage { source: e }));
            }
            svc.deleting = true;
            tracing::info!(service = %name, "deleting");
            let reason = "the service is being deleted";
            let now = SystemTime::now();
            if let Some(rollout) = svc.d.finish_running(RolloutState::Cancelled, reason, now) {
                let event = EventKind::RolloutFinished {
                    rollout,
                    state: RolloutState::Cancelled,
                    reason: reason.into(),
                    rollback: None,
                };
                self.emit(name, None, event);
            }
        }
        if let Some(svc) = self.services.get_mut(name) {
            svc.delete_waiters.push(reply);
        }
    }

    /// Deliver `signal` to an instance's service process. Signals the init forwards go to
    /// the init (through its pidfd, immune to PID reuse); others (SIGKILL, SIGSTOP, ...) go
    /// straight to the service process.
    pub(super) fn send_signal(
        &self,
        key: &InstanceKey,
        signal: i32,
    ) -> Result<Signaled, SupervisorError> {
        let instance = key.to_string();
        let not_running = |state: &'static str| SupervisorError::NotRunning {
            instance: instance.clone(),
            state,
        };
        let slot = self
            .services
            .slot(key)
            .ok_or_else(|| SupervisorError::InstanceNotFound {
                instance: instance.clone(),
            })?;
        let live = match (slot.instance.state, slot.live.as_ref()) {
            (State::Running { .. }, Some(l)) => l,
            (state, _) => return Err(not_running(state.phase().as_str())),
        };
        let main = live
            .main_pid
            .or_else(|| self.deps.processes.main_pid(live.process.pid));
        let forwarded = FORWARDED.iter().any(|s| *s as i32 == signal);
        let (target, pid) = match (forwarded, main) {
            (true, _) => (live.process.clone(), main.unwrap_or(live.process.pid)),
            (false, Some(m)) => (
                ProcessRef {
                    pid: m,
                    pidfd: None,
                },
                m,
            ),
            (false, None) => return Err(not_running("starting")),
        };
        self.deps
            .processes
            .signal(&target, signal)
            .map_err(|source| SupervisorError::Signal {
                instance: instance.clone(),
                signal,
                source,
            })?;
        tracing::info!(instance, signal, pid, "signal sent");
        Ok(Signaled {
            instance: key.clone(),
            pid,
        })
    }

    /// What this host cannot enforce for `spec`, or what the spec needs that is not there.
    fn admission(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let mut why = Vec::new();
        let host = self.deps.cgroups.capabilities();
        if let Some(r) = host.refuse(&spec.resources) {
            why.push(r);
        }
        if let Some(r) = host.refuse_isolation(&spec.isolation) {
            why.push(r);
        }
        for ns in &spec.isolation.namespaces {
            if !self.deps.namespaces.contains(ns) {
                why.push(format!(
                    "isolation.namespaces: this host does not let the agent create a {} namespace",
                    ns.as_str()
                ));
            }
        }
        if let Err(e) = self.deps.processes.preflight(spec) {
            why.push(e);
        }
        match &spec.package {
            Some(_) if self.deps.packages.is_none() => {
                why.push("artifact: this agent runs without an artifact store".to_owned());
            }
            _ => {}
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(SupervisorError::Unenforceable { reasons: why })
        }
    }

    /// Refuse a change of a service from a source that does not own it: the local API may
    /// force one through (the fleet's next change of the service wins again); the fleet never
    /// takes over a local service.
    fn check_owner(&self, name: &str, from: Owner, force: bool) -> Result<(), SupervisorError> {
        let Some(owner) = self.services.get(name).map(|s| s.d.owner) else {
            return Ok(());
        };
        match (owner, from) {
            (Owner::Etcd, Owner::Local) if !force => Err(SupervisorError::OwnedByFleet {
                name: name.to_string(),
            }),
            (Owner::Local, Owner::Etcd) => Err(SupervisorError::OwnedLocally {
                name: name.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Refuse when a rollout runs and the caller did not ask to supersede it.
    fn check_running(&self, name: &str, force: bool) -> Result<(), SupervisorError> {
        match self.services.get(name).and_then(|s| s.d.running()) {
            Some(r) if !force => Err(SupervisorError::RolloutRunning {
                name: name.to_string(),
                id: r.id.clone(),
                progress: r.progress_line(),
            }),
            _ => Ok(()),
        }
    }

    fn service_for_rollout(&self, name: &str) -> Result<&Service, SupervisorError> {
        match self.services.get(name) {
            None => Err(SupervisorError::NotFound { name: name.into() }),
            Some(s) if s.deleting => Err(SupervisorError::Deleting { name: name.into() }),
            Some(s) => Ok(s),
        }
    }
}

/// The revision a rollback goes to: the one asked for (never the current one), else the
/// highest kept one below the current one.
fn rollback_revision(name: &str, d: &Desired, asked: Option<u64>) -> Result<u64, SupervisorError> {
    match asked {
        Some(r) if r == d.revision => Err(SupervisorError::CurrentRevision { revision: r }),
        Some(r) => Ok(r),
        None => d
            .previous_revision()
            .ok_or_else(|| SupervisorError::NothingToRollBackTo {
                name: name.to_string(),
                revision: d.revision,
                kept: d.revisions(),
            }),
    }
}

/// The epoch most present instances of `revision` run (the highest on a tie), if any runs.
fn kept_epoch(svc: &Service, revision: u64) -> Option<u64> {
    let mut epochs: BTreeMap<u64, u32> = BTreeMap::new();
    for i in svc
        .instances()
        .filter(|i| present(i) && i.revision == revision)
    {
        *epochs.entry(i.epoch).or_default() += 1;
    }
    epochs
        .into_iter()
        .max_by_key(|(e, n)| (*n, *e))
        .map(|(e, _)| e)
}
