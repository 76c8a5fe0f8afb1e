//! Timestamps of the start path, for `corral-bench`'s per-phase figures.
//!
//! With `corral::phases=debug` in the log filter the agent logs, in `CLOCK_MONOTONIC`
//! nanoseconds (the clock of the kernel's process events, which the benchmark reads for the
//! clone, fork and exec of the init and the service): when the API handler took an `Apply`,
//! when the supervisor had admitted and saved it, and for each instance start when it began,
//! when its cgroup was ready and when the runtime returned the init's PID. At any other level
//! the calls cost a filter check each.

/// The log target of the phase lines.
pub const TARGET: &str = "corral::phases";

/// `CLOCK_MONOTONIC` now, in nanoseconds (0 if the clock cannot be read).
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_moves_forward() {
        let a = super::now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::now_ns();
        assert!(a > 0 && b >= a + 2_000_000, "{a} then {b}");
    }
}
