//! From a spec's [`Probe`] to what one instance's probe connects to: `{port.NAME}` placeholders
//! expanded with the instance's ports, the target parsed once, so that every run of the probe
//! only does I/O. Pure.
//!
//! Hosts are IP literals (`127.0.0.1`, `[::1]`) or `localhost`, which means `127.0.0.1`:
//! probes never resolve names, so a probe cannot wander to another host through DNS, and an
//! IPv6 loopback must be written `[::1]`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::spec::Probe;

const PLACEHOLDER: &str = "{port.";

/// A probe of one instance, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `GET path` over HTTP/1.1; 2xx and 3xx are healthy.
    Http {
        host: IpAddr,
        port: u16,
        /// Path and query as written (the fragment dropped); `/` when none.
        path: String,
        /// The `Host` header: the URL's authority as written, e.g. `localhost:8080`.
        host_header: String,
    },
    /// A TCP connect; success is healthy.
    Tcp { addr: SocketAddr },
    /// `grpc.health.v1.Health/Check` for `service` (`""`: the server as a whole); `SERVING`
    /// is healthy.
    Grpc { addr: SocketAddr, service: String },
    /// A command run inside the instance; exit 0 is healthy.
    Exec { argv: Vec<String> },
}

impl Target {
    /// The probe's kind: `http`, `tcp`, `grpc` or `exec`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Http { .. } => "http",
            Target::Tcp { .. } => "tcp",
            Target::Grpc { .. } => "grpc",
            Target::Exec { .. } => "exec",
        }
    }
}

impl fmt::Display for Target {
    /// For logs and status: `http://127.0.0.1:8080/healthz`, `tcp 127.0.0.1:8080`,
    /// `grpc 127.0.0.1:9090/my.Service`, `exec /bin/check --quick`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Http {
                host, port, path, ..
            } => write!(f, "http://{}{path}", SocketAddr::new(*host, *port)),
            Target::Tcp { addr } => write!(f, "tcp {addr}"),
            Target::Grpc { addr, service } if service.is_empty() => write!(f, "grpc {addr}"),
            Target::Grpc { addr, service } => write!(f, "grpc {addr}/{service}"),
            Target::Exec { argv } => write!(f, "exec {}", argv.join(" ")),
        }
    }
}

/// The target of `probe` for an instance with these `ports`: placeholders expanded, then
/// parsed. The error says what is wrong, quoting the target as expanded so far.
pub fn resolve(probe: &Probe, ports: &BTreeMap<String, u16>) -> Result<Target, String> {
    match probe {
        Probe::Http(url) => parse_http(&expand_ports(url, ports)?),
        Probe::Tcp(target) => {
            let target = expand_ports(target, ports)?;
            let addr = parse_host_port(&target).map_err(|e| format!("{target:?}: {e}"))?;
            Ok(Target::Tcp { addr })
        }
        Probe::Grpc(target) => parse_grpc(&expand_ports(target, ports)?),
        Probe::Exec(argv) => {
            if argv.is_empty() {
                return Err("exec probe has an empty argv".to_string());
            }
            let argv = argv
                .iter()
                .map(|arg| expand_ports(arg, ports))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Target::Exec { argv })
        }
    }
}

/// `text` with every `{port.NAME}` replaced by the instance's port `NAME`. Other braces are
/// kept as they are.
pub fn expand_ports(text: &str, ports: &BTreeMap<String, u16>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find(PLACEHOLDER) {
        out.push_str(&rest[..open]);
        let after = &rest[open + PLACEHOLDER.len()..];
        let Some(close) = after.find('}') else {
            return Err(format!("{text:?}: \"{{port.\" is not closed"));
        };
        let name = &after[..close];
        match ports.get(name) {
            Some(port) => out.push_str(&port.to_string()),
            None => {
                let known = if ports.is_empty() {
                    "it has none".to_string()
                } else {
                    let names: Vec<&str> = ports.keys().map(String::as_str).collect();
                    format!("it has {}", names.join(", "))
                };
                return Err(format!(
                    "{text:?}: {{port.{name}}} is not a port of this instance ({known})"
                ));
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `http://host[:port][/path][?query][#fragment]`.
fn parse_http(url: &str) -> Result<Target, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            format!("{url:?}: https is not supported by probes (use http://)")
        } else {
            format!("{url:?} does not start with http://")
        });
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if authority.contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not supported"));
    }
    let (host, port) = split_authority(authority, Some(80)).map_err(|e| format!("{url:?}: {e}"))?;
    let host = parse_host(host).map_err(|e| format!("{url:?}: {e}"))?;

    let tail = tail.split('#').next().unwrap_or_default();
    let path = match tail.chars().next() {
        None => "/".to_string(),
        Some('?') => format!("/{tail}"),
        Some(_) => tail.to_string(),
    };
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "{url:?}: the path contains {c:?} (only printable ASCII; percent-encode the rest)"
        ));
    }
    Ok(Target::Http {
        host,
        port,
        path,
        host_header: authority.to_string(),
    })
}

