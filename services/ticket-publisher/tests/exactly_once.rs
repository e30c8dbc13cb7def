//! The dispatch stage killed with SIGKILL in the middle of a batch and restarted: under
//! read_committed there is exactly one task per event, none missing, none twice.
//!
//! A `cluster_` test: make test runs it on the three-broker cluster (`make test-cluster`), where
//! the transaction log and the task topic have three copies and two must be in sync.

mod common;

use std::time::Duration;

use triage_test_support::{ServiceProcess, TestContext, consumer, read_for, read_records};

const BINARY: &str = env!("CARGO_BIN_EXE_ticket-publisher");
const EVENTS: usize = 20_000;
/// Kill -9 rounds before the final, clean run: several, so that at least one lands inside an
/// open transaction (the test proves that one did).
const KILLS: usize = 4;

fn dispatcher_env(ctx: &TestContext) -> Vec<(String, String)> {
    let mut env = ctx.provisioning_service_env();
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

#[tokio::test]
async fn cluster_kill_9_mid_batch_then_restart_gives_exactly_one_task_per_event() {
    let ctx = TestContext::new("tp_kill9");
    ctx.create_topics(3).await;
    common::produce_ticket_events(&ctx.topics.tickets_created, EVENTS).await;

    let uncommitted = common::task_reader(&ctx.topics.inference_tasks, 3, "read_uncommitted");
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

    common::assert_one_task_per_ticket(&tasks, EVENTS);

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
