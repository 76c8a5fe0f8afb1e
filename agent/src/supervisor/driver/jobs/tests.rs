//! The job logic on the driver itself, over fakes for the OS and without its task: runs are
//! started, their instances' ends fed, and timers and schedules driven by calling the
//! driver's methods, so that each case runs in milliseconds.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::artifact::fake::FakePackages;
use crate::cgroups::recording::RecordingCgroups;
use crate::events::EventLog;
use crate::runtime::fake::FakeRuntime;
use crate::spec::Namespace;
use crate::store::{MemStore, Store};
use crate::supervisor::driver::Deps;
use crate::supervisor::instance::{ExitClass, ExitInfo};
use crate::supervisor::{Owner, SupervisorHandle};

struct Rig {
    d: Driver,
    rt: Arc<FakeRuntime>,
    store: Arc<MemStore>,
    _handle: SupervisorHandle,
}

fn rig() -> Rig {
    rig_on(Arc::new(MemStore::new()))
}

/// A driver on `store`: a second one on the same store is the agent started again.
fn rig_on(store: Arc<MemStore>) -> Rig {
    let rt = Arc::new(FakeRuntime::new());
    let deps = Deps::new(
        rt.clone(),
        Arc::new(RecordingCgroups::default()),
        store.clone(),
        Namespace::ALL.to_vec(),
        Arc::new(EventLog::in_memory(1000)),
    )
    .with_packages(Arc::new(FakePackages::new()));
    let (d, handle) = Driver::new(deps);
    Rig {
        d,
        rt,
        store,
        _handle: handle,
    }
}

/// A job `name` running /bin/job, with more TOML after.
fn job(name: &str, extra: &str) -> ServiceSpec {
    crate::spec::parse_toml(&format!(
        "name = \"{name}\"\nkind = \"job\"\ncommand = [\"/bin/job\"]\n[restart]\nbackoff = \"1s\"\nbackoff_max = \"8s\"\n[stop]\ngrace = \"1s\"\n{extra}"
    ))
    .expect("valid job")
}

impl Rig {
    fn apply(&mut self, spec: ServiceSpec) {
        self.d
            .apply(Owner::Local, spec, false, false)
            .expect("applied");
    }

    fn run(&mut self, name: &str) -> Run {
        self.d
            .run_job(name, Trigger::Manual, None, &RawOverrides::default())
            .expect("run started")
    }

    fn run_of(&self, id: &str) -> Run {
        self.d.get_run(id).expect("kept")
    }

    fn state(&self, key: &InstanceKey) -> Option<State> {
        self.d.services.slot(key).map(|s| s.instance.state)
    }

    /// The instance at `key` ended as `class`.
    fn ended(&mut self, key: &InstanceKey, class: ExitClass) {
        let exit = ExitInfo {
            class,
            at: SystemTime::now(),
            setup_error: None,
            output: None,
        };
        self.d.feed(key, Event::Exited(exit));
    }

    /// Its cgroup is gone (what the cleanup task reports).
    fn cleaned(&mut self, key: &InstanceKey) {
        if matches!(self.state(key), Some(State::Removing)) {
            self.d.feed(key, Event::CleanupDone);
        }
    }

    fn running_runs(&self, name: &str) -> Vec<u64> {
        self.d.jobs.by_name[name]
            .runs
            .values()
            .filter(|r| !r.ended())
            .map(|r| r.number)
            .collect()
    }
}

#[tokio::test]
async fn a_failed_attempt_is_retried_after_a_growing_backoff_until_retries_run_out() {
    let mut r = rig();
    r.apply(job("flaky", "[job]\nretries = 2\n"));
    let run = r.run("flaky");
    let key = run.keys()[0].clone();
    let mut delays = Vec::new();
    for attempt in 1..=3 {
        assert_eq!(r.rt.spawns().len(), attempt, "attempt {attempt} started");
        r.ended(&key, ExitClass::Exited(3));
        match r.state(&key) {
            Some(State::Backoff { until }) => {
                delays.push(until.saturating_duration_since(Instant::now()));
                r.d.feed(&key, Event::BackoffElapsed);
            }
            other => {
                assert_eq!(
                    attempt, 3,
                    "only the last attempt is not retried: {other:?}"
                );
            }
        }
    }
    r.cleaned(&key);
    let run = r.run_of(&run.id());
    assert_eq!(run.outcome, Some(Outcome::Failed(ExitClass::Exited(3))));
    assert_eq!(run.attempts(), 3);
    assert_eq!(r.rt.spawns().len(), 3, "no fourth attempt");
    assert_eq!(delays.len(), 2);
    // [restart] backoff = 1s with up to 10 % jitter, then doubled.
    assert!(delays[0] >= Duration::from_millis(850), "{delays:?}");
    assert!(delays[1] > delays[0], "{delays:?}");
    assert!(r.state(&key).is_none(), "the slot is gone");
}

