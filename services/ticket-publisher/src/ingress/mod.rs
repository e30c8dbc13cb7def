//! The ingress core both front doors share: authenticate, rate-limit, run under an
//! `Idempotency-Key`, publish and wait for the broker's acknowledgement.
//!
//! A ticket is answered 202 only with the partition and offset the broker acknowledged; any
//! failure to get that acknowledgement within `ingress.delivery_timeout` is a 503, so a 202 always
//! has its record on `events.tickets.created`.

pub mod grpc;
pub mod http;

use std::{future::Future, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use triage_runtime::kafka::producer::ContractProducer;
use utoipa::ToSchema;

use crate::{
    auth::ApiKeys,
    config::IngressConfig,
    error::ApiError,
    idempotency::{Claim, IdempotencyStore, StoredAnswer},
    ticket::{Limits, ValidTicket},
};

/// What a caller is told for an accepted ticket: where the broker stored it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub ticket_id: String,
    pub partition: i32,
    pub offset: i64,
}

/// The trace context a record carries: the request span's, or, when no exporting subscriber
/// gives the span a context of its own, the caller's unchanged, so the trace still joins up.
pub(crate) fn record_trace(
    span: &tracing::Span,
    parent: opentelemetry::Context,
) -> opentelemetry::Context {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let own = span.context();
    if own.span().span_context().is_valid() {
        own
    } else {
        parent
    }
}

/// When a caller may retry after the broker did not acknowledge.
const BROKER_RETRY_AFTER: Duration = Duration::from_secs(1);
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    transport: &'static str,
    outcome: &'static str,
}

/// Ingress metrics, named once here.
#[derive(Clone, Default)]
pub struct IngressMetrics {
    requests: Family<OutcomeLabels, Counter>,
}

impl IngressMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = IngressMetrics::default();
        registry.register(
            "ingress_tickets",
            "Tickets submitted to the ingress, by transport and outcome (accepted or the problem type)",
            metrics.requests.clone(),
        );
        metrics
    }

    pub fn record(&self, transport: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { transport, outcome })
            .inc();
    }
}

/// Shared by the HTTP and gRPC servers.
#[derive(Clone)]
pub struct Ingress {
    inner: Arc<Inner>,
}

struct Inner {
    producer: ContractProducer,
    topic: String,
    keys: ApiKeys,
    /// Each replica's own limit, used only while Redis (the shared one) is unavailable.
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    per_second: u32,
    burst: u32,
    /// Until when (ms since the Unix epoch) the shared limit is skipped after Redis failed, so
    /// that an outage costs one timeout per second, not one per request.
    shared_limit_down_until_ms: std::sync::atomic::AtomicU64,
    store: IdempotencyStore,
    limits: Limits,
    max_body_bytes: usize,
    max_batch_items: usize,
    metrics: IngressMetrics,
    /// The longest a caller waits for an answer about the broker.
    answer_deadline: Duration,
}

