//! The store: its directory, its single-flight locks, leases, pins and collection.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::confined::{self, Root};
use super::fetch::{FetchConfig, Fetcher, Reporter};
use super::oci::{self, ImageConfig, OciError};
use super::refs::{EntryKind, Key, Record, Refs, Why};
use super::unpack::{Limits, Ownership, Writer};
use super::{ArtifactError, Phase, Progress};
use crate::spec::artifact::{ArtifactSpec, Digest, ImageSpec, Source};

/// Partial downloads untouched this long are removed by [`ArtifactStore::gc`].
const STALE_PART: Duration = Duration::from_secs(24 * 3600);
/// The owner [`ArtifactStore::import`] pins with.
pub const IMPORT_OWNER: &str = "import";

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Its directory: `<state-dir>/artifacts`.
    pub dir: PathBuf,
    /// Bound on the bytes kept (blobs and trees); least recently used entries without a
    /// lease are evicted past it. `None`: unbounded.
    pub max_cache: Option<u64>,
    /// Fetching.
    pub fetch: FetchConfig,
    /// Unpacking.
    pub limits: Limits,
}

impl StoreConfig {
    /// Defaults for a store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            max_cache: None,
            fetch: FetchConfig::default(),
            limits: Limits::default(),
        }
    }
}

/// The content-addressed store of `<state-dir>/artifacts`. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Held for the store's life: a second store on the directory is refused.
    _lock: File,
    fetcher: Fetcher,
    limits: Limits,
    max_cache: Option<u64>,
    state: Mutex<State>,
    /// One fetch or removal per entry at a time.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seq: AtomicU64,
    /// One save of the records at a time: saves share `refs.json.tmp`, and the last one
    /// renamed into place must hold the newest records.
    saving: Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    refs: Refs,
    leases: HashMap<Key, usize>,
}

/// Keeps an entry from being removed while held (instances running from it).
#[derive(Debug)]
pub struct Lease {
    inner: Arc<Inner>,
    key: Key,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.inner.state();
        if let Some(n) = state.leases.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.leases.remove(&self.key);
            }
        }
        if let Some(record) = state.refs.entries.get_mut(&self.key) {
            record.last_used = now();
        }
    }
}

/// An unpacked archive, leased while held.
#[derive(Debug)]
pub struct ArtifactTree {
    /// The archive's SHA-256.
    pub digest: Digest,
    /// The read-only tree to mount.
    pub path: PathBuf,
    /// Keeps it in the store.
    pub lease: Lease,
}

/// An image's root filesystem, leased while held.
#[derive(Debug)]
pub struct ImageRootfs {
    /// The manifest digest.
    pub digest: Digest,
    /// The root filesystem (the lower layer of an instance's overlay).
    pub rootfs: PathBuf,
    /// Defaults for running it.
    pub config: ImageConfig,
    /// Keeps it in the store.
    pub lease: Lease,
}

/// One entry of [`ArtifactStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// Archive or image.
    pub kind: EntryKind,
    /// Its digest (archive SHA-256 or manifest digest).
    pub digest: Digest,
    /// Bytes kept: the blob plus every unpacked tree.
    pub size: u64,
    /// Who pinned it.
    pub owners: BTreeSet<String>,
    /// Handles held now (running instances).
    pub leases: usize,
    /// When it was last fetched or released, seconds since the epoch.
    pub last_used: u64,
}

/// What [`ArtifactStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries without owners nor leases.
    pub unreferenced: Vec<(EntryKind, Digest)>,
    /// Entries evicted to stay within `max_cache`.
    pub evicted: Vec<(EntryKind, Digest)>,
    /// Bytes freed.
    pub freed: u64,
    /// Stale partial downloads removed.
    pub stale_parts: usize,
}

/// Sets the flag when dropped: a dropped fetch stops its blocking work.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The tree directory name of `digest` unpacked with `ownership`.
fn tree_name(digest: &Digest, ownership: Ownership) -> String {
    match ownership {
        Ownership::Root => digest.hex(),
        Ownership::User { uid, gid } => format!("{}@{uid}.{gid}", digest.hex()),
        Ownership::Preserve => format!("{}@preserve", digest.hex()),
    }
}

/// The digest a tree directory name belongs to.
fn tree_digest(name: &str) -> Option<Digest> {
    Digest::from_hex(name.split('@').next()?)
}

