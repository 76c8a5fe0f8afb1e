//! Attacks on the agent's resources and on what it owns, by real clients and real instances
//! against the real `corrald`: `Logs` calls over large logs (the agent's memory must not
//! follow the log size), `[[sockets]]` addresses aimed at live sockets and paths the agent
//! does not own, an unreadable service record, a second agent on the same cgroup tree, idle
//! TLS connections from one address, and the low ones (a failed instance record, a delete cut
//! short, accept failing with EMFILE, certificates without clientAuth, crafted subjects).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use corral_e2e::pki::{Ca, Pem};
use corral_e2e::{Agent, bin, eventually, free_port, skip_unless_root, testbin};

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

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The CLI over TLS as `identity`.
fn cli_tls(port: u16, ca: &Path, identity: &Pem, args: &[&str]) -> Command {
    let mut c = Command::new(bin("corral"));
    c.args(args)
        .env("CORRAL_ADDR", format!("https://localhost:{port}"))
        .env("CORRAL_TLS_CA", ca)
        .env("CORRAL_TLS_CERT", &identity.cert)
        .env("CORRAL_TLS_KEY", &identity.key)
        .stdin(Stdio::null());
    c
}

/// Six parallel `corral logs` over ~50 MB of logs (four instances, rotated files included)
/// with the `read` role: each gets every record, in time order, and the agent's peak memory
/// during the calls stays far below the size of the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_big_service_do_not_load_into_the_agent() {
    if skip_unless_root("logs_of_a_big_service_do_not_load_into_the_agent") {
        return;
    }
    const LINES: u64 = 100_000;
    const REPLICAS: u32 = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "corral-test");
    let server = ca.server("server");
    let read = ca.client("read", "dashboard", Some("read"));
    let port = free_port();
    let agent = Agent::start_tls("info", port, &server, &ca.cert).await;
    agent
        .apply(&spec(
            "flood",
            REPLICAS,
            &["flood", &LINES.to_string()],
            "[logs]\nmax_size = \"4MiB\"\nmax_files = 10\n",
        ))
        .await
        .expect("apply");
    let instances = agent.wait_running("flood", REPLICAS as usize).await;
    for i in &instances {
        eventually(
            &format!("{} to finish its flood", i.id),
            Duration::from_secs(120),
            || async { agent.stdout_of(&i.id).contains("flood_done=").then_some(()) },
        )
        .await;
    }
    let logs_bytes: u64 = instances
        .iter()
        .flat_map(|i| std::fs::read_dir(agent.state_dir.join("logs").join(&i.id)).expect("dir"))
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let rotated = std::fs::read_dir(agent.state_dir.join("logs").join(&instances[0].id))
        .expect("dir")
        .count();
    assert!(logs_bytes > 48 << 20, "{logs_bytes} bytes of logs");
    assert!(rotated > 3, "rotated files are part of it: {rotated} files");

    let pid = agent.pid().expect("agent pid");
    let before = status_kib(pid, "VmRSS");
    // Reset the peak so that VmHWM is the peak during the calls.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    let calls: Vec<_> = (0..6)
        .map(|_| {
            cli_tls(port, &ca.cert, &read, &["logs", "flood"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("corral logs")
        })
        .collect();
    let mut during = 0;
    let outputs: Vec<_> = std::thread::scope(|s| {
        let waiters: Vec<_> = calls
            .into_iter()
            .map(|c| s.spawn(move || c.wait_with_output().expect("wait")))
            .collect();
        while waiters.iter().any(|w| !w.is_finished()) {
            during = during.max(status_kib(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(20));
        }
        waiters
            .into_iter()
            .map(|w| w.join().expect("join"))
            .collect()
    });
    let peak = status_kib(pid, "VmHWM");
    let after = status_kib(pid, "VmRSS");
    eprintln!(
        "logs: {} MiB on disk; agent RSS before {before} KiB, during (sampled) {during} KiB, \
         peak {peak} KiB, after {after} KiB",
        logs_bytes >> 20
    );
    for out in &outputs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        // Every flood line of every instance, each instance's in order; all in time order.
        let mut next: std::collections::HashMap<&str, u64> = Default::default();
        let mut last_time = String::new();
        for line in text.lines() {
            let time = line.split(' ').next().unwrap_or_default();
            assert!(time >= last_time.as_str(), "out of time order: {line:?}");
            last_time = time.to_string();
            let mut words = line.split_whitespace();
            let inst = words.nth(1).unwrap_or_default();
            let Some(seq) = line
                .split("| seq=")
                .nth(1)
                .and_then(|s| s.get(..8))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let n = next.entry(inst).or_insert(0);
            assert_eq!(seq, *n, "{inst}: lines in order, none missing");
            *n += 1;
        }
        assert_eq!(next.len(), REPLICAS as usize);
        assert!(next.values().all(|&n| n == LINES), "{next:?}");
    }
    // Six calls over 50 MB of logs: the agent's peak stays far below the log size.
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 24 * 1024,
        "the agent grew by {grew} KiB during six Logs calls over {} MiB of logs",
        logs_bytes >> 20
    );
    // And the CLI still works after.
    let out = cli_tls(port, &ca.cert, &read, &["ls"])
        .output()
        .expect("ls");
    assert!(out.status.success());
}

