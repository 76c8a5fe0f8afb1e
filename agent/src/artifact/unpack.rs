//! Safe unpacking of tar (plain, gzip, zstd) and zip archives into a directory, and the OCI
//! layer variant with whiteouts.
//!
//! Rules, whatever the archive says:
//! - every entry stays beneath the target: absolute paths and `..` refuse the archive, no
//!   lookup follows a symlink (a file "through" a symlink the archive made refuses it), a hard
//!   link names an entry of the tree (resolved the same way);
//! - device nodes, fifos and sockets are skipped (and listed in the report);
//! - setuid/setgid bits are dropped; ownership is the target's: root (or a given uid/gid)
//!   with write bits dropped, or (image layers) the archive's own numeric ids;
//! - limits on the expanded size, the number of entries and the ratio of expanded to
//!   archive bytes: an archive over one is refused with the numbers;
//! - a cancel flag is checked between entries and every chunk, so a dropped fetch stops.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, futimens};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat, linkat, symlinkat};

use super::Phase;
use super::confined::{self, Root, normalize, show, split};
use super::fetch::Reporter;
use crate::spec::artifact::ArchiveFormat;
use crate::spec::format_size;

/// Limits on what one archive (or all layers of one image) may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content in total.
    pub max_bytes: u64,
    /// Entries of every kind (directories, links and skipped ones included).
    pub max_entries: u64,
    /// Content bytes per archive byte; checked once the content passes `ratio_slack`.
    pub max_ratio: u64,
    /// Content below which the ratio is not checked (small archives of zeros are fine).
    pub ratio_slack: u64,
}

impl Default for Limits {
    /// 4 GiB, 500 000 entries, 200:1 beyond the first 16 MiB.
    fn default() -> Limits {
        Limits {
            max_bytes: 4 << 30,
            max_entries: 500_000,
            max_ratio: 200,
            ratio_slack: 16 << 20,
        }
    }
}

/// Who owns what is unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// root:root, write bits dropped.
    Root,
    /// This uid/gid, write bits dropped.
    User {
        /// Owner of every entry.
        uid: u32,
        /// Group of every entry.
        gid: u32,
    },
    /// The archive's numeric uid/gid and mode (less setuid/setgid): image layers.
    Preserve,
}

impl Ownership {
    fn ids(self, uid: u64, gid: u64) -> Result<(u32, u32), String> {
        match self {
            Ownership::Root => Ok((0, 0)),
            Ownership::User { uid, gid } => Ok((uid, gid)),
            Ownership::Preserve => match (u32::try_from(uid), u32::try_from(gid)) {
                (Ok(u), Ok(g)) if u != u32::MAX && g != u32::MAX => Ok((u, g)),
                _ => Err(format!("owner {uid}:{gid} is out of range")),
            },
        }
    }

