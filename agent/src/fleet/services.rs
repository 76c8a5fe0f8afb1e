//! The fleet's way to the supervisor: apply a spec from etcd through the same validation,
//! admission and rollouts as the local API (as the etcd owner), delete a service, and read
//! what runs. A trait, so the session's logic does not depend on how the supervisor is
//! reached.

use std::future::Future;

use corral_fleet::records::RolloutRecord;

use crate::spec::ServiceSpec;
use crate::supervisor::{Owner, SupervisorError, SupervisorHandle};

/// Why a spec from etcd was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The spec is wrong, the host cannot run it, or the name is a local service's: reported,
    /// not tried again until the key changes.
    Refused(String),
    /// Something that may pass (the state could not be saved, the service is being deleted):
    /// tried again.
    Retry(String),
}

/// One service as the fleet reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub owner: Owner,
    pub revision: u64,
    pub desired: u32,
    pub running: u32,
    pub healthy: u32,
    pub health: String,
    pub rollout: Option<RolloutRecord>,
    /// The spec's limits (`None`: unlimited), for what the node has committed.
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
}

pub trait Services: Send + Sync + 'static {
    /// Apply `spec` as the fleet's (superseding a running rollout: etcd holds the desired
    /// state).
    fn apply(&self, spec: ServiceSpec) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// Remove the fleet's service `name`; one already gone, or a local one, is left alone.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), Refusal>> + Send;
    fn list(&self) -> impl Future<Output = Result<Vec<Summary>, Refusal>> + Send;
}

fn refusal(e: SupervisorError) -> Refusal {
    match e {
        SupervisorError::Storage { .. }
        | SupervisorError::Encoding { .. }
        | SupervisorError::Unavailable
        | SupervisorError::Deleting { .. } => Refusal::Retry(e.to_string()),
        other => Refusal::Refused(other.to_string()),
    }
}

/// The supervisor, spoken to as the etcd owner.
#[derive(Debug, Clone)]
pub struct Supervised(SupervisorHandle);

impl Supervised {
    pub fn new(handle: &SupervisorHandle) -> Supervised {
        Supervised(handle.for_owner(Owner::Etcd))
    }
}

impl Services for Supervised {
    async fn apply(&self, spec: ServiceSpec) -> Result<(), Refusal> {
        self.0
            .apply(spec, false, true)
            .await
            .map(|_| ())
            .map_err(refusal)
    }

    async fn delete(&self, name: &str) -> Result<(), Refusal> {
        match self.0.delete(name, false).await {
            Ok(_)
            | Err(SupervisorError::NotFound { .. })
            | Err(SupervisorError::OwnedLocally { .. }) => Ok(()),
            Err(e) => Err(refusal(e)),
        }
    }

    async fn list(&self) -> Result<Vec<Summary>, Refusal> {
        let services = self.0.list().await.map_err(refusal)?.services;
        Ok(services
            .into_iter()
            .map(|s| Summary {
                rollout: s.rollout.as_ref().map(|r| RolloutRecord {
                    id: r.id.clone(),
                    state: r.state.as_str().to_string(),
                }),
                cpu: s.spec.resources.cpu,
                memory: s.spec.resources.memory,
                owner: s.owner,
                name: s.name,
                revision: s.revision,
                desired: s.desired,
                running: s.running,
                healthy: s.healthy,
                health: s.health.as_str().to_string(),
            })
            .collect())
    }
}
