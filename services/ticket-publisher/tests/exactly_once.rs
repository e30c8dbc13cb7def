//! The dispatch stage killed with SIGKILL in the middle of a batch and restarted: under
//! read_committed there is exactly one task per event, none missing, none twice.

use std::{collections::HashMap, time::Duration};

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use triage_proto::{
    ContentType,
    v1::{InferenceTask, TicketCreated},
};
use triage_test_support::{
    ServiceProcess, TestContext, client_config, consumer, header, read_for, read_records,
};

const BINARY: &str = env!("CARGO_BIN_EXE_ticket-publisher");
const EVENTS: usize = 20_000;
/// Kill -9 rounds before the final, clean run: several, so that at least one lands inside an
/// open transaction (the test proves that one did).
const KILLS: usize = 4;

fn dispatcher_env(ctx: &TestContext) -> Vec<(String, String)> {
    let mut env = ctx.service_env();
    env.extend([
        ("TRIAGE_INGRESS__ENABLED".into(), "false".into()),
        ("TRIAGE_TOPIC_PROVISIONING__ENABLED".into(), "false".into()),
        ("TRIAGE_DISPATCH__GROUP_ID".into(), ctx.group("dispatch")),
        ("TRIAGE_DISPATCH__TRANSACTIONAL_ID".into(), ctx.group("tx")),
        ("TRIAGE_DISPATCH__REPLICA_ID".into(), "replica-0".into()),
        // The restarted replica has the same name, as in a StatefulSet: it rejoins at once.
        ("TRIAGE_DISPATCH__STATIC_MEMBERSHIP".into(), "true".into()),
        // Two lanes: two transactional producers and group members in the one process, each
        // killed mid-transaction and fenced by its own successor.
        ("TRIAGE_DISPATCH__LANES".into(), "2".into()),
        ("TRIAGE_DISPATCH__BATCH_MAX_RECORDS".into(), "500".into()),
        ("TRIAGE_DISPATCH__BATCH_MAX_WAIT".into(), "100ms".into()),
        ("TRIAGE_TELEMETRY__LOG_LEVEL".into(), "info".into()),
    ]);
    env
}

/// Everything on the tasks topic, aborted transactions included. Partitions are assigned
/// directly (no group join), so it sees records within milliseconds of their being written.
fn uncommitted_reader(topic: &str, partitions: i32) -> StreamConsumer {
    let reader: StreamConsumer = client_config()
        .set(
            "group.id",
            format!("test-uncommitted-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    reader.assign(&assignment).unwrap();
    reader
}

#[tokio::test]
async fn kill_9_mid_batch_then_restart_gives_exactly_one_task_per_event() {
    let ctx = TestContext::new("tp_kill9");
    ctx.create_topics(3).await;
    let producer: FutureProducer = client_config().create().unwrap();
    let sends = (0..EVENTS).map(|i| {
        let ticket_id = format!("t-{i:05}");
        let event = TicketCreated {
            ticket_id: ticket_id.clone(),
            tenant_id: format!("tenant-{}", i % 7),
            subject: "subject".into(),
            description: format!("ticket number {i}"),
            ..Default::default()
        };
        let payload = triage_proto::encode(&event, ContentType::Protobuf);
        let producer = producer.clone();
        let topic = ctx.topics.tickets_created.clone();
        async move {
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some("application/x-protobuf"),
            });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&ticket_id)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(20),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
    futures::future::join_all(sends).await;

    let uncommitted = uncommitted_reader(&ctx.topics.inference_tasks, 3);
    let env = dispatcher_env(&ctx);
    let mut in_log = 0;
    for _ in 0..KILLS {
        let doomed = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
        doomed.wait_ready(Duration::from_secs(30)).await;
        // As soon as it writes tasks, kill it: with a backlog the stage is inside a transaction
        // nearly all the time.
        in_log += read_records(&uncommitted, 1, Duration::from_secs(30))
            .await
            .len();
        doomed.signal("KILL");
        doomed.wait_exit(Duration::from_secs(5)).await;
    }

    let second = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    second.wait_ready(Duration::from_secs(30)).await;
    let committed = consumer(&ctx.topics.inference_tasks);
    let tasks = read_records(&committed, EVENTS, Duration::from_secs(60)).await;
    let extra = read_for(&committed, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "{} tasks more than events", extra.len());

    let mut per_ticket: HashMap<String, usize> = HashMap::new();
    for record in &tasks {
        let task: InferenceTask =
            triage_proto::decode(record.payload().unwrap(), header(record, "content-type"))
                .unwrap();
        *per_ticket.entry(task.ticket_id).or_default() += 1;
    }
    assert_eq!(per_ticket.len(), EVENTS, "a ticket has no task");
    assert!(
        per_ticket.values().all(|&n| n == 1),
        "a ticket has two tasks"
    );

    // Proof that the kill landed inside a transaction: records of the killed instance's open
    // batch are in the log (read_uncommitted sees them) but were never committed, so the log
    // holds more task records than there are tasks.
    loop {
        let more = read_for(&uncommitted, Duration::from_secs(1)).await.len();
        if more == 0 {
            break;
        }
        in_log += more;
    }
    eprintln!("task records in the log: {in_log}, committed tasks: {EVENTS}");
    assert!(
        in_log > EVENTS,
        "the kill did not interrupt a batch ({in_log} records in the log)"
    );
    second.signal("TERM");
    let status = second.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", second.log());
}
