//! Jobs (`kind = "job"`) against the real agent: runs on demand and on a seconds-level
//! schedule, their outcomes (exit code, timeout, retries), `forbid`/`replace`/`allow`,
//! catch-up across an agent restart, `corral run --wait`, history pruning with the runs'
//! processes, cgroups and logs, and refused specs.

use std::time::{Duration, SystemTime};

use corral_e2e::{Agent, attribute, eventually, pb, skip_unless_root};

/// A job running `script` with /bin/sh, with more TOML after.
fn job(name: &str, script: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nkind = \"job\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n[stop]\ngrace = \"1s\"\n{extra}\n"
    )
}

async fn run_job(agent: &Agent, name: &str) -> pb::JobRun {
    agent
        .client()
        .await
        .run_job(pb::RunJobRequest {
            name: name.into(),
            overrides: None,
        })
        .await
        .expect("run job")
        .into_inner()
}

async fn get_run(agent: &Agent, id: &str) -> pb::JobRun {
    agent
        .client()
        .await
        .get_run(pb::GetRunRequest { id: id.into() })
        .await
        .expect("get run")
        .into_inner()
}

async fn runs(agent: &Agent, name: &str) -> Vec<pb::JobRun> {
    agent
        .client()
        .await
        .list_runs(pb::ListRunsRequest { name: name.into() })
        .await
        .expect("list runs")
        .into_inner()
        .runs
}

/// The run once it has ended.
async fn ended(agent: &Agent, id: &str, within: Duration) -> pb::JobRun {
    eventually(&format!("run {id} to end"), within, || async {
        let r = get_run(agent, id).await;
        (!r.outcome.is_empty()).then_some(r)
    })
    .await
}

