//! Accepting connections on the agent's listeners: the API's TLS listener and the metrics
//! endpoint go through one loop, [`serve`], and the API's Unix socket through
//! [`Backoff`] too.
//!
//! What a client on the network can hold is bounded: open connections overall and per
//! address, handshakes in progress overall (more connections wait in the kernel's backlog)
//! and per address (more are closed at once, so that one address cannot take every
//! handshake slot), a connection that sends nothing within the first-byte timeout is
//! closed, and a handshake (TLS, or none for plain HTTP) not done within the handshake
//! timeout is closed. An accept that fails (out of file descriptors: `EMFILE`, `ENFILE`,
//! `ENOBUFS`) is retried after a delay that doubles up to [`Backoff::MAX`], never in a
//! loop that spins a core.
//!
//! Imports nothing internal but the counting and log budget helpers.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::api::auth::{CountGuard, Counts};
use crate::api::ratelog::LogBudget;

/// The handshake bounds, the same for every TCP listener of the agent; set with
/// `--first-byte-timeout`, `--handshake-timeout`, `--max-handshakes` and
/// `--max-handshakes-per-address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshakes {
    /// Handshakes in progress at once; more connections wait in the backlog.
    pub max: usize,
    /// Handshakes in progress at once from one address; more are closed as they come.
    pub max_per_address: usize,
    /// A connection that sends nothing within this is closed.
    pub first_byte_timeout: Duration,
    /// A handshake not done within this (after the first byte) is closed.
    pub timeout: Duration,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes {
            max: 64,
            max_per_address: 8,
            first_byte_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Handshakes {
    /// Check the bounds together; the error names the flag and says what to give.
    pub fn check(&self) -> Result<(), String> {
        if self.max == 0 {
            return Err(
                "--max-handshakes 0 would never accept a connection: give 1 or more".into(),
            );
        }
        if self.max_per_address == 0 || self.max_per_address > self.max {
            return Err(format!(
                "--max-handshakes-per-address {}: give 1 to --max-handshakes ({}), well below \
                 it so that one address cannot take every handshake slot",
                self.max_per_address, self.max
            ));
        }
        for (flag, d) in [
            ("--first-byte-timeout", self.first_byte_timeout),
            ("--handshake-timeout", self.timeout),
        ] {
            if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&d) {
                return Err(format!("{flag} {d:?} is out of range: give 100ms to 5m"));
            }
        }
        Ok(())
    }
}

/// One listener's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Names the listener in the log ("API", "metrics").
    pub what: &'static str,
    /// Connections open at once; more are closed as they come.
    pub connections: usize,
    /// Connections open at once from one address.
    pub connections_per_address: usize,
    pub handshakes: Handshakes,
}

/// The places a connection holds until it closes: keep it alive as long as the connection.
#[derive(Debug)]
pub struct Held {
    _connection: OwnedSemaphorePermit,
    _address: CountGuard<IpAddr>,
}

/// Accept connections on `listener` until `shutdown`. For each, within the bounds of
/// `limits`: wait for its first byte, run `handshake` on it (under the handshake timeout,
/// holding a handshake slot), then `serve` what it gave with the places it holds.
/// `handshake` says why it refused a connection in its error.
pub async fn serve<T, H, HF, S, SF>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handshake: H,
    serve: S,
) where
    T: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> HF + Send + Sync + 'static,
    HF: Future<Output = Result<T, String>> + Send + 'static,
    S: Fn(T, SocketAddr, Held) -> SF + Send + Sync + 'static,
    SF: Future<Output = ()> + Send + 'static,
{
    let handshake = Arc::new(handshake);
    let serve = Arc::new(serve);
    let refusals = Arc::new(LogBudget::new(
        "connections refused",
        20,
        Duration::from_secs(10),
    ));
    let slots = Arc::new(Semaphore::new(limits.handshakes.max));
    let connections = Arc::new(Semaphore::new(limits.connections));
    let per_address: Arc<Counts<IpAddr>> = Counts::new(limits.connections_per_address);
    let slots_per_address: Arc<Counts<IpAddr>> = Counts::new(limits.handshakes.max_per_address);
    let mut backoff = Backoff::new(limits.what);
    let what = limits.what;
    // Connections refused before their handshake, and handshakes refused.
    let refuse = move |peer: SocketAddr, why: &str| {
        if refusals.admit() {
            tracing::info!(%peer, error = %why, "{what}: connection refused");
        }
    };
    let handshake_refusals = Arc::new(LogBudget::new(
        "TLS handshakes refused",
        20,
        Duration::from_secs(10),
    ));
    let refuse_handshake = Arc::new(move |peer: SocketAddr, why: &str| {
        if handshake_refusals.admit() {
            tracing::info!(%peer, error = %why, "{what}: TLS handshake refused");
        }
    });
    let refuse = Arc::new(refuse);
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    backoff.wait(&e).await;
                    continue;
                }
            },
        };
        backoff.reset();
        let Ok(connection) = connections.clone().try_acquire_owned() else {
            refuse(peer, &format!("{} connections open", limits.connections));
            continue;
        };
        let Some(address) = per_address.take(peer.ip()) else {
            refuse(
                peer,
                &format!(
                    "{} connections open from this address",
                    limits.connections_per_address
                ),
            );
            continue;
        };
        let Some(address_slot) = slots_per_address.take(peer.ip()) else {
            refuse(
                peer,
                &format!(
                    "{} handshakes in progress from this address",
                    limits.handshakes.max_per_address
                ),
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (handshake, serve, refuse) = (handshake.clone(), serve.clone(), refuse.clone());
        let refuse_handshake = refuse_handshake.clone();
        let bounds = limits.handshakes;
        tokio::spawn(async move {
            match tokio::time::timeout(bounds.first_byte_timeout, first_byte(&tcp)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) | Ok(Err(_)) => return,
                Err(_) => {
                    refuse(
                        peer,
                        &format!(
                            "sent nothing within {}",
                            humantime_ish(bounds.first_byte_timeout)
                        ),
                    );
                    return;
                }
            }
            let done = tokio::time::timeout(bounds.timeout, handshake(tcp, peer)).await;
            drop(slot);
            drop(address_slot);
            match done {
                Ok(Ok(t)) => {
                    serve(
                        t,
                        peer,
                        Held {
                            _connection: connection,
                            _address: address,
                        },
                    )
                    .await
                }
                Ok(Err(why)) => refuse_handshake(peer, &why),
                Err(_) => refuse_handshake(
                    peer,
                    &format!(
                        "handshake not done within {}",
                        humantime_ish(bounds.timeout)
                    ),
                ),
            }
        });
    }
}

