//! The fleet past etcd's and the etcd client's size limits: a prefix whose keys together pass
//! the client's 4 MiB message limit is read in pages at one revision, by `corral fleet` and by
//! an agent; writes are split within etcd's `--max-txn-ops` and `--max-request-bytes`.
//! The keys of nodes without agents are written straight into etcd, as an operator's tool
//! would: no test here starts more than one agent.

use std::process::Output;
use std::time::Duration;

use corral_e2e::etcd::{Etcd, skip_unless_etcd};
use corral_e2e::{Agent, eventually, skip_unless_root, testbin};
use corral_fleet::etcd_client::{Client, GetOptions};
use corral_fleet::records::{NodeRecord, Resources, StatusRecord};

/// The most the etcd client takes in one response (tonic's default).
const ONE_RESPONSE: usize = 4 * 1024 * 1024;

fn key(node: &str, kind: &str, name: &str) -> String {
    format!("/corral/v1/nodes/{node}/{kind}/{name}")
}

/// A spec of `name` running `corral-testbin serve`, padded with a comment to about `size`
/// bytes.
fn spec(name: &str, size: usize) -> String {
    let mut text = format!(
        "name = \"{name}\"\ncommand = [{:?}, \"serve\"]\nreplicas = 1\n[stop]\ngrace = \"2s\"\n# ",
        testbin()
    );
    let pad = size.saturating_sub(text.len() + 1);
    text.extend(std::iter::repeat_n('x', pad));
    text.push('\n');
    text
}

async fn client(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint(0)], None)
        .await
        .expect("connect to etcd")
}

/// Every key under `prefix` with its value, read in pages (the test's own reads stay under
/// the client's limit too).
async fn keys_under(c: &mut Client, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let end = corral_fleet::keys::prefix_end(prefix);
    let mut start = prefix.as_bytes().to_vec();
    let mut all = Vec::new();
    loop {
        let resp = c
            .get(
                start.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(10)),
            )
            .await
            .expect("etcd answers");
        for kv in resp.kvs() {
            all.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            ));
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return all,
        }
    }
}

