//! The load on the services' listening sockets, as the kernel sees it: connections waiting in
//! each socket's accept queue and connections established through it, from one `sock_diag`
//! dump of the host's TCP sockets per sample (per address family in use), whatever the number
//! of services. Also the seam's other half for a cold start's failure: closing the
//! connections still queued on a socket no instance will accept.
//!
//! Unix listeners are waited on for a cold start like TCP ones, but their connections are not
//! counted here.

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

impl LoadProbe for KernelLoad {
    fn socket_load(&self, groups: &[Vec<Arc<OwnedFd>>]) -> io::Result<Vec<SocketLoad>> {
        let mut out = vec![SocketLoad::default(); groups.len()];
        let listeners: Vec<Listener> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, fds)| fds.iter().filter_map(move |fd| listener(g, fd.as_fd())))
            .collect();
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

/// One dump of the host's TCP sockets of `family` in the established and listening states:
/// `each(state, id, inode, recv_queue)` per socket.
fn dump(family: u8, mut each: impl FnMut(u8, &SocketId, u64, u32)) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED | StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
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
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => each(
                    r.header.state,
                    &r.header.socket_id,
                    u64::from(r.header.inode),
                    r.header.recv_queue,
                ),
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
