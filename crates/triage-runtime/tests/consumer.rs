//! The consumer runtime against the real broker: offsets never pass unfinished work, per-key
//! ordering, the in-flight window and the fetch gate pause fetching, and shutdown drains.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rdkafka::{Message, message::OwnedMessage};
use tokio::sync::Notify;
use triage_runtime::{
    config::KafkaConfig,
    kafka::consumer::{
        ConsumerConfig, ConsumerError, ConsumerMetrics, ConsumerRun, Disposition, FetchGate,
        RecordHandler, run,
    },
    shutdown,
};
use triage_test_support::{
    Stack, TestContext, committed_offset, create_topics, produce, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(30);
const PANICS_IN_PREPARE: &[u8] = b"panics in prepare";
const PANICS_IN_HANDLE: &[u8] = b"panics in handle";
const FATAL: &[u8] = b"fatal";
const GIVEN_UP: &[u8] = b"given up";

/// Records every handled offset and what was running at the same time; records whose value is
/// `hold` wait until `release` is notified.
#[derive(Default)]
struct Probe {
    handled: Mutex<Vec<(String, i64)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    hold: Mutex<HashSet<Vec<u8>>>,
    release: Notify,
    abandon: std::sync::atomic::AtomicBool,
    delay: Mutex<HashMap<Vec<u8>, Duration>>,
    /// Offsets handed to `unprocessable`, with the reason.
    given_up: Mutex<Vec<(i64, String)>>,
}

impl Probe {
    fn handled_offsets(&self) -> Vec<i64> {
        self.handled
            .lock()
            .unwrap()
            .iter()
            .map(|(_, offset)| *offset)
            .collect()
    }
}

struct ProbeHandler(Arc<Probe>);

impl RecordHandler for ProbeHandler {
    type Item = OwnedMessage;

    fn prepare(&self, record: OwnedMessage) -> OwnedMessage {
        if record.payload() == Some(PANICS_IN_PREPARE) {
            panic!("prepare cannot take this record");
        }
        record
    }

    fn unprocessable(&self, record: OwnedMessage, reason: String) -> OwnedMessage {
        self.0
            .given_up
            .lock()
            .unwrap()
            .push((record.offset(), reason));
        record.set_payload(Some(GIVEN_UP.to_vec()))
    }

    fn ordering_key(&self, item: &OwnedMessage) -> Option<Vec<u8>> {
        item.key().map(<[u8]>::to_vec)
    }

    async fn handle(&self, item: OwnedMessage) -> Disposition {
        let probe = &self.0;
        let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
        probe.max_running.fetch_max(now, Ordering::SeqCst);
        let value = item.payload().unwrap_or_default().to_vec();
        if value == GIVEN_UP {
            probe.running.fetch_sub(1, Ordering::SeqCst);
            return Disposition::Done;
        }
        if value == PANICS_IN_HANDLE {
            probe.running.fetch_sub(1, Ordering::SeqCst);
            panic!("the handler cannot take this record");
        }
        if value == FATAL {
            probe.running.fetch_sub(1, Ordering::SeqCst);
            return Disposition::Fatal("credentials refused".into());
        }
        let held = probe.hold.lock().unwrap().contains(&value);
        if held {
            probe.release.notified().await;
        }
        let delay = probe.delay.lock().unwrap().get(&value).copied();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let key = String::from_utf8_lossy(item.key().unwrap_or_default()).into_owned();
        probe.handled.lock().unwrap().push((key, item.offset()));
        probe.running.fetch_sub(1, Ordering::SeqCst);
        if probe.abandon.load(Ordering::SeqCst) {
            Disposition::Abandon
        } else {
            Disposition::Done
        }
    }
}

struct Running {
    trigger: shutdown::Trigger,
    task: tokio::task::JoinHandle<Result<(), ConsumerError>>,
}

impl Running {
    async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("consumer stops")
            .unwrap()
            .expect("consumer runs");
    }

    /// Waits for the consumer to stop by itself and returns why.
    async fn ended(self) -> Result<(), ConsumerError> {
        let _trigger = self.trigger;
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("consumer stops by itself")
            .unwrap()
    }
}

fn start(
    context: &TestContext,
    config: ConsumerConfig,
    probe: &Arc<Probe>,
    gate: FetchGate,
    drain_timeout: Duration,
) -> Running {
    start_with_metrics(
        context,
        config,
        probe,
        gate,
        drain_timeout,
        ConsumerMetrics::default(),
    )
}

