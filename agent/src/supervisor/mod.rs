//! The supervisor: keeps every service's desired instances running. One task owns all state
//! ([`Driver`]); the API talks to it through a [`SupervisorHandle`], one typed method per
//! operation, each answered with its own outcome or a [`SupervisorError`].
//!
//! Its logic is pure and tested on its own: [`instance`] (one slot's lifecycle as a transition
//! table, how a run ended, backoff) and [`reconcile`] (desired + observed -> events); the
//! rollout planner is [`crate::rollout`]. It reaches the OS only through the runtime's seams
//! (`Processes`, `InstanceFiles`, `SocketBroker`), `CgroupBackend` and `Store`.
//!
//! Imports from the crate: `spec`, `rollout`, `health`, `events`, `metrics::instruments`, and
//! the traits of `runtime`, `cgroups`, `store`.

pub mod capacity;
pub mod desired;
mod driver;
mod handle;
pub mod instance;
pub mod reconcile;
pub mod run;
pub mod sample;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::cgroups::CgroupStats;
use crate::events::PackagePhase;
use crate::health::{HealthState, ServiceHealth};
use crate::rollout::record::Rollout;
use crate::spec::{FieldError, InstanceKey, ListenAddr, ServiceSpec, SpecError};
use crate::store::StoreError;

pub use desired::ApplyKind;
pub use driver::{BatchItem, CpuWeights, Deps, Driver};
pub use handle::SupervisorHandle;
pub use instance::{ExitClass, ExitInfo, Phase};
pub use run::{Outcome, Run, Trigger};

/// Who a service's desired state belongs to. The source that created it owns it: a change
/// from the other source is refused (the local API may force one through).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// Applied through this node's API (or its `--services` directory).
    #[default]
    Local,
    /// Given to this node in etcd (the fleet).
    Etcd,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Local => "local",
            Owner::Etcd => "etcd",
        }
    }
}

/// What `Apply` did (or, as a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub name: String,
    pub revision: u64,
    pub kind: ApplyKind,
    pub changes: Vec<String>,
    pub replaces_instances: bool,
    /// The rollout that replaces the instances, when one was started.
    pub rollout_id: Option<String>,
    /// The service's generation after the apply (as a dry run: what it would be).
    pub generation: u64,
}

/// A rollout started by `Restart` or `Rollback`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutStarted {
    pub name: String,
    /// The revision the service now targets.
    pub revision: u64,
    pub rollout_id: String,
    /// The service's generation after the call.
    pub generation: u64,
}

/// A service deleted: every instance stopped, its cgroups removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub name: String,
    /// Instances that were running when the delete began.
    pub stopped: u32,
    /// The generation the service had when it was deleted.
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    pub name: String,
    pub previous: u32,
    pub replicas: u32,
    /// The service's generation after the scale.
    pub generation: u64,
}

/// A signal delivered to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signaled {
    pub instance: InstanceKey,
    /// The process that got it (the service's main process when known, else its init).
    pub pid: i32,
}

/// Every service's status, and the event index they reflect.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    /// By name.
    pub services: Vec<ServiceStatus>,
    /// The index of the last event the statuses reflect.
    pub event_index: u64,
}

/// Counts for the node report.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub services: u32,
    /// Instances with live processes.
    pub instances: u32,
    /// What the services commit (see [`capacity`]).
    pub committed: capacity::Amounts,
    pub capacity: Option<capacity::CapacityPolicy>,
    /// Services whose saved record was unreadable at start, each `NAME: where it was set
    /// aside: why`, until an apply repairs it.
    pub quarantined: Vec<String>,
    /// Instance records not saved yet (retried until they are).
    pub unsaved: UnsavedRecords,
}

/// Instance records the driver could not save and saves again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnsavedRecords {
    /// How many.
    pub count: u32,
    /// Since when the oldest of them has been unsaved.
    pub since: Option<SystemTime>,
    /// The last save's error.
    pub error: String,
}

/// One instance, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    pub id: String,
    pub index: u32,
    pub revision: u64,
    /// The rollout generation it was started in (see [`desired::Desired::epoch`]).
    pub epoch: u64,
    /// Its current (or last) run's id; 0 before its first start.
    pub incarnation: u64,
    pub state: Phase,
    /// The last start attempt failed (the instance is in backoff because of it).
    pub start_failed: bool,
    pub pid: Option<i32>,
    pub init_pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
    /// Usage from the cgroup, with the CPU rate in cores since the previous reading (at
    /// least half a second before; `None` until there is one).
    pub usage: Option<(CgroupStats, Option<f64>)>,
    pub started_at: Option<SystemTime>,
    pub next_start_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub cgroup: String,
    pub ports: BTreeMap<String, u16>,
    /// Output the instance's init could not write to its logs, this run.
    pub log_dropped: crate::runtime::LogStat,
    /// Unknown while not yet decided, or not running. A service without `[health]`: healthy
    /// exactly while running.
    pub health: HealthState,
    /// Why, from the last probe (empty without probes).
    pub health_reason: String,
    /// The instance's last `STATUS=` over NOTIFY_SOCKET.
    pub notify_status: String,
}

