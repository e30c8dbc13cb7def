//! dlq-alerter against the real broker and a local webhook sink: what an alert says (and never
//! says), one alert and one summary per incident, 429 `Retry-After`, and a webhook that is down
//! for a while, with offsets committed only past delivered alerts.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use triage_proto::{
    ContentType, Contract,
    v1::{ErrorClass, TicketCreated},
};
use triage_test_support::{ServiceProcess, TestContext, wait_until};

const BINARY: &str = env!("CARGO_BIN_EXE_dlq-alerter");

const SLACK_PATH: &str = "/services/T0SECRET/B0SECRET/xoxSlackTokenNeverShown";
const WEBHOOK_PATH: &str = "/hooks/generic-secret-path-4f1d";
const BEARER_TOKEN: &str = "api-key-never-shown-93be";

/// The binary as it runs in production, logging at DEBUG: every field of a Slack alert and of
/// a JSON webhook post, redaction, a record that is no dead letter, and no secret in its logs,
/// in the posts or in its metrics, including after a refused post.
#[tokio::test]
async fn alerts_carry_every_field_redacted_and_never_a_secret() {
    let context = TestContext::new("dlq-contents");
    context.create_topics(2).await;
    let sink = Sink::start().await;
    // The first post (to either output) fails, so the failure path logs too.
    sink.script(&[Reply::Status(500)]);
    let slack_url = sink.url(SLACK_PATH);
    let webhook_url = sink.url(WEBHOOK_PATH);

    let now = SystemTime::now();
    let task = task(
        "t-contents-1",
        "acme",
        "My card 4111 1111 1111 1111 was charged twice, mail jane.doe@example.com or call +1 (415) 555-0123",
    );
    let from_task = dead_letter_of_task(
        &context,
        "dl-task-1",
        ErrorClass::InvalidOutput,
        &task,
        ContentType::Json,
        now,
    );
    let ticket = TicketCreated {
        ticket_id: "t-contents-2".into(),
        tenant_id: "globex".into(),
        subject: "Cannot log in".into(),
        description: "Since Monday, reach me on 030 1234567. ".repeat(20),
        ..Default::default()
    };
    let mut from_ticket = from_task.clone();
    from_ticket.id = "dl-ticket-2".into();
    from_ticket.error_class = ErrorClass::InvalidEvent as i32;
    from_ticket.ticket_id = ticket.ticket_id.clone();
    from_ticket.tenant_id = ticket.tenant_id.clone();
    from_ticket.source_topic = context.topics.tickets_created.clone();
    from_ticket.original_value = triage_proto::encode(&ticket, ContentType::Protobuf);
    from_ticket.original_headers = vec![
        header("content-type", ContentType::PROTOBUF_MIME),
        header("ce_type", TicketCreated::MESSAGE_TYPE),
    ];
    let garbage = Record {
        key: "garbage".into(),
        value: b"\xff\xfe not a dead letter".to_vec(),
        headers: vec![],
    };
    produce_all(
        &context.topics.dead_letters,
        &[
            Record::dead_letter(&from_task),
            Record::dead_letter(&from_ticket),
            garbage,
        ],
    )
    .await;

    let mut env = context.provisioning_service_env();
    env.extend([
        ("TRIAGE_SLACK__WEBHOOK_URL".to_owned(), slack_url.clone()),
        ("TRIAGE_WEBHOOK__URL".to_owned(), webhook_url.clone()),
        (
            "TRIAGE_WEBHOOK__BEARER_TOKEN".to_owned(),
            BEARER_TOKEN.to_owned(),
        ),
        (
            "TRIAGE_CONSUMER__GROUP_ID".to_owned(),
            context.group("alerter"),
        ),
        (
            "TRIAGE_CONSUMER__COMMIT_INTERVAL".to_owned(),
            "200ms".to_owned(),
        ),
        (
            "TRIAGE_TOPIC_PROVISIONING__ENABLED".to_owned(),
            "false".to_owned(),
        ),
        (
            "TRIAGE_DELIVERY__MIN_BACKOFF".to_owned(),
            "100ms".to_owned(),
        ),
        ("TRIAGE_ALERTS__EXCERPT_CHARS".to_owned(), "120".to_owned()),
        ("RUST_LOG".to_owned(), "debug".to_owned()),
    ]);
    let process = ServiceProcess::spawn(BINARY.as_ref(), &[], &env);
    process.wait_ready(DEADLINE).await;

    wait_until("3 alerts on each output", DEADLINE, || async {
        (sink.posts_to(SLACK_PATH).len() == 3 && sink.posts_to(WEBHOOK_PATH).len() == 3)
            .then_some(())
    })
    .await;
    let group = context.group("alerter");
    wait_until("all 3 offsets committed", DEADLINE, || async {
        (committed_total(&group, &context.topics.dead_letters, 2) == 3).then_some(())
    })
    .await;

    // Slack: Block Kit with every field of the task's dead letter.
    let slack_posts = sink.posts_to(SLACK_PATH);
    let slack = slack_posts
        .iter()
        // The ticket's dead letter is a clone of the task's, so its error text names
        // dl-task-1 too: pick the alert by its dead-letter field, not by a substring.
        .find(|p| p.raw.contains("*Dead letter*\\ndl-task-1"))
        .expect("the task's alert");
    let blocks = slack.body["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert_eq!(blocks[0]["text"]["text"], "Dead letter: invalid_output");
    let fields: Vec<&str> = blocks[2]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    let first_failure = chrono::DateTime::<chrono::Utc>::from(now - Duration::from_secs(90))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let last_failure = chrono::DateTime::<chrono::Utc>::from(now)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(
        fields,
        vec![
            "*Error class*\ninvalid_output".to_owned(),
            "*Ticket*\nt-contents-1".to_owned(),
            "*Tenant*\nacme".to_owned(),
            format!(
                "*Source*\n{} partition 2 offset 1234",
                context.topics.inference_tasks
            ),
            "*Attempts*\n3".to_owned(),
            "*Failed service*\ninference-worker".to_owned(),
            format!("*First failure*\n{first_failure}"),
            format!("*Last failure*\n{last_failure}"),
            "*Trace id*\n4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
            "*Dead letter*\ndl-task-1".to_owned(),
        ]
    );
    let error_text = blocks[1]["text"]["text"].as_str().unwrap();
    assert!(
        error_text.contains("not a triage (dl-task-1)"),
        "{error_text}"
    );
    assert_eq!(
        blocks[3]["text"]["text"],
        "*Ticket excerpt (redacted)*\n>My card [card] was charged twice, mail [email] or call [phone]"
    );
    assert_eq!(
        blocks[4]["text"]["text"],
        "*Replay*\n```dlq-alerter replay --id dl-task-1 --execute```"
    );
    assert!(
        slack.body["text"]
            .as_str()
            .unwrap()
            .contains("t-contents-1")
    );

    // The ticket's excerpt is its subject and description, redacted and cut to 120 characters.
    let ticket_alert = slack_posts
        .iter()
        .find(|p| p.raw.contains("dl-ticket-2"))
        .unwrap();
    let excerpt = ticket_alert.body["blocks"][3]["text"]["text"]
        .as_str()
        .unwrap();
    let excerpt = excerpt
        .strip_prefix("*Ticket excerpt (redacted)*\n>")
        .unwrap();
    assert!(
        excerpt.starts_with("Cannot log in — Since Monday, reach me on [phone]."),
        "{excerpt}"
    );
    assert_eq!(excerpt.chars().count(), 120);
    assert!(excerpt.ends_with('…'));

    // The record that is no dead letter is alerted as `decode`, with its size.
    let decode_alert = slack_posts
        .iter()
        .find(|p| p.raw.contains("Dead letter: decode"))
        .unwrap();
    assert!(
        decode_alert
            .raw
            .contains("not a DeadLetter envelope (20 bytes)"),
        "{}",
        decode_alert.raw
    );
    assert!(
        decode_alert
            .raw
            .contains("hex:fffe206e6f7420612064656164206c6574746572"),
        "{}",
        decode_alert.raw
    );

    // The JSON webhook: the same facts as plain JSON, with the bearer token as authorization.
    let webhook_posts = sink.posts_to(WEBHOOK_PATH);
    let json = webhook_posts
        .iter()
        .find(|p| p.body["dead_letter"]["dead_letter_id"] == "dl-task-1")
        .expect("the task's webhook post");
    assert_eq!(
        json.headers["authorization"].to_str().unwrap(),
        format!("Bearer {BEARER_TOKEN}")
    );
    let dead_letter = &json.body["dead_letter"];
    assert_eq!(json.body["type"], "dead_letter");
    assert_eq!(dead_letter["error_class"], "invalid_output");
    assert_eq!(dead_letter["ticket_id"], "t-contents-1");
    assert_eq!(dead_letter["tenant_id"], "acme");
    assert_eq!(
        dead_letter["source"]["topic"],
        context.topics.inference_tasks.as_str()
    );
    assert_eq!(dead_letter["source"]["partition"], 2);
    assert_eq!(dead_letter["source"]["offset"], 1234);
    assert_eq!(dead_letter["attempts"], 3);
    assert_eq!(dead_letter["failed_service"], "inference-worker");
    assert_eq!(dead_letter["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        dead_letter["excerpt"],
        "My card [card] was charged twice, mail [email] or call [phone]"
    );
    assert_eq!(
        dead_letter["replay_command"],
        "dlq-alerter replay --id dl-task-1 --execute"
    );
    assert_eq!(
        dead_letter["dead_letter_record"]["topic"],
        context.topics.dead_letters.as_str()
    );
    assert!(sink.attempts().iter().any(|a| a.status == 500));

    // No secret anywhere: logs (DEBUG, including the refused post), posts, metrics.
    let metrics = reqwest::get(process.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{}", process.log());
    let log = process.log();
    assert!(
        log.contains("alert not delivered; retrying"),
        "the failure path ran"
    );
    let everything = [log.as_str(), metrics.as_str()]
        .into_iter()
        .chain(sink.posts().iter().map(|p| p.raw.as_str()))
        .collect::<Vec<_>>()
        .join("\n");
    for secret in [
        slack_url.as_str(),
        webhook_url.as_str(),
        SLACK_PATH,
        WEBHOOK_PATH,
        "xoxSlackTokenNeverShown",
        "generic-secret-path-4f1d",
        BEARER_TOKEN,
    ] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
    // And no personal data from the ticket text either.
    for personal in [
        "jane.doe@example.com",
        "4111 1111",
        "555-0123",
        "030 1234567",
    ] {
        let posts: String = sink.posts().iter().map(|p| p.raw.clone()).collect();
        assert!(!posts.contains(personal), "{personal} not redacted");
    }
}

/// An incident: 500 dead letters of one class arrive within one window. People get exactly
/// two messages, the first failure in full and a summary of the 499 others, and every offset
/// is committed only once the summary is delivered.
#[tokio::test]
async fn five_hundred_failures_of_one_class_make_one_alert_and_one_summary() {
    let context = TestContext::new("dlq-storm");
    context.create_topics(2).await;
    let sink = Sink::start().await;
    let now = SystemTime::now();
    let records: Vec<Record> = (0..500)
        .map(|n| {
            let tenant = ["acme", "globex", "initech"][n % 3];
            let task = task(&format!("t-storm-{n:03}"), tenant, "where is my refund");
            Record::dead_letter(&dead_letter_of_task(
                &context,
                &format!("dl-storm-{n:03}"),
                ErrorClass::InvalidOutput,
                &task,
                ContentType::Protobuf,
                now,
            ))
        })
        .collect();
    produce_all(&context.topics.dead_letters, &records).await;

    let mut config = config(&context, Some(sink.url("/slack")), None);
    // Long enough for all 500 to be consumed inside it on a loaded CI machine.
    config.aggregation.window = Duration::from_secs(6);
    let started = Instant::now();
    let service = Running::start(config);
    let group = context.group("alerter");
    wait_until("all 500 offsets committed", DEADLINE, || async {
        (committed_total(&group, &context.topics.dead_letters, 2) == 500).then_some(())
    })
    .await;

    let posts = sink.posts();
    assert_eq!(
        posts.len(),
        2,
        "{:#?}",
        posts.iter().map(|p| &p.raw).collect::<Vec<_>>()
    );
    assert!(
        posts[0].raw.contains("Dead letter: invalid_output"),
        "{}",
        posts[0].raw
    );
    let summary = &posts[1];
    assert_eq!(
        summary.body["blocks"][0]["text"]["text"],
        "499 more invalid_output failures in the last 6 seconds"
    );
    assert!(
        summary.raw.contains("Tenants affected (3)"),
        "{}",
        summary.raw
    );
    let tickets_field = summary.body["blocks"][1]["fields"][2]["text"]
        .as_str()
        .unwrap();
    assert!(
        tickets_field.starts_with("*Tickets (first 10)*\nt-storm-"),
        "{tickets_field}"
    );
    assert_eq!(tickets_field.matches("t-storm-").count(), 10);
    assert!(
        summary
            .raw
            .contains("dlq-alerter replay --class invalid_output --since"),
        "{}",
        summary.raw
    );
    // The summary waited for its window to close. The window opened when the first failure
    // was read, after the service started; the first alert's own post can come later than that
    // (one run here posted it 1.1 s after), so the alert is no reference for the window.
    assert!(
        summary.at - started >= Duration::from_secs(6),
        "{:?}",
        summary.at - started
    );

    let metrics = service.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "triage_dlq_dead_letters_total",
            &["invalid_output"]
        ),
        Some(500.0)
    );
    assert_eq!(
        metric(&metrics, "triage_dlq_alerts_sent_total", &["slack"]),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "triage_dlq_summaries_sent_total", &["slack"]),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "triage_dlq_pending_alerts", &[]),
        Some(0.0)
    );
    service.stop().await;
}

