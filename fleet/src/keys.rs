//! The stable key layout in etcd. Everything corral keeps there is under one prefix
//! (`/corral` unless `--etcd-prefix` says otherwise), versioned by its first segment:
//!
//! | key | written by | value |
//! | --- | --- | --- |
//! | `<prefix>/v1/nodes/<node>/info` | the node's agent, under its lease | [`crate::records::NodeRecord`] (JSON) |
//! | `<prefix>/v1/nodes/<node>/services/<name>` | operators, schedulers, `corral fleet` | the service's spec: TOML text, as `corral apply -f` takes it |
//! | `<prefix>/v1/nodes/<node>/status/<name>` | the node's agent | [`crate::records::StatusRecord`] (JSON) |
//!
//! A change to this layout is a new `v2` beside `v1`, never an edit of `v1`.

use std::fmt;

/// The default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/corral";

/// Longest node name accepted (a DNS name's limit).
pub const MAX_NODE_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "--etcd-prefix {0:?}: must start with '/', have no empty segment and not end with '/' (e.g. /corral or /prod/corral)"
    )]
    Prefix(String),
    #[error(
        "--node {0:?}: a node name is 1 to 253 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
    )]
    Node(String),
}

/// Whether `name` may name a node: it becomes one key segment, so no `/`, and nothing that
/// reads as a relative path.
pub fn valid_node_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NODE_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `<prefix>/v1/nodes/`
    nodes: String,
}

/// What a key under [`Layout::nodes_prefix`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    Info { node: &'a str },
    Service { node: &'a str, name: &'a str },
    Status { node: &'a str, name: &'a str },
}

impl Layout {
    pub fn new(prefix: &str) -> Result<Layout, KeyError> {
        let valid = prefix.starts_with('/')
            && prefix.len() > 1
            && !prefix.ends_with('/')
            && !prefix[1..].split('/').any(str::is_empty);
        if !valid {
            return Err(KeyError::Prefix(prefix.to_string()));
        }
        Ok(Layout {
            nodes: format!("{prefix}/v1/nodes/"),
        })
    }

    /// Every key of every node.
    pub fn nodes_prefix(&self) -> &str {
        &self.nodes
    }

    pub fn info(&self, node: &str) -> String {
        format!("{}{node}/info", self.nodes)
    }

    /// The prefix of a node's desired services, which its agent watches.
    pub fn services_prefix(&self, node: &str) -> String {
        format!("{}{node}/services/", self.nodes)
    }

    pub fn service(&self, node: &str, name: &str) -> String {
        format!("{}{node}/services/{name}", self.nodes)
    }

    pub fn status_prefix(&self, node: &str) -> String {
        format!("{}{node}/status/", self.nodes)
    }

    pub fn status(&self, node: &str, name: &str) -> String {
        format!("{}{node}/status/{name}", self.nodes)
    }

    /// What `key` is, or `None` for a key outside the layout (another version, a deeper
    /// path, an empty segment): those are not ours to read, and are ignored.
    pub fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(self.nodes.as_str())?;
        let mut parts = rest.split('/');
        let node = parts.next().filter(|n| valid_node_name(n))?;
        let kind = parts.next()?;
        let name = parts.next();
        if parts.next().is_some() {
            return None;
        }
        match (kind, name) {
            ("info", None) => Some(Key::Info { node }),
            ("services", Some(name)) if !name.is_empty() => Some(Key::Service { node, name }),
            ("status", Some(name)) if !name.is_empty() => Some(Key::Status { node, name }),
            _ => None,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.nodes.trim_end_matches("/v1/nodes/"))
    }
}

/// The end of the range of every key starting with `prefix` (etcd's "prefix end": the
/// prefix with its last byte incremented).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        for ok in ["/corral", "/prod/corral", "/a"] {
            assert!(Layout::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/", "corral", "/corral/", "//corral", "/a//b"] {
            assert_eq!(
                Layout::new(bad),
                Err(KeyError::Prefix(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn node_names() {
        for ok in ["n1", "host-1.example.com", "A_b", &"a".repeat(253)] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", &"a".repeat(254), "..", "é"] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip() {
        let l = Layout::new("/corral").expect("valid");
        assert_eq!(l.info("n1"), "/corral/v1/nodes/n1/info");
        assert_eq!(l.service("n1", "web"), "/corral/v1/nodes/n1/services/web");
        assert_eq!(l.status("n1", "web"), "/corral/v1/nodes/n1/status/web");
        assert_eq!(l.services_prefix("n1"), "/corral/v1/nodes/n1/services/");
        assert_eq!(l.parse(&l.info("n1")), Some(Key::Info { node: "n1" }));
        assert_eq!(
            l.parse(&l.service("n1", "web")),
            Some(Key::Service {
                node: "n1",
                name: "web"
            })
        );
        assert_eq!(
            l.parse(&l.status("n2", "db")),
            Some(Key::Status {
                node: "n2",
                name: "db"
            })
        );
        assert_eq!(l.to_string(), "/corral");
    }

    #[test]
    fn keys_outside_the_layout_are_not_parsed() {
        let l = Layout::new("/corral").expect("valid");
        for key in [
            "/corral/v2/nodes/n1/info",
            "/corral/v1/nodes/n1/info/x",
            "/corral/v1/nodes/n1/services/",
            "/corral/v1/nodes/n1/services/a/b",
            "/corral/v1/nodes//info",
            "/corral/v1/nodes/../info",
            "/corral/v1/nodes/n1/other/x",
            "/corral/v1/nodes/n1",
            "/corralx/v1/nodes/n1/info",
            "/other/v1/nodes/n1/info",
        ] {
            assert_eq!(l.parse(key), None, "{key}");
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("ab"), b"ac".to_vec());
    }
}
