//! Rolling restarts and updates under load, on the real kernel: 4 instances serving HTTP on
//! one agent-owned socket, 16 clients sending one request per connection for the whole
//! rollout. Not one request may fail — through restarts, updates, a revision that never gets
//! healthy (rolled back), the agent killed mid-rollout, and the agent itself restarting.

use std::time::Duration;

use corral_e2e::load::{Load, Report};
use corral_e2e::{Agent, attribute, eventually, free_port, number, pb, skip_unless_root, testbin};

const CLIENTS: usize = 16;
/// No load runs longer than this, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// How long a rollout of these tests may take to end.
const FINISH: Duration = Duration::from_secs(120);

/// 4 instances of the HTTP test server on the agent socket `port`, health-checked on their
/// own admin port; `env` adds to the environment, `rollout` to the `[rollout]` section.
fn spec(name: &str, port: u16, version: &str, env: &str, rollout: &str) -> String {
    format!(
        r#"name = "{name}"
command = [{bin:?}, "http-listen", "300"]
replicas = 4
env = {{ VERSION = "{version}"{env} }}

[ports]
admin = "auto"

[[sockets]]
name = "http"
listen = "127.0.0.1:{port}"

[health]
http = "http://127.0.0.1:{{port.admin}}/healthz"
interval = "200ms"
timeout = "150ms"
# A loaded machine may take a while to start an instance: refusals then do not count.
start_period = "5s"

[rollout]
min_healthy = "500ms"
healthy_deadline = "20s"
{rollout}

[stop]
grace = "5s"
"#,
        bin = testbin()
    )
}

async fn all_healthy(agent: &Agent, name: &str, n: u32) {
    eventually(
        &format!("{n} healthy instances of {name}"),
        Duration::from_secs(30),
        || async {
            let s = agent.get(name).await.ok()?;
            (s.healthy == n && s.instances.len() == n as usize).then_some(())
        },
    )
    .await;
}

/// A rolling restart of `name` while 16 clients load `port` (from `warmup` before it to 0.5 s
/// after it): its final status, checked succeeded with no request failed in its window.
async fn restart_under_load(
    agent: &Agent,
    name: &str,
    port: u16,
    warmup: Duration,
    what: &str,
) -> pb::RolloutStatus {
    let load = Load::start(port, CLIENTS, LOAD_LIMIT);
    tokio::time::sleep(warmup).await;
    let t0 = load.now();
    let id = agent.restart(name).await;
    let done = agent.rollout_end(&id, FINISH).await;
    let t1 = load.now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish();
    assert_eq!(done.state(), pb::RolloutState::Succeeded, "{done:?}");
    no_failures(what, &report, t0, t1);
    done
}

fn pids(s: &pb::ServiceStatus) -> Vec<i32> {
    let mut p: Vec<i32> = s.instances.iter().map(|i| i.pid).collect();
    p.sort_unstable();
    p
}

