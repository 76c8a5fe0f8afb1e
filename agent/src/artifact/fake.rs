//! A scripted [`Packages`] for the supervisor's tests: each URL's fetches fail or succeed as
//! the test says, may be held until released, and every call is recorded.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use tokio::sync::watch;

use super::{ArtifactError, ImageConfig, Packages, Phase, PrepareFuture, Prepared, Progress};
use crate::spec::artifact::{Digest, Package};

#[derive(Debug, Default)]
struct State {
    /// Per URL, the outcomes of its next fetches (`Err(reason)`); success once empty.
    script: BTreeMap<String, VecDeque<Result<(), String>>>,
    /// URLs whose fetches wait until released.
    held: BTreeMap<String, watch::Sender<bool>>,
    prepares: Vec<String>,
    pins: Vec<(Digest, String)>,
    unpins: Vec<String>,
    collects: u32,
}

/// Packages that exist only in the test: a URL's digest is the SHA-256 of the URL, its path
/// `/fake-store/<hex>`, its image config (for `[image]`) the one given.
#[derive(Debug, Default)]
pub struct FakePackages {
    state: Mutex<State>,
    image: Mutex<Option<ImageConfig>>,
}

impl FakePackages {
    pub fn new() -> FakePackages {
        FakePackages::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `n` fetches of `url` fail with `reason`.
    pub fn fail_next(&self, url: &str, n: usize, reason: &str) {
        let mut st = self.lock();
        let q = st.script.entry(url.to_owned()).or_default();
        q.extend(std::iter::repeat_n(Err(reason.to_owned()), n));
    }

    /// Fetches of `url` wait until [`FakePackages::release`].
    pub fn hold(&self, url: &str) {
        self.lock()
            .held
            .insert(url.to_owned(), watch::Sender::new(false));
    }

    /// Lets the held fetches of `url` go on.
    pub fn release(&self, url: &str) {
        if let Some(gate) = self.lock().held.remove(url) {
            gate.send_replace(true);
        }
    }

    /// The image config `[image]` packages come with.
    pub fn set_image(&self, config: ImageConfig) {
        *self.image.lock().unwrap_or_else(|p| p.into_inner()) = Some(config);
    }

    /// The URL of every fetch started, in order.
    pub fn prepares(&self) -> Vec<String> {
        self.lock().prepares.clone()
    }

    /// Every (digest, owner) pinned, in order.
    pub fn pins(&self) -> Vec<(Digest, String)> {
        self.lock().pins.clone()
    }

    /// Every owner unpinned, in order.
    pub fn unpins(&self) -> Vec<String> {
        self.lock().unpins.clone()
    }

    /// The digest and path a URL's package gets.
    pub fn digest_of(url: &str) -> Digest {
        use sha2::Digest as _;
        Digest::from_bytes(sha2::Sha256::digest(url.as_bytes()).into())
    }

    /// Where a URL's package is "unpacked".
    pub fn path_of(url: &str) -> PathBuf {
        PathBuf::from(format!(
            "/fake-store/{}",
            FakePackages::digest_of(url).hex()
        ))
    }
}

impl Packages for FakePackages {
    fn prepare(&self, package: &Package, progress: watch::Sender<Progress>) -> PrepareFuture {
        let url = package.source().to_url();
        let (outcome, held) = {
            let mut st = self.lock();
            st.prepares.push(url.clone());
            let outcome = st
                .script
                .get_mut(&url)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Ok(()));
            (outcome, st.held.get(&url).map(watch::Sender::subscribe))
        };
        let image = match package {
            Package::Image(_) => self.image.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            Package::Artifact(_) => None,
        };
        Box::pin(async move {
            let _ = progress.send(Progress {
                phase: Phase::Fetching,
                done: 1,
                total: Some(2),
            });
            if let Some(mut gate) = held {
                // Released, or the test (and its sender) gone: either way, go on.
                let _ = gate.wait_for(|open| *open).await;
            }
            match outcome {
                Ok(()) => Ok(Prepared {
                    digest: FakePackages::digest_of(&url),
                    path: FakePackages::path_of(&url),
                    image,
                    lease: Box::new(()),
                }),
                Err(reason) => Err(ArtifactError::Fetch { url, reason }),
            }
        })
    }

    fn pin(&self, digest: &Digest, owner: &str) -> Result<(), ArtifactError> {
        self.lock().pins.push((*digest, owner.to_owned()));
        Ok(())
    }

    fn unpin_owner(&self, owner: &str) -> Result<(), ArtifactError> {
        self.lock().unpins.push(owner.to_owned());
        Ok(())
    }

    fn collect(&self) {
        self.lock().collects += 1;
    }
}
