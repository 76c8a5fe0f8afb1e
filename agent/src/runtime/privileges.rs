//! What a service process may do, and the code that cuts it down to that right before it
//! executes: its open-file limit, its capability bounding set, supplementary groups, gid,
//! uid, its capabilities (ambient ones for a non-root user, so they survive `execve`). The
//! service process (forked by the instance's init) and every exec probe (forked by the probe
//! helper) go through the same [`Privileges::apply`], so a probe never has more or less than
//! the service it checks.
//!
//! [`CapPlan::for_instance`] is pure. [`Privileges::apply`] runs in the freshly forked child of
//! a single-threaded process, between `fork` and `execve`: plain system calls only, no
//! allocation, nothing that can panic.
//!
//! Imports from the crate: `spec` only.

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::spec::{Capability, DEFAULT_ROOT_CAPABILITIES, capability_mask};

/// The capability sets a service process starts with (bit n: capability number n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapPlan {
    /// Every capability outside it is dropped from the bounding set.
    pub bounding: u64,
    /// The permitted and effective sets.
    pub permitted: u64,
    pub inheritable: u64,
    /// Raised as ambient capabilities, which a non-root process keeps across `execve`.
    pub ambient: u64,
}

impl CapPlan {
    /// The capabilities of an instance whose spec lists `listed` (`None`: the default) and
    /// that runs as `uid`.
    ///
    /// Root gets `listed`, or Docker's default set, as its bounding, permitted and effective
    /// sets; `execve` gives root exactly its bounding set, and nothing is inheritable (as in
    /// container runtimes since CVE-2022-24769). A non-root user gets `listed`, or nothing,
    /// in every set including the ambient one: that is how a process without uid 0 keeps a
    /// capability across `execve`.
    pub fn for_instance(listed: Option<&[Capability]>, uid: u32) -> CapPlan {
        let root = uid == 0;
        let keep = match listed {
            Some(set) => capability_mask(set),
            None if root => capability_mask(&DEFAULT_ROOT_CAPABILITIES),
            None => 0,
        };
        if root {
            CapPlan {
                bounding: keep,
                permitted: keep,
                inheritable: 0,
                ambient: 0,
            }
        } else {
            CapPlan {
                bounding: keep,
                permitted: keep,
                inheritable: keep,
                ambient: keep,
            }
        }
    }

    /// A command-line form: the four masks in hex, `bounding:permitted:inheritable:ambient`.
    pub fn to_arg(&self) -> String {
        format!(
            "{:x}:{:x}:{:x}:{:x}",
            self.bounding, self.permitted, self.inheritable, self.ambient
        )
    }

    /// Reads [`CapPlan::to_arg`]'s form.
    pub fn from_arg(s: &str) -> Option<CapPlan> {
        let mut masks = s.split(':').map(|m| u64::from_str_radix(m, 16).ok());
        let plan = CapPlan {
            bounding: masks.next()??,
            permitted: masks.next()??,
            inheritable: masks.next()??,
            ambient: masks.next()??,
        };
        masks.next().is_none().then_some(plan)
    }
}

/// The soft `RLIMIT_NOFILE` the agent was started with, when it raised its own.
static STARTED_NOFILE_SOFT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Raises the agent's soft open-file limit to its hard limit, as Go programs and most
/// daemons do: an agent holds a few descriptors per instance (stat files, pidfds, sockets)
/// and would otherwise meet the common 1024 long before its instances do. Returns the
/// limits before and after when it raised them. Its services get the soft limit back (see
/// [`inherited_nofile_soft`]), unless their spec sets `resources.nofile`.
pub fn raise_open_file_limit() -> Result<Option<(u64, u64)>, Errno> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    // Set once, at start; a second call finds soft == hard and returns above.
    let _ = STARTED_NOFILE_SOFT.set(soft);
    Ok(Some((soft, hard)))
}

/// Descriptors the agent's table is made to hold at start ([`reserve_descriptor_table`]):
/// about 800 instances' worth (a pidfd, a mount namespace and 7 stat files each, plus
/// sockets). The table costs 8 bytes of kernel memory per slot: 64 KiB.
pub const RESERVED_DESCRIPTORS: u64 = 8192;

