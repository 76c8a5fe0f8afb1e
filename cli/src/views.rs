//! What `-o json` prints: view structs built from the agent's protobuf replies.
//!
//! The field names are part of corral's interface to scripts and stay stable: snake_case,
//! enums as their lowercase names (`"running"`, `"oom_killed"`), timestamps as RFC 3339 strings
//! in UTC, sizes in bytes, durations as the spec's own strings (`"10s"`), absent values as
//! `null`. Maps are sorted by key so that the same state always prints the same document.
//! Values are the agent's own (an instance's `health` is what the agent reports, also for a
//! service without a health check); tables may show them differently.
//! Pure conversions: no I/O, nothing from tonic.

use std::collections::BTreeMap;

use corral_proto::v1 as pb;

use crate::render::{human_ms, run_id};
use serde::Serialize;

/// A service, as `status -o json` prints it and as each element of `ls -o json`.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub revision: u64,
    pub desired: u32,
    pub running: u32,
    pub healthy: u32,
    /// `healthy` (every desired instance healthy), `degraded` (some) or `unhealthy` (none).
    pub health: Option<String>,
    /// Where its desired state comes from: `local` (this node's API) or `etcd` (the fleet).
    pub source: Option<String>,
    pub deleting: bool,
    /// A rollout failed without rolling back: no more instances are replaced until the next
    /// apply, restart or rollback.
    pub paused: bool,
    /// The running rollout, else the last one; `null` when the service never had one.
    pub rollout: Option<RolloutStatusView>,
    /// The revisions kept for rollback, oldest first.
    pub revisions: Vec<u64>,
    pub spec: Option<SpecView>,
    pub instances: Vec<InstanceView>,
    /// Services with `[scale]`: the autoscaler's last look; `null` without `[scale]`.
    pub autoscale: Option<AutoscaleView>,
}

/// What the autoscaler saw at its last sample of a service and recommends.
#[derive(Debug, Serialize)]
pub struct AutoscaleView {
    pub recommended: u32,
    pub reason: String,
    pub connections: u32,
    pub queued: u32,
    /// Cores its instances used.
    pub cpu: f64,
    /// No instance: waiting for a first connection.
    pub waiting: bool,
}

impl From<&pb::ServiceStatus> for ServiceView {
    fn from(s: &pb::ServiceStatus) -> Self {
        ServiceView {
            name: s.name.clone(),
            revision: s.revision,
            desired: s.desired,
            running: s.running,
            healthy: s.healthy,
            health: non_empty(service_health_name(s.health)),
            source: non_empty(owner_name(s.owner)),
            deleting: s.deleting,
            paused: s.paused,
            rollout: s.rollout.as_ref().map(RolloutStatusView::from),
            revisions: s.revisions.clone(),
            spec: s.spec.as_ref().map(SpecView::from),
            instances: s.instances.iter().map(InstanceView::from).collect(),
            autoscale: s.autoscale.as_ref().map(|a| AutoscaleView {
                recommended: a.recommended,
                reason: a.reason.clone(),
                connections: a.connections,
                queued: a.queued,
                cpu: a.cpu,
                waiting: a.waiting,
            }),
        }
    }
}

/// A service spec as the agent holds it, every default filled in.
#[derive(Debug, Serialize)]
pub struct SpecView {
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub replicas: Option<u32>,
    pub resources: ResourcesView,
    pub isolation: IsolationView,
    pub ports: BTreeMap<String, String>,
    pub sockets: Vec<SocketView>,
    pub restart: RestartView,
    /// `null` when the service has no health check.
    pub health: Option<HealthView>,
    pub rollout: RolloutView,
    /// `null` without `[scale]`.
    pub scale: Option<ScaleSpecView>,
    pub stop: StopView,
    pub logs: LogsView,
    /// `null` when the service does not run from an archive.
    pub artifact: Option<ArtifactView>,
    /// `null` when the service does not run from an image.
    pub image: Option<ImageView>,
}

/// `[artifact]`: an archive mounted read-only inside the instances.
#[derive(Debug, Serialize)]
pub struct ArtifactView {
    pub url: Option<String>,
    pub sha256: Option<String>,
    pub format: Option<String>,
    pub mount: Option<String>,
}

/// `[image]`: an OCI image as the instances' root filesystem.
#[derive(Debug, Serialize)]
pub struct ImageView {
    pub url: Option<String>,
    pub digest: Option<String>,
    pub persist: Option<bool>,
}

