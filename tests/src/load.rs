//! A bounded HTTP load generator for loopback: N clients, each sending one request per
//! connection in a loop until stopped (or a time limit), recording every request's start,
//! end and outcome. Used by the rollout tests and the rollout benchmark.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the load started.
    pub start: Duration,
    pub end: Duration,
    /// The response body, or why the request failed.
    pub outcome: Result<String, String>,
}

impl Sample {
    pub fn latency(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }
}

/// Load running in the background.
#[derive(Debug)]
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Vec<Sample>>>,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Every request, in order of completion.
    pub samples: Vec<Sample>,
}

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Load {
    /// Start `clients` clients against `127.0.0.1:port`; they stop by themselves after
    /// `limit`.
    pub fn start(port: u16, clients: usize, limit: Duration) -> Load {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let clients = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                        let start = started.elapsed();
                        let outcome = request(addr);
                        let failed = outcome.is_err();
                        out.push(Sample {
                            start,
                            end: started.elapsed(),
                            outcome,
                        });
                        if failed {
                            // Do not spin on a refused port.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    out
                })
            })
            .collect();
        Load {
            started,
            stop,
            clients,
        }
    }

    /// When the load started: its clock's zero.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Now, on the load's clock.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stop the clients and collect what they saw.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples: Vec<Sample> = self
            .clients
            .into_iter()
            .flat_map(|c| c.join().unwrap_or_default())
            .collect();
        samples.sort_by_key(|s| s.end);
        Report { samples }
    }
}

/// `GET /` on a fresh connection; the body of a 200 response.
fn request(addr: SocketAddr) -> Result<String, String> {
    let mut c =
        TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| c.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| format!("socket: {e}"))?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("incomplete response ({} bytes)", raw.len()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "status: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.trim().to_string())
}

impl Report {
    /// Requests that started within `[from, to)`.
    pub fn within(&self, from: Duration, to: Duration) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| s.start >= from && s.start < to)
    }

    pub fn failures(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.outcome.is_err()).collect()
    }

    pub fn ok(&self) -> usize {
        self.samples.iter().filter(|s| s.outcome.is_ok()).count()
    }

    /// The longest stretch within `[from, to]` in which no request completed successfully.
    pub fn longest_gap(&self, from: Duration, to: Duration) -> Duration {
        self.longest_gap_at(from, to).0
    }

    /// The longest gap (see [`Report::longest_gap`]) and when it began.
    pub fn longest_gap_at(&self, from: Duration, to: Duration) -> (Duration, Duration) {
        let mut last = from;
        let mut gap = (Duration::ZERO, from);
        for s in self.samples.iter().filter(|s| s.outcome.is_ok()) {
            if s.end < from || s.end > to {
                continue;
            }
            if s.end.saturating_sub(last) > gap.0 {
                gap = (s.end.saturating_sub(last), last);
            }
            last = s.end;
        }
        if to.saturating_sub(last) > gap.0 {
            gap = (to.saturating_sub(last), last);
        }
        gap
    }

    /// The `q` quantile (0..=1) of the latency of successful requests started within
    /// `[from, to)`.
    pub fn latency_quantile(&self, from: Duration, to: Duration, q: f64) -> Duration {
        let mut l: Vec<Duration> = self
            .within(from, to)
            .filter(|s| s.outcome.is_ok())
            .map(Sample::latency)
            .collect();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort_unstable();
        let i = crate::quantile_index(l.len(), q);
        l[i.min(l.len() - 1)]
    }

    /// Bodies of the successful responses that completed within `[from, to]`.
    pub fn bodies(&self, from: Duration, to: Duration) -> Vec<&str> {
        self.samples
            .iter()
            .filter(|s| s.end >= from && s.end <= to)
            .filter_map(|s| s.outcome.as_deref().ok())
            .collect()
    }

    /// A short account of the failures, for assertion messages.
    pub fn failure_summary(&self) -> String {
        let f = self.failures();
        let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
        for s in &f {
            if let Err(e) = &s.outcome {
                *kinds.entry(e.as_str()).or_default() += 1;
            }
        }
        format!("{} failed of {}: {kinds:?}", f.len(), self.samples.len())
    }
}