fn unix_socket_spec(name: &str, listen: &Path) -> String {
    spec(
        name,
        1,
        &["serve"],
        &format!(
            "[[sockets]]\nname = \"api\"\nlisten = \"unix:{}\"\n",
            listen.display()
        ),
    )
}

fn identity(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).expect("stat");
    (m.dev(), m.ino())
}

/// `[[sockets]]` Unix addresses aimed at the agent's own API socket, at a path inside its
/// state directory, and at a socket another process listens on are refused with the reason,
/// and each of those keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_never_take_over_a_live_or_agent_owned_path() {
    if skip_unless_root("unix_sockets_never_take_over_a_live_or_agent_owned_path") {
        return;
    }
    let agent = Agent::start().await;
    let api = identity(&agent.socket);
    let inside_state = agent.state_dir.join("evil.sock");
    for (listen, says) in [
        (agent.socket.clone(), "agent's own"),
        (inside_state.clone(), "agent's own"),
    ] {
        let e = agent
            .apply(&unix_socket_spec("grab", &listen))
            .await
            .expect_err("an agent-owned path is refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("sockets[0].listen") && e.message().contains(says),
            "{}",
            e.message()
        );
    }
    assert!(!inside_state.exists());
    assert_eq!(identity(&agent.socket), api, "the API socket is untouched");
    let out = agent.cli(&["ls"]);
    assert!(out.status.success(), "the CLI still works: {out:?}");

    // A socket someone else listens on.
    let dir = tempfile::tempdir().expect("tempdir");
    let theirs = dir.path().join("theirs.sock");
    let listener = std::os::unix::net::UnixListener::bind(&theirs).expect("bind");
    let before = identity(&theirs);
    let e = agent
        .apply(&unix_socket_spec("grab", &theirs))
        .await
        .expect_err("a live socket is refused");
    assert!(
        e.message().contains("a process is listening"),
        "{}",
        e.message()
    );
    assert_eq!(identity(&theirs), before);
    let _c = std::os::unix::net::UnixStream::connect(&theirs).expect("still theirs");
    listener
        .accept()
        .expect("their listener gets the connection");

    // A stale one (nobody listens) is replaced.
    drop(listener);
    agent
        .apply(&unix_socket_spec("grab", &theirs))
        .await
        .expect("a stale socket file is replaced");
    agent.wait_running("grab", 1).await;
    std::os::unix::net::UnixStream::connect(&theirs).expect("the agent listens there now");
}

/// Delete removes the socket file the agent bound, and never one that replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_unlinks_only_the_socket_file_the_agent_bound() {
    if skip_unless_root("delete_unlinks_only_the_socket_file_the_agent_bound") {
        return;
    }
    let agent = Agent::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("svc.sock");

    // Its own: removed.
    agent
        .apply(&unix_socket_spec("mine", &path))
        .await
        .expect("apply");
    agent.wait_running("mine", 1).await;
    assert!(path.exists());
    agent.delete("mine").await.expect("delete");
    eventually("the socket file to go", Duration::from_secs(10), || async {
        (!path.exists()).then_some(())
    })
    .await;

    // Replaced by someone else's while the service ran: left alone.
    agent
        .apply(&unix_socket_spec("mine", &path))
        .await
        .expect("apply");
    agent.wait_running("mine", 1).await;
    std::fs::remove_file(&path).expect("unlink");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind theirs");
    let theirs = identity(&path);
    agent.delete("mine").await.expect("delete");
    eventually("the service to go", Duration::from_secs(10), || async {
        agent.get("mine").await.is_err().then_some(())
    })
    .await;
    // Give a wrong unlink every chance to happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(identity(&path), theirs, "their socket file is still there");
    let _c = std::os::unix::net::UnixStream::connect(&path).expect("still theirs");
    listener
        .accept()
        .expect("their listener gets the connection");
}

