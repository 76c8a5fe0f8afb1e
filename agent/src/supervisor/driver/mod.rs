//! The driver: the one task that owns the supervisor's state. It takes requests from the
//! API, exits, probe results and readiness from the per-instance watchers, and its own
//! timers; runs [`reconcile`](crate::supervisor::reconcile) through the rollout planner;
//! feeds the resulting events to the instances' state machines; and carries out their
//! effects through the runtime's, the cgroups' and the store's seams.
//!
//! By concern:
//! - [`slots`]: the store of services and instance slots, found by [`InstanceKey`];
//! - [`lifecycle`]: one slot's transitions and their effects (spawn, stop, kill, clean up),
//!   and the events they make;
//! - [`watch`]: what a live instance is watched for (its end, its probes, `READY=1`);
//! - [`restore`]: taking over from an earlier agent run;
//! - [`rolling`]: reconciling each service through the rollout planner, and rollouts'
//!   records and events;
//! - [`ops`]: the operations the API asks for (apply, restart, rollback, scale, delete,
//!   signal);
//! - [`autoscale`]: on-demand start and autoscaling of services with `[scale]`;
//! - [`report`]: status, usage and health; [`sockets`]: the services' listening sockets;
//!   [`records`]: what is saved for a later agent run.

mod autoscale;
mod jobs;
mod lifecycle;
mod ops;
mod packages;
pub use ops::BatchItem;
mod records;
mod report;
mod restore;
mod rolling;
mod slots;
mod sockets;
mod unsaved;
mod watch;
mod weights;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch as watch_channel};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::handle::{Envelope, Reply, Request, SupervisorHandle};
use super::instance::Ctx;
use super::reconcile;
use super::{ApplyKind, ApplyOutcome, Owner, SupervisorError};
use crate::artifact::{Packages, Prepared};
use crate::cgroups::{CgroupBackend, CgroupPath};
use crate::events::{EventKind, EventLog};
use crate::health::{ProbeReport, ServiceHealth};
use crate::runtime::load::{KernelLoad, LoadProbe};
use crate::runtime::{InitExit, InstanceFiles, Processes, SocketBroker};
use crate::spec::{InstanceKey, Namespace};
use crate::store::Store;
use crate::supervisor::capacity::CapacityPolicy;

use slots::Services;

/// The OS seams and host facts the driver works with.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Instance processes: spawning, adopting, signalling.
    pub processes: Arc<dyn Processes>,
    /// What the instances' inits leave on disk.
    pub files: Arc<dyn InstanceFiles>,
    /// The services' listening sockets and free ports.
    pub sockets: Arc<dyn SocketBroker>,
    pub cgroups: Arc<dyn CgroupBackend>,
    pub store: Arc<dyn Store>,
    /// Namespaces this host lets the agent create.
    pub namespaces: Vec<Namespace>,
    /// Where every state change is recorded.
    pub events: Arc<EventLog>,
    /// The artifact and image store; `None`: specs with `[artifact]` or `[image]` are
    /// refused.
    pub packages: Option<Arc<dyn Packages>>,
    /// What services may commit (`None`: no capacity admission).
    pub capacity: Option<CapacityPolicy>,
    /// The load on listening sockets, for `[scale]`.
    pub load: Arc<dyn LoadProbe>,
    /// How often the autoscaler samples the load.
    pub autoscale_interval: std::time::Duration,
    /// How the cgroups above the instances weigh for the CPU.
    pub cpu_weights: CpuWeights,
}

/// How the cgroups above the instances weigh for the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuWeights {
    /// The kernel's default weight, one process's, for the whole tree.
    Fixed,
    /// Each of `corral/` and the service cgroups weighs as many processes as it holds
    /// instances, and with `parent` the agent's parent as well: instances get the CPU share
    /// that as many processes would beside the host's others, not one process's between
    /// them all.
    PerInstance { parent: bool },
}

impl Deps {
    /// The driver's seams, the three of the runtime served by one implementation (as the
    /// agent's and the tests' are).
    pub fn new<R>(
        runtime: Arc<R>,
        cgroups: Arc<dyn CgroupBackend>,
        store: Arc<dyn Store>,
        namespaces: Vec<Namespace>,
        events: Arc<EventLog>,
    ) -> Deps
    where
        R: Processes + InstanceFiles + SocketBroker,
    {
        Deps {
            processes: runtime.clone(),
            files: runtime.clone(),
            sockets: runtime,
            cgroups,
            store,
            namespaces,
            events,
            packages: None,
            capacity: None,
            load: Arc::new(KernelLoad),
            autoscale_interval: autoscale::DEFAULT_INTERVAL,
            cpu_weights: CpuWeights::Fixed,
        }
    }

