//! What the agent has done with its node's keys in etcd, kept in the state directory so a
//! restarted agent resumes its watch where it stopped: the etcd revision up to which every
//! change was handled, and per service key the spec revision last handled and its outcome.
//! (Whether a service is the fleet's is in the service's own record: its owner.) Pure
//! decisions on it are here too.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use corral_fleet::records::ApplyState;

use crate::store::{Store, StoreError};

const KIND: &str = "fleet";
const NAME: &str = "ledger";

/// One service key of this node, as last handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key's mod revision when it was handled.
    pub spec_revision: i64,
    pub state: ApplyState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Every change to this node's `services/` keys up to this etcd revision was handled;
    /// 0: none yet (the next session starts with a full read).
    pub revision: i64,
    pub services: BTreeMap<String, Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state fleet/ledger.json is not a ledger ({0}); remove it to read every key again")]
    Corrupt(serde_json::Error),
}

impl Ledger {
    pub fn load(store: &dyn Store) -> Result<Ledger, LedgerError> {
        let found = store.list(KIND)?.into_iter().find(|(name, _)| name == NAME);
        match found {
            Some((_, bytes)) => serde_json::from_slice(&bytes).map_err(LedgerError::Corrupt),
            None => Ok(Ledger::default()),
        }
    }

    pub fn save(&self, store: &dyn Store) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(self).expect("a ledger always serializes");
        store.put(KIND, NAME, &bytes)
    }

    /// Whether the key of `name` at `spec_revision` still needs handling: not yet seen at
    /// that revision, or seen and left to retry.
    pub fn needs_apply(&self, name: &str, spec_revision: i64) -> bool {
        match self.services.get(name) {
            Some(e) => e.spec_revision < spec_revision || e.state == ApplyState::Retrying,
            None => true,
        }
    }

    /// After a full read of the node's keys: the services whose key is gone.
    pub fn gone(&self, present: &BTreeSet<&str>) -> Vec<String> {
        self.services
            .keys()
            .filter(|n| !present.contains(n.as_str()))
            .cloned()
            .collect()
    }

    /// Record how handling the key of `name` at `spec_revision` ended.
    pub fn record(&mut self, name: &str, spec_revision: i64, state: ApplyState, error: String) {
        self.services.insert(
            name.to_string(),
            Entry {
                spec_revision,
                state,
                error,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn decisions() {
        let mut l = Ledger::default();
        assert!(l.needs_apply("web", 5));
        l.record("web", 5, ApplyState::Applied, String::new());
        assert!(!l.needs_apply("web", 5), "same revision: nothing to do");
        assert!(!l.needs_apply("web", 4), "an older event replayed");
        assert!(l.needs_apply("web", 6));
        l.record("db", 7, ApplyState::Retrying, "disk full".into());
        assert!(l.needs_apply("db", 7), "retried");
        l.record("local", 8, ApplyState::Refused, "bad".into());
        assert!(
            !l.needs_apply("local", 8),
            "a refusal stands until the key changes"
        );
        let present = BTreeSet::from(["web"]);
        assert_eq!(l.gone(&present), ["db", "local"]);
    }

    #[test]
    fn survives_a_restart_and_says_when_corrupt() {
        let store = MemStore::new();
        assert_eq!(Ledger::load(&store).expect("empty"), Ledger::default());
        let mut l = Ledger {
            revision: 42,
            ..Default::default()
        };
        l.record("web", 40, ApplyState::Applied, String::new());
        l.save(&store).expect("saved");
        assert_eq!(Ledger::load(&store).expect("loaded"), l);
        store.put(KIND, NAME, b"{not json").expect("put");
        let e = Ledger::load(&store).expect_err("corrupt").to_string();
        assert!(e.contains("remove it"), "{e}");
    }
}
