//! A rollout's record: what it replaces with what, under which policy, how far it got and how
//! it ended. Persisted with its service, so an agent started again resumes it; reported by
//! `GetRollout`, in a service's status and in `Watch` events.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Progress;
use crate::spec::RolloutSpec;

/// Steps kept per rollout (the oldest go first).
pub const KEPT_STEPS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An apply of a changed spec.
    Update,
    /// `Restart`: the same spec, fresh instances.
    Restart,
    /// `Rollback` to a kept revision.
    Rollback,
    /// Started by the agent when a rollout failed.
    AutoRollback,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Update => "update",
            Kind::Restart => "restart",
            Kind::Rollback => "rollback",
            Kind::AutoRollback => "auto_rollback",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Succeeded,
    Failed,
    /// Another rollout of the service was asked for with `force`.
    Superseded,
    /// The service was deleted.
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Superseded => "superseded",
            State::Cancelled => "cancelled",
        }
    }
}

/// What happened in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// It began: what it replaces with what.
    Planned,
    /// A new instance was started.
    Started,
    /// A new instance has been healthy for `min_healthy`.
    Ready,
    /// An old instance was asked to stop.
    Stopping,
    /// An old instance is gone.
    Stopped,
    /// The agent started again and the rollout goes on.
    Resumed,
    /// It ended, as [`State`] says.
    Succeeded,
    Failed,
    Superseded,
    Cancelled,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Planned => "planned",
            Step::Started => "started",
            Step::Ready => "ready",
            Step::Stopping => "stopping",
            Step::Stopped => "stopped",
            Step::Resumed => "resumed",
            Step::Succeeded => "succeeded",
            Step::Failed => "failed",
            Step::Superseded => "superseded",
            Step::Cancelled => "cancelled",
        }
    }

    /// The step that ends a rollout in `state`; `None` for `Running`, which ends nothing.
    pub fn ending_in(state: State) -> Option<Step> {
        match state {
            State::Running => None,
            State::Succeeded => Some(Step::Succeeded),
            State::Failed => Some(Step::Failed),
            State::Superseded => Some(Step::Superseded),
            State::Cancelled => Some(Step::Cancelled),
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy a rollout runs with, as it was when it started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_healthy_ms: u64,
    pub healthy_deadline_ms: u64,
    pub auto_rollback: bool,
    /// `rollout.start_cpu`; absent in records of earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cpu: Option<f64>,
}

impl PolicyRecord {
    pub fn of(r: &RolloutSpec) -> PolicyRecord {
        PolicyRecord {
            max_surge: r.max_surge,
            max_unavailable: r.max_unavailable,
            min_healthy_ms: crate::num::millis(r.min_healthy),
            healthy_deadline_ms: crate::num::millis(r.healthy_deadline),
            auto_rollback: r.auto_rollback,
            start_cpu: r.start_cpu,
        }
    }

    pub fn min_healthy(&self) -> Duration {
        Duration::from_millis(self.min_healthy_ms)
    }

    pub fn healthy_deadline(&self) -> Duration {
        Duration::from_millis(self.healthy_deadline_ms)
    }
}

/// One thing that happened in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub time: SystemTime,
    pub step: Step,
    /// The instance it is about (empty when none).
    pub instance: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `<service>-r<n>`.
    pub id: String,
    pub service: String,
    pub kind: Kind,
    pub state: State,
    pub from_revision: u64,
    pub from_epoch: u64,
    pub to_revision: u64,
    pub to_epoch: u64,
    /// The instances it ends with.
    pub replicas: u32,
    /// Old instances at its start, and those of them stopped so far.
    pub to_replace: u32,
    pub replaced: u32,
    /// The counts as of the last step.
    #[serde(default)]
    pub progress: ProgressRecord,
    pub policy: PolicyRecord,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// Why it failed, was superseded or cancelled.
    #[serde(default)]
    pub reason: String,
    /// The rollback started when it failed.
    #[serde(default)]
    pub rollback_id: String,
    /// For an auto-rollback: the rollout whose failure started it.
    #[serde(default)]
    pub rollback_of: String,
    #[serde(default)]
    pub steps: Vec<StepRecord>,
    /// New instances it started, by id: their failing fails it.
    #[serde(default)]
    pub started_ids: BTreeSet<String>,
    /// New instances already reported ready, by id.
    #[serde(default)]
    pub ready_ids: BTreeSet<String>,
    /// Old instances asked to stop and not yet gone, by id.
    #[serde(default)]
    pub stopping_ids: BTreeSet<String>,
}

/// [`Progress`] as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub new: u32,
    pub ready: u32,
    pub old: u32,
    pub available: u32,
}

impl From<Progress> for ProgressRecord {
    fn from(p: Progress) -> ProgressRecord {
        ProgressRecord {
            new: p.new,
            ready: p.new_ready,
            old: p.old,
            available: p.available,
        }
    }
}

impl Rollout {
    pub fn is_running(&self) -> bool {
        self.state == State::Running
    }

    /// Add a step (the oldest are dropped beyond [`KEPT_STEPS`]).
    pub fn step(&mut self, time: SystemTime, step: Step, instance: &str, message: String) {
        if self.steps.len() >= KEPT_STEPS {
            self.steps.remove(0);
        }
        self.steps.push(StepRecord {
            time,
            step,
            instance: instance.to_string(),
            message,
        });
    }

    /// End it: `state` with `reason`, at `time`.
    pub fn finish(&mut self, state: State, reason: &str, time: SystemTime) {
        self.state = state;
        self.reason = reason.to_string();
        self.finished_at = Some(time);
        self.stopping_ids.clear();
        if let Some(step) = Step::ending_in(state) {
            self.step(time, step, "", reason.to_string());
        }
    }

    /// `2/4 replaced, 3 new (2 ready), 4 available`.
    pub fn progress_line(&self) -> String {
        format!(
            "{}/{} replaced, {} new ({} ready), {} available",
            self.replaced.min(self.to_replace),
            self.to_replace,
            self.progress.new,
            self.progress.ready,
            self.progress.available
        )
    }
}
