//! `user = "dynamic"`: a uid (and the gid of the same number) allocated per service from the
//! agent's `--dynamic-users` range, like systemd's `DynamicUser=`. The allocation is kept in
//! `<state-dir>/dynamic-users.json` (written to a temp file, synced, renamed), so a service
//! keeps its uid across instance restarts and agent restarts, and is released when the
//! service is deleted. Allocation goes round the range (the next uid after the last one
//! given), so a released uid is given again as late as possible; a uid that has a passwd
//! entry on the host is never given.
//!
//! The agent never changes the ownership of existing files: a dynamic service writes `/tmp`
//! and what its uid may write. Files it creates elsewhere keep its uid, which stays the
//! service's for as long as the service exists.
//!
//! `isolation.userns = true` takes the same kind of allocation ([`UsernsIds`]), in blocks of
//! [`USERNS_SIZE`] ids from the agent's `--userns-ids` range, kept in
//! `<state-dir>/userns-ids.json`: ids 0..65535 inside the service's instances are that block
//! on the host.
//!
//! Imports from the crate: nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// An inclusive range of ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub last: u32,
}

impl IdRange {
    /// systemd's range for dynamic users.
    pub const DYNAMIC_DEFAULT: IdRange = IdRange {
        first: 61184,
        last: 65519,
    };

    /// `FIRST-LAST`, with 1 <= FIRST <= LAST < 4294967295.
    pub fn parse(s: &str) -> Result<IdRange, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a range FIRST-LAST (e.g. 61184-65519)"))?;
        let n = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: {v:?} is not a uid"))
        };
        let (first, last) = (n(a)?, n(b)?);
        if first == 0 || first > last || last == u32::MAX {
            return Err(format!(
                "{s:?}: the range must be FIRST-LAST with 0 < FIRST <= LAST < 4294967295"
            ));
        }
        Ok(IdRange { first, last })
    }

    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Allocation {
    /// Where the next search starts.
    next: u32,
    services: BTreeMap<String, u32>,
}

/// The first free id at or after `next` (wrapping round `range`) that `taken` does not
/// refuse; `None` when the range is full.
pub fn pick(range: IdRange, used: &[u32], next: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    let span = u64::from(range.last - range.first) + 1;
    let start = if range.contains(next) {
        next
    } else {
        range.first
    };
    (0..span)
        // The offset is below `span`, which is at most 2^32: it fits a u32.
        .map(|i| {
            let offset = (u64::from(start - range.first) + i) % span;
            range.first + u32::try_from(offset).unwrap_or(0)
        })
        .find(|id| !used.contains(id) && !taken(*id))
}

/// Ids handed out per service from a range, saved in a file: the dynamic users' uids, or
/// the user namespaces' blocks.
#[derive(Debug)]
struct Allocator {
    range: IdRange,
    file: PathBuf,
    state: Mutex<Allocation>,
    /// Never given (a uid with a passwd entry).
    taken: fn(u32) -> bool,
    /// What runs out, for the error: `every uid of the --dynamic-users range 1-9`.
    what: String,
}

impl Allocator {
    /// Reads the allocation kept in `file` (none yet: empty). An unreadable file is an error:
    /// giving a service other ids would strand its files.
    fn open(
        file: &Path,
        range: IdRange,
        taken: fn(u32) -> bool,
        what: String,
    ) -> Result<Allocator, String> {
        let state = match fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is unreadable: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Allocation::default(),
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        };
        Ok(Allocator {
            range,
            file: file.to_path_buf(),
            state: Mutex::new(state),
            taken,
            what,
        })
    }

    /// The id of `service`, allocated (and saved) on first use.
    fn get_or_allocate(&self, service: &str) -> Result<u32, String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = state.services.get(service) {
            return Ok(*id);
        }
        let used: Vec<u32> = state.services.values().copied().collect();
        let id = pick(self.range, &used, state.next, self.taken)
            .ok_or_else(|| format!("{} is in use", self.what))?;
        let mut updated = state.clone();
        updated.services.insert(service.to_string(), id);
        updated.next = if id == self.range.last {
            self.range.first
        } else {
            id + 1
        };
        save(&self.file, &updated)?;
        *state = updated;
        Ok(id)
    }

    /// `service` was deleted: its id may be given again.
    fn release(&self, service: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.services.contains_key(service) {
            return;
        }
        let mut updated = state.clone();
        updated.services.remove(service);
        match save(&self.file, &updated) {
            Ok(()) => *state = updated,
            Err(e) => tracing::warn!(%service, error = %e, "cannot release {}", self.what),
        }
    }
}

/// The dynamic users of this agent.
#[derive(Debug)]
pub struct DynamicUsers(Allocator);

impl DynamicUsers {
    /// Reads the allocation kept in `file` (none yet: empty). An unreadable file is an error:
    /// giving a service another uid would strand its files.
    pub fn open(file: &Path, range: IdRange) -> Result<DynamicUsers, String> {
        Allocator::open(
            file,
            range,
            has_passwd_entry,
            format!(
                "user: every uid of the --dynamic-users range {}-{}",
                range.first, range.last
            ),
        )
        .map(DynamicUsers)
    }

    pub fn range(&self) -> IdRange {
        self.0.range
    }

    /// The uid of `service`, allocated (and saved) on first use.
    pub fn get_or_allocate(&self, service: &str) -> Result<u32, String> {
        self.0.get_or_allocate(service)
    }

    /// `service` was deleted: its uid may be given again.
    pub fn release(&self, service: &str) {
        self.0.release(service)
    }
}

