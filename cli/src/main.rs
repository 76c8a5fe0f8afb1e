//! `corral`, the command-line client of corrald: parses the command line, runs the command
//! against the agent, and turns the result into the process's exit code — 0 on success, 1 on
//! any failure (with `error: ...` on stderr), 2 for usage errors (reported by clap).
//!
//! Talks to the agent only through the `corral.v1` API (`corral-proto`), never through the
//! agent's crate.

mod args;
mod client;
mod commands;
mod docs;
mod render;
mod views;

#[cfg(test)]
mod mock_agent_tests;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

use crate::args::Cli;
use crate::commands::{Console, Outcome};

fn main() -> ExitCode {
    if let Some(dir) = docs::requested() {
        return match docs::generate(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let mut err = io::stderr().lock();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = writeln!(err, "error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = io::stdout().lock();
    let result = runtime
        .block_on(commands::run(cli, &mut out, &mut err, Console::process()))
        .and_then(|outcome| {
            out.flush()?;
            Ok(outcome)
        });
    ExitCode::from(finish(result, &mut err))
}

/// The exit code for a command's result, reporting a failure on `err`.
fn finish(result: anyhow::Result<Outcome>, err: &mut dyn Write) -> u8 {
    match result {
        Ok(Outcome::Success) => 0,
        Ok(Outcome::Failed) => 1,
        Ok(Outcome::Exit(code)) => code,
        // The reader of our output went away (`corral ls | head -1`): nothing left to tell.
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            1
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
