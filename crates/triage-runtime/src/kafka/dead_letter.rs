//! Building `DeadLetter` envelopes: the original record byte for byte, where it came from, why
//! it was given up, and its trace, so that a person can act on it and replay it.

use std::time::SystemTime;

use rdkafka::{Message, message::OwnedMessage};
use triage_proto::{
    ContentType,
    v1::{DeadLetter, ErrorClass},
};

use super::{
    consumer::Disposition,
    headers,
    producer::{ContractProducer, RetryDelays, Unsent},
};
use crate::shutdown::Shutdown;

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

/// The most of the original value a dead letter carries. A dead letter must always fit on the
/// topic: one that cannot be produced would hold its stage on the record forever. Larger values
/// keep their first bytes and their size. A topic whose `max.message.bytes` is smaller cuts
/// them further ([`envelope_within`]).
pub const MAX_ORIGINAL_VALUE_BYTES: usize = 256 * 1024;
/// What a record takes besides its encoded value: the record batch and record framing, the key
/// (counted apart) and the pipeline's headers (content type, producer, trace context).
const RECORD_OVERHEAD_BYTES: usize = 2 * 1024;
/// Below this a topic is taken as unable to hold dead letters at all.
const MIN_DEAD_LETTER_BYTES: usize = 4 * 1024;
/// What is left of an error message when even the value could not make room.
const MIN_ERROR_MESSAGE_BYTES: usize = 512;
/// The most of the original key, the error message and the original headers (together) a dead
/// letter carries, for the same reason.
pub const MAX_ORIGINAL_KEY_BYTES: usize = 4 * 1024;
pub const MAX_ERROR_MESSAGE_BYTES: usize = 8 * 1024;
pub const MAX_ORIGINAL_HEADERS_BYTES: usize = 64 * 1024;

/// The envelope for `record`, given up by `service`, within the size caps above.
pub fn envelope(record: &OwnedMessage, failure: Failure, service: &str) -> DeadLetter {
    let record_headers = record.headers();
    let value = record.payload().unwrap_or_default();
    let mut header_bytes = 0usize;
    let original_headers = headers::to_record_headers(record_headers)
        .into_iter()
        .take_while(|header| {
            header_bytes += header.key.len() + header.value.len();
            header_bytes <= MAX_ORIGINAL_HEADERS_BYTES
        })
        .collect();
    DeadLetter {
        id: uuid::Uuid::now_v7().to_string(),
        original_key: record
            .key()
            .map(|key| prefix(key, MAX_ORIGINAL_KEY_BYTES).to_vec())
            .unwrap_or_default(),
        original_value: prefix(value, MAX_ORIGINAL_VALUE_BYTES).to_vec(),
        original_value_size: value.len() as u64,
        original_value_truncated: value.len() > MAX_ORIGINAL_VALUE_BYTES,
        original_headers,
        source_topic: record.topic().to_owned(),
        source_partition: record.partition(),
        source_offset: record.offset(),
        error_class: failure.class as i32,
        error_message: truncate_text(failure.message, MAX_ERROR_MESSAGE_BYTES),
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

/// The envelope for `record` cut to fit a record of at most `max_record_bytes` on the topic,
/// encoded as `content_type`: the original value loses its tail first (marked truncated, its
/// size kept), then the original headers, then the error message's tail.
pub fn envelope_within(
    record: &OwnedMessage,
    failure: Failure,
    service: &str,
    content_type: ContentType,
    max_record_bytes: usize,
) -> DeadLetter {
    let mut dead_letter = envelope(record, failure, service);
    let budget = max_record_bytes
        .saturating_sub(RECORD_OVERHEAD_BYTES + record_key(&dead_letter).len())
        .max(1);
    loop {
        let size = triage_proto::encode(&dead_letter, content_type).len();
        let Some(excess) = size.checked_sub(budget).filter(|excess| *excess > 0) else {
            break;
        };
        if !dead_letter.original_value.is_empty() {
            // A value byte is one encoded byte in protobuf and 4/3 in JSON's base64.
            let cut = match content_type {
                ContentType::Protobuf => excess,
                ContentType::Json => excess.div_ceil(4) * 3,
            };
            let keep = dead_letter.original_value.len().saturating_sub(cut);
            dead_letter.original_value.truncate(keep);
            dead_letter.original_value_truncated = true;
        } else if !dead_letter.original_headers.is_empty() {
            dead_letter.original_headers.pop();
        } else if dead_letter.error_message.len() > MIN_ERROR_MESSAGE_BYTES {
            dead_letter.error_message =
                truncate_text(dead_letter.error_message, MIN_ERROR_MESSAGE_BYTES);
        } else {
            // Nothing more to cut: the topic will say whether it fits.
            break;
        }
    }
    dead_letter
}

/// Where and how a stage produces its dead letters.
pub struct DeadLetterTarget<'a> {
    pub producer: &'a ContractProducer,
    pub topic: &'a str,
    pub service: &'a str,
    pub delays: RetryDelays,
    pub shutdown: &'a Shutdown,
}

impl DeadLetterTarget<'_> {
    /// Gives `record` up: produces its dead letter and waits for the broker's acknowledgement,
    /// the one way every consumer stage does it. [`Disposition::Done`] once acknowledged,
    /// `Abandon` when shutdown came first, `Fatal` when the topic refuses even a dead letter cut
    /// to a few KiB (or the service may not write to it): no record could be given up then.
    ///
    /// The dead letter is cut to the producer's largest record size; a topic whose
    /// `max.message.bytes` is smaller refuses it as too large, and the size is then halved
    /// (and remembered by the producer) until it fits.
    pub async fn produce(
        &self,
        record: &OwnedMessage,
        failure: Failure,
        trace: &opentelemetry::Context,
    ) -> Disposition {
        let mut max_record_bytes = self.producer.max_message_bytes();
        loop {
            let envelope = envelope_within(
                record,
                failure.clone(),
                self.service,
                self.producer.content_type(),
                max_record_bytes,
            );
            let key = record_key(&envelope);
            let sent = self
                .producer
                .send_until_acknowledged(
                    self.topic,
                    &key,
                    &envelope,
                    trace,
                    self.delays,
                    self.shutdown,
                )
                .await;
            match sent {
                Ok(_) => return Disposition::Done,
                Err(Unsent::ShutDown) => return Disposition::Abandon,
                Err(Unsent::Rejected(error))
                    if error.is_too_large() && max_record_bytes > MIN_DEAD_LETTER_BYTES =>
                {
                    max_record_bytes = (max_record_bytes / 2).max(MIN_DEAD_LETTER_BYTES);
                    tracing::warn!(
                        topic = self.topic,
                        max_record_bytes,
                        error = %error,
                        "dead-letter topic refused a record as too large; cutting dead letters smaller"
                    );
                    self.producer.lower_max_message_bytes(max_record_bytes);
                }
                Err(error @ (Unsent::Rejected(_) | Unsent::Fatal(_))) => {
                    return Disposition::Fatal(format!(
                        "cannot produce a dead letter to {}: {error}",
                        self.topic
                    ));
                }
            }
        }
    }
}

