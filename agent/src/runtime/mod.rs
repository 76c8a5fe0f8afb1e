//! Runtime: starting instances and watching them end. The supervisor reaches it through three
//! seams: [`Processes`] (its only way to create and signal processes), [`InstanceFiles`] (what
//! an instance's init leaves on disk) and [`SocketBroker`] (listening sockets and ports).
//! [`linux::LinuxRuntime`] implements all three, with `clone3` into fresh namespaces and the
//! instance's cgroup, running the per-instance [`init`]; `fake::FakeRuntime` (tests and the
//! `testkit` feature) records calls for the supervisor's tests.
//!
//! The data the agent hands to an instance's init ([`InitConfig`]) and the record the init
//! leaves when the service ends ([`ExitRecord`]) are defined here, since both sides use them.
//!
//! Imports from the crate: `spec` and `procfs` only.
//!
//! Inside: [`clone`] starts a process into namespaces and a cgroup (for [`linux`], the agent's
//! side, and [`probe_exec`], the agent's side of exec probes); [`init`] and [`probe_helper`]
//! are what runs inside an instance (`corral-init`), with [`confine`], [`mounts`], [`exec`],
//! [`privileges`] and [`seccomp`]; [`launch`] computes an instance's environment and its
//! init's configuration from its spec (pure); [`users`] keeps the dynamic users.

mod clone;
mod confine;
pub mod exec;
#[cfg(any(test, feature = "testkit"))]
pub mod fake;
pub mod image;
pub mod init;
pub mod launch;
pub mod linux;
pub mod load;
mod mounts;
pub mod package;
mod preflight;
pub mod privileges;
pub mod probe_exec;
pub mod probe_helper;
pub mod seccomp;
pub mod users;
mod zygote;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::spec::ServiceSpec;

pub use clone::SETUP_FAILED;
pub use launch::service_env;

/// `argv[0]` of an instance's init; `corrald` runs as the init when started under this name.
pub const INIT_NAME: &str = "corral-init";
/// File in the instance's run directory holding its [`InitConfig`].
pub const INIT_CONFIG: &str = "init.json";
/// File in the instance's run directory where the init records how the service ended.
pub const EXIT_RECORD: &str = "exit.json";
/// File in the instance's run directory with the init's count of dropped output.
pub const LOG_STAT: &str = "logstat.json";
/// The fd on which the init finds its run directory.
pub const RUN_DIR_FD: RawFd = 3;

/// What the init needs to finish setting up an instance and run its service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    pub instance: String,
    pub command: Vec<String>,
    pub workdir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub hostname: Option<String>,
    pub pid_namespace: bool,
    pub mount_namespace: bool,
    pub net_namespace: bool,
    pub private_tmp: bool,
    pub log_dir: PathBuf,
    pub log_max_size: u64,
    pub log_max_files: u32,
    /// Give the service a `NOTIFY_SOCKET` and record its `READY=1` / `STATUS=` messages.
    #[serde(default)]
    pub notify: bool,
    /// Names of the listening sockets the init holds on fds 4, 5, ... (`LISTEN_FDNAMES`).
    #[serde(default)]
    pub listen_names: Vec<String>,
    /// The service's capabilities; `None` (a config written by an older agent): unchanged.
    #[serde(default)]
    pub capabilities: Option<privileges::CapPlan>,
    /// `RLIMIT_NOFILE` of the service (soft and hard); `None`: the agent's.
    #[serde(default)]
    pub nofile: Option<u64>,
    /// Without `nofile`: the soft limit the agent was started with (it raised its own).
    #[serde(default)]
    pub nofile_soft: Option<u64>,
    /// Make the host's filesystem read-only inside the instance, except `workdir` and `/tmp`.
    #[serde(default)]
    pub readonly_root: bool,
    /// The service's complete environment, applied only at its final `execve` (the init
    /// itself runs with an empty one).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Directories the instance must not see at all (the agent's state and the API socket's
    /// directory): covered with an empty, read-only tmpfs in its mount namespace.
    #[serde(default)]
    pub masked: Vec<PathBuf>,
    /// `nodev` everywhere and a minimal `/dev` of its own (`isolation.devices = "minimal"`).
    #[serde(default)]
    pub minimal_dev: bool,
    /// The kernel's files masked or read-only (`isolation.system_paths = "masked"`).
    #[serde(default)]
    pub system_paths: bool,
    /// The cgroup filesystems to mount again inside (the instance has its own cgroup
    /// namespace and `system_paths`).
    #[serde(default)]
    pub cgroup_mounts: Vec<CgroupMount>,
    /// The fds the spawn path placed after the listening sockets (see [`InitFds`]).
    #[serde(default)]
    pub fds: InitFds,
    /// The instance has its own user namespace (`isolation.userns`): root inside is an
    /// unprivileged uid on the host, so device nodes are bound from the host's, not made.
    #[serde(default)]
    pub userns: bool,
    /// `[artifact]`: the store's tree, mounted read-only inside the instance.
    #[serde(default)]
    pub artifact: Option<package::ArtifactMount>,
    /// `[image]`: the instance's root filesystem.
    #[serde(default)]
    pub image: Option<image::ImageRoot>,
    /// The run's incarnation id, written into every log record (0: none, an older agent).
    #[serde(default)]
    pub incarnation: u64,
}

