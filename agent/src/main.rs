//! `corrald`: the composition root. Parses flags, sets up logging, builds the real
//! implementations (cgroup backend, runtime, store), restores the desired state, serves the
//! API and runs the supervisor until SIGTERM/SIGINT. Instances outlive it by design.
//!
//! Started as `corral-init` (argv[0]), the same binary is an instance's init instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, ValueEnum};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use corral_agent::api::tls::{Tls, TlsFiles};
use corral_agent::api::{self, AgentService};
use corral_agent::artifact::{ArtifactStore, StoreConfig};
use corral_agent::cgroups;
use corral_agent::events::{self, EventLog};
use corral_agent::fleet::{
    self, Fleet, FleetConfig, FleetDeps, ledger::Ledger, services::Supervised,
};
use corral_agent::host::{self, Host};
use corral_agent::metrics::server::{Endpoint, MetricsTls};
use corral_agent::metrics::{self, AgentMetrics, CountingCgroups, Metrics};
use corral_agent::runtime::{self, linux::LinuxRuntime};
use corral_agent::spec;
use corral_agent::store::{FileStore, Store};
use corral_agent::supervisor::{CpuWeights, Deps, Driver, SupervisorHandle, capacity};
use corral_fleet::{bulk, connect, keys, placement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

/// `--cpu-cgroup`: see [`Flags::cpu_cgroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum CpuCgroupFlag {
    PerService,
    PerInstance,
}

/// `--cpu-weight`: see [`Flags::cpu_weight`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum CpuWeight {
    PerInstance,
    Fixed,
}

/// corrald: the corral node agent. Keeps services running as isolated, cgroup-limited
/// instances and serves the corral.v1 gRPC API.
#[derive(Debug, Parser)]
#[command(name = "corrald", version)]
struct Flags {
    /// A TOML file with any of the settings below (keys as the flags, with underscores);
    /// flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where desired state, instance run state and logs are kept.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The API's Unix socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Apply every *.toml spec in DIR at start and on SIGHUP.
    #[arg(long, value_name = "DIR")]
    services: Option<PathBuf>,
    /// The cgroup the agent's tree lives under: relative paths are taken beneath the agent's
    /// own cgroup, absolute ones from the hierarchy root. Default: the agent's own cgroup.
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// The CPU weight of the cgroups above the instances. `fixed`: the kernel's default, one
    /// process's weight for the whole tree. `per-instance`: `corral/`, each service's cgroup
    /// and a relative --cgroup-parent weigh as many processes as they hold running instances,
    /// so that under contention the instances get what as many processes would (v1
    /// `cpu.shares` 1024 each up to 256, v2 `cpu.weight` 100 each up to 100), and the agent
    /// itself one instance's share. Default: fixed.
    #[arg(long, value_enum, value_name = "HOW")]
    cpu_weight: Option<CpuWeight>,
    /// Where an instance with no CPU quota is scheduled. `per-service`: in its service's cpu
    /// cgroup, where the service's processes compete thread by thread as under a plain
    /// supervisor (v1: its processes join the service's cgroup in the cpu hierarchy; v2: the
    /// service does not hand the cpu controller to its instances); its memory, pids and
    /// devices cgroups stay its own, and an instance with a quota (`resources.cpu`, a
    /// rollout's `start_cpu` until it is lifted) has a cpu cgroup of its own. `per-instance`:
    /// every instance has one. Default: per-service.
    #[arg(long, value_enum, value_name = "WHERE")]
    cpu_cgroup: Option<CpuCgroupFlag>,
    /// Log format on stderr.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Also serve the API on TCP, with TLS only: HOST:PORT (`0.0.0.0:7443`, `[::]:7443`,
    /// `127.0.0.1:7443`). Needs --tls-cert and --tls-key, and --tls-client-ca unless the
    /// address is a loopback one.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The agent's certificate (PEM, the chain from the leaf). Read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM). Read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA(s) (PEM) whose client certificates may connect; the subject's OU gives the
    /// role: `read` or `admin`. Read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Bound on the artifact store (`<state-dir>/artifacts`), e.g. `20GiB`: least recently
    /// used packages no instance runs are evicted past it. Default: unbounded.
    #[arg(long, value_name = "SIZE")]
    max_cache: Option<String>,
    /// Packages fetched at the same time, at most. Default: 4.
    #[arg(long, value_name = "N")]
    max_fetches: Option<usize>,
    /// The uids (and gids of the same numbers) given to `user = "dynamic"` services, one per
    /// service: FIRST-LAST. Default: 61184-65519 (systemd's range for dynamic users).
    #[arg(long, value_name = "FIRST-LAST")]
    dynamic_users: Option<String>,
    /// The host ids given to `isolation.userns = true` services, 65536 per service (their ids
    /// 0-65535 inside): FIRST-LAST, on 65536-id boundaries. Default: 524288-1879048191
    /// (systemd's range for containers).
    #[arg(long, value_name = "FIRST-LAST")]
    userns_ids: Option<String>,
    #[command(flatten)]
    fleet: FleetFlags,
    /// Serve Prometheus metrics at http://ADDR/metrics (OpenMetrics or the Prometheus text
    /// format, as the client asks): `127.0.0.1:9464`. An address other hosts can reach needs
    /// --metrics-tls-cert and --metrics-tls-key, or --metrics-insecure.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// The metrics endpoint's certificate (PEM, the chain from the leaf): serve HTTPS. Read
    /// again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    metrics_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --metrics-tls-cert. Read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    metrics_tls_key: Option<PathBuf>,
    /// Serve --metrics in plain HTTP on an address other hosts can reach.
    #[arg(long)]
    metrics_insecure: bool,
    /// What services may not commit, kept for the host: `cpu=0.5,memory=512MiB` (cores, and
    /// a size). Default: nothing.
    #[arg(long, value_name = "cpu=CORES,memory=SIZE")]
    reserve: Option<String>,
    /// How far the services' commitments (replicas x limits) may exceed what is allocatable:
    /// `cpu=4.0,memory=1.0` (ratios of at least 1). Default: 1.0 for both, no overcommit.
    #[arg(long, value_name = "cpu=RATIO,memory=RATIO")]
    overcommit: Option<String>,
    /// How often the autoscaler samples the load of services with `[scale]` (10ms-1m).
    /// Default: 1s.
    #[arg(long, value_name = "DURATION")]
    autoscale_interval: Option<String>,
    /// A connection to --listen or --metrics that sends nothing within this is closed
    /// (100ms-5m). Default: 3s.
    #[arg(long, value_name = "DURATION")]
    first_byte_timeout: Option<String>,
    /// A TLS handshake on --listen or --metrics not done within this (after the first
    /// byte) is closed (100ms-5m). Default: 10s.
    #[arg(long, value_name = "DURATION")]
    handshake_timeout: Option<String>,
    /// Handshakes in progress at once on each of --listen and --metrics; more connections
    /// wait in the backlog. Default: 64.
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Handshakes in progress at once from one client address, on each of --listen and
    /// --metrics; more connections from it are closed as they come, so that one address
    /// cannot take every slot. Default: 8.
    #[arg(long, value_name = "N")]
    max_handshakes_per_address: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    services: Option<PathBuf>,
    cgroup_parent: Option<String>,
    cpu_weight: Option<CpuWeight>,
    cpu_cgroup: Option<CpuCgroupFlag>,
    log_format: Option<LogFormat>,
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    max_cache: Option<String>,
    max_fetches: Option<usize>,
    dynamic_users: Option<String>,
    userns_ids: Option<String>,
    #[serde(flatten)]
    fleet: FleetFlags,
    metrics: Option<String>,
    metrics_tls_cert: Option<PathBuf>,
    metrics_tls_key: Option<PathBuf>,
    metrics_insecure: Option<bool>,
    reserve: Option<String>,
    overcommit: Option<String>,
    autoscale_interval: Option<String>,
    first_byte_timeout: Option<String>,
    handshake_timeout: Option<String>,
    max_handshakes: Option<usize>,
    max_handshakes_per_address: Option<usize>,
}

