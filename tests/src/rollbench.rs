//! `corral-bench rollout`: rolling restarts and updates of 4 instances of the HTTP test server
//! (it starts serving ~0.5 s after it is started) on an agent-owned socket, `[health]` and
//! `[rollout]` at their defaults, under 16 clients sending one request per connection.
//!
//! Per rollout: its duration (agent's clock), failed requests, the longest stretch without a
//! completed request, and the latency p50/p99/p99.9/max of the requests started during the
//! rollout against those started in an equal window just before it, with the bar's ratios
//! (p99 during ≤ 1.2× before, slowest during ≤ 2× slowest before). The slowest requests during
//! the rollout are lined up with the agent's events (instance started, health, rollout steps,
//! exits) on the same clock. With `CORRAL_BENCH_ACCEPTQ=1`, the listening socket's accept
//! queue (`ss -ltn`, Recv-Q) is sampled every 10 ms as well, and with `CORRAL_BENCH_SCHED=1`
//! the service's processes' run-queue wait (`/proc/PID/schedstat`) every 5 ms, printed beside
//! each slow request (both cost CPU: figures for the bar are taken without them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crate::load::{Load, Report};
use crate::{Agent, attribute, pb, testbin};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Load before a rollout: the window the rollout is compared with is taken from its end.
const BEFORE: Duration = Duration::from_secs(12);
const CLIENTS: usize = 16;
const REPLICAS: u32 = 4;

/// A typical Python service: a `ThreadingHTTPServer` on the agent's socket (fd 3, made
/// non-blocking), `/healthz` on its own port, a graceful stop on SIGTERM, taken by `sigwait`
/// (see `examples/hello.toml` for why not by a handler).
const PYTHON_SERVER: &str = r#"
import http.server, os, signal, socket, threading, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
listener = socket.socket(fileno=3)
listener.setblocking(False)
body = "{} {}\n".format(os.environ["CORRAL_INSTANCE"], os.environ["VERSION"]).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = False
admin = S(("127.0.0.1", int(os.environ["PORT_ADMIN"])), H)
threading.Thread(target=admin.serve_forever, daemon=True).start()
server = S(listener.getsockname(), H, bind_and_activate=False)
server.socket = listener
threading.Thread(target=server.serve_forever).start()
signal.sigwait({signal.SIGTERM})
server.shutdown()
server.server_close()
"#;

/// The service of `rollout-hey`: `rust` (the test server, tokio) or `python` (`PYTHON_SERVER`);
/// `+no-surge` rolls it with `max_surge = 0`, `max_unavailable = 1` (never more instances on
/// the socket than `replicas`); `+start-cpu` sets `rollout.start_cpu` (a new instance of a
/// rollout starts on at most 0.3 of a core until it is ready); `+weighted` starts the agent
/// with `--cpu-weight per-instance`, so that the tree weighs one process per instance, not
/// one process in all as by default; `+own-cpu` with `--cpu-cgroup per-instance`, so that each
/// instance has a cpu cgroup of its own, not its service's; `+idle` runs no rollout at all,
/// only the two windows.
fn spec_for(server: &str, port: u16, version: &str) -> String {
    if !server.starts_with("python") {
        return spec(port, version);
    }
    let mut policy = String::new();
    if server.contains("+no-surge") {
        policy.push_str("max_surge = 0\nmax_unavailable = 1\n");
    }
    if server.contains("+start-cpu") {
        let cores = std::env::var("CORRAL_BENCH_START_CPU")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(START_CPU);
        policy.push_str(&format!("start_cpu = {cores}\n"));
    }
    format!(
        "name = \"roll\"\ncommand = [\"/usr/bin/python3\", \"-c\", {PYTHON_SERVER:?}]\nreplicas = {REPLICAS}\nenv = {{ VERSION = \"{version}\" }}\n[ports]\nadmin = \"auto\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[health]\nhttp = \"http://127.0.0.1:{{port.admin}}/healthz\"\nstart_period = \"5s\"\n[rollout]\nmin_healthy = \"500ms\"\n{policy}"
    )
}

/// `+idle`: no rollout at all, for as long as one takes (round `round`'s name and success, as a
/// rollout's): how far two windows of the same load differ without one.
async fn no_rollout(round: usize) -> (String, bool) {
    tokio::time::sleep(Duration::from_millis(3500)).await;
    (format!("none-{}", round + 1), true)
}

/// `+start-cpu`: the cores a rollout's new instance may use until it is first ready
/// (`CORRAL_BENCH_START_CPU` overrides it).
const START_CPU: f64 = 0.3;

/// `rel`'s directory in the hierarchy holding the cpu controller (v1) or the unified one.
fn cpu_dir(agent: &Agent, rel: &str) -> std::path::PathBuf {
    match agent.cgroup.version {
        crate::cgroup::Version::V1 => agent.cgroup.dir("cpu", rel),
        crate::cgroup::Version::V2 => agent.cgroup.dir("unified", rel),
    }
}

