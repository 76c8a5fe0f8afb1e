//! Start/stop/replace latency, memory and API latency of a real corrald, as root.
//!
//!   cargo build --release --workspace && sudo target/release/corral-bench [ROUNDS] [SECTION...]
//!
//! Sections: `core` (start/stop/replace/List/memory/re-adoption/log throughput), `start`
//! (only the start figures of `core`: apply -> 1 and 50 executed, kill -9 -> replaced, the
//! first and the last also step by step: API, admission, cgroup, clone, init setup, exec), `health`
//! (200 instances probed every second: agent CPU and probe schedule jitter), `idle` (200
//! instances, no probes: agent CPU), `cpu-weight` (`corral list` while 20 CPU-bound instances
//! saturate the CPUs, with each `--cpu-weight`), `events` (Watch fan-out), `rollout` (rolling restarts and
//! updates of 4 HTTP instances, [health] and [rollout] at their defaults, under 16 clients:
//! duration, failed requests, longest gap, latency p50/p99/p99.9/max during each rollout
//! against an equal window before it, the agent's CPU; see `corral_e2e::rollbench`),
//! `rollout-hey` (the same rollouts measured from outside by `hey -c 16`, needs `hey`; each
//! window also gives the host's longest CPU stall, see `corral_e2e::stalls`),
//! `rollout-peer` (the same servers under supervisord, restarted one by one, measured the same
//! way; needs `hey` and `supervisor`; for both, `CORRAL_BENCH_SERVERS=python,rust` picks the
//! variants, and `CORRAL_BENCH_HEY_CPUS=0` runs `hey` on those CPUs only, the benchmark being
//! run with `taskset -c` on the others, and `CORRAL_BENCH_SESSIONS=1` runs `hey` and
//! supervisord each in a session of its own), `api` (Get latency and calls per second from 32 clients
//! over mutual TLS and over the Unix socket; agent RSS around 100 000 mixed calls during
//! rollouts), `artifact` (a cold fetch + verify + unpack of a 50 MB artifact from a loopback
//! server against `curl | sha256sum` and `tar xzf` of the same file), `confine` (start cost
//! of the default confinement against the isolation of earlier releases: seccomp unconfined,
//! the host's /dev and /proc, no cgroup namespace; and of `userns` on top; at least 50
//! replacements each, to the replacement's exec event), `metrics` (200 instances: `/metrics` scrape latency and agent CPU
//! per scrape, agent RSS with `--metrics` and without), `jobs` (RunJob -> the job's process
//! executed; a 1-second schedule held for JOBS_HOLD_SECS, default 120: how late each run's
//! process executed after its due second, and the agent's CPU), `coldstart` (connect() to the
//! first response byte of a server already running, started by `systemd-socket-activate`,
//! started by corral with `[scale] min = 0`; the autoscaler's CPU with 100 scaled services),
//! `host-stalls` (ROUNDS seconds of a real-time thread per CPU waking every millisecond: how
//! late the host let it wake, with nothing else running), `fleet` (needs etcd: `corral fleet
//! apply` to running on 3 hosts against a local apply, etcd requests per idle agent, 200
//! simulated agents against one etcd; see `corral_e2e::fleetbench`).
//! Default: all.
//!
//! Every instance runs `corral-testbin signal-fifo FIFO`, which writes one byte to a FIFO the
//! benchmark reads: the byte arrives once the service process has executed (inside its cgroup
//! and namespaces, under its init) and started. The start figures of `core` and `jobs` end at
//! the kernel's exec event of the service process instead (`corral_e2e::execwatch`), and give
//! the first-write figures beside them. Figures are printed as median / p90 / max over ROUNDS
//! (default 20).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_e2e::execwatch::{Exec, ExecWatch, monotonic_ns};
use corral_e2e::fifo::Fifo;
use corral_e2e::{Agent, pb, testbin};

/// With `CORRAL_BENCH_RAW` set, also the samples in the order they were taken.
fn stats(name: &str, mut v: Vec<Duration>, unit_ms: bool) {
    let f = |d: Duration| {
        if unit_ms {
            format!("{:.2} ms", d.as_secs_f64() * 1e3)
        } else {
            format!("{:.0} µs", d.as_secs_f64() * 1e6)
        }
    };
    if std::env::var_os("CORRAL_BENCH_RAW").is_some() {
        let raw: Vec<String> = v.iter().map(|d| f(*d)).collect();
        println!("{name}: {}", raw.join(", "));
    }
    v.sort();
    let pick = |q: f64| v[corral_e2e::quantile_index(v.len(), q)];
    println!(
        "{name:<48} median {:>10}  p90 {:>10}  p99 {:>10}  max {:>10}  (n={})",
        f(pick(0.5)),
        f(pick(0.9)),
        f(pick(0.99)),
        f(v[v.len() - 1]),
        v.len()
    );
}

fn spec(name: &str, replicas: u32, fifo: &Path, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [{:?}, \"signal-fifo\", {:?}]\nreplicas = {replicas}\n[resources]\ncpu = 0.5\nmemory = \"64MiB\"\npids = 64\n[stop]\ngrace = \"5s\"\n{extra}",
        testbin(),
        fifo.display().to_string()
    )
}

/// utime + stime of a process, in clock ticks.
fn clock_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// The timestamps of the first and last records across an instance's stdout files.
fn record_span(dir: &Path) -> (std::time::SystemTime, std::time::SystemTime) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("stdout.log"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let ts = |l: &str| l.get(..27).and_then(|t| humantime::parse_rfc3339(t).ok());
    let mut first = None;
    let mut last = None;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for l in text.lines() {
            if let Some(t) = ts(l) {
                first = Some(first.map_or(t, |x: std::time::SystemTime| x.min(t)));
                last = Some(last.map_or(t, |x: std::time::SystemTime| x.max(t)));
            }
        }
    }
    let now = std::time::SystemTime::now();
    (first.unwrap_or(now), last.unwrap_or(now))
}

async fn apply(agent: &Agent, toml: &str) {
    agent.apply(toml).await.expect("apply");
}

