use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic_health::ServingStatus as Reported;

use super::*;
use crate::health::target::resolve;
use crate::health::testkit::{
    GrpcServer, HostExec, HttpMode, HttpServer, eventually, live_processes_with_arg, process,
};
use crate::spec::Probe;

/// Long enough never to cut a probe that should answer.
const GENEROUS: Duration = Duration::from_secs(10);
/// For probes that hang.
const SHORT: Duration = Duration::from_millis(200);

fn http_target(addr: SocketAddr, path: &str) -> Target {
    let ports = BTreeMap::from([("admin".to_string(), addr.port())]);
    resolve(
        &Probe::Http(format!("http://localhost:{{port.admin}}{path}")),
        &ports,
    )
    .expect("a valid http probe")
}

fn argv(args: &[&str]) -> Target {
    Target::Exec {
        argv: args.iter().map(|s| s.to_string()).collect(),
    }
}

async fn probe(target: &Target, timeout: Duration) -> (bool, String) {
    let o = check(target, timeout, &HostExec::default()).await;
    (o.healthy, o.reason)
}

fn pass(reason: &str) -> (bool, String) {
    (true, reason.to_string())
}

fn fail(reason: &str) -> (bool, String) {
    (false, reason.to_string())
}

#[tokio::test]
async fn http_probe() {
    let server = HttpServer::start(HttpMode::Status(200)).await;
    let addr = server.addr;
    let target = http_target(addr, "/healthz?full=1");

    assert_eq!(probe(&target, GENEROUS).await, pass("HTTP 200"));
    let request = server.requests().pop().expect("the server got a request");
    let lines: Vec<&str> = request.split("\r\n").collect();
    assert_eq!(lines[0], "GET /healthz?full=1 HTTP/1.1");
    assert!(lines.contains(&format!("Host: localhost:{}", addr.port()).as_str()));
    assert!(lines.contains(&"User-Agent: corral-health"));
    assert!(lines.contains(&"Connection: close"));

    server.set(HttpMode::Status(302));
    assert_eq!(probe(&target, GENEROUS).await, pass("HTTP 302"));
    server.set(HttpMode::Status(503));
    assert_eq!(probe(&target, GENEROUS).await, fail("HTTP 503"));
    server.set(HttpMode::Status(404));
    assert_eq!(probe(&target, GENEROUS).await, fail("HTTP 404"));

    // The body is never waited for: a response whose body never ends is still a pass, well
    // within a timeout that a probe waiting for the body would hit.
    server.set(HttpMode::StatusThenHang(200));
    assert_eq!(probe(&target, GENEROUS).await, pass("HTTP 200"));

    server.set(HttpMode::Close);
    assert_eq!(
        probe(&target, GENEROUS).await,
        fail("http: connection closed without a response")
    );
    server.set(HttpMode::Garbage);
    assert_eq!(
        probe(&target, GENEROUS).await,
        fail("http: not an HTTP response: \"SSH-2.0-OpenSSH_9.6\"")
    );
    server.set(HttpMode::Hang);
    assert_eq!(probe(&target, SHORT).await, fail("timed out after 200ms"));

    server.stop().await;
    assert_eq!(
        probe(&target, GENEROUS).await,
        fail(&format!("connect {addr}: connection refused"))
    );
}

#[tokio::test]
async fn tcp_probe() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let target = Target::Tcp { addr };
    assert_eq!(
        probe(&target, GENEROUS).await,
        pass(&format!("connected to {addr}"))
    );
    drop(listener);
    assert_eq!(
        probe(&target, GENEROUS).await,
        fail(&format!("connect {addr}: connection refused"))
    );
}

