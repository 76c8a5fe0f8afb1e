//! Instruments the supervisor updates where things happen and the collector encodes at
//! scrape time: an instance slot's probe durations and failures, a service's rollouts. Each
//! lives in the slot or service it measures, so its series end when that is removed.
//!
//! Imports from the crate: `rollout::record` (its kind and state enums) only.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::rollout::record::{Kind, State};

/// Probe run times, in seconds: probes time out at their `timeout` (1 s by default). Few
/// buckets: every instance has its own histogram.
pub const PROBE_BUCKETS: [f64; 7] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// Rollout durations, in seconds: from one health-gated step to hours for large services.
pub const ROLLOUT_BUCKETS: [f64; 10] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// One instance slot's probe runs.
#[derive(Debug, Clone)]
pub struct ProbeMetrics {
    pub duration: Histogram,
    pub failures: Counter,
}

impl Default for ProbeMetrics {
    fn default() -> Self {
        ProbeMetrics {
            duration: Histogram::new(PROBE_BUCKETS),
            failures: Counter::default(),
        }
    }
}

impl ProbeMetrics {
    /// A probe run that took `elapsed` and passed or not.
    pub fn observe(&self, elapsed: Duration, passed: bool) {
        self.duration.observe(elapsed.as_secs_f64());
        if !passed {
            self.failures.inc();
        }
    }
}

/// Every rollout kind, in the order [`RolloutMetrics::started`] keeps them.
pub const KINDS: [Kind; 4] = [
    Kind::Update,
    Kind::Restart,
    Kind::Rollback,
    Kind::AutoRollback,
];

/// Every state a rollout ends in, in the order [`RolloutMetrics::finished`] keeps them.
pub const ENDS: [State; 4] = [
    State::Succeeded,
    State::Failed,
    State::Superseded,
    State::Cancelled,
];

/// The end states whose rollouts' durations are kept, in the order of
/// [`RolloutMetrics::duration`]: a superseded or cancelled rollout's duration says little.
pub const TIMED_ENDS: [State; 2] = [State::Succeeded, State::Failed];

/// One service's rollouts since the agent started. Every series exists from the start at 0,
/// so that `increase()` sees the first failure.
#[derive(Debug, Clone)]
pub struct RolloutMetrics {
    /// Started, by kind (as [`KINDS`]).
    pub started: [Counter; 4],
    /// Ended, by state (as [`ENDS`]).
    pub finished: [Counter; 4],
    /// Failed rollouts that started an automatic rollback.
    pub rolled_back: Counter,
    /// How long rollouts took from start to end, by state (as [`TIMED_ENDS`]).
    pub duration: [Histogram; 2],
}

impl Default for RolloutMetrics {
    fn default() -> Self {
        RolloutMetrics {
            started: Default::default(),
            finished: Default::default(),
            rolled_back: Counter::default(),
            duration: std::array::from_fn(|_| Histogram::new(ROLLOUT_BUCKETS)),
        }
    }
}

impl RolloutMetrics {
    pub fn started(&self, kind: Kind) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.started[i].inc();
        }
    }

    /// A rollout ended in `state` after `took` (unknown when its record is gone), starting
    /// an automatic rollback or not.
    pub fn finished(&self, state: State, took: Option<Duration>, rolled_back: bool) {
        let Some(i) = ENDS.iter().position(|s| *s == state) else {
            return;
        };
        self.finished[i].inc();
        if let (Some(took), Some(t)) = (took, TIMED_ENDS.iter().position(|s| *s == state)) {
            self.duration[t].observe(took.as_secs_f64());
        }
        if rolled_back {
            self.rolled_back.inc();
        }
    }
}
