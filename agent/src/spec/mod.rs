//! Service specs: the TOML format of `SPEC.md`, the raw model shared with the protobuf
//! conversion, validation that collects every error (field, value, reason), and the unit
//! syntax (sizes, durations). Pure: no I/O, imports nothing else from the crate.

mod types;

pub use types::*;
