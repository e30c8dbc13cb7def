//! Replacement fencing, as a StatefulSet replaces a dispatcher pod: the replacement has the same
//! replica id (the pod name `<release>-ticket-dispatcher-0`), so the same `transactional.id`
//! and `group.instance.id`, while its predecessor is still alive but frozen in the middle of a
//! transaction (a node that stopped answering). The replacement's `init_transactions` fences
//! the predecessor and aborts its open transaction at once, so read-committed consumers are not
//! blocked until `transaction.timeout`; the predecessor, thawed, is refused and exits; every
//! event has exactly one task.

mod common;

use std::time::{Duration, Instant};

use triage_test_support::{ServiceProcess, TestContext, consumer, read_for, read_records};

const BINARY: &str = env!("CARGO_BIN_EXE_ticket-publisher");
const EVENTS: usize = 5_000;
/// Long, so that a transaction left open (not aborted by fencing) would visibly block the
/// read-committed consumer far beyond the deadline the test allows.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(120);

fn dispatcher_env(ctx: &TestContext, transaction_timeout: Duration) -> Vec<(String, String)> {
    let mut env = ctx.provisioning_service_env();
    env.extend([
        ("TRIAGE_INGRESS__ENABLED".into(), "false".into()),
        ("TRIAGE_TOPIC_PROVISIONING__ENABLED".into(), "false".into()),
        ("TRIAGE_DISPATCH__GROUP_ID".into(), ctx.group("dispatch")),
        ("TRIAGE_DISPATCH__TRANSACTIONAL_ID".into(), ctx.group("tx")),
        // The StatefulSet's stable pod name.
        (
            "TRIAGE_DISPATCH__REPLICA_ID".into(),
            "tt-ticket-dispatcher-0".into(),
        ),
        ("TRIAGE_DISPATCH__STATIC_MEMBERSHIP".into(), "true".into()),
        ("TRIAGE_DISPATCH__LANES".into(), "1".into()),
        ("TRIAGE_DISPATCH__BATCH_MAX_RECORDS".into(), "200".into()),
        ("TRIAGE_DISPATCH__BATCH_MAX_WAIT".into(), "200ms".into()),
        (
            "TRIAGE_DISPATCH__TRANSACTION_TIMEOUT".into(),
            format!("{}s", transaction_timeout.as_secs()),
        ),
    ]);
    env
}

#[tokio::test]
async fn a_replacement_with_the_same_id_fences_a_frozen_predecessor_and_aborts_its_transaction() {
    let ctx = TestContext::new("tp_fence");
    ctx.create_topics(3).await;
    common::produce_ticket_events(&ctx.topics.tickets_created, EVENTS).await;
    let env = dispatcher_env(&ctx, TRANSACTION_TIMEOUT);
    let predecessor = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    predecessor.wait_ready(Duration::from_secs(30)).await;
    let open_records = freeze_inside_a_transaction(&ctx, &predecessor).await;

    let committed = consumer(&ctx.topics.inference_tasks);
    let replaced_at = Instant::now();
    let replacement = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    replacement.wait_ready(Duration::from_secs(30)).await;
    let tasks = read_records(&committed, EVENTS, Duration::from_secs(60)).await;
    let all_visible = replaced_at.elapsed();
    eprintln!(
        "replacement started; all {EVENTS} tasks visible to read_committed after {:.1} s \
         (transaction.timeout {} s); the frozen transaction held {open_records} records",
        all_visible.as_secs_f64(),
        TRANSACTION_TIMEOUT.as_secs()
    );
    assert!(
        all_visible < TRANSACTION_TIMEOUT / 4,
        "the predecessor's open transaction held read_committed consumers for {all_visible:?}: \
         it was not aborted by fencing"
    );

    // Thawed, the predecessor finds itself fenced and stops with an error.
    predecessor.signal("CONT");
    let status = predecessor.wait_exit(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "a fenced dispatcher must not carry on:\n{}",
        predecessor.log()
    );
    let extra = read_for(&committed, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "{} tasks more than events", extra.len());

    common::assert_one_task_per_ticket(&tasks, EVENTS);

    replacement
        .ensure_running()
        .expect("the replacement keeps running");
    replacement.signal("TERM");
    assert!(
        replacement
            .wait_exit(Duration::from_secs(10))
            .await
            .success(),
        "{}",
        replacement.log()
    );
}

