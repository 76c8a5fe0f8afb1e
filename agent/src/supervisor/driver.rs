//! The driver: the one task that owns the supervisor's state. It takes operations from the
//! API, exits from the per-instance watchers and its own timers, runs [`reconcile`] and feeds
//! the resulting events to the instances' state machines, and carries out their effects
//! through the `Runtime`, `CgroupBackend` and `Store` seams.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod rolling;

use super::desired::{Desired, Record};
use super::instance::{self, Ctx, Effect, Event, ExitInfo, Instance, Observed, State, StopReason};
use super::reconcile;
use super::{
    InstanceStatus, Operation, Outcome, Reply, ServiceStatus, SupervisorError, SupervisorHandle,
};
use crate::cgroups::{CgroupBackend, CgroupPath};
use crate::events::{EventKind, EventLog};
use crate::health::{self, HealthState, ProbeHandle, ProbeReport, Prober, ServiceHealth, Tracker};
use crate::runtime::{InitExit, ProcessRef, ProcessStatus, Runtime, StartRequest};
use crate::spec::{self, Namespace, ServiceSpec};
use crate::store::Store;

/// Store kind of the desired services.
const SERVICES: &str = "services";

/// How long the removal of an instance's cgroup keeps killing and retrying.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest span a CPU rate is computed over.
const RATE_MIN_SPAN: Duration = Duration::from_millis(500);

/// How long a usage reading is served before the cgroup files are read again.
const USAGE_TTL: Duration = Duration::from_secs(1);

/// Wait for instances left by an earlier agent run at most this long after their grace.
const LEFTOVER_KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The OS seams and host facts the driver works with.
#[derive(Debug, Clone)]
pub struct Deps {
    pub runtime: Arc<dyn Runtime>,
    pub cgroups: Arc<dyn CgroupBackend>,
    pub store: Arc<dyn Store>,
    /// Namespaces this host lets the agent create.
    pub namespaces: Vec<Namespace>,
    /// Where every state change is recorded.
    pub events: Arc<EventLog>,
}

/// Store kind of the instance records.
const INSTANCES: &str = "instances";

/// What is persisted per instance, so that a later agent run can take it over: which
/// process it is (PID, start time, boot) or when it is due to start again, and its history.
#[derive(Debug, Serialize, Deserialize)]
struct InstanceRecord {
    service: String,
    index: u32,
    revision: u64,
    /// Absent in records written before rollouts existed.
    #[serde(default)]
    epoch: u64,
    state: RecordedState,
    restarts: u32,
    failures: u32,
    last_exit: Option<ExitInfo>,
    last_error: Option<String>,
    started_at: Option<SystemTime>,
    ports: BTreeMap<String, u16>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum RecordedState {
    Running {
        pid: i32,
        start_time: u64,
        boot_id: String,
    },
    Backoff {
        until: SystemTime,
    },
    Exited,
}

struct Service {
    /// What its instances should run, its kept revisions and its rollouts (persisted).
    d: Desired,
    deleting: bool,
    /// The listening sockets of `[[sockets]]` of every spec its instances run, by address:
    /// bound by the agent, handed to every instance, kept across instance restarts, rollouts
    /// and agent restarts.
    sockets: rolling::SocketMap,
    instances: BTreeMap<u32, Instance>,
    delete_waiters: Vec<Reply>,
    stopped_on_delete: u32,
    /// When the rollout planner needs another look by time alone (readiness, deadlines).
    wake: Option<Instant>,
    /// Its rollout record changed since it was last saved.
    dirty: bool,
}

impl Service {
    fn new(d: Desired) -> Service {
        Service {
            d,
            deleting: false,
            sockets: BTreeMap::new(),
            instances: BTreeMap::new(),
            delete_waiters: Vec::new(),
            stopped_on_delete: 0,
            wake: None,
            dirty: false,
        }
    }

    /// The listening sockets of `spec`, in its order; `None` when one is not open.
    fn fds_for(&self, spec: &ServiceSpec) -> Option<Vec<Arc<std::os::fd::OwnedFd>>> {
        spec.sockets
            .iter()
            .map(|s| {
                self.sockets
                    .get(&s.listen.to_string())
                    .map(|(_, fd)| fd.clone())
            })
            .collect()
    }
}

/// What only a live instance has.
struct Live {
    process: ProcessRef,
    /// The init's start time, which identifies it together with its PID.
    start_time: u64,
    /// Host PID of the service process, once seen.
    main_pid: Option<i32>,
    /// The CPU rate (cores) between the last two readings at least [`RATE_MIN_SPAN`] apart,
    /// and the reading it will be computed from next.
    cpu_rate: Option<f64>,
    rate_base: Option<(Instant, u64)>,
    /// Health tracking, for instances of a service with a `[health]` section.
    health: Option<LiveHealth>,
    /// The last usage read from the cgroup and the log drop count, and when.
    usage: Option<(
        Instant,
        crate::cgroups::CgroupStats,
        crate::runtime::LogStat,
    )>,
    ports: BTreeMap<String, u16>,
}

struct LiveHealth {
    tracker: Tracker,
    /// Probes run while this is held; dropping it stops them.
    _prober: Option<ProbeHandle>,
    /// Watches for the instance's `READY=1` while held (`notify = true`).
    _notify: Option<AbortOnDrop>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often an instance that has not yet sent `READY=1` is checked for it.
const NOTIFY_POLL: Duration = Duration::from_millis(100);

enum Internal {
    Exit {
        service: String,
        index: u32,
        generation: u64,
        exit: InitExit,
    },
    CleanupDone {
        service: String,
        index: u32,
        error: Option<String>,
    },
    /// The instance sent `READY=1` on its NOTIFY_SOCKET.
    Ready {
        service: String,
        index: u32,
        generation: u64,
    },
}

pub struct Driver {
    deps: Deps,
    boot_id: String,
    services: BTreeMap<String, Service>,
    live: HashMap<String, Live>,
    ops: mpsc::Receiver<(Operation, Reply)>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
    probe_tx: mpsc::UnboundedSender<ProbeReport>,
    probes: mpsc::UnboundedReceiver<ProbeReport>,
    /// Each service's health, as instances add it up; the API serves it as grpc.health.v1.
    health_tx: watch::Sender<BTreeMap<String, ServiceHealth>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn ctx() -> Ctx {
    Ctx {
        now: Instant::now(),
        wall: SystemTime::now(),
        jitter: fastrand::f64(),
    }
}

fn cgroup_of(service: &str, instance: &str) -> CgroupPath {
    CgroupPath::service(service).child(instance)
}

impl Driver {
    pub fn new(deps: Deps) -> (Driver, SupervisorHandle) {
        let (tx, ops) = mpsc::channel(256);
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let (probe_tx, probes) = mpsc::unbounded_channel();
        let (health_tx, _) = watch::channel(BTreeMap::new());
        let driver = Driver {
            boot_id: deps.runtime.boot_id(),
            deps,
            services: BTreeMap::new(),
            live: HashMap::new(),
            ops,
            internal_tx,
            internal,
            probe_tx,
            probes,
            health_tx,
        };
        (driver, SupervisorHandle { tx })
    }

