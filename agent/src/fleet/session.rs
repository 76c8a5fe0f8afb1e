//! The fleet task: one session with etcd at a time (register, keep the lease alive, watch,
//! apply, write status), and between sessions a backoff with jitter. Every etcd call has a
//! deadline; a session that fails in any way ends, the link is reported disconnected, and
//! instances are left exactly as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use corral_fleet::backoff::Backoff;
use corral_fleet::bulk;
use corral_fleet::connect::describe;
use corral_fleet::etcd_client::{Client, EventType, PutOptions, WatchOptions, WatchStream};
use corral_fleet::keys::Key;
use corral_fleet::records::{ApplyState, NodeRecord, Resources, StatusRecord};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::ledger::Ledger;
use super::services::{Refusal, Services, Summary};
use super::{FleetConfig, FleetDeps, FleetShared};
use crate::spec;
use crate::supervisor::Owner;

/// Deadline of one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor's event index is looked at for changes to report.
const STATUS_TICK: Duration = Duration::from_millis(500);
/// At most one write per status key in this time.
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// At most one rewrite of the node's record (other than registration) in this time.
const INFO_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Largest spec read from etcd, as through the API.
const MAX_SPEC: usize = 1 << 20;
/// Retrying a spec that failed for a passing reason.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A status key as last written.
#[derive(Debug)]
struct Written {
    record: StatusRecord,
    at: Instant,
}

/// A spec left to retry, with its value (the watch will not bring it again).
#[derive(Debug)]
struct Pending {
    value: Vec<u8>,
    backoff: Backoff,
    due: Instant,
}

/// The fleet task for one node.
#[derive(Debug)]
pub struct Fleet<S: Services> {
    cfg: FleetConfig,
    services: S,
    deps: FleetDeps,
    shared: FleetShared,
    ledger: Ledger,
    statuses: BTreeMap<String, Written>,
    pending: BTreeMap<String, Pending>,
    info: Option<(NodeRecord, Instant)>,
    /// The supervisor's event index at the last status pass: unchanged means nothing to report.
    seen_index: Option<u64>,
    /// Something is still to be written (a write deferred by the rate limit, a new outcome).
    dirty: bool,
    /// Status keys of services whose spec key was deleted, to delete.
    orphans: BTreeSet<String>,
    /// What the node's services ask for, and how many services and running instances it
    /// has, as of the last status pass.
    committed: Resources,
    /// The part of `committed` local services ask for.
    committed_local: Resources,
    counts: (u32, u32),
    boot_id: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(crate::num::millis)
        .unwrap_or(0)
}

/// One etcd call with a deadline, its error as a sentence.
async fn call<T>(
    what: &str,
    f: impl Future<Output = Result<T, corral_fleet::etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", describe(&e))),
        Err(_) => Err(format!(
            "{what}: no answer from etcd within {REQUEST_TIMEOUT:?}"
        )),
    }
}

/// The kind of a watch event; the client panics on a kind it does not know, which is
/// contained here (such an event is skipped).
fn event_type(e: &corral_fleet::etcd_client::Event) -> Option<EventType> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.event_type())).ok()
}

/// The spec in a `services/<name>` key, or why it is refused.
fn decode(name: &str, value: &[u8]) -> Result<spec::ServiceSpec, String> {
    if value.len() > MAX_SPEC {
        return Err(format!(
            "the spec is {} bytes, larger than the {MAX_SPEC}-byte limit",
            value.len()
        ));
    }
    let text = std::str::from_utf8(value)
        .map_err(|e| format!("the spec is not UTF-8 text (a TOML spec is expected): {e}"))?;
    let spec = spec::parse_toml(text).map_err(|e| format!("invalid spec: {e}"))?;
    if spec.name != name {
        return Err(format!(
            "name: {:?} differs from the key's service name {name:?} (the key names the service)",
            spec.name
        ));
    }
    Ok(spec)
}

