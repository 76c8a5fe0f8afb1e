//! `[artifact]` and `[image]`: where a service's files come from. A service names at most one
//! of the two: an archive unpacked read-only at `mount` inside its instances, or an OCI image
//! that becomes their root filesystem. Without either it runs what is on the host.
//!
//! Rules, each reported with the field, the value and the reason:
//! - a URL is `https://`, `http://` (only to a loopback host unless [`FetchPolicy`] allows any
//!   host), `file:///absolute/path` or an absolute path; no credentials in it (they would show
//!   in status and events);
//! - `artifact.sha256` is required for `http(s)://` (a file:// artifact is hashed when read);
//! - `artifact.format` is `tar`, `tar.gz`, `tar.zst` or `zip`, inferred from the URL's file name
//!   when absent;
//! - `artifact.mount` is an absolute, normalized path, not `/` and not under `/proc`, `/sys` or
//!   `/dev`;
//! - `image.digest` is the manifest's `sha256:<64 hex>`, always required.

use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{FieldError, quote};

const MAX_URL: usize = 4096;
const MAX_PATH: usize = 4096;

// ------------------------------------------------------------------------------------------
// Raw: as written.

/// `[artifact]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawArtifact {
    /// `https://`, `http://`, `file://` or an absolute path.
    pub url: Option<String>,
    /// The archive's SHA-256, 64 hex digits (optionally prefixed `sha256:`).
    pub sha256: Option<String>,
    /// `tar`, `tar.gz`, `tar.zst` or `zip`.
    pub format: Option<String>,
    /// Where the unpacked tree appears inside the instance.
    pub mount: Option<String>,
}

/// `[image]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawImage {
    /// An OCI image layout (directory or tar) or a `docker save` tar.
    pub url: Option<String>,
    /// The manifest digest, `sha256:<64 hex>`.
    pub digest: Option<String>,
    /// Keep the instance's writable layer when it ends.
    pub persist: Option<bool>,
}

// ------------------------------------------------------------------------------------------
// Validated.

/// What the agent allows in URLs beyond the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Plain `http://` to any host (default: loopback hosts only).
    pub allow_http: bool,
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest with these bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits, any case accepted.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = u8::try_from(hi * 16 + lo).ok()?;
        }
        Some(Digest(out))
    }

    /// `sha256:<64 hex>`, the OCI form.
    pub fn from_oci(s: &str) -> Option<Digest> {
        Digest::from_hex(s.strip_prefix("sha256:")?)
    }

    /// 64 lowercase hex digits: the name of the blob in the store.
    pub fn hex(&self) -> String {
        use fmt::Write as _;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl fmt::Display for Digest {
    /// `sha256:<hex>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a package is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `http://` or `https://`.
    Remote(url::Url),
    /// `file:///path` or a plain absolute path: read without the network.
    File(PathBuf),
}

impl Source {
    /// Whether reading it needs the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, Source::Remote(_))
    }

    /// The last component of the URL's path, for format inference.
    fn file_name(&self) -> Option<String> {
        match self {
            Source::Remote(url) => url
                .path_segments()
                .and_then(|mut segments| segments.next_back())
                .map(str::to_owned),
            Source::File(path) => path.file_name().map(|n| n.to_string_lossy().into_owned()),
        }
    }
}

impl Source {
    /// As a spec writes it: the URL, or the absolute path.
    pub fn to_url(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Remote(url) => f.write_str(url.as_str()),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// An archive format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArchiveFormat {
    /// An uncompressed tar.
    #[serde(rename = "tar")]
    Tar,
    /// A gzip-compressed tar.
    #[serde(rename = "tar.gz")]
    TarGz,
    /// A zstd-compressed tar.
    #[serde(rename = "tar.zst")]
    TarZst,
    /// A zip file.
    #[serde(rename = "zip")]
    Zip,
}

impl ArchiveFormat {
    /// Every format with its spec name.
    pub const ALL: [(ArchiveFormat, &'static str); 4] = [
        (ArchiveFormat::Tar, "tar"),
        (ArchiveFormat::TarGz, "tar.gz"),
        (ArchiveFormat::TarZst, "tar.zst"),
        (ArchiveFormat::Zip, "zip"),
    ];

    /// The spec name: `tar.gz`.
    pub fn name(self) -> &'static str {
        match self {
            ArchiveFormat::Tar => "tar",
            ArchiveFormat::TarGz => "tar.gz",
            ArchiveFormat::TarZst => "tar.zst",
            ArchiveFormat::Zip => "zip",
        }
    }

    /// By spec name.
    pub fn by_name(name: &str) -> Option<ArchiveFormat> {
        ArchiveFormat::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
    }

