//! Restart policy, backoff, agent restarts: the supervisor's behaviour with real processes.

use std::time::Duration;

use corral_e2e::{Agent, alive, eventually, kill9, pb, skip_unless_root, testbin};

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

fn millis_between(a: &prost_types::Timestamp, b: &prost_types::Timestamp) -> i64 {
    (b.seconds - a.seconds) * 1000 + i64::from(b.nanos - a.nanos) / 1_000_000
}

/// A crash loop's scheduled delays grow by doubling (minus at most 10 % jitter) and stop at
/// backoff_max; every end is `exited(3)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_delays_grow_and_are_capped() {
    if skip_unless_root("crash_loop_delays_grow_and_are_capped") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "crash",
            1,
            &["exit", "3"],
            "[restart]\npolicy = \"on-failure\"\nbackoff = \"50ms\"\nbackoff_max = \"400ms\"\n",
        ))
        .await
        .expect("apply");
    let mut delays: Vec<(u32, i64)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delays.len() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "six restarts not observed: {delays:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let Ok(s) = agent.get("crash").await else {
            continue;
        };
        let Some(i) = s.instances.first() else {
            continue;
        };
        if let (Some(exit), Some(next)) = (i.last_exit.as_ref(), i.next_start_at.as_ref())
            && i.state == pb::InstanceState::Backoff as i32
            && !delays.iter().any(|(r, _)| *r == i.restarts)
            && let Some(at) = exit.at.as_ref()
        {
            assert_eq!(exit.text, "exited(3)");
            delays.push((i.restarts, millis_between(at, next)));
        }
    }
    delays.sort();
    eprintln!("restart -> scheduled delay (ms): {delays:?}");
    for (restarts, ms) in &delays {
        // The delay before restart n is 50ms * 2^(n-1), capped at 400ms, minus up to 10 %.
        let full = (50i64 << (restarts - 1).min(10)).min(400);
        assert!(
            *ms <= full + 5 && *ms >= full * 9 / 10 - 5,
            "restart {restarts}: {ms} ms, expected {full} ms minus at most 10 %"
        );
    }
    assert!(
        delays.iter().any(|(_, ms)| *ms >= 350),
        "the cap was reached: {delays:?}"
    );
}

/// `kill -9` of an instance: it is replaced, and the old process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_is_replaced() {
    if skip_unless_root("killed_instance_is_replaced") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec("k", 2, &["serve"], "[restart]\nbackoff = \"0s\"\n"))
        .await
        .expect("apply");
    let before = agent.wait_running("k", 2).await;
    kill9(before[0].pid);
    let after = eventually("a replacement", Duration::from_secs(20), || async {
        let s = agent.get("k").await.ok()?;
        let i = s.instances.iter().find(|i| i.index == before[0].index)?;
        (i.restarts == 1 && i.state == pb::InstanceState::Running as i32 && i.pid > 0)
            .then(|| i.clone())
    })
    .await;
    assert_ne!(after.pid, before[0].pid);
    let other = agent.get("k").await.expect("get").instances[1].clone();
    assert_eq!(
        other.pid, before[1].pid,
        "the other instance was not touched"
    );
    assert_eq!(other.restarts, 0);
}

/// `restart.policy = never` keeps an ended instance down, with its end recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_never_keeps_it_down() {
    if skip_unless_root("policy_never_keeps_it_down") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "once",
            1,
            &["exit", "0", "50"],
            "[restart]\npolicy = \"never\"\n",
        ))
        .await
        .expect("apply");
    let i = eventually("the instance to exit", Duration::from_secs(20), || async {
        let s = agent.get("once").await.ok()?;
        let i = s.instances.first()?.clone();
        (i.state == pb::InstanceState::Exited as i32).then_some(i)
    })
    .await;
    assert_eq!(i.last_exit.expect("exit").text, "exited(0)");
    assert_eq!(i.restarts, 0);
}

