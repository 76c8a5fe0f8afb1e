//! What changed between two revisions of a spec, as lines an operator reads.

use std::collections::BTreeMap;

use super::artifact::Package;
use super::error::{child, quote};
use super::types::{PortSpec, Probe, ServiceSpec};
use super::units::{format_duration, format_size};

/// One leaf of a spec, flattened for comparison.
struct Leaf {
    /// Position of the top-level field, to keep lines in spec order.
    rank: u8,
    path: String,
    value: String,
    /// Never printed: env values often hold secrets.
    secret: bool,
}

impl ServiceSpec {
    /// What changed from `old` to `self`, one line per field in spec order:
    /// `resources.memory: 64MiB -> 128MiB`, `command: ["a"] -> ["b"]`,
    /// `ports.admin: added (auto)`, `sockets[1]: removed ("metrics" 127.0.0.1:9090)`.
    /// Env values are never shown: `env.FOO: added`, `env.FOO: changed`,
    /// `env.FOO: removed`. A whole `[health]` section appearing or going is one line.
    /// Empty when the specs are equal.
    pub fn changes_from(&self, old: &ServiceSpec) -> Vec<String> {
        let new_leaves = leaves(self);
        let old_leaves = leaves(old);
        let old_by_path: BTreeMap<&str, &Leaf> =
            old_leaves.iter().map(|l| (l.path.as_str(), l)).collect();
        let new_by_path: BTreeMap<&str, &Leaf> =
            new_leaves.iter().map(|l| (l.path.as_str(), l)).collect();

        let mut lines: Vec<(u8, String)> = Vec::new();
        match (&old.health, &self.health) {
            (None, Some(_)) => lines.push((HEALTH_RANK, "health: added".to_owned())),
            (Some(_), None) => lines.push((HEALTH_RANK, "health: removed".to_owned())),
            _ => {}
        }
        // With a section added or removed, its one line says it all.
        let health_whole = old.health.is_some() != self.health.is_some();
        let shown = |leaf: &&Leaf| !(health_whole && leaf.rank == HEALTH_RANK);

        for leaf in new_leaves.iter().filter(shown) {
            let line = match old_by_path.get(leaf.path.as_str()) {
                Some(before) if before.value == leaf.value => continue,
                Some(_) if leaf.secret => format!("{}: changed", leaf.path),
                Some(before) => format!("{}: {} -> {}", leaf.path, before.value, leaf.value),
                None if leaf.secret => format!("{}: added", leaf.path),
                None => format!("{}: added ({})", leaf.path, leaf.value),
            };
            lines.push((leaf.rank, line));
        }
        for leaf in old_leaves.iter().filter(shown) {
            if new_by_path.contains_key(leaf.path.as_str()) {
                continue;
            }
            let line = if leaf.secret {
                format!("{}: removed", leaf.path)
            } else {
                format!("{}: removed ({})", leaf.path, leaf.value)
            };
            lines.push((leaf.rank, line));
        }
        // Stable: within a field, changes first, then removals.
        lines.sort_by_key(|(rank, _)| *rank);
        lines.into_iter().map(|(_, line)| line).collect()
    }
}

const HEALTH_RANK: u8 = 11;

