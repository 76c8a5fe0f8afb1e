//! One slot's transitions: an event goes into the instance's state machine, the transition is
//! recorded (saved, logged, put in the event log), and the effects it asks for are carried
//! out: spawning, the stop signal, SIGKILL to the cgroup, removing the cgroup, forgetting
//! the slot.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::slots::Service;
use super::{Driver, Internal, cgroup_of, ctx};
use crate::artifact::Prepared;
use crate::cgroups::{CPU_PERIOD_US, CgroupBackend, CgroupError, CgroupPath, start_cpu_period};
use crate::events::EventKind;
use crate::runtime::image::ImageRun;
use crate::runtime::{Spawned, StartRequest, assign_ports};
use crate::spec::artifact::Package;
use crate::spec::{Devices, InstanceKey, Resources};
use crate::supervisor::Deleted;
use crate::supervisor::instance::{Effect, Event, State, StopReason, new_incarnation};

/// How long the removal of an instance's cgroup keeps killing and retrying.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One transition of a slot, as recorded.
struct Transition {
    id: String,
    revision: u64,
    /// Failed runs in a row after it (the restart attempt a backoff leads to).
    failures: u32,
    before: State,
    after: State,
}

impl Transition {
    /// The state changed (not only its data: a stop reason, a deadline).
    fn changed(&self) -> bool {
        self.before.phase() != self.after.phase()
    }
}

/// The event log's entries for one transition caused by `event`, in order, at `now`.
fn transition_events(t: &Transition, event: &Event, now: Instant) -> Vec<EventKind> {
    let mut out = Vec::new();
    match (event, t.after) {
        (Event::Started { pid }, State::Running { .. }) if t.changed() => {
            out.push(EventKind::InstanceStarted {
                pid: *pid,
                revision: t.revision,
            })
        }
        (Event::StartFailed { error }, _) if t.changed() => out.push(EventKind::StartFailed {
            error: error.clone(),
        }),
        (Event::Exited(exit), _) if t.changed() => {
            let (code, signal) = exit.class.code_and_signal();
            out.push(EventKind::InstanceExited {
                end: exit.class,
                code,
                signal,
                detail: exit.setup_error.clone(),
            })
        }
        (Event::GraceExpired, State::Stopping { killed: true, .. })
            if matches!(t.before, State::Stopping { killed: false, .. }) =>
        {
            out.push(EventKind::Killed {
                reason: "grace period expired".into(),
            })
        }
        _ => {}
    }
    if let (State::Backoff { until }, true) = (t.after, t.changed()) {
        out.push(EventKind::RestartScheduled {
            delay_ms: crate::num::millis(until.saturating_duration_since(now)),
            attempt: t.failures,
        });
    }
    out
}

impl Driver {
    /// Feed one event to one slot and carry out what it asks for.
    pub(super) fn feed(&mut self, key: &InstanceKey, event: Event) {
        let Some(slot) = self.services.slot_mut(key) else {
            return;
        };
        let inst = &mut slot.instance;
        let before = inst.state;
        let effects = inst.handle(event.clone(), &ctx());
        let t = Transition {
            id: inst.id.clone(),
            revision: inst.revision,
            failures: inst.history.failures,
            before,
            after: inst.state,
        };
        if t.changed()
            && matches!(
                t.after,
                State::Running { .. } | State::Backoff { .. } | State::Exited
            )
        {
            self.persist_instance(key);
        }
        self.record_transition(key, &t, &event);
        self.apply_effects(key, effects);
        self.job_transition(key, t.before, t.after, &event);
    }

    /// The event log entries and log lines for one transition.
    fn record_transition(&self, key: &InstanceKey, t: &Transition, event: &Event) {
        let now = Instant::now();
        for kind in transition_events(t, event, now) {
            if let EventKind::Killed { .. } = kind {
                tracing::warn!(instance = %t.id, "did not stop within its grace period: SIGKILL");
            }
            self.emit(&key.service, Some(&t.id), kind);
        }
        if !t.changed() {
            return;
        }
        match t.after {
            State::Backoff { until } => {
                let delay_ms = crate::num::millis(until.saturating_duration_since(now));
                tracing::info!(instance = %t.id, delay_ms, failures = t.failures, "restart scheduled");
            }
            State::Exited => tracing::info!(instance = %t.id, "not restarted (restart policy)"),
            _ => {
                tracing::debug!(instance = %t.id, from = %t.before.phase(), to = %t.after.phase(), "state")
            }
        }
    }

