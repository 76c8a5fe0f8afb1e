//! Conversions between the wire (`corral.v1`) and the domain. The spec goes wire -> `RawSpec`
//! and is validated by `spec` like a TOML file, so both paths give the same errors.

use crate::fleet::{FleetReport, Link};
use crate::supervisor::Owner;
use std::time::SystemTime;

use corral_proto::v1 as pb;

use crate::artifact::{EntryKind, GcReport, ListEntry};
use crate::cgroups::Capabilities;
use crate::events::{Event, EventKind};
use crate::health::{HealthState, ServiceHealth};
use crate::host::HostInfo;
use crate::rollout::record::{Kind as RolloutKind, State as RolloutState};
use crate::spec::artifact::{RawArtifact, RawImage};
use crate::spec::{
    self, FieldError, Namespace, RawHealth, RawIsolation, RawLogs, RawPort, RawResources,
    RawRestart, RawRollout, RawSize, RawSocket, RawSpec, RawStop, ServiceSpec, SpecError,
};
use crate::supervisor::{ApplyKind, ExitClass, ExitInfo, InstanceStatus, Phase, ServiceStatus};

fn int(field: &str, v: u64, errors: &mut Vec<FieldError>) -> i64 {
    i64::try_from(v).unwrap_or_else(|_| {
        errors.push(FieldError {
            field: field.into(),
            message: format!("{v} is out of range"),
        });
        0
    })
}

/// A wire spec as the user wrote it; `validate()` does the rest.
pub fn spec_from_proto(p: pb::ServiceSpec) -> Result<RawSpec, SpecError> {
    let mut errors = Vec::new();
    let none_if_empty = |v: Vec<String>| if v.is_empty() { None } else { Some(v) };
    let raw = RawSpec {
        name: Some(p.name),
        command: none_if_empty(p.command),
        env: if p.env.is_empty() {
            None
        } else {
            Some(p.env.into_iter().collect())
        },
        workdir: p.workdir,
        user: p.user,
        replicas: p.replicas.map(i64::from),
        resources: p.resources.map(|r| RawResources {
            cpu: r.cpu,
            memory: r.memory.map(RawSize::Text),
            pids: r.pids.map(|v| int("resources.pids", v, &mut errors)),
            nofile: r.nofile.map(|v| int("resources.nofile", v, &mut errors)),
        }),
        isolation: p.isolation.map(|i| RawIsolation {
            namespaces: i.namespaces.map(|n| n.names),
            hostname: i.hostname,
            private_tmp: i.private_tmp,
            capabilities: i.capabilities.map(|c| c.names),
            readonly_root: i.readonly_root,
            seccomp: i.seccomp,
            devices: i.devices,
            system_paths: i.system_paths,
            userns: i.userns,
        }),
        ports: if p.ports.is_empty() {
            None
        } else {
            Some(
                p.ports
                    .into_iter()
                    .map(|(k, v)| (k, RawPort::Text(v)))
                    .collect(),
            )
        },
        sockets: if p.sockets.is_empty() {
            None
        } else {
            Some(
                p.sockets
                    .into_iter()
                    .map(|s| RawSocket {
                        name: Some(s.name),
                        listen: Some(s.listen),
                    })
                    .collect(),
            )
        },
        restart: p.restart.map(|r| RawRestart {
            policy: r.policy,
            backoff: r.backoff,
            backoff_max: r.backoff_max,
        }),
        health: p.health.map(|h| RawHealth {
            http: h.http,
            tcp: h.tcp,
            grpc: h.grpc,
            exec: none_if_empty(h.exec),
            interval: h.interval,
            timeout: h.timeout,
            start_period: h.start_period,
            failure_threshold: h.failure_threshold.map(i64::from),
            success_threshold: h.success_threshold.map(i64::from),
            restart_on_failure: h.restart_on_failure,
            notify: h.notify,
        }),
        rollout: p.rollout.map(|r| RawRollout {
            max_surge: r.max_surge.map(i64::from),
            max_unavailable: r.max_unavailable.map(i64::from),
            min_healthy: r.min_healthy,
            healthy_deadline: r.healthy_deadline,
            auto_rollback: r.auto_rollback,
        }),
        stop: p.stop.map(|s| RawStop {
            signal: s.signal,
            grace: s.grace,
        }),
        logs: p.logs.map(|l| RawLogs {
            max_size: l.max_size.map(RawSize::Text),
            max_files: l.max_files.map(i64::from),
        }),
        artifact: p.artifact.map(|a| RawArtifact {
            url: a.url,
            sha256: a.sha256,
            format: a.format,
            mount: a.mount,
        }),
        image: p.image.map(|i| RawImage {
            url: i.url,
            digest: i.digest,
            persist: i.persist,
        }),
    };
    if errors.is_empty() {
        Ok(raw)
    } else {
        Err(SpecError { errors })
    }
}

