//! The Linux runtime: one `clone3` per instance, straight into new namespaces, with a pidfd.
//!
//! The child of `clone3` is the instance's init (PID 1 of its new PID namespace). Between
//! `clone3` and `execve` it runs only async-signal-safe system calls on data prepared by the
//! parent: it writes `"0"` to each of the instance cgroup's `cgroup.procs` files (so it is
//! inside its limits before it executes anything), wires fds 0-3, marks every other fd
//! close-on-exec and executes `/proc/self/exe` as `corral-init`. If any step fails, it writes
//! the step and errno to a close-on-exec pipe and exits; the parent reads that pipe when the
//! instance ends. Exits are observed through the pidfd (readable when the process ends) and
//! reaped with `waitid(P_PIDFD)`.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag};
use nix::sys::stat::Mode;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::launch::{Identity, service_env};
use super::privileges::CapPlan;
use super::{
    EXIT_RECORD, ExitRecord, INIT_CONFIG, INIT_NAME, InitConfig, InitExit, InstanceFiles, LOG_STAT,
    LogStat, ProcessRef, ProcessStatus, Processes, RUN_DIR_FD, SocketBroker, SpawnError, Spawned,
    StartRequest,
};
use super::{image, package};
use crate::spec::{Namespace, ServiceSpec, UserSpec};

/// `struct clone_args` of clone3(2) (the version-2 layout, 88 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (linux/sched.h; libc's constant overflows a c_int).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Steps of the child between clone3 and exec, reported through the error pipe.
const STEP_CGROUP: u8 = 1;
const STEP_FDS: u8 = 2;
const STEP_EXEC: u8 = 3;

/// Source fds are moved at or above this number before the child rearranges 0-3.
const HIGH_FD: RawFd = 16;

#[derive(Debug)]
pub struct LinuxRuntime {
    /// Kept read-only inside `readonly_root` instances.
    state_dir: PathBuf,
    run_root: PathBuf,
    log_root: PathBuf,
    /// What an instance's first process executes.
    exe: CString,
    /// The agent's own identity, for instances without `user` (resolved once).
    own: Option<Identity>,
    /// Hidden from instances with a mount namespace (see [`LinuxRuntime::hide`]): each
    /// path with its owning group.
    hidden: Vec<(PathBuf, u32)>,
}

/// The init to execute: the small `corral-init` installed next to `corrald`, or in
/// `../libexec/corral/` from `corrald`'s directory (`/usr/bin/corrald` finds
/// `/usr/libexec/corral/corral-init`, as the Debian package installs them), or else `corrald`
/// itself (which becomes the init when started under that name).
fn init_executable() -> CString {
    use std::os::unix::ffi::OsStrExt;
    let found = std::env::current_exe()
        .ok()
        .and_then(|exe| find_init(&exe))
        .and_then(|p| CString::new(p.as_os_str().as_bytes()).ok());
    found.unwrap_or_else(|| CString::from(c"/proc/self/exe"))
}

/// The first executable file among the places [`init_executable`] looks, for the agent
/// executable `exe`.
fn find_init(exe: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = exe.parent()?;
    let beside = Some(dir.join(INIT_NAME));
    let libexec = dir
        .parent()
        .map(|prefix| prefix.join("libexec/corral").join(INIT_NAME));
    [beside, libexec]
        .into_iter()
        .flatten()
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

impl LinuxRuntime {
    /// Instances keep their run state in `<state_dir>/run/<instance>` and their logs in
    /// `<state_dir>/logs/<instance>`.
    pub fn new(state_dir: &Path) -> io::Result<LinuxRuntime> {
        let run_root = state_dir.join("run");
        let log_root = state_dir.join("logs");
        for d in [&run_root, &log_root] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(d)?;
        }
        Ok(LinuxRuntime {
            // Absolute and without symlinks: instances resolve it in their own mount table.
            state_dir: fs::canonicalize(state_dir)?,
            run_root,
            log_root,
            exe: init_executable(),
            own: resolve_identity(None).ok().flatten(),
            hidden: Vec::new(),
        })
    }

    /// Keep `path` (the API socket) out of reach of instances that have a mount namespace:
    /// an instance running as root could otherwise connect to it and act as the agent's
    /// admin.
    ///
    /// Only instances that could open it are given the extra mount: those running as root
    /// (the default capabilities bypass file modes) or with the file's group.
    pub fn hide(&mut self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        let gid = fs::metadata(path).map_or(0, |m| m.gid());
        self.hidden.push((
            fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            gid,
        ));
    }

    pub fn run_dir(&self, instance: &str) -> PathBuf {
        self.run_root.join(instance)
    }

    pub fn log_dir(&self, instance: &str) -> PathBuf {
        self.log_root.join(instance)
    }
}

