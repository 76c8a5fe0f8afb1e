//! The fleet on a real etcd: agents started with `--etcd` register their node, run what etcd
//! says for them, report each service's status back, and keep everything running when etcd
//! is gone.

use std::time::Duration;

use corral_e2e::etcd::{Etcd, EtcdTls, skip_unless_etcd};
use corral_e2e::netns::{self, Net};
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

/// Init and service PIDs of `name`'s running instances, by instance id.
async fn pids(agent: &Agent, name: &str) -> Vec<(String, i32, u32)> {
    let mut v: Vec<(String, i32, u32)> = agent
        .get(name)
        .await
        .expect("get")
        .instances
        .into_iter()
        .map(|i| (i.id, i.pid, i.restarts))
        .collect();
    v.sort();
    v
}

/// etcd stopped for 30 s under a running node: not one instance restarts, the local API
/// serves reads and refuses writes to the fleet's services with the reason, `Node` says since
/// when the fleet is out of reach; when etcd is back the node resumes from its revision and
/// applies what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_gone_for_30s_nothing_restarts_and_the_node_resumes() {
    if skip("etcd_gone_for_30s_nothing_restarts_and_the_node_resumes") {
        return;
    }
    let mut etcd = Etcd::start();
    let agent = fleet_agent(&etcd, "n1", "zone=a").await;
    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 2, &["serve"]).as_bytes(),
    );
    agent.wait_running("web", 2).await;
    converged(&etcd, "n1", "web", rev, 2).await;
    let before = pids(&agent, "web").await;

    etcd.stop_member(0);
    let link = eventually(
        "the node to report the fleet disconnected",
        Duration::from_secs(20),
        || async {
            let l = node_fleet(&agent).await;
            (!l.connected).then_some(l)
        },
    )
    .await;
    assert!(!link.reason.is_empty(), "{link:?}");
    let node = agent.cli(&["node"]);
    let text = String::from_utf8_lossy(&node.stdout);
    assert!(
        text.contains("fleet:") && text.contains("disconnected since"),
        "{text}"
    );
    let refused = agent
        .apply(&spec("web", 1, &["serve"]))
        .await
        .expect_err("a local change of the fleet's service");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    // 30 s without etcd, looking every second: the same processes, no restart.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            pids(&agent, "web").await,
            before,
            "instances untouched while etcd is gone"
        );
        for (id, pid, _) in &before {
            assert!(corral_e2e::alive(*pid), "{id} runs");
        }
    }
    let still = node_fleet(&agent).await;
    assert!(!still.connected);
    assert_eq!(
        still.since, link.since,
        "disconnected since the first failure"
    );

    etcd.start_member(0);
    etcd.wait_healthy(Duration::from_secs(20));
    eventually("the node to reconnect", Duration::from_secs(30), || async {
        node_fleet(&agent).await.connected.then_some(())
    })
    .await;
    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 3, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "web", rev, 3).await;
    let after = pids(&agent, "web").await;
    for p in &before {
        assert!(
            after.contains(p),
            "{p:?} kept through the outage and the scale: {after:?}"
        );
    }
    assert!(
        !agent.log_text().contains("reading every key again"),
        "resumed by a watch from its revision, not a full read"
    );
}

/// A node that was away (its agent stopped) while its keys changed and etcd compacted the
/// revision it would resume from reads every key again and converges: a deleted key's
/// service goes, an updated one is updated, a new one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resyncs_with_a_full_read_after_compaction() {
    if skip("a_node_resyncs_with_a_full_read_after_compaction") {
        return;
    }
    let etcd = Etcd::start();
    let mut agent = fleet_agent(&etcd, "n1", "zone=a").await;
    etcd.put(
        &key("n1", "services", "gone"),
        spec("gone", 1, &["serve"]).as_bytes(),
    );
    let rev = etcd.put(
        &key("n1", "services", "kept"),
        spec("kept", 1, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "kept", rev, 1).await;
    agent.wait_running("gone", 1).await;

    agent.stop_with(libc::SIGTERM);
    etcd.del(&key("n1", "services", "gone"));
    let kept_rev = etcd.put(
        &key("n1", "services", "kept"),
        spec("kept", 2, &["serve"]).as_bytes(),
    );
    let new_rev = etcd.put(
        &key("n1", "services", "new"),
        spec("new", 1, &["serve"]).as_bytes(),
    );
    // Unrelated writes, then a compaction past the node's revision.
    for i in 0..20 {
        etcd.put("/elsewhere/churn", format!("{i}").as_bytes());
    }
    etcd.compact();

    agent.launch().await;
    converged(&etcd, "n1", "kept", kept_rev, 2).await;
    converged(&etcd, "n1", "new", new_rev, 1).await;
    eventually("gone removed", Duration::from_secs(30), || async {
        agent.get("gone").await.err().map(|_| ())
    })
    .await;
    assert!(
        agent.log_text().contains("reading every key again"),
        "the compacted revision was noticed"
    );
}

