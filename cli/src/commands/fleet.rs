//! `corral fleet`: reads and writes the fleet's keys in etcd (the layout and records of
//! `corral_fleet`), never through an agent. Specs are written as the TOML text of their file;
//! each node's agent validates what it is given and says so in its status key.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use corral_fleet::backoff::Backoff;
use corral_fleet::bulk::{self, TxnCost, TxnLimits};
use corral_fleet::connect::{self, EtcdConfig};
use corral_fleet::etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use corral_fleet::keys::{Key, Layout};
use corral_fleet::placement::{self, Selector};
use corral_fleet::records::{NodeRecord, Resources, StatusRecord};
use serde::Serialize;

use super::Outcome;
use crate::args::{
    EtcdArgs, FleetApplyArgs, FleetArgs, FleetCommand, FleetDeleteArgs, FleetRolloutArgs, Format,
};
use crate::render::{self, Table};

/// Deadline of one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a rollout reads the nodes' status keys.
const POLL: Duration = Duration::from_millis(200);

pub async fn run(
    args: &FleetArgs,
    format: Format,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut fleet = Fleet::connect(&args.etcd).await?;
    match &args.command {
        FleetCommand::Nodes => fleet.nodes(format, out).await,
        FleetCommand::Apply(a) => fleet.apply(a, format, out, err).await,
        FleetCommand::Ls => fleet.ls(format, out).await,
        FleetCommand::Delete(a) => fleet.delete(a, format, out).await,
        FleetCommand::Rollout(a) => fleet.rollout(a, format, out).await,
    }
}

/// Everything under the nodes prefix, as read at one revision.
#[derive(Debug, Default)]
struct Snapshot {
    /// The revision it was read at.
    revision: i64,
    nodes: BTreeMap<String, NodeRecord>,
    /// (service, node) -> the spec key's value and mod revision.
    specs: BTreeMap<(String, String), (Vec<u8>, i64)>,
    /// (service, node) -> the node's status of it.
    statuses: BTreeMap<(String, String), StatusRecord>,
}

impl Snapshot {
    /// The nodes as a placement sees them: what each commits counted from its spec keys
    /// (the agents report theirs only once applied, and at most every few seconds), beside
    /// what its local services commit, less what `service` commits there now (the spec
    /// being applied replaces it).
    fn nodes_for_placement(&self, service: &str) -> Vec<NodeRecord> {
        let mut fleet: BTreeMap<&str, Resources> = BTreeMap::new();
        for ((name, node), (text, _)) in &self.specs {
            if name != service {
                let d = std::str::from_utf8(text).map(demand).unwrap_or_default();
                let sum = fleet.entry(node.as_str()).or_default();
                *sum = sum.plus(&d);
            }
        }
        self.nodes
            .values()
            .map(|n| {
                let from_keys = fleet.get(n.node.as_str()).copied().unwrap_or_default();
                let mut n = n.clone();
                n.committed = match n.committed_local {
                    Some(local) => local.plus(&from_keys),
                    // An agent that does not say which part is local: the larger of what
                    // it reported and what its keys ask for.
                    None => Resources {
                        cpu: n.committed.cpu.max(from_keys.cpu),
                        memory: n.committed.memory.max(from_keys.memory),
                    },
                };
                n
            })
            .collect()
    }

    /// The nodes that have a key for `service`.
    fn holding(&self, service: &str) -> BTreeSet<String> {
        self.specs
            .keys()
            .filter(|(s, _)| s == service)
            .map(|(_, n)| n.clone())
            .collect()
    }
}

struct Fleet {
    client: Client,
    layout: Layout,
    /// How to connect again when the member the client is pinned to stops answering.
    cfg: EtcdConfig,
    /// What one transaction may hold (etcd's `--max-txn-ops` and `--max-request-bytes`).
    limits: TxnLimits,
    /// Keys per range request of a whole-prefix read.
    page: usize,
}

/// One etcd call with a deadline.
async fn call<T>(
    what: &str,
    f: impl Future<Output = Result<T, corral_fleet::etcd_client::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => bail!("{what}: {}", connect::describe(&e)),
        Err(_) => bail!("{what}: no answer from etcd within {REQUEST_TIMEOUT:?}"),
    }
}

