//! OCI images: reading an image layout (a directory or an uncompressed tar, as written by
//! `skopeo copy ... oci:`/`oci-archive:`, `umoci`, `buildah push`, `docker save` since 25) or
//! a `docker save` tar of the older format, selecting the manifest by digest (through an
//! index for this host's platform), verifying every blob (digest and size) before it is
//! used, applying the layers in order with whiteouts into one root filesystem, and reading
//! the config's Entrypoint, Cmd, Env, WorkingDir and User. A `User` name or group the image's
//! `/etc/passwd` / `/etc/group` does not know refuses the image.
//!
//! For an old `docker save` tar, which has no manifest, the digest is the image id (the
//! config's digest); its layers are verified against the config's `diff_ids`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::confined::{self, Root};
use super::unpack::{UnpackError, Writer, decompress};
use crate::spec::artifact::{ArchiveFormat, Digest};

/// Largest manifest, index or config read.
const MAX_JSON: u64 = 4 << 20;
/// Most entries in an image tar (blobs and metadata, not the layers' own entries).
const MAX_TAR_ENTRIES: u64 = 100_000;

const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
const LAYER_TYPES: [(&str, ArchiveFormat); 5] = [
    ("application/vnd.oci.image.layer.v1.tar", ArchiveFormat::Tar),
    (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        ArchiveFormat::TarGz,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+zstd",
        ArchiveFormat::TarZst,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ArchiveFormat::TarGz,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        ArchiveFormat::Tar,
    ),
];

/// The image's defaults for running it, from its config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// The manifest (or, for an old `docker save` tar, the image id).
    pub manifest: String,
    /// The config blob.
    pub config: String,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value` each.
    pub env: Vec<String>,
    /// `WorkingDir`, when set.
    pub working_dir: Option<String>,
    /// `User`, resolved in the image, when set.
    pub user: Option<ImageUser>,
}

/// The config's `User`, resolved against the image's `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUser {
    /// As written: `app`, `1000`, `app:staff`, `1000:50`.
    pub spec: String,
    /// The uid.
    pub uid: u32,
    /// The primary gid (the passwd entry's, or 0 for a uid the image does not list).
    pub gid: u32,
}

/// Why an image could not be used.
#[derive(Debug)]
pub(crate) enum OciError {
    /// The layout, a manifest, config or blob.
    Image(String),
    /// A layer's content.
    Layer { layer: String, error: UnpackError },
}

impl From<String> for OciError {
    fn from(s: String) -> OciError {
        OciError::Image(s)
    }
}

/// A file of the layout, and its size.
type Opened = (Box<dyn Read + Send>, u64);

/// Where an image's files are.
enum Layout {
    Dir(Root),
    Tar {
        file: Arc<File>,
        /// Regular files by normalized path: (offset, size); symlinks: their target path.
        files: HashMap<Vec<u8>, TarItem>,
    },
}

enum TarItem {
    File { offset: u64, size: u64 },
    Link(Vec<u8>),
}

/// A byte range of a file, read with `pread` (independent of other readers).
struct Range {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Range {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads to the end; the digest and byte count of everything read.
    fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            Digest::from_bytes(self.hasher.finalize().into()),
            self.count,
        ))
    }
}

