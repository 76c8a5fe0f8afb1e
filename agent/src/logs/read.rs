//! The last records of an instance: its files read backwards, block by block, newest first,
//! both streams merged by time.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::files::{Opened, open_files, read_at};
use super::{
    BLOCK, FilePos, LogError, LogLine, MAX_RECORD, Position, Stream, instance_dir, parse, text_of,
};

/// What [`read_instance`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tail {
    /// Oldest first.
    pub lines: Vec<LogLine>,
    /// Right after the last complete record of each stream when it was read, whether or not
    /// `tail` and `since` let it through: where a [`super::Follower`] continues.
    pub position: Position,
}

/// The last `tail` records (all when `None`) of `instance`, whose files are in `dir/<instance>/`
/// (`dir` is `<state-dir>/logs`), both streams merged by time; with `since`, only the records
/// at or after it.
///
/// Files are read from the end, newest first, a block at a time, and reading stops as soon as
/// `tail` records are found or the records get older than `since`: the cost follows what is
/// returned, not the size of the files. The files are assumed to be in time order, which the
/// single writer of each stream ensures up to steps of the wall clock.
///
/// Merging: records are ordered by time, stdout before stderr on equal times, and each stream
/// keeps its own order. A record without a time sorts with the record after it in its stream
/// (it is treated as the newest when no record follows it), and `since` judges it the same way.
///
/// An instance without a directory or without files has no records: that is not an error here
/// (whether the instance exists is for the caller to know). An unterminated last record of a
/// live file is not returned: the writer is in the middle of it, and the returned position is
/// at its start so that a follower returns it once complete.
pub fn read_instance(
    dir: &Path,
    instance: &str,
    tail: Option<usize>,
    since: Option<SystemTime>,
) -> Result<Tail, LogError> {
    read_counted(dir, instance, tail, since).map(|(tail, _)| tail)
}

/// [`read_instance`], also returning how many bytes it read from the files.
pub(super) fn read_counted(
    dir: &Path,
    instance: &str,
    tail: Option<usize>,
    since: Option<SystemTime>,
) -> Result<(Tail, u64), LogError> {
    let idir = instance_dir(dir, instance)?;
    let mut position = Position::default();
    let mut streams = Vec::with_capacity(Stream::ALL.len());
    for stream in Stream::ALL {
        // Not a snapshot only while the writer rotates faster than the files can be listed:
        // then the listing is used as it is.
        let mut files = open_files(&idir, stream)?.files.into_iter();
        let mut rev = RevStream {
            stream,
            instance,
            current: None,
            older: Vec::new().into_iter(),
            carry: None,
            bytes_read: 0,
        };
        if let Some(newest) = files.next() {
            // The live file may end with a record being written; a rotated one is final.
            let live = newest.index == 0;
            let reader = RevReader::new(newest.file, newest.size, live)
                .map_err(|e| io_err(&newest.path, e))?;
            position.set(
                stream,
                Some(FilePos {
                    id: newest.id,
                    offset: reader.end(),
                }),
            );
            rev.current = Some((reader, newest.path));
        }
        rev.older = files.collect::<Vec<_>>().into_iter();
        streams.push(rev);
    }

    let limit = tail.unwrap_or(usize::MAX);
    let mut heads: Vec<Option<Rec>> = vec![None; streams.len()];
    let mut done = vec![false; streams.len()];
    let mut lines = Vec::new();
    while lines.len() < limit {
        for (i, s) in streams.iter_mut().enumerate() {
            if heads[i].is_some() || done[i] {
                continue;
            }
            match s.prev()? {
                Some(rec) if !too_old(&rec, since) => heads[i] = Some(rec),
                // The files are in time order: nothing older can be recent enough.
                Some(_) | None => done[i] = true,
            }
        }
        // The latest head goes first (this builds the result backwards); on equal times the
        // later stream, so that forwards stdout comes before stderr.
        let mut pick: Option<usize> = None;
        for (i, head) in heads.iter().enumerate() {
            let Some(h) = head else { continue };
            match pick.and_then(|p| heads[p].as_ref()) {
                Some(best) if later(best.key, h.key) => {}
                _ => pick = Some(i),
            }
        }
        let Some(i) = pick else { break };
        if let Some(rec) = heads[i].take() {
            lines.push(rec.line);
        }
    }
    lines.reverse();
    let bytes_read = streams.iter().map(RevStream::bytes_read).sum();
    Ok((Tail { lines, position }, bytes_read))
}

