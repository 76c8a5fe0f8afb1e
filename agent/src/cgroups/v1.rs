//! cgroup v1, as on hybrid hosts: every agent cgroup is one directory in each of the cpu,
//! cpuacct, memory and pids hierarchies (co-mounted ones, like `cpu,cpuacct`, share a
//! directory; a missing hierarchy makes its controls unavailable, with the reason). Limits are
//! written through cgroups-rs controllers built for the exact directory — never its hierarchy
//! lookup, which would place cgroups at the hierarchy root — and read back from the files.
//! v1 has no `cgroup.kill`: killing is a SIGKILL pass over the union of `cgroup.procs`.
//! The `devices` hierarchy, when mounted, holds every cgroup too, for the device control.
//! With [`CpuCgroup::PerService`] an instance with no CPU quota still has its directory in
//! the cpu hierarchy, empty: its processes join their service's there (and in `cpuacct` when
//! it is mounted with cpu; its CPU time is then summed from `/proc`). One that started under a
//! rollout's cap is moved there when the cap is lifted.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cgroups_rs::fs::MaxValue;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;

use super::fsutil::{
    self, CPU_PERIOD_US, CgroupDirs, Cgroupfs, Limits, UNLIMITED_BYTES, create_dirs, keyed_u64,
    keyed_u64_or_zero, parsed, read_err, read_procs, read_tasks, remove_all, remove_created,
    sigkill_all, subdirs, write_value,
};
use super::seam::{self, Expect};
use super::statfiles::{Need, StatFiles, Wanted};
use super::{
    Capabilities, CgroupBackend, CgroupError, CgroupPath, CgroupStats, CgroupVersion, Control,
    CpuCgroup,
};
use crate::spec::Resources;

/// How many times an instance whose quota is lifted reads and moves its threads into its
/// service's cpu cgroup before it gives up on those started meanwhile.
const JOIN_PASSES: usize = 16;

/// One v1 hierarchy the agent uses: where it is mounted, and the agent's parent cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    /// The mount point, e.g. `/sys/fs/cgroup/memory` or `/sys/fs/cgroup/cpu,cpuacct`.
    pub mount: PathBuf,
    /// The parent cgroup relative to the mount, e.g. `system.slice/corrald.service`; empty
    /// for the hierarchy's root. Created when missing.
    pub parent: PathBuf,
}

impl V1Hierarchy {
    pub fn new(mount: impl Into<PathBuf>, parent: impl Into<PathBuf>) -> V1Hierarchy {
        V1Hierarchy {
            mount: mount.into(),
            parent: parent.into(),
        }
    }
}

/// Where the agent's parent cgroup is in each hierarchy it uses; `None`: not mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V1Layout {
    pub cpu: Option<V1Hierarchy>,
    pub cpuacct: Option<V1Hierarchy>,
    pub memory: Option<V1Hierarchy>,
    pub pids: Option<V1Hierarchy>,
    pub devices: Option<V1Hierarchy>,
}

/// A hierarchy that is ready: its mount and the parent directory, which exists and takes
/// `corral/` beneath it.
#[derive(Debug, Clone)]
struct Ready {
    mount: PathBuf,
    parent: PathBuf,
}

#[derive(Debug)]
pub struct V1Backend {
    caps: Capabilities,
    cpu: Option<Ready>,
    cpuacct: Option<Ready>,
    memory: Option<Ready>,
    pids: Option<Ready>,
    devices: Option<Ready>,
    /// The distinct parent directories (co-mounted hierarchies once), memory first: the
    /// directories every cgroup has.
    parents: Vec<PathBuf>,
    fs: Arc<dyn CgroupDirs>,
    page_size: u64,
    /// The files `stats()` reads, held open per cgroup.
    stats: StatFiles<StatFile>,
    /// Where an instance with no CPU quota is scheduled.
    cpu_cgroup: CpuCgroup,
}

/// The files `stats()` reads, by what they hold.
#[derive(Debug, Clone, Copy)]
enum StatFile {
    CpuacctUsage,
    CpuStat,
    MemoryUsage,
    MemoryMaxUsage,
    OomControl,
    MemoryLimit,
    PidsCurrent,
}

impl V1Backend {
    /// Uses the hierarchies of `layout`, creating each parent (and `corral/` in it) when
    /// missing. A hierarchy whose parent cannot be created or written is left out, its
    /// controls unavailable with the reason; no usable hierarchy at all is an error.
    pub fn new(layout: V1Layout) -> Result<V1Backend, CgroupError> {
        V1Backend::with_dirs(layout, Arc::new(Cgroupfs))
    }

    pub(super) fn with_dirs(
        layout: V1Layout,
        fs: Arc<dyn CgroupDirs>,
    ) -> Result<V1Backend, CgroupError> {
        let mut prepared: Vec<(V1Hierarchy, Result<Ready, String>)> = Vec::new();
        let mut prepare = |name: &str, h: &Option<V1Hierarchy>| -> Result<Ready, String> {
            let h = h
                .as_ref()
                .ok_or_else(|| format!("the {name} hierarchy is not mounted"))?;
            if let Some((_, done)) = prepared.iter().find(|(p, _)| p == h) {
                return done.clone();
            }
            let done = prepare_parent(fs.as_ref(), h);
            prepared.push((h.clone(), done.clone()));
            done
        };
        let cpu = prepare("cpu", &layout.cpu);
        let cpuacct = prepare("cpuacct", &layout.cpuacct);
        let memory = prepare("memory", &layout.memory);
        let pids = prepare("pids", &layout.pids);
        let devices = prepare("devices", &layout.devices);

        let mut available = Vec::new();
        let mut unavailable: Vec<(Control, String)> = Vec::new();
        let memsw = match &memory {
            Ok(r) if !r.parent.join("corral/memory.memsw.limit_in_bytes").exists() => Err(
                "memory.memsw.limit_in_bytes does not exist: swap accounting is off \
                 (boot with swapaccount=1)"
                    .to_string(),
            ),
            other => other.clone(),
        };
        for (control, h, files) in [
            (
                Control::Cpu,
                &cpu,
                &["cpu.cfs_period_us", "cpu.cfs_quota_us"][..],
            ),
            (Control::CpuAccounting, &cpuacct, &["cpuacct.usage"][..]),
            (Control::Memory, &memory, &["memory.limit_in_bytes"][..]),
            (Control::MemorySwap, &memsw, &[][..]),
            (Control::Pids, &pids, &["pids.max"][..]),
            (
                Control::Devices,
                &devices,
                &["devices.allow", "devices.deny", "devices.list"][..],
            ),
        ] {
            match probe(h, files) {
                Ok(()) => available.push(control),
                Err(reason) => unavailable.push((control, reason)),
            }
        }
        available.sort();
        unavailable.sort();

        let mut described = Vec::new();
        for (name, h) in [
            ("memory", &layout.memory),
            ("cpu", &layout.cpu),
            ("cpuacct", &layout.cpuacct),
            ("pids", &layout.pids),
            ("devices", &layout.devices),
        ] {
            if let Some(h) = h {
                described.push(format!("{name}:/{}", h.parent.display()));
            }
        }

        let (cpu, cpuacct, memory, pids, devices) =
            (cpu.ok(), cpuacct.ok(), memory.ok(), pids.ok(), devices.ok());
        let mut parents: Vec<PathBuf> = Vec::new();
        for r in [&memory, &pids, &cpu, &cpuacct, &devices]
            .into_iter()
            .flatten()
        {
            if !parents.contains(&r.parent) {
                parents.push(r.parent.clone());
            }
        }
        if parents.is_empty() {
            let why: Vec<String> = prepared
                .iter()
                .filter_map(|(_, r)| r.as_ref().err().cloned())
                .collect();
            return Err(CgroupError::Setup(format!(
                "no usable cgroup v1 hierarchy among cpu, cpuacct, memory, pids{}",
                if why.is_empty() {
                    " (none is mounted)".to_string()
                } else {
                    format!(": {}", why.join("; "))
                }
            )));
        }
        Ok(V1Backend {
            caps: Capabilities {
                version: CgroupVersion::V1,
                parent: described.join(","),
                available,
                unavailable,
            },
            cpu,
            cpuacct,
            memory,
            pids,
            devices,
            parents,
            fs,
            page_size: fsutil::page_size(),
            stats: StatFiles::new(),
            cpu_cgroup: CpuCgroup::PerInstance,
        })
    }