    fn mode(self, mode: u32) -> u32 {
        let mode = mode & 0o7777 & !0o6000;
        match self {
            Ownership::Preserve => mode,
            Ownership::Root | Ownership::User { .. } => mode & !0o222,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackError {
    /// The entry at fault, when one is.
    pub entry: Option<String>,
    /// What is wrong, with the numbers.
    pub reason: String,
}

impl UnpackError {
    fn at(entry: &[u8], reason: impl Into<String>) -> UnpackError {
        UnpackError {
            entry: Some(show(entry)),
            reason: reason.into(),
        }
    }

    fn archive(reason: impl Into<String>) -> UnpackError {
        UnpackError {
            entry: None,
            reason: reason.into(),
        }
    }

    /// The fetch was dropped.
    pub fn is_cancelled(&self) -> bool {
        self.reason == CANCELLED
    }
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.entry {
            Some(entry) => write!(f, "entry {entry:?}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

const CANCELLED: &str = "cancelled";

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries read (whiteouts and skipped ones included).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries not written, with why (`dev/null: device node`); the first 100.
    pub skipped: Vec<String>,
}

const MAX_SKIPPED_LISTED: usize = 100;
/// Content bytes between two progress reports.
const PROGRESS_EVERY: u64 = 8 << 20;
const CHUNK: usize = 256 * 1024;
/// Longest symlink target.
const MAX_LINK_TARGET: usize = 4095;

/// What an entry is.
enum Kind<'a> {
    Dir,
    File,
    Symlink(&'a [u8]),
    HardLink(&'a [u8]),
    Skip(&'static str),
}

/// One entry as read from an archive.
struct Entry<'a> {
    path: &'a [u8],
    kind: Kind<'a>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Option<i64>,
    /// Declared size of the content (regular files).
    size: u64,
}

/// Writes entries into a directory under the module's rules.
#[derive(Debug)]
pub(crate) struct Writer<'c> {
    root: Root,
    limits: Limits,
    ownership: Ownership,
    cancel: &'c AtomicBool,
    /// Bytes of the archive(s) being read, for the ratio.
    archive_bytes: u64,
    /// Whiteouts are applied (OCI layers); the paths this layer wrote.
    layer: Option<HashSet<Vec<u8>>>,
    /// Directory modes, applied once everything is in (a read-only directory would stop a
    /// later entry for a non-root writer).
    dir_modes: Vec<(Vec<u8>, u32)>,
    report: Report,
    euid: u32,
    egid: u32,
    buf: Vec<u8>,
    progress: Reporter,
    /// Content bytes at the last progress report.
    reported: u64,
    /// The directory the last regular file went into: runs of files in one directory
    /// (the common case) open it once. Only a file entry keeps it; any other entry, which
    /// may replace a directory, drops it. A file entry can only remove what is at its own
    /// path, whose parent differs from the cached one for any directory it could remove.
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
}

impl<'c> Writer<'c> {
    /// A writer into the (empty) directory `root`.
    pub(crate) fn new(
        root: Root,
        limits: Limits,
        ownership: Ownership,
        cancel: &'c AtomicBool,
    ) -> Writer<'c> {
        let (euid, egid) = (Uid::effective().as_raw(), Gid::effective().as_raw());
        // Unprivileged (a developer's test run), "root-owned" can only mean the caller's.
        let ownership = match ownership {
            Ownership::Root if euid != 0 => Ownership::User {
                uid: euid,
                gid: egid,
            },
            other => other,
        };
        Writer {
            root,
            limits,
            ownership,
            cancel,
            archive_bytes: 0,
            layer: None,
            dir_modes: Vec::new(),
            report: Report::default(),
            euid,
            egid,
            buf: vec![0; CHUNK],
            progress: Reporter::default(),
            reported: 0,
            parent_cache: None,
        }
    }

    /// Sends unpacking progress (content bytes written) to `progress`.
    pub(crate) fn set_progress(&mut self, progress: Reporter) {
        self.progress = progress;
    }

    pub(crate) fn root(&self) -> &Root {
        &self.root
    }

    /// What was done so far.
    pub(crate) fn report(&self) -> &Report {
        &self.report
    }

    /// Unpacks the archive in `file` (of `format`).
    pub(crate) fn archive(&mut self, file: File, format: ArchiveFormat) -> Result<(), UnpackError> {
        let size = file
            .metadata()
            .map_err(|e| UnpackError::archive(format!("reading the archive: {e}")))?
            .len();
        self.archive_bytes = self.archive_bytes.saturating_add(size);
        match format {
            ArchiveFormat::Zip => self.zip(file)?,
            tar => {
                let mut reader = decompress(io::BufReader::with_capacity(CHUNK, file), tar)?;
                self.tar(&mut reader)?;
            }
        }
        self.finish()
    }

    /// Applies one OCI layer (a tar stream of `compressed_size` bytes) with whiteouts.
    /// A layer whose last entry lacks its padding and the end-of-archive blocks (umoci 0.4
    /// writes such layers) is read as if they were there; its digest still covers exactly
    /// the bytes it has.
    pub(crate) fn layer<R: Read>(
        &mut self,
        reader: R,
        compressed_size: u64,
    ) -> Result<R, UnpackError> {
        self.archive_bytes = self.archive_bytes.saturating_add(compressed_size);
        self.layer = Some(HashSet::new());
        let rest = self.tar(BlockPad::new(reader));
        self.layer = None;
        let rest = rest?;
        self.finish()?;
        Ok(rest.inner)
    }

    /// Reads a tar stream to its end marker; returns the reader (for trailing bytes).
    fn tar<R: Read>(&mut self, reader: R) -> Result<R, UnpackError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| UnpackError::archive(format!("not a tar archive: {e}")))?;
        for entry in entries {
            self.check_cancel()?;
            let mut entry = entry.map_err(|e| {
                UnpackError::archive(format!(
                    "after {} entries: not a valid tar archive: {e}",
                    self.report.entries
                ))
            })?;
            let header = entry.header();
            let entry_type = header.entry_type();
            if matches!(
                entry_type,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let raw_path = entry.path_bytes().into_owned();
            let mode = header.mode().unwrap_or(0o644);
            let uid = header.uid().unwrap_or(0);
            let gid = header.gid().unwrap_or(0);
            let mtime = header.mtime().ok().and_then(|m| i64::try_from(m).ok());
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let kind = match entry_type {
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => Kind::File,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(link.as_deref().unwrap_or_default()),
                tar::EntryType::Link => Kind::HardLink(link.as_deref().unwrap_or_default()),
                tar::EntryType::Char | tar::EntryType::Block => Kind::Skip("device node"),
                tar::EntryType::Fifo => Kind::Skip("fifo"),
                _ => Kind::Skip("unsupported entry type"),
            };
            let size = entry.size();
            self.entry(
                Entry {
                    path: &raw_path,
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime,
                    size,
                },
                &mut entry,
            )?;
        }
        Ok(archive.into_inner())
    }

    fn zip(&mut self, file: File) -> Result<(), UnpackError> {
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| UnpackError::archive(format!("not a zip archive: {e}")))?;
        let count = zip.len() as u64;
        if count > self.limits.max_entries {
            return Err(UnpackError::archive(format!(
                "{count} entries, more than the limit of {}",
                self.limits.max_entries
            )));
        }
        for i in 0..zip.len() {
            self.check_cancel()?;
            let mut file = zip
                .by_index(i)
                .map_err(|e| UnpackError::archive(format!("entry {i}: cannot be read: {e}")))?;
            let raw_path = file.name_raw().to_vec();
            let unix = file.unix_mode();
            let is_dir = file.is_dir();
            let is_symlink = file.is_symlink();
            let size = file.size();
            let mut target = Vec::new();
            if is_symlink {
                (&mut file)
                    .take(MAX_LINK_TARGET as u64 + 1)
                    .read_to_end(&mut target)
                    .map_err(|e| UnpackError::at(&raw_path, format!("reading the link: {e}")))?;
            }
            let file_type = unix.map(|m| m & SFlag::S_IFMT.bits());
            let kind = if is_dir {
                Kind::Dir
            } else if is_symlink {
                Kind::Symlink(&target)
            } else {
                match file_type {
                    None | Some(0) => Kind::File,
                    Some(t) if t == SFlag::S_IFREG.bits() => Kind::File,
                    Some(t) if t == SFlag::S_IFCHR.bits() || t == SFlag::S_IFBLK.bits() => {
                        Kind::Skip("device node")
                    }
                    Some(t) if t == SFlag::S_IFIFO.bits() => Kind::Skip("fifo"),
                    Some(_) => Kind::Skip("unsupported entry type"),
                }
            };
            let mode = unix.unwrap_or(if is_dir { 0o755 } else { 0o644 });
            self.entry(
                Entry {
                    path: &raw_path,
                    kind,
                    mode,
                    uid: 0,
                    gid: 0,
                    mtime: None,
                    size,
                },
                &mut file,
            )?;
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), UnpackError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(UnpackError::archive(CANCELLED));
        }
        Ok(())
    }

    fn entry(&mut self, e: Entry<'_>, data: &mut dyn Read) -> Result<(), UnpackError> {
        self.report.entries += 1;
        if self.report.entries > self.limits.max_entries {
            return Err(UnpackError::at(
                e.path,
                format!("more than {} entries (the limit)", self.limits.max_entries),
            ));
        }
        let path = normalize(e.path).map_err(|why| UnpackError::at(e.path, why))?;
        let Some(path) = path else {
            // The archive's root itself: the target exists already.
            return Ok(());
        };
        let (parent, name) = split(&path);
        if !matches!(e.kind, Kind::File) {
            self.parent_cache = None;
        }
        if self.layer.is_some() && name.starts_with(b".wh.") {
            self.parent_cache = None;
            return self.whiteout(&path, parent, name);
        }
        if let Kind::Skip(why) = e.kind {
            if self.report.skipped.len() < MAX_SKIPPED_LISTED {
                self.report.skipped.push(format!("{}: {why}", show(&path)));
            }
            return Ok(());
        }
        let (uid, gid) = self
            .ownership
            .ids(e.uid, e.gid)
            .map_err(|why| UnpackError::at(&path, why))?;
        let mode = self.ownership.mode(e.mode);
        let cached = match self.parent_cache.take() {
            Some((p, fd)) if p == parent => Some(fd),
            _ => None,
        };
        let dir = match cached {
            Some(fd) => fd,
            None => self
                .root
                .dir(parent, true)
                .map_err(|errno| self.parent_error(&path, parent, errno))?,
        };
        match e.kind {
            Kind::Dir => self.dir(&dir, &path, name, mode, uid, gid)?,
            Kind::File => {
                self.file(&dir, &path, name, &e, mode, uid, gid, data)?;
                self.parent_cache = Some((parent.to_vec(), dir));
            }
            Kind::Symlink(target) => self.symlink(&dir, &path, name, target, uid, gid)?,
            Kind::HardLink(target) => self.hard_link(&dir, &path, name, target)?,
            Kind::Skip(_) => {}
        }
        if let Some(written) = self.layer.as_mut() {
            written.insert(path);
        }
        Ok(())
    }

    fn parent_error(&self, path: &[u8], parent: &[u8], errno: Errno) -> UnpackError {
        let reason = match errno {
            Errno::ELOOP | Errno::EXDEV => format!(
                "{:?} on its path is a symlink: writing through a symlink is refused",
                self.first_symlink(parent)
            ),
            Errno::ENOTDIR => format!("{:?} on its path is not a directory", show(parent)),
            e => format!("opening its directory {:?}: {}", show(parent), e.desc()),
        };
        UnpackError::at(path, reason)
    }

    /// The first component of `parent` that is a symlink, for messages.
    fn first_symlink(&self, parent: &[u8]) -> String {
        let mut end = 0;
        while end <= parent.len() {
            let next = parent[end..]
                .iter()
                .position(|b| *b == b'/')
                .map_or(parent.len(), |i| end + i);
            let (dir, name) = split(&parent[..next]);
            if let Ok(fd) = self.root.dir(dir, false)
                && confined::is_symlink(fd.as_fd(), name)
            {
                return show(&parent[..next]);
            }
            end = next + 1;
        }
        show(parent)
    }

    /// Makes room for `name`: removes what is there unless it is a directory and `keep_dir`.
    fn clear(
        &self,
        dir: &OwnedFd,
        path: &[u8],
        name: &[u8],
        keep_dir: bool,
    ) -> Result<bool, UnpackError> {
        match confined::kind(dir.as_fd(), name) {
            None => Ok(false),
            Some(SFlag::S_IFDIR) if keep_dir => Ok(true),
            Some(_) => confined::remove(dir.as_fd(), name)
                .map(|()| false)
                .map_err(|e| {
                    UnpackError::at(path, format!("replacing what is there: {}", e.desc()))
                }),
        }
    }

    fn dir(
        &mut self,
        dir: &OwnedFd,
        path: &[u8],
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        if !self.clear(dir, path, name, true)? {
            nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o700))
                .map_err(|e| UnpackError::at(path, format!("mkdir: {}", e.desc())))?;
        }
        self.chown_at(dir, path, name, uid, gid)?;
        self.dir_modes.push((path.to_vec(), mode));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn file(
        &mut self,
        dir: &OwnedFd,
        path: &[u8],
        name: &[u8],
        e: &Entry<'_>,
        mode: u32,
        uid: u32,
        gid: u32,
        data: &mut dyn Read,
    ) -> Result<(), UnpackError> {
        self.check_size(path, e.size)?;
        let create = || {
            openat(
                dir.as_fd(),
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
        };
        let fd = match create() {
            // Something is there (an earlier entry, a lower layer): replace it, never write
            // into it (it may be a symlink).
            Err(Errno::EEXIST) => {
                self.clear(dir, path, name, false)?;
                create()
            }
            other => other,
        }
        .map_err(|err| UnpackError::at(path, format!("create: {}", err.desc())))?;
        let mut file = File::from(fd);
        let mut buf = std::mem::take(&mut self.buf);
        let copied = self.copy(path, data, &mut file, &mut buf);
        self.buf = buf;
        copied?;
        if uid != self.euid || gid != self.egid {
            fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(|err| UnpackError::at(path, format!("chown: {}", err.desc())))?;
        }
        fchmod(file.as_fd(), Mode::from_bits_truncate(mode))
            .map_err(|err| UnpackError::at(path, format!("chmod: {}", err.desc())))?;
        if let Some(mtime) = e.mtime {
            let omit = TimeSpec::UTIME_OMIT;
            let _ = futimens(file.as_fd(), &omit, &TimeSpec::new(mtime, 0));
        }
        Ok(())
    }

    /// Fails if `more` bytes would pass the size or ratio limit.
    fn check_size(&self, path: &[u8], more: u64) -> Result<(), UnpackError> {
        let total = self.report.bytes.saturating_add(more);
        if total > self.limits.max_bytes {
            return Err(UnpackError::at(
                path,
                format!(
                    "the archive expands to more than the limit of {} ({} bytes): {} ({} bytes) \
                     written and this entry holds {} bytes",
                    format_size(self.limits.max_bytes),
                    self.limits.max_bytes,
                    format_size(self.report.bytes),
                    self.report.bytes,
                    more
                ),
            ));
        }
        let allowed = self
            .archive_bytes
            .saturating_mul(self.limits.max_ratio)
            .max(self.limits.ratio_slack);
        if total > allowed {
            return Err(UnpackError::at(
                path,
                format!(
                    "the archive expands more than {}:1: {} bytes of content from {} archive \
                     bytes (an archive bomb?)",
                    self.limits.max_ratio, total, self.archive_bytes
                ),
            ));
        }
        Ok(())
    }

    fn copy(
        &mut self,
        path: &[u8],
        data: &mut dyn Read,
        out: &mut File,
        buf: &mut [u8],
    ) -> Result<(), UnpackError> {
        loop {
            self.check_cancel()?;
            let n = match data.read(buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UnpackError::at(path, format!("reading the archive: {e}"))),
            };
            self.check_size(path, n as u64)?;
            out.write_all(&buf[..n])
                .map_err(|e| UnpackError::at(path, format!("writing: {e}")))?;
            self.report.bytes += n as u64;
            if self.report.bytes - self.reported >= PROGRESS_EVERY {
                self.reported = self.report.bytes;
                self.progress
                    .send(Phase::Unpacking, self.report.bytes, None);
            }
        }
    }

