//! Property tests of request decoding: arbitrary bytes and arbitrary JSON never panic, invalid
//! input is always a 4xx problem, and nothing invalid reaches Kafka.

mod common;

use std::time::Duration;

use common::*;
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config as RunnerConfig, TestRunner},
};
use serde_json::{Map, Value};
use ticket_publisher::ticket::{self, Limits};
use triage_test_support::{TestContext, consumer, read_for, read_records};

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(24, 256, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Mostly the ticket's own field names, so that generated objects get past "unknown field".
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "ticket_id",
            "subject",
            "description",
            "customer",
            "id",
            "email",
            "tier",
            "channel",
            "language",
            "metadata",
            "created_at",
            "tenant_id",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,12}",
    ]
}

/// A valid ticket with one field replaced by arbitrary JSON.
fn mutated_ticket() -> impl Strategy<Value = Value> {
    (field_name(), arbitrary_json()).prop_map(|(field, value)| {
        let mut ticket = valid_ticket("mutated");
        ticket[field.as_str()] = value;
        ticket
    })
}

fn is_client_error(status: u16) -> bool {
    [400, 413, 415, 422].contains(&status)
}

proptest! {
    // 512 cases in make test; PROPTEST_CASES (make fuzz) runs more.
    #![proptest_config(RunnerConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(512)))]

    #[test]
    fn arbitrary_bytes_never_panic_and_invalid_is_4xx(
        body in prop::collection::vec(any::<u8>(), 0..512),
        content_type in prop::option::of(prop::sample::select(vec!["application/json", "text/plain", "application/x-protobuf", ""])),
    ) {
        match ticket::decode_http(content_type, &body, &Limits::default()) {
            Ok(valid) => prop_assert!(!valid.ticket_id().is_empty()),
            Err(error) => prop_assert!(is_client_error(error.http_status().as_u16()), "{error:?}"),
        }
    }

    #[test]
    fn arbitrary_json_never_panics_and_accepted_tickets_meet_the_rules(value in prop_oneof![arbitrary_json(), mutated_ticket()]) {
        let body = value.to_string();
        match ticket::decode_http(Some("application/json"), body.as_bytes(), &Limits::default()) {
            Ok(valid) => {
                let event = valid.into_event("acme");
                prop_assert!(!event.subject.trim().is_empty());
                prop_assert!(!event.description.trim().is_empty());
                prop_assert!(!event.customer.unwrap().id.trim().is_empty());
                prop_assert_eq!(event.tenant_id, "acme");
            }
            Err(error) => {
                prop_assert!(is_client_error(error.http_status().as_u16()), "{error:?}");
                let problem = error.problem();
                prop_assert!(!problem.detail.is_empty());
            }
        }
    }
}

/// Through the real router and broker: the topic holds exactly the tickets answered 202.
#[tokio::test]
async fn only_tickets_answered_202_reach_kafka() {
    let ctx = TestContext::new("tp_props");
    let app = app(&ctx).await;
    let mut runner = TestRunner::deterministic();
    let strategy = prop_oneof![
        Just(valid_ticket("as is").to_string().into_bytes()),
        (field_name(), "[a-zA-Z0-9 -]{0,20}").prop_map(|(field, text)| {
            let mut ticket = valid_ticket("string field");
            ticket[field.as_str()] = Value::String(text);
            ticket.to_string().into_bytes()
        }),
        arbitrary_json().prop_map(|v| v.to_string().into_bytes()),
        mutated_ticket().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..256),
    ];
    let mut accepted = std::collections::HashSet::new();
    for _ in 0..200 {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        let answer = send(&app, post("/v1/tickets", Some(ACME_KEY), body)).await;
        match answer.status.as_u16() {
            202 => {
                accepted.insert(answer.body["ticket_id"].as_str().unwrap().to_owned());
            }
            status => assert!(is_client_error(status), "{status}: {}", answer.body),
        }
    }
    assert!(
        !accepted.is_empty(),
        "the generator should produce some valid tickets"
    );
    let topic = consumer(&ctx.topics.tickets_created);
    let records = read_records(&topic, accepted.len(), READ_TIMEOUT).await;
    for record in &records {
        let key = String::from_utf8(rdkafka::Message::key(record).unwrap().to_vec()).unwrap();
        assert!(accepted.contains(&key), "{key} reached Kafka without a 202");
    }
    assert!(read_for(&topic, Duration::from_secs(1)).await.is_empty());
}

/// gRPC requests with arbitrary fields, timestamps at every extreme and arbitrary metadata.
fn arbitrary_grpc_request() -> impl Strategy<Value = triage_proto::v1::CreateTicketRequest> {
    use triage_proto::{
        v1::{CreateTicketRequest, Customer},
        wkt::Timestamp,
    };
    (
        proptest::option::of(".{0,80}"),
        ".{0,200}",
        ".{0,400}",
        proptest::option::of((".{0,40}", proptest::option::of(".{0,40}"))),
        ".{0,12}",
        ".{0,12}",
        proptest::option::of((any::<i64>(), any::<i32>())),
        proptest::option::of(".{0,40}"),
        arbitrary_json(),
    )
        .prop_map(
            |(
                ticket_id,
                subject,
                description,
                customer,
                channel,
                language,
                created,
                key,
                metadata,
            )| {
                CreateTicketRequest {
                    ticket_id,
                    subject,
                    description,
                    customer: customer.map(|(id, email)| Customer {
                        id,
                        email,
                        tier: None,
                    }),
                    channel,
                    language,
                    metadata: serde_json::from_value(metadata).ok(),
                    created_at: created.map(|(seconds, nanos)| Timestamp { seconds, nanos }),
                    idempotency_key: key,
                }
            },
        )
}

proptest! {
    #![proptest_config(RunnerConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(512)))]

    #[test]
    fn grpc_requests_never_panic_and_what_passes_is_storable(request in arbitrary_grpc_request()) {
        if let Ok(valid) = ticket::from_grpc(request, &Limits::default()) {
            let event = valid.into_event("acme");
            prop_assert!(triage_proto::check_timestamps(&event).is_ok(), "{event:?}");
        }
    }

    #[test]
    fn grpc_request_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = <triage_proto::v1::CreateTicketRequest as prost::Message>::decode(bytes.as_slice());
    }
}