/// The status record of one service key.
fn status_record(
    name: &str,
    entry: &super::ledger::Entry,
    running: Option<&Summary>,
) -> StatusRecord {
    let mut r = StatusRecord {
        service: name.to_string(),
        spec_revision: entry.spec_revision,
        state: entry.state,
        error: entry.error.clone(),
        updated_unix_ms: 0,
        ..Default::default()
    };
    if let Some(s) = running.filter(|s| s.owner == Owner::Etcd) {
        r.revision = s.revision;
        r.desired = s.desired;
        r.running = s.running;
        r.healthy = s.healthy;
        r.health = s.health.clone();
        r.rollout = s.rollout.clone();
    }
    r
}

/// What the services ask for: each limit × replicas (unlimited counts nothing).
fn committed<'a>(list: impl IntoIterator<Item = &'a Summary>) -> Resources {
    let mut c = Resources::default();
    for s in list {
        c.cpu += s.cpu.unwrap_or(0.0) * f64::from(s.desired);
        c.memory = c
            .memory
            .saturating_add(s.memory.unwrap_or(0).saturating_mul(u64::from(s.desired)));
    }
    c
}

impl<S: Services> Fleet<S> {
    pub fn new(
        cfg: FleetConfig,
        services: S,
        deps: FleetDeps,
        ledger: Ledger,
    ) -> (Fleet<S>, FleetShared) {
        let shared = FleetShared::new(&cfg.node, &cfg.etcd.endpoints, ledger.revision);
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let fleet = Fleet {
            cfg,
            services,
            deps,
            shared: shared.clone(),
            ledger,
            statuses: BTreeMap::new(),
            pending: BTreeMap::new(),
            info: None,
            seen_index: None,
            dirty: true,
            orphans: BTreeSet::new(),
            committed: Resources::default(),
            committed_local: Resources::default(),
            counts: (0, 0),
            boot_id,
        };
        (fleet, shared)
    }

    /// Sessions one after the other until `shutdown`, with backoff and jitter between them.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        loop {
            let mut connected = false;
            // The session watches `shutdown` itself, to leave the registry on the way out.
            let result = self.session(&shutdown, &mut connected).await;
            let reason = match result {
                Ok(()) => return,
                Err(reason) => self.cfg.etcd.explain(reason),
            };
            if connected {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                node = %self.cfg.node,
                attempt = backoff.failures(),
                retry_in_ms = crate::num::millis(delay),
                "fleet: disconnected from etcd, instances keep running: {reason}"
            );
            self.shared.disconnected(reason);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn save_ledger(&self) -> Result<(), String> {
        self.shared.set_revision(self.ledger.revision);
        self.ledger
            .save(self.deps.store.as_ref())
            .map_err(|e| format!("saving the fleet ledger: {e}"))
    }

