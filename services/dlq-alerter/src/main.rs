use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Alerts on dead letters (Slack, JSON webhook) and replays them.
#[derive(Parser)]
#[command(name = "dlq-alerter", version)]
struct Cli {
    /// TOML configuration file (also `TRIAGE_CONFIG`); `TRIAGE_*` variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// List dead letters (dry run) and, with --execute, re-publish their tasks.
    Replay(dlq_alerter::replay::ReplayArgs),
}

fn main() -> ExitCode {
    // `--config` is read again by the runtime's loader, which scans the arguments for it.
    let cli = Cli::parse();
    match cli.command {
        None => triage_runtime::service::main(dlq_alerter::SERVICE, dlq_alerter::run),
        Some(Command::Replay(args)) => dlq_alerter::replay::main(args),
    }
}
