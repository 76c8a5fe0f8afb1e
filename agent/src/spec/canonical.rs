//! [`ServiceSpec`] back to [`RawSpec`], and what a validated spec tells about its instances.

use super::artifact::Package;
use super::job::{JobSpec, Kind, RawJob, RawSchedule};
use super::types::{
    HealthSpec, Namespace, PortSpec, Probe, RawHealth, RawIsolation, RawLogs, RawPort,
    RawResources, RawRestart, RawRollout, RawScale, RawSize, RawSocket, RawSpec, RawStop,
    ServiceSpec,
};
use super::units::{format_duration, format_size};
use super::validate::expand_hostname;

impl ServiceSpec {
    /// The canonical raw form: every default written out, sizes and durations in their
    /// shortest exact text, `localhost` as `127.0.0.1`. Validating it gives `self` back.
    /// Absent stays absent where absence is the value: `user`, resource limits,
    /// `isolation.hostname`, `isolation.capabilities` (whose default depends on the user the
    /// instance runs as) and `[health]`. Capabilities are written as `CAP_NAME`.
    pub fn to_raw(&self) -> RawSpec {
        let (artifact, image) = Package::to_raw(self.package.as_ref());
        RawSpec {
            name: Some(self.name.clone()),
            command: Some(self.command.clone()),
            env: Some(self.env.clone()),
            workdir: Some(self.workdir.to_string_lossy().into_owned()),
            user: self.user.as_ref().map(ToString::to_string),
            replicas: Some(i64::from(self.replicas)),
            resources: Some(RawResources {
                cpu: self.resources.cpu,
                memory: self
                    .resources
                    .memory
                    .map(|bytes| RawSize::Text(format_size(bytes))),
                pids: self
                    .resources
                    .pids
                    .map(|pids| i64::try_from(pids).unwrap_or(i64::MAX)),
                nofile: self
                    .resources
                    .nofile
                    .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            }),
            isolation: Some(RawIsolation {
                namespaces: Some(
                    self.isolation
                        .namespaces
                        .iter()
                        .map(|ns| ns.as_str().to_owned())
                        .collect(),
                ),
                hostname: self.isolation.hostname.clone(),
                private_tmp: Some(self.isolation.private_tmp),
                capabilities: self
                    .isolation
                    .capabilities
                    .as_ref()
                    .map(|set| set.iter().map(ToString::to_string).collect()),
                readonly_root: Some(self.isolation.readonly_root),
                seccomp: Some(self.isolation.seccomp.as_str().to_owned()),
                devices: Some(self.isolation.devices.as_str().to_owned()),
                system_paths: Some(self.isolation.system_paths.as_str().to_owned()),
                userns: Some(self.isolation.userns),
            }),
            ports: Some(
                self.ports
                    .iter()
                    .map(|(name, port)| {
                        let raw = match port {
                            PortSpec::Auto => RawPort::Text("auto".to_owned()),
                            PortSpec::Fixed(n) => RawPort::Number(i64::from(*n)),
                        };
                        (name.clone(), raw)
                    })
                    .collect(),
            ),
            sockets: Some(
                self.sockets
                    .iter()
                    .map(|socket| RawSocket {
                        name: Some(socket.name.clone()),
                        listen: Some(socket.listen.to_string()),
                    })
                    .collect(),
            ),
            restart: Some(RawRestart {
                policy: Some(self.restart.policy.as_str().to_owned()),
                backoff: Some(format_duration(self.restart.backoff)),
                backoff_max: Some(format_duration(self.restart.backoff_max)),
            }),
            health: self.health.as_ref().map(raw_health),
            rollout: Some(RawRollout {
                max_surge: Some(i64::from(self.rollout.max_surge)),
                max_unavailable: Some(i64::from(self.rollout.max_unavailable)),
                min_healthy: Some(format_duration(self.rollout.min_healthy)),
                healthy_deadline: Some(format_duration(self.rollout.healthy_deadline)),
                auto_rollback: Some(self.rollout.auto_rollback),
                start_cpu: self.rollout.start_cpu,
            }),
            scale: self.scale.map(|s| RawScale {
                min: Some(i64::from(s.min)),
                max: Some(i64::from(s.max)),
                target_connections: s.target_connections.map(i64::from),
                target_cpu: s.target_cpu,
                idle_after: Some(format_duration(s.idle_after)),
                scale_down_delay: Some(format_duration(s.scale_down_delay)),
            }),
            stop: Some(RawStop {
                signal: Some(self.stop.signal_name.clone()),
                grace: Some(format_duration(self.stop.grace)),
            }),
            logs: Some(RawLogs {
                max_size: Some(RawSize::Text(format_size(self.logs.max_size))),
                max_files: Some(i64::from(self.logs.max_files)),
            }),
            artifact,
            image,
            labels: Some(self.labels.clone()),
            annotations: Some(self.annotations.clone()),
            kind: None,
            schedule: None,
            job: None,
        }
        .with_job(self.job.as_ref())
    }

