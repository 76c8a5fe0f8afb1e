//! The init zygote: one `corral-init` that the agent starts once, and that starts every
//! instance's init by forking itself, so that no instance start pays for executing the init
//! (mapping it, and the C library's start-up: on a virtual machine its processor feature and
//! cache probes are hundreds of `cpuid` instructions, each a VM exit, about 0.7 ms of CPU).
//!
//! The agent sends a request per instance over a `SOCK_SEQPACKET` socket pair: the clone
//! flags, whether to enter a new cgroup namespace, the instance's name, and the fds of the
//! spawn plan ([`ChildPlan`]) as `SCM_RIGHTS`. The zygote calls `clone3` with those flags
//! and `CLONE_PARENT`, so that the new process is the agent's child exactly as one the agent
//! cloned itself (the agent waits on it, reaps it and adopts it after a restart by PID and
//! start time). The child runs the same steps as a directly cloned one ([`child_prepare`]:
//! cgroup join, cgroup namespace, fds), closes every other fd but a pipe the agent writes a
//! byte to once it holds the child's pidfd, names itself after the instance in its command
//! line, and returns into the init's code. The init sets the instance up meanwhile, and
//! reads that byte before it forks the service ([`await_go`]): if the agent never got the
//! PID, the init reads end-of-file and exits instead of running a service unknown to it.
//!
//! A child in a new user namespace (`userns`) also gets the pipe on which it waits, before
//! anything else, for the id maps that the agent writes once it has the PID.
//!
//! The zygote has no threads and runs nothing but this loop; it exits when the agent's end
//! of the socket closes (the agent ended). The agent falls back to cloning the init itself
//! when the zygote cannot be started or stops answering (it starts a new one later).
//!
//! Imports from the crate: nothing but `super` (and `super::linux`'s `/proc/PID/stat` reader).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::clone::{
    CLONE_INTO_CGROUP, ChildPlan, CloneArgs, HIGH_FD, STEP_FDS, child_fail, child_prepare,
    clone_exec, exited, first_unplaced, pidfd_signal, wait_pidfd,
};
use super::{INIT_NAME, RUN_DIR_FD};

/// `argv[1]` of the zygote.
pub const FLAG: &str = "--zygote";

/// The request's fixed part, native byte order: clone flags (u64), number of cgroup files to
/// join (u32), number of extra fds (u32), whether a cgroup directory fd is sent (u8), whether
/// to enter a new cgroup namespace (u8), whether the child waits on a pipe for its user
/// namespace's id maps (u8, its fd sent after the cgroup directory's), a zero byte, the
/// name's length (u16); then the name.
const HEADER: usize = 22;
/// The longest instance name carried (longer ones are cut in the command line only).
const NAME_MAX: usize = 255;
/// Fds in every request: stdin, stdout, stderr, fd 3, the error pipe, the go pipe.
const FIXED_FDS: usize = 6;
/// The most fds one message carries (the kernel's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;
/// Room in the zygote's own command line for an instance's name (see [`rename`]).
const ARG_ROOM: usize = NAME_MAX + 1;
/// How long the agent waits for the zygote's answer before it gives up on it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a failed zygote the agent clones inits itself before it starts a new one.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the process that called [`serve`] goes on to be.
pub enum Role {
    /// An instance's init (the zygote's child, fds in place): run the init, reading the go
    /// pipe on this fd with [`await_go`] before the service is forked.
    Init(RawFd),
    /// The zygote, ending with this status.
    Exit(u8),
}