    /// From a file name's extension: `.tar`, `.tar.gz`/`.tgz`, `.tar.zst`/`.tzst`, `.zip`.
    pub fn infer(file_name: &str) -> Option<ArchiveFormat> {
        let name = file_name.to_ascii_lowercase();
        [
            (".tar.gz", ArchiveFormat::TarGz),
            (".tgz", ArchiveFormat::TarGz),
            (".tar.zst", ArchiveFormat::TarZst),
            (".tzst", ArchiveFormat::TarZst),
            (".tar", ArchiveFormat::Tar),
            (".zip", ArchiveFormat::Zip),
        ]
        .into_iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(_, f)| f)
    }
}

/// A validated `[artifact]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactSpec {
    /// Where the archive comes from.
    pub source: Source,
    /// Its SHA-256; always present for remote sources.
    pub sha256: Option<Digest>,
    /// How to unpack it.
    pub format: ArchiveFormat,
    /// Absolute, normalized, not `/`.
    pub mount: PathBuf,
}

/// A validated `[image]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// An OCI layout (directory or tar) or a `docker save` tar.
    pub source: Source,
    /// The manifest digest (for a `docker save` tar without one: the image id).
    pub digest: Digest,
    /// Keep the writable layer when an instance ends (default false).
    pub persist: bool,
}

/// What a service runs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Package {
    /// `[artifact]`.
    Artifact(ArtifactSpec),
    /// `[image]`.
    Image(ImageSpec),
}

impl Package {
    /// The canonical `[artifact]` and `[image]` as written: validating them gives `self`
    /// back (the format and the digests written out).
    pub fn to_raw(package: Option<&Package>) -> (Option<RawArtifact>, Option<RawImage>) {
        match package {
            None => (None, None),
            Some(Package::Artifact(a)) => (
                Some(RawArtifact {
                    url: Some(a.source.to_url()),
                    sha256: a.sha256.map(|d| d.hex()),
                    format: Some(a.format.name().to_owned()),
                    mount: Some(a.mount.to_string_lossy().into_owned()),
                }),
                None,
            ),
            Some(Package::Image(i)) => (
                None,
                Some(RawImage {
                    url: Some(i.source.to_url()),
                    digest: Some(i.digest.to_string()),
                    persist: Some(i.persist),
                }),
            ),
        }
    }

    /// The package's source, as written.
    pub fn source(&self) -> &Source {
        match self {
            Package::Artifact(a) => &a.source,
            Package::Image(i) => &i.source,
        }
    }
}

/// Validates `[artifact]` and `[image]` together: `Ok(None)` when neither is given, every
/// problem of both otherwise.
pub fn validate_package(
    artifact: Option<&RawArtifact>,
    image: Option<&RawImage>,
    policy: FetchPolicy,
) -> Result<Option<Package>, Vec<FieldError>> {
    match (artifact, image) {
        (None, None) => Ok(None),
        (Some(a), None) => a.validate(policy).map(|a| Some(Package::Artifact(a))),
        (None, Some(i)) => i.validate(policy).map(|i| Some(Package::Image(i))),
        (Some(a), Some(i)) => {
            let mut errors = vec![FieldError::new(
                "image",
                "[artifact] and [image] cannot both be given: a service runs from an archive \
                 mounted at artifact.mount or from an image as its root, not both",
            )];
            errors.extend(a.validate(policy).err().unwrap_or_default());
            errors.extend(i.validate(policy).err().unwrap_or_default());
            Err(errors)
        }
    }
}

