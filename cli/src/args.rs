//! The command line: every flag, argument and subcommand of `corral`, parsed by clap.
//!
//! Pure declarations; nothing here talks to the agent or touches the file system. A value clap
//! cannot parse (an unknown flag, a missing NAME, `-o yaml`, a replica count that is not a
//! number) is a usage error and ends the process with exit code 2.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where `corral` looks for the agent when neither `--addr` nor `CORRAL_ADDR` is given.
pub const DEFAULT_ADDR: &str = "unix:///run/corral/corral.sock";

/// corral: drive corrald, the node agent, over its API — locally through its Unix socket, or
/// remotely over TLS.
#[derive(Debug, Parser)]
#[command(name = "corral", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnectArgs,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the agent.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The agent's address: unix:///PATH (the local socket) or https://HOST:PORT.
    #[arg(long, env = "CORRAL_ADDR", default_value = DEFAULT_ADDR, global = true)]
    pub addr: String,

    /// CA certificate (PEM) that signed the agent's certificate; required for https://.
    #[arg(long, env = "CORRAL_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for https://; its subject OU gives the role (read or admin).
    #[arg(
        long,
        env = "CORRAL_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the client certificate.
    #[arg(
        long,
        env = "CORRAL_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert",
        global = true
    )]
    pub tls_key: Option<PathBuf>,
}