/// Bad input in etcd: a spec that does not parse, one that does not validate and one whose
/// name differs from its key are each refused in their status key with the reason; the
/// node's other service runs on untouched; a key of another node, or outside the layout, is
/// ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_specs_are_refused_in_their_status_and_nothing_else_stops() {
    if skip("malformed_specs_are_refused_in_their_status_and_nothing_else_stops") {
        return;
    }
    let etcd = Etcd::start();
    let agent = fleet_agent(&etcd, "n1", "zone=a").await;
    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 1, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "web", rev, 1).await;
    let before = pids(&agent, "web").await;

    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("junk", b"name = [not toml".to_vec(), "invalid spec"),
        (
            "bad",
            spec("bad", 100_000, &["serve"]).into_bytes(),
            "replicas",
        ),
        (
            "other",
            spec("web", 1, &["serve"]).into_bytes(),
            "differs from the key",
        ),
        ("binary", vec![0xff, 0xfe, 0x00, 0x01], "not UTF-8"),
    ];
    for (name, value, _) in &cases {
        etcd.put(&key("n1", "services", name), value);
    }
    etcd.put(
        &key("n2", "services", "theirs"),
        spec("theirs", 1, &["serve"]).as_bytes(),
    );
    etcd.put(
        "/corral/v1/nodes/n1/services/deep/er",
        spec("er", 1, &["serve"]).as_bytes(),
    );
    for (name, _, why) in &cases {
        let status_key = key("n1", "status", name);
        let s = eventually(
            &format!("{status_key} refused"),
            Duration::from_secs(20),
            || async {
                let s = etcd.get_json(&status_key)?;
                (s["state"] == "refused").then_some(s)
            },
        )
        .await;
        let error = s["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{name}: {error}");
        assert_eq!(s["running"], 0, "{name}: {s}");
        assert!(agent.get(name).await.is_err(), "{name} does not run");
    }
    // A fixed spec under the refused key is applied.
    let rev = etcd.put(
        &key("n1", "services", "bad"),
        spec("bad", 1, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "bad", rev, 1).await;
    assert!(
        agent.get("theirs").await.is_err(),
        "another node's key is not ours"
    );
    assert!(
        agent.get("er").await.is_err(),
        "a key outside the layout is ignored"
    );
    assert!(etcd.get_json(&key("n1", "status", "deep")).is_none());
    assert_eq!(
        pids(&agent, "web").await,
        before,
        "the good service ran on untouched"
    );
}

/// Waits for `corral fleet nodes` to list three nodes; its (success, stdout, stderr).
async fn three_nodes_registered(etcd: &Etcd) -> (bool, String, String) {
    etcd.nodes_registered(3, Duration::from_secs(30)).await
}

