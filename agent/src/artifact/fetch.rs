//! Fetching a package into a file of the store, hashing it on the way: HTTP(S) with reqwest on
//! rustls (ring, the system's roots plus configured ones), redirects limited and never to
//! another scheme (nor to plain http on a non-loopback host unless allowed), connect and idle
//! timeouts, retries that resume with `Range`, and local files copied without the network.
//! At most `max_concurrent` fetches run at a time.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::{ArtifactError, Phase, Progress};
use crate::spec::artifact::{Digest, FetchPolicy, http_allowed};
use crate::spec::format_size;

/// How packages are fetched.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Fetches (downloads and local copies) running at once.
    pub max_concurrent: usize,
    /// To establish a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub idle_timeout: Duration,
    /// Redirects followed per request.
    pub max_redirects: usize,
    /// Tries per fetch; each retry resumes where the last stopped.
    pub attempts: u32,
    /// Wait before the first retry, doubled for each next one.
    pub retry_delay: Duration,
    /// Largest package accepted.
    pub max_size: u64,
    /// Plain http beyond loopback.
    pub policy: FetchPolicy,
    /// CA certificates (DER) trusted besides the system's.
    pub extra_roots: Vec<Vec<u8>>,
}

impl Default for FetchConfig {
    /// 4 at a time, connect 10 s, idle 30 s, 5 redirects, 3 attempts 1 s apart (doubling),
    /// packages up to 16 GiB.
    fn default() -> FetchConfig {
        FetchConfig {
            max_concurrent: 4,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_redirects: 5,
            attempts: 3,
            retry_delay: Duration::from_secs(1),
            max_size: 16 << 30,
            policy: FetchPolicy::default(),
            extra_roots: Vec::new(),
        }
    }
}

/// Bytes written to disk per blocking write.
const WRITE_CHUNK: usize = 1 << 20;

/// Where progress goes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reporter(Option<Arc<watch::Sender<Progress>>>);

impl Reporter {
    pub(crate) fn new(sender: Option<watch::Sender<Progress>>) -> Reporter {
        Reporter(sender.map(Arc::new))
    }

    pub(crate) fn send(&self, phase: Phase, done: u64, total: Option<u64>) {
        if let Some(tx) = &self.0 {
            tx.send_replace(Progress { phase, done, total });
        }
    }
}

/// The outcome of a fetch: what the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fetched {
    pub(crate) digest: Digest,
    pub(crate) size: u64,
}

#[derive(Debug)]
pub(crate) struct Fetcher {
    client: OnceLock<Result<reqwest::Client, String>>,
    /// The extra CA certificates, parsed (the host's are added when the client is built).
    roots: rustls::RootCertStore,
    config: FetchConfig,
    permits: Semaphore,
}

/// One attempt's failure.
enum Failure {
    /// Worth another attempt (resuming).
    Retry(String),
    /// Final.
    Fatal(ArtifactError),
}

