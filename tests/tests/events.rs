//! The node event log over the API: replay after a disconnection without gaps or duplicates,
//! indexes that survive an agent restart, trimmed indexes refused clearly; usage figures that
//! match the cgroup's own files.

use std::time::Duration;

use corral_e2e::{Agent, eventually, pb, skip_unless_root, testbin};

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

async fn watch(agent: &Agent, from_index: u64, follow: bool) -> tonic::Streaming<pb::Event> {
    agent
        .client()
        .await
        .watch(pb::WatchRequest {
            from_index,
            follow,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// `n` events: applies of a service without instances, each a new revision.
async fn make_events(agent: &Agent, from: usize, n: usize) {
    for i in from..from + n {
        agent
            .apply(&spec(
                "ev",
                0,
                &["serve"],
                &format!("env = {{ N = \"{i}\" }}"),
            ))
            .await
            .expect("apply");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_reconnects_gets_exactly_what_it_missed() {
    if skip_unless_root("a_watcher_that_reconnects_gets_exactly_what_it_missed") {
        return;
    }
    let mut agent = Agent::start().await;
    make_events(&agent, 0, 5).await;
    let mut w = watch(&agent, 0, true).await;
    let mut last = 0;
    while last < 5 {
        let e = w.message().await.expect("stream").expect("event");
        assert_eq!(e.index, last + 1, "in order, no gap");
        last = e.index;
    }
    drop(w); // disconnect
    make_events(&agent, 5, 1000).await;
    let mut w = watch(&agent, last + 1, true).await;
    for expected in last + 1..=last + 1000 {
        let e = w.message().await.expect("stream").expect("event");
        assert_eq!(e.index, expected, "exactly the missed events, in order");
        assert_eq!(e.r#type(), pb::EventType::Applied);
    }
    last += 1000;
    // Then live ones.
    make_events(&agent, 1005, 1).await;
    let e = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("live event in time")
        .expect("stream")
        .expect("event");
    assert_eq!(e.index, last + 1);
    last += 1;
    drop(w);

    // Indexes survive an agent restart.
    agent.stop_with(libc::SIGTERM);
    agent.launch().await;
    make_events(&agent, 2000, 1).await;
    let mut w = watch(&agent, last, false).await;
    let mut got = Vec::new();
    while let Some(e) = w.message().await.expect("stream") {
        got.push(e.index);
    }
    assert_eq!(
        got,
        vec![last, last + 1],
        "no index reused or skipped across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_filters_and_bad_indexes() {
    if skip_unless_root("watch_filters_and_bad_indexes") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec("a", 1, &["serve"], ""))
        .await
        .expect("apply");
    agent
        .apply(&spec("b", 1, &["serve"], ""))
        .await
        .expect("apply");
    agent.wait_running("a", 1).await;
    agent.wait_running("b", 1).await;
    let mut w = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            service: "a".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut types = Vec::new();
    while let Some(e) = w.message().await.expect("stream") {
        assert_eq!(e.service, "a");
        types.push(e.r#type());
    }
    assert!(
        types.contains(&pb::EventType::Applied) && types.contains(&pb::EventType::InstanceStarted),
        "{types:?}"
    );
    let e = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            from_index: 1_000_000,
            follow: true,
            ..Default::default()
        })
        .await
        .expect_err("beyond the end");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    let e = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            service: "../x".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

fn cgroup_cpu_ns(agent: &Agent, rel: &str) -> u64 {
    let cg = &agent.cgroup;
    match cg.version {
        corral_e2e::cgroup::Version::V1 => cg
            .read("cpuacct", rel, "cpuacct.usage")
            .parse()
            .unwrap_or(0),
        corral_e2e::cgroup::Version::V2 => {
            cg.read("cpu", rel, "cpu.stat")
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1000
        }
    }
}

fn cgroup_memory(agent: &Agent, rel: &str) -> u64 {
    let cg = &agent.cgroup;
    match cg.version {
        corral_e2e::cgroup::Version::V1 => cg
            .read("memory", rel, "memory.usage_in_bytes")
            .parse()
            .unwrap_or(0),
        corral_e2e::cgroup::Version::V2 => cg
            .read("memory", rel, "memory.current")
            .parse()
            .unwrap_or(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_matches_the_cgroup_and_moves_with_the_load() {
    if skip_unless_root("usage_matches_the_cgroup_and_moves_with_the_load") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec("cpu", 1, &["hog-cpu"], "[resources]\ncpu = 0.5\n"))
        .await
        .expect("apply");
    agent
        .apply(&spec("mem", 1, &["hog-mem", "48"], ""))
        .await
        .expect("apply");
    agent.wait_running("cpu", 1).await;
    let mem = agent.wait_running("mem", 1).await.remove(0);
    agent.reported(&mem.id, "allocated_mib").await;

    let usage = |s: &pb::ServiceStatus| s.instances[0].usage.expect("usage");
    let a = usage(&agent.get("cpu").await.expect("get"));
    let file_a = cgroup_cpu_ns(&agent, "corral/cpu/cpu-0");
    // CPU time moves with the hog.
    let (b, file_b) = eventually("0.1 s more CPU time", Duration::from_secs(30), || async {
        let b = usage(&agent.get("cpu").await.ok()?);
        let file_b = cgroup_cpu_ns(&agent, "corral/cpu/cpu-0");
        (b.cpu_usage_ns > a.cpu_usage_ns + 100_000_000).then_some((b, file_b))
    })
    .await;
    // Read a moment apart from the file: equal within what the hog burns meanwhile.
    for (api, file) in [(a.cpu_usage_ns, file_a), (b.cpu_usage_ns, file_b)] {
        assert!(
            api.abs_diff(file) < 100_000_000,
            "api {api} vs cgroup {file}"
        );
    }
    assert!(b.pids >= 2, "init and the service");

    let m = usage(&agent.get("mem").await.expect("get"));
    let file = cgroup_memory(&agent, &format!("corral/mem/{}", mem.id));
    assert!(
        m.memory_bytes >= 48 << 20,
        "the 48 MiB the hog holds: {}",
        m.memory_bytes
    );
    assert!(
        m.memory_bytes.abs_diff(file) < 4 << 20,
        "api {} vs cgroup {file}",
        m.memory_bytes
    );
    assert!(m.memory_peak_bytes >= m.memory_bytes);
    let idle = usage(&agent.get("cpu").await.expect("get"));
    assert_eq!(idle.oom_kills, 0);
    // And List serves the same figures (at most a second old).
    let list = agent
        .client()
        .await
        .list(pb::ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    let listed = list
        .services
        .iter()
        .find(|s| s.name == "mem")
        .expect("mem")
        .instances[0]
        .usage
        .expect("usage");
    assert!(listed.memory_bytes >= 48 << 20);
    eventually("node figures", Duration::from_secs(5), || async {
        let n = agent
            .client()
            .await
            .node(pb::NodeRequest {})
            .await
            .ok()?
            .into_inner();
        (n.instances == 2
            && n.services == 2
            && n.memory_total_bytes > 0
            && !n.namespaces.is_empty())
        .then_some(())
    })
    .await;
}
