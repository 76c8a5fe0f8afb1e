//! A service's health from its instances' health, and the guard that keeps liveness restarts
//! from taking down more than a few instances at once. Pure.

use std::fmt;

use super::tracker::HealthState;

/// What [`service_health`] needs of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceHealth {
    /// The instance is in its running state (not pending, backing off, stopping or exited).
    pub running: bool,
    /// Its tracker's state; for a service without `[health]`, the driver passes `Healthy` for a
    /// running instance.
    pub health: HealthState,
}

/// A service's health, from its instances'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceHealth {
    /// At least `desired` instances are running and healthy (or `desired` is 0).
    Healthy,
    /// Some, but fewer than `desired`, instances are running and healthy.
    Degraded,
    /// None is running and healthy while `desired` > 0.
    Unhealthy,
}

impl ServiceHealth {
    /// The name in status output: `healthy`, `degraded`, `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceHealth::Healthy => "healthy",
            ServiceHealth::Degraded => "degraded",
            ServiceHealth::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for ServiceHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of a service that wants `desired` instances, from all its current instances
/// (extra ones of a rollout included). Only instances that are running and `Healthy` count;
/// `Unknown` counts as not healthy. With `n` of them:
///
/// | desired | n                  | health      |
/// | ------- | ------------------ | ----------- |
/// | 0       | any                | `Healthy`   |
/// | > 0     | n >= desired       | `Healthy`   |
/// | > 0     | 0 < n < desired    | `Degraded`  |
/// | > 0     | 0                  | `Unhealthy` |
pub fn service_health(desired: u32, instances: &[InstanceHealth]) -> ServiceHealth {
    let healthy = instances
        .iter()
        .filter(|i| i.running && i.health == HealthState::Healthy)
        .count();
    let desired = desired as usize;
    if healthy >= desired {
        ServiceHealth::Healthy
    } else if healthy > 0 {
        ServiceHealth::Degraded
    } else {
        ServiceHealth::Unhealthy
    }
}

/// How many instances of a service of `replicas` may be in a health restart at once:
/// 10 % of the replicas, rounded down, and at least one.
pub fn health_restart_limit(replicas: u32) -> u32 {
    (replicas / 10).max(1)
}

/// Whether another health restart of an instance may start now, while `in_progress` of the
/// service's instances are being restarted for health (stopped for it and not yet running
/// again). Restarts beyond the limit wait, so a probe that fails everywhere at once (a shared
/// dependency down) does not take the whole service down.
pub fn may_restart_for_health(replicas: u32, in_progress: u32) -> bool {
    in_progress < health_restart_limit(replicas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use HealthState::{Healthy, Unhealthy, Unknown};

    fn inst(running: bool, health: HealthState) -> InstanceHealth {
        InstanceHealth { running, health }
    }

    #[test]
    fn service_health_table() {
        let cases: Vec<(&str, u32, Vec<InstanceHealth>, ServiceHealth)> = vec![
            (
                "nothing desired, nothing there",
                0,
                vec![],
                ServiceHealth::Healthy,
            ),
            (
                "nothing desired, one still stopping",
                0,
                vec![inst(false, Unhealthy)],
                ServiceHealth::Healthy,
            ),
            (
                "one desired, none there",
                1,
                vec![],
                ServiceHealth::Unhealthy,
            ),
            (
                "one desired and healthy",
                1,
                vec![inst(true, Healthy)],
                ServiceHealth::Healthy,
            ),
            (
                "one desired, still unknown",
                1,
                vec![inst(true, Unknown)],
                ServiceHealth::Unhealthy,
            ),
            (
                "healthy but not running does not count",
                1,
                vec![inst(false, Healthy)],
                ServiceHealth::Unhealthy,
            ),
            (
                "all of three",
                3,
                vec![
                    inst(true, Healthy),
                    inst(true, Healthy),
                    inst(true, Healthy),
                ],
                ServiceHealth::Healthy,
            ),
            (
                "two of three",
                3,
                vec![
                    inst(true, Healthy),
                    inst(true, Unhealthy),
                    inst(true, Healthy),
                ],
                ServiceHealth::Degraded,
            ),
            (
                "one of three, one missing",
                3,
                vec![inst(true, Healthy), inst(true, Unknown)],
                ServiceHealth::Degraded,
            ),
            (
                "none of three",
                3,
                vec![
                    inst(true, Unhealthy),
                    inst(true, Unknown),
                    inst(false, Unknown),
                ],
                ServiceHealth::Unhealthy,
            ),
            (
                "surge: three healthy of four while three are desired",
                3,
                vec![
                    inst(true, Healthy),
                    inst(true, Healthy),
                    inst(true, Healthy),
                    inst(true, Unknown),
                ],
                ServiceHealth::Healthy,
            ),
        ];
        for (name, desired, instances, want) in cases {
            assert_eq!(service_health(desired, &instances), want, "{name}");
        }
    }

    #[test]
    fn restart_guard_table() {
        // (replicas, in progress, may start another)
        let cases = [
            (0, 0, true),
            (1, 0, true),
            (1, 1, false),
            (9, 0, true),
            (9, 1, false),
            (10, 0, true),
            (10, 1, false),
            (19, 1, false),
            (20, 1, true),
            (20, 2, false),
            (100, 9, true),
            (100, 10, false),
            (1000, 99, true),
            (1000, 100, false),
            (1000, 500, false),
        ];
        for (replicas, in_progress, want) in cases {
            assert_eq!(
                may_restart_for_health(replicas, in_progress),
                want,
                "replicas {replicas}, in progress {in_progress}"
            );
        }
        assert_eq!(health_restart_limit(0), 1);
        assert_eq!(health_restart_limit(35), 3);
    }
}
