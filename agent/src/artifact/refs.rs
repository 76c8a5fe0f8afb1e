//! The store's bookkeeping: what it holds (kind, digest, size, last use), who pinned which
//! digest, and the garbage-collection plan. Pure apart from [`Refs::load`]/[`Refs::save`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::artifact::Digest;

/// What an entry of the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// An archive (`sha256/<hex>`) and its unpacked trees (`trees/<hex>...`).
    Artifact,
    /// An image's root filesystem and config (`images/<hex>`).
    Image,
}

/// An entry's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) kind: EntryKind,
    pub(crate) digest: Digest,
}

impl Key {
    pub(crate) fn artifact(digest: Digest) -> Key {
        Key {
            kind: EntryKind::Artifact,
            digest,
        }
    }

    pub(crate) fn image(digest: Digest) -> Key {
        Key {
            kind: EntryKind::Image,
            digest,
        }
    }

    /// The name of its single-flight lock.
    pub(crate) fn lock_name(&self) -> String {
        match self.kind {
            EntryKind::Artifact => format!("a:{}", self.digest.hex()),
            EntryKind::Image => format!("i:{}", self.digest.hex()),
        }
    }
}

/// What the store knows of one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Bytes of the blob, when kept.
    pub(crate) blob: Option<u64>,
    /// Unpacked trees by directory name, with their content bytes.
    pub(crate) trees: BTreeMap<String, u64>,
    /// Seconds since the epoch.
    pub(crate) last_used: u64,
}

impl Record {
    pub(crate) fn size(&self) -> u64 {
        self.blob
            .unwrap_or(0)
            .saturating_add(self.trees.values().sum::<u64>())
    }
}

/// The persisted form.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    version: u32,
    entries: Vec<PersistedEntry>,
    pins: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedEntry {
    kind: EntryKind,
    digest: String,
    #[serde(flatten)]
    record: Record,
}

/// Every entry and every pin.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Refs {
    pub(crate) entries: BTreeMap<Key, Record>,
    /// Owners by digest; a digest may be pinned before it is fetched.
    pub(crate) pins: BTreeMap<Digest, BTreeSet<String>>,
}

/// Why the plan removes an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// No owner and no lease.
    Unreferenced,
    /// The store is over `max_cache` and this was the least recently used without a lease.
    Evicted,
}

