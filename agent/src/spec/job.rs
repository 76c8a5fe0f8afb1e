//! Jobs: `kind = "job"`, `[schedule]` and `[job]` — run-to-completion tasks, started on demand
//! or on a cron schedule, with the same resources, isolation, user, env and logs as a service.
//!
//! ```toml
//! kind = "job"                  # "service" (default) | "job"
//! [schedule]                    # absent: the job runs only when triggered
//! cron = "30 2 * * *"           # 5 fields, or 6 with seconds first; @hourly, @daily, ...
//! timezone = "Europe/Berlin"    # an IANA name; default UTC
//! concurrency = "forbid"        # forbid (default) | replace | allow
//! catch_up = "1h"               # start a run missed while the agent was down, once, if back
//!                               # within this window; default: missed runs are skipped
//! jitter = "30s"                # a random delay up to this, default none
//! [job]
//! timeout = "2h"                # default none; then stop signal, grace, SIGKILL
//! retries = 2                   # on failure, with the [restart] backoff; default 0
//! parallelism = 1               # instances per run, each with CORRAL_JOB_INDEX; default 1
//! history = 10                  # runs kept with their status and logs; default 10
//! ```
//!
//! This module holds the raw sections as written ([`RawJobSections`]), their validation into
//! a [`JobSpec`] — every error naming field, value and reason, like the rest of the spec —
//! and the checks between a job and the service sections it cannot have (`replicas`,
//! `[[sockets]]`, `[health]`, `[rollout]`, `restart.policy`). The cron pattern is parsed with
//! croner; when it fires is worked out by `schedule`. The time zone is looked up in the
//! system's database (`/usr/share/zoneinfo`, kept current by the distribution's `tzdata`),
//! and in the copy of the IANA database built into corrald when the system has none or lacks
//! the name, so that a schedule works on a host without `tzdata`.

use std::sync::OnceLock;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::{TimeZone, TimeZoneDatabase};
use serde::{Deserialize, Serialize};

use super::error::{FieldError, quote};
use super::types::RawSpec;
use super::units::{format_duration, parse_duration};
use super::validate::MAX_REPLICAS;

/// The top-level keys of a spec file that this module reads.
pub const JOB_TOP_KEYS: &[&str] = &["kind", "schedule", "job"];
/// The keys of `[schedule]`.
pub const SCHEDULE_KEYS: &[&str] = &["cron", "timezone", "concurrency", "catch_up", "jitter"];
/// The keys of `[job]`.
pub const JOB_KEYS: &[&str] = &["timeout", "retries", "parallelism", "history"];

/// The time zone of a schedule without `timezone`.
pub const DEFAULT_TIMEZONE: &str = "UTC";
/// Runs kept per job without `history`.
pub const DEFAULT_HISTORY: u32 = 10;
const MAX_HISTORY: i64 = 1000;
const MAX_RETRIES: i64 = 100;
const MAX_CRON_LEN: usize = 256;
const MAX_ZONE_NAME_LEN: usize = 64;
const MAX_CATCH_UP: Duration = Duration::from_secs(366 * 24 * 3600);
const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);
const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

// ------------------------------------------------------------------------------------------
// Raw: as written.

/// The job sections of a spec as written: the top-level `kind`, `[schedule]` and `[job]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawJobSections {
    /// `service` or `job`.
    pub kind: Option<String>,
    /// `[schedule]`: when a job runs by itself.
    pub schedule: Option<RawSchedule>,
    /// `[job]`: how a run is bounded, retried, split and remembered.
    pub job: Option<RawJob>,
}

/// `[schedule]` as written; durations are humantime strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSchedule {
    /// A cron pattern: 5 fields, 6 with seconds first, or `@hourly`, `@daily`, ...
    pub cron: Option<String>,
    /// An IANA time zone name.
    pub timezone: Option<String>,
    /// `forbid`, `replace` or `allow`.
    pub concurrency: Option<String>,
    /// How late a missed run may still start.
    pub catch_up: Option<String>,
    /// The longest random delay added to each run's start.
    pub jitter: Option<String>,
}

