//! result-writer: writes `tasks.llm.results` into PostgreSQL and serves the triage read API.
//!
//! # Layout
//! - [`config`]: the service's configuration.
//! - [`handler`]: the consumer runtime's per-record logic (decode, hand to the batcher, report
//!   done after the commit; dead-letter what cannot be stored).
//! - [`batch`]: batches of results written in one transaction, retried while PostgreSQL is down.
//! - [`db`]: the pool, the embedded migrations, the idempotent upsert and the read queries.
//! - [`triage`]: a triage row and its conversion from `InferenceResult`.
//! - [`api`]: the read API (`/v1/...`, live stream, OpenAPI); [`auth`]: API keys and tenants.
//! - [`console`]: the triage console (`/console`), embedded HTML/CSS/JS on the read API's port;
//!   [`throughput`]: its health page's triages and rate-limit waits per minute.
//! - [`webhook`]: signed outbound webhooks, off the database path.
//! - [`metrics`]: the writer's metrics.
//!
//! Offsets are committed by the shared consumer runtime (`triage_runtime::kafka::consumer`):
//! a record is reported done only after the transaction holding its row committed.

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

pub mod api;
pub use triage_runtime::auth;
pub mod batch;
pub mod config;
pub mod console;
pub mod db;
pub mod handler;
pub mod metrics;
pub mod throughput;
pub mod triage;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc},
};
use triage_proto::ContentType;
use triage_runtime::{
    admin_http::{CheckFuture, DependencyCheck},
    kafka::{
        consumer::{self, ConsumerMetrics, ConsumerRun, FetchGate},
        producer::ContractProducer,
    },
    metrics::MetricsRegistry,
    service,
    shutdown::Shutdown,
};

pub use config::Config;

pub const SERVICE: &str = "result-writer";

/// PostgreSQL answers a query: reported on `/healthz?verbose` and `triage_dependency_up`.
pub struct PostgresHealth(pub db::Store);

impl DependencyCheck for PostgresHealth {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            self.0
                .ping(Duration::from_secs(2))
                .await
                .map_err(|error| error.to_string())
        })
    }
}

/// Runs the service until `shutdown` fires and the in-flight results are written.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut registry = MetricsRegistry::new(SERVICE);
    let consumer_metrics = ConsumerMetrics::register(registry.registry_mut());
    let metrics = metrics::WriterMetrics::register(registry.registry_mut());
    let keys = auth::ApiKeys::load(&config.auth).context("failed to load the API keys")?;
    let pool = db::connect(&config.database).context("failed to set up the PostgreSQL pool")?;
    let store = db::Store::new(pool);
    let admin = service::start_admin(
        SERVICE,
        &config.admin,
        &config.kafka,
        registry,
        vec![Box::new(PostgresHealth(store.clone()))],
        shutdown.clone(),
    )
    .await?;

    if !migrate_until_done(&store, &config.database, shutdown.clone()).await? {
        admin.task.await??;
        return Ok(());
    }

    let (published_tx, _) = broadcast::channel(config.api.stream_buffer);
    let (webhooks, webhook_task) =
        webhook::Webhooks::start(&config.webhooks, metrics.clone(), shutdown.clone());
    let api_listener = TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("failed to bind the read API to {}", config.api.listen))?;
    tracing::info!(address = %api_listener.local_addr()?, "read API listening");
    let mut api_router = api::router(api::ApiState {
        store: store.clone(),
        keys: keys.clone(),
        published_tx: published_tx.clone(),
        max_page_size: config.api.max_page_size,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });
    if config.console.enabled {
        let http = reqwest::Client::builder()
            .build()
            .context("failed to build the console's HTTP client")?;
        api_router = api_router.merge(console::router(console::ConsoleState {
            store: store.clone(),
            keys,
            config: config.console.clone(),
            http,
        }));
    }
    let api_task = tokio::spawn(triage_runtime::admin_http::serve(
        api_listener,
        api_router,
        shutdown.clone(),
    ));

    let gate = FetchGate::default();
    let (pending_tx, pending_rx) = mpsc::channel(config.consumer.max_in_flight.max(1));
    let batch_writer = batch::BatchWriter {
        store,
        batch: config.batch.clone(),
        database: config.database.clone(),
        gate: gate.clone(),
        metrics: metrics.clone(),
        published_tx,
        webhooks,
    };
    let batch_task = tokio::spawn(batch_writer.run(pending_rx, shutdown.clone()));
    let producer = ContractProducer::new(
        &config.kafka,
        SERVICE,
        ContentType::Protobuf,
        config.dead_letter_timeout,
    )?;
    let handler = Arc::new(handler::ResultHandler {
        pending_tx,
        producer: producer.clone(),
        dead_letters_topic: config.topics.dead_letters.clone(),
        metrics,
        retry_min_delay: config.database.retry_min_delay,
        retry_max_delay: config.database.retry_max_delay,
        shutdown: shutdown.clone(),
    });
    admin.readiness.mark_ready();
    tracing::info!(service = SERVICE, topic = %config.topics.results, "started");
    // The handler (and with it the batcher's only sender) lives exactly as long as the consumer:
    // once the drain is over, the batcher writes what it holds and stops.
    consumer::run(
        ConsumerRun {
            kafka: &config.kafka,
            config: &config.consumer,
            topics: vec![config.topics.results.clone()],
            gate,
            metrics: consumer_metrics,
            drain_timeout: config.admin.drain_timeout,
        },
        handler,
        shutdown,
    )
    .await?;
    if tokio::time::timeout(config.admin.drain_timeout, batch_task)
        .await
        .is_err()
    {
        tracing::warn!("batch writer did not stop within the drain timeout");
    }
    producer.flush(Duration::from_secs(5));
    if let Some(task) = webhook_task {
        let _ = task.await;
    }
    api_task.await??;
    admin.task.await??;
    Ok(())
}

/// Applies the migrations, retrying while PostgreSQL is unreachable (`/healthz?verbose` says so
/// meanwhile). False when shutdown came first; an error when no retry can help (a refused
/// certificate, wrong credentials, a missing database): the service then exits instead of
/// retrying forever.
async fn migrate_until_done(
    store: &db::Store,
    database: &config::DatabaseConfig,
    mut shutdown: Shutdown,
) -> anyhow::Result<bool> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(database.retry_min_delay)
        .with_max_delay(database.retry_max_delay)
        .without_max_times()
        .with_jitter()
        .build();
    loop {
        match db::migrate(store.pool(), &database.schema).await {
            Ok(applied) => {
                tracing::info!(schema = %database.schema, applied, "database schema up to date");
                return Ok(true);
            }
            Err(error) if error.failure() == db::DbFailure::Fatal => {
                return Err(error).context("failed to migrate the database");
            }
            Err(error) => {
                let delay = delays.next().unwrap_or(database.retry_max_delay);
                tracing::warn!(error = %error, retry_in = ?delay, "cannot migrate the database yet");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => return Ok(false),
                }
            }
        }
    }
}