/// Every key a `--config` file may hold: the fields of [`ConfigFile`] and of its flattened
/// [`FleetFlags`]. serde's `deny_unknown_fields` cannot list them or say where an unknown key
/// is once a struct is flattened, so the file's keys are checked against this first.
const CONFIG_KEYS: &[&str] = &[
    "state_dir",
    "socket",
    "services",
    "cgroup_parent",
    "cpu_weight",
    "cpu_cgroup",
    "log_format",
    "listen",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "max_cache",
    "max_fetches",
    "dynamic_users",
    "userns_ids",
    "etcd",
    "node",
    "node_labels",
    "etcd_prefix",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password_file",
    "etcd_lease_ttl",
    "metrics",
    "metrics_tls_cert",
    "metrics_tls_key",
    "metrics_insecure",
    "reserve",
    "overcommit",
    "autoscale_interval",
    "first_byte_timeout",
    "handshake_timeout",
    "max_handshakes",
    "max_handshakes_per_address",
];

/// The agent's config file, its unknown keys refused by name, line and the keys there are.
fn read_config(text: &str) -> Result<ConfigFile> {
    // A file that does not parse gets toml's own message (with its line) below.
    if let Ok(table) = toml::de::DeTable::parse(text) {
        let mut unknown: Vec<(usize, &str)> = table
            .get_ref()
            .keys()
            .filter(|k| !CONFIG_KEYS.contains(&k.get_ref().as_ref()))
            .map(|k| {
                let line = text
                    .get(..k.span().start)
                    .map_or(0, |t| t.matches('\n').count());
                (line + 1, k.get_ref().as_ref())
            })
            .collect();
        unknown.sort();
        if let Some((line, key)) = unknown.first() {
            let hint = match key.replace('-', "_") {
                k if k != *key && CONFIG_KEYS.contains(&k.as_str()) => {
                    format!(" (did you mean `{k}`? keys are written with underscores)")
                }
                _ => String::new(),
            };
            let others = match unknown.len() {
                1 => String::new(),
                n => format!(" ({} unknown keys in all)", n),
            };
            bail!(
                "line {line}: unknown key `{key}`{hint}{others}; the keys are: {}",
                CONFIG_KEYS.join(", ")
            );
        }
    }
    Ok(toml::from_str::<ConfigFile>(text)?)
}

