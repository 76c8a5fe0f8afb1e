//! Service specs: the TOML format of `SPEC.md`, the raw model shared with the protobuf
//! conversion, validation that collects every error (field, value, reason), and the unit
//! syntax (sizes, durations). Pure: no I/O, imports nothing else from the crate.
//!
//! The path of a spec is `text --read_toml--> RawSpec --validate--> ServiceSpec`, or both at
//! once with [`parse_toml`]. A protobuf message is converted into a [`RawSpec`] elsewhere and
//! validated the same way. [`ServiceSpec::to_raw`] goes back to the canonical raw form, with
//! every default written out. Every error names its field as written in a spec file
//! (`resources.memory`, `sockets[1].listen`, `env.FOO`), quotes the value as given (except
//! env values, which may be secrets) and says why.
//!
//! Defaults, as documented on the fields of [`ServiceSpec`]: 1 replica, no resource limits
//! (and the agent's open-file limit), the pid, mount, uts and ipc namespaces with a private
//! /tmp and a writable root, no capabilities for a non-root user and Docker's default set
//! for root, hostname = instance id,
//! workdir `/`, the agent's user, restart always with backoff 100ms up to 30s, no health
//! section (when present: every 2s, timeout 1s, no start period, 3 failures, 1 success,
//! restart on failure, no notify), rollout surge 1 / unavailable 0 / healthy 2s within 60s /
//! auto rollback, stop with SIGTERM then SIGKILL after 10s, logs 5 files of 10MiB.

pub mod artifact;
mod canonical;
mod changes;
mod error;
pub mod job;
mod key;
pub mod labels;
mod read;
mod types;
mod units;
mod validate;

#[cfg(test)]
mod tests;

pub use error::{FieldError, SpecError};
pub use key::{InstanceKey, NotAnInstanceId};
pub use read::{SYNTAX_FIELD, TOP_KEYS, read_toml};
pub use types::*;
pub use units::{
    format_duration, format_size, parse_duration, parse_size, signal_by_name, signal_name,
};
pub use validate::{DEFAULT_HOSTNAME, MAX_REPLICAS, instance_id, valid_service_name};

/// Reads and validates a spec file. Every problem is reported at once: syntax (then nothing
/// else), unknown fields, wrong types and every validation rule, without reporting a field
/// twice (a value of the wrong type is not also called missing).
pub fn parse_toml(text: &str) -> Result<ServiceSpec, SpecError> {
    let outcome = read::read(text);
    if outcome.syntax_error {
        return Err(SpecError {
            errors: outcome.errors,
        });
    }
    let invalid = match outcome.raw.validate() {
        Ok(spec) if outcome.errors.is_empty() => return Ok(spec),
        Ok(_) => Vec::new(),
        Err(invalid) => invalid.errors,
    };
    let mut errors = outcome.errors.clone();
    errors.extend(
        invalid
            .into_iter()
            .filter(|error| !outcome.explains(&error.field)),
    );
    Err(SpecError { errors })
}
