//! One instance slot's lifecycle as a transition table: `handle(state, event) -> effects`.
//! Pure: time comes in through [`Ctx`], side effects go out as [`Effect`]s for the driver.
//!
//! ```text
//! state      event              -> state          effects
//! Pending    Started            -> Running
//! Pending    StartFailed        -> Backoff        (failures += 1)
//! Running    Exited             -> Backoff        KillAll   (policy restarts it)
//!                               -> Exited         KillAll   (policy does not)
//! Running    StopRequested(r)   -> Stopping(r)    Signal
//! Stopping   GraceExpired       -> Stopping(r,killed) KillAll
//! Stopping   Exited             -> Backoff        KillAll   (r = Unhealthy: health_failed)
//!                               -> Removing       Cleanup   (r = Retire | ScaleDown | Delete)
//! Backoff    BackoffElapsed     -> Pending        Spawn
//! Backoff, Exited
//!            StopRequested(Retire|ScaleDown|Delete) -> Removing Cleanup
//! Pending    StopRequested(Retire|ScaleDown|Delete) -> Removing Cleanup
//! Removing   CleanupDone        -> Gone           Forget
//! ```
//! Every other pair is ignored: such events are stale (an exit of an earlier run, a timer
//! that lost a race) and leave the slot as it is.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::spec::{RestartPolicy, RestartSpec, ServiceSpec};

/// An instance that stayed up this long has its backoff reset.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// After SIGKILL, how often it is sent again while the instance has not ended.
pub const KILL_RETRY: Duration = Duration::from_secs(1);

/// Why an instance is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A rollout replaces it with an instance of the new target: removed once stopped.
    Retire,
    /// Its index is at or above `replicas`.
    ScaleDown,
    /// Its service is being deleted.
    Delete,
    /// It failed its health check `failure_threshold` times (liveness): replaced, and the
    /// end counts as a failure (`health_failed`, with backoff).
    Unhealthy,
}

impl StopReason {
    /// Removal (scale-down, delete) outranks a replacement: the slot is not started again.
    fn outranks(self, other: StopReason) -> bool {
        let rank = |r| match r {
            StopReason::Unhealthy => 0,
            StopReason::Retire | StopReason::ScaleDown => 1,
            StopReason::Delete => 2,
        };
        rank(self) > rank(other)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Retire => "retire",
            StopReason::ScaleDown => "scale-down",
            StopReason::Delete => "delete",
            StopReason::Unhealthy => "unhealthy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// To be started now.
    Pending,
    Running {
        since: Instant,
    },
    Stopping {
        reason: StopReason,
        /// When to (re)send SIGKILL.
        deadline: Instant,
        killed: bool,
    },
    /// Ended; to be started again at `until`.
    Backoff {
        until: Instant,
    },
    /// Ended; the restart policy keeps it down.
    Exited,
    /// Ended and being removed (cgroup cleanup in progress).
    Removing,
    /// Removed: the slot is forgotten.
    Gone,
}

impl State {
    /// The state's name in status output.
    pub fn name(&self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running { .. } => "running",
            State::Stopping { .. } => "stopping",
            State::Backoff { .. } => "backoff",
            State::Exited => "exited",
            State::Removing => "removing",
            State::Gone => "gone",
        }
    }

    /// True while the instance has processes (or may have them).
    pub fn is_live(&self) -> bool {
        matches!(self, State::Running { .. } | State::Stopping { .. })
    }
}

/// How an instance's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "class", content = "value", rename_all = "snake_case")]
pub enum ExitClass {
    Exited(i32),
    Signaled(i32),
    /// The kernel's OOM killer ended it (read from the cgroup's counters).
    OomKilled,
    /// It did not end within the stop grace period and was killed.
    StopTimeout,
    HealthFailed,
    /// Its end could not be observed.
    Lost,
}

impl fmt::Display for ExitClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitClass::Exited(c) => write!(f, "exited({c})"),
            ExitClass::Signaled(s) => write!(f, "signaled({s})"),
            ExitClass::OomKilled => f.write_str("oom_killed"),
            ExitClass::StopTimeout => f.write_str("stop_timeout"),
            ExitClass::HealthFailed => f.write_str("health_failed"),
            ExitClass::Lost => f.write_str("lost"),
        }
    }
}

/// The end of one run of an instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitInfo {
    pub class: ExitClass,
    pub at: SystemTime,
    /// The instance never ran its command: why.
    pub setup_error: Option<String>,
}

impl ExitInfo {
    /// A clean, successful end: `exited(0)`.
    pub fn is_success(&self) -> bool {
        self.class == ExitClass::Exited(0) && self.setup_error.is_none()
    }
}

