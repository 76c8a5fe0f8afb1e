//! Instances outlive the agent: a restarted corrald takes them over unchanged, reports the
//! true end of those that ended while it was away, and is never fooled by a recycled PID.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_e2e::{
    Agent, alive, eventually, incarnation_of, kill9, payload, pb, skip_unless_root, testbin,
};

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

/// Start time of a process (field 22 of /proc/PID/stat).
fn start_time(pid: i32) -> Option<u64> {
    corral_e2e::stat_field(pid, 22)
}

/// (pid, init pid, start time of both, restarts) per instance id, for every service.
async fn snapshot(
    agent: &Agent,
    services: &[&str],
) -> BTreeMap<String, (i32, i32, Option<u64>, Option<u64>, u32)> {
    let mut out = BTreeMap::new();
    for s in services {
        for i in agent.get(s).await.expect("get").instances {
            out.insert(
                i.id.clone(),
                (
                    i.pid,
                    i.init_pid,
                    start_time(i.pid),
                    start_time(i.init_pid),
                    i.restarts,
                ),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_agent_leaves_20_instances_untouched() {
    if skip_unless_root("kill9_of_the_agent_leaves_20_instances_untouched") {
        return;
    }
    let mut agent = Agent::start().await;
    let services: [(&str, u32); 3] = [("alpha", 8), ("beta", 7), ("gamma", 5)];
    for (name, n) in services {
        agent
            .apply(&spec(
                name,
                n,
                &["serve"],
                "[resources]\nmemory = \"32MiB\"\n",
            ))
            .await
            .expect("apply");
    }
    for (name, n) in services {
        agent.wait_running(name, n as usize).await;
    }
    let names: Vec<&str> = services.iter().map(|(n, _)| *n).collect();
    let before = snapshot(&agent, &names).await;
    assert_eq!(before.len(), 20);
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    for (name, n) in services {
        agent.wait_running(name, n as usize).await;
    }
    let after = snapshot(&agent, &names).await;
    assert_eq!(
        after, before,
        "every instance keeps its PID, start time and restart count"
    );

    // The new agent supervises them: an update replaces every one of them.
    agent
        .apply(&spec(
            "gamma",
            5,
            &["serve"],
            "[resources]\nmemory = \"48MiB\"\n",
        ))
        .await
        .expect("update");
    let replaced = eventually(
        "gamma replaced by the new agent",
        Duration::from_secs(60),
        || async {
            let s = agent.get("gamma").await.ok()?;
            let done = s.instances.len() == 5
                && s.instances.iter().all(|i| {
                    i.revision == 2 && i.state == pb::InstanceState::Running as i32 && i.pid > 0
                });
            done.then_some(s.instances)
        },
    )
    .await;
    let old: Vec<i32> = before
        .iter()
        .filter(|(id, _)| id.starts_with("gamma-"))
        .map(|(_, (pid, ..))| *pid)
        .collect();
    assert_eq!(old.len(), 5);
    for i in &replaced {
        assert!(!old.contains(&i.pid), "{} is a new process", i.id);
    }
    for pid in old {
        eventually(
            "the old gamma instances stopped",
            Duration::from_secs(20),
            || async { (!alive(pid)).then_some(()) },
        )
        .await;
    }
    // ...and a kill is seen and handled.
    let (pid, ..) = after["alpha-3"];
    kill9(pid);
    eventually("alpha-3 replaced", Duration::from_secs(20), || async {
        let s = agent.get("alpha").await.ok()?;
        let i = s.instances.iter().find(|i| i.id == "alpha-3")?;
        (i.restarts == 1 && i.pid > 0 && i.pid != pid).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_while_the_agent_is_down_are_reported_as_they_happened() {
    if skip_unless_root("ends_while_the_agent_is_down_are_reported_as_they_happened") {
        return;
    }
    let mut agent = Agent::start().await;
    agent
        .apply(&spec(
            "away",
            4,
            &["serve-signals"],
            "[resources]\nmemory = \"64MiB\"\n[restart]\npolicy = \"on-failure\"\nbackoff = \"100ms\"\n",
        ))
        .await
        .expect("apply");
    let running = agent.wait_running("away", 4).await;
    let by_index: BTreeMap<u32, i32> = running.iter().map(|i| (i.index, i.pid)).collect();
    // Their handlers are in place once they say so: a USR1/USR2 before that would end them
    // by its default action instead.
    for i in 0..3 {
        agent.reported(&format!("away-{i}"), "ready").await;
    }
    agent.stop_with(libc::SIGKILL);
    // While no agent runs: exit code 3, an OOM kill, a SIGKILL from outside; away-3 stays.
    // SAFETY: signalling processes of the test's own instances.
    unsafe {
        libc::kill(by_index[&0], libc::SIGUSR1);
        libc::kill(by_index[&1], libc::SIGUSR2);
    }
    kill9(by_index[&2]);
    for i in 0..3 {
        let pid = by_index[&i];
        let what = format!("away-{i} (pid {pid}) to end");
        eventually(&what, Duration::from_secs(20), || async {
            (!alive(pid)).then_some(())
        })
        .await;
    }
    agent.launch().await;
    let s = eventually(
        "ends reported and replaced",
        Duration::from_secs(30),
        || async {
            let s = agent.get("away").await.ok()?;
            let ok = s.instances.iter().filter(|i| i.index < 3).all(|i| {
                i.restarts == 1 && i.state == pb::InstanceState::Running as i32 && i.pid > 0
            });
            ok.then_some(s)
        },
    )
    .await;
    let text = |idx: u32| {
        s.instances
            .iter()
            .find(|i| i.index == idx)
            .and_then(|i| i.last_exit.as_ref())
            .map(|e| e.text.clone())
            .unwrap_or_default()
    };
    assert_eq!(text(0), "exited(3)");
    assert_eq!(text(1), "oom_killed");
    assert_eq!(text(2), "signaled(9)");
    let untouched = s.instances.iter().find(|i| i.index == 3).expect("away-3");
    assert_eq!(
        (untouched.pid, untouched.restarts),
        (by_index[&3], 0),
        "the one that kept running was adopted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_pid_is_another_process_is_not_adopted() {
    if skip_unless_root("a_record_whose_pid_is_another_process_is_not_adopted") {
        return;
    }
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("reuse", 1, &["serve"], ""))
        .await
        .expect("apply");
    let first = agent.wait_running("reuse", 1).await.remove(0);
    agent.stop_with(libc::SIGKILL);
    // Make the record describe another process with the same PID: its start time differs.
    let record = agent.state_dir.join("state/instances/reuse-0.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("record")).expect("json");
    let t = json["state"]["start_time"].as_u64().expect("start_time");
    json["state"]["start_time"] = serde_json::json!(t + 12345);
    std::fs::write(&record, serde_json::to_vec(&json).expect("json")).expect("write record");
    agent.launch().await;
    let s = eventually("a replacement", Duration::from_secs(20), || async {
        let s = agent.get("reuse").await.ok()?;
        let i = s.instances.first()?.clone();
        (i.pid > 0 && i.pid != first.pid).then_some(i)
    })
    .await;
    let end = s.last_exit.expect("end");
    assert_eq!(end.text, "lost");
    assert!(end.detail.contains("another process"), "{}", end.detail);
    assert!(
        !alive(first.pid),
        "the unexplained process in the instance cgroup was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agent_restarts_change_nothing() {
    if skip_unless_root("fifty_agent_restarts_change_nothing") {
        return;
    }
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("steady", 3, &["serve"], "[resources]\npids = 16\n"))
        .await
        .expect("apply");
    agent.wait_running("steady", 3).await;
    let before = snapshot(&agent, &["steady"]).await;
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let files = |dir: &std::path::Path| walk(dir);
    // Each init reports the bytes it wrote (the services print `ready=1`) within a second:
    // its logstat.json is part of the steady state.
    eventually("the inits' log counts", Duration::from_secs(10), || async {
        (0..3)
            .all(|i| {
                agent
                    .state_dir
                    .join(format!("run/steady-{i}/logstat.json"))
                    .exists()
            })
            .then_some(())
    })
    .await;
    // Counted once the inits run their loops (they wrote their log counts): during setup an
    // init still holds the descriptors setup needed.
    let init_fds: Vec<usize> = before.values().map(|v| fds(v.1)).collect();
    let files_before = files(&agent.state_dir);
    let procs_before = agent.cgroup.pids("corral").len();
    for n in 0..50 {
        agent.stop_with(if n % 2 == 0 {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        });
        agent.launch().await;
    }
    agent.wait_running("steady", 3).await;
    assert_eq!(
        snapshot(&agent, &["steady"]).await,
        before,
        "no instance restarted"
    );
    // An init opens a file or two for a moment (its log counts, a rotation): a leak is a
    // count that stays above the one before.
    let settled = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if before.values().map(|v| fds(v.1)).collect::<Vec<_>>() == init_fds {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let open = |pid: i32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                format!("{}={}", e.file_name().to_string_lossy(), target.display())
            })
            .collect()
    };
    assert!(
        settled.is_ok(),
        "no fd leaked into the inits: {init_fds:?} before, now {:?}",
        before.values().map(|v| open(v.1)).collect::<Vec<_>>()
    );
    assert_eq!(
        agent.cgroup.pids("corral").len(),
        procs_before,
        "no process leaked"
    );
    let files_after = files(&agent.state_dir);
    assert_eq!(files_after, files_before, "no file left behind");
    let dirs = |rel: &str| {
        std::fs::read_dir(agent.cgroup.dir("memory", rel))
            .map(|d| {
                d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(dirs("corral/steady"), 3, "no cgroup leaked");
}

/// Every file below `dir`, relative, sorted (sockets and logs included).
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(
                    p.strip_prefix(dir)
                        .map(|r| r.display().to_string())
                        .unwrap_or_default(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Every line a fast writer produces is in the files, in order, across rotations and two
/// agent kills; with space available nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_lose_nothing_across_agent_kills_and_rotations() {
    if skip_unless_root("logs_lose_nothing_across_agent_kills_and_rotations") {
        return;
    }
    const LINES: u64 = 300_000;
    let mut agent = Agent::start().await;
    agent
        .apply(&spec(
            "flood",
            1,
            &["flood", &LINES.to_string()],
            "[logs]\nmax_size = \"1MiB\"\nmax_files = 100\n",
        ))
        .await
        .expect("apply");
    let inst = agent.wait_running("flood", 1).await.remove(0);
    let dir = agent.state_dir.join("logs").join(&inst.id);
    let logged = || -> u64 {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    for _ in 0..2 {
        agent.stop_with(libc::SIGKILL);
        // The init goes on writing while no agent runs (after the flood, its trickle).
        let before = logged();
        eventually(
            "the logs to grow without an agent",
            Duration::from_secs(30),
            || async { (logged() > before).then_some(()) },
        )
        .await;
        agent.launch().await;
    }
    eventually("the writer to finish", Duration::from_secs(120), || async {
        agent
            .stdout_of(&inst.id)
            .contains("flood_done=")
            .then_some(())
    })
    .await;
    let mut files: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(&dir)
        .expect("log dir")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = match name.strip_prefix("stdout.log") {
                Some("") => 0,
                Some(rest) => rest.strip_prefix('.')?.parse().ok()?,
                None => return None,
            };
            Some((n, e.path()))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0)); // oldest (highest number) first
    assert!(files.len() > 10, "the logs rotated: {} files", files.len());
    let mut next = 0u64;
    for (_, f) in &files {
        for line in std::fs::read_to_string(f).expect("read").lines() {
            let p = payload(line);
            assert_ne!(p, line, "every record is timestamped: {line:?}");
            if let Some(seq) = p
                .strip_prefix("seq=")
                .and_then(|s| s.get(..8))
                .and_then(|s| s.parse::<u64>().ok())
            {
                assert_eq!(seq, next, "lines in order, none missing");
                next += 1;
            }
        }
    }
    assert_eq!(next, LINES, "every line was written");
    let s = agent.get("flood").await.expect("get");
    assert_eq!(s.instances[0].log_lines_dropped, 0);
    assert_eq!(
        s.instances[0].pid, inst.pid,
        "the writer was never restarted"
    );
}

/// A full disk: output is dropped (the service never blocks), counted in status, and a
/// notice in the log says how much once there is space again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_output_and_says_so() {
    if skip_unless_root("a_full_disk_drops_output_and_says_so") {
        return;
    }
    let agent = Agent::start().await;
    let dir = agent.state_dir.join("logs").join("full-0");
    std::fs::create_dir_all(&dir).expect("log dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "corral-e2e-full"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP a_full_disk_drops_output_and_says_so: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.clone());
    agent
        .apply(&spec(
            "full",
            1,
            &["flood", "20000"],
            "[logs]\nmax_size = \"10MiB\"\n",
        ))
        .await
        .expect("apply");
    // Until the flood is over (it says so in its /tmp, which the full disk does not hold),
    // with drops counted: then only its trickle of ticks (one per 100 ms) is still dropped,
    // and once there is room again nothing more is.
    let dropped = eventually(
        "the flood to end, dropped",
        Duration::from_secs(30),
        || async {
            let s = agent.get("full").await.ok()?;
            let i = s.instances.first()?;
            let done = format!("/proc/{}/root/tmp/flood_done", i.pid);
            (i.pid > 0 && std::path::Path::new(&done).exists() && i.log_lines_dropped > 0)
                .then_some(i.log_lines_dropped)
        },
    )
    .await;
    // Make room (truncating frees tmpfs pages); the next tick brings the notice.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("stdout.log"))
        .expect("open")
        .set_len(0)
        .expect("truncate");
    let notice = eventually("the drop notice", Duration::from_secs(10), || async {
        std::fs::read_to_string(dir.join("stdout.log"))
            .ok()?
            .lines()
            .find(|l| l.contains("[corral-init]") && l.contains("dropped"))
            .map(str::to_string)
    })
    .await;
    let s = agent.get("full").await.expect("get");
    let total = s.instances[0].log_lines_dropped;
    assert!(total >= dropped);
    assert!(
        notice.contains(&format!("] {total} lines")),
        "notice {notice:?} vs status {total}"
    );
    assert!(notice.contains("No space left on device"), "{notice}");
    agent.delete("full").await.expect("delete");
}

/// The ticker's numbers among `corral logs` lines, split into its runs: it numbers its lines
/// from 0 in each run (its pid inside its own PID namespace is the same in both runs).
fn ticker_runs(lines: &[String]) -> Vec<Vec<u64>> {
    let seq = lines
        .iter()
        // `tick-0@<incarnation> out| tick=...`
        .filter(|l| l.contains(" tick-0@") && l.contains(" out| tick="))
        .filter_map(|l| l.rsplit_once('.').and_then(|(_, n)| n.trim().parse().ok()));
    let mut runs: Vec<Vec<u64>> = Vec::new();
    for n in seq {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|last| n > *last) => run.push(n),
            _ => runs.push(vec![n]),
        }
    }
    runs
}

/// `corral logs -f` keeps following across log rotations and an instance restart, with
/// stdout and stderr told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_survives_rotation_and_restart() {
    if skip_unless_root("logs_follow_survives_rotation_and_restart") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "tick",
            1,
            &["ticker", "5"],
            "[logs]\nmax_size = \"4KiB\"\nmax_files = 3\n[restart]\nbackoff = \"100ms\"\n",
        ))
        .await
        .expect("apply");
    let first = agent.wait_running("tick", 1).await.remove(0);
    let mut follow = std::process::Command::new(corral_e2e::bin("corral"))
        .args(["logs", "tick", "-f", "--tail", "0"])
        .env("CORRAL_ADDR", format!("unix://{}", agent.socket.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("corral logs -f");
    // What the follower printed, as it prints it.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        use std::io::BufRead;
        let out = follow.stdout.take().expect("piped stdout");
        let printed = printed.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                printed.lock().expect("lines").push(line);
            }
        })
    };
    let runs = || ticker_runs(&printed.lock().expect("lines"));
    let logs = agent.state_dir.join("logs").join("tick-0");
    // Several rotations (4 KiB files, ~30-byte records every 5 ms), then a restart.
    eventually(
        "the follower across rotations",
        Duration::from_secs(30),
        || async {
            let rotated = logs.join("stdout.log.2").exists();
            (rotated && runs().first().is_some_and(|r| r.len() > 150)).then_some(())
        },
    )
    .await;
    kill9(first.pid);
    eventually("a restart", Duration::from_secs(20), || async {
        let s = agent.get("tick").await.ok()?;
        let i = s.instances.first()?.clone();
        (i.restarts == 1 && i.pid > 0).then_some(i)
    })
    .await;
    eventually(
        "the follower after the restart",
        Duration::from_secs(30),
        || async { runs().get(1).is_some_and(|r| r.len() > 150).then_some(()) },
    )
    .await;
    // SAFETY: stopping the CLI we started.
    unsafe { libc::kill(follow.id().cast_signed(), libc::SIGINT) };
    let status = follow.wait().expect("logs -f ends");
    reader.join().expect("reader");
    assert!(status.success(), "logs -f ends 0 on Ctrl-C");
    let text = printed.lock().expect("lines").join("\n");
    let runs = ticker_runs(&printed.lock().expect("lines"));
    assert_eq!(
        runs.len(),
        2,
        "one run before the restart, one after: {:?}",
        runs.iter().map(Vec::len).collect::<Vec<_>>()
    );
    for (run, name) in runs.iter().zip(["before", "after"]) {
        assert!(
            run.len() > 100,
            "{name} the restart: {} lines followed",
            run.len()
        );
        assert!(
            run.windows(2).all(|w| w[1] == w[0] + 1),
            "{name} the restart: no line lost or repeated across rotations"
        );
    }
    let rotated = std::fs::read_dir(agent.state_dir.join("logs").join("tick-0"))
        .expect("logs")
        .count();
    assert!(rotated >= 4, "the logs rotated ({rotated} files)");
    assert!(
        text.lines()
            .any(|l| l.contains(" tick-0@") && l.contains(" err| errtick=")),
        "stderr is told apart"
    );
}

/// An adopted instance is probed by the new agent: its health is tracked and acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopted_instances_are_probed_again() {
    if skip_unless_root("adopted_instances_are_probed_again") {
        return;
    }
    let mut agent = Agent::start().await;
    agent
        .apply(&spec(
            "probed",
            1,
            &["health-server"],
            "[ports]\ntcp = \"auto\"\n[health]\ntcp = \"127.0.0.1:{port.tcp}\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nfailure_threshold = 2\nrestart_on_failure = false\n",
        ))
        .await
        .expect("apply");
    let health = |want: pb::HealthState| {
        let agent = &agent;
        async move {
            eventually(
                &format!("probed-0 {want:?}"),
                Duration::from_secs(30),
                || async {
                    let s = agent.get("probed").await.ok()?;
                    (s.instances.first()?.health() == want).then_some(())
                },
            )
            .await
        }
    };
    health(pb::HealthState::Healthy).await;
    let before = agent.get("probed").await.expect("get").instances[0].pid;
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    let health = |want: pb::HealthState| {
        let agent = &agent;
        async move {
            eventually(
                &format!("probed-0 {want:?}"),
                Duration::from_secs(30),
                || async {
                    let s = agent.get("probed").await.ok()?;
                    (s.instances.first()?.health() == want).then_some(())
                },
            )
            .await
        }
    };
    health(pb::HealthState::Healthy).await;
    assert_eq!(
        agent.get("probed").await.expect("get").instances[0].pid,
        before,
        "adopted, not restarted"
    );
    let out = agent.cli(&["signal", "probed-0", "USR1"]);
    assert!(out.status.success());
    health(pb::HealthState::Unhealthy).await;
    let s = agent.get("probed").await.expect("get");
    assert!(
        s.instances[0].health_reason.contains("refused"),
        "{}",
        s.instances[0].health_reason
    );
}

/// Every event about `instance` from the start of the log.
async fn events_of(agent: &Agent, instance: &str) -> Vec<pb::Event> {
    let mut client = agent.client().await;
    let mut w = client
        .watch(pb::WatchRequest {
            instance: instance.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = w.message().await.expect("watch stream") {
        if e.r#type != pb::EventType::Bookmark as i32 {
            out.push(e);
        }
    }
    out
}

/// The incarnations of the events of one type.
fn runs_of(events: &[pb::Event], kind: pb::EventType) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.r#type == kind as i32)
        .map(|e| e.incarnation)
        .collect()
}

/// Each run of an instance has its own id, in status, in every event about it and on every
/// log line it wrote: a crash and restart gets a new one, an agent restart keeps it, and a
/// service deleted and created again under the same name never reuses one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_has_its_own_incarnation_id_in_status_events_and_logs() {
    if skip_unless_root("every_run_has_its_own_incarnation_id_in_status_events_and_logs") {
        return;
    }
    let mut agent = Agent::start().await;
    let toml = spec("inc", 1, &["serve"], "");
    agent.apply(&toml).await.expect("apply");
    let first = agent.wait_running("inc", 1).await.remove(0);
    assert_ne!(first.incarnation, 0, "a running instance has an id");
    // Its "ready" line is on file, tagged with its id.
    eventually("the first run's line", Duration::from_secs(20), || async {
        agent.stdout_of("inc-0").contains("ready=1").then_some(())
    })
    .await;

    // kill -9 of the service's process: the slot restarts it as a new run.
    kill9(first.pid);
    let second = eventually("the restarted run", Duration::from_secs(60), || async {
        let s = agent.get("inc").await.ok()?;
        let i = s.instances.into_iter().next()?;
        (i.state == pb::InstanceState::Running as i32 && i.pid > 0 && i.pid != first.pid)
            .then_some(i)
    })
    .await;
    assert_ne!(second.incarnation, 0);
    assert_ne!(
        second.incarnation, first.incarnation,
        "a new run has a new id"
    );

    // The log file: each run's line under its own id.
    let raw = eventually("both runs' lines", Duration::from_secs(20), || async {
        let raw = std::fs::read_to_string(agent.state_dir.join("logs/inc-0/stdout.log")).ok()?;
        (raw.matches("ready=1").count() == 2).then_some(raw)
    })
    .await;
    let tagged: Vec<Option<u64>> = raw
        .lines()
        .filter(|l| payload(l) == "ready=1")
        .map(incarnation_of)
        .collect();
    assert_eq!(
        tagged,
        vec![Some(first.incarnation), Some(second.incarnation)],
        "{raw}"
    );

    // The Logs RPC tells the two runs' lines apart.
    let mut client = agent.client().await;
    let mut lines = client
        .logs(pb::LogsRequest {
            service: "inc".into(),
            ..Default::default()
        })
        .await
        .expect("logs")
        .into_inner();
    let mut runs = Vec::new();
    while let Some(l) = lines.message().await.expect("logs stream") {
        if l.text == "ready=1" {
            runs.push(l.incarnation);
        }
    }
    assert_eq!(runs, vec![first.incarnation, second.incarnation]);

    // And so does `corral logs`.
    let out = agent.cli(&["logs", "inc"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for run in [first.incarnation, second.incarnation] {
        let tag = format!("inc-0@{run:016x} out| ready=1");
        assert_eq!(text.matches(&tag).count(), 1, "{tag:?} in:\n{text}");
    }

    // Events: the first run started and was killed, the second started; each under its id.
    let events = events_of(&agent, "inc-0").await;
    assert_eq!(
        runs_of(&events, pb::EventType::InstanceStarted),
        vec![first.incarnation, second.incarnation],
        "{events:#?}"
    );
    assert_eq!(
        runs_of(&events, pb::EventType::InstanceExited),
        vec![first.incarnation],
        "{events:#?}"
    );
    assert!(
        events.iter().all(|e| e.incarnation != 0),
        "every instance event names its run: {events:#?}"
    );

    // An agent restart adopts the second run under the same id.
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    let adopted = agent.wait_running("inc", 1).await.remove(0);
    assert_eq!(
        (adopted.pid, adopted.incarnation),
        (second.pid, second.incarnation)
    );
    let events = events_of(&agent, "inc-0").await;
    assert_eq!(
        runs_of(&events, pb::EventType::Adopted),
        vec![second.incarnation]
    );

    // Deleted and created again: the same name, a new id.
    agent.delete("inc").await.expect("delete");
    eventually("inc gone", Duration::from_secs(30), || async {
        agent.get("inc").await.is_err().then_some(())
    })
    .await;
    agent.apply(&toml).await.expect("apply again");
    let again = agent.wait_running("inc", 1).await.remove(0);
    assert!(
        ![0, first.incarnation, second.incarnation].contains(&again.incarnation),
        "{again:?}"
    );
}

/// The agent killed in the middle of an apply, once the first of its instances is in its
/// cgroup and (most likely) before the answer: the desired state is in place (perhaps not yet
/// fsynced). The restarted agent has the service and runs its three instances; every process
/// of the killed agent's spawns is one of them or gone, and nothing else runs in its cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_agent_during_an_apply_keeps_or_cleans_what_it_started() {
    if skip_unless_root("kill9_of_the_agent_during_an_apply_keeps_or_cleans_what_it_started") {
        return;
    }
    let mut agent = Agent::start().await;
    let mut client = agent.client().await;
    let request = pb::ApplyRequest {
        source: Some(pb::apply_request::Source::SpecToml(spec(
            "mid",
            3,
            &["serve"],
            "",
        ))),
        ..Default::default()
    };
    let call = tokio::spawn(async move { client.apply(request).await.is_ok() });
    let seen = eventually(
        "a process in the service's cgroup",
        Duration::from_secs(20),
        || async {
            let pids = agent.cgroup.pids("corral/mid");
            (!pids.is_empty()).then_some(pids)
        },
    )
    .await;
    agent.stop_with(libc::SIGKILL);
    let answered = call.await.unwrap_or(false);
    let seen_after = agent.cgroup.pids("corral/mid");
    eprintln!(
        "killed with {} processes in the cgroup, answered: {answered}",
        seen.len()
    );
    agent.launch().await;
    let running = agent.wait_running("mid", 3).await;
    let ours: Vec<i32> = running.iter().flat_map(|i| [i.pid, i.init_pid]).collect();
    eventually(
        "only the three instances in the cgroup",
        Duration::from_secs(20),
        || async {
            let mut now = agent.cgroup.pids("corral/mid");
            now.retain(|p| !ours.contains(p));
            now.is_empty().then_some(())
        },
    )
    .await;
    for pid in seen.iter().chain(&seen_after) {
        assert!(
            ours.contains(pid) || !alive(*pid),
            "pid {pid} of the killed agent's spawns is neither adopted nor gone"
        );
    }
}

/// The agent is killed (-9) in the middle of a Delete: the service's record is gone, its
/// instances (which ignore SIGTERM, with a grace period) still run. The next agent finishes
/// the delete: no process, cgroup, record, log or socket of the service is left, nothing of
/// it is adopted, and applying the name again starts a service from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_short_by_kill9_is_finished_at_the_next_start() {
    if skip_unless_root("a_delete_cut_short_by_kill9_is_finished_at_the_next_start") {
        return;
    }
    let mut agent = Agent::start().await;
    let sockets = tempfile::tempdir().expect("tempdir");
    let socket = sockets.path().join("doomed.sock");
    let extra = format!(
        "[stop]\ngrace = \"5s\"\n[[sockets]]\nname = \"http\"\nlisten = \"unix:{}\"\n",
        socket.display()
    );
    agent
        .apply(&spec("doomed", 3, &["ignore-term"], &extra))
        .await
        .expect("apply");
    let running = agent.wait_running("doomed", 3).await;
    // Running means started; the SIGTERM handler is in place only once it says so.
    for i in &running {
        agent.wait_printed(&i.id, "ready").await;
    }
    let pids: Vec<i32> = running.iter().flat_map(|i| [i.pid, i.init_pid]).collect();
    let state = agent.state_dir.clone();
    let leftovers = |agent: &Agent| {
        let mut found: Vec<String> = Vec::new();
        for i in 0..3 {
            for path in [
                state.join(format!("instances/doomed-{i}.json")),
                state.join(format!("logs/doomed-{i}")),
            ] {
                if path.exists() {
                    found.push(path.display().to_string());
                }
            }
        }
        for path in [
            state.join("services/doomed.json"),
            state.join("deleting/doomed.json"),
            socket.clone(),
        ] {
            if path.exists() {
                found.push(path.display().to_string());
            }
        }
        if agent.cgroup.exists("doomed") {
            found.push("the cgroup doomed".to_string());
        }
        found.extend(
            pids.iter()
                .filter(|p| alive(**p))
                .map(|p| format!("pid {p}")),
        );
        found
    };
    assert!(socket.exists() && state.join("logs/doomed-0").exists());

    // The delete begins; the instances ignore their SIGTERM, so it waits out their grace.
    let mut client = agent.client().await;
    let deleting = tokio::spawn(async move {
        client
            .delete(pb::DeleteRequest {
                name: "doomed".into(),
                ..Default::default()
            })
            .await
    });
    eventually("the delete to begin", Duration::from_secs(10), || async {
        let s = agent.get("doomed").await.ok()?;
        s.deleting.then_some(())
    })
    .await;
    assert!(
        !state.join("services/doomed.json").exists(),
        "the record goes first"
    );
    agent.stop_with(libc::SIGKILL);
    assert!(
        deleting.await.expect("join").is_err(),
        "the delete never answered"
    );
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the kill landed inside the delete: every instance still ran"
    );

    agent.launch().await;
    // Its instances are taken over only to be stopped: the service is never live again.
    if let Ok(s) = agent.get("doomed").await {
        assert!(s.deleting, "restored as being deleted: {s:?}");
    }
    let left = eventually(
        "the delete finished by the next agent",
        Duration::from_secs(30),
        || async {
            let left = leftovers(&agent);
            left.is_empty().then_some(left)
        },
    )
    .await;
    assert!(left.is_empty());
    let err = agent.get("doomed").await.expect_err("deleted");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

    // The name again: a new service, its own instances, fresh logs and records.
    agent
        .apply(&spec("doomed", 2, &["serve"], ""))
        .await
        .expect("apply again");
    let again = agent.wait_running("doomed", 2).await;
    for i in &again {
        assert!(!pids.contains(&i.pid), "{} is a new process", i.id);
        assert_eq!(i.restarts, 0, "{}", i.id);
    }
    let s = agent.get("doomed").await.expect("get");
    assert_eq!(s.instances.len(), 2, "no instance of the deleted service");
    eventually(
        "the new instance's ready line",
        Duration::from_secs(10),
        || async { (agent.stdout_of("doomed-0").lines().count() == 1).then_some(()) },
    )
    .await;
    agent.delete("doomed").await.expect("delete");
}