/// A stop that is ignored ends `stop_timeout` after the grace period, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_stop_signal_is_a_stop_timeout() {
    if skip_unless_root("ignored_stop_signal_is_a_stop_timeout") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "stubborn",
            1,
            &["ignore-term"],
            "[stop]\ngrace = \"300ms\"\n[isolation]\nnamespaces = [\"mount\", \"uts\", \"ipc\"]\n",
        ))
        .await
        .expect("apply");
    let i = agent.wait_running("stubborn", 1).await.remove(0);
    agent.wait_printed(&i.id, "ready").await;
    // Without a PID namespace the init is a subreaper; the kill still reaches everything.
    agent
        .client()
        .await
        .scale(pb::ScaleRequest {
            name: "stubborn".into(),
            replicas: 0,
            ..Default::default()
        })
        .await
        .expect("scale to 0");
    eventually(
        "the instance to be removed",
        Duration::from_secs(20),
        || async {
            let s = agent.get("stubborn").await.ok()?;
            s.instances.is_empty().then_some(())
        },
    )
    .await;
    assert!(!alive(i.pid) && !alive(i.init_pid));
    assert!(agent.cgroup.pids("corral/stubborn").is_empty());
    let log = agent.log_text();
    assert!(
        log.contains("stop_timeout"),
        "the end was classified stop_timeout:\n{log}"
    );
}

async fn agent_restart(signal: i32) {
    let mut agent = Agent::start().await;
    agent
        .apply(&spec(
            "keep",
            2,
            &["serve"],
            "[resources]\nmemory = \"32MiB\"\n",
        ))
        .await
        .expect("apply");
    let before = agent.wait_running("keep", 2).await;
    let status_before = agent.get("keep").await.expect("get");
    let exit = agent.stop_with(signal);
    if signal == libc::SIGTERM {
        assert_eq!(exit.code(), Some(0), "SIGTERM: corrald exits 0");
    }
    for i in &before {
        assert!(alive(i.pid), "{} outlives the agent", i.id);
    }
    agent.launch().await;
    let after = agent.wait_running("keep", 2).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (a.pid, a.init_pid, a.restarts),
            (b.pid, b.init_pid, b.restarts),
            "{} adopted as it was",
            b.id
        );
        assert_eq!(a.started_at, b.started_at);
    }
    let mut live = agent.cgroup.pids("corral/keep");
    live.sort_unstable();
    let mut expected: Vec<i32> = after.iter().flat_map(|i| [i.init_pid, i.pid]).collect();
    expected.sort_unstable();
    assert_eq!(live, expected, "no duplicate, no orphan");
    let status_after = agent.get("keep").await.expect("get");
    assert_eq!(status_after.revision, status_before.revision);
    assert_eq!(
        status_after.spec, status_before.spec,
        "desired state intact"
    );
    // The new agent supervises them: a kill is seen and the instance replaced.
    kill9(after[0].pid);
    let replaced = eventually(
        "a replacement by the new agent",
        Duration::from_secs(20),
        || async {
            let s = agent.get("keep").await.ok()?;
            let i = s
                .instances
                .iter()
                .find(|i| i.index == after[0].index)?
                .clone();
            (i.restarts == after[0].restarts + 1
                && i.pid > 0
                && i.state == pb::InstanceState::Running as i32)
                .then_some(i)
        },
    )
    .await;
    assert_eq!(replaced.last_exit.expect("exit").text, "signaled(9)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_then_start() {
    if skip_unless_root("agent_sigterm_then_start") {
        return;
    }
    agent_restart(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_then_start() {
    if skip_unless_root("agent_sigkill_then_start") {
        return;
    }
    agent_restart(libc::SIGKILL).await;
}

/// A changed spec replaces the instances with the new revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_replaces_instances() {
    if skip_unless_root("update_replaces_instances") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "up",
            2,
            &["report"],
            "env = { GREETING = \"one\" }\n",
        ))
        .await
        .expect("apply");
    let before = agent.wait_running("up", 2).await;
    let r = agent
        .apply(&spec(
            "up",
            2,
            &["report"],
            "env = { GREETING = \"two\" }\n",
        ))
        .await
        .expect("apply");
    assert_eq!(r.outcome(), pb::ApplyOutcome::Updated);
    assert_eq!(r.revision, 2);
    assert!(r.replaces_instances);
    let after = eventually(
        "both instances at revision 2",
        Duration::from_secs(30),
        || async {
            let s = agent.get("up").await.ok()?;
            let ok = s.instances.len() == 2
                && s.instances.iter().all(|i| {
                    i.revision == 2 && i.state == pb::InstanceState::Running as i32 && i.pid > 0
                });
            ok.then_some(s.instances)
        },
    )
    .await;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(a.pid, b.pid);
        assert!(!alive(b.pid));
        assert_eq!(agent.reported(&a.id, "env.GREETING").await, "two");
    }
    // Re-applying the same spec changes nothing; replicas alone is a scale.
    let same = agent
        .apply(&spec(
            "up",
            2,
            &["report"],
            "env = { GREETING = \"two\" }\n",
        ))
        .await
        .expect("apply");
    assert_eq!(
        (same.outcome(), same.revision),
        (pb::ApplyOutcome::Unchanged, 2)
    );
    let scaled = agent
        .apply(&spec(
            "up",
            3,
            &["report"],
            "env = { GREETING = \"two\" }\n",
        ))
        .await
        .expect("apply");
    assert_eq!(
        (scaled.outcome(), scaled.revision, scaled.replaces_instances),
        (pb::ApplyOutcome::Scaled, 2, false)
    );
    agent.wait_running("up", 3).await;
    let still = agent.get("up").await.expect("get");
    for a in &after {
        assert!(
            still.instances.iter().any(|i| i.pid == a.pid),
            "scaling did not restart {}",
            a.id
        );
    }
}

