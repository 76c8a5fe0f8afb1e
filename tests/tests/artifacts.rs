//! Services deployed from `[artifact]` packages, on the real kernel: a loopback HTTP server
//! (python3 -m http.server, started and stopped by the test) serves tarballs holding the HTTP
//! test server and a version file. A service is deployed from v1, rolled to v2 under load
//! (not one request may fail), rolled back with the server stopped (the store's copy, no
//! network), and given a package whose digest is wrong (the rollout fails with the URL and
//! both digests; the running instances are untouched). The tree is read-only inside the
//! instance and the host's mount table never sees it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corral_e2e::load::Load;
use corral_e2e::{Agent, eventually, free_port, pb, skip_unless_root, testbin};

const CLIENTS: usize = 8;
const LOAD_LIMIT: Duration = Duration::from_secs(180);

/// python3's HTTP server on `dir`, on a free loopback port; killed (by PID) when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        eventually("the package server", Duration::from_secs(20), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
        Server { child, port }
    }
}

/// A handler serving files in 64 KiB chunks 50 ms apart (about 1.25 MiB/s), so that a fetch
/// lasts long enough to be watched.
const THROTTLED: &str = r#"
import http.server, sys, time
class H(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, src, dst):
        while True:
            b = src.read(65536)
            if not b:
                return
            dst.write(b)
            dst.flush()
            time.sleep(0.05)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