    /// Schedules instances with no CPU quota as `cpu` says (default: per instance).
    pub fn with_cpu_cgroup(mut self, cpu: CpuCgroup) -> V1Backend {
        self.cpu_cgroup = cpu;
        self
    }

    /// The service cgroup whose cpu directory the processes of instance `path` join: with
    /// [`CpuCgroup::PerService`], when `path` is an instance whose own cpu cgroup has no
    /// quota (`cpu.cfs_quota_us` reads -1). Read from the kernel, not remembered, so that an
    /// agent that restarts, or a cap set before the instance starts, decides the same way.
    fn cpu_service(&self, path: &CgroupPath) -> Option<CgroupPath> {
        let service = self.per_service(path)?;
        let cpu = self.cpu.as_ref()?;
        let quota = cpu.parent.join(path.relative()).join("cpu.cfs_quota_us");
        let unlimited = std::fs::read_to_string(quota).is_ok_and(|t| t.trim() == "-1");
        unlimited.then_some(service)
    }

    /// The service of instance `path` when instances are scheduled per service, whatever its
    /// quota.
    fn per_service(&self, path: &CgroupPath) -> Option<CgroupPath> {
        match path.components() {
            [_, service, _] if self.cpu_cgroup == CpuCgroup::PerService => {
                Some(CgroupPath::service(service))
            }
            _ => None,
        }
    }

    /// Per service: moves the threads of instance `path`, whose quota was just lifted (a
    /// rollout's `start_cpu`), from its own cpu cgroup into its service's. Not fatal: what
    /// stays is scheduled in the instance's own cgroup, without a quota.
    fn join_service(&self, p: &str, path: &CgroupPath, service: &CgroupPath) {
        let Some(cpu) = &self.cpu else {
            return;
        };
        let own = cpu.parent.join(path.relative());
        let to = cpu.parent.join(service.relative()).join("tasks");
        match move_threads(p, &own, &to) {
            Ok(()) => tracing::debug!(cgroup = %p, "scheduled in its service's cpu cgroup"),
            Err(e) => {
                tracing::warn!(cgroup = %p, error = %e, "not all of the instance's threads joined its service's cpu cgroup")
            }
        }
    }

    /// Whether `cpuacct` is mounted with `cpu`: then an instance scheduled in its service's
    /// cgroup has no CPU counter of its own.
    fn cpuacct_with_cpu(&self) -> bool {
        matches!((&self.cpu, &self.cpuacct), (Some(a), Some(b)) if a.parent == b.parent)
    }

    /// The files of `path` that `stats()` reads, for the controls this host has.
    fn stat_files(&self, path: &CgroupPath) -> Vec<Wanted<StatFile>> {
        let rel = path.relative();
        let mut files = Vec::with_capacity(7);
        let mut want = |r: &Option<Ready>, control: Control, names: &[(StatFile, &str)]| {
            if let Some(r) = r.as_ref().filter(|_| self.caps.has(control)) {
                let dir = r.parent.join(&rel);
                for (kind, name) in names {
                    files.push(Wanted {
                        kind: *kind,
                        file: dir.join(name),
                        need: Need::Required,
                    });
                }
            }
        };
        want(
            &self.cpuacct,
            Control::CpuAccounting,
            &[(StatFile::CpuacctUsage, "cpuacct.usage")],
        );
        want(&self.cpu, Control::Cpu, &[(StatFile::CpuStat, "cpu.stat")]);
        want(
            &self.memory,
            Control::Memory,
            &[
                (StatFile::MemoryUsage, "memory.usage_in_bytes"),
                (StatFile::MemoryMaxUsage, "memory.max_usage_in_bytes"),
                (StatFile::OomControl, "memory.oom_control"),
                (StatFile::MemoryLimit, "memory.limit_in_bytes"),
            ],
        );
        want(
            &self.pids,
            Control::Pids,
            &[(StatFile::PidsCurrent, "pids.current")],
        );
        files
    }

    fn dirs(&self, path: &CgroupPath) -> impl Iterator<Item = PathBuf> + '_ {
        let rel = path.relative();
        self.parents.iter().map(move |p| p.join(&rel))
    }

    /// Replaces an empty leftover of `path` (so limits and counters start fresh), creates the
    /// directories and writes the limits. On failure, removes what it created.
    fn create_in(
        &self,
        p: &str,
        path: &CgroupPath,
        limits: &Resources,
        created: &mut Vec<PathBuf>,
    ) -> Result<(), CgroupError> {
        let limits = Limits::check(p, limits)?;
        remove_all(self.fs.as_ref(), p, self.dirs(path).filter(|d| d.exists()))?;
        let rel = path.relative();
        for parent in &self.parents {
            create_dirs(self.fs.as_ref(), parent, &rel, created).map_err(|(dir, source)| {
                CgroupError::Create {
                    path: p.to_string(),
                    dir,
                    source,
                }
            })?;
        }
        let ps = self.page_size;
        if let Some(quota) = limits.cpu_quota {
            self.write_cpu(p, path, quota, CPU_PERIOD_US)?;
        }
        if let Some(bytes) = limits.memory {
            let r = self.ready(p, &self.memory, Control::Memory)?;
            let dir = r.parent.join(&rel);
            let m = MemController::new(dir.clone(), r.mount.clone(), false);
            let value = bytes.to_string();
            let expect = Expect::Bytes(bytes.unsigned_abs());
            // The hard limit first: memsw may never be below it.
            seam::set_verified(
                p,
                &dir.join("memory.limit_in_bytes"),
                &value,
                expect,
                ps,
                || m.set_limit(bytes),
            )?;
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                seam::set_verified(p, &memsw, &value, expect, ps, || m.set_memswap_limit(bytes))?;
            }
        }
        if let Some(n) = limits.pids {
            let r = self.ready(p, &self.pids, Control::Pids)?;
            let dir = r.parent.join(&rel);
            let c = PidController::new(dir.clone(), r.mount.clone(), false);
            seam::set_verified(
                p,
                &dir.join("pids.max"),
                &n.to_string(),
                Expect::Same,
                ps,
                || c.set_pid_max(MaxValue::Value(n)),
            )?;
        }
        Ok(())
    }

    /// The cgroup's CFS period, then its quota in it (`-1`: none), each read back.
    fn write_cpu(
        &self,
        p: &str,
        path: &CgroupPath,
        quota: i64,
        period_us: u64,
    ) -> Result<(), CgroupError> {
        let r = self.ready(p, &self.cpu, Control::Cpu)?;
        let dir = r.parent.join(path.relative());
        let c = CpuController::new(dir.clone(), r.mount.clone(), false);
        let ps = self.page_size;
        seam::set_verified(
            p,
            &dir.join("cpu.cfs_period_us"),
            &period_us.to_string(),
            Expect::Same,
            ps,
            || c.set_cfs_period(period_us),
        )?;
        seam::set_verified(
            p,
            &dir.join("cpu.cfs_quota_us"),
            &quota.to_string(),
            Expect::Same,
            ps,
            || c.set_cfs_quota(quota),
        )
    }

    fn ready<'a>(
        &self,
        p: &str,
        r: &'a Option<Ready>,
        control: Control,
    ) -> Result<&'a Ready, CgroupError> {
        r.as_ref().ok_or_else(|| CgroupError::Unsupported {
            path: p.to_string(),
            reason: format!("the {} hierarchy is not available", control.as_str()),
        })
    }
}

