//! A service's `[image]` as its instances' root filesystem.
//!
//! The agent side ([`plan`]) turns the image's config into the instance's defaults, which the
//! spec overrides: `command` replaces `Entrypoint` + `Cmd`, `env` entries replace the
//! image's of the same name (the image's `PATH` replaces the agent's default one), a `workdir`
//! other than `/` replaces `WorkingDir`, `user` replaces `User` and is looked up in the
//! image's `/etc/passwd`, not the host's (`user = "dynamic"` is allocated as for a host
//! command). Each instance gets `<run dir>/image/` ([`prepare_layer`]): `base/`, a small
//! layer laid over the image with `/etc/{hostname,hosts,resolv.conf}` and the mount points
//! `/proc`, `/dev`, `/sys`, `/tmp` (real directories there hide whatever the image has under
//! those names, a hostile image's symlink `/proc -> /host/somewhere` included); the
//! overlay's writable `upper/` and `work/` (none with `isolation.readonly_root`: the overlay
//! is then read-only); `lower/`, where an idmapped rootfs is put; and the mount point `root/`.
//! [`discard_layer`] removes it when the instance ends (and before it starts again) unless
//! `persist = true`.
//!
//! The init side ([`enter`]) runs in the instance's own mount namespace, with private
//! propagation, in the order crun and youki follow: the overlay is mounted on `root/`; the
//! mounts that must be made while the host's root is still there (a fresh `/proc`, which a
//! user namespace may mount only while a full `/proc` is in view; the host's `/sys`; the
//! host's `/dev` for `devices = "host"`) go inside it; the init `fchdir`s into it,
//! `pivot_root(".", ".")` stacks the old root under the new one, `umount2(".", MNT_DETACH)`
//! drops it and `chdir("/")`. The rest of the confinement is the same code as for a host
//! command, now resolving paths inside the image: `nodev` everywhere, the minimal `/dev`
//! (`confine`), a private `/tmp`, the masked and read-only system paths and the cgroup
//! views, then the seccomp filter at the service's exec. The agent's own directories need
//! no masking: nothing of the host's tree is reachable after the pivot.
//!
//! With `isolation.userns`, the store's rootfs (owned by the image's uids, shared by every
//! service using it) comes as a detached mount idmapped like the instance's user namespace
//! (on-disk uid N is uid N inside), made by the agent, moved onto `lower/` by the init: what
//! crun and podman do where the kernel has idmapped mounts (overlayfs accepts idmapped
//! lower layers since Linux 5.19). The layers the instance writes belong to its root.
//!
//! The init binary is never looked up inside the image: `corral-init` is executed by the agent
//! from the host before the instance's mounts change, and only the service's command is
//! executed after the pivot, so an image needs no copy of corral. The init keeps the fds it
//! opened on the host (its run and log directories) across the pivot.
//!
//! Imports from the crate: `spec` only.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::spec::artifact::Package;
use crate::spec::{ServiceSpec, UserSpec};

/// An image's defaults for its instances, from its config (given by the store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRun {
    /// The image's root filesystem in the store, read-only.
    pub rootfs: PathBuf,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` each.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// The config's `User`, resolved in the image: (uid, gid).
    pub user: Option<(u32, u32)>,
}

/// What the init mounts for `[image]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRoot {
    /// The store's rootfs: the overlay's lowest layer.
    pub rootfs: PathBuf,
    /// `<run dir>/image`: `base/`, `upper/`, `work/`, `lower/`, `root/`.
    pub layer: PathBuf,
    /// Keep `upper/` when the instance ends.
    pub persist: bool,
    /// `isolation.readonly_root`: no writable layer at all, `/` read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// How [`prepare_layer`] lays out an instance's layers.
#[derive(Debug, Clone, Copy)]
pub struct LayerOptions<'a> {
    /// `[image] persist`: keep the writable layer of the previous run.
    pub persist: bool,
    /// `isolation.readonly_root`: no writable layer.
    pub readonly: bool,
    /// `isolation.userns`: the host id of the instance's root, which owns the layers.
    pub owner: Option<u32>,
    /// For `/etc/hostname` and `/etc/hosts`.
    pub hostname: &'a str,
}

