//! Checks at `Apply` that the programs a spec names can be executed on this host: the
//! service's `command[0]` and an exec probe's `health.exec[0]`, each found the way the
//! instance's `execvp` will find it (an absolute path as is, a bare name in the service's
//! `PATH`: the spec's `env.PATH`, else [`DEFAULT_PATH`]). An instance sees the host's
//! filesystem (no root of its own), so what the agent finds here is what the instance finds —
//! except under the mount point of its `[artifact]`, which exists only inside the instance and
//! is not checked here.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::launch::DEFAULT_PATH;
use crate::spec::{FieldError, Probe, ServiceSpec};

/// A refusal for every program of `spec` that could not be executed.
pub(super) fn programs(spec: &ServiceSpec) -> Vec<FieldError> {
    let path = spec
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    let mut why = Vec::new();
    let checkable = |cmd: &&String| !super::package::inside_artifact(spec, Path::new(cmd.as_str()));
    // A relative program (`bin/server`) is the artifact's, found under its mount.
    let command = super::package::command(spec);
    if let Some(cmd) = command.first().filter(checkable) {
        why.extend(program("command[0]", cmd, path));
    }
    if let Some(Probe::Exec(argv)) = spec.health.as_ref().and_then(|h| h.probe.as_ref())
        && let Some(cmd) = argv.first().filter(checkable)
    {
        why.extend(program("health.exec[0]", cmd, path));
    }
    why
}

/// Why `program` (from `field`) cannot be executed, if it cannot.
fn program(field: &str, program: &str, path: &str) -> Option<FieldError> {
    if program.contains('/') {
        return executable(Path::new(program))
            .err()
            .map(|why| FieldError::new(field, format!("{program:?} {why}")));
    }
    let dirs: Vec<&str> = path.split(':').filter(|d| !d.is_empty()).collect();
    let mut found_unusable: Option<(PathBuf, String)> = None;
    for dir in &dirs {
        let candidate = Path::new(dir).join(program);
        match executable(&candidate) {
            Ok(()) => return None,
            Err(why) if fs::symlink_metadata(&candidate).is_ok() => {
                found_unusable.get_or_insert((candidate, why));
            }
            Err(_) => {}
        }
    }
    let message = match found_unusable {
        Some((p, why)) => format!(
            "{program:?} is found in the service's PATH as {} but that {why}",
            p.display()
        ),
        None => format!(
            "{program:?} is not found in the service's PATH ({path}); give an absolute path or set env.PATH"
        ),
    };
    Some(FieldError::new(field, message))
}

/// Whether `p` is a file with an execute bit set, else why not.
fn executable(p: &Path) -> Result<(), String> {
    match fs::metadata(p) {
        Ok(m) if !m.is_file() => Err("is not a file".to_string()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => {
            Err("is not executable (no execute permission)".to_string())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot be executed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(text: &str) -> ServiceSpec {
        crate::spec::parse_toml(text).expect("valid spec")
    }

    #[test]
    fn programs_are_looked_up_like_execvp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("tool");
        fs::write(&bin, "#!/bin/sh\n").expect("write");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
        let plain = dir.path().join("data");
        fs::write(&plain, "x").expect("write");
        let d = dir.path().display();
        let cases: &[(String, &[&str])] = &[
            ("command = [\"sh\"]".into(), &[]),
            ("command = [\"/bin/sh\"]".into(), &[]),
            (
                "command = [\"no-such-program-xyz\"]".into(),
                &[
                    "command[0]: \"no-such-program-xyz\" is not found in the service's PATH (/usr/local/sbin:",
                ],
            ),
            (
                "command = [\"/nonexistent/app\"]".into(),
                &["command[0]: \"/nonexistent/app\" cannot be executed: No such file or directory"],
            ),
            (
                format!("command = [\"{d}/data\"]"),
                &["command[0]: ", "data\" is not executable"],
            ),
            // The spec's own PATH is searched, not the default.
            (
                format!("command = [\"tool\"]\nenv = {{ PATH = \"{d}\" }}"),
                &[],
            ),
            (
                "command = [\"tool\"]".into(),
                &["command[0]: \"tool\" is not found"],
            ),
            (
                format!("command = [\"data\"]\nenv = {{ PATH = \"/nonexistent:{d}\" }}"),
                &[
                    "command[0]: \"data\" is found in the service's PATH as ",
                    "but that is not executable",
                ],
            ),
            (
                "command = [\"sh\"]\n[health]\nexec = [\"no-such-check-xyz\"]".into(),
                &["health.exec[0]: \"no-such-check-xyz\" is not found"],
            ),
            (
                "command = [\"sh\"]\n[health]\nexec = [\"/nonexistent/check\"]".into(),
                &["health.exec[0]: \"/nonexistent/check\" cannot be executed"],
            ),
            // The artifact's programs exist only inside the instance: a relative command
            // (found under the mount) and any path under the mount are not looked up here.
            (
                "command = [\"bin/server\"]\n[isolation]\nnamespaces = [\"mount\"]\n[artifact]\nurl = \"/srv/a.tar\"\nmount = \"/app\"".into(),
                &[],
            ),
            (
                "command = [\"/app/bin/server\"]\n[isolation]\nnamespaces = [\"mount\"]\n[health]\nexec = [\"/app/bin/check\"]\n[artifact]\nurl = \"/srv/a.tar\"\nmount = \"/app\"".into(),
                &[],
            ),
        ];
        for (body, wanted) in cases {
            let s = spec(&format!("name = \"x\"\n{body}\n"));
            let got: Vec<String> = programs(&s).iter().map(ToString::to_string).collect();
            assert_eq!(
                got.len(),
                usize::from(!wanted.is_empty()),
                "{body}: {got:?}"
            );
            for part in *wanted {
                assert!(got[0].contains(part), "{body}: {:?} lacks {part:?}", got[0]);
            }
        }
    }
}