#[tokio::test]
async fn an_attempt_past_its_timeout_is_stopped_for_timeout_and_not_retried() {
    let mut r = rig();
    r.apply(job("hang", "[job]\ntimeout = \"1h\"\nretries = 3\n"));
    let run = r.run("hang");
    let key = run.keys()[0].clone();
    assert!(r.d.tick_jobs().is_some(), "a timer for the timeout");
    assert!(matches!(r.state(&key), Some(State::Running { .. })));
    // The attempt started more than an hour ago.
    if let Some(run) =
        r.d.jobs
            .by_name
            .get_mut("hang")
            .and_then(|s| s.runs.get_mut(&run.number))
    {
        run.instances[0].attempt_started = SystemTime::now().checked_sub(Duration::from_secs(3601));
    }
    r.d.tick_jobs();
    assert!(
        matches!(
            r.state(&key),
            Some(State::Stopping {
                reason: StopReason::Timeout,
                ..
            })
        ),
        "{:?}",
        r.state(&key)
    );
    assert_eq!(r.run_of(&run.id()).stopping, Some(Outcome::TimedOut));
    assert_eq!(r.rt.signals().len(), 1, "the stop signal sent");
    r.ended(&key, ExitClass::Signaled(15));
    r.cleaned(&key);
    let run = r.run_of(&run.id());
    assert_eq!((run.outcome, run.attempts()), (Some(Outcome::TimedOut), 1));
    assert_eq!(r.rt.spawns().len(), 1, "a timed-out attempt is not retried");
}

#[tokio::test]
async fn a_run_overrides_timeout_is_its_own() {
    let mut r = rig();
    r.apply(job("t", ""));
    let overrides = RawOverrides {
        timeout: "1s".into(),
        ..RawOverrides::default()
    };
    let run =
        r.d.run_job("t", Trigger::Manual, None, &overrides)
            .expect("run");
    assert!(r.d.tick_jobs().is_some(), "the run's own timeout is timed");
    let plain = r.run("t");
    assert_eq!(plain.overrides, RunOverrides::default());
    assert_eq!(run.overrides.timeout, Some(Duration::from_secs(1)));
}

#[tokio::test]
async fn concurrency_forbid_skips_replace_cancels_allow_overlaps() {
    let mut r = rig();
    let yearly = |c: &str| format!("[schedule]\ncron = \"0 0 1 1 *\"\nconcurrency = \"{c}\"\n");
    for c in ["forbid", "replace", "allow"] {
        r.apply(job(c, &yearly(c)));
        r.run(c);
        r.d.due_run(c, SystemTime::now(), Trigger::Schedule);
    }
    assert_eq!(r.running_runs("forbid"), [1], "the due run was skipped");
    assert_eq!(r.d.jobs.by_name["forbid"].runs.len(), 1);

    let replaced = r.run_of("replace-r1");
    assert_eq!(replaced.stopping, Some(Outcome::Cancelled));
    let key = replaced.keys()[0].clone();
    assert!(matches!(
        r.state(&key),
        Some(State::Stopping {
            reason: StopReason::Cancel,
            ..
        })
    ));
    r.ended(&key, ExitClass::Signaled(15));
    r.cleaned(&key);
    assert_eq!(r.run_of("replace-r1").outcome, Some(Outcome::Cancelled));
    assert_eq!(r.running_runs("replace"), [2], "the new run runs");
    assert_eq!(r.run_of("replace-r2").trigger, Trigger::Schedule);

    assert_eq!(r.running_runs("allow"), [1, 2], "both run");
}

