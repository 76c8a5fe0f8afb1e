//! Rollouts: replacing a service's instances with ones of a new target (a revision and an
//! epoch: an update changes both, a restart only the epoch) batch by batch, within
//! `max_surge` and `max_unavailable`, gated on health. This module is the pure planner: from
//! the policy and the instances' states it says what to do next; the supervisor does it.
//!
//! Rules, for `replicas` = N, `max_surge` = S, `max_unavailable` = U:
//! - a *new* instance runs the target; it is *ready* once healthy (or, without `[health]`,
//!   running) for `min_healthy`; an *old* one runs anything else;
//! - new instances are started while old + new < N + S and new < N;
//! - an old instance is stopped only while the instances that would still be available
//!   (ready new ones, healthy old ones) stay at least N - U; broken old ones go first;
//! - the rollout fails when a new instance it started ends (crashes) or is not ready within
//!   `healthy_deadline` of its start; it is complete when no old instance is left and N new
//!   ones are ready.
//!
//! Imports from the crate: `spec` only.

pub mod record;

use std::time::Duration;

use tokio::time::Instant;

use crate::spec::RolloutSpec;

/// One instance as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    /// It runs the target revision and epoch.
    pub new: bool,
    /// The running rollout started it: its failing (ending, or missing its deadline) fails
    /// the rollout. New instances that were there before (those an auto-rollback returns to)
    /// are only waited for.
    pub started_here: bool,
    pub state: SlotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Started (or starting) at `since`; not yet ready.
    Starting { since: Instant },
    /// Healthy (or, without health checks, running) since `since`.
    Healthy { since: Instant, started: Instant },
    /// Running but failing its health check.
    Unhealthy { started: Instant },
    /// Not running (waiting to restart, exited) after having been started.
    Down,
    /// Being stopped or removed: counts for nothing.
    Leaving,
}

/// The planner's inputs besides the instances.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub replicas: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_healthy: Duration,
    pub healthy_deadline: Duration,
    /// A rollout is under way: new instances that end or miss their deadline fail it.
    /// Otherwise (steady state) they are only waited for.
    pub rolling: bool,
}

impl Policy {
    pub fn new(replicas: u32, r: &RolloutSpec, rolling: bool) -> Policy {
        Policy {
            replicas,
            max_surge: r.max_surge,
            max_unavailable: r.max_unavailable,
            min_healthy: r.min_healthy,
            healthy_deadline: r.healthy_deadline,
            rolling,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start one new instance.
    StartNew,
    /// Stop this old instance (it is removed once stopped).
    StopOld { index: u32 },
    /// Stop this new instance: there are more than `replicas` (a scale-down).
    StopExtra { index: u32 },
}

/// What the planner found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Do these (possibly nothing: waiting for instances to become ready).
    Steps(Vec<Step>),
    /// Every old instance is gone and `replicas` new ones are ready.
    Complete,
    /// A new instance failed: stop here.
    Failed { index: u32, reason: String },
}

/// Counts derived from the slots, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub new: u32,
    pub new_ready: u32,
    pub old: u32,
    pub available: u32,
}

fn ready(s: &Slot, now: Instant, min_healthy: Duration) -> bool {
    matches!(s.state, SlotState::Healthy { since, .. } if now.saturating_duration_since(since) >= min_healthy)
}

fn available_old(s: &Slot) -> bool {
    !s.new && matches!(s.state, SlotState::Healthy { .. })
}

/// The counts of the rollout so far.
pub fn progress(p: &Policy, slots: &[Slot], now: Instant) -> Progress {
    let present = || slots.iter().filter(|s| s.state != SlotState::Leaving);
    let new = crate::num::count_u32(present().filter(|s| s.new).count());
    let new_ready = crate::num::count_u32(
        present()
            .filter(|s| s.new && ready(s, now, p.min_healthy))
            .count(),
    );
    let old = crate::num::count_u32(present().filter(|s| !s.new).count());
    let available =
        new_ready + crate::num::count_u32(present().filter(|s| available_old(s)).count());
    Progress {
        new,
        new_ready,
        old,
        available,
    }
}

