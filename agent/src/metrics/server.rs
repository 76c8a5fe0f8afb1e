//! The `/metrics` endpoint (`--metrics ADDR`): HTTP/1.1 on hyper, optionally TLS
//! (`--metrics-tls-cert`, `--metrics-tls-key`, read again on SIGHUP). An address other
//! hosts can reach is served only with TLS or with an explicit `--metrics-insecure`: the
//! series name every service and instance of the node.
//!
//! `GET /metrics` answers in OpenMetrics when the client accepts it (Prometheus does), else
//! in the Prometheus text format 0.0.4 (curl, `promtool check metrics`). One scrape runs at
//! a time (others wait for it). Connections are accepted by [`crate::accept`] (bounded in
//! number overall and per address, handshakes and the first byte bounded in time), bounded
//! in age ([`MAX_CONNECTION_AGE`]), and a client that sends no request head within
//! [`HEADER_TIMEOUT`] is dropped.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{Format, Metrics};
use crate::accept::{self, Handshakes, Limits};

/// Connections open at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections open at once from one address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 16;
/// A request head not received within this (after the connection's first byte and its
/// TLS handshake, bounded by [`crate::accept`]) ends the connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed this long after it was accepted, whatever it is doing, so that a
/// client that stops reading holds its place no longer; a scraper simply connects again.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// Where and how `/metrics` is served, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The certificate (chain) and key files, for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Why the metrics flags cannot be used; says which flag and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EndpointError(String);

/// Check `--metrics ADDR` with its TLS flags: an address (IP:PORT or localhost:PORT), TLS
/// with both files or neither, and, for an address other hosts can reach, TLS or
/// `--metrics-insecure`.
pub fn endpoint(
    addr: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure: bool,
) -> Result<Endpoint, EndpointError> {
    let parsed = match addr.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match addr
            .strip_prefix("localhost:")
            .and_then(|p| p.parse::<u16>().ok())
        {
            Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            None => {
                return Err(EndpointError(format!(
                    "--metrics {addr:?} is not an address: use IP:PORT, e.g. 127.0.0.1:9464, 0.0.0.0:9464 or [::]:9464"
                )));
            }
        },
    };
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(EndpointError(
                "--metrics-tls-cert needs --metrics-tls-key FILE (the certificate's private key)"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(EndpointError(
                "--metrics-tls-key needs --metrics-tls-cert FILE (the certificate it belongs to)"
                    .into(),
            ));
        }
    };
    if tls.is_none() && !insecure && !parsed.ip().is_loopback() {
        return Err(EndpointError(format!(
            "--metrics {addr} is reachable from other hosts, and the metrics name every service \
             and instance of this node: serve them with --metrics-tls-cert FILE \
             --metrics-tls-key FILE, or give --metrics-insecure to serve plain HTTP anyway \
             (or use a loopback address, e.g. 127.0.0.1:{})",
            parsed.port()
        )));
    }
    Ok(Endpoint { addr: parsed, tls })
}

/// The TLS settings of the endpoint, replaceable while serving.
#[derive(Debug)]
pub struct MetricsTls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

