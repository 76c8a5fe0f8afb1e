//! The Python client (`clients/python`) and its pytest suite against a real agent: a stock
//! grpc-core client (grpcio, default options) on the Unix socket and over mTLS, as an outside
//! scheduler would use the API.
//!
//! The packages come from a virtualenv made by `clients/python/dev-env.sh` (exact versions
//! from `requirements-test.txt`) at `$CORRAL_PYTHON_VENV`, default `target/python-client-venv`;
//! `.ci/run` makes it, and this test makes it too when it is missing. When it cannot be made
//! the test fails and says why: it never skips but for not being root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_e2e::pki::Ca;
use corral_e2e::{Agent, TestCgroup, bin, bin_dir, free_port, skip_unless_root, testbin};

/// The whole suite; a stuck client is killed after this.
const SUITE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// What the suite imports: the packages `requirements-test.txt` lists.
const IMPORTS: &str = "import grpc, grpc_tools, grpc_health.v1, grpc_status, grpc_reflection.v1alpha, pytest, setuptools";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn venv() -> PathBuf {
    std::env::var_os("CORRAL_PYTHON_VENV").map_or_else(
        || {
            bin_dir()
                .parent()
                .expect("target directory")
                .join("python-client-venv")
        },
        PathBuf::from,
    )
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The virtualenv's python, with every package the suite needs importable.
fn python() -> PathBuf {
    let venv = venv();
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", IMPORTS])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let script = repo().join("clients/python/dev-env.sh");
    // dev-env.sh leaves an up-to-date venv alone; it reinstalls one made from another list.
    let made = Command::new("bash")
        .arg(&script)
        .arg(&venv)
        .stdin(Stdio::null())
        .output();
    match made {
        Ok(out) if out.status.success() && ready() => python,
        Ok(out) => panic!(
            "the Python client's test environment is missing: {} {} did not give a virtualenv with \
             grpcio, grpcio-tools, grpcio-health-checking, grpcio-status, grpcio-reflection and \
             pytest ({}; it needs python3 with venv (Debian: apt-get install python3-venv) and \
             PyPI; .ci/run installs both):\n{}{}",
            script.display(),
            venv.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run {}: {e}", script.display()),
    }
}

/// Install the client package from the source tree into `site` the way a user would (pip
/// builds it, generating the stubs from the proto), from a copy so that the source tree
/// stays clean.
fn install_client(python: &Path, tmp: &Path) -> PathBuf {
    let src = repo().join("clients/python");
    let copy = tmp.join("corral-client-src");
    for f in ["pyproject.toml", "setup.py", "README.md"] {
        std::fs::create_dir_all(&copy).expect("mkdir");
        std::fs::copy(src.join(f), copy.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    copy_tree(&src.join("src"), &copy.join("src"));
    let site = tmp.join("site");
    run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&site)
            .arg(&copy)
            .env("CORRAL_PROTO_DIR", repo().join("proto/proto")),
        "pip install clients/python",
    );
    site
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        let (src, dst) = (entry.path(), to.join(&name));
        if name == "__pycache__" || name.to_string_lossy().ends_with(".egg-info") {
            continue;
        }
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&src, &dst);
        } else if !name.to_string_lossy().starts_with("agent_pb2") {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// A cgroup parent for an agent the suite starts itself; everything in it is killed and
/// removed when the test ends, however it ends.
struct Spare(TestCgroup);

impl Drop for Spare {
    fn drop(&mut self) {
        self.0.destroy();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_suite_against_a_real_agent() {
    if skip_unless_root("python_client_suite_against_a_real_agent") {
        return;
    }
    let python = python();
    let tmp = tempfile::Builder::new()
        .prefix("corral-pyclient-")
        .tempdir()
        .expect("tempdir");
    let site = install_client(&python, tmp.path());

    let ca = Ca::new(tmp.path(), "corral-py");
    let server = ca.server("server");
    let cert = |name: &str, cn: &str, unit: &str| {
        let pem = ca.client(name, cn, Some(unit));
        serde_json::json!({ "cert": path(&pem.cert), "key": path(&pem.key) })
    };
    let (admin, read, nobody) = (
        cert("admin", "scheduler", "admin"),
        cert("read", "dashboard", "read"),
        cert("nobody", "stranger", "sales"),
    );
    let port = free_port();
    let agent = Agent::start_tls("info,corral_agent=debug", port, &server, &ca.cert).await;
    let spare = Spare(TestCgroup::new(&format!("pyclient-{}", std::process::id())));
    let env = serde_json::json!({
        "socket": path(&agent.socket),
        "testbin": testbin(),
        "corrald": path(&bin("corrald")),
        "spare_cgroup": spare.0.flag(),
        "tls": {
            "port": port,
            "ca": path(&ca.cert),
            "admin": admin,
            "read": read,
            "nobody": nobody,
        },
    });
    let env_file = tmp.path().join("env.json");
    std::fs::write(&env_file, env.to_string()).expect("write env.json");

    let mut child = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-s",
            "--tb=short",
            "-rfEs",
            "-p",
            "no:cacheprovider",
        ])
        .arg(repo().join("clients/python/tests"))
        // E.g. `-k contract` to run part of the suite while working on it.
        .args(
            std::env::var("CORRAL_PYTEST_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("CORRAL_TEST_ENV", &env_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pytest");
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        }),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait pytest") {
            break Some(status);
        }
        if start.elapsed() > SUITE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = format!(
        "{}{}",
        readers.0.join().unwrap_or_default(),
        readers.1.join().unwrap_or_default()
    );
    println!("{text}");
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("the Python client's suite failed ({s}):\n{text}"),
        None => {
            panic!("the Python client's suite did not finish within {SUITE_TIMEOUT:?}:\n{text}")
        }
    }
    drop(agent);
}
