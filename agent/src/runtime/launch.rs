//! What an instance gets, computed from its spec: its process environment ([`service_env`]),
//! its capabilities ([`cap_plan`]), the seccomp policy ([`seccomp_policy`]) and its init's
//! whole configuration ([`init_config`]). Pure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::privileges::CapPlan;
use super::{CgroupMount, InitConfig};
use crate::spec::{Devices, Namespace, Seccomp, ServiceSpec, SystemPaths};

/// The default `PATH` of a service that does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The identity an instance runs as, resolved on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// From the passwd entry, when there is one.
    pub name: Option<String>,
    pub home: Option<String>,
}

/// The complete environment of an instance's service process, sorted by name.
///
/// The service gets a clean environment, never the agent's: `PATH` (a standard default),
/// `HOME`, `USER` and `LOGNAME` from the passwd entry of the user it runs as, then the spec's
/// `env` (which may override those), then corral's own variables, which nothing overrides:
/// `CORRAL_SERVICE`, `CORRAL_INSTANCE`, `CORRAL_INDEX` and `PORT_<NAME>` per `[ports]` entry.
pub fn service_env(
    spec: &ServiceSpec,
    index: u32,
    instance: &str,
    ports: &BTreeMap<String, u16>,
    identity: Option<&Identity>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    if let Some(id) = identity {
        if let Some(home) = &id.home {
            env.insert("HOME".into(), home.clone());
        }
        if let Some(name) = &id.name {
            env.insert("USER".into(), name.clone());
            env.insert("LOGNAME".into(), name.clone());
        }
    }
    for (k, v) in &spec.env {
        env.insert(k.clone(), v.clone());
    }
    env.insert("CORRAL_SERVICE".into(), spec.name.clone());
    env.insert("CORRAL_INSTANCE".into(), instance.to_string());
    env.insert("CORRAL_INDEX".into(), index.to_string());
    for (name, port) in ports {
        env.insert(
            format!("PORT_{}", name.to_ascii_uppercase()),
            port.to_string(),
        );
    }
    env.into_iter().collect()
}

/// The capabilities of `spec`'s service process when it runs as `uid`.
pub fn cap_plan(spec: &ServiceSpec, uid: u32) -> CapPlan {
    CapPlan::for_instance(spec.isolation.capabilities.as_deref(), uid)
}

/// What the default seccomp filter of `spec` depends on; `None` for `unconfined`.
pub fn seccomp_policy(spec: &ServiceSpec, caps: &CapPlan) -> Option<super::seccomp::Policy> {
    (spec.isolation.seccomp == Seccomp::Default).then_some(super::seccomp::Policy {
        capabilities: caps.permitted,
        own_pid_namespace: spec.isolation.has(Namespace::Pid),
    })
}

/// What the host contributes to every instance's init configuration.
#[derive(Debug, Clone, Copy)]
pub struct HostView<'a> {
    /// The instance's log directory.
    pub log_dir: &'a Path,
    /// The agent's directories, masked in every instance with a mount namespace.
    pub masked: &'a [PathBuf],
    /// The host's cgroup filesystems.
    pub cgroup_mounts: &'a [CgroupMount],
    /// `[artifact]`: the unpacked tree in the store.
    pub artifact: Option<&'a Path>,
    /// `[image]`: the instance's plan from the image's config, and its layers.
    pub image: Option<(&'a super::image::Plan, &'a super::image::ImageRoot)>,
}

/// Who the service runs as: the identity resolved on the host, and whether the init must
/// change to it (`false`: the agent's own user).
#[derive(Debug, Clone, Copy)]
pub struct RunAs<'a> {
    pub identity: Option<&'a Identity>,
    pub change: bool,
    /// The agent's own uid, for the capabilities when `identity` is unknown.
    pub agent_uid: u32,
}