impl Refs {
    /// Reads `path`; a missing file is an empty store, a damaged one an error.
    pub(crate) fn load(path: &Path) -> io::Result<Refs> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Refs::default()),
            Err(e) => return Err(e),
        };
        let persisted: Persisted = serde_json::from_slice(&text).map_err(io::Error::other)?;
        let mut refs = Refs::default();
        for entry in persisted.entries {
            let Some(digest) = Digest::from_hex(&entry.digest) else {
                continue;
            };
            refs.entries.insert(
                Key {
                    kind: entry.kind,
                    digest,
                },
                entry.record,
            );
        }
        for (hex, owners) in persisted.pins {
            if let Some(digest) = Digest::from_hex(&hex)
                && !owners.is_empty()
            {
                refs.pins.insert(digest, owners);
            }
        }
        Ok(refs)
    }

    /// Writes `path` durably: temp file, fsync, rename, fsync of the directory.
    pub(crate) fn save(&self, path: &Path) -> io::Result<()> {
        let persisted = Persisted {
            version: 1,
            entries: self
                .entries
                .iter()
                .map(|(key, record)| PersistedEntry {
                    kind: key.kind,
                    digest: key.digest.hex(),
                    record: record.clone(),
                })
                .collect(),
            pins: self
                .pins
                .iter()
                .map(|(d, owners)| (d.hex(), owners.clone()))
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&persisted).map_err(io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Whether some owner pins `digest`.
    pub(crate) fn pinned(&self, digest: &Digest) -> bool {
        self.pins.get(digest).is_some_and(|o| !o.is_empty())
    }

    pub(crate) fn total(&self) -> u64 {
        self.entries.values().map(Record::size).sum()
    }

    /// What to remove: with `unreferenced`, every entry with neither owner nor lease; then,
    /// while the rest is over `max_cache`, the least recently used without a lease (unpinned
    /// ones first). Leased entries are never chosen.
    pub(crate) fn plan(
        &self,
        leases: &HashMap<Key, usize>,
        max_cache: Option<u64>,
        unreferenced: bool,
    ) -> Vec<(Key, Why)> {
        let leased = |k: &Key| leases.get(k).is_some_and(|n| *n > 0);
        let mut plan = Vec::new();
        let mut total = self.total();
        if unreferenced {
            for (key, record) in &self.entries {
                if !leased(key) && !self.pinned(&key.digest) {
                    plan.push((*key, Why::Unreferenced));
                    total = total.saturating_sub(record.size());
                }
            }
        }
        let Some(max) = max_cache else {
            return plan;
        };
        let mut candidates: Vec<(bool, u64, Key, u64)> = self
            .entries
            .iter()
            .filter(|(key, _)| !leased(key) && !plan.iter().any(|(k, _)| k == *key))
            .map(|(key, record)| {
                (
                    self.pinned(&key.digest),
                    record.last_used,
                    *key,
                    record.size(),
                )
            })
            .collect();
        candidates.sort();
        for (_, _, key, size) in candidates {
            if total <= max {
                break;
            }
            plan.push((key, Why::Evicted));
            total = total.saturating_sub(size);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::from_bytes([n; 32])
    }

    fn refs(entries: &[(u8, u64, u64)], pins: &[u8]) -> Refs {
        let mut r = Refs::default();
        for (n, size, last_used) in entries {
            r.entries.insert(
                Key::artifact(d(*n)),
                Record {
                    blob: Some(*size),
                    trees: BTreeMap::new(),
                    last_used: *last_used,
                },
            );
        }
        for n in pins {
            r.pins.entry(d(*n)).or_default().insert(format!("web@r{n}"));
        }
        r
    }

    fn leases(ns: &[u8]) -> HashMap<Key, usize> {
        ns.iter().map(|n| (Key::artifact(d(*n)), 1)).collect()
    }

    fn removed(plan: &[(Key, Why)]) -> Vec<(u8, Why)> {
        plan.iter()
            .map(|(k, why)| (k.digest.as_bytes()[0], *why))
            .collect()
    }

    #[test]
    fn gc_plan_table() {
        use Why::{Evicted, Unreferenced};
        struct Case {
            name: &'static str,
            entries: &'static [(u8, u64, u64)],
            pins: &'static [u8],
            leased: &'static [u8],
            max: Option<u64>,
            unreferenced: bool,
            want: &'static [(u8, Why)],
        }
        let cases = [
            Case {
                name: "unpinned and unleased go, pinned or leased stay",
                entries: &[(1, 10, 1), (2, 10, 2), (3, 10, 3)],
                pins: &[2],
                leased: &[3],
                max: None,
                unreferenced: true,
                want: &[(1, Unreferenced)],
            },
            Case {
                name: "under the bound nothing is evicted",
                entries: &[(1, 10, 1), (2, 10, 2)],
                pins: &[1, 2],
                leased: &[],
                max: Some(20),
                unreferenced: true,
                want: &[],
            },
            Case {
                name: "over the bound the least recently used goes first",
                entries: &[(1, 10, 5), (2, 10, 1), (3, 10, 9)],
                pins: &[1, 2, 3],
                leased: &[],
                max: Some(20),
                unreferenced: true,
                want: &[(2, Evicted)],
            },
            Case {
                name: "a leased entry is never evicted, even when oldest",
                entries: &[(1, 10, 1), (2, 10, 2), (3, 10, 3)],
                pins: &[1, 2, 3],
                leased: &[1],
                max: Some(15),
                unreferenced: true,
                want: &[(2, Evicted), (3, Evicted)],
            },
            Case {
                name: "everything leased: over the bound, nothing to do",
                entries: &[(1, 10, 1), (2, 10, 2)],
                pins: &[],
                leased: &[1, 2],
                max: Some(5),
                unreferenced: true,
                want: &[],
            },
            Case {
                name: "bound only: unpinned evicted before pinned, old before new",
                entries: &[(1, 10, 1), (2, 10, 5), (3, 10, 3)],
                pins: &[1],
                leased: &[],
                max: Some(15),
                unreferenced: false,
                want: &[(3, Evicted), (2, Evicted)],
            },
        ];
        for c in cases {
            let r = refs(c.entries, c.pins);
            let plan = r.plan(&leases(c.leased), c.max, c.unreferenced);
            assert_eq!(removed(&plan), c.want, "{}", c.name);
        }
    }

    #[test]
    fn saved_refs_load_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("refs.json");
        assert_eq!(
            Refs::load(&path).expect("missing is empty"),
            Refs::default()
        );
        let mut r = refs(&[(1, 10, 1)], &[1, 7]);
        r.entries.insert(
            Key::image(d(9)),
            Record {
                blob: None,
                trees: [("rootfs".to_string(), 42)].into(),
                last_used: 3,
            },
        );
        r.save(&path).expect("save");
        assert_eq!(Refs::load(&path).expect("load"), r);
        std::fs::write(&path, b"{not json").expect("write");
        assert!(Refs::load(&path).is_err());
    }
}
