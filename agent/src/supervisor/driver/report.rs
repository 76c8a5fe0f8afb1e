//! What the driver reports: each service's status with its instances' usage (read from their
//! cgroups, the CPU rate computed by [`CpuRate`]), the node summary, and each service's health
//! for `grpc.health.v1`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::slots::{Live, Service, Slot};
use super::{Deps, Driver, cgroup_of};
use crate::cgroups::CgroupStats;
use crate::health::{HealthState, ServiceHealth};
use crate::runtime::LogStat;
use crate::spec::InstanceKey;
use crate::supervisor::instance::{Phase, State};
use crate::supervisor::sample::{InstanceSample, ServiceSample};
use crate::supervisor::{InstanceStatus, Listing, ServiceStatus, Summary, SupervisorError};

/// The shortest span a CPU rate is computed over.
const RATE_MIN_SPAN: Duration = Duration::from_millis(500);

/// How long a usage reading is served before the cgroup files are read again.
const USAGE_TTL: Duration = Duration::from_secs(1);

/// The CPU rate of an instance in cores, from successive readings of its cgroup's total CPU
/// time. A rate spans at least [`RATE_MIN_SPAN`], so readings close together (a `List` right
/// after a `Get`) keep the last rate instead of computing a noisy one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct CpuRate {
    /// Cores used between the last two readings at least [`RATE_MIN_SPAN`] apart.
    pub rate: Option<f64>,
    /// The reading the next rate is computed from.
    base: Option<(Instant, u64)>,
}

impl CpuRate {
    /// The sampler after a reading of `cpu_ns` at `now`. A counter that went backwards (a
    /// cgroup made anew) reads as no use.
    pub fn sample(self, now: Instant, cpu_ns: u64) -> CpuRate {
        let Some((t0, ns0)) = self.base else {
            return CpuRate {
                base: Some((now, cpu_ns)),
                ..self
            };
        };
        let span = now.saturating_duration_since(t0);
        if span < RATE_MIN_SPAN {
            return self;
        }
        CpuRate {
            rate: Some(cpu_ns.saturating_sub(ns0) as f64 / 1e9 / span.as_secs_f64()),
            base: Some((now, cpu_ns)),
        }
    }
}

impl Driver {
    /// One service's status, its usage read now.
    pub(super) fn get(&mut self, name: &str) -> Result<ServiceStatus, SupervisorError> {
        let svc = self
            .services
            .get_mut(name)
            .ok_or_else(|| SupervisorError::NotFound { name: name.into() })?;
        let mut status = service_status(&self.deps, name, svc, true);
        status.next_run = self.next_run_of(name);
        status.autoscale = self.scaling.status(name);
        Ok(status)
    }

    /// Every service's status, with usage read within the last [`USAGE_TTL`].
    pub(super) fn list(&mut self) -> Listing {
        let mut services: Vec<ServiceStatus> = self
            .services
            .iter_mut()
            .map(|(name, svc)| service_status(&self.deps, name, svc, false))
            .collect();
        for status in &mut services {
            status.next_run = self.next_run_of(&status.name);
            status.autoscale = self.scaling.status(&status.name);
        }
        Listing {
            services,
            event_index: last_event(&self.deps),
        }
    }

    /// Every service and instance for the metrics collector, without reading the OS.
    pub(super) fn sample(&self) -> Vec<ServiceSample> {
        self.services
            .iter()
            .map(|(name, svc)| {
                let instances: Vec<InstanceSample> = svc.slots.values().map(sample_of).collect();
                ServiceSample {
                    name: name.clone(),
                    desired: if svc.deleting { 0 } else { svc.d.spec.replicas },
                    running: instances
                        .iter()
                        .filter(|i| i.phase == Phase::Running)
                        .count()
                        .try_into()
                        .unwrap_or(u32::MAX),
                    healthy: instances
                        .iter()
                        .filter(|i| i.health == HealthState::Healthy)
                        .count()
                        .try_into()
                        .unwrap_or(u32::MAX),
                    rollouts: svc.rollouts.clone(),
                    instances,
                }
            })
            .collect()
    }

