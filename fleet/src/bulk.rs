//! Reading and writing many keys within etcd's limits. A whole prefix is read in pages of a
//! bounded number of keys, every page at the revision of the first, so the read is one
//! consistent snapshot however large the fleet (one range request of every key passes the
//! client's 4 MiB message limit at a few thousand nodes). Writes are split into transactions
//! that stay within etcd's `--max-txn-ops` and `--max-request-bytes`.
//!
//! The paging logic sees etcd through [`Ranges`] only, so it is tested against an in-memory
//! store; [`EtcdRanges`] is the real one. Imports nothing from the agent or the CLI.

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use etcd_client::{Client, GetOptions};

use crate::connect::describe;
use crate::keys::prefix_end;

/// Keys per page of a prefix read, unless told otherwise.
pub const DEFAULT_PAGE: usize = 500;
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// How often a prefix read starts again when the revision it reads at was compacted away
/// between two of its pages.
pub const COMPACTED_RESTARTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("reading {prefix}: {reason}")]
    Read { prefix: String, reason: String },
    #[error(
        "reading {prefix}: the key after {after:?} is larger than one response may be ({reason}); \
         remove or shrink that key"
    )]
    KeyTooLarge {
        prefix: String,
        after: String,
        reason: String,
    },
    #[error(
        "reading {prefix}: etcd compacted the revision being read {times} times in a row \
         ({reason}); try again, or compact etcd less often"
    )]
    Compacted {
        prefix: String,
        times: u32,
        reason: String,
    },
    #[error(
        "{key}: {size} bytes to write, more than one transaction may carry ({budget} bytes: 2/3 \
         of --etcd-max-request-bytes {max_request_bytes}, the rest left for framing); raise \
         etcd's --max-request-bytes and --etcd-max-request-bytes to match, or shrink the spec"
    )]
    TooLargeForATransaction {
        key: String,
        size: usize,
        budget: usize,
        max_request_bytes: usize,
    },
    #[error(
        "{key}: {ops} operations or compares that must go together, more than \
         --etcd-max-txn-ops {max_ops}; raise etcd's --max-txn-ops and --etcd-max-txn-ops to match"
    )]
    TooManyOps {
        key: String,
        ops: usize,
        max_ops: usize,
    },
}

/// One key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// Every key of a prefix, read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixRead {
    pub entries: Vec<Entry>,
    /// The revision every page was read at.
    pub revision: i64,
    /// Range requests made (pages, retries and restarts included).
    pub requests: u32,
}

/// One range request: the keys in `[start, end)`, at most `limit`, at `revision` (0: the
/// newest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub limit: usize,
    pub revision: i64,
}

/// What one range request returned: up to `limit` keys in key order, whether more follow,
/// and the revision it was read at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangePage {
    pub entries: Vec<Entry>,
    pub more: bool,
    pub revision: i64,
}

/// Why a range request failed, as far as paging cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The response would pass a message size limit: ask for fewer keys.
    TooLarge,
    /// The revision asked for was compacted: read again from the newest.
    Compacted,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFailure {
    pub kind: FailureKind,
    pub reason: String,
}

/// Where range requests go: etcd ([`EtcdRanges`]) or a test's store.
pub trait Ranges {
    fn range(
        &mut self,
        request: RangeRequest,
    ) -> impl Future<Output = Result<RangePage, RangeFailure>> + Send;
}

/// Range requests to etcd, each with a deadline.
pub struct EtcdRanges<'a> {
    pub client: &'a mut Client,
    pub timeout: Duration,
}

impl std::fmt::Debug for EtcdRanges<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRanges")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Ranges for EtcdRanges<'_> {
    async fn range(&mut self, r: RangeRequest) -> Result<RangePage, RangeFailure> {
        let options = GetOptions::new()
            .with_range(r.end)
            .with_limit(i64::try_from(r.limit).unwrap_or(i64::MAX))
            .with_revision(r.revision);
        let mut resp =
            match tokio::time::timeout(self.timeout, self.client.get(r.start, Some(options))).await
            {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    return Err(RangeFailure {
                        kind: classify(&e),
                        reason: describe(&e),
                    });
                }
                Err(_) => {
                    return Err(RangeFailure {
                        kind: FailureKind::Other,
                        reason: format!("no answer from etcd within {:?}", self.timeout),
                    });
                }
            };
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let more = resp.more();
        let entries = resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let mod_revision = kv.mod_revision();
                let (key, value) = kv.into_key_value();
                Entry {
                    key,
                    value,
                    mod_revision,
                }
            })
            .collect();
        Ok(RangePage {
            entries,
            more,
            revision,
        })
    }
}

