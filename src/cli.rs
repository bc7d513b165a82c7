//! The command line: every subcommand, its flags and its help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// chatlog: a message-log server for messengers.
#[derive(Debug, Parser)]
#[command(name = "chatlog", version, about, long_about = None, after_help = crate::client_cmd::AFTER_HELP)]
pub struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server node: the embedded single-node default, or one node of a cluster.
    Serve(crate::serve::ServeArgs),
    /// Work with the storage engine directly (no server needed).
    #[command(subcommand)]
    Storage(crate::storage_cmd::StorageCommand),
    /// Operator commands against a node's HTTP port (`--server HTTP_ADDR`).
    #[command(subcommand)]
    Admin(crate::admin_cmd::AdminCommand),
    /// Client commands: talk to a running server (`--server`, `--token`, `--json`).
    #[command(flatten)]
    Client(crate::client_cmd::ClientCommand),
}

/// Errors reaching `main`: printed, exit status 1.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Storage(cmd) => crate::storage_cmd::run(cmd),
        Command::Serve(args) => crate::serve::run(args),
        Command::Admin(cmd) => crate::admin_cmd::run(cmd),
        Command::Client(cmd) => crate::client_cmd::run(cmd),
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Default data directory of every command that keeps data.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("chatlog-data")
}
