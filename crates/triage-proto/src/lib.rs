//! The pipeline's message contracts (`proto/ticketing/v1`) as prost types, their proto3 JSON
//! form, and the one codec that turns either wire form back into a message.
//!
//! # Layout
//! - [`v1`]: generated messages, enums and the `TicketIngest` gRPC service.
//! - [`Contract`]: what every message on a topic knows about itself (CloudEvents type, schema
//!   version).
//! - [`ContentType`], [`encode`], [`decode`]: protobuf or JSON, chosen by the record's
//!   `content-type` header.

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

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ticketing.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/ticketing.v1.serde.rs"));
}

use std::fmt;

use prost::Message;

pub use pbjson_types as wkt;

/// The schema version every record states in its `schema-version` header. Bump it only for an
/// incompatible change; additive changes to the protobuf schema keep it.
pub const SCHEMA_VERSION: &str = "1";

/// A message that travels on a Kafka topic as a whole record value.
pub trait Contract: Message + Default + serde::Serialize + serde::de::DeserializeOwned {
    /// Fully qualified protobuf name, used as the CloudEvents `ce_type`.
    const MESSAGE_TYPE: &'static str;
}

impl Contract for v1::TicketCreated {
    const MESSAGE_TYPE: &'static str = "ticketing.v1.TicketCreated";
}
impl Contract for v1::InferenceTask {
    const MESSAGE_TYPE: &'static str = "ticketing.v1.InferenceTask";
}
impl Contract for v1::InferenceResult {
    const MESSAGE_TYPE: &'static str = "ticketing.v1.InferenceResult";
}
impl Contract for v1::DeadLetter {
    const MESSAGE_TYPE: &'static str = "ticketing.v1.DeadLetter";
}

/// The two wire forms of a contract message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Protobuf,
    Json,
}

impl ContentType {
    pub const PROTOBUF_MIME: &'static str = "application/x-protobuf";
    pub const JSON_MIME: &'static str = "application/json";

    pub fn as_mime(self) -> &'static str {
        match self {
            ContentType::Protobuf => Self::PROTOBUF_MIME,
            ContentType::Json => Self::JSON_MIME,
        }
    }

    /// Parses a `content-type` header value; parameters such as `; charset=utf-8` are ignored.
    pub fn from_mime(mime: &str) -> Option<Self> {
        let essence = mime.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case(Self::PROTOBUF_MIME)
            || essence.eq_ignore_ascii_case("application/protobuf")
        {
            Some(ContentType::Protobuf)
        } else if essence.eq_ignore_ascii_case(Self::JSON_MIME)
            || essence.eq_ignore_ascii_case("application/cloudevents+json")
        {
            Some(ContentType::Json)
        } else {
            None
        }
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_mime())
    }
}

/// Why a record value is not the message it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content type {0:?}; expected application/x-protobuf or application/json")]
    UnsupportedContentType(String),
    #[error("invalid protobuf for {message_type}: {source}")]
    Protobuf {
        message_type: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("invalid JSON for {message_type}: {source}")]
    Json {
        message_type: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("record has no value")]
    Empty,
}

/// Encodes a message in the given wire form.
pub fn encode<M: Contract>(message: &M, content_type: ContentType) -> Vec<u8> {
    match content_type {
        ContentType::Protobuf => message.encode_to_vec(),
        // Serialising generated pbjson types cannot fail: every field maps to JSON.
        // pbjson's serialisers of our own generated types write to a Vec and cannot fail.
        #[allow(clippy::expect_used)]
        ContentType::Json => serde_json::to_vec(message).expect("pbjson types serialise"),
    }
}

