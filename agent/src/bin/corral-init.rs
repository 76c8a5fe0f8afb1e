//! `corral-init`: the per-instance init as its own small executable (no async runtime, no
//! API code), so that starting an instance maps and relocates as little as possible.
//! `corrald` runs it from its own directory when present, and falls back to running itself
//! under this name otherwise. On Linux it is linked statically and without PIE (the rustc
//! wrapper named in `.cargo/config.toml` adds the flags to this crate only): every instance
//! keeps one resident, and a static executable has no loader, shared libraries or
//! relocated pages of its own to keep.

fn main() -> std::process::ExitCode {
    corral_agent::runtime::init::main()
}
