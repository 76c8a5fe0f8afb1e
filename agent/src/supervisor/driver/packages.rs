//! Each revision's `[artifact]` or `[image]`, made ready before its instances start. The
//! fetch is part of the rollout: while it runs the planner is not asked for steps, so the old
//! revision keeps serving untouched (crashed instances still restart); once the package is in
//! the store the rollout proceeds; a failure fails the rollout with the reason and replaces
//! nothing. Each kept revision pins its digest in the store (owner `<service>@r<revision>`), so
//! a rollback finds its package without the network; a revision no longer kept is unpinned and
//! the store collects what nothing uses. Progress is in the service's status and in `package`
//! events.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::slots::Service;
use super::{Driver, Internal};
use crate::artifact::{Packages, Phase, Prepared, Progress};
use crate::events::{EventKind, EventLog, PackagePhase};
use crate::spec::ServiceSpec;
use crate::spec::artifact::Package;
use crate::supervisor::PackageStatus;

/// Bytes between two progress events of one fetch (besides phase changes).
const PROGRESS_EVENT_STEP: u64 = 16 << 20;

/// A service's packages: ready ones by revision, the fetch under way, the last failure.
#[derive(Debug, Default)]
pub(super) struct PackageState {
    ready: BTreeMap<u64, Prepared>,
    fetching: Option<Fetching>,
    /// The revision whose package failed, and why: not fetched again until the service gets
    /// a new target (an apply, rollback or restart).
    failed: Option<(u64, u64, String)>,
}

#[derive(Debug)]
struct Fetching {
    revision: u64,
    epoch: u64,
    url: String,
    progress: watch::Receiver<Progress>,
    task: AbortHandle,
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PackageState {
    /// The host path of `revision`'s package, when ready.
    pub(super) fn path_of(&self, revision: u64) -> Option<&std::path::Path> {
        self.ready.get(&revision).map(|p| p.path.as_path())
    }
}

/// The owner a kept revision pins its package with.
pub(super) fn owner(service: &str, revision: u64) -> String {
    format!("{service}@r{revision}")
}

impl Driver {
    /// Whether the target of `name` can start instances: it has no package, or its package
    /// is ready. Otherwise starts (or keeps) its fetch.
    pub(super) fn package_ready(&mut self, name: &str) -> bool {
        let Some(svc) = self.services.get(name) else {
            return true;
        };
        if svc.deleting {
            return true;
        }
        let (revision, epoch, spec) = (svc.d.revision, svc.d.epoch, svc.d.spec.clone());
        let Some(package) = spec.package.clone() else {
            return true;
        };
        let state = &svc.packages;
        if state.ready.contains_key(&revision) {
            return true;
        }
        if state
            .fetching
            .as_ref()
            .is_some_and(|f| f.revision == revision)
        {
            return false;
        }
        if state
            .failed
            .as_ref()
            .is_some_and(|(r, e, _)| (*r, *e) == (revision, epoch))
        {
            return false;
        }
        let Some(packages) = self.deps.packages.clone() else {
            // Refused at admission; never reached with a composed agent.
            return false;
        };
        self.start_fetch(name, revision, epoch, &package, packages);
        false
    }

    fn start_fetch(
        &mut self,
        name: &str,
        revision: u64,
        epoch: u64,
        package: &Package,
        packages: Arc<dyn Packages>,
    ) {
        let url = package.source().to_url();
        let (tx, rx) = watch::channel(Progress {
            phase: Phase::Fetching,
            done: 0,
            total: None,
        });
        let internal = self.internal_tx.clone();
        let events = self.deps.events.clone();
        let service = name.to_owned();
        let fetch = packages.prepare(package, tx);
        let reporter = report_progress(events, service.clone(), revision, url.clone(), rx.clone());
        let task = tokio::spawn(async move {
            let reporter = tokio::spawn(reporter);
            let result = fetch.await.map_err(|e| e.to_string());
            // The fetch dropped its sender: the reporter writes what it saw and ends, so
            // its events come before the outcome's.
            let _ = reporter.await;
            let _ = internal.send(Internal::Package {
                service,
                revision,
                result,
            });
        });
        tracing::info!(service = %name, revision, url = %url, "fetching the package");
        self.emit(
            name,
            None,
            EventKind::Package {
                revision,
                phase: PackagePhase::Fetching,
                url: url.clone(),
                done: 0,
                total: None,
                detail: None,
            },
        );
        if let Some(svc) = self.services.get_mut(name) {
            svc.packages.fetching = Some(Fetching {
                revision,
                epoch,
                url,
                progress: rx,
                task: task.abort_handle(),
            });
        }
    }

