//! The records of several instances as one stream, oldest first, merged by time across the
//! instances, both streams and each stream's files (rotated ones included), read as they are
//! handed out: memory holds a block and one record per stream, whatever the sizes of the
//! files, so a `Logs` call costs O(instances), not O(log size).
//!
//! Where each stream starts is found first: with `tail` or `since`, a merge backwards from the
//! end of every stream at once (the same order [`super::read_instance`] uses) counts the
//! records let through without keeping them and notes, per stream, the file and offset of the
//! oldest one; without either, every stream starts at its oldest file. Then each stream is
//! read forwards from there to where its files ended when they were opened, and the heads of
//! the streams are merged with a heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::files::{Opened, open_files, read_at};
use super::read::{RevReader, later};
use super::{
    BLOCK, FilePos, LogError, LogLine, MAX_RECORD, Position, Stream, instance_dir, parse,
    parse_record, text_of,
};

/// Records of a set of instances, oldest first, read as they are taken.
#[derive(Debug)]
pub struct Merged {
    streams: Vec<Forward>,
    /// `(time it sorts by, stream)` of each stream's head; ties go to the stream added first.
    heap: BinaryHeap<Reverse<(Option<SystemTime>, usize)>>,
    heads: Vec<Option<LogLine>>,
    started: bool,
}

/// Where the reading of one stream starts, newest file first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Nothing of this stream is returned.
    Nothing,
    /// File number `file` of the listing (0 the newest), at `offset`.
    At { file: usize, offset: u64 },
}

impl Merged {
    /// The records of `instances` (their files in `dir/<instance>/`, `dir` being
    /// `<state-dir>/logs`): the last `tail` of them all together (all when `None`), with
    /// `since` only those at or after it. Also returns, per instance, where its files ended
    /// when they were opened, for a [`super::Follower`] to go on from.
    ///
    /// An instance without a directory or files has no records. The files are opened here, so
    /// rotations after this call cannot take away what is still to be read; the unterminated
    /// last record of a live file is left for a follower, as in [`super::read_instance`].
    pub fn open(
        dir: &Path,
        instances: &[String],
        tail: Option<usize>,
        since: Option<SystemTime>,
    ) -> Result<(Merged, Vec<(String, Position)>), LogError> {
        let mut listings = Vec::with_capacity(instances.len() * Stream::ALL.len());
        let mut positions = Vec::with_capacity(instances.len());
        for instance in instances {
            let idir = instance_dir(dir, instance)?;
            let mut position = Position::default();
            for stream in Stream::ALL {
                let files = open_files(&idir, stream)?.files;
                // Where the newest file's last complete record ends.
                let end = match files.first() {
                    Some(newest) => {
                        let file = newest
                            .file
                            .try_clone()
                            .map_err(|e| io_err(&newest.path, e))?;
                        let end = RevReader::new(file, newest.size, newest.index == 0)
                            .map_err(|e| io_err(&newest.path, e))?
                            .end();
                        position.set(
                            stream,
                            Some(FilePos {
                                id: newest.id,
                                offset: end,
                            }),
                        );
                        end
                    }
                    None => 0,
                };
                listings.push((instance.clone(), stream, files, end));
            }
            positions.push((instance.clone(), position));
        }
        let starts = if tail.is_none() && since.is_none() {
            listings
                .iter()
                .map(|(_, _, files, _)| match files.len() {
                    0 => Start::Nothing,
                    n => Start::At {
                        file: n - 1,
                        offset: 0,
                    },
                })
                .collect()
        } else {
            start_points(&listings, tail.unwrap_or(usize::MAX), since)?
        };
        let streams: Vec<Forward> = listings
            .into_iter()
            .zip(starts)
            .map(|((instance, stream, files, end), start)| {
                Forward::new(instance, stream, files, end, start)
            })
            .collect();
        let n = streams.len();
        Ok((
            Merged {
                streams,
                heap: BinaryHeap::with_capacity(n),
                heads: vec![None; n],
                started: false,
            },
            positions,
        ))
    }

    /// The next record, oldest first; `None` once every stream is read to where it ended.
    #[allow(clippy::should_implement_trait)] // fallible, not an Iterator
    pub fn next(&mut self) -> Result<Option<LogLine>, LogError> {
        if !self.started {
            self.started = true;
            for i in 0..self.streams.len() {
                self.refill(i)?;
            }
        }
        let Some(Reverse((_, i))) = self.heap.pop() else {
            return Ok(None);
        };
        let line = self.heads[i].take();
        self.refill(i)?;
        Ok(line)
    }