    /// One session; `Err` with the reason it ended.
    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        connected: &mut bool,
    ) -> Result<(), String> {
        let start = async {
            let mut client = self.cfg.etcd.connect().await.map_err(|e| e.to_string())?;
            let ttl = i64::try_from(self.cfg.lease_ttl.as_secs().max(2)).unwrap_or(i64::MAX);
            let lease = call("granting the node's lease", client.lease_grant(ttl, None))
                .await?
                .id();
            // Every session starts with a fresh status pass: the keys may have changed
            // meanwhile.
            self.statuses.clear();
            self.info = None;
            self.dirty = true;
            self.write_info(&mut client, lease, true).await?;
            let keepalive = spawn_keepalive(client.clone(), lease, self.cfg.lease_ttl);
            let watch = self.sync(&mut client).await?;
            Ok::<_, String>((client, lease, keepalive, watch))
        };
        let (mut client, lease, (mut lease_lost, _keepalive), mut watch) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            started = start => started?,
        };
        self.shared.connected();
        *connected = true;
        tracing::info!(
            node = %self.cfg.node,
            revision = self.ledger.revision,
            services = self.ledger.services.len(),
            "fleet: registered and watching"
        );
        let mut tick = tokio::time::interval(STATUS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // The node leaves the registry now rather than at the lease's expiry.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.lease_revoke(lease),
                    )
                    .await;
                    return Ok(());
                }
                why = &mut lease_lost => {
                    return Err(why.unwrap_or_else(|_| "the lease keep-alive task ended".into()));
                }
                msg = watch.message() => {
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return Err("etcd closed the watch".into()),
                        Err(e) => return Err(format!("watching: {}", describe(&e))),
                    };
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            tracing::info!(
                                node = %self.cfg.node,
                                from = self.ledger.revision + 1,
                                compacted = resp.compact_revision(),
                                "fleet: the revision to resume from was compacted; reading every key again"
                            );
                            watch = self.full_read(&mut client).await?;
                            continue;
                        }
                        return Err(format!("etcd cancelled the watch: {}", resp.cancel_reason()));
                    }
                    self.on_events(resp.events()).await?;
                    // Report what was just applied or refused now rather than at the next
                    // tick (each key still at most once a second).
                    self.write_statuses(&mut client, lease).await?;
                }
                _ = tick.tick() => {
                    self.retry_due().await?;
                    self.write_statuses(&mut client, lease).await?;
                }
            }
        }
    }

    /// Catch up: a watch from the revision after the last one handled, or a full read when
    /// nothing was handled yet or a spec is waiting to be retried (its value is not kept).
    async fn sync(&mut self, client: &mut Client) -> Result<WatchStream, String> {
        let retrying = self
            .ledger
            .services
            .values()
            .any(|e| e.state == ApplyState::Retrying);
        if self.ledger.revision == 0 || (retrying && self.pending.is_empty()) {
            return self.full_read(client).await;
        }
        self.watch_from(client, self.ledger.revision + 1).await
    }

    async fn watch_from(&self, client: &mut Client, from: i64) -> Result<WatchStream, String> {
        let prefix = self.cfg.layout.services_prefix(&self.cfg.node);
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        call(
            "watching the node's services",
            client.watch(prefix, Some(options)),
        )
        .await
    }

    /// Read every `services/` key of the node (in pages, at one revision), converge to it,
    /// and watch from the revision after.
    async fn full_read(&mut self, client: &mut Client) -> Result<WatchStream, String> {
        let prefix = self.cfg.layout.services_prefix(&self.cfg.node);
        let read = bulk::read_prefix(client, &prefix, self.cfg.page, REQUEST_TIMEOUT)
            .await
            .map_err(|e| format!("reading the node's services: {e}"))?;
        let revision = read.revision;
        tracing::debug!(
            node = %self.cfg.node,
            keys = read.entries.len(),
            requests = read.requests,
            revision,
            "fleet: read every service key"
        );
        let mut present = BTreeSet::new();
        let mut puts = Vec::new();
        for kv in read.entries {
            let Some(name) = self.service_name(&kv.key) else {
                continue;
            };
            present.insert(name.clone());
            puts.push((name, kv.value, kv.mod_revision));
        }
        let present_ref: BTreeSet<&str> = present.iter().map(String::as_str).collect();
        for name in self.ledger.gone(&present_ref) {
            self.on_delete(&name).await;
        }
        for (name, value, rev) in puts {
            self.on_put(&name, &value, rev).await;
        }
        self.ledger.revision = self.ledger.revision.max(revision);
        self.save_ledger()?;
        self.watch_from(client, revision + 1).await
    }

    /// The service a key of this node names, if it is one.
    fn service_name(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        match self.cfg.layout.parse(key)? {
            Key::Service { node, name } if node == self.cfg.node => Some(name.to_string()),
            _ => None,
        }
    }

    async fn on_events(
        &mut self,
        events: &[corral_fleet::etcd_client::Event],
    ) -> Result<(), String> {
        let mut max_rev = self.ledger.revision;
        for e in events {
            let Some(kv) = e.kv() else { continue };
            max_rev = max_rev.max(kv.mod_revision());
            let Some(name) = self.service_name(kv.key()) else {
                continue;
            };
            match event_type(e) {
                Some(EventType::Put) => self.on_put(&name, kv.value(), kv.mod_revision()).await,
                Some(EventType::Delete) => self.on_delete(&name).await,
                None => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "fleet: watch event of an unknown kind, skipped")
                }
            }
        }
        self.ledger.revision = max_rev;
        self.save_ledger()
    }

    /// A spec written at `rev`: apply it unless it was already handled.
    async fn on_put(&mut self, name: &str, value: &[u8], rev: i64) {
        if !self.ledger.needs_apply(name, rev) {
            return;
        }
        // The key is back: its status key is to be written, not deleted.
        self.orphans.remove(name);
        let outcome = match decode(name, value) {
            Err(reason) => Err(Refusal::Refused(reason)),
            Ok(spec) => self.services.apply(spec).await,
        };
        let (state, error) = match outcome {
            Ok(()) => {
                self.pending.remove(name);
                tracing::info!(service = name, spec_revision = rev, "fleet: applied");
                (ApplyState::Applied, String::new())
            }
            Err(Refusal::Refused(reason)) => {
                self.pending.remove(name);
                tracing::warn!(
                    service = name,
                    spec_revision = rev,
                    "fleet: spec refused: {reason}"
                );
                (ApplyState::Refused, reason)
            }
            Err(Refusal::Retry(reason)) => {
                let p = self
                    .pending
                    .entry(name.to_string())
                    .or_insert_with(|| Pending {
                        value: value.to_vec(),
                        backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
                        due: Instant::now(),
                    });
                p.value = value.to_vec();
                p.due = Instant::now() + p.backoff.next_delay();
                tracing::warn!(
                    service = name,
                    spec_revision = rev,
                    "fleet: applying failed, will retry: {reason}"
                );
                (ApplyState::Retrying, reason)
            }
        };
        self.ledger.record(name, rev, state, error);
        self.dirty = true;
    }

    /// A spec key deleted: the fleet's service leaves the node (a local one of that name
    /// stays); its status key goes too (at the next status pass).
    async fn on_delete(&mut self, name: &str) {
        if !self.ledger.services.contains_key(name) {
            return;
        }
        if let Err(Refusal::Refused(e) | Refusal::Retry(e)) = self.services.delete(name).await {
            // The key is gone and the service still runs; it is tried again at the next full
            // read (the entry stays).
            tracing::warn!(service = name, "fleet: removing the service failed: {e}");
            return;
        }
        tracing::info!(service = name, "fleet: removed (its key was deleted)");
        self.ledger.services.remove(name);
        self.pending.remove(name);
        self.statuses.remove(name);
        self.dirty = true;
        self.orphans.insert(name.to_string());
    }

    async fn retry_due(&mut self) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<(String, Vec<u8>)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, p)| (n.clone(), p.value.clone()))
            .collect();
        for (name, value) in due {
            let Some(rev) = self.ledger.services.get(&name).map(|e| e.spec_revision) else {
                self.pending.remove(&name);
                continue;
            };
            self.on_put(&name, &value, rev).await;
        }
        Ok(())
    }

    /// Write what changed: each status key whose report differs from the last written (at
    /// most once a second each), status keys of removed services deleted, and the node's
    /// record when what it says changed (at most every 5 s). Nothing when nothing changed:
    /// an idle node makes no etcd request but its lease's keep-alives.
    async fn write_statuses(&mut self, client: &mut Client, lease: i64) -> Result<(), String> {
        let index = self.deps.events.next();
        if !self.dirty && self.seen_index == Some(index) {
            return Ok(());
        }
        let list = match self.services.list().await {
            Ok(l) => l,
            Err(Refusal::Refused(e) | Refusal::Retry(e)) => {
                tracing::debug!("fleet: reading the services for status: {e}");
                return Ok(());
            }
        };
        self.seen_index = Some(index);
        self.dirty = false;
        let by_name: BTreeMap<&str, &Summary> = list.iter().map(|s| (s.name.as_str(), s)).collect();
        let now = Instant::now();
        // Each forgotten only once deleted: a failure leaves the rest for the next session.
        while let Some(orphan) = self.orphans.first().cloned() {
            let key = self.cfg.layout.status(&self.cfg.node, &orphan);
            call("deleting a status key", client.delete(key, None)).await?;
            self.orphans.remove(&orphan);
        }
        let entries: Vec<(String, super::ledger::Entry)> = self
            .ledger
            .services
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        for (name, entry) in entries {
            let mut record = status_record(&name, &entry, by_name.get(name.as_str()).copied());
            if let Some(w) = self.statuses.get(&name) {
                if w.record.same_as(&record) {
                    continue;
                }
                if now.duration_since(w.at) < STATUS_MIN_INTERVAL {
                    self.dirty = true;
                    continue;
                }
            }
            record.updated_unix_ms = now_ms();
            let key = self.cfg.layout.status(&self.cfg.node, &name);
            let value = serde_json::to_vec(&record).expect("a status record always serializes");
            call("writing a status key", client.put(key, value, None)).await?;
            self.statuses.insert(name, Written { record, at: now });
        }
        self.committed = committed(&list);
        self.committed_local = committed(list.iter().filter(|s| s.owner != Owner::Etcd));
        self.counts = (
            crate::num::count_u32(list.len()),
            list.iter().map(|s| s.running).sum::<u32>(),
        );
        self.write_info(client, lease, false).await
    }

    /// The node's record under the lease: at registration, and when it changed.
    async fn write_info(
        &mut self,
        client: &mut Client,
        lease: i64,
        force: bool,
    ) -> Result<(), String> {
        let host = self.deps.host.snapshot();
        let policy = &self.deps.capacity;
        let (capacity, limit) = (policy.capacity, policy.limit());
        let record = NodeRecord {
            node: self.cfg.node.clone(),
            labels: self.cfg.labels.clone(),
            capacity: Resources {
                cpu: capacity.cpu,
                memory: capacity.memory,
            },
            allocatable: Resources {
                cpu: limit.cpu,
                memory: limit.memory,
            },
            committed: self.committed,
            committed_local: Some(self.committed_local),
            services: self.counts.0,
            instances: self.counts.1,
            version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: self.boot_id.clone(),
            hostname: host.hostname,
            updated_unix_ms: 0,
        };
        if !force && let Some((last, at)) = &self.info {
            if *last == record {
                return Ok(());
            }
            if at.elapsed() < INFO_MIN_INTERVAL {
                self.dirty = true;
                return Ok(());
            }
        }
        let mut written = record.clone();
        written.updated_unix_ms = now_ms();
        let value = serde_json::to_vec(&written).expect("a node record always serializes");
        let key = self.cfg.layout.info(&self.cfg.node);
        call(
            "registering the node",
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        self.info = Some((record, Instant::now()));
        Ok(())
    }
}