/// The whole configuration of an instance's init.
pub fn init_config(
    spec: &ServiceSpec,
    index: u32,
    instance: &str,
    ports: &BTreeMap<String, u16>,
    run_as: RunAs<'_>,
    host: HostView<'_>,
    fds: super::InitFds,
) -> InitConfig {
    let iso = &spec.isolation;
    let uid = run_as.identity.map_or(run_as.agent_uid, |i| i.uid);
    let changed = run_as.identity.filter(|_| run_as.change);
    let mount_ns = iso.has(Namespace::Mount);
    let system_paths = mount_ns && iso.system_paths == SystemPaths::Masked;
    let image = host.image.filter(|_| mount_ns);
    let mut env = service_env(spec, index, instance, ports, run_as.identity);
    if let Some((plan, _)) = image {
        super::image::merge_env(&mut env, &plan.env);
    }
    InitConfig {
        instance: instance.to_string(),
        command: image.map_or_else(|| super::package::command(spec), |(p, _)| p.command.clone()),
        workdir: image.map_or_else(|| spec.workdir.clone(), |(p, _)| p.workdir.clone()),
        uid: changed.map(|i| i.uid),
        gid: changed.map(|i| i.gid),
        hostname: spec.hostname_for(index),
        pid_namespace: iso.has(Namespace::Pid),
        mount_namespace: mount_ns,
        net_namespace: iso.has(Namespace::Net),
        private_tmp: iso.private_tmp,
        log_dir: host.log_dir.to_path_buf(),
        log_max_size: spec.logs.max_size,
        log_max_files: spec.logs.max_files,
        notify: spec.health.as_ref().is_some_and(|h| h.notify),
        listen_names: spec.sockets.iter().map(|s| s.name.clone()).collect(),
        capabilities: Some(cap_plan(spec, uid)),
        nofile: spec.resources.nofile,
        nofile_soft: super::privileges::inherited_nofile_soft(),
        // An image's read-only root is its overlay without a writable layer.
        readonly_root: iso.readonly_root && image.is_none(),
        env,
        // Nothing of the host's tree is in an image instance's view.
        masked: if mount_ns && image.is_none() {
            host.masked.to_vec()
        } else {
            Vec::new()
        },
        minimal_dev: mount_ns && iso.devices == Devices::Minimal,
        system_paths,
        cgroup_mounts: if system_paths && iso.has(Namespace::Cgroup) {
            host.cgroup_mounts.to_vec()
        } else {
            Vec::new()
        },
        fds,
        userns: mount_ns && iso.userns,
        artifact: super::package::artifact_mount(spec, host.artifact),
        image: image.map(|(_, root)| root.clone()),
        incarnation: 0,
    }
}

