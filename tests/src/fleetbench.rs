//! `corral-bench fleet`: the fleet on a real etcd (Debian's etcd-server).
//!
//! 1. **Apply → running**: three agents as three hosts (each in its own network namespace,
//!    etcd in the bridge namespace, as in the fleet tests). Per round, `corral apply` of a spec
//!    on one agent (local) until its instance has executed, then `corral fleet apply
//!    --selector` of the same spec (another name) placed on all three until each host's
//!    instance has executed. Every instance runs `corral-testbin signal-fifo FIFO`, which
//!    writes one byte once the service process runs (in its cgroup and namespaces): the bytes'
//!    arrival times are the figures, with no polling.
//! 2. **etcd requests per idle agent**: the three agents, each running that service, left idle;
//!    etcd's `grpc_server_msg_received_total` by method scraped from its `/metrics` before and
//!    after, the lease keep-alive apart, per agent and second (nothing else talks to etcd in
//!    that window: the scrapes are plain HTTP).
//! 3. **A simulated fleet**: N real corrald processes (`--node simN`, each with its own state
//!    directory and cgroup parent and no services) against one etcd on loopback. Registration
//!    of all N, the watch fan-out of one `corral fleet apply --selector` of a `replicas = 0`
//!    spec to all of them (time until every node's status key says applied), etcd's CPU and
//!    RSS in each phase and at rest, and etcd requests per second at rest.
//!
//! Sizes from the environment: `CORRAL_FLEETBENCH_AGENTS` (default 200),
//! `CORRAL_FLEETBENCH_IDLE_SECS` (default 60). Everything started is stopped by PID; network
//! namespaces, state directories and cgroups are removed at the end, also on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_fleet::etcd_client::{Client, EventType, WatchOptions};

use crate::etcd::Etcd;
use crate::fifo::Fifo;
use crate::netns::{self, Net};
use crate::rollbench::cpu_time;
use crate::{Agent, eventually, pss_kib, rss_kib, testbin};

/// The stream etcd counts keep-alives on: the lease, apart from every other request.
const KEEPALIVE: &str = "LeaseKeepAlive";
/// Bound of every wait in the benchmark.
const WAIT: Duration = Duration::from_secs(120);

/// The benchmark's sizes.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Rounds of the apply → running comparison.
    pub rounds: usize,
    /// Simulated agents.
    pub agents: usize,
    /// Length of each idle window.
    pub idle: Duration,
}

impl Config {
    /// From `CORRAL_FLEETBENCH_AGENTS` and `CORRAL_FLEETBENCH_IDLE_SECS`.
    pub fn from_env(rounds: usize) -> Config {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Config {
            rounds: rounds.max(1),
            agents: usize::try_from(num("CORRAL_FLEETBENCH_AGENTS", 200).max(1)).unwrap_or(200),
            idle: Duration::from_secs(num("CORRAL_FLEETBENCH_IDLE_SECS", 60).max(1)),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn line(name: &str, v: &[Duration]) {
    let mut s = v.to_vec();
    s.sort();
    println!(
        "fleet {name:<44} median {:>10}  min {:>10}  max {:>10}  (n={})",
        ms(median(v.to_vec())),
        ms(s.first().copied().unwrap_or_default()),
        ms(s.last().copied().unwrap_or_default()),
        v.len()
    );
}

/// A directory for the FIFOs and spec files, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spec(name: &str, fifo: &Path) -> String {
    format!(
        "name = \"{name}\"\ncommand = [{:?}, \"signal-fifo\", {:?}]\nreplicas = 1\n[resources]\ncpu = 0.1\nmemory = \"64MiB\"\npids = 64\n[stop]\ngrace = \"2s\"\n",
        testbin(),
        fifo.display().to_string()
    )
}

/// etcd's `/metrics` at `endpoint` (`http://IP:PORT`), fetched from network namespace
/// `netns` when given (from a thread that joins it, so the process stays where it is).
pub fn scrape(endpoint: &str, netns: Option<&str>) -> String {
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let netns = netns.map(str::to_string);
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        let mut s = std::net::TcpStream::connect(&addr).expect("connect to etcd's /metrics");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read /metrics");
        text
    })
    .join()
    .expect("scrape thread")
}

