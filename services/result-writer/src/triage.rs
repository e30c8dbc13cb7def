//! A triage as the writer stores and serves it, and how an `InferenceResult` record becomes one.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use triage_proto::v1::InferenceResult;
use utoipa::ToSchema;

/// One triage before it is written: everything but `written_at`.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTriage {
    pub ticket_id: String,
    pub tenant_id: String,
    pub prompt_version: String,
    pub category: String,
    pub priority: String,
    pub suggested_reply: String,
    pub confidence: f64,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    pub ticket_created_at: Option<DateTime<Utc>>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub triaged_at: DateTime<Utc>,
    pub source_partition: i32,
    pub source_offset: i64,
    pub provider_note: String,
    pub subject: Option<String>,
    pub excerpt: Option<String>,
    pub trace_id: Option<String>,
    pub rate_limit_wait_ms: i32,
}

/// A stored triage, as the read API, the live stream and the webhooks show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Triage {
    pub ticket_id: String,
    pub tenant_id: String,
    /// Version of the prompt that produced it; a ticket has one row per prompt version.
    pub prompt_version: String,
    pub category: String,
    pub priority: String,
    pub suggested_reply: String,
    pub confidence: f64,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    pub ticket_created_at: Option<DateTime<Utc>>,
    /// When ticket-publisher accepted the ticket.
    pub accepted_at: Option<DateTime<Utc>>,
    /// When the model's answer was validated; a later triage replaces an earlier one.
    pub triaged_at: DateTime<Utc>,
    pub source_partition: i32,
    pub source_offset: i64,
    /// Set when the answer came from a simulator, not a real model.
    pub provider_note: String,
    /// The ticket's subject; absent for results from before it was carried.
    pub subject: Option<String>,
    /// The start of the ticket's description (at most 280 characters); absent like `subject`.
    pub excerpt: Option<String>,
    /// The W3C trace id (32 hex digits) of the result record's trace context, for a link to the
    /// trace UI; absent when the record carried none.
    pub trace_id: Option<String>,
    /// How long the task waited for rate limits (the shared budget, the tenant's quota, provider
    /// 429s) before its answer, in milliseconds; 0 for rows written before it was recorded.
    pub rate_limit_wait_ms: i32,
    /// When the row was (last) written.
    pub written_at: DateTime<Utc>,
}

impl Triage {
    pub fn written(new: NewTriage, written_at: DateTime<Utc>) -> Self {
        Triage {
            ticket_id: new.ticket_id,
            tenant_id: new.tenant_id,
            prompt_version: new.prompt_version,
            category: new.category,
            priority: new.priority,
            suggested_reply: new.suggested_reply,
            confidence: new.confidence,
            model: new.model,
            prompt_tokens: new.prompt_tokens,
            completion_tokens: new.completion_tokens,
            cost_usd: new.cost_usd,
            ticket_created_at: new.ticket_created_at,
            accepted_at: new.accepted_at,
            triaged_at: new.triaged_at,
            source_partition: new.source_partition,
            source_offset: new.source_offset,
            provider_note: new.provider_note,
            subject: new.subject,
            excerpt: new.excerpt,
            trace_id: new.trace_id,
            rate_limit_wait_ms: new.rate_limit_wait_ms,
            written_at,
        }
    }
}

/// Why a decoded result cannot be stored; it is dead-lettered as an invalid event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidResult {
    #[error("the result has no ticket_id")]
    NoTicketId,
    #[error("the result has no tenant_id")]
    NoTenantId,
    #[error("field {0} contains a NUL character, which PostgreSQL text cannot hold")]
    NulCharacter(&'static str),
    #[error("the result has no triaged_at and the record no timestamp")]
    NoTriagedAt,
}

/// Where a result record came from.
#[derive(Clone, Debug)]
pub struct Source {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, used when the result lacks `triaged_at`.
    pub timestamp: Option<DateTime<Utc>>,
    /// The trace id of the record's `traceparent`, when it has a valid one.
    pub trace_id: Option<String>,
}

impl NewTriage {
    /// Checks a decoded result and turns it into a row.
    pub fn from_result(result: InferenceResult, source: Source) -> Result<Self, InvalidResult> {
        if result.ticket_id.is_empty() {
            return Err(InvalidResult::NoTicketId);
        }
        if result.tenant_id.is_empty() {
            return Err(InvalidResult::NoTenantId);
        }
        for (field, value) in [
            ("ticket_id", &result.ticket_id),
            ("tenant_id", &result.tenant_id),
            ("prompt_version", &result.prompt_version),
            ("category", &result.category),
            ("priority", &result.priority),
            ("suggested_reply", &result.suggested_reply),
            ("model", &result.model),
            ("provider_note", &result.provider_note),
        ] {
            if value.contains('\0') {
                return Err(InvalidResult::NulCharacter(field));
            }
        }
        let triaged_at = result
            .triaged_at
            .as_ref()
            .and_then(to_datetime)
            .or(source.timestamp.map(|t| t.trunc_subsecs(6)))
            .ok_or(InvalidResult::NoTriagedAt)?;
        let usage = result.usage.unwrap_or_default();
        Ok(NewTriage {
            ticket_created_at: result.ticket_created_at.as_ref().and_then(to_datetime),
            accepted_at: result.accepted_at.as_ref().and_then(to_datetime),
            triaged_at,
            ticket_id: result.ticket_id,
            tenant_id: result.tenant_id,
            prompt_version: result.prompt_version,
            category: result.category,
            priority: result.priority,
            suggested_reply: result.suggested_reply,
            confidence: result.confidence,
            model: result.model,
            prompt_tokens: i64::from(usage.prompt_tokens),
            completion_tokens: i64::from(usage.completion_tokens),
            cost_usd: result.cost_usd,
            source_partition: source.partition,
            source_offset: source.offset,
            provider_note: result.provider_note,
            subject: display_text(result.subject),
            excerpt: display_text(result.excerpt),
            trace_id: source.trace_id,
            // PostgreSQL's integer is signed: past 24 days (which no wait reaches) it saturates.
            rate_limit_wait_ms: i32::try_from(result.rate_limit_wait_ms).unwrap_or(i32::MAX),
        })
    }