fn tls_err(flag: &str, path: &Path, why: impl fmt::Display) -> EndpointError {
    EndpointError(format!("{flag} {}: {why}", path.display()))
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, EndpointError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_err("--metrics-tls-cert", cert, e))?;
    if chain.is_empty() {
        return Err(tls_err(
            "--metrics-tls-cert",
            cert,
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_err(
            "--metrics-tls-key",
            key,
            format!("no usable private key in it (expected PEM: PRIVATE KEY): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EndpointError(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            EndpointError(format!(
                "--metrics-tls-cert {} with --metrics-tls-key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    // The endpoint speaks HTTP/1.1 only: a client offering h2 too must not pick it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl MetricsTls {
    /// Read the files; fails naming the flag and the file.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<MetricsTls>, EndpointError> {
        Ok(Arc::new(MetricsTls {
            current: RwLock::new(server_config(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    /// Read the files again; on failure the settings in use stay.
    pub fn reload(&self) -> Result<(), EndpointError> {
        let config = server_config(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Serve `/metrics` on `listener` until `shutdown`, within `handshakes` (see
/// [`crate::accept`]).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<MetricsTls>>,
    handshakes: Handshakes,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let limits = Limits {
        what: "metrics",
        connections: MAX_CONNECTIONS,
        connections_per_address: MAX_CONNECTIONS_PER_ADDRESS,
        handshakes,
    };
    let stopping = shutdown.clone();
    accept::serve(
        listener,
        limits,
        shutdown,
        move |tcp, _| {
            let acceptor = tls.as_ref().map(|t| t.acceptor());
            async move {
                match acceptor {
                    None => Ok(Stream::Plain(tcp)),
                    Some(acceptor) => acceptor
                        .accept(tcp)
                        .await
                        .map(|s| Stream::Tls(Box::new(s)))
                        .map_err(|e| format!("TLS handshake: {e}")),
                }
            }
        },
        move |stream, _, held| {
            let metrics = metrics.clone();
            let shutdown = stopping.clone();
            async move {
                let _held = held;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::timeout(MAX_CONNECTION_AGE, connection(stream, metrics)) => {}
                }
            }
        },
    )
    .await
}

/// A connection past its handshake.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

async fn connection(stream: Stream, metrics: Metrics) {
    let service = hyper::service::service_fn(move |req| {
        let metrics = metrics.clone();
        async move { Ok::<_, Infallible>(answer(req, &metrics).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10);
    let served = match stream {
        Stream::Plain(s) => http.serve_connection(TokioIo::new(s), service).await,
        Stream::Tls(s) => http.serve_connection(TokioIo::new(s), service).await,
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "metrics: connection ended");
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn answer(req: Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET /metrics",
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    match metrics.scrape(format).await {
        Ok(text) => {
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: scrape failed");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("scrape failed: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_other_hosts_reach_need_tls_or_insecure() {
        let loopback = endpoint("127.0.0.1:9464", None, None, false).expect("loopback");
        assert_eq!(loopback.addr, "127.0.0.1:9464".parse().expect("addr"));
        assert!(endpoint("[::1]:9464", None, None, false).is_ok());
        assert_eq!(
            endpoint("localhost:9464", None, None, false)
                .expect("localhost")
                .addr
                .port(),
            9464
        );
        let refused = endpoint("0.0.0.0:9464", None, None, false).expect_err("wildcard");
        for word in ["--metrics-tls-cert", "--metrics-insecure", "127.0.0.1:9464"] {
            assert!(refused.to_string().contains(word), "{refused}");
        }
        assert!(endpoint("0.0.0.0:9464", None, None, true).is_ok());
        let tls = endpoint(
            "[::]:9464",
            Some("c.pem".into()),
            Some("k.pem".into()),
            false,
        )
        .expect("tls");
        assert!(tls.tls.is_some());
        let half = endpoint("0.0.0.0:9464", Some("c.pem".into()), None, false).expect_err("half");
        assert!(half.to_string().contains("--metrics-tls-key"), "{half}");
        for bad in [
            "9464",
            "example.com:9464",
            "127.0.0.1",
            "127.0.0.1:99999",
            "",
        ] {
            let e = endpoint(bad, None, None, true).expect_err(bad);
            assert!(e.to_string().contains("not an address"), "{bad}: {e}");
        }
    }

    #[test]
    fn tls_files_are_checked_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "not a certificate").expect("write");
        std::fs::write(&key, "").expect("write");
        let e = MetricsTls::load(&cert, &key).expect_err("no cert");
        assert!(e.to_string().starts_with("--metrics-tls-cert"), "{e}");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(&cert, made.cert.pem()).expect("write");
        let e = MetricsTls::load(&cert, &key).expect_err("no key");
        assert!(e.to_string().starts_with("--metrics-tls-key"), "{e}");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
        let tls = MetricsTls::load(&cert, &key).expect("loads");
        std::fs::write(&key, "").expect("break it");
        assert!(
            tls.reload().is_err(),
            "a broken key is refused, the old one kept"
        );
    }
}
