//! The instance log writer used by the init: turns the raw bytes a service writes into
//! records of the [`format`](super::format), one per line, rotates files by rename, and never
//! loses output silently.
//!
//! Lines longer than [`MAX_PAYLOAD`] are split into several records. Output that cannot be
//! written (disk full, I/O error) is counted and dropped, so the service never blocks on a
//! broken disk; once writing works again a notice record says how much was lost and why:
//! `[corral-init] 1200 lines (123000 bytes) dropped: No space left on device (os error 28)`.
//! Memory is bounded by the read size plus one unfinished line.
//!
//! Imports from the crate: nothing.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::format::MAX_PAYLOAD;
/// The format's parts a writer's user needs for records of its own.
pub use super::format::{NOTICE_PREFIX, timestamp};

/// Where records go: a rotating file, or a test double.
pub trait Output {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Bytes in the live file.
    fn size(&self) -> u64;
    fn rotate(&mut self) -> io::Result<()>;
}

/// A log file in a directory, rotated by rename (`tail -F` friendly): `name.{n-1}` is
/// dropped, `name.k` becomes `name.{k+1}`, `name` becomes `name.1`, a fresh `name` is
/// created. `max_files` counts the live file too.
#[derive(Debug)]
pub struct RotatingFile {
    dir: OwnedFd,
    name: &'static str,
    file: File,
    size: u64,
    max_files: u32,
}

fn open_append(dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o640),
    )?;
    Ok(File::from(fd))
}

impl RotatingFile {
    pub fn open(dir: &OwnedFd, name: &'static str, max_files: u32) -> io::Result<RotatingFile> {
        let file = open_append(dir.as_fd(), name)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            dir: dir.try_clone()?,
            name,
            file,
            size,
            max_files,
        })
    }
}