impl ArtifactStore {
    /// Opens (creating) the store: takes its lock, removes unpack leftovers of a crash
    /// (keeping partial downloads to resume), and reconciles its records with what is on
    /// disk (a tree renamed in just before a crash is adopted).
    pub fn open(config: StoreConfig) -> Result<ArtifactStore, ArtifactError> {
        let dir = config.dir.clone();
        for sub in ["", "sha256", "trees", "images", "tmp"] {
            let path = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(ArtifactError::io(&path, "creating the directory"))?;
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(ArtifactError::io(&lock_path, "opening the lock"))?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ArtifactError::Locked { path: dir });
        }
        let fetcher = Fetcher::new(config.fetch)?;
        let refs_path = dir.join("refs.json");
        let (refs, unreadable) = match Refs::load(&refs_path) {
            Ok(refs) => (refs, false),
            Err(e) => {
                tracing::warn!(path = %refs_path.display(), error = %e, "artifact records unreadable; rebuilding them from the store's contents (pins are lost)");
                (Refs::default(), true)
            }
        };
        let inner = Arc::new(Inner {
            dir,
            _lock: lock,
            fetcher,
            limits: config.limits,
            max_cache: config.max_cache,
            state: Mutex::new(State {
                refs,
                leases: HashMap::new(),
            }),
            flights: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            saving: Mutex::new(()),
        });
        inner.clean_tmp()?;
        inner.reconcile(unreadable)?;
        Ok(ArtifactStore { inner })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Its bound (`--max-cache`), if any.
    pub fn max_cache(&self) -> Option<u64> {
        self.inner.max_cache
    }

    /// The archive of `spec` unpacked with `ownership`, fetched and verified first unless
    /// the store has it (then without the network). Progress goes to `progress`. Dropping
    /// the future stops the work; nothing half-done becomes visible.
    pub async fn ensure_artifact(
        &self,
        spec: &ArtifactSpec,
        ownership: Ownership,
        progress: Option<watch::Sender<Progress>>,
    ) -> Result<ArtifactTree, ArtifactError> {
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let reporter = Reporter::new(progress);
        let source = spec.source.to_string();
        let (digest, flight) = self
            .inner
            .blob(&spec.source, spec.sha256, &reporter, &cancel.0)
            .await?;
        let key = Key::artifact(digest);
        let name = tree_name(&digest, ownership);
        let tree = self.inner.dir.join("trees").join(&name);
        let bytes = if tree.is_dir() {
            self.inner.recorded_size(key, &name, &tree)
        } else {
            let blob = self.inner.blob_path(&digest);
            let tmp = self.inner.tmp_path(&format!("unpack-{name}"));
            let limits = self.inner.limits;
            let flag = cancel.0.clone();
            let target = tree.clone();
            let unpack_progress = reporter.clone();
            let format = spec.format;
            let report = tokio::task::spawn_blocking(move || {
                let result = unpack_archive(
                    &blob,
                    format,
                    &tmp,
                    &target,
                    limits,
                    ownership,
                    &flag,
                    &unpack_progress,
                );
                if result.is_err() {
                    let _ = confined::remove_path(&tmp);
                }
                result
            });
            report
                .await
                .map_err(|e| ArtifactError::Client(format!("unpack task: {e}")))?
                .map_err(|error| ArtifactError::Unpack {
                    archive: source.clone(),
                    error,
                })?
        };
        self.inner
            .state()
            .refs
            .entries
            .entry(key)
            .or_default()
            .trees
            .insert(name, bytes);
        let lease = self.inner.lease(key);
        self.inner.save()?;
        drop(flight);
        self.inner.bound().await;
        Ok(ArtifactTree {
            digest,
            path: tree,
            lease,
        })
    }