fn leaves(spec: &ServiceSpec) -> Vec<Leaf> {
    let mut out = Vec::new();
    let mut push = |rank: u8, path: String, value: String| {
        out.push(Leaf {
            rank,
            path,
            value,
            secret: false,
        });
    };
    let unlimited = || "unlimited".to_owned();

    push(0, "name".into(), quote(&spec.name));
    push(1, "command".into(), format!("{:?}", spec.command));
    push(3, "workdir".into(), quote(&spec.workdir.to_string_lossy()));
    push(
        4,
        "user".into(),
        spec.user
            .as_ref()
            .map_or_else(|| "the agent's user".to_owned(), |u| quote(&u.to_string())),
    );
    push(5, "replicas".into(), spec.replicas.to_string());
    let r = &spec.resources;
    push(
        6,
        "resources.cpu".into(),
        r.cpu.map_or_else(unlimited, |c| c.to_string()),
    );
    push(
        6,
        "resources.memory".into(),
        r.memory.map_or_else(unlimited, format_size),
    );
    push(
        6,
        "resources.pids".into(),
        r.pids.map_or_else(unlimited, |p| p.to_string()),
    );
    push(
        6,
        "resources.nofile".into(),
        r.nofile
            .map_or_else(|| "the agent's".to_owned(), |n| n.to_string()),
    );
    let iso = &spec.isolation;
    let names: Vec<&str> = iso.namespaces.iter().map(|ns| ns.as_str()).collect();
    push(7, "isolation.namespaces".into(), format!("{names:?}"));
    push(
        7,
        "isolation.hostname".into(),
        iso.hostname
            .as_deref()
            .map_or_else(|| "the instance id".to_owned(), quote),
    );
    push(
        7,
        "isolation.private_tmp".into(),
        iso.private_tmp.to_string(),
    );
    push(
        7,
        "isolation.capabilities".into(),
        iso.capabilities.as_ref().map_or_else(
            || "the default".to_owned(),
            |set| {
                format!(
                    "{:?}",
                    set.iter().map(ToString::to_string).collect::<Vec<_>>()
                )
            },
        ),
    );
    push(
        7,
        "isolation.readonly_root".into(),
        iso.readonly_root.to_string(),
    );
    push(7, "isolation.seccomp".into(), iso.seccomp.as_str().into());
    push(7, "isolation.devices".into(), iso.devices.as_str().into());
    push(
        7,
        "isolation.system_paths".into(),
        iso.system_paths.as_str().into(),
    );
    push(7, "isolation.userns".into(), iso.userns.to_string());
    for (name, port) in &spec.ports {
        let value = match port {
            PortSpec::Auto => "auto".to_owned(),
            PortSpec::Fixed(n) => n.to_string(),
        };
        push(8, child("ports", name), value);
    }
    for (i, socket) in spec.sockets.iter().enumerate() {
        push(
            9,
            format!("sockets[{i}]"),
            format!("{} {}", quote(&socket.name), socket.listen),
        );
    }
    let rs = &spec.restart;
    push(10, "restart.policy".into(), rs.policy.as_str().to_owned());
    push(10, "restart.backoff".into(), format_duration(rs.backoff));
    push(
        10,
        "restart.backoff_max".into(),
        format_duration(rs.backoff_max),
    );
    if let Some(h) = &spec.health {
        match &h.probe {
            None => {}
            Some(Probe::Http(url)) => push(HEALTH_RANK, "health.http".into(), quote(url)),
            Some(Probe::Tcp(target)) => push(HEALTH_RANK, "health.tcp".into(), quote(target)),
            Some(Probe::Grpc(target)) => push(HEALTH_RANK, "health.grpc".into(), quote(target)),
            Some(Probe::Exec(argv)) => push(HEALTH_RANK, "health.exec".into(), format!("{argv:?}")),
        }
        push(
            HEALTH_RANK,
            "health.interval".into(),
            format_duration(h.interval),
        );
        push(
            HEALTH_RANK,
            "health.timeout".into(),
            format_duration(h.timeout),
        );
        push(
            HEALTH_RANK,
            "health.start_period".into(),
            format_duration(h.start_period),
        );
        push(
            HEALTH_RANK,
            "health.failure_threshold".into(),
            h.failure_threshold.to_string(),
        );
        push(
            HEALTH_RANK,
            "health.success_threshold".into(),
            h.success_threshold.to_string(),
        );
        push(
            HEALTH_RANK,
            "health.restart_on_failure".into(),
            h.restart_on_failure.to_string(),
        );
        push(HEALTH_RANK, "health.notify".into(), h.notify.to_string());
    }
    let ro = &spec.rollout;
    push(12, "rollout.max_surge".into(), ro.max_surge.to_string());
    push(
        12,
        "rollout.max_unavailable".into(),
        ro.max_unavailable.to_string(),
    );
    push(
        12,
        "rollout.min_healthy".into(),
        format_duration(ro.min_healthy),
    );
    push(
        12,
        "rollout.healthy_deadline".into(),
        format_duration(ro.healthy_deadline),
    );
    push(
        12,
        "rollout.auto_rollback".into(),
        ro.auto_rollback.to_string(),
    );
    if let Some(cpu) = ro.start_cpu {
        push(12, "rollout.start_cpu".into(), cpu.to_string());
    }
    if let Some(sc) = &spec.scale {
        push(12, "scale.min".into(), sc.min.to_string());
        push(12, "scale.max".into(), sc.max.to_string());
        if let Some(t) = sc.target_connections {
            push(12, "scale.target_connections".into(), t.to_string());
        }
        if let Some(t) = sc.target_cpu {
            push(12, "scale.target_cpu".into(), t.to_string());
        }
        push(
            12,
            "scale.idle_after".into(),
            format_duration(sc.idle_after),
        );
        push(
            12,
            "scale.scale_down_delay".into(),
            format_duration(sc.scale_down_delay),
        );
    }
    push(13, "stop.signal".into(), spec.stop.signal_name.clone());
    push(13, "stop.grace".into(), format_duration(spec.stop.grace));
    push(14, "logs.max_size".into(), format_size(spec.logs.max_size));
    push(14, "logs.max_files".into(), spec.logs.max_files.to_string());
    match &spec.package {
        None => {}
        Some(Package::Artifact(a)) => {
            push(15, "artifact.url".into(), quote(&a.source.to_url()));
            push(
                15,
                "artifact.sha256".into(),
                a.sha256.map_or_else(|| "computed".to_owned(), |d| d.hex()),
            );
            push(15, "artifact.format".into(), a.format.name().to_owned());
            push(
                15,
                "artifact.mount".into(),
                quote(&a.mount.to_string_lossy()),
            );
        }
        Some(Package::Image(i)) => {
            push(16, "image.url".into(), quote(&i.source.to_url()));
            push(16, "image.digest".into(), i.digest.to_string());
            push(16, "image.persist".into(), i.persist.to_string());
        }
    }

    for (key, value) in &spec.labels {
        push(15, child("labels", key), quote(value));
    }
    for (key, value) in &spec.annotations {
        push(16, child("annotations", key), quote(value));
    }
    for (key, value) in &spec.env {
        out.push(Leaf {
            rank: 2,
            path: child("env", key),
            value: value.clone(),
            secret: true,
        });
    }
    out
}
