//! The Debian package, built as a user builds it (`packaging/build-deb.sh`, with cargo-deb):
//! its name, lintian (no errors), its files, man pages that render and completions that load,
//! from the package itself. Then — only where the machine may be changed: in CI (`CI=true`)
//! or with `CORRAL_TEST_DPKG=1` — installed with `dpkg -i` (the group and directories made,
//! nothing started without systemd, the installed agent running an instance under the
//! installed init), removed with `dpkg -r` (nothing left but the config file) and purged. A
//! package of that name already on the machine is never touched.
//!
//! Needs root, cargo-deb and lintian (`.ci/run` installs them); elsewhere it says what is
//! missing and skips, but in CI it fails.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use corral_e2e::{TestCgroup, skip_unless_root};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Runs `program` with `args`; panics with its output unless it succeeded.
fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {program:?}: {e}"));
    assert!(
        out.status.success(),
        "{program:?} {args:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn may_change_machine() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("CORRAL_TEST_DPKG").is_ok_and(|v| v == "1")
}

#[test]
fn the_deb_builds_lints_installs_and_removes_cleanly() {
    if skip_unless_root("the_deb_builds_lints_installs_and_removes_cleanly") {
        return;
    }
    let missing: Vec<&str> = ["cargo-deb", "lintian", "dpkg-deb", "man"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() {
        assert!(
            !may_change_machine(),
            "missing {missing:?}: .ci/run installs them"
        );
        eprintln!(
            "SKIP the_deb_builds_lints_installs_and_removes_cleanly: {missing:?} not installed (cargo install --locked cargo-deb; apt-get install lintian man-db)"
        );
        return;
    }

    let deb = build();
    let arch = stdout(&run("dpkg", &["--print-architecture"]));
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(format!("corral_{VERSION}-1_{}.deb", arch.trim()).as_str()),
        "the package's file name"
    );
    lint(&deb);

    let listing = listing(&deb);
    let tree = tempfile::tempdir().expect("tempdir");
    run("dpkg-deb", &["-x", path(&deb), path(tree.path())]);
    check_tree(tree.path(), &deb);

    if !may_change_machine() {
        eprintln!(
            "SKIP installing the package: it changes the machine (a group, directories); set CORRAL_TEST_DPKG=1 to run it here"
        );
        return;
    }
    install_use_remove(&deb, &listing);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `packaging/build-deb.sh`: the path it prints last.
fn build() -> PathBuf {
    let out = run(workspace().join("packaging/build-deb.sh"), &[]);
    let deb = PathBuf::from(stdout(&out).lines().last().unwrap_or_default().trim());
    assert!(deb.is_file(), "build-deb.sh printed {deb:?}, not a file");
    deb
}

/// lintian reports no error; its warnings are shown.
fn lint(deb: &Path) {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0", path(deb)])
        .output()
        .expect("running lintian");
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    eprintln!("lintian:\n{text}");
    assert!(out.status.success(), "lintian found errors:\n{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("E: ")),
        "lintian found errors:\n{text}"
    );
}

/// The files (not directories) of the package, as absolute paths.
fn listing(deb: &Path) -> BTreeSet<PathBuf> {
    let out = run("dpkg-deb", &["-c", path(deb)]);
    stdout(&out)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| PathBuf::from(p.trim_start_matches('.')))
        .collect()
}

const MAN_PAGES: &[&str] = &[
    "usr/share/man/man8/corrald.8.gz",
    "usr/share/man/man1/corral.1.gz",
    "usr/share/man/man1/corral-apply.1.gz",
    "usr/share/man/man1/corral-logs.1.gz",
    "usr/share/man/man1/corral-rollback.1.gz",
];