/// What the kernel and the init said about an ended run, for [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The service process's own end, as the init recorded it.
    pub service_exit: Option<(Option<i32>, Option<i32>)>,
    /// The init's status: `Ok(code)` or `Err(signal)`; `None` when it was not our child
    /// (adopted from an earlier agent run), so only its record can tell.
    pub init_status: Option<Result<i32, i32>>,
    /// OOM kills counted in the instance's cgroup during this run.
    pub oom_kills: u64,
    /// The agent sent SIGKILL after the grace period.
    pub killed_after_grace: bool,
}

/// Classify an ended run. An OOM kill is never guessed from a SIGKILL: it needs the cgroup's
/// own counter to have moved during the run.
pub fn classify(o: &Observed) -> ExitClass {
    if o.killed_after_grace {
        return ExitClass::StopTimeout;
    }
    let (code, signal) = match (o.service_exit, o.init_status) {
        (Some((code, signal)), _) => (code, signal),
        (None, Some(Ok(code))) => (Some(code), None),
        (None, Some(Err(sig))) => (None, Some(sig)),
        // Neither record nor status: only the cgroup can still tell an OOM kill.
        (None, None) if o.oom_kills > 0 => return ExitClass::OomKilled,
        (None, None) => return ExitClass::Lost,
    };
    if o.oom_kills > 0 && signal == Some(libc::SIGKILL) {
        return ExitClass::OomKilled;
    }
    match (code, signal) {
        (_, Some(sig)) => ExitClass::Signaled(sig),
        (Some(code), None) => ExitClass::Exited(code),
        (None, None) => ExitClass::Lost,
    }
}

/// The restart delay after `failures` consecutive failed runs: `backoff * 2^failures`, capped
/// at `backoff_max`, minus up to 10 % jitter (`jitter` in `[0, 1)`), so delays spread out but
/// never exceed the cap.
pub fn backoff_delay(r: &RestartSpec, failures: u32, jitter: f64) -> Duration {
    let base = r.backoff.as_secs_f64();
    let exp = base * 2f64.powi(failures.min(63) as i32);
    let capped = exp.min(r.backoff_max.as_secs_f64());
    let j = jitter.clamp(0.0, 1.0);
    Duration::from_secs_f64(capped * (1.0 - 0.1 * j))
}

/// Whether the restart policy starts an instance again after this end.
pub fn should_restart(policy: RestartPolicy, exit: &ExitInfo) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !exit.is_success(),
        RestartPolicy::Never => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started { pid: i32 },
    StartFailed { error: String },
    StopRequested(StopReason),
    GraceExpired,
    Exited(ExitInfo),
    BackoffElapsed,
    CleanupDone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Start the slot with its service's current spec, then report Started/StartFailed.
    Spawn,
    /// Send the stop signal of the spec the instance runs.
    Signal,
    /// SIGKILL everything in the instance's cgroup.
    KillAll,
    /// Empty and remove the instance's cgroup, then report CleanupDone.
    Cleanup,
    /// Drop the slot.
    Forget,
}

/// Inputs a transition may need besides the event.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now: Instant,
    pub wall: SystemTime,
    /// In `[0, 1)`, for backoff jitter.
    pub jitter: f64,
}

/// One slot of a service: index, identity, what it runs and where it is in its lifecycle.
#[derive(Debug, Clone)]
pub struct Instance {
    pub index: u32,
    pub id: String,
    /// The spec (and its revision) it runs: fixed for the slot's whole life; a rollout
    /// replaces the slot with a new one instead of changing it.
    pub spec: Arc<ServiceSpec>,
    pub revision: u64,
    /// The rollout generation of the service it was created in: a restart replaces every
    /// instance of the same revision with ones of a new epoch.
    pub epoch: u64,
    pub state: State,
    /// Restarts by the restart policy (not replacements by updates).
    pub restarts: u32,
    /// Consecutive failed runs, for the backoff; reset after a run of 60 s.
    pub failures: u32,
    pub last_exit: Option<ExitInfo>,
    pub last_error: Option<String>,
    pub pid: Option<i32>,
    pub started_at: Option<SystemTime>,
    /// Increases with every spawn, so an exit of an earlier run is recognised.
    pub generation: u64,
}

impl Instance {
    pub fn new(index: u32, id: String, spec: Arc<ServiceSpec>, revision: u64) -> Instance {
        Instance {
            index,
            id,
            spec,
            revision,
            epoch: 0,
            state: State::Pending,
            restarts: 0,
            failures: 0,
            last_exit: None,
            last_error: None,
            pid: None,
            started_at: None,
            generation: 0,
        }
    }

