//! Reconciling each service through the rollout planner, and the running rollout's record and
//! events: steps (started, ready, stopping, stopped, resumed), completion, failure with or
//! without a rollback.

use std::time::SystemTime;

use tokio::time::Instant;

use super::Driver;
use super::slots::Service;
use crate::events::EventKind;
use crate::rollout::record::{Rollout, State as RolloutState, Step};
use crate::rollout::{self, Plan, Policy, Progress};
use crate::spec::{self, InstanceKey};
use crate::supervisor::instance::{Event, Instance, State, StopReason};
use crate::supervisor::reconcile::{self, Action, Health};

/// Passes of one service's reconciling per wake-up: each settles what it can and a few reach
/// a fixed point; bounded, so a logic error can never spin the task.
const MAX_PASSES: usize = 8;

/// An instance that still counts: not on its way out.
pub(super) fn present(i: &Instance) -> bool {
    !matches!(
        i.state,
        State::Removing
            | State::Gone
            | State::Stopping {
                reason: StopReason::Retire
                    | StopReason::ScaleDown
                    | StopReason::Delete
                    | StopReason::Timeout
                    | StopReason::Cancel,
                ..
            }
    )
}

/// Present instances that do not run `target` (revision, epoch).
pub(super) fn to_replace<'a>(
    instances: impl Iterator<Item = &'a Instance>,
    target: (u64, u64),
) -> u32 {
    instances
        .filter(|i| present(i) && (i.revision, i.epoch) != target)
        .count()
        .try_into()
        .unwrap_or(u32::MAX)
}

impl Driver {
    pub(super) fn reconcile_all(&mut self) {
        for name in self.services.names() {
            self.reconcile_service(&name);
            self.finish_delete(&name);
        }
    }

