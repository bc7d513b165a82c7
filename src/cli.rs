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
    /// Load generator: drive a server (or an embedded one) and report throughput and
    /// latency (send, sync, mixed, fanout, media).
    Bench(crate::bench_cmd::BenchArgs),
    /// Operator commands against a node's HTTP port (`--server HTTP_ADDR`).
    #[command(subcommand)]
    Admin(crate::admin_cmd::AdminCommand),
    /// Bots: create them, list them, replace their tokens (the bot API is on the HTTP
    /// port: docs/bots.md).
    #[command(subcommand)]
    Bot(crate::bot::cli::BotCommand),
    /// Builds a fresh node's data directory from a backup (`chatlog admin backup`).
    ///
    /// Offline. Checks every file of the backup first (manifest, sizes, SHA-256, every
    /// record's CRC) and refuses a damaged or partial one naming the file.
    Restore(crate::backup::restore::RestoreArgs),
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
        Command::Bench(args) => crate::bench_cmd::run(args),
        Command::Bot(cmd) => crate::bot::cli::run(cmd),
        Command::Restore(args) => crate::backup::restore::run(args),
    }
}

impl Cli {
    /// The log filter when `RUST_LOG` is unset: `info` for chatlog's own lines and
    /// `warn` for openraft's (its per-group start-up and shutdown lines run to thousands
    /// with many groups); for `bench` only errors, so an embedded server's chatter stays
    /// out of the report.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Bench(_) => "error",
            _ => "info,openraft=warn",
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing(json: bool) {
    init_tracing_with(json, "info");
}

/// Logs to stderr; `RUST_LOG` filters (default `default_filter`).
pub fn init_tracing_with(json: bool, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
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