/// `host:port` or `host:port/service.Name`.
fn parse_grpc(target: &str) -> Result<Target, String> {
    let (addr, service) = match target.split_once('/') {
        Some((addr, service)) => {
            if service.is_empty() {
                return Err(format!(
                    "{target:?}: no service name after \"/\" (omit the \"/\" to ask about the whole server)"
                ));
            }
            if let Some(c) = service
                .chars()
                .find(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!("{target:?}: the service name contains {c:?}"));
            }
            (addr, service)
        }
        None => (target, ""),
    };
    let addr = parse_host_port(addr).map_err(|e| format!("{target:?}: {e}"))?;
    Ok(Target::Grpc {
        addr,
        service: service.to_string(),
    })
}

/// `host:port` with a port 1..=65535.
fn parse_host_port(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = split_authority(s, None)?;
    Ok(SocketAddr::new(parse_host(host)?, port))
}

/// `host[:port]` into host (brackets removed) and port; without a port, `default` or an error.
fn split_authority(s: &str, default: Option<u16>) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let Some((host, after)) = inner.split_once(']') else {
            return Err("\"[\" is not closed by \"]\"".to_string());
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("{after:?} after \"]\" is not \":port\"")),
            },
        }
    } else {
        match s.split_once(':') {
            Some((host, port)) if port.contains(':') => {
                return Err(format!(
                    "{host}:{port} looks like an IPv6 address: write it in brackets, e.g. [::1]:8080"
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("no host".to_string());
    }
    let port = match (port, default) {
        (Some(port), _) => parse_port(port)?,
        (None, Some(default)) => default,
        (None, None) => return Err("no port (write host:port)".to_string()),
    };
    Ok((host, port))
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(port) if port != 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(format!("port {s:?} is not a number in 1..=65535")),
    }
}

/// An IP literal (IPv6 without its brackets) or `localhost`, which is `127.0.0.1`.
fn parse_host(host: &str) -> Result<IpAddr, String> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.parse::<IpAddr>().map_err(|_| {
        format!("host {host:?} is not an IP address or localhost (probes do not resolve names)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ports() -> BTreeMap<String, u16> {
        BTreeMap::from([("admin".to_string(), 8081), ("grpc".to_string(), 9090)])
    }

    fn http(host: IpAddr, port: u16, path: &str, host_header: &str) -> Target {
        Target::Http {
            host,
            port,
            path: path.to_string(),
            host_header: host_header.to_string(),
        }
    }

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    #[test]
    fn resolves_targets() {
        let cases: Vec<(Probe, Target)> = vec![
            (
                Probe::Http("http://127.0.0.1:{port.admin}/healthz".into()),
                http(V4, 8081, "/healthz", "127.0.0.1:8081"),
            ),
            (
                Probe::Http("http://localhost:{port.admin}".into()),
                http(V4, 8081, "/", "localhost:8081"),
            ),
            (
                Probe::Http("http://[::1]:{port.admin}/a/b?x=1&y={port.grpc}#frag".into()),
                http(V6, 8081, "/a/b?x=1&y=9090", "[::1]:8081"),
            ),
            (
                Probe::Http("http://127.0.0.1?ready".into()),
                http(V4, 80, "/?ready", "127.0.0.1"),
            ),
            (
                Probe::Http("http://[::1]/".into()),
                http(V6, 80, "/", "[::1]"),
            ),
            (
                Probe::Tcp("127.0.0.1:{port.admin}".into()),
                Target::Tcp {
                    addr: "127.0.0.1:8081".parse().expect("literal"),
                },
            ),
            (
                Probe::Tcp("localhost:5432".into()),
                Target::Tcp {
                    addr: "127.0.0.1:5432".parse().expect("literal"),
                },
            ),
            (
                Probe::Tcp("[::1]:{port.grpc}".into()),
                Target::Tcp {
                    addr: "[::1]:9090".parse().expect("literal"),
                },
            ),
            (
                Probe::Grpc("127.0.0.1:{port.grpc}".into()),
                Target::Grpc {
                    addr: "127.0.0.1:9090".parse().expect("literal"),
                    service: String::new(),
                },
            ),
            (
                Probe::Grpc("[::1]:{port.grpc}/my.pkg.Service".into()),
                Target::Grpc {
                    addr: "[::1]:9090".parse().expect("literal"),
                    service: "my.pkg.Service".into(),
                },
            ),
            (
                Probe::Exec(vec![
                    "/bin/check".into(),
                    "--port={port.admin}".into(),
                    "{literal}".into(),
                ]),
                Target::Exec {
                    argv: vec![
                        "/bin/check".into(),
                        "--port=8081".into(),
                        "{literal}".into(),
                    ],
                },
            ),
        ];
        for (probe, want) in cases {
            assert_eq!(resolve(&probe, &ports()), Ok(want), "{probe:?}");
        }
    }

    #[test]
    fn refuses_bad_targets_with_a_reason() {
        let cases: Vec<(Probe, &str)> = vec![
            (
                Probe::Http("http://127.0.0.1:{port.web}/".into()),
                "{port.web} is not a port of this instance (it has admin, grpc)",
            ),
            (
                Probe::Tcp("127.0.0.1:{port.admin".into()),
                "\"{port.\" is not closed",
            ),
            (
                Probe::Http("https://127.0.0.1:8080/".into()),
                "https is not supported by probes",
            ),
            (
                Probe::Http("ftp://127.0.0.1/".into()),
                "does not start with http://",
            ),
            (Probe::Http("http:///x".into()), "has no host"),
            (
                Probe::Http("http://user:pw@127.0.0.1/".into()),
                "credentials in the URL are not supported",
            ),
            (
                Probe::Http("http://example.com:8080/".into()),
                "host \"example.com\" is not an IP address or localhost",
            ),
            (
                Probe::Http("http://127.0.0.1:99999/".into()),
                "port \"99999\" is not a number in 1..=65535",
            ),
            (
                Probe::Http("http://127.0.0.1:/".into()),
                "port \"\" is not a number",
            ),
            (
                Probe::Http("http://127.0.0.1:80/a b".into()),
                "the path contains ' '",
            ),
            (
                Probe::Http("http://[::1:80/".into()),
                "\"[\" is not closed by \"]\"",
            ),
            (Probe::Tcp("127.0.0.1".into()), "no port (write host:port)"),
            (Probe::Tcp(":80".into()), "no host"),
            (
                Probe::Tcp("127.0.0.1:0".into()),
                "port \"0\" is not a number",
            ),
            (
                Probe::Tcp("127.0.0.1:+80".into()),
                "port \"+80\" is not a number",
            ),
            (
                Probe::Tcp("::1:80".into()),
                "looks like an IPv6 address: write it in brackets",
            ),
            (
                Probe::Tcp("[::1]80".into()),
                "\"80\" after \"]\" is not \":port\"",
            ),
            (
                Probe::Grpc("127.0.0.1:9090/".into()),
                "no service name after \"/\"",
            ),
            (
                Probe::Grpc("127.0.0.1:9090/a b".into()),
                "the service name contains ' '",
            ),
            (Probe::Exec(vec![]), "exec probe has an empty argv"),
            (
                Probe::Exec(vec!["check".into(), "{port.nope}".into()]),
                "{port.nope} is not a port of this instance",
            ),
        ];
        for (probe, want) in cases {
            match resolve(&probe, &ports()) {
                Ok(target) => panic!("{probe:?} resolved to {target:?}"),
                Err(e) => assert!(e.contains(want), "{probe:?}: {e:?} lacks {want:?}"),
            }
        }
    }

    #[test]
    fn unknown_placeholder_without_ports() {
        let e = expand_ports("127.0.0.1:{port.admin}", &BTreeMap::new()).expect_err("no ports");
        assert_eq!(
            e,
            "\"127.0.0.1:{port.admin}\": {port.admin} is not a port of this instance (it has none)"
        );
    }

    #[test]
    fn expands_every_placeholder() {
        assert_eq!(
            expand_ports("{port.admin}-{port.grpc}-{port.admin}{x}", &ports()),
            Ok("8081-9090-8081{x}".to_string())
        );
        assert_eq!(expand_ports("plain", &ports()), Ok("plain".to_string()));
    }

    #[test]
    fn displays_targets() {
        let t = resolve(&Probe::Grpc("[::1]:1/a.B".into()), &ports()).expect("valid");
        assert_eq!(t.to_string(), "grpc [::1]:1/a.B");
        let t = resolve(
            &Probe::Http("http://localhost:{port.admin}/h".into()),
            &ports(),
        )
        .expect("valid");
        assert_eq!(t.to_string(), "http://127.0.0.1:8081/h");
        assert_eq!(t.kind(), "http");
    }
}
