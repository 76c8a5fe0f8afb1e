//! The spec model, twice: [`RawSpec`] is what a user wrote (TOML file or protobuf message), every
//! field optional and sizes/durations still text; [`ServiceSpec`] is the validated value with
//! every default filled in and every unit parsed. Only `validate` turns one into the other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

// ------------------------------------------------------------------------------------------
// Raw: as written.

/// A size as written: an integer number of bytes or a string such as `"256MiB"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

/// A port as written in `[ports]`: `"auto"` or a port number (integer or digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPort {
    Number(i64),
    Text(String),
}

/// A service spec as the user wrote it. Produced by the TOML reader (which reports unknown
/// fields and wrong types itself) and by the protobuf conversion; checked by `validate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSpec {
    pub name: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub replicas: Option<i64>,
    pub resources: Option<RawResources>,
    pub isolation: Option<RawIsolation>,
    pub ports: Option<BTreeMap<String, RawPort>>,
    pub sockets: Option<Vec<RawSocket>>,
    pub restart: Option<RawRestart>,
    pub health: Option<RawHealth>,
    pub rollout: Option<RawRollout>,
    pub stop: Option<RawStop>,
    pub logs: Option<RawLogs>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawResources {
    pub cpu: Option<f64>,
    pub memory: Option<RawSize>,
    pub pids: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawIsolation {
    pub namespaces: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub private_tmp: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSocket {
    pub name: Option<String>,
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRestart {
    pub policy: Option<String>,
    pub backoff: Option<String>,
    pub backoff_max: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawHealth {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub grpc: Option<String>,
    pub exec: Option<Vec<String>>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub start_period: Option<String>,
    pub failure_threshold: Option<i64>,
    pub success_threshold: Option<i64>,
    pub restart_on_failure: Option<bool>,
    pub notify: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRollout {
    pub max_surge: Option<i64>,
    pub max_unavailable: Option<i64>,
    pub min_healthy: Option<String>,
    pub healthy_deadline: Option<String>,
    pub auto_rollback: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawStop {
    pub signal: Option<String>,
    pub grace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawLogs {
    pub max_size: Option<RawSize>,
    pub max_files: Option<i64>,
}

// ------------------------------------------------------------------------------------------
// Validated.

/// A validated service spec: every default filled in, every value within its range.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Absolute; `/` by default.
    pub workdir: PathBuf,
    /// `None`: run as the agent's own user.
    pub user: Option<UserSpec>,
    pub replicas: u32,
    pub resources: Resources,
    pub isolation: Isolation,
    pub ports: BTreeMap<String, PortSpec>,
    pub sockets: Vec<SocketSpec>,
    pub restart: RestartSpec,
    pub health: Option<HealthSpec>,
    pub rollout: RolloutSpec,
    pub stop: StopSpec,
    pub logs: LogSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    /// A user name, resolved on the host when an instance starts.
    Name(String),
    /// A numeric uid, with a gid (default: the same number as the uid).
    Id { uid: u32, gid: Option<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resources {
    /// Cores, e.g. 0.5. `None`: unlimited.
    pub cpu: Option<f64>,
    /// Bytes. `None`: unlimited.
    pub memory: Option<u64>,
    /// Max tasks. `None`: unlimited.
    pub pids: Option<u64>,
}

/// The Linux namespaces an instance gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    Pid,
    Mount,
    Uts,
    Ipc,
    Net,
}

impl Namespace {
    pub const ALL: [Namespace; 5] = [
        Namespace::Pid,
        Namespace::Mount,
        Namespace::Uts,
        Namespace::Ipc,
        Namespace::Net,
    ];

    /// The name used in spec files: `pid`, `mount`, `uts`, `ipc`, `net`.
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Pid => "pid",
            Namespace::Mount => "mount",
            Namespace::Uts => "uts",
            Namespace::Ipc => "ipc",
            Namespace::Net => "net",
        }
    }

    pub fn from_name(s: &str) -> Option<Namespace> {
        Namespace::ALL.into_iter().find(|n| n.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// Sorted, without duplicates. Default: pid, mount, uts, ipc.
    pub namespaces: Vec<Namespace>,
    /// Hostname template; `{index}` and `{instance}` are expanded. Default (with a uts
    /// namespace): the instance id.
    pub hostname: Option<String>,
    /// A fresh tmpfs on /tmp. Default: true when the mount namespace is on.
    pub private_tmp: bool,
}

impl Isolation {
    pub fn has(&self, ns: Namespace) -> bool {
        self.namespaces.contains(&ns)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    /// The agent picks a free port for each instance.
    Auto,
    Fixed(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    pub name: String,
    pub listen: ListenAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    /// First delay. Default 100ms.
    pub backoff: Duration,
    /// Cap. Default 30s. Always >= `backoff`.
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A URL, `http://host:port/path`, with `{port.NAME}` placeholders kept for expansion.
    Http(String),
    /// `host:port`, placeholders kept.
    Tcp(String),
    /// `host:port`, placeholders kept.
    Grpc(String),
    /// argv run inside the instance.
    Exec(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `None` only when `notify` is true (readiness is pushed by the instance).
    pub probe: Option<Probe>,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub restart_on_failure: bool,
    pub notify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutSpec {
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_healthy: Duration,
    pub healthy_deadline: Duration,
    pub auto_rollback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopSpec {
    /// Signal number, e.g. 15.
    pub signal: i32,
    /// Canonical name, e.g. "SIGTERM".
    pub signal_name: String,
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSpec {
    pub max_size: u64,
    pub max_files: u32,
}