/// Every event of the node so far.
async fn events(agent: &Agent) -> Vec<pb::Event> {
    let mut stream = agent
        .client()
        .await
        .watch(pb::WatchRequest {
            follow: false,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.expect("event") {
        out.push(e);
    }
    out
}

/// The reasons of the `stopping` events of `instance`, in order.
async fn stop_reasons(agent: &Agent, instance: &str) -> Vec<String> {
    events(agent)
        .await
        .into_iter()
        .filter(|e| e.r#type() == pb::EventType::Stopping && e.instance == instance)
        .filter_map(|e| attribute(&e, "reason"))
        .collect()
}

fn time_of(ts: &Option<prost_types::Timestamp>) -> SystemTime {
    let ts = (*ts).expect("a time");
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(ts.seconds).expect("after 1970"),
            u32::try_from(ts.nanos).expect("nanoseconds"),
        )
}

fn log_dirs(agent: &Agent, job: &str) -> Vec<String> {
    let prefix = format!("{job}-");
    std::fs::read_dir(agent.state_dir.join("logs"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_has_its_instances_index_exit_code_and_logs() {
    if skip_unless_root("a_run_has_its_instances_index_exit_code_and_logs") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&job(
            "report",
            "echo index=$CORRAL_JOB_INDEX run=$CORRAL_RUN; exit 3",
            "[job]\nparallelism = 2\n",
        ))
        .await
        .expect("apply");
    // Applied, nothing runs.
    let status = agent.get("report").await.expect("get");
    assert!(status.instances.is_empty(), "{status:?}");

    let out = agent.cli(&["run", "report", "--wait"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("report-r1 failed(exit 3)"), "{stderr}");

    let r = get_run(&agent, "report-r1").await;
    assert_eq!((r.outcome.as_str(), r.exit_code), ("failed(exit 3)", 3));
    assert_eq!((r.trigger.as_str(), r.attempts), ("manual", 2));
    assert_eq!(r.instances.len(), 2);
    assert!(time_of(&r.ended_at) >= time_of(&r.started_at));

    let logs = agent.cli(&["logs", "report", "--run", "1"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.status.success(), "{logs:?}");
    assert!(text.contains("index=0 run=report-r1"), "{text}");
    assert!(text.contains("index=1 run=report-r1"), "{text}");

    let listed = agent.cli(&["runs", "report"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        table.contains("report-r1") && table.contains("failed(exit 3)"),
        "{table}"
    );

    // Events: started and finished, in Watch.
    let evs = events(&agent).await;
    let finished = evs
        .iter()
        .find(|e| e.r#type() == pb::EventType::RunFinished)
        .expect("a run_finished event");
    assert_eq!(
        attribute(finished, "outcome").as_deref(),
        Some("failed(exit 3)")
    );
    assert!(evs.iter().any(|e| e.r#type() == pb::EventType::RunStarted));

    // A job is not scaled or restarted: its instances come with its runs.
    let e = agent
        .client()
        .await
        .restart(pb::RestartRequest {
            name: "report".into(),
            force: false,
            expected_revision: None,
        })
        .await
        .expect_err("a job has no rollouts");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let scaled = agent.cli(&["scale", "report", "3"]);
    assert_eq!(scaled.status.code(), Some(1), "{scaled:?}");

    // A service is not a job; an unknown run is not found.
    agent
        .apply("name = \"svc\"\ncommand = [\"/bin/sleep\", \"100\"]\nreplicas = 0\n")
        .await
        .expect("apply service");
    let e = agent
        .client()
        .await
        .run_job(pb::RunJobRequest {
            name: "svc".into(),
            overrides: None,
        })
        .await
        .expect_err("a service has no runs");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = agent
        .client()
        .await
        .get_run(pb::GetRunRequest {
            id: "report-r9".into(),
        })
        .await
        .expect_err("no such run");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_overrides_runs_with_them_and_records_them() {
    if skip_unless_root("a_run_with_overrides_runs_with_them_and_records_them") {
        return;
    }
    let agent = Agent::start().await;
    // `sh -c SCRIPT a b` gives the script $0 = a, $1 = b.
    agent
        .apply(&job(
            "ov",
            "echo mode=$MODE args=$0,$1 index=$CORRAL_JOB_INDEX; exit $CODE",
            "[env]
MODE = \"full\"
CODE = \"0\"
",
        ))
        .await
        .expect("apply");

    // Arguments appended, env added and replaced, parallelism: the run's instances have them.
    let out = agent.cli(&[
        "run",
        "ov",
        "--wait",
        "--env",
        "MODE=quick",
        "--env",
        "CODE=4",
        "--parallelism",
        "2",
        "--",
        "x",
        "y",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let r = get_run(&agent, "ov-r1").await;
    assert_eq!(
        (r.outcome.as_str(), r.instances.len()),
        ("failed(exit 4)", 2)
    );
    for (i, instance) in r.instances.iter().enumerate() {
        let text = agent.stdout_of(&instance.id);
        assert!(
            text.contains(&format!("mode=quick args=x,y index={i}")),
            "{text}"
        );
    }
    let o = r.overrides.expect("the run records its overrides");
    assert_eq!(
        (o.args.as_slice(), o.parallelism),
        (["x".to_owned(), "y".to_owned()].as_slice(), 2)
    );
    assert_eq!(o.env.get("MODE").map(String::as_str), Some("quick"));
    assert!(o.command.is_empty() && o.timeout.is_empty(), "{o:?}");

    // The next run without overrides runs the job as it is.
    let out = agent.cli(&["run", "ov", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = get_run(&agent, "ov-r2").await;
    assert!(r.overrides.is_none(), "{r:?}");
    assert!(agent.stdout_of(&r.instances[0].id).contains("mode=full"));

    // A replaced command with a timeout of its own: stopped for the timeout.
    let out = agent.cli(&[
        "run",
        "ov",
        "--wait",
        "--timeout",
        "1s",
        "--command",
        "--",
        "/bin/sleep",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    let r = get_run(&agent, "ov-r3").await;
    assert_eq!(r.outcome, "timed_out");
    let o = r.overrides.expect("recorded");
    assert_eq!((o.command.len(), o.timeout.as_str()), (2, "1s"));
    assert_eq!(stop_reasons(&agent, &r.instances[0].id).await, ["timeout"]);
    assert!(agent.cgroup.pids("").is_empty(), "processes left");

    // Bad overrides: refused naming each field, and no run is started.
    let e = agent
        .client()
        .await
        .run_job(pb::RunJobRequest {
            name: "ov".into(),
            overrides: Some(pb::RunOverrides {
                command: vec!["bin/relative".into()],
                env: [("CORRAL_RUN".to_owned(), "x".to_owned())].into(),
                timeout: "0s".into(),
                parallelism: 1001,
                ..Default::default()
            }),
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    for field in [
        "overrides.command[0]",
        "overrides.env.CORRAL_RUN",
        "overrides.timeout",
        "overrides.parallelism",
    ] {
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    assert_eq!(
        runs(&agent, "ov").await.len(),
        3,
        "no run for refused overrides"
    );
    let out = agent.cli(&["run", "ov", "--env", "NOEQUALS"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_run_streams_its_output_returns_its_code_and_is_removed() {
    if skip_unless_root("a_one_off_run_streams_its_output_returns_its_code_and_is_removed") {
        return;
    }
    let agent = Agent::start().await;
    let file = agent.dir.join("task.toml");
    std::fs::write(&file, job("task", "echo hello-from-task; exit 0", "")).expect("write");
    let out = agent.cli(&["run", "-f", file.to_str().expect("utf-8"), "--wait", "--rm"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello-from-task"), "{stdout}");
    let gone = agent.get("task").await.expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(log_dirs(&agent, "task").is_empty(), "logs left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_run_is_stopped_at_its_timeout_and_ends_timed_out() {
    if skip_unless_root("a_hanging_run_is_stopped_at_its_timeout_and_ends_timed_out") {
        return;
    }
    let agent = Agent::start().await;
    // Ignores SIGTERM: only the SIGKILL after the grace period ends it.
    agent
        .apply(&job(
            "hang",
            "trap '' TERM; while :; do sleep 1; done",
            "[job]\ntimeout = \"1s\"\nretries = 3\n",
        ))
        .await
        .expect("apply");
    let r = run_job(&agent, "hang").await;
    let r = ended(&agent, &r.id, Duration::from_secs(20)).await;
    assert_eq!((r.outcome.as_str(), r.exit_code), ("timed_out", 124));
    assert_eq!(r.attempts, 1, "a timed-out attempt is not retried");
    assert!(agent.cgroup.pids("").is_empty(), "processes left");
    // Its instance was stopped for the timeout, not as if the job had been deleted.
    assert_eq!(
        stop_reasons(&agent, &r.instances[0].id).await,
        ["timeout"],
        "the stop's reason"
    );
    let out = agent.cli(&["run", "hang", "--wait"]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_run_is_retried_with_backoff_then_fails() {
    if skip_unless_root("a_failing_run_is_retried_with_backoff_then_fails") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&job(
            "flaky",
            "echo attempt; exit 7",
            "[job]\nretries = 2\n[restart]\nbackoff = \"200ms\"\n",
        ))
        .await
        .expect("apply");
    let r = run_job(&agent, "flaky").await;
    let r = ended(&agent, &r.id, Duration::from_secs(20)).await;
    assert_eq!(r.outcome, "failed(exit 7)");
    assert_eq!(r.attempts, 3);
    let instance = &r.instances[0].id;
    let attempts = agent.stdout_of(instance).matches("attempt").count();
    assert_eq!(attempts, 3, "each attempt ran its command");
    // The backoff between attempts: restart_scheduled events of the instance.
    let scheduled = events(&agent)
        .await
        .into_iter()
        .filter(|e| e.r#type() == pb::EventType::RestartScheduled && &e.instance == instance)
        .count();
    assert_eq!(scheduled, 3, "a backoff after each failed attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_runs_on_time_and_forbid_skips_an_overlapping_run() {
    if skip_unless_root("a_schedule_runs_on_time_and_forbid_skips_an_overlapping_run") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&job(
            "tick",
            "sleep 3",
            "[schedule]\ncron = \"*/2 * * * * *\"\nconcurrency = \"forbid\"\n",
        ))
        .await
        .expect("apply");
    let status = agent.get("tick").await.expect("get");
    assert!(status.next_run_at.is_some(), "{status:?}");
    let list = eventually("three scheduled runs", Duration::from_secs(20), || async {
        let list = runs(&agent, "tick").await;
        (list.iter().filter(|r| !r.outcome.is_empty()).count() >= 2).then_some(list)
    })
    .await;
    for r in &list {
        assert_eq!(r.trigger, "schedule");
        let (due, started) = (time_of(&r.due), time_of(&r.started_at));
        let late = started.duration_since(due).expect("not before due");
        assert!(
            late <= Duration::from_secs(1),
            "{} started {late:?} late",
            r.id
        );
        assert_eq!(
            due.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
                % 2,
            0,
            "due on an even second"
        );
    }
    // Each run takes 3 s: the run due 2 s after one started was skipped, and said so.
    let skipped: Vec<pb::Event> = events(&agent)
        .await
        .into_iter()
        .filter(|e| e.r#type() == pb::EventType::RunSkipped)
        .collect();
    assert!(!skipped.is_empty(), "no run_skipped event");
    assert!(
        attribute(&skipped[0], "running").is_some_and(|r| r.starts_with("tick-r")),
        "{:?}",
        skipped[0]
    );
    // Never two at once.
    let list = runs(&agent, "tick").await;
    for pair in list.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if !a.outcome.is_empty() {
            assert!(
                time_of(&a.ended_at) <= time_of(&b.started_at),
                "{a:?} {b:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_cancels_the_running_run_and_allow_overlaps() {
    if skip_unless_root("replace_cancels_the_running_run_and_allow_overlaps") {
        return;
    }
    let agent = Agent::start().await;
    for (name, concurrency) in [("rep", "replace"), ("all", "allow")] {
        agent
            .apply(&job(
                name,
                "sleep 30",
                &format!("[schedule]\ncron = \"*/2 * * * * *\"\nconcurrency = \"{concurrency}\"\n"),
            ))
            .await
            .expect("apply");
    }
    let rep = eventually("a replaced run", Duration::from_secs(20), || async {
        let list = runs(&agent, "rep").await;
        list.iter()
            .any(|r| r.outcome == "cancelled")
            .then_some(list)
    })
    .await;
    assert!(
        rep.iter().filter(|r| r.outcome.is_empty()).count() <= 1,
        "{rep:?}"
    );
    let all = eventually("overlapping runs", Duration::from_secs(20), || async {
        let list = runs(&agent, "all").await;
        (list.iter().filter(|r| r.outcome.is_empty()).count() >= 2).then_some(list)
    })
    .await;
    assert!(all.iter().all(|r| r.outcome.is_empty()), "{all:?}");
    // Cancel by hand: ends cancelled, its processes gone.
    let id = &all[0].id;
    let out = agent.cli(&["cancel", id]);
    assert!(out.status.success(), "{out:?}");
    let r = ended(&agent, id, Duration::from_secs(10)).await;
    assert_eq!((r.outcome.as_str(), r.exit_code), ("cancelled", 125));
    assert_eq!(stop_reasons(&agent, &r.instances[0].id).await, ["cancel"]);
    let replaced = rep
        .iter()
        .find(|r| r.outcome == "cancelled")
        .expect("replaced");
    assert_eq!(
        stop_reasons(&agent, &replaced.instances[0].id).await,
        ["cancel"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_missed_while_the_agent_was_down_is_caught_up_once_within_the_window() {
    if skip_unless_root("a_run_missed_while_the_agent_was_down_is_caught_up_once_within_the_window")
    {
        return;
    }
    let mut agent = Agent::start().await;
    // Due at second 0 of every minute is too slow for a test: every 4 s instead, with the
    // agent down for 5 s.
    agent
        .apply(&job(
            "catch",
            "exit 0",
            "[schedule]\ncron = \"*/4 * * * * *\"\ncatch_up = \"1h\"\n",
        ))
        .await
        .expect("apply");
    agent
        .apply(&job(
            "late",
            "exit 0",
            "[schedule]\ncron = \"*/4 * * * * *\"\ncatch_up = \"1s\"\n",
        ))
        .await
        .expect("apply");
    eventually("a first run", Duration::from_secs(10), || async {
        (!runs(&agent, "catch").await.is_empty()).then_some(())
    })
    .await;
    agent.stop_with(libc::SIGKILL);
    tokio::time::sleep(Duration::from_secs(6)).await;
    agent.launch().await;
    let caught = eventually("a catch-up run", Duration::from_secs(10), || async {
        let list = runs(&agent, "catch").await;
        list.into_iter().find(|r| r.trigger == "catch_up")
    })
    .await;
    // Started at once, for the latest missed due time only.
    let late = time_of(&caught.started_at)
        .duration_since(time_of(&caught.due))
        .expect("after due");
    assert!(late >= Duration::from_secs(1), "{late:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let list = runs(&agent, "catch").await;
    assert_eq!(
        list.iter().filter(|r| r.trigger == "catch_up").count(),
        1,
        "caught up once: {list:?}"
    );
    // Outside its window: skipped, and said so.
    assert!(
        runs(&agent, "late")
            .await
            .iter()
            .all(|r| r.trigger != "catch_up")
    );
    let skipped = events(&agent).await.into_iter().any(|e| {
        e.r#type() == pb::EventType::RunSkipped
            && e.service == "late"
            && attribute(&e, "reason").is_some_and(|r| r.contains("catch_up"))
    });
    assert!(skipped, "no run_skipped event for the late job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_short_runs_leave_nothing_beyond_history() {
    if skip_unless_root("a_hundred_short_runs_leave_nothing_beyond_history") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(&job("short", "echo out", "[job]\nhistory = 5\n"))
        .await
        .expect("apply");
    let mut last = String::new();
    for _ in 0..100 {
        let r = run_job(&agent, "short").await;
        last = r.id;
    }
    ended(&agent, &last, Duration::from_secs(60)).await;
    let list = eventually("pruned to history", Duration::from_secs(30), || async {
        let list = runs(&agent, "short").await;
        (list.len() == 5 && list.iter().all(|r| !r.outcome.is_empty())).then_some(list)
    })
    .await;
    assert_eq!(list.last().map(|r| r.number), Some(100));
    assert!(list.iter().all(|r| r.outcome == "succeeded"), "{list:?}");
    eventually(
        "only the kept runs' logs",
        Duration::from_secs(10),
        || async { (log_dirs(&agent, "short").len() <= 5).then_some(()) },
    )
    .await;
    assert!(agent.cgroup.pids("").is_empty(), "processes left");
    let status = agent.get("short").await.expect("get");
    assert!(status.instances.is_empty(), "{:?}", status.instances);
    let cgroups: Vec<String> = std::fs::read_dir(agent.cgroup.dir("pids", "short"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(cgroups.is_empty(), "instance cgroups left: {cgroups:?}");
    let store: Vec<_> = std::fs::read_dir(agent.state_dir.join("state").join("runs"))
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert_eq!(store.len(), 5, "run records beyond history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_specs_are_refused_naming_the_field() {
    if skip_unless_root("bad_job_specs_are_refused_naming_the_field") {
        return;
    }
    let agent = Agent::start().await;
    let table = [
        ("[schedule]\ncron = \"61 * * * *\"\n", "schedule.cron"),
        (
            "[schedule]\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n",
            "schedule.timezone",
        ),
        ("[job]\ntimeout = \"0s\"\n", "job.timeout"),
        ("replicas = 2\n", "replicas"),
        (
            "[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n",
            "sockets",
        ),
    ];
    for (extra, field) in table {
        // Top-level keys must come before the tables in TOML.
        let text = if extra.starts_with('[') {
            job("bad", "exit 0", extra)
        } else {
            format!("{extra}{}", job("bad", "exit 0", ""))
        };
        let e = agent.apply(&text).await.expect_err(field);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    assert_eq!(
        agent.get("bad").await.expect_err("not applied").code(),
        tonic::Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_an_agent_restart_with_their_real_exit_status() {
    if skip_unless_root("runs_survive_an_agent_restart_with_their_real_exit_status") {
        return;
    }
    let mut agent = Agent::start().await;
    agent
        .apply(&job("away", "sleep 2; exit 4", ""))
        .await
        .expect("apply");
    agent
        .apply(&job("adopted", "sleep 6; exit 5", ""))
        .await
        .expect("apply");
    let away = run_job(&agent, "away").await;
    let adopted = run_job(&agent, "adopted").await;
    eventually("both running", Duration::from_secs(10), || async {
        let a = get_run(&agent, &away.id).await;
        let b = get_run(&agent, &adopted.id).await;
        (a.attempts == 1 && b.attempts == 1).then_some(())
    })
    .await;
    let pid_before = agent.get("adopted").await.expect("get").instances[0].init_pid;
    assert!(pid_before > 0);
    agent.stop_with(libc::SIGKILL);
    // `away` ends while no agent runs; `adopted` still runs when the agent is back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.launch().await;
    let a = ended(&agent, &away.id, Duration::from_secs(10)).await;
    assert_eq!(a.outcome, "failed(exit 4)", "{a:?}");
    let status = agent.get("adopted").await.expect("get");
    assert_eq!(
        status.instances.first().map(|i| i.init_pid),
        Some(pid_before),
        "adopted"
    );
    let b = ended(&agent, &adopted.id, Duration::from_secs(15)).await;
    assert_eq!((b.outcome.as_str(), b.attempts), ("failed(exit 5)", 1));
    // Numbering goes on after the kept runs.
    let next = run_job(&agent, "away").await;
    assert_eq!(next.id, "away-r2");
}