    /// The image of `spec` unpacked into a root filesystem, every blob verified, fetched
    /// first unless the store has it.
    pub async fn ensure_image(
        &self,
        spec: &ImageSpec,
        progress: Option<watch::Sender<Progress>>,
    ) -> Result<ImageRootfs, ArtifactError> {
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let reporter = Reporter::new(progress);
        let url = spec.source.to_string();
        let digest = spec.digest;
        let key = Key::image(digest);
        let final_dir = self.inner.dir.join("images").join(digest.hex());
        let _flight = self.inner.flight(&key).await;
        let config = match read_image_json(&final_dir) {
            Some(config) => {
                let bytes = self.inner.recorded_size(key, "rootfs", &final_dir);
                let mut state = self.inner.state();
                let record = state.refs.entries.entry(key).or_default();
                record.trees.insert("rootfs".into(), bytes);
                config
            }
            None => {
                let (source_path, downloaded) = match &spec.source {
                    Source::File(path) => (path.clone(), None),
                    Source::Remote(remote) => {
                        let part = self
                            .inner
                            .dir
                            .join("tmp")
                            .join(format!("image-{}.part", digest.hex()));
                        self.inner
                            .fetcher
                            .download(remote, &part, None, &reporter)
                            .await?;
                        (part.clone(), Some(part))
                    }
                };
                let tmp = self.inner.tmp_path(&format!("image-{}", digest.hex()));
                let limits = self.inner.limits;
                let flag = cancel.0.clone();
                let target = final_dir.clone();
                let unpack_progress = reporter.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let result = unpack_image_into(
                        &source_path,
                        &digest,
                        &tmp,
                        &target,
                        limits,
                        &flag,
                        &unpack_progress,
                    );
                    if result.is_err() {
                        let _ = confined::remove_path(&tmp);
                    }
                    result
                })
                .await
                .map_err(|e| ArtifactError::Client(format!("unpack task: {e}")))?;
                if let Some(part) = downloaded {
                    // Verified or not, a downloaded image is not kept: its rootfs is.
                    let _ = fs::remove_file(part);
                }
                let (config, bytes) = result.map_err(|e| match e {
                    OciError::Image(reason) => ArtifactError::Image {
                        url: url.clone(),
                        reason,
                    },
                    OciError::Layer { layer, error } => ArtifactError::Unpack {
                        archive: format!("{url} {layer}"),
                        error,
                    },
                })?;
                let mut state = self.inner.state();
                let record = state.refs.entries.entry(key).or_default();
                record.trees.insert("rootfs".into(), bytes);
                config
            }
        };
        let lease = self.inner.lease(key);
        self.inner.save()?;
        drop(_flight);
        self.inner.bound().await;
        Ok(ImageRootfs {
            digest,
            rootfs: final_dir.join("rootfs"),
            config,
            lease,
        })
    }

    /// Adds the archive at `path` to the store (for hosts without network), pinned by
    /// [`IMPORT_OWNER`] until unpinned. Returns its SHA-256, to name in specs.
    pub async fn import(&self, path: &Path) -> Result<Digest, ArtifactError> {
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let (digest, flight) = self
            .inner
            .blob(
                &Source::File(path.to_path_buf()),
                None,
                &Reporter::default(),
                &cancel.0,
            )
            .await?;
        drop(flight);
        self.pin(&digest, IMPORT_OWNER)?;
        Ok(digest)
    }

    /// Records that `owner` (a revision kept for rollback: `web@r3`) needs `digest`: it is
    /// not collected while pinned (it may still be evicted past `max_cache` when no
    /// instance uses it). The digest need not be in the store yet.
    pub fn pin(&self, digest: &Digest, owner: &str) -> Result<(), ArtifactError> {
        {
            let mut state = self.inner.state();
            state
                .refs
                .pins
                .entry(*digest)
                .or_default()
                .insert(owner.to_string());
        }
        self.inner.save()
    }

    /// Drops `owner`'s pin of `digest`.
    pub fn unpin(&self, digest: &Digest, owner: &str) -> Result<(), ArtifactError> {
        {
            let mut state = self.inner.state();
            if let Some(owners) = state.refs.pins.get_mut(digest) {
                owners.remove(owner);
                if owners.is_empty() {
                    state.refs.pins.remove(digest);
                }
            }
        }
        self.inner.save()
    }

    /// Drops every pin of `owner` (a revision no longer kept).
    pub fn unpin_owner(&self, owner: &str) -> Result<(), ArtifactError> {
        {
            let mut state = self.inner.state();
            state.refs.pins.retain(|_, owners| {
                owners.remove(owner);
                !owners.is_empty()
            });
        }
        self.inner.save()
    }

    /// Everything the store holds.
    pub fn list(&self) -> Vec<ListEntry> {
        let state = self.inner.state();
        state
            .refs
            .entries
            .iter()
            .map(|(key, record)| ListEntry {
                kind: key.kind,
                digest: key.digest,
                size: record.size(),
                owners: state
                    .refs
                    .pins
                    .get(&key.digest)
                    .cloned()
                    .unwrap_or_default(),
                leases: state.leases.get(key).copied().unwrap_or(0),
                last_used: record.last_used,
            })
            .collect()
    }

    /// Removes what nothing references (no pin, no lease), then evicts the least recently
    /// used entries without a lease while over `max_cache`, and partial downloads untouched
    /// for a day.
    pub async fn gc(&self) -> Result<GcReport, ArtifactError> {
        let mut report = self.inner.collect(true).await?;
        report.stale_parts = self.inner.stale_parts();
        Ok(report)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    /// A fresh name under `tmp/`.
    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{what}.{}.{n}", std::process::id()))
    }

    /// Waits for the single-flight lock of `key`.
    async fn flight(&self, key: &Key) -> Flight<'_> {
        let lock = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(key.lock_name()).or_default().clone()
        };
        Flight {
            inner: self,
            name: key.lock_name(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// The single-flight lock of `key` if free now.
    fn try_flight(&self, key: &Key) -> Option<Flight<'_>> {
        let lock = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(key.lock_name()).or_default().clone()
        };
        let guard = lock.try_lock_owned().ok()?;
        Some(Flight {
            inner: self,
            name: key.lock_name(),
            guard: Some(guard),
        })
    }

    /// The recorded size of a tree already on disk, measured when there is no record (a
    /// tree renamed in by a fetch that was dropped just before it recorded it).
    fn recorded_size(&self, key: Key, tree: &str, path: &Path) -> u64 {
        let known = self
            .state()
            .refs
            .entries
            .get(&key)
            .and_then(|r| r.trees.get(tree).copied());
        known.unwrap_or_else(|| du(path))
    }

    fn lease(self: &Arc<Self>, key: Key) -> Lease {
        let mut state = self.state();
        *state.leases.entry(key).or_default() += 1;
        if let Some(record) = state.refs.entries.get_mut(&key) {
            record.last_used = now();
        }
        Lease {
            inner: self.clone(),
            key,
        }
    }

    fn save(&self) -> Result<(), ArtifactError> {
        // Taken before the records are read: a save that waited writes what is newest.
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let refs = self.state().refs.clone();
        let path = self.dir.join("refs.json");
        refs.save(&path)
            .map_err(ArtifactError::io(path, "saving the records"))
    }

    /// The blob of `source` in the store: fetched (or copied) and verified unless present.
    /// Returns with the entry's single-flight lock held, so it cannot be collected before
    /// the caller is done with it.
    async fn blob(
        &self,
        source: &Source,
        expected: Option<Digest>,
        progress: &Reporter,
        cancel: &Arc<AtomicBool>,
    ) -> Result<(Digest, Flight<'_>), ArtifactError> {
        if let Some(digest) = expected {
            let key = Key::artifact(digest);
            let flight = self.flight(&key).await;
            let path = self.blob_path(&digest);
            if !path.is_file() {
                match source {
                    Source::Remote(url) => {
                        let part = self.dir.join("tmp").join(format!("{}.part", digest.hex()));
                        let fetched = self
                            .fetcher
                            .download(url, &part, Some(digest), progress)
                            .await?;
                        self.install_blob(&part, &digest, fetched.size)?;
                    }
                    Source::File(src) => {
                        let copy = self.tmp_path(&format!("copy-{}", digest.hex()));
                        let fetched = self
                            .fetcher
                            .copy_file(src, &copy, progress, cancel.clone())
                            .await;
                        let fetched = match fetched {
                            Ok(f) if f.digest == digest => f,
                            Ok(f) => {
                                let _ = fs::remove_file(&copy);
                                return Err(ArtifactError::DigestMismatch {
                                    url: source.to_string(),
                                    expected: digest,
                                    actual: f.digest,
                                    size: f.size,
                                });
                            }
                            Err(e) => {
                                let _ = fs::remove_file(&copy);
                                return Err(e);
                            }
                        };
                        self.install_blob(&copy, &digest, fetched.size)?;
                    }
                }
            }
            return Ok((digest, flight));
        }
        let Source::File(src) = source else {
            return Err(ArtifactError::Fetch {
                url: source.to_string(),
                reason: "a remote package needs its sha256".into(),
            });
        };
        let copy = self.tmp_path("copy");
        let fetched = match self
            .fetcher
            .copy_file(src, &copy, progress, cancel.clone())
            .await
        {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&copy);
                return Err(e);
            }
        };
        let key = Key::artifact(fetched.digest);
        let flight = self.flight(&key).await;
        if self.blob_path(&fetched.digest).is_file() {
            let _ = fs::remove_file(&copy);
        } else {
            self.install_blob(&copy, &fetched.digest, fetched.size)?;
        }
        Ok((fetched.digest, flight))
    }

    /// Renames a verified file into `sha256/`, read-only, and records it.
    fn install_blob(&self, from: &Path, digest: &Digest, size: u64) -> Result<(), ArtifactError> {
        let to = self.blob_path(digest);
        fs::set_permissions(from, fs::Permissions::from_mode(0o444))
            .map_err(ArtifactError::io(from, "making the blob read-only"))?;
        fs::rename(from, &to).map_err(ArtifactError::io(&to, "storing the blob"))?;
        sync_dir(&self.dir.join("sha256"))?;
        let mut state = self.state();
        let record = state
            .refs
            .entries
            .entry(Key::artifact(*digest))
            .or_default();
        record.blob = Some(size);
        record.last_used = now();
        Ok(())
    }

    /// Removes the leftovers of unpacks and copies a crash interrupted; keeps `.part` files.
    fn clean_tmp(&self) -> Result<(), ArtifactError> {
        let tmp = self.dir.join("tmp");
        let entries = fs::read_dir(&tmp).map_err(ArtifactError::io(&tmp, "listing"))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".part") {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing an interrupted unpack");
            confined::remove_path(&path).map_err(ArtifactError::io(&path, "removing"))?;
        }
        Ok(())
    }

    /// Makes the records match the directories: adopts what is on disk without a record,
    /// forgets records whose data is gone (pins stay).
    /// The records made to match what is on disk; saved when that changed them, or when they
    /// were `unreadable` (an agent start with an unchanged store writes and syncs nothing).
    fn reconcile(&self, unreadable: bool) -> Result<(), ArtifactError> {
        let mut on_disk: HashMap<Key, Record> = HashMap::new();
        let sha = self.dir.join("sha256");
        for entry in fs::read_dir(&sha)
            .map_err(ArtifactError::io(&sha, "listing"))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (Some(digest), Ok(meta)) = (Digest::from_hex(&name), entry.metadata()) else {
                continue;
            };
            on_disk.entry(Key::artifact(digest)).or_default().blob = Some(meta.len());
        }
        let trees = self.dir.join("trees");
        for entry in fs::read_dir(&trees)
            .map_err(ArtifactError::io(&trees, "listing"))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(digest) = tree_digest(&name) {
                on_disk
                    .entry(Key::artifact(digest))
                    .or_default()
                    .trees
                    .insert(name, 0);
            }
        }
        let images = self.dir.join("images");
        for entry in fs::read_dir(&images)
            .map_err(ArtifactError::io(&images, "listing"))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(digest) = Digest::from_hex(&name) {
                on_disk
                    .entry(Key::image(digest))
                    .or_default()
                    .trees
                    .insert("rootfs".into(), 0);
            }
        }
        let mut state = self.state();
        let known = std::mem::take(&mut state.refs.entries);
        for (key, mut found) in on_disk {
            let old = known.get(&key);
            for (tree, size) in found.trees.iter_mut() {
                *size = match old.and_then(|o| o.trees.get(tree)) {
                    Some(s) => *s,
                    None => {
                        let path = match key.kind {
                            EntryKind::Artifact => trees.join(tree),
                            EntryKind::Image => images.join(key.digest.hex()),
                        };
                        tracing::info!(path = %path.display(), "adopting an unrecorded entry");
                        du(&path)
                    }
                };
            }
            found.last_used = old.map_or_else(now, |o| o.last_used);
            state.refs.entries.insert(key, found);
        }
        let changed = state.refs.entries != known;
        drop(state);
        if changed || unreadable {
            self.save()
        } else {
            Ok(())
        }
    }

    /// Keeps the store within `max_cache` after something was added.
    async fn bound(&self) {
        if self.max_cache.is_some()
            && let Err(e) = self.collect(false).await
        {
            tracing::warn!(error = %e, "artifact store: evicting past max-cache failed");
        }
    }

    /// Removes what the plan names; an entry busy in a fetch is skipped.
    async fn collect(&self, unreferenced: bool) -> Result<GcReport, ArtifactError> {
        let plan = {
            let state = self.state();
            state.refs.plan(&state.leases, self.max_cache, unreferenced)
        };
        let mut report = GcReport::default();
        for (key, why) in plan {
            let Some(_flight) = self.try_flight(&key) else {
                continue;
            };
            let record = {
                let mut state = self.state();
                // Re-check under the flight lock: a lease or pin may have come since.
                let leased = state.leases.get(&key).is_some_and(|n| *n > 0);
                let pinned = state.refs.pinned(&key.digest);
                if leased || (why == Why::Unreferenced && pinned) {
                    continue;
                }
                match state.refs.entries.remove(&key) {
                    Some(r) => r,
                    None => continue,
                }
            };
            self.save()?;
            self.remove_entry(&key, &record)?;
            report.freed += record.size();
            let item = (key.kind, key.digest);
            match why {
                Why::Unreferenced => report.unreferenced.push(item),
                Why::Evicted => report.evicted.push(item),
            }
            tracing::info!(kind = ?key.kind, digest = %key.digest, reason = ?why, "artifact store: removed");
        }
        Ok(report)
    }

    /// Deletes an entry's files: each is renamed under `tmp/` first (gone at once), then
    /// removed.
    fn remove_entry(&self, key: &Key, record: &Record) -> Result<(), ArtifactError> {
        let mut paths = Vec::new();
        match key.kind {
            EntryKind::Artifact => {
                paths.push(self.blob_path(&key.digest));
                for tree in record.trees.keys() {
                    paths.push(self.dir.join("trees").join(tree));
                }
            }
            EntryKind::Image => paths.push(self.dir.join("images").join(key.digest.hex())),
        }
        for path in paths {
            let trash = self.tmp_path("trash");
            match fs::rename(&path, &trash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ArtifactError::io(&path, "removing")(e)),
            }
            let removed = if trash.is_dir() {
                confined::remove_path(&trash)
            } else {
                fs::remove_file(&trash)
            };
            removed.map_err(ArtifactError::io(&trash, "removing"))?;
        }
        Ok(())
    }

    /// Removes `.part` files nobody touched for [`STALE_PART`] and nobody is fetching.
    fn stale_parts(&self) -> usize {
        let tmp = self.dir.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".part") else {
                continue;
            };
            let key = match stem.strip_prefix("image-") {
                Some(hex) => Digest::from_hex(hex).map(Key::image),
                None => Digest::from_hex(stem).map(Key::artifact),
            };
            let Some(key) = key else { continue };
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > STALE_PART);
            if stale
                && let Some(_flight) = self.try_flight(&key)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

