//! The reconcile step: from a service's instances and what the rollout planner decided, the
//! events that move it toward its desired state. Pure and table-tested; the driver feeds the
//! events to the instances' state machines and carries out what they return.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use tokio::time::Instant;

use super::instance::{Event, Instance, State, StopReason};
use crate::health::HealthState;
use crate::rollout::{Slot, SlotState, Step};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add a slot at this index and start it.
    Create(u32),
    /// Feed this event to the slot at this index.
    Event(u32, Event),
}

/// What to do now for one service.
///
/// - Deleting: every slot is stopped for `Delete`; `steps` are not looked at.
/// - Otherwise the planner's `steps`: a new instance goes to the lowest free index; an old
///   one is stopped for `Retire`, an extra one for `ScaleDown` (each once).
/// - Timers: a backoff that is due elapses; a stop whose grace (or kill retry) is due expires.
pub fn reconcile<I: Borrow<Instance>>(
    deleting: bool,
    steps: &[Step],
    instances: &BTreeMap<u32, I>,
    now: Instant,
) -> Vec<Action> {
    let mut out = Vec::new();
    let removing = |i: &Instance, reasons: &[StopReason]| {
        matches!(i.state, State::Removing | State::Gone)
            || matches!(i.state, State::Stopping { reason, .. } if reasons.contains(&reason))
    };
    if deleting {
        for (idx, i) in instances {
            if !removing(i.borrow(), &[StopReason::Delete]) {
                out.push(Action::Event(
                    *idx,
                    Event::StopRequested(StopReason::Delete),
                ));
            }
        }
    } else {
        let mut next_free = 0u32;
        for step in steps {
            let (idx, reason) = match *step {
                Step::StartNew => {
                    while instances.contains_key(&next_free) {
                        next_free += 1;
                    }
                    out.push(Action::Create(next_free));
                    next_free += 1;
                    continue;
                }
                Step::StopOld { index } => (index, StopReason::Retire),
                Step::StopExtra { index } => (index, StopReason::ScaleDown),
            };
            let Some(i) = instances.get(&idx) else {
                continue;
            };
            let already = out
                .iter()
                .any(|a| matches!(a, Action::Event(j, _) if *j == idx));
            if !already
                && !removing(
                    i.borrow(),
                    &[
                        StopReason::Retire,
                        StopReason::ScaleDown,
                        StopReason::Delete,
                    ],
                )
            {
                out.push(Action::Event(idx, Event::StopRequested(reason)));
            }
        }
    }
    for (idx, i) in instances {
        let already = out
            .iter()
            .any(|a| matches!(a, Action::Event(j, _) if j == idx));
        if already {
            continue;
        }
        match i.borrow().state {
            State::Backoff { until } if until <= now => {
                out.push(Action::Event(*idx, Event::BackoffElapsed))
            }
            State::Stopping { deadline, .. } if deadline <= now => {
                out.push(Action::Event(*idx, Event::GraceExpired))
            }
            _ => {}
        }
    }
    out
}

/// An instance's health as the planner needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The service has no `[health]`: running is healthy.
    Unchecked,
    /// From the instance's tracker: its state, since when, and when the run started.
    Tracked {
        state: HealthState,
        since: Instant,
        started: Instant,
    },
    /// Checked, but no tracker (not started yet): not healthy.
    Unknown,
}

