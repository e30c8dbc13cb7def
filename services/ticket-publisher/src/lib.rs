//! ticket-publisher: HTTP and gRPC ticket ingress onto `events.tickets.created`, and the transactional dispatch stage that renders each ticket into an `InferenceTask`.
//!
//! # Layout
//! - [`config`]: the service's configuration (`ingress`, `auth`, `redis`, `dispatch`).
//! - [`ticket`]: request decoding and validation, shared by both transports.
//! - [`error`]: the one error type, as problem+json and as `tonic::Status`.
//! - [`auth`]: API keys (hashed, constant-time) → tenant.
//! - [`idempotency`]: the `Idempotency-Key` store in Redis.
//! - [`ingress`]: the shared publish path, the axum router ([`ingress::http`]) and the tonic
//!   service ([`ingress::grpc`]).
//! - [`dispatch`]: events → tasks in Kafka transactions, and the prompt rendering
//!   ([`dispatch::render`]).

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

pub use triage_runtime::auth;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod idempotency;
pub mod ingress;
pub mod ticket;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, task::JoinSet};
use triage_proto::ContentType;
use triage_runtime::{
    admin_http::DependencyCheck,
    kafka::{
        admin::{TopicSpec, ensure_topics},
        producer::ContractProducer,
    },
    metrics::MetricsRegistry,
    service,
    shutdown::Shutdown,
};

pub use config::Config;

use crate::{
    auth::ApiKeys,
    dispatch::{DispatchMetrics, Dispatcher},
    idempotency::{IdempotencyStore, RedisHealth},
    ingress::{Ingress, IngressMetrics},
};

pub const SERVICE: &str = "ticket-publisher";

/// Builds the ingress core from configuration: producer, keys, Redis store.
pub fn build_ingress(config: &Config, metrics: IngressMetrics) -> anyhow::Result<Ingress> {
    let producer = ingress_producer(config).context("failed to create the ingress producer")?;
    let keys = ApiKeys::load(&config.auth).context("failed to load API keys")?;
    if keys.is_empty() {
        tracing::warn!("no API keys configured; every ticket will be refused with 401");
    }
    let store = IdempotencyStore::new(&config.redis, config.ingress.idempotency_ttl)
        .context("failed to create the Redis client")?;
    Ok(Ingress::new(
        &config.ingress,
        config.topics.tickets_created.clone(),
        producer,
        keys,
        store,
        metrics,
    ))
}

/// The ingress producer: idempotent, `acks=all`, and bounded by `ingress.delivery_timeout`
/// including requests already on the wire (`request.timeout.ms`), so a dead broker yields a 503
/// within the bound instead of waiting for the socket to time out.
pub fn ingress_producer(
    config: &Config,
) -> Result<ContractProducer, triage_runtime::kafka::KafkaError> {
    let mut kafka = config.kafka.clone();
    let request_timeout = config
        .ingress
        .delivery_timeout
        .as_millis()
        .clamp(100, 30_000);
    kafka
        .extra
        .entry("request.timeout.ms".into())
        .or_insert_with(|| request_timeout.to_string());
    // Every request waits for its record's acknowledgement, so lingering only delays the answer
    // and everything after it (about 1 ms of the accepted -> LLM request p50); under load the
    // records still share requests, queued while the previous ones are in flight.
    kafka
        .extra
        .entry("linger.ms".into())
        .or_insert_with(|| "0".into());
    ContractProducer::new(
        &kafka,
        SERVICE,
        ContentType::Protobuf,
        config.ingress.delivery_timeout,
    )
}

/// Serves the HTTP API and the gRPC service on already bound listeners until `shutdown`.
pub fn spawn_ingress(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    ingress: Ingress,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    shutdown: Shutdown,
) {
    let router = ingress::http::router(ingress.clone());
    let mut http_shutdown = shutdown.clone();
    tasks.spawn(async move {
        axum::serve(http_listener, router)
            .with_graceful_shutdown(async move { http_shutdown.wait().await })
            .await
            .context("HTTP ingress failed")
    });
    let mut grpc_shutdown = shutdown;
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ingress::grpc::service(ingress))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move { grpc_shutdown.wait().await },
            )
            .await
            .context("gRPC ingress failed")
    });
}

async fn bind(address: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to bind the {what} to {address}"))
}

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let config = Arc::new(config);
    if config.topic_provisioning.enabled {
        let specs = TopicSpec::pipeline(&config.topics, &config.topic_provisioning);
        ensure_topics(&config.kafka, &specs)
            .await
            .context("failed to provision the pipeline's topics")?;
    }
    let mut registry = MetricsRegistry::new(SERVICE);
    let ingress_metrics = IngressMetrics::register(registry.registry_mut());
    let dispatch_metrics = DispatchMetrics::register(registry.registry_mut());

    let mut checks: Vec<Box<dyn DependencyCheck>> = Vec::new();
    let mut tasks = JoinSet::new();
    if config.ingress.enabled {
        let ingress = build_ingress(&config, ingress_metrics)?;
        let store = IdempotencyStore::new(&config.redis, config.ingress.idempotency_ttl)?;
        store
            .check_certificate()
            .await
            .context("redis refused the TLS handshake (redis.tls)")?;
        checks.push(Box::new(RedisHealth(store)));
        let http_listener = bind(config.ingress.http_listen, "HTTP ingress").await?;
        let grpc_listener = bind(config.ingress.grpc_listen, "gRPC ingress").await?;
        tracing::info!(
            http = %http_listener.local_addr()?,
            grpc = %grpc_listener.local_addr()?,
            "ingress listening"
        );
        spawn_ingress(
            &mut tasks,
            ingress,
            http_listener,
            grpc_listener,
            shutdown.clone(),
        );
    }
    if config.dispatch.enabled {
        for lane in 0..config.dispatch.lanes {
            let dispatcher = Dispatcher::start(Arc::clone(&config), dispatch_metrics.clone(), lane)
                .await
                .with_context(|| format!("failed to start dispatch lane {lane}"))?;
            let dispatch_shutdown = shutdown.clone();
            tasks.spawn(async move {
                dispatcher
                    .run(dispatch_shutdown)
                    .await
                    .with_context(|| format!("dispatch lane {lane} failed"))
            });
        }
    }
    let admin = service::start_admin(
        SERVICE,
        &config.admin,
        &config.kafka,
        registry,
        checks,
        shutdown.clone(),
    )
    .await?;
    admin.readiness.mark_ready();
    tracing::info!(
        service = SERVICE,
        ingress = config.ingress.enabled,
        dispatch = config.dispatch.enabled,
        "started"
    );

    let mut waiting = shutdown.clone();
    let outcome = tokio::select! {
        biased;
        () = waiting.wait() => Ok(()),
        Some(joined) = tasks.join_next() => {
            // A part stopped before shutdown was asked for: that is a failure. (A part that
            // stopped because of the shutdown may win this race; that is not.)
            match joined {
                Ok(Ok(())) if shutdown.is_triggered() => Ok(()),
                Ok(Ok(())) => Err(anyhow::anyhow!("a stage stopped unexpectedly")),
                Ok(Err(error)) => Err(error),
                Err(panic) => Err(anyhow::anyhow!("a stage panicked: {panic}")),
            }
        }
    };
    let drained = tokio::time::timeout(config.admin.drain_timeout, async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(error)) = joined {
                tracing::warn!(error = format!("{error:#}"), "stage stopped with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?config.admin.drain_timeout, "drain deadline passed; stopping anyway");
        tasks.abort_all();
    }
    outcome?;
    admin.task.await??;
    Ok(())
}