fn start_with_metrics(
    context: &TestContext,
    config: ConsumerConfig,
    probe: &Arc<Probe>,
    gate: FetchGate,
    drain_timeout: Duration,
    metrics: ConsumerMetrics,
) -> Running {
    let (trigger, shutdown) = shutdown::channel();
    let topic = context.topics.inference_tasks.clone();
    let handler = Arc::new(ProbeHandler(Arc::clone(probe)));
    let task = tokio::spawn(async move {
        let kafka = KafkaConfig {
            bootstrap_servers: Stack::get().kafka_bootstrap.clone(),
            ..Default::default()
        };
        let consumer_run = ConsumerRun {
            kafka: &kafka,
            config: &config,
            topics: vec![topic],
            gate,
            metrics,
            drain_timeout,
        };
        run(consumer_run, handler, shutdown).await
    });
    Running { trigger, task }
}

/// The value of the consumer gauge `name` in the registry's Prometheus text.
fn gauge(registry: &prometheus_client::registry::Registry, name: &str) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|line| line.starts_with(&format!("{name}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
}

fn records(count: usize, key: impl Fn(usize) -> String) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| (key(i), format!("v{i}").into_bytes()))
        .collect()
}

#[tokio::test]
async fn the_committed_offset_is_the_lowest_unfinished_one() {
    let context = TestContext::new("lowest-unfinished");
    create_topics(&[&context.topics.inference_tasks], 1).await;
    let topic = &context.topics.inference_tasks;
    produce(topic, Some(0), &records(20, |i| format!("k{i}"))).await;

    let probe = Arc::new(Probe::default());
    probe.hold.lock().unwrap().insert(b"v5".to_vec());
    let group = context.group("worker");
    let config = ConsumerConfig {
        commit_interval: Duration::from_millis(100),
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start(&context, config, &probe, FetchGate::default(), DEADLINE);

    wait_until("19 records handled", DEADLINE, || async {
        (probe.handled_offsets().len() == 19).then_some(())
    })
    .await;
    // Offsets 6..=19 finished, 5 did not: the group may resume from 5 and no later. Give the
    // auto-commit several intervals to (wrongly) commit more before checking.
    wait_until("offset 5 committed", DEADLINE, || async {
        (committed_offset(&group, topic, 0) == Some(5)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed_offset(&group, topic, 0), Some(5));

    probe.release.notify_one();
    wait_until("offset 20 committed", DEADLINE, || async {
        (committed_offset(&group, topic, 0) == Some(20)).then_some(())
    })
    .await;
    consumer.stop().await;
}

#[tokio::test]
async fn records_of_one_key_run_in_order_and_keys_run_concurrently() {
    let context = TestContext::new("ordering");
    create_topics(&[&context.topics.inference_tasks], 2).await;
    let topic = &context.topics.inference_tasks;
    // Interleaved keys on one partition; early records of each key are the slowest.
    let batch = records(30, |i| format!("ticket-{}", i % 3));
    let probe = Arc::new(Probe::default());
    for (i, (_, value)) in batch.iter().enumerate() {
        let delay = Duration::from_millis(if i < 6 { 150 } else { 5 });
        probe.delay.lock().unwrap().insert(value.clone(), delay);
    }
    produce(topic, Some(0), &batch).await;
    let group = context.group("worker");
    let consumer = start(
        &context,
        ConsumerConfig::for_group(&group),
        &probe,
        FetchGate::default(),
        DEADLINE,
    );

    wait_until("30 records handled", DEADLINE, || async {
        (probe.handled_offsets().len() == 30).then_some(())
    })
    .await;
    let handled = probe.handled.lock().unwrap().clone();
    for key in ["ticket-0", "ticket-1", "ticket-2"] {
        let offsets: Vec<i64> = handled
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, o)| *o)
            .collect();
        let mut sorted = offsets.clone();
        sorted.sort_unstable();
        assert_eq!(offsets, sorted, "{key} handled out of order");
    }
    assert_eq!(
        probe.max_running.load(Ordering::SeqCst),
        3,
        "one at a time per key, keys concurrently"
    );
    consumer.stop().await;
}

#[tokio::test]
async fn a_full_window_and_a_closed_gate_pause_fetching() {
    let context = TestContext::new("window");
    create_topics(&[&context.topics.inference_tasks], 3).await;
    let topic = &context.topics.inference_tasks;
    let batch = records(40, |i| format!("k{i}"));
    let probe = Arc::new(Probe::default());
    probe
        .hold
        .lock()
        .unwrap()
        .extend(batch.iter().map(|(_, v)| v.clone()));
    produce(topic, None, &batch).await;
    let gate = FetchGate::default();
    let group = context.group("worker");
    let config = ConsumerConfig {
        max_in_flight: 4,
        readahead: 3,
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start(&context, config, &probe, gate.clone(), DEADLINE);

    wait_until("the window filled", DEADLINE, || async {
        (probe.running.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        probe.max_running.load(Ordering::SeqCst),
        4,
        "never more than max_in_flight, even with records read ahead"
    );

    // Close the gate, then free the window: what was read ahead still runs, nothing more may
    // be fetched while the gate is closed.
    gate.close();
    probe.hold.lock().unwrap().clear();
    probe.release.notify_waiters();
    wait_until("the window drained", DEADLINE, || async {
        (probe.handled_offsets().len() >= 4 && probe.running.load(Ordering::SeqCst) == 0)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Partitions below half their share of a full window may still fetch (see `flow`): at
    // most 1.5 × (max_in_flight + readahead) were ever unfinished.
    let handled = probe.handled_offsets().len();
    assert!(
        handled <= (4 + 3) * 3 / 2,
        "{handled} records handled: more than the window's bound were fetched, or records came through a closed gate"
    );

    gate.open();
    wait_until("all records handled", DEADLINE, || async {
        (probe.handled_offsets().len() == 40).then_some(())
    })
    .await;
    assert_eq!(probe.max_running.load(Ordering::SeqCst), 4);
    consumer.stop().await;
}

/// One partition whose records cannot finish (they wait behind one key) fills the window; the
/// other partition keeps flowing, and only the blocked one is paused. Pausing the whole
/// assignment for a full window, as the runtime once did, failed this: partition 1's records
/// waited for partition 0's key.
#[tokio::test]
async fn a_partition_blocked_behind_one_key_does_not_stop_the_others() {
    let context = TestContext::new("held-partition");
    create_topics(&[&context.topics.inference_tasks], 2).await;
    let topic = &context.topics.inference_tasks;
    let stuck: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| ("stuck".to_owned(), format!("s{i}").into_bytes()))
        .collect();
    produce(topic, Some(0), &stuck).await;
    let probe = Arc::new(Probe::default());
    probe.hold.lock().unwrap().insert(b"s0".to_vec());
    let mut registry = prometheus_client::registry::Registry::with_prefix("triage");
    let metrics = ConsumerMetrics::register(&mut registry);
    let held_partitions = |registry: &prometheus_client::registry::Registry| {
        gauge(registry, "triage_consumer_partitions_held")
    };
    let group = context.group("worker");
    let config = ConsumerConfig {
        max_in_flight: 4,
        readahead: 4,
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start_with_metrics(
        &context,
        config,
        &probe,
        FetchGate::default(),
        DEADLINE,
        metrics,
    );
    wait_until(
        "partition 0 is held for filling the window",
        DEADLINE,
        || async {
            held_partitions(&registry)
                .filter(|held| *held >= 1.0)
                .map(|_| ())
        },
    )
    .await;

    // Tenants of other tickets, on the other partition, arrive while s0 still holds its key.
    let flowing = records(20, |i| format!("tenant-{}-ticket-{i}", i % 3));
    produce(topic, Some(1), &flowing).await;
    wait_until(
        "partition 1 flows past the blocked partition",
        DEADLINE,
        || async {
            let handled = probe.handled.lock().unwrap();
            (handled
                .iter()
                .filter(|(key, _)| key.starts_with("tenant-"))
                .count()
                == 20)
                .then_some(())
        },
    )
    .await;
    assert!(
        probe
            .handled
            .lock()
            .unwrap()
            .iter()
            .all(|(key, _)| key != "stuck"),
        "nothing of the blocked key ran past its first record"
    );
    wait_until(
        "partition 1 commits while partition 0 is blocked",
        DEADLINE,
        || async { (committed_offset(&group, topic, 1) == Some(20)).then_some(()) },
    )
    .await;

    probe.release.notify_one();
    wait_until(
        "the blocked partition drains in order",
        DEADLINE,
        || async { (probe.handled_offsets().len() == 60).then_some(()) },
    )
    .await;
    let stuck_order: Vec<i64> = probe
        .handled
        .lock()
        .unwrap()
        .iter()
        .filter(|(key, _)| key == "stuck")
        .map(|(_, offset)| *offset)
        .collect();
    assert_eq!(stuck_order, (0..40).collect::<Vec<i64>>());
    wait_until("nothing is held once it drained", DEADLINE, || async {
        (held_partitions(&registry) == Some(0.0)).then_some(())
    })
    .await;
    consumer.stop().await;
    assert_eq!(committed_offset(&group, topic, 0), Some(40));
}

/// `count` records on partition 0 of a new topic, each taking 400 ms to handle.
async fn slow_records_on_one_partition(context: &TestContext, count: usize) -> Arc<Probe> {
    create_topics(&[&context.topics.inference_tasks], 1).await;
    let batch = records(count, |i| format!("k{i}"));
    let probe = Arc::new(Probe::default());
    for (_, value) in &batch {
        probe
            .delay
            .lock()
            .unwrap()
            .insert(value.clone(), Duration::from_millis(400));
    }
    produce(&context.topics.inference_tasks, Some(0), &batch).await;
    probe
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_and_commits_it() {
    let context = TestContext::new("drain");
    let topic = &context.topics.inference_tasks;
    let probe = slow_records_on_one_partition(&context, 8).await;
    let group = context.group("worker");
    let consumer = start(
        &context,
        ConsumerConfig::for_group(&group),
        &probe,
        FetchGate::default(),
        DEADLINE,
    );
    wait_until("all eight in flight", DEADLINE, || async {
        (probe.running.load(Ordering::SeqCst) == 8).then_some(())
    })
    .await;
    consumer.stop().await;
    assert_eq!(
        probe.handled_offsets().len(),
        8,
        "in-flight work finished before exit"
    );
    assert_eq!(committed_offset(&group, topic, 0), Some(8));
}

#[tokio::test]
async fn shutdown_drops_what_was_read_ahead_uncommitted() {
    let context = TestContext::new("drain-readahead");
    let topic = &context.topics.inference_tasks;
    let probe = slow_records_on_one_partition(&context, 6).await;
    let group = context.group("worker");
    let config = ConsumerConfig {
        max_in_flight: 2,
        readahead: 4,
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start(&context, config, &probe, FetchGate::default(), DEADLINE);
    wait_until("two running", DEADLINE, || async {
        (probe.running.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    consumer.stop().await;
    let mut handled = probe.handled_offsets();
    handled.sort_unstable();
    assert_eq!(
        handled,
        vec![0, 1],
        "only the running records finish; the read-ahead ones wait for the next owner"
    );
    assert_eq!(committed_offset(&group, topic, 0), Some(2));
}

#[tokio::test]
async fn abandoned_records_are_not_committed_and_are_consumed_again() {
    let context = TestContext::new("abandon");
    create_topics(&[&context.topics.inference_tasks], 1).await;
    let topic = &context.topics.inference_tasks;
    produce(topic, Some(0), &records(5, |i| format!("k{i}"))).await;
    let group = context.group("worker");

    let first = Arc::new(Probe::default());
    first.abandon.store(true, Ordering::SeqCst);
    let consumer = start(
        &context,
        ConsumerConfig::for_group(&group),
        &first,
        FetchGate::default(),
        DEADLINE,
    );
    wait_until("five handled", DEADLINE, || async {
        (first.handled_offsets().len() == 5).then_some(())
    })
    .await;
    consumer.stop().await;
    assert_eq!(committed_offset(&group, topic, 0), None);

    let second = Arc::new(Probe::default());
    let consumer = start(
        &context,
        ConsumerConfig::for_group(&group),
        &second,
        FetchGate::default(),
        DEADLINE,
    );
    wait_until("five handled again", DEADLINE, || async {
        (second.handled_offsets().len() == 5).then_some(())
    })
    .await;
    consumer.stop().await;
    assert_eq!(committed_offset(&group, topic, 0), Some(5));
}

#[tokio::test]
async fn a_second_consumer_joining_loses_and_commits_nothing_twice() {
    let context = TestContext::new("rebalance");
    create_topics(&[&context.topics.inference_tasks], 4).await;
    let topic = &context.topics.inference_tasks;
    let group = context.group("worker");
    let probe = Arc::new(Probe::default());
    let batch = records(200, |i| format!("k{i}"));
    for (_, value) in &batch {
        probe
            .delay
            .lock()
            .unwrap()
            .insert(value.clone(), Duration::from_millis(20));
    }
    let config = ConsumerConfig {
        max_in_flight: 8,
        ..ConsumerConfig::for_group(&group)
    };
    let first = start(
        &context,
        config.clone(),
        &probe,
        FetchGate::default(),
        DEADLINE,
    );
    produce(topic, None, &batch[..100]).await;
    wait_until("some records handled", DEADLINE, || async {
        (probe.handled_offsets().len() >= 20).then_some(())
    })
    .await;
    let second = start(&context, config, &probe, FetchGate::default(), DEADLINE);
    produce(topic, None, &batch[100..]).await;

    // Every record is handled at least once; re-deliveries after the rebalance are allowed
    // (at-least-once), losses are not; and the final commits cover everything.
    wait_until(
        "all 200 distinct records handled",
        Duration::from_secs(60),
        || async {
            let handled = probe.handled.lock().unwrap();
            let distinct: HashSet<_> = handled.iter().collect();
            (distinct.len() == 200).then_some(())
        },
    )
    .await;
    first.stop().await;
    second.stop().await;
    let committed: i64 = (0..4)
        .filter_map(|p| committed_offset(&group, topic, p))
        .sum();
    assert_eq!(committed, 200);
}

#[tokio::test]
async fn records_a_stage_panics_on_are_given_up_and_the_commit_point_moves_on() {
    let context = TestContext::new("panics");
    create_topics(&[&context.topics.inference_tasks], 2).await;
    let topic = &context.topics.inference_tasks;
    // On each partition: normal records around one that panics in `handle` and one that
    // panics in `prepare`.
    for partition in 0..2 {
        let mut batch = records(10, |i| format!("p{partition}-k{i}"));
        batch[3].1 = PANICS_IN_HANDLE.to_vec();
        batch[6].1 = PANICS_IN_PREPARE.to_vec();
        produce(topic, Some(partition), &batch).await;
    }
    let probe = Arc::new(Probe::default());
    let group = context.group("worker");
    let config = ConsumerConfig {
        commit_interval: Duration::from_millis(100),
        handler_attempts: 2,
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start(&context, config, &probe, FetchGate::default(), DEADLINE);
    for partition in 0..2 {
        wait_until("each partition committed to its end", DEADLINE, || async {
            (committed_offset(&group, topic, partition) == Some(10)).then_some(())
        })
        .await;
    }
    consumer.stop().await;

    // Every normal record was handled once; each poison one was given up exactly once, with
    // the panic's words.
    assert_eq!(probe.handled_offsets().len(), 16);
    let mut given_up = probe.given_up.lock().unwrap().clone();
    given_up.sort();
    let offsets: Vec<i64> = given_up.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, [3, 3, 6, 6]);
    assert!(
        given_up
            .iter()
            .any(|(_, reason)| reason.contains("the handler cannot take this record"))
    );
    assert!(
        given_up
            .iter()
            .any(|(_, reason)| reason.contains("prepare cannot take this record"))
    );
}

#[tokio::test]
async fn a_fatal_disposition_stops_the_consumer_without_committing_past_it() {
    let context = TestContext::new("fatal");
    create_topics(&[&context.topics.inference_tasks], 1).await;
    let topic = &context.topics.inference_tasks;
    let mut batch = records(6, |i| format!("k{i}"));
    batch[2].1 = FATAL.to_vec();
    produce(topic, Some(0), &batch).await;
    let probe = Arc::new(Probe::default());
    let group = context.group("worker");
    let config = ConsumerConfig {
        commit_interval: Duration::from_millis(100),
        max_in_flight: 1,
        readahead: 0,
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start(&context, config, &probe, FetchGate::default(), DEADLINE);
    match consumer.ended().await {
        Err(ConsumerError::Fatal { reason, .. }) => assert_eq!(reason, "credentials refused"),
        other => panic!("expected a fatal stop, got {other:?}"),
    }
    assert_eq!(committed_offset(&group, topic, 0), Some(2));
}

#[tokio::test]
async fn a_commit_point_held_by_one_record_shows_as_stalled() {
    let context = TestContext::new("stall");
    create_topics(&[&context.topics.inference_tasks], 1).await;
    let topic = &context.topics.inference_tasks;
    produce(topic, Some(0), &records(5, |i| format!("k{i}"))).await;
    let probe = Arc::new(Probe::default());
    probe.hold.lock().unwrap().insert(b"v1".to_vec());
    let mut registry = prometheus_client::registry::Registry::with_prefix("triage");
    let metrics = ConsumerMetrics::register(&mut registry);
    let stalled_seconds = |registry: &prometheus_client::registry::Registry| {
        gauge(registry, "triage_consumer_commit_stalled_seconds")
    };
    let group = context.group("worker");
    let config = ConsumerConfig {
        commit_stall_warning: Duration::from_secs(1),
        ..ConsumerConfig::for_group(&group)
    };
    let consumer = start_with_metrics(
        &context,
        config,
        &probe,
        FetchGate::default(),
        DEADLINE,
        metrics,
    );
    wait_until("the held record shows as a stall", DEADLINE, || async {
        stalled_seconds(&registry)
            .filter(|seconds| *seconds >= 2.0)
            .map(|_| ())
    })
    .await;
    probe.release.notify_one();
    wait_until("the stall clears once it finishes", DEADLINE, || async {
        (stalled_seconds(&registry) == Some(0.0)).then_some(())
    })
    .await;
    consumer.stop().await;
}
