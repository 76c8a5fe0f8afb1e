//! The autoscaler's decisions, pure: from a service's `[scale]`, its current (desired)
//! instance count, one load sample and the clock, the count it should have and why. No I/O,
//! no timers: the driver samples, calls [`Autoscaler::decide`] and carries the count out as
//! desired state. Imports only `spec`.
//!
//! The rules:
//! - **Up at once**: the count each signal asks for is `ceil(load / target)` — open plus
//!   queued connections over `target_connections`, the instances' summed CPU over
//!   `target_cpu` of one instance's limit — the larger of the two, capped at `max`. Instances
//!   still starting already count (the current count is the desired one), so a burst asks
//!   once, not once per sample.
//! - **Down after `scale_down_delay`**: only once every sample for that long asked for fewer,
//!   then to the most any of them asked for; never below one while connections came within
//!   `idle_after`.
//! - **To `min` after `idle_after`** with no connection at all (0 when scaling to zero).

use std::time::Duration;

use tokio::time::Instant;

use crate::spec::ScaleSpec;

/// One sample of a service's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Established connections on the service's listening sockets, those still waiting in
    /// an accept queue included.
    pub connections: u32,
    /// Connections waiting in the sockets' accept queues.
    pub queued: u32,
    /// CPU used by all its instances together, in cores.
    pub cpu: f64,
}

impl Load {
    /// Connections open or waiting (the queued ones are among the established ones; the
    /// larger of the two stands when the readings were not taken at the same instant).
    pub fn demand(&self) -> u32 {
        self.connections.max(self.queued)
    }
}

/// What the autoscaler recommends, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The count the service should have now.
    pub target: u32,
    /// One line: `"2 → 4: 83 connections, target 20 per instance"` when it changes the
    /// count, else what holds it where it is.
    pub reason: String,
}

/// The autoscaler's memory of one service between samples.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    /// The last time a sample saw a connection (or the autoscaler began).
    last_active: Instant,
    /// Since when every sample has asked for fewer than the current count, and the most
    /// any of them asked for.
    low: Option<(Instant, u32)>,
}

impl Autoscaler {
    /// A service's autoscaler, counting `now` as activity (a service just applied or taken
    /// over is not idle yet).
    pub fn new(now: Instant) -> Autoscaler {
        Autoscaler {
            last_active: now,
            low: None,
        }
    }

    /// Record that a connection arrived at `now` (a cold start's wake-up).
    pub fn touch(&mut self, now: Instant) {
        self.last_active = self.last_active.max(now);
    }

    /// The count for `current` instances under `load`, with `cpu_limit` cores per instance
    /// (`None`: no limit, one core counts as the whole).
    pub fn decide(
        &mut self,
        spec: &ScaleSpec,
        cpu_limit: Option<f64>,
        current: u32,
        load: Load,
        now: Instant,
    ) -> Decision {
        if load.demand() > 0 {
            self.last_active = now;
        }
        let idle_for = now.saturating_duration_since(self.last_active);
        let (asked, why) = asked_for(spec, cpu_limit, load);
        let wanted = asked.clamp(spec.min, spec.max);

        if wanted > current {
            self.low = None;
            return Decision {
                target: wanted,
                reason: format!("{current} → {wanted}: {why}"),
            };
        }
        if idle_for >= spec.idle_after && current > spec.min && load.demand() == 0 {
            self.low = None;
            return Decision {
                target: spec.min,
                reason: format!(
                    "{current} → {}: no connection for {}",
                    spec.min,
                    shown(idle_for)
                ),
            };
        }
        // Below this only by going idle.
        let floor = spec.min.max(1).min(current);
        let wanted = wanted.max(floor);
        if wanted >= current {
            self.low = None;
            return Decision {
                target: current,
                reason: format!("steady at {current}: {why}"),
            };
        }
        let (since, most) = match self.low {
            Some((since, most)) => (since, most.max(wanted)),
            None => (now, wanted),
        };
        let low_for = now.saturating_duration_since(since);
        if low_for >= spec.scale_down_delay {
            self.low = None;
            return Decision {
                target: most,
                reason: format!(
                    "{current} → {most}: {why} for {}",
                    shown(spec.scale_down_delay)
                ),
            };
        }
        self.low = Some((since, most));
        Decision {
            target: current,
            reason: format!(
                "holding {current} (low for {} of {}): {why}",
                shown(low_for),
                shown(spec.scale_down_delay)
            ),
        }
    }
}

/// The count the load asks for before `[min, max]`, and the signal that asks most.
fn asked_for(spec: &ScaleSpec, cpu_limit: Option<f64>, load: Load) -> (u32, String) {
    let mut asked = 0u32;
    let mut why = String::new();
    if let Some(target) = spec.target_connections {
        let demand = load.demand();
        asked = demand.div_ceil(target.max(1));
        why = format!("{demand} connections, target {target} per instance");
    }
    if let Some(target) = spec.target_cpu {
        let per_instance = target * cpu_limit.unwrap_or(1.0);
        let n = if per_instance > 0.0 && load.cpu.is_finite() && load.cpu > 0.0 {
            // Bounded by `max` below. A float-to-integer `as` saturates (and NaN is excluded
            // above), which is the conversion wanted here.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let n = (load.cpu / per_instance).ceil() as u32;
            n
        } else {
            0
        };
        if n > asked || why.is_empty() {
            asked = n;
            why = format!(
                "cpu {:.2} cores, target {:.2} per instance",
                load.cpu, per_instance
            );
        }
    }
    (asked, why)
}

/// A duration as a person reads it, to the tenth of a second.
fn shown(d: Duration) -> String {
    let tenths = d.as_millis() / 100;
    if tenths.is_multiple_of(10) {
        format!("{}s", tenths / 10)
    } else {
        format!("{}.{}s", tenths / 10, tenths % 10)
    }
}

#[cfg(test)]
mod tests;
