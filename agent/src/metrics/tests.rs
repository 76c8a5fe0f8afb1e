//! The collector over the supervisor running on the test doubles (`runtime::fake`,
//! `cgroups::recording`, `store::MemStore`): what a scrape says of each instance and service,
//! in both formats, and that a deleted service's series are gone from the next scrape.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::cgroups::recording::RecordingCgroups;
use crate::cgroups::{Capabilities, CgroupError, CgroupPath, CgroupStats};
use crate::runtime::LogStat;
use crate::runtime::fake::FakeRuntime;
use crate::spec::Namespace;
use crate::store::MemStore;
use crate::supervisor::{Deps, Driver, Phase};

struct Rig {
    rt: Arc<FakeRuntime>,
    cg: Arc<RecordingCgroups>,
    handle: SupervisorHandle,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn rig() -> Rig {
    let rt = Arc::new(FakeRuntime::new());
    let cg = Arc::new(RecordingCgroups::default());
    let agent = AgentMetrics::default();
    let counted: Arc<dyn CgroupBackend> = Arc::new(CountingCgroups::new(
        cg.clone(),
        agent.cgroup_errors.clone(),
    ));
    let events = Arc::new(EventLog::in_memory(10_000));
    let deps = Deps::new(
        rt.clone(),
        counted.clone(),
        Arc::new(MemStore::new()),
        Namespace::ALL.to_vec(),
        events.clone(),
    );
    let (mut driver, handle) = Driver::new(deps);
    driver.restore().await;
    let stop = CancellationToken::new();
    tokio::spawn(driver.run(stop.clone()));
    let metrics = Metrics::new(agent, handle.clone(), events, counted, rt.clone());
    Rig {
        rt,
        cg,
        handle,
        metrics,
        stop,
    }
}

const WEB: &str = "name = \"web\"\ncommand = [\"/bin/app\"]\nreplicas = 2\n\
    [resources]\nmemory = \"64MiB\"\n\
    [health]\nexec = [\"/bin/check\"]\ninterval = \"100ms\"\ntimeout = \"50ms\"\n";
const CRASH: &str = "name = \"crash\"\ncommand = [\"/bin/fail\"]\n[restart]\nbackoff = \"10ms\"\n";

impl Rig {
    async fn apply(&self, text: &str) {
        let spec = crate::spec::parse_toml(text).expect("valid spec");
        self.handle.apply(spec, false, false).await.expect("apply");
    }

    /// Wait (bounded) until `ok` holds for the service's status.
    async fn until(&self, name: &str, ok: impl Fn(&crate::supervisor::ServiceStatus) -> bool) {
        for _ in 0..500 {
            if let Ok(s) = self.handle.get(name).await
                && ok(&s)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} never got there: {:?}", self.handle.get(name).await);
    }