/// A cgroup filesystem as the host mounts it, to be mounted again inside an instance with its
/// own cgroup namespace (it then shows the instance's cgroup as its root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMount {
    /// Where, e.g. `/sys/fs/cgroup` (v2) or `/sys/fs/cgroup/memory` (v1).
    pub path: PathBuf,
    /// `cgroup2` or `cgroup`.
    pub fstype: String,
    /// The mount data: the controllers and name of a v1 hierarchy (`cpu,cpuacct`,
    /// `none,name=systemd`), empty for cgroup2.
    pub options: String,
    /// The directory of the host's tree (below `path`) that is the instance's cgroup in this
    /// hierarchy: bound on `path` in the instance, which shows the same as mounting the
    /// hierarchy again in its cgroup namespace, for a fraction of the cost. `None` (unknown,
    /// or an older agent's configuration): mounted again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
}

/// The whole content of a file shared with other processes (a sealed memfd), read with
/// `pread` from its start whatever its shared offset is.
pub fn read_shared(file: &std::fs::File) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The fd of an instance's init that holds its `i`-th listening socket.
pub fn listen_fd_in_init(i: usize) -> RawFd {
    RawFd::try_from(i).map_or(RawFd::MAX, |i| (RUN_DIR_FD + 1).saturating_add(i))
}

/// Fds of an instance's init after its listening sockets, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitFds {
    /// The instance's log directory, opened by the agent: the init writes its logs there
    /// whatever its own user may open, and whatever it does to its mount table.
    pub log_dir: Option<RawFd>,
    /// A sealed memfd holding the seccomp program (see [`seccomp::to_bytes`]) to install
    /// before the service's `execve`.
    pub seccomp: Option<RawFd>,
    /// A detached, idmapped mount of the workdir (`isolation.userns`), to put in place.
    pub workdir: Option<RawFd>,
    /// A detached mount of the image's rootfs (`[image]`; idmapped for the instance's user
    /// namespace with `isolation.userns`): the overlay's lower layer.
    #[serde(default)]
    pub image_root: Option<RawFd>,
    /// A detached bind mount of the instance's image layers (`<run dir>/image`), which the
    /// init attaches in its own mount namespace to build the overlay from.
    #[serde(default)]
    pub image_layer: Option<RawFd>,
}

impl InitFds {
    /// The numbers for an init with `listen` listening sockets and the given fds.
    pub fn after(listen: usize, seccomp: bool, workdir: bool) -> InitFds {
        let mut next = listen_fd_in_init(listen);
        let mut take = |wanted: bool| {
            wanted.then(|| {
                next += 1;
                next - 1
            })
        };
        InitFds {
            log_dir: take(true),
            seccomp: take(seccomp),
            workdir: take(workdir),
            image_root: None,
            image_layer: None,
        }
    }

    /// With the image's layers (when `layer`) and its idmapped rootfs (when `root`), after
    /// the others, in this order.
    pub fn with_image(mut self, layer: bool, root: bool) -> InitFds {
        let mut next = self.all().max().unwrap_or(RUN_DIR_FD) + 1;
        if layer {
            self.image_layer = Some(next);
            next += 1;
        }
        if root {
            self.image_root = Some(next);
        }
        self
    }