/// Keep `lease` alive from its own task (a slow apply never delays it): a keep-alive every
/// quarter of the TTL; resolves with the reason when etcd stops answering for half the TTL,
/// says the lease expired, or the stream breaks.
/// The task stops when the returned guard is dropped (the session ended).
fn spawn_keepalive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
) -> (oneshot::Receiver<String>, AbortOnDrop) {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let reason = async {
            let (mut keeper, mut stream) =
                call("keeping the lease alive", client.lease_keep_alive(lease)).await?;
            let every = (ttl / 4).max(Duration::from_millis(250));
            let patience = ttl / 2;
            let mut last_answer = Instant::now();
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if last_answer.elapsed() > patience {
                            return Err::<(), String>(format!(
                                "etcd did not answer the lease keep-alive for {:?}",
                                last_answer.elapsed()
                            ));
                        }
                        if let Err(e) = keeper.keep_alive().await {
                            return Err(format!("lease keep-alive: {}", describe(&e)));
                        }
                    }
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) if resp.ttl() > 0 => last_answer = Instant::now(),
                        Ok(Some(_)) => return Err("the node's lease expired".into()),
                        Ok(None) => return Err("etcd closed the lease keep-alive stream".into()),
                        Err(e) => return Err(format!("lease keep-alive: {}", describe(&e))),
                    }
                }
            }
        }
        .await;
        if let Err(reason) = reason {
            let _ = tx.send(reason);
        }
    });
    (rx, AbortOnDrop(task))
}

/// Aborts its task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
