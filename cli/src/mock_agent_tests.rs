//! The commands run in-process against a small fake agent served over a real Unix socket: what
//! they send, what they print, and which exit code each result maps to.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use corral_proto::v1::agent_server::{Agent, AgentServer};
use corral_proto::v1::apply_request::Source;
use corral_proto::v1::{
    ApplyRequest, ApplyResponse, DeleteRequest, DeleteResponse, Event, GetRequest,
    GetRolloutRequest, InstanceState, InstanceStatus, ListRequest, ListResponse, LogLine,
    LogsRequest, NodeInfo, NodeRequest, ResourceUsage, RestartRequest, RollbackRequest,
    RolloutPolicy, RolloutResponse, RolloutStatus, RolloutStep, ScaleRequest, ScaleResponse,
    ServiceSpec, ServiceStatus, WatchRequest,
};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::args::Cli;
use crate::commands::Console;
use crate::views::wire;
use crate::{commands, finish};

const BAD_MEMORY: &str = r#"resources.memory: "12XB" is not a size"#;

/// Services by name: revision, replicas and the spec text last applied.
type Services = BTreeMap<String, (u64, u32, String)>;

/// Just enough of an agent: takes the service's name from the spec text, refuses a spec whose
/// memory is "12XB" as the real agent would, and records every apply request. Its logs and
/// events are fixed ([`log_records`], [`events`]); each `Get` or `List` adds CPU time to every
/// instance. An update, `Restart` and `Rollback` start a rollout that runs as the service's
/// [`Plan`] says, one step further at each `GetRollout`.
#[derive(Debug, Default, Clone)]
struct FakeAgent {
    services: Arc<Mutex<Services>>,
    applied: Arc<Mutex<Vec<ApplyRequest>>>,
    logs_asked: Arc<Mutex<Vec<LogsRequest>>>,
    watch_asked: Arc<Mutex<Vec<WatchRequest>>>,
    /// What `Node` answers; `None`: an internal error.
    node: Arc<Mutex<Option<NodeInfo>>>,
    /// `Get` and `List` calls so far.
    reads: Arc<AtomicU64>,
    restarts: Arc<Mutex<Vec<RestartRequest>>>,
    rollbacks: Arc<Mutex<Vec<RollbackRequest>>>,
    /// How the rollouts of a service go, by service (default: [`Plan::Succeeds`]).
    plans: Arc<Mutex<BTreeMap<String, Plan>>>,
    /// Every rollout started, in order.
    rollouts: Arc<Mutex<Vec<Scripted>>>,
    /// Services with a rollout running that only `force` supersedes.
    busy: Arc<Mutex<BTreeSet<String>>>,
    /// Services whose instances are not healthy yet: how many more `Get`s report them so.
    warming: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// How a service's rollouts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// running, running, succeeded.
    Succeeds,
    /// running, then failed, with an automatic rollback that runs, then succeeds.
    FailsAndRollsBack,
    /// running, then failed without a rollback: the service is paused.
    Fails,
    /// running, then superseded.
    Superseded,
    /// running for ever.
    Hangs,
}

/// A rollout whose status goes through `frames`, one per `GetRollout`; the last one stays.
#[derive(Debug, Clone)]
struct Scripted {
    frames: Vec<RolloutStatus>,
    /// The frames served so far.
    served: usize,
}

impl Scripted {
    fn id(&self) -> &str {
        self.frames.first().map_or("", |f| f.id.as_str())
    }

    fn service(&self) -> &str {
        self.frames.first().map_or("", |f| f.service.as_str())
    }

    /// What `GetRollout` answers now, and the rollout moves on.
    fn next(&mut self) -> RolloutStatus {
        let frame = self.frames[self.served.min(self.frames.len() - 1)].clone();
        self.served += 1;
        frame
    }

    /// The last frame served (the first when none was).
    fn current(&self) -> RolloutStatus {
        self.frames[self.served.saturating_sub(1).min(self.frames.len() - 1)].clone()
    }
}

/// The rollout started at 23:45:00 that [`rollout_frames`] builds.
const ROLLOUT_START: i64 = 1_795_909_500;

fn step(millis: i64, step: &str, instance: &str, message: &str) -> RolloutStep {
    RolloutStep {
        time: Some(ts(ROLLOUT_START + millis / 1000, (millis % 1000) as i32)),
        step: step.into(),
        instance: instance.into(),
        message: message.into(),
    }
}

/// A rollout of `service` from revision `from` to `to` over one instance, as `plan` says:
/// the frames of the rollout and, for [`Plan::FailsAndRollsBack`], those of its rollback
/// `rollback_id`.
fn rollout_frames(
    plan: Plan,
    id: &str,
    rollback_id: &str,
    service: &str,
    kind: &str,
    (from, to): (u64, u64),
) -> Vec<Vec<RolloutStatus>> {
    let old = format!("{service}-0");
    let new = format!("{service}-1");
    let base = RolloutStatus {
        id: id.into(),
        service: service.into(),
        kind: wire::rollout_kind(kind),
        state: wire::rollout_state("running"),
        from_revision: from,
        to_revision: to,
        replicas: 1,
        to_replace: 1,
        replaced: 0,
        new_instances: 1,
        ready: 0,
        old_instances: 1,
        available: 1,
        policy: Some(RolloutPolicy {
            max_surge: Some(1),
            max_unavailable: Some(0),
            min_healthy_ms: Some(2000),
            healthy_deadline_ms: Some(60_000),
            auto_rollback: Some(plan == Plan::FailsAndRollsBack),
            start_cpu: None,
        }),
        started_at: Some(ts(ROLLOUT_START, 0)),
        steps: vec![step(
            500,
            "started",
            &new,
            &format!("{new} started with revision {to}"),
        )],
        ..Default::default()
    };
    let mut second = base.clone();
    let mut last = base.clone();
    last.finished_at = Some(ts(ROLLOUT_START + 9, 400));
    match plan {
        Plan::Succeeds => {
            second.ready = 1;
            second
                .steps
                .push(step(2600, "ready", &new, &format!("{new} ready")));
            last = RolloutStatus {
                state: wire::rollout_state("succeeded"),
                replaced: 1,
                ready: 1,
                old_instances: 0,
                steps: second.steps.clone(),
                ..last
            };
            last.steps.extend([
                step(2700, "stopping", &old, &format!("{old} stopping")),
                step(9400, "stopped", &old, &format!("{old} stopped")),
                step(9400, "succeeded", "", "every instance replaced"),
            ]);
            vec![vec![base, second, last]]
        }
        Plan::FailsAndRollsBack | Plan::Fails => {
            let reason = format!("{new} not ready within 60s");
            last.state = wire::rollout_state("failed");
            last.reason = reason.clone();
            last.steps.push(step(9400, "failed", &new, &reason));
            if plan == Plan::Fails {
                return vec![vec![base, last]];
            }
            last.rollback_id = rollback_id.into();
            last.steps.push(step(
                9400,
                "rollback",
                "",
                &format!("rolling back to revision {from}"),
            ));
            let back = RolloutStatus {
                id: rollback_id.into(),
                kind: wire::rollout_kind("auto_rollback"),
                from_revision: to,
                to_revision: from,
                rollback_of: id.into(),
                to_replace: 1,
                new_instances: 1,
                ready: 1,
                old_instances: 1,
                started_at: Some(ts(ROLLOUT_START + 9, 400)),
                steps: vec![step(9500, "stopping", &new, &format!("{new} stopping"))],
                ..base.clone()
            };
            let mut back_done = RolloutStatus {
                state: wire::rollout_state("succeeded"),
                replaced: 1,
                old_instances: 0,
                finished_at: Some(ts(ROLLOUT_START + 11, 0)),
                ..back.clone()
            };
            back_done.steps.extend([
                step(10_900, "stopped", &new, &format!("{new} stopped")),
                step(11_000, "succeeded", "", &format!("back at revision {from}")),
            ]);
            vec![vec![base, last], vec![back, back_done]]
        }
        Plan::Superseded => {
            last.state = wire::rollout_state("superseded");
            last.reason = format!("superseded by {service}-r9");
            vec![vec![base, last]]
        }
        Plan::Hangs => vec![vec![base]],
    }
}

