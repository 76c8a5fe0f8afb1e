//! The connection to the agent: the `--addr` forms `corral` accepts (a Unix socket, or
//! `https://` with TLS; plaintext TCP is refused), connecting with a timeout, and turning
//! connection failures and gRPC statuses into errors that tell the user what to do.
//!
//! Only this module touches tonic: commands call the agent through [`Session`] and get plain
//! messages or `anyhow` errors back. It knows nothing about output formats.

use std::error::Error as StdError;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use corral_proto::v1 as pb;
use corral_proto::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::args::ConnectArgs;

/// How long `corral` waits for the connection (and the TLS handshake) before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the agent's `corral.v1.Agent` service; every call returns the reply, or an
/// error worded for the user.
#[derive(Debug)]
pub struct Session {
    client: AgentClient<Channel>,
    /// For explaining errors the transport raised (rather than the agent): the TLS settings
    /// of an `https://` connection.
    tls: Option<Arc<TlsInfo>>,
}

/// What an `https://` connection was made with, to explain TLS failures in terms of flags.
#[derive(Debug)]
struct TlsInfo {
    ca: PathBuf,
    cert: Option<PathBuf>,
}

impl Session {
    /// Applies a spec. A refusal because a rollout of the service still runs says how to
    /// supersede it, unless the request already does.
    pub async fn apply(&mut self, request: pb::ApplyRequest) -> anyhow::Result<pb::ApplyResponse> {
        let force = request.force;
        let reply = self.client.apply(request).await;
        self.reply(reply.map_err(|status| supersede_hint(status, force)))
    }

    /// Applies several specs in one call, all or nothing. An error about `requests[i]` names
    /// `labels[i]` instead (the file the request came from).
    pub async fn apply_batch(
        &mut self,
        requests: Vec<pb::ApplyRequest>,
        dry_run: bool,
        labels: &[String],
    ) -> anyhow::Result<Vec<pb::ApplyResponse>> {
        let reply = self
            .client
            .apply_batch(pb::ApplyBatchRequest { requests, dry_run })
            .await;
        match self.reply(reply) {
            Ok(r) => Ok(r.results),
            Err(e) => match e.downcast::<RpcError>() {
                Ok(rpc) => Err(RpcError::new(rpc.code, name_requests(&rpc.text, labels)).into()),
                Err(e) => Err(e),
            },
        }
    }

    /// Starts a rolling restart.
    pub async fn restart(
        &mut self,
        name: &str,
        force: bool,
        expected_revision: Option<u64>,
    ) -> anyhow::Result<pb::RolloutResponse> {
        let request = pb::RestartRequest {
            name: name.to_owned(),
            force,
            expected_revision,
        };
        let reply = self.client.restart(request).await;
        self.reply(reply.map_err(|status| supersede_hint(status, force)))
    }

    /// Starts a rollback to `revision`, or to the highest kept one below the current.
    pub async fn rollback(
        &mut self,
        name: &str,
        revision: Option<u64>,
        force: bool,
        expected_revision: Option<u64>,
    ) -> anyhow::Result<pb::RolloutResponse> {
        let request = pb::RollbackRequest {
            name: name.to_owned(),
            revision,
            force,
            expected_revision,
        };
        let reply = self.client.rollback(request).await;
        self.reply(reply.map_err(|status| supersede_hint(status, force)))
    }

    pub async fn get_rollout(&mut self, id: &str) -> anyhow::Result<pb::RolloutStatus> {
        let request = pb::GetRolloutRequest { id: id.to_owned() };
        let reply = self.client.get_rollout(request).await;
        self.reply(reply)
    }

    pub async fn delete(
        &mut self,
        name: &str,
        force: bool,
        expected_revision: Option<u64>,
    ) -> anyhow::Result<pb::DeleteResponse> {
        let request = pb::DeleteRequest {
            name: name.to_owned(),
            force,
            expected_revision,
        };
        let reply = self.client.delete(request).await;
        self.reply(reply)
    }

    pub async fn get(&mut self, name: &str) -> anyhow::Result<pb::ServiceStatus> {
        let request = pb::GetRequest {
            name: name.to_owned(),
        };
        let reply = self.client.get(request).await;
        self.reply(reply)
    }

