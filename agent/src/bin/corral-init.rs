//! `corral-init`: the per-instance init as its own small executable (no async runtime, no
//! API code), so that starting an instance maps and relocates as little as possible.
//! `corrald` runs it from its own directory when present, and falls back to running itself
//! under this name otherwise.

fn main() -> std::process::ExitCode {
    corral_agent::runtime::init::main()
}
