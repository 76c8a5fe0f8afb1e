//! The fleet's way to the supervisor: apply a spec from etcd through the same validation,
//! admission and rollouts as the local API, delete a service, and read what runs. A trait,
//! so the sync logic does not depend on how the supervisor is reached.

use std::future::Future;

use corral_fleet::records::RolloutRecord;

use crate::spec::ServiceSpec;
use crate::supervisor::{Operation, Outcome, SupervisorError, SupervisorHandle};

/// Why a spec from etcd was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The spec is wrong or the host cannot run it: reported, not retried until the key
    /// changes.
    Refused(String),
    /// Something that may pass (the state could not be saved, the service is being deleted):
    /// tried again.
    Retry(String),
}

/// One service as the fleet reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
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
    /// Apply `spec` (superseding a running rollout: etcd holds the desired state).
    fn apply(&self, spec: ServiceSpec) -> impl Future<Output = Result<(), Refusal>> + Send;
    /// Remove the service; a service already gone is fine.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), Refusal>> + Send;
    fn list(&self) -> impl Future<Output = Result<Vec<Summary>, Refusal>> + Send;
}

fn refusal(e: SupervisorError) -> Refusal {
    match e {
        SupervisorError::Storage(_) | SupervisorError::Unavailable | SupervisorError::Deleting { .. } => {
            Refusal::Retry(e.to_string())
        }
        other => Refusal::Refused(other.to_string()),
    }
}

impl Services for SupervisorHandle {
    async fn apply(&self, spec: ServiceSpec) -> Result<(), Refusal> {
        let op = Operation::Apply {
            spec: Box::new(spec),
            dry_run: false,
            force: true,
        };
        match self.call(op).await {
            Ok(_) => Ok(()),
            Err(e) => Err(refusal(e)),
        }
    }

    async fn delete(&self, name: &str) -> Result<(), Refusal> {
        let op = Operation::Delete {
            name: name.to_string(),
        };
        match self.call(op).await {
            Ok(_) | Err(SupervisorError::NotFound { .. }) => Ok(()),
            Err(e) => Err(refusal(e)),
        }
    }

    async fn list(&self) -> Result<Vec<Summary>, Refusal> {
        match self.call(Operation::List).await {
            Ok(Outcome::List(services)) => Ok(services
                .into_iter()
                .map(|s| Summary {
                    rollout: s.rollout.as_ref().map(|r| RolloutRecord {
                        id: r.id.clone(),
                        state: r.state.as_str().to_string(),
                    }),
                    cpu: s.spec.resources.cpu,
                    memory: s.spec.resources.memory,
                    name: s.name,
                    revision: s.revision,
                    desired: s.desired,
                    running: s.running,
                    healthy: s.healthy,
                    health: s.health.to_string(),
                })
                .collect()),
            Ok(other) => Err(Refusal::Retry(format!("unexpected answer {other:?}"))),
            Err(e) => Err(refusal(e)),
        }
    }
}