/// Print what the clients saw (for whoever reads the test output) and check nothing failed.
fn no_failures(what: &str, report: &Report, from: Duration, to: Duration) {
    eprintln!(
        "{what}: {} requests ok, {}; longest gap {:?}; p99 before {:?}, during {:?}",
        report.ok(),
        report.failure_summary(),
        report.longest_gap(from, to),
        report.latency_quantile(Duration::ZERO, from, 0.99),
        report.latency_quantile(from, to, 0.99),
    );
    assert!(
        report.failures().is_empty(),
        "{what}: {}",
        report.failure_summary()
    );
    assert!(
        report.ok() > 100,
        "{what}: the load ran ({} ok)",
        report.ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    if skip_unless_root("a_rolling_restart_under_load_fails_no_request") {
        return;
    }
    let port = free_port();
    let agent = Agent::start().await;
    agent
        .apply(&spec("rr", port, "v1", "", ""))
        .await
        .expect("apply");
    all_healthy(&agent, "rr", 4).await;
    let before = agent.get("rr").await.expect("get");
    let done = restart_under_load(&agent, "rr", port, Duration::from_secs(1), "restart").await;
    assert_eq!((done.replaced, done.to_replace, done.ready), (4, 4, 4));
    let after = agent.get("rr").await.expect("get");
    assert_eq!(after.instances.len(), 4);
    assert!(
        pids(&after).iter().all(|p| !pids(&before).contains(p)),
        "every instance is a fresh process"
    );
    assert_eq!(
        after.revision, before.revision,
        "a restart keeps the revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_under_load_switches_versions_without_failing_a_request() {
    if skip_unless_root("a_rolling_update_under_load_switches_versions_without_failing_a_request") {
        return;
    }
    let port = free_port();
    let agent = Agent::start().await;
    agent
        .apply(&spec("ru", port, "v1", "", ""))
        .await
        .expect("apply");
    all_healthy(&agent, "ru", 4).await;
    let load = Load::start(port, CLIENTS, LOAD_LIMIT);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = load.now();
    let applied = agent
        .apply(&spec("ru", port, "v2", "", ""))
        .await
        .expect("update");
    assert_eq!(
        (applied.outcome(), applied.revision),
        (pb::ApplyOutcome::Updated, 2)
    );
    assert!(applied.replaces_instances);
    let done = agent.rollout_end(&applied.rollout_id, FINISH).await;
    let t1 = load.now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t2 = load.now();
    let report = load.finish();
    assert_eq!(done.state(), pb::RolloutState::Succeeded, "{done:?}");
    no_failures("update", &report, t0, t1);
    let before = report.bodies(Duration::ZERO, t0);
    assert!(
        !before.is_empty() && before.iter().all(|b| b.ends_with(" v1")),
        "v1 before"
    );
    let during = report.bodies(t0, t1);
    assert!(during.iter().any(|b| b.ends_with(" v1")) && during.iter().any(|b| b.ends_with(" v2")));
    let settled = report.bodies(t1 + Duration::from_millis(500), t2);
    assert!(
        !settled.is_empty() && settled.iter().all(|b| b.ends_with(" v2")),
        "only v2 once it is done"
    );
    let s = agent.get("ru").await.expect("get");
    assert_eq!(s.revision, 2);
    assert!(s.instances.iter().all(|i| i.revision == 2));
    assert_eq!(s.revisions, vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_that_never_gets_healthy_is_rolled_back_and_nothing_fails() {
    if skip_unless_root("a_revision_that_never_gets_healthy_is_rolled_back_and_nothing_fails") {
        return;
    }
    let port = free_port();
    let agent = Agent::start().await;
    let fast_fail = "healthy_deadline = \"3s\"";
    let v1 = spec("nh", port, "v1", "", "").replace("healthy_deadline = \"20s\"", fast_fail);
    agent.apply(&v1).await.expect("apply");
    all_healthy(&agent, "nh", 4).await;
    let before = agent.get("nh").await.expect("get");
    let load = Load::start(port, CLIENTS, LOAD_LIMIT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = load.now();
    // Failing its probe, but not restarted for it: only the deadline ends its chance.
    let broken = spec("nh", port, "v2", ", ADMIN_STATUS = \"503\"", "")
        .replace("healthy_deadline = \"20s\"", fast_fail)
        .replace(
            "timeout = \"150ms\"",
            "timeout = \"150ms\"\nrestart_on_failure = false",
        );
    let applied = agent.apply(&broken).await.expect("update");
    let failed = agent.rollout_end(&applied.rollout_id, FINISH).await;
    assert_eq!(failed.state(), pb::RolloutState::Failed, "{failed:?}");
    assert!(
        failed.reason.contains("within 3s"),
        "why it failed: {}",
        failed.reason
    );
    assert!(!failed.rollback_id.is_empty(), "auto_rollback started");
    let back = agent.rollout_end(&failed.rollback_id, FINISH).await;
    let t1 = load.now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish();
    assert_eq!(
        (back.kind(), back.state(), back.to_revision),
        (
            pb::RolloutKind::AutoRollback,
            pb::RolloutState::Succeeded,
            1
        )
    );
    no_failures("failed update", &report, t0, t1);
    let after = agent.get("nh").await.expect("get");
    assert_eq!(after.revision, 1);
    assert_eq!(
        pids(&after),
        pids(&before),
        "the old instances were never touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_rollout_finishes_it_with_exactly_the_replicas() {
    if skip_unless_root("an_agent_killed_mid_rollout_finishes_it_with_exactly_the_replicas") {
        return;
    }
    let port = free_port();
    let mut agent = Agent::start().await;
    let slow =
        spec("km", port, "v1", "", "").replace("min_healthy = \"500ms\"", "min_healthy = \"1s\"");
    agent.apply(&slow).await.expect("apply");
    all_healthy(&agent, "km", 4).await;
    let load = Load::start(port, CLIENTS, LOAD_LIMIT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = load.now();
    let id = agent.restart("km").await;
    eventually("the rollout halfway", Duration::from_secs(60), || async {
        let r = agent.rollout(&id).await;
        (r.replaced >= 2 && r.state() == pb::RolloutState::Running).then_some(())
    })
    .await;
    agent.stop_with(libc::SIGKILL);
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.launch().await;
    let done = agent.rollout_end(&id, FINISH).await;
    let t1 = load.now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish();
    assert_eq!(done.state(), pb::RolloutState::Succeeded, "{done:?}");
    assert!(
        done.steps.iter().any(|s| s.step == "resumed"),
        "{:?}",
        done.steps
    );
    no_failures("agent killed mid-rollout", &report, t0, t1);
    // A rollout completes while its last old instances are still stopping (they drain):
    // wait for them to leave, then exactly the replicas, all of one revision, and nothing
    // else in the service's cgroups. A duplicate would stay running and fail below.
    let stopping = pb::InstanceState::Stopping as i32;
    let s = eventually(
        "the old instances gone",
        Duration::from_secs(30),
        || async {
            let s = agent.get("km").await.expect("get");
            s.instances.iter().all(|i| i.state != stopping).then_some(s)
        },
    )
    .await;
    assert_eq!(s.instances.len(), 4, "{:?}", s.instances);
    assert!(s.instances.iter().all(|i| i.state == 1 && i.revision == 1));
    let procs: usize = s
        .instances
        .iter()
        .map(|i| {
            std::fs::read_to_string(format!("/proc/{}/status", i.pid))
                .map(|_| 1)
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(procs, 4, "every reported instance is alive");
    let log = agent.log_text();
    assert!(log.contains("resuming an interrupted rollout"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sockets_survive_agent_restarts_without_a_refused_connection() {
    if skip_unless_root("the_sockets_survive_agent_restarts_without_a_refused_connection") {
        return;
    }
    let port = free_port();
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("sa", port, "v1", "", ""))
        .await
        .expect("apply");
    all_healthy(&agent, "sa", 4).await;
    let before = agent.get("sa").await.expect("get");
    let load = Load::start(port, CLIENTS, LOAD_LIMIT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = load.now();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        agent.stop_with(signal);
        tokio::time::sleep(Duration::from_secs(1)).await;
        agent.launch().await;
        all_healthy(&agent, "sa", 4).await;
    }
    let t1 = load.now();
    let report = load.finish();
    no_failures("agent restarts", &report, t0, t1);
    assert_eq!(pids(&agent.get("sa").await.expect("get")), pids(&before));
}

/// Follow the service's events until its rollout ends; check every step's counts against
/// the bounds, and count processes from the instance events independently.
async fn bounds_hold(surge: u32, unavailable: u32) {
    let name = format!("b{surge}{unavailable}");
    let port = free_port();
    let agent = Agent::start().await;
    let policy = format!("max_surge = {surge}\nmax_unavailable = {unavailable}");
    agent
        .apply(&spec(&name, port, "v1", "", &policy))
        .await
        .expect("apply");
    all_healthy(&agent, &name, 4).await;
    let mut client = agent.client().await;
    let mut watch = client
        .watch(pb::WatchRequest {
            from_index: 0,
            service: name.clone(),
            instance: String::new(),
            follow: true,
            last: 0,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let id = agent.restart(&name).await;
    let mut up: std::collections::BTreeSet<String> = Default::default();
    let mut stopping: std::collections::BTreeSet<String> = Default::default();
    let mut in_rollout = false;
    let mut steps = 0;
    let mut became_healthy = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let e = tokio::time::timeout_at(deadline, watch.message())
            .await
            .expect("the rollout ends in time")
            .expect("watch")
            .expect("stream open");
        let attr = |k: &str| attribute(&e, k).unwrap_or_default();
        let num = |k: &str| {
            number(&e, k)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0)
        };
        match e.r#type() {
            pb::EventType::InstanceStarted => {
                up.insert(e.instance.clone());
            }
            pb::EventType::InstanceExited => {
                up.remove(&e.instance);
                stopping.remove(&e.instance);
            }
            pb::EventType::Stopping => {
                stopping.insert(e.instance.clone());
            }
            pb::EventType::HealthChanged if in_rollout && attr("to") == "healthy" => {
                became_healthy += 1
            }
            pb::EventType::RolloutStarted if attr("rollout") == id => in_rollout = true,
            pb::EventType::RolloutStep if attr("rollout") == id => {
                steps += 1;
                let present = num("new") + num("old");
                assert!(
                    present <= 4 + surge,
                    "surge {surge}: {present} instances at {}",
                    e.message
                );
                assert!(
                    num("available") + unavailable >= 4,
                    "unavailable {unavailable}: {} available at {}",
                    num("available"),
                    e.message
                );
            }
            pb::EventType::RolloutFinished if attr("rollout") == id => {
                assert_eq!(attr("state"), "succeeded", "{}", e.message);
                break;
            }
            _ => {}
        }
        if in_rollout {
            // Instances still in their stop grace period count for nothing; the others never
            // exceed replicas + surge.
            let serving = u32::try_from(up.difference(&stopping).count()).expect("a small count");
            assert!(
                serving <= 4 + surge,
                "{serving} instances up and not stopping: {up:?} - {stopping:?}"
            );
        }
    }
    assert!(
        steps >= 12,
        "started, ready, stopping, stopped for each of 4: {steps}"
    );
    assert_eq!(
        became_healthy, 4,
        "each new instance's probe made it healthy"
    );
    eventually(
        "the old instances gone",
        Duration::from_secs(30),
        || async { (agent.get(&name).await.ok()?.instances.len() == 4).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_zero_unavailable_one_holds_its_bounds() {
    if skip_unless_root("surge_zero_unavailable_one_holds_its_bounds") {
        return;
    }
    bounds_hold(0, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_two_unavailable_zero_holds_its_bounds() {
    if skip_unless_root("surge_two_unavailable_zero_holds_its_bounds") {
        return;
    }
    bounds_hold(2, 0).await;
}

/// An instance that serves only 1 s after its start, probed every 100 ms with the default
/// start window: its early refusals do not count, so it is never declared unhealthy nor
/// restarted — neither when the service is created nor through a rolling restart under load
/// (with `start_period = "0s"` it would fail three probes within 0.3 s and be replaced before
/// it ever served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_slow_to_start_is_not_replaced_under_the_default_start_window() {
    if skip_unless_root("an_instance_slow_to_start_is_not_replaced_under_the_default_start_window")
    {
        return;
    }
    let port = free_port();
    let agent = Agent::start().await;
    let slow = format!(
        r#"name = "slow"
command = [{bin:?}, "http-listen", "1000"]
replicas = 4

[ports]
admin = "auto"

[[sockets]]
name = "http"
listen = "127.0.0.1:{port}"

[health]
http = "http://127.0.0.1:{{port.admin}}/healthz"
interval = "100ms"
timeout = "100ms"
"#,
        bin = testbin()
    );
    agent.apply(&slow).await.expect("apply");
    all_healthy(&agent, "slow", 4).await;
    restart_under_load(
        &agent,
        "slow",
        port,
        Duration::from_millis(500),
        "restart of instances slow to start",
    )
    .await;
    let s = agent.get("slow").await.expect("get");
    assert!(
        s.instances.iter().all(|i| i.restarts == 0),
        "no instance was restarted: {:?}",
        s.instances
    );
    // Not one instance was ever unhealthy: their refusals while starting did not count.
    let mut events = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            service: "slow".into(),
            follow: false,
            last: 2000,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut healthy = 0;
    while let Some(e) = events.message().await.expect("events") {
        if e.r#type() == pb::EventType::HealthChanged {
            let to = attribute(&e, "to").unwrap_or_default();
            assert_ne!(to, "unhealthy", "{e:?}");
            healthy += usize::from(to == "healthy");
        }
    }
    assert_eq!(
        healthy, 8,
        "4 instances, then 4 new ones, each healthy once"
    );
}

/// Through a rolling restart under load, every old instance gets its stop signal, accepts
/// nothing after it, and answers every connection it accepted before it exits (`drained 0`),
/// while its siblings take the queued connections: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_accepts_nothing_more_and_drains_what_it_accepted() {
    if skip_unless_root("a_stopped_instance_accepts_nothing_more_and_drains_what_it_accepted") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // Instances get a /tmp of their own; /var/tmp is the host's.
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let port = free_port();
    let agent = Agent::start().await;
    let env = format!(", ACCEPT_LOG = {:?}", dir.path().display().to_string());
    agent
        .apply(&spec("dr", port, "v1", &env, ""))
        .await
        .expect("apply");
    all_healthy(&agent, "dr", 4).await;
    restart_under_load(&agent, "dr", port, Duration::from_secs(1), "restart").await;
    let mut stopped = 0;
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read log");
        let lines: Vec<&str> = text.lines().collect();
        let Some(term) = lines.iter().position(|l| *l == "term") else {
            continue;
        };
        stopped += 1;
        let who = path.display();
        assert!(
            lines[..term].contains(&"accept"),
            "{who} served before it stopped"
        );
        assert_eq!(
            &lines[term + 1..],
            &["drained 0"],
            "{who}: nothing accepted after its stop signal, nothing left unanswered"
        );
    }
    assert_eq!(
        stopped, 4,
        "the 4 old instances were stopped with their stop signal"
    );
}
