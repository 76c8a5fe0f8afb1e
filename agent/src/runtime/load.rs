//! The load on the services' listening sockets, as the kernel sees it: connections waiting in
//! each socket's accept queue and connections established through it, from one `sock_diag`
//! dump of the host's TCP sockets per sample (per address family in use), and one of its Unix
//! sockets when a Unix listener is among them, whatever the number of services. Also the
//! seam's other half for a cold start's failure: closing the connections still queued on a
//! socket no instance will accept.
//!
//! A Unix stream connection's accepted end carries its listener's address (the kernel copies
//! it), so the connected sockets bearing a listener's name are its accepted connections; the
//! listener's `UNIX_DIAG_RQLEN` is its accept queue, whose connections the kernel's table
//! does not list yet: they count as connections too, as TCP's do.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::unix::{self, ShowFlags, UnixRequest};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use nix::sys::socket::{SockaddrStorage, getsockname};

/// The load on one service's listening sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketLoad {
    /// Connections established through the sockets (their local address and port), those
    /// still in an accept queue included: the kernel completes the handshake before accept.
    pub connections: u32,
    /// Connections waiting in the sockets' accept queues.
    pub queued: u32,
}

/// Reads the load on listening sockets; the driver's view of the kernel's socket tables.
pub trait LoadProbe: Send + Sync + std::fmt::Debug {
    /// For each group of listening sockets (one per service), the load on it. A socket that
    /// cannot be inspected counts nothing; an error means no sample at all.
    fn socket_load(&self, groups: &[Vec<Arc<OwnedFd>>]) -> io::Result<Vec<SocketLoad>>;

    /// Accept and close every connection queued on `fd` without blocking; how many.
    fn close_queued(&self, fd: &OwnedFd) -> io::Result<u32>;
}

/// The kernel's tables through `NETLINK_SOCK_DIAG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelLoad;

/// TCP states as `sock_diag` reports them.
const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// The most messages one dump is read for, so that a kernel that never ends it cannot hold
/// the sampler.
const MAX_DUMP_READS: usize = 100_000;

/// Where one listening socket listens.
#[derive(Debug, Clone, Copy)]
struct Listener {
    group: usize,
    inode: u64,
    family: u8,
    addr: IpAddr,
    port: u16,
}

/// A Unix stream listening socket: its group and inode.
#[derive(Debug, Clone, Copy)]
struct UnixListener {
    group: usize,
    inode: u64,
}

impl LoadProbe for KernelLoad {
    fn socket_load(&self, groups: &[Vec<Arc<OwnedFd>>]) -> io::Result<Vec<SocketLoad>> {
        let mut out = vec![SocketLoad::default(); groups.len()];
        let listeners: Vec<Listener> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, fds)| fds.iter().filter_map(move |fd| listener(g, fd.as_fd())))
            .collect();
        let unix_listeners: Vec<UnixListener> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, fds)| {
                fds.iter()
                    .filter_map(move |fd| unix_listener(g, fd.as_fd()))
            })
            .collect();
        if !unix_listeners.is_empty() {
            unix_load(&unix_listeners, &mut out)?;
        }
        if listeners.is_empty() {
            return Ok(out);
        }
        let by_inode: HashMap<u64, usize> = listeners.iter().map(|l| (l.inode, l.group)).collect();
        let mut by_port: HashMap<(u8, u16), Vec<&Listener>> = HashMap::new();
        for l in &listeners {
            by_port.entry((l.family, l.port)).or_default().push(l);
        }
        for family in [AF_INET, AF_INET6] {
            if !listeners.iter().any(|l| l.family == family) {
                continue;
            }
            dump(family, |state, id, inode, recv_queue| match state {
                TCP_LISTEN => {
                    if let Some(&g) = by_inode.get(&inode) {
                        out[g].queued = out[g].queued.saturating_add(recv_queue);
                    }
                }
                TCP_ESTABLISHED => {
                    let Some(ls) = by_port.get(&(family, id.source_port)) else {
                        return;
                    };
                    // The first listener the connection's local address matches.
                    if let Some(l) = ls
                        .iter()
                        .find(|l| l.addr.is_unspecified() || l.addr == id.source_address)
                    {
                        out[l.group].connections = out[l.group].connections.saturating_add(1);
                    }
                }
                _ => {}
            })?;
        }
        Ok(out)
    }

    fn close_queued(&self, fd: &OwnedFd) -> io::Result<u32> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut closed = 0u32;
        loop {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut fds, PollTimeout::ZERO).map_err(io::Error::from)?;
            if ready == 0 {
                return Ok(closed);
            }
            // Non-blocking on the accepted socket only; the listening socket is shared with
            // instances and keeps its flags.
            match nix::sys::socket::accept4(
                fd.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_CLOEXEC
                    | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(conn) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) });
                    closed = closed.saturating_add(1);
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ECONNABORTED) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A TCP listening socket's identity and address; `None` for others.
fn listener(group: usize, fd: BorrowedFd<'_>) -> Option<Listener> {
    let inode = nix::sys::stat::fstat(fd).ok()?.st_ino;
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    let (family, ip, port) = if let Some(v4) = addr.as_sockaddr_in() {
        (AF_INET, IpAddr::V4(v4.ip()), v4.port())
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        (AF_INET6, IpAddr::V6(v6.ip()), v6.port())
    } else {
        return None;
    };
    Some(Listener {
        group,
        inode,
        family,
        addr: ip,
        port,
    })
}