    /// Every fd set, in order.
    pub fn all(&self) -> impl Iterator<Item = RawFd> {
        [
            self.log_dir,
            self.seccomp,
            self.workdir,
            self.image_layer,
            self.image_root,
        ]
        .into_iter()
        .flatten()
    }
}

/// What an instance reported over its `NOTIFY_SOCKET` (sd_notify protocol).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyState {
    /// It sent `READY=1`.
    pub ready: bool,
    /// Its last `STATUS=` text.
    pub status: String,
}

/// File in the instance's run directory with its [`NotifyState`].
pub const NOTIFY_STATE: &str = "notify.json";

/// How a process ended, as its init saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(default)]
    pub core_dumped: bool,
    /// The instance never ran its command: why.
    #[serde(default)]
    pub setup_error: Option<String>,
    /// Output the init could not write to the log files.
    #[serde(default)]
    pub log_lines_dropped: u64,
    #[serde(default)]
    pub log_bytes_dropped: u64,
}

/// The init's running count of output it could not write (disk full, I/O errors), and of
/// what it wrote (kept current within [`LOG_STAT_EVERY`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStat {
    pub lines_dropped: u64,
    pub bytes_dropped: u64,
    /// The service's bytes written to its log files (inits of earlier releases: 0).
    #[serde(default)]
    pub bytes_written: u64,
}