fn resolve_identity(user: Option<&UserSpec>) -> Result<Option<Identity>, String> {
    use nix::unistd::{Gid, Uid, User};
    let entry = |u: Option<User>, uid: u32, gid: Option<u32>| Identity {
        uid,
        gid: gid.or(u.as_ref().map(|u| u.gid.as_raw())).unwrap_or(uid),
        name: u.as_ref().map(|u| u.name.clone()),
        home: u.as_ref().map(|u| u.dir.to_string_lossy().into_owned()),
    };
    match user {
        None => {
            // The agent's own identity: no privilege change, but HOME/USER for the env.
            let uid = Uid::current().as_raw();
            let u = User::from_uid(Uid::current()).ok().flatten();
            Ok(Some(entry(u, uid, Some(Gid::current().as_raw()))))
        }
        Some(UserSpec::Name(name)) => match User::from_name(name) {
            Ok(Some(u)) => {
                let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
                Ok(Some(entry(Some(u), uid, Some(gid))))
            }
            Ok(None) => Err("no such user on this host".into()),
            Err(e) => Err(format!("looking it up failed: {e}")),
        },
        Some(UserSpec::Id { uid, gid }) => {
            let u = User::from_uid(Uid::from_raw(*uid)).ok().flatten();
            Ok(Some(entry(u, *uid, *gid)))
        }
    }
}

/// The capabilities of `spec`'s service process, which depend on the user it runs as (the
/// agent's own when `identity` is unknown).
fn self_uid() -> u32 {
    nix::unistd::Uid::effective().as_raw()
}

fn self_gid() -> u32 {
    nix::unistd::Gid::effective().as_raw()
}

fn cap_plan(spec: &ServiceSpec, identity: Option<&Identity>) -> CapPlan {
    let uid = identity.map_or_else(|| nix::unistd::Uid::effective().as_raw(), |i| i.uid);
    CapPlan::for_instance(spec.isolation.capabilities.as_deref(), uid)
}

/// A number from a one-line file under `/proc/sys`.
fn sysctl(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn cstring(instance: &str, what: &str, s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Invalid {
        instance: instance.to_string(),
        reason: format!("{what} holds a NUL byte"),
    })
}

/// Move `fd` to a number >= HIGH_FD, close-on-exec.
pub(super) fn high(fd: OwnedFd) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn clone_flags(spec: &ServiceSpec) -> u64 {
    let mut flags = 0;
    for ns in &spec.isolation.namespaces {
        flags |= match ns {
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Net => libc::CLONE_NEWNET,
        } as u64;
    }
    flags
}

/// Data the child reads between clone3 and exec; all of it prepared by the parent.
#[derive(Clone, Copy)]
pub(super) struct ChildPlan<'a> {
    pub(super) procs: &'a [OwnedFd],
    pub(super) stdin: RawFd,
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    /// Placed on fd 3: the run directory (an instance's init) or a pidfd (an exec probe).
    pub(super) fd3: RawFd,
    /// Placed on fds 4, 5, ...: the service's listening sockets.
    pub(super) extra: &'a [RawFd],
    pub(super) err_pipe: RawFd,
    pub(super) exe: &'a CString,
    pub(super) argv: &'a [*const libc::c_char],
    pub(super) envp: &'a [*const libc::c_char],
}