/// A Unix stream listening socket's identity; `None` for others.
fn unix_listener(group: usize, fd: BorrowedFd<'_>) -> Option<UnixListener> {
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    addr.as_unix_addr()?;
    let inode = nix::sys::stat::fstat(fd).ok()?.st_ino;
    Some(UnixListener { group, inode })
}

/// One dump of the host's Unix sockets (listening and connected) for `listeners`: each
/// listener's queue, and the connected sockets bearing its name.
fn unix_load(listeners: &[UnixListener], out: &mut [SocketLoad]) -> io::Result<()> {
    let by_inode: HashMap<u64, usize> = listeners.iter().map(|l| (l.inode, l.group)).collect();
    // Listener names found in the dump, and connected sockets per name: the dump's order is
    // the kernel's, so both are matched once it ends.
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut connected: HashMap<String, u32> = HashMap::new();
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: unix::StateFlags::ESTABLISHED | unix::StateFlags::LISTEN,
        inode: 0,
        show_flags: ShowFlags::NAME | ShowFlags::RQLEN,
        cookie: [0xff; 8],
    });
    dump_messages(request, |message| {
        let SockDiagMessage::UnixResponse(r) = message else {
            return;
        };
        // Only stream sockets have listeners and connections.
        if i32::from(r.header.kind) != libc::SOCK_STREAM {
            return;
        }
        let Some(name) = r.name() else {
            return;
        };
        match r.header.state {
            TCP_LISTEN => {
                if let Some(&g) = by_inode.get(&u64::from(r.header.inode)) {
                    // A queued connection's server end is not in the kernel's table until
                    // accepted: it counts as a connection from the queue.
                    let queued = r.number_of_pending_connection().unwrap_or(0);
                    out[g].queued = out[g].queued.saturating_add(queued);
                    out[g].connections = out[g].connections.saturating_add(queued);
                    names.insert(name.clone(), g);
                }
            }
            TCP_ESTABLISHED => {
                *connected.entry(name.clone()).or_default() += 1;
            }
            _ => {}
        }
    })?;
    for (name, g) in names {
        let n = connected.get(&name).copied().unwrap_or(0);
        out[g].connections = out[g].connections.saturating_add(n);
    }
    Ok(())
}

/// One dump of the host's TCP sockets of `family` in the established and listening states:
/// `each(state, id, inode, recv_queue)` per socket.
fn dump(family: u8, mut each: impl FnMut(u8, &SocketId, u64, u32)) -> io::Result<()> {
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::ESTABLISHED | StateFlags::LISTEN,
        socket_id,
    });
    dump_messages(request, |message| {
        if let SockDiagMessage::InetResponse(r) = message {
            each(
                r.header.state,
                &r.header.socket_id,
                u64::from(r.header.inode),
                r.header.recv_queue,
            );
        }
    })
}

