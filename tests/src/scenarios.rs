//! End-to-end scenarios, as library functions so that the same code runs as `cargo test`
//! on the host and, through the `corral-e2e` runner binary, inside a cgroup v2 VM.
//! Each panics (assert) on failure.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::cgroup::Version;
use crate::{Agent, alive, eventually, kill9, ns_of, pb, testbin};

/// Scenarios that prove the cgroup and namespace work; these also run in the v2 VM.
pub const KERNEL: &[&str] = &[
    "limits_and_isolation",
    "cpu_hog_is_throttled",
    "instances_share_their_services_cpu_cgroup",
    "memory_hog_is_oom_killed",
    "kill9_is_signaled_not_oom",
    "fork_bomb_stays_within_pids",
    "delete_leaves_nothing",
    "private_network_has_only_loopback",
    "init_reaps_orphans",
    "rolling_restart_keeps_serving",
    "start_cpu_caps_a_rollouts_new_instance",
    "cpu_weight_follows_the_instances",
    "capabilities_as_configured",
    "readonly_root_keeps_workdir_and_tmp_writable",
    "nofile_limit_applies",
    "escape_is_refused",
    "escape_is_refused_readonly_root",
    "userns_root_is_not_host_root",
    "a_second_agent_on_the_same_cgroup_tree_is_refused",
    "image_is_the_instance_root",
    "image_escape_is_refused",
    "image_escape_is_refused_userns",
    "image_readonly_root",
    "init_is_static_and_small",
    "inits_come_from_the_zygote",
];

/// Run one scenario by name; false when there is no such scenario.
pub async fn run(name: &str) -> bool {
    match name {
        "limits_and_isolation" => limits_and_isolation().await,
        "cpu_hog_is_throttled" => cpu_hog_is_throttled().await,
        "instances_share_their_services_cpu_cgroup" => {
            instances_share_their_services_cpu_cgroup().await
        }
        "memory_hog_is_oom_killed" => memory_hog_is_oom_killed().await,
        "kill9_is_signaled_not_oom" => kill9_is_signaled_not_oom().await,
        "fork_bomb_stays_within_pids" => fork_bomb_stays_within_pids().await,
        "delete_leaves_nothing" => delete_leaves_nothing().await,
        "private_network_has_only_loopback" => private_network_has_only_loopback().await,
        "init_reaps_orphans" => init_reaps_orphans().await,
        "rolling_restart_keeps_serving" => rolling_restart_keeps_serving().await,
        "start_cpu_caps_a_rollouts_new_instance" => start_cpu_caps_a_rollouts_new_instance().await,
        "cpu_weight_follows_the_instances" => cpu_weight_follows_the_instances().await,
        "capabilities_as_configured" => capabilities_as_configured().await,
        "readonly_root_keeps_workdir_and_tmp_writable" => {
            readonly_root_keeps_workdir_and_tmp_writable().await
        }
        "nofile_limit_applies" => nofile_limit_applies().await,
        "escape_is_refused" => escape_is_refused(false).await,
        "escape_is_refused_readonly_root" => escape_is_refused(true).await,
        "userns_root_is_not_host_root" => userns_root_is_not_host_root().await,
        "a_second_agent_on_the_same_cgroup_tree_is_refused" => {
            a_second_agent_on_the_same_cgroup_tree_is_refused().await
        }
        "image_is_the_instance_root" => image_is_the_instance_root().await,
        "image_escape_is_refused" => image_escape_is_refused(false).await,
        "image_escape_is_refused_userns" => image_escape_is_refused(true).await,
        "image_readonly_root" => image_readonly_root().await,
        "init_is_static_and_small" => init_is_static_and_small().await,
        "inits_come_from_the_zygote" => inits_come_from_the_zygote().await,
        _ => return false,
    }
    true
}

fn spec(name: &str, replicas: u32, command: &[&str], extra: &str) -> String {
    let cmd: Vec<String> = std::iter::once(testbin())
        .chain(command.iter().map(|s| s.to_string()))
        .map(|s| format!("{s:?}"))
        .collect();
    format!(
        "name = \"{name}\"\ncommand = [{}]\nreplicas = {replicas}\n{extra}\n",
        cmd.join(", ")
    )
}

fn instance_rel(service: &str, instance: &str) -> String {
    format!("corral/{service}/{instance}")
}

/// Limits written to the kernel, namespaces, the instance's own cgroup as the root of its
/// cgroup view, user, hostname, private /tmp, env.
pub async fn limits_and_isolation() {
    let agent = Agent::start().await;
    let toml = spec(
        "lim",
        3,
        &["report"],
        r#"user = "65534:65534"
[resources]
cpu = 0.25
memory = "64MiB"
pids = 32
[isolation]
hostname = "lim-{index}"
"#,
    );
    agent.apply(&toml).await.expect("apply");
    let instances = agent.wait_running("lim", 3).await;
    let agent_pid = agent.pid().expect("agent pid");
    let cg = &agent.cgroup;
    let mut seen_pid_ns = BTreeSet::new();
    for inst in &instances {
        let rel = instance_rel("lim", &inst.id);
        match cg.version {
            Version::V1 => {
                assert_eq!(cg.read("cpu", &rel, "cpu.cfs_quota_us"), "25000", "{rel}");
                assert_eq!(cg.read("cpu", &rel, "cpu.cfs_period_us"), "100000", "{rel}");
                assert_eq!(
                    cg.read("memory", &rel, "memory.limit_in_bytes"),
                    "67108864",
                    "{rel}"
                );
                let memsw = cg.read("memory", &rel, "memory.memsw.limit_in_bytes");
                assert!(memsw.is_empty() || memsw == "67108864", "memsw {memsw}");
                assert_eq!(cg.read("pids", &rel, "pids.max"), "32", "{rel}");
            }
            Version::V2 => {
                assert_eq!(cg.read("cpu", &rel, "cpu.max"), "25000 100000", "{rel}");
                assert_eq!(cg.read("memory", &rel, "memory.max"), "67108864", "{rel}");
                assert_eq!(cg.read("pids", &rel, "pids.max"), "32", "{rel}");
            }
        }
        let pid = inst.pid;
        assert!(
            cg.pids(&rel).contains(&pid),
            "service pid {pid} is in {rel}"
        );
        own_cgroup_view(&agent, "lim", &inst.id, pid, inst.init_pid);
        sys_all_read_only(inst.init_pid);
        for ns in ["pid", "mnt", "uts", "ipc"] {
            let mine = ns_of(pid, ns);
            assert!(!mine.is_empty(), "{ns} of {pid}");
            assert_ne!(
                mine,
                ns_of(agent_pid, ns),
                "{} has its own {ns} namespace",
                inst.id
            );
        }
        seen_pid_ns.insert(ns_of(pid, "pid"));
        assert_eq!(
            ns_of(pid, "net"),
            ns_of(agent_pid, "net"),
            "no net namespace unless asked"
        );

        let inner_pid: u32 = agent.reported(&inst.id, "pid").await.parse().expect("pid");
        assert!(inner_pid <= 3, "{} sees itself as pid {inner_pid}", inst.id);
        let visible: u32 = agent
            .reported(&inst.id, "visible_pids")
            .await
            .parse()
            .expect("count");
        assert!(visible <= 3, "{} sees {visible} processes", inst.id);
        assert_eq!(agent.reported(&inst.id, "uid").await, "65534");
        assert_eq!(agent.reported(&inst.id, "gid").await, "65534");
        assert_eq!(
            agent.reported(&inst.id, "groups").await,
            "",
            "supplementary groups cleared"
        );
        assert_eq!(agent.reported(&inst.id, "no_new_privs").await, "1");
        assert_eq!(
            agent.reported(&inst.id, "hostname").await,
            format!("lim-{}", inst.index)
        );
        assert_eq!(agent.reported(&inst.id, "tmp_fs").await, "tmpfs");
        assert_eq!(agent.reported(&inst.id, "tmp_entries").await, "0");
        assert_eq!(
            agent.reported(&inst.id, "open_fds").await,
            "3",
            "only stdin/stdout/stderr are open"
        );
        assert_eq!(
            agent.reported(&inst.id, "env.CORRAL_INSTANCE").await,
            inst.id
        );
        assert_eq!(agent.reported(&inst.id, "env.CORRAL_SERVICE").await, "lim");
        assert_eq!(
            agent.reported(&inst.id, "env.CORRAL_INDEX").await,
            inst.index.to_string()
        );
    }
    assert_eq!(
        seen_pid_ns.len(),
        3,
        "each instance has its own pid namespace"
    );
}

/// Cumulative CPU time of a cgroup in seconds, from the kernel's own accounting.
fn cpu_seconds(agent: &Agent, rel: &str) -> f64 {
    let cg = &agent.cgroup;
    match cg.version {
        Version::V1 => {
            cg.read("cpuacct", rel, "cpuacct.usage")
                .parse::<f64>()
                .unwrap_or(0.0)
                / 1e9
        }
        Version::V2 => {
            let stat = cg.read("cpu", rel, "cpu.stat");
            stat.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1e6
        }
    }
}

