//! The result-writer benchmark's load and measurements (driven by `deploy/bench/result-writer.sh`):
//!
//! - `produce`: creates a topic and fills it with `InferenceResult` records, as fast as the broker
//!   takes them, before the writer starts, so that the writer alone is measured.
//! - `throughput`: waits until the schema's table holds `count` rows and reports rows per second
//!   between the first and the last batch's `written_at`.
//! - `latency`: with the writer running and caught up, produces results at a steady rate while
//!   listening on the writer's live stream (`GET /v1/triage/stream`, which announces a row only
//!   after its commit) and reports, per result, the time from the broker's acknowledgement (the
//!   result is on the topic) to its announcement (its row is readable).
//! - `cleanup`: deletes the run's topics and schema.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use triage_proto::{
    ContentType,
    v1::{InferenceResult, TokenUsage},
};

#[derive(Parser)]
#[command(about = "Load and measurements for the result-writer benchmark")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Produce {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 12)]
        partitions: i32,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
        #[arg(long, default_value = "bench")]
        tenant: String,
    },
    Throughput {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        schema: String,
        #[arg(long)]
        count: i64,
        #[arg(long, default_value = "300s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    Latency {
        #[arg(long)]
        topic: String,
        /// Base URL of the writer's read API.
        #[arg(long)]
        api: String,
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "bench")]
        tenant: String,
        /// Results per second.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = 5_000)]
        count: usize,
    },
    Cleanup {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        schema: String,
        #[arg(long, num_args = 1..)]
        topics: Vec<String>,
    },
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Produce {
                topic,
                partitions,
                count,
                tenant,
            } => produce(&cli.bootstrap, &topic, partitions, count, &tenant).await,
            Command::Throughput {
                database_url,
                schema,
                count,
                timeout,
            } => throughput(&database_url, &schema, count, timeout).await,
            Command::Latency {
                topic,
                api,
                key,
                tenant,
                rate,
                count,
            } => latency(&cli.bootstrap, &topic, &api, &key, &tenant, rate, count).await,
            Command::Cleanup {
                database_url,
                schema,
                topics,
            } => cleanup(&cli.bootstrap, &database_url, &schema, &topics).await,
        }
    })
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

fn sample(tenant: &str, ticket_id: String) -> InferenceResult {
    let now = triage_proto::timestamp(SystemTime::now());
    InferenceResult {
        tenant_id: tenant.to_owned(),
        task_id: format!("task-{ticket_id}"),
        category: "billing".into(),
        priority: "p2".into(),
        suggested_reply: "Thanks for reaching out. We have refunded the duplicate charge; it will \
                          appear on your statement within five business days."
            .into(),
        confidence: 0.91,
        model: "llm-sim-1".into(),
        prompt_version: "triage-v1".into(),
        usage: Some(TokenUsage {
            prompt_tokens: 412,
            completion_tokens: 63,
            total_tokens: 475,
        }),
        cost_usd: 0.000_12,
        ticket_created_at: Some(now),
        accepted_at: Some(now),
        triaged_at: Some(now),
        provider_note: "llm-sim: not a real model".into(),
        ticket_id,
        ..Default::default()
    }
}

fn headers() -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some(ContentType::PROTOBUF_MIME),
    })
}

fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .context("failed to create the producer")
}

async fn produce(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    count: usize,
    tenant: &str,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await?;
    let producer = producer(bootstrap)?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let sends = futures::stream::iter(0..count).map(|i| {
        let producer = producer.clone();
        let result = sample(tenant, format!("{}-{i}", &run[..8]));
        async move {
            let payload = triage_proto::encode(&result, ContentType::Protobuf);
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(&result.ticket_id)
                        .payload(&payload)
                        .headers(headers()),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(error, _)| error)
        }
    });
    let mut acknowledged = sends.buffer_unordered(10_000);
    while let Some(outcome) = acknowledged.next().await {
        outcome.context("the broker refused a result")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "produced={count} topic={topic} partitions={partitions} seconds={seconds:.2} rate={:.0}/s",
        count as f64 / seconds
    );
    Ok(())
}

