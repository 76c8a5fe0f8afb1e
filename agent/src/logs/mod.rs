//! Reading the instances' log files: the last records of an instance (`corral logs --tail`)
//! and following them as they are written (`corral logs -f`), for the gRPC `Logs` call.
//!
//! The files are written by each instance's init (see [`crate::runtime`]); this module owns
//! only their reading side and the format they share:
//!
//! - one directory per instance, `<state-dir>/logs/<instance>/`, holding `stdout.log` and
//!   `stderr.log` (the live files) and their rotated predecessors `stdout.log.1` (newest) …
//!   `stdout.log.N` (oldest). Rotation is by rename (`.k` → `.k+1`, live → `.1`, then a fresh
//!   live file), so a reader holding the old file can finish it;
//! - one record per line: a fixed-width RFC 3339 UTC timestamp with microseconds, a space, the
//!   payload, `\n` (`2026-11-22T23:45:01.123456Z hello`). Payloads never hold `\n` and may hold
//!   any other bytes; they are converted to text lossily. Lines without a timestamp (files of
//!   an older format) are records with no time.
//!
//! A record is only returned once complete: the unterminated end of a live file is the writer
//! mid-write and waits for its `\n`. The unterminated end of a rotated file will never grow, so
//! it is returned as a record of its own. Records longer than [`MAX_RECORD`] bytes (only
//! possible in old files: the writer splits long lines) are returned in pieces.
//!
//! Memory stays bounded whatever the sizes of the files: `tail` reads backwards in blocks from
//! the end, following reads forward in bounded steps.
//!
//! Imports from the crate: nothing.

mod files;
mod follow;
mod read;

#[cfg(test)]
mod testutil;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use follow::Follower;
pub use read::{Tail, read_instance};

/// Length of a record's timestamp, `2026-11-22T23:45:01.123456Z`.
pub const TIMESTAMP_LEN: usize = 27;

/// The longest record returned whole; longer lines come in pieces of this size.
pub const MAX_RECORD: usize = 256 * 1024;

/// Unit of reading: backwards for `tail`, forwards when following.
const BLOCK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("logs of {instance:?}: not a valid instance id")]
    InvalidInstance { instance: String },
    #[error("logs {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("logs: the reading task failed: {reason}")]
    Task { reason: String },
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

    fn index(self) -> usize {
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

/// One record of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub instance: String,
    pub stream: Stream,
    /// When the init read it from the service; `None` for lines of files without timestamps.
    pub time: Option<SystemTime>,
    /// The payload, without the timestamp and the `\n`; invalid UTF-8 replaced by U+FFFD.
    pub text: String,
}

/// Split a record into its time and payload. `line` is one line of a log file, with or without
/// its `\n`. A line that does not start with a valid timestamp and a space is all payload,
/// with no time.
pub fn parse_record(line: &[u8]) -> (Option<SystemTime>, &[u8]) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() <= TIMESTAMP_LEN
        || line[TIMESTAMP_LEN] != b' '
        || line[19] != b'.'
        || line[TIMESTAMP_LEN - 1] != b'Z'
    {
        return (None, line);
    }
    let parsed = std::str::from_utf8(&line[..TIMESTAMP_LEN])
        .ok()
        .and_then(|s| humantime::parse_rfc3339(s).ok());
    match parsed {
        Some(time) => (Some(time), &line[TIMESTAMP_LEN + 1..]),
        None => (None, line),
    }
}

/// Identity of a log file, stable across renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// A place in one stream's files: the file (by identity, so it is found again after it was
/// rotated) and the byte offset of the first record not yet returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePos {
    id: FileId,
    offset: u64,
}

impl FilePos {
    /// Offset in the file of the first record not yet returned.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Where reading an instance's logs stopped, per stream; what [`read_instance`] returns so
/// that a [`Follower`] continues without a gap or a duplicate. A stream without a position had
/// no file: everything that appears later is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    streams: [Option<FilePos>; 2],
}

impl Position {
    pub fn get(&self, stream: Stream) -> Option<FilePos> {
        self.streams[stream.index()]
    }

    fn set(&mut self, stream: Stream, pos: Option<FilePos>) {
        self.streams[stream.index()] = pos;
    }
}

/// Where a [`Follower`] starts on an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record kept, rotated files included.
    Beginning,
    /// The first record completed after the instance is added.
    End,
    /// The first record after what a [`read_instance`] returned.
    After(Position),
}

/// `<dir>/<instance>`, refusing ids that would leave `dir`.
fn instance_dir(dir: &Path, instance: &str) -> Result<PathBuf, LogError> {
    let valid = !instance.is_empty()
        && instance.len() <= 255
        && !instance.starts_with('.')
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(LogError::InvalidInstance {
            instance: instance.to_string(),
        });
    }
    Ok(dir.join(instance))
}

/// Lossy text of a payload.
fn text_of(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
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
            let line = format!("{} payload", humantime::format_rfc3339_micros(t));
            assert_eq!(line.len(), TIMESTAMP_LEN + 8);
            assert_eq!(parse_record(line.as_bytes()), (Some(t), &b"payload"[..]));
        }
    }

    #[test]
    fn non_utf8_payload_becomes_replacement_characters() {
        let (_, payload) = parse_record(b"2026-11-22T23:45:01.123456Z caf\xe9");
        assert_eq!(text_of(payload), "caf\u{fffd}");
    }

    #[test]
    fn instance_ids_cannot_leave_the_directory() {
        let root = Path::new("/state/logs");
        assert_eq!(
            instance_dir(root, "web-0").ok(),
            Some(PathBuf::from("/state/logs/web-0"))
        );
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "web 0", "a\0b"] {
            assert!(
                matches!(
                    instance_dir(root, bad),
                    Err(LogError::InvalidInstance { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