    fn emit(&self, service: &str, instance: Option<&str>, kind: EventKind) {
        self.deps.events.append(service, instance, kind);
    }

    /// Each service's health (healthy, degraded, unhealthy) whenever it changes.
    pub fn health_updates(&self) -> watch::Receiver<BTreeMap<String, ServiceHealth>> {
        self.health_tx.subscribe()
    }

    /// Take over from an earlier agent run: load the desired state, adopt every instance that
    /// still runs (the same PID *and* start time, in its cgroup), report with their true end
    /// those that ended meanwhile, and stop what no record explains.
    pub async fn restore(&mut self) {
        self.load_services();
        self.adopt_instances();
        self.acquire_sockets();
        self.stop_leftovers().await;
        self.resume_rollouts();
    }

    fn load_services(&mut self) {
        match self.deps.store.list(SERVICES) {
            Ok(records) => {
                for (name, bytes) in records {
                    match serde_json::from_slice::<Record>(&bytes)
                        .map_err(|e| e.to_string())
                        .and_then(Desired::from_record)
                    {
                        Ok(d) if d.spec.name == name => {
                            if let Some(r) = d.running() {
                                tracing::info!(service = %name, rollout = %r.id, "resuming an interrupted rollout");
                            }
                            self.services.insert(name, Service::new(d));
                        }
                        Ok(_) => {
                            tracing::error!(service = %name, "stored spec names another service; ignored")
                        }
                        Err(e) => {
                            tracing::error!(service = %name, error = %e, "stored spec unreadable; ignored")
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the desired state"),
        }
    }

    fn adopt_instances(&mut self) {
        let records = match self.deps.store.list(INSTANCES) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the instance records");
                return;
            }
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut ended = Vec::new();
        for (id, bytes) in records {
            let rec = match serde_json::from_slice::<InstanceRecord>(&bytes) {
                Ok(r) if spec::instance_id(&r.service, r.index) == id => r,
                Ok(_) | Err(_) => {
                    tracing::warn!(instance = %id, "unreadable instance record; dropped");
                    let _ = self.deps.store.delete(INSTANCES, &id);
                    continue;
                }
            };
            let Some(svc) = self.services.get_mut(&rec.service) else {
                // Its service was deleted: its cgroup, if any, is a leftover.
                let _ = self.deps.store.delete(INSTANCES, &id);
                continue;
            };
            // The spec of the revision it runs (the current one if no longer kept).
            let spec = svc
                .d
                .spec_of(rec.revision)
                .unwrap_or_else(|| svc.d.spec.clone());
            let mut inst =
                Instance::new(rec.index, id.clone(), spec, rec.revision).with_epoch(rec.epoch);
            inst.restarts = rec.restarts;
            inst.failures = rec.failures;
            inst.last_exit = rec.last_exit;
            inst.last_error = rec.last_error;
            inst.started_at = rec.started_at;
            let ago = |t: SystemTime| wall.duration_since(t).unwrap_or_default();
            match rec.state {
                RecordedState::Backoff { until } => {
                    inst.state = State::Backoff {
                        until: now + until.duration_since(wall).unwrap_or_default(),
                    };
                    svc.instances.insert(rec.index, inst);
                }
                RecordedState::Exited => {
                    inst.state = State::Exited;
                    svc.instances.insert(rec.index, inst);
                }
                RecordedState::Running {
                    pid,
                    start_time,
                    boot_id,
                } => {
                    let since = rec
                        .started_at
                        .map_or(now, |t| now.checked_sub(ago(t)).unwrap_or(now));
                    inst.state = State::Running { since };
                    inst.pid = Some(pid);
                    inst.generation = 1;
                    svc.instances.insert(rec.index, inst);
                    let path = cgroup_of(&rec.service, &id);
                    let in_cgroup = self
                        .deps
                        .cgroups
                        .procs(&path)
                        .is_ok_and(|p| p.contains(&pid));
                    let adopted = if boot_id != self.boot_id {
                        Err("recorded before the host rebooted".to_string())
                    } else if !in_cgroup {
                        Err(format!("its init (pid {pid}) is no longer in {path}"))
                    } else {
                        self.deps
                            .runtime
                            .adopt(&id, pid, start_time)
                            .map_err(|e| e.to_string())
                    };
                    match adopted {
                        Ok(spawned) => {
                            tracing::info!(instance = %id, pid, "adopted a running instance");
                            self.emit(&rec.service, Some(&id), EventKind::Adopted { pid });
                            self.watch(&rec.service, rec.index, 1, spawned, rec.ports);
                        }
                        Err(why) => ended.push((rec.service, rec.index, id, why)),
                    }
                }
            }
        }
        // Instances that ended while no agent ran: their true end, then their policy.
        for (service, index, id, why) in ended {
            let record = self.deps.runtime.exit_record(&id);
            let oom_kills = self
                .deps
                .cgroups
                .stats(&cgroup_of(&service, &id))
                .map(|s| s.oom_kills)
                .unwrap_or(0);
            let class = instance::classify(&Observed {
                service_exit: record.as_ref().map(|r| (r.code, r.signal)),
                init_status: None,
                oom_kills,
                killed_after_grace: false,
            });
            let setup_error = record
                .as_ref()
                .and_then(|r| r.setup_error.clone())
                .or_else(|| {
                    (class == instance::ExitClass::Lost).then(|| {
                        format!("ended while the agent was away and left no exit record: {why}")
                    })
                });
            tracing::info!(instance = %id, end = %class, reason = %why, "instance ended while the agent was away");
            if oom_kills > 0 {
                self.emit(&service, Some(&id), EventKind::OomKill { count: oom_kills });
            }
            self.feed(
                &service,
                index,
                Event::Exited(ExitInfo {
                    class,
                    at: SystemTime::now(),
                    setup_error,
                }),
            );
        }
    }

    /// Instances found in the cgroup tree at start belong to an earlier agent run. Each gets
    /// its stop signal, its grace period, then SIGKILL; then its cgroup is removed.
    async fn stop_leftovers(&self) {
        let cg = &self.deps.cgroups;
        let root = CgroupPath::root();
        let services = cg.children(&root).unwrap_or_default();
        let mut tasks = Vec::new();
        for svc in &services {
            if !spec::valid_service_name(svc) {
                continue;
            }
            let (signal, grace) = match self.services.get(svc) {
                Some(s) => (s.d.spec.stop.signal, s.d.spec.stop.grace),
                None => (libc::SIGTERM, Duration::from_secs(10)),
            };
            for inst in cg.children(&CgroupPath::service(svc)).unwrap_or_default() {
                let known = self
                    .services
                    .get(svc)
                    .is_some_and(|s| s.instances.values().any(|i| i.id == inst));
                if known {
                    continue;
                }
                let path = cgroup_of(svc, &inst);
                let cg = cg.clone();
                let rt = self.deps.runtime.clone();
                tasks.push(tokio::spawn(async move {
                    let stopped = stop_leftover(&*cg, &*rt, &path, signal, grace).await;
                    (path, stopped)
                }));
            }
        }
        let mut stopped = 0;
        for t in tasks {
            match t.await {
                Ok((path, Ok(true))) => {
                    stopped += 1;
                    tracing::info!(cgroup = %path, "stopped an instance no record explains");
                }
                Ok((_, Ok(false))) => {}
                Ok((path, Err(e))) => {
                    tracing::error!(cgroup = %path, error = %e, "cannot clean up")
                }
                Err(e) => tracing::error!(error = %e, "leftover cleanup task failed"),
            }
        }
        for svc in services {
            if !self.services.contains_key(&svc)
                && spec::valid_service_name(&svc)
                && let Err(e) = cg.remove(&CgroupPath::service(&svc))
            {
                tracing::warn!(service = %svc, error = %e, "cannot remove the cgroup of a deleted service");
            }
        }
        if stopped > 0 {
            tracing::info!(stopped, "instances without a record were stopped");
        }
    }

    /// Serve until `shutdown`; instances keep running after it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            self.reconcile_all();
            self.publish_health();
            let wake = self
                .services
                .values()
                .flat_map(|s| [reconcile::next_deadline(&s.instances), s.wake])
                .flatten()
                .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(m) = self.internal.recv() => self.on_internal(m),
                Some(r) = self.probes.recv() => self.on_probe(r),
                Some((op, reply)) = self.ops.recv() => self.on_op(op, reply),
                _ = sleep_until(wake) => {}
            }
        }
        tracing::debug!("supervisor stopped; instances keep running");
    }