/// The directory of an instance's image layer, inside its run directory.
pub const LAYER_DIR: &str = "image";

/// How an image instance runs: its argv, workdir, extra environment and user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub command: Vec<String>,
    pub workdir: PathBuf,
    /// The image's variables the spec does not set, to lay under the service's environment.
    pub env: Vec<(String, String)>,
    /// (uid, gid, name, home) the service runs as; `None`: the agent's own (root).
    pub user: Option<(u32, u32, Option<String>, Option<String>)>,
}

/// Whether `spec` runs from an image.
pub fn is_image(spec: &ServiceSpec) -> bool {
    matches!(spec.package, Some(Package::Image(_)))
}

/// The image's `persist` setting.
pub fn persist(spec: &ServiceSpec) -> bool {
    matches!(&spec.package, Some(Package::Image(i)) if i.persist)
}

/// The instance's command, workdir, image variables and user, from the spec over the image's
/// config. Errors name the field.
pub fn plan(spec: &ServiceSpec, image: &ImageRun) -> Result<Plan, String> {
    let command = if spec.command.is_empty() {
        let argv: Vec<String> = image.entrypoint.iter().chain(&image.cmd).cloned().collect();
        if argv.is_empty() {
            return Err(
                "command: the spec gives none and the image's config has no Entrypoint or Cmd"
                    .into(),
            );
        }
        argv
    } else {
        spec.command.clone()
    };
    let workdir = match &image.working_dir {
        Some(dir) if spec.workdir == Path::new("/") && dir.starts_with('/') => PathBuf::from(dir),
        _ => spec.workdir.clone(),
    };
    let env = image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| !k.is_empty() && !spec.env.contains_key(*k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let passwd = || fs::read_to_string(image.rootfs.join("etc/passwd")).unwrap_or_default();
    let user = match &spec.user {
        None => image.user.map(|(uid, gid)| {
            let entry = lookup(&passwd(), |e| e.uid == uid);
            (
                uid,
                gid,
                entry.as_ref().map(|e| e.name.clone()),
                entry.map(|e| e.home),
            )
        }),
        Some(UserSpec::Name(name)) => {
            let e = lookup(&passwd(), |e| e.name == *name).ok_or_else(|| {
                format!("user: {name:?}: the image's /etc/passwd has no such user")
            })?;
            Some((e.uid, e.gid, Some(e.name), Some(e.home)))
        }
        // Allocated by the runtime, as for a host command.
        Some(UserSpec::Dynamic) => None,
        Some(UserSpec::Id { uid, gid }) => {
            let entry = lookup(&passwd(), |e| e.uid == *uid);
            let g = gid.or(entry.as_ref().map(|e| e.gid)).unwrap_or(*uid);
            Some((
                *uid,
                g,
                entry.as_ref().map(|e| e.name.clone()),
                entry.map(|e| e.home),
            ))
        }
    };
    Ok(Plan {
        command,
        workdir,
        env,
        user,
    })
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// The first `/etc/passwd` line that `matches`.
fn lookup(passwd: &str, matches: impl Fn(&PasswdEntry) -> bool) -> Option<PasswdEntry> {
    passwd
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: (*f.first()?).to_owned(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: (*f.get(5)?).to_owned(),
            })
        })
        .find(|e| matches(e))
}

/// Lays the image's variables under the service's environment: the image's `PATH` replaces
/// the agent's default; every other variable already set (the spec's, corral's own) stays.
pub fn merge_env(env: &mut Vec<(String, String)>, image_env: &[(String, String)]) {
    for (k, v) in image_env {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) if k == "PATH" => slot.1 = v.clone(),
            Some(_) => {}
            None => env.push((k.clone(), v.clone())),
        }
    }
    env.sort();
}

