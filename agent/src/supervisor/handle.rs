//! The API's way in: a cheap, cloneable [`SupervisorHandle`] with one typed method per
//! operation. Each sends a [`Request`] carrying its own reply channel to the driver task, so
//! every answer has the type its operation promises. A handle speaks for one source
//! ([`Owner`]): the API's for the local one, the fleet's ([`SupervisorHandle::for_owner`])
//! for etcd; the driver holds each write against the service's owner.

use tokio::sync::{mpsc, oneshot};

use super::run::Run;
use super::sample::ServiceSample;
use super::{
    ApplyOutcome, BatchItem, Deleted, Listing, Owner, RolloutStarted, Scaled, ServiceStatus,
    Signaled, Summary, SupervisorError,
};
use crate::rollout::record::Rollout;
use crate::spec::job::overrides::RawOverrides;
use crate::spec::{InstanceKey, ServiceSpec};

/// Where the driver sends one operation's answer.
pub(super) type Reply<T> = oneshot::Sender<Result<T, SupervisorError>>;

/// Everything the supervisor can be asked to do, each with the channel for its answer.
#[derive(Debug)]
pub(super) enum Request {
    /// Create or update a service (`dry_run`: only say what would happen; `force`: supersede
    /// a running rollout).
    Apply {
        spec: Box<ServiceSpec>,
        dry_run: bool,
        force: bool,
        expected: Option<u64>,
        reply: Reply<ApplyOutcome>,
    },
    /// Apply several specs, all or nothing (see `Driver::apply_batch`).
    ApplyBatch {
        items: Vec<BatchItem>,
        dry_run: bool,
        reply: Reply<Vec<ApplyOutcome>>,
    },
    /// Replace every instance with a fresh one of the same spec, as a rollout.
    Restart {
        name: String,
        force: bool,
        expected: Option<u64>,
        reply: Reply<RolloutStarted>,
    },
    /// Go back to a kept revision (the previous one when `None`), as a rollout.
    Rollback {
        name: String,
        revision: Option<u64>,
        force: bool,
        expected: Option<u64>,
        reply: Reply<RolloutStarted>,
    },
    GetRollout {
        id: String,
        reply: Reply<Rollout>,
    },
    /// Stop every instance of a service and remove it; answered once it is gone (`force`:
    /// even one owned by another source).
    Delete {
        name: String,
        force: bool,
        expected: Option<u64>,
        reply: Reply<Deleted>,
    },
    Get {
        name: String,
        reply: Reply<ServiceStatus>,
    },
    List {
        reply: Reply<Listing>,
    },
    Scale {
        name: String,
        replicas: u32,
        force: bool,
        expected: Option<u64>,
        reply: Reply<Scaled>,
    },
    /// Send `signal` (a number) to the service process of one running instance.
    Signal {
        instance: InstanceKey,
        signal: i32,
        reply: Reply<Signaled>,
    },
    Summary {
        reply: Reply<Summary>,
    },
    /// Every service and instance as the metrics collector sees them.
    Sample {
        reply: Reply<Vec<ServiceSample>>,
    },
    /// Start a run of a job now.
    RunJob {
        name: String,
        overrides: RawOverrides,
        reply: Reply<Run>,
    },
    GetRun {
        id: String,
        reply: Reply<Run>,
    },
    /// A job's kept runs, oldest first.
    ListRuns {
        name: String,
        reply: Reply<Vec<Run>>,
    },
    /// Stop a run; it ends `cancelled`.
    CancelRun {
        id: String,
        reply: Reply<Run>,
    },
}

/// A request and the source it comes from.
pub(super) type Envelope = (Owner, Request);

#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Envelope>,
    from: Owner,
}

impl SupervisorHandle {
    /// The local API's handle.
    pub(super) fn new(tx: mpsc::Sender<Envelope>) -> SupervisorHandle {
        SupervisorHandle {
            tx,
            from: Owner::Local,
        }
    }

    /// A handle whose requests come from `owner`.
    pub fn for_owner(&self, owner: Owner) -> SupervisorHandle {
        SupervisorHandle {
            tx: self.tx.clone(),
            from: owner,
        }
    }

