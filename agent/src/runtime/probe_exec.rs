//! The agent's side of exec health probes: each run clones `corral-init --exec -- COMMAND...`
//! (see [`super::probe_helper`]) into the instance's cgroup with the instance init's pidfd on
//! fd 3, the probe's configuration on fd 4 and the service's seccomp program on fd 5 (both
//! sealed memfds, made once: a probe only clones and executes), collects the last output,
//! and kills the helper when the probe is cut at its timeout; the command dies with it
//! (`PR_SET_PDEATHSIG`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use tokio::io::AsyncReadExt;

use super::ProcessStatus;
use super::clone::{ChildPlan, clone_exec, high, pidfd_signal, wait_pidfd};
use super::probe_helper::EXEC_FLAG;
use crate::health::{ExecResult, ExecRunner, output_tail};

/// Runs an instance's exec probes inside it.
#[derive(Debug)]
pub struct LinuxExec {
    pub(super) exe: CString,
    /// The instance init's PID: whether it has forked the service yet is read from its
    /// `/proc` entry (see [`LinuxExec::view_built`]).
    pub(super) init_pid: i32,
    /// Seen built once: later probes skip the read.
    pub(super) built: std::sync::atomic::AtomicBool,
    /// The instance init's pidfd (`None`: nothing to run in).
    pub(super) target: Option<Arc<OwnedFd>>,
    pub(super) procs: Vec<OwnedFd>,
    pub(super) cgroup_dir: Option<OwnedFd>,
    /// The helper's [`super::probe_helper::ProbeConfig`] in a sealed memfd, or why there is
    /// none (every probe then fails with that reason).
    pub(super) config: Result<OwnedFd, String>,
    /// The service's seccomp program in a sealed memfd, when it has one.
    pub(super) filter: Option<Arc<OwnedFd>>,
}

/// SIGKILL the helper (and so the command) if the probe is abandoned, and reap it.
struct KillOnDrop(Option<Arc<OwnedFd>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            let _ = pidfd_signal(&fd, libc::SIGKILL);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    wait_pidfd(fd, true).await;
                });
            }
        }
    }
}

impl LinuxExec {
    /// Start the helper; returns its pidfd and the read end of its output.
    fn start(&self, argv: &[String]) -> io::Result<(Arc<OwnedFd>, OwnedFd)> {
        let to_c = |s: &str| {
            CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
        };
        let config = self
            .config
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))?;
        let args_c = [super::INIT_NAME, EXEC_FLAG, "--"]
            .into_iter()
            .chain(argv.iter().map(String::as_str))
            .map(to_c)
            .collect::<io::Result<Vec<CString>>>()?;
        let argv_p = super::clone::pointers(&args_c);
        // The helper runs with an empty environment: the service's is in its configuration.
        let envp_p = [std::ptr::null::<libc::c_char>()];
        let extra: Vec<RawFd> = std::iter::once(config.as_raw_fd())
            .chain(self.filter.as_ref().map(|f| f.as_raw_fd()))
            .collect();
        let devnull = high(nix::fcntl::open(
            "/dev/null",
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?)?;
        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let out_w = high(out_w)?;
        let (_err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let err_w = high(err_w)?;
        let Some(target) = &self.target else {
            return Err(io::Error::other("the instance has no pidfd to enter it by"));
        };
        let target = high(target.try_clone()?)?;
        let procs: Vec<RawFd> = self.procs.iter().map(AsRawFd::as_raw_fd).collect();
        let plan = ChildPlan {
            procs: &procs,
            stdin: devnull.as_raw_fd(),
            stdout: out_w.as_raw_fd(),
            stderr: out_w.as_raw_fd(),
            fd3: target.as_raw_fd(),
            extra: &extra,
            new_cgroup_ns: false,
            wait_for: None,
            err_pipe: err_w.as_raw_fd(),
            exe: &self.exe,
            argv: &argv_p,
            envp: &envp_p,
        };
        let (_pid, pidfd) = clone_exec(0, self.cgroup_dir.as_ref(), &plan)?;
        drop((out_w, err_w, target, devnull));
        Ok((Arc::new(pidfd), out_r))
    }

    /// Whether the init has forked the service process: it does so only once the instance's
    /// view is built (the agent's directories masked, the minimal `/dev`, `/proc`'s kernel
    /// files covered). A helper that joined the mount namespace before then would run the
    /// probe command in a half-built view, the host's devices and the agent's state in sight.
    /// Once true it stays true for this init, so it is read only until then (a service that
    /// ends before it was ever seen leaves the probe waiting to its timeout, as a hung
    /// command would).
    fn view_built(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.built.load(Relaxed) {
            return true;
        }
        let pid = self.init_pid;
        let built = std::fs::read(format!("/proc/{pid}/task/{pid}/children"))
            .is_ok_and(|children| children.iter().any(u8::is_ascii_digit));
        if built {
            self.built.store(true, Relaxed);
        }
        built
    }

    async fn run_once(&self, argv: &[String]) -> io::Result<ExecResult> {
        // The first probe may be due within milliseconds of the start (a tenth of the
        // interval at most, jittered), while the init is still building the view.
        while !self.view_built() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (pidfd, out_r) = self.start(argv)?;
        let mut guard = KillOnDrop(Some(pidfd.clone()));
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r)?;
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 8192 {
                        tail.drain(..tail.len() - 4096);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let status = wait_pidfd(pidfd, true).await;
        guard.0 = None;
        let (code, signal) = match status {
            ProcessStatus::Exited(c) => (Some(c), None),
            ProcessStatus::Signaled(s) => (None, Some(s)),
            ProcessStatus::Unknown => (None, None),
        };
        Ok(ExecResult {
            code,
            signal,
            output_tail: output_tail(&tail),
        })
    }
}

impl ExecRunner for LinuxExec {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        _timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = io::Result<ExecResult>> + Send + 'a>> {
        // The caller cuts the probe at its timeout by dropping this future; the guard inside
        // then kills the helper and the command.
        Box::pin(self.run_once(argv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(init_pid: i32) -> LinuxExec {
        LinuxExec {
            exe: CString::new("/nonexistent").expect("no NUL"),
            init_pid,
            built: std::sync::atomic::AtomicBool::new(false),
            target: None,
            procs: Vec::new(),
            cgroup_dir: None,
            config: Err("not needed".to_string()),
            filter: None,
        }
    }

    /// A process with a child counts as an init that has built the view and forked its
    /// service; one without, or one that is gone, does not.
    #[test]
    fn the_view_counts_as_built_once_the_init_has_a_child() {
        let mut lone = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let mut parent = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("sh");
        let pid = |c: &std::process::Child| i32::try_from(c.id()).expect("a pid");
        assert!(!runner(pid(&lone)).view_built(), "no child yet");
        // Once seen built, it stays so for that init.
        let cached = runner(pid(&lone));
        cached
            .built
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(cached.view_built());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !runner(pid(&parent)).view_built() {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell's child never showed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = lone.kill();
        let _ = lone.wait();
        assert!(!runner(pid(&lone)).view_built(), "gone");
        // End the shell's child by its PID, then the shell.
        let p = pid(&parent);
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            // SAFETY: kill(2) of a process this test started (the shell's only child).
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        let _ = parent.kill();
        let _ = parent.wait();
    }
}
