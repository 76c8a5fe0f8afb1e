//! Prometheus metrics: what `corrald --metrics ADDR` serves at `/metrics`, encoded by the
//! `prometheus-client` crate in OpenMetrics or the Prometheus text format.
//!
//! A scrape asks the supervisor for a [`sample`](crate::supervisor::sample) of every service
//! and instance (no OS access on its task), then, on the blocking pool, reads each live
//! instance's cgroup files and each instance's log counts ([`collect`]) and encodes them with
//! the agent's own instruments: the API's calls ([`api`], a tower layer on the gRPC server),
//! failed cgroup writes ([`cgroups`], a decorator over the backend), the event log's
//! position, the agent's process ([`process`]) and its build. Series are made at scrape time
//! from what exists then, so a deleted instance's or service's series end with it; label
//! values are bounded (names, revisions and fixed enumerations; never PIDs or error text).
//!
//! The supervisor keeps the instruments of what happens inside it ([`instruments`]: probe
//! durations and failures per instance slot, rollouts per service) in the slots and services
//! they measure.
//!
//! Imports from the crate: `supervisor` (its handle and samples), `cgroups` (the backend
//! trait), `runtime` (the `InstanceFiles` trait), `events`, `health` (its state enum),
//! `rollout::record`, `spec`, and `api::auth` for gRPC code names. Only `main` starts it.

pub mod api;
pub mod cgroups;
pub mod collect;
pub mod instruments;
pub mod process;
pub mod server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::cgroups::CgroupBackend;
use crate::events::EventLog;
use crate::runtime::InstanceFiles;
use crate::supervisor::{SupervisorError, SupervisorHandle};

pub use api::{ApiMetrics, ApiMetricsLayer};
pub use cgroups::{CgroupErrors, CountingCgroups};

/// The text formats a scrape can be answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, for clients that accept it (Prometheus does).
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for everyone else.
    Prometheus,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics when it names
    /// `application/openmetrics-text` with a weight above 0.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                parts
                    .next()
                    .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                    && parts.all(|p| {
                        p.strip_prefix("q=")
                            .and_then(|q| q.parse::<f64>().ok())
                            .is_none_or(|q| q > 0.0)
                    })
            })
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Instruments made before the supervisor, for the parts it is built from: the API layer and
/// the counting cgroup backend.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub api: ApiMetrics,
    pub cgroup_errors: CgroupErrors,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            api: ApiMetrics::new(),
            cgroup_errors: CgroupErrors::new(),
        }
    }
}

/// Why a scrape could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("the supervisor did not answer: {0}")]
    Supervisor(#[from] SupervisorError),
    #[error("encoding the metrics failed")]
    Encode,
    #[error("the collecting task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Everything a scrape reads; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    agent: AgentMetrics,
    supervisor: SupervisorHandle,
    events: Arc<EventLog>,
    cgroups: Arc<dyn CgroupBackend>,
    files: Arc<dyn InstanceFiles>,
    /// One scrape at a time: a client scraping in a loop costs one scrape's CPU at most.
    /// It holds the length of the last scrape's text, so the next one is encoded into a
    /// buffer of about that size instead of one that grows (and copies) itself there.
    scraping: tokio::sync::Mutex<usize>,
}

impl Metrics {
    pub fn new(
        agent: AgentMetrics,
        supervisor: SupervisorHandle,
        events: Arc<EventLog>,
        cgroups: Arc<dyn CgroupBackend>,
        files: Arc<dyn InstanceFiles>,
    ) -> Metrics {
        Metrics {
            inner: Arc::new(Inner {
                agent,
                supervisor,
                events,
                cgroups,
                files,
                scraping: tokio::sync::Mutex::new(0),
            }),
        }
    }

    /// Every series now, in `format`.
    pub async fn scrape(&self, format: Format) -> Result<String, ScrapeError> {
        let mut last_len = self.inner.scraping.lock().await;
        let capacity = *last_len + *last_len / 8;
        let started = std::time::Instant::now();
        let services = self.inner.supervisor.sample().await?;
        let sampled = started.elapsed();
        let inner = self.inner.clone();
        let text = tokio::task::spawn_blocking(move || {
            let reading = std::time::Instant::now();
            let readings = collect::read(services, inner.cgroups.as_ref(), inner.files.as_ref());
            let read = reading.elapsed();
            let encoding = std::time::Instant::now();
            let mut registry = Registry::default();
            inner.agent.api.register(&mut registry);
            inner.agent.cgroup_errors.register(&mut registry);
            registry.register(
                "corral_build",
                "The agent's version",
                Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
            );
            registry.register_collector(Box::new(EventsCollector(inner.events.clone())));
            registry.register_collector(Box::new(process::ProcessCollector));
            registry.register_collector(Box::new(readings));
            let text = encode_into(&registry, format, capacity).map_err(|_| ScrapeError::Encode)?;
            tracing::debug!(
                sample_us = crate::num::micros(sampled),
                read_us = crate::num::micros(read),
                encode_us = crate::num::micros(encoding.elapsed()),
                bytes = text.len(),
                "scrape"
            );
            Ok(text)
        })
        .await?;
        if let Ok(text) = &text {
            *last_len = text.len();
        }
        text
    }
}

/// The registry's text in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, fmt::Error> {
    encode_into(registry, format, 64 << 10)
}

/// The registry's text in `format`, in a buffer of `capacity` bytes to start with.
fn encode_into(registry: &Registry, format: Format, capacity: usize) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(capacity.max(4 << 10));
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
    }
    Ok(out)
}

/// The event log's position, what it keeps and its failed writes.
#[derive(Debug)]
struct EventsCollector(Arc<EventLog>);

impl Collector for EventsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let next = self.0.next();
        let oldest = self.0.oldest();
        ConstGauge::new(next.saturating_sub(1) as f64).encode(encoder.encode_descriptor(
            "corral_events_last_index",
            "Index of the last event appended to the event log (0: none yet)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(next.saturating_sub(oldest) as f64).encode(encoder.encode_descriptor(
            "corral_events_retained",
            "Events the event log keeps (a Watch can resume from any of them)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(self.0.write_errors()).encode(encoder.encode_descriptor(
            "corral_events_write_errors",
            "Event log lines that could not be written to disk",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}