/// Prepares `<run dir>/image`: `base/` (the files corral provides, `/etc/hostname`,
/// `/etc/hosts` and `/etc/resolv.conf`, and the mount points `/proc`, `/dev`, `/sys` and
/// `/tmp`), the overlay layer just above the image; a fresh writable `upper/` (unless
/// `persist`: the one left by the instance's previous run, if any; none when `readonly`);
/// `lower/` (where an idmapped rootfs is put) and `root/`. With a user namespace everything
/// belongs to its root. Refuses store and run paths overlayfs options cannot carry.
pub fn prepare_layer(
    run_dir: &Path,
    rootfs: &Path,
    opts: LayerOptions<'_>,
) -> io::Result<ImageRoot> {
    for p in [run_dir, rootfs] {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{s:?} holds ',', ':' or '\\', which an overlay mount's options cannot carry"
                ),
            ));
        }
    }
    let layer = run_dir.join(LAYER_DIR);
    if opts.persist && !opts.readonly {
        discard(&layer.join("base"))?;
    } else {
        discard(&layer)?;
    }
    // Created with `mode`, set again only where the umask trimmed it.
    let exact = |p: &Path, mode: u32| -> io::Result<()> {
        if mode & umask() == 0 {
            return Ok(());
        }
        fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
    };
    let mkdir = |p: &Path, mode: u32| -> io::Result<()> {
        fs::DirBuilder::new().recursive(true).mode(mode).create(p)?;
        exact(p, mode)
    };
    let mut dirs = vec!["base", "lower", "root"];
    if !opts.readonly {
        dirs.extend(["upper", "work"]);
    }
    for d in &dirs {
        mkdir(&layer.join(d), 0o755)?;
    }
    let base = layer.join("base");
    for (d, mode) in [
        ("etc", 0o755),
        ("proc", 0o555),
        ("dev", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
    ] {
        mkdir(&base.join(d), mode)?;
    }
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
        opts.hostname
    );
    for (name, text) in [
        ("hostname", format!("{}\n", opts.hostname)),
        ("hosts", hosts),
        ("resolv.conf", host_resolv_conf()),
    ] {
        let path = base.join("etc").join(name);
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)?
            .write_all(text.as_bytes())?;
        exact(&path, 0o644)?;
    }
    if let Some(owner) = opts.owner {
        chown_tree(&layer, owner, false)?;
        for d in dirs
            .iter()
            .chain(&["base/etc", "base/proc", "base/dev", "base/sys", "base/tmp"])
        {
            std::os::unix::fs::lchown(layer.join(d), Some(owner), Some(owner))?;
        }
        for name in ["hostname", "hosts", "resolv.conf"] {
            std::os::unix::fs::lchown(base.join("etc").join(name), Some(owner), Some(owner))?;
        }
    }
    Ok(ImageRoot {
        rootfs: rootfs.to_path_buf(),
        layer,
        persist: opts.persist,
        readonly: opts.readonly,
    })
}

/// The agent's umask, read once (it never changes its own; `/proc/self/status`, since
/// umask(2) can only read it by setting it). Unknown: every bit, so that modes are always
/// set again.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o7777)
    })
}

/// `lchown` of `path` (and, when `deep`, of what is below it) to `owner`.
fn chown_tree(path: &Path, owner: u32, deep: bool) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner), Some(owner))?;
    if deep && fs::symlink_metadata(path)?.is_dir() {
        for e in fs::read_dir(path)? {
            chown_tree(&e?.path(), owner, true)?;
        }
    }
    Ok(())
}