#[derive(Debug)]
struct Settings {
    state_dir: PathBuf,
    socket: PathBuf,
    services: Option<PathBuf>,
    cgroup_parent: Option<String>,
    cpu_weight: CpuWeight,
    cpu_cgroup: cgroups::CpuCgroup,
    log_format: LogFormat,
    listen: Option<(SocketAddr, TlsFiles)>,
    reserve: capacity::Amounts,
    overcommit: capacity::Ratios,
    max_cache: Option<u64>,
    max_fetches: usize,
    dynamic_users: runtime::users::IdRange,
    userns_ids: runtime::users::IdRange,
    fleet: Option<FleetConfig>,
    metrics: Option<Endpoint>,
    autoscale_interval: std::time::Duration,
    handshakes: corral_agent::accept::Handshakes,
}

/// The fleet flags (`--etcd ...`, or the same keys with underscores in --config), checked
/// together: all of them need --etcd, which needs --node.
#[derive(Debug, Default, Args, Deserialize)]
struct FleetFlags {
    /// Join a fleet: the etcd cluster's client endpoints, comma-separated
    /// (`https://etcd-1:2379,https://etcd-2:2379`). The agent registers the node under
    /// --node and runs what etcd says for it; see --node, --node-labels, --etcd-prefix.
    #[arg(long, value_name = "URLS")]
    etcd: Option<String>,
    /// The node's name in the fleet (with --etcd; required there).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// The node's labels for placement, `zone=a,disk=ssd` (with --etcd).
    #[arg(long, value_name = "K=V,...")]
    node_labels: Option<String>,
    /// Where the fleet's keys live in etcd (default /corral).
    #[arg(long, value_name = "PREFIX")]
    etcd_prefix: Option<String>,
    /// The CA (PEM) that signed etcd's server certificates (https:// endpoints).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd with client certificate authentication.
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// An etcd user (etcd's `auth enable`); its password is read from --etcd-password-file.
    #[arg(long, value_name = "NAME")]
    etcd_user: Option<String>,
    /// A file holding the password of --etcd-user (one line).
    #[arg(long, value_name = "FILE")]
    etcd_password_file: Option<PathBuf>,
    /// Seconds the node stays registered after its agent stopped renewing its lease
    /// (default 10).
    #[arg(long, value_name = "SECONDS")]
    etcd_lease_ttl: Option<u64>,
}

impl FleetFlags {
    /// Each flag given on the command line, else the config file's.
    fn or(self, file: FleetFlags) -> FleetFlags {
        FleetFlags {
            etcd: self.etcd.or(file.etcd),
            node: self.node.or(file.node),
            node_labels: self.node_labels.or(file.node_labels),
            etcd_prefix: self.etcd_prefix.or(file.etcd_prefix),
            etcd_ca: self.etcd_ca.or(file.etcd_ca),
            etcd_cert: self.etcd_cert.or(file.etcd_cert),
            etcd_key: self.etcd_key.or(file.etcd_key),
            etcd_user: self.etcd_user.or(file.etcd_user),
            etcd_password_file: self.etcd_password_file.or(file.etcd_password_file),
            etcd_lease_ttl: self.etcd_lease_ttl.or(file.etcd_lease_ttl),
        }
    }
}

fn fleet_settings(f: FleetFlags) -> Result<Option<FleetConfig>> {
    let Some(etcd) = f.etcd else {
        for (flag, given) in [
            ("--node", f.node.is_some()),
            ("--node-labels", f.node_labels.is_some()),
            ("--etcd-prefix", f.etcd_prefix.is_some()),
            ("--etcd-ca", f.etcd_ca.is_some()),
            ("--etcd-cert", f.etcd_cert.is_some()),
            ("--etcd-key", f.etcd_key.is_some()),
            ("--etcd-user", f.etcd_user.is_some()),
            ("--etcd-password-file", f.etcd_password_file.is_some()),
            ("--etcd-lease-ttl", f.etcd_lease_ttl.is_some()),
        ] {
            if given {
                bail!("{flag} is only used with --etcd URLS; give --etcd or drop {flag}");
            }
        }
        return Ok(None);
    };
    let endpoints = connect::parse_endpoints(&etcd)?;
    let Some(node) = f.node else {
        bail!("--etcd needs --node NAME: the node's name in the fleet");
    };
    if !keys::valid_node_name(&node) {
        return Err(keys::KeyError::Node(node).into());
    }
    let layout = keys::Layout::new(f.etcd_prefix.as_deref().unwrap_or(keys::DEFAULT_PREFIX))?;
    let labels = placement::parse_labels("--node-labels", f.node_labels.as_deref().unwrap_or(""))?;
    let user = match (f.etcd_user, f.etcd_password_file) {
        (None, None) => None,
        (Some(user), Some(file)) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading --etcd-password-file {}", file.display()))?;
            let password = text.lines().next().unwrap_or("").to_string();
            if password.is_empty() {
                bail!("--etcd-password-file {}: the file is empty", file.display());
            }
            Some((user, password))
        }
        _ => bail!("--etcd-user and --etcd-password-file go together: give both or neither"),
    };
    let lease_ttl = match f.etcd_lease_ttl {
        None => fleet::DEFAULT_LEASE_TTL,
        Some(s) if (2..=3600).contains(&s) => std::time::Duration::from_secs(s),
        Some(s) => bail!("--etcd-lease-ttl {s}: give 2 to 3600 seconds"),
    };
    let etcd = connect::EtcdConfig {
        endpoints,
        ca: f.etcd_ca,
        cert: f.etcd_cert,
        key: f.etcd_key,
        user,
    };
    // The flags fit together and the files are readable: checked now, not at the first
    // connection.
    etcd.options()?;
    Ok(Some(FleetConfig {
        etcd,
        layout,
        node,
        labels,
        lease_ttl,
        page: etcd_page(std::env::var("CORRAL_ETCD_PAGE").ok().as_deref())?,
    }))
}