impl RawArtifact {
    /// Every problem of `[artifact]`, or the validated value.
    pub fn validate(&self, policy: FetchPolicy) -> Result<ArtifactSpec, Vec<FieldError>> {
        let mut errors = Vec::new();
        let source = required(&mut errors, "artifact.url", self.url.as_deref()).and_then(|url| {
            parse_source(url, policy)
                .map_err(|m| errors.push(err("artifact.url", m)))
                .ok()
        });
        let sha256 = match self.sha256.as_deref() {
            None => {
                if source.as_ref().is_some_and(Source::is_remote) {
                    errors.push(err(
                        "artifact.sha256",
                        "required for an http(s):// url: the archive is verified against it \
                         before it is unpacked (sha256sum FILE prints it)",
                    ));
                }
                None
            }
            Some(s) => match Digest::from_hex(s.strip_prefix("sha256:").unwrap_or(s)) {
                Some(d) => Some(d),
                None => {
                    errors.push(err(
                        "artifact.sha256",
                        format!("{} is not a SHA-256 (64 hex digits)", quote(s)),
                    ));
                    None
                }
            },
        };
        let format = match self.format.as_deref() {
            Some(name) => ArchiveFormat::by_name(name).or_else(|| {
                errors.push(err(
                    "artifact.format",
                    format!(
                        "{} is not a format (use tar, tar.gz, tar.zst or zip)",
                        quote(name)
                    ),
                ));
                None
            }),
            None => match source.as_ref() {
                None => None,
                Some(source) => {
                    let inferred = source.file_name().as_deref().and_then(ArchiveFormat::infer);
                    if inferred.is_none() {
                        errors.push(err(
                            "artifact.format",
                            format!(
                                "required: the format cannot be told from the name of {} \
                                 (use tar, tar.gz, tar.zst or zip)",
                                quote(&source.to_string())
                            ),
                        ));
                    }
                    inferred
                }
            },
        };
        let mount = required(&mut errors, "artifact.mount", self.mount.as_deref()).and_then(|m| {
            parse_mount(m)
                .map_err(|message| errors.push(err("artifact.mount", message)))
                .ok()
        });
        match (source, format, mount) {
            (Some(source), Some(format), Some(mount)) if errors.is_empty() => Ok(ArtifactSpec {
                source,
                sha256,
                format,
                mount,
            }),
            _ => Err(errors),
        }
    }
}

impl RawImage {
    /// Every problem of `[image]`, or the validated value.
    pub fn validate(&self, policy: FetchPolicy) -> Result<ImageSpec, Vec<FieldError>> {
        let mut errors = Vec::new();
        let source = required(&mut errors, "image.url", self.url.as_deref()).and_then(|url| {
            parse_source(url, policy)
                .map_err(|m| errors.push(err("image.url", m)))
                .ok()
        });
        let digest = match self.digest.as_deref() {
            None => {
                errors.push(err(
                    "image.digest",
                    "required: the manifest digest (\"sha256:<64 hex>\") every blob of the image \
                     is verified against",
                ));
                None
            }
            Some(s) => Digest::from_oci(s).or_else(|| {
                let why = if s.contains(':') && !s.starts_with("sha256:") {
                    "only sha256 digests are supported"
                } else {
                    "not a digest (use \"sha256:<64 hex>\")"
                };
                errors.push(err("image.digest", format!("{}: {why}", quote(s))));
                None
            }),
        };
        match (source, digest) {
            (Some(source), Some(digest)) if errors.is_empty() => Ok(ImageSpec {
                source,
                digest,
                persist: self.persist.unwrap_or(false),
            }),
            _ => Err(errors),
        }
    }
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError::new(field, message)
}

fn required<'a>(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<&'a str>,
) -> Option<&'a str> {
    if value.is_none() {
        errors.push(err(field, "required"));
    }
    value
}

/// Whether `host` names this machine without leaving it.
fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// Whether plain http to `url` is allowed by `policy`.
pub fn http_allowed(url: &url::Url, policy: FetchPolicy) -> bool {
    policy.allow_http || url.host().is_some_and(|h| is_loopback_host(&h))
}

/// A URL or a path, as a [`Source`].
pub fn parse_source(s: &str, policy: FetchPolicy) -> Result<Source, String> {
    if s.contains('\0') {
        return Err(format!("{} contains a NUL byte", quote(s)));
    }
    if s.len() > MAX_URL {
        return Err(format!(
            "{} is {} bytes long (at most {MAX_URL})",
            quote(s),
            s.len()
        ));
    }
    if s.starts_with('/') {
        return local_path(s, s).map(Source::File);
    }
    let url = url::Url::parse(s).map_err(|e| {
        format!(
            "{} is not a URL ({e}): use https://, http://, file:// or an absolute path",
            quote(s)
        )
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{}: credentials in the URL are refused (they would show in status and events)",
            quote(s)
        ));
    }
    match url.scheme() {
        "https" => Ok(Source::Remote(url)),
        "http" if http_allowed(&url, policy) => Ok(Source::Remote(url)),
        "http" => Err(format!(
            "{}: plain http:// is only allowed to a loopback host (use https://, or allow http \
             in the agent's configuration)",
            quote(s)
        )),
        "file" => {
            if url.host().is_some_and(|h| !is_loopback_host(&h)) {
                return Err(format!(
                    "{}: a file:// URL names a file on this host (file:///path)",
                    quote(s)
                ));
            }
            let path = url
                .to_file_path()
                .map_err(|()| format!("{} does not name a file", quote(s)))?;
            local_path(s, &path.to_string_lossy()).map(Source::File)
        }
        other => Err(format!(
            "{}: scheme {} is not supported (use https://, http://, file:// or an absolute path)",
            quote(s),
            quote(other)
        )),
    }
}

