//! The driver's package logic with a scripted store: what is fetched, when it is fetched
//! again, what instances start from, and that a failure touches nothing that runs.

use super::*;

const V1: &str = "/srv/web-1.tar";
const V2: &str = "/srv/web-2.tar";

/// [`WEB`] with its files from `url`.
fn packaged(url: &str) -> String {
    format!("{WEB}[artifact]\nurl = \"{url}\"\nformat = \"tar\"\nmount = \"/app\"\n")
}

impl Rig {
    /// How many fetches of `url` were started.
    fn fetches(&self, url: &str) -> usize {
        self.packages
            .prepares()
            .iter()
            .filter(|u| *u == url)
            .count()
    }

    /// The package trees the spawns so far were given, in order.
    fn spawned_from(&self) -> Vec<Option<std::path::PathBuf>> {
        self.rt.spawns().into_iter().map(|s| s.artifact).collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_service_starts_from_its_package_and_pins_it() {
    let r = rig().await;
    r.apply(&packaged(V1)).await.expect("apply");
    settle().await;
    assert_eq!(r.fetches(V1), 1);
    assert_eq!(
        r.spawned_from(),
        vec![Some(FakePackages::path_of(V1)); 3],
        "every instance mounts the package"
    );
    assert_eq!(
        r.packages.pins(),
        vec![(FakePackages::digest_of(V1), "web@r1".to_owned())]
    );
    let s = r.status("web").await;
    let p = s.package.expect("package status");
    assert_eq!((p.revision, p.phase), (1, PackagePhase::Ready));
}

#[tokio::test(start_paused = true)]
async fn a_new_service_whose_package_fails_is_fetched_again_with_a_growing_backoff() {
    let r = rig().await;
    r.packages.fail_next(V1, 2, "HTTP 503 Service Unavailable");
    r.apply(&packaged(V1)).await.expect("apply");
    settle().await;
    assert_eq!(r.fetches(V1), 1);
    assert!(r.rt.spawns().is_empty(), "nothing starts without its files");
    let s = r.status("web").await;
    let p = s.package.expect("package status");
    assert_eq!(p.phase, PackagePhase::Failed);
    assert!(
        p.error.as_deref().is_some_and(|e| e.contains("HTTP 503")),
        "{p:?}"
    );

    // The first retry after 1 s, failing again; the next one 2 s later.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(r.fetches(V1), 1, "not before the backoff");
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(r.fetches(V1), 2);
    assert!(r.rt.spawns().is_empty());
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(r.fetches(V1), 2, "the wait doubled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    settle().await;
    assert_eq!(r.fetches(V1), 3);
    assert_eq!(r.spawned_from(), vec![Some(FakePackages::path_of(V1)); 3]);
    assert_eq!(r.running("web").await.len(), 3);
    // Ready: no more fetches.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(r.fetches(V1), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_update_package_fails_its_rollout_touches_nothing_and_is_not_fetched_again() {
    let r = rig().await;
    r.apply(&packaged(V1)).await.expect("apply");
    settle().await;
    let before = r.running("web").await;
    assert_eq!(before.len(), 3);
    r.packages.fail_next(V2, 1, "sha256 mismatch");
    let a = r.apply(&packaged(V2)).await.expect("update");
    settle().await;
    let ro = r.rollout(a.rollout_id.as_deref().expect("rollout")).await;
    assert_eq!(ro.state.as_str(), "failed");
    assert!(ro.reason.contains("sha256 mismatch"), "{}", ro.reason);
    tokio::time::sleep(Duration::from_secs(300)).await;
    settle().await;
    assert_eq!(r.fetches(V2), 1, "a failed update waits for the next apply");
    assert_eq!(r.running("web").await, before, "the old revision serves on");
    assert_eq!(r.rt.spawns().len(), 3);
    assert!(r.rt.signals().is_empty(), "nothing was stopped");
}

#[tokio::test(start_paused = true)]
async fn an_adopted_instance_of_an_older_revision_restarts_from_its_own_package() {
    let first = rig().await;
    first.apply(&packaged(V1)).await.expect("apply");
    settle().await;
    // The update waits on its download while the agent goes away.
    first.packages.hold(V2);
    first.apply(&packaged(V2)).await.expect("update");
    settle().await;
    assert_eq!(first.fetches(V2), 1);
    let before = place_in_cgroups(&first, "web").await;
    let fakes = first.fakes();
    drop(first);
    settle().await;

    let second = fakes.start().await;
    settle().await;
    assert_eq!(second.running("web").await, before, "adopted");
    assert_eq!(second.fetches(V1), 2, "the adopted revision's package");
    assert_eq!(second.fetches(V2), 2, "the target's package");

    // A revision-1 instance crashes: it restarts from revision 1's files, while revision 2's
    // are still on their way.
    let (idx, pid) = before[0];
    second.exited(pid, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    settle().await;
    let last = second.rt.spawns().last().cloned().expect("restarted");
    assert_eq!(last.index, idx);
    assert_eq!(last.artifact, Some(FakePackages::path_of(V1)));
    let s = second.status("web").await;
    let i = s.instances.iter().find(|i| i.index == idx).expect("slot");
    assert_eq!((i.revision, i.state), (1, Phase::Running));

    // Revision 2's files arrive: the rollout goes on, new instances from them.
    second.packages.release(V2);
    settle().await;
    let latest = second.rt.spawns().last().cloned().expect("a new instance");
    assert_eq!(latest.artifact, Some(FakePackages::path_of(V2)));
}