fn io_err(path: &Path, source: io::Error) -> LogError {
    LogError::Io {
        path: path.to_path_buf(),
        what: "reading",
        source,
    }
}

/// `a` after `b`, where `None` (a record with no time after it) is after everything.
pub(super) fn later(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    match (a, b) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(a), Some(b)) => a > b,
    }
}

fn too_old(rec: &Rec, since: Option<SystemTime>) -> bool {
    match (since, rec.key) {
        (Some(since), Some(key)) => key < since,
        _ => false,
    }
}

/// A record read backwards, with the time it sorts by.
#[derive(Debug, Clone)]
struct Rec {
    key: Option<SystemTime>,
    line: LogLine,
}

/// One stream's records backwards, across its files.
#[derive(Debug)]
struct RevStream<'a> {
    stream: Stream,
    instance: &'a str,
    current: Option<(RevReader, PathBuf)>,
    older: std::vec::IntoIter<Opened>,
    /// Time of the last timed record returned, the next one in file order.
    carry: Option<SystemTime>,
    bytes_read: u64,
}

impl RevStream<'_> {
    fn prev(&mut self) -> Result<Option<Rec>, LogError> {
        loop {
            let Some((reader, path)) = &mut self.current else {
                let Some(older) = self.older.next() else {
                    return Ok(None);
                };
                let reader = RevReader::new(older.file, older.size, false)
                    .map_err(|e| io_err(&older.path, e))?;
                self.current = Some((reader, older.path));
                continue;
            };
            match reader.prev().map_err(|e| io_err(path, e))? {
                Some(raw) => {
                    let r = parse(raw);
                    let time = r.time;
                    if time.is_some() {
                        self.carry = time;
                    }
                    return Ok(Some(Rec {
                        key: self.carry,
                        line: LogLine {
                            instance: self.instance.to_string(),
                            incarnation: r.incarnation,
                            stream: self.stream,
                            time,
                            text: text_of(r.payload),
                        },
                    }));
                }
                None => {
                    self.bytes_read += reader.bytes_read;
                    self.current = None;
                }
            }
        }
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read + self.current.as_ref().map_or(0, |(r, _)| r.bytes_read)
    }
}

/// The lines of a file from its end backwards, reading a block at a time: memory holds one
/// block plus at most one record.
#[derive(Debug)]
pub(super) struct RevReader {
    file: File,
    /// File offset of `buf[0]`.
    lo: u64,
    /// The bytes `[lo, lo + buf.len())` not yet returned (and, before the cut, the last
    /// returned record).
    buf: Vec<u8>,
    /// Where `buf` ends once the last returned record is dropped.
    cut: Option<usize>,
    bytes_read: u64,
}

impl RevReader {
    /// A reader of `file` (of `size` bytes) from its end. For a `live` file an unterminated
    /// last record is left out, as the writer is still writing it; an unterminated tail longer
    /// than [`MAX_RECORD`] is not waited for, and is returned in pieces.
    pub(super) fn new(file: File, size: u64, live: bool) -> io::Result<RevReader> {
        let mut r = RevReader {
            file,
            lo: size,
            buf: Vec::new(),
            cut: None,
            bytes_read: 0,
        };
        if live {
            loop {
                if let Some(i) = r.buf.iter().rposition(|&b| b == b'\n') {
                    r.buf.truncate(i + 1);
                    break;
                }
                if r.lo == 0 {
                    r.buf.clear();
                    break;
                }
                if r.buf.len() > MAX_RECORD {
                    break;
                }
                r.load()?;
            }
        }
        Ok(r)
    }

    /// Offset right after the last record this reader returns.
    pub(super) fn end(&self) -> u64 {
        self.lo + self.buf.len() as u64
    }