/// Decodes a record value. Without a `content-type` header the value is taken as JSON when it
/// starts with `{` (outside producers often omit headers) and as protobuf otherwise.
pub fn decode<M: Contract>(value: &[u8], content_type: Option<&str>) -> Result<M, DecodeError> {
    if value.is_empty() {
        return Err(DecodeError::Empty);
    }
    let content_type = match content_type {
        Some(mime) => ContentType::from_mime(mime)
            .ok_or_else(|| DecodeError::UnsupportedContentType(mime.to_owned()))?,
        None if value.first() == Some(&b'{') => ContentType::Json,
        None => ContentType::Protobuf,
    };
    match content_type {
        ContentType::Protobuf => M::decode(value).map_err(|source| DecodeError::Protobuf {
            message_type: M::MESSAGE_TYPE,
            source,
        }),
        ContentType::Json => serde_json::from_slice(value).map_err(|source| DecodeError::Json {
            message_type: M::MESSAGE_TYPE,
            source,
        }),
    }
}

impl v1::ErrorClass {
    /// The short lowercase name used in metrics labels, alerts and replay filters.
    pub fn label(self) -> &'static str {
        match self {
            v1::ErrorClass::Unspecified => "unspecified",
            v1::ErrorClass::Decode => "decode",
            v1::ErrorClass::InvalidRequest => "invalid_request",
            v1::ErrorClass::ContentFilter => "content_filter",
            v1::ErrorClass::ContextLength => "context_length",
            v1::ErrorClass::InvalidOutput => "invalid_output",
            v1::ErrorClass::RetriesExhausted => "retries_exhausted",
            v1::ErrorClass::InvalidEvent => "invalid_event",
            v1::ErrorClass::Unprocessable => "unprocessable",
        }
    }

    /// Inverse of [`label`](Self::label), for filters typed by people.
    pub fn from_label(label: &str) -> Option<Self> {
        [
            v1::ErrorClass::Decode,
            v1::ErrorClass::InvalidRequest,
            v1::ErrorClass::ContentFilter,
            v1::ErrorClass::ContextLength,
            v1::ErrorClass::InvalidOutput,
            v1::ErrorClass::RetriesExhausted,
            v1::ErrorClass::InvalidEvent,
            v1::ErrorClass::Unprocessable,
        ]
        .into_iter()
        .find(|class| class.label() == label)
    }
}

/// The categories a triage chooses from unless the dispatch stage is configured otherwise.
pub const DEFAULT_CATEGORIES: [&str; 6] = [
    "billing",
    "outage",
    "login",
    "bug",
    "feature_request",
    "other",
];
/// The priorities a triage chooses from unless the dispatch stage is configured otherwise.
pub const DEFAULT_PRIORITIES: [&str; 4] = ["urgent", "high", "normal", "low"];

impl v1::Taxonomy {
    /// [`DEFAULT_CATEGORIES`] and [`DEFAULT_PRIORITIES`].
    pub fn pipeline_default() -> Self {
        v1::Taxonomy {
            categories: DEFAULT_CATEGORIES.map(String::from).to_vec(),
            priorities: DEFAULT_PRIORITIES.map(String::from).to_vec(),
        }
    }
}

/// The key that makes sure nobody pays twice for the same inference, and the one rule for every
/// identity derived from it (the worker's result cache and in-flight lease, the `Idempotency-Key`
/// sent to the provider): the same tenant, ticket, prompt version and model always give the same
/// key, whichever replica or replay computes it.
///
/// The tenant is part of it because ticket ids are the helpdesk's own: two tenants may both have a
/// ticket `42`, and one tenant's paid answer must never be served to the other. Fields are
/// separated by a byte that cannot occur in any of them (ASCII unit separator) so that
/// `("a", "bc")` and `("ab", "c")` differ.
pub fn idempotency_key(
    tenant_id: &str,
    ticket_id: &str,
    prompt_version: &str,
    model: &str,
) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (index, part) in [tenant_id, ticket_id, prompt_version, model]
        .into_iter()
        .enumerate()
    {
        if index > 0 {
            hasher.update([0x1f]);
        }
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The first second protobuf's `Timestamp` may hold: 0001-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// The last second protobuf's `Timestamp` may hold: 9999-12-31T23:59:59Z.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A timestamp field that no stage can store or compute with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field} is outside the range of a timestamp (0001-01-01 to 9999-12-31): seconds {seconds}, nanos {nanos}"
)]
pub struct TimestampOutOfRange {
    pub field: &'static str,
    pub seconds: i64,
    pub nanos: i32,
}

