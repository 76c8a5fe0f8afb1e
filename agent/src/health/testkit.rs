//! Test servers on loopback (HTTP, gRPC health) and an exec runner that runs commands on the
//! host, for the probe and scheduler tests.

use std::future::Future;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::probe::{ExecResult, ExecRunner, output_tail};

/// How the test HTTP server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// A complete response with this status and an empty body, then close.
    Status(u16),
    /// A status line and headers announcing a large body that never comes.
    StatusThenHang(u16),
    /// Accept, never read or answer.
    Hang,
    /// Read the request, close without answering.
    Close,
    /// Answer with something that is not HTTP.
    Garbage,
}

/// An HTTP/1.1 server on 127.0.0.1 whose behaviour can be switched while it runs.
#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    mode: Arc<Mutex<HttpMode>>,
    requests: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(mode: HttpMode) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let mode = Arc::new(Mutex::new(mode));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (m, r) = (mode.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let mode = *m.lock().expect("not poisoned");
                tokio::spawn(serve(stream, mode, r.clone()));
            }
        });
        HttpServer {
            addr,
            mode,
            requests,
            task,
        }
    }

    pub fn set(&self, mode: HttpMode) {
        *self.mode.lock().expect("not poisoned") = mode;
    }

    /// The request heads received so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("not poisoned").clone()
    }

    /// Closes the listening socket; connections to the port are refused from now on.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn serve(mut stream: TcpStream, mode: HttpMode, requests: Arc<Mutex<Vec<String>>>) {
    if mode == HttpMode::Hang {
        std::future::pending::<()>().await;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    requests
        .lock()
        .expect("not poisoned")
        .push(String::from_utf8_lossy(&head).into_owned());
    let answer = match mode {
        HttpMode::Status(code) => {
            format!("HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        HttpMode::StatusThenHang(code) => {
            format!("HTTP/1.1 {code} OK\r\nContent-Length: 1000000\r\n\r\nthe start of a body")
        }
        HttpMode::Garbage => "SSH-2.0-OpenSSH_9.6\r\n".to_string(),
        HttpMode::Close | HttpMode::Hang => return,
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    if let HttpMode::StatusThenHang(_) = mode {
        std::future::pending::<()>().await;
    }
}

/// A `grpc.health.v1.Health` server on 127.0.0.1.
#[derive(Debug)]
pub struct GrpcServer {
    pub addr: SocketAddr,
    pub reporter: HealthReporter,
    task: JoinHandle<()>,
}

impl GrpcServer {
    /// Serves the health service with `service` SERVING (and `""`, as tonic-health does).
    pub async fn start(service: &str) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(service, ServingStatus::Serving)
            .await;
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("the grpc server runs");
        });
        GrpcServer {
            addr,
            reporter,
            task,
        }
    }

    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Runs exec probes on the host, in a process group of their own, without namespaces or
/// cgroups. A thread waits for the command; when the future is dropped, the whole process group
/// is killed with SIGKILL (while the command is still unreaped, so its group id cannot have been
/// reused) and then reaped.
#[derive(Debug, Default)]
pub struct HostExec {
    /// PIDs of every command started, for tests that look for leftovers.
    pub spawned: Mutex<Vec<u32>>,
}

struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl ExecRunner for HostExec {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        _timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = io::Result<ExecResult>> + Send + 'a>> {
        Box::pin(async move {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
            let (mut reader, writer) = io::pipe()?;
            let mut command = Command::new(program);
            command
                .args(args)
                .stdin(Stdio::null())
                .stdout(writer.try_clone()?)
                .stderr(writer)
                .process_group(0);
            let mut child = command.spawn()?;
            // The command holds the parent's copies of the pipe's write end.
            drop(command);
            let pid = child.id();
            self.spawned.lock().expect("not poisoned").push(pid);

            let cancel = Arc::new(AtomicBool::new(false));
            let _guard = CancelOnDrop(cancel.clone());
            let (tx, rx) = oneshot::channel();
            std::thread::spawn(move || {
                let output = std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let _ = reader.read_to_end(&mut out);
                    out
                });
                let status = loop {
                    match child.try_wait() {
                        Ok(Some(status)) => break Ok(status),
                        Ok(None) if cancel.load(Ordering::SeqCst) => {
                            // SAFETY: kill(2) on the group of a child we have not reaped.
                            unsafe { libc::kill(-pid.cast_signed(), libc::SIGKILL) };
                            break child.wait();
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                        Err(e) => break Err(e),
                    }
                };
                let output = output.join().unwrap_or_default();
                let _ = tx.send(status.map(|s| ExecResult {
                    code: s.code(),
                    signal: s.signal(),
                    output_tail: output_tail(&output),
                }));
            });
            rx.await
                .map_err(|_| io::Error::other("the waiting thread ended"))?
        })
    }
}

/// The state letter of a process (`R`, `S`, `Z`, …) and its argv, or `None` when it is gone.
pub fn process(pid: u32) -> Option<(char, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some((state, argv))
}

/// PIDs of live (not zombie) processes with `arg` among their arguments.
pub fn live_processes_with_arg(arg: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is mounted")
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((state, argv)) = process(pid)
            && state != 'Z'
            && argv.iter().any(|a| a == arg)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `done` every 10 ms for up to 5 s; whether it became true.
pub async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}