    fn apply_effects(&mut self, key: &InstanceKey, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Spawn => {
                    let ev = self.spawn(key);
                    self.feed(key, ev);
                }
                Effect::Signal(reason) => self.stop_signal(key, reason),
                Effect::KillAll => self.kill_all(key),
                Effect::Cleanup => self.cleanup(key),
                Effect::Forget => self.forget(key),
            }
        }
    }

    /// Start the slot with its spec; the event says how it went.
    pub(super) fn spawn(&mut self, key: &InstanceKey) -> Event {
        match self.start_process(key) {
            Ok((generation, spawned, ports)) => {
                let pid = spawned.process.pid;
                let revision = self.services.slot(key).map_or(0, |s| s.instance.revision);
                tracing::info!(instance = %key, pid, revision, "instance started");
                self.watch(key, generation, spawned, ports);
                Event::Started { pid }
            }
            Err(error) => {
                tracing::warn!(instance = %key, %error, "start failed");
                Event::StartFailed { error }
            }
        }
    }

    /// A fresh cgroup with the spec's limits, ports, and the instance's process in them.
    /// Returns the run's generation, the process and its ports.
    fn start_process(
        &mut self,
        key: &InstanceKey,
    ) -> Result<(u64, Spawned, BTreeMap<String, u16>), String> {
        let begin_ns = crate::phases::now_ns();
        let svc = self.services.get(&key.service).ok_or("service gone")?;
        let inst = &svc.slots.get(&key.index).ok_or("instance gone")?.instance;
        let (spec, id) = (inst.spec.clone(), inst.id.clone());
        let incarnation = new_incarnation();
        let prepared = match &spec.package {
            None => None,
            Some(_) => Some(svc.packages.prepared(inst.revision).ok_or_else(|| {
                format!(
                    "the package of revision {} is not in the store yet",
                    inst.revision
                )
            })?),
        };
        let artifact = prepared
            .filter(|_| matches!(spec.package, Some(Package::Artifact(_))))
            .map(|p| p.path.clone());
        let image = prepared
            .filter(|_| matches!(spec.package, Some(Package::Image(_))))
            .map(image_run);
        let sockets = svc
            .fds_for(&spec)
            .ok_or("its listening sockets are not open (see the agent's log)")?;
        let ports = assign_ports(&*self.deps.sockets, &spec)
            .map_err(|e| format!("assigning ports: {e}"))?;
        let cg = &*self.deps.cgroups;
        let path = cgroup_of(key);
        let cap = svc.slots.get(&key.index).and_then(|s| s.start_cap);
        let cap = cap.map(|c| spec.resources.cpu.map_or(c, |own| own.min(c)));
        // A capped start writes its CPU limit once, the cap.
        let limits = Resources {
            cpu: spec.resources.cpu.filter(|_| cap.is_none()),
            ..spec.resources
        };
        create_fresh(cg, &path, &limits).map_err(|e| e.to_string())?;
        if spec.isolation.devices == Devices::Minimal {
            cg.restrict_devices(&path).map_err(|e| e.to_string())?;
        }
        if let Some(cores) = cap
            && let Err(e) = cg.set_cpu_limit(&path, Some(cores), start_cpu_period(cores))
        {
            // Not fatal: the instance starts as any other, under its own limit.
            tracing::warn!(instance = %id, error = %e, "rollout.start_cpu not applied");
            if spec.resources.cpu.is_some() {
                cg.set_cpu_limit(&path, spec.resources.cpu, CPU_PERIOD_US)
                    .map_err(|e| e.to_string())?;
            }
        }
        let procs = cg.open_procs(&path).map_err(|e| e.to_string())?;
        let dir = cg.open_dir(&path).map_err(|e| e.to_string())?;
        let cgroup_ns = crate::phases::now_ns();
        // Set before the spawn, so that a failed start is reported under its own id.
        if let Some(slot) = self.services.slot_mut(key) {
            slot.instance.incarnation = incarnation;
        }
        let spawned = self
            .deps
            .processes
            .spawn(StartRequest {
                spec: &spec,
                index: key.index,
                instance: &id,
                incarnation,
                cgroup_procs: procs,
                cgroup_dir: dir,
                ports: &ports,
                listen_fds: &sockets,
                artifact: artifact.as_deref(),
                image: image.as_ref(),
            })
            .map_err(|e| e.to_string())?;
        tracing::debug!(
            target: crate::phases::TARGET,
            instance = %id,
            pid = spawned.process.pid,
            begin_ns,
            cgroup_ns,
            spawned_ns = crate::phases::now_ns(),
            "start"
        );
        let inst = &mut self.services.slot_mut(key).ok_or("instance gone")?.instance;
        inst.generation += 1;
        Ok((inst.generation, spawned, ports))
    }

    /// The instance is ready (or its rollout no longer waits for it): its start cap, if it
    /// has one, gives way to its own CPU limit.
    pub(super) fn lift_start_cap(&mut self, key: &InstanceKey) {
        let Some(slot) = self.services.slot_mut(key) else {
            return;
        };
        if slot.start_cap.take().is_none() || slot.live.is_none() {
            return;
        }
        let own = slot.instance.spec.resources.cpu;
        let path = cgroup_of(key);
        match self.deps.cgroups.set_cpu_limit(&path, own, CPU_PERIOD_US) {
            Ok(()) => tracing::debug!(instance = %key, "start cpu cap lifted"),
            Err(e) => {
                tracing::warn!(instance = %key, error = %e, "start cpu cap not lifted");
            }
        }
    }

    /// Send the stop signal of the spec the instance runs.
    fn stop_signal(&self, key: &InstanceKey, reason: StopReason) {
        let Some(slot) = self.services.slot(key) else {
            return;
        };
        let Some(live) = &slot.live else {
            return;
        };
        let (inst, stop) = (&slot.instance, &slot.instance.spec.stop);
        tracing::info!(instance = %inst.id, signal = %stop.signal_name, grace = ?stop.grace, "stopping");
        self.emit(
            &key.service,
            Some(&inst.id),
            EventKind::Stopping {
                reason,
                signal: stop.signal_name.clone(),
            },
        );
        if let Err(e) = self.deps.processes.signal(&live.process, stop.signal) {
            tracing::warn!(instance = %inst.id, error = %e, "cannot send the stop signal");
        }
    }

    /// SIGKILL to everything in the instance's cgroup.
    fn kill_all(&self, key: &InstanceKey) {
        if self.services.slot(key).is_some()
            && let Err(e) = self.deps.cgroups.kill_all(&cgroup_of(key))
        {
            tracing::warn!(instance = %key, error = %e, "kill failed");
        }
    }

    /// Empty and remove the instance's cgroup, in a task; it reports back when done.
    fn cleanup(&self, key: &InstanceKey) {
        if self.services.slot(key).is_none() {
            return;
        }
        let path = cgroup_of(key);
        let cg = self.deps.cgroups.clone();
        let tx = self.internal_tx.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let error = remove_when_empty(&*cg, &path, CLEANUP_TIMEOUT).await.err();
            let _ = tx.send(Internal::CleanupDone { key, error });
        });
    }

    pub(super) fn on_cleanup_done(&mut self, key: &InstanceKey, error: Option<String>) {
        if let Some(e) = error {
            tracing::error!(instance = %key, error = %e, "instance cgroup not removed");
        }
        self.feed(key, Event::CleanupDone);
    }

    /// Drop a removed slot, its record, and with its service its files.
    fn forget(&mut self, key: &InstanceKey) {
        let Some(svc) = self.services.get_mut(&key.service) else {
            return;
        };
        let Some(slot) = svc.slots.remove(&key.index) else {
            return;
        };
        let (id, deleting) = (slot.instance.id, svc.deleting);
        // Files first: a crash between the two leaves the record, and the slot with it, for
        // the next start to finish.
        if deleting {
            self.deps.files.remove_instance_files(&id);
        }
        self.forget_record(&id);
        self.note_gone(&key.service, &id);
    }

    /// A deleted service whose instances are all gone: remove its cgroup, answer the callers.
    pub(super) fn finish_delete(&mut self, name: &str) {
        let done = self
            .services
            .get(name)
            .is_some_and(|s| s.deleting && s.slots.is_empty());
        if !done {
            return;
        }
        self.unpin_except(name, &[]);
        self.forget_job(name);
        let Some(Service {
            sockets,
            delete_waiters,
            stopped_on_delete,
            d,
            ..
        }) = self.services.remove(name)
        else {
            return;
        };
        if let Err(e) = self.deps.cgroups.remove(&CgroupPath::service(name)) {
            tracing::warn!(service = %name, error = %e, "cannot remove the service cgroup");
        }
        for (listen, _) in sockets.values() {
            self.deps.sockets.unlink_socket(listen);
        }
        self.deps.processes.release_service(name);
        // Last: until here, the next start would finish this delete.
        if let Err(e) = self.clear_delete(name) {
            tracing::error!(service = %name, error = %e, "cannot mark the delete as finished: the next start finishes it again, unless the name is applied first");
        }
        tracing::info!(service = %name, "service deleted");
        self.emit(name, None, EventKind::Deleted);
        for w in delete_waiters {
            super::answer(
                w,
                Ok(Deleted {
                    name: name.to_string(),
                    stopped: stopped_on_delete,
                    generation: d.generation,
                }),
            );
        }
    }
}