/// `[job]` as written; durations are humantime strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawJob {
    /// How long one attempt may run.
    pub timeout: Option<String>,
    /// Attempts after a failed one.
    pub retries: Option<i64>,
    /// Instances per run.
    pub parallelism: Option<i64>,
    /// Runs kept.
    pub history: Option<i64>,
}

// ------------------------------------------------------------------------------------------
// Validated.

/// What a spec describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    /// Instances kept running (the default).
    #[default]
    Service,
    /// Runs that end; started on demand or by a schedule.
    Job,
}

impl Kind {
    /// The name as written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Job => "job",
        }
    }
}

/// What a schedule does when a run is due while earlier runs of the job still run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// Skip the new run, and say so (the default).
    #[default]
    Forbid,
    /// Cancel the running runs, then start the new one.
    Replace,
    /// Start the new run beside them.
    Allow,
}

impl Concurrency {
    /// The name as written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Concurrency::Forbid => "forbid",
            Concurrency::Replace => "replace",
            Concurrency::Allow => "allow",
        }
    }
}

/// A parsed cron pattern with its text as written.
#[derive(Debug, Clone)]
pub struct CronPattern {
    text: String,
    cron: Cron,
}

impl CronPattern {
    /// The pattern as written (`"30 2 * * *"`, `"@daily"`).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed pattern, for evaluation (`schedule`).
    pub fn cron(&self) -> &Cron {
        &self.cron
    }
}

impl PartialEq for CronPattern {
    /// Patterns are the same when written the same: the parsed form follows from the text.
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for CronPattern {}

/// A time zone found in the IANA database, with its name as written.
#[derive(Debug, Clone)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl Zone {
    /// The name as written (`"Europe/Berlin"`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The zone's rules.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Zone {}

/// A validated `[schedule]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSpec {
    /// When runs are due, on the wall clock of `timezone`.
    pub cron: CronPattern,
    /// The zone the pattern is read in.
    pub timezone: Zone,
    /// What a due run does while earlier runs still run.
    pub concurrency: Concurrency,
    /// How late a run missed while the agent was down may still start; `None`: never.
    pub catch_up: Option<Duration>,
    /// The longest random delay added to each run's start; zero: none.
    pub jitter: Duration,
}

/// A validated job: its schedule and how its runs are bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// `None`: the job runs only when triggered (API, `corral run`).
    pub schedule: Option<ScheduleSpec>,
    /// How long one attempt may run before it is stopped and ends `timed_out`; `None`: no
    /// limit.
    pub timeout: Option<Duration>,
    /// Attempts after a failed one, each after the `[restart]` backoff.
    pub retries: u32,
    /// Instances started per run, indexed from 0 (`CORRAL_JOB_INDEX`).
    pub parallelism: u32,
    /// Runs kept with their status and logs; older ones are pruned.
    pub history: u32,
}

// ------------------------------------------------------------------------------------------
// Validation.

impl RawJobSections {
    /// Checks the job sections against the rest of the spec, `rest`. A service (no `kind`,
    /// or `kind = "service"`) gives `Ok(None)` and must have neither `[schedule]` nor `[job]`;
    /// a job gives its [`JobSpec`] and must have none of the sections only a service has.
    /// Every problem is reported, each naming its field, the value and the reason.
    pub fn validate(&self, rest: &RawSpec) -> Result<Option<JobSpec>, Vec<FieldError>> {
        let mut errors = Vec::new();
        let kind = match self.kind.as_deref() {
            None | Some("service") => Some(Kind::Service),
            Some("job") => Some(Kind::Job),
            Some(other) => {
                errors.push(FieldError::new(
                    "kind",
                    format!(
                        "{} is not a kind (expected \"service\" or \"job\")",
                        quote(other)
                    ),
                ));
                None
            }
        };
        let spec = match kind {
            Some(Kind::Service) => {
                for (field, given) in [
                    ("schedule", self.schedule.is_some()),
                    ("job", self.job.is_some()),
                ] {
                    if given {
                        errors.push(FieldError::new(
                            field,
                            format!(
                                "only a job has [{field}]: add kind = \"job\", or remove [{field}]"
                            ),
                        ));
                    }
                }
                None
            }
            Some(Kind::Job) => {
                service_only_sections(rest, &mut errors);
                let schedule = self
                    .schedule
                    .as_ref()
                    .and_then(|s| schedule(s, &mut errors));
                let job = job(self.job.as_ref(), &mut errors);
                job.map(|job| JobSpec { schedule, ..job })
            }
            // The kind is unknown: check the sections on their own, so that one pass
            // reports everything.
            None => {
                if let Some(s) = &self.schedule {
                    schedule(s, &mut errors);
                }
                job(self.job.as_ref(), &mut errors);
                None
            }
        };
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(errors)
        }
    }
}

