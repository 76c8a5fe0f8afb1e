//! One instance slot's lifecycle as a transition table: `handle(state, event) -> effects`.
//! Pure: time comes in through [`Ctx`], side effects go out as [`Effect`]s for the driver.
//!
//! ```text
//! state      event              -> state          effects
//! Pending    Started            -> Running
//! Pending    StartFailed        -> Backoff        (failures += 1)
//! Running    Exited             -> Backoff        KillAll   (policy restarts it)
//!                               -> Exited         KillAll   (policy does not)
//! Running    StopRequested(r)   -> Stopping(r)    Signal(r)
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

use crate::runtime::{InitExit, ProcessStatus};
use crate::spec::{RestartPolicy, RestartSpec, ServiceSpec};

/// An instance that stayed up this long has its backoff reset.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// After SIGKILL, how often it is sent again while the instance has not ended.
pub const KILL_RETRY: Duration = Duration::from_secs(1);

/// Why an instance is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    /// A job's attempt ran past `job.timeout`: removed once stopped; its run ends `timed_out`.
    Timeout,
    /// A job's run was cancelled (`CancelRun`, a `replace` schedule): removed once stopped.
    Cancel,
}

impl StopReason {
    /// Removal (scale-down, delete) outranks a replacement: the slot is not started again.
    fn outranks(self, other: StopReason) -> bool {
        let rank = |r| match r {
            StopReason::Unhealthy => 0,
            StopReason::Retire | StopReason::ScaleDown => 1,
            StopReason::Timeout | StopReason::Cancel => 2,
            StopReason::Delete => 3,
        };
        rank(self) > rank(other)
    }

