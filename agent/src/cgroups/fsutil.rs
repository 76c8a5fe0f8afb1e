//! File-level helpers shared by the v1 and v2 backends: reading and writing one cgroupfs
//! value, parsing flat-keyed files (`memory.events`, `memory.oom_control`, `cpu.stat`) and
//! `cgroup.procs`, making or removing cgroup directories through [`CgroupDirs`] (the seam that
//! lets tests put a fake kernel in place of cgroupfs), the SIGKILL pass over a cgroup's
//! processes, and a spec's limits in the kernel's units ([`Limits`]). No cgroups-rs here, and
//! no knowledge of which controller a file belongs to.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::CgroupError;

/// How cgroup directories come and go. On cgroupfs `mkdir` makes the kernel populate the
/// control files and `rmdir` removes a cgroup that has no tasks and no children; a test fake
/// imitates both in a temporary directory.
pub(super) trait CgroupDirs: Send + Sync + fmt::Debug {
    fn mkdir(&self, dir: &Path) -> io::Result<()>;
    fn rmdir(&self, dir: &Path) -> io::Result<()>;
    /// Writes `change` (`+cpu +memory`, `-cpu`) to the v2 `cgroup.subtree_control` `file`: the
    /// kernel applies it to what is on, all or nothing.
    fn subtree_control(&self, file: &Path, change: &str) -> io::Result<()> {
        write_value(file, change)
    }
}

/// The real cgroup filesystems.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cgroupfs;

impl CgroupDirs for Cgroupfs {
    fn mkdir(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir(dir)
    }

    fn rmdir(&self, dir: &Path) -> io::Result<()> {
        fs::remove_dir(dir)
    }
}

/// The file's content without surrounding whitespace.
pub(super) fn read_trimmed(file: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(file)?.trim().to_string())
}

/// Writes `value` to an existing file in one `write`, never creating it: on cgroupfs a missing
/// control file means a missing controller, and creating a plain file would hide that.
/// (`O_TRUNC` is ignored by cgroupfs and keeps plain files exact.)
pub(super) fn write_value(file: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)?;
    f.write_all(value.as_bytes())
}

/// An owned copy of an `io::Error` (which is not `Clone`), keeping the OS error code.
pub(super) fn clone_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// An `InvalidData` error for a file whose content cannot be understood.
pub(super) fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The value of `key` in a flat-keyed file (`key value` per line, as in `memory.events`,
/// `memory.oom_control`, `cpu.stat`). Other lines are not looked at, so a kernel adding keys
/// of another shape does not break the lookup.
pub(super) fn keyed_u64(text: &str, key: &str) -> Result<u64, String> {
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some(key) {
            continue;
        }
        let value = parts
            .next()
            .ok_or_else(|| format!("line {line:?} has no value"))?;
        if parts.next().is_some() {
            return Err(format!("line {line:?} has more than one value"));
        }
        return value
            .parse::<u64>()
            .map_err(|e| format!("line {line:?}: {value:?} is not a count: {e}"));
    }
    Err(format!("no {key:?} line"))
}

/// `key`'s value in a flat-keyed file's text, or 0 when the kernel writes no such line
/// (`cpu.stat` has the throttling lines only where the CPU controller is on).
pub(super) fn keyed_u64_or_zero(text: &str, key: &str) -> Result<u64, String> {
    if text
        .lines()
        .any(|l| l.split_whitespace().next() == Some(key))
    {
        keyed_u64(text, key)
    } else {
        Ok(0)
    }
}

/// Limits at or above this (1 EiB) read as none: v1 writes "unlimited" as the largest page
/// multiple below 2^63 (9223372036854771712).
pub(super) const UNLIMITED_BYTES: u64 = 1 << 60;

/// A single unsigned integer, as in `memory.current` or `cpuacct.usage`.
pub(super) fn parse_u64(text: &str) -> Result<u64, String> {
    let t = text.trim();
    t.parse::<u64>()
        .map_err(|e| format!("{t:?} is not an unsigned integer: {e}"))
}

/// The pids of a `cgroup.procs` file, one per line.
pub(super) fn parse_pids(text: &str) -> Result<Vec<i32>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| match l.parse::<i32>() {
            Ok(pid) if pid > 0 => Ok(pid),
            _ => Err(format!("{l:?} is not a pid")),
        })
        .collect()
}

