//! Connecting to etcd: endpoints, TLS (the CA that signed etcd's certificate, and a client
//! certificate when etcd asks for one) and etcd's own user/password authentication. One
//! place that turns the client's errors into sentences that say what failed.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// How long each member has to answer when a client picks one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach etcd, from `--etcd` and its companion flags.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one per cluster member.
    pub endpoints: Vec<String>,
    /// The CA (PEM) that signed etcd's server certificate (`https://` endpoints).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for etcd with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user name and password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("--etcd: no endpoint given (e.g. --etcd https://etcd-1:2379,https://etcd-2:2379)")]
    NoEndpoint,
    #[error("--etcd {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("{flag} {path}: {source}")]
    File {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Flags(String),
    #[error("connecting to etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
}

/// Split `--etcd a,b` and check each endpoint names a scheme the client speaks.
pub fn parse_endpoints(text: &str) -> Result<Vec<String>, ConnectError> {
    let endpoints: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err(ConnectError::NoEndpoint);
    }
    for e in &endpoints {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"));
        match rest {
            Some(hostport) if !hostport.is_empty() && !hostport.contains('/') => {}
            _ => {
                return Err(ConnectError::Endpoint {
                    endpoint: e.clone(),
                    reason: "write http://HOST:PORT or https://HOST:PORT".into(),
                });
            }
        }
    }
    Ok(endpoints)
}

impl EtcdConfig {
    fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    /// Check the flags fit together and read the files now, so a typo fails at start.
    pub fn options(&self) -> Result<ConnectOptions, ConnectError> {
        if self.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoint);
        }
        let tls = self.uses_tls();
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(ConnectError::Flags(
                "--etcd mixes http:// and https:// endpoints: give every member the same scheme"
                    .into(),
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConnectError::Flags(
                "--etcd-cert and --etcd-key go together: give both or neither".into(),
            ));
        }
        if !tls && (self.ca.is_some() || self.cert.is_some()) {
            return Err(ConnectError::Flags(
                "--etcd-ca/--etcd-cert need https:// endpoints in --etcd".into(),
            ));
        }
        // The session's own timers (lease keep-alives, request deadlines) tell a dead
        // connection; HTTP/2 pings catch a silent one under a long watch.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if tls {
            let read = |flag, path: &PathBuf| {
                std::fs::read(path).map_err(|source| ConnectError::File {
                    flag,
                    path: path.clone(),
                    source,
                })
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &self.ca {
                t = t.ca_certificate(Certificate::from_pem(read("--etcd-ca", ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                t = t.identity(Identity::from_pem(
                    read("--etcd-cert", cert)?,
                    read("--etcd-key", key)?,
                ));
            }
            options = options.with_tls(t);
        }
        Ok(options)
    }

    /// A client pinned to one member that answers now. With one endpoint, that endpoint
    /// (its channel connects lazily: an unreachable etcd shows at the first request, except
    /// with a user, whose token is fetched here). With several, every member is asked for
    /// its status at once and one that answers and knows a leader is taken, at random so
    /// that a fleet spreads over the members. One member, not a channel balanced over all:
    /// the client's balancing keeps sending a share of the requests to a member that is
    /// dead, and every session would fail on it; a pinned client fails once, and the next
    /// connection leaves the dead member out.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let options = self.options()?;
        let connect_err = |reason: String| ConnectError::Connect {
            endpoints: self.endpoints.join(","),
            reason,
        };
        if self.endpoints.len() == 1 {
            return Client::connect(&self.endpoints, Some(options))
                .await
                .map_err(|e| connect_err(self.explain(describe(&e))));
        }
        let mut probes = tokio::task::JoinSet::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let (endpoint, options) = (endpoint.clone(), options.clone());
            probes.spawn(async move {
                let probe = async {
                    let mut c = Client::connect([endpoint.as_str()], Some(options)).await?;
                    let status = c.status().await?;
                    Ok::<_, etcd_client::Error>((c, status.leader() != 0))
                };
                let outcome = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    Ok(Ok(found)) => Ok(found),
                    Ok(Err(e)) => Err((is_auth_error(&e), describe(&e))),
                    Err(_) => Err((false, format!("no answer within {PROBE_TIMEOUT:?}"))),
                };
                (i, outcome)
            });
        }
        let mut led = Vec::new();
        let mut leaderless = Vec::new();
        let mut failures = Vec::new();
        while let Some(joined) = probes.join_next().await {
            let Ok((i, outcome)) = joined else { continue };
            match outcome {
                Ok((client, true)) => led.push(client),
                Ok((client, false)) => leaderless.push(client),
                Err(failure) => failures.push((i, failure)),
            }
        }
        // A member without a leader still answers, with "no leader", which says more than
        // a connection refused.
        let mut pool = if led.is_empty() { leaderless } else { led };
        if !pool.is_empty() {
            let pick = fastrand::usize(0..pool.len());
            return Ok(pool.swap_remove(pick));
        }
        // An authentication failure first: it is the one the operator must act on.
        failures.sort_by_key(|(i, (auth, _))| (!*auth, *i));
        let reason = failures
            .iter()
            .map(|(i, (_, why))| format!("{}: {why}", self.endpoints[*i]))
            .collect::<Vec<_>>()
            .join("; ");
        Err(connect_err(self.explain(reason)))
    }
}

