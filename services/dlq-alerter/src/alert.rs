//! What an alert says: a dead letter turned into the facts a person needs to act on it
//! ([`DeadLetterAlert`]), and the summary of the failures folded into an aggregation window
//! ([`Summary`]). Rendering into Slack Block Kit or plain JSON is in [`crate::output`].

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::{Message as _, message::OwnedMessage};
use serde::Serialize;
use triage_proto::{
    Contract,
    v1::{DeadLetter, ErrorClass, InferenceTask, TicketCreated},
};
use triage_runtime::kafka::headers;

use crate::redact;

/// What building an alert needs from the configuration.
#[derive(Clone, Debug)]
pub struct AlertSettings {
    pub excerpt_chars: usize,
    /// e.g. `dlq-alerter replay`.
    pub replay_command: String,
    pub tickets_topic: String,
    pub inference_topic: String,
}

/// Where a record sits in Kafka.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One dead letter, as an alert shows it. Text fields are empty when unknown.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterAlert {
    /// The dead letter's id; empty when the record is not a `DeadLetter` at all.
    pub dead_letter_id: String,
    /// The error class label (`invalid_output`, ...). Also the aggregation key.
    pub error_class: String,
    /// Redacted; the failing service's own words.
    pub error_message: String,
    pub ticket_id: String,
    pub tenant_id: String,
    /// Where the original record was when it was given up on.
    pub source: Position,
    pub attempts: u32,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub failed_service: String,
    /// The W3C trace id from the dead letter's `traceparent`.
    pub trace_id: String,
    /// A redacted, cut excerpt of the ticket (or of the raw bytes of an undecodable record).
    pub excerpt: String,
    /// The command that replays this dead letter; absent when it cannot be replayed.
    pub replay_command: Option<String>,
    /// Where the dead letter itself is, on the dead-letter topic.
    pub dead_letter_record: Position,
    /// Set when the record on the dead-letter topic is not a `DeadLetter`: its size in bytes.
    pub undecodable_size_bytes: Option<usize>,
}

impl DeadLetterAlert {
    /// The alert for a record of the dead-letter topic. Never fails: a record that is not a
    /// `DeadLetter` becomes a `decode` alert carrying its size and an excerpt of its bytes.
    pub fn from_record(record: &OwnedMessage, settings: &AlertSettings) -> Self {
        let dead_letter_record = Position {
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
        };
        let payload = record.payload().unwrap_or_default();
        let content_type = headers::get_str(record.headers(), headers::CONTENT_TYPE);
        match triage_proto::decode::<DeadLetter>(payload, content_type) {
            Ok(dead_letter) => Self::from_dead_letter(&dead_letter, dead_letter_record, settings),
            Err(error) => Self::undecodable(payload, &error, dead_letter_record, settings),
        }
    }

    pub fn from_dead_letter(
        dead_letter: &DeadLetter,
        dead_letter_record: Position,
        settings: &AlertSettings,
    ) -> Self {
        let class =
            ErrorClass::try_from(dead_letter.error_class).unwrap_or(ErrorClass::Unspecified);
        let original = Original::decode(dead_letter, settings);
        let replay_command = (!dead_letter.id.is_empty()).then(|| {
            format!(
                "{} --id {} --execute",
                settings.replay_command, dead_letter.id
            )
        });
        DeadLetterAlert {
            dead_letter_id: dead_letter.id.clone(),
            error_class: class.label().to_owned(),
            error_message: redact::excerpt(&dead_letter.error_message, 1000),
            ticket_id: dead_letter.ticket_id.clone(),
            tenant_id: dead_letter.tenant_id.clone(),
            source: Position {
                topic: dead_letter.source_topic.clone(),
                partition: dead_letter.source_partition,
                offset: dead_letter.source_offset,
            },
            attempts: dead_letter.attempts,
            first_failure_at: dead_letter.first_failure_at.as_ref().and_then(to_datetime),
            last_failure_at: dead_letter.last_failure_at.as_ref().and_then(to_datetime),
            failed_service: dead_letter.failed_service.clone(),
            trace_id: trace_id(&dead_letter.traceparent).to_owned(),
            excerpt: original.excerpt(&dead_letter.original_value, settings.excerpt_chars),
            replay_command,
            dead_letter_record,
            undecodable_size_bytes: None,
        }
    }

    /// A dead-letter record this stage failed on repeatedly: alerted with the reason, so that a
    /// person still hears of the dead letter it holds.
    pub fn unprocessable(record: &OwnedMessage, reason: String, settings: &AlertSettings) -> Self {
        let payload = record.payload().unwrap_or_default();
        let position = Position {
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
        };
        DeadLetterAlert {
            error_class: ErrorClass::Unprocessable.label().to_owned(),
            error_message: format!(
                "dlq-alerter could not process this dead-letter record ({} bytes): {reason}",
                payload.len()
            ),
            ..Self::raw(payload, position, settings)
        }
    }

