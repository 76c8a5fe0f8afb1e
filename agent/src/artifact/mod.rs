//! The artifact and image store: fetching packages (`https://`, loopback `http://`,
//! `file://`, plain paths), verifying them by SHA-256, unpacking archives and OCI images
//! safely, and keeping what was unpacked, content-addressed and shared, for as long as
//! something references it.
//!
//! It owns `<state-dir>/artifacts/` and nothing else:
//!
//! ```text
//! artifacts/
//!   lock                    flock: one store per directory
//!   refs.json               who references what, sizes, last use (temp, fsync, rename)
//!   sha256/<hex>            verified blobs (archives), read-only
//!   trees/<hex>/            an archive unpacked, root-owned, read-only
//!   trees/<hex>@<uid>.<gid>/  the same owned by a service user
//!   images/<hex>/rootfs/    an image's root filesystem, per manifest digest
//!   images/<hex>/image.json its config: entrypoint, cmd, env, workdir, user
//!   tmp/                    downloads in progress (<hex>.part, resumable) and unpacks
//! ```
//!
//! Everything is written under `tmp/` and renamed into place once complete and verified, so
//! a crash leaves nothing half-visible; [`ArtifactStore::open`] removes unpack leftovers and
//! keeps partial downloads to resume them with an HTTP `Range` request. Handles returned by
//! [`ArtifactStore::ensure_artifact`] and [`ArtifactStore::ensure_image`] hold a lease: what
//! is leased is never removed. [`ArtifactStore::pin`] records an owner (a revision kept for
//! rollback); [`ArtifactStore::gc`] removes what has neither, then evicts least recently
//! used entries without a lease while the store is over `max_cache`.
//!
//! Imports from the crate: `spec` only (for the package types). It knows nothing of
//! services, instances or the supervisor: they call it.

mod confined;
#[cfg(any(test, feature = "testkit"))]
pub mod fake;
mod fetch;
mod oci;
mod refs;
mod seam;
mod store;
mod unpack;

use std::io;
use std::path::PathBuf;

pub use fetch::FetchConfig;
pub use oci::{ImageConfig, ImageUser};
pub use refs::EntryKind;
pub use seam::{Packages, PrepareFuture, Prepared};
pub use store::{
    ArtifactStore, ArtifactTree, GcReport, ImageRootfs, Lease, ListEntry, StoreConfig,
};
pub use unpack::{Limits, Ownership, Report as UnpackReport, UnpackError};

use crate::spec::artifact::Digest;

/// Where a fetch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Downloading or copying the package.
    Fetching,
    /// Unpacking it.
    Unpacking,
}

/// Progress of one fetch, sent on the caller's watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// What is happening.
    pub phase: Phase,
    /// Bytes fetched (or, unpacking, written) so far.
    pub done: u64,
    /// The whole, when known.
    pub total: Option<u64>,
}

/// Why a package could not be fetched, verified, unpacked or stored.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Network, HTTP or source-file trouble (after the retries).
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The URL or path.
        url: String,
        /// What happened: `HTTP 404 Not Found`, `no data for 30s`, ...
        reason: String,
    },
    /// The content is not what the spec says.
    #[error("{url}: sha256 mismatch: expected {expected}, got {actual} ({size} bytes)")]
    DigestMismatch {
        /// The URL or path.
        url: String,
        /// From the spec.
        expected: Digest,
        /// Of what was received.
        actual: Digest,
        /// Bytes received.
        size: u64,
    },
    /// The archive was refused or could not be written.
    #[error("unpacking {archive}: {error}")]
    Unpack {
        /// The URL or path.
        archive: String,
        /// The entry and the reason.
        error: UnpackError,
    },
    /// The image is malformed, incomplete or unsupported.
    #[error("image {url}: {reason}")]
    Image {
        /// The URL or path.
        url: String,
        /// What is wrong, naming the blob, media type or user.
        reason: String,
    },
    /// The store's own files.
    #[error("artifact store {path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process has the store open.
    #[error("artifact store {path} is in use by another process")]
    Locked {
        /// The store's directory.
        path: PathBuf,
    },
    /// The HTTP client could not be set up.
    #[error("artifact fetcher: {0}")]
    Client(String),
}

impl ArtifactError {
    fn io(path: impl Into<PathBuf>, what: &'static str) -> impl FnOnce(io::Error) -> ArtifactError {
        let path = path.into();
        move |source| ArtifactError::Io { path, what, source }
    }
}
