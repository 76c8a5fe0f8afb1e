//! An instance's health from its probe outcomes and `READY=1`: consecutive counts against the
//! thresholds, the start period, and the notify gate. Pure: time comes in as arguments, and a
//! state change comes out as a [`Change`] for the driver to publish.
//!
//! ```text
//! state      input                                   -> state
//! any        success, successes >= success_threshold,
//!            READY=1 received or notify off          -> Healthy
//! any        failure after the start period,
//!            failures >= failure_threshold           -> Unhealthy
//! any        failure inside the start period         -> (unchanged; breaks a success run only)
//! Unknown,   READY=1, notify on, no probe            -> Healthy
//! Unhealthy  READY=1, notify on, probe, the last
//!            success_threshold outcomes passed       -> Healthy
//! ```
//!
//! Rules in words:
//! - A tracker starts `Unknown` with the instance's run; a new run gets a new tracker.
//! - Failures inside `start_period` (counted from `started`) do not count toward
//!   `failure_threshold`, but they do end a run of successes. The start period ends early once
//!   the instance has been `Healthy`: from then on every failure counts (as in Docker).
//! - `notify = true` without a probe: `READY=1` makes the instance `Healthy`, and it stays so
//!   for the rest of its run (sd_notify has no "not ready" that corral acts on).
//! - `notify = true` with a probe: `READY=1` is required before probe results can make the
//!   instance `Healthy`; when it arrives after enough successes the instance becomes `Healthy`
//!   at once. Failures count whether or not `READY=1` came, so an instance that never gets
//!   ready and fails its probe becomes `Unhealthy`.
//! - `READY=1` from an instance whose spec does not set `notify` is ignored, and so is a
//!   repeated one.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::spec::HealthSpec;

/// An instance's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Not decided yet: the run just started, or the probe has not passed or failed enough.
    Unknown,
    Healthy,
    Unhealthy,
}

impl HealthState {
    /// The state's name in status output: `unknown`, `healthy`, `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of an instance's health, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub from: HealthState,
    pub to: HealthState,
    /// The outcome that decided it, e.g. `HTTP 503 (3 failures in a row)` or `READY=1`.
    pub reason: String,
}

/// The health of one run of an instance.
#[derive(Debug, Clone)]
pub struct Tracker {
    start_period: Duration,
    failure_threshold: u32,
    success_threshold: u32,
    notify: bool,
    has_probe: bool,
    started: Instant,
    state: HealthState,
    since: Instant,
    successes: u32,
    failures: u32,
    ready: bool,
    /// Has been healthy once: the start period is over.
    settled: bool,
    last_reason: String,
    last_at: Option<Instant>,
    last_healthy: Option<bool>,
}

impl Tracker {
    /// A tracker for a run of an instance that started at `started`.
    pub fn new(spec: &HealthSpec, started: Instant) -> Tracker {
        Tracker {
            start_period: spec.start_period,
            failure_threshold: spec.failure_threshold.max(1),
            success_threshold: spec.success_threshold.max(1),
            notify: spec.notify,
            has_probe: spec.probe.is_some(),
            started,
            state: HealthState::Unknown,
            since: started,
            successes: 0,
            failures: 0,
            ready: false,
            settled: false,
            last_reason: if spec.probe.is_some() {
                "not probed yet".to_string()
            } else {
                "waiting for READY=1".to_string()
            },
            last_at: None,
            last_healthy: None,
        }
    }

    /// Takes in one probe outcome that was observed at `now`.
    pub fn observe(&mut self, healthy: bool, reason: &str, now: Instant) -> Option<Change> {
        self.last_reason = reason.to_string();
        self.last_at = Some(now);
        self.last_healthy = Some(healthy);
        if healthy {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.state == HealthState::Healthy || self.successes < self.success_threshold {
                return None;
            }
            if self.notify && !self.ready {
                self.last_reason = format!("{reason}; waiting for READY=1");
                return None;
            }
            let why = counted(reason, self.successes, self.success_threshold, "successes");
            self.enter(HealthState::Healthy, why, now)
        } else {
            self.successes = 0;
            if self.in_start_period(now) {
                self.last_reason = format!("{reason} (in the start period, not counted)");
                return None;
            }
            self.failures = self.failures.saturating_add(1);
            if self.state == HealthState::Unhealthy || self.failures < self.failure_threshold {
                return None;
            }
            let why = counted(reason, self.failures, self.failure_threshold, "failures");
            self.enter(HealthState::Unhealthy, why, now)
        }
    }

    /// Takes in `READY=1` from the instance, received at `now`.
    pub fn ready_by_notify(&mut self, now: Instant) -> Option<Change> {
        if !self.notify || self.ready {
            return None;
        }
        self.ready = true;
        if !self.has_probe {
            self.last_reason = "READY=1".to_string();
            self.last_at = Some(now);
            self.last_healthy = Some(true);
            return self.enter(HealthState::Healthy, "READY=1".to_string(), now);
        }
        if self.state != HealthState::Healthy && self.successes >= self.success_threshold {
            let reason = self
                .last_reason
                .strip_suffix("; waiting for READY=1")
                .unwrap_or(&self.last_reason)
                .to_string();
            self.last_reason = reason.clone();
            return self.enter(HealthState::Healthy, format!("READY=1 and {reason}"), now);
        }
        None
    }

