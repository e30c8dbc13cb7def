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
