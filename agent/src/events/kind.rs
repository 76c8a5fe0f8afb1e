//! What can happen to a service or an instance: the vocabulary of the event log. The serde
//! form (`{"type": "instance_started", "pid": 1234, "revision": 2}`) is what is persisted, so
//! variants and fields may be added but never renamed. States are the domain's own enums,
//! written as the words the status report uses (`"healthy"`, `"scale-down"`, `"exited(3)"`),
//! so logs written before they were typed read the same.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::health::HealthState;
use crate::rollout::record::{Kind as RolloutKind, State as RolloutState, Step};
use crate::supervisor::desired::ApplyKind;
use crate::supervisor::instance::{ExitClass, StopReason};
use crate::supervisor::run::{Outcome, Trigger};

/// How an instance became ready.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReadyVia {
    /// Its health probe passed for the first time.
    Probe,
    /// It sent `READY=1` on its NOTIFY_SOCKET.
    Notify,
}

impl ReadyVia {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyVia::Probe => "probe",
            ReadyVia::Notify => "notify",
        }
    }
}

/// One state change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A spec was applied (never `unchanged`); `changes`: what differs from the previous
    /// revision, one line each.
    Applied {
        revision: u64,
        outcome: ApplyKind,
        changes: Vec<String>,
    },
    /// The service was deleted (its instances are stopped and its cgroups removed).
    Deleted,
    /// The desired instance count changed.
    Scaled { from: u32, to: u32 },
    /// The autoscaler changed the desired instance count; `reason` says why (`"2 → 4: 83
    /// connections, target 20 per instance"`).
    Autoscaled { from: u32, to: u32, reason: String },
    /// An instance's process is running.
    InstanceStarted { pid: i32, revision: u64 },
    /// An instance could not be started.
    StartFailed { error: String },
    /// An instance's process ended. `end` is the exit class as status shows it: `exited(3)`,
    /// `signaled(15)`, `oom_killed`, `stop_timeout`, `health_failed`, `lost`; `code` and
    /// `signal` are its exit code or the signal that ended it (SIGKILL for `oom_killed` and
    /// `stop_timeout`); `detail` says more when there is more to say (why it never ran its
    /// command, why its end could not be observed).
    InstanceExited {
        #[serde(with = "exit_class_text")]
        end: ExitClass,
        code: Option<i32>,
        signal: Option<i32>,
        detail: Option<String>,
    },
    /// An instance will be started again after `delay_ms`; `attempt` counts from 1.
    RestartScheduled { delay_ms: u64, attempt: u32 },
    /// An instance is being stopped: `signal` (its name) was sent for `reason`.
    Stopping { reason: StopReason, signal: String },
    /// An instance did not stop within its grace period and got SIGKILL.
    Killed { reason: String },
    /// An instance's health changed, for `reason` (the outcome that decided it).
    HealthChanged {
        from: HealthState,
        to: HealthState,
        reason: String,
    },
    /// An instance became ready.
    Ready { via: ReadyVia },
    /// The kernel OOM-killed a process inside an instance that keeps running; `count` is the
    /// instance's OOM kills so far (its cgroup's `oom_kill` counter).
    OomKill { count: u64 },
    /// An instance left running by an earlier agent run was taken over.
    Adopted { pid: i32 },
    /// The service's saved record could not be read at start: `record` says where it was
    /// set aside, `reason` why. Its instances run on untouched until an apply repairs it.
    RecordQuarantined { record: String, reason: String },
    /// An instance's record could not be saved (`error`: why, e.g. the disk is full): it is
    /// retried until it is; until then an agent restart could not take the instance over.
    RecordUnsaved { error: String },
    /// Not written by this release: an instance whose end could not be observed is an
    /// `instance_exited` with end `lost` and the reason in `detail`. Kept so that event logs of
    /// earlier releases still read.
    Lost { reason: String },
    /// A rollout began from one revision to another, replacing `to_replace` instances within
    /// `max_surge` / `max_unavailable`.
    RolloutStarted {
        rollout: String,
        kind: RolloutKind,
        from_revision: u64,
        to_revision: u64,
        to_replace: u32,
        replicas: u32,
        max_surge: u32,
        max_unavailable: u32,
    },
    /// A step of a rollout (`started`, `ready`, `stopping`, `stopped`, `resumed`), with the
    /// counts right after it: instances `new` and `old` present, new ones `ready`, and
    /// `available` (ready new plus healthy old).
    RolloutStep {
        rollout: String,
        step: Step,
        message: String,
        replaced: u32,
        to_replace: u32,
        new: u32,
        ready: u32,
        old: u32,
        available: u32,
    },
    /// A rollout ended (`state` is never `running`); `rollback` names the rollback a failure
    /// started.
    RolloutFinished {
        rollout: String,
        state: RolloutState,
        reason: String,
        rollback: Option<String>,
    },
    /// A revision's `[artifact]` or `[image]` being made ready: `phase` `fetching` or
    /// `unpacking` with bytes `done` of `total` (when known), then `ready`, or `failed` with
    /// the reason in `detail` (the URL, expected and actual digest, the bad entry).
    Package {
        revision: u64,
        phase: PackagePhase,
        url: String,
        done: u64,
        total: Option<u64>,
        detail: Option<String>,
    },
    /// A job's run started (`trigger`: manual, schedule, catch_up; `due`: when a scheduled
    /// run was due, RFC 3339).
    RunStarted {
        run: String,
        trigger: Trigger,
        due: Option<String>,
    },
    /// A job's run ended: `outcome` (`succeeded`, `failed(exit 3)`, `oom_killed`,
    /// `timed_out`, `cancelled`) after `attempts` attempts over its instances.
    RunFinished {
        run: String,
        outcome: Outcome,
        attempts: u32,
    },
    /// A scheduled run due at `due` was not started, for `reason`: `running` still ran
    /// (`concurrency = "forbid"`), or it was missed while the agent was down, longer ago than
    /// `catch_up`.
    RunSkipped {
        due: String,
        running: Vec<String>,
        reason: String,
    },
}

