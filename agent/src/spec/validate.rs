//! [`RawSpec`] to [`ServiceSpec`]: every rule of a spec, every default, every error collected.
//!
//! Each field is checked on its own and falls back to its default when wrong, so that the
//! checks between fields still run and one pass reports everything. A check between two
//! fields is skipped when one of them is already wrong, so that one mistake is reported once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::artifact::{FetchPolicy, validate_package};
use super::error::{FieldError, SpecError, child, quote};
use super::job::RawJobSections;
use super::types::{
    Capability, HealthSpec, Isolation, ListenAddr, LogSpec, Namespace, PortSpec, Probe, RawHealth,
    RawIsolation, RawLogs, RawPort, RawResources, RawRestart, RawRollout, RawSize, RawSocket,
    RawSpec, RawStop, Resources, RestartPolicy, RestartSpec, RolloutSpec, ServiceSpec, SocketSpec,
    StopSpec, UserSpec, capability_by_name,
};
use super::types::{Devices, Seccomp, SystemPaths};
use super::units::{format_duration, format_size, parse_duration, parse_size, signal_by_name};

mod scale;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
const fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}
const HOUR: Duration = secs(3600);
const DAY: Duration = secs(24 * 3600);

/// The most instances one service may have on a host.
pub const MAX_REPLICAS: u32 = 1000;
/// Largest instance index a hostname must work for.
const MAX_INDEX: u32 = MAX_REPLICAS - 1;
const MAX_ARGS: usize = 4096;
const MAX_ARGV_BYTES: usize = 128 * 1024;
const MAX_ENV: usize = 1024;
const MAX_ENV_NAME: usize = 256;
const MAX_ENV_VALUE: usize = 32 * 1024;
const MAX_PATH: usize = 4096;
const MAX_PORTS: usize = 100;
const MAX_SOCKETS: usize = 64;
/// `sizeof(sun_path)`, NUL included.
const SUN_PATH_LEN: usize = 108;
const MAX_HOSTNAME: usize = 64;
const MIN_CPU: f64 = 0.01;
const MAX_CPU: f64 = 1024.0;
const MIN_MEMORY: u64 = MIB;
const MAX_PIDS: i64 = 4_194_304;
/// The kernel's default `fs.nr_open`, the usual ceiling of `RLIMIT_NOFILE`. A host whose
/// `fs.nr_open` is lower refuses a higher value at apply.
const MAX_NOFILE: i64 = 1_048_576;

const DEFAULT_NAMESPACES: [Namespace; 5] = [
    Namespace::Pid,
    Namespace::Mount,
    Namespace::Uts,
    Namespace::Ipc,
    Namespace::Cgroup,
];
const DEFAULT_BACKOFF: Duration = millis(100);
const DEFAULT_BACKOFF_MAX: Duration = secs(30);
const MIN_BACKOFF: Duration = Duration::ZERO;
const DEFAULT_INTERVAL: Duration = secs(2);
const MIN_INTERVAL: Duration = millis(100);
const DEFAULT_TIMEOUT: Duration = secs(1);
/// An instance that has never passed its probe gets this long before failures count: one
/// that needs a few seconds to start is not declared unhealthy (and restarted) before it
/// ever served. The window ends at the first pass, so a healthy instance loses nothing.
const DEFAULT_START_PERIOD: Duration = secs(10);
const MIN_TIMEOUT: Duration = millis(10);
const DEFAULT_FAILURE_THRESHOLD: i64 = 3;
const DEFAULT_SUCCESS_THRESHOLD: i64 = 1;
const MAX_THRESHOLD: i64 = 100;
const DEFAULT_MAX_SURGE: i64 = 1;
const DEFAULT_MAX_UNAVAILABLE: i64 = 0;
/// Long enough to see an instance that passes once and then falls over at once (its exit is
/// noticed as it happens); short enough that a rollout of a few instances takes seconds.
const DEFAULT_MIN_HEALTHY: Duration = millis(500);
const DEFAULT_HEALTHY_DEADLINE: Duration = secs(60);
const MIN_HEALTHY_DEADLINE: Duration = secs(1);
const DEFAULT_STOP_SIGNAL: &str = "SIGTERM";
const DEFAULT_GRACE: Duration = secs(10);
const DEFAULT_LOG_SIZE: u64 = 10 * MIB;
const MIN_LOG_SIZE: u64 = 4 * KIB;
const MAX_LOG_SIZE: u64 = TIB;
const DEFAULT_LOG_FILES: i64 = 5;
const MAX_LOG_FILES: i64 = 100;

/// Env names the agent sets itself (besides `CORRAL_*` and `PORT_<NAME>`).
const RESERVED_ENV: [(&str, &str); 4] = [
    ("LISTEN_FDS", "set by the agent for [[sockets]]"),
    ("LISTEN_FDNAMES", "set by the agent for [[sockets]]"),
    ("LISTEN_PID", "set by the agent for [[sockets]]"),
    ("NOTIFY_SOCKET", "set by the agent for health.notify"),
];

/// The id of instance `index` of `service`: `web-2`.
pub fn instance_id(service: &str, index: u32) -> String {
    format!("{service}-{index}")
}