impl Layout {
    fn open(path: &Path) -> Result<Layout, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
        if meta.is_dir() {
            return Root::open(path)
                .map(Layout::Dir)
                .map_err(|e| format!("cannot open the directory: {e}"));
        }
        let file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).unwrap_or(0);
        if n >= 2 && magic[..2] == [0x1f, 0x8b] || n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(
                "a compressed file: an image must be an OCI layout directory, an \
                        uncompressed OCI layout tar or a `docker save` tar (decompress it first)"
                    .into(),
            );
        }
        let file = Arc::new(file);
        let mut files = HashMap::new();
        let mut archive = tar::Archive::new(&*file);
        let entries = archive
            .entries_with_seek()
            .map_err(|e| format!("not a tar archive: {e}"))?;
        let mut count = 0u64;
        for entry in entries {
            let entry = entry.map_err(|e| format!("not a valid tar archive: {e}"))?;
            count += 1;
            if count > MAX_TAR_ENTRIES {
                return Err(format!(
                    "more than {MAX_TAR_ENTRIES} entries: not an image layout"
                ));
            }
            let Ok(Some(path)) = confined::normalize(&entry.path_bytes()) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    files.insert(
                        path,
                        TarItem::File {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let Some(target) = entry.link_name_bytes() else {
                        continue;
                    };
                    let resolved = if entry.header().entry_type() == tar::EntryType::Link {
                        confined::normalize(&target).ok().flatten()
                    } else {
                        resolve_relative(confined::split(&path).0, &target)
                    };
                    if let Some(resolved) = resolved {
                        files.insert(path, TarItem::Link(resolved));
                    }
                }
                _ => {}
            }
        }
        Ok(Layout::Tar { file, files })
    }

    /// The file at `rel` and its size.
    fn open_path(&self, rel: &str) -> Result<Option<Opened>, String> {
        match self {
            Layout::Dir(root) => {
                let Some(file) = root
                    .open_file(rel)
                    .map_err(|e| format!("reading {rel}: {e}"))?
                else {
                    return Ok(None);
                };
                let meta = file.metadata().map_err(|e| format!("reading {rel}: {e}"))?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some((
                    Box::new(BufReader::with_capacity(1 << 20, file)),
                    meta.len(),
                )))
            }
            Layout::Tar { file, files } => {
                let mut key = rel.as_bytes().to_vec();
                for _ in 0..8 {
                    match files.get(&key) {
                        None => return Ok(None),
                        Some(TarItem::Link(target)) => key = target.clone(),
                        Some(TarItem::File { offset, size }) => {
                            let range = Range {
                                file: file.clone(),
                                pos: *offset,
                                end: offset + size,
                            };
                            return Ok(Some((
                                Box::new(BufReader::with_capacity(1 << 20, range)),
                                *size,
                            )));
                        }
                    }
                }
                Err(format!("{rel}: too many levels of links"))
            }
        }
    }

    fn blob_path(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    /// A small JSON file, whole.
    fn read_small(&self, rel: &str) -> Result<Option<Vec<u8>>, String> {
        let Some((reader, size)) = self.open_path(rel)? else {
            return Ok(None);
        };
        if size > MAX_JSON {
            return Err(format!("{rel} is {size} bytes, more than {MAX_JSON}"));
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        reader
            .take(MAX_JSON)
            .read_to_end(&mut out)
            .map_err(|e| format!("reading {rel}: {e}"))?;
        Ok(Some(out))
    }

    /// A small blob, verified against `digest` (and `size` when given).
    fn json_blob(&self, what: &str, digest: &Digest, size: Option<u64>) -> Result<Vec<u8>, String> {
        let rel = Layout::blob_path(digest);
        let Some(bytes) = self.read_small(&rel)? else {
            return Err(format!(
                "the {what} {digest} is missing from the layout (no {rel})"
            ));
        };
        check_blob(what, digest, size, &bytes)?;
        Ok(bytes)
    }
}

/// `target` of a symlink in directory `dir`, as a normalized path inside the archive.
fn resolve_relative(dir: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    if target.first() == Some(&b'/') {
        return confined::normalize(target).ok().flatten();
    }
    let mut parts: Vec<&[u8]> = dir
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    for component in target.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join(&b'/'))
}

fn check_blob(what: &str, digest: &Digest, size: Option<u64>, bytes: &[u8]) -> Result<(), String> {
    let actual = Digest::from_bytes(Sha256::digest(bytes).into());
    if actual != *digest {
        return Err(format!(
            "the {what} blob {digest} does not match its digest: its content hashes to {actual}"
        ));
    }
    if let Some(size) = size.filter(|s| *s != bytes.len() as u64) {
        return Err(format!(
            "the {what} blob {digest} is {} bytes, its descriptor says {size}",
            bytes.len()
        ));
    }
    Ok(())
}

/// A descriptor's digest as ours, refusing other algorithms.
fn descriptor_digest(what: &str, d: &oci_spec::image::Descriptor) -> Result<Digest, String> {
    let text = d.digest().to_string();
    Digest::from_oci(&text)
        .ok_or_else(|| format!("the {what} digest {text:?} is not a sha256 digest (unsupported)"))
}

