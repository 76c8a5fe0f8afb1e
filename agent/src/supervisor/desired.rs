//! A service's desired state: the spec, revision and epoch its instances should run (the
//! target), the revisions kept for rollback, and its rollouts (the running one and the last
//! ten). Persisted whole as the service's record; changed only through the methods here, which
//! keep the bookkeeping (revision and epoch counters, history bounds, superseding) in one place.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::rollout::record::{Kind, PolicyRecord, Rollout, State, Step};
use crate::spec::{RawSpec, ServiceSpec};
use crate::supervisor::Owner;

/// What an apply did to a service's desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyKind {
    /// A new service, at revision 1.
    Created,
    /// A new revision, whose instances replace the old ones.
    Updated,
    /// Only `replicas` changed.
    Scaled,
    /// The spec is the current one: nothing was done.
    Unchanged,
    /// Only labels or annotations changed: in place, no new revision.
    Labeled,
}

impl ApplyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyKind::Created => "created",
            ApplyKind::Updated => "updated",
            ApplyKind::Scaled => "scaled",
            ApplyKind::Unchanged => "unchanged",
            ApplyKind::Labeled => "labeled",
        }
    }
}

/// Revisions kept for rollback.
pub const KEPT_REVISIONS: usize = 10;
/// Finished rollouts kept per service.
pub const KEPT_ROLLOUTS: usize = 10;

#[derive(Debug, Clone)]
pub struct Desired {
    pub spec: Arc<ServiceSpec>,
    /// The source the service came from; only it may change the service unforced.
    pub owner: Owner,
    pub revision: u64,
    /// A restart gives the same revision a new epoch: instances of another epoch are replaced.
    pub epoch: u64,
    /// The highest revision, epoch and rollout number handed out so far.
    pub last_revision: u64,
    pub last_epoch: u64,
    pub last_rollout: u64,
    /// Kept revisions, oldest first.
    pub history: Vec<(u64, Arc<ServiceSpec>)>,
    /// The running rollout, or the last one.
    pub rollout: Option<Rollout>,
    /// Earlier finished rollouts, oldest first.
    pub past: Vec<Rollout>,
    /// A rollout failed without a rollback: nothing more is replaced until the next one.
    pub paused: bool,
    /// 1 at creation, incremented by every accepted change of the desired state (apply,
    /// scale, restart, rollback, an automatic rollback): what `expected_revision` is
    /// compared with, so concurrent writers never overwrite each other unknowingly.
    pub generation: u64,
    /// The `replicas` the last apply asked for (the spec's count, before the autoscaler or a
    /// `Scale` changed it): an apply of a `[scale]` service asking for the same count again
    /// keeps the current one. `None` in records written before it was kept.
    pub applied_replicas: Option<u32>,
}

/// The target of a rollout.
#[derive(Debug, Clone)]
pub struct Target {
    pub revision: u64,
    pub epoch: u64,
    pub spec: Arc<ServiceSpec>,
}

/// The service record as stored. Records written before rollouts existed hold only
/// `revision` and `spec`; every other field has a default.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub revision: u64,
    pub spec: RawSpec,
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub last_revision: u64,
    #[serde(default)]
    pub last_epoch: u64,
    #[serde(default)]
    pub last_rollout: u64,
    #[serde(default)]
    pub history: Vec<RevisionRecord>,
    #[serde(default)]
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub past: Vec<Rollout>,
    #[serde(default)]
    pub paused: bool,
    /// Absent in records written before the fleet existed: those services are local.
    #[serde(default)]
    pub owner: Owner,
    /// Absent in records written before generations existed: read as 1.
    #[serde(default)]
    pub generation: u64,
    /// Absent in records written before it was kept.
    #[serde(default)]
    pub applied_replicas: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevisionRecord {
    pub revision: u64,
    pub spec: RawSpec,
}