/// One service, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub revision: u64,
    pub owner: Owner,
    pub spec: Arc<ServiceSpec>,
    pub desired: u32,
    pub running: u32,
    pub healthy: u32,
    pub deleting: bool,
    /// From its instances.
    pub health: ServiceHealth,
    pub instances: Vec<InstanceStatus>,
    /// The running rollout, else the last one.
    pub rollout: Option<Rollout>,
    /// Revisions kept for rollback, oldest first.
    pub revisions: Vec<u64>,
    /// A rollout failed and was not rolled back: nothing more is replaced for now.
    pub paused: bool,
    /// See [`desired::Desired::generation`].
    pub generation: u64,
    /// The index of the last event this status reflects (the driver emits every event, so
    /// nothing after it is in this status and nothing up to it is missing).
    pub event_index: u64,
    /// The current revision's `[artifact]` or `[image]`: fetching, ready or failed.
    pub package: Option<PackageStatus>,
    /// A job with `[schedule]`: when its next run is due.
    pub next_run: Option<SystemTime>,
    /// Services with `[scale]`: the autoscaler's last look.
    pub autoscale: Option<AutoscaleStatus>,
}

/// What the autoscaler saw at its last sample of a service, and what it recommends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoscaleStatus {
    /// The count it recommends now.
    pub recommended: u32,
    /// Why: `"2 → 4: 83 connections, target 20 per instance"`.
    pub reason: String,
    /// Established connections on the service's sockets (queued ones included).
    pub connections: u32,
    /// Connections waiting in the accept queues.
    pub queued: u32,
    /// Cores its instances used since the sample before.
    pub cpu: f64,
    /// Its count is 0: the agent waits for a first connection.
    pub waiting: bool,
}

/// Where the current revision's package is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageStatus {
    pub revision: u64,
    pub url: String,
    pub phase: PackagePhase,
    /// Bytes fetched or unpacked so far, while under way.
    pub done: u64,
    pub total: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Why the supervisor refused or could not do what it was asked. Each variant carries what
/// the caller needs to act (the field, the value, the reason) and, where an OS call failed,
/// that error as its source.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    InvalidSpec(#[from] SpecError),
    #[error("replicas: {replicas} is out of range (0 to {max})")]
    ReplicasOutOfRange { replicas: u32, max: u32 },
    #[error("revision: {revision} is the current revision (to replace its instances, restart)")]
    CurrentRevision { revision: u64 },
    #[error("revision: {revision} is not kept (kept: {})", list(kept))]
    RevisionNotKept { revision: u64, kept: Vec<u64> },
    #[error("service {name:?} not found")]
    NotFound { name: String },
    #[error("rollout {id:?} not found (the last 10 of each service are kept)")]
    RolloutNotFound { id: String },
    #[error("instance {instance:?} not found")]
    InstanceNotFound { instance: String },
    #[error("{name:?} is a service, not a job (kind = \"job\" makes one)")]
    NotAJob { name: String },
    #[error(
        "{name:?} is a job: its instances start with its runs (corral run {name}, job.parallelism); \
         scale, restart and rollback are for services (apply a new spec to change it)"
    )]
    IsAJob { name: String },
    #[error("run {id:?} not found (runs are NAME-rN; a job keeps its last job.history runs)")]
    RunNotFound { id: String },
    #[error("service {name:?} has rollout {id} running ({progress})")]
    RolloutRunning {
        name: String,
        id: String,
        progress: String,
    },
    #[error(
        "service {name:?} has no kept revision below {revision} to roll back to (kept: {})",
        list(kept)
    )]
    NothingToRollBackTo {
        name: String,
        revision: u64,
        kept: Vec<u64>,
    },
    #[error(
        "service {name:?} is owned by the fleet (etcd): change it there (corral fleet apply/delete), \
         or force the change here (--force); it then lasts until etcd next changes the service"
    )]
    OwnedByFleet { name: String },
    #[error(
        "service {name:?} already runs on this node, applied through its local API: the fleet \
         does not take it over; delete it there (corral delete {name}) and write the key again, \
         or give the fleet's service another name"
    )]
    OwnedLocally { name: String },
    #[error(
        "expected_revision: service {name:?} is at generation {}, not {expected} (read it again, then decide)",
        current.map_or_else(|| "none (it does not exist)".to_string(), |c| c.to_string())
    )]
    GenerationMismatch {
        name: String,
        expected: u64,
        /// `None`: the service does not exist.
        current: Option<u64>,
    },
    #[error("{}", capacity_message(exceeded))]
    CapacityExceeded { exceeded: Vec<capacity::Exceeded> },
    #[error("service {name:?} is being deleted")]
    Deleting { name: String },
    #[error("instance {instance:?} is not running ({state})")]
    NotRunning {
        instance: String,
        state: &'static str,
    },
    /// The host cannot enforce what the spec asks for, or lacks what it needs: one reason
    /// per field, each naming it.
    #[error("{}", reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unenforceable { reasons: Vec<FieldError> },
    #[error("sockets[{index}].listen: cannot listen on {listen}: {source}")]
    Listen {
        index: usize,
        listen: ListenAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("signal {signal} to {instance}: {source}")]
    Signal {
        instance: String,
        signal: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("saving the desired state failed, nothing was applied: {source}")]
    Storage {
        #[source]
        source: StoreError,
    },
    #[error("saving the desired state failed, nothing was applied: encoding it: {source}")]
    Encoding {
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent is shutting down")]
    Unavailable,
}

/// One line per resource: what was asked, what is committed, what may be.
fn capacity_message(exceeded: &[capacity::Exceeded]) -> String {
    exceeded
        .iter()
        .map(|e| {
            let (unit, show): (&str, fn(f64) -> String) = if e.field == "resources.cpu" {
                (" cores", |v| format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string())
            } else {
                (" bytes", |v| format!("{v:.0}"))
            };
            format!(
                "{}: this service would commit {}{unit} where the others commit {}{unit} of {}{unit} this node allows (allocatable {}{unit} × overcommit {})",
                e.field,
                show(e.requested),
                show(e.committed),
                show(e.limit),
                show(e.allocatable),
                e.ratio
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `1, 2, 3`.
fn list(numbers: &[u64]) -> String {
    numbers
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