impl FakeAgent {
    /// Starts a rollout of `service` as its plan says, or refuses while one runs (unless
    /// `force`); returns its id.
    fn start_rollout(
        &self,
        service: &str,
        kind: &str,
        revisions: (u64, u64),
        force: bool,
    ) -> Result<String, Status> {
        let mut busy = self.busy.lock().unwrap();
        if busy.contains(service) && !force {
            return Err(Status::failed_precondition(format!(
                "rollout {service}-r9 of service \"{service}\" is still running"
            )));
        }
        busy.remove(service);
        let plan = self
            .plans
            .lock()
            .unwrap()
            .get(service)
            .copied()
            .unwrap_or(Plan::Succeeds);
        let mut rollouts = self.rollouts.lock().unwrap();
        let n = rollouts.iter().filter(|r| r.service() == service).count();
        let id = format!("{service}-r{}", n + 1);
        let rollback_id = format!("{service}-r{}", n + 2);
        for frames in rollout_frames(plan, &id, &rollback_id, service, kind, revisions) {
            rollouts.push(Scripted { frames, served: 0 });
        }
        Ok(id)
    }

    /// The service's last rollout as `Get` reports it, and whether it left the service paused.
    fn last_rollout(&self, service: &str) -> (Option<RolloutStatus>, bool) {
        let rollouts = self.rollouts.lock().unwrap();
        let last = rollouts
            .iter()
            .rev()
            .find(|r| r.service() == service)
            .map(Scripted::current);
        let paused = last
            .as_ref()
            .is_some_and(|r| r.state == wire::rollout_state("failed") && r.rollback_id.is_empty());
        (last, paused)
    }
}

fn ts(seconds: i64, millis: i32) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds,
        nanos: millis * 1_000_000,
    }
}

/// The log records of service "web": two instances, both streams, one record without a time.
fn log_records() -> Vec<LogLine> {
    let line = |instance: &str, stream: &str, time, text: &str| LogLine {
        incarnation: 0,
        instance: instance.into(),
        stream: stream.into(),
        time,
        text: text.into(),
    };
    vec![
        line(
            "web-0",
            "stdout",
            Some(ts(1_795_909_501, 123)),
            "listening on :8080",
        ),
        line(
            "web-1",
            "stderr",
            Some(ts(1_795_909_502, 5)),
            "warning: cache cold",
        ),
        line("web-1", "stdout", None, "GET / 200"),
    ]
}

/// The node's event log: indexes 3 to 6 are kept.
fn events() -> Vec<Event> {
    let event = |index, service: &str, instance: &str, kind: &str, message: &str| Event {
        incarnation: 0,
        index,
        time: Some(ts(1_795_909_500 + i64::try_from(index).unwrap(), 0)),
        service: service.into(),
        instance: instance.into(),
        r#type: wire::event_type(kind),
        message: message.into(),
        attributes: if kind == "instance_exited" {
            [("end".to_owned(), wire::text("exited(3)"))].into()
        } else {
            Default::default()
        },
    };
    vec![
        event(3, "web", "", "applied", "revision 1 applied"),
        event(4, "web", "web-0", "instance_started", "started as pid 4242"),
        event(5, "api", "api-0", "instance_started", "started as pid 4343"),
        event(6, "web", "web-0", "instance_exited", "exited(3)"),
    ]
}

/// A stream of `items`; with `follow`, it stays open until the client goes away.
fn stream_of<T: Send + 'static>(
    items: Vec<Result<T, Status>>,
    follow: bool,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for item in items {
            if tx.send(item).await.is_err() {
                return;
            }
        }
        if follow {
            tx.closed().await;
        }
    });
    ReceiverStream::new(rx)
}

fn spec_name(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("name")?.trim().strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}

