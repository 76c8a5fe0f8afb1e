//! What one run of a job changes of the job's spec (`RunJob`'s overrides, `corral run NAME
//! --env K=V --timeout 5m -- args...`): a replacement command, arguments appended to the
//! command, variables added to the environment, its own timeout and parallelism. They are
//! checked against the job's spec by the same rules as the spec's own fields, and every
//! error names its field under `overrides.`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::error::{FieldError, SpecError, quote};
use super::super::types::ServiceSpec;
use super::super::units::parse_duration;
use super::super::validate::{MAX_REPLICAS, command_errors, env_errors};
use super::{MAX_TIMEOUT, duration};
use crate::spec::artifact::Package;

/// One run's overrides, as asked for (before they are checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawOverrides {
    /// Replaces the job's command (program and arguments); empty: the job's.
    pub command: Vec<String>,
    /// Appended to the command.
    pub args: Vec<String>,
    /// Added to the job's env, replacing a variable of the same name.
    pub env: BTreeMap<String, String>,
    /// A duration as in the spec (`"90s"`); empty: the job's `timeout`.
    pub timeout: String,
    /// 0: the job's `parallelism`.
    pub parallelism: u32,
}

/// One run's overrides, checked; kept in the run's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunOverrides {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
}

impl RawOverrides {
    /// Checked against the job's `spec`: every problem is reported, each naming its field
    /// (`overrides.command[0]`, `overrides.env.PATH`, `overrides.timeout`, ...).
    pub fn check(&self, spec: &ServiceSpec) -> Result<RunOverrides, SpecError> {
        let mut errors = Vec::new();
        let relative = matches!(spec.package, Some(Package::Artifact(_)));
        if !self.command.is_empty() || !self.args.is_empty() {
            let (field, base) = if self.command.is_empty() {
                ("overrides.args", spec.command.as_slice())
            } else {
                ("overrides.command", self.command.as_slice())
            };
            if base.is_empty() {
                errors.push(FieldError::new(
                    "overrides.args",
                    "the job's command comes from its image: give overrides.command to add arguments",
                ));
            } else {
                let argv: Vec<String> = base.iter().chain(&self.args).cloned().collect();
                errors.extend(command_errors(field, &argv, relative));
            }
        }
        if !self.env.is_empty() {
            let mut env = spec.env.clone();
            env.extend(self.env.clone());
            let ports: BTreeSet<&str> = spec.ports.keys().map(String::as_str).collect();
            errors.extend(env_errors("overrides.env", &env, &ports));
        }
        let timeout = match self.timeout.as_str() {
            "" => Some(None),
            text if parse_duration(text).is_ok_and(|d| d.is_zero()) => {
                errors.push(FieldError::new(
                    "overrides.timeout",
                    format!("{} must be longer than 0", quote(text)),
                ));
                None
            }
            text => duration(&mut errors, "overrides.timeout", Some(text), MAX_TIMEOUT),
        };
        let parallelism = match self.parallelism {
            0 => None,
            n if n > MAX_REPLICAS => {
                errors.push(FieldError::new(
                    "overrides.parallelism",
                    format!("{n} is out of range (1..={MAX_REPLICAS})"),
                ));
                None
            }
            n => Some(n),
        };
        if !errors.is_empty() {
            return Err(SpecError { errors });
        }
        Ok(RunOverrides {
            command: self.command.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            timeout: timeout.flatten(),
            parallelism,
        })
    }
}

impl RunOverrides {
    pub fn is_empty(&self) -> bool {
        *self == RunOverrides::default()
    }

    /// The spec the run's instances start with: the job's, changed as overridden.
    pub fn apply(&self, spec: &ServiceSpec) -> ServiceSpec {
        let mut spec = spec.clone();
        if !self.command.is_empty() {
            spec.command = self.command.clone();
        }
        spec.command.extend(self.args.iter().cloned());
        spec.env
            .extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(job) = spec.job.as_mut() {
            job.timeout = self.timeout.or(job.timeout);
            job.parallelism = self.parallelism.unwrap_or(job.parallelism);
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> ServiceSpec {
        crate::spec::parse_toml(
            "name = \"report\"\nkind = \"job\"\ncommand = [\"/app/report\", \"--since\", \"24h\"]\nenv = { MODE = \"full\" }\n[job]\ntimeout = \"1h\"\n",
        )
        .expect("valid job")
    }

    fn fields(e: SpecError) -> Vec<String> {
        e.errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn overrides_change_the_command_env_timeout_and_parallelism() {
        let spec = job();
        let raw = RawOverrides {
            args: vec!["--dry-run".into()],
            env: BTreeMap::from([("MODE".into(), "quick".into()), ("X".into(), "1".into())]),
            timeout: "5s".into(),
            parallelism: 3,
            ..RawOverrides::default()
        };
        let o = raw.check(&spec).expect("valid");
        let run = o.apply(&spec);
        assert_eq!(run.command, ["/app/report", "--since", "24h", "--dry-run"]);
        assert_eq!(run.env["MODE"], "quick");
        assert_eq!(run.env["X"], "1");
        let j = run.job.expect("a job");
        assert_eq!(
            (j.timeout, j.parallelism),
            (Some(Duration::from_secs(5)), 3)
        );
        let replaced = RawOverrides {
            command: vec!["/bin/echo".into()],
            args: vec!["hi".into()],
            ..RawOverrides::default()
        };
        let run = replaced.check(&spec).expect("valid").apply(&spec);
        assert_eq!(run.command, ["/bin/echo", "hi"]);
        assert_eq!(run.env["MODE"], "full", "the job's env stays");
        assert!(
            RawOverrides::default()
                .check(&spec)
                .expect("valid")
                .is_empty()
        );
        let json = serde_json::to_string(&o).expect("serializes");
        let back: RunOverrides = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, o);
    }

    #[test]
    fn bad_overrides_are_refused_naming_the_field() {
        let spec = job();
        let bad = RawOverrides {
            command: vec!["bin/x".into()],
            args: vec!["a\0b".into()],
            env: BTreeMap::from([
                ("CORRAL_RUN".into(), "x".into()),
                ("1BAD".into(), "x".into()),
            ]),
            timeout: "0s".into(),
            parallelism: MAX_REPLICAS + 1,
        };
        let got = fields(bad.check(&spec).expect_err("refused"));
        for want in [
            "overrides.command[0]",
            "overrides.command[1]",
            "overrides.env.CORRAL_RUN",
            "overrides.env.1BAD",
            "overrides.timeout",
            "overrides.parallelism",
        ] {
            assert!(got.iter().any(|f| f == want), "{want} in {got:?}");
        }
        let unreadable = RawOverrides {
            timeout: "soon".into(),
            ..RawOverrides::default()
        };
        assert_eq!(
            fields(unreadable.check(&spec).expect_err("refused")),
            ["overrides.timeout"]
        );
    }
}