#[tokio::test]
async fn grpc_probe() {
    let server = GrpcServer::start("corral.Test").await;
    let addr = server.addr;
    let named = Target::Grpc {
        addr,
        service: "corral.Test".into(),
    };
    let whole = resolve(
        &Probe::Grpc("127.0.0.1:{port.grpc}".into()),
        &BTreeMap::from([("grpc".to_string(), addr.port())]),
    )
    .expect("a valid grpc probe");
    let other = Target::Grpc {
        addr,
        service: "corral.Other".into(),
    };

    assert_eq!(probe(&named, GENEROUS).await, pass("grpc: SERVING"));
    assert_eq!(probe(&whole, GENEROUS).await, pass("grpc: SERVING"));
    assert_eq!(
        probe(&other, GENEROUS).await,
        fail("grpc: NOT_FOUND: service not registered")
    );

    server
        .reporter
        .set_service_status("corral.Test", Reported::NotServing)
        .await;
    assert_eq!(probe(&named, GENEROUS).await, fail("grpc: NOT_SERVING"));
    assert_eq!(probe(&whole, GENEROUS).await, pass("grpc: SERVING"));
    server
        .reporter
        .set_service_status("corral.Test", Reported::Unknown)
        .await;
    assert_eq!(probe(&named, GENEROUS).await, fail("grpc: UNKNOWN"));
    server
        .reporter
        .set_service_status("corral.Test", Reported::Serving)
        .await;
    assert_eq!(probe(&named, GENEROUS).await, pass("grpc: SERVING"));

    server.stop().await;
    assert_eq!(
        probe(&named, GENEROUS).await,
        fail(&format!("connect {addr}: connection refused"))
    );
}

#[tokio::test]
async fn grpc_probe_of_a_server_that_never_answers_times_out() {
    let server = HttpServer::start(HttpMode::Hang).await;
    let target = Target::Grpc {
        addr: server.addr,
        service: String::new(),
    };
    assert_eq!(probe(&target, SHORT).await, fail("timed out after 200ms"));
}

#[tokio::test]
async fn grpc_probe_of_a_plain_http_server_fails() {
    let server = HttpServer::start(HttpMode::Status(200)).await;
    let target = Target::Grpc {
        addr: server.addr,
        service: String::new(),
    };
    let (healthy, reason) = probe(&target, GENEROUS).await;
    assert!(!healthy);
    assert!(
        reason.starts_with("grpc: ") || reason.starts_with("connect "),
        "{reason}"
    );
}

#[tokio::test]
async fn exec_probe() {
    assert_eq!(probe(&argv(&["true"]), GENEROUS).await, pass("exit 0"));
    assert_eq!(probe(&argv(&["false"]), GENEROUS).await, fail("exit 1"));
    assert_eq!(
        probe(&argv(&["sh", "-c", "echo boom; exit 3"]), GENEROUS).await,
        fail("exit 3: boom")
    );
    assert_eq!(
        probe(
            &argv(&["sh", "-c", "echo checking; echo 'db down' >&2; exit 2"]),
            GENEROUS
        )
        .await,
        fail("exit 2: checking | db down")
    );
    assert_eq!(
        probe(&argv(&["sh", "-c", "kill -9 $$"]), GENEROUS).await,
        fail("killed by signal 9 (SIGKILL)")
    );
    assert_eq!(
        probe(&argv(&["/nonexistent/check"]), GENEROUS).await,
        fail("exec /nonexistent/check: no such file or directory")
    );
}

#[tokio::test]
async fn exec_probe_is_cut_at_the_timeout_and_killed() {
    let exec = HostExec::default();
    let marker = "60.4242";
    let outcome = check(&argv(&["sleep", marker]), SHORT, &exec).await;
    assert_eq!(
        (outcome.healthy, outcome.reason.as_str()),
        (false, "timed out after 200ms")
    );
    let pid = exec.spawned.lock().expect("not poisoned")[0];
    // Killed and reaped: its /proc entry is gone (or now belongs to another process).
    let gone = eventually(|| match process(pid) {
        None => true,
        Some((_, argv)) => !argv.iter().any(|a| a == marker),
    })
    .await;
    assert!(gone, "sleep {marker} (pid {pid}) outlived its probe");
}

#[tokio::test]
async fn exec_probe_timeout_kills_what_the_command_started() {
    let exec = HostExec::default();
    let marker = "61.4242";
    let script = format!("sleep {marker}; true");
    let outcome = check(&argv(&["sh", "-c", &script]), SHORT, &exec).await;
    assert_eq!(outcome.reason, "timed out after 200ms");
    assert!(
        eventually(|| live_processes_with_arg(marker).is_empty()).await,
        "sleep {marker} outlived its probe: {:?}",
        live_processes_with_arg(marker)
    );
}

