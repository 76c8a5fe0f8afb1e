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
use crate::spec::job::overrides::{RawOverrides, RunOverrides};
use crate::spec::job::{RawJob, RawSchedule};
use crate::spec::{
    self, FieldError, Namespace, RawHealth, RawIsolation, RawLogs, RawPort, RawResources,
    RawRestart, RawRollout, RawScale, RawSize, RawSocket, RawSpec, RawStop, ServiceSpec, SpecError,
};
use crate::supervisor::{
    ApplyKind, ExitClass, ExitInfo, InstanceStatus, Phase, Run, ServiceStatus,
};

fn int(field: &str, v: u64, errors: &mut Vec<FieldError>) -> i64 {
    i64::try_from(v).unwrap_or_else(|_| {
        errors.push(FieldError {
            field: field.into(),
            message: format!("{v} is out of range"),
        });
        0
    })
}

/// Milliseconds from the wire as the spec's own duration text, validated with the rest.
fn millis(ms: u64) -> String {
    format!("{ms}ms")
}

/// A duration on the wire: whole milliseconds (the spec's durations are checked to be
/// whole milliseconds or more; a finer part is cut).
fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
            memory: r
                .memory_bytes
                .map(|v| RawSize::Bytes(int("resources.memory", v, &mut errors))),
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
                    .map(|(k, v)| {
                        let raw = match v {
                            0 => RawPort::Text("auto".into()),
                            n => RawPort::Number(i64::from(n)),
                        };
                        (k, raw)
                    })
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
            backoff: r.backoff_ms.map(millis),
            backoff_max: r.backoff_max_ms.map(millis),
        }),
        health: p.health.map(|h| RawHealth {
            http: h.http,
            tcp: h.tcp,
            grpc: h.grpc,
            exec: none_if_empty(h.exec),
            interval: h.interval_ms.map(millis),
            timeout: h.timeout_ms.map(millis),
            start_period: h.start_period_ms.map(millis),
            failure_threshold: h.failure_threshold.map(i64::from),
            success_threshold: h.success_threshold.map(i64::from),
            restart_on_failure: h.restart_on_failure,
            notify: h.notify,
        }),
        rollout: p.rollout.map(|r| RawRollout {
            max_surge: r.max_surge.map(i64::from),
            max_unavailable: r.max_unavailable.map(i64::from),
            min_healthy: r.min_healthy_ms.map(millis),
            healthy_deadline: r.healthy_deadline_ms.map(millis),
            auto_rollback: r.auto_rollback,
            start_cpu: r.start_cpu,
        }),
        scale: p.scale.map(|s| RawScale {
            min: s.min.map(i64::from),
            max: s.max.map(i64::from),
            target_connections: s.target_connections.map(i64::from),
            target_cpu: s.target_cpu,
            idle_after: s.idle_after,
            scale_down_delay: s.scale_down_delay,
        }),
        stop: p.stop.map(|s| RawStop {
            signal: s.signal,
            grace: s.grace_ms.map(millis),
        }),
        labels: (!p.labels.is_empty()).then(|| p.labels.into_iter().collect()),
        annotations: (!p.annotations.is_empty()).then(|| p.annotations.into_iter().collect()),
        logs: p.logs.map(|l| RawLogs {
            max_size: l
                .max_size_bytes
                .map(|v| RawSize::Bytes(int("logs.max_size", v, &mut errors))),
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
        kind: p.kind,
        schedule: p.schedule.map(|s| RawSchedule {
            cron: s.cron,
            timezone: s.timezone,
            concurrency: s.concurrency,
            catch_up: s.catch_up,
            jitter: s.jitter,
        }),
        job: p.job.map(|j| RawJob {
            timeout: j.timeout,
            retries: j.retries.map(i64::from),
            parallelism: j.parallelism.map(i64::from),
            history: j.history.map(i64::from),
        }),
    };
    if errors.is_empty() {
        Ok(raw)
    } else {
        Err(SpecError { errors })
    }
}

/// What the host decides for a spec that leaves it open: the values status reports as the
/// spec's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostDefaults {
    /// The soft open-file limit an instance without `resources.nofile` starts with: the one
    /// the agent was started with (before it raised its own).
    pub nofile: u64,
    /// The agent runs as root (an instance without `user` runs as the agent's user).
    pub agent_is_root: bool,
}

impl HostDefaults {
    /// This agent process's: the soft open-file limit it was started with when it raised
    /// its own (what its services get back), else its soft limit now.
    pub fn of_this_process() -> HostDefaults {
        let nofile = crate::runtime::privileges::inherited_nofile_soft().unwrap_or_else(|| {
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        });
        HostDefaults {
            nofile,
            agent_is_root: nix::unistd::geteuid().is_root(),
        }
    }

