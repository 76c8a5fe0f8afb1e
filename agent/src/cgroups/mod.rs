//! cgroups: one `CgroupBackend` seam over cgroup v1/hybrid ([`v1`]) and v2 ([`v2`]), chosen at
//! start by [`detect`]. The agent's tree lives beneath one parent (its own cgroup, or
//! `--cgroup-parent`), one cgroup per instance: `<parent>/corral/<service>/<instance>`.
//!
//! [`detect`] finds the version, the mounts and the parent. cgroups-rs writes the limits, only
//! through [`seam`], which contains its known defects: every call runs under `catch_unwind`,
//! every value written is read back (it swallows some write errors), OOM kills are read from
//! the kernel's own counters, and killing everything works on v1 too (no `cgroup.kill`
//! there). `recording::RecordingCgroups` (tests and the `testkit` feature) is an in-memory
//! backend for the supervisor's tests.
//!
//! Imports from the crate: `spec` and `procfs` only.

pub mod detect;
pub mod devices;
#[cfg(test)]
mod fake;
mod fsutil;
pub mod owner;
#[cfg(any(test, feature = "testkit"))]
pub mod recording;
mod seam;
mod statfiles;
#[cfg(test)]
mod testkit;
pub mod v1;
pub mod v2;

pub use detect::{detect, detect_with};
pub use v1::{V1Backend, V1Hierarchy, V1Layout};
pub use v2::V2Backend;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::spec::{Devices, FieldError, Isolation, Resources};

/// Where an instance with no CPU quota is scheduled (`--cpu-cgroup`). The kernel schedules a
/// cpu cgroup as one entity at its parent's level: a cgroup per instance makes each instance
/// a separate entity whose weight goes to whichever of its threads is runnable, where
/// processes in one cgroup compete thread by thread, as under a plain supervisor. Only the cpu
/// controller is concerned; memory, pids and devices stay per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuCgroup {
    /// An instance with no CPU quota is scheduled in its service's cpu cgroup: on v1 its
    /// processes join the service's cgroup in the cpu hierarchy (and `cpuacct` when mounted
    /// with it); on v2 the service does not hand the cpu controller to its instances while
    /// none has a quota. An instance with a quota (`resources.cpu`, a rollout's `start_cpu`)
    /// has its own; when a start cap is lifted, the instance goes back to its service's.
    PerService,
    /// Every instance has a cpu cgroup of its own.
    PerInstance,
}

/// The cgroup version the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

/// A resource control the agent may or may not be able to enforce on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Control {
    /// CPU bandwidth (CFS quota): `resources.cpu`.
    Cpu,
    /// Memory hard limit: `resources.memory`.
    Memory,
    /// The memory limit also bounds swap (v1 `memsw`, v2 `memory.swap.max`).
    MemorySwap,
    /// Task limit: `resources.pids`.
    Pids,
    /// CPU time accounting (v1 `cpuacct`, v2 `cpu.stat`).
    CpuAccounting,
    /// Device allowlists (v1 `devices`, v2 a device BPF program): `isolation.devices`.
    Devices,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Cpu => "cpu",
            Control::Memory => "memory",
            Control::MemorySwap => "memsw",
            Control::Pids => "pids",
            Control::CpuAccounting => "cpuacct",
            Control::Devices => "devices",
        }
    }
}

/// What the backend found at start: version, where the tree lives, what it can enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub version: CgroupVersion,
    /// Human-readable location of the parent, e.g. `/sys/fs/cgroup/system.slice/corrald.service`
    /// (v2) or `memory:/x,cpu:/,...` (v1).
    pub parent: String,
    pub available: Vec<Control>,
    /// Controls the agent cannot use, each with the reason.
    pub unavailable: Vec<(Control, String)>,
}

impl Capabilities {
    pub fn has(&self, c: Control) -> bool {
        self.available.contains(&c)
    }

    /// Why a spec's resources cannot be enforced here, one error per field (none when they can).
    pub fn refuse_fields(&self, res: &Resources) -> Vec<FieldError> {
        let mut why = Vec::new();
        let mut need = |wanted: bool, c: Control, field: &str| {
            if wanted && !self.has(c) {
                let reason = self
                    .unavailable
                    .iter()
                    .find(|(u, _)| *u == c)
                    .map(|(_, r)| r.as_str())
                    .unwrap_or("not available");
                why.push(FieldError::new(
                    field,
                    format!("this host cannot enforce a {} limit ({reason})", c.as_str()),
                ));
            }
        };
        need(res.cpu.is_some(), Control::Cpu, "resources.cpu");
        need(res.memory.is_some(), Control::Memory, "resources.memory");
        need(res.pids.is_some(), Control::Pids, "resources.pids");
        why
    }

