//! The gRPC API: `corral.v1.Agent`, `grpc.health.v1` and reflection, served on a Unix socket
//! and, optionally, on TCP with TLS. A thin layer: [`service`] maps requests to supervisor
//! operations, [`convert`] maps types, [`status`] maps errors to codes; [`auth`] decides who
//! may call what, [`conn`] and [`tls`] accept connections. Only this module and `main` touch
//! tonic and prost.
//!
//! Imports from the crate: `supervisor`, `spec`, `host`, `events`, `health` (service health
//! only), `cgroups` (capabilities only), `metrics` (the layer counting calls).

/// `AsyncWrite` for a connection wrapper whose writes go straight to its `io` field.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }
        }
    };
}

pub mod auth;
pub mod authority;
pub mod calls;
pub mod conn;
pub mod convert;
mod lazy;
pub mod ratelog;
pub mod service;
pub mod status;
pub mod tls;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use corral_proto::v1::agent_server::AgentServer;
use std::collections::BTreeMap;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::health::ServiceHealth;
use crate::metrics::ApiMetricsLayer;
use auth::AuthLayer;
use calls::Stopping;

pub use service::AgentService;

/// Bind the API socket: a stale socket file is replaced, the directory is created, and the
/// socket gets mode 0660 (root and the socket's group may connect).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    // A socket file someone still answers on belongs to a running agent: never steal it.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is serving on this socket (is corrald already running?)",
        ));
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Where the API is served.
#[derive(Debug)]
pub struct Listeners {
    /// The Unix socket: root and the socket's group, all `admin`.
    pub unix: UnixListener,
    /// The TLS listener, with its settings (reloadable).
    pub tcp: Option<(TcpListener, Arc<tls::Tls>)>,
    /// The handshake bounds of the TLS listener.
    pub handshakes: crate::accept::Handshakes,
}

/// The largest request message accepted: a spec (at most [`service::MAX_SPEC_TOML`]) and
/// room for the rest. Larger ones get OUT_OF_RANGE before any of it is decoded.
pub const MAX_REQUEST_BYTES: usize = service::MAX_SPEC_TOML + (64 << 10);
/// Open streaming calls (Watch, Logs, health Watch) per caller identity, over all of its
/// connections; more get RESOURCE_EXHAUSTED.
pub const MAX_STREAMS_PER_CALLER: usize = 256;
/// HTTP/2 streams (calls) open at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// A unary call not answered within this is cut (DEADLINE_EXCEEDED-like CANCELLED).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Once the agent stops, open streams end at once (UNAVAILABLE); connections with calls
/// still open after this (a client not reading its last replies) are closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Serve the API until `shutdown`. `services` carries each service's health:
/// `grpc.health.v1` answers for every service by name (SERVING while at least one of its
/// instances is healthy), besides "" and `corral.v1.Agent` for the agent itself.
pub async fn serve(
    listeners: Listeners,
    agent: AgentService,
    mut services: watch::Receiver<BTreeMap<String, ServiceHealth>>,
    metrics: ApiMetricsLayer,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut reporter = health.clone();
    tokio::spawn(async move {
        let mut known: BTreeMap<String, ServiceHealth> = BTreeMap::new();
        loop {
            let now = services.borrow_and_update().clone();
            for (name, h) in &now {
                if known.get(name) != Some(h) {
                    let status = match h {
                        ServiceHealth::Healthy | ServiceHealth::Degraded => {
                            tonic_health::ServingStatus::Serving
                        }
                        ServiceHealth::Unhealthy => tonic_health::ServingStatus::NotServing,
                    };
                    reporter.set_service_status(name, status).await;
                }
            }
            for gone in known.keys().filter(|k| !now.contains_key(*k)) {
                reporter.clear_service_status(gone).await;
            }
            known = now;
            if services.changed().await.is_err() {
                break;
            }
        }
    });
    // Reflection in both versions: grpcurl and grpc-java speak v1, grpcio-reflection and
    // older grpcurl v1alpha. Each is made at its first call (see `lazy`).
    fn reflection() -> tonic_reflection::server::Builder<'static> {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(corral_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    }
    fn unavailable(e: tonic_reflection::server::Error) {
        tracing::warn!(error = %e, "gRPC reflection unavailable");
    }
    let reflection_v1 = lazy::Lazy::new(|| reflection().build_v1().map_err(unavailable).ok());
    let reflection_v1alpha =
        lazy::Lazy::new(|| reflection().build_v1alpha().map_err(unavailable).ok());
    let layer = AuthLayer::new(MAX_STREAMS_PER_CALLER, Stopping::new(shutdown.clone()));
    let router = || {
        let agent = AgentServer::new(agent.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
        tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .http2_max_header_list_size(64 << 10)
            .timeout(CALL_TIMEOUT)
            .trace_fn(|req| tracing::debug_span!("rpc", method = %req.uri().path()))
            .layer(metrics.clone())
            .layer(layer.clone())
            .add_service(agent)
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
    };
    let unix = router().serve_with_incoming_shutdown(
        conn::unix_incoming(listeners.unix, conn::IDLE_TIMEOUT),
        shutdown.clone().cancelled_owned(),
    );
    match listeners.tcp {
        None => unix.await,
        Some((listener, tls)) => {
            let incoming = tls::incoming(
                listener,
                tls,
                listeners.handshakes,
                conn::IDLE_TIMEOUT,
                shutdown.clone(),
            );
            let tcp = router().serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned());
            let (u, t) = tokio::join!(unix, tcp);
            u.and(t)
        }
    }
}
