//! The driver's side of desired state and rollouts: reconciling each service through the
//! rollout planner, applying specs, `Restart`, `Rollback`, and keeping each rollout's record
//! and events up to date.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use super::{Driver, SERVICES, Service};
use crate::events::EventKind;
use crate::rollout::record::{Kind, Rollout, State as RolloutState};
use crate::rollout::{self, Plan, Policy, Progress, Slot};
use crate::spec::{self, ServiceSpec};
use crate::supervisor::desired::{Desired, Target};
use crate::supervisor::instance::{Effect, Event, Instance, State, StopReason};
use crate::supervisor::reconcile::{self, Action, Health};
use crate::supervisor::{ApplyKind, ApplyOutcome, Outcome, SupervisorError};

/// An instance that still counts: not on its way out.
pub(super) fn present(i: &Instance) -> bool {
    !matches!(
        i.state,
        State::Removing
            | State::Gone
            | State::Stopping {
                reason: StopReason::Retire | StopReason::ScaleDown | StopReason::Delete,
                ..
            }
    )
}

/// Present instances that do not run `target`.
fn to_replace(instances: &BTreeMap<u32, Instance>, target: (u64, u64)) -> u32 {
    instances
        .values()
        .filter(|i| present(i) && (i.revision, i.epoch) != target)
        .count() as u32
}

