//! `dlq-alerter replay` against the real broker: a dry run lists exactly the filtered dead
//! letters and publishes nothing; `--execute` re-publishes exactly the replayable ones to the
//! task topic, byte for byte but for the incremented `replay_count`, with the replay header.
//!
//! That the worker then triages them is checked end to end in `replay_worker.rs`.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use common::*;
use dlq_alerter::replay::{ReplayArgs, replay};
use rdkafka::{Message, message::Headers};
use triage_proto::{
    ContentType, Contract,
    v1::{DeadLetter, ErrorClass, InferenceTask, TicketCreated},
};
use triage_runtime::kafka::headers::REPLAY_OF;
use triage_test_support::{ServiceProcess, TestContext, read_for, read_records};

const BINARY: &str = env!("CARGO_BIN_EXE_dlq-alerter");

struct Fixture {
    context: TestContext,
    /// The dead letters that the filter below must select and that can be replayed.
    replayable: Vec<DeadLetter>,
    /// Selected by the filter, but from the ticket topic: listed, never re-published.
    not_replayable: DeadLetter,
    since: String,
}

async fn fixture(name: &str) -> Fixture {
    let context = TestContext::new(name);
    context.create_topics(3).await;
    let now = SystemTime::now();
    let an_hour_ago = now - Duration::from_secs(3600);
    let dead_letter = |id: &str, class, tenant: &str, content_type, at| {
        let mut task = task(&format!("t-{id}"), tenant, "please triage me");
        task.replay_count = if content_type == ContentType::Protobuf {
            1
        } else {
            0
        };
        dead_letter_of_task(&context, id, class, &task, content_type, at)
    };
    let a = dead_letter(
        "replay-a",
        ErrorClass::InvalidOutput,
        "acme",
        ContentType::Json,
        now,
    );
    let b = dead_letter(
        "replay-b",
        ErrorClass::InvalidOutput,
        "acme",
        ContentType::Protobuf,
        now,
    );
    let other_tenant = dead_letter(
        "replay-c",
        ErrorClass::InvalidOutput,
        "globex",
        ContentType::Json,
        now,
    );
    let other_class = dead_letter(
        "replay-d",
        ErrorClass::RetriesExhausted,
        "acme",
        ContentType::Json,
        now,
    );
    let too_old = dead_letter(
        "replay-g",
        ErrorClass::InvalidOutput,
        "acme",
        ContentType::Json,
        an_hour_ago,
    );
    let mut from_ticket = dead_letter(
        "replay-e",
        ErrorClass::InvalidOutput,
        "acme",
        ContentType::Json,
        now,
    );
    from_ticket.source_topic = context.topics.tickets_created.clone();
    from_ticket.original_value = triage_proto::encode(
        &TicketCreated {
            ticket_id: "t-replay-e".into(),
            tenant_id: "acme".into(),
            subject: "hi".into(),
            ..Default::default()
        },
        ContentType::Json,
    );
    from_ticket.original_headers = vec![
        header("content-type", ContentType::JSON_MIME),
        header("ce_type", TicketCreated::MESSAGE_TYPE),
    ];
    let garbage = Record {
        key: "garbage".into(),
        value: b"\x00\x01garbage".to_vec(),
        headers: vec![],
    };
    let mut records: Vec<Record> = [&a, &other_tenant, &b, &other_class, &too_old, &from_ticket]
        .into_iter()
        .map(Record::dead_letter)
        .collect();
    records.push(garbage);
    produce_all(&context.topics.dead_letters, &records).await;
    let since = chrono::DateTime::<chrono::Utc>::from(now - Duration::from_secs(600)).to_rfc3339();
    Fixture {
        context,
        replayable: vec![a, b],
        not_replayable: from_ticket,
        since,
    }
}

fn filter(fixture: &Fixture, execute: bool) -> ReplayArgs {
    ReplayArgs {
        class: Some("invalid_output".into()),
        tenant: Some("acme".into()),
        since: Some(chrono::DateTime::parse_from_rfc3339(&fixture.since).unwrap()),
        execute,
        ..Default::default()
    }
}

