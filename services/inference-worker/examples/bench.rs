//! Worker benchmark driver: a backlog of tasks on the local stack, the release worker and
//! llm-sim as separate processes, and what the worker achieved against the provider's limit.
//!
//! cargo run --release -p inference-worker --example bench -- --tasks 2000 --rpm 1200 --latency-ms 500
//!
//! Prints one JSON line: throughput (overall, and steady state after the first 10 % of results)
//! as a share of the limit, 429s and paid duplicates from llm-sim's stats, the worker's CPU time
//! per task and its peak resident memory.

use std::{
    collections::HashSet,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use rdkafka::Message;
use triage_proto::v1::InferenceResult;
use triage_runtime::{config::KafkaConfig, kafka::producer::ContractProducer};
use triage_test_support::{
    MachineCpu, ServiceProcess, Stack, TestContext, consumer, free_port, steal_share_since,
    target_dir, workspace_binary,
};

/// The worker tests' fixtures: the bench publishes the same tasks the tests do.
#[path = "../tests/common/mod.rs"]
mod common;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// The provider's requests-per-minute limit (llm-sim and the worker are told the same).
    #[arg(long, default_value_t = 1200)]
    rpm: u64,
    #[arg(long, default_value_t = 500)]
    latency_ms: u64,
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// The provider's burst allowance (llm-sim's bucket size) in milliseconds of the limit.
    #[arg(long, default_value_t = 1000)]
    burst_ms: u64,
    /// The worker's log filter (its log goes to test-logs/ in the target directory). The service's default,
    /// `info`, also enables the spans every task carries.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let stack = Stack::get();
    let context = TestContext::new("bench-worker");
    context.create_topics(12).await;

    let sim_port = free_port();
    let mut sim = Command::new(workspace_binary("llm-sim"))
        .args(["--listen", &format!("127.0.0.1:{sim_port}")])
        .args([
            "--rpm",
            &args.rpm.to_string(),
            "--burst-ms",
            &args.burst_ms.to_string(),
        ])
        .args([
            "--latency-ms",
            &args.latency_ms.to_string(),
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let sim_url = format!("http://127.0.0.1:{sim_port}");

    // The backlog first: the worker starts on a full topic, as after an outage or a bulk import.
    let kafka = KafkaConfig {
        bootstrap_servers: stack.kafka_bootstrap.clone(),
        ..Default::default()
    };
    let producer = ContractProducer::new(
        &kafka,
        "bench",
        triage_proto::ContentType::Protobuf,
        Duration::from_secs(30),
    )?;
    let sends = (0..args.tasks).map(|i| {
        let task = common::task(
            &format!("{}-{i}", context.id),
            "I was charged twice for my March invoice, please refund.",
        );
        let producer = producer.clone();
        let topic = context.topics.inference_tasks.clone();
        async move {
            producer
                .send(
                    &topic,
                    &format!("tenant-{}", i % 16),
                    &task,
                    &opentelemetry::Context::new(),
                )
                .await
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }

    let results = consumer(&context.topics.results);
    let mut env = context.service_env();
    env.extend(
        [
            (
                "TRIAGE_CONSUMER__GROUP_ID",
                context.group("inference-worker"),
            ),
            (
                "TRIAGE_CONSUMER__MAX_IN_FLIGHT",
                args.max_in_flight.to_string(),
            ),
            ("TRIAGE_CACHE__REDIS_URL", stack.redis_url.clone()),
            ("TRIAGE_CACHE__KEY_PREFIX", context.redis_prefix.clone()),
            ("TRIAGE_LLM__BASE_URL", format!("{sim_url}/v1")),
            (
                "TRIAGE_RATE_LIMIT__REQUESTS_PER_MINUTE",
                args.rpm.to_string(),
            ),
            ("TRIAGE_RATE_LIMIT__TOKENS_PER_MINUTE", "0".to_owned()),
            ("TRIAGE_TELEMETRY__LOG_LEVEL", args.log_level.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let worker_binary: PathBuf = workspace_binary("inference-worker");
    let worker = ServiceProcess::spawn(&worker_binary, &[], &env);
    worker.wait_ready(Duration::from_secs(60)).await;
    let cpu_at_start = cpu_seconds(worker.pid());
    let machine_at_start = MachineCpu::sample();

    let started = Instant::now();
    let mut seen = HashSet::new();
    let mut arrival = Vec::with_capacity(args.tasks);
    let deadline = Duration::from_secs(3600);
    while seen.len() < args.tasks {
        anyhow::ensure!(started.elapsed() < deadline, "only {} results", seen.len());
        let message = tokio::time::timeout(Duration::from_secs(120), results.recv()).await??;
        let result: InferenceResult =
            triage_proto::decode(message.payload().unwrap_or_default(), None)?;
        if seen.insert(result.ticket_id) {
            arrival.push(started.elapsed().as_secs_f64());
        }
    }
    let cpu = cpu_seconds(worker.pid()) - cpu_at_start;
    let steal_share = steal_share_since(machine_at_start);
    // The worker's own view (rate-limit waits, latencies), kept beside the report.
    let worker_metrics = reqwest::get(worker.admin_url("/metrics"))
        .await?
        .text()
        .await?;
    std::fs::create_dir_all(target_dir().join("bench"))?;
    std::fs::write(
        target_dir().join("bench/inference-worker.metrics"),
        worker_metrics,
    )?;
    let peak_rss_kib = peak_rss_kib(worker.pid());
    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(30)).await;
    let stats: serde_json::Value = reqwest::get(format!("{sim_url}/_sim/stats"))
        .await?
        .json()
        .await?;
    let _ = sim.kill();

    let limit_per_s = args.rpm as f64 / 60.0;
    let total = arrival.len();
    let overall = (total - 1) as f64 / (arrival[total - 1] - arrival[0]);
    let steady_from = total / 10;
    let steady = (total - 1 - steady_from) as f64 / (arrival[total - 1] - arrival[steady_from]);
    let paid_duplicates = llm_sim::stats::paid_duplicates(&stats);
    let report = serde_json::json!({
        "tasks": args.tasks,
        "rpm_limit": args.rpm,
        "latency_ms": args.latency_ms,
        "max_in_flight": args.max_in_flight,
        "seconds": arrival[total - 1],
        "throughput_per_s": overall,
        "share_of_limit": overall / limit_per_s,
        "steady_share_of_limit": steady / limit_per_s,
        "http_429": stats["by_status"]["429"].as_u64().unwrap_or(0),
        "paid_duplicates": paid_duplicates,
        "worker_cpu_seconds": cpu,
        "cpu_us_per_task": cpu * 1e6 / args.tasks as f64,
        "peak_rss_mib": peak_rss_kib as f64 / 1024.0,
        "cpu_steal_share": steal_share,
    });
    println!("{report}");
    Ok(())
}

/// User plus system CPU time of a process, from /proc (clock ticks of 10 ms).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The process's peak resident set size (VmHWM) in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
