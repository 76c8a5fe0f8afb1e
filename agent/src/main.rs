//! `corrald`: the composition root. Parses flags, sets up logging, builds the real
//! implementations (cgroup backend, runtime, store), restores the desired state, serves the
//! API and runs the supervisor until SIGTERM/SIGINT. Instances outlive it by design.
//!
//! Started as `corral-init` (argv[0]), the same binary is an instance's init instead.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use corral_agent::api::{self, AgentService};
use corral_agent::cgroups;
use corral_agent::events::{self, EventLog};
use corral_agent::host::{self, Host};
use corral_agent::runtime::{self, linux::LinuxRuntime};
use corral_agent::spec;
use corral_agent::store::FileStore;
use corral_agent::supervisor::{Deps, Driver, Operation, Outcome, SupervisorHandle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
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
    /// Log format on stderr.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    services: Option<PathBuf>,
    cgroup_parent: Option<String>,
    log_format: Option<LogFormat>,
}

#[derive(Debug)]
struct Settings {
    state_dir: PathBuf,
    socket: PathBuf,
    services: Option<PathBuf>,
    cgroup_parent: Option<String>,
    log_format: LogFormat,
}

fn settings(flags: Flags) -> Result<Settings> {
    let file = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {}", path.display()))?;
            toml::from_str::<ConfigFile>(&text)
                .with_context(|| format!("--config {}", path.display()))?
        }
        None => ConfigFile::default(),
    };
    Ok(Settings {
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
        log_format: flags
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    })
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
    let flags = Flags::parse();
    let settings = match settings(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("corrald: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format);
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
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("corrald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(s: Settings) -> Result<()> {
    let store =
        FileStore::open(&s.state_dir.join("state")).context("opening the state directory")?;
    // The socket is bound before anything else is touched, so a second agent on the same
    // socket stops here; connections made during the restore wait in the backlog.
    let listener = api::bind_unix(&s.socket)
        .with_context(|| format!("binding --socket {}", s.socket.display()))?;
    set_socket_group(&s.socket);
    let cgroups =
        cgroups::detect::detect(s.cgroup_parent.as_deref()).context("setting up cgroups")?;
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
    let runtime = LinuxRuntime::new(&s.state_dir).context("preparing the state directory")?;
    let namespaces = host::available_namespaces();
    let events = Arc::new(
        EventLog::open(&s.state_dir.join("events"), events::DEFAULT_KEEP)
            .context("opening the event log")?,
    );
    let deps = Deps {
        runtime: Arc::new(runtime),
        cgroups,
        store: Arc::new(store),
        namespaces: namespaces.clone(),
        events: events.clone(),
    };
    let (mut driver, handle) = Driver::new(deps);
    let service_health = driver.health_updates();
    driver.restore().await;

    let shutdown = CancellationToken::new();
    let supervisor = tokio::spawn(driver.run(shutdown.clone()));
    let agent = AgentService {
        supervisor: handle.clone(),
        events,
        log_root: s.state_dir.join("logs"),
        host: Arc::new(Host::new()),
        capabilities: caps,
        namespaces,
    };
    let server = tokio::spawn(api::serve(
        listener,
        agent,
        service_health,
        shutdown.clone(),
    ));
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
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match &s.services {
                Some(dir) => {
                    tracing::info!(dir = %dir.display(), "SIGHUP: applying --services again");
                    apply_dir(&handle, dir).await;
                }
                None => tracing::info!("SIGHUP: no --services directory to apply"),
            },
        }
    }
    tracing::info!("shutting down; instances keep running");
    systemd.stopping();
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "API server"),
        Err(e) => tracing::error!(error = %e, "API server task"),
    }
    let _ = supervisor.await;
    let _ = std::fs::remove_file(&s.socket);
    Ok(())
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
    match handle
        .call(Operation::Apply {
            spec: Box::new(spec),
            dry_run: false,
            // The files are the desired state: they supersede a rollout still running.
            force: true,
        })
        .await
    {
        Ok(Outcome::Applied(a)) => {
            tracing::info!(file = %file.display(), service = %a.name, revision = a.revision, outcome = a.kind.as_str(), "applied");
            Ok(())
        }
        Ok(o) => bail!("unexpected answer {o:?}"),
        Err(e) => bail!("{e}"),
    }
}
