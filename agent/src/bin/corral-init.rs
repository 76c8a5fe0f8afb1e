//! `corral-init`: the per-instance init as its own small executable (no async runtime, no
//! API code), so that starting an instance maps and relocates as little as possible.
//! `corrald` runs it from its own directory when present, and falls back to running itself
//! under this name otherwise. On Linux it is linked statically and without PIE (the rustc
//! wrapper named in `.cargo/config.toml` adds the flags to this crate only): every instance
//! keeps one resident, and a static executable has no loader, shared libraries or
//! relocated pages of its own to keep.
//!
//! It starts at the C `main`, without the standard library's runtime setup, which every
//! instance start would pay for and the init does not use: checking that fds 0-2 are open
//! (the spawn path places them), setting `SIGPIPE` to ignored (the init sets it itself,
//! below), and finding the main thread's stack in `/proc/self/maps` to install a stack
//! overflow handler on an alternate signal stack (an overflow still ends the process, on
//! the kernel's guard gap, only without the message). `std::env::args` still works: on
//! Linux the standard library takes the arguments from the C runtime before `main`.
//! A panic is caught and ends the process with status 101, as a panicking `main` would.

#![no_main]

/// The C entry point.
#[unsafe(no_mangle)]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // A write to a pipe whose reader is gone must fail with EPIPE, not kill the init (the
    // standard library's setup does the same). The service gets the default back at exec:
    // the init's service child resets it before executing.
    // SAFETY: setting a signal's disposition to "ignore" has no handler to be safe about.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    match std::panic::catch_unwind(corral_agent::runtime::init::status) {
        Ok(status) => std::ffi::c_int::from(status),
        Err(_) => 101,
    }
}
