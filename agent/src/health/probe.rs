//! One run of a probe: [`check`] connects, asks and returns an [`Outcome`] whose reason says
//! why (`HTTP 503`, `connect 127.0.0.1:8080: connection refused`, `timed out after 1s`,
//! `exit 3: boom`, `grpc: NOT_SERVING`). Every run is cut at its timeout; dropping the future
//! (a timeout, an aborted prober) closes its sockets, and an [`ExecRunner`] must kill what it
//! started when its future is dropped.
//!
//! HTTP is a minimal HTTP/1.1 `GET` written here: only the status line is read, never the
//! body, so a large or endless body costs nothing. gRPC uses the standard
//! `grpc.health.v1.Health/Check` over plaintext HTTP/2 (a probe reaches the instance's own port
//! on loopback; it never uses TLS).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::target::Target;
use crate::spec::format_duration;

/// The most output an exec probe's reason carries, in bytes.
pub const MAX_OUTPUT_TAIL: usize = 200;

/// The longest HTTP status line read before giving up on it.
const MAX_STATUS_LINE: usize = 1024;

/// The result of one run of a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub healthy: bool,
    /// Why, in a few lowercase words (protocol tokens such as `HTTP 503` as they are).
    pub reason: String,
    /// How long the run took.
    pub elapsed: Duration,
}

/// How an exec probe's command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// The end of its stdout and stderr (interleaved), as made by [`output_tail`].
    pub output_tail: String,
}

/// Runs an exec probe's command inside an instance (its namespaces, cgroup and user).
///
/// Contract: the returned future resolves when the command has ended. When the future is
/// dropped before that (the probe timed out, or its prober was stopped), the runner kills the
/// command and everything it started, and reaps them; nothing may outlive the future. `timeout`
/// is the probe's timeout, for runners that want a deadline of their own; [`check`] enforces it
/// either way.
pub trait ExecRunner: Send + Sync {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = io::Result<ExecResult>> + Send + 'a>>;
}

/// Runs one probe of `target`, cut at `timeout`.
pub async fn check(target: &Target, timeout: Duration, exec: &dyn ExecRunner) -> Outcome {
    let start = Instant::now();
    let run = async {
        match target {
            Target::Http {
                host,
                port,
                path,
                host_header,
            } => http(SocketAddr::new(*host, *port), path, host_header).await,
            Target::Tcp { addr } => tcp(*addr).await,
            Target::Grpc { addr, service } => grpc(*addr, service).await,
            Target::Exec { argv } => match exec.run(argv, timeout).await {
                Ok(result) => exec_verdict(&result),
                Err(e) => Verdict::fail(format!(
                    "exec {}: {}",
                    argv.first().map(String::as_str).unwrap_or_default(),
                    io_reason(&e)
                )),
            },
        }
    };
    let verdict = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| Verdict::fail(format!("timed out after {}", format_duration(timeout))));
    Outcome {
        healthy: verdict.healthy,
        reason: verdict.reason,
        elapsed: start.elapsed(),
    }
}

/// A probe's answer before it is timed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    healthy: bool,
    reason: String,
}

impl Verdict {
    fn pass(reason: impl Into<String>) -> Verdict {
        Verdict {
            healthy: true,
            reason: reason.into(),
        }
    }

    fn fail(reason: impl Into<String>) -> Verdict {
        Verdict {
            healthy: false,
            reason: reason.into(),
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, Verdict> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| Verdict::fail(format!("connect {addr}: {}", io_reason(&e))))
}

async fn tcp(addr: SocketAddr) -> Verdict {
    match connect(addr).await {
        Ok(_) => Verdict::pass(format!("connected to {addr}")),
        Err(v) => v,
    }
}

async fn http(addr: SocketAddr, path: &str, host_header: &str) -> Verdict {
    let mut stream = match connect(addr).await {
        Ok(s) => s,
        Err(v) => return v,
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: corral-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Verdict::fail(format!("http: sending the request: {}", io_reason(&e)));
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() >= MAX_STATUS_LINE {
            break;
        }
        match stream.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => {
                return Verdict::fail("http: connection closed without a response");
            }
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Verdict::fail(format!("http: reading the response: {}", io_reason(&e)));
            }
        }
    }
    // The body is never read: the stream is dropped here.
    http_verdict(&buf)
}

