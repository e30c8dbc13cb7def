//! The worker binary behind a hostile gateway: before a ticket's request reaches the (real,
//! over HTTP) llm-sim, the gateway answers it with 429s whose `retry-after`, `retry-after-ms`
//! and `x-ratelimit-reset-*` are negative, NaN, empty, not numbers, microscopic or absurdly
//! large, and with bodies that are not JSON or not a completion. Every ticket must still be
//! triaged, with no panic in the log, no dead letter, and no lease left behind.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use common::*;
use triage_test_support::{ServiceProcess, Stack, TestContext, consumer, read_for};

const BINARY: &str = env!("CARGO_BIN_EXE_inference-worker");
/// Hostile answers each ticket gets before its request is passed on.
const HOSTILE_PER_TICKET: usize = 3;

/// A hostile answer: status, headers and body.
type Answer = (u16, Vec<(&'static str, &'static str)>, &'static str);

fn hostile_answers() -> Vec<Answer> {
    let rate_limited = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
    vec![
        (429, vec![("retry-after-ms", "-5")], rate_limited),
        (429, vec![("retry-after", "NaN")], rate_limited),
        (429, vec![("retry-after", "")], rate_limited),
        (429, vec![("retry-after", "soon")], rate_limited),
        (429, vec![("retry-after", "1e400")], rate_limited),
        (
            429,
            vec![("retry-after-ms", "99999999999999999999999")],
            rate_limited,
        ),
        (429, vec![("retry-after", "0.000005")], rate_limited),
        (
            429,
            vec![("retry-after", "-inf"), ("retry-after-ms", "inf")],
            rate_limited,
        ),
        (
            429,
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "99999999999h"),
            ],
            rate_limited,
        ),
        (
            429,
            vec![
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "-1s"),
                ("x-ratelimit-limit-tokens", "-7"),
            ],
            "not json at all",
        ),
        (
            429,
            vec![("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
            "{",
        ),
        (200, vec![], r#"{"id":"x","choices":5}"#),
        (200, vec![], r#"{"id":"x","choices":["#),
        (
            200,
            vec![("content-type", "application/json")],
            "\u{0}\u{1}garbage",
        ),
        (500, vec![], "<html>upstream exploded</html>"),
    ]
}

#[derive(Clone)]
struct Gateway {
    upstream: String,
    client: reqwest::Client,
    attempts: Arc<Mutex<HashMap<String, usize>>>,
    hostile_served: Arc<Mutex<usize>>,
}

async fn chat(State(gateway): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let attempt = {
        let mut attempts = gateway.attempts.lock().unwrap();
        let count = attempts.entry(key.clone()).or_default();
        *count += 1;
        *count
    };
    if attempt <= HOSTILE_PER_TICKET {
        let answers = hostile_answers();
        // Each ticket starts somewhere else in the list, so every kind is served.
        let offset = key.bytes().map(usize::from).sum::<usize>();
        let (status, answer_headers, body) = &answers[(offset + attempt) % answers.len()];
        *gateway.hostile_served.lock().unwrap() += 1;
        let mut response = (StatusCode::from_u16(*status).unwrap(), *body).into_response();
        for (name, value) in answer_headers {
            response.headers_mut().insert(*name, value.parse().unwrap());
        }
        return response;
    }
    let mut request = gateway
        .client
        .post(format!("{}/chat/completions", gateway.upstream))
        .body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(upstream) => {
            let status = upstream.status();
            let upstream_headers = upstream.headers().clone();
            let bytes = upstream.bytes().await.unwrap_or_default();
            let mut response = (status, bytes).into_response();
            for (name, value) in &upstream_headers {
                if name != "content-length" && name != "transfer-encoding" {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            response
        }
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rate_limit_headers_and_bodies_delay_tickets_but_lose_none() {
    let context = TestContext::new("hostile-gateway");
    context.create_topics(4).await;
    let sim = Sim::with_latency_ms(20).await;
    let gateway = Gateway {
        upstream: sim.base_url.clone(),
        client: reqwest::Client::new(),
        attempts: Arc::default(),
        hostile_served: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(gateway.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    // Two tenants at once.
    let mut batch = tasks(&context, 20);
    for (index, task) in batch.iter_mut().enumerate() {
        if index % 2 == 1 {
            task.tenant_id = "globex".into();
        }
    }
    publish(&context, &batch).await;
    let mut env = worker_env(&context, &sim, "3s");
    env.extend(
        [
            ("TRIAGE_LLM__BASE_URL", gateway_url),
            ("TRIAGE_RETRY__MAX_PROVIDER_WAIT", "1s".to_owned()),
            ("TRIAGE_RETRY__INITIAL_BACKOFF", "50ms".to_owned()),
            ("TRIAGE_RETRY__MAX_BACKOFF", "500ms".to_owned()),
            ("TRIAGE_CIRCUIT__OPEN_FOR", "500ms".to_owned()),
        ]
        .map(|(name, value)| (name.to_owned(), value)),
    );
    let worker = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    worker.wait_ready(DEADLINE).await;

    let mut triaged = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while triaged.len() < batch.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {} tickets triaged behind the hostile gateway; log:\n{}",
            triaged.len(),
            batch.len(),
            worker.log()
        );
        worker.ensure_running().unwrap();
        for record in read_for(&results, Duration::from_millis(500)).await {
            let result = decode_result(&record);
            triaged.insert((result.tenant_id, result.ticket_id));
        }
    }
    let served = *gateway.hostile_served.lock().unwrap();
    println!("{served} hostile answers served to {} tickets", batch.len());
    assert!(served >= batch.len() * HOSTILE_PER_TICKET);
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty(),
        "a hostile answer must never dead-letter a ticket"
    );

    // Every lease was given back with its result, none left to expire by its TTL.
    let left = leases(&context.redis_prefix).await;
    assert!(left.is_empty(), "leases outlived their tasks: {left:?}");

    let metrics = worker.metrics().await;
    assert!(
        !metrics.lines().any(
            |line| line.starts_with("triage_consumer_handler_panics_total{")
                && !line.ends_with(" 0")
        ),
        "a handler panicked:\n{metrics}"
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(DEADLINE).await.success());
    let log = worker.log();
    assert!(
        !log.contains("panicked"),
        "a panic in the worker's log:\n{log}"
    );
}

async fn leases(prefix: &str) -> Vec<String> {
    let client = redis::Client::open(Stack::get().redis_url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg(format!("{prefix}lease:*"))
        .query_async(&mut connection)
        .await
        .unwrap()
}