/// `--services DIR` applies every spec at start, and again on SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_dir_applied_at_start_and_on_sighup() {
    if skip_unless_root("services_dir_applied_at_start_and_on_sighup") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a.toml"), spec("a", 1, &["serve"], "")).expect("write");
    std::fs::write(
        dir.path().join("broken.toml"),
        "name = \"b\"\ncommand = []\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
    let agent = Agent::start_with(Some(dir.path())).await;
    agent.wait_running("a", 1).await;
    assert!(
        agent.get("b").await.is_err(),
        "an invalid file is not applied"
    );
    std::fs::write(dir.path().join("c.toml"), spec("c", 2, &["serve"], "")).expect("write");
    // SAFETY: signalling the agent we started.
    unsafe { libc::kill(agent.pid().expect("pid"), libc::SIGHUP) };
    agent.wait_running("c", 2).await;
    let log = agent.log_text();
    assert!(
        log.contains("broken.toml") && log.contains("command"),
        "the bad file is reported:\n{log}"
    );
}

/// `corral signal` reaches the service process; bad signals and instances are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_reaches_the_service() {
    if skip_unless_root("signal_reaches_the_service") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "sig",
            1,
            &["serve-signals"],
            "[restart]\nbackoff = \"100ms\"\n",
        ))
        .await
        .expect("apply");
    let i = agent.wait_running("sig", 1).await.remove(0);
    // Its USR1 handler is in place once it says so.
    agent.reported("sig-0", "ready").await;
    let out = agent.cli(&["signal", "sig/0", "USR1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sent SIGUSR1") && stdout.contains(&i.pid.to_string()),
        "{stdout}"
    );
    let s = eventually(
        "exit 3 on SIGUSR1, then a restart",
        Duration::from_secs(20),
        || async {
            let s = agent.get("sig").await.ok()?;
            let i = s.instances.first()?.clone();
            (i.restarts == 1).then_some(i)
        },
    )
    .await;
    assert_eq!(s.last_exit.expect("end").text, "exited(3)");
    for (args, fragment) in [
        (&["signal", "sig-0", "SIGNOPE"][..], "not a signal"),
        (&["signal", "sig-9", "HUP"], "not found"),
        (&["signal", "nope-0", "HUP"], "not found"),
    ] {
        let out = agent.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
    }
}