/// `corral fleet` with three nodes: `nodes` lists them from the registry; `apply --selector
/// zone=a --count 2` places the service on the two zone-a nodes (the zone-b one untouched),
/// their instances run and their status keys converge; `ls` shows the matrix; `rollout`
/// updates node by node, never both at once; `delete` removes it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_cli_places_rolls_out_and_deletes() {
    if skip("fleet_cli_places_rolls_out_and_deletes") {
        return;
    }
    let etcd = Etcd::start();
    let a1 = fleet_agent(&etcd, "a1", "zone=a").await;
    let a2 = fleet_agent(&etcd, "a2", "zone=a").await;
    let b1 = fleet_agent(&etcd, "b1", "zone=b").await;
    let (ok, nodes, err) = three_nodes_registered(&etcd).await;
    assert!(ok, "{err}");
    for (n, zone) in [("a1", "zone=a"), ("a2", "zone=a"), ("b1", "zone=b")] {
        assert!(
            nodes.lines().any(|l| l.starts_with(n) && l.contains(zone)),
            "{n} in\n{nodes}"
        );
    }

    let web = spec("web", 2, &["serve"]);
    let (ok, out, err) = etcd.fleet_cli(
        &["apply", "-f", "-", "--selector", "zone=a", "--count", "2"],
        Some(&web),
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("web: written to a1, a2") || out.contains("web: written to a2, a1"),
        "{out}"
    );
    let mut before = Vec::new();
    for a in [&a1, &a2] {
        a.wait_running("web", 2).await;
        before.push(pids(a, "web").await);
    }
    assert!(
        b1.get("web").await.is_err(),
        "the zone-b node is not chosen"
    );
    let matrix = eventually(
        "fleet ls to show both nodes healthy",
        Duration::from_secs(30),
        || async {
            let (_, out, _) = etcd.fleet_cli(&["ls"], None);
            out.lines()
                .any(|l| l.starts_with("web") && l.matches("2/2").count() == 2)
                .then_some(out)
        },
    )
    .await;
    assert!(matrix.starts_with("SERVICE"), "{matrix}");

    // A rollout one node at a time: the new spec reaches a node only once the one before is
    // healthy at its revision; at no moment are both nodes rolling.
    let web2 = spec("web", 2, &["serve", "v2"]);
    let web2_file = a1.dir.join("web2.toml");
    std::fs::write(&web2_file, &web2).expect("write spec");
    let file = web2_file.to_str().expect("utf-8").to_string();
    let endpoints = etcd.endpoints();
    let rollout = tokio::task::spawn_blocking(move || {
        std::process::Command::new(corral_e2e::bin("corral"))
            .args(["fleet", "rollout", "web", "-f", &file])
            .args(["--max-unavailable-nodes", "1", "--timeout", "60s"])
            .env("CORRAL_ETCD", endpoints)
            .output()
            .expect("corral fleet rollout")
    });
    // Sample both nodes' status keys until the rollout ends (bounded by its own timeout).
    let mut most_rolling = 0;
    while !rollout.is_finished() {
        let mut rolling = 0;
        for n in ["a1", "a2"] {
            if let Some(s) = etcd.get_json(&key(n, "status", "web"))
                && (s["rollout"]["state"] == "running" || s["healthy"] != 2)
            {
                rolling += 1;
            }
        }
        most_rolling = most_rolling.max(rolling);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = rollout.await;
    let out = out.expect("rollout task");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("web: rolled out to 2 node(s)"), "{text}");
    assert!(most_rolling <= 1, "two nodes were updating at once");
    for (a, old) in [&a1, &a2].into_iter().zip(&before) {
        let now = pids(a, "web").await;
        assert!(
            now.iter().all(|p| !old.contains(p)),
            "every instance replaced: {old:?} -> {now:?}"
        );
        assert_eq!(a.get("web").await.expect("get").revision, 2);
    }

    let (ok, out, err) = etcd.fleet_cli(&["delete", "web"], None);
    assert!(ok, "{out}{err}");
    for a in [&a1, &a2] {
        eventually("web removed", Duration::from_secs(30), || async {
            a.get("web").await.err().map(|_| ())
        })
        .await;
    }
    let (ok, _, err) = etcd.fleet_cli(&["delete", "web"], None);
    assert!(!ok && err.contains("on no node"), "{err}");
}

