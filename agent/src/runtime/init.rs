//! The per-instance init: the first process of every instance (PID 1 of its PID namespace, or a
//! child subreaper without one). It is `corrald` itself, executed under the name `corral-init`
//! by the spawn path in [`super::linux`], already inside the instance's cgroup and namespaces.
//!
//! It runs with an empty environment of its own (the service's is applied only at the
//! service's `execve`), and finishes the isolation that needs a process inside the
//! namespaces (private mount propagation, `/proc` for the new PID namespace, a tmpfs on
//! `/tmp`, what [`super::confine`] builds — masks, a minimal `/dev`, the kernel's files — the
//! read-only view of the host for `readonly_root`, the idmapped workdir of a `userns`
//! instance, the hostname, loopback),
//! forks the service process (which drops privileges and executes the command), then loops:
//! it copies the service's stdout/stderr into the instance's rotating log files, forwards
//! signals, reaps every child, and when the service process ends it records how (the exit
//! record) and exits with the same status. No async runtime, no threads.
//!
//! The pure parts — what an sd_notify datagram says ([`apply_notify`]) and how the service's
//! end becomes the exit record and the init's own status ([`ending`]) — are unit-tested.
//!
//! Imports from the crate: nothing but `super` (the shared config and record types).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag};
use nix::mount::{MsFlags, mount};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, sigaction, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use super::confine::{self, Masker};
use super::exec::Command;
use super::image;
use super::mounts;
use super::package;
use super::privileges::Privileges;
use super::seccomp;
use super::{
    EXIT_RECORD, ExitRecord, INIT_CONFIG, InitConfig, LOG_STAT, LOG_STAT_EVERY, LogStat,
    NOTIFY_STATE, NotifyState, RUN_DIR_FD, SETUP_FAILED,
};
use crate::logs::writer::{Dropped, LogWriter, NOTICE_PREFIX, RotatingFile, timestamp};

/// Signals the init passes on to the service process. SIGKILL and SIGSTOP cannot be caught;
/// SIGCHLD is the init's own; fault signals stay default.
pub const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGTERM,
    Signal::SIGCONT,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGURG,
    Signal::SIGWINCH,
    Signal::SIGPWR,
];

/// Entry point of `corral-init`. Never returns into the agent's code paths.
pub fn main() -> ExitCode {
    ExitCode::from(status())
}