    /// Whether instances of `spec` run as root (uid 0).
    fn runs_as_root(&self, spec: &ServiceSpec) -> bool {
        match &spec.user {
            None => self.agent_is_root,
            Some(spec::UserSpec::Id { uid, .. }) => *uid == 0,
            // A uid from the agent's dynamic range, never 0.
            Some(spec::UserSpec::Dynamic) => false,
            Some(spec::UserSpec::Name(name)) => nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .is_some_and(|u| u.uid.is_root()),
        }
    }

    /// The capabilities an instance of `spec` gets when it lists none.
    fn default_capabilities(&self, spec: &ServiceSpec) -> Vec<spec::Capability> {
        if self.runs_as_root(spec) {
            spec::DEFAULT_ROOT_CAPABILITIES.to_vec()
        } else {
            Vec::new()
        }
    }

    /// `spec` with what merely spells out a default made absent again: capabilities equal to
    /// the user's default set, `nofile` equal to the agent's. The instances get the same
    /// either way, and a spec read back from status applies as UNCHANGED.
    pub fn normalize(&self, mut spec: ServiceSpec) -> ServiceSpec {
        let default_caps = self.default_capabilities(&spec);
        if let Some(caps) = &spec.isolation.capabilities {
            let mut listed = caps.clone();
            let mut default = default_caps;
            listed.sort_by_key(|c| c.index());
            default.sort_by_key(|c| c.index());
            if listed == default {
                spec.isolation.capabilities = None;
            }
        }
        if spec.resources.nofile == Some(self.nofile) {
            spec.resources.nofile = None;
        }
        spec
    }
}