#[tokio::test]
async fn replay_lists_then_re_publishes_exactly_the_filtered_tasks() {
    let fixture = fixture("dlq-replay").await;
    let config = config(&fixture.context, None, None);

    let mut table = Vec::new();
    let dry = replay(&config, &filter(&fixture, false), &mut table)
        .await
        .unwrap();
    let table = String::from_utf8(table).unwrap();
    let mut matched = dry.matched.clone();
    matched.sort();
    assert_eq!(matched, vec!["replay-a", "replay-b", "replay-e"], "{table}");
    assert_eq!(dry.scanned, 7);
    assert_eq!(dry.undecodable, 1);
    assert!(dry.replayed.is_empty());
    assert_eq!(dry.skipped.len(), 1);
    assert!(
        dry.skipped[0].1.contains("not an InferenceTask"),
        "{:?}",
        dry.skipped
    );
    for id in ["replay-a", "replay-b", "replay-e"] {
        assert!(table.contains(id), "{table}");
    }
    assert!(table.contains("dry run"), "{table}");

    let mut out = Vec::new();
    let executed = replay(&config, &filter(&fixture, true), &mut out)
        .await
        .unwrap();
    let mut replayed = executed.replayed.clone();
    replayed.sort();
    assert_eq!(replayed, vec!["replay-a", "replay-b"]);

    // Exactly two records on the task topic: the dry run published nothing.
    let consumer = triage_test_support::consumer(&fixture.context.topics.inference_tasks);
    let records = read_records(&consumer, 2, DEADLINE).await;
    assert!(
        read_for(&consumer, Duration::from_secs(2)).await.is_empty(),
        "more than the filtered records were published"
    );
    let by_id: HashMap<String, _> = records
        .iter()
        .map(|r| {
            (
                triage_test_support::header(r, REPLAY_OF)
                    .unwrap()
                    .to_owned(),
                r,
            )
        })
        .collect();
    for dead_letter in &fixture.replayable {
        let record = by_id[&dead_letter.id];
        assert_eq!(record.key().unwrap(), dead_letter.ticket_id.as_bytes());
        // Byte for byte the original task, with one more replay, in its own content type.
        let content_type =
            ContentType::from_mime(triage_test_support::header(record, "content-type").unwrap())
                .unwrap();
        let mut expected: InferenceTask =
            triage_proto::decode(&dead_letter.original_value, Some(content_type.as_mime()))
                .unwrap();
        let original_count = expected.replay_count;
        expected.replay_count += 1;
        assert_eq!(
            record.payload().unwrap(),
            triage_proto::encode(&expected, content_type).as_slice()
        );
        let decoded: InferenceTask =
            triage_proto::decode(record.payload().unwrap(), Some(content_type.as_mime())).unwrap();
        assert_eq!(decoded.replay_count, original_count + 1);
        // Every original header is kept, plus the replay marker.
        let headers: Vec<(String, Vec<u8>)> = record
            .headers()
            .unwrap()
            .iter()
            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
            .collect();
        let mut expected_headers: Vec<(String, Vec<u8>)> = dead_letter
            .original_headers
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        expected_headers.push((REPLAY_OF.to_owned(), dead_letter.id.as_bytes().to_vec()));
        assert_eq!(headers, expected_headers);
        assert_eq!(
            triage_test_support::header(record, "ce_type"),
            Some(InferenceTask::MESSAGE_TYPE)
        );
    }
    assert!(!by_id.contains_key(&fixture.not_replayable.id));
}

/// The binary's `replay` subcommand is a dry run unless told otherwise, and `--id` selects one
/// dead letter.
#[tokio::test]
async fn the_replay_subcommand_lists_by_id_without_publishing() {
    let fixture = fixture("dlq-replay-cli").await;
    let env = fixture.context.provisioning_service_env();
    let output = tokio::task::spawn_blocking(move || {
        ServiceProcess::run_to_exit(BINARY.as_ref(), &["replay", "--id", "replay-b"], &env)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("replay-b"), "{stdout}");
    assert!(!stdout.contains("replay-a"), "{stdout}");
    assert!(
        stdout.contains("7 dead letters read, 1 match, 1 replayable"),
        "{stdout}"
    );
    assert!(stdout.contains("dry run"), "{stdout}");

    let bad = ServiceProcess::run_to_exit(BINARY.as_ref(), &["replay", "--class", "nope"], &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown error class"));

    let consumer = triage_test_support::consumer(&fixture.context.topics.inference_tasks);
    assert!(
        read_for(&consumer, Duration::from_secs(2)).await.is_empty(),
        "a dry run published"
    );
}
