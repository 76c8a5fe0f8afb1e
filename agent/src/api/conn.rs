//! API connections: any byte stream (a Unix socket, a TLS session) with the [`Caller`] it
//! belongs to, closed once it has had no open call for the idle timeout. The caller comes
//! from the kernel for the Unix socket (peer credentials; the socket's 0660 mode already let
//! only root and its group connect) and from the client certificate for TLS (see `tls`).
//! Unix socket connections read through [`FixAuthority`], so that clients which send the
//! socket path as `:authority` are served (see `authority`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};

use super::auth::{Caller, Role};
use super::authority::FixAuthority;

/// A connection with no open call for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// An API connection.
#[derive(Debug)]
pub struct Conn<S> {
    io: S,
    caller: Caller,
    idle_timeout: Duration,
    check: Pin<Box<Sleep>>,
    /// Held for the connection's life (a place in the connection caps).
    places: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl<S> Conn<S> {
    pub fn new(io: S, caller: Caller, idle_timeout: Duration) -> Self {
        Conn {
            io,
            caller,
            idle_timeout,
            check: Box::pin(tokio::time::sleep(idle_timeout)),
            places: Vec::new(),
        }
    }

    /// Keep `place` until the connection closes.
    pub fn hold(mut self, place: impl std::any::Any + Send + Sync) -> Self {
        self.places.push(Box::new(place));
        self
    }

    /// Whether the connection has been idle for the timeout; re-arms the check otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.check.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            let next = match self.caller.conn.idle_since() {
                Some(since) => {
                    if now.saturating_duration_since(since) >= self.idle_timeout {
                        return true;
                    }
                    since + self.idle_timeout
                }
                None => now + self.idle_timeout,
            };
            self.check.as_mut().reset(next);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        if this.poll_idle(cx) {
            tracing::debug!(caller = %this.caller, "closing an idle API connection");
            // End of stream: the HTTP/2 server closes the connection.
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

write_through!(Conn);

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

/// The caller on a Unix socket connection: whoever the kernel let connect is `admin` (the
/// socket is 0660: root and the socket's group).
pub fn unix_caller(stream: &UnixStream) -> Caller {
    let (who, peer) = match stream.peer_cred() {
        // The uid as such: a user-name lookup may go through NSS (LDAP, sssd) and block
        // the accept path.
        Ok(cred) => {
            let pid = cred
                .pid()
                .map_or_else(|| "unix".to_string(), |p| format!("unix pid {p}"));
            (format!("uid {}", cred.uid()), pid)
        }
        Err(e) => (format!("unknown local user ({e})"), "unix".to_string()),
    };
    Caller {
        who: who.into(),
        peer: peer.into(),
        role: Role::Admin,
        conn: Arc::default(),
    }
}

/// The connections accepted on the Unix socket, any `:authority` accepted; a failed accept
/// (out of file descriptors) is retried with a backoff, never in a spinning loop.
pub fn unix_incoming(
    listener: UnixListener,
    idle_timeout: Duration,
) -> impl Stream<Item = io::Result<Conn<FixAuthority<UnixStream>>>> {
    crate::accept::UnixIncoming::new(listener, "API (Unix socket)").map(move |r| {
        r.map(|stream| {
            let caller = unix_caller(&stream);
            Conn::new(FixAuthority::new(stream), caller, idle_timeout)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn caller() -> Caller {
        Caller {
            who: "t".into(),
            peer: "p".into(),
            role: Role::Read,
            conn: Arc::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_and_a_busy_one_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let c = caller();
        let state = c.conn.clone();
        let mut conn = Conn::new(a, c, Duration::from_secs(10));
        // Data flows both ways.
        b.write_all(b"hi").await.expect("write");
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hi");
        // A call is open: no end however long it lasts.
        let call = state.begin();
        let mut one = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut one)).await;
        assert!(r.is_err(), "still open while a call runs");
        drop(call);
        // Idle: it reads as ended after the timeout.
        let start = Instant::now();
        let n = conn.read(&mut one).await.expect("read");
        assert_eq!(n, 0, "end of stream");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(9) && waited <= Duration::from_secs(11),
            "{waited:?}"
        );
    }
}
