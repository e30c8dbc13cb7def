//! ticket-publisher: HTTP and gRPC ticket ingress onto `events.tickets.created`, and the transactional dispatch stage that renders each ticket into an `InferenceTask`.

#![forbid(unsafe_code)]

pub mod config;

use triage_runtime::{metrics::MetricsRegistry, service, shutdown::Shutdown};

pub use config::Config;

pub const SERVICE: &str = "ticket-publisher";

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let metrics = MetricsRegistry::new(SERVICE).freeze();
    service::serve_admin_until_shutdown(SERVICE, &config.admin, &config.kafka, metrics, shutdown)
        .await
}