/// What [`main`] does, returning the exit status: for the `corral-init` executable, which
/// starts without the standard library's runtime setup (see `agent/src/bin/corral-init.rs`)
/// and so exits with a plain status.
pub fn status() -> u8 {
    let mode = std::env::args_os().nth(1);
    if mode.as_deref() == Some(OsStr::new(super::probe_helper::EXEC_FLAG)) {
        return super::probe_helper::status();
    }
    let mut go = None;
    if mode.as_deref() == Some(OsStr::new(super::zygote::FLAG)) {
        drop(mode);
        match super::zygote::serve() {
            // A child of the zygote, its fds in place: from here on as an executed init.
            super::zygote::Role::Init(fd) => go = Some(fd),
            super::zygote::Role::Exit(status) => return status,
        }
    }
    // SAFETY: fd RUN_DIR_FD was placed by the spawn path (a directory fd); nothing else in
    // this process owns it.
    let run_dir = unsafe { OwnedFd::from_raw_fd(RUN_DIR_FD) };
    // The spawn path placed it with dup2, which clears close-on-exec: the service must not
    // inherit it.
    let _ = nix::fcntl::fcntl(&run_dir, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let config = match read_config(run_dir.as_fd()) {
        Ok(c) => c,
        Err(e) => return setup_failed(run_dir.as_fd(), &format!("reading {INIT_CONFIG}: {e}")),
    };
    // The listening sockets on fds 4, 5, ...: the init keeps them (the agent may take them
    // back from here after a restart); only the service gets them, renumbered from 3.
    // The fds after them (logs, seccomp program, workdir mount) are the init's alone too.
    let extra = config.fds.all();
    for fd in (0..config.listen_names.len())
        .map(super::listen_fd_in_init)
        .chain(extra)
    {
        // SAFETY: F_SETFD on an fd number the spawn path placed; a wrong number only fails.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let init = Init::setup(&config, go);
    // The init stays resident for the instance's whole life: what setup needed (the
    // configuration, the service's command and environment, mount plans) is dropped now,
    // and the heap and stack pages it dirtied are given back to the kernel.
    drop(config);
    release_setup_memory();
    match init {
        Ok(init) => init.run(run_dir.as_fd()),
        Err(e) => setup_failed(run_dir.as_fd(), &e),
    }
}

/// Gives the pages that setup dirtied and no longer uses back to the kernel: the free heap
/// (`malloc_trim` returns the top of the heap and discards free pages inside it) and the
/// part of the main thread's stack below the current frame (setup ran deeper than the event
/// loop ever will; the kernel hands out zeroed pages again if it is reached).
fn release_setup_memory() {
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe { libc::malloc_trim(0) };
    let Some(low) = stack_low_end() else { return };
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    // Keep 16 KiB below the current frame for the calls still to come before the event
    // loop's frames settle (poll, read, the log writer).
    let keep = 16 * 1024;
    let page = 4096;
    let high = here.saturating_sub(keep) & !(page - 1);
    if high > low {
        // SAFETY: [low, high) lies inside this thread's own stack mapping, below every
        // live frame (the current one and those it calls stay above `high`); MADV_DONTNEED
        // on private anonymous memory only makes its contents read back as zeroes.
        unsafe { libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED) };
    }
}

/// The lowest address of the main thread's stack mapping (`[stack]` in `/proc/self/maps`),
/// read into a buffer on the stack: no allocation.
fn stack_low_end() -> Option<usize> {
    let fd = nix::fcntl::open(
        "/proc/self/maps",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut buf = [0u8; 4096];
    let mut kept = 0usize;
    loop {
        let n = nix::unistd::read(&fd, &mut buf[kept..]).ok()?;
        if n == 0 {
            return None;
        }
        let filled = kept + n;
        let mut start = 0;
        while let Some(nl) = buf[start..filled].iter().position(|b| *b == b'\n') {
            let line = &buf[start..start + nl];
            if line.ends_with(b"[stack]") {
                let dash = line.iter().position(|b| *b == b'-')?;
                let text = std::str::from_utf8(&line[..dash]).ok()?;
                return usize::from_str_radix(text, 16).ok();
            }
            start += nl + 1;
        }
        // Keep the incomplete last line for the next read.
        buf.copy_within(start..filled, 0);
        kept = filled - start;
        if kept == buf.len() {
            return None;
        }
    }
}

fn read_config(run_dir: BorrowedFd<'_>) -> io::Result<InitConfig> {
    let fd = nix::fcntl::openat(
        run_dir,
        INIT_CONFIG,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut text = String::new();
    File::from(fd).read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(io::Error::other)
}

fn setup_failed(run_dir: BorrowedFd<'_>, why: &str) -> u8 {
    // fd 2 is the instance's stderr.log: a record in the log's own format.
    let _ = writeln!(
        io::stderr(),
        "{} {NOTICE_PREFIX}{why}",
        timestamp(SystemTime::now())
    );
    let record = ExitRecord {
        setup_error: Some(why.to_string()),
        ..ExitRecord::default()
    };
    let _ = write_record(run_dir, EXIT_RECORD, &record);
    SETUP_FAILED
}

/// Write a small JSON file into the run directory so that a reader never sees half of it:
/// a temp file renamed into place.
fn write_record<T: serde::Serialize>(
    run_dir: BorrowedFd<'_>,
    name: &str,
    value: &T,
) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    let fd = nix::fcntl::openat(
        run_dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    let mut f = File::from(fd);
    f.write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
    nix::fcntl::renameat(run_dir, tmp.as_str(), run_dir, name)?;
    Ok(())
}

type Log = LogWriter<RotatingFile>;

/// The receiving end of an instance's `NOTIFY_SOCKET`: an abstract datagram socket (so it is
/// reachable whatever the instance's filesystem view) that takes messages only from processes
/// of this instance's cgroup.
struct Notify {
    socket: OwnedFd,
    /// `/proc/self/cgroup` of the init: a sender must be in the same cgroups.
    cgroup: String,
    state: NotifyState,
}

impl Notify {
    /// Bind the socket; returns it and the `NOTIFY_SOCKET` value (`@name`).
    fn bind(instance: &str) -> Result<(OwnedFd, String), String> {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, UnixAddr, bind, setsockopt, socket, sockopt,
        };
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("corral-notify/{instance}/{nanos:x}");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| format!("notify socket: {e}"))?;
        let addr = UnixAddr::new_abstract(name.as_bytes())
            .map_err(|e| format!("notify socket name: {e}"))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| format!("binding the notify socket: {e}"))?;
        setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| format!("notify socket: {e}"))?;
        Ok((fd, format!("@{name}")))
    }

    /// Read every pending message; true when the state changed.
    fn receive(&mut self) -> bool {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut changed = false;
        let mut buf = [0u8; 4096];
        loop {
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let (n, pid) = match recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => {
                    let pid = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                            _ => None,
                        })
                    });
                    (msg.bytes, pid)
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return changed,
            };
            // Only processes of this instance may say it is ready.
            let from_instance = pid.is_some_and(|p| {
                p > 0
                    && std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                        .is_ok_and(|c| c == self.cgroup)
            });
            if !from_instance {
                continue;
            }
            changed |= apply_notify(&mut self.state, &String::from_utf8_lossy(&buf[..n]));
        }
    }
}