    /// [`Capabilities::refuse_fields`] as one line, or `None` when they can be enforced.
    pub fn refuse(&self, res: &Resources) -> Option<String> {
        let why = self.refuse_fields(res);
        (!why.is_empty()).then(|| {
            why.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// Why a spec's isolation cannot be enforced here (the device control), or `None`.
    pub fn refuse_isolation(&self, iso: &Isolation) -> Option<FieldError> {
        if iso.devices != Devices::Minimal || self.has(Control::Devices) {
            return None;
        }
        let reason = self
            .unavailable
            .iter()
            .find(|(c, _)| *c == Control::Devices)
            .map_or("not available", |(_, r)| r.as_str());
        Some(FieldError::new(
            "isolation.devices",
            format!(
                "this host cannot deny devices to an instance ({reason}); set \"host\" to run with the host's devices"
            ),
        ))
    }
}

/// A cgroup below the agent's parent, as path components: `corral/<service>/<instance>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(Vec<String>);

impl CgroupPath {
    /// The agent's own subtree: `corral`.
    pub fn root() -> CgroupPath {
        CgroupPath(vec!["corral".to_string()])
    }

    /// The agent's parent itself (no component): the directory `corral` is made in.
    pub fn parent() -> CgroupPath {
        CgroupPath(Vec::new())
    }

    /// `corral/<service>`.
    pub fn service(service: &str) -> CgroupPath {
        CgroupPath::root().child(service)
    }

    /// `corral/<service>/<instance>`.
    pub fn instance(service: &str, instance: &str) -> CgroupPath {
        CgroupPath::service(service).child(instance)
    }

    /// A child path. `name` must be a single, plain component (no `/`, not `.` or `..`);
    /// names reaching here were validated by `spec` or read from a directory listing.
    pub fn child(&self, name: &str) -> CgroupPath {
        debug_assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..");
        let mut v = self.0.clone();
        v.push(name.to_string());
        CgroupPath(v)
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// The path relative to the parent, e.g. `corral/web/web-0`.
    pub fn relative(&self) -> PathBuf {
        self.0.iter().collect()
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("<parent>");
        }
        f.write_str(&self.0.join("/"))
    }
}

/// Usage of one cgroup, read from its own files.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CgroupStats {
    /// Total CPU time, nanoseconds.
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    /// OOM kills inside this cgroup since it was created (v1 `memory.oom_control` `oom_kill`,
    /// v2 `memory.events` `oom_kill`).
    pub oom_kills: u64,
    /// Tasks in the cgroup.
    pub pids: u64,
    /// CFS periods in which the cgroup was throttled (v1 and v2 `cpu.stat` `nr_throttled`;
    /// 0 without a CPU limit or where the kernel does not count them).
    pub cpu_throttled_periods: u64,
    /// Time the cgroup spent throttled, nanoseconds (v1 `throttled_time`, v2
    /// `throttled_usec`).
    pub cpu_throttled_ns: u64,
    /// The memory limit in force, read back from the cgroup (`None`: unlimited, or no memory
    /// controller).
    pub memory_limit_bytes: Option<u64>,
    /// Memory pressure (PSI, v2 `memory.pressure`); `None` on v1 (which has no per-cgroup
    /// pressure) and on kernels without PSI.
    pub memory_pressure: Option<Pressure>,
}

/// Pressure stall information: the share of wall time some (`some`) or all (`full`)
/// tasks of the cgroup were stalled, averaged over 10 and 60 s, in percent, and the total
/// stall time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    pub some_avg60: f64,
    pub some_total_usec: u64,
    pub full_avg10: f64,
    pub full_avg60: f64,
    pub full_total_usec: u64,
}

impl Pressure {
    /// Parses a PSI file (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and a `full` line);
    /// `None` when it is not one.
    pub fn parse(text: &str) -> Option<Pressure> {
        let mut p = Pressure::default();
        let (mut some, mut full) = (false, false);
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let kind = parts.next()?;
            let (mut avg10, mut avg60, mut total) = (None, None, None);
            for kv in parts {
                let (k, v) = kv.split_once('=')?;
                match k {
                    "avg10" => avg10 = v.parse::<f64>().ok(),
                    "avg60" => avg60 = v.parse::<f64>().ok(),
                    "total" => total = v.parse::<u64>().ok(),
                    _ => {}
                }
            }
            let (a10, a60, t) = (avg10?, avg60?, total?);
            match kind {
                "some" => {
                    (p.some_avg10, p.some_avg60, p.some_total_usec) = (a10, a60, t);
                    some = true;
                }
                "full" => {
                    (p.full_avg10, p.full_avg60, p.full_total_usec) = (a10, a60, t);
                    full = true;
                }
                _ => {}
            }
        }
        (some && full).then_some(p)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: cannot create {dir}: {source}")]
    Create {
        path: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: writing {value:?} to {file} failed: {source}")]
    Write {
        path: String,
        file: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: {file} reads {found:?} after writing {wanted:?}")]
    NotApplied {
        path: String,
        file: PathBuf,
        wanted: String,
        found: String,
    },
    #[error("cgroup {path}: reading {file} failed: {source}")]
    Read {
        path: String,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: cannot remove {dir}: {source}")]
    Remove {
        path: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: cgroups-rs failed: {message}")]
    Library { path: String, message: String },
    #[error("cgroup {path}: cgroups-rs panicked: {message}")]
    Panicked { path: String, message: String },
    #[error("cgroup {path}: the host cannot enforce it: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("cgroups: {0}")]
    Setup(String),
    #[error("cgroup {path}: cannot open {file} for writing: {source}")]
    Open {
        path: String,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: sending SIGKILL to pid {pid} failed: {source}")]
    Kill {
        path: String,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

impl CgroupError {
    /// The cgroup still has tasks (rmdir gave EBUSY): retry after they are gone.
    pub fn is_busy(&self) -> bool {
        matches!(self, CgroupError::Remove { source, .. } if source.raw_os_error() == Some(libc::EBUSY))
    }
}

/// The CFS period of a CPU limit a cgroup gets while it starts: 10 ms, so that a capped
/// start runs in slices of a few milliseconds rather than in 100 ms bursts at its full
/// weight followed by a long throttle; longer when `cores` of it would be under the
/// kernel's 1 ms minimum quota (at 0.01 cores, 100 ms).
pub fn start_cpu_period(cores: f64) -> u64 {
    const SHORT_US: u64 = 10_000;
    if cores * SHORT_US as f64 >= 1000.0 {
        return SHORT_US;
    }
    // cores >= 0.01 (validated): at most 100 000; the cast of a finite value in range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let period = (1000.0 / cores.max(0.01)).ceil() as u64;
    period.clamp(SHORT_US, CPU_PERIOD_US)
}

/// v1 `cpu.shares` for the weight of `processes` processes (1024 each, within 2..=262144).
pub fn v1_shares(processes: u64) -> u64 {
    processes.clamp(1, 256).saturating_mul(1024)
}

/// v2 `cpu.weight` for the weight of `processes` processes (100 each, within 1..=10000).
pub fn v2_weight(processes: u64) -> u64 {
    processes.clamp(1, 100).saturating_mul(100)
}

/// The CFS period of every other CPU limit (the kernel's default), microseconds.
pub const CPU_PERIOD_US: u64 = fsutil::CPU_PERIOD_US;

/// The seam between the supervisor and the kernel's cgroup filesystems.
///
/// All methods are quick, synchronous file operations on cgroupfs (microseconds); none waits
/// for processes to die. Paths that do not exist are not errors where the operation is
/// naturally idempotent (`procs`, `kill_all`, `remove` on a missing cgroup).
pub trait CgroupBackend: Send + Sync + fmt::Debug + 'static {
    fn capabilities(&self) -> &Capabilities;

    /// Create the cgroup (and any missing ancestors below the parent) and apply `limits`,
    /// reading each written value back. Controls that are `None` are left unlimited.
    /// Fails with `Unsupported` when a limit asks for a control the host lacks.
    fn create(&self, path: &CgroupPath, limits: &Resources) -> Result<(), CgroupError>;

    /// Open, for writing and close-on-exec, the files through which a process joins `path`:
    /// each v1 hierarchy's `tasks`, v2's `cgroup.procs`. A freshly forked (single-threaded)
    /// child writes `"0"` to each before it runs anything else, so it is inside its limits
    /// from its first instruction; a pid written there moves that process's only thread.
    fn open_procs(&self, path: &CgroupPath) -> Result<Vec<OwnedFd>, CgroupError>;

    /// On v2, the cgroup's directory opened `O_PATH`, for `clone3(CLONE_INTO_CGROUP)`: the
    /// child is born inside the cgroup, with no migration (a migration waits for an RCU grace
    /// period, milliseconds). `None` on v1, where the child writes `cgroup.procs` instead.
    fn open_dir(&self, path: &CgroupPath) -> Result<Option<OwnedFd>, CgroupError> {
        let _ = path;
        Ok(None)
    }

    /// The directory of the agent's tree (the parent cgroup; on v1, in the first hierarchy
    /// used), which [`owner::lock_tree`] locks. `None` for backends without one.
    fn tree_dir(&self) -> Option<PathBuf> {
        None
    }

    /// Let the cgroup's processes open and create only the devices of a minimal `/dev` (see
    /// [`devices`]). Called after `create`, before anything runs in the cgroup.
    fn restrict_devices(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        Err(CgroupError::Unsupported {
            path: path.to_string(),
            reason: "this backend has no device control".into(),
        })
    }

    /// Change the CPU limit of a cgroup that exists (its processes may be running): `cores`
    /// per period of `period_us` microseconds, or no limit with `None` (the period is still
    /// set). Each value is read back. For a start cap lifted later, see [`start_cpu_period`].
    fn set_cpu_limit(
        &self,
        path: &CgroupPath,
        cores: Option<f64>,
        period_us: u64,
    ) -> Result<(), CgroupError> {
        let _ = (cores, period_us);
        Err(CgroupError::Unsupported {
            path: path.to_string(),
            reason: "this backend has no cpu control".into(),
        })
    }

    /// Give the cgroup the CPU weight of `processes` processes at the default priority (v1
    /// `cpu.shares` 1024 each, v2 `cpu.weight` 100 each, within the kernel's range; 0 counts
    /// as 1), so that when the CPU is contended what runs below it gets the share that many
    /// processes would. An empty `path` ([`CgroupPath::parent`]) is the agent's parent.
    fn set_cpu_weight(&self, path: &CgroupPath, processes: u64) -> Result<(), CgroupError> {
        let _ = processes;
        Err(CgroupError::Unsupported {
            path: path.to_string(),
            reason: "this backend has no cpu control".into(),
        })
    }

    /// Every process in the cgroup (the union across v1 hierarchies), without duplicates.
    fn procs(&self, path: &CgroupPath) -> Result<Vec<i32>, CgroupError>;

    /// Whether process `pid` is in the cgroup: to tell that a PID is still an instance's
    /// process. On v1 one hierarchy is read (every instance process joins all of them).
    fn holds(&self, path: &CgroupPath, pid: i32) -> Result<bool, CgroupError> {
        Ok(self.procs(path)?.contains(&pid))
    }

    /// Send SIGKILL to every process in the cgroup (`cgroup.kill` on v2 when the kernel has
    /// it, a pass over `cgroup.procs` otherwise). One pass: the caller checks `procs` again
    /// and repeats until the cgroup is empty.
    fn kill_all(&self, path: &CgroupPath) -> Result<(), CgroupError>;

    /// Usage read from the cgroup's own files now. The files may be kept open between calls;
    /// `create` and `remove` of the cgroup close them.
    fn stats(&self, path: &CgroupPath) -> Result<CgroupStats, CgroupError>;

    /// `stats().oom_kills` alone: an instance's end needs that figure only, and reads one
    /// file for it where the others are not open already.
    fn oom_kills(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        self.stats(path).map(|s| s.oom_kills)
    }

    /// Remove the cgroup directory (in every v1 hierarchy). `Ok` when it does not exist;
    /// an error that `is_busy()` while it still has tasks or children.
    fn remove(&self, path: &CgroupPath) -> Result<(), CgroupError>;

    /// Names of the child cgroups of `path` (empty when it does not exist).
    fn children(&self, path: &CgroupPath) -> Result<Vec<String>, CgroupError>;

    /// Where the cgroup is, for status output (the v2 path, or the memory hierarchy's on v1).
    fn display_path(&self, path: &CgroupPath) -> String;
}