/// Which manifest of an index runs here.
fn pick_from_index(index: &ImageIndex, digest: &Digest) -> Result<(Digest, u64), String> {
    let host_arch = oci_spec::image::Arch::default().to_string();
    let mut listed = Vec::new();
    let mut picked = Vec::new();
    for m in index.manifests() {
        let media = m.media_type().to_string();
        let platform = m
            .platform()
            .as_ref()
            .map(|p| format!("{}/{}", p.os(), p.architecture()));
        listed.push(format!(
            "{} ({media}{})",
            m.digest(),
            platform
                .as_deref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default()
        ));
        if !MANIFEST_TYPES.contains(&media.as_str()) {
            continue;
        }
        let fits = m.platform().as_ref().is_none_or(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == host_arch
        });
        if fits {
            picked.push(m);
        }
    }
    match picked.as_slice() {
        [one] => Ok((descriptor_digest("manifest", one)?, one.size())),
        [] => Err(format!(
            "the index {digest} has no manifest for linux/{host_arch}: it lists {}",
            if listed.is_empty() {
                "nothing".to_string()
            } else {
                listed.join(", ")
            }
        )),
        several => Err(format!(
            "the index {digest} has {} manifests for linux/{host_arch}: name one of them by its \
             digest ({})",
            several.len(),
            several
                .iter()
                .map(|m| m.digest().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
}

/// The old `docker save` manifest.json entries.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSave {
    config: String,
    layers: Vec<String>,
}

/// One layer to apply: where its blob is, how it is compressed, and what must hold.
struct LayerPlan {
    name: String,
    path: String,
    format: Option<ArchiveFormat>,
    /// Digest and size of the blob as stored, when the manifest gives them.
    blob: Option<(Digest, u64)>,
    /// The digest of the uncompressed tar (config `diff_ids`).
    diff_id: Digest,
}

/// Reads the image `digest` from `source` into the empty directory the writer targets.
pub(crate) fn unpack_image(
    source: &Path,
    digest: &Digest,
    writer: &mut Writer<'_>,
) -> Result<ImageConfig, OciError> {
    let layout = Layout::open(source)?;
    let Plan {
        manifest,
        config: config_bytes,
        config_digest,
        layers,
    } = match layout.read_small(&Layout::blob_path(digest))? {
        Some(bytes) => {
            check_blob("manifest", digest, None, &bytes)?;
            oci_plan(&layout, digest, bytes)?
        }
        None => docker_plan(&layout, digest)?,
    };
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| format!("the config {config_digest} is not an image config: {e}"))?;
    if config.os().to_string() != "linux" {
        return Err(format!("the image is for {}, not linux", config.os()).into());
    }
    let host_arch = oci_spec::image::Arch::default().to_string();
    if config.architecture().to_string() != host_arch {
        return Err(format!(
            "the image is for {}, this host is {host_arch}",
            config.architecture()
        )
        .into());
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(format!(
            "the manifest lists {} layers, the config's rootfs.diff_ids {}",
            layers.len(),
            diff_ids.len()
        )
        .into());
    }
    let layers: Vec<LayerPlan> = layers
        .into_iter()
        .zip(diff_ids)
        .map(|(mut layer, diff_id)| {
            layer.diff_id = Digest::from_oci(diff_id).ok_or_else(|| {
                format!("the config's diff_id {diff_id:?} is not a sha256 digest")
            })?;
            Ok::<_, String>(layer)
        })
        .collect::<Result<_, _>>()?;
    for layer in &layers {
        apply_layer(&layout, layer, writer)?;
    }
    let c = config.config().clone().unwrap_or_default();
    let user = match c.user().as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(spec) => Some(resolve_user(writer.root(), spec)?),
    };
    Ok(ImageConfig {
        manifest: manifest.to_string(),
        config: config_digest.to_string(),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
        user,
    })
}

/// What an image is made of: its manifest's digest (for an old `docker save` tar, the image
/// id), its config (bytes and digest), its layers.
struct Plan {
    manifest: Digest,
    config: Vec<u8>,
    config_digest: Digest,
    layers: Vec<LayerPlan>,
}