/// The one rule for timestamps from outside: protobuf's own valid range. The wire format carries
/// any int64, so a careless producer can send the year -10,700; PostgreSQL refuses it, and
/// `SystemTime` arithmetic on it overflows. Every value within this range fits PostgreSQL's
/// `timestamptz`, chrono and `SystemTime`, so a record that passes is storable downstream.
pub fn check_timestamp(
    field: &'static str,
    timestamp: &wkt::Timestamp,
) -> Result<(), TimestampOutOfRange> {
    let in_range = (MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds)
        && (0..1_000_000_000).contains(&timestamp.nanos);
    if in_range {
        Ok(())
    } else {
        Err(TimestampOutOfRange {
            field,
            seconds: timestamp.seconds,
            nanos: timestamp.nanos,
        })
    }
}

/// A contract message's timestamp fields, for [`check_timestamps`].
pub trait Timestamps {
    fn timestamps(&self) -> Vec<(&'static str, Option<&wkt::Timestamp>)>;
}

impl Timestamps for v1::TicketCreated {
    fn timestamps(&self) -> Vec<(&'static str, Option<&wkt::Timestamp>)> {
        vec![
            ("created_at", self.created_at.as_ref()),
            ("accepted_at", self.accepted_at.as_ref()),
        ]
    }
}

impl Timestamps for v1::InferenceTask {
    fn timestamps(&self) -> Vec<(&'static str, Option<&wkt::Timestamp>)> {
        vec![
            ("ticket_created_at", self.ticket_created_at.as_ref()),
            ("accepted_at", self.accepted_at.as_ref()),
            ("dispatched_at", self.dispatched_at.as_ref()),
        ]
    }
}

impl Timestamps for v1::InferenceResult {
    fn timestamps(&self) -> Vec<(&'static str, Option<&wkt::Timestamp>)> {
        vec![
            ("ticket_created_at", self.ticket_created_at.as_ref()),
            ("accepted_at", self.accepted_at.as_ref()),
            ("triaged_at", self.triaged_at.as_ref()),
        ]
    }
}

impl Timestamps for v1::DeadLetter {
    fn timestamps(&self) -> Vec<(&'static str, Option<&wkt::Timestamp>)> {
        vec![
            ("first_failure_at", self.first_failure_at.as_ref()),
            ("last_failure_at", self.last_failure_at.as_ref()),
        ]
    }
}

/// Checks every timestamp `message` carries with [`check_timestamp`]; absent ones pass.
pub fn check_timestamps<M: Timestamps>(message: &M) -> Result<(), TimestampOutOfRange> {
    message
        .timestamps()
        .into_iter()
        .filter_map(|(field, timestamp)| timestamp.map(|timestamp| (field, timestamp)))
        .try_for_each(|(field, timestamp)| check_timestamp(field, timestamp))
}

/// A protobuf timestamp as a `SystemTime`; `None` outside [`check_timestamp`]'s range, so no
/// caller's arithmetic can overflow on a producer's value.
pub fn to_system_time(timestamp: &wkt::Timestamp) -> Option<std::time::SystemTime> {
    check_timestamp("timestamp", timestamp).ok()?;
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    let since_epoch = |seconds: i64| std::time::Duration::new(seconds.unsigned_abs(), 0);
    let whole = if timestamp.seconds >= 0 {
        std::time::UNIX_EPOCH.checked_add(since_epoch(timestamp.seconds))
    } else {
        std::time::UNIX_EPOCH.checked_sub(since_epoch(timestamp.seconds))
    }?;
    whole.checked_add(std::time::Duration::from_nanos(u64::from(nanos)))
}

/// The key under which one ticket's records are ordered by a consumer (the worker handles tasks
/// with the same key one after the other): tenant and ticket, since ticket ids repeat across
/// tenants. Length-prefixed so that no two (tenant, ticket) pairs share a key.
pub fn ticket_ordering_key(tenant_id: &str, ticket_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + tenant_id.len() + ticket_id.len());
    key.extend_from_slice(&(tenant_id.len() as u64).to_be_bytes());
    key.extend_from_slice(tenant_id.as_bytes());
    key.extend_from_slice(ticket_id.as_bytes());
    key
}