/// Grows this process's descriptor table to hold `min(RESERVED_DESCRIPTORS, soft limit)`
/// descriptors now. Call it while the process has one thread. Returns the table's size.
///
/// The kernel grows a table by doubling it when a descriptor beyond it is opened, and in a
/// process of several threads each growth waits for an RCU grace period first
/// (`expand_fdtable`): several milliseconds during which the thread that opened the
/// descriptor is stopped. An agent adopting 200 instances after a restart grew its table from
/// 64 to 2048 slots, 5 growths in a row, and was stopped about 9 ms for each one. A table
/// grown while the process has one thread costs no wait, and a table never shrinks. Closing
/// the descriptor that grew it leaves the table as it is; children copy only the part in use.
pub fn reserve_descriptor_table() -> Result<u64, Errno> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
    use nix::sys::resource::{Resource, getrlimit};
    use nix::sys::stat::Mode;
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let slots = RESERVED_DESCRIPTORS.min(soft);
    let Some(last) = slots.checked_sub(1).and_then(|l| i32::try_from(l).ok()) else {
        return Ok(0);
    };
    let any = open("/", OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())?;
    // The lowest free descriptor at or above `last`: the table now holds at least `slots`.
    let high = fcntl(&any, FcntlArg::F_DUPFD_CLOEXEC(last))?;
    nix::unistd::close(high)?;
    Ok(slots)
}

/// The soft open-file limit a service starts with when its spec sets none: the one the
/// agent was started with, if the agent raised its own; `None`: the agent's own, untouched.
pub fn inherited_nofile_soft() -> Option<u64> {
    STARTED_NOFILE_SOFT.get().copied()
}

/// What a service process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privileges {
    /// `None`: the caller's (the agent's) user.
    pub uid: Option<u32>,
    /// With `uid`; supplementary groups are cleared with it.
    pub gid: Option<u32>,
    /// `None`: capabilities are left as they are (a launch config from an older agent).
    pub caps: Option<CapPlan>,
    /// `RLIMIT_NOFILE`, soft and hard; `None`: inherited.
    pub nofile: Option<u64>,
    /// Without `nofile`: the soft open-file limit the agent itself was started with, given
    /// back to the service (the agent raises its own to the hard limit, see
    /// [`raise_open_file_limit`]); the hard limit stays as inherited.
    pub nofile_soft: Option<u64>,
}