/// What one sd_notify datagram tells: `READY=1`, `STATUS=...` (the last one wins, cut at 1024
/// characters); other lines are ignored. True when `state` changed.
pub fn apply_notify(state: &mut NotifyState, message: &str) -> bool {
    let mut changed = false;
    for line in message.lines() {
        if line == "READY=1" && !state.ready {
            state.ready = true;
            changed = true;
        } else if let Some(text) = line.strip_prefix("STATUS=") {
            let text: String = text.chars().take(1024).collect();
            if state.status != text {
                state.status = text;
                changed = true;
            }
        }
    }
    changed
}

/// How the service process ended, as its exit record (without the log counts) and the
/// init's own exit status: the service's code, 128 + the signal, or [`SETUP_FAILED`] when it
/// could not be waited for.
pub fn ending(status: Option<WaitStatus>) -> (ExitRecord, u8) {
    let mut record = ExitRecord::default();
    let code = match status {
        Some(WaitStatus::Exited(_, code)) => {
            record.code = Some(code);
            u8::try_from(code).unwrap_or(1)
        }
        Some(WaitStatus::Signaled(_, sig, core)) => {
            record.signal = Some(sig as i32);
            record.core_dumped = core;
            u8::try_from(128 + sig as i32).unwrap_or(u8::MAX)
        }
        _ => {
            record.setup_error = Some("the service process could not be waited for".into());
            SETUP_FAILED
        }
    };
    (record, code)
}

struct Init {
    stdout_log: Log,
    stderr_log: Log,
    /// The NOTIFY_SOCKET this init listens on, and what it was told.
    notify: Option<Notify>,
    /// Drops and bytes written last reported in the run directory, and when.
    reported: (Dropped, u64),
    reported_at: std::time::Instant,
    stdout_pipe: OwnedFd,
    stderr_pipe: OwnedFd,
    signals: SignalFd,
    child: Pid,
}