/// Whether `s` is a valid service name: `[a-z0-9][a-z0-9-]{0,62}`. Such a name cannot walk a
/// path (no `/`, no `.`) and is safe in cgroup, file and instance names.
pub fn valid_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.first()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// `[a-z][a-z0-9_]{0,31}`: the name of a `[ports]` entry.
fn valid_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_lowercase)
        && b.len() <= 32
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// The env variable that carries port `name`: `PORT_ADMIN`.
fn port_env_name(name: &str) -> String {
    format!("PORT_{}", name.to_ascii_uppercase())
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn valid_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.first()
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// `[A-Za-z0-9_.-]{1,64}`: a socket name, safe in `LISTEN_FDNAMES` (which `:` separates).
fn valid_socket_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// At most 64 characters of `[A-Za-z0-9-.]`, not empty, not starting with `-`.
fn valid_hostname(s: &str) -> bool {
    (1..=MAX_HOSTNAME).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.'))
}

/// The hostname template an instance gets without `isolation.hostname`.
pub const DEFAULT_HOSTNAME: &str = "{instance}";

/// Expands `{instance}` and `{index}` in a hostname template. The kernel takes hostnames of
/// up to 64 bytes while a service name may have 63 and an instance id 67 (`<name>-999`): when
/// the expansion would be longer than 64, the service name inside each `{instance}` is
/// shortened (from its end, to at least one character) so the index is kept and every
/// instance still gets its own name.
pub(super) fn expand_hostname(template: &str, service: &str, index: u32) -> String {
    // The instance id holds no braces, so the second replace cannot see the first's output.
    let expand = |service: &str| {
        template
            .replace("{instance}", &instance_id(service, index))
            .replace("{index}", &index.to_string())
    };
    let full = expand(service);
    let uses = template.matches("{instance}").count();
    if full.len() <= MAX_HOSTNAME || uses == 0 {
        return full;
    }
    let cut = (full.len() - MAX_HOSTNAME).div_ceil(uses);
    // Service names are ASCII: any byte index is a character boundary.
    let keep = service.len().saturating_sub(cut).max(1).min(service.len());
    expand(&service[..keep])
}

/// Checks that every `{...}` in a hostname template is `{index}` or `{instance}`.
fn check_hostname_placeholders(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!("{}: \"{{\" is not closed", quote(template)));
        };
        let name = &after[..close];
        if name != "index" && name != "instance" {
            return Err(format!(
                "{}: {} is not a placeholder (use {{index}} or {{instance}})",
                quote(template),
                quote(&format!("{{{name}}}"))
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// The `NAME`s of the `{port.NAME}` placeholders in a probe target.
fn port_placeholders(target: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = target;
    while let Some(open) = rest.find("{port.") {
        let after = &rest[open + "{port.".len()..];
        let Some(close) = after.find('}') else {
            return Err(format!("{}: \"{{port.\" is not closed", quote(target)));
        };
        names.push(&after[..close]);
        rest = &after[close + 1..];
    }
    Ok(names)
}

/// Parses a socket's `listen`: `IP:PORT`, `localhost:PORT` or `unix:/absolute/path`.
fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.contains('\0') {
            return Err(format!("{} contains a NUL byte", quote(s)));
        }
        if !path.starts_with('/') {
            return Err(format!(
                "{} needs an absolute path after \"unix:\"",
                quote(s)
            ));
        }
        if path.len() >= SUN_PATH_LEN {
            return Err(format!(
                "{}: the path is {} bytes long (at most {})",
                quote(s),
                path.len(),
                SUN_PATH_LEN - 1
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    let addr = match s.strip_prefix("localhost:") {
        Some(port) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => port
            .parse::<u16>()
            .ok()
            .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        Some(_) => None,
        None => s.parse::<SocketAddr>().ok(),
    };
    match addr {
        None => Err(format!(
            "{} is not a listen address (use \"IP:PORT\", \"localhost:PORT\" or \"unix:/absolute/path\")",
            quote(s)
        )),
        Some(addr) if addr.port() == 0 => Err(format!(
            "{}: port 0 is not allowed (every instance is handed the same listener, give it a fixed port)",
            quote(s)
        )),
        Some(addr) => Ok(ListenAddr::Tcp(addr)),
    }
}

/// A parsed `user`.
fn parse_user(s: &str) -> Option<UserSpec> {
    fn id(s: &str) -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u32>().ok().filter(|id| *id != u32::MAX)
    }
    if s == "dynamic" {
        return Some(UserSpec::Dynamic);
    }
    if let Some((uid, gid)) = s.split_once(':') {
        return Some(UserSpec::Id {
            uid: id(uid)?,
            gid: Some(id(gid)?),
        });
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Some(UserSpec::Id {
            uid: id(s)?,
            gid: None,
        });
    }
    let body = s.strip_suffix('$').unwrap_or(s);
    let b = body.as_bytes();
    let valid = b
        .first()
        .is_some_and(|c| c.is_ascii_lowercase() || *c == b'_')
        && b.len() <= 32
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    valid.then(|| UserSpec::Name(s.to_owned()))
}

/// A size as written, for messages: `"12XB"` or `-5`.
fn show_size(raw: &RawSize) -> String {
    match raw {
        RawSize::Bytes(n) => n.to_string(),
        RawSize::Text(s) => quote(s),
    }
}

/// A size limit for a message: `1TiB`, or `9223372036854775807 bytes`.
fn show_limit(bytes: u64) -> String {
    let text = format_size(bytes);
    if text.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{text} bytes")
    } else {
        text
    }
}

/// What is wrong with `argv` as a command, named under `field` (as `command` is checked;
/// `relative`: a relative program is found under an artifact's mount).
pub(super) fn command_errors(field: &str, argv: &[String], relative: bool) -> Vec<FieldError> {
    let mut check = Check::default();
    check.argv_relative(field, argv, relative);
    check.errors
}

/// What is wrong with `env` as an instance's environment, named under `field` (as `env` is
/// checked, with the variables of the spec's `ports` reserved).
pub(super) fn env_errors(
    field: &str,
    env: &BTreeMap<String, String>,
    port_names: &BTreeSet<&str>,
) -> Vec<FieldError> {
    let mut check = Check::default();
    check.env(field, Some(env), port_names);
    check.errors
}

impl RawSpec {
    /// Checks every field and fills in every default. On error, every problem found is
    /// reported, each naming its field, the value as given and the reason; nothing is
    /// returned then.
    pub fn validate(&self) -> Result<ServiceSpec, SpecError> {
        let mut check = Check::default();
        let spec = check.spec(self);
        if check.errors.is_empty() {
            Ok(spec)
        } else {
            Err(SpecError {
                errors: check.errors,
            })
        }
    }
}

/// Tasks an instance needs before its service forks anything: its init and the service's
/// process.
pub const INSTANCE_TASKS: u64 = 2;
/// Tasks an exec probe adds while it runs in the instance's cgroup: its helper (which joins
/// the namespaces) and the probe command.
pub const EXEC_PROBE_TASKS: u64 = 2;

/// The validation pass: errors found so far.
#[derive(Debug, Default)]
struct Check {
    errors: Vec<FieldError>,
}

impl Check {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// `resources.pids` leaves room for the instance's own tasks: below that the init
    /// cannot fork the service (or an exec probe cannot run), and every start would fail.
    fn pids_room(&mut self, resources: &Resources, health: Option<&HealthSpec>) {
        let Some(pids) = resources.pids else {
            return;
        };
        let exec = matches!(health.and_then(|h| h.probe.as_ref()), Some(Probe::Exec(_)));
        let (min, why) = if exec {
            (
                INSTANCE_TASKS + EXEC_PROBE_TASKS,
                "the instance's init, its service process, and an exec probe's helper and command while it runs",
            )
        } else {
            (
                INSTANCE_TASKS,
                "the instance's init and its service process",
            )
        };
        if pids < min {
            self.error(
                "resources.pids",
                format!(
                    "{pids} is below {min}, the least an instance needs: {why} each count as a task"
                ),
            );
        }
    }

    /// `n` within `range`, or the default when absent; `None` (reported) when out of range.
    fn integer(
        &mut self,
        field: &str,
        raw: Option<i64>,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<u32> {
        let n = raw.unwrap_or(default);
        if !range.contains(&n) {
            self.error(
                field,
                format!("{n} is out of range ({}..={})", range.start(), range.end()),
            );
            return None;
        }
        // Every range used here lies within u32.
        u32::try_from(n).ok()
    }

    /// A duration within `min..=max`, or the default when absent; `None` (reported) when
    /// unreadable or out of range.
    fn duration(
        &mut self,
        field: &str,
        raw: Option<&str>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let Some(text) = raw else {
            return Some(default);
        };
        let d = match parse_duration(text) {
            Ok(d) => d,
            Err(message) => {
                self.error(field, message);
                return None;
            }
        };
        if d.subsec_nanos() % 1_000_000 != 0 {
            self.error(
                field,
                format!(
                    "{} is not a whole number of milliseconds (the finest unit a spec takes)",
                    quote(text)
                ),
            );
            return None;
        }
        if d < min {
            self.error(
                field,
                format!("{} is shorter than {}", quote(text), format_duration(min)),
            );
            return None;
        }
        if d > max {
            self.error(
                field,
                format!("{} is longer than {}", quote(text), format_duration(max)),
            );
            return None;
        }
        Some(d)
    }

    /// A size within `min..=max`; `None` (reported) when unreadable or out of range.
    fn size(&mut self, field: &str, raw: &RawSize, min: u64, max: u64) -> Option<u64> {
        let bytes = match raw {
            RawSize::Bytes(n) => match u64::try_from(*n) {
                Ok(bytes) => bytes,
                Err(_) => {
                    self.error(field, format!("{n} is not a size (it is negative)"));
                    return None;
                }
            },
            RawSize::Text(s) => match parse_size(s) {
                Ok(bytes) => bytes,
                Err(message) => {
                    self.error(field, message);
                    return None;
                }
            },
        };
        if bytes < min {
            self.error(
                field,
                format!("{} is less than {}", show_size(raw), show_limit(min)),
            );
            return None;
        }
        if bytes > max {
            self.error(
                field,
                format!("{} is more than {}", show_size(raw), show_limit(max)),
            );
            return None;
        }
        Some(bytes)
    }

    /// An argv (`command`, `health.exec`): not empty, no NUL, `argv[0]` absolute or bare,
    /// within the kernel's limits with room to spare.
    fn argv(&mut self, field: &str, argv: &[String]) -> bool {
        self.argv_relative(field, argv, false)
    }

    /// An argv; with `relative`, its program may also be a relative path without `..`.
    fn argv_relative(&mut self, field: &str, argv: &[String], relative: bool) -> bool {
        let before = self.errors.len();
        let Some(program) = argv.first() else {
            self.error(
                field,
                "must not be empty (give the program and its arguments)",
            );
            return false;
        };
        for (i, arg) in argv.iter().enumerate() {
            if arg.contains('\0') {
                self.error(
                    format!("{field}[{i}]"),
                    format!("{} contains a NUL byte", quote(arg)),
                );
            }
        }
        if program.is_empty() {
            self.error(format!("{field}[0]"), "the program must not be empty");
        } else if relative && program.contains('/') && !program.starts_with('/') {
            if Path::new(program)
                .components()
                .any(|c| matches!(c, Component::ParentDir))
            {
                self.error(
                    format!("{field}[0]"),
                    format!(
                        "{} leaves artifact.mount (a relative program is found under it; no \"..\")",
                        quote(program)
                    ),
                );
            }
        } else if program.contains('/') && !program.starts_with('/') {
            self.error(
                format!("{field}[0]"),
                format!(
                    "{} is a relative path (use an absolute path, or a bare name looked up in PATH)",
                    quote(program)
                ),
            );
        }
        if argv.len() > MAX_ARGS {
            self.error(
                field,
                format!("has {} arguments (at most {MAX_ARGS})", argv.len()),
            );
        }
        let bytes: usize = argv.iter().map(|a| a.len() + 1).sum();
        if bytes > MAX_ARGV_BYTES {
            self.error(
                field,
                format!("is {bytes} bytes long (at most {MAX_ARGV_BYTES})"),
            );
        }
        self.errors.len() == before
    }

    fn spec(&mut self, raw: &RawSpec) -> ServiceSpec {
        let name = match raw.name.as_deref() {
            None => {
                self.error("name", "required");
                None
            }
            Some(name) if !valid_service_name(name) => {
                self.error(
                    "name",
                    format!(
                        "{} is not a valid name ([a-z0-9][a-z0-9-]{{0,62}})",
                        quote(name)
                    ),
                );
                None
            }
            Some(name) => Some(name.to_owned()),
        };

        let package = match validate_package(
            raw.artifact.as_ref(),
            raw.image.as_ref(),
            FetchPolicy::default(),
        ) {
            Ok(package) => package,
            Err(errors) => {
                self.errors.extend(errors);
                None
            }
        };
        // An image's config supplies the command when the spec gives none; an artifact's
        // command may be a path relative to where it is mounted.
        let from_image = raw.image.is_some();
        let command = match raw.command.as_deref() {
            None if from_image => Vec::new(),
            None => {
                self.error("command", "required");
                Vec::new()
            }
            Some([]) if from_image => Vec::new(),
            Some(argv) => {
                // With [artifact], a relative program is found under artifact.mount.
                self.argv_relative("command", argv, raw.artifact.is_some());
                argv.to_vec()
            }
        };

        let workdir = match raw.workdir.as_deref() {
            None => PathBuf::from("/"),
            Some(dir) => {
                if dir.contains('\0') {
                    self.error("workdir", format!("{} contains a NUL byte", quote(dir)));
                } else if !dir.starts_with('/') {
                    self.error("workdir", format!("{} is not an absolute path", quote(dir)));
                } else if dir.len() > MAX_PATH {
                    self.error(
                        "workdir",
                        format!("is {} bytes long (at most {MAX_PATH})", dir.len()),
                    );
                }
                PathBuf::from(dir)
            }
        };

        let user = raw.user.as_deref().and_then(|s| {
            let user = parse_user(s);
            if user.is_none() {
                self.error(
                    "user",
                    format!(
                        "{} is not a user name, uid or uid:gid (names match [a-z_][a-z0-9_-]{{0,31}}, ids are below 4294967295)",
                        quote(s)
                    ),
                );
            }
            user
        });

        let scale = raw.scale.as_ref().and_then(|s| self.scale(s));
        // Under [scale], replicas is the initial count: `min` unless written.
        let default_replicas = scale.map_or(1, |s| s.min);
        let replicas = self.integer(
            "replicas",
            raw.replicas,
            i64::from(default_replicas),
            0..=i64::from(MAX_REPLICAS),
        );
        let resources = self.resources(raw.resources.as_ref());
        let isolation = self.isolation(raw.isolation.as_ref(), name.as_deref());
        if isolation.private_tmp && (workdir == Path::new("/tmp") || workdir.starts_with("/tmp/")) {
            self.error(
                "workdir",
                format!(
                    "{} is under /tmp, which isolation.private_tmp replaces with an empty tmpfs inside the instance",
                    quote(&workdir.display().to_string())
                ),
            );
        }
        if isolation.userns && matches!(user, Some(UserSpec::Dynamic)) {
            self.error(
                "isolation.userns",
                "cannot be combined with user = \"dynamic\" (in a user namespace the instance's ids are already its own; use a name or uid inside it)",
            );
        }
        let ports = self.ports(raw.ports.as_ref(), replicas, &isolation);
        // Every port name written reserves its variable, valid or not.
        let port_names: BTreeSet<&str> = raw
            .ports
            .iter()
            .flat_map(|ports| ports.keys())
            .map(String::as_str)
            .collect();
        let env = self.env("env", raw.env.as_ref(), &port_names);
        let sockets = self.sockets(raw.sockets.as_deref());
        let restart = self.restart(raw.restart.as_ref());
        let health = raw
            .health
            .as_ref()
            .map(|health| self.health(health, &port_names, &sockets));
        if let Some(h) = &health
            && isolation.has(Namespace::Net)
            && let Some(Probe::Http(_) | Probe::Tcp(_) | Probe::Grpc(_)) = &h.probe
        {
            self.error(
                "health",
                "a network probe cannot reach an instance with its own network namespace (\"net\"); use exec or notify",
            );
        }
        self.pids_room(&resources, health.as_ref());
        let labels = raw.labels.clone().unwrap_or_default();
        self.errors.extend(super::labels::check_labels(&labels));
        let annotations = raw.annotations.clone().unwrap_or_default();
        self.errors
            .extend(super::labels::check_annotations(&annotations));
        let rollout = self.rollout(raw.rollout.as_ref());
        if let Some(s) = &scale {
            self.scale_needs(s, replicas, &sockets);
        }
        let stop = self.stop(raw.stop.as_ref());
        let logs = self.logs(raw.logs.as_ref());
        self.package_needs(raw, &isolation);
        let job = RawJobSections {
            kind: raw.kind.clone(),
            schedule: raw.schedule.clone(),
            job: raw.job.clone(),
        }
        .validate(raw)
        .unwrap_or_else(|errors| {
            self.errors.extend(errors);
            None
        });
        // A job's instances start with a run only, and a failed attempt is retried (up to
        // job.retries, which the run driver counts).
        let (replicas, restart) = match &job {
            Some(_) => (
                Some(0),
                RestartSpec {
                    policy: RestartPolicy::OnFailure,
                    ..restart
                },
            ),
            None => (replicas, restart),
        };

        ServiceSpec {
            name: name.unwrap_or_default(),
            command,
            env,
            workdir,
            user,
            replicas: replicas.unwrap_or(default_replicas),
            resources,
            isolation,
            ports,
            sockets,
            restart,
            health,
            rollout,
            scale,
            stop,
            logs,
            labels,
            annotations,
            package,
            job,
        }
    }

    /// What `[artifact]` and `[image]` need of the rest of the spec: their own mount
    /// namespace, and for an image a root the overlay replaces (not the read-only host).
    fn package_needs(&mut self, raw: &RawSpec, isolation: &Isolation) {
        for (present, section) in [
            (raw.artifact.is_some(), "artifact"),
            (raw.image.is_some(), "image"),
        ] {
            if present && !isolation.has(Namespace::Mount) {
                self.error(
                    section,
                    format!(
                        "[{section}] is mounted in the instance's own mount namespace: add \"mount\" to isolation.namespaces"
                    ),
                );
            }
        }
        if isolation.readonly_root && raw.image.as_ref().is_some_and(|i| i.persist == Some(true)) {
            self.error(
                "isolation.readonly_root",
                "with [image], a read-only root has no writable layer at all, so there is nothing for image.persist to keep: set one or the other",
            );
        }
    }

    /// A number of cores in `MIN_CPU..=MAX_CPU`.
    fn cores(&mut self, field: &str, cpu: f64) -> Option<f64> {
        if !cpu.is_finite() {
            self.error(field, format!("{cpu} is not a finite number"));
            None
        } else if !(MIN_CPU..=MAX_CPU).contains(&cpu) {
            self.error(
                field,
                format!("{cpu} is out of range ({MIN_CPU}..={MAX_CPU} cores)"),
            );
            None
        } else {
            Some(cpu)
        }
    }

    fn resources(&mut self, raw: Option<&RawResources>) -> Resources {
        let Some(raw) = raw else {
            return Resources::default();
        };
        let cpu = raw.cpu.and_then(|cpu| self.cores("resources.cpu", cpu));
        let memory = raw
            .memory
            .as_ref()
            .and_then(|memory| self.size("resources.memory", memory, MIN_MEMORY, i64::MAX as u64));
        let pids = raw.pids.and_then(|pids| {
            self.integer("resources.pids", Some(pids), 0, 1..=MAX_PIDS)
                .map(u64::from)
        });
        let nofile = raw.nofile.and_then(|nofile| {
            self.integer("resources.nofile", Some(nofile), 0, 1..=MAX_NOFILE)
                .map(u64::from)
        });
        Resources {
            cpu,
            memory,
            pids,
            nofile,
        }
    }

    /// One of the named `choices`, or an error naming them; `None` when not written (or
    /// wrong).
    fn choice<T: Copy>(
        &mut self,
        field: &str,
        raw: Option<&str>,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let written = raw?;
        match choices.iter().find(|(name, _)| *name == written) {
            Some((_, value)) => Some(*value),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| quote(n)).collect();
                self.error(
                    field,
                    format!("{} is not one of {}", quote(written), names.join(", ")),
                );
                None
            }
        }
    }

    fn isolation(&mut self, raw: Option<&RawIsolation>, name: Option<&str>) -> Isolation {
        let empty = RawIsolation::default();
        let raw = raw.unwrap_or(&empty);

        let mut namespaces = BTreeSet::new();
        match &raw.namespaces {
            None => namespaces.extend(DEFAULT_NAMESPACES),
            Some(names) => {
                for (i, ns_name) in names.iter().enumerate() {
                    let field = format!("isolation.namespaces[{i}]");
                    match Namespace::from_name(ns_name) {
                        None => self.error(
                            field,
                            format!(
                                "{} is not a namespace (use pid, mount, uts, ipc, net or cgroup)",
                                quote(ns_name)
                            ),
                        ),
                        Some(ns) if !namespaces.insert(ns) => {
                            self.error(field, format!("{} is listed twice", quote(ns_name)))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        if namespaces.contains(&Namespace::Pid) && !namespaces.contains(&Namespace::Mount) {
            self.error(
                "isolation.namespaces",
                "\"pid\" requires \"mount\" (the instance's /proc is remounted privately)",
            );
        }
        let has_mount = namespaces.contains(&Namespace::Mount);
        let has_uts = namespaces.contains(&Namespace::Uts);

        match &raw.hostname {
            Some(template) if !has_uts => self.error(
                "isolation.hostname",
                format!(
                    "{} needs the \"uts\" namespace (add it to isolation.namespaces)",
                    quote(template)
                ),
            ),
            Some(template) => {
                if let Err(message) = check_hostname_placeholders(template) {
                    self.error("isolation.hostname", message);
                } else if let Some(name) = name {
                    // The longest expansion is the one of the largest index any replica
                    // count allows (scaling does not check the template again); the first
                    // is checked too, for a template that is empty without placeholders.
                    for index in [0, MAX_INDEX] {
                        let host = expand_hostname(template, name, index);
                        if !valid_hostname(&host) {
                            self.error(
                                "isolation.hostname",
                                format!(
                                    "{} gives {} for instance {index}, not a valid hostname (1 to 64 of A-Z, a-z, 0-9, '-' and '.', not starting with '-')",
                                    quote(template),
                                    quote(&host)
                                ),
                            );
                            break;
                        }
                    }
                }
            }
            // The default, the instance id, always fits: see `expand_hostname`.
            None => {}
        }

        let private_tmp = match raw.private_tmp {
            Some(true) if !has_mount => {
                self.error(
                    "isolation.private_tmp",
                    "needs the \"mount\" namespace (add it to isolation.namespaces)",
                );
                false
            }
            Some(on) => on,
            None => has_mount,
        };

        let readonly_root = match raw.readonly_root {
            Some(true) if !has_mount => {
                self.error(
                    "isolation.readonly_root",
                    "needs the \"mount\" namespace (the read-only view is built in the instance's own mount table; add \"mount\" to isolation.namespaces)",
                );
                false
            }
            Some(on) => on,
            None => false,
        };

        let capabilities = raw.capabilities.as_ref().map(|names| {
            let mut set: Vec<Capability> = Vec::with_capacity(names.len());
            for (i, cap_name) in names.iter().enumerate() {
                let field = format!("isolation.capabilities[{i}]");
                match capability_by_name(cap_name) {
                    None => self.error(
                        field,
                        format!(
                            "{} is not a capability (use a name from capabilities(7), e.g. \"CAP_NET_BIND_SERVICE\" or \"net_bind_service\")",
                            quote(cap_name)
                        ),
                    ),
                    Some(cap) if set.contains(&cap) => {
                        self.error(field, format!("{} is listed twice ({cap})", quote(cap_name)))
                    }
                    Some(cap) => set.push(cap),
                }
            }
            set.sort_by_key(Capability::index);
            set
        });

        let seccomp = self
            .choice(
                "isolation.seccomp",
                raw.seccomp.as_deref(),
                &[
                    ("default", Seccomp::Default),
                    ("unconfined", Seccomp::Unconfined),
                ],
            )
            .unwrap_or(Seccomp::Default);
        let devices = self
            .choice(
                "isolation.devices",
                raw.devices.as_deref(),
                &[("minimal", Devices::Minimal), ("host", Devices::Host)],
            )
            .unwrap_or(Devices::Minimal);
        let system_paths = match self.choice(
            "isolation.system_paths",
            raw.system_paths.as_deref(),
            &[("masked", SystemPaths::Masked), ("host", SystemPaths::Host)],
        ) {
            Some(SystemPaths::Masked) if !has_mount => {
                self.error(
                    "isolation.system_paths",
                    "\"masked\" needs the \"mount\" namespace (the masks are mounts in the instance's own mount table; add \"mount\" to isolation.namespaces, or set \"host\")",
                );
                SystemPaths::Host
            }
            Some(choice) => choice,
            None if has_mount => SystemPaths::Masked,
            None => SystemPaths::Host,
        };
        let userns = match raw.userns {
            Some(true) if !has_mount => {
                self.error(
                    "isolation.userns",
                    "needs the \"mount\" namespace (the workdir is mapped into the user namespace in the instance's own mount table; add \"mount\" to isolation.namespaces)",
                );
                false
            }
            Some(on) => on,
            None => false,
        };

        Isolation {
            namespaces: namespaces.into_iter().collect(),
            // "{instance}" is the default itself: kept as absent, so a spec read back from
            // status (defaults filled in) is the same spec.
            hostname: raw.hostname.clone().filter(|t| t != DEFAULT_HOSTNAME),
            private_tmp,
            capabilities,
            readonly_root,
            seccomp,
            devices,
            system_paths,
            userns,
        }
    }

    fn ports(
        &mut self,
        raw: Option<&BTreeMap<String, RawPort>>,
        replicas: Option<u32>,
        isolation: &Isolation,
    ) -> BTreeMap<String, PortSpec> {
        let mut out = BTreeMap::new();
        let Some(raw) = raw else {
            return out;
        };
        if raw.len() > MAX_PORTS {
            self.error(
                "ports",
                format!("has {} entries (at most {MAX_PORTS})", raw.len()),
            );
        }
        let not_a_port =
            |shown: String| format!("{shown} is not a port (use \"auto\" or 1..=65535)");
        for (name, port) in raw {
            let field = child("ports", name);
            if !valid_port_name(name) {
                self.error(
                    &field,
                    format!(
                        "{} is not a valid port name ([a-z][a-z0-9_]{{0,31}})",
                        quote(name)
                    ),
                );
                continue;
            }
            let number = match port {
                RawPort::Text(text) if text == "auto" => {
                    out.insert(name.clone(), PortSpec::Auto);
                    continue;
                }
                RawPort::Text(text) => {
                    let number = Some(text)
                        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|t| t.parse::<u16>().ok())
                        .filter(|n| *n != 0);
                    match number {
                        Some(n) => n,
                        None => {
                            self.error(&field, not_a_port(quote(text)));
                            continue;
                        }
                    }
                }
                RawPort::Number(n) => match u16::try_from(*n).ok().filter(|n| *n != 0) {
                    Some(n) => n,
                    None => {
                        self.error(&field, not_a_port(n.to_string()));
                        continue;
                    }
                },
            };
            if let Some(replicas) = replicas.filter(|r| *r > 1)
                && !isolation.has(Namespace::Net)
            {
                self.error(
                    &field,
                    format!(
                        "fixed port {number} would collide between the {replicas} instances (use \"auto\", add \"net\" to isolation.namespaces, or share a [[sockets]] listener)"
                    ),
                );
                continue;
            }
            out.insert(name.clone(), PortSpec::Fixed(number));
        }
        out
    }

    fn env(
        &mut self,
        at: &str,
        raw: Option<&BTreeMap<String, String>>,
        port_names: &BTreeSet<&str>,
    ) -> BTreeMap<String, String> {
        let Some(raw) = raw else {
            return BTreeMap::new();
        };
        if raw.len() > MAX_ENV {
            self.error(at, format!("has {} entries (at most {MAX_ENV})", raw.len()));
        }
        for (key, value) in raw {
            let field = child(at, key);
            if key.is_empty() {
                self.error(&field, "the name is empty");
            } else if !valid_env_name(key) {
                self.error(
                    &field,
                    format!(
                        "{} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                        quote(key)
                    ),
                );
            } else if key.len() > MAX_ENV_NAME {
                self.error(
                    &field,
                    format!(
                        "the name is {} bytes long (at most {MAX_ENV_NAME})",
                        key.len()
                    ),
                );
            } else if key.starts_with("CORRAL_") {
                self.error(
                    &field,
                    format!(
                        "{} is reserved (the CORRAL_ prefix belongs to the agent)",
                        quote(key)
                    ),
                );
            } else if let Some((_, why)) = RESERVED_ENV.iter().find(|(k, _)| k == key) {
                self.error(&field, format!("{} is reserved ({why})", quote(key)));
            } else if let Some(port) = port_names.iter().find(|p| port_env_name(p) == *key) {
                self.error(
                    &field,
                    format!(
                        "{} is reserved (set by the agent from {})",
                        quote(key),
                        child("ports", port)
                    ),
                );
            }
            // Values are not quoted: they often hold secrets.
            if value.contains('\0') {
                self.error(&field, "the value contains a NUL byte");
            }
            if value.len() > MAX_ENV_VALUE {
                self.error(
                    &field,
                    format!(
                        "the value is {} bytes long (at most {MAX_ENV_VALUE})",
                        value.len()
                    ),
                );
            }
        }
        raw.clone()
    }

    fn sockets(&mut self, raw: Option<&[RawSocket]>) -> Vec<SocketSpec> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        if raw.len() > MAX_SOCKETS {
            self.error(
                "sockets",
                format!("has {} entries (at most {MAX_SOCKETS})", raw.len()),
            );
        }
        let mut out: Vec<SocketSpec> = Vec::new();
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut addrs: Vec<(ListenAddr, usize)> = Vec::new();
        for (i, socket) in raw.iter().enumerate() {
            let name_field = format!("sockets[{i}].name");
            let listen_field = format!("sockets[{i}].listen");
            let name = match socket.name.as_deref() {
                None => {
                    self.error(name_field, "required");
                    None
                }
                Some(name) if !valid_socket_name(name) => {
                    self.error(
                        name_field,
                        format!(
                            "{} is not a valid socket name ([A-Za-z0-9_.-]{{1,64}})",
                            quote(name)
                        ),
                    );
                    None
                }
                Some(name) => {
                    if let Some(first) = names.get(name) {
                        self.error(
                            name_field,
                            format!("{} is already the name of sockets[{first}]", quote(name)),
                        );
                    } else {
                        names.insert(name, i);
                    }
                    Some(name)
                }
            };
            let listen = match socket.listen.as_deref() {
                None => {
                    self.error(listen_field, "required");
                    None
                }
                Some(text) => match parse_listen(text) {
                    Err(message) => {
                        self.error(listen_field, message);
                        None
                    }
                    Ok(addr) => {
                        if let Some((_, first)) = addrs.iter().find(|(a, _)| *a == addr) {
                            self.error(
                                listen_field,
                                format!(
                                    "{} is already where sockets[{first}] listens",
                                    quote(text)
                                ),
                            );
                        } else {
                            addrs.push((addr.clone(), i));
                        }
                        Some(addr)
                    }
                },
            };
            if let (Some(name), Some(listen)) = (name, listen) {
                out.push(SocketSpec {
                    name: name.to_owned(),
                    listen,
                });
            }
        }
        out
    }

    fn restart(&mut self, raw: Option<&RawRestart>) -> RestartSpec {
        let empty = RawRestart::default();
        let raw = raw.unwrap_or(&empty);
        let policy = match raw.policy.as_deref() {
            None | Some("always") => RestartPolicy::Always,
            Some("on-failure") => RestartPolicy::OnFailure,
            Some("never") => RestartPolicy::Never,
            Some(other) => {
                self.error(
                    "restart.policy",
                    format!(
                        "{} is not a policy (use always, on-failure or never)",
                        quote(other)
                    ),
                );
                RestartPolicy::Always
            }
        };
        let backoff = self.duration(
            "restart.backoff",
            raw.backoff.as_deref(),
            DEFAULT_BACKOFF,
            MIN_BACKOFF,
            HOUR,
        );
        let backoff_max = self.duration(
            "restart.backoff_max",
            raw.backoff_max.as_deref(),
            DEFAULT_BACKOFF_MAX,
            MIN_BACKOFF,
            HOUR,
        );
        if let (Some(backoff), Some(max)) = (backoff, backoff_max)
            && backoff > max
        {
            self.error(
                "restart.backoff",
                format!(
                    "{} is longer than restart.backoff_max ({})",
                    shown_duration(raw.backoff.as_deref(), backoff),
                    format_duration(max)
                ),
            );
        }
        RestartSpec {
            policy,
            backoff: backoff.unwrap_or(DEFAULT_BACKOFF),
            backoff_max: backoff_max.unwrap_or(DEFAULT_BACKOFF_MAX),
        }
    }

    fn probe_target(
        &mut self,
        field: &str,
        target: &str,
        port_names: &BTreeSet<&str>,
        sockets: &[SocketSpec],
    ) {
        if target.contains('\0') {
            self.error(field, format!("{} contains a NUL byte", quote(target)));
            return;
        }
        let names = match port_placeholders(target) {
            Ok(names) => names,
            Err(message) => {
                self.error(field, message);
                return;
            }
        };
        for name in names.into_iter().filter(|n| !port_names.contains(n)) {
            self.error(field, undefined_port(name, port_names));
        }
        // A literal port that is an agent-owned socket would reach any instance.
        let authority = match target.strip_prefix("http://") {
            Some(rest) => rest.split(['/', '?', '#']).next().unwrap_or(rest),
            None => target,
        };
        let port = match authority.rsplit_once(':') {
            Some((_, port)) => port.parse::<u16>().ok(),
            None if target.starts_with("http://") => Some(80),
            None => None,
        };
        if let Some(port) = port {
            for socket in sockets {
                if let ListenAddr::Tcp(addr) = &socket.listen
                    && addr.port() == port
                {
                    self.error(
                        field,
                        format!(
                            "{}: port {port} is the shared socket {} (a probe must reach one instance; probe a [ports] port instead)",
                            quote(target),
                            quote(&socket.name)
                        ),
                    );
                }
            }
        }
    }

    /// `host:port` where port is digits or a `{port.NAME}` placeholder.
    fn host_port(&mut self, field: &str, target: &str) -> bool {
        let ok = target.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && ((!port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && port.parse::<u16>().is_ok_and(|p| p != 0))
                    || (port.starts_with("{port.") && port.ends_with('}')))
        });
        if !ok {
            self.error(
                field,
                format!(
                    "{} is not host:port (e.g. \"127.0.0.1:{{port.admin}}\")",
                    quote(target)
                ),
            );
        }
        ok
    }

    fn health(
        &mut self,
        raw: &RawHealth,
        port_names: &BTreeSet<&str>,
        sockets: &[SocketSpec],
    ) -> HealthSpec {
        let notify = raw.notify.unwrap_or(false);
        let set: Vec<&str> = [
            ("http", raw.http.is_some()),
            ("tcp", raw.tcp.is_some()),
            ("grpc", raw.grpc.is_some()),
            ("exec", raw.exec.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, is_set)| is_set.then_some(kind))
        .collect();
        match set.as_slice() {
            [] if !notify => self.error(
                "health",
                "no probe (set one of http, tcp, grpc or exec, or notify = true)",
            ),
            [] | [_] => {}
            [first, second] => self.error(
                "health",
                format!(
                    "{first} and {second} are both set (use exactly one of http, tcp, grpc, exec)"
                ),
            ),
            [init @ .., last] => self.error(
                "health",
                format!(
                    "{} and {last} are all set (use exactly one of http, tcp, grpc, exec)",
                    init.join(", ")
                ),
            ),
        }

        if let Some(url) = &raw.http {
            let authority = url
                .strip_prefix("http://")
                .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(rest));
            match authority {
                None => self.error(
                    "health.http",
                    format!("{} does not start with http://", quote(url)),
                ),
                Some("") => self.error("health.http", format!("{} has no host", quote(url))),
                Some(_) => self.probe_target("health.http", url, port_names, sockets),
            }
        }
        if let Some(target) = &raw.tcp
            && self.host_port("health.tcp", target)
        {
            self.probe_target("health.tcp", target, port_names, sockets);
        }
        if let Some(target) = &raw.grpc {
            // `host:port`, or `host:port/package.Service` for the name to ask grpc.health about.
            let (addr, service) = match target.split_once('/') {
                Some((a, s)) => (a, Some(s)),
                None => (target.as_str(), None),
            };
            if let Some(service) = service
                && (service.is_empty()
                    || !service
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_'))
            {
                self.error(
                    "health.grpc",
                    format!(
                        "{} has a bad service name after / (use letters, digits, . and _)",
                        quote(target)
                    ),
                );
            }
            if self.host_port("health.grpc", addr) {
                self.probe_target("health.grpc", target, port_names, sockets);
            }
        }
        if let Some(argv) = &raw.exec
            && self.argv("health.exec", argv)
        {
            for (i, arg) in argv.iter().enumerate() {
                let field = format!("health.exec[{i}]");
                match port_placeholders(arg) {
                    Err(message) => self.error(field, message),
                    Ok(names) => {
                        for name in names.into_iter().filter(|n| !port_names.contains(n)) {
                            self.error(&field, undefined_port(name, port_names));
                        }
                    }
                }
            }
        }

        let probe = if set.len() == 1 {
            raw.http
                .clone()
                .map(Probe::Http)
                .or_else(|| raw.tcp.clone().map(Probe::Tcp))
                .or_else(|| raw.grpc.clone().map(Probe::Grpc))
                .or_else(|| raw.exec.clone().map(Probe::Exec))
        } else {
            None
        };

        let interval = self.duration(
            "health.interval",
            raw.interval.as_deref(),
            DEFAULT_INTERVAL,
            MIN_INTERVAL,
            HOUR,
        );
        let timeout = self.duration(
            "health.timeout",
            raw.timeout.as_deref(),
            DEFAULT_TIMEOUT.min(interval.unwrap_or(DEFAULT_INTERVAL)),
            MIN_TIMEOUT,
            HOUR,
        );
        if let (Some(interval), Some(timeout)) = (interval, timeout)
            && timeout > interval
        {
            self.error(
                "health.timeout",
                format!(
                    "{} is longer than health.interval ({})",
                    shown_duration(raw.timeout.as_deref(), timeout),
                    format_duration(interval)
                ),
            );
        }
        let start_period = self.duration(
            "health.start_period",
            raw.start_period.as_deref(),
            DEFAULT_START_PERIOD,
            Duration::ZERO,
            DAY,
        );
        let failure_threshold = self.integer(
            "health.failure_threshold",
            raw.failure_threshold,
            DEFAULT_FAILURE_THRESHOLD,
            1..=MAX_THRESHOLD,
        );
        let success_threshold = self.integer(
            "health.success_threshold",
            raw.success_threshold,
            DEFAULT_SUCCESS_THRESHOLD,
            1..=MAX_THRESHOLD,
        );
        HealthSpec {
            probe,
            interval: interval.unwrap_or(DEFAULT_INTERVAL),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            start_period: start_period.unwrap_or(DEFAULT_START_PERIOD),
            failure_threshold: failure_threshold.unwrap_or(3),
            success_threshold: success_threshold.unwrap_or(1),
            restart_on_failure: raw.restart_on_failure.unwrap_or(true),
            notify,
        }
    }

    fn rollout(&mut self, raw: Option<&RawRollout>) -> RolloutSpec {
        let empty = RawRollout::default();
        let raw = raw.unwrap_or(&empty);
        let max_surge = self.integer(
            "rollout.max_surge",
            raw.max_surge,
            DEFAULT_MAX_SURGE,
            0..=i64::from(MAX_REPLICAS),
        );
        let max_unavailable = self.integer(
            "rollout.max_unavailable",
            raw.max_unavailable,
            DEFAULT_MAX_UNAVAILABLE,
            0..=i64::from(MAX_REPLICAS),
        );
        if max_surge == Some(0) && max_unavailable == Some(0) {
            self.error(
                "rollout",
                "max_surge and max_unavailable are both 0 (a rollout could never replace an instance)",
            );
        }
        let min_healthy = self.duration(
            "rollout.min_healthy",
            raw.min_healthy.as_deref(),
            DEFAULT_MIN_HEALTHY,
            Duration::ZERO,
            HOUR,
        );
        let healthy_deadline = self.duration(
            "rollout.healthy_deadline",
            raw.healthy_deadline.as_deref(),
            DEFAULT_HEALTHY_DEADLINE,
            MIN_HEALTHY_DEADLINE,
            DAY,
        );
        if let (Some(min), Some(deadline)) = (min_healthy, healthy_deadline)
            && deadline < min
        {
            self.error(
                "rollout.healthy_deadline",
                format!(
                    "{} is shorter than rollout.min_healthy ({})",
                    shown_duration(raw.healthy_deadline.as_deref(), deadline),
                    format_duration(min)
                ),
            );
        }
        RolloutSpec {
            max_surge: max_surge.unwrap_or(1),
            max_unavailable: max_unavailable.unwrap_or(0),
            min_healthy: min_healthy.unwrap_or(DEFAULT_MIN_HEALTHY),
            healthy_deadline: healthy_deadline.unwrap_or(DEFAULT_HEALTHY_DEADLINE),
            auto_rollback: raw.auto_rollback.unwrap_or(true),
            start_cpu: raw
                .start_cpu
                .and_then(|cpu| self.cores("rollout.start_cpu", cpu)),
        }
    }

    fn stop(&mut self, raw: Option<&RawStop>) -> StopSpec {
        let empty = RawStop::default();
        let raw = raw.unwrap_or(&empty);
        let name = raw.signal.as_deref().unwrap_or(DEFAULT_STOP_SIGNAL);
        let (signal, signal_name) = match signal_by_name(name) {
            None => {
                self.error(
                    "stop.signal",
                    format!(
                        "{} is not a signal name (use e.g. SIGTERM, SIGINT, SIGQUIT, SIGHUP or SIGKILL)",
                        quote(name)
                    ),
                );
                (0, DEFAULT_STOP_SIGNAL)
            }
            Some((_, "SIGSTOP")) => {
                self.error(
                    "stop.signal",
                    format!("{} would pause the instance, not stop it", quote(name)),
                );
                (0, DEFAULT_STOP_SIGNAL)
            }
            Some(found) => found,
        };
        let grace = self.duration(
            "stop.grace",
            raw.grace.as_deref(),
            DEFAULT_GRACE,
            Duration::ZERO,
            HOUR,
        );
        StopSpec {
            signal,
            signal_name: signal_name.to_owned(),
            grace: grace.unwrap_or(DEFAULT_GRACE),
        }
    }

    fn logs(&mut self, raw: Option<&RawLogs>) -> LogSpec {
        let max_size = raw
            .and_then(|raw| raw.max_size.as_ref())
            .map_or(Some(DEFAULT_LOG_SIZE), |size| {
                self.size("logs.max_size", size, MIN_LOG_SIZE, MAX_LOG_SIZE)
            });
        let max_files = self.integer(
            "logs.max_files",
            raw.and_then(|raw| raw.max_files),
            DEFAULT_LOG_FILES,
            1..=MAX_LOG_FILES,
        );
        LogSpec {
            max_size: max_size.unwrap_or(DEFAULT_LOG_SIZE),
            max_files: max_files.unwrap_or(5),
        }
    }
}

/// Why `{port.NAME}` is refused when `name` is not in `[ports]`.
fn undefined_port(name: &str, port_names: &BTreeSet<&str>) -> String {
    let defined = if port_names.is_empty() {
        "[ports] is empty".to_owned()
    } else {
        let list: Vec<&str> = port_names.iter().copied().collect();
        format!("[ports] has {}", list.join(", "))
    };
    format!(
        "{} names no port ({defined})",
        quote(&format!("{{port.{name}}}"))
    )
}

/// A duration for a message: as written when written, else as formatted.
fn shown_duration(raw: Option<&str>, value: Duration) -> String {
    raw.map_or_else(|| format_duration(value), quote)
}
