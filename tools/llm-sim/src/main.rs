//! The `llm-sim` binary: flags, logs, serve until SIGTERM/SIGINT.
//!
//! It stands in for an external provider, so it links nothing of the pipeline (no librdkafka):
//! logging and signal handling are the few lines below rather than `triage-runtime`'s.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use llm_sim::cli::Cli;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration the simulator cannot start with (as sysexits' EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config();
    if let Err(error) = config.validate() {
        eprintln!("llm-sim: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.json_logs {
        logs.json().flatten_event(true).init();
    } else {
        logs.compact().init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("llm-sim: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "stopped on error");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config: llm_sim::SimConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("failed to listen on {}", cli.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        model = %config.model,
        rpm = config.rate_limits.rpm,
        tpm = config.rate_limits.tpm,
        latency = ?config.latency,
        faults = config.faults.len(),
        version = llm_sim::SIMULATOR_VERSION,
        "llm-sim listening: this is a simulator, not a language model; answers come from keyword rules"
    );
    llm_sim::serve(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes, `kill`) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}
