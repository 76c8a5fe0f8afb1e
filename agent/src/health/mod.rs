//! Health: the probes of an instance (http, tcp, grpc, exec), each returning an [`Outcome`] that
//! says why, the per-instance schedule that runs them ([`Prober`]), and the pure rules that turn
//! outcomes into health: [`Tracker`] (thresholds, start period, `READY=1`), [`service_health`]
//! (a service from its instances) and [`may_restart_for_health`] (how many liveness restarts
//! may run at once).
//!
//! The path of a probe is `Probe --resolve(ports)--> Target --check--> Outcome`, repeated by a
//! [`Prober`] every `interval`, its [`ProbeReport`]s fed by the driver into the instance's
//! [`Tracker`], whose [`Change`]s become events and status.
//!
//! Pure, free of I/O and timers of their own: [`target`], [`tracker`], [`aggregate`] (time
//! comes in as arguments). [`probe`] and [`scheduler`] do the network I/O and own the tasks.
//! An exec probe runs inside the instance, so it goes through the [`ExecRunner`] trait, which
//! the runtime implements; this module never creates processes itself.
//!
//! Imports from the crate: `spec` only. Besides `api`, this is the one module that uses tonic:
//! the gRPC probe is a `grpc.health.v1` client (tonic-health), and nothing else of tonic.

pub mod aggregate;
pub mod probe;
pub mod scheduler;
pub mod target;
pub mod tracker;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use aggregate::{
    InstanceHealth, ServiceHealth, health_restart_limit, may_restart_for_health, service_health,
};
pub use probe::{ExecResult, ExecRunner, MAX_OUTPUT_TAIL, Outcome, check, output_tail};
pub use scheduler::{ProbeHandle, ProbeReport, Prober, first_delay};
pub use target::{Target, expand_ports, resolve};
pub use tracker::{Change, HealthState, Tracker};