/// One line for an etcd client error with every cause in it: the client's own `Display`
/// stops at "transport error", which says nothing about a refused certificate or a
/// connection refused.
pub fn describe(err: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut text, mut source): (String, Option<&(dyn std::error::Error + 'static)>) = match err {
        etcd_client::Error::GRpcStatus(s) => {
            let mut t = format!("{:?}: {}", s.code(), s.message());
            if t.ends_with(": ") {
                t.truncate(t.len() - 2);
            }
            (t, s.source())
        }
        etcd_client::Error::TransportError(e) => (e.to_string(), e.source()),
        other => (other.to_string(), None),
    };
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

impl EtcdConfig {
    /// `reason` (a failed request's error), with what to check when it is the likely sign of
    /// a refused client certificate. With TLS 1.3 etcd refuses the certificate after the
    /// client's side of the handshake is done, and its alert is often lost when it resets the
    /// connection: the client then sees only a closed connection.
    pub fn explain(&self, reason: String) -> String {
        if let Some(auth) = self.explain_auth(&reason) {
            return auth;
        }
        let closed = ["connection closed", "connection reset", "broken pipe"];
        let lower = reason.to_lowercase();
        if self.cert.is_none()
            || lower.contains("certificate")
            || !closed.iter().any(|c| lower.contains(c))
        {
            return reason;
        }
        format!(
            "{reason} (etcd closed the TLS connection, as it does when it refuses the client \
             certificate: when this repeats, check that --etcd-cert is signed by a CA etcd \
             trusts, its --trusted-ca-file, and has not expired)"
        )
    }
}

/// What etcd says when it refuses who the client is or what it may do: a bad user or
/// password, no user on an etcd with auth enabled, an expired or revoked token, a role that
/// does not grant the key.
const AUTH_REFUSALS: [&str; 5] = [
    "authentication failed",
    "user name is empty",
    "invalid auth token",
    "permission denied",
    "Unauthenticated",
];

impl EtcdConfig {
    /// `reason` as an authentication failure, with what to check, when it is one.
    fn explain_auth(&self, reason: &str) -> Option<String> {
        if reason.starts_with("auth failed") || !AUTH_REFUSALS.iter().any(|r| reason.contains(r)) {
            return None;
        }
        let check = match &self.user {
            Some((user, _)) => format!(
                "check --etcd-user {user} and its --etcd-password-file, and that the user's role \
                 grants readwrite on the fleet's prefix"
            ),
            None => "etcd has authentication enabled: give --etcd-user and \
                     --etcd-password-file"
                .to_string(),
        };
        Some(format!("auth failed: {reason} ({check})"))
    }
}

/// Whether etcd refused who we are (bad user/password, no permission, no valid token): not a
/// network problem, so retrying quickly does not help, and the operator must act.
pub fn is_auth_error(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || AUTH_REFUSALS.iter().any(|r| s.message().contains(r))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoints("https://a:2379, https://b:2379").expect("ok"),
            ["https://a:2379", "https://b:2379"]
        );
        for bad in ["", ",", "a:2379", "ftp://a", "http://", "http://a/b"] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_that_do_not_fit_are_refused() {
        let cfg = |endpoints: &[&str], ca: bool, cert: bool, key: bool| EtcdConfig {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            ca: ca.then(|| "/nonexistent/ca.pem".into()),
            cert: cert.then(|| "/nonexistent/c.pem".into()),
            key: key.then(|| "/nonexistent/k.pem".into()),
            user: None,
        };
        let msg = |c: EtcdConfig| c.options().expect_err("refused").to_string();
        assert!(msg(cfg(&["http://a:1", "https://b:1"], false, false, false)).contains("mixes"));
        assert!(msg(cfg(&["https://a:1"], false, true, false)).contains("go together"));
        assert!(msg(cfg(&["http://a:1"], true, false, false)).contains("https://"));
        let missing = msg(cfg(&["https://a:1"], true, false, false));
        assert!(
            missing.contains("--etcd-ca /nonexistent/ca.pem"),
            "{missing}"
        );
        assert!(cfg(&["http://a:1"], false, false, false).options().is_ok());
    }

    #[test]
    fn refusals_of_who_we_are_say_auth_failed() {
        let with_user = EtcdConfig {
            endpoints: vec!["http://a:1".into()],
            user: Some(("corral".into(), "secret".into())),
            ..Default::default()
        };
        let bad = "InvalidArgument: etcdserver: authentication failed, invalid user ID or password";
        let said = with_user.explain(bad.into());
        assert!(said.starts_with("auth failed: InvalidArgument"), "{said}");
        assert!(said.contains("--etcd-user corral"), "{said}");
        assert!(!said.contains("secret"), "never the password: {said}");
        assert_eq!(with_user.explain(said.clone()), said, "said once");
        let none = EtcdConfig {
            endpoints: vec!["http://a:1".into()],
            ..Default::default()
        };
        let said = none.explain("InvalidArgument: etcdserver: user name is empty".into());
        assert!(said.contains("give --etcd-user"), "{said}");
        let denied = "writing a status key: PermissionDenied: etcdserver: permission denied";
        assert!(
            with_user
                .explain(denied.into())
                .contains("grants readwrite")
        );
        let other = "Unavailable: tcp connect error: Connection refused";
        assert_eq!(with_user.explain(other.into()), other);
    }

    #[test]
    fn a_closed_tls_connection_points_at_the_client_certificate() {
        let with_cert = EtcdConfig {
            endpoints: vec!["https://a:1".into()],
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..Default::default()
        };
        let closed = "granting the node's lease: Cancelled: transport error: connection closed";
        assert!(
            with_cert
                .explain(closed.into())
                .contains("check that --etcd-cert")
        );
        let alert = "transport error: received fatal alert: BadCertificate";
        assert_eq!(with_cert.explain(alert.into()), alert, "already says it");
        let timeout = "no answer from etcd within 5s";
        assert_eq!(with_cert.explain(timeout.into()), timeout);
        let without = EtcdConfig {
            endpoints: vec!["https://a:1".into()],
            ..Default::default()
        };
        assert_eq!(
            without.explain(closed.into()),
            closed,
            "no certificate to check"
        );
    }
}
