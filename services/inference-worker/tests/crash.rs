//! The worker binary killed with SIGKILL while tasks are in flight, then restarted.

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use triage_test_support::{ServiceProcess, TestContext, consumer, read_for, wait_until};

const BINARY: &str = env!("CARGO_BIN_EXE_inference-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_tasks_in_flight_loses_nothing_and_pays_twice_at_most_what_was_in_flight() {
    let context = TestContext::new("kill9");
    context.create_topics(4).await;
    let sim = Sim::start(llm_sim::config::SimConfig {
        latency: llm_sim::config::LatencyConfig::Uniform {
            min_ms: 300,
            max_ms: 3_000,
        },
        ..Default::default()
    })
    .await;
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let batch = tasks(&context, 150);
    publish(&context, &batch).await;
    let env = worker_env(&context, &sim, "3s");

    let worker = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    wait_until("64 calls in flight", DEADLINE, || async {
        (sim.state.stats().report().requests_total >= 64).then_some(())
    })
    .await;
    // Kill while some answers are back (and cached, some also produced) and others are not.
    let mut tickets: HashSet<String> = triage_test_support::read_records(&results, 10, DEADLINE)
        .await
        .iter()
        .map(|record| decode_result(record).ticket_id)
        .collect();
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(5)).await;
    // A call is in flight until its result is cached: calls started minus results cached.
    let started = sim.state.stats().report().requests_total;
    let cached = cached_results(&context.redis_prefix).await;
    let in_flight_at_kill = started - cached;

    let restarted = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    restarted.wait_ready(DEADLINE).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut reused_from_cache = 0u64;
    while tickets.len() < batch.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {} tickets triaged",
            tickets.len(),
            batch.len()
        );
        for record in read_for(&results, Duration::from_millis(500)).await {
            let result = decode_result(&record);
            reused_from_cache += u64::from(result.from_cache);
            tickets.insert(result.ticket_id);
        }
    }
    let duplicates = sim.paid_duplicates();
    println!(
        "calls started before the kill: {started}; cached: {cached}; in flight at the kill: {in_flight_at_kill}; paid duplicates: {duplicates}; results reused from the cache after the restart: {reused_from_cache}"
    );
    assert!(
        cached > 0 && in_flight_at_kill > 0,
        "the kill must land with calls both done and in flight"
    );
    assert!(
        duplicates <= in_flight_at_kill,
        "{duplicates} paid duplicates, more than the {in_flight_at_kill} calls in flight at the kill"
    );
    assert!(
        read_for(&dead_letters, Duration::from_millis(300))
            .await
            .is_empty(),
        "no dead letters"
    );
    restarted.signal("TERM");
    assert!(restarted.wait_exit(Duration::from_secs(15)).await.success());
}

async fn cached_results(prefix: &str) -> u64 {
    let client = redis::Client::open(triage_test_support::Stack::get().redis_url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}result:*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    keys.len() as u64
}