/// Output formats of `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns and text for people.
    Table,
    /// One JSON document per command, for scripts; `logs`, `events` and `top` print JSON Lines
    /// (one document per line: per record, per event, per frame).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update services from spec files.
    ///
    /// Each file's TOML text is sent to the agent as it is; the agent validates it. With a
    /// directory, every *.toml file directly inside it is applied in name order; a failure is
    /// reported and the others are still applied. With several -f (or --atomic), every file
    /// given (directories expanded) is sent in one ApplyBatch call: all are validated first and
    /// either all are applied or none is; an error names the file it is about. With `-o json`
    /// the result is an array with one entry per file.
    ///
    /// A change other than `replicas` starts a rolling update, whose id is printed. With --wait,
    /// every file is applied first, then each service is waited for in turn: its rollout
    /// followed to its end (as `restart --wait` does), or, when none was started, until its
    /// desired instances are running and healthy. The exit code is 0 only when every apply and
    /// every wait succeeded.
    Apply(ApplyArgs),

    /// Show what applying a spec file would change, without applying it, and whether its
    /// instances would be replaced by a rolling update.
    Diff(DiffArgs),

    /// List services with their instance counts.
    #[command(visible_alias = "list")]
    Ls(LsArgs),

    /// Show a service's limits, its running or last rollout, the revisions kept for rollback,
    /// and the state of each of its instances.
    Status(NameArgs),

    /// Change a service's instance count.
    Scale(ScaleArgs),

    /// Replace every instance of a service with a fresh one of the same spec, batch by batch,
    /// gated on health (a rolling restart).
    ///
    /// Prints the id of the rollout started. With --wait, follows it to its end: on a terminal
    /// one progress line redrawn in place (on stderr), otherwise one line per step; then the
    /// outcome. The exit code is 0 only when the rollout succeeded: a failed one exits 1, also
    /// when its automatic rollback succeeded. While another rollout of the service runs the
    /// agent refuses, unless --force supersedes it.
    Restart(RestartArgs),

    /// Roll a service back to an earlier revision, as a rolling update.
    ///
    /// Without --to, to the highest kept revision below the current one (`status` lists the
    /// kept revisions). Instances already running that revision are kept. --wait and --force
    /// work as for `restart`.
    Rollback(RollbackArgs),

    /// Show a rollout: its kind, state, revisions, progress, policy, times, outcome and steps.
    ///
    /// Rollout ids (`web-r3`) are printed by `apply`, `restart` and `rollback`, and `status`
    /// shows a service's running or last rollout; the agent keeps the last 10 of each service.
    /// With `-o json`: {"id", "service", "kind", "state", "from_revision", "to_revision",
    /// counts, "policy", "started_at", "finished_at", "reason", "rollback_id", "rollback_of",
    /// "rollback" (the rollback's own status, when there is one), "steps"}.
    Rollout(RolloutArgs),

    /// Stop every instance of a service and remove it.
    Delete(DeleteArgs),

    /// Print the output of a service's instances, or of one instance.
    ///
    /// NAME reads every instance of the service, merged by time; NAME/INDEX (`web/0`) reads one
    /// instance. NAME-INDEX (`web-0`) names that instance too, unless a service has that very
    /// name (then `web/0` is the way to the instance).
    ///
    /// Every line the agent still keeps is printed unless --tail or --since narrows it. Each
    /// line reads
    /// `2026-11-22T23:45:01.123Z web-0 out| text`: the time the line was read (UTC, to the
    /// millisecond; `-` when unknown), the instance, `out|` for stdout or `err|` for stderr,
    /// and the text as written. With `-o json`, one object per line:
    /// {"instance", "stream" ("stdout"/"stderr"), "time" (RFC 3339 or null), "text"}.
    ///
    /// With -f, keeps printing new lines as they are written — across log rotations, restarts
    /// and, for a service, new instances — until Ctrl-C, which ends it with exit code 0.
    Logs(LogsArgs),

    /// Print the node's events: starts, exits, health changes, applied specs, rollouts, ...
    ///
    /// Without --since or --last, the last 50 events of the node. The columns are
    /// INDEX TIME SERVICE INSTANCE TYPE MESSAGE; with `-o json`, one object per event:
    /// {"index", "time", "service", "instance", "type", "message", "attributes"}.
    ///
    /// With -f, keeps printing events as they happen until Ctrl-C (exit code 0). When the
    /// agent no longer keeps the events asked for, or a follower fell too far behind, its
    /// message says from which index to resume (--since INDEX) and the exit code is 1.
    Events(EventsArgs),

    /// Send a signal to one instance's service process, e.g. `corral signal web-0 SIGHUP`.
    Signal(SignalArgs),

    /// Show the host, what it can enforce, the agent's version, and (with --etcd) its link to
    /// the fleet.
    Node,

    /// The fleet: services placed on nodes through etcd, which every node's agent (started
    /// with --etcd) converges to. Talks to etcd directly, not to an agent.
    Fleet(FleetArgs),

    /// A live view of every instance: state, health, CPU, memory, restarts.
    ///
    /// Refreshes every --interval until Ctrl-C (exit code 0), or stops after --iterations
    /// frames. CPU% is the CPU time an instance used between two refreshes over the time
    /// between them (100% = one core); the first frame has none yet and shows `-`. Rows are
    /// sorted by CPU%, busiest first, then by service and instance. On a terminal each frame
    /// replaces the previous one; otherwise frames follow each other, separated by a blank
    /// line. With `-o json`, one document per frame: {"time", "node", "instances"}.
    Top(TopArgs),

    /// Start a run of a job (`kind = "job"`), or apply, run and delete a one-off job file.
    ///
    /// Prints the run's id (`NAME-rN`). With --wait, waits for the run to end, prints its
    /// outcome, and exits with the job's code: 0 succeeded, N for failed(exit N), 128+N for
    /// failed(signal N), 124 timed_out, 125 cancelled, 126 failed(lost) (its end could not be
    /// observed, or its command never ran), 137 oom_killed; 1 when corral itself failed. With
    /// -f, the spec file is applied first and the run's output is streamed while it runs
    /// (with --wait); --rm deletes the job once the run has ended.
    ///
    /// Overrides for this run alone: arguments after `--` are appended to the job's command
    /// (with --command they replace it), --env adds variables, --timeout and --parallelism
    /// replace the job's. The run's record (`corral runs NAME -o json`) shows them.
    Run(RunArgs),

    /// List a job's kept runs: id, trigger, start, end, outcome, attempts.
    ///
    /// With `-o json`, an array of {"id", "job", "number", "trigger", "started_at",
    /// "ended_at", "outcome", "exit_code", "attempts", "instances"}.
    Runs(NameArgs),

    /// Stop a run (stop signal, grace, SIGKILL); it ends `cancelled`.
    Cancel(CancelArgs),

    /// The node's artifact store: packages fetched for `[artifact]` and `[image]`.
    ///
    /// Without a subcommand, lists every entry: KIND (artifact or image), DIGEST, SIZE (the
    /// blob and every unpacked tree), OWNERS (the kept revisions that pin it, `web@r3`, and
    /// `import`), USERS (revisions whose instances hold it now) and LAST-USED. With `-o json`:
    /// {"max_cache", "entries": [{"kind", "digest", "size", "owners", "users", "last_used"}]}.
    Artifacts(ArtifactsArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["name", "file"])))]
pub struct RunArgs {
    /// The job to run.
    pub name: Option<String>,

    /// A job's spec file: applied, then run.
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "name")]
    pub file: Option<PathBuf>,

    /// Wait for the run to end and exit with the job's exit code.
    #[arg(long)]
    pub wait: bool,

    /// With -f and --wait: delete the job once the run has ended.
    #[arg(long, requires_all = ["file", "wait"])]
    pub rm: bool,

    /// Add (or replace) a variable in this run's environment; repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,

    /// This run's timeout per attempt instead of the job's (`90s`, `1h 30m`).
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,

    /// This run's instance count instead of the job's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub parallelism: Option<u32>,

    /// The arguments after `--` replace the job's command (program first) instead of being
    /// appended to it.
    #[arg(long, requires = "args")]
    pub command: bool,

    /// Arguments for this run: appended to the job's command (or, with --command, the
    /// command itself).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

