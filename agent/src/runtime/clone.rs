//! Starting a process straight into new namespaces and a cgroup: one `clone3` whose child
//! runs only async-signal-safe system calls on data the parent prepared ([`ChildPlan`]) and
//! then executes; the parent gets a pidfd, waits on it and reaps ([`wait_pidfd`]). Used for
//! every instance's init and for every exec probe's helper.
//!
//! Between `clone3` and `execve` the child writes `"0"` to each of the files the cgroup
//! backend opened for joining (v1: every hierarchy's `tasks`, which moves the single-threaded
//! child without the kernel's global thread-group lock; v2: `cgroup.procs`, when
//! `CLONE_INTO_CGROUP` is not available) so it is inside its limits before it executes anything, enters a
//! new cgroup namespace when asked (after joining, so that its cgroup is the namespace's
//! root), wires fds 0-3 and the extra fds, marks every other fd close-on-exec and executes
//! with the environment of the plan. If any step fails, it writes the step and errno to a
//! close-on-exec pipe and exits; the parent reads that pipe when the process ends.
//!
//! Imports from the crate: nothing but `super` (the shared types).

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::fcntl::FcntlArg;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ProcessStatus, RUN_DIR_FD};

/// Exit code of an init (or of the child of `clone3`) when the instance could not be set up
/// (the reason is in the exit record's `setup_error` and on the instance's stderr log).
pub const SETUP_FAILED: u8 = 125;

/// `struct clone_args` of clone3(2) (the version-2 layout, 88 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct CloneArgs {
    pub(super) flags: u64,
    pub(super) pidfd: u64,
    pub(super) child_tid: u64,
    pub(super) parent_tid: u64,
    pub(super) exit_signal: u64,
    pub(super) stack: u64,
    pub(super) stack_size: u64,
    pub(super) tls: u64,
    pub(super) set_tid: u64,
    pub(super) set_tid_size: u64,
    pub(super) cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (linux/sched.h; libc's constant overflows a c_int).
pub(super) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Steps of the child between clone3 and exec, reported through the error pipe.
const STEP_CGROUP: u8 = 1;
pub(super) const STEP_FDS: u8 = 2;
const STEP_EXEC: u8 = 3;
const STEP_CGROUPNS: u8 = 4;
const STEP_WAIT: u8 = 5;
const STEP_ROOT: u8 = 6;

/// Source fds are moved at or above this number before the child rearranges 0-3.
pub(super) const HIGH_FD: RawFd = 16;

/// Move `fd` to a number >= HIGH_FD, close-on-exec.
pub(super) fn high(fd: OwnedFd) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A close-on-exec memfd numbered at or above `HIGH_FD` holding `bytes`, sealed so that
/// nobody can change it any more: a read-only blob to hand to many processes (they read it
/// with `pread`, since they share its file offset).
pub(super) fn sealed_memfd(name: &std::ffi::CStr, bytes: &[u8]) -> io::Result<OwnedFd> {
    use std::io::Write;
    // SAFETY: memfd_create(2) with a NUL-terminated name; the fd is owned right after.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let mut f = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    f.write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS with a flag set on an fd we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    high(OwnedFd::from(f))
}

/// The NULL-terminated array of pointers to `strings` that execve(2) takes (valid while
/// `strings` lives).
pub(super) fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Data the child reads between clone3 and exec; all of it prepared by the parent.
#[derive(Clone, Copy)]
pub(super) struct ChildPlan<'a> {
    /// The cgroup backend's files to join by writing "0".
    pub(super) procs: &'a [RawFd],
    pub(super) stdin: RawFd,
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    /// Placed on fd 3: the run directory (an instance's init) or a pidfd (an exec probe).
    pub(super) fd3: RawFd,
    /// Placed on fds 4, 5, ...: the service's listening sockets (an init), the helper's
    /// configuration (an exec probe).
    pub(super) extra: &'a [RawFd],
    /// Enter a new cgroup namespace once inside the cgroup.
    pub(super) new_cgroup_ns: bool,
    /// A child in a new user namespace: wait for a byte on this pipe before anything else
    /// (the parent writes its id maps, and puts it in its cgroup, first), then become root
    /// there (its ids were the parent's, which the namespace does not map).
    pub(super) wait_for: Option<RawFd>,
    pub(super) err_pipe: RawFd,
    pub(super) exe: &'a CString,
    pub(super) argv: &'a [*const libc::c_char],
    pub(super) envp: &'a [*const libc::c_char],
}

