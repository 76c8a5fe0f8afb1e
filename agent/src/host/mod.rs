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
            cpus: std::thread::available_parallelism()
                .map_or(1, |n| crate::num::count_u32(n.get())),
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

/// The file under the state directory that holds the node's id.
pub const NODE_ID_FILE: &str = "node-id";

/// This node's id: read from `<state_dir>/node-id`, made there (a random UUID from the
/// kernel, written to a temporary file, synced and renamed into place) the first time.
pub fn node_id(state_dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    let path = state_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if valid_node_id(text.trim()) => return Ok(text.trim().to_string()),
        Ok(text) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds {:?}, not a node id (remove it to make a new one)",
                    path.display(),
                    text.chars().take(80).collect::<String>()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_string();
    let tmp = state_dir.join(format!(".{NODE_ID_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{id}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(id)
}

/// A UUID's text: 36 characters of hex digits and dashes.
fn valid_node_id(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The kernel's id of this boot, or empty when it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod node_id_tests {
    use super::*;

    #[test]
    fn the_node_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = node_id(dir.path()).expect("made");
        assert!(valid_node_id(&first), "{first}");
        assert_eq!(
            node_id(dir.path()).expect("read"),
            first,
            "the same id again"
        );
        std::fs::write(dir.path().join(NODE_ID_FILE), "garbage").expect("write");
        assert!(
            node_id(dir.path()).is_err(),
            "a damaged file is not replaced silently"
        );
    }
}