impl Init {
    /// Everything up to and including the fork of the service process. Files are opened
    /// before any mount, so a private `/tmp` cannot hide the agent's state directory.
    /// `go`: started by the zygote, the pipe to read the agent's go from before the fork.
    fn setup(config: &InitConfig, go: Option<RawFd>) -> Result<Init, String> {
        let readonly_root = config.readonly_root && config.mount_namespace;
        let log_dir = match config.fds.log_dir {
            // Opened by the agent in the host's mount table: nothing done to this instance's
            // mounts (read-only, masked) reaches it.
            // SAFETY: the spawn path placed this fd for the init alone.
            Some(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            // A configuration from an older agent.
            None if readonly_root => mounts::detached(&config.log_dir),
            None => nix::fcntl::open(
                config.log_dir.as_path(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from),
        }
        .map_err(|e| format!("opening log directory {}: {e}", config.log_dir.display()))?;
        let open = |name| {
            RotatingFile::open(&log_dir, name, config.log_max_files)
                .map(|f| {
                    LogWriter::new(f, config.log_max_size).with_incarnation(config.incarnation)
                })
                .map_err(|e| format!("opening {name}: {e}"))
        };
        let stdout_log = open("stdout.log")?;
        let stderr_log = open("stderr.log")?;

        if !config.pid_namespace {
            nix::sys::prctl::set_child_subreaper(true)
                .map_err(|e| format!("becoming a child subreaper: {e}"))?;
        }
        let artifact_tree = match &config.artifact {
            Some(artifact) if config.mount_namespace => {
                Some(package::open_artifact(artifact).map_err(|e| format!("artifact.mount: {e}"))?)
            }
            _ => None,
        };
        if config.mount_namespace {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| format!("making mounts private: {e}"))?;
            // In a user namespace device nodes cannot be made: the host's are taken (as they
            // are now, before `nodev` is set everywhere) and bound into the new /dev.
            let host_devices = if config.minimal_dev && config.userns {
                Some(confine::host_devices()?)
            } else {
                None
            };
            // An image becomes the root first: everything below happens inside it.
            if let Some(root) = &config.image {
                // SAFETY: the spawn path placed these fds for the init alone.
                let owned = |fd: Option<RawFd>| fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
                let layers = owned(config.fds.image_layer)
                    .ok_or("image: the agent passed no mount of the image's layers")?;
                let lower = owned(config.fds.image_root)
                    .ok_or("image: the agent passed no mount of the image's rootfs")?;
                image::enter(root, &layers, &lower, config.userns, !config.minimal_dev)
                    .map_err(|e| format!("image: {e}"))?;
            }
            if config.minimal_dev {
                confine::nodev_everywhere()?;
            }
            if config.pid_namespace && config.image.is_none() {
                mount(
                    Some("proc"),
                    "/proc",
                    Some("proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    None::<&str>,
                )
                .map_err(|e| format!("mounting /proc: {e}"))?;
            }
            if config.private_tmp {
                mount(
                    Some("tmpfs"),
                    "/tmp",
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some("mode=1777"),
                )
                .map_err(|e| format!("mounting a private /tmp: {e}"))?;
            }
            if let (Some(artifact), Some(tree)) = (&config.artifact, &artifact_tree) {
                package::mount_artifact(tree, artifact)
                    .map_err(|e| format!("artifact.mount: {e}"))?;
            }
            if config.minimal_dev {
                confine::minimal_dev(host_devices)?;
            }
            let mut masker = Masker::default();
            for dir in &config.masked {
                masker.dir(dir)?;
            }
            if config.system_paths {
                confine::system_paths(&mut masker, &config.cgroup_mounts)?;
            }
            if readonly_root {
                mounts::readonly_root(&config.workdir, config.system_paths)
                    .map_err(|e| format!("isolation.readonly_root: {e}"))?;
            }
            if let Some(fd) = config.fds.workdir {
                // SAFETY: the spawn path placed this fd for the init alone.
                let mount = unsafe { OwnedFd::from_raw_fd(fd) };
                mounts::move_tree(&mount, &config.workdir).map_err(|e| {
                    format!(
                        "isolation.userns: putting the idmapped workdir {} in place: {e}",
                        config.workdir.display()
                    )
                })?;
            }
        }
        if let Some(name) = &config.hostname {
            nix::unistd::sethostname(name)
                .map_err(|e| format!("setting hostname {name:?}: {e}"))?;
        }
        if config.net_namespace {
            loopback_up().map_err(|e| format!("bringing up lo: {e}"))?;
        }

        // Forwarded signals need a handler, not just a blocked mask: the kernel drops
        // signals with the default action that are sent to a PID namespace's init.
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        for &s in FORWARDED {
            mask.add(s);
        }
        let action = nix::sys::signal::SigAction::new(
            SigHandler::Handler(noop_handler),
            nix::sys::signal::SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for &s in FORWARDED.iter().chain([Signal::SIGCHLD].iter()) {
            // SAFETY: the handler does nothing, so it is async-signal-safe.
            unsafe { sigaction(s, &action) }
                .map_err(|e| format!("installing a {s} handler: {e}"))?;
        }
        let mut old = SigSet::empty();
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old))
            .map_err(|e| format!("blocking signals: {e}"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| format!("creating a signalfd: {e}"))?;

        let (out_r, out_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let notify = if config.notify {
            let (socket, address) = Notify::bind(&config.instance)?;
            let cgroup = std::fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
            Some((
                Notify {
                    socket,
                    cgroup,
                    state: NotifyState::default(),
                },
                address,
            ))
        } else {
            None
        };
        let mut exec = ExecPlan::new(config)?;
        exec.notify_socket = notify.as_ref().map(|(_, a)| a.clone());
        let notify = notify.map(|(n, _)| n);

        // Started by the zygote: nothing runs of the service before the agent holds this
        // init's pidfd.
        if let Some(fd) = go {
            super::zygote::await_go(fd);
        }
        // SAFETY: this process is single-threaded (it was executed, or forked by the
        // single-threaded zygote, and started no threads), so the child may run ordinary
        // code, allocation included, before exec.
        match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
            ForkResult::Child => {
                let (errno, why) = exec.run(&old, out_w.as_raw_fd(), err_w.as_raw_fd());
                // fd 2 is the stderr pipe: the init's pump timestamps this line.
                let _ = writeln!(io::stderr(), "{NOTICE_PREFIX}{why}");
                // The shell's convention: 127 command not found, 126 cannot execute.
                let code = if errno == Errno::ENOENT { 127 } else { 126 };
                // SAFETY: _exit is always safe; skips the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(out_w);
                drop(err_w);
                for fd in [&out_r, &err_r] {
                    nix::fcntl::fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                        .map_err(|e| format!("fcntl: {e}"))?;
                }
                Ok(Init {
                    stdout_log,
                    stderr_log,
                    notify,
                    reported: (Dropped::default(), 0),
                    reported_at: std::time::Instant::now(),
                    stdout_pipe: out_r,
                    stderr_pipe: err_r,
                    signals,
                    child,
                })
            }
        }
    }

    /// The event loop: pump logs, forward signals, reap; ends when the service process ends.
    fn run(mut self, run_dir: BorrowedFd<'_>) -> u8 {
        let mut buf = vec![0u8; 64 * 1024];
        let mut out_open = true;
        let mut err_open = true;
        let mut status: Option<WaitStatus> = None;
        while status.is_none() {
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            if let Some(n) = &self.notify {
                fds.push(PollFd::new(n.socket.as_fd(), PollFlags::POLLIN));
            }
            if out_open {
                fds.push(PollFd::new(self.stdout_pipe.as_fd(), PollFlags::POLLIN));
            }
            if err_open {
                fds.push(PollFd::new(self.stderr_pipe.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, self.report_due()) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    self.notice(&format!("poll: {e}"));
                    break;
                }
            }
            drop(fds);
            while let Ok(Some(info)) = self.signals.read_signal() {
                let signo = info.ssi_signo.cast_signed();
                if signo == libc::SIGCHLD {
                    status = status.or(self.reap());
                } else if let Ok(sig) = Signal::try_from(signo) {
                    let _ = kill(self.child, sig);
                }
            }
            if out_open {
                out_open = pump(&self.stdout_pipe, &mut self.stdout_log, &mut buf);
            }
            if err_open {
                err_open = pump(&self.stderr_pipe, &mut self.stderr_log, &mut buf);
            }
            if let Some(n) = &mut self.notify
                && n.receive()
                && let Err(e) = write_record(run_dir, NOTIFY_STATE, &n.state)
            {
                self.notice(&format!("writing {NOTIFY_STATE}: {e}"));
            }
            self.report_drops(run_dir, false);
        }
        // The service process is gone: take what is still buffered in the pipes (other
        // processes of the instance may hold them open, so stop at "nothing more now").
        if out_open {
            pump(&self.stdout_pipe, &mut self.stdout_log, &mut buf);
        }
        if err_open {
            pump(&self.stderr_pipe, &mut self.stderr_log, &mut buf);
        }
        let ts = timestamp(SystemTime::now());
        self.stdout_log.finish(&ts);
        self.stderr_log.finish(&ts);
        self.report_drops(run_dir, true);
        let dropped = self.dropped();
        let (mut record, code) = ending(status);
        record.log_lines_dropped = dropped.lines;
        record.log_bytes_dropped = dropped.bytes;
        if let Err(e) = write_record(run_dir, EXIT_RECORD, &record) {
            self.notice(&format!("writing {EXIT_RECORD}: {e}"));
        }
        code
    }

    fn dropped(&self) -> Dropped {
        Dropped {
            lines: self.stdout_log.total.lines + self.stderr_log.total.lines,
            bytes: self.stdout_log.total.bytes + self.stderr_log.total.bytes,
        }
    }

    fn written(&self) -> u64 {
        self.stdout_log.written + self.stderr_log.written
    }

    /// How long the event loop may wait: until bytes written but not reported yet are due
    /// ([`LOG_STAT_EVERY`] after the last report), or for ever when there are none.
    fn report_due(&self) -> PollTimeout {
        if self.written() == self.reported.1 {
            return PollTimeout::NONE;
        }
        let left = LOG_STAT_EVERY.saturating_sub(self.reported_at.elapsed());
        // At most LOG_STAT_EVERY (1 s), so it fits; rounded up so that it is due on waking.
        PollTimeout::try_from(left + std::time::Duration::from_millis(1))
            .unwrap_or(PollTimeout::ZERO)
    }

    /// Keep the run directory's counts of dropped output (at once) and of bytes written
    /// (within [`LOG_STAT_EVERY`]) current, for the agent's status and metrics; `all`:
    /// whatever is unreported, now (the service has ended).
    fn report_drops(&mut self, run_dir: BorrowedFd<'_>, all: bool) {
        let dropped = self.dropped();
        let written = self.written();
        let due = dropped != self.reported.0
            || (written != self.reported.1
                && (all || self.reported_at.elapsed() >= LOG_STAT_EVERY));
        if due {
            let stat = LogStat {
                lines_dropped: dropped.lines,
                bytes_dropped: dropped.bytes,
                bytes_written: written,
            };
            if write_record(run_dir, LOG_STAT, &stat).is_ok() {
                self.reported = (dropped, written);
                self.reported_at = std::time::Instant::now();
            }
        }
    }

    /// A record of the init's own on the stderr log.
    fn notice(&mut self, msg: &str) {
        self.stderr_log.push(
            format!("{NOTICE_PREFIX}{msg}\n").as_bytes(),
            &timestamp(SystemTime::now()),
        );
    }

    /// Reap every child that has ended; returns the service process's status if it was one.
    fn reap(&mut self) -> Option<WaitStatus> {
        let mut main = None;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return main,
                Ok(s) => {
                    if s.pid() == Some(self.child) {
                        main = Some(s);
                    }
                }
            }
        }
    }
}

