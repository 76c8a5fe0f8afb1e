//! The collector of a scrape: every service's and instance's series, from the supervisor's
//! [`ServiceSample`]s and what the OS says now: each live instance's cgroup files (through
//! the [`CgroupBackend`] seam, v1 or v2 alike) and each instance's log counts (through
//! [`InstanceFiles`]). No value is kept between scrapes (the backends keep only the cgroup
//! files open), so the series of a deleted instance or service end with it.
//!
//! Labels are the service, the instance (`web-2`) and the revision it runs: bounded by the
//! services' replicas and kept revisions. No PID, error text or exit code is a label; the
//! few enumerations that are (exit class, health state, rollout kind and state) are fixed
//! sets.

use std::fmt;
use std::time::UNIX_EPOCH;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::cgroups::{CgroupBackend, CgroupPath, CgroupStats};
use crate::health::HealthState;
use crate::metrics::instruments::{ENDS, KINDS, TIMED_ENDS};
use crate::runtime::{InstanceFiles, LogStat};
use crate::supervisor::ExitClass;
use crate::supervisor::sample::{InstanceSample, ServiceSample};

/// One instance with what was read for it.
#[derive(Debug)]
struct Reading {
    service: String,
    sample: InstanceSample,
    revision: String,
    /// From its cgroup, when it is live and the files could be read.
    usage: Option<CgroupStats>,
    logs: LogStat,
}

/// Everything one scrape encodes about services and instances.
#[derive(Debug)]
pub struct Readings {
    services: Vec<ServiceSample>,
    instances: Vec<Reading>,
}

/// Instances read on one thread; more are split across the host's cores (at most
/// [`MAX_READERS`] threads), since each instance costs a few system calls and little else.
const PER_READER: usize = 32;
const MAX_READERS: usize = 4;

/// Read the cgroup and log files of every instance in `services`. Blocking file reads: run
/// off the async workers.
pub fn read(
    mut services: Vec<ServiceSample>,
    cgroups: &dyn CgroupBackend,
    files: &dyn InstanceFiles,
) -> Readings {
    let mut instances: Vec<Reading> = Vec::new();
    for svc in &mut services {
        for sample in std::mem::take(&mut svc.instances) {
            instances.push(Reading {
                service: svc.name.clone(),
                revision: sample.revision.to_string(),
                sample,
                usage: None,
                logs: LogStat::default(),
            });
        }
    }
    let readers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_READERS)
        .min(instances.len() / PER_READER)
        .max(1);
    let chunk = instances.len().div_ceil(readers).max(1);
    let read = |part: &[Reading]| -> Vec<Read> {
        part.iter()
            .map(|r| (r.usage(cgroups), files.log_stat(&r.sample.id)))
            .collect()
    };
    let found: Vec<Read> = std::thread::scope(|scope| {
        let mut parts = instances.chunks(chunk);
        // This thread reads the first part while the others read the rest.
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("metrics-read".into())
                    .spawn_scoped(scope, move || read(part));
                (part, spawned)
            })
            .collect();
        let mut found = read(first);
        for (part, spawned) in others {
            // No thread to be had (a thread limit), or it failed: that part is read here.
            match spawned.map(|h| h.join()) {
                Ok(Ok(f)) => found.extend(f),
                _ => found.extend(read(part)),
            }
        }
        found
    });
    for (r, (usage, logs)) in instances.iter_mut().zip(found) {
        r.usage = usage;
        r.logs = logs;
    }
    Readings {
        services,
        instances,
    }
}

/// What one instance's files said.
type Read = (Option<CgroupStats>, LogStat);

impl Reading {
    /// Its cgroup's usage now, when it is live and the files could be read.
    fn usage(&self, cgroups: &dyn CgroupBackend) -> Option<CgroupStats> {
        if !self.sample.live {
            return None;
        }
        cgroups
            .stats(&CgroupPath::instance(&self.service, &self.sample.id))
            .inspect_err(|e| {
                // Gone between the sample and the read (it just ended), or a kernel that
                // refuses a read: its usage series are left out of this scrape.
                tracing::debug!(instance = %self.sample.id, error = %e, "metrics: no usage");
            })
            .ok()
    }
}

/// A series' labels: service, instance, revision.
type Labels<'a> = [(&'static str, &'a str); 3];
/// The same and one more.
type LabelsAnd<'a> = [(&'static str, &'a str); 4];

/// A family's name, help and how its value is taken from a `T`.
type Described<T> = (&'static str, &'static str, fn(&T) -> u64);

impl Reading {
    fn labels(&self) -> Labels<'_> {
        [
            ("service", self.service.as_str()),
            ("instance", self.sample.id.as_str()),
            ("revision", self.revision.as_str()),
        ]
    }

    fn with<'a>(&'a self, key: &'static str, value: &'a str) -> LabelsAnd<'a> {
        let [s, i, r] = self.labels();
        [s, i, r, (key, value)]
    }
}

/// What a family is: its name, help, unit and type.
struct Desc {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
}

