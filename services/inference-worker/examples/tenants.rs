//! Tenant benchmarks on the local stack, with release workers and llm-sim as separate processes.
//!
//! - `scale-out`: one tenant's tasks (keyed by ticket id) against 1, 2 and 4 workers, the
//!   provider's limit out of the way: each run should reach workers × window ÷ latency.
//! - `fairness`: tenant B's tickets alone, then behind tenant A's backlog at the provider's limit:
//!   B's accepted → LLM request times in both cases, and A's share of the limit meanwhile.
//!
//! cargo run --release -p inference-worker --example tenants -- scale-out --tasks 1500
//! cargo run --release -p inference-worker --example tenants -- fairness --backlog 20000
//!
//! Times come from the results: a task's accepted time is set when it is published, its LLM
//! request started at `triaged_at − llm_latency_ms` (llm-sim answers after a fixed latency).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use clap::{Parser, Subcommand};
use rdkafka::{Message, consumer::StreamConsumer};
use triage_proto::v1::{InferenceResult, InferenceTask};
use triage_runtime::{config::KafkaConfig, kafka::producer::ContractProducer};
use triage_test_support::{ServiceProcess, Stack, TestContext, consumer, free_port};

/// The worker tests' fixtures: the bench publishes the same tasks the tests do.
#[path = "../tests/common/mod.rs"]
mod common;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// The directory holding the release binaries (the bench script passes cargo's own).
    #[arg(long)]
    bin_dir: PathBuf,
}