impl Desired {
    /// A new service at revision 1, owned by `owner`.
    pub fn new(spec: Arc<ServiceSpec>, owner: Owner) -> Desired {
        Desired {
            applied_replicas: Some(spec.replicas),
            history: vec![(1, spec.clone())],
            spec,
            owner,
            revision: 1,
            epoch: 1,
            last_revision: 1,
            last_epoch: 1,
            last_rollout: 0,
            rollout: None,
            past: Vec::new(),
            paused: false,
            generation: 1,
        }
    }

    /// From the stored record (its specs validated again; a kept revision that no longer
    /// validates is dropped from the history).
    pub fn from_record(r: Record) -> Result<Desired, String> {
        let spec = Arc::new(r.spec.validate().map_err(|e| e.to_string())?);
        let mut history: Vec<(u64, Arc<ServiceSpec>)> = r
            .history
            .into_iter()
            .filter_map(|h| Some((h.revision, Arc::new(h.spec.validate().ok()?))))
            .collect();
        if !history.iter().any(|(rev, _)| *rev == r.revision) {
            history.push((r.revision, spec.clone()));
            history.sort_by_key(|(rev, _)| *rev);
        }
        Ok(Desired {
            last_revision: r.last_revision.max(r.revision),
            last_epoch: r.last_epoch.max(r.epoch),
            last_rollout: r.last_rollout,
            spec,
            owner: r.owner,
            revision: r.revision,
            epoch: r.epoch,
            history,
            rollout: r.rollout,
            past: r.past,
            paused: r.paused,
            generation: r.generation.max(1),
            applied_replicas: r.applied_replicas,
        })
    }

    pub fn to_record(&self) -> Record {
        Record {
            revision: self.revision,
            spec: self.spec.to_raw(),
            epoch: self.epoch,
            last_revision: self.last_revision,
            last_epoch: self.last_epoch,
            last_rollout: self.last_rollout,
            history: self
                .history
                .iter()
                .map(|(revision, spec)| RevisionRecord {
                    revision: *revision,
                    spec: spec.to_raw(),
                })
                .collect(),
            rollout: self.rollout.clone(),
            past: self.past.clone(),
            paused: self.paused,
            owner: self.owner,
            generation: self.generation,
            applied_replicas: self.applied_replicas,
        }
    }

    /// The running rollout.
    pub fn running(&self) -> Option<&Rollout> {
        self.rollout.as_ref().filter(|r| r.is_running())
    }

    pub fn running_mut(&mut self) -> Option<&mut Rollout> {
        self.rollout.as_mut().filter(|r| r.is_running())
    }

    /// The spec of a kept revision, with the current `replicas`, labels and annotations (a
    /// rollback changes what runs, not how many nor how the service is labeled).
    pub fn spec_of(&self, revision: u64) -> Option<Arc<ServiceSpec>> {
        let (_, spec) = self.history.iter().find(|(r, _)| *r == revision)?;
        if spec.replicas == self.spec.replicas
            && spec.labels == self.spec.labels
            && spec.annotations == self.spec.annotations
        {
            return Some(spec.clone());
        }
        let mut s = spec.with_metadata_of(&self.spec);
        s.replicas = self.spec.replicas;
        Some(Arc::new(s))
    }

    /// The revisions kept, oldest first.
    pub fn revisions(&self) -> Vec<u64> {
        self.history.iter().map(|(r, _)| *r).collect()
    }

    /// What `Rollback` without a revision goes to: the highest kept revision below the
    /// current one.
    pub fn previous_revision(&self) -> Option<u64> {
        self.revisions()
            .into_iter()
            .filter(|r| *r < self.revision)
            .max()
    }

