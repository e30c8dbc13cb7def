//! Replay end to end: dead letters re-published by `replay --execute` are consumed by the real
//! inference-worker (in this process, against llm-sim over real HTTP and the real Redis) and
//! end as results on the results topic; a filtered-out dead letter produces nothing.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use dlq_alerter::replay::{ReplayArgs, replay};
use rdkafka::Message;
use triage_proto::{
    ContentType,
    v1::{ErrorClass, InferenceResult, InferenceTask, Taxonomy},
};
use triage_runtime::{config::Secret, shutdown};
use triage_test_support::{Stack, TestContext, read_for, read_records};

const MODEL: &str = "gpt-4o-mini";

fn triage_task(ticket: &str, text: &str) -> InferenceTask {
    tenant_task("acme", ticket, text)
}

fn tenant_task(tenant: &str, ticket: &str, text: &str) -> InferenceTask {
    let mut task = task(ticket, tenant, &format!("<ticket>\n{text}\n</ticket>"));
    task.model = MODEL.into();
    task.idempotency_key =
        triage_proto::idempotency_key(&task.tenant_id, ticket, &task.prompt_version, MODEL);
    task.taxonomy = Some(Taxonomy::pipeline_default());
    task
}

/// llm-sim on a free port: its base URL, its state (for its stats) and its stop switch.
async fn start_sim() -> (
    String,
    llm_sim::server::SimState,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let sim = llm_sim::server::SimState::new(llm_sim::SimConfig::default()).unwrap();
    let (sim_stop_tx, sim_stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(llm_sim::server::serve_state(
        listener,
        sim.clone(),
        async move {
            let _ = sim_stop_rx.await;
        },
    ));
    (sim_url, sim, sim_stop_tx)
}

/// A worker of this test's topics and Redis prefix, running in this process.
fn start_worker(
    context: &TestContext,
    sim_url: &str,
) -> (
    shutdown::Trigger,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let stack = Stack::get();
    let mut worker_config = inference_worker::Config::default();
    worker_config.kafka.bootstrap_servers = stack.kafka_bootstrap.clone();
    worker_config.topics.tickets_created = context.topics.tickets_created.clone();
    worker_config.topics.inference_tasks = context.topics.inference_tasks.clone();
    worker_config.topics.results = context.topics.results.clone();
    worker_config.topics.dead_letters = context.topics.dead_letters.clone();
    worker_config.consumer.group_id = context.group("inference-worker");
    worker_config.cache.redis_url = Secret::new(stack.redis_url.clone());
    worker_config.cache.key_prefix = context.redis_prefix.clone();
    worker_config.llm.base_url = sim_url.to_owned();
    worker_config.rate_limit.requests_per_minute = 60_000;
    worker_config.rate_limit.tokens_per_minute = 0;
    worker_config.admin.listen = "127.0.0.1:0".parse().unwrap();
    worker_config.admin.drain_timeout = Duration::from_secs(10);
    let (worker_trigger, worker_shutdown) = shutdown::channel();
    let worker = tokio::spawn(inference_worker::run(worker_config, worker_shutdown));
    (worker_trigger, worker)
}

#[tokio::test]
async fn replayed_dead_letters_of_two_tenants_sharing_a_ticket_id_stay_apart() {
    let context = TestContext::new("dlq-replay-tenants");
    context.create_topics(2).await;
    let (sim_url, sim, sim_stop_tx) = start_sim().await;

    // Both helpdesks number their tickets; both have a ticket of this id.
    let shared = ticket_id(&context, "42");
    let now = SystemTime::now();
    let dead_letters = [
        ("acme", "I was charged twice for my invoice, please refund"),
        ("globex", "The dashboard is down with a 503 outage"),
    ]
    .map(|(tenant, text)| {
        let mut dead_letter = dead_letter_of_task(
            &context,
            &format!("dl-{tenant}-{shared}"),
            ErrorClass::RetriesExhausted,
            &tenant_task(tenant, &shared, text),
            ContentType::Protobuf,
            now,
        );
        dead_letter.tenant_id = tenant.into();
        dead_letter
    });
    produce_all(
        &context.topics.dead_letters,
        &dead_letters
            .iter()
            .map(Record::dead_letter)
            .collect::<Vec<_>>(),
    )
    .await;
    let (worker_trigger, worker) = start_worker(&context, &sim_url);
    let consumer = triage_test_support::consumer(&context.topics.results);

    // One tenant at a time, by the replay filter: each replay yields that tenant's result only.
    let mut categories = Vec::new();
    for tenant in ["globex", "acme"] {
        let args = ReplayArgs {
            tenant: Some(tenant.into()),
            execute: true,
            ..Default::default()
        };
        let mut out = Vec::new();
        let report = replay(&config(&context, None, None), &args, &mut out)
            .await
            .unwrap();
        assert_eq!(
            report.replayed,
            vec![format!("dl-{tenant}-{shared}")],
            "{}",
            String::from_utf8_lossy(&out)
        );
        let records = read_records(&consumer, 1, DEADLINE).await;
        let result: InferenceResult = triage_proto::decode(
            records[0].payload().unwrap(),
            Some(ContentType::PROTOBUF_MIME),
        )
        .unwrap();
        assert_eq!(
            (result.tenant_id.as_str(), result.ticket_id.as_str()),
            (tenant, shared.as_str()),
            "the replayed task keeps its tenant"
        );
        assert!(
            !result.from_cache,
            "{tenant}'s result came from another tenant's cache"
        );
        categories.push(result.category);
    }
    assert_eq!(
        categories,
        ["outage", "billing"],
        "each result is its own text's triage"
    );
    let paid = sim.stats().report().paid_requests_by_key;
    assert_eq!(paid.len(), 2, "two tenants, two paid calls: {paid:?}");
    assert!(paid.values().all(|count| *count == 1), "{paid:?}");

    worker_trigger.fire();
    tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .expect("the worker ran without error");
    drop(sim_stop_tx);
}

#[tokio::test]
async fn replayed_tasks_are_triaged_by_the_worker() {
    let context = TestContext::new("dlq-replay-e2e");
    context.create_topics(2).await;
    let (sim_url, _sim, sim_stop_tx) = start_sim().await;

    let now = SystemTime::now();
    let charged = ticket_id(&context, "charged");
    let down = ticket_id(&context, "down");
    let other = ticket_id(&context, "other-class");
    let dead_letters = [
        (
            &charged,
            "I was charged twice for my invoice",
            ErrorClass::RetriesExhausted,
        ),
        (
            &down,
            "The dashboard is down with a 503",
            ErrorClass::RetriesExhausted,
        ),
        (&other, "Please add dark mode", ErrorClass::ContentFilter),
    ]
    .map(|(ticket, text, class)| {
        dead_letter_of_task(
            &context,
            &format!("dl-{ticket}"),
            class,
            &triage_task(ticket, text),
            ContentType::Protobuf,
            now,
        )
    });
    produce_all(
        &context.topics.dead_letters,
        &dead_letters
            .iter()
            .map(Record::dead_letter)
            .collect::<Vec<_>>(),
    )
    .await;

    let (worker_trigger, worker) = start_worker(&context, &sim_url);

    let args = ReplayArgs {
        class: Some("retries_exhausted".into()),
        execute: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    let report = replay(&config(&context, None, None), &args, &mut out)
        .await
        .unwrap();
    assert_eq!(
        report.replayed.len(),
        2,
        "{}",
        String::from_utf8_lossy(&out)
    );

    let consumer = triage_test_support::consumer(&context.topics.results);
    let records = read_records(&consumer, 2, DEADLINE).await;
    let mut triaged: Vec<String> = records
        .iter()
        .map(|record| {
            let result: InferenceResult =
                triage_proto::decode(record.payload().unwrap(), Some(ContentType::PROTOBUF_MIME))
                    .unwrap();
            assert!(!result.category.is_empty(), "{result:?}");
            result.ticket_id
        })
        .collect();
    triaged.sort();
    let mut expected = vec![charged.clone(), down.clone()];
    expected.sort();
    assert_eq!(triaged, expected);
    assert!(
        read_for(&consumer, Duration::from_secs(1)).await.is_empty(),
        "the filtered-out dead letter was triaged"
    );

    worker_trigger.fire();
    tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .expect("the worker ran without error");
    drop(sim_stop_tx);
}

fn ticket_id(context: &TestContext, name: &str) -> String {
    format!("{}-{name}", context.id)
}
