//! TOML text to [`RawSpec`]. The document is parsed into a generic table and walked by hand,
//! so that every unknown key and every wrongly typed value is reported, not only the first.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::artifact::{RawArtifact, RawImage};
use super::error::{FieldError, SpecError, child};
use super::job::{JOB_KEYS, RawJob, RawSchedule, SCHEDULE_KEYS};
use super::types::{
    RawHealth, RawIsolation, RawLogs, RawPort, RawResources, RawRestart, RawRollout, RawScale,
    RawSize, RawSocket, RawSpec, RawStop,
};

/// The field of an error that is about the TOML syntax itself.
pub const SYNTAX_FIELD: &str = "(toml)";

/// The top-level keys of a spec file.
pub const TOP_KEYS: &[&str] = &[
    "name",
    "command",
    "env",
    "workdir",
    "user",
    "replicas",
    "resources",
    "isolation",
    "ports",
    "sockets",
    "restart",
    "health",
    "rollout",
    "scale",
    "stop",
    "logs",
    "artifact",
    "image",
    "labels",
    "annotations",
    "kind",
    "schedule",
    "job",
];
const RESOURCES_KEYS: &[&str] = &["cpu", "memory", "pids", "nofile"];
const ISOLATION_KEYS: &[&str] = &[
    "namespaces",
    "hostname",
    "private_tmp",
    "capabilities",
    "readonly_root",
    "seccomp",
    "devices",
    "system_paths",
    "userns",
];
const SOCKET_KEYS: &[&str] = &["name", "listen"];
const RESTART_KEYS: &[&str] = &["policy", "backoff", "backoff_max"];
const HEALTH_KEYS: &[&str] = &[
    "http",
    "tcp",
    "grpc",
    "exec",
    "interval",
    "timeout",
    "start_period",
    "failure_threshold",
    "success_threshold",
    "restart_on_failure",
    "notify",
];
const SCALE_KEYS: &[&str] = &[
    "min",
    "max",
    "target_connections",
    "target_cpu",
    "idle_after",
    "scale_down_delay",
];
const ROLLOUT_KEYS: &[&str] = &[
    "max_surge",
    "max_unavailable",
    "min_healthy",
    "healthy_deadline",
    "auto_rollback",
    "start_cpu",
];
const STOP_KEYS: &[&str] = &["signal", "grace"];
const LOGS_KEYS: &[&str] = &["max_size", "max_files"];
const ARTIFACT_KEYS: &[&str] = &["url", "sha256", "format", "mount"];
const IMAGE_KEYS: &[&str] = &["url", "digest", "persist"];

/// Reads a spec file into a [`RawSpec`], reporting a syntax error, every unknown field and
/// every value of the wrong type. Values are not checked: see [`RawSpec::validate`].
pub fn read_toml(text: &str) -> Result<RawSpec, SpecError> {
    let outcome = read(text);
    if outcome.errors.is_empty() {
        Ok(outcome.raw)
    } else {
        Err(SpecError {
            errors: outcome.errors,
        })
    }
}

/// What reading found: the fields that could be read, the problems, and the fields left out
/// of `raw` because of a problem (so that validation does not also call them missing).
#[derive(Debug, Default)]
pub(super) struct ReadOutcome {
    pub raw: RawSpec,
    pub errors: Vec<FieldError>,
    pub dropped: Vec<String>,
    /// The text is not TOML at all; `raw` is empty.
    pub syntax_error: bool,
}

