//! Following instances' logs as they are written, across rotations and restarts.
//!
//! Each stream of each followed instance keeps its current file open and the offset of the
//! next byte to read. A poll costs one `stat` of the live file per stream when nothing
//! happened. When the live file is no longer the open one, the writer has rotated (it renames
//! the live file, then creates a new one, and never writes the old one again): the open file
//! is read to its end, then the files that came after it are found by listing the stream's
//! files (newest first) and locating the open one among them by identity. Files are held open
//! from the moment they are listed, so a rotation can no longer take them away; only a writer
//! that rotates `max_files - 1` times between two polls can drop a file before it is read.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use super::files::{Opened, open_files, read_at, stat_id};
use super::read::read_instance;
use super::{
    BLOCK, FileId, FilePos, LogError, LogLine, MAX_RECORD, StartAt, Stream, instance_dir, parse,
    text_of,
};

/// Bytes read from one stream in one poll, so that a busy stream does not hold up the others.
const STREAM_BUDGET: usize = 1024 * 1024;
/// Bytes read in one poll over all streams: bounds a batch.
const POLL_BUDGET: usize = 4 * 1024 * 1024;

/// Follows the logs of a set of instances. A service-wide follow adds each instance of the
/// service, and new ones as they appear; adding an instance already followed does nothing.
///
/// Within a stream, records come exactly once and in order, also across rotations and restarts
/// of the instance (its new init appends to the same files). Within a batch, records of all
/// streams are merged by time (ties in the order instances were added, stdout before stderr).
/// The unterminated end of a live file waits for its `\n`; that of a file that was rotated
/// away is returned as a record once the following file exists.
#[derive(Debug)]
pub struct Follower {
    poll: Duration,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    streams: Vec<StreamFollow>,
    /// Records read and not yet handed out: they survive a cancelled `next_batch`.
    ready: Vec<LogLine>,
    /// First error of the last poll, handed out once the records before it are.
    error: Option<LogError>,
    /// The stream polled first, rotating so that every stream gets its turn at the budget.
    first: usize,
    scratch: Vec<u8>,
}

#[derive(Debug)]
struct StreamFollow {
    instance: String,
    stream: Stream,
    dir: PathBuf,
    live: PathBuf,
    cursor: Cursor,
    /// Time of the last timed record: the one a record without time sorts with.
    carry: Option<SystemTime>,
}

#[derive(Debug)]
enum Cursor {
    /// No file open: the next record is the first after this position; with none, every file
    /// that exists when one appears is new.
    Waiting(Option<FilePos>),
    /// Reading `cur`; `newer` are the files written after it, oldest first, already open.
    Reading {
        cur: OpenLog,
        newer: VecDeque<OpenLog>,
    },
}

#[derive(Debug)]
struct OpenLog {
    file: File,
    path: PathBuf,
    id: FileId,
    /// Offset of the next byte to read.
    read_to: u64,
    /// Bytes read after the last `\n`: the start of a record not complete yet.
    partial: Vec<u8>,
}

impl OpenLog {
    fn new(o: Opened, read_to: u64) -> OpenLog {
        OpenLog {
            file: o.file,
            path: o.path,
            id: o.id,
            read_to,
            partial: Vec::new(),
        }
    }

    /// Read on until the end of the file or of `budget`; true at the end of the file.
    fn read(
        &mut self,
        scratch: &mut Vec<u8>,
        budget: &mut usize,
        emit: &mut Emit<'_>,
    ) -> Result<bool, LogError> {
        if scratch.len() < BLOCK {
            scratch.resize(BLOCK, 0);
        }
        loop {
            if *budget == 0 {
                return Ok(false);
            }
            let want = BLOCK.min(*budget);
            let n = read_at(&self.file, &mut scratch[..want], self.read_to).map_err(|source| {
                LogError::Io {
                    path: self.path.clone(),
                    what: "reading",
                    source,
                }
            })?;
            if n == 0 {
                return Ok(true);
            }
            self.read_to += n as u64;
            *budget -= n;
            self.split(&scratch[..n], emit);
        }
    }