/// A transaction held open past `transaction.timeout` (a broker kill or a coordinator move can
/// hold one that long; here the dispatcher is frozen) is aborted by the coordinator, which bumps
/// the producer's epoch: the producer's next request is refused as fenced, exactly as by a
/// successor. With no successor, the dispatcher must not stop: a new producer redoes the batch,
/// and every event still has exactly one task.
#[tokio::test]
async fn a_transaction_the_coordinator_timed_out_is_redone_not_taken_for_a_successor() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let ctx = TestContext::new("tp_txn_timeout");
    ctx.create_topics(3).await;
    common::produce_ticket_events(&ctx.topics.tickets_created, EVENTS).await;
    let env = dispatcher_env(&ctx, TIMEOUT);
    let dispatcher = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    dispatcher.wait_ready(Duration::from_secs(30)).await;
    let committed = consumer(&ctx.topics.inference_tasks);
    freeze_inside_a_transaction(&ctx, &dispatcher).await;

    // The coordinator's abort of a timed-out transaction (it looks every 10 s by default)
    // bumps the epoch; only then is the dispatcher thawed.
    let transactional_id = format!("{}-tt-ticket-dispatcher-0-0", ctx.group("tx"));
    let (state, frozen_epoch) = triage_test_support::describe_transaction(&transactional_id)
        .expect("the coordinator knows the frozen transaction");
    assert_eq!(state, "Ongoing", "frozen inside a transaction");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match triage_test_support::describe_transaction(&transactional_id) {
            Some((state, epoch)) if epoch > frozen_epoch && state != "Ongoing" => break,
            seen => assert!(
                Instant::now() < deadline,
                "the coordinator did not abort the timed-out transaction within 60 s: {seen:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    dispatcher.signal("CONT");

    let tasks = read_records(&committed, EVENTS, Duration::from_secs(60)).await;
    let extra = read_for(&committed, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "{} tasks more than events", extra.len());
    common::assert_one_task_per_ticket(&tasks, EVENTS);
    dispatcher
        .ensure_running()
        .expect("a timed-out transaction is not a successor: the dispatcher carries on");
    assert!(
        dispatcher
            .log()
            .contains("new transactional producer ready"),
        "{}",
        dispatcher.log()
    );
    dispatcher.signal("TERM");
    assert!(
        dispatcher
            .wait_exit(Duration::from_secs(10))
            .await
            .success(),
        "{}",
        dispatcher.log()
    );
}

/// Stops `dispatcher` (SIGSTOP) while one of its transactions is open: read_uncommitted then
/// sees records read_committed does not. Between transactions it is thawed for a moment and
/// tried again. Returns how many records the frozen transaction holds.
async fn freeze_inside_a_transaction(ctx: &TestContext, dispatcher: &ServiceProcess) -> usize {
    let uncommitted = common::task_reader(&ctx.topics.inference_tasks, 3, "read_uncommitted");
    let visible = common::task_reader(&ctx.topics.inference_tasks, 3, "read_committed");
    let (mut in_log, mut committed_before) = (0, 0);
    for _ in 0..20 {
        in_log += read_records(&uncommitted, 1, Duration::from_secs(30))
            .await
            .len();
        dispatcher.signal("STOP");
        in_log += read_for(&uncommitted, Duration::from_millis(500))
            .await
            .len();
        committed_before += read_for(&visible, Duration::from_millis(500)).await.len();
        if in_log > committed_before {
            return in_log - committed_before;
        }
        dispatcher.signal("CONT");
    }
    panic!("could not freeze the dispatcher inside a transaction");
}