fn discard(layer: &Path) -> io::Result<()> {
    match fs::remove_dir_all(layer) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// After an instance's init ended: removes its writable layer unless its `[image]` says
/// `persist` (read from the init config it ran with).
pub fn discard_layer(run_dir: &Path) {
    let config = fs::read(run_dir.join(super::INIT_CONFIG))
        .ok()
        .and_then(|b| serde_json::from_slice::<super::InitConfig>(&b).ok());
    let Some(root) = config.and_then(|c| c.image) else {
        return;
    };
    if root.persist {
        return;
    }
    if let Err(e) = discard(&root.layer) {
        tracing::warn!(layer = %root.layer.display(), error = %e, "cannot remove the instance's writable layer");
    }
}

/// The host's `/etc/resolv.conf`, for the image (empty when unreadable).
pub fn host_resolv_conf() -> String {
    fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
}

/// In the init, in the instance's mount namespace with private propagation, before anything
/// else changes its mounts: the image's root put together on `root/` — an overlay of
/// `base/` over the rootfs (the idmapped one from `lower_fd` when given), with `upper/` unless
/// read-only — then, still inside the new root and while the host's `/proc` is in view (a
/// user namespace may mount a `proc` only then), a fresh `/proc`, the host's `/sys` (made
/// read-only or masked later, as for any instance) and, for `devices = "host"`, the host's
/// `/dev`; then `pivot_root`. What the init does next (nodev, the minimal `/dev`, `/tmp`,
/// masked and read-only system paths, seccomp at the service's exec) happens inside the
/// image, on the same paths as for a host command.
pub(super) fn enter(
    root: &ImageRoot,
    layers: &std::os::fd::OwnedFd,
    lower_fd: &std::os::fd::OwnedFd,
    userns: bool,
    host_dev: bool,
) -> Result<(), String> {
    // The layers' mount, made by the agent, attached in this namespace on a directory anyone
    // may search (root in a user namespace may not search the agent's directories): `/tmp`
    // of the host's tree, which is left behind with it at the pivot.
    let layer = PathBuf::from(LAYERS_AT);
    super::mounts::move_tree(layers, &layer)
        .map_err(|e| format!("attaching the image's layers on {LAYERS_AT}: {e}"))?;
    let target = layer.join("root");
    let lower = layer.join("lower");
    super::mounts::move_tree(lower_fd, &lower)
        .map_err(|e| format!("putting the rootfs on {}: {e}", lower.display()))?;
    let mut data = format!(
        "lowerdir={}:{}",
        layer.join("base").display(),
        lower.display()
    );
    if !root.readonly {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            layer.join("upper").display(),
            layer.join("work").display()
        ));
    }
    if userns {
        // trusted.* attributes are the host root's: in a user namespace overlayfs keeps its
        // own in user.*.
        data.push_str(",userxattr");
    }
    let mut flags = MsFlags::MS_NODEV;
    if root.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| format!("mounting the image's overlay on {}: {e}", target.display()))?;
    mount(
        Some("proc"),
        &target.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
    let mut binds = vec!["sys"];
    if host_dev {
        binds.push("dev");
    }
    for dir in binds {
        mount(
            Some(Path::new("/").join(dir).as_path()),
            &target.join(dir),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("binding the host's /{dir}: {e}"))?;
    }
    pivot(&target)
}

/// Where the init attaches the image's layers before the pivot.
const LAYERS_AT: &str = "/tmp";