    /// The slot is removed once stopped (not started again).
    pub fn removes(self) -> bool {
        !matches!(self, StopReason::Unhealthy)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Retire => "retire",
            StopReason::ScaleDown => "scale-down",
            StopReason::Delete => "delete",
            StopReason::Unhealthy => "unhealthy",
            StopReason::Timeout => "timeout",
            StopReason::Cancel => "cancel",
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

/// Where an instance is in its lifecycle, without the state's data: what status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Pending,
    Running,
    Stopping,
    Backoff,
    Exited,
    Removing,
    Gone,
}

impl Phase {
    /// The phase's name in status output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Backoff => "backoff",
            Phase::Exited => "exited",
            Phase::Removing => "removing",
            Phase::Gone => "gone",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl State {
    pub fn phase(&self) -> Phase {
        match self {
            State::Pending => Phase::Pending,
            State::Running { .. } => Phase::Running,
            State::Stopping { .. } => Phase::Stopping,
            State::Backoff { .. } => Phase::Backoff,
            State::Exited => Phase::Exited,
            State::Removing => Phase::Removing,
            State::Gone => Phase::Gone,
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

/// The text is not an exit class as [`ExitClass`]'s `Display` writes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an exit class (like \"exited(3)\", \"signaled(9)\", \"oom_killed\")")]
pub struct NotAnExitClass(String);

impl std::str::FromStr for ExitClass {
    type Err = NotAnExitClass;

    /// The text `Display` writes: `exited(3)`, `signaled(9)`, `oom_killed`, ...
    fn from_str(s: &str) -> Result<ExitClass, NotAnExitClass> {
        let number = |inner: &str| inner.strip_suffix(')')?.parse::<i32>().ok();
        let class = match s {
            "oom_killed" => Some(ExitClass::OomKilled),
            "stop_timeout" => Some(ExitClass::StopTimeout),
            "health_failed" => Some(ExitClass::HealthFailed),
            "lost" => Some(ExitClass::Lost),
            _ => match s.split_once('(') {
                Some(("exited", n)) => number(n).map(ExitClass::Exited),
                Some(("signaled", n)) => number(n).map(ExitClass::Signaled),
                _ => None,
            },
        };
        class.ok_or_else(|| NotAnExitClass(s.chars().take(40).collect()))
    }
}

impl ExitClass {
    /// The exit code, or the signal that ended the run, as events and the wire carry them:
    /// SIGKILL for an OOM kill and a stop timeout; neither for a health failure (the end
    /// that counts is the failed check) or a lost end.
    pub fn code_and_signal(self) -> (Option<i32>, Option<i32>) {
        match self {
            ExitClass::Exited(c) => (Some(c), None),
            ExitClass::Signaled(s) => (None, Some(s)),
            ExitClass::OomKilled | ExitClass::StopTimeout => (None, Some(libc::SIGKILL)),
            ExitClass::HealthFailed | ExitClass::Lost => (None, None),
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
    /// The last lines the service wrote to stderr before a failed end (its own account of
    /// why: `Address already in use`, a stack trace), so the reason shows in status and not
    /// only in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl ExitInfo {
    /// A clean, successful end: `exited(0)`.
    pub fn is_success(&self) -> bool {
        self.class == ExitClass::Exited(0) && self.setup_error.is_none()
    }
}

/// How one run of an instance ended, as far as the agent observed it: what the init's own
/// status, its exit record and the cgroup's OOM counter say. Built alike when the agent sees
/// an init end and when, at its start, it finds an instance that ended while no agent ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEnd {
    /// The init's status (`Unknown` when it was not the agent's child: adopted from an
    /// earlier run, so only its record can tell), its record, and a spawn that failed.
    pub exit: InitExit,
    /// OOM kills counted in the instance's cgroup during this run.
    pub oom_kills: u64,
    /// The agent sent SIGKILL after the grace period.
    pub killed_after_grace: bool,
}

impl ProcessEnd {
    /// How the run ended. An OOM kill is never guessed from a SIGKILL: it needs the cgroup's
    /// own counter to have moved during the run.
    pub fn class(&self) -> ExitClass {
        if self.killed_after_grace {
            return ExitClass::StopTimeout;
        }
        let service = self.exit.record.as_ref().map(|r| (r.code, r.signal));
        let (code, signal) = match (service, self.exit.status) {
            (Some(ended), _) => ended,
            (None, ProcessStatus::Exited(code)) => (Some(code), None),
            (None, ProcessStatus::Signaled(sig)) => (None, Some(sig)),
            // Neither record nor status: only the cgroup can still tell an OOM kill.
            (None, ProcessStatus::Unknown) if self.oom_kills > 0 => return ExitClass::OomKilled,
            (None, ProcessStatus::Unknown) => return ExitClass::Lost,
        };
        if self.oom_kills > 0 && signal == Some(libc::SIGKILL) {
            return ExitClass::OomKilled;
        }
        match (code, signal) {
            (_, Some(sig)) => ExitClass::Signaled(sig),
            (Some(code), None) => ExitClass::Exited(code),
            (None, None) => ExitClass::Lost,
        }
    }

    /// The end as reported, at `at`: its class and, when there is more to say, why the
    /// instance never ran its command or, for a lost end, `unobserved` (why its end could not
    /// be seen).
    pub fn info(&self, at: SystemTime, unobserved: Option<String>) -> ExitInfo {
        let class = self.class();
        let setup_error = self
            .exit
            .spawn_error
            .clone()
            .or_else(|| self.exit.record.as_ref()?.setup_error.clone())
            .or_else(|| unobserved.filter(|_| class == ExitClass::Lost));
        ExitInfo {
            class,
            at,
            setup_error,
            output: None,
        }
    }
}

/// The restart delay after `failures` consecutive failed runs: `backoff * 2^failures`, capped
/// at `backoff_max`, minus up to 10 % jitter (`jitter` in `[0, 1)`), so delays spread out but
/// never exceed the cap.
pub fn backoff_delay(r: &RestartSpec, failures: u32, jitter: f64) -> Duration {
    let base = r.backoff.as_secs_f64();
    let exp = base * 2f64.powi(i32::try_from(failures.min(63)).unwrap_or(63));
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
    /// Send the stop signal of the spec the instance runs, for this reason.
    Signal(StopReason),
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

/// What an instance's runs so far add up to: kept across its restarts, saved for a later
/// agent run, and reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct History {
    /// Restarts by the restart policy (not replacements by updates).
    pub restarts: u32,
    /// Consecutive failed runs, for the backoff; reset after a run of 60 s.
    pub failures: u32,
    pub last_exit: Option<ExitInfo>,
    /// Why the last start failed, or why the last run never ran its command.
    pub last_error: Option<String>,
    /// When the current (or the last) run started.
    pub started_at: Option<SystemTime>,
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
    pub history: History,
    pub pid: Option<i32>,
    /// Increases with every spawn, so an exit of an earlier run is recognised.
    pub generation: u64,
    /// The node-unique id of the current (or the last) run, see [`new_incarnation`]; 0
    /// before the first spawn.
    pub incarnation: u64,
}

/// A fresh incarnation id: 64 random bits (never 0). Random rather than a counter so that no
/// state has to be saved before a spawn, and ids stay distinct across agent restarts, a
/// lost state directory, and a service deleted and created again under the same name.
pub fn new_incarnation() -> u64 {
    fastrand::u64(1..)
}

/// The incarnation id of a run recorded before incarnations existed: derived from what
/// identifies its process on this node (boot, PID, start time), so every agent run that
/// adopts it derives the same id.
pub fn derived_incarnation(boot_id: &str, pid: i32, start_time: u64) -> u64 {
    // FNV-1a: stable across releases and platforms (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = boot_id
        .bytes()
        .chain(pid.to_le_bytes())
        .chain(start_time.to_le_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
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
            history: History::default(),
            pid: None,
            generation: 0,
            incarnation: 0,
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
                self.history.started_at = Some(ctx.wall);
                self.history.last_error = None;
                vec![]
            }
            (S::Pending, Event::StartFailed { error }) => {
                self.history.last_error = Some(error);
                self.back_off(ctx);
                vec![]
            }
            (S::Running { since }, Event::Exited(exit)) => self.ended_running(since, exit, ctx),
            (S::Running { .. }, Event::StopRequested(reason)) => {
                self.state = S::Stopping {
                    reason,
                    deadline: ctx.now + self.spec.stop.grace,
                    killed: false,
                };
                vec![Effect::Signal(reason)]
            }
            (S::Stopping { reason, .. }, Event::GraceExpired) => {
                self.state = S::Stopping {
                    reason,
                    deadline: ctx.now + KILL_RETRY,
                    killed: true,
                };
                vec![Effect::KillAll]
            }
            (S::Stopping { reason, .. }, Event::StopRequested(new)) => {
                // A stronger reason wins (a replaced instance whose service is then deleted
                // is not started again); the grace period keeps running.
                if let S::Stopping { reason: r, .. } = &mut self.state
                    && new.outranks(reason)
                {
                    *r = new;
                }
                vec![]
            }
            (S::Stopping { reason, .. }, Event::Exited(exit)) => {
                self.ended_stopping(reason, exit, ctx)
            }
            (S::Backoff { .. }, Event::BackoffElapsed) => {
                self.state = S::Pending;
                vec![Effect::Spawn]
            }
            // Nothing runs: removed at once (and nothing to fail a health check).
            (S::Pending | S::Backoff { .. } | S::Exited, Event::StopRequested(reason))
                if reason.removes() =>
            {
                self.state = S::Removing;
                vec![Effect::Cleanup]
            }
            (S::Removing, Event::CleanupDone) => {
                self.state = S::Gone;
                vec![Effect::Forget]
            }
            _ => vec![],
        }
    }

    /// Wait before the next start: the delay grows with the failures in a row.
    fn back_off(&mut self, ctx: &Ctx) {
        let delay = backoff_delay(&self.spec.restart, self.history.failures, ctx.jitter);
        self.history.failures = self.history.failures.saturating_add(1);
        self.state = State::Backoff {
            until: ctx.now + delay,
        };
    }

    /// A running instance ended on its own: restarted or kept down by its policy.
    fn ended_running(&mut self, since: Instant, exit: ExitInfo, ctx: &Ctx) -> Vec<Effect> {
        self.pid = None;
        if ctx.now.saturating_duration_since(since) >= BACKOFF_RESET_AFTER {
            self.history.failures = 0;
        }
        let restart = should_restart(self.spec.restart.policy, &exit);
        self.history.last_error = exit.setup_error.clone();
        self.history.last_exit = Some(exit);
        if restart {
            self.history.restarts = self.history.restarts.saturating_add(1);
            self.back_off(ctx);
        } else {
            self.state = State::Exited;
        }
        vec![Effect::KillAll]
    }

    /// An instance asked to stop ended: replaced after a health failure, else removed.
    fn ended_stopping(&mut self, reason: StopReason, mut exit: ExitInfo, ctx: &Ctx) -> Vec<Effect> {
        self.pid = None;
        self.history.last_error = exit.setup_error.clone();
        if reason == StopReason::Unhealthy {
            exit.class = ExitClass::HealthFailed;
        }
        self.history.last_exit = Some(exit);
        if reason.removes() {
            self.state = State::Removing;
            return vec![Effect::Cleanup];
        }
        self.history.restarts = self.history.restarts.saturating_add(1);
        self.back_off(ctx);
        vec![Effect::KillAll]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ExitRecord;

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
            output: None,
        }
    }

    fn running(policy: &str, t0: Instant) -> Instance {
        let mut i = Instance::new(0, "web-0".into(), spec(policy), 1);
        i.handle(Event::Started { pid: 7 }, &ctx(t0));
        i
    }

    /// Every row of the table above, and stale events that change nothing: the events that
    /// bring a fresh slot to its state first, then the event under test.
    #[test]
    fn transition_table() {
        use Effect::{Cleanup, Forget, KillAll, Signal, Spawn};
        use StopReason::{Delete, Retire, ScaleDown};
        let up = || Event::Started { pid: 1 };
        let failed = || Event::StartFailed { error: "x".into() };
        let ended = |class| Event::Exited(exit(class));
        let stop = Event::StopRequested;
        #[rustfmt::skip]
        let cases = [
            ("start ok", "always", vec![], up(), Phase::Running, vec![]),
            ("start failed", "always", vec![], failed(), Phase::Backoff, vec![]),
            ("crash restarts", "always", vec![up()], ended(ExitClass::Exited(1)), Phase::Backoff, vec![KillAll]),
            ("on-failure keeps a success down", "on-failure", vec![up()], ended(ExitClass::Exited(0)), Phase::Exited, vec![KillAll]),
            ("on-failure restarts an oom kill", "on-failure", vec![up()], ended(ExitClass::OomKilled), Phase::Backoff, vec![KillAll]),
            ("never keeps a crash down", "never", vec![up()], ended(ExitClass::Signaled(9)), Phase::Exited, vec![KillAll]),
            ("stop signals", "always", vec![up()], stop(ScaleDown), Phase::Stopping, vec![Signal(ScaleDown)]),
            ("grace expiry kills", "always", vec![up(), stop(Delete)], Event::GraceExpired, Phase::Stopping, vec![KillAll]),
            ("stopped for scale-down is removed", "always", vec![up(), stop(ScaleDown)], ended(ExitClass::Exited(0)), Phase::Removing, vec![Cleanup]),
            ("stopped for a rollout is removed", "always", vec![up(), stop(Retire)], ended(ExitClass::Exited(0)), Phase::Removing, vec![Cleanup]),
            ("backoff elapses", "always", vec![failed()], Event::BackoffElapsed, Phase::Pending, vec![Spawn]),
            ("backoff slot deleted", "always", vec![failed()], stop(Delete), Phase::Removing, vec![Cleanup]),
            ("exited slot retired", "never", vec![up(), ended(ExitClass::Exited(0))], stop(Retire), Phase::Removing, vec![Cleanup]),
            ("cleanup done", "always", vec![stop(Delete)], Event::CleanupDone, Phase::Gone, vec![Forget]),
            ("stale exit while pending is ignored", "always", vec![], ended(ExitClass::Exited(1)), Phase::Pending, vec![]),
            ("stale grace expiry while running is ignored", "always", vec![up()], Event::GraceExpired, Phase::Running, vec![]),
        ];
        let t0 = Instant::now();
        for (name, policy, before, event, want_phase, want_effects) in cases {
            let mut i = Instance::new(0, "web-0".into(), spec(policy), 1);
            for e in before {
                i.handle(e, &ctx(t0));
            }
            let effects = i.handle(event, &ctx(t0 + Duration::from_secs(1)));
            assert_eq!(i.state.phase(), want_phase, "{name}");
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
        assert_eq!(i.history.restarts, 6);
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

    fn end(record: Option<(Option<i32>, Option<i32>)>, status: ProcessStatus) -> ProcessEnd {
        ProcessEnd {
            exit: InitExit {
                status,
                record: record.map(|(code, signal)| ExitRecord {
                    code,
                    signal,
                    ..ExitRecord::default()
                }),
                spawn_error: None,
            },
            oom_kills: 0,
            killed_after_grace: false,
        }
    }

    #[test]
    fn classification() {
        use ExitClass::*;
        use ProcessStatus::{Exited as Code, Signaled as Sig, Unknown};
        let (none, kill) = (None, Some(libc::SIGKILL));
        // The service's own end as its init recorded it, the init's status, OOM kills counted
        // in the run, SIGKILL after the grace period: the class.
        #[rustfmt::skip]
        let cases = [
            (Some((Some(3), none)), Code(3), 0, false, Exited(3)),
            (Some((none, kill)), Code(137), 0, false, Signaled(9)),
            (Some((none, kill)), Code(137), 1, false, OomKilled),
            // A SIGKILL with no OOM counted is not an OOM kill.
            (None, Sig(9), 0, false, Signaled(9)),
            // The init itself OOM-killed: no record, but the counter moved.
            (None, Sig(9), 2, false, OomKilled),
            // An OOM kill of a helper process while the service exits normally.
            (Some((Some(1), none)), Code(1), 1, false, Exited(1)),
            (None, Sig(9), 1, true, StopTimeout),
            (Some((none, Some(15))), Code(143), 0, false, Signaled(15)),
            (Some((none, none)), Code(0), 0, false, Lost),
            // Adopted instances (not our child): the record tells, else the cgroup, else lost.
            (Some((Some(3), none)), Unknown, 0, false, Exited(3)),
            (Some((none, kill)), Unknown, 1, false, OomKilled),
            (None, Unknown, 1, false, OomKilled),
            (None, Unknown, 0, false, Lost),
            (None, Unknown, 0, true, StopTimeout),
        ];
        for (record, status, oom_kills, killed_after_grace, want) in cases {
            let e = ProcessEnd {
                oom_kills,
                killed_after_grace,
                ..end(record, status)
            };
            assert_eq!(e.class(), want, "{e:?}");
        }
    }

    /// What is said besides the class: why the command never ran (a failed spawn, then the
    /// init's record), and why the end was not seen, for a lost end only.
    #[test]
    fn the_detail_of_an_end() {
        let at = SystemTime::UNIX_EPOCH;
        let why = || Some("left no record".to_string());
        let mut failed = end(Some((Some(127), None)), ProcessStatus::Exited(127));
        if let Some(r) = failed.exit.record.as_mut() {
            r.setup_error = Some("exec: no such file".into());
        }
        assert_eq!(
            failed.info(at, why()).setup_error.as_deref(),
            Some("exec: no such file")
        );
        failed.exit.spawn_error = Some("joining the cgroup".into());
        assert_eq!(
            failed.info(at, why()).setup_error.as_deref(),
            Some("joining the cgroup")
        );
        let lost = end(None, ProcessStatus::Unknown).info(at, why());
        assert_eq!(
            (lost.class, lost.setup_error.as_deref()),
            (ExitClass::Lost, Some("left no record"))
        );
        let plain = end(None, ProcessStatus::Signaled(15)).info(at, why());
        assert_eq!(
            (plain.class, plain.setup_error),
            (ExitClass::Signaled(15), None)
        );
    }

    #[test]
    fn code_and_signal_of_each_class() {
        let kill = Some(libc::SIGKILL);
        for (class, want) in [
            (ExitClass::Exited(3), (Some(3), None)),
            (ExitClass::Signaled(15), (None, Some(15))),
            (ExitClass::OomKilled, (None, kill)),
            (ExitClass::StopTimeout, (None, kill)),
            (ExitClass::HealthFailed, (None, None)),
            (ExitClass::Lost, (None, None)),
        ] {
            assert_eq!(class.code_and_signal(), want, "{class}");
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
