//! What the lag-autoscaler integration tests share: the service run in-process against the
//! real broker, records produced and consumed with rdkafka, and the service's answers.

#![allow(dead_code)]

use std::time::Duration;

use lag_autoscaler::{
    Config,
    config::{AuthMode, GroupTarget, LagConfig},
};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;
use tokio::task::JoinHandle;
use triage_runtime::shutdown::{self, Trigger};
use triage_test_support::{Stack, client_config, free_port, wait_until};

/// The service running in this process, stopped when dropped.
pub struct Running {
    pub admin_port: u16,
    pub tls_port: u16,
    trigger: Trigger,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Fires shutdown and expects `run` to return `Ok` within five seconds.
    pub async fn stop(mut self) {
        self.trigger.fire();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run returns within 5 s of shutdown")
            .expect("run does not panic")
            .expect("run returns Ok");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.trigger.fire();
    }
}

/// A configuration watching `groups` on the stack's broker, polling every 200 ms, with its
/// own admin and External Metrics ports.
pub fn config(groups: Vec<GroupTarget>) -> Config {
    let mut config = Config::default();
    config.kafka.bootstrap_servers = Stack::get().kafka_bootstrap.clone();
    config.admin.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.external_metrics.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // No API server here: tests/k8s.rs covers the aggregator's authentication.
    config.external_metrics.authentication.mode = AuthMode::None;
    config.lag = LagConfig {
        interval: Duration::from_millis(200),
        groups: Some(groups),
        status_window: 3,
        ..LagConfig::default()
    };
    config
}

pub async fn start(config: Config) -> Running {
    let (trigger, shutdown) = shutdown::channel();
    let admin_port = config.admin.listen.port();
    let tls_port = config.external_metrics.listen.port();
    let task = tokio::spawn(lag_autoscaler::run(config, shutdown));
    let running = Running {
        admin_port,
        tls_port,
        trigger,
        task: Some(task),
    };
    let url = running.admin_url("/healthz");
    wait_until(
        "the admin server to answer",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        },
    )
    .await;
    running
}

/// Produces `count` records to `partition`, each stamped `timestamp_ms` when given.
pub async fn produce(topic: &str, partition: i32, count: usize, timestamp_ms: Option<i64>) {
    let producer: FutureProducer = client_config().create().expect("producer");
    for index in 0..count {
        let payload = format!("record-{index}");
        let mut record = FutureRecord::<(), _>::to(topic)
            .partition(partition)
            .payload(&payload);
        if let Some(ms) = timestamp_ms {
            record = record.timestamp(ms);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("record delivered");
    }
}

/// Consumes the first `consumed` records of each `(partition, consumed)` in `group` and commits
/// the offset after them, as a consumer of that group would.
pub async fn consume_and_commit(group: &str, topic: &str, counts: &[(i32, i64)]) {
    let group = group.to_owned();
    let topic = topic.to_owned();
    let counts = counts.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for &(partition, _) in &counts {
            assignment
                .add_partition_offset(&topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        let mut read: std::collections::HashMap<i32, i64> = Default::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while counts
            .iter()
            .any(|&(p, wanted)| read.get(&p).copied().unwrap_or(0) < wanted)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "could not read the records to consume: {read:?}"
            );
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                use rdkafka::Message;
                let message = message.expect("consume");
                let next = message.offset() + 1;
                let entry = read.entry(message.partition()).or_default();
                *entry = (*entry).max(next);
            }
        }
        let mut offsets = TopicPartitionList::new();
        for &(partition, consumed) in &counts {
            offsets
                .add_partition_offset(&topic, partition, Offset::Offset(consumed))
                .unwrap();
        }
        consumer.commit(&offsets, CommitMode::Sync).expect("commit");
    })
    .await
    .unwrap();
}

/// `GET /api/v1/lag` as JSON.
pub async fn lag_report(running: &Running) -> Value {
    reqwest::get(running.admin_url("/api/v1/lag"))
        .await
        .expect("lag api answers")
        .json()
        .await
        .expect("lag api answers json")
}

/// Waits until the report on `group` satisfies `condition`, and returns it.
pub async fn wait_for_group(
    running: &Running,
    group: &str,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, Duration::from_secs(20), || async {
        let report = lag_report(running).await;
        let found = report["groups"][group].clone();
        condition(&found).then_some(found)
    })
    .await
}

pub async fn metrics_text(running: &Running) -> String {
    reqwest::get(running.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the series named `name` whose labels are exactly `labels` (in export order).
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().parse().expect("a number"))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
