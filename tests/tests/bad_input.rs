//! Invalid specs and requests: refused whole, with the field and the reason, through both the
//! CLI and the raw API; nothing applied; the agent keeps serving.

use corral_e2e::{Agent, pb, skip_unless_root};

/// (spec text, field the error must name, a fragment of the reason)
const INVALID: &[(&str, &str, &str)] = &[
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[resources]\nmemory = \"12XB\"\n",
        "resources.memory",
        "is not a size",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[resources]\nmemory = \"-5\"\n",
        "resources.memory",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[resources]\nmemory = \"1.5GiB\"\n",
        "resources.memory",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[resources]\ncpu = -1.0\n",
        "resources.cpu",
        "out of range",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[resources]\npids = 0\n",
        "resources.pids",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[restart]\nbackoff = \"10 parsecs\"\n",
        "restart.backoff",
        "not a duration",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[stop]\ngrace = \"-1s\"\n",
        "stop.grace",
        "",
    ),
    (
        "name = \"web/../etc\"\ncommand = [\"/bin/true\"]\n",
        "name",
        "not a valid name",
    ),
    ("name = \"..\"\ncommand = [\"/bin/true\"]\n", "name", ""),
    ("name = \"Web\"\ncommand = [\"/bin/true\"]\n", "name", ""),
    ("name = \"web\"\ncommand = []\n", "command", ""),
    (
        "name = \"web\"\ncommand = [\"bin/true\"]\n",
        "command[0]",
        "relative path",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\nreplicas = -1\n",
        "replicas",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\nreplicas = 10000\n",
        "replicas",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\nreplicas = \"three\"\n",
        "replicas",
        "integer",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\nreplica = 3\n",
        "replica",
        "unknown field",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[resources]\nmemroy = \"1MiB\"\n",
        "resources.memroy",
        "unknown field",
    ),
    ("name = \"web\"\ncommand = \"/bin/true\"\n", "command", ""),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[ports]\nadmin = \"auto\"\n[health]\nhttp = \"http://127.0.0.1:{port.admin}/\"\ntcp = \"127.0.0.1:1\"\n",
        "health",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[health]\nhttp = \"http://127.0.0.1:{port.nope}/\"\n",
        "health.http",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[restart]\npolicy = \"sometimes\"\n",
        "restart.policy",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[restart]\nbackoff = \"5s\"\nbackoff_max = \"1s\"\n",
        "restart.backoff",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[isolation]\nnamespaces = [\"pid\", \"cgroup\"]\n",
        "isolation.namespaces",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[isolation]\nnamespaces = [\"pid\"]\n",
        "isolation.namespaces",
        "mount",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\nenv = { CORRAL_SERVICE = \"x\" }\n",
        "env.CORRAL_SERVICE",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[stop]\nsignal = \"SIGNOPE\"\n",
        "stop.signal",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[logs]\nmax_files = 0\n",
        "logs.max_files",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\nworkdir = \"relative/dir\"\n",
        "workdir",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[rollout]\nmax_surge = 0\nmax_unavailable = 0\n",
        "rollout",
        "",
    ),
    (
        "name = \"web\"\ncommand = [\"/bin/true\"]\n[rollout]\nstart_cpu = 0\n",
        "rollout.start_cpu",
        "",
    ),
    ("this is not toml", "(toml)", ""),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_through_api_and_cli() {
    if skip_unless_root("invalid_specs_are_refused_through_api_and_cli") {
        return;
    }
    assert!(INVALID.len() >= 20);
    let agent = Agent::start().await;
    let files = tempfile::tempdir().expect("tempdir");
    for (n, (text, field, reason)) in INVALID.iter().enumerate() {
        let err = agent.apply(text).await.expect_err(text);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{text}\n{err:?}");
        assert!(
            err.message().contains(&format!("{field}:")),
            "API error for {text:?} names {field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(reason),
            "API error for {text:?} says {reason:?}: {}",
            err.message()
        );

        let file = files.path().join(format!("bad-{n}.toml"));
        std::fs::write(&file, text).expect("write spec");
        let out = agent.cli(&["apply", "-f", file.to_str().expect("utf-8 path")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "CLI exit code for {text:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("{field}:")),
            "CLI error for {text:?} names {field}: {stderr}"
        );
    }
    let list = agent
        .client()
        .await
        .list(pb::ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        list.services.is_empty(),
        "nothing was applied: {:?}",
        list.services
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_clear_codes() {
    if skip_unless_root("invalid_requests_get_clear_codes") {
        return;
    }
    let agent = Agent::start().await;
    let mut c = agent.client().await;
    let code =
        |r: Result<tonic::Response<pb::ServiceStatus>, tonic::Status>| r.expect_err("error").code();
    assert_eq!(
        code(
            c.get(pb::GetRequest {
                name: "nope".into()
            })
            .await
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            c.get(pb::GetRequest {
                name: "../etc".into()
            })
            .await
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.get(pb::GetRequest {
                name: String::new()
            })
            .await
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.get(pb::GetRequest {
                name: "x\0y".into()
            })
            .await
        ),
        tonic::Code::InvalidArgument
    );
    let e = c
        .delete(pb::DeleteRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .scale(pb::ScaleRequest {
            name: "nope".into(),
            replicas: 1,
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .apply(pb::ApplyRequest {
            source: None,
            dry_run: false,
            force: false,
            ..Default::default()
        })
        .await
        .expect_err("empty");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // A typed spec with a bad value is refused the same way as a TOML one.
    let e = c
        .apply(pb::ApplyRequest {
            source: Some(pb::apply_request::Source::Spec(pb::ServiceSpec {
                name: "typed".into(),
                command: vec!["/bin/true".into()],
                replicas: Some(5000),
                resources: Some(pb::Resources {
                    memory_bytes: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            dry_run: false,
            force: false,
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("replicas:") && e.message().contains("resources.memory:"),
        "{}",
        e.message()
    );
    // Something the host cannot do is a failed precondition, not an invalid argument.
    let e = agent
        .apply("name = \"ghost\"\ncommand = [\"/nonexistent/binary\"]\n")
        .await
        .expect_err("missing binary");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("command[0]"), "{}", e.message());
    let e = agent
        .apply("name = \"ghost\"\ncommand = [\"/bin/true\"]\nuser = \"no-such-user-here\"\n")
        .await
        .expect_err("missing user");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("user"), "{}", e.message());
    // Scale out of range.
    agent
        .apply("name = \"ok\"\ncommand = [\"/bin/true\"]\nreplicas = 0\n")
        .await
        .expect("valid");
    let e = c
        .scale(pb::ScaleRequest {
            name: "ok".into(),
            replicas: 100_000,
            ..Default::default()
        })
        .await
        .expect_err("too many");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Rollouts: unknown services and rollouts, malformed ids, revisions never kept.
    let e = c
        .restart(pb::RestartRequest {
            name: "nope".into(),
            force: false,
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .restart(pb::RestartRequest {
            name: "../x".into(),
            force: true,
            ..Default::default()
        })
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    for id in [
        "",
        "ok",
        "ok-r",
        "ok-rx",
        "ok-r-1",
        "../ok-r1",
        "ok-r99999999999999999999999",
    ] {
        let e = c
            .get_rollout(pb::GetRolloutRequest { id: id.into() })
            .await
            .expect_err("bad id");
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{id:?}: {}",
            e.message()
        );
    }
    let e = c
        .get_rollout(pb::GetRolloutRequest { id: "ok-r7".into() })
        .await
        .expect_err("unknown rollout");
    assert_eq!(e.code(), tonic::Code::NotFound);
    for revision in [0, 1, 7, u64::MAX] {
        let e = c
            .rollback(pb::RollbackRequest {
                name: "ok".into(),
                revision: Some(revision),
                force: false,
                ..Default::default()
            })
            .await
            .expect_err("no such revision");
        assert!(
            matches!(
                e.code(),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ),
            "{revision}: {:?} {}",
            e.code(),
            e.message()
        );
        assert!(e.message().contains("revision"), "{}", e.message());
    }
    let e = c
        .rollback(pb::RollbackRequest {
            name: "ok".into(),
            revision: None,
            force: false,
            ..Default::default()
        })
        .await
        .expect_err("nothing to roll back to");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    let list = c
        .list(pb::ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.services.len(), 1);
    assert_eq!(list.services[0].desired, 0);
    assert_eq!(list.services[0].revision, 1, "nothing rolled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_usage_errors_exit_2() {
    if skip_unless_root("cli_usage_errors_exit_2") {
        return;
    }
    let agent = Agent::start().await;
    for args in [
        &["scale", "web"][..],
        &["scale", "web", "many"],
        &["ls", "-o", "yaml"],
        &["frobnicate"],
        &["status"],
    ] {
        let out = agent.cli(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = agent.cli(&["status", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}