    pub async fn run_job(
        &mut self,
        name: &str,
        overrides: pb::RunOverrides,
    ) -> anyhow::Result<pb::JobRun> {
        let request = pb::RunJobRequest {
            name: name.to_owned(),
            overrides: Some(overrides),
        };
        let reply = self.client.run_job(request).await;
        self.reply(reply)
    }

    pub async fn get_run(&mut self, id: &str) -> anyhow::Result<pb::JobRun> {
        let request = pb::GetRunRequest { id: id.to_owned() };
        let reply = self.client.get_run(request).await;
        self.reply(reply)
    }

    pub async fn list_runs(&mut self, name: &str) -> anyhow::Result<pb::ListRunsResponse> {
        let request = pb::ListRunsRequest {
            name: name.to_owned(),
        };
        let reply = self.client.list_runs(request).await;
        self.reply(reply)
    }

    pub async fn cancel_run(&mut self, id: &str) -> anyhow::Result<pb::JobRun> {
        let request = pb::CancelRunRequest { id: id.to_owned() };
        let reply = self.client.cancel_run(request).await;
        self.reply(reply)
    }

    /// Every service whose labels match `selector` (empty: all), page after page.
    pub async fn list_all(&mut self, selector: &str) -> anyhow::Result<Vec<pb::ServiceStatus>> {
        let mut services = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListRequest {
                selector: selector.to_owned(),
                page_token,
                ..Default::default()
            };
            let reply = self.client.list(request).await;
            let page = self.reply(reply)?;
            services.extend(page.services);
            if page.next_page_token.is_empty() {
                return Ok(services);
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn scale(
        &mut self,
        name: &str,
        replicas: u32,
        force: bool,
        expected_revision: Option<u64>,
    ) -> anyhow::Result<pb::ScaleResponse> {
        let request = pb::ScaleRequest {
            name: name.to_owned(),
            replicas,
            force,
            expected_revision,
        };
        let reply = self.client.scale(request).await;
        self.reply(reply)
    }

    pub async fn signal(
        &mut self,
        instance: &str,
        signal: &str,
    ) -> anyhow::Result<pb::SignalResponse> {
        let request = pb::SignalRequest {
            instance: instance.to_owned(),
            signal: signal.to_owned(),
        };
        let reply = self.client.signal(request).await;
        self.reply(reply)
    }

    pub async fn list_artifacts(&mut self) -> anyhow::Result<pb::ListArtifactsResponse> {
        let reply = self
            .client
            .list_artifacts(pb::ListArtifactsRequest {})
            .await;
        self.reply(reply)
    }

    pub async fn import_artifact(
        &mut self,
        path: &str,
    ) -> anyhow::Result<pb::ImportArtifactResponse> {
        let request = pb::ImportArtifactRequest {
            path: path.to_owned(),
        };
        let reply = self.client.import_artifact(request).await;
        self.reply(reply)
    }

    pub async fn collect_artifacts(&mut self) -> anyhow::Result<pb::CollectArtifactsResponse> {
        let reply = self
            .client
            .collect_artifacts(pb::CollectArtifactsRequest {})
            .await;
        self.reply(reply)
    }

    pub async fn node(&mut self) -> anyhow::Result<pb::NodeInfo> {
        let reply = self.client.node(pb::NodeRequest {}).await;
        self.reply(reply)
    }

    /// Log records of a service or an instance, as a stream.
    pub async fn logs(&mut self, request: pb::LogsRequest) -> anyhow::Result<Replies<pb::LogLine>> {
        let reply = self.client.logs(request).await;
        self.stream(reply, rpc_error)
    }

    /// The node's events, as a stream. The statuses that say where to resume (`OUT_OF_RANGE`,
    /// `RESOURCE_EXHAUSTED`) are shown as the agent words them.
    pub async fn watch(&mut self, request: pb::WatchRequest) -> anyhow::Result<Replies<pb::Event>> {
        let reply = self.client.watch(request).await;
        self.stream(reply, watch_error)
    }

    fn stream<T>(
        &self,
        reply: Result<tonic::Response<tonic::Streaming<T>>, Status>,
        error: fn(Status) -> anyhow::Error,
    ) -> anyhow::Result<Replies<T>> {
        match reply {
            Ok(reply) => Ok(Replies {
                inner: reply.into_inner(),
                error,
                tls: self.tls.clone(),
            }),
            Err(status) => Err(with_hint(status, error, self.tls.as_deref())),
        }
    }

    fn reply<T>(&self, reply: Result<tonic::Response<T>, Status>) -> anyhow::Result<T> {
        reply
            .map(tonic::Response::into_inner)
            .map_err(|status| with_hint(status, rpc_error, self.tls.as_deref()))
    }
}

/// What to add to the agent's refusal of a rollout while another one of the service runs.
const SUPERSEDE_HINT: &str = "(use --force to supersede it)";

/// The agent's refusal because another rollout of the service runs, with [`SUPERSEDE_HINT`]
/// added (unless the request was `forced` already); any other status unchanged.
///
/// `FAILED_PRECONDITION` has other causes too (a spec the host cannot enforce, a service being
/// deleted), so only a refusal whose message names a rollout, or says nothing, is taken for one.
fn supersede_hint(status: Status, forced: bool) -> Status {
    let message = status.message();
    let busy = status.code() == Code::FailedPrecondition
        && status.source().is_none()
        && (message.is_empty() || message.to_lowercase().contains("rollout"));
    if forced || !busy {
        return status;
    }
    let message = if message.is_empty() {
        "another rollout of the service is running"
    } else {
        message
    };
    Status::failed_precondition(format!("{message} {SUPERSEDE_HINT}"))
}

/// A status as an error, with the hint for errors the transport raised.
fn with_hint(
    status: Status,
    error: fn(Status) -> anyhow::Error,
    tls: Option<&TlsInfo>,
) -> anyhow::Error {
    if let (Some(tls), Some(source)) = (tls, status.source())
        && let Some(why) = explain_tls(tls, &format!("{} {}", status.message(), chain(source)))
    {
        return anyhow!("{why}");
    }
    error(status)
}

/// Every message in an error's chain, joined.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err;
    while let Some(next) = cur.source() {
        parts.push(next.to_string());
        cur = next;
    }
    parts.join(": ")
}

/// A TLS failure in the words of the flags involved, when `cause` is one.
fn explain_tls(tls: &TlsInfo, cause: &str) -> Option<String> {
    let ca = tls.ca.display();
    let cert = tls
        .cert
        .as_ref()
        .map(|c| format!("--tls-cert {}", c.display()));
    let refused = |why: &str| match &cert {
        Some(cert) => format!("the agent refused the client certificate {cert}: {why}"),
        None => "the agent refused the connection: it requires a client certificate; pass \
                 --tls-cert FILE and --tls-key FILE (or CORRAL_TLS_CERT, CORRAL_TLS_KEY)"
            .to_string(),
    };
    let why = if cause.contains("UnknownIssuer") {
        format!(
            "the agent's certificate is not signed by the CA in --tls-ca {ca} (unknown issuer); \
             pass the CA certificate that signed corrald's --tls-cert"
        )
    } else if cause.contains("not valid for name") || cause.contains("NotValidForName") {
        let detail = cause
            .split("invalid peer certificate: ")
            .nth(1)
            .unwrap_or(cause)
            .trim()
            .trim_end_matches([':', ' ']);
        format!(
            "the agent's certificate does not match the host in --addr: {detail}; connect with \
             a name or address the certificate lists"
        )
    } else if cause.contains("invalid peer certificate: certificate expired")
        || cause.contains("invalid peer certificate: Expired")
    {
        "the agent's certificate has expired; corrald needs a new --tls-cert (it reads it \
         again on SIGHUP)"
            .to_string()
    } else if cause.contains("received fatal alert: UnknownCA")
        || cause.contains("received fatal alert: BadCertificate")
    {
        refused("it is not signed by a CA the agent trusts (its --tls-client-ca)")
    } else if cause.contains("received fatal alert: CertificateExpired") {
        refused("it has expired")
    } else if cause.contains("received fatal alert: CertificateRequired") {
        refused("none was given")
    } else if cause.contains("received fatal alert") {
        let alert = cause
            .split("received fatal alert: ")
            .nth(1)
            .unwrap_or_default()
            .split([' ', ':', ')'])
            .next()
            .unwrap_or_default();
        format!("the agent ended the TLS handshake (alert {alert})")
    } else if cause.contains("connection closed") || cause.contains("broken pipe") {
        // TLS 1.3: the agent checks the client certificate after the client finished its side
        // of the handshake, and closes the connection when it refuses it.
        match &cert {
            Some(cert) => format!(
                "the agent closed the connection after the TLS handshake: it most likely refused \
                 the client certificate {cert} (not signed by its --tls-client-ca, expired, or not yet valid)"
            ),
            None => refused(""),
        }
    } else {
        return None;
    };
    Some(why)
}

/// The replies of a server-streaming call, read one at a time.
pub struct Replies<T> {
    inner: tonic::Streaming<T>,
    error: fn(Status) -> anyhow::Error,
    tls: Option<Arc<TlsInfo>>,
}

impl<T> Replies<T> {
    /// The next reply; `None` once the agent ended the stream. Cancel-safe: dropping the future
    /// before it completes loses no reply.
    pub async fn next(&mut self) -> anyhow::Result<Option<T>> {
        self.inner
            .message()
            .await
            .map_err(|status| with_hint(status, self.error, self.tls.as_deref()))
    }
}

impl<T> std::fmt::Debug for Replies<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies").finish_non_exhaustive()
    }
}

