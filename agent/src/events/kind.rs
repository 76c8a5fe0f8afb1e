//! What can happen to a service or an instance: the vocabulary of the event log. The serde
//! form (`{"type": "instance_started", "pid": 1234, "revision": 2}`) is what is persisted, so
//! variants and fields may be added but never renamed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One state change. Strings that name a state (`end`, `from`/`to`, `via`) use the agent's
/// own words, as the status report shows them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A spec was applied. `outcome`: `created`, `updated` or `scaled`; `changes`: what
    /// differs from the previous revision, one line each.
    Applied {
        revision: u64,
        outcome: String,
        changes: Vec<String>,
    },
    /// The service was deleted (its instances are stopped and its cgroups removed).
    Deleted,
    /// The desired instance count changed.
    Scaled { from: u32, to: u32 },
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
        end: String,
        code: Option<i32>,
        signal: Option<i32>,
        detail: Option<String>,
    },
    /// An instance will be started again after `delay_ms`; `attempt` counts from 1.
    RestartScheduled { delay_ms: u64, attempt: u32 },
    /// An instance is being stopped: `signal` was sent for `reason`.
    Stopping { reason: String, signal: String },
    /// An instance did not stop within its grace period and got SIGKILL.
    Killed { reason: String },
    /// An instance's health changed; states are `unknown`, `healthy`, `unhealthy`.
    HealthChanged {
        from: String,
        to: String,
        reason: String,
    },
    /// An instance became ready, `via` a passing `probe` or a `notify` (`READY=1`).
    Ready { via: String },
    /// The kernel OOM-killed a process inside an instance that keeps running; `count` is the
    /// instance's OOM kills so far (its cgroup's `oom_kill` counter).
    OomKill { count: u64 },
    /// An instance left running by an earlier agent run was taken over.
    Adopted { pid: i32 },
    /// Not written by this release: an instance whose end could not be observed is an
    /// `instance_exited` with end `lost` and the reason in `detail`. Kept so that event logs of
    /// earlier releases still read.
    Lost { reason: String },
    /// A rollout began: `kind` (update, restart, rollback, auto_rollback) from one revision
    /// to another, replacing `to_replace` instances within `max_surge` / `max_unavailable`.
    RolloutStarted {
        rollout: String,
        kind: String,
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
        step: String,
        message: String,
        replaced: u32,
        to_replace: u32,
        new: u32,
        ready: u32,
        old: u32,
        available: u32,
    },
    /// A rollout ended: `state` is succeeded, failed, superseded or cancelled; `rollback` names
    /// the rollback a failure started.
    RolloutFinished {
        rollout: String,
        state: String,
        reason: String,
        rollback: Option<String>,
    },
}

impl EventKind {
    /// The serde tag: `instance_started`, `health_changed` …
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Applied { .. } => "applied",
            EventKind::Deleted => "deleted",
            EventKind::Scaled { .. } => "scaled",
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
            EventKind::Lost { .. } => "lost",
            EventKind::RolloutStarted { .. } => "rollout_started",
            EventKind::RolloutStep { .. } => "rollout_step",
            EventKind::RolloutFinished { .. } => "rollout_finished",
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
            EventKind::InstanceStarted { pid, revision } => {
                format!("started as pid {pid} (revision {revision})")
            }
            EventKind::StartFailed { error } => format!("start failed: {error}"),
            EventKind::InstanceExited { end, detail, .. } => match detail {
                Some(detail) => format!("{end}: {detail}"),
                None => end.clone(),
            },
            EventKind::RestartScheduled { delay_ms, attempt } => format!(
                "restart #{attempt} in {}",
                humantime::format_duration(Duration::from_millis(*delay_ms))
            ),
            EventKind::Stopping { reason, signal } => format!("stopping ({reason}): {signal}"),
            EventKind::Killed { reason } => {
                format!("killed with SIGKILL after the grace period ({reason})")
            }
            EventKind::HealthChanged { from, to, reason } => {
                format!("health {from} -> {to}: {reason}")
            }
            EventKind::Ready { via } => format!("ready (via {via})"),
            EventKind::OomKill { count } => {
                format!("OOM kill inside the running instance ({count} so far)")
            }
            EventKind::Adopted { pid } => format!("adopted pid {pid} from an earlier agent run"),
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
                "rollout {rollout} started ({kind}, revision {from_revision} -> {to_revision}): \
                 {to_replace} to replace, max_surge {max_surge}, max_unavailable {max_unavailable}"
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
                let mut line = format!("rollout {rollout} {state}");
                if !reason.is_empty() {
                    line.push_str(&format!(": {reason}"));
                }
                if let Some(r) = rollback {
                    line.push_str(&format!("; rolling back ({r})"));
                }
                line
            }
        }
    }
}