    /// A target for a new revision of `spec` (an update), kept in the history.
    pub fn new_revision(&mut self, spec: Arc<ServiceSpec>) -> Target {
        self.last_revision += 1;
        let revision = self.last_revision;
        self.history.push((revision, spec.clone()));
        if self.history.len() > KEPT_REVISIONS {
            // The oldest goes, unless it is the current one (then the next oldest).
            let drop = self
                .history
                .iter()
                .position(|(r, _)| *r != self.revision)
                .unwrap_or(0);
            self.history.remove(drop);
        }
        Target {
            revision,
            epoch: self.new_epoch(),
            spec,
        }
    }

    pub fn new_epoch(&mut self) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    /// Make `target` what instances should run, under a new rollout of `kind` that replaces
    /// `to_replace` instances. A running rollout is superseded. Returns the new rollout's id
    /// and the superseded one's, if any.
    pub fn begin(
        &mut self,
        service: &str,
        kind: Kind,
        target: Target,
        to_replace: u32,
        now: SystemTime,
    ) -> (String, Option<String>) {
        self.last_rollout += 1;
        let id = format!("{service}-r{}", self.last_rollout);
        let superseded =
            self.finish_running(State::Superseded, &format!("superseded by {id}"), now);
        let mut r = Rollout {
            id: id.clone(),
            service: service.to_string(),
            kind,
            state: State::Running,
            from_revision: self.revision,
            from_epoch: self.epoch,
            to_revision: target.revision,
            to_epoch: target.epoch,
            replicas: target.spec.replicas,
            to_replace,
            replaced: 0,
            progress: Default::default(),
            policy: PolicyRecord::of(&target.spec.rollout),
            started_at: now,
            finished_at: None,
            reason: String::new(),
            rollback_id: String::new(),
            rollback_of: String::new(),
            steps: Vec::new(),
            started_ids: Default::default(),
            ready_ids: Default::default(),
            stopping_ids: Default::default(),
        };
        r.step(
            now,
            Step::Planned,
            "",
            format!(
                "{} revision {} -> {}: {} to replace, max_surge {}, max_unavailable {}",
                kind.as_str(),
                self.revision,
                target.revision,
                to_replace,
                r.policy.max_surge,
                r.policy.max_unavailable
            ),
        );
        self.retire_current();
        self.rollout = Some(r);
        self.spec = target.spec;
        self.revision = target.revision;
        self.epoch = target.epoch;
        self.paused = false;
        (id, superseded)
    }

    /// Make `target` what instances should run without a rollout (there is nothing to
    /// replace). A running rollout is superseded; its id is returned.
    pub fn retarget(&mut self, target: Target, now: SystemTime) -> Option<String> {
        let reason = format!("superseded by revision {}", target.revision);
        let superseded = self.finish_running(State::Superseded, &reason, now);
        self.spec = target.spec;
        self.revision = target.revision;
        self.epoch = target.epoch;
        self.paused = false;
        superseded
    }

    /// End the running rollout as `state`; its id.
    pub fn finish_running(
        &mut self,
        state: State,
        reason: &str,
        now: SystemTime,
    ) -> Option<String> {
        let r = self.running_mut()?;
        r.finish(state, reason, now);
        Some(r.id.clone())
    }

    /// Move a finished current rollout to the past ones.
    fn retire_current(&mut self) {
        if let Some(r) = self.rollout.take() {
            self.past.push(r);
            if self.past.len() > KEPT_ROLLOUTS {
                self.past.remove(0);
            }
        }
    }

