//! A job's runs, pure: what a run is (its id `NAME-rN`, trigger, times, attempts, outcome),
//! which instance slots it uses, and how its outcome follows from how its instances ended.
//! The driver (`driver/jobs.rs`) starts, stops, saves and prunes runs; this module decides
//! nothing about time or the OS and is table-tested.
//!
//! A run of parallelism `p` uses the slots `N * RUN_STRIDE + i` for `i` in `0..p`: its
//! instances are `NAME-<N*1000+i>`, so a run's instances are found from its number alone,
//! after an agent restart too.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::instance::{ExitClass, ExitInfo};
use crate::spec::job::overrides::RunOverrides;
use crate::spec::{InstanceKey, MAX_REPLICAS};

/// Slots per run: a run's instance `i` is at slot `number * RUN_STRIDE + i`.
pub const RUN_STRIDE: u32 = MAX_REPLICAS;

/// Run numbers wrap before the slot index would overflow (after 4 million runs; `history`
/// keeps at most 1000, so a wrapped number never meets a kept one).
const RUN_WRAP: u64 = (u32::MAX / RUN_STRIDE) as u64 - 1;

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `RunJob` (`corral run`).
    Manual,
    /// Its `[schedule]`, on time.
    Schedule,
    /// Its `[schedule]`, late: a run missed while the agent was down, within `catch_up`.
    CatchUp,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch_up",
        }
    }
}

/// How a run (or one of its instances) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Outcome {
    Succeeded,
    /// Its last attempt ended otherwise than with exit code 0: `exited(3)`, `signaled(9)`,
    /// `lost`.
    Failed(ExitClass),
    /// The kernel's OOM killer ended its last attempt.
    OomKilled,
    /// An attempt ran longer than `job.timeout`: stopped, and not retried.
    TimedOut,
    /// `CancelRun`, a `replace` schedule, or the job's deletion stopped it.
    Cancelled,
}

impl fmt::Display for Outcome {
    /// `succeeded`, `failed(exit 3)`, `failed(signal 9)`, `oom_killed`, `timed_out`,
    /// `cancelled`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded => f.write_str("succeeded"),
            Outcome::Failed(ExitClass::Exited(code)) => write!(f, "failed(exit {code})"),
            Outcome::Failed(ExitClass::Signaled(sig)) => write!(f, "failed(signal {sig})"),
            Outcome::Failed(class) => write!(f, "failed({class})"),
            Outcome::OomKilled => f.write_str("oom_killed"),
            Outcome::TimedOut => f.write_str("timed_out"),
            Outcome::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl From<Outcome> for String {
    fn from(o: Outcome) -> String {
        o.to_string()
    }
}

impl TryFrom<String> for Outcome {
    type Error = String;

    /// The text [`Outcome`]'s `Display` writes.
    fn try_from(text: String) -> Result<Outcome, String> {
        let outcome = match text.as_str() {
            "succeeded" => Outcome::Succeeded,
            "oom_killed" => Outcome::OomKilled,
            "timed_out" => Outcome::TimedOut,
            "cancelled" => Outcome::Cancelled,
            _ => {
                let inner = text
                    .strip_prefix("failed(")
                    .and_then(|t| t.strip_suffix(')'))
                    .ok_or_else(|| format!("{text:?} is not a run outcome"))?;
                let number = |n: &str| n.parse::<i32>().map_err(|e| format!("{text:?}: {e}"));
                let class = if let Some(code) = inner.strip_prefix("exit ") {
                    ExitClass::Exited(number(code)?)
                } else if let Some(sig) = inner.strip_prefix("signal ") {
                    ExitClass::Signaled(number(sig)?)
                } else {
                    inner.parse().map_err(|e| format!("{e}"))?
                };
                Outcome::Failed(class)
            }
        };
        Ok(outcome)
    }
}

impl Outcome {
    /// How one attempt's end counts.
    pub fn of_exit(exit: &ExitInfo) -> Outcome {
        if exit.is_success() {
            return Outcome::Succeeded;
        }
        match exit.class {
            ExitClass::OomKilled => Outcome::OomKilled,
            // Code 0 with a setup error: the command never ran.
            ExitClass::Exited(0) => Outcome::Failed(ExitClass::Lost),
            class => Outcome::Failed(class),
        }
    }