/// `corral fleet ARGS` with `env`; its output, which must say success.
fn fleet(etcd: &Etcd, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = etcd
        .fleet_command(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run corral fleet");
    assert!(
        out.status.success(),
        "corral fleet {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// `corral fleet nodes`, `ls`, `apply --selector` and `delete` on 80 nodes whose keys pass
/// 4 MiB together (one 55 KB spec each), against an etcd taking at most 8 operations and 64
/// KiB a request: the reads in pages of 7 keys, and with the default page (500, halved until
/// a response fits); the apply of a 15 KB spec to 40 nodes in transactions of at most 2
/// specs (2/3 of 64 KiB), the delete in transactions of 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_cli_reads_in_pages_and_splits_its_transactions() {
    if skip_unless_etcd("fleet_cli_reads_in_pages_and_splits_its_transactions") {
        return;
    }
    let etcd = Etcd::start_with(&["--max-txn-ops", "8", "--max-request-bytes", "65536"]);
    let mut c = client(&etcd).await;
    let nodes: Vec<String> = (0..80).map(|i| format!("n{i:02}")).collect();
    let big = spec("big", 55_000);
    assert!(big.len() * nodes.len() > ONE_RESPONSE);
    for (i, n) in nodes.iter().enumerate() {
        let record = NodeRecord {
            node: n.clone(),
            labels: [(
                "zone".to_string(),
                if i % 2 == 0 { "a" } else { "b" }.to_string(),
            )]
            .into(),
            capacity: Resources {
                cpu: 4.0,
                memory: 8 << 30,
            },
            allocatable: Resources {
                cpu: 4.0,
                memory: 8 << 30,
            },
            version: "test".into(),
            ..NodeRecord::default()
        };
        let info = serde_json::to_vec(&record).expect("json");
        c.put(format!("/corral/v1/nodes/{n}/info"), info, None)
            .await
            .expect("put info");
        let put = c
            .put(key(n, "services", "big"), big.clone(), None)
            .await
            .expect("put spec");
        let spec_revision = put.header().expect("a header").revision();
        let status = StatusRecord {
            service: "big".into(),
            spec_revision,
            revision: 1,
            desired: 1,
            running: 1,
            healthy: 1,
            ..StatusRecord::default()
        };
        c.put(
            key(n, "status", "big"),
            serde_json::to_vec(&status).expect("json"),
            None,
        )
        .await
        .expect("put status");
    }
    let small_pages = [("CORRAL_ETCD_PAGE", "7")];
    // etcd's limits, as an operator gives them to the CLI.
    let limits = [
        ("CORRAL_ETCD_MAX_TXN_OPS", "8"),
        ("CORRAL_ETCD_MAX_REQUEST_BYTES", "65536"),
    ];

    // The registry: every node, in pages of 7 keys and with the default page.
    for env in [&small_pages[..], &[]] {
        let listed = json(&fleet(&etcd, &["nodes", "-o", "json"], env));
        let names: Vec<&str> = listed
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|n| n["node"].as_str())
            .collect();
        assert_eq!(names, nodes, "with {env:?}");
    }

    // The placements: big on every node, healthy, at the revision of its key.
    for env in [&small_pages[..], &[]] {
        let ls = json(&fleet(&etcd, &["ls", "-o", "json"], env));
        let rows = ls.as_array().expect("a list");
        assert_eq!(rows.len(), nodes.len(), "with {env:?}");
        for (row, n) in rows.iter().zip(&nodes) {
            assert_eq!(row["service"], "big");
            assert_eq!(row["node"], n.as_str());
            assert_eq!(row["node_registered"], true);
            assert_eq!(row["status"]["healthy"], 1, "{row}");
            assert_eq!(
                row["status"]["spec_revision"], row["spec_revision"],
                "{row}"
            );
        }
    }

    // A 15 KB spec to the 40 nodes of zone a: more operations than etcd takes in one
    // transaction, and more bytes than 64 KiB.
    let dir = tempfile::tempdir().expect("tempdir");
    let wide = spec("wide", 15_000);
    let file = dir.path().join("wide.toml");
    std::fs::write(&file, &wide).expect("write spec");
    let file = file.to_str().expect("utf-8 path");
    let zone_a: Vec<&String> = nodes.iter().step_by(2).collect();
    assert_eq!(zone_a.len(), 40);
    assert!(
        wide.len() * 8 > 65536,
        "bytes, not operations, bound a transaction"
    );
    let args = ["apply", "-f", file, "--selector", "zone=a", "-o", "json"];
    // Told nothing, the CLI assumes etcd's defaults, and etcd's refusal says what to give.
    let out = etcd
        .fleet_command(&args)
        .output()
        .expect("run corral fleet");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("--etcd-max-request-bytes 1572864"), "{said}");
    let applied = json(&fleet(
        &etcd,
        &args,
        &[small_pages[0], limits[0], limits[1]],
    ));
    let mut written: Vec<&str> = applied["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    written.sort_unstable();
    assert_eq!(written, zone_a, "{applied}");
    let all = keys_under(&mut c, "/corral/v1/nodes/").await;
    for (i, n) in nodes.iter().enumerate() {
        let found = all.iter().find(|(k, _)| *k == key(n, "services", "wide"));
        if i % 2 == 0 {
            let (_, value) = found.unwrap_or_else(|| panic!("{n}'s spec key written"));
            assert!(*value == wide.as_bytes(), "{n}'s spec whole");
        } else {
            assert!(found.is_none(), "{n} is in zone b");
        }
    }

    // And away again, 8 keys a transaction, with the default page.
    fleet(&etcd, &["delete", "wide"], &limits);
    let left = keys_under(&mut c, "/corral/v1/nodes/").await;
    assert!(
        !left.iter().any(|(k, _)| k.ends_with("/services/wide")),
        "every wide key deleted"
    );
    assert_eq!(left.len(), 3 * nodes.len(), "the other keys kept");
}

/// An agent whose services' specs pass 4 MiB together reads them in pages (2 keys each)
/// and runs every one; it watches from the revision after its read (a spec written later
/// runs), and after a compaction it reads them all again the same way (a deleted spec's
/// service goes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reads_its_services_in_pages() {
    if skip_unless_root("an_agent_reads_its_services_in_pages")
        || skip_unless_etcd("an_agent_reads_its_services_in_pages")
    {
        return;
    }
    let etcd = Etcd::start();
    let mut c = client(&etcd).await;
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let mut revisions = Vec::new();
    for n in &names {
        let text = spec(n, 800_000);
        let put = c
            .put(key("n1", "services", n), text, None)
            .await
            .expect("put spec");
        revisions.push(put.header().expect("a header").revision());
    }
    assert!(names.len() * 800_000 > ONE_RESPONSE);

    let endpoints = etcd.endpoints();
    let mut agent = Agent::start_full_env(
        "info,corral_agent=debug",
        &[
            "--etcd",
            &endpoints,
            "--node",
            "n1",
            "--etcd-lease-ttl",
            "4",
        ],
        &[("CORRAL_ETCD_PAGE", "2")],
    )
    .await;
    for (n, rev) in names.iter().zip(&revisions) {
        agent.wait_running(n, 1).await;
        applied(&etcd, n, *rev).await;
    }
    let log = agent.log_text();
    assert!(
        log.contains("keys=6 requests=3"),
        "six keys read in three pages: {log}"
    );

    // Watched from the revision after the read.
    let late = c
        .put(key("n1", "services", "late"), spec("late", 1000), None)
        .await
        .expect("put spec")
        .header()
        .expect("a header")
        .revision();
    agent.wait_running("late", 1).await;
    applied(&etcd, "late", late).await;

    // Away while a spec is deleted and the revisions compacted: read again, in pages.
    agent.stop_with(libc::SIGTERM);
    etcd.del(&key("n1", "services", "s0"));
    for i in 0..5 {
        etcd.put("/elsewhere/churn", format!("{i}").as_bytes());
    }
    etcd.compact();
    agent.launch().await;
    eventually("s0 removed", Duration::from_secs(30), || async {
        agent.get("s0").await.err().map(|_| ())
    })
    .await;
    for n in names
        .iter()
        .skip(1)
        .chain(std::iter::once(&"late".to_string()))
    {
        agent.wait_running(n, 1).await;
    }
    let log = agent.log_text();
    assert!(
        log.contains("reading every key again") && log.matches("keys=6 requests=3").count() == 2,
        "five big keys and a small one read again in three pages: {log}"
    );
}

/// The status of `name` on n1 once it says the spec written at `revision` applied and
/// running.
async fn applied(etcd: &Etcd, name: &str, revision: i64) {
    let status_key = key("n1", "status", name);
    eventually(
        &format!("{status_key} applied at revision {revision}"),
        Duration::from_secs(60),
        || async {
            let s = etcd.get_json(&status_key)?;
            (s["spec_revision"] == revision && s["state"] == "applied" && s["running"] == 1)
                .then_some(())
        },
    )
    .await;
}
