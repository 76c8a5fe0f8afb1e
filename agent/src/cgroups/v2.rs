//! cgroup v2 (unified): one directory per agent cgroup. At start the backend makes the parent
//! usable under the "no internal processes" rule: controllers reach children only through a
//! `cgroup.subtree_control` of a cgroup without processes, so when the parent (or a cgroup on
//! the way to it) holds the agent itself, the agent moves into a `corrald` leaf beside the
//! tree it manages; any other process there is an error for the operator to fix. cpu, memory
//! and pids are enabled, write errors checked, in the parent and in every intermediate cgroup
//! (`corral/`, `corral/<service>/`), and the capabilities are read from the parent's own
//! `cgroup.controllers` — what was delegated, not what the root has. Limits are written through
//! cgroups-rs controllers and read back; OOM kills come from `memory.events`.
//! With [`CpuCgroup::PerService`] a service cgroup hands its instances memory and pids but
//! not cpu while none of them has a CPU quota: the service is then their one cpu cgroup, and
//! each instance's CPU time is still its own `cpu.stat` (kept by the cgroup core, controller
//! or not). An instance given a quota turns cpu on for the service's instances; the last quota
//! lifted turns it off again.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cgroups_rs::fs::MaxValue;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;

use super::fsutil::{
    self, CPU_PERIOD_US, CgroupDirs, Cgroupfs, Limits, create_dirs, keyed_u64, keyed_u64_or_zero,
    parsed, read_err, read_procs, read_trimmed, remove_all, remove_created, sigkill_all, subdirs,
    write_value,
};
use super::seam::{self, Expect};
use super::statfiles::{Need, StatFiles, Wanted};
use super::{
    Capabilities, CgroupBackend, CgroupError, CgroupPath, CgroupStats, CgroupVersion, Control,
    CpuCgroup,
};
use crate::spec::Resources;

/// The controllers the agent enables, in the order they are written.
const WANTED: [&str; 3] = ["cpu", "memory", "pids"];

/// The leaf the agent moves itself into when its own cgroup must hand out controllers.
pub(super) const AGENT_LEAF: &str = "corrald";

#[derive(Debug)]
pub struct V2Backend {
    caps: Capabilities,
    mount: PathBuf,
    parent: PathBuf,
    /// Controllers on in the parent's `cgroup.subtree_control`; every intermediate cgroup
    /// passes them on.
    enabled: Vec<&'static str>,
    fs: Arc<dyn CgroupDirs>,
    page_size: u64,
    /// The device program every instance cgroup gets (`None`: no device control here).
    devices: Option<super::devices::DeviceProgram>,
    /// The files `stats()` reads, held open per cgroup.
    stats: StatFiles<StatFile>,
    /// Where an instance with no CPU quota is scheduled.
    cpu_cgroup: CpuCgroup,
}

/// The files `stats()` reads, by what they hold.
#[derive(Debug, Clone, Copy)]
enum StatFile {
    CpuStat,
    MemoryCurrent,
    MemoryPeak,
    MemoryEvents,
    MemoryMax,
    MemoryPressure,
    PidsCurrent,
}

impl V2Backend {
    /// Uses the cgroup2 filesystem mounted at `mount` (normally `/sys/fs/cgroup`) with the
    /// parent `parent` (relative to the mount; empty for the root), creating it when missing
    /// and enabling cpu, memory and pids down to it and in it. Moves this process into
    /// `<cgroup>/corrald` when it sits in a cgroup that must enable controllers; fails when
    /// other processes sit there.
    pub fn new(mount: PathBuf, parent: PathBuf) -> Result<V2Backend, CgroupError> {
        let mut backend =
            V2Backend::with_dirs(mount, parent, Arc::new(Cgroupfs), std::process::id())?;
        backend.load_device_program();
        Ok(backend)
    }

    /// Loads the device program once; without it (no cgroup BPF in the kernel, no
    /// privilege), the device control is unavailable, with the reason.
    fn load_device_program(&mut self) {
        let caps = &mut self.caps;
        caps.unavailable.retain(|(c, _)| *c != Control::Devices);
        match super::devices::DeviceProgram::load() {
            Ok(p) => {
                self.devices = Some(p);
                caps.available.push(Control::Devices);
                caps.available.sort();
            }
            Err(e) => {
                caps.unavailable.push((
                    Control::Devices,
                    format!("loading a device BPF program: {e}"),
                ));
                caps.unavailable.sort();
            }
        }
    }

    pub(super) fn with_dirs(
        mount: PathBuf,
        parent_rel: PathBuf,
        fs: Arc<dyn CgroupDirs>,
        self_pid: u32,
    ) -> Result<V2Backend, CgroupError> {
        if parent_rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(CgroupError::Setup(format!(
                "cgroup parent {} must be a plain path relative to {}",
                parent_rel.display(),
                mount.display()
            )));
        }
        if !mount.is_dir() {
            return Err(CgroupError::Setup(format!(
                "{} does not exist",
                mount.display()
            )));
        }
        let parent = mount.join(&parent_rel);
        let p = parent.display().to_string();
        let self_pid = i32::try_from(self_pid)
            .map_err(|_| CgroupError::Setup(format!("pid {self_pid} is out of range")))?;

        // From the deepest cgroup that exists down to the parent: each one must enable the
        // controllers for the next.
        let mut chain = vec![mount.clone()];
        for part in parent_rel.components() {
            let next = chain[chain.len() - 1].join(part);
            chain.push(next);
        }
        let start = chain
            .iter()
            .position(|d| !d.is_dir())
            .map_or(chain.len() - 1, |missing| missing.saturating_sub(1));
        let mut failed: Vec<(&'static str, String)> = Vec::new();
        for dir in &chain[start..] {
            if !dir.is_dir() {
                fs.mkdir(dir).map_err(|source| CgroupError::Create {
                    path: p.clone(),
                    dir: dir.clone(),
                    source,
                })?;
            }
            enable_for_children(fs.as_ref(), &p, dir, *dir == mount, self_pid, &mut failed)?;
        }
        create_dirs(fs.as_ref(), &parent, Path::new("corral"), &mut Vec::new()).map_err(
            |(dir, source)| CgroupError::Create {
                path: p.clone(),
                dir,
                source,
            },
        )?;

        let delegated = words(&p, &parent.join("cgroup.controllers"))?;
        let corral = parent.join("corral");
        let mut available = Vec::new();
        let mut unavailable = Vec::new();
        let mut enabled = Vec::new();
        for (control, name, file) in [
            (Control::Cpu, "cpu", "cpu.max"),
            (Control::Memory, "memory", "memory.max"),
            (Control::Pids, "pids", "pids.max"),
        ] {
            let reason = if let Some((_, why)) = failed.iter().find(|(c, _)| *c == name) {
                Some(why.clone())
            } else if !delegated.iter().any(|d| d == name) {
                Some(format!("not delegated to {p}"))
            } else if !corral.join(file).exists() {
                Some(format!("{} does not exist", corral.join(file).display()))
            } else {
                None
            };
            match reason {
                None => {
                    available.push(control);
                    enabled.push(name);
                }
                Some(r) => unavailable.push((control, r)),
            }
        }
        if !enabled.contains(&"memory") {
            unavailable.push((
                Control::MemorySwap,
                "needs the memory controller".to_string(),
            ));
        } else if corral.join("memory.swap.max").exists() {
            available.push(Control::MemorySwap);
        } else {
            unavailable.push((
                Control::MemorySwap,
                "memory.swap.max does not exist: swap accounting is off".to_string(),
            ));
        }
        if corral.join("cpu.stat").exists() {
            available.push(Control::CpuAccounting);
        } else {
            unavailable.push((
                Control::CpuAccounting,
                format!("{} does not exist", corral.join("cpu.stat").display()),
            ));
        }
        unavailable.push((Control::Devices, "no device program loaded".to_string()));
        available.sort();
        unavailable.sort();
        Ok(V2Backend {
            caps: Capabilities {
                version: CgroupVersion::V2,
                parent: p,
                available,
                unavailable,
            },
            mount,
            parent,
            enabled,
            fs,
            page_size: fsutil::page_size(),
            devices: None,
            stats: StatFiles::new(),
            cpu_cgroup: CpuCgroup::PerInstance,
        })
    }

