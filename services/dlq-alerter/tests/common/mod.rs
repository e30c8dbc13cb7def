//! What the dlq-alerter integration tests share: a local HTTP sink that speaks the webhook
//! protocol (records every post, can answer 429 with `Retry-After` or 500, or be down), dead
//! letters to put on the topic, and the service run in-process.

#![allow(dead_code)]

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
};
use dlq_alerter::Config;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use triage_proto::{
    ContentType, Contract,
    v1::{ChatMessage, DeadLetter, ErrorClass, InferenceTask, RecordHeader},
};
use triage_runtime::{
    config::{KafkaConfig, Secret, TopicProvisioning},
    shutdown,
};
use triage_test_support::{Stack, TestContext, client_config, free_port};

pub const DEADLINE: Duration = Duration::from_secs(60);

/// One post the sink accepted.
#[derive(Clone, Debug)]
pub struct Post {
    pub path: String,
    pub headers: HeaderMap,
    pub raw: String,
    pub body: Value,
    pub at: Instant,
}

/// One post the sink received, accepted or not.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub path: String,
    pub status: u16,
    pub at: Instant,
}

/// A scripted answer, used once, before the sink goes back to answering 200.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    TooManyRequests { retry_after_secs: u64 },
    Status(u16),
}

#[derive(Default)]
struct SinkState {
    posts: Mutex<Vec<Post>>,
    attempts: Mutex<Vec<Attempt>>,
    script: Mutex<VecDeque<Reply>>,
}

