//! Sustained API load over mutual TLS while rollouts run: 32 clients (half `admin`, half
//! `read`) making mixed calls, each on its own connection. No call may fail other than in
//! the ways it is allowed to (a restart while a rollout runs, a `read` client changing
//! something), and the agent's memory does not grow from one round of load to the next.

use std::time::Duration;

use corral_e2e::apiload::{self, Client, Until};
use corral_e2e::pki::{self, Ca};
use corral_e2e::{Agent, pb, skip_unless_root, testbin};

const CLIENTS: usize = 32;

fn spec(port: u16) -> String {
    format!(
        r#"name = "web"
command = [{bin:?}, "http-listen", "50"]
replicas = 2
[ports]
admin = "auto"
[[sockets]]
name = "http"
listen = "127.0.0.1:{port}"
[health]
http = "http://127.0.0.1:{{port.admin}}/healthz"
interval = "500ms"
timeout = "500ms"
start_period = "10s"
[rollout]
min_healthy = "300ms"
healthy_deadline = "30s"
"#,
        bin = testbin()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_calls_from_32_mtls_clients_during_rollouts() {
    if skip_unless_root("mixed_calls_from_32_mtls_clients_during_rollouts") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "corral-test");
    let server = ca.server("server");
    let admin = ca.client("admin", "scheduler", Some("admin"));
    let read = ca.client("read", "dashboard", Some("read"));
    let port = corral_e2e::free_port();
    let agent = Agent::start_tls("info", port, &server, &ca.cert).await;
    let web = corral_e2e::free_port();
    let spec = spec(web);
    agent.apply(&spec).await.expect("apply");
    corral_e2e::eventually("2 healthy instances", Duration::from_secs(30), || async {
        let s = agent.get("web").await.ok()?;
        (s.healthy == 2).then_some(())
    })
    .await;
    let pid = agent.pid().expect("pid");

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let is_admin = i % 2 == 0;
        let id = if is_admin { &admin } else { &read };
        let channel = pki::channel(port, &ca.cert, Some(id))
            .await
            .expect("connect");
        clients.push(Client {
            api: pb::agent_client::AgentClient::new(channel),
            admin: is_admin,
        });
    }

    let mut rss = Vec::new();
    let mut restarts = 0;
    let mut total = 0;
    for round in 0..3 {
        let secs = if round == 0 { 4 } else { 8 };
        let out = apiload::run(
            clients.clone(),
            "web",
            &spec,
            Until::Elapsed(Duration::from_secs(secs)),
        )
        .await;
        // Measured in the same state each round: the last rollout over, both instances
        // healthy.
        corral_e2e::eventually("the service to settle", Duration::from_secs(60), || async {
            let s = agent.get("web").await.ok()?;
            let rolling = s
                .rollout
                .is_some_and(|r| r.state() == pb::RolloutState::Running);
            (!rolling && s.healthy == 2).then_some(())
        })
        .await;
        let kib = corral_e2e::rss_kib(pid);
        eprintln!(
            "round {round}: {} calls, refusals {:?}, agent RSS {kib} KiB, mean times {:?}",
            out.total(),
            out.refusals,
            out.mean_times()
        );
        assert!(
            out.unexpected.is_empty(),
            "round {round}: {} unexpected outcomes, e.g. {:?}",
            out.unexpected.len(),
            &out.unexpected[..out.unexpected.len().min(10)]
        );
        restarts += out.calls.get("Restart").copied().unwrap_or(0)
            - out
                .refusals
                .iter()
                .filter(|(k, _)| k.starts_with("Restart"))
                .map(|(_, v)| v)
                .sum::<u64>();
        total += out.total();
        rss.push(kib);
    }
    assert!(total > 1000, "the load ran: {total} calls");
    assert!(restarts > 0, "rollouts ran during the load");
    // The first round warms up; the next two must not grow the agent.
    let growth = rss[2].saturating_sub(rss[1]);
    assert!(
        growth <= 2048,
        "agent RSS grew by {growth} KiB between equal rounds: {rss:?}"
    );
    // The service is whole at the end.
    let s = agent.get("web").await.expect("get");
    assert_eq!(s.desired, 2);
    assert!(
        s.instances.iter().all(|i| i.restarts == 0),
        "no instance crashed: {:?}",
        s.instances
    );
}