/// A parsed `--addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The agent's Unix socket.
    Unix(PathBuf),
    /// The agent's TLS listener, as an `https://host:port` URI.
    Https(String),
}

/// Parses `--addr`: `unix:///PATH`, `unix:PATH`, a bare absolute socket path, or
/// `https://HOST:PORT`. `http://` is refused: the agent serves TCP only with TLS.
pub fn parse_addr(addr: &str) -> anyhow::Result<Target> {
    let addr = addr.trim();
    if let Some(rest) = addr.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            bail!(
                "--addr {addr}: no socket path; expected unix:///PATH, e.g. unix:///run/corral/corral.sock"
            );
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    if addr.starts_with('/') {
        return Ok(Target::Unix(PathBuf::from(addr)));
    }
    let lower = addr.to_ascii_lowercase();
    if lower.starts_with("http://") {
        bail!(
            "--addr {addr}: plaintext TCP is not offered; corrald listens on TCP only with TLS. \
             Use https://HOST:PORT with --tls-ca FILE, or the local socket unix:///PATH"
        );
    }
    if let Some(rest) = lower.strip_prefix("https://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            bail!("--addr {addr}: no host; expected https://HOST:PORT");
        }
        if let Err(e) = addr.parse::<tonic::codegen::http::Uri>() {
            bail!("--addr {addr}: not a valid address: {e}");
        }
        return Ok(Target::Https(addr.to_owned()));
    }
    bail!("--addr {addr}: unsupported address; expected unix:///PATH or https://HOST:PORT")
}

