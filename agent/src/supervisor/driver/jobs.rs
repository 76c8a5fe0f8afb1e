//! Jobs (`kind = "job"`): their runs and their schedules, driven on the driver's task.
//!
//! A job is a service with `replicas = 0`: the rollout planner never starts or stops its
//! instances. A run puts `job.parallelism` slots in the job's slot map (at the indexes of
//! [`run::slot_of`]) and starts them through the same spawn path as a service's instances —
//! cgroup, limits, namespaces, user, env (plus `CORRAL_JOB_INDEX` and `CORRAL_RUN`), logs —
//! so each is saved, adopted after an agent restart and cleaned up like any instance. After
//! every transition of a job's slot, [`Driver::job_transition`] updates its run: an attempt
//! started, a failed attempt retried (the instance's own on-failure backoff) or not (out of
//! `job.retries`, or the run is being stopped), an instance done. A run whose instances have
//! all ended gets its outcome, is saved, and older runs beyond `job.history` are pruned with
//! their logs.
//!
//! Runs are saved under the store kind [`RUNS`] (write, fsync, rename), and each scheduled
//! job's last handled due time under [`SCHEDULES`] (or, when the schedule started a run,
//! in that run's `due` alone: one write per scheduled run), so that a run missed while the
//! agent was down is caught up once (within `catch_up`) and no run is started twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Driver;
use super::slots::Slot;
use crate::events::EventKind;
use crate::schedule::{self, Decision, Missed};
use crate::spec::job::JobSpec;
use crate::spec::job::overrides::RawOverrides;
#[cfg(test)]
use crate::spec::job::overrides::RunOverrides;
use crate::spec::{FieldError, InstanceKey, ServiceSpec, SpecError};
use crate::supervisor::SupervisorError;
use crate::supervisor::instance::{Event, Instance, State, StopReason};
use crate::supervisor::run::{self, Outcome, Run, Trigger};

/// Store kind of the runs, by run id.
pub(super) const RUNS: &str = "runs";
/// Store kind of each scheduled job's last handled due time, by job name.
pub(super) const SCHEDULES: &str = "schedules";

