//! The host's own pauses, told apart from what a benchmark measures.
//!
//! A thread per CPU of the benchmark's affinity, pinned there and run at the highest real-time
//! priority (`SCHED_FIFO` 99), sleeps 1 ms at a time and records how late each wake-up came.
//! Nothing in the guest's scheduler can hold such a thread back for long: a wake-up late by
//! tens of milliseconds means the CPU itself did not run (a hypervisor that descheduled the
//! virtual CPU, say), and every process on that CPU waited as long. `cyclictest` measures the
//! same; this probe keeps the times, so that a window's slow requests can be lined up with
//! them. Its cost is one short wake-up per millisecond per CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Wake-ups later than this are kept.
const KEEP: Duration = Duration::from_millis(2);
const TICK: Duration = Duration::from_millis(1);

/// One late wake-up: the CPU, when the probe should have woken, and how late it was.
#[derive(Clone, Copy, Debug)]
pub struct Stall {
    pub cpu: usize,
    pub at: Instant,
    pub late: Duration,
}

#[derive(Debug)]
pub struct StallProbe {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    seen: Arc<Mutex<Vec<Stall>>>,
    /// Whether every thread got its real-time priority (not as an unprivileged user, or under
    /// a cgroup v1 cpu cgroup without `cpu.rt_runtime_us`): without it the probe waits for a
    /// CPU like any process, and its figures include the guest's own scheduling.
    pub realtime: bool,
}

/// The CPUs this process may run on.
fn cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size passed is the set's.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: cpu is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu` and makes it `SCHED_FIFO` 99; false if either failed.
fn pin_realtime(cpu: usize) -> bool {
    // SAFETY: as in cpus(); CPU_SET on a cpu below CPU_SETSIZE.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    };
    let param = libc::sched_param { sched_priority: 99 };
    // SAFETY: param is a valid sched_param for the calling thread (pid 0).
    let fifo = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0;
    pinned && fifo
}

impl StallProbe {
    pub fn start() -> StallProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = cpus()
            .into_iter()
            .map(|cpu| {
                let (stop, seen, tx) = (stop.clone(), seen.clone(), tx.clone());
                std::thread::spawn(move || {
                    let _ = tx.send(pin_realtime(cpu));
                    drop(tx);
                    let mut due = Instant::now() + TICK;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        let now = Instant::now();
                        let late = now.saturating_duration_since(due);
                        if late > KEEP
                            && let Ok(mut seen) = seen.lock()
                        {
                            seen.push(Stall { cpu, at: due, late });
                        }
                        due = now + TICK;
                    }
                })
            })
            .collect();
        drop(tx);
        let realtime = rx.iter().all(|ok| ok);
        StallProbe {
            stop,
            threads,
            seen,
            realtime,
        }
    }

    /// Stops the probe: the stalls it kept, in the order seen on each CPU.
    pub fn finish(self) -> Vec<Stall> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The longest of `stalls` that began within `[from, to)`.
pub fn longest(stalls: &[Stall], from: Instant, to: Instant) -> Option<Stall> {
    stalls
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .max_by_key(|s| s.late)
        .copied()
}

/// `corral-bench host-stalls`: the probe alone for `secs` seconds, nothing else started: how
/// often, and for how long, this host pauses its CPUs on its own.
pub fn bench(secs: u64) {
    let probe = StallProbe::start();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let realtime = probe.realtime;
    let seen = probe.finish();
    println!(
        "host stalls: {secs} s of a 1 ms sleep per CPU{}, wake-ups late by more than {} ms:",
        if realtime {
            " at SCHED_FIFO 99"
        } else {
            " (NOT real-time: the figures include the guest's own scheduling)"
        },
        KEEP.as_millis()
    );
    for bound in [2u64, 5, 10, 20, 50, 100] {
        let n = seen
            .iter()
            .filter(|s| s.late > Duration::from_millis(bound))
            .count();
        println!("  > {bound:>3} ms: {n}");
    }
    let mut worst = seen.clone();
    worst.sort_by_key(|s| std::cmp::Reverse(s.late));
    for s in worst.iter().take(5) {
        println!(
            "  cpu {} at {:+.3} s: {:.1} ms",
            s.cpu,
            s.at.saturating_duration_since(t0).as_secs_f64(),
            s.late.as_secs_f64() * 1e3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_stall_is_taken_from_those_that_began_in_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64, late: u64, cpu: usize| Stall {
            cpu,
            at: t0 + Duration::from_millis(ms),
            late: Duration::from_millis(late),
        };
        let seen = [at(5, 90, 0), at(100, 7, 1), at(150, 12, 0), at(300, 40, 1)];
        let ms = |v: u64| t0 + Duration::from_millis(v);
        // The 90 ms stall began before the window, the 40 ms one at its end: neither counts.
        let got = longest(&seen, ms(10), ms(300)).expect("two stalls in the window");
        assert_eq!((got.cpu, got.late), (0, Duration::from_millis(12)));
        assert!(longest(&seen, ms(10), ms(100)).is_none());
        assert!(longest(&[], ms(0), ms(1000)).is_none());
    }
}