impl Output for RotatingFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // On a partial write the file holds part of `buf`: count what did land, so that
        // rotation stays exact; the caller counts the whole buffer as dropped.
        let mut done = 0;
        while done < buf.len() {
            match self.file.write(&buf[done..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    done += n;
                    self.size += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn rotate(&mut self) -> io::Result<()> {
        let d = self.dir.as_fd();
        if self.max_files <= 1 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for k in (1..self.max_files - 1).rev() {
            let from = format!("{}.{k}", self.name);
            let to = format!("{}.{}", self.name, k + 1);
            match nix::fcntl::renameat(d, from.as_str(), d, to.as_str()) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let first = format!("{}.1", self.name);
        nix::fcntl::renameat(d, self.name, d, first.as_str())?;
        self.file = open_append(d, self.name)?;
        self.size = 0;
        Ok(())
    }
}

/// What a writer could not write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

/// What the records of one write are assembled in, reserved once.
const BUF_CAPACITY: usize = 96 * 1024;

/// One stream (stdout or stderr) of an instance.
#[derive(Debug)]
pub struct LogWriter<O: Output> {
    out: O,
    max_size: u64,
    /// Written after each record's timestamp: the run's incarnation (empty: none).
    tag: Vec<u8>,
    /// The unfinished last line.
    partial: Vec<u8>,
    /// Records being assembled for one write.
    buf: Vec<u8>,
    buf_records: u64,
    /// The service's own bytes in `buf` (payloads and their line ends).
    buf_payload: u64,
    /// Dropped since the last notice, and why.
    pending: Dropped,
    reason: String,
    /// Dropped over the writer's life.
    pub total: Dropped,
    /// The service's bytes (payloads and their line ends) written over the writer's life.
    pub written: u64,
}

impl<O: Output> LogWriter<O> {
    pub fn new(out: O, max_size: u64) -> LogWriter<O> {
        LogWriter {
            out,
            max_size,
            tag: Vec::new(),
            partial: Vec::new(),
            // Reserved at the first record: an init whose service never writes touches no
            // page of it (an init lives as long as its instance; see `record`).
            buf: Vec::new(),
            buf_records: 0,
            buf_payload: 0,
            pending: Dropped::default(),
            reason: String::new(),
            total: Dropped::default(),
            written: 0,
        }
    }

    /// Tag every record with the run's incarnation id (0: none).
    pub fn with_incarnation(mut self, incarnation: u64) -> LogWriter<O> {
        self.tag = if incarnation == 0 {
            Vec::new()
        } else {
            super::format::incarnation_tag(incarnation).into_bytes()
        };
        self
    }

    pub fn output(&self) -> &O {
        &self.out
    }

    fn record(&mut self, ts: &[u8], payload: &[u8]) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(BUF_CAPACITY);
        }
        self.buf.extend_from_slice(ts);
        self.buf.extend_from_slice(&self.tag);
        self.buf.push(b' ');
        self.buf.extend_from_slice(payload);
        self.buf.push(b'\n');
        self.buf_records += 1;
        self.buf_payload += payload.len() as u64 + 1;
    }

    /// Take bytes the service wrote (read at time `ts`) and write the complete lines.
    pub fn push(&mut self, data: &[u8], ts: &str) {
        let ts = ts.as_bytes();
        let mut rest = data;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            let (line, tail) = (&rest[..pos], &rest[pos + 1..]);
            if self.partial.is_empty() {
                for chunk in line
                    .chunks(MAX_PAYLOAD)
                    .chain(line.is_empty().then_some(&line[..0]))
                {
                    self.record(ts, chunk);
                }
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                for chunk in whole.chunks(MAX_PAYLOAD) {
                    self.record(ts, chunk);
                }
            }
            rest = tail;
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_PAYLOAD {
            let chunk: Vec<u8> = self.partial.drain(..MAX_PAYLOAD).collect();
            self.record(ts, &chunk);
        }
        self.flush();
    }

    /// Write the unfinished last line as a record of its own (the service has ended).
    pub fn finish(&mut self, ts: &str) {
        if !self.partial.is_empty() {
            let p = std::mem::take(&mut self.partial);
            self.record(ts.as_bytes(), &p);
        }
        self.flush();
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.buf_records);
        let payload = std::mem::take(&mut self.buf_payload);
        let mut data = std::mem::take(&mut self.buf);
        if self.pending.lines > 0 {
            let notice = format!(
                "{} {NOTICE_PREFIX}{} lines ({} bytes) dropped: {}\n",
                timestamp(SystemTime::now()),
                self.pending.lines,
                self.pending.bytes,
                self.reason
            );
            data.splice(0..0, notice.into_bytes());
        }
        let result = self
            .rotate_if_needed(data.len())
            .and_then(|()| self.out.write_all(&data));
        match result {
            Ok(()) => {
                self.pending = Dropped::default();
                self.written += payload;
            }
            Err(e) => {
                self.pending.lines += records;
                self.pending.bytes += payload;
                self.total.lines += records;
                self.total.bytes += payload;
                self.reason = e.to_string();
            }
        }
        data.clear();
        self.buf = data;
    }

    fn rotate_if_needed(&mut self, incoming: usize) -> io::Result<()> {
        let size = self.out.size();
        if size > 0 && size + incoming as u64 > self.max_size {
            self.out.rotate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::format::INCARNATION_LEN;
    use crate::logs::{MAX_RECORD, TIMESTAMP_LEN};

    /// Records in memory, files as a list; can be made to fail.
    #[derive(Debug, Default)]
    struct Mem {
        files: Vec<Vec<u8>>,
        fail: bool,
    }

    impl Output for Mem {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            if self.files.is_empty() {
                self.files.push(Vec::new());
            }
            if let Some(f) = self.files.last_mut() {
                f.extend_from_slice(buf);
            }
            Ok(())
        }
        fn size(&self) -> u64 {
            self.files.last().map_or(0, |f| f.len() as u64)
        }
        fn rotate(&mut self) -> io::Result<()> {
            self.files.push(Vec::new());
            Ok(())
        }
    }

    const TS: &str = "2026-11-22T23:45:01.123456Z";

    fn lines(w: &LogWriter<Mem>) -> Vec<String> {
        w.output()
            .files
            .iter()
            .flat_map(|f| {
                String::from_utf8_lossy(f)
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn lines_are_timestamped_and_joined_across_reads() {
        let mut w = LogWriter::new(Mem::default(), 1 << 20);
        w.push(b"one\ntw", TS);
        w.push(b"o\n\nthree", TS);
        assert_eq!(
            lines(&w),
            vec![format!("{TS} one"), format!("{TS} two"), format!("{TS} ")]
        );
        w.finish(TS);
        assert_eq!(lines(&w).last(), Some(&format!("{TS} three")));
    }

    #[test]
    fn long_lines_are_split_into_records() {
        let mut w = LogWriter::new(Mem::default(), 1 << 20);
        let long = vec![b'x'; MAX_PAYLOAD * 2 + 10];
        w.push(&long, TS);
        w.push(b"\n", TS);
        let l = lines(&w);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].len(), MAX_RECORD - INCARNATION_LEN);
        assert_eq!(l[2].len(), TIMESTAMP_LEN + 1 + 10);
    }

    #[test]
    fn every_record_names_its_incarnation_and_the_longest_is_max_record() {
        let mut w = LogWriter::new(Mem::default(), 1 << 20).with_incarnation(0xc0ffee);
        let long = vec![b'x'; MAX_PAYLOAD + 10];
        w.push(&long, TS);
        w.push(b"\nshort\n", TS);
        let l = lines(&w);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].len(), MAX_RECORD);
        for line in &l {
            let r = crate::logs::parse(line.as_bytes());
            assert_eq!(r.incarnation, Some(0xc0ffee), "{line:?}");
            assert!(r.time.is_some(), "{line:?}");
        }
        assert_eq!(l[2], format!("{TS}/0000000000c0ffee short"));
    }

    #[test]
    fn rotation_happens_between_writes_and_never_splits_a_record() {
        let mut w = LogWriter::new(Mem::default(), 200);
        for i in 0..20 {
            w.push(format!("line {i}\n").as_bytes(), TS);
        }
        let files = &w.output().files;
        assert!(files.len() > 1);
        for f in files {
            assert!(
                f.len() <= 200 && f.ends_with(b"\n"),
                "{}",
                String::from_utf8_lossy(f)
            );
        }
        assert_eq!(lines(&w).len(), 20);
    }

    #[test]
    fn failed_writes_are_counted_and_announced_when_writing_works_again() {
        let mut w = LogWriter::new(Mem::default(), 1 << 20);
        w.push(b"a\n", TS);
        w.out.fail = true;
        w.push(b"b\nc\n", TS);
        w.push(b"d\n", TS);
        assert_eq!(
            w.total,
            Dropped { lines: 3, bytes: 6 },
            "the service's bytes, not ours"
        );
        w.out.fail = false;
        w.push(b"e\n", TS);
        let l = lines(&w);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(
            l[1].contains("[corral-init] 3 lines (6 bytes) dropped: No space left on device"),
            "{}",
            l[1]
        );
        assert_eq!(l[2], format!("{TS} e"));
        assert_eq!(w.total.lines, 3, "the total stays");
    }

    #[test]
    fn real_files_rotate_by_rename_keeping_max_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd: OwnedFd = File::open(dir.path()).expect("open dir").into();
        let out = RotatingFile::open(&fd, "stdout.log", 3).expect("open");
        let mut w = LogWriter::new(out, 1000);
        for i in 0..200 {
            w.push(
                format!("{i:05} some text to fill the file\n").as_bytes(),
                TS,
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["stdout.log", "stdout.log.1", "stdout.log.2"]);
        let last = std::fs::read_to_string(dir.path().join("stdout.log")).expect("read");
        assert!(
            last.trim_end()
                .ends_with("00199 some text to fill the file")
        );
        let older = std::fs::read_to_string(dir.path().join("stdout.log.1")).expect("read");
        assert!(older.len() <= 1000);
    }
}

