//! The producer every service uses to publish contract messages: idempotent, `acks=all`, and
//! awaited, so a caller learns the partition and offset only once the broker holds the record.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use backon::BackoffBuilder;
use rdkafka::{
    message::OwnedHeaders,
    producer::{FutureProducer, FutureRecord, Producer},
    util::Timeout,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use triage_proto::{ContentType, Contract};

use super::{KafkaError, headers};
use crate::{config::KafkaConfig, shutdown::Shutdown};

/// Where the broker stored a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Why a record was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("the broker did not acknowledge the record to {topic} within {timeout:?}")]
    Timeout { topic: String, timeout: Duration },
    #[error("the broker refused the record to {topic}: {source}")]
    Refused {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

/// What a produce failure means, decided here once for every stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProduceFailure {
    /// The broker is away, slow or electing a leader: try again.
    Transient,
    /// The broker will never take this record (too large, invalid): retrying would hold the
    /// stage on it forever, so the caller dead-letters it (or a smaller form of it).
    Rejected,
    /// No record can be produced: credentials or ACLs. The process exits so that the pod
    /// restarts and alerts fire; records stay uncommitted.
    Fatal,
}

impl ProduceError {
    /// The record (or its batch) exceeds a size limit: the producer's `message.max.bytes` or
    /// the topic's `max.message.bytes`.
    pub fn is_too_large(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as Code;
        matches!(
            self,
            ProduceError::Refused { source, .. }
                if matches!(
                    source.rdkafka_error_code(),
                    Some(Code::MessageSizeTooLarge | Code::MessageBatchTooLarge)
                )
        )
    }

    pub fn failure(&self) -> ProduceFailure {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let code = match self {
            ProduceError::Timeout { .. } => return ProduceFailure::Transient,
            ProduceError::Refused { source, .. } => source.rdkafka_error_code(),
        };
        match code {
            Some(
                Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::InvalidTimestamp
                | Code::PolicyViolation,
            ) => ProduceFailure::Rejected,
            Some(
                Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::SaslAuthenticationFailed
                | Code::Authentication
                | Code::Fatal,
            ) => ProduceFailure::Fatal,
            _ => ProduceFailure::Transient,
        }
    }
}

/// Why [`ContractProducer::send_until_acknowledged`] returned without an acknowledgement.
#[derive(Debug, thiserror::Error)]
pub enum Unsent {
    #[error("shutdown came before the broker acknowledged the record")]
    ShutDown,
    #[error("{0} (the record can never be produced as it is)")]
    Rejected(#[source] ProduceError),
    #[error("{0} (no record can be produced: check the credentials and ACLs)")]
    Fatal(#[source] ProduceError),
}

/// The bounds of the backoff between attempts of [`ContractProducer::send_until_acknowledged`].
#[derive(Clone, Copy, Debug)]
pub struct RetryDelays {
    pub min: Duration,
    pub max: Duration,
}

/// A cloneable handle to one shared librdkafka producer.
#[derive(Clone)]
pub struct ContractProducer {
    inner: FutureProducer,
    service: &'static str,
    content_type: ContentType,
    delivery_timeout: Duration,
    /// The largest record this producer expects a topic to take: the producer's
    /// `message.max.bytes` at first, lowered when a topic refuses a record as too large (its
    /// `max.message.bytes` is smaller). Shared by clones; dead letters are cut to it.
    max_message_bytes: Arc<AtomicUsize>,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl ContractProducer {
    /// `delivery_timeout` bounds how long a send may wait for the broker, retries included
    /// (librdkafka's `message.timeout.ms`); past it the caller gets an error, never a hang.
    pub fn new(
        kafka: &KafkaConfig,
        service: &'static str,
        content_type: ContentType,
        delivery_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let inner = kafka
            .producer_config("producer")
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .create()
            .map_err(|source| KafkaError::Client {
                role: "producer",
                source,
            })?;
        let max_message_bytes = kafka
            .extra
            .get("message.max.bytes")
            .and_then(|bytes| bytes.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(ContractProducer {
            inner,
            service,
            content_type,
            delivery_timeout,
            max_message_bytes: Arc::new(AtomicUsize::new(max_message_bytes)),
        })
    }

    /// The largest record a topic is expected to take (configured, or learned from a refusal).
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes.load(Ordering::Relaxed)
    }

    /// Records that a topic refused a record of `refused_at` bytes or more.
    pub fn lower_max_message_bytes(&self, refused_at: usize) {
        self.max_message_bytes
            .fetch_min(refused_at, Ordering::Relaxed);
    }

    pub fn content_type(&self) -> ContentType {
        self.content_type
    }

    /// Encodes `message`, adds the pipeline headers with `trace`'s context, and waits for the
    /// broker's acknowledgement.
    pub async fn send<M: Contract>(
        &self,
        topic: &str,
        key: &str,
        message: &M,
        trace: &opentelemetry::Context,
    ) -> Result<Delivered, ProduceError> {
        // A producer span, child of `trace`, whose context travels in the record's headers: the
        // consumer's span becomes its child, so one trace follows the ticket across services.
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("{topic} publish"),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.destination.name = topic,
            messaging.kafka.message.key = key,
            messaging.message.type = M::MESSAGE_TYPE,
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
        );
        let _ = span.set_parent(trace.clone());
        let payload = triage_proto::encode(message, self.content_type);
        let propagated = headers::context_to_propagate(&span, trace);
        let headers = headers::for_message::<M>(self.service, self.content_type, &propagated);
        let delivered = self
            .send_raw(topic, key.as_bytes(), &payload, headers)
            .instrument(span.clone())
            .await;
        if let Ok(delivered) = &delivered {
            span.record("messaging.destination.partition.id", delivered.partition);
            span.record("messaging.kafka.offset", delivered.offset);
        }
        delivered
    }

    /// [`send`](Self::send), retried with exponential backoff and full jitter between `delays`
    /// while the failure is [`ProduceFailure::Transient`]. For records that must not be lost
    /// (results, dead letters): the caller's offset waits for them. [`Unsent::ShutDown`] leaves
    /// the record to whoever consumes the input again; [`Unsent::Rejected`] and
    /// [`Unsent::Fatal`] are the caller's to act on, never retried.
    pub async fn send_until_acknowledged<M: Contract>(
        &self,
        topic: &str,
        key: &str,
        message: &M,
        trace: &opentelemetry::Context,
        delays: RetryDelays,
        shutdown: &Shutdown,
    ) -> Result<Delivered, Unsent> {
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(delays.min)
            .with_max_delay(delays.max)
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let error = match self.send(topic, key, message, trace).await {
                Ok(delivered) => return Ok(delivered),
                Err(error) => error,
            };
            match error.failure() {
                ProduceFailure::Transient => {}
                ProduceFailure::Rejected => return Err(Unsent::Rejected(error)),
                ProduceFailure::Fatal => return Err(Unsent::Fatal(error)),
            }
            let delay = backoff.next().unwrap_or(delays.max);
            tracing::warn!(topic, error = %error, retry_in = ?delay, "produce failed; retrying");
            let mut shutdown = shutdown.clone();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => return Err(Unsent::ShutDown),
            }
        }
    }

    /// Sends bytes as they are, with the given headers; for replaying original records.
    pub async fn send_raw(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<Delivered, ProduceError> {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        // The queue wait is bounded by the same timeout: a full local queue is back-pressure.
        match self
            .inner
            .send(record, Timeout::After(self.delivery_timeout))
            .await
        {
            Ok(delivery) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
                ),
                _,
            ))
            | Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => Err(ProduceError::Timeout {
                topic: topic.to_owned(),
                timeout: self.delivery_timeout,
            }),
            Err((source, _)) => Err(ProduceError::Refused {
                topic: topic.to_owned(),
                source,
            }),
        }
    }

    /// Waits for every queued record to be delivered; called on shutdown.
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.inner.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %error, "producer flush did not complete");
        }
    }

    pub fn inner(&self) -> &FutureProducer {
        &self.inner
    }
}