    /// With another CPU weighting of the tree.
    #[must_use]
    pub fn with_cpu_weights(mut self, weights: CpuWeights) -> Deps {
        self.cpu_weights = weights;
        self
    }

    /// With another autoscaler sampling interval.
    pub fn with_autoscale_interval(mut self, interval: std::time::Duration) -> Deps {
        self.autoscale_interval = interval;
        self
    }

    /// With the artifact and image store.
    pub fn with_packages(mut self, packages: Arc<dyn Packages>) -> Deps {
        self.packages = Some(packages);
        self
    }

    /// Admit services by capacity under `policy`.
    #[must_use]
    pub fn with_capacity(mut self, policy: CapacityPolicy) -> Deps {
        self.capacity = Some(policy);
        self
    }
}

/// What the driver's own tasks tell it.
enum Internal {
    /// An instance's init ended (`generation`: of the run it belongs to).
    Exit {
        key: InstanceKey,
        generation: u64,
        exit: InitExit,
    },
    /// An instance's cgroup is removed (or could not be).
    CleanupDone {
        key: InstanceKey,
        error: Option<String>,
    },
    /// The instance sent `READY=1` on its NOTIFY_SOCKET.
    Ready { key: InstanceKey, generation: u64 },
    /// A revision's package is ready, or could not be made so.
    Package {
        service: String,
        revision: u64,
        result: Result<Prepared, String>,
    },
    /// A connection waits on a service at 0 instances.
    Wake { service: String },
    /// The autoscaler's sample of the load.
    Load(autoscale::Sample),
}

pub struct Driver {
    deps: Deps,
    boot_id: String,
    services: Services,
    /// The jobs' runs and schedules.
    jobs: jobs::Jobs,
    requests: mpsc::Receiver<Envelope>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
    probe_tx: mpsc::UnboundedSender<ProbeReport>,
    probes: mpsc::UnboundedReceiver<ProbeReport>,
    /// Each service's health, as instances add it up; the API serves it as grpc.health.v1.
    health_tx: watch_channel::Sender<BTreeMap<String, ServiceHealth>>,
    /// Services whose saved record could not be read at start, set aside until an apply
    /// repairs them: what Node reports for each. Their instances keep running, untouched.
    quarantined: BTreeMap<String, String>,
    scaling: autoscale::Scaling,
    /// Instance records whose save failed, saved again until they are.
    unsaved: unsaved::Unsaved,
    /// Applies in effect whose record is not synced yet, answered once it is.
    unsynced_applies: Vec<(ApplyOutcome, Reply<ApplyOutcome>)>,
    /// The CPU weight last set on each cgroup above the instances, in processes.
    weights: BTreeMap<CgroupPath, u64>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("services", &self.services.names())
            .finish()
    }
}

/// Inputs of a transition: the time now, and jitter for backoff.
fn ctx() -> Ctx {
    Ctx {
        now: Instant::now(),
        wall: SystemTime::now(),
        jitter: fastrand::f64(),
    }
}

/// An instance's cgroup.
fn cgroup_of(key: &InstanceKey) -> CgroupPath {
    CgroupPath::service(&key.service).child(&key.to_string())
}

fn answer<T>(reply: Reply<T>, result: Result<T, SupervisorError>) {
    // The caller may have gone away; the operation took effect all the same.
    let _ = reply.send(result);
}

impl Driver {
    pub fn new(deps: Deps) -> (Driver, SupervisorHandle) {
        let (tx, requests) = mpsc::channel(256);
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let (probe_tx, probes) = mpsc::unbounded_channel();
        let (health_tx, _) = watch_channel::channel(BTreeMap::new());
        let driver = Driver {
            boot_id: deps.processes.boot_id(),
            scaling: autoscale::Scaling::new(deps.autoscale_interval),
            deps,
            services: Services::default(),
            jobs: jobs::Jobs::default(),
            requests,
            internal_tx,
            internal,
            probe_tx,
            probes,
            health_tx,
            quarantined: BTreeMap::new(),
            unsaved: unsaved::Unsaved::default(),
            unsynced_applies: Vec::new(),
            weights: BTreeMap::new(),
        };
        (driver, SupervisorHandle::new(tx))
    }

    /// Answer the applies of this turn once their records are durable. An apply's record is
    /// renamed into place before anything of it takes effect, so an agent killed at any point
    /// after that finds it (and the instances it started) on its next run; the fsync comes
    /// after the pass that started its instances and before the answer, so a caller told
    /// "applied" holds a record that also survives a host crash. A failed sync is answered
    /// as a storage error; the change stays in effect (its record is in place).
    fn answer_synced(&mut self) {
        for (outcome, reply) in std::mem::take(&mut self.unsynced_applies) {
            answer(reply, self.sync_service(&outcome.name).map(|()| outcome));
        }
    }