    fn symlink(
        &mut self,
        dir: &OwnedFd,
        path: &[u8],
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0) {
            return Err(UnpackError::at(
                path,
                format!("a symlink target of {} bytes", target.len()),
            ));
        }
        self.clear(dir, path, name, false)?;
        symlinkat(target, dir.as_fd(), name)
            .map_err(|e| UnpackError::at(path, format!("symlink: {}", e.desc())))?;
        self.chown_at(dir, path, name, uid, gid)
    }

    fn hard_link(
        &mut self,
        dir: &OwnedFd,
        path: &[u8],
        name: &[u8],
        target: &[u8],
    ) -> Result<(), UnpackError> {
        let target = match normalize(target) {
            Ok(Some(t)) => t,
            Ok(None) => return Err(UnpackError::at(path, "a hard link to the tree's root")),
            Err(why) => {
                return Err(UnpackError::at(
                    path,
                    format!("a hard link to {:?}, {why}", show(target)),
                ));
            }
        };
        if target == path {
            return Ok(());
        }
        let (tparent, tname) = split(&target);
        let tdir = self.root.dir(tparent, false).map_err(|errno| {
            let mut e = self.parent_error(path, tparent, errno);
            e.reason = format!("hard link to {:?}: {}", show(&target), e.reason);
            e
        })?;
        match confined::kind(tdir.as_fd(), tname) {
            None => {
                return Err(UnpackError::at(
                    path,
                    format!(
                        "a hard link to {:?}, which is not in the tree",
                        show(&target)
                    ),
                ));
            }
            Some(SFlag::S_IFDIR) => {
                return Err(UnpackError::at(
                    path,
                    format!("a hard link to the directory {:?}", show(&target)),
                ));
            }
            Some(_) => {}
        }
        self.clear(dir, path, name, false)?;
        linkat(tdir.as_fd(), tname, dir.as_fd(), name, AtFlags::empty())
            .map_err(|e| UnpackError::at(path, format!("link: {}", e.desc())))
    }

    fn chown_at(
        &self,
        dir: &OwnedFd,
        path: &[u8],
        name: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), UnpackError> {
        if uid == self.euid && gid == self.egid {
            return Ok(());
        }
        fchownat(
            dir.as_fd(),
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| UnpackError::at(path, format!("chown: {}", e.desc())))
    }

    /// `.wh.NAME` removes NAME of the layers below; `.wh..wh..opq` empties the directory
    /// of what the layers below put there.
    fn whiteout(&mut self, path: &[u8], parent: &[u8], name: &[u8]) -> Result<(), UnpackError> {
        let dir = match self.root.dir(parent, false) {
            Ok(d) => d,
            // Whiting out inside a directory no layer made: nothing to hide.
            Err(Errno::ENOENT) => return Ok(()),
            Err(errno) => return Err(self.parent_error(path, parent, errno)),
        };
        let child = |n: &[u8]| -> Vec<u8> {
            let mut p = parent.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(n);
            p
        };
        let victims: Vec<Vec<u8>> = if name == b".wh..wh..opq" {
            confined::children(&dir)
                .map_err(|e| UnpackError::at(path, format!("listing: {}", e.desc())))?
        } else {
            let target = &name[b".wh.".len()..];
            if target.is_empty() || target == b"." || target == b".." {
                return Err(UnpackError::at(path, "a whiteout without a name"));
            }
            vec![target.to_vec()]
        };
        let layer = self.layer.as_ref();
        for victim in victims {
            if layer.is_some_and(|l| l.contains(&child(&victim))) {
                continue;
            }
            confined::remove(dir.as_fd(), &victim)
                .map_err(|e| UnpackError::at(path, format!("whiteout: {}", e.desc())))?;
        }
        Ok(())
    }

    /// Applies the directory modes, deepest first.
    fn finish(&mut self) -> Result<(), UnpackError> {
        let mut modes = std::mem::take(&mut self.dir_modes);
        // The last entry of a directory decides its mode: newest first, a stable sort, then
        // the first of each run is kept.
        modes.reverse();
        modes.sort_by(|a, b| b.0.cmp(&a.0));
        modes.dedup_by(|a, b| a.0 == b.0);
        for (path, mode) in modes {
            let fd = match self.root.dir(&path, false) {
                Ok(fd) => fd,
                // Removed by a later entry or whiteout.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                Err(e) => return Err(UnpackError::at(&path, format!("open: {}", e.desc()))),
            };
            fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))
                .map_err(|e| UnpackError::at(&path, format!("chmod: {}", e.desc())))?;
        }
        Ok(())
    }
}