/// The single-flight lock of one entry; the map entry goes when nobody waits for it.
struct Flight<'a> {
    inner: &'a Inner,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights
            .get(&self.name)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            flights.remove(&self.name);
        }
    }
}

fn sync_dir(path: &Path) -> Result<(), ArtifactError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(ArtifactError::io(path, "syncing the directory"))
}

/// Content bytes under `path`, not following symlinks.
fn du(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

fn read_image_json(dir: &Path) -> Option<ImageConfig> {
    if !dir.join("rootfs").is_dir() {
        return None;
    }
    let bytes = fs::read(dir.join("image.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Unpacks `blob` into `tmp`, makes it durable and read-only, and renames it to `target`.
/// Returns the content bytes.
#[allow(clippy::too_many_arguments)]
fn unpack_archive(
    blob: &Path,
    format: crate::spec::artifact::ArchiveFormat,
    tmp: &Path,
    target: &Path,
    limits: Limits,
    ownership: Ownership,
    cancel: &AtomicBool,
    progress: &Reporter,
) -> Result<u64, super::UnpackError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| super::UnpackError {
        entry: None,
        reason: format!("{what}: {e}"),
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(tmp)
        .map_err(|e| fail("creating the unpack directory", &e))?;
    let file = File::open(blob).map_err(|e| fail("opening the blob", &e))?;
    let root = Root::open(tmp).map_err(|e| fail("opening the unpack directory", &e))?;
    let mut writer = Writer::new(root, limits, ownership, cancel);
    writer.set_progress(progress.clone());
    writer.archive(file, format)?;
    let bytes = writer.report().bytes;
    let (uid, gid, mode) = match ownership {
        Ownership::Root => (0, 0, 0o555),
        Ownership::User { uid, gid } => (uid, gid, 0o555),
        Ownership::Preserve => (0, 0, 0o755),
    };
    finish_tree(writer.root(), uid, gid, mode).map_err(|e| fail("finishing the tree", &e))?;
    fs::rename(tmp, target).map_err(|e| fail("renaming the tree into place", &e))?;
    if let Some(parent) = target.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("syncing the directory", &e))?;
    }
    progress.send(Phase::Unpacking, bytes, Some(bytes));
    Ok(bytes)
}

/// Owner and mode of a tree's top, then everything to disk before it becomes visible.
fn finish_tree(root: &Root, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    nix::unistd::fchown(
        root.fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .or_else(|e| {
        // Unprivileged (tests): the tree stays the caller's.
        if e == nix::errno::Errno::EPERM && !nix::unistd::Uid::effective().is_root() {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    nix::sys::stat::fchmod(root.fd(), nix::sys::stat::Mode::from_bits_truncate(mode))?;
    nix::unistd::syncfs(root.fd().as_fd())?;
    Ok(())
}

/// Reads the image into `tmp/rootfs`, writes `tmp/image.json`, renames `tmp` to `target`.
fn unpack_image_into(
    source: &Path,
    digest: &Digest,
    tmp: &Path,
    target: &Path,
    limits: Limits,
    cancel: &AtomicBool,
    progress: &Reporter,
) -> Result<(ImageConfig, u64), OciError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| OciError::Image(format!("{what}: {e}"));
    let rootfs = tmp.join("rootfs");
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&rootfs)
        .map_err(|e| fail("creating the unpack directory", &e))?;
    let root = Root::open(&rootfs).map_err(|e| fail("opening the unpack directory", &e))?;
    let mut writer = Writer::new(root, limits, Ownership::Preserve, cancel);
    writer.set_progress(progress.clone());
    let config = oci::unpack_image(source, digest, &mut writer)?;
    let bytes = writer.report().bytes;
    let json = serde_json::to_vec_pretty(&config).map_err(|e| fail("writing image.json", &e))?;
    fs::write(tmp.join("image.json"), json).map_err(|e| fail("writing image.json", &e))?;
    finish_tree(writer.root(), 0, 0, 0o755).map_err(|e| fail("finishing the rootfs", &e))?;
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o700))
        .map_err(|e| fail("finishing the image", &e))?;
    fs::rename(tmp, target).map_err(|e| fail("renaming the image into place", &e))?;
    if let Some(parent) = target.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("syncing the directory", &e))?;
    }
    Ok((config, bytes))
}