/// The sections of `rest` a job cannot have, each reported with the reason.
fn service_only_sections(rest: &RawSpec, errors: &mut Vec<FieldError>) {
    let mut refuse = |given: bool, field: &str, why: &str| {
        if given {
            errors.push(FieldError::new(field, format!("a job has none: {why}")));
        }
    };
    refuse(
        rest.replicas.is_some(),
        "replicas",
        "a run starts job.parallelism instances; remove replicas",
    );
    refuse(
        rest.sockets.as_ref().is_some_and(|s| !s.is_empty()),
        "sockets",
        "its runs end, so it cannot share a listener the agent keeps open; remove [[sockets]]",
    );
    refuse(
        rest.health.is_some(),
        "health",
        "a run is judged by how it ends, not probed; remove [health]",
    );
    refuse(
        rest.rollout.is_some(),
        "rollout",
        "a new spec applies from the next run on, nothing is rolled; remove [rollout]",
    );
    refuse(
        rest.restart.as_ref().is_some_and(|r| r.policy.is_some()),
        "restart.policy",
        "a failed run is retried job.retries times, with the [restart] backoff; remove policy",
    );
}

/// A validated `[schedule]`, or `None` with its errors pushed.
fn schedule(raw: &RawSchedule, errors: &mut Vec<FieldError>) -> Option<ScheduleSpec> {
    let before = errors.len();
    let cron = match raw.cron.as_deref() {
        None => {
            errors.push(FieldError::new(
                "schedule.cron",
                "is required in [schedule] (e.g. \"30 2 * * *\"; without [schedule] the job runs only when triggered)",
            ));
            None
        }
        Some(text) => parse_cron(text)
            .map_err(|why| errors.push(FieldError::new("schedule.cron", why)))
            .ok(),
    };
    let timezone = time_zone(raw.timezone.as_deref().unwrap_or(DEFAULT_TIMEZONE))
        .map_err(|why| errors.push(FieldError::new("schedule.timezone", why)))
        .ok();
    let concurrency = match raw.concurrency.as_deref() {
        None | Some("forbid") => Some(Concurrency::Forbid),
        Some("replace") => Some(Concurrency::Replace),
        Some("allow") => Some(Concurrency::Allow),
        Some(other) => {
            errors.push(FieldError::new(
                "schedule.concurrency",
                format!(
                    "{} is not a concurrency policy (expected \"forbid\", \"replace\" or \"allow\")",
                    quote(other)
                ),
            ));
            None
        }
    };
    let catch_up = duration(
        errors,
        "schedule.catch_up",
        raw.catch_up.as_deref(),
        MAX_CATCH_UP,
    );
    let jitter = duration(errors, "schedule.jitter", raw.jitter.as_deref(), MAX_JITTER);
    if errors.len() > before {
        return None;
    }
    Some(ScheduleSpec {
        cron: cron?,
        timezone: timezone?,
        concurrency: concurrency?,
        // "0s": as late as never.
        catch_up: catch_up?.filter(|d| !d.is_zero()),
        jitter: jitter?.unwrap_or(Duration::ZERO),
    })
}