/// `grpc_server_msg_received_total` by gRPC method: every request, and every message of a
/// stream (each keep-alive, each watch created).
pub fn received_by_method(metrics: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(method) = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("grpc_method=\""))
            .map(|v| v.trim_end_matches('"'))
        else {
            continue;
        };
        *m.entry(method.to_string()).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    m
}

/// What changed between two scrapes, by method (only methods that moved).
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// Requests per agent and second over `window`, the lease's keep-alives apart; printed by method.
fn idle_rate(what: &str, d: &BTreeMap<String, f64>, agents: usize, window: Duration) -> (f64, f64) {
    // `+ 0.0`: an empty sum is -0.0.
    let per = |n: f64| n / agents as f64 / window.as_secs_f64() + 0.0;
    let keepalive = d.get(KEEPALIVE).copied().unwrap_or(0.0);
    let other: f64 = d
        .iter()
        .filter(|(k, _)| k.as_str() != KEEPALIVE)
        .map(|(_, v)| v)
        .sum();
    let methods: Vec<String> = d.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "fleet {what}: {:.3} requests/s per agent besides the lease (target <= 0.2), keep-alives {:.3}/s per agent; {} agents, {:.0} s; by method: {}",
        per(other),
        per(keepalive),
        agents,
        window.as_secs_f64(),
        if methods.is_empty() {
            "none".to_string()
        } else {
            methods.join(" ")
        }
    );
    (per(other), per(keepalive))
}

/// Every process the benchmark started, printed so that a caller can check they are gone.
fn report_pids(pids: impl IntoIterator<Item = i32>) {
    let pids: Vec<String> = pids.into_iter().map(|p| p.to_string()).collect();
    println!("fleet pids: {}", pids.join(" "));
}