/// Three hosts, each in its own network namespace joined to etcd's by a veth pair. One host
/// is cut off (its link down): its instances keep running and it reports the disconnection,
/// while the other two apply a change at once; changes made meanwhile (a scale of the
/// service, a new service for the cut-off host) are applied within seconds of the link
/// coming back, without restarting the instances that did not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_keeps_running_and_catches_up() {
    let test = "a_host_cut_off_keeps_running_and_catches_up";
    if skip(test) || netns::skip_unless_netns(test) {
        return;
    }
    let net = Net::new(3);
    let etcd = Etcd::cluster(netns::BRIDGE_IP, 1, Some(net.bridge()), None);
    let hosts = etcd
        .start_hosts(&net, 3, "info,corral_agent=debug", "zone=a")
        .await;
    three_nodes_registered(&etcd).await;
    let (ok, out, err) = etcd.fleet_cli(
        &["apply", "-f", "-", "--selector", "zone=a"],
        Some(&spec("web", 2, &["serve"])),
    );
    assert!(ok, "{out}{err}");
    let mut before = Vec::new();
    for h in &hosts {
        h.wait_running("web", 2).await;
        before.push(pids(h, "web").await);
    }

    net.link(0, false);
    let link = eventually(
        "h0 to report the fleet disconnected",
        Duration::from_secs(20),
        || async {
            let l = node_fleet(&hosts[0]).await;
            (!l.connected).then_some(l)
        },
    )
    .await;
    assert!(!link.reason.is_empty());
    // The other hosts carry on: a scale reaches them while h0 is away.
    let (ok, out, err) = etcd.fleet_cli(
        &["apply", "-f", "-", "--selector", "zone=a"],
        Some(&spec("web", 3, &["serve"])),
    );
    assert!(ok, "{out}{err}");
    etcd.put(
        &key("h0", "services", "extra"),
        spec("extra", 1, &["serve"]).as_bytes(),
    );
    for h in &hosts[1..] {
        h.wait_running("web", 3).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pids(&hosts[0], "web").await,
        before[0],
        "h0 runs on untouched, cut off"
    );
    assert!(hosts[0].get("extra").await.is_err());

    net.link(0, true);
    hosts[0].wait_running("web", 3).await;
    hosts[0].wait_running("extra", 1).await;
    let after = pids(&hosts[0], "web").await;
    for p in &before[0] {
        assert!(
            after.contains(p),
            "{p:?} not restarted by the catch-up: {after:?}"
        );
    }
    eventually(
        "h0 to report the fleet connected",
        Duration::from_secs(30),
        || async { node_fleet(&hosts[0]).await.connected.then_some(()) },
    )
    .await;
    for (i, h) in hosts.iter().enumerate() {
        let now = pids(h, "web").await;
        for p in &before[i] {
            assert!(
                now.contains(p),
                "h{i}: {p:?} kept through the scale: {now:?}"
            );
        }
    }
}

/// etcd with TLS client certificate authentication: an agent with a certificate from etcd's
/// CA registers and runs what etcd says; one whose certificate another CA signed is refused
/// by etcd, says so in `Node` and its log, and keeps serving its local API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_certificate_is_refused_and_said() {
    if skip("a_wrong_client_certificate_is_refused_and_said") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = corral_e2e::pki::Ca::new(dir.path(), "etcd");
    let other = corral_e2e::pki::Ca::new(dir.path(), "other");
    let server = ca.server("etcd-server");
    let ctl = ca.client("etcdctl", "root", None);
    let good = ca.client("good", "n1", None);
    let bad = other.client("bad", "n2", None);
    let etcd = Etcd::cluster(
        "127.0.0.1",
        1,
        None,
        Some(EtcdTls {
            ca: ca.cert.clone(),
            cert: server.cert.clone(),
            key: server.key.clone(),
            ctl_cert: ctl.cert.clone(),
            ctl_key: ctl.key.clone(),
        }),
    );
    let endpoints = etcd.endpoints();
    assert!(endpoints.starts_with("https://"), "{endpoints}");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let start = |node: &'static str, pem: &corral_e2e::pki::Pem| {
        let args = vec![
            "--etcd".to_string(),
            endpoints.clone(),
            "--node".into(),
            node.into(),
            "--etcd-ca".into(),
            path(&ca.cert),
            "--etcd-cert".into(),
            path(&pem.cert),
            "--etcd-key".into(),
            path(&pem.key),
        ];
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Agent::start_full_args("info,corral_agent=debug", &args).await
        }
    };
    let n1 = start("n1", &good).await;
    let n2 = start("n2", &bad).await;

    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 1, &["serve"]).as_bytes(),
    );
    etcd.put(
        &key("n2", "services", "web"),
        spec("web", 1, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "web", rev, 1).await;
    assert!(node_fleet(&n1).await.connected);

    let link = eventually(
        "n2 to say why it is not connected",
        Duration::from_secs(20),
        || async {
            let l = node_fleet(&n2).await;
            (!l.connected && l.reason != "connecting").then_some(l)
        },
    )
    .await;
    eprintln!("n2: {}", link.reason);
    let reason = link.reason.to_lowercase();
    assert!(
        reason.contains("certificate"),
        "the reason names the certificate problem: {}",
        link.reason
    );
    assert!(n2.log_text().contains(&link.reason), "logged too");
    assert!(
        etcd.get_json("/corral/v1/nodes/n2/info").is_none(),
        "never registered"
    );
    assert!(n2.get("web").await.is_err(), "nothing from etcd runs on n2");
    n2.apply(&spec("local", 1, &["serve"]))
        .await
        .expect("the local API serves");
    n2.wait_running("local", 1).await;
}

