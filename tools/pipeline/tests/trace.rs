//! One OpenTelemetry trace per ticket: the five services run as processes exporting OTLP/HTTP to
//! a receiver in this test; the spans of one ticket must form one connected trace across
//! ticket-publisher (ingress and dispatch), inference-worker (with the gen_ai LLM-call span) and
//! result-writer.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
};
use pipeline::{Options, Pipeline};
use prost::Message;
use serde_json::json;
use triage_test_support::wait_until;

#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

async fn receive(State(spans): State<Spans>, body: Bytes) -> &'static [u8] {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    let mut spans = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| attribute(&resource.attributes, "service.name"))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                spans.push(Span {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: span.trace_id.clone(),
                    span_id: span.span_id.clone(),
                    parent_span_id: span.parent_span_id.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
    }
    b""
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value_text(kv.value.as_ref()))
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_of_one_ticket_form_one_connected_trace_across_the_services() {
    let spans: Spans = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(Arc::clone(&spans));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut options = Options::new(Some("trace"));
    options.otlp_endpoint = Some(endpoint);
    let pipeline = Pipeline::start(options).await.expect("pipeline starts");
    let ticket_id = format!("trace-{}", uuid_suffix());
    let ticket = json!({
        "ticket_id": ticket_id,
        "subject": "Charged twice",
        "description": "My card was charged twice for the March invoice.",
        "customer": {"id": "c-1"},
    });
    let (status, _) = pipeline.submit(&ticket, None).await.unwrap();
    assert_eq!(status, 202);
    wait_until("the ticket triaged", Duration::from_secs(60), || async {
        pipeline.triage(&ticket_id).await.unwrap()
    })
    .await;
    // SIGTERM flushes every service's batched spans.
    pipeline.stop().await.expect("clean stop");

    let spans = spans.lock().unwrap().clone();
    let by_trace: HashMap<Vec<u8>, Vec<&Span>> =
        spans.iter().fold(HashMap::new(), |mut map, span| {
            map.entry(span.trace_id.clone()).or_default().push(span);
            map
        });
    let (_, trace) = by_trace
        .iter()
        .find(|(_, spans)| {
            spans
                .iter()
                .any(|s| s.attributes.values().any(|v| v == &ticket_id))
        })
        .unwrap_or_else(|| {
            panic!(
                "no span names ticket {ticket_id}; spans: {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name))
                    .collect::<Vec<_>>()
            )
        });
    let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    let summary: Vec<_> = trace
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    for service in ["ticket-publisher", "inference-worker", "result-writer"] {
        assert!(
            services.contains(service),
            "{service} missing from the ticket's trace: {summary:?}"
        );
    }
    let ids: HashSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    let roots: Vec<_> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {summary:?}");
    for span in trace.iter().filter(|s| !s.parent_span_id.is_empty()) {
        assert!(
            ids.contains(span.parent_span_id.as_slice()),
            "{} / {} has a parent outside the trace: {summary:?}",
            span.service,
            span.name
        );
    }
    let llm_call = trace
        .iter()
        .find(|s| s.attributes.contains_key("gen_ai.request.model"))
        .unwrap_or_else(|| panic!("no gen_ai span: {summary:?}"));
    assert_eq!(llm_call.attributes["gen_ai.request.model"], "gpt-4o-mini");
    assert!(
        llm_call
            .attributes
            .get("gen_ai.usage.input_tokens")
            .is_some_and(|t| t.parse::<u64>().unwrap_or(0) > 0)
    );
    assert!(
        llm_call
            .attributes
            .get("gen_ai.usage.output_tokens")
            .is_some_and(|t| t.parse::<u64>().unwrap_or(0) > 0)
    );
    assert!(
        trace.iter().any(|s| s
            .attributes
            .get("messaging.system")
            .is_some_and(|v| v == "kafka")),
        "messaging attributes on the Kafka spans: {summary:?}"
    );
}

fn uuid_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}
