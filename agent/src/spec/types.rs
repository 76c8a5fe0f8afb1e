//! The spec model, twice: [`RawSpec`] is what a user wrote (TOML file or protobuf message), every
//! field optional and sizes/durations still text; [`ServiceSpec`] is the validated value with
//! every default filled in and every unit parsed. Only `validate` turns one into the other.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::artifact::{Package, RawArtifact, RawImage};
use super::job::{JobSpec, RawJob, RawSchedule};

// ------------------------------------------------------------------------------------------
// Raw: as written.

/// A size as written: an integer number of bytes or a string such as `"256MiB"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    /// An integer number of bytes (TOML integer).
    Bytes(i64),
    /// Digits with an optional unit: `B`, `KiB`, `MiB`, `GiB` or `TiB`.
    Text(String),
}

/// A port as written in `[ports]`: `"auto"` or a port number (integer or digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawPort {
    /// A TOML integer.
    Number(i64),
    /// `"auto"`, or a port number written as digits.
    Text(String),
}

/// A service spec as the user wrote it. Produced by the TOML reader (which reports unknown
/// fields and wrong types itself) and by the protobuf conversion; checked by `validate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSpec {
    /// Required; `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: Option<String>,
    /// Required; the program (absolute path or bare name) and its arguments.
    pub command: Option<Vec<String>>,
    /// Extra environment variables of every instance.
    pub env: Option<BTreeMap<String, String>>,
    /// Absolute working directory.
    pub workdir: Option<String>,
    /// A user name, `uid` or `uid:gid`.
    pub user: Option<String>,
    /// Number of instances.
    pub replicas: Option<i64>,
    /// `[resources]`: cgroup limits and the open-file limit.
    pub resources: Option<RawResources>,
    /// `[isolation]`: namespaces, hostname, private /tmp, capabilities, read-only root.
    pub isolation: Option<RawIsolation>,
    /// `[ports]`: per-instance ports, by name.
    pub ports: Option<BTreeMap<String, RawPort>>,
    /// `[[sockets]]`: listeners owned by the agent, in file-descriptor order.
    pub sockets: Option<Vec<RawSocket>>,
    /// `[restart]`: policy and backoff.
    pub restart: Option<RawRestart>,
    /// `[health]`: the probe and its schedule.
    pub health: Option<RawHealth>,
    /// `[rollout]`: how instances are replaced.
    pub rollout: Option<RawRollout>,
    /// `[scale]`: on-demand start and autoscaling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<RawScale>,
    /// `[stop]`: stop signal and grace period.
    pub stop: Option<RawStop>,
    /// `[logs]`: rotation of the instance's log files.
    pub logs: Option<RawLogs>,
    /// `[artifact]`: an archive mounted read-only inside the instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact: Option<RawArtifact>,
    /// `[image]`: an OCI image as the instances' root filesystem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<RawImage>,
    /// `[labels]`: what schedulers select services by (`app = "web"`).
    pub labels: Option<BTreeMap<String, String>>,
    /// `[annotations]`: free text for tools; never read by the agent.
    pub annotations: Option<BTreeMap<String, String>>,
    /// `service` (the default) or `job`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `[schedule]` of a job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<RawSchedule>,
    /// `[job]` of a job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<RawJob>,
}

/// `[resources]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawResources {
    /// Cores, fractional (a TOML integer is read as a float).
    pub cpu: Option<f64>,
    /// Hard memory limit.
    pub memory: Option<RawSize>,
    /// Max tasks.
    pub pids: Option<i64>,
    /// Open files (`RLIMIT_NOFILE`, soft and hard).
    pub nofile: Option<i64>,
}

/// `[isolation]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawIsolation {
    /// Namespace names: `pid`, `mount`, `uts`, `ipc`, `net`.
    pub namespaces: Option<Vec<String>>,
    /// Hostname template with `{index}` and `{instance}`.
    pub hostname: Option<String>,
    /// A fresh tmpfs on /tmp.
    pub private_tmp: Option<bool>,
    /// Capability names, with or without `CAP_`, any case.
    pub capabilities: Option<Vec<String>>,
    /// A read-only view of the host's filesystem (workdir and /tmp stay writable).
    pub readonly_root: Option<bool>,
    /// `default` (a syscall filter) or `unconfined`.
    pub seccomp: Option<String>,
    /// `minimal` (an own /dev, device access denied by the cgroup) or `host`.
    pub devices: Option<String>,
    /// `masked` (the kernel's files masked or read-only) or `host`.
    pub system_paths: Option<String>,
    /// Root inside the instance is an unprivileged uid on the host.
    pub userns: Option<bool>,
}

