//! Exec health probes, run inside the instance: the agent clones `corral-init --exec` into the
//! instance's cgroup with the instance init's pidfd on fd 3; that process joins the instance's
//! namespaces (`setns` through the pidfd), forks (a PID namespace applies to children), and
//! the child drops to the service's user, capabilities and limits and executes the probe
//! command. Its exit status is passed on as the helper's own (a signal is re-raised).
//!
//! The agent side ([`LinuxExec`]) collects the last output and kills the helper when the probe
//! is cut at its timeout; the command dies with it (`PR_SET_PDEATHSIG`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use tokio::io::AsyncReadExt;

use super::linux::{ChildPlan, clone_exec, high, wait_pidfd};
use super::privileges::{CapPlan, Privileges};
use super::{ProcessStatus, RUN_DIR_FD};
use crate::health::{ExecResult, ExecRunner, output_tail};

/// First argument of `corral-init` in exec-probe mode.
pub const EXEC_FLAG: &str = "--exec";

/// `corral-init --exec NSFLAGS UID GID CAPS NOFILE WORKDIR -- ARGV...` (UID/GID/NOFILE `-` for
/// unchanged, CAPS as [`CapPlan::to_arg`] writes it).
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("[corral-init] exec probe: {e}");
            ExitCode::from(126)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let (head, argv) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => return Err("no command".into()),
    };
    let [flags, uid, gid, caps, nofile, workdir] = head else {
        return Err(format!("bad arguments {head:?}"));
    };
    let flags =
        CloneFlags::from_bits_truncate(flags.parse::<i32>().map_err(|e| format!("flags: {e}"))?);
    let id = |s: &str| -> Result<Option<u32>, String> {
        if s == "-" {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|e| format!("id {s:?}: {e}"))
        }
    };
    let (uid, gid) = (id(uid)?, id(gid)?);
    let caps = CapPlan::from_arg(caps).ok_or_else(|| format!("capabilities {caps:?}"))?;
    let nofile = match nofile.as_str() {
        "-" => None,
        n => Some(n.parse::<u64>().map_err(|e| format!("nofile {n:?}: {e}"))?),
    };
    let privileges = Privileges {
        uid,
        gid,
        caps: Some(caps),
        nofile,
    };
    let argv = argv
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| "NUL in the command".to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    if argv.is_empty() {
        return Err("empty command".into());
    }
    let workdir = CString::new(workdir.as_str()).map_err(|_| "NUL in workdir".to_string())?;
    // SAFETY: fd 3 is the instance init's pidfd, placed by the agent; nothing else owns it.
    let target = unsafe { OwnedFd::from_raw_fd(RUN_DIR_FD) };
    if !flags.is_empty() {
        nix::sched::setns(target.as_fd(), flags)
            .map_err(|e| format!("joining the instance's namespaces: {e}"))?;
    }
    drop(target);
    // SAFETY: single-threaded process (just executed); the child may allocate before exec.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let e = exec_child(&argv, &workdir, &privileges);
            eprintln!("[corral-init] exec probe: {e}");
            // SAFETY: _exit is always safe.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    // Pass the signal on as our own end.
                    // SAFETY: restoring the default disposition before raising.
                    let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
                    let _ = nix::sys::signal::raise(sig);
                    return Ok(ExitCode::from((128 + sig as i32).clamp(0, 255) as u8));
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("wait: {e}")),
            }
        },
    }
}

/// In the forked child: drop privileges exactly like the service process (see
/// [`Privileges::apply`]), die with the helper, execute. Returns on failure.
fn exec_child(argv: &[CString], workdir: &CString, privileges: &Privileges) -> String {
    if let Err((what, e)) = privileges.apply() {
        return format!("{what}: {e}");
    }
    // After the credential change, which would clear it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return format!("pdeathsig: {e}");
    }
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        return format!("no_new_privs: {e}");
    }
    if let Err(e) = nix::unistd::chdir(workdir.as_c_str()) {
        return format!("workdir {workdir:?}: {e}");
    }
    let e = match nix::unistd::execvp(&argv[0], argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    format!("executing {:?}: {}", argv[0], e.desc())
}

/// Runs an instance's exec probes inside it.
#[derive(Debug)]
pub struct LinuxExec {
    pub(super) exe: CString,
    /// The instance init's pidfd (`None`: nothing to run in).
    pub(super) target: Option<Arc<OwnedFd>>,
    pub(super) procs: Vec<OwnedFd>,
    pub(super) cgroup_dir: Option<OwnedFd>,
    pub(super) env: Vec<CString>,
    pub(super) ns_flags: i32,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) caps: CapPlan,
    pub(super) nofile: Option<u64>,
    pub(super) workdir: String,
}

/// SIGKILL the helper (and so the command) if the probe is abandoned, and reap it.
struct KillOnDrop(Option<Arc<OwnedFd>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            // SAFETY: pidfd_send_signal on a pidfd we own.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
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
        let id = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
        let mut args_c = vec![
            to_c(super::INIT_NAME)?,
            to_c(EXEC_FLAG)?,
            to_c(&self.ns_flags.to_string())?,
            to_c(&id(self.uid))?,
            to_c(&id(self.gid))?,
            to_c(&self.caps.to_arg())?,
            to_c(
                &self
                    .nofile
                    .map_or_else(|| "-".to_string(), |n| n.to_string()),
            )?,
            to_c(&self.workdir)?,
            to_c("--")?,
        ];
        for a in argv {
            args_c.push(to_c(a)?);
        }
        let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv_p, envp_p) = (ptrs(&args_c), ptrs(&self.env));
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
        let plan = ChildPlan {
            procs: &self.procs,
            stdin: devnull.as_raw_fd(),
            stdout: out_w.as_raw_fd(),
            stderr: out_w.as_raw_fd(),
            fd3: target.as_raw_fd(),
            extra: &[],
            err_pipe: err_w.as_raw_fd(),
            exe: &self.exe,
            argv: &argv_p,
            envp: &envp_p,
        };
        let (_pid, pidfd) = clone_exec(0, self.cgroup_dir.as_ref(), &plan)?;
        drop((out_w, err_w, target, devnull));
        Ok((Arc::new(pidfd), out_r))
    }

    async fn run_once(&self, argv: &[String]) -> io::Result<ExecResult> {
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