/// A busy loop at cpu = 0.25 gets at most ~0.3 CPU-seconds per wall second.
pub async fn cpu_hog_is_throttled() {
    let agent = Agent::start().await;
    agent
        .apply(&spec("hog", 1, &["hog-cpu"], "[resources]\ncpu = 0.25\n"))
        .await
        .expect("apply");
    let inst = agent.wait_running("hog", 1).await.remove(0);
    let rel = instance_rel("hog", &inst.id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c0, t0) = (cpu_seconds(&agent, &rel), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (c1, t1) = (cpu_seconds(&agent, &rel), std::time::Instant::now());
    let rate = (c1 - c0) / (t1 - t0).as_secs_f64();
    eprintln!("cpu rate at cpu = 0.25: {rate:.3}");
    assert!(rate <= 0.30, "CPU rate {rate:.3} exceeds the 0.25 quota");
    assert!(rate >= 0.05, "the hog did run ({rate:.3})");
    // The agent reports the same counter.
    let s = agent.get("hog").await.expect("get");
    let usage = s.instances[0].usage.expect("usage");
    assert!(
        usage.cpu_usage_ns as f64 / 1e9 >= c1 - 0.5,
        "reported cpu {} vs {c1}",
        usage.cpu_usage_ns
    );
}

/// Whether process `pid` of `service` is scheduled in the service's cpu cgroup, as an
/// instance without a CPU quota is by default (`--cpu-cgroup per-service`). v1: the pid is in
/// the service's cgroup of the cpu hierarchy. v2: the service does not hand the cpu
/// controller to its instances, so the service is their cpu cgroup.
fn in_service_cpu(agent: &Agent, service: &str, pid: i32) -> bool {
    let cg = &agent.cgroup;
    let svc = format!("corral/{service}");
    match cg.version {
        Version::V1 => !cg.missing(&svc, pid).contains(&"cpu"),
        Version::V2 => {
            let on = cg.read("cpu", &svc, "cgroup.subtree_control");
            assert!(on.contains("memory"), "{svc} hands memory on: {on:?}");
            !on.split_whitespace().any(|c| c == "cpu")
        }
    }
}

/// Instances with no CPU quota are scheduled in their service's cpu cgroup (the default),
/// their memory and pids cgroups their own, and each one's CPU time is still its own: the
/// usages reported for two busy instances add up to (not twice) the service's.
pub async fn instances_share_their_services_cpu_cgroup() {
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "share",
            2,
            &["hog-cpu"],
            "[resources]\nmemory = \"64MiB\"\n",
        ))
        .await
        .expect("apply");
    let running = agent.wait_running("share", 2).await;
    for i in &running {
        assert!(in_service_cpu(&agent, "share", i.pid), "{}: {i:?}", i.id);
        let own = agent.cgroup.missing(&instance_rel("share", &i.id), i.pid);
        assert!(
            !own.contains(&"memory") && !own.contains(&"pids") && !own.contains(&"unified"),
            "{}: its memory and pids cgroups are its own, not in {own:?}",
            i.id
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Reported first (readings are cached up to 1 s), the service's total after.
    let s = agent.get("share").await.expect("get");
    let used: Vec<f64> = s
        .instances
        .iter()
        .map(|i| i.usage.map_or(0, |u| u.cpu_usage_ns) as f64 / 1e9)
        .collect();
    let total = cpu_seconds(&agent, "corral/share");
    let sum: f64 = used.iter().sum();
    eprintln!("share: reported {used:?} (sum {sum:.3}), the service's cgroup {total:.3}");
    assert_eq!(used.len(), 2, "{s:?}");
    assert!(total > 0.5, "the hogs ran: {total:.3} s");
    for u in &used {
        assert!(
            *u >= 0.15 * total,
            "each busy instance counts its own: {used:?} of {total:.3}"
        );
    }
    assert!(
        sum <= total * 1.02 + 0.05,
        "each counts its own, not the service's: {used:?} of {total:.3}"
    );
    agent.delete("share").await.expect("delete");
}

fn last_exit(s: &pb::ServiceStatus, index: u32) -> Option<pb::ExitInfo> {
    s.instances
        .iter()
        .find(|i| i.index == index)
        .and_then(|i| i.last_exit.clone())
}

/// `GET /metrics` from an agent's `--metrics` address, in the Prometheus text format.
async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.ok()?;
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.ok()?;
    let resp = String::from_utf8(resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the one series of `text` whose line starts with `series` (name and the
/// first labels).
fn series_value(text: &str, series: &str) -> Option<f64> {
    let mut found = text
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok());
    let v = found.next()?;
    found.next().is_none().then_some(v)
}

/// A memory hog ends `oom_killed`, read from the cgroup's counters, and is restarted; its
/// `/metrics` series say the same (the limit, the usage, an OOM kill in its current run),
/// as its status does, read from the held stat files (and, on v2, `memory.pressure`).
pub async fn memory_hog_is_oom_killed() {
    let addr = format!("127.0.0.1:{}", crate::free_port());
    let agent = Agent::start_full_args("info,corral_agent=debug", &["--metrics", &addr]).await;
    agent
        .apply(&spec(
            "oom",
            1,
            &["hog-mem", "256"],
            "[resources]\nmemory = \"64MiB\"\n[restart]\nbackoff = \"100ms\"\nbackoff_max = \"1s\"\n",
        ))
        .await
        .expect("apply");
    let s = eventually(
        "an oom kill and a restart",
        Duration::from_secs(60),
        || async {
            let s = agent.get("oom").await.ok()?;
            let i = &s.instances[0];
            (i.restarts >= 1 && i.last_exit.is_some()).then_some(s)
        },
    )
    .await;
    let exit = last_exit(&s, 0).expect("last exit");
    assert_eq!(exit.class, pb::ExitClass::OomKilled as i32, "{exit:?}");
    assert_eq!(exit.text, "oom_killed");

    // Each run is OOM-killed again: a scrape sees a kill of the current run's cgroup.
    let series = |name: &str| format!("{name}{{service=\"oom\",instance=\"oom-0\",");
    let text = eventually(
        "a scrape with an oom kill",
        Duration::from_secs(60),
        || async {
            let t = scrape(&addr).await?;
            let kills = series_value(&t, &series("corral_instance_oom_kills_total"))?;
            (kills >= 1.0).then_some(t)
        },
    )
    .await;
    assert_eq!(
        series_value(&text, &series("corral_instance_memory_limit_bytes")),
        Some(64.0 * 1024.0 * 1024.0),
        "{text}"
    );
    assert!(
        series_value(&text, &series("corral_instance_cpu_seconds_total")).is_some(),
        "{text}"
    );
    // On v2 with PSI, the pressure of the instance's cgroup, read twice through the held
    // descriptor.
    if crate::cgroup::version() == Version::V2
        && std::path::Path::new("/proc/pressure/memory").exists()
    {
        for _ in 0..2 {
            // Between runs (backing off) it has no usage.
            let usage = eventually("a running hog's usage", Duration::from_secs(30), || async {
                agent.get("oom").await.ok()?.instances.first()?.usage
            })
            .await;
            assert!(usage.memory_pressure.is_some(), "{usage:?}");
        }
    }
    agent.delete("oom").await.expect("delete");
    let text = eventually(
        "no series of a deleted service",
        Duration::from_secs(30),
        || async {
            let t = scrape(&addr).await?;
            (!t.contains("service=\"oom\"")).then_some(t)
        },
    )
    .await;
    assert!(text.contains("process_open_fds "), "{text}");
}

/// `kill -9` from outside is `signaled(9)`, never `oom_killed`; a replacement follows
/// within the backoff the agent computed.
pub async fn kill9_is_signaled_not_oom() {
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "k9",
            1,
            &["serve"],
            "[resources]\nmemory = \"64MiB\"\n[restart]\nbackoff = \"200ms\"\n",
        ))
        .await
        .expect("apply");
    let first = agent.wait_running("k9", 1).await.remove(0);
    kill9(first.pid);
    let s = eventually(
        "the kill to be reported",
        Duration::from_secs(20),
        || async {
            let s = agent.get("k9").await.ok()?;
            (s.instances[0].restarts >= 1).then_some(s)
        },
    )
    .await;
    let i = &s.instances[0];
    let exit = i.last_exit.clone().expect("last exit");
    assert_eq!(exit.class, pb::ExitClass::Signaled as i32, "{exit:?}");
    assert_eq!(exit.signal, 9);
    assert_eq!(exit.text, "signaled(9)");
    // The delay the agent computed (its log), not the difference of two wall-clock stamps
    // taken at different moments (the exit's, and the report's conversion of the restart
    // time), which on a slow machine differs from it by the time between them.
    let log = agent.log_text();
    let delay_ms: u64 = log
        .lines()
        .filter(|l| l.contains("restart scheduled") && l.contains("instance=k9-0"))
        .find_map(|l| {
            l.split("delay_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("the restart scheduled in the agent's log");
    assert!(
        delay_ms <= 200,
        "scheduled {delay_ms} ms after the exit, backoff is 200 ms"
    );
    if let (Some(at), Some(next)) = (exit.at, i.next_start_at) {
        assert!(
            (next.seconds, next.nanos) >= (at.seconds, at.nanos),
            "the restart is after the exit"
        );
    }
    let again = agent.wait_running("k9", 1).await.remove(0);
    assert_ne!(again.pid, first.pid);
    assert!(!alive(first.pid));
}

/// A fork bomb is held at `pids`; the host can still fork. 500 attempts against a limit of
/// 32 prove it as well as more would; under the v2 VM's emulation each refused fork is slow,
/// so more would only bet on how long they take.
pub async fn fork_bomb_stays_within_pids() {
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "bomb",
            1,
            &["fork-bomb", "500"],
            "[resources]\npids = 32\n",
        ))
        .await
        .expect("apply");
    let inst = agent.wait_running("bomb", 1).await.remove(0);
    let forked: u32 = agent
        .reported(&inst.id, "forked")
        .await
        .parse()
        .expect("count");
    let failed: u32 = agent
        .reported(&inst.id, "fork_failed")
        .await
        .parse()
        .expect("count");
    assert!(
        forked <= 30,
        "forked {forked} with pids = 32 (init and the service count too)"
    );
    assert!(failed > 0, "forks were refused");
    let rel = instance_rel("bomb", &inst.id);
    let current: u32 = agent
        .cgroup
        .read("pids", &rel, "pids.current")
        .parse()
        .expect("pids.current");
    assert!(current <= 32, "pids.current {current}");
    let status = std::process::Command::new(testbin())
        .args(["exit", "0"])
        .status()
        .expect("host fork");
    assert!(status.success(), "the host is unaffected");
}

/// `delete` leaves no process, no cgroup directory and no instance files behind.
pub async fn delete_leaves_nothing() {
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "gone",
            2,
            &["serve"],
            "[resources]\nmemory = \"32MiB\"\npids = 16\n",
        ))
        .await
        .expect("apply");
    let instances = agent.wait_running("gone", 2).await;
    let pids: Vec<i32> = instances.iter().flat_map(|i| [i.pid, i.init_pid]).collect();
    let reply = agent.delete("gone").await.expect("delete");
    assert_eq!(reply.stopped_instances, 2);
    for p in pids {
        assert!(!alive(p), "pid {p} still alive after delete");
    }
    assert!(
        !agent.cgroup.exists("corral/gone"),
        "service cgroup removed"
    );
    for i in &instances {
        assert!(!agent.state_dir.join("logs").join(&i.id).exists());
        assert!(!agent.state_dir.join("run").join(&i.id).exists());
    }
    let err = agent.get("gone").await.expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// `namespaces` with "net": a private network with only `lo`, and `lo` is up.
