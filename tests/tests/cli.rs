//! The CLI against a real agent: apply, ls, status, scale, diff, node, delete, with JSON.

use std::time::Duration;

use corral_e2e::{Agent, eventually, skip_unless_root, testbin};

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_a_service_end_to_end() {
    if skip_unless_root("cli_drives_a_service_end_to_end") {
        return;
    }
    let agent = Agent::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("svc.toml");
    let spec = |replicas: u32, mem: &str| {
        format!(
            "name = \"svc\"\ncommand = [{:?}, \"serve\"]\nreplicas = {replicas}\n[resources]\nmemory = \"{mem}\"\n[ports]\nadmin = \"auto\"\n",
            testbin()
        )
    };
    std::fs::write(&file, spec(2, "32MiB")).expect("write");
    let f = file.to_str().expect("utf-8");

    let out = agent.cli(&["apply", "-f", f]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("svc: created (revision 1)"));
    agent.wait_running("svc", 2).await;

    let ls = json(&agent.cli(&["ls", "-o", "json"]));
    assert_eq!(ls[0]["name"], "svc");
    assert_eq!(ls[0]["running"], 2);

    let st = json(&agent.cli(&["status", "svc", "-o", "json"]));
    assert_eq!(st["desired"], 2);
    let instances = st["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2);
    for i in instances {
        assert_eq!(i["state"], "running");
        assert!(i["pid"].as_i64().unwrap_or(0) > 0);
        assert!(i["usage"]["memory_bytes"].as_u64().unwrap_or(0) > 0, "{i}");
        assert!(i["ports"]["admin"].as_u64().unwrap_or(0) > 0, "{i}");
    }
    let table = agent.cli(&["status", "svc"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("svc-0") && text.contains("running"), "{text}");

    std::fs::write(&file, spec(2, "64MiB")).expect("write");
    let diff = agent.cli(&["diff", "-f", f]);
    let text = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.status.success() && text.contains("resources.memory"),
        "{text}"
    );
    let st = json(&agent.cli(&["status", "svc", "-o", "json"]));
    assert_eq!(st["revision"], 1, "diff applies nothing");

    let out = agent.cli(&["scale", "svc", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_running("svc", 3).await;

    let node = json(&agent.cli(&["node", "-o", "json"]));
    assert!(node["cpus"].as_u64().unwrap_or(0) >= 1);
    assert!(node["cgroup_version"] == "v1" || node["cgroup_version"] == "v2");
    assert_eq!(node["services"], 1);

    let out = agent.cli(&["delete", "svc"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("svc gone", Duration::from_secs(10), || async {
        agent.get("svc").await.is_err().then_some(())
    })
    .await;
    let ls = json(&agent.cli(&["ls", "-o", "json"]));
    assert_eq!(ls, serde_json::json!([]));
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_restart_and_apply_wait_report_rollouts_by_exit_code() {
    if skip_unless_root("cli_restart_and_apply_wait_report_rollouts_by_exit_code") {
        return;
    }
    let agent = Agent::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("web.toml");
    let port = corral_e2e::free_port();
    let spec = |version: &str, status: &str| {
        format!(
            r#"name = "web"
command = [{bin:?}, "http-listen", "100"]
replicas = 2
env = {{ VERSION = "{version}", ADMIN_STATUS = "{status}" }}
[ports]
admin = "auto"
[[sockets]]
name = "http"
listen = "127.0.0.1:{port}"
[health]
http = "http://127.0.0.1:{{port.admin}}/healthz"
interval = "100ms"
timeout = "100ms"
start_period = "10s"
[rollout]
min_healthy = "200ms"
healthy_deadline = "3s"
"#,
            bin = testbin()
        )
    };
    std::fs::write(&file, spec("v1", "200")).expect("write");
    let f = file.to_str().expect("utf-8");
    let out = agent.cli(&["apply", "-f", f, "--wait"]);
    assert!(out.status.success(), "{}", text(&out));

    // A rolling restart followed to its end: exit 0, the outcome said.
    let out = agent.cli(&["restart", "web", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("rollout web-r") && said.contains("succeeded"),
        "{said}"
    );

    // One rollout at a time: a second restart is refused while the first runs, naming it;
    // --force supersedes it.
    let out = agent.cli(&["restart", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = agent.cli(&["restart", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rollout"), "{}", text(&out));
    let out = agent.cli(&["restart", "web", "--force", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));

    // `diff` says a command change would roll, and applies nothing.
    std::fs::write(&file, spec("v2", "503")).expect("write");
    let out = agent.cli(&["diff", "-f", f]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("env"), "{}", text(&out));
    let before = json(&agent.cli(&["status", "web", "-o", "json"]));

    // A revision that never gets healthy: apply --wait exits 1, and says it was rolled back.
    let out = agent.cli(&["apply", "-f", f, "--wait", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("failed"), "{said}");
    assert!(said.contains("rolled back to revision"), "{said}");
    let after = json(&agent.cli(&["status", "web", "-o", "json"]));
    let pids = |s: &serde_json::Value| {
        let mut p: Vec<i64> = s["instances"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["pid"].as_i64()).collect())
            .unwrap_or_default();
        p.sort_unstable();
        p
    };
    assert_eq!(
        pids(&before),
        pids(&after),
        "the old instances kept running"
    );

    // `rollback --to` an unknown revision is refused with the reason; nothing changes.
    let out = agent.cli(&["rollback", "web", "--to", "99"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("99"), "{}", text(&out));
}

/// `apply -f a -f b`: one ApplyBatch, all or nothing; an error names the file it is in;
/// `--dry-run` changes nothing; `--atomic` does the same for a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_of_several_files_is_all_or_nothing() {
    if skip_unless_root("apply_of_several_files_is_all_or_nothing") {
        return;
    }
    let agent = Agent::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = |name: &str| {
        format!(
            "name = \"{name}\"\ncommand = [{:?}, \"serve\"]\nreplicas = 1\n",
            testbin()
        )
    };
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, spec("ba")).expect("write");
    std::fs::write(&b, "name = \"bb\"\ncommand = []\n").expect("write");
    let (fa, fb) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));

    // b is invalid: nothing is applied, and the error names b's file and field.
    let out = agent.cli(&["apply", "-f", fa, "-f", fb]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{fb}: command")), "{stderr}");
    assert!(agent.get("ba").await.is_err(), "a was not applied");

    // Both valid: a dry run changes nothing, then both are created in one call.
    std::fs::write(&b, spec("bb")).expect("write");
    let out = agent.cli(&["apply", "-f", fa, "-f", fb, "--dry-run", "-o", "json"]);
    let v = json(&out);
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    assert!(agent.get("ba").await.is_err() && agent.get("bb").await.is_err());
    let out = agent.cli(&["apply", "-f", fa, "-f", fb]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ba: created") && stdout.contains("bb: created"),
        "{stdout}"
    );
    agent.wait_running("ba", 1).await;
    agent.wait_running("bb", 1).await;

    // --atomic on a directory: one bad file keeps the good change out too.
    std::fs::write(&a, spec("ba").replace("replicas = 1", "replicas = 2")).expect("write");
    std::fs::write(&b, "name = \"bb\"\ncommand = []\n").expect("write");
    let d = dir.path().to_str().expect("utf-8");
    let out = agent.cli(&["apply", "--atomic", "-f", d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("b.toml: command"), "{stderr}");
    let ba = agent.get("ba").await.expect("ba");
    assert_eq!(ba.desired, 1, "the batch was refused whole");
    eventually("still one instance", Duration::from_secs(5), || async {
        (agent.get("ba").await.ok()?.instances.len() == 1).then_some(())
    })
    .await;
}
