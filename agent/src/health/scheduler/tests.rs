use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::health::probe::ExecResult;
use crate::spec::Probe;

/// Exec probes without processes: `ok` exits 0 at once, `hang` never ends. Counts the hanging
/// runs started and dropped, to see that an aborted run is dropped.
#[derive(Debug, Default)]
struct FakeExec {
    /// Runs of `starting`: it fails its first five.
    starting_runs: AtomicUsize,
    hangs_started: AtomicUsize,
    hangs_dropped: Arc<AtomicUsize>,
}

struct CountDrop(Arc<AtomicUsize>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl ExecRunner for FakeExec {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        _timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = io::Result<ExecResult>> + Send + 'a>> {
        if argv[0] == "hang" {
            self.hangs_started.fetch_add(1, Ordering::SeqCst);
            let guard = CountDrop(self.hangs_dropped.clone());
            Box::pin(async move {
                let _guard = guard;
                std::future::pending().await
            })
        } else if argv[0] == "starting" {
            let run = self.starting_runs.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(ExecResult {
                    code: Some(if run < 5 { 1 } else { 0 }),
                    ..ExecResult::default()
                })
            })
        } else {
            Box::pin(async {
                Ok(ExecResult {
                    code: Some(0),
                    ..ExecResult::default()
                })
            })
        }
    }
}

fn spec(interval_ms: u64, timeout_ms: u64) -> HealthSpec {
    HealthSpec {
        probe: Some(Probe::Exec(vec!["ok".into()])),
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        start_period: Duration::ZERO,
        failure_threshold: 3,
        success_threshold: 1,
        restart_on_failure: true,
        notify: false,
    }
}

