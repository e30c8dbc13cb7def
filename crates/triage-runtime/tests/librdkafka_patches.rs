//! The vendored librdkafka's patches (vendor/patches/), each checked by the behaviour it fixes on
//! the real broker: these tests fail on an unpatched librdkafka 2.12.1. Named `serial_` because
//! they time milliseconds and run alone in `make test`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};
use triage_test_support::{TestContext, client_config, create_topics, produce};

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// `librdkafka-wake-broker-on-resume.patch`. A consumer that pauses every partition and
/// resumes them must get a waiting record within a fetch, not at its broker thread's next
/// periodic wake-up (up to a second). Unpatched, the delay is spread over 0–1 s: the median of
/// nine resumes stays under 200 ms with a chance of about 2 %.
#[test]
fn serial_a_resumed_partition_is_fetched_at_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let context = TestContext::new("patch-wake-on-resume");
    let topic = context.topics.inference_tasks.clone();
    runtime.block_on(create_topics(&[&topic], 1));

    let consumer: BaseConsumer = client_config()
        .set("group.id", context.group("patch"))
        .set("enable.auto.commit", "false")
        // Short long-polls, so that an idle fetch never hides the wake-up being measured.
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&partitions).unwrap();

    let mut delays = Vec::new();
    for round in 0..9 {
        consumer.pause(&partitions).unwrap();
        runtime.block_on(produce(
            &topic,
            Some(0),
            &[(format!("k{round}"), b"waiting".to_vec())],
        ));
        // Long enough for the broker thread to settle into its idle wait, and a different
        // phase of its periodic wake-up each round.
        let idle_until = Instant::now() + Duration::from_millis(1_000 + (round * 370) % 1_000);
        while Instant::now() < idle_until {
            assert!(
                consumer.poll(Duration::from_millis(50)).is_none(),
                "a paused partition delivered a record"
            );
        }
        let resumed = Instant::now();
        consumer.resume(&partitions).unwrap();
        let record = loop {
            assert!(
                resumed.elapsed() < Duration::from_secs(10),
                "no record 10 s after resuming"
            );
            if let Some(record) = consumer.poll(Duration::from_millis(5)) {
                break record.unwrap();
            }
        };
        delays.push(resumed.elapsed());
        assert_eq!(record.payload(), Some(&b"waiting"[..]));
    }
    let median = median(delays.clone());
    println!("resume → record: {delays:?}, median {median:?}");
    assert!(
        median < Duration::from_millis(200),
        "median {median:?} from resume to record ({delays:?}): the broker thread is not woken on resume"
    );
}

/// Records when librdkafka sent each AddPartitionsToTxn request (from its protocol debug log).
#[derive(Clone, Default)]
struct RequestLog(Arc<Mutex<Vec<Instant>>>);

impl ClientContext for RequestLog {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _facility: &str, message: &str) {
        if message.contains("Sent AddPartitionsToTxnRequest") {
            self.0.lock().unwrap().push(Instant::now());
        }
    }
}

impl rdkafka::producer::ProducerContext for RequestLog {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// `librdkafka-register-partitions-immediately.patch`. The first record of a transaction must
/// send AddPartitionsToTxn at once; unpatched, a 1 ms timer runs first, so the delay from
/// produce to request is never under 1 ms.
#[test]
fn serial_a_transaction_registers_its_first_partition_at_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let context = TestContext::new("patch-register-partitions");
    let topic = context.topics.inference_tasks.clone();
    runtime.block_on(create_topics(&[&topic], 1));

    let requests = RequestLog::default();
    let producer: BaseProducer<RequestLog> = client_config()
        .set("transactional.id", context.group("patch-txn"))
        .set("debug", "protocol")
        .set_log_level(RDKafkaLogLevel::Debug)
        .create_with_context(requests.clone())
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();

    let mut delays = Vec::new();
    for round in 0..21 {
        producer.begin_transaction().unwrap();
        let sent_before = requests.0.lock().unwrap().len();
        let produced = Instant::now();
        producer
            .send(
                BaseRecord::to(&topic)
                    .key(&format!("k{round}"))
                    .payload("v"),
            )
            .map_err(|(error, _)| error)
            .unwrap();
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
        let sent = requests.0.lock().unwrap().get(sent_before).copied();
        let sent = sent.expect("an AddPartitionsToTxn request was sent for the transaction");
        delays.push(sent.saturating_duration_since(produced));
    }
    let median = median(delays.clone());
    println!("produce → AddPartitionsToTxn sent: {delays:?}, median {median:?}");
    assert!(
        median < Duration::from_micros(800),
        "median {median:?} from produce to AddPartitionsToTxn ({delays:?}): registration waits for a timer"
    );
}
