//! The shared Kafka mechanics against the real broker of the local stack.

use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::{Message, consumer::Consumer};
use triage_proto::{ContentType, Contract, v1};
use triage_runtime::{
    config::{KafkaConfig, TopicProvisioning, TopicsConfig},
    kafka::{
        admin::{TopicOutcome, TopicSpec, ensure_topics, grow_partitions},
        headers,
        producer::ContractProducer,
    },
};
use triage_test_support::{Stack, TestContext, consumer, create_topics, read_records};

fn kafka_config() -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: Stack::get().kafka_bootstrap.clone(),
        ..Default::default()
    }
}

fn producer(content_type: ContentType) -> ContractProducer {
    ContractProducer::new(
        &kafka_config(),
        "runtime-test",
        content_type,
        Duration::from_secs(10),
    )
    .unwrap()
}

fn traced(trace_id: u128) -> opentelemetry::Context {
    opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(trace_id),
        SpanId::from(0x1234_5678_9abc_def0),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

fn samples() -> (
    v1::TicketCreated,
    v1::InferenceTask,
    v1::InferenceResult,
    v1::DeadLetter,
) {
    let now = triage_proto::timestamp(std::time::SystemTime::now());
    let ticket = v1::TicketCreated {
        ticket_id: "t-42".into(),
        tenant_id: "acme".into(),
        subject: "Charged twice".into(),
        description: "My card was charged twice — ünïcödé survives".into(),
        customer: Some(v1::Customer {
            id: "c-1".into(),
            email: Some("x@example.com".into()),
            tier: Some("pro".into()),
        }),
        channel: "email".into(),
        language: "en".into(),
        created_at: Some(now),
        accepted_at: Some(now),
        ..Default::default()
    };
    let task = v1::InferenceTask {
        task_id: "task-1".into(),
        ticket_id: "t-42".into(),
        tenant_id: "acme".into(),
        prompt_version: "triage-v1".into(),
        model: "gpt-4o-mini".into(),
        messages: vec![v1::ChatMessage {
            role: "user".into(),
            content: "<ticket>…</ticket>".into(),
        }],
        idempotency_key: "abc".into(),
        dispatched_at: Some(now),
        ..Default::default()
    };
    let result = v1::InferenceResult {
        ticket_id: "t-42".into(),
        category: "billing".into(),
        priority: "high".into(),
        confidence: 0.9,
        cost_usd: 0.000_12,
        usage: Some(v1::TokenUsage {
            prompt_tokens: 100,
            completion_tokens: 20,
            total_tokens: 120,
        }),
        triaged_at: Some(now),
        ..Default::default()
    };
    let dead_letter = v1::DeadLetter {
        id: "dl-1".into(),
        original_value: vec![0xff, 0x00, 0x7b],
        source_topic: "tasks.llm.inference".into(),
        source_offset: 9_007_199_254_740_993,
        error_class: v1::ErrorClass::Decode as i32,
        attempts: 1,
        last_failure_at: Some(now),
        ..Default::default()
    };
    (ticket, task, result, dead_letter)
}

async fn round_trip<M: Contract + PartialEq + std::fmt::Debug>(
    message: &M,
    content_type: ContentType,
) {
    let context = TestContext::new("roundtrip");
    create_topics(&[&context.topics.results], 1).await;
    let reader = consumer(&context.topics.results);
    producer(content_type)
        .send(&context.topics.results, "t-42", message, &traced(0xabc))
        .await
        .unwrap();
    let records = read_records(&reader, 1, Duration::from_secs(30)).await;
    let record = &records[0];
    let record_headers = record.headers();
    assert_eq!(
        headers::get_str(record_headers, headers::CONTENT_TYPE),
        Some(content_type.as_mime())
    );
    assert_eq!(
        headers::get_str(record_headers, headers::CE_TYPE),
        Some(M::MESSAGE_TYPE)
    );
    assert_eq!(
        headers::get_str(record_headers, headers::CE_SPECVERSION),
        Some("1.0")
    );
    assert_eq!(
        headers::get_str(record_headers, headers::SCHEMA_VERSION_HEADER),
        Some("1")
    );
    assert!(headers::get_str(record_headers, headers::CE_ID).is_some());
    assert!(headers::get_str(record_headers, headers::CE_TIME).is_some());
    assert_eq!(record.key(), Some(&b"t-42"[..]));
    let decoded: M = triage_proto::decode(
        record.payload().unwrap(),
        headers::get_str(record_headers, headers::CONTENT_TYPE),
    )
    .unwrap();
    assert_eq!(&decoded, message);
}

#[tokio::test]
async fn every_schema_round_trips_through_the_broker_in_protobuf_and_json() {
    let (ticket, task, result, dead_letter) = samples();
    for content_type in [ContentType::Protobuf, ContentType::Json] {
        round_trip(&ticket, content_type).await;
        round_trip(&task, content_type).await;
        round_trip(&result, content_type).await;
        round_trip(&dead_letter, content_type).await;
    }
}

#[tokio::test]
async fn trace_context_injected_on_produce_is_extracted_on_consume() {
    let context = TestContext::new("trace");
    create_topics(&[&context.topics.inference_tasks], 1).await;
    let reader = consumer(&context.topics.inference_tasks);
    let trace_id = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128;
    let (_, task, _, _) = samples();
    producer(ContentType::Protobuf)
        .send(
            &context.topics.inference_tasks,
            "acme",
            &task,
            &traced(trace_id),
        )
        .await
        .unwrap();
    let records = read_records(&reader, 1, Duration::from_secs(30)).await;
    let extracted = headers::extract_trace_context(records[0].headers());
    let span_context = extracted.span().span_context().clone();
    assert!(span_context.is_remote());
    assert_eq!(span_context.trace_id(), TraceId::from(trace_id));
    assert_eq!(span_context.span_id(), SpanId::from(0x1234_5678_9abc_def0));
    assert!(span_context.is_sampled());
}

#[tokio::test]
async fn topic_creation_is_idempotent_and_never_grows_an_existing_topic() {
    let context = TestContext::new("topics");
    let topics = TopicsConfig {
        tickets_created: context.topics.tickets_created.clone(),
        inference_tasks: context.topics.inference_tasks.clone(),
        results: context.topics.results.clone(),
        dead_letters: context.topics.dead_letters.clone(),
    };
    // The one-broker stack lowers the production defaults (3 copies, 2 in sync) explicitly.
    let replication_factor = triage_test_support::Stack::get().replication_factor;
    let mut provisioning = TopicProvisioning {
        partitions: 3,
        replication_factor,
        min_insync_replicas: replication_factor.min(2),
        ..Default::default()
    };
    let kafka = kafka_config();

    let first = ensure_topics(&kafka, &TopicSpec::pipeline(&topics, &provisioning))
        .await
        .unwrap();
    assert!(
        first
            .iter()
            .all(|(_, outcome)| *outcome == TopicOutcome::Created),
        "{first:?}"
    );
    let second = ensure_topics(&kafka, &TopicSpec::pipeline(&topics, &provisioning))
        .await
        .unwrap();
    assert!(
        second
            .iter()
            .all(|(_, outcome)| *outcome == TopicOutcome::Existing),
        "{second:?}"
    );
    assert_eq!(partition_count(&topics.results), 3);

    // More partitions configured than the topics have: provisioning warns and leaves them.
    provisioning.partitions = 5;
    let undersized = ensure_topics(&kafka, &TopicSpec::pipeline(&topics, &provisioning))
        .await
        .unwrap();
    assert!(
        undersized
            .iter()
            .all(|(_, outcome)| *outcome == TopicOutcome::Undersized { partitions: 3 }),
        "{undersized:?}"
    );
    for topic in topics.all() {
        assert_eq!(partition_count(topic), 3, "{topic}");
    }

    // The operator's explicit command grows one topic, and only that one.
    let from = grow_partitions(&kafka, &topics.inference_tasks, 5)
        .await
        .unwrap();
    assert_eq!(from, 3);
    assert_eq!(partition_count(&topics.inference_tasks), 5);
    assert_eq!(partition_count(&topics.results), 3);
    // Shrinking is refused with words, not a broker error code.
    let refused = grow_partitions(&kafka, &topics.inference_tasks, 4)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("has 5 partitions already"),
        "{refused}"
    );
    triage_test_support::delete_topics(&topics.all()).await;
}