/// The agent's instance records on a full filesystem (a small tmpfs over the records'
/// directory): an instance crashes and is started again, its new record cannot be saved, and
/// the agent says so (event, log line, `corral node`); once there is room the record is saved
/// without anything else happening, and an agent killed (-9) afterwards adopts the running
/// instance instead of taking it for lost and starting another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_unsaved_on_a_full_disk_is_saved_once_there_is_room() {
    if skip_unless_root("a_record_unsaved_on_a_full_disk_is_saved_once_there_is_room") {
        return;
    }
    let mut agent = Agent::start().await;
    let records = agent.state_dir.join("state").join("instances");
    std::fs::create_dir_all(&records).expect("records dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "corral-e2e-records"])
        .arg(&records)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP a_record_unsaved_on_a_full_disk_is_saved_once_there_is_room: no tmpfs");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(records.clone());
    agent
        .apply(&spec(
            "tight",
            1,
            &["serve"],
            "[restart]\nbackoff = \"100ms\"\n",
        ))
        .await
        .expect("apply");
    let first = agent.wait_running("tight", 1).await[0].pid;
    let record = records.join("tight-0.json");
    eventually("the first record", Duration::from_secs(10), || async {
        record.exists().then_some(())
    })
    .await;

    // Fill the filesystem with files the store does not list (no `.json`): large writes,
    // then small ones (tmpfs may allocate more than a page for a large write), then one-byte
    // files for the pages left.
    let fillers = records.join("fillers");
    std::fs::create_dir(&fillers).expect("fillers dir");
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(fillers.join("big")).expect("filler");
        for size in [65536, 4096, 512, 1] {
            let chunk = vec![0u8; size];
            while filler.write_all(&chunk).is_ok() {}
        }
        let mut failed = 0;
        for n in 0..5000 {
            let small = fillers.join(format!("small-{n}"));
            if std::fs::write(&small, b"x").is_err() {
                failed += 1;
                if failed == 20 {
                    break;
                }
            }
        }
    }
    assert!(
        std::fs::write(fillers.join("probe"), [0u8; 300]).is_err(),
        "the filesystem is full"
    );
    kill9(first);
    let (second, init) = eventually("tight-0 started again", Duration::from_secs(20), || async {
        let s = agent.get("tight").await.ok()?;
        let i = s.instances.first()?;
        (i.restarts == 1 && i.pid > 0 && i.pid != first).then_some((i.pid, i.init_pid))
    })
    .await;
    let node = eventually("corral node to say so", Duration::from_secs(10), || async {
        let out = agent.cli(&["node"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.starts_with("unsaved:"))
            .map(str::to_string)
    })
    .await;
    assert!(node.contains("1 instance record(s) since"), "{node}");
    assert!(
        std::fs::read_to_string(&record).is_ok_and(|r| !r.contains(&format!("\"pid\":{init}"))),
        "the record still names the earlier run"
    );
    let unsaved = runs_of(
        &events_of(&agent, "tight-0").await,
        pb::EventType::RecordUnsaved,
    );
    assert!(!unsaved.is_empty(), "a record_unsaved event");
    assert!(
        agent.log_text().contains("cannot save the instance record"),
        "a log line"
    );

    // Still full after a few retries (0.5 s, then 1 s apart): still unsaved.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let out = agent.cli(&["node"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unsaved:"),
        "not saved while the disk is full"
    );

    // Room again: saved at a retry, with nothing else to trigger it.
    std::fs::remove_dir_all(&fillers).expect("free");
    eventually("the record saved", Duration::from_secs(30), || async {
        let saved = std::fs::read_to_string(&record).ok()?;
        saved.contains(&format!("\"pid\":{init}")).then_some(())
    })
    .await;
    eventually("corral node cleared", Duration::from_secs(10), || async {
        let out = agent.cli(&["node"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && !text.contains("unsaved:")).then_some(())
    })
    .await;

    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    let after = agent.wait_running("tight", 1).await;
    assert_eq!(after.len(), 1, "not duplicated");
    assert_eq!((after[0].pid, after[0].restarts), (second, 1), "adopted");
    assert!(alive(second));
    assert!(
        agent
            .log_text()
            .contains("adopted a running instance instance=tight-0 pid="),
        "adopted, not taken for lost"
    );
    agent.delete("tight").await.expect("delete");
}