#[test]
fn status_lines() {
    let cases: &[(&[u8], Option<u16>)] = &[
        (b"HTTP/1.1 200 OK\r", Some(200)),
        (b"HTTP/1.0 503 Service Unavailable", Some(503)),
        (b"HTTP/1.1 204", Some(204)),
        (b"HTTP/2 301 \r", Some(301)),
        (b"HTTP/1.1 2000 OK", None),
        (b"HTTP/1.1 20 OK", None),
        (b"HTTP/1.1 abc OK", None),
        (b"HTTP/x 200 OK", None),
        (b"HTTP/ 200 OK", None),
        (b"SSH-2.0-OpenSSH", None),
        (b"", None),
    ];
    for (line, want) in cases {
        assert_eq!(
            parse_status_line(line),
            *want,
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn http_verdicts() {
    let cases: &[(&[u8], bool, &str)] = &[
        (b"HTTP/1.1 100 Continue", false, "HTTP 100"),
        (b"HTTP/1.1 199 X", false, "HTTP 199"),
        (b"HTTP/1.1 200 OK", true, "HTTP 200"),
        (b"HTTP/1.1 299 X", true, "HTTP 299"),
        (b"HTTP/1.1 308 X", true, "HTTP 308"),
        (b"HTTP/1.1 399 X", true, "HTTP 399"),
        (b"HTTP/1.1 400 X", false, "HTTP 400"),
        (b"HTTP/1.1 500 X", false, "HTTP 500"),
        (b"hello\r", false, "http: not an HTTP response: \"hello\""),
    ];
    for (line, healthy, reason) in cases {
        let v = http_verdict(line);
        assert_eq!((v.healthy, v.reason.as_str()), (*healthy, *reason));
    }
}

#[test]
fn exec_verdicts() {
    let r = |code: Option<i32>, signal: Option<i32>, out: &str| ExecResult {
        code,
        signal,
        output_tail: out.to_string(),
    };
    let cases = [
        (r(Some(0), None, ""), true, "exit 0"),
        (r(Some(0), None, "all good"), true, "exit 0"),
        (r(Some(1), None, ""), false, "exit 1"),
        (r(Some(3), None, "boom"), false, "exit 3: boom"),
        (
            r(None, Some(15), ""),
            false,
            "killed by signal 15 (SIGTERM)",
        ),
        (
            r(None, Some(9), "oops"),
            false,
            "killed by signal 9 (SIGKILL): oops",
        ),
        (r(None, Some(99), ""), false, "killed by signal 99"),
        (r(None, None, ""), false, "ended without an exit status"),
    ];
    for (result, healthy, reason) in cases {
        let v = exec_verdict(&result);
        assert_eq!(
            (v.healthy, v.reason.as_str()),
            (healthy, reason),
            "{result:?}"
        );
    }
}

#[test]
fn output_tails() {
    assert_eq!(output_tail(b""), "");
    assert_eq!(output_tail(b"\n\n  \n"), "");
    assert_eq!(output_tail(b"boom\n"), "boom");
    assert_eq!(output_tail(b"a\n\n b \r\nc\td\n"), "a | b | c d");
    assert_eq!(output_tail(b"bad \xff byte"), "bad \u{fffd} byte");

    let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
    let tail = output_tail(long.as_bytes());
    assert!(tail.len() <= MAX_OUTPUT_TAIL, "{}", tail.len());
    assert!(tail.starts_with('…'), "{tail}");
    assert!(tail.ends_with("line 98 | line 99"), "{tail}");

    // Cut at a character boundary.
    let wide = "é".repeat(300);
    let tail = output_tail(wide.as_bytes());
    assert!(tail.len() <= MAX_OUTPUT_TAIL);
    assert!(tail.trim_start_matches('…').chars().all(|c| c == 'é'));
}

#[test]
fn io_reasons() {
    let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
    assert_eq!(io_reason(&refused), "connection refused");
    let custom = io::Error::other("Broken thing");
    assert_eq!(io_reason(&custom), "broken thing");
    assert_eq!(lowercase_first("HTTP thing"), "HTTP thing");
    assert_eq!(lowercase_first(""), "");
}

#[tokio::test]
async fn outcome_display() {
    let o = Outcome {
        healthy: false,
        reason: "HTTP 503".into(),
        elapsed: Duration::from_micros(12_345),
    };
    assert_eq!(o.to_string(), "unhealthy: HTTP 503 (12ms)");
}
