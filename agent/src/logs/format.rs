//! The log record format, shared by its writer (the init, [`super::writer`]) and its readers
//! ([`super::read_instance`], [`super::Follower`]): the one place that says what a record is.
//!
//! - one directory per instance, `<state-dir>/logs/<instance>/`, one live file per
//!   [`Stream`] (`stdout.log`, `stderr.log`) and its rotated predecessors `stdout.log.1`
//!   (newest) … `stdout.log.N` (oldest);
//! - one record per line: a fixed-width RFC 3339 UTC timestamp with microseconds
//!   ([`TIMESTAMP_LEN`] bytes), a space, the payload, `\n`:
//!   `2026-11-22T23:45:01.123456Z hello`. Since incarnations exist, the timestamp is followed
//!   by `/` and the run's incarnation id in 16 lower-case hex digits ([`INCARNATION_LEN`]
//!   bytes with the `/`) before the space: `2026-11-22T23:45:01.123456Z/00c0ffee12345678 hello`,
//!   so that every record says which run of the instance wrote it (a line of an older file
//!   has none). Payloads never hold `\n` and may hold any other
//!   bytes. The writer splits a longer line into payloads of [`MAX_PAYLOAD`] bytes, so no
//!   record it writes is longer than [`MAX_RECORD`]; readers return longer lines (files of
//!   older releases) in pieces of that size;
//! - records the init writes itself start with [`NOTICE_PREFIX`].
//!
//! Imports from the crate: nothing.

use std::fmt;
use std::time::SystemTime;

/// Length of a record's timestamp, `2026-11-22T23:45:01.123456Z`.
pub const TIMESTAMP_LEN: usize = 27;

/// The longest payload of one record; the writer splits longer lines.
pub const MAX_PAYLOAD: usize = 16 * 1024;

/// Length of a record's incarnation tag, `/00c0ffee12345678`.
pub const INCARNATION_LEN: usize = 17;

/// The longest record the writer writes (timestamp, incarnation, space, payload; the `\n`
/// not counted). Readers return a longer line in pieces of this size.
pub const MAX_RECORD: usize = TIMESTAMP_LEN + INCARNATION_LEN + 1 + MAX_PAYLOAD;

/// The incarnation tag written after a record's timestamp: `/` and 16 hex digits.
pub fn incarnation_tag(incarnation: u64) -> String {
    format!("/{incarnation:016x}")
}

/// One record, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: Option<SystemTime>,
    /// The run that wrote it; `None` for records of older files.
    pub incarnation: Option<u64>,
    pub payload: &'a [u8],
}

/// Prefix of the records the init writes itself.
pub const NOTICE_PREFIX: &str = "[corral-init] ";

/// The record timestamp for `t`: [`TIMESTAMP_LEN`] bytes, e.g. `2026-11-22T23:45:01.123456Z`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Which output of the service a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Both streams, in the order used to break ties between equal times.
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// Name of the live file of this stream in an instance's log directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout.log",
            Stream::Stderr => "stderr.log",
        }
    }

    pub(super) fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Split a record into its time and payload. `line` is one line of a log file, with or without
/// its `\n`. A line that does not start with a valid timestamp and a space is all payload,
/// with no time.
pub fn parse_record(line: &[u8]) -> (Option<SystemTime>, &[u8]) {
    let r = parse(line);
    (r.time, r.payload)
}

