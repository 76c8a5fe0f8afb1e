//! The end-to-end harness: runs the real `corrald` and `corral` binaries as root against the
//! real kernel, each agent in its own state directory, socket and cgroup parent (beneath the
//! test process's own cgroup), and removes every process and cgroup it made when done.
//!
//! Binaries are looked up in `CORRAL_BIN_DIR`, else next to the test executable's directory
//! (`target/<profile>`); build them first with `cargo build --workspace`.

pub mod apiload;
pub mod artifacts;
pub mod cgroup;
pub mod coldstart;
pub mod etcd;
pub mod execwatch;
pub mod fifo;
pub mod fleetbench;
pub mod load;
pub mod netns;
pub mod oci;
pub mod pki;
pub mod rollbench;
pub mod scenarios;
pub mod stalls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use corral_proto::v1 as pb;
use pb::agent_client::AgentClient;
use tonic::transport::Channel;

pub use cgroup::TestCgroup;

/// Directory holding corrald, corral and corral-testbin.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("CORRAL_BIN_DIR") {
            return PathBuf::from(d);
        }
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir
    })
    .clone()
}

/// Path of one of the workspace's binaries; panics with the fix when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace` first (or set CORRAL_BIN_DIR)",
        p.display()
    );
    p
}

/// The workload binary, at a path an instance can see: a private /tmp hides anything under
/// /tmp, so a build tree there is copied out once.
pub fn testbin() -> String {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let src = bin("corral-testbin");
        if !src.starts_with("/tmp") {
            return src.display().to_string();
        }
        // One shared copy, replaced (atomically, by rename) when the build changes.
        let dir = PathBuf::from("/var/tmp/corral-e2e");
        std::fs::create_dir_all(&dir).expect("mkdir /var/tmp/corral-e2e");
        let dst = dir.join("corral-testbin");
        let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.len() == y.len() && x.modified().ok() <= y.modified().ok(),
            _ => false,
        };
        if !same(&src, &dst) {
            let tmp = dir.join(format!(".corral-testbin.{}", std::process::id()));
            std::fs::copy(&src, &tmp).expect("copy corral-testbin");
            std::fs::rename(&tmp, &dst).expect("install corral-testbin copy");
        }
        dst.display().to_string()
    })
    .clone()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True (after printing why) when this test cannot run here: it needs root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIP {test}: needs root (the end-to-end tests create cgroups and namespaces)");
    true
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique name for this process's n-th agent.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// The proportional set size of process `pid` in KiB: its private pages and its share of
/// the pages it shares (a binary's text run by many processes counted once across them).
pub fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Whether process `pid`, forked by the init `init_pid`, has executed another program: its
/// executable is no longer the init's. A process that is gone (or unreadable) counts as
/// executed, so that a service that ends at once does not hold up a wait for it.
pub fn executed(pid: i32, init_pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let exe = |pid: i32| std::fs::metadata(format!("/proc/{pid}/exe")).ok();
    match (exe(pid), exe(init_pid)) {
        (Some(service), Some(init)) => (service.dev(), service.ino()) != (init.dev(), init.ino()),
        _ => true,
    }
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A loopback TCP port nobody listens on right now.
/// The init zygotes among the agent's children: `corral-init --zygote ...` (one at most).
pub fn init_zygotes(agent_pid: i32) -> Vec<i32> {
    // Children of every thread: each of the agent's threads has its own list.
    let mut all = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{agent_pid}/task")) {
        for t in tasks.flatten() {
            let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            all.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    all.sort_unstable();
    all.dedup();
    all.into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"--zygote".as_slice()))
        })
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One running corrald with its own directories and cgroup parent.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub services_dir: Option<PathBuf>,
    pub cgroup: TestCgroup,
    log: PathBuf,
    log_filter: String,
    /// More corrald flags, given at every launch.
    pub extra_args: Vec<String>,
    /// More environment variables of corrald, at every launch.
    pub extra_env: Vec<(String, String)>,
    /// The network namespace corrald runs in (a test host), if not the test's own.
    pub netns: Option<String>,
    /// The open-file limit (soft, hard) corrald is started with, if not the test's own.
    pub nofile: Option<(u64, u64)>,
    /// Kept to own the directory; removed on drop.
    _tmp: Option<tempfile::TempDir>,
}

impl Agent {
    /// A fresh agent.
    pub async fn start() -> Agent {
        Agent::start_with(None).await
    }

    /// A fresh agent that applies `dir` with `--services`.
    pub async fn start_with(services: Option<&Path>) -> Agent {
        Agent::start_logging(services, "info,corral_agent=debug").await
    }

    /// A fresh agent logging at `filter` that also serves the API on `127.0.0.1:port` with
    /// TLS: the `server` certificate, and client certificates from `client_ca`.
    pub async fn start_tls(filter: &str, port: u16, server: &pki::Pem, client_ca: &Path) -> Agent {
        let listen = format!("127.0.0.1:{port}");
        let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        let (cert, key, ca) = (path(&server.cert), path(&server.key), path(client_ca));
        Agent::start_full_args(
            filter,
            &[
                "--listen",
                &listen,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
            ],
        )
        .await
    }