    /// The same instance, of rollout epoch `epoch`.
    pub fn with_epoch(mut self, epoch: u64) -> Instance {
        self.epoch = epoch;
        self
    }

    /// When this slot next needs attention without any outside event.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Stopping { deadline, .. } => Some(deadline),
            State::Backoff { until } => Some(until),
            _ => None,
        }
    }

    /// Apply one event: the transition table above.
    pub fn handle(&mut self, event: Event, ctx: &Ctx) -> Vec<Effect> {
        use State as S;
        match (self.state, event) {
            (S::Pending, Event::Started { pid }) => {
                self.state = S::Running { since: ctx.now };
                self.pid = Some(pid);
                self.started_at = Some(ctx.wall);
                self.last_error = None;
                vec![]
            }
            (S::Pending, Event::StartFailed { error }) => {
                let delay = backoff_delay(&self.spec.restart, self.failures, ctx.jitter);
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(error);
                self.state = S::Backoff {
                    until: ctx.now + delay,
                };
                vec![]
            }
            (S::Running { since }, Event::Exited(exit)) => {
                self.pid = None;
                if ctx.now.saturating_duration_since(since) >= BACKOFF_RESET_AFTER {
                    self.failures = 0;
                }
                let restart = should_restart(self.spec.restart.policy, &exit);
                self.last_error = exit.setup_error.clone();
                self.last_exit = Some(exit);
                if restart {
                    let delay = backoff_delay(&self.spec.restart, self.failures, ctx.jitter);
                    self.failures = self.failures.saturating_add(1);
                    self.restarts = self.restarts.saturating_add(1);
                    self.state = S::Backoff {
                        until: ctx.now + delay,
                    };
                } else {
                    self.state = S::Exited;
                }
                vec![Effect::KillAll]
            }
            (S::Running { .. }, Event::StopRequested(reason)) => {
                self.state = S::Stopping {
                    reason,
                    deadline: ctx.now + self.spec.stop.grace,
                    killed: false,
                };
                vec![Effect::Signal]
            }
            (S::Stopping { reason, .. }, Event::GraceExpired) => {
                self.state = S::Stopping {
                    reason,
                    deadline: ctx.now + KILL_RETRY,
                    killed: true,
                };
                vec![Effect::KillAll]
            }
            (
                S::Stopping {
                    reason: old,
                    deadline,
                    killed,
                },
                Event::StopRequested(new),
            ) => {
                // A stronger reason wins (a replaced instance whose service is then deleted
                // is not started again); the grace period keeps running.
                if new.outranks(old) {
                    self.state = S::Stopping {
                        reason: new,
                        deadline,
                        killed,
                    };
                }
                vec![]
            }
            (S::Stopping { reason, .. }, Event::Exited(mut exit)) => {
                self.pid = None;
                self.last_error = exit.setup_error.clone();
                if reason == StopReason::Unhealthy {
                    exit.class = ExitClass::HealthFailed;
                }
                self.last_exit = Some(exit);
                match reason {
                    StopReason::Unhealthy => {
                        let delay = backoff_delay(&self.spec.restart, self.failures, ctx.jitter);
                        self.failures = self.failures.saturating_add(1);
                        self.restarts = self.restarts.saturating_add(1);
                        self.state = S::Backoff {
                            until: ctx.now + delay,
                        };
                        vec![Effect::KillAll]
                    }
                    StopReason::Retire | StopReason::ScaleDown | StopReason::Delete => {
                        self.state = S::Removing;
                        vec![Effect::Cleanup]
                    }
                }
            }
            (S::Backoff { .. }, Event::BackoffElapsed) => {
                self.state = S::Pending;
                vec![Effect::Spawn]
            }
            (
                S::Pending,
                Event::StopRequested(
                    StopReason::Retire | StopReason::ScaleDown | StopReason::Delete,
                ),
            ) => {
                self.state = S::Removing;
                vec![Effect::Cleanup]
            }
            (S::Backoff { .. } | S::Exited, Event::StopRequested(reason)) => match reason {
                // Nothing runs: nothing to fail a health check.
                StopReason::Unhealthy => vec![],
                StopReason::Retire | StopReason::ScaleDown | StopReason::Delete => {
                    self.state = S::Removing;
                    vec![Effect::Cleanup]
                }
            },
            (S::Removing, Event::CleanupDone) => {
                self.state = S::Gone;
                vec![Effect::Forget]
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: &str) -> Arc<ServiceSpec> {
        let text = format!(
            "name = \"web\"\ncommand = [\"/bin/true\"]\n[restart]\npolicy = \"{policy}\"\nbackoff = \"1s\"\nbackoff_max = \"8s\"\n[stop]\ngrace = \"5s\"\n"
        );
        Arc::new(crate::spec::parse_toml(&text).expect("valid spec"))
    }

    fn ctx(now: Instant) -> Ctx {
        Ctx {
            now,
            wall: SystemTime::UNIX_EPOCH,
            jitter: 0.0,
        }
    }

    fn exit(class: ExitClass) -> ExitInfo {
        ExitInfo {
            class,
            at: SystemTime::UNIX_EPOCH,
            setup_error: None,
        }
    }

    fn running(policy: &str, t0: Instant) -> Instance {
        let mut i = Instance::new(0, "web-0".into(), spec(policy), 1);
        i.handle(Event::Started { pid: 7 }, &ctx(t0));
        i
    }

    #[test]
    fn transition_table() {
        let t0 = Instant::now();
        let secs = |s| t0 + Duration::from_secs(s);
        type Case = (
            &'static str,
            &'static str,
            fn(&mut Instance, Instant),
            Event,
            &'static str,
            Vec<Effect>,
        );
        let cases: Vec<Case> = vec![
            (
                "start ok",
                "always",
                |_, _| {},
                Event::Started { pid: 1 },
                "running",
                vec![],
            ),
            (
                "start failed",
                "always",
                |_, _| {},
                Event::StartFailed { error: "x".into() },
                "backoff",
                vec![],
            ),
            (
                "crash restarts",
                "always",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                },
                Event::Exited(exit(ExitClass::Exited(1))),
                "backoff",
                vec![Effect::KillAll],
            ),
            (
                "on-failure keeps a success down",
                "on-failure",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                },
                Event::Exited(exit(ExitClass::Exited(0))),
                "exited",
                vec![Effect::KillAll],
            ),
            (
                "on-failure restarts an oom kill",
                "on-failure",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                },
                Event::Exited(exit(ExitClass::OomKilled)),
                "backoff",
                vec![Effect::KillAll],
            ),
            (
                "never keeps a crash down",
                "never",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                },
                Event::Exited(exit(ExitClass::Signaled(9))),
                "exited",
                vec![Effect::KillAll],
            ),
            (
                "stop signals",
                "always",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                },
                Event::StopRequested(StopReason::ScaleDown),
                "stopping",
                vec![Effect::Signal],
            ),
            (
                "grace expiry kills",
                "always",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                    i.handle(Event::StopRequested(StopReason::Delete), &ctx(t));
                },
                Event::GraceExpired,
                "stopping",
                vec![Effect::KillAll],
            ),
            (
                "stopped for scale-down is removed",
                "always",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                    i.handle(Event::StopRequested(StopReason::ScaleDown), &ctx(t));
                },
                Event::Exited(exit(ExitClass::Exited(0))),
                "removing",
                vec![Effect::Cleanup],
            ),
            (
                "stopped for a rollout is removed",
                "always",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                    i.handle(Event::StopRequested(StopReason::Retire), &ctx(t));
                },
                Event::Exited(exit(ExitClass::Exited(0))),
                "removing",
                vec![Effect::Cleanup],
            ),
            (
                "backoff elapses",
                "always",
                |i, t| {
                    i.handle(Event::StartFailed { error: "x".into() }, &ctx(t));
                },
                Event::BackoffElapsed,
                "pending",
                vec![Effect::Spawn],
            ),
            (
                "backoff slot deleted",
                "always",
                |i, t| {
                    i.handle(Event::StartFailed { error: "x".into() }, &ctx(t));
                },
                Event::StopRequested(StopReason::Delete),
                "removing",
                vec![Effect::Cleanup],
            ),
            (
                "exited slot retired",
                "never",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                    i.handle(Event::Exited(exit(ExitClass::Exited(0))), &ctx(t));
                },
                Event::StopRequested(StopReason::Retire),
                "removing",
                vec![Effect::Cleanup],
            ),
            (
                "cleanup done",
                "always",
                |i, t| {
                    i.handle(Event::StopRequested(StopReason::Delete), &ctx(t));
                },
                Event::CleanupDone,
                "gone",
                vec![Effect::Forget],
            ),
            (
                "stale exit while pending is ignored",
                "always",
                |_, _| {},
                Event::Exited(exit(ExitClass::Exited(1))),
                "pending",
                vec![],
            ),
            (
                "stale grace expiry while running is ignored",
                "always",
                |i, t| {
                    i.handle(Event::Started { pid: 1 }, &ctx(t));
                },
                Event::GraceExpired,
                "running",
                vec![],
            ),
        ];
        for (name, policy, setup, event, want_state, want_effects) in cases {
            let mut i = Instance::new(0, "web-0".into(), spec(policy), 1);
            setup(&mut i, t0);
            let effects = i.handle(event, &ctx(secs(1)));
            assert_eq!(i.state.name(), want_state, "{name}");
            assert_eq!(effects, want_effects, "{name}");
        }
    }

    #[test]
    fn crash_loop_delays_grow_and_are_capped_then_reset_after_a_long_run() {
        let t0 = Instant::now();
        let mut i = running("always", t0);
        let mut t = t0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            t += Duration::from_millis(10);
            i.handle(Event::Exited(exit(ExitClass::Exited(1))), &ctx(t));
            let State::Backoff { until } = i.state else {
                panic!("expected backoff, got {:?}", i.state)
            };
            delays.push(until - t);
            t = until;
            i.handle(Event::BackoffElapsed, &ctx(t));
            i.handle(Event::Started { pid: 8 }, &ctx(t));
        }
        let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 8, 8]);
        assert_eq!(i.restarts, 6);
        // A run of more than 60 s resets the backoff.
        t += Duration::from_secs(61);
        i.handle(Event::Exited(exit(ExitClass::Exited(1))), &ctx(t));
        let State::Backoff { until } = i.state else {
            panic!("expected backoff")
        };
        assert_eq!(until - t, Duration::from_secs(1));
    }

    #[test]
    fn jitter_only_shortens_and_never_exceeds_the_cap() {
        let r = spec("always").restart;
        for f in 0..10 {
            let full = backoff_delay(&r, f, 0.0);
            let jittered = backoff_delay(&r, f, 0.999);
            assert!(jittered <= full && jittered >= full.mul_f64(0.9), "{f}");
            assert!(full <= r.backoff_max);
        }
        let zero = RestartSpec {
            backoff: Duration::ZERO,
            ..r
        };
        assert_eq!(backoff_delay(&zero, 5, 0.5), Duration::ZERO);
    }

    #[test]
    fn classification() {
        let o = |service_exit, init_status, oom_kills, killed_after_grace| Observed {
            service_exit,
            init_status,
            oom_kills,
            killed_after_grace,
        };
        let cases = [
            (
                o(Some((Some(3), None)), Some(Ok(3)), 0, false),
                ExitClass::Exited(3),
            ),
            (
                o(Some((None, Some(9))), Some(Ok(137)), 0, false),
                ExitClass::Signaled(9),
            ),
            (
                o(Some((None, Some(9))), Some(Ok(137)), 1, false),
                ExitClass::OomKilled,
            ),
            // A SIGKILL with no OOM counted is not an OOM kill.
            (o(None, Some(Err(9)), 0, false), ExitClass::Signaled(9)),
            // The init itself OOM-killed: no record, but the counter moved.
            (o(None, Some(Err(9)), 2, false), ExitClass::OomKilled),
            // An OOM kill of a helper process while the service exits normally.
            (
                o(Some((Some(1), None)), Some(Ok(1)), 1, false),
                ExitClass::Exited(1),
            ),
            (o(None, Some(Err(9)), 1, true), ExitClass::StopTimeout),
            (
                o(Some((None, Some(15))), Some(Ok(143)), 0, false),
                ExitClass::Signaled(15),
            ),
            (
                o(Some((None, None)), Some(Ok(0)), 0, false),
                ExitClass::Lost,
            ),
            // Adopted instances (not our child): the record tells, else the cgroup, else lost.
            (
                o(Some((Some(3), None)), None, 0, false),
                ExitClass::Exited(3),
            ),
            (
                o(Some((None, Some(9))), None, 1, false),
                ExitClass::OomKilled,
            ),
            (o(None, None, 1, false), ExitClass::OomKilled),
            (o(None, None, 0, false), ExitClass::Lost),
            (o(None, None, 0, true), ExitClass::StopTimeout),
        ];
        for (obs, want) in cases {
            assert_eq!(classify(&obs), want, "{obs:?}");
        }
    }

    #[test]
    fn delete_overrides_a_health_restart_while_stopping() {
        let t0 = Instant::now();
        let mut i = running("always", t0);
        i.handle(Event::StopRequested(StopReason::Unhealthy), &ctx(t0));
        i.handle(Event::StopRequested(StopReason::Delete), &ctx(t0));
        let effects = i.handle(Event::Exited(exit(ExitClass::Exited(0))), &ctx(t0));
        assert_eq!(effects, vec![Effect::Cleanup]);
        assert_eq!(i.state, State::Removing);
    }
}
