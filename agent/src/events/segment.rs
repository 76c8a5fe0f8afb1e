//! The log on disk: JSON Lines segments `<dir>/<first-index>.jsonl`, one event per line, each
//! segment holding the events from its first index up to the next segment's. Only the newest
//! segment is appended to; retention deletes whole segments from the old end.
//!
//! A line is written with one `write(2)` on an `O_APPEND` file as soon as it is appended: an
//! agent crash loses nothing that was appended, a crash in the middle of a write leaves a torn
//! last line, which [`Segments::load`] cuts off. Nothing is fsynced: a power loss may take the
//! last events with it, the price of an append that costs microseconds.
//!
//! Reading never trusts the content: a line that does not parse, is too long or is out of
//! order is skipped with a warning, never a panic, and never the rest of the log.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Event, EventError, Filter};

/// A line longer than this is not an event: it is skipped without being held in memory.
const MAX_LINE: usize = 1 << 20;

/// Indexes above this are not ones the log could have given out (it would take millennia):
/// a line or file name claiming one is corrupt.
const MAX_INDEX: u64 = 1 << 62;

/// Lines a replay reads per call, so one call holds neither a thread nor memory for long.
const REPLAY_BATCH: usize = 1024;

/// How many write failures in a row pass between two error logs (the first is always logged).
const ERROR_LOG_EVERY: u64 = 1000;

/// Events per segment for a log that keeps `keep`: about a tenth of it, so the files on disk
/// hold at most `keep + keep / 10` events, within bounds on file size and file count.
fn segment_len(keep: usize) -> u64 {
    (keep as u64 / 10).clamp(1, 10_000)
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first}.jsonl"))
}

/// The first index a segment file name stands for: canonical decimal, not 0.
fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".jsonl")?;
    let first: u64 = stem.parse().ok()?;
    (first > 0 && first <= MAX_INDEX && first.to_string() == stem).then_some(first)
}

/// The segment files in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<u64>, EventError> {
    let entries = fs::read_dir(dir).map_err(|source| EventError::Io {
        path: dir.to_path_buf(),
        what: "listing",
        source,
    })?;
    let mut firsts = Vec::new();
    for entry in entries.flatten() {
        let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) else {
            continue;
        };
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            firsts.push(first);
        } else {
            tracing::warn!(path = %entry.path().display(), "not a file, ignored");
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// One line as read.
enum Line<'a> {
    Text(&'a [u8]),
    TooLong,
}

/// Reads a segment line by line. A last line without its newline is not returned: it is kept
/// until the rest arrives (a line being written) or counted as torn (after a crash).
struct SegmentReader {
    first: u64,
    path: PathBuf,
    file: BufReader<File>,
    buf: Vec<u8>,
    /// `buf` holds a line already returned.
    returned: bool,
    too_long: bool,
    /// Bytes up to the end of the last complete line.
    complete: u64,
    /// Bytes read since then (a line not finished yet).
    partial: u64,
}

impl SegmentReader {
    fn open(dir: &Path, first: u64) -> io::Result<SegmentReader> {
        let path = segment_path(dir, first);
        let file = File::open(&path)?;
        Ok(SegmentReader::new(first, path, file, 0))
    }

    /// A reader of `file` from `offset`, the start of a line.
    fn new(first: u64, path: PathBuf, file: File, offset: u64) -> SegmentReader {
        SegmentReader {
            first,
            path,
            file: BufReader::with_capacity(64 * 1024, file),
            buf: Vec::new(),
            returned: false,
            too_long: false,
            complete: offset,
            partial: 0,
        }
    }

    /// A reader of the segment's last `lines` complete lines (and of what follows them): its
    /// start is found by reading the file backwards, so a load reads the newest events of a
    /// long segment, not all of it.
    fn open_tail(dir: &Path, first: u64, lines: usize) -> io::Result<SegmentReader> {
        let path = segment_path(dir, first);
        let mut file = File::open(&path)?;
        let offset = tail_offset(&file, lines)?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(SegmentReader::new(first, path, file, offset))
    }

    fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        if self.returned {
            self.buf.clear();
            self.too_long = false;
            self.returned = false;
        }
        loop {
            let available = match self.file.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(None);
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(available.len());
            if !self.too_long {
                if self.buf.len() + take > MAX_LINE {
                    self.too_long = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(&available[..take]);
                }
            }
            let used = newline.map_or(take, |n| n + 1);
            self.file.consume(used);
            self.partial += used as u64;
            if newline.is_some() {
                self.complete += self.partial;
                self.partial = 0;
                self.returned = true;
                return Ok(Some(if self.too_long {
                    Line::TooLong
                } else {
                    Line::Text(&self.buf)
                }));
            }
        }
    }

    /// The next event of the file; bad lines are skipped with a warning.
    fn next_event(&mut self) -> io::Result<Option<Event>> {
        loop {
            let offset = self.complete;
            let parsed = match self.next_line()? {
                None => return Ok(None),
                Some(Line::TooLong) => Err(format!("line longer than {MAX_LINE} bytes")),
                Some(Line::Text(text)) => serde_json::from_slice::<Event>(text)
                    .map_err(|e| e.to_string())
                    .and_then(|e| match e.index {
                        1..=MAX_INDEX => Ok(e),
                        index => Err(format!("index {index} out of range")),
                    }),
            };
            match parsed {
                Ok(event) => return Ok(Some(event)),
                Err(error) => tracing::warn!(
                    path = %self.path.display(),
                    offset,
                    %error,
                    "skipping an unreadable line of the event log"
                ),
            }
        }
    }
}

