use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::health::HealthState;
use crate::rollout::record::{Kind as RolloutKind, State as RolloutState, Step};
use crate::supervisor::ApplyKind;
use crate::supervisor::instance::{ExitClass, StopReason};

/// No test should ever wait this long for an event: a hang is a failure, not a timeout.
const PATIENCE: Duration = Duration::from_secs(30);

fn started(pid: i32) -> EventKind {
    EventKind::InstanceStarted { pid, revision: 1 }
}

fn append_n(log: &EventLog, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            log.append(
                "web",
                Some("web-0"),
                started(i32::try_from(i).expect("a small count")),
            )
        })
        .collect()
}

async fn next(w: &mut Watch) -> Result<Event, EventError> {
    tokio::time::timeout(PATIENCE, w.next())
        .await
        .expect("an event within the test's patience")
}

/// Read until `last` (inclusive) and return the indexes seen.
async fn indexes_until(w: &mut Watch, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let e = next(w).await.expect("event");
        seen.push(e.index);
        if e.index >= last {
            return seen;
        }
    }
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    names.sort();
    names
}

fn lines_on_disk(dir: &Path) -> usize {
    segment_files(dir)
        .iter()
        .map(|n| {
            fs::read_to_string(dir.join(n))
                .expect("read")
                .lines()
                .count()
        })
        .sum()
}

fn last_segment(dir: &Path) -> PathBuf {
    let last = segment_files(dir)
        .into_iter()
        .max_by_key(|n| n.trim_end_matches(".jsonl").parse::<u64>().unwrap_or(0))
        .expect("a segment");
    dir.join(last)
}

#[test]
fn indexes_start_at_one_and_continue_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(dir.path(), 100).expect("open");
    assert_eq!((log.oldest(), log.next()), (1, 1));
    assert_eq!(append_n(&log, 3), vec![1, 2, 3]);
    assert_eq!(log.next(), 4);
    drop(log);

    let log = EventLog::open(dir.path(), 100).expect("reopen");
    assert_eq!((log.oldest(), log.next()), (1, 4));
    assert_eq!(log.append("api", None, EventKind::Deleted), 4);
    drop(log);

    let log = EventLog::open(dir.path(), 100).expect("reopen again");
    assert_eq!(log.next(), 5);
    assert_eq!(log.write_errors(), 0);
}

#[tokio::test]
async fn events_read_back_as_appended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kinds = all_kinds();
    let log = EventLog::open_with(dir.path(), 1000, 4).expect("open");
    let before = SystemTime::now();
    for (i, kind) in kinds.iter().enumerate() {
        let instance = format!("web-{i}");
        log.append("web", Some(&instance), kind.clone());
    }
    drop(log);
    // Reopened with a window of 4, most of them come back from the files.
    let log = EventLog::open_with(dir.path(), 1000, 4).expect("reopen");
    let mut w = log.watch(1, Filter::all()).expect("watch");
    for (i, kind) in kinds.iter().enumerate() {
        let e = next(&mut w).await.expect("event");
        assert_eq!(e.index, i as u64 + 1);
        assert_eq!(e.service, "web");
        assert_eq!(e.instance.as_deref(), Some(format!("web-{i}").as_str()));
        assert_eq!(&e.kind, kind);
        let age = e.time.duration_since(before).expect("time after the start");
        assert!(age < PATIENCE, "{age:?}");
    }
}