/// The zygote's loop, on the socket at fd 3. Returns in the zygote when the agent is gone,
/// and in each child it starts.
pub fn serve() -> Role {
    let sock = RUN_DIR_FD;
    let argv_area = arg_area();
    let mut header = [0u8; HEADER + NAME_MAX];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [io::IoSliceMut::new(&mut header)];
        let got = nix::sys::socket::recvmsg::<()>(
            sock,
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let (len, mut fds, truncated) = match got {
            Ok(msg) => {
                let fds: Vec<RawFd> = msg
                    .cmsgs()
                    .into_iter()
                    .flatten()
                    .flat_map(|c| match c {
                        nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds,
                        _ => Vec::new(),
                    })
                    .collect();
                let truncated = msg.flags.intersects(
                    nix::sys::socket::MsgFlags::MSG_CTRUNC | nix::sys::socket::MsgFlags::MSG_TRUNC,
                );
                (msg.bytes, fds, truncated)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Role::Exit(1),
        };
        if len == 0 && fds.is_empty() {
            // The agent's end is closed.
            return Role::Exit(0);
        }
        let outcome = match Request::parse(&header[..len.min(header.len())], fds.len()) {
            Some(req) if !truncated => start(&req, &mut fds, argv_area),
            _ => Outcome::Parent(-i64::from(libc::EINVAL)),
        };
        let answer = match outcome {
            Outcome::Child(go) => return Role::Init(go),
            Outcome::Parent(answer) => answer,
        };
        for fd in fds {
            // SAFETY: fds received in this message (or their high copies), owned by this
            // loop alone.
            unsafe { libc::close(fd) };
        }
        let bytes = answer.to_ne_bytes();
        // SAFETY: send(2) of a stack buffer on our socket.
        let sent =
            unsafe { libc::send(sock, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Role::Exit(1);
        }
    }
}

/// One request, parsed.
struct Request {
    flags: u64,
    procs: usize,
    extra: usize,
    cgroup: bool,
    new_cgroup_ns: bool,
    waits: bool,
    name: Vec<u8>,
}

impl Request {
    /// The request in `bytes`, if well formed and matching the `fds` received.
    fn parse(bytes: &[u8], fds: usize) -> Option<Request> {
        let head = bytes.get(..HEADER)?;
        let u32_at = |i: usize| -> Option<usize> {
            usize::try_from(u32::from_ne_bytes(head.get(i..i + 4)?.try_into().ok()?)).ok()
        };
        let flags = u64::from_ne_bytes(head.get(..8)?.try_into().ok()?);
        let name_len = usize::from(u16::from_ne_bytes(head.get(20..22)?.try_into().ok()?));
        let req = Request {
            flags,
            procs: u32_at(8)?,
            extra: u32_at(12)?,
            cgroup: head[16] != 0,
            new_cgroup_ns: head[17] != 0,
            waits: head[18] != 0,
            name: bytes.get(HEADER..HEADER.checked_add(name_len)?)?.to_vec(),
        };
        let expected = FIXED_FDS
            .checked_add(usize::from(req.cgroup))?
            .checked_add(usize::from(req.waits))?
            .checked_add(req.procs)?
            .checked_add(req.extra)?;
        (expected == fds).then_some(req)
    }

    fn encode(&self) -> Vec<u8> {
        let name = &self.name[..self.name.len().min(NAME_MAX)];
        let mut out = Vec::with_capacity(HEADER + name.len());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&u32::try_from(self.procs).unwrap_or(u32::MAX).to_ne_bytes());
        out.extend_from_slice(&u32::try_from(self.extra).unwrap_or(u32::MAX).to_ne_bytes());
        out.push(u8::from(self.cgroup));
        out.push(u8::from(self.new_cgroup_ns));
        out.push(u8::from(self.waits));
        out.push(0);
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_ne_bytes());
        out.extend_from_slice(name);
        out
    }
}

/// Where the zygote is after one `clone3`.
#[derive(PartialEq, Eq)]
enum Outcome {
    /// In the new child, ready to run the init; the go pipe's fd.
    Child(RawFd),
    /// In the zygote: the answer to send (the child's PID, or minus the errno).
    Parent(i64),
}