/// What the package holds, read from its extracted tree.
fn check_tree(tree: &Path, deb: &Path) {
    for (file, mode) in [
        ("usr/bin/corrald", 0o755),
        ("usr/bin/corral", 0o755),
        ("usr/libexec/corral/corral-init", 0o755),
        ("etc/corral/corrald.toml", 0o644),
        ("usr/lib/systemd/system/corrald.service", 0o644),
        ("usr/lib/sysusers.d/corral.conf", 0o644),
        ("usr/lib/tmpfiles.d/corral.conf", 0o644),
        ("usr/share/bash-completion/completions/corral", 0o644),
        ("usr/share/bash-completion/completions/corrald", 0o644),
        ("usr/share/zsh/vendor-completions/_corral", 0o644),
        ("usr/share/fish/vendor_completions.d/corral.fish", 0o644),
        ("usr/share/doc/corral/copyright", 0o644),
        ("usr/share/doc/corral/changelog.Debian.gz", 0o644),
        ("usr/share/lintian/overrides/corral", 0o644),
    ] {
        let meta = std::fs::metadata(tree.join(file))
            .unwrap_or_else(|e| panic!("{file} is not in the package: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {file}");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{file} belongs to root");
    }
    let conffiles = stdout(&run("dpkg-deb", &["-I", path(deb), "conffiles"]));
    assert_eq!(conffiles.trim(), "/etc/corral/corrald.toml", "conffiles");

    // The unit starts the packaged binary with the packaged settings.
    let unit =
        std::fs::read_to_string(tree.join("usr/lib/systemd/system/corrald.service")).expect("unit");
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/bin/corrald --config /etc/corral/corrald.toml"),
        "{unit}"
    );
    let config = std::fs::read_to_string(tree.join("etc/corral/corrald.toml")).expect("config");
    assert!(
        config
            .lines()
            .any(|l| l == "services = \"/etc/corral/services\""),
        "{config}"
    );

    let corrald = tree.join("usr/bin/corrald");
    assert_eq!(
        stdout(&run(&corrald, &["--version"])).trim(),
        format!("corrald {VERSION}")
    );
    release_layout(&corrald);
    let help = stdout(&run(tree.join("usr/bin/corral"), &["--help"]));
    assert!(
        help.contains("apply") && help.contains("rollback"),
        "{help}"
    );

    for page in MAN_PAGES {
        let out = Command::new("man")
            .args(["--warnings", "-l", path(&tree.join(page))])
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("running man");
        let text = stdout(&out);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "man -l {page}: {warnings}");
        assert!(
            warnings.trim().is_empty(),
            "man -l {page} warns: {warnings}"
        );
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS"] {
            assert!(text.contains(section), "{page} has no {section}:\n{text}");
        }
    }

    completes_in_bash(&tree.join("usr/share/bash-completion/completions/corral"));
    for (shell, check, file) in [
        ("zsh", "-n", "usr/share/zsh/vendor-completions/_corral"),
        (
            "fish",
            "--no-execute",
            "usr/share/fish/vendor_completions.d/corral.fish",
        ),
    ] {
        if have(shell) {
            run(shell, &[check, path(&tree.join(file))]);
        } else {
            assert!(
                !may_change_machine(),
                "{shell} is missing: .ci/run installs it"
            );
            eprintln!("{shell} is not installed: its completions are not checked");
        }
    }
}

/// The release link of the packaged agent (agent/build.rs): the code it runs in `.text.hot`,
/// ahead of the rest of its code, and packed relative relocations instead of a relocation
/// table the loader reads whole.
fn release_layout(corrald: &Path) {
    let sections = stdout(&run("readelf", &["-SW", path(corrald)]));
    // `[Nr] Name Type Address Off Size ...`: the size is the fourth field after the name.
    let field = |name: &str, after: usize| {
        sections.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|t| *t == name)?;
            u64::from_str_radix(f.get(i + after)?, 16).ok()
        })
    };
    let size = |name: &str| field(name, 4);
    let hot = size(".text.hot").unwrap_or_else(|| panic!("no .text.hot in corrald:\n{sections}"));
    let cold = size(".text").unwrap_or_else(|| panic!("no .text in corrald:\n{sections}"));
    assert!(
        hot > 1 << 20 && hot < cold * 2,
        ".text.hot {hot} bytes, .text {cold}: agent/corrald-hot.ld matched too little or all"
    );
    // The list names functions by v0 name without the builds' hashes, so a build in any
    // directory gathers what the build it was made from gathered; a list that no longer
    // matches the code (renamed modules, another toolchain) shows here and wants
    // packaging/hot-code.sh again.
    let list = workspace().join("agent/corrald-hot.ld");
    let text = std::fs::read_to_string(&list).unwrap_or_else(|e| panic!("{}: {e}", list.display()));
    let gathered: u64 = text
        .lines()
        .find_map(|l| l.trim_start_matches([' ', '*']).strip_prefix("gathered: "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{}: no `gathered: N bytes` line", list.display()));
    assert!(
        hot * 10 >= gathered * 8 && hot * 10 <= gathered * 12,
        ".text.hot is {hot} bytes, the list gathered {gathered} where it was made: \
         its names no longer match this build's"
    );
    assert!(
        field(".text.hot", 2) < field(".text", 2),
        ".text.hot is not ahead of .text:\n{sections}"
    );
    // build.rs packs them only where this (the build) host's glibc is 2.36 or later.
    if glibc_at_least_2_36() {
        assert!(size(".relr.dyn").is_some(), "no .relr.dyn:\n{sections}");
        let rela = size(".rela.dyn").unwrap_or(0);
        assert!(rela < 64 << 10, ".rela.dyn is {rela} bytes:\n{sections}");
    } else {
        assert!(
            size(".relr.dyn").is_none(),
            "packed relocations for an older glibc:\n{sections}"
        );
    }
}

/// Whether `getconf GNU_LIBC_VERSION` says glibc 2.36 or later, as agent/build.rs asks.
fn glibc_at_least_2_36() -> bool {
    let out = stdout(&run("getconf", &["GNU_LIBC_VERSION"]));
    let mut parts = out
        .trim()
        .strip_prefix("glibc ")
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse::<u32>().ok());
    matches!(
        (parts.next().flatten(), parts.next().flatten()),
        (Some(a), Some(b)) if (a, b) >= (2, 36)
    )
}