/// The segment being appended to.
#[derive(Debug)]
struct Current {
    first: u64,
    path: PathBuf,
    file: File,
    /// Bytes of complete lines in the file.
    len: u64,
    /// A failed write may have left a partial line that could not be cut off: the next
    /// write starts with a newline to end it.
    needs_newline: bool,
}

/// The segments of one log, and its writer.
#[derive(Debug)]
pub(super) struct Segments {
    dir: PathBuf,
    keep: u64,
    segment_len: u64,
    /// First index of every segment on disk, oldest first.
    firsts: VecDeque<u64>,
    current: Option<Current>,
    line: Vec<u8>,
    write_errors: u64,
    /// Failures since the last successful write.
    failing: u64,
    /// Failed attempts to start a new segment.
    roll_failures: u64,
}

/// What [`Segments::load`] found.
#[derive(Debug)]
pub(super) struct Loaded {
    pub segments: Segments,
    pub next: u64,
    /// The newest events, at most as many as asked for, oldest first.
    pub recent: VecDeque<Arc<Event>>,
}

impl Segments {
    /// Open the log in `dir` (creating it): find the segments, cut a torn last line, work out
    /// the next index and read the newest `recent` events back.
    pub fn load(dir: &Path, keep: usize, recent: usize) -> Result<Loaded, EventError> {
        let io_err = |path: &Path, what, source| EventError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| io_err(dir, "creating the directory", e))?;
        let firsts = list_segments(dir)?;

        let mut window: VecDeque<Arc<Event>> = VecDeque::new();
        let mut next = firsts.last().copied().unwrap_or(1);
        for (pos, &first) in firsts.iter().enumerate().rev() {
            let is_last = pos + 1 == firsts.len();
            let end = firsts.get(pos + 1).copied();
            let room = recent.saturating_sub(window.len());
            let (events, last) = read_segment(dir, first, end, room, is_last)?;
            if let Some(last) = last {
                next = next.max(last + 1);
            }
            for event in events.into_iter().rev() {
                window.push_front(Arc::new(event));
            }
            if window.len() >= recent {
                break;
            }
        }

