//! The default system call filter (`[isolation] seccomp = "default"`): what container
//! runtimes allow (Docker's default profile), with `EPERM` for everything else, compiled to
//! classic BPF by `seccompiler` on the agent's side — once per distinct [`Policy`], which only
//! depends on a revision's capabilities and PID namespace — and installed by the instance's
//! init in the service process (and by the exec-probe helper in each probe) right before it
//! executes, after `no_new_privs`. The init itself runs unfiltered.
//!
//! Refused: mounts and the new mount API, `pivot_root`, `umount2`, `kexec_*`, module loading,
//! `bpf`, `perf_event_open`, keyrings (`keyctl`, `add_key`, `request_key`), `reboot`,
//! `swapon`/`swapoff`, clock and time changes, `open_by_handle_at`, `unshare` and `setns`,
//! `clone` with namespace flags (a new user namespace among them), `io_uring_*`,
//! `userfaultfd`, `AF_VSOCK` sockets, personalities other than the usual ones, and `ptrace`
//! (with `process_vm_readv`/`writev`) when the instance shares the host's PID namespace —
//! there the processes it could reach are not its own. A capability granted in the spec
//! lifts the rules it governs, as in Docker's profile (`CAP_SYS_ADMIN`: mounts, namespaces,
//! `clone3`; `CAP_SYS_PTRACE`: `ptrace`, `kcmp`, `pidfd_getfd`; `CAP_SYS_MODULE`, `CAP_SYS_TIME`,
//! ...). `clone3` answers `ENOSYS` (its flags cannot be inspected), so C libraries fall back
//! to `clone`, whose flags can.
//!
//! The compiled program travels to the init as bytes ([`to_bytes`], [`from_bytes`]).
//!
//! Imports from the crate: `spec` only.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule, TargetArch,
    sock_filter,
};

use crate::spec::{Capability, capability_mask};

/// What the default filter depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Policy {
    /// The service's permitted capabilities (bit n: capability n).
    pub capabilities: u64,
    /// The instance has its own PID namespace: every process it can see is its own.
    pub own_pid_namespace: bool,
}

/// Namespace flags of `clone(2)` that only `CAP_SYS_ADMIN` may use (Docker's mask):
/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
/// CLONE_NEWPID | CLONE_NEWNET`.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// `AF_VSOCK`.
const AF_VSOCK: u64 = 40;

/// The personalities a process may switch to: `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `UNAME26 | PER_LINUX32`, and the query `0xffffffff`.
const PERSONALITIES: [u64; 5] = [0, 8, 0x20000, 0x20008, 0xffff_ffff];

/// System calls any service may make.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_adjtimex,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fanotify_mark,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_ioctl,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lgetxattr,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_name_to_handle_at,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_mrelease,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_tid_address,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd4,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

/// The older system calls that only x86_64 has (aarch64 has their `*at` forms only).
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: &[libc::c_long] = &[
    libc::SYS_access,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_creat,
    libc::SYS_dup2,
    libc::SYS_epoll_create,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd,
    libc::SYS_fork,
    libc::SYS_futimesat,
    libc::SYS_getdents,
    libc::SYS_getpgrp,
    libc::SYS_inotify_init,
    libc::SYS_lchown,
    libc::SYS_link,
    libc::SYS_lstat,
    libc::SYS_mkdir,
    libc::SYS_mknod,
    libc::SYS_modify_ldt,
    libc::SYS_open,
    libc::SYS_pause,
    libc::SYS_pipe,
    libc::SYS_poll,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_rmdir,
    libc::SYS_select,
    libc::SYS_signalfd,
    libc::SYS_stat,
    libc::SYS_symlink,
    libc::SYS_time,
    libc::SYS_unlink,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_vfork,
];

#[cfg(target_arch = "aarch64")]
const ALLOWED_ARCH: &[libc::c_long] = &[];