/// Slack answers 429 with `Retry-After: 2`: the next attempt waits those two seconds, no
/// sooner, and every alert still arrives.
#[tokio::test]
async fn a_429_retry_after_is_honoured_and_nothing_is_lost() {
    let context = TestContext::new("dlq-429");
    context.create_topics(1).await;
    let sink = Sink::start().await;
    sink.script(&[Reply::TooManyRequests {
        retry_after_secs: 2,
    }]);
    let now = SystemTime::now();
    let classes = [
        ErrorClass::InvalidOutput,
        ErrorClass::ContextLength,
        ErrorClass::ContentFilter,
    ];
    let records: Vec<Record> = classes
        .iter()
        .enumerate()
        .map(|(n, class)| {
            let task = task(&format!("t-429-{n}"), "acme", "hello");
            Record::dead_letter(&dead_letter_of_task(
                &context,
                &format!("dl-429-{n}"),
                *class,
                &task,
                ContentType::Json,
                now,
            ))
        })
        .collect();
    produce_all(&context.topics.dead_letters, &records).await;
    let service = Running::start(config(&context, Some(sink.url("/slack")), None));

    let group = context.group("alerter");
    wait_until("3 offsets committed", DEADLINE, || async {
        (committed_total(&group, &context.topics.dead_letters, 1) == 3).then_some(())
    })
    .await;
    let attempts = sink.attempts();
    assert_eq!(attempts[0].status, 429);
    assert_eq!(attempts[1].status, 200);
    let gap = attempts[1].at - attempts[0].at;
    // Retry-After is whole seconds; the backoff alone would have retried after ~100 ms.
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert!(gap < Duration::from_millis(3500), "retried after {gap:?}");
    eprintln!("429 Retry-After: 2 -> next attempt after {gap:?}");
    let posts = sink.posts();
    assert_eq!(posts.len(), 3);
    for n in 0..3 {
        assert!(
            posts.iter().any(|p| p.raw.contains(&format!("dl-429-{n}"))),
            "dl-429-{n} lost"
        );
    }
    let metrics = service.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "triage_dlq_delivery_failures_total",
            &["slack", "status=\"429\""]
        ),
        Some(1.0)
    );
    service.stop().await;
}