/// A root store with `config`'s extra CA certificates.
fn extra_roots(config: &FetchConfig) -> Result<rustls::RootCertStore, ArtifactError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in &config.extra_roots {
        roots
            .add(rustls::pki_types::CertificateDer::from(der.clone()))
            .map_err(|e| ArtifactError::Client(format!("an extra CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The HTTP client of `config`: TLS with the host's CA certificates added to `roots` (the
/// extra ones), the timeouts, and redirects within the policy.
fn build_client(
    config: &FetchConfig,
    mut roots: rustls::RootCertStore,
) -> Result<reqwest::Client, ArtifactError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!(
            "no CA certificates found on this host (install ca-certificates): https:// \
             packages will fail verification"
        );
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ArtifactError::Client(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let max_redirects = config.max_redirects;
    let policy = config.policy;
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.follow();
        };
        let (from, to) = (first.scheme().to_owned(), attempt.url().scheme().to_owned());
        if attempt.previous().len() > max_redirects {
            let why = format!("more than {max_redirects} redirects");
            attempt.error(why)
        } else if from != to {
            let why = format!(
                "redirected from {from}:// to {}: a redirect to another scheme is refused",
                attempt.url()
            );
            attempt.error(why)
        } else if to == "http" && !http_allowed(attempt.url(), policy) {
            let why = format!(
                "redirected to {}: plain http is only allowed to a loopback host",
                attempt.url()
            );
            attempt.error(why)
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.idle_timeout)
        .redirect(redirects)
        .user_agent(concat!("corrald/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ArtifactError::Client(chain(&e)))
}

impl Fetcher {
    /// A fetcher for `config`; its HTTP client (with the host's CA certificates, a few
    /// hundred parsed at a cost in time and memory) is built at the first download.
    pub(crate) fn new(config: FetchConfig) -> Result<Fetcher, ArtifactError> {
        // The extra roots are checked now: a bad one refuses the agent's start.
        let roots = extra_roots(&config)?;
        let permits = Semaphore::new(config.max_concurrent.max(1));
        Ok(Fetcher {
            client: OnceLock::new(),
            roots,
            config,
            permits,
        })
    }

    /// The HTTP client, built on first use.
    fn client(&self) -> Result<&reqwest::Client, ArtifactError> {
        self.client
            .get_or_init(|| {
                build_client(&self.config, self.roots.clone()).map_err(|e| match e {
                    ArtifactError::Client(why) => why,
                    other => other.to_string(),
                })
            })
            .as_ref()
            .map_err(|e| ArtifactError::Client(e.clone()))
    }

    /// Downloads `url` into `part`, continuing what `part` already holds, and checks the
    /// result against `expected`. On a mismatch `part` is removed.
    pub(crate) async fn download(
        &self,
        url: &url::Url,
        part: &Path,
        expected: Option<Digest>,
        progress: &Reporter,
    ) -> Result<Fetched, ArtifactError> {
        // The spec was checked against the policy; a caller that skipped that is not trusted.
        match url.scheme() {
            "https" => {}
            "http" if http_allowed(url, self.config.policy) => {}
            "http" => {
                return Err(fetch_err(
                    url,
                    "plain http is only allowed to a loopback host",
                ));
            }
            other => {
                return Err(fetch_err(url, format!("scheme {other:?} is not supported")));
            }
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| fetch_err(url, "shutting down"))?;
        let attempts = self.config.attempts.max(1);
        let mut delay = self.config.retry_delay;
        let mut attempt = 1;
        loop {
            match self.attempt(url, part, expected, progress).await {
                Ok(fetched) => return Ok(fetched),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason)) if attempt >= attempts => {
                    return Err(fetch_err(
                        url,
                        format!("{reason} (gave up after {attempts} attempts)"),
                    ));
                }
                Err(Failure::Retry(reason)) => {
                    tracing::info!(%url, attempt, %reason, "fetch failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(
        &self,
        url: &url::Url,
        part: &Path,
        expected: Option<Digest>,
        progress: &Reporter,
    ) -> Result<Fetched, Failure> {
        let local = |what: &'static str| {
            let part = part.to_path_buf();
            move |e: io::Error| Failure::Fatal(ArtifactError::io(part, what)(e))
        };
        let part_owned = part.to_path_buf();
        let (file, hasher, offset) = tokio::task::spawn_blocking(move || resume(&part_owned))
            .await
            .map_err(|e| Failure::Fatal(fetch_err(url, format!("internal: {e}"))))?
            .map_err(local("reading the partial download"))?;
        let mut request = self.client().map_err(Failure::Fatal)?.get(url.clone());
        if offset > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let response = request.send().await.map_err(|e| classify(url, &e))?;
        let status = response.status();
        let length = response.content_length();
        let (mut sink, start) = match status.as_u16() {
            206 if offset > 0 => match content_range_start(&response) {
                Some(start) if start == offset => (Sink::new(file, hasher), offset),
                _ => {
                    truncate(part).map_err(local("restarting the download"))?;
                    return Err(Failure::Retry(format!(
                        "the server answered the resume from byte {offset} with another range"
                    )));
                }
            },
            200 => {
                let mut file = file;
                file.set_len(0).map_err(local("restarting the download"))?;
                file.rewind().map_err(local("restarting the download"))?;
                (Sink::new(file, Sha256::new()), 0)
            }
            416 if offset > 0 => {
                truncate(part).map_err(local("restarting the download"))?;
                return Err(Failure::Retry(format!(
                    "the server refused to resume from byte {offset}"
                )));
            }
            code if status.is_server_error() || code == 408 || code == 429 => {
                return Err(Failure::Retry(format!("HTTP {status}")));
            }
            _ if status.is_redirection() => {
                // Followed redirects never get here: this one the client would not follow
                // (a scheme it does not speak, or no Location).
                let to = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .unwrap_or("nowhere")
                    .to_string();
                return Err(Failure::Fatal(fetch_err(
                    url,
                    format!("HTTP {status} to {to}: a redirect to another scheme is refused"),
                )));
            }
            _ => return Err(Failure::Fatal(fetch_err(url, format!("HTTP {status}")))),
        };
        let total = length.map(|l| start.saturating_add(l));
        if let Some(total) = total.filter(|t| *t > self.config.max_size) {
            return Err(Failure::Fatal(self.too_large(url, total)));
        }
        let mut done = start;
        progress.send(Phase::Fetching, done, total);
        let mut response = response;
        let mut buf = Vec::with_capacity(WRITE_CHUNK);
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    // Keep what arrived: the next attempt resumes after it.
                    let _ = sink.push(std::mem::take(&mut buf)).await;
                    let _ = sink.finish().await;
                    return Err(classify(url, &e));
                }
            };
            done += chunk.len() as u64;
            if done > self.config.max_size {
                drop(sink);
                let _ = std::fs::remove_file(part);
                return Err(Failure::Fatal(self.too_large(url, done)));
            }
            buf.extend_from_slice(&chunk);
            if buf.len() >= WRITE_CHUNK {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(WRITE_CHUNK));
                sink.push(full)
                    .await
                    .map_err(local("writing the download"))?;
                progress.send(Phase::Fetching, done, total);
            }
        }
        sink.push(buf)
            .await
            .map_err(local("writing the download"))?;
        let (_file, hasher) = sink.finish().await.map_err(local("writing the download"))?;
        progress.send(Phase::Fetching, done, total);
        if let Some(total) = total.filter(|t| done < *t) {
            return Err(Failure::Retry(format!(
                "the download was cut short: {done} of {total} bytes"
            )));
        }
        let digest = Digest::from_bytes(hasher.finalize().into());
        match expected {
            Some(expected) if expected != digest => {
                let _ = std::fs::remove_file(part);
                if start > 0 {
                    // The server's file may have changed since the partial download: start over.
                    return Err(Failure::Retry(format!(
                        "sha256 mismatch after resuming at byte {start} (expected {expected}, got \
                         {digest}); starting over"
                    )));
                }
                Err(Failure::Fatal(ArtifactError::DigestMismatch {
                    url: url.to_string(),
                    expected,
                    actual: digest,
                    size: done,
                }))
            }
            _ => Ok(Fetched { digest, size: done }),
        }
    }

    fn too_large(&self, url: &url::Url, size: u64) -> ArtifactError {
        fetch_err(
            url,
            format!(
                "{} bytes is more than the limit of {}",
                size,
                format_size(self.config.max_size)
            ),
        )
    }

    /// Copies the local file `src` into `dst`, hashing it; never uses the network.
    pub(crate) async fn copy_file(
        &self,
        src: &Path,
        dst: &Path,
        progress: &Reporter,
        cancel: Arc<AtomicBool>,
    ) -> Result<Fetched, ArtifactError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ArtifactError::Fetch {
                url: src.display().to_string(),
                reason: "shutting down".into(),
            })?;
        let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
        let progress = progress.clone();
        let max = self.config.max_size;
        tokio::task::spawn_blocking(move || {
            let copied = copy_hashing(&src, &dst, max, &progress, &cancel);
            if copied.is_err() {
                // Also when the fetch was dropped: nobody else would remove it.
                let _ = std::fs::remove_file(&dst);
            }
            copied
        })
        .await
        .map_err(|e| ArtifactError::Client(format!("copy task: {e}")))?
    }
}

