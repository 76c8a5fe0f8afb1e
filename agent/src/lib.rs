//! corrald, the corral node agent, as a library: the binary `corrald` composes these modules,
//! and the tests drive them in-process.
//!
//! - [`spec`]: service specs (TOML and the raw model), validation, instance keys. Pure.
//! - [`artifact`]: the artifact and OCI image store: fetch, verify, unpack, cache.
//! - [`supervisor`]: desired state -> running instances; pure cores plus the driver task.
//! - [`runtime`]: spawning instances (clone3 into namespaces and cgroup), their init, exec probes.
//! - [`cgroups`]: the cgroup v1/v2 backends behind one trait.
//! - [`health`]: probes, health tracking, service health.
//! - [`events`]: the indexed, persisted node event log and its watches.
//! - [`logs`]: instance logs: their record format, the init's writer, tailing and following.
//! - [`rollout`]: the rollout planner (surge, unavailability, health gates). Pure.
//! - [`schedule`]: when scheduled jobs run (cron in a time zone, catch-up, jitter,
//!   concurrency). Pure.
//! - [`store`]: crash-safe persistence of the desired state.
//! - [`host`]: host facts for the node report.
//! - [`fleet`]: the node's part in a fleet on etcd (registration, watch, status).
//! - [`api`]: the gRPC layer.
//! - [`metrics`]: Prometheus metrics at `/metrics`: their collector, the API's layer, the
//!   HTTP endpoint.
//! - [`sdnotify`]: readiness, watchdog and stopping notifications to systemd.

pub mod accept;
pub mod api;
pub mod artifact;
pub mod autoscale;
pub mod cgroups;
pub mod events;
pub mod fleet;
pub mod health;
pub mod host;
pub mod logs;
pub mod metrics;
pub mod num;
pub mod phases;
pub mod procfs;
pub mod rollout;
pub mod runtime;
pub mod schedule;
pub mod sdnotify;
pub mod spec;
pub mod store;
pub mod supervisor;