/// A step of [`Privileges::apply`] that failed, and why.
pub type StepError = (&'static str, Errno);

impl Privileges {
    /// Applies everything, in the only order that works: the limit and the bounding set
    /// while all privileges are held (raising a hard limit needs CAP_SYS_RESOURCE, dropping
    /// from the bounding set CAP_SETPCAP), then groups and gid (CAP_SETGID), then the uid
    /// (with PR_SET_KEEPCAPS when a non-root user keeps capabilities, since setuid clears
    /// them otherwise), then the capability sets and the ambient ones, which need the
    /// capability in the permitted and inheritable sets. `no_new_privs` is the caller's last
    /// step.
    ///
    /// Only system calls; for a forked child of a single-threaded process.
    pub fn apply(&self) -> Result<(), StepError> {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Some(n) = self.nofile {
            setrlimit(Resource::RLIMIT_NOFILE, n, n)
                .map_err(|e| ("setting the open-file limit (resources.nofile)", e))?;
        } else if let Some(soft) = self.nofile_soft {
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)
                .map_err(|e| ("reading the open-file limit", e))?;
            setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard)
                .map_err(|e| ("restoring the inherited open-file limit", e))?;
        }
        if let Some(plan) = self.caps {
            // A process that holds no capability at all (an agent not run as root) has
            // nothing to drop from its bounding set, and cannot: with no_new_privs it can
            // never gain what is left there.
            let held = capget().map_err(|e| ("reading capabilities", e))?;
            if held.permitted != 0 {
                drop_bounding(plan.bounding)
                    .map_err(|e| ("dropping capabilities from the bounding set", e))?;
            }
        }
        // SAFETY: geteuid cannot fail.
        let is_root = unsafe { libc::geteuid() } == 0;
        if self.gid.is_some() || is_root {
            nix::unistd::setgroups(&[]).map_err(|e| ("clearing supplementary groups", e))?;
        }
        if let Some(gid) = self.gid {
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid)).map_err(|e| ("setgid", e))?;
        }
        let keep_caps = self.uid.is_some_and(|uid| uid != 0)
            && self.caps.is_some_and(|plan| plan.permitted != 0);
        if keep_caps {
            prctl(libc::PR_SET_KEEPCAPS, 1).map_err(|e| ("keeping capabilities", e))?;
        }
        if let Some(uid) = self.uid {
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(|e| ("setuid", e))?;
        }
        if let Some(plan) = self.caps {
            capset(plan.permitted, plan.permitted, plan.inheritable)
                .map_err(|e| ("setting capabilities (isolation.capabilities)", e))?;
            match prctl2(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as u64,
                0,
            ) {
                Ok(()) => {}
                // A kernel without ambient capabilities (before 4.3) has none to clear.
                Err(Errno::EINVAL) if plan.ambient == 0 => {}
                Err(e) => return Err(("clearing ambient capabilities", e)),
            }
            for cap in bits(plan.ambient) {
                prctl2(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as u64, cap)
                    .map_err(|e| ("raising ambient capabilities", e))?;
            }
        }
        if keep_caps {
            prctl(libc::PR_SET_KEEPCAPS, 0).map_err(|e| ("resetting keep-capabilities", e))?;
        }
        Ok(())
    }
}

/// The numbers of the bits set in `mask`.
fn bits(mask: u64) -> impl Iterator<Item = u64> {
    (0..64).filter(move |n| mask & (1 << n) != 0)
}

fn prctl(option: libc::c_int, arg: u64) -> Result<(), Errno> {
    prctl2(option, arg, 0)
}

