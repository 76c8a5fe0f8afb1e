//! `corral.v1.Agent` over the supervisor: decode, validate the request's own fields, call
//! the supervisor, encode. No logic of its own.

use crate::fleet::FleetShared;
use std::sync::Arc;

use corral_proto::v1 as pb;
use corral_proto::v1::agent_server::Agent;
use tonic::{Request, Response, Status};

use super::auth::AuditNote;
use super::calls::{Stopping, shutting_down};
use super::convert;
use super::status::{artifact_status, to_status};
use crate::artifact::ArtifactStore;
use crate::cgroups::Capabilities;
use crate::events::{EventError, EventLog, Filter};
use crate::host::Host;
use crate::spec::{self, InstanceKey, Namespace};
use crate::supervisor::{RolloutStarted, SupervisorError, SupervisorHandle};

/// The largest spec file text accepted (the gRPC message limit is larger).
pub const MAX_SPEC_TOML: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct AgentService {
    pub supervisor: SupervisorHandle,
    pub events: Arc<EventLog>,
    /// `<state-dir>/logs`: one directory per instance.
    pub log_root: std::path::PathBuf,
    pub host: Arc<Host>,
    pub capabilities: Capabilities,
    pub namespaces: Vec<Namespace>,
    /// The link to the fleet's etcd, with `--etcd`.
    pub fleet: Option<FleetShared>,
    /// The artifact store, for `ListArtifacts`, `ImportArtifact` and `CollectArtifacts`.
    pub artifacts: Option<ArtifactStore>,
}

fn rollout_response(r: RolloutStarted) -> Response<pb::RolloutResponse> {
    Response::new(pb::RolloutResponse {
        name: r.name,
        revision: r.revision,
        rollout_id: r.rollout_id,
    })
}

/// `name`, the request's `field`, is a valid service name.
fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if spec::valid_service_name(name) {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(Status::invalid_argument(format!(
            "{field}: {shown:?} is not a valid service name ([a-z0-9][a-z0-9-]{{0,62}})"
        )))
    }
}

/// A signal by name (`SIGHUP`, `hup`) or number (1 to 64), with its canonical name.
fn parse_signal(s: &str) -> Result<(i32, String), Status> {
    if let Some((n, name)) = spec::signal_by_name(s) {
        return Ok((n, name.to_string()));
    }
    match s.parse::<i32>() {
        Ok(n) if (1..=64).contains(&n) => Ok((n, n.to_string())),
        _ => Err(Status::invalid_argument(format!(
            "signal: {:?} is not a signal (use a name like SIGHUP, or a number from 1 to 64)",
            s.chars().take(40).collect::<String>()
        ))),
    }
}

impl AgentService {
    fn store(&self) -> Result<&ArtifactStore, Status> {
        self.artifacts
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this agent runs without an artifact store"))
    }

    /// The instance ids of a service (or the one asked for, which must exist).
    async fn instances_of(&self, service: &str, only: Option<&str>) -> Result<Vec<String>, Status> {
        let status = self.supervisor.get(service).await.map_err(to_status)?;
        let ids: Vec<String> = status.instances.iter().map(|i| i.id.clone()).collect();
        match only {
            Some(id) if !ids.iter().any(|i| i == id) => {
                Err(Status::not_found(format!("instance {id:?} not found")))
            }
            Some(id) => Ok(vec![id.to_string()]),
            None => Ok(ids),
        }
    }