/// The next steps of a rollout (also for a service with nothing to replace: it then says
/// `Complete`, or starts what is missing).
pub fn plan(p: &Policy, slots: &[Slot], now: Instant) -> Plan {
    // Failures of new instances end the rollout.
    for s in slots
        .iter()
        .filter(|s| s.new && s.started_here && p.rolling)
    {
        match s.state {
            SlotState::Down => {
                return Plan::Failed {
                    index: s.index,
                    reason: format!("new instance {} ended during the rollout", s.index),
                };
            }
            SlotState::Starting { since: started }
            | SlotState::Unhealthy { started }
            | SlotState::Healthy { started, .. }
                if !ready(s, now, p.min_healthy)
                    && now.saturating_duration_since(started) > p.healthy_deadline =>
            {
                return Plan::Failed {
                    index: s.index,
                    reason: format!(
                        "new instance {} was not healthy for {} within {}",
                        s.index,
                        crate::spec::format_duration(p.min_healthy),
                        crate::spec::format_duration(p.healthy_deadline)
                    ),
                };
            }
            _ => {}
        }
    }
    let pr = progress(p, slots, now);
    if pr.old == 0 && pr.new_ready >= p.replicas && pr.new <= p.replicas {
        return Plan::Complete;
    }
    let mut steps = Vec::new();
    // More new instances than wanted: the highest indexes go, not-ready ones first.
    if pr.new > p.replicas {
        let mut extra: Vec<&Slot> = slots
            .iter()
            .filter(|s| s.new && s.state != SlotState::Leaving)
            .collect();
        extra.sort_by_key(|s| (ready(s, now, p.min_healthy), std::cmp::Reverse(s.index)));
        for s in extra.into_iter().take((pr.new - p.replicas) as usize) {
            steps.push(Step::StopExtra { index: s.index });
        }
    }
    // Start new instances within the surge.
    let mut new = pr.new;
    let mut total = pr.new + pr.old;
    while total < p.replicas + p.max_surge && new < p.replicas {
        steps.push(Step::StartNew);
        new += 1;
        total += 1;
    }
    // Stop old instances while availability allows: broken ones first (they cost no
    // availability), then the highest index.
    let floor = p.replicas.saturating_sub(p.max_unavailable);
    let mut available = pr.available;
    let mut old: Vec<&Slot> = slots
        .iter()
        .filter(|s| !s.new && s.state != SlotState::Leaving)
        .collect();
    old.sort_by_key(|s| (available_old(s), std::cmp::Reverse(s.index)));
    for s in old {
        // Keep enough instances overall: old ones go only as new ones take their place
        // (or within max_unavailable).
        let after_total = total - 1;
        if after_total + p.max_unavailable < p.replicas {
            break;
        }
        // A broken old instance costs no availability: it may always go.
        let costs = u32::from(available_old(s));
        if costs == 1 && available.saturating_sub(1) < floor {
            break;
        }
        steps.push(Step::StopOld { index: s.index });
        available -= costs;
        total -= 1;
    }
    Plan::Steps(steps)
}

/// When the plan may change by time alone: a new instance's `min_healthy` elapsing, or (in a
/// rollout) its `healthy_deadline` passing.
pub fn next_change(p: &Policy, slots: &[Slot], now: Instant) -> Option<Instant> {
    let past_deadline = |started: Instant| started + p.healthy_deadline + Duration::from_millis(1);
    slots
        .iter()
        .filter(|s| s.new && !ready(s, now, p.min_healthy))
        .filter_map(|s| match s.state {
            SlotState::Healthy { since, started } => {
                let ready_at = since + p.min_healthy;
                Some(if p.rolling && s.started_here {
                    ready_at.min(past_deadline(started))
                } else {
                    ready_at
                })
            }
            SlotState::Starting { since: started } | SlotState::Unhealthy { started }
                if p.rolling && s.started_here =>
            {
                Some(past_deadline(started))
            }
            _ => None,
        })
        .min()
}

