//! A log writer for the tests that behaves like the instance init: timestamped records written
//! whole, rotation by rename before a record that would not fit, `max_files` counting the live
//! file.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::Stream;

pub(super) fn at(secs: u64, micros: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// The number in a payload `seq N …`.
pub(super) fn seq_of(text: &str) -> u64 {
    text.split(' ')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a sequence record: {text:?}"))
}

#[derive(Debug)]
pub(super) struct TestWriter {
    dir: PathBuf,
    name: &'static str,
    out: Out,
    size: u64,
    max_size: u64,
    max_files: u32,
    pub rotations: u64,
}

#[derive(Debug)]
enum Out {
    Direct(File),
    Buffered(BufWriter<File>),
    Closed,
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("open log for append")
}

impl TestWriter {
    pub fn open(dir: &Path, stream: Stream, max_size: u64, max_files: u32) -> TestWriter {
        fs::create_dir_all(dir).expect("log dir");
        let name = stream.file_name();
        let file = open_append(&dir.join(name));
        let size = file.metadata().expect("stat").len();
        TestWriter {
            dir: dir.to_path_buf(),
            name,
            out: Out::Direct(file),
            size,
            max_size,
            max_files,
            rotations: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Write through a buffer while `f` runs (for big files), then flush.
    pub fn buffered(&mut self, f: impl FnOnce(&mut TestWriter)) {
        if let Out::Direct(file) = std::mem::replace(&mut self.out, Out::Closed) {
            self.out = Out::Buffered(BufWriter::with_capacity(1 << 20, file));
        }
        f(self);
        if let Out::Buffered(b) = std::mem::replace(&mut self.out, Out::Closed) {
            self.out = Out::Direct(b.into_inner().expect("flush"));
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        match &mut self.out {
            Out::Direct(f) => f.write_all(bytes).expect("write"),
            Out::Buffered(b) => b.write_all(bytes).expect("write"),
            Out::Closed => panic!("writer closed"),
        }
        self.size += bytes.len() as u64;
    }

    fn line(time: SystemTime, payload: &str) -> Vec<u8> {
        format!("{} {payload}\n", humantime::format_rfc3339_micros(time)).into_bytes()
    }

    fn make_room(&mut self, len: u64) {
        if self.size > 0 && self.size + len > self.max_size {
            self.rotate();
        }
    }

    /// One record in one write.
    pub fn record(&mut self, time: SystemTime, payload: &str) {
        let line = Self::line(time, payload);
        self.make_room(line.len() as u64);
        self.write(&line);
    }

    /// One record in two writes, the reader possibly seeing the first half alone.
    pub fn record_split(&mut self, time: SystemTime, payload: &str, pause: Duration) {
        let line = Self::line(time, payload);
        self.make_room(line.len() as u64);
        let half = line.len() / 2;
        self.write(&line[..half]);
        std::thread::sleep(pause);
        self.write(&line[half..]);
    }

    /// Bytes as they are, without rotating.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.write(bytes);
    }

    /// Close and reopen for append: what a restarted instance's new init does.
    pub fn reopen(&mut self) {
        self.out = Out::Closed;
        let file = open_append(&self.dir.join(self.name));
        self.size = file.metadata().expect("stat").len();
        self.out = Out::Direct(file);
    }

    fn rotate(&mut self) {
        if let Out::Buffered(b) = &mut self.out {
            b.flush().expect("flush");
        }
        self.rotations += 1;
        if self.max_files <= 1 {
            match &self.out {
                Out::Direct(f) => f.set_len(0).expect("truncate"),
                _ => panic!("truncating needs a direct writer"),
            }
            self.size = 0;
            return;
        }
        for k in (1..self.max_files - 1).rev() {
            let from = self.dir.join(format!("{}.{k}", self.name));
            let to = self.dir.join(format!("{}.{}", self.name, k + 1));
            match fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("rotating: {e}"),
            }
        }
        let live = self.dir.join(self.name);
        fs::rename(&live, self.dir.join(format!("{}.1", self.name))).expect("rotate live");
        let file = open_append(&live);
        self.out = match self.out {
            Out::Buffered(_) => Out::Buffered(BufWriter::with_capacity(1 << 20, file)),
            _ => Out::Direct(file),
        };
        self.size = 0;
    }
}
