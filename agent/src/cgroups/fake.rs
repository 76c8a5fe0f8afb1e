//! A fake cgroup kernel for tests, on any host: cgroup directories live in a temporary
//! directory, `mkdir` populates control files the way cgroupfs does (v1: the files of the
//! parent, with a new cgroup's defaults; v2: the core files plus those of the controllers the
//! parent enables in `cgroup.subtree_control`), and `rmdir` refuses a cgroup that has tasks or
//! children, then removes it with its files. Quirks make one control file missing, ignore
//! writes (a link to `/dev/null`), refuse them (a link to a read-only sysctl) or fail reads
//! and writes alike (a directory in its place).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::fsutil::CgroupDirs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Quirk {
    /// The kernel does not offer the file.
    Missing,
    /// Writes succeed but change nothing: the file reads empty.
    IgnoresWrites,
    /// Writes and reads fail (EISDIR).
    RejectsWrites,
    /// Reads work, writes fail with EACCES even for root (a link to a read-only sysctl).
    ReadOnly,
}

#[derive(Debug)]
pub(super) struct FakeKernel {
    v2: bool,
    cgroup_kill: bool,
    quirks: Mutex<Vec<(String, Quirk)>>,
    quirk_dirs: Mutex<HashSet<PathBuf>>,
    made: Mutex<Vec<PathBuf>>,
}

/// The content of a control file in a new cgroup.
fn default_content(name: &str) -> &'static str {
    match name {
        "cpu.cfs_period_us" => "100000\n",
        "cpu.cfs_quota_us" => "-1\n",
        "cpu.shares" => "1024\n",
        "cpu.stat" => "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnr_periods 0\n",
        "cpu.max" => "max 100000\n",
        "cpu.weight" => "100\n",
        "memory.limit_in_bytes" | "memory.memsw.limit_in_bytes" => "9223372036854771712\n",
        "memory.oom_control" => "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        "memory.events" => "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.max" | "memory.swap.max" | "pids.max" => "max\n",
        "cgroup.events" => "populated 0\nfrozen 0\n",
        "cgroup.type" => "domain\n",
        "cgroup.procs" | "tasks" | "cgroup.subtree_control" | "cgroup.kill" => "",
        _ => "0\n",
    }
}

fn v1_files(controller: &str) -> &'static [&'static str] {
    match controller {
        "cpu" => &[
            "cpu.cfs_period_us",
            "cpu.cfs_quota_us",
            "cpu.shares",
            "cpu.stat",
        ],
        "cpuacct" => &["cpuacct.usage"],
        "memory" => &[
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "memory.usage_in_bytes",
            "memory.max_usage_in_bytes",
            "memory.memsw.usage_in_bytes",
            "memory.oom_control",
        ],
        "pids" => &["pids.max", "pids.current"],
        _ => &[],
    }
}

fn v2_files(controller: &str) -> &'static [&'static str] {
    match controller {
        "cpu" => &["cpu.max", "cpu.weight"],
        "memory" => &[
            "memory.max",
            "memory.current",
            "memory.peak",
            "memory.events",
            "memory.swap.max",
            "memory.swap.current",
        ],
        "pids" => &["pids.max", "pids.current"],
        _ => &[],
    }
}

fn plant(dir: &Path, name: &str) {
    fs::write(dir.join(name), default_content(name)).expect("plant a fake control file");
}

impl FakeKernel {
    pub(super) fn v1() -> Arc<FakeKernel> {
        Arc::new(FakeKernel::new(false, false))
    }

    /// A v2 kernel; `cgroup_kill`: whether cgroups have `cgroup.kill` (Linux 5.14+).
    pub(super) fn v2(cgroup_kill: bool) -> Arc<FakeKernel> {
        Arc::new(FakeKernel::new(true, cgroup_kill))
    }

    fn new(v2: bool, cgroup_kill: bool) -> FakeKernel {
        FakeKernel {
            v2,
            cgroup_kill,
            quirks: Mutex::new(Vec::new()),
            quirk_dirs: Mutex::new(HashSet::new()),
            made: Mutex::new(Vec::new()),
        }
    }

    /// Cgroups made from now on get `quirk` on the control file `name`.
    pub(super) fn quirk(&self, name: &str, quirk: Quirk) {
        self.quirks
            .lock()
            .expect("fake lock")
            .push((name.to_string(), quirk));
    }

    /// Every directory `mkdir` made, in order.
    pub(super) fn made(&self) -> Vec<PathBuf> {
        self.made.lock().expect("fake lock").clone()
    }