/// Loads a bash completion script and completes `corral ap` and `corral rollback --`.
fn completes_in_bash(script: &Path) {
    let probe = r#"
set -e
source "$1"
spec=$(complete -p corral)
fn=${spec#*-F }; fn=${fn%% *}
COMP_WORDS=(corral ap); COMP_CWORD=1; COMP_LINE="corral ap"; COMP_POINT=${#COMP_LINE}
"$fn" corral ap corral
echo "words: ${COMPREPLY[*]}"
COMP_WORDS=(corral rollback --); COMP_CWORD=2; COMP_LINE="corral rollback --"; COMP_POINT=${#COMP_LINE}
"$fn" corral -- rollback
echo "flags: ${COMPREPLY[*]}"
"#;
    let out = run("bash", &["-c", probe, "probe", path(script)]);
    let text = stdout(&out);
    assert!(text.contains("words: apply"), "{text}");
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags: "))
        .unwrap_or_default();
    assert!(
        flags.split(' ').any(|f| f == "--to") && flags.split(' ').any(|f| f == "--wait"),
        "{text}"
    );
}

/// Undoes what installing did, even when the test fails half-way.
struct Installed {
    group_existed: bool,
    agent: Option<Child>,
    cgroup: Option<TestCgroup>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.destroy();
        }
        let _ = Command::new("dpkg").args(["-P", "corral"]).output();
        if !self.group_existed {
            let _ = Command::new("groupdel").arg("corral").output();
        }
    }
}

fn package_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "corral"])
        .output()
        .ok()?;
    out.status.success().then(|| stdout(&out))
}

