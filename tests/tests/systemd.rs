//! corrald under systemd's eyes, without systemd: the real binary started with a
//! `NOTIFY_SOCKET` this test listens on and a watchdog period. READY=1 comes once the API
//! answers, WATCHDOG=1 pings follow, STOPPING=1 comes on SIGTERM, and no instance sees the
//! agent's notification variables. And the example TLS setup of `systemd/tls` makes
//! certificates that openssl and rustls both accept, with the role in the subject OU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_e2e::{TestCgroup, bin, connect, eventually, pb, skip_unless_root};
use tokio::net::UnixDatagram;

/// A corrald started by this test, killed and its cgroup removed when dropped.
struct Corrald {
    child: Option<Child>,
    cgroup: TestCgroup,
    log: PathBuf,
}

impl Corrald {
    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id().cast_signed())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Corrald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cgroup.destroy();
        if std::thread::panicking() {
            eprintln!("--- corrald log ---\n{}", self.log_text());
        }
    }
}

/// Datagrams received on the test's notify socket, one message each.
async fn next_message(socket: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(within, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(Err(e)) => panic!("receiving on the notify socket: {e}"),
        Err(_) => None,
    }
}

/// Waits for a message containing `line` (as a whole line); returns it and the ones before.
async fn wait_for(socket: &UnixDatagram, line: &str, corrald: &Corrald) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut before = Vec::new();
    while Instant::now() < deadline {
        if let Some(m) = next_message(socket, Duration::from_secs(1)).await {
            if m.lines().any(|l| l == line) {
                return (m, before);
            }
            before.push(m);
        }
    }
    panic!(
        "no {line} within 30 s; got {before:?}\n--- corrald log ---\n{}",
        corrald.log_text()
    );
}

/// The environment an instance printed (`/usr/bin/env` as its command), from its log.
async fn instance_env(state_dir: &Path, instance: &str) -> Vec<String> {
    let file = state_dir.join("logs").join(instance).join("stdout.log");
    eventually(
        &format!("{instance} to print its environment"),
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&file).ok()?;
            let lines: Vec<String> = text
                .lines()
                .map(|l| corral_e2e::payload(l).to_string())
                .collect();
            lines
                .iter()
                .any(|l| l.starts_with("CORRAL_INSTANCE="))
                .then_some(lines)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrald_speaks_sd_notify() {
    if skip_unless_root("corrald_speaks_sd_notify") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("corral-systemd-")
        .tempdir()
        .expect("tempdir");
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let state_dir = tmp.path().join("state");
    let api = tmp.path().join("corral.sock");
    let log = tmp.path().join("corrald.log");
    let out = std::fs::File::create(&log).expect("log file");
    let cgroup = TestCgroup::new(&format!("sd-{}", std::process::id()));
    let child = Command::new(bin("corrald"))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--socket")
        .arg(&api)
        .arg("--cgroup-parent")
        .arg(cgroup.flag())
        .env("RUST_LOG", "info,corral_agent=debug")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawn corrald");
    let mut corrald = Corrald {
        child: Some(child),
        cgroup,
        log,
    };

    // READY=1 is the first thing systemd hears, and when it does, the API answers.
    let (ready, before) = wait_for(&notify, "READY=1", &corrald).await;
    assert!(before.is_empty(), "before READY=1: {before:?}");
    let mut client = tokio::time::timeout(Duration::from_secs(5), connect(&api))
        .await
        .expect("connect in time")
        .expect("the API socket accepts once READY=1 was sent");
    let list = client
        .list(pb::ListRequest::default())
        .await
        .expect("the API answers once READY=1 was sent");
    assert!(list.into_inner().services.is_empty());
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=serving on ")),
        "{ready:?}"
    );
    assert!(
        ready
            .lines()
            .any(|l| l == format!("MAINPID={}", corrald.pid())),
        "{ready:?}"
    );

    // Then watchdog pings, several of them.
    let mut pings = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pings < 4 && Instant::now() < deadline {
        if let Some(m) = next_message(&notify, Duration::from_secs(1)).await {
            assert_eq!(m, "WATCHDOG=1", "only pings after READY=1");
            pings += 1;
        }
    }
    assert!(pings >= 4, "{pings} watchdog pings within 30 s");

    // Instances see neither the agent's NOTIFY_SOCKET nor its watchdog variables; one that
    // reports readiness itself gets a socket of its own.
    for (name, extra) in [("plain", ""), ("notifying", "[health]\nnotify = true\n")] {
        let spec = format!(
            "name = \"{name}\"\ncommand = [\"/usr/bin/env\"]\n[restart]\npolicy = \"never\"\n{extra}"
        );
        client
            .apply(pb::ApplyRequest {
                source: Some(pb::apply_request::Source::SpecToml(spec)),
                dry_run: false,
                force: false,
                ..Default::default()
            })
            .await
            .expect("apply");
    }
    let agent_socket = format!("NOTIFY_SOCKET={}", notify_path.display());
    let plain = instance_env(&state_dir, "plain-0").await;
    assert!(
        !plain.iter().any(|l| l.starts_with("NOTIFY_SOCKET=")),
        "{plain:?}"
    );
    let notifying = instance_env(&state_dir, "notifying-0").await;
    assert!(
        notifying
            .iter()
            .any(|l| l.starts_with("NOTIFY_SOCKET=") && *l != agent_socket),
        "{notifying:?}"
    );
    for env in [&plain, &notifying] {
        assert!(!env.contains(&agent_socket), "{env:?}");
        assert!(!env.iter().any(|l| l.starts_with("WATCHDOG_")), "{env:?}");
    }

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: signalling the child this test started, by its PID.
    unsafe { libc::kill(corrald.pid(), libc::SIGTERM) };
    wait_for(&notify, "STOPPING=1", &corrald).await;
    let status = corrald
        .child
        .take()
        .expect("running")
        .wait()
        .expect("wait corrald");
    assert!(status.success(), "corrald exited with {status}");
}