/// The value on line `key` of `file`, a keyed file of cgroup `path` (`memory.events`,
/// `memory.oom_control`), read once.
pub(super) fn read_keyed_u64(path: &str, file: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = fs::read_to_string(file).map_err(|e| read_err(path, file, e))?;
    parsed(path, file, keyed_u64(&text, key))
}

/// Parses a control file's text, naming the cgroup and the file.
pub(super) fn parsed<T>(
    path: &str,
    file: &Path,
    value: Result<T, String>,
) -> Result<T, CgroupError> {
    value.map_err(|msg| read_err(path, file, invalid_data(msg)))
}

/// The pids in `dir/cgroup.procs`; `None` when the cgroup does not exist.
pub(super) fn read_procs(path: &str, dir: &Path) -> Result<Option<Vec<i32>>, CgroupError> {
    read_ids(path, dir, "cgroup.procs")
}

/// The thread ids in the v1 `dir/tasks`; `None` when the cgroup does not exist.
pub(super) fn read_tasks(path: &str, dir: &Path) -> Result<Option<Vec<i32>>, CgroupError> {
    read_ids(path, dir, "tasks")
}

fn read_ids(path: &str, dir: &Path, name: &str) -> Result<Option<Vec<i32>>, CgroupError> {
    let file = dir.join(name);
    match fs::read_to_string(&file) {
        Ok(text) => parse_pids(&text)
            .map(Some)
            .map_err(|msg| read_err(path, &file, invalid_data(msg))),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => Ok(None),
        Err(source) => Err(read_err(path, &file, source)),
    }
}

/// [`write_value`], its failure as the cgroup's `Write` error.
pub(super) fn write_control(path: &str, file: PathBuf, value: String) -> Result<(), CgroupError> {
    write_value(&file, &value).map_err(|source| CgroupError::Write {
        path: path.to_string(),
        file,
        value,
        source,
    })
}

pub(super) fn read_err(path: &str, file: &Path, source: io::Error) -> CgroupError {
    CgroupError::Read {
        path: path.to_string(),
        file: file.to_path_buf(),
        source,
    }
}