impl RunArgs {
    /// What this run changes of the job's spec.
    pub fn overrides(&self) -> corral_proto::v1::RunOverrides {
        let (command, args) = if self.command {
            (self.args.clone(), Vec::new())
        } else {
            (Vec::new(), self.args.clone())
        };
        corral_proto::v1::RunOverrides {
            command,
            args,
            env: self.env.iter().cloned().collect(),
            timeout: self.timeout.clone().unwrap_or_default(),
            parallelism: self.parallelism.unwrap_or(0),
        }
    }
}

/// `K=V` (the value may hold `=`).
fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run's id, `NAME-rN`.
    #[arg(value_name = "RUN")]
    pub run: String,
}

#[derive(Debug, Args)]
pub struct ArtifactsArgs {
    #[command(subcommand)]
    pub action: Option<ArtifactsAction>,
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsAction {
    /// List the store's entries (the default).
    Ls,
    /// Add an archive to the store ahead of time, for a node without network: FILE is read
    /// by the agent, on its host (a relative path is taken from this command's directory).
    /// It stays, pinned by the owner `import`, and its SHA-256 is printed, to name in
    /// `[artifact] sha256`.
    Import {
        /// The archive (tar, tar.gz, tar.zst or zip).
        file: PathBuf,
    },
    /// Remove what no kept revision and no instance uses (then, past the agent's
    /// --max-cache, the least recently used entries no instance uses).
    Gc,
}

/// How to reach the fleet's etcd.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd's client endpoints, comma-separated: `https://etcd-1:2379,https://etcd-2:2379`.
    #[arg(long, env = "CORRAL_ETCD", value_name = "URLS")]
    pub etcd: String,

    /// Where the fleet's keys live in etcd (as the agents' --etcd-prefix).
    #[arg(
        long,
        env = "CORRAL_ETCD_PREFIX",
        value_name = "PREFIX",
        default_value = "/corral"
    )]
    pub etcd_prefix: String,

    /// The CA (PEM) that signed etcd's server certificates.
    #[arg(long, env = "CORRAL_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,

    /// A client certificate (PEM) for etcd with client certificate authentication.
    #[arg(
        long,
        env = "CORRAL_ETCD_CERT",
        value_name = "FILE",
        requires = "etcd_key"
    )]
    pub etcd_cert: Option<PathBuf>,

    /// The key of --etcd-cert (PEM).
    #[arg(
        long,
        env = "CORRAL_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    pub etcd_key: Option<PathBuf>,

    /// An etcd user; its password is read from --etcd-password-file.
    #[arg(
        long,
        env = "CORRAL_ETCD_USER",
        value_name = "NAME",
        requires = "etcd_password_file"
    )]
    pub etcd_user: Option<String>,

    /// A file holding the password of --etcd-user (one line).
    #[arg(
        long,
        env = "CORRAL_ETCD_PASSWORD_FILE",
        value_name = "FILE",
        requires = "etcd_user"
    )]
    pub etcd_password_file: Option<PathBuf>,

    /// Most operations, and most compares, in one transaction: etcd's --max-txn-ops. Larger
    /// writes are split into transactions of at most this many.
    #[arg(
        long,
        env = "CORRAL_ETCD_MAX_TXN_OPS",
        value_name = "N",
        default_value_t = corral_fleet::bulk::DEFAULT_MAX_TXN_OPS,
        global = true,
        value_parser = at_least_one()
    )]
    pub etcd_max_txn_ops: usize,

    /// Largest request etcd takes, in bytes: etcd's --max-request-bytes. A transaction
    /// carries keys and values of at most 2/3 of it (the rest is left for framing).
    #[arg(
        long,
        env = "CORRAL_ETCD_MAX_REQUEST_BYTES",
        value_name = "BYTES",
        default_value_t = corral_fleet::bulk::DEFAULT_MAX_REQUEST_BYTES,
        global = true,
        value_parser = at_least_one()
    )]
    pub etcd_max_request_bytes: usize,

    /// Keys per range request when reading the fleet's keys (for tests: real fleets keep
    /// the default).
    #[arg(
        long,
        env = "CORRAL_ETCD_PAGE",
        value_name = "KEYS",
        default_value_t = corral_fleet::bulk::DEFAULT_PAGE,
        hide = true,
        global = true,
        value_parser = at_least_one()
    )]
    pub etcd_page: usize,
}