/// Where a revision's package is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PackagePhase {
    /// Downloading (or reading) it.
    Fetching,
    /// Unpacking it.
    Unpacking,
    /// In the store, ready for instances.
    Ready,
    /// It could not be fetched, verified or unpacked.
    Failed,
}

impl PackagePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PackagePhase::Fetching => "fetching",
            PackagePhase::Unpacking => "unpacking",
            PackagePhase::Ready => "ready",
            PackagePhase::Failed => "failed",
        }
    }
}

impl EventKind {
    /// The serde tag: `instance_started`, `health_changed` …
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Applied { .. } => "applied",
            EventKind::Deleted => "deleted",
            EventKind::Scaled { .. } => "scaled",
            EventKind::Autoscaled { .. } => "autoscaled",
            EventKind::InstanceStarted { .. } => "instance_started",
            EventKind::StartFailed { .. } => "start_failed",
            EventKind::InstanceExited { .. } => "instance_exited",
            EventKind::RestartScheduled { .. } => "restart_scheduled",
            EventKind::Stopping { .. } => "stopping",
            EventKind::Killed { .. } => "killed",
            EventKind::HealthChanged { .. } => "health_changed",
            EventKind::Ready { .. } => "ready",
            EventKind::OomKill { .. } => "oom_kill",
            EventKind::Adopted { .. } => "adopted",
            EventKind::RecordQuarantined { .. } => "record_quarantined",
            EventKind::RecordUnsaved { .. } => "record_unsaved",
            EventKind::Lost { .. } => "lost",
            EventKind::RolloutStarted { .. } => "rollout_started",
            EventKind::RolloutStep { .. } => "rollout_step",
            EventKind::RolloutFinished { .. } => "rollout_finished",
            EventKind::Package { .. } => "package",
            EventKind::RunStarted { .. } => "run_started",
            EventKind::RunFinished { .. } => "run_finished",
            EventKind::RunSkipped { .. } => "run_skipped",
        }
    }

    /// One line for people: `exited(3): segfault in main`, `health healthy -> unhealthy: …`.
    pub fn summary(&self) -> String {
        match self {
            EventKind::Applied {
                revision,
                outcome,
                changes,
            } => {
                let outcome = outcome.as_str();
                if changes.is_empty() {
                    format!("revision {revision} applied ({outcome})")
                } else {
                    format!(
                        "revision {revision} applied ({outcome}): {}",
                        changes.join(", ")
                    )
                }
            }
            EventKind::Deleted => "deleted".to_owned(),
            EventKind::Scaled { from, to } => format!("scaled from {from} to {to}"),
            EventKind::Autoscaled { reason, .. } => format!("autoscaled {reason}"),
            EventKind::InstanceStarted { pid, revision } => {
                format!("started as pid {pid} (revision {revision})")
            }
            EventKind::StartFailed { error } => format!("start failed: {error}"),
            EventKind::InstanceExited { end, detail, .. } => match detail {
                Some(detail) => format!("{end}: {detail}"),
                None => end.to_string(),
            },
            EventKind::RestartScheduled { delay_ms, attempt } => format!(
                "restart #{attempt} in {}",
                humantime::format_duration(Duration::from_millis(*delay_ms))
            ),
            EventKind::Stopping { reason, signal } => {
                format!("stopping ({}): {signal}", reason.as_str())
            }
            EventKind::Killed { reason } => {
                format!("killed with SIGKILL after the grace period ({reason})")
            }
            EventKind::HealthChanged { from, to, reason } => {
                format!("health {from} -> {to}: {reason}")
            }
            EventKind::Ready { via } => format!("ready (via {})", via.as_str()),
            EventKind::OomKill { count } => {
                format!("OOM kill inside the running instance ({count} so far)")
            }
            EventKind::Adopted { pid } => format!("adopted pid {pid} from an earlier agent run"),
            EventKind::RecordQuarantined { record, reason } => {
                format!(
                    "saved record unreadable ({reason}): {record}; instances left as they are until an apply"
                )
            }
            EventKind::RecordUnsaved { error } => {
                format!("the instance's record could not be saved ({error}); retrying")
            }
            EventKind::Lost { reason } => format!("lost: {reason}"),
            EventKind::RolloutStarted {
                rollout,
                kind,
                from_revision,
                to_revision,
                to_replace,
                max_surge,
                max_unavailable,
                ..
            } => format!(
                "rollout {rollout} started ({}, revision {from_revision} -> {to_revision}): \
                 {to_replace} to replace, max_surge {max_surge}, max_unavailable {max_unavailable}",
                kind.as_str()
            ),
            EventKind::RolloutStep {
                rollout,
                step,
                message,
                replaced,
                to_replace,
                new,
                ready,
                available,
                ..
            } => {
                let counts = format!(
                    "{replaced}/{to_replace} replaced, {new} new ({ready} ready), {available} available"
                );
                if message.is_empty() {
                    format!("rollout {rollout} {step}: {counts}")
                } else {
                    format!("rollout {rollout} {step}: {message} ({counts})")
                }
            }
            EventKind::RolloutFinished {
                rollout,
                state,
                reason,
                rollback,
            } => {
                let mut line = format!("rollout {rollout} {}", state.as_str());
                if !reason.is_empty() {
                    line.push_str(&format!(": {reason}"));
                }
                if let Some(r) = rollback {
                    line.push_str(&format!("; rolling back ({r})"));
                }
                line
            }
            EventKind::Package {
                revision,
                phase,
                url,
                done,
                total,
                detail,
            } => {
                let mut line = format!("revision {revision} package {url} {}", phase.as_str());
                match (phase, total) {
                    (PackagePhase::Failed, _) => {}
                    (_, Some(total)) => line.push_str(&format!(" ({done} of {total} bytes)")),
                    (_, None) => line.push_str(&format!(" ({done} bytes)")),
                }
                if let Some(detail) = detail {
                    line.push_str(&format!(": {detail}"));
                }
                line
            }
            EventKind::RunStarted { run, trigger, due } => match due {
                Some(due) => format!("run {run} started ({}, due {due})", trigger.as_str()),
                None => format!("run {run} started ({})", trigger.as_str()),
            },
            EventKind::RunFinished {
                run,
                outcome,
                attempts,
            } => format!("run {run} {outcome} after {attempts} attempt(s)"),
            EventKind::RunSkipped {
                due,
                running,
                reason,
            } => {
                if running.is_empty() {
                    format!("run due {due} skipped: {reason}")
                } else {
                    format!("run due {due} skipped: {reason} ({})", running.join(", "))
                }
            }
        }
    }
}

/// An exit class in the event log: the text status shows (`exited(3)`), not the tagged form
/// instance records use.
mod exit_class_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::supervisor::instance::ExitClass;

    pub fn serialize<S: Serializer>(class: &ExitClass, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(class)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ExitClass, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}