    /// Up to `max` next records.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<LogLine>, LogError> {
        let mut out = Vec::with_capacity(max.min(1024));
        while out.len() < max {
            match self.next()? {
                Some(l) => out.push(l),
                None => break,
            }
        }
        Ok(out)
    }

    fn refill(&mut self, i: usize) -> Result<(), LogError> {
        if let Some((key, line)) = self.streams[i].next()? {
            self.heads[i] = Some(line);
            self.heap.push(Reverse((key, i)));
        }
        Ok(())
    }
}

fn io_err(path: &Path, source: std::io::Error) -> LogError {
    LogError::Io {
        path: path.to_path_buf(),
        what: "reading",
        source,
    }
}

/// One stream's files backwards, noting where the last record returned starts.
struct Backward<'a> {
    files: &'a [Opened],
    end: u64,
    /// Number of the file being read, and its reader.
    current: Option<(usize, RevReader)>,
    next_file: usize,
    carry: Option<SystemTime>,
    /// Where the oldest record taken so far starts.
    taken: Start,
}

impl Backward<'_> {
    /// The time the stream's previous record sorts by (a record without a time sorts with the
    /// record after it), or `None` at the start of the stream.
    fn prev(&mut self) -> Result<Option<(Option<SystemTime>, usize, u64)>, LogError> {
        loop {
            let Some((k, reader)) = &mut self.current else {
                let Some(o) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                let file = o.file.try_clone().map_err(|e| io_err(&o.path, e))?;
                let size = if self.next_file == 0 {
                    self.end
                } else {
                    o.size
                };
                let reader = RevReader::new(file, size, false).map_err(|e| io_err(&o.path, e))?;
                self.current = Some((self.next_file, reader));
                self.next_file += 1;
                continue;
            };
            let k = *k;
            let path = &self.files[k].path;
            match reader.prev().map_err(|e| io_err(path, e))? {
                Some(raw) => {
                    let (time, _) = parse_record(raw);
                    if time.is_some() {
                        self.carry = time;
                    }
                    return Ok(Some((self.carry, k, reader.last_start())));
                }
                None => self.current = None,
            }
        }
    }
}

/// Per stream, where the last `limit` records of all streams together start, leaving out those
/// before `since`: a merge backwards that keeps only one head per stream.
fn start_points(
    listings: &[(String, Stream, Vec<Opened>, u64)],
    limit: usize,
    since: Option<SystemTime>,
) -> Result<Vec<Start>, LogError> {
    let mut streams: Vec<Backward<'_>> = listings
        .iter()
        .map(|(_, _, files, end)| Backward {
            files,
            end: *end,
            current: None,
            next_file: 0,
            carry: None,
            taken: Start::Nothing,
        })
        .collect();
    let mut heads: Vec<Option<(Option<SystemTime>, usize, u64)>> = vec![None; streams.len()];
    let mut done = vec![false; streams.len()];
    let mut count = 0usize;
    while count < limit {
        for (i, s) in streams.iter_mut().enumerate() {
            if heads[i].is_some() || done[i] {
                continue;
            }
            match s.prev()? {
                Some(h) if since.is_none_or(|since| h.0.is_none_or(|t| t >= since)) => {
                    heads[i] = Some(h)
                }
                // The files are in time order: nothing older can be recent enough.
                Some(_) | None => done[i] = true,
            }
        }
        // The latest head is taken first; on equal times the stream added last.
        let mut pick: Option<usize> = None;
        for (i, head) in heads.iter().enumerate() {
            let Some(h) = head else { continue };
            match pick.and_then(|p| heads[p].as_ref()) {
                Some(best) if later(best.0, h.0) => {}
                _ => pick = Some(i),
            }
        }
        let Some(i) = pick else { break };
        if let Some((_, file, offset)) = heads[i].take() {
            streams[i].taken = Start::At { file, offset };
            count += 1;
        }
    }
    Ok(streams.iter().map(|s| s.taken).collect())
}