    /// A fetch ended.
    pub(super) fn on_package(
        &mut self,
        name: &str,
        revision: u64,
        result: Result<Prepared, String>,
    ) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(fetching) = svc.packages.fetching.take_if(|f| f.revision == revision) else {
            return;
        };
        let url = fetching.url.clone();
        let epoch = fetching.epoch;
        let done = fetching.progress.borrow().done;
        match result {
            Ok(prepared) => {
                if let Some(packages) = &self.deps.packages
                    && let Err(e) = packages.pin(&prepared.digest, &owner(name, revision))
                {
                    tracing::warn!(service = %name, revision, error = %e, "cannot record the package's owner");
                }
                tracing::info!(service = %name, revision, digest = %prepared.digest, "package ready");
                svc.packages.ready.insert(revision, prepared);
                svc.packages.failed = None;
                self.emit(
                    name,
                    None,
                    EventKind::Package {
                        revision,
                        phase: PackagePhase::Ready,
                        url,
                        done,
                        total: None,
                        detail: None,
                    },
                );
            }
            Err(reason) => {
                tracing::warn!(service = %name, revision, %reason, "package failed");
                svc.packages.failed = Some((revision, epoch, reason.clone()));
                self.emit(
                    name,
                    None,
                    EventKind::Package {
                        revision,
                        phase: PackagePhase::Failed,
                        url,
                        done,
                        total: None,
                        detail: Some(reason.clone()),
                    },
                );
                let running = self
                    .services
                    .get(name)
                    .and_then(|s| s.d.running())
                    .is_some_and(|r| r.to_revision == revision);
                if running {
                    self.fail_running(
                        name,
                        None,
                        format!("package of revision {revision}: {reason}"),
                    );
                }
            }
        }
    }

    /// Drops what no revision of `name` needs any more: ready packages of revisions neither
    /// kept nor run by an instance (their leases go), and pins of revisions not kept; the
    /// store then collects.
    pub(super) fn release_packages(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let kept = svc.d.revisions();
        let running: Vec<u64> = svc.slots.values().map(|s| s.instance.revision).collect();
        let before = svc.packages.ready.len();
        svc.packages
            .ready
            .retain(|rev, _| kept.contains(rev) || running.contains(rev));
        if svc.packages.ready.len() == before {
            return;
        }
        self.unpin_except(name, &kept);
    }

    /// Unpins every revision of `name` not in `kept` (all of them for a deleted service).
    pub(super) fn unpin_except(&self, name: &str, kept: &[u64]) {
        let Some(packages) = &self.deps.packages else {
            return;
        };
        let (first, last) = (1, self.services.get(name).map_or(0, |s| s.d.last_revision));
        for rev in first..=last {
            if !kept.contains(&rev)
                && let Err(e) = packages.unpin_owner(&owner(name, rev))
            {
                tracing::warn!(service = %name, revision = rev, error = %e, "cannot drop the package's owner");
            }
        }
        packages.collect();
    }
}

/// The package state of a service's current revision, for status.
pub(super) fn package_status(svc: &Service) -> Option<PackageStatus> {
    let spec: &ServiceSpec = &svc.d.spec;
    let package = spec.package.as_ref()?;
    let revision = svc.d.revision;
    let url = package.source().to_url();
    let state = &svc.packages;
    let status = |phase, done, total, error| PackageStatus {
        revision,
        url: url.clone(),
        phase,
        done,
        total,
        error,
    };
    if let Some(f) = state.fetching.as_ref().filter(|f| f.revision == revision) {
        let p = *f.progress.borrow();
        let phase = match p.phase {
            Phase::Fetching => PackagePhase::Fetching,
            Phase::Unpacking => PackagePhase::Unpacking,
        };
        return Some(status(phase, p.done, p.total, None));
    }
    if let Some((_, _, why)) = state.failed.as_ref().filter(|(r, _, _)| *r == revision) {
        return Some(status(PackagePhase::Failed, 0, None, Some(why.clone())));
    }
    if state.ready.contains_key(&revision) {
        return Some(status(PackagePhase::Ready, 0, None, None));
    }
    Some(status(PackagePhase::Fetching, 0, None, None))
}

/// Writes a `package` event at each phase change and every [`PROGRESS_EVENT_STEP`] bytes.
async fn report_progress(
    events: Arc<EventLog>,
    service: String,
    revision: u64,
    url: String,
    mut rx: watch::Receiver<Progress>,
) {
    let mut last = *rx.borrow();
    while rx.changed().await.is_ok() {
        let p = *rx.borrow_and_update();
        if p.phase == last.phase && p.done < last.done.saturating_add(PROGRESS_EVENT_STEP) {
            continue;
        }
        last = p;
        let phase = match p.phase {
            Phase::Fetching => PackagePhase::Fetching,
            Phase::Unpacking => PackagePhase::Unpacking,
        };
        events.append(
            &service,
            None,
            EventKind::Package {
                revision,
                phase,
                url: url.clone(),
                done: p.done,
                total: p.total,
                detail: None,
            },
        );
    }
}