    pub(super) fn summary(&self) -> Summary {
        Summary {
            services: crate::num::count_u32(self.services.len()),
            instances: crate::num::count_u32(self.services.live_count()),
            committed: crate::supervisor::capacity::total(
                self.services
                    .iter()
                    .filter(|(_, s)| !s.deleting)
                    .map(|(_, s)| crate::supervisor::capacity::commitment(&s.d.spec)),
            ),
            capacity: self.deps.capacity,
            quarantined: self
                .quarantined
                .iter()
                .map(|(name, what)| format!("{name}: {what}"))
                .collect(),
            unsaved: self.unsaved.report(),
        }
    }

    /// Each service's health from its instances, sent to subscribers when it changed.
    pub(super) fn publish_health(&self) {
        let now: BTreeMap<String, ServiceHealth> = self
            .services
            .iter()
            .filter(|(_, s)| !s.deleting)
            .map(|(name, s)| (name.clone(), s.health()))
            .collect();
        self.health_tx.send_if_modified(|old| {
            if *old == now {
                false
            } else {
                *old = now;
                true
            }
        });
    }
}

/// A service's status. Usage comes from the cgroup's files: read now when `fresh` (`Get`),
/// else reused when read within [`USAGE_TTL`] (`List`, so listing many instances stays cheap).
fn service_status(deps: &Deps, name: &str, svc: &mut Service, fresh: bool) -> ServiceStatus {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let instances: Vec<InstanceStatus> = svc
        .slots
        .values_mut()
        .map(|slot| instance_status(deps, name, slot, fresh, (now, wall)))
        .collect();
    let running: u32 = instances
        .iter()
        .filter(|i| i.state == Phase::Running)
        .count()
        .try_into()
        .unwrap_or(u32::MAX);
    let healthy: u32 = instances
        .iter()
        .filter(|i| i.health == HealthState::Healthy)
        .count()
        .try_into()
        .unwrap_or(u32::MAX);
    ServiceStatus {
        name: name.to_string(),
        revision: svc.d.revision,
        owner: svc.d.owner,
        spec: svc.d.spec.clone(),
        desired: if svc.deleting { 0 } else { svc.d.spec.replicas },
        running,
        healthy,
        deleting: svc.deleting,
        health: svc.health(),
        instances,
        rollout: svc.d.rollout.clone(),
        revisions: svc.d.revisions(),
        paused: svc.d.paused,
        generation: svc.d.generation,
        event_index: last_event(deps),
        package: super::packages::package_status(svc),
        next_run: None,
        autoscale: None,
    }
}

fn sample_of(slot: &Slot) -> InstanceSample {
    let i = &slot.instance;
    let live = slot.live.is_some() && i.state.is_live();
    let probes = i.spec.health.as_ref().is_some_and(|h| h.probe.is_some());
    InstanceSample {
        id: i.id.clone(),
        revision: i.revision,
        phase: i.state.phase(),
        live,
        restarts: i.history.restarts,
        last_exit: i.history.last_exit.as_ref().map(|e| e.class),
        health: slot.health(),
        started_at: i.history.started_at.filter(|_| live),
        probe: probes.then(|| slot.probe.clone()),
    }
}

/// The index of the last event appended. Every event is appended by this task, so a status
/// built now reflects exactly the events up to it.
fn last_event(deps: &Deps) -> u64 {
    deps.events.next().saturating_sub(1)
}

/// What a live instance adds to its status.
#[derive(Default)]
struct LiveStatus {
    pid: Option<i32>,
    init_pid: Option<i32>,
    usage: Option<(CgroupStats, Option<f64>)>,
    ports: BTreeMap<String, u16>,
    log_dropped: LogStat,
}

