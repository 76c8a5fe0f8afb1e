//! Each revision's `[artifact]` or `[image]`, made ready before its instances start. The
//! fetch is part of the rollout: while it runs the planner is not asked for steps, so the old
//! revision keeps serving untouched (crashed instances still restart); once the package is in
//! the store the rollout proceeds; a failure fails the rollout with the reason and replaces
//! nothing. Each kept revision pins its digest in the store (owner `<service>@r<revision>`), so
//! a rollback finds its package without the network; a revision no longer kept is unpinned and
//! the store collects what nothing uses. Progress is in the service's status and in `package`
//! events.
//!
//! Every revision an instance runs has its package prepared too, so an instance adopted after
//! an agent restart (of a revision older than the target) restarts from its own files. A
//! failed package is fetched again with a backoff ([`RETRY_FIRST`] doubling to
//! [`RETRY_MAX`]) while nothing else can serve: for a new service, or for the revision of an
//! instance; a failed update is not retried (its rollout failed, the old revision serves) until
//! the next apply, rollback or restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::slots::Service;
use super::{Driver, Internal};
use crate::artifact::{Packages, Phase, Prepared, Progress};
use crate::events::{EventKind, EventLog, PackagePhase};
use crate::spec::ServiceSpec;
use crate::spec::artifact::Package;
use crate::supervisor::PackageStatus;

/// Bytes between two progress events of one fetch (besides phase changes).
const PROGRESS_EVENT_STEP: u64 = 16 << 20;

/// First wait before a failed package is fetched again; doubled after each failure.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two fetches of a package that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A service's packages: ready ones by revision, fetches under way, failures.
#[derive(Debug, Default)]
pub(super) struct PackageState {
    ready: BTreeMap<u64, Prepared>,
    fetching: BTreeMap<u64, Fetching>,
    failed: BTreeMap<u64, Failure>,
}

/// A revision whose package could not be made ready.
#[derive(Debug)]
struct Failure {
    /// The target's epoch when it failed: a restart (new epoch) fetches again at once.
    epoch: u64,
    reason: String,
    /// Failures in a row.
    attempts: u32,
    /// When it is fetched again; `None`: not until the service gets a new target (an
    /// update whose rollout failed: the old revision serves, the next apply, rollback or
    /// restart tries again).
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct Fetching {
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
    /// `revision`'s package, when ready.
    pub(super) fn prepared(&self, revision: u64) -> Option<&Prepared> {
        self.ready.get(&revision)
    }

    /// When a failed package is next fetched again.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.failed.values().filter_map(|f| f.retry_at).min()
    }
}

/// The wait before the next fetch after `attempts` failures in a row.
fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// The owner a kept revision pins its package with.
pub(super) fn owner(service: &str, revision: u64) -> String {
    format!("{service}@r{revision}")
}

/// What a service needs ready: its target, and every revision one of its instances runs
/// (an adopted instance of an older revision restarts from its own package).
fn needed(svc: &Service) -> Vec<(u64, Package)> {
    let mut out: BTreeMap<u64, Package> = BTreeMap::new();
    if let Some(p) = &svc.d.spec.package {
        out.insert(svc.d.revision, p.clone());
    }
    for inst in svc.instances() {
        if let Some(p) = &inst.spec.package {
            out.entry(inst.revision).or_insert_with(|| p.clone());
        }
    }
    out.into_iter().collect()
}

impl Driver {
    /// Whether the target of `name` can start instances: it has no package, or its package
    /// is ready. Starts (or keeps) the fetches of every package the service needs: its
    /// target's and those of the revisions its instances run.
    pub(super) fn package_ready(&mut self, name: &str) -> bool {
        let Some(svc) = self.services.get(name) else {
            return true;
        };
        if svc.deleting {
            return true;
        }
        let (target, epoch) = (svc.d.revision, svc.d.epoch);
        let now = Instant::now();
        let state = &svc.packages;
        let to_fetch: Vec<(u64, Package)> = needed(svc)
            .into_iter()
            .filter(|(rev, _)| !state.ready.contains_key(rev) && !state.fetching.contains_key(rev))
            .filter(|(rev, _)| match state.failed.get(rev) {
                None => true,
                Some(f) if *rev == target && f.epoch != epoch => true,
                Some(f) => f.retry_at.is_some_and(|t| t <= now),
            })
            .collect();
        let target_ready = svc.d.spec.package.is_none() || state.ready.contains_key(&target);
        if to_fetch.is_empty() {
            return target_ready;
        }
        let Some(packages) = self.deps.packages.clone() else {
            // Refused at admission; never reached with a composed agent.
            return target_ready;
        };
        for (revision, package) in to_fetch {
            self.start_fetch(name, revision, epoch, &package, packages.clone());
        }
        target_ready
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
            // Its failures in a row are kept to lengthen the next wait, should this one fail.
            if let Some(f) = svc.packages.failed.get_mut(&revision) {
                f.retry_at = None;
            }
            svc.packages.fetching.insert(
                revision,
                Fetching {
                    epoch,
                    url,
                    progress: rx,
                    task: task.abort_handle(),
                },
            );
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
        let Some(fetching) = svc.packages.fetching.remove(&revision) else {
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
                svc.packages.failed.remove(&revision);
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
                // Fetched again later when nothing else can serve: an instance of this
                // revision, or a target no instance of another revision stands in for (a
                // new service). A failed update leaves the old revision serving.
                let is_target = revision == svc.d.revision;
                let retry = !is_target || svc.instances().all(|i| i.revision == revision);
                let attempts = svc.packages.failed.get(&revision).map_or(0, |f| f.attempts) + 1;
                let retry_at = retry.then(|| Instant::now() + retry_delay(attempts));
                tracing::warn!(service = %name, revision, %reason, attempts, retry_in = ?retry_at.map(|_| retry_delay(attempts)), "package failed");
                svc.packages.failed.insert(
                    revision,
                    Failure {
                        epoch,
                        reason: reason.clone(),
                        attempts,
                        retry_at,
                    },
                );
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
    /// kept nor run by an instance (their leases go), failures and fetches of revisions no
    /// longer needed, and pins of revisions not kept; the store then collects.
    pub(super) fn release_packages(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let kept = svc.d.revisions();
        let needed: Vec<u64> = needed(svc).into_iter().map(|(r, _)| r).collect();
        let state = &mut svc.packages;
        state.failed.retain(|rev, _| needed.contains(rev));
        state.fetching.retain(|rev, _| needed.contains(rev));
        let before = state.ready.len();
        state
            .ready
            .retain(|rev, _| kept.contains(rev) || needed.contains(rev));
        if state.ready.len() == before {
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
    if let Some(f) = state.fetching.get(&revision) {
        let p = *f.progress.borrow();
        let phase = match p.phase {
            Phase::Fetching => PackagePhase::Fetching,
            Phase::Unpacking => PackagePhase::Unpacking,
        };
        return Some(status(phase, p.done, p.total, None));
    }
    if let Some(f) = state.failed.get(&revision) {
        return Some(status(
            PackagePhase::Failed,
            0,
            None,
            Some(f.reason.clone()),
        ));
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