impl Driver {
    pub(super) fn reconcile_all(&mut self) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            self.reconcile_service(&name);
            self.finish_delete(&name);
        }
    }

    /// Move one service toward its desired state: the planner decides what to start and
    /// stop; the instances' timers are served too. Each pass settles what it can; a few
    /// passes reach a fixed point (bounded, so a logic error can never spin the task).
    fn reconcile_service(&mut self, name: &str) {
        for _ in 0..8 {
            let Some(svc) = self.services.get(name) else {
                return;
            };
            let now = Instant::now();
            let steps = if svc.deleting {
                Vec::new()
            } else {
                self.announce_ready(name, now);
                let Some(svc) = self.services.get(name) else {
                    return;
                };
                let (policy, slots) = self.planner_view(svc, now);
                match rollout::plan(&policy, &slots, now) {
                    Plan::Complete => {
                        self.complete_rollout(name);
                        Vec::new()
                    }
                    Plan::Failed { index, reason } => {
                        self.fail_rollout(name, index, &reason);
                        continue;
                    }
                    Plan::Steps(steps) => steps,
                }
            };
            let Some(svc) = self.services.get(name) else {
                return;
            };
            let actions = reconcile::reconcile(svc.deleting, &steps, &svc.instances, now);
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Create(idx) => self.create_instance(name, idx),
                    Action::Event(idx, ev) => {
                        let retire = ev == Event::StopRequested(StopReason::Retire);
                        self.feed(name, idx, ev);
                        if retire {
                            self.note_retired(name, idx);
                        }
                    }
                }
            }
        }
        self.after_pass(name);
    }

    /// The planner's policy and view of a service's instances.
    fn planner_view(&self, svc: &Service, now: Instant) -> (Policy, Vec<Slot>) {
        let d = &svc.d;
        let running = d.running();
        let policy = Policy::new(d.spec.replicas, &d.spec.rollout, running.is_some());
        let target = (d.revision, d.epoch);
        let slots = svc
            .instances
            .values()
            .map(|i| {
                let health = if i.spec.health.is_none() {
                    Health::Unchecked
                } else {
                    match self.live.get(&i.id).and_then(|l| l.health.as_ref()) {
                        Some(h) => Health::Tracked {
                            state: h.tracker.state(),
                            since: h.tracker.since(),
                            started: h.tracker.started(),
                        },
                        None => Health::Unknown,
                    }
                };
                let mut s = reconcile::slot(i, health, target, now);
                s.started_here = running.is_some_and(|r| r.started_ids.contains(&i.id));
                // Paused after a failure: what runs stays; only missing instances are added.
                if d.paused {
                    s.new = true;
                }
                s
            })
            .collect();
        (policy, slots)
    }

    fn progress(&self, name: &str) -> Progress {
        let Some(svc) = self.services.get(name) else {
            return Progress::default();
        };
        let now = Instant::now();
        let (policy, slots) = self.planner_view(svc, now);
        rollout::progress(&policy, &slots, now)
    }

    /// A new slot at `index` running the service's target, started now.
    fn create_instance(&mut self, name: &str, index: u32) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let id = spec::instance_id(name, index);
        let d = &svc.d;
        svc.instances.insert(
            index,
            Instance::new(index, id.clone(), d.spec.clone(), d.revision).with_epoch(d.epoch),
        );
        let in_rollout = match svc.d.running_mut() {
            Some(r) => {
                r.started_ids.insert(id.clone());
                true
            }
            None => false,
        };
        self.apply_effects(name, index, vec![Effect::Spawn]);
        if in_rollout {
            let rev = self.services.get(name).map_or(0, |s| s.d.revision);
            self.rollout_step(
                name,
                "started",
                &id,
                format!("new instance {id} (revision {rev})"),
            );
        }
    }

    /// An old instance was asked to stop for the running rollout.
    fn note_retired(&mut self, name: &str, index: u32) {
        let Some(id) = self.instance_id(name, index) else {
            return;
        };
        let Some(r) = self.services.get_mut(name).and_then(|s| s.d.running_mut()) else {
            return;
        };
        if r.stopping_ids.insert(id.clone()) {
            r.replaced += 1;
            self.rollout_step(name, "stopping", &id, format!("old instance {id}"));
        }
    }

    /// An instance is gone: when the running rollout stopped it, that is a step.
    pub(super) fn note_gone(&mut self, name: &str, id: &str) {
        let removed = self
            .services
            .get_mut(name)
            .and_then(|s| s.d.running_mut())
            .is_some_and(|r| r.stopping_ids.remove(id));
        if removed {
            self.rollout_step(name, "stopped", id, format!("old instance {id} is gone"));
        }
    }

    /// Report new instances that just became ready.
    fn announce_ready(&mut self, name: &str, now: Instant) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let Some(r) = svc.d.running() else {
            return;
        };
        let (policy, slots) = self.planner_view(svc, now);
        let fresh: Vec<String> = rollout::ready_indexes(&policy, &slots, now)
            .into_iter()
            .filter_map(|idx| svc.instances.get(&idx).map(|i| i.id.clone()))
            .filter(|id| !r.ready_ids.contains(id))
            .collect();
        let min_healthy = spec::format_duration(policy.min_healthy);
        for id in fresh {
            if let Some(r) = self.services.get_mut(name).and_then(|s| s.d.running_mut()) {
                r.ready_ids.insert(id.clone());
            }
            self.rollout_step(
                name,
                "ready",
                &id,
                format!("new instance {id} healthy for {min_healthy}"),
            );
        }
    }

    /// Record a step of the running rollout, with the counts right after it, and report it.
    fn rollout_step(&mut self, name: &str, step: &str, instance: &str, message: String) {
        let progress = self.progress(name);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(r) = svc.d.running_mut() else {
            return;
        };
        r.progress = progress.into();
        r.step(SystemTime::now(), step, instance, message.clone());
        let event = EventKind::RolloutStep {
            rollout: r.id.clone(),
            step: step.to_string(),
            message,
            replaced: r.replaced,
            to_replace: r.to_replace,
            new: progress.new,
            ready: progress.new_ready,
            old: progress.old,
            available: progress.available,
        };
        tracing::info!(service = %name, rollout = %r.id, step, instance, progress = %r.progress_line(), "rollout step");
        svc.dirty = true;
        let inst = (!instance.is_empty()).then_some(instance);
        self.deps.events.append(name, inst, event);
    }

    /// The running rollout reached its end state.
    fn complete_rollout(&mut self, name: &str) {
        let progress = self.progress(name);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(r) = svc.d.running_mut() else {
            return;
        };
        r.progress = progress.into();
        let elapsed = SystemTime::now()
            .duration_since(r.started_at)
            .unwrap_or_default();
        r.finish(RolloutState::Succeeded, "", SystemTime::now());
        let id = r.id.clone();
        svc.dirty = true;
        tracing::info!(service = %name, rollout = %id, elapsed_ms = elapsed.as_millis() as u64, "rollout succeeded");
        self.emit(
            name,
            None,
            EventKind::RolloutFinished {
                rollout: id,
                state: "succeeded".into(),
                reason: String::new(),
                rollback: None,
            },
        );
        self.prune_sockets(name);
    }

    /// A new instance failed the running rollout: it stops there, and rolls back when the
    /// policy says so.
    fn fail_rollout(&mut self, name: &str, index: u32, reason: &str) {
        let id = spec::instance_id(name, index);
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        // Name the instance, and say how it ended when it did.
        let how = svc.instances.get(&index).and_then(|i| match i.state {
            State::Stopping {
                reason: StopReason::Unhealthy,
                ..
            } => Some("restarted for failing its health check".to_string()),
            State::Backoff { .. } | State::Exited => i
                .last_error
                .clone()
                .or_else(|| i.last_exit.as_ref().map(|e| e.class.to_string())),
            _ => None,
        });
        let mut reason = reason.replacen(
            &format!("new instance {index}"),
            &format!("new instance {id}"),
            1,
        );
        if let Some(how) = how {
            reason = format!("{reason}: {how}");
        }
        let reason = reason.as_str();
        let Some(failed) = svc.d.running().map(|r| r.id.clone()) else {
            return;
        };
        let Service { d, instances, .. } = svc;
        let rollback = d.fail(
            name,
            reason,
            |t| to_replace(instances, (t.revision, t.epoch)),
            SystemTime::now(),
        );
        svc.dirty = true;
        let why = svc
            .d
            .find(&failed)
            .map_or_else(|| reason.to_string(), |r| r.reason.clone());
        tracing::warn!(service = %name, rollout = %failed, instance = %id, reason = %why, "rollout failed");
        self.emit(
            name,
            Some(&id),
            EventKind::RolloutFinished {
                rollout: failed,
                state: "failed".into(),
                reason: why,
                rollback: rollback.as_ref().map(|(id, _)| id.clone()),
            },
        );
        if let Some((_, target)) = rollback {
            // The sockets of the revision it returns to, should any be closed by now.
            match self.sockets_for(&target.spec) {
                Ok(sockets) => {
                    if let Some(svc) = self.services.get_mut(name) {
                        svc.sockets.extend(sockets);
                    }
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "rolling back without its sockets")
                }
            }
            self.announce_rollout(name, None);
        } else {
            tracing::warn!(service = %name, "paused: no more instances are replaced until the next apply, restart or rollback");
        }
    }

    /// Report the rollout that just began (and the one it superseded).
    fn announce_rollout(&mut self, name: &str, superseded: Option<String>) {
        if let Some(old) = superseded {
            let reason = self
                .services
                .get(name)
                .and_then(|s| s.d.find(&old))
                .map(|r| r.reason.clone())
                .unwrap_or_default();
            self.emit(
                name,
                None,
                EventKind::RolloutFinished {
                    rollout: old,
                    state: "superseded".into(),
                    reason,
                    rollback: None,
                },
            );
        }
        let Some(r) = self.services.get(name).and_then(|s| s.d.running()) else {
            return;
        };
        tracing::info!(service = %name, rollout = %r.id, kind = r.kind.as_str(), from = r.from_revision, to = r.to_revision, to_replace = r.to_replace, "rollout started");
        let event = EventKind::RolloutStarted {
            rollout: r.id.clone(),
            kind: r.kind.as_str().to_string(),
            from_revision: r.from_revision,
            to_revision: r.to_revision,
            to_replace: r.to_replace,
            replicas: r.replicas,
            max_surge: r.policy.max_surge,
            max_unavailable: r.policy.max_unavailable,
        };
        self.emit(name, None, event);
    }

    /// After reconciling: persist what changed, and note when time alone moves the plan.
    fn after_pass(&mut self, name: &str) {
        let now = Instant::now();
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let wake = if svc.deleting {
            None
        } else {
            let (policy, slots) = self.planner_view(svc, now);
            rollout::next_change(&policy, &slots, now)
        };
        let dirty = svc.dirty && !svc.deleting;
        if dirty && let Err(e) = self.persist(name, &svc.d) {
            tracing::warn!(service = %name, error = %e, "cannot save the rollout's progress");
        }
        if let Some(svc) = self.services.get_mut(name) {
            svc.wake = wake;
            svc.dirty = false;
        }
    }

    /// After an agent restart: note that the interrupted rollouts go on.
    pub(super) fn resume_rollouts(&mut self) {
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.d.running().is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.rollout_step(
                &name,
                "resumed",
                "",
                "the agent started again; the rollout goes on".into(),
            );
        }
    }

    // ---------------------------------------------------------------------------------
    // Operations.

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

    pub(super) fn apply(
        &mut self,
        spec: ServiceSpec,
        dry_run: bool,
        force: bool,
    ) -> Result<ApplyOutcome, SupervisorError> {
        let name = spec.name.clone();
        let (kind, revision, changes, replaces) = match self.services.get(&name) {
            Some(svc) if svc.deleting => return Err(SupervisorError::Deleting { name }),
            Some(svc) => {
                let changes = spec.changes_from(&svc.d.spec);
                if changes.is_empty() {
                    (ApplyKind::Unchanged, svc.d.revision, changes, false)
                } else if spec.same_except_replicas(&svc.d.spec) {
                    (ApplyKind::Scaled, svc.d.revision, changes, false)
                } else {
                    let replaces = svc.instances.values().any(present);
                    (
                        ApplyKind::Updated,
                        svc.d.last_revision + 1,
                        changes,
                        replaces,
                    )
                }
            }
            None => (ApplyKind::Created, 1, Vec::new(), false),
        };
        let mut outcome = ApplyOutcome {
            name: name.clone(),
            revision,
            kind,
            changes,
            replaces_instances: replaces,
            rollout_id: None,
        };
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
        let spec = Arc::new(spec);
        let mut superseded = None;
        match self.services.get(&name) {
            None => {
                let d = Desired::new(spec);
                self.persist(&name, &d)?;
                let mut svc = Service::new(d);
                svc.sockets.extend(sockets);
                self.services.insert(name.clone(), svc);
            }
            Some(svc) => {
                let mut d = svc.d.clone();
                if kind == ApplyKind::Scaled {
                    if let Some(r) = d.running_mut() {
                        r.replicas = spec.replicas;
                    }
                    d.spec = spec;
                } else {
                    let target = d.new_revision(spec);
                    let n = to_replace(&svc.instances, (target.revision, target.epoch));
                    if n == 0 {
                        // Nothing runs that would be replaced: no rollout.
                        superseded = d.retarget(target, SystemTime::now());
                    } else {
                        let (id, old) = d.begin(&name, Kind::Update, target, n, SystemTime::now());
                        outcome.rollout_id = Some(id);
                        superseded = old;
                    }
                }
                self.persist(&name, &d)?;
                if let Some(svc) = self.services.get_mut(&name) {
                    svc.d = d;
                    svc.sockets.extend(sockets);
                }
            }
        }
        tracing::info!(service = %name, revision, outcome = kind.as_str(), "applied");
        self.emit(
            &name,
            None,
            EventKind::Applied {
                revision,
                outcome: kind.as_str().to_string(),
                changes: outcome.changes.clone(),
            },
        );
        if outcome.rollout_id.is_some() || superseded.is_some() {
            self.announce_rollout(&name, superseded);
        }
        Ok(outcome)
    }

    pub(super) fn restart(&mut self, name: &str, force: bool) -> Result<Outcome, SupervisorError> {
        let svc = self.service_for_rollout(name)?;
        self.check_running(name, force)?;
        let mut d = svc.d.clone();
        let target = Target {
            revision: d.revision,
            epoch: d.new_epoch(),
            spec: d.spec.clone(),
        };
        let n = to_replace(&svc.instances, (target.revision, target.epoch));
        self.start(name, d, Kind::Restart, target, n)
    }

    pub(super) fn rollback(
        &mut self,
        name: &str,
        revision: Option<u64>,
        force: bool,
    ) -> Result<Outcome, SupervisorError> {
        let svc = self.service_for_rollout(name)?;
        self.check_running(name, force)?;
        let d = &svc.d;
        let kept = || {
            d.revisions()
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rev = match revision {
            Some(r) if r == d.revision => {
                return Err(SupervisorError::InvalidArgument {
                    field: "revision".into(),
                    message: format!(
                        "{r} is the current revision (to replace its instances, restart)"
                    ),
                });
            }
            Some(r) => r,
            None => d.previous_revision().ok_or_else(|| {
                SupervisorError::Precondition(format!(
                    "service {name:?} has no kept revision below {} to roll back to (kept: {})",
                    d.revision,
                    kept()
                ))
            })?,
        };
        let spec = d
            .spec_of(rev)
            .ok_or_else(|| SupervisorError::InvalidArgument {
                field: "revision".into(),
                message: format!("{rev} is not kept (kept: {})", kept()),
            })?;
        self.admission(&spec)?;
        let sockets = self.sockets_for(&spec)?;
        let svc = self.service_for_rollout(name)?;
        // Instances that already run that revision are kept: the rollout targets their epoch.
        let mut epochs: BTreeMap<u64, u32> = BTreeMap::new();
        for i in svc
            .instances
            .values()
            .filter(|i| present(i) && i.revision == rev)
        {
            *epochs.entry(i.epoch).or_default() += 1;
        }
        let mut d = svc.d.clone();
        let epoch = match epochs.into_iter().max_by_key(|(e, n)| (*n, *e)) {
            Some((e, _)) => e,
            None => d.new_epoch(),
        };
        let target = Target {
            revision: rev,
            epoch,
            spec,
        };
        let n = to_replace(&svc.instances, (target.revision, target.epoch));
        let out = self.start(name, d, Kind::Rollback, target, n)?;
        if let Some(svc) = self.services.get_mut(name) {
            svc.sockets.extend(sockets);
        }
        Ok(out)
    }

    /// Begin a rollout on a copy of the desired state, save it, then make it current.
    fn start(
        &mut self,
        name: &str,
        mut d: Desired,
        kind: Kind,
        target: Target,
        to_replace: u32,
    ) -> Result<Outcome, SupervisorError> {
        let revision = target.revision;
        let (id, superseded) = d.begin(name, kind, target, to_replace, SystemTime::now());
        self.persist(name, &d)?;
        if let Some(svc) = self.services.get_mut(name) {
            svc.d = d;
        }
        self.announce_rollout(name, superseded);
        Ok(Outcome::RolloutStarted {
            name: name.to_string(),
            revision,
            rollout_id: id,
        })
    }

    pub(super) fn get_rollout(&self, id: &str) -> Result<Outcome, SupervisorError> {
        let not_found = || SupervisorError::RolloutNotFound { id: id.to_string() };
        let (service, _) = id.rsplit_once("-r").ok_or_else(not_found)?;
        let r: &Rollout = self
            .services
            .get(service)
            .and_then(|s| s.d.find(id))
            .ok_or_else(not_found)?;
        Ok(Outcome::Rollout(Box::new(r.clone())))
    }

    pub(super) fn scale(&mut self, name: &str, replicas: u32) -> Result<Outcome, SupervisorError> {
        if replicas > spec::MAX_REPLICAS {
            return Err(SupervisorError::InvalidArgument {
                field: "replicas".into(),
                message: format!("{replicas} is out of range (0 to {})", spec::MAX_REPLICAS),
            });
        }
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
            self.emit(
                name,
                None,
                EventKind::Scaled {
                    from: previous,
                    to: replicas,
                },
            );
            if let Some(svc) = self.services.get_mut(name) {
                svc.d = d;
            }
        }
        Ok(Outcome::Scaled {
            name: name.into(),
            previous,
            replicas,
        })
    }

    pub(super) fn persist(&self, name: &str, d: &Desired) -> Result<(), SupervisorError> {
        let bytes = serde_json::to_vec_pretty(&d.to_record())
            .map_err(|e| SupervisorError::Storage(e.to_string()))?;
        self.deps
            .store
            .put(SERVICES, name, &bytes)
            .map_err(|e| SupervisorError::Storage(e.to_string()))
    }

    // ---------------------------------------------------------------------------------
    // Sockets.

    /// The listening sockets for `spec`, by address: the service's own where it has one on
    /// the address (the very same socket, so no connection is refused across a rollout),
    /// new ones bound for new addresses.
    pub(super) fn sockets_for(&self, spec: &ServiceSpec) -> Result<SocketMap, SupervisorError> {
        let current = self.services.get(&spec.name);
        spec.sockets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = s.listen.to_string();
                if let Some(fd) = current.and_then(|svc| svc.sockets.get(&key)) {
                    return Ok((key, fd.clone()));
                }
                self.deps
                    .sockets
                    .bind_socket(&s.listen)
                    .map(|fd| (key, (s.listen.clone(), Arc::new(fd))))
                    .map_err(|e| {
                        SupervisorError::Unenforceable(format!(
                            "sockets[{i}].listen: cannot listen on {}: {e}",
                            s.listen
                        ))
                    })
            })
            .collect()
    }

    /// Close the sockets neither the target spec nor any instance uses any more.
    fn prune_sockets(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let used: std::collections::BTreeSet<String> = std::iter::once(&svc.d.spec)
            .chain(svc.instances.values().map(|i| &i.spec))
            .flat_map(|s| s.sockets.iter().map(|k| k.listen.to_string()))
            .collect();
        let unused: Vec<String> = svc
            .sockets
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        for key in unused {
            if let Some((listen, _)) = svc.sockets.remove(&key) {
                tracing::info!(service = %name, listen = %listen, "socket no longer used: closed");
                self.deps.sockets.unlink_socket(&listen);
            }
        }
    }
}

/// Listening sockets by address.
pub(super) type SocketMap = BTreeMap<String, (spec::ListenAddr, Arc<std::os::fd::OwnedFd>)>;
