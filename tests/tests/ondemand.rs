//! `[scale]`: a service started by its first connection (which waits in the kernel's queue
//! and is answered by that instance), scaled out by open connections, back to one after
//! `scale_down_delay` and to zero after `idle_after`; a burst at zero instances; an agent
//! restart while scaled out; a rollout while autoscaling; a cold start that fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use corral_e2e::{Agent, eventually, free_port, skip_unless_root, testbin};
use corral_proto::v1 as pb;

/// Samples fast, so the durations below stay short.
const INTERVAL: &str = "100ms";

async fn agent() -> Agent {
    Agent::start_full_args(
        "info,corral_agent=debug",
        &["--autoscale-interval", INTERVAL],
    )
    .await
}

fn spec(name: &str, port: u16, version: &str, scale: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [{:?}, \"http-listen\"]\nenv = {{ VERSION = \"{version}\" }}\n[stop]\ngrace = \"5s\"\n[rollout]\nmin_healthy = \"0s\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[scale]\n{scale}\n",
        testbin()
    )
}

const SCALE: &str =
    "max = 6\ntarget_connections = 20\nscale_down_delay = \"2s\"\nidle_after = \"3s\"";

/// One HTTP request; the body.
fn get(port: u16) -> std::io::Result<String> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answer {out:?}")));
    }
    Ok(out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// `n` connections held open (no request sent: the instance waits for one).
fn hold(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect()
}

async fn status(agent: &Agent, name: &str) -> pb::ServiceStatus {
    agent.get(name).await.expect("get")
}

/// The running instances' PIDs.
fn pids(s: &pb::ServiceStatus) -> Vec<i32> {
    s.instances
        .iter()
        .filter(|i| i.state == pb::InstanceState::Running as i32)
        .map(|i| i.pid)
        .collect()
}

async fn wait_desired(
    agent: &Agent,
    name: &str,
    what: &str,
    f: impl Fn(u32) -> bool,
) -> pb::ServiceStatus {
    eventually(what, Duration::from_secs(30), || async {
        let s = status(agent, name).await;
        // Running, each with its service process seen.
        let all = u32::try_from(s.instances.len()).ok() == Some(s.desired)
            && pids(&s).iter().all(|p| *p > 0);
        (f(s.desired) && s.running == s.desired && all).then_some(s)
    })
    .await
}

/// The service's autoscaler events, as their messages.
async fn autoscaled(agent: &Agent, name: &str) -> Vec<String> {
    let mut w = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            service: name.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = w.message().await.expect("stream") {
        if e.r#type == pb::EventType::Scaled as i32 && e.message.starts_with("autoscaled") {
            out.push(e.message);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_scale_out_scale_down_and_to_zero() {
    if skip_unless_root("cold_start_scale_out_scale_down_and_to_zero") {
        return;
    }
    let port = free_port();
    let agent = agent().await;
    agent
        .apply(&spec("od", port, "v1", SCALE))
        .await
        .expect("apply");
    let s = status(&agent, "od").await;
    assert_eq!((s.desired, s.instances.len()), (0, 0), "{s:?}");
    let a = s.autoscale.expect("autoscale status");
    assert!(a.waiting, "{a:?}");

    // The first request starts the first instance, and that instance answers it.
    let body = tokio::task::spawn_blocking(move || get(port))
        .await
        .expect("join");
    assert_eq!(body.expect("first request served"), "od-0 v1");
    let s = status(&agent, "od").await;
    assert_eq!(s.desired, 1, "{s:?}");

    // 80 open connections at 20 per instance: at least 4 instances.
    let held = hold(port, 80);
    let s = wait_desired(&agent, "od", "4 instances or more", |n| n >= 4).await;
    assert!(s.desired <= 6, "{s:?}");
    let a = s.autoscale.expect("autoscale status");
    assert!(a.connections >= 60, "{a:?}");
    let events = autoscaled(&agent, "od").await;
    assert!(
        events
            .iter()
            .any(|m| m.contains("connections, target 20 per instance")),
        "{events:?}"
    );

    // Load stops: one instance after scale_down_delay, none after idle_after.
    drop(held);
    let s = wait_desired(&agent, "od", "back to 1", |n| n == 1).await;
    assert_eq!(pids(&s).len(), 1);
    wait_desired(&agent, "od", "down to 0", |n| n == 0).await;
    let events = autoscaled(&agent, "od").await;
    assert!(events.iter().any(|m| m.contains("→ 1:")), "{events:?}");
    assert!(
        events
            .iter()
            .any(|m| m.contains("1 → 0: no connection for")),
        "{events:?}"
    );
    // And it starts again on demand.
    let body = tokio::task::spawn_blocking(move || get(port))
        .await
        .expect("join");
    assert!(body.expect("served again").ends_with(" v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_connections_at_zero_is_served_in_full() {
    if skip_unless_root("a_burst_of_200_connections_at_zero_is_served_in_full") {
        return;
    }
    let port = free_port();
    let agent = agent().await;
    agent
        .apply(&spec(
            "burst",
            port,
            "v1",
            "max = 4\ntarget_connections = 50",
        ))
        .await
        .expect("apply");
    assert_eq!(status(&agent, "burst").await.desired, 0);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                get(port)
            })
        })
        .collect();
    let mut failed = Vec::new();
    for c in clients {
        match c.join().expect("client thread") {
            Ok(body) if body.starts_with("burst-") => {}
            other => failed.push(format!("{other:?}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_keeps_the_scaled_out_instances() {
    if skip_unless_root("an_agent_restart_keeps_the_scaled_out_instances") {
        return;
    }
    let port = free_port();
    let mut agent = agent().await;
    agent
        .apply(&spec("keep", port, "v1", SCALE))
        .await
        .expect("apply");
    let held = hold(port, 70);
    let before = wait_desired(&agent, "keep", "4 instances", |n| n >= 4).await;
    let mut before_pids = pids(&before);
    agent.stop_with(libc::SIGTERM);
    agent.launch().await;
    let after = status(&agent, "keep").await;
    assert_eq!(after.desired, before.desired, "the count is desired state");
    let after = wait_desired(&agent, "keep", "the instances adopted", |n| {
        n == before.desired
    })
    .await;
    let mut after_pids = pids(&after);
    before_pids.sort_unstable();
    after_pids.sort_unstable();
    assert_eq!(before_pids, after_pids, "the same processes run on");
    // Still autoscaled after the restart: the held connections keep it out, and once they
    // go it comes down.
    drop(held);
    wait_desired(&agent, "keep", "back to 1", |n| n == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_during_autoscaling_replaces_the_current_count() {
    if skip_unless_root("a_rollout_during_autoscaling_replaces_the_current_count") {
        return;
    }
    let port = free_port();
    let agent = agent().await;
    let scale =
        "max = 4\ntarget_connections = 10\nscale_down_delay = \"30s\"\nidle_after = \"60s\"";
    agent
        .apply(&spec("roll", port, "v1", scale))
        .await
        .expect("apply");
    let held = hold(port, 25);
    let s = wait_desired(&agent, "roll", "3 instances", |n| n == 3).await;
    assert_eq!(s.revision, 1);
    let r = agent
        .apply(&spec("roll", port, "v2", scale))
        .await
        .expect("apply v2");
    assert!(!r.rollout_id.is_empty(), "{r:?}");
    let s = eventually("the rollout done", Duration::from_secs(60), || async {
        let s = status(&agent, "roll").await;
        let done = s
            .rollout
            .as_ref()
            .is_some_and(|r| r.state == pb::RolloutState::Succeeded as i32);
        let all_v2 = s.instances.iter().all(|i| i.revision == 2);
        (done && all_v2 && s.running == s.desired).then_some(s)
    })
    .await;
    assert_eq!(s.desired, 3, "the rollout keeps the autoscaled count");
    drop(held);
    for _ in 0..3 {
        let body = tokio::task::spawn_blocking(move || get(port))
            .await
            .expect("join");
        assert!(body.expect("served").ends_with(" v2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_that_fails_closes_the_queue_once_the_policy_gives_up() {
    if skip_unless_root("a_cold_start_that_fails_closes_the_queue_once_the_policy_gives_up") {
        return;
    }
    let agent = agent().await;
    let failing = |name: &str, port: u16, policy: &str| {
        format!(
            "name = \"{name}\"\ncommand = [{:?}, \"exit\", \"3\", \"200\"]\n[restart]\npolicy = \"{policy}\"\nbackoff = \"100ms\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[scale]\nmax = 2\ntarget_connections = 5\n",
            testbin()
        )
    };
    // on-failure restarts exit(3) for ever: the connection stays queued meanwhile.
    let port = free_port();
    agent
        .apply(&failing("retry", port, "on-failure"))
        .await
        .expect("apply");
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let e = c
        .read(&mut buf)
        .expect_err("still waiting while the policy retries");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    let s = status(&agent, "retry").await;
    assert_eq!(s.desired, 1, "{s:?}");
    assert!(s.instances[0].restarts >= 1, "{s:?}");

    // policy = never: the policy gives up at the first exit, the queue is closed, the reason
    // is in status and the service waits again.
    let port = free_port();
    agent
        .apply(&failing("bad", port, "never"))
        .await
        .expect("apply never");
    let mut c2 = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c2.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // Closed by the agent: end of stream or a reset, never a hang.
    match c2.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}"),
    }
    let s = eventually(
        "back at 0 with the reason",
        Duration::from_secs(30),
        || async {
            let s = status(&agent, "bad").await;
            (s.desired == 0).then_some(s)
        },
    )
    .await;
    let a = s.autoscale.expect("autoscale status");
    assert!(a.reason.contains("do not start"), "{a:?}");
    assert!(a.reason.contains("exited(3)"), "{a:?}");
    assert!(a.waiting, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_scale_specs_are_refused_naming_the_field() {
    if skip_unless_root("bad_scale_specs_are_refused_naming_the_field") {
        return;
    }
    let agent = agent().await;
    let port = free_port();
    let cases = [
        (
            format!(
                "name = \"x\"\ncommand = [{:?}, \"http-listen\"]\n[scale]\nmax = 2\ntarget_connections = 5\n",
                testbin()
            ),
            "scale: needs at least one [[sockets]]",
        ),
        (
            spec("x", port, "v1", "max = 2"),
            "scale: needs target_connections",
        ),
        (
            spec("x", port, "v1", "min = 3\nmax = 2\ntarget_cpu = 0.5"),
            "scale.min",
        ),
        (
            spec("x", port, "v1", "max = 2\ntarget_cpu = 2.0"),
            "scale.target_cpu",
        ),
        (
            spec(
                "x",
                port,
                "v1",
                "max = 2\ntarget_connections = 5\nidle_after = \"-1s\"",
            ),
            "scale.idle_after",
        ),
    ];
    for (text, want) in cases {
        let e = agent.apply(&text).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(want), "{want}: {}", e.message());
    }
    // Scale outside [min, max] is refused; within, it sets the count.
    agent
        .apply(&spec(
            "x",
            port,
            "v1",
            "min = 1\nmax = 3\ntarget_connections = 50\nscale_down_delay = \"1h\"",
        ))
        .await
        .expect("apply");
    let mut client = agent.client().await;
    let e = client
        .scale(pb::ScaleRequest {
            name: "x".into(),
            replicas: 5,
            force: false,
            expected_revision: None,
        })
        .await
        .expect_err("outside [scale]");
    assert!(e.message().contains("replicas"), "{}", e.message());
    client
        .scale(pb::ScaleRequest {
            name: "x".into(),
            replicas: 3,
            force: false,
            expected_revision: None,
        })
        .await
        .expect("within [scale]");
    wait_desired(&agent, "x", "3 instances", |n| n == 3).await;
}

/// A service on a Unix listener scales out by its connections too (counted from the
/// kernel's Unix socket table: the accept queue and the connections bearing its name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_listener_scales_out_by_its_connections() {
    if skip_unless_root("a_unix_listener_scales_out_by_its_connections") {
        return;
    }
    let agent = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("od.sock");
    // The instances never accept: every connection waits in the queue, and counts.
    let text = format!(
        "name = \"unixod\"\ncommand = [{:?}, \"serve\"]\n[stop]\ngrace = \"5s\"\n[[sockets]]\nname = \"api\"\nlisten = \"unix:{}\"\n[scale]\nmin = 1\nmax = 4\ntarget_connections = 10\nscale_down_delay = \"1s\"\nidle_after = \"60s\"\n",
        testbin(),
        path.display()
    );
    agent.apply(&text).await.expect("apply");
    wait_desired(&agent, "unixod", "one instance", |d| d == 1).await;
    let held: Vec<std::os::unix::net::UnixStream> = (0..35)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).expect("connect"))
        .collect();
    let s = wait_desired(&agent, "unixod", "4 instances for 35 connections", |d| {
        d == 4
    })
    .await;
    let a = s.autoscale.expect("autoscale status");
    assert!(a.connections >= 35, "connections counted: {a:?}");
    let events = autoscaled(&agent, "unixod").await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("→ 4: 35 connections, target 10 per instance")),
        "{events:?}"
    );
    drop(held);
}