/// Connects to the agent at `--addr`, within [`CONNECT_TIMEOUT`].
pub async fn connect(args: &ConnectArgs) -> anyhow::Result<Session> {
    let addr = args.addr.trim();
    let target = parse_addr(addr)?;
    let tls = match (&target, &args.tls_ca) {
        (Target::Https(_), Some(ca)) => Some(Arc::new(TlsInfo {
            ca: ca.clone(),
            cert: args.tls_cert.clone(),
        })),
        _ => None,
    };
    let endpoint = match &target {
        Target::Unix(path) => Endpoint::from_shared(format!("unix://{}", path.display()))
            .with_context(|| format!("--addr {addr}: not a valid socket address"))?,
        Target::Https(uri) => Endpoint::from_shared(uri.clone())
            .with_context(|| format!("--addr {addr}: not a valid address"))?
            .tls_config(tls_config(addr, args)?)
            .map_err(|e| {
                anyhow!(
                    "cannot use the TLS files (--tls-ca, --tls-cert, --tls-key): {}",
                    root_cause(&e)
                )
            })?,
    }
    .connect_timeout(CONNECT_TIMEOUT);

    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(Session {
            client: AgentClient::new(channel),
            // A listener that requires a client certificate rejects the handshake only after the
            // client has finished its side (TLS 1.3), so the first call fails, not the connect.
            tls,
        }),
        Ok(Err(e)) => Err(
            match tls.as_deref().and_then(|t| explain_tls(t, &chain(&e))) {
                Some(why) => anyhow!("cannot connect to {addr}: {why}"),
                None => connect_error(addr, &target, &e),
            },
        ),
        Err(_) => Err(anyhow!(
            "cannot connect to {addr}: no answer within {}s — is corrald running and reachable?",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// The TLS settings for an `https://` address: the CA is required (the agent's certificate is
/// signed by a private CA; no public roots are trusted), the client identity is optional.
fn tls_config(addr: &str, args: &ConnectArgs) -> anyhow::Result<ClientTlsConfig> {
    let Some(ca) = &args.tls_ca else {
        bail!(
            "--addr {addr} needs --tls-ca FILE (or CORRAL_TLS_CA): the CA certificate that signed \
             corrald's certificate"
        );
    };
    let ca = read_pem("--tls-ca", ca, "CERTIFICATE-----")?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let pem = read_pem("--tls-cert", cert, "CERTIFICATE-----")?;
        check_validity(cert, &pem)?;
        tls = tls.identity(Identity::from_pem(
            pem,
            read_pem("--tls-key", key, "PRIVATE KEY-----")?,
        ));
    }
    Ok(tls)
}

/// Refuses a client certificate that has expired or is not valid yet, naming the date: the
/// agent would only close the connection.
fn check_validity(path: &Path, pem: &[u8]) -> anyhow::Result<()> {
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem) else {
        return Ok(());
    };
    let Ok(cert) = block.parse_x509() else {
        return Ok(());
    };
    let when = |t: x509_parser::time::ASN1Time| {
        u64::try_from(t.timestamp())
            .map(|s| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                    .to_string()
            })
            .unwrap_or_else(|_| t.to_string())
    };
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        bail!(
            "--tls-cert {}: the certificate expired on {}; the agent refuses it. Get a new one \
             from the CA that signs client certificates",
            path.display(),
            when(validity.not_after)
        );
    }
    if validity.not_before > now {
        bail!(
            "--tls-cert {}: the certificate is not valid before {}; the agent refuses it until \
             then (or check this host's clock)",
            path.display(),
            when(validity.not_before)
        );
    }
    Ok(())
}