/// A validated `[job]` (default values when absent) without its schedule, or `None` with
/// its errors pushed.
fn job(raw: Option<&RawJob>, errors: &mut Vec<FieldError>) -> Option<JobSpec> {
    let before = errors.len();
    let default = RawJob::default();
    let raw = raw.unwrap_or(&default);
    let timeout = match raw.timeout.as_deref() {
        Some(text) if parse_duration(text).is_ok_and(|d| d.is_zero()) => {
            errors.push(FieldError::new(
                "job.timeout",
                format!(
                    "{} must be longer than 0 (leave timeout out for runs without a time limit)",
                    quote(text)
                ),
            ));
            None
        }
        text => duration(errors, "job.timeout", text, MAX_TIMEOUT),
    };
    let retries = integer(errors, "job.retries", raw.retries, 0, 0..=MAX_RETRIES);
    let parallelism = integer(
        errors,
        "job.parallelism",
        raw.parallelism,
        1,
        1..=i64::from(MAX_REPLICAS),
    );
    let history = integer(
        errors,
        "job.history",
        raw.history,
        i64::from(DEFAULT_HISTORY),
        1..=MAX_HISTORY,
    );
    if errors.len() > before {
        return None;
    }
    Some(JobSpec {
        schedule: None,
        timeout: timeout?,
        retries: retries?,
        parallelism: parallelism?,
        history: history?,
    })
}

/// An optional duration up to `max`: `Some(None)` when absent, `None` (reported) when
/// unreadable or too long.
fn duration(
    errors: &mut Vec<FieldError>,
    field: &str,
    raw: Option<&str>,
    max: Duration,
) -> Option<Option<Duration>> {
    let Some(text) = raw else {
        return Some(None);
    };
    match parse_duration(text) {
        Err(why) => {
            errors.push(FieldError::new(field, why));
            None
        }
        Ok(d) if d > max => {
            errors.push(FieldError::new(
                field,
                format!("{} is longer than {}", quote(text), format_duration(max)),
            ));
            None
        }
        Ok(d) => Some(Some(d)),
    }
}

/// An integer within `range`, or `default` when absent; `None` (reported) when out of range.
fn integer(
    errors: &mut Vec<FieldError>,
    field: &str,
    raw: Option<i64>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Option<u32> {
    let n = raw.unwrap_or(default);
    if !range.contains(&n) {
        errors.push(FieldError::new(
            field,
            format!("{n} is out of range ({}..={})", range.start(), range.end()),
        ));
        return None;
    }
    u32::try_from(n).ok()
}

/// Parses a cron pattern: 5 fields (minute hour day-of-month month day-of-week), 6 with
/// seconds first, or a nickname (`@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`,
/// `@hourly`). Fields take numbers, `*`, ranges `a-b`, steps `*/n` and `a-b/n`, lists, and
/// month and weekday names (`JAN`, `MON`); a day matches when its day-of-month *or* its
/// weekday does, as in Vixie cron; croner's `L`, `W` and `#` work too. The error is the whole
/// reason, value quoted.
pub fn parse_cron(text: &str) -> Result<CronPattern, String> {
    if text.len() > MAX_CRON_LEN {
        return Err(format!(
            "{} is {} bytes long (at most {MAX_CRON_LEN})",
            quote(text),
            text.len()
        ));
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    if text.trim_start().starts_with('@') {
        if !NICKNAMES.contains(&text.trim().to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{} is not a cron pattern (the nicknames are {})",
                quote(text),
                NICKNAMES.join(", ")
            ));
        }
    } else if !(5..=6).contains(&fields.len()) {
        return Err(format!(
            "{} is not a cron pattern: it has {} fields (give 5: minute hour day-of-month month day-of-week, or 6 with seconds first, or {})",
            quote(text),
            fields.len(),
            NICKNAMES.join(", ")
        ));
    } else {
        let names = &FIELD_NAMES[6 - fields.len()..];
        for (field, (name, range)) in fields.iter().zip(names) {
            if let Some(n) = field_numbers(field).find(|n| !range.contains(n)) {
                return Err(format!(
                    "{} is not a cron pattern: {name} {n} is out of range ({}-{})",
                    quote(text),
                    range.start(),
                    range.end()
                ));
            }
        }
    }
    let parser = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build();
    let cron = parser
        .parse(text)
        .map_err(|e| format!("{} is not a cron pattern ({e})", quote(text)))?;
    if !matches_some_day(&cron) {
        return Err(format!(
            "{} never runs: none of its days of the month exists in its months (like 30 February)",
            quote(text)
        ));
    }
    Ok(CronPattern {
        text: text.to_owned(),
        cron,
    })
}