impl ReadOutcome {
    /// Whether a validation error about `field` follows from a field dropped while reading:
    /// the field itself or something inside it.
    pub fn explains(&self, field: &str) -> bool {
        self.dropped.iter().any(|dropped| {
            field
                .strip_prefix(dropped.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

pub(super) fn read(text: &str) -> ReadOutcome {
    let table = match text.parse::<Table>() {
        Ok(table) => table,
        Err(error) => {
            let message = match error.span() {
                Some(span) => {
                    let (line, column) = position(text, span.start);
                    let why = integer_overflow(text, span.start, error.message())
                        .unwrap_or_else(|| error.message().to_owned());
                    format!("line {line}, column {column}: {why}")
                }
                None => error.message().to_owned(),
            };
            return ReadOutcome {
                errors: vec![FieldError::new(
                    SYNTAX_FIELD,
                    message.trim_end().replace('\n', "; "),
                )],
                syntax_error: true,
                ..ReadOutcome::default()
            };
        }
    };
    let mut reader = Reader::default();
    let raw = reader.spec(&table);
    ReadOutcome {
        raw,
        errors: reader.errors,
        dropped: reader.dropped,
        syntax_error: false,
    }
}

/// The TOML reader keeps integers in an i64 and words a larger one as a type error about
/// i128 ("invalid type: integer `N` as i128, expected any valid TOML value"). Says what it
/// is instead, with the key it was written for when the line shows it.
fn integer_overflow(text: &str, offset: usize, message: &str) -> Option<String> {
    let number = message
        .strip_prefix("invalid type: integer `")?
        .split_once('`')?
        .0;
    let range = format!(
        "is out of range (a TOML integer is 64-bit: {} to {})",
        i64::MIN,
        i64::MAX
    );
    Some(match key_at(text, offset) {
        Some(key) => format!("{key} = {number} {range}"),
        None => format!("{number} {range}"),
    })
}

/// The path of the key whose value starts at byte `offset`, as errors name fields
/// (`resources.pids`, `sockets[1].listen`), when its line is a plain `key = value` under a
/// plain table header. Best effort, for messages only.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = before[line_start..].rsplit_once('=')?;
    let key = key.trim();
    let bare = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    };
    if !bare(key) {
        return None;
    }
    let mut table = String::new();
    let mut arrays: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text[..line_start].lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split_once("]]")) {
            let name = name.0.trim();
            let n = arrays.entry(name).or_default();
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split_once(']')) {
            table = name.0.trim().to_owned();
        }
    }
    if table.is_empty() {
        Some(key.to_owned())
    } else if table.split('.').all(bare) || table.ends_with(']') {
        Some(format!("{table}.{key}"))
    } else {
        None
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let before = &bytes[..offset.min(bytes.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The TOML type of `value`, with its article, for "expected X, found Y".
fn kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

#[derive(Debug, Default)]
struct Reader {
    errors: Vec<FieldError>,
    dropped: Vec<String>,
}

impl Reader {
    fn expected<T>(&mut self, path: &str, what: &str, found: &Value) -> Option<T> {
        self.errors.push(FieldError::new(
            path,
            format!("expected {what}, found {}", kind(found)),
        ));
        None
    }

    fn known_keys(&mut self, table: &Table, parent: &str, keys: &[&str]) {
        for key in table.keys() {
            if !keys.contains(&key.as_str()) {
                self.errors.push(FieldError::new(
                    child(parent, key),
                    format!("unknown field (expected one of {})", keys.join(", ")),
                ));
            }
        }
    }

    /// Reads `table[key]` with `convert`; a value that cannot be read is reported by
    /// `convert` and recorded as dropped.
    fn field<T>(
        &mut self,
        table: &Table,
        parent: &str,
        key: &str,
        convert: impl FnOnce(&mut Reader, &str, &Value) -> Option<T>,
    ) -> Option<T> {
        let value = table.get(key)?;
        let path = child(parent, key);
        let out = convert(self, &path, value);
        if out.is_none() {
            self.dropped.push(path);
        }
        out
    }

    fn section<T>(
        &mut self,
        table: &Table,
        key: &str,
        read: impl FnOnce(&mut Reader, &str, &Table) -> T,
    ) -> Option<T> {
        self.field(table, "", key, |r, path, value| match value {
            Value::Table(section) => Some(read(r, path, section)),
            other => r.expected(path, "a table", other),
        })
    }

    fn string(&mut self, path: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            other => self.expected(path, "a string", other),
        }
    }

    fn integer(&mut self, path: &str, value: &Value) -> Option<i64> {
        match value {
            Value::Integer(i) => Some(*i),
            other => self.expected(path, "an integer", other),
        }
    }

    fn number(&mut self, path: &str, value: &Value) -> Option<f64> {
        match value {
            Value::Float(f) => Some(*f),
            // Every integer a cpu count could be is exact as f64; larger ones are refused
            // by validation anyway.
            Value::Integer(i) => Some(*i as f64),
            other => self.expected(path, "a number", other),
        }
    }

    fn boolean(&mut self, path: &str, value: &Value) -> Option<bool> {
        match value {
            Value::Boolean(b) => Some(*b),
            other => self.expected(path, "a boolean", other),
        }
    }

    fn duration(&mut self, path: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            other => self.expected(path, "a duration string such as \"10s\"", other),
        }
    }

    fn size(&mut self, path: &str, value: &Value) -> Option<RawSize> {
        match value {
            Value::Integer(i) => Some(RawSize::Bytes(*i)),
            Value::String(s) => Some(RawSize::Text(s.clone())),
            other => self.expected(
                path,
                "a size (an integer number of bytes or a string such as \"256MiB\")",
                other,
            ),
        }
    }

    /// An array of strings; any element of another type drops the whole array.
    fn strings(&mut self, path: &str, value: &Value) -> Option<Vec<String>> {
        let Value::Array(items) = value else {
            return self.expected(path, "an array of strings", value);
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(&format!("{path}[{i}]"), item) {
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A table whose every value is read with `convert`; entries that cannot be read are
    /// left out and recorded as dropped.
    fn map<T>(
        &mut self,
        path: &str,
        value: &Value,
        what: &str,
        mut convert: impl FnMut(&mut Reader, &str, &Value) -> Option<T>,
    ) -> Option<BTreeMap<String, T>> {
        let Value::Table(table) = value else {
            return self.expected(path, what, value);
        };
        let mut out = BTreeMap::new();
        for (key, item) in table {
            let item_path = child(path, key);
            match convert(self, &item_path, item) {
                Some(v) => {
                    out.insert(key.clone(), v);
                }
                None => self.dropped.push(item_path),
            }
        }
        Some(out)
    }

    fn port(&mut self, path: &str, value: &Value) -> Option<RawPort> {
        match value {
            Value::Integer(i) => Some(RawPort::Number(*i)),
            Value::String(s) => Some(RawPort::Text(s.clone())),
            other => self.expected(path, "\"auto\" or a port number", other),
        }
    }

    fn spec(&mut self, t: &Table) -> RawSpec {
        self.known_keys(t, "", TOP_KEYS);
        RawSpec {
            name: self.field(t, "", "name", Self::string),
            command: self.field(t, "", "command", Self::strings),
            env: self.field(t, "", "env", |r, path, v| {
                r.map(path, v, "a table of strings", Self::string)
            }),
            workdir: self.field(t, "", "workdir", Self::string),
            user: self.field(t, "", "user", Self::string),
            replicas: self.field(t, "", "replicas", Self::integer),
            resources: self.section(t, "resources", Self::resources),
            isolation: self.section(t, "isolation", Self::isolation),
            ports: self.field(t, "", "ports", |r, path, v| {
                r.map(path, v, "a table of ports", Self::port)
            }),
            sockets: self.field(t, "", "sockets", Self::sockets),
            restart: self.section(t, "restart", Self::restart),
            health: self.section(t, "health", Self::health),
            rollout: self.section(t, "rollout", Self::rollout),
            scale: self.section(t, "scale", Self::scale),
            stop: self.section(t, "stop", Self::stop),
            logs: self.section(t, "logs", Self::logs),
            labels: self.field(t, "", "labels", |r, path, v| {
                r.map(path, v, "a table of strings", Self::string)
            }),
            annotations: self.field(t, "", "annotations", |r, path, v| {
                r.map(path, v, "a table of strings", Self::string)
            }),
            artifact: self.section(t, "artifact", Self::artifact),
            image: self.section(t, "image", Self::image),
            kind: self.field(t, "", "kind", Self::string),
            schedule: self.section(t, "schedule", Self::schedule),
            job: self.section(t, "job", Self::job),
        }
    }

    fn schedule(&mut self, p: &str, t: &Table) -> RawSchedule {
        self.known_keys(t, p, SCHEDULE_KEYS);
        RawSchedule {
            cron: self.field(t, p, "cron", Self::string),
            timezone: self.field(t, p, "timezone", Self::string),
            concurrency: self.field(t, p, "concurrency", Self::string),
            catch_up: self.field(t, p, "catch_up", Self::duration),
            jitter: self.field(t, p, "jitter", Self::duration),
        }
    }

    fn job(&mut self, p: &str, t: &Table) -> RawJob {
        self.known_keys(t, p, JOB_KEYS);
        RawJob {
            timeout: self.field(t, p, "timeout", Self::duration),
            retries: self.field(t, p, "retries", Self::integer),
            parallelism: self.field(t, p, "parallelism", Self::integer),
            history: self.field(t, p, "history", Self::integer),
        }
    }

    fn artifact(&mut self, p: &str, t: &Table) -> RawArtifact {
        self.known_keys(t, p, ARTIFACT_KEYS);
        RawArtifact {
            url: self.field(t, p, "url", Self::string),
            sha256: self.field(t, p, "sha256", Self::string),
            format: self.field(t, p, "format", Self::string),
            mount: self.field(t, p, "mount", Self::string),
        }
    }

    fn image(&mut self, p: &str, t: &Table) -> RawImage {
        self.known_keys(t, p, IMAGE_KEYS);
        RawImage {
            url: self.field(t, p, "url", Self::string),
            digest: self.field(t, p, "digest", Self::string),
            persist: self.field(t, p, "persist", Self::boolean),
        }
    }

    fn resources(&mut self, p: &str, t: &Table) -> RawResources {
        self.known_keys(t, p, RESOURCES_KEYS);
        RawResources {
            cpu: self.field(t, p, "cpu", Self::number),
            memory: self.field(t, p, "memory", Self::size),
            pids: self.field(t, p, "pids", Self::integer),
            nofile: self.field(t, p, "nofile", Self::integer),
        }
    }

    fn isolation(&mut self, p: &str, t: &Table) -> RawIsolation {
        self.known_keys(t, p, ISOLATION_KEYS);
        RawIsolation {
            namespaces: self.field(t, p, "namespaces", Self::strings),
            hostname: self.field(t, p, "hostname", Self::string),
            private_tmp: self.field(t, p, "private_tmp", Self::boolean),
            capabilities: self.field(t, p, "capabilities", Self::strings),
            readonly_root: self.field(t, p, "readonly_root", Self::boolean),
            seccomp: self.field(t, p, "seccomp", Self::string),
            devices: self.field(t, p, "devices", Self::string),
            system_paths: self.field(t, p, "system_paths", Self::string),
            userns: self.field(t, p, "userns", Self::boolean),
        }
    }

    /// `[[sockets]]`. An entry that is not a table is reported and kept as an empty entry,
    /// so that later entries keep their index.
    fn sockets(&mut self, path: &str, value: &Value) -> Option<Vec<RawSocket>> {
        let Value::Array(items) = value else {
            return self.expected(path, "an array of tables ([[sockets]])", value);
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            match item {
                Value::Table(t) => {
                    self.known_keys(t, &item_path, SOCKET_KEYS);
                    out.push(RawSocket {
                        name: self.field(t, &item_path, "name", Self::string),
                        listen: self.field(t, &item_path, "listen", Self::string),
                    });
                }
                other => {
                    self.expected::<()>(&item_path, "a table", other);
                    self.dropped.push(item_path);
                    out.push(RawSocket::default());
                }
            }
        }
        Some(out)
    }

    fn restart(&mut self, p: &str, t: &Table) -> RawRestart {
        self.known_keys(t, p, RESTART_KEYS);
        RawRestart {
            policy: self.field(t, p, "policy", Self::string),
            backoff: self.field(t, p, "backoff", Self::duration),
            backoff_max: self.field(t, p, "backoff_max", Self::duration),
        }
    }

    fn health(&mut self, p: &str, t: &Table) -> RawHealth {
        self.known_keys(t, p, HEALTH_KEYS);
        RawHealth {
            http: self.field(t, p, "http", Self::string),
            tcp: self.field(t, p, "tcp", Self::string),
            grpc: self.field(t, p, "grpc", Self::string),
            exec: self.field(t, p, "exec", Self::strings),
            interval: self.field(t, p, "interval", Self::duration),
            timeout: self.field(t, p, "timeout", Self::duration),
            start_period: self.field(t, p, "start_period", Self::duration),
            failure_threshold: self.field(t, p, "failure_threshold", Self::integer),
            success_threshold: self.field(t, p, "success_threshold", Self::integer),
            restart_on_failure: self.field(t, p, "restart_on_failure", Self::boolean),
            notify: self.field(t, p, "notify", Self::boolean),
        }
    }

    fn rollout(&mut self, p: &str, t: &Table) -> RawRollout {
        self.known_keys(t, p, ROLLOUT_KEYS);
        RawRollout {
            max_surge: self.field(t, p, "max_surge", Self::integer),
            max_unavailable: self.field(t, p, "max_unavailable", Self::integer),
            min_healthy: self.field(t, p, "min_healthy", Self::duration),
            healthy_deadline: self.field(t, p, "healthy_deadline", Self::duration),
            auto_rollback: self.field(t, p, "auto_rollback", Self::boolean),
            start_cpu: self.field(t, p, "start_cpu", Self::number),
        }
    }

    fn scale(&mut self, p: &str, t: &Table) -> RawScale {
        self.known_keys(t, p, SCALE_KEYS);
        RawScale {
            min: self.field(t, p, "min", Self::integer),
            max: self.field(t, p, "max", Self::integer),
            target_connections: self.field(t, p, "target_connections", Self::integer),
            target_cpu: self.field(t, p, "target_cpu", Self::number),
            idle_after: self.field(t, p, "idle_after", Self::duration),
            scale_down_delay: self.field(t, p, "scale_down_delay", Self::duration),
        }
    }

    fn stop(&mut self, p: &str, t: &Table) -> RawStop {
        self.known_keys(t, p, STOP_KEYS);
        RawStop {
            signal: self.field(t, p, "signal", Self::string),
            grace: self.field(t, p, "grace", Self::duration),
        }
    }

    fn logs(&mut self, p: &str, t: &Table) -> RawLogs {
        self.known_keys(t, p, LOGS_KEYS);
        RawLogs {
            max_size: self.field(t, p, "max_size", Self::size),
            max_files: self.field(t, p, "max_files", Self::integer),
        }
    }
}