    /// Prepend the block before `lo`; false at the start of the file.
    fn load(&mut self) -> io::Result<bool> {
        if self.lo == 0 {
            return Ok(false);
        }
        let n = crate::num::len_usize(self.lo).min(BLOCK);
        let start = self.lo - n as u64;
        let mut block = vec![0; n + self.buf.len()];
        let mut filled = 0;
        while filled < n {
            let got = read_at(&self.file, &mut block[filled..n], start + filled as u64)?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while being read",
                ));
            }
            filled += got;
        }
        self.bytes_read += n as u64;
        block[n..].copy_from_slice(&self.buf);
        self.buf = block;
        self.lo = start;
        Ok(true)
    }

    /// File offset of the start of the record last returned (of the unread rest before the
    /// first call).
    pub(super) fn last_start(&self) -> u64 {
        self.lo + self.cut.unwrap_or(self.buf.len()) as u64
    }

    /// The record before the last one returned, without its `\n`.
    pub(super) fn prev(&mut self) -> io::Result<Option<&[u8]>> {
        if let Some(cut) = self.cut.take() {
            self.buf.truncate(cut);
        }
        loop {
            let Some(&last) = self.buf.last() else {
                if !self.load()? {
                    return Ok(None);
                }
                continue;
            };
            // Only the last record of a rotated file may lack its `\n`.
            let end = if last == b'\n' {
                self.buf.len() - 1
            } else {
                self.buf.len()
            };
            let start = if let Some(i) = self.buf[..end].iter().rposition(|&b| b == b'\n') {
                i + 1
            } else if self.lo == 0 || end > MAX_RECORD {
                0 // the first line of the file, or an over-long one
            } else {
                self.load()?;
                continue;
            };
            // Over-long: the last piece now, the rest (which has no `\n` left) the next time.
            let start = start.max(end.saturating_sub(MAX_RECORD));
            self.cut = Some(start);
            return Ok(Some(&self.buf[start..end]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{TestWriter, at, seq_of};
    use super::*;
    use std::fs;

    fn texts(tail: &Tail) -> Vec<String> {
        tail.lines.iter().map(|l| l.text.clone()).collect()
    }

    fn seqs(tail: &Tail) -> Vec<u64> {
        tail.lines.iter().map(|l| seq_of(&l.text)).collect()
    }

    /// `n` records `seq i` one second apart, in files of about `per_file` records.
    fn write_seq(dir: &Path, stream: Stream, n: u64, max_size: u64, max_files: u32) {
        let mut w = TestWriter::open(&dir.join("web-0"), stream, max_size, max_files);
        for i in 0..n {
            w.record(at(1000 + i, 0), &format!("seq {i}"));
        }
    }

    #[test]
    fn tail_spans_the_rotation_boundary() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 35 bytes a record, 10 per file.
        write_seq(dir.path(), Stream::Stdout, 25, 350, 5);
        let idir = dir.path().join("web-0");
        assert_eq!(
            fs::read_to_string(idir.join("stdout.log"))
                .expect("live")
                .lines()
                .count(),
            5
        );
        assert!(idir.join("stdout.log.2").exists());

        let t = read_instance(dir.path(), "web-0", Some(8), None).expect("read");
        assert_eq!(seqs(&t), (17..25).collect::<Vec<_>>());
        assert!(
            t.lines
                .iter()
                .all(|l| l.stream == Stream::Stdout && l.instance == "web-0" && l.time.is_some())
        );
        assert_eq!(t.lines[0].time, Some(at(1017, 0)));

        let t = read_instance(dir.path(), "web-0", Some(17), None).expect("read");
        assert_eq!(seqs(&t), (8..25).collect::<Vec<_>>());
        let all = read_instance(dir.path(), "web-0", None, None).expect("read");
        assert_eq!(seqs(&all), (0..25).collect::<Vec<_>>());
        let more = read_instance(dir.path(), "web-0", Some(1000), None).expect("read");
        assert_eq!(more, all);
        let none = read_instance(dir.path(), "web-0", Some(0), None).expect("read");
        assert!(none.lines.is_empty());
        assert_eq!(none.position, all.position);
        let live_len = fs::metadata(idir.join("stdout.log")).expect("stat").len();
        assert_eq!(
            all.position.get(Stream::Stdout).map(|p| p.offset()),
            Some(live_len)
        );
        assert_eq!(all.position.get(Stream::Stderr), None);
    }

    #[test]
    fn since_keeps_records_at_or_after_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_seq(dir.path(), Stream::Stdout, 40, 350, 10);
        let t = read_instance(dir.path(), "web-0", None, Some(at(1030, 0))).expect("read");
        assert_eq!(seqs(&t), (30..40).collect::<Vec<_>>());
        let t = read_instance(dir.path(), "web-0", None, Some(at(1029, 1))).expect("read");
        assert_eq!(seqs(&t), (30..40).collect::<Vec<_>>());
        let t = read_instance(dir.path(), "web-0", Some(3), Some(at(1030, 0))).expect("read");
        assert_eq!(seqs(&t), vec![37, 38, 39]);
        let t = read_instance(dir.path(), "web-0", Some(30), Some(at(1035, 0))).expect("read");
        assert_eq!(seqs(&t), (35..40).collect::<Vec<_>>());
        let t = read_instance(dir.path(), "web-0", None, Some(at(2000, 0))).expect("read");
        assert!(t.lines.is_empty());
        let t = read_instance(dir.path(), "web-0", None, Some(at(0, 0))).expect("read");
        assert_eq!(t.lines.len(), 40);
    }

    #[test]
    fn streams_are_merged_by_time_stdout_first_on_ties() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut out = TestWriter::open(&idir, Stream::Stdout, 1 << 20, 5);
        let mut err = TestWriter::open(&idir, Stream::Stderr, 1 << 20, 5);
        for (s, o) in [(1, "o1"), (3, "o3a"), (3, "o3b"), (5, "o5")] {
            out.record(at(s, 7), o);
        }
        for (s, e) in [(2, "e2"), (3, "e3"), (4, "e4"), (5, "e5")] {
            err.record(at(s, 7), e);
        }
        let t = read_instance(dir.path(), "web-0", None, None).expect("read");
        assert_eq!(
            texts(&t),
            ["o1", "e2", "o3a", "o3b", "e3", "e4", "o5", "e5"]
        );
        let streams: Vec<Stream> = t.lines.iter().map(|l| l.stream).collect();
        assert_eq!(streams[1], Stream::Stderr);
        assert_eq!(streams[2], Stream::Stdout);
        let t = read_instance(dir.path(), "web-0", Some(3), None).expect("read");
        assert_eq!(texts(&t), ["e4", "o5", "e5"]);
        let t = read_instance(dir.path(), "web-0", Some(5), Some(at(3, 7))).expect("read");
        assert_eq!(texts(&t), ["o3b", "e3", "e4", "o5", "e5"]);
        let t = read_instance(dir.path(), "web-0", None, Some(at(3, 7))).expect("read");
        assert_eq!(texts(&t), ["o3a", "o3b", "e3", "e4", "o5", "e5"]);
    }

    #[test]
    fn missing_and_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        // No directory at all: no records, no position.
        let t = read_instance(dir.path(), "web-0", Some(10), None).expect("missing dir");
        assert_eq!(t, Tail::default());
        let t = read_instance(&dir.path().join("nowhere"), "web-0", None, None).expect("missing");
        assert_eq!(t, Tail::default());
        // A directory with empty files: no records, positions at their starts.
        let idir = dir.path().join("web-1");
        fs::create_dir(&idir).expect("mkdir");
        fs::write(idir.join("stdout.log"), "").expect("write");
        let t = read_instance(dir.path(), "web-1", Some(10), None).expect("empty files");
        assert!(t.lines.is_empty());
        assert_eq!(t.position.get(Stream::Stdout).map(|p| p.offset()), Some(0));
        assert_eq!(t.position.get(Stream::Stderr), None);
        // A bad id is refused, not looked up.
        assert!(matches!(
            read_instance(dir.path(), "../web-1", None, None),
            Err(LogError::InvalidInstance { .. })
        ));
    }

    #[test]
    fn a_partial_last_record_waits_for_its_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, 1 << 20, 5);
        w.record(at(1, 0), "one");
        w.record(at(2, 0), "two");
        let complete = fs::metadata(idir.join("stdout.log")).expect("stat").len();
        w.raw(b"2026-11-22T23:45:01.123456Z thr");
        let t = read_instance(dir.path(), "web-0", None, None).expect("read");
        assert_eq!(texts(&t), ["one", "two"]);
        assert_eq!(
            t.position.get(Stream::Stdout).map(|p| p.offset()),
            Some(complete)
        );
        let t = read_instance(dir.path(), "web-0", Some(1), None).expect("read");
        assert_eq!(texts(&t), ["two"]);
        w.raw(b"ee\n");
        let t = read_instance(dir.path(), "web-0", Some(1), None).expect("read");
        assert_eq!(texts(&t), ["three"]);

        // Only a partial record: nothing yet, position 0.
        let mut w = TestWriter::open(&dir.path().join("web-1"), Stream::Stdout, 1 << 20, 5);
        w.raw(b"2026-11-22T23:45:01.123456Z no end yet");
        let t = read_instance(dir.path(), "web-1", None, None).expect("read");
        assert!(t.lines.is_empty());
        assert_eq!(t.position.get(Stream::Stdout).map(|p| p.offset()), Some(0));
    }

    #[test]
    fn a_rotated_file_ending_mid_record_keeps_that_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        fs::create_dir(&idir).expect("mkdir");
        fs::write(
            idir.join("stdout.log.1"),
            "2026-11-22T23:45:01.000000Z a\n2026-11-22T23:45:02.000000Z cut sho",
        )
        .expect("write");
        fs::write(idir.join("stdout.log"), "2026-11-22T23:45:03.000000Z c\n").expect("write");
        let t = read_instance(dir.path(), "web-0", None, None).expect("read");
        assert_eq!(texts(&t), ["a", "cut sho", "c"]);
        // With the live file gone (between a rotation's rename and the new file), the newest
        // rotated file is final: its last record is returned and the position is its end.
        fs::remove_file(idir.join("stdout.log")).expect("rm");
        let t = read_instance(dir.path(), "web-0", None, None).expect("read");
        assert_eq!(texts(&t), ["a", "cut sho"]);
        let len = fs::metadata(idir.join("stdout.log.1")).expect("stat").len();
        assert_eq!(
            t.position.get(Stream::Stdout).map(|p| p.offset()),
            Some(len)
        );
    }

    #[test]
    fn lines_without_timestamps_are_kept_next_to_their_neighbours() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        fs::create_dir(&idir).expect("mkdir");
        // An old-format rotated file, then timestamped records.
        fs::write(idir.join("stdout.log.1"), b"old one\nold \xff two\n\n").expect("write");
        fs::write(
            idir.join("stdout.log"),
            "1970-01-01T00:00:10.000000Z new\nstray\n",
        )
        .expect("write");
        fs::write(idir.join("stderr.log"), "1970-01-01T00:00:05.000000Z err\n").expect("write");
        let t = read_instance(dir.path(), "web-0", None, None).expect("read");
        assert_eq!(
            texts(&t),
            ["err", "old one", "old \u{fffd} two", "", "new", "stray"]
        );
        assert_eq!(t.lines[1].time, None);
        assert_eq!(t.lines[4].time, Some(at(10, 0)));
        let t = read_instance(dir.path(), "web-0", None, Some(at(6, 0))).expect("read");
        assert_eq!(
            texts(&t),
            ["old one", "old \u{fffd} two", "", "new", "stray"]
        );
        let t = read_instance(dir.path(), "web-0", Some(2), None).expect("read");
        assert_eq!(texts(&t), ["new", "stray"]);
    }

    #[test]
    fn overlong_lines_come_in_pieces() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        fs::create_dir(&idir).expect("mkdir");
        let long = "x".repeat(MAX_RECORD + 10);
        fs::write(idir.join("stdout.log"), format!("a\n{long}\nb\n")).expect("write");
        let t = read_instance(dir.path(), "web-0", None, None).expect("read");
        let lens: Vec<usize> = t.lines.iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, [1, 10, MAX_RECORD, 1]);
    }

    #[test]
    fn a_big_file_tail_reads_only_its_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, u64::MAX, 5);
        let pad = "p".repeat(60);
        let mut i = 0;
        w.buffered(|w| {
            while w.size() < 50 << 20 {
                w.record(at(1000, i), &format!("seq {i} {pad}"));
                i += 1;
            }
        });
        TestWriter::open(&idir, Stream::Stderr, u64::MAX, 5).record(at(1, 0), "early");
        let (t, bytes_read) = read_counted(dir.path(), "web-0", Some(10), None).expect("read");
        assert_eq!(seqs(&t), (i - 10..i).collect::<Vec<_>>());
        assert!(
            bytes_read <= 2 * BLOCK as u64,
            "read {bytes_read} bytes of a 50 MiB file for 10 records"
        );
        let (t, bytes_read) =
            read_counted(dir.path(), "web-0", Some(3), Some(at(1000, i - 2))).expect("read");
        assert_eq!(seqs(&t), [i - 2, i - 1]);
        assert!(bytes_read <= 2 * BLOCK as u64, "read {bytes_read} bytes");
    }
}
