//! The Linux runtime: one `clone3` per instance (see [`super::clone`]), straight into new
//! namespaces and the instance's cgroup, with a pidfd; the child executes the instance's init
//! (`corral-init`) with an empty environment and the run directory on fd 3, where the init
//! finds its configuration ([`InitConfig`], built by [`super::launch::init_config`]). Exits
//! are observed through the pidfd (readable when the process ends) and reaped with
//! `waitid(P_PIDFD)`.
//!
//! With `isolation.userns` the clone also makes a user namespace: the child waits while the
//! agent writes its id maps (and puts it in its cgroup), and a workdir owned by an
//! unprivileged user comes as a detached idmapped mount (see [`LinuxRuntime`]'s
//! `idmapped_workdir`).
//!
//! What the runtime keeps for all instances: the directories every instance with a mount
//! namespace gets masked (the state directory, the API socket's directory), the host's
//! cgroup mounts (shown inside instances with a cgroup namespace), the dynamic users,
//! the user namespaces' blocks of ids (and the namespaces that idmap workdirs), and the
//! compiled seccomp filters, one per distinct [`seccomp::Policy`].

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::clone::{
    ChildPlan, clone_exec, high, new_userns, pidfd_signal, read_spawn_error, sealed_memfd,
    wait_pidfd, write_id_maps,
};
use super::image;
use super::launch::{self, HostView, Identity, RunAs};
use super::package;
use super::probe_helper::ProbeConfig;
use super::seccomp;
use super::users::{DynamicUsers, USERNS_SIZE, UsernsIds};
use super::{
    CgroupMount, EXIT_RECORD, ExitRecord, INIT_CONFIG, INIT_NAME, InitExit, InstanceFiles,
    LOG_STAT, LogStat, ProcessRef, Processes, SocketBroker, SpawnError, Spawned, StartRequest,
};
use crate::spec::{FieldError, Namespace, ServiceSpec, UserSpec};

#[derive(Debug)]
pub struct LinuxRuntime {
    run_root: PathBuf,
    log_root: PathBuf,
    /// What an instance's first process executes.
    exe: CString,
    /// Starts instances' inits by forking a running `exe` (see [`super::zygote`]).
    zygote: super::zygote::Zygote,
    /// The agent's own identity, for instances without `user` (resolved once).
    own: Option<Identity>,
    /// Masked in every instance with a mount namespace (outermost only).
    masked: Vec<PathBuf>,
    /// The host's cgroup filesystems.
    cgroup_mounts: Vec<CgroupMount>,
    /// `user = "dynamic"`: `None` when the agent has no range for them.
    users: Option<DynamicUsers>,
    /// `isolation.userns`: the services' blocks of host ids.
    userns: Option<UsernsIds>,
    /// User namespaces for idmapped workdirs, by (workdir owner, group, block): the owner's
    /// ids are the block's root.
    /// and for image rootfs, by their uid map (the same for gids).
    idmaps: Mutex<HashMap<String, Arc<OwnedFd>>>,
    /// Compiled seccomp programs, by policy, each in a sealed memfd that every instance's
    /// init and probe helper of that policy gets (and reads) as it is.
    filters: Mutex<HashMap<seccomp::Policy, Arc<OwnedFd>>>,
    /// The `unix:` socket files this agent bound (or took back), by path, with the identity
    /// they had then: only that very file is ever unlinked.
    bound: Mutex<HashMap<PathBuf, FileIdentity>>,
}

/// A file's device and inode numbers.
type FileIdentity = (u64, u64);

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

/// Directories an API socket must not be put in directly: instances get the socket's
/// directory masked, and these they need (or they are the root of everything).
const SHARED_DIRS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/dev/shm", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib",
    "/var/run", "/var/tmp",
];

/// The directory of the API socket at `socket`, which every instance gets masked. Refused for
/// a directory instances need, such as `/run` or `/tmp`: the socket must be in a directory of
/// its own. Checked before the socket is bound, so a refusal leaves nothing behind.
pub fn socket_dir(socket: &Path) -> Result<PathBuf, String> {
    let parent = match socket.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("/"),
    };
    // Absolute and without symlinks where it exists: instances resolve it in their own mount
    // table (and `/var/run` is `/run`).
    let dir = fs::canonicalize(parent)
        .or_else(|_| std::path::absolute(parent))
        .unwrap_or_else(|_| parent.to_path_buf());
    if SHARED_DIRS.iter().any(|s| Path::new(s) == dir) {
        return Err(format!(
            "--socket {}: put the socket in a directory of its own (e.g. /run/corral/corral.sock): \
             instances get the socket's directory masked, and they need {}",
            socket.display(),
            dir.display()
        ));
    }
    Ok(dir)
}

