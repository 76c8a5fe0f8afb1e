//! Agent-owned listening sockets: handed to every instance through LISTEN_FDS, one socket for
//! all of them, kept across an agent restart (taken back from the instances, never bound
//! twice), and usable from an instance in a private network namespace.

use std::io::{Read, Write};
use std::time::Duration;

use corral_e2e::{Agent, eventually, free_port, skip_unless_root, testbin};

fn spec(name: &str, replicas: u32, port: u16, extra: &str) -> String {
    format!(
        "name = \"{name}\"\ncommand = [{:?}, \"http-listen\"]\nreplicas = {replicas}\nenv = {{ VERSION = \"v1\" }}\n{extra}\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n",
        testbin()
    )
}

/// One HTTP request; the body.
fn get(port: u16) -> std::io::Result<String> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Inodes of listening TCP sockets on 127.0.0.1:port, from /proc/net/tcp.
fn listen_inodes(port: u16) -> Vec<u64> {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// Socket inodes among a process's fds.
fn socket_inodes(pid: i32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    t.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_socket_for_all_instances_kept_across_an_agent_restart() {
    if skip_unless_root("one_socket_for_all_instances_kept_across_an_agent_restart") {
        return;
    }
    let port = free_port();
    let mut agent = Agent::start().await;
    agent
        .apply(&spec("sock", 3, port, ""))
        .await
        .expect("apply");
    let instances = agent.wait_running("sock", 3).await;
    for i in &instances {
        assert_eq!(agent.reported(&i.id, "serving").await, "1");
        assert_eq!(agent.reported(&i.id, "listen_fds").await, "1");
        assert_eq!(
            agent.reported(&i.id, "listen_pid_ok").await,
            "1",
            "LISTEN_PID is the service's own pid"
        );
        assert_eq!(agent.reported(&i.id, "listen_fdnames").await, "http");
    }
    let body = get(port).expect("request");
    assert!(body.starts_with("sock-") && body.ends_with("v1"), "{body}");
    let inodes = listen_inodes(port);
    assert_eq!(
        inodes.len(),
        1,
        "one listening socket for all instances: {inodes:?}"
    );
    let inode = inodes[0];
    assert!(
        socket_inodes(agent.pid().expect("pid")).contains(&inode),
        "the agent holds it"
    );
    for i in &instances {
        assert!(
            socket_inodes(i.pid).contains(&inode),
            "{} holds the same socket",
            i.id
        );
    }

    agent.stop_with(libc::SIGKILL);
    assert!(get(port).is_ok(), "served while the agent is down");
    agent.launch().await;
    agent.wait_running("sock", 3).await;
    assert_eq!(
        listen_inodes(port),
        vec![inode],
        "still exactly the same socket, none bound beside it"
    );
    assert!(
        socket_inodes(agent.pid().expect("pid")).contains(&inode),
        "the new agent took it back"
    );
    assert!(agent.log_text().contains("took the listening socket back"));

    // A new instance (scale up) gets the same socket too.
    agent
        .client()
        .await
        .scale(corral_e2e::pb::ScaleRequest {
            name: "sock".into(),
            replicas: 4,
            ..Default::default()
        })
        .await
        .expect("scale");
    let all = agent.wait_running("sock", 4).await;
    let newest = all.iter().find(|i| i.index == 3).expect("sock-3");
    eventually(
        "sock-3 holds the socket",
        Duration::from_secs(10),
        || async { socket_inodes(newest.pid).contains(&inode).then_some(()) },
    )
    .await;
    // Delete closes it.
    agent.delete("sock").await.expect("delete");
    // The instances hold it until they are gone.
    eventually(
        "nothing listens once the service is gone",
        Duration::from_secs(20),
        || async { listen_inodes(port).is_empty().then_some(()) },
    )
    .await;
    eventually("the service is gone", Duration::from_secs(20), || async {
        agent.get("sock").await.is_err().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_network_instance_serves_through_its_inherited_socket() {
    if skip_unless_root("a_private_network_instance_serves_through_its_inherited_socket") {
        return;
    }
    let port = free_port();
    let agent = Agent::start().await;
    agent
        .apply(&spec(
            "priv",
            1,
            port,
            "[isolation]\nnamespaces = [\"pid\", \"mount\", \"uts\", \"ipc\", \"net\"]\n",
        ))
        .await
        .expect("apply");
    let i = agent.wait_running("priv", 1).await.remove(0);
    agent.reported(&i.id, "serving").await;
    assert_eq!(get(port).expect("request"), "priv-0 v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_refuses_the_apply() {
    if skip_unless_root("an_address_in_use_refuses_the_apply") {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let agent = Agent::start().await;
    let e = agent
        .apply(&spec("busy", 1, port, ""))
        .await
        .expect_err("address in use");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("sockets[0].listen"), "{}", e.message());
    assert!(agent.get("busy").await.is_err(), "nothing applied");
}
