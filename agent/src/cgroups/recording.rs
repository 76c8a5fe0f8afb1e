//! An in-memory `CgroupBackend` that records what it was asked to do, for the supervisor's
//! tests: cgroups are entries in a map, the test sets their processes and counters.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use super::{
    Capabilities, CgroupBackend, CgroupError, CgroupPath, CgroupStats, CgroupVersion, Control,
};
use crate::spec::Resources;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    pub limits: Resources,
    pub procs: Vec<i32>,
    pub stats: CgroupStats,
    /// `restrict_devices` was called on it.
    pub devices_restricted: bool,
    /// Every `set_cpu_limit` on it, in order: (cores, period in µs).
    pub cpu_limits: Vec<(Option<f64>, u64)>,
}

#[derive(Debug, Default)]
struct State {
    cgroups: BTreeMap<CgroupPath, Entry>,
    kills: Vec<CgroupPath>,
    removed: Vec<CgroupPath>,
    /// Every `set_cpu_weight`, in order: (path, processes).
    weights: Vec<(CgroupPath, u64)>,
}

#[derive(Debug)]
pub struct RecordingCgroups {
    caps: Capabilities,
    state: Mutex<State>,
}

impl Default for RecordingCgroups {
    fn default() -> Self {
        RecordingCgroups::new(&[
            Control::Cpu,
            Control::CpuAccounting,
            Control::Memory,
            Control::MemorySwap,
            Control::Pids,
            Control::Devices,
        ])
    }
}

impl RecordingCgroups {
    /// A backend that can enforce `available`; every other control is unavailable.
    pub fn new(available: &[Control]) -> RecordingCgroups {
        let all = [
            Control::Cpu,
            Control::CpuAccounting,
            Control::Memory,
            Control::MemorySwap,
            Control::Pids,
            Control::Devices,
        ];
        RecordingCgroups {
            caps: Capabilities {
                version: CgroupVersion::V2,
                parent: "/test".into(),
                available: available.to_vec(),
                unavailable: all
                    .into_iter()
                    .filter(|c| !available.contains(c))
                    .map(|c| (c, "not delegated to /test".to_string()))
                    .collect(),
            },
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cgroup at `path`, if it exists.
    pub fn entry(&self, path: &CgroupPath) -> Option<Entry> {
        self.lock().cgroups.get(path).cloned()
    }

    /// Every existing cgroup path.
    pub fn paths(&self) -> Vec<CgroupPath> {
        self.lock().cgroups.keys().cloned().collect()
    }

    /// Every `set_cpu_weight`, in order: (path, processes).
    pub fn weights(&self) -> Vec<(CgroupPath, u64)> {
        self.lock().weights.clone()
    }

    /// The weight last set on `path`, in processes.
    pub fn weight(&self, path: &CgroupPath) -> Option<u64> {
        let st = self.lock();
        st.weights
            .iter()
            .rev()
            .find(|(p, _)| p == path)
            .map(|(_, n)| *n)
    }

    /// Paths `kill_all` was called on, in order.
    pub fn kills(&self) -> Vec<CgroupPath> {
        self.lock().kills.clone()
    }

    /// Set the OOM kill counter of a cgroup (as the kernel would after an OOM kill).
    pub fn set_oom_kills(&self, path: &CgroupPath, n: u64) {
        if let Some(e) = self.lock().cgroups.get_mut(path) {
            e.stats.oom_kills = n;
        }
    }

    /// Set every counter of an existing cgroup (as the kernel's files would read).
    pub fn set_stats(&self, path: &CgroupPath, stats: CgroupStats) {
        if let Some(e) = self.lock().cgroups.get_mut(path) {
            e.stats = stats;
        }
    }

    /// Put processes in a cgroup (or, with an empty list, empty it).
    pub fn set_procs(&self, path: &CgroupPath, procs: Vec<i32>) {
        self.lock().cgroups.entry(path.clone()).or_default().procs = procs;
    }
}

impl CgroupBackend for RecordingCgroups {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn restrict_devices(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        match self.lock().cgroups.get_mut(path) {
            Some(e) => {
                e.devices_restricted = true;
                Ok(())
            }
            None => Err(CgroupError::Unsupported {
                path: path.to_string(),
                reason: "no such cgroup".into(),
            }),
        }
    }

    fn set_cpu_weight(&self, path: &CgroupPath, processes: u64) -> Result<(), CgroupError> {
        if !self.caps.has(Control::Cpu) {
            return Err(CgroupError::Unsupported {
                path: path.to_string(),
                reason: "no cpu control".into(),
            });
        }
        self.lock().weights.push((path.clone(), processes));
        Ok(())
    }

    fn set_cpu_limit(
        &self,
        path: &CgroupPath,
        cores: Option<f64>,
        period_us: u64,
    ) -> Result<(), CgroupError> {
        if !self.caps.has(Control::Cpu) {
            return Err(CgroupError::Unsupported {
                path: path.to_string(),
                reason: "no cpu control".into(),
            });
        }
        match self.lock().cgroups.get_mut(path) {
            Some(e) => {
                e.cpu_limits.push((cores, period_us));
                Ok(())
            }
            None => Err(CgroupError::Unsupported {
                path: path.to_string(),
                reason: "no such cgroup".into(),
            }),
        }
    }

    fn create(&self, path: &CgroupPath, limits: &Resources) -> Result<(), CgroupError> {
        if let Some(reason) = self.caps.refuse(limits) {
            return Err(CgroupError::Unsupported {
                path: path.to_string(),
                reason,
            });
        }
        let mut st = self.lock();
        if st.cgroups.get(path).is_some_and(|e| !e.procs.is_empty()) {
            return Err(CgroupError::Remove {
                path: path.to_string(),
                dir: path.relative(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        st.cgroups.insert(
            path.clone(),
            Entry {
                limits: *limits,
                ..Entry::default()
            },
        );
        Ok(())
    }

    fn open_procs(&self, _path: &CgroupPath) -> Result<Vec<OwnedFd>, CgroupError> {
        Ok(Vec::new())
    }

    fn procs(&self, path: &CgroupPath) -> Result<Vec<i32>, CgroupError> {
        Ok(self
            .lock()
            .cgroups
            .get(path)
            .map(|e| e.procs.clone())
            .unwrap_or_default())
    }

    fn kill_all(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        let mut st = self.lock();
        st.kills.push(path.clone());
        if let Some(e) = st.cgroups.get_mut(path) {
            e.procs.clear();
        }
        Ok(())
    }

    fn stats(&self, path: &CgroupPath) -> Result<CgroupStats, CgroupError> {
        Ok(self
            .lock()
            .cgroups
            .get(path)
            .map(|e| e.stats)
            .unwrap_or_default())
    }

    fn remove(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        let mut st = self.lock();
        let busy = st.cgroups.iter().any(|(p, e)| {
            (p == path && !e.procs.is_empty())
                || (p != path && p.components().starts_with(path.components()))
        });
        if busy {
            return Err(CgroupError::Remove {
                path: path.to_string(),
                dir: path.relative(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        st.cgroups.remove(path);
        st.removed.push(path.clone());
        Ok(())
    }

    fn children(&self, path: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        let depth = path.components().len();
        let mut out: Vec<String> = self
            .lock()
            .cgroups
            .keys()
            .filter(|p| {
                p.components().len() > depth && p.components().starts_with(path.components())
            })
            .map(|p| p.components()[depth].clone())
            .collect();
        out.dedup();
        Ok(out)
    }

    fn display_path(&self, path: &CgroupPath) -> String {
        format!("/test/{path}")
    }
}