fn partition_count(topic: &str) -> usize {
    let client: rdkafka::consumer::BaseConsumer =
        triage_test_support::client_config().create().unwrap();
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0].partitions().len()
}

/// A dead-letter topic whose `max.message.bytes` is 64 KiB, far below what the producer
/// allows: a 5 MiB poison record still becomes one dead letter that the broker accepts, cut to
/// fit, marked truncated and carrying the original size.
#[tokio::test]
async fn a_huge_poison_record_becomes_a_dead_letter_that_fits_a_small_topic() {
    use rdkafka::{
        Timestamp,
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
        message::OwnedMessage,
    };
    use triage_runtime::{
        kafka::{
            consumer::Disposition,
            dead_letter::{DeadLetterTarget, Failure},
            producer::RetryDelays,
        },
        shutdown::Shutdown,
    };

    let context = TestContext::new("dlq_size");
    let topic = context.topics.dead_letters.clone();
    let admin: AdminClient<DefaultClientContext> =
        triage_test_support::client_config().create().unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                1,
                TopicReplication::Fixed(Stack::get().replication_factor),
            )
            .set("max.message.bytes", "65536")],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    // Wait until the topic has a leader (the shared helper tolerates the existing topic).
    create_topics(&[topic.as_str()], 1).await;

    // Incompressible: the topic's limit applies to the compressed batch, and a value of one
    // repeated byte would fit compressed without being cut.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let value: Vec<u8> = (0..5 * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let poison = OwnedMessage::new(
        Some(value.clone()),
        Some(b"ticket-huge".to_vec()),
        "events".into(),
        Timestamp::NotAvailable,
        3,
        42,
        None,
    );
    let producer = producer(ContentType::Protobuf);
    let shutdown = Shutdown::never();
    let target = DeadLetterTarget {
        producer: &producer,
        topic: &topic,
        service: "runtime-test",
        delays: RetryDelays {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        shutdown: &shutdown,
    };
    let disposition = target
        .produce(
            &poison,
            Failure::immediate(v1::ErrorClass::InvalidEvent, "record too large to decode"),
            &opentelemetry::Context::new(),
        )
        .await;
    assert_eq!(disposition, Disposition::Done);
    assert!(
        producer.max_message_bytes() <= 65536,
        "the producer learned the topic's limit: {}",
        producer.max_message_bytes()
    );

    let records = read_records(&consumer(&topic), 1, Duration::from_secs(30)).await;
    let record = &records[0];
    assert!(record.payload().unwrap().len() <= 65536);
    let dead_letter: v1::DeadLetter = triage_proto::decode(
        record.payload().unwrap(),
        headers::get_str(record.headers(), "content-type"),
    )
    .unwrap();
    assert!(dead_letter.original_value_truncated);
    assert_eq!(dead_letter.original_value_size, value.len() as u64);
    assert!(!dead_letter.original_value.is_empty());
    assert!(value.starts_with(&dead_letter.original_value));
    assert_eq!(dead_letter.source_offset, 42);
    triage_test_support::delete_topics(&[topic.as_str()]).await;
}