/// Waits until every instance of `roll` is healthy again (after a rollout, or at the start).
async fn wait_healthy(agent: &Agent) {
    for _ in 0..600 {
        if agent.get("roll").await.is_ok_and(|s| s.healthy == REPLICAS) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("roll: {REPLICAS} healthy instances within 30 s");
}

/// Starts a rollout of `roll`: an update to `spec` when `update`, else a restart. Its id.
async fn start_rollout(agent: &Agent, update: bool, spec: &str) -> String {
    if update {
        return agent.apply(spec).await.expect("update").rollout_id;
    }
    agent.restart("roll").await
}

/// Polls rollout `id` until it is no longer running, or `ROLLOUT_TIMEOUT` after `since`.
async fn rollout_end(agent: &Agent, id: &str, since: std::time::Instant) -> pb::RolloutStatus {
    loop {
        let r = agent.rollout(id).await;
        if r.state() != pb::RolloutState::Running || since.elapsed() > ROLLOUT_TIMEOUT {
            return r;
        }
        // Not more often: a tight poll of the agent would load the very CPU measured.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(port: u16, version: &str) -> String {
    format!(
        "name = \"roll\"\ncommand = [{:?}, \"http-listen\", \"500\"]\nreplicas = {REPLICAS}\nenv = {{ VERSION = \"{version}\" }}\n[ports]\nadmin = \"auto\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[health]\nhttp = \"http://127.0.0.1:{{port.admin}}/healthz\"\n",
        testbin()
    )
}

/// `during` over `before`, as the bar compares them (a zero `before` counts as 1 ns).
fn ratio(during: Duration, before: Duration) -> f64 {
    during.as_secs_f64() / before.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// p50, p99, p99.9 and max of the successful requests started in `[from, to)`, and their count.
fn quantiles(r: &Report, from: Duration, to: Duration) -> ([Duration; 4], usize) {
    let n = r.within(from, to).filter(|s| s.outcome.is_ok()).count();
    let q = |q| r.latency_quantile(from, to, q);
    ([q(0.5), q(0.99), q(0.999), q(1.0)], n)
}

/// A process's CPU time (user + system), from `/proc/PID/stat`.
pub fn cpu_time(pid: Option<i32>) -> Duration {
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
    else {
        return Duration::ZERO;
    };
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
        .max(1)
        .cast_unsigned();
    Duration::from_millis(ticks * 1000 / hz)
}

/// The listening socket's accept queue over time, by `ss`.
struct QueueSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Duration, u32)>>,
}

impl QueueSampler {
    fn start(port: u16, load: &Load) -> QueueSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let started = load.started();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let filter = format!("sport = :{port}");
            while !s.load(Ordering::Relaxed) {
                let at = started.elapsed();
                if let Ok(o) = std::process::Command::new("ss")
                    .args(["-Hltn", &filter])
                    .output()
                {
                    let text = String::from_utf8_lossy(&o.stdout);
                    let q = text
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    out.push((at, q));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            out
        });
        QueueSampler { stop, thread }
    }

    fn finish(self) -> Vec<(Duration, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The service's processes' time waiting for a CPU (`/proc/PID/schedstat`, the run-queue
/// delay), sampled every 5 ms: the cause of a slow request when its server was runnable but
/// not running.
struct SchedSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Duration, i32, u64)>>,
}

impl SchedSampler {
    fn start(service: std::path::PathBuf, load: &Load) -> SchedSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let started = load.started();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut pids = Vec::new();
            let mut scanned: Option<std::time::Instant> = None;
            while !s.load(Ordering::Relaxed) {
                if scanned.is_none_or(|t| t.elapsed() > Duration::from_millis(100)) {
                    pids.clear();
                    crate::cgroup::collect_pids(&service, &mut pids);
                    scanned = Some(std::time::Instant::now());
                }
                let at = started.elapsed();
                for &pid in &pids {
                    let wait = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                        .ok()
                        .and_then(|t| t.split_whitespace().nth(1)?.parse().ok());
                    if let Some(wait) = wait {
                        out.push((at, pid, wait));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            out
        });
        SchedSampler { stop, thread }
    }

    fn finish(self) -> Vec<(Duration, i32, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The longest run-queue wait any one of the service's processes accrued within
/// `[from, to]` (plus one sample after: a wait is counted when the process gets its CPU),
/// and that process.
fn cpu_wait(samples: &[(Duration, i32, u64)], from: Duration, to: Duration) -> (Duration, i32) {
    let mut first: std::collections::HashMap<i32, u64> = Default::default();
    let mut worst = (Duration::ZERO, 0);
    let until = to + Duration::from_millis(10);
    for &(_, pid, wait) in samples
        .iter()
        .filter(|(at, ..)| *at >= from && *at <= until)
    {
        let base = *first.entry(pid).or_insert(wait);
        let d = Duration::from_nanos(wait.saturating_sub(base));
        if d > worst.0 {
            worst = (d, pid);
        }
    }
    worst
}

/// The service's events since `wall0`, on the load's clock (`t0` is `wall0`).
async fn timeline(agent: &Agent, wall0: SystemTime, t0: Duration) -> Vec<(Duration, String)> {
    let mut events = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            from_index: 0,
            service: "roll".into(),
            instance: String::new(),
            follow: false,
            last: 2000,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Some(e)) = events.message().await {
        let Some(at) = e.time.and_then(|t| SystemTime::try_from(t).ok()) else {
            continue;
        };
        let Ok(since) = at.duration_since(wall0) else {
            continue;
        };
        let what = match e.r#type() {
            pb::EventType::HealthChanged => {
                format!("health {}", attribute(&e, "to").unwrap_or_default())
            }
            pb::EventType::RolloutStep => {
                format!("step {}", attribute(&e, "step").unwrap_or_default())
            }
            t => format!("{t:?}"),
        };
        out.push((t0 + since, format!("{} {what}", e.instance)));
    }
    out
}

/// Figures of one rollout, for the summary.
struct Round {
    p99: (Duration, Duration),
    max: (Duration, Duration),
    took: Duration,
    failed: usize,
    gap: Duration,
    succeeded: bool,
    /// The host's longest CPU stall in the window before and in the one during
    /// (`crate::stalls`), where measured.
    stalls: Option<(Duration, Duration)>,
}

pub async fn bench(rounds: usize) {
    let agent = Agent::start_logging(None, "warn").await;
    let port = crate::free_port();
    let sample_queue = std::env::var_os("CORRAL_BENCH_ACCEPTQ").is_some();
    let sample_sched = std::env::var_os("CORRAL_BENCH_SCHED").is_some();
    let service_cgroup = cpu_dir(&agent, "corral/roll");
    agent.apply(&spec(port, "v0")).await.expect("apply");
    wait_healthy(&agent).await;
    println!(
        "rollouts of {REPLICAS} instances (each serving ~0.5 s after its start) under {CLIENTS} clients (one request per connection), [health] and [rollout] at their defaults"
    );
    let mut all = Vec::new();
    for round in 0..rounds * 2 {
        let update = round % 2 == 1;
        let load = Load::start(port, CLIENTS, ROLLOUT_TIMEOUT + BEFORE * 2);
        let sampler = sample_queue.then(|| QueueSampler::start(port, &load));
        let sched = sample_sched.then(|| SchedSampler::start(service_cgroup.clone(), &load));
        let cpu_start = cpu_time(agent.pid());
        tokio::time::sleep(BEFORE).await;
        let cpu0 = cpu_time(agent.pid());
        let t0 = load.now();
        let wall0 = SystemTime::now();
        let id = start_rollout(&agent, update, &spec(port, &format!("v{round}"))).await;
        let status = rollout_end(&agent, &id, std::time::Instant::now()).await;
        let t1 = load.now();
        let cpu1 = cpu_time(agent.pid());
        // Let the last old instance's requests finish before the load stops.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let queue = sampler.map(QueueSampler::finish).unwrap_or_default();
        let waits = sched.map(SchedSampler::finish);
        let report = load.finish();
        let ts = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
        let took = match (ts(status.started_at), ts(status.finished_at)) {
            (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default(),
            _ => t1.saturating_sub(t0),
        };
        // An equal window just before (the first half second of load is warm-up).
        let span = t1.saturating_sub(t0);
        let b0 = t0.saturating_sub(span).max(Duration::from_millis(500));
        let (before, n_before) = quantiles(&report, b0, t0);
        let (during, n_during) = quantiles(&report, t0, t1);
        let (gap, _) = report.longest_gap_at(t0, t1);
        let gap_before = report.longest_gap(b0, t0);
        let state = format!("{:?}", status.state()).to_lowercase();
        println!(
            "{} {id} (at {:.3} s since the epoch): {state} in {:.2} s; {} ok, {} failed; longest gap {} ({} before)",
            if update { "update " } else { "restart" },
            wall0
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            took.as_secs_f64(),
            report.ok(),
            report.failures().len(),
            ms(gap),
            ms(gap_before),
        );
        let row = |name: &str, q: [Duration; 4], n: usize, from: Duration, to: Duration| {
            println!(
                "  {name} ({:.2} s, {n:>6} requests): p50 {:>9}  p99 {:>9}  p99.9 {:>9}  max {:>9}",
                to.saturating_sub(from).as_secs_f64(),
                ms(q[0]),
                ms(q[1]),
                ms(q[2]),
                ms(q[3]),
            )
        };
        row("before", before, n_before, b0, t0);
        row("during", during, n_during, t0, t1);
        println!(
            "  during / before: p99 {:.2}x (bar 1.2x), max {:.2}x (bar 2x)",
            ratio(during[1], before[1]),
            ratio(during[3], before[3]),
        );
        let share = |cpu: Duration, wall: Duration| {
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
        };
        println!(
            "  agent CPU: {:.1} % of a core before, {:.1} % during",
            share(cpu0.saturating_sub(cpu_start), t0),
            share(cpu1.saturating_sub(cpu0), span),
        );
        if !report.failures().is_empty() {
            println!("  failures: {}", report.failure_summary());
        }
        // The slowest requests of the rollout, with what the agent did around them.
        let events = timeline(&agent, wall0, t0).await;
        let mut slow: Vec<_> = report
            .within(t0, t1)
            .filter(|s| s.outcome.is_ok() && s.latency() > before[3])
            .collect();
        slow.sort_by_key(|s| std::cmp::Reverse(s.latency()));
        for s in slow.iter().take(3) {
            let near: Vec<String> = events
                .iter()
                .filter(|(at, _)| *at + Duration::from_millis(100) >= s.start && *at <= s.end)
                .map(|(at, what)| format!("{:+.3} s {what}", (at.as_secs_f64() - t0.as_secs_f64())))
                .collect();
            let waited = waits.as_deref().map_or(String::new(), |w| {
                let (d, pid) = cpu_wait(w, s.start, s.end);
                format!(
                    "; meanwhile pid {pid} of the service waited {} for a CPU",
                    ms(d)
                )
            });
            println!(
                "  slow: started {:+.3} s, took {}, answered by {:?}; events around it: [{}]{waited}",
                s.start.as_secs_f64() - t0.as_secs_f64(),
                ms(s.latency()),
                s.outcome.as_deref().unwrap_or_default(),
                near.join("; ")
            );
        }
        if !queue.is_empty() {
            let peak = |from: Duration, to: Duration| {
                queue
                    .iter()
                    .filter(|(at, _)| *at >= from && *at < to)
                    .max_by_key(|(_, q)| *q)
                    .map_or((Duration::ZERO, 0), |&(at, q)| (at, q))
            };
            let (_, qb) = peak(b0, t0);
            let (at, qd) = peak(t0, t1);
            println!(
                "  accept queue (ss, every 10 ms): at most {qb} before, {qd} during (at {:+.3} s)",
                at.as_secs_f64() - t0.as_secs_f64()
            );
        }
        all.push(Round {
            p99: (before[1], during[1]),
            max: (before[3], during[3]),
            took,
            failed: report.failures().len(),
            gap,
            succeeded: status.state() == pb::RolloutState::Succeeded,
            stalls: None,
        });
        wait_healthy(&agent).await;
    }
    summary(&all, true);
    agent.delete("roll").await.expect("delete");
}

/// `gaps`: whether the rounds measured the longest gap between responses (`hey` does not
/// report it).
fn summary(all: &[Round], gaps: bool) {
    if all.is_empty() {
        return;
    }
    let worst = |f: &dyn Fn(&Round) -> f64| all.iter().map(f).fold(0.0, f64::max);
    let p99 = worst(&|r| ratio(r.p99.1, r.p99.0));
    let max = worst(&|r| ratio(r.max.1, r.max.0));
    let failed: usize = all.iter().map(|r| r.failed).sum();
    let succeeded = all.iter().filter(|r| r.succeeded).count();
    let mut took: Vec<Duration> = all.iter().map(|r| r.took).collect();
    took.sort();
    let gap = all.iter().map(|r| r.gap).max().unwrap_or_default();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let gap = if gaps {
        format!(
            "; longest gap {} (target ≤ 10 ms: {})",
            ms(gap),
            verdict(gap <= Duration::from_millis(10))
        )
    } else {
        String::new()
    };
    println!(
        "rollouts: {succeeded} of {} succeeded; duration median {:.2} s, max {:.2} s (target ≤ 6 s: {}); failed requests {failed} (target 0: {}){gap}",
        all.len(),
        took[took.len() / 2].as_secs_f64(),
        took[took.len() - 1].as_secs_f64(),
        verdict(took[took.len() - 1] <= Duration::from_secs(6)),
        verdict(failed == 0),
    );
    println!(
        "tail: worst p99 during / before {p99:.2}x (bar ≤ 1.2x: {}); worst max during / before {max:.2}x (bar ≤ 2x: {})",
        verdict(p99 <= 1.2),
        verdict(max <= 2.0),
    );
    let counts = |rs: &[&Round]| {
        let p99 = rs.iter().filter(|r| ratio(r.p99.1, r.p99.0) <= 1.2).count();
        let max = rs.iter().filter(|r| ratio(r.max.1, r.max.0) <= 2.0).count();
        let mut slowest: Vec<Duration> = rs.iter().map(|r| r.max.1).collect();
        slowest.sort();
        let median = slowest.get(slowest.len() / 2).copied().unwrap_or_default();
        format!(
            "p99 within 1.2x in {p99} of {n}, slowest within 2x in {max} of {n}; slowest during: median {}, max {}",
            ms(median),
            ms(slowest.last().copied().unwrap_or_default()),
            n = rs.len(),
        )
    };
    let every: Vec<&Round> = all.iter().collect();
    println!("per rollout: {}", counts(&every));
    if all.iter().all(|r| r.stalls.is_some()) {
        let clean: Vec<&Round> = all
            .iter()
            .filter(|r| r.stalls.is_some_and(|(b, d)| b.max(d) <= HOST_STALL))
            .collect();
        println!(
            "of the {} whose two windows saw no host stall over {}: {}",
            clean.len(),
            ms(HOST_STALL),
            counts(&clean)
        );
    }
}

/// A stall of the host's CPUs (`crate::stalls`) longer than this, in either window of a
/// rollout, is as long as the slowest requests of a quiet window (8–10 ms with 4 Python
/// servers under `hey -c 16`): the summary counts the bar's clauses with and without those
/// rollouts.
const HOST_STALL: Duration = Duration::from_millis(10);

/// What `hey` reported for one window: its summary, parsed.
#[derive(Debug, Default)]
struct Hey {
    ok: u64,
    errors: u64,
    /// The lines under "Error distribution:", e.g. "[1]\tGet ...: connection reset by peer".
    why: Vec<String>,
    p50: Duration,
    p99: Duration,
    slowest: Duration,
    /// With `CORRAL_BENCH_HEY_CSV=1`: every successful request, by `hey -o csv`.
    requests: Vec<Request>,
}

/// One request of a `hey -o csv` run: when it started (on `hey`'s clock, from its start), how
/// long it took, and how much of that was the connect.
#[derive(Clone, Copy, Debug)]
struct Request {
    offset: Duration,
    took: Duration,
    connect: Duration,
}

/// `CORRAL_BENCH_HEY_CSV=1`: `hey -o csv`, one line per request, to line a rollout's slowest
/// requests up with the agent's events and the host's stalls. `hey` then leaves out the
/// requests that failed without a status (a reset connection, say): figures for the bar are
/// taken without it.
fn hey_csv() -> bool {
    std::env::var("CORRAL_BENCH_HEY_CSV").is_ok_and(|v| v == "1")
}

/// `CORRAL_BENCH_SESSIONS=1`: `cmd` (`hey`, supervisord) runs in a session of its own, as a
/// daemon or a client on this host would. With the kernel's autogroups on
/// (`/proc/sys/kernel/sched_autogroup_enabled`), the processes of one session in the root cpu
/// cgroup are scheduled as one group: without it, supervisord's processes share one with the
/// benchmark's `hey` and compete with its threads one by one, which no deployment does.
fn own_session(cmd: &mut std::process::Command) {
    if std::env::var("CORRAL_BENCH_SESSIONS").is_ok_and(|v| v == "1") {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
}

/// `hey` for `secs` seconds, 16 workers, one request per connection: the load from outside,
/// by a real client.
fn hey(port: u16, secs: f64) -> std::io::Result<std::process::Child> {
    // `CORRAL_BENCH_HEY_CPUS=0`: `hey` on those CPUs only (run the benchmark itself, and so the
    // servers, with `taskset -c` on the others), as clients on another host would be.
    let mut cmd = match std::env::var("CORRAL_BENCH_HEY_CPUS") {
        Ok(cpus) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", &cpus, "hey"]);
            c
        }
        Err(_) => std::process::Command::new("hey"),
    };
    own_session(&mut cmd);
    cmd.args([
        "-z",
        &format!("{secs}s"),
        "-c",
        &CLIENTS.to_string(),
        "-disable-keepalive",
    ])
    // Flags before the URL: `hey` reads none after it.
    .args(if hey_csv() { &["-o", "csv"][..] } else { &[] })
    .arg(format!("http://127.0.0.1:{port}/"))
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
}

/// The figures of `hey`'s text summary: "Slowest: 0.0123 secs", "99% in 0.0021 secs",
/// "[200]\t1234 responses", and the counts under "Error distribution:".
fn parse_hey(text: &str) -> Hey {
    let secs = |v: &str| {
        v.trim()
            .trim_end_matches("secs")
            .trim()
            .parse::<f64>()
            .ok()
            // hey prints 4 decimals: whole microseconds.
            .and_then(|s| Duration::try_from_secs_f64((s * 1e6).round() / 1e6).ok())
            .unwrap_or_default()
    };
    let mut out = Hey::default();
    let mut in_errors = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Slowest:") {
            out.slowest = secs(v);
        } else if let Some(v) = t.strip_prefix("50% in") {
            out.p50 = secs(v);
        } else if let Some(v) = t.strip_prefix("99% in") {
            out.p99 = secs(v);
        } else if t.starts_with("Error distribution:") {
            in_errors = true;
        } else if let Some(rest) = t.strip_prefix('[') {
            // "[200]\t1234 responses" under the status codes; "[12]\tGet ...: why" (the
            // count in the brackets) under the errors.
            let (code, after) = rest.split_once(']').unwrap_or_default();
            let count = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
            if in_errors {
                out.errors += count(code);
                out.why.push(t.to_string());
            } else {
                let n = count(after.split_whitespace().next().unwrap_or_default());
                if code == "200" {
                    out.ok += n;
                } else {
                    out.errors += n;
                }
            }
        }
    }
    out
}

