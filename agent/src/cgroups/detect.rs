//! Start-up detection: which cgroup version the host runs (statfs of `/sys/fs/cgroup`: cgroup2
//! means v2; anything else, hybrid hosts included, means v1 and an empty unified mount is
//! ignored), where the hierarchies are mounted (`/proc/self/mountinfo`), where the agent itself
//! is (`/proc/self/cgroup`), and from these where the agent's parent cgroup is:
//!
//! - no `--cgroup-parent`: the agent's own cgroup, in each hierarchy;
//! - a relative one (`e2e-1/x`): beneath the agent's own cgroup, in each hierarchy;
//! - an absolute one (`/corral.slice`): that path in every hierarchy.
//!
//! On v2, an own cgroup named `corrald` is the leaf the agent moved itself into on an earlier
//! start, so its parent stands for the agent's own cgroup. Parsing and resolution are pure
//! functions over the files' text; [`detect`] reads them and builds the backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::v1::{V1Backend, V1Hierarchy, V1Layout};
use super::v2::{AGENT_LEAF, V2Backend};
use super::{CgroupBackend, CgroupError, CgroupVersion, CpuCgroup};
use crate::procfs::{MountInfo, ProcCgroup, mount_relative, parse_mountinfo, parse_proc_cgroup};

/// Where the cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers the agent uses, as named in mount options and `/proc/self/cgroup`.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "devices"];

/// Detects the host's cgroups and returns the backend, its parent cgroup created and ready,
/// with instances scheduled per service ([`CpuCgroup::PerService`]).
pub fn detect(cgroup_parent: Option<&str>) -> Result<Arc<dyn CgroupBackend>, CgroupError> {
    detect_with(cgroup_parent, CpuCgroup::PerService)
}

/// [`detect`], with `cpu` saying where instances with no CPU quota are scheduled.
pub fn detect_with(
    cgroup_parent: Option<&str>,
    cpu: CpuCgroup,
) -> Result<Arc<dyn CgroupBackend>, CgroupError> {
    let backend: Arc<dyn CgroupBackend> = match plan_host(cgroup_parent)? {
        Plan::V1(layout) => Arc::new(V1Backend::new(layout)?.with_cpu_cgroup(cpu)),
        Plan::V2 { mount, parent } => Arc::new(V2Backend::new(mount, parent)?.with_cpu_cgroup(cpu)),
    };
    let caps = backend.capabilities();
    let available: Vec<&str> = caps.available.iter().map(|c| c.as_str()).collect();
    tracing::info!(version = caps.version.as_str(), parent = %caps.parent, available = ?available, "cgroups ready");
    for (control, reason) in &caps.unavailable {
        tracing::warn!(control = control.as_str(), %reason, "cgroup control unavailable");
    }
    Ok(backend)
}

/// What [`detect`] builds: a v1 layout, or the v2 mount and parent (relative to the mount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    V1(V1Layout),
    V2 { mount: PathBuf, parent: PathBuf },
}

/// The plan for this host: its cgroup version and this process's mountinfo and cgroups.
pub fn plan_host(cgroup_parent: Option<&str>) -> Result<Plan, CgroupError> {
    let stat = nix::sys::statfs::statfs(CGROUP_ROOT)
        .map_err(|e| CgroupError::Setup(format!("statfs {CGROUP_ROOT}: {e}")))?;
    let version = if stat.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    };
    let read = |file: &str| {
        std::fs::read(file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| CgroupError::Setup(format!("reading {file}: {e}")))
    };
    plan(
        version,
        &read("/proc/self/mountinfo")?,
        &read("/proc/self/cgroup")?,
        cgroup_parent,
    )
}

