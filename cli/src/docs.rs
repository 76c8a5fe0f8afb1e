//! The man pages and shell completions of `corral`, generated from its command line when a
//! package is built: `corral --generate-docs DIR` writes `corral.1`, one `corral-<command>.1`
//! per command, and the bash, zsh and fish completion scripts. The flag is read before clap
//! parses anything, so that it shows in none of the pages and scripts it writes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::args::Cli;

/// The directory of `corral --generate-docs DIR`, when that is the whole command line.
pub fn requested() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(dir), None) if flag == "--generate-docs" => Some(dir.into()),
        _ => None,
    }
}

/// Writes every page and script into `dir`, which must exist.
pub fn generate(dir: &Path) -> anyhow::Result<()> {
    let mut cmd = Cli::command()
        .about("drive corrald, the corral node agent, over its API")
        .long_about(
            "corral drives corrald(8), the node agent, over its corral.v1 API: locally through \
             its Unix socket (/run/corral/corral.sock; root and the members of group corral may \
             use it), or remotely over TLS with a client certificate. Exit codes: 0 success, \
             1 failure (the agent's message is printed as is), 2 usage error.",
        );
    clap_mangen::generate_to(cmd.clone(), dir)
        .with_context(|| format!("writing the man pages into {}", dir.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "corral", dir)
            .with_context(|| format!("writing the {shell} completions into {}", dir.display()))?;
    }
    Ok(())
}