/// Whether `name` on `agent` is disrupted now: a rollout running, or fewer instances
/// running or healthy than desired. `None` when the agent does not run it.
async fn disrupted(agent: &Agent, name: &str) -> Option<bool> {
    let s = agent.get(name).await.ok()?;
    let rolling = s
        .rollout
        .as_ref()
        .is_some_and(|r| r.state == pb::RolloutState::Running as i32);
    Some(rolling || s.running < s.desired || s.healthy < s.desired)
}

/// A three-member etcd cluster loses its leader (SIGKILL) while `corral fleet rollout
/// --max-unavailable-nodes 1` updates three nodes whose agents know all three members: the
/// cluster elects another leader, the agents and the rollout carry on through the two
/// survivors, and the rollout completes, replacing every instance, with never more than one
/// node disrupted at any moment (sampled from the agents' own APIs throughout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_during_a_fleet_rollout() {
    if skip("leader_loss_during_a_fleet_rollout") {
        return;
    }
    let mut etcd = Etcd::cluster("127.0.0.1", 3, None, None);
    let mut agents = Vec::new();
    for n in ["n1", "n2", "n3"] {
        agents.push(fleet_agent(&etcd, n, "zone=a").await);
    }
    three_nodes_registered(&etcd).await;
    let (ok, out, err) = etcd.fleet_cli(
        &["apply", "-f", "-", "--selector", "zone=a"],
        Some(&spec("web", 2, &["serve"])),
    );
    assert!(ok, "{out}{err}");
    let mut before = Vec::new();
    for a in &agents {
        a.wait_running("web", 2).await;
        before.push(pids(a, "web").await);
    }
    for (i, a) in agents.iter().enumerate() {
        eventually(
            &format!("n{} settled", i + 1),
            Duration::from_secs(30),
            || async { (disrupted(a, "web").await == Some(false)).then_some(()) },
        )
        .await;
    }

    let file = agents[0].dir.join("web2.toml");
    std::fs::write(&file, spec("web", 2, &["serve", "v2"])).expect("write spec");
    let corral = corral_e2e::bin("corral");
    let mut rollout = std::process::Command::new(&corral)
        .args(["fleet", "rollout", "web", "-f"])
        .arg(&file)
        .args(["--max-unavailable-nodes", "1", "--timeout", "90s"])
        .env("CORRAL_ETCD", etcd.endpoints())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("corral fleet rollout");
    // Its progress lines, as they come.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = rollout.stdout.take().expect("stdout");
        let t0 = std::time::Instant::now();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let line = format!("[{:.1}s] {line}", t0.elapsed().as_secs_f64());
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        })
    };
    let started = |lines: &std::sync::Mutex<Vec<String>>| {
        lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains("waiting for it to be healthy"))
    };

    // Sample every node until the rollout ends (bounded by its own --timeout); kill the
    // leader as soon as the first node has its new spec.
    let mut killed = None;
    let mut most_disrupted = 0;
    let mut samples = 0u32;
    let status = loop {
        if let Some(status) = rollout.try_wait().expect("wait rollout") {
            break status;
        }
        if killed.is_none() && started(&lines) {
            let leader = etcd.leader().expect("a leader");
            etcd.kill_member(leader);
            eprintln!("killed the leader, member {leader}");
            killed = Some(leader);
        }
        let mut now = 0;
        for a in &agents {
            if disrupted(a, "web").await != Some(false) {
                now += 1;
            }
        }
        most_disrupted = most_disrupted.max(now);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    reader.join().expect("reader");
    let mut stderr = String::new();
    if let Some(mut e) = rollout.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let text = lines.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
    let killed = killed.expect("the leader was killed during the rollout");
    eprintln!("rollout ({samples} samples):\n{text}\n{stderr}");
    assert!(status.success(), "{text}\n{stderr}");
    assert!(text.contains("web: rolled out to 3 node(s)"), "{text}");
    assert!(
        most_disrupted <= 1,
        "{most_disrupted} nodes disrupted at once"
    );
    assert!(samples > 10, "sampled throughout: {samples}");
    for (a, old) in agents.iter().zip(&before) {
        let now = pids(a, "web").await;
        assert!(
            now.iter().all(|p| !old.contains(p)),
            "every instance replaced: {old:?} -> {now:?}"
        );
        assert_eq!(a.get("web").await.expect("get").revision, 2);
    }
    // One member lost is one failover for each agent: its next connection leaves the dead
    // member out, rather than failing again on every request sent there.
    for (i, a) in agents.iter().enumerate() {
        let log = a.log_text();
        let drops = log.matches("fleet: disconnected from etcd").count();
        assert!(
            drops <= 2,
            "n{} lost its session {drops} times for one member killed:\n{}",
            i + 1,
            log.lines()
                .filter(|l| l.contains("fleet:"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The agents came back to the surviving members: each is connected and reports its
    // status, through a leader other than the killed member.
    assert_ne!(etcd.leader(), Some(killed));
    for (i, a) in agents.iter().enumerate() {
        eventually(
            &format!("n{} connected", i + 1),
            Duration::from_secs(30),
            || async { node_fleet(a).await.connected.then_some(()) },
        )
        .await;
    }
}

/// etcd with authentication on (a root user, and a `corral` user whose role grants only the
/// fleet's prefix): an agent with that user and its password registers and runs what etcd
/// says; one with a wrong password says `auth failed` in `Node`, serves its local API and
/// keeps trying. When the password of the running agent's user changes in etcd, the agent
/// loses its session and says `auth failed`, its instances run on untouched, and once the
/// password is the one it has again it reconnects by itself and applies what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_user_and_password_auth() {
    if skip("etcd_user_and_password_auth") {
        return;
    }
    let mut etcd = Etcd::start();
    etcd.enable_auth("corral", "s3cret-pw", "/corral");
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "s3cret-pw\n").expect("write");
    std::fs::write(&bad, "not-the-password\n").expect("write");
    let endpoints = etcd.endpoints();
    let start = |node: &'static str, file: &std::path::Path| {
        let args = vec![
            "--etcd".to_string(),
            endpoints.clone(),
            "--node".into(),
            node.into(),
            "--etcd-user".into(),
            "corral".into(),
            "--etcd-password-file".into(),
            file.to_str().expect("utf-8").into(),
            "--etcd-lease-ttl".into(),
            "4".into(),
        ];
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Agent::start_full_args("info,corral_agent=debug", &args).await
        }
    };
    let n1 = start("n1", &good).await;
    let n2 = start("n2", &bad).await;

    // The right password: registered, and the spec root wrote runs.
    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 2, &["serve"]).as_bytes(),
    );
    etcd.put(
        &key("n2", "services", "web"),
        spec("web", 1, &["serve"]).as_bytes(),
    );
    converged(&etcd, "n1", "web", rev, 2).await;
    assert!(etcd.get_json("/corral/v1/nodes/n1/info").is_some());
    assert!(node_fleet(&n1).await.connected);
    let before = pids(&n1, "web").await;

    // A wrong password: said in Node and in `corral node`, tried again, nothing from etcd
    // runs, the local API serves.
    let link = eventually(
        "n2 to say its authentication failed",
        Duration::from_secs(20),
        || async {
            let l = node_fleet(&n2).await;
            (!l.connected && l.reason.contains("auth failed")).then_some(l)
        },
    )
    .await;
    assert!(
        link.reason.contains("--etcd-user corral"),
        "{}",
        link.reason
    );
    assert!(!link.reason.contains("not-the-password"), "{}", link.reason);
    let node = n2.cli(&["node"]);
    let text = String::from_utf8_lossy(&node.stdout);
    assert!(
        text.contains("fleet:") && text.contains("auth failed"),
        "{text}"
    );
    eventually("n2 to try again", Duration::from_secs(20), || async {
        (n2.log_text().matches("auth failed").count() >= 2).then_some(())
    })
    .await;
    assert!(etcd.get_json("/corral/v1/nodes/n2/info").is_none());
    assert!(n2.get("web").await.is_err(), "nothing from etcd runs on n2");
    n2.apply(&spec("local", 1, &["serve"]))
        .await
        .expect("the local API serves");

    // The running agent's password changes under it: it says so, and runs on untouched.
    etcd.set_password("corral", "rotated-pw");
    let link = eventually(
        "n1 to say its authentication failed",
        Duration::from_secs(30),
        || async {
            let l = node_fleet(&n1).await;
            (!l.connected && l.reason.contains("auth failed")).then_some(l)
        },
    )
    .await;
    eprintln!("n1: {}", link.reason);
    let rev = etcd.put(
        &key("n1", "services", "web"),
        spec("web", 3, &["serve"]).as_bytes(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pids(&n1, "web").await, before, "n1 runs on untouched");
    for (id, pid, _) in &before {
        assert!(corral_e2e::alive(*pid), "{id} runs");
    }

    // The password it has is right again: it reconnects by itself and applies the scale,
    // keeping the instances it had.
    etcd.set_password("corral", "s3cret-pw");
    converged(&etcd, "n1", "web", rev, 3).await;
    let after = pids(&n1, "web").await;
    for p in &before {
        assert!(after.contains(p), "{p:?} kept: {after:?}");
    }
    assert!(node_fleet(&n1).await.connected);
}