    // ---------------------------------------------------------------------------------
    // Reconcile and effects.

    /// Feed one event to one slot and carry out what it asks for.
    fn feed(&mut self, service: &str, index: u32, event: Event) {
        let Some(inst) = self
            .services
            .get_mut(service)
            .and_then(|s| s.instances.get_mut(&index))
        else {
            return;
        };
        let before = inst.state;
        let logged = event.clone();
        let effects = inst.handle(event, &ctx());
        let after = inst.state;
        let (id, revision, failures) = (inst.id.clone(), inst.revision, inst.failures);
        let changed = before.name() != after.name();
        if changed
            && matches!(
                after,
                State::Running { .. } | State::Backoff { .. } | State::Exited
            )
        {
            self.persist_instance(service, index);
        }
        self.record_transition(service, &id, revision, failures, &logged, before, after);
        self.apply_effects(service, index, effects);
    }

    /// The event log entries and log lines for one transition.
    #[allow(clippy::too_many_arguments)]
    fn record_transition(
        &self,
        service: &str,
        id: &str,
        revision: u64,
        failures: u32,
        event: &Event,
        before: State,
        after: State,
    ) {
        let changed = before.name() != after.name();
        let inst = Some(id);
        match (event, after) {
            (Event::Started { pid }, State::Running { .. }) if changed => {
                self.emit(
                    service,
                    inst,
                    EventKind::InstanceStarted {
                        pid: *pid,
                        revision,
                    },
                );
            }
            (Event::StartFailed { error }, _) if changed => {
                self.emit(
                    service,
                    inst,
                    EventKind::StartFailed {
                        error: error.clone(),
                    },
                );
            }
            (Event::Exited(exit), _) if changed => {
                let (code, signal) = match exit.class {
                    instance::ExitClass::Exited(c) => (Some(c), None),
                    instance::ExitClass::Signaled(s) => (None, Some(s)),
                    instance::ExitClass::OomKilled | instance::ExitClass::StopTimeout => {
                        (None, Some(libc::SIGKILL))
                    }
                    _ => (None, None),
                };
                self.emit(
                    service,
                    inst,
                    EventKind::InstanceExited {
                        end: exit.class.to_string(),
                        code,
                        signal,
                        detail: exit.setup_error.clone(),
                    },
                );
            }
            (Event::GraceExpired, State::Stopping { killed: true, .. })
                if matches!(before, State::Stopping { killed: false, .. }) =>
            {
                tracing::warn!(instance = %id, "did not stop within its grace period: SIGKILL");
                self.emit(
                    service,
                    inst,
                    EventKind::Killed {
                        reason: "grace period expired".into(),
                    },
                );
            }
            _ => {}
        }
        if !changed {
            return;
        }
        match after {
            State::Backoff { until } => {
                let delay_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
                tracing::info!(instance = %id, delay_ms, failures, "restart scheduled");
                self.emit(
                    service,
                    inst,
                    EventKind::RestartScheduled {
                        delay_ms,
                        attempt: failures,
                    },
                );
            }
            State::Exited => tracing::info!(instance = %id, "not restarted (restart policy)"),
            _ => tracing::debug!(instance = %id, from = before.name(), to = after.name(), "state"),
        }
    }

