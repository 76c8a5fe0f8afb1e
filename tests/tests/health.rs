//! Health checks with real processes and sockets: every probe kind, start period, probe
//! timeouts, liveness replacement and its guard, READY=1 over NOTIFY_SOCKET, and
//! grpc.health.v1 per service.

use std::time::Duration;

use corral_e2e::{Agent, attribute, eventually, pb, skip_unless_root, testbin};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn spec(name: &str, replicas: u32, args: &[&str], extra: &str) -> String {
    let cmd: Vec<String> = std::iter::once(testbin())
        .chain(args.iter().map(|s| s.to_string()))
        .map(|s| format!("{s:?}"))
        .collect();
    format!(
        "name = \"{name}\"\ncommand = [{}]\nreplicas = {replicas}\n{extra}\n",
        cmd.join(", ")
    )
}

const PORTS: &str = "[ports]\nhttp = \"auto\"\ntcp = \"auto\"\ngrpc = \"auto\"\n";

fn health(probe: &str, extra: &str) -> String {
    format!(
        "{PORTS}[health]\n{probe}\ninterval = \"500ms\"\ntimeout = \"400ms\"\nfailure_threshold = 2\nrestart_on_failure = false\n{extra}"
    )
}

/// Wait until instance 0 of `name` reports `want` health; returns its reason.
async fn health_is(agent: &Agent, name: &str, want: pb::HealthState) -> String {
    eventually(
        &format!("{name}-0 to be {want:?}"),
        Duration::from_secs(30),
        || async {
            let s = agent.get(name).await.ok()?;
            let i = s.instances.first()?;
            (i.health() == want).then(|| i.health_reason.clone())
        },
    )
    .await
}