fn finish_hey(child: std::process::Child) -> Result<Hey, String> {
    let out = child.wait_with_output().map_err(|e| format!("hey: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "hey exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(if hey_csv() {
        parse_hey_csv(&text)
    } else {
        parse_hey(&text)
    })
}

/// `hey -o csv`: "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,
/// status-code,offset", times in seconds; the quantiles as `hey` takes them.
fn parse_hey_csv(text: &str) -> Hey {
    let secs = |v: &str| {
        v.trim()
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or_default()
    };
    let mut out = Hey::default();
    // Responses other than 200, counted by status, as hey's summary counts its errors.
    let mut other = std::collections::BTreeMap::<&str, u64>::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let [took, connect, _, _, _, _, status, offset] = f[..] else {
            continue;
        };
        if status.trim() == "200" {
            out.ok += 1;
        } else {
            out.errors += 1;
            *other.entry(status.trim()).or_default() += 1;
        }
        out.requests.push(Request {
            offset: secs(offset),
            took: secs(took),
            connect: secs(connect),
        });
    }
    out.why = other
        .into_iter()
        .map(|(status, n)| format!("[{n}]\tstatus {status}"))
        .collect();
    let mut took: Vec<Duration> = out.requests.iter().map(|r| r.took).collect();
    took.sort();
    let at = |percent: usize| {
        // hey's own choice: the sample at index ⌊n·q⌋.
        let i = took.len() * percent / 100;
        took.get(i.min(took.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    out.p50 = at(50);
    out.p99 = at(99);
    out.slowest = took.last().copied().unwrap_or_default();
    out
}

/// With `CORRAL_BENCH_HEY_CSV=1`, a rollout's slow requests (over twice the slowest of the
/// window before: how many, when, and the 5 slowest) beside what the agent did around them and
/// the host's stalls, all from the rollout's start.
fn explain(
    during: &Hey,
    before: &Hey,
    (spawned, started): (std::time::Instant, std::time::Instant),
    events: &[(Duration, String)],
    stalls: &[crate::stalls::Stall],
) {
    // Seconds from the rollout's start, of a time on hey's clock (from about when it was
    // spawned) and of an instant.
    let lead = started.saturating_duration_since(spawned).as_secs_f64();
    let from_start =
        |at: std::time::Instant| at.saturating_duration_since(spawned).as_secs_f64() - lead;
    let bound = before.slowest * 2;
    let mut slow: Vec<&Request> = during.requests.iter().filter(|r| r.took > bound).collect();
    if slow.is_empty() {
        return;
    }
    let first = slow.iter().map(|r| r.offset).min().unwrap_or_default();
    let last = slow.iter().map(|r| r.offset).max().unwrap_or_default();
    println!(
        "  {} requests took over {}, started {:+.3}..{:+.3} s from the rollout's start (hey's clock):",
        slow.len(),
        ms(bound),
        first.as_secs_f64() - lead,
        last.as_secs_f64() - lead,
    );
    slow.sort_by_key(|r| std::cmp::Reverse(r.took));
    for r in slow.iter().take(5) {
        let from = r.offset.as_secs_f64() - lead;
        let to = from + r.took.as_secs_f64();
        let near: Vec<String> = events
            .iter()
            .map(|(at, what)| (at.as_secs_f64(), what))
            .filter(|(at, _)| *at + 0.1 >= from && *at <= to)
            .map(|(at, what)| format!("{at:+.3} s {what}"))
            .collect();
        let host: Vec<String> = stalls
            .iter()
            .filter(|s| {
                let at = from_start(s.at);
                at + s.late.as_secs_f64() >= from && at <= to
            })
            .map(|s| {
                format!(
                    "cpu {} {:.1} ms at {:+.3} s",
                    s.cpu,
                    s.late.as_secs_f64() * 1e3,
                    from_start(s.at)
                )
            })
            .collect();
        println!(
            "    {from:+.3} s took {} (connect {}); agent: [{}]; host: [{}]",
            ms(r.took),
            ms(r.connect),
            near.join("; "),
            host.join("; "),
        );
    }
}

/// Long enough for a rollout of 4 instances (~4.5 s): a rollout still running at the end of
/// its window is reported as such.
const WINDOW: f64 = 6.0;
/// How far into the window during a rollout the rollout starts.
const LEAD: Duration = Duration::from_millis(250);

fn has_hey() -> bool {
    let found = std::process::Command::new("hey").arg("-h").output().is_ok();
    if !found {
        println!("skipped: `hey` is not installed (apt install hey)");
    }
    found
}

/// One rollout measured from outside: `hey` over a window just before it and over one of the
/// same length started `LEAD` before it. `roll` runs the rollout and returns its name and
/// whether it succeeded.
async fn measured<F, Fut>(port: u16, label: &str, agent: Option<&Agent>, roll: F) -> Option<Round>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = (String, bool)>,
{
    let probe = crate::stalls::StallProbe::start();
    // Warm-up, not measured: the first second after the previous rollout.
    let _ = hey(port, 1.0).map(finish_hey);
    let b0 = std::time::Instant::now();
    let before = hey(port, WINDOW)
        .map_err(|e| e.to_string())
        .and_then(finish_hey);
    let during = hey(port, WINDOW);
    let spawned = std::time::Instant::now();
    // The rollout starts a moment into its window, as it would under a load that was already
    // running: `hey`'s own start (16 connections at once, the threads of its runtime) would
    // otherwise fall on the rollout's first instance start. The window before starts the
    // same way, without a rollout, and the rollout (3–4 s) still ends well within it.
    tokio::time::sleep(LEAD).await;
    let started = std::time::Instant::now();
    let wall_started = SystemTime::now();
    let (id, succeeded) = roll().await;
    let took = started.elapsed();
    let during = during.map_err(|e| e.to_string()).and_then(finish_hey);
    let d1 = std::time::Instant::now();
    let realtime = probe.realtime;
    let seen = probe.finish();
    let stall =
        |from, to| crate::stalls::longest(&seen, from, to).map_or(Duration::ZERO, |s| s.late);
    let stalls = (stall(b0, spawned), stall(spawned, d1));
    let (before, during) = match (before, during) {
        (Ok(b), Ok(d)) => (b, d),
        (b, d) => {
            println!("{label} {id}: hey failed: {:?} / {:?}", b.err(), d.err());
            return None;
        }
    };
    println!(
        "{label} {id}: {} in {:.2} s{}",
        if succeeded { "succeeded" } else { "FAILED" },
        took.as_secs_f64(),
        if (took + LEAD).as_secs_f64() > WINDOW {
            " (longer than the measured window)"
        } else {
            ""
        }
    );
    for (name, h) in [("before", &before), ("during", &during)] {
        println!(
            "  {name}: {:>7} ok, {} errors; p50 {:>9}  p99 {:>9}  slowest {:>9}",
            h.ok,
            h.errors,
            ms(h.p50),
            ms(h.p99),
            ms(h.slowest)
        );
        for why in &h.why {
            println!("    error: {why}");
        }
    }
    println!(
        "  during / before: p99 {:.2}x (bar 1.2x), slowest {:.2}x (bar 2x)",
        ratio(during.p99, before.p99),
        ratio(during.slowest, before.slowest),
    );
    println!(
        "  host: longest CPU stall {} before, {} during{}",
        ms(stalls.0),
        ms(stalls.1),
        if realtime {
            ""
        } else {
            " (probe NOT real-time)"
        }
    );
    if let Some(agent) = agent.filter(|_| hey_csv()) {
        let events = timeline(agent, wall_started, Duration::ZERO).await;
        explain(&during, &before, (spawned, started), &events, &seen);
    }
    Some(Round {
        p99: (before.p99, during.p99),
        max: (before.slowest, during.slowest),
        took,
        failed: usize::try_from(during.errors + before.errors).unwrap_or(usize::MAX),
        gap: Duration::ZERO,
        succeeded,
        stalls: Some(stalls),
    })
}

/// `corral-bench rollout-hey`: the rollouts of `rollout`, measured from outside by `hey -c 16`
/// (one request per connection): one `hey` run over a window just before the rollout, a
/// second one, of the same length, started `LEAD` (0.25 s) before it. Per rollout: the
/// figures of both runs (p50, p99, slowest, errors) and the ratios of the bar.
pub async fn bench_hey(rounds: usize, server: &str) {
    if !has_hey() {
        return;
    }
    let mut args = Vec::new();
    if server.contains("+weighted") {
        args.extend(["--cpu-weight", "per-instance"]);
    }
    if server.contains("+own-cpu") {
        args.extend(["--cpu-cgroup", "per-instance"]);
    }
    let agent = Agent::start_full_args("warn", &args).await;
    let port = crate::free_port();
    agent
        .apply(&spec_for(server, port, "v0"))
        .await
        .expect("apply");
    wait_healthy(&agent).await;
    println!(
        "corral: rollouts of {REPLICAS} {server} instances under `hey -c {CLIENTS} -disable-keepalive`: a {WINDOW} s run just before each rollout, and one of {WINDOW} s started {:.2} s before it",
        LEAD.as_secs_f64()
    );
    let mut all = Vec::new();
    for round in 0..rounds * 2 {
        let update = round % 2 == 1;
        let label = if update { "update " } else { "restart" };
        let roll = || async {
            if server.contains("+idle") {
                return no_rollout(round).await;
            }
            let spec = spec_for(server, port, &format!("v{round}"));
            let id = start_rollout(&agent, update, &spec).await;
            let end = rollout_end(&agent, &id, std::time::Instant::now()).await;
            (id, end.state() == pb::RolloutState::Succeeded)
        };
        let wall0 = SystemTime::now();
        let figures = measured(port, label, Some(&agent), roll).await;
        if figures.as_ref().is_some_and(|r| r.failed > 0) {
            // To line a failed request up with the instances' lives (and a capture's times).
            let at = wall0
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            println!(
                "  the service's events since the round began ({:.3} s since the epoch):",
                at.as_secs_f64()
            );
            for (t, what) in timeline(&agent, wall0, Duration::ZERO).await {
                println!("    {:+.3} s {what}", t.as_secs_f64());
            }
        }
        all.extend(figures);
        wait_healthy(&agent).await;
    }
    summary(&all, false);
    agent.delete("roll").await.expect("delete");
}

/// The peer: supervisord (Debian's `supervisor`) running the same 4 servers as an
/// `[fcgi-program]` — it owns the listening socket and hands it to each process as fd 0,
/// which the command moves to fd 3 — restarted one process after the other with
/// `supervisorctl restart` (stop, then start: `startsecs = 1` covers the 0.5 s warm-up of the
/// Rust server). The same `hey` windows as `rollout-hey`. `python+idle` restarts nothing;
/// `python+nested` runs each process in corral's cgroup layout (v1 only): a cpu cgroup of its
/// own in a service cgroup in a tree cgroup, weighted per process.
pub async fn bench_supervisord(rounds: usize, server: &str) {
    if !has_hey() {
        return;
    }
    if std::process::Command::new("supervisord")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: `supervisord` is not installed (apt install supervisor)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = crate::free_port();
    // Health ports for the Python server (it serves /healthz there, unused here).
    let admin = crate::free_port();
    let exe = if server.starts_with("python") {
        let script = dir.path().join("server.py");
        std::fs::write(&script, PYTHON_SERVER).expect("write the server");
        format!("/usr/bin/python3 {}", script.display())
    } else {
        format!("{} http-listen 500", testbin())
    };
    // `python+nested`: each process in a cpu cgroup of its own, in a service cgroup in a tree
    // cgroup, both weighted per process as `--cpu-weight per-instance` weighs corral's (v1):
    // corral's layout, with the peer's processes.
    let nested = if server.contains("+nested") {
        if crate::cgroup::version() != crate::cgroup::Version::V1 {
            println!("skipped: {server} is measured on cgroup v1 only");
            return;
        }
        let cg =
            crate::cgroup::TestCgroup::new(&format!("corral-bench-peer-{}", std::process::id()));
        let tree = cg.dir("cpu", "");
        let shares = (1024 * REPLICAS).to_string();
        std::fs::create_dir_all(tree.join("roll")).expect("create the peer's cpu cgroups");
        std::fs::write(tree.join("cpu.shares"), &shares).expect("write cpu.shares");
        std::fs::write(tree.join("roll/cpu.shares"), &shares).expect("write cpu.shares");
        Some(cg)
    } else {
        None
    };
    // Each process's shell moves itself into its own cgroup, then executes the server.
    let join = nested.as_ref().map_or(String::new(), |cg| {
        format!(
            "d={}/roll/p%(process_num)d; mkdir -p $d; echo $$ > $d/cgroup.procs; ",
            cg.dir("cpu", "").display()
        )
    });
    let conf = dir.path().join("supervisord.conf");
    let d = dir.path().display();
    std::fs::write(
        &conf,
        format!(
            "[unix_http_server]\nfile={d}/supervisor.sock\n\
             [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nnodaemon=true\nchildlogdir={d}\n\
             [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
             [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\
             [fcgi-program:roll]\nsocket=tcp://127.0.0.1:{port}\nnumprocs={REPLICAS}\n\
             process_name=%(program_name)s_%(process_num)d\n\
             command=/bin/sh -c '{join}exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_PID=$$ CORRAL_INSTANCE=roll-%(process_num)d VERSION=v1 PORT_ADMIN=$((%(process_num)d + {admin})); exec {exe}'\n\
             startsecs=1\nstopsignal=TERM\nstopwaitsecs=10\nstdout_logfile=NONE\nstderr_logfile={d}/roll.err\n"
        ),
    )
    .expect("write supervisord.conf");
    let mut daemon = std::process::Command::new("supervisord");
    own_session(&mut daemon);
    let mut daemon = daemon
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start supervisord");
    let ctl = |args: &[&str]| {
        std::process::Command::new("supervisorctl")
            .arg("-c")
            .arg(&conf)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let running = || {
        ctl(&["status"])
            .lines()
            .filter(|l| l.contains("RUNNING"))
            .count()
    };
    for _ in 0..300 {
        if running() == REPLICAS as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "supervisord {}: one-by-one restarts of {REPLICAS} {server} processes (fcgi-program socket) under `hey -c {CLIENTS} -disable-keepalive`, the same windows",
        ctl(&["version"]).trim()
    );
    let mut all = Vec::new();
    for round in 0..rounds * 2 {
        let roll = || async {
            if server.contains("+idle") {
                return no_rollout(round).await;
            }
            let mut ok = true;
            for i in 0..REPLICAS {
                let out = ctl(&["restart", &format!("roll:roll_{i}")]);
                ok &= out.contains("started");
            }
            (format!("r{}", round + 1), ok)
        };
        all.extend(measured(port, "restart", None, roll).await);
    }
    summary(&all, false);
    // SAFETY: kill has no memory-safety preconditions; the PID is our own child's.
    unsafe { libc::kill(daemon.id().cast_signed(), libc::SIGTERM) };
    let _ = daemon.wait();
    if let Some(cg) = nested {
        cg.destroy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hey_csv_lines_are_read_into_requests_and_quantiles() {
        let mut csv = String::from(
            "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n",
        );
        // 100 requests of 1..=100 ms, 10 ms apart, two of them 503s and one a 404; then lines
        // hey never writes.
        for i in 1..=100u32 {
            let status = match i {
                42 | 43 => 503,
                44 => 404,
                _ => 200,
            };
            csv.push_str(&format!(
                "{:.4},0.0001,0.0000,0.0000,0.0010,0.0001,{status},{:.4}\n",
                f64::from(i) / 1e3,
                f64::from(i) / 100.0
            ));
        }
        csv.push_str("garbage\n0.1,0.2\n\n");
        let h = parse_hey_csv(&csv);
        assert_eq!((h.ok, h.errors), (97, 3));
        assert_eq!(h.why, ["[1]\tstatus 404", "[2]\tstatus 503"]);
        assert_eq!(h.requests.len(), 100);
        assert_eq!(h.p50, Duration::from_millis(51));
        assert_eq!(h.p99, Duration::from_millis(100));
        assert_eq!(h.slowest, Duration::from_millis(100));
        let r = h.requests[9];
        assert_eq!(
            (r.took, r.offset),
            (Duration::from_millis(10), Duration::from_millis(100))
        );
        assert_eq!(r.connect, Duration::from_micros(100));
        let empty = parse_hey_csv("");
        assert_eq!((empty.ok, empty.slowest), (0, Duration::ZERO));
    }

    #[test]
    fn hey_summaries_are_read_with_their_errors() {
        let ok = "\nSummary:\n  Total:\t6.0012 secs\n  Slowest:\t0.0882 secs\n  Fastest:\t0.0002 secs\n\nLatency distribution:\n  10% in 0.0011 secs\n  50% in 0.0040 secs\n  99% in 0.0181 secs\n\nStatus code distribution:\n  [200]\t20599 responses\n  [502]\t3 responses\n\nError distribution:\n  [2]\tGet \"http://127.0.0.1:1/\": dial tcp 127.0.0.1:1: connect: connection refused\n";
        let h = parse_hey(ok);
        assert_eq!(h.ok, 20599);
        assert_eq!(h.errors, 5, "a 502 and a refused connection are failures");
        assert_eq!(h.slowest, Duration::from_micros(88_200));
        assert_eq!(h.p50, Duration::from_micros(4_000));
        assert_eq!(h.p99, Duration::from_micros(18_100));
        assert_eq!(h.why.len(), 1);
        assert!(
            h.why[0].ends_with("connect: connection refused"),
            "{:?}",
            h.why
        );
        // Nothing answered: no figures, every request an error; garbage reads as nothing.
        let refused = "Summary:\n  Slowest:\t0.0000 secs\n  Average:\t NaN secs\nStatus code distribution:\n\nError distribution:\n  [20]\tGet: refused\n";
        let h = parse_hey(refused);
        assert_eq!((h.ok, h.errors, h.p99), (0, 20, Duration::ZERO));
        let h = parse_hey("Slowest: -1 secs\n99% in NaN secs\n[x]\n[200] lots");
        assert_eq!(
            (h.ok, h.errors, h.slowest, h.p99),
            (0, 0, Duration::ZERO, Duration::ZERO)
        );
    }
}
