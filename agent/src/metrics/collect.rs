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
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
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

/// Read the cgroup and log files of every instance in `services`. Blocking file reads: run
/// off the async workers.
pub fn read(
    mut services: Vec<ServiceSample>,
    cgroups: &dyn CgroupBackend,
    files: &dyn InstanceFiles,
) -> Readings {
    let mut instances = Vec::new();
    for svc in &mut services {
        for sample in std::mem::take(&mut svc.instances) {
            let usage = if sample.live {
                match cgroups.stats(&CgroupPath::instance(&svc.name, &sample.id)) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        // Gone between the sample and the read (it just ended), or a kernel
                        // that refuses a read: its usage series are left out of this scrape.
                        tracing::debug!(instance = %sample.id, error = %e, "metrics: no usage");
                        None
                    }
                }
            } else {
                None
            };
            instances.push(Reading {
                service: svc.name.clone(),
                revision: sample.revision.to_string(),
                logs: files.log_stat(&sample.id),
                usage,
                sample,
            });
        }
    }
    Readings {
        services,
        instances,
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// A family's name, help and how its value is taken from a `T`.
type Described<T> = (&'static str, &'static str, fn(&T) -> u64);

impl Reading {
    fn labels(&self) -> Labels<'_> {
        vec![
            ("service", self.service.as_str()),
            ("instance", self.sample.id.as_str()),
            ("revision", self.revision.as_str()),
        ]
    }

    fn with<'a>(&'a self, key: &'static str, value: &'a str) -> Labels<'a> {
        let mut l = self.labels();
        l.push((key, value));
        l
    }
}

/// A metric family written one series at a time; its descriptor is written before its first
/// series, so a family without series is left out.
struct Family<'e, 'w, 'a> {
    encoder: &'e mut DescriptorEncoder<'w>,
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    rows: Vec<(Labels<'a>, Value<'a>)>,
}

enum Value<'a> {
    Counter(f64),
    CounterU(u64),
    Gauge(f64),
    GaugeI(i64),
    Metric(&'a dyn EncodeMetric),
}

