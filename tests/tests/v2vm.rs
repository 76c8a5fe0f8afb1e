//! The kernel scenarios again, inside a throwaway QEMU VM booted with a pure cgroup v2
//! hierarchy (as on a systemd host), using `tests/v2vm/run-in-v2vm.sh`. The VM needs
//! qemu-system-x86 and busybox-static (installed by the script when missing, as root) and
//! Debian's kernel package (downloaded once). Where that cannot work, the test prints why
//! and skips; `CORRAL_SKIP_V2VM=1` skips it on purpose.

use std::path::PathBuf;
use std::process::Command;

use corral_e2e::{bin, bin_dir, skip_unless_root};

#[test]
fn kernel_scenarios_on_cgroup_v2() {
    if skip_unless_root("kernel_scenarios_on_cgroup_v2") {
        return;
    }
    if std::env::var_os("CORRAL_SKIP_V2VM").is_some() {
        eprintln!("SKIP kernel_scenarios_on_cgroup_v2: CORRAL_SKIP_V2VM is set");
        return;
    }
    if corral_e2e::cgroup::version() == corral_e2e::cgroup::Version::V2
        && std::env::var_os("V2VM").is_some()
    {
        eprintln!("SKIP kernel_scenarios_on_cgroup_v2: already inside the VM");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("v2vm/run-in-v2vm.sh");
    let runner = bin("corral-e2e");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["-t", "1200", "-m", "2G", "-c", "2"])
        .arg("-e")
        .arg(format!("CORRAL_BIN_DIR={}", bin_dir().display()))
        .arg("-e")
        .arg("RUST_BACKTRACE=1");
    for b in ["corrald", "corral-init", "corral", "corral-testbin"] {
        cmd.arg("-f").arg(bin(b));
    }
    cmd.arg(&runner)
        .arg("kernel")
        .env("V2VM_CGROUP", "/corral-e2e.slice/runner")
        // [image] instances run on an overlay.
        .env("V2VM_MODULES", "overlay");
    let out = cmd.output().expect("run the v2 VM script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    match out.status.code() {
        Some(0) => assert!(
            stdout.contains(" passed, 0 failed"),
            "runner output lacks its summary"
        ),
        Some(125)
            if stderr.contains("could not install")
                || stderr.contains("cannot resolve")
                || stderr.contains("download") =>
        {
            eprintln!(
                "SKIP kernel_scenarios_on_cgroup_v2: the VM cannot be set up here (see above)"
            );
        }
        other => panic!("v2 VM scenarios failed ({other:?})"),
    }
}