/// Starts the child of `req` with the received `fds` (moved, in place, above the numbers the
/// child places them at).
fn start(req: &Request, fds: &mut [RawFd], argv_area: Option<(usize, usize)>) -> Outcome {
    let floor = RawFd::try_from(req.extra)
        .ok()
        .and_then(|n| (RUN_DIR_FD + 1).checked_add(n))
        .map_or(HIGH_FD, |n| n.max(HIGH_FD));
    for fd in fds.iter_mut() {
        if *fd < floor {
            // SAFETY: fcntl/close on a received fd that this loop owns.
            let high = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor) };
            if high < 0 {
                return Outcome::Parent(-i64::from(
                    io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EMFILE),
                ));
            }
            // SAFETY: as above; the copy replaces it.
            unsafe { libc::close(*fd) };
            *fd = high;
        }
    }
    let [stdin, stdout, stderr, fd3, err_pipe, go, rest @ ..] = &*fds else {
        return Outcome::Parent(-i64::from(libc::EINVAL));
    };
    let (cgroup, rest) = match rest.split_first() {
        Some((fd, rest)) if req.cgroup => (Some(*fd), rest),
        _ => (None, rest),
    };
    let (wait_for, rest) = match rest.split_first() {
        Some((fd, rest)) if req.waits => (Some(*fd), rest),
        _ => (None, rest),
    };
    let (procs, extra) = rest.split_at(req.procs.min(rest.len()));
    let exe = CString::default();
    let plan = ChildPlan {
        procs,
        stdin: *stdin,
        stdout: *stdout,
        stderr: *stderr,
        fd3: *fd3,
        extra,
        new_cgroup_ns: req.new_cgroup_ns,
        wait_for,
        err_pipe: *err_pipe,
        exe: &exe,
        argv: &[],
        envp: &[],
    };
    let attempt = |into: Option<RawFd>| -> Outcome {
        let mut plan = plan;
        let mut args = CloneArgs {
            // CLONE_PARENT: the agent's child. Its exit signal is then the zygote's own
            // (SIGCHLD), and clone3 takes none.
            flags: req.flags | libc::CLONE_PARENT as u64,
            ..CloneArgs::default()
        };
        if let Some(dir) = into {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = u64::from(dir.cast_unsigned());
            plan.procs = &[];
        }
        // SAFETY: clone3 with a valid, fully initialised clone_args of the size passed, no
        // CLONE_VM and no new stack: the child runs on a copy of this stack, like fork, in
        // a process without other threads.
        let ret =
            unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
        match ret {
            0 => {
                // SAFETY: we are the child of clone3, with the plan built before the call.
                let go = unsafe { child(&plan, *go) };
                rename(argv_area, &req.name);
                Outcome::Child(go)
            }
            n if n < 0 => Outcome::Parent(-i64::from(
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL),
            )),
            pid => Outcome::Parent(pid),
        }
    };
    let outcome = attempt(cgroup);
    // A kernel without CLONE_INTO_CGROUP (before 5.7): join by the cgroup files instead.
    let old_kernel = [libc::EINVAL, libc::E2BIG].map(|e| Outcome::Parent(-i64::from(e)));
    if cgroup.is_some() && old_kernel.contains(&outcome) {
        return attempt(None);
    }
    outcome
}

/// The child's steps: those of a directly cloned child, the go pipe kept on the first fd past
/// those placed (for [`await_go`]), and every other fd closed (nothing executes that would
/// close them).
///
/// # Safety
/// Only in the zygote's child of clone3, with `plan` and `go` from the zygote's request.
unsafe fn child(plan: &ChildPlan<'_>, go: RawFd) -> RawFd {
    // SAFETY: the caller's contract; every fd of the plan is above those it places.
    if let Err(step) = unsafe { child_prepare(plan) } {
        // SAFETY: in the child, before it runs anything of its own.
        unsafe { child_fail(plan.err_pipe, step) }
    }
    let keep = first_unplaced(plan);
    let Ok(at) = RawFd::try_from(keep) else {
        // SAFETY: as above (errno: the descriptor table is full).
        unsafe {
            *libc::__errno_location() = libc::EMFILE;
            child_fail(plan.err_pipe, STEP_FDS)
        }
    };
    // SAFETY: dup3(2) of the go pipe onto the first free number (the received fds are all
    // above it), then close_range(2) of everything past it: the zygote's socket, the
    // received fds and the error pipe; nothing in this process refers to them any more.
    unsafe {
        if (go != at && libc::dup3(go, at, libc::O_CLOEXEC) < 0)
            || libc::syscall(
                libc::SYS_close_range,
                keep.saturating_add(1),
                libc::c_uint::MAX,
                0,
            ) < 0
        {
            child_fail(plan.err_pipe, STEP_FDS)
        }
    }
    at
}