    /// A fresh agent logging at `filter`, started with more flags.
    pub async fn start_full_args(filter: &str, args: &[&str]) -> Agent {
        Agent::start_full(None, filter, args).await
    }

    /// A fresh agent logging at `filter`, started with more flags and environment variables.
    pub async fn start_full_env(filter: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut a = Agent::new(None, filter, args, None);
        a.extra_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        a.launch().await;
        a
    }

    /// A fresh agent started with the open-file limit `soft`:`hard`.
    pub async fn start_with_nofile(soft: u64, hard: u64) -> Agent {
        let mut a = Agent::new(None, "info,corral_agent=debug", &[], None);
        a.nofile = Some((soft, hard));
        a.launch().await;
        a
    }

    /// A fresh agent logging at `filter` (a `RUST_LOG` value).
    pub async fn start_logging(services: Option<&Path>, filter: &str) -> Agent {
        Agent::start_full(services, filter, &[]).await
    }

    /// A fresh agent in network namespace `netns` (a test host), started with more flags.
    pub async fn start_in_netns(netns: &str, filter: &str, args: &[&str]) -> Agent {
        Agent::start_ns(None, filter, args, Some(netns)).await
    }

    async fn start_full(services: Option<&Path>, filter: &str, args: &[&str]) -> Agent {
        Agent::start_ns(services, filter, args, None).await
    }

    async fn start_ns(
        services: Option<&Path>,
        filter: &str,
        args: &[&str],
        netns: Option<&str>,
    ) -> Agent {
        let mut a = Agent::new(services, filter, args, netns);
        a.launch().await;
        a
    }

    /// An agent not yet launched, on fresh directories and cgroup.
    fn new(services: Option<&Path>, filter: &str, args: &[&str], netns: Option<&str>) -> Agent {
        let tmp = tempfile::Builder::new()
            .prefix("corral-e2e-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        Agent {
            child: None,
            state_dir: dir.join("state"),
            socket: dir.join("corral.sock"),
            services_dir: services.map(Path::to_path_buf),
            cgroup: TestCgroup::new(&unique("e2e")),
            log: dir.join("corrald.log"),
            log_filter: filter.to_string(),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            extra_env: Vec::new(),
            netns: netns.map(str::to_string),
            nofile: None,
            dir,
            _tmp: Some(tmp),
        }
    }

