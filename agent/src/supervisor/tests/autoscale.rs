//! The driver's autoscaling with a scripted load and real Unix listening sockets (for the
//! cold start's wait) under paused time: up at once above target, capped by `max` and by
//! node capacity, down only after `scale_down_delay` and the least-loaded instances first,
//! to `min` after `idle_after`, a cold start from zero, and an apply of the same spec that
//! leaves the autoscaled count alone.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::*;
use crate::cgroups::CgroupStats;
use crate::runtime::load::{LoadProbe, SocketLoad};
use crate::runtime::{ProcessRef, SocketBroker};
use crate::supervisor::capacity::{Amounts, CapacityPolicy, Ratios};

const INTERVAL: Duration = Duration::from_secs(1);

/// The load every service's sockets report, as the test sets it.
#[derive(Debug, Default)]
struct ScriptedLoad {
    load: Mutex<SocketLoad>,
}

impl ScriptedLoad {
    fn set(&self, connections: u32) {
        *self.load.lock().expect("load") = SocketLoad {
            connections,
            queued: 0,
        };
    }
}

impl LoadProbe for ScriptedLoad {
    fn socket_load(&self, groups: &[Vec<Arc<OwnedFd>>]) -> std::io::Result<Vec<SocketLoad>> {
        let load = *self.load.lock().expect("load");
        Ok(vec![load; groups.len()])
    }

    fn close_queued(&self, _fd: &OwnedFd) -> std::io::Result<u32> {
        Ok(0)
    }
}

/// The fake runtime's broker, but a `unix:` socket is a real listener (a cold start waits on
/// it with epoll).
#[derive(Debug)]
struct UnixBroker(Arc<FakeRuntime>);

impl SocketBroker for UnixBroker {
    fn free_port(&self) -> std::io::Result<u16> {
        self.0.free_port()
    }

    fn check_port(&self, port: u16) -> std::io::Result<()> {
        self.0.check_port(port)
    }

    fn bind_socket(&self, listen: &ListenAddr) -> std::io::Result<OwnedFd> {
        match listen {
            ListenAddr::Unix(path) => Ok(std::os::unix::net::UnixListener::bind(path)?.into()),
            other => self.0.bind_socket(other),
        }
    }

    fn unlink_socket(&self, listen: &ListenAddr) {
        if let ListenAddr::Unix(path) = listen {
            let _ = std::fs::remove_file(path);
        }
    }

    fn take_socket(
        &self,
        process: &ProcessRef,
        fd: std::os::fd::RawFd,
        listen: &ListenAddr,
    ) -> std::io::Result<OwnedFd> {
        self.0.take_socket(process, fd, listen)
    }
}

struct Scaled {
    r: Rig,
    load: Arc<ScriptedLoad>,
    dir: tempfile::TempDir,
}

