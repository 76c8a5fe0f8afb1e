//! The driver with recording fakes for the OS: what it asks the runtime, the cgroups and the
//! store to do, under paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::artifact::fake::FakePackages;
use crate::cgroups::recording::RecordingCgroups;
use crate::cgroups::{CgroupPath, Control};
use crate::rollout::record::Step;
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{ExitRecord, InitExit, ProcessStatus};
use crate::spec::Namespace;
use crate::store::{MemStore, Store};

mod autoscale;
mod packages;

struct Rig {
    rt: Arc<FakeRuntime>,
    packages: Arc<FakePackages>,
    cg: Arc<RecordingCgroups>,
    store: Arc<MemStore>,
    handle: SupervisorHandle,
    stop: CancellationToken,
    events: Arc<crate::events::EventLog>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn deps(f: &Fakes, events: &Arc<crate::events::EventLog>) -> Deps {
    Deps::new(
        f.rt.clone(),
        f.cg.clone(),
        f.store.clone(),
        Namespace::ALL.to_vec(),
        events.clone(),
    )
    .with_packages(f.packages.clone())
}

async fn rig_with(cg: RecordingCgroups, store: Arc<MemStore>) -> Rig {
    let fakes = Fakes {
        rt: Arc::new(FakeRuntime::new()),
        packages: Arc::new(FakePackages::new()),
        cg: Arc::new(cg),
        store,
    };
    fakes.start().await
}

/// A driver over existing fakes: a second driver on the same fakes is an agent restart.
async fn rig_shared(f: &Fakes) -> Rig {
    rig_on(f, CpuWeights::PerInstance { parent: false }).await
}

/// A driver over `f` that weighs the cgroups as `weights` says.
async fn rig_on(f: &Fakes, weights: CpuWeights) -> Rig {
    let events = Arc::new(crate::events::EventLog::in_memory(10_000));
    let (mut driver, handle) = Driver::new(deps(f, &events).with_cpu_weights(weights));
    driver.restore().await;
    let stop = CancellationToken::new();
    tokio::spawn(driver.run(stop.clone()));
    Rig {
        rt: f.rt.clone(),
        packages: f.packages.clone(),
        cg: f.cg.clone(),
        store: f.store.clone(),
        handle,
        stop,
        events,
    }
}

/// A rig's fakes for the OS: a driver started again on them is the agent started again.
struct Fakes {
    rt: Arc<FakeRuntime>,
    packages: Arc<FakePackages>,
    cg: Arc<RecordingCgroups>,
    store: Arc<MemStore>,
}

impl Fakes {
    async fn start(&self) -> Rig {
        rig_shared(self).await
    }
}

impl Rig {
    fn fakes(&self) -> Fakes {
        Fakes {
            rt: self.rt.clone(),
            packages: self.packages.clone(),
            cg: self.cg.clone(),
            store: self.store.clone(),
        }
    }
}

/// A rig running [`WEB`]'s three instances.
async fn web() -> Rig {
    let r = rig().await;
    r.apply(WEB).await.expect("apply");
    settle().await;
    r
}

async fn rig() -> Rig {
    rig_with(RecordingCgroups::default(), Arc::new(MemStore::new())).await
}

fn spec(text: &str) -> Box<ServiceSpec> {
    Box::new(crate::spec::parse_toml(text).expect("valid spec"))
}

const WEB: &str = "name = \"web\"\ncommand = [\"/bin/app\"]\nreplicas = 3\n[restart]\nbackoff = \"1s\"\nbackoff_max = \"4s\"\n[stop]\ngrace = \"5s\"\n";

/// `fut`'s output, or a failed test naming `what` when it is not there within a minute of
/// paused time or of real time: a wait nothing will end (the driver idle, or spinning, which
/// stops paused time) fails with a message instead of hanging the test.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    const BOUND: Duration = Duration::from_secs(60);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(BOUND);
        let _ = tx.send(());
    });
    tokio::select! {
        v = fut => v,
        _ = tokio::time::sleep(BOUND) => panic!("{what}: not done within {BOUND:?} (paused time)"),
        _ = rx => panic!("{what}: not done within {BOUND:?} (real time)"),
    }
}

