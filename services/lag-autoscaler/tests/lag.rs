//! Consumer lag against the real broker: exact offsets per partition and in total, time lag from
//! the record at the committed offset, a group that never committed, a topic deleted while
//! watched.

mod common;

use std::time::Duration;

use common::{
    config, consume_and_commit, metric, metrics_text, now_ms, produce, start, wait_for_group,
};
use lag_autoscaler::config::GroupTarget;
use rdkafka::{
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
};
use triage_test_support::{TestContext, client_config, create_topics, wait_until};

#[tokio::test]
async fn reported_lag_is_produced_minus_consumed_per_partition_and_in_total() {
    let context = TestContext::new("lag-exact");
    let topic = context.topics.inference_tasks.clone();
    let group = context.group("worker");
    create_topics(&[&topic], 3).await;
    let produced = [10, 7, 5];
    let consumed = [4, 7, 1];
    for (partition, count) in produced.iter().enumerate() {
        produce(&topic, partition as i32, *count, None).await;
    }
    consume_and_commit(
        &group,
        &topic,
        &[(0, consumed[0]), (1, consumed[1]), (2, consumed[2])],
    )
    .await;

    let running = start(config(vec![GroupTarget::new(
        &group,
        &topic,
        Some("worker"),
    )]))
    .await;
    let report = wait_for_group(&running, &group, "the group's lag", |g| {
        g["topic_exists"] == true && g["committed"] == true
    })
    .await;

    let expected: Vec<i64> = (0..3).map(|p| produced[p] as i64 - consumed[p]).collect();
    let per_partition: Vec<i64> = report["partition_lag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_i64().unwrap())
        .collect();
    assert_eq!(per_partition, expected, "{report:#}");
    assert_eq!(report["lag"], expected.iter().sum::<i64>(), "{report:#}");
    assert_eq!(report["partitions"], 3);
    assert_eq!(report["partition_lag"][0]["committed_offset"], 4);
    assert_eq!(report["partition_lag"][0]["high_watermark"], 10);

    let text = metrics_text(&running).await;
    for (partition, lag) in expected.iter().enumerate() {
        let labels = format!("group=\"{group}\",topic=\"{topic}\",partition=\"{partition}\"");
        assert_eq!(
            metric(&text, "triage_kafka_consumergroup_lag", &labels),
            Some(*lag as f64),
            "{text}"
        );
    }
    let group_topic = format!("group=\"{group}\",topic=\"{topic}\"");
    assert_eq!(
        metric(&text, "triage_kafka_consumergroup_lag_sum", &group_topic),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &text,
            "triage_kafka_topic_partitions",
            &format!("topic=\"{topic}\"")
        ),
        Some(3.0)
    );
    // Partition 1 is caught up: its time lag is zero.
    let caught_up = format!("group=\"{group}\",topic=\"{topic}\",partition=\"1\"");
    assert_eq!(
        metric(&text, "triage_kafka_consumergroup_lag_seconds", &caught_up),
        Some(0.0)
    );
    // Nobody consumes: once the window is full the group is stalled.
    wait_for_group(&running, &group, "the stalled status", |g| {
        g["status"] == "stalled"
    })
    .await;
    let text = metrics_text(&running).await;
    assert_eq!(
        metric(
            &text,
            "triage_kafka_consumergroup_status",
            &format!("group=\"{group}\",status=\"stalled\"")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "triage_kafka_consumergroup_status",
            &format!("group=\"{group}\",status=\"ok\"")
        ),
        Some(0.0)
    );
    running.stop().await;
}