/// All three parts with `cfg`.
pub async fn bench(cfg: Config) {
    let scratch = Scratch(PathBuf::from(format!(
        "/var/tmp/corral-fleetbench-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&scratch.0).expect("bench dir");
    if crate::etcd::skip_unless_etcd("corral-bench fleet")
        || netns::skip_unless_netns("corral-bench fleet")
    {
        return;
    }
    println!("fleet load average at start: {}", load_average());
    three_hosts(&cfg, &scratch.0).await;
    simulated(&cfg).await;
    println!("fleet load average at end: {}", load_average());
    println!("fleet cleaned up");
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Parts 1 and 2: three hosts in network namespaces.
async fn three_hosts(cfg: &Config, dir: &Path) {
    let net = Net::new(3);
    let etcd = Etcd::cluster(netns::BRIDGE_IP, 1, Some(net.bridge()), None);
    let hosts = etcd.start_hosts(&net, 3, "warn", "bench=1").await;
    let (ok, _, err) = etcd.nodes_registered(3, WAIT).await;
    assert!(ok, "{err}");

    let mut local_fifo = Fifo::new(dir, "local");
    let mut fleet_fifo = Fifo::new(dir, "fleet");
    let local_file = dir.join("local.toml");
    std::fs::write(&local_file, spec("local", &local_fifo.path)).expect("write spec");
    let fleet_spec = spec("fleet", &fleet_fifo.path);
    let mut one_fifo = Fifo::new(dir, "one");
    let one_spec = spec("one", &one_fifo.path);
    let fsync_before = fsync(&scrape(etcd.endpoint(0), Some(net.bridge())));
    let local_path = local_file.display().to_string();
    let (mut local, mut one, mut first, mut last, mut cli) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..cfg.rounds {
        // Local: `corral apply` on host 0 until its instance runs.
        let socket = hosts[0].socket.clone();
        let path = local_path.clone();
        let t = Instant::now();
        let run = tokio::task::spawn_blocking(move || {
            std::process::Command::new(crate::bin("corral"))
                .args(["apply", "-f", &path])
                .env("CORRAL_ADDR", format!("unix://{}", socket.display()))
                .stdin(std::process::Stdio::null())
                .output()
                .expect("corral apply")
        });
        let at = local_fifo.arrivals(1, WAIT).await;
        let out = run.await.expect("apply task");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        local.push(at[0] - t);
        let out = hosts[0].cli(&["delete", "local"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        gone(&hosts[..1], "local").await;

        // Fleet, one host: `corral fleet apply --node h0`, the fleet's path alone.
        let t = Instant::now();
        let (at, _) = fleet_apply(&etcd, &["--node", "h0"], &one_spec, &mut one_fifo, 1).await;
        one.push(at[0] - t);
        let (ok, out, err) = etcd.fleet_cli(&["delete", "one"], None);
        assert!(ok, "{out}{err}");
        gone(&hosts[..1], "one").await;

        // Fleet, three hosts: `corral fleet apply --selector` onto all three.
        let t = Instant::now();
        let (at, took) = fleet_apply(
            &etcd,
            &["--selector", "bench=1"],
            &fleet_spec,
            &mut fleet_fifo,
            3,
        )
        .await;
        first.push(at[0] - t);
        last.push(at[2] - t);
        cli.push(took);
        let (ok, out, err) = etcd.fleet_cli(&["delete", "fleet"], None);
        assert!(ok, "{out}{err}");
        gone(&hosts, "fleet").await;
    }
    let fsync_after = fsync(&scrape(etcd.endpoint(0), Some(net.bridge())));
    line("local corral apply -> running", &local);
    line("fleet apply --node h0 -> running", &one);
    line("fleet apply -> running, first host", &first);
    line("fleet apply -> running, all 3 hosts", &last);
    line("corral fleet apply (the CLI) returned", &cli);
    let (syncs, secs) = (
        fsync_after.0 - fsync_before.0,
        fsync_after.1 - fsync_before.1,
    );
    println!(
        "fleet etcd WAL fsyncs meanwhile: {syncs:.0}, mean {:.2} ms (each write the fleet makes waits for one)",
        1e3 * secs / syncs.max(1.0)
    );
    let over = median(last.clone()).saturating_sub(median(local.clone()));
    println!(
        "fleet apply -> running on 3 hosts exceeds local apply by {} at the median (target <= 50 ms)",
        ms(over)
    );

    // Part 2: the hosts idle, each running the service.
    let (ok, out, err) = etcd.fleet_cli(
        &["apply", "-f", "-", "--selector", "bench=1"],
        Some(&fleet_spec),
    );
    assert!(ok, "{out}{err}");
    fleet_fifo.arrivals(3, WAIT).await;
    // Let the status keys and node records settle (running, healthy, committed).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = received_by_method(&scrape(etcd.endpoint(0), Some(net.bridge())));
    tokio::time::sleep(cfg.idle).await;
    let after = received_by_method(&scrape(etcd.endpoint(0), Some(net.bridge())));
    idle_rate(
        "idle 3 hosts (one service each)",
        &delta(&before, &after),
        3,
        cfg.idle,
    );
    report_pids(
        hosts
            .iter()
            .filter_map(Agent::pid)
            .chain(etcd.pid(0))
            .collect::<Vec<_>>(),
    );
}

/// `corral fleet apply -f - ARGS` of `text` until `n` instances signalled on `fifo`: each
/// one's arrival time, and how long the CLI took.
async fn fleet_apply(
    etcd: &Etcd,
    args: &[&str],
    text: &str,
    fifo: &mut Fifo,
    n: usize,
) -> (Vec<Instant>, Duration) {
    let t = Instant::now();
    let mut cmd = etcd.fleet_command(&[&["apply", "-f", "-"], args].concat());
    let text = text.to_string();
    let run = tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run corral fleet apply");
        if let Some(mut input) = child.stdin.take() {
            input.write_all(text.as_bytes()).expect("write stdin");
        }
        let out = child.wait_with_output().expect("corral fleet apply");
        (out, t.elapsed())
    });
    let at = fifo.arrivals(n, WAIT).await;
    let (out, took) = run.await.expect("fleet apply task");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (at, took)
}

/// etcd's WAL fsyncs so far: (count, seconds in all).
fn fsync(metrics: &str) -> (f64, f64) {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("etcd_disk_wal_fsync_duration_seconds_count "),
        value("etcd_disk_wal_fsync_duration_seconds_sum "),
    )
}

/// Waits until none of `agents` has service `name`.
async fn gone(agents: &[Agent], name: &str) {
    for a in agents {
        eventually(&format!("{name} removed"), WAIT, || async {
            a.get(name).await.err().map(|_| ())
        })
        .await;
    }
}

/// The events under a prefix, with their arrival times, from one watch.
type Seen = Arc<Mutex<Vec<(Instant, String, Vec<u8>)>>>;

async fn watch_all(endpoint: &str, prefix: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let mut client = Client::connect([endpoint], None)
        .await
        .expect("etcd client");
    let mut stream = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(Some(resp)) = stream.message().await {
            let now = Instant::now();
            let mut s = s.lock().expect("events");
            for e in resp.events() {
                if let (Some(kv), EventType::Put) = (e.kv(), e.event_type()) {
                    s.push((
                        now,
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    ));
                }
            }
        }
    });
    (seen, task)
}

/// Waits until `pred` holds for the events seen; the time it first held.
async fn until_seen(
    what: &str,
    seen: &Seen,
    pred: impl Fn(&[(Instant, String, Vec<u8>)]) -> Option<Instant>,
) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = pred(&seen.lock().expect("events")) {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The time the `n`-th distinct node matched `matches` (keyed by node name).
fn nth_node(
    events: &[(Instant, String, Vec<u8>)],
    n: usize,
    matches: impl Fn(&str, &[u8]) -> Option<String>,
) -> Option<Instant> {
    let mut nodes = BTreeSet::new();
    for (t, k, v) in events {
        if let Some(node) = matches(k, v)
            && nodes.insert(node)
            && nodes.len() == n
        {
            return Some(*t);
        }
    }
    None
}

fn node_of<'a>(key: &'a str, kind: &str) -> Option<&'a str> {
    let rest = key.strip_prefix("/corral/v1/nodes/")?;
    let (node, tail) = rest.split_once('/')?;
    (tail == kind).then_some(node)
}

