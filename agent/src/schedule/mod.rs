//! When scheduled jobs run: the next run of a `[schedule]` after an instant, the run missed
//! while the agent was down that `catch_up` still starts, the random delay of `jitter`, and
//! what a due run does while earlier runs still run (`concurrency`). Pure: instants in,
//! decisions out — the caller keeps the clock, the timers and the randomness. Imports only
//! `spec`; croner walks the pattern, jiff knows the zone's rules.
//!
//! A pattern is read on the wall clock of the schedule's time zone. When that clock jumps,
//! runs follow Vixie cron:
//!
//! - **Forward** (spring, a gap: 02:00–03:00 does not exist in Europe/Berlin on the last
//!   Sunday of March): a run at a fixed time inside the gap (`30 2 * * *`, every field of
//!   second, minute and hour a single value) runs once, at the first instant after the gap
//!   (03:00). A pattern that repeats within the day (`*/15 * * * *`, `0 * * * *`) has no runs
//!   in the gap: it goes on with its next wall-clock time after it.
//! - **Back** (autumn, a repeat: 02:00–03:00 happens twice in Europe/Berlin on the last
//!   Sunday of October): a run at a fixed time in the repeated hour runs once, the first
//!   time. A repeating pattern runs in both passes (`0 * * * *` runs at 02:00 summer time and
//!   again at 02:00 winter time, an hour apart), as its runs are meant to be spread in
//!   elapsed time.
//!
//! A pattern that matches no date at all (`0 0 30 2 *`) is refused by `spec::job`, so every
//! schedule has a next run within a few years (29 February) — but none past the year 9999.

mod wall;

#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

use jiff::Timestamp;

use crate::spec::job::{Concurrency, ScheduleSpec};

use wall::Wall;

/// The first run of `schedule` strictly after `after`, to the second; `None` when there is
/// none before the year 10000.
pub fn next_run(schedule: &ScheduleSpec, after: SystemTime) -> Option<SystemTime> {
    let from = zoned(schedule, after)?;
    let next = schedule
        .cron
        .cron()
        .find_next_occurrence(&from, false)
        .ok()?;
    SystemTime::try_from(next.0.timestamp()).ok()
}

/// The last run of `schedule` due at or before `at`; `None` when there is none since the year
/// 1.
pub fn last_due(schedule: &ScheduleSpec, at: SystemTime) -> Option<SystemTime> {
    let from = zoned(schedule, at)?;
    let previous = schedule
        .cron
        .cron()
        .find_previous_occurrence(&from, true)
        .ok()?;
    // croner works on whole seconds: the run due in `at`'s own second is due, but not after
    // `at` itself.
    let due = SystemTime::try_from(previous.0.timestamp()).ok()?;
    if due <= at { Some(due) } else { None }
}

/// `at` in `schedule`'s zone; `None` outside jiff's range (years -9999..=9999).
fn zoned(schedule: &ScheduleSpec, at: SystemTime) -> Option<Wall> {
    let at = Timestamp::try_from(at).ok()?;
    Some(Wall(at.to_zoned_datetime(schedule.timezone.tz().clone())))
}

/// What to do, when the agent (re)starts, about runs due while it was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// No run was due since the last one.
    Nothing,
    /// Start one run now, for the run that was due at `due`: the latest one missed, within
    /// `catch_up`. Earlier missed runs are not started: a job catches up once.
    RunNow {
        /// When the run was due.
        due: SystemTime,
    },
    /// Runs were missed, the latest due at `due`, longer ago than `catch_up` (or the schedule
    /// has none): none is started, and the schedule goes on with its next run.
    TooLate {
        /// When the latest missed run was due.
        due: SystemTime,
    },
}

/// Which missed run, if any, to start at `now`. `since` is when the last run the schedule
/// started was due — or, before the first one, when the schedule began (the job's apply):
/// runs due up to it are not missed. Once a missed run is started, the caller passes its
/// `due` as `since`, so that it is started once. A `now` before `since` (the clock was set
/// back) misses nothing.
pub fn missed(schedule: &ScheduleSpec, since: SystemTime, now: SystemTime) -> Missed {
    let Some(due) = last_due(schedule, now) else {
        return Missed::Nothing;
    };
    if due <= since {
        return Missed::Nothing;
    }
    let late = now.duration_since(due).unwrap_or(Duration::ZERO);
    match schedule.catch_up {
        Some(window) if late <= window => Missed::RunNow { due },
        _ => Missed::TooLate { due },
    }
}

/// The random delay of a run's start, up to `jitter`: `sample` (uniform in `0.0..1.0`, e.g.
/// `fastrand::f64()`) of it. A sample outside `0.0..=1.0` (or NaN) counts as 0.
pub fn jitter_delay(jitter: Duration, sample: f64) -> Duration {
    if !(0.0..=1.0).contains(&sample) {
        return Duration::ZERO;
    }
    // Through f64 a bound near Duration::MAX may round above itself: never past the bound.
    Duration::try_from_secs_f64(jitter.as_secs_f64() * sample)
        .unwrap_or(jitter)
        .min(jitter)
}

/// What a due run does, given the runs of the same job still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<R> {
    /// Start it.
    Start,
    /// Do not start it (`forbid`): these runs still run. The caller records the skip.
    Skip {
        /// The runs in the way.
        running: Vec<R>,
    },
    /// Cancel these runs (`replace`), then start it.
    Replace {
        /// The runs to cancel first.
        cancel: Vec<R>,
    },
}

/// The [`Decision`] for a run due under `concurrency` while `running` (ids of the job's runs
/// that have not ended) still run.
pub fn on_due<R: Clone>(concurrency: Concurrency, running: &[R]) -> Decision<R> {
    match concurrency {
        _ if running.is_empty() => Decision::Start,
        Concurrency::Allow => Decision::Start,
        Concurrency::Forbid => Decision::Skip {
            running: running.to_vec(),
        },
        Concurrency::Replace => Decision::Replace {
            cancel: running.to_vec(),
        },
    }
}

/// The wall-clock date and time of `at` in `schedule`'s zone, with its offset
/// (`2026-03-29T03:00:00+02:00[Europe/Berlin]`): how `status` shows a run's time.
pub fn local_time(schedule: &ScheduleSpec, at: SystemTime) -> Option<String> {
    Some(zoned(schedule, at)?.0.to_string())
}
