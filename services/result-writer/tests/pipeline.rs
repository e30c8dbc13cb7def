//! The writer against the real broker and PostgreSQL: idempotent replays, newer-wins, a
//! PostgreSQL outage, poison records, the live stream and signed webhooks.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use common::{
    ACME_KEY, Db, GLOBEX_KEY, Writer, committed, config, produce_results, producer, result,
};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use result_writer::{config::WebhookEndpoint, triage::Triage};
use sha2::Sha256;
use tokio::{net::TcpListener, sync::mpsc, task::AbortHandle};
use triage_proto::v1::{DeadLetter, ErrorClass, InferenceResult};
use triage_runtime::config::Secret;
use triage_test_support::{Stack, TestContext, consumer, read_records, wait_until};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_replayed_three_times_leave_exactly_one_row_per_ticket() {
    let ctx = TestContext::new("rw-replay");
    ctx.create_topics(3).await;
    let config = config(&ctx);
    let group = config.consumer.group_id.clone();
    let producer = producer(&config);
    let results: Vec<_> = (0..60)
        .map(|i| result("acme", &format!("t-{i}"), 1_700_000_000 + i, "billing"))
        .collect();
    produce_results(&producer, &ctx.topics.results, &results).await;
    let writer = Writer::start(config);
    let db = Db::connect(&ctx.db_schema).await;
    wait_until("the first 60 rows", WAIT, || async {
        (db.count().await == Some(60)).then_some(())
    })
    .await;
    let first_offsets = db.query("ORDER BY ticket_id").await;

    // The same records twice more, as a producer retry or a replay from the topic would bring.
    produce_results(&producer, &ctx.topics.results, &results).await;
    produce_results(&producer, &ctx.topics.results, &results).await;
    wait_until("all 180 records committed", WAIT, || async {
        (committed(&group, &ctx.topics.results, 3).await == 180).then_some(())
    })
    .await;

    assert_eq!(db.count().await, Some(60));
    let distinct = db
        .query("GROUP BY ticket_id, category, triaged_at, source_offset, tenant_id")
        .await;
    assert_eq!(distinct.len(), 60);
    // Replays carry the same triaged_at, so they changed nothing, not even the source offset.
    let offsets =
        |rows: &[tokio_postgres::Row]| -> Vec<i64> { rows.iter().map(|r| r.get(3)).collect() };
    assert_eq!(
        offsets(&db.query("ORDER BY ticket_id").await),
        offsets(&first_offsets)
    );
    assert_eq!(
        writer
            .metric("triage_result_writer_results_unchanged_total")
            .await,
        Some(120.0)
    );
    assert_eq!(
        writer
            .metric("triage_result_writer_rows_written_total")
            .await,
        Some(60.0)
    );
    writer.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_result_never_overwrites_a_newer_one() {
    let ctx = TestContext::new("rw-newer");
    ctx.create_topics(1).await;
    let config = config(&ctx);
    let group = config.consumer.group_id.clone();
    let producer = producer(&config);
    produce_results(
        &producer,
        &ctx.topics.results,
        &[
            // Newer first, then an older one arrives late (a replay from the DLQ, a slow retry).
            result("acme", "newer-first", 2_000, "billing"),
            result("acme", "newer-first", 1_000, "spam"),
            // Older first, then the newer one replaces it.
            result("acme", "older-first", 1_000, "spam"),
            result("acme", "older-first", 2_000, "billing"),
        ],
    )
    .await;
    let writer = Writer::start(config);
    wait_until("all 4 records committed", WAIT, || async {
        (committed(&group, &ctx.topics.results, 1).await == 4).then_some(())
    })
    .await;
    let db = Db::connect(&ctx.db_schema).await;
    let rows = db.query("ORDER BY ticket_id").await;
    let seen: Vec<(String, String, i64)> = rows
        .iter()
        .map(|row| {
            let triaged_at: chrono::DateTime<chrono::Utc> = row.get(2);
            (row.get(0), row.get(1), triaged_at.timestamp())
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("newer-first".to_owned(), "billing".to_owned(), 2_000),
            ("older-first".to_owned(), "billing".to_owned(), 2_000),
        ]
    );
    writer.stop().await;
    db.drop_schema().await;
}

/// A TCP forwarder in front of the shared PostgreSQL that the test can cut and restore: the
/// writer sees PostgreSQL go away (connections reset, new ones refused) without anybody stopping
/// the server other tests use.
struct Proxy {
    address: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept_task: AbortHandle,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept_task = tokio::spawn({
            let open = Arc::clone(&open);
            let connections = Arc::clone(&connections);
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Proxy {
            address,
            open,
            connections,
            accept_task,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept_task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unavailable_in_the_middle_of_a_run_loses_nothing() {
    let ctx = TestContext::new("rw-pg-outage");
    ctx.create_topics(1).await;
    let database_url = reqwest::Url::parse(&Stack::get().database_url).unwrap();
    let upstream = format!(
        "{}:{}",
        database_url.host_str().unwrap(),
        database_url.port().unwrap_or(5432)
    );
    let proxy = Proxy::start(upstream).await;
    let mut proxied_url = database_url.clone();
    proxied_url.set_host(Some("127.0.0.1")).unwrap();
    proxied_url.set_port(Some(proxy.address.port())).unwrap();
    let mut config = config(&ctx);
    config.database.url = Secret::new(proxied_url.to_string());
    config.database.connect_timeout = Duration::from_secs(2);
    config.database.write_timeout = Duration::from_secs(3);
    let group = config.consumer.group_id.clone();
    let producer = producer(&config);
    let batch = |from: i64| -> Vec<_> {
        (from..from + 50)
            .map(|i| result("acme", &format!("t-{i:03}"), 1_700_000_000 + i, "billing"))
            .collect()
    };
    let writer = Writer::start(config);
    produce_results(&producer, &ctx.topics.results, &batch(0)).await;
    let db = Db::connect(&ctx.db_schema).await;
    wait_until("the first 50 rows", WAIT, || async {
        (db.count().await == Some(50)).then_some(())
    })
    .await;

    proxy.cut();
    produce_results(&producer, &ctx.topics.results, &batch(50)).await;
    wait_until("the writer to fail a batch", WAIT, || async {
        (writer
            .metric("triage_result_writer_db_errors_total")
            .await?
            > 0.0)
            .then_some(())
    })
    .await;
    // The writer stays ready (PostgreSQL is shared by every replica) and says what is down.
    let readyz = reqwest::get(format!("http://{}/readyz", writer.admin))
        .await
        .unwrap();
    assert_eq!(readyz.status(), StatusCode::OK);
    let verbose: serde_json::Value =
        reqwest::get(format!("http://{}/healthz?verbose", writer.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        verbose["dependencies"]["postgres"]["status"], "down",
        "{verbose}"
    );
    // Nothing is committed past what is durable: the offsets may not cover the unwritten 50.
    assert_eq!(db.count().await, Some(50));
    assert!(committed(&group, &ctx.topics.results, 1).await <= 50);

    proxy.restore();
    wait_until("all 100 rows", WAIT, || async {
        (db.count().await == Some(100)).then_some(())
    })
    .await;
    wait_until("all 100 records committed", WAIT, || async {
        (committed(&group, &ctx.topics.results, 1).await == 100).then_some(())
    })
    .await;
    let tickets: Vec<String> = db
        .query("ORDER BY ticket_id")
        .await
        .iter()
        .map(|row| row.get(0))
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("t-{i:03}")).collect();
    assert_eq!(tickets, expected);
    writer.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_and_the_next_ones_are_written() {
    let ctx = TestContext::new("rw-poison");
    ctx.create_topics(1).await;
    let config = config(&ctx);
    let group = config.consumer.group_id.clone();
    let producer = producer(&config);
    let poison = br#"{"ticketId": "t-poison", "#.to_vec();
    produce_results(
        &producer,
        &ctx.topics.results,
        &[result("acme", "t-1", 1_000, "billing")],
    )
    .await;
    producer
        .send_raw(
            &ctx.topics.results,
            b"t-poison",
            &poison,
            OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some("application/json"),
            }),
        )
        .await
        .unwrap();
    produce_results(
        &producer,
        &ctx.topics.results,
        &[
            result("acme", "t-2", 1_000, "billing"),
            // Decodes, but names no tenant: nobody could ever read it, so it is dead-lettered too.
            result("", "t-no-tenant", 1_000, "billing"),
            result("acme", "t-3", 1_000, "billing"),
        ],
    )
    .await;
    let dead_letters = consumer(&ctx.topics.dead_letters);
    let writer = Writer::start(config);

    let records = read_records(&dead_letters, 2, WAIT).await;
    let mut letters: Vec<DeadLetter> = records
        .iter()
        .map(|record| {
            use rdkafka::Message;
            DeadLetter::decode(record.payload().unwrap()).unwrap()
        })
        .collect();
    // Different keys are dead-lettered concurrently: order by where they came from.
    letters.sort_by_key(|letter| letter.source_offset);
    assert_eq!(letters[0].original_value, poison);
    assert_eq!(letters[0].error_class, ErrorClass::Decode as i32);
    assert_eq!(letters[0].source_offset, 1);
    assert_eq!(letters[0].failed_service, "result-writer");
    assert_eq!(letters[1].error_class, ErrorClass::InvalidEvent as i32);
    assert_eq!(letters[1].ticket_id, "t-no-tenant");
    assert_eq!(letters[1].source_offset, 3);

    wait_until("all 5 records committed", WAIT, || async {
        (committed(&group, &ctx.topics.results, 1).await == 5).then_some(())
    })
    .await;
    let db = Db::connect(&ctx.db_schema).await;
    let tickets: Vec<String> = db
        .query("ORDER BY ticket_id")
        .await
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(tickets, ["t-1", "t-2", "t-3"]);
    writer.stop().await;
    db.drop_schema().await;
}

/// Reads server-sent events from `response` until one named `triage` arrives; returns its data.
async fn next_triage_event(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    buffer: &mut String,
) -> Triage {
    next_triage_event_with_id(stream, buffer).await.1
}

/// Like [`next_triage_event`], with the event's `id:`.
async fn next_triage_event_with_id(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    buffer: &mut String,
) -> (String, Triage) {
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let mut name = "message";
            let mut data = String::new();
            let mut id = String::new();
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                } else if let Some(value) = line.strip_prefix("id:") {
                    id = value.trim().to_owned();
                }
            }
            assert_ne!(name, "lagged", "the stream lagged: {data}");
            if name == "triage" {
                return (id, serde_json::from_str(&data).unwrap());
            }
        }
        let chunk = stream.next().await.expect("stream open").expect("chunk");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_delivers_a_result_written_after_the_client_connected() {
    let ctx = TestContext::new("rw-sse");
    ctx.create_topics(1).await;
    let config = config(&ctx);
    let producer = producer(&config);
    let writer = Writer::start(config);
    let client = reqwest::Client::new();
    let connect = |key: &'static str| {
        let request = client
            .get(writer.api_url("/v1/triage/stream"))
            .bearer_auth(key);
        async move {
            wait_until("the stream to accept a client", WAIT, || async {
                let response = request.try_clone()?.send().await.ok()?;
                (response.status() == StatusCode::OK).then_some(response)
            })
            .await
        }
    };
    let acme_response = connect(ACME_KEY).await;
    let globex_response = connect(GLOBEX_KEY).await;
    assert_eq!(acme_response.headers()["content-type"], "text/event-stream");

    produce_results(
        &producer,
        &ctx.topics.results,
        &[result("globex", "t-globex", 1_000, "spam")],
    )
    .await;
    // The acme result carries the ticket's text and a trace context, as inference-worker's do.
    let traced = InferenceResult {
        subject: "Charged twice".into(),
        excerpt: "I was charged twice this month".into(),
        ..result("acme", "t-live", 1_000, "billing")
    };
    let trace = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
        SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    producer
        .send(&ctx.topics.results, "t-live", &traced, &trace)
        .await
        .expect("produce the traced result");
    let mut acme_stream = acme_response.bytes_stream();
    let mut globex_stream = globex_response.bytes_stream();
    let (mut acme_buffer, mut globex_buffer) = (String::new(), String::new());
    let acme_event =
        tokio::time::timeout(WAIT, next_triage_event(&mut acme_stream, &mut acme_buffer))
            .await
            .expect("acme's triage event");
    assert_eq!(
        (acme_event.tenant_id.as_str(), acme_event.ticket_id.as_str()),
        ("acme", "t-live")
    );
    assert_eq!(acme_event.category, "billing");
    assert_eq!(acme_event.subject.as_deref(), Some("Charged twice"));
    assert_eq!(
        acme_event.excerpt.as_deref(),
        Some("I was charged twice this month")
    );
    assert_eq!(
        acme_event.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    let globex_event = tokio::time::timeout(
        WAIT,
        next_triage_event(&mut globex_stream, &mut globex_buffer),
    )
    .await
    .expect("globex's triage event");
    assert_eq!(globex_event.ticket_id, "t-globex");
    // Produced without subject, excerpt or trace context: absent, not empty.
    assert_eq!(
        (
            globex_event.subject,
            globex_event.excerpt,
            globex_event.trace_id
        ),
        (None, None, None)
    );
    // What the stream announced is readable.
    let stored: Triage = client
        .get(writer.api_url("/v1/tickets/t-live/triage"))
        .header("x-api-key", ACME_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored, acme_event);
    drop((acme_stream, globex_stream));
    writer.stop().await;
    Db::connect(&ctx.db_schema).await.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_with_last_event_id_gets_exactly_the_rows_it_missed() {
    let ctx = TestContext::new("rw-sse-resume");
    ctx.create_topics(1).await;
    let config = config(&ctx);
    let producer = producer(&config);
    let writer = Writer::start(config);
    let client = reqwest::Client::new();
    let connect = |last_event_id: Option<String>| {
        let mut request = client
            .get(writer.api_url("/v1/triage/stream"))
            .bearer_auth(ACME_KEY);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        async move {
            wait_until("the stream to accept a client", WAIT, || async {
                let response = request.try_clone()?.send().await.ok()?;
                (response.status() == StatusCode::OK).then_some(response)
            })
            .await
        }
    };
    let read_ticket = |ticket: &'static str| {
        let request = client
            .get(writer.api_url(&format!("/v1/tickets/{ticket}/triage")))
            .bearer_auth(ACME_KEY);
        async move {
            wait_until("the row to be committed", WAIT, || async {
                let response = request.try_clone()?.send().await.ok()?;
                (response.status() == StatusCode::OK).then_some(())
            })
            .await
        }
    };

    // Connected: the first row arrives live; its event id is the resume point.
    let mut stream = connect(None).await.bytes_stream();
    let mut buffer = String::new();
    produce_results(
        &producer,
        &ctx.topics.results,
        &[
            result("globex", "t-other-1", 1_000, "spam"),
            result("acme", "t-1", 1_000, "billing"),
        ],
    )
    .await;
    let (seen_id, seen) =
        tokio::time::timeout(WAIT, next_triage_event_with_id(&mut stream, &mut buffer))
            .await
            .expect("the first event");
    assert_eq!(seen.ticket_id, "t-1");
    assert!(!seen_id.is_empty(), "every triage event has an id");
    drop(stream);

    // Disconnected: two acme rows (and another tenant's) are written meanwhile.
    produce_results(
        &producer,
        &ctx.topics.results,
        &[
            result("acme", "t-2", 1_001, "bug"),
            result("globex", "t-other-2", 1_001, "spam"),
            result("acme", "t-3", 1_002, "outage"),
        ],
    )
    .await;
    read_ticket("t-2").await;
    read_ticket("t-3").await;

    // Reconnected with Last-Event-ID: exactly the two missed rows, in write order, then live
    // ones; nothing seen before comes again.
    let mut stream = connect(Some(seen_id)).await.bytes_stream();
    let mut buffer = String::new();
    let mut received = Vec::new();
    for _ in 0..2 {
        let (_, triage) =
            tokio::time::timeout(WAIT, next_triage_event_with_id(&mut stream, &mut buffer))
                .await
                .expect("a missed row");
        received.push(triage.ticket_id);
    }
    assert_eq!(received, ["t-2", "t-3"]);
    produce_results(
        &producer,
        &ctx.topics.results,
        &[result("acme", "t-4", 1_003, "billing")],
    )
    .await;
    let (_, next) = tokio::time::timeout(WAIT, next_triage_event_with_id(&mut stream, &mut buffer))
        .await
        .expect("the live row after the backlog");
    assert_eq!(next.ticket_id, "t-4", "the live row follows, no row twice");
    drop(stream);

    // An id this API never gave is refused with problem details, not ignored.
    let refused = client
        .get(writer.api_url("/v1/triage/stream"))
        .bearer_auth(ACME_KEY)
        .header("last-event-id", "not-an-event-id")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["status"], 400);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Last-Event-ID"),
        "{problem}"
    );
    writer.stop().await;
    Db::connect(&ctx.db_schema).await.drop_schema().await;
}