fn prctl2(option: libc::c_int, arg2: u64, arg3: u64) -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments only; nothing is read or written through them.
    let r = unsafe {
        libc::prctl(
            option,
            arg2 as libc::c_ulong,
            arg3 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Drops every capability outside `keep` from the bounding set, up to the kernel's last one.
/// One `prctl` per capability on the start path: dropping one the set no longer holds
/// succeeds; only when a drop is refused is the set read to tell whether it mattered.
fn drop_bounding(keep: u64) -> Result<(), Errno> {
    for cap in (0..64).filter(|n| keep & (1 << n) == 0) {
        match prctl(libc::PR_CAPBSET_DROP, cap) {
            Ok(()) => {}
            // Past the last capability this kernel knows.
            Err(Errno::EINVAL) => return Ok(()),
            Err(e) => {
                // SAFETY: prctl with integer arguments only.
                let present =
                    unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
                if present != 0 {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's capability sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    permitted: u64,
}

fn capget() -> Result<Held, Errno> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a version-3 header and room for the two structs version 3 uses.
    let r = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(Held {
        permitted: u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32),
    })
}

fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let half = |mask: u64, i: u32| u32::try_from((mask >> (32 * i)) & 0xffff_ffff).unwrap_or(0);
    let data = [0, 1].map(|i| CapData {
        effective: half(effective, i),
        permitted: half(permitted, i),
        inheritable: half(inheritable, i),
    });
    // SAFETY: capset with a version-3 header and the two structs version 3 reads.
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_table_is_grown_and_nothing_stays_open() {
        let fds = || std::fs::read_dir("/proc/self/fd").expect("fds").count();
        let before = fds();
        let slots = reserve_descriptor_table().expect("reserve");
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let size: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize");
        assert!(slots > 0 && size >= slots, "table of {size} for {slots}");
        // The descriptor that grew it (the lowest free one at the table's last slot) is
        // closed again.
        let last = std::path::PathBuf::from(format!("/proc/self/fd/{}", slots - 1));
        assert!(!last.exists(), "{} is still open", last.display());
        // Other tests run meanwhile and open files: compare loosely.
        assert!(fds() <= before + 8, "{before} -> {}", fds());
    }

    const DOCKER: u64 = 0xa004_25fb;
    const NET_BIND_SERVICE: u64 = 1 << 10;

    #[test]
    fn plans_for_root_and_other_users() {
        let bind = [Capability::CAP_NET_BIND_SERVICE];
        let kill = [Capability::CAP_KILL];
        let cases: &[(Option<&[Capability]>, u32, CapPlan)] = &[
            // A non-root user: nothing at all by default.
            (
                None,
                65534,
                CapPlan {
                    bounding: 0,
                    permitted: 0,
                    inheritable: 0,
                    ambient: 0,
                },
            ),
            // ...or exactly what is listed, ambient so that it survives execve.
            (
                Some(&bind),
                1000,
                CapPlan {
                    bounding: NET_BIND_SERVICE,
                    permitted: NET_BIND_SERVICE,
                    inheritable: NET_BIND_SERVICE,
                    ambient: NET_BIND_SERVICE,
                },
            ),
            // Root: Docker's default set, nothing inheritable or ambient.
            (
                None,
                0,
                CapPlan {
                    bounding: DOCKER,
                    permitted: DOCKER,
                    inheritable: 0,
                    ambient: 0,
                },
            ),
            // ...or exactly what is listed, which may be less or more than the default.
            (
                Some(&kill),
                0,
                CapPlan {
                    bounding: 1 << 5,
                    permitted: 1 << 5,
                    inheritable: 0,
                    ambient: 0,
                },
            ),
            (
                Some(&[
                    Capability::CAP_SYS_ADMIN,
                    Capability::CAP_CHECKPOINT_RESTORE,
                ]),
                0,
                CapPlan {
                    bounding: (1 << 21) | (1 << 40),
                    permitted: (1 << 21) | (1 << 40),
                    inheritable: 0,
                    ambient: 0,
                },
            ),
            // An empty list is "none", also for root.
            (
                Some(&[]),
                0,
                CapPlan {
                    bounding: 0,
                    permitted: 0,
                    inheritable: 0,
                    ambient: 0,
                },
            ),
        ];
        for (listed, uid, expected) in cases {
            assert_eq!(
                CapPlan::for_instance(*listed, *uid),
                *expected,
                "{listed:?} as {uid}"
            );
        }
    }

    #[test]
    fn plan_argument_round_trips() {
        for plan in [
            CapPlan::for_instance(None, 0),
            CapPlan::for_instance(None, 1),
            CapPlan::for_instance(Some(&[Capability::CAP_CHECKPOINT_RESTORE]), 1),
            CapPlan {
                bounding: u64::MAX,
                permitted: 1,
                inheritable: 0,
                ambient: 1 << 63,
            },
        ] {
            assert_eq!(CapPlan::from_arg(&plan.to_arg()), Some(plan), "{plan:?}");
        }
        assert_eq!(
            CapPlan::for_instance(None, 0).to_arg(),
            "a00425fb:a00425fb:0:0"
        );
        for bad in [
            "",
            "-",
            "1:2:3",
            "1:2:3:4:5",
            "x:0:0:0",
            "1:2::4",
            "10000000000000000:0:0:0",
        ] {
            assert_eq!(CapPlan::from_arg(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bits_lists_set_bits() {
        assert_eq!(bits(0).count(), 0);
        assert_eq!(bits(0x401).collect::<Vec<_>>(), [0, 10]);
        assert_eq!(bits(1 << 63).collect::<Vec<_>>(), [63]);
    }

    #[test]
    fn capget_reads_this_process() {
        // Whatever this test runs as, the call works and agrees with /proc.
        let held = capget().expect("capget");
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let prm = status
            .lines()
            .find_map(|l| l.strip_prefix("CapPrm:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("CapPrm");
        assert_eq!(held.permitted, prm);
    }
}