async fn delete(agent: &Agent, name: &str) {
    agent.delete(name).await.expect("delete");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !corral_e2e::is_root() {
        eprintln!("corral-bench: needs root");
        std::process::exit(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let sections: Vec<&str> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .map(String::as_str)
        .collect();
    let wants = |s: &str| sections.is_empty() || sections.contains(&s);
    if wants("core") {
        core(rounds).await;
    }
    if wants("start") {
        start(rounds).await;
    }
    if wants("memory") {
        let dir = PathBuf::from(format!("/var/tmp/corral-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bench dir");
        let agent = Agent::start_full_args("warn", &["--overcommit", "cpu=100"]).await;
        let mut fifo = Fifo::new(&dir, "memory");
        memory(&agent, &mut fifo, rounds).await;
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if wants("confine") {
        confine(rounds.max(50)).await;
    }
    if wants("health") {
        health().await;
    }
    if wants("idle") {
        idle().await;
    }
    if wants("cpu-weight") {
        for how in ["fixed", "per-instance"] {
            cpu_weight(how).await;
        }
    }
    if wants("events") {
        events().await;
    }
    if wants("host-stalls") {
        // ROUNDS seconds of the probe alone.
        let secs = u64::try_from(rounds).unwrap_or(20);
        tokio::task::spawn_blocking(move || corral_e2e::stalls::bench(secs))
            .await
            .expect("host-stalls");
    }
    if wants("rollout") {
        corral_e2e::rollbench::bench(rounds.clamp(1, 5)).await;
    }
    // `CORRAL_BENCH_SERVERS=python+weighted,rust`: only these variants.
    let servers = std::env::var("CORRAL_BENCH_SERVERS").unwrap_or_default();
    let variant = |s: &str| servers.is_empty() || servers.split(',').any(|v| v == s);
    if wants("rollout-hey") {
        for server in [
            "rust",
            "python",
            "python+no-surge",
            "python+weighted",
            "python+weighted+no-surge",
            "python+start-cpu",
            "python+weighted+start-cpu",
            "python+weighted+no-surge+start-cpu",
            "python+idle",
            "python+weighted+idle",
            "python+own-cpu",
            "python+own-cpu+weighted+start-cpu",
        ] {
            if variant(server) {
                corral_e2e::rollbench::bench_hey(rounds.clamp(1, 5), server).await;
            }
        }
    }
    if wants("rollout-peer") {
        for server in ["rust", "python", "python+idle", "python+nested"] {
            if variant(server) {
                corral_e2e::rollbench::bench_supervisord(rounds.clamp(1, 5), server).await;
            }
        }
    }
    if wants("api") {
        api().await;
    }
    if wants("artifact") {
        corral_e2e::artifacts::bench(rounds.clamp(1, 5)).await;
    }
    if wants("artifact") || wants("image") {
        image_start(rounds.clamp(1, 5)).await;
    }
    if wants("metrics") {
        metrics(rounds.max(50)).await;
    }
    if wants("coldstart") {
        corral_e2e::coldstart::bench(rounds.max(50)).await;
    }
    if wants("jobs") {
        jobs(rounds.max(50)).await;
    }
    if wants("fleet") {
        corral_e2e::fleetbench::bench(corral_e2e::fleetbench::Config::from_env(
            rounds.clamp(1, 20),
        ))
        .await;
    }
}

/// Jobs: RunJob -> the run's process executed (it writes one byte to a FIFO and exits), over
/// `rounds` runs; then a job scheduled every second, held for JOBS_HOLD_SECS (default 120):
/// how long after its due second each run's process wrote its byte, and the agent's CPU.
async fn jobs(rounds: usize) {
    let dir = PathBuf::from(format!("/var/tmp/corral-bench-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let agent = Agent::start_logging(None, &phases_filter()).await;
    let mut fifo = Fifo::new(&dir, "jobs");
    let fifo_path = fifo.path.display().to_string();
    let job = |name: &str, extra: &str| {
        format!(
            "name = \"{name}\"\nkind = \"job\"\ncommand = [{:?}, \"signal-fifo-exit\", {:?}]\n\
             [resources]\ncpu = 0.5\nmemory = \"64MiB\"\npids = 64\n{extra}",
            testbin(),
            fifo_path
        )
    };
    apply(&agent, &job("trigger", "[job]\nhistory = 5\n")).await;
    let mut client = agent.client().await;
    let mut watch = ExecWatch::subscribe();
    let (mut took, mut took_write) = (Timed::default(), Vec::new());
    for _ in 0..rounds {
        let (t0, t) = (monotonic_ns(), Instant::now());
        client
            .run_job(pb::RunJobRequest {
                name: "trigger".into(),
                overrides: None,
            })
            .await
            .expect("run job");
        fifo.wait_bytes(1).await;
        took_write.push(t.elapsed());
        took.push(&mut watch, &fifo_path, t0);
        // Let the run end and be cleaned up before the next.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stats("RunJob -> job process executed", took.took, true);
    stats("RunJob -> job process's first write", took_write, true);
    phases("RunJob", "the call", &agent.log_text(), &watch, &took.marks);
    delete(&agent, "trigger").await;

    let hold: u64 = std::env::var("JOBS_HOLD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    apply(
        &agent,
        &job(
            "every-second",
            "[schedule]\ncron = \"* * * * * *\"\n[job]\nhistory = 5\n",
        ),
    )
    .await;
    // Skip the first run: it may be due in the second of the apply.
    fifo.wait_bytes(1).await;
    let pid = agent.pid().expect("pid");
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    let mut drift = Vec::new();
    while t0.elapsed() < Duration::from_secs(hold) {
        // A run every second.
        fifo.arrivals(1, Duration::from_secs(5)).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        // Due at the whole second just past.
        drift.push(Duration::from_nanos(u64::from(now.subsec_nanos())));
    }
    let cpu = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    stats(
        "1 s schedule: due second -> job process executed",
        drift,
        true,
    );
    println!("1 s schedule held {hold} s: agent CPU {cpu:.2} % of one core");
    delete(&agent, "every-second").await;
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The services of the `metrics` section: 200 instances with every limit set (so every
/// cgroup file a scrape reads exists) and a TCP probe (so each has its probe histogram).
fn metrics_services() -> Vec<String> {
    (0..4)
        .map(|s| {
            format!(
                "name = \"scraped-{s}\"\ncommand = [{:?}, \"health-server\"]\nreplicas = 50\n\
                 [resources]\ncpu = 0.5\nmemory = \"64MiB\"\npids = 64\n[ports]\ntcp = \"auto\"\n\
                 [health]\ntcp = \"127.0.0.1:{{port.tcp}}\"\ninterval = \"15s\"\ntimeout = \"1s\"\n",
                testbin()
            )
        })
        .collect()
}

/// Start the `metrics` section's 200 instances and wait until they all run and have been
/// probed once; returns the service names.
async fn start_scraped(agent: &Agent) -> Vec<String> {
    let names: Vec<String> = (0..4).map(|s| format!("scraped-{s}")).collect();
    for toml in metrics_services() {
        apply(agent, &toml).await;
    }
    for n in &names {
        agent.wait_running(n, 50).await;
    }
    // The first probes run within 1 s of the start; then the agent is idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    names
}

/// GET `url`: the time it took and the body.
async fn scrape(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<hyper::body::Bytes>,
    >,
    url: &str,
) -> (Duration, String) {
    use http_body_util::BodyExt;
    let t = Instant::now();
    let req = hyper::Request::get(url)
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .body(http_body_util::Empty::new())
        .expect("request");
    let resp = client.request(req).await.expect("scrape");
    assert!(resp.status().is_success(), "scrape: {}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (t.elapsed(), String::from_utf8_lossy(&body).into_owned())
}

/// `/metrics` with 200 instances: scrape latency (client side, OpenMetrics as Prometheus asks
/// for it) and the agent's CPU per scrape (its CPU over `rounds` back-to-back scrapes, less
/// what it uses idle over as long), what a 15 s scrape interval costs, and the agent's RSS
/// with and without `--metrics` (each agent running the same 200 instances, after the same
/// settling; with metrics after the scrapes).
async fn metrics(rounds: usize) {
    // Figures of unoptimized code say nothing of the product, and on a shared host the load
    // inflates them: say what was measured, and on what.
    let profile = if cfg!(debug_assertions) {
        "a DEBUG build: build with --release for figures"
    } else {
        "release"
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "metrics: binaries in {} ({profile}); load average {}",
        corral_e2e::bin_dir().display(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Without --metrics first.
    // 200 instances with CPU limits commit more cores than this host has: admitted by the
    // same overcommit ratio on both agents.
    let rss_off = {
        let agent = Agent::start_full_args("warn", &["--overcommit", "cpu=100"]).await;
        let names = start_scraped(&agent).await;
        let rss = corral_e2e::rss_kib(agent.pid().expect("pid"));
        for n in &names {
            delete(&agent, n).await;
        }
        rss
    };
    let port = corral_e2e::free_port();
    let addr = format!("127.0.0.1:{port}");
    // The agent logs each scrape's phases at debug: one line per scrape.
    let agent = Agent::start_full_args(
        "warn,corral_agent::metrics=debug",
        &["--metrics", &addr, "--overcommit", "cpu=100"],
    )
    .await;
    let names = start_scraped(&agent).await;
    let pid = agent.pid().expect("pid");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let url = format!("http://{addr}/metrics");
    let (_, body) = scrape(&client, &url).await;
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    // Idle CPU over 10 s, then `rounds` scrapes back to back.
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_rate = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64();
    let (c1, t1) = (cpu_secs(pid), Instant::now());
    let mut latencies = Vec::new();
    for _ in 0..rounds {
        latencies.push(scrape(&client, &url).await.0);
    }
    let spent = cpu_secs(pid) - c1 - idle_rate * t1.elapsed().as_secs_f64();
    let per_scrape = spent.max(0.0) / rounds as f64;
    let rss_on = corral_e2e::rss_kib(pid);
    println!(
        "metrics: one scrape of 200 instances: {series} series, {} KiB (OpenMetrics)",
        body.len() / 1024
    );
    stats("metrics: scrape latency (client side)", latencies, true);
    // The agent's own account of each scrape: the supervisor's sample, the cgroup and log
    // reads, the encoding (the first scrape, which opens every stat file, included).
    let log = agent.log_text();
    for phase in ["sample_us", "read_us", "encode_us"] {
        let v: Vec<Duration> = log
            .lines()
            .filter(|l| l.contains("scrape"))
            .filter_map(|l| log_field(l, phase))
            .map(Duration::from_micros)
            .collect();
        if !v.is_empty() {
            stats(&format!("metrics: agent's {phase} per scrape"), v, false);
        }
    }
    println!(
        "metrics: agent CPU per scrape {:.2} ms; at a 15 s interval {:.4} % of one core          (idle agent: {:.3} % of a core)",
        per_scrape * 1e3,
        per_scrape / 15.0 * 100.0,
        idle_rate * 100.0
    );
    println!(
        "metrics: agent RSS with 200 instances: {rss_off} KiB without --metrics, {rss_on} KiB          with it after {} scrapes ({:+} KiB)",
        rounds + 1,
        i128::from(rss_on) - i128::from(rss_off)
    );
    for n in &names {
        delete(&agent, n).await;
    }
}

/// The number after `name=` in a text log line.
fn log_field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Apply -> 50 instances whose service process runs (seen through `Get`, polled every 2 ms),
/// from the cached busybox image against the same from the host's own binary, side by side.
async fn image_start(rounds: usize) {
    let Some(busybox) = corral_e2e::oci::image::busybox() else {
        return;
    };
    let dir = PathBuf::from(format!(
        "/var/tmp/corral-bench-image-{}",
        std::process::id()
    ));
    let image = corral_e2e::oci::image::busybox_image(&busybox, "app");
    let layout = dir.join("busybox.oci");
    image.write_dir(&layout);
    let agent = Agent::start_logging(None, "warn").await;
    let from_image = |name: &str| {
        format!(
            "name = \"{name}\"\ncommand = [\"/bin/busybox\", \"sleep\", \"1000\"]\nreplicas = 50\n[image]\nurl = \"{}\"\ndigest = \"{}\"\n[stop]\ngrace = \"1s\"\n",
            layout.display(),
            image.manifest
        )
    };
    let from_host = |name: &str| {
        format!(
            "name = \"{name}\"\ncommand = [\"/bin/sleep\", \"1000\"]\nreplicas = 50\n[stop]\ngrace = \"1s\"\n"
        )
    };
    // Warm the store: the image is fetched and unpacked once.
    apply(
        &agent,
        &from_image("warm").replace("replicas = 50", "replicas = 1"),
    )
    .await;
    agent.wait_running("warm", 1).await;
    delete(&agent, "warm").await;
    let mut host = Vec::new();
    let mut img = Vec::new();
    for r in 0..rounds {
        for (kind, text) in [
            ("host", from_host(&format!("host-{r}"))),
            ("image", from_image(&format!("image-{r}"))),
        ] {
            let name = format!("{kind}-{r}");
            let t = Instant::now();
            apply(&agent, &text).await;
            loop {
                let s = agent.get(&name).await.expect("status");
                let running = s
                    .instances
                    .iter()
                    .filter(|i| i.state == pb::InstanceState::Running as i32 && i.pid > 0)
                    .count();
                if running == 50 {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "{name}: 50 instances did not start"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let took = t.elapsed();
            if kind == "host" {
                host.push(took);
            } else {
                img.push(took);
            }
            delete(&agent, &name).await;
        }
    }
    stats("apply -> 50 host-command instances running", host, true);
    stats(
        "apply -> 50 image instances running (cached image)",
        img,
        true,
    );
    // A service keeps the image in the store while crun runs its rootfs.
    apply(
        &agent,
        &from_image("keep").replace("replicas = 50", "replicas = 1"),
    )
    .await;
    agent.wait_running("keep", 1).await;
    crun_start(&agent, &dir, rounds).await;
    delete(&agent, "keep").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same 50 `busybox sleep` containers from the same unpacked rootfs (the store's, shared
/// read-only) started by `crun run -d` (Debian's `crun`), all at once, until every `crun`
/// returned with its container running; in cgroups named after the bench's own. Skipped,
/// saying so, without `crun` or when it fails.
///
/// crun 1.8 refuses a hybrid v1/v2 host, even with `--cgroup-manager=disabled`. There each
/// `crun` runs in its own mount namespace whose `/sys/fs/cgroup` is the unified (v2)
/// hierarchy, which holds no controllers on such a host: crun then makes a cgroup per
/// container without limits and without a device program (its BPF loading raises
/// `RLIMIT_MEMLOCK`, which needs `CAP_SYS_RESOURCE`). It does less than corral there, which
/// sets limits in four v1 hierarchies; the report says so.
async fn crun_start(agent: &Agent, dir: &Path, rounds: usize) {
    let Ok(version) = std::process::Command::new("crun").arg("--version").output() else {
        println!("crun: not installed, no comparison (apt-get install crun)");
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout);
    let rootfs = std::fs::read_dir(agent.state_dir.join("artifacts/images"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.path().join("rootfs"));
    let Some(rootfs) = rootfs.filter(|r| r.is_dir()) else {
        println!("crun: the image's rootfs is not in the store, no comparison");
        return;
    };
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let spec = std::process::Command::new("crun")
        .arg("spec")
        .current_dir(&bundle)
        .status();
    if !spec.is_ok_and(|s| s.success()) {
        println!("crun: `crun spec` failed, no comparison");
        return;
    }
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config.json")).expect("json");
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["/bin/busybox", "sleep", "1000"]);
    config["root"]["path"] = rootfs.display().to_string().into();
    config["root"]["readonly"] = true.into();
    let hybrid = corral_e2e::cgroup::hybrid();
    if hybrid && let Some(linux) = config["linux"].as_object_mut() {
        linux.remove("resources");
    }
    let crun = || {
        let mut c = std::process::Command::new("crun");
        if hybrid {
            unified_only(&mut c);
        }
        c
    };
    let run = |id: &str| {
        let mut c = config.clone();
        c["linux"]["cgroupsPath"] = format!("{}/crun-{id}", agent.cgroup.flag()).into();
        let b = dir.join(format!("bundle-{id}"));
        std::fs::create_dir_all(&b).expect("bundle");
        std::fs::write(b.join("config.json"), serde_json::to_vec(&c).expect("json"))
            .expect("config");
        // The container keeps crun's stderr: a file, not a pipe that would stay open.
        let stderr = b.join("stderr");
        let file = std::fs::File::create(&stderr).expect("stderr file");
        let child = crun()
            .args(["run", "-d", "--bundle"])
            .arg(&b)
            .arg(id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("crun run");
        (child, stderr)
    };
    let mut took = Vec::new();
    for r in 0..rounds {
        let ids: Vec<String> = (0..50).map(|i| format!("corral-bench-{r}-{i}")).collect();
        let t = Instant::now();
        let children: Vec<_> = ids.iter().map(|id| run(id)).collect();
        let mut failed = None;
        for (mut c, stderr) in children {
            if !c.wait().expect("crun").success() {
                failed = Some(std::fs::read_to_string(stderr).unwrap_or_default());
            }
        }
        let elapsed = t.elapsed();
        for id in &ids {
            let _ = crun()
                .args(["delete", "-f", id])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if hybrid {
            // The parent crun made its container cgroups in, named after the bench's own.
            let _ = std::fs::remove_dir(
                Path::new(corral_e2e::cgroup::UNIFIED).join(agent.cgroup.flag()),
            );
        }
        if let Some(why) = failed {
            println!(
                "crun: a container did not start, no comparison: {}",
                why.trim()
            );
            return;
        }
        took.push(elapsed);
    }
    stats(
        &format!(
            "crun run -d -> 50 containers running (same rootfs; {}{})",
            version.lines().next().unwrap_or("crun").trim(),
            if hybrid {
                "; hybrid host: unified hierarchy only, no limits, no device program"
            } else {
                ""
            }
        ),
        took,
        true,
    );
}

/// Runs `cmd` in its own mount namespace that shows the unified hierarchy at
/// `/sys/fs/cgroup`, so that crun takes the host for a v2 one.
fn unified_only(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // Made before the fork: nothing is allocated between fork and exec.
    let unified = std::ffi::CString::new(corral_e2e::cgroup::UNIFIED).unwrap_or_default();
    // SAFETY: between fork and exec only unshare(2) and mount(2) are called, on C strings
    // made before; both are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                unified.as_ptr(),
                c"/sys/fs/cgroup".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))
        });
    }
}

/// `Get` from every client, each on its own connection, for `for_how_long`: the latencies
/// and the calls per second.
async fn get_loop(
    clients: Vec<pb::agent_client::AgentClient<tonic::transport::Channel>>,
    for_how_long: Duration,
) -> (Vec<Duration>, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut v = Vec::new();
                while started.elapsed() < for_how_long {
                    let t = Instant::now();
                    c.get(pb::GetRequest { name: "web".into() })
                        .await
                        .expect("get");
                    v.push(t.elapsed());
                }
                v
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    (all, rate)
}

async fn api() {
    use corral_e2e::apiload::{self, Client, Until};
    use corral_e2e::pki::{self, Ca};
    const CLIENTS: usize = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "bench");
    let server = ca.server("server");
    let admin = ca.client("admin", "scheduler", Some("admin"));
    let read = ca.client("read", "dashboard", Some("read"));
    let port = corral_e2e::free_port();
    let agent = Agent::start_tls("warn", port, &server, &ca.cert).await;
    let web = corral_e2e::free_port();
    let spec = format!(
        "name = \"web\"\ncommand = [{:?}, \"http-listen\", \"50\"]\nreplicas = 2\n[ports]\nadmin = \"auto\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{web}\"\n[health]\nhttp = \"http://127.0.0.1:{{port.admin}}/healthz\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\n[rollout]\nmin_healthy = \"300ms\"\n",
        testbin()
    );
    apply(&agent, &spec).await;
    for _ in 0..300 {
        if agent.get("web").await.is_ok_and(|s| s.healthy == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = agent.pid().expect("pid");
    println!(
        "API: {CLIENTS} clients, each on its own connection, Get of a 2-instance service for 5 s"
    );
    for transport in ["unix", "mtls"] {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(match transport {
                "unix" => corral_e2e::connect(&agent.socket).await.expect("unix"),
                _ => pb::agent_client::AgentClient::new(
                    pki::channel(port, &ca.cert, Some(&read))
                        .await
                        .expect("mtls"),
                ),
            });
        }
        // Warm up the connections.
        let _ = get_loop(clients.clone(), Duration::from_millis(500)).await;
        let (one, rate) = get_loop(clients[..1].to_vec(), Duration::from_secs(2)).await;
        stats(&format!("Get over {transport}, one client"), one, true);
        println!(
            "{:<48} {rate:.0} calls/s",
            format!("Get over {transport}, one client: throughput")
        );
        let (lat, rate) = get_loop(clients, Duration::from_secs(5)).await;
        stats(&format!("Get over {transport}"), lat, true);
        println!(
            "{:<48} {rate:.0} calls/s",
            format!("Get over {transport}: throughput")
        );
    }

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let id = if i % 2 == 0 { &admin } else { &read };
        clients.push(Client {
            api: pb::agent_client::AgentClient::new(
                pki::channel(port, &ca.cert, Some(id)).await.expect("mtls"),
            ),
            admin: i % 2 == 0,
        });
    }
    let fresh = corral_e2e::rss_kib(pid);
    // Fill what is bounded (the live event window, pools, connections) before measuring.
    let warm = apiload::run(clients.clone(), "web", &spec, Until::Calls(20_000)).await;
    assert!(
        warm.unexpected.is_empty(),
        "{:?}",
        &warm.unexpected[..warm.unexpected.len().min(5)]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 1..=2 {
        let before = corral_e2e::rss_kib(pid);
        let t = Instant::now();
        let out = apiload::run(clients.clone(), "web", &spec, Until::Calls(100_000)).await;
        let took = t.elapsed();
        let during = corral_e2e::rss_kib(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = corral_e2e::rss_kib(pid);
        println!(
            "round {round}: 100 000 mixed calls over mTLS from {CLIENTS} clients (half admin, half read) during rollouts: {} calls in {:.1} s ({:.0}/s), {} unexpected outcomes, refusals {:?}",
            out.total(),
            took.as_secs_f64(),
            out.total() as f64 / took.as_secs_f64(),
            out.unexpected.len(),
            out.refusals
        );
        println!(
            "round {round}: agent RSS {before} KiB before (fresh with connections: {fresh} KiB), {during} KiB at the end, {after} KiB 2 s later: growth {} KiB",
            i128::from(after) - i128::from(before)
        );
    }
    delete(&agent, "web").await;
}

/// The start figures of `core` alone (apply -> 1 and 50 instances executed, kill -9 ->
/// replacement executed), for before/after comparisons of the spawn path.
async fn start(rounds: usize) {
    let dir = PathBuf::from(format!(
        "/var/tmp/corral-bench-start-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let agent = start_agent().await;
    let mut fifo = Fifo::new(&dir, "one");
    start_latency(&agent, &mut fifo, rounds).await;
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent for the start figures: 50 instances of 0.5 cores each on a small host are
/// committed on purpose beyond its CPUs.
async fn start_agent() -> Agent {
    let agent = Agent::start_full_args(&phases_filter(), &["--overcommit", "cpu=100"]).await;
    println!(
        "corrald {} ({})",
        corral_e2e::bin("corrald").display(),
        corral_e2e::cgroup::version_name()
    );
    agent
}

async fn core(rounds: usize) {
    let dir = PathBuf::from(format!("/var/tmp/corral-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let agent = start_agent().await;
    let mut fifo = Fifo::new(&dir, "one");
    start_latency(&agent, &mut fifo, rounds).await;
    rest_of_core(agent, fifo, rounds, &dir).await;
}

/// Apply -> one instance executed; apply -> 50 executed, and their delete; kill -9 -> the
/// replacement executed with backoff 0s. "Executed" is the kernel's exec event of the service
/// process (see `corral_e2e::execwatch`); the byte the process then writes to the FIFO gives
/// the same figures up to its first write, which include the service binary's own start.
async fn start_latency(agent: &Agent, fifo: &mut Fifo, rounds: usize) {
    let mut watch = ExecWatch::subscribe();
    let marker = fifo.path.display().to_string();

    // 1. Apply -> one instance executed.
    let (mut one, mut one_write) = (Timed::default(), Vec::new());
    for r in 0..rounds {
        let name = format!("one-{r}");
        let (t0, t) = (monotonic_ns(), Instant::now());
        apply(agent, &spec(&name, 1, &fifo.path, "")).await;
        fifo.wait_bytes(1).await;
        one_write.push(t.elapsed());
        one.push(&mut watch, &marker, t0);
        delete(agent, &name).await;
    }
    stats("apply -> 1 instance executed", one.took, true);
    stats("apply -> 1 instance's first write", one_write, true);
    phases(
        "apply -> 1",
        "the call",
        &agent.log_text(),
        &watch,
        &one.marks,
    );

    // 2. Apply -> 50 instances executed; 3. delete of 50 (exit on SIGTERM) -> all gone.
    let (mut fifty, mut fifty_write) = (Vec::new(), Vec::new());
    let mut stop = Vec::new();
    for r in 0..rounds.min(10) {
        let name = format!("fifty-{r}");
        let (t0, t) = (monotonic_ns(), Instant::now());
        apply(agent, &spec(&name, 50, &fifo.path, "")).await;
        fifo.wait_bytes(50).await;
        fifty_write.push(t.elapsed());
        fifty.push(watch.took(&marker, 50, t0));
        let t = Instant::now();
        delete(agent, &name).await;
        stop.push(t.elapsed());
    }
    stats("apply -> 50 instances executed", fifty, true);
    stats("apply -> 50 instances' first writes", fifty_write, true);
    stats("delete of 50 instances -> all gone", stop, true);

    // 4. kill -9 -> replacement executed, backoff 0s.
    apply(
        agent,
        &spec("k9", 1, &fifo.path, "[restart]\nbackoff = \"0s\"\n"),
    )
    .await;
    fifo.wait_bytes(1).await;
    let (mut replace, mut replace_write) = (Timed::default(), Vec::new());
    for _ in 0..rounds {
        let pid = agent.wait_running("k9", 1).await[0].pid;
        let (t0, t) = (monotonic_ns(), Instant::now());
        corral_e2e::kill9(pid);
        fifo.wait_bytes(1).await;
        replace_write.push(t.elapsed());
        replace.push(&mut watch, &marker, t0);
    }
    stats(
        "kill -9 -> replacement executed (backoff 0s)",
        replace.took,
        true,
    );
    stats("kill -9 -> replacement's first write", replace_write, true);
    phases(
        "kill -9 -> replacement",
        "the kill",
        &agent.log_text(),
        &watch,
        &replace.marks,
    );
    delete(agent, "k9").await;
}

/// The log filter of the agents whose starts are split into steps: their phase lines at
/// debug, the rest at warn; `CORRAL_BENCH_LOG` replaces it (e.g. `warn`, to time the starts
/// without the phase lines).
fn phases_filter() -> String {
    std::env::var("CORRAL_BENCH_LOG")
        .unwrap_or_else(|_| format!("warn,{}=debug", corral_agent::phases::TARGET))
}

/// Starts timed from their origin (a call, a kill) to their service's exec, each kept for
/// [`phases`].
#[derive(Debug, Default, Clone)]
struct Timed {
    took: Vec<Duration>,
    marks: Vec<(u64, Exec)>,
}

impl Timed {
    /// The next exec of `marker` after `t0`, from `watch`.
    fn push(&mut self, watch: &mut ExecWatch, marker: &str, t0: u64) {
        let exec = watch.next_exec(marker, t0);
        self.took.push(exec.since(t0));
        self.marks.push((t0, exec));
    }
}

/// Where the time of each start went, from `t0` (the call, or the kill) to the service's exec:
/// the agent's phase lines (`corral_agent::phases`, matched to the start by the init's PID)
/// between the kernel's fork of the init, its fork of the service, and the exec. Prints the
/// median etc. of each step over `starts`; steps the agent did not log (a start without an
/// API call) are left out.
fn phases(what: &str, origin: &str, log: &str, watch: &ExecWatch, starts: &[(u64, Exec)]) {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(corral_agent::phases::TARGET))
        .collect();
    // (step, samples), in the order of the path.
    let mut steps: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut agent_back = Vec::new();
    for &(t0, exec) in starts {
        let Some(service) = watch.fork_of(exec.pid) else {
            continue;
        };
        // The init forks the service: its PID is on the agent's start line.
        let init_pid = u64::try_from(service.parent).ok();
        let start = lines
            .iter()
            .rev()
            .find(|l| l.contains(" start") && log_field(l, "pid") == init_pid);
        let (Some(start), Some(init)) = (start, watch.fork_of(service.parent)) else {
            continue;
        };
        let (Some(begin), Some(cgroup), Some(spawned)) = (
            log_field(start, "begin_ns"),
            log_field(start, "cgroup_ns"),
            log_field(start, "spawned_ns"),
        ) else {
            continue;
        };
        let logged = |msg: &str, after: u64| {
            lines
                .iter()
                .filter(|l| l.contains(msg))
                .filter_map(|l| log_field(l, "at_ns"))
                .rfind(|&at| at >= after && at <= begin)
        };
        let received = logged("received", t0);
        let saved = logged("apply saved", received.unwrap_or(t0));
        let marks = [
            (origin, Some(t0)),
            ("the API handler", received),
            ("admitted and saved", saved),
            ("the instance's start", Some(begin)),
            ("its cgroup ready", Some(cgroup)),
            ("the init cloned", Some(init.at_ns)),
            ("the service forked", Some(service.at_ns)),
            ("executed", Some(exec.at_ns)),
        ];
        let present: Vec<(&str, u64)> = marks
            .iter()
            .filter_map(|&(name, at)| at.map(|at| (name, at)))
            .collect();
        for pair in present.windows(2) {
            let step = format!("  {} -> {}", pair[0].0, pair[1].0);
            let took = Duration::from_nanos(pair[1].1.saturating_sub(pair[0].1));
            match steps.iter_mut().find(|(s, _)| *s == step) {
                Some((_, v)) => v.push(took),
                None => steps.push((step, vec![took])),
            }
        }
        agent_back.push(Duration::from_nanos(spawned.saturating_sub(init.at_ns)));
    }
    if steps.is_empty() {
        println!(
            "{what}: no phase lines matched (is `{}=debug` in the agent's filter?)",
            corral_agent::phases::TARGET
        );
        return;
    }
    println!("{what}, step by step (agent's phase log and the kernel's fork/exec events):");
    for (step, v) in steps {
        stats(&step, v, false);
    }
    stats(
        "  (the init cloned -> the agent has its PID)",
        agent_back,
        false,
    );
}

async fn rest_of_core(agent: Agent, mut fifo: Fifo, rounds: usize, dir: &Path) {
    // 5. Memory with 200 instances; 6. List latency with 200 instances.
    memory(&agent, &mut fifo, rounds).await;

    // 7. Agent restart with 200 running instances: kill -9, start, until the API serves
    //    with every instance re-adopted (the API answers only after the restore).
    let mut agent = agent;
    let mut readopt = Vec::new();
    for _ in 0..rounds.min(10) {
        agent.stop_with(libc::SIGKILL);
        let t = Instant::now();
        agent.launch().await;
        readopt.push(t.elapsed());
        let l = agent
            .client()
            .await
            .list(pb::ListRequest::default())
            .await
            .expect("list")
            .into_inner();
        let running = l
            .services
            .iter()
            .flat_map(|s| &s.instances)
            .filter(|i| i.state == pb::InstanceState::Running as i32)
            .count();
        assert_eq!(running, 200, "all re-adopted");
    }
    stats(
        "agent restart -> 200 instances re-adopted, API serving",
        readopt,
        true,
    );
    for s in 0..4 {
        delete(&agent, &format!("many-{s}")).await;
    }

    // 8. Log throughput through one instance's init: 1 000 000 lines of 100 bytes.
    let lines: u64 = 1_000_000;
    let flood = format!(
        "name = \"flood\"\ncommand = [{:?}, \"flood\", \"{lines}\"]\n[logs]\nmax_size = \"64MiB\"\nmax_files = 4\n",
        testbin()
    );
    apply(&agent, &flood).await;
    let inst = agent.wait_running("flood", 1).await.remove(0);
    let t = Instant::now();
    corral_e2e::eventually(
        "the flood to be logged",
        Duration::from_secs(120),
        || async {
            agent
                .stdout_of(&inst.id)
                .contains("flood_done=")
                .then_some(())
        },
    )
    .await;
    let wall = t.elapsed();
    let (first, last) = record_span(&agent.state_dir.join("logs").join(&inst.id));
    let span = last
        .duration_since(first)
        .unwrap_or(wall)
        .as_secs_f64()
        .max(1e-6);
    let mb = (lines * 100) as f64 / 1e6;
    let ticks = clock_ticks(inst.init_pid);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = ticks as f64 / hz;
    println!(
        "log throughput (1M lines of 100 B): {:.0} MB/s, {:.0} lines/s (first to last record {:.2} s); init CPU {:.2} s = {:.1} ms per MB",
        mb / span,
        lines as f64 / span,
        span,
        cpu,
        cpu * 1e3 / mb
    );
    delete(&agent, "flood").await;
    drop(agent);
    let _ = std::fs::remove_dir_all(dir);
}

/// CPU time (utime + stime) of a process in seconds.
fn cpu_secs(pid: i32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    clock_ticks(pid) as f64 / hz
}

/// 200 instances (4 services of 50), each probed over TCP every second: the agent's CPU use
/// and how late probes start against their schedule (seen by the services as accept times).
async fn health() {
    let agent = Agent::start_logging(None, "warn").await;
    for s in 0..4 {
        let toml = format!(
            "name = \"probed-{s}\"\ncommand = [{:?}, \"health-server\"]\nreplicas = 50\nenv = {{ LOG_ACCEPTS = \"1\" }}\n[ports]\ntcp = \"auto\"\n[health]\ntcp = \"127.0.0.1:{{port.tcp}}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
            testbin()
        );
        apply(&agent, &toml).await;
    }
    for s in 0..4 {
        agent.wait_running(&format!("probed-{s}"), 50).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = agent.pid().expect("pid");
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    let window = Duration::from_secs(30);
    tokio::time::sleep(window).await;
    let (c1, t1) = (cpu_secs(pid), Instant::now());
    let cpu = (c1 - c0) / (t1 - t0).as_secs_f64() * 100.0;
    // Inter-arrival of each instance's probes: 1 s apart on schedule; the deviation is jitter.
    let mut jitter = Vec::new();
    for s in 0..4 {
        for i in 0..50 {
            let dir = agent.state_dir.join("logs").join(format!("probed-{s}-{i}"));
            let text = std::fs::read_to_string(dir.join("stdout.log")).unwrap_or_default();
            let times: Vec<std::time::SystemTime> = text
                .lines()
                .filter(|l| l.ends_with(" accept="))
                .filter_map(|l| l.get(..27).and_then(|t| humantime::parse_rfc3339(t).ok()))
                .collect();
            for w in times.windows(2) {
                let d = w[1].duration_since(w[0]).unwrap_or_default();
                jitter.push(Duration::from_secs_f64((d.as_secs_f64() - 1.0).abs()));
            }
        }
    }
    println!(
        "200 instances, tcp probe every 1 s: agent CPU {cpu:.2} % of one core over {} s",
        window.as_secs()
    );
    if jitter.is_empty() {
        println!("probe jitter: no probe arrivals seen");
    } else {
        stats(
            "probe schedule jitter (|inter-arrival - 1 s|)",
            jitter,
            true,
        );
    }
    for s in 0..4 {
        delete(&agent, &format!("probed-{s}")).await;
    }
}

/// 200 instances without probes: what the agent costs when nothing happens.
async fn idle() {
    let agent = Agent::start_logging(None, "warn").await;
    for s in 0..4 {
        let toml = format!(
            "name = \"idle-{s}\"\ncommand = [{:?}, \"serve\"]\nreplicas = 50\n",
            testbin()
        );
        apply(&agent, &toml).await;
    }
    for s in 0..4 {
        agent.wait_running(&format!("idle-{s}"), 50).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agent.pid().expect("pid");
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    println!("200 instances, no probes, idle: agent CPU {cpu:.3} % of one core over 30 s");
    for s in 0..4 {
        delete(&agent, &format!("idle-{s}")).await;
    }
}

/// `corral list` (the CLI, executed) while 20 CPU-bound instances saturate the CPUs, with
/// `--cpu-weight HOW`; with `per-instance` on cgroup v1 also with the agent moved into a cpu
/// cgroup of its own weighted like the whole tree.
async fn cpu_weight(how: &str) {
    const HOGS: usize = 20;
    let agent = Agent::start_full_args("warn", &["--cpu-weight", how]).await;
    apply(
        &agent,
        &format!(
            "name = \"hog\"\ncommand = [\"/bin/sh\", \"-c\", \"while :; do :; done\"]\nreplicas = {HOGS}\n"
        ),
    )
    .await;
    agent.wait_running("hog", HOGS).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let list = |label: &str| {
        let mut took: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                let out = agent.cli(&["list"]);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                assert!(out.status.success(), "corral list: {out:?}");
                std::thread::sleep(Duration::from_millis(100));
                ms
            })
            .collect();
        took.sort_by(f64::total_cmp);
        println!(
            "--cpu-weight {how}, {HOGS} CPU-bound instances, {label}: corral list median {:.1} ms, max {:.1} ms (15 runs)",
            took[took.len() / 2],
            took[took.len() - 1]
        );
    };
    list("the agent where it was started");
    if how == "per-instance" && agent.cgroup.version == corral_e2e::cgroup::Version::V1 {
        let tree = agent.cgroup.dir("cpu", "");
        let own = tree.with_file_name(format!("{}-agent", agent.cgroup.name));
        let pid = agent.pid().expect("pid").to_string();
        let shares = std::fs::read_to_string(tree.join("cpu.shares")).unwrap_or_default();
        std::fs::create_dir_all(&own).expect("create the agent's cpu cgroup");
        std::fs::write(own.join("cpu.shares"), shares.trim()).expect("write cpu.shares");
        std::fs::write(own.join("cgroup.procs"), &pid).expect("move the agent");
        list(&format!(
            "the agent in a cpu cgroup of {} shares",
            shares.trim()
        ));
        let back = tree.parent().expect("the tree has a parent");
        std::fs::write(back.join("cgroup.procs"), &pid).expect("move the agent back");
        let _ = std::fs::remove_dir(&own);
    }
    delete(&agent, "hog").await;
}

/// 50 concurrent watchers while 10 000 events are produced: all must receive all.
async fn events() {
    let agent = Agent::start_logging(None, "warn").await;
    apply(
        &agent,
        &format!(
            "name = \"ev\"\ncommand = [{:?}, \"serve\"]\nreplicas = 0\n",
            testbin()
        ),
    )
    .await;
    let start = {
        let mut w = agent
            .client()
            .await
            .watch(pb::WatchRequest {
                last: 1,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        w.message().await.ok().flatten().map_or(0, |e| e.index) + 1
    };
    let n: u64 = 10_000;
    let mut watchers = Vec::new();
    for _ in 0..50 {
        let mut w = agent
            .client()
            .await
            .watch(pb::WatchRequest {
                from_index: start,
                follow: true,
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        watchers.push(tokio::spawn(async move {
            let mut got = 0u64;
            let mut expect = start;
            while got < n {
                match w.message().await {
                    Ok(Some(e)) => {
                        if e.index != expect {
                            return Err(format!(
                                "gap or duplicate: {} after {}",
                                e.index,
                                expect - 1
                            ));
                        }
                        expect += 1;
                        got += 1;
                    }
                    Ok(None) => return Err("stream ended".to_string()),
                    Err(s) => return Err(s.message().to_string()),
                }
            }
            Ok(got)
        }));
    }
    let t = Instant::now();
    // Scale changes are events without fsync-free shortcuts: each is a real desired-state change.
    let mut client = agent.client().await;
    for i in 0..n {
        client
            .scale(pb::ScaleRequest {
                name: "ev".into(),
                replicas: (i % 2) as u32,
                ..Default::default()
            })
            .await
            .expect("scale");
    }
    let produced = t.elapsed();
    let mut ok = 0;
    for w in watchers {
        match w.await {
            Ok(Ok(got)) if got == n => ok += 1,
            Ok(Ok(got)) => println!("a watcher got {got} of {n}"),
            Ok(Err(e)) => println!("a watcher failed: {e}"),
            Err(e) => println!("a watcher task failed: {e}"),
        }
    }
    let delivered = t.elapsed();
    println!(
        "Watch fan-out: 50 watchers, {n} events produced in {:.2} s ({:.0} events/s); {ok}/50 watchers got all of them, all delivered after {:.2} s ({:.0} deliveries/s)",
        produced.as_secs_f64(),
        n as f64 / produced.as_secs_f64(),
        delivered.as_secs_f64(),
        (n * 50) as f64 / delivered.as_secs_f64()
    );
    delete(&agent, "ev").await;
}

/// The CPU time an instance's init and service process have used (`/proc/PID/schedstat`,
/// nanoseconds): for an instance that has been idle since it started, its start cost. `pid`
/// is the service process (its parent the init) or the init itself.
fn start_cpu(pid: i32) -> Option<Duration> {
    let run_ns = |pid: i32| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let (init, service) = if comm.trim() == "corral-init" {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        (pid, children.split_whitespace().next()?.parse().ok()?)
    } else {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        (rest.split_whitespace().nth(1)?.parse().ok()?, pid)
    };
    Some(Duration::from_nanos(run_ns(init)? + run_ns(service)?))
}

/// What the agent's resident set is made of, from `/proc/PID/smaps`, in KiB: its code (the
/// executable's and libraries' text), its other file pages (read-only data, relocations), the
/// heap (`[heap]` and glibc's other arenas: anonymous mappings of 64 MiB reservations), and
/// the other anonymous memory (thread stacks, tokio's buffers).
fn smaps_breakdown(pid: i32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut code, mut file, mut heap, mut anon, mut stack) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut header: Vec<String> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            header = line.split_whitespace().map(str::to_string).collect();
            continue;
        }
        let Some(kib) = line
            .strip_prefix("Rss:")
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue;
        };
        let perms = header.get(1).map_or("", String::as_str);
        let inode = header.get(4).map_or("0", String::as_str);
        let name = header.get(5).map_or("", String::as_str);
        let size = header
            .first()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
            })
            .unwrap_or(0);
        if inode != "0" && perms.contains('x') {
            code += kib;
        } else if inode != "0" {
            file += kib;
        } else if name == "[heap]" || (name.is_empty() && size >= 1 << 20) {
            heap += kib;
        } else if name == "[stack]" || name.is_empty() {
            stack += kib;
        } else {
            anon += kib;
        }
    }
    format!(
        "code {code} KiB, other file pages {file} KiB, heap and arenas {heap} KiB, small anonymous (thread stacks, ...) {stack} KiB, other {anon} KiB"
    )
}

/// 5. The agent's and the inits' memory with 200 instances; 6. List latency with them.
async fn memory(agent: &Agent, fifo: &mut Fifo, rounds: usize) {
    let rss_idle = corral_e2e::rss_kib(agent.pid().expect("pid"));
    for s in 0..4 {
        apply(agent, &spec(&format!("many-{s}"), 50, &fifo.path, "")).await;
    }
    fifo.wait_bytes(200).await;
    let mut list = Vec::new();
    let mut client = agent.client().await;
    for _ in 0..rounds.max(50) * 20 {
        let t = Instant::now();
        let l = client
            .list(pb::ListRequest::default())
            .await
            .expect("list")
            .into_inner();
        list.push(t.elapsed());
        assert_eq!(
            l.services.iter().map(|s| s.instances.len()).sum::<usize>(),
            200
        );
    }
    stats("List with 200 instances (Unix socket)", list, false);
    let rss = corral_e2e::rss_kib(agent.pid().expect("pid"));
    let s = agent.get("many-0").await.expect("get");
    let inits: Vec<i32> = s
        .instances
        .iter()
        .map(|i| i.init_pid)
        .filter(|p| *p > 0)
        .collect();
    let pss: Vec<u64> = inits.iter().map(|p| corral_e2e::pss_kib(*p)).collect();
    let rss_init: Vec<u64> = inits.iter().map(|p| corral_e2e::rss_kib(*p)).collect();
    println!("agent RSS: {rss_idle} KiB idle, {rss} KiB with 200 instances");
    println!(
        "init per instance: PSS {} KiB (mean of {}), RSS {} KiB",
        pss.iter().sum::<u64>() / pss.len().max(1) as u64,
        pss.len(),
        rss_init.iter().sum::<u64>() / rss_init.len().max(1) as u64
    );

    println!(
        "agent with 200 instances: {}",
        smaps_breakdown(agent.pid().expect("pid"))
    );
    let mean_pss = pss.iter().sum::<u64>() / pss.len().max(1) as u64;
    // The init zygote's own share (it shares its pages with the inits it forked).
    let zygote: u64 = corral_e2e::init_zygotes(agent.pid().expect("pid"))
        .into_iter()
        .map(corral_e2e::pss_kib)
        .sum();
    println!("init zygote: PSS {zygote} KiB");
    println!(
        "agent RSS + 200 x init PSS + zygote PSS: {:.1} MiB",
        (rss + 200 * mean_pss + zygote) as f64 / 1024.0
    );
}

/// Start cost of the default confinement: "kill -9 -> replacement executed" (no API in the
/// path: the agent starts the replacement itself), median over `rounds` (>= 50), with the
/// isolation of earlier releases, with the defaults and with `userns`, alternating so that
/// the machine's load falls on all alike; then 50 confined instances at once.
async fn confine(rounds: usize) {
    let dir = PathBuf::from(format!("/var/tmp/corral-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    // 50 instances of 0.5 cores each on a small host: committed on purpose beyond its CPUs.
    let agent = Agent::start_full_args(&phases_filter(), &["--overcommit", "cpu=100"]).await;
    println!(
        "confine: corrald {} ({})",
        corral_e2e::bin("corrald").display(),
        corral_e2e::cgroup::version_name()
    );
    let before = "[isolation]\nnamespaces = [\"pid\", \"mount\", \"uts\", \"ipc\"]\nseccomp = \"unconfined\"\ndevices = \"host\"\nsystem_paths = \"host\"\n";
    let configs = [
        ("before", before),
        ("default", ""),
        ("userns", "[isolation]\nuserns = true\n"),
    ];
    let mut fifos = Vec::new();
    for (name, iso) in configs {
        let fifo = Fifo::new(&dir, name);
        apply(
            &agent,
            &format!(
                "{}[restart]\nbackoff = \"0s\"\n",
                spec(name, 1, &fifo.path, iso)
            ),
        )
        .await;
        fifos.push(fifo);
    }
    for f in &mut fifos {
        f.wait_bytes(1).await;
    }
    let mut watch = ExecWatch::subscribe();
    let mut samples: Vec<Timed> = vec![Timed::default(); configs.len()];
    let mut cpu: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, (name, _)) in configs.iter().enumerate() {
            let pid = agent.wait_running(name, 1).await[0].pid;
            // Idle since it signalled: what its start cost in CPU time.
            if let Some(c) = start_cpu(pid) {
                cpu[i].push(c);
            }
            let t0 = monotonic_ns();
            corral_e2e::kill9(pid);
            fifos[i].wait_bytes(1).await;
            let marker = fifos[i].path.display().to_string();
            samples[i].push(&mut watch, &marker, t0);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut b, mut d, mut u) = (
        samples[0].took.clone(),
        samples[1].took.clone(),
        samples[2].took.clone(),
    );
    let (mb, md, mu) = (median(&mut b), median(&mut d), median(&mut u));
    stats("replacement, isolation of earlier releases", b, true);
    stats("replacement, default confinement", d, true);
    stats("replacement, default confinement + userns", u, true);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "added start cost of the default confinement: {:.3} ms (median {:.3} ms vs {:.3} ms)",
        ms(md) - ms(mb),
        ms(md),
        ms(mb)
    );
    println!(
        "added start cost of userns over the default: {:.3} ms (median {:.3} ms)",
        ms(mu) - ms(md),
        ms(mu)
    );
    // CPU time is not stretched by waiting for a loaded machine, unlike the wall time above;
    // it leaves out the agent's side (clone3 making the namespaces, the cgroup).
    let labels = [
        "instance CPU (init + service), earlier isolation",
        "instance CPU (init + service), default",
        "instance CPU (init + service), default + userns",
    ];
    let mut medians = [Duration::ZERO; 3];
    for ((label, mut v), m) in labels.iter().zip(cpu).zip(&mut medians) {
        if !v.is_empty() {
            *m = median(&mut v);
            stats(label, v, false);
        }
    }
    let us = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1e6;
    println!(
        "added instance CPU of the default confinement: {:.0} µs; of userns on top: {:.0} µs",
        us(medians[1], medians[0]),
        us(medians[2], medians[1])
    );
    let log = agent.log_text();
    for ((name, _), timed) in configs.iter().zip(&samples) {
        phases(
            &format!("replacement, {name}"),
            "the kill",
            &log,
            &watch,
            &timed.marks,
        );
    }
    for (name, _) in configs {
        delete(&agent, name).await;
    }
    let mut fifty = Vec::new();
    let mut fifo = Fifo::new(&dir, "fifty");
    for r in 0..5 {
        let name = format!("confined-{r}");
        let t0 = monotonic_ns();
        apply(&agent, &spec(&name, 50, &fifo.path, "")).await;
        fifo.wait_bytes(50).await;
        let marker = fifo.path.display().to_string();
        fifty.push(watch.took(&marker, 50, t0));
        delete(&agent, &name).await;
    }
    stats("apply -> 50 confined instances executed", fifty, true);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