/// How many ids a service's user namespace maps: 0..65535 inside.
pub const USERNS_SIZE: u32 = 65536;

/// The host ids of the services' user namespaces: one block of [`USERNS_SIZE`] per service.
#[derive(Debug)]
pub struct UsernsIds(Allocator);

impl UsernsIds {
    /// systemd's range for containers' ids (`0x80000`-`0x6FFFFFFF`).
    pub const DEFAULT: IdRange = IdRange {
        first: 0x8_0000,
        last: 0x6FFF_FFFF,
    };

    /// `range` must start and end on a block boundary (a multiple of 65536, and one less).
    pub fn open(file: &Path, range: IdRange) -> Result<UsernsIds, String> {
        if !range.first.is_multiple_of(USERNS_SIZE)
            || !(u64::from(range.last) + 1).is_multiple_of(u64::from(USERNS_SIZE))
        {
            return Err(format!(
                "{}-{}: the range must hold whole blocks of {USERNS_SIZE} ids (FIRST a multiple of {USERNS_SIZE}, LAST one less than one), e.g. 524288-1879048191",
                range.first, range.last
            ));
        }
        let blocks = IdRange {
            first: range.first / USERNS_SIZE,
            last: range.last / USERNS_SIZE,
        };
        Allocator::open(
            file,
            blocks,
            |_| false,
            format!(
                "isolation.userns: every block of the --userns-ids range {}-{}",
                range.first, range.last
            ),
        )
        .map(UsernsIds)
    }

    /// The first host id of `service`'s block (its root inside), allocated on first use.
    pub fn get_or_allocate(&self, service: &str) -> Result<u32, String> {
        self.0.get_or_allocate(service).map(|b| b * USERNS_SIZE)
    }

    /// A block for checks that need one (any: the first of the range).
    pub fn any(&self) -> u32 {
        self.0.range.first * USERNS_SIZE
    }

    /// `service` was deleted: its block may be given again.
    pub fn release(&self, service: &str) {
        self.0.release(service)
    }
}

fn has_passwd_entry(uid: u32) -> bool {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).is_ok_and(|u| u.is_some())
}

fn save(file: &Path, state: &Allocation) -> Result<(), String> {
    let tmp = file.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, file)?;
        if let Some(dir) = file.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("saving {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(IdRange::parse("61184-65519"), Ok(IdRange::DYNAMIC_DEFAULT));
        assert_eq!(IdRange::parse("5-5"), Ok(IdRange { first: 5, last: 5 }));
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-4294967295", "-5"] {
            assert!(IdRange::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pick_goes_round_and_skips() {
        let r = IdRange {
            first: 10,
            last: 13,
        };
        let none = |_| false;
        let cases: &[(&[u32], u32, Option<u32>)] = &[
            (&[], 10, Some(10)),
            (&[10], 10, Some(11)),
            (&[], 13, Some(13)),
            (&[13], 13, Some(10)),
            (&[10, 11, 12, 13], 10, None),
            (&[], 99, Some(10)),
        ];
        for (used, next, want) in cases {
            assert_eq!(pick(r, used, *next, none), *want, "{used:?} from {next}");
        }
        assert_eq!(pick(r, &[], 10, |id| id < 12), Some(12), "passwd entries");
    }

    #[test]
    fn allocation_is_kept_and_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("dynamic-users.json");
        // High uids: no passwd entry on any ordinary host.
        let range = IdRange {
            first: 4_000_000_000,
            last: 4_000_000_002,
        };
        let users = DynamicUsers::open(&file, range).expect("open");
        let web = users.get_or_allocate("web").expect("web");
        let db = users.get_or_allocate("db").expect("db");
        assert_ne!(web, db);
        assert_eq!(users.get_or_allocate("web"), Ok(web), "stable");
        // A new agent reads the same.
        let again = DynamicUsers::open(&file, range).expect("reopen");
        assert_eq!(again.get_or_allocate("web"), Ok(web));
        assert_eq!(again.get_or_allocate("db"), Ok(db));
        again.release("web");
        // Round the range: the third uid first, then the released one.
        let third = again.get_or_allocate("third").expect("third");
        assert!(third != web && third != db);
        assert_eq!(again.get_or_allocate("fourth"), Ok(web));
        assert!(again.get_or_allocate("fifth").is_err(), "range full");
        fs::write(&file, b"{").expect("corrupt");
        assert!(DynamicUsers::open(&file, range).is_err());
    }

    #[test]
    fn userns_blocks_are_whole_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("userns-ids.json");
        for bad in [(65537, 196607), (65536, 196606), (0x8_0000, 0x8_0000)] {
            let range = IdRange {
                first: bad.0,
                last: bad.1,
            };
            assert!(UsernsIds::open(&file, range).is_err(), "{bad:?}");
        }
        let two = IdRange {
            first: 65536,
            last: 3 * 65536 - 1,
        };
        let ids = UsernsIds::open(&file, two).expect("open");
        let web = ids.get_or_allocate("web").expect("web");
        let db = ids.get_or_allocate("db").expect("db");
        assert_eq!((web, db), (65536, 131072));
        assert!(ids.get_or_allocate("third").is_err(), "two blocks only");
        let again = UsernsIds::open(&file, two).expect("reopen");
        assert_eq!(
            again.get_or_allocate("db"),
            Ok(db),
            "kept across agent restarts"
        );
        again.release("web");
        assert_eq!(again.get_or_allocate("third"), Ok(web));
        assert_eq!(UsernsIds::DEFAULT.first % USERNS_SIZE, 0);
        assert!(UsernsIds::open(&file, UsernsIds::DEFAULT).is_ok());
    }
}