    /// The exit code `corral run --wait` returns: 0 succeeded, the job's own code on
    /// `failed(exit N)`, 128+N on `failed(signal N)`, and for the rest codes of their own.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::Failed(ExitClass::Exited(code)) => code,
            Outcome::Failed(ExitClass::Signaled(sig)) => 128 + sig,
            Outcome::Failed(_) => EXIT_LOST,
            Outcome::OomKilled => EXIT_OOM_KILLED,
            Outcome::TimedOut => EXIT_TIMED_OUT,
            Outcome::Cancelled => EXIT_CANCELLED,
        }
    }
}

/// `corral run --wait`'s exit code for a run that ended `timed_out` (as `timeout(1)`).
pub const EXIT_TIMED_OUT: i32 = 124;
/// ... `cancelled`.
pub const EXIT_CANCELLED: i32 = 125;
/// ... `oom_killed` (128 + SIGKILL, as a shell reports a killed process).
pub const EXIT_OOM_KILLED: i32 = 137;
/// ... `failed(lost)`: its end could not be observed, or its command never ran.
pub const EXIT_LOST: i32 = 126;

/// One instance of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInstance {
    /// `CORRAL_JOB_INDEX`.
    pub index: u32,
    /// Attempts started (1 + retries so far).
    pub attempts: u32,
    /// When its current attempt started (its timeout counts from here).
    pub attempt_started: Option<SystemTime>,
    /// Set once it has ended for good.
    pub end: Option<Outcome>,
}

/// A run of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub job: String,
    pub number: u64,
    pub trigger: Trigger,
    /// The job's revision it runs.
    pub revision: u64,
    /// When a scheduled run was due (a run starts up to `jitter` later).
    pub due: Option<SystemTime>,
    pub started_at: SystemTime,
    pub ended_at: Option<SystemTime>,
    pub outcome: Option<Outcome>,
    /// Why it is being stopped (`timed_out`, `cancelled`); the outcome once it has ended.
    pub stopping: Option<Outcome>,
    pub instances: Vec<RunInstance>,
    /// What `RunJob` changed of the job's spec for this run.
    #[serde(default, skip_serializing_if = "RunOverrides::is_empty")]
    pub overrides: RunOverrides,
}

impl Run {
    /// A run that starts now with `parallelism` instances.
    pub fn new(
        job: &str,
        number: u64,
        trigger: Trigger,
        revision: u64,
        parallelism: u32,
        due: Option<SystemTime>,
        now: SystemTime,
    ) -> Run {
        Run {
            job: job.to_owned(),
            number,
            trigger,
            revision,
            due,
            started_at: now,
            ended_at: None,
            outcome: None,
            stopping: None,
            instances: (0..parallelism)
                .map(|index| RunInstance {
                    index,
                    attempts: 0,
                    attempt_started: None,
                    end: None,
                })
                .collect(),
            overrides: RunOverrides::default(),
        }
    }

    /// `NAME-rN`.
    pub fn id(&self) -> String {
        run_id(&self.job, self.number)
    }

    pub fn ended(&self) -> bool {
        self.outcome.is_some()
    }

    /// Attempts started, over all its instances.
    pub fn attempts(&self) -> u32 {
        self.instances.iter().map(|i| i.attempts).sum()
    }

    /// The slot of its instance `index`.
    pub fn slot(&self, index: u32) -> u32 {
        slot_of(self.number, index)
    }

    /// Its instances' keys, in order.
    pub fn keys(&self) -> Vec<InstanceKey> {
        self.instances
            .iter()
            .map(|i| InstanceKey::new(&self.job, self.slot(i.index)))
            .collect()
    }

    /// Which of its instances `slot` is.
    pub fn instance_at(&self, slot: u32) -> Option<usize> {
        let index = slot.checked_sub(slot_of(self.number, 0))?;
        self.instances.iter().position(|i| i.index == index)
    }

    /// Once every instance has ended: the run's outcome. A stop asked for (`timed_out`,
    /// `cancelled`) wins; else the first instance that did not succeed, by index; else
    /// `succeeded`. `None` while one still runs.
    pub fn settle(&self) -> Option<Outcome> {
        let ends: Option<Vec<Outcome>> = self.instances.iter().map(|i| i.end).collect();
        let ends = ends?;
        if let Some(stop) = self.stopping {
            return Some(stop);
        }
        Some(
            ends.into_iter()
                .find(|o| *o != Outcome::Succeeded)
                .unwrap_or(Outcome::Succeeded),
        )
    }
}

/// A run's id: `NAME-rN`.
pub fn run_id(job: &str, number: u64) -> String {
    format!("{job}-r{number}")
}

