//! On-demand start and autoscaling of services with `[scale]`, as the driver runs them:
//! - **cold start**: while a service's desired count is 0, one task per listening socket
//!   waits for it to become readable (epoll through `AsyncFd`; nothing is accepted, the
//!   connection stays in the kernel's queue) and tells the driver, which sets the count to 1
//!   at once; the instance then accepts the queued connections itself. No socket is watched
//!   while the count is above 0.
//! - **sampling**: every `interval`, one blocking job reads the load of every such service
//!   (one `sock_diag` dump for all, the instances' cgroup CPU counters) and hands it back;
//! - **deciding**: [`crate::autoscale`] turns each sample into a count, capped by what node
//!   capacity admits (the reason says so), which becomes the desired count (persisted, an
//!   `autoscaled` event with the reason). A scale-down stops the least-loaded instances
//!   itself (not running first, then the least CPU, then the highest index), before the
//!   planner would pick the highest indexes. A running rollout freezes it.
//! - **a cold start that fails**: once the restart policy keeps every instance down, the
//!   connections still queued are closed (they would wait for nothing) and the count goes
//!   back to 0, so the next connection tries again; status keeps the reason.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use super::slots::AbortOnDrop;
use super::{Driver, Internal, cgroup_of};
use crate::autoscale::{Autoscaler, Decision, Load};
use crate::events::EventKind;
use crate::spec::InstanceKey;
use crate::supervisor::instance::{Event, State, StopReason};
use crate::supervisor::{AutoscaleStatus, SupervisorError};

/// The sampling interval unless configured.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The driver's autoscaling state.
pub(super) struct Scaling {
    pub interval: Duration,
    next_sample: Option<Instant>,
    /// A sample is being taken.
    in_flight: bool,
    services: BTreeMap<String, Scaled>,
}

/// One service with `[scale]`.
struct Scaled {
    scaler: Autoscaler,
    /// Watching its sockets for a first connection, while its count is 0.
    waiters: Vec<AbortOnDrop>,
    /// A cold start could not be recorded (the store failed): not watched again before.
    retry_at: Option<Instant>,
    /// Why the last cold start failed, shown while the service waits again; cleared once an
    /// instance runs.
    failure: Option<String>,
    status: AutoscaleStatus,
    /// The CPU counters of its instances at the last sample, for a rate.
    cpu: HashMap<InstanceKey, (Instant, u64)>,
    /// Each instance's CPU use over the last two samples, in cores: which go first on a
    /// scale-down.
    rates: HashMap<u32, f64>,
}

/// One service's load as sampled.
pub(super) struct Sampled {
    service: String,
    connections: u32,
    queued: u32,
    /// Each live instance's cgroup CPU counter, nanoseconds.
    cpu: Vec<(InstanceKey, u64)>,
}

/// What a sample found, or why there is none.
pub(super) struct Sample {
    at: Instant,
    result: Result<Vec<Sampled>, String>,
}

impl Scaling {
    pub fn new(interval: Duration) -> Scaling {
        Scaling {
            interval: interval.max(Duration::from_millis(10)),
            next_sample: None,
            in_flight: false,
            services: BTreeMap::new(),
        }
    }

    /// When the driver must look again for the next sample.
    pub fn wake(&self) -> Option<Instant> {
        if self.services.is_empty() || self.in_flight {
            return None;
        }
        self.next_sample
    }

    /// A service's autoscaling status, for `Get` and `List`.
    pub fn status(&self, name: &str) -> Option<AutoscaleStatus> {
        self.services.get(name).map(|s| s.status.clone())
    }
}