    /// Move one service toward its desired state: the planner decides what to start and
    /// stop; the instances' timers are served too.
    fn reconcile_service(&mut self, name: &str) {
        // Until the target's package is in the store, nothing is replaced or added: what
        // runs keeps running (and restarting).
        let ready = self.package_ready(name);
        for _ in 0..MAX_PASSES {
            let steps = if ready {
                let Some(steps) = self.planned_steps(name) else {
                    continue;
                };
                steps
            } else {
                Vec::new()
            };
            let Some(svc) = self.services.get(name) else {
                return;
            };
            let actions = reconcile::reconcile(svc.deleting, &steps, &svc.slots, Instant::now());
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Create(index) => self.create_instance(name, index),
                    Action::Event(index, ev) => {
                        let key = InstanceKey::new(name, index);
                        let retire = ev == Event::StopRequested(StopReason::Retire);
                        self.feed(&key, ev);
                        if retire {
                            self.note_retired(&key);
                        }
                    }
                }
            }
        }
        self.after_pass(name);
        self.release_packages(name);
        self.lift_start_caps_after_rollout(name);
    }

    /// Once no rollout runs for the service (it succeeded, failed, was superseded or
    /// cancelled), none of its instances keeps a start cap.
    fn lift_start_caps_after_rollout(&mut self, name: &str) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        if svc.d.running().is_some() {
            return;
        }
        let capped: Vec<u32> = svc
            .slots
            .iter()
            .filter(|(_, s)| s.start_cap.is_some())
            .map(|(i, _)| *i)
            .collect();
        for index in capped {
            self.lift_start_cap(&InstanceKey::new(name, index));
        }
    }

    /// What the planner asks of a service now (nothing while it is deleted); `None` when
    /// the running rollout just failed, so the next pass plans anew.
    fn planned_steps(&mut self, name: &str) -> Option<Vec<rollout::Step>> {
        // A job's instances start and stop with its runs, never by the planner.
        if self
            .services
            .get(name)
            .is_none_or(|s| s.deleting || s.d.spec.job.is_some())
        {
            return Some(Vec::new());
        }
        let now = Instant::now();
        self.announce_ready(name, now);
        let svc = self.services.get(name)?;
        let (policy, slots) = self.planner_view(svc, now);
        match rollout::plan(&policy, &slots, now) {
            Plan::Complete => {
                self.complete_rollout(name);
                Some(Vec::new())
            }
            Plan::Failed { index, reason } => {
                self.fail_rollout(name, index, &reason);
                None
            }
            Plan::Steps(steps) => Some(steps),
        }
    }

    /// The planner's policy and view of a service's instances.
    fn planner_view(&self, svc: &Service, now: Instant) -> (Policy, Vec<rollout::Slot>) {
        let d = &svc.d;
        let running = d.running();
        let policy = Policy::new(d.spec.replicas, &d.spec.rollout, running.is_some());
        let target = (d.revision, d.epoch);
        let slots = svc
            .slots
            .values()
            .map(|slot| {
                let i = &slot.instance;
                let health = match (i.spec.health.is_none(), slot.tracker()) {
                    (true, _) => Health::Unchecked,
                    (false, Some(t)) => Health::Tracked {
                        state: t.state(),
                        since: t.since(),
                        started: t.started(),
                    },
                    (false, None) => Health::Unknown,
                };
                let mut s = reconcile::slot(i, health, target, now);
                s.started_here = running.is_some_and(|r| r.started_ids.contains(&i.id));
                // Paused after a failure: what runs stays; only missing instances are added.
                s.new |= d.paused;
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
        let key = InstanceKey::new(name, index);
        let id = key.to_string();
        let d = &svc.d;
        let start_cpu = d.spec.rollout.start_cpu;
        let instance =
            Instance::new(index, id.clone(), d.spec.clone(), d.revision).with_epoch(d.epoch);
        let mut slot = super::slots::Slot::new(instance);
        let in_rollout = svc
            .d
            .running_mut()
            .map(|r| r.started_ids.insert(id.clone()))
            .is_some();
        if in_rollout {
            slot.start_cap = start_cpu;
        }
        svc.slots.insert(index, slot);
        let ev = self.spawn(&key);
        self.feed(&key, ev);
        if in_rollout {
            let rev = self.services.get(name).map_or(0, |s| s.d.revision);
            let message = format!("new instance {id} (revision {rev})");
            self.rollout_step(name, Step::Started, &id, message);
        }
    }

    /// An old instance was asked to stop for the running rollout.
    fn note_retired(&mut self, key: &InstanceKey) {
        let id = key.to_string();
        let Some(r) = self
            .services
            .get_mut(&key.service)
            .and_then(|s| s.d.running_mut())
        else {
            return;
        };
        if r.stopping_ids.insert(id.clone()) {
            r.replaced += 1;
            self.rollout_step(
                &key.service,
                Step::Stopping,
                &id,
                format!("old instance {id}"),
            );
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
            self.rollout_step(
                name,
                Step::Stopped,
                id,
                format!("old instance {id} is gone"),
            );
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
        let ready = rollout::ready_indexes(&policy, &slots, now);
        let fresh: Vec<String> = ready
            .iter()
            .filter_map(|idx| svc.slots.get(idx).map(|s| s.instance.id.clone()))
            .filter(|id| !r.ready_ids.contains(id))
            .collect();
        let min_healthy = spec::format_duration(policy.min_healthy);
        // Ready without a probe or READY=1 (a service without either): its cap ends here.
        for index in ready {
            self.lift_start_cap(&InstanceKey::new(name, index));
        }
        for id in fresh {
            if let Some(r) = self.services.get_mut(name).and_then(|s| s.d.running_mut()) {
                r.ready_ids.insert(id.clone());
            }
            let message = format!("new instance {id} healthy for {min_healthy}");
            self.rollout_step(name, Step::Ready, &id, message);
        }
    }

    /// The running rollout of a service, its counts brought up to date and the service
    /// marked to be saved.
    fn update_running(&mut self, name: &str) -> Option<(Progress, &mut Rollout)> {
        let progress = self.progress(name);
        let svc = self.services.get_mut(name)?;
        let r = svc.d.running_mut()?;
        r.progress = progress.into();
        svc.dirty = true;
        Some((progress, r))
    }

    /// Record a step of the running rollout, with the counts right after it, and report it.
    fn rollout_step(&mut self, name: &str, step: Step, instance: &str, message: String) {
        let Some((progress, r)) = self.update_running(name) else {
            return;
        };
        r.step(SystemTime::now(), step, instance, message.clone());
        let event = EventKind::RolloutStep {
            rollout: r.id.clone(),
            step,
            message,
            replaced: r.replaced,
            to_replace: r.to_replace,
            new: progress.new,
            ready: progress.new_ready,
            old: progress.old,
            available: progress.available,
        };
        tracing::info!(service = %name, rollout = %r.id, step = step.as_str(), instance, progress = %r.progress_line(), "rollout step");
        let inst = (!instance.is_empty()).then_some(instance);
        self.emit(name, inst, event);
    }

    /// The running rollout reached its end state.
    fn complete_rollout(&mut self, name: &str) {
        let Some((_, r)) = self.update_running(name) else {
            return;
        };
        let now = SystemTime::now();
        let elapsed = now.duration_since(r.started_at).unwrap_or_default();
        r.finish(RolloutState::Succeeded, "", now);
        let id = r.id.clone();
        tracing::info!(service = %name, rollout = %id, elapsed_ms = crate::num::millis(elapsed), "rollout succeeded");
        let event = EventKind::RolloutFinished {
            rollout: id,
            state: RolloutState::Succeeded,
            reason: String::new(),
            rollback: None,
        };
        self.emit(name, None, event);
        self.prune_sockets(name);
    }

    /// A new instance failed the running rollout: it stops there, and rolls back when the
    /// policy says so.
    fn fail_rollout(&mut self, name: &str, index: u32, reason: &str) {
        let id = InstanceKey::new(name, index).to_string();
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let reason = failure_reason(svc, index, &id, reason);
        self.fail_running(name, Some(&id), reason);
    }

    /// Fails the running rollout of `name` for `reason` (naming the instance, when one
    /// decided it), rolling back when its policy says so.
    pub(super) fn fail_running(&mut self, name: &str, id: Option<&str>, reason: String) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(failed) = svc.d.running().map(|r| r.id.clone()) else {
            return;
        };
        let Service { d, slots, .. } = svc;
        let instances = || slots.values().map(|s| &s.instance);
        let rollback = d.fail(
            name,
            &reason,
            |t| to_replace(instances(), (t.revision, t.epoch)),
            SystemTime::now(),
        );
        svc.dirty = true;
        let why = svc.d.find(&failed).map_or(reason, |r| r.reason.clone());
        tracing::warn!(service = %name, rollout = %failed, instance = id.unwrap_or(""), reason = %why, "rollout failed");
        let event = EventKind::RolloutFinished {
            rollout: failed,
            state: RolloutState::Failed,
            reason: why,
            rollback: rollback.as_ref().map(|(id, _)| id.clone()),
        };
        self.emit(name, id, event);
        let Some((_, target)) = rollback else {
            tracing::warn!(service = %name, "paused: no more instances are replaced until the next apply, restart or rollback");
            return;
        };
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
    }

    /// Report the rollout that just began (and the one it superseded).
    pub(super) fn announce_rollout(&mut self, name: &str, superseded: Option<String>) {
        if let Some(old) = superseded {
            let reason = self
                .services
                .get(name)
                .and_then(|s| s.d.find(&old))
                .map(|r| r.reason.clone())
                .unwrap_or_default();
            let event = EventKind::RolloutFinished {
                rollout: old,
                state: RolloutState::Superseded,
                reason,
                rollback: None,
            };
            self.emit(name, None, event);
        }
        let Some(r) = self.services.get(name).and_then(|s| s.d.running()) else {
            return;
        };
        tracing::info!(service = %name, rollout = %r.id, kind = r.kind.as_str(), from = r.from_revision, to = r.to_revision, to_replace = r.to_replace, "rollout started");
        let event = EventKind::RolloutStarted {
            rollout: r.id.clone(),
            kind: r.kind,
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
            let retry = svc.packages.next_retry();
            [rollout::next_change(&policy, &slots, now), retry]
                .into_iter()
                .flatten()
                .min()
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
            let message = "the agent started again; the rollout goes on".to_string();
            self.rollout_step(&name, Step::Resumed, "", message);
        }
    }
}

/// Why a rollout failed, naming the instance (`index` is `id`), and saying how it ended
/// when it did.
fn failure_reason(svc: &Service, index: u32, id: &str, reason: &str) -> String {
    let how = svc.slots.get(&index).and_then(|s| {
        let i = &s.instance;
        match i.state {
            State::Stopping {
                reason: StopReason::Unhealthy,
                ..
            } => Some("restarted for failing its health check".to_string()),
            State::Backoff { .. } | State::Exited => i
                .history
                .last_error
                .clone()
                .or_else(|| i.history.last_exit.as_ref().map(|e| e.class.to_string())),
            _ => None,
        }
    });
    let reason = reason.replacen(
        &format!("new instance {index}"),
        &format!("new instance {id}"),
        1,
    );
    match how {
        Some(how) => format!("{reason}: {how}"),
        None => reason,
    }
}