    fn undecodable(
        payload: &[u8],
        error: &triage_proto::DecodeError,
        dead_letter_record: Position,
        settings: &AlertSettings,
    ) -> Self {
        DeadLetterAlert {
            error_class: ErrorClass::Decode.label().to_owned(),
            error_message: format!(
                "the record on the dead-letter topic is not a DeadLetter envelope ({} bytes): {error}",
                payload.len()
            ),
            ..Self::raw(payload, dead_letter_record, settings)
        }
    }

    /// An alert about a dead-letter record known only by its bytes and position.
    fn raw(payload: &[u8], dead_letter_record: Position, settings: &AlertSettings) -> Self {
        DeadLetterAlert {
            dead_letter_id: String::new(),
            error_class: String::new(),
            error_message: String::new(),
            ticket_id: String::new(),
            tenant_id: String::new(),
            source: dead_letter_record.clone(),
            attempts: 0,
            first_failure_at: None,
            last_failure_at: None,
            failed_service: String::new(),
            trace_id: String::new(),
            excerpt: raw_excerpt(payload, settings.excerpt_chars),
            replay_command: None,
            dead_letter_record,
            undecodable_size_bytes: Some(payload.len()),
        }
    }
}

/// The original record of a dead letter, decoded as far as it goes.
#[derive(Debug)]
pub enum Original {
    Task(Box<InferenceTask>),
    Ticket(Box<TicketCreated>),
    Unknown,
}

impl Original {
    /// Decodes the original value in the content type its own headers state. The message type
    /// is taken from its `ce_type` header, else from the topic it came from, else guessed:
    /// protobuf is lenient enough that a `TicketCreated` parses as an `InferenceTask`, so the
    /// guess comes last.
    pub fn decode(dead_letter: &DeadLetter, settings: &AlertSettings) -> Self {
        let content_type = original_header(dead_letter, headers::CONTENT_TYPE);
        let value = &dead_letter.original_value;
        let as_task = || {
            triage_proto::decode::<InferenceTask>(value, content_type)
                .ok()
                .map(|task| Original::Task(Box::new(task)))
        };
        let as_ticket = || {
            triage_proto::decode::<TicketCreated>(value, content_type)
                .ok()
                .map(|ticket| Original::Ticket(Box::new(ticket)))
        };
        let decoded = match original_header(dead_letter, headers::CE_TYPE) {
            Some(InferenceTask::MESSAGE_TYPE) => as_task(),
            Some(TicketCreated::MESSAGE_TYPE) => as_ticket(),
            Some(_) => None,
            None if dead_letter.source_topic == settings.inference_topic => as_task(),
            None if dead_letter.source_topic == settings.tickets_topic => as_ticket(),
            None => as_task().or_else(as_ticket),
        };
        decoded.unwrap_or(Original::Unknown)
    }

    /// The ticket's text as a person would read it: an inference task's last user message, or
    /// a ticket's subject and description; redacted and cut.
    pub fn excerpt(&self, raw: &[u8], max_chars: usize) -> String {
        match self {
            Original::Task(task) => {
                let last_user = task
                    .messages
                    .iter()
                    .rev()
                    .find(|m| m.role == "user")
                    .map(|m| m.content.as_str())
                    .unwrap_or_default();
                redact::excerpt(last_user, max_chars)
            }
            Original::Ticket(ticket) => redact::excerpt(
                &format!("{} — {}", ticket.subject, ticket.description),
                max_chars,
            ),
            Original::Unknown => raw_excerpt(raw, max_chars),
        }
    }
}

/// The first value of an original header, as text.
pub fn original_header<'a>(dead_letter: &'a DeadLetter, key: &str) -> Option<&'a str> {
    dead_letter
        .original_headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(key))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// Bytes that are text are shown as (redacted) text; anything else as hex.
fn raw_excerpt(raw: &[u8], max_chars: usize) -> String {
    match std::str::from_utf8(raw) {
        Ok(text) => redact::excerpt(text, max_chars),
        Err(_) => {
            let shown = raw.get(..max_chars / 2).unwrap_or(raw);
            redact::truncate(&format!("hex:{}", hex::encode(shown)), max_chars)
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), or "".
pub fn trace_id(traceparent: &str) -> &str {
    let mut parts = traceparent.split('-');
    match (parts.next(), parts.next()) {
        (Some(_version), Some(id)) if id.len() == 32 => id,
        _ => "",
    }
}

pub fn to_datetime(timestamp: &triage_proto::wkt::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(timestamp.seconds, timestamp.nanos.max(0) as u32)
}

pub fn format_time(time: Option<DateTime<Utc>>) -> String {
    time.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "unknown".into())
}

/// The failures of one error class folded into an aggregation window.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub error_class: String,
    /// How many failures were folded (not counting the one alerted in full).
    pub count: usize,
    pub window_seconds: f64,
    /// e.g. "37 more invalid_output failures in the last 5 minutes".
    pub headline: String,
    /// The first ticket ids, in arrival order.
    pub ticket_ids: Vec<String>,
    /// Distinct tenants affected, sorted, at most the configured number.
    pub tenants: Vec<String>,
    pub num_tenants: usize,
    /// Earliest and latest `last_failure_at` of the folded dead letters.
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Replays every folded dead letter (class and time range).
    pub replay_command: Option<String>,
}

