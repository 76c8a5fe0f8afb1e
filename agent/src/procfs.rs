//! Parsers of the kernel's `/proc` files that several parts of the agent read:
//! `/proc/<pid>/mountinfo`, `/proc/<pid>/cgroup` and the CPU times of `/proc/<pid>/stat`, as
//! pure functions over their text, and [`cpu_time_ns`], which reads the latter.
//!
//! Imports from the crate: nothing.

use std::path::{Component, PathBuf};

/// The fields of a `/proc/<pid>/stat` line after the command name: index 0 is field 3 (the
/// state). The name, in parentheses, may itself hold spaces and parentheses.
pub fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().collect())
}

/// The CPU time in clock ticks of a process and of the children it has waited for (`utime`,
/// `stime`, `cutime`, `cstime` of `/proc/<pid>/stat`); `None` for text that is not such a line.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let fields = stat_fields(stat)?;
    // After the name: state (0), ..., utime (11), stime (12), cutime (13), cstime (14).
    let mut total = 0u64;
    for i in 11..=14 {
        let v: i64 = fields.get(i)?.parse().ok()?;
        total = total.saturating_add(u64::try_from(v).unwrap_or(0));
    }
    Some(total)
}

/// The kernel's clock ticks per second, in which `/proc/<pid>/stat` counts CPU time (100 when
/// the system does not say).
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// The CPU time of processes `pids` with what they have reaped, in nanoseconds: a process's
/// time passes to its parent's when the parent waits for it, so over the processes of an
/// instance, whose init reaps whatever is orphaned, the sum only grows. A process gone
/// meanwhile counts nothing.
pub fn cpu_time_ns(pids: &[i32]) -> u64 {
    let tick = clock_ticks_per_second();
    let ticks = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|text| stat_cpu_ticks(&text))
        .fold(0u64, u64::saturating_add);
    ticks.saturating_mul(1_000_000_000 / tick)
}

/// The directory of the cgroup `cgroup` (a `/a/b` path) relative to a mount whose root (field 4
/// of mountinfo) is `root`; `None` when the mount does not show it.
pub fn mount_relative(cgroup: &str, root: &str) -> Option<PathBuf> {
    let root = root.trim_end_matches('/');
    let rest = if root.is_empty() {
        cgroup
    } else if cgroup == root {
        ""
    } else {
        cgroup.strip_prefix(root)?.strip_prefix('/')?
    };
    let rel = PathBuf::from(rest.trim_start_matches('/'));
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(rel)
}

/// One line of `/proc/self/mountinfo`, the fields detection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mounted directory's path within its filesystem (field 4), e.g. `/` or, in a
    /// container without a cgroup namespace, `/docker/<id>`.
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: Vec<String>,
}

/// The lines of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    // id parent maj:min root mount-point options [optional...] - fstype source super-options
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = 6 + fields.get(6..)?.iter().position(|f| *f == "-")?;
    let root = unescape(fields.get(3)?);
    let root = root.strip_suffix(" (deleted)").unwrap_or(&root).to_string();
    Some(MountInfo {
        root,
        mount_point: PathBuf::from(unescape(fields.get(4)?)),
        fs_type: (*fields.get(sep + 1)?).to_string(),
        super_options: fields
            .get(sep + 3)?
            .split(',')
            .map(str::to_string)
            .collect(),
    })
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroup {
    pub hierarchy: u32,
    /// Empty for the v2 line (`0::/path`); `name=systemd` for named v1 hierarchies.
    pub controllers: Vec<String>,
    pub path: String,
    /// The kernel marked the cgroup ` (deleted)`: it was removed.
    pub deleted: bool,
}

impl ProcCgroup {
    /// The path of a cgroup that still exists, or why it cannot be used.
    pub fn live(&self) -> Result<&str, String> {
        if self.deleted {
            Err(format!("its cgroup {} was deleted", self.path))
        } else {
            Ok(&self.path)
        }
    }
}

/// The lines of a `/proc/<pid>/cgroup` file; malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let hierarchy = it.next()?.parse().ok()?;
            let controllers = it
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            let raw = it.next()?;
            let (path, deleted) = match raw.strip_suffix(" (deleted)") {
                Some(p) => (p, true),
                None => (raw, false),
            };
            path.starts_with('/').then(|| ProcCgroup {
                hierarchy,
                controllers,
                path: path.to_string(),
                deleted,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_of_a_stat_line() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 5 1 20 0 1 0 10 0 0";
        assert_eq!(stat_cpu_ticks(line), Some(16));
        for bad in [
            "",
            "42 (x",
            "42 (x) S 1 2",
            "42 (x) S 1 42 42 0 -1 0 0 0 0 0 a 3 5 1",
        ] {
            assert_eq!(stat_cpu_ticks(bad), None, "{bad:?}");
        }
        let me = i32::try_from(std::process::id()).expect("pid");
        assert!(cpu_time_ns(&[me, -1, i32::MAX]) < u64::MAX);
        assert_eq!(
            cpu_time_ns(&[-1, i32::MAX]),
            0,
            "a process gone counts nothing"
        );
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\777"), "\\777"); // not a byte
        assert_eq!(unescape("\\x41"), "\\x41");
        assert_eq!(unescape(""), "");
    }
}
