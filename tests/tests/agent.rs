//! The agent process itself: standard gRPC health, a second agent on the same socket or state
//! directory, flags.

use std::process::{Command, Stdio};

use corral_e2e::{Agent, bin, skip_unless_root};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_grpc_health() {
    if skip_unless_root("serves_grpc_health") {
        return;
    }
    let agent = Agent::start().await;
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", agent.socket.display()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut h = HealthClient::new(ch);
    for service in ["", "corral.v1.Agent"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mode = std::fs::metadata(&agent.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o660), "socket mode");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_is_refused() {
    if skip_unless_root("a_second_agent_is_refused") {
        return;
    }
    let agent = Agent::start().await;
    let other = tempfile::tempdir().expect("tempdir");
    // Same state directory, other socket: the state lock refuses it.
    let out = Command::new(bin("corrald"))
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .arg("--socket")
        .arg(other.path().join("s.sock"))
        .arg("--cgroup-parent")
        .arg(agent.cgroup.flag())
        .stdin(Stdio::null())
        .output()
        .expect("run corrald");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another corrald"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Other state directory, same socket: the live socket is not taken over.
    let other_cg = corral_e2e::TestCgroup::new(&format!("{}-other", agent.cgroup.name));
    let out = Command::new(bin("corrald"))
        .arg("--state-dir")
        .arg(other.path().join("state"))
        .arg("--socket")
        .arg(&agent.socket)
        .arg("--cgroup-parent")
        .arg(other_cg.flag())
        .stdin(Stdio::null())
        .output()
        .expect("run corrald");
    other_cg.destroy();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first agent still serves.
    agent
        .client()
        .await
        .list(corral_e2e::pb::ListRequest::default())
        .await
        .expect("still serving");
}

#[test]
fn bad_flags_exit_2() {
    let out = Command::new(bin("corrald"))
        .arg("--log-format")
        .arg("xml")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("corrald"))
        .arg("--config")
        .arg("/nonexistent/corrald.toml")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}

/// `--socket` directly in a directory instances need (`/tmp` here) is refused before anything
/// is bound: the agent exits 1, names the flag, and leaves no socket file behind.
#[test]
fn a_socket_in_a_shared_directory_is_refused_and_left_unbound() {
    if skip_unless_root("a_socket_in_a_shared_directory_is_refused_and_left_unbound") {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let socket = std::path::PathBuf::from(format!("/tmp/corral-e2e-{}.sock", std::process::id()));
    let cgroup = corral_e2e::TestCgroup::new(&format!("refused-socket-{}", std::process::id()));
    let out = Command::new(bin("corrald"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--socket")
        .arg(&socket)
        .arg("--cgroup-parent")
        .arg(cgroup.flag())
        .stdin(Stdio::null())
        .output()
        .expect("run corrald");
    cgroup.destroy();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--socket {}: put the socket in a directory of its own",
            socket.display()
        )),
        "{stderr}"
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "{} was left behind",
        socket.display()
    );
}
