//! What the supervisor knows of every service and instance at one moment, for the metrics
//! collector: taken by the driver without touching the OS (the collector reads the cgroups
//! itself, off the driver's task), and owning clones of the slots' and services' instruments.

use std::time::SystemTime;

use crate::health::HealthState;
use crate::metrics::instruments::{ProbeMetrics, RolloutMetrics};
use crate::supervisor::{ExitClass, Phase};

/// One service.
#[derive(Debug, Clone)]
pub struct ServiceSample {
    pub name: String,
    /// Instances wanted (0 while being deleted).
    pub desired: u32,
    pub running: u32,
    pub healthy: u32,
    pub rollouts: RolloutMetrics,
    pub instances: Vec<InstanceSample>,
}

/// One instance slot.
#[derive(Debug, Clone)]
pub struct InstanceSample {
    /// `web-2`; also its cgroup's name.
    pub id: String,
    pub revision: u64,
    pub phase: Phase,
    /// It has processes the driver watches, so its cgroup exists.
    pub live: bool,
    pub restarts: u32,
    pub last_exit: Option<ExitClass>,
    pub health: HealthState,
    /// When its current run started (while it runs).
    pub started_at: Option<SystemTime>,
    /// Its probe runs, when its service has a network or exec probe.
    pub probe: Option<ProbeMetrics>,
}
