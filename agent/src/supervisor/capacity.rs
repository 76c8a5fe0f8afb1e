//! Admission by capacity, pure: what the host has (`capacity`), what services may commit
//! (`allocatable`: capacity minus the host's `--reserve`, times the `--overcommit` ratio) and
//! what they have committed (the sum over services of `replicas` × their CPU and memory
//! limits).
//!
//! A service commits its desired instances only: the extra instances a rollout starts for
//! `max_surge` are not counted (for the length of a rollout a node can run up to
//! `max_surge` instances' limits beyond what is committed). A service without a limit
//! commits nothing for it, so it is never refused, and it is not held to anything either:
//! limits are what admission sees.

use crate::spec::ServiceSpec;

/// CPU (cores) and memory (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Amounts {
    pub cpu: f64,
    pub memory: u64,
}

/// Ratios by which commitments may exceed what is allocatable: `1.0` none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    pub cpu: f64,
    pub memory: f64,
}

impl Default for Ratios {
    fn default() -> Ratios {
        Ratios {
            cpu: 1.0,
            memory: 1.0,
        }
    }
}

/// What the node offers services.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapacityPolicy {
    /// The host's CPUs and memory.
    pub capacity: Amounts,
    /// Kept for the host (`--reserve`).
    pub reserve: Amounts,
    /// `--overcommit`.
    pub overcommit: Ratios,
}

/// One resource a change would take beyond what may be committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    /// `resources.cpu` or `resources.memory`.
    pub field: &'static str,
    /// What the service would commit (replicas × its limit).
    pub requested: f64,
    /// What the other services commit.
    pub committed: f64,
    /// What may be committed: allocatable × overcommit.
    pub limit: f64,
    pub allocatable: f64,
    pub ratio: f64,
}

/// `bytes × ratio`, in bytes: a float-to-integer `as` saturates at both ends (and a NaN
/// ratio, refused at startup, would give 0), which is the rounding wanted for a limit.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn scale_bytes(bytes: u64, ratio: f64) -> u64 {
    (bytes as f64 * ratio) as u64
}

impl CapacityPolicy {
    /// Capacity minus the reserve (never below zero).
    pub fn allocatable(&self) -> Amounts {
        Amounts {
            cpu: (self.capacity.cpu - self.reserve.cpu).max(0.0),
            memory: self.capacity.memory.saturating_sub(self.reserve.memory),
        }
    }

    /// What services may commit together: allocatable × overcommit.
    pub fn limit(&self) -> Amounts {
        let a = self.allocatable();
        Amounts {
            cpu: a.cpu * self.overcommit.cpu,
            memory: scale_bytes(a.memory, self.overcommit.memory),
        }
    }

    /// Whether `spec` fits beside `others` (what every other service commits). Only a
    /// resource the spec limits can be exceeded by it.
    pub fn admit(&self, others: Amounts, spec: &ServiceSpec) -> Result<(), Vec<Exceeded>> {
        let want = commitment(spec);
        let (limit, allocatable) = (self.limit(), self.allocatable());
        let mut over = Vec::new();
        if spec.resources.cpu.is_some() && others.cpu + want.cpu > limit.cpu + 1e-9 {
            over.push(Exceeded {
                field: "resources.cpu",
                requested: want.cpu,
                committed: others.cpu,
                limit: limit.cpu,
                allocatable: allocatable.cpu,
                ratio: self.overcommit.cpu,
            });
        }
        if spec.resources.memory.is_some()
            && others.memory.saturating_add(want.memory) > limit.memory
        {
            over.push(Exceeded {
                field: "resources.memory",
                requested: want.memory as f64,
                committed: others.memory as f64,
                limit: limit.memory as f64,
                allocatable: allocatable.memory as f64,
                ratio: self.overcommit.memory,
            });
        }
        if over.is_empty() { Ok(()) } else { Err(over) }
    }
}

/// What a service commits: `replicas` × each limit it sets.
pub fn commitment(spec: &ServiceSpec) -> Amounts {
    let n = u64::from(spec.replicas);
    Amounts {
        cpu: spec.resources.cpu.unwrap_or(0.0) * n as f64,
        memory: spec.resources.memory.unwrap_or(0).saturating_mul(n),
    }
}

/// The sum of amounts.
pub fn total(parts: impl Iterator<Item = Amounts>) -> Amounts {
    parts.fold(Amounts::default(), |a, b| Amounts {
        cpu: a.cpu + b.cpu,
        memory: a.memory.saturating_add(b.memory),
    })
}