/// Whether the connection sent a byte (false: it closed first). Reads nothing.
async fn first_byte(tcp: &TcpStream) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    Ok(tcp.peek(&mut byte).await? > 0)
}

fn humantime_ish(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The delay after a failed accept: doubles from [`Backoff::FIRST`] to [`Backoff::MAX`]
/// while accepts keep failing, back to the start after one succeeds. The first failure of
/// a run is logged, and the end of the run.
#[derive(Debug)]
pub struct Backoff {
    what: &'static str,
    next: Duration,
    failures: u64,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    pub fn new(what: &'static str) -> Self {
        Backoff {
            what,
            next: Self::FIRST,
            failures: 0,
        }
    }

    /// The delay to wait after this failure; counts it (and logs the first of a run).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        if self.failures == 0 {
            tracing::warn!(error = %e, "{}: accepting a connection failed; retrying with backoff", self.what);
        }
        self.failures += 1;
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    /// Wait as [`Backoff::failed`] says.
    pub async fn wait(&mut self, e: &io::Error) {
        let delay = self.failed(e);
        tokio::time::sleep(delay).await;
    }

    /// An accept succeeded.
    pub fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                failures = self.failures,
                "{}: accepting connections again",
                self.what
            );
        }
        self.failures = 0;
        self.next = Self::FIRST;
    }
}

/// The connections accepted on a Unix socket, as a stream; a failed accept is retried
/// after the [`Backoff`] delay (the stream never yields an error).
#[derive(Debug)]
pub struct UnixIncoming {
    listener: UnixListener,
    backoff: Backoff,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl UnixIncoming {
    pub fn new(listener: UnixListener, what: &'static str) -> Self {
        UnixIncoming {
            listener,
            backoff: Backoff::new(what),
            sleep: None,
        }
    }
}

impl tokio_stream::Stream for UnixIncoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, _))) => {
                    self.backoff.reset();
                    return Poll::Ready(Some(Ok(stream)));
                }
                Poll::Ready(Err(e)) => {
                    let delay = self.backoff.failed(&e);
                    self.sleep = Some(Box::pin(tokio::time::sleep(delay)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_bound_and_resets() {
        let mut b = Backoff::new("test");
        let e = io::Error::from_raw_os_error(24);
        let delays: Vec<Duration> = (0..10).map(|_| b.failed(&e)).collect();
        assert_eq!(delays[0], Backoff::FIRST);
        assert_eq!(delays[1], Backoff::FIRST * 2);
        assert_eq!(*delays.last().expect("ten"), Backoff::MAX);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        b.reset();
        assert_eq!(b.failed(&e), Backoff::FIRST);
    }

    #[test]
    fn handshake_bounds_are_checked() {
        assert!(Handshakes::default().check().is_ok());
        let d = Handshakes::default();
        for (bad, flag) in [
            (Handshakes { max: 0, ..d }, "--max-handshakes"),
            (
                Handshakes {
                    max_per_address: 0,
                    ..d
                },
                "--max-handshakes-per-address",
            ),
            (
                Handshakes {
                    max_per_address: 65,
                    ..d
                },
                "--max-handshakes-per-address",
            ),
            (
                Handshakes {
                    first_byte_timeout: Duration::ZERO,
                    ..d
                },
                "--first-byte-timeout",
            ),
            (
                Handshakes {
                    timeout: Duration::from_secs(3600),
                    ..d
                },
                "--handshake-timeout",
            ),
        ] {
            let e = bad.check().expect_err(flag);
            assert!(e.starts_with(flag), "{e}");
        }
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_handshake_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let limits = Limits {
            what: "test",
            connections: 100,
            connections_per_address: 100,
            handshakes: Handshakes {
                max: 8,
                max_per_address: 2,
                first_byte_timeout: Duration::from_millis(300),
                timeout: Duration::from_secs(5),
            },
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(serve(
            listener,
            limits,
            shutdown.clone(),
            |mut tcp: TcpStream, _| async move {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                Ok((tcp, b[0]))
            },
            move |(tcp, b), _, held| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(b).await;
                    drop((tcp, held));
                }
            },
        ));
        // Idle connections from one address: two hold slots, the rest are closed at once,
        // and the two are closed after the first-byte timeout.
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        let mut sender = socket.connect(addr).await.expect("connect from 127.0.0.2");
        tokio::io::AsyncWriteExt::write_all(&mut sender, b"x")
            .await
            .expect("write");
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the other address is served");
        assert_eq!(got, Some(b'x'));
        for mut c in idle {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::io::AsyncReadExt::read(&mut c, &mut b),
            )
            .await
            .expect("closed by the agent");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        shutdown.cancel();
    }
}
