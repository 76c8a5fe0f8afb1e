//! `corral-bench coldstart`: a client's `connect()` to the first byte of the answer, for a
//! trivial HTTP server (`corral-testbin http-listen`, serving the socket it is handed as fd 3)
//! side by side: already running (the app's floor), started on the connection by
//! `systemd-socket-activate` (skipped when absent), and started on the connection by corral
//! with `[scale] min = 0`. Then the autoscaler's own CPU with 100 services under `[scale]`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Agent, free_port, testbin};

/// connect() to the first byte of the answer to one GET.
fn first_byte(port: u16) -> std::io::Result<Duration> {
    let t0 = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut b = [0u8; 1];
    if c.read(&mut b)? == 0 {
        return Err(std::io::Error::other("closed before answering"));
    }
    let took = t0.elapsed();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    Ok(took)
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[crate::quantile_index(v.len(), q)]
}

fn row(name: &str, v: &mut [Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        println!("  {name:<26} skipped");
        return None;
    }
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    println!(
        "  {name:<26} p50 {:>8.2} ms   p99 {:>8.2} ms   (n = {})",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        v.len()
    );
    Some((p50, p99))
}

/// Wait until something listens on 127.0.0.1:port (seen in /proc/net/tcp, never by connecting:
/// a connection would start the server).
fn wait_listening(port: u16) {
    let want = format!("0100007F:{port:04X}");
    for _ in 0..500 {
        let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if text.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server already running on a socket the benchmark hands it.
fn running(rounds: usize) -> Vec<Duration> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(testbin());
    cmd.arg("http-listen")
        .env("LISTEN_FDS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) are made.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the server");
    // Warm up: it answers once it runs.
    let mut ok = false;
    for _ in 0..200 {
        if first_byte(port).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = if ok {
        (0..rounds).filter_map(|_| first_byte(port).ok()).collect()
    } else {
        Vec::new()
    };
    let _ = child.kill();
    let _ = child.wait();
    out
}

/// `systemd-socket-activate -l ADDR server`: the server is executed on the first connection.
fn socket_activate(rounds: usize) -> Vec<Duration> {
    let Some(sa) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for _ in 0..rounds {
        let port = free_port();
        let mut child = Command::new(sa)
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg(testbin())
            .arg("http-listen")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn systemd-socket-activate");
        wait_listening(port);
        if let Ok(d) = first_byte(port) {
            out.push(d);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    out
}

/// corral with `[scale] min = 0`: each round from zero instances.
async fn corral(agent: &Agent, rounds: usize) -> Vec<Duration> {
    let port = free_port();
    let spec = format!(
        "name = \"cold\"\ncommand = [{:?}, \"http-listen\"]\n[stop]\ngrace = \"1s\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[scale]\nmax = 1\ntarget_connections = 100\nidle_after = \"100ms\"\nscale_down_delay = \"100ms\"\n",
        testbin()
    );
    agent.apply(&spec).await.expect("apply");
    let mut out = Vec::new();
    for _ in 0..rounds {
        // Down to zero, every instance gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = agent.get("cold").await.expect("get");
            if s.desired == 0 && s.instances.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                println!("  corral: did not go back to zero; stopping");
                return out;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Ok(Ok(d)) = tokio::task::spawn_blocking(move || first_byte(port)).await {
            out.push(d);
        }
    }
    let _ = agent.delete("cold").await;
    out
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (n(11) + n(12)) as f64 / hz
}

/// The agent's CPU with 100 services under `[scale]` (at zero, waiting; sampled every 1 s),
/// against the same agent with none.
async fn autoscaler_cpu() {
    let agent = Agent::start_logging(None, "warn").await;
    let pid = agent.pid().expect("agent pid");
    let span = Duration::from_secs(20);
    let c0 = cpu_secs(pid);
    tokio::time::sleep(span).await;
    let idle = (cpu_secs(pid) - c0) / span.as_secs_f64();
    for i in 0..100 {
        let spec = format!(
            "name = \"scaled-{i}\"\ncommand = [{:?}, \"http-listen\"]\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{}\"\n[scale]\nmax = 4\ntarget_connections = 20\n",
            testbin(),
            free_port()
        );
        agent.apply(&spec).await.expect("apply");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = cpu_secs(pid);
    tokio::time::sleep(span).await;
    let scaled = (cpu_secs(pid) - c0) / span.as_secs_f64();
    println!(
        "  agent CPU, no services:          {:.3} % of a core\n  agent CPU, 100 under [scale]:    {:.3} % of a core (sampled every 1 s; bar: 1 %)",
        idle * 100.0,
        scaled * 100.0
    );
}

/// The section.
pub async fn bench(rounds: usize) {
    println!("coldstart: connect() to the first response byte, {rounds} rounds each");
    println!(
        "  (a shared, loaded machine: other builds and tests run at the same time; compare columns of one run)"
    );
    let mut warm = tokio::task::spawn_blocking(move || running(rounds * 5))
        .await
        .unwrap_or_default();
    let mut sa = tokio::task::spawn_blocking(move || socket_activate(rounds))
        .await
        .unwrap_or_default();
    let agent = Agent::start_full_args("warn", &["--autoscale-interval", "50ms"]).await;
    let mut cold = corral(&agent, rounds).await;
    drop(agent);
    let floor = row("already running", &mut warm);
    let activate = row("systemd-socket-activate", &mut sa);
    let ours = row("corral min = 0", &mut cold);
    if let (Some(f), Some(o)) = (floor, ours) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "  corral's added latency over the running server: p50 {:.2} ms, p99 {:.2} ms",
            ms(o.0.saturating_sub(f.0)),
            ms(o.1.saturating_sub(f.1))
        );
        if let Some(a) = activate {
            println!(
                "  systemd-socket-activate's (≈ the app's own start): p50 {:.2} ms, p99 {:.2} ms",
                ms(a.0.saturating_sub(f.0)),
                ms(a.1.saturating_sub(f.1))
            );
        }
    }
    autoscaler_cpu().await;
}
