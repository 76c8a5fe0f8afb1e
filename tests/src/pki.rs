//! Test certificates: a CA, the agent's server certificate, and client certificates whose
//! subject OU is the role — plus the bad ones (expired, self-signed, from another CA).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that can sign server and client certificates.
#[derive(Debug)]
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate's PEM file.
    pub cert: PathBuf,
    dir: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pem");
    p
}

impl Ca {
    /// A new CA named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let issuer = CertifiedIssuer::self_signed(p, key).expect("ca");
        let cert = write(dir, &format!("{name}.ca.pem"), &issuer.pem());
        Ca {
            issuer,
            cert,
            dir: dir.to_path_buf(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, name: &str) -> Pem {
        self.server_for(name, &["localhost", "127.0.0.1"])
    }

    /// A server certificate for these names (host names or IP addresses).
    pub fn server_for(&self, name: &str, names: &[&str]) -> Pem {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name.push(DnType::CommonName, "corrald");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(name, p)
    }

    /// A client certificate with common name `cn` and, when given, OU `unit` (the role).
    pub fn client(&self, name: &str, cn: &str, unit: Option<&str>) -> Pem {
        self.sign(name, client_params(cn, unit))
    }

    /// A client certificate made without any extended key usage (so without clientAuth).
    pub fn client_without_eku(&self, name: &str, cn: &str, unit: &str) -> Pem {
        let mut p = client_params(cn, Some(unit));
        p.extended_key_usages = Vec::new();
        self.sign(name, p)
    }

    /// A client certificate that expired yesterday (valid for a day before that).
    pub fn expired_client(&self, name: &str, cn: &str, unit: &str) -> Pem {
        let mut p = client_params(cn, Some(unit));
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        p.not_before = (now - 2 * day).into();
        p.not_after = (now - day).into();
        self.sign(name, p)
    }

    fn sign(&self, name: &str, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pem {
            cert: write(&self.dir, &format!("{name}.pem"), &cert.pem()),
            key: write(&self.dir, &format!("{name}.key"), &key.serialize_pem()),
        }
    }
}

fn client_params(cn: &str, unit: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(unit) = unit {
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, unit);
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// A self-signed client certificate (no CA vouches for it).
pub fn self_signed_client(dir: &Path, name: &str, cn: &str, unit: &str) -> Pem {
    let key = KeyPair::generate().expect("key");
    let cert = client_params(cn, Some(unit))
        .self_signed(&key)
        .expect("self-signed");
    Pem {
        cert: write(dir, &format!("{name}.pem"), &cert.pem()),
        key: write(dir, &format!("{name}.key"), &key.serialize_pem()),
    }
}

/// A channel to the agent's TLS listener at `localhost:port`, trusting `ca`, presenting
/// `identity` when given.
pub async fn channel(
    port: u16,
    ca: &Path,
    identity: Option<&Pem>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(ca).map_err(|e| e.to_string())?,
        ))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&id.cert).map_err(|e| e.to_string())?,
            std::fs::read(&id.key).map_err(|e| e.to_string())?,
        ));
    }
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}
