//! Helpers for the tests that run against the real kernel: a guard that removes the test's
//! cgroup parent (everything beneath it, innermost first) and ends the test's child processes
//! by pid even when an assertion fails, and starting children inside a cgroup the way the
//! agent does (writing "0" to each `cgroup.procs` between fork and exec) or moving them in
//! afterwards by pid.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

/// The unique name of a test's cgroup parent.
pub(super) fn unique_parent(test: &str) -> String {
    format!("corral-test-{}-{test}", std::process::id())
}

/// Removes, on drop, the test parent directories (one per hierarchy) and all cgroups
/// beneath them, after killing and reaping the children it holds.
#[derive(Debug, Default)]
pub(super) struct Cleanup {
    pub(super) dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Cleanup {
    pub(super) fn new(dirs: Vec<PathBuf>) -> Cleanup {
        Cleanup {
            dirs,
            children: Vec::new(),
        }
    }

    /// Keeps `child` so that it is killed (by its pid) if the test ends early; returns its pid.
    pub(super) fn adopt(&mut self, child: Child) -> i32 {
        let pid = i32::try_from(child.id()).expect("pids fit in i32");
        self.children.push(child);
        pid
    }

    /// Waits for the adopted child `pid` to end and returns how.
    pub(super) fn reap(&mut self, pid: i32) -> ExitStatus {
        let i = self
            .children
            .iter()
            .position(|c| i32::try_from(c.id()).ok() == Some(pid))
            .expect("an adopted child");
        let mut child = self.children.swap_remove(i);
        child.wait().expect("wait for the child")
    }
}

/// Kills, by pid, every process listed in the test's cgroup `dir` and below: they were all
/// started by the test (its children and their descendants).
fn kill_tree(dir: &Path) {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            kill_tree(&entry.path());
        }
    }
}

/// Removes `dir` and the cgroups below it, innermost first, giving killed processes a
/// moment to exit (rmdir says EBUSY until they have).
fn remove_tree(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    for _ in 0..200 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("cleanup: cannot remove {}: {e}", dir.display());
                return;
            }
            _ => return,
        }
    }
    eprintln!("cleanup: {} stays busy", dir.display());
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            // Child::kill signals this child's own pid.
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            kill_tree(dir);
        }
        for dir in &self.dirs {
            remove_tree(dir);
        }
    }
}

/// Starts `argv` inside the cgroup whose `cgroup.procs` files are `procs`: the child writes
/// "0" (itself) to each before it executes the program.
pub(super) fn spawn_inside(procs: &[OwnedFd], argv: &[&str]) -> Child {
    let fds: Vec<i32> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: the closure runs between fork and exec; it only calls write(2), which is
    // async-signal-safe, on descriptors that stay open in the parent until spawn returns,
    // and builds its error from errno without allocating on success.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {argv:?} inside the cgroup: {e}"))
}

/// A shell command that keeps allocating memory until it has 256 MiB (or is OOM-killed).
pub(super) const MEMORY_HOG: &[&str] = &[
    "sh",
    "-c",
    "x=$(head -c 268435456 /dev/zero | tr '\\0' x); echo ${#x}",
];

/// Starts `sleep 30` where the test runs and moves it into the cgroup by writing its pid to
/// each of `procs`.
pub(super) fn spawn_and_move(procs: Vec<OwnedFd>) -> Child {
    let child = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    for fd in procs {
        let mut f = fs::File::from(fd);
        f.write_all(child.id().to_string().as_bytes())
            .expect("move the child in by pid");
    }
    child
}

/// Waits until process `pid` sleeps (state `S` in `/proc/<pid>/stat`): by then the kernel has
/// accounted the CPU time it used to start.
pub(super) fn wait_asleep(pid: i32) {
    for _ in 0..500 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ...: the state follows the last ')'.
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("process {pid} never went to sleep");
}

/// Waits until the cgroup `path` has no processes left (killed ones take a moment to exit).
pub(super) fn wait_until_empty(b: &dyn super::CgroupBackend, path: &super::CgroupPath) {
    for _ in 0..500 {
        if b.procs(path).expect("procs").is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("cgroup {path} never emptied");
}

/// A kernel file's content, trimmed.
pub(super) fn read(file: &Path) -> String {
    fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
        .trim()
        .to_string()
}

/// Whether the test runs as root.
pub(super) fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Descriptors this process holds open on files in the directories `dirs` (each counted once).
pub(super) fn fds_in(dirs: &[&Path]) -> usize {
    let mut dirs: Vec<&Path> = dirs.to_vec();
    dirs.sort();
    dirs.dedup();
    fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.parent().is_some_and(|p| dirs.contains(&p)))
        .count()
}