#[tokio::test]
async fn ended_runs_beyond_history_are_pruned_with_their_records() {
    let mut r = rig();
    r.apply(job("short", "[job]\nhistory = 2\n"));
    for _ in 0..5 {
        let run = r.run("short");
        let key = run.keys()[0].clone();
        r.ended(&key, ExitClass::Exited(0));
        r.cleaned(&key);
        assert_eq!(r.run_of(&run.id()).outcome, Some(Outcome::Succeeded));
    }
    let kept: Vec<u64> = r.d.jobs.by_name["short"].runs.keys().copied().collect();
    assert_eq!(kept, [4, 5]);
    let mut saved: Vec<String> = r
        .store
        .list(RUNS)
        .expect("list")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    saved.sort();
    assert_eq!(saved, ["short-r4", "short-r5"]);
    assert!(
        r.d.services
            .get("short")
            .is_some_and(|s| s.slots.is_empty())
    );
}

#[tokio::test]
async fn a_missed_run_is_caught_up_once_inside_the_window_and_skipped_outside() {
    let mut r = rig();
    // Daily, last due 30 s ago (UTC).
    let missed = SystemTime::now() - Duration::from_secs(30);
    let wall = jiff::Timestamp::try_from(missed)
        .expect("in range")
        .to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let daily = format!(
        "[schedule]\ncron = \"{} {} {} * * *\"\n",
        wall.second(),
        wall.minute(),
        wall.hour()
    );
    r.apply(job("inside", &format!("{daily}catch_up = \"10m\"\n")));
    r.apply(job("outside", &format!("{daily}catch_up = \"10s\"\n")));
    let since = SystemTime::now() - Duration::from_secs(5 * 60);
    for name in ["inside", "outside"] {
        r.d.set_since(name, since);
        let spec =
            r.d.services
                .get(name)
                .map(|s| s.d.spec.clone())
                .expect("job");
        r.d.catch_up(name, &spec);
    }
    let inside: Vec<Run> = r.d.jobs.by_name["inside"].runs.values().cloned().collect();
    assert_eq!(inside.len(), 1, "one run for the missed ones");
    assert_eq!(inside[0].trigger, Trigger::CatchUp);
    let due = inside[0].due.expect("due");
    let (due, missed) = (rfc3339(due), rfc3339(missed));
    assert_eq!(due[..19], missed[..19], "the missed run, to the second");
    assert!(r.d.jobs.by_name["outside"].runs.is_empty(), "too late");
    // Both go on from the latest missed run: nothing is caught up twice.
    for name in ["inside", "outside"] {
        assert!(r.d.jobs.by_name[name].since.is_some_and(|s| s > since));
        let spec =
            r.d.services
                .get(name)
                .map(|s| s.d.spec.clone())
                .expect("job");
        r.d.catch_up(name, &spec);
    }
    assert_eq!(r.d.jobs.by_name["inside"].runs.len(), 1, "caught up once");
}

#[tokio::test]
async fn a_scheduled_run_is_one_write_and_its_due_time_survives_a_restart() {
    let mut r = rig();
    r.apply(job("sched", "[schedule]\ncron = \"0 0 1 1 *\"\n"));
    let saved = |r: &Rig| r.store.list(SCHEDULES).expect("list");
    let before = saved(&r);
    // Later than when the schedules began (at their apply).
    let due = SystemTime::now() + Duration::from_secs(1);
    r.d.note_since("sched", due);
    r.d.due_run("sched", due, Trigger::Schedule);
    assert_eq!(r.running_runs("sched"), [1]);
    assert_eq!(
        saved(&r),
        before,
        "the run's record alone says it was handled"
    );
    // A skipped run starts nothing: its due time goes to the schedule's record.
    r.apply(job("skip", "[schedule]\ncron = \"0 0 1 1 *\"\n"));
    r.run("skip");
    r.d.note_since("skip", due);
    r.d.due_run("skip", due, Trigger::Schedule);
    assert_eq!(r.running_runs("skip"), [1]);

    let mut again = rig_on(r.store.clone());
    again.d.restore().await;
    for name in ["sched", "skip"] {
        assert_eq!(again.d.jobs.by_name[name].since, Some(due), "{name}");
    }
}
