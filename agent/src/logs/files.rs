//! Finding and opening one stream's files while the writer may be rotating them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{FileId, LogError, Stream};

/// Highest rotation number looked at (the spec allows 100 files); any above is not a log file.
const MAX_INDEX: u32 = 9999;

/// How many times a listing is taken again when a rotation ran through it.
const LISTING_ATTEMPTS: u32 = 8;

/// One of a stream's files, opened: its identity, its number in the rotation (0 for the live
/// file) and its size when it was opened.
#[derive(Debug)]
pub(super) struct Opened {
    pub file: File,
    pub path: PathBuf,
    pub id: FileId,
    pub index: u32,
    pub size: u64,
}

fn io_err(path: &Path, what: &'static str, source: io::Error) -> LogError {
    LogError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// The rotation number of `name` among the files of `stream`: 0 for the live file, `k` for
/// `<live>.k`; `None` for anything else.
fn rotation_index(name: &str, stream: Stream) -> Option<u32> {
    let rest = name.strip_prefix(stream.file_name())?;
    if rest.is_empty() {
        return Some(0);
    }
    let digits = rest.strip_prefix('.')?;
    let valid = !digits.is_empty()
        && digits.len() <= 4
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    if !valid {
        return None;
    }
    digits.parse().ok().filter(|&i| i <= MAX_INDEX)
}

/// The path does not lead to a file: nothing there, or something that is not a directory
/// where a directory should be.
fn absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Identity and size of the regular file at `path` (not following a symbolic link); `None`
/// when there is none.
pub(super) fn stat_id(path: &Path) -> Result<Option<(FileId, u64)>, LogError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(Some((
            FileId {
                dev: m.dev(),
                ino: m.ino(),
            },
            m.len(),
        ))),
        Ok(_) => Ok(None),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(io_err(path, "stat", e)),
    }
}

fn look(path: &Path) -> Result<Option<FileId>, LogError> {
    Ok(stat_id(path)?.map(|(id, _)| id))
}

/// Open a log file for reading. Symbolic links and anything but a regular file are refused
/// (reported as absent): the agent reads these files with its own privileges.
fn open_log(path: &Path) -> Result<Option<(File, FileId, u64)>, LogError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if absent(&e) || e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(None);
        }
        Err(e) => return Err(io_err(path, "opening", e)),
    };
    let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok(Some((file, id, meta.len())))
}

/// The files of one stream, newest first (the live file, then `.1`, `.2`, …), each opened
/// once.
#[derive(Debug)]
pub(super) struct Listing {
    pub files: Vec<Opened>,
    /// Nothing moved while the files were listed: they are the stream's files as they were at
    /// one instant, in the order of their age. Otherwise a file may be missing, twice, or out of
    /// order.
    pub snapshot: bool,
}

/// The files of `stream` in the instance directory `dir` (none when it is missing).
///
/// The writer may be rotating while the files are opened one by one. So each attempt opens
/// every number in increasing order (see [`open_indices`]), then looks at each number again:
/// when every name still holds the same file (or still none), what was seen is the state of
/// one instant. (A rotation renames in decreasing order; one that ran through the listing
/// without changing any name between its two looks can only have been paused at a point where
/// the names already renamed were looked at after their rename and the others before theirs:
/// the state of that pause, with one gap, in the right order.) A rename that did change a name
/// between its two looks makes the listing be taken again; after a few attempts it is returned
/// as it is, marked as not a snapshot (a writer rotating faster than files can be listed).
pub(super) fn open_files(dir: &Path, stream: Stream) -> Result<Listing, LogError> {
    let mut files = Vec::new();
    for attempt in 0..LISTING_ATTEMPTS {
        if attempt >= 2 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let Some(highest) = highest_index(dir, stream)? else {
            return Ok(Listing {
                files: Vec::new(),
                snapshot: true,
            });
        };
        let (opened, seen, mut snapshot) = open_indices(dir, stream, highest)?;
        files = opened;
        for (index, id) in seen {
            if snapshot && look(&numbered(dir, stream, index))? != id {
                snapshot = false;
            }
        }
        if snapshot {
            return Ok(Listing {
                files,
                snapshot: true,
            });
        }
    }
    Ok(Listing {
        files,
        snapshot: false,
    })
}

