//! The final `execve` of a service process or an exec probe, with the service's environment
//! passed explicitly: the processes that prepare it (the init, the probe helper) run with a
//! fixed, empty environment of their own, so nothing from the spec's `env` (`LD_PRELOAD`,
//! `LD_LIBRARY_PATH`, `LD_AUDIT`, ...) ever reaches a privileged process or a dynamic loader
//! that runs one. A bare command name is looked up in the service's own `PATH`, like
//! `execvp` would in the service's environment.
//!
//! [`Command::new`] prepares everything (allocation included) before the fork; [`Command::exec`]
//! only makes system calls.
//!
//! Imports from the crate: nothing.

use std::ffi::CString;

use nix::errno::Errno;

/// `PATH` of a service whose environment has none (glibc's default for `execvp`).
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A command ready to be executed.
#[derive(Debug)]
pub struct Command {
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Where to try, in order: the command itself when it holds a `/`, else each `PATH` entry.
    candidates: Vec<CString>,
}

/// `name=value` entries of `env` as C strings; an entry with a NUL byte is an error naming it.
pub fn env_block(env: &[(String, String)]) -> Result<Vec<CString>, String> {
    env.iter()
        .map(|(k, v)| {
            CString::new(format!("{k}={v}")).map_err(|_| format!("env {k} holds a NUL byte"))
        })
        .collect()
}

/// The paths to try for `file` given the service's `PATH` value.
pub fn candidates(file: &str, path: Option<&str>) -> Vec<String> {
    if file.contains('/') {
        return vec![file.to_string()];
    }
    path.unwrap_or(FALLBACK_PATH)
        .split(':')
        .map(|dir| {
            // An empty entry means the current directory.
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{file}", dir.trim_end_matches('/'))
        })
        .collect()
}

impl Command {
    /// `argv` (non-empty) with the environment `env`.
    pub fn new(argv: &[String], env: &[(String, String)]) -> Result<Command, String> {
        let c = |s: &str| {
            CString::new(s.as_bytes())
                .map_err(|_| format!("command argument {s:?} holds a NUL byte"))
        };
        let first = argv.first().ok_or("empty command")?;
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        Ok(Command {
            argv: argv.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
            envp: env_block(env)?,
            candidates: candidates(first, path)
                .iter()
                .map(|p| c(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Add `name=value` to the environment (for the variables set only at the fork).
    pub fn push_env(&mut self, name: &str, value: &str) -> Result<(), String> {
        self.envp.push(
            CString::new(format!("{name}={value}"))
                .map_err(|_| format!("env {name} holds a NUL byte"))?,
        );
        Ok(())
    }

    /// The program as written.
    pub fn program(&self) -> &CString {
        &self.argv[0]
    }

    /// Execute; returns only on failure, with the error that matters (`EACCES` when a
    /// candidate exists but cannot be executed, else the last one, like `execvp`).
    pub fn exec(&self) -> Errno {
        let mut seen_eacces = false;
        let mut last = Errno::ENOENT;
        for candidate in &self.candidates {
            let e = match nix::unistd::execve(candidate, &self.argv, &self.envp) {
                Err(e) => e,
                Ok(never) => match never {},
            };
            match e {
                Errno::EACCES => seen_eacces = true,
                Errno::ENOENT
                | Errno::ENOTDIR
                | Errno::ESTALE
                | Errno::ENODEV
                | Errno::ETIMEDOUT => {}
                other => return other,
            }
            last = e;
        }
        if seen_eacces { Errno::EACCES } else { last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_the_service_path() {
        let cases: &[(&str, Option<&str>, &[&str])] = &[
            ("/bin/sh", Some("/x"), &["/bin/sh"]),
            ("./run", None, &["./run"]),
            ("sh", Some("/a:/b/"), &["/a/sh", "/b/sh"]),
            ("sh", Some("/a::/b"), &["/a/sh", "./sh", "/b/sh"]),
            ("sh", None, &["/usr/local/bin/sh", "/usr/bin/sh", "/bin/sh"]),
        ];
        for (file, path, want) in cases {
            assert_eq!(candidates(file, *path), *want, "{file} in {path:?}");
        }
    }

    #[test]
    fn nul_bytes_are_refused_with_the_name() {
        let env = [("A".to_string(), "x\0y".to_string())];
        let e = Command::new(&["/bin/true".into()], &env).expect_err("NUL");
        assert!(e.contains("env A"), "{e}");
        assert!(Command::new(&[], &[]).is_err());
        assert!(Command::new(&["a\0b".into()], &[]).is_err());
    }

    #[test]
    fn missing_and_unexecutable_programs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().display().to_string();
        std::fs::write(dir.path().join("plain"), "data").expect("file");
        let env = [("PATH".to_string(), path)];
        let missing = Command::new(&["nonexistent-corral".into()], &env).expect("cmd");
        assert_eq!(missing.exec(), Errno::ENOENT);
        let plain = Command::new(&["plain".into()], &env).expect("cmd");
        assert_eq!(plain.exec(), Errno::EACCES);
    }
}