fn prefix(bytes: &[u8], max: usize) -> &[u8] {
    bytes.get(..max).unwrap_or(bytes)
}

/// `text` cut to at most `max` bytes at a character boundary.
fn truncate_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The key a dead letter is produced with: the ticket id when known, else the original key.
pub fn record_key(dead_letter: &DeadLetter) -> String {
    if dead_letter.ticket_id.is_empty() {
        String::from_utf8_lossy(&dead_letter.original_key).into_owned()
    } else {
        dead_letter.ticket_id.clone()
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::{
        Timestamp,
        message::{Header, OwnedHeaders},
    };

    use super::*;

    #[test]
    fn a_huge_record_becomes_a_dead_letter_that_fits_and_says_it_was_cut() {
        let value = vec![b'x'; 5 * 1024 * 1024];
        let header_value = vec![b'h'; 1024];
        let mut record_headers = OwnedHeaders::new();
        for _ in 0..200 {
            record_headers = record_headers.insert(Header {
                key: "noise",
                value: Some(&header_value),
            });
        }
        let record = OwnedMessage::new(
            Some(value.clone()),
            Some(vec![b'k'; 100_000]),
            "events".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(record_headers),
        );
        let failure = Failure::immediate(ErrorClass::InvalidEvent, "é".repeat(100_000));
        let dead_letter = envelope(&record, failure, "test");
        assert!(dead_letter.original_value_truncated);
        assert_eq!(dead_letter.original_value_size, value.len() as u64);
        assert_eq!(dead_letter.original_value.len(), MAX_ORIGINAL_VALUE_BYTES);
        let encoded = triage_proto::encode(&dead_letter, triage_proto::ContentType::Protobuf).len();
        assert!(encoded < 512 * 1024, "{encoded} bytes");

        let small = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "events".into(),
            Timestamp::NotAvailable,
            0,
            8,
            None,
        );
        let dead_letter = envelope(
            &small,
            Failure::immediate(ErrorClass::Decode, "bad"),
            "test",
        );
        assert!(!dead_letter.original_value_truncated);
        assert_eq!(dead_letter.original_value, b"{}");
        assert_eq!(dead_letter.original_value_size, 2);
    }

    #[test]
    fn a_dead_letter_is_cut_to_a_small_topic_limit_in_either_encoding() {
        let value = vec![b'x'; 5 * 1024 * 1024];
        let record = OwnedMessage::new(
            Some(value.clone()),
            Some(b"ticket-1".to_vec()),
            "events".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        );
        for content_type in [
            triage_proto::ContentType::Protobuf,
            triage_proto::ContentType::Json,
        ] {
            let dead_letter = envelope_within(
                &record,
                Failure::immediate(ErrorClass::InvalidEvent, "too big"),
                "test",
                content_type,
                64 * 1024,
            );
            let encoded = triage_proto::encode(&dead_letter, content_type).len();
            assert!(encoded <= 62 * 1024, "{content_type:?}: {encoded} bytes");
            assert!(
                encoded > 32 * 1024,
                "{content_type:?}: cut more than needed"
            );
            assert!(dead_letter.original_value_truncated);
            assert_eq!(dead_letter.original_value_size, value.len() as u64);
            assert_eq!(dead_letter.error_message, "too big");
        }
    }
}