    /// A v1 hierarchy root (or a pre-existing parent) at `dir` with the files of `controllers`.
    pub(super) fn plant_v1(dir: &Path, controllers: &[&str]) {
        fs::create_dir_all(dir).expect("fake hierarchy dir");
        for name in ["cgroup.procs", "tasks", "notify_on_release"] {
            plant(dir, name);
        }
        for c in controllers {
            for name in v1_files(c) {
                plant(dir, name);
            }
        }
    }

    /// A v2 root at `dir` offering `controllers` (as the root has no limit files, only these).
    pub(super) fn plant_v2_root(dir: &Path, controllers: &[&str]) {
        fs::create_dir_all(dir).expect("fake cgroup2 root");
        for name in [
            "cgroup.procs",
            "cgroup.subtree_control",
            "cgroup.kill",
            "cpu.stat",
        ] {
            plant(dir, name);
        }
        fs::write(dir.join("cgroup.controllers"), controllers.join(" ") + "\n")
            .expect("fake cgroup.controllers");
    }

    fn apply_quirks(&self, dir: &Path) -> io::Result<()> {
        let quirks = self.quirks.lock().expect("fake lock").clone();
        for (name, quirk) in quirks {
            let file = dir.join(&name);
            let _ = fs::remove_file(&file);
            match quirk {
                Quirk::Missing => {}
                Quirk::IgnoresWrites => std::os::unix::fs::symlink("/dev/null", &file)?,
                Quirk::ReadOnly => {
                    std::os::unix::fs::symlink("/proc/sys/kernel/osrelease", &file)?;
                }
                Quirk::RejectsWrites => {
                    fs::create_dir(&file)?;
                    self.quirk_dirs.lock().expect("fake lock").insert(file);
                }
            }
        }
        Ok(())
    }
}

/// The controllers a v2 parent hands to its children, as `cgroup.subtree_control` lists them.
fn enabled_by(parent: &Path) -> Vec<String> {
    fs::read_to_string(parent.join("cgroup.subtree_control"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl CgroupDirs for FakeKernel {
    fn mkdir(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir(dir)?;
        let parent = dir
            .parent()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if self.v2 {
            let controllers = enabled_by(parent);
            for name in [
                "cgroup.procs",
                "cgroup.subtree_control",
                "cgroup.events",
                "cgroup.type",
                "cpu.stat",
            ] {
                plant(dir, name);
            }
            if self.cgroup_kill {
                plant(dir, "cgroup.kill");
            }
            fs::write(dir.join("cgroup.controllers"), controllers.join(" ") + "\n")?;
            for c in &controllers {
                for name in v2_files(c) {
                    plant(dir, name);
                }
            }
        } else {
            for entry in fs::read_dir(parent)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name != "cgroup.sane_behavior" && name != "release_agent" {
                    plant(dir, &name);
                }
            }
        }
        self.apply_quirks(dir)?;
        self.made.lock().expect("fake lock").push(dir.to_path_buf());
        Ok(())
    }

    /// Applies `+x`/`-x` words to the list, as the kernel does; an unknown word is EINVAL.
    fn subtree_control(&self, file: &Path, change: &str) -> io::Result<()> {
        // Through the file itself first, so that a quirk on it (read-only, a directory)
        // fails the write as it would on the kernel.
        let before: Vec<String> = fs::read_to_string(file)?
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let mut on = before.clone();
        for word in change.split_whitespace() {
            match (word.strip_prefix('+'), word.strip_prefix('-')) {
                (Some(c), _) if !c.is_empty() => {
                    if !on.iter().any(|o| o == c) {
                        on.push(c.to_string());
                    }
                }
                (_, Some(c)) if !c.is_empty() => on.retain(|o| o != c),
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
        }
        super::fsutil::write_value(file, &on.join(" "))?;
        // The children gain and lose the controllers' files, as on the kernel.
        let Some(dir) = file.parent() else {
            return Ok(());
        };
        for entry in fs::read_dir(dir)? {
            let child = entry?.path();
            if !child.is_dir() || !child.join("cgroup.controllers").exists() {
                continue;
            }
            for c in on.iter().filter(|c| !before.contains(c)) {
                for name in v2_files(c) {
                    if !child.join(name).exists() {
                        plant(&child, name);
                    }
                }
            }
            for c in before.iter().filter(|c| !on.contains(c)) {
                for name in v2_files(c) {
                    let _ = fs::remove_file(child.join(name));
                }
            }
            fs::write(child.join("cgroup.controllers"), on.join(" ") + "\n")?;
        }
        Ok(())
    }

    fn rmdir(&self, dir: &Path) -> io::Result<()> {
        let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
        if !procs.trim().is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let quirk_dirs = self.quirk_dirs.lock().expect("fake lock").clone();
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() && !quirk_dirs.contains(&path) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            entries.push(path);
        }
        for path in entries {
            if quirk_dirs.contains(&path) {
                fs::remove_dir(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        fs::remove_dir(dir)
    }
}
