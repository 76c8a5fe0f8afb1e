//! corrald, the corral node agent, as a library: the binary `corrald` composes these modules,
//! and the tests drive them in-process.

pub mod cgroups;
pub mod spec;