    fn apply_effects(&mut self, service: &str, index: u32, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Spawn => {
                    let ev = self.spawn(service, index);
                    self.feed(service, index, ev);
                }
                Effect::Signal => self.signal(service, index),
                Effect::KillAll => {
                    if let Some(id) = self.instance_id(service, index)
                        && let Err(e) = self.deps.cgroups.kill_all(&cgroup_of(service, &id))
                    {
                        tracing::warn!(instance = %id, error = %e, "kill failed");
                    }
                }
                Effect::Cleanup => self.cleanup(service, index),
                Effect::Forget => {
                    if let Some(svc) = self.services.get_mut(service)
                        && let Some(inst) = svc.instances.remove(&index)
                    {
                        self.live.remove(&inst.id);
                        if let Err(e) = self.deps.store.delete(INSTANCES, &inst.id) {
                            tracing::warn!(instance = %inst.id, error = %e, "cannot remove the instance record");
                        }
                        if svc.deleting {
                            self.deps.runtime.remove_instance_files(&inst.id);
                        }
                        self.note_gone(service, &inst.id);
                    }
                }
            }
        }
    }

    fn instance_id(&self, service: &str, index: u32) -> Option<String> {
        Some(
            self.services
                .get(service)?
                .instances
                .get(&index)?
                .id
                .clone(),
        )
    }

    /// Start the slot with its service's current spec; the event says how it went.
    fn spawn(&mut self, service: &str, index: u32) -> Event {
        let Some(svc) = self.services.get_mut(service) else {
            return Event::StartFailed {
                error: "service gone".into(),
            };
        };
        let Some(inst) = svc.instances.get_mut(&index) else {
            return Event::StartFailed {
                error: "instance gone".into(),
            };
        };
        let spec = inst.spec.clone();
        let id = inst.id.clone();
        let revision = inst.revision;
        let Some(sockets) = svc.fds_for(&spec) else {
            return Event::StartFailed {
                error: "its listening sockets are not open (see the agent's log)".into(),
            };
        };
        let Some(inst) = svc.instances.get_mut(&index) else {
            return Event::StartFailed {
                error: "instance gone".into(),
            };
        };
        let path = cgroup_of(service, &id);
        let fail = |error: String| {
            tracing::warn!(instance = %id, %error, "start failed");
            Event::StartFailed { error }
        };
        let rt = &self.deps.runtime;
        let ports = match crate::runtime::assign_ports(&**rt, &spec) {
            Ok(p) => p,
            Err(e) => return fail(format!("assigning ports: {e}")),
        };
        let cg = &self.deps.cgroups;
        if let Err(e) = create_fresh(&**cg, &path, &spec.resources) {
            return fail(e.to_string());
        }
        if spec.isolation.devices == spec::Devices::Minimal
            && let Err(e) = cg.restrict_devices(&path)
        {
            return fail(e.to_string());
        }
        let procs = match cg.open_procs(&path) {
            Ok(p) => p,
            Err(e) => return fail(e.to_string()),
        };
        let dir = match cg.open_dir(&path) {
            Ok(d) => d,
            Err(e) => return fail(e.to_string()),
        };
        let spawned = match rt.spawn(StartRequest {
            spec: &spec,
            index,
            instance: &id,
            cgroup_procs: procs,
            cgroup_dir: dir,
            ports: &ports,
            listen_fds: &sockets,
        }) {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()),
        };
        inst.generation += 1;
        let generation = inst.generation;
        let pid = spawned.process.pid;
        tracing::info!(instance = %id, pid, revision, "instance started");
        self.watch(service, index, generation, spawned, ports);
        Event::Started { pid }
    }

    /// Keep what only a live instance has, and watch for its end.
    fn watch(
        &mut self,
        service: &str,
        index: u32,
        generation: u64,
        spawned: crate::runtime::Spawned,
        ports: BTreeMap<String, u16>,
    ) {
        let Some(inst) = self
            .services
            .get(service)
            .and_then(|s| s.instances.get(&index))
        else {
            return;
        };
        let id = inst.id.clone();
        let health = inst.spec.health.as_ref().map(|h| {
            let prober = h
                .probe
                .as_ref()
                .and_then(|p| match health::resolve(p, &ports) {
                    Ok(target) => {
                        // Exec probes run inside the instance: they need its cgroup too.
                        let (procs, dir) = match &target {
                            health::Target::Exec { .. } => {
                                let path = cgroup_of(service, &id);
                                (
                                    self.deps.cgroups.open_procs(&path).unwrap_or_default(),
                                    self.deps.cgroups.open_dir(&path).ok().flatten(),
                                )
                            }
                            _ => (Vec::new(), None),
                        };
                        let exec = self.deps.runtime.exec_runner(crate::runtime::ExecRequest {
                            process: &spawned.process,
                            spec: &inst.spec,
                            index,
                            instance: &id,
                            ports: &ports,
                            cgroup_procs: procs,
                            cgroup_dir: dir,
                        });
                        Some(Prober::start(
                            id.clone(),
                            generation,
                            target,
                            h,
                            exec,
                            self.probe_tx.clone(),
                        ))
                    }
                    Err(e) => {
                        tracing::error!(instance = %id, error = %e, "health probe not started");
                        None
                    }
                });
            let notify = h.notify.then(|| {
                let (rt, tx, id, service) = (
                    self.deps.runtime.clone(),
                    self.internal_tx.clone(),
                    id.clone(),
                    service.to_string(),
                );
                let task = tokio::spawn(async move {
                    let mut tick = tokio::time::interval(NOTIFY_POLL);
                    loop {
                        tick.tick().await;
                        if rt.notify_state(&id).is_some_and(|n| n.ready) {
                            let _ = tx.send(Internal::Ready {
                                service,
                                index,
                                generation,
                            });
                            return;
                        }
                    }
                });
                AbortOnDrop(task.abort_handle())
            });
            LiveHealth {
                tracker: Tracker::new(h, Instant::now()),
                _prober: prober,
                _notify: notify,
            }
        });
        self.live.insert(
            id,
            Live {
                process: spawned.process,
                start_time: spawned.start_time,
                main_pid: None,
                cpu_rate: None,
                rate_base: None,
                health,
                usage: None,
                ports,
            },
        );
        let tx = self.internal_tx.clone();
        let service = service.to_string();
        let exit_fut = spawned.exit;
        tokio::spawn(async move {
            let exit = exit_fut.await;
            let _ = tx.send(Internal::Exit {
                service,
                index,
                generation,
                exit,
            });
        });
    }