/// Split a record into its time, incarnation and payload (see [`parse_record`]).
pub fn parse(line: &[u8]) -> Record<'_> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let whole = Record {
        time: None,
        incarnation: None,
        payload: line,
    };
    if line.len() <= TIMESTAMP_LEN || line[19] != b'.' || line[TIMESTAMP_LEN - 1] != b'Z' {
        return whole;
    }
    let (incarnation, rest) = match line[TIMESTAMP_LEN] {
        b' ' => (None, TIMESTAMP_LEN + 1),
        b'/' if line.len() > TIMESTAMP_LEN + INCARNATION_LEN
            && line[TIMESTAMP_LEN + INCARNATION_LEN] == b' ' =>
        {
            let hex = &line[TIMESTAMP_LEN + 1..TIMESTAMP_LEN + INCARNATION_LEN];
            let id = std::str::from_utf8(hex)
                .ok()
                .filter(|h| h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            match id {
                Some(id) => (Some(id), TIMESTAMP_LEN + INCARNATION_LEN + 1),
                None => return whole,
            }
        }
        _ => return whole,
    };
    let parsed = std::str::from_utf8(&line[..TIMESTAMP_LEN])
        .ok()
        .and_then(|s| humantime::parse_rfc3339(s).ok());
    match parsed {
        Some(time) => Record {
            time: Some(time),
            incarnation,
            payload: &line[rest..],
        },
        None => whole,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64, micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    #[test]
    fn timestamp_is_fixed_width() {
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH).len(), TIMESTAMP_LEN);
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn parse_incarnation_cases() {
        let t = at(1_795_391_101, 123_456);
        type Case<'a> = (&'a [u8], Option<SystemTime>, Option<u64>, &'a [u8]);
        let cases: &[Case<'_>] = &[
            (
                b"2026-11-22T23:45:01.123456Z/00c0ffee12345678 hello",
                Some(t),
                Some(0x00c0_ffee_1234_5678),
                b"hello",
            ),
            (
                b"2026-11-22T23:45:01.123456Z/ffffffffffffffff \n",
                Some(t),
                Some(u64::MAX),
                b"",
            ),
            // An older record: no incarnation.
            (b"2026-11-22T23:45:01.123456Z hi", Some(t), None, b"hi"),
            // Not hex, upper case, too short, no space after: all payload.
            (
                b"2026-11-22T23:45:01.123456Z/00c0ffee1234567g x",
                None,
                None,
                b"2026-11-22T23:45:01.123456Z/00c0ffee1234567g x",
            ),
            (
                b"2026-11-22T23:45:01.123456Z/00C0FFEE12345678 x",
                None,
                None,
                b"2026-11-22T23:45:01.123456Z/00C0FFEE12345678 x",
            ),
            (
                b"2026-11-22T23:45:01.123456Z/00c0ffee x",
                None,
                None,
                b"2026-11-22T23:45:01.123456Z/00c0ffee x",
            ),
            (
                b"2026-11-22T23:45:01.123456Z/00c0ffee12345678",
                None,
                None,
                b"2026-11-22T23:45:01.123456Z/00c0ffee12345678",
            ),
            // A bad time with a good tag.
            (
                b"2026-13-22T23:45:01.123456Z/00c0ffee12345678 x",
                None,
                None,
                b"2026-13-22T23:45:01.123456Z/00c0ffee12345678 x",
            ),
        ];
        for (line, time, inc, payload) in cases {
            let r = parse(line);
            let what = String::from_utf8_lossy(line);
            assert_eq!(r.time, *time, "time of {what:?}");
            assert_eq!(r.incarnation, *inc, "incarnation of {what:?}");
            assert_eq!(r.payload, *payload, "payload of {what:?}");
        }
        assert_eq!(incarnation_tag(0xab).len(), INCARNATION_LEN);
    }

    #[test]
    fn parse_record_cases() {
        // 2026-11-22T23:45:01Z is 1795391101 s after the epoch.
        let t = at(1_795_391_101, 123_456);
        let cases: &[(&[u8], Option<SystemTime>, &[u8])] = &[
            (
                b"2026-11-22T23:45:01.123456Z hello world",
                Some(t),
                b"hello world",
            ),
            (b"2026-11-22T23:45:01.123456Z hello\n", Some(t), b"hello"),
            (b"2026-11-22T23:45:01.123456Z ", Some(t), b""),
            (
                b"2026-11-22T23:45:01.123456Z [corral-init] 3 lines (120 bytes) dropped",
                Some(t),
                b"[corral-init] 3 lines (120 bytes) dropped",
            ),
            // A payload that itself looks like a timestamp stays payload.
            (
                b"2026-11-22T23:45:01.123456Z 2026-11-22T23:45:01.123456Z x",
                Some(t),
                b"2026-11-22T23:45:01.123456Z x",
            ),
            // Missing timestamp: lines of older files.
            (b"plain old line", None, b"plain old line"),
            (b"", None, b""),
            (b"\n", None, b""),
            // Timestamp without the space, or nothing after it: not a record header.
            (
                b"2026-11-22T23:45:01.123456Z",
                None,
                b"2026-11-22T23:45:01.123456Z",
            ),
            (
                b"2026-11-22T23:45:01.123456Zx",
                None,
                b"2026-11-22T23:45:01.123456Zx",
            ),
            // Garbage of the right shape.
            (
                b"2026-13-22T23:45:01.123456Z bad month",
                None,
                b"2026-13-22T23:45:01.123456Z bad month",
            ),
            (
                b"2026-11-22T23:45:01.12345xZ bad digit",
                None,
                b"2026-11-22T23:45:01.12345xZ bad digit",
            ),
            (
                b"2026-11-22 23:45:01.123456Z no T",
                None,
                b"2026-11-22 23:45:01.123456Z no T",
            ),
            (
                b"\xff\xfe26-11-22T23:45:01.123456Z bytes",
                None,
                b"\xff\xfe26-11-22T23:45:01.123456Z bytes",
            ),
            (
                b"2026-11-22T23:45:01.123+00:00 offset",
                None,
                b"2026-11-22T23:45:01.123+00:00 offset",
            ),
            // Non-UTF-8 payload after a valid timestamp.
            (
                b"2026-11-22T23:45:01.123456Z caf\xe9 \xff",
                Some(t),
                b"caf\xe9 \xff",
            ),
        ];
        for (line, time, payload) in cases {
            let (got_time, got_payload) = parse_record(line);
            assert_eq!(
                got_time,
                *time,
                "time of {:?}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(
                got_payload,
                *payload,
                "payload of {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn parse_record_round_trips_the_writer_format() {
        for t in [at(0, 0), at(1_795_391_101, 1), at(4_102_444_799, 999_999)] {
            let line = format!("{} payload", timestamp(t));
            assert_eq!(line.len(), TIMESTAMP_LEN + 8);
            assert_eq!(parse_record(line.as_bytes()), (Some(t), &b"payload"[..]));
        }
    }
}
