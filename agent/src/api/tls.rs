//! The TCP listener: TLS only, with client certificates from `--tls-client-ca` required
//! (without one, only on loopback, and every client is `read`). The certificate, key and CA
//! files are read again on [`Tls::reload`] (SIGHUP); connections already open keep theirs.
//! Handshakes are bounded in time and number, overall and per address, connections in
//! number overall and per address ([`crate::accept`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::auth::{Caller, Role};
use super::conn::Conn;
use crate::accept::{self, Handshakes, Limits};

/// Open TLS connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Open TLS connections from one address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

/// The files `--tls-cert`, `--tls-key` and `--tls-client-ca` name.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS files cannot be used; names the flag and file.
#[derive(Debug)]
pub struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn err(flag: &str, path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError(format!("{flag} {}: {why}", path.display()))
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(flag, path, pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(flag, path, pem_error(e)))?;
    if certs.is_empty() {
        return Err(err(
            flag,
            path,
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// The server configuration from the files, checked: the key matches the certificate, the
/// CA file holds at least one usable CA certificate.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => err(
            "--tls-key",
            &files.key,
            "no private key in it (expected PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        ),
        e => err("--tls-key", &files.key, pem_error(e)),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("--tls-client-ca", path)? {
                roots
                    .add(cert)
                    .map_err(|e| err("--tls-client-ca", path, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err("--tls-client-ca", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not belong to the certificate".to_string()
            }
            e => e.to_string(),
        };
        TlsError(format!(
            "--tls-cert {} with --tls-key {}: {why}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings in use, replaceable while serving.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Read the files; fails with the flag and file named.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let config = server_config(&files)?;
        Ok(Arc::new(Tls {
            files,
            current: RwLock::new(config),
        }))
    }

    /// Read the files again. On failure the settings in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
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

    /// Whether clients must present a certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// The caller a finished handshake shows: the client certificate's subject and its role
/// from the OU, or, without client certificates (loopback only), an anonymous `read` caller.
pub fn tls_caller(stream: &TlsStream<TcpStream>, peer: SocketAddr) -> Caller {
    let (who, role) = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => identity(leaf),
        _ => ("anonymous TLS client".to_string(), Role::Read),
    };
    Caller {
        who: who.into(),
        peer: peer.to_string().into(),
        role,
        conn: Arc::default(),
    }
}

/// A certificate's subject and the role its OU gives.
pub fn identity(der: &[u8]) -> (String, Role) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let subject = cert.subject();
            let units: Vec<&str> = subject
                .iter_organizational_unit()
                .filter_map(|a| a.as_str().ok())
                .collect();
            (subject.to_string(), Role::from_units(units))
        }
        Err(e) => (format!("unreadable certificate ({e})"), Role::None),
    }
}

/// Why a client certificate may not be used to log in: one whose extended key usage does not
/// include TLS client authentication (a server certificate, or one made without any EKU,
/// which the verifier would take as good for every purpose) is refused.
pub fn refuse_client_cert(der: &[u8]) -> Option<String> {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert,
        Err(e) => return Some(format!("unreadable client certificate ({e})")),
    };
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => None,
        Ok(Some(_)) => Some(format!(
            "client certificate {} is not for client authentication (its extended key usage lacks clientAuth)",
            cert.subject()
        )),
        Ok(None) => Some(format!(
            "client certificate {} has no extended key usage: it must say clientAuth",
            cert.subject()
        )),
        Err(e) => Some(format!(
            "client certificate {}: unreadable extended key usage ({e})",
            cert.subject()
        )),
    }
}

/// Accept TLS connections on `listener` until `shutdown`, within `handshakes` (see
/// [`crate::accept`]), handing each finished handshake to the API server.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
    handshakes: Handshakes,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Conn<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(16);
    let limits = Limits {
        what: "API",
        connections: MAX_CONNECTIONS,
        connections_per_address: MAX_CONNECTIONS_PER_ADDRESS,
        handshakes,
    };
    tokio::spawn(accept::serve(
        listener,
        limits,
        shutdown,
        move |tcp, peer| {
            let acceptor = tls.acceptor();
            async move {
                let stream = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                if let Some([leaf, ..]) = stream.get_ref().1.peer_certificates()
                    && let Some(why) = refuse_client_cert(leaf)
                {
                    return Err(why);
                }
                let caller = tls_caller(&stream, peer);
                Ok((stream, caller))
            }
        },
        move |(stream, caller), _, held| {
            let tx = tx.clone();
            async move {
                tracing::debug!(caller = %caller, role = caller.role.as_str(), "API connection");
                let conn = Conn::new(stream, caller, idle_timeout).hold(held);
                let _ = tx.send(Ok(conn)).await;
            }
        },
    ));
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn bad_files_are_named_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = write(dir.path(), "empty.pem", "");
        let junk = write(dir.path(), "junk.pem", "-----BEGIN CERTIFICATE-----\n!!!\n");
        let missing = dir.path().join("missing.pem");
        for (files, flag, says) in [
            (
                TlsFiles {
                    cert: missing.clone(),
                    key: empty.clone(),
                    client_ca: None,
                },
                "--tls-cert",
                "No such file",
            ),
            (
                TlsFiles {
                    cert: empty.clone(),
                    key: empty.clone(),
                    client_ca: None,
                },
                "--tls-cert",
                "no certificate",
            ),
            (
                TlsFiles {
                    cert: junk.clone(),
                    key: empty.clone(),
                    client_ca: None,
                },
                "--tls-cert",
                "PEM",
            ),
        ] {
            let e = server_config(&files).expect_err("bad").to_string();
            assert!(e.starts_with(flag) && e.contains(says), "{e}");
        }
    }

    #[test]
    fn identities_come_from_the_subject() {
        let (who, role) = identity(b"not a certificate");
        assert_eq!(role, Role::None);
        assert!(who.contains("unreadable"), "{who}");
    }
}