    /// A probe result: into the instance's tracker; an instance that stays unhealthy is
    /// replaced when the spec says so, a few at a time per service.
    fn on_probe(&mut self, report: ProbeReport) {
        let Some((service, index)) = split_instance_id(&report.instance) else {
            return;
        };
        let Some(svc) = self.services.get(service) else {
            return;
        };
        let Some(inst) = svc.instances.get(&index) else {
            return;
        };
        if inst.generation != report.generation || !matches!(inst.state, State::Running { .. }) {
            return;
        }
        let replicas = svc.d.spec.replicas;
        let in_progress = svc
            .instances
            .values()
            .filter(|i| {
                matches!(
                    i.state,
                    State::Stopping {
                        reason: StopReason::Unhealthy,
                        ..
                    }
                )
            })
            .count() as u32;
        let restart_on_failure = inst
            .spec
            .health
            .as_ref()
            .is_some_and(|h| h.restart_on_failure);
        let Some(h) = self
            .live
            .get_mut(&report.instance)
            .and_then(|l| l.health.as_mut())
        else {
            return;
        };
        if let Some(change) =
            h.tracker
                .observe(report.outcome.healthy, &report.outcome.reason, report.at)
        {
            tracing::info!(
                instance = %report.instance,
                from = change.from.as_str(),
                to = change.to.as_str(),
                reason = %change.reason,
                "health changed"
            );
            let first_ready =
                change.from == HealthState::Unknown && change.to == HealthState::Healthy;
            self.deps.events.append(
                service,
                Some(&report.instance),
                EventKind::HealthChanged {
                    from: change.from.as_str().to_string(),
                    to: change.to.as_str().to_string(),
                    reason: change.reason,
                },
            );
            if first_ready {
                self.deps.events.append(
                    service,
                    Some(&report.instance),
                    EventKind::Ready {
                        via: "probe".into(),
                    },
                );
            }
        }
        if h.tracker.state() == HealthState::Unhealthy && restart_on_failure {
            if health::may_restart_for_health(replicas, in_progress) {
                let service = service.to_string();
                tracing::info!(instance = %report.instance, "replacing an unhealthy instance");
                self.feed(&service, index, Event::StopRequested(StopReason::Unhealthy));
            } else {
                tracing::debug!(instance = %report.instance, in_progress, "health restart deferred (too many at once)");
            }
        }
    }

    /// `READY=1` from an instance: into its tracker.
    fn on_ready(&mut self, service: &str, index: u32, generation: u64) {
        let Some(inst) = self
            .services
            .get(service)
            .and_then(|s| s.instances.get(&index))
        else {
            return;
        };
        if inst.generation != generation {
            return;
        }
        let id = inst.id.clone();
        let Some(h) = self.live.get_mut(&id).and_then(|l| l.health.as_mut()) else {
            return;
        };
        let change = h.tracker.ready_by_notify(Instant::now());
        tracing::info!(instance = %id, "READY=1");
        self.deps.events.append(
            service,
            Some(&id),
            EventKind::Ready {
                via: "notify".into(),
            },
        );
        if let Some(change) = change {
            self.deps.events.append(
                service,
                Some(&id),
                EventKind::HealthChanged {
                    from: change.from.as_str().to_string(),
                    to: change.to.as_str().to_string(),
                    reason: change.reason,
                },
            );
        }
    }

    /// Each service's health from its instances, sent to subscribers when it changed.
    fn publish_health(&self) {
        let now: BTreeMap<String, ServiceHealth> = self
            .services
            .iter()
            .filter(|(_, s)| !s.deleting)
            .map(|(name, s)| (name.clone(), service_health(s, &self.live)))
            .collect();
        self.health_tx.send_if_modified(|old| {
            if *old == now {
                false
            } else {
                *old = now;
                true
            }
        });
    }