/// `spec` with a CPU limit of `cpu` cores per instance.
fn spec_cpu(name: &str, replicas: u32, cpu: f64) -> String {
    format!(
        "{}[resources]\ncpu = {cpu:?}\n",
        spec(name, replicas, &["serve"])
    )
}

/// Capacity in placement: four `fleet apply --selector zone=a --count 1` at once, each of a
/// service that takes three quarters of a node's CPU, on three nodes: no two count the same
/// free capacity (the write holds only if no chosen node's services changed since the
/// read), so exactly three are placed, one per node, and the fourth is told no node has
/// room. A spec forced onto a full node with `--node` is refused by its agent's admission,
/// and the status key and `fleet ls` say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_never_count_the_same_capacity() {
    if skip("concurrent_applies_never_count_the_same_capacity") {
        return;
    }
    let etcd = Etcd::start();
    let mut agents = Vec::new();
    for n in ["a1", "a2", "a3"] {
        agents.push(fleet_agent(&etcd, n, "zone=a").await);
    }
    let info = eventually(
        "three nodes registered",
        Duration::from_secs(30),
        || async {
            let infos: Vec<serde_json::Value> = ["a1", "a2", "a3"]
                .iter()
                .filter_map(|n| etcd.get_json(&format!("/corral/v1/nodes/{n}/info")))
                .collect();
            (infos.len() == 3).then_some(infos)
        },
    )
    .await;
    let cpus = info[0]["allocatable"]["cpu"]
        .as_f64()
        .expect("allocatable cpu");
    assert!(cpus >= 1.0, "{info:?}");
    let each = cpus * 0.75;

    let runs: Vec<_> = (0..4)
        .map(|i| {
            let text = spec_cpu(&format!("s{i}"), 1, each);
            let endpoints = etcd.endpoints();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut child = std::process::Command::new(corral_e2e::bin("corral"))
                    .args(["fleet", "apply", "-f", "-", "--selector", "zone=a"])
                    .args(["--count", "1"])
                    .env("CORRAL_ETCD", endpoints)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("corral fleet apply");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(text.as_bytes())
                    .expect("write");
                child.wait_with_output().expect("apply")
            })
        })
        .collect();
    let outs: Vec<std::process::Output> = runs
        .into_iter()
        .map(|r| r.join().expect("apply thread"))
        .collect();
    let placed = outs.iter().filter(|o| o.status.success()).count();
    let texts: Vec<String> = outs
        .iter()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .collect();
    assert_eq!(placed, 3, "{texts:#?}");
    let refused = texts
        .iter()
        .zip(&outs)
        .find(|(_, o)| !o.status.success())
        .map(|(t, _)| t.clone())
        .expect("one refused");
    assert!(refused.contains("have room for cpu"), "{refused}");
    // One service per node, by the keys in etcd.
    let keys = etcd.get_prefix("/corral/v1/nodes/").expect("etcd answers");
    for n in ["a1", "a2", "a3"] {
        let mine: Vec<&String> = keys
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(&format!("/corral/v1/nodes/{n}/services/")))
            .collect();
        assert_eq!(mine.len(), 1, "{n}: {mine:?}");
    }
    // Every placed service runs: no agent had to refuse one.
    for (i, a) in agents.iter().enumerate() {
        let name = keys
            .iter()
            .find_map(|(k, _)| k.strip_prefix(&format!("/corral/v1/nodes/a{}/services/", i + 1)))
            .expect("a key")
            .to_string();
        a.wait_running(&name, 1).await;
    }

    // A spec forced onto a full node: its agent refuses it for capacity, and says so.
    let rev = etcd.put(
        &key("a1", "services", "big"),
        spec_cpu("big", 1, each).as_bytes(),
    );
    let status = eventually("big refused on a1", Duration::from_secs(20), || async {
        let s = etcd.get_json(&key("a1", "status", "big"))?;
        (s["spec_revision"] == rev && s["state"] == "refused").then_some(s)
    })
    .await;
    let error = status["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("resources.cpu"), "{error}");
    assert!(agents[0].get("big").await.is_err(), "not running");
    let (ok, ls, err) = etcd.fleet_cli(&["ls"], None);
    assert!(ok, "{err}");
    assert!(
        ls.lines()
            .any(|l| l.starts_with("big") && l.contains("refused")),
        "{ls}"
    );
    assert!(
        ls.contains(&format!("big on a1: refused: {error}")),
        "the reason under the matrix:\n{ls}"
    );
}

