//! The node's event log: every state change of the agent, numbered 1, 2, 3 … in the order it
//! happened, persisted under the state directory and bounded to the most recent `keep` events.
//! [`EventLog::watch`] replays from an index and then follows live, in order, without gaps or
//! duplicates, so a client that lost its connection resumes exactly where it stopped.
//!
//! Owns the directory it is opened on (`<state-dir>/events/`): one [`EventLog`] per
//! directory, which the state directory's lock guarantees. On disk the log is JSON Lines
//! segments `<first-index>.jsonl`, one [`Event`] per line:
//!
//! ```text
//! {"index":7,"time":"2023-11-14T22:13:20.123456Z","service":"web","instance":"web-0","kind":{"type":"ready","via":"probe"}}
//! ```
//!
//! Bounds: a segment holds `keep / 10` events (1 to 10 000), and whole segments are deleted
//! from the old end as soon as the newer ones hold `keep`, so the files hold fewer than
//! `keep` events plus one segment (110 000 lines, about 20 MB, with the default). Memory holds
//! the newest `min(keep, LIVE_WINDOW)` events whatever `keep` is; a replay from further back
//! reads the files, a batch at a time, on the blocking pool. Lines are written, not fsynced:
//! an agent crash loses nothing appended, a power loss may lose the last events.
//!
//! [`EventLog::append`] never waits for a watcher: it writes one line and hands the event to
//! a broadcast channel of [`LIVE_WINDOW`] slots. A live watcher that falls further behind
//! than that is cut off with [`EventError::Lagged`], which says where to resume; a watcher
//! still replaying from the files holds nothing and is never cut off (only retention can
//! overtake it: [`EventError::Trimmed`]).
//!
//! Imports from the crate: the vocabulary it records, the domain's own state enums
//! (`health::HealthState`, `rollout::record`'s kind, state and step, `supervisor::instance`'s
//! exit class and stop reason, `supervisor::desired::ApplyKind`); none of those import it.

mod kind;
mod segment;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use kind::{EventKind, PackagePhase, ReadyVia};
pub use watch::Watch;

use segment::{Segments, Snapshot};

/// Events held in memory, and the number of events a live watcher may fall behind before it
/// is cut off.
pub const LIVE_WINDOW: usize = 1024;

/// Events kept by default.
pub const DEFAULT_KEEP: usize = 100_000;

/// One entry of the log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position in the log: 1 for the first event ever appended, one more for each after.
    pub index: u64,
    /// When it was appended (RFC 3339 in UTC on disk, microsecond precision).
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub service: String,
    /// The instance (`web-0`) when the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The run of the instance it is about (see `InstanceStatus.incarnation`); 0 for events
    /// about a whole service, about an instance before its first start, and of older logs.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
    pub kind: EventKind,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Which events a watcher wants: all of them when both are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub service: Option<String>,
    /// Matches [`Event::instance`]; events about a whole service have none and do not match.
    pub instance: Option<String>,
}

impl Filter {
    pub fn all() -> Filter {
        Filter::default()
    }

    pub fn service(name: &str) -> Filter {
        Filter {
            service: Some(name.to_owned()),
            instance: None,
        }
    }

    pub fn instance(id: &str) -> Filter {
        Filter {
            service: None,
            instance: Some(id.to_owned()),
        }
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.service.as_deref().is_none_or(|s| s == event.service)
            && self
                .instance
                .as_deref()
                .is_none_or(|i| event.instance.as_deref() == Some(i))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event {requested} is no longer kept: the oldest event kept is {oldest}")]
    Trimmed { requested: u64, oldest: u64 },
    #[error("event {requested} does not exist yet: the next event will be {next}")]
    InvalidIndex { requested: u64, next: u64 },
    #[error(
        "the watcher fell too far behind the event log and was cut off: resume from index {resume_from}"
    )]
    Lagged { resume_from: u64 },
    #[error("event log {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The per-node event log. Shared as `Arc<EventLog>`; cheap to append to from any thread.
pub struct EventLog {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    live: broadcast::Sender<Arc<Event>>,
}

struct State {
    next: u64,
    /// The newest events, oldest first: at most `window_cap`.
    window: VecDeque<Arc<Event>>,
    window_cap: usize,
    /// `None` for a log in memory only.
    disk: Option<Segments>,
}

impl EventLog {
    /// Open the log persisted in `dir` (created if needed), keeping the newest `keep` events
    /// (at least 1). Indexes continue where the last run stopped. A torn last line is cut off
    /// and unreadable lines are skipped with a warning; only an I/O error fails.
    pub fn open(dir: &Path, keep: usize) -> Result<EventLog, EventError> {
        EventLog::open_with(dir, keep, LIVE_WINDOW)
    }

