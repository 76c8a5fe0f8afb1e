//! The unit syntax of spec files: sizes, durations and signal names.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::error::quote;

/// Size units, largest first. Binary multiples only: `MB` and friends are refused rather
/// than guessed.
const SIZE_UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// Parses a size: digits (bytes), or digits followed directly by `B`, `KiB`, `MiB`, `GiB` or
/// `TiB` (case-sensitive, no space, no fraction). The error is the whole reason, value
/// quoted: `"12XB" is not a size (...)`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let not_a_size = || {
        format!(
            "{} is not a size (use bytes or a number with KiB, MiB, GiB or TiB)",
            quote(s)
        )
    };
    let too_large = || format!("{} is too large (at most {} bytes)", quote(s), u64::MAX);
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(not_a_size());
    }
    let multiple = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, multiple)| *multiple)
            .ok_or_else(not_a_size)?
    };
    // Only ASCII digits are left, so the parse fails only on overflow.
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    number.checked_mul(multiple).ok_or_else(too_large)
}

/// Formats a size the way [`parse_size`] reads it: with the largest unit that divides it
/// exactly (`"256MiB"`), else as plain digits (`"1000"`).
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    SIZE_UNITS
        .iter()
        .filter(|(name, _)| *name != "B")
        .find(|(_, multiple)| bytes.is_multiple_of(*multiple))
        .map(|(name, multiple)| format!("{}{name}", bytes / multiple))
        .unwrap_or_else(|| bytes.to_string())
}

/// Parses a humantime duration: `"100ms"`, `"10s"`, `"1m 30s"`, `"2h"`. Negative or
/// unreadable values are refused with the whole reason, value quoted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{} is not a duration (it is negative)", quote(s)));
    }
    humantime::parse_duration(s).map_err(|error| {
        let why = match error {
            humantime::DurationError::UnknownUnit { unit, value, .. } if unit.is_empty() => {
                format!("a unit is needed, e.g. \"{value}s\" or \"{value}ms\"")
            }
            humantime::DurationError::UnknownUnit { unit, .. } => format!(
                "unknown unit {}; use ns, us, ms, s, m, h, d or w",
                quote(&unit)
            ),
            humantime::DurationError::NumberOverflow => "it is too large".to_owned(),
            _ => "use e.g. \"100ms\", \"10s\" or \"1m 30s\"".to_owned(),
        };
        format!("{} is not a duration ({why})", quote(s))
    })
}

/// Formats a duration the way [`parse_duration`] reads it: `"100ms"`, `"1m 30s"`, `"0s"`.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The signals a spec may name.
const SIGNALS: [Signal; 30] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGILL,
    Signal::SIGTRAP,
    Signal::SIGABRT,
    Signal::SIGBUS,
    Signal::SIGFPE,
    Signal::SIGKILL,
    Signal::SIGUSR1,
    Signal::SIGSEGV,
    Signal::SIGUSR2,
    Signal::SIGPIPE,
    Signal::SIGALRM,
    Signal::SIGTERM,
    Signal::SIGCHLD,
    Signal::SIGCONT,
    Signal::SIGSTOP,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGURG,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGWINCH,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGSYS,
];

/// The number and canonical name of a signal named `SIGTERM`, `TERM` or `sigterm` (any
/// case, `SIG` optional). Covers the standard signals (HUP, INT, QUIT, KILL, USR1, USR2,
/// TERM, ALRM, CONT, STOP, TSTP, WINCH, PWR and the rest of POSIX); real-time signals and
/// numbers are not accepted.
pub fn signal_by_name(s: &str) -> Option<(i32, &'static str)> {
    let upper = s.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|signal| signal.as_str().strip_prefix("SIG") == Some(short))
        .map(|signal| (*signal as i32, signal.as_str()))
}

/// The canonical name of signal number `n` (`10` -> `SIGUSR1` on x86-64), for the standard
/// signals [`signal_by_name`] knows; `None` for real-time signals and numbers no signal has.
pub fn signal_name(n: i32) -> Option<&'static str> {
    SIGNALS
        .iter()
        .find(|signal| **signal as i32 == n)
        .map(|signal| signal.as_str())
}