impl Server {
    /// As [`Server::start`], throttled.
    async fn throttled(dir: &Path) -> Server {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-c", THROTTLED, &port.to_string()])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 throttled server");
        eventually("the package server", Duration::from_secs(20), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
        Server { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `web-<version>.tar.gz` in `dir`: `bin/server` (the test server) and `version`. Returns
/// its file name and SHA-256.
fn package(dir: &Path, version: &str) -> (String, String) {
    let tree = dir.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("bin")).expect("tree");
    std::fs::copy(testbin(), tree.join("bin/server")).expect("copy the test server");
    std::fs::write(tree.join("version"), format!("{version}\n")).expect("version file");
    let name = format!("web-{version}.tar.gz");
    let status = Command::new("tar")
        .arg("czf")
        .arg(dir.join(&name))
        .arg("-C")
        .arg(&tree)
        .args(["bin", "version"])
        .status()
        .expect("tar");
    assert!(status.success());
    let out = Command::new("sha256sum")
        .arg(dir.join(&name))
        .output()
        .expect("sha256sum");
    let sum = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned();
    (name, sum)
}

fn spec(port: u16, server: u16, name: &str, sha256: &str) -> String {
    format!(
        r#"name = "web"
command = ["bin/server", "http-listen", "300"]
replicas = 3
env = {{ VERSION_FILE = "/app/version" }}

[artifact]
url = "http://127.0.0.1:{server}/{name}"
sha256 = "{sha256}"
mount = "/app"

[ports]
admin = "auto"

[[sockets]]
name = "http"
listen = "127.0.0.1:{port}"

[health]
http = "http://127.0.0.1:{{port.admin}}/healthz"
interval = "200ms"
timeout = "150ms"
start_period = "5s"

[rollout]
min_healthy = "500ms"
healthy_deadline = "30s"

[stop]
grace = "5s"
"#
    )
}

fn body(port: u16) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out.rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

async fn settled(agent: &Agent, revision: u64, version: &str, port: u16) {
    eventually(
        &format!("3 healthy instances of revision {revision} serving {version}"),
        Duration::from_secs(60),
        || async {
            let s = agent.get("web").await.ok()?;
            let done = s.healthy == 3
                && s.instances.len() == 3
                && s.instances.iter().all(|i| i.revision == revision)
                && s.rollout
                    .as_ref()
                    .is_none_or(|r| r.state != pb::RolloutState::Running as i32);
            (done && body(port).ends_with(version)).then_some(())
        },
    )
    .await;
}

async fn rollout_state(agent: &Agent) -> pb::RolloutStatus {
    eventually("the rollout's end", Duration::from_secs(90), || async {
        let r = agent.get("web").await.ok()?.rollout?;
        (r.state != pb::RolloutState::Running as i32).then_some(r)
    })
    .await
}

fn pids(s: &pb::ServiceStatus) -> Vec<i32> {
    let mut p: Vec<i32> = s.instances.iter().map(|i| i.pid).collect();
    p.sort_unstable();
    p
}

fn mountinfo_line(pid: i32, target: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .ok()?
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(target))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_roll_and_roll_back_offline_and_refuse_a_wrong_digest() {
    if skip_unless_root("deploy_roll_and_roll_back_offline_and_refuse_a_wrong_digest") {
        return;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let (v1, sum1) = package(files.path(), "v1");
    let (v2, sum2) = package(files.path(), "v2");
    let server = Server::start(files.path()).await;
    let agent = Agent::start().await;
    let port = free_port();

    // v1: fetched, verified, unpacked, mounted read-only at /app; the command is relative.
    agent
        .apply(&spec(port, server.port, &v1, &sum1))
        .await
        .expect("apply v1");
    settled(&agent, 1, "v1", port).await;
    let s = agent.get("web").await.expect("status");
    let pkg = s.package.clone().expect("package status");
    assert_eq!((pkg.revision, pkg.phase.as_str()), (1, "ready"));
    let pid = s.instances[0].pid;
    let app = mountinfo_line(pid, "/app").expect("/app is a mount inside the instance");
    let options = app.split_whitespace().nth(5).unwrap_or("");
    assert!(options.split(',').any(|o| o == "ro"), "{app}");
    assert!(options.split(',').any(|o| o == "nosuid"), "{app}");
    assert!(
        mountinfo_line(std::process::id().cast_signed(), "/app").is_none(),
        "the host's mount table never sees the artifact"
    );
    let store = agent.state_dir.join("artifacts/sha256").join(&sum1);
    assert!(store.is_file(), "the blob is in the store under its digest");

    // v2 under load: not one request fails; the fetch is reported.
    let mut load = Load::start(port, CLIENTS, LOAD_LIMIT);
    agent
        .apply(&spec(port, server.port, &v2, &sum2))
        .await
        .expect("apply v2");
    let r = rollout_state(&agent).await;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    settled(&agent, 2, "v2", port).await;
    let report = std::mem::replace(&mut load, Load::start(port, CLIENTS, LOAD_LIMIT)).finish();
    assert!(report.ok() > 0);
    assert!(report.failures().is_empty(), "{}", report.failure_summary());
    let events = agent.cli(&["events"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains(&format!(
            "revision 2 package http://127.0.0.1:{}/{v2} ready",
            server.port
        )),
        "{events}"
    );

    // Roll back with the server gone: the store's copy, without the network.
    drop(server);
    agent.cli(&["rollback", "web"]);
    let r = rollout_state(&agent).await;
    assert_eq!(r.state, pb::RolloutState::Succeeded as i32, "{r:?}");
    settled(&agent, 1, "v1", port).await;
    let report = std::mem::replace(&mut load, Load::start(port, CLIENTS, LOAD_LIMIT)).finish();
    assert!(report.failures().is_empty(), "{}", report.failure_summary());

    // A package whose digest is wrong: the rollout fails with the URL and both digests,
    // and the running instances are the same processes.
    let files2 = tempfile::tempdir().expect("tempdir");
    let (v3, sum3) = package(files2.path(), "v3");
    let server = Server::start(files2.path()).await;
    let before = pids(&agent.get("web").await.expect("status"));
    // (A digest the store already holds would be served from it: content-addressed.)
    let wrong = "ab".repeat(32);
    let applied = agent
        .apply(&spec(port, server.port, &v3, &wrong))
        .await
        .expect("apply v3 (fetched as part of its rollout)");
    let id = applied.rollout_id.clone();
    let r = eventually("the failed rollout", Duration::from_secs(90), || async {
        let mut client = agent.client().await;
        let r = client
            .get_rollout(pb::GetRolloutRequest { id: id.clone() })
            .await
            .ok()?
            .into_inner();
        (r.state != pb::RolloutState::Running as i32).then_some(r)
    })
    .await;
    assert_eq!(r.state, pb::RolloutState::Failed as i32, "{r:?}");
    assert!(!r.rollback_id.is_empty(), "rolled back: {r:?}");
    // Rolled back to revision 1, whose package is ready; the failure is in the events.
    let s = agent.get("web").await.expect("status");
    let pkg = s.package.clone().expect("package status");
    assert_eq!((pkg.revision, pkg.phase.as_str()), (1, "ready"), "{pkg:?}");
    let events = agent.cli(&["events"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.lines().any(|l| l.contains("revision 3 package")
            && l.contains("failed")
            && l.contains("sha256 mismatch")),
        "{events}"
    );
    assert!(r.reason.contains("sha256 mismatch"), "{}", r.reason);
    assert!(
        r.reason.contains(&wrong) && r.reason.contains(&sum3),
        "{}",
        r.reason
    );
    let s = agent.get("web").await.expect("status");
    assert_eq!(
        pids(&s),
        before,
        "nothing of the running revision was touched"
    );
    assert!(s.instances.iter().all(|i| i.revision == 1), "{s:?}");
    let report = load.finish();
    assert!(report.failures().is_empty(), "{}", report.failure_summary());
    assert!(
        !agent
            .state_dir
            .join("artifacts/sha256")
            .join(&sum3)
            .exists()
            && !agent
                .state_dir
                .join("artifacts/sha256")
                .join(&wrong)
                .exists(),
        "nothing unverified in the store"
    );
    drop(server);
}

/// `[image]` over loopback HTTP: the image (an OCI layout tar the test builds from the static
/// busybox) is the instance's root, with its config's defaults, and the instance's writable
/// layer is gone once it ends (`scenarios::image_instance`). An image whose config names a
/// user its `/etc/passwd` lacks fails with that reason in the service's status, and nothing
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_the_instance_root_and_a_missing_user_is_refused() {
    if skip_unless_root("an_image_is_the_instance_root_and_a_missing_user_is_refused") {
        return;
    }
    let Some(busybox) = corral_e2e::oci::image::busybox() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let good = corral_e2e::oci::image::busybox_image(&busybox, "app");
    std::fs::write(dir.path().join("good.oci.tar"), good.tar()).expect("write");
    let ghost = corral_e2e::oci::image::busybox_image(&busybox, "ghost");
    std::fs::write(dir.path().join("ghost.oci.tar"), ghost.tar()).expect("write");
    let server = Server::start(dir.path()).await;
    let agent = Agent::start().await;
    let url = |name: &str| format!("http://127.0.0.1:{}/{name}", server.port);
    corral_e2e::scenarios::image_instance(&agent, &url("good.oci.tar"), &good.manifest).await;

    let spec = format!(
        "name = \"ghost\"\nreplicas = 1\n[image]\nurl = \"{}\"\ndigest = \"{}\"\n",
        url("ghost.oci.tar"),
        ghost.manifest
    );
    agent.apply(&spec).await.expect("apply");
    let reason = eventually("the package's failure", Duration::from_secs(60), || async {
        let p = agent.get("ghost").await.ok()?.package?;
        (p.phase == "failed").then_some(p.error?)
    })
    .await;
    assert!(
        reason.contains("/etc/passwd has no user \"ghost\""),
        "{reason}"
    );
    let s = agent.get("ghost").await.expect("status");
    assert!(
        s.instances.iter().all(|i| i.pid == 0),
        "nothing runs: {s:?}"
    );
}

/// `corral artifacts`: an archive imported on a node without network is listed with its
/// digest, size and the owner `import`, and serves a spec naming only its SHA-256 through a
/// path; the service's revision pins it too; once the service is deleted `gc` leaves the
/// imported entry, which nothing but `import` owns. A relative path is refused by the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_listed_imported_and_collected() {
    if skip_unless_root("artifacts_are_listed_imported_and_collected") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (name, sha) = package(dir.path(), "v1");
    let file = dir.path().join(&name);
    let agent = Agent::start().await;

    let out = agent.cli(&["artifacts", "import", file.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.trim().ends_with(&format!("sha256:{sha}")),
        "{printed}"
    );

    let list = |agent: &Agent| {
        let out = agent.cli(&["-o", "json", "artifacts"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let v = list(&agent);
    let entries = v["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{v}");
    assert_eq!(entries[0]["kind"], "artifact");
    assert_eq!(entries[0]["digest"], format!("sha256:{sha}"));
    assert_eq!(entries[0]["owners"], serde_json::json!(["import"]));
    let size = std::fs::metadata(&file).expect("size").len();
    assert!(entries[0]["size"].as_u64() >= Some(size), "{v}");

    // A service from it: its revision pins it, its instance holds it.
    let spec = format!(
        "name = \"imp\"\ncommand = [\"bin/server\", \"serve\"]\n[artifact]\nurl = \"{}\"\nsha256 = \"{sha}\"\nmount = \"/app\"\n",
        file.display()
    );
    agent.apply(&spec).await.expect("apply");
    agent.wait_running("imp", 1).await;
    let v = list(&agent);
    assert_eq!(
        v["entries"][0]["owners"],
        serde_json::json!(["imp@r1", "import"]),
        "{v}"
    );
    assert_eq!(v["entries"][0]["users"], 1, "{v}");
    let table = String::from_utf8_lossy(&agent.cli(&["artifacts"]).stdout).into_owned();
    assert!(
        table.starts_with("KIND") && table.contains(&format!("sha256:{sha}")),
        "{table}"
    );

    agent.delete("imp").await.expect("delete");
    let out = agent.cli(&["artifacts", "gc"]);
    assert!(out.status.success(), "{out:?}");
    let v = list(&agent);
    assert_eq!(
        v["entries"][0]["owners"],
        serde_json::json!(["import"]),
        "{v}"
    );
    assert_eq!(v["entries"][0]["users"], 0, "{v}");

    let mut client = agent.client().await;
    let err = client
        .import_artifact(pb::ImportArtifactRequest {
            path: "relative.tar".into(),
        })
        .await
        .expect_err("relative");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("path:"), "{}", err.message());
}

/// `user = "dynamic"` with `[image]` and no user namespace: the process runs as the uid the
/// agent allocated (not the image's `User`, not root), and may write its `/tmp` but not the
/// image's directories (root's and the image user's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_runs_as_a_dynamic_user_without_userns() {
    if skip_unless_root("an_image_runs_as_a_dynamic_user_without_userns") {
        return;
    }
    let Some(busybox) = corral_e2e::oci::image::busybox() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = corral_e2e::oci::image::busybox_image(&busybox, "app");
    let layout = dir.path().join("busybox.oci");
    image.write_dir(&layout);
    let agent = Agent::start().await;
    // Each write's outcome on stdout, then it stays up to be looked at.
    let spec = format!(
        r#"name = "dyn"
user = "dynamic"
command = ["/bin/sh", "-c", "for p in /tmp/t /data/t /t /etc/t; do if echo x > $p 2>/dev/null; then echo wrote $p; else echo refused $p; fi; done; exec sleep 1000"]
replicas = 1
[image]
url = "{}"
digest = "{}"
[stop]
grace = "1s"
"#,
        layout.display(),
        image.manifest
    );
    agent.apply(&spec).await.expect("apply");
    let inst = agent.wait_running("dyn", 1).await.remove(0);
    let status = std::fs::read_to_string(format!("/proc/{}/status", inst.pid)).expect("status");
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line")
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect();
    assert!(
        uids.iter().all(|u| (61184..=65519).contains(u)),
        "every uid the dynamic one: {uids:?}"
    );
    let root = format!("/proc/{}/root", inst.pid);
    assert!(
        Path::new(&format!("{root}/bin/busybox")).is_file(),
        "the image is its root"
    );
    let out = eventually("the writes' outcomes", Duration::from_secs(30), || async {
        let logs = agent.cli(&["logs", "dyn"]);
        let text = String::from_utf8_lossy(&logs.stdout).into_owned();
        text.contains("/etc/t").then_some(text)
    })
    .await;
    eprintln!("dynamic image instance: uids {uids:?}, writes:\n{out}");
    for line in [
        "wrote /tmp/t",
        "refused /data/t",
        "refused /t",
        "refused /etc/t",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
}

/// `corral apply --wait` follows a package's fetch and then its rollout: over a throttled
/// server it prints the fetch's progress (percent of the total) and the rollout's steps (the
/// instances replaced) and exits 0; a package whose digest is wrong makes it exit non-zero
/// naming the URL's digest mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_shows_fetch_and_rollout_progress_and_fails_naming_the_reason() {
    if skip_unless_root("apply_wait_shows_fetch_and_rollout_progress_and_fails_naming_the_reason") {
        return;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let (v1, sum1) = package(files.path(), "v1");
    let (v2, sum2) = package(files.path(), "v2");
    let server = Server::throttled(files.path()).await;
    let agent = Agent::start().await;
    let port = free_port();
    agent
        .apply(&spec(port, server.port, &v1, &sum1))
        .await
        .expect("apply v1");
    settled(&agent, 1, "v1", port).await;

    let file = files.path().join("web.toml");
    let f = file.to_str().expect("utf-8");
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    std::fs::write(&file, spec(port, server.port, &v2, &sum2)).expect("write");
    let out = agent.cli(&["apply", "-f", f, "--wait", "--timeout", "120s"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let err = String::from_utf8_lossy(&out.stderr);
    let fetching: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("web: package rev 2 fetching") && l.contains("% of "))
        .collect();
    assert!(!fetching.is_empty(), "fetch progress: {said}");
    let replaced = err
        .lines()
        .filter(|l| l.contains("stopping") && l.contains("old instance"))
        .count();
    assert_eq!(replaced, 3, "every old instance's stop shown: {said}");
    // The fetch's lines come before the rollout's steps.
    let first_fetch = err.find("fetching").expect("a fetch line");
    let first_step = err.find("old instance").expect("a step line");
    assert!(first_fetch < first_step, "{said}");
    settled(&agent, 2, "v2", port).await;

    // A new file with a digest the store does not hold (one it holds would be served from
    // it: the digest names the content): the fetch fails verification; --wait exits 1 and
    // says why.
    let (v3, sum3) = package(files.path(), "v3");
    let wrong = "ab".repeat(32);
    std::fs::write(&file, spec(port, server.port, &v3, &wrong)).expect("write");
    let out = agent.cli(&["apply", "-f", f, "--wait", "--timeout", "120s"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("failed"), "{said}");
    assert!(
        said.contains(&wrong) && said.contains(&sum3),
        "both digests named ({wrong}, {sum3}): {said}"
    );
}