/// The cgroup filesystems mounted under `/sys/fs/cgroup`, from `/proc/self/mountinfo`'s
/// text, with the mount data to mount each again (controllers and name; nothing for v2), and
/// as their [`CgroupMount::root`] the directory of this process's cgroup there, from
/// `/proc/self/cgroup`'s text (`proc_cgroup`): the namespace root of an instance without a
/// cgroup of its own in that hierarchy, since its init is in the agent's cgroup there.
pub fn cgroup_mounts(mountinfo: &str, proc_cgroup: &str) -> Vec<CgroupMount> {
    let own = crate::procfs::parse_proc_cgroup(proc_cgroup);
    let mut out: Vec<CgroupMount> = Vec::new();
    for m in crate::procfs::parse_mountinfo(mountinfo) {
        let v2 = m.fs_type == "cgroup2";
        if !(v2 || m.fs_type == "cgroup") || !m.mount_point.starts_with("/sys/fs/cgroup") {
            continue;
        }
        let options: Vec<&str> = m
            .super_options
            .iter()
            .map(String::as_str)
            .filter(|o| !v2 && !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent="))
            .collect();
        // This process's line: the one without controllers for cgroup2, else the one whose
        // controllers (and `name=`) are all among the mount's options; then its directory,
        // below the mount's own root (not "/" when the host shows only a subtree).
        let root = own
            .iter()
            .find(|c| {
                if v2 {
                    c.controllers.is_empty()
                } else {
                    !c.controllers.is_empty()
                        && c.controllers.iter().all(|n| options.contains(&n.as_str()))
                }
            })
            .and_then(|c| c.live().ok())
            .and_then(|path| crate::procfs::mount_relative(path, &m.root))
            .map(|rel| m.mount_point.join(rel));
        let m = CgroupMount {
            options: options.join(","),
            path: m.mount_point,
            fstype: m.fs_type,
            root,
        };
        // A later mount on the same point hides the earlier one.
        out.retain(|o| o.path != m.path);
        out.push(m);
    }
    out
}

/// `mounts` with the instance's own cgroup directories (`joined`: its directories, in the
/// hierarchies the agent made one in) as the roots of their hierarchies.
fn instance_cgroup_views(mounts: &[CgroupMount], joined: &[PathBuf]) -> Vec<CgroupMount> {
    mounts
        .iter()
        .map(|m| {
            let mut m = m.clone();
            // The deepest mount holding it: a v2 mount on `/sys/fs/cgroup` holds nothing of
            // a v1 one on `/sys/fs/cgroup/memory`, but a path check alone would say it does.
            if let Some(dir) = joined.iter().find(|d| {
                d.starts_with(&m.path)
                    && !mounts.iter().any(|o| {
                        o.path != m.path && o.path.starts_with(&m.path) && d.starts_with(&o.path)
                    })
            }) {
                m.root = Some(dir.clone());
            }
            m
        })
        .collect()
}

/// The path an open fd names, by its link in `/proc/self/fd`.
fn fd_path(fd: RawFd) -> Option<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

impl LinuxRuntime {
    /// Instances keep their run state in `<state_dir>/run/<instance>` and their logs in
    /// `<state_dir>/logs/<instance>`; the whole state directory is masked in instances.
    pub fn new(state_dir: &Path) -> io::Result<LinuxRuntime> {
        let run_root = state_dir.join("run");
        let log_root = state_dir.join("logs");
        for d in [&run_root, &log_root] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(d)?;
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let exe = init_executable();
        Ok(LinuxRuntime {
            run_root,
            log_root,
            zygote: super::zygote::Zygote::new(exe.clone()),
            exe,
            own: resolve_identity(None, None, "").ok().flatten(),
            // Absolute and without symlinks: instances resolve it in their own mount table.
            masked: vec![fs::canonicalize(state_dir)?],
            cgroup_mounts: cgroup_mounts(
                &mountinfo,
                &fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
            ),
            users: None,
            userns: None,
            idmaps: Mutex::new(HashMap::new()),
            bound: Mutex::new(HashMap::new()),
            filters: Mutex::new(HashMap::new()),
        })
    }

    /// Keep the API socket at `socket` out of reach of every instance with a mount namespace:
    /// its directory is masked there (not the socket file, which the agent replaces when it
    /// starts again). Refused (see [`socket_dir`]) for a directory instances need.
    pub fn mask_socket_dir(&mut self, socket: &Path) -> Result<(), String> {
        self.masked.push(socket_dir(socket)?);
        self.masked = launch::outermost(&self.masked);
        Ok(())
    }

    /// Give `user = "dynamic"` services uids from `users`.
    pub fn set_dynamic_users(&mut self, users: DynamicUsers) {
        self.users = Some(users);
    }

    /// Why `spec`'s user namespace cannot be made here, field by field (none: it can).
    fn userns_preflight(&self, spec: &ServiceSpec) -> Vec<FieldError> {
        let mut why = Vec::new();
        let Some(ids) = &self.userns else {
            why.push(FieldError::new(
                "isolation.userns",
                "the agent gives no user namespaces (start corrald with --userns-ids FIRST-LAST)",
            ));
            return why;
        };
        if !Path::new("/proc/self/ns/user").exists()
            || sysctl("/proc/sys/user/max_user_namespaces") == Some(0)
        {
            why.push(FieldError::new(
                "isolation.userns",
                "this kernel has no user namespaces (or user.max_user_namespaces is 0)",
            ));
            return why;
        }
        let inside = |id: u32| id < USERNS_SIZE;
        match &spec.user {
            Some(UserSpec::Id { uid, gid }) if !inside(*uid) || gid.is_some_and(|g| !inside(g)) => {
                why.push(FieldError::new(
                    "user",
                    format!(
                        "{:?} is outside the instance's user namespace (ids 0-{})",
                        spec.user
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        USERNS_SIZE - 1
                    ),
                ));
            }
            Some(user @ UserSpec::Name(_)) if !image::is_image(spec) => {
                if let Ok(Some(id)) = resolve_identity(Some(user), None, &spec.name)
                    && (!inside(id.uid) || !inside(id.gid))
                {
                    why.push(FieldError::new("user", format!(
                        "{:?} is uid {}:{} on this host, outside the instance's user namespace (ids 0-{})",
                        user.to_string(),
                        id.uid,
                        id.gid,
                        USERNS_SIZE - 1
                    )));
                }
            }
            _ => {}
        }
        // An image's rootfs is idmapped: the store's filesystem (the state directory's, as the
        // run directory's) must allow it.
        if image::is_image(spec)
            && let Err(e) = self.rootfs_mount(&self.run_root, Some(ids.any()))
        {
            why.push(FieldError::new(
                "isolation.userns",
                format!(
                    "[image] the store under {} cannot be idmapped for the instance's user namespace: {e} (its filesystem lacks idmapped mounts, e.g. tmpfs before Linux 6.3; put --state-dir on one that has them, or drop isolation.userns)",
                    self.run_root.parent().unwrap_or(&self.run_root).display()
                ),
            ));
        }
        // A workdir owned by someone else than root is idmapped: its filesystem must allow it.
        if !image::is_image(spec)
            && fs::metadata(&spec.workdir).is_ok_and(|m| m.uid() != 0)
            && let Err(e) = self.idmapped_workdir(&spec.workdir, ids.any())
        {
            why.push(FieldError::new("isolation.userns", format!(
                "workdir {:?} cannot be idmapped for the instance's root: {e} (its filesystem lacks idmapped mounts, e.g. tmpfs before Linux 6.3; use a workdir on one that has them, or one owned by root, which is not mapped)",
                spec.workdir
            )));
        }
        why
    }

    /// Give `isolation.userns` services their host ids from `ids`.
    pub fn set_userns_ids(&mut self, ids: UsernsIds) {
        self.userns = Some(ids);
    }

    /// The first host id of `spec`'s user namespace (its root inside), when it has one.
    fn userns_base(&self, spec: &ServiceSpec) -> Result<Option<u32>, String> {
        if !spec.isolation.userns {
            return Ok(None);
        }
        let ids = self.userns.as_ref().ok_or(
            "isolation.userns: the agent gives no user namespaces (start corrald with --userns-ids FIRST-LAST)",
        )?;
        ids.get_or_allocate(&spec.name).map(Some)
    }

    /// The workdir as a detached mount idmapped for the user namespace whose root is host id
    /// `base`: what the workdir's owner and group own on the host belongs inside to root,
    /// and what root inside creates there belongs on the host to the workdir's owner and
    /// group. `None` for a workdir owned by root: mapping it would let root inside make
    /// files owned by the host's root (a setuid binary...), so it stays as it is.
    fn idmapped_workdir(&self, workdir: &Path, base: u32) -> io::Result<Option<OwnedFd>> {
        let meta = fs::metadata(workdir)?;
        if meta.uid() == 0 {
            return Ok(None);
        }
        let ns = self.idmap_ns(
            &format!("{} {base} 1", meta.uid()),
            &format!("{} {base} 1", meta.gid()),
        )?;
        let mount = super::mounts::copy_tree(workdir, false)?;
        super::mounts::idmap(&mount, &ns)?;
        high(mount).map(Some)
    }

    /// A user namespace with these maps, to idmap mounts with (made once per maps).
    fn idmap_ns(&self, uid_map: &str, gid_map: &str) -> io::Result<Arc<OwnedFd>> {
        let key = format!("{uid_map}/{gid_map}");
        let mut cache = self.idmaps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ns) = cache.get(&key) {
            return Ok(ns.clone());
        }
        let ns = Arc::new(new_userns(uid_map, gid_map)?);
        cache.insert(key, ns.clone());
        Ok(ns)
    }

    /// An image's rootfs as a detached mount; with a user namespace whose root is host id
    /// `base`, idmapped like it: what the image's uid N owns (in the store, on disk) is uid N
    /// inside the instance, as crun and podman do with idmapped mounts. The store's copy
    /// stays as it is, shared by every service whatever its block of ids.
    fn rootfs_mount(&self, rootfs: &Path, userns: Option<u32>) -> io::Result<OwnedFd> {
        let mount = super::mounts::copy_tree(rootfs, false)?;
        if let Some(base) = userns {
            let map = format!("0 {base} {USERNS_SIZE}");
            let ns = self.idmap_ns(&map, &map)?;
            super::mounts::idmap(&mount, &ns)?;
        }
        high(mount)
    }

    pub fn run_dir(&self, instance: &str) -> PathBuf {
        self.run_root.join(instance)
    }

    pub fn log_dir(&self, instance: &str) -> PathBuf {
        self.log_root.join(instance)
    }

    /// The identity `spec` runs as (`None`: unknown, the agent's own), and whether the init
    /// must change to it.
    fn identity(&self, spec: &ServiceSpec) -> Result<(Option<Identity>, bool), String> {
        match &spec.user {
            None => Ok((self.own.clone(), false)),
            Some(user) => {
                resolve_identity(Some(user), self.users.as_ref(), &spec.name).map(|i| (i, true))
            }
        }
    }

    /// The identity an instance of `spec` runs as from its image: `user = "dynamic"` as on
    /// the host, otherwise the plan's user (the image's, or the spec's looked up in the
    /// image), or else root, unchanged.
    fn image_identity(
        &self,
        spec: &ServiceSpec,
        plan: &image::Plan,
    ) -> Result<(Option<Identity>, bool), String> {
        if matches!(spec.user, Some(UserSpec::Dynamic)) {
            return self.identity(spec);
        }
        Ok(match &plan.user {
            Some((uid, gid, name, home)) => (
                Some(Identity {
                    uid: *uid,
                    gid: *gid,
                    name: name.clone(),
                    home: home.clone(),
                }),
                true,
            ),
            None => (self.own.clone(), false),
        })
    }

    /// The seccomp program of `spec` (`None`: unconfined), compiled once per policy.
    fn filter(
        &self,
        spec: &ServiceSpec,
        caps: &super::privileges::CapPlan,
    ) -> Result<Option<Arc<OwnedFd>>, String> {
        let Some(policy) = launch::seccomp_policy(spec, caps) else {
            return Ok(None);
        };
        let mut cache = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache.get(&policy) {
            return Ok(Some(hit.clone()));
        }
        let program = seccomp::compile(policy)?;
        let fd = sealed_memfd(c"corral-seccomp", &seccomp::to_bytes(&program))
            .map(Arc::new)
            .map_err(|e| format!("keeping the compiled filter in a memfd: {e}"))?;
        cache.insert(policy, fd.clone());
        Ok(Some(fd))
    }
}