/// A truncated service record: the agent restarts, sets the file aside, keeps the instances
/// running (same PIDs, not stopped), reports it in Node and as an event; `corral apply` of
/// the spec repairs it, adopting the very same instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_service_record_is_quarantined_and_repaired_by_apply() {
    if skip_unless_root("an_unreadable_service_record_is_quarantined_and_repaired_by_apply") {
        return;
    }
    let mut agent = Agent::start().await;
    let toml = spec("keep", 2, &["serve"], "");
    agent.apply(&toml).await.expect("apply");
    agent
        .apply(&spec("other", 1, &["serve"], ""))
        .await
        .expect("apply");
    let mut pids: Vec<i32> = agent
        .wait_running("keep", 2)
        .await
        .iter()
        .map(|i| i.pid)
        .collect();
    pids.sort();
    let other = agent.wait_running("other", 1).await[0].pid;
    agent.stop_with(libc::SIGKILL);

    let record = agent.state_dir.join("state/services/keep.json");
    let bytes = std::fs::read(&record).expect("record");
    std::fs::write(&record, &bytes[..bytes.len() / 2]).expect("truncate");
    agent.launch().await;

    // Node reports it; the file is set aside, kept.
    let mut c = agent.client().await;
    let node = c
        .node(corral_e2e::pb::NodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert_eq!(node.quarantined.len(), 1, "{:?}", node.quarantined);
    assert!(
        node.quarantined[0].starts_with("keep: "),
        "{:?}",
        node.quarantined
    );
    let aside: Vec<_> = std::fs::read_dir(agent.state_dir.join("state/services"))
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("keep.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "the record is kept aside");
    let out = agent.cli(&["node"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("quarantined"),
        "{out:?}"
    );
    let out = agent.cli(&["events"]);
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events
            .lines()
            .any(|l| l.contains("keep") && l.contains("record_quarantined")),
        "{events}"
    );
    // Its instances were not stopped: wait as long as a stop would take, then look.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for pid in &pids {
        assert!(corral_e2e::alive(*pid), "instance pid {pid} still runs");
    }
    // The other service is taken over as usual.
    assert_eq!(agent.wait_running("other", 1).await[0].pid, other);

    // Apply repairs it, adopting the same processes.
    agent.apply(&toml).await.expect("apply repairs");
    let mut after: Vec<i32> = agent
        .wait_running("keep", 2)
        .await
        .iter()
        .map(|i| i.pid)
        .collect();
    after.sort();
    assert_eq!(after, pids, "the same instances, not restarted");
    let node = c
        .node(corral_e2e::pb::NodeRequest {})
        .await
        .expect("node")
        .into_inner();
    assert!(node.quarantined.is_empty(), "{:?}", node.quarantined);
    // And the repaired record survives another restart.
    agent.stop_with(libc::SIGKILL);
    agent.launch().await;
    let mut again: Vec<i32> = agent
        .wait_running("keep", 2)
        .await
        .iter()
        .map(|i| i.pid)
        .collect();
    again.sort();
    assert_eq!(again, pids);
}

/// utime + stime of `pid`, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Field 3 (state) is fields[0]: utime (14) and stime (15) are fields[11] and [12].
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_out_of_file_descriptors_does_not_spin() {
    if skip_unless_root("an_agent_out_of_file_descriptors_does_not_spin") {
        return;
    }
    let agent = Agent::start().await;
    let pid = agent.pid().expect("agent pid");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let was: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    let limit = open + 8;
    let set = |n: String| {
        let out = Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={n}"))
            .output()
            .expect("prlimit");
        assert!(out.status.success(), "{out:?}");
    };
    set(format!("{limit}:{}", was[1]));
    // Connections to the API socket past the limit: the agent's accepts fail with EMFILE
    // for as long as they wait in the backlog.
    let mut conns = Vec::new();
    for _ in 0..64 {
        conns.push(std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
        .max(1)
        .cast_unsigned();
    eprintln!("agent CPU over 3 s of refused accepts: {used} ticks ({hz} per second)");
    assert!(
        used * 10 < hz * 3,
        "the agent used {used} ticks in 3 s (over 10% of a core) while out of fds"
    );
    // Room again: the waiting connections are served, and new ones.
    drop(conns);
    set(format!("{}:{}", was[0], was[1]));
    eventually("served again", Duration::from_secs(30), || async {
        let mut c = corral_e2e::connect(&agent.socket).await.ok()?;
        c.list(corral_e2e::pb::ListRequest::default())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(agent.log_text().contains("accepting a connection failed"));
}
