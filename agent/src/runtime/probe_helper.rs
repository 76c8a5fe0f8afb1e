//! The in-instance side of exec health probes: `corral-init --exec -- COMMAND...`, cloned by
//! the agent into the instance's cgroup (see [`super::probe_exec`]) with the instance init's
//! pidfd on fd 3, its [`ProbeConfig`] (JSON, in a sealed memfd made once per instance) on
//! fd 4, the service's seccomp program (in the sealed memfd its init got) on fd 5 when it
//! has one, and an empty environment. It joins the
//! instance's namespaces (`setns` through the pidfd), gives up the agent's OOM score, forks
//! (a PID namespace applies to children), and the child drops to the service's user,
//! capabilities and limits, installs the service's seccomp filter and executes the probe
//! command with the service's environment — exactly the confinement of the service. Its
//! exit status is passed on as the helper's own (a signal is re-raised).
//!
//! Imports from the crate: nothing but `super`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

use super::RUN_DIR_FD;
use super::exec::Command;
use super::privileges::{CapPlan, Privileges};
use super::seccomp;

/// First argument of `corral-init` in exec-probe mode.
pub const EXEC_FLAG: &str = "--exec";

/// The fd on which the helper finds its [`ProbeConfig`].
pub const CONFIG_FD: RawFd = RUN_DIR_FD + 1;

/// The fd on which the helper finds the service's seccomp program (see [`ProbeConfig::seccomp`]).
pub const SECCOMP_FD: RawFd = RUN_DIR_FD + 2;

/// What the helper needs to run one probe command as the service would run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// The namespaces to join (`CLONE_NEW*` flags).
    pub ns_flags: i32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub caps: CapPlan,
    pub nofile: Option<u64>,
    /// Without `nofile`: the soft limit the agent was started with (it raised its own).
    #[serde(default)]
    pub nofile_soft: Option<u64>,
    pub workdir: PathBuf,
    /// The service's environment.
    pub env: Vec<(String, String)>,
    /// Install the service's seccomp program, found on [`SECCOMP_FD`].
    pub seccomp: bool,
}

/// Entry point of `corral-init --exec`: its exit status.
pub fn status() -> u8 {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("[corral-init] exec probe: {e}");
            126
        }
    }
}

/// The whole content of the sealed memfd the agent placed on `fd` for this process.
fn read_fd(fd: RawFd, what: &str) -> Result<Vec<u8>, String> {
    // SAFETY: the agent placed `fd` for this process; nothing else in it owns the number.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    super::read_shared(&file).map_err(|e| format!("reading {what} on fd {fd}: {e}"))
}

/// Everything the forked child needs, prepared before the fork.
struct Prepared {
    command: Command,
    workdir: CString,
    privileges: Privileges,
    seccomp: Option<seccompiler::BpfProgram>,
}

fn prepare(config: &ProbeConfig, argv: &[String]) -> Result<Prepared, String> {
    let seccomp = if config.seccomp {
        let bytes = read_fd(SECCOMP_FD, "the seccomp filter")?;
        Some(seccomp::from_bytes(&bytes).ok_or("the seccomp filter is not a BPF program")?)
    } else {
        None
    };
    Ok(Prepared {
        command: Command::new(argv, &config.env)?,
        workdir: CString::new(config.workdir.as_os_str().as_encoded_bytes())
            .map_err(|_| "NUL in workdir".to_string())?,
        privileges: Privileges {
            uid: config.uid,
            gid: config.gid,
            caps: Some(config.caps),
            nofile: config.nofile,
            nofile_soft: config.nofile_soft,
        },
        seccomp,
    })
}

fn run() -> Result<u8, String> {
    // corral-init --exec -- COMMAND...
    let args = std::env::args_os()
        .skip(2)
        .map(|a| a.into_string())
        .collect::<Result<Vec<String>, _>>()
        .map_err(|a| format!("an argument is not UTF-8: {a:?}"))?;
    let argv = match args.split_first() {
        Some((dashes, argv)) if dashes == "--" && !argv.is_empty() => argv,
        _ => return Err(format!("expected -- COMMAND..., got {args:?}")),
    };
    let config: ProbeConfig = serde_json::from_slice(&read_fd(CONFIG_FD, "the configuration")?)
        .map_err(|e| format!("the probe configuration: {e}"))?;
    let prepared = prepare(&config, argv)?;
    // The agent may run with a low OOM score (systemd's OOMScoreAdjust); a probe must not
    // keep it. Raising the score needs no privilege. Before joining the instance's mount
    // namespace, whose /proc does not show this process.
    std::fs::write("/proc/self/oom_score_adj", "0")
        .map_err(|e| format!("resetting oom_score_adj: {e}"))?;
    let flags = CloneFlags::from_bits_truncate(config.ns_flags);
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
            let e = exec_child(&prepared);
            eprintln!("[corral-init] exec probe: {e}");
            // SAFETY: _exit is always safe.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return Ok(u8::try_from(code).unwrap_or(1));
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    // Pass the signal on as our own end.
                    // SAFETY: restoring the default disposition before raising.
                    let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
                    let _ = nix::sys::signal::raise(sig);
                    return Ok(u8::try_from(128 + sig as i32).unwrap_or(u8::MAX));
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("wait: {e}")),
            }
        },
    }
}

/// In the forked child: drop privileges exactly like the service process (see
/// [`Privileges::apply`]), die with the helper, install the filter, execute. Returns on
/// failure.
fn exec_child(p: &Prepared) -> String {
    // An ignored signal stays ignored across exec: SIGPIPE, which the helper ignores, goes
    // back to its default, as the service's own process has it.
    // SAFETY: the default disposition has no handler to be safe about.
    if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        return format!("resetting SIGPIPE: {e}");
    }
    if let Err((what, e)) = p.privileges.apply() {
        return format!("{what}: {e}");
    }
    // After the credential change, which would clear it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return format!("pdeathsig: {e}");
    }
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        return format!("no_new_privs: {e}");
    }
    if let Err(e) = nix::unistd::chdir(p.workdir.as_c_str()) {
        return format!("workdir {:?}: {e}", p.workdir);
    }
    if let Some(program) = &p.seccomp
        && let Err(e) = seccomp::install(program)
    {
        return format!("installing the seccomp filter: {e}");
    }
    let e = p.command.exec();
    format!("executing {:?}: {}", p.command.program(), e.desc())
}
