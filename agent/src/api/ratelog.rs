//! A log budget: at most N lines of one kind per window, the rest counted and reported
//! once the window is over, so that a client repeating a refused request cannot flood the
//! log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogBudget {
    what: &'static str,
    per_window: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    /// `what` names the lines in the summary of those left out ("TLS handshakes refused").
    pub const fn new(what: &'static str, per_window: u32, window: Duration) -> Self {
        LogBudget {
            what,
            per_window,
            window,
            state: Mutex::new(State {
                window_start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether one more line may be logged now; a new window first reports how many of
    /// the last one were left out.
    pub fn admit(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.window_start
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window)
        {
            if s.suppressed > 0 {
                tracing::warn!(
                    "{} more {} without being logged in the last {}s",
                    s.suppressed,
                    self.what,
                    self.window.as_secs()
                );
            }
            *s = State {
                window_start: Some(now),
                ..State::default()
            };
        }
        if s.logged < self.per_window {
            s.logged += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_budget_then_counts() {
        let b = LogBudget::new("tests", 3, Duration::from_secs(3600));
        let admitted = (0..10).filter(|_| b.admit()).count();
        assert_eq!(admitted, 3);
        let s = b.state.lock().expect("lock");
        assert_eq!(s.suppressed, 7);
    }
}