/// Keys per range request of a full read of the node's services: `CORRAL_ETCD_PAGE`, which
/// tests set to page through few keys; otherwise the default.
fn etcd_page(value: Option<&str>) -> Result<usize> {
    match value {
        None => Ok(bulk::DEFAULT_PAGE),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("CORRAL_ETCD_PAGE={v:?}: give a number of keys, at least 1 (or unset it)"),
        },
    }
}

/// `--listen` and the TLS flags, checked together: TCP only with TLS, and a listener that
/// other hosts can reach only with client certificates.
fn listen_settings(
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<(SocketAddr, TlsFiles)>> {
    let Some(listen) = listen else {
        for (flag, given) in [
            ("--tls-cert", cert.is_some()),
            ("--tls-key", key.is_some()),
            ("--tls-client-ca", client_ca.is_some()),
        ] {
            if given {
                bail!("{flag} is only used with --listen ADDR; give --listen or drop {flag}");
            }
        }
        return Ok(None);
    };
    let addr = parse_listen(&listen)?;
    let (Some(cert), Some(key)) = (cert, key) else {
        bail!(
            "--listen {listen} needs --tls-cert FILE and --tls-key FILE: corrald serves TCP only with TLS, never in plaintext"
        );
    };
    if client_ca.is_none() && !addr.ip().is_loopback() {
        bail!(
            "--listen {listen} is reachable from other hosts, so it needs --tls-client-ca FILE: \
             only clients with a certificate from that CA may connect (without it, --listen \
             is allowed on a loopback address only, e.g. 127.0.0.1:{})",
            addr.port()
        );
    }
    Ok(Some((
        addr,
        TlsFiles {
            cert,
            key,
            client_ca,
        },
    )))
}

/// `--metrics` and its TLS flags, checked together (see [`metrics::server::endpoint`]).
fn metrics_settings(
    addr: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure: bool,
) -> Result<Option<Endpoint>> {
    let Some(addr) = addr else {
        for (flag, given) in [
            ("--metrics-tls-cert", cert.is_some()),
            ("--metrics-tls-key", key.is_some()),
            ("--metrics-insecure", insecure),
        ] {
            if given {
                bail!("{flag} is only used with --metrics ADDR; give --metrics or drop {flag}");
            }
        }
        return Ok(None);
    };
    Ok(Some(metrics::server::endpoint(&addr, cert, key, insecure)?))
}

fn parse_listen(listen: &str) -> Result<SocketAddr> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = listen.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    bail!(
        "--listen {listen:?} is not an address: use IP:PORT, e.g. 0.0.0.0:7443, [::]:7443 or 127.0.0.1:7443"
    )
}

fn settings(flags: Flags) -> Result<Settings> {
    let file = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {}", path.display()))?;
            read_config(&text).with_context(|| format!("--config {}", path.display()))?
        }
        None => ConfigFile::default(),
    };
    let listen = listen_settings(
        flags.listen.or(file.listen),
        flags.tls_cert.or(file.tls_cert),
        flags.tls_key.or(file.tls_key),
        flags.tls_client_ca.or(file.tls_client_ca),
    )?;
    let max_cache = match flags.max_cache.or(file.max_cache) {
        None => None,
        Some(text) => {
            Some(spec::parse_size(&text).map_err(|e| anyhow::anyhow!("--max-cache: {e}"))?)
        }
    };
    let max_fetches = flags.max_fetches.or(file.max_fetches).unwrap_or(4);
    if max_fetches == 0 {
        bail!("--max-fetches 0 would never fetch a package: give 1 or more");
    }
    let dynamic_users = match flags.dynamic_users.or(file.dynamic_users) {
        Some(range) => runtime::users::IdRange::parse(&range)
            .map_err(|e| anyhow::anyhow!("--dynamic-users {e}"))?,
        None => runtime::users::IdRange::DYNAMIC_DEFAULT,
    };
    let userns_ids = match flags.userns_ids.or(file.userns_ids) {
        Some(range) => runtime::users::IdRange::parse(&range)
            .map_err(|e| anyhow::anyhow!("--userns-ids {e}"))?,
        None => runtime::users::UsernsIds::DEFAULT,
    };
    let fleet = fleet_settings(flags.fleet.or(file.fleet))?;

    let metrics = metrics_settings(
        flags.metrics.or(file.metrics),
        flags.metrics_tls_cert.or(file.metrics_tls_cert),
        flags.metrics_tls_key.or(file.metrics_tls_key),
        flags.metrics_insecure || file.metrics_insecure.unwrap_or(false),
    )?;
    let reserve = match flags.reserve.or(file.reserve) {
        Some(text) => {
            capacity::parse_reserve(&text).map_err(|e| anyhow::anyhow!("--reserve {text}: {e}"))?
        }
        None => capacity::Amounts::default(),
    };
    let overcommit = match flags.overcommit.or(file.overcommit) {
        Some(text) => capacity::parse_overcommit(&text)
            .map_err(|e| anyhow::anyhow!("--overcommit {text}: {e}"))?,
        None => capacity::Ratios::default(),
    };
    let autoscale_interval = match flags.autoscale_interval.or(file.autoscale_interval) {
        None => std::time::Duration::from_secs(1),
        Some(text) => {
            let d = spec::parse_duration(&text)
                .map_err(|e| anyhow::anyhow!("--autoscale-interval: {e}"))?;
            if !(std::time::Duration::from_millis(10)..=std::time::Duration::from_secs(60))
                .contains(&d)
            {
                bail!("--autoscale-interval {text:?} is out of range: give 10ms to 1m");
            }
            d
        }
    };
    let mut handshakes = corral_agent::accept::Handshakes::default();
    for (flag, text, into) in [
        (
            "--first-byte-timeout",
            flags.first_byte_timeout.or(file.first_byte_timeout),
            &mut handshakes.first_byte_timeout,
        ),
        (
            "--handshake-timeout",
            flags.handshake_timeout.or(file.handshake_timeout),
            &mut handshakes.timeout,
        ),
    ] {
        if let Some(text) = text {
            *into = spec::parse_duration(&text).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        }
    }
    if let Some(n) = flags.max_handshakes.or(file.max_handshakes) {
        handshakes.max = n;
    }
    if let Some(n) = flags
        .max_handshakes_per_address
        .or(file.max_handshakes_per_address)
    {
        handshakes.max_per_address = n;
    }
    handshakes.check().map_err(anyhow::Error::msg)?;
    Ok(Settings {
        handshakes,
        reserve,
        overcommit,
        autoscale_interval,
        max_cache,
        max_fetches,
        fleet,
        listen,
        dynamic_users,
        userns_ids,
        metrics,
        state_dir: flags
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| "/var/lib/corral".into()),
        socket: flags
            .socket
            .or(file.socket)
            .unwrap_or_else(|| "/run/corral/corral.sock".into()),
        services: flags.services.or(file.services),
        cgroup_parent: flags.cgroup_parent.or(file.cgroup_parent),
        cpu_weight: flags
            .cpu_weight
            .or(file.cpu_weight)
            .unwrap_or(CpuWeight::Fixed),
        cpu_cgroup: match flags.cpu_cgroup.or(file.cpu_cgroup) {
            Some(CpuCgroupFlag::PerInstance) => cgroups::CpuCgroup::PerInstance,
            Some(CpuCgroupFlag::PerService) | None => cgroups::CpuCgroup::PerService,
        },
        log_format: flags
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    })
}