    /// The running rollout failed (`reason`). With `auto_rollback` (and not itself a
    /// rollback started that way) the revision and epoch it came from become the target again
    /// under an `auto_rollback` rollout, so old instances it never touched are kept: its
    /// target, to be started, is returned. Otherwise the service is paused.
    pub fn fail(
        &mut self,
        service: &str,
        reason: &str,
        to_replace: impl Fn(&Target) -> u32,
        now: SystemTime,
    ) -> Option<(String, Target)> {
        let r = self.running_mut()?;
        r.finish(State::Failed, reason, now);
        let (failed, from_revision, from_epoch) = (r.id.clone(), r.from_revision, r.from_epoch);
        let roll_back = r.policy.auto_rollback && r.kind != Kind::AutoRollback;
        let spec = self.spec_of(from_revision);
        match (roll_back, spec) {
            (true, Some(spec)) => {
                let target = Target {
                    revision: from_revision,
                    epoch: from_epoch,
                    spec,
                };
                let n = to_replace(&target);
                let (id, _) = self.begin(service, Kind::AutoRollback, target.clone(), n, now);
                self.generation += 1;
                if let Some(new) = self.rollout.as_mut() {
                    new.rollback_of = failed.clone();
                }
                if let Some(old) = self.past.iter_mut().rev().find(|p| p.id == failed) {
                    old.rollback_id = id.clone();
                }
                Some((id, target))
            }
            (true, None) => {
                if let Some(r) = self.rollout.as_mut() {
                    r.reason = format!(
                        "{reason}; revision {from_revision} is no longer kept, so it was not rolled back"
                    );
                }
                self.paused = true;
                None
            }
            (false, _) => {
                self.paused = true;
                None
            }
        }
    }