#[tokio::test]
async fn time_lag_is_the_age_of_the_record_at_the_committed_offset_and_grows() {
    let context = TestContext::new("lag-time");
    let topic = context.topics.results.clone();
    let group = context.group("writer");
    create_topics(&[&topic], 1).await;
    // Two records from a minute ago (consumed), then three from 30 s ago (not consumed).
    let started_ms = now_ms();
    produce(&topic, 0, 2, Some(started_ms - 60_000)).await;
    produce(&topic, 0, 3, Some(started_ms - 30_000)).await;
    consume_and_commit(&group, &topic, &[(0, 2)]).await;

    let running = start(config(vec![GroupTarget::new(&group, &topic, None)])).await;
    let first = wait_for_group(&running, &group, "a time lag", |g| {
        g["lag_seconds"].is_number()
    })
    .await;
    let first_seconds = first["lag_seconds"].as_f64().unwrap();
    let bound = (now_ms() - (started_ms - 30_000)) as f64 / 1000.0;
    assert!(
        (30.0..=bound).contains(&first_seconds),
        "time lag {first_seconds} s, expected the age of the record at offset 2 (30 s..{bound} s)"
    );
    assert_eq!(first["lag"], 3);

    // Nothing is consumed: the same record only gets older.
    let later = wait_for_group(&running, &group, "the time lag to grow by a second", |g| {
        g["lag_seconds"].as_f64().unwrap_or(0.0) >= first_seconds + 1.0
    })
    .await;
    assert_eq!(later["lag"], 3);
    let text = metrics_text(&running).await;
    let labels = format!("group=\"{group}\",topic=\"{topic}\",partition=\"0\"");
    let exported = metric(&text, "triage_kafka_consumergroup_lag_seconds", &labels).unwrap();
    assert!(exported >= first_seconds + 1.0, "{text}");
    running.stop().await;
}

#[tokio::test]
async fn a_group_without_commits_counts_every_retained_record() {
    let context = TestContext::new("lag-nocommit");
    let topic = context.topics.dead_letters.clone();
    let group = context.group("alerter");
    create_topics(&[&topic], 2).await;
    produce(&topic, 0, 5, None).await;
    produce(&topic, 1, 3, None).await;

    let running = start(config(vec![GroupTarget::new(&group, &topic, None)])).await;
    let report = wait_for_group(&running, &group, "the group's lag", |g| g["lag"] == 8).await;
    assert_eq!(report["committed"], false, "{report:#}");
    assert_eq!(
        report["partition_lag"][0]["committed_offset"],
        serde_json::Value::Null
    );
    assert_eq!(report["status"], "unknown");
    assert_eq!(report["error"], serde_json::Value::Null);
    assert_eq!(report["members"], 0);
    let text = metrics_text(&running).await;
    assert_eq!(
        metric(
            &text,
            "triage_kafka_consumergroup_status",
            &format!("group=\"{group}\",status=\"unknown\"")
        ),
        Some(1.0),
        "{text}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_deleted_topic_loses_its_series_and_the_other_groups_go_on() {
    let context = TestContext::new("lag-deleted");
    let doomed = context.topics.tickets_created.clone();
    let kept = context.topics.inference_tasks.clone();
    let doomed_group = context.group("dispatcher");
    let kept_group = context.group("worker");
    create_topics(&[&doomed, &kept], 2).await;
    produce(&doomed, 0, 4, None).await;
    produce(&kept, 0, 2, None).await;

    let running = start(config(vec![
        GroupTarget::new(&doomed_group, &doomed, None),
        GroupTarget::new(&kept_group, &kept, None),
    ]))
    .await;
    wait_for_group(&running, &doomed_group, "the doomed topic's lag", |g| {
        g["lag"] == 4
    })
    .await;
    let series = format!("topic=\"{doomed}\"");
    assert!(metrics_text(&running).await.contains(&series));

    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    admin
        .delete_topics(
            &[&doomed],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("delete topics")
        .into_iter()
        .for_each(|result| {
            result.expect("topic deleted");
        });

    let report = wait_for_group(
        &running,
        &doomed_group,
        "the topic to be reported missing",
        |g| g["topic_exists"] == false,
    )
    .await;
    assert_eq!(report["lag"], 0);
    assert_eq!(report["status"], "unknown");
    wait_until(
        "the deleted topic's series to go",
        Duration::from_secs(10),
        || async {
            let text = metrics_text(&running).await;
            (!text.contains(&series)).then_some(())
        },
    )
    .await;

    // The loop goes on for the other group.
    produce(&kept, 1, 5, None).await;
    wait_for_group(&running, &kept_group, "the other group's new lag", |g| {
        g["lag"] == 7
    })
    .await;
    running.stop().await;
}