/// Reports the failed `step` with this thread's errno on the error pipe and exits.
///
/// # Safety
/// Only in a child of clone3 before it runs anything of its own.
pub(super) unsafe fn child_fail(err_pipe: RawFd, step: u8) -> ! {
    // SAFETY: errno location, write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [0u8; 5];
        msg[0] = step;
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_pipe, msg.as_ptr().cast(), msg.len());
        libc::_exit(SETUP_FAILED as i32)
    }
}

/// The first fd number past those a plan places (0-3 and the extra fds).
pub(super) fn first_unplaced(plan: &ChildPlan<'_>) -> libc::c_uint {
    libc::c_uint::try_from(RUN_DIR_FD + 1)
        .unwrap_or(0)
        .saturating_add(libc::c_uint::try_from(plan.extra.len()).unwrap_or(libc::c_uint::MAX))
}

/// The child's steps before it runs the init: the user namespace's wait, the cgroup join,
/// the cgroup namespace and the fds 0-3 and extra fds in place. Only async-signal-safe
/// system calls: no allocation, no locks. Returns the step that failed (errno tells why).
///
/// # Safety
/// Must only be called in the child of clone3, with `plan` fully prepared by the parent and
/// every fd it names numbered at or above the fds it places.
pub(super) unsafe fn child_prepare(plan: &ChildPlan<'_>) -> Result<(), u8> {
    if let Some(fd) = plan.wait_for {
        let mut byte = 0u8;
        // SAFETY: read(2) of one byte into a stack buffer from a pipe the parent made.
        if unsafe { libc::read(fd, (&raw mut byte).cast(), 1) } != 1 {
            return Err(STEP_WAIT);
        }
        // Raw system calls: the C library's wrappers would try to reach the parent's other
        // threads, which this process does not have.
        // SAFETY: setgroups/setresgid/setresuid with constant arguments.
        let root = unsafe {
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setresgid, 0, 0, 0) == 0
                && libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0
        };
        if !root {
            return Err(STEP_ROOT);
        }
    }
    for fd in plan.procs {
        // SAFETY: writing 1 byte from a static buffer to an fd the parent opened.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(STEP_CGROUP);
        }
    }
    // SAFETY: unshare(2) with a flag only; async-signal-safe.
    if plan.new_cgroup_ns && unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(STEP_CGROUPNS);
    }
    // SAFETY: dup2 onto 0-3 and the extra fds' numbers from fds above them, opened by the
    // parent; dup2 clears CLOEXEC on the targets only.
    unsafe {
        if libc::dup2(plan.stdin, 0) < 0
            || libc::dup2(plan.stdout, 1) < 0
            || libc::dup2(plan.stderr, 2) < 0
            || libc::dup2(plan.fd3, RUN_DIR_FD) < 0
        {
            return Err(STEP_FDS);
        }
        for (i, fd) in plan.extra.iter().enumerate() {
            // Past RawFd's range dup2 fails, as it does past the descriptor limit.
            let at = RawFd::try_from(i).map_or(RawFd::MAX, |i| (RUN_DIR_FD + 1).saturating_add(i));
            if libc::dup2(*fd, at) < 0 {
                return Err(STEP_FDS);
            }
        }
    }
    Ok(())
}

/// The child side of clone3: [`child_prepare`], every fd but those placed marked
/// close-on-exec (the error pipe stays usable until exec succeeds), and the init executed.
/// If a step fails, it writes the step and errno to the error pipe and exits.
///
/// # Safety
/// Must only be called in the child of a fork-like clone of a possibly multi-threaded
/// process, with `plan` fully prepared by the parent; never returns.
unsafe fn child_after_clone(plan: &ChildPlan<'_>) -> ! {
    // SAFETY: the caller's contract.
    if let Err(step) = unsafe { child_prepare(plan) } {
        // SAFETY: in the child, before it runs anything of its own.
        unsafe { child_fail(plan.err_pipe, step) }
    }
    // SAFETY: close_range(2) with a flag, and execve(2) with NUL-terminated arrays the
    // parent prepared; both async-signal-safe.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first_unplaced(plan),
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            child_fail(plan.err_pipe, STEP_FDS);
        }
        libc::execve(plan.exe.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        child_fail(plan.err_pipe, STEP_EXEC)
    }
}

