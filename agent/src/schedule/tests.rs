//! Schedules against fixed instants: daylight-saving gaps and repeats in Europe/Berlin and
//! America/New_York (2026: Berlin springs forward on 29 March at 02:00 and falls back on
//! 25 October at 03:00; New York on 8 March at 02:00 and on 1 November at 02:00), catch-up,
//! jitter and the concurrency decision, each table-driven; and properties over many patterns,
//! zones and instants near clock changes.

use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::spec::job::{parse_cron, time_zone};

fn at(text: &str) -> SystemTime {
    let ts: Timestamp = text
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} is not an instant: {e}"));
    SystemTime::try_from(ts).expect("in SystemTime's range")
}

fn show(t: Option<SystemTime>) -> String {
    match t {
        Some(t) => Timestamp::try_from(t).map_or_else(|e| e.to_string(), |ts| ts.to_string()),
        None => "never".to_owned(),
    }
}

fn schedule(cron: &str, zone: &str, catch_up: Option<Duration>) -> ScheduleSpec {
    ScheduleSpec {
        cron: parse_cron(cron).unwrap_or_else(|e| panic!("{e}")),
        timezone: time_zone(zone).unwrap_or_else(|e| panic!("{e}")),
        concurrency: Concurrency::Forbid,
        catch_up,
        jitter: Duration::ZERO,
    }
}

const BERLIN: &str = "Europe/Berlin";
const NEW_YORK: &str = "America/New_York";
const UTC: &str = "UTC";

/// (zone, pattern, after, the next run expected, why)
type NextRun = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);

#[rustfmt::skip]
const NEXT_RUNS: &[NextRun] = &[
    (BERLIN, "30 2 * * *", "2026-03-28T12:00:00+01:00", Some("2026-03-29T03:00:00+02:00"),
        "02:30 does not exist on the day of the spring gap: the run is at 03:00"),
    (BERLIN, "30 2 * * *", "2026-03-29T03:00:00+02:00", Some("2026-03-30T02:30:00+02:00"),
        "...and only once: the next one is the next day"),
    (BERLIN, "0 30 2 * * *", "2026-03-28T12:00:00+01:00", Some("2026-03-29T03:00:00+02:00"),
        "six fields (seconds first) read the same"),
    (BERLIN, "30 2 * * *", "2026-03-27T12:00:00+01:00", Some("2026-03-28T02:30:00+01:00"),
        "the day before the change is an ordinary day"),
    (BERLIN, "30 2 * * *", "2026-10-24T12:00:00+02:00", Some("2026-10-25T02:30:00+02:00"),
        "02:30 happens twice on the day of the autumn repeat: the run is the first time"),
    (BERLIN, "30 2 * * *", "2026-10-25T02:30:00+02:00", Some("2026-10-26T02:30:00+01:00"),
        "...and only then: not again at 02:30 winter time"),
    (BERLIN, "30 2 * * *", "2026-10-25T02:10:00+01:00", Some("2026-10-26T02:30:00+01:00"),
        "from inside the second pass the run of the day is behind"),
    (BERLIN, "0 * * * *", "2026-10-25T01:30:00+02:00", Some("2026-10-25T02:00:00+02:00"),
        "an hourly pattern runs in the first pass..."),
    (BERLIN, "0 * * * *", "2026-10-25T02:00:00+02:00", Some("2026-10-25T02:00:00+01:00"),
        "...and in the second, an hour later"),
    (BERLIN, "0 * * * *", "2026-10-25T02:00:00+01:00", Some("2026-10-25T03:00:00+01:00"),
        "...then on"),
    (BERLIN, "*/30 * * * *", "2026-03-29T01:45:00+01:00", Some("2026-03-29T03:00:00+02:00"),
        "a repeating pattern has no runs in the gap and goes on after it"),
    (BERLIN, "30 * * * *", "2026-03-29T01:30:00+01:00", Some("2026-03-29T03:30:00+02:00"),
        "an hourly :30 skips the missing 02:30 rather than running at 03:00"),
    (NEW_YORK, "30 2 * * *", "2026-03-07T12:00:00-05:00", Some("2026-03-08T03:00:00-04:00"),
        "New York's gap: 02:30 runs at 03:00"),
    (NEW_YORK, "0 2 * * *", "2026-03-07T12:00:00-05:00", Some("2026-03-08T03:00:00-04:00"),
        "02:00 itself is in the gap"),
    (NEW_YORK, "30 1 * * *", "2026-10-31T12:00:00-04:00", Some("2026-11-01T01:30:00-04:00"),
        "New York repeats 01:00-02:00: the first 01:30"),
    (NEW_YORK, "30 1 * * *", "2026-11-01T01:30:00-04:00", Some("2026-11-02T01:30:00-05:00"),
        "...once"),
    (NEW_YORK, "@daily", "2026-03-07T12:00:00-05:00", Some("2026-03-08T00:00:00-05:00"),
        "midnight is not touched by the change"),
    (NEW_YORK, "0 9 * * MON-FRI", "2026-01-02T10:00:00-05:00", Some("2026-01-05T09:00:00-05:00"),
        "weekday names: Friday after 9:00, then Monday"),
    (UTC, "*/5 * * * * *", "2026-01-01T12:00:03Z", Some("2026-01-01T12:00:05Z"), "seconds"),
    (UTC, "*/5 * * * * *", "2026-01-01T12:00:05Z", Some("2026-01-01T12:00:10Z"), "strictly after"),
    (UTC, "* * * * * *", "2026-01-01T12:00:00.999Z", Some("2026-01-01T12:00:01Z"),
        "a fraction of a second is still in its second"),
    (UTC, "@hourly", "2026-01-01T12:00:00.5Z", Some("2026-01-01T13:00:00Z"), "@hourly"),
    (UTC, "0 0 13 * FRI", "2026-01-01T00:00:00Z", Some("2026-01-02T00:00:00Z"),
        "day of month OR weekday, as in Vixie cron"),
    (UTC, "0 0 29 2 *", "2026-01-01T00:00:00Z", Some("2028-02-29T00:00:00Z"), "the next leap day"),
    (UTC, "0 0 1 1 *", "9999-06-01T00:00:00Z", None, "past the last year a date can have"),
];