/// SIGTERM while clients hold ten streams (Watch, health Watch and Logs, each following):
/// every stream ends with UNAVAILABLE — a Watch told the index right after the last event it
/// received — the agent exits 0 having ended every call itself (not cut at the grace), its
/// instances keep running, and a Watch from the index it was told carries on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_with_where_to_resume() {
    if skip_unless_root("sigterm_ends_open_streams_with_where_to_resume") {
        return;
    }
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut agent = Agent::start().await;
    agent
        .apply(&spec("streamed", 1, &["ticker", "50"], ""))
        .await
        .expect("apply");
    let pid = agent.wait_running("streamed", 1).await[0].pid;
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", agent.socket.display()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut c = pb::agent_client::AgentClient::new(ch.clone());
    let mut h = HealthClient::new(ch);
    let mut watches = Vec::new();
    for _ in 0..4 {
        let req = pb::WatchRequest {
            from_index: 1,
            follow: true,
            ..Default::default()
        };
        watches.push(c.watch(req).await.expect("watch").into_inner());
    }
    let mut healths = Vec::new();
    for service in ["", "streamed", "corral.v1.Agent"] {
        let req = HealthCheckRequest {
            service: service.into(),
        };
        healths.push(h.watch(req).await.expect("health watch").into_inner());
    }
    let mut logs = Vec::new();
    for _ in 0..3 {
        let req = pb::LogsRequest {
            service: "streamed".into(),
            follow: true,
            ..Default::default()
        };
        logs.push(c.logs(req).await.expect("logs").into_inner());
    }
    // Each stream delivers before the stop, so each is open for sure.
    let mut last = Vec::new();
    for w in &mut watches {
        let e = w.message().await.expect("event").expect("one");
        last.push(e.index);
    }
    for s in &mut healths {
        s.message().await.expect("health").expect("one");
    }
    for s in &mut logs {
        s.message().await.expect("log line").expect("one");
    }

    let exit = agent.stop_with(libc::SIGTERM);
    assert_eq!(exit.code(), Some(0));
    let log = agent.log_text();
    assert!(log.contains("API stopped: every call ended"), "{log}");
    assert!(alive(pid), "the instance outlives the agent");

    let mut resume = 0;
    for (w, last) in watches.iter_mut().zip(last) {
        let (later, end) = drain(w).await;
        let last = later.map_or(last, |e| e.index);
        assert_eq!(
            end,
            format!("agent shutting down; resume at index {}", last + 1)
        );
        resume = last + 1;
    }
    for s in healths.iter_mut() {
        let end = drain(s).await.1;
        assert!(end.starts_with("agent shutting down"), "{end}");
    }
    for s in logs.iter_mut() {
        let end = drain(s).await.1;
        assert!(end.starts_with("agent shutting down"), "{end}");
    }

    // Back (it adopts the instance: new events), a Watch from that index starts there.
    agent.launch().await;
    agent.wait_running("streamed", 1).await;
    let mut w = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            from_index: resume,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = w.message().await.expect("event").expect("one");
    assert_eq!(first.index, resume);
}

/// Read a stream to its end: the last item read, and the UNAVAILABLE message it ended with.
async fn drain<T>(s: &mut tonic::Streaming<T>) -> (Option<T>, String) {
    let mut last = None;
    loop {
        match s.message().await {
            Ok(Some(item)) => last = Some(item),
            Ok(None) => panic!("a stream ended without a status"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                return (last, status.message().to_string());
            }
        }
    }
}