/// The writer against the readers: what one writes, the others read back record for record.
#[cfg(test)]
mod contract {
    use std::time::Duration;

    use super::*;
    use crate::logs::{Follower, MAX_PAYLOAD, StartAt, Stream, read_instance};

    /// A line far longer than a record, between two short ones, through the real files: each
    /// piece the writer made comes back whole (the readers never split a record the writer
    /// wrote), tailing and following alike.
    #[tokio::test]
    async fn every_record_written_is_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idir = dir.path().join("web-0");
        std::fs::create_dir(&idir).expect("mkdir");
        let fd: OwnedFd = File::open(&idir).expect("open dir").into();
        let out = RotatingFile::open(&fd, Stream::Stdout.file_name(), 2).expect("open");
        let mut w = LogWriter::new(out, u64::MAX);
        let ts = timestamp(SystemTime::now());
        let long = "y".repeat(3 * MAX_PAYLOAD + 5);
        w.push(format!("first\n{long}\nlast\n").as_bytes(), &ts);
        let want = vec![
            "first".len(),
            MAX_PAYLOAD,
            MAX_PAYLOAD,
            MAX_PAYLOAD,
            5,
            "last".len(),
        ];

        let tail = read_instance(dir.path(), "web-0", None, None).expect("read");
        let lens: Vec<usize> = tail.lines.iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, want, "tail");
        assert!(tail.lines.iter().all(|l| l.time.is_some()));

        let mut f = Follower::new(Duration::from_millis(10));
        f.add_instance(dir.path().to_path_buf(), "web-0".into(), StartAt::Beginning)
            .expect("follow");
        let mut lens = Vec::new();
        while lens.len() < want.len() {
            let batch = tokio::time::timeout(Duration::from_secs(5), f.next_batch())
                .await
                .expect("records within 5 s")
                .expect("batch");
            lens.extend(batch.iter().map(|l| l.text.len()));
        }
        assert_eq!(lens, want, "follow");
    }
}
