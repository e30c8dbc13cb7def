//! One poll: read offsets off the runtime, judge each group's status, update the metrics and
//! build the snapshot everything else serves.

use std::{
    collections::{HashMap, HashSet},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    config::{GroupTarget, LagConfig},
    metrics::Metrics,
    reader::{GroupReading, OffsetReader, ReadError},
    snapshot::{GroupLag, LagSnapshot},
    status::{GroupStatus, PartitionSample, StatusWindow},
};

pub struct Monitor {
    /// `None` only while a poll has it on a blocking thread.
    reader: Option<OffsetReader>,
    targets: Vec<GroupTarget>,
    judge: Judge,
}

/// Turns readings into figures: status windows, metrics, and what to log once.
pub struct Judge {
    metrics: Metrics,
    windows: HashMap<String, StatusWindow>,
    /// The last figures of each group, served again (marked with the error) when a poll
    /// could not read the group.
    last: HashMap<String, GroupLag>,
    reported_partitions: HashMap<String, Vec<i32>>,
    /// Groups whose topic was missing, had no commits, or failed, at the previous poll: each
    /// such condition is logged when it starts, not at every poll.
    missing_topic: HashSet<String>,
    without_commits: HashSet<String>,
    failing: HashSet<String>,
}

impl Monitor {
    pub fn new(
        reader: OffsetReader,
        targets: Vec<GroupTarget>,
        lag: &LagConfig,
        metrics: Metrics,
    ) -> Self {
        Monitor {
            reader: Some(reader),
            judge: Judge::new(&targets, lag, metrics),
            targets,
        }
    }

    /// Reads every group once. `None` when the brokers could not be asked at all (logged and
    /// counted); the previous snapshot then stays.
    pub async fn poll(&mut self) -> Option<LagSnapshot> {
        let mut reader = self.reader.take()?;
        let targets = self.targets.clone();
        let started = std::time::Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let result = reader.read(&targets);
            (reader, result)
        })
        .await;
        tracing::debug!(elapsed = ?started.elapsed(), "offsets read");
        let (reader, result) = match joined {
            Ok(done) => done,
            Err(error) => {
                // The reader panicked; it is lost with its thread. Nothing can be read again.
                tracing::error!(error = %error, "the offset reader panicked");
                return None;
            }
        };
        self.reader = Some(reader);
        match result {
            Ok((readings, offsets_read_at)) => {
                let mut snapshot = self.judge.apply(&readings, now_ms());
                snapshot.offsets_read_at = Some(offsets_read_at);
                Some(snapshot)
            }
            Err(error) => {
                self.judge.poll_failed(&error);
                None
            }
        }
    }
}

impl Judge {
    pub fn new(targets: &[GroupTarget], lag: &LagConfig, metrics: Metrics) -> Self {
        let windows = targets
            .iter()
            .map(|t| (t.group.clone(), StatusWindow::new(lag.status_window)))
            .collect();
        Judge {
            metrics,
            windows,
            last: HashMap::new(),
            reported_partitions: HashMap::new(),
            missing_topic: HashSet::new(),
            without_commits: HashSet::new(),
            failing: HashSet::new(),
        }
    }

    fn poll_failed(&self, error: &ReadError) {
        tracing::warn!(error = %error, "cannot read consumer lag; serving the previous figures");
        self.metrics.poll_failed();
    }