/// The child side of clone3. Only async-signal-safe system calls: no allocation, no locks.
///
/// # Safety
/// Must only be called in the child of a fork-like clone of a possibly multi-threaded
/// process, with `plan` fully prepared by the parent; never returns.
unsafe fn child_after_clone(plan: &ChildPlan<'_>) -> ! {
    let fail = |step: u8| -> ! {
        // SAFETY: errno location, write and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 5];
            msg[0] = step;
            msg[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(plan.err_pipe, msg.as_ptr().cast(), msg.len());
            libc::_exit(super::init::SETUP_FAILED as i32)
        }
    };
    for fd in plan.procs {
        // SAFETY: writing 2 bytes from a static buffer to an fd the parent opened.
        if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
            fail(STEP_CGROUP);
        }
    }
    // SAFETY: dup2 onto 0-3 from fds >= HIGH_FD opened by the parent; dup2 clears CLOEXEC
    // on the targets only. close_range then marks everything else close-on-exec (the error
    // pipe stays usable until exec succeeds).
    unsafe {
        if libc::dup2(plan.stdin, 0) < 0
            || libc::dup2(plan.stdout, 1) < 0
            || libc::dup2(plan.stderr, 2) < 0
            || libc::dup2(plan.fd3, RUN_DIR_FD) < 0
        {
            fail(STEP_FDS);
        }
        for (i, fd) in plan.extra.iter().enumerate() {
            if libc::dup2(*fd, RUN_DIR_FD + 1 + i as RawFd) < 0 {
                fail(STEP_FDS);
            }
        }
        if libc::syscall(
            libc::SYS_close_range,
            (RUN_DIR_FD + 1 + plan.extra.len() as RawFd) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            fail(STEP_FDS);
        }
        libc::execve(plan.exe.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
    }
    fail(STEP_EXEC)
}

