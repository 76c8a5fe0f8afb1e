//! The fleet: with `--etcd` and `--node`, the agent converges its node to what etcd says for
//! it (see `corral_fleet::keys` for the key layout). It registers the node under a lease it
//! keeps alive, watches its `services/` keys from the last revision it handled (kept in the
//! state directory; a full read when etcd compacted that revision away), applies each spec
//! through the supervisor exactly as the local API would (validation, admission, rollouts),
//! and writes each service's status back when it changes.
//!
//! Static stability: nothing here ever stops an instance because etcd is unreachable, slow or
//! refuses us. A broken session only marks the link disconnected (for `Node`) and is tried
//! again with backoff and jitter; what runs keeps running at its last applied state.
//!
//! Imports from the crate: `spec`, `store`, `events`, `host`, and the supervisor through
//! [`services::Services`] only (its handle speaks as the etcd [`Owner`](crate::supervisor::Owner):
//! the local API cannot change what the fleet gave the node unless forced, and the fleet
//! never takes over a local service).

pub mod ledger;
pub mod services;
mod session;
pub mod shared;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use corral_fleet::connect::EtcdConfig;
use corral_fleet::keys::Layout;

pub use session::Fleet;
pub use shared::{FleetReport, FleetShared, Link};

/// How this node takes part in the fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub etcd: EtcdConfig,
    pub layout: Layout,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The registration lease's TTL: the node leaves the registry this long after its agent
    /// stopped renewing it.
    pub lease_ttl: Duration,
    /// Keys per range request when the node reads all its services (at start and after a
    /// compaction): [`corral_fleet::bulk::DEFAULT_PAGE`] but in tests.
    pub page: usize,
}

/// The default registration lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// What the fleet reads besides etcd and the supervisor.
#[derive(Debug, Clone)]
pub struct FleetDeps {
    pub store: Arc<dyn crate::store::Store>,
    pub events: Arc<crate::events::EventLog>,
    pub host: Arc<crate::host::Host>,
    /// The admission policy: what the node record says is allocatable.
    pub capacity: crate::supervisor::capacity::CapacityPolicy,
}
