//! The API over TCP with mutual TLS: who gets in (a certificate from the client CA), who is
//! refused at the handshake (no certificate, self-signed, another CA, expired), what each
//! role may call, flags that would open the door wider refused at start, certificates
//! rotated on SIGHUP, and the Unix socket closed to users outside root and its group.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use corral_e2e::pki::{self, Ca, Pem};
use corral_e2e::{Agent, bin, eventually, free_port, pb, skip_unless_root, testbin};
use pb::agent_client::AgentClient;
use tonic::transport::Channel;

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A client of the TLS listener at `localhost:port` trusting `ca`, with `identity`.
async fn tls_client(
    port: u16,
    ca: &Path,
    identity: Option<&Pem>,
) -> Result<AgentClient<Channel>, String> {
    pki::channel(port, ca, identity).await.map(AgentClient::new)
}

/// List through a fresh connection: the outcome, or the error as text.
async fn list(
    port: u16,
    ca: &Path,
    identity: Option<&Pem>,
) -> Result<usize, (tonic::Code, String)> {
    let mut c = tls_client(port, ca, identity)
        .await
        .map_err(|e| (tonic::Code::Unavailable, e))?;
    c.list(pb::ListRequest::default())
        .await
        .map(|r| r.into_inner().services.len())
        .map_err(|s| (s.code(), format!("{s:?}")))
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: Ca,
    server: Pem,
    admin: Pem,
    read: Pem,
    nobody: Pem,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "corral-test");
    Pki {
        server: ca.server("server"),
        admin: ca.client("admin", "scheduler", Some("admin")),
        read: ca.client("read", "dashboard", Some("read")),
        nobody: ca.client("nobody", "stranger", Some("sales")),
        ca,
        _dir: dir,
    }
}

