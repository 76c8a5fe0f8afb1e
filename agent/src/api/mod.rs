//! The gRPC API: `corral.v1.Agent`, `grpc.health.v1` and reflection, served on a Unix socket.
//! A thin layer: [`service`] maps requests to supervisor operations, [`convert`] maps types,
//! [`status`] maps errors to codes. Only this module and `main` touch tonic and prost.
//!
//! Imports from the crate: `supervisor`, `spec`, `host`, `events`, `health` (service health
//! only), `cgroups` (capabilities only).

pub mod convert;
pub mod service;
pub mod status;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use corral_proto::v1::agent_server::AgentServer;
use std::collections::BTreeMap;

use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::health::ServiceHealth;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

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

/// Serve the API on `listener` until `shutdown`. `services` carries each service's health:
/// `grpc.health.v1` answers for every service by name (SERVING while at least one of its
/// instances is healthy), besides "" and `corral.v1.Agent` for the agent itself.
pub async fn serve(
    listener: UnixListener,
    agent: AgentService,
    mut services: watch::Receiver<BTreeMap<String, ServiceHealth>>,
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(corral_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let mut builder = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::debug_span!("rpc", method = %req.uri().path()));
    let router = builder
        .add_service(AgentServer::new(agent))
        .add_service(health_service);
    let router = match reflection {
        Ok(r) => router.add_service(r),
        Err(e) => {
            tracing::warn!(error = %e, "gRPC reflection unavailable");
            router
        }
    };
    router
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}