/// Creates `base/rel` one component at a time, appending every directory it made to
/// `created` (outermost first) so that a caller can undo exactly its own work. Directories
/// that already exist are kept. `base` itself must exist.
pub(super) fn create_dirs(
    dirs: &dyn CgroupDirs,
    base: &Path,
    rel: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<(), (PathBuf, io::Error)> {
    // Most creates are of a leaf whose parents exist (an instance of a running service): one
    // mkdir, not one per level with a check of each existing one.
    let leaf = base.join(rel);
    match dirs.mkdir(&leaf) {
        Ok(()) => {
            created.push(leaf);
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && leaf.is_dir() => return Ok(()),
        Err(_) => {}
    }
    let mut dir = base.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        match dirs.mkdir(&dir) {
            Ok(()) => created.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err((dir, e)),
        }
    }
    Ok(())
}

/// Removes directories made by [`create_dirs`], innermost first. Used on a failure path: a
/// directory that cannot be removed is logged and left, the original error is what matters.
pub(super) fn remove_created(dirs: &dyn CgroupDirs, created: &[PathBuf]) {
    for dir in created.iter().rev() {
        if let Err(e) = dirs.rmdir(dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a cgroup made by a failed create");
        }
    }
}

/// The names of the subdirectories of `dir` (empty when `dir` does not exist). Names that are
/// not UTF-8 cannot be agent cgroups; they are logged and skipped.
pub(super) fn subdirs(path: &str, dir: &Path) -> Result<Vec<String>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(read_err(path, dir, source)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| read_err(path, dir, source))?;
        let is_dir = entry
            .file_type()
            .map_err(|source| read_err(path, &entry.path(), source))?
            .is_dir();
        if !is_dir {
            continue;
        }
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            Err(raw) => {
                tracing::warn!(dir = %dir.display(), name = ?raw, "skipping a cgroup whose name is not UTF-8");
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Sends SIGKILL to each of `pids` (the processes of the cgroup `path`). A process that is
/// already gone (ESRCH) is fine; other failures are reported after the whole pass.
pub(super) fn sigkill_all(path: &str, pids: &[i32]) -> Result<(), CgroupError> {
    use nix::errno::Errno;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let mut first_err = None;
    for &pid in pids {
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                first_err.get_or_insert(CgroupError::Kill {
                    path: path.to_string(),
                    pid,
                    source: io::Error::from_raw_os_error(e as i32),
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Removes the directories `dirs` of the cgroup `path` (one per v1 hierarchy, one on v2).
/// A directory that does not exist is fine; every directory is tried, the first failure is
/// returned (EBUSY while tasks or children remain, so that `is_busy()` holds).
pub(super) fn remove_all(
    fs: &dyn CgroupDirs,
    path: &str,
    dirs: impl IntoIterator<Item = PathBuf>,
) -> Result<(), CgroupError> {
    let mut first_err = None;
    for dir in dirs {
        match fs.rmdir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                first_err.get_or_insert(CgroupError::Remove {
                    path: path.to_string(),
                    dir,
                    source,
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `found` is what the kernel shows after `wanted` bytes were written to a memory limit: the
/// kernel keeps whole pages, so it may be lower by less than one page.
pub(super) fn memory_matches(wanted: u64, found: u64, page_size: u64) -> bool {
    found <= wanted && wanted - found < page_size.max(1)
}

/// The system page size (4096 when the kernel does not say, as on every Linux it runs on).
pub(super) fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(4096)
}

/// The CFS quota, in microseconds per 100 ms period, for `cpu` cores: rounded, at least
/// 1000 µs (the kernel's minimum is 1 ms).
pub(super) fn cpu_quota_us(cpu: f64) -> Result<i64, String> {
    cpu_quota_in(cpu, CPU_PERIOD_US)
}

/// The CFS quota, in microseconds per period of `period_us`, for `cpu` cores: rounded, at
/// least 1000 µs.
pub(super) fn cpu_quota_in(cpu: f64, period_us: u64) -> Result<i64, String> {
    if !cpu.is_finite() || cpu <= 0.0 {
        return Err(format!("cpu {cpu} is not a positive number of cores"));
    }
    let quota = (cpu * period_us as f64).round();
    // Keeps the conversion to i64 exact; 1e15 µs per period is 10^10 cores.
    if quota > 1e15 {
        return Err(format!("cpu {cpu} is too large"));
    }
    // Finite, positive and at most 1e15 (checked above): exact in an i64.
    #[allow(clippy::cast_possible_truncation)]
    let quota = quota as i64;
    Ok(quota.max(1000))
}

/// The limits of a spec in the kernel's units, validated before anything is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    pub(super) cpu_quota: Option<i64>,
    pub(super) memory: Option<i64>,
    pub(super) pids: Option<i64>,
}

impl Limits {
    pub(super) fn check(p: &str, res: &crate::spec::Resources) -> Result<Limits, CgroupError> {
        let invalid = |file: &str, value: String, msg: String| CgroupError::Write {
            path: p.to_string(),
            file: PathBuf::from(file),
            value,
            source: io::Error::new(io::ErrorKind::InvalidInput, msg),
        };
        let cpu_quota = res
            .cpu
            .map(|cpu| cpu_quota_us(cpu).map_err(|msg| invalid("cpu quota", cpu.to_string(), msg)))
            .transpose()?;
        let to_i64 = |what: &str, v: u64| {
            i64::try_from(v)
                .map_err(|_| invalid(what, v.to_string(), format!("{what} {v} is out of range")))
        };
        Ok(Limits {
            cpu_quota,
            memory: res.memory.map(|m| to_i64("memory limit", m)).transpose()?,
            pids: res.pids.map(|n| to_i64("pids limit", n)).transpose()?,
        })
    }
}

/// The CFS period the agent uses, microseconds (the kernel's default).
pub(super) const CPU_PERIOD_US: u64 = 100_000;

/// The quota to write for `cores` per `period_us` (`-1`: no limit), or why it is invalid.
pub(super) fn quota_or_unlimited(
    p: &str,
    cores: Option<f64>,
    period_us: u64,
) -> Result<i64, CgroupError> {
    let Some(cores) = cores else {
        return Ok(-1);
    };
    cpu_quota_in(cores, period_us).map_err(|msg| CgroupError::Write {
        path: p.to_string(),
        file: PathBuf::from("cpu quota"),
        value: cores.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidInput, msg),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_lookup() {
        let events = "low 0\nhigh 3\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_u64(events, "oom_kill"), Ok(1));
        assert_eq!(keyed_u64(events, "oom"), Ok(2));
        assert_eq!(keyed_u64(events, "high"), Ok(3));
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n";
        assert_eq!(keyed_u64(oom_control, "oom_kill"), Ok(4));
        let cpu_stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n\
                        nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n";
        assert_eq!(keyed_u64(cpu_stat, "usage_usec"), Ok(1_234_567));
    }

    #[test]
    fn keyed_errors() {
        assert!(keyed_u64("oom 1\n", "oom_kill").is_err_and(|e| e.contains("no \"oom_kill\"")));
        assert!(keyed_u64("oom_kill x\n", "oom_kill").is_err_and(|e| e.contains("not a count")));
        assert!(keyed_u64("oom_kill -1\n", "oom_kill").is_err());
        assert!(keyed_u64("oom_kill\n", "oom_kill").is_err_and(|e| e.contains("no value")));
        assert!(keyed_u64("oom_kill 1 2\n", "oom_kill").is_err());
        // other malformed lines do not matter
        assert_eq!(
            keyed_u64("weird line here\noom_kill 5\n", "oom_kill"),
            Ok(5)
        );
        assert_eq!(
            keyed_u64("", "oom_kill"),
            Err("no \"oom_kill\" line".to_string())
        );
    }

    #[test]
    fn pids_and_numbers() {
        assert_eq!(parse_pids("12\n345\n"), Ok(vec![12, 345]));
        assert_eq!(parse_pids(""), Ok(vec![]));
        assert_eq!(parse_pids("\n7\n\n"), Ok(vec![7]));
        assert!(parse_pids("12\nabc\n").is_err());
        assert!(parse_pids("0\n").is_err());
        assert_eq!(parse_u64("67108864\n"), Ok(67_108_864));
        assert!(parse_u64("max").is_err());
        assert!(parse_u64("").is_err());
    }

    #[test]
    fn memory_rounding() {
        let page = 4096;
        assert!(memory_matches(67_108_864, 67_108_864, page));
        assert!(memory_matches(67_108_964, 67_108_864, page));
        assert!(!memory_matches(67_108_864, 67_108_864 - 4096, page));
        assert!(!memory_matches(67_108_864, 67_108_865, page));
        assert!(!memory_matches(67_108_864, 9_223_372_036_854_771_712, page));
    }

    #[test]
    fn start_cpu_period_keeps_the_quota_at_1ms_or_more() {
        use super::super::start_cpu_period;
        for (cores, period) in [
            (0.3, 10_000),
            (0.1, 10_000),
            (2.0, 10_000),
            (0.05, 20_000),
            (0.03, 33_334),
            (0.01, 100_000),
        ] {
            assert_eq!(start_cpu_period(cores), period, "{cores}");
            let quota = cpu_quota_in(cores, period).expect("quota");
            assert!(quota >= 1000, "{cores}: {quota}");
        }
    }

    #[test]
    fn cpu_quota() {
        let table: &[(f64, Result<i64, ()>)] = &[
            (0.25, Ok(25_000)),
            (0.5, Ok(50_000)),
            (1.0, Ok(100_000)),
            (2.5, Ok(250_000)),
            (0.333_333, Ok(33_333)),
            (0.005, Ok(1000)),
            (0.0001, Ok(1000)),
            (0.0, Err(())),
            (-1.0, Err(())),
            (f64::NAN, Err(())),
            (f64::INFINITY, Err(())),
            (1e12, Err(())),
        ];
        for (cpu, want) in table {
            assert_eq!(cpu_quota_us(*cpu).map_err(|_| ()), *want, "cpu {cpu}");
        }
    }

    #[test]
    fn dirs_are_created_and_undone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir(tmp.path().join("a")).expect("mkdir a");
        let mut created = Vec::new();
        create_dirs(&Cgroupfs, tmp.path(), Path::new("a/b/c"), &mut created).expect("create");
        assert_eq!(
            created,
            vec![tmp.path().join("a/b"), tmp.path().join("a/b/c")]
        );
        remove_created(&Cgroupfs, &created);
        assert!(tmp.path().join("a").is_dir());
        assert!(!tmp.path().join("a/b").exists());
    }

    #[test]
    fn write_never_creates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = tmp.path().join("pids.max");
        let err = write_value(&f, "32").expect_err("missing file");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!f.exists());
        fs::write(&f, "max\n").expect("plant");
        write_value(&f, "32").expect("write");
        assert_eq!(read_trimmed(&f).expect("read"), "32");
    }
}
