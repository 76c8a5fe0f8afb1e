//! Job sections: what a valid one gives (defaults included), and every refusal, each naming
//! its field with the value and the reason — reported all at once.

use std::time::Duration;

use jiff::tz::TimeZoneDatabase;

use super::*;
use crate::spec::read_toml;

/// Validates a spec file with job sections: `kind`, `[schedule]` and `[job]` are taken out
/// and read here, the rest is read as a service spec.
fn check(text: &str) -> Result<Option<JobSpec>, Vec<FieldError>> {
    let mut table: toml::Table = text.parse().expect("test specs are TOML");
    let mut sections = toml::Table::new();
    for key in JOB_TOP_KEYS {
        if let Some(value) = table.remove(*key) {
            sections.insert((*key).to_owned(), value);
        }
    }
    let sections: RawJobSections = toml::Value::Table(sections)
        .try_into()
        .expect("test job sections have known keys of the right types");
    let rest = read_toml(&toml::to_string(&table).expect("a table prints"))
        .expect("the service part of a test spec reads");
    sections.validate(&rest)
}

const BASE: &str = "name = \"report\"\ncommand = [\"/bin/true\"]\n";

fn spec(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn the_example_of_the_format_is_valid() {
    let job = check(&spec(
        r#"
kind = "job"
[schedule]
cron = "30 2 * * *"
timezone = "Europe/Berlin"
concurrency = "forbid"
catch_up = "1h"
jitter = "30s"
[job]
timeout = "2h"
retries = 2
parallelism = 1
history = 20
"#,
    ))
    .expect("valid")
    .expect("a job");
    let schedule = job.schedule.as_ref().expect("scheduled");
    assert_eq!(schedule.cron.as_str(), "30 2 * * *");
    assert_eq!(schedule.timezone.name(), "Europe/Berlin");
    assert_eq!(schedule.timezone.tz().iana_name(), Some("Europe/Berlin"));
    assert_eq!(schedule.concurrency, Concurrency::Forbid);
    assert_eq!(schedule.catch_up, Some(Duration::from_secs(3600)));
    assert_eq!(schedule.jitter, Duration::from_secs(30));
    assert_eq!(job.timeout, Some(Duration::from_secs(7200)));
    assert_eq!((job.retries, job.parallelism, job.history), (2, 1, 20));
}

#[test]
fn defaults() {
    assert_eq!(check(BASE), Ok(None), "no kind: a service");
    assert_eq!(check(&spec("kind = \"service\"\n")), Ok(None));

    let job = check(&spec("kind = \"job\"\n"))
        .expect("valid")
        .expect("a job");
    assert_eq!(
        job,
        JobSpec {
            schedule: None,
            timeout: None,
            retries: 0,
            parallelism: 1,
            history: DEFAULT_HISTORY,
        },
        "without [schedule] a job runs only when triggered"
    );

    let job = check(&spec("kind = \"job\"\n[schedule]\ncron = \"@daily\"\n"))
        .expect("valid")
        .expect("a job");
    let schedule = job.schedule.expect("scheduled");
    assert_eq!(schedule.timezone.name(), DEFAULT_TIMEZONE);
    assert_eq!(schedule.concurrency, Concurrency::Forbid);
    assert_eq!(schedule.catch_up, None, "missed runs are skipped");
    assert_eq!(schedule.jitter, Duration::ZERO);
}

/// (cron, timezone, concurrency, catch_up, the catch-up read in seconds; 0: none)
#[rustfmt::skip]
const ACCEPTED: &[(&str, &str, &str, &str, u64)] = &[
    ("*/5 * * * * *", "UTC", "allow", "0s", 0),
    ("0 */5 * * * *", "UTC", "allow", "5m", 300),
    ("0 30 2 * * *", "America/New_York", "replace", "90m", 5400),
    ("@hourly", "Asia/Kolkata", "forbid", "10s", 10),
    ("@ANNUALLY", "UTC", "forbid", "10s", 10),
    ("0 9 * * MON-FRI", "Europe/London", "allow", "1d", 86_400),
    ("0 0 29 2 *", "UTC", "allow", "1h", 3600),
    ("0 12 L * *", "Etc/GMT+5", "allow", "1h", 3600),
    ("0 0 31 2 MON#5", "UTC", "allow", "1h", 3600),
    ("0 0 15W * ?", "UTC", "allow", "1h", 3600),
];

#[test]
fn schedules_that_are_accepted() {
    for (cron, zone, concurrency, catch_up, catch_up_secs) in ACCEPTED {
        let text = spec(&format!(
            "kind = \"job\"\n[schedule]\ncron = \"{cron}\"\ntimezone = \"{zone}\"\n\
             concurrency = \"{concurrency}\"\ncatch_up = \"{catch_up}\"\n"
        ));
        let schedule = match check(&text) {
            Ok(Some(JobSpec {
                schedule: Some(s), ..
            })) => s,
            other => panic!("{cron:?} in {zone}: {other:?}"),
        };
        assert_eq!(schedule.cron.as_str(), *cron);
        assert_eq!(schedule.timezone.name(), *zone);
        assert_eq!(schedule.concurrency.as_str(), *concurrency, "{cron:?}");
        let want = (*catch_up_secs > 0).then(|| Duration::from_secs(*catch_up_secs));
        assert_eq!(schedule.catch_up, want, "{cron:?}");
    }
}

/// Refused job sections: (TOML after the name and command, the field named, words its message
/// must contain).
#[rustfmt::skip]
const REFUSED: &[(&str, &str, &[&str])] = &[
    ("kind = \"job\"\n[schedule]\ncron = \"61 * * * *\"\n", "schedule.cron", &["\"61 * * * *\"", "minute 61 is out of range (0-59)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 24 * * *\"\n", "schedule.cron", &["hour 24 is out of range (0-23)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 0 * * 8\"\n", "schedule.cron", &["day-of-week 8 is out of range (0-7)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 1 13 *\"\n", "schedule.cron", &["month 13 is out of range (1-12)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 1-32 * *\"\n", "schedule.cron", &["day-of-month 32 is out of range (1-31)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"99 0 0 * * *\"\n", "schedule.cron", &["second 99 is out of range (0-59)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"* * * *\"\n", "schedule.cron", &["\"* * * *\"", "has 4 fields", "give 5"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 1 1 * 2027\"\n", "schedule.cron", &["day-of-week 2027 is out of range (0-7)"]),
    ("kind = \"job\"\n[schedule]\ncron = \"* * * * * * 2027\"\n", "schedule.cron", &["has 7 fields"]),
    ("kind = \"job\"\n[schedule]\ncron = \"\"\n", "schedule.cron", &["\"\"", "has 0 fields"]),
    ("kind = \"job\"\n[schedule]\ncron = \"5/5 * * * *\"\n", "schedule.cron", &["\"5/5 * * * *\"", "is not a cron pattern"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 30 2 *\"\n", "schedule.cron", &["\"0 0 30 2 *\"", "never runs", "like 30 February"]),
    ("kind = \"job\"\n[schedule]\ncron = \"0 0 31 4,6,9,11 *\"\n", "schedule.cron", &["never runs"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@reboot\"\n", "schedule.cron", &["\"@reboot\"", "is not a cron pattern", "@yearly, @annually, @monthly, @weekly, @daily, @hourly"]),
    ("kind = \"job\"\n[schedule]\ncron = \"1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,\"\n", "schedule.cron", &["is 400 bytes long (at most 256)"]),
    ("kind = \"job\"\n[schedule]\ntimezone = \"UTC\"\n", "schedule.cron", &["is required"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\ntimezone = \"Mars/Olympus\"\n", "schedule.timezone", &["\"Mars/Olympus\"", "is not a known time zone", "Europe/Berlin"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\ntimezone = \"../../etc/passwd\"\n", "schedule.timezone", &["is not a known time zone"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\ntimezone = \"Europe//Berlin\"\n", "schedule.timezone", &["is not a known time zone"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\ntimezone = \"\"\n", "schedule.timezone", &["is not a known time zone"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\nconcurrency = \"sometimes\"\n", "schedule.concurrency", &["\"sometimes\"", "forbid", "replace", "allow"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\ncatch_up = \"soon\"\n", "schedule.catch_up", &["\"soon\"", "is not a duration"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\ncatch_up = \"400d\"\n", "schedule.catch_up", &["\"400d\"", "is longer than"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\njitter = \"2d\"\n", "schedule.jitter", &["\"2d\"", "is longer than 1day"]),
    ("kind = \"job\"\n[schedule]\ncron = \"@daily\"\njitter = \"-1s\"\n", "schedule.jitter", &["negative"]),
    ("kind = \"job\"\n[job]\ntimeout = \"0s\"\n", "job.timeout", &["\"0s\"", "must be longer than 0", "leave timeout out"]),
    ("kind = \"job\"\n[job]\ntimeout = \"-5m\"\n", "job.timeout", &["negative"]),
    ("kind = \"job\"\n[job]\ntimeout = \"2 fortnights\"\n", "job.timeout", &["is not a duration"]),
    ("kind = \"job\"\n[job]\nretries = -1\n", "job.retries", &["-1 is out of range (0..=100)"]),
    ("kind = \"job\"\n[job]\nretries = 101\n", "job.retries", &["101 is out of range"]),
    ("kind = \"job\"\n[job]\nparallelism = 0\n", "job.parallelism", &["0 is out of range (1..=1000)"]),
    ("kind = \"job\"\n[job]\nhistory = 0\n", "job.history", &["0 is out of range (1..=1000)"]),
    ("kind = \"cron\"\n", "kind", &["\"cron\" is not a kind", "\"job\""]),
    ("kind = \"job\"\nreplicas = 3\n", "replicas", &["a job has none", "job.parallelism"]),
    ("kind = \"job\"\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n", "sockets", &["a job has none", "[[sockets]]"]),
    ("kind = \"job\"\n[health]\ntcp = \"127.0.0.1:1\"\n", "health", &["a job has none", "[health]"]),
    ("kind = \"job\"\n[rollout]\nmax_surge = 2\n", "rollout", &["a job has none"]),
    ("kind = \"job\"\n[restart]\npolicy = \"always\"\n", "restart.policy", &["a job has none", "job.retries"]),
    ("[schedule]\ncron = \"@daily\"\n", "schedule", &["only a job has [schedule]", "kind = \"job\""]),
    ("kind = \"service\"\n[job]\nretries = 1\n", "job", &["only a job has [job]"]),
];

#[test]
fn every_refusal_names_its_field_value_and_reason() {
    let mut failures = Vec::new();
    for (extra, field, words) in REFUSED {
        let text = spec(extra);
        match check(&text) {
            Ok(ok) => failures.push(format!("{extra:?} was accepted: {ok:?}")),
            Err(errors) => {
                let Some(error) = errors.iter().find(|e| e.field == *field) else {
                    failures.push(format!("{extra:?}: no error about {field}: {errors:?}"));
                    continue;
                };
                for word in *words {
                    if !error.message.contains(word) {
                        failures.push(format!(
                            "{extra:?}: {field}: {:?} lacks {word:?}",
                            error.message
                        ));
                    }
                }
                if errors.len() != 1 {
                    failures.push(format!("{extra:?}: one mistake, one error: {errors:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_job_keeps_the_restart_backoff_and_may_say_it_has_no_sockets() {
    let text =
        spec("sockets = []\nkind = \"job\"\n[restart]\nbackoff = \"1s\"\nbackoff_max = \"1m\"\n");
    assert!(matches!(check(&text), Ok(Some(_))), "{text}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = spec(
        r#"replicas = 2
kind = "job"
[schedule]
cron = "61 * * * *"
timezone = "Mars/Olympus"
jitter = "1 parsec"
[job]
timeout = "0s"
parallelism = 0
"#,
    );
    let errors = check(&text).expect_err("refused");
    let mut fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "job.parallelism",
            "job.timeout",
            "replicas",
            "schedule.cron",
            "schedule.jitter",
            "schedule.timezone"
        ]
    );

    // An unknown kind: the sections are still checked.
    let errors = check(&spec(
        "kind = \"task\"\n[schedule]\ncron = \"x\"\n[job]\nretries = -2\n",
    ))
    .expect_err("refused");
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["kind", "schedule.cron", "job.retries"]);
}

#[test]
fn time_zones_come_from_the_system_or_the_built_in_database() {
    let none = TimeZoneDatabase::none();
    let bundled = TimeZoneDatabase::bundled();
    // A host without tzdata: the built-in copy answers.
    let zone = lookup_zone("Europe/Berlin", &[&none, &bundled]).expect("built in");
    assert_eq!(zone.name(), "Europe/Berlin");
    assert!(
        zone.tz()
            .to_offset(jiff::Timestamp::from_second(1_782_864_000).expect("2026-07-01"))
            .seconds()
            == 7200,
        "summer time in Berlin is UTC+2"
    );
    // Without either, no zone is known, and the message says what to give.
    let error = lookup_zone("Europe/Berlin", &[&none]).expect_err("no database");
    assert!(error.contains("is not a known time zone"), "{error}");
    // The database in effect (the system's when it has one) knows the usual names.
    for name in [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Asia/Kolkata",
        "Etc/GMT+5",
    ] {
        assert!(time_zone(name).is_ok(), "{name}");
    }
}
