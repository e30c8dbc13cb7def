//! The consumer runtime's per-record logic: decode, hand the row to the batcher and report the
//! record done once it is committed; dead-letter what cannot be stored.

use std::time::Duration;

use chrono::DateTime;
use rdkafka::{Message, message::OwnedMessage};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use triage_proto::v1::{ErrorClass, InferenceResult};
use triage_runtime::{
    kafka::{
        consumer::{Disposition, RecordHandler},
        dead_letter::{DeadLetterTarget, Failure},
        headers,
        producer::{ContractProducer, RetryDelays},
    },
    shutdown::Shutdown,
};

use crate::{
    batch::{Pending, Written},
    metrics::WriterMetrics,
    triage::{NewTriage, Source},
};

/// A record after `prepare`.
pub enum Item {
    /// A valid triage, ready for the table, with the trace context its record carried and the
    /// record itself, dead-lettered if PostgreSQL refuses the row.
    Triage(Box<NewTriage>, opentelemetry::Context, OwnedMessage),
    /// A record that cannot be stored; it goes to the dead-letter topic.
    Reject {
        record: OwnedMessage,
        class: ErrorClass,
        message: String,
        /// (ticket id, tenant id) when the record decoded that far.
        ids: Option<(String, String)>,
    },
}

pub struct ResultHandler {
    pub pending_tx: mpsc::Sender<Pending>,
    pub producer: ContractProducer,
    pub dead_letters_topic: String,
    pub metrics: WriterMetrics,
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    pub shutdown: Shutdown,
}

impl RecordHandler for ResultHandler {
    type Item = Item;

    fn prepare(&self, record: OwnedMessage) -> Item {
        let content_type = headers::get_str(record.headers(), headers::CONTENT_TYPE);
        let decoded = triage_proto::decode::<InferenceResult>(
            record.payload().unwrap_or_default(),
            content_type,
        );
        let result = match decoded {
            Ok(result) => result,
            Err(error) => {
                return Item::Reject {
                    class: ErrorClass::Decode,
                    message: error.to_string(),
                    ids: None,
                    record,
                };
            }
        };
        let ids = (result.ticket_id.clone(), result.tenant_id.clone());
        if let Err(error) = triage_proto::check_timestamps(&result) {
            return Item::Reject {
                class: ErrorClass::InvalidEvent,
                message: error.to_string(),
                ids: Some(ids),
                record,
            };
        }
        let trace = headers::extract_trace_context(record.headers());
        let source = Source {
            partition: record.partition(),
            offset: record.offset(),
            timestamp: record
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis),
            trace_id: headers::trace_id(&trace),
        };
        match NewTriage::from_result(result, source) {
            Ok(triage) => Item::Triage(Box::new(triage), trace, record),
            Err(error) => Item::Reject {
                class: ErrorClass::InvalidEvent,
                message: error.to_string(),
                ids: Some(ids),
                record,
            },
        }
    }

    fn unprocessable(&self, record: OwnedMessage, reason: String) -> Item {
        Item::Reject {
            record,
            class: ErrorClass::Unprocessable,
            message: reason,
            ids: None,
        }
    }

    fn ordering_key(&self, item: &Item) -> Option<Vec<u8>> {
        // One result of a ticket at a time, so a ticket is never in two batches at once and its
        // results are written in offset order.
        match item {
            Item::Triage(triage, _, _) => Some(triage.ticket_id.as_bytes().to_vec()),
            Item::Reject { record, .. } => record.key().map(<[u8]>::to_vec),
        }
    }

    async fn handle(&self, item: Item) -> Disposition {
        match item {
            Item::Triage(triage, trace, record) => {
                // The last hop of the ticket's trace: consumed, then durable in PostgreSQL.
                let span = tracing::info_span!(
                    "store triage",
                    otel.kind = "consumer",
                    messaging.system = "kafka",
                    messaging.operation.type = "process",
                    messaging.destination.partition.id = triage.source_partition,
                    messaging.kafka.offset = triage.source_offset,
                    db.system.name = "postgresql",
                    db.operation.name = "INSERT",
                    ticket.id = %triage.ticket_id,
                );
                let _ = span.set_parent(trace);
                async move {
                    let ids = (triage.ticket_id.clone(), triage.tenant_id.clone());
                    let (written_tx, written_rx) = oneshot::channel();
                    let pending = Pending {
                        triage: *triage,
                        written_tx,
                    };
                    if self.pending_tx.send(pending).await.is_err() {
                        return Disposition::Abandon;
                    }
                    match written_rx.await {
                        Ok(Written::Stored) => Disposition::Done,
                        Ok(Written::Refused(reason)) => {
                            let message = format!("PostgreSQL refuses the row: {reason}");
                            self.dead_letter(&record, ErrorClass::InvalidEvent, message, Some(ids))
                                .await
                        }
                        Ok(Written::Fatal(reason)) => Disposition::Fatal(reason),
                        Err(_) => Disposition::Abandon,
                    }
                }
                .instrument(span)
                .await
            }
            Item::Reject {
                record,
                class,
                message,
                ids,
            } => self.dead_letter(&record, class, message, ids).await,
        }
    }
}

impl ResultHandler {
    /// Produces the record's dead letter and waits for the broker's acknowledgement.
    async fn dead_letter(
        &self,
        record: &OwnedMessage,
        class: ErrorClass,
        message: String,
        ids: Option<(String, String)>,
    ) -> Disposition {
        let mut failure = Failure::immediate(class, message);
        if let Some((ticket_id, tenant_id)) = &ids {
            failure = failure.for_ticket(ticket_id, tenant_id);
        }
        let trace = headers::extract_trace_context(record.headers());
        let target = DeadLetterTarget {
            producer: &self.producer,
            topic: &self.dead_letters_topic,
            service: crate::SERVICE,
            delays: RetryDelays {
                min: self.retry_min_delay,
                max: self.retry_max_delay,
            },
            shutdown: &self.shutdown,
        };
        let disposition = target.produce(record, failure, &trace).await;
        if disposition != Disposition::Done {
            return disposition;
        }
        self.metrics.dead_letters.inc();
        tracing::debug!(
            topic = record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            error_class = class.label(),
            "result record dead-lettered"
        );
        Disposition::Done
    }
}
