//! What a live instance is watched for: the end of its init (through the runtime's exit
//! future), its health probes, and its `READY=1`. Each end, whether seen now or found after
//! an agent restart, goes through [`Driver::ended`]: one classification, one report.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::report::CpuRate;
use super::slots::{AbortOnDrop, Live, LiveHealth, Service};
use super::{Driver, Internal, cgroup_of};
use crate::events::{EventKind, ReadyVia};
use crate::health::{self, Change, HealthState, ProbeHandle, ProbeReport, Prober, Target, Tracker};
use crate::runtime::{ExecRequest, InitExit, ProcessRef, Spawned};
use crate::spec::{HealthSpec, InstanceKey};
use crate::supervisor::instance::{Event, ExitClass, Instance, ProcessEnd, State, StopReason};

/// How often an instance that has not yet sent `READY=1` is checked for it.
const NOTIFY_POLL: Duration = Duration::from_millis(100);

/// Instances of a service being restarted for failing their health check.
fn in_health_restart(svc: &Service) -> u32 {
    svc.instances()
        .filter(|i| {
            matches!(
                i.state,
                State::Stopping {
                    reason: StopReason::Unhealthy,
                    ..
                }
            )
        })
        .count()
        .try_into()
        .unwrap_or(u32::MAX)
}