/// `corral-bench fleet` in a short mode (20 simulated agents, 3-second idle windows): it
/// prints each figure, an idle agent makes no etcd request besides its lease's keep-alives
/// (a count, not a time: the target is at most 0.2 a second), and once it has exited no
/// process it started runs and its network namespaces and scratch directory are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_bench_prints_its_figures_and_cleans_up() {
    let test = "the_fleet_bench_prints_its_figures_and_cleans_up";
    if skip(test) || netns::skip_unless_netns(test) {
        return;
    }
    let mut child = std::process::Command::new(corral_e2e::bin("corral-bench"))
        .args(["2", "fleet"])
        .env("CORRAL_FLEETBENCH_AGENTS", "20")
        .env("CORRAL_FLEETBENCH_IDLE_SECS", "3")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run corral-bench fleet");
    let bench_pid = child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait corral-bench").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("corral-bench fleet did not finish within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().expect("corral-bench output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "fleet local corral apply -> running",
        "fleet fleet apply -> running, all 3 hosts",
        "exceeds local apply by",
        "all registered after",
        "every node's status applied after",
        "corrald per agent PSS",
        "fleet simulated at rest: etcd",
        "extrapolated to 5000 hosts",
        "fleet cleaned up",
    ] {
        assert!(text.contains(figure), "{figure:?} in\n{text}");
    }
    let idle: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            l.split_once(": ")?
                .1
                .split_once(" requests/s per agent besides")?
                .0
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(idle.len(), 2, "two idle figures in\n{text}");
    for rate in idle {
        assert!(
            rate <= 0.2,
            "an idle agent's etcd requests: {rate}/s\n{text}"
        );
    }
    // Nothing it started survives it.
    let pids: Vec<i32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("fleet pids: "))
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    assert_eq!(pids.len(), 3 + 1 + 20 + 1, "{text}");
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert!(
            !["corrald", "etcd"].contains(&comm.trim()),
            "{pid} ({}) still runs",
            comm.trim()
        );
    }
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let tag = format!("crl{bench_pid}x");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&tag),
        "the bench's network namespaces are gone"
    );
    assert!(
        !std::path::Path::new(&format!("/var/tmp/corral-fleetbench-{bench_pid}")).exists(),
        "the bench's scratch directory is gone"
    );
}

