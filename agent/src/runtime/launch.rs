//! What an instance's process environment holds, computed from its spec. Pure.

use std::collections::BTreeMap;

use crate::spec::ServiceSpec;

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
}