pub async fn private_network_has_only_loopback() {
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "net",
            1,
            &["report"],
            "[isolation]\nnamespaces = [\"pid\", \"mount\", \"uts\", \"ipc\", \"net\"]\n",
        ))
        .await
        .expect("apply");
    let inst = agent.wait_running("net", 1).await.remove(0);
    assert_ne!(
        ns_of(inst.pid, "net"),
        ns_of(agent.pid().expect("pid"), "net")
    );
    // /sys/class/net shows the host's interfaces unless sysfs is remounted, so ask the
    // kernel through /proc/PID/net/dev, which is per network namespace.
    let dev = std::fs::read_to_string(format!("/proc/{}/net/dev", inst.pid)).expect("net/dev");
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    assert_eq!(ifaces, vec!["lo"], "only loopback: {dev}");
    assert_eq!(
        agent.reported(&inst.id, "loopback_ok").await,
        "1",
        "lo is up in the instance"
    );
}

/// Processes orphaned inside an instance are reaped by its init: no zombie is left.
pub async fn init_reaps_orphans() {
    let agent = Agent::start().await;
    agent
        .apply(&spec("orph", 1, &["orphans", "5", "100"], ""))
        .await
        .expect("apply");
    let inst = agent.wait_running("orph", 1).await.remove(0);
    assert_eq!(agent.reported(&inst.id, "orphaned").await, "5");
    let rel = instance_rel("orph", &inst.id);
    eventually("orphans reaped", Duration::from_secs(10), || async {
        let pids = agent.cgroup.pids(&rel);
        let zombies = pids
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| {
                        s.rfind(')')
                            .and_then(|i| s[i + 1..].split_whitespace().next())
                            == Some("Z")
                    })
                    .unwrap_or(false)
            })
            .count();
        (pids.len() == 2 && zombies == 0).then_some(())
    })
    .await;
}