/// A webhook receiver on 127.0.0.1. Every answer says `Connection: close`, so that stopping
/// the listener really makes the next post fail to connect.
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<SinkState>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Sink {
            addr,
            state: Arc::default(),
            server: Mutex::new(None),
        };
        sink.serve(listener);
        sink
    }

    fn serve(&self, listener: TcpListener) {
        let router = Router::new()
            .route("/{*path}", post(receive))
            .with_state(Arc::clone(&self.state));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        *self.server.lock().unwrap() = Some(task);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops listening: posts fail with "connection refused" until [`Sink::restart`].
    pub fn stop(&self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot listen on {} again: {error}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn script(&self, replies: &[Reply]) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn posts(&self) -> Vec<Post> {
        self.state.posts.lock().unwrap().clone()
    }

    pub fn posts_to(&self, path: &str) -> Vec<Post> {
        self.posts()
            .into_iter()
            .filter(|p| p.path == path)
            .collect()
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.state.attempts.lock().unwrap().clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn receive(
    State(state): State<Arc<SinkState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = state.script.lock().unwrap().pop_front();
    let status = match reply {
        Some(Reply::TooManyRequests { .. }) => 429,
        Some(Reply::Status(status)) => status,
        None => 200,
    };
    state.attempts.lock().unwrap().push(Attempt {
        path: uri.path().to_owned(),
        status,
        at: Instant::now(),
    });
    let close = [(header::CONNECTION, "close")];
    match reply {
        Some(Reply::TooManyRequests { retry_after_secs }) => (
            StatusCode::TOO_MANY_REQUESTS,
            close,
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
            "rate_limited",
        )
            .into_response(),
        Some(Reply::Status(status)) => (
            StatusCode::from_u16(status).unwrap(),
            close,
            "internal_error",
        )
            .into_response(),
        None => {
            let raw = String::from_utf8_lossy(&body).into_owned();
            let body = serde_json::from_str(&raw).expect("posts are JSON");
            state.posts.lock().unwrap().push(Post {
                path: uri.path().to_owned(),
                headers,
                raw,
                body,
                at: Instant::now(),
            });
            (StatusCode::OK, close, "ok").into_response()
        }
    }
}

/// The service's configuration for one test: its topics and group, short delivery backoff.
pub fn config(
    context: &TestContext,
    slack_url: Option<String>,
    webhook_url: Option<String>,
) -> Config {
    let mut config = Config {
        kafka: KafkaConfig {
            bootstrap_servers: Stack::get().kafka_bootstrap.clone(),
            ..Default::default()
        },
        topic_provisioning: TopicProvisioning {
            enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    config.topics.tickets_created = context.topics.tickets_created.clone();
    config.topics.inference_tasks = context.topics.inference_tasks.clone();
    config.topics.results = context.topics.results.clone();
    config.topics.dead_letters = context.topics.dead_letters.clone();
    config.consumer.group_id = context.group("alerter");
    config.consumer.commit_interval = Duration::from_millis(200);
    config.slack.webhook_url = slack_url.map(Secret::new);
    config.webhook.url = webhook_url.map(Secret::new);
    config.delivery.min_backoff = Duration::from_millis(100);
    config.delivery.max_backoff = Duration::from_millis(500);
    config.delivery.request_timeout = Duration::from_secs(5);
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.admin.drain_timeout = Duration::from_secs(10);
    config
}

/// The service running in this process.
pub struct Running {
    trigger: shutdown::Trigger,
    task: JoinHandle<anyhow::Result<()>>,
    pub admin: SocketAddr,
}

impl Running {
    pub fn start(config: Config) -> Running {
        let (trigger, shutdown) = shutdown::channel();
        let admin = config.admin.listen;
        let task = tokio::spawn(dlq_alerter::run(config, shutdown));
        Running {
            trigger,
            task,
            admin,
        }
    }

    /// The `/metrics` text, once the admin server answers.
    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{}/metrics", self.admin)).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the service stops")
            .unwrap()
            .expect("the service stops cleanly");
    }
}

/// The value of the first sample of `name` whose labels contain every `labels` entry.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap_or_default();
            (series == name || series.starts_with(&format!("{name}{{")))
                && labels.iter().all(|label| series.contains(label))
        })
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

pub fn header(key: &str, value: &str) -> RecordHeader {
    RecordHeader {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

/// An inference task whose last user message holds personal data.
pub fn task(ticket: &str, tenant: &str, user_text: &str) -> InferenceTask {
    InferenceTask {
        task_id: format!("task-{ticket}"),
        ticket_id: ticket.into(),
        tenant_id: tenant.into(),
        prompt_version: "triage-v1".into(),
        model: "llm-sim".into(),
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "You triage support tickets".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: user_text.into(),
            },
        ],
        idempotency_key: triage_proto::idempotency_key(tenant, ticket, "triage-v1", "llm-sim"),
        ..Default::default()
    }
}

/// A dead letter of `task`, as the inference worker would write it.
pub fn dead_letter_of_task(
    context: &TestContext,
    id: &str,
    class: ErrorClass,
    task: &InferenceTask,
    content_type: ContentType,
    last_failure: SystemTime,
) -> DeadLetter {
    DeadLetter {
        id: id.into(),
        original_key: task.ticket_id.as_bytes().to_vec(),
        original_value: triage_proto::encode(task, content_type),
        original_headers: vec![
            header("content-type", content_type.as_mime()),
            header("ce_type", InferenceTask::MESSAGE_TYPE),
            header("schema-version", "1"),
            header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
        source_topic: context.topics.inference_tasks.clone(),
        source_partition: 2,
        source_offset: 1234,
        error_class: class as i32,
        error_message: format!(
            "the model answered twice with something that is not a triage ({id})"
        ),
        attempts: 3,
        first_failure_at: Some(triage_proto::timestamp(
            last_failure - Duration::from_secs(90),
        )),
        last_failure_at: Some(triage_proto::timestamp(last_failure)),
        failed_service: "inference-worker".into(),
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: String::new(),
        ticket_id: task.ticket_id.clone(),
        tenant_id: task.tenant_id.clone(),
        ..Default::default()
    }
}

/// A record for the dead-letter topic: raw bytes with optional headers.
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A dead letter as the pipeline's producer writes it: protobuf with its headers.
    pub fn dead_letter(dead_letter: &DeadLetter) -> Record {
        Record {
            key: dead_letter.ticket_id.clone(),
            value: triage_proto::encode(dead_letter, ContentType::Protobuf),
            headers: vec![
                ("content-type".into(), ContentType::PROTOBUF_MIME.into()),
                ("ce_type".into(), DeadLetter::MESSAGE_TYPE.into()),
            ],
        }
    }
}

/// Produces every record at once and waits for all acknowledgements.
pub async fn produce_all(topic: &str, records: &[Record]) {
    let producer: FutureProducer = client_config()
        .set("linger.ms", "5")
        .create()
        .expect("test producer");
    let sends = records.iter().map(|record| {
        let mut headers = OwnedHeaders::new();
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let future_record = FutureRecord::to(topic)
            .key(&record.key)
            .payload(&record.value)
            .headers(headers);
        producer.send(future_record, Duration::from_secs(30))
    });
    for result in futures::future::join_all(sends).await {
        result.unwrap_or_else(|(error, _)| panic!("produce to {topic}: {error}"));
    }
}

/// Sum of the offsets `group` committed on `partitions` partitions of `topic`.
pub fn committed_total(group: &str, topic: &str, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| triage_test_support::committed_offset(group, topic, p).unwrap_or(0))
        .sum()
}
