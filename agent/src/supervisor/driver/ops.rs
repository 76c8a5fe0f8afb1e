//! The operations the API asks for: apply a spec, restart, roll back, scale, delete, signal
//! an instance, look up a rollout. Each checks what it is asked against the desired state
//! and the host, saves the new desired state before anything takes effect, and leaves the
//! rest to reconciling.

use std::collections::{BTreeMap, BTreeSet};
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
use crate::spec::{self, FieldError, InstanceKey, ServiceSpec};
use crate::supervisor::capacity;
use crate::supervisor::desired::{Desired, Target};
use crate::supervisor::instance::State;
use crate::supervisor::{
    ApplyKind, ApplyOutcome, Deleted, Owner, RolloutStarted, Scaled, Signaled, SupervisorError,
};

/// One spec of a batch apply, with its own `force` and expected generation.
#[derive(Debug)]
pub struct BatchItem {
    pub spec: ServiceSpec,
    pub force: bool,
    pub expected: Option<u64>,
}

/// An apply's new desired state, prepared on a copy.
struct Prepared {
    name: String,
    d: Desired,
    /// A new service.
    created: bool,
    rollout_id: Option<String>,
    superseded: Option<String>,
}

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
        mut spec: ServiceSpec,
        dry_run: bool,
        force: bool,
    ) -> Result<ApplyOutcome, SupervisorError> {
        let name = spec.name.clone();
        self.check_owner(&name, from, force)?;
        self.check_kind(&spec)?;
        let asked = self.keep_autoscaled_count(&mut spec);
        let plan = self.plan_apply(&spec)?;
        let kind = plan.kind;
        let mut outcome = self.outcome_of(&name, plan);
        if kind != ApplyKind::Unchanged {
            self.admission(&spec)?;
        }
        if dry_run || kind == ApplyKind::Unchanged {
            return Ok(outcome);
        }
        if kind == ApplyKind::Updated {
            self.check_running(&name, force)?;
        }
        // Bound before anything is saved: an address in use refuses the apply whole.
        let sockets = self.sockets_for(&spec)?;
        let superseded =
            self.commit_apply(from, Arc::new(spec), kind, asked, sockets, &mut outcome)?;
        tracing::debug!(target: crate::phases::TARGET, service = %name, at_ns = crate::phases::now_ns(), "apply saved");
        self.announce_applied(&name, &outcome, superseded, "applied");
        self.note_job(&name);
        Ok(outcome)
    }

    /// The log line and event of a spec that was applied (`what`: "applied", "applied
    /// (batch)"), and the start of its rollout if it has one (or ended one).
    fn announce_applied(
        &mut self,
        name: &str,
        o: &ApplyOutcome,
        superseded: Option<String>,
        what: &'static str,
    ) {
        tracing::info!(service = %name, revision = o.revision, outcome = o.kind.as_str(), "{what}");
        self.emit(
            name,
            None,
            EventKind::Applied {
                revision: o.revision,
                outcome: o.kind,
                changes: o.changes.clone(),
            },
        );
        if o.rollout_id.is_some() || superseded.is_some() {
            self.announce_rollout(name, superseded);
        }
    }

    /// An autoscaled service's count is the autoscaler's (or the last `Scale`'s) while the
    /// applied `replicas` stays what the last apply asked for: applying the same spec again
    /// leaves the running count alone (kept within a changed `[min, max]`). A `replicas`
    /// other than the last applied one sets the count, as for any service.
    /// Returns the `replicas` the spec asked for.
    fn keep_autoscaled_count(&self, spec: &mut ServiceSpec) -> u32 {
        let asked = spec.replicas;
        let Some(svc) = self.services.get(&spec.name) else {
            return asked;
        };
        if let (Some(scale), Some(_)) = (spec.scale, svc.d.spec.scale)
            && svc.d.applied_replicas == Some(asked)
        {
            spec.replicas = svc.d.spec.replicas.clamp(scale.min, scale.max);
        }
        asked
    }

    /// Created, unchanged, scaled (only `replicas` differs) or updated (a new revision).
    /// What applying `plan` to service `name` answers: its generation after the apply (the
    /// same when nothing changes), no rollout yet.
    fn outcome_of(&self, name: &str, plan: ApplyPlan) -> ApplyOutcome {
        let generation = match (plan.kind, self.services.get(name)) {
            (ApplyKind::Unchanged, Some(s)) => s.d.generation,
            (_, Some(s)) => s.d.generation + 1,
            (_, None) => 1,
        };
        ApplyOutcome {
            name: name.to_string(),
            revision: plan.revision,
            kind: plan.kind,
            changes: plan.changes,
            replaces_instances: plan.replaces,
            rollout_id: None,
            generation,
        }
    }

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
                } else if spec.same_but_in_place(&d.spec) {
                    // Labels or annotations (and perhaps replicas): changed in place.
                    let kind = if spec.replicas == d.spec.replicas {
                        ApplyKind::Labeled
                    } else {
                        ApplyKind::Scaled
                    };
                    plan(kind, d.revision, changes, false)
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
        asked: u32,
        sockets: SocketMap,
        outcome: &mut ApplyOutcome,
    ) -> Result<Option<String>, SupervisorError> {
        let p = self.prepare_apply(from, spec, kind, asked);
        if p.created {
            // A delete of the same name whose end could not be saved: it is finished (its
            // instances are gone), and must not take the new service for its own at the
            // next start.
            self.clear_delete(&p.name)?;
        }
        // In place now, durable before the answer (see `Driver::answer_synced`): the
        // instances it starts do not wait for the disk.
        self.persist_unsynced(&p.name, &p.d)?;
        outcome.rollout_id.clone_from(&p.rollout_id);
        Ok(self.install(p, sockets))
    }

    /// The desired state an apply leads to, on a copy: nothing saved, nothing current yet.
    fn prepare_apply(
        &self,
        from: Owner,
        spec: Arc<ServiceSpec>,
        kind: ApplyKind,
        asked: u32,
    ) -> Prepared {
        let name = spec.name.clone();
        let Some(svc) = self.services.get(&name) else {
            return Prepared {
                name,
                d: Desired::new(spec, from),
                created: true,
                rollout_id: None,
                superseded: None,
            };
        };
        let mut d = svc.d.clone();
        d.generation += 1;
        d.applied_replicas = Some(asked);
        let (mut superseded, mut rollout_id) = (None, None);
        let spec_is_job = spec.job.is_some();
        if matches!(kind, ApplyKind::Scaled | ApplyKind::Labeled) {
            if let Some(r) = d.running_mut() {
                r.replicas = spec.replicas;
            }
            d.spec = spec;
        } else {
            let target = d.new_revision(spec);
            // A job's runs go on with the revision they started with: nothing is rolled.
            let n = match spec_is_job {
                true => 0,
                false => to_replace(svc.instances(), (target.revision, target.epoch)),
            };
            let now = SystemTime::now();
            if n == 0 {
                // Nothing runs that would be replaced: no rollout.
                superseded = d.retarget(target, now);
            } else {
                let (id, old) = d.begin(&name, Kind::Update, target, n, now);
                rollout_id = Some(id);
                superseded = old;
            }
        }
        Prepared {
            name,
            d,
            created: false,
            rollout_id,
            superseded,
        }
    }

    /// Make a prepared (and saved) desired state current. Returns the rollout it
    /// superseded, if any.
    fn install(&mut self, p: Prepared, sockets: SocketMap) -> Option<String> {
        if p.created {
            let mut svc = Service::new(p.d);
            svc.sockets.extend(sockets);
            self.services.insert(p.name.clone(), svc);
            // A service whose record was quarantined at start: its running instances are
            // taken back under the applied spec.
            self.repair_quarantined(&p.name);
            return None;
        }
        if let Some(svc) = self.services.get_mut(&p.name) {
            svc.d = p.d;
            svc.sockets.extend(sockets);
        }
        p.superseded
    }

    /// Apply several specs at once, all or nothing. Every spec is checked first (its
    /// expected generation, the spec against the current one, the host, the capacity all of
    /// them need together, a running rollout, its sockets bound); any refusal refuses the
    /// batch and nothing is saved. Then each service's record is saved in order; when one
    /// save fails, the records saved before it are written back as they were (removed for a
    /// service the batch created), so the state directory, the services the agent runs and
    /// the event log are all as before the call. Only then do the changes take effect
    /// together (events, rollouts, instances).
    pub(super) fn apply_batch(
        &mut self,
        from: Owner,
        mut items: Vec<BatchItem>,
        dry_run: bool,
    ) -> Result<Vec<ApplyOutcome>, SupervisorError> {
        let asked: Vec<u32> = items
            .iter_mut()
            .map(|item| self.keep_autoscaled_count(&mut item.spec))
            .collect();
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let mut dups = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(first) = seen.insert(item.spec.name.as_str(), i) {
                dups.push(FieldError::new(
                    format!("requests[{i}].name"),
                    format!(
                        "{:?} is also requests[{first}]: one spec per service",
                        item.spec.name
                    ),
                ));
            }
        }
        if !dups.is_empty() {
            return Err(SupervisorError::InvalidSpec(spec::SpecError {
                errors: dups,
            }));
        }
        let mut planned = Vec::with_capacity(items.len());
        for item in &items {
            self.check_owner(&item.spec.name, from, item.force)?;
            self.expect_generation(&item.spec.name, item.expected)?;
            let plan = self.plan_apply(&item.spec)?;
            if plan.kind != ApplyKind::Unchanged {
                self.host_admission(&item.spec)?;
            }
            planned.push(self.outcome_of(&item.spec.name, plan));
        }
        self.admit_batch_capacity(&items)?;
        if dry_run {
            return Ok(planned);
        }
        for (item, o) in items.iter().zip(&planned) {
            if o.kind == ApplyKind::Updated {
                self.check_running(&o.name, item.force)?;
            }
        }
        let mut sockets = Vec::with_capacity(items.len());
        for (item, o) in items.iter().zip(&planned) {
            let bound = if o.kind == ApplyKind::Unchanged {
                SocketMap::new()
            } else {
                self.sockets_for(&item.spec)?
            };
            sockets.push(bound);
        }
        let prepared: Vec<Option<Prepared>> = items
            .into_iter()
            .zip(&planned)
            .zip(asked)
            .map(|((item, o), asked)| {
                (o.kind != ApplyKind::Unchanged)
                    .then(|| self.prepare_apply(from, Arc::new(item.spec), o.kind, asked))
            })
            .collect();
        for (k, p) in prepared.iter().enumerate() {
            let Some(p) = p else { continue };
            if let Err(e) = self.persist(&p.name, &p.d) {
                self.restore_records(prepared[..k].iter().flatten());
                return Err(e);
            }
        }
        let mut outcomes = planned;
        for ((p, bound), o) in prepared.into_iter().zip(sockets).zip(outcomes.iter_mut()) {
            let Some(p) = p else { continue };
            o.rollout_id.clone_from(&p.rollout_id);
            let name = p.name.clone();
            let superseded = self.install(p, bound);
            self.announce_applied(&name, o, superseded, "applied (batch)");
        }
        Ok(outcomes)
    }

    /// Write back the records of services a failed batch had saved: as they are in memory
    /// (unchanged), or removed for the ones it created. A record that cannot be written back
    /// is logged: that service's saved state is ahead of what runs until its next change.
    fn restore_records<'a>(&self, saved: impl Iterator<Item = &'a Prepared>) {
        for p in saved {
            let result = match self.services.get(&p.name) {
                Some(svc) => self.persist(&p.name, &svc.d).map_err(|e| e.to_string()),
                None => self
                    .deps
                    .store
                    .delete(SERVICES, &p.name)
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = result {
                tracing::error!(service = %p.name, error = %e, "a failed batch apply could not write this service's record back");
            }
        }
    }

    /// The capacity a batch needs, all of it together: the services outside the batch as
    /// they are, each batch spec instead of its service's current one.
    fn admit_batch_capacity(&self, items: &[BatchItem]) -> Result<(), SupervisorError> {
        let Some(policy) = self.deps.capacity else {
            return Ok(());
        };
        let names: BTreeSet<&str> = items.iter().map(|i| i.spec.name.as_str()).collect();
        let mut committed = capacity::total(
            self.services
                .iter()
                .filter(|(name, s)| !names.contains(name.as_str()) && !s.deleting)
                .map(|(_, s)| capacity::commitment(&s.d.spec)),
        );
        for item in items {
            policy
                .admit(committed, &item.spec)
                .map_err(|exceeded| SupervisorError::CapacityExceeded { exceeded })?;
            committed = capacity::total([committed, capacity::commitment(&item.spec)].into_iter());
        }
        Ok(())
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
        d.generation += 1;
        let generation = d.generation;
        self.persist(name, &d)?;
        if let Some(svc) = self.services.get_mut(name) {
            svc.d = d;
        }
        self.announce_rollout(name, superseded);
        Ok(RolloutStarted {
            name: name.to_string(),
            revision,
            rollout_id: id,
            generation,
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
        if self
            .services
            .get(name)
            .is_some_and(|s| s.d.spec.job.is_some())
        {
            return Err(SupervisorError::IsAJob { name: name.into() });
        }
        if replicas > spec::MAX_REPLICAS {
            return Err(SupervisorError::ReplicasOutOfRange {
                replicas,
                max: spec::MAX_REPLICAS,
            });
        }
        self.check_owner(name, from, force)?;
        let (previous, generation) =
            self.set_replicas(name, replicas, |from, to| EventKind::Scaled { from, to })?;
        Ok(Scaled {
            name: name.into(),
            previous,
            replicas,
            generation,
        })
    }

    /// Set a service's desired count (persisted, recorded as `event(from, to)`); the previous
    /// count and the service's generation after it. The scaled spec must be one Apply accepts.
    pub(super) fn set_replicas(
        &mut self,
        name: &str,
        replicas: u32,
        event: impl FnOnce(u32, u32) -> EventKind,
    ) -> Result<(u32, u64), SupervisorError> {
        let svc = self.service_for_rollout(name)?;
        let previous = svc.d.spec.replicas;
        let mut generation = svc.d.generation;
        if previous != replicas {
            let mut d = svc.d.clone();
            d.generation += 1;
            generation = d.generation;
            let mut spec = (*d.spec).clone();
            spec.replicas = replicas;
            // Some rules depend on the instance count (a fixed port cannot be shared by
            // instances on the host's network).
            spec.to_raw().validate()?;
            if replicas > previous {
                self.admit_capacity(&spec)?;
            }
            d.spec = Arc::new(spec);
            if let Some(r) = d.running_mut() {
                r.replicas = replicas;
            }
            self.persist(name, &d)?;
            tracing::info!(service = %name, previous, replicas, "scaled");
            self.emit(name, None, event(previous, replicas));
            if let Some(svc) = self.services.get_mut(name) {
                svc.d = d;
            }
        }
        Ok((previous, generation))
    }

    /// Begin deleting a service: the delete is saved first (so that an agent killed midway
    /// finishes it at its next start), then the service's record goes, then every instance is
    /// stopped; `reply` is answered once they are gone ([`Driver::finish_delete`]).
    pub(super) fn delete(&mut self, from: Owner, name: &str, force: bool, reply: Reply<Deleted>) {
        if let Err(e) = self.check_owner(name, from, force) {
            return answer(reply, Err(e));
        }
        let Some(svc) = self.services.get(name) else {
            return answer(reply, Err(SupervisorError::NotFound { name: name.into() }));
        };
        if !svc.deleting {
            if let Err(e) = self.save_delete(name, &svc.d) {
                return answer(reply, Err(e));
            }
            if let Err(e) = self.deps.store.delete(SERVICES, name) {
                // Refused: the next start must not finish a delete the caller was told failed.
                if let Err(undo) = self.clear_delete(name) {
                    tracing::error!(service = %name, error = %undo, "cannot withdraw the saved delete: the next start will finish it");
                }
                return answer(reply, Err(SupervisorError::Storage { source: e }));
            }
            let Some(svc) = self.services.get_mut(name) else {
                return;
            };
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
    fn host_admission(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let mut why = Vec::new();
        let host = self.deps.cgroups.capabilities();
        why.extend(host.refuse_fields(&spec.resources));
        // The start cap is a cpu limit too.
        let start = spec::Resources {
            cpu: spec.rollout.start_cpu,
            ..spec::Resources::default()
        };
        why.extend(host.refuse_fields(&start).into_iter().map(|mut e| {
            e.field = "rollout.start_cpu".into();
            e
        }));
        why.extend(host.refuse_isolation(&spec.isolation));
        for ns in &spec.isolation.namespaces {
            if !self.deps.namespaces.contains(ns) {
                why.push(FieldError::new(
                    "isolation.namespaces",
                    format!(
                        "this host does not let the agent create a {} namespace",
                        ns.as_str()
                    ),
                ));
            }
        }
        if let Err(e) = self.deps.processes.preflight(spec) {
            why.extend(e);
        }
        why.extend(self.busy_ports(spec));
        if spec.package.is_some() && self.deps.packages.is_none() {
            why.push(FieldError::new(
                "artifact",
                "this agent runs without an artifact store",
            ));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(SupervisorError::Unenforceable { reasons: why })
        }
    }

    /// What this host cannot enforce for `spec` or what it lacks, then its capacity.
    fn admission(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        self.host_admission(spec)?;
        self.admit_capacity(spec)
    }

    /// Whether `spec` fits beside what every other service commits (see
    /// [`crate::supervisor::capacity`]).
    pub(super) fn admit_capacity(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let Some(policy) = self.deps.capacity else {
            return Ok(());
        };
        let others = capacity::total(
            self.services
                .iter()
                .filter(|(name, s)| *name != &spec.name && !s.deleting)
                .map(|(_, s)| capacity::commitment(&s.d.spec)),
        );
        policy
            .admit(others, spec)
            .map_err(|exceeded| SupervisorError::CapacityExceeded { exceeded })
    }

    /// The fixed `[ports]` of `spec` another process holds on the host's network, found by
    /// binding each (an instance binds it itself, so it would only crash-loop on
    /// `EADDRINUSE`). A port this service's own present instances were given is theirs, not
    /// checked; with a private network (`net`) nothing is.
    fn busy_ports(&self, spec: &ServiceSpec) -> Vec<FieldError> {
        if spec.isolation.has(spec::Namespace::Net) {
            return Vec::new();
        }
        let own: BTreeSet<u16> = self
            .services
            .get(&spec.name)
            .into_iter()
            .flat_map(|svc| svc.instances().filter(|i| present(i)))
            .flat_map(|i| fixed_ports(&i.spec))
            .collect();
        spec.ports
            .iter()
            .filter_map(|(name, p)| match p {
                spec::PortSpec::Fixed(port) if !own.contains(port) => Some((name, *port)),
                _ => None,
            })
            .filter_map(|(name, port)| {
                let e = self.deps.sockets.check_port(port).err()?;
                let why = if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    format!("port {port} is already in use on this host by another process ({e})")
                } else {
                    format!("port {port} cannot be bound on this host: {e}")
                };
                Some(FieldError::new(format!("ports.{name}"), why))
            })
            .collect()
    }

    /// Refuse a write whose `expected` generation is not the service's (0 expects no
    /// service). `None`: no expectation.
    /// `op` once the service's generation is `expected` (when given).
    pub(super) fn guarded<T>(
        &mut self,
        name: &str,
        expected: Option<u64>,
        op: impl FnOnce(&mut Self) -> Result<T, SupervisorError>,
    ) -> Result<T, SupervisorError> {
        self.expect_generation(name, expected)?;
        op(self)
    }

    pub(super) fn expect_generation(
        &self,
        name: &str,
        expected: Option<u64>,
    ) -> Result<(), SupervisorError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        let current = self.services.get(name).map(|s| s.d.generation);
        if current.unwrap_or(0) == expected {
            Ok(())
        } else {
            Err(SupervisorError::GenerationMismatch {
                name: name.to_string(),
                expected,
                current,
            })
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
            Some(s) if s.d.spec.job.is_some() => Err(SupervisorError::IsAJob { name: name.into() }),
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

/// The fixed ports of a spec.
fn fixed_ports(spec: &ServiceSpec) -> impl Iterator<Item = u16> + '_ {
    spec.ports.values().filter_map(|p| match p {
        spec::PortSpec::Fixed(port) => Some(*port),
        spec::PortSpec::Auto => None,
    })
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