/// One `[[sockets]]` entry as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSocket {
    /// The socket's `LISTEN_FDNAMES` entry.
    pub name: Option<String>,
    /// `host:port` or `unix:/path`.
    pub listen: Option<String>,
}

/// `[restart]` as written; durations are humantime strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRestart {
    /// `always`, `on-failure` or `never`.
    pub policy: Option<String>,
    /// First restart delay.
    pub backoff: Option<String>,
    /// Longest restart delay.
    pub backoff_max: Option<String>,
}

/// `[health]` as written; durations are humantime strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHealth {
    /// An `http://` URL.
    pub http: Option<String>,
    /// `host:port` to connect to.
    pub tcp: Option<String>,
    /// `host:port` of a `grpc.health.v1.Health` service.
    pub grpc: Option<String>,
    /// argv run inside the instance.
    pub exec: Option<Vec<String>>,
    /// Time between probes.
    pub interval: Option<String>,
    /// Time a probe may take.
    pub timeout: Option<String>,
    /// Grace period after a start.
    pub start_period: Option<String>,
    /// Consecutive failures that make an instance unhealthy.
    pub failure_threshold: Option<i64>,
    /// Consecutive successes that make an instance healthy.
    pub success_threshold: Option<i64>,
    /// Restart an instance that stays unhealthy.
    pub restart_on_failure: Option<bool>,
    /// Readiness pushed by the instance over `NOTIFY_SOCKET`.
    pub notify: Option<bool>,
}

/// `[rollout]` as written; durations are humantime strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRollout {
    /// Extra instances started before old ones stop.
    pub max_surge: Option<i64>,
    /// Instances that may be missing during a rollout.
    pub max_unavailable: Option<i64>,
    /// How long a new instance must stay healthy.
    pub min_healthy: Option<String>,
    /// Time limit for a new instance to become healthy.
    pub healthy_deadline: Option<String>,
    /// Restore the previous revision when a rollout fails.
    pub auto_rollback: Option<bool>,
    /// Cores a new instance of a rollout may use until it is first ready.
    pub start_cpu: Option<f64>,
}

/// `[scale]` as written; durations are humantime strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawScale {
    /// Fewest instances (0: scale to zero when idle).
    pub min: Option<i64>,
    /// Most instances.
    pub max: Option<i64>,
    /// Open connections per instance the autoscaler aims at.
    pub target_connections: Option<i64>,
    /// Fraction of an instance's cpu limit the autoscaler aims at.
    pub target_cpu: Option<f64>,
    /// No connection for this long: down to `min`.
    pub idle_after: Option<String>,
    /// How long load must stay low before an instance is removed.
    pub scale_down_delay: Option<String>,
}

/// `[stop]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStop {
    /// A signal name, with or without `SIG`.
    pub signal: Option<String>,
    /// Time between the stop signal and SIGKILL.
    pub grace: Option<String>,
}

/// `[logs]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLogs {
    /// Bytes per file.
    pub max_size: Option<RawSize>,
    /// Files kept.
    pub max_files: Option<i64>,
}

// ------------------------------------------------------------------------------------------
// Validated.

/// A validated service spec: every default filled in, every value within its range.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// `[a-z0-9][a-z0-9-]{0,62}`: safe as a path component and a cgroup name.
    pub name: String,
    /// Non-empty; `command[0]` is an absolute path or a bare program name.
    pub command: Vec<String>,
    /// Extra variables; never one the agent sets itself (`CORRAL_*`, `LISTEN_*`,
    /// `NOTIFY_SOCKET`, `PORT_<NAME>`). Default: none.
    pub env: BTreeMap<String, String>,
    /// Absolute; `/` by default.
    pub workdir: PathBuf,
    /// `None`: run as the agent's own user.
    pub user: Option<UserSpec>,
    /// 0..=1000; default 1.
    pub replicas: u32,
    /// Default: unlimited.
    pub resources: Resources,
    /// Default: pid, mount, uts and ipc namespaces, a private /tmp, a writable root, no
    /// capabilities for a non-root user and [`DEFAULT_ROOT_CAPABILITIES`] for root.
    pub isolation: Isolation,
    /// Per-instance ports, given to the instance as env `PORT_<NAME>`. Default: none.
    pub ports: BTreeMap<String, PortSpec>,
    /// Listeners owned by the agent, passed in this order (`LISTEN_FDS`). Default: none.
    pub sockets: Vec<SocketSpec>,
    /// Default: always, 100ms doubling up to 30s.
    pub restart: RestartSpec,
    /// `None`: no `[health]` section; an instance counts as healthy once it runs.
    pub health: Option<HealthSpec>,
    /// Default: surge 1, unavailable 0, healthy for 2s within 60s, auto rollback.
    pub rollout: RolloutSpec,
    /// `None`: a fixed count (`replicas`); else started on demand and autoscaled.
    pub scale: Option<ScaleSpec>,
    /// Default: SIGTERM, then SIGKILL after 10s.
    pub stop: StopSpec,
    /// Default: 5 files of 10MiB.
    pub logs: LogSpec,
    /// `[artifact]` or `[image]`: what the instances run from. `None`: the host's files.
    pub package: Option<Package>,
    /// Checked by Kubernetes' rules (see [`super::labels`]). Default: none. Not part of what
    /// instances run: a change of labels or annotations alone replaces no instance.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `Some` for `kind = "job"`: runs that end instead of instances kept running. A job has
    /// `replicas` 0 (instances start only with a run) and restart policy `on-failure` (a
    /// failed attempt is retried `job.retries` times).
    pub job: Option<JobSpec>,
}