    /// Start corrald (again) on this agent's directories and cgroup.
    pub async fn launch(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        let mut cmd = match &self.netns {
            Some(ns) => netns::Net::command_in(ns, &bin("corrald")),
            None => Command::new(bin("corrald")),
        };
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--cgroup-parent")
            .arg(self.cgroup.flag())
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some(s) = &self.services_dir {
            cmd.arg("--services").arg(s);
        }
        cmd.args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing is allocated in the child.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        self.child = Some(cmd.spawn().expect("spawn corrald"));
        let socket = self.socket.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "corrald exited at start with {status}:\n{}",
                    self.log_text()
                );
            }
            if socket.exists()
                && let Ok(mut c) = connect(&socket).await
                && c.list(pb::ListRequest::default()).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "corrald did not serve within 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id().cast_signed())
    }

    /// Send `signal` to corrald and wait for it to exit; returns its exit status.
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id().cast_signed(), signal) };
        child.wait().expect("wait corrald")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> AgentClient<Channel> {
        connect(&self.socket).await.expect("connect to corrald")
    }

    /// Run the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("corral"))
            .args(args)
            .env("CORRAL_ADDR", format!("unix://{}", self.socket.display()))
            .stdin(Stdio::null())
            .output()
            .expect("run corral")
    }

    /// Apply a TOML spec through the API.
    pub async fn apply(&self, toml: &str) -> Result<pb::ApplyResponse, tonic::Status> {
        self.client()
            .await
            .apply(pb::ApplyRequest {
                source: Some(pb::apply_request::Source::SpecToml(toml.to_string())),
                dry_run: false,
                force: false,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn get(&self, name: &str) -> Result<pb::ServiceStatus, tonic::Status> {
        self.client()
            .await
            .get(pb::GetRequest { name: name.into() })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A rolling restart of `name`: its rollout's id.
    pub async fn restart(&self, name: &str) -> String {
        self.client()
            .await
            .restart(pb::RestartRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("restart")
            .into_inner()
            .rollout_id
    }

    /// Rollout `id` as it is now.
    pub async fn rollout(&self, id: &str) -> pb::RolloutStatus {
        self.client()
            .await
            .get_rollout(pb::GetRolloutRequest { id: id.into() })
            .await
            .expect("get rollout")
            .into_inner()
    }

    /// Rollout `id` once it no longer runs, waiting up to `limit`.
    pub async fn rollout_end(&self, id: &str, limit: Duration) -> pb::RolloutStatus {
        eventually(&format!("rollout {id} to end"), limit, || async {
            let r = self.rollout(id).await;
            (r.state() != pb::RolloutState::Running).then_some(r)
        })
        .await
    }

    pub async fn delete(&self, name: &str) -> Result<pb::DeleteResponse, tonic::Status> {
        self.client()
            .await
            .delete(pb::DeleteRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Wait until `name` has `n` running instances with a known service PID whose process
    /// has executed the service's program; returns them.
    ///
    /// An instance is reported running once its init has forked the service, which can be a
    /// moment before that child executes: until then it is a copy of the init (its signal
    /// dispositions, credentials and filters not yet those of the service).
    pub async fn wait_running(&self, name: &str, n: usize) -> Vec<pb::InstanceStatus> {
        eventually(
            &format!("{n} running instances of {name}"),
            Duration::from_secs(30),
            || async {
                let s = self.get(name).await.ok()?;
                let running: Vec<_> = s
                    .instances
                    .into_iter()
                    .filter(|i| i.state == pb::InstanceState::Running as i32 && i.pid > 0)
                    .filter(|i| executed(i.pid, i.init_pid))
                    .collect();
                (running.len() == n).then_some(running)
            },
        )
        .await
    }

    /// The payloads of the instance's stdout log so far (each record's timestamp removed).
    pub fn stdout_of(&self, instance: &str) -> String {
        let raw = std::fs::read_to_string(
            self.state_dir
                .join("logs")
                .join(instance)
                .join("stdout.log"),
        )
        .unwrap_or_default();
        raw.lines().map(|l| payload(l).to_string() + "\n").collect()
    }

    /// Wait until the instance's stdout holds `key=...` and return the value.
    /// Waits until the instance has printed a line starting with `prefix` on stdout, so that a
    /// test acts only once the service has set itself up (signal handlers, listeners).
    pub async fn wait_printed(&self, instance: &str, prefix: &str) {
        eventually(
            &format!("{instance} to print {prefix:?}"),
            Duration::from_secs(20),
            || async {
                self.stdout_of(instance)
                    .lines()
                    .any(|l| l.starts_with(prefix))
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn reported(&self, instance: &str, key: &str) -> String {
        let prefix = format!("{key}=");
        eventually(
            &format!("{instance} to report {key}"),
            Duration::from_secs(20),
            || async {
                self.stdout_of(instance)
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            },
        )
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Instances outlive the agent by design; the test's cgroup holds them all.
        self.cgroup.destroy();
        if std::thread::panicking() {
            eprintln!(
                "--- corrald log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// The payload of a log record: what follows its timestamp and one space.
/// An event's field as text (a number in decimal, a list one item per line); `None` when the
/// event has no such field.
pub fn attribute(e: &pb::Event, name: &str) -> Option<String> {
    use pb::attribute_value::Value;
    match e.attributes.get(name)?.value.as_ref()? {
        Value::Text(t) => Some(t.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Lines(l) => Some(l.lines.join("\n")),
    }
}

/// An event's field that is a number.
pub fn number(e: &pb::Event, name: &str) -> Option<i64> {
    match e.attributes.get(name)?.value.as_ref()? {
        pb::attribute_value::Value::Number(n) => Some(*n),
        _ => None,
    }
}

/// A log record's payload: what follows its timestamp and incarnation tag.
pub fn payload(record: &str) -> &str {
    match record.split_once(' ') {
        Some((head, rest)) if header_of(head).is_some() => rest,
        _ => record,
    }
}

/// A log record's incarnation id (`<timestamp>/<16 hex> payload`); `None` without one.
pub fn incarnation_of(record: &str) -> Option<u64> {
    let (head, _) = record.split_once(' ')?;
    header_of(head)?
}

/// The header of a record (timestamp, then an optional `/` and incarnation): `Some` of the
/// incarnation it names when `head` is one.
fn header_of(head: &str) -> Option<Option<u64>> {
    let (ts, tag) = match head.split_once('/') {
        Some((ts, tag)) if tag.len() == 16 => (ts, Some(u64::from_str_radix(tag, 16).ok()?)),
        Some(_) => return None,
        None => (head, None),
    };
    (ts.len() == 27 && ts.ends_with('Z')).then_some(tag)
}

/// A client on a Unix socket.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, tonic::transport::Error> {
    let ch = tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AgentClient::new(ch))
}

/// A process's namespace inode link, e.g. `pid:[4026531836]`.
pub fn ns_of(pid: i32, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// True while `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Field `n` (numbered from 1 as in proc(5); 3 and above) of `/proc/PID/stat`, counted after
/// the parenthesised command name, which may hold spaces and parentheses.
pub fn stat_field<T: std::str::FromStr>(pid: i32, n: usize) -> Option<T> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// The parent PID of `pid` (`/proc/PID/stat` field 4).
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_field(pid, 4)
}

/// SIGKILL one process by PID.
pub fn kill9(pid: i32) {
    // SAFETY: plain kill(2) on a PID the test got from the agent.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// The index of quantile `q` (in `[0, 1]`) in a sorted, non-empty vector of `len` items: a
/// float in `[0, len - 1]`, which the saturating float-to-integer `as` converts exactly.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn quantile_index(len: usize, q: f64) -> usize {
    ((len.saturating_sub(1) as f64) * q.clamp(0.0, 1.0)).round() as usize
}