impl Driver {
    /// Bring the autoscaling state in line with the services: start or forget a service's
    /// scaler, watch the sockets of those at 0, and take a sample when one is due.
    pub(super) fn autoscale_pass(&mut self) {
        let now = Instant::now();
        let mut wanted = Vec::new();
        for (name, svc) in self.services.iter() {
            if svc.deleting || svc.d.spec.scale.is_none() {
                continue;
            }
            let cold = svc.d.spec.replicas == 0;
            wanted.push((name.clone(), cold, cold.then(|| svc.fds_for(&svc.d.spec))));
        }
        let scaling = &mut self.scaling;
        scaling
            .services
            .retain(|name, _| wanted.iter().any(|(n, _, _)| n == name));
        for (name, cold, fds) in wanted {
            let scaled = scaling
                .services
                .entry(name.clone())
                .or_insert_with(|| Scaled {
                    scaler: Autoscaler::new(now),
                    waiters: Vec::new(),
                    retry_at: None,
                    failure: None,
                    status: AutoscaleStatus::default(),
                    cpu: HashMap::new(),
                    rates: HashMap::new(),
                });
            scaled.status.waiting = cold;
            if !cold {
                scaled.waiters.clear();
            } else if scaled.waiters.is_empty() && scaled.retry_at.is_none_or(|t| now >= t) {
                scaled.retry_at = None;
                let fds = fds.flatten().unwrap_or_default();
                scaled.waiters = fds
                    .iter()
                    .filter_map(|fd| {
                        watch_socket(&name, fd, self.internal_tx.clone())
                            .map_err(|e| {
                                tracing::error!(service = %name, error = %e, "cannot wait on a listening socket for a cold start");
                            })
                            .ok()
                    })
                    .collect();
            }
        }
        if scaling.services.is_empty() {
            scaling.next_sample = None;
            return;
        }
        let due = *scaling.next_sample.get_or_insert(now + scaling.interval);
        if scaling.in_flight || now < due {
            return;
        }
        scaling.in_flight = true;
        scaling.next_sample = Some(now + scaling.interval);
        self.start_sample();
    }

