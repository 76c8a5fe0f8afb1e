//! A loopback HTTP/1.1 (and HTTPS) server the tests start in-process, serving what each
//! route says and behaving badly on purpose: truncated bodies, stalls, redirects, errors,
//! throttled bodies. It records every request (path, Range) and the most connections it
//! served at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What a path answers.
#[derive(Clone)]
pub enum Route {
    /// 200 (or 206 for a Range) with the bytes.
    Bytes(Arc<Vec<u8>>),
    /// The status alone.
    Status(u16),
    /// 302 to the location.
    Redirect(String),
    /// Declares the whole length, sends the first `cut` bytes (from the requested offset),
    /// then closes, for the first `times` requests; then behaves as `Bytes`.
    Truncate {
        body: Arc<Vec<u8>>,
        cut: usize,
        times: usize,
    },
    /// Declares the whole length, sends `after` bytes, then sends nothing more.
    Stall { body: Arc<Vec<u8>>, after: usize },
    /// Sends `chunk` bytes every `delay` (honours Range).
    Slow {
        body: Arc<Vec<u8>>,
        chunk: usize,
        delay: Duration,
    },
    /// Waits for a permit of the gate before answering like `Bytes`.
    Gated {
        body: Arc<Vec<u8>>,
        gate: Arc<Semaphore>,
    },
}

/// One request as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    seen: Vec<Seen>,
    served: HashMap<String, usize>,
    active: usize,
    max_active: usize,
}

/// The server; it stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    scheme: &'static str,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Plain HTTP on 127.0.0.1.
    pub async fn start() -> Server {
        Server::start_with(None).await
    }

    /// HTTPS on 127.0.0.1 with this TLS config.
    pub async fn start_tls(config: rustls::ServerConfig) -> Server {
        Server::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = accept_state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(stream, state).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, state).await;
                            }
                        }
                    }
                });
            }
        });
        Server {
            addr,
            state,
            task,
            scheme,
        }
    }

    pub fn route(&self, path: &str, route: Route) {
        self.state
            .lock()
            .expect("lock")
            .routes
            .insert(path.to_string(), route);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("lock").seen.clone()
    }

    pub fn requests(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path == path).count()
    }

    pub fn max_active(&self) -> usize {
        self.state.lock().expect("lock").max_active
    }
}

struct Active(Arc<Mutex<State>>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.lock().expect("lock").active -= 1;
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, state: Arc<Mutex<State>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let range = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    let (route, served) = {
        let mut s = state.lock().expect("lock");
        s.seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
        });
        s.active += 1;
        s.max_active = s.max_active.max(s.active);
        let served = s.served.entry(path.clone()).or_default();
        *served += 1;
        let n = *served;
        (s.routes.get(&path).cloned(), n)
    };
    let _active = Active(state);
    let offset = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    match route {
        None => status(&mut stream, 404).await,
        Some(Route::Status(code)) => status(&mut stream, code).await,
        Some(Route::Redirect(to)) => {
            let reply = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        }
        Some(Route::Bytes(body)) => {
            let body = send_head(&mut stream, &body, offset).await;
            let _ = stream.write_all(body).await;
        }
        Some(Route::Gated { body, gate }) => {
            let _permit = gate.acquire().await;
            let body = send_head(&mut stream, &body, offset).await;
            let _ = stream.write_all(body).await;
        }
        Some(Route::Truncate { body, cut, times }) => {
            let rest = send_head(&mut stream, &body, offset).await;
            if served <= times {
                let _ = stream.write_all(&rest[..cut.min(rest.len())]).await;
                let _ = stream.flush().await;
            } else {
                let _ = stream.write_all(rest).await;
            }
        }
        Some(Route::Stall { body, after }) => {
            let rest = send_head(&mut stream, &body, offset).await;
            let _ = stream.write_all(&rest[..after.min(rest.len())]).await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some(Route::Slow { body, chunk, delay }) => {
            let rest = send_head(&mut stream, &body, offset).await;
            for piece in rest.chunks(chunk.max(1)) {
                if stream.write_all(piece).await.is_err() {
                    return;
                }
                let _ = stream.flush().await;
                tokio::time::sleep(delay).await;
            }
        }
    }
    let _ = stream.shutdown().await;
}

async fn status<S: AsyncWrite + Unpin>(stream: &mut S, code: u16) {
    let reason = match code {
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let body = format!("{code} {reason}\n");
    let reply = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
}

/// Writes the status line and headers for `body` from `offset`; returns what to send.
async fn send_head<'b, S: AsyncWrite + Unpin>(
    stream: &mut S,
    body: &'b [u8],
    offset: usize,
) -> &'b [u8] {
    let head = if offset > 0 && offset < body.len() {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {offset}-{}/{}\r\nConnection: close\r\n\r\n",
            body.len() - offset,
            body.len() - 1,
            body.len()
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    };
    let _ = stream.write_all(head.as_bytes()).await;
    if offset > 0 && offset < body.len() {
        &body[offset..]
    } else {
        body
    }
}