    /// Save what a later agent run needs to take this instance over.
    fn persist_instance(&self, service: &str, index: u32) {
        let Some(inst) = self
            .services
            .get(service)
            .and_then(|s| s.instances.get(&index))
        else {
            return;
        };
        let live = self.live.get(&inst.id);
        let state = match inst.state {
            State::Running { .. } => match live {
                Some(l) => RecordedState::Running {
                    pid: l.process.pid,
                    start_time: l.start_time,
                    boot_id: self.boot_id.clone(),
                },
                None => return,
            },
            State::Backoff { until } => RecordedState::Backoff {
                until: SystemTime::now() + until.saturating_duration_since(Instant::now()),
            },
            State::Exited => RecordedState::Exited,
            _ => return,
        };
        let record = InstanceRecord {
            service: service.to_string(),
            index,
            revision: inst.revision,
            epoch: inst.epoch,
            state,
            restarts: inst.restarts,
            failures: inst.failures,
            last_exit: inst.last_exit.clone(),
            last_error: inst.last_error.clone(),
            started_at: inst.started_at,
            ports: live.map(|l| l.ports.clone()).unwrap_or_default(),
        };
        let result = serde_json::to_vec(&record)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.deps
                    .store
                    .put_atomic(INSTANCES, &inst.id, &b)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::warn!(instance = %inst.id, error = %e, "cannot save the instance record");
        }
    }

    fn signal(&mut self, service: &str, index: u32) {
        let Some(inst) = self
            .services
            .get(service)
            .and_then(|s| s.instances.get(&index))
        else {
            return;
        };
        let Some(live) = self.live.get(&inst.id) else {
            return;
        };
        let sig = inst.spec.stop.signal;
        tracing::info!(instance = %inst.id, signal = %inst.spec.stop.signal_name, grace = ?inst.spec.stop.grace, "stopping");
        let reason = match inst.state {
            State::Stopping { reason, .. } => reason.as_str(),
            _ => "stop",
        };
        self.emit(
            service,
            Some(&inst.id),
            EventKind::Stopping {
                reason: reason.to_string(),
                signal: inst.spec.stop.signal_name.clone(),
            },
        );
        if let Err(e) = self.deps.runtime.signal(&live.process, sig) {
            tracing::warn!(instance = %inst.id, error = %e, "cannot send the stop signal");
        }
    }

    fn cleanup(&mut self, service: &str, index: u32) {
        let Some(id) = self.instance_id(service, index) else {
            return;
        };
        let path = cgroup_of(service, &id);
        let cg = self.deps.cgroups.clone();
        let tx = self.internal_tx.clone();
        let service = service.to_string();
        tokio::spawn(async move {
            let error = remove_when_empty(&*cg, &path, CLEANUP_TIMEOUT).await.err();
            let _ = tx.send(Internal::CleanupDone {
                service,
                index,
                error,
            });
        });
    }

    /// A deleted service whose instances are all gone: remove its cgroup, answer the callers.
    fn finish_delete(&mut self, name: &str) {
        let done =
            matches!(self.services.get(name), Some(s) if s.deleting && s.instances.is_empty());
        if !done {
            return;
        }
        let Some(svc) = self.services.remove(name) else {
            return;
        };
        if let Err(e) = self.deps.cgroups.remove(&CgroupPath::service(name)) {
            tracing::warn!(service = %name, error = %e, "cannot remove the service cgroup");
        }
        for (listen, _) in svc.sockets.values() {
            self.deps.runtime.unlink_socket(listen);
        }
        self.deps.runtime.release_service(name);
        tracing::info!(service = %name, "service deleted");
        self.emit(name, None, EventKind::Deleted);
        for w in svc.delete_waiters {
            let _ = w.send(Ok(Outcome::Deleted {
                name: name.to_string(),
                stopped: svc.stopped_on_delete,
            }));
        }
    }

    // ---------------------------------------------------------------------------------
    // Messages.

    fn on_internal(&mut self, m: Internal) {
        match m {
            Internal::Exit {
                service,
                index,
                generation,
                exit,
            } => self.on_exit(&service, index, generation, exit),
            Internal::CleanupDone {
                service,
                index,
                error,
            } => {
                if let Some(e) = error {
                    tracing::error!(service = %service, index, error = %e, "instance cgroup not removed");
                }
                self.feed(&service, index, Event::CleanupDone);
            }
            Internal::Ready {
                service,
                index,
                generation,
            } => self.on_ready(&service, index, generation),
        }
    }

    fn on_exit(&mut self, service: &str, index: u32, generation: u64, exit: InitExit) {
        let Some(inst) = self
            .services
            .get(service)
            .and_then(|s| s.instances.get(&index))
        else {
            return;
        };
        if inst.generation != generation || !inst.state.is_live() {
            return; // an earlier run's exit
        }
        let id = inst.id.clone();
        let killed = matches!(inst.state, State::Stopping { killed: true, .. });
        let path = cgroup_of(service, &id);
        self.live.remove(&id);
        let oom_now = self
            .deps
            .cgroups
            .stats(&path)
            .map(|s| s.oom_kills)
            .unwrap_or(0);
        // create() made a fresh cgroup for this run: its counter counts this run only.
        let oom_kills = oom_now;
        let observed = Observed {
            service_exit: exit.record.as_ref().map(|r| (r.code, r.signal)),
            init_status: match exit.status {
                ProcessStatus::Exited(c) => Some(Ok(c)),
                ProcessStatus::Signaled(s) => Some(Err(s)),
                ProcessStatus::Unknown => None,
            },
            oom_kills,
            killed_after_grace: killed,
        };
        let class = instance::classify(&observed);
        let setup_error = exit
            .spawn_error
            .clone()
            .or_else(|| exit.record.as_ref().and_then(|r| r.setup_error.clone()));
        tracing::info!(instance = %id, end = %class, oom_kills, error = setup_error.as_deref().unwrap_or(""), "instance ended");
        if oom_kills > 0 {
            self.emit(service, Some(&id), EventKind::OomKill { count: oom_kills });
        }
        if let Some(svc) = self.services.get_mut(service)
            && svc.deleting
        {
            svc.stopped_on_delete += 1;
        }
        self.feed(
            service,
            index,
            Event::Exited(ExitInfo {
                class,
                at: SystemTime::now(),
                setup_error,
            }),
        );
    }

    fn on_op(&mut self, op: Operation, reply: Reply) {
        let result = match op {
            Operation::Apply {
                spec,
                dry_run,
                force,
            } => self.apply(*spec, dry_run, force).map(Outcome::Applied),
            Operation::Restart { name, force } => self.restart(&name, force),
            Operation::Rollback {
                name,
                revision,
                force,
            } => self.rollback(&name, revision, force),
            Operation::GetRollout { id } => self.get_rollout(&id),
            Operation::Delete { name } => {
                match self.services.get_mut(&name) {
                    None => Err(SupervisorError::NotFound { name }),
                    Some(svc) => {
                        if !svc.deleting {
                            if let Err(e) = self.deps.store.delete(SERVICES, &name) {
                                let _ = reply.send(Err(SupervisorError::Storage(e.to_string())));
                                return;
                            }
                            svc.deleting = true;
                            tracing::info!(service = %name, "deleting");
                            if let Some(id) = svc.d.finish_running(
                                crate::rollout::record::State::Cancelled,
                                "the service is being deleted",
                                SystemTime::now(),
                            ) {
                                self.deps.events.append(
                                    &name,
                                    None,
                                    EventKind::RolloutFinished {
                                        rollout: id,
                                        state: "cancelled".into(),
                                        reason: "the service is being deleted".into(),
                                        rollback: None,
                                    },
                                );
                            }
                        }
                        // Answered once the instances are gone (finish_delete).
                        svc.delete_waiters.push(reply);
                        return;
                    }
                }
            }
            Operation::Get { name } => match self.services.get(&name) {
                Some(svc) => Ok(Outcome::Status(Box::new(status(
                    &self.deps,
                    &mut self.live,
                    &name,
                    svc,
                    true,
                )))),
                None => Err(SupervisorError::NotFound { name }),
            },
            Operation::List => Ok(Outcome::List(
                self.services
                    .iter()
                    .map(|(n, s)| status(&self.deps, &mut self.live, n, s, false))
                    .collect(),
            )),
            Operation::Scale { name, replicas } => self.scale(&name, replicas),
            Operation::Signal { instance, signal } => self.send_signal(&instance, signal),
            Operation::Summary => Ok(Outcome::Summary {
                services: self.services.len() as u32,
                instances: self.live.len() as u32,
            }),
        };
        let _ = reply.send(result);
    }

    /// Deliver `signal` to an instance's service process. Signals the init forwards go to
    /// the init (through its pidfd, immune to PID reuse); others (SIGKILL, SIGSTOP, ...) go
    /// straight to the service process.
    fn send_signal(&mut self, instance: &str, signal: i32) -> Result<Outcome, SupervisorError> {
        let not_found = || SupervisorError::InstanceNotFound {
            instance: instance.to_string(),
        };
        let (service, index) = split_instance_id(instance).ok_or_else(not_found)?;
        let inst = self
            .services
            .get(service)
            .and_then(|s| s.instances.get(&index))
            .ok_or_else(not_found)?;
        let live = match (inst.state, self.live.get(&inst.id)) {
            (State::Running { .. }, Some(l)) => l,
            (state, _) => {
                return Err(SupervisorError::NotRunning {
                    instance: instance.to_string(),
                    state: state.name().to_string(),
                });
            }
        };
        let main = live
            .main_pid
            .or_else(|| self.deps.runtime.main_pid(live.process.pid));
        let forwarded = crate::runtime::init::FORWARDED
            .iter()
            .any(|s| *s as i32 == signal);
        let (target, pid) = match (forwarded, main) {
            (true, _) => (live.process.clone(), main.unwrap_or(live.process.pid)),
            (false, Some(m)) => (
                ProcessRef {
                    pid: m,
                    pidfd: None,
                },
                m,
            ),
            (false, None) => {
                return Err(SupervisorError::NotRunning {
                    instance: instance.to_string(),
                    state: "starting".into(),
                });
            }
        };
        self.deps.runtime.signal(&target, signal).map_err(|e| {
            SupervisorError::Unenforceable(format!("signal {signal} to {instance}: {e}"))
        })?;
        tracing::info!(instance, signal, pid, "signal sent");
        Ok(Outcome::Signaled {
            instance: instance.to_string(),
            pid,
        })
    }

    /// What this host cannot enforce for `spec`, or what the spec needs that is not there.
    fn admission(&self, spec: &ServiceSpec) -> Result<(), SupervisorError> {
        let mut why = Vec::new();
        if let Some(r) = self.deps.cgroups.capabilities().refuse(&spec.resources) {
            why.push(r);
        }
        if let Some(r) = self
            .deps
            .cgroups
            .capabilities()
            .refuse_isolation(&spec.isolation)
        {
            why.push(r);
        }
        for ns in &spec.isolation.namespaces {
            if !self.deps.namespaces.contains(ns) {
                why.push(format!(
                    "isolation.namespaces: this host does not let the agent create a {} namespace",
                    ns.as_str()
                ));
            }
        }
        if let Err(e) = self.deps.runtime.preflight(spec) {
            why.push(e);
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(SupervisorError::Unenforceable(why.join("; ")))
        }
    }

    /// After a restart: every service's sockets (of its target spec and of the specs its
    /// instances run), taken back from its running instances where they hold them (the same
    /// sockets, never a second one on the address), else bound.
    fn acquire_sockets(&mut self) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let Some(svc) = self.services.get(&name) else {
                continue;
            };
            let mut wanted: BTreeMap<String, spec::ListenAddr> = BTreeMap::new();
            for spec in std::iter::once(&svc.d.spec).chain(svc.instances.values().map(|i| &i.spec))
            {
                for s in &spec.sockets {
                    wanted.insert(s.listen.to_string(), s.listen.clone());
                }
            }
            let mut sockets = rolling::SocketMap::new();
            for (key, listen) in wanted {
                let taken = svc
                    .instances
                    .values()
                    .filter(|inst| inst.spec.sockets.iter().any(|s| s.listen == listen))
                    .filter_map(|inst| self.live.get(&inst.id))
                    .find_map(|l| {
                        (0..16).find_map(|j| {
                            self.deps
                                .runtime
                                .take_socket(
                                    &l.process,
                                    crate::runtime::listen_fd_in_init(j),
                                    &listen,
                                )
                                .ok()
                        })
                    });
                let fd = match taken {
                    Some(fd) => {
                        tracing::info!(service = %name, listen = %listen, "took the listening socket back from a running instance");
                        Ok(fd)
                    }
                    None => self.deps.runtime.bind_socket(&listen),
                };
                match fd {
                    Ok(fd) => {
                        sockets.insert(key, (listen, Arc::new(fd)));
                    }
                    Err(e) => {
                        tracing::error!(service = %name, listen = %listen, error = %e, "cannot listen; instances cannot start");
                    }
                }
            }
            if let Some(svc) = self.services.get_mut(&name) {
                svc.sockets = sockets;
            }
        }
    }
}