/// What kind of failure an etcd client error is. etcd says `ErrCompacted` with gRPC code
/// OutOfRange, which tonic also uses for a message past its size limit: the text tells them
/// apart.
fn classify(e: &etcd_client::Error) -> FailureKind {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return FailureKind::Other;
    };
    let message = s.message();
    if message.contains("required revision has been compacted") {
        return FailureKind::Compacted;
    }
    let too_large = [
        "message length too large",
        "larger than max",
        "message too large",
    ];
    if s.code() == tonic::Code::ResourceExhausted || too_large.iter().any(|t| message.contains(t)) {
        return FailureKind::TooLarge;
    }
    FailureKind::Other
}

/// Every key under `prefix` from etcd, in pages of `page` keys at one revision.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
    page: usize,
    timeout: Duration,
) -> Result<PrefixRead, BulkError> {
    read_prefix_with(&mut EtcdRanges { client, timeout }, prefix, page).await
}

/// Every key under `prefix`, in pages of at most `page` keys (at least one). The first page
/// is read at the newest revision R, every next one from just after the last key at R: one
/// consistent snapshot. A page whose response would be too large is asked again with half
/// as many keys (down to one; the smaller page is kept for the rest of the read). When R is
/// compacted away between pages, the read starts again from the newest revision, at most
/// [`COMPACTED_RESTARTS`] times.
pub async fn read_prefix_with<R: Ranges>(
    ranges: &mut R,
    prefix: &str,
    page: usize,
) -> Result<PrefixRead, BulkError> {
    let end = prefix_end(prefix);
    let mut limit = page.max(1);
    let mut restarts = 0;
    let mut requests = 0u32;
    'read: loop {
        let mut entries: Vec<Entry> = Vec::new();
        let mut revision = 0;
        let mut start = prefix.as_bytes().to_vec();
        loop {
            let request = RangeRequest {
                start: start.clone(),
                end: end.clone(),
                limit,
                revision,
            };
            requests = requests.saturating_add(1);
            match ranges.range(request).await {
                Ok(p) => {
                    if revision == 0 {
                        revision = p.revision;
                    }
                    // An empty page that says more follow would ask the same again.
                    let Some(last) = p.entries.last().filter(|_| p.more) else {
                        entries.extend(p.entries);
                        break;
                    };
                    start = last.key.clone();
                    start.push(0);
                    entries.extend(p.entries);
                }
                Err(f) if f.kind == FailureKind::TooLarge => {
                    if limit == 1 {
                        return Err(BulkError::KeyTooLarge {
                            prefix: prefix.to_owned(),
                            after: entries
                                .last()
                                .map(|e| String::from_utf8_lossy(&e.key).into_owned())
                                .unwrap_or_else(|| prefix.to_owned()),
                            reason: f.reason,
                        });
                    }
                    limit /= 2;
                }
                Err(f) if f.kind == FailureKind::Compacted => {
                    if restarts >= COMPACTED_RESTARTS {
                        return Err(BulkError::Compacted {
                            prefix: prefix.to_owned(),
                            times: restarts + 1,
                            reason: f.reason,
                        });
                    }
                    restarts += 1;
                    continue 'read;
                }
                Err(f) => {
                    return Err(BulkError::Read {
                        prefix: prefix.to_owned(),
                        reason: f.reason,
                    });
                }
            }
        }
        return Ok(PrefixRead {
            entries,
            revision,
            requests,
        });
    }
}

/// What a transaction may hold, as etcd's `--max-txn-ops` and `--max-request-bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnLimits {
    pub max_ops: usize,
    pub max_bytes: usize,
}