    /// Schedules instances with no CPU quota as `cpu` says (default: per instance).
    pub fn with_cpu_cgroup(mut self, cpu: CpuCgroup) -> V2Backend {
        self.cpu_cgroup = cpu;
        self
    }

    /// The directory of the service of instance `path` when instances are scheduled per
    /// service: the cgroup whose `cgroup.subtree_control` decides whether they have a cpu
    /// cgroup of their own.
    fn cpu_service_dir(&self, path: &CgroupPath) -> Option<PathBuf> {
        let [_, service, _] = path.components() else {
            return None;
        };
        (self.cpu_cgroup == CpuCgroup::PerService && self.enabled.contains(&"cpu"))
            .then(|| self.dir(&CgroupPath::service(service)))
    }

    /// Per service: turns the cpu controller off for the instances of the service at `dir`
    /// when it is on and none of them has a quota (`cpu.max` other than `max`), so that their
    /// processes are scheduled in the service's cgroup. Not fatal: each instance keeps a cpu
    /// cgroup of its own until the next try.
    fn settle_cpu(&self, p: &str, dir: &Path) {
        let file = dir.join("cgroup.subtree_control");
        let result = words(p, &file).and_then(|on| {
            if !on.iter().any(|c| c == "cpu") {
                return Ok(());
            }
            for child in subdirs(p, dir)? {
                let max = dir.join(&child).join("cpu.max");
                // A cgroup going away as it is read has no quota that matters.
                if read_trimmed(&max).is_ok_and(|t| !t.starts_with("max")) {
                    return Ok(());
                }
            }
            self.change_subtree(p, dir, "-cpu")
        });
        if let Err(e) = result {
            tracing::warn!(cgroup = %p, error = %e, "the service's instances keep a cpu cgroup each");
        }
    }

    /// Writes `change` to the `cgroup.subtree_control` of `dir`.
    fn change_subtree(&self, p: &str, dir: &Path, change: &str) -> Result<(), CgroupError> {
        let file = dir.join("cgroup.subtree_control");
        self.fs
            .subtree_control(&file, change)
            .map_err(|source| CgroupError::Write {
                path: p.to_string(),
                file,
                value: change.to_string(),
                source,
            })
    }

    /// The files of `path` that `stats()` reads, for the controls this host has.
    fn stat_files(&self, path: &CgroupPath) -> Vec<Wanted<StatFile>> {
        let dir = self.dir(path);
        let mut files = Vec::with_capacity(7);
        let mut want = |kind, name: &str, need| {
            files.push(Wanted {
                kind,
                file: dir.join(name),
                need,
            });
        };
        if self.caps.has(Control::CpuAccounting) {
            want(StatFile::CpuStat, "cpu.stat", Need::Required);
        }
        if self.caps.has(Control::Memory) {
            want(StatFile::MemoryCurrent, "memory.current", Need::Required);
            // memory.peak arrived in Linux 5.19: without it the peak is 0.
            want(StatFile::MemoryPeak, "memory.peak", Need::Optional);
            want(StatFile::MemoryEvents, "memory.events", Need::Required);
            want(StatFile::MemoryMax, "memory.max", Need::Required);
            // Absent without PSI (CONFIG_PSI off, cgroup.pressure 0), and unreadable
            // (EOPNOTSUPP) with psi=0 on the kernel command line.
            want(
                StatFile::MemoryPressure,
                "memory.pressure",
                Need::BestEffort,
            );
        }
        if self.caps.has(Control::Pids) {
            want(StatFile::PidsCurrent, "pids.current", Need::Required);
        }
        files
    }

    /// `cpu.max` of the cgroup at `leaf`: `quota` per `period_us` (`-1`: `max`), read back.
    fn write_cpu(
        &self,
        p: &str,
        leaf: &Path,
        quota: i64,
        period_us: u64,
    ) -> Result<(), CgroupError> {
        let value = if quota < 0 {
            format!("max {period_us}")
        } else {
            format!("{quota} {period_us}")
        };
        let c = CpuController::new(leaf.to_path_buf(), self.mount.clone(), true);
        seam::set_verified(
            p,
            &leaf.join("cpu.max"),
            &value,
            Expect::Same,
            self.page_size,
            || c.set_cfs_quota_and_period(Some(quota), Some(period_us)),
        )
    }

    fn dir(&self, path: &CgroupPath) -> PathBuf {
        self.parent.join(path.relative())
    }

    fn create_in(
        &self,
        p: &str,
        path: &CgroupPath,
        limits: &Resources,
        created: &mut Vec<PathBuf>,
    ) -> Result<(), CgroupError> {
        let limits = Limits::check(p, limits)?;
        let leaf = self.dir(path);
        if leaf.exists() {
            remove_all(self.fs.as_ref(), p, [leaf.clone()])?;
        }
        let parts = path.components();
        let service_dir = self.cpu_service_dir(path);
        let mut dir = self.parent.clone();
        for (i, part) in parts.iter().enumerate() {
            dir.push(part);
            if !dir.is_dir() {
                self.fs.mkdir(&dir).map_err(|source| CgroupError::Create {
                    path: p.to_string(),
                    dir: dir.clone(),
                    source,
                })?;
                created.push(dir.clone());
            }
            if i + 1 < parts.len() {
                // Per service, the service hands cpu to an instance only for its quota.
                let service = i + 2 == parts.len() && service_dir.is_some();
                self.enable_in(p, &dir, !service || limits.cpu_quota.is_some())?;
            }
        }
        if let Some(dir) = &service_dir
            && limits.cpu_quota.is_none()
        {
            self.settle_cpu(p, dir);
        }
        let ps = self.page_size;
        if let Some(quota) = limits.cpu_quota {
            self.write_cpu(p, &leaf, quota, CPU_PERIOD_US)?;
        }
        if let Some(bytes) = limits.memory {
            let m = MemController::new(leaf.clone(), self.mount.clone(), true);
            seam::set_verified(
                p,
                &leaf.join("memory.max"),
                &bytes.to_string(),
                Expect::Bytes(bytes.unsigned_abs()),
                ps,
                || m.set_limit(bytes),
            )?;
            // No swap beyond the limit: the memory limit bounds memory and swap together.
            let swap = leaf.join("memory.swap.max");
            if swap.exists() {
                seam::set_verified(p, &swap, "0", Expect::Same, ps, || m.set_memswap_limit(0))?;
            }
        }
        if let Some(n) = limits.pids {
            let c = PidController::new(leaf.clone(), self.mount.clone(), true);
            seam::set_verified(
                p,
                &leaf.join("pids.max"),
                &n.to_string(),
                Expect::Same,
                ps,
                || c.set_pid_max(MaxValue::Value(n)),
            )?;
        }
        Ok(())
    }