#[test]
fn a_torn_last_line_is_dropped_and_appending_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(dir.path(), 100).expect("open");
    append_n(&log, 3);
    drop(log);
    let last = last_segment(dir.path());
    let good = fs::read(&last).expect("read");
    fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open segment")
        .write_all(br#"{"index":4,"time":"2024-01-01T00:0"#)
        .expect("tear");

    let log = EventLog::open(dir.path(), 100).expect("reopen");
    assert_eq!(log.next(), 4, "the torn event does not count");
    assert_eq!(
        fs::read(&last).expect("read"),
        good,
        "the torn line is cut off"
    );
    assert_eq!(log.append("web", None, EventKind::Deleted), 4);
    drop(log);

    let text = fs::read_to_string(&last).expect("read");
    let indexes: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Event>(l)
                .expect("every line parses")
                .index
        })
        .collect();
    assert_eq!(indexes, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_corrupt_middle_line_is_skipped_not_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(dir.path(), 100).expect("open");
    append_n(&log, 5);
    drop(log);
    let last = last_segment(dir.path());
    let text = fs::read_to_string(&last).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[2] = "{\"index\":3,\"ti\u{0}me\": garbage".to_owned();
    fs::write(&last, lines.join("\n") + "\n").expect("write");

    let log = EventLog::open(dir.path(), 100).expect("reopen");
    assert_eq!(log.next(), 6);
    let mut w = log.watch(1, Filter::all()).expect("watch");
    log.append("web", None, EventKind::Deleted);
    assert_eq!(indexes_until(&mut w, 6).await, vec![1, 2, 4, 5, 6]);
}

/// The indexes a watch from `from` sees up to a sentinel appended now.
async fn replayed(log: &EventLog, from: u64) -> Vec<u64> {
    let mut w = log.watch(from, Filter::all()).expect("watch");
    let end = log.append("sentinel", None, EventKind::Deleted);
    indexes_until(&mut w, end).await
}

/// A segment far longer than the window is loaded from its newest lines: the window and the
/// next index are those a read of the whole file gives, also when its last lines are
/// unreadable (then the whole file is read) or torn.
#[tokio::test]
async fn a_long_segment_is_loaded_from_its_newest_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open_with(dir.path(), DEFAULT_KEEP, 16).expect("open");
    append_n(&log, 3000);
    drop(log);
    let last = last_segment(dir.path());
    let whole = fs::read(&last).expect("read");
    let reopen = || EventLog::open_with(dir.path(), DEFAULT_KEEP, 16).expect("reopen");

    let log = reopen();
    assert_eq!(log.next(), 3001);
    assert_eq!(
        replayed(&log, 2990).await,
        (2990..=3001).collect::<Vec<_>>()
    );
    assert_eq!(
        replayed(&log, 1).await.len(),
        3002,
        "older events from the file"
    );
    drop(log);

    // The newest 40 lines unreadable, a torn line after them: the last good index still
    // counts, the torn line is cut off.
    let mut text = whole.clone();
    for _ in 0..40 {
        text.extend_from_slice(b"{\"index\": garbage\n");
    }
    let good = text.clone();
    text.extend_from_slice(br#"{"index":3001,"ti"#);
    fs::write(&last, &text).expect("write");
    let log = reopen();
    assert_eq!(log.next(), 3001);
    assert_eq!(
        fs::read(&last).expect("read"),
        good,
        "the torn line is cut off"
    );
    assert_eq!(replayed(&log, 2999).await, vec![2999, 3000, 3001]);
}