impl Summary {
    pub fn headline(count: usize, class: &str, window: Duration) -> String {
        let noun = if count == 1 { "failure" } else { "failures" };
        format!(
            "{count} more {class} {noun} in the last {}",
            describe_window(window)
        )
    }
}

/// "5 minutes", "1 minute", "30 seconds", "250 ms".
pub fn describe_window(window: Duration) -> String {
    let plural = |n: u64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    let secs = window.as_secs();
    if window.subsec_nanos() == 0 && secs >= 60 && secs.is_multiple_of(60) {
        plural(secs / 60, "minute")
    } else if window.subsec_nanos() == 0 && secs > 0 {
        plural(secs, "second")
    } else {
        format!("{} ms", window.as_millis())
    }
}

/// What is sent to every output.
#[derive(Clone, Debug)]
pub enum Message {
    Alert(Box<DeadLetterAlert>),
    Summary(Summary),
}

#[cfg(test)]
mod tests {
    use triage_proto::{
        ContentType, encode,
        v1::{ChatMessage, RecordHeader},
    };

    use super::*;

    fn settings() -> AlertSettings {
        AlertSettings {
            excerpt_chars: 200,
            replay_command: "dlq-alerter replay".into(),
            tickets_topic: "events.tickets.created".into(),
            inference_topic: "tasks.llm.inference".into(),
        }
    }

    fn position() -> Position {
        Position {
            topic: "dlq.llm.failed".into(),
            partition: 0,
            offset: 7,
        }
    }

    fn header(key: &str, value: &str) -> RecordHeader {
        RecordHeader {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_task_shows_its_last_user_message_redacted() {
        let task = InferenceTask {
            ticket_id: "t-1".into(),
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: "You triage tickets".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "Refund please, mail me at a@b.com".into(),
                },
            ],
            ..Default::default()
        };
        for content_type in [ContentType::Protobuf, ContentType::Json] {
            let dead_letter = DeadLetter {
                id: "dl-1".into(),
                original_value: encode(&task, content_type),
                original_headers: vec![header("content-type", content_type.as_mime())],
                source_topic: "tasks.llm.inference".into(),
                error_class: ErrorClass::InvalidOutput as i32,
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                ..Default::default()
            };
            let alert = DeadLetterAlert::from_dead_letter(&dead_letter, position(), &settings());
            assert_eq!(alert.excerpt, "Refund please, mail me at [email]");
            assert_eq!(alert.error_class, "invalid_output");
            assert_eq!(alert.trace_id, "0af7651916cd43dd8448eb211c80319c");
            assert_eq!(
                alert.replay_command.as_deref(),
                Some("dlq-alerter replay --id dl-1 --execute")
            );
        }
    }

    #[test]
    fn a_ticket_shows_subject_and_description_and_its_ce_type_wins_over_the_topic() {
        let ticket = TicketCreated {
            subject: "Charged twice".into(),
            description: "Card 4111 1111 1111 1111, call +1 415 555 0123".into(),
            ..Default::default()
        };
        let dead_letter = DeadLetter {
            original_value: encode(&ticket, ContentType::Protobuf),
            original_headers: vec![
                header("content-type", ContentType::PROTOBUF_MIME),
                header("ce_type", TicketCreated::MESSAGE_TYPE),
            ],
            // A wrong topic must not make the bytes parse as a task.
            source_topic: "tasks.llm.inference".into(),
            ..Default::default()
        };
        let alert = DeadLetterAlert::from_dead_letter(&dead_letter, position(), &settings());
        assert_eq!(alert.excerpt, "Charged twice — Card [card], call [phone]");
    }

    #[test]
    fn bytes_that_are_no_dead_letter_still_make_a_decode_alert() {
        let record = OwnedMessage::new(
            Some(vec![0xff, 0x00, 0x13, 0x37]),
            None,
            "dlq.llm.failed".into(),
            rdkafka::Timestamp::NotAvailable,
            2,
            99,
            None,
        );
        let alert = DeadLetterAlert::from_record(&record, &settings());
        assert_eq!(alert.error_class, "decode");
        assert_eq!(alert.undecodable_size_bytes, Some(4));
        assert_eq!(alert.excerpt, "hex:ff001337");
        assert_eq!(alert.replay_command, None);
        assert_eq!(alert.dead_letter_record.offset, 99);
    }

    #[test]
    fn windows_read_like_people_talk() {
        assert_eq!(describe_window(Duration::from_secs(300)), "5 minutes");
        assert_eq!(describe_window(Duration::from_secs(60)), "1 minute");
        assert_eq!(describe_window(Duration::from_secs(90)), "90 seconds");
        assert_eq!(describe_window(Duration::from_millis(250)), "250 ms");
        assert_eq!(
            Summary::headline(37, "invalid_output", Duration::from_secs(300)),
            "37 more invalid_output failures in the last 5 minutes"
        );
    }
}
