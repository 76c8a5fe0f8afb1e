//! A test's own cgroup parent beneath the test process's cgroup, on v1 (one directory per
//! hierarchy) or v2, with helpers to read the kernel's files and to tear everything down.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The v1 hierarchies corrald makes its tree in (devices where the host mounts it): each
/// gets the test's directory, removed at the end with whatever the agent left in it.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "devices"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Whether cgroup2 is mounted at `point` (in this process's mount namespace).
fn cgroup2_at(point: &str) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace().skip(1);
        f.next() == Some(point) && f.next() == Some("cgroup2")
    })
}

pub fn version() -> Version {
    // cgroup2 mounted at /sys/fs/cgroup itself means a unified host.
    if cgroup2_at("/sys/fs/cgroup") {
        Version::V2
    } else {
        Version::V1
    }
}

/// Where a hybrid host mounts its unified (v2) hierarchy.
pub const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// A hybrid host: v1 hierarchies under `/sys/fs/cgroup`, the unified one at [`UNIFIED`].
pub fn hybrid() -> bool {
    version() == Version::V1 && cgroup2_at(UNIFIED)
}

/// "cgroup v1" or "cgroup v2", for reports.
pub fn version_name() -> &'static str {
    match version() {
        Version::V1 => "cgroup v1",
        Version::V2 => "cgroup v2",
    }
}

/// This process's cgroup in the hierarchy of `controller` (v1) or the unified one (v2).
fn own(controller: Option<&str>) -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let hit = match controller {
            Some(c) => ctrls.split(',').any(|x| x == c),
            None => ctrls.is_empty(),
        };
        if hit {
            return path.to_string();
        }
    }
    "/".to_string()
}

/// Where the test cgroups go on v2. Controllers can only be handed to children of a cgroup
/// with no processes ("no internal processes"), so: when the parent of our cgroup already
/// delegates cpu, memory and pids (as the v2 VM runner sets up), the test cgroups are made
/// beside ours; otherwise this process moves into a leaf of its cgroup and enables the
/// controllers there.
fn v2_base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let root = Path::new("/sys/fs/cgroup");
        let own = own(None);
        let wanted = ["cpu", "memory", "pids"];
        let delegates = |dir: &Path| {
            let ctl =
                std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            wanted
                .iter()
                .all(|c| ctl.split_whitespace().any(|x| x == *c))
        };
        if let Some(parent) = Path::new(&own).parent()
            && own != "/"
            && delegates(&root.join(parent.strip_prefix("/").unwrap_or(parent)))
        {
            return parent.display().to_string();
        }
        let dir = root.join(own.trim_start_matches('/'));
        let leaf = dir.join(format!("e2e-harness-{}", std::process::id()));
        let _ = std::fs::create_dir(&leaf);
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .expect("move test process to a leaf");
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<String> = wanted
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        std::fs::write(dir.join("cgroup.subtree_control"), enable.join(" "))
            .expect("enable controllers");
        own
    })
}

#[derive(Debug)]
pub struct TestCgroup {
    pub name: String,
    pub version: Version,
    /// v1: controller -> directory; v2: ("unified", directory).
    dirs: Vec<(&'static str, PathBuf)>,
    flag: String,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let version = version();
        match version {
            Version::V1 => {
                let dirs = V1_CONTROLLERS
                    .iter()
                    .filter(|c| Path::new("/sys/fs/cgroup").join(c).is_dir())
                    .map(|c| {
                        let base = own(Some(c));
                        (
                            *c,
                            Path::new("/sys/fs/cgroup")
                                .join(c)
                                .join(base.trim_start_matches('/'))
                                .join(name),
                        )
                    })
                    .collect();
                TestCgroup {
                    name: name.into(),
                    version,
                    dirs,
                    // Relative: beneath corrald's own cgroup, which is ours.
                    flag: name.into(),
                }
            }
            Version::V2 => {
                let base = v2_base();
                let dir = Path::new("/sys/fs/cgroup")
                    .join(base.trim_start_matches('/'))
                    .join(name);
                TestCgroup {
                    name: name.into(),
                    version,
                    dirs: vec![("unified", dir)],
                    flag: format!("{}/{name}", base.trim_end_matches('/')),
                }
            }
        }
    }

    /// The value for `corrald --cgroup-parent`.
    pub fn flag(&self) -> &str {
        &self.flag
    }

    /// Directory of `rel` (e.g. `corral/web/web-0`) in the hierarchy holding `controller`.
    pub fn dir(&self, controller: &str, rel: &str) -> PathBuf {
        let base = match self.version {
            Version::V1 => {
                &self
                    .dirs
                    .iter()
                    .find(|(c, _)| *c == controller)
                    .expect("known controller")
                    .1
            }
            Version::V2 => &self.dirs[0].1,
        };
        base.join(rel)
    }

    /// A kernel file of `rel`, trimmed; empty when absent.
    pub fn read(&self, controller: &str, rel: &str, file: &str) -> String {
        std::fs::read_to_string(self.dir(controller, rel).join(file))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// True when `rel` exists in any hierarchy.
    pub fn exists(&self, rel: &str) -> bool {
        self.dirs.iter().any(|(_, d)| d.join(rel).exists())
    }

    /// The hierarchies (v1: by controller; v2: `unified`) whose `rel` does not hold `pid`.
    pub fn missing(&self, rel: &str, pid: i32) -> Vec<&'static str> {
        self.dirs
            .iter()
            .filter(|(_, d)| {
                !std::fs::read_to_string(d.join(rel).join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.trim().parse() == Ok(pid))
            })
            .map(|(c, _)| *c)
            .collect()
    }

    /// Every PID in `rel` and below, across hierarchies.
    pub fn pids(&self, rel: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for (_, d) in &self.dirs {
            collect_pids(&d.join(rel), &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kill every process beneath the test cgroup and remove all its directories.
    pub fn destroy(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, d) in &self.dirs {
            loop {
                let mut pids = Vec::new();
                collect_pids(d, &mut pids);
                if pids.is_empty() || Instant::now() > deadline {
                    break;
                }
                for p in pids {
                    // SAFETY: the PID is in a cgroup this test made.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            remove_tree(d, deadline);
        }
    }
}

/// The PIDs in `dir`'s `cgroup.procs` and in those of every cgroup beneath it.
pub fn collect_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_tree(dir: &Path, deadline: Instant) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path(), deadline);
            }
        }
    }
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
