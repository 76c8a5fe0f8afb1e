//! Errors of the agent's writes to cgroupfs, counted by operation: a decorator over the
//! [`CgroupBackend`] the supervisor uses, so that every write is counted without the
//! supervisor knowing.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::cgroups::{Capabilities, CgroupBackend, CgroupError, CgroupPath, CgroupStats};
use crate::spec::Resources;

type OpLabels = [(&'static str, &'static str); 1];

/// Failed cgroup writes by operation: `create` (making a cgroup and writing its limits),
/// `attach` (opening `cgroup.procs`), `restrict_devices`, `limit` (changing a live cgroup's
/// CPU limit), `kill` and `remove`.
#[derive(Debug, Clone, Default)]
pub struct CgroupErrors(Family<OpLabels, Counter>);

const OPERATIONS: [&str; 6] = [
    "create",
    "attach",
    "restrict_devices",
    "limit",
    "kill",
    "remove",
];

impl CgroupErrors {
    pub fn new() -> CgroupErrors {
        let errors = CgroupErrors::default();
        // Every operation from 0, so that the first error shows as an increase.
        for op in OPERATIONS {
            drop(errors.0.get_or_create(&[("operation", op)]));
        }
        errors
    }

    fn count<T>(&self, op: &'static str, r: Result<T, CgroupError>) -> Result<T, CgroupError> {
        if r.is_err() {
            self.0.get_or_create(&[("operation", op)]).inc();
        }
        r
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "corral_cgroup_write_errors",
            "Failed writes to cgroupfs by the agent, by operation (create: the cgroup and its limits; attach; restrict_devices; limit: a live cgroup's CPU limit changed; kill; remove)",
            self.0.clone(),
        );
    }

    #[cfg(test)]
    pub(crate) fn get(&self, op: &'static str) -> u64 {
        self.0.get(&[("operation", op)]).map_or(0, |c| c.get())
    }
}

/// A backend that counts the errors of the one it wraps.
#[derive(Debug)]
pub struct CountingCgroups {
    inner: Arc<dyn CgroupBackend>,
    errors: CgroupErrors,
}

impl CountingCgroups {
    pub fn new(inner: Arc<dyn CgroupBackend>, errors: CgroupErrors) -> CountingCgroups {
        CountingCgroups { inner, errors }
    }
}

impl CgroupBackend for CountingCgroups {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }

    fn tree_dir(&self) -> Option<std::path::PathBuf> {
        self.inner.tree_dir()
    }

    fn create(&self, path: &CgroupPath, limits: &Resources) -> Result<(), CgroupError> {
        self.errors.count("create", self.inner.create(path, limits))
    }

    fn open_procs(&self, path: &CgroupPath) -> Result<Vec<OwnedFd>, CgroupError> {
        self.errors.count("attach", self.inner.open_procs(path))
    }

    fn open_dir(&self, path: &CgroupPath) -> Result<Option<OwnedFd>, CgroupError> {
        self.errors.count("attach", self.inner.open_dir(path))
    }

    fn restrict_devices(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        self.errors
            .count("restrict_devices", self.inner.restrict_devices(path))
    }

    fn set_cpu_limit(
        &self,
        path: &CgroupPath,
        cores: Option<f64>,
        period_us: u64,
    ) -> Result<(), CgroupError> {
        self.errors
            .count("limit", self.inner.set_cpu_limit(path, cores, period_us))
    }

    fn procs(&self, path: &CgroupPath) -> Result<Vec<i32>, CgroupError> {
        self.inner.procs(path)
    }

    fn holds(&self, path: &CgroupPath, pid: i32) -> Result<bool, CgroupError> {
        self.inner.holds(path, pid)
    }

    fn kill_all(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        self.errors.count("kill", self.inner.kill_all(path))
    }

    fn stats(&self, path: &CgroupPath) -> Result<CgroupStats, CgroupError> {
        self.inner.stats(path)
    }

    fn oom_kills(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        self.inner.oom_kills(path)
    }

    fn remove(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        let r = self.inner.remove(path);
        // A cgroup that still has tasks is retried once they are gone: not a failed write.
        if matches!(&r, Err(e) if e.is_busy()) {
            return r;
        }
        self.errors.count("remove", r)
    }

    fn children(&self, path: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        self.inner.children(path)
    }

    fn display_path(&self, path: &CgroupPath) -> String {
        self.inner.display_path(path)
    }
}