/// A service's status. Usage comes from the cgroup's files: read now when `fresh` (`Get`),
/// else reused when read within [`USAGE_TTL`] (`List`, so listing many instances stays cheap).
fn status(
    deps: &Deps,
    live: &mut HashMap<String, Live>,
    name: &str,
    svc: &Service,
    fresh: bool,
) -> ServiceStatus {
    let now = Instant::now();
    let wall = SystemTime::now();
    let instances: Vec<InstanceStatus> = svc
        .instances
        .values()
        .map(|i| {
            let path = cgroup_of(name, &i.id);
            let l = live.get_mut(&i.id).filter(|_| i.state.is_live());
            let (pid, init_pid, usage, ports, log_dropped) = match l {
                Some(l) => {
                    if l.main_pid.is_none() {
                        l.main_pid = deps.runtime.main_pid(l.process.pid);
                    }
                    let recent = l.usage.filter(|(at, ..)| {
                        !fresh && now.saturating_duration_since(*at) < USAGE_TTL
                    });
                    let (usage, dropped) = match recent {
                        Some((_, u, d)) => (Some(u), d),
                        None => {
                            let u = deps.cgroups.stats(&path).ok();
                            let d = deps.runtime.log_stat(&i.id);
                            if let Some(u) = u {
                                l.usage = Some((now, u, d));
                                match l.rate_base {
                                    Some((t0, ns0))
                                        if now.saturating_duration_since(t0) >= RATE_MIN_SPAN =>
                                    {
                                        let span = now.saturating_duration_since(t0).as_secs_f64();
                                        l.cpu_rate = Some(
                                            u.cpu_usage_ns.saturating_sub(ns0) as f64 / 1e9 / span,
                                        );
                                        l.rate_base = Some((now, u.cpu_usage_ns));
                                    }
                                    Some(_) => {}
                                    None => l.rate_base = Some((now, u.cpu_usage_ns)),
                                }
                            }
                            (u, d)
                        }
                    };
                    (
                        l.main_pid,
                        Some(l.process.pid),
                        usage.map(|u| (u, l.cpu_rate)),
                        l.ports.clone(),
                        dropped,
                    )
                }
                None => (None, None, None, BTreeMap::new(), Default::default()),
            };
            let next_start_at = match i.state {
                State::Backoff { until } => Some(wall + until.saturating_duration_since(now)),
                _ => None,
            };
            InstanceStatus {
                id: i.id.clone(),
                index: i.index,
                revision: i.revision,
                epoch: i.epoch,
                state: i.state.name(),
                start_failed: matches!(i.state, State::Backoff { .. }) && i.last_error.is_some(),
                pid,
                init_pid,
                restarts: i.restarts,
                last_exit: i.last_exit.clone(),
                usage,
                started_at: if i.state.is_live() {
                    i.started_at
                } else {
                    None
                },
                next_start_at,
                last_error: i.last_error.clone(),
                cgroup: deps.cgroups.display_path(&path),
                ports,
                log_dropped,
                health: instance_health(i, live.get(&i.id)).as_str(),
                health_reason: live
                    .get(&i.id)
                    .and_then(|l| l.health.as_ref())
                    .map(|h| h.tracker.last_reason().to_string())
                    .unwrap_or_default(),
                notify_status: if i.spec.health.as_ref().is_some_and(|h| h.notify)
                    && i.state.is_live()
                {
                    deps.runtime
                        .notify_state(&i.id)
                        .map(|n| n.status)
                        .unwrap_or_default()
                } else {
                    String::new()
                },
            }
        })
        .collect();
    let running = instances.iter().filter(|i| i.state == "running").count() as u32;
    let healthy = instances.iter().filter(|i| i.health == "healthy").count() as u32;
    ServiceStatus {
        name: name.to_string(),
        revision: svc.d.revision,
        spec: svc.d.spec.clone(),
        desired: if svc.deleting { 0 } else { svc.d.spec.replicas },
        running,
        healthy,
        deleting: svc.deleting,
        health: service_health(svc, live).as_str(),
        instances,
        rollout: svc.d.rollout.clone(),
        revisions: svc.d.revisions(),
        paused: svc.d.paused,
    }
}

