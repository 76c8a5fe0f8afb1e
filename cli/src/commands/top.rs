//! `top`: the status of every instance, refreshed until interrupted. Each frame reads the
//! services (`List` names them, `Get` reads each with its usage as of now: `List` may answer
//! with usage up to a second old, too coarse for a rate over a few seconds) and `Node`; CPU%
//! comes from the change of each instance's CPU time between two frames.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use corral_proto::v1 as pb;
use tokio::time::MissedTickBehavior;

use super::{Console, Outcome};
use crate::args::{ConnectArgs, Format, TopArgs};
use crate::client::{self, Session};
use crate::render;
use crate::views::{NodeView, TopRowView, TopView, health_name, rfc3339, state_name};

/// Moves the cursor home and clears the screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

pub async fn top(
    conn: &ConnectArgs,
    format: Format,
    args: &TopArgs,
    out: &mut dyn Write,
    console: Console,
) -> anyhow::Result<Outcome> {
    let Console {
        terminal,
        mut interrupt,
        ..
    } = console;
    let mut session = client::connect(conn).await?;
    let mut ticks = tokio::time::interval(args.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut previous: Option<Sample> = None;
    let mut frames: u32 = 0;
    loop {
        tokio::select! {
            biased;
            () = interrupt.as_mut() => return Ok(Outcome::Success),
            _ = ticks.tick() => {}
        }
        let read = async {
            let services = read_services(&mut session).await?;
            let node = session.node().await?;
            anyhow::Ok((services, node))
        };
        let (services, node) = tokio::select! {
            biased;
            () = interrupt.as_mut() => return Ok(Outcome::Success),
            read = read => read?,
        };
        let now = SystemTime::now();
        let rows = rows(&services, previous.as_ref());
        previous = Some(Sample::of(&services));

        // The frame is written at once, so that a terminal never shows half of one.
        let mut frame = Vec::new();
        match format {
            Format::Json => render::write_json_line(
                &mut frame,
                &TopView {
                    time: rfc3339(&prost_types::Timestamp::from(now)),
                    node: NodeView::from(&node),
                    instances: rows,
                },
            )?,
            Format::Table => {
                if terminal {
                    frame.extend_from_slice(CLEAR_SCREEN.as_bytes());
                } else if frames > 0 {
                    frame.push(b'\n');
                }
                let scaled: Vec<(String, pb::AutoscaleStatus)> = services
                    .iter()
                    .filter_map(|(s, _)| Some((s.name.clone(), s.autoscale.clone()?)))
                    .collect();
                render::write_top(&mut frame, &node, now, &rows, &scaled)?;
            }
        }
        out.write_all(&frame)?;
        out.flush()?;
        frames = frames.saturating_add(1);
        if args.iterations.is_some_and(|n| frames >= n) {
            return Ok(Outcome::Success);
        }
    }
}

/// A service's status, and when it was read.
pub type Read = (pb::ServiceStatus, Instant);

/// Every service (every page of `List`), each read now. One deleted between `List` and its
/// `Get` is left out.
async fn read_services(session: &mut Session) -> anyhow::Result<Vec<Read>> {
    let mut names: Vec<String> = session
        .list_all("")
        .await?
        .into_iter()
        .map(|s| s.name)
        .collect();
    names.sort();
    let mut services = Vec::with_capacity(names.len());
    for name in names {
        match session.get(&name).await {
            Ok(status) => services.push((status, Instant::now())),
            Err(e) if client::is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(services)
}

/// The CPU time counters of one frame, by instance id.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    cpu: HashMap<String, Reading>,
}

/// One instance's CPU time counter.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// The main process's PID: another one is another run, whose counter started again.
    pid: i32,
    cpu_ns: u64,
    at: Instant,
}

impl Sample {
    pub fn of(services: &[Read]) -> Self {
        let cpu = services
            .iter()
            .flat_map(|(s, at)| s.instances.iter().map(move |i| (i, *at)))
            .filter_map(|(i, at)| {
                let reading = Reading {
                    pid: i.pid,
                    cpu_ns: i.usage.as_ref()?.cpu_usage_ns,
                    at,
                };
                Some((i.id.clone(), reading))
            })
            .collect();
        Sample { cpu }
    }
}

/// One row per instance of every service, sorted by [`sort_rows`]; CPU% from the change since
/// `previous`, for instances whose process is still the same one.
pub fn rows(services: &[Read], previous: Option<&Sample>) -> Vec<TopRowView> {
    let mut rows = Vec::new();
    for (s, at) in services {
        let checked = render::health_checked(s);
        for i in &s.instances {
            let cpu_ns = i.usage.as_ref().map(|u| u.cpu_usage_ns);
            let cpu_percent = previous.and_then(|p| {
                let before = p.cpu.get(&i.id)?;
                // Not running, or restarted since: its counter started again.
                if i.pid <= 0 || before.pid != i.pid {
                    return None;
                }
                cpu_percent(
                    before.cpu_ns,
                    cpu_ns?,
                    at.saturating_duration_since(before.at),
                )
            });
            rows.push(TopRowView {
                service: s.name.clone(),
                instance: i.id.clone(),
                index: i.index,
                state: state_name(i.state),
                health: Some(health_name(i.health))
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned),
                health_checked: checked,
                pid: (i.pid > 0).then_some(i.pid),
                cpu_percent,
                cpu_usage_ns: cpu_ns,
                memory_bytes: i.usage.as_ref().map(|u| u.memory_bytes),
                restarts: i.restarts,
                last_exit: i
                    .last_exit
                    .as_ref()
                    .filter(|e| !e.text.is_empty())
                    .map(|e| e.text.clone()),
            });
        }
    }
    sort_rows(&mut rows);
    rows
}