/// `openssl` on PATH, or why the test cannot run.
fn openssl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("openssl"))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_tls_setup_makes_certificates_rustls_accepts() {
    let Some(openssl) = openssl() else {
        eprintln!(
            "SKIP example_tls_setup_makes_certificates_rustls_accepts: openssl is not installed"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/tls/make-certs.sh");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run(Command::new(&script)
        .arg(d)
        .args(["node1.example.com", "localhost", "127.0.0.1", "::1"]));
    run(Command::new(&script).args([
        "--client".as_ref(),
        d.as_os_str(),
        "fleet".as_ref(),
        "admin".as_ref(),
    ]));
    // A role that does not exist is refused.
    let bad = Command::new(&script)
        .args([
            "--client".as_ref(),
            d.as_os_str(),
            "x".as_ref(),
            "root".as_ref(),
        ])
        .output()
        .expect("run make-certs.sh");
    assert_eq!(bad.status.code(), Some(2));

    // openssl: each certificate verifies against the CA for its purpose.
    let verify = |purpose: &str, file: &str| {
        let out = run(Command::new(&openssl)
            .current_dir(d)
            .args(["verify", "-CAfile", "ca.pem", "-purpose", purpose, file]));
        assert!(out.contains(&format!("{file}: OK")), "{out}");
    };
    verify("sslserver", "server.pem");
    for client in ["operator.pem", "scheduler.pem", "fleet.pem"] {
        verify("sslclient", client);
    }
    let subject = |file: &str| {
        run(Command::new(&openssl).current_dir(d).args([
            "x509", "-in", file, "-noout", "-subject", "-nameopt", "RFC2253",
        ]))
    };
    assert!(subject("operator.pem").contains("OU=admin"));
    assert!(subject("scheduler.pem").contains("OU=read"));
    assert!(subject("fleet.pem").contains("OU=admin"));
    let server = run(Command::new(&openssl).current_dir(d).args([
        "x509",
        "-in",
        "server.pem",
        "-noout",
        "-text",
    ]));
    for wanted in [
        "Version: 3",
        "DNS:node1.example.com",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "TLS Web Server Authentication",
    ] {
        assert!(server.contains(wanted), "{wanted} missing:\n{server}");
    }
    // Private keys: PKCS#8, the owner's only.
    for key in ["ca.key", "server.key", "operator.key", "scheduler.key"] {
        let text = std::fs::read_to_string(d.join(key)).expect("key");
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join(key))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key} is mode {mode:o}");
    }

    // rustls (through tonic, as corrald and the CLI use it): a mutual TLS connection with
    // each client certificate, to a server with the server certificate; none without one.
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};
    let pem = |f: &str| std::fs::read(d.join(f)).expect("read pem");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
    let port = incoming.local_addr().expect("local addr").port();
    let server = Server::builder()
        .tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(pem("server.pem"), pem("server.key")))
                .client_ca_root(Certificate::from_pem(pem("ca.pem"))),
        )
        .expect("server TLS config")
        .add_service(health)
        .serve_with_incoming(incoming);
    let server = tokio::spawn(server);
    let check = |client: Option<&str>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem("ca.pem")))
            .domain_name("localhost");
        if let Some(name) = client {
            tls = tls.identity(Identity::from_pem(
                pem(&format!("{name}.pem")),
                pem(&format!("{name}.key")),
            ));
        }
        async move {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
                    .expect("endpoint")
                    .tls_config(tls)
                    .expect("client TLS config")
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| format!("connect: {e:?}"))?;
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| format!("check: {e:?}"))
        }
    };
    for client in ["operator", "scheduler", "fleet"] {
        let status = check(Some(client)).await;
        assert_eq!(
            status,
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving as i32),
            "{client}"
        );
    }
    assert!(
        check(None).await.is_err(),
        "a client without a certificate is refused"
    );
    server.abort();
}