/// A count from a spec written back, on the wire (the validated spec's are in range).
fn u32_of(v: Option<i64>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

/// The validated spec on the wire, every default explicit: sizes in bytes, durations in
/// milliseconds, the hostname template, the capability set and the open-file limit the
/// instances get (from `host` when the spec leaves them open).
pub fn spec_to_proto(spec: &ServiceSpec, host: &HostDefaults) -> pb::ServiceSpec {
    let (artifact, image) = spec::artifact::Package::to_raw(spec.package.as_ref());
    // A job's and [scale]'s sections as written back (every default explicit).
    let written = spec.to_raw();
    let caps = spec
        .isolation
        .capabilities
        .clone()
        .unwrap_or_else(|| host.default_capabilities(spec));
    let h = spec.health.as_ref();
    pb::ServiceSpec {
        name: spec.name.clone(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        workdir: Some(spec.workdir.to_string_lossy().into_owned()),
        user: spec.user.as_ref().map(ToString::to_string),
        replicas: Some(spec.replicas),
        resources: Some(pb::Resources {
            cpu: spec.resources.cpu,
            memory_bytes: spec.resources.memory,
            pids: spec.resources.pids,
            nofile: Some(spec.resources.nofile.unwrap_or(host.nofile)),
        }),
        isolation: Some(pb::Isolation {
            namespaces: Some(pb::NamespaceList {
                names: spec
                    .isolation
                    .namespaces
                    .iter()
                    .map(|ns| ns.as_str().to_owned())
                    .collect(),
            }),
            hostname: spec.isolation.has(Namespace::Uts).then(|| {
                spec.isolation
                    .hostname
                    .clone()
                    .unwrap_or_else(|| spec::DEFAULT_HOSTNAME.to_string())
            }),
            private_tmp: Some(spec.isolation.private_tmp),
            capabilities: Some(pb::CapabilityList {
                names: caps.iter().map(ToString::to_string).collect(),
            }),
            readonly_root: Some(spec.isolation.readonly_root),
            seccomp: Some(spec.isolation.seccomp.as_str().to_owned()),
            devices: Some(spec.isolation.devices.as_str().to_owned()),
            system_paths: Some(spec.isolation.system_paths.as_str().to_owned()),
            userns: Some(spec.isolation.userns),
        }),
        ports: spec
            .ports
            .iter()
            .map(|(k, v)| {
                let port = match v {
                    spec::PortSpec::Auto => 0,
                    spec::PortSpec::Fixed(n) => u32::from(*n),
                };
                (k.clone(), port)
            })
            .collect(),
        sockets: spec
            .sockets
            .iter()
            .map(|s| pb::Socket {
                name: s.name.clone(),
                listen: s.listen.to_string(),
            })
            .collect(),
        restart: Some(pb::RestartPolicy {
            policy: Some(spec.restart.policy.as_str().to_owned()),
            backoff_ms: Some(ms(spec.restart.backoff)),
            backoff_max_ms: Some(ms(spec.restart.backoff_max)),
        }),
        health: h.map(|h| {
            let (mut http, mut tcp, mut grpc, mut exec) = (None, None, None, Vec::new());
            match &h.probe {
                None => {}
                Some(spec::Probe::Http(u)) => http = Some(u.clone()),
                Some(spec::Probe::Tcp(t)) => tcp = Some(t.clone()),
                Some(spec::Probe::Grpc(t)) => grpc = Some(t.clone()),
                Some(spec::Probe::Exec(argv)) => exec = argv.clone(),
            }
            pb::Health {
                http,
                tcp,
                grpc,
                exec,
                interval_ms: Some(ms(h.interval)),
                timeout_ms: Some(ms(h.timeout)),
                start_period_ms: Some(ms(h.start_period)),
                failure_threshold: Some(h.failure_threshold),
                success_threshold: Some(h.success_threshold),
                restart_on_failure: Some(h.restart_on_failure),
                notify: Some(h.notify),
            }
        }),
        rollout: Some(pb::RolloutPolicy {
            max_surge: Some(spec.rollout.max_surge),
            max_unavailable: Some(spec.rollout.max_unavailable),
            min_healthy_ms: Some(ms(spec.rollout.min_healthy)),
            healthy_deadline_ms: Some(ms(spec.rollout.healthy_deadline)),
            auto_rollback: Some(spec.rollout.auto_rollback),
            start_cpu: spec.rollout.start_cpu,
        }),
        stop: Some(pb::Stop {
            signal: Some(spec.stop.signal_name.clone()),
            grace_ms: Some(ms(spec.stop.grace)),
        }),
        logs: Some(pb::LogRotation {
            max_size_bytes: Some(spec.logs.max_size),
            max_files: Some(spec.logs.max_files),
        }),
        artifact: artifact.map(|a| pb::Artifact {
            url: a.url,
            sha256: a.sha256,
            format: a.format,
            mount: a.mount,
        }),
        image: image.map(|i| pb::Image {
            url: i.url,
            digest: i.digest,
            persist: i.persist,
        }),
        labels: spec.labels.clone().into_iter().collect(),
        annotations: spec.annotations.clone().into_iter().collect(),
        kind: written.kind,
        schedule: written.schedule.map(|s| pb::JobSchedule {
            cron: s.cron,
            timezone: s.timezone,
            concurrency: s.concurrency,
            catch_up: s.catch_up,
            jitter: s.jitter,
        }),
        job: written.job.map(|j| pb::JobLimits {
            timeout: j.timeout,
            retries: u32_of(j.retries),
            parallelism: u32_of(j.parallelism),
            history: u32_of(j.history),
        }),
        scale: written.scale.map(|s| pb::Scale {
            min: u32_of(s.min),
            max: u32_of(s.max),
            target_connections: u32_of(s.target_connections),
            target_cpu: s.target_cpu,
            idle_after: s.idle_after,
            scale_down_delay: s.scale_down_delay,
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
        stderr_tail: e.output.clone().unwrap_or_default(),
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
        ApplyKind::Labeled => pb::ApplyOutcome::Labeled,
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
        EventKind::Scaled { .. } | EventKind::Autoscaled { .. } => pb::EventType::Scaled,
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
        EventKind::RecordQuarantined { .. } => pb::EventType::RecordQuarantined,
        EventKind::RecordUnsaved { .. } => pb::EventType::RecordUnsaved,
        EventKind::Lost { .. } => pb::EventType::Lost,
        EventKind::RolloutStarted { .. } => pb::EventType::RolloutStarted,
        EventKind::RolloutStep { .. } => pb::EventType::RolloutStep,
        EventKind::RolloutFinished { .. } => pb::EventType::RolloutFinished,
        EventKind::Package { .. } => pb::EventType::Package,
        EventKind::RunStarted { .. } => pb::EventType::RunStarted,
        EventKind::RunFinished { .. } => pb::EventType::RunFinished,
        EventKind::RunSkipped { .. } => pb::EventType::RunSkipped,
    }
}

/// A Watch's progress note: every event up to `index` has been passed.
pub fn bookmark(index: u64) -> pb::Event {
    pb::Event {
        index,
        time: Some(ts(SystemTime::now())),
        r#type: pb::EventType::Bookmark as i32,
        ..Default::default()
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
            nr_throttled: u.cpu_throttled_periods,
            throttled_usec: u.cpu_throttled_ns / 1000,
            memory_pressure: u.memory_pressure.map(|p| pb::Pressure {
                some_avg10: p.some_avg10,
                some_avg60: p.some_avg60,
                some_total_usec: p.some_total_usec,
                full_avg10: p.full_avg10,
                full_avg60: p.full_avg60,
                full_total_usec: p.full_total_usec,
            }),
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
        incarnation: i.incarnation,
    }
}

pub fn status_to_proto(s: &ServiceStatus, host: &HostDefaults) -> pb::ServiceStatus {
    pb::ServiceStatus {
        name: s.name.clone(),
        revision: s.revision,
        generation: s.generation,
        event_index: s.event_index,
        spec: Some(spec_to_proto(&s.spec, host)),
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
        next_run_at: s.next_run.map(ts),
        next_run_local: s
            .next_run
            .zip(s.spec.job.as_ref().and_then(|j| j.schedule.as_ref()))
            .and_then(|(at, schedule)| crate::schedule::local_time(schedule, at))
            .unwrap_or_default(),
        autoscale: s.autoscale.as_ref().map(|a| pb::AutoscaleStatus {
            recommended: a.recommended,
            reason: a.reason.clone(),
            connections: a.connections,
            queued: a.queued,
            cpu: a.cpu,
            waiting: a.waiting,
        }),
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
        policy: Some(pb::RolloutPolicy {
            max_surge: Some(p.max_surge),
            max_unavailable: Some(p.max_unavailable),
            min_healthy_ms: Some(ms(p.min_healthy())),
            healthy_deadline_ms: Some(ms(p.healthy_deadline())),
            auto_rollback: Some(p.auto_rollback),
            start_cpu: p.start_cpu,
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

/// What `Node` reports beside the host snapshot.
#[derive(Debug, Clone)]
pub struct NodeFacts<'a> {
    pub caps: &'a Capabilities,
    pub namespaces: &'a [Namespace],
    pub summary: crate::supervisor::Summary,
    pub node_id: &'a str,
    pub boot_id: &'a str,
    /// The link to the fleet's etcd, with `--etcd`.
    pub fleet: Option<FleetReport>,
}

fn capacity_to_proto(a: crate::supervisor::capacity::Amounts) -> pb::Capacity {
    pb::Capacity {
        cpu: a.cpu,
        memory_bytes: a.memory,
    }
}

pub fn node_to_proto(h: &HostInfo, f: &NodeFacts<'_>) -> pb::NodeInfo {
    let (caps, namespaces) = (f.caps, f.namespaces);
    let (services, instances) = (f.summary.services, f.summary.instances);
    let policy = f.summary.capacity;
    pb::NodeInfo {
        node_id: f.node_id.to_string(),
        boot_id: f.boot_id.to_string(),
        capacity: policy.map(|p| capacity_to_proto(p.capacity)),
        allocatable: policy.map(|p| capacity_to_proto(p.allocatable())),
        committed: Some(capacity_to_proto(f.summary.committed)),
        overcommit_cpu: policy.map_or(1.0, |p| p.overcommit.cpu),
        overcommit_memory: policy.map_or(1.0, |p| p.overcommit.memory),
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
        fleet: f.fleet.as_ref().map(fleet_to_proto),
        quarantined: f.summary.quarantined.clone(),
        records_unsaved: f.summary.unsaved.count,
        records_unsaved_since: f.summary.unsaved.since.map(ts),
        records_unsaved_error: f.summary.unsaved.error.clone(),
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
        incarnation: e.incarnation,
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

/// A job's run on the wire.
pub fn run_to_proto(r: &Run) -> pb::JobRun {
    let id = r.id();
    pb::JobRun {
        job: r.job.clone(),
        number: r.number,
        trigger: r.trigger.as_str().to_owned(),
        revision: r.revision,
        due: r.due.map(ts),
        started_at: Some(ts(r.started_at)),
        ended_at: r.ended_at.map(ts),
        outcome: r.outcome.map(|o| o.to_string()).unwrap_or_default(),
        exit_code: r.outcome.map_or(0, |o| o.exit_code()),
        attempts: r.attempts(),
        instances: r
            .keys()
            .iter()
            .zip(&r.instances)
            .map(|(key, i)| pb::JobRunInstance {
                id: key.to_string(),
                index: i.index,
                attempts: i.attempts,
                end: i.end.map(|o| o.to_string()).unwrap_or_default(),
            })
            .collect(),
        stopping: r.stopping.map(|o| o.to_string()).unwrap_or_default(),
        overrides: (!r.overrides.is_empty()).then(|| overrides_to_proto(&r.overrides)),
        id,
    }
}

/// `RunJob`'s overrides, to be checked against the job's spec.
pub fn overrides_from_proto(o: pb::RunOverrides) -> RawOverrides {
    RawOverrides {
        command: o.command,
        args: o.args,
        env: o.env.into_iter().collect(),
        timeout: o.timeout,
        parallelism: o.parallelism,
    }
}

fn overrides_to_proto(o: &RunOverrides) -> pb::RunOverrides {
    pb::RunOverrides {
        command: o.command.clone(),
        args: o.args.clone(),
        env: o.env.clone().into_iter().collect(),
        timeout: o.timeout.map(spec::format_duration).unwrap_or_default(),
        parallelism: o.parallelism.unwrap_or(0),
    }
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
            incarnation: 0,
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

    const ROOT: HostDefaults = HostDefaults {
        nofile: 1024,
        agent_is_root: true,
    };
    const NOT_ROOT: HostDefaults = HostDefaults {
        nofile: 4096,
        agent_is_root: false,
    };

    #[test]
    fn spec_survives_the_wire() {
        let spec = spec::parse_toml(FULL).expect("valid");
        let wire = spec_to_proto(&spec, &ROOT);
        let back = spec_from_proto(wire)
            .expect("converts")
            .validate()
            .expect("valid");
        assert_eq!(ROOT.normalize(back), spec);
    }

    /// Status shows what the instances get: every default filled in, sizes in bytes,
    /// durations in milliseconds, the hostname template, the capability set and open-file
    /// limit the host decides; read back and normalized, it is the spec as applied.
    #[test]
    fn status_spec_has_every_default_filled_in() {
        let spec =
            spec::parse_toml("name = \"w\"\ncommand = [\"/w\"]\n[resources]\nmemory = \"64MiB\"\n")
                .expect("valid");
        for (host, caps) in [(ROOT, spec::DEFAULT_ROOT_CAPABILITIES.len()), (NOT_ROOT, 0)] {
            let wire = spec_to_proto(&spec, &host);
            let r = wire.resources.expect("resources");
            assert_eq!(r.memory_bytes, Some(64 << 20));
            assert_eq!(r.nofile, Some(host.nofile));
            let i = wire.isolation.clone().expect("isolation");
            assert_eq!(i.hostname.as_deref(), Some("{instance}"));
            assert_eq!(i.capabilities.map(|c| c.names.len()), Some(caps));
            assert_eq!(i.private_tmp, Some(true));
            let restart = wire.restart.clone().expect("restart");
            assert_eq!(
                (restart.backoff_ms, restart.backoff_max_ms),
                (Some(100), Some(30_000))
            );
            let stop = wire.stop.clone().expect("stop");
            assert_eq!(
                (stop.signal.as_deref(), stop.grace_ms),
                (Some("SIGTERM"), Some(10_000))
            );
            let logs = wire.logs.expect("logs");
            assert_eq!(logs.max_size_bytes, Some(10 << 20));
            let rollout = wire.rollout.expect("rollout");
            assert_eq!(
                (rollout.min_healthy_ms, rollout.healthy_deadline_ms),
                (Some(500), Some(60_000))
            );
            let back = spec_from_proto(wire).expect("converts").validate();
            assert_eq!(host.normalize(back.expect("valid")), spec);
        }
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
            let back = spec_from_proto(spec_to_proto(&spec, &ROOT))
                .expect("converts")
                .validate()
                .expect("valid");
            assert_eq!(ROOT.normalize(back), spec, "{toml}");
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
            let wire = spec_to_proto(&spec, &NOT_ROOT);
            let names = wire
                .isolation
                .as_ref()
                .and_then(|i| i.capabilities.as_ref())
                .map(|c| c.names.clone());
            // Absent is shown as what this (non-root) user gets: none.
            assert_eq!(
                names,
                Some(
                    expected
                        .clone()
                        .unwrap_or_default()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                ),
                "canonical names on the wire"
            );
            let back = spec_from_proto(wire)
                .expect("converts")
                .validate()
                .expect("valid");
            // An empty list for a non-root user is its default: the same spec.
            assert_eq!(NOT_ROOT.normalize(back), NOT_ROOT.normalize(spec.clone()));
        }
    }

    #[test]
    fn wire_errors_name_the_field() {
        let mut wire = spec_to_proto(&spec::parse_toml(FULL).expect("valid"), &ROOT);
        if let Some(r) = wire.resources.as_mut() {
            // Converts (it fits), but is below the smallest limit a spec takes.
            r.memory_bytes = Some(1);
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
