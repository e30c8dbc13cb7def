//! Record headers: content type, message type, schema version, CloudEvents binary-mode
//! attributes (`ce_*`) and W3C trace context.
//!
//! Every record the pipeline produces carries all of them, so that any consumer (ours or a
//! team's own) can decode it without guessing and join its trace.

use std::{collections::HashMap, time::SystemTime};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use triage_proto::{ContentType, Contract, SCHEMA_VERSION};

pub const CONTENT_TYPE: &str = "content-type";
pub const SCHEMA_VERSION_HEADER: &str = "schema-version";
pub const CE_ID: &str = "ce_id";
pub const CE_TYPE: &str = "ce_type";
pub const CE_SOURCE: &str = "ce_source";
pub const CE_SPECVERSION: &str = "ce_specversion";
pub const CE_TIME: &str = "ce_time";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// Set on tasks re-published from the dead-letter queue; its value is the dead letter's id.
pub const REPLAY_OF: &str = "triage-replay-of";

/// The CloudEvents `source` of records produced by a service.
pub fn ce_source(service: &str) -> String {
    format!("/triage/{service}")
}

/// The headers of a record carrying `M`, with `context`'s trace injected.
pub fn for_message<M: Contract>(
    service: &str,
    content_type: ContentType,
    context: &opentelemetry::Context,
) -> OwnedHeaders {
    let event_id = uuid::Uuid::now_v7().to_string();
    let time = chrono::DateTime::<chrono::Utc>::from(SystemTime::now())
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let headers = OwnedHeaders::new_with_capacity(9)
        .insert(header(CONTENT_TYPE, content_type.as_mime()))
        .insert(header(CE_SPECVERSION, "1.0"))
        .insert(header(CE_TYPE, M::MESSAGE_TYPE))
        .insert(header(CE_ID, &event_id))
        .insert(header(CE_SOURCE, &ce_source(service)))
        .insert(header(CE_TIME, &time))
        .insert(header(SCHEMA_VERSION_HEADER, SCHEMA_VERSION));
    inject_trace_context(headers, context)
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Adds `traceparent` (and `tracestate` when non-empty) for `context`; a context without a valid
/// span adds nothing.
pub fn inject_trace_context(
    headers: OwnedHeaders,
    context: &opentelemetry::Context,
) -> OwnedHeaders {
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(context, &mut MapInjector(&mut carrier));
    let mut headers = headers;
    for key in [TRACEPARENT, TRACESTATE] {
        if let Some(value) = carrier.get(key).filter(|v| !v.is_empty()) {
            headers = headers.insert(header(key, value));
        }
    }
    headers
}

/// The remote parent context described by the record's `traceparent`/`tracestate`, or an empty
/// context when it has none.
pub fn extract_trace_context<H: Headers>(headers: Option<&H>) -> opentelemetry::Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => opentelemetry::Context::new(),
    }
}

/// The trace id of `context`'s remote span (32 lowercase hex digits, as in `traceparent` and
/// every trace UI), or `None` when it has no valid one.
pub fn trace_id(context: &opentelemetry::Context) -> Option<String> {
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The context to put in an outgoing record's headers: `span`'s, so that the consumer's span
/// becomes its child; or, when the span is disabled (no subscriber, a filtered level), the
/// caller's `parent`, so the trace still continues.
pub fn context_to_propagate(
    span: &tracing::Span,
    parent: &opentelemetry::Context,
) -> opentelemetry::Context {
    let context = span.context();
    if context.span().span_context().is_valid() {
        context
    } else {
        parent.clone()
    }
}

/// The first value of header `key` as UTF-8, if present and valid.
pub fn get_str<'a, H: Headers>(headers: Option<&'a H>, key: &str) -> Option<&'a str> {
    let headers = headers?;
    headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(key))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Copies headers for a dead-letter envelope, byte for byte.
pub fn to_record_headers<H: Headers>(headers: Option<&H>) -> Vec<triage_proto::v1::RecordHeader> {
    headers
        .map(|headers| {
            headers
                .iter()
                .map(|h| triage_proto::v1::RecordHeader {
                    key: h.key.to_owned(),
                    value: h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

struct MapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct HeaderExtractor<'a, H>(&'a H);

impl<H: Headers> Extractor for HeaderExtractor<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        get_str(Some(self.0), key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use triage_proto::v1::TicketCreated;

    use super::*;

    pub(crate) fn remote_context(trace_id: u128) -> opentelemetry::Context {
        let span_context = SpanContext::new(
            TraceId::from(trace_id),
            SpanId::from(0x00f0_67aa_0ba9_02b7),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        opentelemetry::Context::new().with_remote_span_context(span_context)
    }

    #[test]
    fn headers_carry_type_version_and_trace() {
        let headers =
            for_message::<TicketCreated>("ticket-publisher", ContentType::Json, &remote_context(7));
        assert_eq!(
            get_str(Some(&headers), CONTENT_TYPE),
            Some("application/json")
        );
        assert_eq!(
            get_str(Some(&headers), CE_TYPE),
            Some("ticketing.v1.TicketCreated")
        );
        assert_eq!(
            get_str(Some(&headers), CE_SOURCE),
            Some("/triage/ticket-publisher")
        );
        assert_eq!(get_str(Some(&headers), SCHEMA_VERSION_HEADER), Some("1"));
        assert_eq!(
            get_str(Some(&headers), TRACEPARENT),
            Some("00-00000000000000000000000000000007-00f067aa0ba902b7-01")
        );
        assert_eq!(get_str(Some(&headers), TRACESTATE), Some("vendor=x"));
        let extracted = extract_trace_context(Some(&headers));
        assert_eq!(
            extracted.span().span_context().trace_id(),
            TraceId::from(7u128)
        );
        assert_eq!(
            trace_id(&extracted).as_deref(),
            Some("00000000000000000000000000000007")
        );
    }

    #[test]
    fn no_span_means_no_trace_headers() {
        let headers = for_message::<TicketCreated>(
            "x",
            ContentType::Protobuf,
            &opentelemetry::Context::new(),
        );
        assert_eq!(get_str(Some(&headers), TRACEPARENT), None);
        assert_eq!(trace_id(&extract_trace_context(Some(&headers))), None);
        assert!(
            !extract_trace_context(Some(&headers))
                .span()
                .span_context()
                .is_valid()
        );
    }
}