    /// Delete a service, its instances ending as they are told to stop.
    async fn delete(&self, name: &str) {
        let h = self.handle.clone();
        let service = name.to_string();
        let deleting = tokio::spawn(async move { h.delete(&service, false).await });
        for _ in 0..500 {
            if deleting.is_finished() {
                break;
            }
            if let Ok(s) = self.handle.get(name).await {
                for pid in s.instances.iter().filter_map(|i| i.init_pid) {
                    self.rt.exit_code(pid, 0);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        deleting.await.expect("join").expect("deleted");
    }

    async fn scrape(&self) -> Series {
        let text = self
            .metrics
            .scrape(Format::Prometheus)
            .await
            .expect("scrape");
        Series::parse(&text)
    }
}

/// A scrape's samples: `name{labels}` as written -> value.
struct Series(BTreeMap<String, f64>, String);

impl Series {
    fn parse(text: &str) -> Series {
        let map = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').expect("name and value");
                (key.to_string(), value.parse::<f64>().expect("a number"))
            })
            .collect();
        Series(map, text.to_string())
    }

    fn get(&self, key: &str) -> f64 {
        match self.0.get(key) {
            Some(v) => *v,
            None => panic!("no series {key} in\n{}", self.1),
        }
    }

    fn any(&self, needle: &str) -> bool {
        self.0.keys().any(|k| k.contains(needle))
    }
}

fn web(instance: &str) -> String {
    format!("service=\"web\",instance=\"{instance}\",revision=\"1\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_every_instance_and_forgets_deleted_services() {
    let r = rig().await;
    r.apply(WEB).await;
    r.apply(CRASH).await;
    r.until("web", |s| s.running == 2).await;
    r.cg.set_stats(
        &CgroupPath::instance("web", "web-0"),
        CgroupStats {
            cpu_usage_ns: 1_500_000_000,
            memory_bytes: 4_096_000,
            memory_peak_bytes: 8_192_000,
            oom_kills: 2,
            pids: 3,
            cpu_throttled_periods: 7,
            cpu_throttled_ns: 350_000_000,
            memory_limit_bytes: Some(64 << 20),
            memory_pressure: None,
        },
    );
    r.rt.set_log_stat(
        "web-0",
        LogStat {
            lines_dropped: 1,
            bytes_dropped: 56,
            bytes_written: 1234,
        },
    );
    // The crashing service's instance fails once, and is restarted after its backoff.
    r.until("crash", |s| s.running == 1).await;
    let pid = r.handle.get("crash").await.expect("status").instances[0]
        .init_pid
        .expect("pid");
    assert!(r.rt.exit_code(pid, 3));
    r.until("crash", |s| {
        s.instances[0].restarts == 1 && s.instances[0].state == Phase::Running
    })
    .await;
    // Both web instances probed a few times and healthy.
    r.until("web", |s| s.healthy == 2).await;
    tokio::time::sleep(Duration::from_millis(250)).await;

    let s = r.scrape().await;
    let w0 = web("web-0");
    assert_eq!(
        s.get(&format!("corral_instance_cpu_seconds_total{{{w0}}}")),
        1.5
    );
    assert_eq!(
        s.get(&format!(
            "corral_instance_cpu_throttled_periods_total{{{w0}}}"
        )),
        7.0
    );
    assert_eq!(
        s.get(&format!(
            "corral_instance_cpu_throttled_seconds_total{{{w0}}}"
        )),
        0.35
    );
    assert_eq!(
        s.get(&format!("corral_instance_memory_usage_bytes{{{w0}}}")),
        4_096_000.0
    );
    assert_eq!(
        s.get(&format!("corral_instance_memory_peak_bytes{{{w0}}}")),
        8_192_000.0
    );
    assert_eq!(
        s.get(&format!("corral_instance_memory_limit_bytes{{{w0}}}")),
        f64::from(64u32 << 20)
    );
    assert_eq!(
        s.get(&format!("corral_instance_oom_kills_total{{{w0}}}")),
        2.0
    );
    assert_eq!(s.get(&format!("corral_instance_tasks{{{w0}}}")), 3.0);
    assert_eq!(
        s.get(&format!("corral_instance_log_written_bytes_total{{{w0}}}")),
        1234.0
    );
    assert_eq!(
        s.get(&format!("corral_instance_log_dropped_bytes_total{{{w0}}}")),
        56.0
    );
    // web-1's cgroup reads all zero and unlimited: no limit series.
    let w1 = web("web-1");
    assert_eq!(
        s.get(&format!("corral_instance_cpu_seconds_total{{{w1}}}")),
        0.0
    );
    assert!(!s.any(&format!("corral_instance_memory_limit_bytes{{{w1}}}")));
    for w in [&w0, &w1] {
        assert_eq!(s.get(&format!("corral_instance_up{{{w}}}")), 1.0);
        assert_eq!(s.get(&format!("corral_instance_healthy{{{w}}}")), 1.0);
        assert_eq!(
            s.get(&format!(
                "corral_instance_health_state{{{w},state=\"healthy\"}}"
            )),
            1.0
        );
        assert!(!s.any(&format!(
            "corral_instance_health_state{{{w},state=\"unknown\"}}"
        )));
        assert!(
            s.get(&format!(
                "corral_instance_probe_duration_seconds_count{{{w}}}"
            )) >= 2.0
        );
        assert_eq!(
            s.get(&format!("corral_instance_probe_failures_total{{{w}}}")),
            0.0
        );
        assert!(s.get(&format!("corral_instance_start_time_seconds{{{w}}}")) > 1.6e9);
    }
    let c0 = "service=\"crash\",instance=\"crash-0\",revision=\"1\"";
    assert_eq!(
        s.get(&format!("corral_instance_restarts_total{{{c0}}}")),
        1.0
    );
    assert_eq!(
        s.get(&format!(
            "corral_instance_last_exit{{{c0},class=\"exited\"}}"
        )),
        1.0
    );
    assert!(
        !s.any("probe_duration_seconds_count{service=\"crash\""),
        "no probe, no probe series"
    );
    assert_eq!(
        s.get("corral_service_desired_instances{service=\"web\"}"),
        2.0
    );
    assert_eq!(
        s.get("corral_service_running_instances{service=\"web\"}"),
        2.0
    );
    assert_eq!(
        s.get("corral_service_healthy_instances{service=\"web\"}"),
        2.0
    );
    assert_eq!(
        s.get("corral_service_rollouts_finished_total{service=\"web\",state=\"failed\"}"),
        0.0,
        "counted from 0 before the first one"
    );
    assert!(s.get("corral_events_last_index") >= 5.0);
    assert!(s.get("process_resident_memory_bytes") > 0.0);
    assert_eq!(s.get("corral_build_info{version=\"0.1.0\"}"), 1.0);

    // A changed spec is a rollout; it is counted by kind.
    r.apply(&WEB.replace("[resources]", "env = { V = \"2\" }\n[resources]"))
        .await;
    let s = r.scrape().await;
    assert_eq!(
        s.get("corral_service_rollouts_started_total{service=\"web\",kind=\"update\"}"),
        1.0
    );

    // Deleted: none of its series in the next scrape; the other service's stay.
    r.delete("web").await;
    let s = r.scrape().await;
    assert!(!s.any("service=\"web\""), "{}", s.1);
    assert!(s.any("service=\"crash\""));

    // OpenMetrics: the same series, its own framing.
    let om = r.metrics.scrape(Format::OpenMetrics).await.expect("scrape");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE corral_instance_restarts counter\n"));
    assert!(om.contains("# UNIT corral_instance_cpu_seconds seconds\n"));
    assert!(om.contains(&format!("corral_instance_restarts_total{{{c0}}} 1\n")));
}

/// A backend whose every write fails (the cgroup is busy on `remove`).
#[derive(Debug)]
struct Broken(Capabilities);

fn broken<T>() -> Result<T, CgroupError> {
    Err(CgroupError::Setup("broken".into()))
}

impl CgroupBackend for Broken {
    fn capabilities(&self) -> &Capabilities {
        &self.0
    }
    fn create(&self, _: &CgroupPath, _: &crate::spec::Resources) -> Result<(), CgroupError> {
        broken()
    }
    fn open_procs(&self, _: &CgroupPath) -> Result<Vec<std::os::fd::OwnedFd>, CgroupError> {
        broken()
    }
    fn open_dir(&self, _: &CgroupPath) -> Result<Option<std::os::fd::OwnedFd>, CgroupError> {
        broken()
    }
    fn procs(&self, _: &CgroupPath) -> Result<Vec<i32>, CgroupError> {
        broken()
    }
    fn kill_all(&self, _: &CgroupPath) -> Result<(), CgroupError> {
        broken()
    }
    fn stats(&self, _: &CgroupPath) -> Result<CgroupStats, CgroupError> {
        broken()
    }
    fn remove(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        Err(CgroupError::Remove {
            path: path.to_string(),
            dir: path.relative(),
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        })
    }
    fn children(&self, _: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        broken()
    }
    fn display_path(&self, path: &CgroupPath) -> String {
        path.to_string()
    }
}

#[test]
fn failed_cgroup_writes_are_counted_by_operation_and_busy_removes_are_not() {
    let errors = CgroupErrors::new();
    let caps = RecordingCgroups::default().capabilities().clone();
    let b = CountingCgroups::new(Arc::new(Broken(caps)), errors.clone());
    let path = CgroupPath::instance("web", "web-0");
    assert!(b.create(&path, &crate::spec::Resources::default()).is_err());
    assert!(b.open_procs(&path).is_err());
    assert!(b.open_dir(&path).is_err());
    assert!(b.kill_all(&path).is_err());
    assert!(b.remove(&path).is_err_and(|e| e.is_busy()));
    // Reads are not writes.
    assert!(b.stats(&path).is_err() && b.procs(&path).is_err());
    let counts: Vec<u64> = ["create", "attach", "kill", "remove"]
        .into_iter()
        .map(|op| errors.get(op))
        .collect();
    assert_eq!(counts, [1, 2, 1, 0]);
}

#[test]
fn openmetrics_only_for_clients_that_accept_it() {
    let prometheus_242 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let cases = [
        (None, Format::Prometheus),
        (Some("*/*"), Format::Prometheus),
        (Some("text/plain"), Format::Prometheus),
        (Some(prometheus_242), Format::OpenMetrics),
        (Some("Application/OpenMetrics-Text"), Format::OpenMetrics),
        (Some("application/openmetrics-text;q=0"), Format::Prometheus),
        (
            Some("text/plain;q=0.9, application/openmetrics-text; q=0.2"),
            Format::OpenMetrics,
        ),
    ];
    for (accept, want) in cases {
        assert_eq!(Format::negotiate(accept), want, "{accept:?}");
    }
}