/// The user an instance runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    /// A user name, resolved on the host when an instance starts.
    Name(String),
    /// A numeric uid, with a gid (default: the uid's primary group in /etc/passwd, or the
    /// same number as the uid when it has no entry).
    Id {
        /// The user id; never 4294967295 (`(uid_t)-1`).
        uid: u32,
        /// The group id, when written as `uid:gid`.
        gid: Option<u32>,
    },
    /// `dynamic`: a uid (and the same gid) the agent allocates for the service from its
    /// `--dynamic-users` range, kept across restarts, released when the service is deleted.
    Dynamic,
}

impl fmt::Display for UserSpec {
    /// As written in a spec file: the name, `uid` or `uid:gid`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSpec::Name(name) => f.write_str(name),
            UserSpec::Dynamic => f.write_str("dynamic"),
            UserSpec::Id { uid, gid: None } => write!(f, "{uid}"),
            UserSpec::Id {
                uid,
                gid: Some(gid),
            } => write!(f, "{uid}:{gid}"),
        }
    }
}

/// Limits of each instance: its cgroup's, and the open-file limit of its service process.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resources {
    /// Cores, e.g. 0.5; 0.01..=1024. `None`: unlimited.
    pub cpu: Option<f64>,
    /// Bytes; at least 1MiB. `None`: unlimited.
    pub memory: Option<u64>,
    /// Max tasks; 1..=4194304. `None`: unlimited.
    pub pids: Option<u64>,
    /// Open files per process (`RLIMIT_NOFILE`, soft and hard); 1..=1048576. `None`: the
    /// agent's own limit is inherited.
    pub nofile: Option<u64>,
}

/// The Linux namespaces an instance gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    /// Own process ids; the instance's init is PID 1.
    Pid,
    /// Own mount table (a private /proc and /tmp).
    Mount,
    /// Own hostname.
    Uts,
    /// Own System V IPC and POSIX message queues.
    Ipc,
    /// Own network stack, with loopback only.
    Net,
    /// Own cgroup root: the instance sees its cgroup as `/`.
    Cgroup,
}

impl Namespace {
    /// Every namespace a spec may ask for, in their sort order.
    pub const ALL: [Namespace; 6] = [
        Namespace::Pid,
        Namespace::Mount,
        Namespace::Uts,
        Namespace::Ipc,
        Namespace::Net,
        Namespace::Cgroup,
    ];

    /// The name used in spec files: `pid`, `mount`, `uts`, `ipc`, `net`, `cgroup`.
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Pid => "pid",
            Namespace::Mount => "mount",
            Namespace::Uts => "uts",
            Namespace::Ipc => "ipc",
            Namespace::Net => "net",
            Namespace::Cgroup => "cgroup",
        }
    }

    /// The namespace named `s` in spec files (exact, lowercase).
    pub fn from_name(s: &str) -> Option<Namespace> {
        Namespace::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

/// What an instance is isolated with, besides its cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// Sorted, without duplicates; `Pid` only with `Mount`. Default: pid, mount, uts, ipc.
    pub namespaces: Vec<Namespace>,
    /// Hostname template; `{index}` and `{instance}` are expanded. Only with a uts
    /// namespace. `None`: the instance id (see [`ServiceSpec::hostname_for`]).
    pub hostname: Option<String>,
    /// A fresh tmpfs on /tmp. Default: true when the mount namespace is on; never true
    /// without it.
    pub private_tmp: bool,
    /// The exact capability set of the service process, sorted by number, without
    /// duplicates. `None` (the default): none at all for a non-root `user`, and
    /// [`DEFAULT_ROOT_CAPABILITIES`] for root. A non-root user gets the listed ones as
    /// ambient capabilities (so they survive `execve`); either way the bounding set is
    /// cut to exactly this set.
    pub capabilities: Option<Vec<Capability>>,
    /// The host's filesystem is read-only inside the instance, except `workdir` (unless it
    /// is `/`) and `/tmp`. Only with the mount namespace. Default: false.
    pub readonly_root: bool,
    /// The system calls the service may make. Default: [`Seccomp::Default`].
    pub seccomp: Seccomp,
    /// The devices the service may open. Default: [`Devices::Minimal`].
    pub devices: Devices,
    /// The kernel's files under `/proc` and `/sys`: masked or read-only, or as on the host.
    /// Only with the mount namespace. Default: masked when the mount namespace is on.
    pub system_paths: SystemPaths,
    /// Root inside the instance is an unprivileged uid range on the host (a user namespace).
    /// Only with the mount namespace, never with `user = "dynamic"`. Default: false.
    pub userns: bool,
}