/// A rolling restart of 2 instances on an agent-owned socket under load, then the agent
/// killed and started again: not one request fails, the new agent takes the same listening
/// socket back from the instances, and they keep their PIDs.
pub async fn rolling_restart_keeps_serving() {
    use crate::load::Load;
    let port = crate::free_port();
    let mut agent = Agent::start().await;
    let extra = served(port, "10s", "healthy_deadline = \"20s\"\n");
    agent
        .apply(&spec("roll", 2, &["http-listen", "100"], &extra))
        .await
        .expect("apply");
    eventually("2 healthy instances", Duration::from_secs(30), || {
        two_healthy(&agent, "roll")
    })
    .await;
    let load = Load::start(port, 2, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = agent.restart("roll").await;
    let done = agent.rollout_end(&id, Duration::from_secs(60)).await;
    assert_eq!(done.state(), pb::RolloutState::Succeeded, "{done:?}");
    let before = eventually("2 healthy instances", Duration::from_secs(30), || {
        two_healthy(&agent, "roll")
    })
    .await;
    agent.stop_with(libc::SIGKILL);
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.launch().await;
    let after = eventually("2 healthy instances", Duration::from_secs(30), || {
        two_healthy(&agent, "roll")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish();
    assert!(report.failures().is_empty(), "{}", report.failure_summary());
    assert!(report.ok() > 50, "the load ran: {} ok", report.ok());
    let pids = |s: &pb::ServiceStatus| {
        let mut p: Vec<i32> = s.instances.iter().map(|i| i.pid).collect();
        p.sort_unstable();
        p
    };
    assert_eq!(pids(&before), pids(&after), "adopted, not restarted");
}

/// Instance `id`'s CPU limit as the kernel has it: (quota in µs, `None` when unlimited;
/// period in µs). v1: `cpu.cfs_quota_us` and `cpu.cfs_period_us`; v2: `cpu.max`.
fn cpu_limit(agent: &Agent, service: &str, id: &str) -> (Option<u64>, u64) {
    let rel = instance_rel(service, id);
    let cg = &agent.cgroup;
    let (quota, period) = match cg.version {
        Version::V1 => (
            cg.read("cpu", &rel, "cpu.cfs_quota_us"),
            cg.read("cpu", &rel, "cpu.cfs_period_us"),
        ),
        Version::V2 => {
            let max = cg.read("cpu", &rel, "cpu.max");
            let (q, p) = max.split_once(' ').unwrap_or_default();
            (q.to_string(), p.to_string())
        }
    };
    (quota.parse().ok(), period.parse().unwrap_or(0))
}

/// Every instance of `s` without a CPU limit and scheduled in its service's cpu cgroup
/// (`why`: for the message). v1: its own cpu cgroup is still there, at the default period;
/// v2: it has none (no `cpu.max`).
fn uncapped(agent: &Agent, service: &str, s: &pb::ServiceStatus, why: &str) {
    let none = match agent.cgroup.version {
        Version::V1 => (None, 100_000),
        Version::V2 => (None, 0),
    };
    for i in &s.instances {
        assert_eq!(cpu_limit(agent, service, &i.id), none, "{}: {why}", i.id);
        assert!(
            in_service_cpu(agent, service, i.pid),
            "{}: {why}, in its service's cpu cgroup",
            i.id
        );
    }
}

/// `[rollout] start_cpu`: an instance created by Apply is never capped; each new instance of
/// a restart runs under the cap (0.2 core in 10 ms periods) until its probe first passes;
/// after the rollout every instance has its own limit (none) again.
pub async fn start_cpu_caps_a_rollouts_new_instance() {
    let port = crate::free_port();
    let agent = Agent::start().await;
    // Each instance serves, and passes its probe, 1.5 s after its start.
    let extra = served(port, "30s", "healthy_deadline = \"60s\"\nstart_cpu = 0.2\n");
    agent
        .apply(&spec("cap", 2, &["http-listen", "1500"], &extra))
        .await
        .expect("apply");
    let healthy = pb::HealthState::Healthy as i32;
    let before = eventually("2 healthy instances", Duration::from_secs(60), || {
        two_healthy(&agent, "cap")
    })
    .await;
    uncapped(
        &agent,
        "cap",
        &before,
        "created by Apply, not by a rollout: never capped",
    );
    let old: Vec<i32> = before.instances.iter().map(|i| i.pid).collect();
    let id = agent.restart("cap").await;
    let capped = eventually(
        "a new instance starting under its cap",
        Duration::from_secs(60),
        || async {
            let s = agent.get("cap").await.ok()?;
            s.instances
                .iter()
                .filter(|i| i.pid > 0 && !old.contains(&i.pid) && i.health != healthy)
                .find(|i| cpu_limit(&agent, "cap", &i.id) == (Some(2000), 10_000))
                .map(|i| i.id.clone())
        },
    )
    .await;
    let done = agent.rollout_end(&id, Duration::from_secs(120)).await;
    assert_eq!(done.state(), pb::RolloutState::Succeeded, "{done:?}");
    let after = eventually("2 healthy instances", Duration::from_secs(60), || {
        two_healthy(&agent, "cap")
    })
    .await;
    assert!(
        after.instances.iter().any(|i| i.id == capped),
        "{capped} replaced an old instance: {:?}",
        after.instances
    );
    uncapped(&agent, "cap", &after, "ready, its cap lifted");
}

/// The cgroups above the instances weigh as many processes as they hold running instances
/// (v1 `cpu.shares` 1024 each, v2 `cpu.weight` 100 each), following scaling and deletes:
/// `corral/`, each service, and the agent's parent where it is relative (v1 here; the v2
/// tests give an absolute one, which is left alone), with `--cpu-weight per-instance`. An
/// agent started again with the default (`fixed`) gives them one process's weight back and
/// leaves the parent as it is.
pub async fn cpu_weight_follows_the_instances() {
    let mut agent = Agent::start_full_args("info", &["--cpu-weight", "per-instance"]).await;
    let one = one_process(&agent);
    let serve = |name: &str, n: u32| spec(name, n, &["serve"], "");
    agent.apply(&serve("wa", 3)).await.expect("apply wa");
    agent.apply(&serve("wb", 2)).await.expect("apply wb");
    agent.wait_running("wa", 3).await;
    agent.wait_running("wb", 2).await;
    let relative = agent.cgroup.version == Version::V1;
    let mut want = vec![("corral/wa", 3), ("corral/wb", 2), ("corral", 5)];
    if relative {
        want.push(("", 5));
    }
    weights_become(&agent, &want).await;
    if !relative {
        assert_ne!(
            cpu_weight(&agent, ""),
            Some(5 * one),
            "an absolute parent is left alone"
        );
    }
    // An instance is scheduled in its service's cpu cgroup: v1 keeps its own, unused, at the
    // default weight; on v2 it has none.
    let own = match agent.cgroup.version {
        Version::V1 => Some(one),
        Version::V2 => None,
    };
    for rel in ["corral/wa/wa-0", "corral/wb/wb-1"] {
        assert_eq!(cpu_weight(&agent, rel), own, "{rel}");
    }
    agent.apply(&serve("wa", 1)).await.expect("scale wa");
    weights_become(&agent, &[("corral/wa", 1), ("corral", 3)]).await;

    agent.stop_with(libc::SIGKILL);
    agent.extra_args.clear();
    agent.launch().await;
    agent.wait_running("wb", 2).await;
    weights_become(&agent, &[("corral/wa", 1), ("corral/wb", 1), ("corral", 1)]).await;
    if relative {
        assert_eq!(
            cpu_weight(&agent, ""),
            Some(3 * one),
            "the parent is not touched"
        );
    }
    agent.delete("wb").await.expect("delete wb");
    agent.delete("wa").await.expect("delete wa");
}

/// One process's CPU weight: v1 `cpu.shares` 1024, v2 `cpu.weight` 100.
fn one_process(agent: &Agent) -> u64 {
    match agent.cgroup.version {
        Version::V1 => 1024,
        Version::V2 => 100,
    }
}

/// The CPU weight of `rel` below the agent's parent (v1 `cpu.shares`, v2 `cpu.weight`).
fn cpu_weight(agent: &Agent, rel: &str) -> Option<u64> {
    let file = match agent.cgroup.version {
        Version::V1 => "cpu.shares",
        Version::V2 => "cpu.weight",
    };
    agent.cgroup.read("cpu", rel, file).parse().ok()
}

/// Waits (up to 10 s) until each cgroup of `want` weighs its number of processes.
async fn weights_become(agent: &Agent, want: &[(&str, u64)]) {
    let one = one_process(agent);
    let mut found = Vec::new();
    for _ in 0..200 {
        found = want.iter().map(|(rel, _)| cpu_weight(agent, rel)).collect();
        if want
            .iter()
            .zip(&found)
            .all(|((_, n), f)| *f == Some(n * one))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cpu weights: wanted {want:?} processes, found {found:?}");
}

/// The sections of an HTTP service on the agent's socket `port`, probed on its own admin
/// port (first passes counted after `start_period`), `rollout` added to `[rollout]`.
fn served(port: u16, start_period: &str, rollout: &str) -> String {
    format!(
        "[ports]\nadmin = \"auto\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n\
         [health]\nhttp = \"http://127.0.0.1:{{port.admin}}/healthz\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nstart_period = \"{start_period}\"\n\
         [rollout]\nmin_healthy = \"300ms\"\n{rollout}"
    )
}

async fn two_healthy(agent: &Agent, name: &str) -> Option<pb::ServiceStatus> {
    let s = agent.get(name).await.ok()?;
    (s.healthy == 2
        && s.instances.len() == 2
        && s.rollout
            .as_ref()
            .is_none_or(|r| r.state() != pb::RolloutState::Running))
    .then_some(s)
}

/// Docker's default capability set less CAP_MKNOD, as `/proc/PID/status` shows it.
const DOCKER_DEFAULT_CAPS: &str = "00000000a00425fb";
const NO_CAPS: &str = "0000000000000000";

/// An exec probe that passes when the probe process itself shows `key=value` (see
/// `corral-testbin privileges`): probes run with the service's privileges. What is checked
/// is what the probe sees, not its speed: the v2 VM emulates its CPU (TCG), where one probe
/// (two executions of debug binaries) takes 0.2-1.4 s on a loaded host, confined or not.
fn check_probe(key: &str, value: &str) -> String {
    format!(
        "[health]\nexec = [{:?}, \"check\", {key:?}, {value:?}]\ninterval = \"2s\"\ntimeout = \"2s\"\n",
        testbin()
    )
}

async fn wait_healthy(agent: &Agent, name: &str) {
    eventually(
        &format!("{name} healthy by its exec probe"),
        Duration::from_secs(30),
        || async {
            let s = agent.get(name).await.ok()?;
            (s.healthy == 1).then_some(())
        },
    )
    .await;
}

/// Capabilities as configured, read from `/proc/self/status` inside the instances (and inside
/// their exec probes): a non-root user has none at all, or exactly the listed ones as ambient
/// capabilities (and then can bind port 80 in its own network namespace); root has Docker's
/// default bounding set, or exactly the listed ones; supplementary groups are empty either way.
pub async fn capabilities_as_configured() {
    let agent = Agent::start().await;
    let net = "namespaces = [\"pid\", \"mount\", \"uts\", \"ipc\", \"net\"]\n";
    let specs = [
        spec(
            "capnone",
            1,
            &["privileges", "80"],
            &format!("user = \"65534:65534\"\n[isolation]\n{net}"),
        ),
        spec(
            "capbind",
            1,
            &["privileges", "80"],
            &format!(
                "user = \"65534:65534\"\n[isolation]\n{net}capabilities = [\"NET_BIND_SERVICE\"]\n{}",
                check_probe("cap_amb", "0000000000000400")
            ),
        ),
        spec("caproot", 1, &["privileges"], ""),
        spec(
            "capkill",
            1,
            &["privileges"],
            &format!(
                "[isolation]\ncapabilities = [\"cap_kill\"]\n{}",
                check_probe("cap_bnd", "0000000000000020")
            ),
        ),
    ];
    for toml in &specs {
        agent.apply(toml).await.expect("apply");
    }
    let mut ids = Vec::new();
    for name in ["capnone", "capbind", "caproot", "capkill"] {
        ids.push(agent.wait_running(name, 1).await.remove(0).id);
    }
    let [none, bind, root, kill] = <[String; 4]>::try_from(ids).expect("four instances");
    let expect = [
        // A non-root user: nothing, and port 80 is refused.
        (&none, "cap_inh", NO_CAPS),
        (&none, "cap_prm", NO_CAPS),
        (&none, "cap_eff", NO_CAPS),
        (&none, "cap_amb", NO_CAPS),
        (&none, "cap_bnd", NO_CAPS),
        (&none, "uid", "65534"),
        (&none, "bind", "EACCES"),
        // ...with CAP_NET_BIND_SERVICE, only that, ambient, and port 80 binds.
        (&bind, "cap_inh", "0000000000000400"),
        (&bind, "cap_prm", "0000000000000400"),
        (&bind, "cap_eff", "0000000000000400"),
        (&bind, "cap_amb", "0000000000000400"),
        (&bind, "cap_bnd", "0000000000000400"),
        (&bind, "uid", "65534"),
        (&bind, "bind", "ok"),
        // Root: Docker's default set, nothing inheritable or ambient.
        (&root, "cap_bnd", DOCKER_DEFAULT_CAPS),
        (&root, "cap_prm", DOCKER_DEFAULT_CAPS),
        (&root, "cap_eff", DOCKER_DEFAULT_CAPS),
        (&root, "cap_inh", NO_CAPS),
        (&root, "cap_amb", NO_CAPS),
        (&root, "uid", "0"),
        // ...with capabilities = ["cap_kill"], only CAP_KILL (bit 5).
        (&kill, "cap_bnd", "0000000000000020"),
        (&kill, "cap_prm", "0000000000000020"),
        (&kill, "cap_eff", "0000000000000020"),
        (&kill, "cap_amb", NO_CAPS),
    ];
    for (instance, key, value) in expect {
        assert_eq!(
            agent.reported(instance, key).await,
            value,
            "{key} of {instance}"
        );
    }
    for instance in [&none, &bind, &root, &kill] {
        assert_eq!(agent.reported(instance, "groups").await, "", "{instance}");
        assert_eq!(
            agent.reported(instance, "no_new_privs").await,
            "1",
            "{instance}"
        );
    }
    // The exec probes saw the same sets as their services.
    wait_healthy(&agent, "capbind").await;
    wait_healthy(&agent, "capkill").await;
}

/// `readonly_root`: writes outside `workdir` and `/tmp` fail with EROFS (the agent's state
/// directory included, also when `/tmp` holds it), writes into both succeed, the file written
/// in `workdir` is the host's, `/dev/null` and the instance's own `/proc` files still work,
/// and the instance's logs are still written.
pub async fn readonly_root_keeps_workdir_and_tmp_writable() {
    let agent = Agent::start().await;
    // Not under /tmp: a private /tmp would hide it.
    std::fs::create_dir_all("/var/tmp").expect("mkdir /var/tmp");
    let workdir = tempfile::Builder::new()
        .prefix("corral-e2e-ro-")
        .tempdir_in("/var/tmp")
        .expect("workdir");
    let wd = workdir.path().display().to_string();
    let state = agent.state_dir.display().to_string();
    // Only what exists on this host (the v2 VM has a small userland).
    let readonly: Vec<&str> = ["/", "/etc", "/usr", "/var", "/var/tmp"]
        .into_iter()
        .filter(|p| std::path::Path::new(p).is_dir())
        .collect();
    let mut targets: Vec<String> = vec![format!("keep:{wd}"), "/tmp".into()];
    targets.extend(readonly.iter().map(|p| p.to_string()));
    targets.extend(
        [
            "/dev/null",
            "/proc/self/oom_score_adj",
            "/proc/sys/kernel/domainname",
        ]
        .map(String::from),
    );
    targets.push(state.clone());
    let args: Vec<&str> = std::iter::once("writes")
        .chain(targets.iter().map(String::as_str))
        .collect();
    let extra = format!("workdir = {wd:?}\n[isolation]\nreadonly_root = true\n");
    agent
        .apply(&spec("ro", 1, &args, &extra))
        .await
        .expect("apply");
    let ro = agent.wait_running("ro", 1).await.remove(0).id;
    let wrote = |path: &str| {
        let key = format!("write:{path}");
        let agent = &agent;
        let ro = ro.clone();
        async move { agent.reported(&ro, &key).await }
    };
    assert_eq!(wrote(&wd).await, "ok", "workdir is writable");
    assert_eq!(wrote("/tmp").await, "ok", "/tmp is writable");
    for path in &readonly {
        assert_eq!(wrote(path).await, "EROFS", "{path} is read-only");
    }
    assert_eq!(wrote("/dev/null").await, "ok", "devices still work");
    assert_eq!(
        wrote("/proc/self/oom_score_adj").await,
        "ok",
        "own /proc works"
    );
    assert_eq!(
        wrote("/proc/sys/kernel/domainname").await,
        "EROFS",
        "kernel knobs stay read-only"
    );
    // The state directory is under the private /tmp (hidden) or read-only.
    let state_result = wrote(&state).await;
    assert!(
        state_result == "ENOENT" || state_result == "EROFS",
        "agent state: {state_result}"
    );
    let host_file = workdir.path().join("written-by-corral-testbin");
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("the instance's file is on the host"),
        "written from inside the instance\n"
    );

    // Without a private /tmp the host's /tmp is writable, but never the agent's state in it.
    let extra = "[isolation]\nnamespaces = [\"pid\", \"mount\"]\nprivate_tmp = false\nreadonly_root = true\n";
    let logs = agent.state_dir.join("logs").display().to_string();
    agent
        .apply(&spec(
            "ro2",
            1,
            &["writes", "/tmp", &state, &logs, "/"],
            extra,
        ))
        .await
        .expect("apply");
    let ro2 = agent.wait_running("ro2", 1).await.remove(0).id;
    assert_eq!(agent.reported(&ro2, "write:/tmp").await, "ok");
    assert_eq!(agent.reported(&ro2, "write:/").await, "EROFS");
    for dir in [&state, &logs] {
        let got = agent.reported(&ro2, &format!("write:{dir}")).await;
        assert!(
            got == "EROFS" || got == "ENOENT",
            "the agent's state {dir} is masked (an empty read-only directory): {got}"
        );
    }
}

/// `[resources] nofile` is the service's soft and hard `RLIMIT_NOFILE`, and its exec
/// probe's.
pub async fn nofile_limit_applies() {
    let agent = Agent::start().await;
    let extra = format!(
        "user = \"65534:65534\"\n[resources]\nnofile = 777\n{}",
        check_probe("nofile_hard", "777")
    );
    agent
        .apply(&spec("nofile", 1, &["privileges"], &extra))
        .await
        .expect("apply");
    let inst = agent.wait_running("nofile", 1).await.remove(0).id;
    assert_eq!(agent.reported(&inst, "nofile_soft").await, "777");
    assert_eq!(agent.reported(&inst, "nofile_hard").await, "777");
    wait_healthy(&agent, "nofile").await;
}

/// A loop device over a 1 MiB file of zeros, for an instance to try to write; detached when
/// dropped. `None` where the host has no loop devices.
struct LoopDevice {
    dev: String,
    file: std::path::PathBuf,
}

impl LoopDevice {
    fn new(dir: &std::path::Path) -> Option<LoopDevice> {
        let file = dir.join("disk.img");
        std::fs::write(&file, vec![0u8; 1 << 20]).ok()?;
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !dev.is_empty()).then_some(LoopDevice { dev, file })
    }

    /// Whether the backing file is still all zeros.
    fn untouched(&self) -> bool {
        std::fs::read(&self.file).is_ok_and(|b| b.iter().all(|x| *x == 0))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// The major and minor numbers of a device node.
fn dev_numbers(path: &str) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path).ok()?.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// Processes on the host whose name is `comm`.
fn processes_named(comm: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == comm)
                        && alive(*pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The escape suite: a root service with the default isolation (and `readonly_root`) tries,
/// with real system calls (`corral-testbin escape`), to write a block device node the host
/// left in its workdir (a loop device), make device nodes, write `/dev/kmsg`, join another
/// cgroup, rewrite `kernel.core_pattern`, read `/proc/kcore`, mount, load a module, enter a
/// new user namespace, connect to the agent's API socket (again after an agent restart) and
/// outlive `delete` through a double fork and `setsid`. Each is refused and the host is
/// unchanged.
pub async fn escape_is_refused(readonly_root: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mut agent = Agent::start().await;
    std::fs::create_dir_all("/var/tmp").expect("mkdir /var/tmp");
    let workdir = tempfile::Builder::new()
        .prefix("corral-e2e-escape-")
        .tempdir_in("/var/tmp")
        .expect("workdir");
    std::fs::set_permissions(workdir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let loopdev = LoopDevice::new(workdir.path());
    // A block device node in reach: the loop device's numbers, or (without loop devices)
    // the numbers of loop0, which the kernel still routes to the block layer.
    let (major, minor) = loopdev
        .as_ref()
        .and_then(|l| dev_numbers(&l.dev))
        .unwrap_or((7, 0));
    let blk = workdir.path().join("blk");
    let c = std::ffi::CString::new(blk.display().to_string()).expect("path");
    // SAFETY: mknod(2) with a NUL-terminated path.
    let made = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o666,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(made, 0, "mknod {}", blk.display());
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let token = format!("corral-esc{}", std::process::id() % 100_000);
    let socket = agent.socket.display().to_string();
    let wd = workdir.path().display().to_string();
    let extra = format!(
        "workdir = {wd:?}\n[isolation]\nreadonly_root = {readonly_root}\n[stop]\ngrace = \"2s\"\n"
    );
    let blk_s = blk.display().to_string();
    agent
        .apply(&spec(
            "esc",
            1,
            &["escape", &socket, &blk_s, &token],
            &extra,
        ))
        .await
        .expect("apply");
    let inst = agent.wait_running("esc", 1).await.remove(0);
    let refused = |got: &str| got.starts_with("refused:");
    for name in [
        "block_write",
        "mknod_char",
        "mknod_block",
        "kmsg",
        "cgroup_procs",
        "sysctl",
        "kcore",
        "mount",
        "init_module",
        "finit_module",
        "unshare_user",
        "api_socket",
    ] {
        let got = agent.reported(&inst.id, &format!("escape.{name}")).await;
        eprintln!("escape.{name}: {got}");
        assert!(refused(&got), "escape.{name}: {got}");
    }
    // Refused by policy (no device access), not by a missing device.
    let block = agent.reported(&inst.id, "escape.block_write").await;
    assert!(
        block == "refused:EACCES" || block == "refused:EPERM",
        "block device: {block}"
    );
    assert_eq!(
        agent.reported(&inst.id, "escape.double_fork").await,
        "started"
    );

    // The API socket stays out of reach after the agent starts again (a new socket file in
    // the same directory).
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    let again = eventually(
        "the instance to try again",
        Duration::from_secs(20),
        || async {
            let pid = agent.get("esc").await.ok()?.instances.first()?.pid;
            // SAFETY: kill(2) on the instance's service process, found through the agent.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            tokio::time::sleep(Duration::from_millis(100)).await;
            agent.stdout_of(&inst.id).lines().find_map(|l| {
                l.strip_prefix("escape.api_socket_again=")
                    .map(str::to_string)
            })
        },
    )
    .await;
    assert!(
        refused(&again),
        "API socket after an agent restart: {again}"
    );

    // The host is unchanged.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default(),
        core_pattern,
        "kernel.core_pattern"
    );
    if let Some(l) = &loopdev {
        assert!(l.untouched(), "the loop device's backing file was written");
    }
    for p in [
        "/tmp/corral-escape-mknod_char",
        "/tmp/corral-escape-mknod_block",
    ] {
        assert!(!std::path::Path::new(p).exists(), "{p} on the host");
    }

    own_cgroup_view(&agent, "esc", &inst.id, inst.pid, inst.init_pid);
    sys_all_read_only(inst.init_pid);

    // The double-forked, setsid process dies with the instance.
    let rel = instance_rel("esc", &inst.id);
    let pids = agent.cgroup.pids(&rel);
    assert!(
        !processes_named(&token).is_empty(),
        "the double-forked process runs before delete"
    );
    agent.delete("esc").await.expect("delete");
    eventually(
        "every process of the instance gone",
        Duration::from_secs(20),
        || async {
            (pids.iter().all(|p| !alive(*p)) && processes_named(&token).is_empty()).then_some(())
        },
    )
    .await;
}

/// `isolation.userns = true`: root inside is the first id of the service's block on the host.
/// From inside, with Docker's default capabilities (namespaced), it makes a file in a
/// directory anyone may write (owned on the host by that id, not root), cannot read a
/// root-only host file (which a root instance without a user namespace reads), cannot take a
/// host user's file (CAP_CHOWN held) nor make a device node, and still writes `/dev/null`;
/// its exec probe runs as root inside too. Its workdir, owned by an unprivileged host user, is
/// idmapped: root inside writes there, and what it makes (setuid bit and all) belongs on the
/// host to the workdir's owner, never to root. Where the workdir's filesystem has no
/// idmapped mounts (tmpfs before Linux 6.3: the v2 VM), the apply is refused naming the
/// workdir, and the rest is checked with a root-owned workdir, which is not mapped.
pub async fn userns_root_is_not_host_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let agent = Agent::start().await;
    std::fs::create_dir_all("/var/tmp").expect("mkdir /var/tmp");
    let dir = |prefix: &str| {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .expect("tempdir")
    };
    let shared = dir("corral-e2e-userns-shared-");
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod 1777");
    let secret = shared.path().join("secret");
    std::fs::write(&secret, "root only\n").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let foreign = |name: &str| {
        let f = shared.path().join(name);
        std::fs::write(&f, "a host user's\n").expect("foreign");
        std::os::unix::fs::chown(&f, Some(1000), Some(1000)).expect("chown 1000");
        f
    };
    let (foreign_ns, foreign_root) = (foreign("foreign-ns"), foreign("foreign-root"));
    let workdir = dir("corral-e2e-userns-wd-");
    std::fs::set_permissions(workdir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::os::unix::fs::chown(workdir.path(), Some(4242), Some(4243)).expect("chown workdir");
    let path = |p: &std::path::Path| p.display().to_string();
    let (sh, se) = (path(shared.path()), path(&secret));
    let toml = |name: &str, workdir: &str, userns: bool, foreign: &std::path::Path| {
        format!(
            "name = \"{name}\"\ncommand = [{:?}, \"userns\", {sh:?}, {se:?}, {:?}]\nworkdir = {workdir:?}\n[isolation]\nuserns = {userns}\n{}",
            testbin(),
            path(foreign),
            check_probe("uid", "0")
        )
    };
    let wd = path(workdir.path());
    let idmapped = match agent.apply(&toml("uns", &wd, true, &foreign_ns)).await {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            assert!(
                e.message().contains("isolation.userns: workdir")
                    && e.message().contains("cannot be idmapped"),
                "{}",
                e.message()
            );
            agent
                .apply(&toml("uns", &sh, true, &foreign_ns))
                .await
                .expect("apply with a root-owned workdir");
            false
        }
    };
    eprintln!("userns: workdir idmapped: {idmapped}");
    let running = agent.wait_running("uns", 1).await.remove(0);
    // Started by the init zygote too: its child waited there for the id maps.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", running.init_pid)).expect("cmdline");
    assert_eq!(
        String::from_utf8_lossy(&cmdline),
        format!("corral-init {}\0", running.id),
        "the userns instance's init comes from the zygote"
    );
    // It joined its cgroup by itself from inside its user namespace: in every hierarchy,
    // its init and the service under it; on v1 the cpu (and cpuacct) hierarchy's cgroup is
    // its service's, since it has no CPU quota.
    let rel = format!("corral/uns/{}", running.id);
    for pid in [running.init_pid, running.pid] {
        let missing = agent.cgroup.missing(&rel, pid);
        if agent.cgroup.version == Version::V1 {
            assert!(
                missing.contains(&"cpu") && missing.iter().all(|m| m.starts_with("cpu")),
                "pid {pid} of {rel}: not in {missing:?}"
            );
            let in_service = agent.cgroup.missing("corral/uns", pid);
            for m in &missing {
                assert!(!in_service.contains(m), "pid {pid} in corral/uns for {m}");
            }
        } else {
            assert_eq!(
                missing,
                Vec::<&str>::new(),
                "pid {pid} of {rel} in every hierarchy"
            );
        }
    }
    let inst = running.id;
    let got = |key: &'static str| {
        let (agent, inst) = (&agent, inst.clone());
        async move { agent.reported(&inst, &format!("userns.{key}")).await }
    };
    assert_eq!(got("uid").await, "0", "root inside");
    let map = got("uid_map").await;
    let fields: Vec<u32> = map.split(' ').filter_map(|f| f.parse().ok()).collect();
    let base = match fields[..] {
        [0, base, 65536] if base >= 65536 => base,
        _ => panic!("uid_map {map:?}: 0 <host block> 65536 expected"),
    };
    assert_eq!(
        got("cap_eff").await,
        DOCKER_DEFAULT_CAPS,
        "capabilities, namespaced"
    );
    assert_eq!(got("write_shared").await, "ok");
    let made = std::fs::metadata(got("made").await).expect("the file made inside");
    assert_eq!(
        (made.uid(), made.gid()),
        (base, base),
        "a file root made inside belongs on the host to the block's first id"
    );
    assert_eq!(got("read_secret").await, "EACCES", "a root-only host file");
    assert_eq!(got("chown_foreign").await, "EPERM", "a host user's file");
    assert_eq!(std::fs::metadata(&foreign_ns).expect("foreign").uid(), 1000);
    assert_eq!(got("mknod").await, "EPERM");
    assert_eq!(got("devnull").await, "ok", "the minimal /dev works");
    assert_eq!(got("write_workdir").await, "ok");
    let in_workdir = got("made_in_workdir").await;
    let owner = if idmapped {
        let m = std::fs::metadata(workdir.path().join(&in_workdir)).expect("made in workdir");
        assert!(m.mode() & 0o4000 != 0, "the setuid bit is on the file");
        (m.uid(), m.gid())
    } else {
        let m = std::fs::metadata(shared.path().join(&in_workdir)).expect("made in workdir");
        assert_eq!((m.uid(), m.gid()), (base, base));
        (4242, 4243)
    };
    assert_eq!(
        owner,
        (4242, 4243),
        "what root makes in the idmapped workdir belongs to the workdir's owner, never root"
    );
    wait_healthy(&agent, "uns").await;

    // Without a user namespace, root in an instance does read it and take the file: what
    // the user namespace took away.
    agent
        .apply(&toml("root", &sh, false, &foreign_root))
        .await
        .expect("apply");
    let root = agent.wait_running("root", 1).await.remove(0).id;
    assert_eq!(agent.reported(&root, "userns.read_secret").await, "ok");
    assert_eq!(agent.reported(&root, "userns.chown_foreign").await, "ok");

    // Deleting the service gives its block back.
    agent.delete("uns").await.expect("delete");
    let kept = std::fs::read_to_string(agent.state_dir.join("userns-ids.json")).unwrap_or_default();
    assert!(!kept.contains("\"uns\""), "released: {kept}");
}

/// A second agent on the same cgroup tree (its own state directory, the same
/// `--cgroup-parent`) refuses to start, naming the first; the first's instances run on. Once
/// the first is dead, its tree is taken over.
pub async fn a_second_agent_on_the_same_cgroup_tree_is_refused() {
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("mine", 1, &["serve"], ""))
        .await
        .expect("apply");
    let pid = agent.wait_running("mine", 1).await[0].pid;
    let first = agent.pid().expect("pid");

    let other = tempfile::tempdir().expect("tempdir");
    let parent = agent.cgroup.flag().to_string();
    let second = || {
        let mut c = std::process::Command::new(crate::bin("corrald"));
        c.arg("--state-dir")
            .arg(other.path().join("state"))
            .arg("--socket")
            .arg(other.path().join("corral.sock"))
            .arg("--cgroup-parent")
            .arg(&parent)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let mut child = second().spawn().expect("spawn");
    let mut exited = None;
    for _ in 0..300 {
        if let Some(st) = child.try_wait().expect("wait") {
            exited = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(status) = exited else {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!(
            "the second agent kept running on the first one's tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let out = child.wait_with_output().expect("output");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!status.success());
    assert!(
        text.contains("another running corrald")
            && text.contains(&format!("pid {first}"))
            && text.contains(&agent.state_dir.display().to_string()),
        "{text}"
    );
    // The first agent's instance was not touched, and it still serves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid));
    assert_eq!(agent.wait_running("mine", 1).await[0].pid, pid);

    // A dead owner's tree is taken over.
    agent.stop_with(libc::SIGKILL);
    let mut child = second().spawn().expect("spawn");
    let sock = other.path().join("corral.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            panic!("the second agent exited with {st}");
        }
        if crate::connect(&sock).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second agent serves"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its instance is a leftover for the second agent, which stops it.
    let stopped = eventually(
        "the leftover to be stopped",
        Duration::from_secs(30),
        || async { (!alive(pid)).then_some(()) },
    );
    let stopped = tokio::time::timeout(Duration::from_secs(35), stopped).await;
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let _ = child.wait();
    stopped.expect("stopped in time");
}

/// `[image]` from an OCI layout directory (no network): see [`image_instance`].
pub async fn image_is_the_instance_root() {
    let Some(busybox) = crate::oci::image::busybox() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = crate::oci::image::busybox_image(&busybox, "app");
    let layout = dir.path().join("busybox.oci");
    image.write_dir(&layout);
    let agent = Agent::start().await;
    image_instance(&agent, &layout.display().to_string(), &image.manifest).await;
}

/// Deploys the test busybox image (config: User `app`, WorkingDir `/data`, Env `GREETING=hi`,
/// layer 2 whiting out `/gone.txt` and `/data/old.txt`) from `url` as service `img`, whose
/// busybox httpd serves `/data` on its port. Checks: the image is `/` of the process (its files,
/// the whiteouts applied, nothing of the host's), the config's user, workdir and env, the
/// provided `/etc` files, `/proc`, `/dev`, the writes landing in the instance's own layer,
/// which is gone once the instance ends.
pub async fn image_instance(agent: &Agent, url: &str, digest: &str) {
    let spec = format!(
        r#"name = "img"
command = ["/bin/sh", "-c", "echo written > /data/written && exec httpd -f -p 127.0.0.1:$PORT_HTTP -h /data"]
replicas = 1

[image]
url = "{url}"
digest = "{digest}"

[ports]
http = "auto"
"#
    );
    agent.apply(&spec).await.expect("apply");
    let inst = agent.wait_running("img", 1).await.remove(0);
    let port: u16 = eventually("the instance's port", Duration::from_secs(30), || async {
        let s = agent.get("img").await.ok()?;
        s.instances
            .first()?
            .ports
            .get("http")
            .and_then(|p| u16::try_from(*p).ok())
    })
    .await;
    let root = format!("/proc/{}/root", inst.pid);
    let page = eventually("httpd serving /data", Duration::from_secs(30), || async {
        http_get(port, "/new.txt").filter(|p| p.starts_with("HTTP/1.") && p.contains(" 200 "))
    })
    .await;
    assert!(page.contains("new"), "{page}");
    let file = |p: &str| std::fs::read_to_string(format!("{root}/{p}"));
    assert!(std::path::Path::new(&format!("{root}/bin/busybox")).is_file());
    assert_eq!(file("data/keep.txt").expect("lower layer"), "keep\n");
    assert_eq!(file("data/new.txt").expect("upper layer"), "new\n");
    assert!(file("gone.txt").is_err(), "whiteout applied");
    assert!(file("data/old.txt").is_err(), "whiteout applied");
    assert!(file("opq/lower.txt").is_err(), "opaque directory");
    assert!(
        file("usr/bin/env").is_err() && file("etc/os-release").is_err(),
        "nothing of the host's"
    );
    assert_eq!(file("data/written").expect("written"), "written\n");
    assert_eq!(file("etc/hostname").expect("hostname").trim(), inst.id);
    assert!(file("etc/hosts").expect("hosts").contains("localhost"));
    assert_eq!(
        file("etc/resolv.conf").expect("resolv.conf"),
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        "the host's resolv.conf"
    );
    assert!(std::path::Path::new(&format!("{root}/dev/null")).exists());
    // The instance's own /proc: its init is PID 1 there.
    assert!(std::path::Path::new(&format!("{root}/proc/1/stat")).exists());
    let status = std::fs::read_to_string(format!("/proc/{}/status", inst.pid)).expect("status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned));
    assert_eq!(uid.as_deref(), Some("1000"), "the config's User app");
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", inst.pid)).expect("cwd");
    assert_eq!(
        cwd,
        std::path::Path::new("/data"),
        "the config's WorkingDir"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", inst.pid)).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.split('\0').any(|v| v == "GREETING=hi"), "{environ}");
    assert!(environ.split('\0').any(|v| v == "PATH=/bin"), "{environ}");

    // The write went to this instance's layer, not to the store's rootfs.
    let layer = agent.state_dir.join("run").join(&inst.id).join("image");
    assert_eq!(
        std::fs::read_to_string(layer.join("upper/data/written")).expect("in the upper layer"),
        "written\n"
    );
    let store_copy = walk_for(&agent.state_dir.join("artifacts/images"), "written");
    assert!(
        store_copy.is_empty(),
        "the store's rootfs was written: {store_copy:?}"
    );

    // The instance ends: its layer goes.
    let mut client = agent.client().await;
    client
        .scale(pb::ScaleRequest {
            name: "img".into(),
            replicas: 0,
            force: false,
            expected_revision: None,
        })
        .await
        .expect("scale to 0");
    eventually("the instance gone", Duration::from_secs(30), || async {
        (!alive(inst.init_pid)).then_some(())
    })
    .await;
    eventually(
        "its writable layer removed",
        Duration::from_secs(30),
        || async { (!layer.exists()).then_some(()) },
    )
    .await;
    agent.delete("img").await.expect("delete");
}

/// Files named `name` under `dir`.
fn walk_for(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(walk_for(&path, name));
        } else if e.file_name() == name {
            found.push(path);
        }
    }
    found
}

/// `GET path` on 127.0.0.1:`port`: the whole response.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    c.read_to_string(&mut out).ok()?;
    Some(out)
}

/// An OCI layout in `dir` whose one layer holds `corral-testbin` at `/bin/corral-testbin`
/// and the shared libraries it loads (as `ldd` lists them, at the same paths), with root and
/// an `app` user (1000) in `/etc/passwd`; its manifest digest. `None` (said why) where `ldd`
/// cannot tell.
pub fn testbin_image(dir: &std::path::Path) -> Option<String> {
    use crate::oci::build::{E, tar};
    use crate::oci::image::{Blob, Image, LAYER_TAR, config, manifest};
    let bin = testbin();
    let out = std::process::Command::new("ldd").arg(&bin).output().ok()?;
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let libs: Vec<String> = listing
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    if !out.status.success() || libs.is_empty() {
        eprintln!("SKIP testbin image: ldd {bin}: {listing}");
        return None;
    }
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![(
        "bin/corral-testbin".into(),
        std::fs::read(&bin).expect("read corral-testbin"),
        0o755,
    )];
    for lib in &libs {
        let real = std::fs::canonicalize(lib).expect("a library ldd found");
        files.push((
            lib.trim_start_matches('/').to_string(),
            std::fs::read(real).expect("read a library"),
            0o755,
        ));
    }
    let mut dirs: Vec<String> = vec!["etc/".into(), "tmp/".into(), "data/".into()];
    for (name, _, _) in &files {
        for d in std::path::Path::new(name).ancestors().skip(1) {
            if d.as_os_str().is_empty() {
                continue;
            }
            let d = format!("{}/", d.display());
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs.sort_by_key(|d| d.matches('/').count());
    let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/data:/bin/sh\n".to_vec();
    let mut entries: Vec<E<'_>> = dirs
        .iter()
        .map(|d| E::Dir(d.as_bytes(), if d == "tmp/" { 0o1777 } else { 0o755 }))
        .collect();
    entries.extend(
        files
            .iter()
            .map(|(name, data, mode)| E::File(name.as_bytes(), data, *mode)),
    );
    entries.push(E::File(b"etc/passwd", &passwd, 0o644));
    let layer = tar(&entries);
    let config = config("", &[&layer]);
    let l = Blob::new(LAYER_TAR, layer);
    let manifest = manifest(&config, &[&l]);
    let digest = format!("sha256:{}", manifest.hex());
    let image = Image {
        blobs: vec![config, l, manifest],
        manifest: digest.clone(),
    };
    image.write_dir(dir);
    Some(digest)
}

/// A mountinfo line's mount point (field 5).
fn mount_point(line: &str) -> Option<&str> {
    line.split_whitespace().nth(4)
}

/// Whether a mountinfo line's own mount options (field 6) hold `ro`.
fn read_only(line: &str) -> bool {
    line.split_whitespace()
        .nth(5)
        .is_some_and(|o| o.split(',').any(|f| f == "ro"))
}

/// The mount on top at `point` in a mountinfo text.
fn mount_at<'a>(mounts: &'a str, point: &str) -> Option<&'a str> {
    mounts.lines().rfind(|l| mount_point(l) == Some(point))
}

/// Every mount at or below `/sys` in the instance's mount namespace (seen through its init)
/// is read-only, the covered ones included (the host's tracefs and cgroup hierarchies under
/// the instance's views): none is left writable to be uncovered.
fn sys_all_read_only(init_pid: i32) {
    let mounts = std::fs::read_to_string(format!("/proc/{init_pid}/mountinfo")).expect("mountinfo");
    let writable: Vec<&str> = mounts
        .lines()
        .filter(|l| {
            mount_point(l).is_some_and(|p| p == "/sys" || p.starts_with("/sys/")) && !read_only(l)
        })
        .collect();
    assert!(
        mount_at(&mounts, "/sys").is_some(),
        "/sys mounted:\n{mounts}"
    );
    assert!(writable.is_empty(), "writable under /sys: {writable:#?}");
}

/// The instance's own cgroup is the root of the cgroup filesystem it sees (the memory
/// hierarchy on v1), on a read-only mount. `pid`: its service process; `init_pid`: its init.
fn own_cgroup_view(agent: &Agent, service: &str, id: &str, pid: i32, init_pid: i32) {
    use std::os::unix::fs::MetadataExt;
    let point = match crate::cgroup::version() {
        Version::V1 => "/sys/fs/cgroup/memory",
        Version::V2 => "/sys/fs/cgroup",
    };
    let own = agent.cgroup.dir("memory", &instance_rel(service, id));
    let identity = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let mounts = std::fs::read_to_string(format!("/proc/{init_pid}/mountinfo")).expect("mountinfo");
    assert!(identity(&own).is_some(), "{}", own.display());
    assert_eq!(
        identity(std::path::Path::new(&format!("/proc/{pid}/root{point}"))),
        identity(&own),
        "{point} inside is the instance's cgroup {}:\n{mounts}",
        own.display()
    );
    let view = mount_at(&mounts, point).expect("the cgroup view");
    assert!(read_only(view), "the cgroup view read-only: {view}");
}

/// The escape suite of [`escape_is_refused`] run by a root service from an image (with
/// `userns`: in its own user namespace as well): device nodes, `/dev/kmsg`, the cgroup,
/// `kernel.core_pattern`, `/proc/kcore`, mount, modules, a new user namespace and the API
/// socket (again after an agent restart) are each refused, the host is unchanged, and a
/// double-forked `setsid` process dies with the instance. No host device node is reachable
/// from an image (the store skips device nodes, nothing of the host's tree is in view), so
/// the block device write is refused for want of one. Then the same checks as
/// [`image_instance`] on what the image instance sees of the kernel: the system paths masked
/// or read-only, the minimal `/dev`, its own cgroup as the cgroup root, the seccomp filter.
pub async fn image_escape_is_refused(userns: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("testbin.oci");
    let Some(digest) = testbin_image(&layout) else {
        return;
    };
    let mut agent = Agent::start().await;
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let token = format!("corral-img{}", std::process::id() % 10_000);
    let socket = agent.socket.display().to_string();
    let spec = format!(
        "name = \"esc\"\ncommand = [\"/bin/corral-testbin\", \"escape\", {socket:?}, \"/data/blk\", {token:?}]\n[image]\nurl = {:?}\ndigest = {digest:?}\n[isolation]\nuserns = {userns}\n[stop]\ngrace = \"2s\"\n",
        layout.display().to_string()
    );
    match agent.apply(&spec).await {
        Ok(_) => {}
        // The v2 VM's state directory is on tmpfs, which has idmapped mounts from Linux 6.3.
        Err(e) if userns && e.message().contains("cannot be idmapped") => {
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            eprintln!(
                "image escape with userns: refused at Apply on this filesystem: {}",
                e.message()
            );
            return;
        }
        Err(e) => panic!("apply: {e:?}"),
    }
    let inst = agent.wait_running("esc", 1).await.remove(0);
    let refused = |got: &str| got.starts_with("refused:");
    for name in [
        "block_write",
        "mknod_char",
        "mknod_block",
        "kmsg",
        "cgroup_procs",
        "sysctl",
        "kcore",
        "mount",
        "init_module",
        "finit_module",
        "unshare_user",
        "api_socket",
    ] {
        let got = agent.reported(&inst.id, &format!("escape.{name}")).await;
        eprintln!("image escape.{name}: {got}");
        assert!(refused(&got), "escape.{name}: {got}");
    }
    assert_eq!(
        agent.reported(&inst.id, "escape.double_fork").await,
        "started"
    );
    // The instance's view: its root is the image, its /proc/kcore masked, /sys read-only,
    // its cgroup the root of the cgroup filesystem it sees.
    let root = format!("/proc/{}/root", inst.pid);
    assert!(std::path::Path::new(&format!("{root}/bin/corral-testbin")).is_file());
    assert!(
        !std::path::Path::new(&format!("{root}/usr/bin")).exists(),
        "nothing of the host's"
    );
    // The init's view: the instance's mount namespace as the init left it.
    let mounts =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", inst.init_pid)).expect("mountinfo");
    assert!(
        mount_at(&mounts, "/proc/keys").is_some(),
        "/proc/keys masked:\n{mounts}"
    );
    let sys = mount_at(&mounts, "/sys").expect("/sys mounted");
    assert!(read_only(sys), "/sys read-only: {sys}");
    let dev = mount_at(&mounts, "/dev").expect("/dev mounted");
    assert!(dev.contains(" - tmpfs "), "the minimal /dev: {dev}");
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).expect("ns");
    assert_ne!(
        ns(&inst.pid.to_string()),
        ns("self"),
        "its own cgroup namespace"
    );
    own_cgroup_view(&agent, "esc", &inst.id, inst.pid, inst.init_pid);
    sys_all_read_only(inst.init_pid);
    let seccomp = std::fs::read_to_string(format!("/proc/{}/status", inst.pid)).expect("status");
    assert!(
        seccomp
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
        "the seccomp filter: {seccomp}"
    );
    if userns {
        let map = std::fs::read_to_string(format!("/proc/{}/uid_map", inst.pid)).expect("uid_map");
        let fields: Vec<u32> = map
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        assert!(
            matches!(fields[..], [0, base, 65536] if base >= 65536),
            "root inside is not host root: {map}"
        );
        // The store's rootfs is shown idmapped: a file the image's uid N owns belongs to uid
        // N inside, the block's base + N on the host, never to an unmapped id.
        use std::os::unix::fs::MetadataExt;
        let stored = walk_for(&agent.state_dir.join("artifacts/images"), "corral-testbin");
        let on_disk = std::fs::metadata(stored.first().expect("the rootfs in the store"))
            .expect("stat")
            .uid();
        let seen = std::fs::metadata(format!("{root}/bin/corral-testbin"))
            .expect("stat")
            .uid();
        assert_eq!(
            seen,
            fields[1] + on_disk,
            "idmapped rootfs: on disk {on_disk}"
        );
    }

    // The API socket stays out of reach after the agent starts again.
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    let again = eventually(
        "the instance to try again",
        Duration::from_secs(20),
        || async {
            let pid = agent.get("esc").await.ok()?.instances.first()?.pid;
            // SAFETY: kill(2) on the instance's service process, found through the agent.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            tokio::time::sleep(Duration::from_millis(100)).await;
            agent.stdout_of(&inst.id).lines().find_map(|l| {
                l.strip_prefix("escape.api_socket_again=")
                    .map(str::to_string)
            })
        },
    )
    .await;
    assert!(
        refused(&again),
        "API socket after an agent restart: {again}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default(),
        core_pattern,
        "kernel.core_pattern"
    );
    let rel = instance_rel("esc", &inst.id);
    let pids = agent.cgroup.pids(&rel);
    assert!(
        !processes_named(&token).is_empty(),
        "the double-forked process runs before delete"
    );
    agent.delete("esc").await.expect("delete");
    eventually(
        "every process of the instance gone",
        Duration::from_secs(20),
        || async {
            (pids.iter().all(|p| !alive(*p)) && processes_named(&token).is_empty()).then_some(())
        },
    )
    .await;
}

/// `isolation.readonly_root` with `[image]`: no writable layer at all (no `upper/` in the
/// instance's layer directory), `/` read-only (a write to the image's `/data` is refused with
/// EROFS), the provided `/etc` files there, a private `/tmp` still writable.
pub async fn image_readonly_root() {
    let Some(busybox) = crate::oci::image::busybox() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = crate::oci::image::busybox_image(&busybox, "");
    let layout = dir.path().join("busybox.oci");
    image.write_dir(&layout);
    let agent = Agent::start().await;
    let spec = format!(
        r#"name = "ro"
command = ["/bin/sh", "-c", "(echo x > /data/w) 2>/tmp/err; echo data=$? > /tmp/out; echo t > /tmp/t && echo tmp=ok >> /tmp/out; cat /etc/hostname >> /tmp/out; exec sleep 600"]

[image]
url = "{}"
digest = "{}"

[isolation]
readonly_root = true
"#,
        layout.display(),
        image.manifest
    );
    agent.apply(&spec).await.expect("apply");
    let inst = agent.wait_running("ro", 1).await.remove(0);
    let root = format!("/proc/{}/root", inst.pid);
    let out = eventually("the checks written", Duration::from_secs(20), || async {
        std::fs::read_to_string(format!("{root}/tmp/out"))
            .ok()
            .filter(|o| o.lines().count() >= 3)
    })
    .await;
    assert!(out.contains("data=1") || out.contains("data=2"), "{out}");
    assert!(out.contains("tmp=ok"), "{out}");
    assert!(out.contains(&inst.id), "/etc/hostname: {out}");
    let err = std::fs::read_to_string(format!("{root}/tmp/err")).unwrap_or_default();
    assert!(err.contains("Read-only file system"), "{err}");
    let layer = agent.state_dir.join("run").join(&inst.id).join("image");
    assert!(layer.join("base").is_dir(), "{}", layer.display());
    assert!(!layer.join("upper").exists(), "no writable layer");
    let mounts =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", inst.init_pid)).expect("mountinfo");
    let rootline = mounts
        .lines()
        .find(|l| mount_point(l) == Some("/"))
        .expect("/ mounted");
    assert!(read_only(rootline), "/ read-only: {rootline}");
    agent.delete("ro").await.expect("delete");
}

/// The program headers' types of the ELF executable `bytes` (64-bit, little-endian) and its
/// `e_type`; `None` when it is not one.
fn elf_program_types(bytes: &[u8]) -> Option<(u16, Vec<u32>)> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    if bytes.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let e_type = u16_at(16)?;
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let (size, count) = (usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    let types = (0..count)
        .map(|i| u32_at(phoff + i * size))
        .collect::<Option<Vec<u32>>>()?;
    Some((e_type, types))
}

/// The per-instance init is the small `corral-init` executable, linked statically and
/// without PIE (no `PT_INTERP`, `ET_EXEC`), and it is what runs as each instance's init
/// with the default confinement: no dynamic loader or shared library is mapped in it, the
/// service runs under it, and what it keeps privately (anonymous and relocated pages: heap,
/// stack, data) stays within 128 KiB once the service has written its first output.
pub async fn init_is_static_and_small() {
    const PT_INTERP: u32 = 3;
    const ET_EXEC: u16 = 2;
    let init = crate::bin("corral-init");
    let bytes = std::fs::read(&init).expect("read corral-init");
    let (e_type, types) = elf_program_types(&bytes).expect("corral-init is a 64-bit ELF file");
    assert!(
        !types.contains(&PT_INTERP),
        "{} asks for a dynamic loader (PT_INTERP)",
        init.display()
    );
    assert_eq!(
        e_type,
        ET_EXEC,
        "{} is position-independent",
        init.display()
    );

    let agent = Agent::start().await;
    agent
        .apply(&spec("lean", 1, &["serve"], ""))
        .await
        .expect("apply");
    let inst = agent.wait_running("lean", 1).await.remove(0);
    assert_eq!(agent.reported(&inst.id, "ready").await, "1");
    let exe = std::fs::read_link(format!("/proc/{}/exe", inst.init_pid)).expect("init exe");
    assert_eq!(
        exe,
        init.canonicalize().expect("canonical corral-init"),
        "the instance's init is the corral-init executable"
    );
    assert_eq!(
        crate::parent_of(inst.pid),
        Some(inst.init_pid),
        "the service runs under the init"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", inst.init_pid)).expect("maps");
    let shared: Vec<&str> = maps.lines().filter(|l| l.contains(".so")).collect();
    assert!(
        shared.is_empty(),
        "shared objects mapped in the init: {shared:?}"
    );
    let rollup =
        std::fs::read_to_string(format!("/proc/{}/smaps_rollup", inst.init_pid)).expect("smaps");
    let anonymous: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Anonymous in smaps_rollup");
    // A release build keeps about 90 KiB (the dynamic PIE init kept about 215 KiB); a debug
    // build's larger stack frames add some.
    assert!(
        anonymous <= 128,
        "the init keeps {anonymous} KiB of private memory (at most 128 KiB):\n{rollup}"
    );
    // The init ignores SIGPIPE; the service must not inherit that (an ignored signal stays
    // ignored across exec): a write to a closed pipe kills it, as anywhere else.
    let ignored = |pid: i32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("SigIgn in status")
    };
    // (A Rust service ignores it itself: the check runs a C program.)
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    agent
        .apply("name = \"pipe\"\ncommand = [\"/bin/sleep\", \"1000\"]\n")
        .await
        .expect("apply");
    let sleeper = agent.wait_running("pipe", 1).await.remove(0);
    assert_ne!(
        ignored(sleeper.init_pid) & sigpipe,
        0,
        "the init ignores SIGPIPE"
    );
    assert_eq!(
        ignored(sleeper.pid) & sigpipe,
        0,
        "the service has SIGPIPE at its default, not ignored"
    );
    // The agent blocks every signal around the clone of an init (its child shares the
    // agent's memory until it executes); the child unblocks them before it executes, so
    // neither the init's signal mask nor the service's keeps them.
    let blocked = std::fs::read_to_string(format!("/proc/{}/status", sleeper.pid))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:").map(|v| v.trim().to_string()))
        .expect("SigBlk in status");
    assert_eq!(
        u64::from_str_radix(&blocked, 16).ok(),
        Some(0),
        "the service starts with no signal blocked"
    );
}

/// Instances' inits are forked by the agent's init zygote, not executed one by one: each is
/// still the agent's child running the `corral-init` executable, named after its instance
/// in its command line; killing the zygote loses no start (the agent starts a new one, and
/// the killed one does not stay a zombie).
pub async fn inits_come_from_the_zygote() {
    let agent = Agent::start().await;
    let agent_pid = agent.pid().expect("agent pid");
    agent
        .apply(&spec("zy", 2, &["serve"], ""))
        .await
        .expect("apply");
    let insts = agent.wait_running("zy", 2).await;
    let first = crate::init_zygotes(agent_pid);
    assert_eq!(first.len(), 1, "one zygote under the agent: {first:?}");
    for inst in &insts {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", inst.init_pid)).expect("cmdline");
        // One string, as setproctitle(3) makes it.
        assert_eq!(
            String::from_utf8_lossy(&cmdline),
            format!("corral-init {}\0", inst.id),
            "the init's command line names its instance"
        );
        assert_eq!(
            crate::parent_of(inst.init_pid),
            Some(agent_pid),
            "the init is the agent's child"
        );
        assert_eq!(agent.reported(&inst.id, "ready").await, "1");
    }

    kill9(first[0]);
    eventually(
        "the killed zygote reaped",
        Duration::from_secs(10),
        || async { (!std::path::Path::new(&format!("/proc/{}", first[0])).exists()).then_some(()) },
    )
    .await;
    agent
        .apply(&spec("zy", 4, &["serve"], ""))
        .await
        .expect("scale up");
    let insts = agent.wait_running("zy", 4).await;
    for inst in &insts {
        assert_eq!(agent.reported(&inst.id, "ready").await, "1");
    }
    let second = crate::init_zygotes(agent_pid);
    assert_eq!(second.len(), 1, "a new zygote: {second:?}");
    assert_ne!(second, first, "the killed zygote was replaced");
}