async fn tls_agent(pki: &Pki, port: u16) -> Agent {
    Agent::start_tls("info,corral_agent=debug", port, &pki.server, &pki.ca.cert).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_from_the_client_ca_get_in() {
    if skip_unless_root("only_certificates_from_the_client_ca_get_in") {
        return;
    }
    let p = pki();
    let port = free_port();
    let agent = tls_agent(&p, port).await;
    let ca = &p.ca.cert;

    assert_eq!(list(port, ca, Some(&p.admin)).await, Ok(0));
    assert_eq!(list(port, ca, Some(&p.read)).await, Ok(0));
    drop(agent);

    let other = Ca::new(p._dir.path(), "other");
    let refused = [
        ("no certificate", None, "no certificates"),
        (
            "self-signed",
            Some(pki::self_signed_client(
                p._dir.path(),
                "selfsigned",
                "me",
                "admin",
            )),
            "UnknownIssuer",
        ),
        (
            "another CA",
            Some(other.client("other-admin", "intruder", Some("admin"))),
            "UnknownIssuer",
        ),
        (
            "expired",
            Some(p.ca.expired_client("expired", "old-scheduler", "admin")),
            "certificate expired",
        ),
        (
            "no clientAuth extended key usage",
            Some(p.ca.client_without_eku("no-eku", "anything", "admin")),
            "must say clientAuth",
        ),
    ];
    for (what, identity, reason) in &refused {
        // A fresh agent for each: refusals are logged at most 20 per 10 s, and a client
        // retries its connection several times.
        let port = free_port();
        let agent = tls_agent(&p, port).await;
        let r = list(port, ca, identity.as_ref()).await;
        let (code, text) = r.expect_err(what);
        assert_ne!(
            code,
            tonic::Code::PermissionDenied,
            "{what}: refused at the handshake, not by role"
        );
        eprintln!("{what}: {code:?} {text}");
        eventually(
            &format!("the agent logs why it refused {what}"),
            Duration::from_secs(5),
            || async {
                let log = agent.log_text();
                let refusals: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("TLS handshake refused"))
                    .collect();
                refusals.iter().any(|l| l.contains(reason)).then_some(())
            },
        )
        .await;
        // Nothing of theirs got through.
        assert!(!agent.log_text().contains("API connection"), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_a_client_may_call() {
    if skip_unless_root("roles_decide_what_a_client_may_call") {
        return;
    }
    let p = pki();
    let port = free_port();
    let agent = tls_agent(&p, port).await;
    let ca = &p.ca.cert;
    let spec = format!(
        "name = \"svc\"\ncommand = [{:?}, \"serve\"]\nreplicas = 1\n",
        testbin()
    );

    let mut admin = tls_client(port, ca, Some(&p.admin)).await.expect("admin");
    admin
        .apply(pb::ApplyRequest {
            source: Some(pb::apply_request::Source::SpecToml(spec.clone())),
            dry_run: false,
            force: false,
            ..Default::default()
        })
        .await
        .expect("admin may apply");
    agent.wait_running("svc", 1).await;
    let instance = agent.get("svc").await.expect("get").instances[0].id.clone();

    let mut read = tls_client(port, ca, Some(&p.read)).await.expect("read");
    // Everything that only looks is allowed.
    read.get(pb::GetRequest { name: "svc".into() })
        .await
        .expect("get");
    read.list(pb::ListRequest::default()).await.expect("list");
    read.node(pb::NodeRequest {}).await.expect("node");
    let mut events = read
        .watch(pb::WatchRequest {
            from_index: 0,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(events.message().await.expect("event").is_some());
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        pki::channel(port, ca, Some(&p.read)).await.expect("read"),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");

    // Everything that changes something is refused, and says why.
    let denied = |what: &str, r: Result<tonic::Code, tonic::Status>| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
        assert!(
            s.message().contains("needs role admin") && s.message().contains("OU=read"),
            "{what}: {}",
            s.message()
        );
    };
    denied(
        "apply",
        read.apply(pb::ApplyRequest {
            source: Some(pb::apply_request::Source::SpecToml(
                spec.replace("replicas = 1", "replicas = 3"),
            )),
            dry_run: false,
            force: false,
            ..Default::default()
        })
        .await
        .map(ok),
    );
    denied(
        "delete",
        read.delete(pb::DeleteRequest {
            name: "svc".into(),
            ..Default::default()
        })
        .await
        .map(ok),
    );
    denied(
        "scale",
        read.scale(pb::ScaleRequest {
            name: "svc".into(),
            replicas: 5,
            ..Default::default()
        })
        .await
        .map(ok),
    );
    denied(
        "restart",
        read.restart(pb::RestartRequest {
            name: "svc".into(),
            force: true,
            ..Default::default()
        })
        .await
        .map(ok),
    );
    denied(
        "rollback",
        read.rollback(pb::RollbackRequest {
            name: "svc".into(),
            revision: None,
            force: true,
            ..Default::default()
        })
        .await
        .map(ok),
    );
    denied(
        "signal",
        read.signal(pb::SignalRequest {
            instance: instance.clone(),
            signal: "SIGKILL".into(),
        })
        .await
        .map(ok),
    );
    // Nothing changed.
    let s = agent.get("svc").await.expect("get");
    assert_eq!((s.desired, s.revision, s.instances.len()), (1, 1, 1));
    assert_eq!(s.instances[0].id, instance);
    assert_eq!(s.instances[0].restarts, 0);

    // A certificate without a known OU gets nothing, not even reads.
    let mut nobody = tls_client(port, ca, Some(&p.nobody)).await.expect("nobody");
    let s = nobody
        .list(pb::ListRequest::default())
        .await
        .expect_err("no role");
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(
        s.message().contains("neither OU=read nor OU=admin"),
        "{}",
        s.message()
    );

    // Every change is logged with who made it; refusals too.
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("API call")
            && l.contains("CN=scheduler")
            && l.contains("Apply")
            && l.contains("target=\"svc\"")
            && l.contains("code=\"OK\"")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("API call refused")
            && l.contains("CN=dashboard")
            && l.contains("Signal")),
        "{log}"
    );
}

fn ok<T>(_: T) -> tonic::Code {
    tonic::Code::Ok
}

fn corrald(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(bin("corrald"))
        .args([
            "--state-dir",
            path(&dir.path().join("state")),
            "--socket",
            path(&dir.path().join("s.sock")),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run corrald")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_that_would_open_the_api_wider_are_refused_at_start() {
    if skip_unless_root("flags_that_would_open_the_api_wider_are_refused_at_start") {
        return;
    }
    let p = pki();
    let port = free_port().to_string();
    let (cert, key) = (path(&p.server.cert), path(&p.server.key));
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            "--tls-client-ca",
        ),
        (
            &[
                "--listen",
                &format!("[::]:{port}"),
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            "--tls-client-ca",
        ),
        (&["--listen", &format!("127.0.0.1:{port}")], "--tls-cert"),
        (
            &["--listen", &format!("127.0.0.1:{port}"), "--tls-cert", cert],
            "--tls-key",
        ),
        (&["--tls-cert", cert, "--tls-key", key], "--listen"),
        (
            &[
                "--listen",
                "somewhere",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ],
            "--listen",
        ),
        (
            &[
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--tls-cert",
                key,
                "--tls-key",
                key,
            ],
            "--tls-cert",
        ),
        (
            &[
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--tls-cert",
                cert,
                "--tls-key",
                cert,
            ],
            "--tls-key",
        ),
        (
            &[
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--tls-cert",
                cert,
                "--tls-key",
                path(&p.admin.key),
            ],
            "--tls-key",
        ),
        (
            &[
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--tls-client-ca",
                key,
            ],
            "--tls-client-ca",
        ),
    ];
    for (args, names) in cases {
        let out = corrald(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        eprintln!("{args:?}: {}", stderr.trim());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificates_without_a_restart() {
    if skip_unless_root("sighup_rotates_the_certificates_without_a_restart") {
        return;
    }
    let p = pki();
    let port = free_port();
    let agent = tls_agent(&p, port).await;
    let pid = agent.pid().expect("pid");
    let ca = &p.ca.cert;
    assert_eq!(list(port, ca, Some(&p.admin)).await, Ok(0));
    // An open connection survives the rotation.
    let mut open = tls_client(port, ca, Some(&p.admin)).await.expect("open");

    // A broken file on SIGHUP: the agent says so and keeps what it has.
    let good_key = std::fs::read(&p.server.key).expect("key");
    std::fs::write(&p.server.key, "garbage").expect("write");
    // SAFETY: signalling the agent we started, by PID.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    eventually(
        "the agent refuses the broken key",
        Duration::from_secs(10),
        || async {
            agent
                .log_text()
                .contains("keeping the TLS files in use")
                .then_some(())
        },
    )
    .await;
    assert_eq!(list(port, ca, Some(&p.admin)).await, Ok(0));

    // A new server certificate from a new CA, and a new client CA.
    let next = Ca::new(p._dir.path(), "next");
    let server = next.server("server2");
    std::fs::copy(&server.cert, &p.server.cert).expect("cert");
    std::fs::copy(&server.key, &p.server.key).expect("key");
    let client_ca = p.ca.cert.clone();
    let old_ca = p._dir.path().join("old-ca.pem");
    std::fs::copy(&client_ca, &old_ca).expect("old ca");
    std::fs::copy(&next.cert, &client_ca).expect("ca");
    let new_admin = next.client("admin2", "scheduler2", Some("admin"));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    eventually(
        "the new certificate serves",
        Duration::from_secs(10),
        || async { (list(port, &next.cert, Some(&new_admin)).await == Ok(0)).then_some(()) },
    )
    .await;
    // The old CA's clients are out now, and the old server certificate is gone.
    assert!(list(port, &old_ca, Some(&p.admin)).await.is_err());
    assert!(list(port, &next.cert, Some(&p.admin)).await.is_err());
    // The connection made before the rotation still works.
    open.list(pb::ListRequest::default())
        .await
        .expect("old connection");
    drop(good_key);
    assert_eq!(agent.pid(), Some(pid), "no restart");
}

/// `corral` as another user: uid and gid given.
fn cli_as(agent: &Agent, cli: &Path, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new(cli)
        .args(args)
        .env_clear()
        .env("CORRAL_ADDR", format!("unix://{}", agent.socket.display()))
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("run corral as another user")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_is_for_root_and_its_group_only() {
    if skip_unless_root("the_unix_socket_is_for_root_and_its_group_only") {
        return;
    }
    let agent = Agent::start().await;
    // Only the socket's own mode may keep others out: open the way to it.
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cli = agent.dir.join("corral");
    std::fs::copy(bin("corral"), &cli).expect("copy cli");
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mode = std::fs::metadata(&agent.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");

    let (nobody, nogroup) = (65534, 65534);
    let out = cli_as(&agent, &cli, nobody, nogroup, &["ls"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");

    // A member of the socket's group is admin.
    nix::unistd::chown(
        &agent.socket,
        None,
        Some(nix::unistd::Gid::from_raw(nogroup)),
    )
    .expect("chgrp");
    let out = cli_as(&agent, &cli, nobody, nogroup, &["ls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli_as(&agent, &cli, nobody, nogroup, &["scale", "nope", "1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "an admin call reached the supervisor: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("API call") && l.contains("uid 65534") && l.contains("Scale")),
        "the call is logged with its caller"
    );
}

/// `corral` against the TLS listener, with the TLS flags given as arguments.
fn cli_tls(addr: &str, ca: &Path, id: Option<&Pem>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(bin("corral"));
    cmd.args(["--addr", addr, "--tls-ca", path(ca)]);
    if let Some(id) = id {
        cmd.args(["--tls-cert", path(&id.cert), "--tls-key", path(&id.key)]);
    }
    let out = cmd
        .args(args)
        .env_remove("CORRAL_ADDR")
        .stdin(Stdio::null())
        .output()
        .expect("run corral");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_what_is_wrong_with_a_tls_connection() {
    if skip_unless_root("the_cli_says_what_is_wrong_with_a_tls_connection") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "corral-test");
    // Valid for "localhost" only.
    let server = ca.server_for("server", &["localhost"]);
    let admin = ca.client("admin", "operator", Some("admin"));
    let read = ca.client("read", "dashboard", Some("read"));
    let expired = ca.expired_client("expired", "old", "admin");
    let other = Ca::new(dir.path(), "other");
    let port = free_port();
    let _agent = Agent::start_tls("info", port, &server, &ca.cert).await;
    let good = format!("https://localhost:{port}");

    let (ok, text) = cli_tls(&good, &ca.cert, Some(&admin), &["ls"]);
    assert!(ok, "{text}");
    let (ok, text) = cli_tls(&good, &ca.cert, Some(&admin), &["node"]);
    assert!(ok && text.contains("cgroup"), "{text}");

    let cases: Vec<(&str, (bool, String), &[&str])> = vec![
        (
            "denied role",
            cli_tls(&good, &ca.cert, Some(&read), &["scale", "web", "2"]),
            &["permission denied", "admin", "OU=read"],
        ),
        (
            "unknown CA",
            cli_tls(&good, &other.cert, Some(&admin), &["ls"]),
            &["--tls-ca", "not signed"],
        ),
        (
            "wrong host name",
            cli_tls(
                &format!("https://127.0.0.1:{port}"),
                &ca.cert,
                Some(&admin),
                &["ls"],
            ),
            &["not valid for", "127.0.0.1", "localhost"],
        ),
        (
            "expired client certificate",
            cli_tls(&good, &ca.cert, Some(&expired), &["ls"]),
            &["--tls-cert", "expired"],
        ),
        (
            "no client certificate",
            cli_tls(&good, &ca.cert, None, &["ls"]),
            &["--tls-cert", "--tls-key"],
        ),
        (
            "client certificate from another CA",
            cli_tls(
                &good,
                &ca.cert,
                Some(&other.client("x", "x", Some("admin"))),
                &["ls"],
            ),
            &["refused", "client certificate"],
        ),
    ];
    for (what, (ok, text), says) in cases {
        eprintln!("{what}: {text}");
        assert!(!ok, "{what}: succeeded");
        for s in says {
            assert!(text.contains(s), "{what}: {s:?} not in {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_client_degrades_only_itself() {
    if skip_unless_root("a_greedy_client_degrades_only_itself") {
        return;
    }
    let p = pki();
    let port = free_port();
    let agent = tls_agent(&p, port).await;
    let ca = &p.ca.cert;
    let greedy = p.ca.client("greedy", "greedy", Some("admin"));

    // Thousands of Watch streams over a few connections: past the per-caller cap each one is
    // refused with RESOURCE_EXHAUSTED, and nothing else is.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let client = tls_client(port, ca, Some(&greedy)).await.expect("greedy");
        for _ in 0..125 {
            let mut c = client.clone();
            match c
                .watch(pb::WatchRequest {
                    from_index: 0,
                    follow: true,
                    ..Default::default()
                })
                .await
            {
                Ok(stream) => open.push(stream.into_inner()),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                    assert!(
                        s.message().contains("too many open streams"),
                        "{}",
                        s.message()
                    );
                    refused += 1;
                }
            }
        }
    }
    eprintln!("{} streams open, {refused} refused", open.len());
    assert_eq!(open.len(), 256, "the cap per caller");
    assert_eq!(refused, 1000 - 256);

    // Everyone else is served as usual, streams included.
    agent
        .apply("name = \"calm\"\ncommand = [\"/bin/true\"]\nreplicas = 0\n")
        .await
        .expect("apply through the Unix socket");
    let mut other = tls_client(port, ca, Some(&p.admin)).await.expect("admin");
    other.list(pb::ListRequest::default()).await.expect("list");
    let mut w = other
        .watch(pb::WatchRequest {
            from_index: 0,
            ..Default::default()
        })
        .await
        .expect("another caller's watch")
        .into_inner();
    assert!(w.message().await.expect("event").is_some());
    agent
        .client()
        .await
        .list(pb::ListRequest::default())
        .await
        .expect("the Unix socket");

    // Closing streams gives their places back.
    open.truncate(200);
    eventually("places given back", Duration::from_secs(10), || async {
        let mut c = tls_client(port, ca, Some(&greedy)).await.ok()?;
        c.watch(pb::WatchRequest {
            from_index: 0,
            follow: true,
            ..Default::default()
        })
        .await
        .ok()
        .map(|_| ())
    })
    .await;
    drop(open);

    // Huge specs: refused before they are decoded, or by the spec size limit; nothing applied.
    let mut admin = tls_client(port, ca, Some(&p.admin)).await.expect("admin");
    for size in [(1 << 20) + 1, 2 << 20, 16 << 20] {
        let toml = format!(
            "name = \"huge\"\ncommand = [\"/bin/true\"]\n# {}\n",
            "x".repeat(size)
        );
        let s = admin
            .apply(pb::ApplyRequest {
                source: Some(pb::apply_request::Source::SpecToml(toml)),
                dry_run: false,
                force: false,
                ..Default::default()
            })
            .await
            .expect_err("too big");
        assert!(
            matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
            ),
            "{size}: {s:?}"
        );
        eprintln!("{size} bytes: {:?} {}", s.code(), s.message());
    }
    assert_eq!(
        admin
            .list(pb::ListRequest::default())
            .await
            .expect("list")
            .into_inner()
            .services
            .len(),
        1,
        "only the calm one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_running_as_root_cannot_reach_the_agent_socket() {
    if skip_unless_root("an_instance_running_as_root_cannot_reach_the_agent_socket") {
        return;
    }
    let agent = Agent::start().await;
    let socket = path(&agent.socket).to_string();
    // Root in its own mount namespace (the default): the socket is covered.
    agent
        .apply(&format!(
            // The host's /tmp, where this agent's socket is.
            "name = \"inside\"\ncommand = [{:?}, \"connect-unix\", {socket:?}]\n[isolation]\nprivate_tmp = false\n",
            testbin()
        ))
        .await
        .expect("apply");
    agent.wait_running("inside", 1).await;
    let refused = agent.reported("inside-0", "connect").await;
    assert_ne!(refused, "ok", "a root instance reached the agent's socket");
    eprintln!("connect from inside: {refused}");
    // The host still reaches it.
    agent
        .client()
        .await
        .list(pb::ListRequest::default())
        .await
        .expect("list");
}

/// `n` connections from `from` to `127.0.0.1:port` that send nothing (non-blocking).
async fn idle_connections(from: &str, port: u16, n: usize) -> Vec<std::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{from}:0").parse().expect("address"))
            .expect("bind the client socket");
        let s = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        out.push(s.into_std().expect("std stream"));
    }
    out
}

/// How many of `conns` the agent has closed (a read sees the end or a reset).
fn closed(conns: &[std::net::TcpStream]) -> usize {
    use std::io::Read;
    conns
        .iter()
        .filter(|c| {
            let mut b = [0u8; 1];
            let mut c: &std::net::TcpStream = c;
            match c.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_handshake_slot() {
    if skip_unless_root("one_address_cannot_take_every_handshake_slot") {
        return;
    }
    let p = pki();
    let (port, metrics_port) = (free_port(), free_port());
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let (cert, key, ca) = (path(&p.server.cert), path(&p.server.key), path(&p.ca.cert));
    let (listen, metrics) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{metrics_port}"),
    );
    // With every handshake slot taken, the admin client would be served only once the idle
    // connections time out: it must be served while they still hold theirs.
    let _agent = Agent::start_full_args(
        "info,corral_agent=debug",
        &[
            "--listen",
            &listen,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--metrics",
            &metrics,
            "--first-byte-timeout",
            "20s",
        ],
    )
    .await;

    // 64 connections from 127.0.0.2 that send nothing, to each listener: as many as the
    // global handshake cap.
    let api_idle = idle_connections("127.0.0.2", port, 64).await;
    let metrics_idle = idle_connections("127.0.0.2", metrics_port, 64).await;

    // An admin client from 127.0.0.1 connects and calls as usual, and a scrape is answered.
    assert_eq!(list(port, &p.ca.cert, Some(&p.admin)).await, Ok(0));
    let mut scrape = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
        .await
        .expect("connect to the metrics endpoint");
    tokio::io::AsyncWriteExt::write_all(
        &mut scrape,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("request");
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_end(&mut scrape, &mut answer),
    )
    .await
    .expect("the scrape is answered")
    .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
    assert!(answer.contains("corral_build_info"), "{answer:.200}");

    // Past the per-address cap (8 by default) the connections were closed as they came;
    // the 8 holding a slot were still open when the others were served, and are closed
    // once the first-byte timeout is over.
    for (what, idle) in [("API", &api_idle), ("metrics", &metrics_idle)] {
        let now = closed(idle);
        eprintln!("{what}: {now} of 64 idle connections closed at once");
        assert_eq!(now, 64 - 8, "{what}");
    }
    eventually(
        "every idle connection closed",
        Duration::from_secs(60),
        || async { (closed(&api_idle) == 64 && closed(&metrics_idle) == 64).then_some(()) },
    )
    .await;
}