fn size_text(s: RawSize) -> String {
    match s {
        RawSize::Bytes(n) => n.to_string(),
        RawSize::Text(t) => t,
    }
}

fn u32_of(v: Option<i64>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

/// The validated spec on the wire, every default explicit.
pub fn spec_to_proto(spec: &ServiceSpec) -> pb::ServiceSpec {
    let r = spec.to_raw();
    pb::ServiceSpec {
        name: r.name.unwrap_or_default(),
        command: r.command.unwrap_or_default(),
        env: r.env.unwrap_or_default().into_iter().collect(),
        workdir: r.workdir,
        user: r.user,
        replicas: u32_of(r.replicas),
        resources: r.resources.map(|x| pb::Resources {
            cpu: x.cpu,
            memory: x.memory.map(size_text),
            pids: x.pids.and_then(|n| u64::try_from(n).ok()),
            nofile: x.nofile.and_then(|n| u64::try_from(n).ok()),
        }),
        isolation: r.isolation.map(|i| pb::Isolation {
            namespaces: i.namespaces.map(|names| pb::NamespaceList { names }),
            hostname: i.hostname,
            private_tmp: i.private_tmp,
            capabilities: i.capabilities.map(|names| pb::CapabilityList { names }),
            readonly_root: i.readonly_root,
            seccomp: i.seccomp,
            devices: i.devices,
            system_paths: i.system_paths,
            userns: i.userns,
        }),
        ports: r
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    RawPort::Number(n) => n.to_string(),
                    RawPort::Text(t) => t,
                };
                (k, v)
            })
            .collect(),
        sockets: r
            .sockets
            .unwrap_or_default()
            .into_iter()
            .map(|s| pb::Socket {
                name: s.name.unwrap_or_default(),
                listen: s.listen.unwrap_or_default(),
            })
            .collect(),
        restart: r.restart.map(|x| pb::Restart {
            policy: x.policy,
            backoff: x.backoff,
            backoff_max: x.backoff_max,
        }),
        health: r.health.map(|h| pb::Health {
            http: h.http,
            tcp: h.tcp,
            grpc: h.grpc,
            exec: h.exec.unwrap_or_default(),
            interval: h.interval,
            timeout: h.timeout,
            start_period: h.start_period,
            failure_threshold: u32_of(h.failure_threshold),
            success_threshold: u32_of(h.success_threshold),
            restart_on_failure: h.restart_on_failure,
            notify: h.notify,
        }),
        rollout: r.rollout.map(|x| pb::Rollout {
            max_surge: u32_of(x.max_surge),
            max_unavailable: u32_of(x.max_unavailable),
            min_healthy: x.min_healthy,
            healthy_deadline: x.healthy_deadline,
            auto_rollback: x.auto_rollback,
        }),
        stop: r.stop.map(|s| pb::Stop {
            signal: s.signal,
            grace: s.grace,
        }),
        logs: r.logs.map(|l| pb::Logs {
            max_size: l.max_size.map(size_text),
            max_files: u32_of(l.max_files),
        }),
        artifact: r.artifact.map(|a| pb::Artifact {
            url: a.url,
            sha256: a.sha256,
            format: a.format,
            mount: a.mount,
        }),
        image: r.image.map(|i| pb::Image {
            url: i.url,
            digest: i.digest,
            persist: i.persist,
        }),
    }
}