/// "Max open files" of `pid`: (soft, hard).
fn open_file_limit(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

/// The agent raises its own soft open-file limit to the hard one (it holds descriptors for
/// every instance); a service gets the soft limit the agent was started with back, or the
/// one its spec sets with `resources.nofile`, and so does its init's replacement after a
/// crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_raises_its_open_file_limit_and_services_start_with_theirs() {
    if skip_unless_root("the_agent_raises_its_open_file_limit_and_services_start_with_theirs") {
        return;
    }
    let mut agent = Agent::start_with_nofile(1024, 8192).await;
    let pid = agent.pid().expect("agent pid");
    assert_eq!(open_file_limit(pid), (8192, 8192), "the agent's own");
    agent
        .apply(&spec(
            "inherits",
            1,
            &["serve"],
            "[restart]\nbackoff = \"0s\"\n",
        ))
        .await
        .expect("apply");
    agent
        .apply(&spec("sets", 1, &["serve"], "[resources]\nnofile = 4096\n"))
        .await
        .expect("apply");
    let inherits = agent.wait_running("inherits", 1).await.remove(0);
    let sets = agent.wait_running("sets", 1).await.remove(0);
    assert_eq!(
        open_file_limit(inherits.pid),
        (1024, 8192),
        "no resources.nofile"
    );
    assert_eq!(
        open_file_limit(sets.pid),
        (4096, 4096),
        "resources.nofile = 4096"
    );
    // Status spells out the default a service starts with, not the agent's raised limit.
    let status = agent.get("inherits").await.expect("get");
    let spelled = status.spec.and_then(|s| s.resources).and_then(|r| r.nofile);
    assert_eq!(spelled, Some(1024), "the default nofile in status");
    // A replacement started after an agent restart gets the same.
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    kill9(inherits.pid);
    let replaced = eventually("a replacement", Duration::from_secs(20), || async {
        let s = agent.get("inherits").await.ok()?;
        let i = s.instances.first()?;
        (i.pid > 0 && i.pid != inherits.pid && i.state == pb::InstanceState::Running as i32)
            .then(|| i.clone())
    })
    .await;
    // Once it has executed: until then it is the init's copy, its limits not set yet.
    let again = agent.wait_running("inherits", 1).await.remove(0);
    assert_eq!(again.pid, replaced.pid);
    assert_eq!(open_file_limit(again.pid), (1024, 8192), "the replacement");
}

/// The mount namespaces the agent holds (fds to `mnt:[...]`): one per live instance with a
/// mount namespace, and an ended instance's released once it is replaced, so that restarts
/// neither leak them nor keep dead instances' mounts.
fn held_mount_namespaces(agent_pid: i32) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{agent_pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| t.starts_with("mnt:["))
        .collect()
}

fn mount_namespace(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map(|t| t.display().to_string())
        .unwrap_or_default()
}

/// An instance's mount namespace outlives its init only until its end is reported: the agent
/// holds it so that its teardown is off the restart's path, then lets it go. Across many
/// restarts and a delete, the agent holds exactly the live instances' namespaces. (A freed
/// namespace's number may be given to a new one, so numbers alone cannot tell an ended
/// instance's namespace from its replacement's; a held one is never freed, so never reused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_instances_mount_namespaces_are_released() {
    if skip_unless_root("ended_instances_mount_namespaces_are_released") {
        return;
    }
    let agent = Agent::start().await;
    let agent_pid = agent.pid().expect("the agent runs");
    agent
        .apply(&spec("ns", 2, &["serve"], "[restart]\nbackoff = \"0s\"\n"))
        .await
        .expect("apply");
    let live = |instances: &[pb::InstanceStatus]| -> std::collections::BTreeSet<String> {
        instances.iter().map(|i| mount_namespace(i.pid)).collect()
    };
    let mut running = agent.wait_running("ns", 2).await;
    let first = live(&running);
    assert_eq!(
        first.len(),
        2,
        "each instance has a mount namespace of its own"
    );
    assert!(
        !first.contains(&mount_namespace(agent_pid)),
        "not the agent's own"
    );
    for round in 1..=5u32 {
        let victim = running[0].clone();
        kill9(victim.pid);
        running = eventually("a replacement", Duration::from_secs(20), || async {
            let s = agent.get("ns").await.ok()?;
            let ok = s.instances.len() == 2
                && s.instances.iter().all(|i| {
                    i.state == pb::InstanceState::Running as i32
                        && i.pid > 0
                        && (i.index != victim.index || i.restarts == round)
                });
            ok.then_some(s.instances)
        })
        .await;
    }
    let now = live(&running);
    eventually(
        "the agent holds the live instances' namespaces only",
        Duration::from_secs(10),
        || async { (held_mount_namespaces(agent_pid) == now).then_some(()) },
    )
    .await;
    agent.delete("ns").await.expect("delete");
    eventually(
        "nothing held after the delete",
        Duration::from_secs(10),
        || async { held_mount_namespaces(agent_pid).is_empty().then_some(()) },
    )
    .await;
}
