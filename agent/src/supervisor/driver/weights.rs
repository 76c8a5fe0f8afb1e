//! The CPU weight of the cgroups above the instances. The kernel gives every cgroup one
//! process's weight, so the whole tree, however many instances run in it, shares one
//! process's CPU with the processes beside it when the CPU is contended. With
//! [`CpuWeights::PerInstance`] (`--cpu-weight per-instance`) each of `corral/` and the service
//! cgroups is weighed instead as many processes as it holds running instances, and with its
//! `parent` the agent's parent as well: four instances get what four processes under a plain
//! supervisor would, and the agent one instance's share. [`CpuWeights::Fixed`] gives `corral/`
//! and each service one process's weight, once: the kernel's default for a new cgroup, and
//! what undoes an earlier per-instance run's weights on cgroups that outlived it (a relative
//! parent is not touched then: it may be the operator's).

use super::{CpuWeights, Driver};
use crate::cgroups::{CgroupError, CgroupPath};

impl Driver {
    /// Bring each weight to the running instances below it, writing only what changed.
    pub(super) fn reweigh(&mut self) {
        let (per_instance, parent) = match self.deps.cpu_weights {
            CpuWeights::Fixed => (false, false),
            CpuWeights::PerInstance { parent } => (true, parent),
        };
        // This runs at every turn of the driver's loop: with fixed weights a service is only
        // asked whether it runs anything, and a written weight is not written again.
        let mut want = Vec::new();
        let mut total = 0u64;
        for (name, svc) in self.services.iter() {
            let mut running = svc.slots.values().filter(|s| s.live.is_some());
            let live = if per_instance {
                u64::try_from(running.count()).unwrap_or(u64::MAX)
            } else {
                u64::from(running.next().is_some())
            };
            total = total.saturating_add(live);
            // A service with no running instance may have no cgroup yet; its weight matters
            // again, and is written, once one runs.
            if live > 0 {
                want.push((CgroupPath::service(name), live));
            }
        }
        let total = if per_instance { total } else { 1 };
        want.push((CgroupPath::root(), total));
        if parent {
            want.push((CgroupPath::parent(), total));
        }
        let services = &self.services;
        self.weights.retain(|p, _| match p.components() {
            [_, service] => services.get(service).is_some(),
            _ => true,
        });
        for (path, n) in want {
            if self.weights.get(&path) == Some(&n) {
                continue;
            }
            match self.deps.cgroups.set_cpu_weight(&path, n) {
                Ok(()) => tracing::debug!(cgroup = %path, processes = n, "cpu weight set"),
                Err(CgroupError::Unsupported { reason, .. }) => {
                    tracing::debug!(cgroup = %path, %reason, "cpu weight not set");
                }
                // Not retried until the count changes: a weight is not a limit.
                Err(e) => tracing::warn!(cgroup = %path, error = %e, "cpu weight not set"),
            }
            self.weights.insert(path, n);
        }
    }
}