/// The webhook is down (nothing listens) while dead letters arrive: nothing is committed,
/// fetching pauses on the closed gate, and once the webhook is back every dead letter is
/// covered by a delivered alert or summary before its offset is committed.
#[tokio::test]
async fn a_webhook_down_for_a_while_loses_nothing_and_commits_nothing_early() {
    let context = TestContext::new("dlq-down");
    context.create_topics(2).await;
    let sink = Sink::start().await;
    sink.stop();
    let now = SystemTime::now();
    let classes = [
        ErrorClass::InvalidOutput,
        ErrorClass::RetriesExhausted,
        ErrorClass::Decode,
    ];
    let mut tickets = Vec::new();
    let records: Vec<Record> = (0..30)
        .map(|n| {
            let ticket = format!("t-down-{n:02}");
            tickets.push(ticket.clone());
            let task = task(&ticket, "acme", "hello");
            Record::dead_letter(&dead_letter_of_task(
                &context,
                &format!("dl-down-{n:02}"),
                classes[n % 3],
                &task,
                ContentType::Protobuf,
                now,
            ))
        })
        .collect();
    produce_all(&context.topics.dead_letters, &records).await;
    let mut config = config(&context, None, Some(sink.url("/hook")));
    config.aggregation.window = Duration::from_millis(300);
    config.aggregation.summary_ticket_ids = 50;
    let service = Running::start(config);

    let group = context.group("alerter");
    wait_until(
        "repeated connection failures and a closed gate",
        DEADLINE,
        || async {
            let metrics = service.metrics().await;
            let failures = metric(
                &metrics,
                "triage_dlq_delivery_failures_total",
                &["webhook", "connect"],
            )?;
            let gate_pauses = metric(&metrics, "triage_consumer_pauses_total", &["gate_closed"])?;
            (failures >= 5.0 && gate_pauses >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        committed_total(&group, &context.topics.dead_letters, 2),
        0,
        "committed before delivery"
    );
    assert!(sink.posts().is_empty());
    let pending = metric(&service.metrics().await, "triage_dlq_pending_alerts", &[]).unwrap();
    assert!(pending >= 1.0, "pending {pending}");

    sink.restart().await;
    wait_until("all 30 offsets committed", DEADLINE, || async {
        (committed_total(&group, &context.topics.dead_letters, 2) == 30).then_some(())
    })
    .await;
    let posts = sink.posts();
    let mut covered = 0;
    for post in &posts {
        match post.body["type"].as_str().unwrap() {
            "dead_letter" => covered += 1,
            "summary" => covered += post.body["summary"]["count"].as_u64().unwrap() as usize,
            other => panic!("unexpected post type {other}"),
        }
    }
    assert_eq!(
        covered,
        30,
        "{:#?}",
        posts.iter().map(|p| &p.raw).collect::<Vec<_>>()
    );
    for ticket in &tickets {
        assert!(
            posts.iter().any(|p| p.raw.contains(ticket.as_str())),
            "{ticket} not covered"
        );
    }
    service.stop().await;
}

/// Slack refuses the blocks with a 400: the alert is sent again as its plain-text fallback
/// instead of being retried in vain or dropped.
#[tokio::test]
async fn a_slack_400_falls_back_to_the_plain_text_message() {
    let context = TestContext::new("dlq-400");
    context.create_topics(1).await;
    let sink = Sink::start().await;
    sink.script(&[Reply::Status(400)]);
    let task = task("t-400", "acme", "hello");
    let dead_letter = dead_letter_of_task(
        &context,
        "dl-400",
        ErrorClass::ContentFilter,
        &task,
        ContentType::Json,
        SystemTime::now(),
    );
    produce_all(
        &context.topics.dead_letters,
        &[Record::dead_letter(&dead_letter)],
    )
    .await;
    let service = Running::start(config(&context, Some(sink.url("/slack")), None));
    let group = context.group("alerter");
    wait_until("the offset committed", DEADLINE, || async {
        (committed_total(&group, &context.topics.dead_letters, 1) == 1).then_some(())
    })
    .await;
    let posts = sink.posts();
    assert_eq!(posts.len(), 1);
    assert!(posts[0].body.get("blocks").is_none(), "{}", posts[0].raw);
    let text = posts[0].body["text"].as_str().unwrap();
    assert!(
        text.contains("content_filter") && text.contains("t-400") && text.contains("--id dl-400"),
        "{text}"
    );
    assert_eq!(sink.attempts()[0].status, 400);
    service.stop().await;
}

/// SIGTERM while a window is open: its summary goes out at once instead of at the window's
/// end, so the drain commits every folded dead letter and the next owner does not alert again.
#[tokio::test]
async fn shutdown_delivers_open_summaries_and_commits_them() {
    let context = TestContext::new("dlq-drain");
    context.create_topics(1).await;
    let sink = Sink::start().await;
    let now = SystemTime::now();
    let records: Vec<Record> = (0..3)
        .map(|n| {
            let task = task(&format!("t-drain-{n}"), "acme", "hello");
            Record::dead_letter(&dead_letter_of_task(
                &context,
                &format!("dl-drain-{n}"),
                ErrorClass::RetriesExhausted,
                &task,
                ContentType::Protobuf,
                now,
            ))
        })
        .collect();
    produce_all(&context.topics.dead_letters, &records).await;
    // The default five-minute window: without the drain rule the summary would come far too late.
    let service = Running::start(config(&context, None, Some(sink.url("/hook"))));
    wait_until(
        "the alert sent and two dead letters folded",
        DEADLINE,
        || async {
            let pending = metric(&service.metrics().await, "triage_dlq_pending_alerts", &[])?;
            (sink.posts().len() == 1 && pending == 2.0).then_some(())
        },
    )
    .await;
    let group = context.group("alerter");
    let stopping = Instant::now();
    service.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    let posts = sink.posts();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[1].body["type"], "summary");
    assert_eq!(posts[1].body["summary"]["count"], 2);
    assert_eq!(committed_total(&group, &context.topics.dead_letters, 1), 3);
}