/// The highest rotation number the directory lists for `stream` (0 with only the live file or
/// none); `None` without a directory.
fn highest_index(dir: &Path, stream: Stream) -> Result<Option<u32>, LogError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(io_err(dir, "listing", e)),
    };
    let mut highest = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, "listing", e))?;
        if let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(|n| rotation_index(n, stream))
        {
            highest = highest.max(index);
        }
    }
    Ok(Some(highest))
}

fn numbered(dir: &Path, stream: Stream, index: u32) -> PathBuf {
    if index == 0 {
        dir.join(stream.file_name())
    } else {
        dir.join(format!("{}.{index}", stream.file_name()))
    }
}

/// Open every number from 0 to `highest`, then on past it until two in a row are missing
/// (a rotation leaves at most one gap, and a directory listing taken while files are renamed
/// may miss names, so it only gives a lower bound). Returns the files (each once), what every
/// number looked at held, and false when a file was met twice (it moved while being listed).
#[allow(clippy::type_complexity)]
fn open_indices(
    dir: &Path,
    stream: Stream,
    highest: u32,
) -> Result<(Vec<Opened>, Vec<(u32, Option<FileId>)>, bool), LogError> {
    let mut files: Vec<Opened> = Vec::new();
    let mut seen = Vec::new();
    let mut unique = true;
    let mut missing_in_a_row = 0;
    for index in 0..=MAX_INDEX {
        if index > highest && missing_in_a_row >= 2 {
            break;
        }
        let path = numbered(dir, stream, index);
        let opened = open_log(&path)?;
        seen.push((index, opened.as_ref().map(|(_, id, _)| *id)));
        let Some((file, id, size)) = opened else {
            missing_in_a_row += 1;
            continue;
        };
        missing_in_a_row = 0;
        if files.iter().any(|o| o.id == id) {
            unique = false;
            continue;
        }
        files.push(Opened {
            file,
            path,
            id,
            index,
            size,
        });
    }
    Ok((files, seen, unique))
}

/// `pread` of as much as fits in `buf` at `offset`, retrying on EINTR; 0 at the end of file.
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_indices() {
        let cases = [
            ("stdout.log", Stream::Stdout, Some(0)),
            ("stdout.log.1", Stream::Stdout, Some(1)),
            ("stdout.log.12", Stream::Stdout, Some(12)),
            ("stderr.log.3", Stream::Stderr, Some(3)),
            ("stderr.log.3", Stream::Stdout, None),
            ("stdout.log.0", Stream::Stdout, None),
            ("stdout.log.01", Stream::Stdout, None),
            ("stdout.log.", Stream::Stdout, None),
            ("stdout.log.1.tmp", Stream::Stdout, None),
            ("stdout.log.+1", Stream::Stdout, None),
            ("stdout.logx", Stream::Stdout, None),
            ("stdout.log.9999", Stream::Stdout, Some(9999)),
            ("stdout.log.10000", Stream::Stdout, None),
            ("stdout.log.99999999999", Stream::Stdout, None),
            ("exit.json", Stream::Stdout, None),
        ];
        for (name, stream, want) in cases {
            assert_eq!(rotation_index(name, stream), want, "{name} as {stream}");
        }
    }

    #[test]
    fn listing_is_newest_first_and_skips_foreign_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, body) in [
            ("stdout.log", "live"),
            ("stdout.log.2", "two"),
            ("stdout.log.1", "one"),
            ("stdout.log.x", "foreign"),
            ("stderr.log", "err"),
        ] {
            fs::write(dir.path().join(name), body).expect("write");
        }
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("stdout.log.3"))
            .expect("symlink");
        let listing = open_files(dir.path(), Stream::Stdout).expect("listing");
        assert!(listing.snapshot);
        let got: Vec<(u32, u64)> = listing.files.iter().map(|o| (o.index, o.size)).collect();
        assert_eq!(got, vec![(0, 4), (1, 3), (2, 3)]);
        assert!(
            open_files(&dir.path().join("absent"), Stream::Stdout)
                .expect("missing dir")
                .files
                .is_empty()
        );
    }
}
