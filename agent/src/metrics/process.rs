//! The agent's own process, as every Prometheus client library reports it (`process_*`):
//! CPU time, resident and virtual memory, threads, open and allowed file descriptors, start
//! time; read from `/proc/self` at scrape time.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// What `/proc/self/stat` says, in the units it says it (clock ticks, pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub threads: u64,
    pub start_ticks: u64,
    pub vsize_bytes: u64,
    pub rss_pages: u64,
}

/// Parse `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let f = crate::procfs::stat_fields(text)?;
    // f[0] is field 3 (state): field N is f[N - 3].
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time from `/proc/stat` (`btime`), seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The boot time, read from `/proc/stat` once: it does not change, and `/proc/stat` is made
/// anew with every CPU's and interrupt's counts at each read.
fn boot_time_once() -> Option<u64> {
    static BTIME: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *BTIME.get_or_init(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| boot_time(&t))
    })
}

/// The descriptors this process has open. Linux 6.2 and later give their number as the size
/// of `/proc/self/fd` (one `statx`); earlier kernels say 0 there, and the directory is listed,
/// which costs the kernel a dentry per descriptor (the agent holds thousands with many
/// instances: each one's cgroup stat files).
fn open_fds() -> Option<usize> {
    let size = std::fs::metadata("/proc/self/fd").ok()?.len();
    if size > 0 {
        return usize::try_from(size).ok();
    }
    // The listing's own descriptor is not counted.
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1),
    )
}

/// The collector of the agent's process; reads nothing until a scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t))
        else {
            return Ok(());
        };
        let tick = crate::procfs::clock_ticks_per_second() as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(4096);
        let cpu = (stat.utime_ticks + stat.stime_ticks) as f64 / tick;
        ConstCounter::new(cpu).encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent by the agent",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        let gauges: [(&str, &str, Option<Unit>, u64); 3] = [
            (
                "process_resident_memory",
                "Resident memory of the agent",
                Some(Unit::Bytes),
                stat.rss_pages.saturating_mul(page),
            ),
            (
                "process_virtual_memory",
                "Virtual memory of the agent",
                Some(Unit::Bytes),
                stat.vsize_bytes,
            ),
            (
                "process_threads",
                "Threads of the agent",
                None,
                stat.threads,
            ),
        ];
        for (name, help, unit, v) in gauges {
            ConstGauge::new(v as f64).encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                MetricType::Gauge,
            )?)?;
        }
        if let Some(fds) = open_fds() {
            ConstGauge::new(fds as f64).encode(encoder.encode_descriptor(
                "process_open_fds",
                "File descriptors the agent has open",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            ConstGauge::new(soft as f64).encode(encoder.encode_descriptor(
                "process_max_fds",
                "The most file descriptors the agent may have open",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(btime) = boot_time_once() {
            let start = btime as f64 + stat.start_ticks as f64 / tick;
            ConstGauge::new(start).encode(encoder.encode_descriptor(
                "process_start_time",
                "When the agent started, seconds since the Unix epoch",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a ")" in it, as a process may set it.
        let line = "4242 (cor) rald) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    150 25 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime_ticks: 150,
                stime_ticks: 25,
                threads: 7,
                start_ticks: 123456,
                vsize_bytes: 987654321,
                rss_pages: 2048,
            })
        );
        assert_eq!(parse_stat("4242 (corrald) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn open_fds_counts_descriptors_as_they_open_and_close() {
        // Other tests open files in parallel: compare with a listing taken alongside, and
        // watch 64 more descriptors come and go.
        let listed = || std::fs::read_dir("/proc/self/fd").expect("fd").count() - 1;
        let near = |a: usize, b: usize| a.abs_diff(b) <= 16;
        let before = open_fds().expect("fds");
        assert!(near(before, listed()), "{before} vs {}", listed());
        let held: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/stat").expect("open"))
            .collect();
        let during = open_fds().expect("fds");
        assert!(during >= before + 64 - 16, "{before} -> {during}");
        assert!(near(during, listed()), "{during} vs {}", listed());
        drop(held);
        let after = open_fds().expect("fds");
        assert!(after + 64 - 16 <= during, "{during} -> {after}");
    }

    #[test]
    fn the_agents_own_process_is_read() {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
        let s = parse_stat(&stat).expect("parses");
        assert!(s.threads >= 1 && s.rss_pages > 0, "{s:?}");
    }
}