/// In an init started by the zygote: waits for the agent to hold this process's pidfd (one
/// byte on the go pipe; by the time the init has set the instance up, it is there). Called
/// before the service process is forked. At end of file the agent never learnt of this
/// process (the zygote failed before answering, or the agent ended): the init exits at once,
/// leaving no record (the instance may be starting again under an init the agent knows).
pub fn await_go(fd: RawFd) {
    let mut byte = 0u8;
    let got = loop {
        // SAFETY: read(2) of one byte into a stack buffer from the go pipe, ours alone.
        let n = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    // SAFETY: closing the go pipe, which nothing else refers to.
    unsafe { libc::close(fd) };
    if got != 1 {
        // SAFETY: _exit(2); nothing of this init has been reported or is to be kept.
        unsafe { libc::_exit(i32::from(super::SETUP_FAILED)) }
    }
}

/// Where the zygote's command line is in its memory: `arg_start` and `arg_end` of
/// `/proc/self/stat` (fields 48 and 49).
fn arg_area() -> Option<(usize, usize)> {
    let stat = super::linux::proc_stat("self")?;
    let start = super::linux::stat_field(&stat, 48)?.parse().ok()?;
    let end = super::linux::stat_field(&stat, 49)?.parse().ok()?;
    (end > start).then_some((start, end))
}

/// Retitles the command line to `corral-init <name>`, in the zygote's own (which holds room
/// for it, see [`Zygote::start`]) the way `setproctitle(3)` does: one string from its
/// start, and the area's last byte no longer NUL, which tells the kernel to show the first
/// string only (`/proc/PID/cmdline`, `ps`).
fn rename(area: Option<(usize, usize)>, name: &[u8]) {
    let Some((start, end)) = area else { return };
    let name = &name[..name.len().min(NAME_MAX)];
    let Some(room) = end.checked_sub(start) else {
        return;
    };
    let title_len = INIT_NAME.len() + 1 + name.len();
    // The title, its NUL and the non-NUL last byte.
    if title_len + 2 > room {
        return;
    }
    // SAFETY: [start, end) is this process's own command line (written by the kernel at
    // exec into the stack mapping, read-write); every write stays inside it. The C
    // runtime's argv pointers point into it and read NUL-terminated strings there, which
    // it still ends with.
    unsafe {
        let base = start as *mut u8;
        std::ptr::copy_nonoverlapping(INIT_NAME.as_ptr(), base, INIT_NAME.len());
        *base.add(INIT_NAME.len()) = b' ';
        std::ptr::copy_nonoverlapping(name.as_ptr(), base.add(INIT_NAME.len() + 1), name.len());
        std::ptr::write_bytes(base.add(title_len), 0, room - title_len);
        *base.add(room - 1) = b' ';
    }
}

/// The agent's side: the zygote, started on first use.
#[derive(Debug)]
pub(super) struct Zygote {
    exe: CString,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    /// Not started yet, or to start again.
    Idle,
    Up(Conn),
    /// Failed at this time: inits are cloned by the agent until `RETRY_AFTER` has passed.
    Down(Instant),
}

/// A running zygote.
#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    pidfd: Arc<OwnedFd>,
    /// Whether a task of the agent's runtime reaps it when it ends (else [`Conn::end`] does).
    reaper: bool,
}

impl Zygote {
    /// A zygote executing `exe` as `corral-init`, not started yet.
    pub(super) fn new(exe: CString) -> Zygote {
        Zygote {
            exe,
            state: Mutex::new(State::Idle),
        }
    }

    /// Starts the init of `plan` (named `name` in its command line) through the zygote.
    /// `None`: the zygote cannot take this one (too many fds) or is not available; the
    /// caller clones the init itself. Otherwise the child's PID and pidfd, or
    /// why clone3 failed.
    pub(super) fn spawn(
        &self,
        flags: u64,
        into_cgroup: Option<&OwnedFd>,
        plan: &ChildPlan<'_>,
        name: &str,
    ) -> Option<io::Result<(i32, OwnedFd)>> {
        let fds_count = FIXED_FDS
            + usize::from(into_cgroup.is_some())
            + usize::from(plan.wait_for.is_some())
            + plan.procs.len()
            + plan.extra.len();
        if fds_count > MAX_FDS {
            return None;
        }
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let State::Down(at) = *state {
            if at.elapsed() < RETRY_AFTER {
                return None;
            }
            *state = State::Idle;
        }
        // Ended since the last request (killed, say): a new one, without a failed request.
        if matches!(&*state, State::Up(conn) if exited(&conn.pidfd))
            && let State::Up(conn) = std::mem::replace(&mut *state, State::Idle)
        {
            conn.end();
        }
        if matches!(*state, State::Idle) {
            match self.start() {
                Ok(conn) => *state = State::Up(conn),
                Err(_) => {
                    *state = State::Down(Instant::now());
                    return None;
                }
            }
        }
        let State::Up(conn) = &*state else {
            return None;
        };
        match conn.request(flags, into_cgroup, plan, name) {
            Ok(done) => Some(done),
            Err(_) => {
                if let State::Up(conn) = std::mem::replace(&mut *state, State::Down(Instant::now()))
                {
                    conn.end();
                }
                None
            }
        }
    }

