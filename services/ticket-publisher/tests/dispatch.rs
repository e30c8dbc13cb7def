//! The dispatch stage against the real broker: events published by an outside producer (JSON or
//! protobuf) become tasks keyed by ticket, poison events become dead letters while the next
//! ones flow, and the trace continues from the event to the task.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use rdkafka::{
    Message,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use ticket_publisher::dispatch::{DispatchMetrics, Dispatcher};
use triage_proto::{
    ContentType,
    v1::{Customer, DeadLetter, ErrorClass, InferenceTask, TicketCreated},
};
use triage_runtime::shutdown;
use triage_test_support::{TestContext, client_config, consumer, header, read_for, read_records};

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn event(ticket_id: &str, tenant: &str) -> TicketCreated {
    TicketCreated {
        ticket_id: ticket_id.into(),
        tenant_id: tenant.into(),
        subject: "Login broken".into(),
        description: "I cannot log in since this morning".into(),
        customer: Some(Customer {
            id: "c-1".into(),
            email: None,
            tier: Some("enterprise".into()),
        }),
        channel: "web".into(),
        created_at: Some(triage_proto::timestamp(std::time::SystemTime::now())),
        ..Default::default()
    }
}

async fn publish(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    value: &[u8],
    headers: &[(&str, &str)],
) {
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(*value),
        });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(value)
                .headers(owned),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// One dispatch lane running until the trigger fires.
async fn start_dispatch(
    config: ticket_publisher::config::Config,
) -> (
    shutdown::Trigger,
    tokio::task::JoinHandle<Result<(), ticket_publisher::dispatch::DispatchError>>,
) {
    let dispatcher = Dispatcher::start(Arc::new(config), DispatchMetrics::default(), 0)
        .await
        .unwrap();
    let (trigger, stop) = shutdown::channel();
    (trigger, tokio::spawn(dispatcher.run(stop)))
}

#[tokio::test]
async fn outside_json_and_protobuf_events_are_dispatched_and_poison_is_dead_lettered() {
    let ctx = TestContext::new("tp_dispatch");
    ctx.create_topics(2).await;
    let mut config = config(&ctx);
    config.dispatch.batch_max_records = 3;
    let (trigger, stage) = start_dispatch(config).await;

    let producer: FutureProducer = client_config().create().unwrap();
    let topic = &ctx.topics.tickets_created;
    let protobuf = triage_proto::encode(&event("t-proto", "acme"), ContentType::Protobuf);
    publish(
        &producer,
        topic,
        "t-proto",
        &protobuf,
        &[
            ("content-type", "application/x-protobuf"),
            ("traceparent", TRACEPARENT),
        ],
    )
    .await;
    publish(
        &producer,
        topic,
        "t-bad",
        b"\xff\xfe not a ticket",
        &[("content-type", "application/x-protobuf")],
    )
    .await;
    let mut no_tenant = event("t-no-tenant", "");
    no_tenant.tenant_id.clear();
    let json = triage_proto::encode(&no_tenant, ContentType::Json);
    publish(
        &producer,
        topic,
        "t-no-tenant",
        &json,
        &[("content-type", "application/json")],
    )
    .await;
    // An outside producer that sends JSON without any header at all.
    let json = triage_proto::encode(&event("t-json", "globex"), ContentType::Json);
    publish(&producer, topic, "t-json", &json, &[]).await;
    publish(
        &producer,
        topic,
        "t-yaml",
        b"subject: hi",
        &[("content-type", "text/yaml")],
    )
    .await;
    let protobuf = triage_proto::encode(&event("t-after", "acme"), ContentType::Protobuf);
    publish(
        &producer,
        topic,
        "t-after",
        &protobuf,
        &[("content-type", "application/x-protobuf")],
    )
    .await;

    let tasks_topic = consumer(&ctx.topics.inference_tasks);
    let tasks = read_records(&tasks_topic, 3, READ_TIMEOUT).await;
    let mut by_ticket = std::collections::HashMap::new();
    for record in &tasks {
        let task: InferenceTask =
            triage_proto::decode(record.payload().unwrap(), header(record, "content-type"))
                .unwrap();
        assert_eq!(
            record.key(),
            Some(task.ticket_id.as_bytes()),
            "tasks are keyed by ticket, so one tenant spreads over every partition"
        );
        assert_eq!(
            header(record, "ce_type"),
            Some("ticketing.v1.InferenceTask")
        );
        assert_eq!(
            task.idempotency_key,
            triage_proto::idempotency_key(
                &task.tenant_id,
                &task.ticket_id,
                "triage-v1",
                "gpt-4o-mini"
            )
        );
        assert!(task.messages[1].content.starts_with("<ticket>"));
        assert!(
            task.accepted_at.is_some()
                && task.dispatched_at.is_some()
                && task.ticket_created_at.is_some()
        );
        by_ticket.insert(task.ticket_id.clone(), record.clone());
    }
    let mut ids: Vec<_> = by_ticket.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["t-after", "t-json", "t-proto"]);
    let traced = header(&by_ticket["t-proto"], "traceparent").unwrap();
    assert!(
        traced.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{traced}"
    );

    let dlq = consumer(&ctx.topics.dead_letters);
    let letters = read_records(&dlq, 3, READ_TIMEOUT).await;
    let mut classes = Vec::new();
    for record in &letters {
        let letter: DeadLetter =
            triage_proto::decode(record.payload().unwrap(), header(record, "content-type"))
                .unwrap();
        assert_eq!(letter.failed_service, "ticket-publisher");
        assert_eq!(letter.source_topic, *topic);
        assert_eq!(record.key(), Some(letter.original_key.as_slice()));
        match letter.original_key.as_slice() {
            b"t-bad" => {
                assert_eq!(letter.original_value, b"\xff\xfe not a ticket");
                assert_eq!(letter.original_headers[0].key, "content-type");
            }
            b"t-no-tenant" => assert_eq!(letter.ticket_id, "t-no-tenant"),
            _ => {}
        }
        classes.push((
            String::from_utf8(letter.original_key).unwrap(),
            ErrorClass::try_from(letter.error_class).unwrap(),
        ));
    }
    classes.sort();
    assert_eq!(
        classes,
        [
            ("t-bad".into(), ErrorClass::Decode),
            ("t-no-tenant".into(), ErrorClass::InvalidEvent),
            ("t-yaml".into(), ErrorClass::Decode),
        ]
    );
    assert!(
        read_for(&tasks_topic, Duration::from_millis(500))
            .await
            .is_empty()
    );
    trigger.fire();
    stage.await.unwrap().unwrap();
}

