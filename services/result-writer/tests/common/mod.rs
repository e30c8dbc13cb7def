//! What the result-writer tests share: a configuration pointed at one test's topics and schema,
//! results to produce, the writer running in-process, and direct reads of its table.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use result_writer::{Config, auth::ApiKeyEntry};
use sha2::{Digest, Sha256};
use triage_proto::{
    ContentType,
    v1::{InferenceResult, TokenUsage},
};
use triage_runtime::{
    config::Secret,
    kafka::producer::ContractProducer,
    shutdown::{self, Trigger},
};
use triage_test_support::{Stack, TestContext, free_port};

pub const ACME_KEY: &str = "acme-key-0001";
pub const GLOBEX_KEY: &str = "globex-key-0002";

/// The writer's configuration for `ctx`: its topics, group and schema, loopback ports, short
/// retry delays, and API keys for tenants `acme` and `globex`.
pub fn config(ctx: &TestContext) -> Config {
    let stack = Stack::get();
    let mut config = Config::default();
    config.kafka.bootstrap_servers = stack.kafka_bootstrap.clone();
    config.topics.results = ctx.topics.results.clone();
    config.topics.dead_letters = ctx.topics.dead_letters.clone();
    config.consumer.group_id = ctx.group("writer");
    config.consumer.commit_interval = Duration::from_millis(100);
    config.database.url = Secret::new(stack.database_url.clone());
    config.database.schema = ctx.db_schema.clone();
    config.database.pool_size = 4;
    config.database.retry_max_delay = Duration::from_millis(300);
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.admin.drain_timeout = Duration::from_secs(5);
    config.api.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.auth.keys = [("acme", ACME_KEY), ("globex", GLOBEX_KEY)]
        .into_iter()
        .map(|(tenant, key)| ApiKeyEntry {
            tenant: tenant.into(),
            key_sha256: Secret::new(hex::encode(Sha256::digest(key.as_bytes()))),
            role: Default::default(),
        })
        .collect();
    config
}

/// A result as inference-worker produces it.
pub fn result(tenant: &str, ticket: &str, triaged_at_secs: i64, category: &str) -> InferenceResult {
    InferenceResult {
        ticket_id: ticket.into(),
        tenant_id: tenant.into(),
        task_id: format!("task-{ticket}"),
        category: category.into(),
        priority: "p2".into(),
        suggested_reply: format!("Hello, about {ticket}"),
        confidence: 0.875,
        model: "llm-sim-1".into(),
        prompt_version: "triage-v1".into(),
        usage: Some(TokenUsage {
            prompt_tokens: 120,
            completion_tokens: 40,
            total_tokens: 160,
        }),
        cost_usd: 0.000_25,
        accepted_at: Some(triage_proto::timestamp(SystemTime::now())),
        triaged_at: Some(triage_proto::wkt::Timestamp {
            seconds: triaged_at_secs,
            nanos: 0,
        }),
        provider_note: "llm-sim: not a real model".into(),
        ..Default::default()
    }
}

pub fn producer(config: &Config) -> ContractProducer {
    ContractProducer::new(
        &config.kafka,
        "test-producer",
        ContentType::Protobuf,
        Duration::from_secs(10),
    )
    .expect("producer")
}

/// Produces each result keyed by its ticket id, in order, waiting for every acknowledgement.
pub async fn produce_results(
    producer: &ContractProducer,
    topic: &str,
    results: &[InferenceResult],
) {
    for result in results {
        producer
            .send(
                topic,
                &result.ticket_id,
                result,
                &opentelemetry::Context::new(),
            )
            .await
            .expect("produce result");
    }
}

/// Produces `results` to one partition of `topic`, in order.
pub async fn produce_results_to(
    producer: &ContractProducer,
    topic: &str,
    partition: i32,
    results: &[InferenceResult],
) {
    for result in results {
        let payload = triage_proto::encode(result, ContentType::Protobuf);
        let headers = triage_runtime::kafka::headers::for_message::<InferenceResult>(
            "test-producer",
            ContentType::Protobuf,
            &opentelemetry::Context::new(),
        );
        let record = rdkafka::producer::FutureRecord::to(topic)
            .key(&result.ticket_id)
            .payload(&payload)
            .partition(partition)
            .headers(headers);
        producer
            .inner()
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(error, _)| error)
            .expect("produce result");
    }
}

/// The writer, running in this process until stopped.
pub struct Writer {
    trigger: Trigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub admin: SocketAddr,
    pub api: SocketAddr,
}

impl Writer {
    pub fn start(config: Config) -> Self {
        let (trigger, shutdown) = shutdown::channel();
        let admin = config.admin.listen;
        let api = config.api.listen;
        let task = tokio::spawn(result_writer::run(config, shutdown));
        Writer {
            trigger,
            task,
            admin,
            api,
        }
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// The value of a metric line (without labels) on `/metrics`, once it is served.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    pub async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("writer stops within 20 s")
            .expect("writer task")
            .expect("writer ran without error");
    }
}

/// A direct connection to the test's schema.
pub struct Db {
    client: tokio_postgres::Client,
    schema: String,
}

impl Db {
    pub async fn connect(schema: &str) -> Self {
        let (client, connection) =
            tokio_postgres::connect(&Stack::get().database_url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        Db {
            client,
            schema: schema.to_owned(),
        }
    }

    /// Rows in the table, or `None` while it does not exist yet.
    pub async fn count(&self) -> Option<i64> {
        self.client
            .query_one(
                &format!("SELECT count(*) FROM {}.triage_results", self.schema),
                &[],
            )
            .await
            .ok()
            .map(|row| row.get(0))
    }

    pub async fn query(&self, sql_after_from: &str) -> Vec<tokio_postgres::Row> {
        self.client
            .query(
                &format!(
                    "SELECT ticket_id, category, triaged_at, source_offset, tenant_id FROM {}.triage_results {sql_after_from}",
                    self.schema
                ),
                &[],
            )
            .await
            .expect("query")
    }

    /// Runs statements with the test's schema first on the search path.
    pub async fn execute(&self, statements: &str) {
        self.client
            .batch_execute(&format!("SET search_path TO {}; {statements}", self.schema))
            .await
            .expect("execute");
    }

    pub async fn drop_schema(&self) {
        self.client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await
            .expect("drop schema");
    }
}

/// Sum of the committed offsets of `group` over `partitions` partitions of `topic`.
pub async fn committed(group: &str, topic: &str, partitions: i32) -> i64 {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        (0..partitions)
            .map(|partition| {
                triage_test_support::committed_offset(&group, &topic, partition).unwrap_or(0)
            })
            .sum()
    })
    .await
    .expect("offset reader")
}