/// `isolation.seccomp`: the system call filter of the service process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// What container runtimes deny by default is refused with `EPERM` (mounts, modules,
    /// kexec, bpf, perf, keyrings, reboot, swap, clock changes, new user namespaces...).
    Default,
    /// No filter.
    Unconfined,
}

/// `isolation.devices`: which device nodes the service may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Devices {
    /// `null`, `zero`, `full`, `random`, `urandom`, `tty` and its own pseudo-terminals: an own
    /// `/dev` (with the mount namespace) and the cgroup's device control denying the rest.
    Minimal,
    /// The host's `/dev`, and no device control.
    Host,
}

/// `isolation.system_paths`: the kernel's files seen from inside the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemPaths {
    /// `/sys` (and the cgroup filesystems) read-only, sensitive `/proc` files masked, the
    /// kernel's knobs under `/proc` read-only.
    Masked,
    /// As the host's mount table shows them.
    Host,
}

impl Seccomp {
    /// The name used in spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            Seccomp::Default => "default",
            Seccomp::Unconfined => "unconfined",
        }
    }
}

impl Devices {
    /// The name used in spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            Devices::Minimal => "minimal",
            Devices::Host => "host",
        }
    }
}

impl SystemPaths {
    /// The name used in spec files.
    pub fn as_str(self) -> &'static str {
        match self {
            SystemPaths::Masked => "masked",
            SystemPaths::Host => "host",
        }
    }
}

/// A Linux capability (`capabilities(7)`), as the `caps` crate names and numbers it.
pub use caps::Capability;

/// What a root instance may do when its spec lists no `capabilities`: the set container
/// runtimes (Docker, containerd) give by default, less `CAP_MKNOD` (an instance has no
/// device node to make). Sorted by number.
pub const DEFAULT_ROOT_CAPABILITIES: [Capability; 13] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_SETFCAP,
];

/// The capability named `name`: `CAP_NET_BIND_SERVICE`, `net_bind_service`, `Cap_Kill`...
/// (any case, `CAP_` optional).
pub fn capability_by_name(name: &str) -> Option<Capability> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    caps::to_canonical(name).parse().ok()
}

/// The kernel's bit mask of `set` (bit n for capability number n).
pub fn capability_mask(set: &[Capability]) -> u64 {
    set.iter().fold(0, |mask, cap| mask | cap.bitmask())
}

impl Isolation {
    /// Whether the instance gets namespace `ns`.
    pub fn has(&self, ns: Namespace) -> bool {
        self.namespaces.contains(&ns)
    }
}

/// A `[ports]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    /// The agent picks a free port for each instance.
    Auto,
    /// This port, 1..=65535, for every instance (so with more than one instance, only
    /// with a private network namespace).
    Fixed(u16),
}

/// Where an agent-owned socket listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// TCP on an IP address and a port other than 0.
    Tcp(SocketAddr),
    /// A Unix stream socket at this absolute path (shorter than 108 bytes).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    /// As written in a spec file: `127.0.0.1:8080`, `[::1]:8080` or `unix:/path`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A listening socket the agent owns and hands to every instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    /// `[A-Za-z0-9_.-]{1,64}`, unique in the spec: its `LISTEN_FDNAMES` entry.
    pub name: String,
    /// Where it listens; unique in the spec.
    pub listen: ListenAddr,
}

/// Which exits are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Every exit (the default).
    Always,
    /// Exits with a non-zero code, signals, OOM kills and health failures.
    OnFailure,
    /// None.
    Never,
}