/// Of `dirs`, those not inside another one (the outermost).
pub fn outermost(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if dirs.iter().any(|o| o != d && d.starts_with(o)) || out.contains(d) {
            continue;
        }
        out.push(d.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        crate::spec::parse_toml(
            r#"
            name = "web"
            command = ["/bin/true"]
            env = { LOG_LEVEL = "info", PATH = "/opt/bin" }
            [ports]
            admin = "auto"
            "#,
        )
        .expect("valid spec")
    }

    #[test]
    fn env_has_corral_variables_and_spec_overrides() {
        let ports = BTreeMap::from([("admin".to_string(), 4242u16)]);
        let id = Identity {
            uid: 65534,
            gid: 65534,
            name: Some("nobody".into()),
            home: Some("/nonexistent".into()),
        };
        let env: BTreeMap<_, _> = service_env(&spec(), 2, "web-2", &ports, Some(&id))
            .into_iter()
            .collect();
        assert_eq!(env["CORRAL_SERVICE"], "web");
        assert_eq!(env["CORRAL_INSTANCE"], "web-2");
        assert_eq!(env["CORRAL_INDEX"], "2");
        assert_eq!(env["PORT_ADMIN"], "4242");
        assert_eq!(env["LOG_LEVEL"], "info");
        assert_eq!(
            env["PATH"], "/opt/bin",
            "the spec's PATH wins over the default"
        );
        assert_eq!(env["USER"], "nobody");
        assert_eq!(env["HOME"], "/nonexistent");
    }

    #[test]
    fn env_without_identity_has_default_path_only() {
        let mut s = spec();
        s.env.clear();
        let env: BTreeMap<_, _> = service_env(&s, 0, "web-0", &BTreeMap::new(), None)
            .into_iter()
            .collect();
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert!(!env.contains_key("HOME"));
        assert!(!env.keys().any(|k| k.starts_with("PORT_")));
    }

    fn config_of(toml: &str, identity: Option<&Identity>, change: bool) -> InitConfig {
        let spec = crate::spec::parse_toml(toml).expect("valid spec");
        let masked = [
            PathBuf::from("/var/lib/corral"),
            PathBuf::from("/run/corral"),
        ];
        let mounts = [CgroupMount {
            path: "/sys/fs/cgroup".into(),
            fstype: "cgroup2".into(),
            options: String::new(),
            root: None,
        }];
        init_config(
            &spec,
            1,
            "web-1",
            &BTreeMap::new(),
            RunAs {
                identity,
                change,
                agent_uid: 0,
            },
            HostView {
                log_dir: Path::new("/var/lib/corral/logs/web-1"),
                masked: &masked,
                cgroup_mounts: &mounts,
                artifact: None,
                image: None,
            },
            crate::runtime::InitFds::after(0, true, false),
        )
    }

    #[test]
    fn init_config_defaults_confine_everything() {
        let c = config_of(
            "name = \"web\"\ncommand = [\"/bin/true\"]\nenv = { LD_PRELOAD = \"/x.so\" }\n",
            None,
            false,
        );
        assert!(c.pid_namespace && c.mount_namespace && !c.net_namespace);
        assert!(c.minimal_dev && c.system_paths && c.private_tmp);
        assert_eq!(c.masked.len(), 2);
        assert_eq!(
            c.cgroup_mounts.len(),
            1,
            "own cgroup namespace: views mounted again"
        );
        assert_eq!(
            (c.fds.log_dir, c.fds.seccomp, c.fds.workdir),
            (Some(4), Some(5), None),
            "the log directory, then the filter, after no listening socket"
        );
        assert!(!c.userns);
        assert_eq!((c.uid, c.gid), (None, None), "the agent's own user");
        assert_eq!(c.capabilities, Some(CapPlan::for_instance(None, 0)));
        assert_eq!(c.hostname.as_deref(), Some("web-1"));
        // The spec's env is the service's, carried to its exec only.
        assert!(c.env.iter().any(|(k, v)| k == "LD_PRELOAD" && v == "/x.so"));
    }

    #[test]
    fn init_config_follows_isolation_switches() {
        let c = config_of(
            "name = \"web\"\ncommand = [\"/bin/true\"]\n[isolation]\nnamespaces = [\"pid\", \"mount\"]\ndevices = \"host\"\nsystem_paths = \"host\"\n",
            None,
            false,
        );
        assert!(!c.minimal_dev && !c.system_paths);
        assert!(c.cgroup_mounts.is_empty());
        assert_eq!(
            c.masked.len(),
            2,
            "the agent's directories are always masked"
        );
        let c = config_of(
            "name = \"web\"\ncommand = [\"/bin/true\"]\n[isolation]\nnamespaces = [\"pid\", \"mount\"]\n",
            None,
            false,
        );
        assert!(
            c.system_paths && c.cgroup_mounts.is_empty(),
            "no cgroup namespace"
        );
        let c = config_of(
            "name = \"web\"\ncommand = [\"/bin/true\"]\n[isolation]\nnamespaces = []\n",
            None,
            false,
        );
        assert!(!c.minimal_dev && !c.system_paths && c.masked.is_empty());
        let id = Identity {
            uid: 61184,
            gid: 61184,
            name: None,
            home: None,
        };
        let c = config_of(
            "name = \"web\"\ncommand = [\"/bin/true\"]\nuser = \"dynamic\"\n",
            Some(&id),
            true,
        );
        assert_eq!((c.uid, c.gid), (Some(61184), Some(61184)));
        assert_eq!(c.capabilities, Some(CapPlan::for_instance(None, 61184)));
    }

    #[test]
    fn outermost_directories_only() {
        let dirs: Vec<PathBuf> = ["/a/b", "/a", "/c", "/a/b/c", "/c"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            outermost(&dirs),
            vec![PathBuf::from("/a"), PathBuf::from("/c")]
        );
    }
}
