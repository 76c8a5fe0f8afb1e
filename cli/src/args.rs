//! The command line: every flag, argument and subcommand of `corral`, parsed by clap.
//!
//! Pure declarations; nothing here talks to the agent or touches the file system. A value clap
//! cannot parse (an unknown flag, a missing NAME, `-o yaml`, a replica count that is not a
//! number) is a usage error and ends the process with exit code 2.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where `corral` looks for the agent when neither `--addr` nor `CORRAL_ADDR` is given.
pub const DEFAULT_ADDR: &str = "unix:///run/corral/corral.sock";

/// corral: drive corrald, the node agent, over its API — locally through its Unix socket, or
/// remotely over TLS.
#[derive(Debug, Parser)]
#[command(name = "corral", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnectArgs,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the agent.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The agent's address: unix:///PATH (the local socket) or https://HOST:PORT.
    #[arg(long, env = "CORRAL_ADDR", default_value = DEFAULT_ADDR, global = true)]
    pub addr: String,

    /// CA certificate (PEM) that signed the agent's certificate; required for https://.
    #[arg(long, env = "CORRAL_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for https://; its subject OU gives the role (read or admin).
    #[arg(
        long,
        env = "CORRAL_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the client certificate.
    #[arg(
        long,
        env = "CORRAL_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert",
        global = true
    )]
    pub tls_key: Option<PathBuf>,
}

/// Output formats of `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns and text for people.
    Table,
    /// One JSON document per command, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update services from spec files.
    ///
    /// Each file's TOML text is sent to the agent as it is; the agent validates it. With a
    /// directory, every *.toml file directly inside it is applied in name order; a failure is
    /// reported and the others are still applied. With `-o json` the result is an array with one
    /// entry per file.
    Apply(ApplyArgs),

    /// Show what applying a spec file would change, without applying it.
    Diff(DiffArgs),

    /// List services with their instance counts.
    #[command(visible_alias = "list")]
    Ls,

    /// Show a service's limits and the state of each of its instances.
    Status(NameArgs),

    /// Change a service's instance count.
    Scale(ScaleArgs),

    /// Stop every instance of a service and remove it.
    Delete(NameArgs),

    /// Show the host, what it can enforce, and the agent's version.
    Node,

    /// Send a signal to one instance's service process, e.g. `corral signal web-0 SIGHUP`.
    Signal(SignalArgs),
}

#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The instance: `web-0`, or `web/0`.
    pub instance: String,

    /// A signal name (`SIGHUP`, `HUP`) or number.
    pub signal: String,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A spec file, a directory of *.toml spec files, or `-` for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE|DIR")]
    pub file: PathBuf,

    /// Validate and report what would change, without applying anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// A spec file, or `-` for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The service's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The service's name.
    pub name: String,

    /// The number of instances to run.
    #[arg(value_name = "N")]
    pub replicas: u32,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("corral").chain(args.iter().copied()))
    }

    fn usage_error(args: &[&str]) -> ErrorKind {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?} must be a usage error");
        err.kind()
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn apply_takes_a_file_and_dry_run() {
        let cli = parse(&["apply", "-f", "web.toml", "--dry-run"]).unwrap();
        match cli.command {
            Command::Apply(a) => {
                assert_eq!(a.file, PathBuf::from("web.toml"));
                assert!(a.dry_run);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse(&["apply", "--file", "specs/"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Apply(ApplyArgs { dry_run: false, .. })
        ));
    }

    #[test]
    fn apply_without_a_file_is_a_usage_error() {
        assert_eq!(usage_error(&["apply"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn diff_takes_a_file() {
        let cli = parse(&["diff", "-f", "web.toml"]).unwrap();
        assert!(
            matches!(cli.command, Command::Diff(DiffArgs { file }) if file == Path::new("web.toml"))
        );
        assert_eq!(usage_error(&["diff"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn read_commands_take_an_output_format_before_or_after_the_command() {
        let cli = parse(&["ls"]).unwrap();
        assert!(matches!(cli.command, Command::Ls));
        assert_eq!(cli.output, Format::Table);

        let cli = parse(&["ls", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        let cli = parse(&["-o", "json", "node"]).unwrap();
        assert!(matches!(cli.command, Command::Node));
        assert_eq!(cli.output, Format::Json);
        let cli = parse(&["status", "web", "--output", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        assert!(matches!(cli.command, Command::Status(NameArgs { name }) if name == "web"));
        assert!(matches!(parse(&["list"]).unwrap().command, Command::Ls));
    }

    #[test]
    fn an_unknown_output_format_is_a_usage_error() {
        assert_eq!(usage_error(&["ls", "-o", "yaml"]), ErrorKind::InvalidValue);
        assert_eq!(
            usage_error(&["-o", "yaml", "node"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn commands_on_a_service_need_its_name() {
        for cmd in ["status", "delete", "scale"] {
            assert_eq!(
                usage_error(&[cmd]),
                ErrorKind::MissingRequiredArgument,
                "{cmd}"
            );
        }
        let cli = parse(&["delete", "web"]).unwrap();
        assert!(matches!(cli.command, Command::Delete(NameArgs { name }) if name == "web"));
    }

    #[test]
    fn scale_takes_a_name_and_a_count() {
        let cli = parse(&["scale", "web", "3"]).unwrap();
        match cli.command {
            Command::Scale(s) => {
                assert_eq!(s.name, "web");
                assert_eq!(s.replicas, 3);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert_eq!(
            usage_error(&["scale", "web"]),
            ErrorKind::MissingRequiredArgument
        );
        for bad in ["three", "1.5", "99999999999"] {
            assert_eq!(
                usage_error(&["scale", "web", bad]),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        // A negative count reads as an unknown flag: a usage error all the same.
        usage_error(&["scale", "web", "-1"]);
    }

    #[test]
    fn unknown_commands_and_flags_are_usage_errors() {
        assert_eq!(usage_error(&["frobnicate"]), ErrorKind::InvalidSubcommand);
        assert_eq!(usage_error(&["ls", "--frob"]), ErrorKind::UnknownArgument);
        assert_eq!(usage_error(&["ls", "extra"]), ErrorKind::UnknownArgument);
        let err = parse(&[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn connection_flags_are_global() {
        let cli = parse(&[
            "ls",
            "--addr",
            "https://node1:7443",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "me.pem",
            "--tls-key",
            "me.key",
        ])
        .unwrap();
        assert_eq!(cli.conn.addr, "https://node1:7443");
        assert_eq!(cli.conn.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(cli.conn.tls_cert, Some(PathBuf::from("me.pem")));
        assert_eq!(cli.conn.tls_key, Some(PathBuf::from("me.key")));
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        assert_eq!(
            usage_error(&["ls", "--tls-cert", "me.pem"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["ls", "--tls-key", "me.key"]),
            ErrorKind::MissingRequiredArgument
        );
    }
}