fn fetch_err(url: &url::Url, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::Fetch {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// An error with its causes: `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

fn classify(url: &url::Url, e: &reqwest::Error) -> Failure {
    let text = chain(e);
    // A refused redirect or a certificate the host does not trust will not change.
    if e.is_redirect() || e.is_builder() || is_tls(e) {
        return Failure::Fatal(fetch_err(url, text));
    }
    if e.is_timeout() {
        let what = if e.is_connect() {
            "connecting timed out"
        } else {
            "the server stopped sending (idle timeout)"
        };
        return Failure::Retry(format!("{what}: {text}"));
    }
    Failure::Retry(text)
}

/// Whether a TLS failure (an untrusted or invalid certificate, a refused handshake) is in
/// the error's causes: not worth retrying.
fn is_tls(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if holds_rustls(cause) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// `e` is a rustls error, or wraps one where `source()` does not show it: inside an
/// `io::Error` (tokio-rustls) or a boxed error (hyper-util boxes the connector's error).
fn holds_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    if let Some(io) = e.downcast_ref::<io::Error>() {
        return io.get_ref().is_some_and(|inner| holds_rustls(inner));
    }
    false
}

/// The first byte of a `Content-Range: bytes a-b/n` answer.
fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn truncate(part: &Path) -> io::Result<()> {
    match std::fs::remove_file(part) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Opens `part` for appending and hashes what it holds.
fn resume(part: &Path) -> io::Result<(File, Sha256, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(part)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut offset = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    file.seek(io::SeekFrom::Start(offset))?;
    Ok((file, hasher, offset))
}

/// Hashes and writes on the blocking pool, one chunk behind the network.
struct Sink {
    idle: Option<(File, Sha256)>,
    pending: Option<JoinHandle<io::Result<(File, Sha256)>>>,
}

impl Sink {
    fn new(file: File, hasher: Sha256) -> Sink {
        Sink {
            idle: Some((file, hasher)),
            pending: None,
        }
    }

    async fn take(&mut self) -> io::Result<(File, Sha256)> {
        if let Some(handle) = self.pending.take() {
            return handle.await.map_err(io::Error::other)?;
        }
        self.idle
            .take()
            .ok_or_else(|| io::Error::other("a previous write failed"))
    }

    async fn push(&mut self, data: Vec<u8>) -> io::Result<()> {
        let (mut file, mut hasher) = self.take().await?;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            file.write_all(&data)?;
            Ok((file, hasher))
        }));
        Ok(())
    }

    /// Waits for the last write and makes the file durable.
    async fn finish(&mut self) -> io::Result<(File, Sha256)> {
        let (file, hasher) = self.take().await?;
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            Ok((file, hasher))
        })
        .await
        .map_err(io::Error::other)?
    }
}