    /// A rollout by id: the current one or a kept earlier one.
    pub fn find(&self, id: &str) -> Option<&Rollout> {
        self.rollout
            .iter()
            .chain(self.past.iter())
            .find(|r| r.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: &str, replicas: u32) -> Arc<ServiceSpec> {
        Arc::new(
            crate::spec::parse_toml(&format!(
                "name = \"web\"\ncommand = [\"/bin/echo\", \"{version}\"]\nreplicas = {replicas}\n"
            ))
            .expect("valid"),
        )
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    #[test]
    fn update_then_auto_rollback_restores_the_old_target() {
        let mut d = Desired::new(spec("v1", 4), Owner::Local);
        let t = d.new_revision(spec("v2", 4));
        assert_eq!((t.revision, t.epoch), (2, 2));
        let (id, superseded) = d.begin("web", Kind::Update, t, 4, now());
        assert_eq!((id.as_str(), superseded), ("web-r1", None));
        assert_eq!((d.revision, d.epoch), (2, 2));
        let (back, target) = d
            .fail("web", "new instance 4 ended", |_| 1, now())
            .expect("rolled back");
        assert_eq!(back, "web-r2");
        assert_eq!((target.revision, target.epoch), (1, 1));
        assert_eq!((d.revision, d.epoch), (1, 1));
        assert_eq!(d.spec.command, spec("v1", 4).command);
        let failed = d.find("web-r1").expect("kept");
        assert_eq!(failed.state, State::Failed);
        assert_eq!(failed.rollback_id, "web-r2");
        let rb = d.running().expect("rollback runs");
        assert_eq!(
            (rb.kind, rb.rollback_of.as_str()),
            (Kind::AutoRollback, "web-r1")
        );
        // A failing auto-rollback is not rolled back again: the service pauses.
        assert!(d.fail("web", "again", |_| 0, now()).is_none());
        assert!(d.paused);
        assert!(d.running().is_none());
    }

    #[test]
    fn without_auto_rollback_a_failure_pauses() {
        let mut d = Desired::new(spec("v1", 2), Owner::Local);
        let mut s = (*spec("v2", 2)).clone();
        s.rollout.auto_rollback = false;
        let t = d.new_revision(Arc::new(s));
        d.begin("web", Kind::Update, t, 2, now());
        assert!(d.fail("web", "deadline", |_| 0, now()).is_none());
        assert!(d.paused);
        assert_eq!(d.revision, 2);
        let t = Target {
            revision: 2,
            epoch: d.new_epoch(),
            spec: d.spec.clone(),
        };
        d.begin("web", Kind::Restart, t, 2, now());
        assert!(!d.paused, "a new rollout resumes");
    }

    #[test]
    fn forcing_supersedes_the_running_rollout() {
        let mut d = Desired::new(spec("v1", 2), Owner::Local);
        let t = d.new_revision(spec("v2", 2));
        d.begin("web", Kind::Update, t, 2, now());
        let t = d.new_revision(spec("v3", 2));
        let (id, superseded) = d.begin("web", Kind::Update, t, 2, now());
        assert_eq!(
            (id.as_str(), superseded.as_deref()),
            ("web-r2", Some("web-r1"))
        );
        let old = d.find("web-r1").expect("kept");
        assert_eq!(old.state, State::Superseded);
        assert_eq!(old.reason, "superseded by web-r2");
        assert_eq!(d.running().map(|r| r.from_revision), Some(2));
    }

    #[test]
    fn retargeting_supersedes_without_a_new_rollout() {
        let mut d = Desired::new(spec("v1", 0), Owner::Local);
        let t = d.new_revision(spec("v2", 0));
        assert_eq!(d.retarget(t, now()), None);
        assert_eq!((d.revision, d.epoch, d.last_rollout), (2, 2, 0));
        assert!(d.rollout.is_none());
        let t = d.new_revision(spec("v3", 0));
        d.begin("web", Kind::Update, t, 1, now());
        let t = d.new_revision(spec("v4", 0));
        assert_eq!(d.retarget(t, now()).as_deref(), Some("web-r1"));
        let r = d.find("web-r1").expect("kept");
        assert_eq!(
            (r.state, r.reason.as_str()),
            (State::Superseded, "superseded by revision 4")
        );
        assert_eq!(d.revision, 4);
    }

    #[test]
    fn history_keeps_ten_and_the_current_revision() {
        let mut d = Desired::new(spec("v1", 1), Owner::Local);
        for i in 2..=14 {
            let t = d.new_revision(spec(&format!("v{i}"), 1));
            d.begin("web", Kind::Update, t, 1, now());
            d.finish_running(State::Succeeded, "", now());
        }
        assert_eq!(d.revisions(), (5..=14).collect::<Vec<_>>());
        assert_eq!(d.previous_revision(), Some(13));
        assert_eq!(d.past.len(), KEPT_ROLLOUTS);
        assert!(d.spec_of(4).is_none());
        // Rolled back to 5, the current revision is not dropped by later updates.
        let t = Target {
            revision: 5,
            epoch: d.new_epoch(),
            spec: d.spec_of(5).expect("kept"),
        };
        d.begin("web", Kind::Rollback, t, 1, now());
        assert_eq!(d.previous_revision(), None);
        let t = d.new_revision(spec("v15", 1));
        assert!(d.revisions().contains(&5) && d.revisions().contains(&15));
        assert_eq!(t.revision, 15);
    }

    #[test]
    fn rollback_specs_keep_the_current_replicas() {
        let mut d = Desired::new(spec("v1", 2), Owner::Local);
        let t = d.new_revision(spec("v2", 5));
        d.begin("web", Kind::Update, t, 2, now());
        assert_eq!(d.spec_of(1).expect("kept").replicas, 5);
    }

    #[test]
    fn records_round_trip_and_old_records_load() {
        let mut d = Desired::new(spec("v1", 2), Owner::Local);
        let t = d.new_revision(spec("v2", 2));
        d.begin("web", Kind::Update, t, 2, now());
        let bytes = serde_json::to_vec(&d.to_record()).expect("serializes");
        let back =
            Desired::from_record(serde_json::from_slice(&bytes).expect("parses")).expect("valid");
        assert_eq!((back.revision, back.epoch, back.last_rollout), (2, 2, 1));
        assert_eq!(back.revisions(), vec![1, 2]);
        assert_eq!(back.rollout, d.rollout);
        let old = serde_json::json!({"revision": 3, "spec": spec("v1", 1).to_raw()});
        let d = Desired::from_record(serde_json::from_value(old).expect("parses")).expect("valid");
        assert_eq!((d.revision, d.epoch, d.last_revision), (3, 0, 3));
        assert_eq!(d.revisions(), vec![3]);
    }
}