/// A driver whose services' load is scripted, with node capacity for `cpus` cores when given.
async fn scaled_rig(cpus: Option<f64>) -> Scaled {
    let f = Fakes {
        rt: Arc::new(FakeRuntime::new()),
        packages: Arc::new(FakePackages::new()),
        cg: Arc::new(RecordingCgroups::default()),
        store: Arc::new(MemStore::new()),
    };
    let load = Arc::new(ScriptedLoad::default());
    let events = Arc::new(crate::events::EventLog::in_memory(10_000));
    let mut deps = deps(&f, &events).with_autoscale_interval(INTERVAL);
    deps.sockets = Arc::new(UnixBroker(f.rt.clone()));
    deps.load = load.clone();
    if let Some(cpu) = cpus {
        deps = deps.with_capacity(CapacityPolicy {
            capacity: Amounts {
                cpu,
                memory: 1 << 40,
            },
            reserve: Amounts {
                cpu: 0.0,
                memory: 0,
            },
            overcommit: Ratios::default(),
        });
    }
    let (mut driver, handle) = Driver::new(deps);
    driver.restore().await;
    let stop = CancellationToken::new();
    tokio::spawn(driver.run(stop.clone()));
    Scaled {
        r: Rig {
            rt: f.rt,
            packages: f.packages,
            cg: f.cg,
            store: f.store,
            handle,
            stop,
            events,
        },
        load,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

/// An autoscaled service listening on `sock`, with `scale` as its `[scale]` and `extra`
/// keys before it.
fn od(sock: &Path, extra: &str, scale: &str) -> String {
    format!(
        "name = \"od\"\ncommand = [\"/bin/app\"]\n{extra}[stop]\ngrace = \"5s\"\n[[sockets]]\nname = \"http\"\nlisten = \"unix:{}\"\n[scale]\n{scale}\n",
        sock.display()
    )
}

const SCALE: &str =
    "min = 1\nmax = 4\ntarget_connections = 20\nscale_down_delay = \"5s\"\nidle_after = \"60s\"";

impl Scaled {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("od.sock")
    }

    /// Let `secs` seconds of samples happen.
    async fn samples(&self, secs: u64) {
        for _ in 0..secs * 10 {
            tokio::time::sleep(INTERVAL / 10).await;
            settle().await;
        }
    }

    async fn desired(&self) -> u32 {
        self.r.status("od").await.desired
    }

    async fn reason(&self) -> String {
        self.r
            .status("od")
            .await
            .autoscale
            .expect("autoscale status")
            .reason
    }

    /// The reasons of the `autoscaled` events so far.
    async fn autoscaled(&self) -> Vec<String> {
        self.r
            .events()
            .await
            .into_iter()
            .filter_map(|e| match e.kind {
                crate::events::EventKind::Autoscaled { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    /// Make each instance's cgroup report the CPU time of `seconds` at its rate: `(index,
    /// millicores)`.
    fn cpu(&self, rates: &[(u32, u64)], seconds: u64) {
        for (index, c) in rates {
            let path = CgroupPath::instance("od", &format!("od-{index}"));
            self.r.cg.set_stats(
                &path,
                CgroupStats {
                    // Whole nanoseconds of CPU time.
                    cpu_usage_ns: c * seconds * 1_000_000,
                    ..CgroupStats::default()
                },
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn scales_up_at_once_and_no_further_than_max() {
    let s = scaled_rig(None).await;
    s.r.apply(&od(&s.sock(), "", SCALE)).await.expect("apply");
    settle().await;
    assert_eq!(s.desired().await, 1, "replicas defaults to min");
    s.load.set(61);
    s.samples(2).await;
    assert_eq!(
        s.desired().await,
        4,
        "61 connections ask for 4 at target 20"
    );
    assert_eq!(s.r.running("od").await.len(), 4);
    assert_eq!(
        s.autoscaled().await,
        vec!["1 → 4: 61 connections, target 20 per instance".to_owned()]
    );
    s.load.set(500);
    s.samples(2).await;
    assert_eq!(s.desired().await, 4, "never above max");
    assert_eq!(s.r.rt.spawns().len(), 4, "a burst asks once");
}

#[tokio::test(start_paused = true)]
async fn scales_down_only_after_the_delay_and_stops_the_least_loaded() {
    let s = scaled_rig(None).await;
    s.r.apply(&od(&s.sock(), "", SCALE)).await.expect("apply");
    settle().await;
    s.load.set(80);
    s.samples(2).await;
    assert_eq!(s.desired().await, 4);
    let pids: BTreeMap<u32, i32> = s.r.running("od").await.into_iter().collect();
    // Index 1 and 3 are the idle ones; 0 and 2 are busy.
    let mut t = 1;
    s.cpu(&[(0, 900), (1, 50), (2, 800), (3, 100)], t);
    s.samples(1).await;
    s.load.set(40);
    for _ in 0..4 {
        t += 1;
        s.cpu(&[(0, 900), (1, 50), (2, 800), (3, 100)], t);
        s.samples(1).await;
    }
    assert_eq!(s.desired().await, 4, "held while low for less than 5s");
    assert!(
        s.reason().await.starts_with("holding 4"),
        "{}",
        s.reason().await
    );
    assert!(s.r.rt.signals().is_empty(), "nothing stopped yet");
    for _ in 0..3 {
        t += 1;
        s.cpu(&[(0, 900), (1, 50), (2, 800), (3, 100)], t);
        s.samples(1).await;
    }
    assert_eq!(s.desired().await, 2);
    let mut stopped: Vec<i32> = s.r.rt.signals().into_iter().map(|(p, _)| p).collect();
    stopped.sort_unstable();
    let mut least = vec![pids[&1], pids[&3]];
    least.sort_unstable();
    assert_eq!(
        stopped, least,
        "the two least-loaded instances stop, not the highest"
    );
    s.r.exited(pids[&1], 0);
    s.r.exited(pids[&3], 0);
    settle().await;
    let left: Vec<u32> =
        s.r.running("od")
            .await
            .into_iter()
            .map(|(i, _)| i)
            .collect();
    assert_eq!(left, vec![0, 2], "a hole at index 1");
    // A scale-up fills the lowest free index again.
    s.load.set(60);
    s.samples(2).await;
    let now: Vec<u32> =
        s.r.running("od")
            .await
            .into_iter()
            .map(|(i, _)| i)
            .collect();
    assert_eq!(now, vec![0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn goes_to_min_after_idle_after_then_cold_starts_on_a_connection() {
    let s = scaled_rig(None).await;
    let scale = "min = 0\nmax = 4\ntarget_connections = 20\nscale_down_delay = \"2s\"\nidle_after = \"10s\"";
    s.r.apply(&od(&s.sock(), "replicas = 2\n", scale))
        .await
        .expect("apply");
    settle().await;
    assert_eq!(s.r.running("od").await.len(), 2);
    s.samples(5).await;
    assert_eq!(
        s.desired().await,
        1,
        "down to one while not idle long enough"
    );
    s.samples(7).await;
    assert_eq!(s.desired().await, 0, "to min after idle_after");
    assert!(
        s.autoscaled()
            .await
            .last()
            .expect("event")
            .contains("no connection for"),
        "{:?}",
        s.autoscaled().await
    );
    let status = s.r.status("od").await;
    assert!(status.autoscale.expect("autoscale").waiting);
    let spawned = s.r.rt.spawns().len();
    // A connection waits in the kernel's queue: one instance starts at once.
    let _client = std::os::unix::net::UnixStream::connect(s.sock()).expect("connect");
    settle().await;
    assert_eq!(s.desired().await, 1);
    assert_eq!(s.r.rt.spawns().len(), spawned + 1);
    assert!(
        s.reason().await.contains("cold start"),
        "{}",
        s.reason().await
    );
}

#[tokio::test(start_paused = true)]
async fn node_capacity_caps_the_count_and_status_says_so() {
    // 2 cores allocatable, 0.5 per instance: at most 4 whatever max says.
    let s = scaled_rig(Some(2.0)).await;
    let scale = "min = 1\nmax = 8\ntarget_connections = 10\nscale_down_delay = \"5s\"\nidle_after = \"60s\"";
    let spec = od(&s.sock(), "", scale).replace("[stop]", "[resources]\ncpu = 0.5\n[stop]");
    s.r.apply(&spec).await.expect("apply with a cpu limit");
    settle().await;
    s.load.set(75);
    s.samples(2).await;
    assert_eq!(
        s.desired().await,
        4,
        "capped by node capacity, not by max = 8"
    );
    let events = s.autoscaled().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].starts_with(
            "1 → 4: 75 connections, target 10 per instance, capped by node capacity (asks for 8;"
        ),
        "{events:?}"
    );
    s.samples(2).await;
    let reason = s.reason().await;
    assert!(
        reason.starts_with("holding 4: capped by node capacity")
            && reason.contains("resources.cpu"),
        "{reason}"
    );
    assert_eq!(
        s.r.rt.spawns().len(),
        4,
        "no spawn was refused or attempted beyond"
    );
}

#[tokio::test(start_paused = true)]
async fn applying_the_same_spec_again_keeps_the_autoscaled_count() {
    let s = scaled_rig(None).await;
    let text = od(&s.sock(), "replicas = 2\n", SCALE);
    s.r.apply(&text).await.expect("apply");
    settle().await;
    s.load.set(70);
    s.samples(2).await;
    assert_eq!(s.desired().await, 4);
    let outcome = s.r.apply(&text).await.expect("apply again");
    assert_eq!(outcome.kind, ApplyKind::Unchanged);
    settle().await;
    assert_eq!(s.desired().await, 4, "the same spec leaves the count alone");
    assert_eq!(s.r.rt.signals(), vec![], "nothing stopped");
    // A changed [scale] keeps the count within its new range.
    let narrower = od(
        &s.sock(),
        "replicas = 2\n",
        &SCALE.replace("max = 4", "max = 3"),
    );
    s.r.apply(&narrower).await.expect("apply a narrower max");
    settle().await;
    assert_eq!(s.desired().await, 3);
    // A changed replicas sets the count.
    s.load.set(0);
    let one = od(
        &s.sock(),
        "replicas = 1\n",
        &SCALE.replace("max = 4", "max = 3"),
    );
    let outcome = s.r.apply(&one).await.expect("apply replicas = 1");
    assert_eq!(outcome.kind, ApplyKind::Scaled);
    assert_eq!(s.desired().await, 1);
    // The applied count is in the record: it holds across an agent restart.
    let stored = s.r.store.get("services", "od").expect("record");
    let record: desired::Record = serde_json::from_slice(&stored).expect("record");
    assert_eq!(record.applied_replicas, Some(1));
}