impl Ingress {
    pub fn new(
        config: &IngressConfig,
        topic: String,
        producer: ContractProducer,
        keys: ApiKeys,
        store: IdempotencyStore,
        metrics: IngressMetrics,
    ) -> Self {
        let per_second = NonZeroU32::new(config.rate_limit_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(per_second);
        Ingress {
            inner: Arc::new(Inner {
                producer,
                topic,
                keys,
                limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
                per_second: per_second.get(),
                burst: burst.get(),
                shared_limit_down_until_ms: std::sync::atomic::AtomicU64::new(0),
                store,
                limits: Limits::from(config),
                max_body_bytes: config.max_body_bytes,
                max_batch_items: config.max_batch_items,
                metrics,
                answer_deadline: config.delivery_timeout + Duration::from_millis(250),
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    pub fn max_batch_items(&self) -> usize {
        self.inner.max_batch_items
    }

    pub fn metrics(&self) -> &IngressMetrics {
        &self.inner.metrics
    }

    /// The tenant of the presented API key.
    pub fn authenticate(&self, api_key: Option<&str>) -> Result<Arc<str>, ApiError> {
        api_key
            .and_then(|key| self.inner.keys.tenant_of(key))
            .ok_or(ApiError::Unauthenticated)
    }

    /// Takes `tickets` from the tenant's rate budget, or says when to come back. The budget is
    /// shared by every replica through Redis; while Redis is unavailable each replica applies
    /// it on its own (so N replicas admit up to N times the rate) rather than refuse tickets.
    pub async fn admit(&self, tenant: &Arc<str>, tickets: usize) -> Result<(), ApiError> {
        use std::sync::atomic::Ordering;
        let cells =
            NonZeroU32::new(tickets.clamp(1, u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        if self
            .inner
            .shared_limit_down_until_ms
            .load(Ordering::Relaxed)
            <= now_ms
        {
            match self
                .inner
                .store
                .take_rate(tenant, self.inner.per_second, self.inner.burst, cells.get())
                .await
            {
                Ok(None) => return Ok(()),
                Ok(Some(Duration::MAX)) => {
                    return Err(ApiError::RateLimited {
                        retry_after: Duration::from_secs(1),
                    });
                }
                Ok(Some(wait)) => {
                    return Err(ApiError::RateLimited {
                        retry_after: wait.max(Duration::from_millis(1)),
                    });
                }
                Err(error) => {
                    tracing::warn!(error = %error, "redis unavailable; ingress rate limit applies per replica");
                    self.inner
                        .shared_limit_down_until_ms
                        .store(now_ms + 1000, Ordering::Relaxed);
                }
            }
        }
        match self.inner.limiter.check_key_n(tenant, cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(ApiError::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
            // More tickets in one request than the burst allows: never admissible as one.
            Err(_) => Err(ApiError::RateLimited {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Publishes one validated ticket for `tenant` and waits for the broker.
    pub async fn publish(
        &self,
        tenant: &str,
        ticket: ValidTicket,
        trace: &opentelemetry::Context,
    ) -> Result<Accepted, ApiError> {
        let event = ticket.into_event(tenant);
        let unavailable = ApiError::BrokerUnavailable {
            retry_after: BROKER_RETRY_AFTER,
        };
        // librdkafka enforces the bound itself; this backstop keeps the promise to the caller
        // even where it cannot (a request stuck on a half-open connection). Such a record may
        // still be written later: a 503 means "not known to be accepted", and the caller's retry
        // with the same Idempotency-Key or ticket_id is how duplicates are avoided.
        let send = self
            .inner
            .producer
            .send(&self.inner.topic, &event.ticket_id, &event, trace);
        let delivered = match tokio::time::timeout(self.inner.answer_deadline, send).await {
            Ok(Ok(delivered)) => delivered,
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "ticket not acknowledged by the broker");
                return Err(unavailable);
            }
            Err(_) => {
                tracing::debug!(deadline = ?self.inner.answer_deadline, "ticket not acknowledged in time");
                return Err(unavailable);
            }
        };
        Ok(Accepted {
            ticket_id: event.ticket_id,
            partition: delivered.partition,
            offset: delivered.offset,
        })
    }

    /// Runs `handle` at most once per `(tenant, key)`: a repeated key returns the first answer.
    /// Without a key, `handle` simply runs. `handle` answers with an HTTP status and JSON body;
    /// only 2xx answers are kept, so a request that failed may be retried with the same key.
    pub async fn idempotent<F, Fut>(
        &self,
        tenant: &str,
        key: Option<&str>,
        fingerprint: &str,
        handle: F,
    ) -> Result<StoredAnswer, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(u16, serde_json::Value), ApiError>>,
    {
        let answer = |(status, body): (u16, serde_json::Value)| StoredAnswer {
            fingerprint: fingerprint.to_owned(),
            status,
            body,
        };
        let Some(key) = key else {
            return handle().await.map(answer);
        };
        if key.is_empty()
            || key.chars().count() > crate::idempotency::MAX_KEY_CHARS
            || key.chars().any(|c| c.is_control())
        {
            return Err(ApiError::Malformed {
                detail: "Idempotency-Key must be 1 to 255 printable characters".into(),
                errors: vec![crate::error::FieldError::new(
                    "Idempotency-Key",
                    "must be 1 to 255 printable characters",
                )],
            });
        }
        let store_down = |error: crate::idempotency::StoreError| {
            // Per request, so DEBUG; `/healthz?verbose` and `triage_dependency_up` report Redis down and the 503s are counted.
            tracing::debug!(error = %error, "idempotency store unavailable");
            ApiError::IdempotencyStoreUnavailable {
                retry_after: REDIS_RETRY_AFTER,
            }
        };
        let store = &self.inner.store;
        match store
            .claim(tenant, key, fingerprint)
            .await
            .map_err(store_down)?
        {
            Claim::Claimed => {}
            Claim::Answered(previous) => return Ok(previous),
            Claim::InProgress => return Err(ApiError::IdempotencyInProgress),
            Claim::Mismatch => return Err(ApiError::IdempotencyKeyReused),
        }
        match handle().await {
            Ok(outcome) => {
                let stored = answer(outcome);
                if (200..300).contains(&stored.status)
                    && let Err(error) = store.complete(tenant, key, stored.clone()).await
                {
                    // The ticket is in Kafka; the claim expires on its own. A retry within the
                    // claim's lifetime gets 409, after it a second record; counted, not logged
                    // above DEBUG because it happens per request.
                    self.inner
                        .metrics
                        .record("idempotency", "answer_not_stored");
                    tracing::debug!(error = %error, "accepted ticket but could not store its idempotent answer");
                }
                Ok(stored)
            }
            Err(error) => {
                if let Err(release_error) = store.release(tenant, key).await {
                    tracing::debug!(error = %release_error, "could not release idempotency claim");
                }
                Err(error)
            }
        }
    }
}