    /// Each service's health (healthy, degraded, unhealthy) whenever it changes.
    pub fn health_updates(&self) -> watch_channel::Receiver<BTreeMap<String, ServiceHealth>> {
        self.health_tx.subscribe()
    }

    fn emit(&self, service: &str, instance: Option<&str>, kind: EventKind) {
        let svc = self.services.get(service);
        if let Some(svc) = svc {
            svc.count(&kind);
        }
        // Every event about an instance names the run it is about.
        let incarnation = instance
            .and_then(|id| svc?.slots.values().find(|s| s.instance.id == id))
            .map_or(0, |s| s.instance.incarnation);
        self.deps
            .events
            .append_run(service, instance.map(|i| (i, incarnation)), kind);
    }

    /// Serve until `shutdown`; instances keep running after it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            self.retry_unsaved();
            self.reconcile_all();
            self.reweigh();
            self.answer_synced();
            let jobs_wake = self.tick_jobs();
            self.autoscale_pass();
            self.publish_health();
            let wake = self
                .services
                .iter()
                .flat_map(|(_, s)| [reconcile::next_deadline(&s.slots), s.wake])
                .chain([jobs_wake, self.scaling.wake(), self.unsaved.wake()])
                .flatten()
                .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(m) = self.internal.recv() => self.on_internal(m),
                Some(r) = self.probes.recv() => self.on_probe(r),
                Some((from, request)) = self.requests.recv() => self.on_request(from, request),
                _ = sleep_until(wake) => {}
            }
        }
        tracing::debug!("supervisor stopped; instances keep running");
    }

    fn on_internal(&mut self, m: Internal) {
        match m {
            Internal::Exit {
                key,
                generation,
                exit,
            } => self.on_exit(&key, generation, exit),
            Internal::CleanupDone { key, error } => self.on_cleanup_done(&key, error),
            Internal::Ready { key, generation } => self.on_ready(&key, generation),
            Internal::Package {
                service,
                revision,
                result,
            } => self.on_package(&service, revision, result),
            Internal::Wake { service } => self.on_wake(&service),
            Internal::Load(sample) => self.on_sample(sample),
        }
    }

    fn on_request(&mut self, from: Owner, request: Request) {
        match request {
            Request::Apply {
                spec,
                dry_run,
                force,
                expected,
                reply,
            } => {
                let result = self
                    .expect_generation(&spec.name, expected)
                    .and_then(|()| self.apply(from, *spec, dry_run, force));
                match result {
                    Ok(o) if !dry_run && o.kind != ApplyKind::Unchanged => {
                        self.unsynced_applies.push((o, reply));
                    }
                    other => answer(reply, other),
                }
            }
            Request::ApplyBatch {
                items,
                dry_run,
                reply,
            } => answer(reply, self.apply_batch(from, items, dry_run)),
            Request::Restart {
                name,
                force,
                expected,
                reply,
            } => {
                let r = self.guarded(&name, expected, |d| d.restart(&name, force));
                answer(reply, r);
            }
            Request::Rollback {
                name,
                revision,
                force,
                expected,
                reply,
            } => {
                let r = self.guarded(&name, expected, |d| {
                    d.rollback(from, &name, revision, force)
                });
                answer(reply, r);
            }
            Request::GetRollout { id, reply } => answer(reply, self.get_rollout(&id)),
            Request::Delete {
                name,
                force,
                expected,
                reply,
            } => match self.expect_generation(&name, expected) {
                Ok(()) => self.delete(from, &name, force, reply),
                Err(e) => answer(reply, Err(e)),
            },
            Request::Get { name, reply } => answer(reply, self.get(&name)),
            Request::List { reply } => answer(reply, Ok(self.list())),
            Request::Scale {
                name,
                replicas,
                force,
                expected,
                reply,
            } => {
                let r = self.guarded(&name, expected, |d| d.scale(from, &name, replicas, force));
                answer(reply, r);
            }
            Request::Signal {
                instance,
                signal,
                reply,
            } => answer(reply, self.send_signal(&instance, signal)),
            Request::Summary { reply } => answer(reply, Ok(self.summary())),
            Request::Sample { reply } => answer(reply, Ok(self.sample())),
            Request::RunJob {
                name,
                overrides,
                reply,
            } => answer(
                reply,
                self.run_job(&name, super::Trigger::Manual, None, &overrides),
            ),
            Request::GetRun { id, reply } => answer(reply, self.get_run(&id)),
            Request::ListRuns { name, reply } => answer(reply, self.list_runs(&name)),
            Request::CancelRun { id, reply } => answer(reply, self.cancel_run(&id)),
        }
    }
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