/// Every kind of bad content: open never fails or panics, indexes stay increasing, and what
/// is readable is served.
#[tokio::test]
async fn garbage_in_the_files_does_not_panic() {
    let valid = |index: u64| {
        let e = Event {
            incarnation: 0,
            index,
            time: SystemTime::now(),
            service: "web".into(),
            instance: None,
            kind: EventKind::Deleted,
        };
        serde_json::to_string(&e).expect("serialize") + "\n"
    };
    let mut rng = fastrand::Rng::with_seed(7);
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\n\n\n".to_vec(),
        vec![0xff, 0xfe, b'\n', 0x80, 0x00],
        b"{}\n[1,2]\nnull\n\"x\"\n{\"index\":\"one\"}\n".to_vec(),
        b"{\"index\":18446744073709551615,\"time\":\"2024-01-01T00:00:00Z\",\"service\":\"w\",\"kind\":{\"type\":\"deleted\"}}\n".to_vec(),
        b"{\"index\":2,\"time\":\"1969-13-45T99:99:99Z\",\"service\":\"w\",\"kind\":{\"type\":\"deleted\"}}\n".to_vec(),
        b"{\"index\":2,\"time\":\"2024-01-01T00:00:00Z\",\"service\":\"w\",\"kind\":{\"type\":\"no_such_kind\"}}\n".to_vec(),
        vec![b'x'; 3 << 20],
        [vec![b'{'; 2 << 20], b"\n".to_vec(), valid(5).into_bytes()].concat(),
        [valid(1), valid(1), valid(0), valid(3), valid(2)].concat().into_bytes(),
        [valid(4), "garbage\n".into(), valid(9)].concat().into_bytes(),
    ];
    for _ in 0..200 {
        let mut bytes = Vec::new();
        for _ in 0..rng.usize(0..8) {
            let piece = valid(rng.u64(1..20));
            let cut = rng.usize(0..=piece.len());
            bytes.extend_from_slice(&piece.as_bytes()[..cut]);
            if rng.bool() {
                bytes.extend((0..rng.usize(0..40)).map(|_| rng.u8(..)));
            }
        }
        cases.push(bytes);
    }

    for (n, content) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("1.jsonl"), content).expect("write");
        if n % 2 == 0 {
            // A second segment and names that are not segments.
            fs::write(dir.path().join("7.jsonl"), content).expect("write");
            fs::write(dir.path().join("007.jsonl"), content).expect("write");
            fs::write(dir.path().join("0.jsonl"), content).expect("write");
            fs::write(dir.path().join("x.jsonl"), content).expect("write");
            fs::create_dir(dir.path().join("9.jsonl")).expect("mkdir");
        }
        let log = EventLog::open_with(dir.path(), 1000, 2).expect("open tolerates any content");
        let sentinel = log.append("sentinel", None, EventKind::Deleted);
        let mut w = log.watch(0, Filter::all()).expect("watch");
        let seen = indexes_until(&mut w, sentinel).await;
        assert!(seen.windows(2).all(|p| p[0] < p[1]), "case {n}: {seen:?}");
        assert_eq!(seen.last(), Some(&sentinel), "case {n}");
        drop(w);
        drop(log);
        let log = EventLog::open(dir.path(), 1000).expect("reopen");
        assert_eq!(log.next(), sentinel + 1, "case {n}");
    }
}

/// A watcher disconnects, 1000 events are appended, it comes back with its last index + 1:
/// exactly the missed events in order, then live ones. With the default window the replay
/// is served from memory, with a window of 16 from the files.
#[tokio::test]
async fn reconnecting_replays_exactly_what_was_missed_then_follows() {
    for window in [LIVE_WINDOW, 16] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open_with(dir.path(), DEFAULT_KEEP, window).expect("open");
        let mut w = log.watch(0, Filter::all()).expect("watch");
        append_n(&log, 10);
        let seen = indexes_until(&mut w, 10).await;
        let last = *seen.last().expect("some");
        assert_eq!(w.resume_from(), 11);
        drop(w);

        append_n(&log, 1000);
        let mut w = log.watch(last + 1, Filter::all()).expect("reconnect");
        let replayed = indexes_until(&mut w, 1010).await;
        assert_eq!(replayed, (11..=1010).collect::<Vec<_>>(), "window {window}");

        append_n(&log, 5);
        let live = indexes_until(&mut w, 1015).await;
        assert_eq!(live, (1011..=1015).collect::<Vec<_>>(), "window {window}");
    }
}

