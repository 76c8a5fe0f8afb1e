//! A watcher: replay, then live. It reads the files while it is behind what memory holds,
//! switches to memory and the live channel under the log's lock (so that no event falls
//! between the two or arrives twice), and is cut off if the live channel overruns it.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError};

use super::segment::Replay;
use super::{Event, EventError, Filter, Shared, State};

/// The events of the log from some index on, in order, then the new ones as they come.
/// Obtained from [`super::EventLog::watch`]; dropping it is all it takes to stop watching.
pub struct Watch {
    shared: Arc<Shared>,
    /// Where the log's files are; `None` for a log in memory.
    dir: Option<PathBuf>,
    filter: Filter,
    /// The next index to look at: every index below it was delivered, is in `pending`, or
    /// did not pass the filter.
    cursor: u64,
    /// Events read ahead (from the files or from memory), to be delivered before anything else.
    pending: VecDeque<Arc<Event>>,
    /// Subscribed once the watcher has caught up with memory.
    live: Option<broadcast::Receiver<Arc<Event>>>,
    /// Position in the files while replaying from them.
    replay: Option<Replay>,
    /// Set once the watcher was overrun: the index to resume from.
    cut_off: Option<u64>,
}

impl Watch {
    pub(super) fn new(
        shared: Arc<Shared>,
        dir: Option<PathBuf>,
        from: u64,
        filter: Filter,
    ) -> Watch {
        Watch {
            shared,
            dir,
            filter,
            cursor: from,
            pending: VecDeque::new(),
            live: None,
            replay: None,
            cut_off: None,
        }
    }

    /// If memory holds everything from the cursor on, take it and subscribe to what comes
    /// next. Called with the log locked: appends wait, so the copy ends exactly where the
    /// subscription begins.
    pub(super) fn go_live(&mut self, state: &State, live: &broadcast::Sender<Arc<Event>>) -> bool {
        if self.cursor < state.window_start() {
            return false;
        }
        let skip = state.window.partition_point(|e| e.index < self.cursor);
        self.pending.extend(
            state
                .window
                .range(skip..)
                .filter(|e| self.filter.matches(e))
                .cloned(),
        );
        self.live = Some(live.subscribe());
        self.cursor = state.next;
        self.replay = None;
        true
    }

    /// The index a new watch would have to start from to continue exactly where this one is.
    pub fn resume_from(&self) -> u64 {
        self.cut_off
            .or_else(|| self.pending.front().map(|e| e.index))
            .unwrap_or(self.cursor)
    }

    /// The next event that passes the filter. Waits for one when the watcher is up to date.
    ///
    /// Errors: [`EventError::Lagged`] once the watcher was overrun (and from then on);
    /// [`EventError::Trimmed`] when retention deleted what a replay still had to read;
    /// [`EventError::Io`] when the files cannot be read (the next call tries again).
    ///
    /// Cancel safe: dropping the future loses no event, the next call carries on.
    pub async fn next(&mut self) -> Result<Event, EventError> {
        loop {
            if let Some(resume_from) = self.cut_off {
                return Err(EventError::Lagged { resume_from });
            }
            if let Some(event) = self.pending.pop_front() {
                return Ok(Arc::unwrap_or_clone(event));
            }
            if let Some(live) = self.live.as_mut() {
                match live.recv().await {
                    Ok(event) => {
                        if event.index < self.cursor {
                            continue;
                        }
                        self.cursor = event.index + 1;
                        if self.filter.matches(&event) {
                            return Ok(Arc::unwrap_or_clone(event));
                        }
                    }
                    // `Closed` cannot happen: this watcher holds the sender through `shared`.
                    Err(RecvError::Lagged(_) | RecvError::Closed) => {
                        self.live = None;
                        self.cut_off = Some(self.cursor);
                    }
                }
                continue;
            }

            let snapshot = {
                let shared = Arc::clone(&self.shared);
                let state = shared.lock();
                if self.go_live(&state, &shared.live) {
                    continue;
                }
                state.snapshot()
            };
            let Some(dir) = self.dir.clone() else {
                // In memory only, what is not in memory is gone.
                return Err(EventError::Trimmed {
                    requested: self.cursor,
                    oldest: snapshot.oldest,
                });
            };
            let mut replay = self
                .replay
                .take()
                .unwrap_or_else(|| Replay::new(dir.clone()));
            let (cursor, filter) = (self.cursor, self.filter.clone());
            let (replay, result) = tokio::task::spawn_blocking(move || {
                let result = replay.read(cursor, &snapshot, &filter);
                (replay, result)
            })
            .await
            .map_err(|e| EventError::Io {
                path: dir,
                what: "replaying",
                source: io::Error::other(e),
            })?;
            self.replay = Some(replay);
            match result {
                Ok(batch) => {
                    self.cursor = batch.cursor;
                    self.pending.extend(batch.events.into_iter().map(Arc::new));
                }
                Err(EventError::Trimmed { requested, .. }) => {
                    return Err(EventError::Trimmed {
                        requested,
                        oldest: self.shared.lock().oldest(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("filter", &self.filter)
            .field("resume_from", &self.resume_from())
            .field("live", &self.live.is_some())
            .finish_non_exhaustive()
    }
}