/// System calls a capability makes available, as in Docker's profile.
fn by_capability() -> Vec<(Capability, Vec<libc::c_long>)> {
    use Capability::*;
    let mut admin = vec![
        libc::SYS_bpf,
        libc::SYS_clone3,
        libc::SYS_fanotify_init,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fsopen,
        libc::SYS_fspick,
        libc::SYS_mount,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_perf_event_open,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_setdomainname,
        libc::SYS_sethostname,
        libc::SYS_setns,
        libc::SYS_syslog,
        libc::SYS_umount2,
        libc::SYS_unshare,
    ];
    #[cfg(target_arch = "x86_64")]
    admin.push(libc::SYS_lookup_dcookie);
    #[cfg(target_arch = "x86_64")]
    let rawio = vec![libc::SYS_iopl, libc::SYS_ioperm];
    #[cfg(not(target_arch = "x86_64"))]
    let rawio = vec![];
    vec![
        (CAP_SYS_ADMIN, admin),
        (CAP_SYS_BOOT, vec![libc::SYS_reboot]),
        (CAP_SYS_CHROOT, vec![libc::SYS_chroot]),
        (
            CAP_SYS_MODULE,
            vec![
                libc::SYS_delete_module,
                libc::SYS_init_module,
                libc::SYS_finit_module,
            ],
        ),
        (CAP_SYS_PACCT, vec![libc::SYS_acct]),
        (
            CAP_SYS_PTRACE,
            vec![
                libc::SYS_kcmp,
                libc::SYS_pidfd_getfd,
                libc::SYS_process_madvise,
                libc::SYS_process_vm_readv,
                libc::SYS_process_vm_writev,
                libc::SYS_ptrace,
            ],
        ),
        (CAP_SYS_RAWIO, rawio),
        (
            CAP_SYS_TIME,
            vec![libc::SYS_settimeofday, libc::SYS_clock_settime],
        ),
        (CAP_SYS_TTY_CONFIG, vec![libc::SYS_vhangup]),
        (
            CAP_SYS_NICE,
            vec![
                libc::SYS_get_mempolicy,
                libc::SYS_mbind,
                libc::SYS_set_mempolicy,
            ],
        ),
        (CAP_SYSLOG, vec![libc::SYS_syslog]),
        (CAP_BPF, vec![libc::SYS_bpf]),
        (CAP_PERFMON, vec![libc::SYS_perf_event_open]),
        (CAP_DAC_READ_SEARCH, vec![libc::SYS_open_by_handle_at]),
    ]
}

/// The architecture the filters are built for (the agent's own: the init is the same build).
fn target_arch() -> Result<TargetArch, String> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| format!("no seccomp filter for {}", std::env::consts::ARCH))
}

/// Whether this build can make the default filter (x86_64 and aarch64).
pub fn supported() -> bool {
    cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) && target_arch().is_ok()
}

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| e.to_string())
}

/// The rules of the default filter for `policy`: system call number -> the rules of which one
/// must match (empty: always allowed).
fn rules(policy: Policy) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let has = |cap: Capability| policy.capabilities & capability_mask(&[cap]) != 0;
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in ALLOWED.iter().chain(ALLOWED_ARCH) {
        map.insert(*nr, Vec::new());
    }
    for (cap, calls) in by_capability() {
        if has(cap) {
            for nr in calls {
                map.insert(nr, Vec::new());
            }
        }
    }
    if policy.own_pid_namespace {
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
        ] {
            map.insert(nr, Vec::new());
        }
    }
    if !has(Capability::CAP_SYS_ADMIN) {
        map.insert(
            libc::SYS_clone,
            vec![rule(vec![arg(
                0,
                SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
                0,
            )?])?],
        );
    } else {
        map.insert(libc::SYS_clone, Vec::new());
    }
    map.insert(
        libc::SYS_socket,
        vec![rule(vec![arg(0, SeccompCmpOp::Ne, AF_VSOCK)?])?],
    );
    map.insert(
        libc::SYS_personality,
        PERSONALITIES
            .iter()
            .map(|p| rule(vec![arg(0, SeccompCmpOp::Eq, *p)?]))
            .collect::<Result<_, _>>()?,
    );
    Ok(map)
}

