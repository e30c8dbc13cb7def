//! A broker outage as the ingress sees it: 503 with `Retry-After` within the delivery bound,
//! never a 202 for an unwritten record, and retries succeed once the broker is back.
//!
//! The outage is made with librdkafka's `MockCluster` (its broker set down, then up again): the
//! shared broker must never be stopped, and this is a fault it cannot produce on demand.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
    mocking::MockCluster,
    producer::DefaultProducerContext,
};
use triage_test_support::TestContext;

#[tokio::test]
async fn broker_down_is_503_within_the_bound_and_nothing_is_lost_after_it_returns() {
    let ctx = TestContext::new("tp_outage");
    let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    mock.create_topic(&ctx.topics.tickets_created, 2, 1)
        .unwrap();
    let mut config = config(&ctx);
    config.kafka.bootstrap_servers = mock.bootstrap_servers();
    config.ingress.delivery_timeout = Duration::from_millis(1500);
    let app = ticket_publisher::ingress::http::router(ingress(&config));

    let before = send(&app, post_json(Some(ACME_KEY), &valid_ticket("before"))).await;
    assert_eq!(before.status, 202, "{}", before.body);

    mock.broker_down(1).unwrap();
    let mut refused = 0;
    for i in 0..3 {
        let started = Instant::now();
        let answer = send(
            &app,
            post_json(Some(ACME_KEY), &valid_ticket(&format!("down {i}"))),
        )
        .await;
        let elapsed = started.elapsed();
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert_eq!(
            answer.content_type.as_deref(),
            Some("application/problem+json")
        );
        assert!(answer.retry_after.is_some());
        assert!(
            elapsed < Duration::from_millis(2500),
            "answered after {elapsed:?}"
        );
        refused += 1;
    }
    assert_eq!(refused, 3);

    mock.broker_up(1).unwrap();
    let mut accepted = vec![before.body];
    for i in 0..3 {
        // The caller retries after Retry-After; the first tries may still race the reconnect.
        let mut answer = send(
            &app,
            post_json(Some(ACME_KEY), &valid_ticket(&format!("retry {i}"))),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while answer.status == 503 && Instant::now() < deadline {
            answer = send(
                &app,
                post_json(Some(ACME_KEY), &valid_ticket(&format!("retry {i}"))),
            )
            .await;
        }
        assert_eq!(answer.status, 202, "{}", answer.body);
        accepted.push(answer.body);
    }

    // Every 202 has its record, where the answer said, and no refused ticket was written.
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", ctx.group("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&ctx.topics.tickets_created]).unwrap();
    let records = triage_test_support::read_records(&reader, accepted.len(), READ_TIMEOUT).await;
    for answer in &accepted {
        let record = records
            .iter()
            .find(|r| r.key() == Some(answer["ticket_id"].as_str().unwrap().as_bytes()))
            .expect("a 202 without its record");
        assert_eq!(answer["partition"], record.partition());
        assert_eq!(answer["offset"], record.offset());
    }
    let extra = triage_test_support::read_for(&reader, Duration::from_secs(1)).await;
    assert!(
        extra.is_empty(),
        "{} records nobody was told about",
        extra.len()
    );
}