/// Copy what the pipe holds now into the log, timestamped at the time it was read.
/// Returns false once the pipe is closed.
fn pump(pipe: &OwnedFd, log: &mut Log, buf: &mut [u8]) -> bool {
    loop {
        match nix::unistd::read(pipe, buf) {
            Ok(0) => return false,
            Ok(n) => log.push(&buf[..n], &timestamp(SystemTime::now())),
            Err(Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Everything the service process needs, prepared in the init before the fork.
struct ExecPlan {
    /// The command with the service's environment.
    command: Command,
    /// `NOTIFY_SOCKET` for the service, when it reports readiness itself.
    notify_socket: Option<String>,
    /// Names of the listening sockets on the init's fds 4, 5, ... (`LISTEN_FDNAMES`).
    listen_names: Vec<String>,
    workdir: CString,
    /// User, groups, capabilities and limits the service runs with.
    privileges: Privileges,
    /// Installed right before the `execve`.
    seccomp: Option<seccompiler::BpfProgram>,
}

impl ExecPlan {
    fn new(config: &InitConfig) -> Result<ExecPlan, String> {
        let workdir = CString::new(OsStr::new(&config.workdir).as_bytes())
            .map_err(|_| "workdir holds a NUL byte".to_string())?;
        let seccomp = if let Some(fd) = config.fds.seccomp {
            // SAFETY: the spawn path placed the program's memfd on this fd for this process
            // only; it is closed here, once read.
            let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let bytes = super::read_shared(&file)
                .map_err(|e| format!("isolation.seccomp: reading the filter on fd {fd}: {e}"))?;
            Some(
                seccomp::from_bytes(&bytes).ok_or(
                    "isolation.seccomp: the filter handed to the init is not a BPF program",
                )?,
            )
        } else {
            None
        };
        Ok(ExecPlan {
            command: Command::new(&config.command, &config.env)?,
            notify_socket: None,
            listen_names: config.listen_names.clone(),
            workdir,
            privileges: Privileges {
                uid: config.uid,
                gid: config.gid,
                caps: config.capabilities,
                nofile: config.nofile,
                nofile_soft: config.nofile_soft,
            },
            seccomp,
        })
    }

    /// In the forked child: wire stdio, drop privileges (see [`Privileges::apply`]), set
    /// `no_new_privs`, install the seccomp filter, execute with the service's environment.
    /// Returns only on failure, with the error and what was being done.
    fn run(&mut self, mask: &SigSet, out: RawFd, err: RawFd) -> (Errno, String) {
        let step = |what: &str, e: Errno| (e, format!("{what}: {}", e.desc()));
        // Signal dispositions with handlers are reset by exec; the mask is not, nor is an
        // ignored signal: SIGPIPE, which the init ignores, goes back to its default.
        if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None) {
            return step("restoring the signal mask", e);
        }
        // SAFETY: the default disposition has no handler to be safe about.
        if let Err(e) = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
            return step("resetting SIGPIPE", e);
        }
        if let Err(e) = nix::unistd::setsid() {
            return step("setsid", e);
        }
        // SAFETY: dup2 on fds this process owns; 0 is /dev/null inherited from the spawn path.
        unsafe {
            if libc::dup2(out, 1) < 0 || libc::dup2(err, 2) < 0 {
                return step("wiring stdout/stderr", Errno::last());
            }
        }
        if !self.listen_names.is_empty() {
            // LISTEN_FDS: the sockets on 3, 4, ... in order. Ascending dup2 never overwrites a
            // source still to be copied; the last source keeps close-on-exec.
            for i in 0..self.listen_names.len() {
                let from = super::listen_fd_in_init(i);
                // SAFETY: dup2 between fds this process owns.
                let to = RawFd::try_from(i).map_or(RawFd::MAX, |i| i.saturating_add(3));
                // SAFETY: as above.
                if unsafe { libc::dup2(from, to) } < 0 {
                    return step("passing the listening sockets", Errno::last());
                }
            }
            let vars = [
                ("LISTEN_FDS", self.listen_names.len().to_string()),
                ("LISTEN_FDNAMES", self.listen_names.join(":")),
                ("LISTEN_PID", std::process::id().to_string()),
            ];
            for (k, v) in vars {
                if let Err(e) = self.command.push_env(k, &v) {
                    return (Errno::EINVAL, e);
                }
            }
        }
        if let Some(addr) = &self.notify_socket
            && let Err(e) = self.command.push_env("NOTIFY_SOCKET", addr)
        {
            return (Errno::EINVAL, e);
        }
        // The agent may run with a low OOM score (systemd's OOMScoreAdjust); the service
        // must not inherit it. Raising the score needs no privilege; failure is harmless.
        let _ = std::fs::write("/proc/self/oom_score_adj", "0");
        if let Err(e) = nix::unistd::chdir(self.workdir.as_c_str()) {
            return (e, format!("workdir {:?}: {}", self.workdir, e.desc()));
        }
        if let Err((what, e)) = self.privileges.apply() {
            return step(what, e);
        }
        if let Err(e) = nix::sys::prctl::set_no_new_privs() {
            return step("setting no_new_privs", e);
        }
        if let Some(program) = &self.seccomp
            && let Err(e) = seccomp::install(program)
        {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL));
            return (errno, format!("installing the seccomp filter: {e}"));
        }
        let e = self.command.exec();
        (
            e,
            format!("executing {:?}: {}", self.command.program(), e.desc()),
        )
    }
}