    /// Send the request `make` builds around a reply channel, and wait for the answer.
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((self.from, make(tx)))
            .await
            .map_err(|_| SupervisorError::Unavailable)?;
        rx.await.map_err(|_| SupervisorError::Unavailable)?
    }

    /// Create or update a service; see [`Request::Apply`].
    pub async fn apply(
        &self,
        spec: ServiceSpec,
        dry_run: bool,
        force: bool,
    ) -> Result<ApplyOutcome, SupervisorError> {
        self.apply_if(spec, dry_run, force, None).await
    }

    /// [`SupervisorHandle::apply`], only while the service's generation is `expected` (0:
    /// only if the service does not exist), else `GenerationMismatch`.
    pub async fn apply_if(
        &self,
        spec: ServiceSpec,
        dry_run: bool,
        force: bool,
        expected: Option<u64>,
    ) -> Result<ApplyOutcome, SupervisorError> {
        let spec = Box::new(spec);
        self.ask(|reply| Request::Apply {
            spec,
            dry_run,
            force,
            expected,
            reply,
        })
        .await
    }

    /// Apply several specs at once, all or nothing: every one checked before any is saved,
    /// and the saved ones written back when a later save fails.
    pub async fn apply_batch(
        &self,
        items: Vec<BatchItem>,
        dry_run: bool,
    ) -> Result<Vec<ApplyOutcome>, SupervisorError> {
        self.ask(|reply| Request::ApplyBatch {
            items,
            dry_run,
            reply,
        })
        .await
    }

    pub async fn restart(
        &self,
        name: &str,
        force: bool,
    ) -> Result<RolloutStarted, SupervisorError> {
        self.restart_if(name, force, None).await
    }

    /// [`SupervisorHandle::restart`] only at generation `expected`.
    pub async fn restart_if(
        &self,
        name: &str,
        force: bool,
        expected: Option<u64>,
    ) -> Result<RolloutStarted, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::Restart {
            name,
            force,
            expected,
            reply,
        })
        .await
    }

    pub async fn rollback(
        &self,
        name: &str,
        revision: Option<u64>,
        force: bool,
    ) -> Result<RolloutStarted, SupervisorError> {
        self.rollback_if(name, revision, force, None).await
    }

    /// [`SupervisorHandle::rollback`] only at generation `expected`.
    pub async fn rollback_if(
        &self,
        name: &str,
        revision: Option<u64>,
        force: bool,
        expected: Option<u64>,
    ) -> Result<RolloutStarted, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::Rollback {
            name,
            revision,
            force,
            expected,
            reply,
        })
        .await
    }

    pub async fn get_rollout(&self, id: &str) -> Result<Rollout, SupervisorError> {
        let id = id.to_string();
        self.ask(|reply| Request::GetRollout { id, reply }).await
    }

    /// Stop every instance of a service and remove it; answers once it is gone.
    pub async fn delete(&self, name: &str, force: bool) -> Result<Deleted, SupervisorError> {
        self.delete_if(name, force, None).await
    }

    /// [`SupervisorHandle::delete`] only at generation `expected`.
    pub async fn delete_if(
        &self,
        name: &str,
        force: bool,
        expected: Option<u64>,
    ) -> Result<Deleted, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::Delete {
            name,
            force,
            expected,
            reply,
        })
        .await
    }

    /// One service's status, its usage read now.
    pub async fn get(&self, name: &str) -> Result<ServiceStatus, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::Get { name, reply }).await
    }

    /// Every service's status, with usage read within the last second.
    pub async fn list(&self) -> Result<Listing, SupervisorError> {
        self.ask(|reply| Request::List { reply }).await
    }

    /// Every service and instance for the metrics collector; reads nothing from the OS.
    pub async fn sample(&self) -> Result<Vec<ServiceSample>, SupervisorError> {
        self.ask(|reply| Request::Sample { reply }).await
    }

    /// Set a service's instance count (`force`: even one another source owns).
    pub async fn scale(
        &self,
        name: &str,
        replicas: u32,
        force: bool,
    ) -> Result<Scaled, SupervisorError> {
        self.scale_if(name, replicas, force, None).await
    }

    /// [`SupervisorHandle::scale`] only at generation `expected`.
    pub async fn scale_if(
        &self,
        name: &str,
        replicas: u32,
        force: bool,
        expected: Option<u64>,
    ) -> Result<Scaled, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::Scale {
            name,
            replicas,
            force,
            expected,
            reply,
        })
        .await
    }

    /// Deliver `signal` (a number) to an instance's service process.
    pub async fn signal(
        &self,
        instance: InstanceKey,
        signal: i32,
    ) -> Result<Signaled, SupervisorError> {
        self.ask(|reply| Request::Signal {
            instance,
            signal,
            reply,
        })
        .await
    }

    /// Start a run of job `name` now (trigger `manual`), with its spec changed as
    /// `overrides` say.
    pub async fn run_job(
        &self,
        name: &str,
        overrides: RawOverrides,
    ) -> Result<Run, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::RunJob {
            name,
            overrides,
            reply,
        })
        .await
    }

    /// The run `id` (`NAME-rN`).
    pub async fn get_run(&self, id: &str) -> Result<Run, SupervisorError> {
        let id = id.to_string();
        self.ask(|reply| Request::GetRun { id, reply }).await
    }

    /// Job `name`'s kept runs, oldest first.
    pub async fn list_runs(&self, name: &str) -> Result<Vec<Run>, SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Request::ListRuns { name, reply }).await
    }

    /// Stop run `id`: stop signal, grace, SIGKILL; it ends `cancelled`.
    pub async fn cancel_run(&self, id: &str) -> Result<Run, SupervisorError> {
        let id = id.to_string();
        self.ask(|reply| Request::CancelRun { id, reply }).await
    }

    pub async fn summary(&self) -> Result<Summary, SupervisorError> {
        self.ask(|reply| Request::Summary { reply }).await
    }

    /// Resolves to whether the supervisor answers a cheap question: a liveness check (the
    /// systemd watchdog pings only after it passes).
    pub fn answers(&self) -> impl Future<Output = bool> + Send + use<> {
        let handle = self.clone();
        async move { handle.summary().await.is_ok() }
    }
}