    /// Passes the agent's controllers on from the intermediate cgroup `dir` to its children;
    /// cpu only with `cpu` (and it is never turned off here).
    fn enable_in(&self, p: &str, dir: &Path, cpu: bool) -> Result<(), CgroupError> {
        let file = dir.join("cgroup.subtree_control");
        let on = words(p, &file)?;
        let missing: Vec<String> = self
            .enabled
            .iter()
            .filter(|c| cpu || **c != "cpu")
            .filter(|c| !on.iter().any(|o| o == *c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.change_subtree(p, dir, &missing.join(" "))
    }
}

/// The whitespace-separated words of a file such as `cgroup.controllers`.
fn words(p: &str, file: &Path) -> Result<Vec<String>, CgroupError> {
    Ok(read_trimmed(file)
        .map_err(|e| read_err(p, file, e))?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// At start: enables the wanted controllers that `dir` has in its `cgroup.subtree_control`.
/// A controller that cannot be enabled is recorded in `failed` with the reason (it is then
/// unavailable); a cgroup that holds other processes is an error.
fn enable_for_children(
    fs: &dyn CgroupDirs,
    p: &str,
    dir: &Path,
    is_root: bool,
    self_pid: i32,
    failed: &mut Vec<(&'static str, String)>,
) -> Result<(), CgroupError> {
    let offered = words(p, &dir.join("cgroup.controllers"))?;
    let file = dir.join("cgroup.subtree_control");
    let on = words(p, &file)?;
    let missing: Vec<&'static str> = WANTED
        .into_iter()
        .filter(|c| offered.iter().any(|o| o == c) && !on.iter().any(|o| o == c))
        .filter(|c| !failed.iter().any(|(f, _)| f == c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // The root cgroup is exempt from the rule.
    if !is_root {
        make_room(fs, p, dir, self_pid)?;
    }
    let all: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
    if fs.subtree_control(&file, &all.join(" ")).is_err() {
        // One write enables all or nothing: find out which controller refuses.
        for c in missing {
            if let Err(e) = fs.subtree_control(&file, &format!("+{c}")) {
                failed.push((c, format!("cannot enable it in {}: {e}", file.display())));
            }
        }
    }
    Ok(())
}

/// Empties `dir` of processes so that it may enable controllers: the agent itself moves into
/// `dir/corrald`; any other process is the operator's to move.
fn make_room(fs: &dyn CgroupDirs, p: &str, dir: &Path, self_pid: i32) -> Result<(), CgroupError> {
    let procs = read_procs(p, dir)?.unwrap_or_default();
    let others: Vec<String> = procs
        .iter()
        .filter(|pid| **pid != self_pid)
        .map(i32::to_string)
        .collect();
    if !others.is_empty() {
        return Err(CgroupError::Setup(format!(
            "cannot enable controllers in {}: it holds processes other than corrald ({}), and \
             cgroup v2 hands controllers to child cgroups only from a cgroup without processes; \
             run corrald in a cgroup of its own (systemd: Delegate=yes) or pass --cgroup-parent",
            dir.display(),
            others.join(" ")
        )));
    }
    if procs.contains(&self_pid) {
        let leaf = dir.join(AGENT_LEAF);
        if !leaf.is_dir() {
            fs.mkdir(&leaf).map_err(|source| CgroupError::Create {
                path: p.to_string(),
                dir: leaf.clone(),
                source,
            })?;
        }
        fsutil::write_control(p, leaf.join("cgroup.procs"), self_pid.to_string())?;
        tracing::info!(leaf = %leaf.display(), "moved corrald into a leaf cgroup so that its cgroup can enable controllers");
    }
    Ok(())
}

impl CgroupBackend for V2Backend {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create(&self, path: &CgroupPath, limits: &Resources) -> Result<(), CgroupError> {
        // A cgroup made anew is read through new descriptors.
        self.stats.forget(path);
        let p = path.to_string();
        if let Some(reason) = self.caps.refuse(limits) {
            return Err(CgroupError::Unsupported { path: p, reason });
        }
        let mut created = Vec::new();
        let result = self.create_in(&p, path, limits, &mut created);
        if result.is_err() {
            remove_created(self.fs.as_ref(), &created);
        }
        result
    }

    fn set_cpu_limit(
        &self,
        path: &CgroupPath,
        cores: Option<f64>,
        period_us: u64,
    ) -> Result<(), CgroupError> {
        let p = path.to_string();
        if !self.caps.has(Control::Cpu) {
            return Err(CgroupError::Unsupported {
                path: p,
                reason: "the cpu controller is not available".into(),
            });
        }
        let quota = fsutil::quota_or_unlimited(&p, cores, period_us)?;
        let leaf = self.dir(path);
        let service = self.cpu_service_dir(path);
        if let Some(dir) = &service {
            if quota >= 0 {
                self.enable_in(&p, dir, true)?;
            } else if !leaf.join("cpu.max").exists() && leaf.is_dir() {
                // Scheduled in its service: there is no quota to lift.
                return Ok(());
            }
        }
        self.write_cpu(&p, &leaf, quota, period_us)?;
        if let Some(dir) = &service
            && quota < 0
        {
            self.settle_cpu(&p, dir);
        }
        Ok(())
    }

    fn set_cpu_weight(&self, path: &CgroupPath, processes: u64) -> Result<(), CgroupError> {
        let p = path.to_string();
        if !self.caps.has(Control::Cpu) {
            return Err(CgroupError::Unsupported {
                path: p,
                reason: "the cpu controller is not available".into(),
            });
        }
        let file = self.dir(path).join("cpu.weight");
        fsutil::write_control(&p, file, super::v2_weight(processes).to_string())
    }

    fn open_procs(&self, path: &CgroupPath) -> Result<Vec<OwnedFd>, CgroupError> {
        let file = self.dir(path).join("cgroup.procs");
        // std opens with O_CLOEXEC.
        let fd = OpenOptions::new()
            .write(true)
            .open(&file)
            .map(OwnedFd::from)
            .map_err(|source| CgroupError::Open {
                path: path.to_string(),
                file,
                source,
            })?;
        Ok(vec![fd])
    }

    fn tree_dir(&self) -> Option<PathBuf> {
        Some(self.dir(&CgroupPath::root()))
    }

    fn open_dir(&self, path: &CgroupPath) -> Result<Option<OwnedFd>, CgroupError> {
        let dir = self.dir(path);
        nix::fcntl::open(
            &dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map(Some)
        .map_err(|e| CgroupError::Open {
            path: path.to_string(),
            file: dir,
            source: e.into(),
        })
    }

    fn restrict_devices(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        let p = path.to_string();
        let Some(program) = &self.devices else {
            return Err(CgroupError::Unsupported {
                path: p,
                reason: "no device BPF program could be loaded".into(),
            });
        };
        let dir = self.dir(path);
        let fd = nix::fcntl::open(
            &dir,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| CgroupError::Open {
            path: p.clone(),
            file: dir.clone(),
            source: e.into(),
        })?;
        program.attach(&fd).map_err(|source| CgroupError::Write {
            path: p,
            file: dir,
            value: "a device BPF program".into(),
            source,
        })
    }

    fn procs(&self, path: &CgroupPath) -> Result<Vec<i32>, CgroupError> {
        let mut pids = read_procs(&path.to_string(), &self.dir(path))?.unwrap_or_default();
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn kill_all(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        let p = path.to_string();
        let file = self.dir(path).join("cgroup.kill");
        if !file.exists() {
            return sigkill_all(&p, &self.procs(path)?);
        }
        match write_value(&file, "1") {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CgroupError::Write {
                path: p,
                file,
                value: "1".to_string(),
                source,
            }),
        }
    }

    fn stats(&self, path: &CgroupPath) -> Result<CgroupStats, CgroupError> {
        let mut stats = CgroupStats::default();
        self.stats.read(
            path,
            || self.stat_files(path),
            |kind, file, text| {
                let p = || path.to_string();
                let Some(text) = text else {
                    // An optional file this kernel does not have: its value stays unknown.
                    return Ok(());
                };
                let one = || parsed(&p(), file, fsutil::parse_u64(text));
                match kind {
                    StatFile::CpuStat => {
                        // One read for the usage and, where the CPU controller is on, the
                        // throttling.
                        stats.cpu_usage_ns =
                            parsed(&p(), file, keyed_u64(text, "usage_usec"))?.saturating_mul(1000);
                        stats.cpu_throttled_periods =
                            parsed(&p(), file, keyed_u64_or_zero(text, "nr_throttled"))?;
                        stats.cpu_throttled_ns =
                            parsed(&p(), file, keyed_u64_or_zero(text, "throttled_usec"))?
                                .saturating_mul(1000);
                    }
                    StatFile::MemoryCurrent => stats.memory_bytes = one()?,
                    StatFile::MemoryPeak => stats.memory_peak_bytes = one()?,
                    StatFile::MemoryEvents => {
                        stats.oom_kills = parsed(&p(), file, keyed_u64(text, "oom_kill"))?;
                    }
                    StatFile::MemoryMax => {
                        stats.memory_limit_bytes = match text.trim() {
                            "max" => None,
                            n => Some(parsed(&p(), file, fsutil::parse_u64(n))?),
                        };
                    }
                    StatFile::PidsCurrent => stats.pids = one()?,
                    StatFile::MemoryPressure => {
                        stats.memory_pressure = super::Pressure::parse(text);
                    }
                }
                Ok(())
            },
        )?;
        Ok(stats)
    }

    fn oom_kills(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        if !self.caps.has(Control::Memory) {
            return Ok(0);
        }
        if self.stats.is_held(path) {
            return self.stats(path).map(|s| s.oom_kills);
        }
        let file = self.dir(path).join("memory.events");
        fsutil::read_keyed_u64(&path.to_string(), &file, "oom_kill")
    }

    fn remove(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        self.stats.forget(path);
        remove_all(self.fs.as_ref(), &path.to_string(), [self.dir(path)])
    }

    fn children(&self, path: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        subdirs(&path.to_string(), &self.dir(path))
    }

    fn display_path(&self, path: &CgroupPath) -> String {
        self.dir(path).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::process::ExitStatusExt;

    use super::*;
    use crate::cgroups::fake::{FakeKernel, Quirk};
    use crate::cgroups::testkit::{self, Cleanup};

    const MIB: u64 = 1 << 20;
    /// The agent's pid as the fake kernel knows it (never signalled).
    const SELF: u32 = 4242;
    const ALL: &[&str] = &["cpuset", "cpu", "io", "memory", "hugetlb", "pids"];

    fn limits(cpu: Option<f64>, memory: Option<u64>, pids: Option<u64>) -> Resources {
        Resources {
            cpu,
            memory,
            pids,
            ..Resources::default()
        }
    }

    fn web0() -> CgroupPath {
        CgroupPath::instance("web", "web-0")
    }

    fn root(tmp: &tempfile::TempDir) -> PathBuf {
        tmp.path().join("cgroup")
    }

    /// A fake v2 host offering `controllers` at its root, and a backend with `parent`.
    fn fake_backend(
        tmp: &tempfile::TempDir,
        controllers: &[&str],
        parent: &str,
    ) -> (Arc<FakeKernel>, Result<V2Backend, CgroupError>) {
        FakeKernel::plant_v2_root(&root(tmp), controllers);
        let fake = FakeKernel::v2(true);
        let b = V2Backend::with_dirs(root(tmp), parent.into(), fake.clone(), SELF);
        (fake, b)
    }

    fn read(dir: &Path, file: &str) -> String {
        testkit::read(&dir.join(file))
    }

    #[test]
    fn fake_setup_enables_controllers_down_to_the_parent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent/x");
        let b = b.expect("backend");
        let r = root(&tmp);
        for dir in [r.clone(), r.join("agent"), r.join("agent/x")] {
            assert_eq!(
                read(&dir, "cgroup.subtree_control"),
                "cpu memory pids",
                "{}",
                dir.display()
            );
        }
        assert_eq!(
            read(&r.join("agent/x"), "cgroup.controllers"),
            "cpu memory pids"
        );
        let caps = b.capabilities();
        assert_eq!(caps.version, CgroupVersion::V2);
        assert_eq!(caps.parent, r.join("agent/x").display().to_string());
        assert_eq!(
            caps.available,
            vec![
                Control::Cpu,
                Control::Memory,
                Control::MemorySwap,
                Control::Pids,
                Control::CpuAccounting
            ]
        );
        assert_eq!(
            caps.unavailable,
            vec![(Control::Devices, "no device program loaded".to_string())]
        );
        assert!(r.join("agent/x/corral").is_dir());
    }

    #[test]
    fn fake_cpu_limit_changes_on_a_live_cgroup_and_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        b.create(&web0(), &limits(None, None, None))
            .expect("create");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        b.set_cpu_limit(&web0(), Some(0.3), 10_000).expect("cap");
        assert_eq!(read(&leaf, "cpu.max"), "3000 10000");
        b.set_cpu_limit(&web0(), None, 100_000).expect("none");
        assert_eq!(read(&leaf, "cpu.max"), "max 100000");
        b.set_cpu_limit(&web0(), Some(0.5), 100_000).expect("limit");
        assert_eq!(read(&leaf, "cpu.max"), "50000 100000");
    }

    #[test]
    fn fake_per_service_the_service_keeps_cpu_until_an_instance_has_a_quota() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend").with_cpu_cgroup(CpuCgroup::PerService);
        let p = root(&tmp).join("agent");
        let svc = p.join("corral/web");
        let inst = |i: &str| CgroupPath::instance("web", i);
        let on = || read(&svc, "cgroup.subtree_control");
        b.create(&web0(), &limits(None, Some(64 * MIB), Some(32)))
            .expect("create");
        // corral/ hands cpu to the service; the service keeps it from its instances.
        assert_eq!(
            read(&p.join("corral"), "cgroup.subtree_control"),
            "cpu memory pids"
        );
        assert_eq!(on(), "memory pids");
        let leaf0 = svc.join("web-0");
        assert!(!leaf0.join("cpu.max").exists());
        assert_eq!(read(&leaf0, "memory.max"), "67108864");
        assert_eq!(read(&leaf0, "pids.max"), "32");
        // Its CPU time is still its own: cpu.stat is there without the controller.
        assert_eq!(b.stats(&web0()).expect("stats").cpu_usage_ns, 0);
        // Lifting a quota it does not have changes nothing.
        b.set_cpu_limit(&web0(), None, CPU_PERIOD_US)
            .expect("nothing to lift");
        assert_eq!(on(), "memory pids");

        // An instance with resources.cpu turns cpu on for the service's instances.
        b.create(&inst("web-1"), &limits(Some(0.5), None, None))
            .expect("create");
        assert_eq!(on(), "memory pids cpu");
        assert_eq!(read(&svc.join("web-1"), "cpu.max"), "50000 100000");
        assert_eq!(read(&leaf0, "cpu.max"), "max 100000");
        // One without a quota, meanwhile, does not turn it off.
        b.create(&inst("web-2"), &Resources::default())
            .expect("create");
        assert_eq!(on(), "memory pids cpu");
        // A start cap, set before the start, is a quota too.
        b.create(&inst("web-3"), &Resources::default())
            .expect("create");
        b.set_cpu_limit(&inst("web-3"), Some(0.3), 10_000)
            .expect("cap");
        assert_eq!(read(&svc.join("web-3"), "cpu.max"), "3000 10000");
        // The cap lifted, web-1 still has its limit: cpu stays on.
        b.set_cpu_limit(&inst("web-3"), None, CPU_PERIOD_US)
            .expect("lift");
        assert_eq!(on(), "memory pids cpu");
        // web-1 gone, the last quota is web-3's, lifted again: cpu goes off.
        b.remove(&inst("web-1")).expect("remove");
        b.set_cpu_limit(&inst("web-3"), Some(0.3), 10_000)
            .expect("cap");
        b.set_cpu_limit(&inst("web-3"), None, CPU_PERIOD_US)
            .expect("lift");
        assert_eq!(on(), "memory pids");
        assert!(!svc.join("web-3").join("cpu.max").exists());
        // A service cgroup left with cpu on (an agent stopped during a capped start) is set
        // right by the next instance created without a quota.
        b.set_cpu_limit(&inst("web-3"), Some(0.3), 10_000)
            .expect("cap");
        b.set_cpu_limit(&inst("web-3"), Some(0.2), 10_000)
            .expect("cap");
        b.remove(&inst("web-3")).expect("remove");
        assert_eq!(on(), "memory pids cpu");
        b.create(&inst("web-4"), &Resources::default())
            .expect("create");
        assert_eq!(on(), "memory pids");

        // Per instance (the backend's own default), every instance has its own.
        let tmp2 = tempfile::tempdir().expect("tempdir");
        let (_fake, per) = fake_backend(&tmp2, ALL, "agent");
        let per = per.expect("backend");
        per.create(&web0(), &Resources::default()).expect("create");
        let svc2 = root(&tmp2).join("agent/corral/web");
        assert_eq!(read(&svc2, "cgroup.subtree_control"), "cpu memory pids");
        assert_eq!(read(&svc2.join("web-0"), "cpu.max"), "max 100000");
    }

    #[test]
    fn fake_create_writes_limits_and_enables_intermediates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        b.create(&web0(), &limits(Some(0.25), Some(64 * MIB), Some(32)))
            .expect("create");
        let p = root(&tmp).join("agent");
        let leaf = p.join("corral/web/web-0");
        assert_eq!(read(&leaf, "cpu.max"), "25000 100000");
        assert_eq!(read(&leaf, "memory.max"), "67108864");
        assert_eq!(read(&leaf, "memory.swap.max"), "0");
        assert_eq!(read(&leaf, "pids.max"), "32");
        assert_eq!(
            read(&p.join("corral"), "cgroup.subtree_control"),
            "cpu memory pids"
        );
        assert_eq!(
            read(&p.join("corral/web"), "cgroup.subtree_control"),
            "cpu memory pids"
        );
        assert_eq!(
            read(&leaf, "cgroup.subtree_control"),
            "",
            "a leaf enables nothing"
        );
        assert_eq!(b.display_path(&web0()), leaf.display().to_string());

        // A second instance: the intermediates are already enabled and stay as they are.
        b.create(
            &CgroupPath::instance("web", "web-1"),
            &limits(None, None, None),
        )
        .expect("create");
        assert_eq!(read(&p.join("corral/web/web-1"), "cpu.max"), "max 100000");
        assert_eq!(read(&p.join("corral/web/web-1"), "memory.swap.max"), "max");
        assert_eq!(
            b.children(&CgroupPath::service("web")).expect("children"),
            vec!["web-0", "web-1"]
        );
    }

    #[test]
    fn fake_controller_not_delegated() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, &["cpu", "pids"], "svc");
        let b = b.expect("backend");
        let p = root(&tmp).join("svc");
        assert_eq!(read(&root(&tmp), "cgroup.subtree_control"), "cpu pids");
        let caps = b.capabilities();
        assert_eq!(
            caps.unavailable,
            vec![
                (Control::Memory, format!("not delegated to {}", p.display())),
                (
                    Control::MemorySwap,
                    "needs the memory controller".to_string()
                ),
                (Control::Devices, "no device program loaded".to_string()),
            ]
        );
        let err = b
            .create(&web0(), &limits(Some(0.5), Some(64 * MIB), None))
            .expect_err("no memory");
        assert!(
            matches!(&err, CgroupError::Unsupported { reason, .. }
                if reason.contains("resources.memory") && reason.contains("not delegated")),
            "{err}"
        );
        assert!(!p.join("corral/web").exists(), "refused before mkdir");
        b.create(&web0(), &limits(Some(0.5), None, Some(10)))
            .expect("cpu and pids work");
        assert_eq!(
            read(&p.join("corral"), "cgroup.subtree_control"),
            "cpu pids"
        );
        // memory stats are not guessed: the control is unavailable, the fields stay 0
        let stats = b.stats(&web0()).expect("stats");
        assert_eq!((stats.memory_bytes, stats.oom_kills), (0, 0));
    }

    /// A fake `svc` cgroup below the root, holding `procs`, as the agent's own cgroup.
    fn own_cgroup(tmp: &tempfile::TempDir, fake: &FakeKernel, procs: &str) -> PathBuf {
        let r = root(tmp);
        fs::write(r.join("cgroup.subtree_control"), "cpu memory pids").expect("root");
        let svc = r.join("svc");
        fake.mkdir(&svc).expect("svc");
        fs::write(svc.join("cgroup.procs"), procs).expect("procs");
        svc
    }

    #[test]
    fn fake_agent_moves_itself_into_a_leaf() {
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        let fake = FakeKernel::v2(true);
        let svc = own_cgroup(&tmp, &fake, &format!("{SELF}\n"));
        let b =
            V2Backend::with_dirs(root(&tmp), "svc".into(), fake.clone(), SELF).expect("backend");
        assert_eq!(
            read(&svc.join(AGENT_LEAF), "cgroup.procs"),
            SELF.to_string()
        );
        assert_eq!(read(&svc, "cgroup.subtree_control"), "cpu memory pids");
        assert!(b.capabilities().has(Control::Memory));
        // corrald/ is beside corral/, not inside the managed tree
        assert_eq!(
            subdirs("", &svc).expect("subdirs"),
            vec!["corral", "corrald"]
        );
    }

    #[test]
    fn fake_relative_parent_below_own_cgroup() {
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        let fake = FakeKernel::v2(true);
        let svc = own_cgroup(&tmp, &fake, &format!("{SELF}\n"));
        let b = V2Backend::with_dirs(root(&tmp), "svc/e2e/x".into(), fake.clone(), SELF)
            .expect("backend");
        assert_eq!(
            read(&svc.join(AGENT_LEAF), "cgroup.procs"),
            SELF.to_string()
        );
        for dir in [svc.clone(), svc.join("e2e"), svc.join("e2e/x")] {
            assert_eq!(read(&dir, "cgroup.subtree_control"), "cpu memory pids");
        }
        assert!(b.capabilities().has(Control::Pids));
    }

    #[test]
    fn fake_other_processes_in_the_parent_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        let fake = FakeKernel::v2(true);
        let svc = own_cgroup(&tmp, &fake, &format!("{SELF}\n777\n"));
        let err = V2Backend::with_dirs(root(&tmp), "svc".into(), fake.clone(), SELF)
            .expect_err("a stranger in the parent");
        let msg = err.to_string();
        for want in [
            "777",
            "Delegate=yes",
            "--cgroup-parent",
            "without processes",
        ] {
            assert!(msg.contains(want), "{want:?} missing in: {msg}");
        }
        assert!(!svc.join(AGENT_LEAF).exists(), "nothing moved");
        assert_eq!(read(&svc, "cgroup.subtree_control"), "");
    }

    #[test]
    fn fake_enabling_refused_makes_controls_unavailable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        let fake = FakeKernel::v2(true);
        fake.quirk("cgroup.subtree_control", Quirk::ReadOnly);
        let b =
            V2Backend::with_dirs(root(&tmp), "agent".into(), fake.clone(), SELF).expect("backend");
        let caps = b.capabilities();
        for c in [Control::Cpu, Control::Memory, Control::Pids] {
            assert!(
                caps.unavailable.iter().any(|(u, r)| *u == c
                    && r.contains("cannot enable it in")
                    && r.contains("agent/cgroup.subtree_control")),
                "{c:?}: {caps:?}"
            );
        }
        let err = b
            .create(&web0(), &limits(Some(1.0), None, None))
            .expect_err("cpu unavailable");
        assert!(matches!(err, CgroupError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn fake_intermediate_enable_error_undoes_create() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        fake.quirk("cgroup.subtree_control", Quirk::ReadOnly);
        let err = b
            .create(&web0(), &limits(None, Some(64 * MIB), None))
            .expect_err("corral/web cannot enable");
        // corral/ came from setup (no quirk), corral/web from this create (quirk).
        match &err {
            CgroupError::Write { file, value, .. } => {
                assert!(
                    file.ends_with("corral/web/cgroup.subtree_control"),
                    "{file:?}"
                );
                assert_eq!(value, "+cpu +memory +pids");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(!root(&tmp).join("agent/corral/web").exists());
    }

    #[test]
    fn fake_write_that_does_not_take_is_not_applied() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        fake.quirk("memory.max", Quirk::IgnoresWrites);
        let err = b
            .create(&web0(), &limits(Some(0.5), Some(64 * MIB), Some(8)))
            .expect_err("memory.max ignores writes");
        assert!(
            matches!(&err, CgroupError::NotApplied { wanted, found, .. } if wanted == "67108864" && found.is_empty()),
            "{err}"
        );
        assert!(!root(&tmp).join("agent/corral/web").exists());
    }

    #[test]
    fn fake_without_swap_accounting() {
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        let fake = FakeKernel::v2(true);
        fake.quirk("memory.swap.max", Quirk::Missing);
        let b =
            V2Backend::with_dirs(root(&tmp), "agent".into(), fake.clone(), SELF).expect("backend");
        assert!(
            b.capabilities()
                .unavailable
                .iter()
                .any(|(c, r)| *c == Control::MemorySwap && r.contains("swap accounting is off"))
        );
        b.create(&web0(), &limits(None, Some(64 * MIB), None))
            .expect("memory alone");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        assert_eq!(read(&leaf, "memory.max"), "67108864");
        assert!(!leaf.join("memory.swap.max").exists());
    }

    #[test]
    fn fake_kill_with_and_without_cgroup_kill() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        b.create(&web0(), &Resources::default()).expect("create");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        b.kill_all(&web0()).expect("kill");
        assert_eq!(read(&leaf, "cgroup.kill"), "1");
        b.kill_all(&CgroupPath::instance("web", "gone"))
            .expect("missing is fine");

        // A kernel before 5.14: a SIGKILL pass over cgroup.procs (here: our own child).
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        let b = V2Backend::with_dirs(root(&tmp), "agent".into(), FakeKernel::v2(false), SELF)
            .expect("backend");
        b.create(&web0(), &Resources::default()).expect("create");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        assert!(!leaf.join("cgroup.kill").exists());
        let mut cleanup = Cleanup::default();
        let pid = cleanup.adopt(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn"),
        );
        fs::write(leaf.join("cgroup.procs"), format!("{pid}\n")).expect("plant");
        assert_eq!(b.procs(&web0()).expect("procs"), vec![pid]);
        b.kill_all(&web0()).expect("kill");
        assert_eq!(cleanup.reap(pid).signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn oom_kills_read_memory_events_alone_until_the_others_are_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        b.create(&web0(), &Resources::default()).expect("create");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        fs::write(leaf.join("memory.events"), "oom 2\noom_kill 2\n").expect("plant");
        for f in ["memory.current", "memory.max", "cpu.stat", "pids.current"] {
            let _ = fs::remove_file(leaf.join(f));
        }
        assert_eq!(b.oom_kills(&web0()).expect("oom kills"), 2);
        assert!(!b.stats.is_held(&web0()), "nothing kept open");
    }

    #[test]
    fn fake_stats_read_the_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        b.create(&web0(), &Resources::default()).expect("create");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        let put = |f: &str, v: &str| fs::write(leaf.join(f), v).expect("plant");
        put(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\nnr_throttled 4\nthrottled_usec 2500\n",
        );
        put("memory.max", "67108864\n");
        put("memory.current", "4096000\n");
        put("memory.peak", "8192000\n");
        put(
            "memory.events",
            "low 0\nhigh 0\nmax 9\noom 3\noom_kill 3\noom_group_kill 0\n",
        );
        put("pids.current", "2\n");
        // With PSI on, every cgroup has it; nothing yet.
        put("memory.pressure", "");
        assert_eq!(
            b.stats(&web0()).expect("stats"),
            CgroupStats {
                cpu_usage_ns: 1_500_000,
                memory_bytes: 4_096_000,
                memory_peak_bytes: 8_192_000,
                oom_kills: 3,
                pids: 2,
                cpu_throttled_periods: 4,
                cpu_throttled_ns: 2_500_000,
                memory_limit_bytes: Some(64 << 20),
                memory_pressure: None,
            }
        );
        put("memory.max", "max\n");
        assert_eq!(b.stats(&web0()).expect("stats").memory_limit_bytes, None);
        // cpu.stat without the CPU controller has no throttling lines
        put("cpu.stat", "usage_usec 1500\n");
        let s = b.stats(&web0()).expect("stats");
        assert_eq!((s.cpu_throttled_periods, s.cpu_throttled_ns), (0, 0));
        put("memory.max", "lots\n");
        let err = b.stats(&web0()).expect_err("bad memory.max");
        assert!(err.to_string().contains("memory.max"), "{err}");
        put("memory.max", "max\n");
        put(
            "memory.pressure",
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=678\n",
        );
        let p = b
            .stats(&web0())
            .expect("stats")
            .memory_pressure
            .expect("pressure");
        assert_eq!(
            (
                p.some_avg10,
                p.some_avg60,
                p.some_total_usec,
                p.full_avg10,
                p.full_total_usec
            ),
            (1.5, 0.25, 12345, 0.5, 678)
        );
        put("memory.pressure", "garbage\n");
        assert_eq!(b.stats(&web0()).expect("stats").memory_pressure, None);
        // memory.peak arrived in Linux 5.19: without it the peak is 0 (a kernel has the file
        // in every cgroup or in none, so a cgroup made without it is read)
        let web1 = CgroupPath::instance("web", "web-1");
        b.create(&web1, &Resources::default()).expect("create");
        let leaf1 = root(&tmp).join("agent/corral/web/web-1");
        fs::remove_file(leaf1.join("memory.peak")).expect("unplant");
        fs::write(leaf1.join("memory.current"), "4096\n").expect("plant");
        let s = b.stats(&web1).expect("stats");
        assert_eq!((s.memory_bytes, s.memory_peak_bytes), (4096, 0));
        put("memory.events", "oom 1\n");
        let err = b.stats(&web0()).expect_err("no oom_kill line");
        assert!(err.to_string().contains("oom_kill"), "{err}");
        // Each cgroup's files are held open until it is removed (web-1 has no memory.peak
        // and no memory.pressure).
        assert_eq!(b.stats.held_fds(), 7 + 5);
        b.remove(&web0()).expect("remove");
        assert_eq!(b.stats.held_fds(), 5);
        b.remove(&CgroupPath::instance("web", "web-1"))
            .expect("remove");
        assert_eq!(b.stats.held_fds(), 0);
    }

    #[test]
    fn fake_remove_and_open_procs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(&tmp, ALL, "agent");
        let b = b.expect("backend");
        b.create(&web0(), &Resources::default()).expect("create");
        let leaf = root(&tmp).join("agent/corral/web/web-0");
        let fds = b.open_procs(&web0()).expect("open");
        assert_eq!(fds.len(), 1);
        for fd in fds {
            io::Write::write_all(&mut fs::File::from(fd), b"0").expect("write");
        }
        assert_eq!(read(&leaf, "cgroup.procs"), "0");
        let err = b.remove(&web0()).expect_err("busy");
        assert!(err.is_busy(), "{err}");
        let err = b
            .remove(&CgroupPath::service("web"))
            .expect_err("has children");
        assert!(err.is_busy(), "{err}");
        fs::write(leaf.join("cgroup.procs"), "").expect("empty");
        b.remove(&web0()).expect("remove");
        b.remove(&web0()).expect("again");
        b.remove(&CgroupPath::service("web")).expect("service");
        assert!(!root(&tmp).join("agent/corral/web").exists());
    }

    #[test]
    fn fake_bad_parent_paths() {
        let tmp = tempfile::tempdir().expect("tempdir");
        FakeKernel::plant_v2_root(&root(&tmp), ALL);
        for parent in ["../x", "/abs", "a/../b"] {
            let err = V2Backend::with_dirs(root(&tmp), parent.into(), FakeKernel::v2(true), SELF)
                .expect_err(parent);
            assert!(matches!(err, CgroupError::Setup(_)), "{parent}: {err}");
        }
    }

    // ---- real kernel ----------------------------------------------------------------------

    /// Why the real-kernel v2 tests do not run here, if they do not. They need root and a pure
    /// v2 host, and they are opt-in (`V2VM=1`, as in the throwaway VM of
    /// `run-in-v2vm.sh`, or `CORRAL_TEST_CGROUP_V2=1`): like the agent, they may move the test
    /// process into a `corrald` leaf and enable controllers in its own cgroup.
    fn kernel_v2_skip() -> Option<String> {
        let opted_in = ["V2VM", "CORRAL_TEST_CGROUP_V2"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|x| x == "1"));
        if !opted_in {
            return Some("opt in with CORRAL_TEST_CGROUP_V2=1".into());
        }
        if !testkit::is_root() {
            return Some("not root".into());
        }
        match nix::sys::statfs::statfs("/sys/fs/cgroup") {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => None,
            Ok(_) => Some("the host does not run cgroup v2".into()),
            Err(e) => Some(format!("statfs /sys/fs/cgroup: {e}")),
        }
    }

    fn kernel_backend(test: &str) -> (Arc<dyn CgroupBackend>, PathBuf, Cleanup) {
        let flag = testkit::unique_parent(test);
        let parent = match crate::cgroups::detect::plan_host(Some(&flag)).expect("plan") {
            crate::cgroups::detect::Plan::V2 { mount, parent } => mount.join(parent),
            other => panic!("expected v2, got {other:?}"),
        };
        assert!(!parent.exists(), "{} exists already", parent.display());
        let cleanup = Cleanup::new(vec![parent.clone()]);
        let backend = crate::cgroups::detect(Some(&flag)).expect("detect");
        (backend, parent, cleanup)
    }

    #[test]
    fn kernel_v2_instance_lifecycle() {
        if let Some(why) = kernel_v2_skip() {
            eprintln!("skipped: {why}");
            return;
        }
        let own = || {
            let text = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
            text.trim().trim_start_matches("0::").to_string()
        };
        let own_before = own();
        let (b, parent, mut cleanup) = kernel_backend("life");
        let own_after = own();
        eprintln!("own cgroup: {own_before} -> {own_after}");
        if own_before != "/" && !own_before.ends_with("/corrald") {
            // A cgroup with the agent in it had to enable controllers: the agent moved out.
            assert_eq!(own_after, format!("{own_before}/corrald"));
        } else {
            assert_eq!(own_after, own_before);
        }
        let caps = b.capabilities().clone();
        eprintln!("capabilities: {caps:?}");
        assert_eq!(caps.version, CgroupVersion::V2);
        for c in [
            Control::Cpu,
            Control::Memory,
            Control::Pids,
            Control::CpuAccounting,
        ] {
            assert!(caps.has(c), "{c:?}: {caps:?}");
        }
        let path = web0();
        b.create(&path, &limits(Some(0.25), Some(64 * MIB), Some(32)))
            .expect("create");
        let leaf = parent.join(path.relative());
        let cpu_max = read(&leaf, "cpu.max");
        let memory_max = read(&leaf, "memory.max");
        let pids_max = read(&leaf, "pids.max");
        eprintln!("read back: cpu.max={cpu_max} memory.max={memory_max} pids.max={pids_max}");
        assert_eq!(cpu_max, "25000 100000");
        assert_eq!(memory_max, "67108864");
        assert_eq!(pids_max, "32");
        if caps.has(Control::MemorySwap) {
            let swap = read(&leaf, "memory.swap.max");
            eprintln!("read back: memory.swap.max={swap}");
            assert_eq!(swap, "0");
        }
        for dir in [parent.join("corral"), parent.join("corral/web")] {
            let on = read(&dir, "cgroup.subtree_control");
            assert_eq!(on, "cpu memory pids", "{}", dir.display());
        }

        let moved = cleanup.adopt(testkit::spawn_and_move(b.open_procs(&path).expect("open")));
        let procs = b.open_procs(&path).expect("open");
        let inside = cleanup.adopt(testkit::spawn_inside(&procs, &["sleep", "30"]));
        drop(procs);
        let listed = b.procs(&path).expect("procs");
        eprintln!("procs: {listed:?} (moved {moved}, inside {inside})");
        assert!(
            listed.contains(&moved) && listed.contains(&inside),
            "{listed:?}"
        );
        testkit::wait_asleep(inside);
        let stats = b.stats(&path).expect("stats");
        eprintln!("stats: {stats:?}");
        assert!(stats.pids >= 2, "{stats:?}");
        assert!(stats.memory_bytes > 0, "{stats:?}");
        assert!(stats.cpu_usage_ns > 0, "{stats:?}");
        // The files stats() reads (memory.peak since Linux 5.19, memory.pressure with PSI)
        // stay open and are read again from offset 0, where the kernel writes their content
        // anew: a limit changed behind the agent is seen.
        let optional = [
            leaf.join("memory.peak").exists(),
            fs::read_to_string(leaf.join("memory.pressure")).is_ok(),
        ];
        let files = 5 + optional.iter().filter(|o| **o).count();
        assert_eq!(testkit::fds_in(&[&leaf]), files);
        fs::write(leaf.join("memory.max"), "33554432").expect("write limit");
        assert_eq!(
            b.stats(&path).expect("stats").memory_limit_bytes,
            Some(32 * MIB)
        );
        assert_eq!(testkit::fds_in(&[&leaf]), files, "no more opened");

        let busy = b.remove(&path).expect_err("tasks inside");
        assert!(busy.is_busy(), "{busy}");
        b.kill_all(&path).expect("kill");
        assert_eq!(cleanup.reap(moved).signal(), Some(libc::SIGKILL));
        assert_eq!(cleanup.reap(inside).signal(), Some(libc::SIGKILL));
        assert_eq!(b.procs(&path).expect("procs"), Vec::<i32>::new());
        assert_eq!(b.stats(&path).expect("stats").pids, 0);
        b.remove(&path).expect("remove");
        assert_eq!(testkit::fds_in(&[&leaf]), 0, "closed with the cgroup");
        // A cgroup removed behind the agent's back reads as an error, never as its last
        // values, and its files are not held.
        b.create(&path, &limits(None, None, None)).expect("create");
        b.stats(&path).expect("stats");
        assert_eq!(testkit::fds_in(&[&leaf]), files);
        fs::remove_dir(&leaf).expect("rmdir");
        let gone = b.stats(&path).expect_err("removed");
        eprintln!("removed behind the agent: {gone}");
        assert_eq!(testkit::fds_in(&[&leaf]), 0, "dropped when the read failed");
        b.remove(&CgroupPath::service("web"))
            .expect("remove service");
        b.remove(&CgroupPath::root()).expect("remove corral");
        assert_eq!(subdirs("", &parent).expect("parent"), Vec::<String>::new());
        drop(cleanup);
        assert!(!parent.exists(), "{} left behind", parent.display());
    }

    #[test]
    fn kernel_v2_oom_kill_is_counted() {
        if let Some(why) = kernel_v2_skip() {
            eprintln!("skipped: {why}");
            return;
        }
        let (b, _parent, mut cleanup) = kernel_backend("oom");
        let path = CgroupPath::instance("hog", "hog-0");
        b.create(&path, &limits(None, Some(32 * MIB), None))
            .expect("create");
        let procs = b.open_procs(&path).expect("open");
        let pid = cleanup.adopt(testkit::spawn_inside(&procs, testkit::MEMORY_HOG));
        drop(procs);
        let status = cleanup.reap(pid);
        let stats = b.stats(&path).expect("stats");
        eprintln!("memory hog: {status:?}, stats: {stats:?}");
        assert!(!status.success(), "the hog must not get its 256 MiB");
        assert!(stats.oom_kills >= 1, "{stats:?}");
        // the shell's children (head, tr) may outlive it
        b.kill_all(&path).expect("kill what is left");
        testkit::wait_until_empty(b.as_ref(), &path);
        for p in [path.clone(), CgroupPath::service("hog"), CgroupPath::root()] {
            b.remove(&p).expect("remove");
        }
        for dir in &cleanup.dirs {
            assert_eq!(subdirs("", dir).expect("parent"), Vec::<String>::new());
        }
    }
}