    /// The row's primary key: (tenant, ticket, prompt version).
    pub fn key(&self) -> (&str, &str, &str) {
        (&self.tenant_id, &self.ticket_id, &self.prompt_version)
    }
}

/// Text shown, never matched on: empty means absent, and a NUL (which PostgreSQL text cannot
/// hold) is dropped rather than costing the triage.
fn display_text(text: String) -> Option<String> {
    if text.is_empty() {
        None
    } else if text.contains('\0') {
        Some(text.replace('\0', ""))
    } else {
        Some(text)
    }
}

/// A protobuf timestamp at PostgreSQL's precision (microseconds), so that what is compared in
/// memory is what is compared in the table.
pub fn to_datetime(timestamp: &triage_proto::wkt::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos).map(|t| t.trunc_subsecs(6))
}

#[cfg(test)]
mod tests {
    use triage_proto::v1::TokenUsage;

    use super::*;

    fn source() -> Source {
        Source {
            partition: 2,
            offset: 41,
            timestamp: DateTime::from_timestamp(1_700_000_000, 0),
            trace_id: None,
        }
    }

    #[test]
    fn subject_excerpt_and_trace_id_are_kept_and_empty_means_absent() {
        let result = InferenceResult {
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            subject: "Charged twice".into(),
            excerpt: "My card\0 was charged".into(),
            ..Default::default()
        };
        let traced = Source {
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            ..source()
        };
        let row = NewTriage::from_result(result.clone(), traced).unwrap();
        assert_eq!(row.subject.as_deref(), Some("Charged twice"));
        assert_eq!(row.excerpt.as_deref(), Some("My card was charged"));
        assert_eq!(
            row.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let old = InferenceResult {
            subject: String::new(),
            excerpt: String::new(),
            ..result
        };
        let row = NewTriage::from_result(old, source()).unwrap();
        assert_eq!((row.subject, row.excerpt, row.trace_id), (None, None, None));
    }

    #[test]
    fn a_result_becomes_a_row_at_microsecond_precision() {
        let result = InferenceResult {
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            prompt_version: "v3".into(),
            usage: Some(TokenUsage {
                prompt_tokens: 120,
                completion_tokens: 30,
                total_tokens: 150,
            }),
            triaged_at: Some(triage_proto::wkt::Timestamp {
                seconds: 1_700_000_100,
                nanos: 123_456_789,
            }),
            ..Default::default()
        };
        let row = NewTriage::from_result(result, source()).unwrap();
        assert_eq!(row.key(), ("acme", "t-1", "v3"));
        assert_eq!(row.prompt_tokens, 120);
        assert_eq!(row.triaged_at.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!((row.source_partition, row.source_offset), (2, 41));
        assert_eq!(
            row.rate_limit_wait_ms, 0,
            "an older worker's result waited 0"
        );
        let waited = InferenceResult {
            ticket_id: "t-2".into(),
            tenant_id: "acme".into(),
            rate_limit_wait_ms: 1_250,
            ..Default::default()
        };
        assert_eq!(
            NewTriage::from_result(waited, source())
                .unwrap()
                .rate_limit_wait_ms,
            1_250
        );
        let absurd = InferenceResult {
            ticket_id: "t-3".into(),
            tenant_id: "acme".into(),
            rate_limit_wait_ms: u32::MAX,
            ..Default::default()
        };
        assert_eq!(
            NewTriage::from_result(absurd, source())
                .unwrap()
                .rate_limit_wait_ms,
            i32::MAX
        );
    }

    #[test]
    fn missing_triaged_at_falls_back_to_the_record_timestamp() {
        let result = InferenceResult {
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            ..Default::default()
        };
        let row = NewTriage::from_result(result.clone(), source()).unwrap();
        assert_eq!(Some(row.triaged_at), source().timestamp);
        let no_timestamp = Source {
            timestamp: None,
            ..source()
        };
        assert_eq!(
            NewTriage::from_result(result, no_timestamp),
            Err(InvalidResult::NoTriagedAt)
        );
    }

    #[test]
    fn results_that_cannot_be_stored_are_refused() {
        let base = InferenceResult {
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            ..Default::default()
        };
        let no_ticket = InferenceResult {
            ticket_id: String::new(),
            ..base.clone()
        };
        assert_eq!(
            NewTriage::from_result(no_ticket, source()),
            Err(InvalidResult::NoTicketId)
        );
        let no_tenant = InferenceResult {
            tenant_id: String::new(),
            ..base.clone()
        };
        assert_eq!(
            NewTriage::from_result(no_tenant, source()),
            Err(InvalidResult::NoTenantId)
        );
        let nul = InferenceResult {
            suggested_reply: "a\0b".into(),
            ..base
        };
        assert_eq!(
            NewTriage::from_result(nul, source()),
            Err(InvalidResult::NulCharacter("suggested_reply"))
        );
    }
}