/// What the filter answers for one system call number.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Allow,
    Errno(u32),
    /// Allowed when one of the rules matches its arguments, else `EPERM`.
    Rules(Vec<SeccompRule>),
}

/// `AUDIT_ARCH_*` of the architecture the filter is built for (linux/audit.h: the ELF
/// machine, 64-bit, little-endian).
const AUDIT_ARCH: u32 = if cfg!(target_arch = "aarch64") {
    0xC000_00B7
} else {
    0xC000_003E
};

/// `seccomp_data` offsets: the system call number and the architecture.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

/// Classic BPF opcodes (linux/bpf_common.h): `BPF_LD | BPF_W | BPF_ABS`, `BPF_JMP | BPF_JA`,
/// `BPF_JMP | BPF_JEQ | BPF_K`, `BPF_JMP | BPF_JGE | BPF_K`, `BPF_RET | BPF_K`.
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The answer for every system call number of `policy` that is not refused with `EPERM`.
fn answers(policy: Policy) -> Result<BTreeMap<u32, Answer>, String> {
    let mut map: BTreeMap<u32, Answer> = BTreeMap::new();
    for (nr, rules) in rules(policy)? {
        let nr = u32::try_from(nr).map_err(|_| format!("system call number {nr}"))?;
        let answer = if rules.is_empty() {
            Answer::Allow
        } else {
            Answer::Rules(rules)
        };
        map.insert(nr, answer);
    }
    // Without CAP_SYS_ADMIN `clone3` says it does not exist: C libraries then use `clone`,
    // whose flags the filter can read (clone3 passes them in memory it cannot).
    if policy.capabilities & capability_mask(&[Capability::CAP_SYS_ADMIN]) == 0 {
        let clone3 =
            u32::try_from(libc::SYS_clone3).map_err(|_| "the clone3 system call number")?;
        map.insert(clone3, Answer::Errno(libc::ENOSYS.cast_unsigned()));
    }
    Ok(map)
}

/// The code of one answer: a return, or (rules) each rule's conditions followed by a return
/// that allows, and `EPERM` when none matched.
fn leaf(answer: &Answer) -> Vec<sock_filter> {
    match answer {
        Answer::Allow => vec![stmt(RET_K, RET_ALLOW)],
        Answer::Errno(e) => vec![stmt(RET_K, RET_ERRNO | (e & 0xffff))],
        Answer::Rules(rules) => {
            let mut out = Vec::new();
            for rule in rules {
                // seccompiler's rule code: on a mismatch it jumps just past the return that
                // follows it, to the next rule.
                let code: BpfProgram = rule.clone().into();
                out.extend(code);
                out.push(stmt(RET_K, RET_ALLOW));
            }
            out.push(stmt(RET_K, RET_ERRNO | libc::EPERM as u32));
            out
        }
    }
}

/// A binary search over `ranges` (each: its first system call number and its answer, up to
/// the next one's first number), the number loaded in the accumulator.
fn tree(ranges: &[(u32, &Answer)]) -> Vec<sock_filter> {
    let Some(((_, first), rest)) = ranges.split_first() else {
        return vec![stmt(RET_K, RET_ERRNO | libc::EPERM as u32)];
    };
    if rest.is_empty() {
        return leaf(first);
    }
    let mid = ranges.len() / 2;
    let (low, high) = ranges.split_at(mid);
    let below = tree(low);
    let above = tree(high);
    let from = high[0].0;
    let mut out = Vec::with_capacity(below.len() + above.len() + 2);
    match u8::try_from(below.len()) {
        // nr >= from: jump over the code for the lower numbers.
        Ok(skip) => out.push(jump(JMP_JGE_K, from, skip, 0)),
        // Too far for a conditional jump (8 bits): through an unconditional one (32 bits).
        Err(_) => {
            out.push(jump(JMP_JGE_K, from, 0, 1));
            out.push(stmt(JMP_JA, crate::num::count_u32(below.len())));
        }
    }
    out.extend(below);
    out.extend(above);
    out
}