        let current = match firsts.last() {
            Some(&first) => {
                let path = segment_path(dir, first);
                let file = open_append(&path).map_err(|e| io_err(&path, "opening", e))?;
                let len = file
                    .metadata()
                    .map_err(|e| io_err(&path, "reading the size", e))?
                    .len();
                Some(Current {
                    first,
                    path,
                    file,
                    len,
                    needs_newline: false,
                })
            }
            None => None,
        };
        let mut segments = Segments {
            dir: dir.to_path_buf(),
            keep: keep.max(1) as u64,
            segment_len: segment_len(keep),
            firsts: firsts.into(),
            current,
            line: Vec::with_capacity(512),
            write_errors: 0,
            failing: 0,
            roll_failures: 0,
        };
        segments.trim(next);
        Ok(Loaded {
            segments,
            next,
            recent: window,
        })
    }

    /// The first index kept on disk.
    pub fn oldest(&self) -> Option<u64> {
        self.firsts.front().copied()
    }

    pub fn firsts(&self) -> Vec<u64> {
        self.firsts.iter().copied().collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    /// Write `event` (the next index) at the end of the log, starting a new segment and
    /// deleting old ones when it is time. Failures are logged and counted, never returned:
    /// the event still exists for the watchers in memory.
    pub fn append(&mut self, event: &Event) {
        self.line.clear();
        if let Err(e) = serde_json::to_writer(&mut self.line, event) {
            // Cannot happen for these types (string keys, no maps); counted all the same.
            self.failed(event.index, "serializing", &io::Error::other(e));
            return;
        }
        self.line.push(b'\n');

        let roll = self
            .current
            .as_ref()
            .is_none_or(|c| event.index.saturating_sub(c.first) >= self.segment_len);
        if roll && let Err((path, e)) = self.start_segment(event.index) {
            if self.current.is_none() {
                self.failed_at(&path, event.index, "creating a segment", &e);
                return;
            }
            // Go on in the old segment: its name still says where it starts.
            if self.roll_failures.is_multiple_of(ERROR_LOG_EVERY) {
                tracing::warn!(path = %path.display(), error = %e, "cannot start a new event log segment");
            }
            self.roll_failures += 1;
        }
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        let result = (|| {
            if cur.needs_newline {
                cur.file.write_all(b"\n")?;
                cur.needs_newline = false;
                cur.len += 1;
            }
            cur.file.write_all(&self.line)
        })();
        match result {
            Ok(()) => {
                cur.len += self.line.len() as u64;
                if self.failing > 0 {
                    tracing::warn!(
                        path = %cur.path.display(),
                        lost = self.failing,
                        "writing the event log works again; the events that failed are missing on disk"
                    );
                    self.failing = 0;
                }
            }
            Err(e) => {
                // Cut off what part of the line made it, so the next line starts clean.
                if cur.file.set_len(cur.len).is_err() {
                    cur.needs_newline = true;
                }
                let path = cur.path.clone();
                self.failed_at(&path, event.index, "writing", &e);
            }
        }
        self.trim(event.index + 1);
    }

    fn failed(&mut self, index: u64, what: &str, e: &io::Error) {
        let path = self.dir.clone();
        self.failed_at(&path, index, what, e);
    }

    fn failed_at(&mut self, path: &Path, index: u64, what: &str, e: &io::Error) {
        self.write_errors += 1;
        if self.failing.is_multiple_of(ERROR_LOG_EVERY) {
            tracing::error!(
                path = %path.display(),
                index,
                what,
                error = %e,
                failures = self.write_errors,
                "event log write failed; the event reaches live watchers only"
            );
        }
        self.failing += 1;
    }

    fn start_segment(&mut self, first: u64) -> Result<(), (PathBuf, io::Error)> {
        let path = segment_path(&self.dir, first);
        let file = open_append(&path).map_err(|e| (path.clone(), e))?;
        let len = file.metadata().map_err(|e| (path.clone(), e))?.len();
        if self.firsts.back() != Some(&first) {
            self.firsts.push_back(first);
        }
        self.current = Some(Current {
            first,
            path,
            file,
            len,
            needs_newline: false,
        });
        Ok(())
    }

    /// Delete the oldest segments while the newer ones still hold `keep` events.
    fn trim(&mut self, next: u64) {
        while self.firsts.len() > 1 && next.saturating_sub(self.firsts[1]) >= self.keep {
            let Some(first) = self.firsts.pop_front() else {
                break;
            };
            let path = segment_path(&self.dir, first);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "cannot delete an old event log segment"
                ),
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Read the segment starting at `first` (its events must lie below `end`): the last `room`
/// valid events and the highest valid index. For the last segment, a torn last line is cut
/// off the file so that appending continues on a line of its own.
fn read_segment(
    dir: &Path,
    first: u64,
    end: Option<u64>,
    room: usize,
    is_last: bool,
) -> Result<(VecDeque<Event>, Option<u64>), EventError> {
    let path = segment_path(dir, first);
    let io_err = |what, source| EventError::Io {
        path: path.clone(),
        what,
        source,
    };
    // Only the newest `room` events are kept, and only the last index counts: the newest
    // lines are enough, unless too few of them were events (unreadable lines), then all are
    // read.
    let opened = match SegmentReader::open_tail(dir, first, room.max(1)) {
        Ok(r) if r.complete == 0 => Ok(r),
        Ok(mut tail) => match scan_segment(&path, &mut tail, first, end, room) {
            Ok(found) if found.1.is_some() && found.0.len() >= room => {
                return finish_segment(&path, tail, found, is_last);
            }
            Ok(_) => SegmentReader::open(dir, first),
            Err(e) => return Err(io_err("reading", e)),
        },
        Err(e) => Err(e),
    };
    let mut reader = match opened {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((VecDeque::new(), None)),
        Err(e) => return Err(io_err("opening", e)),
    };
    let found =
        scan_segment(&path, &mut reader, first, end, room).map_err(|e| io_err("reading", e))?;
    finish_segment(&path, reader, found, is_last)
}

/// The events `reader` reads that are in order (the newest `room` of them, the index of the
/// last).
fn scan_segment(
    path: &Path,
    reader: &mut SegmentReader,
    first: u64,
    end: Option<u64>,
    room: usize,
) -> io::Result<(VecDeque<Event>, Option<u64>)> {
    let mut events = VecDeque::new();
    let mut last: Option<u64> = None;
    while let Some(event) = reader.next_event()? {
        let in_order = event.index >= first
            && end.is_none_or(|end| event.index < end)
            && last.is_none_or(|last| event.index > last);
        if !in_order {
            tracing::warn!(
                path = %path.display(),
                index = event.index,
                "skipping an event out of order in the event log"
            );
            continue;
        }
        last = Some(event.index);
        if room > 0 {
            if events.len() == room {
                events.pop_front();
            }
            events.push_back(event);
        }
    }
    Ok((events, last))
}

/// What [`read_segment`] returns once `reader` is through: a torn last line of the newest
/// segment is cut off.
fn finish_segment(
    path: &Path,
    reader: SegmentReader,
    (events, last): (VecDeque<Event>, Option<u64>),
    is_last: bool,
) -> Result<(VecDeque<Event>, Option<u64>), EventError> {
    let io_err = |what, source| EventError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    if reader.partial > 0 {
        if is_last {
            tracing::warn!(
                path = %path.display(),
                bytes = reader.partial,
                "dropping a torn last line of the event log (a write interrupted by a crash)"
            );
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(reader.complete))
                .map_err(|e| io_err("cutting off a torn line", e))?;
        } else {
            tracing::warn!(
                path = %path.display(),
                bytes = reader.partial,
                "skipping an unterminated line at the end of an old event log segment"
            );
        }
    }
    Ok((events, last))
}

/// The offset of the start of the last `lines` complete lines of `file` (0 when it has no
/// more): just after the newline that ends the line before them. Bytes after the last newline
/// (a line being written, or torn) are not a line.
fn tail_offset(file: &File, lines: usize) -> io::Result<u64> {
    const CHUNK: usize = 64 * 1024;
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    // Newlines seen: the first ends the last complete line, the one after `lines` more ends
    // the line before the tail.
    let mut seen = 0usize;
    while end > 0 {
        let start = end.saturating_sub(CHUNK as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        file.read_exact_at(chunk, start)?;
        for (i, &b) in chunk.iter().enumerate().rev() {
            if b == b'\n' {
                seen += 1;
                if seen > lines {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

/// Where the log stood when a replay step began.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    /// First index held in memory: a replay from here on is served without the disk.
    pub window_start: u64,
    pub oldest: u64,
    pub firsts: Vec<u64>,
}

/// What one replay step read.
#[derive(Debug)]
pub(super) struct Batch {
    /// The events that pass the filter, in order.
    pub events: Vec<Event>,
    /// The next index to read.
    pub cursor: u64,
}

/// A watcher's position in the files while it replays from further back than memory holds.
#[derive(Debug)]
pub(super) struct Replay {
    dir: PathBuf,
    open: Option<SegmentReader>,
}

impl std::fmt::Debug for SegmentReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentReader")
            .field("path", &self.path)
            .field("complete", &self.complete)
            .finish_non_exhaustive()
    }
}

impl Replay {
    pub fn new(dir: PathBuf) -> Replay {
        Replay { dir, open: None }
    }

    /// Read on from `cursor` up to at most the start of memory (`snap.window_start`), one
    /// batch. Every index below the snapshot's window start was written before the snapshot,
    /// so an index missing from the files is one that failed to be written or was corrupted:
    /// it is skipped with a warning rather than waited for.
    pub fn read(
        &mut self,
        cursor: u64,
        snap: &Snapshot,
        filter: &Filter,
    ) -> Result<Batch, EventError> {
        let mut batch = Batch {
            events: Vec::new(),
            cursor,
        };
        match self.read_into(&mut batch, snap, filter) {
            // What was read before the error is delivered first; the next call meets it again.
            Err(e) if batch.events.is_empty() => Err(e),
            _ => Ok(batch),
        }
    }

    fn read_into(
        &mut self,
        batch: &mut Batch,
        snap: &Snapshot,
        filter: &Filter,
    ) -> Result<(), EventError> {
        let trimmed = |requested| EventError::Trimmed {
            requested,
            oldest: snap.oldest,
        };
        let mut lines = 0;
        while batch.cursor < snap.window_start && lines < REPLAY_BATCH {
            let cursor = batch.cursor;
            let wanted = snap.firsts.iter().rev().find(|&&f| f <= cursor).copied();
            let keep_open = self
                .open
                .as_ref()
                .is_some_and(|r| r.first <= cursor && wanted.is_none_or(|w| w <= r.first));
            if !keep_open {
                let first = wanted.ok_or_else(|| trimmed(cursor))?;
                self.open = Some(match SegmentReader::open(&self.dir, first) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(trimmed(cursor)),
                    Err(source) => {
                        return Err(EventError::Io {
                            path: segment_path(&self.dir, first),
                            what: "opening",
                            source,
                        });
                    }
                });
            }
            let Some(reader) = self.open.as_mut() else {
                break;
            };
            let event = reader.next_event().map_err(|source| EventError::Io {
                path: reader.path.clone(),
                what: "reading",
                source,
            })?;
            lines += 1;
            match event {
                Some(event) if event.index < cursor => {}
                Some(event) => {
                    batch.cursor = event.index + 1;
                    if filter.matches(&event) {
                        batch.events.push(event);
                    }
                }
                None => {
                    // The end of this segment: on to the next one, or to memory.
                    let first = reader.first;
                    self.open = None;
                    if cursor < snap.oldest {
                        // Retention deleted what follows while this segment was read.
                        return Err(trimmed(cursor));
                    }
                    let resume = snap
                        .firsts
                        .iter()
                        .find(|&&f| f > first)
                        .copied()
                        .unwrap_or(snap.window_start)
                        .min(snap.window_start);
                    if cursor < resume {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            from = cursor,
                            to = resume - 1,
                            "events missing from the event log files are skipped"
                        );
                        batch.cursor = resume;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tail_tests {
    use super::*;

    #[test]
    fn the_tail_starts_after_the_newline_before_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.jsonl");
        let at = |content: &[u8], lines: usize| {
            fs::write(&path, content).expect("write");
            tail_offset(&File::open(&path).expect("open"), lines).expect("tail")
        };
        assert_eq!(at(b"", 2), 0);
        assert_eq!(at(b"a\nb\nc\n", 2), 2, "b and c");
        assert_eq!(at(b"a\nb\nc\n", 3), 0, "all of it");
        assert_eq!(at(b"a\nb\nc\n", 9), 0);
        assert_eq!(at(b"a\nb\nc\ntorn", 1), 4, "c, and the torn line after it");
        assert_eq!(at(b"\n\n", 1), 1);
        // Across the 64 KiB chunks it reads backwards.
        let long = [
            vec![b'x'; 100_000],
            b"\n".to_vec(),
            vec![b'y'; 70_000],
            b"\n".to_vec(),
        ]
        .concat();
        assert_eq!(at(&long, 1), 100_001);
        assert_eq!(at(&long, 2), 0);
    }
}