fn cpu_percent(ticks: Duration, window: Duration) -> f64 {
    100.0 * ticks.as_secs_f64() / window.as_secs_f64().max(1e-3)
}

/// Part 3: `cfg.agents` real corrald processes against one etcd on loopback.
async fn simulated(cfg: &Config) {
    let n = cfg.agents;
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint(0).to_string();
    let etcd_pid = etcd.pid(0);
    let (seen, watcher) = watch_all(&endpoint, "/corral/v1/nodes/").await;
    println!(
        "fleet simulated: {n} agents; etcd RSS at start {} KiB",
        etcd_pid.map_or(0, rss_kib)
    );

    // Registration: every agent started at once, until every info key exists.
    let cpu0 = cpu_time(etcd_pid);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let endpoint = endpoint.clone();
        set.spawn(async move {
            let node = format!("sim{i}");
            Agent::start_full_args(
                "warn",
                &[
                    "--etcd",
                    &endpoint,
                    "--node",
                    &node,
                    "--node-labels",
                    "sim=1",
                ],
            )
            .await
        });
    }
    let mut agents = Vec::with_capacity(n);
    while let Some(a) = set.join_next().await {
        agents.push(a.expect("an agent started"));
    }
    let serving = t.elapsed();
    let registered = until_seen("every node registered", &seen, |ev| {
        nth_node(ev, n, |k, _| node_of(k, "info").map(str::to_string))
    })
    .await;
    let reg = registered - t;
    let reg_cpu = cpu_time(etcd_pid).saturating_sub(cpu0);
    // PSS: the binary's pages shared by every agent counted once across them.
    let mut pss: Vec<u64> = agents.iter().filter_map(Agent::pid).map(pss_kib).collect();
    pss.sort_unstable();
    let mut rss: Vec<u64> = agents.iter().filter_map(Agent::pid).map(rss_kib).collect();
    rss.sort_unstable();
    println!(
        "fleet simulated: all {n} agents serving their API after {}, all registered after {}; etcd CPU {:.0}% of a core meanwhile, RSS {} KiB",
        ms(serving),
        ms(reg),
        cpu_percent(reg_cpu, reg),
        etcd_pid.map_or(0, rss_kib)
    );
    println!(
        "fleet simulated: corrald per agent PSS median {} KiB (RSS {} KiB), all {n} agents' PSS {} MiB",
        pss.get(pss.len() / 2).copied().unwrap_or(0),
        rss.get(rss.len() / 2).copied().unwrap_or(0),
        pss.iter().sum::<u64>() / 1024
    );

    // Fan-out: one fleet-wide apply until every node reports it applied in its status key.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fan = "name = \"fan\"\ncommand = [\"/bin/true\"]\nreplicas = 0\n";
    let cpu0 = cpu_time(etcd_pid);
    let t = Instant::now();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        etcd.fleet_cli(&["apply", "-f", "-", "--selector", "sim=1"], Some(fan))
    });
    assert!(ok, "corral fleet apply to {n} nodes: {out}{err}");
    let cli = t.elapsed();
    let first_key = until_seen("a spec key written", &seen, |ev| {
        nth_node(ev, 1, |k, _| node_of(k, "services/fan").map(str::to_string))
    })
    .await;
    let written = until_seen("every spec key written", &seen, |ev| {
        nth_node(ev, n, |k, _| node_of(k, "services/fan").map(str::to_string))
    })
    .await;
    let applied = until_seen("every node reporting fan applied", &seen, |ev| {
        nth_node(ev, n, |k, v| {
            let node = node_of(k, "status/fan")?;
            let s: serde_json::Value = serde_json::from_slice(v).ok()?;
            (s["state"] == "applied").then(|| node.to_string())
        })
    })
    .await;
    let fan_cpu = cpu_time(etcd_pid).saturating_sub(cpu0);
    println!(
        "fleet simulated: fleet-wide apply to {n} nodes: CLI returned after {}, the first spec key seen by a watcher after {}, every one after {}, every node's status applied after {}; etcd CPU {:.0}% of a core meanwhile, RSS {} KiB",
        ms(cli),
        ms(first_key - t),
        ms(written - t),
        ms(applied - t),
        cpu_percent(fan_cpu, applied - t),
        etcd_pid.map_or(0, rss_kib)
    );

    // At rest: requests and etcd's CPU over the idle window.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = received_by_method(&scrape(&endpoint, None));
    let cpu0 = cpu_time(etcd_pid);
    tokio::time::sleep(cfg.idle).await;
    let after = received_by_method(&scrape(&endpoint, None));
    let rest_cpu = cpu_time(etcd_pid).saturating_sub(cpu0);
    let d = delta(&before, &after);
    let (other, keepalive) = idle_rate("idle simulated fleet", &d, n, cfg.idle);
    let total: f64 = d.values().sum::<f64>() / cfg.idle.as_secs_f64();
    let keys = etcd
        .get_prefix("/corral/v1/nodes/")
        .map_or(0, |kvs| kvs.len());
    let etcd_rss = etcd_pid.map_or(0, rss_kib);
    println!(
        "fleet simulated at rest: etcd {total:.1} requests/s in all, CPU {:.1}% of a core, RSS {etcd_rss} KiB; {keys} keys, {n} watches, {n} leases",
        cpu_percent(rest_cpu, cfg.idle)
    );
    println!(
        "fleet extrapolated to 5000 hosts (linear): {:.0} requests/s ({:.0} keep-alives/s), 5000 watches, {} keys, a fleet-wide apply of {} keys",
        5000.0 * (other + keepalive),
        5000.0 * keepalive,
        keys * 5000 / n.max(1),
        5000
    );
    watcher.abort();
    report_pids(agents.iter().filter_map(Agent::pid).chain(etcd_pid));
    drop(agents);
}