/// The verdict on an HTTP status line (without its line end): 2xx and 3xx are healthy.
fn http_verdict(line: &[u8]) -> Verdict {
    match parse_status_line(line) {
        Some(code) if (200..400).contains(&code) => Verdict::pass(format!("HTTP {code}")),
        Some(code) => Verdict::fail(format!("HTTP {code}")),
        None => {
            let text = String::from_utf8_lossy(line);
            let text: String = text.trim_end().chars().take(60).collect();
            Verdict::fail(format!("http: not an HTTP response: {text:?}"))
        }
    }
}

/// `HTTP/1.1 200 OK` -> 200.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let version = &rest[..space];
    if version.is_empty() || !version.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
        return None;
    }
    let code = rest.get(space + 1..space + 4)?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    match rest.get(space + 4) {
        None | Some(b' ' | b'\r') => {}
        Some(_) => return None,
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

async fn grpc(addr: SocketAddr, service: &str) -> Verdict {
    // No timeouts of tonic's own: `check` cuts the whole run, so a hang always reads
    // "timed out after …" whichever step it was in.
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e,
        Err(e) => return Verdict::fail(format!("grpc: {}", error_chain_reason(&e))),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Verdict::fail(format!("connect {addr}: {}", error_chain_reason(&e))),
    };
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => grpc_verdict(response.into_inner().status),
        Err(status) if status.message().is_empty() => {
            Verdict::fail(format!("grpc: {}", code_name(status.code())))
        }
        Err(status) => Verdict::fail(format!(
            "grpc: {}: {}",
            code_name(status.code()),
            status.message()
        )),
    }
}

fn grpc_verdict(status: i32) -> Verdict {
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Verdict::pass("grpc: SERVING"),
        Ok(other) => Verdict::fail(format!("grpc: {}", other.as_str_name())),
        Err(_) => Verdict::fail(format!("grpc: unknown serving status {status}")),
    }
}

/// The canonical name of a gRPC status code, as in the gRPC docs.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The verdict on an exec probe's end: exit 0 is healthy.
fn exec_verdict(r: &ExecResult) -> Verdict {
    let with_output = |head: String| {
        if r.output_tail.is_empty() {
            head
        } else {
            format!("{head}: {}", r.output_tail)
        }
    };
    match (r.code, r.signal) {
        (_, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map(|s| format!(" ({})", s.as_str()))
                .unwrap_or_default();
            Verdict::fail(with_output(format!("killed by signal {signal}{name}")))
        }
        (Some(0), None) => Verdict::pass("exit 0"),
        (Some(code), None) => Verdict::fail(with_output(format!("exit {code}"))),
        (None, None) => Verdict::fail(with_output("ended without an exit status".to_string())),
    }
}

/// The last line(s) of a command's output for a probe's reason: at most [`MAX_OUTPUT_TAIL`]
/// bytes from the end, lines joined with `" | "`, blank lines and surrounding whitespace
/// dropped, control characters replaced, `…` in front when something was cut.
pub fn output_tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            l.trim()
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
        })
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines.join(" | ");
    if joined.len() <= MAX_OUTPUT_TAIL {
        return joined;
    }
    let budget = MAX_OUTPUT_TAIL - "…".len();
    let mut start = joined.len() - budget;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", joined[start..].trim_start())
}

/// An I/O error as a reason: `connection refused`, without the `(os error N)` suffix.
fn io_reason(e: &io::Error) -> String {
    lowercase_first(&strip_os_error(&e.to_string()))
}

/// The innermost I/O error in an error's source chain, or its last message.
fn error_chain_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io_reason(io);
        }
        last = err;
        current = err.source();
    }
    lowercase_first(&strip_os_error(&last.to_string()))
}

fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s.to_string(),
    }
}

/// `Connection refused` -> `connection refused`; `HTTP` and other all-caps words are kept.
fn lowercase_first(s: &str) -> String {
    let first_word = s.split(' ').next().unwrap_or_default();
    let is_acronym = first_word.chars().filter(char::is_ascii_uppercase).count() > 1;
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if !is_acronym => c.to_lowercase().chain(chars).collect(),
        _ => s.to_string(),
    }
}

impl fmt::Display for Outcome {
    /// `healthy: HTTP 200 (12ms)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.healthy { "healthy" } else { "unhealthy" };
        write!(
            f,
            "{state}: {} ({})",
            self.reason,
            format_duration(Duration::from_millis(crate::num::millis(self.elapsed)))
        )
    }
}

#[cfg(test)]
mod tests;