/// An OCI manifest (or an index naming one): its config and layers, checked.
fn oci_plan(layout: &Layout, digest: &Digest, bytes: Vec<u8>) -> Result<Plan, String> {
    let peek: Peek = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the blob {digest} is not a manifest or an index: {e}"))?;
    let media = peek.media_type.clone().unwrap_or_else(|| {
        if peek.manifests.is_some() {
            INDEX_TYPES[0].to_string()
        } else if peek.layers.is_some() {
            MANIFEST_TYPES[0].to_string()
        } else {
            String::new()
        }
    });
    let (manifest_digest, bytes) = if INDEX_TYPES.contains(&media.as_str()) {
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the index {digest} is not valid: {e}"))?;
        let (picked, size) = pick_from_index(&index, digest)?;
        let bytes = layout.json_blob("manifest", &picked, Some(size))?;
        (picked, bytes)
    } else if MANIFEST_TYPES.contains(&media.as_str()) {
        (*digest, bytes)
    } else {
        return Err(format!(
            "the blob {digest} has media type {media:?}: not an image manifest or index \
             (supported: {})",
            MANIFEST_TYPES
                .iter()
                .chain(&INDEX_TYPES)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the manifest {manifest_digest} is not valid: {e}"))?;
    let config_type = manifest.config().media_type().to_string();
    if !CONFIG_TYPES.contains(&config_type.as_str()) {
        return Err(format!(
            "the config has media type {config_type:?}, unsupported (supported: {})",
            CONFIG_TYPES.join(", ")
        ));
    }
    let mut layers = Vec::new();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let media = layer.media_type().to_string();
        let Some((_, format)) = LAYER_TYPES.iter().find(|(t, _)| *t == media) else {
            return Err(format!(
                "layer {} has media type {media:?}, unsupported (supported: {})",
                i + 1,
                LAYER_TYPES
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let blob = descriptor_digest("layer", layer)?;
        layers.push(LayerPlan {
            name: format!("layer {} ({blob})", i + 1),
            path: Layout::blob_path(&blob),
            format: Some(*format),
            blob: Some((blob, layer.size())),
            diff_id: blob,
        });
    }
    let config_digest = descriptor_digest("config", manifest.config())?;
    let config = layout.json_blob("config", &config_digest, Some(manifest.config().size()))?;
    Ok(Plan {
        manifest: manifest_digest,
        config,
        config_digest,
        layers,
    })
}

/// An old `docker save` tar: the entry whose config has digest `digest`.
fn docker_plan(layout: &Layout, digest: &Digest) -> Result<Plan, String> {
    let missing = || {
        format!(
            "the manifest {digest} is missing from the layout (no {})",
            Layout::blob_path(digest)
        )
    };
    let Some(bytes) = layout.read_small("manifest.json")? else {
        return Err(missing());
    };
    let entries: Vec<DockerSave> = serde_json::from_slice(&bytes)
        .map_err(|e| format!("manifest.json is not a docker save manifest: {e}"))?;
    for entry in entries {
        let config_path = confined::normalize(entry.config.as_bytes())
            .ok()
            .flatten()
            .map(|p| confined::show(&p))
            .ok_or_else(|| format!("manifest.json names the config {:?}", entry.config))?;
        let Some(config) = layout.read_small(&config_path)? else {
            return Err(format!(
                "manifest.json names {config_path}, which is missing"
            ));
        };
        if Digest::from_bytes(Sha256::digest(&config).into()) != *digest {
            continue;
        }
        let layers = entry
            .layers
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let path = confined::normalize(path.as_bytes())
                    .ok()
                    .flatten()
                    .map(|p| confined::show(&p))
                    .ok_or_else(|| format!("manifest.json names the layer {path:?}"))?;
                Ok(LayerPlan {
                    name: format!("layer {} ({path})", i + 1),
                    path,
                    format: None,
                    blob: None,
                    diff_id: *digest,
                })
            })
            .collect::<Result<_, String>>()?;
        return Ok(Plan {
            manifest: *digest,
            config,
            config_digest: *digest,
            layers,
        });
    }
    Err(missing())
}

/// Verifies a layer's blob, then applies it and checks its uncompressed digest.
fn apply_layer(
    layout: &Layout,
    layer: &LayerPlan,
    writer: &mut Writer<'_>,
) -> Result<(), OciError> {
    let open = || -> Result<Opened, String> {
        layout.open_path(&layer.path)?.ok_or_else(|| {
            format!(
                "{} is missing from the layout (no {})",
                layer.name, layer.path
            )
        })
    };
    let (reader, size) = open()?;
    if let Some((digest, expected_size)) = layer.blob {
        if size != expected_size {
            return Err(format!(
                "{} is {size} bytes, its descriptor says {expected_size}",
                layer.name
            )
            .into());
        }
        let (actual, _) = Hashing::new(reader)
            .finish()
            .map_err(|e| format!("reading {}: {e}", layer.name))?;
        if actual != digest {
            return Err(format!(
                "{} does not match its digest: its content hashes to {actual}",
                layer.name
            )
            .into());
        }
    }
    let (mut reader, size) = open()?;
    let format = match layer.format {
        Some(f) => f,
        None => sniff(&mut reader).map_err(|e| format!("reading {}: {e}", layer.name))?,
    };
    let stream = decompress(BufReader::new(reader), format).map_err(|error| OciError::Layer {
        layer: layer.name.clone(),
        error,
    })?;
    let hashing = writer
        .layer(Hashing::new(stream), size)
        .map_err(|error| OciError::Layer {
            layer: layer.name.clone(),
            error,
        })?;
    let (diff_id, _) = hashing
        .finish()
        .map_err(|e| format!("reading {}: {e}", layer.name))?;
    if diff_id != layer.diff_id {
        return Err(format!(
            "{} unpacks to {diff_id}, the config's diff_id says {}",
            layer.name, layer.diff_id
        )
        .into());
    }
    Ok(())
}

/// The compression of a layer from its first bytes (old `docker save` tars say nothing).
fn sniff(reader: &mut Box<dyn Read + Send>) -> io::Result<ArchiveFormat> {
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        match reader.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let format = if n >= 2 && head[..2] == [0x1f, 0x8b] {
        ArchiveFormat::TarGz
    } else if n == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
        ArchiveFormat::TarZst
    } else {
        ArchiveFormat::Tar
    };
    let prefix = io::Cursor::new(head[..n].to_vec());
    let rest = std::mem::replace(reader, Box::new(io::empty()));
    *reader = Box::new(prefix.chain(rest));
    Ok(format)
}

/// `User` of the config against the image's own files (symlinks resolved inside it).
fn resolve_user(root: &Root, spec: &str) -> Result<ImageUser, String> {
    let read = |file: &str| -> Result<String, String> {
        root.read_in_root(file, 4 << 20)
            .map_err(|e| format!("reading the image's /{file}: {e}"))
            .map(|b| {
                b.map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            })
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read("etc/passwd")?;
    let entry = |pred: &dyn Fn(&[&str]) -> bool| {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 4 && pred(f))
    };
    let numeric = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
    };
    let (uid, mut gid) = match numeric(user) {
        Some(uid) => {
            let gid = entry(&|f| f[2] == user)
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(0);
            (uid, gid)
        }
        None => {
            let f = entry(&|f| f[0] == user).ok_or_else(|| {
                format!("the config's User {spec:?}: the image's /etc/passwd has no user {user:?}")
            })?;
            let uid = f[2].parse().map_err(|_| {
                format!(
                    "the image's /etc/passwd entry of {user:?} has uid {:?}",
                    f[2]
                )
            })?;
            let gid = f[3].parse().map_err(|_| {
                format!(
                    "the image's /etc/passwd entry of {user:?} has gid {:?}",
                    f[3]
                )
            })?;
            (uid, gid)
        }
    };
    if let Some(group) = group {
        gid = match numeric(group) {
            Some(g) => g,
            None => {
                let groups = read("etc/group")?;
                groups
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 3 && f[0] == group)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| {
                        format!(
                            "the config's User {spec:?}: the image's /etc/group has no group {group:?}"
                        )
                    })?
            }
        };
    }
    Ok(ImageUser {
        spec: spec.to_string(),
        uid,
        gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links_resolve_inside_the_archive() {
        assert_eq!(
            resolve_relative(b"abc", b"../def/layer.tar"),
            Some(b"def/layer.tar".to_vec())
        );
        assert_eq!(resolve_relative(b"", b"../x"), None);
        assert_eq!(resolve_relative(b"a/b", b"./c"), Some(b"a/b/c".to_vec()));
    }

    #[test]
    fn users_resolve_against_the_images_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("write");
        let root = Root::open(dir.path()).expect("open");
        type Want = Result<(u32, u32), &'static str>;
        let cases: &[(&str, Want)] = &[
            ("app", Ok((1000, 1001))),
            ("1000", Ok((1000, 1001))),
            ("4242", Ok((4242, 0))),
            ("app:staff", Ok((1000, 50))),
            ("app:7", Ok((1000, 7))),
            ("ghost", Err("has no user \"ghost\"")),
            ("app:nogroup", Err("has no group \"nogroup\"")),
        ];
        for (spec, want) in cases {
            match (resolve_user(&root, spec), want) {
                (Ok(u), Ok((uid, gid))) => assert_eq!((u.uid, u.gid), (*uid, *gid), "{spec}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{spec}: {e}"),
                (got, _) => panic!("{spec}: {got:?}"),
            }
        }
    }
}