impl<'e, 'w, 'a> Family<'e, 'w, 'a> {
    fn new(
        encoder: &'e mut DescriptorEncoder<'w>,
        name: &'static str,
        help: &'static str,
        unit: Option<Unit>,
        kind: MetricType,
    ) -> Self {
        Family {
            encoder,
            name,
            help,
            unit,
            kind,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, labels: Labels<'a>, value: Value<'a>) {
        self.rows.push((labels, value));
    }

    fn write(self) -> fmt::Result {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut metric =
            self.encoder
                .encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        for (labels, value) in &self.rows {
            let series: MetricEncoder<'_> = metric.encode_family(labels)?;
            match value {
                Value::Counter(v) => ConstCounter::new(*v).encode(series)?,
                Value::CounterU(v) => ConstCounter::new(*v).encode(series)?,
                Value::Gauge(v) => ConstGauge::new(*v).encode(series)?,
                Value::GaugeI(v) => ConstGauge::new(*v).encode(series)?,
                Value::Metric(m) => m.encode(series)?,
            }
        }
        Ok(())
    }
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
            let mut f = Family::new(encoder, name, help, unit, kind);
            for r in &self.instances {
                if let Some(v) = r.usage.as_ref().and_then(pick) {
                    f.row(r.labels(), v);
                }
            }
            f.write()?;
        }
        Ok(())
    }

    fn instance_families(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut f = Family::new(
            encoder,
            "corral_instance_up",
            "1 while the instance runs, 0 while it is starting, backing off, stopping or gone",
            None,
            MetricType::Gauge,
        );
        for r in &self.instances {
            let up = r.sample.phase == crate::supervisor::Phase::Running;
            f.row(r.labels(), Value::GaugeI(i64::from(up)));
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_restarts",
            "Restarts of the instance by its restart policy",
            None,
            MetricType::Counter,
        );
        for r in &self.instances {
            f.row(r.labels(), Value::CounterU(u64::from(r.sample.restarts)));
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_last_exit",
            "How the instance's last run ended: 1 for its class (exited, signaled, oom_killed, stop_timeout, health_failed, lost)",
            None,
            MetricType::Gauge,
        );
        for r in &self.instances {
            if let Some(class) = r.sample.last_exit {
                f.row(r.with("class", class_name(class)), Value::GaugeI(1));
            }
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_healthy",
            "1 while the instance is healthy (its probe passes, or it runs and has none), else 0",
            None,
            MetricType::Gauge,
        );
        for r in &self.instances {
            let healthy = r.sample.health == HealthState::Healthy;
            f.row(r.labels(), Value::GaugeI(i64::from(healthy)));
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_health_state",
            "The instance's health: 1, for its one state (healthy, unhealthy, unknown)",
            None,
            MetricType::Gauge,
        );
        for r in &self.instances {
            f.row(r.with("state", r.sample.health.as_str()), Value::GaugeI(1));
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_start_time",
            "When the instance's current run started, seconds since the Unix epoch",
            Some(Unit::Seconds),
            MetricType::Gauge,
        );
        for r in &self.instances {
            if let Some(t) = r.sample.started_at {
                let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                f.row(r.labels(), Value::Gauge(secs.as_secs_f64()));
            }
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_probe_duration",
            "How long the instance's health probe runs took",
            Some(Unit::Seconds),
            MetricType::Histogram,
        );
        for r in &self.instances {
            if let Some(p) = &r.sample.probe {
                f.row(r.labels(), Value::Metric(&p.duration));
            }
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_instance_probe_failures",
            "Health probe runs of the instance that failed",
            None,
            MetricType::Counter,
        );
        for r in &self.instances {
            if let Some(p) = &r.sample.probe {
                f.row(r.labels(), Value::CounterU(p.failures.get()));
            }
        }
        f.write()?;

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
            let mut f = Family::new(encoder, name, help, Some(Unit::Bytes), MetricType::Counter);
            for r in &self.instances {
                f.row(r.labels(), Value::CounterU(pick(&r.logs)));
            }
            f.write()?;
        }
        Ok(())
    }

    fn service_families(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
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
            let mut f = Family::new(encoder, name, help, None, MetricType::Gauge);
            for s in &self.services {
                f.row(
                    vec![("service", s.name.as_str())],
                    Value::GaugeI(clamp(pick(s))),
                );
            }
            f.write()?;
        }

        let mut f = Family::new(
            encoder,
            "corral_service_rollouts_started",
            "Rollouts of the service started since the agent started, by kind (update, restart, rollback, auto_rollback)",
            None,
            MetricType::Counter,
        );
        for s in &self.services {
            for (kind, c) in KINDS.iter().zip(&s.rollouts.started) {
                f.row(
                    vec![("service", s.name.as_str()), ("kind", kind.as_str())],
                    Value::CounterU(c.get()),
                );
            }
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_service_rollouts_finished",
            "Rollouts of the service that ended since the agent started, by state (succeeded, failed, superseded, cancelled)",
            None,
            MetricType::Counter,
        );
        for s in &self.services {
            for (state, c) in ENDS.iter().zip(&s.rollouts.finished) {
                f.row(
                    vec![("service", s.name.as_str()), ("state", state.as_str())],
                    Value::CounterU(c.get()),
                );
            }
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_service_rollouts_rolled_back",
            "Failed rollouts of the service that started an automatic rollback",
            None,
            MetricType::Counter,
        );
        for s in &self.services {
            f.row(
                vec![("service", s.name.as_str())],
                Value::CounterU(s.rollouts.rolled_back.get()),
            );
        }
        f.write()?;

        let mut f = Family::new(
            encoder,
            "corral_service_rollout_duration",
            "How long the service's rollouts took from start to end, by the state they ended in (succeeded, failed)",
            Some(Unit::Seconds),
            MetricType::Histogram,
        );
        for s in &self.services {
            for (state, h) in TIMED_ENDS.iter().zip(&s.rollouts.duration) {
                f.row(
                    vec![("service", s.name.as_str()), ("state", state.as_str())],
                    Value::Metric(h),
                );
            }
        }
        f.write()
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