/// The numbers from 0 up as ranges with one answer each (their first number and the
/// answer); numbers `answers` does not list get `refused`.
fn ranges<'a>(answers: &'a BTreeMap<u32, Answer>, refused: &'a Answer) -> Vec<(u32, &'a Answer)> {
    let mut out: Vec<(u32, &Answer)> = Vec::new();
    let mut push = |from: u32, answer: &'a Answer| {
        let constant = !matches!(answer, Answer::Rules(_));
        if constant && out.last().is_some_and(|(_, last)| *last == answer) {
            return; // the previous range goes on
        }
        out.push((from, answer));
    };
    let mut next = 0u32;
    for (nr, answer) in answers {
        if *nr > next {
            push(next, refused);
        }
        push(*nr, answer);
        next = nr.saturating_add(1);
    }
    push(next, refused);
    out
}

/// The program to install for `policy`: the architecture checked (another one kills the
/// process, as a system call number means nothing across architectures), then a binary
/// search over the system call number, so that the program stays short: the kernel runs it
/// for every system call number when the filter is attached (to cache which ones are always
/// allowed), and a linear list of ~350 numbers made that cost about a millisecond per start.
pub fn compile(policy: Policy) -> Result<BpfProgram, String> {
    target_arch()?;
    let answers = answers(policy)?;
    let refused = Answer::Errno(libc::EPERM as u32);
    let ranges = ranges(&answers, &refused);
    let mut program = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
    ];
    program.extend(tree(&ranges));
    if program.len() > usize::from(u16::MAX) {
        return Err(format!(
            "the seccomp filter has {} instructions",
            program.len()
        ));
    }
    Ok(program)
}