/// The plan for a host of `version` whose mountinfo and `/proc/self/cgroup` read as given.
pub fn plan(
    version: CgroupVersion,
    mountinfo: &str,
    proc_cgroup: &str,
    cgroup_parent: Option<&str>,
) -> Result<Plan, CgroupError> {
    let flag = ParentFlag::parse(cgroup_parent)?;
    let mounts = parse_mountinfo(mountinfo);
    let cgroups = parse_proc_cgroup(proc_cgroup);
    match version {
        CgroupVersion::V2 => {
            let mount = mounts
                .iter()
                .rev()
                .find(|m| m.fs_type == "cgroup2" && m.mount_point == Path::new(CGROUP_ROOT))
                .ok_or_else(|| {
                    CgroupError::Setup(format!("no cgroup2 mount at {CGROUP_ROOT} in mountinfo"))
                })?;
            let own = cgroups
                .iter()
                .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
                .ok_or_else(|| "/proc/self/cgroup has no \"0::\" line".to_string())
                .and_then(ProcCgroup::live)
                .map(|own| match own.rsplit_once('/') {
                    Some(("", AGENT_LEAF)) => "/",
                    Some((up, AGENT_LEAF)) => up,
                    _ => own,
                });
            let parent = flag.resolve(own, "the unified hierarchy")?;
            let rel = mount_relative(&parent, &mount.root).ok_or_else(|| {
                CgroupError::Setup(format!(
                    "cgroup {parent} is outside the cgroup2 mount at {CGROUP_ROOT} (root {})",
                    mount.root
                ))
            })?;
            Ok(Plan::V2 {
                mount: mount.mount_point.clone(),
                parent: rel,
            })
        }
        CgroupVersion::V1 => {
            let mut found = V1_CONTROLLERS.map(|_| None);
            for (slot, name) in found.iter_mut().zip(V1_CONTROLLERS) {
                *slot = v1_hierarchy(&mounts, &cgroups, &flag, name)?;
            }
            let [cpu, cpuacct, memory, pids, devices] = found;
            Ok(Plan::V1(V1Layout {
                cpu,
                cpuacct,
                memory,
                pids,
                devices,
            }))
        }
    }
}

/// Where the v1 hierarchy of `controller` is mounted and where the parent is in it; `None`
/// when it is not mounted.
fn v1_hierarchy(
    mounts: &[MountInfo],
    cgroups: &[ProcCgroup],
    flag: &ParentFlag<'_>,
    controller: &str,
) -> Result<Option<V1Hierarchy>, CgroupError> {
    let candidates: Vec<&MountInfo> = mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == controller))
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let own = cgroups
        .iter()
        .find(|c| c.controllers.iter().any(|n| n == controller))
        .ok_or_else(|| format!("/proc/self/cgroup has no line for {controller}"))
        .and_then(ProcCgroup::live);
    let parent = flag.resolve(own, controller)?;
    // Several mounts of one hierarchy (bind mounts): take one that shows the parent.
    candidates
        .iter()
        .find_map(|m| {
            mount_relative(&parent, &m.root).map(|rel| V1Hierarchy::new(&m.mount_point, rel))
        })
        .map(Some)
        .ok_or_else(|| {
            CgroupError::Setup(format!(
                "cgroup {parent} is outside every mount of the {controller} hierarchy"
            ))
        })
}