/// `NAME-rN` split into the job's name and N.
pub fn parse_run_id(id: &str) -> Option<(&str, u64)> {
    let (job, number) = id.rsplit_once("-r")?;
    let number: u64 = number.parse().ok()?;
    (!job.is_empty() && number > 0).then_some((job, number))
}

/// The slot of instance `index` of run `number`.
pub fn slot_of(number: u64, index: u32) -> u32 {
    let wrapped = u32::try_from(number % RUN_WRAP).unwrap_or(0);
    wrapped * RUN_STRIDE + index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(class: ExitClass) -> ExitInfo {
        ExitInfo {
            class,
            at: SystemTime::UNIX_EPOCH,
            setup_error: None,
            output: None,
        }
    }

    #[test]
    fn outcomes_read_and_exit_as_documented() {
        let table = [
            (Outcome::Succeeded, "succeeded", 0),
            (Outcome::Failed(ExitClass::Exited(3)), "failed(exit 3)", 3),
            (
                Outcome::Failed(ExitClass::Signaled(9)),
                "failed(signal 9)",
                137,
            ),
            (Outcome::Failed(ExitClass::Lost), "failed(lost)", EXIT_LOST),
            (Outcome::OomKilled, "oom_killed", EXIT_OOM_KILLED),
            (Outcome::TimedOut, "timed_out", EXIT_TIMED_OUT),
            (Outcome::Cancelled, "cancelled", EXIT_CANCELLED),
        ];
        for (outcome, text, code) in table {
            assert_eq!(outcome.to_string(), text);
            assert_eq!(outcome.exit_code(), code, "{text}");
            let json = serde_json::to_string(&outcome).expect("serializes");
            let back: Outcome = serde_json::from_str(&json).expect("reads back");
            assert_eq!(back, outcome, "{json}");
        }
    }

    #[test]
    fn an_attempt_counts_by_how_it_ended() {
        assert_eq!(
            Outcome::of_exit(&exit(ExitClass::Exited(0))),
            Outcome::Succeeded
        );
        assert_eq!(
            Outcome::of_exit(&exit(ExitClass::Exited(2))),
            Outcome::Failed(ExitClass::Exited(2))
        );
        assert_eq!(
            Outcome::of_exit(&exit(ExitClass::OomKilled)),
            Outcome::OomKilled
        );
        let never_ran = ExitInfo {
            setup_error: Some("exec: no such file".into()),
            ..exit(ExitClass::Exited(0))
        };
        assert_eq!(
            Outcome::of_exit(&never_ran),
            Outcome::Failed(ExitClass::Lost)
        );
    }

    #[test]
    fn a_run_settles_once_every_instance_ended() {
        let mut run = Run::new("r", 4, Trigger::Manual, 1, 3, None, SystemTime::UNIX_EPOCH);
        assert_eq!(run.settle(), None);
        run.instances[0].end = Some(Outcome::Succeeded);
        run.instances[2].end = Some(Outcome::Failed(ExitClass::Exited(5)));
        assert_eq!(run.settle(), None);
        run.instances[1].end = Some(Outcome::OomKilled);
        assert_eq!(run.settle(), Some(Outcome::OomKilled), "first by index");
        run.stopping = Some(Outcome::TimedOut);
        assert_eq!(run.settle(), Some(Outcome::TimedOut), "a stop wins");
        for i in &mut run.instances {
            i.end = Some(Outcome::Succeeded);
        }
        run.stopping = None;
        assert_eq!(run.settle(), Some(Outcome::Succeeded));
    }

    #[test]
    fn slots_and_ids_find_a_run_and_its_instances() {
        let run = Run::new(
            "nightly-r",
            42,
            Trigger::Schedule,
            1,
            2,
            None,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(run.id(), "nightly-r-r42");
        assert_eq!(parse_run_id(&run.id()), Some(("nightly-r", 42)));
        assert_eq!(parse_run_id("web-3"), None);
        assert_eq!(parse_run_id("web-r0"), None);
        let keys: Vec<String> = run.keys().iter().map(ToString::to_string).collect();
        assert_eq!(keys, ["nightly-r-42000", "nightly-r-42001"]);
        assert_eq!(run.instance_at(42001), Some(1));
        assert_eq!(run.instance_at(42002), None);
        assert_eq!(run.instance_at(41999), None);
        assert!(slot_of(u64::MAX, RUN_STRIDE - 1) < u32::MAX);
    }
}