/// How the planner sees one instance, for a service whose instances should run `target`
/// (revision, epoch).
pub fn slot(inst: &Instance, health: Health, target: (u64, u64), now: Instant) -> Slot {
    let state = match inst.state {
        State::Pending => SlotState::Starting { since: now },
        State::Running { since } => match health {
            Health::Unchecked => SlotState::Healthy {
                since,
                started: since,
            },
            Health::Tracked {
                state: HealthState::Healthy,
                since: healthy_since,
                started,
            } => SlotState::Healthy {
                since: healthy_since,
                started,
            },
            Health::Tracked {
                state: HealthState::Unhealthy,
                started,
                ..
            } => SlotState::Unhealthy { started },
            Health::Tracked { started, .. } => SlotState::Starting { since: started },
            Health::Unknown => SlotState::Starting { since },
        },
        // Being restarted for failing its health check: down for now.
        State::Stopping {
            reason: StopReason::Unhealthy,
            ..
        }
        | State::Backoff { .. }
        | State::Exited => SlotState::Down,
        State::Stopping { .. } | State::Removing | State::Gone => SlotState::Leaving,
    };
    Slot {
        index: inst.index,
        new: (inst.revision, inst.epoch) == target,
        started_here: false,
        state,
    }
}

/// The earliest time one of the instances needs attention on its own.
pub fn next_deadline<I: Borrow<Instance>>(instances: &BTreeMap<u32, I>) -> Option<Instant> {
    instances
        .values()
        .filter_map(|i| i.borrow().deadline())
        .min()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::supervisor::instance::{Ctx, ExitClass, ExitInfo};

    fn spec() -> Arc<crate::spec::ServiceSpec> {
        Arc::new(
            crate::spec::parse_toml("name = \"web\"\ncommand = [\"/bin/true\"]\n").expect("valid"),
        )
    }

    fn ctx(now: Instant) -> Ctx {
        Ctx {
            now,
            wall: SystemTime::UNIX_EPOCH,
            jitter: 0.0,
        }
    }

    /// A slot of revision `rev` brought to the named state.
    fn slot_in(idx: u32, rev: u64, state: &str, now: Instant) -> (u32, Instance) {
        let mut i = Instance::new(idx, format!("web-{idx}"), spec(), rev);
        let c = ctx(now);
        let exit = |class| {
            Event::Exited(ExitInfo {
                class,
                at: SystemTime::UNIX_EPOCH,
                setup_error: None,
                output: None,
            })
        };
        match state {
            "pending" => {}
            "running" => {
                i.handle(Event::Started { pid: 1 }, &c);
            }
            "stopping-retire" | "stopping-scale" | "stopping-delete" | "stopping-unhealthy" => {
                i.handle(Event::Started { pid: 1 }, &c);
                let r = match state {
                    "stopping-retire" => StopReason::Retire,
                    "stopping-unhealthy" => StopReason::Unhealthy,
                    "stopping-scale" => StopReason::ScaleDown,
                    _ => StopReason::Delete,
                };
                i.handle(Event::StopRequested(r), &c);
            }
            "backoff" => {
                i.handle(Event::Started { pid: 1 }, &c);
                i.handle(exit(ExitClass::Exited(1)), &c);
            }
            "removing" => {
                i.handle(Event::StopRequested(StopReason::Delete), &c);
            }
            other => panic!("no such test state {other}"),
        }
        (idx, i)
    }

    #[test]
    fn reconcile_table() {
        use Action::{Create, Event as Ev};
        use Step::{StartNew, StopExtra, StopOld};
        use StopReason::{Delete, Retire, ScaleDown};
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        let stop = Event::StopRequested;
        // Name, deleting, the planner's steps, the slots (index, revision, state), when: the
        // actions.
        #[rustfmt::skip]
        let cases = [
            ("new instances go to the lowest free indexes", false, vec![StartNew, StartNew, StartNew],
                vec![(1, 1, "running"), (3, 1, "running")], t0, vec![Create(0), Create(2), Create(4)]),
            ("nothing planned, nothing due", false, vec![],
                vec![(0, 1, "running"), (1, 1, "backoff")], t0, vec![]),
            ("old instances are retired, extra ones scaled down", false, vec![StopOld { index: 0 }, StopExtra { index: 2 }],
                vec![(0, 1, "running"), (1, 2, "running"), (2, 2, "backoff")], t0,
                vec![Ev(0, stop(Retire)), Ev(2, stop(ScaleDown))]),
            ("a slot already being removed is not asked again", false, vec![StopOld { index: 0 }, StopOld { index: 1 }],
                vec![(0, 1, "stopping-retire"), (1, 1, "removing")], t0, vec![]),
            ("a health restart is turned into a retirement", false, vec![StopOld { index: 0 }],
                vec![(0, 1, "stopping-unhealthy")], t0, vec![Ev(0, stop(Retire))]),
            ("a step for a missing slot is dropped", false, vec![StopOld { index: 7 }], vec![], t0, vec![]),
            ("delete stops everything not yet stopping for delete", true, vec![StartNew],
                vec![(0, 1, "running"), (1, 1, "stopping-retire"), (2, 1, "stopping-delete"), (3, 1, "removing")], t0,
                vec![Ev(0, stop(Delete)), Ev(1, stop(Delete))]),
            ("backoff due", false, vec![], vec![(0, 1, "backoff")], later, vec![Ev(0, Event::BackoffElapsed)]),
            ("a planned stop takes the place of a due backoff", false, vec![StopOld { index: 0 }],
                vec![(0, 1, "backoff")], later, vec![Ev(0, stop(Retire))]),
            ("grace expired", false, vec![], vec![(0, 1, "stopping-scale")], later, vec![Ev(0, Event::GraceExpired)]),
        ];
        for (name, deleting, steps, slots, now, want) in cases {
            let instances: BTreeMap<u32, Instance> = slots
                .into_iter()
                .map(|(idx, rev, st)| slot_in(idx, rev, st, t0))
                .collect();
            assert_eq!(reconcile(deleting, &steps, &instances, now), want, "{name}");
        }
    }

    #[test]
    fn slots_for_the_planner() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(5);
        let after = |s| t0 + Duration::from_secs(s);
        let tracked = |state| Health::Tracked {
            state,
            since: after(1),
            started: t0,
        };
        let healthy = |since| SlotState::Healthy { since, started: t0 };
        // Name, the target (revision, epoch), the slot's state and health: whether it is new,
        // and its state for the planner.
        #[rustfmt::skip]
        let cases = [
            ("unchecked running is healthy since it runs", (1, 0), "running", Health::Unchecked, true, healthy(t0)),
            ("tracked healthy", (1, 0), "running", tracked(HealthState::Healthy), true, healthy(after(1))),
            ("tracked unhealthy", (1, 0), "running", tracked(HealthState::Unhealthy), true, SlotState::Unhealthy { started: t0 }),
            ("not yet decided is starting", (1, 0), "running", tracked(HealthState::Unknown), true, SlotState::Starting { since: t0 }),
            ("another epoch is old", (1, 5), "running", Health::Unchecked, false, healthy(t0)),
            ("backoff is down", (1, 0), "backoff", Health::Unchecked, true, SlotState::Down),
            ("a health restart is down", (1, 0), "stopping-unhealthy", Health::Unchecked, true, SlotState::Down),
            ("retiring is leaving", (1, 0), "stopping-retire", Health::Unchecked, true, SlotState::Leaving),
            ("pending is starting now", (1, 0), "pending", Health::Unknown, true, SlotState::Starting { since: now }),
        ];
        for (name, target, state, health, new, want) in cases {
            let (_, i) = slot_in(0, 1, state, t0);
            let s = slot(&i, health, target, now);
            assert_eq!((s.new, s.state), (new, want), "{name}");
        }
    }

    #[test]
    fn next_deadline_is_the_earliest() {
        let t0 = Instant::now();
        let instances: BTreeMap<u32, Instance> = [
            slot_in(0, 1, "running", t0),
            slot_in(1, 1, "backoff", t0),
            slot_in(2, 1, "stopping-delete", t0),
        ]
        .into_iter()
        .collect();
        let backoff = instances[&1].deadline().expect("backoff has a deadline");
        let stop = instances[&2].deadline().expect("stopping has a deadline");
        assert_eq!(next_deadline(&instances), Some(backoff.min(stop)));
        assert!(instances[&0].deadline().is_none());
    }
}
