//! What the rest of the agent may ask the fleet connection, without waiting on it: whether
//! etcd is reachable (and since when it is not, and why), and how far the node's keys were
//! handled. The API reads it for `Node`.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The state of the link to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Registered (the node's lease is alive) and watching.
    Connected { since: SystemTime },
    /// Not connected; every instance keeps running at the last applied state.
    Disconnected { since: SystemTime, reason: String },
}

/// A report of the fleet link for `Node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetReport {
    pub node: String,
    pub endpoints: Vec<String>,
    pub link: Link,
    /// The etcd revision up to which this node's keys were handled.
    pub revision: i64,
}

#[derive(Debug)]
struct Inner {
    node: String,
    endpoints: Vec<String>,
    link: Link,
    revision: i64,
}

/// Cheap to clone; every clone sees the same state.
#[derive(Debug, Clone)]
pub struct FleetShared {
    inner: Arc<Mutex<Inner>>,
}

impl FleetShared {
    /// Starts disconnected ("connecting"), at the revision the ledger recorded.
    pub fn new(node: &str, endpoints: &[String], revision: i64) -> FleetShared {
        FleetShared {
            inner: Arc::new(Mutex::new(Inner {
                node: node.to_string(),
                endpoints: endpoints.to_vec(),
                link: Link::Disconnected {
                    since: SystemTime::now(),
                    reason: "connecting".into(),
                },
                revision,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn report(&self) -> FleetReport {
        let i = self.lock();
        FleetReport {
            node: i.node.clone(),
            endpoints: i.endpoints.clone(),
            link: i.link.clone(),
            revision: i.revision,
        }
    }

    pub(super) fn connected(&self) {
        let mut i = self.lock();
        if !matches!(i.link, Link::Connected { .. }) {
            i.link = Link::Connected {
                since: SystemTime::now(),
            };
        }
    }

    /// Disconnected for `reason`; the time is that of the first failure, kept while the
    /// reason changes.
    pub(super) fn disconnected(&self, reason: String) {
        let mut i = self.lock();
        let since = match &i.link {
            Link::Disconnected { since, .. } => *since,
            Link::Connected { .. } => SystemTime::now(),
        };
        i.link = Link::Disconnected { since, reason };
    }

    pub(super) fn set_revision(&self, revision: i64) {
        self.lock().revision = revision;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnected_since_the_first_failure() {
        let s = FleetShared::new("n1", &["http://a:1".into()], 0);
        s.connected();
        let Link::Connected { since: up } = s.report().link else {
            panic!("connected")
        };
        s.connected();
        assert_eq!(s.report().link, Link::Connected { since: up }, "kept");
        s.disconnected("etcd unreachable".into());
        let Link::Disconnected { since, .. } = s.report().link else {
            panic!("disconnected")
        };
        s.disconnected("lease expired".into());
        assert_eq!(
            s.report().link,
            Link::Disconnected {
                since,
                reason: "lease expired".into()
            }
        );
        s.set_revision(9);
        assert_eq!(s.report().revision, 9);
    }
}