    /// Whether `self` and `other` differ at most in `replicas`: a change that scales
    /// instances in or out instead of replacing them.
    pub fn same_except_replicas(&self, other: &ServiceSpec) -> bool {
        let mut other = other.clone();
        other.replicas = self.replicas;
        *self == other
    }

    /// Whether `self` and `other` differ at most in `replicas`, `labels` and `annotations`:
    /// what changes in place, without replacing instances.
    pub fn same_but_in_place(&self, other: &ServiceSpec) -> bool {
        let mut other = other.clone();
        other.replicas = self.replicas;
        other.labels.clone_from(&self.labels);
        other.annotations.clone_from(&self.annotations);
        *self == other
    }

    /// `self` with the labels and annotations of `from` (which are not revisioned: a
    /// rollback keeps the current ones).
    pub fn with_metadata_of(&self, from: &ServiceSpec) -> ServiceSpec {
        let mut s = self.clone();
        s.labels.clone_from(&from.labels);
        s.annotations.clone_from(&from.annotations);
        s
    }

    /// The hostname of instance `index`: the template with `{index}` and `{instance}`
    /// expanded, or the instance id (`web-2`) without a template. `None` without a uts
    /// namespace: the instance then shares the host's name.
    pub fn hostname_for(&self, index: u32) -> Option<String> {
        if !self.isolation.has(Namespace::Uts) {
            return None;
        }
        let template = self
            .isolation
            .hostname
            .as_deref()
            .unwrap_or(super::validate::DEFAULT_HOSTNAME);
        Some(expand_hostname(template, &self.name, index))
    }
}

fn raw_health(health: &HealthSpec) -> RawHealth {
    let mut raw = RawHealth {
        interval: Some(format_duration(health.interval)),
        timeout: Some(format_duration(health.timeout)),
        start_period: Some(format_duration(health.start_period)),
        failure_threshold: Some(i64::from(health.failure_threshold)),
        success_threshold: Some(i64::from(health.success_threshold)),
        restart_on_failure: Some(health.restart_on_failure),
        notify: Some(health.notify),
        ..RawHealth::default()
    };
    match &health.probe {
        None => {}
        Some(Probe::Http(url)) => raw.http = Some(url.clone()),
        Some(Probe::Tcp(target)) => raw.tcp = Some(target.clone()),
        Some(Probe::Grpc(target)) => raw.grpc = Some(target.clone()),
        Some(Probe::Exec(argv)) => raw.exec = Some(argv.clone()),
    }
    raw
}

impl RawSpec {
    /// A job's sections written out, and the service-only ones it cannot have left out.
    fn with_job(mut self, job: Option<&JobSpec>) -> RawSpec {
        let Some(job) = job else {
            return self;
        };
        self.kind = Some(Kind::Job.as_str().to_owned());
        self.replicas = None;
        self.rollout = None;
        self.sockets = None;
        if let Some(restart) = &mut self.restart {
            restart.policy = None;
        }
        self.schedule = job.schedule.as_ref().map(|s| RawSchedule {
            cron: Some(s.cron.as_str().to_owned()),
            timezone: Some(s.timezone.name().to_owned()),
            concurrency: Some(s.concurrency.as_str().to_owned()),
            catch_up: s.catch_up.map(format_duration),
            jitter: Some(format_duration(s.jitter)),
        });
        self.job = Some(RawJob {
            timeout: job.timeout.map(format_duration),
            retries: Some(i64::from(job.retries)),
            parallelism: Some(i64::from(job.parallelism)),
            history: Some(i64::from(job.history)),
        });
        self
    }
}
