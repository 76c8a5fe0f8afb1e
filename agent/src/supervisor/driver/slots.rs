//! The driver's store of services and their instance slots. A [`Slot`] holds an instance's
//! state machine together with what only a live instance has, so the two can never drift
//! apart; [`Services`] finds a slot by its [`InstanceKey`], the one way every part of the
//! driver reaches an instance.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::time::Instant;

use super::packages::PackageState;
use super::report::CpuRate;
use super::sockets::SocketMap;
use crate::cgroups::CgroupStats;
use crate::events::EventKind;
use crate::health::{self, HealthState, ProbeHandle, ServiceHealth, Tracker};
use crate::metrics::instruments::{ProbeMetrics, RolloutMetrics};
use crate::runtime::{LogStat, ProcessRef};
use crate::spec::{InstanceKey, ServiceSpec};
use crate::supervisor::Deleted;
use crate::supervisor::desired::Desired;
use crate::supervisor::handle::Reply;
use crate::supervisor::instance::{Instance, State};

/// One instance slot of a service.
pub(super) struct Slot {
    pub instance: Instance,
    /// What only a live instance has: present from its start (or adoption) to its end.
    pub live: Option<Live>,
    /// Its probe runs over all its runs.
    pub probe: ProbeMetrics,
    /// `rollout.start_cpu` of an instance a rollout started: the cores each of its starts
    /// may use until it is first ready (then `None`, and its own limit applies).
    pub start_cap: Option<f64>,
}

impl Slot {
    pub fn new(instance: Instance) -> Slot {
        Slot {
            instance,
            live: None,
            probe: ProbeMetrics::default(),
            start_cap: None,
        }
    }

    /// The instance's health: its tracker's state when the service has `[health]`, else
    /// healthy exactly while it runs.
    pub fn health(&self) -> HealthState {
        if !matches!(self.instance.state, State::Running { .. }) {
            return HealthState::Unknown;
        }
        match self.live.as_ref().and_then(|l| l.health.as_ref()) {
            Some(h) => h.tracker.state(),
            None if self.instance.spec.health.is_none() => HealthState::Healthy,
            None => HealthState::Unknown,
        }
    }

    /// The health tracker of a live instance of a service with `[health]`.
    pub fn tracker(&self) -> Option<&Tracker> {
        self.live
            .as_ref()
            .and_then(|l| l.health.as_ref())
            .map(|h| &h.tracker)
    }
}

impl Borrow<Instance> for Slot {
    fn borrow(&self) -> &Instance {
        &self.instance
    }
}

/// What only a live instance has.
pub(super) struct Live {
    pub process: ProcessRef,
    /// The init's start time, which identifies it together with its PID.
    pub start_time: u64,
    /// Host PID of the service process, once seen.
    pub main_pid: Option<i32>,
    pub cpu: CpuRate,
    /// Health tracking, for instances of a service with a `[health]` section.
    pub health: Option<LiveHealth>,
    /// The last usage read from the cgroup and the log drop count, and when.
    pub usage: Option<(Instant, CgroupStats, LogStat)>,
    pub ports: BTreeMap<String, u16>,
}

pub(super) struct LiveHealth {
    pub tracker: Tracker,
    /// Probes run while this is held; dropping it stops them.
    pub _prober: Option<ProbeHandle>,
    /// Watches for the instance's `READY=1` while held (`notify = true`).
    pub _notify: Option<AbortOnDrop>,
}

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One service: its desired state and its slots.
pub(super) struct Service {
    /// What its instances should run, its kept revisions and its rollouts (persisted).
    pub d: Desired,
    pub deleting: bool,
    /// The listening sockets of `[[sockets]]` of every spec its instances run, by address:
    /// bound by the agent, handed to every instance, kept across instance restarts, rollouts
    /// and agent restarts.
    pub sockets: SocketMap,
    pub slots: BTreeMap<u32, Slot>,
    pub delete_waiters: Vec<Reply<Deleted>>,
    pub stopped_on_delete: u32,
    /// When the rollout planner needs another look by time alone (readiness, deadlines).
    pub wake: Option<Instant>,
    /// Its rollout record changed since it was last saved.
    pub dirty: bool,
    /// Its revisions' packages (`[artifact]`, `[image]`).
    pub packages: PackageState,
    /// Its rollouts since the agent started.
    pub rollouts: RolloutMetrics,
}

impl Service {
    pub fn new(d: Desired) -> Service {
        Service {
            d,
            deleting: false,
            sockets: BTreeMap::new(),
            slots: BTreeMap::new(),
            delete_waiters: Vec::new(),
            stopped_on_delete: 0,
            wake: None,
            dirty: false,
            packages: PackageState::default(),
            rollouts: RolloutMetrics::default(),
        }
    }

    /// Count what `event` says of its rollouts.
    pub fn count(&self, event: &EventKind) {
        match event {
            EventKind::RolloutStarted { kind, .. } => self.rollouts.started(*kind),
            EventKind::RolloutFinished {
                rollout,
                state,
                rollback,
                ..
            } => {
                let took = self.d.find(rollout).and_then(|r| {
                    r.finished_at
                        .and_then(|end| end.duration_since(r.started_at).ok())
                });
                self.rollouts.finished(*state, took, rollback.is_some());
            }
            _ => {}
        }
    }

    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.slots.values().map(|s| &s.instance)
    }

    /// The listening sockets of `spec`, in its order; `None` when one is not open.
    pub fn fds_for(&self, spec: &ServiceSpec) -> Option<Vec<Arc<OwnedFd>>> {
        spec.sockets
            .iter()
            .map(|s| {
                self.sockets
                    .get(&s.listen.to_string())
                    .map(|(_, fd)| fd.clone())
            })
            .collect()
    }

    /// Its health from its instances: healthy, degraded or unhealthy.
    pub fn health(&self) -> ServiceHealth {
        let instances: Vec<health::InstanceHealth> = self
            .slots
            .values()
            .map(|s| health::InstanceHealth {
                running: matches!(s.instance.state, State::Running { .. }),
                health: s.health(),
            })
            .collect();
        health::service_health(self.d.spec.replicas, &instances)
    }
}

/// Every service by name, and through them every slot by its key.
#[derive(Default)]
pub(super) struct Services {
    by_name: BTreeMap<String, Service>,
}

impl Services {
    pub fn get(&self, name: &str) -> Option<&Service> {
        self.by_name.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Service> {
        self.by_name.get_mut(name)
    }

    pub fn insert(&mut self, name: String, service: Service) {
        self.by_name.insert(name, service);
    }

    pub fn remove(&mut self, name: &str) -> Option<Service> {
        self.by_name.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The names, for passes that change services while going through them.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Service)> {
        self.by_name.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Service)> {
        self.by_name.iter_mut()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn slot(&self, key: &InstanceKey) -> Option<&Slot> {
        self.by_name.get(&key.service)?.slots.get(&key.index)
    }

    pub fn slot_mut(&mut self, key: &InstanceKey) -> Option<&mut Slot> {
        self.by_name
            .get_mut(&key.service)?
            .slots
            .get_mut(&key.index)
    }

    /// Instances with processes the driver watches.
    pub fn live_count(&self) -> usize {
        self.by_name
            .values()
            .flat_map(|s| s.slots.values())
            .filter(|s| s.live.is_some())
            .count()
    }
}