    /// Hand out the complete records of `partial` + `data`, keep the rest.
    fn split(&mut self, data: &[u8], emit: &mut Emit<'_>) {
        let mut data = data;
        if !self.partial.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&data[..i]);
                    emit.record(&self.partial);
                    self.partial.clear();
                    data = &data[i + 1..];
                }
                None => {
                    self.partial.extend_from_slice(data);
                    data = &[];
                }
            }
        }
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            emit.record(&data[..i]);
            data = &data[i + 1..];
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() > MAX_RECORD {
            emit.record(&self.partial[..MAX_RECORD]);
            self.partial.drain(..MAX_RECORD);
        }
        if self.partial.capacity() > 2 * BLOCK && self.partial.len() <= BLOCK {
            self.partial.shrink_to(BLOCK);
        }
    }

    /// The file will not grow: its unterminated end is a record.
    fn finish(&mut self, emit: &mut Emit<'_>) {
        if !self.partial.is_empty() {
            emit.record(&self.partial);
            self.partial = Vec::new();
        }
    }
}

/// Where the records of one stream go during a poll.
struct Emit<'a> {
    instance: &'a str,
    stream: Stream,
    carry: &'a mut Option<SystemTime>,
    out: &'a mut Vec<(Option<SystemTime>, LogLine)>,
}

impl Emit<'_> {
    fn record(&mut self, raw: &[u8]) {
        let r = parse(raw);
        let time = r.time;
        if time.is_some() {
            *self.carry = time;
        }
        self.out.push((
            *self.carry,
            LogLine {
                instance: self.instance.to_string(),
                incarnation: r.incarnation,
                stream: self.stream,
                time,
                text: text_of(r.payload),
            },
        ));
    }
}

impl StreamFollow {
    /// Open the file to start from, if there is one yet.
    fn resolve(&mut self) -> Result<(), LogError> {
        let Cursor::Waiting(after) = self.cursor else {
            return Ok(());
        };
        if after.is_none() && stat_id(&self.live)?.is_none() {
            return Ok(()); // nothing yet; one stat per poll
        }
        let listing = open_files(&self.dir, self.stream)?;
        if !listing.snapshot || listing.files.is_empty() {
            return Ok(()); // the next poll tries again
        }
        let mut files = listing.files;
        let (start, offset) = match after {
            None => (files.len() - 1, 0),
            Some(pos) => match files.iter().position(|f| f.id == pos.id) {
                Some(k) if files[k].size >= pos.offset => (k, pos.offset),
                Some(k) => {
                    tracing::warn!(
                        instance = %self.instance, stream = %self.stream,
                        "log file shrank since it was read; following it from its start"
                    );
                    (k, 0)
                }
                None => {
                    tracing::warn!(
                        instance = %self.instance, stream = %self.stream,
                        "log file rotated away before it was followed; records may be missing"
                    );
                    (files.len() - 1, 0)
                }
            },
        };
        files.truncate(start + 1);
        let Some(cur) = files.pop() else {
            return Ok(());
        };
        self.cursor = Cursor::Reading {
            cur: OpenLog::new(cur, offset),
            newer: files
                .into_iter()
                .rev()
                .map(|o| OpenLog::new(o, 0))
                .collect(),
        };
        Ok(())
    }

