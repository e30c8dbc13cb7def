//! Building `DeadLetter` envelopes: the original record byte for byte, where it came from, why
//! it was given up, and its trace, so that a person can act on it and replay it.

use std::time::SystemTime;

use rdkafka::{Message, message::OwnedMessage};
use triage_proto::v1::{DeadLetter, ErrorClass};

use super::headers;

/// What the failing stage knows about the failure.
#[derive(Clone, Debug)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
    pub attempts: u32,
    pub first_failure_at: SystemTime,
    /// Filled in when the record decoded far enough to know them.
    pub ticket_id: Option<String>,
    pub tenant_id: Option<String>,
}

impl Failure {
    /// A failure on the first and only attempt, e.g. a record that does not decode.
    pub fn immediate(class: ErrorClass, message: impl Into<String>) -> Self {
        Failure {
            class,
            message: message.into(),
            attempts: 1,
            first_failure_at: SystemTime::now(),
            ticket_id: None,
            tenant_id: None,
        }
    }

    pub fn for_ticket(mut self, ticket_id: &str, tenant_id: &str) -> Self {
        self.ticket_id = Some(ticket_id.to_owned());
        self.tenant_id = Some(tenant_id.to_owned());
        self
    }
}

/// The envelope for `record`, given up by `service`.
pub fn envelope(record: &OwnedMessage, failure: Failure, service: &str) -> DeadLetter {
    let record_headers = record.headers();
    DeadLetter {
        id: uuid::Uuid::now_v7().to_string(),
        original_key: record.key().map(<[u8]>::to_vec).unwrap_or_default(),
        original_value: record.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        original_headers: headers::to_record_headers(record_headers),
        source_topic: record.topic().to_owned(),
        source_partition: record.partition(),
        source_offset: record.offset(),
        error_class: failure.class as i32,
        error_message: failure.message,
        attempts: failure.attempts,
        first_failure_at: Some(triage_proto::timestamp(failure.first_failure_at)),
        last_failure_at: Some(triage_proto::timestamp(SystemTime::now())),
        failed_service: service.to_owned(),
        traceparent: headers::get_str(record_headers, headers::TRACEPARENT)
            .unwrap_or_default()
            .to_owned(),
        tracestate: headers::get_str(record_headers, headers::TRACESTATE)
            .unwrap_or_default()
            .to_owned(),
        ticket_id: failure.ticket_id.unwrap_or_default(),
        tenant_id: failure.tenant_id.unwrap_or_default(),
    }
}

/// The key a dead letter is produced with: the ticket id when known, else the original key.
pub fn record_key(dead_letter: &DeadLetter) -> String {
    if dead_letter.ticket_id.is_empty() {
        String::from_utf8_lossy(&dead_letter.original_key).into_owned()
    } else {
        dead_letter.ticket_id.clone()
    }
}