fn signal(agent: &Agent, instance: &str, sig: &str) {
    let out = agent.cli(&["signal", instance, sig]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn probe_kind(name: &str, probe: &str, healthy_reason: &str, unhealthy_reason: &str) {
    let agent = Agent::start().await;
    agent
        .apply(&spec(name, 1, &["health-server"], &health(probe, "")))
        .await
        .expect("apply");
    let reason = health_is(&agent, name, pb::HealthState::Healthy).await;
    assert!(reason.contains(healthy_reason), "{name} healthy: {reason}");
    let s = agent.get(name).await.expect("get");
    assert_eq!(s.health(), pb::ServiceHealth::Healthy);
    signal(&agent, &format!("{name}-0"), "USR1");
    let reason = health_is(&agent, name, pb::HealthState::Unhealthy).await;
    assert!(
        reason.contains(unhealthy_reason),
        "{name} unhealthy: {reason}"
    );
    assert_eq!(
        agent.get(name).await.expect("get").health(),
        pb::ServiceHealth::Unhealthy
    );
    signal(&agent, &format!("{name}-0"), "USR2");
    health_is(&agent, name, pb::HealthState::Healthy).await;
    let s = agent.get(name).await.expect("get");
    assert_eq!(
        s.instances[0].restarts, 0,
        "restart_on_failure = false: never restarted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe() {
    if skip_unless_root("http_probe") {
        return;
    }
    probe_kind(
        "h",
        "http = \"http://127.0.0.1:{port.http}/healthz\"",
        "HTTP 200",
        "HTTP 503",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_probe() {
    if skip_unless_root("tcp_probe") {
        return;
    }
    probe_kind(
        "t",
        "tcp = \"127.0.0.1:{port.tcp}\"",
        "connected",
        "refused",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_probe() {
    if skip_unless_root("grpc_probe") {
        return;
    }
    probe_kind(
        "g",
        "grpc = \"127.0.0.1:{port.grpc}\"",
        "SERVING",
        "NOT_SERVING",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probe_runs_inside_the_instance() {
    if skip_unless_root("exec_probe_runs_inside_the_instance") {
        return;
    }
    // /tmp/healthy exists only in the instance's private /tmp: the probe must run inside it.
    probe_kind(
        "e",
        "exec = [\"/bin/sh\", \"-c\", \"test -e /tmp/healthy || { echo missing; exit 3; }\"]",
        "exit 0",
        "exit 3: missing",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_probe_is_cut_at_its_timeout() {
    if skip_unless_root("a_hanging_probe_is_cut_at_its_timeout") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "hang",
            1,
            &["health-server"],
            &health("http = \"http://127.0.0.1:{port.http}/hang\"", ""),
        ))
        .await
        .expect("apply");
    let reason = health_is(&agent, "hang", pb::HealthState::Unhealthy).await;
    assert!(reason.contains("timed out after 400ms"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_the_start_period_do_not_count() {
    if skip_unless_root("failures_in_the_start_period_do_not_count") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "slow",
            1,
            &["health-server", "unhealthy"],
            &health(
                "http = \"http://127.0.0.1:{port.http}/\"",
                "start_period = \"4s\"",
            ),
        ))
        .await
        .expect("apply");
    // Failing probes from the start: within the start period the instance stays unknown.
    eventually("a failing probe", Duration::from_secs(10), || async {
        let s = agent.get("slow").await.ok()?;
        s.instances
            .first()?
            .health_reason
            .contains("HTTP 503")
            .then_some(())
    })
    .await;
    assert_eq!(
        agent.get("slow").await.expect("get").instances[0].health(),
        pb::HealthState::Unknown
    );
    health_is(&agent, "slow", pb::HealthState::Unhealthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_instance_is_replaced_as_health_failed() {
    if skip_unless_root("an_unhealthy_instance_is_replaced_as_health_failed") {
        return;
    }
    let agent = Agent::start().await;
    let extra = "[restart]\nbackoff = \"100ms\"\n";
    let text = spec(
        "live",
        1,
        &["health-server"],
        &format!(
            "{extra}{}",
            health("http = \"http://127.0.0.1:{port.http}/\"", "")
        ),
    )
    .replace("restart_on_failure = false", "restart_on_failure = true");
    agent.apply(&text).await.expect("apply");
    let first = {
        health_is(&agent, "live", pb::HealthState::Healthy).await;
        agent.get("live").await.expect("get").instances[0].pid
    };
    signal(&agent, "live-0", "USR1");
    let i = eventually("a replacement", Duration::from_secs(30), || async {
        let s = agent.get("live").await.ok()?;
        let i = s.instances.first()?.clone();
        (i.restarts == 1 && i.pid > 0 && i.pid != first).then_some(i)
    })
    .await;
    let end = i.last_exit.expect("end");
    assert_eq!(end.text, "health_failed");
    assert_eq!(end.class, pb::ExitClass::HealthFailed as i32);
    health_is(&agent, "live", pb::HealthState::Healthy).await;
}

/// Every instance failing at once (a shared outage): at most max(1, 10%) are being
/// replaced for health at any moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_outage_is_not_a_restart_storm() {
    if skip_unless_root("a_shared_outage_is_not_a_restart_storm") {
        return;
    }
    let agent = Agent::start().await;
    // Outside /tmp: the instances have a private one.
    std::fs::create_dir_all("/var/tmp/corral-e2e").expect("mkdir");
    let outage =
        std::path::PathBuf::from(format!("/var/tmp/corral-e2e/outage-{}", std::process::id()));
    let outage_path = outage.display().to_string();
    // The probe fails while the outage file exists (a dependency every instance shares).
    let probe = format!("exec = [\"/bin/sh\", \"-c\", \"test ! -e {outage_path}\"]");
    let text = spec(
        "storm",
        10,
        &["serve"],
        &format!(
            "[restart]\nbackoff = \"100ms\"\n[stop]\ngrace = \"1s\"\n[health]\n{probe}\ninterval = \"200ms\"\ntimeout = \"200ms\"\nfailure_threshold = 1\nrestart_on_failure = true\n"
        ),
    );
    agent.apply(&text).await.expect("apply");
    eventually("10 healthy", Duration::from_secs(60), || async {
        let s = agent.get("storm").await.ok()?;
        (s.healthy == 10).then_some(())
    })
    .await;
    let mut watch = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            from_index: 0,
            service: "storm".into(),
            instance: String::new(),
            follow: true,
            last: 0,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // Skip the history: everything up to now.
    let start = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            last: 1,
            ..Default::default()
        })
        .await
        .expect("w")
        .into_inner()
        .message()
        .await
        .ok()
        .flatten()
        .map_or(0, |e| e.index);
    std::fs::write(&outage, "down").expect("outage");
    let mut replacing: std::collections::BTreeSet<String> = Default::default();
    let mut most = 0;
    let mut health_stops = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, watch.message()).await {
        if e.index <= start {
            continue;
        }
        match e.r#type() {
            pb::EventType::Stopping if attribute(&e, "reason").as_deref() == Some("unhealthy") => {
                replacing.insert(e.instance.clone());
                health_stops += 1;
            }
            pb::EventType::InstanceExited => {
                replacing.remove(&e.instance);
            }
            _ => {}
        }
        most = most.max(replacing.len());
    }
    std::fs::remove_file(&outage).expect("end of outage");
    assert!(
        health_stops >= 2,
        "the outage led to health restarts ({health_stops})"
    );
    assert!(
        most <= 1,
        "at most max(1, 10% of 10) = 1 health restart at a time, saw {most}"
    );
    let s = agent.get("storm").await.expect("get");
    assert!(s.instances.len() == 10, "still 10 instances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_over_notify_socket_makes_an_instance_healthy() {
    if skip_unless_root("ready_over_notify_socket_makes_an_instance_healthy") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "nfy",
            1,
            &["notify-after", "1500"],
            "[health]\nnotify = true\n",
        ))
        .await
        .expect("apply");
    agent.wait_running("nfy", 1).await;
    let early = agent.get("nfy").await.expect("get");
    assert_eq!(
        early.instances[0].health(),
        pb::HealthState::Unknown,
        "not ready before READY=1"
    );
    assert_eq!(early.health(), pb::ServiceHealth::Unhealthy);
    health_is(&agent, "nfy", pb::HealthState::Healthy).await;
    let s = agent.get("nfy").await.expect("get");
    assert_eq!(s.instances[0].notify_status, "warmed up after 1500 ms");
    assert_eq!(s.health(), pb::ServiceHealth::Healthy);
    let mut w = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            instance: "nfy-0".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut saw_ready = false;
    while let Ok(Some(e)) = w.message().await {
        saw_ready |=
            e.r#type() == pb::EventType::Ready && attribute(&e, "via").as_deref() == Some("notify");
    }
    assert!(saw_ready, "a ready event via notify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_follows_a_service() {
    if skip_unless_root("grpc_health_follows_a_service") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "gh",
            2,
            &["health-server"],
            &health("http = \"http://127.0.0.1:{port.http}/\"", ""),
        ))
        .await
        .expect("apply");
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", agent.socket.display()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut h = HealthClient::new(ch);
    let check = |h: &mut HealthClient<tonic::transport::Channel>| {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest {
                service: "gh".into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
        }
    };
    // The service is known to grpc.health once the agent has published it.
    eventually(
        "gh registered with grpc.health",
        Duration::from_secs(10),
        || {
            let c = check(&mut h);
            async move { c.await.map(|_| ()) }
        },
    )
    .await;
    let mut stream = h
        .watch(HealthCheckRequest {
            service: "gh".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    eventually("SERVING", Duration::from_secs(30), || {
        let c = check(&mut h);
        async move { (c.await == Some(ServingStatus::Serving as i32)).then_some(()) }
    })
    .await;
    // SERVING needs one healthy instance; both must be before both are made unhealthy (a
    // signal that comes before the instance's handler is installed would be lost).
    eventually(
        "both instances healthy",
        Duration::from_secs(30),
        || async { (agent.get("gh").await.ok()?.healthy == 2).then_some(()) },
    )
    .await;
    signal(&agent, "gh-0", "USR1");
    signal(&agent, "gh-1", "USR1");
    eventually("NOT_SERVING", Duration::from_secs(30), || {
        let c = check(&mut h);
        async move { (c.await == Some(ServingStatus::NotServing as i32)).then_some(()) }
    })
    .await;
    // The Watch stream saw both.
    let mut seen = Vec::new();
    let serving_then_not = |seen: &[i32]| {
        seen.iter()
            .position(|s| *s == ServingStatus::Serving as i32)
            .is_some_and(|i| seen[i..].contains(&(ServingStatus::NotServing as i32)))
    };
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await
    {
        seen.push(r.status);
        if serving_then_not(&seen) {
            break;
        }
    }
    assert!(
        serving_then_not(&seen),
        "the watch saw SERVING then NOT_SERVING: {seen:?}"
    );
    let unknown = h
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}