/// One segment of a file still to be read forwards.
#[derive(Debug)]
struct Segment {
    file: File,
    path: PathBuf,
    /// Next offset to read.
    at: u64,
    /// Where to stop.
    to: u64,
    /// The file will not grow (rotated): an unterminated end is a record of its own.
    last_is_record: bool,
}

/// One stream read forwards over its segments, a block at a time.
#[derive(Debug)]
struct Forward {
    instance: String,
    stream: Stream,
    segments: VecDeque<Segment>,
    buf: Vec<u8>,
    /// Bytes of `buf` already returned.
    used: usize,
    carry: Option<SystemTime>,
}

impl Forward {
    fn new(
        instance: String,
        stream: Stream,
        files: Vec<Opened>,
        end: u64,
        start: Start,
    ) -> Forward {
        let mut segments = VecDeque::new();
        if let Start::At { file, offset } = start {
            // Oldest first: from file number `file` down to the newest (0).
            for (k, o) in files.into_iter().enumerate().take(file + 1).rev() {
                let to = if k == 0 { end } else { o.size };
                segments.push_back(Segment {
                    file: o.file,
                    path: o.path,
                    at: if k == file { offset } else { 0 },
                    to,
                    last_is_record: o.index != 0,
                });
            }
        }
        Forward {
            instance,
            stream,
            segments,
            buf: Vec::new(),
            used: 0,
            carry: None,
        }
    }

    /// The next record and the time it sorts by (a record without a time sorts with the one
    /// before it).
    fn next(&mut self) -> Result<Option<(Option<SystemTime>, LogLine)>, LogError> {
        loop {
            let Some(seg) = self.segments.front_mut() else {
                return Ok(None);
            };
            let rest = &self.buf[self.used..];
            let cut = match rest.iter().position(|&b| b == b'\n') {
                Some(i) if i <= MAX_RECORD => Some((i, i + 1)),
                _ if rest.len() > MAX_RECORD => Some((MAX_RECORD, MAX_RECORD)),
                _ => None,
            };
            if let Some((len, skip)) = cut {
                let start = self.used;
                self.used += skip;
                return Ok(Some(self.record(start, start + len)));
            }
            if seg.at < seg.to {
                // Keep the unread rest, then add a block.
                self.buf.drain(..self.used);
                self.used = 0;
                let want = crate::num::len_usize(seg.to - seg.at).min(BLOCK);
                let old = self.buf.len();
                self.buf.resize(old + want, 0);
                let n = read_at(&seg.file, &mut self.buf[old..], seg.at)
                    .map_err(|e| io_err(&seg.path, e))?;
                self.buf.truncate(old + n);
                if n == 0 {
                    // The file shrank under us: what it had is all there is.
                    seg.to = seg.at;
                }
                seg.at += n as u64;
                continue;
            }
            // The segment is read: its unterminated end is a record if the file is final.
            let last_is_record = seg.last_is_record;
            self.segments.pop_front();
            let start = self.used;
            let end = self.buf.len();
            self.used = 0;
            if last_is_record && end > start {
                let rec = self.record(start, end);
                self.buf.clear();
                return Ok(Some(rec));
            }
            self.buf.clear();
            if self.buf.capacity() > 4 * BLOCK {
                self.buf.shrink_to(2 * BLOCK);
            }
        }
    }