    fn open_with(dir: &Path, keep: usize, window: usize) -> Result<EventLog, EventError> {
        let window_cap = window.clamp(1, keep.max(1));
        let loaded = Segments::load(dir, keep, window_cap)?;
        Ok(EventLog::build(State {
            next: loaded.next,
            window: loaded.recent,
            window_cap,
            disk: Some(loaded.segments),
        }))
    }

    /// A log that lives in memory only and holds its newest `keep` events there; for tests
    /// of the modules that append.
    pub fn in_memory(keep: usize) -> EventLog {
        EventLog::build(State {
            next: 1,
            window: VecDeque::new(),
            window_cap: keep.max(1),
            disk: None,
        })
    }

    fn build(state: State) -> EventLog {
        let (live, _) = broadcast::channel(LIVE_WINDOW);
        EventLog {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                live,
            }),
        }
    }

    /// Append an event and return its index. Never waits for watchers; a failed write is
    /// logged and counted ([`EventLog::write_errors`]) and the event still reaches the live
    /// watchers.
    pub fn append(&self, service: &str, instance: Option<&str>, kind: EventKind) -> u64 {
        self.append_run(service, instance.map(|i| (i, 0)), kind)
    }

    /// [`EventLog::append`] of an event about one run of an instance: its id and incarnation.
    pub fn append_run(&self, service: &str, instance: Option<(&str, u64)>, kind: EventKind) -> u64 {
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        let index = state.next;
        state.next += 1;
        let event = Arc::new(Event {
            index,
            time: SystemTime::now(),
            service: service.to_owned(),
            instance: instance.map(|(i, _)| i.to_owned()),
            incarnation: instance.map_or(0, |(_, n)| n),
            kind,
        });
        if let Some(disk) = state.disk.as_mut() {
            disk.append(&event);
        }
        if state.window.len() >= state.window_cap {
            state.window.pop_front();
        }
        state.window.push_back(Arc::clone(&event));
        // Sent under the lock, so the channel carries the events in index order. An error
        // only means that nobody is watching.
        let _ = self.shared.live.send(event);
        index
    }

    /// The oldest index that can still be watched from (`next()` when the log is empty).
    pub fn oldest(&self) -> u64 {
        self.shared.lock().oldest()
    }

    /// The index the next append will get.
    pub fn next(&self) -> u64 {
        self.shared.lock().next
    }

    /// Writes to disk that failed since the log was opened.
    pub fn write_errors(&self) -> u64 {
        self.shared
            .lock()
            .disk
            .as_ref()
            .map_or(0, Segments::write_errors)
    }

    /// Replay the events from index `from` (0: from the oldest kept), then follow new ones,
    /// keeping those that pass `filter`. `from == next()` follows only new events.
    pub fn watch(&self, from: u64, filter: Filter) -> Result<Watch, EventError> {
        let state = self.shared.lock();
        let oldest = state.oldest();
        let from = if from == 0 { oldest } else { from };
        if from > state.next {
            return Err(EventError::InvalidIndex {
                requested: from,
                next: state.next,
            });
        }
        if from < oldest {
            return Err(EventError::Trimmed {
                requested: from,
                oldest,
            });
        }
        let dir = state.disk.as_ref().map(|d| d.dir().to_path_buf());
        let mut watch = Watch::new(Arc::clone(&self.shared), dir, from, filter);
        watch.go_live(&state, &self.shared.live);
        Ok(watch)
    }
}

impl fmt::Debug for EventLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("EventLog")
            .field("dir", &state.disk.as_ref().map(Segments::dir))
            .field("oldest", &state.oldest())
            .field("next", &state.next)
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn window_start(&self) -> u64 {
        self.window.front().map_or(self.next, |e| e.index)
    }

    fn oldest(&self) -> u64 {
        let memory = self.window_start();
        match self.disk.as_ref().and_then(Segments::oldest) {
            Some(disk) => disk.min(memory),
            None => memory,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            window_start: self.window_start(),
            oldest: self.oldest(),
            firsts: self.disk.as_ref().map(Segments::firsts).unwrap_or_default(),
        }
    }
}

/// `SystemTime` as an RFC 3339 string in UTC. Times outside 1970..9999 (a clock gone wrong)
/// are clamped rather than failing the write.
mod rfc3339 {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// 9999-12-31T23:59:59Z
    const LAST: u64 = 253_402_300_799;

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let clamped = if since.as_secs() > LAST {
            UNIX_EPOCH + Duration::from_secs(LAST)
        } else {
            (*time).max(UNIX_EPOCH)
        };
        s.collect_str(&humantime::format_rfc3339_micros(clamped))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(D::Error::custom)
    }
}