/// The driver's weighting for `--cpu-weight`. The parent is weighed only when it is relative:
/// then it lies beneath the agent's own cgroup, which is the agent's to manage (delegated to
/// it under systemd); an absolute one, or the agent's own cgroup, is the operator's.
fn cpu_weights(how: CpuWeight, parent: Option<&str>) -> CpuWeights {
    match how {
        CpuWeight::Fixed => CpuWeights::Fixed,
        CpuWeight::PerInstance => CpuWeights::PerInstance {
            parent: parent.is_some_and(|p| !p.starts_with('/') && !p.trim_matches('/').is_empty()),
        },
    }
}

/// `corrald.8` and the bash, zsh and fish completions of corrald, from its flags.
fn generate_docs(dir: &Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_mangen::roff::{Roff, bold, roman};
    let mut cmd = Flags::command();
    let mut page = Vec::new();
    let described = cmd.clone().about("the corral node agent").long_about(
        "corrald keeps services running as isolated processes: every instance in its own \
         namespaces and cgroup with CPU, memory and task limits, under a small init. It \
         restarts what crashes, probes health, replaces instances by health-gated rolling \
         updates, takes running instances back over after it restarts (they outlive it), \
         rotates their logs, and serves the corral.v1 gRPC API on a Unix socket and, with \
         --listen, on TCP with TLS. corral(1) is its command-line client.",
    );
    clap_mangen::Man::new(described)
        .section("8")
        .render(&mut page)?;
    let mut files = Roff::new();
    files.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/corral/corrald.toml",
            "The settings read with --config by the corrald.service unit.",
        ),
        (
            "/etc/corral/services/",
            "Service specs (*.toml) applied at start and on SIGHUP.",
        ),
        (
            "/var/lib/corral/",
            "Desired state, instance records, the event log and instance logs.",
        ),
        ("/run/corral/corral.sock", "The API socket."),
        (
            "/usr/libexec/corral/corral-init",
            "The init of every instance.",
        ),
    ] {
        files
            .control("TP", [])
            .text([bold(path)])
            .text([roman(what)]);
    }
    files.control("SH", ["SEE ALSO"]).text([
        bold("corral"),
        roman("(1), "),
        bold("systemctl"),
        roman("(1)"),
    ]);
    files.to_writer(&mut page)?;
    std::fs::write(dir.join("corrald.8"), page)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "corrald", dir)?;
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name() == Some(runtime::INIT_NAME.as_ref()) {
        return runtime::init::main();
    }
    // `corrald --generate-docs DIR`, for package builds; kept out of the flags so that it is
    // in neither the man page nor the completions it writes.
    let args: Vec<_> = std::env::args_os().collect();
    if let [_, flag, dir] = args.as_slice()
        && flag == "--generate-docs"
    {
        return match generate_docs(Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "corrald: writing the docs into {}: {e}",
                    Path::new(dir).display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let flags = Flags::parse();
    let settings = match settings(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("corrald: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format);
    // A fixed mmap threshold (glibc's default before it adapts): a buffer of 128 KiB or more
    // is mapped and given back whole when freed. glibc otherwise raises the threshold to the
    // largest block freed so far, and from then on keeps each scrape's text (~550 KiB for 200
    // instances) and each large read in its heaps: +2 MiB of RSS with --metrics, against
    // +0.3 MiB with the fixed threshold.
    // SAFETY: mallopt only sets an allocator parameter; no allocation is in flight here.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    match runtime::privileges::raise_open_file_limit() {
        Ok(Some((soft, hard))) => tracing::debug!(
            was = soft,
            now = hard,
            "open-file limit raised to the hard limit; services get {soft} back"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "open-file limit left as it is: raising it failed"),
    }
    // Before the runtime's threads exist: see reserve_descriptor_table.
    if let Err(e) = runtime::privileges::reserve_descriptor_table() {
        tracing::warn!(error = %e, "the descriptor table is grown as descriptors are opened");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corrald: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(settings));
    // Whatever is left (connections past the shutdown grace, a log read in progress) is not
    // waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("corrald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(s: Settings) -> Result<()> {
    let store: Arc<dyn Store> = Arc::new(
        FileStore::open(&s.state_dir.join("state")).context("opening the state directory")?,
    );
    runtime::linux::socket_dir(&s.socket).map_err(anyhow::Error::msg)?;
    // The socket is bound before anything else is touched, so a second agent on the same
    // socket stops here; connections made during the restore wait in the backlog.
    let listener = api::bind_unix(&s.socket)
        .with_context(|| format!("binding --socket {}", s.socket.display()))?;
    // Until the API serves, a refusal (a cgroup tree it cannot use, ...) takes the socket file
    // back with it.
    let mut bound = BoundSocket::new(&s.socket);
    set_socket_group(&s.socket);
    let tcp = match &s.listen {
        Some((addr, files)) => {
            let tls = Tls::load(files.clone())?;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --listen {addr}"))?;
            tracing::info!(
                listen = %addr,
                client_certificates = if tls.requires_client_certs() { "required" } else { "none (loopback only; every client is read)" },
                "API on TCP with TLS"
            );
            Some((tcp, tls))
        }
        None => None,
    };
    let tls = tcp.as_ref().map(|(_, tls)| tls.clone());
    // Bound before anything runs too, so that a port in use or a bad TLS file stops the
    // start with the reason.
    let metrics_endpoint = match &s.metrics {
        Some(ep) => {
            let tls = match &ep.tls {
                Some((cert, key)) => Some(MetricsTls::load(cert, key)?),
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(ep.addr)
                .await
                .with_context(|| format!("binding --metrics {}", ep.addr))?;
            Some((listener, tls))
        }
        None => None,
    };
    let agent_metrics = metrics_endpoint.as_ref().map(|_| AgentMetrics::default());
    let cgroups = cgroups::detect_with(s.cgroup_parent.as_deref(), s.cpu_cgroup)
        .context("setting up cgroups")?;
    // Held for the agent's life: a second agent on this tree would stop our instances.
    let _tree_lock = match cgroups.tree_dir() {
        Some(dir) => {
            Some(cgroups::owner::lock_tree(&dir, &s.state_dir).context("taking the cgroup tree")?)
        }
        None => None,
    };
    let cgroups: Arc<dyn cgroups::CgroupBackend> = match &agent_metrics {
        Some(m) => Arc::new(CountingCgroups::new(cgroups, m.cgroup_errors.clone())),
        None => cgroups,
    };
    let caps = cgroups.capabilities().clone();
    tracing::info!(
        version = caps.version.as_str(),
        parent = %caps.parent,
        controls = ?caps.available.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "cgroups"
    );
    for (c, why) in &caps.unavailable {
        tracing::warn!(control = c.as_str(), reason = %why, "cannot enforce");
    }
    let mut runtime = LinuxRuntime::new(&s.state_dir).context("preparing the state directory")?;
    runtime
        .mask_socket_dir(&s.socket)
        .map_err(anyhow::Error::msg)?;
    let users = runtime::users::DynamicUsers::open(
        &s.state_dir.join("dynamic-users.json"),
        s.dynamic_users,
    )
    .map_err(anyhow::Error::msg)
    .context("reading the dynamic users")?;
    runtime.set_dynamic_users(users);
    let userns =
        runtime::users::UsernsIds::open(&s.state_dir.join("userns-ids.json"), s.userns_ids)
            .map_err(anyhow::Error::msg)
            .context("--userns-ids")?;
    runtime.set_userns_ids(userns);
    let namespaces = host::available_namespaces();
    let events = Arc::new(
        EventLog::open(&s.state_dir.join("events"), events::DEFAULT_KEEP)
            .context("opening the event log")?,
    );
    let mut packages = StoreConfig::new(s.state_dir.join("artifacts"));
    packages.max_cache = s.max_cache;
    packages.fetch.max_concurrent = s.max_fetches;
    let packages = ArtifactStore::open(packages).context("opening the artifact store")?;
    let host = Arc::new(Host::new());
    let facts = host.snapshot();
    let policy = capacity::CapacityPolicy {
        capacity: capacity::Amounts {
            cpu: f64::from(facts.cpus),
            memory: facts.memory_total,
        },
        reserve: s.reserve,
        overcommit: s.overcommit,
    };
    let node_id = host::node_id(&s.state_dir).context("the node id in the state directory")?;
    let deps = Deps::new(
        Arc::new(runtime),
        cgroups.clone(),
        store.clone(),
        namespaces.clone(),
        events.clone(),
    )
    .with_packages(Arc::new(packages.clone()))
    .with_capacity(policy)
    .with_autoscale_interval(s.autoscale_interval)
    .with_cpu_weights(cpu_weights(s.cpu_weight, s.cgroup_parent.as_deref()));
    let files = deps.files.clone();
    let (mut driver, handle) = Driver::new(deps);
    let service_health = driver.health_updates();
    driver.restore().await;

    let shutdown = CancellationToken::new();
    let supervisor = tokio::spawn(driver.run(shutdown.clone()));
    let mut fleet_task = None;
    let fleet_link = match s.fleet.clone() {
        Some(cfg) => {
            let ledger = Ledger::load(store.as_ref()).context("reading the fleet's ledger")?;
            let deps = FleetDeps {
                store: store.clone(),
                events: events.clone(),
                host: host.clone(),
                capacity: policy,
            };
            tracing::info!(node = %cfg.node, etcd = %cfg.etcd.endpoints.join(","), revision = ledger.revision, "fleet: joining");
            let (fleet, link) = Fleet::new(cfg, Supervised::new(&handle), deps, ledger);
            fleet_task = Some(tokio::spawn(fleet.run(shutdown.clone())));
            Some(link)
        }
        None => None,
    };
    let agent = AgentService {
        fleet: fleet_link,
        supervisor: handle.clone(),
        events: events.clone(),
        log_root: s.state_dir.join("logs"),
        host,
        capabilities: caps,
        namespaces,
        node_id,
        boot_id: host::boot_id(),
        // What a service without `resources.nofile` starts with, not the agent's raised one.
        defaults: api::convert::HostDefaults::of_this_process(),
        artifacts: Some(packages),
    };
    // Handlers before anyone can be told we serve: a SIGHUP or SIGTERM from then on is
    // handled, never the default action.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let listeners = api::Listeners {
        unix: listener,
        tcp,
        handshakes: s.handshakes,
    };
    let server = tokio::spawn(api::serve(
        listeners,
        agent,
        service_health,
        agent_metrics
            .as_ref()
            .map(|m| m.api.layer())
            .unwrap_or_default(),
        shutdown.clone(),
    ));
    bound.keep();
    let metrics_tls = metrics_endpoint.as_ref().and_then(|(_, tls)| tls.clone());
    if let (Some((listener, tls)), Some(agent_metrics)) = (metrics_endpoint, agent_metrics) {
        let scheme = if tls.is_some() { "https" } else { "http" };
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(url = %format!("{scheme}://{addr}/metrics"), "metrics served");
        }
        let metrics = Metrics::new(
            agent_metrics,
            handle.clone(),
            events.clone(),
            cgroups.clone(),
            files,
        );
        tokio::spawn(metrics::server::serve(
            listener,
            tls,
            s.handshakes,
            metrics,
            shutdown.clone(),
        ));
    }
    tracing::info!(socket = %s.socket.display(), state_dir = %s.state_dir.display(), "corrald serving");
    // The socket is bound and served: tell systemd (Type=notify), and keep its watchdog fed
    // while the supervisor answers.
    let systemd = Arc::new(corral_agent::sdnotify::Notifier::from_env());
    systemd.ready(&format!("serving on {}", s.socket.display()));
    let supervisor_handle = handle.clone();
    systemd.spawn_watchdog(move || supervisor_handle.answers(), shutdown.clone());

    if let Some(dir) = &s.services {
        apply_dir(&handle, dir).await;
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Some(tls) = &tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate, key and client CA read again"),
                        Err(e) => tracing::error!("SIGHUP: keeping the TLS files in use: {e}"),
                    }
                }
                if let Some(tls) = &metrics_tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: metrics TLS certificate and key read again"),
                        Err(e) => tracing::error!("SIGHUP: keeping the metrics TLS files in use: {e}"),
                    }
                }
                match &s.services {
                    Some(dir) => {
                        tracing::info!(dir = %dir.display(), "SIGHUP: applying --services again");
                        apply_dir(&handle, dir).await;
                    }
                    None => tracing::info!("SIGHUP: no --services directory to apply"),
                }
            }
        }
    }
    tracing::info!("shutting down; instances keep running");
    systemd.stopping();
    let stopping = std::time::Instant::now();
    // Open streams end with UNAVAILABLE (Watch: with the index to resume at) and the
    // connections close; a client that does not read its last replies is not waited for.
    shutdown.cancel();
    match tokio::time::timeout(api::SHUTDOWN_GRACE, server).await {
        Ok(Ok(Ok(()))) => tracing::info!(
            elapsed_ms = corral_agent::num::millis(stopping.elapsed()),
            "API stopped: every call ended"
        ),
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "API server"),
        Ok(Err(e)) => tracing::error!(error = %e, "API server task"),
        Err(_) => tracing::warn!(
            "API calls still open {:?} after shutting down (clients not reading their replies); closing their connections",
            api::SHUTDOWN_GRACE
        ),
    }
    if let Some(task) = fleet_task {
        // The node leaves the registry (its lease revoked) if etcd answers in time.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    let _ = supervisor.await;
    let _ = std::fs::remove_file(&s.socket);
    Ok(())
}