/// What the driver keeps per job.
#[derive(Debug, Default)]
pub(super) struct JobState {
    /// Its kept runs, by number.
    pub runs: BTreeMap<u64, Run>,
    /// The last due time its schedule handled (a run started or skipped), or when the
    /// schedule began; saved.
    pub since: Option<SystemTime>,
    /// The next scheduled run: when it is due, when it starts (due + jitter), and the
    /// revision whose schedule it was worked out from.
    pub next: Option<NextRun>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct NextRun {
    pub due: SystemTime,
    pub start: SystemTime,
    pub revision: u64,
}

/// Every job's state, by name.
#[derive(Debug, Default)]
pub(super) struct Jobs {
    pub by_name: BTreeMap<String, JobState>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ScheduleRecord {
    since: SystemTime,
}

/// A point on the wall clock as a tokio instant (now when past).
fn instant_of(at: SystemTime) -> Instant {
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

fn rfc3339(at: SystemTime) -> String {
    jiff::Timestamp::try_from(at).map_or_else(|_| format!("{at:?}"), |t| t.to_string())
}

/// The spec one instance of a run starts with: the job's, plus its index and run id.
fn instance_spec(spec: &ServiceSpec, run_id: &str, index: u32) -> Arc<ServiceSpec> {
    let mut spec = spec.clone();
    spec.env
        .insert("CORRAL_JOB_INDEX".to_owned(), index.to_string());
    spec.env.insert("CORRAL_RUN".to_owned(), run_id.to_owned());
    Arc::new(spec)
}

impl Driver {
    fn job_spec(&self, name: &str) -> Result<(Arc<ServiceSpec>, JobSpec), SupervisorError> {
        let svc = self
            .services
            .get(name)
            .ok_or_else(|| SupervisorError::NotFound { name: name.into() })?;
        let job = svc
            .d
            .spec
            .job
            .clone()
            .ok_or_else(|| SupervisorError::NotAJob { name: name.into() })?;
        if svc.deleting {
            return Err(SupervisorError::Deleting { name: name.into() });
        }
        Ok((svc.d.spec.clone(), job))
    }

    /// Start a run of job `name` now.
    pub(super) fn run_job(
        &mut self,
        name: &str,
        trigger: Trigger,
        due: Option<SystemTime>,
        overrides: &RawOverrides,
    ) -> Result<Run, SupervisorError> {
        let (spec, _) = self.job_spec(name)?;
        let overrides = overrides.check(&spec)?;
        let spec = overrides.apply(&spec);
        let Some(job) = spec.job.clone() else {
            return Err(SupervisorError::NotAJob { name: name.into() });
        };
        let (revision, epoch) = self
            .services
            .get(name)
            .map_or((0, 0), |s| (s.d.revision, s.d.epoch));
        let state = self.jobs.by_name.entry(name.to_owned()).or_default();
        let number = state.runs.keys().next_back().map_or(1, |n| n + 1);
        let run = Run::new(
            name,
            number,
            trigger,
            revision,
            job.parallelism,
            due,
            SystemTime::now(),
        );
        let run = Run { overrides, ..run };
        let id = run.id();
        state.runs.insert(number, run.clone());
        self.save_run(&run);
        tracing::info!(run = %id, trigger = trigger.as_str(), "run started");
        self.emit(
            name,
            None,
            EventKind::RunStarted {
                run: id.clone(),
                trigger,
                due: due.map(rfc3339),
            },
        );
        for (key, index) in run.keys().into_iter().zip(0u32..) {
            let instance = Instance::new(
                key.index,
                key.to_string(),
                instance_spec(&spec, &id, index),
                revision,
            )
            .with_epoch(epoch);
            if let Some(svc) = self.services.get_mut(name) {
                svc.slots.insert(key.index, Slot::new(instance));
            }
            let ev = self.spawn(&key);
            self.feed(&key, ev);
        }
        self.prune_runs(name);
        Ok(self.find_run(name, number).cloned().unwrap_or(run))
    }

    fn find_run(&self, name: &str, number: u64) -> Option<&Run> {
        self.jobs.by_name.get(name)?.runs.get(&number)
    }

    /// The run `id` (`NAME-rN`).
    pub(super) fn get_run(&self, id: &str) -> Result<Run, SupervisorError> {
        run::parse_run_id(id)
            .and_then(|(name, number)| self.find_run(name, number))
            .cloned()
            .ok_or_else(|| SupervisorError::RunNotFound { id: id.into() })
    }

    /// The kept runs of job `name`, oldest first.
    pub(super) fn list_runs(&self, name: &str) -> Result<Vec<Run>, SupervisorError> {
        match self.job_spec(name) {
            Ok(_) | Err(SupervisorError::Deleting { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(self
            .jobs
            .by_name
            .get(name)
            .map(|s| s.runs.values().cloned().collect())
            .unwrap_or_default())
    }

    /// Stop run `id` (stop signal, grace, SIGKILL); it ends `cancelled`. A run that has
    /// ended is returned as it is.
    pub(super) fn cancel_run(&mut self, id: &str) -> Result<Run, SupervisorError> {
        let run = self.get_run(id)?;
        if !run.ended() {
            self.stop_run(&run.job, run.number, Outcome::Cancelled);
        }
        self.get_run(id)
    }

    /// Stop every instance of a run, which then ends as `why`.
    fn stop_run(&mut self, name: &str, number: u64, why: Outcome) {
        let Some(run) = self
            .jobs
            .by_name
            .get_mut(name)
            .and_then(|s| s.runs.get_mut(&number))
        else {
            return;
        };
        if run.stopping.is_some() || run.ended() {
            return;
        }
        run.stopping = Some(why);
        let keys = run.keys();
        tracing::info!(run = %run.id(), why = %why, "stopping run");
        let reason = match why {
            Outcome::TimedOut => StopReason::Timeout,
            _ => StopReason::Cancel,
        };
        for key in keys {
            self.feed(&key, Event::StopRequested(reason));
        }
    }

    /// After a transition of a job's slot: its run's bookkeeping.
    pub(super) fn job_transition(
        &mut self,
        key: &InstanceKey,
        before: State,
        after: State,
        event: &Event,
    ) {
        if !self.jobs.by_name.contains_key(&key.service) {
            return;
        }
        let retries = self
            .services
            .get(&key.service)
            .and_then(|s| s.d.spec.job.as_ref())
            .map_or(0, |j| j.retries);
        let slot_state = self
            .services
            .slot(key)
            .map(|s| (s.instance.history.last_exit.clone(), s.instance.state));
        let Some(state) = self.jobs.by_name.get_mut(&key.service) else {
            return;
        };
        let Some((number, i)) = state
            .runs
            .iter()
            .find_map(|(n, r)| Some(*n).zip(r.instance_at(key.index)))
        else {
            // A slot no kept run knows (pruned, or its record was lost): remove it.
            if matches!(after, State::Backoff { .. } | State::Exited) {
                self.feed(key, Event::StopRequested(StopReason::Delete));
            }
            return;
        };
        let Some(run) = state.runs.get_mut(&number) else {
            return;
        };
        if run.instances[i].end.is_some() {
            if matches!(after, State::Backoff { .. } | State::Exited) {
                self.feed(key, Event::StopRequested(StopReason::Delete));
            }
            return;
        }
        let changed = before.phase() != after.phase();
        let last_end = slot_state
            .as_ref()
            .and_then(|(exit, _)| exit.as_ref())
            .map_or(
                Outcome::Failed(crate::supervisor::ExitClass::Lost),
                Outcome::of_exit,
            );
        let mut remove = false;
        let ri = &mut run.instances[i];
        match (after, event) {
            (State::Running { .. }, _) if changed => {
                ri.attempts += 1;
                ri.attempt_started = Some(SystemTime::now());
            }
            (State::Backoff { .. }, Event::StartFailed { .. }) if changed => {
                ri.attempts += 1;
                if ri.attempts > retries || run.stopping.is_some() {
                    ri.end = Some(
                        run.stopping
                            .unwrap_or(Outcome::Failed(crate::supervisor::ExitClass::Lost)),
                    );
                    remove = true;
                }
            }
            (State::Backoff { .. }, _) if changed => {
                if ri.attempts > retries || run.stopping.is_some() {
                    ri.end = Some(run.stopping.unwrap_or(last_end));
                    remove = true;
                }
            }
            (State::Exited, _) if changed => {
                ri.end = Some(run.stopping.unwrap_or(last_end));
                remove = true;
            }
            (State::Removing | State::Gone, _) => {
                ri.end = Some(run.stopping.unwrap_or(last_end));
            }
            _ => return,
        }
        let settled = run.settle();
        if let Some(outcome) = settled {
            run.outcome = Some(outcome);
            run.ended_at = Some(SystemTime::now());
        }
        let run = run.clone();
        self.save_run(&run);
        if remove {
            self.feed(key, Event::StopRequested(StopReason::Delete));
        }
        if let Some(outcome) = settled {
            tracing::info!(run = %run.id(), %outcome, attempts = run.attempts(), "run ended");
            self.emit(
                &key.service,
                None,
                EventKind::RunFinished {
                    run: run.id(),
                    outcome,
                    attempts: run.attempts(),
                },
            );
        }
        if matches!(after, State::Gone) || settled.is_some() {
            self.prune_runs(&key.service);
        }
    }

    /// Drop the oldest ended runs beyond `job.history`, with their logs, once none of
    /// their instances is left.
    fn prune_runs(&mut self, name: &str) {
        let history = self
            .services
            .get(name)
            .and_then(|s| s.d.spec.job.as_ref())
            .map_or(0, |j| j.history) as usize;
        let Some(state) = self.jobs.by_name.get(name) else {
            return;
        };
        let excess = state.runs.len().saturating_sub(history);
        let svc = self.services.get(name);
        let prune: Vec<Run> = state
            .runs
            .values()
            .filter(|r| r.ended())
            .filter(|r| {
                r.keys()
                    .iter()
                    .all(|k| svc.is_none_or(|s| !s.slots.contains_key(&k.index)))
            })
            .take(excess)
            .cloned()
            .collect();
        for r in prune {
            if let Some(state) = self.jobs.by_name.get_mut(name) {
                state.runs.remove(&r.number);
            }
            self.forget_run(&r);
        }
    }

    /// A run's record and its instances' logs, gone.
    fn forget_run(&self, r: &Run) {
        for key in r.keys() {
            self.deps.files.remove_instance_files(&key.to_string());
        }
        if let Err(e) = self.deps.store.delete(RUNS, &r.id()) {
            tracing::warn!(run = %r.id(), error = %e, "cannot remove the run record");
        }
    }

    /// A deleted job: its runs and their logs, and its schedule's record.
    pub(super) fn forget_job(&mut self, name: &str) {
        let Some(state) = self.jobs.by_name.remove(name) else {
            return;
        };
        for r in state.runs.values() {
            self.forget_run(r);
        }
        let _ = self.deps.store.delete(SCHEDULES, name);
    }

    fn save_run(&self, r: &Run) {
        let result = serde_json::to_vec(r)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.deps
                    .store
                    .put_atomic(RUNS, &r.id(), &b)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::error!(run = %r.id(), error = %e, "cannot save the run");
        }
    }

    fn save_since(&self, name: &str, since: SystemTime) {
        let result = serde_json::to_vec(&ScheduleRecord { since })
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.deps
                    .store
                    .put_atomic(SCHEDULES, name, &b)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::error!(job = %name, error = %e, "cannot save the schedule state");
        }
    }

    /// A job that was just applied (created or updated) is known here; a new schedule
    /// begins now.
    pub(super) fn note_job(&mut self, name: &str) {
        let is_job = self
            .services
            .get(name)
            .is_some_and(|s| s.d.spec.job.is_some());
        if !is_job {
            return;
        }
        let state = self.jobs.by_name.entry(name.to_owned()).or_default();
        if state.since.is_none() {
            let now = SystemTime::now();
            state.since = Some(now);
            self.save_since(name, now);
        }
    }

    /// Before instances are adopted: the saved runs and schedule states.
    pub(super) fn load_runs(&mut self) {
        match self.deps.store.list(RUNS) {
            Ok(records) => {
                for (id, bytes) in records {
                    match serde_json::from_slice::<Run>(&bytes) {
                        Ok(r) if r.id() == id && self.services.contains(&r.job) => {
                            let state = self.jobs.by_name.entry(r.job.clone()).or_default();
                            state.runs.insert(r.number, r);
                        }
                        Ok(r) => self.forget_run(&r),
                        Err(e) => {
                            tracing::error!(run = %id, error = %e, "run record unreadable; ignored")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the run records"),
        }
        let saved: BTreeMap<String, SystemTime> = match self.deps.store.list(SCHEDULES) {
            Ok(records) => records
                .into_iter()
                .filter_map(|(name, bytes)| {
                    let r = serde_json::from_slice::<ScheduleRecord>(&bytes).ok()?;
                    Some((name, r.since))
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the schedule records");
                BTreeMap::new()
            }
        };
        let jobs: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.d.spec.job.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in jobs {
            let state = self.jobs.by_name.entry(name.clone()).or_default();
            // A scheduled run keeps its due time in its own record alone.
            let last_run = state.runs.values().filter_map(|r| r.due).max();
            state.since = saved.get(&name).copied().max(last_run);
        }
    }

    /// After instances are adopted: each job slot gets its run's environment back, runs
    /// whose instances vanished end, finished slots are removed, and missed scheduled runs
    /// are caught up (once, within `catch_up`) or skipped.
    pub(super) fn resume_jobs(&mut self) {
        let names: Vec<String> = self.jobs.by_name.keys().cloned().collect();
        for name in names {
            let Some(spec) = self.services.get(&name).map(|s| s.d.spec.clone()) else {
                continue;
            };
            let runs: Vec<Run> = self.jobs.by_name[&name].runs.values().cloned().collect();
            for r in runs {
                for (key, ri) in r.keys().into_iter().zip(r.instances.iter()) {
                    let present = match self.services.slot_mut(&key) {
                        Some(slot) => {
                            let s = r.overrides.apply(&slot.instance.spec);
                            slot.instance.spec = instance_spec(&s, &r.id(), ri.index);
                            Some(slot.instance.state)
                        }
                        None => None,
                    };
                    match present {
                        Some(state) if ri.end.is_some() || r.ended() => {
                            if matches!(state, State::Backoff { .. } | State::Exited) {
                                self.feed(&key, Event::StopRequested(StopReason::Delete));
                            }
                        }
                        Some(State::Exited) => self.job_transition(
                            &key,
                            State::Pending,
                            State::Exited,
                            &Event::CleanupDone,
                        ),
                        Some(_) => {}
                        None if ri.end.is_none() => {
                            // Its instance left no record to adopt: its end is unknown.
                            self.job_transition(
                                &key,
                                State::Pending,
                                State::Gone,
                                &Event::CleanupDone,
                            )
                        }
                        None => {}
                    }
                }
            }
            self.catch_up(&name, &spec);
        }
    }

    /// What to do about scheduled runs missed while the agent was down.
    fn catch_up(&mut self, name: &str, spec: &ServiceSpec) {
        let Some(schedule) = spec.job.as_ref().and_then(|j| j.schedule.as_ref()) else {
            return;
        };
        let now = SystemTime::now();
        let Some(since) = self.jobs.by_name.get(name).and_then(|s| s.since) else {
            self.note_job(name);
            return;
        };
        match schedule::missed(schedule, since, now) {
            Missed::Nothing => {}
            Missed::RunNow { due } => {
                tracing::info!(job = %name, due = %rfc3339(due), "catching up a run missed while the agent was down");
                self.note_since(name, due);
                self.due_run(name, due, Trigger::CatchUp);
            }
            Missed::TooLate { due } => {
                self.set_since(name, due);
                self.emit(
                    name,
                    None,
                    EventKind::RunSkipped {
                        due: rfc3339(due),
                        running: Vec::new(),
                        reason:
                            "missed while the agent was down, longer ago than schedule.catch_up"
                                .into(),
                    },
                );
            }
        }
    }

    fn set_since(&mut self, name: &str, due: SystemTime) {
        self.note_since(name, due);
        self.save_since(name, due);
    }

    /// The schedule handled the run due at `due`, not saved: [`Driver::due_run`] saves it
    /// in the run it starts (the run's `due`, which [`Driver::load_runs`] reads back), or
    /// in the schedule's record when it starts none.
    fn note_since(&mut self, name: &str, due: SystemTime) {
        if let Some(state) = self.jobs.by_name.get_mut(name) {
            state.since = Some(due);
        }
    }

    /// A scheduled run is due: start it, skip it or replace the running ones, as
    /// `concurrency` says.
    fn due_run(&mut self, name: &str, due: SystemTime, trigger: Trigger) {
        let Some(concurrency) = self
            .services
            .get(name)
            .and_then(|s| s.d.spec.job.as_ref())
            .and_then(|j| j.schedule.as_ref())
            .map(|s| s.concurrency)
        else {
            return;
        };
        let running: Vec<u64> = self
            .jobs
            .by_name
            .get(name)
            .map(|s| {
                s.runs
                    .values()
                    .filter(|r| !r.ended())
                    .map(|r| r.number)
                    .collect()
            })
            .unwrap_or_default();
        match schedule::on_due(concurrency, &running) {
            Decision::Start => {}
            Decision::Skip { running } => {
                let running: Vec<String> = running.iter().map(|n| run::run_id(name, *n)).collect();
                tracing::info!(job = %name, due = %rfc3339(due), ?running, "scheduled run skipped (concurrency forbid)");
                self.emit(
                    name,
                    None,
                    EventKind::RunSkipped {
                        due: rfc3339(due),
                        running,
                        reason: "concurrency = \"forbid\" and earlier runs still run".into(),
                    },
                );
                self.save_since(name, due);
                return;
            }
            Decision::Replace { cancel } => {
                for n in cancel {
                    self.stop_run(name, n, Outcome::Cancelled);
                }
            }
        }
        if let Err(e) = self.run_job(name, trigger, Some(due), &RawOverrides::default()) {
            tracing::warn!(job = %name, error = %e, "scheduled run not started");
            self.save_since(name, due);
        }
    }

    /// Timers: attempts past `job.timeout` are stopped (`timed_out`), due scheduled runs
    /// start. Returns when to look again.
    pub(super) fn tick_jobs(&mut self) -> Option<Instant> {
        let now = SystemTime::now();
        let mut wake: Option<SystemTime> = None;
        let mut soonest = |t: SystemTime| {
            wake = Some(wake.map_or(t, |w: SystemTime| w.min(t)));
        };
        let names: Vec<String> = self.jobs.by_name.keys().cloned().collect();
        for name in names {
            let Some((revision, job)) = self
                .services
                .get(&name)
                .filter(|s| !s.deleting)
                .and_then(|s| Some(s.d.revision).zip(s.d.spec.job.clone()))
            else {
                continue;
            };
            // Timeouts: each run's own (RunJob may override the job's).
            let mut late = Vec::new();
            for r in self.jobs.by_name[&name].runs.values() {
                let Some(timeout) = r.overrides.timeout.or(job.timeout) else {
                    continue;
                };
                if r.ended() || r.stopping.is_some() {
                    continue;
                }
                for (key, ri) in r.keys().iter().zip(&r.instances) {
                    let running = self
                        .services
                        .slot(key)
                        .is_some_and(|s| matches!(s.instance.state, State::Running { .. }));
                    if let (Some(start), None, true) = (ri.attempt_started, ri.end, running) {
                        let deadline = start + timeout;
                        if deadline <= now {
                            late.push(r.number);
                        } else {
                            soonest(deadline);
                        }
                    }
                }
            }
            for n in late {
                self.stop_run(&name, n, Outcome::TimedOut);
            }
            // The schedule.
            let Some(schedule) = job.schedule.as_ref() else {
                continue;
            };
            let state = self.jobs.by_name.entry(name.clone()).or_default();
            let next = match state.next {
                Some(next) if next.revision == revision => Some(next),
                _ => {
                    // From the last due handled, but never before now: runs missed while
                    // the agent was down are for `catch_up` alone.
                    let after = state
                        .since
                        .map_or(now, |s| s.max(now - Duration::from_secs(1)));
                    schedule::next_run(schedule, after).map(|due| NextRun {
                        due,
                        start: due + schedule::jitter_delay(schedule.jitter, fastrand::f64()),
                        revision,
                    })
                }
            };
            state.next = next;
            let Some(next) = next else {
                continue;
            };
            if next.start <= now {
                state.next = None;
                self.note_since(&name, next.due);
                self.due_run(&name, next.due, Trigger::Schedule);
                // Work out the one after on the next pass.
                soonest(now);
            } else {
                soonest(next.start);
            }
        }
        wake.map(instant_of)
    }

    /// When job `name`'s next scheduled run is due, if it has a schedule.
    pub(super) fn next_run_of(&self, name: &str) -> Option<SystemTime> {
        self.jobs.by_name.get(name)?.next.map(|n| n.due)
    }

    /// A job cannot become a service nor a service a job: refused naming `kind`.
    pub(super) fn check_kind(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let Some(svc) = self.services.get(&spec.name) else {
            return Ok(());
        };
        let (was, is) = (svc.d.spec.job.is_some(), spec.job.is_some());
        if was == is {
            return Ok(());
        }
        let kind = |job: bool| if job { "job" } else { "service" };
        Err(SupervisorError::InvalidSpec(SpecError {
            errors: vec![FieldError::new(
                "kind",
                format!(
                    "{:?} is a {}; it cannot become a {} (delete it first, or use another name)",
                    spec.name,
                    kind(was),
                    kind(is)
                ),
            )],
        }))
    }
}

#[cfg(test)]
mod tests;