/// `pivot_root` onto `target` (a mount point), the old root detached.
fn pivot(target: &Path) -> Result<(), String> {
    let new_root = nix::fcntl::open(
        target,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the image's root {}: {e}", target.display()))?;
    nix::unistd::fchdir(&new_root).map_err(|e| format!("entering the image's root: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    // The old root now sits on top of the new one, here: detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the host's root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> ServiceSpec {
        crate::spec::parse_toml(&format!(
            "name = \"web\"\n{extra}\n[image]\nurl = \"/srv/web.oci.tar\"\ndigest = \"sha256:{}\"\n",
            "a".repeat(64)
        ))
        .expect("valid spec")
    }

    fn image(rootfs: &Path) -> ImageRun {
        ImageRun {
            rootfs: rootfs.to_path_buf(),
            entrypoint: vec!["/bin/httpd".into()],
            cmd: vec!["-f".into(), "-p".into(), "80".into()],
            env: vec!["PATH=/usr/local/bin:/bin".into(), "MODE=image".into()],
            working_dir: Some("/srv".into()),
            user: Some((1000, 1000)),
        }
    }

    #[test]
    fn the_image_config_is_the_default_and_the_spec_overrides_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("etc")).expect("etc");
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:34::/var/www:/bin/sh\n",
        )
        .expect("passwd");
        let img = image(dir.path());

        let p = plan(&spec(""), &img).expect("plan");
        assert_eq!(p.command, ["/bin/httpd", "-f", "-p", "80"]);
        assert_eq!(p.workdir, Path::new("/srv"));
        assert_eq!(
            p.user,
            Some((1000, 1000, Some("app".into()), Some("/home/app".into())))
        );
        let mut env = vec![
            ("PATH".to_owned(), "/usr/bin".to_owned()),
            ("CORRAL_SERVICE".to_owned(), "web".to_owned()),
        ];
        merge_env(&mut env, &p.env);
        assert_eq!(
            env,
            [
                ("CORRAL_SERVICE".to_owned(), "web".to_owned()),
                ("MODE".to_owned(), "image".to_owned()),
                ("PATH".to_owned(), "/usr/local/bin:/bin".to_owned()),
            ]
        );

        let p = plan(
            &spec("command = [\"/bin/sh\", \"-c\", \"x\"]\nworkdir = \"/opt\"\nuser = \"web\"\nenv = { MODE = \"spec\" }"),
            &img,
        )
        .expect("plan");
        assert_eq!(p.command, ["/bin/sh", "-c", "x"]);
        assert_eq!(p.workdir, Path::new("/opt"));
        assert_eq!(p.user.map(|u| (u.0, u.1)), Some((33, 34)));
        assert!(p.env.iter().all(|(k, _)| k != "MODE"), "{:?}", p.env);

        let err = plan(&spec("user = \"nobody\""), &img).expect_err("unknown user");
        assert_eq!(
            err,
            "user: \"nobody\": the image's /etc/passwd has no such user"
        );
        let empty = ImageRun {
            entrypoint: vec![],
            cmd: vec![],
            ..img
        };
        assert!(
            plan(&spec(""), &empty)
                .expect_err("no command")
                .starts_with("command:")
        );
    }

    #[test]
    fn a_layer_is_fresh_unless_persisted_and_paths_overlay_cannot_carry_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        let run = dir.path().join("run");
        let opts = |persist, readonly| LayerOptions {
            persist,
            readonly,
            owner: None,
            hostname: "web-1",
        };
        let root = prepare_layer(&run, &rootfs, opts(false, false)).expect("layer");
        let layer = root.layer.clone();
        assert_eq!(
            fs::read_to_string(layer.join("base/etc/hostname")).expect("hostname"),
            "web-1\n"
        );
        assert!(
            fs::read_to_string(layer.join("base/etc/hosts"))
                .expect("hosts")
                .contains("localhost")
        );
        for d in ["proc", "dev", "sys", "tmp"] {
            assert!(layer.join("base").join(d).is_dir(), "mount point {d}");
        }
        fs::write(layer.join("upper/left"), "x").expect("write");
        prepare_layer(&run, &rootfs, opts(true, false)).expect("layer");
        assert!(layer.join("upper/left").exists(), "persist keeps it");
        prepare_layer(&run, &rootfs, opts(false, false)).expect("layer");
        assert!(!layer.join("upper/left").exists(), "a fresh layer");
        let ro = prepare_layer(&run, &rootfs, opts(true, true)).expect("layer");
        assert!(
            ro.readonly && !layer.join("upper").exists(),
            "no writable layer"
        );
        let err =
            prepare_layer(&dir.path().join("a,b"), &rootfs, opts(false, false)).expect_err("comma");
        assert!(err.to_string().contains("overlay"), "{err}");
    }
}