/// Reads a PEM file and checks that it holds a block of the expected kind, so that a wrong file
/// is named here rather than surfacing later as a failed handshake.
fn read_pem(flag: &str, path: &Path, label_end: &str) -> anyhow::Result<Vec<u8>> {
    let pem = fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let found = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.trim_end().ends_with(label_end));
    if !found {
        let kind = label_end.trim_end_matches('-').to_lowercase();
        bail!("{flag} {}: no PEM {kind} in this file", path.display());
    }
    Ok(pem)
}

/// A failed connection, explained: the socket is missing, not ours to open, or nobody listens.
fn connect_error(addr: &str, target: &Target, err: &(dyn StdError + 'static)) -> anyhow::Error {
    let unix = matches!(target, Target::Unix(_));
    if let Some(io) = find_io_error(err) {
        let hint = match io.kind() {
            io::ErrorKind::NotFound if unix => Some(
                "no such socket — is corrald running? (--addr or CORRAL_ADDR picks another socket)",
            ),
            io::ErrorKind::PermissionDenied if unix => Some(
                "permission denied — is corrald running, and are you root or in the socket's group?",
            ),
            io::ErrorKind::ConnectionRefused if unix => Some(
                "connection refused — the socket exists but nobody listens; is corrald running?",
            ),
            io::ErrorKind::ConnectionRefused => {
                Some("connection refused — is corrald listening there (corrald --listen)?")
            }
            io::ErrorKind::TimedOut => Some("timed out — is the host reachable?"),
            _ => None,
        };
        if let Some(hint) = hint {
            return anyhow!("cannot connect to {addr}: {hint}");
        }
    }
    anyhow!("cannot connect to {addr}: {}", root_cause(err))
}

fn find_io_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// The innermost cause's message: the most specific one (e.g. a TLS certificate problem) where
/// the outer layers only say "transport error".
fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A gRPC status as the user sees it: the agent's message unchanged for the codes that explain
/// themselves (bad input, unknown service, host cannot enforce, not allowed), otherwise prefixed
/// with the code, and with the underlying cause when the status comes from the transport.
pub fn rpc_error(status: Status) -> anyhow::Error {
    let detailed = detailed_message(&status);
    let message = detailed.as_deref().unwrap_or(status.message());
    match status.code() {
        code @ (Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::AlreadyExists)
            if !message.is_empty() =>
        {
            RpcError::new(code, message.to_owned()).into()
        }
        code => {
            let mut text = code_name(code).to_owned();
            if !message.is_empty() {
                text = format!("{text}: {message}");
            }
            if let Some(source) = status.source() {
                let cause = root_cause(source);
                if !message.contains(&cause) {
                    text = format!("{text}: {cause}");
                }
            }
            if code == Code::Unauthenticated {
                text.push_str(" (the agent wants a client certificate: --tls-cert and --tls-key)");
            }
            RpcError::new(code, text).into()
        }
    }
}

/// The agent's refusal from its standard details, one line per violation: `field: why` for
/// a `BadRequest` (a spec or request field), `subject: why` for a `PreconditionFailure`
/// (what the host cannot do); with the count of those left out when not all were sent.
/// `None` when the status has neither.
fn detailed_message(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let mut lines: Vec<String> = Vec::new();
    if let Some(b) = details.bad_request() {
        lines.extend(b.field_violations.iter().map(|v| {
            if v.field.is_empty() {
                v.description.clone()
            } else {
                format!("{}: {}", v.field, v.description)
            }
        }));
    }
    if let Some(p) = details.precondition_failure() {
        lines.extend(
            p.violations
                .iter()
                .map(|v| format!("{}: {}", v.subject, v.description)),
        );
    }
    if lines.is_empty() {
        return None;
    }
    let total = details
        .error_info()
        .and_then(|i| i.metadata.get("violations"))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(lines.len());
    if total > lines.len() {
        let more = total - lines.len();
        lines.push(format!(
            "... and {more} more errors ({total} in all; fix these first)"
        ));
    }
    Some(lines.join("\n"))
}

/// A `Watch` status: `OUT_OF_RANGE` and `RESOURCE_EXHAUSTED` name the index to resume from, and
/// are shown unchanged; any other status as [`rpc_error`] words it.
fn watch_error(status: Status) -> anyhow::Error {
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted
            if !status.message().is_empty() && status.source().is_none() =>
        {
            RpcError::new(status.code(), status.message().to_owned()).into()
        }
        _ => rpc_error(status),
    }
}