impl From<&pb::ServiceSpec> for SpecView {
    fn from(s: &pb::ServiceSpec) -> Self {
        let resources = s.resources.unwrap_or_default();
        let isolation = s.isolation.clone().unwrap_or_default();
        let restart = s.restart.clone().unwrap_or_default();
        let stop = s.stop.clone().unwrap_or_default();
        let logs = s.logs.unwrap_or_default();
        SpecView {
            name: s.name.clone(),
            command: s.command.clone(),
            env: s.env.clone().into_iter().collect(),
            workdir: s.workdir.clone(),
            user: s.user.clone(),
            replicas: s.replicas,
            resources: ResourcesView {
                cpu: resources.cpu,
                memory_bytes: resources.memory_bytes,
                pids: resources.pids,
                nofile: resources.nofile,
            },
            isolation: IsolationView {
                namespaces: isolation.namespaces.map(|n| n.names),
                hostname: isolation.hostname,
                private_tmp: isolation.private_tmp,
                capabilities: isolation.capabilities.map(|c| c.names),
                readonly_root: isolation.readonly_root,
            },
            ports: s
                .ports
                .iter()
                .map(|(k, v)| {
                    let v = if *v == 0 {
                        "auto".to_string()
                    } else {
                        v.to_string()
                    };
                    (k.clone(), v)
                })
                .collect(),
            sockets: s
                .sockets
                .iter()
                .map(|k| SocketView {
                    name: k.name.clone(),
                    listen: k.listen.clone(),
                })
                .collect(),
            restart: RestartView {
                policy: restart.policy,
                backoff: restart.backoff_ms.map(human_ms),
                backoff_max: restart.backoff_max_ms.map(human_ms),
            },
            health: s.health.clone().map(|h| HealthView {
                http: h.http,
                tcp: h.tcp,
                grpc: h.grpc,
                exec: h.exec,
                interval: h.interval_ms.map(human_ms),
                timeout: h.timeout_ms.map(human_ms),
                start_period: h.start_period_ms.map(human_ms),
                failure_threshold: h.failure_threshold,
                success_threshold: h.success_threshold,
                restart_on_failure: h.restart_on_failure,
                notify: h.notify,
            }),
            rollout: RolloutView::from(&s.rollout.unwrap_or_default()),
            scale: s.scale.as_ref().map(|x| ScaleSpecView {
                min: x.min,
                max: x.max,
                target_connections: x.target_connections,
                target_cpu: x.target_cpu,
                idle_after: x.idle_after.clone(),
                scale_down_delay: x.scale_down_delay.clone(),
            }),
            stop: StopView {
                signal: stop.signal,
                grace: stop.grace_ms.map(human_ms),
            },
            logs: LogsView {
                max_size_bytes: logs.max_size_bytes,
                max_files: logs.max_files,
            },
            artifact: s.artifact.clone().map(|a| ArtifactView {
                url: a.url,
                sha256: a.sha256,
                format: a.format,
                mount: a.mount,
            }),
            image: s.image.clone().map(|i| ImageView {
                url: i.url,
                digest: i.digest,
                persist: i.persist,
            }),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ResourcesView {
    /// Cores, fractional; `null` is unlimited.
    pub cpu: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// `RLIMIT_NOFILE`; `null`: the agent's own.
    pub nofile: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct IsolationView {
    /// `null`: the default set.
    pub namespaces: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub private_tmp: Option<bool>,
    /// `null`: the default (none for a non-root user, Docker's default set for root).
    pub capabilities: Option<Vec<String>>,
    pub readonly_root: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct SocketView {
    pub name: String,
    pub listen: String,
}

#[derive(Debug, Serialize)]
pub struct RestartView {
    pub policy: Option<String>,
    pub backoff: Option<String>,
    pub backoff_max: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HealthView {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub grpc: Option<String>,
    pub exec: Vec<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub start_period: Option<String>,
    pub failure_threshold: Option<u32>,
    pub success_threshold: Option<u32>,
    pub restart_on_failure: Option<bool>,
    pub notify: Option<bool>,
}

/// The spec's `[scale]`.
#[derive(Debug, Serialize)]
pub struct ScaleSpecView {
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub target_connections: Option<u32>,
    pub target_cpu: Option<f64>,
    pub idle_after: Option<String>,
    pub scale_down_delay: Option<String>,
}

/// A rollout policy: the spec's `[rollout]`, or the one a rollout runs with.
#[derive(Debug, Serialize)]
pub struct RolloutView {
    pub max_surge: Option<u32>,
    pub max_unavailable: Option<u32>,
    pub min_healthy: Option<String>,
    pub healthy_deadline: Option<String>,
    pub auto_rollback: Option<bool>,
    /// Cores a new instance of a rollout may use until it is first ready; none: no cap.
    pub start_cpu: Option<f64>,
}

impl From<&pb::RolloutPolicy> for RolloutView {
    fn from(r: &pb::RolloutPolicy) -> Self {
        RolloutView {
            max_surge: r.max_surge,
            max_unavailable: r.max_unavailable,
            min_healthy: r.min_healthy_ms.map(human_ms),
            healthy_deadline: r.healthy_deadline_ms.map(human_ms),
            auto_rollback: r.auto_rollback,
            start_cpu: r.start_cpu,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StopView {
    pub signal: Option<String>,
    pub grace: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LogsView {
    pub max_size_bytes: Option<u64>,
    pub max_files: Option<u32>,
}

/// One instance of a service.
#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub index: u32,
    pub revision: u64,
    /// The current (or last) run's id, 16 hex digits; `null` before the first start.
    pub incarnation: Option<String>,
    /// `running`, `stopping`, `backoff`, `exited`, `failed` (or `unknown`).
    pub state: &'static str,
    /// `healthy`, `unhealthy` or `unknown`, as the agent reports it.
    pub health: Option<String>,
    /// Why, from the last probe (`HTTP 503`).
    pub health_reason: Option<String>,
    /// Host PID of the service's main process; `null` when not running.
    pub pid: Option<i32>,
    /// Host PID of the instance's init; `null` when not running.
    pub init_pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<ExitView>,
    pub usage: Option<UsageView>,
    pub started_at: Option<String>,
    /// When the next start is due (`backoff` and `failed`).
    pub next_start_at: Option<String>,
    pub last_error: Option<String>,
    pub cgroup: String,
    pub ports: BTreeMap<String, u32>,
    /// Output of this run that could not be written to the logs.
    pub log_lines_dropped: u64,
    pub log_bytes_dropped: u64,
}

impl From<&pb::InstanceStatus> for InstanceView {
    fn from(i: &pb::InstanceStatus) -> Self {
        InstanceView {
            id: i.id.clone(),
            index: i.index,
            revision: i.revision,
            incarnation: run_id(i.incarnation),
            state: state_name(i.state),
            health: non_empty(health_name(i.health)),
            health_reason: non_empty(&i.health_reason),
            pid: nonzero(i.pid),
            init_pid: nonzero(i.init_pid),
            restarts: i.restarts,
            last_exit: i.last_exit.as_ref().map(ExitView::from),
            usage: i.usage.as_ref().map(|u| UsageView {
                cpu_usage_ns: u.cpu_usage_ns,
                memory_bytes: u.memory_bytes,
                memory_peak_bytes: u.memory_peak_bytes,
                oom_kills: u.oom_kills,
                pids: u.pids,
                nr_throttled: u.nr_throttled,
                throttled_usec: u.throttled_usec,
                memory_pressure_some_avg10: u.memory_pressure.map(|p| p.some_avg10),
            }),
            started_at: i.started_at.as_ref().and_then(rfc3339),
            next_start_at: i.next_start_at.as_ref().and_then(rfc3339),
            last_error: (!i.last_error.is_empty()).then(|| i.last_error.clone()),
            cgroup: i.cgroup.clone(),
            ports: i.ports.clone().into_iter().collect(),
            log_lines_dropped: i.log_lines_dropped,
            log_bytes_dropped: i.log_bytes_dropped,
        }
    }
}

/// Why an instance last ended.
#[derive(Debug, Serialize)]
pub struct ExitView {
    /// `exited`, `signaled`, `oom_killed`, `stop_timeout`, `health_failed`, `lost` (or `unknown`).
    pub class: &'static str,
    /// The exit code, for `exited`.
    pub code: Option<i32>,
    /// The signal that ended the process, when one did.
    pub signal: Option<i32>,
    pub at: Option<String>,
    /// As the agent words it, e.g. `exited(3)`.
    pub text: String,
    /// More about the end, when the agent knows more (a failed start, a lost instance).
    pub detail: Option<String>,
}

impl From<&pb::ExitInfo> for ExitView {
    fn from(e: &pb::ExitInfo) -> Self {
        let class = exit_class_name(e.class);
        ExitView {
            class,
            code: (class == "exited").then_some(e.code),
            signal: nonzero(e.signal),
            at: e.at.as_ref().and_then(rfc3339),
            text: e.text.clone(),
            detail: (!e.detail.is_empty()).then(|| e.detail.clone()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UsageView {
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub oom_kills: u64,
    pub pids: u64,
    /// CFS periods held at the CPU limit, and for how long in all.
    pub nr_throttled: u64,
    pub throttled_usec: u64,
    /// Percent of the last 10 s some task waited for memory; `null` where the kernel has no
    /// per-cgroup pressure (cgroup v1).
    pub memory_pressure_some_avg10: Option<f64>,
}

/// What `node -o json` prints.
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub hostname: String,
    pub kernel: String,
    pub os: String,
    pub cgroup_version: String,
    pub cgroup_parent: String,
    pub controllers: Vec<String>,
    pub unavailable: Vec<String>,
    pub namespaces: Vec<String>,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub agent_version: String,
    pub agent_uptime_seconds: u64,
    pub services: u32,
    pub instances: u32,
    pub node_id: String,
    pub boot_id: String,
    /// `{"cpu": cores, "memory_bytes": n}`; `null` when the agent does not say.
    pub capacity: Option<CapacityView>,
    pub allocatable: Option<CapacityView>,
    pub committed: Option<CapacityView>,
    pub overcommit_cpu: f64,
    pub overcommit_memory: f64,
    /// With --etcd: the node's link to the fleet.
    pub fleet: Option<FleetLinkView>,
    /// Services whose saved record was unreadable at start, until an apply repairs them.
    pub quarantined: Vec<String>,
    /// Instance records the agent could not save yet (it saves them again until it can).
    pub records_unsaved: u32,
    /// Since when the oldest of them has been unsaved (RFC 3339); `null` when none.
    pub records_unsaved_since: Option<String>,
    /// The last failed save's error; empty when none.
    pub records_unsaved_error: String,
}

#[derive(Debug, Serialize)]
pub struct FleetLinkView {
    pub node: String,
    pub endpoints: Vec<String>,
    pub connected: bool,
    /// Since when connected or disconnected (RFC 3339).
    pub since: Option<String>,
    /// Why disconnected.
    pub reason: Option<String>,
    /// The etcd revision up to which the node's keys were handled.
    pub revision: i64,
}

impl From<&pb::FleetLink> for FleetLinkView {
    fn from(f: &pb::FleetLink) -> Self {
        FleetLinkView {
            node: f.node.clone(),
            endpoints: f.endpoints.clone(),
            connected: f.connected,
            since: f.since.as_ref().and_then(crate::render::time_millis),
            reason: non_empty(&f.reason),
            revision: f.revision,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CapacityView {
    pub cpu: f64,
    pub memory_bytes: u64,
}

impl From<&pb::Capacity> for CapacityView {
    fn from(c: &pb::Capacity) -> Self {
        CapacityView {
            cpu: c.cpu,
            memory_bytes: c.memory_bytes,
        }
    }
}

impl From<&pb::NodeInfo> for NodeView {
    fn from(n: &pb::NodeInfo) -> Self {
        NodeView {
            hostname: n.hostname.clone(),
            kernel: n.kernel.clone(),
            os: n.os.clone(),
            cgroup_version: n.cgroup_version.clone(),
            cgroup_parent: n.cgroup_parent.clone(),
            controllers: n.controllers.clone(),
            unavailable: n.unavailable.clone(),
            namespaces: n.namespaces.clone(),
            cpus: n.cpus,
            memory_total_bytes: n.memory_total_bytes,
            memory_available_bytes: n.memory_available_bytes,
            load1: n.load1,
            load5: n.load5,
            load15: n.load15,
            agent_version: n.agent_version.clone(),
            agent_uptime_seconds: n.agent_uptime_seconds,
            services: n.services,
            instances: n.instances,
            fleet: n.fleet.as_ref().map(FleetLinkView::from),
            node_id: n.node_id.clone(),
            boot_id: n.boot_id.clone(),
            capacity: n.capacity.as_ref().map(CapacityView::from),
            allocatable: n.allocatable.as_ref().map(CapacityView::from),
            committed: n.committed.as_ref().map(CapacityView::from),
            overcommit_cpu: n.overcommit_cpu,
            overcommit_memory: n.overcommit_memory,
            quarantined: n.quarantined.clone(),
            records_unsaved: n.records_unsaved,
            records_unsaved_since: n.records_unsaved_since.as_ref().and_then(rfc3339),
            records_unsaved_error: n.records_unsaved_error.clone(),
        }
    }
}

/// One log record, as each line of `logs -o json`.
#[derive(Debug, Serialize)]
pub struct LogLineView {
    pub instance: String,
    /// The run that wrote it, 16 hex digits; `null` for lines of older files.
    pub incarnation: Option<String>,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// When the line was read; `null` for records without a time.
    pub time: Option<String>,
    pub text: String,
}

impl From<&pb::LogLine> for LogLineView {
    fn from(l: &pb::LogLine) -> Self {
        LogLineView {
            instance: l.instance.clone(),
            incarnation: run_id(l.incarnation),
            stream: l.stream.clone(),
            time: l.time.as_ref().and_then(rfc3339),
            text: l.text.clone(),
        }
    }
}

/// One event, as each line of `events -o json`.
#[derive(Debug, Serialize)]
pub struct EventView {
    pub index: u64,
    pub time: Option<String>,
    pub service: Option<String>,
    /// `null` for events about the service as a whole.
    pub instance: Option<String>,
    /// The run of the instance it is about, 16 hex digits; `null` when none.
    pub incarnation: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub attributes: BTreeMap<String, String>,
}

impl From<&pb::Event> for EventView {
    fn from(e: &pb::Event) -> Self {
        EventView {
            index: e.index,
            time: e.time.as_ref().and_then(rfc3339),
            service: non_empty(&e.service),
            instance: non_empty(&e.instance),
            incarnation: run_id(e.incarnation),
            kind: event_type_name(e.r#type).to_owned(),
            message: e.message.clone(),
            attributes: e
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), attribute_text(v)))
                .collect(),
        }
    }
}

/// One frame of `top -o json`.
#[derive(Debug, Serialize)]
pub struct TopView {
    /// When the frame's status was read.
    pub time: Option<String>,
    pub node: NodeView,
    pub instances: Vec<TopRowView>,
}

/// One instance in a frame of `top`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopRowView {
    pub service: String,
    pub instance: String,
    pub index: u32,
    pub state: &'static str,
    /// As the agent reports it.
    pub health: Option<String>,
    /// Whether the service has a health check (`[health]`).
    pub health_checked: bool,
    pub pid: Option<i32>,
    /// CPU time used since the previous frame over the time between them, in percent of one
    /// core; `null` in the first frame and across a restart.
    pub cpu_percent: Option<f64>,
    pub cpu_usage_ns: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub restarts: u32,
    /// As the agent words it, e.g. `exited(3)`.
    pub last_exit: Option<String>,
}

/// A rollout, as `rollout -o json` and `restart --wait -o json` print it, and as a service's
/// `rollout` in `status -o json`.
#[derive(Debug, Serialize)]
pub struct RolloutStatusView {
    pub id: String,
    pub service: String,
    /// `update`, `restart`, `rollback` or `auto_rollback`.
    pub kind: String,
    /// `running`, `succeeded`, `failed` or `superseded`.
    pub state: String,
    pub from_revision: u64,
    pub to_revision: u64,
    /// The instances it ends with.
    pub replicas: u32,
    /// Old instances at its start, and how many of them have been stopped so far.
    pub to_replace: u32,
    pub replaced: u32,
    /// New instances present, and those of them that are ready.
    pub new_instances: u32,
    pub ready: u32,
    /// Old instances still present.
    pub old_instances: u32,
    /// Instances serving now.
    pub available: u32,
    pub policy: Option<RolloutView>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why it failed or was superseded.
    pub reason: Option<String>,
    /// The rollback started when it failed.
    pub rollback_id: Option<String>,
    /// For an automatic rollback: the rollout whose failure started it.
    pub rollback_of: Option<String>,
    /// The status of `rollback_id`, when the command read it (`rollout`, `--wait`).
    pub rollback: Option<Box<RolloutStatusView>>,
    pub steps: Vec<RolloutStepView>,
}

impl RolloutStatusView {
    /// The view of `r`, with its rollback's status when known.
    pub fn with_rollback(r: &pb::RolloutStatus, rollback: Option<&pb::RolloutStatus>) -> Self {
        RolloutStatusView {
            rollback: rollback.map(|b| Box::new(RolloutStatusView::from(b))),
            ..RolloutStatusView::from(r)
        }
    }
}

impl From<&pb::RolloutStatus> for RolloutStatusView {
    fn from(r: &pb::RolloutStatus) -> Self {
        RolloutStatusView {
            id: r.id.clone(),
            service: r.service.clone(),
            kind: rollout_kind_name(r.kind).to_owned(),
            state: rollout_state_name(r.state).to_owned(),
            from_revision: r.from_revision,
            to_revision: r.to_revision,
            replicas: r.replicas,
            to_replace: r.to_replace,
            replaced: r.replaced,
            new_instances: r.new_instances,
            ready: r.ready,
            old_instances: r.old_instances,
            available: r.available,
            policy: r.policy.as_ref().map(RolloutView::from),
            started_at: r.started_at.as_ref().and_then(rfc3339),
            finished_at: r.finished_at.as_ref().and_then(rfc3339),
            reason: non_empty(&r.reason),
            rollback_id: non_empty(&r.rollback_id),
            rollback_of: non_empty(&r.rollback_of),
            rollback: None,
            steps: r.steps.iter().map(RolloutStepView::from).collect(),
        }
    }
}

/// One step of a rollout.
#[derive(Debug, Serialize)]
pub struct RolloutStepView {
    pub time: Option<String>,
    /// `started`, `ready`, `stopping`, `stopped`, `failed`, `rollback`, `superseded`,
    /// `succeeded`.
    pub step: String,
    /// The instance it is about; `null` for the rollout as a whole.
    pub instance: Option<String>,
    pub message: String,
}

impl From<&pb::RolloutStep> for RolloutStepView {
    fn from(s: &pb::RolloutStep) -> Self {
        RolloutStepView {
            time: s.time.as_ref().and_then(rfc3339),
            step: s.step.clone(),
            instance: non_empty(&s.instance),
            message: s.message.clone(),
        }
    }
}

/// What `restart -o json` and `rollback -o json` print without --wait.
#[derive(Debug, Serialize)]
pub struct RolloutStartedView {
    pub name: String,
    /// The revision the service now targets.
    pub revision: u64,
    /// `null` when no rollout was started.
    pub rollout_id: Option<String>,
}

impl From<&pb::RolloutResponse> for RolloutStartedView {
    fn from(r: &pb::RolloutResponse) -> Self {
        RolloutStartedView {
            name: r.name.clone(),
            revision: r.revision,
            rollout_id: non_empty(&r.rollout_id),
        }
    }
}

/// What `signal -o json` prints.
#[derive(Debug, Serialize)]
pub struct SignalView {
    pub instance: String,
    /// The canonical name of the signal sent, e.g. `SIGHUP`.
    pub signal: String,
    /// Host PID of the process that received it.
    pub pid: i32,
}

impl From<&pb::SignalResponse> for SignalView {
    fn from(r: &pb::SignalResponse) -> Self {
        SignalView {
            instance: r.instance.clone(),
            signal: r.signal.clone(),
            pid: r.pid,
        }
    }
}

/// The result of applying one spec file; `apply -o json` prints an array of these.
#[derive(Debug, Serialize)]
pub struct ApplyView {
    /// The file as given on the command line (`-` for standard input).
    pub file: String,
    pub dry_run: bool,
    /// `null` when the apply failed; then `error` says why.
    pub name: Option<String>,
    pub revision: Option<u64>,
    /// `created`, `updated`, `scaled` or `unchanged`.
    pub outcome: Option<String>,
    pub changes: Vec<String>,
    pub replaces_instances: bool,
    /// The rollout that replaces the instances; `null` when none was started.
    pub rollout_id: Option<String>,
    /// With --wait: the rollout's status when the wait ended.
    pub rollout: Option<RolloutStatusView>,
    /// Why the apply failed (then `name` is `null`), or why --wait did not succeed.
    pub error: Option<String>,
}

impl ApplyView {
    pub fn applied(file: String, dry_run: bool, r: &pb::ApplyResponse) -> Self {
        ApplyView {
            file,
            dry_run,
            name: Some(r.name.clone()),
            revision: Some(r.revision),
            outcome: Some(apply_outcome_name(r.outcome).to_owned()),
            changes: r.changes.clone(),
            replaces_instances: r.replaces_instances,
            rollout_id: non_empty(&r.rollout_id),
            rollout: None,
            error: None,
        }
    }

    pub fn failed(file: String, dry_run: bool, error: String) -> Self {
        ApplyView {
            file,
            dry_run,
            name: None,
            revision: None,
            outcome: None,
            changes: Vec::new(),
            replaces_instances: false,
            rollout_id: None,
            rollout: None,
            error: Some(error),
        }
    }
}

/// What `scale -o json` prints.
#[derive(Debug, Serialize)]
pub struct ScaleView {
    pub name: String,
    pub previous: u32,
    pub replicas: u32,
}

impl From<&pb::ScaleResponse> for ScaleView {
    fn from(r: &pb::ScaleResponse) -> Self {
        ScaleView {
            name: r.name.clone(),
            previous: r.previous,
            replicas: r.replicas,
        }
    }
}

/// What `delete -o json` prints.
#[derive(Debug, Serialize)]
pub struct DeleteView {
    pub name: String,
    pub stopped_instances: u32,
}

impl From<&pb::DeleteResponse> for DeleteView {
    fn from(r: &pb::DeleteResponse) -> Self {
        DeleteView {
            name: r.name.clone(),
            stopped_instances: r.stopped_instances,
        }
    }
}

/// The lowercase name of an instance state; `unknown` for values this client does not know.
pub fn state_name(state: i32) -> &'static str {
    match pb::InstanceState::try_from(state) {
        Ok(pb::InstanceState::Running) => "running",
        Ok(pb::InstanceState::Stopping) => "stopping",
        Ok(pb::InstanceState::Backoff) => "backoff",
        Ok(pb::InstanceState::Exited) => "exited",
        Ok(pb::InstanceState::Failed) => "failed",
        Ok(pb::InstanceState::Starting) => "starting",
        Ok(pb::InstanceState::Unspecified) | Err(_) => "unknown",
    }
}

/// The lowercase name of an exit class; `unknown` for values this client does not know.
pub fn exit_class_name(class: i32) -> &'static str {
    match pb::ExitClass::try_from(class) {
        Ok(pb::ExitClass::Exited) => "exited",
        Ok(pb::ExitClass::Signaled) => "signaled",
        Ok(pb::ExitClass::OomKilled) => "oom_killed",
        Ok(pb::ExitClass::StopTimeout) => "stop_timeout",
        Ok(pb::ExitClass::HealthFailed) => "health_failed",
        Ok(pb::ExitClass::Lost) => "lost",
        Ok(pb::ExitClass::Unspecified) | Err(_) => "unknown",
    }
}

/// An instance's health as the agent words it; empty when the agent did not say (or said
/// something this client does not know).
pub fn health_name(health: i32) -> &'static str {
    match pb::HealthState::try_from(health) {
        Ok(pb::HealthState::Unknown) => "unknown",
        Ok(pb::HealthState::Healthy) => "healthy",
        Ok(pb::HealthState::Unhealthy) => "unhealthy",
        Ok(pb::HealthState::Unspecified) | Err(_) => "",
    }
}

/// A service's health as the agent words it; empty when not said.
/// Where a service's desired state comes from: `local` or `etcd`; empty when not said.
pub fn owner_name(owner: i32) -> &'static str {
    match pb::ServiceOwner::try_from(owner) {
        Ok(pb::ServiceOwner::Local) => "local",
        Ok(pb::ServiceOwner::Etcd) => "etcd",
        Ok(pb::ServiceOwner::Unspecified) | Err(_) => "",
    }
}

pub fn service_health_name(health: i32) -> &'static str {
    match pb::ServiceHealth::try_from(health) {
        Ok(pb::ServiceHealth::Healthy) => "healthy",
        Ok(pb::ServiceHealth::Degraded) => "degraded",
        Ok(pb::ServiceHealth::Unhealthy) => "unhealthy",
        Ok(pb::ServiceHealth::Unspecified) | Err(_) => "",
    }
}

/// A rollout's kind as the agent words it; empty when not said.
pub fn rollout_kind_name(kind: i32) -> &'static str {
    match pb::RolloutKind::try_from(kind) {
        Ok(pb::RolloutKind::Update) => "update",
        Ok(pb::RolloutKind::Restart) => "restart",
        Ok(pb::RolloutKind::Rollback) => "rollback",
        Ok(pb::RolloutKind::AutoRollback) => "auto_rollback",
        Ok(pb::RolloutKind::Unspecified) | Err(_) => "",
    }
}

/// A rollout's state as the agent words it; empty when not said.
pub fn rollout_state_name(state: i32) -> &'static str {
    match pb::RolloutState::try_from(state) {
        Ok(pb::RolloutState::Running) => "running",
        Ok(pb::RolloutState::Succeeded) => "succeeded",
        Ok(pb::RolloutState::Failed) => "failed",
        Ok(pb::RolloutState::Superseded) => "superseded",
        Ok(pb::RolloutState::Cancelled) => "cancelled",
        Ok(pb::RolloutState::Unspecified) | Err(_) => "",
    }
}

/// What an apply did, as the agent words it; empty when not said.
pub fn apply_outcome_name(outcome: i32) -> &'static str {
    match pb::ApplyOutcome::try_from(outcome) {
        Ok(pb::ApplyOutcome::Created) => "created",
        Ok(pb::ApplyOutcome::Updated) => "updated",
        Ok(pb::ApplyOutcome::Scaled) => "scaled",
        Ok(pb::ApplyOutcome::Unchanged) => "unchanged",
        Ok(pb::ApplyOutcome::Labeled) => "labeled",
        Ok(pb::ApplyOutcome::Unspecified) | Err(_) => "",
    }
}

/// An event's type as the agent's event log names it; empty when not said.
pub fn event_type_name(kind: i32) -> &'static str {
    use pb::EventType as T;
    match T::try_from(kind) {
        Ok(T::Applied) => "applied",
        Ok(T::Deleted) => "deleted",
        Ok(T::Scaled) => "scaled",
        Ok(T::InstanceStarted) => "instance_started",
        Ok(T::StartFailed) => "start_failed",
        Ok(T::InstanceExited) => "instance_exited",
        Ok(T::RestartScheduled) => "restart_scheduled",
        Ok(T::Stopping) => "stopping",
        Ok(T::Killed) => "killed",
        Ok(T::HealthChanged) => "health_changed",
        Ok(T::Ready) => "ready",
        Ok(T::OomKill) => "oom_kill",
        Ok(T::Adopted) => "adopted",
        Ok(T::Lost) => "lost",
        Ok(T::RolloutStarted) => "rollout_started",
        Ok(T::RolloutStep) => "rollout_step",
        Ok(T::RolloutFinished) => "rollout_finished",
        Ok(T::Package) => "package",
        Ok(T::Bookmark) => "bookmark",
        Ok(T::RunStarted) => "run_started",
        Ok(T::RunFinished) => "run_finished",
        Ok(T::RunSkipped) => "run_skipped",
        Ok(T::RecordQuarantined) => "record_quarantined",
        Ok(T::RecordUnsaved) => "record_unsaved",
        Ok(T::Unspecified) | Err(_) => "",
    }
}

/// An event's field as text: numbers in decimal, a list one item per line.
pub fn attribute_text(v: &pb::AttributeValue) -> String {
    use pb::attribute_value::Value;
    match &v.value {
        Some(Value::Text(t)) => t.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Lines(l)) => l.lines.join("\n"),
        None => String::new(),
    }
}

/// A timestamp as RFC 3339 in UTC (`2025-03-01T12:00:00.250Z`); `None` outside years 1–9999,
/// which no real event has.
pub fn rfc3339(ts: &prost_types::Timestamp) -> Option<String> {
    const MIN_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let ts = ts.normalized();
    (MIN_SECONDS..=MAX_SECONDS)
        .contains(&ts.seconds)
        .then(|| ts.to_string())
}

fn nonzero(v: i32) -> Option<i32> {
    (v != 0).then_some(v)
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// Wire values from the words the CLI shows, for the tests' replies of an agent.
#[cfg(test)]
pub mod wire {
    use corral_proto::v1 as pb;

    /// The value named `PREFIX` + `word` in upper case; 0 (unspecified) for `""`.
    fn named<E: Into<i32>>(from_name: fn(&str) -> Option<E>, prefix: &str, word: &str) -> i32 {
        if word.is_empty() {
            return 0;
        }
        let name = format!("{prefix}{}", word.to_ascii_uppercase());
        from_name(&name)
            .map(Into::into)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    pub fn health(word: &str) -> i32 {
        named(pb::HealthState::from_str_name, "HEALTH_STATE_", word)
    }

    pub fn service_health(word: &str) -> i32 {
        named(pb::ServiceHealth::from_str_name, "SERVICE_HEALTH_", word)
    }

    pub fn rollout_kind(word: &str) -> i32 {
        named(pb::RolloutKind::from_str_name, "ROLLOUT_KIND_", word)
    }

    pub fn rollout_state(word: &str) -> i32 {
        named(pb::RolloutState::from_str_name, "ROLLOUT_STATE_", word)
    }

    pub fn apply_outcome(word: &str) -> i32 {
        named(pb::ApplyOutcome::from_str_name, "APPLY_OUTCOME_", word)
    }

    pub fn event_type(word: &str) -> i32 {
        named(pb::EventType::from_str_name, "EVENT_TYPE_", word)
    }

    pub fn text(t: &str) -> pb::AttributeValue {
        pb::AttributeValue {
            value: Some(pb::attribute_value::Value::Text(t.to_owned())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::views::wire;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    fn sample_instance() -> pb::InstanceStatus {
        pb::InstanceStatus {
            incarnation: 0,
            id: "web-1".into(),
            index: 1,
            revision: 3,
            state: pb::InstanceState::Backoff as i32,
            pid: 0,
            init_pid: 0,
            restarts: 2,
            last_exit: Some(pb::ExitInfo {
                class: pb::ExitClass::OomKilled as i32,
                code: 0,
                signal: 9,
                at: Some(ts(1_740_830_400, 250_000_000)),
                text: "oom_killed".into(),
                detail: String::new(),
                ..Default::default()
            }),
            usage: Some(pb::ResourceUsage {
                cpu_usage_ns: 1_500_000_000,
                memory_bytes: 0,
                memory_peak_bytes: 268_435_456,
                oom_kills: 1,
                pids: 0,
                cpu_rate: 0.0,
                ..Default::default()
            }),
            started_at: None,
            next_start_at: Some(ts(1_740_830_401, 0)),
            last_error: String::new(),
            cgroup: "/sys/fs/cgroup/corral/web/web-1".into(),
            ports: [("admin".to_string(), 41000)].into_iter().collect(),
            log_lines_dropped: 0,
            log_bytes_dropped: 0,
            health: wire::health("unknown"),
            health_reason: String::new(),
            notify_status: String::new(),
        }
    }

    #[test]
    fn instance_json_has_stable_names_and_lowercase_enums() {
        let v = serde_json::to_value(InstanceView::from(&sample_instance())).unwrap();
        assert_eq!(
            v,
            json!({
                "id": "web-1",
                "incarnation": null,
                "index": 1,
                "revision": 3,
                "state": "backoff",
                "health": "unknown",
                "health_reason": null,
                "pid": null,
                "init_pid": null,
                "restarts": 2,
                "last_exit": {
                    "class": "oom_killed",
                    "code": null,
                    "signal": 9,
                    "at": "2025-03-01T12:00:00.250Z",
                    "text": "oom_killed",
                    "detail": null,
                },
                "usage": {
                    "cpu_usage_ns": 1_500_000_000u64,
                    "memory_bytes": 0,
                    "memory_peak_bytes": 268_435_456u64,
                    "oom_kills": 1,
                    "pids": 0,
                    "nr_throttled": 0,
                    "throttled_usec": 0,
                    "memory_pressure_some_avg10": null,
                },
                "started_at": null,
                "log_bytes_dropped": 0,
                "log_lines_dropped": 0,
                "next_start_at": "2025-03-01T12:00:01Z",
                "last_error": null,
                "cgroup": "/sys/fs/cgroup/corral/web/web-1",
                "ports": { "admin": 41000 },
            })
        );
    }

    #[test]
    fn service_json_carries_counts_spec_and_instances() {
        let status = pb::ServiceStatus {
            package: None,
            next_run_at: None,
            next_run_local: String::new(),
            autoscale: None,
            name: "web".into(),
            revision: 3,
            owner: pb::ServiceOwner::Etcd as i32,
            health: wire::service_health("degraded"),
            spec: Some(pb::ServiceSpec {
                name: "web".into(),
                command: vec!["/usr/bin/python3".into(), "-m".into(), "http.server".into()],
                replicas: Some(2),
                resources: Some(pb::Resources {
                    cpu: Some(0.5),
                    memory_bytes: Some(268_435_456),
                    pids: Some(256),
                    nofile: Some(4096),
                }),
                logs: Some(pb::LogRotation {
                    max_size_bytes: Some(10 << 20),
                    max_files: Some(5),
                }),
                ..Default::default()
            }),
            desired: 2,
            running: 1,
            healthy: 1,
            instances: vec![sample_instance()],
            deleting: false,
            rollout: Some(sample_rollout()),
            revisions: vec![2, 3],
            paused: true,
            ..Default::default()
        };
        let v: Value = serde_json::to_value(ServiceView::from(&status)).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "autoscale",
                "deleting",
                "desired",
                "health",
                "healthy",
                "instances",
                "name",
                "paused",
                "revision",
                "revisions",
                "rollout",
                "running",
                "source",
                "spec"
            ]
        );
        assert_eq!(v["paused"], true);
        assert_eq!(v["source"], "etcd");
        assert_eq!(v["revisions"], json!([2, 3]));
        assert_eq!(v["rollout"]["id"], "web-r3");
        assert_eq!(
            v["spec"]["resources"],
            json!({"cpu": 0.5, "memory_bytes": 268_435_456u64, "pids": 256, "nofile": 4096})
        );
        assert_eq!(v["spec"]["logs"]["max_size_bytes"], json!(10u64 << 20));
        assert_eq!(v["spec"]["health"], Value::Null);
        assert_eq!(
            v["spec"]["restart"],
            json!({"policy": null, "backoff": null, "backoff_max": null})
        );
        assert_eq!(v["instances"][0]["state"], "backoff");
        assert_eq!(v["health"], "degraded");
    }

    fn sample_rollout() -> pb::RolloutStatus {
        pb::RolloutStatus {
            id: "web-r3".into(),
            service: "web".into(),
            kind: wire::rollout_kind("update"),
            state: wire::rollout_state("failed"),
            from_revision: 2,
            to_revision: 3,
            replicas: 2,
            to_replace: 2,
            replaced: 1,
            new_instances: 2,
            ready: 1,
            old_instances: 1,
            available: 2,
            policy: Some(pb::RolloutPolicy {
                max_surge: Some(1),
                max_unavailable: Some(0),
                min_healthy_ms: Some(2000),
                healthy_deadline_ms: Some(60_000),
                auto_rollback: Some(true),
                start_cpu: None,
            }),
            started_at: Some(ts(1_740_830_400, 0)),
            finished_at: None,
            reason: "web-3 not ready within 60s".into(),
            rollback_id: "web-r4".into(),
            rollback_of: String::new(),
            steps: vec![pb::RolloutStep {
                time: Some(ts(1_740_830_401, 500_000_000)),
                step: "started".into(),
                instance: "web-3".into(),
                message: "web-3 started with revision 3".into(),
            }],
        }
    }

    #[test]
    fn rollouts_have_counts_policy_times_links_and_steps() {
        let back = pb::RolloutStatus {
            id: "web-r4".into(),
            kind: wire::rollout_kind("auto_rollback"),
            state: wire::rollout_state("succeeded"),
            rollback_id: String::new(),
            rollback_of: "web-r3".into(),
            steps: vec![],
            ..sample_rollout()
        };
        let v = serde_json::to_value(RolloutStatusView::with_rollback(
            &sample_rollout(),
            Some(&back),
        ))
        .unwrap();
        let mut v = v;
        let rollback = v["rollback"].take();
        assert_eq!(rollback["kind"], "auto_rollback");
        assert_eq!(rollback["rollback_of"], "web-r3");
        assert_eq!(rollback["rollback_id"], Value::Null);
        assert_eq!(rollback["rollback"], Value::Null);
        assert_eq!(rollback["steps"], json!([]));
        v["rollback"] = json!({"id": rollback["id"], "state": rollback["state"]});
        assert_eq!(
            v,
            json!({
                "id": "web-r3",
                "service": "web",
                "kind": "update",
                "state": "failed",
                "from_revision": 2,
                "to_revision": 3,
                "replicas": 2,
                "to_replace": 2,
                "replaced": 1,
                "new_instances": 2,
                "ready": 1,
                "old_instances": 1,
                "available": 2,
                "policy": {
                    "max_surge": 1,
                    "max_unavailable": 0,
                    "min_healthy": "2s",
                    "healthy_deadline": "1m",
                    "auto_rollback": true,
                    "start_cpu": null,
                },
                "started_at": "2025-03-01T12:00:00Z",
                "finished_at": null,
                "reason": "web-3 not ready within 60s",
                "rollback_id": "web-r4",
                "rollback_of": null,
                "rollback": {"id": "web-r4", "state": "succeeded"},
                "steps": [{
                    "time": "2025-03-01T12:00:01.500Z",
                    "step": "started",
                    "instance": "web-3",
                    "message": "web-3 started with revision 3",
                }],
            })
        );
        let v =
            serde_json::to_value(RolloutStatusView::from(&pb::RolloutStatus::default())).unwrap();
        assert_eq!(v["policy"], Value::Null);
        assert_eq!(v["rollback"], Value::Null);
        assert_eq!(v["reason"], Value::Null);
    }

    #[test]
    fn a_started_rollout_has_its_id_or_null() {
        let r = pb::RolloutResponse {
            name: "web".into(),
            revision: 2,
            rollout_id: "web-r5".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(RolloutStartedView::from(&r)).unwrap(),
            json!({"name": "web", "revision": 2, "rollout_id": "web-r5"})
        );
        let r = pb::RolloutResponse {
            rollout_id: String::new(),
            ..r
        };
        assert_eq!(
            serde_json::to_value(RolloutStartedView::from(&r)).unwrap()["rollout_id"],
            Value::Null
        );
    }

    #[test]
    fn health_and_exit_detail_are_null_when_empty() {
        let mut i = sample_instance();
        i.health = wire::health("");
        i.health_reason = "HTTP 503".into();
        if let Some(e) = i.last_exit.as_mut() {
            e.detail = "exec /srv/app: no such file".into();
        }
        let v = serde_json::to_value(InstanceView::from(&i)).unwrap();
        assert_eq!(v["health"], Value::Null);
        assert_eq!(v["health_reason"], "HTTP 503");
        assert_eq!(v["last_exit"]["detail"], "exec /srv/app: no such file");
        let v = serde_json::to_value(ServiceView::from(&pb::ServiceStatus::default())).unwrap();
        assert_eq!(v["health"], Value::Null);
    }

    #[test]
    fn log_lines_have_instance_stream_time_and_text() {
        let line = pb::LogLine {
            incarnation: 0,
            instance: "web-0".into(),
            stream: "stderr".into(),
            time: Some(ts(1_740_830_400, 123_456_789)),
            text: "boom".into(),
        };
        let v = serde_json::to_value(LogLineView::from(&line)).unwrap();
        assert_eq!(
            v,
            json!({
                "instance": "web-0",
                "incarnation": null,
                "stream": "stderr",
                "time": "2025-03-01T12:00:00.123456789Z",
                "text": "boom",
            })
        );
        let line = pb::LogLine { time: None, ..line };
        let v = serde_json::to_value(LogLineView::from(&line)).unwrap();
        assert_eq!(v["time"], Value::Null);
    }

    #[test]
    fn events_have_sorted_attributes_and_null_for_absent_fields() {
        let event = pb::Event {
            incarnation: 0,
            index: 42,
            time: Some(ts(1_740_830_400, 0)),
            service: "web".into(),
            instance: String::new(),
            r#type: wire::event_type("applied"),
            message: "web: revision 3 applied".into(),
            // A number on the wire prints as the text it always printed as.
            attributes: [
                (
                    "revision".to_owned(),
                    pb::AttributeValue {
                        value: Some(pb::attribute_value::Value::Number(3)),
                    },
                ),
                ("outcome".to_owned(), wire::text("updated")),
            ]
            .into(),
        };
        let text = serde_json::to_string(&EventView::from(&event)).unwrap();
        assert_eq!(
            text,
            r#"{"index":42,"time":"2025-03-01T12:00:00Z","service":"web","instance":null,"incarnation":null,"type":"applied","message":"web: revision 3 applied","attributes":{"outcome":"updated","revision":"3"}}"#
        );
    }

    #[test]
    fn every_state_and_exit_class_has_a_lowercase_name() {
        let states = [
            (pb::InstanceState::Running, "running"),
            (pb::InstanceState::Stopping, "stopping"),
            (pb::InstanceState::Backoff, "backoff"),
            (pb::InstanceState::Exited, "exited"),
            (pb::InstanceState::Failed, "failed"),
            (pb::InstanceState::Unspecified, "unknown"),
        ];
        for (state, name) in states {
            assert_eq!(state_name(state as i32), name);
        }
        assert_eq!(state_name(99), "unknown");

        let classes = [
            (pb::ExitClass::Exited, "exited"),
            (pb::ExitClass::Signaled, "signaled"),
            (pb::ExitClass::OomKilled, "oom_killed"),
            (pb::ExitClass::StopTimeout, "stop_timeout"),
            (pb::ExitClass::HealthFailed, "health_failed"),
            (pb::ExitClass::Lost, "lost"),
            (pb::ExitClass::Unspecified, "unknown"),
        ];
        for (class, name) in classes {
            assert_eq!(exit_class_name(class as i32), name);
        }
        assert_eq!(exit_class_name(-4), "unknown");
    }

    #[test]
    fn an_exit_code_is_only_given_for_exited() {
        let exit = |class: pb::ExitClass, code, signal| pb::ExitInfo {
            class: class as i32,
            code,
            signal,
            at: None,
            text: String::new(),
            detail: String::new(),
            ..Default::default()
        };
        let v = ExitView::from(&exit(pb::ExitClass::Exited, 0, 0));
        assert_eq!((v.code, v.signal), (Some(0), None));
        let v = ExitView::from(&exit(pb::ExitClass::Signaled, 0, 15));
        assert_eq!((v.code, v.signal), (None, Some(15)));
    }

    #[test]
    fn timestamps_are_rfc3339_or_null_when_absurd() {
        assert_eq!(rfc3339(&ts(0, 0)).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(&ts(1_740_830_400, 5_000)).unwrap(),
            "2025-03-01T12:00:00.000005Z"
        );
        assert_eq!(rfc3339(&ts(i64::MAX, 0)), None);
        assert_eq!(rfc3339(&ts(i64::MIN, -1)), None);
        assert_eq!(rfc3339(&ts(i64::MAX, i32::MAX)), None);
    }
}