/// clone3 a child with `flags` (namespaces), inside the cgroup (`into_cgroup` on v2, or by
/// writing the plan's `cgroup.procs` files), that wires fds 0-3 and executes the plan. Returns
/// its PID and pidfd.
pub(super) fn clone_exec(
    flags: u64,
    into_cgroup: Option<&OwnedFd>,
    plan: &ChildPlan<'_>,
) -> io::Result<(i32, OwnedFd)> {
    let attempt = |into: Option<&OwnedFd>| -> io::Result<(i32, OwnedFd)> {
        let mut plan = *plan;
        if into.is_some() {
            // Born inside the cgroup: nothing to write.
            plan.procs = &[];
        }
        let mut pidfd: libc::c_int = -1;
        let mut args = CloneArgs {
            flags: flags | libc::CLONE_PIDFD as u64,
            pidfd: (&raw mut pidfd) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        if let Some(dir) = into {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = dir.as_raw_fd() as u64;
        }
        // SAFETY: clone3 with a valid, fully initialised clone_args of the size passed, no
        // CLONE_VM and no new stack: the child runs on a copy of this stack, like fork.
        let ret =
            unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
        if ret == 0 {
            // SAFETY: we are the child of clone3; the plan was built before the call.
            unsafe { child_after_clone(&plan) }
        }
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd that nothing else owns.
        Ok((ret as i32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
    };
    match attempt(into_cgroup) {
        // A kernel without CLONE_INTO_CGROUP (before 5.7): join by cgroup.procs instead.
        Err(e)
            if into_cgroup.is_some()
                && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) =>
        {
            attempt(None)
        }
        other => other,
    }
}

impl Processes for LinuxRuntime {
    fn spawn(&self, req: StartRequest<'_>) -> Result<Spawned, SpawnError> {
        let spec = req.spec;
        let instance = req.instance;
        let prep = |what: &str| {
            let what = what.to_string();
            move |source: io::Error| SpawnError::Prepare {
                instance: instance.to_string(),
                what,
                source,
            }
        };
        // An image's defaults under the spec; its user is looked up in the image.
        let image_plan = match (image::is_image(spec), req.image) {
            (false, _) => None,
            (true, Some(img)) => {
                Some(
                    image::plan(spec, img).map_err(|reason| SpawnError::Invalid {
                        instance: instance.to_string(),
                        reason,
                    })?,
                )
            }
            (true, None) => {
                return Err(SpawnError::Invalid {
                    instance: instance.to_string(),
                    reason: "its image is not in the store".into(),
                });
            }
        };
        let identity = match (&image_plan, &spec.user) {
            (Some(p), _) => Ok(match &p.user {
                Some((uid, gid, name, home)) => Some(Identity {
                    uid: *uid,
                    gid: *gid,
                    name: name.clone(),
                    home: home.clone(),
                }),
                None => self.own.clone(),
            }),
            (None, None) => Ok(self.own.clone()),
            (None, Some(_)) => resolve_identity(spec.user.as_ref()),
        }
        .map_err(|reason| SpawnError::User {
            instance: instance.to_string(),
            user: match &spec.user {
                Some(UserSpec::Name(n)) => n.clone(),
                Some(UserSpec::Id { uid, .. }) => uid.to_string(),
                None => "(agent's)".into(),
            },
            reason,
        })?;
        let run_dir = self.run_dir(instance);
        let log_dir = self.log_dir(instance);
        for d in [&run_dir, &log_dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(d)
                .map_err(prep(&format!("directory {}", d.display())))?;
        }
        for stale in [EXIT_RECORD, LOG_STAT, super::NOTIFY_STATE] {
            match fs::remove_file(run_dir.join(stale)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(prep(&format!("removing the previous {stale}"))(e)),
            }
        }
        let drop_privileges = match &image_plan {
            Some(p) => p.user.is_some(),
            None => spec.user.is_some(),
        };
        let capabilities = cap_plan(spec, identity.as_ref());
        let image_root = match (&image_plan, req.image) {
            (Some(_), Some(img)) => {
                let persist = image::persist(spec);
                let layer = image::prepare_layer(&run_dir, &img.rootfs, persist)
                    .map_err(prep("the image's writable layer"))?;
                Some(image::ImageRoot {
                    rootfs: img.rootfs.clone(),
                    layer,
                    persist,
                    hostname: spec
                        .hostname_for(req.index)
                        .unwrap_or_else(|| instance.to_string()),
                    resolv_conf: image::host_resolv_conf(),
                })
            }
            _ => None,
        };
        let config = InitConfig {
            instance: instance.to_string(),
            command: image_plan
                .as_ref()
                .map_or_else(|| package::command(spec), |p| p.command.clone()),
            workdir: image_plan
                .as_ref()
                .map_or_else(|| spec.workdir.clone(), |p| p.workdir.clone()),
            uid: identity.as_ref().filter(|_| drop_privileges).map(|i| i.uid),
            gid: identity.as_ref().filter(|_| drop_privileges).map(|i| i.gid),
            hostname: spec.hostname_for(req.index),
            pid_namespace: spec.isolation.has(Namespace::Pid),
            mount_namespace: spec.isolation.has(Namespace::Mount),
            net_namespace: spec.isolation.has(Namespace::Net),
            private_tmp: spec.isolation.private_tmp,
            log_dir: log_dir.clone(),
            log_max_size: spec.logs.max_size,
            log_max_files: spec.logs.max_files,
            notify: spec.health.as_ref().is_some_and(|h| h.notify),
            listen_names: spec.sockets.iter().map(|s| s.name.clone()).collect(),
            capabilities: Some(capabilities),
            nofile: spec.resources.nofile,
            readonly_root: spec.isolation.readonly_root && image_root.is_none(),
            state_dir: Some(self.state_dir.clone()),
            hidden: {
                let (uid, gid) = identity
                    .as_ref()
                    .filter(|_| drop_privileges)
                    .map_or((self_uid(), self_gid()), |i| (i.uid, i.gid));
                // The host's paths are not in an image instance's view at all.
                self.hidden
                    .iter()
                    .filter(|_| image_root.is_none())
                    .filter(|(_, group)| uid == 0 || gid == *group)
                    .map(|(path, _)| path.clone())
                    .collect()
            },
            artifact: package::artifact_mount(spec, req.artifact),
            image: image_root,
        };
        let json =
            serde_json::to_vec(&config).map_err(|e| prep(INIT_CONFIG)(io::Error::other(e)))?;
        fs::write(run_dir.join(INIT_CONFIG), json).map_err(prep(INIT_CONFIG))?;

        let mut env = service_env(spec, req.index, instance, req.ports, identity.as_ref());
        if let Some(p) = &image_plan {
            image::merge_env(&mut env, &p.env);
        }
        let env_c = env
            .iter()
            .map(|(k, v)| cstring(instance, &format!("env {k}"), &format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let argv_c = [
            cstring(instance, "argv", INIT_NAME)?,
            cstring(instance, "instance", instance)?,
        ];
        let argv: Vec<*const libc::c_char> = argv_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = env_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();

        let open = |path: &Path, flags: OFlag, mode: u32| -> io::Result<OwnedFd> {
            Ok(nix::fcntl::open(
                path,
                flags | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(mode),
            )?)
        };
        let run_dir_fd = open(&run_dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)
            .and_then(high)
            .map_err(prep("the run directory"))?;
        let devnull = open(Path::new("/dev/null"), OFlag::O_RDWR, 0)
            .and_then(high)
            .map_err(prep("/dev/null"))?;
        let init_log = open(
            &log_dir.join("stderr.log"),
            OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT,
            0o640,
        )
        .and_then(high)
        .map_err(prep("stderr.log"))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| prep("a pipe")(e.into()))?;
        let err_w = high(err_w).map_err(prep("a pipe"))?;
        let procs = req
            .cgroup_procs
            .into_iter()
            .map(high)
            .collect::<io::Result<Vec<_>>>()
            .map_err(prep("cgroup.procs"))?;

        if req.listen_fds.len() != spec.sockets.len() {
            return Err(SpawnError::Invalid {
                instance: instance.to_string(),
                reason: format!(
                    "{} sockets for {} [[sockets]] entries",
                    req.listen_fds.len(),
                    spec.sockets.len()
                ),
            });
        }
        let listen: Vec<RawFd> = req.listen_fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let plan = ChildPlan {
            procs: &procs,
            stdin: devnull.as_raw_fd(),
            stdout: init_log.as_raw_fd(),
            stderr: init_log.as_raw_fd(),
            fd3: run_dir_fd.as_raw_fd(),
            extra: &listen,
            err_pipe: err_w.as_raw_fd(),
            exe: &self.exe,
            argv: &argv,
            envp: &envp,
        };
        let (ret, pidfd) =
            clone_exec(clone_flags(spec), req.cgroup_dir.as_ref(), &plan).map_err(|source| {
                SpawnError::Clone {
                    instance: instance.to_string(),
                    source,
                }
            })?;
        let pid = ret;
        drop(err_w);
        let pidfd = Arc::new(pidfd);
        // Our own unreaped child: its PID cannot be reused yet, so this reads the right process.
        let start_time = proc_start_time(pid).unwrap_or(0);
        let process = ProcessRef {
            pid,
            pidfd: Some(pidfd.clone()),
        };
        let exit = Box::pin(wait_exit(pidfd, Some(err_r), run_dir, true));
        Ok(Spawned {
            process,
            start_time,
            exit,
        })
    }

    fn signal(&self, process: &ProcessRef, signal: i32) -> io::Result<()> {
        let ret = match &process.pidfd {
            // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            },
            // SAFETY: plain kill(2).
            None => unsafe { libc::kill(process.pid, signal) as libc::c_long },
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(()); // already gone; its exit is being reported
            }
            return Err(e);
        }
        Ok(())
    }

    fn main_pid(&self, init_pid: i32) -> Option<i32> {
        let text = fs::read_to_string(format!("/proc/{init_pid}/task/{init_pid}/children")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    fn roots(&self, pids: &[i32]) -> Vec<i32> {
        pids.iter()
            .copied()
            .filter(|pid| match parent_pid(*pid) {
                Some(ppid) => !pids.contains(&ppid),
                None => false, // gone already
            })
            .collect()
    }

    fn preflight(&self, spec: &ServiceSpec) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let mut why = Vec::new();
        // From an image, command, workdir and user are the image's, checked when an
        // instance starts; the image needs its own mount namespace.
        let on_host = !image::is_image(spec);
        if !on_host && !spec.isolation.has(Namespace::Mount) {
            why.push(
                "isolation.namespaces: [image] needs the mount namespace (the image becomes the instance's root)"
                    .to_owned(),
            );
        }
        if on_host
            && let Some(user) = &spec.user
            && let Err(e) = resolve_identity(Some(user))
        {
            let shown = match user {
                UserSpec::Name(n) => n.clone(),
                UserSpec::Id { uid, .. } => uid.to_string(),
            };
            why.push(format!("user: {shown:?}: {e}"));
        }
        if on_host
            && let Some(cmd) = spec.command.first()
            && cmd.starts_with('/')
            && !package::inside_artifact(spec, Path::new(cmd))
        {
            match fs::metadata(cmd) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => why.push(format!("command[0]: {cmd:?} is not an executable file")),
                Err(e) => why.push(format!("command[0]: {cmd:?}: {e}")),
            }
        }
        match fs::metadata(&spec.workdir) {
            _ if !on_host || package::inside_artifact(spec, &spec.workdir) => {}
            Ok(m) if m.is_dir() => {}
            Ok(_) => why.push(format!("workdir: {:?} is not a directory", spec.workdir)),
            Err(e) => why.push(format!("workdir: {:?}: {e}", spec.workdir)),
        }
        if let Some(caps) = &spec.isolation.capabilities
            && let Some(last) = sysctl("/proc/sys/kernel/cap_last_cap")
        {
            for cap in caps.iter().filter(|c| u64::from(c.index()) > last) {
                why.push(format!(
                    "isolation.capabilities: this kernel does not know {cap} (its last capability is number {last})"
                ));
            }
        }
        if let Some(nofile) = spec.resources.nofile
            && let Some(max) = sysctl("/proc/sys/fs/nr_open")
            && nofile > max
        {
            why.push(format!(
                "resources.nofile: {nofile} is above this host's fs.nr_open ({max})"
            ));
        }
        if spec.isolation.readonly_root && !super::mounts::kernel_supports_readonly_root() {
            why.push(
                "isolation.readonly_root: this kernel lacks mount_setattr(2) (Linux 5.12 or later is needed)"
                    .to_string(),
            );
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    fn adopt(&self, instance: &str, pid: i32, start_time: u64) -> Result<Spawned, SpawnError> {
        let gone = |reason: String| SpawnError::Invalid {
            instance: instance.to_string(),
            reason,
        };
        // SAFETY: pidfd_open(2) on a PID; the returned fd is owned right after.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(gone(format!("pid {pid}: {}", io::Error::last_os_error())));
        }
        // SAFETY: a fresh fd from pidfd_open that nothing else owns.
        let pidfd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw as RawFd) });
        // Checked after the pidfd is held: from here on the PID cannot be recycled under us.
        match proc_start_time(pid) {
            Some(t) if t == start_time => {}
            Some(t) => {
                return Err(gone(format!(
                    "pid {pid} is another process now (started at {t}, not {start_time})"
                )));
            }
            None => return Err(gone(format!("pid {pid} is gone"))),
        }
        let process = ProcessRef {
            pid,
            pidfd: Some(pidfd.clone()),
        };
        let exit = Box::pin(wait_exit(pidfd, None, self.run_dir(instance), false));
        Ok(Spawned {
            process,
            start_time,
            exit,
        })
    }

    fn boot_id(&self) -> String {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn exec_runner(&self, req: super::ExecRequest<'_>) -> Arc<dyn crate::health::ExecRunner> {
        let spec = req.spec;
        let identity = match &spec.user {
            None => self.own.clone(),
            Some(_) => resolve_identity(spec.user.as_ref()).ok().flatten(),
        };
        let drop_privileges = spec.user.is_some();
        let env = service_env(spec, req.index, req.instance, req.ports, identity.as_ref())
            .into_iter()
            .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
            .collect();
        let ns_flags = (clone_flags(spec) & !(libc::CLONE_PIDFD as u64)) as i32;
        let procs = req
            .cgroup_procs
            .into_iter()
            .filter_map(|fd| high(fd).ok())
            .collect();
        Arc::new(super::probe_exec::LinuxExec {
            exe: self.exe.clone(),
            target: req.process.pidfd.clone(),
            procs,
            cgroup_dir: req.cgroup_dir,
            env,
            ns_flags,
            uid: identity.as_ref().filter(|_| drop_privileges).map(|i| i.uid),
            gid: identity.as_ref().filter(|_| drop_privileges).map(|i| i.gid),
            caps: cap_plan(spec, identity.as_ref()),
            nofile: spec.resources.nofile,
            workdir: spec.workdir.display().to_string(),
        })
    }
}

impl InstanceFiles for LinuxRuntime {
    fn exit_record(&self, instance: &str) -> Option<ExitRecord> {
        read_exit_record(&self.run_dir(instance))
    }

    fn notify_state(&self, instance: &str) -> Option<super::NotifyState> {
        fs::read(self.run_dir(instance).join(super::NOTIFY_STATE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn log_stat(&self, instance: &str) -> LogStat {
        fs::read(self.run_dir(instance).join(LOG_STAT))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn remove_instance_files(&self, instance: &str) {
        for d in [self.run_dir(instance), self.log_dir(instance)] {
            if let Err(e) = fs::remove_dir_all(&d)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %d.display(), error = %e, "cannot remove instance files");
            }
        }
    }
}

impl SocketBroker for LinuxRuntime {
    fn free_port(&self) -> io::Result<u16> {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        Ok(l.local_addr()?.port())
    }

    fn bind_socket(&self, listen: &crate::spec::ListenAddr) -> io::Result<OwnedFd> {
        bind_listener(listen)
    }

    fn unlink_socket(&self, listen: &crate::spec::ListenAddr) {
        use std::os::unix::fs::FileTypeExt;
        if let crate::spec::ListenAddr::Unix(path) = listen
            && fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
            && let Err(e) = fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a socket file");
        }
    }

    fn take_socket(
        &self,
        process: &ProcessRef,
        fd: RawFd,
        listen: &crate::spec::ListenAddr,
    ) -> io::Result<OwnedFd> {
        let Some(pidfd) = &process.pidfd else {
            return Err(io::Error::other("no pidfd for the instance"));
        };
        // SAFETY: pidfd_getfd(2) on a pidfd we own; the result is a new fd we own.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from pidfd_getfd (close-on-exec), owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        if !is_listening_on(&sock, listen) {
            return Err(io::Error::other(format!(
                "fd {fd} of pid {} is not a socket listening on {listen}",
                process.pid
            )));
        }
        Ok(sock)
    }
}

fn read_exit_record(run_dir: &Path) -> Option<ExitRecord> {
    fs::read(run_dir.join(EXIT_RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice::<ExitRecord>(&b).ok())
}

/// Wait for the init to end (and reap it when it is our child), and gather what is known
/// about the end.
async fn wait_exit(
    pidfd: Arc<OwnedFd>,
    err_pipe: Option<OwnedFd>,
    run_dir: PathBuf,
    child: bool,
) -> InitExit {
    let status = wait_pidfd(pidfd, child).await;
    let spawn_error = err_pipe.and_then(read_spawn_error);
    let layer_of = run_dir.clone();
    let _ = tokio::task::spawn_blocking(move || image::discard_layer(&layer_of)).await;
    InitExit {
        status,
        record: read_exit_record(&run_dir),
        spawn_error,
    }
}

/// The start time of `pid` from `/proc/PID/stat` (field 22, after the parenthesised name).
fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub(super) async fn wait_pidfd(pidfd: Arc<OwnedFd>, child: bool) -> ProcessStatus {
    let reap = |fd: &OwnedFd| {
        if !child {
            // Its parent (not us) reaps it; signal 0 through the pidfd tells whether it ended.
            // SAFETY: pidfd_send_signal with signal 0 only checks; no siginfo.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    0,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            let ended = r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            return ended.then_some(ProcessStatus::Unknown);
        }
        match waitid(
            Id::PIDFd(fd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::Exited(_, code)) => Some(ProcessStatus::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(ProcessStatus::Signaled(sig as i32)),
            Ok(_) => None,
            Err(nix::errno::Errno::EINTR) => None,
            // ECHILD: reaped elsewhere; nothing more can be learned from the process itself.
            Err(_) => Some(ProcessStatus::Unknown),
        }
    };
    // SAFETY: the pidfd stays open (the Arc keeps it) for as long as the AsyncFd lives.
    let afd = match unsafe { AsyncFd::register_with_interest(pidfd.clone(), Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch a pidfd; polling instead");
            loop {
                if let Some(s) = reap(&pidfd) {
                    return s;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    loop {
        match afd.readable().await {
            Ok(mut guard) => {
                if let Some(s) = reap(&pidfd) {
                    return s;
                }
                guard.clear_ready();
            }
            Err(e) => {
                tracing::error!(error = %e, "pidfd wait failed");
                if let Some(s) = reap(&pidfd) {
                    return s;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the child reported before exec, if anything (EOF: exec succeeded).
fn read_spawn_error(pipe: OwnedFd) -> Option<String> {
    let mut buf = [0u8; 5];
    let mut f = fs::File::from(pipe);
    match f.read(&mut buf) {
        Ok(5) => {
            let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let err = io::Error::from_raw_os_error(errno);
            let step = match buf[0] {
                STEP_CGROUP => "joining the instance cgroup",
                STEP_FDS => "setting up file descriptors",
                STEP_EXEC => "executing the init",
                _ => "starting",
            };
            Some(format!("{step}: {err}"))
        }
        _ => None,
    }
}

/// The parent PID from `/proc/PID/stat` (the field after the parenthesised command name,
/// which may itself hold spaces and parentheses).
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The backlog of agent-owned listening sockets: connections wait here while instances are
/// replaced.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `listen`, close-on-exec, with `SO_REUSEADDR` (TCP) or a fresh
/// socket file (Unix, mode 0666; only a stale socket file is ever replaced).
fn bind_listener(listen: &crate::spec::ListenAddr) -> io::Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, UnixAddr, bind,
        listen as listen_on, setsockopt, socket, sockopt,
    };
    use std::os::unix::fs::FileTypeExt;
    let flags = SockFlag::SOCK_CLOEXEC;
    let backlog = Backlog::new(LISTEN_BACKLOG).map_err(io::Error::from)?;
    match listen {
        crate::spec::ListenAddr::Tcp(addr) => {
            let family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, flags, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            match addr {
                std::net::SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(*a))?,
                std::net::SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(*a))?,
            }
            listen_on(&fd, backlog)?;
            Ok(fd)
        }
        crate::spec::ListenAddr::Unix(path) => {
            match fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_socket() => fs::remove_file(path)?,
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            bind(fd.as_raw_fd(), &UnixAddr::new(path.as_path())?)?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(0o666))?;
            listen_on(&fd, backlog)?;
            Ok(fd)
        }
    }
}

/// Whether `fd` is a listening socket bound to `listen`.
fn is_listening_on(fd: &OwnedFd, listen: &crate::spec::ListenAddr) -> bool {
    use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};
    if !getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        return false;
    }
    let Ok(local) = getsockname::<SockaddrStorage>(fd.as_raw_fd()) else {
        return false;
    };
    match listen {
        crate::spec::ListenAddr::Tcp(std::net::SocketAddr::V4(a)) => local
            .as_sockaddr_in()
            .is_some_and(|l| std::net::SocketAddrV4::from(*l) == *a),
        crate::spec::ListenAddr::Tcp(std::net::SocketAddr::V6(a)) => local
            .as_sockaddr_in6()
            .is_some_and(|l| l.ip() == *a.ip() && l.port() == a.port()),
        crate::spec::ListenAddr::Unix(path) => local
            .as_unix_addr()
            .and_then(|u| u.path())
            .is_some_and(|p| p == path.as_path()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Writes `path` (and its directories) with `mode`.
    fn file(path: &Path, mode: u32) {
        fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        fs::write(path, b"#!/bin/sh\n").expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn the_init_is_found_beside_the_agent_then_in_libexec() {
        let root = tempfile::tempdir().expect("tempdir");
        let exe = root.path().join("usr/bin/corrald");
        file(&exe, 0o755);
        let beside = root.path().join("usr/bin/corral-init");
        let libexec = root.path().join("usr/libexec/corral/corral-init");

        assert_eq!(
            find_init(&exe),
            None,
            "nothing installed: corrald serves as the init"
        );
        file(&libexec, 0o644);
        assert_eq!(
            find_init(&exe),
            None,
            "a file that is not executable is not an init"
        );
        fs::set_permissions(&libexec, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_init(&exe), Some(libexec.clone()));
        fs::create_dir_all(&beside).expect("mkdir");
        assert_eq!(find_init(&exe), Some(libexec), "a directory is not an init");
        fs::remove_dir(&beside).expect("rmdir");
        file(&beside, 0o755);
        assert_eq!(
            find_init(&exe),
            Some(beside),
            "the one beside the agent comes first"
        );
    }
}
