//! What no record on the dead-letter topic can do to dlq-alerter, against the real broker: every
//! kind of poison record on every partition, between real dead letters of two tenants, is
//! alerted on (undecodable ones as `decode`) or folded into a summary, and each partition's
//! commit point reaches its end; the service then stops cleanly.

mod common;

use std::time::SystemTime;

use common::*;
use triage_proto::{ContentType, v1::ErrorClass};
use triage_test_support::{
    TestContext,
    poison::{PoisonShapes, poison_records, produce_poison},
    wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_record_on_every_partition_is_alerted_and_the_commit_point_reaches_the_end() {
    let context = TestContext::new("dlq-poison-all");
    let partitions = 2;
    context.create_topics(partitions).await;
    let sink = Sink::start().await;
    let now = SystemTime::now();
    let valid = dead_letter_of_task(
        &context,
        "dl-shape",
        ErrorClass::InvalidOutput,
        &task("t-shape", "acme", "I was charged twice"),
        ContentType::Protobuf,
        now,
    );
    let shapes = PoisonShapes {
        valid,
        set_timestamp: |letter, at| letter.last_failure_at = Some(at),
        oversize: |letter| letter.error_message = "e".repeat(900_000),
    };
    let mut total = 0;
    for partition in 0..partitions {
        let poison = poison_records(&shapes, &format!("p{partition}"));
        total += poison.len();
        produce_poison(&context.topics.dead_letters, partition, &poison).await;
        for (index, tenant) in ["acme", "globex"].into_iter().enumerate() {
            let id = format!("dl-p{partition}-{tenant}");
            let task = task(
                &format!("t-p{partition}-{index}"),
                tenant,
                "The dashboard is down",
            );
            let letter = dead_letter_of_task(
                &context,
                &id,
                ErrorClass::RetriesExhausted,
                &task,
                ContentType::Protobuf,
                now,
            );
            let record = Record::dead_letter(&letter);
            produce_poison(
                &context.topics.dead_letters,
                partition,
                &[triage_test_support::poison::Poison {
                    name: id.clone(),
                    key: record.key,
                    value: record.value,
                    content_type: ContentType::PROTOBUF_MIME,
                }],
            )
            .await;
            total += 1;
        }
    }
    let mut config = config(&context, Some(sink.url("/slack")), None);
    // Folded dead letters are committed once their window's summary is delivered.
    config.aggregation.window = std::time::Duration::from_secs(3);
    let group = config.consumer.group_id.clone();
    let running = Running::start(config);
    let topic = context.topics.dead_letters.clone();
    wait_until("every partition committed to its end", DEADLINE, || async {
        (committed_total(&group, &topic, partitions) == total as i64).then_some(())
    })
    .await;
    let posts = sink.posts_to("/slack");
    assert!(
        posts
            .iter()
            .any(|post| post.body.to_string().contains("decode")),
        "the undecodable records were alerted: {posts:?}"
    );
    running.stop().await;
}
