//! inference-worker: consumes `tasks.llm.inference`, calls the LLM within the provider's rate
//! limit without ever paying twice, and produces results or dead letters.
//!
//! # Layout
//! - [`handler`]: one task from record to acknowledged result or dead letter (start here).
//! - [`llm`]: the OpenAI-compatible client and the classification of its failures.
//! - [`triage`]: the structured answer asked for and its validation.
//! - [`redis_store`]: result cache, in-flight leases and the shared rate-limit buckets.
//! - [`circuit`]: the circuit breaker around the provider.
//! - [`metrics`], [`config`].
//!
//! Consumption, ordering, back-pressure and offsets are the shared runtime's
//! (`triage_runtime::kafka::consumer`).

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

pub mod circuit;
pub mod config;
pub mod fairness;
pub mod handler;
pub mod llm;
pub mod metrics;
pub mod redis_store;
pub mod triage;

use std::sync::Arc;

use anyhow::Context as _;
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

use crate::{
    circuit::CircuitBreaker, fairness::Fairness, handler::WorkerHandler, llm::LlmClient,
    metrics::WorkerMetrics, redis_store::RedisStore,
};

pub const SERVICE: &str = "inference-worker";

/// Runs the worker until `shutdown` fires and in-flight tasks drained.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut registry = MetricsRegistry::new(SERVICE);
    let consumer_metrics = ConsumerMetrics::register(registry.registry_mut());
    let worker_metrics = WorkerMetrics::register(registry.registry_mut());

    let client = LlmClient::new(&config.llm).context("failed to build the LLM client")?;
    let store = RedisStore::connect(
        &config.cache.redis_url,
        &config.cache.tls,
        &config.cache.key_prefix,
    )
    .await
    .context("failed to connect to redis (cache.redis_url)")?;
    let producer = ContractProducer::new(
        &config.kafka,
        SERVICE,
        triage_proto::ContentType::Protobuf,
        std::time::Duration::from_secs(30),
    )?;
    let admin = service::start_admin(
        SERVICE,
        &config.admin,
        &config.kafka,
        registry,
        vec![Box::new(RedisHealth(store.clone()))],
        shutdown.clone(),
    )
    .await?;

    let gate = FetchGate::default();
    let worker_id = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
        uuid::Uuid::new_v4().simple()
    );
    let fairness = Fairness::new(&config.tenants, worker_metrics.clone())
        .context("failed to read tenants.keys_file")?;
    let handler = Arc::new(WorkerHandler {
        client,
        store,
        producer: producer.clone(),
        circuit: CircuitBreaker::new(config.circuit.clone(), gate.clone()),
        gate: gate.clone(),
        metrics: worker_metrics,
        shutdown: shutdown.clone(),
        worker_id,
        budget_queue: tokio::sync::Mutex::new(()),
        budget_short: std::sync::atomic::AtomicBool::new(false),
        fairness,
        config: config.clone(),
    });
    admin.readiness.mark_ready();
    tracing::info!(
        base_url = %config.llm.base_url,
        max_in_flight = config.consumer.max_in_flight,
        call_window = config.tenants.call_window,
        requests_per_minute = config.rate_limit.requests_per_minute,
        "started"
    );
    let consumer_run = ConsumerRun {
        kafka: &config.kafka,
        config: &config.consumer,
        topics: vec![config.topics.inference_tasks.clone()],
        gate,
        metrics: consumer_metrics,
        drain_timeout: config.admin.drain_timeout,
    };
    consumer::run(consumer_run, handler, shutdown).await?;
    producer.flush(std::time::Duration::from_secs(5));
    admin.task.await??;
    Ok(())
}

struct RedisHealth(RedisStore);

impl DependencyCheck for RedisHealth {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move { self.0.ping().await.map_err(|e| e.to_string()) })
    }
}
