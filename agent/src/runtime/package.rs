//! A service's `[artifact]` inside its instances: the store's unpacked tree bind-mounted
//! read-only (and nosuid, nodev) at `artifact.mount` in the instance's own mount namespace,
//! and paths of the spec taken relative to it. The host's mount table is never touched; a
//! mount point that does not exist is created (root-owned, 0755), as systemd does for its
//! bind mounts, since a mount needs a directory to cover.
//!
//! Imports from the crate: `spec` only.

use std::fs::DirBuilder;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::spec::ServiceSpec;
use crate::spec::artifact::Package;

/// What the init mounts for `[artifact]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMount {
    /// The unpacked tree in the store, on the host.
    pub source: PathBuf,
    /// Where it appears inside the instance.
    pub target: PathBuf,
}

/// The mount of `spec`'s `[artifact]` from the store's `tree`.
pub(super) fn artifact_mount(spec: &ServiceSpec, tree: Option<&Path>) -> Option<ArtifactMount> {
    match (&spec.package, tree) {
        (Some(Package::Artifact(a)), Some(tree)) => Some(ArtifactMount {
            source: tree.to_path_buf(),
            target: a.mount.clone(),
        }),
        _ => None,
    }
}

/// The command as the init runs it: a relative program (`bin/server`) is found under
/// `artifact.mount`.
pub(super) fn command(spec: &ServiceSpec) -> Vec<String> {
    let mut argv = spec.command.clone();
    if let (Some(Package::Artifact(a)), Some(program)) = (&spec.package, argv.first_mut())
        && program.contains('/')
        && !program.starts_with('/')
    {
        *program = a.mount.join(&*program).to_string_lossy().into_owned();
    }
    argv
}

/// Whether `path` (of the spec: command, workdir) lies inside the artifact, so that it
/// exists only inside the instance and the host cannot be asked about it.
pub(super) fn inside_artifact(spec: &ServiceSpec, path: &Path) -> bool {
    matches!(&spec.package, Some(Package::Artifact(a)) if path.starts_with(&a.mount))
}

/// The tree, opened before the instance's mounts change (a private `/tmp` may cover the
/// store's directory), to be mounted by [`mount_artifact`].
pub(super) fn open_artifact(m: &ArtifactMount) -> Result<OwnedFd, String> {
    nix::fcntl::open(
        m.source.as_path(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {}: {e}", m.source.display()))
}

/// Bind-mounts the tree opened by [`open_artifact`] read-only (nosuid, nodev) at its target,
/// in the calling process's mount namespace (which must be its own, with private
/// propagation).
pub(super) fn mount_artifact(tree: &OwnedFd, m: &ArtifactMount) -> Result<(), String> {
    let at = |what: &str, e: io::Error| format!("{what} {}: {e}", m.target.display());
    if !m.target.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&m.target)
            .map_err(|e| at("creating the mount point", e))?;
    }
    // The descriptor's magic link names the tree whatever now covers its path.
    let source = PathBuf::from(format!("/proc/self/fd/{}", tree.as_raw_fd()));
    mount(
        Some(&source),
        &m.target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        at(
            &format!("bind-mounting {} on", m.source.display()),
            e.into(),
        )
    })?;
    mount(
        None::<&str>,
        &m.target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| at("making read-only", e.into()))?;
    Ok(())
}