    /// Read what is new, within `budget`, into `out`.
    fn poll(
        &mut self,
        scratch: &mut Vec<u8>,
        budget: &mut usize,
        out: &mut Vec<(Option<SystemTime>, LogLine)>,
    ) -> Result<(), LogError> {
        self.resolve()?;
        let StreamFollow {
            instance,
            stream,
            dir,
            live,
            cursor,
            carry,
        } = self;
        let Cursor::Reading { cur, newer } = cursor else {
            return Ok(());
        };
        let mut emit = Emit {
            instance,
            stream: *stream,
            carry,
            out,
        };
        loop {
            if let Some(next) = newer.pop_front() {
                // Files came after `cur`: it was rotated before they were listed, it is complete.
                if !cur.read(scratch, budget, &mut emit)? {
                    newer.push_front(next);
                    return Ok(());
                }
                cur.finish(&mut emit);
                *cur = next;
                continue;
            }
            match stat_id(live)? {
                Some((id, size)) if id == cur.id => {
                    if size < cur.read_to {
                        // Truncated in place (a writer keeping a single file).
                        tracing::warn!(
                            instance = %emit.instance, stream = %emit.stream,
                            "log file truncated; following it from its start"
                        );
                        cur.read_to = 0;
                        cur.partial.clear();
                    }
                    if size > cur.read_to {
                        cur.read(scratch, budget, &mut emit)?;
                    }
                    return Ok(());
                }
                None => {
                    // Between a rotation's rename and its new file, or the directory is gone:
                    // what the open file still has is read, its end stays pending.
                    cur.read(scratch, budget, &mut emit)?;
                    return Ok(());
                }
                Some(_) => {
                    // Rotated: the writer has left `cur` for good. Finish reading it, then go
                    // on with the files that came after it.
                    if !cur.read(scratch, budget, &mut emit)? {
                        return Ok(());
                    }
                    let listing = open_files(dir, emit.stream)?;
                    if !listing.snapshot {
                        return Ok(()); // the next poll tries again
                    }
                    let files = listing.files;
                    let newer_files = match files.iter().position(|f| f.id == cur.id) {
                        Some(k) => files.into_iter().take(k).collect::<Vec<_>>(),
                        None => {
                            tracing::warn!(
                                instance = %emit.instance, stream = %emit.stream,
                                "log files rotated away before they were read; records may be missing"
                            );
                            files
                        }
                    };
                    if newer_files.is_empty() {
                        return Ok(()); // the new live file is not there yet
                    }
                    newer.extend(newer_files.into_iter().rev().map(|o| OpenLog::new(o, 0)));
                }
            }
        }
    }
}

impl Inner {
    /// One pass over every stream; new records go to `ready`, merged by time. True when a
    /// budget ran out, i.e. there is more to read right away.
    fn poll(&mut self) -> bool {
        let n = self.streams.len();
        if n == 0 {
            return false;
        }
        let mut per_stream: Vec<Vec<(Option<SystemTime>, LogLine)>> =
            (0..n).map(|_| Vec::new()).collect();
        let mut budget = POLL_BUDGET;
        let mut more = false;
        let first = self.first % n;
        self.first = (first + 1) % n;
        for j in 0..n {
            let i = (first + j) % n;
            let mut stream_budget = STREAM_BUDGET.min(budget);
            let before = stream_budget;
            let result =
                self.streams[i].poll(&mut self.scratch, &mut stream_budget, &mut per_stream[i]);
            budget -= before - stream_budget;
            if stream_budget == 0 {
                more = true;
            }
            if let Err(e) = result
                && self.error.is_none()
            {
                self.error = Some(e);
            }
            if budget == 0 {
                more = true;
                break;
            }
        }
        merge_into(per_stream, &mut self.ready);
        more
    }
}

