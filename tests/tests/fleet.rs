//! The fleet on a real etcd: agents started with `--etcd` register their node, run what etcd
//! says for them, report each service's status back, and keep everything running when etcd
//! is gone.

use std::time::Duration;

use corral_e2e::etcd::{Etcd, skip_unless_etcd};
use corral_e2e::{Agent, eventually, pb, skip_unless_root, testbin};

fn spec(name: &str, replicas: u32, args: &[&str]) -> String {
    let cmd: Vec<String> = std::iter::once(testbin())
        .chain(args.iter().map(|s| s.to_string()))
        .map(|s| format!("{s:?}"))
        .collect();
    format!(
        "name = \"{name}\"\ncommand = [{}]\nreplicas = {replicas}\n[stop]\ngrace = \"2s\"\n",
        cmd.join(", ")
    )
}

fn skip(test: &str) -> bool {
    skip_unless_root(test) || skip_unless_etcd(test)
}

/// An agent of node `node` joined to `etcd`.
async fn fleet_agent(etcd: &Etcd, node: &str, labels: &str) -> Agent {
    let endpoints = etcd.endpoints();
    Agent::start_full_args(
        "info,corral_agent=debug",
        &[
            "--etcd",
            &endpoints,
            "--node",
            node,
            "--node-labels",
            labels,
            "--etcd-lease-ttl",
            "4",
        ],
    )
    .await
}

fn key(node: &str, kind: &str, name: &str) -> String {
    format!("/corral/v1/nodes/{node}/{kind}/{name}")
}

/// The status key of `name` once it reports the spec written at `revision` applied with
/// `replicas` running and healthy.
async fn converged(
    etcd: &Etcd,
    node: &str,
    name: &str,
    revision: i64,
    replicas: u64,
) -> serde_json::Value {
    let status_key = key(node, "status", name);
    eventually(
        &format!("{status_key} to report revision {revision} with {replicas} healthy"),
        Duration::from_secs(30),
        || async {
            let s = etcd.get_json(&status_key)?;
            (s["spec_revision"] == revision
                && s["state"] == "applied"
                && s["desired"] == replicas
                && s["running"] == replicas
                && s["healthy"] == replicas)
                .then_some(s)
        },
    )
    .await
}

async fn node_fleet(agent: &Agent) -> pb::FleetLink {
    agent
        .client()
        .await
        .node(pb::NodeRequest {})
        .await
        .expect("node")
        .into_inner()
        .fleet
        .expect("the node reports its fleet link")
}

/// One agent registers its node under a lease, runs the spec an operator wrote into etcd,
/// reports its status there, owns it (the local API refuses to change it unforced), and
/// removes it when the key is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_and_runs_a_spec_from_etcd() {
    if skip("an_agent_registers_and_runs_a_spec_from_etcd") {
        return;
    }
    let etcd = Etcd::start();
    let agent = fleet_agent(&etcd, "n1", "zone=a,disk=ssd").await;

    // Registered: the node's record, under a lease.
    let info = eventually("n1 registered", Duration::from_secs(20), || async {
        etcd.get_json("/corral/v1/nodes/n1/info")
    })
    .await;
    assert_eq!(info["node"], "n1");
    assert_eq!(info["labels"]["zone"], "a");
    assert_eq!(info["labels"]["disk"], "ssd");
    assert!(
        info["capacity"]["cpu"].as_f64().unwrap_or(0.0) >= 1.0,
        "{info}"
    );
    assert!(
        info["capacity"]["memory"].as_u64().unwrap_or(0) > 0,
        "{info}"
    );
    let lease = etcd.ctl(&["get", "/corral/v1/nodes/n1/info", "-w", "json"]);
    let lease: serde_json::Value = serde_json::from_slice(&lease.stdout).expect("json");
    assert!(
        lease["kvs"][0]["lease"].as_i64().unwrap_or(0) != 0,
        "the info key is under a lease: {lease}"
    );
    let link = node_fleet(&agent).await;
    assert_eq!(link.node, "n1");
    assert!(link.connected, "{link:?}");

    // An operator writes a spec for the node: it runs, and its status converges.
    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 2, &["serve"]).as_bytes(),
    );
    let running = agent.wait_running("web", 2).await;
    for i in &running {
        assert!(corral_e2e::alive(i.pid), "{} runs", i.id);
    }
    let status = converged(&etcd, "n1", "web", rev, 2).await;
    assert_eq!(status["service"], "web");
    assert_eq!(status["revision"], 1);
    let web = agent.get("web").await.expect("get");
    assert_eq!(web.owner, pb::ServiceOwner::Etcd as i32);
    let ls = agent.cli(&["ls"]);
    let ls_text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls_text
            .lines()
            .any(|l| l.starts_with("web") && l.contains("etcd")),
        "corral ls shows the source:\n{ls_text}"
    );

    // The local API refuses to change what the fleet owns, and says why.
    let refused = agent
        .apply(&spec("web", 3, &["serve"]))
        .await
        .expect_err("a local apply of the fleet's service");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("owned by the fleet"),
        "{}",
        refused.message()
    );
    let out = agent.cli(&["scale", "web", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(agent.get("web").await.expect("get").desired, 2);

    // A spec update in etcd is rolled out; a deleted key removes the service and its status.
    let rev2 = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 3, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "web", rev2, 3).await;
    etcd.del(&key("n1", "services", "web"));
    eventually("web removed", Duration::from_secs(30), || async {
        agent.get("web").await.err().map(|_| ())
    })
    .await;
    for i in &running {
        eventually(
            &format!("{} ended", i.id),
            Duration::from_secs(10),
            || async { (!corral_e2e::alive(i.pid)).then_some(()) },
        )
        .await;
    }
    eventually(
        "web's status key removed",
        Duration::from_secs(10),
        || async {
            etcd.get_json(&key("n1", "status", "web"))
                .is_none()
                .then_some(())
        },
    )
    .await;
}
