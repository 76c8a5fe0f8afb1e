//! `[scale]`: its own fields, and what it asks of the rest of the spec (a listening socket to
//! wait on, `replicas` within `[min, max]`).

use std::time::Duration;

use super::super::types::{RawScale, ScaleSpec, SocketSpec};
use super::{Check, DAY, MAX_REPLICAS, millis, secs};

const DEFAULT_IDLE_AFTER: Duration = secs(300);
const DEFAULT_SCALE_DOWN_DELAY: Duration = secs(30);
const MIN_SCALE_DURATION: Duration = millis(100);
const MAX_TARGET_CONNECTIONS: i64 = 1_000_000;

impl Check {
    /// `[scale]` checked on its own; `None` when absent or wrong (reported).
    pub(super) fn scale(&mut self, raw: &RawScale) -> Option<ScaleSpec> {
        let errors = self.errors.len();
        let min = self.integer("scale.min", raw.min, 0, 0..=i64::from(MAX_REPLICAS));
        let max = match raw.max {
            None => {
                self.error("scale.max", "is required (the most instances to run)");
                None
            }
            Some(m) => self.integer("scale.max", Some(m), 0, 1..=i64::from(MAX_REPLICAS)),
        };
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            self.error("scale.min", format!("{lo} is above scale.max ({hi})"));
        }
        let target_connections = raw.target_connections.and_then(|n| {
            self.integer(
                "scale.target_connections",
                Some(n),
                0,
                1..=MAX_TARGET_CONNECTIONS,
            )
        });
        let target_cpu = raw.target_cpu.and_then(|f| {
            if f.is_finite() && f > 0.0 && f <= 1.0 {
                Some(f)
            } else {
                self.error(
                    "scale.target_cpu",
                    format!("{f} is out of range (above 0, at most 1: a fraction of the instance's cpu limit)"),
                );
                None
            }
        });
        if raw.target_connections.is_none() && raw.target_cpu.is_none() {
            self.error(
                "scale",
                "needs target_connections, target_cpu or both (what the autoscaler aims at)",
            );
        }
        let idle_after = self.duration(
            "scale.idle_after",
            raw.idle_after.as_deref(),
            DEFAULT_IDLE_AFTER,
            MIN_SCALE_DURATION,
            DAY,
        );
        let scale_down_delay = self.duration(
            "scale.scale_down_delay",
            raw.scale_down_delay.as_deref(),
            DEFAULT_SCALE_DOWN_DELAY,
            MIN_SCALE_DURATION,
            DAY,
        );
        if self.errors.len() != errors {
            return None;
        }
        Some(ScaleSpec {
            min: min?,
            max: max?,
            target_connections,
            target_cpu,
            idle_after: idle_after?,
            scale_down_delay: scale_down_delay?,
        })
    }

    /// What `[scale]` needs of the rest of the spec.
    pub(super) fn scale_needs(
        &mut self,
        scale: &ScaleSpec,
        replicas: Option<u32>,
        sockets: &[SocketSpec],
    ) {
        if sockets.is_empty() {
            self.error(
                "scale",
                "needs at least one [[sockets]] listener (instances are started on a connection to it)",
            );
        }
        if let Some(r) = replicas
            && !(scale.min..=scale.max).contains(&r)
        {
            self.error(
                "replicas",
                format!("{r} is outside [scale] ({}..={})", scale.min, scale.max),
            );
        }
    }
}