impl Default for TxnLimits {
    fn default() -> TxnLimits {
        TxnLimits {
            max_ops: DEFAULT_MAX_TXN_OPS,
            max_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

impl TxnLimits {
    /// The keys and values one transaction carries at most: 2/3 of `max_bytes`, the rest
    /// left for the request's framing.
    pub fn byte_budget(&self) -> usize {
        self.max_bytes / 3 * 2 + self.max_bytes % 3 * 2 / 3
    }
}

/// What one unit of a write costs a transaction: the unit (a node's put and the compare that
/// guards it, say) goes whole into one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnCost {
    /// The key that names the unit in errors.
    pub key: String,
    /// Its compares.
    pub compares: usize,
    /// Its operations (puts, deletes, gets).
    pub ops: usize,
    /// The bytes of its keys and values, compares' included.
    pub bytes: usize,
}

/// Split `units` into consecutive runs, each within `limits`: etcd counts a transaction's
/// compares and its operations against `--max-txn-ops` each, and the whole request against
/// `--max-request-bytes`. An empty input gives no runs. A unit that alone passes a limit is an
/// error naming its key, its size and the flag to raise.
pub fn split_txns(units: &[TxnCost], limits: TxnLimits) -> Result<Vec<Range<usize>>, BulkError> {
    let budget = limits.byte_budget();
    let max_ops = limits.max_ops.max(1);
    let mut runs = Vec::new();
    let (mut first, mut compares, mut ops, mut bytes) = (0, 0usize, 0usize, 0usize);
    for (i, u) in units.iter().enumerate() {
        if u.compares.max(u.ops) > max_ops {
            return Err(BulkError::TooManyOps {
                key: u.key.clone(),
                ops: u.compares.max(u.ops),
                max_ops,
            });
        }
        if u.bytes > budget {
            return Err(BulkError::TooLargeForATransaction {
                key: u.key.clone(),
                size: u.bytes,
                budget,
                max_request_bytes: limits.max_bytes,
            });
        }
        let fits =
            compares + u.compares <= max_ops && ops + u.ops <= max_ops && bytes + u.bytes <= budget;
        if !fits && i > first {
            runs.push(first..i);
            (first, compares, ops, bytes) = (i, 0, 0, 0);
        }
        compares += u.compares;
        ops += u.ops;
        bytes += u.bytes;
    }
    if first < units.len() {
        runs.push(first..units.len());
    }
    Ok(runs)
}

#[cfg(test)]
// `[0..1]` here is one transaction's run of units, not the values 0 to 1.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// An in-memory etcd: every revision's keys, a compaction point, a response size limit
    /// in bytes, and failures to inject.
    #[derive(Debug, Default)]
    struct Store {
        /// revision -> the keys then.
        revisions: BTreeMap<i64, BTreeMap<Vec<u8>, Vec<u8>>>,
        compacted: i64,
        max_response: Option<usize>,
        /// Run before each request (after the first `after` of them): changes the store.
        hooks: Vec<(u32, Hook)>,
        requests: Vec<RangeRequest>,
        fail_other: bool,
    }

    #[derive(Debug, Clone, Copy)]
    enum Hook {
        /// Write a key at a new revision.
        Write,
        /// Write a key and compact every revision before the new one.
        WriteAndCompact,
    }

    impl Store {
        fn with_keys(n: usize, value_len: usize) -> Store {
            let mut keys = BTreeMap::new();
            for i in 0..n {
                keys.insert(format!("/p/k{i:04}").into_bytes(), vec![b'v'; value_len]);
            }
            // Neighbours outside the prefix, which a read must not return.
            keys.insert(b"/o".to_vec(), b"x".to_vec());
            keys.insert(b"/q".to_vec(), b"x".to_vec());
            let mut s = Store::default();
            s.revisions.insert(7, keys);
            s.compacted = 1;
            s
        }

        fn newest(&self) -> i64 {
            self.revisions.keys().next_back().copied().unwrap_or(0)
        }

        fn write(&mut self, compact: bool) {
            let rev = self.newest();
            let mut keys = self.revisions.get(&rev).cloned().unwrap_or_default();
            keys.insert(format!("/p/k0003-{rev}").into_bytes(), b"n".to_vec());
            self.revisions.insert(rev + 1, keys);
            if compact {
                self.compacted = rev + 1;
            }
        }
    }

    impl Ranges for Store {
        async fn range(&mut self, r: RangeRequest) -> Result<RangePage, RangeFailure> {
            let n = u32::try_from(self.requests.len()).expect("few requests");
            self.requests.push(r.clone());
            for (after, hook) in self.hooks.clone() {
                if after == n {
                    self.write(matches!(hook, Hook::WriteAndCompact));
                }
            }
            if self.fail_other {
                return Err(RangeFailure {
                    kind: FailureKind::Other,
                    reason: "Unavailable: etcdserver: no leader".into(),
                });
            }
            let revision = if r.revision == 0 {
                self.newest()
            } else {
                r.revision
            };
            if revision < self.compacted {
                return Err(RangeFailure {
                    kind: FailureKind::Compacted,
                    reason: "OutOfRange: etcdserver: mvcc: required revision has been compacted"
                        .into(),
                });
            }
            let keys = &self.revisions[&revision];
            let all: Vec<Entry> = keys
                .range(r.start.clone()..r.end.clone())
                .map(|(k, v)| Entry {
                    key: k.clone(),
                    value: v.clone(),
                    mod_revision: revision,
                })
                .collect();
            let entries: Vec<Entry> = all.iter().take(r.limit).cloned().collect();
            let size: usize = entries.iter().map(|e| e.key.len() + e.value.len()).sum();
            if self.max_response.is_some_and(|m| size > m) {
                return Err(RangeFailure {
                    kind: FailureKind::TooLarge,
                    reason: "OutOfRange: Error, decoded message length too large".into(),
                });
            }
            Ok(RangePage {
                more: all.len() > entries.len(),
                entries,
                revision,
            })
        }
    }

    async fn read(store: &mut Store, page: usize) -> Result<PrefixRead, BulkError> {
        read_prefix_with(store, "/p/", page).await
    }

    fn keys(r: &PrefixRead) -> Vec<String> {
        r.entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.key).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn pages_cover_the_prefix_at_one_revision() {
        let cases = [
            (0, 5, 1),
            (1, 5, 1),
            (5, 5, 1),
            (6, 5, 2),
            (23, 5, 5),
            (23, 1, 23),
            (23, 0, 23),
        ];
        for (n, page, requests) in cases {
            let mut s = Store::with_keys(n, 3);
            let r = read(&mut s, page).await.expect("read");
            let want: Vec<String> = (0..n).map(|i| format!("/p/k{i:04}")).collect();
            assert_eq!(keys(&r), want, "{n} keys, pages of {page}");
            assert_eq!(r.revision, 7);
            assert_eq!(r.requests, requests, "{n} keys, pages of {page}");
            assert_eq!(s.requests.len(), requests as usize);
            assert_eq!(s.requests[0].revision, 0, "the first page at the newest");
            assert!(
                s.requests[1..].iter().all(|q| q.revision == 7),
                "the rest at R"
            );
            for pair in s.requests.windows(2) {
                assert!(pair[1].start > pair[0].start, "each page starts further on");
            }
            assert!(s.requests.iter().all(|q| q.end == b"/p0".to_vec()));
        }
    }

    #[tokio::test]
    async fn a_page_starts_just_after_the_last_key() {
        let mut s = Store::with_keys(4, 1);
        read(&mut s, 2).await.expect("read");
        assert_eq!(s.requests[0].start, b"/p/".to_vec());
        assert_eq!(s.requests[1].start, b"/p/k0001\0".to_vec());
    }

    #[tokio::test]
    async fn a_write_between_pages_stays_out_of_the_read() {
        let mut s = Store::with_keys(10, 1);
        // /p/k0003-7 written at 8, before the second page; the read stays at 7.
        s.hooks.push((1, Hook::Write));
        let r = read(&mut s, 2).await.expect("read");
        assert_eq!(r.revision, 7);
        assert_eq!(r.entries.len(), 10, "{:?}", keys(&r));
        assert!(s.revisions[&8].contains_key(b"/p/k0003-7".as_slice()));
    }

    #[tokio::test]
    async fn a_response_too_large_halves_the_page() {
        let mut s = Store::with_keys(20, 100);
        // About three keys' worth (each ~108 bytes) fit in a response.
        s.max_response = Some(350);
        let r = read(&mut s, 16).await.expect("read");
        assert_eq!(r.entries.len(), 20);
        assert_eq!(r.revision, 7);
        let limits: Vec<usize> = s.requests.iter().map(|q| q.limit).collect();
        // 16, 8 and 4 refused; pages of 2 from then on.
        assert_eq!(&limits[..4], &[16, 8, 4, 2]);
        assert!(limits[3..].iter().all(|l| *l == 2), "{limits:?}");
        assert_eq!(
            s.requests[3].revision, 0,
            "no page was read yet: still the newest"
        );
    }

    #[tokio::test]
    async fn one_key_too_large_for_a_response_is_an_error_naming_it() {
        let mut s = Store::with_keys(3, 100);
        s.max_response = Some(50);
        let e = read(&mut s, 4).await.expect_err("too large").to_string();
        assert!(e.contains("reading /p/"), "{e}");
        assert!(e.contains("the key after \"/p/\""), "{e}");
        assert!(e.contains("shrink"), "{e}");
        let limits: Vec<usize> = s.requests.iter().map(|q| q.limit).collect();
        assert_eq!(limits, [4, 2, 1]);
    }

    #[tokio::test]
    async fn a_compaction_between_pages_starts_the_read_again() {
        let mut s = Store::with_keys(10, 1);
        // Before the second request: a write at 8 and a compaction of 7.
        s.hooks.push((1, Hook::WriteAndCompact));
        let r = read(&mut s, 4).await.expect("read");
        assert_eq!(r.revision, 8, "read again at the newest");
        assert_eq!(r.entries.len(), 11, "the new key too: {:?}", keys(&r));
        assert_eq!(s.requests[2].revision, 0, "the restart reads the newest");
        assert!(s.requests[3..].iter().all(|q| q.revision == 8));
    }

    #[tokio::test]
    async fn compactions_again_and_again_end_the_read() {
        let mut s = Store::with_keys(10, 1);
        // Compacted before every second page: 1 + 3 restarts, then the error.
        for n in [1, 3, 5, 7, 9] {
            s.hooks.push((n, Hook::WriteAndCompact));
        }
        let e = read(&mut s, 4).await.expect_err("compacted").to_string();
        assert!(
            e.contains("compacted the revision being read 4 times"),
            "{e}"
        );
        assert!(e.contains("try again"), "{e}");
        assert_eq!(s.requests.len(), 8);
        // Three compactions are survived.
        let mut s = Store::with_keys(10, 1);
        for n in [1, 3, 5] {
            s.hooks.push((n, Hook::WriteAndCompact));
        }
        let r = read(&mut s, 4).await.expect("read after three restarts");
        assert_eq!(r.revision, 10);
    }

    #[tokio::test]
    async fn other_failures_name_the_prefix() {
        let mut s = Store::with_keys(10, 1);
        s.fail_other = true;
        let e = read(&mut s, 4).await.expect_err("fails").to_string();
        assert_eq!(e, "reading /p/: Unavailable: etcdserver: no leader");
    }

    fn unit(key: &str, compares: usize, ops: usize, bytes: usize) -> TxnCost {
        TxnCost {
            key: key.into(),
            compares,
            ops,
            bytes,
        }
    }

    fn runs(units: &[TxnCost], max_ops: usize, max_bytes: usize) -> Vec<Range<usize>> {
        split_txns(units, TxnLimits { max_ops, max_bytes }).expect("splits")
    }

    #[test]
    fn the_byte_budget_is_two_thirds() {
        for (max, budget) in [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (65_536, 43_690),
            (1_572_864, 1_048_576),
        ] {
            assert_eq!(
                TxnLimits {
                    max_ops: 1,
                    max_bytes: max
                }
                .byte_budget(),
                budget,
                "{max}"
            );
        }
    }

    #[test]
    fn splits_by_operations() {
        let puts = |n: usize| {
            (0..n)
                .map(|i| unit(&format!("k{i}"), 0, 1, 10))
                .collect::<Vec<_>>()
        };
        assert_eq!(runs(&[], 8, 1000), Vec::<Range<usize>>::new());
        assert_eq!(runs(&puts(1), 8, 1000), [0..1]);
        assert_eq!(runs(&puts(8), 8, 1000), [0..8]);
        assert_eq!(runs(&puts(9), 8, 1000), [0..8, 8..9]);
        assert_eq!(runs(&puts(20), 8, 1_000_000), [0..8, 8..16, 16..20]);
        assert_eq!(
            runs(&puts(300), 128, 1_000_000),
            [0..128, 128..256, 256..300]
        );
        // A guarded put: a compare and an operation each; the two lists counted apart.
        let guarded: Vec<TxnCost> = (0..10).map(|i| unit(&format!("k{i}"), 1, 1, 10)).collect();
        assert_eq!(runs(&guarded, 4, 1000), [0..4, 4..8, 8..10]);
        // Units of two operations.
        let pairs: Vec<TxnCost> = (0..5).map(|i| unit(&format!("k{i}"), 0, 2, 10)).collect();
        assert_eq!(runs(&pairs, 5, 1000), [0..2, 2..4, 4..5]);
        // Compares bind before operations.
        let mixed = vec![unit("a", 3, 1, 1), unit("b", 3, 1, 1), unit("c", 1, 1, 1)];
        assert_eq!(runs(&mixed, 4, 1000), [0..1, 1..3]);
    }

    #[test]
    fn splits_by_bytes() {
        // Budget 2/3 of 3000 = 2000 bytes.
        let sized: Vec<TxnCost> = [900, 900, 300, 1500, 500, 1, 2000, 1]
            .iter()
            .enumerate()
            .map(|(i, b)| unit(&format!("k{i}"), 1, 1, *b))
            .collect();
        assert_eq!(runs(&sized, 128, 3000), [0..2, 2..4, 4..6, 6..7, 7..8]);
        // Whichever limit comes first.
        let small: Vec<TxnCost> = (0..10).map(|i| unit(&format!("k{i}"), 1, 1, 600)).collect();
        assert_eq!(runs(&small, 2, 3000), [0..2, 2..4, 4..6, 6..8, 8..10]);
        assert_eq!(runs(&small, 8, 3000), [0..3, 3..6, 6..9, 9..10]);
        // Every run within both limits, and together every unit once, in order.
        let many: Vec<TxnCost> = (0..1000)
            .map(|i| unit(&format!("k{i}"), 1, 1, 1 + (i * 37) % 700))
            .collect();
        let got = runs(&many, 16, 3000);
        let mut next = 0;
        for r in &got {
            assert_eq!(r.start, next);
            assert!(!r.is_empty());
            assert!(r.len() <= 16);
            assert!(many[r.clone()].iter().map(|u| u.bytes).sum::<usize>() <= 2000);
            next = r.end;
        }
        assert_eq!(next, many.len());
    }

    #[test]
    fn a_unit_past_a_limit_alone_is_an_error_naming_it() {
        let big = vec![
            unit("a", 1, 1, 10),
            unit("/corral/v1/nodes/n7/services/web", 1, 1, 2001),
        ];
        let e = split_txns(
            &big,
            TxnLimits {
                max_ops: 128,
                max_bytes: 3000,
            },
        )
        .expect_err("too large")
        .to_string();
        assert!(
            e.starts_with("/corral/v1/nodes/n7/services/web: 2001 bytes"),
            "{e}"
        );
        assert!(e.contains("2000 bytes"), "{e}");
        assert!(e.contains("--etcd-max-request-bytes 3000"), "{e}");
        assert!(e.contains("--max-request-bytes"), "{e}");
        // Exactly the budget fits.
        assert_eq!(runs(&[unit("a", 1, 1, 2000)], 128, 3000), [0..1]);
        let wide = vec![unit("w", 3, 1, 1)];
        let e = split_txns(
            &wide,
            TxnLimits {
                max_ops: 2,
                max_bytes: 3000,
            },
        )
        .expect_err("too many")
        .to_string();
        assert!(e.contains("w: 3 operations"), "{e}");
        assert!(e.contains("--etcd-max-txn-ops 2"), "{e}");
        // Zero limits do not loop or panic.
        assert!(
            split_txns(
                &[unit("z", 0, 1, 1)],
                TxnLimits {
                    max_ops: 0,
                    max_bytes: 0
                }
            )
            .is_err()
        );
        assert_eq!(
            split_txns(
                &[unit("z", 0, 1, 0)],
                TxnLimits {
                    max_ops: 0,
                    max_bytes: 0
                }
            )
            .expect("fits"),
            [0..1]
        );
    }
}