/// `ip link set lo up` inside a fresh network namespace.
// IFF_UP | IFF_RUNNING is 0x41: it fits the request's `short`.
#[allow(clippy::cast_possible_truncation)]
const UP_RUNNING: libc::c_short = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;

fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket(2) call; the fd is owned right after.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading the flags member the kernel just filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= UP_RUNNING;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_messages_update_the_state() {
        let long = "x".repeat(2000);
        let cases: &[(&str, bool, &str, bool)] = &[
            // (message, ready after, status after, changed)
            ("READY=1", true, "", true),
            ("STATUS=warming up", false, "warming up", true),
            ("STATUS=a\nREADY=1\nSTATUS=b", true, "b", true),
            ("MAINPID=7\nWATCHDOG=1", false, "", false),
            ("READY=0", false, "", false),
            ("", false, "", false),
        ];
        for (msg, ready, status, changed) in cases {
            let mut state = NotifyState::default();
            assert_eq!(apply_notify(&mut state, msg), *changed, "{msg:?}");
            assert_eq!(state.ready, *ready, "{msg:?}");
            assert_eq!(state.status, *status, "{msg:?}");
        }
        let mut state = NotifyState::default();
        assert!(apply_notify(&mut state, &format!("STATUS={long}")));
        assert_eq!(state.status.len(), 1024, "cut at 1024 characters");
        assert!(
            !apply_notify(&mut state, &format!("STATUS={long}")),
            "same status"
        );
        assert!(apply_notify(&mut state, "READY=1"));
        assert!(!apply_notify(&mut state, "READY=1"), "ready once");
    }

    #[test]
    fn endings_map_to_records_and_codes() {
        let pid = Pid::from_raw(5);
        let (r, code) = ending(Some(WaitStatus::Exited(pid, 3)));
        assert_eq!((r.code, r.signal, code), (Some(3), None, 3));
        let (r, code) = ending(Some(WaitStatus::Exited(pid, 0)));
        assert_eq!((r.code, code), (Some(0), 0));
        let (r, code) = ending(Some(WaitStatus::Signaled(pid, Signal::SIGKILL, false)));
        assert_eq!(
            (r.code, r.signal, r.core_dumped, code),
            (None, Some(9), false, 137)
        );
        let (r, code) = ending(Some(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)));
        assert_eq!((r.signal, r.core_dumped, code), (Some(11), true, 139));
        let (r, code) = ending(None);
        assert_eq!(code, SETUP_FAILED);
        assert!(r.setup_error.is_some());
    }
}