/// How often `fleet apply` reads and chooses again when another writer changed a chosen
/// node's services between its read and its write.
const APPLY_ATTEMPTS: u32 = 5;
/// Transactions of one apply in flight at once: a placement of up to this many transactions
/// is sent at once, and a larger one (thousands of nodes, or a large spec) holds no more than
/// these many transactions' copies of the spec in memory.
const TXNS_IN_FLIGHT: usize = 8;

/// `e` (a refused transaction) with what to do when etcd refused it for passing its limits:
/// etcd runs with smaller ones than the CLI was told.
fn beyond_limits(e: anyhow::Error, limits: TxnLimits) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("too many operations in txn request") {
        anyhow::anyhow!(
            "{text} (etcd takes fewer operations a transaction than --etcd-max-txn-ops {}: \
             give it etcd's --max-txn-ops)",
            limits.max_ops
        )
    } else if text.contains("request is too large") || text.contains("larger than max") {
        anyhow::anyhow!(
            "{text} (etcd takes smaller requests than --etcd-max-request-bytes {}: give it \
             etcd's --max-request-bytes)",
            limits.max_bytes
        )
    } else {
        e
    }
}

/// What a spec commits on a node, as the agent's admission counts it: each limit it sets
/// (`resources.cpu`, `resources.memory`) × `replicas`. A spec that does not parse commits
/// nothing here (its node's agent refuses it, and says why in the status key).
fn demand(text: &str) -> Resources {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Resources::default();
    };
    let replicas = table
        .get("replicas")
        .and_then(toml::Value::as_integer)
        .map_or(1, |n| u64::try_from(n).unwrap_or(0));
    let resources = table.get("resources").and_then(toml::Value::as_table);
    let field = |k: &str| resources.and_then(|r| r.get(k));
    let cpu = match field("cpu") {
        Some(toml::Value::Float(f)) if f.is_finite() && *f > 0.0 => *f,
        Some(toml::Value::Integer(i)) if *i > 0 => *i as f64,
        _ => 0.0,
    };
    let memory = match field("memory") {
        Some(toml::Value::Integer(i)) => u64::try_from(*i).unwrap_or(0),
        Some(toml::Value::String(t)) => parse_size(t).unwrap_or(0),
        _ => 0,
    };
    Resources {
        cpu: cpu * replicas as f64,
        memory: memory.saturating_mul(replicas),
    }
}

/// A size as specs write it: digits, or digits and `B`, `KiB`, `MiB`, `GiB` or `TiB`.
fn parse_size(text: &str) -> Option<u64> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(end);
    let multiple: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(multiple)
}

/// The spec file's text and the service it names (`name = "..."`).
fn read_spec(path: &Path) -> anyhow::Result<(String, String)> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the spec from standard input")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not a TOML spec", path.display()))?;
    let Some(name) = table.get("name").and_then(|v| v.as_str()) else {
        bail!(
            "{}: name: missing (the service's name, a string)",
            path.display()
        );
    };
    if name.is_empty() || name.contains('/') {
        bail!(
            "{}: name: {name:?} cannot name a key (empty or with '/')",
            path.display()
        );
    }
    Ok((text.clone(), name.to_owned()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let secs = now_ms().saturating_sub(ms) / 1000;
    format!("{}s ago", secs)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A status as one cell of `fleet ls`.
fn cell(spec_revision: Option<i64>, status: Option<&StatusRecord>, registered: bool) -> String {
    let mut text = match (spec_revision, status) {
        (None, None) => return String::new(),
        (Some(rev), Some(s)) if s.spec_revision < rev => "pending".to_owned(),
        (Some(_), None) => "pending".to_owned(),
        (_, Some(s)) => match s.state {
            corral_fleet::records::ApplyState::Refused => "refused".to_owned(),
            corral_fleet::records::ApplyState::Retrying => "retrying".to_owned(),
            corral_fleet::records::ApplyState::Applied => {
                let mut t = format!("{}/{}", s.healthy, s.desired);
                if s.rollout.as_ref().is_some_and(|r| r.state == "running") {
                    t.push_str(" rolling");
                }
                t
            }
        },
    };
    if spec_revision.is_none() {
        text.push_str(" (deleted)");
    }
    if !registered {
        text.push_str(" (gone)");
    }
    text
}

#[derive(Debug, Serialize)]
struct PlacementView<'a> {
    service: &'a str,
    node: &'a str,
    /// The mod revision of the node's key (absent: the key was deleted).
    spec_revision: Option<i64>,
    node_registered: bool,
    status: Option<&'a StatusRecord>,
}

#[derive(Debug, Serialize)]
struct WrittenView<'a> {
    service: &'a str,
    nodes: &'a [String],
    revision: i64,
    /// Nodes that run the service but were not chosen.
    also_on: Vec<String>,
}