/// Converts a `SystemTime` into a protobuf timestamp.
pub fn timestamp(time: std::time::SystemTime) -> wkt::Timestamp {
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    wkt::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::*;

    #[test]
    fn timestamps_outside_protobufs_range_are_refused_by_name() {
        let at = |seconds, nanos| wkt::Timestamp { seconds, nanos };
        assert!(check_timestamp("t", &at(MIN_TIMESTAMP_SECONDS, 0)).is_ok());
        assert!(check_timestamp("t", &at(MAX_TIMESTAMP_SECONDS, 999_999_999)).is_ok());
        // The year -10,700 an application once published.
        let ancient = TicketCreated {
            created_at: Some(at(-399_822_624_000, 0)),
            ..Default::default()
        };
        let error = check_timestamps(&ancient).unwrap_err();
        assert_eq!(error.field, "created_at");
        for (seconds, nanos) in [
            (MIN_TIMESTAMP_SECONDS - 1, 0),
            (MAX_TIMESTAMP_SECONDS + 1, 0),
            (0, -1),
            (0, 1_000_000_000),
            (i64::MIN, i32::MIN),
            (i64::MAX, i32::MAX),
        ] {
            assert!(check_timestamp("t", &at(seconds, nanos)).is_err());
            assert_eq!(to_system_time(&at(seconds, nanos)), None);
        }
        let before_epoch = to_system_time(&at(-1, 500_000_000)).unwrap();
        assert_eq!(
            std::time::UNIX_EPOCH.duration_since(before_epoch).unwrap(),
            std::time::Duration::from_millis(500)
        );
    }

    fn sample_dead_letter() -> DeadLetter {
        DeadLetter {
            id: "dl-1".into(),
            original_key: b"t-1".to_vec(),
            original_value: vec![0, 159, 146, 150],
            original_headers: vec![RecordHeader {
                key: "content-type".into(),
                value: b"application/json".to_vec(),
            }],
            source_topic: "tasks.llm.inference".into(),
            source_partition: 3,
            source_offset: 42,
            error_class: ErrorClass::InvalidOutput as i32,
            error_message: "not json".into(),
            attempts: 2,
            first_failure_at: Some(timestamp(std::time::SystemTime::now())),
            last_failure_at: Some(timestamp(std::time::SystemTime::now())),
            failed_service: "inference-worker".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: String::new(),
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            original_value_size: 4,
            original_value_truncated: false,
        }
    }

    #[test]
    fn json_form_follows_proto3_mapping() {
        let json = String::from_utf8(encode(&sample_dead_letter(), ContentType::Json)).unwrap();
        // proto3 JSON: lowerCamelCase names, bytes as base64, int64 as strings, enums by name.
        assert!(json.contains(r#""sourceOffset":"42""#), "{json}");
        assert!(json.contains(r#""originalValue":"AJ+Slg==""#), "{json}");
        assert!(
            json.contains(r#""errorClass":"ERROR_CLASS_INVALID_OUTPUT""#),
            "{json}"
        );
    }

    #[test]
    fn every_message_round_trips_in_both_forms() {
        fn round_trip<M: Contract + PartialEq + fmt::Debug>(message: M) {
            for content_type in [ContentType::Protobuf, ContentType::Json] {
                let bytes = encode(&message, content_type);
                let decoded: M = decode(&bytes, Some(content_type.as_mime())).unwrap();
                assert_eq!(decoded, message, "{content_type}");
            }
        }
        round_trip(sample_dead_letter());
        round_trip(TicketCreated {
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            subject: "Refund".into(),
            description: "I was charged twice".into(),
            customer: Some(Customer {
                id: "c-9".into(),
                email: Some("a@example.com".into()),
                tier: None,
            }),
            metadata: Some(wkt::Struct {
                fields: [(
                    "plan".to_string(),
                    wkt::Value {
                        kind: Some(wkt::value::Kind::StringValue("pro".into())),
                    },
                )]
                .into(),
            }),
            created_at: Some(timestamp(std::time::SystemTime::now())),
            ..Default::default()
        });
        round_trip(InferenceTask {
            ticket_id: "t-1".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            taxonomy: Some(Taxonomy {
                categories: vec!["billing".into()],
                priorities: vec!["p1".into()],
            }),
            ..Default::default()
        });
        round_trip(InferenceResult {
            ticket_id: "t-1".into(),
            confidence: 0.75,
            usage: Some(TokenUsage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
            }),
            ..Default::default()
        });
    }

    #[test]
    fn missing_content_type_is_sniffed_and_unknown_one_is_refused() {
        let task = InferenceTask {
            ticket_id: "t-2".into(),
            ..Default::default()
        };
        let json = encode(&task, ContentType::Json);
        assert_eq!(decode::<InferenceTask>(&json, None).unwrap(), task);
        let err = decode::<InferenceTask>(&json, Some("text/plain")).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedContentType(_)));
        assert!(matches!(
            decode::<InferenceTask>(b"{not json", None),
            Err(DecodeError::Json { .. })
        ));
        assert!(matches!(
            decode::<InferenceTask>(&[], None),
            Err(DecodeError::Empty)
        ));
    }

    #[test]
    fn idempotency_key_depends_on_every_part_and_its_boundaries() {
        let key = idempotency_key("acme", "t-1", "triage-v1", "gpt-4o-mini");
        assert_eq!(key.len(), 64);
        assert_eq!(
            key,
            idempotency_key("acme", "t-1", "triage-v1", "gpt-4o-mini")
        );
        assert_ne!(
            key,
            idempotency_key("globex", "t-1", "triage-v1", "gpt-4o-mini")
        );
        assert_ne!(
            key,
            idempotency_key("acme", "t-2", "triage-v1", "gpt-4o-mini")
        );
        assert_ne!(
            key,
            idempotency_key("acme", "t-1", "triage-v2", "gpt-4o-mini")
        );
        assert_ne!(key, idempotency_key("acme", "t-1", "triage-v1", "gpt-4o"));
        assert_ne!(
            idempotency_key("t", "a", "bc", "m"),
            idempotency_key("t", "ab", "c", "m")
        );
        assert_ne!(
            idempotency_key("ac", "me1", "v", "m"),
            idempotency_key("acme", "1", "v", "m")
        );
    }

    #[test]
    fn ordering_key_separates_tenants_sharing_a_ticket_id() {
        assert_eq!(
            ticket_ordering_key("acme", "t-1"),
            ticket_ordering_key("acme", "t-1")
        );
        assert_ne!(
            ticket_ordering_key("acme", "t-1"),
            ticket_ordering_key("globex", "t-1")
        );
        assert_ne!(
            ticket_ordering_key("ab", "c"),
            ticket_ordering_key("a", "bc")
        );
    }

    #[test]
    fn error_class_labels_are_a_closed_set() {
        for class in [ErrorClass::Decode, ErrorClass::RetriesExhausted] {
            assert_eq!(ErrorClass::from_label(class.label()), Some(class));
        }
        assert_eq!(ErrorClass::from_label("nope"), None);
    }
}