/// A placement larger than etcd's transaction limit (`--max-txn-ops`, 128 by default):
/// `corral fleet apply` to 300 nodes writes every node's spec key, and `corral fleet delete`
/// removes every one, where a single transaction is refused by etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_delete_beyond_etcds_transaction_limit() {
    if skip_unless_etcd("apply_and_delete_beyond_etcds_transaction_limit") {
        return;
    }
    let etcd = Etcd::start();
    let nodes: Vec<String> = (0..300).map(|i| format!("n{i}")).collect();
    let mut args = vec!["apply", "-f", "-"];
    for n in &nodes {
        args.extend(["--node", n.as_str()]);
    }
    let (ok, out, err) = etcd.fleet_cli(&args, Some(&spec("wide", 1, &["serve"])));
    assert!(ok, "{out}{err}");
    let keys = etcd.get_prefix("/corral/v1/nodes/").expect("etcd answers");
    for n in &nodes {
        assert!(
            keys.iter().any(|(k, _)| *k == key(n, "services", "wide")),
            "{n}'s spec key written"
        );
    }
    let (ok, out, err) = etcd.fleet_cli(&["delete", "wide"], None);
    assert!(ok, "{out}{err}");
    let left = etcd.get_prefix("/corral/v1/nodes/").expect("etcd answers");
    assert!(
        left.is_empty(),
        "{} keys left: {:?}",
        left.len(),
        left.first()
    );
}