/// The nicknames a pattern may be.
const NICKNAMES: [&str; 6] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

/// The fields of a 6-field pattern and their ranges; a 5-field one has no seconds.
const FIELD_NAMES: [(&str, std::ops::RangeInclusive<u64>); 6] = [
    ("second", 0..=59),
    ("minute", 0..=59),
    ("hour", 0..=23),
    ("day-of-month", 1..=31),
    ("month", 1..=12),
    ("day-of-week", 0..=7),
];

/// The values a field names — single values and range ends, not steps (`/n`), nth weekdays
/// (`#n`) or names — for a message saying which is out of range. Parsing is croner's.
fn field_numbers(field: &str) -> impl Iterator<Item = u64> + '_ {
    field.split(',').flat_map(|item| {
        let values = item.split(['/', '#']).next().unwrap_or("");
        let values = values.trim_end_matches(['W', 'w', 'L', 'l']);
        values
            .split('-')
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .map(|v| v.parse().unwrap_or(u64::MAX))
    })
}

/// Whether `cron` matches some date: every day of 28 years (a whole cycle of weekdays and leap
/// years) is tried with croner's own day matcher. A pattern matching none would make every
/// search for its next run walk thousands of years.
fn matches_some_day(cron: &Cron) -> bool {
    let Ok(first) = jiff::civil::Date::new(2024, 1, 1) else {
        return true;
    };
    let pattern = &cron.pattern;
    first
        .series(jiff::Span::new().days(1))
        .take_while(|d| d.year() < 2024 + 28)
        .any(|d| {
            let month = d.month().unsigned_abs().into();
            let weekday = croner::Weekday::from_days_from_sunday(
                d.weekday().to_sunday_zero_offset().unsigned_abs().into(),
            );
            pattern.month_match(month).unwrap_or(false)
                && pattern
                    .day_match(
                        i32::from(d.year()),
                        month,
                        d.day().unsigned_abs().into(),
                        weekday,
                    )
                    .unwrap_or(false)
        })
}

/// Looks a time zone up by its IANA name (`"Europe/Berlin"`, `"UTC"`): in the system's
/// database, else in the copy built into corrald. The error is the whole reason, value
/// quoted.
pub fn time_zone(name: &str) -> Result<Zone, String> {
    static BUNDLED: OnceLock<TimeZoneDatabase> = OnceLock::new();
    let bundled = BUNDLED.get_or_init(TimeZoneDatabase::bundled);
    lookup_zone(name, &[jiff::tz::db(), bundled])
}

/// [`time_zone`] over the given databases, in order.
fn lookup_zone(name: &str, databases: &[&TimeZoneDatabase]) -> Result<Zone, String> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_ZONE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'))
        && name.split('/').all(|part| !part.is_empty());
    let unknown = || {
        format!(
            "{} is not a known time zone (use an IANA name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\")",
            quote(name)
        )
    };
    if !well_formed {
        return Err(unknown());
    }
    databases
        .iter()
        .find_map(|db| db.get(name).ok())
        .map(|tz| Zone {
            name: name.to_owned(),
            tz,
        })
        .ok_or_else(unknown)
}

pub mod overrides;
#[cfg(test)]
mod tests;