    /// Executes the zygote: `corral-init --zygote <room>`, its socket on fd 3, an empty
    /// environment, /dev/null on 0-2, in the agent's cgroup and namespaces.
    fn start(&self) -> io::Result<Conn> {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        let theirs = super::clone::high(theirs)?;
        let devnull = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let devnull = super::clone::high(devnull)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let err_w = super::clone::high(err_w)?;
        let argv_c = [
            CString::new(INIT_NAME).map_err(io::Error::other)?,
            CString::new(FLAG).map_err(io::Error::other)?,
            // Room for `super::rename` to write an instance's name over.
            CString::new(" ".repeat(ARG_ROOM)).map_err(io::Error::other)?,
        ];
        let argv = super::clone::pointers(&argv_c);
        let envp = [std::ptr::null::<libc::c_char>()];
        let plan = ChildPlan {
            procs: &[],
            stdin: devnull.as_raw_fd(),
            stdout: devnull.as_raw_fd(),
            stderr: devnull.as_raw_fd(),
            fd3: theirs.as_raw_fd(),
            extra: &[],
            new_cgroup_ns: false,
            wait_for: None,
            err_pipe: err_w.as_raw_fd(),
            exe: &self.exe,
            argv: &argv,
            envp: &envp,
        };
        let (_pid, pidfd) = clone_exec(0, None, &plan)?;
        drop(err_w);
        drop(theirs);
        let pidfd = Arc::new(pidfd);
        // Reaped as soon as it ends, not at the next instance start.
        let reaper = tokio::runtime::Handle::try_current()
            .map(|rt| drop(rt.spawn(wait_pidfd(pidfd.clone(), true))))
            .is_ok();
        let conn = Conn {
            sock: ours,
            pidfd,
            reaper,
        };
        // A failed exec shows on the error pipe at once (it closes on a successful one).
        if let Some(why) = super::clone::read_spawn_error(err_r) {
            conn.end();
            return Err(io::Error::other(why));
        }
        let timeout =
            nix::sys::time::TimeVal::new(i64::try_from(ANSWER_TIMEOUT.as_secs()).unwrap_or(10), 0);
        nix::sys::socket::setsockopt(
            &conn.sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        )?;
        Ok(conn)
    }
}