/// An error the agent answered with: the text shown to the user, and the status code, for the
/// commands that act on it ([`is_not_found`]).
#[derive(Debug)]
struct RpcError {
    code: Code,
    text: String,
}

impl RpcError {
    fn new(code: Code, text: String) -> Self {
        RpcError { code, text }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl StdError for RpcError {}

/// `text` with each `requests[i]` (a request of an ApplyBatch, as the agent names it) given
/// as `labels[i]`: `requests[1].command: ...` reads `b.toml: command: ...`.
fn name_requests(text: &str, labels: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("requests[") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "requests[".len()..];
        let named = after.split_once(']').and_then(|(n, tail)| {
            let label = labels.get(n.parse::<usize>().ok()?)?;
            Some((label, tail.strip_prefix('.').map_or(tail, |t| t)))
        });
        match named {
            Some((label, tail)) => {
                out.push_str(label);
                if !tail.starts_with(':') {
                    out.push_str(": ");
                }
                rest = tail;
            }
            None => {
                out.push_str("requests[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether the agent answered `NOT_FOUND` (no such service or instance).
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.downcast_ref::<RpcError>()
        .is_some_and(|e| e.code == Code::NotFound)
}

/// Whether the agent could not be reached for a call (e.g. while it restarts).
pub fn is_unavailable(err: &anyhow::Error) -> bool {
    err.downcast_ref::<RpcError>()
        .is_some_and(|e| e.code == Code::Unavailable)
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented by this agent",
        Code::Internal => "internal error",
        Code::Unavailable => "agent unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_name_the_file() {
        let labels = ["a.toml".to_owned(), "specs/b.toml".to_owned()];
        let cases = [
            (
                "requests[1].command: must not be empty",
                "specs/b.toml: command: must not be empty",
            ),
            (
                "requests[0]: resources.cpu: too much\nrequests[1].name: taken",
                "a.toml: resources.cpu: too much\nspecs/b.toml: name: taken",
            ),
            // Out of range or not a number: left as the agent said it.
            ("requests[7].x: y", "requests[7].x: y"),
            ("requests[z].x: y", "requests[z].x: y"),
            ("requests: at most 100", "requests: at most 100"),
            ("no request named", "no request named"),
        ];
        for (text, want) in cases {
            assert_eq!(name_requests(text, &labels), want, "{text:?}");
        }
    }

    #[test]
    fn unix_addresses() {
        let want = Target::Unix(PathBuf::from("/run/corral/corral.sock"));
        assert_eq!(parse_addr("unix:///run/corral/corral.sock").unwrap(), want);
        assert_eq!(parse_addr("unix:/run/corral/corral.sock").unwrap(), want);
        assert_eq!(parse_addr("/run/corral/corral.sock").unwrap(), want);
        assert!(parse_addr("unix://").is_err());
        assert!(parse_addr("unix:").is_err());
    }

    #[test]
    fn https_addresses() {
        assert_eq!(
            parse_addr("https://node1:7443").unwrap(),
            Target::Https("https://node1:7443".into())
        );
        assert!(parse_addr("https://").is_err());
    }

    #[test]
    fn plaintext_tcp_is_refused_with_a_way_out() {
        let err = parse_addr("http://node1:7443").unwrap_err().to_string();
        assert!(err.contains("plaintext TCP is not offered"), "{err}");
        assert!(err.contains("https://"), "{err}");
        let err = parse_addr("HTTP://node1:7443").unwrap_err().to_string();
        assert!(err.contains("plaintext"), "{err}");
    }

    #[test]
    fn other_addresses_are_refused() {
        for addr in ["node1:7443", "tcp://node1:7443", "", "relative/path.sock"] {
            let err = parse_addr(addr).unwrap_err().to_string();
            assert!(
                err.contains("expected unix:///PATH or https://HOST:PORT"),
                "{addr}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn https_needs_a_ca() {
        let args = ConnectArgs {
            addr: "https://node1:7443".into(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        };
        let err = connect(&args).await.unwrap_err().to_string();
        assert!(err.contains("needs --tls-ca"), "{err}");
    }

    #[tokio::test]
    async fn an_unreadable_ca_is_named() {
        let args = ConnectArgs {
            addr: "https://node1:7443".into(),
            tls_ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            tls_cert: None,
            tls_key: None,
        };
        let err = format!("{:#}", connect(&args).await.unwrap_err());
        assert!(
            err.contains("cannot read --tls-ca /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn tls_files_must_hold_the_right_pem_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("ca.pem");
        fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let key = dir.path().join("me.key");
        fs::write(
            &key,
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(read_pem("--tls-ca", &cert, "CERTIFICATE-----").is_ok());
        assert!(read_pem("--tls-key", &key, "PRIVATE KEY-----").is_ok());
        let err = read_pem("--tls-ca", &key, "CERTIFICATE-----")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "--tls-ca {}: no PEM certificate in this file",
                key.display()
            )
        );
        let err = read_pem("--tls-key", &cert, "PRIVATE KEY-----")
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("no PEM private key in this file"), "{err}");
    }

    #[test]
    fn connection_failures_say_what_to_check() {
        let addr = "unix:///run/corral/corral.sock";
        let unix = Target::Unix(PathBuf::from("/run/corral/corral.sock"));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(
            connect_error(addr, &unix, &denied).to_string(),
            "cannot connect to unix:///run/corral/corral.sock: permission denied — is corrald \
             running, and are you root or in the socket's group?"
        );
        let tcp = Target::Https("https://node1:7443".into());
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let err = connect_error("https://node1:7443", &tcp, &refused).to_string();
        assert!(err.contains("is corrald listening there"), "{err}");
        let other = io::Error::other("invalid peer certificate: UnknownIssuer");
        let err = connect_error("https://node1:7443", &tcp, &other).to_string();
        assert_eq!(
            err,
            "cannot connect to https://node1:7443: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn self_explaining_statuses_keep_the_message_unchanged() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::PermissionDenied,
        ] {
            let msg = r#"resources.memory: "12XB" is not a size"#;
            assert_eq!(rpc_error(Status::new(code, msg)).to_string(), msg);
        }
    }

    #[test]
    fn watch_statuses_that_say_where_to_resume_are_unchanged() {
        let msg = "event 3 is no longer kept: the oldest event kept is 10";
        assert_eq!(watch_error(Status::out_of_range(msg)).to_string(), msg);
        let msg =
            "the watcher fell too far behind the event log and was cut off: resume from index 42";
        assert_eq!(
            watch_error(Status::resource_exhausted(msg)).to_string(),
            msg
        );
        assert_eq!(
            watch_error(Status::internal("event log: read failed")).to_string(),
            "internal error: event log: read failed"
        );
        // Elsewhere, they name their code.
        assert_eq!(
            rpc_error(Status::out_of_range("too far")).to_string(),
            "out of range: too far"
        );
    }

    #[test]
    fn a_refused_rollout_says_how_to_supersede_it() {
        let busy = || Status::failed_precondition("rollout web-r3 of web is still running");
        assert_eq!(
            rpc_error(supersede_hint(busy(), false)).to_string(),
            "rollout web-r3 of web is still running (use --force to supersede it)"
        );
        assert_eq!(
            rpc_error(supersede_hint(busy(), true)).to_string(),
            "rollout web-r3 of web is still running"
        );
        assert_eq!(
            rpc_error(supersede_hint(Status::failed_precondition(""), false)).to_string(),
            "another rollout of the service is running (use --force to supersede it)"
        );
        assert_eq!(
            rpc_error(supersede_hint(
                Status::not_found("service \"web\" not found"),
                false
            ))
            .to_string(),
            "service \"web\" not found"
        );
        // Other preconditions are not about a rollout.
        let unenforceable = "resources.memory: this host cannot enforce a memory limit";
        assert_eq!(
            rpc_error(supersede_hint(
                Status::failed_precondition(unenforceable),
                false
            ))
            .to_string(),
            unenforceable
        );
    }

    /// The standard details are shown one line per violation: the fields of a refused spec,
    /// what the host cannot do, and how many more there were when not all were sent.
    #[test]
    fn details_are_one_line_per_violation() {
        use tonic_types::{ErrorDetails, StatusExt};
        let mut d = ErrorDetails::new();
        d.add_bad_request_violation("resources.memory", "\"12XB\" is not a size")
            .add_bad_request_violation("command", "required")
            .set_error_info(
                "INVALID_FIELD",
                "corral.dev",
                std::collections::HashMap::from([("violations".to_string(), "5".to_string())]),
            );
        let status = Status::with_error_details(Code::InvalidArgument, "ignored", d);
        assert_eq!(
            rpc_error(status).to_string(),
            "resources.memory: \"12XB\" is not a size\ncommand: required\n... and 3 more errors (5 in all; fix these first)"
        );
        let mut d = ErrorDetails::new();
        d.add_precondition_failure_violation("HOST", "command[0]", "\"x\" is not found")
            .add_precondition_failure_violation("HOST", "ports.http", "port 80 is in use");
        let status = Status::with_error_details(Code::FailedPrecondition, "a; b", d);
        assert_eq!(
            rpc_error(status).to_string(),
            "command[0]: \"x\" is not found\nports.http: port 80 is in use"
        );
    }

    #[test]
    fn not_found_is_told_apart() {
        assert!(is_not_found(&rpc_error(Status::not_found(
            "service \"web\" not found"
        ))));
        assert!(is_not_found(&rpc_error(Status::not_found(""))));
        assert!(!is_not_found(&rpc_error(Status::invalid_argument("name"))));
        assert!(!is_not_found(&anyhow!("service \"web\" not found")));
    }

    #[test]
    fn other_statuses_name_their_code() {
        let err = rpc_error(Status::internal("state dir is read-only")).to_string();
        assert_eq!(err, "internal error: state dir is read-only");
        let err = rpc_error(Status::unauthenticated("")).to_string();
        assert!(err.starts_with("unauthenticated"), "{err}");
        assert!(err.contains("--tls-cert"), "{err}");
        let err = rpc_error(Status::not_found("")).to_string();
        assert_eq!(err, "not found");
    }
}
