//! The probe schedule of one instance: a [`Prober`] is one tokio task that runs [`check`] on
//! its own timer and sends a [`ProbeReport`] after every run. Instances never wait for each
//! other: each has its own task, and a slow probe delays only its own next run.
//!
//! Schedule:
//! - The first run starts after a random delay in `[0, min(interval / 10, 1s))`
//!   ([`first_delay`]), so instances started together (an agent restart re-adopting them, a
//!   scale-up) do not probe in lockstep, while a new instance is still probed at once.
//! - While the instance starts — until its first passing run, within `start_period` of the
//!   prober's start — runs are due every `min(interval, 100ms)` ([`START_INTERVAL`]): an
//!   instance that serves 0.5 s after its start is seen healthy within 0.1 s of it, not a
//!   whole interval later (a rollout waits for every new instance's first pass). Failures in
//!   the start period do not count, so probing more often there cannot make it unhealthy.
//! - Then runs are due at `first + k × interval`: the interval is measured from the due time of
//!   the previous run, so a run's own duration does not make the schedule drift. A run that
//!   ends after the next one was due (only possible when the host is overloaded, since
//!   `timeout <= interval`) makes that next run start as soon as it ends, and the schedule
//!   continues from there: missed runs are skipped, never caught up in a burst.
//!
//! Dropping the [`ProbeHandle`] aborts the task at its next await point, which drops the run
//! in progress (its sockets, its exec command through the [`ExecRunner`] contract). The task
//! also ends by itself when the report receiver is gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::probe::{ExecRunner, Outcome, check};
use super::target::Target;
use crate::spec::{HealthSpec, InstanceKey};

/// The longest delay before a prober's first run.
const MAX_FIRST_DELAY: Duration = Duration::from_secs(1);

/// The time between runs while an instance starts (see the module's schedule).
pub const START_INTERVAL: Duration = Duration::from_millis(100);

/// The outcome of one run of an instance's probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub instance: InstanceKey,
    /// The instance run the probe belongs to; the driver drops reports of an earlier run.
    pub generation: u64,
    pub outcome: Outcome,
    /// When the run started: the time to give [`Tracker::observe`](super::Tracker::observe).
    pub at: Instant,
    /// When the run was due; `at - scheduled` is how late the scheduler was.
    pub scheduled: Instant,
}

/// Starts the probers of instances.
#[derive(Debug)]
pub struct Prober;

impl Prober {
    /// Starts probing `target` for one run of `instance` on `spec`'s interval and timeout,
    /// sending every outcome to `tx`, until the handle is dropped. Must be called within a
    /// tokio runtime.
    pub fn start(
        instance: InstanceKey,
        generation: u64,
        target: Target,
        spec: &HealthSpec,
        exec: Arc<dyn ExecRunner>,
        tx: mpsc::UnboundedSender<ProbeReport>,
    ) -> ProbeHandle {
        let interval = spec.interval.max(Duration::from_millis(1));
        let timeout = spec.timeout;
        let delay = first_delay(interval, fastrand::f64());
        let start_interval = interval.min(START_INTERVAL);
        let start_period = spec.start_period;
        let task = tokio::spawn(async move {
            let begun = Instant::now();
            let mut due = begun + delay;
            let mut passed = false;
            loop {
                tokio::time::sleep_until(due).await;
                let at = Instant::now();
                let outcome = check(&target, timeout, exec.as_ref()).await;
                passed |= outcome.healthy;
                let report = ProbeReport {
                    instance: instance.clone(),
                    generation,
                    outcome,
                    at,
                    scheduled: due,
                };
                if tx.send(report).is_err() {
                    break;
                }
                let now = Instant::now();
                let starting = !passed && now.saturating_duration_since(begun) < start_period;
                let step = if starting { start_interval } else { interval };
                due = next_due(due, step, now);
            }
        });
        ProbeHandle { task }
    }
}

/// The delay before a prober's first run, for `jitter` in `[0, 1)`:
/// `jitter × min(interval / 10, 1s)`.
pub fn first_delay(interval: Duration, jitter: f64) -> Duration {
    (interval / 10)
        .min(MAX_FIRST_DELAY)
        .mul_f64(jitter.clamp(0.0, 1.0))
}

/// When the run after one that was due at `due` is due, if that run ended at `now`.
fn next_due(due: Instant, interval: Duration, now: Instant) -> Instant {
    (due + interval).max(now)
}

/// Owns a running prober: dropping it stops the probing.
#[derive(Debug)]
pub struct ProbeHandle {
    task: JoinHandle<()>,
}

impl ProbeHandle {
    /// Whether the prober's task has ended (its report receiver is gone).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests;
