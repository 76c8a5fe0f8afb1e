//! Runs end-to-end scenarios by name outside of `cargo test`: inside the cgroup v2 VM, where
//! only this binary, corrald, corral and corral-testbin are present.
//!
//! Usage: corral-e2e [kernel | SCENARIO...]   (default: kernel, the cgroup/namespace set)

use std::process::ExitCode;

use corral_e2e::scenarios;

fn main() -> ExitCode {
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() || names == ["kernel"] {
        names = scenarios::KERNEL.iter().map(|s| s.to_string()).collect();
    }
    if !corral_e2e::is_root() {
        eprintln!("corral-e2e: needs root");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corral-e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = 0;
    for name in &names {
        let n = name.clone();
        let started = std::time::Instant::now();
        let result =
            rt.block_on(async move { tokio::spawn(async move { scenarios::run(&n).await }).await });
        match result {
            Ok(true) => println!("PASS {name} ({:.1}s)", started.elapsed().as_secs_f64()),
            Ok(false) => {
                println!("FAIL {name}: no such scenario");
                failed += 1;
            }
            Err(e) => {
                println!("FAIL {name}: {e}");
                failed += 1;
            }
        }
    }
    println!("{} passed, {failed} failed", names.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