#[cfg(test)]
mod save_tests {
    use super::*;
    use crate::spec::artifact::Digest;

    /// Saves from many threads at once (a package fetched while another is collected, say)
    /// all succeed, and the records on disk end as the last state.
    #[test]
    fn concurrent_saves_all_succeed_and_the_newest_records_win() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store =
            ArtifactStore::open(StoreConfig::new(tmp.path().join("artifacts"))).expect("open");
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let digest = Digest::from_bytes([t; 32]);
                    for i in 0..40 {
                        let owner = format!("svc-{t}@{i}");
                        store.pin(&digest, &owner).expect("pin");
                        if i % 2 == 0 {
                            store.unpin(&digest, &owner).expect("unpin");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let saved = Refs::load(&tmp.path().join("artifacts/refs.json")).expect("load");
        assert_eq!(saved.pins.len(), 8);
        assert!(saved.pins.values().all(|owners| owners.len() == 20));
    }

    /// An agent start with an unchanged store leaves its records as they are (no write, no
    /// fsync on the start path); unreadable records are written anew.
    #[test]
    fn opening_an_unchanged_store_does_not_rewrite_its_records() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("artifacts");
        let refs = dir.join("refs.json");
        let inode = || fs::metadata(&refs).expect("refs.json").ino();
        {
            let store = ArtifactStore::open(StoreConfig::new(dir.clone())).expect("open");
            store
                .pin(&Digest::from_bytes([7; 32]), "web@1")
                .expect("pin");
        }
        let saved = inode();
        drop(ArtifactStore::open(StoreConfig::new(dir.clone())).expect("reopen"));
        assert_eq!(inode(), saved, "rewritten although nothing changed");
        fs::write(&refs, "{not json").expect("garble");
        let garbled = inode();
        drop(ArtifactStore::open(StoreConfig::new(dir.clone())).expect("reopen"));
        assert_ne!(inode(), garbled, "unreadable records are saved anew");
        Refs::load(&refs).expect("readable again");
    }
}
