//! The reconcile step: from a service's desired state and its instances' observed states,
//! the events that move it toward the desired state. Pure and table-tested; the driver feeds
//! the events to the instances' state machines and carries out what they return.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::instance::{Event, Instance, State, StopReason};

/// A service as reconcile sees it.
#[derive(Debug, Clone, Copy)]
pub struct Desired {
    pub replicas: u32,
    pub revision: u64,
    pub deleting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Add a slot at this index and start it.
    Create(u32),
    /// Feed this event to the slot at this index.
    Event(u32, Event),
}

/// What to do now for one service.
///
/// - Deleting: every slot is stopped for `Delete`.
/// - Missing slots below `replicas` are created; slots at or above it are stopped for
///   `ScaleDown` (an index being removed is re-created only once its removal is done).
/// - Slots running an older revision are replaced one at a time: a running one is stopped
///   for `Replace` only while no other slot is mid-replacement; a slot with no process
///   (backoff, exited) is replaced at once.
/// - Timers: a backoff that is due elapses; a stop whose grace (or kill retry) is due expires.
pub fn reconcile(d: &Desired, instances: &BTreeMap<u32, Instance>, now: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    let stopping_for = |i: &Instance, reasons: &[StopReason]| matches!(i.state, State::Stopping { reason, .. } if reasons.contains(&reason));
    if d.deleting {
        for (idx, i) in instances {
            let done = matches!(i.state, State::Removing | State::Gone)
                || stopping_for(i, &[StopReason::Delete]);
            if !done {
                out.push(Action::Event(
                    *idx,
                    Event::StopRequested(StopReason::Delete),
                ));
            }
        }
    } else {
        for idx in 0..d.replicas {
            if !instances.contains_key(&idx) {
                out.push(Action::Create(idx));
            }
        }
        let mid_replacement = instances
            .values()
            .any(|i| stopping_for(i, &[StopReason::Replace]) || i.state == State::Pending);
        let mut replacing = mid_replacement;
        for (idx, i) in instances {
            if *idx >= d.replicas {
                let done = matches!(i.state, State::Removing | State::Gone)
                    || stopping_for(i, &[StopReason::ScaleDown, StopReason::Delete]);
                if !done {
                    out.push(Action::Event(
                        *idx,
                        Event::StopRequested(StopReason::ScaleDown),
                    ));
                }
                continue;
            }
            if i.revision == d.revision {
                continue;
            }
            match i.state {
                State::Backoff { .. } | State::Exited => {
                    out.push(Action::Event(
                        *idx,
                        Event::StopRequested(StopReason::Replace),
                    ));
                }
                State::Running { .. } if !replacing => {
                    replacing = true;
                    out.push(Action::Event(
                        *idx,
                        Event::StopRequested(StopReason::Replace),
                    ));
                }
                _ => {}
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
        match i.state {
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

/// The earliest time one of the instances needs attention on its own.
pub fn next_deadline(instances: &BTreeMap<u32, Instance>) -> Option<Instant> {
    instances.values().filter_map(Instance::deadline).min()
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
    fn slot(idx: u32, rev: u64, state: &str, now: Instant) -> (u32, Instance) {
        let mut i = Instance::new(idx, format!("web-{idx}"), spec(), rev);
        let c = ctx(now);
        let exit = |class| {
            Event::Exited(ExitInfo {
                class,
                at: SystemTime::UNIX_EPOCH,
                setup_error: None,
            })
        };
        match state {
            "pending" => {}
            "running" => {
                i.handle(Event::Started { pid: 1 }, &c);
            }
            "stopping-replace" | "stopping-scale" | "stopping-delete" => {
                i.handle(Event::Started { pid: 1 }, &c);
                let r = match state {
                    "stopping-replace" => StopReason::Replace,
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
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        let d = |replicas, revision, deleting| Desired {
            replicas,
            revision,
            deleting,
        };
        use Action::{Create, Event as Ev};
        let stop = |r| Event::StopRequested(r);
        type Case = (
            &'static str,
            Desired,
            Vec<(u32, u64, &'static str)>,
            Instant,
            Vec<Action>,
        );
        let cases: Vec<Case> = vec![
            (
                "empty service creates all",
                d(3, 1, false),
                vec![],
                t0,
                vec![Create(0), Create(1), Create(2)],
            ),
            (
                "steady state does nothing",
                d(2, 1, false),
                vec![(0, 1, "running"), (1, 1, "running")],
                t0,
                vec![],
            ),
            (
                "missing slot is filled",
                d(2, 1, false),
                vec![(1, 1, "running")],
                t0,
                vec![Create(0)],
            ),
            (
                "scale down stops the highest",
                d(1, 1, false),
                vec![(0, 1, "running"), (1, 1, "running"), (2, 1, "backoff")],
                t0,
                vec![
                    Ev(1, stop(StopReason::ScaleDown)),
                    Ev(2, stop(StopReason::ScaleDown)),
                ],
            ),
            (
                "scale down already in progress",
                d(1, 1, false),
                vec![(0, 1, "running"), (1, 1, "stopping-scale")],
                t0,
                vec![],
            ),
            (
                "index being removed is not re-created yet",
                d(2, 1, false),
                vec![(0, 1, "running"), (1, 1, "removing")],
                t0,
                vec![],
            ),
            (
                "update replaces one running at a time",
                d(3, 2, false),
                vec![(0, 1, "running"), (1, 1, "running"), (2, 1, "running")],
                t0,
                vec![Ev(0, stop(StopReason::Replace))],
            ),
            (
                "update waits while one is mid-replacement",
                d(3, 2, false),
                vec![
                    (0, 2, "stopping-replace"),
                    (1, 1, "running"),
                    (2, 1, "running"),
                ],
                t0,
                vec![],
            ),
            (
                "update continues after a replacement is running",
                d(3, 2, false),
                vec![(0, 2, "running"), (1, 1, "running"), (2, 1, "running")],
                t0,
                vec![Ev(1, stop(StopReason::Replace))],
            ),
            (
                "crash-looping old revision is replaced at once",
                d(2, 2, false),
                vec![(0, 1, "backoff"), (1, 1, "running")],
                t0,
                vec![
                    Ev(0, stop(StopReason::Replace)),
                    Ev(1, stop(StopReason::Replace)),
                ],
            ),
            (
                "delete stops everything not yet stopping for delete",
                d(2, 1, true),
                vec![
                    (0, 1, "running"),
                    (1, 1, "stopping-replace"),
                    (2, 1, "stopping-delete"),
                    (3, 1, "removing"),
                ],
                t0,
                vec![
                    Ev(0, stop(StopReason::Delete)),
                    Ev(1, stop(StopReason::Delete)),
                ],
            ),
            (
                "backoff not yet due",
                d(1, 1, false),
                vec![(0, 1, "backoff")],
                t0,
                vec![],
            ),
            (
                "backoff due",
                d(1, 1, false),
                vec![(0, 1, "backoff")],
                later,
                vec![Ev(0, Event::BackoffElapsed)],
            ),
            (
                "grace expired",
                d(0, 1, false),
                vec![(0, 1, "stopping-scale")],
                later,
                vec![Ev(0, Event::GraceExpired)],
            ),
        ];
        for (name, desired, slots, now, want) in cases {
            let instances: BTreeMap<u32, Instance> = slots
                .into_iter()
                .map(|(idx, rev, st)| slot(idx, rev, st, t0))
                .collect();
            assert_eq!(reconcile(&desired, &instances, now), want, "{name}");
        }
    }

    #[test]
    fn next_deadline_is_the_earliest() {
        let t0 = Instant::now();
        let instances: BTreeMap<u32, Instance> = [
            slot(0, 1, "running", t0),
            slot(1, 1, "backoff", t0),
            slot(2, 1, "stopping-delete", t0),
        ]
        .into_iter()
        .collect();
        let backoff = instances[&1].deadline().expect("backoff has a deadline");
        let stop = instances[&2].deadline().expect("stopping has a deadline");
        assert_eq!(next_deadline(&instances), Some(backoff.min(stop)));
        assert!(instances[&0].deadline().is_none());
    }
}
