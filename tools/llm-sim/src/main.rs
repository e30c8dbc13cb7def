use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use llm_sim::cli::Cli;
use triage_runtime::config::{LogFormat, TelemetryConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config();
    if let Err(error) = config.validate() {
        eprintln!("llm-sim: {error}");
        return ExitCode::from(triage_runtime::service::EXIT_CONFIG);
    }
    let telemetry = TelemetryConfig {
        log_format: if cli.log_format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Pretty
        },
        log_level: cli.log_level.clone(),
        ..TelemetryConfig::default()
    };
    let _telemetry = match triage_runtime::telemetry::init("llm-sim", &telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("llm-sim: cannot start telemetry: {error}");
            return ExitCode::from(triage_runtime::service::EXIT_CONFIG);
        }
    };
    triage_runtime::service::block_on("llm-sim", async move {
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
        llm_sim::serve(listener, config, triage_runtime::shutdown::signal()).await?;
        Ok(())
    })
}