/// Whether the control files `files` exist in `corral/` of a ready hierarchy.
fn probe(h: &Result<Ready, String>, files: &[&str]) -> Result<(), String> {
    let corral = h.as_ref().map_err(Clone::clone)?.parent.join("corral");
    match files.iter().find(|f| !corral.join(f).exists()) {
        None => Ok(()),
        Some(f) => Err(format!("{} does not exist", corral.join(f).display())),
    }
}

/// Prepares one hierarchy: the parent exists (created when missing), `corral/` exists in it,
/// and it is writable.
fn prepare_parent(fs: &dyn CgroupDirs, h: &V1Hierarchy) -> Result<Ready, String> {
    if !h.mount.is_dir() {
        return Err(format!("{} does not exist", h.mount.display()));
    }
    let mut created = Vec::new();
    create_dirs(fs, &h.mount, &h.parent.join("corral"), &mut created)
        .map_err(|(dir, e)| format!("cannot create {}: {e}", dir.display()))?;
    let parent = h.mount.join(&h.parent);
    let corral = parent.join("corral");
    nix::unistd::access(&corral, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("{} is not writable: {e}", corral.display()))?;
    Ok(Ready {
        mount: h.mount.clone(),
        parent,
    })
}

/// Moves every thread of the v1 cgroup `from` into the `tasks` file `to`, thread by thread
/// (as [`CgroupBackend::open_procs`] does, without the kernel's global thread-group lock); a
/// thread started meanwhile is moved by the next pass, up to [`JOIN_PASSES`].
fn move_threads(p: &str, from: &Path, to: &Path) -> Result<(), CgroupError> {
    for _ in 0..JOIN_PASSES {
        let tids = read_tasks(p, from)?.unwrap_or_default();
        if tids.is_empty() {
            return Ok(());
        }
        for tid in tids {
            match write_value(to, &tid.to_string()) {
                // Gone since the read.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(source) => {
                    return Err(CgroupError::Write {
                        path: p.to_string(),
                        file: to.to_path_buf(),
                        value: tid.to_string(),
                        source,
                    });
                }
                Ok(()) => {}
            }
        }
    }
    Err(CgroupError::Setup(format!(
        "{} still lists threads after {JOIN_PASSES} passes",
        from.join("tasks").display()
    )))
}

impl CgroupBackend for V1Backend {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn tree_dir(&self) -> Option<PathBuf> {
        self.dirs(&CgroupPath::root()).next()
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
        let quota = fsutil::quota_or_unlimited(&p, cores, period_us)?;
        self.write_cpu(&p, path, quota, period_us)?;
        // No quota now (written and read back): per service, the instance joins its service.
        if quota < 0
            && let Some(service) = self.per_service(path)
        {
            self.join_service(&p, path, &service);
        }
        Ok(())
    }

    fn set_cpu_weight(&self, path: &CgroupPath, processes: u64) -> Result<(), CgroupError> {
        let p = path.to_string();
        let r = self.ready(&p, &self.cpu, Control::Cpu)?;
        let file = r.parent.join(path.relative()).join("cpu.shares");
        fsutil::write_control(&p, file, super::v1_shares(processes).to_string())
    }

