//! Test hosts in network namespaces: one namespace holds a bridge (and whatever serves the
//! hosts, such as etcd), and each host namespace is joined to it by a veth pair. Names are
//! unique per test run, so parallel runs never meet; every namespace is deleted when the
//! [`Net`] is dropped, also when the test fails. Traffic stays inside these namespaces.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The bridge namespace's address, where the hosts reach their servers.
pub const BRIDGE_IP: &str = "10.77.0.1";

#[derive(Debug)]
pub struct Net {
    bridge: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True (after printing why) when network namespaces cannot be made here.
pub fn skip_unless_netns(test: &str) -> bool {
    let ok = ["ip", "nsenter"].iter().all(|b| {
        Command::new(b)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!("SKIP {test}: needs ip (iproute2) and nsenter (util-linux)");
    }
    !ok
}

impl Net {
    /// A bridge namespace and `hosts` host namespaces, host `i` at 10.77.0.(10+i).
    pub fn new(hosts: usize) -> Net {
        let tag = format!(
            "crl{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let bridge = format!("{tag}-br");
        // Registered first, so that a failure half-way still deletes what was made.
        let mut net = Net {
            bridge: bridge.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &bridge]);
        ip(&["-n", &bridge, "link", "set", "lo", "up"]);
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &bridge,
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let host = format!("{tag}-h{i}");
            ip(&["netns", "add", &host]);
            net.hosts.push(host.clone());
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            ip(&[
                "-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ]);
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &bridge, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("{}/24", Net::host_ip(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
        }
        net
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    pub fn host_ip(i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    /// Cut host `i` off (its port on the bridge down), or join it again.
    pub fn link(&self, i: usize, up: bool) {
        let port = format!("p{i}");
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ]);
    }

    /// A command that runs `program` in namespace `ns` (its network only).
    pub fn command_in(ns: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
