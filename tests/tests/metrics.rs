//! `/metrics` scraped by a real Prometheus (Debian's `prometheus`, started here on loopback
//! with its own config and storage): a service whose processes the kernel OOM-kills inside an
//! instance that keeps running, a crash loop, a service with one healthy and one unhealthy
//! instance; PromQL through Prometheus's HTTP API sees the restart count the agent reports,
//! the OOM kills, health 0/1 per instance, the shipped alerting rules firing, and no series
//! of a service deleted before the last scrape. `promtool` checks a scrape and the rules.
//! And the flags: a non-loopback address without TLS, or a bad address, is refused.
//!
//! Prometheus and promtool come from the `prometheus` package (.ci/run installs it): without
//! them these tests say so and skip, except in CI (`CI=true`), where they fail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use corral_e2e::{Agent, bin, eventually, free_port, skip_unless_root, testbin};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Whether `program` is installed; in CI its absence fails the test.
fn have(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{program} is not installed: .ci/run installs the `prometheus` package"
        );
        eprintln!("SKIP: {program} is not installed (apt-get install prometheus)");
    }
    found
}

/// GET `url`: status, content type, body.
async fn get(url: &str, accept: Option<&str>) -> (u16, String, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut req = hyper::Request::get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Empty::new()).expect("request")),
    )
    .await
    .expect("answered within 10 s")
    .expect("GET");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, ctype, String::from_utf8_lossy(&body).into_owned())
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus on loopback scraping one target every second, with the shipped rules.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("corral-prometheus-")
            .tempdir()
            .expect("tempdir");
        let rules = workspace().join("examples/corral-rules.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: corral\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )
        .expect("config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        eventually("Prometheus ready", Duration::from_secs(30), || async {
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            let req = hyper::Request::get(ready.as_str())
                .body(Empty::new())
                .ok()?;
            let resp = client.request(req).await.ok()?;
            resp.status().is_success().then_some(())
        })
        .await;
        p
    }

    /// An instant query's result: each series' labels and value.
    async fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            encode(promql)
        );
        let (status, _, body) = get(&url, None).await;
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["data"]["result"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .expect("a number");
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that returns one series, once it does and `ok` holds for it.
    async fn value_when(&self, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        eventually(promql, Duration::from_secs(60), || async {
            match self.query(promql).await.as_slice() {
                [(_, v)] if ok(*v) => Some(*v),
                _ => None,
            }
        })
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(name: &str, replicas: u32, command: &[&str], extra: &str) -> String {
    let cmd: Vec<String> = command.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "name = \"{name}\"\ncommand = [{}]\nreplicas = {replicas}\n{extra}\n",
        cmd.join(", ")
    )
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_restarts_oom_kills_health_and_forgets_deleted_services() {
    if skip_unless_root("prometheus_scrapes_restarts_oom_kills_health_and_forgets_deleted_services")
        || !have("prometheus")
        || !have("promtool")
    {
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_full_args("info", &["--metrics", &addr]).await;
    let tb = testbin();
    // A shell that keeps starting a 256 MiB allocator in a 32 MiB cgroup: the kernel kills
    // the allocator, the instance (the shell) keeps running.
    let hog_loop = format!("while :; do {tb} hog-mem 256; sleep 0.3; done");
    agent
        .apply(&spec(
            "hog",
            1,
            &["/bin/sh", "-c", &hog_loop],
            "[resources]\nmemory = \"32MiB\"\n",
        ))
        .await
        .expect("apply hog");
    // Fails 200 ms after each start; the backoff grows 1 s, 2 s, 4 s, ...
    agent
        .apply(&spec(
            "crash",
            1,
            &[&tb, "exit", "3", "200"],
            "[restart]\nbackoff = \"1s\"\nbackoff_max = \"1h\"\n",
        ))
        .await
        .expect("apply crash");
    // probed-0 makes the file its probe looks for; probed-1 does not.
    agent
        .apply(&spec(
            "probed",
            2,
            &[
                "/bin/sh",
                "-c",
                "if [ \"$CORRAL_INDEX\" = 0 ]; then touch /tmp/ok; fi; exec sleep 3600",
            ],
            "[health]\nexec = [\"/usr/bin/test\", \"-e\", \"/tmp/ok\"]\ninterval = \"200ms\"\n\
             timeout = \"150ms\"\nfailure_threshold = 2\nrestart_on_failure = false\n",
        ))
        .await
        .expect("apply probed");
    let prom = Prometheus::start(&addr).await;

    // The restart count: once the crash loop's backoff is seconds long, Prometheus holds
    // exactly what the agent reports.
    let restarts = eventually("3 restarts", Duration::from_secs(30), || async {
        let s = agent.get("crash").await.ok()?;
        let r = s.instances.first()?.restarts;
        (r >= 3).then_some(r)
    })
    .await;
    let seen = prom
        .value_when("corral_instance_restarts_total{service=\"crash\"}", |v| {
            v >= f64::from(restarts)
        })
        .await;
    let now = agent.get("crash").await.expect("status").instances[0].restarts;
    assert!(
        f64::from(restarts) <= seen && seen <= f64::from(now),
        "Prometheus has {seen} restarts, the agent said {restarts} then {now}"
    );
    let exited = prom
        .query("corral_instance_last_exit{service=\"crash\",class=\"exited\"}")
        .await;
    assert_eq!(exited.len(), 1, "{exited:?}");

    // OOM kills inside the running hog instance.
    prom.value_when(
        "corral_instance_oom_kills_total{service=\"hog\",exported_instance=\"hog-0\"}",
        |v| v >= 1.0,
    )
    .await;
    let limit = prom
        .value_when(
            "corral_instance_memory_limit_bytes{service=\"hog\"}",
            |_| true,
        )
        .await;
    assert_eq!(limit, f64::from(32u32 << 20));
    // ... which the shipped rule turns into an alert.
    eventually("the OOM alert", Duration::from_secs(30), || async {
        let alerts = prom
            .query("ALERTS{alertname=\"CorralInstanceOOMKilled\",service=\"hog\"}")
            .await;
        (!alerts.is_empty()).then_some(())
    })
    .await;

    // Health per instance: 1 for probed-0, 0 for probed-1 (and its failed probes counted).
    let healthy = |i: &str| {
        format!("corral_instance_healthy{{service=\"probed\",exported_instance=\"{i}\"}}")
    };
    assert_eq!(
        prom.value_when(&healthy("probed-0"), |v| v == 1.0).await,
        1.0
    );
    assert_eq!(
        prom.value_when(&healthy("probed-1"), |v| v == 0.0).await,
        0.0
    );
    prom.value_when(
        "corral_instance_probe_failures_total{exported_instance=\"probed-1\"}",
        |v| v >= 2.0,
    )
    .await;
    prom.value_when(
        "corral_instance_probe_duration_seconds_count{exported_instance=\"probed-0\"}",
        |v| v >= 2.0,
    )
    .await;
    prom.value_when(
        "corral_service_healthy_instances{service=\"probed\"}",
        |v| v == 1.0,
    )
    .await;
    // The API's own calls (the harness's List and Apply, the Gets above).
    prom.value_when(
        "sum(corral_api_requests_total{method=\"corral.v1.Agent/Apply\",code=\"OK\"})",
        |v| v >= 3.0,
    )
    .await;

    // A scrape in the Prometheus text format passes promtool; OpenMetrics on request.
    let url = format!("http://{addr}/metrics");
    let (status, ctype, text) = get(&url, None).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, ctype, om) = get(&url, Some("application/openmetrics-text; version=1.0.0")).await;
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"));

    // Deleted: after the next scrape Prometheus has no series of the service.
    assert_eq!(
        prom.query("count(corral_instance_up{service=\"probed\"})")
            .await
            .first()
            .map(|(_, v)| *v),
        Some(2.0)
    );
    agent.delete("probed").await.expect("delete");
    let deleted_at = now_secs();
    prom.value_when("timestamp(corral_build_info)", |t| t > deleted_at + 0.5)
        .await;
    let left = prom.query("{service=\"probed\"}").await;
    assert!(left.is_empty(), "series of a deleted service: {left:?}");
    assert!(
        !prom
            .query("corral_instance_up{service=\"hog\"}")
            .await
            .is_empty()
    );
}

#[test]
fn the_shipped_rules_and_config_pass_promtool() {
    if !have("promtool") {
        return;
    }
    for args in [
        ["check", "rules", "examples/corral-rules.yml"],
        ["check", "config", "examples/prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(workspace())
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// corrald with `args` must refuse to start: exit 2 with a message holding every `words`.
fn refused(args: &[&str], words: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin("corrald"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(args)
        .output()
        .expect("run corrald");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    for w in words {
        assert!(err.contains(w), "{args:?}: {w:?} not in {err}");
    }
    assert!(
        !dir.path().join("s.sock").exists(),
        "nothing served before refusing"
    );
}

#[test]
fn bad_metrics_flags_are_refused_before_anything_starts() {
    refused(
        &["--metrics", "0.0.0.0:9464"],
        &[
            "reachable from other hosts",
            "--metrics-tls-cert",
            "--metrics-insecure",
        ],
    );
    refused(&["--metrics", "[::]:9464"], &["reachable from other hosts"]);
    for bad in ["9464", "example.com:9464", "127.0.0.1:70000", "127.0.0.1"] {
        refused(
            &["--metrics", bad],
            &["is not an address", "127.0.0.1:9464"],
        );
    }
    refused(
        &[
            "--metrics",
            "0.0.0.0:9464",
            "--metrics-tls-cert",
            "/nonexistent.pem",
        ],
        &["--metrics-tls-key"],
    );
    refused(&["--metrics-insecure"], &["only used with --metrics"]);
}