/// Send one `sock_diag` dump request and hand each answer to `each`.
fn dump_messages(
    request: SockDiagMessage,
    mut each: impl FnMut(SockDiagMessage),
) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut request = vec![0; packet.buffer_len()];
    packet.serialize(&mut request[..]);
    socket.send(&request[..], 0)?;

    // Large enough for the kernel's dump batches (it fills up to a page-sized skb or more).
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_DUMP_READS {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if size == 0 {
            return Ok(());
        }
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(m) => each(m),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag dump: {e}")));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
    Err(io::Error::other("sock_diag dump did not end"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use super::{KernelLoad, LoadProbe, SocketLoad};

    #[test]
    fn counts_queued_then_established_connections_of_each_listener() {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (pa, pb) = (a.local_addr().expect("addr"), b.local_addr().expect("addr"));
        let _c1 = TcpStream::connect(pa).expect("connect");
        let _c2 = TcpStream::connect(pa).expect("connect");
        let _c3 = TcpStream::connect(pb).expect("connect");
        let groups = vec![
            vec![Arc::new(OwnedFd::from(a.try_clone().expect("dup")))],
            vec![Arc::new(OwnedFd::from(b.try_clone().expect("dup")))],
        ];
        let load = KernelLoad.socket_load(&groups).expect("sample");
        assert_eq!(
            load,
            vec![
                SocketLoad {
                    connections: 2,
                    queued: 2
                },
                SocketLoad {
                    connections: 1,
                    queued: 1
                }
            ]
        );
        let (mut s1, _) = a.accept().expect("accept");
        s1.write_all(b"x").expect("write");
        let load = KernelLoad.socket_load(&groups).expect("sample");
        assert_eq!(
            load[0],
            SocketLoad {
                connections: 2,
                queued: 1
            }
        );
        // Closing the queued one: it is reset, the accepted one stays.
        let closed = KernelLoad
            .close_queued(&groups[0][0])
            .expect("close queued");
        assert_eq!(closed, 1);
        let load = KernelLoad.socket_load(&groups).expect("sample");
        assert_eq!(
            load[0],
            SocketLoad {
                connections: 1,
                queued: 0
            }
        );
    }
}

#[cfg(test)]
mod unix_tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::Arc;

    use super::{KernelLoad, LoadProbe, SocketLoad};

    #[test]
    fn counts_the_connections_and_queue_of_a_unix_listener_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.sock");
        let other = dir.path().join("b.sock");
        let a = UnixListener::bind(&path).expect("bind");
        // Another listener's connections are not this one's.
        let b = UnixListener::bind(&other).expect("bind");
        let _o = UnixStream::connect(&other).expect("connect");
        let _c1 = UnixStream::connect(&path).expect("connect");
        let _c2 = UnixStream::connect(&path).expect("connect");
        let _c3 = UnixStream::connect(&path).expect("connect");
        let groups = vec![
            vec![Arc::new(OwnedFd::from(a.try_clone().expect("dup")))],
            vec![Arc::new(OwnedFd::from(b.try_clone().expect("dup")))],
        ];
        let load = KernelLoad.socket_load(&groups).expect("sample");
        assert_eq!(
            load,
            vec![
                SocketLoad {
                    connections: 3,
                    queued: 3
                },
                SocketLoad {
                    connections: 1,
                    queued: 1
                }
            ]
        );
        // Accepted: no longer queued, still a connection; closed by the client and the
        // server: gone.
        let (s1, _) = a.accept().expect("accept");
        let (s2, _) = a.accept().expect("accept");
        let load = KernelLoad.socket_load(&groups).expect("sample");
        assert_eq!(
            load[0],
            SocketLoad {
                connections: 3,
                queued: 1
            }
        );
        drop((s1, s2, _c1, _c2));
        let load = KernelLoad.socket_load(&groups).expect("sample");
        assert_eq!(
            load[0],
            SocketLoad {
                connections: 1,
                queued: 1
            }
        );
    }
}