/// A service's status; `tick` (the number of `Get` and `List` calls) sets the CPU time its
/// instances used: 10 ms per tick for instance 0, 20 ms for instance 1, ...
fn status_of(name: &str, revision: u64, replicas: u32, tick: u64) -> ServiceStatus {
    ServiceStatus {
        package: None,
        next_run_at: None,
        next_run_local: String::new(),
        autoscale: None,
        name: name.to_owned(),
        revision,
        owner: corral_proto::v1::ServiceOwner::Local as i32,
        health: wire::service_health("healthy"),
        spec: Some(ServiceSpec {
            name: name.to_owned(),
            command: vec!["/bin/sleep".into(), "infinity".into()],
            replicas: Some(replicas),
            rollout: Some(RolloutPolicy {
                max_surge: Some(1),
                max_unavailable: Some(0),
                min_healthy_ms: Some(2000),
                healthy_deadline_ms: Some(60_000),
                auto_rollback: Some(true),
                start_cpu: None,
            }),
            ..Default::default()
        }),
        desired: replicas,
        running: replicas,
        healthy: replicas,
        instances: (0..replicas)
            .map(|index| InstanceStatus {
                id: format!("{name}-{index}"),
                index,
                revision,
                state: InstanceState::Running as i32,
                pid: 1000 + i32::try_from(index).unwrap(),
                health: wire::health("healthy"),
                usage: Some(ResourceUsage {
                    cpu_usage_ns: tick * u64::from(index + 1) * 10_000_000,
                    memory_bytes: 12 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        deleting: false,
        rollout: None,
        revisions: (1..=revision).collect(),
        paused: false,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    type WatchStream = ReceiverStream<Result<Event, Status>>;

    /// Replays the kept events (3 to 6) from `from_index` or the last `last`, filtered; with
    /// follow, stays open. Service "lagging" is cut off after its replay, as a watcher that fell
    /// behind.
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        self.watch_asked.lock().unwrap().push(req.clone());
        let from = if req.last > 0 {
            7u64.saturating_sub(u64::from(req.last)).max(3)
        } else {
            req.from_index
        };
        if (1..3).contains(&from) {
            return Err(Status::out_of_range(format!(
                "event {from} is no longer kept: the oldest event kept is 3"
            )));
        }
        let mut items: Vec<Result<Event, Status>> = events()
            .into_iter()
            .filter(|e| e.index >= from)
            .filter(|e| req.service.is_empty() || req.service == e.service)
            .filter(|e| req.instance.is_empty() || req.instance == e.instance)
            .map(Ok)
            .collect();
        if req.service == "lagging" {
            items = events().into_iter().take(2).map(Ok).collect();
            items.push(Err(Status::resource_exhausted(
                "the watcher fell too far behind the event log and was cut off: resume from index 5",
            )));
        }
        Ok(Response::new(stream_of(items, req.follow)))
    }

    type LogsStream = ReceiverStream<Result<LogLine, Status>>;

    /// The records of service "web" or of one of its instances, the last `tail` of them; with
    /// follow, stays open.
    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = request.into_inner();
        self.logs_asked.lock().unwrap().push(req.clone());
        let mut lines = log_records();
        if req.instance.is_empty() {
            if req.service != "web" {
                return Err(Status::not_found(format!(
                    "service {:?} not found",
                    req.service
                )));
            }
        } else {
            lines.retain(|l| l.instance == req.instance);
            if lines.is_empty() {
                return Err(Status::not_found(format!(
                    "instance {:?} not found",
                    req.instance
                )));
            }
        }
        if let Some(tail) = req.tail {
            let skip = lines.len().saturating_sub(tail as usize);
            lines.drain(..skip);
        }
        Ok(Response::new(stream_of(
            lines.into_iter().map(Ok).collect(),
            req.follow,
        )))
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let req = request.into_inner();
        self.applied.lock().unwrap().push(req.clone());
        let Some(Source::SpecToml(text)) = req.source else {
            return Err(Status::invalid_argument("expected spec_toml"));
        };
        if text.contains("12XB") {
            return Err(Status::invalid_argument(BAD_MEMORY));
        }
        let name = spec_name(&text).ok_or_else(|| Status::invalid_argument("name: missing"))?;
        let (outcome, revision, changes) = match self.services.lock().unwrap().get(&name) {
            None => ("created", 1, vec![]),
            Some((rev, _, old)) if *old == text => ("unchanged", *rev, vec![]),
            Some((rev, _, _)) => ("updated", rev + 1, vec!["command: changed".to_owned()]),
        };
        let mut rollout_id = String::new();
        if !req.dry_run {
            if outcome == "updated" {
                rollout_id =
                    self.start_rollout(&name, "update", (revision - 1, revision), req.force)?;
            }
            let mut services = self.services.lock().unwrap();
            services.insert(name.clone(), (revision, 1, text));
        }
        Ok(Response::new(ApplyResponse {
            name,
            revision,
            outcome: wire::apply_outcome(outcome),
            replaces_instances: outcome == "updated",
            changes,
            rollout_id,
            ..Default::default()
        }))
    }

    async fn apply_batch(
        &self,
        _: Request<corral_proto::v1::ApplyBatchRequest>,
    ) -> Result<Response<corral_proto::v1::ApplyBatchResponse>, Status> {
        Err(Status::unimplemented("the CLI does not batch"))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let name = request.into_inner().name;
        match self.services.lock().unwrap().remove(&name) {
            Some((_, replicas, _)) => Ok(Response::new(DeleteResponse {
                name,
                stopped_instances: replicas,
                ..Default::default()
            })),
            None => Err(Status::not_found(format!("service \"{name}\" not found"))),
        }
    }

    /// The service's status, with its last rollout; while it is warming up, its instances
    /// run but are not healthy yet.
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ServiceStatus>, Status> {
        let name = request.into_inner().name;
        let (revision, replicas) = match self.services.lock().unwrap().get(&name) {
            Some((revision, replicas, _)) => (*revision, *replicas),
            None => return Err(Status::not_found(format!("service \"{name}\" not found"))),
        };
        let tick = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let mut status = status_of(&name, revision, replicas, tick);
        if let Some(left) = self.warming.lock().unwrap().get_mut(&name)
            && *left > 0
        {
            *left -= 1;
            status.healthy = 0;
            status.health = wire::service_health("unhealthy");
            for i in &mut status.instances {
                i.health = wire::health("unknown");
            }
        }
        (status.rollout, status.paused) = self.last_rollout(&name);
        Ok(Response::new(status))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let tick = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let services = self.services.lock().unwrap();
        // Pages of LIST_PAGE, so that clients are seen to read them all.
        let from: usize = match request.get_ref().page_token.as_str() {
            "" => 0,
            t => t
                .parse()
                .map_err(|_| Status::invalid_argument("page_token"))?,
        };
        let next = from + LIST_PAGE;
        Ok(Response::new(ListResponse {
            // Newest first, so that the client's own ordering is what the test sees.
            services: services
                .iter()
                .rev()
                .skip(from)
                .take(LIST_PAGE)
                .map(|(name, (rev, replicas, _))| status_of(name, *rev, *replicas, tick))
                .collect(),
            next_page_token: if next < services.len() {
                next.to_string()
            } else {
                String::new()
            },
            ..Default::default()
        }))
    }

    async fn scale(
        &self,
        request: Request<ScaleRequest>,
    ) -> Result<Response<ScaleResponse>, Status> {
        let req = request.into_inner();
        let mut services = self.services.lock().unwrap();
        let entry = services
            .get_mut(&req.name)
            .ok_or_else(|| Status::not_found(format!("service \"{}\" not found", req.name)))?;
        let previous = std::mem::replace(&mut entry.1, req.replicas);
        Ok(Response::new(ScaleResponse {
            name: req.name,
            previous,
            replicas: req.replicas,
            ..Default::default()
        }))
    }

    async fn node(&self, _: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        match self.node.lock().unwrap().clone() {
            Some(node) => Ok(Response::new(node)),
            None => Err(Status::internal("host snapshot failed")),
        }
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<RolloutResponse>, Status> {
        let req = request.into_inner();
        self.restarts.lock().unwrap().push(req.clone());
        let revision = self.revision_of(&req.name)?;
        let rollout_id =
            self.start_rollout(&req.name, "restart", (revision, revision), req.force)?;
        Ok(Response::new(RolloutResponse {
            name: req.name,
            revision,
            rollout_id,
            ..Default::default()
        }))
    }

    /// Rolls back to `revision`, or to the one below the current.
    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<RolloutResponse>, Status> {
        let req = request.into_inner();
        self.rollbacks.lock().unwrap().push(req.clone());
        let current = self.revision_of(&req.name)?;
        let to = match req.revision {
            Some(to) if to <= current => to,
            Some(to) => return Err(Status::not_found(format!("revision {to} is not kept"))),
            None if current > 1 => current - 1,
            None => {
                return Err(Status::failed_precondition(
                    "no revision below 1 is kept to roll back to",
                ));
            }
        };
        let rollout_id = self.start_rollout(&req.name, "rollback", (current, to), req.force)?;
        Ok(Response::new(RolloutResponse {
            name: req.name,
            revision: to,
            rollout_id,
            ..Default::default()
        }))
    }

    async fn run_job(
        &self,
        _: Request<corral_proto::v1::RunJobRequest>,
    ) -> Result<Response<corral_proto::v1::JobRun>, Status> {
        Err(Status::unimplemented(
            "jobs are tested against the real agent",
        ))
    }

    async fn get_run(
        &self,
        _: Request<corral_proto::v1::GetRunRequest>,
    ) -> Result<Response<corral_proto::v1::JobRun>, Status> {
        Err(Status::unimplemented(
            "jobs are tested against the real agent",
        ))
    }

    async fn list_runs(
        &self,
        _: Request<corral_proto::v1::ListRunsRequest>,
    ) -> Result<Response<corral_proto::v1::ListRunsResponse>, Status> {
        Err(Status::unimplemented(
            "jobs are tested against the real agent",
        ))
    }

    async fn cancel_run(
        &self,
        _: Request<corral_proto::v1::CancelRunRequest>,
    ) -> Result<Response<corral_proto::v1::JobRun>, Status> {
        Err(Status::unimplemented(
            "jobs are tested against the real agent",
        ))
    }

    async fn list_artifacts(
        &self,
        _request: Request<corral_proto::v1::ListArtifactsRequest>,
    ) -> Result<Response<corral_proto::v1::ListArtifactsResponse>, Status> {
        Ok(Response::new(corral_proto::v1::ListArtifactsResponse {
            entries: vec![corral_proto::v1::ArtifactEntry {
                kind: "artifact".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                size: 3 << 20,
                owners: vec!["web@r1".into(), "web@r2".into()],
                users: 1,
                last_used: None,
            }],
            max_cache: 0,
        }))
    }

    async fn import_artifact(
        &self,
        request: Request<corral_proto::v1::ImportArtifactRequest>,
    ) -> Result<Response<corral_proto::v1::ImportArtifactResponse>, Status> {
        let path = request.into_inner().path;
        if !path.starts_with('/') {
            return Err(Status::invalid_argument("path: not absolute"));
        }
        Ok(Response::new(corral_proto::v1::ImportArtifactResponse {
            digest: format!("sha256:{}", "cd".repeat(32)),
        }))
    }

    async fn collect_artifacts(
        &self,
        _request: Request<corral_proto::v1::CollectArtifactsRequest>,
    ) -> Result<Response<corral_proto::v1::CollectArtifactsResponse>, Status> {
        Ok(Response::new(corral_proto::v1::CollectArtifactsResponse {
            removed: vec![format!("artifact sha256:{}", "ef".repeat(32))],
            evicted: vec![],
            freed_bytes: 1 << 20,
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<RolloutStatus>, Status> {
        let id = request.into_inner().id;
        let mut rollouts = self.rollouts.lock().unwrap();
        let rollout = rollouts
            .iter_mut()
            .find(|r| r.id() == id)
            .ok_or_else(|| Status::not_found(format!("rollout \"{id}\" not found")))?;
        Ok(Response::new(rollout.next()))
    }

    async fn signal(
        &self,
        req: Request<corral_proto::v1::SignalRequest>,
    ) -> Result<Response<corral_proto::v1::SignalResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(corral_proto::v1::SignalResponse {
            instance: r.instance,
            signal: r.signal,
            pid: 4242,
        }))
    }
}

impl FakeAgent {
    fn revision_of(&self, name: &str) -> Result<u64, Status> {
        self.services
            .lock()
            .unwrap()
            .get(name)
            .map(|(revision, _, _)| *revision)
            .ok_or_else(|| Status::not_found(format!("service \"{name}\" not found")))
    }
}

/// A fake agent listening on a socket in a fresh temp dir.
struct Served {
    dir: TempDir,
    socket: PathBuf,
    agent: FakeAgent,
}

impl Served {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("corral.sock");
        let incoming = UnixListenerStream::new(UnixListener::bind(&socket).unwrap());
        let agent = FakeAgent::default();
        let server = Server::builder()
            .add_service(AgentServer::new(agent.clone()))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        Served { dir, socket, agent }
    }

    fn addr(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn write_spec(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        path
    }

    async fn run(&self, args: &[&str]) -> Run {
        run_at(&self.addr(), args).await
    }

    /// Runs a command that follows until interrupted, and interrupts it once its output has
    /// `lines` lines.
    async fn run_until_lines(&self, args: &[&str], lines: usize) -> Run {
        let shared = SharedOut::default();
        let seen = shared.clone();
        let interrupt = Box::pin(async move {
            while seen.text().lines().count() < lines {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let console = Console {
            terminal: false,
            progress_terminal: false,
            interrupt,
        };
        let mut out = shared.clone();
        let run = tokio::time::timeout(
            Duration::from_secs(10),
            run_with(&self.addr(), args, &mut out, console),
        )
        .await
        .expect("the command ends when interrupted");
        Run {
            out: shared.text(),
            ..run
        }
    }
}

/// Output that the test can read while the command still writes to it.
#[derive(Debug, Default, Clone)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);

impl SharedOut {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a command line printed and the exit code it ended with.
#[derive(Debug)]
struct Run {
    code: u8,
    out: String,
    err: String,
}

async fn run_at(addr: &str, args: &[&str]) -> Run {
    let mut out = Vec::new();
    let run = run_with(addr, args, &mut out, Console::detached()).await;
    Run {
        out: String::from_utf8(out).unwrap(),
        ..run
    }
}

/// Runs a command line writing its output to `out`; the `Run` has its exit code and stderr.
async fn run_with(addr: &str, args: &[&str], out: &mut dyn Write, console: Console) -> Run {
    let argv = ["corral", "--addr", addr]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv).unwrap();
    let mut err = Vec::new();
    let result = commands::run(cli, out, &mut err, console).await;
    let code = finish(result, &mut err);
    Run {
        code,
        out: String::new(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

const WEB: &str = "name = \"web\"\ncommand = [\"/bin/sleep\", \"infinity\"]\n";

#[tokio::test]
async fn apply_sends_the_file_text_and_prints_the_outcome() {
    let agent = Served::start().await;
    let file = agent.write_spec("web.toml", WEB);

    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, "web: created (revision 1)\n", "")
    );
    let sent = agent.agent.applied.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].source, Some(Source::SpecToml(WEB.to_owned())));
    assert!(!sent[0].dry_run);

    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(run.out, "web: unchanged (revision 1)\n");

    let file = agent.write_spec("web.toml", &format!("{WEB}# new\n"));
    let run = agent
        .run(&["apply", "-f", path_str(&file), "--dry-run"])
        .await;
    assert_eq!(
        run.out,
        "web: would be updated, instances would be replaced\n  command: changed\n"
    );
    assert!(agent.agent.applied.lock().unwrap()[2].dry_run);
    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(
        run.out,
        "web: updated to revision 2, rollout web-r1 replaces the instances\n  command: changed\n"
    );
    assert!(!agent.agent.applied.lock().unwrap()[3].force);
}

#[tokio::test]
async fn a_refused_spec_shows_the_agents_message_verbatim_and_exits_1() {
    let agent = Served::start().await;
    let file = agent.write_spec(
        "web.toml",
        "name = \"web\"\n[resources]\nmemory = \"12XB\"\n",
    );
    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.out, "");
    assert_eq!(
        run.err,
        format!("error: {}: {BAD_MEMORY}\n", file.display())
    );

    let run = agent.run(&["diff", "-f", path_str(&file)]).await;
    assert_eq!(run.code, 1);
    assert_eq!(
        run.err,
        format!("error: {}: {BAD_MEMORY}\n", file.display())
    );
}

#[tokio::test]
async fn apply_of_a_directory_reports_each_file_and_carries_on() {
    let agent = Served::start().await;
    agent.write_spec("specs/b-bad.toml", "name = \"b\"\nmemory = \"12XB\"\n");
    agent.write_spec("specs/c.toml", "name = \"c\"\n");
    agent.write_spec("specs/a.toml", "name = \"a\"\n");
    agent.write_spec("specs/notes.txt", "name = \"ignored\"\n");
    let dir = agent.dir.path().join("specs");

    let run = agent.run(&["apply", "-f", path_str(&dir)]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.out,
        "a: created (revision 1)\nc: created (revision 1)\n"
    );
    assert_eq!(
        run.err,
        format!(
            "error: {}: {BAD_MEMORY}\n",
            dir.join("b-bad.toml").display()
        )
    );

    let run = agent
        .run(&["apply", "-f", path_str(&dir), "-o", "json"])
        .await;
    assert_eq!(run.code, 1);
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    let files: Vec<&str> = doc
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 3);
    assert!(
        files[0].ends_with("a.toml") && files[2].ends_with("c.toml"),
        "{files:?}"
    );
    assert_eq!(doc[0]["outcome"], "unchanged");
    assert_eq!(doc[1]["error"], BAD_MEMORY);
    assert_eq!(doc[1]["name"], Value::Null);
    assert_eq!(doc[2]["name"], "c");
}

#[tokio::test]
async fn diff_applies_nothing() {
    let agent = Served::start().await;
    let file = agent.write_spec("web.toml", WEB);
    let run = agent.run(&["diff", "-f", path_str(&file)]).await;
    assert_eq!((run.code, run.out.as_str()), (0, "web: would be created\n"));
    assert!(agent.agent.applied.lock().unwrap()[0].dry_run);
    assert!(agent.agent.services.lock().unwrap().is_empty());

    let run = agent
        .run(&["diff", "-f", path_str(&file), "-o", "json"])
        .await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["outcome"], "created");
    assert_eq!(doc["dry_run"], true);
}

#[tokio::test]
async fn ls_status_scale_delete_round_trip() {
    let agent = Served::start().await;
    for name in ["api", "web"] {
        let file = agent.write_spec(&format!("{name}.toml"), &format!("name = \"{name}\"\n"));
        assert_eq!(agent.run(&["apply", "-f", path_str(&file)]).await.code, 0);
    }

    let run = agent.run(&["scale", "web", "3"]).await;
    assert_eq!(
        (run.code, run.out.as_str()),
        (0, "web: scaled from 1 to 3 replicas\n")
    );

    let run = agent.run(&["ls"]).await;
    assert_eq!(
        run.out,
        "NAME  REVISION  DESIRED  RUNNING  HEALTHY  HEALTH   SOURCE\n\
         api   1         1        1        1        healthy  local\n\
         web   1         3        3        3        healthy  local\n"
    );
    let run = agent.run(&["ls", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc[0]["name"], "api");
    assert_eq!(doc[1]["instances"][2]["state"], "running");
    assert_eq!(doc[1]["instances"][2]["pid"], 1002);

    let run = agent.run(&["status", "web"]).await;
    assert_eq!(run.code, 0);
    assert!(run.out.starts_with("service:    web\n"), "{}", run.out);
    // No [health]: the instances' health is not a check's, and shows as `-`.
    assert!(run.out.contains("\nhealth:     healthy\n"), "{}", run.out);
    assert!(
        run.out.contains("\nweb-2     running  -       1002  0"),
        "{}",
        run.out
    );
    let run = agent.run(&["status", "web", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["health"], "healthy");
    assert_eq!(doc["instances"][0]["health"], "healthy");
    assert_eq!(doc["instances"][0]["health_reason"], Value::Null);

    let run = agent.run(&["delete", "web", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"name": "web", "stopped_instances": 3})
    );

    let run = agent.run(&["status", "web"]).await;
    assert_eq!((run.code, run.out.as_str()), (1, ""));
    assert_eq!(run.err, "error: service \"web\" not found\n");
}

#[tokio::test]
async fn an_empty_agent_lists_nothing() {
    let agent = Served::start().await;
    let run = agent.run(&["ls"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, "", "no services\n")
    );
    let run = agent.run(&["ls", "-o", "json"]).await;
    assert_eq!((run.code, run.out.as_str()), (0, "[]\n"));
}

#[tokio::test]
async fn other_server_errors_name_their_code() {
    let agent = Served::start().await;
    let run = agent.run(&["node"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.err, "error: internal error: host snapshot failed\n");
}

#[tokio::test]
async fn a_missing_socket_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("corral.sock").display());
    let run = run_at(&addr, &["ls"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.out, "");
    assert_eq!(
        run.err,
        format!(
            "error: cannot connect to {addr}: no such socket — is corrald running? \
             (--addr or CORRAL_ADDR picks another socket)\n"
        )
    );
}

#[tokio::test]
async fn a_socket_nobody_listens_on_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("corral.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let addr = format!("unix://{}", socket.display());
    let run = run_at(&addr, &["status", "web"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.err.starts_with(&format!(
            "error: cannot connect to {addr}: connection refused"
        )),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn a_missing_spec_file_is_reported_before_connecting() {
    let run = run_at(
        "unix:///nonexistent/corral.sock",
        &["apply", "-f", "/nonexistent/web.toml"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.err
            .starts_with("error: cannot read /nonexistent/web.toml: "),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn plaintext_tcp_is_refused() {
    let run = run_at("http://127.0.0.1:7443", &["ls"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.err.contains("plaintext TCP is not offered"),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn logs_of_a_service_or_an_instance() {
    let agent = Served::start().await;
    let run = agent.run(&["logs", "web"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (
            0,
            "2026-11-28T23:45:01.123Z web-0 out| listening on :8080\n\
             2026-11-28T23:45:02.005Z web-1 err| warning: cache cold\n\
             -                        web-1 out| GET / 200\n",
            ""
        )
    );
    let asked = agent.agent.logs_asked.lock().unwrap().clone();
    assert_eq!(
        asked,
        [LogsRequest {
            service: "web".into(),
            instance: String::new(),
            follow: false,
            tail: None,
            since: None,
        }]
    );

    let run = agent.run(&["logs", "web/1", "--tail", "1"]).await;
    assert_eq!(
        (run.code, run.out.as_str()),
        (0, "-                        web-1 out| GET / 200\n")
    );
    let asked = agent
        .agent
        .logs_asked
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(
        (asked.service.as_str(), asked.instance.as_str(), asked.tail),
        ("", "web-1", Some(1))
    );

    let run = agent.run(&["logs", "web", "-o", "json"]).await;
    assert_eq!(run.code, 0);
    let docs: Vec<Value> = run
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        docs,
        [
            serde_json::json!({"instance": "web-0", "incarnation": null, "stream": "stdout", "time": "2026-11-28T23:45:01.123Z", "text": "listening on :8080"}),
            serde_json::json!({"instance": "web-1", "incarnation": null, "stream": "stderr", "time": "2026-11-28T23:45:02.005Z", "text": "warning: cache cold"}),
            serde_json::json!({"instance": "web-1", "incarnation": null, "stream": "stdout", "time": null, "text": "GET / 200"}),
        ]
    );
}

#[tokio::test]
async fn logs_of_name_index_fall_back_to_the_instance() {
    let agent = Served::start().await;
    // No service is called web-1: the instance is.
    let run = agent.run(&["logs", "web-1"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.out.lines().count(), 2, "{}", run.out);
    let asked: Vec<(String, String)> = agent
        .agent
        .logs_asked
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.service.clone(), r.instance.clone()))
        .collect();
    assert_eq!(
        asked,
        [
            ("web-1".to_owned(), String::new()),
            (String::new(), "web-1".to_owned())
        ]
    );

    let run = agent.run(&["logs", "web-7"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (1, "", "error: instance \"web-7\" not found\n")
    );
    let run = agent.run(&["logs", "nope"]).await;
    assert_eq!(
        (run.code, run.err.as_str()),
        (1, "error: service \"nope\" not found\n")
    );
    // Three calls for web-1 and web-7, one for nope.
    assert_eq!(agent.agent.logs_asked.lock().unwrap().len(), 5);
}

#[tokio::test]
async fn logs_since_a_duration_ago() {
    let agent = Served::start().await;
    let before = std::time::SystemTime::now();
    let run = agent.run(&["logs", "web", "--since", "10m"]).await;
    assert_eq!(run.code, 0);
    let since = agent.agent.logs_asked.lock().unwrap()[0].since.unwrap();
    let since = std::time::SystemTime::try_from(since).unwrap();
    let ago = before.duration_since(since).unwrap();
    assert!(
        ago <= Duration::from_secs(600) && ago > Duration::from_secs(590),
        "{ago:?}"
    );

    let run = agent
        .run(&["logs", "web", "--since", "2026-11-28T23:45:00Z"])
        .await;
    assert_eq!(run.code, 0);
    assert_eq!(
        agent.agent.logs_asked.lock().unwrap()[1].since,
        Some(ts(1_795_909_500, 0))
    );
}

#[tokio::test]
async fn following_logs_ends_with_0_on_interrupt() {
    let agent = Served::start().await;
    let run = agent.run_until_lines(&["logs", "web", "-f"], 3).await;
    assert_eq!((run.code, run.err.as_str()), (0, ""));
    assert_eq!(run.out.lines().count(), 3, "{}", run.out);
    assert!(agent.agent.logs_asked.lock().unwrap()[0].follow);
}

const EVENTS_TABLE: &str = "\
INDEX  TIME                      SERVICE  INSTANCE  TYPE              MESSAGE
3      2026-11-28T23:45:03.000Z  web      -         applied           revision 1 applied
4      2026-11-28T23:45:04.000Z  web      web-0     instance_started  started as pid 4242
5      2026-11-28T23:45:05.000Z  api      api-0     instance_started  started as pid 4343
6      2026-11-28T23:45:06.000Z  web      web-0     instance_exited   exited(3)
";

#[tokio::test]
async fn events_print_the_last_50_by_default() {
    let agent = Served::start().await;
    let run = agent.run(&["events"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, EVENTS_TABLE, "")
    );
    let asked = agent.agent.watch_asked.lock().unwrap()[0].clone();
    assert_eq!(
        asked,
        WatchRequest {
            from_index: 0,
            service: String::new(),
            instance: String::new(),
            follow: false,
            last: 50,
            ..Default::default()
        }
    );

    let run = agent.run(&["events", "--last", "2"]).await;
    assert_eq!(run.out.lines().count(), 3, "{}", run.out);
    assert!(run.out.contains("\n5  "), "{}", run.out);

    let run = agent.run(&["events", "--since", "7"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, "", "no events\n")
    );
}

#[tokio::test]
async fn events_as_json_lines_filtered() {
    let agent = Served::start().await;
    let run = agent
        .run(&[
            "events",
            "--since",
            "0",
            "--instance",
            "web/0",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"index":4,"time":"2026-11-28T23:45:04Z","service":"web","instance":"web-0","incarnation":null,"type":"instance_started","message":"started as pid 4242","attributes":{}}"#,
            r#"{"index":6,"time":"2026-11-28T23:45:06Z","service":"web","instance":"web-0","incarnation":null,"type":"instance_exited","message":"exited(3)","attributes":{"end":"exited(3)"}}"#,
        ]
    );
    let asked = agent.agent.watch_asked.lock().unwrap()[0].clone();
    assert_eq!(
        (asked.from_index, asked.last, asked.instance.as_str()),
        (0, 0, "web-0")
    );
}

#[tokio::test]
async fn events_no_longer_kept_show_the_agents_message_and_exit_1() {
    let agent = Served::start().await;
    let run = agent.run(&["events", "--since", "1"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (
            1,
            "",
            "error: event 1 is no longer kept: the oldest event kept is 3\n"
        )
    );
    let run = agent
        .run(&["events", "-f", "--since", "2", "-o", "json"])
        .await;
    assert_eq!(run.code, 1);
    assert!(
        run.err.ends_with("the oldest event kept is 3\n"),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn a_watcher_cut_off_prints_what_came_then_where_to_resume() {
    let agent = Served::start().await;
    let run = agent.run(&["events", "-f", "--service", "lagging"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.out.lines().count(), 3, "{}", run.out);
    assert_eq!(
        run.err,
        "error: the watcher fell too far behind the event log and was cut off: resume from index 5\n"
    );
}

#[tokio::test]
async fn following_events_ends_with_0_on_interrupt() {
    let agent = Served::start().await;
    let run = agent.run_until_lines(&["events", "-f"], 5).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, EVENTS_TABLE, "")
    );
    assert!(agent.agent.watch_asked.lock().unwrap()[0].follow);
}

fn node() -> NodeInfo {
    NodeInfo {
        hostname: "node1".into(),
        memory_total_bytes: 4 << 30,
        memory_available_bytes: 3 << 29,
        load1: 0.5,
        load5: 0.25,
        load15: 0.125,
        ..Default::default()
    }
}

/// Services per page of the mock's `List`.
const LIST_PAGE: usize = 2;

#[tokio::test]
async fn top_reads_every_page_of_services() {
    let agent = Served::start().await;
    *agent.agent.node.lock().unwrap() = Some(node());
    let names = ["api", "db", "queue", "web", "zeta"];
    for name in names {
        let file = agent.write_spec(
            &format!("{name}.toml"),
            &WEB.replace("name = \"web\"", &format!("name = \"{name}\"")),
        );
        assert_eq!(agent.run(&["apply", "-f", path_str(&file)]).await.code, 0);
    }
    assert!(names.len() > 2 * LIST_PAGE);
    let run = agent.run(&["top", "--iterations", "1"]).await;
    assert_eq!((run.code, run.err.as_str()), (0, ""), "{run:?}");
    for name in names {
        assert!(
            run.out.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing:\n{}",
            run.out
        );
    }
}

#[tokio::test]
async fn top_prints_frames_with_cpu_from_the_second_on() {
    let agent = Served::start().await;
    *agent.agent.node.lock().unwrap() = Some(node());
    let file = agent.write_spec("web.toml", WEB);
    assert_eq!(agent.run(&["apply", "-f", path_str(&file)]).await.code, 0);
    assert_eq!(agent.run(&["scale", "web", "2"]).await.code, 0);

    let run = agent
        .run(&["top", "--iterations", "2", "--interval", "100ms"])
        .await;
    assert_eq!((run.code, run.err.as_str()), (0, ""), "{run:?}");
    let frames: Vec<&str> = run.out.split("\n\nnode1  ").collect();
    assert_eq!(frames.len(), 2, "{}", run.out);
    let first: Vec<&str> = frames[0].lines().collect();
    assert!(
        first[0].starts_with("node1  load 0.50 0.25 0.12  memory 1.5GiB available of 4GiB  "),
        "{}",
        run.out
    );
    assert_eq!(
        &first[1..],
        [
            "",
            "SERVICE  INSTANCE  STATE    HEALTH  PID   CPU%  MEM    RESTARTS  LAST EXIT",
            "web      web-0     running  -       1000  -     12MiB  0         -",
            "web      web-1     running  -       1001  -     12MiB  0         -",
        ]
    );
    // In the second frame, web-1 used twice web-0's CPU time: it comes first.
    let second: Vec<&str> = frames[1].lines().collect();
    assert_eq!(second.len(), 5, "{}", run.out);
    let cpu = |line: &str| -> f64 { line.split_whitespace().nth(5).unwrap().parse().unwrap() };
    assert!(second[3].starts_with("web      web-1 "), "{}", run.out);
    assert!(second[4].starts_with("web      web-0 "), "{}", run.out);
    assert!(cpu(second[3]) > cpu(second[4]), "{}", run.out);
    assert!(cpu(second[4]) > 0.0, "{}", run.out);

    let run = agent
        .run(&[
            "top",
            "--iterations",
            "2",
            "--interval",
            "100ms",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let docs: Vec<Value> = run
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["node"]["hostname"], "node1");
    assert_eq!(docs[0]["instances"][0]["instance"], "web-0");
    assert_eq!(docs[0]["instances"][0]["cpu_percent"], Value::Null);
    assert_eq!(docs[1]["instances"][0]["instance"], "web-1");
    assert!(docs[1]["instances"][0]["cpu_percent"].as_f64().unwrap() > 0.0);
    assert_eq!(docs[1]["instances"][0]["memory_bytes"], 12 << 20);
}

#[tokio::test]
async fn top_fails_when_the_agent_does() {
    let agent = Served::start().await;
    let run = agent.run(&["top", "--iterations", "1"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (1, "", "error: internal error: host snapshot failed\n")
    );
}

#[tokio::test]
async fn signal_sends_the_instance_id() {
    let agent = Served::start().await;
    let run = agent.run(&["signal", "web/0", "HUP"]).await;
    assert_eq!(
        (run.code, run.out.as_str()),
        (0, "web-0: sent HUP to pid 4242\n")
    );
    let run = agent
        .run(&["signal", "web-0", "SIGHUP", "-o", "json"])
        .await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"instance": "web-0", "signal": "SIGHUP", "pid": 4242})
    );
}

/// A fake agent with service "web" at revision 1 and its rollouts going as `plan` says.
async fn with_web(plan: Plan) -> Served {
    let agent = Served::start().await;
    let file = agent.write_spec("web.toml", WEB);
    assert_eq!(agent.run(&["apply", "-f", path_str(&file)]).await.code, 0);
    agent.agent.plans.lock().unwrap().insert("web".into(), plan);
    agent
}

/// The steps of a successful rollout of web as `--wait` prints them off a terminal.
const STEPS_SUCCEEDED: &str = "\
2026-11-28T23:45:00.500Z started web-1 web-1 started with revision 1
2026-11-28T23:45:02.600Z ready web-1 web-1 ready
2026-11-28T23:45:02.700Z stopping web-0 web-0 stopping
2026-11-28T23:45:09.400Z stopped web-0 web-0 stopped
2026-11-28T23:45:09.400Z succeeded - every instance replaced
";

#[tokio::test]
async fn restart_starts_a_rollout_and_prints_its_id() {
    let agent = with_web(Plan::Succeeds).await;
    let run = agent.run(&["restart", "web"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, "web: rollout web-r1 started (restart, revision 1)\n", "")
    );
    assert_eq!(
        agent.agent.restarts.lock().unwrap().clone(),
        [RestartRequest {
            name: "web".into(),
            force: false,
            ..Default::default()
        }]
    );
    let run = agent.run(&["restart", "web", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"name": "web", "revision": 1, "rollout_id": "web-r2"})
    );

    let run = agent.run(&["restart", "nope"]).await;
    assert_eq!(
        (run.code, run.err.as_str()),
        (1, "error: service \"nope\" not found\n")
    );
}

#[tokio::test]
async fn restart_wait_follows_the_rollout_to_success() {
    let agent = with_web(Plan::Succeeds).await;
    let run = agent.run(&["restart", "web", "--wait"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (
            0,
            "web: rollout web-r1 started (restart, revision 1)\nrollout web-r1 succeeded in 9.4s\n",
            STEPS_SUCCEEDED
        ),
    );
}

#[tokio::test]
async fn a_failed_rollout_exits_1_after_following_its_rollback() {
    let agent = with_web(Plan::FailsAndRollsBack).await;
    let run = agent.run(&["restart", "web", "--wait"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.out,
        "web: rollout web-r1 started (restart, revision 1)\n"
    );
    assert_eq!(
        run.err,
        "\
2026-11-28T23:45:00.500Z started web-1 web-1 started with revision 1
2026-11-28T23:45:09.400Z failed web-1 web-1 not ready within 60s
2026-11-28T23:45:09.400Z rollback - rolling back to revision 1
error: rollout web-r1 failed: web-1 not ready within 60s
following its rollback, rollout web-r2
2026-11-28T23:45:09.500Z stopping web-1 web-1 stopping
2026-11-28T23:45:10.900Z stopped web-1 web-1 stopped
2026-11-28T23:45:11.000Z succeeded - back at revision 1
rolled back to revision 1 (rollout web-r2 succeeded)
"
    );
}

#[tokio::test]
async fn a_failed_rollout_without_rollback_pauses_the_service() {
    let agent = with_web(Plan::Fails).await;
    let run = agent.run(&["restart", "web", "--wait"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.err
            .ends_with("\nerror: rollout web-r1 failed: web-1 not ready within 60s\n"),
        "{}",
        run.err
    );
    assert!(!run.err.contains("rolled back"), "{}", run.err);

    let run = agent.run(&["status", "web"]).await;
    assert_eq!(run.code, 0);
    assert!(
        run.out.contains(
            "\nstate:      paused (a rollout failed; apply, restart or rollback to continue)\n\
             rollout:    web-r1 (restart, revision 1) failed: web-1 not ready within 60s\n\
             revisions:  1\n"
        ),
        "{}",
        run.out
    );
    let run = agent.run(&["status", "web", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["paused"], true);
    assert_eq!(doc["revisions"], serde_json::json!([1]));
    assert_eq!(doc["rollout"]["id"], "web-r1");
    assert_eq!(doc["rollout"]["state"], "failed");
}

#[tokio::test]
async fn a_superseded_rollout_exits_1_with_the_reason() {
    let agent = with_web(Plan::Superseded).await;
    let run = agent.run(&["restart", "web", "--wait"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.err
            .ends_with("\nerror: rollout web-r1 superseded: superseded by web-r9\n"),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn wait_as_json_prints_the_final_rollout_and_no_progress() {
    let agent = with_web(Plan::Succeeds).await;
    let run = agent.run(&["restart", "web", "--wait", "-o", "json"]).await;
    assert_eq!((run.code, run.err.as_str()), (0, ""), "{run:?}");
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["id"], "web-r1");
    assert_eq!(doc["state"], "succeeded");
    assert_eq!(doc["kind"], "restart");
    assert_eq!(doc["replaced"], 1);
    assert_eq!(doc["steps"].as_array().unwrap().len(), 5);
    assert_eq!(doc["rollback"], Value::Null);

    let agent = with_web(Plan::FailsAndRollsBack).await;
    let run = agent.run(&["restart", "web", "--wait", "-o", "json"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["state"], "failed");
    assert_eq!(doc["rollback_id"], "web-r2");
    assert_eq!(doc["rollback"]["state"], "succeeded");
    assert_eq!(doc["rollback"]["rollback_of"], "web-r1");
    // The failure is still said on stderr, without progress lines.
    assert_eq!(
        run.err,
        "error: rollout web-r1 failed: web-1 not ready within 60s\n\
         rolled back to revision 1 (rollout web-r2 succeeded)\n"
    );
}

#[tokio::test]
async fn a_rollout_refused_while_another_runs_says_how_to_force_it() {
    let agent = with_web(Plan::Succeeds).await;
    agent.agent.busy.lock().unwrap().insert("web".into());
    let want = "error: rollout web-r9 of service \"web\" is still running \
                (use --force to supersede it)\n";
    let run = agent.run(&["restart", "web", "--wait"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (1, "", want)
    );
    let run = agent.run(&["rollback", "web", "--to", "1"]).await;
    assert_eq!((run.code, run.err.as_str()), (1, want));
    // A refusal for another reason gets no hint.
    let run = agent.run(&["rollback", "web"]).await;
    assert_eq!(
        (run.code, run.err.as_str()),
        (
            1,
            "error: no revision below 1 is kept to roll back to
"
        )
    );
    let file = agent.write_spec("web.toml", &format!("{WEB}# new\n"));
    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(run.code, 1);
    assert_eq!(
        run.err,
        format!(
            "error: {}: {}",
            file.display(),
            want.trim_start_matches("error: ")
        )
    );

    let run = agent
        .run(&["apply", "-f", path_str(&file), "--force"])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(agent.agent.applied.lock().unwrap().last().unwrap().force);
    agent.agent.busy.lock().unwrap().insert("web".into());
    let run = agent.run(&["restart", "web", "--force"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(agent.agent.restarts.lock().unwrap().last().unwrap().force);
}

#[tokio::test]
async fn rollback_passes_the_revision_asked_for() {
    let agent = with_web(Plan::Succeeds).await;
    let file = agent.write_spec("web.toml", &format!("{WEB}# 2\n"));
    assert_eq!(agent.run(&["apply", "-f", path_str(&file)]).await.code, 0);

    let run = agent.run(&["rollback", "web", "--to", "1", "--wait"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.out,
        "web: rollout web-r2 started (rollback to revision 1)\nrollout web-r2 succeeded in 9.4s\n"
    );
    let run = agent.run(&["rollback", "web"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let asked: Vec<(Option<u64>, bool)> = agent
        .agent
        .rollbacks
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.revision, r.force))
        .collect();
    assert_eq!(asked, [(Some(1), false), (None, false)]);

    let run = agent.run(&["rollback", "web", "--to", "7"]).await;
    assert_eq!(
        (run.code, run.err.as_str()),
        (1, "error: revision 7 is not kept\n")
    );
}

#[tokio::test]
async fn apply_wait_follows_the_rollout_it_started() {
    let agent = with_web(Plan::Succeeds).await;
    let file = agent.write_spec("web.toml", &format!("{WEB}# 2\n"));
    let run = agent.run(&["apply", "-f", path_str(&file), "--wait"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.out,
        "web: updated to revision 2, rollout web-r1 replaces the instances\n  command: changed\n\
         rollout web-r1 succeeded in 9.4s\n"
    );
    assert_eq!(run.err, STEPS_SUCCEEDED.replace("revision 1", "revision 2"));

    let file = agent.write_spec("web.toml", &format!("{WEB}# 3\n"));
    let run = agent
        .run(&["apply", "-f", path_str(&file), "--wait", "-o", "json"])
        .await;
    assert_eq!((run.code, run.err.as_str()), (0, ""), "{run:?}");
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc[0]["rollout_id"], "web-r2");
    assert_eq!(doc[0]["rollout"]["state"], "succeeded");
    assert_eq!(doc[0]["error"], Value::Null);
}

#[tokio::test]
async fn apply_wait_without_a_rollout_waits_for_healthy_instances() {
    let agent = Served::start().await;
    agent.agent.warming.lock().unwrap().insert("api".into(), 2);
    agent.write_spec("specs/api.toml", "name = \"api\"\n");
    agent.write_spec("specs/web.toml", WEB);
    let dir = agent.dir.path().join("specs");
    let run = agent.run(&["apply", "-f", path_str(&dir), "--wait"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.out,
        "api: created (revision 1)\nweb: created (revision 1)\n\
         api: 1/1 instances running and healthy\nweb: 1/1 instances running and healthy\n"
    );
    // Off a terminal, each change of the counts is one line.
    assert_eq!(
        run.err,
        "api: waiting for 1 instance: 1 running, 0 healthy\n"
    );
    assert_eq!(agent.agent.warming.lock().unwrap()["api"], 0);

    // Several files, one updated: its rollout is followed, the other only checked.
    let file = agent.write_spec("specs/web.toml", &format!("{WEB}# 2\n"));
    assert!(file.starts_with(&dir));
    let run = agent.run(&["apply", "-f", path_str(&dir), "--wait"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.out,
        "api: unchanged (revision 1)\n\
         web: updated to revision 2, rollout web-r1 replaces the instances\n  command: changed\n\
         api: 1/1 instances running and healthy\n\
         rollout web-r1 succeeded in 9.4s\n"
    );
}

#[tokio::test]
async fn wait_gives_up_after_its_timeout() {
    let agent = with_web(Plan::Hangs).await;
    let run = agent
        .run(&["restart", "web", "--wait", "--timeout", "300ms"])
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.err,
        "2026-11-28T23:45:00.500Z started web-1 web-1 started with revision 1\n\
         error: rollout web-r1 still running after 300ms: 1 of 1 old instances still to \
         replace, 1 of 1 new instances not ready (the rollout goes on; `corral rollout web-r1` \
         shows it)\n"
    );

    let run = agent
        .run(&[
            "restart",
            "web",
            "--wait",
            "--timeout",
            "300ms",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(
        (doc["id"].as_str(), doc["state"].as_str()),
        (Some("web-r2"), Some("running"))
    );

    agent
        .agent
        .warming
        .lock()
        .unwrap()
        .insert("api".into(), u64::MAX);
    let file = agent.write_spec("api.toml", "name = \"api\"\n");
    let run = agent
        .run(&[
            "apply",
            "-f",
            path_str(&file),
            "--wait",
            "--timeout",
            "300ms",
        ])
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.out, "api: created (revision 1)\n");
    assert!(
        run.err.ends_with(
            "error: api: not ready after 300ms: 1 of 1 instances not healthy: api-0 (running)\n"
        ),
        "{}",
        run.err
    );
    let run = agent
        .run(&[
            "apply",
            "-f",
            path_str(&file),
            "--wait",
            "--timeout",
            "300ms",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc[0]["outcome"], "unchanged");
    assert_eq!(
        doc[0]["error"],
        "api: not ready after 300ms: 1 of 1 instances not healthy: api-0 (running)"
    );
}

#[tokio::test]
async fn rollout_shows_one_rollout_and_its_rollback() {
    let agent = with_web(Plan::FailsAndRollsBack).await;
    assert_eq!(agent.run(&["restart", "web", "--wait"]).await.code, 1);

    let run = agent.run(&["rollout", "web-r1"]).await;
    assert_eq!((run.code, run.err.as_str()), (0, ""), "{run:?}");
    assert_eq!(
        run.out,
        "\
rollout:         web-r1
service:         web
kind:            restart
state:           failed
revision:        1
progress:        0/1 old replaced (1 left), 0/1 new ready (1 started), 1 available
policy:          max_surge 1, max_unavailable 0, min_healthy 2s, healthy_deadline 1m, auto_rollback on
started:         2026-11-28T23:45:00.000Z
finished:        2026-11-28T23:45:09.400Z (after 9.4s)
reason:          web-1 not ready within 60s
rolled back by:  web-r2 (succeeded)

TIME                      STEP      INSTANCE  MESSAGE
2026-11-28T23:45:00.500Z  started   web-1     web-1 started with revision 1
2026-11-28T23:45:09.400Z  failed    web-1     web-1 not ready within 60s
2026-11-28T23:45:09.400Z  rollback  -         rolling back to revision 1
"
    );
    let run = agent.run(&["rollout", "web-r2", "-o", "json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["kind"], "auto_rollback");
    assert_eq!(doc["rollback_of"], "web-r1");
    assert_eq!(doc["state"], "succeeded");

    let run = agent.run(&["rollout", "web-r7"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (1, "", "error: rollout \"web-r7\" not found\n")
    );
}

#[tokio::test]
async fn diff_says_whether_instances_would_be_rolled() {
    let agent = with_web(Plan::Succeeds).await;
    assert_eq!(agent.run(&["scale", "web", "4"]).await.code, 0);
    let file = agent.write_spec("web.toml", &format!("{WEB}# 2\n"));
    let run = agent.run(&["diff", "-f", path_str(&file)]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (
            0,
            "web: would be updated, instances would be replaced\n  command: changed\n\
             would replace 4 instances by a rolling update (max_surge 1, max_unavailable 0)\n",
            ""
        )
    );
    let file = agent.write_spec("web.toml", WEB);
    let run = agent.run(&["diff", "-f", path_str(&file)]).await;
    assert_eq!(
        run.out,
        "web: unchanged (revision 1)\nnothing would change: no instance would be replaced\n"
    );
    // Nothing was applied, and no rollout started.
    assert!(agent.agent.rollouts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn on_a_terminal_wait_redraws_one_progress_line() {
    let agent = with_web(Plan::Succeeds).await;
    let console = Console {
        terminal: true,
        progress_terminal: true,
        interrupt: Box::pin(std::future::pending()),
    };
    let mut out = Vec::new();
    let run = run_with(
        &agent.addr(),
        &["restart", "web", "--wait"],
        &mut out,
        console,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "web: rollout web-r1 started (restart, revision 1)\nrollout web-r1 succeeded in 9.4s\n"
    );
    // Each poll redraws the line in place; the last one stays, ended by a newline.
    let frames: Vec<&str> = run.err.split('\r').filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.len(), 3, "{:?}", run.err);
    assert_eq!(
        frames[0],
        "\x1b[?7lweb-r1 restart rev 1 → 1  [----------]  0/1 replaced · 0/1 ready · 1 available \
         · started web-1\x1b[K\x1b[?7h"
    );
    assert_eq!(
        frames[2],
        "\x1b[?7lweb-r1 restart rev 1 → 1  [##########]  1/1 replaced · 1/1 ready · 1 available \
         · succeeded\x1b[K\x1b[?7h\n"
    );
}

#[tokio::test]
async fn an_interrupted_wait_exits_1_and_says_the_rollout_goes_on() {
    let agent = with_web(Plan::Hangs).await;
    let console = Console {
        terminal: false,
        progress_terminal: false,
        interrupt: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
    };
    let mut out = Vec::new();
    let run = run_with(
        &agent.addr(),
        &["restart", "web", "--wait"],
        &mut out,
        console,
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.err.ends_with(
            "\nerror: stopped waiting: the rollout goes on; `corral rollout web-r1` shows it\n"
        ),
        "{}",
        run.err
    );
}