/// clone3 a child with `flags` (namespaces), inside the cgroup (`into_cgroup` on v2, or by
/// writing the plan's `cgroup.procs` files), that wires fds 0-3 and executes the plan. Returns
/// its PID and pidfd.
pub(super) fn clone_exec(
    flags: u64,
    into_cgroup: Option<&OwnedFd>,
    plan: &ChildPlan<'_>,
) -> io::Result<(i32, OwnedFd)> {
    let attempt = |into: Option<&OwnedFd>| -> io::Result<(i32, OwnedFd)> {
        let mut plan = *plan;
        if into.is_some() {
            // Born inside the cgroup: nothing to write.
            plan.procs = &[];
        }
        let mut pidfd: libc::c_int = -1;
        let mut args = CloneArgs {
            flags: flags | libc::CLONE_PIDFD as u64,
            pidfd: (&raw mut pidfd) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        if let Some(dir) = into {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = u64::from(dir.as_raw_fd().cast_unsigned());
        }
        let ret = match plan.wait_for {
            // The child waits for the parent (its id maps): it cannot share its memory.
            None if vm::SUPPORTED => vm::clone3(&mut args, &plan),
            _ => {
                // SAFETY: clone3 with a valid, fully initialised clone_args of the size
                // passed, no CLONE_VM and no new stack: the child runs on a copy of this
                // stack, like fork.
                let ret = unsafe {
                    libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>())
                };
                if ret == 0 {
                    // SAFETY: we are the child of clone3; the plan was built before the call.
                    unsafe { child_after_clone(&plan) }
                }
                ret
            }
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd that nothing else owns.
        Ok((crate::num::syscall_int(ret), unsafe {
            OwnedFd::from_raw_fd(pidfd)
        }))
    };
    match attempt(into_cgroup) {
        // A kernel without CLONE_INTO_CGROUP (before 5.7): join by cgroup.procs instead.
        Err(e)
            if into_cgroup.is_some()
                && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) =>
        {
            attempt(None)
        }
        other => other,
    }
}

/// The child of `clone3` sharing the parent's memory until it executes (`CLONE_VM |
/// CLONE_VFORK`, as `posix_spawn` does): the kernel copies no page tables of the agent
/// (tens of MiB mapped, many threads) only for `execve` to throw them away, which is most of
/// what a fork costs the spawn path. The calling thread sleeps until the child has executed
/// or exited; the agent's other threads run on.
///
/// The child runs on a stack of its own, entered by a few instructions right after the
/// system call (a C wrapper's return would pop the parent's frame from the new stack). It
/// writes nothing of the parent's memory but that stack and, through the C library's
/// wrappers, the calling thread's `errno`, which that thread does not read while it sleeps.
/// Signals: blocked in the calling thread around the clone, so that none reaches the child
/// before it has set every caught signal back to its default action (the handlers are the
/// agent's, and would run on the shared memory); the child then restores the mask and
/// executes, which resets the rest.
mod vm {
    use super::{ChildPlan, CloneArgs, child_after_clone};

    // Elsewhere the fork-like clone: the switch to the new stack is written (and tested) for
    // x86-64 only.
    pub(super) const SUPPORTED: bool = cfg!(target_arch = "x86_64");

    /// The child's stack: what `child_after_clone` and the C library's thin system-call
    /// wrappers need, with a wide margin.
    const STACK: usize = 64 * 1024;

