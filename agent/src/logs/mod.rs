//! The instances' log files: their format ([`format`]), the writer the init turns a service's
//! output into records with ([`writer`]), and their reading for the gRPC `Logs` call: the last
//! records of an instance (`corral logs --tail`) and following them as they are written
//! (`corral logs -f`).
//!
//! Records are written by each instance's init (see [`crate::runtime`]) through [`writer`],
//! and read here. Rotation is by rename (`.k` → `.k+1`, live → `.1`, then a fresh live file),
//! so a reader holding the old file can finish it. Payloads are converted to text lossily.
//! Lines without a timestamp (files of an older format) are records with no time.
//!
//! A record is only returned once complete: the unterminated end of a live file is the writer
//! mid-write and waits for its `\n`. The unterminated end of a rotated file will never grow, so
//! it is returned as a record of its own. Lines longer than [`MAX_RECORD`] bytes (only
//! possible in old files: the writer splits long lines) are returned in pieces.
//!
//! Memory stays bounded whatever the sizes of the files: `tail` reads backwards in blocks from
//! the end, following reads forward in bounded steps.
//!
//! Imports from the crate: nothing.

mod files;
mod follow;
pub mod format;
mod merge;
mod read;
pub mod writer;

#[cfg(test)]
mod testutil;

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use follow::Follower;
pub use format::{MAX_PAYLOAD, MAX_RECORD, Stream, TIMESTAMP_LEN, parse, parse_record};
pub use merge::Merged;
pub use read::{Tail, read_instance};

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

/// One record of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub instance: String,
    /// The run of the instance that wrote it; `None` for lines of older files.
    pub incarnation: Option<u64>,
    pub stream: Stream,
    /// When the init read it from the service; `None` for lines of files without timestamps.
    pub time: Option<SystemTime>,
    /// The payload, without the timestamp and the `\n`; invalid UTF-8 replaced by U+FFFD.
    pub text: String,
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