/// Merge per-stream runs (each in its own order) by time into `out`; ties by stream index.
fn merge_into(runs: Vec<Vec<(Option<SystemTime>, LogLine)>>, out: &mut Vec<LogLine>) {
    let mut runs: Vec<_> = runs.into_iter().map(|r| r.into_iter().peekable()).collect();
    let mut heap = BinaryHeap::new();
    for (i, run) in runs.iter_mut().enumerate() {
        if let Some((key, _)) = run.peek() {
            heap.push(Reverse((*key, i)));
        }
    }
    while let Some(Reverse((_, i))) = heap.pop() {
        if let Some((_, line)) = runs[i].next() {
            out.push(line);
        }
        if let Some((key, _)) = runs[i].peek() {
            heap.push(Reverse((*key, i)));
        }
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Follower {
    /// A follower checking for new records every `poll` (at least 1 ms).
    pub fn new(poll: Duration) -> Follower {
        Follower {
            poll: poll.max(Duration::from_millis(1)),
            inner: Arc::default(),
        }
    }

    /// Follow `instance`, whose files are in `dir/<instance>/` (`dir` is `<state-dir>/logs`),
    /// from `start`. The files to start from are opened now, so `End` means now, and what a
    /// position names cannot be rotated away any more. An instance already followed is left
    /// as it is. An instance without files yet is followed from its first record.
    pub fn add_instance(
        &mut self,
        dir: PathBuf,
        instance: String,
        start: StartAt,
    ) -> Result<(), LogError> {
        if self.is_following(&instance) {
            return Ok(());
        }
        let idir = instance_dir(&dir, &instance)?;
        let position = match start {
            StartAt::Beginning => None,
            StartAt::After(p) => Some(p),
            StartAt::End => Some(read_instance(&dir, &instance, Some(0), None)?.position),
        };
        let mut added = Vec::with_capacity(Stream::ALL.len());
        for stream in Stream::ALL {
            let mut s = StreamFollow {
                instance: instance.clone(),
                stream,
                live: idir.join(stream.file_name()),
                dir: idir.clone(),
                cursor: Cursor::Waiting(position.and_then(|p| p.get(stream))),
                carry: None,
            };
            s.resolve()?;
            added.push(s);
        }
        let mut inner = lock(&self.inner);
        if !inner.streams.iter().any(|s| s.instance == instance) {
            inner.streams.extend(added);
        }
        Ok(())
    }

    /// Stop following `instance`; records of it not handed out yet are dropped.
    pub fn remove_instance(&mut self, instance: &str) {
        let mut inner = lock(&self.inner);
        inner.streams.retain(|s| s.instance != instance);
        inner.ready.retain(|l| l.instance != instance);
    }

    pub fn is_following(&self, instance: &str) -> bool {
        lock(&self.inner)
            .streams
            .iter()
            .any(|s| s.instance == instance)
    }

    /// The next records, waiting until there is at least one (with no instance followed, that
    /// is forever). The files are read on the blocking pool. Cancel-safe: records read for a
    /// call that was dropped come with the next one.
    ///
    /// An error (a file that cannot be read) comes after the records read before it, and
    /// leaves the follower usable: the next call tries again.
    pub async fn next_batch(&mut self) -> Result<Vec<LogLine>, LogError> {
        loop {
            {
                let mut inner = lock(&self.inner);
                if !inner.ready.is_empty() {
                    return Ok(std::mem::take(&mut inner.ready));
                }
                if let Some(e) = inner.error.take() {
                    return Err(e);
                }
            }
            let inner = Arc::clone(&self.inner);
            let more = tokio::task::spawn_blocking(move || lock(&inner).poll())
                .await
                .map_err(|e| LogError::Task {
                    reason: e.to_string(),
                })?;
            let idle = {
                let inner = lock(&self.inner);
                inner.ready.is_empty() && inner.error.is_none()
            };
            if idle && !more {
                tokio::time::sleep(self.poll).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{TestWriter, at, seq_of};
    use super::*;
    use std::collections::HashMap;
    use std::fs;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    const POLL: Duration = Duration::from_millis(2);
    const PATIENCE: Duration = Duration::from_secs(60);

    /// Collect batches until `done` says so; fails (instead of hanging) when it never does.
    async fn collect_until(
        f: &mut Follower,
        got: &mut Vec<LogLine>,
        mut done: impl FnMut(&[LogLine]) -> bool,
    ) {
        let deadline = Instant::now() + PATIENCE;
        while !done(got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, f.next_batch()).await {
                Ok(batch) => got.extend(batch.expect("batch")),
                Err(_) => {
                    let mut counts: HashMap<(&str, Stream), usize> = HashMap::new();
                    for l in got.iter() {
                        *counts.entry((l.instance.as_str(), l.stream)).or_default() += 1;
                    }
                    let mut jumps = Vec::new();
                    for (inst, stream) in counts.keys() {
                        let mut prev = None;
                        for l in got
                            .iter()
                            .filter(|l| l.instance == *inst && l.stream == *stream)
                        {
                            let q = l.text.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok());
                            if let (Some(p), Some(q)) = (prev, q)
                                && q != p + 1
                            {
                                jumps.push((*inst, *stream, p, q));
                            }
                            prev = q;
                        }
                    }
                    panic!(
                        "gave up waiting; got {} records: {counts:?}, jumps {jumps:?}",
                        got.len()
                    )
                }
            }
        }
    }

    /// The sequence numbers of one instance's stream, in arrival order.
    fn seqs(lines: &[LogLine], instance: &str, stream: Stream) -> Vec<u64> {
        lines
            .iter()
            .filter(|l| l.instance == instance && l.stream == stream)
            .map(|l| seq_of(&l.text))
            .collect()
    }

    /// Asserts that `got` is exactly `0..n`, showing where it is not.
    fn assert_seq(got: &[u64], n: u64, what: &str) {
        let n = crate::num::len_usize(n);
        let first_bad = (0..n).find(|&i| got.get(i).copied() != u64::try_from(i).ok());
        if let Some(i) = first_bad.or((got.len() != n).then_some(n)) {
            let from = i.saturating_sub(3);
            let to = (i + 4).min(got.len());
            panic!(
                "{what}: {} records, first wrong at {i}: ...{:?}...",
                got.len(),
                got.get(from..to)
            );
        }
    }

    fn count(lines: &[LogLine], instance: &str, stream: Stream) -> usize {
        lines
            .iter()
            .filter(|l| l.instance == instance && l.stream == stream)
            .count()
    }

    /// A writer thread like an instance's init: `n` records `seq i …` on `stream`, a record
    /// now and then in two writes, never more than `max_lag` records ahead of what the test
    /// has received (so that rotation cannot delete a file before the follower has opened it).
    fn spawn_writer(
        dir: &Path,
        stream: Stream,
        n: u64,
        max_size: u64,
        max_files: u32,
        received: Arc<AtomicU64>,
        max_lag: u64,
    ) -> std::thread::JoinHandle<u64> {
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            let mut w = TestWriter::open(&dir, stream, max_size, max_files);
            let pad = "x".repeat(20);
            let start = Instant::now();
            for i in 0..n {
                while i > received.load(Ordering::Acquire) + max_lag {
                    assert!(start.elapsed() < PATIENCE, "the follower stopped reading");
                    std::thread::sleep(Duration::from_micros(100));
                }
                let payload = format!("seq {i} {pad}");
                if i % 97 == 13 {
                    w.record_split(SystemTime::now(), &payload, Duration::from_micros(300));
                } else {
                    w.record(SystemTime::now(), &payload);
                }
            }
            w.rotations
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_two_instances_through_many_rotations() {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = 6000;
        // ~52-byte records, ~78 per 4 KiB file; 8 files kept.
        let (max_size, max_files) = (4096, 8);
        let max_lag = 78 * u64::from(max_files - 3);
        // Records from before the follow starts are not returned with StartAt::End.
        for inst in ["web-0", "web-1"] {
            let mut w =
                TestWriter::open(&dir.path().join(inst), Stream::Stdout, max_size, max_files);
            for i in 0..200 {
                w.record(at(1, i), "before the follow");
            }
        }
        let mut f = Follower::new(POLL);
        let mut received = HashMap::new();
        let mut writers = Vec::new();
        for inst in ["web-0", "web-1"] {
            f.add_instance(dir.path().to_path_buf(), inst.to_string(), StartAt::End)
                .expect("add");
            for stream in Stream::ALL {
                let r = Arc::new(AtomicU64::new(0));
                received.insert((inst, stream), Arc::clone(&r));
                writers.push(spawn_writer(
                    &dir.path().join(inst),
                    stream,
                    n,
                    max_size,
                    max_files,
                    r,
                    max_lag,
                ));
            }
        }
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |got| {
            let mut all = true;
            for ((inst, stream), r) in &received {
                let c = count(got, inst, *stream) as u64;
                r.store(c, Ordering::Release);
                all &= c >= n;
            }
            all
        })
        .await;
        let mut rotations = 0;
        for w in writers {
            rotations += w.join().expect("writer");
        }
        assert!(rotations >= 4 * 60, "only {rotations} rotations");
        for inst in ["web-0", "web-1"] {
            for stream in Stream::ALL {
                assert_seq(&seqs(&got, inst, stream), n, &format!("{inst} {stream}"));
            }
        }
        assert!(got.iter().all(|l| l.time.is_some()));
        // Nothing more comes.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), f.next_batch())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn read_then_follow_has_no_gap_and_no_duplicate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, 400, 10);
        for i in 0..30 {
            w.record(at(100 + i, 0), &format!("seq {i}"));
        }
        w.raw(b"1970-01-01T00:02:10.000000Z seq ");
        let t = read_instance(dir.path(), "web-0", Some(5), None).expect("read");
        assert_eq!(
            t.lines.iter().map(|l| seq_of(&l.text)).collect::<Vec<_>>(),
            (25..30).collect::<Vec<_>>()
        );
        // The partial record completes, and the file read is rotated twice before the
        // follow starts: it is found again under its new name.
        w.raw(b"30\n");
        for i in 31..60 {
            w.record(at(100 + i, 0), &format!("seq {i}"));
        }
        assert!(w.rotations >= 2);
        let mut f = Follower::new(POLL);
        f.add_instance(
            dir.path().into(),
            "web-0".into(),
            StartAt::After(t.position),
        )
        .expect("add");
        for i in 60..70 {
            w.record(at(100 + i, 0), &format!("seq {i}"));
        }
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| g.len() >= 40).await;
        assert_eq!(
            seqs(&got, "web-0", Stream::Stdout),
            (30..70).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn an_instance_restart_appends_and_the_follow_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut f = Follower::new(POLL);
        // Added before the instance ever ran: its first records are returned.
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::End)
            .expect("add");
        let mut w = TestWriter::open(&idir, Stream::Stderr, 1000, 4);
        for i in 0..20 {
            w.record(at(1, i), &format!("seq {i}"));
        }
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| g.len() >= 20).await;
        // The instance restarts: its new init appends to the same files, and soon rotates.
        w.reopen();
        w.record(at(2, 0), "seq 20 [corral-init] restarted");
        for i in 21..60 {
            w.record(at(2, i), &format!("seq {i}"));
        }
        assert!(w.rotations >= 1);
        collect_until(&mut f, &mut got, |g| g.len() >= 60).await;
        assert_eq!(
            seqs(&got, "web-0", Stream::Stderr),
            (0..60).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn removed_instances_send_nothing_more() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w0 = TestWriter::open(&dir.path().join("web-0"), Stream::Stdout, 1 << 20, 3);
        let mut w1 = TestWriter::open(&dir.path().join("web-1"), Stream::Stdout, 1 << 20, 3);
        let mut f = Follower::new(POLL);
        for inst in ["web-0", "web-1"] {
            f.add_instance(dir.path().into(), inst.into(), StartAt::End)
                .expect("add");
        }
        w0.record(at(1, 0), "seq 0");
        w1.record(at(1, 0), "seq 0");
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| g.len() >= 2).await;
        // Written before the removal and never handed out, then after it.
        w0.record(at(2, 0), "seq 1");
        f.remove_instance("web-0");
        assert!(!f.is_following("web-0"));
        w0.record(at(3, 0), "seq 2");
        w1.record(at(4, 0), "seq 1");
        let mut after = Vec::new();
        collect_until(&mut f, &mut after, |g| g.iter().any(|l| l.text == "seq 1")).await;
        assert!(after.iter().all(|l| l.instance == "web-1"), "{after:?}");
        // Following it again starts where asked.
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::Beginning)
            .expect("add");
        let mut again = Vec::new();
        collect_until(&mut f, &mut again, |g| g.len() >= 3).await;
        assert_eq!(seqs(&again, "web-0", Stream::Stdout), [0, 1, 2]);
    }

    #[tokio::test]
    async fn start_points_and_adding_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut out = TestWriter::open(&idir, Stream::Stdout, 200, 10);
        let mut err = TestWriter::open(&idir, Stream::Stderr, 200, 10);
        for i in 0..20 {
            out.record(at(10 + 2 * i, 0), &format!("seq {i}"));
            err.record(at(11 + 2 * i, 0), &format!("seq {i}"));
        }
        assert!(out.rotations >= 3);

        // Beginning: the rotated files too, oldest first, streams merged by time.
        let mut f = Follower::new(POLL);
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::Beginning)
            .expect("add");
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::Beginning)
            .expect("add twice");
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| g.len() >= 40).await;
        assert_eq!(got.len(), 40);
        let order: Vec<(Stream, u64)> = got.iter().map(|l| (l.stream, seq_of(&l.text))).collect();
        let want: Vec<(Stream, u64)> = (0..20)
            .flat_map(|i| [(Stream::Stdout, i), (Stream::Stderr, i)])
            .collect();
        assert_eq!(order, want);

        // End: only what comes next.
        let mut f = Follower::new(POLL);
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::End)
            .expect("add");
        out.record(at(100, 0), "seq 20");
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| !g.is_empty()).await;
        assert_eq!(seqs(&got, "web-0", Stream::Stdout), [20]);
        assert!(matches!(
            f.add_instance(dir.path().into(), "../x".into(), StartAt::End),
            Err(LogError::InvalidInstance { .. })
        ));
    }

    #[tokio::test]
    async fn partial_records_wait_and_rotated_ones_are_final() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, 1 << 20, 3);
        let mut f = Follower::new(POLL);
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::End)
            .expect("add");
        w.record(at(1, 0), "seq 0");
        w.raw(b"1970-01-01T00:00:02.000000Z seq 1 hal");
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| !g.is_empty()).await;
        // The half record is not handed out while the file is live...
        assert!(
            tokio::time::timeout(Duration::from_millis(30), f.next_batch())
                .await
                .is_err()
        );
        // ...but is, whole, once it completes.
        w.raw(b"f\n");
        collect_until(&mut f, &mut got, |g| g.len() >= 2).await;
        assert_eq!(got[1].text, "seq 1 half");
        // A file rotated away mid-record (a writer that died mid-write) ends with it.
        w.raw(b"1970-01-01T00:00:03.000000Z seq 2 cut");
        fs::rename(idir.join("stdout.log"), idir.join("stdout.log.1")).expect("rename");
        let mut w = TestWriter::open(&idir, Stream::Stdout, 1 << 20, 3);
        w.record(at(4, 0), "seq 3");
        collect_until(&mut f, &mut got, |g| g.len() >= 4).await;
        let texts: Vec<&str> = got.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["seq 0", "seq 1 half", "seq 2 cut", "seq 3"]);
    }

    #[tokio::test]
    async fn a_file_truncated_in_place_is_followed_from_its_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        // max_files = 1: the writer truncates instead of rotating.
        let mut w = TestWriter::open(&idir, Stream::Stdout, 200, 1);
        let mut f = Follower::new(POLL);
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::End)
            .expect("add");
        let mut got = Vec::new();
        for i in 0..5 {
            w.record(at(1, i), &format!("seq {i}"));
        }
        collect_until(&mut f, &mut got, |g| g.len() >= 5).await;
        w.record(at(2, 0), "seq 5");
        assert_eq!(w.rotations, 1);
        collect_until(&mut f, &mut got, |g| g.len() >= 6).await;
        assert_eq!(
            seqs(&got, "web-0", Stream::Stdout),
            (0..6).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_cancelled_next_batch_loses_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, 2000, 50);
        let mut f = Follower::new(POLL);
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::End)
            .expect("add");
        let mut got = Vec::new();
        for i in 0..500 {
            w.record(at(1, i), &format!("seq {i}"));
            if i % 10 == 0 {
                // Dropped at once, or mid-read on the blocking pool.
                if let Ok(batch) = tokio::time::timeout(Duration::ZERO, f.next_batch()).await {
                    got.extend(batch.expect("batch"));
                }
                tokio::task::yield_now().await;
            }
        }
        collect_until(&mut f, &mut got, |g| g.len() >= 500).await;
        assert_eq!(
            seqs(&got, "web-0", Stream::Stdout),
            (0..500).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_directory_removed_and_made_again_is_followed_anew() {
        let dir = tempfile::tempdir().expect("temp dir");
        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, 1 << 20, 3);
        w.record(at(1, 0), "seq 0");
        let mut f = Follower::new(POLL);
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::Beginning)
            .expect("add");
        let mut got = Vec::new();
        collect_until(&mut f, &mut got, |g| !g.is_empty()).await;
        // The service is deleted (its directory goes) and created again.
        fs::remove_dir_all(&idir).expect("rm");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), f.next_batch())
                .await
                .is_err()
        );
        let mut w = TestWriter::open(&idir, Stream::Stdout, 1 << 20, 3);
        w.record(at(2, 0), "seq 1");
        let mut e = TestWriter::open(&idir, Stream::Stderr, 1 << 20, 3);
        e.record(at(3, 0), "seq 0");
        collect_until(&mut f, &mut got, |g| g.len() >= 3).await;
        assert_eq!(seqs(&got, "web-0", Stream::Stdout), [0, 1]);
        assert_eq!(seqs(&got, "web-0", Stream::Stderr), [0]);
    }

    /// Read and follow throughput; run with
    /// `cargo test --release -p corral-agent --lib logs::follow::tests::throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "prints figures, asserts nothing about time"]
    async fn throughput() {
        let dir = tempfile::tempdir().expect("temp dir");
        let n: u64 = 1_000_000;
        let pad = "p".repeat(40);
        let (max_size, max_files) = (10 << 20, 100);

        let idir = dir.path().join("web-0");
        let mut w = TestWriter::open(&idir, Stream::Stdout, max_size, max_files);
        let t0 = Instant::now();
        w.buffered(|w| {
            for i in 0..n {
                w.record(SystemTime::now(), &format!("seq {i} {pad}"));
            }
        });
        let bytes: u64 = fs::read_dir(&idir)
            .expect("ls")
            .map(|e| e.expect("entry").metadata().expect("stat").len())
            .sum();
        let mb = bytes as f64 / 1e6;
        println!(
            "wrote {n} records, {mb:.0} MB in {} files, in {:?}",
            w.rotations + 1,
            t0.elapsed()
        );

        let t = Instant::now();
        let all = read_instance(dir.path(), "web-0", None, None).expect("read");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(all.lines.len() as u64, n);
        println!(
            "read_instance all: {:.2} M records/s, {:.0} MB/s ({secs:.3} s)",
            n as f64 / secs / 1e6,
            mb / secs
        );
        drop(all);
        for tail in [10, 10, 1000, 100_000, 10] {
            let t = Instant::now();
            let (got, read) =
                super::super::read::read_counted(dir.path(), "web-0", Some(tail), None)
                    .expect("read");
            assert_eq!(got.lines.len(), tail);
            println!(
                "read_instance tail {tail}: {:?}, {} KiB read",
                t.elapsed(),
                read / 1024
            );
        }

        let mut f = Follower::new(Duration::from_millis(100));
        f.add_instance(dir.path().into(), "web-0".into(), StartAt::Beginning)
            .expect("add");
        let t = Instant::now();
        let mut count = 0u64;
        let mut batches = 0u64;
        while count < n {
            count += f.next_batch().await.expect("batch").len() as u64;
            batches += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "follow from the beginning: {:.2} M records/s, {:.0} MB/s, {batches} batches",
            n as f64 / secs / 1e6,
            mb / secs
        );

        // Live: a writer thread writing as fast as it can, rotating, while followed.
        let idir = dir.path().join("web-1");
        fs::create_dir_all(&idir).expect("mkdir");
        let mut f = Follower::new(Duration::from_millis(100));
        f.add_instance(dir.path().into(), "web-1".into(), StartAt::End)
            .expect("add");
        let writer = {
            let idir = idir.clone();
            let pad = pad.clone();
            std::thread::spawn(move || {
                let mut w = TestWriter::open(&idir, Stream::Stdout, max_size, max_files);
                let t = Instant::now();
                for i in 0..n {
                    w.record(SystemTime::now(), &format!("seq {i} {pad}"));
                }
                t.elapsed()
            })
        };
        let t = Instant::now();
        let mut next = 0u64;
        while next < n {
            for l in f.next_batch().await.expect("batch") {
                assert_eq!(seq_of(&l.text), next);
                next += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let wrote = writer.join().expect("writer");
        println!(
            "live follow: {n} records (one write each) in {secs:.2} s = {:.2} M records/s; the writer alone took {wrote:?}",
            n as f64 / secs / 1e6
        );
    }
}