    /// Turns one poll's readings into the snapshot, the status windows and the metrics.
    pub fn apply(&mut self, readings: &[GroupReading], now_ms: i64) -> LagSnapshot {
        let mut groups = Vec::with_capacity(readings.len());
        for reading in readings {
            let name = &reading.target.group;
            let group = if let Some(error) = &reading.error {
                if self.failing.insert(name.clone()) {
                    tracing::warn!(group = %name, error = %error, "cannot read the group's offsets; serving its previous figures");
                }
                let mut stale = self
                    .last
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| GroupLag::pending(&reading.target));
                stale.error = Some(error.clone());
                stale
            } else {
                if self.failing.remove(name) {
                    tracing::info!(group = %name, "the group's offsets are readable again");
                }
                self.judge(reading, now_ms)
            };
            self.metrics
                .record_group(&group, &mut self.reported_partitions);
            self.last.insert(name.clone(), group.clone());
            groups.push(group);
        }
        LagSnapshot {
            taken_at_ms: now_ms,
            offsets_read_at: None,
            groups,
        }
    }

    fn judge(&mut self, reading: &GroupReading, now_ms: i64) -> GroupLag {
        let name = &reading.target.group;
        let window = self
            .windows
            .entry(name.clone())
            .or_insert_with(|| StatusWindow::new(2));
        let Some(partitions) = &reading.partitions else {
            if self.missing_topic.insert(name.clone()) {
                tracing::warn!(group = %name, topic = %reading.target.topic, "the group's topic does not exist; its lag series are removed");
            }
            window.clear();
            return GroupLag::new(reading, GroupStatus::Unknown, now_ms);
        };
        if self.missing_topic.remove(name) {
            tracing::info!(group = %name, topic = %reading.target.topic, "the group's topic exists");
        }
        let samples: Vec<PartitionSample> = partitions
            .iter()
            .map(|p| PartitionSample {
                partition: p.partition,
                committed: p.committed,
                lag: p.lag(),
            })
            .collect();
        let status = window.observe(&samples);
        let group = GroupLag::new(reading, status, now_ms);
        if !group.committed && group.lag > 0 {
            if self.without_commits.insert(name.clone()) {
                tracing::info!(group = %name, topic = %group.topic, lag = group.lag, "the group has no committed offsets; every retained record counts as lag");
            }
        } else {
            self.without_commits.remove(name);
        }
        group
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::reader::PartitionReading;

    fn reading(partitions: Option<Vec<(i64, i64)>>, error: Option<&str>) -> GroupReading {
        GroupReading {
            target: GroupTarget::new("g", "t", None),
            partitions: partitions.map(|list| {
                list.into_iter()
                    .enumerate()
                    .map(|(index, (committed, high))| PartitionReading {
                        partition: index as i32,
                        committed: Some(committed),
                        low_watermark: 0,
                        high_watermark: high,
                        oldest_unconsumed_ms: None,
                    })
                    .collect()
            }),
            members: Some(1),
            group_state: None,
            error: error.map(str::to_owned),
        }
    }

    fn judge() -> (Judge, Registry) {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let judge = Judge::new(
            &[GroupTarget::new("g", "t", None)],
            &LagConfig::default(),
            metrics,
        );
        (judge, registry)
    }

    fn text(registry: &Registry) -> String {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn a_failed_read_serves_the_previous_figures_marked_with_the_error() {
        let (mut judge, _registry) = judge();
        judge.apply(&[reading(Some(vec![(2, 10), (5, 5)]), None)], 1_000);
        let snapshot = judge.apply(&[reading(None, Some("coordinator not available"))], 2_000);
        let group = &snapshot.groups[0];
        assert_eq!(group.lag, 8);
        assert!(group.topic_exists);
        assert_eq!(group.error.as_deref(), Some("coordinator not available"));
    }

    #[test]
    fn a_vanished_topic_or_partition_loses_its_series() {
        let (mut judge, registry) = judge();
        judge.apply(&[reading(Some(vec![(2, 10), (5, 5)]), None)], 1_000);
        let before = text(&registry);
        assert!(
            before.contains("kafka_consumergroup_lag{group=\"g\",topic=\"t\",partition=\"1\"} 0"),
            "{before}"
        );
        judge.apply(&[reading(Some(vec![(2, 10)]), None)], 2_000);
        let shrunk = text(&registry);
        assert!(!shrunk.contains("partition=\"1\""), "{shrunk}");
        let snapshot = judge.apply(&[reading(None, None)], 3_000);
        assert!(!snapshot.groups[0].topic_exists);
        assert_eq!(snapshot.groups[0].status, GroupStatus::Unknown);
        let gone = text(&registry);
        assert!(!gone.contains("topic=\"t\""), "{gone}");
        assert!(
            gone.contains("kafka_consumergroup_status{group=\"g\",status=\"unknown\"} 1"),
            "{gone}"
        );
    }
}