/// An entry of the artifact store.
pub fn artifact_to_proto(e: &ListEntry) -> pb::ArtifactEntry {
    pb::ArtifactEntry {
        kind: kind_name(e.kind).to_owned(),
        digest: e.digest.to_string(),
        size: e.size,
        owners: e.owners.iter().cloned().collect(),
        users: u32::try_from(e.leases).unwrap_or(u32::MAX),
        last_used: Some(ts(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(e.last_used)
        )),
    }
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Artifact => "artifact",
        EntryKind::Image => "image",
    }
}

/// What a collection removed.
pub fn gc_to_proto(r: &GcReport) -> pb::CollectArtifactsResponse {
    let names = |v: &[(EntryKind, spec::artifact::Digest)]| {
        v.iter()
            .map(|(k, d)| format!("{} {d}", kind_name(*k)))
            .collect()
    };
    pb::CollectArtifactsResponse {
        removed: names(&r.unreferenced),
        evicted: names(&r.evicted),
        freed_bytes: r.freed,
    }
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn exit_to_proto(e: &ExitInfo) -> pb::ExitInfo {
    let class = match e.class {
        ExitClass::Exited(_) => pb::ExitClass::Exited,
        ExitClass::Signaled(_) => pb::ExitClass::Signaled,
        ExitClass::OomKilled => pb::ExitClass::OomKilled,
        ExitClass::StopTimeout => pb::ExitClass::StopTimeout,
        ExitClass::HealthFailed => pb::ExitClass::HealthFailed,
        ExitClass::Lost => pb::ExitClass::Lost,
    };
    let (code, signal) = e.class.code_and_signal();
    pb::ExitInfo {
        class: class as i32,
        code: code.unwrap_or(0),
        signal: signal.unwrap_or(0),
        at: Some(ts(e.at)),
        text: e.class.to_string(),
        detail: e.setup_error.clone().unwrap_or_default(),
    }
}

fn instance_state(i: &InstanceStatus) -> pb::InstanceState {
    match i.state {
        Phase::Pending => pb::InstanceState::Starting,
        Phase::Running => pb::InstanceState::Running,
        // Being removed is still on the way out; a forgotten slot is not reported.
        Phase::Stopping | Phase::Removing | Phase::Gone => pb::InstanceState::Stopping,
        Phase::Backoff if i.start_failed => pb::InstanceState::Failed,
        Phase::Backoff => pb::InstanceState::Backoff,
        Phase::Exited => pb::InstanceState::Exited,
    }
}

fn health_to_proto(h: HealthState) -> pb::HealthState {
    match h {
        HealthState::Unknown => pb::HealthState::Unknown,
        HealthState::Healthy => pb::HealthState::Healthy,
        HealthState::Unhealthy => pb::HealthState::Unhealthy,
    }
}

fn service_health_to_proto(h: ServiceHealth) -> pb::ServiceHealth {
    match h {
        ServiceHealth::Healthy => pb::ServiceHealth::Healthy,
        ServiceHealth::Degraded => pb::ServiceHealth::Degraded,
        ServiceHealth::Unhealthy => pb::ServiceHealth::Unhealthy,
    }
}

pub fn apply_outcome_to_proto(k: ApplyKind) -> pb::ApplyOutcome {
    match k {
        ApplyKind::Created => pb::ApplyOutcome::Created,
        ApplyKind::Updated => pb::ApplyOutcome::Updated,
        ApplyKind::Scaled => pb::ApplyOutcome::Scaled,
        ApplyKind::Unchanged => pb::ApplyOutcome::Unchanged,
    }
}

fn rollout_kind_to_proto(k: RolloutKind) -> pb::RolloutKind {
    match k {
        RolloutKind::Update => pb::RolloutKind::Update,
        RolloutKind::Restart => pb::RolloutKind::Restart,
        RolloutKind::Rollback => pb::RolloutKind::Rollback,
        RolloutKind::AutoRollback => pb::RolloutKind::AutoRollback,
    }
}

fn rollout_state_to_proto(s: RolloutState) -> pb::RolloutState {
    match s {
        RolloutState::Running => pb::RolloutState::Running,
        RolloutState::Succeeded => pb::RolloutState::Succeeded,
        RolloutState::Failed => pb::RolloutState::Failed,
        RolloutState::Superseded => pb::RolloutState::Superseded,
        RolloutState::Cancelled => pb::RolloutState::Cancelled,
    }
}

fn event_type_to_proto(k: &EventKind) -> pb::EventType {
    match k {
        EventKind::Applied { .. } => pb::EventType::Applied,
        EventKind::Deleted => pb::EventType::Deleted,
        EventKind::Scaled { .. } => pb::EventType::Scaled,
        EventKind::InstanceStarted { .. } => pb::EventType::InstanceStarted,
        EventKind::StartFailed { .. } => pb::EventType::StartFailed,
        EventKind::InstanceExited { .. } => pb::EventType::InstanceExited,
        EventKind::RestartScheduled { .. } => pb::EventType::RestartScheduled,
        EventKind::Stopping { .. } => pb::EventType::Stopping,
        EventKind::Killed { .. } => pb::EventType::Killed,
        EventKind::HealthChanged { .. } => pb::EventType::HealthChanged,
        EventKind::Ready { .. } => pb::EventType::Ready,
        EventKind::OomKill { .. } => pb::EventType::OomKill,
        EventKind::Adopted { .. } => pb::EventType::Adopted,
        EventKind::Lost { .. } => pb::EventType::Lost,
        EventKind::RolloutStarted { .. } => pb::EventType::RolloutStarted,
        EventKind::RolloutStep { .. } => pb::EventType::RolloutStep,
        EventKind::RolloutFinished { .. } => pb::EventType::RolloutFinished,
        EventKind::Package { .. } => pb::EventType::Package,
    }
}

pub fn instance_to_proto(i: &InstanceStatus) -> pb::InstanceStatus {
    pb::InstanceStatus {
        id: i.id.clone(),
        index: i.index,
        revision: i.revision,
        state: instance_state(i) as i32,
        pid: i.pid.unwrap_or(0),
        init_pid: i.init_pid.unwrap_or(0),
        restarts: i.restarts,
        last_exit: i.last_exit.as_ref().map(exit_to_proto),
        usage: i.usage.map(|(u, rate)| pb::ResourceUsage {
            cpu_rate: rate.unwrap_or(0.0),
            cpu_usage_ns: u.cpu_usage_ns,
            memory_bytes: u.memory_bytes,
            memory_peak_bytes: u.memory_peak_bytes,
            oom_kills: u.oom_kills,
            pids: u.pids,
        }),
        started_at: i.started_at.map(ts),
        next_start_at: i.next_start_at.map(ts),
        last_error: i.last_error.clone().unwrap_or_default(),
        cgroup: i.cgroup.clone(),
        ports: i
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), u32::from(*v)))
            .collect(),
        log_lines_dropped: i.log_dropped.lines_dropped,
        log_bytes_dropped: i.log_dropped.bytes_dropped,
        health: health_to_proto(i.health) as i32,
        health_reason: i.health_reason.clone(),
        notify_status: i.notify_status.clone(),
    }
}