impl RestartPolicy {
    /// The name used in spec files: `always`, `on-failure`, `never`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// `[restart]`: when and how fast exited instances are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSpec {
    /// Default: always.
    pub policy: RestartPolicy,
    /// First delay, doubling after each restart. Default 100ms; 10ms..=1h.
    pub backoff: Duration,
    /// Cap. Default 30s; at most 1h. Always >= `backoff`.
    pub backoff_max: Duration,
}

/// How an instance's health is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A URL, `http://host:port/path`, with `{port.NAME}` placeholders kept for expansion.
    Http(String),
    /// `host:port`, placeholders kept.
    Tcp(String),
    /// `host:port`, placeholders kept.
    Grpc(String),
    /// argv run inside the instance, placeholders kept.
    Exec(Vec<String>),
}

impl Probe {
    /// The spec-file key of this probe: `http`, `tcp`, `grpc` or `exec`.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Http(_) => "http",
            Probe::Tcp(_) => "tcp",
            Probe::Grpc(_) => "grpc",
            Probe::Exec(_) => "exec",
        }
    }
}

/// `[health]`: the probe of every instance and how its results count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `None` only when `notify` is true (readiness is pushed by the instance).
    pub probe: Option<Probe>,
    /// Time between probes. Default 2s; 100ms..=1h.
    pub interval: Duration,
    /// Time a probe may take. Default 1s, or `interval` when shorter; 10ms..=`interval`.
    pub timeout: Duration,
    /// Failures during this time after a start do not count. Default 0s; at most 24h.
    pub start_period: Duration,
    /// Consecutive failures that make an instance unhealthy. Default 3; 1..=100.
    pub failure_threshold: u32,
    /// Consecutive successes that make an instance healthy. Default 1; 1..=100.
    pub success_threshold: u32,
    /// Restart an instance that became unhealthy. Default true.
    pub restart_on_failure: bool,
    /// The instance reports `READY=1` on `NOTIFY_SOCKET`. Default false.
    pub notify: bool,
}

/// `[rollout]`: how instances are replaced on a restart or an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutSpec {
    /// Extra instances started before old ones stop. Default 1; 0..=1000.
    pub max_surge: u32,
    /// Instances that may be missing during a rollout. Default 0; 0..=1000; never 0 together
    /// with `max_surge`.
    pub max_unavailable: u32,
    /// How long a new instance must stay healthy. Default 2s; at most 1h.
    pub min_healthy: Duration,
    /// A new instance must have been healthy for `min_healthy` within this time, or the
    /// rollout fails. Default 60s; 1s..=24h and at least `min_healthy`.
    pub healthy_deadline: Duration,
    /// Restore the previous revision when a rollout fails. Default true.
    pub auto_rollback: bool,
    /// Cores (0.01..=1024) a new instance started by a rollout may use until it is first
    /// ready (its first passing probe, its `READY=1`, or without either the rollout counting
    /// it ready), so that its start does not take the CPU from the instances serving beside
    /// it; then its own `resources.cpu` (or none) applies. The lower of this and
    /// `resources.cpu` applies meanwhile. Default: no cap.
    pub start_cpu: Option<f64>,
}

/// `[scale]`: on-demand start and autoscaling within `[min, max]`. Only with `[[sockets]]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleSpec {
    /// Fewest instances; 0 scales to zero when idle. Default 0; at most `max`.
    pub min: u32,
    /// Most instances. Required; 1..=1000.
    pub max: u32,
    /// Open connections per instance aimed at; 1..=1000000. At least one target is set.
    pub target_connections: Option<u32>,
    /// Fraction of an instance's cpu limit (of one core without a limit) aimed at; (0, 1].
    pub target_cpu: Option<f64>,
    /// No connection for this long: down to `min`. Default 5m; 1s..=24h.
    pub idle_after: Duration,
    /// Load must stay below target this long before an instance is removed. Default 30s;
    /// 1s..=24h.
    pub scale_down_delay: Duration,
}

/// `[stop]`: how an instance is asked to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopSpec {
    /// Signal number, e.g. 15. Default SIGTERM; never SIGSTOP.
    pub signal: i32,
    /// Canonical name, e.g. "SIGTERM".
    pub signal_name: String,
    /// Then SIGKILL to everything in the instance's cgroup. Default 10s; at most 1h.
    pub grace: Duration,
}

/// `[logs]`: rotation of an instance's log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSpec {
    /// Bytes per file before it is rotated. Default 10MiB; 4KiB..=1TiB.
    pub max_size: u64,
    /// Files kept, the current one included. Default 5; 1..=100.
    pub max_files: u32,
}