fn exec(program: &str) -> Target {
    Target::Exec {
        argv: vec![program.to_string()],
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<ProbeReport>) -> Vec<ProbeReport> {
    let mut reports = Vec::new();
    while let Ok(r) = rx.try_recv() {
        reports.push(r);
    }
    reports
}

#[tokio::test(start_paused = true)]
async fn a_hanging_probe_does_not_delay_another_instance() {
    let fake = Arc::new(FakeExec::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let spec = spec(1000, 500);
    let t0 = Instant::now();
    let slow = Prober::start(
        InstanceKey::new("web", 0),
        7,
        exec("hang"),
        &spec,
        fake.clone(),
        tx.clone(),
    );
    let fast = Prober::start(
        InstanceKey::new("web", 1),
        8,
        exec("ok"),
        &spec,
        fake.clone(),
        tx,
    );

    tokio::time::sleep(Duration::from_millis(9500)).await;
    let reports = drain(&mut rx);
    let of = |name: &str| -> Vec<&ProbeReport> {
        reports
            .iter()
            .filter(|r| r.instance.to_string() == name)
            .collect()
    };

    // The fast instance: first run within the first-run jitter, then one run every interval,
    // each started when due (the clock is paused, so any lateness would be ours; timers have a
    // resolution of 1 ms).
    let fast_reports = of("web-1");
    assert_eq!(fast_reports.len(), 10, "{fast_reports:#?}");
    assert!(fast_reports[0].at - t0 < Duration::from_millis(100));
    for pair in fast_reports.windows(2) {
        assert_eq!(pair[1].at - pair[0].at, Duration::from_secs(1));
    }
    for r in &fast_reports {
        assert!(r.at - r.scheduled < Duration::from_millis(1), "{r:?}");
        assert_eq!(r.generation, 8);
        assert!(r.outcome.healthy);
        assert_eq!(r.outcome.reason, "exit 0");
    }

    // The hanging one: every run cut at the timeout, on its own schedule.
    let slow_reports = of("web-0");
    assert!((9..=10).contains(&slow_reports.len()), "{slow_reports:#?}");
    for r in &slow_reports {
        assert_eq!(r.generation, 7);
        assert!(!r.outcome.healthy);
        assert_eq!(r.outcome.reason, "timed out after 500ms");
        assert!((500..502).contains(&r.outcome.elapsed.as_millis()), "{r:?}");
    }
    for pair in slow_reports.windows(2) {
        assert_eq!(pair[1].at - pair[0].at, Duration::from_secs(1));
    }

    drop((slow, fast));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Every hanging run was dropped: those cut by the timeout and the one in progress.
    assert_eq!(
        fake.hangs_started.load(Ordering::SeqCst),
        fake.hangs_dropped.load(Ordering::SeqCst)
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_stops_probing() {
    let fake = Arc::new(FakeExec::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = Prober::start(
        InstanceKey::new("web", 0),
        1,
        exec("hang"),
        &spec(1000, 1000),
        fake.clone(),
        tx,
    );
    let first = rx.recv().await.expect("a report");
    assert_eq!(first.outcome.reason, "timed out after 1s");
    // Drop it in the middle of the next run.
    tokio::time::sleep_until(first.scheduled + Duration::from_millis(1500)).await;
    assert_eq!(fake.hangs_started.load(Ordering::SeqCst), 2);
    drop(handle);
    // The task ended, so its sender is gone: the channel closes without another report.
    assert!(rx.recv().await.is_none());
    assert_eq!(fake.hangs_dropped.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fake.hangs_started.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_prober_ends_when_reports_are_no_longer_read() {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Prober::start(
        InstanceKey::new("web", 0),
        1,
        exec("ok"),
        &spec(1000, 1000),
        Arc::new(FakeExec::default()),
        tx,
    );
    drop(rx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(handle.is_finished());
}

#[test]
fn first_delays() {
    let ms = Duration::from_millis;
    let cases = [
        (ms(100), 0.0, ms(0)),
        (ms(100), 0.5, ms(5)),
        (ms(2000), 0.5, ms(100)),
        (ms(2000), 0.999, ms(199) + Duration::from_micros(800)),
        (Duration::from_secs(60), 0.5, ms(500)),
        (Duration::from_secs(3600), 0.999, ms(999)),
        (ms(2000), 7.0, ms(200)),
        (ms(2000), -1.0, ms(0)),
    ];
    for (interval, jitter, want) in cases {
        assert_eq!(first_delay(interval, jitter), want, "{interval:?} {jitter}");
    }
}

#[test]
fn next_due_times() {
    let t = Instant::now();
    let s = Duration::from_secs;
    // On time: the next run is one interval after this one was due, however long it took.
    assert_eq!(next_due(t, s(2), t + s(1)), t + s(2));
    assert_eq!(next_due(t, s(2), t + s(2)), t + s(2));
    // Overran: at once, and no catching up.
    assert_eq!(next_due(t, s(2), t + s(5)), t + s(5));
}

/// Fields 14 and 15 (utime, stime) of a `/proc/.../stat` file, in seconds.
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).expect("readable stat");
    let after_comm = stat.rsplit_once(") ").expect("a stat line").1;
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // after_comm starts at field 3 (state).
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// The CPU cost of probing: 200 tcp probers at a 1 s interval for 10 s against one local
/// listener (a blocking accept loop on its own thread, whose CPU time is reported apart).
/// Prints the figures; run with `cargo test -p corral-agent --lib --release -- --ignored
/// --nocapture probe_cost`.
#[test]
#[ignore = "benchmark: prints figures, takes 10 s"]
fn probe_cost_200_tcp_probers() {
    const PROBERS: usize = 200;
    const WINDOW: Duration = Duration::from_secs(10);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx
            .send(unsafe { libc::gettid() })
            .expect("receiver alive");
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let listener_stat = format!(
        "/proc/self/task/{}/stat",
        tid_rx.recv().expect("listener thread started")
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (reports, cpu, listener_cpu, wall) = runtime.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let spec = spec(1000, 1000);
        let exec: Arc<dyn ExecRunner> = Arc::new(FakeExec::default());
        let cpu0 = cpu_seconds("/proc/self/stat");
        let listener0 = cpu_seconds(&listener_stat);
        let t0 = std::time::Instant::now();
        let handles: Vec<ProbeHandle> = (0..u32::try_from(PROBERS).expect("a small count"))
            .map(|i| {
                Prober::start(
                    InstanceKey::new("svc", i),
                    1,
                    Target::Tcp { addr },
                    &spec,
                    exec.clone(),
                    tx.clone(),
                )
            })
            .collect();
        drop(tx);
        tokio::time::sleep(WINDOW).await;
        drop(handles);
        let wall = t0.elapsed();
        let cpu = cpu_seconds("/proc/self/stat") - cpu0;
        let listener_cpu = cpu_seconds(&listener_stat) - listener0;
        let mut reports = Vec::new();
        while let Some(r) = rx.recv().await {
            reports.push(r);
        }
        (reports, cpu, listener_cpu, wall)
    });

    let failed = reports.iter().filter(|r| !r.outcome.healthy).count();
    let mut late: Vec<Duration> = reports.iter().map(|r| r.at - r.scheduled).collect();
    late.sort();
    let pct = |p: f64| late[quantile_index(late.len(), p)];
    let mut took: Vec<Duration> = reports.iter().map(|r| r.outcome.elapsed).collect();
    took.sort();
    let probers_cpu = cpu - listener_cpu;
    println!("probers: {PROBERS} tcp, interval 1s, window {wall:?}");
    println!("probes: {} ({} failed)", reports.len(), failed);
    println!(
        "process cpu: {:.3}s ({:.2}% of one core); listener thread {:.3}s; probing {:.3}s = {:.2}% of one core, {:.0}us per probe",
        cpu,
        100.0 * cpu / wall.as_secs_f64(),
        listener_cpu,
        probers_cpu,
        100.0 * probers_cpu / wall.as_secs_f64(),
        1e6 * probers_cpu / reports.len() as f64
    );
    println!(
        "start lateness (actual - intended): p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        late[late.len() - 1]
    );
    println!(
        "probe duration: p50 {:?}, p99 {:?}",
        took[(took.len() - 1) / 2],
        took[quantile_index(took.len(), 0.99)]
    );
    assert_eq!(failed, 0);
}

/// Until its first pass, within the start period, an instance is probed every 100 ms; then
/// at its interval. Without a start period, at its interval from the first run.
#[tokio::test(start_paused = true)]
async fn a_starting_instance_is_probed_often_until_it_first_passes() {
    for (start_period, want) in [
        (
            Duration::from_secs(10),
            vec![0, 100, 200, 300, 400, 500, 2500, 4500],
        ),
        (Duration::ZERO, vec![0, 2000, 4000]),
    ] {
        let fake = Arc::new(FakeExec::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let spec = HealthSpec {
            start_period,
            ..spec(2000, 50)
        };
        let t0 = Instant::now();
        let handle = Prober::start(
            InstanceKey::new("web", 0),
            1,
            exec("starting"),
            &spec,
            fake,
            tx,
        );
        // Past the last run wanted, whatever the first-run jitter (under 200 ms, which the
        // timer's 1 ms granularity can round up to 200).
        tokio::time::sleep(Duration::from_millis(4750)).await;
        drop(handle);
        let reports = drain(&mut rx);
        let first = reports[0].at - t0;
        assert!(first <= Duration::from_millis(200), "{first:?}");
        let at: Vec<u128> = reports
            .iter()
            .map(|r| (r.at - reports[0].at).as_millis())
            .collect();
        assert_eq!(at, want, "start period {start_period:?}");
        let passes: Vec<bool> = reports.iter().map(|r| r.outcome.healthy).collect();
        let fails = want.len().min(5);
        assert!(passes[..fails].iter().all(|p| !p), "{passes:?}");
        assert!(passes[fails..].iter().all(|p| *p), "{passes:?}");
    }
}

/// The index of quantile `q` (in `[0, 1]`) in a sorted, non-empty vector of `len` items: a
/// float in `[0, len - 1]`, which the saturating float-to-integer `as` converts exactly.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn quantile_index(len: usize, q: f64) -> usize {
    ((len.saturating_sub(1) as f64) * q.clamp(0.0, 1.0)).round() as usize
}
