//! The agent's own side of systemd's notification protocol (`sd_notify`, for `Type=notify`
//! units): `READY=1` once the API serves, `WATCHDOG=1` pings while the agent is healthy when
//! the unit sets `WatchdogSec=`, and `STOPPING=1` when it shuts down. Datagrams go to
//! `$NOTIFY_SOCKET`, a filesystem path or an abstract name (`@name`); without it (not under
//! systemd, or another service type) every call does nothing.
//!
//! The watchdog pings only after a health check passes within the ping interval (the agent
//! passes one that asks the supervisor a cheap question), so a wedged supervisor is restarted
//! by systemd even though the process is alive.
//!
//! Instances never see the agent's `NOTIFY_SOCKET` or `WATCHDOG_*`: their environment is built
//! from scratch (`runtime::service_env`), not inherited, and a service that reports readiness
//! itself gets its own init's socket instead.
//!
//! Imports nothing from the crate.

use std::future::Future;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Where systemd listens for this service's notifications.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog period in microseconds, set by systemd when the unit has `WatchdogSec=`.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog period is meant for; absent means the main process.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A sender of notifications to systemd; does nothing when there is no `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for; a no-op one without it. An unusable value is
    /// logged and ignored: the agent runs the same, systemd just hears nothing.
    pub fn from_env() -> Notifier {
        match std::env::var(NOTIFY_SOCKET) {
            Ok(addr) if !addr.is_empty() => Notifier::new(&addr).unwrap_or_else(|e| {
                tracing::warn!(socket = %addr, error = %e, "cannot notify systemd");
                Notifier::none()
            }),
            _ => Notifier::none(),
        }
    }

    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier { target: None }
    }

    /// A notifier sending to `addr`: an absolute path, or `@name` in the abstract namespace.
    pub fn new(addr: &str) -> io::Result<Notifier> {
        let addr = match addr.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None if addr.starts_with('/') => SocketAddr::from_pathname(addr)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{addr:?} is neither an absolute path nor @abstract"),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must not stall the runtime: the message is dropped instead.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some((socket, addr)),
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state`, newline-separated `KEY=VALUE` assignments, as one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((socket, addr)) => socket.send_to_addr(state.as_bytes(), addr).map(drop),
            None => Ok(()),
        }
    }

    /// `notify`, with a failure logged rather than returned: systemd not hearing from the
    /// agent is no reason for the agent to stop.
    fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state = %state.replace('\n', " "), "cannot notify systemd");
        }
    }

    /// The service is up: `READY=1`, with a `STATUS=` line and our PID as `MAINPID`.
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}",
            status.replace('\n', " "),
            std::process::id()
        ));
    }

    /// The service is shutting down: `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down; instances keep running");
    }

    /// Starts the watchdog task when systemd asked for one (see [`watchdog_interval`]): from
    /// now until `shutdown`, `WATCHDOG=1` every half period, each time `healthy` answers
    /// true within that time. Returns whether a watchdog was started.
    pub fn spawn_watchdog<F, Fut>(
        self: &std::sync::Arc<Self>,
        healthy: F,
        shutdown: CancellationToken,
    ) -> bool
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let interval = watchdog_interval(
            std::env::var(WATCHDOG_USEC).ok().as_deref(),
            std::env::var(WATCHDOG_PID).ok().as_deref(),
            std::process::id(),
        );
        match interval {
            Some(every) if self.is_active() => {
                tracing::info!(every = ?every, "systemd watchdog: pinging while the supervisor answers");
                tokio::spawn(watchdog(self.clone(), every, healthy, shutdown));
                true
            }
            _ => false,
        }
    }
}

