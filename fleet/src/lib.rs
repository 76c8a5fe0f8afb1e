//! The fleet's contract with etcd, shared by `corrald` (which converges its node to what etcd
//! says) and the `corral fleet` CLI (which writes what etcd says): the stable key layout
//! ([`keys`]), the JSON records kept beside the specs ([`records`]), how to connect
//! ([`connect`]), retry delays ([`backoff`]), the choice of nodes ([`placement`]), and reads
//! and writes of many keys within etcd's limits ([`bulk`]).
//!
//! Imports nothing from the agent or the CLI; the CLI never depends on the agent.

pub mod backoff;
pub mod bulk;
pub mod connect;
pub mod keys;
pub mod placement;
pub mod records;

pub use etcd_client;
