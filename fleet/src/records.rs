//! The JSON records corral keeps in etcd besides the specs: a node's registration
//! ([`NodeRecord`], the `info` key) and a service's status on a node ([`StatusRecord`], the
//! `status/<name>` key). Fields are only ever added (readers ignore unknown ones, and every
//! field added later has a default), so agents and CLIs of different versions read each
//! other's records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An amount of the two resources placement looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Cores (a spec's `resources.cpu` × replicas when committed).
    pub cpu: f64,
    /// Bytes.
    pub memory: u64,
}

impl Resources {
    /// The sum of both.
    pub fn plus(&self, other: &Resources) -> Resources {
        Resources {
            cpu: self.cpu + other.cpu,
            memory: self.memory.saturating_add(other.memory),
        }
    }

    /// Whether `need` fits in `self` (a rounding error's slack on CPU).
    pub fn holds(&self, need: &Resources) -> bool {
        need.cpu <= self.cpu + 1e-9 && need.memory <= self.memory
    }

    /// What is left of `self` once `used` is taken (never below zero).
    pub fn minus(&self, used: &Resources) -> Resources {
        Resources {
            cpu: (self.cpu - used.cpu).max(0.0),
            memory: self.memory.saturating_sub(used.memory),
        }
    }
}

/// `<prefix>/v1/nodes/<node>/info`: written by the node's agent under a lease it keeps
/// alive, so the key exists exactly while the agent is connected (plus the lease's TTL).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The host's CPUs and memory.
    #[serde(default)]
    pub capacity: Resources,
    /// What the node's services may commit together: the capacity less what the agent
    /// keeps for the host (`--reserve`), times `--overcommit`. The agent refuses a spec that
    /// would take its services beyond it.
    #[serde(default)]
    pub allocatable: Resources,
    /// What the node's services ask for (limits × replicas; services without a limit count 0).
    #[serde(default)]
    pub committed: Resources,
    /// The part of `committed` that services the fleet did not give the node (local ones)
    /// ask for. With it, a placement counts the fleet's part from the spec keys themselves,
    /// which are ahead of what the agent reported. Absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_local: Option<Resources>,
    #[serde(default)]
    pub services: u32,
    #[serde(default)]
    pub instances: u32,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// The kernel's boot id: it changes when the host reboots.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub hostname: String,
    /// When the agent wrote this record (ms since the Unix epoch).
    #[serde(default)]
    pub updated_unix_ms: u64,
}

impl NodeRecord {
    pub fn free(&self) -> Resources {
        self.allocatable.minus(&self.committed)
    }
}

/// Whether the spec a status is about was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyState {
    /// The spec is the service's desired state on the node.
    #[default]
    Applied,
    /// The spec was refused (it does not parse or validate, or the host cannot enforce it);
    /// `error` says why. What ran before keeps running.
    Refused,
    /// Applying failed for a reason that may pass (the state directory could not be
    /// written): it is tried again.
    Retrying,
}

impl ApplyState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ApplyState::Applied => "applied",
            ApplyState::Refused => "refused",
            ApplyState::Retrying => "retrying",
        }
    }
}

/// The rollout a status reports: the running one, else the last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: String,
    /// running, succeeded, failed, superseded.
    pub state: String,
}

/// `<prefix>/v1/nodes/<node>/status/<name>`: the node agent's summary of one service it was
/// given in etcd, written when it changes (at most once a second per service).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub service: String,
    /// The etcd revision at which the spec this status is about was written (the
    /// `services/<name>` key's mod revision).
    pub spec_revision: i64,
    pub state: ApplyState,
    /// Why the spec was refused, or why applying it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The service's revision on the node (0: the node does not run it).
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    pub desired: u32,
    #[serde(default)]
    pub running: u32,
    #[serde(default)]
    pub healthy: u32,
    /// healthy, degraded or unhealthy.
    #[serde(default)]
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutRecord>,
    /// When the agent wrote this record (ms since the Unix epoch).
    #[serde(default)]
    pub updated_unix_ms: u64,
}

impl StatusRecord {
    /// The same report, ignoring when it was written: whether a new one is worth a write.
    pub fn same_as(&self, other: &StatusRecord) -> bool {
        StatusRecord {
            updated_unix_ms: 0,
            ..self.clone()
        } == StatusRecord {
            updated_unix_ms: 0,
            ..other.clone()
        }
    }

    /// The spec at `spec_revision` is applied, no rollout is running and every desired
    /// instance is healthy: what a fleet rollout waits for on each node.
    pub fn converged(&self, spec_revision: i64) -> bool {
        self.spec_revision == spec_revision
            && self.state == ApplyState::Applied
            && self.rollout.as_ref().is_none_or(|r| r.state != "running")
            && self.running == self.desired
            && self.healthy == self.desired
    }

    /// The rollout of this spec failed (or was refused): a fleet rollout stops here.
    pub fn failed(&self, spec_revision: i64) -> Option<String> {
        if self.spec_revision != spec_revision {
            return None;
        }
        match self.state {
            ApplyState::Refused => Some(format!("refused: {}", self.error)),
            _ => match &self.rollout {
                Some(r) if r.state == "failed" => Some(format!("rollout {} failed", r.id)),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_and_new_readers_agree() {
        // A record with a field a later version added is still read, and a record from an
        // earlier version missing optional fields too.
        let future = r#"{"service":"web","spec_revision":7,"state":"applied","desired":2,
            "running":2,"healthy":2,"health":"healthy","new_field":{"x":1}}"#;
        let s: StatusRecord = serde_json::from_str(future).expect("reads");
        assert!(s.converged(7));
        let old = r#"{"node":"n1"}"#;
        let n: NodeRecord = serde_json::from_str(old).expect("reads");
        assert_eq!(n.node, "n1");
    }

    #[test]
    fn convergence() {
        let base = StatusRecord {
            service: "web".into(),
            spec_revision: 5,
            desired: 2,
            running: 2,
            healthy: 2,
            ..Default::default()
        };
        assert!(base.converged(5));
        assert!(!base.converged(6), "another revision");
        let rolling = StatusRecord {
            rollout: Some(RolloutRecord {
                id: "web-r2".into(),
                state: "running".into(),
            }),
            ..base.clone()
        };
        assert!(!rolling.converged(5));
        let unhealthy = StatusRecord {
            healthy: 1,
            ..base.clone()
        };
        assert!(!unhealthy.converged(5));
        let refused = StatusRecord {
            state: ApplyState::Refused,
            error: "replicas: bad".into(),
            ..base.clone()
        };
        assert!(!refused.converged(5));
        assert_eq!(refused.failed(5).as_deref(), Some("refused: replicas: bad"));
        assert_eq!(refused.failed(4), None);
        let failed = StatusRecord {
            rollout: Some(RolloutRecord {
                id: "web-r2".into(),
                state: "failed".into(),
            }),
            ..base.clone()
        };
        assert_eq!(failed.failed(5).as_deref(), Some("rollout web-r2 failed"));
        assert!(base.same_as(&StatusRecord {
            updated_unix_ms: 99,
            ..base.clone()
        }));
        assert!(!base.same_as(&unhealthy));
    }

    #[test]
    fn free_never_negative() {
        let n = NodeRecord {
            allocatable: Resources {
                cpu: 2.0,
                memory: 100,
            },
            committed: Resources {
                cpu: 3.0,
                memory: 50,
            },
            ..Default::default()
        };
        assert_eq!(
            n.free(),
            Resources {
                cpu: 0.0,
                memory: 50
            }
        );
    }
}