/// A count of 1 or more.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// List the registered nodes: labels, capacity, what is free, services and instances,
    /// when each last reported. A node leaves the list when its agent stops renewing its
    /// lease.
    Nodes,

    /// Place a service on nodes: write its spec file to each node's key, in one etcd
    /// transaction.
    ///
    /// With --node, on exactly those nodes. With --selector, on every registered node whose
    /// labels match, or with --count on that many of them: those that already run the
    /// service first, then the ones with the most free CPU and memory, one per value of the
    /// --spread label in turn. Nodes that run the service but were not chosen keep it (the
    /// command names them; `fleet delete --node` removes it there).
    Apply(FleetApplyArgs),

    /// The services × nodes matrix from the nodes' status keys: healthy/desired instances,
    /// `refused` (with -o json, the reason), `pending` (not yet applied), and `(gone)` where
    /// the node is no longer registered.
    Ls,

    /// Remove a service from the fleet: delete its key on every node that has one (or on the
    /// --node ones), in one etcd transaction; each node's agent stops its instances.
    Delete(FleetDeleteArgs),

    /// Update a service node by node: write the new spec to --max-unavailable-nodes nodes at
    /// a time, and go on only when each of them reports the new revision applied, rolled out
    /// and healthy.
    ///
    /// Stops at the first node that refuses the spec or whose rollout fails (the nodes not yet
    /// written keep the old spec) with exit code 1; --timeout bounds the wait for each batch.
    Rollout(FleetRolloutArgs),
}

#[derive(Debug, Args)]
pub struct FleetApplyArgs {
    /// The spec file (TOML, as `corral apply` takes it), or `-` for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,

    /// The nodes to place it on (repeat the flag or separate names with commas).
    #[arg(
        long,
        value_name = "NODE",
        value_delimiter = ',',
        required_unless_present = "selector",
        conflicts_with = "selector"
    )]
    pub node: Vec<String>,

    /// Place it on the registered nodes with these labels: `zone=a,disk=ssd` (`` for all).
    #[arg(long, value_name = "K=V,...")]
    pub selector: Option<String>,

    /// Only on this many of the matching nodes.
    #[arg(long, value_name = "N", requires = "selector", value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,

    /// With --count, spread the chosen nodes over the values of this node label (e.g. zone).
    #[arg(long, value_name = "LABEL", requires = "count")]
    pub spread: Option<String>,
}

#[derive(Debug, Args)]
pub struct FleetDeleteArgs {
    /// The service's name.
    pub name: String,

    /// Only on these nodes (repeat the flag or separate names with commas).
    #[arg(long, value_name = "NODE", value_delimiter = ',')]
    pub node: Vec<String>,
}

#[derive(Debug, Args)]
pub struct FleetRolloutArgs {
    /// The service's name; the spec file must name the same service.
    pub name: String,

    /// The new spec file (TOML), or `-` for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,

    /// How many nodes may be updating at once.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unavailable_nodes: u32,

    /// How long to wait for each batch of nodes before stopping with exit code 1: `10m`.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// How many events `events` prints without --since or --last.
pub const DEFAULT_EVENTS_LAST: u32 = 50;

/// How often `top` refreshes without --interval.
pub const DEFAULT_TOP_INTERVAL: &str = "2s";

/// The shortest --interval of `top`: faster refreshes only load the agent.
pub const MIN_TOP_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// NAME (every instance of the service), NAME/INDEX or NAME-INDEX (one instance).
    #[arg(value_name = "NAME[/INDEX]", value_parser = LogTarget::from_str)]
    pub target: LogTarget,

    /// Keep printing new lines as they are written, until Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// A job's run N (`corral logs NAME --run 42`): the output of its instances, in order.
    #[arg(long, value_name = "N")]
    pub run: Option<u64>,

    /// Start with the last N lines (of all the instances together); default: all kept lines.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub tail: Option<u32>,

    /// Only lines written at or after this time: a duration ago (`10m`, `1h30m`, `2days`) or
    /// an RFC 3339 time (`2026-11-22T23:45:00Z`; UTC unless it carries an offset).
    #[arg(long, value_name = "DURATION|RFC3339", value_parser = Since::from_str)]
    pub since: Option<Since>,
}

/// What `logs` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// NAME/INDEX: one instance, by its id (`web-0`).
    Instance(String),
    /// NAME: the service's instances, or — when no service has that name and it reads as
    /// NAME-INDEX — that one instance.
    Service(String),
}

impl LogTarget {
    /// The instance a service-looking NAME-INDEX may name instead (`web-0`), if it has that form.
    pub fn instance_fallback(&self) -> Option<&str> {
        match self {
            LogTarget::Service(name) => name
                .rsplit_once('-')
                .filter(|(service, index)| !service.is_empty() && is_index(index))
                .map(|_| name.as_str()),
            LogTarget::Instance(_) => None,
        }
    }
}

impl FromStr for LogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("a service name is required".to_owned());
        }
        match s.split_once('/') {
            None => Ok(LogTarget::Service(s.to_owned())),
            Some((name, index)) if !name.is_empty() && is_index(index) => {
                Ok(LogTarget::Instance(format!("{name}-{index}")))
            }
            Some(_) => Err(
                "expected NAME or NAME/INDEX with INDEX a number (e.g. web or web/0)".to_owned(),
            ),
        }
    }
}