/// `cpu=0.5,memory=512MiB` (`--reserve`): either part may be left out (0).
pub fn parse_reserve(text: &str) -> Result<Amounts, String> {
    let mut out = Amounts::default();
    for (key, value) in pairs(text)? {
        match key {
            "cpu" => out.cpu = cores(value)?,
            "memory" => {
                out.memory =
                    crate::spec::parse_size(value).map_err(|e| format!("memory={value}: {e}"))?;
            }
            other => return Err(format!("{other:?} is not a resource (use cpu and memory)")),
        }
    }
    Ok(out)
}

/// `cpu=4.0,memory=1.0` (`--overcommit`): ratios of at least 1; a part left out is 1.
pub fn parse_overcommit(text: &str) -> Result<Ratios, String> {
    let mut out = Ratios::default();
    for (key, value) in pairs(text)? {
        let ratio: f64 = value
            .parse()
            .ok()
            .filter(|r: &f64| r.is_finite() && *r >= 1.0 && *r <= 1000.0)
            .ok_or_else(|| format!("{key}={value}: not a ratio from 1.0 to 1000"))?;
        match key {
            "cpu" => out.cpu = ratio,
            "memory" => out.memory = ratio,
            other => return Err(format!("{other:?} is not a resource (use cpu and memory)")),
        }
    }
    Ok(out)
}

fn cores(value: &str) -> Result<f64, String> {
    value
        .parse()
        .ok()
        .filter(|c: &f64| c.is_finite() && *c >= 0.0)
        .ok_or_else(|| format!("cpu={value}: not a number of cores"))
}

fn pairs(text: &str) -> Result<Vec<(&str, &str)>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("{p:?}: expected resource=value, e.g. cpu=0.5"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> ServiceSpec {
        crate::spec::parse_toml(&format!("name = \"x\"\ncommand = [\"/x\"]\n{text}"))
            .expect("valid")
    }

    #[test]
    fn flags_parse() {
        assert_eq!(
            parse_reserve("cpu=0.5,memory=512MiB"),
            Ok(Amounts {
                cpu: 0.5,
                memory: 512 << 20
            })
        );
        assert_eq!(parse_reserve(""), Ok(Amounts::default()));
        assert!(parse_reserve("disk=1").is_err());
        assert!(parse_reserve("cpu=-1").is_err());
        assert!(parse_reserve("memory=lots").is_err());
        assert_eq!(
            parse_overcommit("cpu=4.0,memory=1.0"),
            Ok(Ratios {
                cpu: 4.0,
                memory: 1.0
            })
        );
        assert!(parse_overcommit("cpu=0.5").is_err(), "below 1");
        assert!(parse_overcommit("cpu").is_err());
    }

    #[test]
    fn admission_counts_replicas_times_limits() {
        let p = CapacityPolicy {
            capacity: Amounts {
                cpu: 4.0,
                memory: 8 << 30,
            },
            reserve: Amounts {
                cpu: 0.5,
                memory: 1 << 30,
            },
            overcommit: Ratios::default(),
        };
        assert_eq!(p.allocatable().cpu, 3.5);
        let others = Amounts {
            cpu: 2.0,
            memory: 4 << 30,
        };
        // 3 × 0.5 = 1.5 fits beside 2.0 in 3.5; 4 × 0.5 does not.
        assert!(
            p.admit(others, &spec("replicas = 3\n[resources]\ncpu = 0.5\n"))
                .is_ok()
        );
        let over = p
            .admit(others, &spec("replicas = 4\n[resources]\ncpu = 0.5\n"))
            .expect_err("over");
        assert_eq!(over.len(), 1);
        assert_eq!(
            (
                over[0].field,
                over[0].requested,
                over[0].committed,
                over[0].limit
            ),
            ("resources.cpu", 2.0, 2.0, 3.5)
        );
        // Memory: 3 GiB allocatable left; 4 × 1 GiB is refused.
        let over = p
            .admit(
                others,
                &spec("replicas = 4\n[resources]\nmemory = \"1GiB\"\n"),
            )
            .expect_err("over");
        assert_eq!(over[0].field, "resources.memory");
        // No limits: nothing committed, never refused.
        assert!(p.admit(others, &spec("replicas = 1000\n")).is_ok());
        // Overcommit 4× on CPU lets it in.
        let loose = CapacityPolicy {
            overcommit: Ratios {
                cpu: 4.0,
                memory: 1.0,
            },
            ..p
        };
        assert!(
            loose
                .admit(others, &spec("replicas = 20\n[resources]\ncpu = 0.5\n"))
                .is_ok()
        );
    }
}