impl Fleet {
    async fn connect(a: &EtcdArgs) -> anyhow::Result<Fleet> {
        let layout = Layout::new(&a.etcd_prefix)?;
        let user = match (&a.etcd_user, &a.etcd_password_file) {
            (Some(u), Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading --etcd-password-file {}", f.display()))?;
                Some((u.clone(), text.lines().next().unwrap_or("").to_owned()))
            }
            _ => None,
        };
        let cfg = EtcdConfig {
            endpoints: connect::parse_endpoints(&a.etcd)?,
            ca: a.etcd_ca.clone(),
            cert: a.etcd_cert.clone(),
            key: a.etcd_key.clone(),
            user,
        };
        let client = cfg.connect().await?;
        Ok(Fleet {
            client,
            layout,
            cfg,
            limits: TxnLimits {
                max_ops: a.etcd_max_txn_ops,
                max_bytes: a.etcd_max_request_bytes,
            },
            page: a.etcd_page,
        })
    }

    /// Every key under the nodes prefix, read in pages at one revision.
    async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let prefix = self.layout.nodes_prefix().to_owned();
        let read = bulk::read_prefix(&mut self.client, &prefix, self.page, REQUEST_TIMEOUT)
            .await
            .context("reading the fleet's keys")?;
        let mut snap = Snapshot {
            revision: read.revision,
            ..Snapshot::default()
        };
        for kv in read.entries {
            let Ok(key) = std::str::from_utf8(&kv.key) else {
                continue;
            };
            match self.layout.parse(key) {
                Some(Key::Info { node }) => {
                    if let Ok(r) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                        snap.nodes.insert(node.to_owned(), r);
                    }
                }
                Some(Key::Service { node, name }) => {
                    snap.specs.insert(
                        (name.to_owned(), node.to_owned()),
                        (kv.value, kv.mod_revision),
                    );
                }
                Some(Key::Status { node, name }) => {
                    if let Ok(s) = serde_json::from_slice::<StatusRecord>(&kv.value) {
                        snap.statuses.insert((name.to_owned(), node.to_owned()), s);
                    }
                }
                None => {}
            }
        }
        Ok(snap)
    }

    async fn nodes(&mut self, format: Format, out: &mut dyn Write) -> anyhow::Result<Outcome> {
        let snap = self.snapshot().await?;
        if format == Format::Json {
            let nodes: Vec<&NodeRecord> = snap.nodes.values().collect();
            render::write_json(out, &nodes)?;
            return Ok(Outcome::Success);
        }
        let mut t = Table::new(vec![
            "NODE",
            "LABELS",
            "CPU",
            "MEMORY",
            "FREE CPU",
            "FREE MEMORY",
            "SERVICES",
            "INSTANCES",
            "VERSION",
            "LAST SEEN",
        ]);
        for (name, n) in &snap.nodes {
            let free = n.free();
            t.row(vec![
                name.clone(),
                labels_text(&n.labels),
                format!("{}", n.capacity.cpu),
                human_bytes(n.capacity.memory),
                format!("{:.2}", free.cpu),
                human_bytes(free.memory),
                n.services.to_string(),
                n.instances.to_string(),
                n.version.clone(),
                ago(n.updated_unix_ms),
            ]);
        }
        t.write(out)?;
        Ok(Outcome::Success)
    }

    async fn apply(
        &mut self,
        a: &FleetApplyArgs,
        format: Format,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> anyhow::Result<Outcome> {
        let (text, name) = read_spec(&a.file)?;
        let need = demand(&text);
        // The choice and the write in one transaction that holds only if no spec key of a
        // chosen node changed since the read: two applies at once cannot both count the
        // same free capacity; the one that loses reads again and chooses again.
        let mut attempt = 0;
        let mut partly = false;
        let mut conflicts = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
        let (chosen, holding, revision) = loop {
            attempt += 1;
            let snap = self.snapshot().await?;
            let holding = snap.holding(&name);
            let chosen = self.choose(a, &name, &snap, &holding, &need, err)?;
            // etcd refuses a transaction of more than --max-txn-ops (128 by default)
            // compares or operations, or of more than --max-request-bytes (1.5 MiB): a larger
            // placement is written in transactions within both, each guarded for its own
            // nodes (a node's compare and its put go together). A conflict in any of them
            // reads and chooses again; the nodes already written then hold the service and
            // are written again with the same spec.
            // Sent at once (up to TXNS_IN_FLIGHT): a later transaction does not wait behind
            // the agents that the earlier ones woke. Each is built once its turn comes, so
            // the spec is copied per node only for the transactions in flight.
            let costs: Vec<TxnCost> = chosen
                .iter()
                .map(|n| {
                    let key = self.layout.service(n, &name);
                    // The guard's prefix and its range end, the key and the spec.
                    let bytes = 2 * self.layout.services_prefix(n).len() + key.len() + text.len();
                    TxnCost {
                        key,
                        compares: 1,
                        ops: 1,
                        bytes,
                    }
                })
                .collect();
            let runs = bulk::split_txns(&costs, self.limits)?;
            let mut txns = tokio::task::JoinSet::new();
            let turns = std::sync::Arc::new(tokio::sync::Semaphore::new(TXNS_IN_FLIGHT));
            let shared = std::sync::Arc::new((self.layout.clone(), name.clone(), text.clone()));
            for run in runs {
                let part = chosen[run].to_vec();
                let (turns, shared) = (turns.clone(), shared.clone());
                let revision = snap.revision;
                let mut client = self.client.clone();
                txns.spawn(async move {
                    // Never closed: a permit, or an error that lets the send go ahead.
                    let _turn = turns.acquire_owned().await;
                    let (layout, name, text) = &*shared;
                    let guards: Vec<Compare> = part
                        .iter()
                        .map(|n| {
                            Compare::mod_revision(
                                layout.services_prefix(n),
                                CompareOp::Less,
                                revision + 1,
                            )
                            .with_prefix()
                        })
                        .collect();
                    let ops: Vec<TxnOp> = part
                        .iter()
                        .map(|n| TxnOp::put(layout.service(n, name), text.as_str(), None))
                        .collect();
                    call(
                        "writing the service's keys",
                        client.txn(Txn::new().when(guards).and_then(ops)),
                    )
                    .await
                });
            }
            let mut written = chosen.is_empty().then_some(snap.revision);
            let mut lost = false;
            while let Some(done) = txns.join_next().await {
                let resp = done
                    .context("writing the service's keys")?
                    .map_err(|e| beyond_limits(e, self.limits))?;
                if resp.succeeded() {
                    partly = true;
                    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                    written = Some(written.unwrap_or(0).max(revision));
                } else {
                    lost = true;
                }
            }
            if lost {
                written = None;
            }
            if let Some(revision) = written {
                break (chosen, holding, revision);
            }
            if attempt >= APPLY_ATTEMPTS {
                let written = if partly {
                    "some of the chosen nodes were written (see corral fleet ls)"
                } else {
                    "nothing was written"
                };
                bail!(
                    "{name}: the chosen nodes' services changed {APPLY_ATTEMPTS} times while choosing; \
                     {written} (try again)"
                );
            }
            tokio::time::sleep(conflicts.next_delay()).await;
        };
        let also_on: Vec<String> = holding
            .iter()
            .filter(|n| !chosen.contains(n))
            .cloned()
            .collect();
        match format {
            Format::Json => render::write_json(
                out,
                &WrittenView {
                    service: &name,
                    nodes: &chosen,
                    revision,
                    also_on,
                },
            )?,
            Format::Table => {
                writeln!(
                    out,
                    "{name}: written to {} (revision {revision})",
                    chosen.join(", ")
                )?;
                if !also_on.is_empty() {
                    writeln!(
                        out,
                        "{name}: also on {} (not chosen; corral fleet delete {name} --node ... removes it there)",
                        also_on.join(", ")
                    )?;
                }
            }
        }
        Ok(Outcome::Success)
    }

    /// The nodes `a` names, or those its selector picks from `snap`.
    fn choose(
        &self,
        a: &FleetApplyArgs,
        name: &str,
        snap: &Snapshot,
        holding: &BTreeSet<String>,
        need: &Resources,
        err: &mut dyn Write,
    ) -> anyhow::Result<Vec<String>> {
        if let Some(sel) = &a.selector {
            let selector = Selector::parse(sel)?;
            let nodes = snap.nodes_for_placement(name);
            let picked = placement::pick(
                &nodes,
                &selector,
                a.count.map(|c| c as usize),
                a.spread.as_deref(),
                holding,
                need,
            )?;
            if picked.is_empty() {
                bail!("--selector {sel}: no registered node matches (see corral fleet nodes)");
            }
            return Ok(picked);
        }
        let mut nodes = Vec::new();
        for n in &a.node {
            if !corral_fleet::keys::valid_node_name(n) {
                return Err(corral_fleet::keys::KeyError::Node(n.clone()).into());
            }
            if !snap.nodes.contains_key(n) {
                writeln!(
                    err,
                    "warning: node {n} is not registered now; its agent runs the service when it joins"
                )?;
            }
            if !nodes.contains(n) {
                nodes.push(n.clone());
            }
        }
        Ok(nodes)
    }

    async fn ls(&mut self, format: Format, out: &mut dyn Write) -> anyhow::Result<Outcome> {
        let snap = self.snapshot().await?;
        let pairs: BTreeSet<(String, String)> = snap
            .specs
            .keys()
            .chain(snap.statuses.keys())
            .cloned()
            .collect();
        if format == Format::Json {
            let views: Vec<PlacementView> = pairs
                .iter()
                .map(|(s, n)| PlacementView {
                    service: s,
                    node: n,
                    spec_revision: snap.specs.get(&(s.clone(), n.clone())).map(|(_, r)| *r),
                    node_registered: snap.nodes.contains_key(n),
                    status: snap.statuses.get(&(s.clone(), n.clone())),
                })
                .collect();
            render::write_json(out, &views)?;
            return Ok(Outcome::Success);
        }
        let nodes: BTreeSet<&String> = pairs.iter().map(|(_, n)| n).collect();
        let services: BTreeSet<&String> = pairs.iter().map(|(s, _)| s).collect();
        let mut header = vec!["SERVICE".to_owned()];
        header.extend(nodes.iter().map(|n| n.to_uppercase()));
        let mut t = Table::with_header(header);
        for s in services {
            let mut row = vec![s.clone()];
            for n in &nodes {
                let key = (s.clone(), (*n).clone());
                let c = cell(
                    snap.specs.get(&key).map(|(_, r)| *r),
                    snap.statuses.get(&key),
                    snap.nodes.contains_key(*n),
                );
                row.push(if c.is_empty() { "-".to_owned() } else { c });
            }
            t.row(row);
        }
        t.write(out)?;
        // Why each refused or retried spec is not running, under the matrix.
        for ((service, node), status) in &snap.statuses {
            let current = snap
                .specs
                .get(&(service.clone(), node.clone()))
                .is_some_and(|(_, rev)| *rev == status.spec_revision);
            if current && !status.error.is_empty() {
                writeln!(
                    out,
                    "{service} on {node}: {}: {}",
                    status.state.as_str(),
                    status.error
                )?;
            }
        }
        Ok(Outcome::Success)
    }

    async fn delete(
        &mut self,
        a: &FleetDeleteArgs,
        format: Format,
        out: &mut dyn Write,
    ) -> anyhow::Result<Outcome> {
        let snap = self.snapshot().await?;
        let holding = snap.holding(&a.name);
        let nodes: Vec<String> = if a.node.is_empty() {
            holding.into_iter().collect()
        } else {
            a.node
                .iter()
                .filter(|n| holding.contains(*n))
                .cloned()
                .collect()
        };
        if nodes.is_empty() {
            bail!(
                "service {:?} is on no node{} (see corral fleet ls)",
                a.name,
                if a.node.is_empty() {
                    String::new()
                } else {
                    format!(" of {}", a.node.join(", "))
                }
            );
        }
        // Within --max-txn-ops and --max-request-bytes a transaction; an error half-way leaves
        // the rest to a second delete, which finds only the nodes that still hold the service.
        let costs: Vec<TxnCost> = nodes
            .iter()
            .map(|n| {
                let key = self.layout.service(n, &a.name);
                TxnCost {
                    bytes: key.len(),
                    key,
                    compares: 0,
                    ops: 1,
                }
            })
            .collect();
        let mut revision = 0;
        for run in bulk::split_txns(&costs, self.limits)? {
            let ops: Vec<TxnOp> = nodes[run]
                .iter()
                .map(|n| TxnOp::delete(self.layout.service(n, &a.name), None))
                .collect();
            let resp = call(
                "deleting the service's keys",
                self.client.txn(Txn::new().and_then(ops)),
            )
            .await
            .map_err(|e| beyond_limits(e, self.limits))?;
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        match format {
            Format::Json => render::write_json(
                out,
                &WrittenView {
                    service: &a.name,
                    nodes: &nodes,
                    revision,
                    also_on: Vec::new(),
                },
            )?,
            Format::Table => writeln!(
                out,
                "{}: deleted from {} (revision {revision})",
                a.name,
                nodes.join(", ")
            )?,
        }
        Ok(Outcome::Success)
    }

    /// Retry `f` (an etcd read or write that may fail while etcd elects a leader, or when
    /// its member dies) with backoff until `deadline`, connecting again between attempts.
    async fn retrying<T, F, Fut>(&mut self, deadline: Instant, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
        loop {
            match f(self.client.clone()).await {
                Ok(v) => return Ok(v),
                // The last error is the one reported, once the deadline is near.
                Err(_) if Instant::now() + backoff.ceiling() < deadline => {
                    tokio::time::sleep(backoff.next_delay()).await;
                    // The member may be gone: pick one that answers (the same one if it
                    // still does; when none does, the next attempt says why).
                    if let Ok(Ok(c)) =
                        tokio::time::timeout(REQUEST_TIMEOUT, self.cfg.connect()).await
                    {
                        self.client = c;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn rollout(
        &mut self,
        a: &FleetRolloutArgs,
        format: Format,
        out: &mut dyn Write,
    ) -> anyhow::Result<Outcome> {
        let (text, name) = read_spec(&a.file)?;
        if name != a.name {
            bail!(
                "{}: name: {name:?}, but the rollout is of {:?}",
                a.file.display(),
                a.name
            );
        }
        let snap = self.snapshot().await?;
        let nodes: Vec<String> = snap.holding(&name).into_iter().collect();
        if nodes.is_empty() {
            bail!("service {name:?} is on no node: place it first (corral fleet apply)");
        }
        // Each node's write compares the spec, then reads or puts it: one transaction that
        // carries the spec twice. Checked before the first node is written.
        let costs: Vec<TxnCost> = nodes
            .iter()
            .map(|n| {
                let key = self.layout.service(n, &name);
                TxnCost {
                    bytes: 3 * key.len() + 2 * text.len(),
                    key,
                    compares: 1,
                    ops: 1,
                }
            })
            .collect();
        bulk::split_txns(&costs, self.limits)?;
        let mut done: Vec<(String, i64)> = Vec::new();
        for batch in nodes.chunks(a.max_unavailable_nodes as usize) {
            let deadline = Instant::now() + a.timeout;
            let mut written = Vec::new();
            for node in batch {
                let key = self.layout.service(node, &name);
                let rev = self
                    .retrying(deadline, |c| write_if_changed(c, key.clone(), text.clone()))
                    .await
                    .with_context(|| format!("{node}: writing the new spec"))?;
                if format == Format::Table {
                    writeln!(
                        out,
                        "{node}: spec at revision {rev}, waiting for it to be healthy"
                    )?;
                    out.flush()?;
                }
                written.push((node.clone(), rev));
            }
            let status_keys: Vec<(String, i64, String)> = written
                .iter()
                .map(|(n, r)| (n.clone(), *r, self.layout.status(n, &name)))
                .collect();
            let mut pending: Vec<(String, i64, String)> = status_keys;
            while !pending.is_empty() {
                if Instant::now() >= deadline {
                    let names: Vec<&str> = pending.iter().map(|(n, _, _)| n.as_str()).collect();
                    writeln!(
                        out,
                        "{name}: stopped: {} not healthy at the new revision within {}; nodes not yet updated keep the old spec",
                        names.join(", "),
                        humantime::format_duration(a.timeout)
                    )?;
                    return Ok(Outcome::Failed);
                }
                let mut still = Vec::new();
                for (node, rev, key) in pending {
                    let status = self
                        .retrying(deadline, |mut c| {
                            let key = key.clone();
                            async move {
                                let r = call("reading a status key", c.get(key, None)).await?;
                                Ok(r.kvs().first().and_then(|kv| {
                                    serde_json::from_slice::<StatusRecord>(kv.value()).ok()
                                }))
                            }
                        })
                        .await
                        .with_context(|| format!("{node}: reading its status"))?;
                    match status {
                        Some(s) if s.converged(rev) => {
                            if format == Format::Table {
                                writeln!(
                                    out,
                                    "{node}: {}/{} healthy at revision {rev}",
                                    s.healthy, s.desired
                                )?;
                                out.flush()?;
                            }
                            done.push((node, rev));
                        }
                        Some(s) if s.failed(rev).is_some() => {
                            let why = s.failed(rev).unwrap_or_default();
                            writeln!(
                                out,
                                "{name}: stopped at {node}: {why}; nodes not yet updated keep the old spec"
                            )?;
                            return Ok(Outcome::Failed);
                        }
                        _ => still.push((node, rev, key)),
                    }
                }
                pending = still;
                if !pending.is_empty() {
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        match format {
            Format::Json => render::write_json(
                out,
                &serde_json::json!({
                    "service": name,
                    "nodes": done.iter().map(|(n, r)| serde_json::json!({"node": n, "spec_revision": r})).collect::<Vec<_>>(),
                }),
            )?,
            Format::Table => writeln!(out, "{name}: rolled out to {} node(s)", done.len())?,
        }
        Ok(Outcome::Success)
    }
}

/// Write `text` to `key` unless it already holds exactly that; the key's mod revision either
/// way. The write compares the value so that a retry after an answer lost in a leader change
/// does not write twice.
async fn write_if_changed(mut c: Client, key: String, text: String) -> anyhow::Result<i64> {
    let txn = Txn::new()
        .when(vec![Compare::value(
            key.clone(),
            CompareOp::Equal,
            text.clone(),
        )])
        .and_then(vec![TxnOp::get(key.clone(), None)])
        .or_else(vec![TxnOp::put(key.clone(), text, None)]);
    let resp = call("writing the new spec", c.txn(txn)).await?;
    if !resp.succeeded() {
        return Ok(resp.header().map(|h| h.revision()).unwrap_or(0));
    }
    // Unchanged: the revision it was written at.
    for r in resp.op_responses() {
        if let corral_fleet::etcd_client::TxnOpResponse::Get(g) = r
            && let Some(kv) = g.kvs().first()
        {
            return Ok(kv.mod_revision());
        }
    }
    bail!("etcd answered the spec comparison without the key")
}