fn copy_hashing(
    src: &Path,
    dst: &Path,
    max: u64,
    progress: &Reporter,
    cancel: &AtomicBool,
) -> Result<Fetched, ArtifactError> {
    let fetch = |reason: String| ArtifactError::Fetch {
        url: src.display().to_string(),
        reason,
    };
    let mut input = File::open(src).map_err(|e| fetch(format!("cannot open it: {e}")))?;
    let meta = input.metadata().map_err(|e| fetch(e.to_string()))?;
    if !meta.is_file() {
        return Err(fetch("not a regular file".into()));
    }
    let total = meta.len();
    if total > max {
        return Err(fetch(format!(
            "{total} bytes is more than the limit of {}",
            format_size(max)
        )));
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .map_err(ArtifactError::io(dst, "creating the copy"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut done = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(fetch("cancelled".into()));
        }
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fetch(format!("reading: {e}"))),
        };
        done += n as u64;
        if done > max {
            return Err(fetch(format!(
                "more than the limit of {}",
                format_size(max)
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(ArtifactError::io(dst, "writing the copy"))?;
        progress.send(Phase::Fetching, done, Some(total));
    }
    out.sync_all()
        .map_err(ArtifactError::io(dst, "writing the copy"))?;
    Ok(Fetched {
        digest: Digest::from_bytes(hasher.finalize().into()),
        size: done,
    })
}