#[tokio::test]
async fn every_poison_event_on_every_partition_is_one_dead_letter_and_dispatch_moves_on() {
    use triage_test_support::poison::{PoisonShapes, poison_records, produce_poison};
    let ctx = TestContext::new("tp_poison_all");
    let partitions = 2;
    ctx.create_topics(partitions).await;
    let config = config(&ctx);
    let group = config.dispatch.group_id.clone();
    let (trigger, stage) = start_dispatch(config).await;

    let producer: FutureProducer = client_config().create().unwrap();
    let topic = &ctx.topics.tickets_created;
    let shapes = PoisonShapes {
        valid: event("t-shape", "acme"),
        set_timestamp: |event: &mut TicketCreated, at| event.created_at = Some(at),
        // A task of its size cannot be produced inside the transaction.
        oversize: |event: &mut TicketCreated| event.subject = "s".repeat(950_000),
    };
    let mut poison_count = 0;
    let mut normal = 0;
    for partition in 0..partitions {
        let poison = poison_records(&shapes, &format!("p{partition}"));
        poison_count += poison.len();
        produce_poison(topic, partition, &poison).await;
        for index in 0..4 {
            let tenant = if index % 2 == 0 { "acme" } else { "globex" };
            let ticket = format!("p{partition}-t{index}");
            let value = triage_proto::encode(&event(&ticket, tenant), ContentType::Protobuf);
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some("application/x-protobuf"),
            });
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(&ticket)
                        .payload(&value)
                        .partition(partition)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            normal += 1;
        }
    }

    let tasks = read_records(&consumer(&ctx.topics.inference_tasks), normal, READ_TIMEOUT).await;
    assert_eq!(tasks.len(), normal);
    let dlq = consumer(&ctx.topics.dead_letters);
    let letters = read_records(&dlq, poison_count, READ_TIMEOUT).await;
    let (mut invalid, mut truncated) = (0, 0);
    for record in &letters {
        let letter: DeadLetter =
            triage_proto::decode(record.payload().unwrap(), header(record, "content-type"))
                .unwrap();
        invalid += usize::from(letter.error_class == ErrorClass::InvalidEvent as i32);
        // The oversized event's dead letter is cut to fit and says how large the event was.
        if letter.original_value_truncated {
            assert!(letter.original_value_size > 900_000);
            assert!(letter.original_value.len() < letter.original_value_size as usize);
            truncated += 1;
        }
    }
    // Two timestamps and the oversized task per partition are the event's fault.
    assert_eq!(invalid, 3 * partitions as usize);
    assert_eq!(truncated, partitions as usize);
    for partition in 0..partitions {
        let end = (poison_count / 2 + 4) as i64;
        triage_test_support::wait_until(
            "the partition committed to its end",
            READ_TIMEOUT,
            || async {
                (triage_test_support::committed_offset(&group, topic, partition) == Some(end))
                    .then_some(())
            },
        )
        .await;
    }
    assert!(read_for(&dlq, Duration::from_millis(500)).await.is_empty());
    trigger.fire();
    stage.await.unwrap().unwrap();
}