pub fn status_to_proto(s: &ServiceStatus) -> pb::ServiceStatus {
    pb::ServiceStatus {
        name: s.name.clone(),
        revision: s.revision,
        spec: Some(spec_to_proto(&s.spec)),
        desired: s.desired,
        running: s.running,
        healthy: s.healthy,
        instances: s.instances.iter().map(instance_to_proto).collect(),
        deleting: s.deleting,
        health: service_health_to_proto(s.health) as i32,
        rollout: s.rollout.as_ref().map(rollout_to_proto),
        revisions: s.revisions.clone(),
        paused: s.paused,
        package: s.package.as_ref().map(|p| pb::PackageStatus {
            revision: p.revision,
            url: p.url.clone(),
            phase: p.phase.as_str().to_owned(),
            done: p.done,
            total: p.total,
            error: p.error.clone(),
        }),
        owner: owner_to_proto(s.owner) as i32,
    }
}

pub fn owner_to_proto(o: Owner) -> pb::ServiceOwner {
    match o {
        Owner::Local => pb::ServiceOwner::Local,
        Owner::Etcd => pb::ServiceOwner::Etcd,
    }
}

pub fn fleet_to_proto(r: &FleetReport) -> pb::FleetLink {
    let (connected, since, reason) = match &r.link {
        Link::Connected { since } => (true, *since, String::new()),
        Link::Disconnected { since, reason } => (false, *since, reason.clone()),
    };
    pb::FleetLink {
        node: r.node.clone(),
        endpoints: r.endpoints.clone(),
        connected,
        since: Some(ts(since)),
        reason,
        revision: r.revision,
    }
}