/// How often to ping systemd's watchdog: half of `WATCHDOG_USEC`, when it is set, positive,
/// and meant for this process (`WATCHDOG_PID` absent or equal to `own_pid`).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Pings `WATCHDOG=1` every `every` after `healthy` answered true within `every`, until
/// `shutdown`. A missed answer skips that ping (and is logged): after enough of them systemd
/// restarts the agent, which is what the watchdog is for.
pub async fn watchdog<F, Fut>(
    notifier: std::sync::Arc<Notifier>,
    every: Duration,
    mut healthy: F,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(every, healthy()).await {
            Ok(true) => notifier.send("WATCHDOG=1"),
            Ok(false) => tracing::warn!("systemd watchdog: the agent is not healthy; no ping"),
            Err(_) => tracing::warn!(
                within = ?every,
                "systemd watchdog: the supervisor did not answer in time; no ping"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A datagram socket standing in for systemd's, bound in a temp dir.
    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        (dir, socket, path.display().to_string())
    }

    /// Every datagram waiting on `socket`.
    fn received(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn ready_and_stopping_reach_a_path_socket() {
        let (_dir, socket, path) = listener();
        let n = Notifier::new(&path).expect("notifier");
        assert!(n.is_active());
        n.ready("serving on /run/corral/corral.sock");
        n.stopping();
        let got = received(&socket);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0],
            format!(
                "READY=1\nSTATUS=serving on /run/corral/corral.sock\nMAINPID={}",
                std::process::id()
            )
        );
        assert!(got[1].starts_with("STOPPING=1\n"), "{got:?}");
    }

    #[test]
    fn abstract_sockets_are_reached_by_at_name() {
        let name = format!("corral-sdnotify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        socket.set_nonblocking(true).expect("nonblocking");
        Notifier::new(&format!("@{name}"))
            .expect("notifier")
            .notify("WATCHDOG=1")
            .expect("send");
        assert_eq!(received(&socket), vec!["WATCHDOG=1".to_string()]);
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        let n = Notifier::none();
        assert!(!n.is_active());
        n.ready("x");
        n.stopping();
        n.notify("WATCHDOG=1").expect("a no-op");
        assert!(Notifier::new("relative/path").is_err());
        assert!(Notifier::new("vsock:2:1234").is_err());
    }

    #[test]
    fn a_vanished_listener_is_not_fatal() {
        let (dir, socket, path) = listener();
        let n = Notifier::new(&path).expect("notifier");
        drop(socket);
        drop(dir);
        assert!(n.notify("READY=1").is_err());
        n.ready("still running"); // logged, not returned
    }

    #[test]
    fn watchdog_interval_is_half_the_period_for_this_process_only() {
        let cases: [(Option<&str>, Option<&str>, Option<Duration>); 9] = [
            (None, None, None),
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("42"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("43"), None),
            (Some("30000000"), Some("x"), None),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("soon"), None, None),
            (Some("1"), None, Some(Duration::from_millis(1))),
        ];
        for (usec, pid, want) in cases {
            assert_eq!(watchdog_interval(usec, pid, 42), want, "{usec:?} {pid:?}");
        }
    }

    /// Pings follow the health check: none while it fails or does not answer in time, one per
    /// period while it passes, none after shutdown.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_pings_only_while_healthy() {
        let (_dir, socket, path) = listener();
        let n = Arc::new(Notifier::new(&path).expect("notifier"));
        let healthy = Arc::new(AtomicBool::new(true));
        let hang = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let (h, s) = (healthy.clone(), hang.clone());
        let task = tokio::spawn(watchdog(
            n,
            Duration::from_secs(1),
            move || {
                let (h, s) = (h.clone(), s.clone());
                async move {
                    if s.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    h.load(Ordering::SeqCst)
                }
            },
            shutdown.clone(),
        ));
        let pings = |socket: &UnixDatagram| {
            received(socket)
                .iter()
                .filter(|m| *m == "WATCHDOG=1")
                .count()
        };
        // The first tick is immediate, then one a second.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(pings(&socket), 4);
        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(pings(&socket), 0, "unhealthy: no pings");
        healthy.store(true, Ordering::SeqCst);
        hang.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pings(&socket), 0, "no answer: no pings");
        hang.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(pings(&socket) >= 2, "pings again once it answers");
        shutdown.cancel();
        task.await.expect("the watchdog ends at shutdown");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(pings(&socket), 0);
    }
}