fn local_path(written: &str, path: &str) -> Result<PathBuf, String> {
    if path.len() > MAX_PATH {
        return Err(format!("{}: the path is too long", quote(written)));
    }
    if !path.starts_with('/') {
        return Err(format!("{} is not an absolute path", quote(written)));
    }
    Ok(PathBuf::from(path))
}

/// `artifact.mount`: absolute, normalized, not `/`, not on the kernel's filesystems.
fn parse_mount(s: &str) -> Result<PathBuf, String> {
    if s.contains('\0') {
        return Err(format!("{} contains a NUL byte", quote(s)));
    }
    if s.len() > MAX_PATH {
        return Err(format!(
            "{} is too long (at most {MAX_PATH} bytes)",
            quote(s)
        ));
    }
    let path = Path::new(s);
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", quote(s)));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || s.contains("//")
        || (s.len() > 1 && s.ends_with('/'))
    {
        return Err(format!(
            "{} is not a normalized path (no \".\", \"..\", \"//\" or trailing \"/\")",
            quote(s)
        ));
    }
    if path == Path::new("/") {
        return Err(format!(
            "{}: an artifact cannot be mounted over the root (use [image] for a root filesystem)",
            quote(s)
        ));
    }
    for kernel in ["/proc", "/sys", "/dev"] {
        if path.starts_with(kernel) {
            return Err(format!(
                "{}: {kernel} is provided by the kernel, mount the artifact elsewhere (e.g. \"/app\")",
                quote(s)
            ));
        }
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn artifact(
        url: &str,
        sha: Option<&str>,
        format: Option<&str>,
        mount: Option<&str>,
    ) -> RawArtifact {
        RawArtifact {
            url: Some(url.into()),
            sha256: sha.map(Into::into),
            format: format.map(Into::into),
            mount: mount.map(Into::into),
        }
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn digest_round_trips_and_refuses_non_hex() {
        let d = Digest::from_hex(HEX).expect("valid");
        assert_eq!(d.hex(), HEX);
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
        assert_eq!(Digest::from_oci(&d.to_string()), Some(d));
        assert_eq!(Digest::from_hex(&HEX.to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex(&HEX[1..]), None);
        assert_eq!(Digest::from_hex(&format!("{}g", &HEX[1..])), None);
        assert_eq!(Digest::from_hex(&format!("{}é", &HEX[2..])), None);
        assert_eq!(Digest::from_oci(HEX), None);
    }

    #[test]
    fn a_valid_remote_artifact() {
        let spec = artifact(
            "https://repo.example/web-1.4.2.tar.gz",
            Some(&format!("sha256:{HEX}")),
            None,
            Some("/app"),
        )
        .validate(FetchPolicy::default())
        .expect("valid");
        assert_eq!(spec.format, ArchiveFormat::TarGz);
        assert_eq!(spec.mount, PathBuf::from("/app"));
        assert_eq!(spec.sha256.map(|d| d.hex()), Some(HEX.to_string()));
        assert!(spec.source.is_remote());
    }

    #[test]
    fn formats_are_inferred_from_the_name() {
        for (name, format) in [
            ("a.tar", Some(ArchiveFormat::Tar)),
            ("a.TGZ", Some(ArchiveFormat::TarGz)),
            ("a.tar.gz", Some(ArchiveFormat::TarGz)),
            ("a.tar.zst", Some(ArchiveFormat::TarZst)),
            ("a.tzst", Some(ArchiveFormat::TarZst)),
            ("a.zip", Some(ArchiveFormat::Zip)),
            ("a.gz", None),
            ("a", None),
        ] {
            assert_eq!(ArchiveFormat::infer(name), format, "{name}");
        }
        let spec = artifact("/srv/web", None, Some("zip"), Some("/app"))
            .validate(FetchPolicy::default())
            .expect("explicit format");
        assert_eq!(spec.format, ArchiveFormat::Zip);
        let errors = artifact("/srv/web", None, None, Some("/app"))
            .validate(FetchPolicy::default())
            .expect_err("no format");
        assert_eq!(fields(&errors), ["artifact.format"]);
        assert!(errors[0].message.contains("\"/srv/web\""), "{errors:?}");
    }

    #[test]
    fn every_bad_artifact_field_is_reported_with_its_value() {
        let cases: &[(RawArtifact, &str, &str)] = &[
            (
                artifact("https://r.example/a.tar", None, None, Some("/app")),
                "artifact.sha256",
                "required for an http(s):// url",
            ),
            (
                artifact("https://r.example/a.tar", Some("abc"), None, Some("/app")),
                "artifact.sha256",
                "\"abc\" is not a SHA-256",
            ),
            (
                artifact("http://r.example/a.tar", Some(HEX), None, Some("/app")),
                "artifact.url",
                "only allowed to a loopback host",
            ),
            (
                artifact("ftp://r.example/a.tar", Some(HEX), None, Some("/app")),
                "artifact.url",
                "scheme \"ftp\" is not supported",
            ),
            (
                artifact("https://u:p@r.example/a.tar", Some(HEX), None, Some("/app")),
                "artifact.url",
                "credentials in the URL",
            ),
            (
                artifact("relative/a.tar", None, None, Some("/app")),
                "artifact.url",
                "is not a URL",
            ),
            (
                artifact("file://otherhost/a.tar", None, None, Some("/app")),
                "artifact.url",
                "names a file on this host",
            ),
            (
                artifact("/a.tar", None, Some("rar"), Some("/app")),
                "artifact.format",
                "\"rar\" is not a format",
            ),
            (
                artifact("/a.tar", None, None, Some("app")),
                "artifact.mount",
                "\"app\" is not an absolute path",
            ),
            (
                artifact("/a.tar", None, None, Some("/")),
                "artifact.mount",
                "cannot be mounted over the root",
            ),
            (
                artifact("/a.tar", None, None, Some("/app/../etc")),
                "artifact.mount",
                "not a normalized path",
            ),
            (
                artifact("/a.tar", None, None, Some("/proc/x")),
                "artifact.mount",
                "/proc is provided by the kernel",
            ),
            (
                artifact("/a.tar", None, None, None),
                "artifact.mount",
                "required",
            ),
        ];
        for (raw, field, needle) in cases {
            let errors = raw
                .validate(FetchPolicy::default())
                .expect_err("must be refused");
            assert_eq!(fields(&errors), [*field], "{raw:?}: {errors:?}");
            assert!(errors[0].message.contains(needle), "{raw:?}: {errors:?}");
        }
    }

    #[test]
    fn http_is_for_loopback_unless_the_policy_allows_it() {
        for url in [
            "http://127.0.0.1:8080/a.tar",
            "http://127.9.9.9/a.tar",
            "http://[::1]:1/a.tar",
            "http://localhost/a.tar",
        ] {
            artifact(url, Some(HEX), None, Some("/app"))
                .validate(FetchPolicy::default())
                .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        }
        let open = FetchPolicy { allow_http: true };
        artifact("http://r.example/a.tar", Some(HEX), None, Some("/app"))
            .validate(open)
            .expect("allowed by policy");
    }

    #[test]
    fn file_sources_need_no_digest() {
        for url in ["file:///srv/a.tar.zst", "/srv/a.tar.zst"] {
            let spec = artifact(url, None, None, Some("/app"))
                .validate(FetchPolicy::default())
                .expect("valid");
            assert_eq!(spec.source, Source::File(PathBuf::from("/srv/a.tar.zst")));
            assert_eq!(spec.sha256, None);
            assert_eq!(spec.format, ArchiveFormat::TarZst);
        }
    }

    #[test]
    fn an_image_needs_a_sha256_manifest_digest() {
        let ok = RawImage {
            url: Some("file:///srv/images/web.oci.tar".into()),
            digest: Some(format!("sha256:{HEX}")),
            persist: None,
        }
        .validate(FetchPolicy::default())
        .expect("valid");
        assert!(!ok.persist);
        for (digest, needle) in [
            (None, "required"),
            (Some(HEX.to_string()), "not a digest"),
            (Some(format!("sha512:{HEX}")), "only sha256"),
        ] {
            let errors = RawImage {
                url: Some("/srv/images/web".into()),
                digest,
                persist: Some(true),
            }
            .validate(FetchPolicy::default())
            .expect_err("refused");
            assert_eq!(fields(&errors), ["image.digest"]);
            assert!(errors[0].message.contains(needle), "{errors:?}");
        }
    }

    #[test]
    fn at_most_one_package_and_all_errors_at_once() {
        assert_eq!(
            validate_package(None, None, FetchPolicy::default()),
            Ok(None)
        );
        let a = artifact("https://r.example/a.tar", None, None, Some("/"));
        let i = RawImage::default();
        let errors =
            validate_package(Some(&a), Some(&i), FetchPolicy::default()).expect_err("both given");
        assert_eq!(
            fields(&errors),
            [
                "image",
                "artifact.sha256",
                "artifact.mount",
                "image.url",
                "image.digest"
            ]
        );
    }
}