    /// What the child reads: the plan and the signal mask to restore before executing.
    struct Start<'a> {
        plan: ChildPlan<'a>,
        mask: libc::sigset_t,
    }

    /// clone3 with `CLONE_VM | CLONE_VFORK` and a new stack; the child runs `plan`. Returns
    /// what the system call returned (the child's PID, or -1 with errno set).
    pub(super) fn clone3(args: &mut CloneArgs, plan: &ChildPlan<'_>) -> libc::c_long {
        // 16-byte aligned, as both ABIs require of the stack pointer at a call.
        let mut stack = vec![0u128; STACK / 16];
        args.flags |= (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
        args.stack = stack.as_mut_ptr() as u64;
        args.stack_size = STACK as u64;
        // SAFETY: sigfillset/pthread_sigmask on sigset_t values we own.
        let mut start = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&raw mut all);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const all, &raw mut old);
            Start {
                plan: *plan,
                mask: old,
            }
        };
        // SAFETY: clone3 with a fully initialised clone_args and a stack that outlives the
        // child's use of it (CLONE_VFORK: this thread resumes only once the child has
        // executed or exited); the child enters `child_entry` on that stack with `start`,
        // which this frame keeps alive for the same reason.
        let ret = unsafe { raw_clone3(args, &raw mut start) };
        // SAFETY: as above.
        unsafe {
            libc::pthread_sigmask(
                libc::SIG_SETMASK,
                &raw const start.mask,
                std::ptr::null_mut(),
            )
        };
        drop(stack);
        ret
    }

    /// The child, on its own stack.
    extern "C" fn child_entry(start: *mut Start<'_>) -> ! {
        // SAFETY: the parent passed a valid `Start` it keeps alive until this process
        // executes or exits (CLONE_VFORK).
        let start = unsafe { &*start };
        for sig in 1..libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: sigaction(2) is async-signal-safe; the handler table is this
            // process's own copy (no CLONE_SIGHAND). Signals the C library reserves fail
            // with EINVAL, and are left as they are.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &raw mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN
                {
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &raw const dfl, std::ptr::null_mut());
                }
            }
        }
        // SAFETY: restores the mask the parent thread had; async-signal-safe.
        unsafe {
            libc::pthread_sigmask(
                libc::SIG_SETMASK,
                &raw const start.mask,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: the child of clone3 with a plan prepared by the parent.
        unsafe { child_after_clone(&start.plan) }
    }

    /// A raw system call's return as the C library gives it: -1 with errno set on failure.
    #[cfg(target_arch = "x86_64")]
    fn with_errno(ret: libc::c_long) -> libc::c_long {
        if ret < 0 {
            // SAFETY: errno of this thread.
            unsafe { *libc::__errno_location() = i32::try_from(-ret).unwrap_or(libc::EINVAL) };
            return -1;
        }
        ret
    }

    /// The system call, and the child's switch to `child_entry`.
    ///
    /// # Safety
    /// `args` must be valid clone_args with `CLONE_VM | CLONE_VFORK` and a stack;
    /// `start` must stay valid until the child executes or exits.
    #[cfg(target_arch = "x86_64")]
    unsafe fn raw_clone3(args: &CloneArgs, start: *mut Start<'_>) -> libc::c_long {
        let ret: libc::c_long;
        // SAFETY: the caller's contract. In the child (rax = 0) the stack pointer is the top
        // of the new stack (16-byte aligned); `call` leaves it as a function entry expects.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") std::ptr::from_ref(args),
                in("rsi") size_of::<CloneArgs>(),
                in("r12") start,
                in("r13") child_entry as *const (),
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        with_errno(ret)
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn raw_clone3(_: &CloneArgs, _: *mut Start<'_>) -> libc::c_long {
        // SAFETY: errno of this thread.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        -1
    }
}

/// The end of the process behind `pidfd`: its status when it is our `child` (reaped here),
/// else `Unknown` once it has ended.
pub(super) async fn wait_pidfd(pidfd: Arc<OwnedFd>, child: bool) -> ProcessStatus {
    let reap = |fd: &OwnedFd| {
        if !child {
            // Its parent (not us) reaps it, maybe late or never (an agent killed earlier left
            // it to whatever reaps orphans): a zombie counts as ended. A pidfd polls readable
            // once its process has exited, reaped or not; signal 0 would still reach a zombie.
            return exited(fd).then_some(ProcessStatus::Unknown);
        }
        match waitid(
            Id::PIDFd(fd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::Exited(_, code)) => Some(ProcessStatus::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(ProcessStatus::Signaled(sig as i32)),
            Ok(_) => None,
            Err(nix::errno::Errno::EINTR) => None,
            // ECHILD: reaped elsewhere; nothing more can be learned from the process itself.
            Err(_) => Some(ProcessStatus::Unknown),
        }
    };
    // SAFETY: the pidfd stays open (the Arc keeps it) for as long as the AsyncFd lives.
    let afd = match unsafe { AsyncFd::register_with_interest(pidfd.clone(), Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch a pidfd; polling instead");
            loop {
                if let Some(s) = reap(&pidfd) {
                    return s;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    loop {
        match afd.readable().await {
            Ok(mut guard) => {
                if let Some(s) = reap(&pidfd) {
                    return s;
                }
                guard.clear_ready();
            }
            Err(e) => {
                tracing::error!(error = %e, "pidfd wait failed");
                if let Some(s) = reap(&pidfd) {
                    return s;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether the process behind `pidfd` has exited (a zombie included), without waiting.
pub(super) fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, timeout 0.
    let n = unsafe { libc::poll(&raw mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

/// `signal` to the process of `pidfd` (which cannot be a recycled PID).
pub(super) fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) on a pidfd the caller owns, no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the id maps of `pid`, a child in a new user namespace waiting for them:
/// `/proc/PID/uid_map` and `gid_map` (each `INSIDE OUTSIDE COUNT` lines). From a process
/// privileged in the parent namespace, `setgroups` stays allowed inside.
pub(super) fn write_id_maps(pid: i32, uid_map: &str, gid_map: &str) -> io::Result<()> {
    for (file, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
        fs::write(format!("/proc/{pid}/{file}"), map)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {file} {map:?}: {e}")))?;
    }
    Ok(())
}

/// A user namespace with the given id maps and nothing in it, as an fd (for an idmapped
/// mount): a child cloned into it waits while its maps are written and the namespace is
/// opened, then ends.
pub(super) fn new_userns(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    let (wait_r, wait_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_NEWUSER | libc::CLONE_PIDFD) as u64,
        pidfd: (&raw mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    let (wait_fd, release_fd) = (wait_r.as_raw_fd(), wait_w.as_raw_fd());
    // SAFETY: clone3 with a valid clone_args of the size passed, no CLONE_VM, no new stack;
    // the child only closes, reads a pipe and exits (async-signal-safe calls only).
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
    if ret == 0 {
        // SAFETY: in the child: close(2), read(2) and _exit(2) only.
        unsafe {
            libc::close(release_fd);
            let mut byte = 0u8;
            libc::read(wait_fd, (&raw mut byte).cast(), 1);
            libc::_exit(0)
        }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = crate::num::syscall_int(ret);
    // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let made = write_id_maps(pid, uid_map, gid_map).and_then(|()| {
        nix::fcntl::open(
            format!("/proc/{pid}/ns/user").as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(io::Error::from)
    });
    // The child reads end-of-file (it closed its copy of the write end) and exits; it is
    // reaped here (a quick, bounded wait).
    drop(wait_w);
    drop(wait_r);
    let _ = waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED);
    made
}

/// What the child reported before exec, if anything (EOF: exec succeeded).
pub(super) fn read_spawn_error(pipe: OwnedFd) -> Option<String> {
    let mut buf = [0u8; 5];
    let mut f = fs::File::from(pipe);
    match f.read(&mut buf) {
        Ok(5) => {
            let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let err = io::Error::from_raw_os_error(errno);
            let step = match buf[0] {
                STEP_CGROUP => "joining the instance cgroup",
                STEP_FDS => "setting up file descriptors",
                STEP_EXEC => "executing the init",
                STEP_CGROUPNS => "entering a new cgroup namespace",
                STEP_WAIT => "waiting for the user namespace's id maps",
                STEP_ROOT => "becoming root in the user namespace",
                _ => "starting",
            };
            Some(format!("{step}: {err}"))
        }
        _ => None,
    }
}