/// A reader that ends on a 512-byte boundary: a stream cut short of its last block's padding
/// gets zeros up to the boundary.
struct BlockPad<R> {
    inner: R,
    read: u64,
    pad: u64,
}

impl<R> BlockPad<R> {
    fn new(inner: R) -> BlockPad<R> {
        BlockPad {
            inner,
            read: 0,
            pad: 0,
        }
    }
}

impl<R: Read> Read for BlockPad<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pad == 0 {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.pad = (512 - self.read % 512) % 512;
            if self.pad == 0 {
                return Ok(0);
            }
        }
        let n = buf
            .len()
            .min(usize::try_from(self.pad).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.pad -= n as u64;
        self.read += n as u64;
        Ok(n)
    }
}

/// The decompressed stream of a tar of `format`.
pub(crate) fn decompress<'r, R: io::BufRead + 'r>(
    reader: R,
    format: ArchiveFormat,
) -> Result<Box<dyn Read + 'r>, UnpackError> {
    Ok(match format {
        ArchiveFormat::Tar => Box::new(reader),
        ArchiveFormat::TarGz => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        ArchiveFormat::TarZst => Box::new(
            zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| UnpackError::archive(format!("zstd: {e}")))?,
        ),
        ArchiveFormat::Zip => {
            return Err(UnpackError::archive("a zip archive is not a tar stream"));
        }
    })
}