/// The hand-over from replay to live under fire: another thread appends the whole time the
/// watcher replays and then follows. Every index arrives once, in order. Should the watcher
/// be overrun on a slow machine, it resumes where `Lagged` says, as a client would; the
/// sequence must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_then_live_while_another_task_appends() {
    for (name, log, window) in [
        ("files", None, 32usize),
        ("memory", Some(EventLog::in_memory(DEFAULT_KEEP)), 0),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(match log {
            Some(log) => log,
            None => EventLog::open_with(dir.path(), DEFAULT_KEEP, window).expect("open"),
        });
        append_n(&log, 1000);
        let appender = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..5000 {
                    log.append("web", Some("web-1"), started(i));
                    if i % 20 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        };
        let last = 6000;
        let mut seen = Vec::new();
        let mut w = log.watch(11, Filter::all()).expect("watch");
        let mut resumes = 0;
        while seen.last().is_none_or(|&l| l < last) {
            match next(&mut w).await {
                Ok(e) => seen.push(e.index),
                Err(EventError::Lagged { resume_from }) => {
                    resumes += 1;
                    w = log.watch(resume_from, Filter::all()).expect("resume");
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
        appender.join().expect("appender");
        assert_eq!(seen, (11..=last).collect::<Vec<_>>(), "{name}");
        assert!(resumes < 10, "{name}: {resumes} resumes");
    }
}

#[tokio::test]
async fn trimming_keeps_the_newest_and_bounds_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(dir.path(), 100).expect("open");
    append_n(&log, 1000);
    // Segments of 10 events; the oldest is deleted once the newer ones hold 100.
    assert_eq!(log.oldest(), 901);
    assert_eq!(segment_files(dir.path()).len(), 10);
    assert_eq!(lines_on_disk(dir.path()), 100);
    match log.watch(5, Filter::all()) {
        Err(EventError::Trimmed { requested, oldest }) => assert_eq!((requested, oldest), (5, 901)),
        other => panic!("{other:?}"),
    }
    let mut w = log.watch(0, Filter::all()).expect("watch from the oldest");
    assert_eq!(
        indexes_until(&mut w, 1000).await,
        (901..=1000).collect::<Vec<_>>()
    );

    // Bounded at every moment, not only at the end.
    for _ in 0..1000 {
        log.append("web", None, EventKind::Deleted);
        assert!(segment_files(dir.path()).len() <= 11);
    }
    assert!(lines_on_disk(dir.path()) <= 110);
    drop((w, log));

    let log = EventLog::open(dir.path(), 100).expect("reopen");
    assert_eq!((log.oldest(), log.next()), (1901, 2001));
    drop(log);
    // Reopened with a smaller retention, the files shrink at once.
    let log = EventLog::open(dir.path(), 20).expect("reopen smaller");
    assert_eq!((log.oldest(), log.next()), (1981, 2001));
    assert_eq!(lines_on_disk(dir.path()), 20);
}

#[tokio::test]
async fn a_replay_overtaken_by_retention_is_told_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open_with(dir.path(), 100, 8).expect("open");
    append_n(&log, 200);
    let oldest = log.oldest();
    let mut w = log.watch(oldest, Filter::all()).expect("watch");
    assert_eq!(next(&mut w).await.expect("first").index, oldest);
    append_n(&log, 1000);
    let error = loop {
        match next(&mut w).await {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    match error {
        EventError::Trimmed { requested, oldest } => {
            assert!(requested < oldest, "{requested} {oldest}");
            assert_eq!(oldest, log.oldest());
        }
        other => panic!("{other:?}"),
    }
}

/// A watcher that never reads while 10 000 events are appended is cut off with the index it
/// stopped at. The appends never wait for it: `append` is not async, and all 10 000 of them
/// complete while no watcher reads.
#[tokio::test]
async fn a_watcher_that_does_not_read_is_cut_off_and_can_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(dir.path(), DEFAULT_KEEP).expect("open");
    let mut idle = log.watch(0, Filter::all()).expect("watch");
    let mut slow = log.watch(0, Filter::all()).expect("watch");
    append_n(&log, 5);
    assert_eq!(indexes_until(&mut slow, 5).await, vec![1, 2, 3, 4, 5]);

    let indexes = append_n(&log, 10_000);
    assert_eq!(indexes, (6..=10_005).collect::<Vec<_>>());

    for _ in 0..2 {
        match next(&mut idle).await {
            Err(EventError::Lagged { resume_from }) => assert_eq!(resume_from, 1),
            other => panic!("{other:?}"),
        }
    }
    match next(&mut slow).await {
        Err(EventError::Lagged { resume_from }) => assert_eq!(resume_from, 6),
        other => panic!("{other:?}"),
    }
    let mut again = log.watch(6, Filter::all()).expect("resume");
    assert_eq!(
        indexes_until(&mut again, 10_005).await,
        (6..=10_005).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn filters_apply_to_replay_and_live() {
    let script: [(&str, Option<&str>); 6] = [
        ("a", Some("a-0")),
        ("a", Some("a-1")),
        ("b", Some("b-0")),
        ("a", None),
        ("b", None),
        ("a", Some("a-1")),
    ];
    let play = |log: &EventLog| -> Vec<u64> {
        script
            .iter()
            .map(|(s, i)| log.append(s, *i, EventKind::Deleted))
            .collect()
    };
    let both = Filter {
        service: Some("b".into()),
        instance: Some("a-1".into()),
    };
    let cases = [
        (Filter::service("a"), vec![0, 1, 3, 5]),
        (Filter::service("b"), vec![2, 4]),
        (Filter::instance("a-1"), vec![1, 5]),
        (both, vec![]),
        (Filter::all(), vec![0, 1, 2, 3, 4, 5]),
    ];
    for (filter, positions) in cases {
        // A window of 4: the replay comes from the files, then memory, then live.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open_with(dir.path(), 1000, 4).expect("open");
        let replayed: Vec<u64> = (0..3).flat_map(|_| play(&log)).collect();
        let mut w = log.watch(1, filter.clone()).expect("watch");
        let live = play(&log);
        // A marker this filter lets through ends each check.
        let marker = log.append("b", Some("a-1"), EventKind::Deleted);
        let marker = if filter.service.as_deref() == Some("a") {
            log.append("a", Some("a-1"), EventKind::Deleted)
        } else {
            marker
        };
        let mut expected: Vec<u64> = replayed
            .chunks(6)
            .chain([live.as_slice()])
            .flat_map(|round| positions.iter().map(|&p| round[p]))
            .collect();
        expected.push(marker);
        let mut seen = Vec::new();
        while seen.last() != Some(&marker) {
            let e = next(&mut w).await.expect("event");
            assert!(filter.matches(&e), "{filter:?} {e:?}");
            seen.push(e.index);
        }
        assert_eq!(seen, expected, "{filter:?}");
    }
}

#[tokio::test]
async fn watch_positions() {
    let log = EventLog::in_memory(100);
    assert!(matches!(
        log.watch(2, Filter::all()),
        Err(EventError::InvalidIndex {
            requested: 2,
            next: 1
        })
    ));
    let mut from_start = log
        .watch(0, Filter::all())
        .expect("empty log, from the start");
    append_n(&log, 150);
    assert_eq!(log.oldest(), 51);
    let mut only_new = log.watch(log.next(), Filter::all()).expect("only new");
    assert!(matches!(
        log.watch(50, Filter::all()),
        Err(EventError::Trimmed {
            requested: 50,
            oldest: 51
        })
    ));
    let mut w = log.watch(0, Filter::all()).expect("from the oldest");
    assert_eq!(next(&mut w).await.expect("event").index, 51);
    assert_eq!(next(&mut from_start).await.expect("event").index, 1);

    // Cancelling a wait loses nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(20), only_new.next())
            .await
            .is_err()
    );
    log.append("web", None, EventKind::Deleted);
    assert_eq!(next(&mut only_new).await.expect("event").index, 151);
}

#[test]
fn the_log_is_shared_across_tasks_and_a_watch_can_be_spawned() {
    fn send<T: Send>(_: &T) {}
    fn sync<T: Sync>(_: &T) {}
    let log = EventLog::in_memory(10);
    send(&log);
    sync(&log);
    let mut w = log.watch(0, Filter::all()).expect("watch");
    send(&w.next());
}

fn all_kinds() -> Vec<EventKind> {
    vec![
        EventKind::Applied {
            revision: 3,
            outcome: ApplyKind::Updated,
            changes: vec!["image".into(), "env.PORT".into()],
        },
        EventKind::Deleted,
        EventKind::Scaled { from: 2, to: 5 },
        EventKind::InstanceStarted {
            pid: 4242,
            revision: 3,
        },
        EventKind::StartFailed {
            error: "exec: no such file".into(),
        },
        EventKind::InstanceExited {
            end: ExitClass::Exited(3),
            code: Some(3),
            signal: None,
            detail: Some("after 2s".into()),
        },
        EventKind::RestartScheduled {
            delay_ms: 1500,
            attempt: 2,
        },
        EventKind::Stopping {
            reason: StopReason::ScaleDown,
            signal: "SIGTERM".into(),
        },
        EventKind::Killed {
            reason: "grace period of 10s over".into(),
        },
        EventKind::HealthChanged {
            from: HealthState::Healthy,
            to: HealthState::Unhealthy,
            reason: "http 503".into(),
        },
        EventKind::Ready {
            via: ReadyVia::Notify,
        },
        EventKind::OomKill { count: 2 },
        EventKind::Adopted { pid: 77 },
        EventKind::Lost {
            reason: "cgroup vanished".into(),
        },
        EventKind::RolloutStarted {
            rollout: "web-r2".into(),
            kind: RolloutKind::Update,
            from_revision: 1,
            to_revision: 2,
            to_replace: 4,
            replicas: 4,
            max_surge: 1,
            max_unavailable: 0,
        },
        EventKind::RolloutStep {
            rollout: "web-r2".into(),
            step: Step::Ready,
            message: String::new(),
            replaced: 1,
            to_replace: 4,
            new: 2,
            ready: 1,
            old: 3,
            available: 4,
        },
        EventKind::RolloutFinished {
            rollout: "web-r2".into(),
            state: RolloutState::Failed,
            reason: "new instance web-4 ended during the rollout".into(),
            rollback: Some("web-r3".into()),
        },
    ]
}

#[test]
fn kinds_name_themselves_as_serde_does_and_round_trip() {
    let kinds = all_kinds();
    let names: std::collections::BTreeSet<_> = kinds.iter().map(EventKind::type_name).collect();
    assert_eq!(names.len(), kinds.len(), "one name per kind");
    for kind in kinds {
        let json = serde_json::to_value(&kind).expect("serialize");
        assert_eq!(json["type"], kind.type_name(), "{kind:?}");
        let back: EventKind = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, kind);
        assert!(!kind.summary().is_empty());
    }
    let exited = EventKind::InstanceExited {
        end: ExitClass::OomKilled,
        code: None,
        signal: Some(9),
        detail: None,
    };
    assert_eq!(exited.summary(), "oom_killed");
    assert_eq!(
        EventKind::RestartScheduled {
            delay_ms: 1500,
            attempt: 2
        }
        .summary(),
        "restart #2 in 1s 500ms"
    );
}

/// Event logs the last release wrote (a real agent's, and the kinds that run did not produce,
/// in the same form) read as typed events, and are written back to the letter: the typed
/// fields keep the words they were stored with.
#[test]
fn logs_of_the_last_release_read_and_write_back_the_same() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/release-0.1");
    let mut kinds = std::collections::BTreeSet::new();
    for file in ["events.jsonl", "events-more.jsonl"] {
        let text = fs::read_to_string(format!("{dir}/{file}")).expect("a log of the release");
        for line in text.lines() {
            let event: Event = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(serde_json::to_string(&event).expect("serialize"), line);
            kinds.insert(event.kind.type_name());
        }
    }
    assert_eq!(
        kinds.len(),
        all_kinds().len(),
        "every kind is in the files: {kinds:?}"
    );
    let line = r#"{"index":9,"time":"2026-12-03T10:21:05.057819Z","service":"web","instance":"web-1","kind":{"type":"stopping","reason":"scale-down","signal":"SIGTERM"}}"#;
    let event: Event = serde_json::from_str(line).expect("a stopping event");
    assert_eq!(
        event.kind,
        EventKind::Stopping {
            reason: StopReason::ScaleDown,
            signal: "SIGTERM".into()
        }
    );
    let line = r#"{"index":9,"time":"2026-12-03T10:21:05.057819Z","service":"web","kind":{"type":"instance_exited","end":"signaled(9)","code":null,"signal":9,"detail":null}}"#;
    let event: Event = serde_json::from_str(line).expect("an exit");
    assert!(matches!(
        event.kind,
        EventKind::InstanceExited {
            end: ExitClass::Signaled(9),
            ..
        }
    ));
    // A word no release wrote is refused, not taken for another.
    let typo = line.replace("signaled(9)", "signalled(9)");
    assert!(serde_json::from_str::<Event>(&typo).is_err());
}