async fn connect_db(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn throughput(
    database_url: &str,
    schema: &str,
    count: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = connect_db(database_url).await?;
    let started = Instant::now();
    let sql =
        format!("SELECT count(*), min(written_at), max(written_at) FROM {schema}.triage_results");
    loop {
        if let Ok(row) = client.query_one(&sql, &[]).await {
            let rows: i64 = row.get(0);
            if rows >= count {
                let first: chrono::DateTime<chrono::Utc> = row.get(1);
                let last: chrono::DateTime<chrono::Utc> = row.get(2);
                let span = (last - first).to_std()?.as_secs_f64();
                println!(
                    "rows={rows} first_to_last_batch_seconds={span:.2} throughput_rows_per_s={:.0} wall_seconds_from_start={:.2}",
                    rows as f64 / span,
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            bail!("fewer than {count} rows after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn latency(
    bootstrap: &str,
    topic: &str,
    api: &str,
    key: &str,
    tenant: &str,
    rate: u64,
    count: usize,
) -> anyhow::Result<()> {
    let response = reqwest::Client::new()
        .get(format!("{api}/v1/triage/stream"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let producer = producer(bootstrap)?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (topic_owned, tenant_owned) = (topic.to_owned(), tenant.to_owned());
    let producing = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..count {
            ticker.tick().await;
            let producer = producer.clone();
            let result = sample(&tenant_owned, format!("lat-{}-{i}", &run[..8]));
            let (topic, acked_tx) = (topic_owned.clone(), acked_tx.clone());
            sends.spawn(async move {
                let payload = triage_proto::encode(&result, ContentType::Protobuf);
                let sent = producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&result.ticket_id)
                            .payload(&payload)
                            .headers(headers()),
                        Duration::from_secs(30),
                    )
                    .await;
                if sent.is_ok() {
                    let _ = acked_tx.send((result.ticket_id, Instant::now()));
                }
            });
        }
        while sends.join_next().await.is_some() {}
    });

    let mut acked: HashMap<String, Instant> = HashMap::with_capacity(count);
    let mut announced: HashMap<String, Instant> = HashMap::with_capacity(count);
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let deadline = Instant::now()
        + Duration::from_secs(60)
        + Duration::from_millis(1000 * count as u64 / rate.max(1));
    while announced.len() < count && Instant::now() < deadline {
        while let Ok((ticket, at)) = acked_rx.try_recv() {
            acked.insert(ticket, at);
        }
        let chunk = match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(chunk)) => chunk?,
            Ok(None) => bail!("the stream ended"),
            Err(_) => continue,
        };
        let received_at = Instant::now();
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(id) = event.lines().find_map(|line| line.strip_prefix("id:")) {
                let ticket = id.trim().split('/').next().unwrap_or_default().to_owned();
                if ticket.starts_with("lat-") {
                    announced.insert(ticket, received_at);
                }
            }
            if event.contains("event: lagged") {
                bail!("the stream lagged; lower the rate");
            }
        }
    }
    producing.await?;
    while let Ok((ticket, at)) = acked_rx.try_recv() {
        acked.insert(ticket, at);
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    for (ticket, announced_at) in &announced {
        if let Some(acked_at) = acked.get(ticket) {
            // An announcement can beat the producer's acknowledgement callback by a hair.
            let micros = announced_at
                .saturating_duration_since(*acked_at)
                .as_micros() as u64;
            histogram.record(micros.max(1))?;
        }
    }
    if histogram.len() < count as u64 {
        bail!("only {} of {count} results were announced", histogram.len());
    }
    println!(
        "latency_results={} rate={rate}/s p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        histogram.len(),
        histogram.value_at_quantile(0.50) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0
    );
    Ok(())
}

async fn cleanup(
    bootstrap: &str,
    database_url: &str,
    schema: &str,
    topics: &[String],
) -> anyhow::Result<()> {
    if !result_writer::config::is_plain_identifier(schema) {
        bail!("{schema:?} is not a plain schema name");
    }
    connect_db(database_url)
        .await?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await?;
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    admin.delete_topics(&names, &AdminOptions::new()).await?;
    Ok(())
}
