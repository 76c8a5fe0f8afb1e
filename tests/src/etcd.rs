//! Real etcd members for the fleet tests (Debian's `etcd-server`), each in a temporary data
//! directory, on loopback or inside a network namespace the test made, and `etcdctl` to read
//! and write keys the way operators do. Every member is killed by its PID and its directory
//! removed when the [`Etcd`] is dropped, also when the test fails.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True (after printing why) when etcd is not installed here.
pub fn skip_unless_etcd(test: &str) -> bool {
    let found = [("etcd", "--version"), ("etcdctl", "version")]
        .iter()
        .all(|(b, arg)| {
            Command::new(b)
                .arg(arg)
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !found {
        eprintln!(
            "SKIP {test}: etcd and etcdctl are not installed (apt-get install etcd-server etcd-client)"
        );
    }
    !found
}

/// TLS for every member: its server certificate, and the CA whose client certificates it
/// takes (client certificate authentication on); etcdctl's own client certificate.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ctl_cert: PathBuf,
    pub ctl_key: PathBuf,
}

#[derive(Debug)]
struct Member {
    name: String,
    client: String,
    peer: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of one or more members.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    /// The network namespace the members run in, if not the test's own.
    netns: Option<String>,
    tls: Option<EtcdTls>,
    /// `USER:PASSWORD` etcdctl gives once authentication is on.
    ctl_user: Option<String>,
    /// More etcd flags, given to every member.
    extra_args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// One member on loopback.
    pub fn start() -> Etcd {
        Etcd::cluster("127.0.0.1", 1, None, None)
    }

    /// One member on loopback started with more flags: `["--max-txn-ops", "8"]`.
    pub fn start_with(extra_args: &[&str]) -> Etcd {
        Etcd::build("127.0.0.1", 1, None, None, extra_args)
    }

    /// `n` members listening on `ip` (inside `netns` when given), each on its own ports.
    pub fn cluster(ip: &str, n: usize, netns: Option<&str>, tls: Option<EtcdTls>) -> Etcd {
        Etcd::build(ip, n, netns, tls, &[])
    }

    fn build(
        ip: &str,
        n: usize,
        netns: Option<&str>,
        tls: Option<EtcdTls>,
        extra_args: &[&str],
    ) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("corral-etcd-")
            .tempdir()
            .expect("tempdir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://{ip}:{}", crate::free_port()),
                peer: format!("http://{ip}:{}", crate::free_port()),
                data: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let mut etcd = Etcd {
            members,
            netns: netns.map(str::to_string),
            tls,
            ctl_user: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            _dir: dir,
        };
        for i in 0..n {
            etcd.start_member(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    /// `program` in the members' network namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => crate::netns::Net::command_in(ns, std::path::Path::new(program)),
            None => Command::new(program),
        }
    }

    /// Start member `i` (again: its data directory is kept).
    pub fn start_member(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} already runs");
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log");
        let mut cmd = self.command("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &m.client])
            .args(["--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &cluster])
            .args([
                "--initial-cluster-token",
                &format!("corral-{}", std::process::id()),
            ])
            // Short elections so the leader-loss tests move quickly.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// Stop member `i` (SIGTERM, then wait); its data stays for [`Etcd::start_member`].
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(c.id().cast_signed(), libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Kill member `i` at once (SIGKILL: no leadership hand-over, as in a crash or a power
    /// cut); its data stays for [`Etcd::start_member`].
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The PID of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<i32> {
        self.members[i].child.as_ref().map(|c| c.id().cast_signed())
    }

    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL, comma-separated, as `--etcd` takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoint(&self, i: usize) -> &str {
        &self.members[i].client
    }

    pub fn log_text(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "--- etcd {} ---\n{}",
                    m.name,
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Run `etcdctl` against the running members with `args`, `stdin` as its input.
    pub fn ctl_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let endpoints: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client.as_str())
            .collect();
        let mut cmd = self.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--command-timeout=5s", "--dial-timeout=2s"]);
        if let Some(u) = &self.ctl_user {
            cmd.arg(format!("--user={u}"));
        }
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.ctl_cert.display()))
                .arg(format!("--key={}", t.ctl_key.display()));
        }
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn etcdctl");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input).expect("write etcdctl stdin");
        }
        child.wait_with_output().expect("etcdctl")
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_in(args, None)
    }

    /// `etcdctl put KEY` with the value on stdin; returns the revision it was written at.
    pub fn put(&self, key: &str, value: &[u8]) -> i64 {
        let out = self.ctl_in(&["put", "-w", "json", "--", key], Some(value));
        assert!(
            out.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("put json");
        v["header"]["revision"].as_i64().expect("a revision")
    }

    pub fn del(&self, key: &str) {
        let out = self.ctl(&["del", "--", key]);
        assert!(
            out.status.success(),
            "etcdctl del {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every key under `prefix` with its value; `None` when etcd did not answer.
    pub fn get_prefix(&self, prefix: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let out = self.ctl(&["get", "--prefix", "-w", "json", "--", prefix]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let decode = |s: &serde_json::Value| -> Vec<u8> { base64(s.as_str().unwrap_or("")) };
        Some(
            v["kvs"]
                .as_array()
                .map(|kvs| {
                    kvs.iter()
                        .map(|kv| {
                            (
                                String::from_utf8_lossy(&decode(&kv["key"])).into_owned(),
                                decode(&kv["value"]),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// The value of `key` as JSON, when it exists and etcd answered.
    pub fn get_json(&self, key: &str) -> Option<serde_json::Value> {
        let kvs = self.get_prefix(key)?;
        let (_, v) = kvs.into_iter().find(|(k, _)| k == key)?;
        serde_json::from_slice(&v).ok()
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "-w", "json", "/"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("get json");
        v["header"]["revision"].as_i64().expect("a revision")
    }

    /// Compact away every revision before the current one.
    pub fn compact(&self) -> i64 {
        let rev = self.revision();
        let out = self.ctl(&["compact", &rev.to_string(), "--physical"]);
        assert!(
            out.status.success(),
            "etcdctl compact: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rev
    }

    /// Run etcdctl `args`, which must succeed; its standard output.
    fn must(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.ctl_in(args, stdin);
        assert!(
            out.status.success(),
            "etcdctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Turn etcd's authentication on: a `root` user (which etcdctl uses from then on), and
    /// `user` with `password` whose one role grants read and write under `prefix` only.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) {
        let root_password = format!("root-{}", std::process::id());
        self.must(
            &["user", "add", "root", "--interactive=false"],
            Some(root_password.as_bytes()),
        );
        self.must(&["user", "grant-role", "root", "root"], None);
        let role = format!("{user}-role");
        self.must(&["role", "add", &role], None);
        self.must(
            &[
                "role",
                "grant-permission",
                &role,
                "--prefix=true",
                "readwrite",
                &format!("{prefix}/"),
            ],
            None,
        );
        self.must(
            &["user", "add", user, "--interactive=false"],
            Some(password.as_bytes()),
        );
        self.must(&["user", "grant-role", user, &role], None);
        self.must(&["auth", "enable"], None);
        self.ctl_user = Some(format!("root:{root_password}"));
    }

    /// Change `user`'s password (etcd then refuses the tokens it gave the user).
    pub fn set_password(&self, user: &str, password: &str) {
        self.must(
            &["user", "passwd", user, "--interactive=false"],
            Some(password.as_bytes()),
        );
    }

    /// `corral fleet ARGS` against these members, in their network namespace.
    pub fn fleet_command(&self, args: &[&str]) -> Command {
        let corral = crate::bin("corral");
        let mut cmd = self.command(corral.to_str().expect("utf-8 path"));
        cmd.arg("fleet")
            .args(args)
            .env("CORRAL_ETCD", self.endpoints());
        cmd
    }

    /// Run `corral fleet ARGS` against these members (in their network namespace, where the
    /// test hosts reach them), `stdin` as its input; its (success, stdout, stderr).
    pub fn fleet_cli(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = self.fleet_command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run corral fleet");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write stdin");
        }
        let out = child.wait_with_output().expect("corral fleet");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits (up to `timeout`) for `corral fleet nodes` to list `n` nodes (a header and `n`
    /// lines); its (success, stdout, stderr).
    pub async fn nodes_registered(&self, n: usize, timeout: Duration) -> (bool, String, String) {
        crate::eventually(&format!("{n} nodes registered"), timeout, || async {
            let r = self.fleet_cli(&["nodes"], None);
            (r.1.lines().count() == n + 1).then_some(r)
        })
        .await
    }

    /// An agent joined to these members in each of the first `n` hosts of `net` (node `hI`
    /// in host I), logging at `filter`, with node labels `labels`.
    pub async fn start_hosts(
        &self,
        net: &crate::netns::Net,
        n: usize,
        filter: &str,
        labels: &str,
    ) -> Vec<crate::Agent> {
        let endpoints = self.endpoints();
        let mut hosts = Vec::with_capacity(n);
        for i in 0..n {
            let node = format!("h{i}");
            let args = [
                "--etcd",
                &endpoints,
                "--node",
                &node,
                "--node-labels",
                labels,
            ];
            hosts.push(crate::Agent::start_in_netns(net.host(i), filter, &args).await);
        }
        hosts
    }

    /// Wait until every running member answers `endpoint health`.
    pub fn wait_healthy(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let out = self.ctl(&["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "etcd not healthy within {timeout:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the member that leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        for s in v.as_array()? {
            let leader = s["Status"]["leader"].as_u64()?;
            let me = s["Status"]["header"]["member_id"].as_u64()?;
            if leader == me {
                let ep = s["Endpoint"].as_str()?;
                return self.members.iter().position(|m| m.client == ep);
            }
        }
        None
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if panicking {
            eprintln!("{}", self.log_text());
        }
    }
}

/// etcdctl's JSON output encodes keys and values in standard base64.
fn base64(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}
