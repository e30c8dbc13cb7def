//! result-writer: writes `tasks.llm.results` into PostgreSQL and serves the triage read API.

#![forbid(unsafe_code)]

pub mod config;

use triage_runtime::{metrics::MetricsRegistry, service, shutdown::Shutdown};

pub use config::Config;

pub const SERVICE: &str = "result-writer";

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = MetricsRegistry::new(SERVICE).freeze();
    service::serve_admin_until_shutdown(SERVICE, &config.admin, &config.kafka, metrics, shutdown)
        .await
}