#[test]
fn next_run_in_a_zone_with_daylight_saving() {
    let mut failures = Vec::new();
    for (zone, cron, after, expected, why) in NEXT_RUNS {
        let got = next_run(&schedule(cron, zone, None), at(after));
        let want = expected.map(at);
        if got != want {
            failures.push(format!(
                "{zone} {cron:?} after {after}: got {}, expected {} ({why})",
                show(got),
                show(want)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// (zone, pattern, at, the last due run expected)
#[rustfmt::skip]
const LAST_DUE: &[(&str, &str, &str, Option<&str>)] = &[
    (UTC, "0 * * * *", "2026-01-01T12:30:00Z", Some("2026-01-01T12:00:00Z")),
    (UTC, "0 * * * *", "2026-01-01T12:00:00Z", Some("2026-01-01T12:00:00Z")),
    (UTC, "0 * * * *", "2026-01-01T12:00:00.5Z", Some("2026-01-01T12:00:00Z")),
    (UTC, "0 * * * *", "2026-01-01T11:59:59.999Z", Some("2026-01-01T11:00:00Z")),
    (BERLIN, "30 2 * * *", "2026-03-29T03:20:00+02:00", Some("2026-03-29T03:00:00+02:00")),
    (BERLIN, "30 2 * * *", "2026-10-25T02:40:00+01:00", Some("2026-10-25T02:30:00+02:00")),
    (BERLIN, "0 * * * *", "2026-10-25T02:40:00+01:00", Some("2026-10-25T02:00:00+01:00")),
    (UTC, "0 0 1 2 *", "0001-01-15T00:00:00Z", None),
];

#[test]
fn last_due_is_at_or_before_the_instant() {
    for (zone, cron, now, expected) in LAST_DUE {
        let got = last_due(&schedule(cron, zone, None), at(now));
        assert_eq!(
            show(got),
            show(expected.map(at)),
            "{zone} {cron:?} at {now}"
        );
    }
}

#[test]
fn a_missed_run_starts_once_within_catch_up() {
    let hour = Duration::from_secs(3600);
    let minutes = |m: u64| Duration::from_secs(60 * m);
    let run = |due| Missed::RunNow { due: at(due) };
    let late = |due| Missed::TooLate { due: at(due) };
    // (since, now, catch_up, expected)
    let cases = [
        ("10:00:00", "10:30:00", Some(hour), Missed::Nothing),
        (
            "10:00:00",
            "11:30:00",
            Some(hour),
            run("2026-01-01T11:00:00Z"),
        ),
        (
            "10:00:00",
            "12:10:00",
            Some(hour),
            run("2026-01-01T12:00:00Z"),
        ),
        (
            "10:00:00",
            "11:20:00",
            Some(minutes(20)),
            run("2026-01-01T11:00:00Z"),
        ),
        (
            "10:00:00",
            "11:20:01",
            Some(minutes(20)),
            late("2026-01-01T11:00:00Z"),
        ),
        (
            "10:00:00",
            "13:30:00",
            Some(minutes(20)),
            late("2026-01-01T13:00:00Z"),
        ),
        ("10:00:00", "11:30:00", None, late("2026-01-01T11:00:00Z")),
        ("11:00:00", "11:30:00", Some(hour), Missed::Nothing),
        ("12:00:00", "11:00:00", Some(hour), Missed::Nothing),
    ];
    let hourly = |catch_up| schedule("0 * * * *", UTC, catch_up);
    for (since, now, catch_up, expected) in cases {
        let since = at(&format!("2026-01-01T{since}Z"));
        let now = at(&format!("2026-01-01T{now}Z"));
        assert_eq!(
            missed(&hourly(catch_up), since, now),
            expected,
            "since {} now {} catch_up {catch_up:?}",
            show(Some(since)),
            show(Some(now))
        );
    }

    // Caught up once: with the started run's due time as `since`, nothing is missed any more.
    let s = hourly(Some(hour));
    let now = at("2026-01-01T12:10:00Z");
    let Missed::RunNow { due } = missed(&s, at("2026-01-01T09:00:00Z"), now) else {
        panic!("a missed run within catch_up is started");
    };
    assert_eq!(missed(&s, due, now), Missed::Nothing);
    assert_eq!(missed(&s, due, at("2026-01-01T12:59:59Z")), Missed::Nothing);
    assert_eq!(
        missed(&s, due, at("2026-01-01T13:00:01Z")),
        run("2026-01-01T13:00:00Z")
    );

    // Down across Berlin's spring gap: the run of that night was due at 03:00.
    let nightly = schedule("30 2 * * *", BERLIN, Some(hour));
    assert_eq!(
        missed(
            &nightly,
            at("2026-03-28T02:30:00+01:00"),
            at("2026-03-29T03:20:00+02:00")
        ),
        run("2026-03-29T03:00:00+02:00")
    );
}

#[test]
fn jitter_takes_the_sample_of_the_bound() {
    let s = Duration::from_secs;
    let cases = [
        (s(30), 0.0, Duration::ZERO),
        (s(30), 0.5, s(15)),
        (s(30), 0.25, Duration::from_millis(7500)),
        (s(30), 1.0, s(30)),
        (s(30), -0.1, Duration::ZERO),
        (s(30), 7.0, Duration::ZERO),
        (s(30), f64::NAN, Duration::ZERO),
        (s(30), f64::INFINITY, Duration::ZERO),
        (Duration::ZERO, 0.7, Duration::ZERO),
        (Duration::MAX, 1.0, Duration::MAX),
    ];
    for (jitter, sample, expected) in cases {
        assert_eq!(
            jitter_delay(jitter, sample),
            expected,
            "{jitter:?} × {sample}"
        );
    }
    let mut rng = fastrand::Rng::with_seed(15);
    for _ in 0..10_000 {
        assert!(jitter_delay(s(30), rng.f64()) < s(30));
    }
}

#[test]
fn concurrency_decides_what_a_due_run_does() {
    use Concurrency::{Allow, Forbid, Replace};
    let cases: [(Concurrency, &[u32], Decision<u32>); 6] = [
        (Forbid, &[], Decision::Start),
        (Forbid, &[41], Decision::Skip { running: vec![41] }),
        (Replace, &[], Decision::Start),
        (
            Replace,
            &[40, 41],
            Decision::Replace {
                cancel: vec![40, 41],
            },
        ),
        (Allow, &[], Decision::Start),
        (Allow, &[40, 41], Decision::Start),
    ];
    for (concurrency, running, expected) in cases {
        assert_eq!(
            on_due(concurrency, running),
            expected,
            "{} with {running:?} running",
            concurrency.as_str()
        );
    }
}

#[test]
fn local_time_shows_the_zone_and_offset() {
    let s = schedule("30 2 * * *", BERLIN, None);
    assert_eq!(
        local_time(&s, at("2026-03-29T01:00:00Z")).as_deref(),
        Some("2026-03-29T03:00:00+02:00[Europe/Berlin]")
    );
}

/// Patterns of every shape: fixed times (in gaps and repeats too), steps, ranges, lists,
/// names, seconds, nicknames, L/W/#.
const PATTERNS: &[&str] = &[
    "30 2 * * *",
    "0 2 * * *",
    "59 1 * * *",
    "0 3 * * *",
    "0 * * * *",
    "*/15 * * * *",
    "*/7 2-3 * * *",
    "0 30 1,2 * * *",
    "*/20 * * * * *",
    "0 0 * * SUN",
    "0 9 * * MON-FRI",
    "@daily",
    "@weekly",
    "@monthly",
    "0 12 L * *",
    "0 12 15W * *",
    "0 12 * * 5#2",
    "0 0 13 * FRI",
    "0 0 29 2 *",
];

const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    // A 30-minute shift, and a zone east of UTC without daylight saving.
    "Australia/Lord_Howe",
    "Asia/Kolkata",
];

/// Instants from 2025 to 2031, half of them within two hours of a clock change of `zone`.
fn instant(zone: &'static str) -> impl Strategy<Value = SystemTime> {
    let start = at("2025-01-01T00:00:00Z");
    let uniform = (0u64..6 * 366 * 86_400).prop_map(move |s| start + Duration::from_secs(s));
    let tz = time_zone(zone).expect("known zone").tz().clone();
    let changes: Vec<SystemTime> = tz
        .following(Timestamp::try_from(start).expect("in range"))
        .take(12)
        .filter_map(|t| SystemTime::try_from(t.timestamp()).ok())
        .collect();
    let near = (0..changes.len().max(1), -7200i64..7200, 0u32..1_000_000_000).prop_map(
        move |(i, offset, nanos)| {
            let base = changes.get(i).copied().unwrap_or(start);
            let shifted = if offset < 0 {
                base - Duration::from_secs(offset.unsigned_abs())
            } else {
                base + Duration::from_secs(offset.unsigned_abs())
            };
            shifted + Duration::from_nanos(u64::from(nanos))
        },
    );
    prop_oneof![uniform, near]
}

/// A pattern (one of [`PATTERNS`], or a generated one the spec accepts), a zone, an instant.
fn case() -> impl Strategy<Value = (String, &'static str, SystemTime)> {
    let accepted = pattern().prop_filter("accepted patterns", |p| parse_cron(p).is_ok());
    let text = prop_oneof![
        (0..PATTERNS.len()).prop_map(|p| PATTERNS[p].to_owned()),
        accepted,
    ];
    (text, 0..ZONES.len())
        .prop_flat_map(|(text, z)| (Just(text), Just(ZONES[z]), instant(ZONES[z])))
}

/// Where croner's special characters may go: L, W and ? in the day of the month; L, # and ?
/// in the weekday.
#[derive(Clone, Copy)]
enum Place {
    Plain,
    DayOfMonth,
    Weekday,
}

/// One cron field over `lo..=hi`: numbers (one in eight past the range), ranges, steps and
/// lists, and the special characters of its place.
fn field(lo: u32, hi: u32, place: Place) -> BoxedStrategy<String> {
    let n = move || prop_oneof![7 => lo..=hi, 1 => 0u32..100];
    let common = prop_oneof![
        Just("*".to_owned()),
        n().prop_map(|a| a.to_string()),
        (n(), n()).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
        (1u32..20).prop_map(|s| format!("*/{s}")),
        (n(), n(), 1u32..20).prop_map(|(a, b, s)| format!("{}-{}/{s}", a.min(b), a.max(b))),
        (n(), n()).prop_map(|(a, b)| format!("{a},{b}")),
    ];
    match place {
        Place::Plain => common.boxed(),
        Place::DayOfMonth => prop_oneof![
            6 => common,
            1 => Just("?".to_owned()),
            1 => Just("L".to_owned()),
            1 => n().prop_map(|a| format!("{a}W")),
        ]
        .boxed(),
        Place::Weekday => prop_oneof![
            6 => common,
            1 => Just("?".to_owned()),
            1 => n().prop_map(|a| format!("{a}L")),
            1 => (n(), 1u32..6).prop_map(|(a, k)| format!("{a}#{k}")),
        ]
        .boxed(),
    }
}

/// Cron-like texts of 5 or 6 fields, most of them valid, some not.
fn pattern() -> impl Strategy<Value = String> {
    let five = (
        field(0, 59, Place::Plain),
        field(0, 23, Place::Plain),
        field(1, 31, Place::DayOfMonth),
        field(1, 12, Place::Plain),
        field(0, 7, Place::Weekday),
    );
    let six = (field(0, 59, Place::Plain), five.clone());
    prop_oneof![
        five.prop_map(|(m, h, dom, mon, dow)| format!("{m} {h} {dom} {mon} {dow}")),
        six.prop_map(|(s, (m, h, dom, mon, dow))| format!("{s} {m} {h} {dom} {mon} {dow}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The next run is after the instant, is itself a due time, and nothing is due in
    /// between: next_run and last_due agree through every clock change.
    #[test]
    fn next_run_and_last_due_agree((cron, zone, t) in case()) {
        let s = schedule(&cron, zone, None);
        let next = next_run(&s, t);
        prop_assert!(next.is_some(), "{zone} {cron:?} after {}: no next run", show(Some(t)));
        let next = next.expect("checked");
        prop_assert!(next > t);
        prop_assert_eq!(show(last_due(&s, next)), show(Some(next)), "{} {:?}", zone, cron);
        let just_before = next - Duration::from_nanos(1);
        let between = last_due(&s, just_before);
        prop_assert!(
            between.is_none_or(|due| due <= t),
            "{zone} {cron:?}: {} is due between {} and the next run {}",
            show(between), show(Some(t)), show(Some(next))
        );
    }

    /// No pattern text and no instant panics: a bad pattern is an error, an instant out of
    /// range has no next run.
    #[test]
    fn no_pattern_or_instant_panics(
        text in prop_oneof!["[0-9*/,LW#?@ a-zA-Z-]{0,24}", pattern()],
        secs in any::<i64>(),
        zone in 0..ZONES.len(),
    ) {
        if let Ok(cron) = parse_cron(&text) {
            let s = ScheduleSpec { cron, ..schedule("* * * * *", ZONES[zone], None) };
            let t = if secs < 0 {
                SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
            } else {
                SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
            };
            if let Some(t) = t {
                let _ = next_run(&s, t);
                let _ = last_due(&s, t);
                let _ = missed(&s, t, t);
            }
        }
    }

    /// A pattern the spec accepts has a next run and a last due run from any instant of
    /// these years: the patterns refused as never running are exactly those.
    #[test]
    fn every_accepted_pattern_runs(
        text in pattern(),
        zone in 0..ZONES.len(),
        secs in 0u64..6 * 366 * 86_400,
    ) {
        if let Ok(cron) = parse_cron(&text) {
            let s = ScheduleSpec { cron, ..schedule("* * * * *", ZONES[zone], None) };
            let t = at("2025-01-01T00:00:00Z") + Duration::from_secs(secs);
            prop_assert!(next_run(&s, t).is_some(), "{text:?} in {}: no run after {}", ZONES[zone], show(Some(t)));
            prop_assert!(last_due(&s, t).is_some(), "{text:?} in {}: no run before {}", ZONES[zone], show(Some(t)));
        }
    }
}