pub fn rollout_to_proto(r: &crate::rollout::record::Rollout) -> pb::RolloutStatus {
    let p = &r.policy;
    pb::RolloutStatus {
        id: r.id.clone(),
        service: r.service.clone(),
        kind: rollout_kind_to_proto(r.kind) as i32,
        state: rollout_state_to_proto(r.state) as i32,
        from_revision: r.from_revision,
        to_revision: r.to_revision,
        replicas: r.replicas,
        to_replace: r.to_replace,
        replaced: r.replaced.min(r.to_replace),
        new_instances: r.progress.new,
        ready: r.progress.ready,
        old_instances: r.progress.old,
        available: r.progress.available,
        policy: Some(pb::Rollout {
            max_surge: Some(p.max_surge),
            max_unavailable: Some(p.max_unavailable),
            min_healthy: Some(spec::format_duration(p.min_healthy())),
            healthy_deadline: Some(spec::format_duration(p.healthy_deadline())),
            auto_rollback: Some(p.auto_rollback),
        }),
        started_at: Some(ts(r.started_at)),
        finished_at: r.finished_at.map(ts),
        reason: r.reason.clone(),
        rollback_id: r.rollback_id.clone(),
        rollback_of: r.rollback_of.clone(),
        steps: r
            .steps
            .iter()
            .map(|s| pb::RolloutStep {
                time: Some(ts(s.time)),
                step: s.step.to_string(),
                instance: s.instance.clone(),
                message: s.message.clone(),
            })
            .collect(),
    }
}

pub fn node_to_proto(
    h: &HostInfo,
    caps: &Capabilities,
    namespaces: &[Namespace],
    services: u32,
    instances: u32,
    fleet: Option<&FleetReport>,
) -> pb::NodeInfo {
    pb::NodeInfo {
        hostname: h.hostname.clone(),
        kernel: h.kernel.clone(),
        os: h.os.clone(),
        cgroup_version: caps.version.as_str().into(),
        cpus: h.cpus,
        memory_total_bytes: h.memory_total,
        memory_available_bytes: h.memory_available,
        load1: h.load[0],
        load5: h.load[1],
        load15: h.load[2],
        agent_version: env!("CARGO_PKG_VERSION").into(),
        agent_uptime_seconds: h.agent_uptime_secs,
        cgroup_parent: caps.parent.clone(),
        controllers: caps
            .available
            .iter()
            .map(|c| c.as_str().to_string())
            .collect(),
        unavailable: caps
            .unavailable
            .iter()
            .map(|(c, why)| format!("{}: {why}", c.as_str()))
            .collect(),
        namespaces: namespaces.iter().map(|n| n.as_str().to_string()).collect(),
        services,
        instances,
        fleet: fleet.map(fleet_to_proto),
    }
}

/// An event on the wire: its type, and its fields (as the event log holds them) under
/// `attributes`, numbers as numbers.
pub fn event_to_proto(e: &Event) -> pb::Event {
    let attributes = match serde_json::to_value(&e.kind) {
        Ok(serde_json::Value::Object(fields)) => fields
            .into_iter()
            .filter(|(name, _)| name != "type")
            .filter_map(|(name, value)| Some((name, attribute(value)?)))
            .collect(),
        _ => Default::default(),
    };
    pb::Event {
        index: e.index,
        time: Some(ts(e.time)),
        service: e.service.clone(),
        instance: e.instance.clone().unwrap_or_default(),
        r#type: event_type_to_proto(&e.kind) as i32,
        message: e.kind.summary(),
        attributes,
    }
}