/// A `--cgroup-parent` value, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ParentFlag<'a> {
    /// None given: the agent's own cgroup.
    Own,
    /// Relative: beneath the agent's own cgroup.
    Below(Vec<&'a str>),
    /// Absolute: this cgroup in every hierarchy.
    At(Vec<&'a str>),
}

impl<'a> ParentFlag<'a> {
    fn parse(flag: Option<&'a str>) -> Result<ParentFlag<'a>, CgroupError> {
        let Some(flag) = flag else {
            return Ok(ParentFlag::Own);
        };
        let bad = |why: &str| CgroupError::Setup(format!("--cgroup-parent {flag:?}: {why}"));
        if flag.is_empty() {
            return Err(bad("must not be empty"));
        }
        let parts: Vec<&str> = flag.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(bad("must not contain \".\" or \"..\""));
        }
        if flag.contains('\n') || flag.contains('\0') {
            return Err(bad("must not contain newlines or NUL"));
        }
        if flag.starts_with('/') {
            Ok(ParentFlag::At(parts))
        } else {
            Ok(ParentFlag::Below(parts))
        }
    }

    /// The parent as a cgroup path (`/a/b`, as `/proc/self/cgroup` shows them), given the
    /// agent's own cgroup in `hierarchy` (or why it is unknown).
    fn resolve(&self, own: Result<&str, String>, hierarchy: &str) -> Result<String, CgroupError> {
        let own = || {
            own.clone().map_err(|why| {
                CgroupError::Setup(format!(
                    "cannot place the cgroup parent beneath corrald's own cgroup in {hierarchy}: \
                     {why}; pass an absolute --cgroup-parent"
                ))
            })
        };
        let join = |base: &str, parts: &[&str]| {
            let mut s = base.trim_end_matches('/').to_string();
            for p in parts {
                s.push('/');
                s.push_str(p);
            }
            if s.is_empty() { "/".to_string() } else { s }
        };
        match self {
            ParentFlag::Own => Ok(join(own()?, &[])),
            ParentFlag::Below(parts) => Ok(join(own()?, parts)),
            ParentFlag::At(parts) => Ok(join("", parts)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kind of host: hybrid, cpu and cpuacct mounted apart, an empty unified mount.
    const HYBRID_MOUNTINFO: &str = "\
22 1 0:20 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/1b8a9eac
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
";

    /// A pure v2 systemd host, the agent a service with Delegate=yes.
    const V2_MOUNTINFO: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const V2_CGROUP: &str = "0::/system.slice/corrald.service\n";

    /// An older systemd host with cpu and cpuacct co-mounted.
    const COMOUNT_MOUNTINFO: &str = "\
25 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:3 - tmpfs tmpfs ro,mode=755
26 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:4 - cgroup cgroup rw,xattr,name=systemd
30 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu,cpuacct
31 25 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
32 25 0:31 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,pids
";
    const COMOUNT_CGROUP: &str = "\
11:pids:/system.slice/corrald.service
4:memory:/system.slice/corrald.service
3:cpu,cpuacct:/system.slice/corrald.service
1:name=systemd:/system.slice/corrald.service
";

    fn h(mount: &str, parent: &str) -> Option<V1Hierarchy> {
        Some(V1Hierarchy::new(mount, parent))
    }

    #[test]
    fn hybrid_host_own_cgroup_per_hierarchy() {
        let got = plan(CgroupVersion::V1, HYBRID_MOUNTINFO, HYBRID_CGROUP, None).expect("plan");
        assert_eq!(
            got,
            Plan::V1(V1Layout {
                cpu: h("/sys/fs/cgroup/cpu", ""),
                cpuacct: h("/sys/fs/cgroup/cpuacct", ""),
                memory: h("/sys/fs/cgroup/memory", "process_api/1b8a9eac"),
                pids: h("/sys/fs/cgroup/pids", ""),
                devices: h("/sys/fs/cgroup/devices", ""),
            })
        );
    }

    #[test]
    fn hybrid_host_relative_and_absolute_parent() {
        let got = plan(
            CgroupVersion::V1,
            HYBRID_MOUNTINFO,
            HYBRID_CGROUP,
            Some("e2e-1/x"),
        )
        .expect("plan");
        assert_eq!(
            got,
            Plan::V1(V1Layout {
                cpu: h("/sys/fs/cgroup/cpu", "e2e-1/x"),
                cpuacct: h("/sys/fs/cgroup/cpuacct", "e2e-1/x"),
                memory: h("/sys/fs/cgroup/memory", "process_api/1b8a9eac/e2e-1/x"),
                pids: h("/sys/fs/cgroup/pids", "e2e-1/x"),
                devices: h("/sys/fs/cgroup/devices", "e2e-1/x"),
            })
        );
        let got = plan(
            CgroupVersion::V1,
            HYBRID_MOUNTINFO,
            HYBRID_CGROUP,
            Some("/corral.slice/"),
        )
        .expect("plan");
        assert_eq!(
            got,
            Plan::V1(V1Layout {
                cpu: h("/sys/fs/cgroup/cpu", "corral.slice"),
                cpuacct: h("/sys/fs/cgroup/cpuacct", "corral.slice"),
                memory: h("/sys/fs/cgroup/memory", "corral.slice"),
                pids: h("/sys/fs/cgroup/pids", "corral.slice"),
                devices: h("/sys/fs/cgroup/devices", "corral.slice"),
            })
        );
    }

    #[test]
    fn pure_v2_systemd_service() {
        let table: &[(&str, Option<&str>, &str)] = &[
            (V2_CGROUP, None, "system.slice/corrald.service"),
            // a later start: the agent sits in the leaf it moved into
            (
                "0::/system.slice/corrald.service/corrald\n",
                None,
                "system.slice/corrald.service",
            ),
            (V2_CGROUP, Some("e2e"), "system.slice/corrald.service/e2e"),
            (
                "0::/system.slice/corrald.service/corrald\n",
                Some("e2e/x"),
                "system.slice/corrald.service/e2e/x",
            ),
            (V2_CGROUP, Some("/corral.slice"), "corral.slice"),
            (V2_CGROUP, Some("/"), ""),
            ("0::/\n", None, ""),
            ("0::/corrald\n", None, ""),
            // only the last component counts
            ("0::/corrald/x\n", None, "corrald/x"),
            ("0::/x/corrald.service\n", None, "x/corrald.service"),
        ];
        for (cgroup, flag, want) in table {
            let got = plan(CgroupVersion::V2, V2_MOUNTINFO, cgroup, *flag).expect("plan");
            assert_eq!(
                got,
                Plan::V2 {
                    mount: PathBuf::from("/sys/fs/cgroup"),
                    parent: PathBuf::from(want),
                },
                "{cgroup:?} {flag:?}"
            );
        }
    }

    #[test]
    fn v2_ignores_the_unified_mount_of_a_hybrid_host() {
        // Only a mount at /sys/fs/cgroup counts on v2.
        let err = plan(CgroupVersion::V2, HYBRID_MOUNTINFO, HYBRID_CGROUP, None)
            .expect_err("no cgroup2 at /sys/fs/cgroup");
        assert!(err.to_string().contains("no cgroup2 mount"), "{err}");
    }

    #[test]
    fn comounted_cpu_cpuacct_share_a_directory() {
        let got = plan(CgroupVersion::V1, COMOUNT_MOUNTINFO, COMOUNT_CGROUP, None).expect("plan");
        let both = h("/sys/fs/cgroup/cpu,cpuacct", "system.slice/corrald.service");
        assert_eq!(
            got,
            Plan::V1(V1Layout {
                cpu: both.clone(),
                cpuacct: both,
                memory: h("/sys/fs/cgroup/memory", "system.slice/corrald.service"),
                pids: h("/sys/fs/cgroup/pids", "system.slice/corrald.service"),
                devices: None,
            })
        );
    }

    #[test]
    fn deleted_own_cgroup() {
        let cgroup = "0::/system.slice/old.service (deleted)\n";
        let parsed = parse_proc_cgroup(cgroup);
        assert_eq!(parsed[0].path, "/system.slice/old.service");
        assert!(parsed[0].deleted);
        for flag in [None, Some("x")] {
            let err = plan(CgroupVersion::V2, V2_MOUNTINFO, cgroup, flag).expect_err("deleted");
            assert!(err.to_string().contains("was deleted"), "{err}");
            assert!(
                err.to_string().contains("absolute --cgroup-parent"),
                "{err}"
            );
        }
        // An absolute parent does not need the agent's own cgroup.
        let got = plan(
            CgroupVersion::V2,
            V2_MOUNTINFO,
            cgroup,
            Some("/corral.slice"),
        )
        .expect("absolute");
        assert_eq!(
            got,
            Plan::V2 {
                mount: PathBuf::from("/sys/fs/cgroup"),
                parent: PathBuf::from("corral.slice"),
            }
        );
    }

    #[test]
    fn escaped_spaces_and_paths_with_spaces() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /mnt/cgroup\\040memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 /a\\134b\\011c /mnt/odd rw,relatime - cgroup cgroup rw,pids
";
        let mounts = parse_mountinfo(mountinfo);
        assert_eq!(mounts[1].mount_point, PathBuf::from("/mnt/cgroup memory"));
        assert_eq!(mounts[2].root, "/a\\b\tc");
        let cgroup = "4:memory:/my slice/job 1\n8:pids:/a\\b\tc/x\n";
        let got = plan(CgroupVersion::V1, mountinfo, cgroup, None).expect("plan");
        assert_eq!(
            got,
            Plan::V1(V1Layout {
                cpu: None,
                cpuacct: None,
                memory: h("/mnt/cgroup memory", "my slice/job 1"),
                pids: h("/mnt/odd", "x"),
                devices: None,
            })
        );
    }

    #[test]
    fn container_without_cgroup_namespace() {
        // The mount shows only the container's subtree; /proc/self/cgroup the full path.
        let mountinfo = "\
900 800 0:32 /docker/abc123 /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime master:15 - cgroup cgroup rw,memory
";
        let got = plan(
            CgroupVersion::V1,
            mountinfo,
            "4:memory:/docker/abc123\n",
            Some("agent"),
        )
        .expect("plan");
        assert_eq!(
            got,
            Plan::V1(V1Layout {
                memory: h("/sys/fs/cgroup/memory", "agent"),
                ..V1Layout::default()
            })
        );
        let err = plan(
            CgroupVersion::V1,
            mountinfo,
            "4:memory:/docker/abc123\n",
            Some("/elsewhere"),
        )
        .expect_err("outside the mount");
        assert!(err.to_string().contains("outside every mount"), "{err}");
    }

    #[test]
    fn mounted_hierarchy_without_own_line() {
        let err = plan(CgroupVersion::V1, HYBRID_MOUNTINFO, "4:memory:/x\n", None)
            .expect_err("no cpu line");
        assert!(err.to_string().contains("no line for cpu"), "{err}");
    }

    #[test]
    fn bad_parent_flags() {
        for flag in ["", "../x", "a/../b", "./a", "/a/./b", "a\nb"] {
            let err = plan(CgroupVersion::V2, V2_MOUNTINFO, V2_CGROUP, Some(flag)).expect_err(flag);
            assert!(
                err.to_string().contains("--cgroup-parent"),
                "{flag:?}: {err}"
            );
        }
    }

    #[test]
    fn mountinfo_lines() {
        let mounts = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue\n\
             garbage line\n\
             37 35 0:40 /gone\\040(deleted) /m rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(
            mounts,
            vec![
                MountInfo {
                    root: "/mnt1".into(),
                    mount_point: "/mnt2".into(),
                    fs_type: "ext3".into(),
                    super_options: vec!["rw".into(), "errors=continue".into()],
                },
                MountInfo {
                    root: "/gone".into(),
                    mount_point: "/m".into(),
                    fs_type: "cgroup".into(),
                    super_options: vec!["rw".into(), "memory".into()],
                },
            ]
        );
    }

    #[test]
    fn proc_cgroup_lines() {
        let got = parse_proc_cgroup("3:cpu,cpuacct:/a:b\n1:name=systemd:/\n0::/x\nbad\n");
        assert_eq!(
            got,
            vec![
                ProcCgroup {
                    hierarchy: 3,
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                    path: "/a:b".into(),
                    deleted: false,
                },
                ProcCgroup {
                    hierarchy: 1,
                    controllers: vec!["name=systemd".into()],
                    path: "/".into(),
                    deleted: false,
                },
                ProcCgroup {
                    hierarchy: 0,
                    controllers: vec![],
                    path: "/x".into(),
                    deleted: false,
                },
            ]
        );
    }
}