/// A program as bytes, 8 per instruction (code, jt, jf, k; native endianness).
pub fn to_bytes(program: &[sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for i in program {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

/// Reads [`to_bytes`]' form; `None` for a length that is not a whole number of instructions
/// or a program the kernel would refuse as too long or empty.
pub fn from_bytes(bytes: &[u8]) -> Option<BpfProgram> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) || bytes.len() / 8 > usize::from(u16::MAX)
    {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect(),
    )
}

/// Installs `program` on the calling thread, which must have `no_new_privs` set (the
/// service's child sets it as its last step before this) or hold `CAP_SYS_ADMIN`. For the
/// forked child of a single-threaded init, right before exec.
///
/// One `seccomp(2)` call: `seccompiler::apply_filter` would set `no_new_privs` once more
/// first, a second system call on every start.
pub fn install(program: &[sock_filter]) -> Result<(), std::io::Error> {
    let len = u16::try_from(program.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a filter of {} instructions is too long", program.len()),
        )
    })?;
    if len == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an empty filter",
        ));
    }
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut().cast::<libc::sock_filter>(),
    };
    // SAFETY: `fprog` points at `len` instructions that live until the call returns (the
    // kernel copies them); seccompiler's `sock_filter` has libc's layout (both are the
    // kernel's `struct sock_filter`, `repr(C)`).
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{SeccompAction, SeccompFilter};

    const DOCKER_ROOT: u64 = 0xa004_25fb;

    fn policy(capabilities: u64, own_pid_namespace: bool) -> Policy {
        Policy {
            capabilities,
            own_pid_namespace,
        }
    }

    /// The same rules as [`compile`], laid out by `seccompiler` as one linear list (and `clone3`
    /// as a second program): the reference the binary search is checked against.
    fn compile_linear(policy: Policy) -> Result<Vec<BpfProgram>, String> {
        let arch = target_arch()?;
        let main = SeccompFilter::new(
            rules(policy)?,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            arch,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|e| format!("building the seccomp filter: {e}"))?;
        let mut programs = vec![main];
        if policy.capabilities & capability_mask(&[Capability::CAP_SYS_ADMIN]) == 0 {
            let clone3 = SeccompFilter::new(
                BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
                arch,
            )
            .and_then(BpfProgram::try_from)
            .map_err(|e| format!("building the seccomp filter: {e}"))?;
            programs.push(clone3);
        }
        Ok(programs)
    }

    /// What `program` answers for `data` (`seccomp_data`: nr, arch, ip, args), run as the
    /// kernel would: the classic BPF that seccompiler and [`compile`] emit.
    fn run(program: &[sock_filter], data: &[u8; 64]) -> u32 {
        let word = |k: u32| {
            let k = k as usize;
            u32::from_ne_bytes([data[k], data[k + 1], data[k + 2], data[k + 3]])
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &program[pc];
            pc += 1;
            let cond = |taken: bool| if taken { i.jt } else { i.jf } as usize;
            match i.code {
                0x20 => acc = word(i.k),
                0x54 => acc &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += cond(acc == i.k),
                0x25 => pc += cond(acc > i.k),
                0x35 => pc += cond(acc >= i.k),
                0x45 => pc += cond(acc & i.k != 0),
                0x06 => return i.k,
                other => panic!("opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    fn data(arch: u32, nr: u32, args: [u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&nr.to_ne_bytes());
        d[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        d
    }

    /// Of several filters, the kernel takes the answer with the lowest action (the most
    /// restrictive); among errnos, the one of the filter installed last.
    fn run_all(programs: &[BpfProgram], d: &[u8; 64]) -> u32 {
        let mut answer = RET_ALLOW;
        for p in programs {
            let a = run(p, d);
            let rank = |x: u32| (x & 0xffff_0000).cast_signed();
            if rank(a) <= rank(answer) {
                answer = a;
            }
        }
        answer
    }

    #[test]
    fn binary_search_answers_like_the_linear_list() {
        let sys_admin = capability_mask(&[Capability::CAP_SYS_ADMIN]);
        let ptrace = capability_mask(&[Capability::CAP_SYS_PTRACE]);
        let args_to_try: Vec<[u64; 6]> = vec![
            [0; 6],
            [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
            [libc::SIGCHLD as u64, 0, 0, 0, 0, 0],
            [AF_VSOCK, 1, 0, 0, 0, 0],
            [libc::AF_INET as u64, 1, 0, 0, 0, 0],
            [0x20000, 0, 0, 0, 0, 0],
            [0xffff_ffff, 0, 0, 0, 0, 0],
            [0x1_0000_0000, 0, 0, 0, 0, 0],
            [u64::MAX; 6],
        ];
        for p in [
            policy(DOCKER_ROOT, true),
            policy(DOCKER_ROOT, false),
            policy(0, true),
            policy(0, false),
            policy(DOCKER_ROOT | sys_admin, true),
            policy(ptrace, false),
            policy(u64::MAX, false),
        ] {
            let tree = compile(p).expect("compiles");
            let linear = compile_linear(p).expect("compiles");
            assert!(
                tree.len() < 400,
                "{} instructions for {p:?}: no longer a short search",
                tree.len()
            );
            // Some answers written out, so that the interpreter cannot agree with itself alone.
            let nr = |n: libc::c_long| {
                data(
                    AUDIT_ARCH,
                    u32::try_from(n).expect("a syscall number"),
                    [0; 6],
                )
            };
            assert_eq!(run(&tree, &nr(libc::SYS_read)), RET_ALLOW);
            assert_eq!(
                run(
                    &tree,
                    &data(
                        0x4000_0003,
                        u32::try_from(libc::SYS_read).expect("a syscall number"),
                        [0; 6]
                    )
                ),
                RET_KILL_PROCESS
            );
            if p.capabilities & sys_admin == 0 {
                assert_eq!(run(&tree, &nr(libc::SYS_mount)), RET_ERRNO | 1);
                assert_eq!(
                    run(&tree, &nr(libc::SYS_clone3)),
                    RET_ERRNO | libc::ENOSYS as u32
                );
            }
            let numbers = (0..1100u32)
                .chain([0x4000_0000, 0x4000_0001, 0x4000_0100, 0x7fff_ffff])
                .chain([u32::MAX - 1, u32::MAX]);
            for nr in numbers {
                for args in &args_to_try {
                    for arch in [AUDIT_ARCH, 0x4000_0003] {
                        let d = data(arch, nr, *args);
                        assert_eq!(
                            run(&tree, &d),
                            run_all(&linear, &d),
                            "nr {nr} args {args:x?} arch {arch:#x} policy {p:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bytes_round_trip() {
        let program = compile(policy(DOCKER_ROOT, true)).expect("compiles");
        let bytes = to_bytes(&program);
        assert_eq!(bytes.len(), program.len() * 8);
        assert_eq!(from_bytes(&bytes), Some(program));
        for bad in [&[][..], &[0u8; 7][..], &[0u8; 9][..]] {
            assert_eq!(from_bytes(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rules_follow_capabilities_and_pid_namespace() {
        let sys_admin = capability_mask(&[Capability::CAP_SYS_ADMIN]);
        let ptrace = capability_mask(&[Capability::CAP_SYS_PTRACE]);
        // (capabilities, own pid ns, syscall, present unconditionally)
        let cases: &[(u64, bool, libc::c_long, Option<bool>)] = &[
            (DOCKER_ROOT, true, libc::SYS_read, Some(true)),
            (DOCKER_ROOT, true, libc::SYS_mount, None),
            (DOCKER_ROOT | sys_admin, true, libc::SYS_mount, Some(true)),
            (DOCKER_ROOT, true, libc::SYS_unshare, None),
            (DOCKER_ROOT, true, libc::SYS_keyctl, None),
            (DOCKER_ROOT, true, libc::SYS_kexec_load, None),
            (DOCKER_ROOT, true, libc::SYS_finit_module, None),
            (DOCKER_ROOT, true, libc::SYS_bpf, None),
            (DOCKER_ROOT, true, libc::SYS_io_uring_setup, None),
            (DOCKER_ROOT, true, libc::SYS_clone, Some(false)),
            (DOCKER_ROOT | sys_admin, true, libc::SYS_clone, Some(true)),
            (DOCKER_ROOT, true, libc::SYS_ptrace, Some(true)),
            (DOCKER_ROOT, false, libc::SYS_ptrace, None),
            (ptrace, false, libc::SYS_ptrace, Some(true)),
            (0, true, libc::SYS_socket, Some(false)),
            (DOCKER_ROOT, true, libc::SYS_chroot, Some(true)),
            (0, true, libc::SYS_chroot, None),
        ];
        for (caps, pidns, nr, want) in cases {
            let map = rules(policy(*caps, *pidns)).expect("rules");
            let got = map.get(nr).map(Vec::is_empty);
            assert_eq!(got, *want, "syscall {nr} with caps {caps:x} pidns {pidns}");
        }
    }

    #[test]
    fn installed_filter_refuses_and_allows() {
        let program = compile(policy(DOCKER_ROOT, true)).expect("compiles");
        // In a forked child: the filter stays with it.
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let code = match install(&program) {
                Err(_) => 10,
                Ok(()) => {
                    let errno = || std::io::Error::last_os_error().raw_os_error();
                    // SAFETY: plain system calls; the failures are what is checked.
                    unsafe {
                        if libc::unshare(libc::CLONE_NEWUSER) == 0 || errno() != Some(libc::EPERM) {
                            libc::_exit(11)
                        }
                        if libc::syscall(libc::SYS_clone3, 0, 0) != -1
                            || errno() != Some(libc::ENOSYS)
                        {
                            libc::_exit(12)
                        }
                        if libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) != -1
                            || errno() != Some(libc::EPERM)
                        {
                            libc::_exit(13)
                        }
                        if libc::getpid() <= 0 {
                            libc::_exit(14)
                        }
                    }
                    0
                }
            };
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "the step that failed");
    }
}