/// Create the instance's cgroup. A previous run's cgroup may still hold processes that are
/// dying from their SIGKILL for a moment (without a PID namespace nothing waits for them):
/// kill again and retry briefly before calling it a failed start.
fn create_fresh(
    cg: &dyn CgroupBackend,
    path: &CgroupPath,
    limits: &spec::Resources,
) -> Result<(), crate::cgroups::CgroupError> {
    let mut tries = 0;
    loop {
        match cg.create(path, limits) {
            Err(e) if e.is_busy() && tries < 20 => {
                tries += 1;
                let _ = cg.kill_all(path);
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// `web-2` -> (`web`, 2).
fn split_instance_id(id: &str) -> Option<(&str, u32)> {
    let (service, index) = id.rsplit_once('-')?;
    Some((service, index.parse().ok()?))
}

/// The health of one instance: its tracker's state when the service has `[health]`, else
/// healthy exactly while it runs.
fn instance_health(inst: &Instance, live: Option<&Live>) -> HealthState {
    if !matches!(inst.state, State::Running { .. }) {
        return HealthState::Unknown;
    }
    match live.and_then(|l| l.health.as_ref()) {
        Some(h) => h.tracker.state(),
        None if inst.spec.health.is_none() => HealthState::Healthy,
        None => HealthState::Unknown,
    }
}

fn service_health(svc: &Service, live: &HashMap<String, Live>) -> ServiceHealth {
    let instances: Vec<health::InstanceHealth> = svc
        .instances
        .values()
        .map(|i| health::InstanceHealth {
            running: matches!(i.state, State::Running { .. }),
            health: instance_health(i, live.get(&i.id)),
        })
        .collect();
    health::service_health(svc.d.spec.replicas, &instances)
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Kill what is left in a cgroup and remove it, retrying while it is busy.
async fn remove_when_empty(
    cg: &dyn CgroupBackend,
    path: &CgroupPath,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Err(e) = cg.kill_all(path) {
            tracing::debug!(cgroup = %path, error = %e, "kill before removal");
        }
        match cg.remove(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Stop one instance cgroup left by an earlier run: stop signal to its init, grace, SIGKILL,
/// removal. Ok(true) when processes were found and stopped.
async fn stop_leftover(
    cg: &dyn CgroupBackend,
    rt: &dyn Runtime,
    path: &CgroupPath,
    signal: i32,
    grace: Duration,
) -> Result<bool, String> {
    let pids = cg.procs(path).map_err(|e| e.to_string())?;
    let had = !pids.is_empty();
    if had {
        for root in rt.roots(&pids) {
            let _ = rt.signal(
                &ProcessRef {
                    pid: root,
                    pidfd: None,
                },
                signal,
            );
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if cg.procs(path).map(|p| p.is_empty()).unwrap_or(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    remove_when_empty(cg, path, LEFTOVER_KILL_TIMEOUT).await?;
    Ok(had)
}