fn instance_status(
    deps: &Deps,
    service: &str,
    slot: &mut Slot,
    fresh: bool,
    (now, wall): (Instant, SystemTime),
) -> InstanceStatus {
    let health = slot.health();
    let health_reason = slot
        .tracker()
        .map(|t| t.last_reason().to_string())
        .unwrap_or_default();
    let Slot {
        instance: i, live, ..
    } = slot;
    let key = InstanceKey::new(service, i.index);
    let live = match live.as_mut().filter(|_| i.state.is_live()) {
        Some(l) => live_status(deps, &key, &i.id, l, fresh, now),
        None => LiveStatus::default(),
    };
    let notifies = i.spec.health.as_ref().is_some_and(|h| h.notify);
    InstanceStatus {
        id: i.id.clone(),
        index: i.index,
        revision: i.revision,
        epoch: i.epoch,
        incarnation: i.incarnation,
        state: i.state.phase(),
        start_failed: matches!(i.state, State::Backoff { .. }) && i.history.last_error.is_some(),
        pid: live.pid,
        init_pid: live.init_pid,
        restarts: i.history.restarts,
        last_exit: i.history.last_exit.clone(),
        usage: live.usage,
        started_at: i.history.started_at.filter(|_| i.state.is_live()),
        next_start_at: match i.state {
            State::Backoff { until } => Some(wall + until.saturating_duration_since(now)),
            _ => None,
        },
        last_error: i.history.last_error.clone(),
        cgroup: deps.cgroups.display_path(&cgroup_of(&key)),
        ports: live.ports,
        log_dropped: live.log_dropped,
        health,
        health_reason,
        notify_status: if notifies && i.state.is_live() {
            deps.files
                .notify_state(&i.id)
                .map(|n| n.status)
                .unwrap_or_default()
        } else {
            String::new()
        },
    }
}

/// Its PIDs, ports and usage: read from its cgroup now when `fresh` or when the last reading
/// is older than [`USAGE_TTL`], else that reading.
fn live_status(
    deps: &Deps,
    key: &InstanceKey,
    id: &str,
    l: &mut Live,
    fresh: bool,
    now: Instant,
) -> LiveStatus {
    if l.main_pid.is_none() {
        l.main_pid = deps.processes.main_pid(l.process.pid);
    }
    let recent = l
        .usage
        .filter(|(at, ..)| !fresh && now.saturating_duration_since(*at) < USAGE_TTL);
    let (usage, log_dropped) = match recent {
        Some((_, u, d)) => (Some(u), d),
        None => {
            let u = deps.cgroups.stats(&cgroup_of(key)).ok();
            let d = deps.files.log_stat(id);
            if let Some(u) = u {
                l.usage = Some((now, u, d));
                l.cpu = l.cpu.sample(now, u.cpu_usage_ns);
            }
            (u, d)
        }
    };
    LiveStatus {
        pid: l.main_pid,
        init_pid: Some(l.process.pid),
        usage: usage.map(|u| (u, l.cpu.rate)),
        ports: l.ports.clone(),
        log_dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// Readings (ms after the start, CPU ns) and the rate after each.
    #[test]
    fn cpu_rate_spans_at_least_half_a_second() {
        let t0 = Instant::now();
        let cases: [(u64, u64, Option<f64>); 6] = [
            // The first reading is only a base.
            (0, 10 * SEC, None),
            // Too soon after it: nothing yet, and the base stays.
            (100, 10 * SEC + SEC / 10, None),
            // 600 ms after the base, 0.3 s of CPU: half a core.
            (600, 10 * SEC + 3 * SEC / 10, Some(0.5)),
            // Too soon again: the last rate is kept.
            (700, 20 * SEC, Some(0.5)),
            // Two cores over one second (from the base at 600 ms).
            (1600, 12 * SEC + 3 * SEC / 10, Some(2.0)),
            // The counter went backwards (a cgroup made anew): no use, not a wrap-around.
            (2600, SEC, Some(0.0)),
        ];
        let mut cpu = CpuRate::default();
        for (ms, ns, want) in cases {
            cpu = cpu.sample(t0 + Duration::from_millis(ms), ns);
            match (cpu.rate, want) {
                (Some(got), Some(want)) => {
                    assert!((got - want).abs() < 1e-9, "at {ms} ms: {got} != {want}")
                }
                (got, want) => assert_eq!(got, want, "at {ms} ms"),
            }
        }
    }
}
