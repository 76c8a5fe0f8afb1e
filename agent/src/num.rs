//! Conversions between integer widths that cannot silently wrap.
//!
//! The workspace denies the lossy `as` casts (`cast_possible_truncation`, `cast_sign_loss`,
//! `cast_possible_wrap`); these are the few shapes the agent needs again and again. Each one
//! saturates: a duration of more than 584 million years in milliseconds, or a count of more
//! than four billion items, is reported as the largest value rather than as a small one.

use std::time::Duration;

/// `d` in whole milliseconds, saturating at `u64::MAX`.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `d` in whole microseconds, saturating at `u64::MAX`.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A count as a `u32`, saturating at `u32::MAX`.
pub fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A byte offset or length read from a file (`u64`) as an in-memory length, saturating at
/// `usize::MAX` (only reachable on targets narrower than 64 bits).
pub fn len_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A pid or descriptor a raw syscall returned as a `long`, known to be non-negative.
///
/// The kernel's pid_max is at most 2^22 and descriptors are below RLIMIT_NOFILE's hard
/// ceiling (2^30), so a non-negative return always fits an `i32`.
#[allow(clippy::cast_possible_truncation)]
pub fn syscall_int(ret: libc::c_long) -> i32 {
    debug_assert!((0..=i64::from(i32::MAX)).contains(&ret));
    ret as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_saturate_instead_of_wrapping() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(micros(Duration::from_micros(7)), 7);
        assert_eq!(micros(Duration::MAX), u64::MAX);
        assert_eq!(count_u32(3), 3);
        assert_eq!(count_u32(usize::MAX), u32::MAX);
        assert_eq!(len_usize(42), 42);
    }
}
