//! The escape suite, as root on this host: a hostile root service with the default isolation
//! (and with `readonly_root`) tries every way out of its instance with real system calls
//! (see `corral_e2e::scenarios::escape_is_refused`; the same scenarios run in the cgroup v2
//! VM), and a service that plants `LD_PRELOAD`/`LD_LIBRARY_PATH`/`LD_AUDIT` in its own
//! environment never gets code run by a privileged process — not by its init, not by the
//! exec-probe helper.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corral_e2e::{Agent, eventually, scenarios, skip_unless_root, testbin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_with_the_defaults_is_refused() {
    if skip_unless_root("escape_with_the_defaults_is_refused") {
        return;
    }
    scenarios::escape_is_refused(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_with_readonly_root_is_refused() {
    if skip_unless_root("escape_with_readonly_root_is_refused") {
        return;
    }
    scenarios::escape_is_refused(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_from_an_image_is_refused() {
    if skip_unless_root("escape_from_an_image_is_refused") {
        return;
    }
    scenarios::image_escape_is_refused(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_from_an_image_in_a_user_namespace_is_refused() {
    if skip_unless_root("escape_from_an_image_in_a_user_namespace_is_refused") {
        return;
    }
    scenarios::image_escape_is_refused(true).await;
}

/// A shared library whose constructor leaves a file in `dir` naming the uid that loaded it:
/// `root-<pid>` for uid or euid 0, `user-<pid>` otherwise.
const EVIL: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s-%d", DIR, (getuid() == 0 || geteuid() == 0) ? "root" : "user", getpid());
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) close(fd);
}
"#;

fn marks(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Finding 1: the spec's `env` names a library in the service's own (writable) workdir for
/// the dynamic loader; the service runs as nobody without capabilities on a read-only root.
/// The loader does read it — the service process itself and its exec probe (as nobody) load
/// it — but no root process ever does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_variables_in_env_never_reach_root() {
    if skip_unless_root("loader_variables_in_env_never_reach_root") {
        return;
    }
    std::fs::create_dir_all("/var/tmp").expect("mkdir /var/tmp");
    let workdir = tempfile::Builder::new()
        .prefix("corral-e2e-preload-")
        .tempdir_in("/var/tmp")
        .expect("workdir");
    let dir = workdir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let src = dir.join("evil.c");
    std::fs::write(&src, EVIL).expect("write evil.c");
    let so = dir.join("libevil.so");
    let built = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(format!("-DDIR=\"{}\"", dir.display()))
        .arg(&src)
        .status();
    match built {
        Ok(s) if s.success() => {}
        other => {
            eprintln!(
                "SKIP loader_variables_in_env_never_reach_root: gcc cannot build the library ({other:?})"
            );
            return;
        }
    }
    // The audit interface needs la_version: the same library serves as one (the loader
    // refuses it, but only after loading it, which runs the constructor).
    let agent = Agent::start().await;
    let so_s = so.display().to_string();
    let wd = dir.display().to_string();
    let toml = format!(
        "name = \"preload\"\ncommand = [{bin:?}, \"serve\"]\nuser = \"nobody\"\nworkdir = {wd:?}\n\
         env = {{ LD_PRELOAD = {so_s:?}, LD_LIBRARY_PATH = {wd:?}, LD_AUDIT = {so_s:?} }}\n\
         [isolation]\ncapabilities = []\nreadonly_root = true\n\
         [health]\nexec = [{bin:?}, \"exit\", \"0\"]\ninterval = \"500ms\"\ntimeout = \"500ms\"\n",
        bin = testbin()
    );
    agent.apply(&toml).await.expect("apply");
    agent.wait_running("preload", 1).await;
    eventually(
        "healthy by its exec probe",
        Duration::from_secs(30),
        || async { (agent.get("preload").await.ok()?.healthy == 1).then_some(()) },
    )
    .await;
    // Several probes ran by now; then the service is restarted once more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        marks(dir, "user-") >= 2,
        "the loader read the library (service and probes as nobody): {} marks",
        marks(dir, "user-")
    );
    assert_eq!(
        marks(dir, "root-"),
        0,
        "a root process (init or probe helper) ran code from the service's env"
    );
    agent.delete("preload").await.expect("delete");
}

/// Finding 10 (one item): the agent may run with its own OOM score (systemd's
/// `OOMScoreAdjust=`); an exec probe, like the service, gets the default score and the
/// service's seccomp filter, not the agent's settings. (The agent's score is raised here, not
/// lowered: lowering needs `CAP_SYS_RESOURCE`, which a test machine may not grant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probes_do_not_keep_the_agents_oom_score() {
    if skip_unless_root("exec_probes_do_not_keep_the_agents_oom_score") {
        return;
    }
    let agent = Agent::start().await;
    let pid = agent.pid().expect("agent pid");
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), "500").expect("set the agent's score");
    let bin = testbin();
    let toml = format!(
        "name = \"oom\"\ncommand = [{bin:?}, \"serve\"]\n\
         [health]\nexec = [{bin:?}, \"check\", \"oom_score_adj\", \"0\"]\ninterval = \"500ms\"\ntimeout = \"500ms\"\n"
    );
    agent.apply(&toml).await.expect("apply");
    eventually(
        "healthy: the probe's oom_score_adj is 0",
        Duration::from_secs(30),
        || async { (agent.get("oom").await.ok()?.healthy == 1).then_some(()) },
    )
    .await;
    // And the probe runs under the service's filter (mode 2: filtered).
    let toml = format!(
        "name = \"filtered\"\ncommand = [{bin:?}, \"serve\"]\n\
         [health]\nexec = [{bin:?}, \"check\", \"seccomp\", \"2\"]\ninterval = \"500ms\"\ntimeout = \"500ms\"\n"
    );
    agent.apply(&toml).await.expect("apply");
    eventually(
        "healthy: the probe is filtered",
        Duration::from_secs(30),
        || async { (agent.get("filtered").await.ok()?.healthy == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userns_root_is_not_host_root() {
    if skip_unless_root("userns_root_is_not_host_root") {
        return;
    }
    scenarios::userns_root_is_not_host_root().await;
}