    fn record(&mut self, start: usize, end: usize) -> (Option<SystemTime>, LogLine) {
        let r = parse(&self.buf[start..end]);
        let time = r.time;
        if time.is_some() {
            self.carry = time;
        }
        (
            self.carry,
            LogLine {
                instance: self.instance.clone(),
                incarnation: r.incarnation,
                stream: self.stream,
                time,
                text: text_of(r.payload),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::read::read_instance;
    use super::super::testutil::{TestWriter, at, seq_of};
    use super::*;

    fn all(
        dir: &Path,
        ids: &[&str],
        tail: Option<usize>,
        since: Option<SystemTime>,
    ) -> Vec<LogLine> {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let (mut m, _) = Merged::open(dir, &ids, tail, since).expect("open");
        let mut out = Vec::new();
        loop {
            let b = m.next_batch(7).expect("batch");
            if b.is_empty() {
                return out;
            }
            out.extend(b);
        }
    }

    /// Two instances writing interleaved times through many rotations.
    fn two_instances(dir: &Path) {
        for (id, parity) in [("a-0", 0u64), ("b-0", 1u64)] {
            let mut w = TestWriter::open(&dir.join(id), Stream::Stdout, 4096, 5);
            let mut e = TestWriter::open(&dir.join(id), Stream::Stderr, 4096, 5);
            for n in 0..400u64 {
                let t = at(2 * n + parity, 0);
                if n % 3 == 0 {
                    e.record(t, &format!("seq {n} {id}"));
                } else {
                    w.record(t, &format!("seq {n} {id}"));
                }
            }
        }
    }

    #[test]
    fn merges_instances_streams_and_rotated_files_in_time_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        two_instances(tmp.path());
        let got = all(tmp.path(), &["a-0", "b-0"], None, None);
        // Everything the rotation kept, in time order.
        let times: Vec<SystemTime> = got.iter().map(|l| l.time.expect("timed")).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order");
        let kept: usize = ["a-0", "b-0"]
            .iter()
            .map(|id| {
                read_instance(tmp.path(), id, None, None)
                    .expect("read")
                    .lines
                    .len()
            })
            .sum();
        assert_eq!(got.len(), kept);
        assert!(kept > 100, "{kept}");
        // Each instance's records are the ones read_instance finds, in the same order.
        for id in ["a-0", "b-0"] {
            let mine: Vec<String> = got
                .iter()
                .filter(|l| l.instance == id)
                .map(|l| l.text.clone())
                .collect();
            let want: Vec<String> = read_instance(tmp.path(), id, None, None)
                .expect("read")
                .lines
                .into_iter()
                .map(|l| l.text)
                .collect();
            let mut want_sorted = want.clone();
            want_sorted.sort_by_key(|t| seq_of(t));
            assert_eq!(mine, want_sorted, "{id}");
        }
    }

    #[test]
    fn tail_and_since_take_the_newest_of_all_together() {
        let tmp = tempfile::tempdir().expect("tempdir");
        two_instances(tmp.path());
        let everything = all(tmp.path(), &["a-0", "b-0"], None, None);
        for n in [0usize, 1, 5, 77, 10_000] {
            let got = all(tmp.path(), &["a-0", "b-0"], Some(n), None);
            let skip = everything.len().saturating_sub(n);
            assert_eq!(got, everything[skip..], "tail {n}");
        }
        let since = at(700, 0);
        let got = all(tmp.path(), &["a-0", "b-0"], None, Some(since));
        let want: Vec<LogLine> = everything
            .iter()
            .filter(|l| l.time.is_some_and(|t| t >= since))
            .cloned()
            .collect();
        assert_eq!(got, want);
        assert!(!want.is_empty());
        // Missing instances have nothing.
        assert!(all(tmp.path(), &["c-0"], None, None).is_empty());
    }

    #[test]
    fn a_partial_live_record_is_left_for_the_follower() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let idir = tmp.path().join("a-0");
        std::fs::create_dir_all(&idir).expect("mkdir");
        let t = super::super::format::timestamp(at(1, 0));
        std::fs::write(
            idir.join("stdout.log.1"),
            format!("{t} one\n{t} rotated-end"),
        )
        .expect("write");
        std::fs::write(idir.join("stdout.log"), format!("{t} two\n{t} half")).expect("write");
        let texts: Vec<String> = all(tmp.path(), &["a-0"], None, None)
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert_eq!(texts, ["one", "rotated-end", "two"]);
    }

    #[test]
    fn memory_does_not_follow_the_file_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut w = TestWriter::open(&tmp.path().join("a-0"), Stream::Stdout, 4 << 20, 3);
        w.buffered(|w| {
            for n in 0..100_000u64 {
                w.record(at(n, 0), &format!("seq {n} {}", "x".repeat(60)));
            }
        });
        let (mut m, _) = Merged::open(tmp.path(), &["a-0".to_string()], None, None).expect("open");
        let mut count = 0u64;
        let mut first = None;
        let mut prev = None;
        while let Some(l) = m.next().expect("next") {
            let n = seq_of(&l.text);
            first.get_or_insert(n);
            if let Some(p) = prev {
                assert_eq!(n, p + 1);
            }
            prev = Some(n);
            count += 1;
            assert!(m.streams[0].buf.capacity() <= 2 * BLOCK + MAX_RECORD);
        }
        // What the two kept files hold, up to the last record written.
        assert_eq!(prev, Some(99_999));
        assert!(count > 50_000, "{count}");
    }
}
