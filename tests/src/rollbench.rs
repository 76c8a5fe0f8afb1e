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
//! queue (`ss -ltn`, Recv-Q) is sampled every 10 ms as well (this costs CPU: figures for the
//! bar are taken without it).

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

fn spec(port: u16, version: &str) -> String {
    format!(
        "name = \"roll\"\ncommand = [{:?}, \"http-listen\", \"500\"]\nreplicas = {REPLICAS}\nenv = {{ VERSION = \"{version}\" }}\n[ports]\nadmin = \"auto\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[health]\nhttp = \"http://127.0.0.1:{{port.admin}}/healthz\"\n",
        testbin()
    )
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
}

pub async fn bench(rounds: usize) {
    let agent = Agent::start_logging(None, "warn").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let sample_queue = std::env::var_os("CORRAL_BENCH_ACCEPTQ").is_some();
    agent.apply(&spec(port, "v0")).await.expect("apply");
    let healthy = || async {
        for _ in 0..600 {
            if agent.get("roll").await.is_ok_and(|s| s.healthy == REPLICAS) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("roll: {REPLICAS} healthy instances within 30 s");
    };
    healthy().await;
    println!(
        "rollouts of {REPLICAS} instances (each serving ~0.5 s after its start) under {CLIENTS} clients (one request per connection), [health] and [rollout] at their defaults"
    );
    let mut all = Vec::new();
    for round in 0..rounds * 2 {
        let update = round % 2 == 1;
        let load = Load::start(port, CLIENTS, ROLLOUT_TIMEOUT + BEFORE * 2);
        let sampler = sample_queue.then(|| QueueSampler::start(port, &load));
        let cpu_start = cpu_time(agent.pid());
        tokio::time::sleep(BEFORE).await;
        let cpu0 = cpu_time(agent.pid());
        let t0 = load.now();
        let wall0 = SystemTime::now();
        let id = if update {
            agent
                .apply(&spec(port, &format!("v{round}")))
                .await
                .expect("update")
                .rollout_id
        } else {
            agent
                .client()
                .await
                .restart(pb::RestartRequest {
                    name: "roll".into(),
                    force: false,
                    ..Default::default()
                })
                .await
                .expect("restart")
                .into_inner()
                .rollout_id
        };
        let status = loop {
            let r = agent
                .client()
                .await
                .get_rollout(pb::GetRolloutRequest { id: id.clone() })
                .await
                .expect("get rollout")
                .into_inner();
            if r.state() != pb::RolloutState::Running || load.now() - t0 > ROLLOUT_TIMEOUT {
                break r;
            }
            // Not more often: a tight poll of the agent would load the very CPU measured.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let t1 = load.now();
        let cpu1 = cpu_time(agent.pid());
        // Let the last old instance's requests finish before the load stops.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let queue = sampler.map(QueueSampler::finish).unwrap_or_default();
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
            "{} {id}: {state} in {:.2} s; {} ok, {} failed; longest gap {} ({} before)",
            if update { "update " } else { "restart" },
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
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
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
            println!(
                "  slow: started {:+.3} s, took {}, answered by {:?}; events around it: [{}]",
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
        });
        healthy().await;
    }
    summary(&all);
    agent.delete("roll").await.expect("delete");
}

fn summary(all: &[Round]) {
    if all.is_empty() {
        return;
    }
    let worst = |f: &dyn Fn(&Round) -> f64| all.iter().map(f).fold(0.0, f64::max);
    let p99 = worst(&|r| r.p99.1.as_secs_f64() / r.p99.0.as_secs_f64().max(1e-9));
    let max = worst(&|r| r.max.1.as_secs_f64() / r.max.0.as_secs_f64().max(1e-9));
    let failed: usize = all.iter().map(|r| r.failed).sum();
    let succeeded = all.iter().filter(|r| r.succeeded).count();
    let mut took: Vec<Duration> = all.iter().map(|r| r.took).collect();
    took.sort();
    let gap = all.iter().map(|r| r.gap).max().unwrap_or_default();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "rollouts: {succeeded} of {} succeeded; duration median {:.2} s, max {:.2} s (target ≤ 6 s: {}); failed requests {failed} (target 0: {}); longest gap {} (target ≤ 10 ms: {})",
        all.len(),
        took[took.len() / 2].as_secs_f64(),
        took[took.len() - 1].as_secs_f64(),
        verdict(took[took.len() - 1] <= Duration::from_secs(6)),
        verdict(failed == 0),
        ms(gap),
        verdict(gap <= Duration::from_millis(10)),
    );
    println!(
        "tail: worst p99 during / before {p99:.2}x (bar ≤ 1.2x: {}); worst max during / before {max:.2}x (bar ≤ 2x: {})",
        verdict(p99 <= 1.2),
        verdict(max <= 2.0),
    );
}
