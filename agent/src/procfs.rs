//! Parsers of the kernel's `/proc` files that several parts of the agent read:
//! `/proc/<pid>/mountinfo` and `/proc/<pid>/cgroup`, as pure functions over their text.
//!
//! Imports from the crate: nothing.

use std::path::{Component, PathBuf};

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
    fn unescape_edge_cases() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\777"), "\\777"); // not a byte
        assert_eq!(unescape("\\x41"), "\\x41");
        assert_eq!(unescape(""), "");
    }
}