/// Create the instance's cgroup. A previous run's cgroup may still hold processes that are
/// dying from their SIGKILL for a moment (without a PID namespace nothing waits for them):
/// kill again and retry briefly before calling it a failed start.
fn create_fresh(
    cg: &dyn CgroupBackend,
    path: &CgroupPath,
    limits: &Resources,
) -> Result<(), CgroupError> {
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

/// Remove a cgroup, killing what is left in it and retrying while it is busy. Removed at
/// once when empty (an instance whose init ended: its PID namespace went with it), without
/// reading its processes first.
pub(super) async fn remove_when_empty(
    cg: &dyn CgroupBackend,
    path: &CgroupPath,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut killed = false;
    loop {
        match cg.remove(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                if let Err(e) = cg.kill_all(path) {
                    tracing::debug!(cgroup = %path, error = %e, "kill before removal");
                }
                // Tried again at once after the first kill, then every 10 ms.
                if killed {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                killed = true;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// An image's rootfs and config defaults, as the runtime takes them.
fn image_run(p: &Prepared) -> ImageRun {
    let config = p.image.clone().unwrap_or_default();
    ImageRun {
        rootfs: p.path.clone(),
        entrypoint: config.entrypoint,
        cmd: config.cmd,
        env: config.env,
        working_dir: config.working_dir,
        user: config.user.map(|u| (u.uid, u.gid)),
    }
}
