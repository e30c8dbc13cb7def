//! dlq-alerter: turns `dlq.llm.failed` into Slack alerts people can act on, and replays dead letters.

#![forbid(unsafe_code)]

pub mod config;

use triage_runtime::{metrics::MetricsRegistry, service, shutdown::Shutdown};

pub use config::Config;

pub const SERVICE: &str = "dlq-alerter";

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = MetricsRegistry::new(SERVICE).freeze();
    service::serve_admin_until_shutdown(SERVICE, &config.admin, &config.kafka, metrics, shutdown)
        .await
}
