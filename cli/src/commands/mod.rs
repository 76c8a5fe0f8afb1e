//! The commands. Each takes its parsed arguments, talks to the agent through `client`, and
//! writes its result to `out` as a table or JSON (`-o`). Failures that end a command are
//! returned; `apply` of several files reports each file's failure on `err` as it happens and
//! carries on, then says through [`Outcome`] whether any failed.
//!
//! Commands never print to the process's stdout or stderr directly, so they run in-process in
//! tests against any address. Those that run until interrupted (`logs -f`, `events -f`, `top`)
//! end, successfully, when the [`Console`]'s interrupt resolves: on Ctrl-C in the real process;
//! a `--wait` it interrupts ends with exit code 1 (what was waited for did not happen).

mod apply;
mod artifacts;
mod fleet;
mod jobs;
mod rollout;
mod service;
mod stream;
mod top;

use std::fmt;
use std::future::{self, Future};
use std::io::{IsTerminal, Write};
use std::pin::Pin;

use crate::args::{Cli, Command};

/// What a command knows of where it runs, beyond its output streams.
pub struct Console {
    /// The output is a terminal: `top` redraws its frames in place.
    pub terminal: bool,
    /// The error output is a terminal: `--wait` redraws its progress line in place.
    pub progress_terminal: bool,
    /// Resolves when the user asks a command that follows or refreshes to stop (Ctrl-C).
    pub interrupt: Interrupt,
}

/// A future that resolves on interruption; only polled by the commands that run until one.
pub type Interrupt = Pin<Box<dyn Future<Output = ()>>>;

impl Console {
    /// The process's own: stdout's kind, and SIGINT. The SIGINT handler is only installed when
    /// a command first waits for the interrupt, so the other commands keep the default action.
    pub fn process() -> Self {
        Console {
            terminal: std::io::stdout().is_terminal(),
            progress_terminal: std::io::stderr().is_terminal(),
            interrupt: Box::pin(async {
                if tokio::signal::ctrl_c().await.is_err() {
                    // No handler could be installed: Ctrl-C keeps its default action.
                    future::pending::<()>().await;
                }
            }),
        }
    }

    /// Not a terminal, and never interrupted.
    #[cfg(test)]
    pub fn detached() -> Self {
        Console {
            terminal: false,
            progress_terminal: false,
            interrupt: Box::pin(future::pending()),
        }
    }
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("terminal", &self.terminal)
            .field("progress_terminal", &self.progress_terminal)
            .finish_non_exhaustive()
    }
}

/// How a command that did not fail outright ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for was done.
    Success,
    /// Some of it failed; the failures are already reported.
    Failed,
    /// Exit with this code: a job's run, as `corral run --wait` returns it.
    Exit(u8),
}

/// Runs one command line.
pub async fn run(
    cli: Cli,
    out: &mut dyn Write,
    err: &mut dyn Write,
    console: Console,
) -> anyhow::Result<Outcome> {
    let Cli {
        conn,
        output,
        command,
    } = cli;
    match command {
        Command::Apply(args) => apply::apply(&conn, output, &args, out, err, console).await,
        Command::Diff(args) => apply::diff(&conn, output, &args, out).await,
        Command::Ls(args) => service::ls(&conn, output, &args, out, err).await,
        Command::Status(args) => service::status(&conn, output, &args.name, out).await,
        Command::Scale(args) => service::scale(&conn, output, &args, out).await,
        Command::Restart(args) => rollout::restart(&conn, output, &args, out, err, console).await,
        Command::Rollback(args) => rollout::rollback(&conn, output, &args, out, err, console).await,
        Command::Rollout(args) => rollout::show(&conn, output, &args.id, out).await,
        Command::Delete(args) => service::delete(&conn, output, &args, out).await,
        Command::Node => service::node(&conn, output, out).await,
        Command::Signal(args) => {
            service::signal(&conn, output, &args.instance, &args.signal, out).await
        }
        Command::Logs(args) if args.run.is_some() => {
            jobs::run_logs(&conn, output, &args, out).await
        }
        Command::Logs(args) => stream::logs(&conn, output, &args, out, console.interrupt).await,
        Command::Events(args) => {
            stream::events(&conn, output, &args, out, err, console.interrupt).await
        }
        Command::Top(args) => top::top(&conn, output, &args, out, console).await,
        Command::Fleet(args) => fleet::run(&args, output, out, err).await,
        Command::Run(args) => jobs::run(&conn, output, &args, out, err).await,
        Command::Runs(args) => jobs::runs(&conn, output, &args.name, out).await,
        Command::Cancel(args) => jobs::cancel(&conn, output, &args.run, out).await,
        Command::Artifacts(args) => artifacts::run(&conn, output, args.action, out).await,
    }
}