/// The new instances that are ready (healthy for `min_healthy`), by index.
pub fn ready_indexes(p: &Policy, slots: &[Slot], now: Instant) -> Vec<u32> {
    slots
        .iter()
        .filter(|s| s.new && ready(s, now, p.min_healthy))
        .map(|s| s.index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(2);

    fn pol(replicas: u32, surge: u32, unavailable: u32) -> Policy {
        Policy {
            replicas,
            max_surge: surge,
            max_unavailable: unavailable,
            min_healthy: MIN,
            healthy_deadline: Duration::from_secs(60),
            rolling: true,
        }
    }

    /// Slots from a compact description: "O" healthy old, "o" unhealthy old, "N" ready new,
    /// "h" new healthy just now, "n" starting new, "d" new that ended, "D" new that ended but
    /// was there before the rollout, "x" leaving.
    fn slots(desc: &str, now: Instant) -> Vec<Slot> {
        let long_ago = now - Duration::from_secs(10);
        desc.chars()
            .enumerate()
            .map(|(i, c)| {
                let (new, state) = match c {
                    'O' => (
                        false,
                        SlotState::Healthy {
                            since: long_ago,
                            started: long_ago,
                        },
                    ),
                    'o' => (false, SlotState::Unhealthy { started: long_ago }),
                    'N' => (
                        true,
                        SlotState::Healthy {
                            since: long_ago,
                            started: long_ago,
                        },
                    ),
                    'h' => (
                        true,
                        SlotState::Healthy {
                            since: now,
                            started: now,
                        },
                    ),
                    'n' => (true, SlotState::Starting { since: now }),
                    'd' | 'D' => (true, SlotState::Down),
                    'x' => (false, SlotState::Leaving),
                    other => panic!("no slot kind {other}"),
                };
                Slot {
                    index: crate::num::count_u32(i),
                    new,
                    started_here: new && c != 'D',
                    state,
                }
            })
            .collect()
    }

    #[test]
    fn plan_table() {
        let now = Instant::now();
        use Step::{StartNew as S, StopOld as K};
        let cases: Vec<(&str, Policy, &str, Plan)> = vec![
            (
                "surge 1: start one new first",
                pol(4, 1, 0),
                "OOOO",
                Plan::Steps(vec![S]),
            ),
            (
                "surge 1: wait while the new one is not ready",
                pol(4, 1, 0),
                "OOOOn",
                Plan::Steps(vec![]),
            ),
            (
                "surge 1: healthy but not for min_healthy yet",
                pol(4, 1, 0),
                "OOOOh",
                Plan::Steps(vec![]),
            ),
            (
                "surge 1: ready: stop the highest old",
                pol(4, 1, 0),
                "OOOON",
                Plan::Steps(vec![K { index: 3 }]),
            ),
            (
                "surge 1: after a stop, start the next",
                pol(4, 1, 0),
                "OOOxN",
                Plan::Steps(vec![S]),
            ),
            (
                "surge 0 unavailable 1: stop first",
                pol(4, 0, 1),
                "OOOO",
                Plan::Steps(vec![K { index: 3 }]),
            ),
            (
                "surge 0 unavailable 1: then start",
                pol(4, 0, 1),
                "OOOx",
                Plan::Steps(vec![S]),
            ),
            (
                "surge 0 unavailable 1: wait for the new one",
                pol(4, 0, 1),
                "OOOxn",
                Plan::Steps(vec![]),
            ),
            (
                "surge 2 unavailable 0: two at a time",
                pol(4, 2, 0),
                "OOOO",
                Plan::Steps(vec![S, S]),
            ),
            (
                "surge 2: two ready: stop two",
                pol(4, 2, 0),
                "OOOONN",
                Plan::Steps(vec![K { index: 3 }, K { index: 2 }]),
            ),
            (
                "broken old ones go first and cost nothing",
                pol(4, 1, 0),
                "OoOOn",
                Plan::Steps(vec![K { index: 1 }]),
            ),
            ("complete", pol(2, 1, 0), "NN", Plan::Complete),
            (
                "complete with leaving ones",
                pol(2, 1, 0),
                "xNN",
                Plan::Complete,
            ),
            (
                "a crashed new instance fails it",
                pol(4, 1, 0),
                "OOOOd",
                Plan::Failed {
                    index: 4,
                    reason: "new instance 4 ended during the rollout".into(),
                },
            ),
            (
                "nothing to replace: fill up",
                pol(3, 1, 0),
                "N",
                Plan::Steps(vec![S, S]),
            ),
            ("scale to zero", pol(0, 1, 0), "", Plan::Complete),
            (
                "scale down: the highest new ones go",
                pol(2, 1, 0),
                "NNNN",
                Plan::Steps(vec![
                    Step::StopExtra { index: 3 },
                    Step::StopExtra { index: 2 },
                ]),
            ),
            (
                "an instance the rollout did not start is only waited for",
                pol(2, 1, 0),
                "ND",
                Plan::Steps(vec![]),
            ),
            (
                "steady state: a crash-looping instance is no failure",
                Policy {
                    rolling: false,
                    ..pol(2, 1, 0)
                },
                "Nd",
                Plan::Steps(vec![]),
            ),
        ];
        for (name, p, desc, want) in cases {
            assert_eq!(plan(&p, &slots(desc, now), now), want, "{name}");
        }
    }

    #[test]
    fn next_change_is_readiness_or_the_deadline() {
        let now = Instant::now();
        let p = pol(2, 1, 0);
        let healthy = Slot {
            index: 0,
            new: true,
            started_here: true,
            state: SlotState::Healthy {
                since: now,
                started: now,
            },
        };
        let starting = Slot {
            index: 1,
            new: true,
            started_here: true,
            state: SlotState::Starting { since: now },
        };
        assert_eq!(next_change(&p, &[healthy], now), Some(now + MIN));
        assert_eq!(
            next_change(&p, &[starting], now),
            Some(now + Duration::from_secs(60) + Duration::from_millis(1))
        );
        let steady = Policy {
            rolling: false,
            ..p
        };
        assert_eq!(next_change(&steady, &[starting], now), None);
        assert_eq!(next_change(&p, &slots("OON", now), now), None);
        assert_eq!(ready_indexes(&p, &slots("ONhN", now), now), vec![1, 3]);
    }

    #[test]
    fn a_new_instance_past_its_deadline_fails_the_rollout() {
        let now = Instant::now();
        let mut s = slots("OOOO", now);
        s.push(Slot {
            index: 4,
            new: true,
            started_here: true,
            state: SlotState::Unhealthy {
                started: now - Duration::from_secs(61),
            },
        });
        assert!(matches!(
            plan(&pol(4, 1, 0), &s, now),
            Plan::Failed { index: 4, .. }
        ));
    }

    /// Simulate whole rollouts: new instances become ready two ticks after they start; at
    /// every tick, availability never drops below N - U and the count never exceeds N + S.
    #[test]
    fn simulated_rollouts_hold_their_invariants() {
        for (n, surge, unavailable) in [
            (4, 1, 0),
            (4, 0, 1),
            (4, 2, 0),
            (5, 2, 1),
            (1, 1, 0),
            (3, 0, 3),
            (10, 3, 2),
        ] {
            let p = Policy {
                min_healthy: Duration::ZERO,
                ..pol(n, surge, unavailable)
            };
            let t0 = Instant::now();
            // index -> (new, started tick)
            let mut live: Vec<(u32, bool, u32)> = (0..n).map(|i| (i, false, 0)).collect();
            let mut next_index = n;
            let mut done = false;
            for tick in 1..200u32 {
                let now = t0 + Duration::from_secs(u64::from(tick));
                let view: Vec<Slot> = live
                    .iter()
                    .map(|&(index, new, started)| Slot {
                        index,
                        new,
                        started_here: new,
                        state: if !new || tick >= started + 2 {
                            SlotState::Healthy {
                                since: t0,
                                started: t0,
                            }
                        } else {
                            SlotState::Starting { since: now }
                        },
                    })
                    .collect();
                let pr = progress(&p, &view, now);
                assert!(
                    pr.available >= n - unavailable.min(n),
                    "{n}/{surge}/{unavailable} tick {tick}: available {}",
                    pr.available
                );
                assert!(
                    pr.new + pr.old <= n + surge,
                    "{n}/{surge}/{unavailable} tick {tick}: {} instances",
                    pr.new + pr.old
                );
                match plan(&p, &view, now) {
                    Plan::Complete => {
                        done = true;
                        break;
                    }
                    Plan::Failed { reason, .. } => panic!("{reason}"),
                    Plan::Steps(steps) => {
                        for s in steps {
                            match s {
                                Step::StartNew => {
                                    live.push((next_index, true, tick));
                                    next_index += 1;
                                }
                                Step::StopOld { index } | Step::StopExtra { index } => {
                                    live.retain(|l| l.0 != index)
                                }
                            }
                        }
                    }
                }
            }
            assert!(done, "{n}/{surge}/{unavailable} completes");
            assert!(live.iter().all(|l| l.1) && live.len() == n as usize);
        }
    }
}