    /// Each hierarchy's `tasks`, not `cgroup.procs`: a single-threaded process that writes
    /// `"0"` there moves itself without the kernel's global thread-group lock, whose write
    /// side waits for an RCU grace period (7-25 ms per hierarchy measured on 6.18, against
    /// ~30 µs through `tasks`). The child of `clone3` has one thread, so moving that thread
    /// moves the whole process; a pid written there (a test's `sleep`) moves that thread.
    fn open_procs(&self, path: &CgroupPath) -> Result<Vec<OwnedFd>, CgroupError> {
        let service = self.cpu_service(path);
        let cpu_parent = self.cpu.as_ref().map(|r| &r.parent);
        self.parents
            .iter()
            .map(|parent| match &service {
                Some(svc) if Some(parent) == cpu_parent => parent.join(svc.relative()),
                _ => parent.join(path.relative()),
            })
            .map(|dir| {
                let file = dir.join("tasks");
                // std opens with O_CLOEXEC.
                OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Open {
                        path: path.to_string(),
                        file,
                        source,
                    })
            })
            .collect()
    }

    fn restrict_devices(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        let p = path.to_string();
        let r = self.ready(&p, &self.devices, Control::Devices)?;
        let dir = r.parent.join(path.relative());
        let failed = |file: PathBuf, value: &str| {
            let p = p.clone();
            let value = value.to_string();
            move |source| CgroupError::Write {
                path: p,
                file,
                value,
                source,
            }
        };
        let deny = dir.join("devices.deny");
        std::fs::write(&deny, "a").map_err(failed(deny.clone(), "a"))?;
        // One rule per write(2), as the kernel parses them, through one descriptor.
        let allow = dir.join("devices.allow");
        let mut file = OpenOptions::new()
            .write(true)
            .open(&allow)
            .map_err(failed(allow.clone(), "(open)"))?;
        for rule in super::devices::v1_rules() {
            std::io::Write::write_all(&mut file, rule.as_bytes())
                .map_err(failed(allow.clone(), &rule))?;
        }
        drop(file);
        let list = dir.join("devices.list");
        let found = std::fs::read_to_string(&list).map_err(|e| read_err(&p, &list, e))?;
        if !super::devices::v1_list_matches(&found) {
            return Err(CgroupError::NotApplied {
                path: p,
                file: list,
                wanted: super::devices::v1_rules().join("\n"),
                found,
            });
        }
        Ok(())
    }

    fn procs(&self, path: &CgroupPath) -> Result<Vec<i32>, CgroupError> {
        let p = path.to_string();
        let mut all = Vec::new();
        for dir in self.dirs(path) {
            all.extend(read_procs(&p, &dir)?.unwrap_or_default());
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn holds(&self, path: &CgroupPath, pid: i32) -> Result<bool, CgroupError> {
        let p = path.to_string();
        match self.dirs(path).next() {
            Some(dir) => Ok(read_procs(&p, &dir)?.is_some_and(|pids| pids.contains(&pid))),
            None => Ok(false),
        }
    }

    fn kill_all(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        sigkill_all(&path.to_string(), &self.procs(path)?)
    }

    fn stats(&self, path: &CgroupPath) -> Result<CgroupStats, CgroupError> {
        let mut stats = CgroupStats::default();
        let mut limit = None;
        self.stats.read(
            path,
            || self.stat_files(path),
            |kind, file, text| {
                let p = || path.to_string();
                let text = text.unwrap_or_default();
                let one = || parsed(&p(), file, fsutil::parse_u64(text));
                match kind {
                    StatFile::CpuacctUsage => stats.cpu_usage_ns = one()?,
                    StatFile::CpuStat => {
                        stats.cpu_throttled_periods =
                            parsed(&p(), file, keyed_u64_or_zero(text, "nr_throttled"))?;
                        stats.cpu_throttled_ns =
                            parsed(&p(), file, keyed_u64_or_zero(text, "throttled_time"))?;
                    }
                    StatFile::MemoryUsage => stats.memory_bytes = one()?,
                    StatFile::MemoryMaxUsage => stats.memory_peak_bytes = one()?,
                    StatFile::OomControl => {
                        stats.oom_kills = parsed(&p(), file, keyed_u64(text, "oom_kill"))?;
                    }
                    StatFile::MemoryLimit => limit = Some(one()?),
                    StatFile::PidsCurrent => stats.pids = one()?,
                }
                Ok(())
            },
        )?;
        stats.memory_limit_bytes = limit.filter(|l| *l < UNLIMITED_BYTES);
        if self.cpuacct_with_cpu() && self.cpu_service(path).is_some() {
            stats.cpu_usage_ns = crate::procfs::cpu_time_ns(&self.procs(path)?);
        }
        Ok(stats)
    }

    fn oom_kills(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        let Some(memory) = self
            .memory
            .as_ref()
            .filter(|_| self.caps.has(Control::Memory))
        else {
            return Ok(0);
        };
        if self.stats.is_held(path) {
            return self.stats(path).map(|s| s.oom_kills);
        }
        let file = memory
            .parent
            .join(path.relative())
            .join("memory.oom_control");
        fsutil::read_keyed_u64(&path.to_string(), &file, "oom_kill")
    }

    fn remove(&self, path: &CgroupPath) -> Result<(), CgroupError> {
        self.stats.forget(path);
        remove_all(self.fs.as_ref(), &path.to_string(), self.dirs(path))
    }

    fn children(&self, path: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        match self.dirs(path).next() {
            Some(dir) => subdirs(&path.to_string(), &dir),
            None => Ok(Vec::new()),
        }
    }

    fn display_path(&self, path: &CgroupPath) -> String {
        self.dirs(path)
            .next()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| path.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;

    use super::*;
    use crate::cgroups::fake::{FakeKernel, Quirk};
    use crate::cgroups::testkit::{self, Cleanup};

    const MIB: u64 = 1 << 20;

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

    /// Four separate hierarchies under `root`, the parent `agent/x` in each.
    fn fake_layout(root: &Path) -> V1Layout {
        for c in ["cpu", "cpuacct", "memory", "pids"] {
            FakeKernel::plant_v1(&root.join(c), &[c]);
        }
        let h = |c: &str| Some(V1Hierarchy::new(root.join(c), "agent/x"));
        V1Layout {
            cpu: h("cpu"),
            cpuacct: h("cpuacct"),
            memory: h("memory"),
            pids: h("pids"),
            devices: None,
        }
    }

    fn fake_backend(root: &Path) -> (Arc<FakeKernel>, V1Backend) {
        let fake = FakeKernel::v1();
        let backend = V1Backend::with_dirs(fake_layout(root), fake.clone()).expect("backend");
        (fake, backend)
    }

    fn leaf(root: &Path, hierarchy: &str) -> PathBuf {
        root.join(hierarchy).join("agent/x/corral/web/web-0")
    }

    #[test]
    fn fake_setup_creates_parent_and_reports_everything() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(tmp.path());
        let caps = b.capabilities();
        assert_eq!(caps.version, CgroupVersion::V1);
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
            vec![(
                Control::Devices,
                "the devices hierarchy is not mounted".to_string()
            )]
        );
        assert_eq!(
            caps.parent,
            "memory:/agent/x,cpu:/agent/x,cpuacct:/agent/x,pids:/agent/x"
        );
        for c in ["cpu", "cpuacct", "memory", "pids"] {
            assert!(
                fake.made()
                    .contains(&tmp.path().join(c).join("agent/x/corral"))
            );
        }
    }

    #[test]
    fn fake_create_writes_and_reads_back_every_limit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &limits(Some(0.25), Some(64 * MIB), Some(32)))
            .expect("create");
        let r = tmp.path();
        let read = |h: &str, f: &str| testkit::read(&leaf(r, h).join(f));
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "25000");
        assert_eq!(read("memory", "memory.limit_in_bytes"), "67108864");
        assert_eq!(read("memory", "memory.memsw.limit_in_bytes"), "67108864");
        assert_eq!(read("pids", "pids.max"), "32");
        // the cgroup exists in every hierarchy, intermediate directories included
        for h in ["cpu", "cpuacct", "memory", "pids"] {
            assert!(fake.made().contains(&r.join(h).join("agent/x/corral/web")));
            assert!(fake.made().contains(&leaf(r, h)));
        }
        assert_eq!(
            b.display_path(&web0()),
            leaf(r, "memory").display().to_string()
        );
    }

    #[test]
    fn fake_cpu_limit_changes_on_a_live_cgroup_and_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &limits(Some(2.0), None, None))
            .expect("create");
        let r = tmp.path();
        let read = |f: &str| testkit::read(&leaf(r, "cpu").join(f));
        b.set_cpu_limit(&web0(), Some(0.3), 10_000).expect("cap");
        assert_eq!(
            (read("cpu.cfs_period_us"), read("cpu.cfs_quota_us")),
            ("10000".into(), "3000".into())
        );
        b.set_cpu_limit(&web0(), Some(2.0), 100_000)
            .expect("own limit");
        assert_eq!(
            (read("cpu.cfs_period_us"), read("cpu.cfs_quota_us")),
            ("100000".into(), "200000".into())
        );
        b.set_cpu_limit(&web0(), None, 100_000).expect("none");
        assert_eq!(read("cpu.cfs_quota_us"), "-1");
        let err = b
            .set_cpu_limit(&web0(), Some(f64::NAN), 10_000)
            .expect_err("NaN");
        assert!(err.to_string().contains("NaN"), "{err}");
    }

    #[test]
    fn fake_unset_limits_stay_unlimited() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &limits(None, None, None))
            .expect("create");
        let r = tmp.path();
        assert_eq!(
            testkit::read(&leaf(r, "cpu").join("cpu.cfs_quota_us")),
            "-1"
        );
        assert_eq!(
            testkit::read(&leaf(r, "memory").join("memory.limit_in_bytes")),
            "9223372036854771712"
        );
        assert_eq!(testkit::read(&leaf(r, "pids").join("pids.max")), "max");
    }

    #[test]
    fn fake_missing_hierarchy_is_unsupported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = V1Layout {
            pids: None,
            ..fake_layout(tmp.path())
        };
        let b = V1Backend::with_dirs(layout, FakeKernel::v1()).expect("backend");
        assert!(!b.capabilities().has(Control::Pids));
        assert_eq!(
            b.capabilities().unavailable,
            vec![
                (
                    Control::Pids,
                    "the pids hierarchy is not mounted".to_string()
                ),
                (
                    Control::Devices,
                    "the devices hierarchy is not mounted".to_string()
                ),
            ]
        );
        let err = b
            .create(&web0(), &limits(None, Some(64 * MIB), Some(32)))
            .expect_err("no pids");
        assert!(
            matches!(&err, CgroupError::Unsupported { reason, .. } if reason.contains("resources.pids")),
            "{err}"
        );
        // refused before anything was made
        assert!(!leaf(tmp.path(), "memory").exists());
        b.create(&web0(), &limits(None, Some(64 * MIB), None))
            .expect("memory alone works");
    }

    #[test]
    fn fake_without_swap_accounting_limits_memory_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = fake_layout(tmp.path());
        for f in ["memory.memsw.limit_in_bytes", "memory.memsw.usage_in_bytes"] {
            fs::remove_file(tmp.path().join("memory").join(f)).expect("unplant memsw");
        }
        let b = V1Backend::with_dirs(layout, FakeKernel::v1()).expect("backend");
        let caps = b.capabilities();
        assert!(caps.has(Control::Memory));
        assert!(
            caps.unavailable
                .iter()
                .any(|(c, r)| *c == Control::MemorySwap && r.contains("swapaccount=1")),
            "{caps:?}"
        );
        b.create(&web0(), &limits(None, Some(64 * MIB), None))
            .expect("create");
        let dir = leaf(tmp.path(), "memory");
        assert_eq!(
            testkit::read(&dir.join("memory.limit_in_bytes")),
            "67108864"
        );
        assert!(!dir.join("memory.memsw.limit_in_bytes").exists());
    }

    /// After a failed create, nothing it made is left: not the instance, not `corral/web`.
    fn assert_nothing_left(root: &Path) {
        for h in ["cpu", "cpuacct", "memory", "pids"] {
            let corral = root.join(h).join("agent/x/corral");
            assert!(corral.is_dir(), "the parent's corral/ stays");
            assert!(!corral.join("web").exists(), "{h}: corral/web left behind");
        }
    }

    #[test]
    fn fake_write_that_does_not_take_is_not_applied() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(tmp.path());
        fake.quirk("memory.limit_in_bytes", Quirk::IgnoresWrites);
        let err = b
            .create(&web0(), &limits(Some(0.5), Some(64 * MIB), Some(32)))
            .expect_err("limit ignored");
        match &err {
            CgroupError::NotApplied {
                path,
                file,
                wanted,
                found,
            } => {
                assert_eq!(path, "corral/web/web-0");
                assert!(file.ends_with("web-0/memory.limit_in_bytes"), "{file:?}");
                assert_eq!(wanted, "67108864");
                assert_eq!(found, "");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(
            err.to_string()
                .contains("reads \"\" after writing \"67108864\""),
            "{err}"
        );
        assert_nothing_left(tmp.path());
    }

    #[test]
    fn fake_rejected_write_names_file_and_value() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(tmp.path());
        fake.quirk("pids.max", Quirk::RejectsWrites);
        let err = b
            .create(&web0(), &limits(None, None, Some(32)))
            .expect_err("pids.max rejects");
        match &err {
            CgroupError::Write {
                file,
                value,
                source,
                ..
            } => {
                assert!(file.ends_with("web-0/pids.max"), "{file:?}");
                assert_eq!(value, "32");
                assert_eq!(source.raw_os_error(), Some(libc::EISDIR));
            }
            other => panic!("unexpected {other}"),
        }
        assert_nothing_left(tmp.path());
    }

    #[test]
    fn fake_control_file_missing_in_new_cgroup() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fake, b) = fake_backend(tmp.path());
        fake.quirk("cpu.cfs_quota_us", Quirk::Missing);
        let err = b
            .create(&web0(), &limits(Some(1.0), None, None))
            .expect_err("no quota file");
        assert!(
            matches!(&err, CgroupError::Unsupported { reason, .. } if reason.contains("cpu.cfs_quota_us does not exist")),
            "{err}"
        );
        assert_nothing_left(tmp.path());
    }

    #[test]
    fn fake_invalid_values_are_refused_before_mkdir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        for res in [
            limits(Some(0.0), None, None),
            limits(Some(f64::NAN), None, None),
            limits(None, Some(u64::MAX), None),
            limits(None, None, Some(u64::MAX)),
        ] {
            let err = b.create(&web0(), &res).expect_err("invalid");
            assert!(
                matches!(&err, CgroupError::Write { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput),
                "{err}"
            );
            assert_nothing_left(tmp.path());
        }
    }

    #[test]
    fn fake_procs_union_and_remove() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        let r = tmp.path();
        b.create(&web0(), &Resources::default()).expect("create");
        assert_eq!(b.procs(&web0()).expect("procs"), Vec::<i32>::new());
        // Fake pids only: never passed to kill_all.
        fs::write(leaf(r, "memory").join("cgroup.procs"), "200\n100\n").expect("procs");
        fs::write(leaf(r, "cpu").join("cgroup.procs"), "200\n300\n").expect("procs");
        assert_eq!(b.procs(&web0()).expect("procs"), vec![100, 200, 300]);
        // Membership is read from the first hierarchy alone (where every process joins).
        assert!(b.holds(&web0(), 100).expect("holds"));
        assert!(!b.holds(&web0(), 300).expect("holds"));
        assert!(!b.holds(&web0(), 400).expect("holds"));

        let err = b.remove(&web0()).expect_err("tasks left");
        assert!(err.is_busy(), "{err}");
        // rmdir was tried everywhere: the hierarchies without tasks are clean already
        assert!(!leaf(r, "pids").exists());
        assert!(leaf(r, "memory").exists());

        for h in ["memory", "cpu"] {
            fs::write(leaf(r, h).join("cgroup.procs"), "").expect("empty");
        }
        b.remove(&web0()).expect("remove");
        b.remove(&web0()).expect("removing again is fine");
        b.remove(&CgroupPath::service("web"))
            .expect("remove service");
        for h in ["cpu", "cpuacct", "memory", "pids"] {
            let corral = r.join(h).join("agent/x/corral");
            assert_eq!(
                fs::read_dir(&corral)
                    .expect("corral")
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .count(),
                0,
                "{h}: left behind"
            );
        }
        assert_eq!(b.procs(&web0()).expect("gone is empty"), Vec::<i32>::new());
        b.kill_all(&web0()).expect("nothing to kill");
    }

    #[test]
    fn fake_garbage_in_procs_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &Resources::default()).expect("create");
        fs::write(leaf(tmp.path(), "pids").join("cgroup.procs"), "12\nx\n").expect("plant");
        let err = b.procs(&web0()).expect_err("garbage");
        assert!(matches!(err, CgroupError::Read { .. }), "{err}");
    }

    #[test]
    fn fake_kill_all_kills_listed_processes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &Resources::default()).expect("create");
        let mut cleanup = Cleanup::default();
        let pid = cleanup.adopt(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn"),
        );
        // The fake lists our own child, so the SIGKILL pass reaches a real process we own.
        fs::write(
            leaf(tmp.path(), "memory").join("cgroup.procs"),
            format!("{pid}\n"),
        )
        .expect("plant");
        b.kill_all(&web0()).expect("kill");
        assert_eq!(cleanup.reap(pid).signal(), Some(libc::SIGKILL));
        // already dead: ESRCH is not an error
        b.kill_all(&web0()).expect("second pass");
    }

    #[test]
    fn oom_kills_read_the_oom_file_alone_until_the_others_are_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &Resources::default()).expect("create");
        let r = tmp.path();
        let oom = leaf(r, "memory").join("memory.oom_control");
        fs::write(&oom, "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n").expect("plant");
        // The other stat files are missing: reading them would fail.
        assert_eq!(b.oom_kills(&web0()).expect("oom kills"), 4);
        assert!(!b.stats.is_held(&web0()), "nothing kept open");
        fs::write(&oom, "oom_kill_disable 0\n").expect("plant");
        let err = b.oom_kills(&web0()).expect_err("no oom_kill line");
        assert!(err.to_string().contains("oom_kill"), "{err}");
    }

    #[test]
    fn fake_stats_read_the_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        b.create(&web0(), &Resources::default()).expect("create");
        let r = tmp.path();
        let put = |h: &str, f: &str, v: &str| fs::write(leaf(r, h).join(f), v).expect("plant");
        put("cpuacct", "cpuacct.usage", "123456789\n");
        put("memory", "memory.usage_in_bytes", "4096000\n");
        put("memory", "memory.max_usage_in_bytes", "8192000\n");
        put(
            "memory",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        put("pids", "pids.current", "3\n");
        put(
            "cpu",
            "cpu.stat",
            "nr_periods 40\nnr_throttled 7\nthrottled_time 350000000\n",
        );
        put("memory", "memory.limit_in_bytes", "67108864\n");
        assert_eq!(b.oom_kills(&web0()).expect("oom kills"), 2);
        assert_eq!(
            b.stats(&web0()).expect("stats"),
            CgroupStats {
                cpu_usage_ns: 123_456_789,
                memory_bytes: 4_096_000,
                memory_peak_bytes: 8_192_000,
                oom_kills: 2,
                pids: 3,
                cpu_throttled_periods: 7,
                cpu_throttled_ns: 350_000_000,
                memory_limit_bytes: Some(64 << 20),
                memory_pressure: None,
            }
        );
        // "unlimited" on v1 is the largest page multiple below 2^63
        put("memory", "memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(b.stats(&web0()).expect("stats").memory_limit_bytes, None);
        // a kernel that writes no throttling lines: none counted
        put("cpu", "cpu.stat", "nr_periods 0\n");
        let s = b.stats(&web0()).expect("stats");
        assert_eq!((s.cpu_throttled_periods, s.cpu_throttled_ns), (0, 0));
        // a value that cannot be read is an error, never a guessed 0
        put("memory", "memory.usage_in_bytes", "");
        let err = b.stats(&web0()).expect_err("empty file");
        assert!(
            matches!(&err, CgroupError::Read { file, .. } if file.ends_with("memory.usage_in_bytes")),
            "{err}"
        );
        put("memory", "memory.usage_in_bytes", "1\n");
        put("pids", "pids.current", "many\n");
        let err = b.stats(&web0()).expect_err("bad pids.current");
        assert!(
            matches!(&err, CgroupError::Read { file, .. } if file.ends_with("pids.current")),
            "{err}"
        );
        // The cgroup's seven files are held open until it is removed.
        assert_eq!(b.stats.held_fds(), 7);
        b.remove(&web0()).expect("remove");
        assert_eq!(b.stats.held_fds(), 0);
    }

    #[test]
    fn fake_children_and_open_procs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        let svc = CgroupPath::service("web");
        assert_eq!(b.children(&svc).expect("none yet"), Vec::<String>::new());
        for i in ["web-1", "web-0"] {
            b.create(&CgroupPath::instance("web", i), &Resources::default())
                .expect("create");
        }
        assert_eq!(b.children(&svc).expect("children"), vec!["web-0", "web-1"]);
        assert_eq!(
            b.children(&CgroupPath::root()).expect("services"),
            vec!["web"]
        );

        let fds = b.open_procs(&web0()).expect("open");
        assert_eq!(fds.len(), 4, "one per hierarchy");
        for fd in fds {
            let mut f = fs::File::from(fd);
            std::io::Write::write_all(&mut f, b"0").expect("write");
        }
        for h in ["cpu", "cpuacct", "memory", "pids"] {
            assert_eq!(testkit::read(&leaf(tmp.path(), h).join("tasks")), "0");
        }
        let err = b
            .open_procs(&CgroupPath::instance("web", "nope"))
            .expect_err("missing");
        assert!(matches!(err, CgroupError::Open { .. }), "{err}");
    }

    /// `cpu,cpuacct` mounted together and `memory` under `root`, the parent `agent` in each;
    /// the co-mounted hierarchy's mount.
    fn comounted_layout(root: &Path) -> (PathBuf, V1Layout) {
        let both = root.join("cpu,cpuacct");
        FakeKernel::plant_v1(&both, &["cpu", "cpuacct"]);
        FakeKernel::plant_v1(&root.join("memory"), &["memory"]);
        let h = |m: &Path| Some(V1Hierarchy::new(m, "agent"));
        let layout = V1Layout {
            cpu: h(&both),
            cpuacct: h(&both),
            memory: h(&root.join("memory")),
            pids: None,
            devices: None,
        };
        (both, layout)
    }

    /// Writes "0" through each of `path`'s `tasks` files, as a starting instance does.
    fn join(b: &V1Backend, path: &CgroupPath) {
        for fd in b.open_procs(path).expect("open") {
            let mut f = fs::File::from(fd);
            std::io::Write::write_all(&mut f, b"0").expect("write");
        }
    }

    #[test]
    fn fake_per_service_instances_without_a_quota_join_their_service_for_cpu_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let r = tmp.path();
        let (_fake, b) = fake_backend(r);
        let b = b.with_cpu_cgroup(CpuCgroup::PerService);
        let capped = CgroupPath::instance("web", "web-1");
        b.create(&web0(), &limits(None, Some(64 * MIB), None))
            .expect("create");
        b.create(&capped, &limits(Some(0.5), None, None))
            .expect("create");
        join(&b, &web0());
        join(&b, &capped);
        let service = |h: &str| testkit::read(&r.join(h).join("agent/x/corral/web/tasks"));
        let own = |h: &str, i: &str| {
            testkit::read(&r.join(h).join("agent/x/corral/web").join(i).join("tasks"))
        };
        // web-0: its service's cpu cgroup, its own everywhere else (cpuacct is mounted apart
        // here, so its CPU time stays counted on its own); web-1, capped, its own throughout.
        assert_eq!(service("cpu"), "0");
        assert_eq!(own("cpu", "web-0"), "");
        for h in ["cpuacct", "memory", "pids"] {
            assert_eq!(own(h, "web-0"), "0", "{h}");
            assert_eq!(service(h), "", "{h}");
        }
        for h in ["cpu", "cpuacct", "memory", "pids"] {
            assert_eq!(own(h, "web-1"), "0", "{h}");
        }
        // The cap of a rollout's start is set before the instance starts: it starts in its own.
        let started = CgroupPath::instance("web", "web-2");
        b.create(&started, &Resources::default()).expect("create");
        b.set_cpu_limit(&started, Some(0.3), 10_000).expect("cap");
        join(&b, &started);
        assert_eq!(own("cpu", "web-2"), "0");
        // A service and the tree join nothing but themselves.
        let fds = b.open_procs(&CgroupPath::service("api"));
        assert!(matches!(fds, Err(CgroupError::Open { .. })), "{fds:?}");
        // Per instance (the backend's own default), web-0 has its own.
        let (_fake, per) = fake_backend(&r.join("per"));
        per.create(&web0(), &Resources::default()).expect("create");
        join(&per, &web0());
        assert_eq!(
            testkit::read(&leaf(&r.join("per"), "cpu").join("tasks")),
            "0"
        );
    }

    #[test]
    fn fake_per_service_with_cpuacct_mounted_with_cpu_counts_from_proc() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (both, layout) = comounted_layout(tmp.path());
        let again = layout.clone();
        let b = V1Backend::with_dirs(layout, FakeKernel::v1())
            .expect("backend")
            .with_cpu_cgroup(CpuCgroup::PerService);
        b.create(&web0(), &Resources::default()).expect("create");
        // This test's own process stands for the instance's: listed in its memory cgroup,
        // scheduled (here: written) in the service's cpu cgroup, its own cpuacct.usage 0.
        let me = std::process::id().to_string();
        let mem = tmp.path().join("memory/agent/corral/web/web-0");
        fs::write(mem.join("cgroup.procs"), &me).expect("plant");
        let busy = std::time::Instant::now();
        while busy.elapsed() < std::time::Duration::from_millis(30) {
            std::hint::black_box(busy.elapsed());
        }
        let fds = b.open_procs(&web0()).expect("open");
        assert_eq!(fds.len(), 2);
        drop(fds);
        let stats = b.stats(&web0()).expect("stats");
        let own = testkit::read(&both.join("agent/corral/web/web-0/cpuacct.usage"));
        assert_eq!(own, "0");
        let pid = i32::try_from(std::process::id()).expect("pid");
        let here = crate::procfs::cpu_time_ns(&[pid]);
        assert!(stats.cpu_usage_ns > 0, "{stats:?}");
        assert!(
            stats.cpu_usage_ns <= here,
            "{} > {here}",
            stats.cpu_usage_ns
        );
        // Per instance, the instance's own counter is read.
        let per = V1Backend::with_dirs(again, FakeKernel::v1()).expect("backend");
        assert_eq!(per.stats(&web0()).expect("stats").cpu_usage_ns, 0);
    }

    #[test]
    fn fake_comounted_cpu_cpuacct_is_one_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (both, layout) = comounted_layout(tmp.path());
        let fake = FakeKernel::v1();
        let b = V1Backend::with_dirs(layout, fake.clone()).expect("backend");
        assert!(b.capabilities().has(Control::Cpu));
        assert!(b.capabilities().has(Control::CpuAccounting));
        b.create(&web0(), &limits(Some(2.0), None, None))
            .expect("create");
        assert_eq!(
            testkit::read(&both.join("agent/corral/web/web-0/cpu.cfs_quota_us")),
            "200000"
        );
        assert_eq!(b.open_procs(&web0()).expect("open").len(), 2);
        b.remove(&web0()).expect("remove");
        assert!(!both.join("agent/corral/web/web-0").exists());
    }

    #[test]
    fn fake_create_replaces_an_empty_leftover() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_fake, b) = fake_backend(tmp.path());
        let r = tmp.path();
        b.create(&web0(), &limits(None, Some(64 * MIB), None))
            .expect("create");
        fs::write(
            leaf(r, "memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n",
        )
        .expect("plant");
        b.create(&web0(), &limits(None, None, Some(8)))
            .expect("again");
        let stats = b.stats(&web0()).expect("stats");
        assert_eq!(stats.oom_kills, 0, "counters start fresh");
        assert_eq!(
            testkit::read(&leaf(r, "memory").join("memory.limit_in_bytes")),
            "9223372036854771712",
            "the old limit is gone"
        );
        fs::write(leaf(r, "pids").join("cgroup.procs"), "4242\n").expect("plant");
        let err = b
            .create(&web0(), &Resources::default())
            .expect_err("live leftover");
        assert!(err.is_busy(), "{err}");
    }

    #[test]
    fn fake_unusable_hierarchies() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut layout = fake_layout(tmp.path());
        layout.cpu = Some(V1Hierarchy::new(tmp.path().join("nowhere"), "agent"));
        let b = V1Backend::with_dirs(layout, FakeKernel::v1()).expect("backend");
        assert!(
            b.capabilities()
                .unavailable
                .iter()
                .any(|(c, r)| *c == Control::Cpu && r.contains("nowhere does not exist")),
            "{:?}",
            b.capabilities()
        );
        assert_eq!(b.parents.len(), 3);

        let err = V1Backend::with_dirs(V1Layout::default(), FakeKernel::v1())
            .expect_err("nothing mounted");
        assert!(err.to_string().contains("none is mounted"), "{err}");
    }

    // ---- real kernel ----------------------------------------------------------------------

    /// Why the real-kernel tests cannot run here, if they cannot.
    fn kernel_v1_skip() -> Option<String> {
        if !testkit::is_root() {
            return Some("not root".into());
        }
        match nix::sys::statfs::statfs("/sys/fs/cgroup") {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => {
                return Some("the host runs cgroup v2".into());
            }
            Err(e) => return Some(format!("statfs /sys/fs/cgroup: {e}")),
            Ok(_) => {}
        }
        if !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            return Some("no v1 memory hierarchy at /sys/fs/cgroup/memory".into());
        }
        None
    }

    /// A backend on this host with a unique parent beneath the test's own cgroup, and the
    /// cleanup that removes that parent in every hierarchy.
    fn kernel_backend(test: &str) -> (Arc<dyn CgroupBackend>, V1Layout, Cleanup) {
        let flag = testkit::unique_parent(test);
        let layout = match crate::cgroups::detect::plan_host(Some(&flag)).expect("plan") {
            crate::cgroups::detect::Plan::V1(l) => l,
            other => panic!("expected v1, got {other:?}"),
        };
        let mut dirs = Vec::new();
        for h in [
            &layout.cpu,
            &layout.cpuacct,
            &layout.memory,
            &layout.pids,
            &layout.devices,
        ]
        .into_iter()
        .flatten()
        {
            let d = h.mount.join(&h.parent);
            assert!(!d.exists(), "{} exists already", d.display());
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        let cleanup = Cleanup::new(dirs);
        let backend = crate::cgroups::detect(Some(&flag)).expect("detect");
        (backend, layout, cleanup)
    }

    fn kdir(h: &Option<V1Hierarchy>, path: &CgroupPath) -> PathBuf {
        let h = h.as_ref().expect("hierarchy on this host");
        h.mount.join(&h.parent).join(path.relative())
    }

    #[test]
    fn kernel_v1_instance_lifecycle() {
        if let Some(why) = kernel_v1_skip() {
            eprintln!("skipped: {why}");
            return;
        }
        let (b, layout, mut cleanup) = kernel_backend("life");
        let caps = b.capabilities().clone();
        eprintln!("capabilities: {caps:?}");
        assert_eq!(caps.version, CgroupVersion::V1);
        for c in [
            Control::Cpu,
            Control::Memory,
            Control::Pids,
            Control::CpuAccounting,
        ] {
            assert!(caps.has(c), "{c:?}: {caps:?}");
        }
        let memsw_on_host = Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists();
        assert_eq!(caps.has(Control::MemorySwap), memsw_on_host);

        let path = web0();
        b.create(&path, &limits(Some(0.25), Some(64 * MIB), Some(32)))
            .expect("create");
        let cpu = kdir(&layout.cpu, &path);
        let mem = kdir(&layout.memory, &path);
        let pids = kdir(&layout.pids, &path);
        let quota = testkit::read(&cpu.join("cpu.cfs_quota_us"));
        let period = testkit::read(&cpu.join("cpu.cfs_period_us"));
        let limit = testkit::read(&mem.join("memory.limit_in_bytes"));
        let max = testkit::read(&pids.join("pids.max"));
        eprintln!(
            "read back: cpu.cfs_quota_us={quota} cpu.cfs_period_us={period} \
             memory.limit_in_bytes={limit} pids.max={max}"
        );
        assert_eq!(quota, "25000");
        assert_eq!(period, "100000");
        assert_eq!(limit, "67108864");
        assert_eq!(max, "32");
        if memsw_on_host {
            let memsw = testkit::read(&mem.join("memory.memsw.limit_in_bytes"));
            eprintln!("read back: memory.memsw.limit_in_bytes={memsw}");
            assert_eq!(memsw, "67108864");
        }

        // One child moved in by pid, one that enters before it executes.
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
        for dir in [&cpu, &mem, &pids, &kdir(&layout.cpuacct, &path)] {
            let in_dir = testkit::read(&dir.join("cgroup.procs"));
            assert!(
                in_dir.lines().any(|l| l == inside.to_string()),
                "{}: {in_dir}",
                dir.display()
            );
        }
        testkit::wait_asleep(inside);
        let stats = b.stats(&path).expect("stats");
        eprintln!("stats: {stats:?}");
        assert!(stats.pids >= 2, "{stats:?}");
        assert!(stats.memory_bytes > 0, "{stats:?}");
        assert!(stats.memory_peak_bytes >= stats.memory_bytes, "{stats:?}");
        assert!(stats.cpu_usage_ns > 0, "{stats:?}");
        assert_eq!(stats.oom_kills, 0);
        // The seven files stats() reads stay open and are read again from offset 0, where
        // the kernel writes their content anew: a limit changed behind the agent is seen.
        let cpuacct = kdir(&layout.cpuacct, &path);
        let all = [cpu.as_path(), &mem, &pids, &cpuacct];
        assert_eq!(testkit::fds_in(&all), 7);
        fs::write(mem.join("memory.limit_in_bytes"), "33554432").expect("write limit");
        assert_eq!(
            b.stats(&path).expect("stats").memory_limit_bytes,
            Some(32 * MIB)
        );
        assert_eq!(testkit::fds_in(&all), 7, "no more opened");

        let busy = b.remove(&path).expect_err("tasks inside");
        assert!(busy.is_busy(), "{busy}");

        b.kill_all(&path).expect("kill");
        assert_eq!(cleanup.reap(moved).signal(), Some(libc::SIGKILL));
        assert_eq!(cleanup.reap(inside).signal(), Some(libc::SIGKILL));
        assert_eq!(b.procs(&path).expect("procs"), Vec::<i32>::new());
        assert_eq!(b.stats(&path).expect("stats").pids, 0);

        b.remove(&path).expect("remove");
        assert_eq!(testkit::fds_in(&all), 0, "closed with the cgroup");
        // A cgroup removed behind the agent's back reads as an error, never as its last
        // values, and its files are not held.
        b.create(&path, &limits(None, None, None)).expect("create");
        b.stats(&path).expect("stats");
        assert_eq!(testkit::fds_in(&all), 7);
        for dir in all {
            let _ = fs::remove_dir(dir);
        }
        let gone = b.stats(&path).expect_err("removed");
        eprintln!("removed behind the agent: {gone}");
        assert_eq!(testkit::fds_in(&all), 0, "dropped when the read failed");
        b.remove(&path)
            .expect("remove it from the other hierarchies");
        b.remove(&CgroupPath::service("web"))
            .expect("remove service");
        b.remove(&CgroupPath::root()).expect("remove corral");
        for dir in &cleanup.dirs {
            let left: Vec<_> = fs::read_dir(dir)
                .expect("parent")
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
        let dirs = cleanup.dirs.clone();
        drop(cleanup);
        for dir in dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }

    /// The cgroup path of `pid` in the hierarchy holding `controller`.
    fn cgroup_of(pid: i32, controller: &str) -> String {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
        crate::procfs::parse_proc_cgroup(&text)
            .into_iter()
            .find(|c| c.controllers.iter().any(|x| x == controller))
            .map(|c| c.path)
            .unwrap_or_else(|| panic!("no {controller} line in {text}"))
    }

    #[test]
    fn kernel_v1_an_instance_without_a_quota_is_scheduled_in_its_service() {
        if let Some(why) = kernel_v1_skip() {
            eprintln!("skipped: {why}");
            return;
        }
        let (b, _layout, mut cleanup) = kernel_backend("cpusvc");
        let capped = CgroupPath::instance("web", "web-1");
        b.create(&web0(), &limits(None, None, Some(32)))
            .expect("create");
        b.create(&capped, &limits(Some(0.5), None, None))
            .expect("create");
        let mut start = |path: &CgroupPath| {
            let procs = b.open_procs(path).expect("open");
            cleanup.adopt(testkit::spawn_inside(&procs, &["sleep", "30"]))
        };
        let free = start(&web0());
        let own = start(&capped);
        for (pid, cpu) in [(free, "corral/web"), (own, "corral/web/web-1")] {
            let at = cgroup_of(pid, "cpu");
            eprintln!("{pid}: cpu {at}, memory {}", cgroup_of(pid, "memory"));
            assert!(at.ends_with(cpu), "{pid}: {at}");
        }
        assert!(cgroup_of(free, "memory").ends_with("corral/web/web-0"));
        assert!(cgroup_of(free, "pids").ends_with("corral/web/web-0"));
        assert_eq!(b.procs(&web0()).expect("procs"), vec![free]);
        // A rollout's start cap: in its own cpu cgroup until the cap is lifted, then in its
        // service's, its other cgroups unchanged.
        let started = CgroupPath::instance("web", "web-2");
        b.create(&started, &Resources::default()).expect("create");
        b.set_cpu_limit(&started, Some(0.3), 10_000).expect("cap");
        let lifted = start(&started);
        assert!(cgroup_of(lifted, "cpu").ends_with("corral/web/web-2"));
        b.set_cpu_limit(&started, None, CPU_PERIOD_US)
            .expect("lift");
        let at = cgroup_of(lifted, "cpu");
        assert!(at.ends_with("corral/web"), "{lifted}: cpu {at}");
        assert!(cgroup_of(lifted, "memory").ends_with("corral/web/web-2"));
        assert_eq!(b.procs(&started).expect("procs"), vec![lifted]);
        for (path, pid) in [(web0(), free), (capped.clone(), own), (started, lifted)] {
            b.kill_all(&path).expect("kill");
            assert_eq!(cleanup.reap(pid).signal(), Some(libc::SIGKILL));
            b.remove(&path).expect("remove");
        }
        b.remove(&CgroupPath::service("web"))
            .expect("remove service");
        b.remove(&CgroupPath::root()).expect("remove corral");
    }

    #[test]
    fn kernel_v1_oom_kill_is_counted() {
        if let Some(why) = kernel_v1_skip() {
            eprintln!("skipped: {why}");
            return;
        }
        let (b, _layout, mut cleanup) = kernel_backend("oom");
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
        assert!(stats.memory_peak_bytes >= 30 * MIB, "{stats:?}");
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

    #[test]
    fn kernel_v1_remove_with_a_live_task_is_busy() {
        if let Some(why) = kernel_v1_skip() {
            eprintln!("skipped: {why}");
            return;
        }
        let (b, layout, mut cleanup) = kernel_backend("busy");
        let path = CgroupPath::instance("db", "db-0");
        b.create(&path, &limits(None, Some(64 * MIB + 100), None))
            .expect("create");
        // the kernel keeps whole pages: 64 MiB + 100 bytes reads 64 MiB, and that is accepted
        assert_eq!(
            testkit::read(&kdir(&layout.memory, &path).join("memory.limit_in_bytes")),
            "67108864"
        );
        let pid = cleanup.adopt(testkit::spawn_and_move(b.open_procs(&path).expect("open")));
        let err = b.remove(&path).expect_err("busy");
        assert!(err.is_busy(), "{err}");
        assert!(err.to_string().contains("Device or resource busy"), "{err}");
        assert!(kdir(&layout.memory, &path).exists());
        b.kill_all(&path).expect("kill");
        assert_eq!(cleanup.reap(pid).signal(), Some(libc::SIGKILL));
        b.remove(&path).expect("remove once empty");
        assert!(!kdir(&layout.memory, &path).exists());
        assert!(!kdir(&layout.pids, &path).exists());
    }
}