fn is_index(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// `--since` of `logs`: a time, or how long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// That long before the command runs.
    Ago(Duration),
    /// That time.
    At(prost_types::Timestamp),
}

impl FromStr for Since {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ago) = humantime::parse_duration(s) {
            return Ok(Since::Ago(ago));
        }
        if let Ok(at) = prost_types::Timestamp::from_str(s) {
            return Ok(Since::At(at));
        }
        Err(
            "expected a duration (10m, 1h30m, 2days) or an RFC 3339 time (2026-11-22T23:45:00Z)"
                .to_owned(),
        )
    }
}

/// A label selector, as `ls` and `events` take it.
const SELECTOR_HELP: &str = "Only services whose labels match: comma-separated requirements, all of which must hold: key=value, key!=value, key in (a,b), key notin (a,b), key (has it), !key (has it not)";

#[derive(Debug, Args)]
pub struct LsArgs {
    #[arg(short = 'l', long, value_name = "SELECTOR", help = SELECTOR_HELP)]
    pub selector: Option<String>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[arg(short = 'l', long, value_name = "SELECTOR", help = SELECTOR_HELP)]
    pub selector: Option<String>,

    /// Keep printing events as they happen, until Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// Start at the event with this index (0: the oldest kept); to resume after the last event
    /// seen, its index + 1.
    #[arg(
        long,
        value_name = "INDEX",
        conflicts_with = "last",
        allow_negative_numbers = true
    )]
    pub since: Option<u64>,

    /// Start with the last N events of the node (counted before --service and --instance
    /// pick theirs). Default: 50, without --since.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..),
        allow_negative_numbers = true
    )]
    pub last: Option<u32>,

    /// Only the events of this service.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,

    /// Only the events of this instance (`web-0` or `web/0`).
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between two refreshes (at least 100ms): `2s`, `500ms`, `1m`.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = DEFAULT_TOP_INTERVAL,
        value_parser = parse_interval
    )]
    pub interval: Duration,

    /// Stop after N frames; default: run until Ctrl-C.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..),
        allow_negative_numbers = true
    )]
    pub iterations: Option<u32>,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(s.trim())
        .map_err(|e| format!("expected a duration like 2s or 500ms: {e}"))?;
    if interval < MIN_TOP_INTERVAL {
        return Err(format!(
            "at least {}",
            humantime::format_duration(MIN_TOP_INTERVAL)
        ));
    }
    Ok(interval)
}

#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The instance: `web-0`, or `web/0`.
    pub instance: String,

    /// A signal name (`SIGHUP`, `HUP`) or number.
    pub signal: String,
}

/// How long `--wait` waits without --timeout.
pub const DEFAULT_WAIT_TIMEOUT: &str = "5m";

/// `--wait` and its `--timeout`, shared by the commands that start rollouts.
#[derive(Debug, Clone, Copy, Args)]
pub struct WaitArgs {
    /// Wait for the rollout to end (or, without one, for the instances to be running and
    /// healthy), showing its progress; exit 0 only on success.
    #[arg(long)]
    pub wait: bool,

