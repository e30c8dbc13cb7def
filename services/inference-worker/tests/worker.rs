//! The worker against the real broker, real Redis and llm-sim over real HTTP.

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use llm_sim::{
    config::{LatencyConfig, SimConfig},
    faults::FaultKind,
};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::Message;
use triage_proto::v1::{ErrorClass, InferenceTask};
use triage_test_support::{
    TestContext, committed_offset, consumer, read_for, read_records, wait_until,
};

async fn setup(name: &str, partitions: i32) -> TestContext {
    let context = TestContext::new(name);
    context.create_topics(partitions).await;
    context
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triages_every_task_once_and_answers_repeats_from_the_cache() {
    let context = setup("happy", 3).await;
    let sim = Sim::with_latency_ms(20).await;
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let worker = Worker::start(worker_config(&context, &sim));
    let batch = tasks(&context, 40);
    publish(&context, &batch).await;

    let first = read_results(&results, 40).await;
    let tickets: HashSet<_> = first.iter().map(|r| r.ticket_id.clone()).collect();
    assert_eq!(tickets.len(), 40, "one result per ticket");
    for result in &first {
        assert!(!result.from_cache);
        assert_eq!(result.attempts, 1);
        assert_eq!(result.model, MODEL);
        assert_eq!(result.prompt_version, "triage-v1");
        assert!(result.usage.as_ref().is_some_and(|u| u.total_tokens > 0));
        assert!(result.cost_usd > 0.0, "priced from the default table");
        assert!(
            result.provider_note.contains("simulator"),
            "{}",
            result.provider_note
        );
        assert!(result.suggested_reply.starts_with("[llm-sim]"));
        assert!(result.triaged_at.is_some() && result.accepted_at.is_some());
        let task = batch
            .iter()
            .find(|t| t.ticket_id == result.ticket_id)
            .unwrap();
        assert_eq!(
            (&result.subject, &result.excerpt),
            (&task.subject, &task.excerpt),
            "the ticket's text travels with its result"
        );
        assert!(!result.subject.is_empty() && !result.excerpt.is_empty());
        assert_eq!(
            result.rate_limit_wait_ms, 0,
            "budget to spare and no quota: nothing waited"
        );
    }
    let billing = first.iter().find(|r| r.ticket_id.ends_with("-t0")).unwrap();
    assert_eq!(billing.category, "billing");
    assert_eq!(sim.paid_total(), 40);
    assert_eq!(sim.paid_duplicates(), 0);

    // The same tasks again (a replay, a duplicate dispatch): answered from the cache, no call.
    publish(&context, &batch).await;
    let second = read_results(&results, 40).await;
    assert!(
        second.iter().all(|r| r.from_cache),
        "repeats come from the cache"
    );
    assert!(
        second.iter().all(|r| {
            let task = batch.iter().find(|t| t.ticket_id == r.ticket_id).unwrap();
            (&r.subject, &r.excerpt) == (&task.subject, &task.excerpt)
        }),
        "a cached answer carries the task's ticket text"
    );
    assert!(
        second.iter().all(|r| r.rate_limit_wait_ms == 0),
        "a cached answer made no call and waited for nothing"
    );
    assert_eq!(sim.paid_total(), 40, "nothing paid twice");
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty()
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_failures_are_dead_lettered_at_once_with_every_field() {
    let context = setup("non-retryable", 1).await;
    let sim = Sim::with_latency_ms(5).await;
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let worker = Worker::start(worker_config(&context, &sim));

    sim.faults(&[(FaultKind::ContentFilter, None)]);
    let trace_id = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128;
    let traced = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(trace_id),
        SpanId::from(7),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let filtered = task(
        &format!("{}-filtered", context.id),
        "something the filter dislikes",
    );
    producer()
        .send(&context.topics.inference_tasks, "acme", &filtered, &traced)
        .await
        .unwrap();
    let records = read_records(&dead_letters, 1, DEADLINE).await;
    let dead_letter = decode_dead_letter(&records[0]);
    assert_eq!(dead_letter.error_class(), ErrorClass::ContentFilter);
    assert_eq!(dead_letter.attempts, 1);
    assert_eq!(dead_letter.ticket_id, filtered.ticket_id);
    assert_eq!(dead_letter.tenant_id, "acme");
    assert_eq!(dead_letter.failed_service, "inference-worker");
    assert_eq!(dead_letter.source_topic, context.topics.inference_tasks);
    assert_eq!(dead_letter.source_partition, 0);
    assert_eq!(dead_letter.source_offset, 0);
    assert!(dead_letter.first_failure_at.is_some() && dead_letter.last_failure_at.is_some());
    assert!(
        dead_letter.error_message.contains("content filter"),
        "{}",
        dead_letter.error_message
    );
    assert!(
        dead_letter
            .traceparent
            .contains(&format!("{trace_id:032x}")),
        "{}",
        dead_letter.traceparent
    );
    let original: triage_proto::v1::InferenceTask = triage_proto::decode(
        &dead_letter.original_value,
        Some(triage_proto::ContentType::PROTOBUF_MIME),
    )
    .unwrap();
    assert_eq!(original, filtered, "the original bytes, for replay");
    assert_eq!(records[0].key(), Some(filtered.ticket_id.as_bytes()));

    sim.faults(&[(FaultKind::ContextLength, None)]);
    publish(
        &context,
        &[task(&format!("{}-long", context.id), "a very long ticket")],
    )
    .await;
    let records = read_records(&dead_letters, 1, DEADLINE).await;
    assert_eq!(
        decode_dead_letter(&records[0]).error_class(),
        ErrorClass::ContextLength
    );

    // Invalid output twice: one repair request, then invalid_output.
    sim.faults(&[(FaultKind::MalformedJson, None)]);
    publish(
        &context,
        &[task(
            &format!("{}-garbled", context.id),
            "my invoice is wrong",
        )],
    )
    .await;
    let records = read_records(&dead_letters, 1, DEADLINE).await;
    let garbled = decode_dead_letter(&records[0]);
    assert_eq!(garbled.error_class(), ErrorClass::InvalidOutput);
    assert_eq!(garbled.attempts, 2, "one repair was tried");

    // The partition moved on: later tasks are triaged, and the offsets are committed past all.
    sim.faults(&[]);
    publish(&context, &tasks(&context, 3)).await;
    read_results(&results, 3).await;
    let group = context.group("inference-worker");
    wait_until(
        "offsets committed past the dead letters",
        DEADLINE,
        || async {
            (committed_offset(&group, &context.topics.inference_tasks, 0) == Some(6)).then_some(())
        },
    )
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_with_its_raw_bytes_and_the_next_tasks_flow() {
    let context = setup("poison", 1).await;
    let sim = Sim::with_latency_ms(5).await;
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let worker = Worker::start(worker_config(&context, &sim));
    let poison = vec![0xff, 0xff, 0xff, 0xff, 0x01];
    triage_test_support::produce(
        &context.topics.inference_tasks,
        Some(0),
        &[("acme".into(), poison.clone())],
    )
    .await;
    publish(&context, &tasks(&context, 3)).await;

    let records = read_records(&dead_letters, 1, DEADLINE).await;
    let dead_letter = decode_dead_letter(&records[0]);
    assert_eq!(dead_letter.error_class(), ErrorClass::Decode);
    assert_eq!(dead_letter.original_value, poison);
    assert_eq!(dead_letter.original_key, b"acme");
    assert_eq!(read_results(&results, 3).await.len(), 3);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_and_a_provider_outage_produce_no_dead_letters() {
    let context = setup("storm", 3).await;
    let sim = Sim::with_latency_ms(20).await;
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let worker = Worker::start(worker_config(&context, &sim));

    // The provider's limit drops far below what the worker believes: a storm of 429s.
    sim.rate_limit(600, 1_000);
    publish(&context, &tasks(&context, 40)).await;
    wait_until("429s happening", DEADLINE, || async {
        (sim.status_count("429") > 0).then_some(())
    })
    .await;
    // Then an outage: every call fails with 503 for three seconds.
    sim.faults(&[(FaultKind::Status503, Some(3_000))]);
    publish(&context, &tasks(&context, 60)[40..]).await;

    let all = read_results(&results, 60).await;
    assert_eq!(
        all.iter()
            .map(|r| &r.ticket_id)
            .collect::<HashSet<_>>()
            .len(),
        60
    );
    assert!(sim.status_count("503") > 0, "the outage was seen");
    assert!(
        all.iter().any(|r| r.rate_limit_wait_ms > 0),
        "the provider's 429s are counted as rate-limit waits"
    );
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty(),
        "no dead letters"
    );
    assert_eq!(sim.paid_duplicates(), 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_one_ticket_finish_in_order_while_tickets_run_concurrently() {
    let context = setup("order", 1).await;
    let sim = Sim::start(SimConfig {
        latency: LatencyConfig::Uniform {
            min_ms: 5,
            max_ms: 80,
        },
        ..SimConfig::default()
    })
    .await;
    let results = consumer(&context.topics.results);
    let worker = Worker::start(worker_config(&context, &sim));
    // Ten prompt versions of one ticket (ten distinct inferences), plus ten other tickets.
    let ticket = format!("{}-same", context.id);
    let mut batch = Vec::new();
    for version in 0..10 {
        let mut same = task(&ticket, "my invoice is wrong");
        same.prompt_version = format!("v{version}");
        same.idempotency_key =
            triage_proto::idempotency_key(&same.tenant_id, &ticket, &same.prompt_version, MODEL);
        batch.push(same);
        batch.push(task(
            &format!("{}-other{version}", context.id),
            "the site is down",
        ));
    }
    publish(&context, &batch).await;
    let all = read_results(&results, 20).await;
    let versions: Vec<_> = all
        .iter()
        .filter(|r| r.ticket_id == ticket)
        .map(|r| r.prompt_version.clone())
        .collect();
    let expected: Vec<_> = (0..10).map(|v| format!("v{v}")).collect();
    assert_eq!(versions, expected);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_commits_it() {
    let context = setup("sigterm", 1).await;
    let sim = Sim::with_latency_ms(1_500).await;
    let worker = Worker::start(worker_config(&context, &sim));
    publish(&context, &tasks(&context, 10)).await;
    wait_until("ten calls in flight", DEADLINE, || async {
        (sim.state.stats().report().requests_total == 10).then_some(())
    })
    .await;
    worker.stop().await;
    let results = consumer(&context.topics.results);
    assert_eq!(
        read_results(&results, 10).await.len(),
        10,
        "in-flight work finished"
    );
    assert_eq!(
        committed_offset(
            &context.group("inference-worker"),
            &context.topics.inference_tasks,
            0
        ),
        Some(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_provider_rate_limit() {
    let context = setup("shared-limit", 4).await;
    let sim = Sim::with_latency_ms(50).await;
    // The provider enforces 1,200 RPM with a one-second burst; both workers are told the same.
    sim.rate_limit(1_200, 1_000);
    let mut config = worker_config(&context, &sim);
    config.rate_limit.requests_per_minute = 1_200;
    let first = Worker::start(config.clone());
    let second = Worker::start(config);
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    publish(&context, &tasks(&context, 200)).await;
    assert_eq!(read_results(&results, 200).await.len(), 200);
    let requests = sim.state.stats().report().requests_total;
    let rejected = sim.status_count("429");
    assert!(
        rejected * 100 <= requests,
        "two workers exceeded the shared limit: {rejected} 429s in {requests} requests"
    );
    assert!(
        read_for(&dead_letters, Duration::from_millis(300))
            .await
            .is_empty()
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_keeps_the_provider_busy_at_its_rate_limit() {
    let context = setup("throughput", 4).await;
    let sim = Sim::with_latency_ms(500).await;
    sim.rate_limit(3_000, 1_000);
    let mut config = worker_config(&context, &sim);
    config.rate_limit.requests_per_minute = 3_000;
    let worker = Worker::start(config);
    let results = consumer(&context.topics.results);
    publish(&context, &tasks(&context, 400)).await;
    let all = read_results(&results, 400).await;
    let mut times: Vec<f64> = all
        .iter()
        .map(|r| {
            let t = r.triaged_at.unwrap();
            t.seconds as f64 + f64::from(t.nanos) / 1e9
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let mut per_second = std::collections::BTreeMap::new();
    for t in &times {
        *per_second.entry((t - times[0]) as u64).or_insert(0u64) += 1;
    }
    println!("results per second: {per_second:?}");
    // Steady state: the whole seconds after the first three (which spend the provider's initial
    // burst allowance, a full bucket) and before the last (a partial second).
    let last_second = *per_second.keys().last().unwrap();
    let steady: Vec<u64> = per_second
        .range(3..last_second)
        .map(|(_, count)| *count)
        .collect();
    assert!(steady.len() >= 2, "too short to measure: {per_second:?}");
    let rate = steady.iter().sum::<u64>() as f64 / steady.len() as f64;
    let limit = 3_000.0 / 60.0;
    println!(
        "throughput {rate:.1}/s against a limit of {limit}/s ({:.1} %)",
        rate / limit * 100.0
    );
    assert!(rate >= 0.95 * limit, "only {rate:.1}/s of {limit}/s");
    assert_eq!(sim.status_count("429"), 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_task_on_every_partition_is_one_dead_letter_and_the_worker_moves_on() {
    use triage_test_support::poison::{PoisonShapes, poison_records, produce_poison};
    let context = TestContext::new("worker-poison-all");
    let partitions = 2;
    context.create_topics(partitions).await;
    let sim = Sim::with_latency_ms(10).await;
    let config = worker_config(&context, &sim);
    let group = config.consumer.group_id.clone();
    let shapes = PoisonShapes {
        valid: task("t-shape", "I was charged twice"),
        set_timestamp: |task: &mut InferenceTask, at| task.accepted_at = Some(at),
        oversize: |task: &mut InferenceTask| task.messages[1].content = "x".repeat(600_000),
    };
    let mut poison_count = 0;
    let mut normal = Vec::new();
    let producer = producer();
    for partition in 0..partitions {
        let poison = poison_records(&shapes, &format!("p{partition}"));
        poison_count += poison.len();
        produce_poison(&context.topics.inference_tasks, partition, &poison).await;
        for index in 0..4 {
            let mut task = task(
                &format!("{}-p{partition}-t{index}", context.id),
                "The dashboard is down",
            );
            if index % 2 == 1 {
                task.tenant_id = "globex".into();
            }
            let payload = triage_proto::encode(&task, triage_proto::ContentType::Protobuf);
            let headers = triage_runtime::kafka::headers::for_message::<InferenceTask>(
                "test",
                triage_proto::ContentType::Protobuf,
                &opentelemetry::Context::new(),
            );
            producer
                .inner()
                .send(
                    rdkafka::producer::FutureRecord::to(&context.topics.inference_tasks)
                        .key(&task.ticket_id)
                        .payload(&payload)
                        .partition(partition)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(error, _)| error)
                .unwrap();
            normal.push(task);
        }
    }
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let worker = Worker::start(config);

    let triaged = read_results(&results, normal.len()).await;
    assert_eq!(triaged.len(), normal.len());
    let letters: Vec<_> = read_records(&dead_letters, poison_count, DEADLINE)
        .await
        .iter()
        .map(decode_dead_letter)
        .collect();
    let invalid = letters
        .iter()
        .filter(|letter| letter.error_class == ErrorClass::InvalidEvent as i32)
        .count();
    // Two timestamps and the oversized prompt per partition; the rest do not decode.
    assert_eq!(invalid, 3 * partitions as usize, "{letters:?}");
    for partition in 0..partitions {
        let end = (poison_count / 2 + 4) as i64;
        wait_until("the partition committed to its end", DEADLINE, || async {
            (committed_offset(&group, &context.topics.inference_tasks, partition) == Some(end))
                .then_some(())
        })
        .await;
    }
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert_eq!(
        sim.paid_total(),
        normal.len() as u64,
        "poison must never reach the provider"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_sharing_a_ticket_id_are_two_calls_and_two_results() {
    let context = setup("tenants", 3).await;
    let sim = Sim::with_latency_ms(20).await;
    let results = consumer(&context.topics.results);
    let worker = Worker::start(worker_config(&context, &sim));
    let ticket = format!("{}-shared", context.id);
    let acme = task(&ticket, "I was charged twice for my invoice");
    let mut globex = task(&ticket, "The dashboard is down with a 503");
    globex.tenant_id = "globex".into();
    // What a real provider answers and bills for a request for gpt-4o-mini.
    globex.model = "gpt-4o-mini-2024-07-18".into();
    // A careless producer's key (the one without a tenant) must not matter: the worker derives it.
    globex.idempotency_key = acme.idempotency_key.clone();
    publish(&context, &[acme.clone(), globex.clone()]).await;

    let first = read_results(&results, 2).await;
    assert_eq!(
        sim.paid_total(),
        2,
        "one call per tenant, none served from the other's cache"
    );
    let of = |results: &[triage_proto::v1::InferenceResult], tenant: &str| {
        let mine: Vec<_> = results
            .iter()
            .filter(|r| r.tenant_id == tenant)
            .cloned()
            .collect();
        assert_eq!(mine.len(), 1, "{tenant}: {results:?}");
        mine.into_iter().next().unwrap()
    };
    let (acme_result, globex_result) = (of(&first, "acme"), of(&first, "globex"));
    assert_eq!(acme_result.ticket_id, ticket);
    assert_eq!(globex_result.ticket_id, ticket);
    assert_eq!(acme_result.category, "billing");
    assert_eq!(globex_result.category, "outage");
    assert_ne!(acme_result.idempotency_key, globex_result.idempotency_key);
    assert_eq!(globex_result.model, "gpt-4o-mini-2024-07-18");
    assert!(
        globex_result.cost_usd > 0.0,
        "a dated model is priced as its model"
    );

    // Both again: each tenant is answered from its own cache entry, never the other's.
    publish(&context, &[globex, acme]).await;
    let second = read_results(&results, 2).await;
    assert_eq!(sim.paid_total(), 2, "nothing paid twice");
    for (repeat, original) in [
        (of(&second, "acme"), &acme_result),
        (of(&second, "globex"), &globex_result),
    ] {
        assert!(repeat.from_cache);
        assert_eq!(repeat.category, original.category);
        assert_eq!(repeat.idempotency_key, original.idempotency_key);
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_waits_and_is_never_dead_lettered_while_others_flow() {
    let context = setup("quota", 3).await;
    let sim = Sim::with_latency_ms(10).await;
    let results = consumer(&context.topics.results);
    let dead_letters = consumer(&context.topics.dead_letters);
    let mut config = worker_config(&context, &sim);
    // 2 requests per second, a bucket of 2: six tasks need at least two seconds.
    config.tenants.known.insert(
        "acme".into(),
        inference_worker::config::TenantConfig {
            requests_per_minute: 120,
            ..Default::default()
        },
    );
    let worker = Worker::start(config);
    let mut batch = tasks(&context, 6);
    for index in 0..6 {
        let mut other = task(&format!("{}-g{index}", context.id), "The dashboard is down");
        other.tenant_id = "globex".into();
        batch.push(other);
    }
    let started = std::time::Instant::now();
    publish(&context, &batch).await;

    let arrived = read_results(&results, 12).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1800),
        "acme's quota paced its calls: {elapsed:?}"
    );
    let last_globex = arrived
        .iter()
        .rposition(|r| r.tenant_id == "globex")
        .unwrap();
    let last_acme = arrived.iter().rposition(|r| r.tenant_id == "acme").unwrap();
    assert!(
        last_globex < last_acme,
        "globex has no quota and is not held behind acme's"
    );
    // Each result says how long its task waited: acme's beyond its burst of two waited for the
    // quota, up to the second and more the last one needed; globex's waited for nothing.
    let waits = |tenant: &str| -> Vec<u32> {
        arrived
            .iter()
            .filter(|r| r.tenant_id == tenant)
            .map(|r| r.rate_limit_wait_ms)
            .collect()
    };
    let acme_waits = waits("acme");
    assert!(
        acme_waits.iter().filter(|&&ms| ms > 0).count() >= 3,
        "acme's tasks past its burst report their quota wait: {acme_waits:?}"
    );
    assert!(
        acme_waits.iter().max().is_some_and(|&ms| ms >= 1_000),
        "the last of acme's tasks waited about two seconds: {acme_waits:?}"
    );
    assert_eq!(waits("globex"), vec![0; 6], "globex never waited");
    assert_eq!(sim.paid_total(), 12);
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty(),
        "over quota is a wait, never a dead letter"
    );
    worker.stop().await;
}