fn resolve_identity(
    user: Option<&UserSpec>,
    users: Option<&DynamicUsers>,
    service: &str,
) -> Result<Option<Identity>, String> {
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
        Some(UserSpec::Dynamic) => {
            let users = users.ok_or(
                "the agent gives no dynamic users (start corrald with --dynamic-users FIRST-LAST)",
            )?;
            let uid = users.get_or_allocate(service)?;
            Ok(Some(Identity {
                uid,
                gid: uid,
                name: None,
                home: None,
            }))
        }
    }
}

/// Give `dir` and what is directly in it (not through symlinks) to `id` (uid and gid).
fn chown_shallow(dir: &Path, id: u32) -> io::Result<()> {
    use std::os::unix::fs::lchown;
    lchown(dir, Some(id), Some(id))?;
    for entry in fs::read_dir(dir)? {
        lchown(entry?.path(), Some(id), Some(id))?;
    }
    Ok(())
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

fn clone_flags(spec: &ServiceSpec) -> u64 {
    let mut flags = 0;
    for ns in &spec.isolation.namespaces {
        let flag: libc::c_int = match ns {
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Net => libc::CLONE_NEWNET,
            // Entered by the child once inside its cgroup (see `ChildPlan::new_cgroup_ns`).
            Namespace::Cgroup => 0,
        };
        flags |= u64::from(flag.cast_unsigned());
    }
    flags
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
        let identity = match &image_plan {
            Some(p) => self.image_identity(spec, p),
            None => self.identity(spec),
        };
        let (identity, change) = identity.map_err(|reason| SpawnError::User {
            instance: instance.to_string(),
            user: spec
                .user
                .as_ref()
                .map_or_else(|| "(agent's)".to_string(), ToString::to_string),
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
        let agent_uid = nix::unistd::Uid::effective().as_raw();
        let caps = launch::cap_plan(spec, identity.as_ref().map_or(agent_uid, |i| i.uid));
        let invalid = |reason: String| SpawnError::Invalid {
            instance: instance.to_string(),
            reason,
        };
        let userns = self.userns_base(spec).map_err(invalid)?;
        let image_root = match (&image_plan, req.image) {
            (Some(_), Some(img)) => Some(
                image::prepare_layer(
                    &run_dir,
                    &img.rootfs,
                    image::LayerOptions {
                        persist: image::persist(spec),
                        readonly: spec.isolation.readonly_root,
                        owner: userns,
                        hostname: &spec
                            .hostname_for(req.index)
                            .unwrap_or_else(|| instance.to_string()),
                    },
                )
                .map_err(prep("the image's layers"))?,
            ),
            _ => None,
        };
        let filter = self
            .filter(spec, &caps)
            .map_err(|reason| invalid(format!("isolation.seccomp: {reason}")))?;
        // An image's workdir is the image's: only a host workdir is idmapped.
        let workdir_mount = match userns {
            Some(base) if image_root.is_none() => self
                .idmapped_workdir(&spec.workdir, base)
                .map_err(prep(&format!(
                    "an idmapped mount of workdir {}",
                    spec.workdir.display()
                )))?,
            _ => None,
        };
        // The layers as a mount of their own, for the init to attach where it can reach them
        // (the agent's directories above are closed to root in a user namespace).
        let layer_mount = match &image_root {
            Some(root) => Some(
                super::mounts::copy_tree(&root.layer, false)
                    .and_then(high)
                    .map_err(prep("a mount of the image's layers"))?,
            ),
            None => None,
        };
        // The rootfs as a detached mount too (idmapped with a user namespace): the init
        // reaches nothing of the host's tree by path once the layers are attached.
        let rootfs_mount = match (&image_root, req.image) {
            (Some(_), Some(img)) => Some(self.rootfs_mount(&img.rootfs, userns).map_err(prep(
                &format!("a mount of the image's rootfs {}", img.rootfs.display()),
            ))?),
            _ => None,
        };
        let fds = super::InitFds::after(
            spec.sockets.len(),
            filter.is_some(),
            workdir_mount.is_some(),
        )
        .with_image(layer_mount.is_some(), rootfs_mount.is_some());
        // The instance's cgroup directories, shown as the roots of its cgroup views.
        let cgroup_views = if spec.isolation.has(Namespace::Cgroup) {
            let joined: Vec<PathBuf> = req
                .cgroup_procs
                .iter()
                // Each a file (`tasks`) in the directory.
                .filter_map(|fd| Some(fd_path(fd.as_raw_fd())?.parent()?.to_path_buf()))
                .chain(
                    req.cgroup_dir
                        .as_ref()
                        .and_then(|fd| fd_path(fd.as_raw_fd())),
                )
                .collect();
            instance_cgroup_views(&self.cgroup_mounts, &joined)
        } else {
            Vec::new()
        };
        let mut config = launch::init_config(
            spec,
            req.index,
            instance,
            req.ports,
            RunAs {
                identity: identity.as_ref(),
                change,
                agent_uid,
            },
            HostView {
                log_dir: &log_dir,
                masked: &self.masked,
                cgroup_mounts: &cgroup_views,
                artifact: req.artifact,
                image: image_plan.as_ref().zip(image_root.as_ref()),
            },
            fds,
        );
        config.incarnation = req.incarnation;
        let json =
            serde_json::to_vec(&config).map_err(|e| prep(INIT_CONFIG)(io::Error::other(e)))?;
        fs::write(run_dir.join(INIT_CONFIG), json).map_err(prep(INIT_CONFIG))?;

        let argv_c = [
            cstring(instance, "argv", INIT_NAME)?,
            cstring(instance, "instance", instance)?,
        ];
        let argv = super::clone::pointers(&argv_c);
        // The init runs with an empty environment: the service's is in its configuration.
        let envp = [std::ptr::null::<libc::c_char>()];

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
        let log_dir_fd = open(&log_dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)
            .and_then(high)
            .map_err(prep("the log directory"))?;
        if let Some(base) = userns {
            // Root inside is `base` on the host: the init writes its run state and logs.
            for dir in [&run_dir, &log_dir] {
                chown_shallow(dir, base).map_err(prep(&format!(
                    "giving {} to the instance's root",
                    dir.display()
                )))?;
            }
        }
        // A child in a new user namespace waits for its id maps before it joins its cgroup.
        let (wait_r, wait_w) = match userns {
            Some(_) => {
                let (r, w) =
                    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| prep("a pipe")(e.into()))?;
                (Some(high(r).map_err(prep("a pipe"))?), Some(w))
            }
            None => (None, None),
        };
        let procs = req
            .cgroup_procs
            .into_iter()
            .map(high)
            .collect::<io::Result<Vec<_>>>()
            .map_err(prep("cgroup.procs"))?;
        let procs_raw: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();

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
        // The listening sockets, then the fds of `InitFds::after`, in its order.
        let extra: Vec<RawFd> = req
            .listen_fds
            .iter()
            .map(|fd| fd.as_raw_fd())
            .chain(Some(log_dir_fd.as_raw_fd()))
            .chain(filter.as_ref().map(|fd| fd.as_raw_fd()))
            .chain(workdir_mount.as_ref().map(|fd| fd.as_raw_fd()))
            .chain(layer_mount.as_ref().map(|fd| fd.as_raw_fd()))
            .chain(rootfs_mount.as_ref().map(|fd| fd.as_raw_fd()))
            .collect();
        let mut flags = clone_flags(spec);
        if userns.is_some() {
            flags |= libc::CLONE_NEWUSER as u64;
        }
        let plan = ChildPlan {
            // The child joins by itself, in a user namespace too (after its maps are written):
            // the files were opened here, as root, and a process may always move itself.
            procs: &procs_raw,
            wait_for: wait_r.as_ref().map(|fd| fd.as_raw_fd()),
            stdin: devnull.as_raw_fd(),
            stdout: init_log.as_raw_fd(),
            stderr: init_log.as_raw_fd(),
            fd3: run_dir_fd.as_raw_fd(),
            extra: &extra,
            new_cgroup_ns: spec.isolation.has(Namespace::Cgroup),
            err_pipe: err_w.as_raw_fd(),
            exe: &self.exe,
            argv: &argv,
            envp: &envp,
        };
        let (ret, pidfd) = self
            .zygote
            .spawn(flags, req.cgroup_dir.as_ref(), &plan, instance)
            .unwrap_or_else(|| clone_exec(flags, req.cgroup_dir.as_ref(), &plan))
            .map_err(|source| SpawnError::Clone {
                instance: instance.to_string(),
                source,
            })?;
        let pid = ret;
        drop(err_w);
        drop(wait_r);
        if let (Some(base), Some(wait_w)) = (userns, wait_w) {
            let map = format!("0 {base} {USERNS_SIZE}\n");
            let released = write_id_maps(pid, &map, &map)
                .and_then(|()| Ok(nix::unistd::write(&wait_w, b"1")?));
            if let Err(source) = released {
                let _ = pidfd_signal(&pidfd, libc::SIGKILL);
                // It has run nothing of its own yet: reaped at once.
                let _ = nix::sys::wait::waitid(
                    nix::sys::wait::Id::PIDFd(std::os::fd::AsFd::as_fd(&pidfd)),
                    nix::sys::wait::WaitPidFlag::WEXITED,
                );
                return Err(prep("the instance's user namespace")(source));
            }
        }
        let pidfd = Arc::new(pidfd);
        // Our own unreaped child: its PID cannot be reused yet, so this reads the right process.
        let start_time = proc_start_time(pid).unwrap_or(0);
        let mount_ns = (flags & libc::CLONE_NEWNS as u64 != 0)
            .then(|| held_mount_ns(pid))
            .flatten();
        let process = ProcessRef {
            pid,
            pidfd: Some(pidfd.clone()),
        };
        let end = EndOf {
            err_pipe: Some(err_r),
            run_dir,
            child: true,
            layer: image_root.is_some(),
            mount_ns,
        };
        let exit = Box::pin(wait_exit(pidfd, end));
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

    fn preflight(&self, spec: &ServiceSpec) -> Result<(), Vec<FieldError>> {
        let mut why = Vec::new();
        // From an image, command, workdir and user are the image's, checked when an
        // instance starts; the image needs its own mount namespace.
        let on_host = !image::is_image(spec);
        if !on_host && !spec.isolation.has(Namespace::Mount) {
            why.push(FieldError::new(
                "isolation.namespaces",
                "[image] needs the mount namespace (the image becomes the instance's root)",
            ));
        }
        match &spec.user {
            // Allocated at the first start; here only whether there is a range.
            Some(UserSpec::Dynamic) if self.users.is_none() => {
                why.push(FieldError::new(
                    "user",
                    "\"dynamic\": the agent gives no dynamic users (start corrald with --dynamic-users FIRST-LAST)",
                ));
            }
            Some(UserSpec::Dynamic) => {}
            Some(user) if on_host => {
                if let Err(e) = resolve_identity(Some(user), None, &spec.name) {
                    why.push(FieldError::new(
                        "user",
                        format!("{:?}: {e}", user.to_string()),
                    ));
                }
            }
            _ => {}
        }
        if on_host
            && spec.isolation.has(Namespace::Mount)
            && let Some(dir) = self.masked.iter().find(|d| spec.workdir.starts_with(d))
        {
            why.push(FieldError::new(
                "workdir",
                format!(
                    "{:?} is inside {}, which the agent masks in every instance (its state or its socket's directory)",
                    spec.workdir,
                    dir.display()
                ),
            ));
        }
        if spec.isolation.userns {
            why.extend(self.userns_preflight(spec));
        }
        if spec.isolation.seccomp == crate::spec::Seccomp::Default && !seccomp::supported() {
            why.push(FieldError::new(
                "isolation.seccomp",
                format!(
                    "the default filter is built for x86_64 and aarch64, not {} (set \"unconfined\")",
                    std::env::consts::ARCH
                ),
            ));
        }
        if spec.isolation.has(Namespace::Cgroup) && !Path::new("/proc/self/ns/cgroup").exists() {
            why.push(FieldError::new(
                "isolation.namespaces",
                "this kernel has no cgroup namespaces",
            ));
        }
        if on_host {
            why.extend(super::preflight::programs(spec));
        }
        match fs::metadata(&spec.workdir) {
            _ if !on_host || package::inside_artifact(spec, &spec.workdir) => {}
            Ok(m) if m.is_dir() => {}
            Ok(_) => why.push(FieldError::new(
                "workdir",
                format!("{:?} is not a directory", spec.workdir),
            )),
            Err(e) => why.push(FieldError::new(
                "workdir",
                format!("{:?}: {e}", spec.workdir),
            )),
        }
        if let Some(caps) = &spec.isolation.capabilities
            && let Some(last) = sysctl("/proc/sys/kernel/cap_last_cap")
        {
            for cap in caps.iter().filter(|c| u64::from(c.index()) > last) {
                why.push(FieldError::new(
                    "isolation.capabilities",
                    format!(
                        "this kernel does not know {cap} (its last capability is number {last})"
                    ),
                ));
            }
        }
        if let Some(nofile) = spec.resources.nofile
            && let Some(max) = sysctl("/proc/sys/fs/nr_open")
            && nofile > max
        {
            why.push(FieldError::new(
                "resources.nofile",
                format!("{nofile} is above this host's fs.nr_open ({max})"),
            ));
        }
        if spec.isolation.readonly_root && !super::mounts::kernel_supports_readonly_root() {
            why.push(FieldError::new(
                "isolation.readonly_root",
                "this kernel lacks mount_setattr(2) (Linux 5.12 or later is needed)",
            ));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
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
        let pidfd = Arc::new(unsafe { OwnedFd::from_raw_fd(crate::num::syscall_int(raw)) });
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
        // Whether it runs an image is in its configuration: looked up when it ends.
        let end = EndOf {
            err_pipe: None,
            run_dir: self.run_dir(instance),
            child: false,
            layer: true,
            mount_ns: held_mount_ns(pid),
        };
        let exit = Box::pin(wait_exit(pidfd, end));
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
        // The same identity, environment, capabilities and filter as the service.
        let (identity, change) = self.identity(spec).unwrap_or((None, true));
        let agent_uid = nix::unistd::Uid::effective().as_raw();
        let caps = launch::cap_plan(spec, identity.as_ref().map_or(agent_uid, |i| i.uid));
        let filter = self.filter(spec, &caps);
        let changed = identity.as_ref().filter(|_| change);
        let userns = spec.isolation.userns;
        let mut ns_flags = clone_flags(spec);
        if spec.isolation.has(Namespace::Cgroup) {
            ns_flags |= libc::CLONE_NEWCGROUP as u64;
        }
        if userns {
            ns_flags |= libc::CLONE_NEWUSER as u64;
        }
        // In the instance's user namespace the helper's own ids (the agent's) mean nothing:
        // it always changes to the service's, root inside by default.
        let (uid, gid) = match changed {
            Some(id) => (Some(id.uid), Some(id.gid)),
            None if userns => (
                Some(identity.as_ref().map_or(0, |i| i.uid)),
                Some(identity.as_ref().map_or(0, |i| i.gid)),
            ),
            None => (None, None),
        };
        let procs = req
            .cgroup_procs
            .into_iter()
            .filter_map(|fd| high(fd).ok())
            .collect();
        let config = ProbeConfig {
            // CLONE_NEW* flags are all below 2^31: the low word carries them.
            ns_flags: i32::try_from(ns_flags & 0x7fff_ffff).unwrap_or(0),
            uid,
            gid,
            caps,
            nofile: spec.resources.nofile,
            nofile_soft: super::privileges::inherited_nofile_soft(),
            workdir: spec.workdir.clone(),
            env: launch::service_env(spec, req.index, req.instance, req.ports, identity.as_ref()),
            seccomp: matches!(filter, Ok(Some(_))),
        };
        // Made once: each probe then only clones the helper and executes.
        let config = match &filter {
            Err(e) => Err(format!("isolation.seccomp: {e}")),
            Ok(_) => serde_json::to_vec(&config)
                .map_err(|e| e.to_string())
                .and_then(|json| sealed_memfd(c"corral-probe", &json).map_err(|e| e.to_string()))
                .map_err(|e| format!("preparing exec probes: {e}")),
        };
        if let Err(e) = &config {
            tracing::error!(instance = %req.instance, error = %e, "exec probes cannot run; they will fail");
        }
        Arc::new(super::probe_exec::LinuxExec {
            exe: self.exe.clone(),
            init_pid: req.process.pid,
            built: std::sync::atomic::AtomicBool::new(false),
            target: req.process.pidfd.clone(),
            procs,
            cgroup_dir: req.cgroup_dir,
            config,
            filter: filter.ok().flatten(),
        })
    }

    fn release_service(&self, service: &str) {
        if let Some(users) = &self.users {
            users.release(service);
        }
        if let Some(ids) = &self.userns {
            ids.release(service);
        }
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

    fn output_tail(&self, instance: &str) -> Option<String> {
        // One bounded read at the end of the live stderr file: this runs on the exit path,
        // before the restart is scheduled, so it must stay cheap.
        let path = self
            .log_dir(instance)
            .join(crate::logs::Stream::Stderr.file_name());
        let mut f = fs::File::open(path).ok()?;
        let len = f.metadata().ok()?.len();
        let from = len.saturating_sub(super::OUTPUT_TAIL_BYTES as u64 * 2);
        io::Seek::seek(&mut f, io::SeekFrom::Start(from)).ok()?;
        use io::Read;
        let mut buf = Vec::new();
        Read::take(&mut f, super::OUTPUT_TAIL_BYTES as u64 * 2)
            .read_to_end(&mut buf)
            .ok()?;
        super::tail_text(&buf, from > 0)
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

    fn check_port(&self, port: u16) -> io::Result<()> {
        // std sets SO_REUSEADDR on Unix; binding without listen(2) takes no connection.
        std::net::TcpListener::bind(("0.0.0.0", port)).map(drop)
    }

    fn bind_socket(&self, listen: &crate::spec::ListenAddr) -> io::Result<OwnedFd> {
        if let crate::spec::ListenAddr::Unix(path) = listen {
            refuse_agent_path(path, &self.masked)?;
        }
        let fd = bind_listener(listen)?;
        if let crate::spec::ListenAddr::Unix(path) = listen {
            self.remember_socket_file(path);
        }
        Ok(fd)
    }

    fn unlink_socket(&self, listen: &crate::spec::ListenAddr) {
        let crate::spec::ListenAddr::Unix(path) = listen else {
            return;
        };
        let ours = lock_map(&self.bound).remove(path);
        let now = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        match (ours, now) {
            (_, None) => {}
            (Some(ours), Some(now)) if ours == now => {
                if let Err(e) = fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a socket file");
                }
            }
            (ours, Some(_)) => tracing::warn!(
                path = %path.display(),
                bound_by_this_agent = ours.is_some(),
                "the socket file is not the one this agent bound (replaced since): left in place"
            ),
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
        let sock = unsafe { OwnedFd::from_raw_fd(crate::num::syscall_int(raw)) };
        if !is_listening_on(&sock, listen) {
            return Err(io::Error::other(format!(
                "fd {fd} of pid {} is not a socket listening on {listen}",
                process.pid
            )));
        }
        if let crate::spec::ListenAddr::Unix(path) = listen {
            // The file there now is the one the instance's socket was bound to, unless
            // someone replaced it while no agent ran; either way it is the one to remove
            // when the service goes, and nothing that appears there later is.
            self.remember_socket_file(path);
        }
        Ok(sock)
    }
}

fn read_exit_record(run_dir: &Path) -> Option<ExitRecord> {
    fs::read(run_dir.join(EXIT_RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice::<ExitRecord>(&b).ok())
}

/// What [`wait_exit`] needs besides the pidfd.
struct EndOf {
    /// The pipe on which the child reports a failure before the init runs.
    err_pipe: Option<OwnedFd>,
    run_dir: PathBuf,
    /// The init is our child (we reap it).
    child: bool,
    /// The run may have had an image's writable layer, discarded before the end is reported
    /// (the next run's layer takes its place); a run known to have none skips the look-up and
    /// the thread it takes.
    layer: bool,
    /// The instance's mount namespace, from [`held_mount_ns`].
    mount_ns: Option<OwnedFd>,
}

/// A handle on the mount namespace of the init `pid`, held until its end is reported. The
/// namespace (its mounts, and the `/proc`, `/dev`, devpts, mqueue and mask filesystems made
/// for it) is then torn down when this handle is closed, on a blocking thread, rather than in
/// the init's own exit: the kernel does that teardown before the init's exit is signalled, so
/// without the handle it would delay the agent's learning of every end by it (about a tenth
/// of a millisecond with the default confinement). `None` when it cannot be opened (the init
/// is gone already): the teardown then happens in its exit, as it would anyway.
fn held_mount_ns(pid: i32) -> Option<OwnedFd> {
    fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(OwnedFd::from)
}

/// Wait for the init to end (and reap it when it is our child), and gather what is known
/// about the end.
async fn wait_exit(pidfd: Arc<OwnedFd>, end: EndOf) -> InitExit {
    let status = wait_pidfd(pidfd, end.child).await;
    let spawn_error = end.err_pipe.and_then(read_spawn_error);
    let mount_ns = end.mount_ns;
    if end.layer {
        let layer_of = end.run_dir.clone();
        // The namespace goes first: its overlay mount holds the layer.
        let _ = tokio::task::spawn_blocking(move || {
            drop(mount_ns);
            image::discard_layer(&layer_of)
        })
        .await;
    } else if let Some(ns) = mount_ns {
        // Not awaited: the end is reported (and a restart begins) while it is torn down.
        drop(tokio::task::spawn_blocking(move || drop(ns)));
    }
    InitExit {
        status,
        record: read_exit_record(&end.run_dir),
        spawn_error,
    }
}

/// The start time of `pid` from `/proc/PID/stat` (field 22).
fn proc_start_time(pid: i32) -> Option<u64> {
    stat_field(&proc_stat(pid)?, 22)?.parse().ok()
}

/// `/proc/WHO/stat` (`WHO`: a PID or `self`), in one read: the kernel writes the line whole
/// into a buffer large enough for it (`read_to_string` would find its size 0 and grow its
/// buffer from 32 bytes: six reads for one line, on every spawn and adoption).
pub(super) fn proc_stat(who: impl std::fmt::Display) -> Option<String> {
    use std::io::Read;
    let mut f = fs::File::open(format!("/proc/{who}/stat")).ok()?;
    let mut buf = [0u8; 4096];
    let n = f.read(&mut buf).ok()?;
    if n == buf.len() {
        // Not expected of one line of numbers; read the rest as it comes.
        let mut all = buf.to_vec();
        f.read_to_end(&mut all).ok()?;
        return String::from_utf8(all).ok();
    }
    String::from_utf8(buf.get(..n)?.to_vec()).ok()
}

/// Field `n` (numbered from 1 as in proc(5), `n` >= 3) of a `/proc/PID/stat` line: counted
/// after the parenthesised command name, which may itself hold spaces and parentheses.
pub(super) fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(n.checked_sub(3)?)
}

/// The parent PID from `/proc/PID/stat` (field 4).
fn parent_pid(pid: i32) -> Option<i32> {
    stat_field(&proc_stat(pid)?, 4)?.parse().ok()
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
                Ok(m) if m.file_type().is_socket() => {
                    // Only a stale socket file is replaced: one a process listens on is not.
                    match std::os::unix::net::UnixStream::connect(path) {
                        Ok(_) => {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!(
                                    "{}: a process is listening on this socket; corral replaces only a stale socket file",
                                    path.display()
                                ),
                            ));
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                            fs::remove_file(path)?
                        }
                        Err(e) => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!(
                                    "{}: cannot tell whether a process listens on this socket ({e}); it is left in place",
                                    path.display()
                                ),
                            ));
                        }
                    }
                }
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

impl LinuxRuntime {
    fn remember_socket_file(&self, path: &Path) {
        if let Ok(m) = fs::symlink_metadata(path) {
            lock_map(&self.bound).insert(path.to_path_buf(), (m.dev(), m.ino()));
        }
    }
}

fn lock_map<K, V>(m: &Mutex<HashMap<K, V>>) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Refuse a `unix:` socket path inside the agent's own directories (its state directory,
/// its API socket's directory): binding there would replace or shadow what the agent itself
/// serves and keeps.
fn refuse_agent_path(path: &Path, agent_dirs: &[PathBuf]) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    // Where the path really leads: its directory without symbolic links (a missing directory
    // cannot be bound in anyway, and is reported by the bind).
    let real = match (fs::canonicalize(parent), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    };
    if let Some(dir) = agent_dirs.iter().find(|d| real.starts_with(d)) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is inside {}, a directory of the agent's own (its state or its API socket): choose a path outside it",
                path.display(),
                dir.display()
            ),
        ));
    }
    Ok(())
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

    /// A preflight's refusals as one line, as the API's message shows them.
    fn joined(why: Vec<FieldError>) -> String {
        why.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    use super::*;

    /// A hybrid host's mountinfo: the v1 hierarchies (cpu and cpuacct joined, as most
    /// distributions do), a named one, the unified one, and a v1 mount of a subtree only.
    const MOUNTINFO: &str = "\
25 1 0:21 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
35 30 0:31 /outer /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
36 30 0:32 /elsewhere /sys/fs/cgroup/blkio rw,nosuid - cgroup cgroup rw,blkio
37 30 0:33 / /sys/fs/cgroup/odd\\040name rw,nosuid - cgroup cgroup rw,freezer
38 30 0:34 / /sys/fs/cgroup/net_cls rw,nosuid - cgroup cgroup rw,net_cls
";
    const PROC_CGROUP: &str = "\
7:net_cls:/gone (deleted)
6:freezer:/agent.slice
5:blkio:/agent.slice
4:pids:/outer/agent.slice
3:memory:/agent.slice
2:cpu,cpuacct:/agent.slice
1:name=systemd:/agent.slice
0::/agent.slice
";

    #[test]
    fn cgroup_mounts_are_found_with_the_agents_own_directory_in_each() {
        let mounts = cgroup_mounts(MOUNTINFO, PROC_CGROUP);
        let got: Vec<(&str, &str, &str, Option<&str>)> = mounts
            .iter()
            .map(|m| {
                (
                    m.path.to_str().unwrap_or(""),
                    m.fstype.as_str(),
                    m.options.as_str(),
                    m.root.as_deref().and_then(Path::to_str),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "/sys/fs/cgroup/unified",
                    "cgroup2",
                    "",
                    Some("/sys/fs/cgroup/unified/agent.slice")
                ),
                (
                    "/sys/fs/cgroup/systemd",
                    "cgroup",
                    "xattr,name=systemd",
                    Some("/sys/fs/cgroup/systemd/agent.slice")
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct",
                    "cgroup",
                    "cpu,cpuacct",
                    Some("/sys/fs/cgroup/cpu,cpuacct/agent.slice")
                ),
                (
                    "/sys/fs/cgroup/memory",
                    "cgroup",
                    "memory",
                    Some("/sys/fs/cgroup/memory/agent.slice")
                ),
                // The mount shows /outer: the agent's cgroup is below it.
                (
                    "/sys/fs/cgroup/pids",
                    "cgroup",
                    "pids",
                    Some("/sys/fs/cgroup/pids/agent.slice")
                ),
                // The agent's cgroup is outside what the mount shows: mounted again.
                ("/sys/fs/cgroup/blkio", "cgroup", "blkio", None),
                // mountinfo's octal escapes undone.
                (
                    "/sys/fs/cgroup/odd name",
                    "cgroup",
                    "freezer",
                    Some("/sys/fs/cgroup/odd name/agent.slice")
                ),
                // The agent's cgroup was removed: mounted again.
                ("/sys/fs/cgroup/net_cls", "cgroup", "net_cls", None),
            ]
        );
        // Without /proc/self/cgroup nothing is known: every hierarchy is mounted again.
        assert!(
            cgroup_mounts(MOUNTINFO, "")
                .iter()
                .all(|m| m.root.is_none())
        );
    }

    #[test]
    fn an_instance_sees_its_own_directory_where_it_has_one() {
        let mounts = cgroup_mounts(MOUNTINFO, PROC_CGROUP);
        let joined = [
            PathBuf::from("/sys/fs/cgroup/memory/agent.slice/corral/web/web-0"),
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/agent.slice/corral/web/web-0"),
        ];
        let views = instance_cgroup_views(&mounts, &joined);
        let root = |path: &str| {
            views
                .iter()
                .find(|m| m.path == Path::new(path))
                .and_then(|m| m.root.clone())
        };
        assert_eq!(
            root("/sys/fs/cgroup/memory"),
            Some(joined[0].clone()),
            "its own memory cgroup"
        );
        assert_eq!(root("/sys/fs/cgroup/cpu,cpuacct"), Some(joined[1].clone()));
        assert_eq!(
            root("/sys/fs/cgroup/systemd"),
            Some(PathBuf::from("/sys/fs/cgroup/systemd/agent.slice")),
            "the agent's where the instance has none"
        );
        // v2 alone: the instance's directory below the one mount.
        let v2 = cgroup_mounts(
            "31 25 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
            "0::/system.slice/corrald.service\n",
        );
        let dir = PathBuf::from("/sys/fs/cgroup/system.slice/corrald.service/corral/web/web-0");
        let views = instance_cgroup_views(&v2, std::slice::from_ref(&dir));
        assert_eq!(views[0].root.as_ref(), Some(&dir));
        // A v2 mount on /sys/fs/cgroup does not take a v1 directory below another mount.
        let mixed = [
            CgroupMount {
                path: "/sys/fs/cgroup".into(),
                fstype: "cgroup2".into(),
                options: String::new(),
                root: None,
            },
            CgroupMount {
                path: "/sys/fs/cgroup/memory".into(),
                fstype: "cgroup".into(),
                options: "memory".into(),
                root: None,
            },
        ];
        let views = instance_cgroup_views(&mixed, &joined[..1]);
        assert_eq!(views[0].root, None);
        assert_eq!(views[1].root.as_ref(), Some(&joined[0]));
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name may hold spaces and parentheses.
        let stat = "42 (a) b (c)) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 999 0";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 4), Some("7"));
        assert_eq!(stat_field(stat, 22), Some("999"));
        assert_eq!(stat_field(stat, 2), None);
        assert_eq!(stat_field(stat, 60), None);
        assert_eq!(stat_field("no name here", 3), None);
        let own = proc_stat("self").expect("own stat");
        assert_eq!(
            stat_field(&own, 4).and_then(|p| p.parse().ok()),
            Some(nix::unistd::getppid().as_raw())
        );
    }

    #[test]
    fn the_socket_needs_a_directory_of_its_own() {
        for refused in [
            "/run/corral.sock",
            "/tmp/corral.sock",
            "/var/run/corral.sock",
            "/corral.sock",
            "/var/lib/x.sock",
            "/tmp/../run/x.sock",
        ] {
            let e = socket_dir(Path::new(refused)).expect_err(refused);
            assert!(
                e.starts_with(&format!(
                    "--socket {refused}: put the socket in a directory of its own"
                )),
                "{e}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("c.sock");
        assert_eq!(
            socket_dir(&sock).expect("own directory"),
            fs::canonicalize(dir.path()).expect("canonical")
        );
        // Not made yet: taken as written.
        assert_eq!(
            socket_dir(Path::new("/run/corral-test-none/c.sock")).expect("own directory"),
            PathBuf::from("/run/corral-test-none")
        );
    }

    fn spec(toml: &str) -> ServiceSpec {
        crate::spec::parse_toml(&format!("name = \"web\"\ncommand = [\"/bin/sh\"]\n{toml}"))
            .expect("valid spec")
    }

    /// An instance adopted after an agent crash whose init then dies while nobody reaps it
    /// (its new parent reaps orphans late, or never): its end is seen all the same, so a
    /// stop or a delete does not wait on it for ever.
    #[tokio::test]
    async fn an_adopted_init_left_a_zombie_has_ended() {
        let state = tempfile::tempdir().expect("tempdir");
        let rt = LinuxRuntime::new(state.path()).expect("runtime");
        // Our child, which this test reaps only at the end: a zombie meanwhile.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(child.id()).expect("a pid");
        let start = proc_start_time(pid).expect("start time");
        let spawned = rt.adopt("z-0", pid, start).expect("adopt");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let end = tokio::time::timeout(std::time::Duration::from_secs(30), spawned.exit)
            .await
            .expect("the end of an unreaped init is seen");
        assert_eq!(end.status, crate::runtime::ProcessStatus::Unknown);
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        assert!(stat.contains(") Z "), "still a zombie: {stat}");
        child.wait().expect("reap");
    }

    /// Specs valid on paper that this host (or this agent) cannot run as asked: each refused
    /// at Apply with the field named, never started and left unenforced.
    #[test]
    fn preflight_refusals_name_the_field() {
        // Not under /tmp: a private /tmp would hide a workdir there anyway.
        let dir = |prefix| {
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in("/var/tmp")
                .expect("tempdir")
        };
        let (state, sockets) = (dir("corral-state-"), dir("corral-sock-"));
        let mut rt = LinuxRuntime::new(state.path()).expect("runtime");
        rt.mask_socket_dir(&sockets.path().join("c.sock"))
            .expect("own directory");
        let inside_state = state.path().join("run");
        let inside_sockets = sockets.path().display().to_string();
        let cases: Vec<(String, &str)> = vec![
            (
                "user = \"dynamic\"".into(),
                "user: \"dynamic\": the agent gives no dynamic users (start corrald with --dynamic-users FIRST-LAST)",
            ),
            (
                format!("workdir = {:?}", inside_state.display().to_string()),
                "which the agent masks in every instance",
            ),
            (
                format!("workdir = {inside_sockets:?}"),
                "which the agent masks in every instance",
            ),
            (
                "user = \"no-such-user-here\"".into(),
                "user: \"no-such-user-here\": no such user on this host",
            ),
            (
                "workdir = \"/nonexistent-corral\"".into(),
                "workdir: \"/nonexistent-corral\": ",
            ),
        ];
        for (toml, fragment) in &cases {
            let e = joined(rt.preflight(&spec(toml)).expect_err(toml));
            assert!(e.contains(fragment), "{toml}: {e}");
        }
        let userns = "[isolation]\nuserns = true";
        let e = joined(rt.preflight(&spec(userns)).expect_err("no --userns-ids"));
        assert!(
            e.contains("isolation.userns: the agent gives no user namespaces"),
            "{e}"
        );
        rt.set_userns_ids(
            UsernsIds::open(&state.path().join("userns-ids.json"), UsernsIds::DEFAULT)
                .expect("userns ids"),
        );
        assert_eq!(rt.preflight(&spec(userns)), Ok(()));
        for (toml, fragment) in [
            (
                format!("user = \"70000\"\n{userns}"),
                "user: \"70000\" is outside the instance's user namespace (ids 0-65535)",
            ),
            (
                format!("user = \"0:70000\"\n{userns}"),
                "user: \"0:70000\" is outside the instance's user namespace",
            ),
        ] {
            let e = joined(rt.preflight(&spec(&toml)).expect_err(&toml));
            assert!(e.contains(fragment), "{toml}: {e}");
        }
        // Masked directories only matter with a mount namespace.
        let no_mount = format!(
            "workdir = {:?}\n[isolation]\nnamespaces = [\"uts\"]",
            inside_state.display().to_string()
        );
        assert_eq!(rt.preflight(&spec(&no_mount)), Ok(()));
        assert_eq!(rt.preflight(&spec("")), Ok(()));
    }

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
