//! What the supervisor asks of the store, as a trait: make a revision's package ready (fetched,
//! verified, unpacked; leased while held), record which kept revisions need which digest, and
//! collect what none does. [`ArtifactStore`] implements it; the supervisor's tests run without.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::sync::watch;

use super::{ArtifactError, ArtifactStore, ImageConfig, Ownership, Progress};
use crate::spec::artifact::{Digest, Package};

/// A revision's package, ready for its instances; kept in the store while held.
#[derive(Debug)]
pub struct Prepared {
    /// The archive's SHA-256 or the image's manifest digest.
    pub digest: Digest,
    /// The read-only tree to mount (`[artifact]`) or the image's root filesystem (`[image]`).
    pub path: PathBuf,
    /// The image's defaults; `None` for an archive.
    pub image: Option<ImageConfig>,
    /// Keeps it in the store while held (the store's [`Lease`](super::Lease)).
    pub lease: Box<dyn fmt::Debug + Send + Sync>,
}

/// A future the supervisor runs on its own task.
pub type PrepareFuture = Pin<Box<dyn Future<Output = Result<Prepared, ArtifactError>> + Send>>;

/// The store as the supervisor sees it.
pub trait Packages: Send + Sync + fmt::Debug {
    /// Fetches (unless cached), verifies and unpacks `package`, reporting progress.
    fn prepare(&self, package: &Package, progress: watch::Sender<Progress>) -> PrepareFuture;

    /// `owner` (a kept revision, `web@r3`) needs `digest`.
    fn pin(&self, digest: &Digest, owner: &str) -> Result<(), ArtifactError>;

    /// `owner` is no longer kept.
    fn unpin_owner(&self, owner: &str) -> Result<(), ArtifactError>;

    /// Removes, in the background, what no kept revision and no instance uses.
    fn collect(&self);
}

impl Packages for ArtifactStore {
    fn prepare(&self, package: &Package, progress: watch::Sender<Progress>) -> PrepareFuture {
        let store = self.clone();
        let package = package.clone();
        Box::pin(async move {
            match &package {
                Package::Artifact(spec) => {
                    let tree = store
                        .ensure_artifact(spec, Ownership::Root, Some(progress))
                        .await?;
                    Ok(Prepared {
                        digest: tree.digest,
                        path: tree.path,
                        image: None,
                        lease: Box::new(tree.lease),
                    })
                }
                Package::Image(spec) => {
                    let image = store.ensure_image(spec, Some(progress)).await?;
                    Ok(Prepared {
                        digest: image.digest,
                        path: image.rootfs,
                        image: Some(image.config),
                        lease: Box::new(image.lease),
                    })
                }
            }
        })
    }

    fn pin(&self, digest: &Digest, owner: &str) -> Result<(), ArtifactError> {
        ArtifactStore::pin(self, digest, owner)
    }

    fn unpin_owner(&self, owner: &str) -> Result<(), ArtifactError> {
        ArtifactStore::unpin_owner(self, owner)
    }

    fn collect(&self) {
        let store = self.clone();
        tokio::spawn(async move {
            match store.gc().await {
                Ok(report) if !report.unreferenced.is_empty() || !report.evicted.is_empty() => {
                    tracing::info!(
                        removed = report.unreferenced.len(),
                        evicted = report.evicted.len(),
                        freed = report.freed,
                        "artifact store collected"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "artifact store collection failed"),
            }
        });
    }
}