#[derive(Clone)]
struct Receiver {
    secret: &'static str,
    attempts: Arc<AtomicUsize>,
    verified_tx: mpsc::UnboundedSender<(bool, Triage)>,
}

/// A helpdesk's webhook endpoint: it checks the signature with its own HMAC code, and fails the
/// first attempt so that the retry is exercised.
async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if receiver.attempts.fetch_add(1, Ordering::SeqCst) == 0 {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let timestamp = headers["x-triage-timestamp"].to_str().unwrap();
    let signature = headers["x-triage-signature"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(receiver.secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let triage: Triage = serde_json::from_slice(&body).unwrap();
    let _ = receiver.verified_tx.send((expected == signature, triage));
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_is_signed_retried_and_verifies() {
    let ctx = TestContext::new("rw-webhook");
    ctx.create_topics(1).await;
    let (verified_tx, mut verified_rx) = mpsc::unbounded_channel();
    let receiver = Receiver {
        secret: "whsec-acme-123",
        attempts: Arc::new(AtomicUsize::new(0)),
        verified_tx,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_address = listener.local_addr().unwrap();
    let hook_router = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    let server = tokio::spawn(async move { axum::serve(listener, hook_router).await });
    let mut config = config(&ctx);
    config.webhooks.endpoints = vec![WebhookEndpoint {
        tenant: "acme".into(),
        url: Secret::new(format!("http://{hook_address}/hook")),
        secret: Secret::new(receiver.secret),
    }];
    config.webhooks.retry_min_delay = Duration::from_millis(50);
    let producer = producer(&config);
    produce_results(
        &producer,
        &ctx.topics.results,
        &[
            result("globex", "t-no-hook", 1_000, "spam"),
            result("acme", "t-hook", 1_000, "billing"),
        ],
    )
    .await;
    let writer = Writer::start(config);
    let (verified, triage) = tokio::time::timeout(WAIT, verified_rx.recv())
        .await
        .expect("a delivery")
        .unwrap();
    assert!(verified, "the signature does not verify");
    assert_eq!(
        (triage.tenant_id.as_str(), triage.ticket_id.as_str()),
        ("acme", "t-hook")
    );
    assert_eq!(receiver.attempts.load(Ordering::SeqCst), 2);
    wait_until("the delivery to be counted", WAIT, || async {
        let delivered = writer
            .metric("triage_result_writer_webhook_deliveries_total{outcome=\"delivered\"}")
            .await?;
        (delivered == 1.0).then_some(())
    })
    .await;
    // globex has no webhook: nothing else arrives.
    assert!(verified_rx.try_recv().is_err());
    writer.stop().await;
    server.abort();
    Db::connect(&ctx.db_schema).await.drop_schema().await;
}