    /// How long --wait waits for each service before giving up with exit code 1 (the rollout
    /// itself goes on): `5m`, `90s`.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = DEFAULT_WAIT_TIMEOUT,
        value_parser = parse_timeout,
        requires = "wait"
    )]
    pub timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(s.trim())
        .map_err(|e| format!("expected a duration like 5m or 30s: {e}"))?;
    if timeout.is_zero() {
        return Err("must be longer than 0s".to_owned());
    }
    Ok(timeout)
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A spec file, a directory of *.toml spec files, or `-` for standard input. Repeat to
    /// apply several in one call, all or nothing (as --atomic).
    #[arg(short = 'f', long = "file", value_name = "FILE|DIR", required = true)]
    pub file: Vec<PathBuf>,

    /// Apply every spec file given in one call (ApplyBatch): all are validated first, and
    /// either all are applied or none is. Implied by more than one -f.
    #[arg(long)]
    pub atomic: bool,

    /// Validate and report what would change, without applying anything.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,

    /// Supersede a rollout of the service that is still running, and change a service the
    /// fleet (etcd) owns until etcd next changes it (the agent refuses either otherwise).
    #[arg(long)]
    pub force: bool,

    /// Act only if the service's generation is N (0: only if it does not exist yet), as
    /// `status` and every write report it; else the agent refuses (ABORTED). One spec file only.
    #[arg(long, value_name = "N", conflicts_with = "dry_run")]
    pub expected_revision: Option<u64>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The service's name.
    pub name: String,

    /// Supersede a rollout of the service that is still running (the agent refuses otherwise).
    #[arg(long)]
    pub force: bool,

    /// Act only if the service's generation is N (0: only if it does not exist yet), as
    /// `status` and every write report it; else the agent refuses (ABORTED).
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The service's name.
    pub name: String,

    /// The revision to return to; default: the highest kept revision below the current one.
    #[arg(
        long = "to",
        value_name = "REV",
        value_parser = clap::value_parser!(u64).range(1..),
        allow_negative_numbers = true
    )]
    pub revision: Option<u64>,

    /// Supersede a rollout of the service that is still running, and change a service the
    /// fleet (etcd) owns until etcd next changes it (the agent refuses either otherwise).
    #[arg(long)]
    pub force: bool,

    /// Act only if the service's generation is N (0: only if it does not exist yet), as
    /// `status` and every write report it; else the agent refuses (ABORTED).
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The rollout's id, e.g. `web-r3`.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// A spec file, or `-` for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The service's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The service's name.
    pub name: String,

    /// The number of instances to run.
    #[arg(value_name = "N")]
    pub replicas: u32,

    /// Scale a service the fleet (etcd) owns, until etcd next changes it (the agent refuses
    /// otherwise).
    #[arg(long)]
    pub force: bool,
    /// Act only if the service's generation is N (0: only if it does not exist yet), as
    /// `status` and every write report it; else the agent refuses (ABORTED).
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The service's name.
    pub name: String,

    /// Delete a service the fleet (etcd) owns (the agent refuses otherwise); its key in etcd
    /// stays, and the service comes back when the key next changes.
    #[arg(long)]
    pub force: bool,
    /// Act only if the service's generation is N (0: only if it does not exist yet), as
    /// `status` and every write report it; else the agent refuses (ABORTED).
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("corral").chain(args.iter().copied()))
    }

    fn usage_error(args: &[&str]) -> ErrorKind {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?} must be a usage error");
        err.kind()
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn apply_takes_a_file_and_dry_run() {
        let cli = parse(&["apply", "-f", "web.toml", "--dry-run"]).unwrap();
        match cli.command {
            Command::Apply(a) => {
                assert_eq!(a.file, [PathBuf::from("web.toml")]);
                assert!(a.dry_run);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse(&["apply", "--file", "specs/"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Apply(ApplyArgs { dry_run: false, .. })
        ));
    }

    #[test]
    fn apply_takes_wait_timeout_and_force() {
        let cli = parse(&["apply", "-f", "web.toml"]).unwrap();
        let Command::Apply(a) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert!(!a.force && !a.wait.wait);
        assert_eq!(a.wait.timeout, Duration::from_secs(300));

        let cli = parse(&[
            "apply",
            "-f",
            "web.toml",
            "--wait",
            "--timeout",
            "90s",
            "--force",
        ])
        .unwrap();
        let Command::Apply(a) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert!(a.force && a.wait.wait);
        assert_eq!(a.wait.timeout, Duration::from_secs(90));

        assert_eq!(
            usage_error(&["apply", "-f", "web.toml", "--wait", "--dry-run"]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn restart_and_rollback_take_wait_and_force() {
        let cli = parse(&["restart", "web", "--wait", "--force"]).unwrap();
        let Command::Restart(r) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(r.name, "web");
        assert!(r.force && r.wait.wait);
        assert_eq!(r.wait.timeout, Duration::from_secs(300));

        let cli = parse(&["rollback", "web", "--to", "2", "--wait", "--timeout=300ms"]).unwrap();
        let Command::Rollback(r) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (r.name.as_str(), r.revision, r.force),
            ("web", Some(2), false)
        );
        assert_eq!(r.wait.timeout, Duration::from_millis(300));
        let cli = parse(&["rollback", "web"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Rollback(RollbackArgs { revision: None, .. })
        ));

        let cli = parse(&["rollout", "web-r3", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Rollout(RolloutArgs { id }) if id == "web-r3"));
        assert_eq!(cli.output, Format::Json);
    }

    #[test]
    fn bad_rollout_flags_are_usage_errors() {
        for cmd in ["restart", "rollback", "rollout"] {
            assert_eq!(
                usage_error(&[cmd]),
                ErrorKind::MissingRequiredArgument,
                "{cmd}"
            );
        }
        // A timeout without --wait would bound nothing.
        assert_eq!(
            usage_error(&["restart", "web", "--timeout", "1m"]),
            ErrorKind::MissingRequiredArgument
        );
        for bad in [
            "--timeout=0s",
            "--timeout=soon",
            "--timeout=-1m",
            "--timeout=10",
        ] {
            assert_eq!(
                usage_error(&["restart", "web", "--wait", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        for bad in ["--to=0", "--to=-1", "--to=two"] {
            assert_eq!(
                usage_error(&["rollback", "web", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
    }

    #[test]
    fn apply_without_a_file_is_a_usage_error() {
        assert_eq!(usage_error(&["apply"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn diff_takes_a_file() {
        let cli = parse(&["diff", "-f", "web.toml"]).unwrap();
        assert!(
            matches!(cli.command, Command::Diff(DiffArgs { file }) if file == Path::new("web.toml"))
        );
        assert_eq!(usage_error(&["diff"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn read_commands_take_an_output_format_before_or_after_the_command() {
        let cli = parse(&["ls"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ls(LsArgs { selector: None })
        ));
        let cli = parse(&["ls", "-l", "app=web,tier!=db"]).unwrap();
        assert!(
            matches!(cli.command, Command::Ls(LsArgs { selector: Some(s) }) if s == "app=web,tier!=db")
        );
        assert_eq!(cli.output, Format::Table);

        let cli = parse(&["ls", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        let cli = parse(&["-o", "json", "node"]).unwrap();
        assert!(matches!(cli.command, Command::Node));
        assert_eq!(cli.output, Format::Json);
        let cli = parse(&["status", "web", "--output", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        assert!(matches!(cli.command, Command::Status(NameArgs { name }) if name == "web"));
        assert!(matches!(parse(&["list"]).unwrap().command, Command::Ls(_)));
    }

    #[test]
    fn an_unknown_output_format_is_a_usage_error() {
        assert_eq!(usage_error(&["ls", "-o", "yaml"]), ErrorKind::InvalidValue);
        assert_eq!(
            usage_error(&["-o", "yaml", "node"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn commands_on_a_service_need_its_name() {
        for cmd in ["status", "delete", "scale"] {
            assert_eq!(
                usage_error(&[cmd]),
                ErrorKind::MissingRequiredArgument,
                "{cmd}"
            );
        }
        let cli = parse(&["delete", "web"]).unwrap();
        assert!(
            matches!(cli.command, Command::Delete(DeleteArgs { name, force: false, expected_revision: None }) if name == "web")
        );
        let cli = parse(&["delete", "web", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Delete(DeleteArgs { force: true, .. })
        ));
        let cli = parse(&["delete", "web", "--expected-revision", "4"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Delete(DeleteArgs {
                expected_revision: Some(4),
                ..
            })
        ));
    }

    #[test]
    fn scale_takes_a_name_and_a_count() {
        let cli = parse(&["scale", "web", "3"]).unwrap();
        match cli.command {
            Command::Scale(s) => {
                assert_eq!(s.name, "web");
                assert_eq!(s.replicas, 3);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert_eq!(
            usage_error(&["scale", "web"]),
            ErrorKind::MissingRequiredArgument
        );
        for bad in ["three", "1.5", "99999999999"] {
            assert_eq!(
                usage_error(&["scale", "web", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        // A negative count reads as an unknown flag: a usage error all the same.
        usage_error(&["scale", "web", "-1"]);
    }

    #[test]
    fn unknown_commands_and_flags_are_usage_errors() {
        assert_eq!(usage_error(&["frobnicate"]), ErrorKind::InvalidSubcommand);
        assert_eq!(usage_error(&["ls", "--frob"]), ErrorKind::UnknownArgument);
        assert_eq!(usage_error(&["ls", "extra"]), ErrorKind::UnknownArgument);
        let err = parse(&[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    fn logs_args(args: &[&str]) -> LogsArgs {
        match parse(args).unwrap().command {
            Command::Logs(l) => l,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn logs_take_a_service_or_an_instance() {
        let l = logs_args(&["logs", "web"]);
        assert_eq!(l.target, LogTarget::Service("web".into()));
        assert_eq!(l.target.instance_fallback(), None);
        assert!(!l.follow);
        assert_eq!((l.tail, l.since), (None, None));

        let l = logs_args(&["logs", "web/2"]);
        assert_eq!(l.target, LogTarget::Instance("web-2".into()));
        let l = logs_args(&["logs", "my-api/10"]);
        assert_eq!(l.target, LogTarget::Instance("my-api-10".into()));

        // A NAME-INDEX is asked for as a service first, then as that instance.
        let l = logs_args(&["logs", "web-2"]);
        assert_eq!(l.target, LogTarget::Service("web-2".into()));
        assert_eq!(l.target.instance_fallback(), Some("web-2"));
        let l = logs_args(&["logs", "web-api"]);
        assert_eq!(l.target.instance_fallback(), None);

        for bad in ["web/", "/0", "web/x", "web/0/1", ""] {
            assert_eq!(
                usage_error(&["logs", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        assert_eq!(usage_error(&["logs"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn logs_take_follow_tail_and_since() {
        let l = logs_args(&["logs", "web", "-f", "--tail", "20", "--since", "10m"]);
        assert!(l.follow);
        assert_eq!(l.tail, Some(20));
        assert_eq!(l.since, Some(Since::Ago(Duration::from_secs(600))));
        let l = logs_args(&["logs", "web", "--follow", "--tail=0", "--since=1h30m"]);
        assert!(l.follow);
        assert_eq!(l.tail, Some(0));
        assert_eq!(l.since, Some(Since::Ago(Duration::from_secs(5400))));

        let at = |s: &str| logs_args(&["logs", "web", "--since", s]).since;
        let want = Some(Since::At(prost_types::Timestamp {
            seconds: 1_795_909_500,
            nanos: 0,
        }));
        assert_eq!(at("2026-11-28T23:45:00Z"), want);
        assert_eq!(at("2026-11-29T00:45:00+01:00"), want);
        assert_eq!(
            at("2026-11-28T23:45:00.5Z"),
            Some(Since::At(prost_types::Timestamp {
                seconds: 1_795_909_500,
                nanos: 500_000_000
            }))
        );
    }

    #[test]
    fn bad_logs_flags_are_usage_errors() {
        for bad in [
            "yesterday",
            "10",
            "-5m",
            "2026-13-01T00:00:00Z",
            "10 parsecs",
            "",
        ] {
            assert_eq!(
                usage_error(&["logs", "web", &format!("--since={bad}")]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        for bad in ["-1", "x", "1.5", "4294967296"] {
            assert_eq!(
                usage_error(&["logs", "web", &format!("--tail={bad}")]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        assert_eq!(
            usage_error(&["logs", "web", "--tail", "-1"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            usage_error(&["events", "--last", "-1"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            usage_error(&["logs", "web", "-o", "yaml"]),
            ErrorKind::InvalidValue
        );
    }

    fn events_args(args: &[&str]) -> EventsArgs {
        match parse(args).unwrap().command {
            Command::Events(e) => e,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn events_take_follow_since_last_and_filters() {
        let e = events_args(&["events"]);
        assert!(!e.follow);
        assert_eq!((e.since, e.last), (None, None));
        let e = events_args(&[
            "events",
            "-f",
            "--since",
            "120",
            "--service",
            "web",
            "--instance",
            "web/1",
        ]);
        assert!(e.follow);
        assert_eq!(e.since, Some(120));
        assert_eq!(e.service.as_deref(), Some("web"));
        assert_eq!(e.instance.as_deref(), Some("web/1"));
        let e = events_args(&["events", "--last", "5", "--follow"]);
        assert_eq!((e.last, e.follow), (Some(5), true));
    }

    #[test]
    fn bad_events_flags_are_usage_errors() {
        assert_eq!(
            usage_error(&["events", "--since", "3", "--last", "5"]),
            ErrorKind::ArgumentConflict
        );
        for bad in [
            "--since=-1",
            "--since=10m",
            "--last=0",
            "--last=-3",
            "--last=x",
        ] {
            assert_eq!(
                usage_error(&["events", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        assert_eq!(
            usage_error(&["events", "-o", "yaml"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(usage_error(&["events", "web"]), ErrorKind::UnknownArgument);
    }

    #[test]
    fn top_takes_an_interval_and_a_frame_count() {
        let top = |args: &[&str]| match parse(args).unwrap().command {
            Command::Top(t) => t,
            other => panic!("parsed as {other:?}"),
        };
        let t = top(&["top"]);
        assert_eq!((t.interval, t.iterations), (Duration::from_secs(2), None));
        let t = top(&["top", "--interval", "500ms", "--iterations", "3"]);
        assert_eq!(
            (t.interval, t.iterations),
            (Duration::from_millis(500), Some(3))
        );
        for bad in [
            "--interval=0s",
            "--interval=10ms",
            "--interval=fast",
            "--iterations=0",
            "--iterations=-1",
        ] {
            assert_eq!(
                usage_error(&["top", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        assert_eq!(usage_error(&["top", "-o", "yaml"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn signal_takes_an_instance_and_a_signal() {
        let cli = parse(&["signal", "web/0", "HUP"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Signal(SignalArgs { instance, signal }) if instance == "web/0" && signal == "HUP"
        ));
        assert_eq!(
            usage_error(&["signal", "web-0"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn connection_flags_are_global() {
        let cli = parse(&[
            "ls",
            "--addr",
            "https://node1:7443",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "me.pem",
            "--tls-key",
            "me.key",
        ])
        .unwrap();
        assert_eq!(cli.conn.addr, "https://node1:7443");
        assert_eq!(cli.conn.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(cli.conn.tls_cert, Some(PathBuf::from("me.pem")));
        assert_eq!(cli.conn.tls_key, Some(PathBuf::from("me.key")));
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        assert_eq!(
            usage_error(&["ls", "--tls-cert", "me.pem"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["ls", "--tls-key", "me.key"]),
            ErrorKind::MissingRequiredArgument
        );
    }
}
