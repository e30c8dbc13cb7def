//! What no record can do to the writer, against the real broker and PostgreSQL: every kind of
//! poison record on every partition becomes exactly one dead letter while the results around
//! it are written and each partition's commit point reaches its end; and a batch with one row
//! PostgreSQL refuses writes the other rows and dead-letters that one, with the server's words.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Db, Writer, committed, config, produce_results, producer, result};
use prost::Message as _;
use rdkafka::Message as _;
use triage_proto::v1::{DeadLetter, ErrorClass, InferenceResult};
use triage_test_support::{
    TestContext, consumer,
    poison::{PoisonShapes, poison_records, produce_poison},
    read_for, read_records, wait_until,
};

const WAIT: Duration = Duration::from_secs(90);

fn shapes() -> PoisonShapes<InferenceResult> {
    PoisonShapes {
        valid: result("acme", "t-shape", 1_000, "billing"),
        set_timestamp: |result, at| result.triaged_at = Some(at),
        // Longer than any PostgreSQL index row: decodes and validates, and only the database
        // refuses it.
        oversize: |result| result.ticket_id = incompressible_id(),
    }
}

/// A ticket id of 10 kB that PostgreSQL cannot compress below its index row limit (2.7 kB):
/// a repeated character would be compressed and stored.
fn incompressible_id() -> String {
    (0..320)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_record_on_every_partition_is_one_dead_letter_and_nothing_else_stops() {
    let ctx = TestContext::new("rw-poison-all");
    let partitions = 2;
    ctx.create_topics(partitions).await;
    let config = config(&ctx);
    let group = config.consumer.group_id.clone();
    let producer = producer(&config);
    let mut poison_count = 0;
    let mut normal = Vec::new();
    for partition in 0..partitions {
        let poison = poison_records(&shapes(), &format!("p{partition}"));
        poison_count += poison.len();
        produce_poison(&ctx.topics.results, partition, &poison).await;
        // Normal results of two tenants after the poison, on the same partition.
        for index in 0..5 {
            let tenant = if index % 2 == 0 { "acme" } else { "globex" };
            let result = result(tenant, &format!("p{partition}-t{index}"), 1_000, "billing");
            common::produce_results_to(
                &producer,
                &ctx.topics.results,
                partition,
                std::slice::from_ref(&result),
            )
            .await;
            normal.push(result);
        }
    }
    let dead_letters = consumer(&ctx.topics.dead_letters);
    let writer = Writer::start(config);

    let letters: Vec<DeadLetter> = read_records(&dead_letters, poison_count, WAIT)
        .await
        .iter()
        .map(|record| DeadLetter::decode(record.payload().unwrap()).unwrap())
        .collect();
    let end = i64::try_from(poison_count + normal.len()).unwrap();
    wait_until("every partition committed to its end", WAIT, || async {
        (committed(&group, &ctx.topics.results, partitions).await == end).then_some(())
    })
    .await;
    // Exactly one dead letter each: nothing more arrives.
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty()
    );
    let mut by_class: BTreeMap<i32, usize> = BTreeMap::new();
    for letter in &letters {
        *by_class.entry(letter.error_class).or_default() += 1;
        assert_eq!(letter.failed_service, "result-writer");
    }
    // Per partition: five that do not decode, two timestamps and one row PostgreSQL refuses.
    let per_partition = poison_count / 2;
    assert_eq!(
        by_class.get(&(ErrorClass::Decode as i32)),
        Some(&(5 * 2)),
        "{by_class:?}"
    );
    assert_eq!(
        by_class.get(&(ErrorClass::InvalidEvent as i32)),
        Some(&((per_partition - 5) * 2)),
        "{by_class:?}"
    );
    let db = Db::connect(&ctx.db_schema).await;
    assert_eq!(db.count().await, Some(normal.len() as i64));
    writer.stop().await;
    db.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_with_one_row_postgres_refuses_writes_999_and_dead_letters_one() {
    let ctx = TestContext::new("rw-bisect");
    ctx.create_topics(1).await;
    let mut config = config(&ctx);
    config.batch.max_rows = 1_000;
    config.batch.max_delay = Duration::from_secs(2);
    let group = config.consumer.group_id.clone();
    let producer = producer(&config);
    let refused_id = incompressible_id();
    let results: Vec<InferenceResult> = (0..1_000)
        .map(|index| {
            let tenant = if index % 2 == 0 { "acme" } else { "globex" };
            let ticket = if index == 500 {
                refused_id.clone()
            } else {
                format!("t-{index}")
            };
            result(tenant, &ticket, 1_000, "billing")
        })
        .collect();
    produce_results(&producer, &ctx.topics.results, &results).await;
    let dead_letters = consumer(&ctx.topics.dead_letters);
    let writer = Writer::start(config);

    let letters = read_records(&dead_letters, 1, WAIT).await;
    let letter = DeadLetter::decode(letters[0].payload().unwrap()).unwrap();
    assert_eq!(letter.ticket_id, refused_id);
    assert_eq!(letter.source_offset, 500);
    assert_eq!(letter.error_class, ErrorClass::InvalidEvent as i32);
    assert!(
        letter.error_message.contains("54000") && letter.error_message.contains("index row"),
        "the dead letter names PostgreSQL's error: {}",
        letter.error_message
    );
    wait_until("all 1,000 records committed", WAIT, || async {
        (committed(&group, &ctx.topics.results, 1).await == 1_000).then_some(())
    })
    .await;
    let db = Db::connect(&ctx.db_schema).await;
    assert_eq!(db.count().await, Some(999));
    assert!(
        read_for(&dead_letters, Duration::from_millis(500))
            .await
            .is_empty()
    );
    writer.stop().await;
    db.drop_schema().await;
}
