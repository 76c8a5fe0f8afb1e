//! The supervisor: keeps every service's desired instances running. One task owns all state
//! ([`driver::Driver`]); the API talks to it through a [`SupervisorHandle`] with the
//! operations of [`Operation`], and gets an [`Outcome`] or a [`SupervisorError`] back.
//!
//! Its logic is pure and tested on its own: [`instance`] (one slot's lifecycle as a transition
//! table, exit classification, backoff) and [`reconcile`] (desired + observed -> events).
//! It reaches the OS only through the `Runtime`, `CgroupBackend` and `Store` traits.
//!
//! Imports from the crate: `spec`, and the traits of `runtime`, `cgroups`, `store`.

pub mod desired;
pub mod driver;
pub mod instance;
pub mod reconcile;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use crate::cgroups::CgroupStats;
use crate::rollout::record::Rollout;
use crate::spec::{ServiceSpec, SpecError};

pub use driver::{Deps, Driver};
pub use instance::{ExitClass, ExitInfo};

/// Everything the supervisor can be asked to do.
#[derive(Debug)]
pub enum Operation {
    /// Create or update a service (`dry_run`: only say what would happen; `force`: supersede
    /// a running rollout).
    Apply {
        spec: Box<ServiceSpec>,
        dry_run: bool,
        force: bool,
    },
    /// Replace every instance with a fresh one of the same spec, as a rollout.
    Restart {
        name: String,
        force: bool,
    },
    /// Go back to a kept revision (the previous one when `None`), as a rollout.
    Rollback {
        name: String,
        revision: Option<u64>,
        force: bool,
    },
    GetRollout {
        id: String,
    },
    /// Stop every instance of a service and remove it; answered once it is gone.
    Delete {
        name: String,
    },
    Get {
        name: String,
    },
    List,
    Scale {
        name: String,
        replicas: u32,
    },
    /// Send `signal` (a number) to the service process of one running instance.
    Signal {
        instance: String,
        signal: i32,
    },
    /// Counts for the node report.
    Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    Created,
    Updated,
    Scaled,
    Unchanged,
}

impl ApplyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyKind::Created => "created",
            ApplyKind::Updated => "updated",
            ApplyKind::Scaled => "scaled",
            ApplyKind::Unchanged => "unchanged",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub name: String,
    pub revision: u64,
    pub kind: ApplyKind,
    pub changes: Vec<String>,
    pub replaces_instances: bool,
    /// The rollout that replaces the instances, when one was started.
    pub rollout_id: Option<String>,
}

/// One instance, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    pub id: String,
    pub index: u32,
    pub revision: u64,
    /// The rollout generation it was started in (see [`desired::Desired::epoch`]).
    pub epoch: u64,
    /// running, stopping, backoff, exited, pending, removing
    pub state: &'static str,
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
    /// `healthy`, `unhealthy` or `unknown` (not yet decided, or not running). A service
    /// without `[health]`: healthy exactly while running.
    pub health: &'static str,
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
    pub spec: Arc<ServiceSpec>,
    pub desired: u32,
    pub running: u32,
    pub healthy: u32,
    pub deleting: bool,
    /// `healthy`, `degraded` or `unhealthy`, from its instances.
    pub health: &'static str,
    pub instances: Vec<InstanceStatus>,
    /// The running rollout, else the last one.
    pub rollout: Option<Rollout>,
    /// Revisions kept for rollback, oldest first.
    pub revisions: Vec<u64>,
    /// A rollout failed and was not rolled back: nothing more is replaced for now.
    pub paused: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied(ApplyOutcome),
    Deleted {
        name: String,
        stopped: u32,
    },
    Status(Box<ServiceStatus>),
    List(Vec<ServiceStatus>),
    Scaled {
        name: String,
        previous: u32,
        replicas: u32,
    },
    Summary {
        services: u32,
        instances: u32,
    },
    Signaled {
        instance: String,
        pid: i32,
    },
    /// A rollout was started by `Restart` or `Rollback`.
    RolloutStarted {
        name: String,
        revision: u64,
        rollout_id: String,
    },
    Rollout(Box<Rollout>),
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    InvalidSpec(#[from] SpecError),
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("service {name:?} not found")]
    NotFound { name: String },
    #[error("rollout {id:?} not found (the last 10 of each service are kept)")]
    RolloutNotFound { id: String },
    #[error("service {name:?} has rollout {id} running ({progress})")]
    RolloutRunning {
        name: String,
        id: String,
        progress: String,
    },
    /// The service is not in a state that allows it.
    #[error("{0}")]
    Precondition(String),
    #[error("instance {instance:?} not found")]
    InstanceNotFound { instance: String },
    /// The host cannot enforce what the spec asks for.
    #[error("{0}")]
    Unenforceable(String),
    #[error("service {name:?} is being deleted")]
    Deleting { name: String },
    #[error("instance {instance:?} is not running ({state})")]
    NotRunning { instance: String, state: String },
    #[error("saving the desired state failed, nothing was applied: {0}")]
    Storage(String),
    #[error("the agent is shutting down")]
    Unavailable,
}

pub(crate) type Reply = oneshot::Sender<Result<Outcome, SupervisorError>>;

/// The API's way in: a cheap, cloneable sender of operations.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<(Operation, Reply)>,
}

impl SupervisorHandle {
    pub async fn call(&self, op: Operation) -> Result<Outcome, SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((op, tx))
            .await
            .map_err(|_| SupervisorError::Unavailable)?;
        rx.await.map_err(|_| SupervisorError::Unavailable)?
    }

    /// Resolves to whether the supervisor answers a cheap question: a liveness check (the
    /// systemd watchdog pings only after it passes).
    pub fn answers(&self) -> impl Future<Output = bool> + Send + use<> {
        let handle = self.clone();
        async move { handle.call(Operation::Summary).await.is_ok() }
    }
}