/// Let the driver and the exit watchers run (time is paused: this advances it a little).
async fn settle() {
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl Rig {
    /// Every event so far.
    async fn events(&self) -> Vec<crate::events::Event> {
        let end = self.events.next();
        let mut w = self
            .events
            .watch(0, crate::events::Filter::all())
            .expect("watch");
        let mut out: Vec<crate::events::Event> = Vec::new();
        while out.last().map_or(self.events.oldest(), |e| e.index + 1) < end {
            out.push(w.next().await.expect("event"));
        }
        out
    }

    async fn apply(&self, text: &str) -> Result<ApplyOutcome, SupervisorError> {
        self.handle.apply(*spec(text), false, false).await
    }

    async fn status(&self, name: &str) -> ServiceStatus {
        self.handle.get(name).await.expect("status")
    }

    /// Init PIDs of the running instances, in index order.
    async fn pids(&self, name: &str) -> Vec<i32> {
        self.running(name)
            .await
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// Each instance's restarts, by index.
    async fn restarts(&self, name: &str) -> Vec<u32> {
        let s = self.status(name).await;
        s.instances.iter().map(|i| i.restarts).collect()
    }

    /// Init PIDs of the running instances, by index.
    async fn running(&self, name: &str) -> Vec<(u32, i32)> {
        self.status(name)
            .await
            .instances
            .iter()
            .filter(|i| i.state == Phase::Running)
            .filter_map(|i| Some((i.index, i.init_pid?)))
            .collect()
    }

    fn exit(&self, pid: i32, status: ProcessStatus, record: Option<ExitRecord>) {
        assert!(
            self.rt.exit(
                pid,
                InitExit {
                    status,
                    record,
                    spawn_error: None,
                }
            ),
            "pid {pid} was running"
        );
    }
}

impl Rig {
    /// The service of init `pid` exited with `code`, and so did its init.
    fn exited(&self, pid: i32, code: i32) {
        self.exit(pid, ProcessStatus::Exited(code), exited(code));
    }
}

/// The init's record of a service that exited with `code`.
fn exited(code: i32) -> Option<ExitRecord> {
    Some(ExitRecord {
        code: Some(code),
        ..ExitRecord::default()
    })
}

fn killed(sig: i32) -> Option<ExitRecord> {
    Some(ExitRecord {
        signal: Some(sig),
        ..ExitRecord::default()
    })
}

#[tokio::test(start_paused = true)]
async fn apply_starts_replicas_with_limits_and_persists() {
    let r = rig().await;
    let text = format!("{WEB}[resources]\nmemory = \"64MiB\"\npids = 10\n");
    let a = r.apply(&text).await.expect("apply");
    assert_eq!((a.kind, a.revision), (ApplyKind::Created, 1));
    settle().await;
    assert_eq!(r.rt.spawns().len(), 3);
    assert_eq!(r.running("web").await.len(), 3);
    let path = CgroupPath::instance("web", "web-1");
    let e = r.cg.entry(&path).expect("instance cgroup created");
    assert_eq!(e.limits.memory, Some(64 << 20));
    assert_eq!(e.limits.pids, Some(10));
    assert!(e.devices_restricted, "devices denied by default");
    assert_eq!(
        r.store.list("services").expect("list").len(),
        1,
        "desired state saved"
    );
    // The same spec again is a no-op.
    let again = r.apply(&text).await.expect("apply");
    assert_eq!((again.kind, again.revision), (ApplyKind::Unchanged, 1));
    settle().await;
    assert_eq!(r.rt.spawns().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn crash_restarts_after_growing_backoff() {
    let r = web().await;
    let (idx, pid) = r.running("web").await[0];
    let start = tokio::time::Instant::now();
    r.exited(pid, 1);
    settle().await;
    let s = r.status("web").await;
    let i = s.instances.iter().find(|i| i.index == idx).expect("slot");
    assert_eq!(i.state, Phase::Backoff);
    assert_eq!(
        i.last_exit.as_ref().map(|e| e.class),
        Some(ExitClass::Exited(1))
    );
    assert!(i.next_start_at.is_some());
    // 1 s minus at most 10 % jitter.
    tokio::time::sleep(Duration::from_millis(880)).await;
    assert_eq!(r.rt.spawns().len(), 3, "not before the backoff");
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(r.rt.spawns().len(), 4, "restarted after the backoff");
    assert!(start.elapsed() >= Duration::from_millis(900));
    let s = r.status("web").await;
    assert_eq!(
        s.instances
            .iter()
            .find(|i| i.index == idx)
            .map(|i| i.restarts),
        Some(1)
    );
}

#[tokio::test(start_paused = true)]
async fn oom_is_read_from_the_cgroup_and_sigkill_alone_is_not_oom() {
    let r = rig().await;
    r.apply(
        "name = \"m\"\ncommand = [\"/bin/app\"]\nreplicas = 2\n[resources]\nmemory = \"64MiB\"\n",
    )
    .await
    .expect("apply");
    settle().await;
    let running = r.running("m").await;
    let (i0, p0) = running[0];
    let (i1, p1) = running[1];
    r.cg.set_oom_kills(&CgroupPath::instance("m", &format!("m-{i0}")), 1);
    r.exit(p0, ProcessStatus::Exited(137), killed(9));
    r.exit(p1, ProcessStatus::Exited(137), killed(9));
    settle().await;
    let s = r.status("m").await;
    let class = |idx| {
        s.instances
            .iter()
            .find(|i| i.index == idx)
            .and_then(|i| i.last_exit.as_ref())
            .map(|e| e.class)
    };
    assert_eq!(class(i0), Some(ExitClass::OomKilled));
    assert_eq!(class(i1), Some(ExitClass::Signaled(9)));
}

/// Scale changes only `replicas`, but a spec may be valid with one instance and not with
/// more: a fixed port would be bound by every instance of the host's network. Scale is held
/// to the same rules as Apply, and a refused scale changes nothing.
#[tokio::test(start_paused = true)]
async fn scale_is_refused_where_the_spec_would_not_be_valid() {
    let r = rig().await;
    r.apply("name = \"web\"\ncommand = [\"/bin/app\"]\n[ports]\nadmin = 8080\n")
        .await
        .expect("one instance on a fixed port");
    settle().await;
    let e = r
        .handle
        .scale("web", 3, false)
        .await
        .expect_err("three instances on one fixed port");
    assert!(matches!(e, SupervisorError::InvalidSpec(_)), "{e:?}");
    assert!(e.to_string().contains("ports.admin:"), "{e}");
    settle().await;
    let s = r.status("web").await;
    assert_eq!((s.desired, s.spec.replicas, s.instances.len()), (1, 1, 1));
    // Scaling to zero or one stays possible.
    let scaled = r
        .handle
        .scale("web", 0, false)
        .await
        .expect("scale to zero");
    assert_eq!(scaled.replicas, 0);
}

#[tokio::test(start_paused = true)]
async fn scale_down_stops_the_highest_and_removes_its_cgroup() {
    let r = web().await;
    let pid2 = r
        .running("web")
        .await
        .into_iter()
        .find(|(i, _)| *i == 2)
        .expect("web-2")
        .1;
    let scaled = r.handle.scale("web", 2, false).await.expect("scale");
    assert_eq!((scaled.previous, scaled.replicas), (3, 2));
    settle().await;
    assert_eq!(r.rt.signals(), vec![(pid2, libc::SIGTERM)]);
    r.exited(pid2, 0);
    settle().await;
    let s = r.status("web").await;
    assert_eq!(s.instances.len(), 2);
    assert!(
        r.cg.entry(&CgroupPath::instance("web", "web-2")).is_none(),
        "cgroup removed"
    );
    assert_eq!(r.rt.spawns().len(), 3, "nothing else restarted");
}

#[tokio::test(start_paused = true)]
async fn an_ignored_stop_is_killed_after_grace_and_classified_stop_timeout() {
    let r = rig().await;
    let one = WEB.replace("replicas = 3", "replicas = 1");
    r.apply(&one).await.expect("apply");
    settle().await;
    let (_, pid) = r.running("web").await[0];
    // An update replaces the instance: its successor is ready (running for min_healthy, 500ms),
    // then the stop signal, the grace period, SIGKILL.
    r.apply(&one.replace("/bin/app", "/bin/app2"))
        .await
        .expect("update");
    settle().await;
    assert!(r.rt.signals().is_empty(), "the old one runs on meanwhile");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(r.rt.signals(), vec![(pid, libc::SIGTERM)]);
    let path = CgroupPath::instance("web", "web-0");
    tokio::time::sleep(Duration::from_millis(4700)).await;
    assert!(
        !r.cg.kills().contains(&path),
        "no SIGKILL within the grace period"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        r.cg.kills().contains(&path),
        "SIGKILL after the grace period"
    );
    r.exit(pid, ProcessStatus::Signaled(9), None);
    settle().await;
    let s = r.status("web").await;
    assert_eq!(s.instances.len(), 1);
    let i = &s.instances[0];
    assert_eq!(
        (i.id.as_str(), i.state, i.revision),
        ("web-1", Phase::Running, 2),
        "replaced by the new revision"
    );
    let ended: Vec<ExitClass> = r
        .events()
        .await
        .into_iter()
        .filter(|e| e.instance.as_deref() == Some("web-0"))
        .filter_map(|e| match e.kind {
            crate::events::EventKind::InstanceExited { end, .. } => Some(end),
            _ => None,
        })
        .collect();
    assert_eq!(ended, vec![ExitClass::StopTimeout]);
}

#[tokio::test(start_paused = true)]
async fn update_starts_each_new_instance_before_stopping_an_old_one() {
    let r = web().await;
    let old = r.pids("web").await;
    let a = r
        .apply(&WEB.replace("/bin/app", "/bin/app2"))
        .await
        .expect("update");
    assert_eq!(
        (a.kind, a.revision, a.replaces_instances),
        (ApplyKind::Updated, 2, true)
    );
    let id = a.rollout_id.expect("a rollout");
    settle().await;
    for n in 0..3 {
        assert_eq!(r.rt.spawns().len(), 4 + n, "one new instance (max_surge 1)");
        assert_eq!(
            r.rt.signals().len(),
            n,
            "no old one stopped before it is ready"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(r.rt.signals().len(), n + 1, "then one old one stops");
        let (pid, _) = *r.rt.signals().last().expect("a stop signal");
        r.exited(pid, 0);
        settle().await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = r.status("web").await;
    assert_eq!(s.instances.len(), 3);
    assert!(
        s.instances
            .iter()
            .all(|i| i.revision == 2 && i.state == Phase::Running)
    );
    let spawned = r.rt.spawns();
    assert!(spawned[3..].iter().all(|sp| sp.command == ["/bin/app2"]));
    assert!(old.iter().all(|p| !r.rt.running().contains(p)));
    let rollout = s.rollout.expect("the rollout is reported");
    assert_eq!(
        (
            rollout.id.as_str(),
            rollout.state.as_str(),
            rollout.replaced,
            rollout.to_replace
        ),
        (id.as_str(), "succeeded", 3, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn cpu_weights_follow_the_running_instances() {
    let r = web().await;
    let (svc, root) = (CgroupPath::service("web"), CgroupPath::root());
    assert_eq!((r.cg.weight(&svc), r.cg.weight(&root)), (Some(3), Some(3)));
    assert_eq!(r.cg.weight(&CgroupPath::parent()), None, "not asked to");
    // An instance waiting out its backoff runs nothing, so it weighs nothing.
    let pids = r.pids("web").await;
    r.exited(pids[0], 1);
    settle().await;
    assert_eq!((r.cg.weight(&svc), r.cg.weight(&root)), (Some(2), Some(2)));
    let writes = r.cg.weights().len();
    settle().await;
    assert_eq!(r.cg.weights().len(), writes, "only a change is written");
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(r.cg.weight(&svc), Some(3), "restarted after its backoff");
    let pids = r.pids("web").await;
    assert_eq!(pids.len(), 3);
    let h = r.handle.clone();
    let del = tokio::spawn(async move { h.delete("web", false).await });
    settle().await;
    for p in pids {
        r.exited(p, 0);
    }
    settle().await;
    within("the delete", del)
        .await
        .expect("join")
        .expect("deleted");
    assert_eq!(r.cg.weight(&root), Some(0), "an empty tree");
    // The same name again is a new cgroup: its weight is written again.
    r.apply(WEB).await.expect("apply");
    settle().await;
    assert_eq!((r.cg.weight(&svc), r.cg.weight(&root)), (Some(3), Some(3)));
    assert_eq!(
        r.cg.weights()
            .iter()
            .filter(|(p, n)| *p == svc && *n == 3)
            .count(),
        3,
        "{:?}",
        r.cg.weights()
    );
}

/// Fakes on which nothing runs yet.
fn fresh_fakes() -> Fakes {
    Fakes {
        rt: Arc::new(FakeRuntime::new()),
        packages: Arc::new(FakePackages::new()),
        cg: Arc::new(RecordingCgroups::default()),
        store: Arc::new(MemStore::new()),
    }
}

/// Fixed weights: one process's, written once per cgroup (what undoes an earlier
/// per-instance run), whatever the count; the parent never.
#[tokio::test(start_paused = true)]
async fn fixed_cpu_weights_are_one_process_written_once() {
    let r = rig_on(&fresh_fakes(), CpuWeights::Fixed).await;
    r.apply(WEB).await.expect("apply");
    settle().await;
    assert_eq!(r.rt.spawns().len(), 3);
    let (svc, root) = (CgroupPath::service("web"), CgroupPath::root());
    let mut writes = r.cg.weights();
    writes.sort();
    assert_eq!(writes, vec![(root, 1), (svc, 1)]);
    r.exited(r.pids("web").await[0], 1);
    settle().await;
    assert_eq!(r.cg.weights().len(), 2, "{:?}", r.cg.weights());
}

#[tokio::test(start_paused = true)]
async fn a_relative_parent_is_weighed_with_the_tree() {
    let r = rig_on(&fresh_fakes(), CpuWeights::PerInstance { parent: true }).await;
    r.apply(WEB).await.expect("apply");
    settle().await;
    assert_eq!(r.cg.weight(&CgroupPath::parent()), Some(3));
}

#[tokio::test(start_paused = true)]
async fn delete_answers_once_everything_is_gone() {
    let r = web().await;
    let pids = r.pids("web").await;
    let h = r.handle.clone();
    let del = tokio::spawn(async move { h.delete("web", false).await });
    settle().await;
    assert!(!del.is_finished(), "waits for the instances");
    assert!(r.rt.released().is_empty(), "held while instances run");
    assert_eq!(r.rt.signals().len(), 3);
    assert!(
        r.store.list("services").expect("list").is_empty(),
        "desired state removed first"
    );
    assert!(
        r.store.get("deleting", "web").is_some(),
        "the delete is saved"
    );
    for p in pids {
        r.exited(p, 0);
    }
    settle().await;
    let deleted = del.await.expect("join").expect("deleted");
    assert_eq!(deleted.stopped, 3);
    assert_eq!(
        r.rt.released(),
        ["web"],
        "its dynamic user and ids released"
    );
    assert!(
        r.cg.paths().is_empty(),
        "no cgroup left: {:?}",
        r.cg.paths()
    );
    let e = r.handle.get("web").await.expect_err("gone");
    assert!(matches!(e, SupervisorError::NotFound { .. }));
    assert!(
        r.store.get("deleting", "web").is_none(),
        "the delete is done"
    );
}

#[tokio::test(start_paused = true)]
async fn admission_refuses_what_the_host_cannot_enforce() {
    let r = rig_with(
        RecordingCgroups::new(&[Control::Cpu, Control::Pids]),
        Arc::new(MemStore::new()),
    )
    .await;
    // Each refusal names the field.
    let refused = |e: &SupervisorError, field: &str| match e {
        SupervisorError::Unenforceable { reasons } => {
            reasons.iter().any(|r| r.to_string().contains(field))
        }
        _ => false,
    };
    let memory = "name = \"m\"\ncommand = [\"/bin/app\"]\n[resources]\nmemory = \"64MiB\"\n";
    let e = r.apply(memory).await.expect_err("no memory controller");
    assert!(refused(&e, "resources.memory"), "{e}");
    let e = r.apply(WEB).await.expect_err("no device controller");
    assert!(refused(&e, "isolation.devices"), "{e}");
    r.rt.refuse_command("/bin/missing");
    let missing = "name = \"x\"\ncommand = [\"/bin/missing\"]\n";
    let e = r.apply(missing).await.expect_err("preflight");
    assert!(refused(&e, "command[0]"), "{e}");
    settle().await;
    assert!(r.rt.spawns().is_empty());
    assert!(
        r.store.list("services").expect("list").is_empty(),
        "nothing applied"
    );
}

#[tokio::test(start_paused = true)]
async fn host_devices_leave_the_cgroup_unrestricted() {
    let r = rig().await;
    let text = format!("{WEB}[isolation]\ndevices = \"host\"\n");
    r.apply(&text).await.expect("apply");
    settle().await;
    let e =
        r.cg.entry(&CgroupPath::instance("web", "web-1"))
            .expect("cgroup");
    assert!(!e.devices_restricted);
}

#[tokio::test(start_paused = true)]
async fn a_failed_save_applies_nothing() {
    let store = Arc::new(MemStore::new());
    store.fail_writes(true);
    let r = rig_with(RecordingCgroups::default(), store).await;
    let e = r.apply(WEB).await.expect_err("disk full");
    assert!(matches!(e, SupervisorError::Storage { .. }), "{e}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "the store's error is kept as the cause"
    );
    settle().await;
    assert!(r.rt.spawns().is_empty());
    assert!(matches!(
        r.handle.get("web").await,
        Err(SupervisorError::NotFound { .. })
    ));
}

/// The desired state's fsync is off the spawn's path: the instances are started from a
/// record already in place, and the answer waits until it is durable.
#[tokio::test(start_paused = true)]
async fn an_apply_starts_its_instances_before_the_fsync_and_answers_after_it() {
    let store = Arc::new(MemStore::new());
    let rt = Arc::new(FakeRuntime::new());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (rt, seen, store2) = (rt.clone(), seen.clone(), store.clone());
        store.on_sync(Box::new(move |kind, name| {
            let in_place = store2.get(kind, name).is_some();
            let durable = store2.is_durable(kind, name);
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.push((
                format!("{kind}/{name}"),
                rt.spawns().len(),
                in_place,
                durable,
            ));
        }));
    }
    let fakes = Fakes {
        rt,
        packages: Arc::new(FakePackages::new()),
        cg: Arc::new(RecordingCgroups::default()),
        store: store.clone(),
    };
    let r = fakes.start().await;
    r.apply(WEB).await.expect("apply");
    assert!(store.is_durable("services", "web"), "durable once answered");
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        seen,
        vec![("services/web".to_string(), 3, true, false)],
        "one sync, after the three spawns, of a record already in place"
    );
}

/// A sync that fails: the caller is told, the change stays in effect, and the record is
/// written again durably where the disk allows it.
#[tokio::test(start_paused = true)]
async fn a_failed_sync_is_answered_as_a_storage_error() {
    let store = Arc::new(MemStore::new());
    store.fail_syncs(true);
    let r = rig_with(RecordingCgroups::default(), store.clone()).await;
    // The rewrite succeeds: the apply is answered as applied, and durable.
    r.apply(WEB).await.expect("written again durably");
    assert!(store.is_durable("services", "web"));
    // The rewrite fails too: a storage error, though its instances run.
    store.fail_flushes(true);
    let e = r
        .apply(&WEB.replace("replicas = 3", "replicas = 4"))
        .await
        .expect_err("neither synced nor written again");
    assert!(matches!(e, SupervisorError::Storage { .. }), "{e}");
    settle().await;
    assert_eq!(r.rt.spawns().len(), 4, "the change is in effect");
}

#[tokio::test(start_paused = true)]
async fn spawn_failures_back_off_and_are_reported() {
    let r = rig().await;
    r.rt.fail_next_spawns(1);
    r.apply(&WEB.replace("replicas = 3", "replicas = 1"))
        .await
        .expect("apply");
    settle().await;
    let s = r.status("web").await;
    let i = &s.instances[0];
    assert_eq!(i.state, Phase::Backoff);
    assert!(i.start_failed);
    assert!(
        i.last_error
            .as_deref()
            .is_some_and(|e| e.contains("injected"))
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    settle().await;
    assert_eq!(r.running("web").await.len(), 1, "retried after the backoff");
}

#[tokio::test(start_paused = true)]
async fn restore_starts_the_saved_services_and_stops_leftovers() {
    let store = Arc::new(MemStore::new());
    let cg = RecordingCgroups::default();
    // Cgroups no record explains: an instance index the service no longer has, and an
    // instance of a service no longer desired.
    cg.set_procs(&CgroupPath::instance("web", "web-7"), vec![4242]);
    cg.set_procs(&CgroupPath::instance("old", "old-0"), vec![4343]);
    {
        let r = rig_with(RecordingCgroups::default(), store.clone()).await;
        r.apply(WEB).await.expect("apply");
    }
    let r = rig_with(cg, store).await;
    settle().await;
    assert_eq!(
        r.running("web").await.len(),
        3,
        "saved services started again"
    );
    let kills = r.cg.kills();
    assert!(kills.contains(&CgroupPath::instance("web", "web-7")));
    assert!(r.cg.entry(&CgroupPath::instance("web", "web-7")).is_none());
    assert!(kills.contains(&CgroupPath::instance("old", "old-0")));
    assert!(r.cg.entry(&CgroupPath::instance("old", "old-0")).is_none());
    assert!(
        r.rt.signals().contains(&(4242, libc::SIGTERM)),
        "leftovers get their stop signal first"
    );
}

/// An agent killed between saving a delete and removing the service's record: the next one
/// finishes the delete (the delete wins over the record), stopping what runs of it.
#[tokio::test(start_paused = true)]
async fn a_saved_delete_is_finished_at_restore_even_with_the_record_still_there() {
    let first = web().await;
    let running = place_in_cgroups(&first, "web").await;
    let record = first
        .store
        .get("services", "web")
        .expect("the service's record");
    first.store.put("deleting", "web", &record).expect("put");
    let fakes = first.fakes();
    drop(first);
    settle().await;

    let second = fakes.start().await;
    settle().await;
    assert!(
        second.status("web").await.deleting,
        "restored as being deleted"
    );
    assert!(fakes.rt.adopted().len() == 3, "taken over to be stopped");
    for (_, pid) in &running {
        assert!(fakes.rt.signals().contains(&(*pid, libc::SIGTERM)), "{pid}");
        second.exited(*pid, 0);
    }
    settle().await;
    assert!(matches!(
        second.handle.get("web").await,
        Err(SupervisorError::NotFound { .. })
    ));
    for (idx, _) in running {
        let path = CgroupPath::instance("web", &format!("web-{idx}"));
        assert!(fakes.cg.entry(&path).is_none(), "{path} removed");
        assert!(
            fakes
                .store
                .get("instances", &format!("web-{idx}"))
                .is_none()
        );
    }
    assert!(fakes.store.get("services", "web").is_none());
    assert!(
        fakes.store.get("deleting", "web").is_none(),
        "the delete is done"
    );

    // A delete whose end could not be saved does not outlive a new service of the name.
    fakes.store.put("deleting", "web", &record).expect("put");
    second.apply(WEB).await.expect("apply again");
    assert!(fakes.store.get("deleting", "web").is_none());
}

/// Put each running instance's init in its cgroup, as the kernel would.
async fn place_in_cgroups(r: &Rig, service: &str) -> Vec<(u32, i32)> {
    let running = r.running(service).await;
    for (idx, pid) in &running {
        r.cg.set_procs(
            &CgroupPath::instance(service, &format!("{service}-{idx}")),
            vec![*pid],
        );
    }
    running
}

#[tokio::test(start_paused = true)]
async fn an_instance_record_that_failed_to_save_is_retried_so_a_restart_adopts_it() {
    // Bounded: without the retry the failed record is never saved again (and the driver's
    // retry deadline stays due, which stops paused time): the test must fail, not hang.
    within("the record retry", async {
        let first = rig().await;
        first
            .apply(&WEB.replace("replicas = 3", "replicas = 1"))
            .await
            .expect("apply");
        settle().await;
        let fakes = first.fakes();
        let (_, old) = first.running("web").await[0];
        // The disk fills; the instance crashes and is started again: its new record (new PID)
        // cannot be saved.
        fakes.store.fail_writes(true);
        first.exited(old, 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        let (_, new) = first.running("web").await[0];
        assert_ne!(new, old);
        let unsaved: Vec<_> = first
            .events()
            .await
            .into_iter()
            .filter(|e| matches!(e.kind, crate::events::EventKind::RecordUnsaved { .. }))
            .collect();
        assert!(!unsaved.is_empty(), "the failed save is reported");
        assert_eq!(unsaved[0].instance.as_deref(), Some("web-0"));
        let node = first.handle.summary().await.expect("summary").unsaved;
        assert_eq!(node.count, 1, "{node:?}");
        assert!(node.since.is_some() && !node.error.is_empty(), "{node:?}");
        // Space comes back: the record is saved at a retry, with no other change to trigger it.
        fakes.store.fail_writes(false);
        tokio::time::sleep(Duration::from_secs(11)).await;
        settle().await;
        let node = first.handle.summary().await.expect("summary").unsaved;
        assert_eq!(node, UnsavedRecords::default(), "cleared once saved");
        let running = place_in_cgroups(&first, "web").await;
        drop(first);
        settle().await;

        let second = fakes.start().await;
        settle().await;
        assert_eq!(second.running("web").await, running, "the same instance");
        assert!(
            fakes.rt.adopted().contains(&new),
            "the instance started while the disk was full is adopted, not taken for lost"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_adopts_running_instances() {
    let first = web().await;
    let fakes = first.fakes();
    let rt = &fakes.rt;
    let (_, pid0) = first.running("web").await[0];
    first.exited(pid0, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    let before = place_in_cgroups(&first, "web").await;
    let restarts_before = first.restarts("web").await;
    drop(first);
    settle().await;

    let second = fakes.start().await;
    settle().await;
    assert_eq!(
        second.running("web").await,
        before,
        "same instances, same PIDs"
    );
    let mut adopted = rt.adopted();
    adopted.sort_unstable();
    let mut pids: Vec<i32> = before.iter().map(|(_, p)| *p).collect();
    pids.sort_unstable();
    assert_eq!(adopted, pids);
    assert_eq!(
        rt.spawns().len(),
        4,
        "nothing started again (3 + the one crash restart)"
    );
    assert_eq!(second.restarts("web").await, restarts_before);
    // The new agent supervises them: an exit is seen and handled.
    let (idx, pid) = before[1];
    second.exit(pid, ProcessStatus::Unknown, exited(2));
    settle().await;
    let s = second.status("web").await;
    let i = s.instances.iter().find(|i| i.index == idx).expect("slot");
    assert_eq!(
        i.last_exit.as_ref().map(|e| e.class),
        Some(ExitClass::Exited(2))
    );
    assert_eq!(i.state, Phase::Backoff);
}

#[tokio::test(start_paused = true)]
async fn ends_while_the_agent_was_away_are_reported_truly() {
    let first = rig().await;
    let fakes = first.fakes();
    let (rt, cg) = (&fakes.rt, &fakes.cg);
    first
        .apply(&WEB.replace("replicas = 3", "replicas = 5"))
        .await
        .expect("apply");
    settle().await;
    let running = place_in_cgroups(&first, "web").await;
    drop(first);
    settle().await;
    // While no agent runs: web-0 exits 3, web-1 is OOM-killed, web-2 is SIGKILLed from
    // outside, web-3's init vanishes without a record, web-4's PID is reused by another process.
    let pid = |i: usize| running[i].1;
    let path = |i: usize| CgroupPath::instance("web", &format!("web-{i}"));
    let gone = |i: usize, rec: Option<ExitRecord>| {
        rt.exit(
            pid(i),
            InitExit {
                status: ProcessStatus::Unknown,
                record: None,
                spawn_error: None,
            },
        );
        cg.set_procs(&path(i), vec![]);
        if let Some(r) = rec {
            rt.set_exit_record(&format!("web-{i}"), r);
        }
    };
    gone(0, exited(3));
    gone(1, killed(9));
    cg.set_oom_kills(&path(1), 1);
    gone(2, killed(9));
    gone(3, None);
    gone(4, None);
    rt.set_alive(pid(4), 999_999); // same PID, another process
    cg.set_procs(&path(4), vec![pid(4)]);

    let second = fakes.start().await;
    settle().await;
    let s = second.status("web").await;
    let classes: Vec<Option<ExitClass>> = s
        .instances
        .iter()
        .map(|x| x.last_exit.as_ref().map(|e| e.class))
        .collect();
    // web-4 too is lost: a reused PID is never adopted.
    use ExitClass::{Exited, Lost, OomKilled, Signaled};
    assert_eq!(
        classes,
        [Exited(3), OomKilled, Signaled(9), Lost, Lost].map(Some)
    );
    assert!(!rt.adopted().contains(&pid(4)));
    let lost = s.instances.iter().find(|x| x.index == 3).expect("web-3");
    assert!(
        lost.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no exit record")),
        "{lost:?}"
    );
    assert!(
        s.instances
            .iter()
            .all(|i| i.restarts == 1 && i.state == Phase::Backoff),
        "each handled by its policy"
    );
    assert!(
        rt.signals().is_empty(),
        "the process that reused a PID was not signalled"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(
        second.running("web").await.len(),
        5,
        "all replaced after the backoff"
    );
}

// ---------------------------------------------------------------------------------------------
// Rollouts.

impl Rig {
    async fn restart(&self, name: &str, force: bool) -> Result<String, SupervisorError> {
        let started = self.handle.restart(name, force).await?;
        Ok(started.rollout_id)
    }

    async fn rollout(&self, id: &str) -> Rollout {
        self.handle.get_rollout(id).await.expect("rollout")
    }

    /// Mark the running instances ready (`READY=1`), as a service with `notify` does.
    fn ready(&self, ids: &[&str]) {
        for id in ids {
            self.rt.set_notify(
                id,
                crate::runtime::NotifyState {
                    ready: true,
                    status: String::new(),
                },
            );
        }
    }

    /// Let every stop signal sent so far end its instance.
    fn obey_stops(&self) {
        for (pid, _) in self.rt.signals() {
            if self.rt.running().contains(&pid) {
                self.exit(pid, ProcessStatus::Exited(0), None);
            }
        }
    }

    /// Run the rollout to its end: every stopped instance exits at once, new ones are ready.
    async fn drive(&self, ids: &[&str], seconds: u64) {
        for _ in 0..seconds * 4 {
            self.ready(ids);
            self.obey_stops();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// 3 instances that report READY=1, min_healthy 1s, a 10s deadline.
const GATED: &str = "name = \"web\"\ncommand = [\"/bin/app\"]\nreplicas = 3\n[health]\nnotify = true\n[rollout]\nmin_healthy = \"1s\"\nhealthy_deadline = \"10s\"\n[stop]\ngrace = \"5s\"\n";

const ALL: [&str; 8] = [
    "web-0", "web-1", "web-2", "web-3", "web-4", "web-5", "web-6", "web-7",
];

#[tokio::test(start_paused = true)]
async fn restart_replaces_every_instance_and_refuses_a_second_one() {
    let r = rig().await;
    r.apply(GATED).await.expect("apply");
    r.drive(&ALL, 2).await;
    let before = r.pids("web").await;
    let id = r.restart("web", false).await.expect("restart");
    assert_eq!(id, "web-r1");
    let err = r.restart("web", false).await.expect_err("one at a time");
    assert!(
        matches!(&err, SupervisorError::RolloutRunning { id, .. } if id == "web-r1"),
        "{err}"
    );
    r.drive(&ALL, 15).await;
    let ro = r.rollout(&id).await;
    assert_eq!((ro.state.as_str(), ro.replaced), ("succeeded", 3), "{ro:?}");
    let after = r.pids("web").await;
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|p| !before.contains(p)), "all fresh");
    let s = r.status("web").await;
    assert_eq!(s.revision, 1, "a restart keeps the revision");
    let steps: Vec<&str> = ro.steps.iter().map(|s| s.step.as_str()).collect();
    for want in [
        "planned",
        "started",
        "ready",
        "stopping",
        "stopped",
        "succeeded",
    ] {
        assert!(steps.contains(&want), "{want} in {steps:?}");
    }
    // Forced, a restart supersedes the running one.
    let a = r.restart("web", false).await.expect("restart");
    let b = r.restart("web", true).await.expect("forced");
    assert_eq!(r.rollout(&a).await.state.as_str(), "superseded");
    r.drive(&ALL, 15).await;
    assert_eq!(r.rollout(&b).await.state.as_str(), "succeeded");
    assert_eq!(r.running("web").await.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_new_revision_that_never_gets_ready_is_rolled_back_keeping_untouched_instances() {
    let r = rig().await;
    r.apply(GATED).await.expect("apply");
    r.drive(&["web-0", "web-1", "web-2"], 2).await;
    let before = r.running("web").await;
    let a = r
        .apply(&GATED.replace("/bin/app", "/bin/broken"))
        .await
        .expect("update");
    let id = a.rollout_id.expect("a rollout");
    // Only the old instances ever report ready.
    r.drive(&["web-0", "web-1", "web-2"], 14).await;
    let failed = r.rollout(&id).await;
    assert_eq!(failed.state.as_str(), "failed", "{failed:?}");
    assert!(failed.reason.contains("within 10s"), "{}", failed.reason);
    let back = r.rollout(&failed.rollback_id).await;
    assert_eq!(
        (
            back.kind.as_str(),
            back.state.as_str(),
            back.rollback_of.as_str()
        ),
        ("auto_rollback", "succeeded", id.as_str())
    );
    let s = r.status("web").await;
    assert_eq!(s.revision, 1);
    // Created (1), updated (2), rolled back by the agent (3): a writer holding 2 is told.
    assert_eq!(s.generation, 3);
    assert_eq!(
        r.running("web").await,
        before,
        "the old instances kept their PIDs"
    );
    let new_pid = i32::try_from(r.rt.spawns().len()).expect("a small count");
    assert!(
        r.rt.signals()
            .iter()
            .all(|(pid, _)| !before.iter().any(|(_, p)| p == pid)),
        "no old instance was signalled: {:?}",
        r.rt.signals()
    );
    assert!(new_pid > 3, "a new instance was tried");
    assert!(
        r.rt.spawns()[3..]
            .iter()
            .all(|sp| sp.command == ["/bin/broken"])
    );
}

#[tokio::test(start_paused = true)]
async fn a_rollouts_new_instance_starts_under_its_cpu_cap_until_it_is_ready() {
    let r = rig().await;
    let spec = GATED.replace(
        "[rollout]\n",
        "[resources]\ncpu = 2\n[rollout]\nstart_cpu = 0.25\n",
    );
    r.apply(&spec).await.expect("apply");
    // Only these: a READY=1 set for an id holds for whichever instance gets it later.
    r.drive(&["web-0", "web-1", "web-2"], 2).await;
    let limits = |id: &str| {
        r.cg.entry(&CgroupPath::service("web").child(id))
            .map(|e| e.cpu_limits)
            .unwrap_or_default()
    };
    for id in ["web-0", "web-1", "web-2"] {
        assert_eq!(
            limits(id),
            [],
            "{id}: not started by a rollout, never capped"
        );
    }
    let id = r.restart("web", false).await.expect("restart");
    // The new instance has started; it is not ready yet.
    r.drive(&["web-0", "web-1", "web-2"], 1).await;
    assert_eq!(
        limits("web-3"),
        [(Some(0.25), 10_000)],
        "capped at its start, in 10 ms periods"
    );
    let created = r.cg.entry(&CgroupPath::service("web").child("web-3"));
    assert_eq!(
        created.map(|e| e.limits.cpu),
        Some(None),
        "made without its own cpu limit: the cap is its one CPU write"
    );
    // Ready: its own limit (2 cores, the usual period) from then on.
    r.drive(&ALL, 1).await;
    assert_eq!(
        limits("web-3"),
        [(Some(0.25), 10_000), (Some(2.0), 100_000)]
    );
    r.drive(&ALL, 15).await;
    assert_eq!(r.rollout(&id).await.state.as_str(), "succeeded");
    for inst in &r.status("web").await.instances {
        let l = limits(&inst.id);
        assert!(
            l.is_empty() || l.last() == Some(&(Some(2.0), 100_000)),
            "{}: no cap left after the rollout: {l:?}",
            inst.id
        );
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_cpu_limit_a_lifted_start_cap_leaves_none() {
    let r = rig().await;
    let spec = GATED.replace("[rollout]\n", "[rollout]\nstart_cpu = 4\n");
    r.apply(&spec).await.expect("apply");
    r.drive(&["web-0", "web-1", "web-2"], 2).await;
    r.restart("web", false).await.expect("restart");
    r.drive(&["web-0", "web-1", "web-2"], 1).await;
    r.drive(&ALL, 1).await;
    let l =
        r.cg.entry(&CgroupPath::service("web").child("web-3"))
            .map(|e| e.cpu_limits)
            .unwrap_or_default();
    assert_eq!(l, [(Some(4.0), 10_000), (None, 100_000)]);
}

#[tokio::test(start_paused = true)]
async fn a_crashing_new_instance_fails_the_rollout_and_without_auto_rollback_pauses() {
    let r = rig().await;
    let spec = GATED.replace("[rollout]\n", "[rollout]\nauto_rollback = false\n");
    r.apply(&spec).await.expect("apply");
    r.drive(&ALL, 2).await;
    let a = r
        .apply(&spec.replace("/bin/app", "/bin/crash"))
        .await
        .expect("update");
    settle().await;
    let new = r.rt.spawns().last().cloned().expect("a new instance");
    assert_eq!(new.command, ["/bin/crash"]);
    r.exit(new.pid, ProcessStatus::Exited(3), None);
    settle().await;
    let ro = r.rollout(a.rollout_id.as_deref().expect("rollout")).await;
    assert_eq!(ro.state.as_str(), "failed");
    assert!(ro.rollback_id.is_empty());
    let s = r.status("web").await;
    assert!(s.paused);
    assert_eq!((s.revision, s.revisions.clone()), (2, vec![1, 2]));
    // Paused: the crashed instance restarts in backoff; the old ones stay.
    r.drive(&ALL, 5).await;
    let s = r.status("web").await;
    let revs: Vec<u64> = s.instances.iter().map(|i| i.revision).collect();
    assert_eq!(revs.iter().filter(|r| **r == 1).count(), 3, "{revs:?}");
    // A rollback to revision 1 replaces the new instance and resumes.
    let back = r
        .handle
        .rollback("web", None, false)
        .await
        .expect("rollback");
    assert_eq!(back.revision, 1);
    let back = back.rollout_id;
    r.drive(&ALL, 10).await;
    assert_eq!(r.rollout(&back).await.state.as_str(), "succeeded");
    let s = r.status("web").await;
    assert!(!s.paused);
    assert!(
        s.instances
            .iter()
            .all(|i| i.revision == 1 && i.state == Phase::Running)
    );
    assert_eq!(s.instances.len(), 3);
    // Nothing earlier than revision 1 is kept.
    let err = r
        .handle
        .rollback("web", None, false)
        .await
        .expect_err("nothing to roll back to");
    assert!(
        matches!(err, SupervisorError::NothingToRollBackTo { .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "service \"web\" has no kept revision below 1 to roll back to (kept: 1, 2)"
    );
    let err = r
        .handle
        .rollback("web", Some(9), false)
        .await
        .expect_err("not kept");
    assert_eq!(err.to_string(), "revision: 9 is not kept (kept: 1, 2)");
}

#[tokio::test(start_paused = true)]
async fn an_agent_restarted_mid_rollout_finishes_it_without_duplicates() {
    let first = rig().await;
    let fakes = first.fakes();
    let rt = &fakes.rt;
    first.apply(GATED).await.expect("apply");
    first.drive(&ALL, 2).await;
    let a = first
        .apply(&GATED.replace("/bin/app", "/bin/app2"))
        .await
        .expect("update");
    // Halfway: one old instance replaced.
    first.drive(&ALL, 2).await;
    let id = a.rollout_id.expect("rollout");
    let mid = first.rollout(&id).await;
    assert_eq!(mid.state.as_str(), "running");
    assert!(mid.replaced >= 1 && mid.replaced < 3, "{mid:?}");
    place_in_cgroups(&first, "web").await;
    drop(first);
    settle().await;

    let second = fakes.start().await;
    settle().await;
    second.drive(&ALL, 20).await;
    let done = second.rollout(&id).await;
    assert_eq!(done.state.as_str(), "succeeded", "{done:?}");
    assert!(done.steps.iter().any(|s| s.step == Step::Resumed));
    let s = second.status("web").await;
    assert_eq!(s.instances.len(), 3, "{:?}", s.instances);
    assert!(
        s.instances
            .iter()
            .all(|i| i.revision == 2 && i.state == Phase::Running)
    );
    let mut live = rt.running();
    live.sort_unstable();
    let mut ours: Vec<i32> = s.instances.iter().filter_map(|i| i.init_pid).collect();
    ours.sort_unstable();
    assert_eq!(live, ours, "no instance left over or duplicated");
}

#[tokio::test(start_paused = true)]
async fn surge_and_unavailability_bounds_hold_at_every_step() {
    for (surge, unavailable) in [(0, 1), (2, 0)] {
        let r = rig().await;
        let spec = GATED.replace("replicas = 3", "replicas = 4").replace(
            "[rollout]\n",
            &format!("[rollout]\nmax_surge = {surge}\nmax_unavailable = {unavailable}\n"),
        );
        r.apply(&spec).await.expect("apply");
        r.drive(&ALL, 2).await;
        let id = r.restart("web", false).await.expect("restart");
        r.drive(&ALL, 20).await;
        assert_eq!(r.rollout(&id).await.state.as_str(), "succeeded");
        let steps: Vec<(u32, u32)> = r
            .events()
            .await
            .into_iter()
            .filter_map(|e| match e.kind {
                crate::events::EventKind::RolloutStep {
                    new,
                    old,
                    available,
                    ..
                } => Some((new + old, available)),
                _ => None,
            })
            .collect();
        assert!(steps.len() >= 12, "{steps:?}");
        for (present, available) in steps {
            assert!(
                present <= 4 + surge,
                "{surge}/{unavailable}: {present} present"
            );
            assert!(
                available >= 4 - unavailable,
                "{surge}/{unavailable}: {available} available"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn scaling_during_a_rollout_ends_with_the_new_count() {
    let r = rig().await;
    r.apply(GATED).await.expect("apply");
    r.drive(&ALL, 2).await;
    let id = r.restart("web", false).await.expect("restart");
    r.drive(&ALL, 1).await;
    r.handle.scale("web", 5, false).await.expect("scale");
    r.drive(&ALL, 20).await;
    let ro = r.rollout(&id).await;
    assert_eq!((ro.state.as_str(), ro.replicas), ("succeeded", 5));
    let s = r.status("web").await;
    assert_eq!(s.instances.len(), 5);
    assert!(s.instances.iter().all(|i| i.state == Phase::Running));
}

/// A service the fleet gave the node: the local API cannot apply, scale, roll back or delete
/// it unforced, and nothing runs differently for the refusals; forced, it can, and the owner
/// stays etcd (the fleet's next change wins). The owner survives an agent restart.
#[tokio::test(start_paused = true)]
async fn the_fleets_services_refuse_local_changes_unless_forced() {
    let r = rig().await;
    let fleet = r.handle.for_owner(Owner::Etcd);
    fleet
        .apply(*spec(WEB), false, true)
        .await
        .expect("the fleet creates web");
    settle().await;
    let pids = r.running("web").await;
    assert_eq!(pids.len(), 3);
    assert_eq!(r.status("web").await.owner, Owner::Etcd);

    let refused = |e: SupervisorError| {
        assert!(
            matches!(&e, SupervisorError::OwnedByFleet { name } if name == "web"),
            "{e:?}"
        );
        assert!(e.to_string().contains("--force"), "{e}");
    };
    let changed = WEB.replace("/bin/app", "/bin/app2");
    refused(r.apply(&changed).await.expect_err("a local apply"));
    refused(
        r.handle
            .scale("web", 1, false)
            .await
            .expect_err("a local scale"),
    );
    refused(
        r.handle
            .delete("web", false)
            .await
            .expect_err("a local delete"),
    );
    refused(
        r.handle
            .rollback("web", None, false)
            .await
            .expect_err("a local rollback"),
    );
    settle().await;
    let s = r.status("web").await;
    assert_eq!((s.revision, s.desired), (1, 3), "nothing changed");
    assert_eq!(r.running("web").await, pids, "no instance touched");

    // Forced, the local change goes through; the service stays the fleet's.
    r.handle.scale("web", 2, true).await.expect("forced scale");
    settle().await;
    let s = r.status("web").await;
    assert_eq!((s.desired, s.owner), (2, Owner::Etcd));
    fleet
        .scale("web", 3, false)
        .await
        .expect("the fleet changes its own service unforced");

    // The owner is in the service's saved record: a restarted agent still refuses.
    let again = r.fakes().start().await;
    assert_eq!(again.status("web").await.owner, Owner::Etcd);
    refused(
        again
            .handle
            .scale("web", 1, false)
            .await
            .expect_err("after a restart"),
    );
}

/// The fleet never takes over (or removes) a service applied through the local API, even
/// "forced": the name is refused with the reason.
#[tokio::test(start_paused = true)]
async fn the_fleet_does_not_take_over_a_local_service() {
    let r = web().await;
    let pids = r.running("web").await;
    let fleet = r.handle.for_owner(Owner::Etcd);
    let changed = WEB.replace("/bin/app", "/bin/other");
    for e in [
        fleet
            .apply(*spec(&changed), false, true)
            .await
            .expect_err("apply"),
        fleet.delete("web", true).await.expect_err("delete"),
        fleet.scale("web", 1, true).await.expect_err("scale"),
    ] {
        assert!(
            matches!(&e, SupervisorError::OwnedLocally { name } if name == "web"),
            "{e:?}"
        );
        assert!(e.to_string().contains("corral delete web"), "{e}");
    }
    settle().await;
    let s = r.status("web").await;
    assert_eq!((s.owner, s.revision, s.desired), (Owner::Local, 1, 3));
    assert_eq!(r.running("web").await, pids);
}

/// The generation counts every accepted change of the desired state and nothing else; a
/// write expecting another one is refused and changes nothing; it survives an agent restart.
#[tokio::test(start_paused = true)]
async fn generations_count_changes_and_guard_writes() {
    let r = rig().await;
    let h = &r.handle;
    let mismatch = |e: SupervisorError, want: Option<u64>| match e {
        SupervisorError::GenerationMismatch { current, .. } => assert_eq!(current, want),
        other => panic!("expected a mismatch, got {other:?}"),
    };
    // 0 expects no service.
    mismatch(
        h.apply_if(*spec(WEB), false, false, Some(1))
            .await
            .expect_err("absent"),
        None,
    );
    assert_eq!(
        h.apply_if(*spec(WEB), false, false, Some(0))
            .await
            .expect("create")
            .generation,
        1
    );
    settle().await;
    let steps: Vec<(&str, u64)> = vec![
        ("unchanged apply", 1),
        ("dry run", 1),
        ("scale to the same count", 1),
        ("scale", 2),
        ("update", 3),
        ("restart", 4),
        ("rollback", 5),
    ];
    for (what, want) in steps {
        let got = match what {
            "unchanged apply" => h
                .apply(*spec(WEB), false, false)
                .await
                .map(|a| a.generation),
            "dry run" => h
                .apply(*spec(&WEB.replace("/bin/app", "/bin/x")), true, false)
                .await
                .map(|a| a.generation - 1),
            "scale to the same count" => h.scale("web", 3, false).await.map(|s| s.generation),
            "scale" => h
                .scale_if("web", 4, false, Some(1))
                .await
                .map(|s| s.generation),
            "update" => h
                .apply_if(
                    *spec(&WEB.replace("/bin/app", "/bin/v2")),
                    false,
                    true,
                    Some(2),
                )
                .await
                .map(|a| a.generation),
            "restart" => h
                .restart_if("web", true, Some(3))
                .await
                .map(|x| x.generation),
            "rollback" => h
                .rollback_if("web", None, true, Some(4))
                .await
                .map(|x| x.generation),
            _ => unreachable!(),
        };
        assert_eq!(got.expect(what), want, "{what}");
        assert_eq!(r.status("web").await.generation, want, "{what}");
    }
    // A stale writer changes nothing.
    mismatch(
        h.scale_if("web", 1, false, Some(4))
            .await
            .expect_err("stale"),
        Some(5),
    );
    mismatch(
        h.delete_if("web", false, Some(4)).await.expect_err("stale"),
        Some(5),
    );
    // (The update's spec has 3 replicas again.)
    assert_eq!(r.status("web").await.desired, 3);
    // Saved with the service: an agent started again knows it.
    let again = r.fakes().start().await;
    assert_eq!(again.status("web").await.generation, 5);
}

/// A fixed port another process holds refuses the apply, naming the port's field; the
/// service's own running instance holding it does not refuse an update of that service.
#[tokio::test(start_paused = true)]
async fn a_fixed_port_held_elsewhere_is_refused() {
    let r = rig().await;
    let text = "name = \"p\"\ncommand = [\"/bin/app\"]\n[ports]\nadmin = 9100\n";
    r.rt.hold_port(9100);
    match r.apply(text).await {
        Err(SupervisorError::Unenforceable { reasons }) => {
            assert_eq!(reasons.len(), 1, "{reasons:?}");
            assert_eq!(reasons[0].field, "ports.admin");
            assert!(reasons[0].message.contains("port 9100 is already in use"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(r.handle.get("p").await.is_err(), "nothing applied");
    // With a private network the port is the instance's own: not checked.
    let private = format!("{text}[isolation]\nnamespaces = [\"pid\", \"mount\", \"net\"]\n");
    r.apply(&private).await.expect("net namespace");
    // A service whose running instance holds its port (the fake now says it is taken)
    // may still be updated; another service asking for that port is refused.
    let own = "name = \"q\"\ncommand = [\"/bin/app\"]\n[ports]\nadmin = 9200\n";
    r.apply(own).await.expect("free");
    settle().await;
    r.rt.hold_port(9200);
    r.apply(&own.replace("/bin/app", "/bin/v2"))
        .await
        .expect("its own instance holds it");
    let other = own.replace("\"q\"", "\"o\"");
    assert!(matches!(
        r.apply(&other).await,
        Err(SupervisorError::Unenforceable { .. })
    ));
}

/// Labels and annotations change in place: no new revision, no instance replaced, a new
/// generation; a rollback keeps the current ones.
#[tokio::test(start_paused = true)]
async fn labels_change_in_place() {
    let r = web().await;
    let pids = r.pids("web").await;
    let labeled = format!("{WEB}[labels]\napp = \"web\"\n[annotations]\nnote = \"any text\"\n");
    let a = r.apply(&labeled).await.expect("labels");
    assert_eq!(
        (
            a.kind,
            a.revision,
            a.rollout_id.as_deref(),
            a.replaces_instances
        ),
        (ApplyKind::Labeled, 1, None, false)
    );
    assert_eq!(
        a.changes,
        [
            "labels.app: added (\"web\")",
            "annotations.note: added (\"any text\")"
        ]
    );
    assert_eq!(a.generation, 2);
    settle().await;
    assert_eq!(r.pids("web").await, pids, "nothing replaced");
    let s = r.status("web").await;
    assert_eq!(s.spec.labels.get("app").map(String::as_str), Some("web"));
    // A new revision, then back: the labels stay the current ones.
    r.apply(&labeled.replace("/bin/app", "/bin/v2"))
        .await
        .expect("update");
    let relabeled = labeled
        .replace("/bin/app", "/bin/v2")
        .replace("app = \"web\"", "app = \"web2\"");
    r.apply(&relabeled).await.expect("relabel");
    r.handle
        .rollback("web", Some(1), true)
        .await
        .expect("rollback");
    let s = r.status("web").await;
    assert_eq!(s.spec.command, ["/bin/app"]);
    assert_eq!(s.spec.labels.get("app").map(String::as_str), Some("web2"));
}

/// A batch is all or nothing. A refusal of any spec refuses all; when the third record
/// cannot be saved, the two saved before it are written back (an existing service's record
/// as it was, a created one's removed), nothing runs that did not, no event is added, and
/// the generations stay.
#[tokio::test(start_paused = true)]
async fn a_batch_is_all_or_nothing() {
    let store = Arc::new(MemStore::new());
    let r = rig_with(RecordingCgroups::default(), store.clone()).await;
    let one = |name: &str, cmd: &str| BatchItem {
        spec: *spec(&format!(
            "name = \"{name}\"\ncommand = [\"{cmd}\"]\nreplicas = 1\n"
        )),
        force: false,
        expected: None,
    };
    r.handle
        .apply_batch(vec![one("a", "/bin/app")], false)
        .await
        .expect("create a");
    settle().await;
    let saved_a = store.get("services", "a").expect("a saved");
    let events = r.events().await.len();
    let spawns = r.rt.spawns().len();

    // Two specs for one service, a stale expected generation, a bad program: refused whole.
    let dup = r
        .handle
        .apply_batch(vec![one("b", "/bin/app"), one("b", "/bin/v2")], false)
        .await
        .expect_err("duplicate");
    assert!(dup.to_string().contains("requests[1].name"), "{dup}");
    let mut stale = one("a", "/bin/v2");
    stale.expected = Some(7);
    let e = r
        .handle
        .apply_batch(vec![one("b", "/bin/app"), stale], false)
        .await
        .expect_err("stale");
    assert!(
        matches!(e, SupervisorError::GenerationMismatch { .. }),
        "{e}"
    );
    r.rt.refuse_command("/bin/missing");
    let e = r
        .handle
        .apply_batch(vec![one("b", "/bin/app"), one("c", "/bin/missing")], false)
        .await
        .expect_err("host");
    assert!(matches!(e, SupervisorError::Unenforceable { .. }), "{e}");

    // The third save fails: a (updated) and b (created) were saved, and are written back.
    store.fail_writes_of("c");
    let e = r
        .handle
        .apply_batch(
            vec![
                one("a", "/bin/v2"),
                one("b", "/bin/app"),
                one("c", "/bin/app"),
            ],
            false,
        )
        .await
        .expect_err("save of c");
    assert!(matches!(e, SupervisorError::Storage { .. }), "{e}");
    settle().await;
    assert_eq!(
        store.get("services", "a"),
        Some(saved_a),
        "a's record as it was"
    );
    assert_eq!(store.get("services", "b"), None, "b's record removed");
    assert_eq!(r.status("a").await.spec.command, ["/bin/app"]);
    assert_eq!(r.status("a").await.generation, 1);
    assert!(r.handle.get("b").await.is_err());
    assert_eq!(r.events().await.len(), events, "no event");
    assert_eq!(r.rt.spawns().len(), spawns, "nothing started");

    // Dry run: what it would do, nothing done.
    let dry = r
        .handle
        .apply_batch(vec![one("a", "/bin/v2"), one("b", "/bin/app")], true)
        .await
        .expect("dry run");
    assert_eq!(
        dry.iter()
            .map(|o| (o.kind, o.generation))
            .collect::<Vec<_>>(),
        [(ApplyKind::Updated, 2), (ApplyKind::Created, 1)]
    );
    assert!(r.handle.get("b").await.is_err());

    // And all of it when every part is fine.
    let done = r
        .handle
        .apply_batch(vec![one("a", "/bin/v2"), one("b", "/bin/app")], false)
        .await
        .expect("batch");
    assert_eq!(done.len(), 2);
    assert!(done[0].rollout_id.is_some(), "a's instance is replaced");
    settle().await;
    assert_eq!(r.status("b").await.desired, 1);
    assert!(store.get("services", "b").is_some());
}
