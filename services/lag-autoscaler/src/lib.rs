//! lag-autoscaler: consumer lag of every pipeline group as Prometheus metrics and as the Kubernetes External Metrics API.
//!
//! # Layout
//! - [`config`]: the watched groups, the listeners, direct mode's policy.
//! - [`reader`]: committed offsets, watermarks, members and record timestamps from the brokers
//!   (blocking librdkafka calls, run on `spawn_blocking`).
//! - [`status`]: Burrow-style ok / lagging / stalled / unknown from a window of samples.
//! - [`monitor`]: one poll: read, judge, record metrics, build the [`snapshot::LagSnapshot`].
//! - [`metrics`]: the Prometheus series.
//! - [`lag_api`]: `/api/v1/lag` on the admin port (KEDA's metrics-api scaler).
//! - [`external_metrics`] and [`selector`]: `external.metrics.k8s.io/v1beta1` over TLS;
//!   [`aggregator_auth`]: only the aggregation layer, for users RBAC allows.
//! - [`scaler`]: direct mode's decision, a pure state machine; [`direct`] applies it through
//!   [`kubernetes`].

// Outside input (records, headers, provider answers, database rows, configuration) must never
// panic a service, so the ways to panic are denied in service code. The few that remain guard
// invariants of the service's own data (a constant pattern, a serialiser of our own types) and
// each says so where it is allowed.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![forbid(unsafe_code)]

pub mod aggregator_auth;
pub mod config;
pub mod direct;
pub mod external_metrics;
pub mod kubernetes;
pub mod lag_api;
pub mod metrics;
pub mod monitor;
pub mod reader;
pub mod scaler;
pub mod selector;
pub mod snapshot;
pub mod status;

use std::{sync::Arc, time::Instant};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, time::MissedTickBehavior};
use triage_runtime::{admin_http, metrics::MetricsRegistry, service, shutdown::Shutdown};

pub use config::Config;

use crate::{
    direct::DirectMode,
    metrics::Metrics,
    monitor::Monitor,
    reader::OffsetReader,
    snapshot::{GroupLag, LagSnapshot},
};

pub const SERVICE: &str = "lag-autoscaler";

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let targets = config.targets();
    let mut registry = MetricsRegistry::new(SERVICE);
    let metrics = Metrics::register(registry.registry_mut());
    let initial = LagSnapshot {
        taken_at_ms: 0,
        offsets_read_at: None,
        groups: targets.iter().map(GroupLag::pending).collect(),
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(initial));

    let reader = OffsetReader::new(&config.kafka, &config.lag)?;
    let mut direct = if config.direct.enabled {
        Some(DirectMode::start(&config, metrics.clone()).await?)
    } else {
        None
    };
    let (admin, readiness) =
        start_admin(&config, registry, snapshot_rx.clone(), shutdown.clone()).await?;
    let external = if config.external_metrics.enabled {
        let auth = aggregator_auth::RequestHeaderAuth::from_config(
            &config.external_metrics.authentication,
        )
        .await?;
        let router = external_metrics::router(snapshot_rx.clone());
        Some(
            external_metrics::serve_tls(&config.external_metrics, router, auth, shutdown.clone())
                .await?,
        )
    } else {
        None
    };
    readiness.mark_ready();
    tracing::info!(
        service = SERVICE,
        groups = targets.len(),
        interval = ?config.lag.interval,
        direct = config.direct.enabled,
        "started"
    );

    let mut monitor = Monitor::new(reader, targets, &config.lag, metrics);
    let mut ticks = tokio::time::interval(config.lag.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            _ = ticks.tick() => {}
        }
        let Some(snapshot) = monitor.poll().await else {
            continue;
        };
        let snapshot = Arc::new(snapshot);
        snapshot_tx.send_replace(Arc::clone(&snapshot));
        if let Some(direct) = &mut direct {
            let observed_at = snapshot.offsets_read_at.unwrap_or_else(Instant::now);
            direct.tick(&snapshot, observed_at).await;
        }
    }

    admin.await??;
    if let Some(external) = external {
        external.task.await??;
    }
    Ok(())
}

/// The shared admin endpoints (`/healthz`, `/readyz`, `/metrics`, Kafka's health as a
/// dependency) plus `/api/v1/lag`, on `admin.listen`.
async fn start_admin(
    config: &Config,
    registry: MetricsRegistry,
    snapshot: watch::Receiver<Arc<LagSnapshot>>,
    shutdown: Shutdown,
) -> anyhow::Result<(
    tokio::task::JoinHandle<std::io::Result<()>>,
    admin_http::Readiness,
)> {
    let (router, readiness) = service::admin_router(
        SERVICE,
        &config.kafka,
        registry,
        Vec::new(),
        shutdown.clone(),
    )?;
    let router = router.merge(lag_api::router(snapshot));
    let listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("failed to bind the admin server to {}", config.admin.listen))?;
    tracing::info!(address = %listener.local_addr()?, "admin server listening");
    Ok((
        tokio::spawn(admin_http::serve(listener, router, shutdown)),
        readiness,
    ))
}