impl Driver {
    /// Keep what only a live instance has (run `generation` of its slot), and watch it.
    pub(super) fn watch(
        &mut self,
        key: &InstanceKey,
        generation: u64,
        spawned: Spawned,
        ports: BTreeMap<String, u16>,
    ) {
        let Some(slot) = self.services.slot(key) else {
            return;
        };
        let health = slot.instance.spec.health.as_ref().map(|h| LiveHealth {
            tracker: Tracker::new(h, Instant::now()),
            _prober: self.start_prober(
                key,
                &slot.instance,
                h,
                generation,
                &spawned.process,
                &ports,
            ),
            _notify: h.notify.then(|| self.watch_notify(key, generation)),
        });
        let Spawned {
            process,
            start_time,
            exit,
        } = spawned;
        if let Some(slot) = self.services.slot_mut(key) {
            slot.live = Some(Live {
                process,
                start_time,
                main_pid: None,
                cpu: CpuRate::default(),
                health,
                usage: None,
                ports,
            });
        }
        let tx = self.internal_tx.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let exit = exit.await;
            let _ = tx.send(Internal::Exit {
                key,
                generation,
                exit,
            });
        });
    }

    /// Probe the instance on its schedule, when its `[health]` has a probe.
    fn start_prober(
        &self,
        key: &InstanceKey,
        inst: &Instance,
        h: &HealthSpec,
        generation: u64,
        process: &ProcessRef,
        ports: &BTreeMap<String, u16>,
    ) -> Option<ProbeHandle> {
        let target = match health::resolve(h.probe.as_ref()?, ports) {
            Ok(target) => target,
            Err(e) => {
                tracing::error!(instance = %key, error = %e, "health probe not started");
                return None;
            }
        };
        // Exec probes run inside the instance: they need its cgroup too.
        let (procs, dir) = match &target {
            Target::Exec { .. } => {
                let path = cgroup_of(key);
                let cg = &self.deps.cgroups;
                (
                    cg.open_procs(&path).unwrap_or_default(),
                    cg.open_dir(&path).ok().flatten(),
                )
            }
            _ => (Vec::new(), None),
        };
        let exec = self.deps.processes.exec_runner(ExecRequest {
            process,
            spec: &inst.spec,
            index: key.index,
            instance: &inst.id,
            ports,
            cgroup_procs: procs,
            cgroup_dir: dir,
        });
        let tx = self.probe_tx.clone();
        Some(Prober::start(key.clone(), generation, target, h, exec, tx))
    }

    /// Look for the instance's `READY=1` until it comes (or the returned guard is dropped).
    fn watch_notify(&self, key: &InstanceKey, generation: u64) -> AbortOnDrop {
        let (files, tx) = (self.deps.files.clone(), self.internal_tx.clone());
        let (key, id) = (key.clone(), key.to_string());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(NOTIFY_POLL);
            loop {
                tick.tick().await;
                if files.notify_state(&id).is_some_and(|n| n.ready) {
                    let _ = tx.send(Internal::Ready { key, generation });
                    return;
                }
            }
        });
        AbortOnDrop(task.abort_handle())
    }

    /// An init ended. Exits of an earlier run of the slot are stale and ignored.
    pub(super) fn on_exit(&mut self, key: &InstanceKey, generation: u64, exit: InitExit) {
        let Some(slot) = self.services.slot_mut(key) else {
            return;
        };
        if slot.instance.generation != generation || !slot.instance.state.is_live() {
            return;
        }
        let killed = matches!(slot.instance.state, State::Stopping { killed: true, .. });
        slot.live = None;
        if let Some(svc) = self.services.get_mut(&key.service)
            && svc.deleting
        {
            svc.stopped_on_delete += 1;
        }
        self.ended(key, exit, killed, None);
    }

    /// A run of the instance ended: how, from its init's status and record and from its
    /// cgroup's OOM counter (the cgroup was made fresh for the run, so the counter counts this
    /// run only); reported, then fed to its slot. `unobserved`: why the end itself could not
    /// be seen, said when nothing else tells how it ended.
    pub(super) fn ended(
        &mut self,
        key: &InstanceKey,
        exit: InitExit,
        killed_after_grace: bool,
        unobserved: Option<String>,
    ) {
        let oom_kills = self.deps.cgroups.oom_kills(&cgroup_of(key)).unwrap_or(0);
        let end = ProcessEnd {
            exit,
            oom_kills,
            killed_after_grace,
        };
        let info = end.info(SystemTime::now(), unobserved);
        let failed = !info.is_success() && !matches!(info.class, ExitClass::StopTimeout);
        let detail = info.setup_error.as_deref().unwrap_or("");
        tracing::info!(instance = %key, end = %info.class, oom_kills, error = detail, "instance ended");
        if oom_kills > 0 {
            let id = key.to_string();
            self.emit(
                &key.service,
                Some(&id),
                EventKind::OomKill { count: oom_kills },
            );
        }
        self.feed(key, Event::Exited(info));
        // The service's own account of a failed end, read once the restart is scheduled
        // (off the path from the end to the next start), kept with the end in status.
        if failed {
            let output = self.deps.files.output_tail(&key.to_string());
            if let Some(exit) = self
                .services
                .slot_mut(key)
                .and_then(|s| s.instance.history.last_exit.as_mut())
            {
                exit.output = output;
            }
        }
    }

    /// A probe result: into the instance's tracker; an instance that stays unhealthy is
    /// replaced when the spec says so, a few at a time per service.
    pub(super) fn on_probe(&mut self, report: ProbeReport) {
        let key = &report.instance;
        let Some(svc) = self.services.get(&key.service) else {
            return;
        };
        let Some(slot) = svc.slots.get(&key.index) else {
            return;
        };
        let inst = &slot.instance;
        if inst.generation != report.generation || !matches!(inst.state, State::Running { .. }) {
            return;
        }
        slot.probe
            .observe(report.outcome.elapsed, report.outcome.healthy);
        let replace = inst
            .spec
            .health
            .as_ref()
            .is_some_and(|h| h.restart_on_failure);
        let in_progress = in_health_restart(svc);
        let may_restart = health::may_restart_for_health(svc.d.spec.replicas, in_progress);
        let Some(h) = self
            .services
            .slot_mut(key)
            .and_then(|s| s.live.as_mut())
            .and_then(|l| l.health.as_mut())
        else {
            return;
        };
        let outcome = &report.outcome;
        let change = h
            .tracker
            .observe(outcome.healthy, &outcome.reason, report.at);
        let unhealthy = h.tracker.state() == HealthState::Unhealthy;
        if let Some(change) = change {
            if change.to == HealthState::Healthy {
                self.lift_start_cap(key);
            }
            self.report_health_change(key, change, Some(ReadyVia::Probe));
        }
        if unhealthy && replace {
            if may_restart {
                tracing::info!(instance = %key, "replacing an unhealthy instance");
                self.feed(key, Event::StopRequested(StopReason::Unhealthy));
            } else {
                tracing::debug!(instance = %key, in_progress, "health restart deferred (too many at once)");
            }
        }
    }

    /// `READY=1` from run `generation` of an instance: into its tracker.
    pub(super) fn on_ready(&mut self, key: &InstanceKey, generation: u64) {
        let Some(slot) = self.services.slot_mut(key) else {
            return;
        };
        if slot.instance.generation != generation {
            return;
        }
        let Some(h) = slot.live.as_mut().and_then(|l| l.health.as_mut()) else {
            return;
        };
        let change = h.tracker.ready_by_notify(Instant::now());
        tracing::info!(instance = %key, "READY=1");
        self.lift_start_cap(key);
        let id = key.to_string();
        let via = ReadyVia::Notify;
        self.emit(&key.service, Some(&id), EventKind::Ready { via });
        if let Some(change) = change {
            self.report_health_change(key, change, None);
        }
    }

    /// A change of an instance's health, in the log and the event log; its first passing
    /// probe (`ready_via`) also makes it ready.
    fn report_health_change(&self, key: &InstanceKey, change: Change, ready_via: Option<ReadyVia>) {
        let Change { from, to, reason } = change;
        tracing::info!(instance = %key, %from, %to, %reason, "health changed");
        let id = key.to_string();
        let event = EventKind::HealthChanged { from, to, reason };
        self.emit(&key.service, Some(&id), event);
        let first_ready = from == HealthState::Unknown && to == HealthState::Healthy;
        if let (true, Some(via)) = (first_ready, ready_via) {
            self.emit(&key.service, Some(&id), EventKind::Ready { via });
        }
    }
}