impl Conn {
    /// One request and its answer. `Err`: the zygote failed (the caller ends it); `Ok` with
    /// clone3's result otherwise.
    fn request(
        &self,
        flags: u64,
        into_cgroup: Option<&OwnedFd>,
        plan: &ChildPlan<'_>,
        name: &str,
    ) -> io::Result<io::Result<(i32, OwnedFd)>> {
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let req = Request {
            flags,
            procs: plan.procs.len(),
            extra: plan.extra.len(),
            cgroup: into_cgroup.is_some(),
            new_cgroup_ns: plan.new_cgroup_ns,
            waits: plan.wait_for.is_some(),
            name: name.as_bytes().to_vec(),
        };
        let fds: Vec<RawFd> = [
            plan.stdin,
            plan.stdout,
            plan.stderr,
            plan.fd3,
            plan.err_pipe,
            go_r.as_raw_fd(),
        ]
        .into_iter()
        .chain(into_cgroup.map(AsRawFd::as_raw_fd))
        .chain(plan.wait_for)
        .chain(plan.procs.iter().copied())
        .chain(plan.extra.iter().copied())
        .collect();
        let bytes = req.encode();
        let iov = [io::IoSlice::new(&bytes)];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        drop(go_r);
        let mut answer = [0u8; 8];
        let got = loop {
            // SAFETY: recv(2) into a stack buffer on our socket.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    answer.as_mut_ptr().cast(),
                    answer.len(),
                    0,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break n;
        };
        if got != 8 {
            return Err(if got < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::new(io::ErrorKind::UnexpectedEof, "the init zygote ended")
            });
        }
        let answer = i64::from_ne_bytes(answer);
        let pid = match i32::try_from(answer) {
            Ok(pid) if pid > 0 => pid,
            _ => {
                let errno = i32::try_from(-answer).unwrap_or(libc::EINVAL);
                return Ok(Err(io::Error::from_raw_os_error(errno)));
            }
        };
        // Our own child, not yet told to go: it cannot have been reaped, so the PID is it.
        // SAFETY: pidfd_open(2) on a PID; the returned fd is owned right after.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            // It reads end-of-file on the go pipe and exits; reaped here.
            drop(go_w);
            let mut status = 0;
            // SAFETY: waitpid(2) on our own child.
            unsafe { libc::waitpid(pid, &raw mut status, libc::__WALL) };
            return Ok(Err(e));
        }
        // SAFETY: a fresh fd from pidfd_open that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(crate::num::syscall_int(raw)) };
        // A failed write leaves it at end-of-file too: it exits, and its end is reported as
        // any early end of an init.
        let _ = nix::unistd::write(&go_w, b"1");
        Ok(Ok((pid, pidfd)))
    }

    /// Kills the zygote (it runs nothing else; its children are the agent's) and reaps it
    /// when no task does.
    fn end(self) {
        let _ = pidfd_signal(&self.pidfd, libc::SIGKILL);
        if !self.reaper {
            let _ = nix::sys::wait::waitid(
                nix::sys::wait::Id::PIDFd(self.pidfd.as_fd()),
                nix::sys::wait::WaitPidFlag::WEXITED,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(procs: usize, extra: usize, cgroup: bool) -> Request {
        Request {
            flags: u64::from((libc::CLONE_NEWPID | libc::CLONE_NEWNS).cast_unsigned()),
            procs,
            extra,
            cgroup,
            new_cgroup_ns: true,
            waits: false,
            name: b"web-3".to_vec(),
        }
    }

    #[test]
    fn a_request_reads_back_as_sent() {
        let sent = request(5, 3, false);
        let got = Request::parse(&sent.encode(), FIXED_FDS + 5 + 3).expect("parsed");
        assert_eq!(
            (
                got.flags,
                got.procs,
                got.extra,
                got.cgroup,
                got.new_cgroup_ns
            ),
            (sent.flags, 5, 3, false, true)
        );
        assert_eq!(got.name, b"web-3");
        let with_dir = request(0, 1, true);
        assert!(Request::parse(&with_dir.encode(), FIXED_FDS + 1 + 1).is_some());
        // A child that waits for its id maps: one fd more, the pipe's.
        let waits = Request {
            waits: true,
            ..request(2, 1, true)
        };
        let got = Request::parse(&waits.encode(), FIXED_FDS + 1 + 1 + 2 + 1).expect("parsed");
        assert!(got.waits && got.cgroup);
        assert!(Request::parse(&waits.encode(), FIXED_FDS + 1 + 2 + 1).is_none());
    }

    #[test]
    fn a_request_not_matching_its_fds_or_cut_short_is_refused() {
        let bytes = request(5, 3, true).encode();
        // One fd more or less than the header says.
        assert!(Request::parse(&bytes, FIXED_FDS + 5 + 3).is_none());
        assert!(Request::parse(&bytes, FIXED_FDS + 5 + 3 + 2).is_none());
        // Cut inside the header, or inside the name.
        assert!(Request::parse(&bytes[..HEADER - 1], FIXED_FDS + 9).is_none());
        assert!(Request::parse(&bytes[..bytes.len() - 1], FIXED_FDS + 9).is_none());
        assert!(Request::parse(&[], 0).is_none());
        // Counts that overflow when added up.
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        huge[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(Request::parse(&huge, MAX_FDS).is_none());
    }

    #[test]
    fn a_long_name_is_cut_to_fit_the_message() {
        let mut long = request(0, 0, false);
        long.name = vec![b'a'; 1000];
        let bytes = long.encode();
        assert_eq!(bytes.len(), HEADER + NAME_MAX);
        assert_eq!(
            Request::parse(&bytes, FIXED_FDS).map(|r| r.name.len()),
            Some(NAME_MAX)
        );
    }
}
