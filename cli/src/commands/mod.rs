//! The commands. Each takes its parsed arguments, talks to the agent through `client`, and
//! writes its result to `out` as a table or JSON (`-o`). Failures that end a command are
//! returned; `apply` of several files reports each file's failure on `err` as it happens and
//! carries on, then says through [`Outcome`] whether any failed.
//!
//! Commands never print to the process's stdout or stderr directly, so they run in-process in
//! tests against any address.

mod apply;
mod service;

use std::io::Write;

use crate::args::{Cli, Command};

/// How a command that did not fail outright ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for was done.
    Success,
    /// Some of it failed; the failures are already reported.
    Failed,
}

/// Runs one command line.
pub async fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<Outcome> {
    let Cli {
        conn,
        output,
        command,
    } = cli;
    match command {
        Command::Apply(args) => apply::apply(&conn, output, &args, out, err).await,
        Command::Diff(args) => apply::diff(&conn, output, &args, out).await,
        Command::Ls => service::ls(&conn, output, out, err).await,
        Command::Status(args) => service::status(&conn, output, &args.name, out).await,
        Command::Scale(args) => service::scale(&conn, output, &args, out).await,
        Command::Delete(args) => service::delete(&conn, output, &args.name, out).await,
        Command::Node => service::node(&conn, output, out).await,
        Command::Signal(args) => {
            service::signal(&conn, output, &args.instance, &args.signal, out).await
        }
    }
}