#[derive(Subcommand)]
enum Scenario {
    ScaleOut {
        #[arg(long, default_value_t = 1500)]
        tasks: usize,
        #[arg(long, default_value_t = 2000)]
        latency_ms: u64,
        /// Calls at once per worker (`tenants.call_window`).
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<usize>,
    },
    Fairness {
        /// Tenant A's tasks, published before B's.
        #[arg(long, default_value_t = 20_000)]
        backlog: usize,
        /// Tenant B's tickets, one every `--spacing-ms`.
        #[arg(long, default_value_t = 20)]
        small: usize,
        #[arg(long, default_value_t = 100)]
        spacing_ms: u64,
        #[arg(long, default_value_t = 6000)]
        rpm: u64,
        #[arg(long, default_value_t = 500)]
        latency_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(async {
        match args.scenario {
            Scenario::ScaleOut {
                tasks,
                latency_ms,
                window,
                workers,
            } => {
                println!(
                    "| workers | window | latency | tickets | tickets/s (all) | tickets/s (first 90 %) | target | share (all / first 90 %) |"
                );
                println!("|---|---|---|---|---|---|---|---|");
                for count in workers {
                    scale_out(&args.bin_dir, tasks, latency_ms, window, count).await?;
                }
                Ok(())
            }
            Scenario::Fairness {
                backlog,
                small,
                spacing_ms,
                rpm,
                latency_ms,
            } => fairness(&args.bin_dir, backlog, small, spacing_ms, rpm, latency_ms).await,
        }
    })
}

fn start_sim(bin_dir: &Path, rpm: u64, latency_ms: u64) -> anyhow::Result<(Child, String)> {
    let port = free_port();
    let child = Command::new(bin_dir.join("llm-sim"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--rpm", &rpm.to_string(), "--burst-ms", "1000"])
        .args([
            "--latency-ms",
            &latency_ms.to_string(),
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((child, format!("http://127.0.0.1:{port}")))
}

fn start_worker(
    bin_dir: &Path,
    context: &TestContext,
    sim_url: &str,
    rpm: u64,
    window: usize,
) -> ServiceProcess {
    let stack = Stack::get();
    let mut env = context.service_env();
    env.extend(
        [
            (
                "TRIAGE_CONSUMER__GROUP_ID",
                context.group("inference-worker"),
            ),
            ("TRIAGE_CONSUMER__MAX_IN_FLIGHT", "32768".to_owned()),
            ("TRIAGE_TENANTS__CALL_WINDOW", window.to_string()),
            ("TRIAGE_CACHE__REDIS_URL", stack.redis_url.clone()),
            ("TRIAGE_CACHE__KEY_PREFIX", context.redis_prefix.clone()),
            ("TRIAGE_LLM__BASE_URL", format!("{sim_url}/v1")),
            ("TRIAGE_RATE_LIMIT__REQUESTS_PER_MINUTE", rpm.to_string()),
            ("TRIAGE_RATE_LIMIT__TOKENS_PER_MINUTE", "0".to_owned()),
            ("TRIAGE_TELEMETRY__LOG_LEVEL", "warn".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    ServiceProcess::spawn(&bin_dir.join("inference-worker"), &[], &env)
}

fn producer() -> anyhow::Result<ContractProducer> {
    let kafka = KafkaConfig {
        bootstrap_servers: Stack::get().kafka_bootstrap.clone(),
        ..Default::default()
    };
    Ok(ContractProducer::new(
        &kafka,
        "bench",
        triage_proto::ContentType::Protobuf,
        Duration::from_secs(30),
    )?)
}

fn tenant_task(tenant: &str, ticket: &str) -> InferenceTask {
    let mut task = common::task(
        ticket,
        "I was charged twice for my March invoice, please refund.",
    );
    task.tenant_id = tenant.to_owned();
    task.accepted_at = Some(triage_proto::timestamp(SystemTime::now()));
    task
}

/// Publishes tasks keyed by ticket id, as the dispatch stage does.
async fn publish(
    producer: &ContractProducer,
    topic: &str,
    tasks: Vec<InferenceTask>,
) -> anyhow::Result<()> {
    let sends = tasks.into_iter().map(|task| async move {
        producer
            .send(
                topic,
                &task.ticket_id,
                &task,
                &opentelemetry::Context::new(),
            )
            .await
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    Ok(())
}

async fn next_result(results: &StreamConsumer) -> anyhow::Result<InferenceResult> {
    let message = tokio::time::timeout(Duration::from_secs(120), results.recv()).await??;
    Ok(triage_proto::decode(
        message.payload().unwrap_or_default(),
        None,
    )?)
}

async fn scale_out(
    bin_dir: &Path,
    tasks: usize,
    latency_ms: u64,
    window: usize,
    workers: usize,
) -> anyhow::Result<()> {
    let context = TestContext::new(&format!("bench-scale{workers}"));
    context.create_topics(12).await;
    let (mut sim, sim_url) = start_sim(bin_dir, 10_000_000, latency_ms)?;
    let results = consumer(&context.topics.results);
    let producer = producer()?;
    let processes: Vec<_> = (0..workers)
        .map(|_| start_worker(bin_dir, &context, &sim_url, 10_000_000, window))
        .collect();
    for process in &processes {
        process.wait_ready(Duration::from_secs(60)).await;
    }
    // Every worker holds partitions before the clock starts, and a warm-up wave has run.
    triage_test_support::wait_for_settled_group(
        &context.group("inference-worker"),
        workers,
        Duration::from_secs(120),
    )
    .await;
    let warm_up: Vec<_> = (0..48)
        .map(|i| tenant_task("acme", &format!("{}-warm{i}", context.id)))
        .collect();
    publish(&producer, &context.topics.inference_tasks, warm_up).await?;
    let mut warm = 0;
    while warm < 48 {
        next_result(&results).await?;
        warm += 1;
    }
    let batch: Vec<_> = (0..tasks)
        .map(|i| tenant_task("acme", &format!("{}-{i}", context.id)))
        .collect();
    let started = Instant::now();
    publish(&producer, &context.topics.inference_tasks, batch).await?;
    let mut seen = std::collections::HashSet::new();
    let mut at_90_percent = None;
    while seen.len() < tasks {
        if at_90_percent.is_none() && seen.len() * 10 >= tasks * 9 {
            at_90_percent = Some(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "only {} results",
            seen.len()
        );
        let result = next_result(&results).await?;
        seen.insert(result.ticket_id);
    }
    let seconds = started.elapsed().as_secs_f64();
    for process in &processes {
        process.signal("TERM");
    }
    for process in &processes {
        process.wait_exit(Duration::from_secs(30)).await;
    }
    let _ = sim.kill();
    let rate = tasks as f64 / seconds;
    // Without the last partial wave of calls, which no number of workers can shorten.
    let rate_90 = at_90_percent.map_or(rate, |at| (tasks * 9 / 10) as f64 / at);
    let target = (workers * window) as f64 / (latency_ms as f64 / 1000.0);
    println!(
        "| {workers} | {window} | {latency_ms} ms | {tasks} | {rate:.1} | {rate_90:.1} | {target:.1} | {:.0} % / {:.0} % |",
        rate / target * 100.0,
        rate_90 / target * 100.0
    );
    Ok(())
}

async fn fairness(
    bin_dir: &Path,
    backlog: usize,
    small: usize,
    spacing_ms: u64,
    rpm: u64,
    latency_ms: u64,
) -> anyhow::Result<()> {
    let context = TestContext::new("bench-fairness");
    context.create_topics(12).await;
    let (mut sim, sim_url) = start_sim(bin_dir, rpm, latency_ms)?;
    let results = consumer(&context.topics.results);
    let producer = producer()?;
    let worker = start_worker(bin_dir, &context, &sim_url, rpm, 64);
    worker.wait_ready(Duration::from_secs(60)).await;

    // One ticket first, not counted: the first produce and connections are set up once.
    small_tenant(&producer, &context, &results, "warm", 1, 0).await?;
    // Tenant B alone: its latency with no backlog at all.
    let alone = small_tenant(&producer, &context, &results, "alone", small, spacing_ms).await?;

    // Tenant A's backlog, then B again once A keeps the provider at its limit.
    let backlog_tasks: Vec<_> = (0..backlog)
        .map(|i| tenant_task("acme", &format!("{}-a{i}", context.id)))
        .collect();
    publish(&producer, &context.topics.inference_tasks, backlog_tasks).await?;
    let mut a_done = 0usize;
    while a_done < 200 {
        if next_result(&results).await?.tenant_id == "acme" {
            a_done += 1;
        }
    }
    let a_before = a_done;
    let window_started = Instant::now();
    let (behind, a_during) =
        small_tenant_counting(&producer, &context, &results, small, spacing_ms).await?;
    let window_seconds = window_started.elapsed().as_secs_f64();
    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(60)).await;
    let _ = sim.kill();

    let limit = rpm as f64 / 60.0;
    let p = |mut values: Vec<f64>, q: f64| {
        values.sort_by(f64::total_cmp);
        let index = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
        values[index]
    };
    let a_rate = a_during as f64 / window_seconds;
    let b_rate = small as f64 / window_seconds;
    println!("| tenant B's accepted → LLM request | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, values) in [("alone", &alone), ("behind A's backlog", &behind)] {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms |",
            p(values.clone(), 0.5),
            p(values.clone(), 0.99),
            p(values.clone(), 1.0)
        );
    }
    println!(
        "backlog {backlog} tasks of A (A had {a_before} results when B started); limit {limit:.1}/s; \
         while B ran ({window_seconds:.1} s): A {a_rate:.1}/s + B {b_rate:.1}/s = {:.0} % of the limit; \
         B p99 behind the backlog / alone = {:.2}",
        (a_rate + b_rate) / limit * 100.0,
        p(behind.clone(), 0.99) / p(alone.clone(), 0.99)
    );
    Ok(())
}

/// Tenant B's tickets, one every `spacing_ms`; each one's accepted → LLM request in ms.
async fn small_tenant(
    producer: &ContractProducer,
    context: &TestContext,
    results: &StreamConsumer,
    round: &str,
    small: usize,
    spacing_ms: u64,
) -> anyhow::Result<Vec<f64>> {
    let sender = send_spaced(producer, context, round, small, spacing_ms);
    let mut waits = Vec::new();
    let collect = async {
        while waits.len() < small {
            let result = next_result(results).await?;
            if result.tenant_id == "globex" {
                waits.push(accepted_to_request_ms(&result));
            }
        }
        anyhow::Ok(())
    };
    let (sent, collected) = tokio::join!(sender, collect);
    sent?;
    collected?;
    Ok(waits)
}

/// As [`small_tenant`] behind the backlog, also counting A's results meanwhile.
async fn small_tenant_counting(
    producer: &ContractProducer,
    context: &TestContext,
    results: &StreamConsumer,
    small: usize,
    spacing_ms: u64,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let sender = send_spaced(producer, context, "behind", small, spacing_ms);
    let mut waits = Vec::new();
    let mut a_results = 0usize;
    let collect = async {
        while waits.len() < small {
            let result = next_result(results).await?;
            if result.tenant_id == "globex" {
                waits.push(accepted_to_request_ms(&result));
            } else {
                a_results += 1;
            }
        }
        anyhow::Ok(())
    };
    let (sent, collected) = tokio::join!(sender, collect);
    sent?;
    collected?;
    Ok((waits, a_results))
}

async fn send_spaced(
    producer: &ContractProducer,
    context: &TestContext,
    round: &str,
    small: usize,
    spacing_ms: u64,
) -> anyhow::Result<()> {
    for i in 0..small {
        let task = tenant_task("globex", &format!("{}-b{round}{i}", context.id));
        publish(producer, &context.topics.inference_tasks, vec![task]).await?;
        tokio::time::sleep(Duration::from_millis(spacing_ms)).await;
    }
    Ok(())
}

fn accepted_to_request_ms(result: &InferenceResult) -> f64 {
    let millis = |timestamp: &Option<triage_proto::wkt::Timestamp>| {
        timestamp.as_ref().map_or(0.0, |t| {
            t.seconds as f64 * 1000.0 + f64::from(t.nanos) / 1e6
        })
    };
    millis(&result.triaged_at) - f64::from(result.llm_latency_ms) - millis(&result.accepted_at)
}