    /// Send the records asked for, then (following) new ones until the client goes away.
    async fn stream_logs(
        &self,
        q: LogsQuery,
        tx: &tokio::sync::mpsc::Sender<Result<pb::LogLine, Status>>,
    ) -> Result<(), Status> {
        let LogsQuery {
            service,
            only,
            instances,
            tail,
            since,
            follow,
        } = q;
        use crate::logs::{Follower, StartAt, read_instance};
        let io = |e: crate::logs::LogError| Status::internal(e.to_string());
        let mut lines = Vec::new();
        let mut positions = Vec::new();
        for id in &instances {
            let root = self.log_root.clone();
            let id2 = id.clone();
            let t = tokio::task::spawn_blocking(move || read_instance(&root, &id2, tail, since))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(io)?;
            lines.extend(t.lines);
            positions.push((id.clone(), t.position));
        }
        // One service-wide view: by time, the last `tail` of all instances together.
        lines.sort_by_key(|l| l.time);
        if let Some(n) = tail {
            let skip = lines.len().saturating_sub(n);
            lines.drain(..skip);
        }
        for l in lines {
            if tx.send(Ok(line_to_proto(l))).await.is_err() {
                return Ok(());
            }
        }
        if !follow {
            return Ok(());
        }
        let mut follower = Follower::new(std::time::Duration::from_millis(100));
        for (id, pos) in positions {
            follower
                .add_instance(self.log_root.clone(), id, StartAt::After(pos))
                .map_err(io)?;
        }
        let mut rescan = tokio::time::interval(std::time::Duration::from_secs(1));
        // Instances found after the follow began: only their records from then on (their
        // files may hold an earlier life of the same slot).
        let began = std::time::SystemTime::now();
        let mut late: std::collections::HashSet<String> = std::collections::HashSet::new();
        loop {
            tokio::select! {
                batch = follower.next_batch() => {
                    for l in batch.map_err(io)? {
                        if late.contains(&l.instance) && l.time.is_some_and(|t| t < began) {
                            continue;
                        }
                        if tx.send(Ok(line_to_proto(l))).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                _ = rescan.tick(), if only.is_none() => {
                    // A service-wide follow picks up instances that appear (scale-up).
                    if let Ok(ids) = self.instances_of(&service, None).await {
                        let new: Vec<String> = ids.into_iter().filter(|i| !follower.is_following(i)).collect();
                        for id in new {
                            late.insert(id.clone());
                            follower.add_instance(self.log_root.clone(), id, StartAt::Beginning).map_err(io)?;
                        }
                    }
                }
                _ = tx.closed() => return Ok(()),
            }
        }
    }
}

/// What a Logs call asks for, once checked.
struct LogsQuery {
    service: String,
    /// One instance of the service, or all of them.
    only: Option<String>,
    instances: Vec<String>,
    tail: Option<usize>,
    since: Option<std::time::SystemTime>,
    follow: bool,
}

fn line_to_proto(l: crate::logs::LogLine) -> pb::LogLine {
    pb::LogLine {
        instance: l.instance,
        stream: l.stream.as_str().to_string(),
        time: l.time.map(prost_types::Timestamp::from),
        text: l.text,
    }
}

/// Events sent to one watcher ahead of it reading them.
const WATCH_BUFFER: usize = 256;

fn watch_status(e: EventError) -> Status {
    match e {
        EventError::Trimmed { .. } | EventError::InvalidIndex { .. } => {
            Status::out_of_range(e.to_string())
        }
        EventError::Lagged { .. } => Status::resource_exhausted(e.to_string()),
        EventError::Io { .. } => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Event, Status>>;
    type LogsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::LogLine, Status>>;

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let stopping = Stopping::of(&req);
        let req = req.into_inner();
        let (service, only) = match (req.service.as_str(), req.instance.as_str()) {
            ("", "") => {
                return Err(Status::invalid_argument(
                    "service or instance: one is required",
                ));
            }
            (_, inst) if !inst.is_empty() => {
                let svc = inst
                    .rsplit_once('-')
                    .filter(|(svc, i)| {
                        spec::valid_service_name(svc)
                            && !i.is_empty()
                            && i.bytes().all(|b| b.is_ascii_digit())
                    })
                    .map(|(s, _)| s.to_string())
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "instance: {:?} is not an instance id (like \"web-2\")",
                            inst.chars().take(80).collect::<String>()
                        ))
                    })?;
                if !req.service.is_empty() && req.service != svc {
                    return Err(Status::invalid_argument(format!(
                        "instance: {inst:?} is not an instance of service {:?}",
                        req.service
                    )));
                }
                (svc, Some(inst.to_string()))
            }
            (svc, _) => (svc.to_string(), None),
        };
        check_name("service", &service)?;
        // A time no clock can hold is refused, not taken as no time at all (which would send
        // every record instead of none).
        let since = req
            .since
            .map(|t| {
                std::time::SystemTime::try_from(t).map_err(|_| {
                    Status::invalid_argument(format!(
                        "since: {}s {}ns is out of range",
                        t.seconds, t.nanos
                    ))
                })
            })
            .transpose()?;
        let instances = self.instances_of(&service, only.as_deref()).await?;
        let tail = req.tail.map(|t| t as usize);
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let agent = self.clone();
        tokio::spawn(async move {
            let q = LogsQuery {
                service,
                only,
                instances,
                tail,
                since,
                follow: req.follow,
            };
            let sent = tokio::select! {
                sent = agent.stream_logs(q, &tx) => sent,
                () = stopping.wait() => Err(shutting_down(None)),
            };
            if let Err(status) = sent {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stopping = Stopping::of(&req);
        let req = req.into_inner();
        if !req.service.is_empty() {
            check_name("service", &req.service)?;
        }
        if req.instance.len() > 80 {
            return Err(Status::invalid_argument(
                "instance: too long to be an instance id",
            ));
        }
        let filter = Filter {
            service: (!req.service.is_empty()).then_some(req.service),
            instance: (!req.instance.is_empty()).then_some(req.instance),
        };
        let next = self.events.next();
        let from = if req.last > 0 {
            next.saturating_sub(u64::from(req.last))
                .max(self.events.oldest())
        } else {
            req.from_index
        };
        // Without follow: stop after the last event that existed now. That end is found on the
        // unfiltered log (a filter may match nothing), and the filter applied here.
        let end = (!req.follow).then(|| next.saturating_sub(1));
        let watch_filter = if end.is_some() {
            Filter::all()
        } else {
            filter.clone()
        };
        let mut watch = self
            .events
            .watch(from, watch_filter)
            .map_err(watch_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            if end.is_some_and(|end| from > end || end == 0) {
                return;
            }
            // When the agent stops, the stream ends with where to resume: after the last
            // event handed on (an event taken but not handed on is resumed at).
            let stop = stopping.wait();
            tokio::pin!(stop);
            loop {
                let item = tokio::select! {
                    biased;
                    () = &mut stop => {
                        let _ = tx.send(Err(shutting_down(Some(watch.resume_from())))).await;
                        break;
                    }
                    item = watch.next() => item,
                };
                let (done, send) = match &item {
                    Ok(e) => (end.is_some_and(|end| e.index >= end), filter.matches(e)),
                    Err(_) => (true, true),
                };
                if send {
                    let index = item.as_ref().map(|e| e.index).ok();
                    let item = item
                        .map(|e| convert::event_to_proto(&e))
                        .map_err(watch_status);
                    tokio::select! {
                        biased;
                        sent = tx.send(item) => {
                            // A closed channel: the client went away.
                            if sent.is_err() {
                                break;
                            }
                        }
                        () = &mut stop => {
                            let resume = index.unwrap_or_else(|| watch.resume_from());
                            let _ = tx.send(Err(shutting_down(Some(resume)))).await;
                            break;
                        }
                    }
                }
                if done {
                    break;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let audit = AuditNote::of(&req);
        let req = req.into_inner();
        let dry = if req.dry_run { " (dry run)" } else { "" };
        let spec = match req.source {
            Some(pb::apply_request::Source::Spec(p)) => {
                if let Some(a) = &audit {
                    a.note(&format!(
                        "{}{dry}",
                        p.name.chars().take(80).collect::<String>()
                    ));
                }
                convert::spec_from_proto(p)
                    .and_then(|raw| raw.validate())
                    .map_err(|e| super::status::invalid_spec(&e))?
            }
            Some(pb::apply_request::Source::SpecToml(text)) => {
                if text.len() > MAX_SPEC_TOML {
                    return Err(Status::invalid_argument(format!(
                        "spec_toml: {} bytes is larger than the {MAX_SPEC_TOML}-byte limit",
                        text.len()
                    )));
                }
                spec::parse_toml(&text).map_err(|e| super::status::invalid_spec(&e))?
            }
            None => {
                return Err(Status::invalid_argument(
                    "spec: one of spec or spec_toml is required",
                ));
            }
        };
        if let Some(a) = &audit {
            a.note(&format!("{}{dry}", spec.name));
        }
        let a = self
            .supervisor
            .apply(spec, req.dry_run, req.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ApplyResponse {
            name: a.name,
            revision: a.revision,
            outcome: convert::apply_outcome_to_proto(a.kind) as i32,
            changes: a.changes,
            replaces_instances: a.replaces_instances,
            rollout_id: a.rollout_id.unwrap_or_default(),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        AuditNote::set(&req, &req.get_ref().name);
        let req = req.into_inner();
        let name = req.name;
        check_name("name", &name)?;
        let d = self
            .supervisor
            .delete(&name, req.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteResponse {
            name: d.name,
            stopped_instances: d.stopped,
        }))
    }

    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = req.into_inner().name;
        check_name("name", &name)?;
        let s = self.supervisor.get(&name).await.map_err(to_status)?;
        Ok(Response::new(convert::status_to_proto(&s)))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let v = self.supervisor.list().await.map_err(to_status)?;
        Ok(Response::new(pb::ListResponse {
            services: v.iter().map(convert::status_to_proto).collect(),
        }))
    }

    async fn restart(
        &self,
        req: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let req = req.into_inner();
        check_name("name", &req.name)?;
        let r = self.supervisor.restart(&req.name, req.force).await;
        r.map(rollout_response).map_err(to_status)
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let req = req.into_inner();
        check_name("name", &req.name)?;
        let r = self
            .supervisor
            .rollback(&req.name, req.revision, req.force)
            .await;
        r.map(rollout_response).map_err(to_status)
    }

    async fn get_rollout(
        &self,
        req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let id = req.into_inner().id;
        // `<service>-r<n>`.
        let valid = id
            .rsplit_once("-r")
            .is_some_and(|(svc, n)| spec::valid_service_name(svc) && n.parse::<u64>().is_ok());
        if !valid {
            let shown: String = id.chars().take(80).collect();
            return Err(Status::invalid_argument(format!(
                "id: {shown:?} is not a rollout id (<service>-r<number>, as Apply, Restart and Rollback return)"
            )));
        }
        let r = self.supervisor.get_rollout(&id).await.map_err(to_status)?;
        Ok(Response::new(convert::rollout_to_proto(&r)))
    }

    async fn list_artifacts(
        &self,
        _req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let store = self.store()?;
        Ok(Response::new(pb::ListArtifactsResponse {
            entries: store
                .list()
                .iter()
                .map(convert::artifact_to_proto)
                .collect(),
            max_cache: store.max_cache().unwrap_or(0),
        }))
    }

    async fn import_artifact(
        &self,
        req: Request<pb::ImportArtifactRequest>,
    ) -> Result<Response<pb::ImportArtifactResponse>, Status> {
        AuditNote::set(&req, &req.get_ref().path);
        let store = self.store()?;
        let path = std::path::PathBuf::from(req.into_inner().path);
        if !path.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "path: {:?} is not an absolute path on the agent's host",
                path.display()
                    .to_string()
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        }
        let digest = store.import(&path).await.map_err(artifact_status)?;
        Ok(Response::new(pb::ImportArtifactResponse {
            digest: digest.to_string(),
        }))
    }

    async fn collect_artifacts(
        &self,
        _req: Request<pb::CollectArtifactsRequest>,
    ) -> Result<Response<pb::CollectArtifactsResponse>, Status> {
        let report = self.store()?.gc().await.map_err(artifact_status)?;
        Ok(Response::new(convert::gc_to_proto(&report)))
    }

    async fn scale(
        &self,
        req: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ScaleResponse>, Status> {
        AuditNote::set(&req, &req.get_ref().name);
        let req = req.into_inner();
        check_name("name", &req.name)?;
        let s = self
            .supervisor
            .scale(&req.name, req.replicas, req.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ScaleResponse {
            name: s.name,
            previous: s.previous,
            replicas: s.replicas,
        }))
    }

    async fn signal(
        &self,
        req: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        AuditNote::set(&req, &req.get_ref().instance);
        let req = req.into_inner();
        let (number, name) = parse_signal(&req.signal)?;
        if req.instance.is_empty() || req.instance.len() > 80 || req.instance.contains('/') {
            return Err(Status::invalid_argument(format!(
                "instance: {:?} is not an instance id (like \"web-2\")",
                req.instance.chars().take(80).collect::<String>()
            )));
        }
        // Text that is no instance id names no instance.
        let key: InstanceKey = req.instance.parse().map_err(|_| {
            to_status(SupervisorError::InstanceNotFound {
                instance: req.instance.clone(),
            })
        })?;
        let s = self
            .supervisor
            .signal(key, number)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SignalResponse {
            instance: s.instance.to_string(),
            signal: name,
            pid: s.pid,
        }))
    }

    async fn node(&self, _req: Request<pb::NodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let summary = self.supervisor.summary().await.map_err(to_status)?;
        let host = self.host.snapshot();
        Ok(Response::new(convert::node_to_proto(
            &host,
            &self.capabilities,
            &self.namespaces,
            summary.services,
            summary.instances,
            self.fleet.as_ref().map(|f| f.report()).as_ref(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::CgroupBackend;
    use crate::cgroups::recording::RecordingCgroups;
    use crate::runtime::fake::FakeRuntime;
    use crate::store::MemStore;
    use crate::supervisor::{Deps, Driver};
    use tonic::Code;

    /// The service over a supervisor with fakes for the OS.
    async fn agent() -> AgentService {
        let cgroups = Arc::new(RecordingCgroups::default());
        let capabilities = cgroups.capabilities().clone();
        let events = Arc::new(EventLog::in_memory(100));
        let (mut driver, handle) = Driver::new(Deps::new(
            Arc::new(FakeRuntime::new()),
            cgroups,
            Arc::new(MemStore::new()),
            Namespace::ALL.to_vec(),
            events.clone(),
        ));
        driver.restore().await;
        tokio::spawn(driver.run(tokio_util::sync::CancellationToken::new()));
        AgentService {
            fleet: None,
            supervisor: handle,
            events,
            log_root: std::env::temp_dir().join("corral-api-test-no-logs"),
            host: Arc::new(Host::new()),
            capabilities,
            namespaces: Namespace::ALL.to_vec(),
            artifacts: None,
        }
    }

    /// A bad service name is reported under the request field that carried it: Logs and
    /// Watch have no `name` field.
    #[tokio::test]
    async fn errors_name_the_request_field() {
        let a = agent().await;
        let logs = |service: &str, instance: &str| {
            a.logs(Request::new(pb::LogsRequest {
                service: service.into(),
                instance: instance.into(),
                ..Default::default()
            }))
        };
        let cases = [
            (logs("-web", "").await.err(), "service: "),
            (logs("", "../x-1").await.err(), "instance: "),
            (logs("", "-1").await.err(), "instance: "),
            (logs("web", "other-1").await.err(), "instance: "),
            (
                a.logs(Request::new(pb::LogsRequest {
                    service: "web".into(),
                    since: Some(prost_types::Timestamp {
                        seconds: i64::MIN,
                        nanos: -1,
                    }),
                    ..Default::default()
                }))
                .await
                .err(),
                "since: ",
            ),
            (
                a.watch(Request::new(pb::WatchRequest {
                    service: "../x".into(),
                    ..Default::default()
                }))
                .await
                .err(),
                "service: ",
            ),
            (
                a.get(Request::new(pb::GetRequest {
                    name: "../x".into(),
                }))
                .await
                .err(),
                "name: ",
            ),
        ];
        for (i, (status, field)) in cases.into_iter().enumerate() {
            let status = status.unwrap_or_else(|| panic!("case {i} was accepted"));
            assert_eq!(status.code(), Code::InvalidArgument, "case {i}: {status:?}");
            assert!(
                status.message().starts_with(field),
                "case {i}: {:?} should start with {field:?}",
                status.message()
            );
        }
    }
}