    fn enter(&mut self, to: HealthState, reason: String, now: Instant) -> Option<Change> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        self.since = now;
        if to == HealthState::Healthy {
            self.settled = true;
        }
        Some(Change { from, to, reason })
    }

    /// The current health.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// When the current health began (the run's start while `Unknown`).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// When the run started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Why, as of the last outcome (or `READY=1`): for status output.
    pub fn last_reason(&self) -> &str {
        &self.last_reason
    }

    /// When the last outcome was observed.
    pub fn last_outcome_at(&self) -> Option<Instant> {
        self.last_at
    }

    /// Whether the last outcome passed.
    pub fn last_outcome_healthy(&self) -> Option<bool> {
        self.last_healthy
    }

    /// Successes in a row, up to the last outcome.
    pub fn consecutive_successes(&self) -> u32 {
        self.successes
    }

    /// Failures in a row that counted (not those inside the start period).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Whether `READY=1` has been received (always false without `notify`).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Whether a failure observed at `now` would not count.
    pub fn in_start_period(&self, now: Instant) -> bool {
        !self.settled && now.saturating_duration_since(self.started) < self.start_period
    }
}

/// `reason`, with the run length when more than one outcome was needed.
fn counted(reason: &str, n: u32, threshold: u32, what: &str) -> String {
    if threshold > 1 {
        format!("{reason} ({n} {what} in a row)")
    } else {
        reason.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Probe;
    use HealthState::{Healthy, Unhealthy, Unknown};

    fn spec(
        start_period: u64,
        failures: u32,
        successes: u32,
        notify: bool,
        probe: bool,
    ) -> HealthSpec {
        HealthSpec {
            probe: probe.then(|| Probe::Tcp("127.0.0.1:1".into())),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            start_period: Duration::from_secs(start_period),
            failure_threshold: failures,
            success_threshold: successes,
            restart_on_failure: true,
            notify,
        }
    }

    /// One input at a time (in seconds since the start), and the health expected after it.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Pass(u64),
        Fail(u64),
        Ready(u64),
    }
    use Step::{Fail, Pass, Ready};

    fn run(spec: &HealthSpec, steps: &[Step]) -> Vec<HealthState> {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut tracker = Tracker::new(spec, t0);
        let mut states = Vec::new();
        for step in steps {
            let before = tracker.state();
            let change = match *step {
                Pass(s) => tracker.observe(true, "HTTP 200", at(s)),
                Fail(s) => tracker.observe(false, "HTTP 503", at(s)),
                Ready(s) => tracker.ready_by_notify(at(s)),
            };
            // A change is reported exactly when the state moves, and says from where to where.
            match change {
                Some(c) => {
                    assert_eq!((c.from, c.to), (before, tracker.state()), "{step:?}");
                    assert_ne!(c.from, c.to);
                }
                None => assert_eq!(before, tracker.state(), "{step:?}"),
            }
            states.push(tracker.state());
        }
        states
    }

    #[test]
    fn transitions() {
        struct Case {
            name: &'static str,
            spec: HealthSpec,
            steps: Vec<Step>,
            want: Vec<HealthState>,
        }
        let cases = vec![
            Case {
                name: "one success is enough by default",
                spec: spec(0, 3, 1, false, true),
                steps: vec![Pass(0)],
                want: vec![Healthy],
            },
            Case {
                name: "failures count up to the threshold",
                spec: spec(0, 3, 1, false, true),
                steps: vec![Fail(0), Fail(1), Fail(2), Fail(3)],
                want: vec![Unknown, Unknown, Unhealthy, Unhealthy],
            },
            Case {
                name: "failures in the start period do not count",
                spec: spec(5, 2, 1, false, true),
                steps: vec![Fail(0), Fail(2), Fail(4), Fail(5), Fail(6)],
                want: vec![Unknown, Unknown, Unknown, Unknown, Unhealthy],
            },
            Case {
                name: "success in the start period still counts",
                spec: spec(5, 1, 1, false, true),
                steps: vec![Fail(1), Pass(2)],
                want: vec![Unknown, Healthy],
            },
            Case {
                name: "being healthy ends the start period early",
                spec: spec(60, 2, 1, false, true),
                steps: vec![Pass(1), Fail(2), Fail(3)],
                want: vec![Healthy, Healthy, Unhealthy],
            },
            Case {
                name: "success threshold needs consecutive successes",
                spec: spec(0, 3, 3, false, true),
                steps: vec![Pass(0), Pass(1), Fail(2), Pass(3), Pass(4), Pass(5)],
                want: vec![Unknown, Unknown, Unknown, Unknown, Unknown, Healthy],
            },
            Case {
                name: "a start-period failure breaks a success run",
                spec: spec(10, 3, 2, false, true),
                steps: vec![Pass(0), Fail(1), Pass(2), Pass(3)],
                want: vec![Unknown, Unknown, Unknown, Healthy],
            },
            Case {
                name: "flapping below both thresholds keeps the state",
                spec: spec(0, 2, 2, false, true),
                steps: vec![
                    Pass(0),
                    Pass(1),
                    Fail(2),
                    Pass(3),
                    Fail(4),
                    Pass(5),
                    Fail(6),
                    Fail(7),
                    Pass(8),
                    Fail(9),
                    Pass(10),
                    Pass(11),
                ],
                want: vec![
                    Unknown, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Unhealthy,
                    Unhealthy, Unhealthy, Unhealthy, Healthy,
                ],
            },
            Case {
                name: "flapping with thresholds of one follows every outcome",
                spec: spec(0, 1, 1, false, true),
                steps: vec![Pass(0), Fail(1), Pass(2), Fail(3)],
                want: vec![Healthy, Unhealthy, Healthy, Unhealthy],
            },
            Case {
                name: "notify without a probe: READY=1 makes it healthy",
                spec: spec(0, 3, 1, true, false),
                steps: vec![Ready(1), Ready(2)],
                want: vec![Healthy, Healthy],
            },
            Case {
                name: "notify with a probe: passing is not enough without READY=1",
                spec: spec(0, 3, 1, true, true),
                steps: vec![Pass(0), Pass(1), Ready(2)],
                want: vec![Unknown, Unknown, Healthy],
            },
            Case {
                name: "notify with a probe: READY=1 alone is not enough",
                spec: spec(0, 3, 2, true, true),
                steps: vec![Ready(0), Pass(1), Pass(2)],
                want: vec![Unknown, Unknown, Healthy],
            },
            Case {
                name: "notify with a probe: READY=1 after a failure waits for successes",
                spec: spec(0, 3, 1, true, true),
                steps: vec![Pass(0), Fail(1), Ready(2), Pass(3)],
                want: vec![Unknown, Unknown, Unknown, Healthy],
            },
            Case {
                name: "notify with a probe: failures count without READY=1",
                spec: spec(0, 2, 1, true, true),
                steps: vec![Fail(0), Fail(1), Ready(2), Pass(3)],
                want: vec![Unknown, Unhealthy, Unhealthy, Healthy],
            },
            Case {
                name: "READY=1 without notify is ignored",
                spec: spec(0, 3, 2, false, true),
                steps: vec![Ready(0), Pass(1), Pass(2)],
                want: vec![Unknown, Unknown, Healthy],
            },
        ];
        for case in cases {
            assert_eq!(run(&case.spec, &case.steps), case.want, "{}", case.name);
        }
    }

    #[test]
    fn changes_say_why() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Tracker::new(&spec(2, 3, 1, false, true), t0);
        assert_eq!(t.last_reason(), "not probed yet");
        assert_eq!(
            t.observe(false, "connect 127.0.0.1:1: connection refused", at(1)),
            None
        );
        assert_eq!(
            t.last_reason(),
            "connect 127.0.0.1:1: connection refused (in the start period, not counted)"
        );
        assert_eq!(t.consecutive_failures(), 0);
        assert!(t.in_start_period(at(1)));
        assert!(!t.in_start_period(at(2)));
        let change = t.observe(true, "HTTP 200", at(3));
        assert_eq!(
            change,
            Some(Change {
                from: Unknown,
                to: Healthy,
                reason: "HTTP 200".into()
            })
        );
        assert_eq!(t.since(), at(3));
        assert_eq!(t.observe(false, "HTTP 503", at(4)), None);
        assert_eq!(t.observe(false, "HTTP 503", at(5)), None);
        assert_eq!(t.consecutive_failures(), 2);
        let change = t.observe(false, "timed out after 1s", at(6));
        assert_eq!(
            change,
            Some(Change {
                from: Healthy,
                to: Unhealthy,
                reason: "timed out after 1s (3 failures in a row)".into()
            })
        );
        assert_eq!(t.last_reason(), "timed out after 1s");
        assert_eq!(t.last_outcome_at(), Some(at(6)));
        assert_eq!(t.last_outcome_healthy(), Some(false));
        assert_eq!(t.consecutive_successes(), 0);
        assert_eq!(t.started(), t0);
    }

    #[test]
    fn notify_reasons() {
        let t0 = Instant::now();
        let mut t = Tracker::new(&spec(0, 3, 1, true, true), t0);
        assert_eq!(t.observe(true, "exit 0", t0), None);
        assert_eq!(t.last_reason(), "exit 0; waiting for READY=1");
        assert!(!t.ready());
        let change = t.ready_by_notify(t0 + Duration::from_secs(1));
        assert_eq!(
            change.map(|c| c.reason),
            Some("READY=1 and exit 0".to_string())
        );
        assert!(t.ready());
        assert_eq!(t.last_reason(), "exit 0");

        let mut t = Tracker::new(&spec(0, 3, 1, true, false), t0);
        assert_eq!(t.last_reason(), "waiting for READY=1");
        assert_eq!(
            t.ready_by_notify(t0),
            Some(Change {
                from: Unknown,
                to: Healthy,
                reason: "READY=1".into()
            })
        );
        assert_eq!(t.ready_by_notify(t0), None);
    }
}