fn group_exists() -> bool {
    Command::new("getent")
        .args(["group", "corral"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Processes running `exe`.
fn running(exe: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

fn install_use_remove(deb: &Path, listing: &BTreeSet<PathBuf>) {
    if let Some(status) = package_status() {
        panic!(
            "a package named corral is on this machine ({status}): the test does not replace it"
        );
    }
    assert!(
        !Path::new("/etc/corral/corrald.toml").exists(),
        "/etc/corral/corrald.toml is on this machine, but no package of it: the test does not replace it"
    );
    let made_dirs: Vec<&str> = ["/run/corral", "/var/lib/corral", "/etc/corral"]
        .into_iter()
        .filter(|d| !Path::new(d).exists())
        .collect();
    let mut installed = Installed {
        group_existed: group_exists(),
        agent: None,
        cgroup: None,
    };
    run("dpkg", &["-i", path(deb)]);
    assert_eq!(package_status().as_deref(), Some("install ok installed"));

    // The binaries on the PATH, the group and directories of the snippets; nothing started.
    assert_eq!(
        stdout(&run("corrald", &["--version"])).trim(),
        format!("corrald {VERSION}")
    );
    run("corral", &["--help"]);
    assert!(group_exists(), "the postinst made the group corral");
    let gid = |name: &str| {
        let out = run("getent", &["group", name]);
        stdout(&out)
            .split(':')
            .nth(2)
            .and_then(|g| g.trim().parse::<u32>().ok())
            .expect("a gid")
    };
    for (dir, mode, group) in [
        ("/run/corral", 0o750, gid("corral")),
        ("/var/lib/corral", 0o700, 0),
        ("/etc/corral/services", 0o755, 0),
        ("/etc/corral/tls", 0o750, 0),
    ] {
        let meta = std::fs::metadata(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir(), "{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {dir}");
        assert_eq!((meta.uid(), meta.gid()), (0, group), "owner of {dir}");
    }
    if !Path::new("/run/systemd/system").exists() {
        assert_eq!(
            running(Path::new("/usr/bin/corrald")),
            Vec::<i32>::new(),
            "without systemd the package starts nothing"
        );
    }
    let man = run("man", &["-w", "corrald"]);
    assert_eq!(stdout(&man).trim(), "/usr/share/man/man8/corrald.8.gz");
    completes_in_bash(Path::new("/usr/share/bash-completion/completions/corral"));

    // The installed agent, with the installed settings, runs an instance under the installed
    // init (its own directories and cgroup, so that nothing of the machine's is touched).
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("corral.sock");
    let cgroup = TestCgroup::new(&format!("package-{}", std::process::id()));
    let log = std::fs::File::create(dir.path().join("corrald.log")).expect("log");
    let agent = Command::new("/usr/bin/corrald")
        .args(["--config", "/etc/corral/corrald.toml", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .args(["--cgroup-parent", cgroup.flag()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting /usr/bin/corrald");
    installed.agent = Some(agent);
    installed.cgroup = Some(cgroup);
    let addr = format!("unix://{}", socket.display());
    let corral = |args: &[&str]| {
        let mut all = vec!["--addr", addr.as_str()];
        all.extend_from_slice(args);
        Command::new("/usr/bin/corral")
            .args(&all)
            .output()
            .expect("running /usr/bin/corral")
    };
    let agent_log = || std::fs::read_to_string(dir.path().join("corrald.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !corral(&["ls"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "corrald did not serve:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let spec = dir.path().join("sleeper.toml");
    std::fs::write(
        &spec,
        "name = \"sleeper\"\ncommand = [\"/bin/sleep\", \"1000\"]\n",
    )
    .expect("spec");
    let applied = corral(&["apply", "-f", path(&spec), "--wait", "--timeout", "30s"]);
    assert!(applied.status.success(), "{applied:?}\n{}", agent_log());
    // Once the service runs its command, its init has long been executed (before that, the
    // instance's first process is still the agent's clone).
    let deadline = Instant::now() + Duration::from_secs(30);
    let init = loop {
        let status = corral(&["status", "sleeper", "-o", "json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&status.stdout).expect("status is JSON");
        let instance = &status["instances"][0];
        if let (Some(init), Some(service)) =
            (instance["init_pid"].as_i64(), instance["pid"].as_i64())
            && std::fs::read_link(format!("/proc/{service}/exe"))
                .is_ok_and(|exe| exe.ends_with("bin/sleep"))
        {
            break init;
        }
        assert!(
            Instant::now() < deadline,
            "the instance did not run its command: {status}\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        std::fs::read_link(format!("/proc/{init}/exe")).expect("the init's exe"),
        Path::new("/usr/libexec/corral/corral-init"),
        "the installed agent runs the installed init"
    );
    assert!(corral(&["delete", "sleeper"]).status.success());
    if let Some(mut agent) = installed.agent.take() {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(agent.id().cast_signed(), libc::SIGTERM) };
        let _ = agent.wait();
    }

    // Removed: nothing of the package is left but its config file.
    run("dpkg", &["-r", "corral"]);
    assert_eq!(
        package_status().as_deref(),
        Some("deinstall ok config-files")
    );
    let left: Vec<&PathBuf> = listing.iter().filter(|p| p.exists()).collect();
    assert_eq!(
        left,
        [Path::new("/etc/corral/corrald.toml")],
        "after dpkg -r only the config file is left"
    );

    // Purged: the config file and the directories the postinst made (empty) go too.
    run("dpkg", &["-P", "corral"]);
    assert_eq!(package_status(), None);
    let gone = [
        "/etc/corral/corrald.toml",
        "/etc/systemd/system/multi-user.target.wants/corrald.service",
    ];
    for gone in gone.iter().chain(&made_dirs) {
        assert!(!Path::new(gone).exists(), "{gone} is left after dpkg -P");
    }
}