/// The API socket file this agent bound, removed when dropped before [`BoundSocket::keep`]
/// (only if it is still the very file this agent bound).
struct BoundSocket {
    path: PathBuf,
    /// Device and inode of the file bound.
    id: Option<(u64, u64)>,
}

impl BoundSocket {
    fn new(path: &Path) -> BoundSocket {
        use std::os::unix::fs::MetadataExt;
        BoundSocket {
            path: path.to_path_buf(),
            id: std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }

    /// The agent serves on it: leave it.
    fn keep(&mut self) {
        self.id = None;
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let same = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.id);
        if same {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Give the socket to the `corral` group when the host has one, so its members may use the
/// API; otherwise it stays with the agent's group.
fn set_socket_group(path: &Path) {
    if let Ok(Some(group)) = nix::unistd::Group::from_name("corral")
        && let Err(e) = nix::unistd::chown(path, None, Some(group.gid))
    {
        tracing::warn!(error = %e, "cannot give the socket to group corral");
    }
}

/// Apply every `*.toml` in `dir`, in name order. Errors are logged per file; one bad file
/// does not keep the others from being applied.
async fn apply_dir(handle: &SupervisorHandle, dir: &Path) {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect(),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read --services");
            return;
        }
    };
    files.sort();
    for file in files {
        if let Err(e) = apply_file(handle, &file).await {
            tracing::error!(file = %file.display(), "{e:#}");
        }
    }
}

async fn apply_file(handle: &SupervisorHandle, file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file).context("reading")?;
    let spec = match spec::parse_toml(&text) {
        Ok(s) => s,
        Err(e) => bail!("invalid spec:\n{e}"),
    };
    // The files are the desired state: they supersede a rollout still running.
    match handle.apply(spec, false, true).await {
        Ok(a) => {
            tracing::info!(file = %file.display(), service = %a.name, revision = a.revision, outcome = a.kind.as_str(), "applied");
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// An unknown key is refused with its name, its line and every valid key.
    #[test]
    fn an_unknown_config_key_is_named_with_its_line_and_the_valid_keys() {
        let text = "state_dir = \"/var/lib/corral\"\n\n# the fleet\netcd = \"http://e:2379\"\nnode = \"n1\"\nstate_dri = \"/x\"\n";
        let err = format!("{:#}", read_config(text).expect_err("refused"));
        assert!(err.contains("line 6: unknown key `state_dri`"), "{err}");
        for key in CONFIG_KEYS {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
        // Dashes, as on the command line, get a hint.
        let err = format!(
            "{:#}",
            read_config("max-fetches = 2\n").expect_err("refused")
        );
        assert!(
            err.contains("line 1: unknown key `max-fetches` (did you mean `max_fetches`?"),
            "{err}"
        );
        // In a table too: the first unknown key by line, and how many there are.
        let err = format!(
            "{:#}",
            read_config("socket = \"/s\"\nzzz = 1\n[etcd_tls]\nca = 1\n").expect_err("refused")
        );
        assert!(
            err.contains("line 2: unknown key `zzz` (2 unknown keys in all)"),
            "{err}"
        );
    }

    /// Every listed key is one serde takes, and every flag (but --config) has its key.
    #[test]
    fn config_keys_are_the_flags() {
        for key in CONFIG_KEYS {
            let err = read_config(&format!("{key} = []\n")).expect_err("a list is no value here");
            let err = format!("{err:#}");
            assert!(!err.contains("unknown"), "{key}: {err}");
        }
        let flags: Vec<String> = Flags::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| !["config", "help", "version", "generate_docs"].contains(&id.as_str()))
            .collect();
        for id in &flags {
            assert!(
                CONFIG_KEYS.contains(&id.as_str()),
                "--{id} has no config key"
            );
        }
        let good = read_config("state_dir = \"/s\"\netcd = \"http://e:2379\"\nnode = \"n\"\n")
            .expect("valid");
        assert_eq!(good.fleet.node.as_deref(), Some("n"));
    }

    /// Only a relative --cgroup-parent is weighed; a bad value in the file is named.
    #[test]
    fn cpu_weight_of_the_parent() {
        let per = CpuWeight::PerInstance;
        for (parent, weighed) in [
            (None, false),
            (Some("/corral.slice"), false),
            (Some("/"), false),
            (Some(""), false),
            (Some("corral"), true),
            (Some("a/b"), true),
        ] {
            assert_eq!(
                cpu_weights(per, parent),
                CpuWeights::PerInstance { parent: weighed },
                "{parent:?}"
            );
        }
        assert_eq!(
            cpu_weights(CpuWeight::Fixed, Some("corral")),
            CpuWeights::Fixed
        );
        let file = read_config("cpu_weight = \"fixed\"\n").expect("valid");
        assert_eq!(file.cpu_weight, Some(CpuWeight::Fixed));
        let err = read_config("cpu_weight = \"heavy\"\n").expect_err("refused");
        assert!(format!("{err:#}").contains("per-instance"), "{err:#}");
    }

    #[test]
    fn the_page_of_a_full_read() {
        assert_eq!(etcd_page(None).expect("default"), bulk::DEFAULT_PAGE);
        assert_eq!(etcd_page(Some("7")).expect("set"), 7);
        for bad in ["0", "-1", "", "many"] {
            let err = etcd_page(Some(bad)).expect_err("refused").to_string();
            assert!(err.starts_with("CORRAL_ETCD_PAGE="), "{err}");
        }
    }
}
