//! When processes exec, as the kernel reports it: the process events connector
//! (`NETLINK_CONNECTOR`, `CN_IDX_PROC`) sends one message per `execve(2)`, stamped with the
//! kernel's `CLOCK_MONOTONIC` time of the exec. The start benchmarks time "Apply -> the
//! service process has executed" with it, from outside corral and without polling `/proc`.
//!
//! The fork events come along: [`ExecWatch::fork_of`] says when a process that executed was
//! forked, and by whom, which splits a start into the init's clone, its setup and the service's
//! own steps before `execve`.
//!
//! Root only, and in the initial network namespace (the connector exists only there).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
/// Forks kept for [`ExecWatch::fork_of`]: the oldest half is dropped beyond this.
const FORKS_KEPT: usize = 1 << 16;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct cn_msg` without its data.
const CN_MSG: usize = 20;

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of the kernel's event stamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The size of a `T` as a socket length.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// A subscription to the kernel's exec events. A thread reads them as they come and takes
/// each process's command line at once, while a short-lived process (a job's) still runs.
#[derive(Debug)]
pub struct ExecWatch {
    rx: std::sync::mpsc::Receiver<Seen>,
    /// Forks read so far, by the new process's PID.
    forks: std::collections::HashMap<i32, Fork>,
    /// Their order, to drop the oldest.
    fork_order: std::collections::VecDeque<i32>,
}

/// What the reading thread passes on.
#[derive(Debug)]
enum Seen {
    Exec(Exec, String),
    Fork(Fork),
}

/// One event off the socket.
#[derive(Debug, Clone, Copy)]
enum Event {
    Exec(Exec),
    Fork(Fork),
}

/// A new process (not a thread): who forked it, and when.
#[derive(Debug, Clone, Copy)]
pub struct Fork {
    pub parent: i32,
    pub child: i32,
    /// The kernel's `CLOCK_MONOTONIC` time of the fork, in nanoseconds.
    pub at_ns: u64,
}

/// The socket the thread reads.
#[derive(Debug)]
struct Events {
    fd: OwnedFd,
}

/// One process that executed a matching command line.
#[derive(Debug, Clone, Copy)]
pub struct Exec {
    pub pid: i32,
    /// The kernel's `CLOCK_MONOTONIC` time of the exec, in nanoseconds.
    pub at_ns: u64,
}

impl Exec {
    /// From `t0` (a [`monotonic_ns`] time) to this exec; zero when it came before.
    pub fn since(&self, t0: u64) -> Duration {
        Duration::from_nanos(self.at_ns.saturating_sub(t0))
    }
}

impl ExecWatch {
    /// Subscribes; events are kept until read.
    pub fn new() -> io::Result<ExecWatch> {
        let mut events = Events::subscribe()?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Ends when the watch is dropped (the send fails) or the socket fails.
            while let Ok(next) = events.next(Duration::from_secs(3600)) {
                let seen = match next {
                    None => continue,
                    Some(Event::Fork(f)) => Seen::Fork(f),
                    Some(Event::Exec(e)) => {
                        let cmdline =
                            std::fs::read(format!("/proc/{}/cmdline", e.pid)).unwrap_or_default();
                        Seen::Exec(e, String::from_utf8_lossy(&cmdline).into_owned())
                    }
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Ok(ExecWatch {
            rx,
            forks: std::collections::HashMap::new(),
            fork_order: std::collections::VecDeque::new(),
        })
    }

    /// The fork that made process `pid`, among those read so far (a process seen executing by
    /// [`ExecWatch::wait`] was forked before, so its fork has been read).
    pub fn fork_of(&self, pid: i32) -> Option<Fork> {
        self.forks.get(&pid).copied()
    }

    fn keep_fork(&mut self, f: Fork) {
        if self.fork_order.len() >= FORKS_KEPT {
            for old in self.fork_order.drain(..FORKS_KEPT / 2) {
                self.forks.remove(&old);
            }
        }
        self.fork_order.push_back(f.child);
        self.forks.insert(f.child, f);
    }

    /// From `since_ns` to the last of the next `n` execs of `marker` (see [`ExecWatch::wait`]),
    /// each within 30 s; panics when they do not come (for benchmarks).
    pub fn took(&mut self, marker: &str, n: usize, since_ns: u64) -> Duration {
        let seen = self
            .wait(marker, n, since_ns, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("exec events of {marker:?}: {e}"));
        let last = seen.iter().map(|e| e.at_ns).max().unwrap_or(since_ns);
        Duration::from_nanos(last.saturating_sub(since_ns))
    }

    /// The next exec of `marker` at or after `since_ns`, within 30 s; panics when none
    /// comes (for benchmarks).
    pub fn next_exec(&mut self, marker: &str, since_ns: u64) -> Exec {
        match self.wait(marker, 1, since_ns, Duration::from_secs(30)) {
            Ok(seen) if !seen.is_empty() => seen[0],
            Ok(_) => panic!("no exec of {marker:?}"),
            Err(e) => panic!("exec events of {marker:?}: {e}"),
        }
    }

    /// Subscribes, or panics saying why (for benchmarks).
    pub fn subscribe() -> ExecWatch {
        ExecWatch::new().unwrap_or_else(|e| {
            panic!("subscribing to exec events (root, in the host's network namespace): {e}")
        })
    }

    /// Waits for `n` execs at or after `since_ns` of processes whose command line contains
    /// `marker`, each within `timeout` of the previous; returns them in order.
    pub fn wait(
        &mut self,
        marker: &str,
        n: usize,
        since_ns: u64,
        timeout: Duration,
    ) -> io::Result<Vec<Exec>> {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            let (e, cmdline) = match self.rx.recv_timeout(timeout) {
                Ok(Seen::Exec(e, cmdline)) => (e, cmdline),
                Ok(Seen::Fork(f)) => {
                    self.keep_fork(f);
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} of {n} execs of {marker:?} seen", seen.len()),
                    ));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other(
                        "the exec events stopped (the socket overflowed or failed)",
                    ));
                }
            };
            if e.at_ns >= since_ns && cmdline.contains(marker) {
                seen.push(e);
            }
        }
        Ok(seen)
    }
}

impl Events {
    /// Subscribes; events queue in the socket (8 MiB) until read.
    fn subscribe() -> io::Result<Events> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a c_int we own; a failure only leaves the default size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                socklen::<libc::c_int>(),
            )
        };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or_default();
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: bind(2) with a sockaddr_nl we own and its size.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                socklen::<libc::sockaddr_nl>(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG + 4);
        let total = u32::try_from(NLMSG_HDR + CN_MSG + 4).unwrap_or_default();
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(
            &u16::try_from(libc::NLMSG_DONE)
                .unwrap_or_default()
                .to_ne_bytes(),
        );
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: send(2) of a buffer we own.
        if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Events { fd })
    }

    /// The next exec or process fork event, or `None` when none came within `timeout`.
    fn next(&mut self, timeout: Duration) -> io::Result<Option<Event>> {
        let mut buf = [0u8; 256];
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: poll(2) on one pollfd we own.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            if r == 0 {
                return Ok(None);
            }
            // SAFETY: recv(2) into a buffer we own, at most its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    return Err(io::Error::other(
                        "exec events were dropped: the socket overflowed",
                    ));
                }
                return Err(e);
            }
            let msg = &buf[..usize::try_from(n).unwrap_or(0)];
            let ev = NLMSG_HDR + CN_MSG;
            let u32_at = |o: usize| {
                msg.get(o..o + 4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            };
            let u64_at = |o: usize| {
                msg.get(o..o + 8).map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    u64::from_ne_bytes(a)
                })
            };
            let pid = |o: usize| u32_at(o).and_then(|v| i32::try_from(v).ok());
            let Some(at_ns) = u64_at(ev + 8) else {
                continue;
            };
            match u32_at(ev) {
                // exec_proc_event: process_pid, process_tgid.
                Some(PROC_EVENT_EXEC) => {
                    let Some(tgid) = pid(ev + 20) else { continue };
                    return Ok(Some(Event::Exec(Exec { pid: tgid, at_ns })));
                }
                // fork_proc_event: parent_pid, parent_tgid, child_pid, child_tgid.
                Some(PROC_EVENT_FORK) => {
                    let (Some(parent), Some(child_pid), Some(child)) =
                        (pid(ev + 20), pid(ev + 24), pid(ev + 28))
                    else {
                        continue;
                    };
                    // A thread is no new process.
                    if child_pid != child {
                        continue;
                    }
                    return Ok(Some(Event::Fork(Fork {
                        parent,
                        child,
                        at_ns,
                    })));
                }
                _ => continue,
            }
        }
    }
}
