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
    /// What the host decides for what a spec leaves open (reported in status).
    pub defaults: convert::HostDefaults,
    /// This node's persisted id, and the kernel's boot id.
    pub node_id: String,
    pub boot_id: String,
    /// The artifact store, for `ListArtifacts`, `ImportArtifact` and `CollectArtifacts`.
    pub artifacts: Option<ArtifactStore>,
}

fn rollout_response(r: RolloutStarted) -> Response<pb::RolloutResponse> {
    Response::new(pb::RolloutResponse {
        name: r.name,
        revision: r.revision,
        rollout_id: r.rollout_id,
        generation: r.generation,
    })
}

/// INVALID_ARGUMENT from a message that begins with the request field it is about
/// (`"name: ..."`), with that field's violation in the details.
fn invalid(message: impl Into<String>) -> Status {
    let message = message.into();
    match message.split_once(": ") {
        Some((field, rest)) => super::status::invalid_field(field, rest),
        None => super::status::invalid_field("", message),
    }
}

/// `name`, the request's `field`, is a valid service name.
fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if spec::valid_service_name(name) {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(invalid(format!(
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
        // A number answers with the signal's canonical name when it has one (`10` ->
        // `SIGUSR1`); a real-time signal with `SIGRTMIN+n`.
        Ok(n) if (1..=64).contains(&n) => Ok((n, canonical_signal(n))),
        _ => Err(invalid(format!(
            "signal: {:?} is not a signal (use a name like SIGHUP, or a number from 1 to 64)",
            s.chars().take(40).collect::<String>()
        ))),
    }
}

/// The canonical name of signal number `n` (1 to 64).
fn canonical_signal(n: i32) -> String {
    if let Some(name) = spec::signal_name(n) {
        return name.to_string();
    }
    let rtmin = libc::SIGRTMIN();
    if n >= rtmin {
        format!("SIGRTMIN+{}", n - rtmin)
    } else {
        // Numbers below SIGRTMIN that no standard signal has (glibc reserves 32 and 33).
        format!("SIG{n}")
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
        let mut ids: Vec<String> = status.instances.iter().map(|i| i.id.clone()).collect();
        // A job's ended runs keep their instances' logs.
        if let Some(id) = only
            && status.spec.job.is_some()
            && !ids.iter().any(|i| i == id)
        {
            let runs = self
                .supervisor
                .list_runs(service)
                .await
                .map_err(to_status)?;
            if runs
                .iter()
                .flat_map(|r| r.keys())
                .any(|k| k.to_string() == id)
            {
                ids.push(id.to_string());
            }
        }
        match only {
            Some(id) if !ids.iter().any(|i| i == id) => {
                Err(to_status(SupervisorError::InstanceNotFound {
                    instance: id.to_string(),
                }))
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
        use crate::logs::{Follower, Merged, StartAt};
        let io = |e: crate::logs::LogError| Status::internal(e.to_string());
        let task = |e: tokio::task::JoinError| Status::internal(e.to_string());
        // One service-wide view: by time, the last `tail` of all instances together, read as
        // it is sent (a block and a record per stream held, whatever the size of the logs).
        let root = self.log_root.clone();
        let ids = instances.clone();
        let (mut merged, positions) =
            tokio::task::spawn_blocking(move || Merged::open(&root, &ids, tail, since))
                .await
                .map_err(task)?
                .map_err(io)?;
        loop {
            let (back, batch) = tokio::task::spawn_blocking(move || {
                let batch = merged.next_batch(LOGS_BATCH);
                (merged, batch)
            })
            .await
            .map_err(task)?;
            merged = back;
            let batch = batch.map_err(io)?;
            if batch.is_empty() {
                break;
            }
            for l in batch {
                if tx.send(Ok(line_to_proto(l))).await.is_err() {
                    return Ok(());
                }
            }
        }
        drop(merged);
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

/// Records read from the files at a time for a Logs call (each at most a `MAX_RECORD`).
const LOGS_BATCH: usize = 256;

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
        incarnation: l.incarnation.unwrap_or(0),
    }
}

/// The most requests in one ApplyBatch.
const MAX_BATCH: usize = 100;

/// The spec a request carries, typed or as TOML text, validated.
fn spec_of(
    source: Option<pb::apply_request::Source>,
) -> Result<spec::ServiceSpec, spec::SpecError> {
    match source {
        Some(pb::apply_request::Source::Spec(p)) => {
            convert::spec_from_proto(p).and_then(|raw| raw.validate())
        }
        Some(pb::apply_request::Source::SpecToml(text)) if text.len() > MAX_SPEC_TOML => {
            Err(spec::SpecError {
                errors: vec![spec::FieldError::new(
                    "spec_toml",
                    format!(
                        "{} bytes is larger than the {MAX_SPEC_TOML}-byte limit",
                        text.len()
                    ),
                )],
            })
        }
        Some(pb::apply_request::Source::SpecToml(text)) => spec::parse_toml(&text),
        None => Err(spec::SpecError {
            errors: vec![spec::FieldError::new(
                "spec",
                "one of spec or spec_toml is required",
            )],
        }),
    }
}

/// The most services in one List answer.
const MAX_PAGE: usize = 1000;

/// A request's `selector`, or INVALID_ARGUMENT naming it.
fn parse_selector(text: &str) -> Result<spec::labels::Selector, Status> {
    spec::labels::Selector::parse(text).map_err(|why| super::status::invalid_field("selector", why))
}

/// The labels of services, as a watch last saw them, to judge its events by a selector.
#[derive(Debug, Default)]
struct LabelCache(std::collections::HashMap<String, std::collections::BTreeMap<String, String>>);

impl LabelCache {
    /// Whether the service of `e` matches: its labels read again when the event may have
    /// changed them (or it was not seen yet), else as last seen.
    async fn matches(
        &mut self,
        supervisor: &SupervisorHandle,
        selector: &spec::labels::Selector,
        e: &crate::events::Event,
    ) -> bool {
        if selector.is_empty() {
            return true;
        }
        let stale = matches!(e.kind, crate::events::EventKind::Applied { .. });
        if (stale || !self.0.contains_key(&e.service))
            && let Ok(s) = supervisor.get(&e.service).await
        {
            self.0.insert(e.service.clone(), s.spec.labels.clone());
        }
        let none = std::collections::BTreeMap::new();
        selector.matches(self.0.get(&e.service).unwrap_or(&none))
    }
}

/// Bounds of `WatchRequest.bookmark_interval_ms`.
const MIN_BOOKMARK_MS: u32 = 100;
const MAX_BOOKMARK_MS: u32 = 3_600_000;

/// Events sent to one watcher ahead of it reading them.
const WATCH_BUFFER: usize = 256;

fn watch_status(e: EventError) -> Status {
    super::status::watch_status(&e)
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
                return Err(super::status::invalid_field(
                    "service",
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
                        invalid(format!(
                            "instance: {:?} is not an instance id (like \"web-2\")",
                            inst.chars().take(80).collect::<String>()
                        ))
                    })?;
                if !req.service.is_empty() && req.service != svc {
                    return Err(invalid(format!(
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
                    invalid(format!(
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
            return Err(invalid("instance: too long to be an instance id"));
        }
        let bookmarks = match req.bookmark_interval_ms {
            0 => None,
            ms if !(MIN_BOOKMARK_MS..=MAX_BOOKMARK_MS).contains(&ms) => {
                return Err(super::status::invalid_field(
                    "bookmark_interval_ms",
                    format!(
                        "{ms} is out of range (0 for none, or {MIN_BOOKMARK_MS} to {MAX_BOOKMARK_MS})"
                    ),
                ));
            }
            _ if !req.follow => {
                return Err(super::status::invalid_field(
                    "bookmark_interval_ms",
                    "bookmarks need follow (a stream that ends has its last index in its last event)",
                ));
            }
            ms => Some(std::time::Duration::from_millis(u64::from(ms))),
        };
        let selector = parse_selector(&req.selector)?;
        let supervisor = self.supervisor.clone();
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
            // Without bookmarks the timer is never polled (the branch is off).
            let period = bookmarks.unwrap_or(std::time::Duration::from_secs(3600));
            let mut bookmark =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            bookmark.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut labels = LabelCache::default();
            loop {
                let item = tokio::select! {
                    biased;
                    () = &mut stop => {
                        let _ = tx.send(Err(shutting_down(Some(watch.resume_from())))).await;
                        break;
                    }
                    _ = bookmark.tick(), if bookmarks.is_some() => {
                        // Every event below resume_from has been sent or filtered out.
                        let index = watch.resume_from().saturating_sub(1);
                        if tx.send(Ok(convert::bookmark(index))).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    item = watch.next() => item,
                };
                let (done, send) = match &item {
                    Ok(e) => (
                        end.is_some_and(|end| e.index >= end),
                        filter.matches(e) && labels.matches(&supervisor, &selector, e).await,
                    ),
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
                            bookmark.reset();
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
        tracing::debug!(target: crate::phases::TARGET, at_ns = crate::phases::now_ns(), "apply received");
        let audit = AuditNote::of(&req);
        if !req.get_ref().dry_run {
            super::auth::may_change(&req, "Apply")?;
        }
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
                    return Err(invalid(format!(
                        "spec_toml: {} bytes is larger than the {MAX_SPEC_TOML}-byte limit",
                        text.len()
                    )));
                }
                spec::parse_toml(&text).map_err(|e| super::status::invalid_spec(&e))?
            }
            None => {
                return Err(invalid("spec: one of spec or spec_toml is required"));
            }
        };
        if let Some(a) = &audit {
            a.note(&format!("{}{dry}", spec.name));
        }
        let spec = self.defaults.normalize(spec);
        let a = self
            .supervisor
            .apply_if(spec, req.dry_run, req.force, req.expected_revision)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ApplyResponse {
            name: a.name,
            revision: a.revision,
            outcome: convert::apply_outcome_to_proto(a.kind) as i32,
            changes: a.changes,
            replaces_instances: a.replaces_instances,
            rollout_id: a.rollout_id.unwrap_or_default(),
            generation: a.generation,
        }))
    }

    async fn apply_batch(
        &self,
        req: Request<pb::ApplyBatchRequest>,
    ) -> Result<Response<pb::ApplyBatchResponse>, Status> {
        let audit = AuditNote::of(&req);
        if !req.get_ref().dry_run {
            super::auth::may_change(&req, "ApplyBatch")?;
        }
        let req = req.into_inner();
        if req.requests.len() > MAX_BATCH {
            return Err(super::status::invalid_field(
                "requests",
                format!(
                    "{} requests (at most {MAX_BATCH} in one batch)",
                    req.requests.len()
                ),
            ));
        }
        let mut items = Vec::with_capacity(req.requests.len());
        let mut errors = Vec::new();
        for (i, r) in req.requests.into_iter().enumerate() {
            if r.dry_run {
                errors.push(spec::FieldError::new(
                    format!("requests[{i}].dry_run"),
                    "set dry_run on the batch, not on its requests",
                ));
                continue;
            }
            match spec_of(r.source) {
                Ok(s) => items.push(crate::supervisor::BatchItem {
                    spec: self.defaults.normalize(s),
                    force: r.force,
                    expected: r.expected_revision,
                }),
                Err(e) => errors.extend(e.errors.into_iter().map(|f| {
                    spec::FieldError::new(format!("requests[{i}].{}", f.field), f.message)
                })),
            }
        }
        if !errors.is_empty() {
            return Err(super::status::invalid_spec(&spec::SpecError { errors }));
        }
        if let Some(a) = &audit {
            let names: Vec<&str> = items.iter().map(|i| i.spec.name.as_str()).collect();
            a.note(&names.join(","));
        }
        let outcomes = self
            .supervisor
            .apply_batch(items, req.dry_run)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ApplyBatchResponse {
            results: outcomes
                .into_iter()
                .map(|a| pb::ApplyResponse {
                    name: a.name,
                    revision: a.revision,
                    outcome: convert::apply_outcome_to_proto(a.kind) as i32,
                    changes: a.changes,
                    replaces_instances: a.replaces_instances,
                    rollout_id: a.rollout_id.unwrap_or_default(),
                    generation: a.generation,
                })
                .collect(),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        AuditNote::set(&req, &req.get_ref().name);
        let req = req.into_inner();
        check_name("name", &req.name)?;
        let d = self
            .supervisor
            .delete_if(&req.name, req.force, req.expected_revision)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteResponse {
            name: d.name,
            stopped_instances: d.stopped,
            generation: d.generation,
        }))
    }

    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::ServiceStatus>, Status> {
        let name = req.into_inner().name;
        check_name("name", &name)?;
        let s = self.supervisor.get(&name).await.map_err(to_status)?;
        Ok(Response::new(convert::status_to_proto(&s, &self.defaults)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = req.into_inner();
        let selector = parse_selector(&req.selector)?;
        if !req.page_token.is_empty() && !spec::valid_service_name(&req.page_token) {
            return Err(super::status::invalid_field(
                "page_token",
                "not a token a List answered with (pass next_page_token as it came)",
            ));
        }
        let page_size = match req.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let v = self.supervisor.list().await.map_err(to_status)?;
        let mut selected: Vec<&crate::supervisor::ServiceStatus> = v
            .services
            .iter()
            .filter(|s| selector.matches(&s.spec.labels))
            .filter(|s| req.page_token.is_empty() || s.name.as_str() > req.page_token.as_str())
            .collect();
        selected.sort_by(|a, b| a.name.cmp(&b.name));
        let next_page_token = if selected.len() > page_size {
            selected.truncate(page_size);
            selected.last().map(|s| s.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListResponse {
            services: selected
                .into_iter()
                .map(|s| convert::status_to_proto(s, &self.defaults))
                .collect(),
            event_index: v.event_index,
            next_page_token,
        }))
    }

    async fn restart(
        &self,
        req: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let req = req.into_inner();
        check_name("name", &req.name)?;
        let r = self
            .supervisor
            .restart_if(&req.name, req.force, req.expected_revision)
            .await;
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
            .rollback_if(&req.name, req.revision, req.force, req.expected_revision)
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
            return Err(invalid(format!(
                "id: {shown:?} is not a rollout id (<service>-r<number>, as Apply, Restart and Rollback return)"
            )));
        }
        let r = self.supervisor.get_rollout(&id).await.map_err(to_status)?;
        Ok(Response::new(convert::rollout_to_proto(&r)))
    }

    async fn run_job(
        &self,
        req: Request<pb::RunJobRequest>,
    ) -> Result<Response<pb::JobRun>, Status> {
        tracing::debug!(target: crate::phases::TARGET, at_ns = crate::phases::now_ns(), "run received");
        AuditNote::set(&req, &req.get_ref().name);
        let req = req.into_inner();
        check_name("name", &req.name)?;
        let overrides = convert::overrides_from_proto(req.overrides.unwrap_or_default());
        let r = self
            .supervisor
            .run_job(&req.name, overrides)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::run_to_proto(&r)))
    }

    async fn get_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::JobRun>, Status> {
        let id = check_run_id(req.into_inner().id)?;
        let r = self.supervisor.get_run(&id).await.map_err(to_status)?;
        Ok(Response::new(convert::run_to_proto(&r)))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let name = req.into_inner().name;
        check_name("name", &name)?;
        let runs = self.supervisor.list_runs(&name).await.map_err(to_status)?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(convert::run_to_proto).collect(),
        }))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::JobRun>, Status> {
        AuditNote::set(&req, &req.get_ref().id);
        let id = check_run_id(req.into_inner().id)?;
        let r = self.supervisor.cancel_run(&id).await.map_err(to_status)?;
        Ok(Response::new(convert::run_to_proto(&r)))
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
            .scale_if(&req.name, req.replicas, req.force, req.expected_revision)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ScaleResponse {
            name: s.name,
            previous: s.previous,
            replicas: s.replicas,
            generation: s.generation,
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
            return Err(invalid(format!(
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
        let facts = convert::NodeFacts {
            caps: &self.capabilities,
            namespaces: &self.namespaces,
            summary,
            node_id: &self.node_id,
            boot_id: &self.boot_id,
            fleet: self.fleet.as_ref().map(|f| f.report()),
        };
        Ok(Response::new(convert::node_to_proto(&host, &facts)))
    }
}

/// A run id as the caller gave it, if it is one (`<job>-r<number>`).
fn check_run_id(id: String) -> Result<String, Status> {
    let valid = crate::supervisor::run::parse_run_id(&id)
        .is_some_and(|(job, _)| spec::valid_service_name(job));
    if valid {
        Ok(id)
    } else {
        let shown: String = id.chars().take(80).collect();
        Err(Status::invalid_argument(format!(
            "id: {shown:?} is not a run id (<job>-r<number>, as RunJob returns)"
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
            defaults: convert::HostDefaults::of_this_process(),
            node_id: "test-node".into(),
            boot_id: String::new(),
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