/// How often at most an init rewrites its [`LogStat`] for bytes written alone; drops are
/// written at once.
pub const LOG_STAT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a process ended, from `waitid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    Exited(i32),
    Signaled(i32),
    /// Not our child (an instance adopted from an earlier agent run): the kernel gives its
    /// status to its parent only; the init's exit record tells the rest.
    Unknown,
}

/// Everything known about an instance's end once its init is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitExit {
    /// The init's own status.
    pub status: ProcessStatus,
    /// What the init recorded about the service process, when it got that far.
    pub record: Option<ExitRecord>,
    /// The spawn failed between `clone3` and the init's first instruction (joining the
    /// cgroup, executing the init).
    pub spawn_error: Option<String>,
}

/// A request to start one instance.
#[derive(Debug)]
pub struct StartRequest<'a> {
    pub spec: &'a ServiceSpec,
    pub index: u32,
    pub instance: &'a str,
    /// This run's incarnation id (never 0), tagged on its log records.
    pub incarnation: u64,
    /// The instance cgroup's `cgroup.procs` files, open for writing: the child writes "0"
    /// to each before it executes anything (v1; and v2 when `cgroup_dir` cannot be used).
    pub cgroup_procs: Vec<OwnedFd>,
    /// v2: the cgroup directory, so the child is cloned straight into it.
    pub cgroup_dir: Option<OwnedFd>,
    pub ports: &'a BTreeMap<String, u16>,
    /// The service's listening sockets, in `[[sockets]]` order.
    pub listen_fds: &'a [Arc<OwnedFd>],
    /// `[artifact]`: the unpacked, read-only tree on the host, bind-mounted at the spec's
    /// `artifact.mount` inside the instance.
    pub artifact: Option<&'a std::path::Path>,
    /// `[image]`: the rootfs in the store and the image's defaults.
    pub image: Option<&'a image::ImageRun>,
}

/// What an exec probe runner needs to run commands inside one instance.
#[derive(Debug)]
pub struct ExecRequest<'a> {
    pub process: &'a ProcessRef,
    pub spec: &'a ServiceSpec,
    pub index: u32,
    pub instance: &'a str,
    pub ports: &'a BTreeMap<String, u16>,
    /// The instance cgroup's `cgroup.procs` files (v1), or its directory (v2).
    pub cgroup_procs: Vec<OwnedFd>,
    pub cgroup_dir: Option<OwnedFd>,
}

/// A handle on a running init, for signals.
#[derive(Clone)]
pub struct ProcessRef {
    pub pid: i32,
    /// A pidfd, so a signal can never reach a recycled PID.
    pub pidfd: Option<Arc<OwnedFd>>,
}

impl fmt::Debug for ProcessRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessRef")
            .field("pid", &self.pid)
            .finish()
    }
}

pub type ExitFuture = Pin<Box<dyn Future<Output = InitExit> + Send + 'static>>;

/// A started (or adopted) instance.
pub struct Spawned {
    pub process: ProcessRef,
    /// The init's start time (clock ticks after boot, `/proc/PID/stat` field 22): with the
    /// boot id, what tells this process from a later one that reuses its PID.
    pub start_time: u64,
    /// Resolves once the init has ended (and has been reaped).
    pub exit: ExitFuture,
}

impl fmt::Debug for Spawned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spawned")
            .field("process", &self.process)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("instance {instance}: user {user:?}: {reason}")]
    User {
        instance: String,
        user: String,
        reason: String,
    },
    #[error("instance {instance}: preparing {what}: {source}")]
    Prepare {
        instance: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("instance {instance}: clone3 failed: {source}")]
    Clone {
        instance: String,
        #[source]
        source: std::io::Error,
    },
    #[error("instance {instance}: {reason}")]
    Invalid { instance: String, reason: String },
}

/// The process lifecycle of instances: starting them, taking over those of an earlier agent
/// run, signalling them, and what the kernel says about their processes.
pub trait Processes: Send + Sync + fmt::Debug + 'static {
    /// Start an instance: its init is in the cgroup and namespaces before it runs anything.
    fn spawn(&self, req: StartRequest<'_>) -> Result<Spawned, SpawnError>;

    /// Send `signal` to the instance's init (which forwards it to the service process).
    fn signal(&self, process: &ProcessRef, signal: i32) -> std::io::Result<()>;

    /// Host PID of the service's main process (the init's child), if it is running.
    fn main_pid(&self, init_pid: i32) -> Option<i32>;

    /// Checks against the host that `spec` can run here at all: its user exists, its
    /// command and exec probe are executable files (a bare name found in the service's
    /// `PATH`), its workdir is a directory. One error per field, naming the value and the
    /// reason.
    fn preflight(&self, spec: &ServiceSpec) -> Result<(), Vec<crate::spec::FieldError>>;

    /// A service is gone (deleted): release what was held for it (its dynamic user).
    fn release_service(&self, service: &str) {
        let _ = service;
    }

    /// Take over the init of an instance started by an earlier agent run: it must still be
    /// the process with this PID *and* start time (never a process that reuses the PID).
    /// Its end is then observed through a pidfd and told by its exit record.
    fn adopt(&self, instance: &str, pid: i32, start_time: u64) -> Result<Spawned, SpawnError>;

    /// This boot's identity (`/proc/sys/kernel/random/boot_id`): PIDs and start times from
    /// another boot mean nothing.
    fn boot_id(&self) -> String;

    /// What runs an instance's exec probes: inside its namespaces and cgroup, as its user.
    fn exec_runner(&self, req: ExecRequest<'_>) -> Arc<dyn crate::health::ExecRunner>;

    /// Of `pids` (the processes of one cgroup), those whose parent is not among them: the
    /// instance's init, for an instance found without a handle.
    fn roots(&self, pids: &[i32]) -> Vec<i32>;
}

/// Lines of stderr kept with a failed end.
pub const OUTPUT_TAIL_LINES: usize = 5;
/// Bytes of stderr kept with a failed end (the last ones).
pub const OUTPUT_TAIL_BYTES: usize = 1024;

/// The text of the last complete records in `buf` (the end of a log file; `cut`: it begins in
/// the middle of a record, which is skipped), at most [`OUTPUT_TAIL_LINES`] of them and the
/// last [`OUTPUT_TAIL_BYTES`] bytes; `None` when there is none.
pub fn tail_text(buf: &[u8], cut: bool) -> Option<String> {
    let mut lines: Vec<&[u8]> = buf.split_inclusive(|b| *b == b'\n').collect();
    if cut && !lines.is_empty() {
        lines.remove(0);
    }
    // An unterminated last record is being written: not part of the tail yet.
    if lines.last().is_some_and(|l| !l.ends_with(b"\n")) {
        lines.pop();
    }
    let keep = &lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..];
    let text = keep
        .iter()
        .map(|l| String::from_utf8_lossy(crate::logs::parse_record(l).1).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    if text.is_empty() {
        return None;
    }
    let mut start = text.len().saturating_sub(OUTPUT_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    Some(text[start..].to_string())
}

/// What an instance's init leaves on disk for the agent: how its service ended, what it
/// reported over `NOTIFY_SOCKET`, the output it could not log; and removing all of it.
pub trait InstanceFiles: Send + Sync + fmt::Debug + 'static {
    /// What an instance's init recorded when its service ended, if it did.
    fn exit_record(&self, instance: &str) -> Option<ExitRecord>;

    /// What the instance reported over `NOTIFY_SOCKET` this run (`None`: nothing yet).
    fn notify_state(&self, instance: &str) -> Option<NotifyState>;

    /// The init's count of output it could not write to the logs (none: nothing dropped).
    fn log_stat(&self, instance: &str) -> LogStat;

    /// The last lines (at most [`OUTPUT_TAIL_LINES`], [`OUTPUT_TAIL_BYTES`]) the instance's
    /// service wrote to stderr, for a failed end's status; `None` when it wrote none.
    fn output_tail(&self, instance: &str) -> Option<String>;

    /// Forget an instance's run and log state on disk (service deleted).
    fn remove_instance_files(&self, instance: &str);
}

/// The host's network endpoints for instances: the listening sockets the agent owns and hands
/// to every instance of a service, and free ports for `[ports]` entries set to `auto`.
pub trait SocketBroker: Send + Sync + fmt::Debug + 'static {
    /// Pick a free TCP port on the host for a `[ports]` entry set to `auto`.
    fn free_port(&self) -> std::io::Result<u16>;

    /// Whether an instance could bind a fixed `[ports]` port on the host's network: the port
    /// is bound on every IPv4 address (with `SO_REUSEADDR`, so connections of an earlier
    /// listener still in `TIME_WAIT` do not count) and let go at once, without listening.
    /// `EADDRINUSE` means another socket holds it.
    fn check_port(&self, port: u16) -> std::io::Result<()>;

    /// Bind and listen on a `[[sockets]]` address (a stale Unix socket file is replaced).
    fn bind_socket(&self, listen: &crate::spec::ListenAddr) -> std::io::Result<OwnedFd>;

    /// Remove the socket file of a `unix:` listener that is no longer used (service deleted).
    fn unlink_socket(&self, listen: &crate::spec::ListenAddr);

    /// Take back a listening socket a running instance's init holds (on `fd` in the init):
    /// the very socket, not a new one on the same address. Fails unless it is a listening
    /// socket on `listen`.
    fn take_socket(
        &self,
        process: &ProcessRef,
        fd: RawFd,
        listen: &crate::spec::ListenAddr,
    ) -> std::io::Result<OwnedFd>;
}

/// Ports for an instance's `[ports]` entries: fixed ones as given, `auto` ones picked free.
pub fn assign_ports(
    sockets: &dyn SocketBroker,
    spec: &ServiceSpec,
) -> std::io::Result<BTreeMap<String, u16>> {
    use crate::spec::PortSpec;
    spec.ports
        .iter()
        .map(|(name, p)| {
            Ok((
                name.clone(),
                match p {
                    PortSpec::Fixed(n) => *n,
                    PortSpec::Auto => sockets.free_port()?,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tail_tests {
    use super::*;

    #[test]
    fn the_tail_is_the_last_complete_records_without_their_time() {
        let rec = |t: &str| format!("2026-12-03T10:00:00.000000Z {t}\n");
        let file: String = (0..8).map(|i| rec(&format!("line {i}"))).collect();
        assert_eq!(
            tail_text(file.as_bytes(), false).as_deref(),
            Some("line 3\nline 4\nline 5\nline 6\nline 7")
        );
        // Cut in the middle of a record, and one being written at the end: both left out.
        let partial = format!("00Z half\n{}{}2026-12-03T10:00", rec("a"), rec("b"));
        assert_eq!(tail_text(partial.as_bytes(), true).as_deref(), Some("a\nb"));
        assert_eq!(tail_text(b"", false), None);
        let long = rec(&"x".repeat(5000));
        assert_eq!(
            tail_text(long.as_bytes(), false).map(|t| t.len()),
            Some(OUTPUT_TAIL_BYTES)
        );
    }
}
