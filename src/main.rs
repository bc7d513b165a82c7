//! The `chatlog` binary: parses the command line and hands off to the library.

use clap::Parser;

// jemalloc, not glibc malloc: the root Cargo.toml (`tikv-jemallocator`) says why.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = chatlog::cli::Cli::parse();
    chatlog::cli::init_tracing_with(cli.log_json, cli.default_log_filter());
    match chatlog::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