/// CPU time used between two readings over the wall time between them, in percent of one
/// core; `None` when the counter went back (a new process) or no time passed.
pub fn cpu_percent(before_ns: u64, after_ns: u64, elapsed: Duration) -> Option<f64> {
    let used = after_ns.checked_sub(before_ns)?;
    if elapsed.is_zero() {
        return None;
    }
    Some(used as f64 / elapsed.as_nanos() as f64 * 100.0)
}

/// Busiest first; rows without a CPU% after those with one; then by service and instance.
pub fn sort_rows(rows: &mut [TopRowView]) {
    rows.sort_by(|a, b| {
        let by_cpu = match (a.cpu_percent, b.cpu_percent) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_cpu
            .then_with(|| a.service.cmp(&b.service))
            .then(a.index.cmp(&b.index))
            .then_with(|| a.instance.cmp(&b.instance))
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::views::wire;

    fn instance(id: &str, index: u32, pid: i32, cpu_ns: u64) -> pb::InstanceStatus {
        pb::InstanceStatus {
            id: id.into(),
            index,
            state: pb::InstanceState::Running as i32,
            pid,
            health: wire::health("healthy"),
            usage: Some(pb::ResourceUsage {
                cpu_usage_ns: cpu_ns,
                memory_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service(name: &str, instances: Vec<pb::InstanceStatus>) -> pb::ServiceStatus {
        pb::ServiceStatus {
            name: name.into(),
            spec: Some(pb::ServiceSpec::default()),
            instances,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_percent_is_cpu_time_over_wall_time() {
        let second = Duration::from_secs(1);
        assert_eq!(cpu_percent(0, 500_000_000, second), Some(50.0));
        assert_eq!(
            cpu_percent(1_000_000_000, 4_000_000_000, 2 * second),
            Some(150.0)
        );
        assert_eq!(cpu_percent(7, 7, second), Some(0.0));
        assert_eq!(cpu_percent(9, 3, second), None);
        assert_eq!(cpu_percent(0, 3, Duration::ZERO), None);
        assert_eq!(
            cpu_percent(0, u64::MAX, Duration::from_nanos(1)).map(f64::is_finite),
            Some(true)
        );
    }

    #[test]
    fn the_first_frame_has_no_cpu_percent_and_sorts_by_name() {
        let now = Instant::now();
        let services = [
            (
                service(
                    "web",
                    vec![instance("web-10", 10, 12, 0), instance("web-2", 2, 11, 0)],
                ),
                now,
            ),
            (service("api", vec![instance("api-0", 0, 10, 0)]), now),
        ];
        let rows = rows(&services, None);
        let ids: Vec<&str> = rows.iter().map(|r| r.instance.as_str()).collect();
        assert_eq!(ids, ["api-0", "web-2", "web-10"]);
        assert!(rows.iter().all(|r| r.cpu_percent.is_none()));
        assert_eq!(rows[0].cpu_usage_ns, Some(0));
    }

    #[test]
    fn two_frames_give_cpu_percent_busiest_first() {
        // Each service is read at its own time; rates use each one's own interval.
        let t0 = Instant::now();
        let first = [
            (
                service(
                    "web",
                    vec![
                        instance("web-0", 0, 100, 1_000_000_000),
                        instance("web-1", 1, 101, 0),
                    ],
                ),
                t0,
            ),
            (
                service(
                    "api",
                    vec![instance("api-0", 0, 200, 0), instance("api-1", 1, 201, 5)],
                ),
                t0 + Duration::from_secs(1),
            ),
        ];
        let sample = Sample::of(&first);
        let mut restarted = instance("web-1", 1, 999, 10_000_000_000);
        restarted.restarts = 1;
        let mut stopped = instance("api-1", 1, 0, 5);
        stopped.state = pb::InstanceState::Backoff as i32;
        let second = [
            (
                service(
                    "web",
                    vec![instance("web-0", 0, 100, 1_500_000_000), restarted],
                ),
                t0 + Duration::from_secs(2),
            ),
            (
                service(
                    "api",
                    vec![instance("api-0", 0, 200, 3_000_000_000), stopped],
                ),
                t0 + Duration::from_secs(5),
            ),
        ];
        let rows = rows(&second, Some(&sample));
        let got: Vec<(&str, Option<f64>)> = rows
            .iter()
            .map(|r| (r.instance.as_str(), r.cpu_percent))
            .collect();
        assert_eq!(
            got,
            [
                ("api-0", Some(75.0)),
                ("web-0", Some(25.0)),
                // Not running, and a new process: no rate.
                ("api-1", None),
                ("web-1", None),
            ]
        );
        assert_eq!(rows[2].pid, None);
        assert_eq!(rows[2].state, "backoff");
    }

    #[test]
    fn equal_cpu_sorts_by_service_then_index() {
        let row = |service: &str, index: u32, cpu: Option<f64>| TopRowView {
            service: service.into(),
            instance: format!("{service}-{index}"),
            index,
            state: "running",
            health: None,
            health_checked: false,
            pid: None,
            cpu_percent: cpu,
            cpu_usage_ns: None,
            memory_bytes: None,
            restarts: 0,
            last_exit: None,
        };
        let mut rows = vec![
            row("b", 1, Some(1.0)),
            row("a", 9, None),
            row("b", 0, Some(1.0)),
            row("a", 3, Some(1.0)),
            row("c", 0, Some(80.0)),
        ];
        sort_rows(&mut rows);
        let ids: Vec<&str> = rows.iter().map(|r| r.instance.as_str()).collect();
        assert_eq!(ids, ["c-0", "a-3", "b-0", "b-1", "a-9"]);
    }
}
