//! Shared set-up of the ticket-publisher tests: an ingress wired to the real stack with a test's
//! own topics and Redis prefix, and small request helpers.
#![allow(dead_code)]

use std::time::Duration;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use ticket_publisher::{
    Config,
    auth::ApiKeys,
    idempotency::IdempotencyStore,
    ingress::{Ingress, IngressMetrics, http::router},
};
use tower::ServiceExt;
use triage_runtime::config::Secret;
use triage_test_support::{Stack, TestContext};

pub const ACME_KEY: &str = "acme-secret-key";
pub const GLOBEX_KEY: &str = "globex-secret-key";

/// A configuration pointing at the stack and `ctx`'s topics and Redis prefix.
pub fn config(ctx: &TestContext) -> Config {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = Stack::get().kafka_bootstrap.clone();
    config.topics.tickets_created = ctx.topics.tickets_created.clone();
    config.topics.inference_tasks = ctx.topics.inference_tasks.clone();
    config.topics.results = ctx.topics.results.clone();
    config.topics.dead_letters = ctx.topics.dead_letters.clone();
    config.redis.url = Secret::new(Stack::get().redis_url.clone());
    config.redis.key_prefix = ctx.redis_prefix.clone();
    config.topic_provisioning.enabled = false;
    config.dispatch.group_id = ctx.group("dispatch");
    config.dispatch.transactional_id = ctx.group("tx");
    config.dispatch.replica_id = "r0".into();
    config
}

pub fn ingress(config: &Config) -> Ingress {
    let producer = ticket_publisher::ingress_producer(config).unwrap();
    let store = IdempotencyStore::new(&config.redis, config.ingress.idempotency_ttl).unwrap();
    Ingress::new(
        &config.ingress,
        config.topics.tickets_created.clone(),
        producer,
        ApiKeys::from_plain(&[("acme", ACME_KEY), ("globex", GLOBEX_KEY)]),
        store,
        IngressMetrics::default(),
    )
}

/// An ingress router on a fresh test context with one-partition... three-partition topics.
pub async fn app(ctx: &TestContext) -> Router {
    ctx.create_topics(3).await;
    router(ingress(&config(ctx)))
}

pub fn valid_ticket(subject: &str) -> Value {
    json!({
        "subject": subject,
        "description": "I was charged twice for my subscription",
        "customer": {"id": "c-1", "email": "jo@example.com", "tier": "pro"},
        "channel": "email",
        "language": "en",
        "metadata": {"order": 42}
    })
}

pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub body: Value,
}

pub async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let content_type = header("content-type");
    let retry_after = header("retry-after");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        retry_after,
        body,
    }
}

/// `POST path` with `key` as bearer token and a JSON body.
pub fn post(path: &str, key: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("authorization", format!("Bearer {key}"));
    }
    builder.body(body.into()).unwrap()
}

pub fn post_json(key: Option<&str>, body: &Value) -> Request<Body> {
    post("/v1/tickets", key, body.to_string())
}

pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// `count` ticket events (protobuf, keyed by ticket id `t-00000`…, seven tenants) on `topic`,
/// all acknowledged: the backlog of the dispatch-stage tests.
pub async fn produce_ticket_events(topic: &str, count: usize) {
    use rdkafka::{
        message::{Header, OwnedHeaders},
        producer::{FutureProducer, FutureRecord},
    };
    use triage_proto::{ContentType, v1::TicketCreated};

    let producer: FutureProducer = triage_test_support::client_config().create().unwrap();
    let sends = (0..count).map(|i| {
        let ticket_id = format!("t-{i:05}");
        let event = TicketCreated {
            ticket_id: ticket_id.clone(),
            tenant_id: format!("tenant-{}", i % 7),
            subject: "subject".into(),
            description: format!("ticket number {i}"),
            ..Default::default()
        };
        let payload = triage_proto::encode(&event, ContentType::Protobuf);
        let producer = producer.clone();
        async move {
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some("application/x-protobuf"),
            });
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(&ticket_id)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
    futures::future::join_all(sends).await;
}

/// Every partition of `topic` from the beginning, assigned directly (no group join, so records
/// arrive within milliseconds of being written), at `isolation`: `read_uncommitted` sees the
/// records of open and aborted transactions, `read_committed` stops before the first open one.
pub fn task_reader(
    topic: &str,
    partitions: i32,
    isolation: &str,
) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::{Offset, TopicPartitionList, consumer::Consumer};

    let reader: rdkafka::consumer::StreamConsumer = triage_test_support::client_config()
        .set(
            "group.id",
            format!("test-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    reader.assign(&assignment).unwrap();
    reader
}

/// Exactly one task per ticket event `t-00000`… among `tasks`: none missing, none twice.
pub fn assert_one_task_per_ticket(tasks: &[rdkafka::message::OwnedMessage], events: usize) {
    use rdkafka::Message;

    let mut per_ticket: std::collections::HashMap<String, usize> = Default::default();
    for record in tasks {
        let task: triage_proto::v1::InferenceTask = triage_proto::decode(
            record.payload().unwrap(),
            triage_test_support::header(record, "content-type"),
        )
        .unwrap();
        *per_ticket.entry(task.ticket_id).or_default() += 1;
    }
    assert_eq!(per_ticket.len(), events, "a ticket has no task");
    assert!(
        per_ticket.values().all(|&n| n == 1),
        "a ticket has two tasks"
    );
}