    /// Read every scaled service's load on the blocking pool; the answer comes back as
    /// [`Internal::Load`].
    fn start_sample(&self) {
        let mut groups = Vec::new();
        let mut jobs = Vec::new();
        for name in self.scaling.services.keys() {
            let Some(svc) = self.services.get(name) else {
                continue;
            };
            groups.push(
                svc.sockets
                    .values()
                    .map(|(_, fd)| fd.clone())
                    .collect::<Vec<_>>(),
            );
            let live: Vec<InstanceKey> = svc
                .slots
                .values()
                .filter(|s| s.live.is_some())
                .map(|s| InstanceKey::new(name, s.instance.index))
                .collect();
            jobs.push((name.clone(), live));
        }
        let load = self.deps.load.clone();
        let cgroups = self.deps.cgroups.clone();
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let at = Instant::now();
            // The netlink parser is a third party's: a panic on odd kernel data is an error
            // here, never a sampler that stops for good.
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load.socket_load(&groups)
            }))
            .unwrap_or_else(|_| Err(std::io::Error::other("the socket table reader panicked")));
            let result = read
                .map_err(|e| format!("reading the sockets' load: {e}"))
                .map(|loads| {
                    jobs.into_iter()
                        .zip(loads)
                        .map(|((service, live), l)| Sampled {
                            service,
                            connections: l.connections,
                            queued: l.queued,
                            cpu: live
                                .into_iter()
                                .filter_map(|key| {
                                    let ns = cgroups.stats(&cgroup_of(&key)).ok()?.cpu_usage_ns;
                                    Some((key, ns))
                                })
                                .collect(),
                        })
                        .collect()
                });
            let _ = tx.send(Internal::Load(Sample { at, result }));
        });
    }

    /// A first connection is waiting on a service at 0: start one instance now.
    pub(super) fn on_wake(&mut self, service: &str) {
        let now = Instant::now();
        let Some(scaled) = self.scaling.services.get_mut(service) else {
            return;
        };
        scaled.waiters.clear();
        scaled.scaler.touch(now);
        let reason = "0 → 1: a connection is waiting (cold start)".to_owned();
        scaled.status.recommended = 1;
        scaled.status.reason = reason.clone();
        let d = self.cap_by_capacity(service, 0, Decision { target: 1, reason });
        if let Some(scaled) = self.scaling.services.get_mut(service) {
            scaled.status.recommended = d.target;
            scaled.status.reason.clone_from(&d.reason);
        }
        if d.target == 0 || !self.autoscale_to(service, 1, d.reason) {
            // Readable still: watching again now would wake at once, for ever.
            let interval = self.scaling.interval;
            if let Some(scaled) = self.scaling.services.get_mut(service) {
                scaled.retry_at = Some(now + interval);
            }
        }
    }

    /// A sample came back: decide each service's count.
    pub(super) fn on_sample(&mut self, sample: Sample) {
        self.scaling.in_flight = false;
        let sampled = match sample.result {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "autoscaler: no sample this time");
                return;
            }
        };
        for s in sampled {
            self.decide(&s, sample.at);
        }
    }

    fn decide(&mut self, s: &Sampled, at: Instant) {
        let Some(svc) = self.services.get(&s.service) else {
            return;
        };
        let Some(spec) = svc.d.spec.scale else {
            return;
        };
        let current = svc.d.spec.replicas;
        let cpu_limit = svc.d.spec.resources.cpu;
        let rollout = svc.d.running().is_some();
        // Only where the service may be at zero: with `min` above, what runs is kept as a
        // fixed count would be.
        let gave_up = spec.min == 0
            && current > 0
            && !svc.slots.is_empty()
            && svc
                .slots
                .values()
                .all(|slot| matches!(slot.instance.state, State::Exited));
        let why_down = gave_up.then(|| {
            svc.slots
                .values()
                .find_map(|slot| {
                    let h = &slot.instance.history;
                    h.last_error
                        .clone()
                        .or_else(|| h.last_exit.as_ref().map(|e| e.class.to_string()))
                })
                .unwrap_or_else(|| "the instances ended".to_owned())
        });
        let runs = svc
            .slots
            .values()
            .any(|slot| matches!(slot.instance.state, State::Running { .. }));
        let fds: Vec<Arc<OwnedFd>> = svc.sockets.values().map(|(_, fd)| fd.clone()).collect();
        let Some(scaled) = self.scaling.services.get_mut(&s.service) else {
            return;
        };
        // Cores used since the last sample, over the instances seen both times.
        let mut cores = 0.0;
        let mut seen = HashMap::new();
        let mut rates = HashMap::new();
        for (key, ns) in &s.cpu {
            if let Some((t0, ns0)) = scaled.cpu.get(key) {
                let span = at.saturating_duration_since(*t0).as_secs_f64();
                if span > 0.0 {
                    let rate = ns.saturating_sub(*ns0) as f64 / 1e9 / span;
                    cores += rate;
                    rates.insert(key.index, rate);
                }
            }
            seen.insert(key.clone(), (at, *ns));
        }
        scaled.cpu = seen;
        scaled.rates = rates;
        if runs {
            scaled.failure = None;
        }
        let load = Load {
            connections: s.connections,
            queued: s.queued,
            cpu: cores,
        };
        scaled.status.connections = s.connections;
        scaled.status.queued = s.queued;
        scaled.status.cpu = cores;

        if let Some(why) = why_down {
            // The restart policy keeps every instance down: nothing will accept what waits.
            let closed: u32 = fds
                .iter()
                .map(|fd| self.deps.load.close_queued(fd).unwrap_or(0))
                .sum();
            let reason = format!(
                "{current} → 0: the instances do not start ({why}); {closed} queued connection(s) closed"
            );
            if let Some(scaled) = self.scaling.services.get_mut(&s.service) {
                scaled.status.recommended = 0;
                scaled.status.reason = reason.clone();
                scaled.failure = Some(reason.clone());
            }
            let _ = self.autoscale_to(&s.service, 0, reason);
            return;
        }
        if rollout {
            scaled.status.recommended = current;
            scaled.status.reason = format!("frozen at {current}: a rollout is running");
            return;
        }
        let mut d = scaled.scaler.decide(&spec, cpu_limit, current, load, at);
        if d.target > current {
            d = self.cap_by_capacity(&s.service, current, d);
        }
        let Some(scaled) = self.scaling.services.get_mut(&s.service) else {
            return;
        };
        scaled.status.recommended = d.target;
        scaled.status.reason = match &scaled.failure {
            Some(why) if current == 0 && d.target == 0 => why.clone(),
            _ => d.reason.clone(),
        };
        let down = d.target < current;
        if d.target != current && self.autoscale_to(&s.service, d.target, d.reason) && down {
            self.stop_least_loaded(&s.service, current - d.target);
        }
    }

    /// The most instances up to `d.target` that node capacity admits (what `Scale` would
    /// be refused beyond); the reason says when capacity holds the count below what the load
    /// asks for.
    fn cap_by_capacity(&self, service: &str, current: u32, d: Decision) -> Decision {
        let Some(svc) = self.services.get(service) else {
            return d;
        };
        let fits = |n: u32| {
            let mut spec = (*svc.d.spec).clone();
            spec.replicas = n;
            self.admit_capacity(&spec)
        };
        let refused = match fits(d.target) {
            Ok(()) => return d,
            Err(SupervisorError::CapacityExceeded { exceeded }) => exceeded,
            Err(_) => Vec::new(),
        };
        // Commitments grow with the count: the largest that fits, found by bisection.
        let (mut lo, mut hi) = (current, d.target);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid).is_ok() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let over = refused
            .iter()
            .map(|e| {
                let one_more = e.requested / f64::from(d.target.max(1)) * f64::from(lo + 1);
                format!(
                    "{}: {} instances would bring it to {} of {} allowed",
                    e.field,
                    lo + 1,
                    shown_amount(e.field, e.committed + one_more),
                    shown_amount(e.field, e.limit)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let why = d
            .reason
            .split_once(": ")
            .map_or(d.reason.as_str(), |(_, w)| w);
        let reason = if lo == current {
            format!(
                "holding {current}: capped by node capacity ({why}, asks for {}; {over})",
                d.target
            )
        } else {
            format!(
                "{current} → {lo}: {why}, capped by node capacity (asks for {}; {over})",
                d.target
            )
        };
        Decision { target: lo, reason }
    }

    /// Gracefully stop `n` of a service's instances for a scale-down: those not running yet
    /// first, then the least CPU over the last samples, then the highest index. Their
    /// indexes stay free until a later scale-up takes the lowest free one again.
    fn stop_least_loaded(&mut self, service: &str, n: u32) {
        let Some(svc) = self.services.get(service) else {
            return;
        };
        let rates = self
            .scaling
            .services
            .get(service)
            .map(|s| s.rates.clone())
            .unwrap_or_default();
        let mut candidates: Vec<(bool, f64, u32)> = svc
            .slots
            .values()
            .filter(|slot| {
                !matches!(
                    slot.instance.state,
                    State::Stopping { .. } | State::Removing | State::Gone
                )
            })
            .map(|slot| {
                let i = &slot.instance;
                let running = matches!(i.state, State::Running { .. });
                (
                    running,
                    rates.get(&i.index).copied().unwrap_or(0.0),
                    i.index,
                )
            })
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(b.2.cmp(&a.2)));
        let victims: Vec<u32> = candidates
            .into_iter()
            .take(n as usize)
            .map(|(_, _, index)| index)
            .collect();
        for index in victims {
            self.feed(
                &InstanceKey::new(service, index),
                Event::StopRequested(StopReason::ScaleDown),
            );
        }
    }

    /// Make `to` the service's desired count, recorded with `reason`; whether it is.
    fn autoscale_to(&mut self, service: &str, to: u32, reason: String) -> bool {
        let result = self.set_replicas(service, to, |from, to| EventKind::Autoscaled {
            from,
            to,
            reason,
        });
        match result {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(service = %service, to, error = %e, "autoscaler: cannot change the count");
                false
            }
        }
    }
}

/// A committed amount as a person reads it: cores, or memory in MiB.
fn shown_amount(field: &str, amount: f64) -> String {
    if field == "resources.memory" {
        format!("{:.0} MiB", amount / 1_048_576.0)
    } else {
        format!("{amount:.2} cores")
    }
}

/// Wait for a connection on `fd` (a duplicate, so the agent's own stays untouched), then
/// tell the driver. Readability is edge-triggered: a connection already queued when the
/// wait begins counts, as registration reports the state it finds.
fn watch_socket(
    service: &str,
    fd: &Arc<OwnedFd>,
    tx: tokio::sync::mpsc::UnboundedSender<Internal>,
) -> std::io::Result<AbortOnDrop> {
    let dup = fd.try_clone()?;
    // SAFETY: `dup` is an open descriptor the AsyncFd owns: it stays open and refers to the
    // same socket until the AsyncFd is dropped.
    let afd = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let service = service.to_owned();
    let task = tokio::spawn(async move {
        if afd.readable().await.is_ok() {
            let _ = tx.send(Internal::Wake { service });
        }
    });
    Ok(AbortOnDrop(task.abort_handle()))
}