/// One field of an event on the wire; `None` for a field without a value.
fn attribute(v: serde_json::Value) -> Option<pb::AttributeValue> {
    use pb::attribute_value::{Lines, Value};
    use serde_json::Value as Json;
    let text = |v: &Json| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let value = match v {
        Json::Null => return None,
        Json::String(s) => Value::Text(s),
        // Every number an event holds is an integer within i64 (counts, PIDs, revisions).
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Number(i),
            None => Value::Text(n.to_string()),
        },
        Json::Array(items) => Value::Lines(Lines {
            lines: items.iter().map(text).collect(),
        }),
        other => Value::Text(text(&other)),
    };
    Some(pb::AttributeValue { value: Some(value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "web"
command = ["/usr/bin/python3", "-m", "http.server"]
env = { LOG_LEVEL = "info" }
workdir = "/srv/web"
user = "nobody"
replicas = 3

[resources]
cpu = 0.5
memory = "256MiB"
pids = 256
nofile = 4096

[isolation]
namespaces = ["pid", "mount", "uts", "ipc"]
hostname = "web-{index}"
private_tmp = true
capabilities = ["net_bind_service"]
readonly_root = true

[ports]
admin = "auto"

[restart]
policy = "always"
backoff = "100ms"
backoff_max = "30s"

[stop]
signal = "SIGTERM"
grace = "10s"

[logs]
max_size = "10MiB"
max_files = 5
"#;

    fn attr(e: &pb::Event, name: &str) -> Option<pb::attribute_value::Value> {
        e.attributes.get(name).and_then(|v| v.value.clone())
    }

    /// Events on the wire: their type, their fields with numbers as numbers, states as the
    /// words status uses, lists as lines, and absent values left out.
    #[test]
    fn events_carry_their_type_and_typed_fields() {
        use pb::attribute_value::{Lines, Value};
        let event = |kind| Event {
            index: 4,
            time: SystemTime::UNIX_EPOCH,
            service: "web".into(),
            instance: Some("web-0".into()),
            kind,
        };
        let exited = event_to_proto(&event(EventKind::InstanceExited {
            end: ExitClass::Exited(3),
            code: Some(3),
            signal: None,
            detail: None,
        }));
        assert_eq!(exited.r#type(), pb::EventType::InstanceExited);
        assert_eq!(attr(&exited, "end"), Some(Value::Text("exited(3)".into())));
        assert_eq!(attr(&exited, "code"), Some(Value::Number(3)));
        assert_eq!(exited.attributes.len(), 2, "{:?}", exited.attributes);

        let applied = event_to_proto(&event(EventKind::Applied {
            revision: 2,
            outcome: ApplyKind::Updated,
            changes: vec!["command".into(), "env.PORT".into()],
        }));
        assert_eq!(applied.r#type(), pb::EventType::Applied);
        assert_eq!(attr(&applied, "revision"), Some(Value::Number(2)));
        assert_eq!(
            attr(&applied, "outcome"),
            Some(Value::Text("updated".into()))
        );
        let lines = vec!["command".to_string(), "env.PORT".to_string()];
        assert_eq!(
            attr(&applied, "changes"),
            Some(Value::Lines(Lines { lines }))
        );

        let stopping = event_to_proto(&event(EventKind::Stopping {
            reason: crate::supervisor::instance::StopReason::ScaleDown,
            signal: "SIGTERM".into(),
        }));
        assert_eq!(
            attr(&stopping, "reason"),
            Some(Value::Text("scale-down".into()))
        );
        assert_eq!(stopping.message, "stopping (scale-down): SIGTERM");
    }

    #[test]
    fn spec_survives_the_wire() {
        let spec = spec::parse_toml(FULL).expect("valid");
        let wire = spec_to_proto(&spec);
        let back = spec_from_proto(wire)
            .expect("converts")
            .validate()
            .expect("valid");
        assert_eq!(back, spec);
    }

    #[test]
    fn artifact_and_image_survive_the_wire() {
        let hex = "0f".repeat(32);
        for section in [
            format!(
                "[artifact]\nurl = \"https://repo.example/web.tar.zst\"\nsha256 = \"{hex}\"\nmount = \"/app\"\n"
            ),
            format!("[image]\nurl = \"/srv/web.oci\"\ndigest = \"sha256:{hex}\"\npersist = true\n"),
        ] {
            let toml = format!("name = \"w\"\ncommand = [\"/w\"]\n{section}");
            let spec = spec::parse_toml(&toml).expect("valid");
            assert!(spec.package.is_some(), "{toml}");
            let back = spec_from_proto(spec_to_proto(&spec))
                .expect("converts")
                .validate()
                .expect("valid");
            assert_eq!(back, spec, "{toml}");
        }
    }

    #[test]
    fn capabilities_absent_and_empty_stay_apart_on_the_wire() {
        // Absent is the default set (which depends on the user); empty is "none at all".
        for (text, expected) in [
            ("", None),
            ("capabilities = []", Some(Vec::new())),
            (
                "capabilities = [\"KILL\", \"cap_chown\"]",
                Some(vec![
                    spec::Capability::CAP_CHOWN,
                    spec::Capability::CAP_KILL,
                ]),
            ),
        ] {
            let toml = format!("name = \"w\"\ncommand = [\"/w\"]\n[isolation]\n{text}\n");
            let spec = spec::parse_toml(&toml).expect("valid");
            assert_eq!(spec.isolation.capabilities, expected, "{text}");
            let wire = spec_to_proto(&spec);
            let names = wire
                .isolation
                .as_ref()
                .and_then(|i| i.capabilities.as_ref())
                .map(|c| c.names.clone());
            assert_eq!(
                names,
                expected.map(|set| set.iter().map(ToString::to_string).collect::<Vec<_>>()),
                "canonical names on the wire"
            );
            let back = spec_from_proto(wire)
                .expect("converts")
                .validate()
                .expect("valid");
            assert_eq!(back, spec);
        }
    }

    #[test]
    fn wire_errors_name_the_field() {
        let mut wire = spec_to_proto(&spec::parse_toml(FULL).expect("valid"));
        if let Some(r) = wire.resources.as_mut() {
            r.memory = Some("12XB".into());
            r.pids = Some(u64::MAX);
        }
        let err = spec_from_proto(wire.clone()).expect_err("pids overflow");
        assert!(err.to_string().contains("resources.pids"), "{err}");
        if let Some(r) = wire.resources.as_mut() {
            r.pids = Some(10);
            r.nofile = Some(u64::MAX);
        }
        let err = spec_from_proto(wire.clone()).expect_err("nofile overflow");
        assert!(err.to_string().contains("resources.nofile"), "{err}");
        if let Some(r) = wire.resources.as_mut() {
            r.nofile = Some(0);
        }
        if let Some(i) = wire.isolation.as_mut() {
            i.capabilities = Some(pb::CapabilityList {
                names: vec!["CAP_KILL".into(), "CAP_FLY".into()],
            });
        }
        let err = spec_from_proto(wire.clone())
            .expect("converts")
            .validate()
            .expect_err("bad values");
        assert!(err.has_field("resources.nofile"), "{err}");
        assert!(
            err.to_string()
                .contains("isolation.capabilities[1]: \"CAP_FLY\" is not a capability"),
            "{err}"
        );
        if let Some(r) = wire.resources.as_mut() {
            r.nofile = None;
        }
        if let Some(i) = wire.isolation.as_mut() {
            i.capabilities = None;
        }
        let err = spec_from_proto(wire)
            .expect("converts")
            .validate()
            .expect_err("bad size");
        assert!(err.to_string().contains("resources.memory"), "{err}");
    }
}