#[test]
fn the_line_format() {
    let event = Event {
        incarnation: 0,
        index: 7,
        time: std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
        service: "web".into(),
        instance: Some("web-0".into()),
        kind: EventKind::Ready {
            via: ReadyVia::Probe,
        },
    };
    let line = serde_json::to_string(&event).expect("serialize");
    assert_eq!(
        line,
        r#"{"index":7,"time":"2023-11-14T22:13:20.123456Z","service":"web","instance":"web-0","kind":{"type":"ready","via":"probe"}}"#
    );
    assert_eq!(serde_json::from_str::<Event>(&line).expect("parse"), event);
    // A clock before 1970 is written as 1970 rather than failing the write.
    let odd = Event {
        time: std::time::UNIX_EPOCH - Duration::from_secs(5),
        instance: None,
        ..event
    };
    let line = serde_json::to_string(&odd).expect("serialize");
    assert!(
        line.contains(r#""time":"1970-01-01T00:00:00.000000Z""#),
        "{line}"
    );
    assert!(!line.contains("instance"));
}

/// Throughput figures, not a test: run with
/// `cargo test --release -p corral-agent --lib events::tests::bench -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: prints figures"]
fn bench() {
    let kind = || EventKind::InstanceExited {
        end: ExitClass::Exited(1),
        code: Some(1),
        signal: None,
        detail: None,
    };
    // Append throughput.
    for (name, n) in [("files", 200_000usize), ("memory", 200_000)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = if name == "files" {
            EventLog::open(dir.path(), DEFAULT_KEEP).expect("open")
        } else {
            EventLog::in_memory(DEFAULT_KEEP)
        };
        let start = Instant::now();
        for _ in 0..n {
            log.append("web", Some("web-12"), kind());
        }
        let took = start.elapsed();
        println!(
            "append ({name}): {n} events in {took:?} = {:.0} events/s, {:.2} us/event",
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / n as f64
        );
        if name == "files" {
            let bytes: u64 = segment_files(dir.path())
                .iter()
                .map(|f| fs::metadata(dir.path().join(f)).map_or(0, |m| m.len()))
                .sum();
            println!(
                "on disk after {n} appends, keep {DEFAULT_KEEP}: {} segments, {} lines, {:.1} MB",
                segment_files(dir.path()).len(),
                lines_on_disk(dir.path()),
                bytes as f64 / 1e6
            );
        }
    }

    // Fan-out: 50 watchers, 10 000 events, every watcher must see every event.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (name, burst) in [("unpaced appends", usize::MAX), ("bursts of 50", 50)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(EventLog::open(dir.path(), DEFAULT_KEEP).expect("open"));
        let (watchers, events) = (50u64, 10_000u64);
        let first = log.next();
        let last = first + events - 1;
        let (took, resumes) = runtime.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..watchers {
                let log = Arc::clone(&log);
                let mut w = log.watch(first, Filter::all()).expect("watch");
                tasks.push(tokio::spawn(async move {
                    let (mut got, mut resumes) = (0u64, 0u64);
                    loop {
                        match w.next().await {
                            Ok(e) => {
                                got += 1;
                                if e.index == last {
                                    return (got, resumes);
                                }
                            }
                            Err(EventError::Lagged { resume_from }) => {
                                resumes += 1;
                                w = log.watch(resume_from, Filter::all()).expect("resume");
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }));
            }
            let start = Instant::now();
            let appender = {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    for i in 0..events {
                        log.append("web", Some("web-3"), kind());
                        if (usize::try_from(i).expect("a small count") + 1).is_multiple_of(burst) {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            };
            appender.await.expect("appender");
            let mut resumes = 0;
            for t in tasks {
                let (got, r) = t.await.expect("watcher");
                assert_eq!(got, events, "every watcher saw every event");
                resumes += r;
            }
            (start.elapsed(), resumes)
        });
        println!(
            "fan-out ({name}): {watchers} watchers x {events} events in {took:?} = {:.0} deliveries/s; {resumes} resumes after Lagged",
            (watchers * events) as f64 / took.as_secs_f64()
        );
    }
}