fn desc(name: &'static str, help: &'static str, unit: Option<Unit>, kind: MetricType) -> Desc {
    Desc {
        name,
        help,
        unit,
        kind,
    }
}

enum Value<'a> {
    Counter(f64),
    CounterU(u64),
    Gauge(f64),
    GaugeI(i64),
    Metric(&'a dyn EncodeMetric),
}

impl Value<'_> {
    fn encode(&self, series: MetricEncoder<'_>) -> fmt::Result {
        match self {
            Value::Counter(v) => ConstCounter::new(*v).encode(series),
            Value::CounterU(v) => ConstCounter::new(*v).encode(series),
            Value::Gauge(v) => ConstGauge::new(*v).encode(series),
            Value::GaugeI(v) => ConstGauge::new(*v).encode(series),
            Value::Metric(m) => m.encode(series),
        }
    }
}

/// Write a metric family, one series per row, straight to the encoder; a family without
/// rows is left out (no descriptor).
fn family<'a, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    d: Desc,
    rows: impl Iterator<Item = (L, Value<'a>)>,
) -> fmt::Result {
    let mut rows = rows.peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(d.name, d.help, d.unit.as_ref(), d.kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn class_name(class: ExitClass) -> &'static str {
    match class {
        ExitClass::Exited(_) => "exited",
        ExitClass::Signaled(_) => "signaled",
        ExitClass::OomKilled => "oom_killed",
        ExitClass::StopTimeout => "stop_timeout",
        ExitClass::HealthFailed => "health_failed",
        ExitClass::Lost => "lost",
    }
}

const NS: f64 = 1e9;

impl Readings {
    fn usage_families(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        type Pick = fn(&CgroupStats) -> Option<Value<'static>>;
        let families: [(&'static str, &'static str, Option<Unit>, MetricType, Pick); 8] = [
            (
                "corral_instance_cpu",
                "CPU time the instance's cgroup used",
                Some(Unit::Seconds),
                MetricType::Counter,
                |u| Some(Value::Counter(u.cpu_usage_ns as f64 / NS)),
            ),
            (
                "corral_instance_cpu_throttled_periods",
                "CFS periods in which the instance was throttled by its CPU limit",
                None,
                MetricType::Counter,
                |u| Some(Value::CounterU(u.cpu_throttled_periods)),
            ),
            (
                "corral_instance_cpu_throttled",
                "Time the instance spent throttled by its CPU limit",
                Some(Unit::Seconds),
                MetricType::Counter,
                |u| Some(Value::Counter(u.cpu_throttled_ns as f64 / NS)),
            ),
            (
                "corral_instance_memory_usage",
                "Memory the instance's cgroup uses now",
                Some(Unit::Bytes),
                MetricType::Gauge,
                |u| Some(Value::GaugeI(clamp(u.memory_bytes))),
            ),
            (
                "corral_instance_memory_peak",
                "The most memory the instance's cgroup used (0 where the kernel does not say)",
                Some(Unit::Bytes),
                MetricType::Gauge,
                |u| Some(Value::GaugeI(clamp(u.memory_peak_bytes))),
            ),
            (
                "corral_instance_memory_limit",
                "The instance's memory limit (absent: unlimited)",
                Some(Unit::Bytes),
                MetricType::Gauge,
                |u| u.memory_limit_bytes.map(|l| Value::GaugeI(clamp(l))),
            ),
            (
                "corral_instance_oom_kills",
                "Processes the kernel's OOM killer ended in the instance's cgroup",
                None,
                MetricType::Counter,
                |u| Some(Value::CounterU(u.oom_kills)),
            ),
            (
                "corral_instance_tasks",
                "Tasks (processes and threads) in the instance's cgroup",
                None,
                MetricType::Gauge,
                |u| Some(Value::GaugeI(clamp(u.pids))),
            ),
        ];
        for (name, help, unit, kind, pick) in families {
            family(
                encoder,
                desc(name, help, unit, kind),
                self.instances.iter().filter_map(|r| {
                    let v = r.usage.as_ref().and_then(pick)?;
                    Some((r.labels(), v))
                }),
            )?;
        }
        Ok(())
    }

    fn instance_families(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let each = || self.instances.iter();
        family(
            encoder,
            desc(
                "corral_instance_up",
                "1 while the instance runs, 0 while it is starting, backing off, stopping or gone",
                None,
                MetricType::Gauge,
            ),
            each().map(|r| {
                let up = r.sample.phase == crate::supervisor::Phase::Running;
                (r.labels(), Value::GaugeI(i64::from(up)))
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_restarts",
                "Restarts of the instance by its restart policy",
                None,
                MetricType::Counter,
            ),
            each().map(|r| (r.labels(), Value::CounterU(u64::from(r.sample.restarts)))),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_last_exit",
                "How the instance's last run ended: 1 for its class (exited, signaled, oom_killed, stop_timeout, health_failed, lost)",
                None,
                MetricType::Gauge,
            ),
            each().filter_map(|r| {
                let class = r.sample.last_exit?;
                Some((r.with("class", class_name(class)), Value::GaugeI(1)))
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_healthy",
                "1 while the instance is healthy (its probe passes, or it runs and has none), else 0",
                None,
                MetricType::Gauge,
            ),
            each().map(|r| {
                let healthy = r.sample.health == HealthState::Healthy;
                (r.labels(), Value::GaugeI(i64::from(healthy)))
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_health_state",
                "The instance's health: 1, for its one state (healthy, unhealthy, unknown)",
                None,
                MetricType::Gauge,
            ),
            each().map(|r| (r.with("state", r.sample.health.as_str()), Value::GaugeI(1))),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_start_time",
                "When the instance's current run started, seconds since the Unix epoch",
                Some(Unit::Seconds),
                MetricType::Gauge,
            ),
            each().filter_map(|r| {
                let secs = r
                    .sample
                    .started_at?
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                Some((r.labels(), Value::Gauge(secs.as_secs_f64())))
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_probe_duration",
                "How long the instance's health probe runs took",
                Some(Unit::Seconds),
                MetricType::Histogram,
            ),
            each().filter_map(|r| {
                let p = r.sample.probe.as_ref()?;
                Some((r.labels(), Value::Metric(&p.duration)))
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_instance_probe_failures",
                "Health probe runs of the instance that failed",
                None,
                MetricType::Counter,
            ),
            each().filter_map(|r| {
                let p = r.sample.probe.as_ref()?;
                Some((r.labels(), Value::CounterU(p.failures.get())))
            }),
        )?;

        let logs: [Described<LogStat>; 2] = [
            (
                "corral_instance_log_written",
                "Bytes of the instance's output written to its log files",
                |l| l.bytes_written,
            ),
            (
                "corral_instance_log_dropped",
                "Bytes of the instance's output that could not be written (disk full, I/O errors) and were dropped",
                |l| l.bytes_dropped,
            ),
        ];
        for (name, help, pick) in logs {
            family(
                encoder,
                desc(name, help, Some(Unit::Bytes), MetricType::Counter),
                each().map(|r| (r.labels(), Value::CounterU(pick(&r.logs)))),
            )?;
        }
        Ok(())
    }

    fn service_families(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let each = || self.services.iter();
        let counts: [Described<ServiceSample>; 3] = [
            (
                "corral_service_desired_instances",
                "Instances the service should have (0 while it is being deleted)",
                |s| u64::from(s.desired),
            ),
            (
                "corral_service_running_instances",
                "Instances of the service running now",
                |s| u64::from(s.running),
            ),
            (
                "corral_service_healthy_instances",
                "Instances of the service healthy now",
                |s| u64::from(s.healthy),
            ),
        ];
        for (name, help, pick) in counts {
            family(
                encoder,
                desc(name, help, None, MetricType::Gauge),
                each().map(|s| {
                    (
                        [("service", s.name.as_str())],
                        Value::GaugeI(clamp(pick(s))),
                    )
                }),
            )?;
        }
        family(
            encoder,
            desc(
                "corral_service_rollouts_started",
                "Rollouts of the service started since the agent started, by kind (update, restart, rollback, auto_rollback)",
                None,
                MetricType::Counter,
            ),
            each().flat_map(|s| {
                KINDS.iter().zip(&s.rollouts.started).map(|(kind, c)| {
                    (
                        [("service", s.name.as_str()), ("kind", kind.as_str())],
                        Value::CounterU(c.get()),
                    )
                })
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_service_rollouts_finished",
                "Rollouts of the service that ended since the agent started, by state (succeeded, failed, superseded, cancelled)",
                None,
                MetricType::Counter,
            ),
            each().flat_map(|s| {
                ENDS.iter().zip(&s.rollouts.finished).map(|(state, c)| {
                    (
                        [("service", s.name.as_str()), ("state", state.as_str())],
                        Value::CounterU(c.get()),
                    )
                })
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_service_rollouts_rolled_back",
                "Failed rollouts of the service that started an automatic rollback",
                None,
                MetricType::Counter,
            ),
            each().map(|s| {
                (
                    [("service", s.name.as_str())],
                    Value::CounterU(s.rollouts.rolled_back.get()),
                )
            }),
        )?;
        family(
            encoder,
            desc(
                "corral_service_rollout_duration",
                "How long the service's rollouts took from start to end, by the state they ended in (succeeded, failed)",
                Some(Unit::Seconds),
                MetricType::Histogram,
            ),
            each().flat_map(|s| {
                TIMED_ENDS
                    .iter()
                    .zip(&s.rollouts.duration)
                    .map(|(state, h)| {
                        (
                            [("service", s.name.as_str()), ("state", state.as_str())],
                            Value::Metric(h as &dyn EncodeMetric),
                        )
                    })
            }),
        )
    }
}

/// A gauge value from a kernel count (never near i64::MAX in practice).
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.usage_families(&mut encoder)?;
        self.instance_families(&mut encoder)?;
        self.service_families(&mut encoder)
    }
}
