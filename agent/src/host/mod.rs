//! Host facts for `Node()`: identity, capacity and load (through sysinfo), and which
//! namespaces the kernel lets the agent create.
//!
//! Imports from the crate: `spec` only.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use sysinfo::{MemoryRefreshKind, RefreshKind, System};

use crate::spec::Namespace;

/// A snapshot of the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInfo {
    pub hostname: String,
    pub kernel: String,
    pub os: String,
    pub cpus: u32,
    pub memory_total: u64,
    pub memory_available: u64,
    pub load: [f64; 3],
    pub agent_uptime_secs: u64,
}

/// Reads host facts on demand; cheap enough to call per request (tens of microseconds).
#[derive(Debug)]
pub struct Host {
    /// `None` when sysinfo cannot read this host (memory then reports 0).
    sys: Mutex<Option<System>>,
    started: Instant,
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

impl Host {
    pub fn new() -> Host {
        Host {
            sys: Mutex::new(
                System::new_with_specifics(
                    RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
                )
                .ok(),
            ),
            started: Instant::now(),
        }
    }

    pub fn snapshot(&self) -> HostInfo {
        let mut sys = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        let (memory_total, memory_available) = match sys.as_mut() {
            Some(sys) => {
                sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
                (sys.total_memory(), sys.available_memory())
            }
            None => (0, 0),
        };
        let load = System::load_average()
            .map(|l| [l.one, l.five, l.fifteen])
            .unwrap_or_default();
        HostInfo {
            hostname: System::host_name().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_total,
            memory_available,
            load,
            agent_uptime_secs: self.started.elapsed().as_secs(),
        }
    }
}

/// The namespaces the agent can create here: the kernel has the namespace type
/// (`/proc/self/ns/<type>`) and its per-user limit is not zero.
pub fn available_namespaces() -> Vec<Namespace> {
    available_namespaces_in(Path::new("/proc"))
}

fn available_namespaces_in(proc: &Path) -> Vec<Namespace> {
    Namespace::ALL
        .into_iter()
        .filter(|ns| {
            let (file, limit) = match ns {
                Namespace::Pid => ("pid", "max_pid_namespaces"),
                Namespace::Mount => ("mnt", "max_mnt_namespaces"),
                Namespace::Uts => ("uts", "max_uts_namespaces"),
                Namespace::Ipc => ("ipc", "max_ipc_namespaces"),
                Namespace::Net => ("net", "max_net_namespaces"),
                Namespace::Cgroup => ("cgroup", "max_cgroup_namespaces"),
            };
            let exists = proc.join("self/ns").join(file).exists();
            let allowed = std::fs::read_to_string(proc.join("sys/user").join(limit))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_none_or(|n| n > 0);
            exists && allowed
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_real_values() {
        let h = Host::new();
        let s = h.snapshot();
        assert!(s.cpus >= 1);
        assert!(s.memory_total > 0 && s.memory_available <= s.memory_total);
        assert!(!s.kernel.is_empty());
    }

    #[test]
    fn namespaces_follow_proc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("self/ns")).expect("mkdir");
        std::fs::create_dir_all(p.join("sys/user")).expect("mkdir");
        for f in ["pid", "mnt", "uts", "ipc", "net"] {
            std::fs::write(p.join("self/ns").join(f), "").expect("write");
        }
        std::fs::write(p.join("sys/user/max_net_namespaces"), "0\n").expect("write");
        std::fs::write(p.join("sys/user/max_pid_namespaces"), "100\n").expect("write");
        let got = available_namespaces_in(p);
        assert_eq!(
            got,
            vec![
                Namespace::Pid,
                Namespace::Mount,
                Namespace::Uts,
                Namespace::Ipc
            ]
        );
    }
}
