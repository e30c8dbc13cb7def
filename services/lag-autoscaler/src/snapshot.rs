//! The lag of every watched group at one poll: what `/metrics`, `/api/v1/lag`, the External
//! Metrics API and direct mode all read.

use std::{collections::HashMap, time::Instant};

use serde::Serialize;

use crate::{
    config::GroupTarget,
    reader::{GroupReading, PartitionReading},
    status::GroupStatus,
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct LagSnapshot {
    /// When the offsets were read, Unix milliseconds; 0 before the first poll.
    pub taken_at_ms: i64,
    /// When the offsets were read, for decisions that compare polls in time.
    #[serde(skip)]
    pub offsets_read_at: Option<Instant>,
    pub groups: Vec<GroupLag>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupLag {
    pub group: String,
    pub topic: String,
    pub deployment: Option<String>,
    /// False when the topic does not exist (deleted or not created yet).
    pub topic_exists: bool,
    /// False until the group commits an offset on some partition; until then every retained
    /// record counts as lag.
    pub committed: bool,
    /// Records not consumed yet, summed over partitions.
    pub lag: i64,
    /// Age in seconds of the oldest unconsumed record over all partitions; 0 when caught up,
    /// absent when no lagging partition's record could be read.
    pub lag_seconds: Option<f64>,
    pub partitions: usize,
    /// Members of the group, when the broker answered.
    pub members: Option<usize>,
    /// The broker's group state (`Stable`, `Empty`, `PreparingRebalance`, `Dead`, ...).
    pub group_state: Option<String>,
    pub status: GroupStatus,
    /// Why this poll's figures are missing or stale.
    pub error: Option<String>,
    pub partition_lag: Vec<PartitionLag>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PartitionLag {
    pub partition: i32,
    pub committed_offset: Option<i64>,
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub lag: i64,
    pub lag_seconds: Option<f64>,
}

impl PartitionLag {
    fn new(reading: &PartitionReading, now_ms: i64) -> Self {
        let lag = reading.lag();
        let lag_seconds = if lag == 0 {
            Some(0.0)
        } else {
            // A record stamped in the future (clock skew) is not negative lag.
            reading
                .oldest_unconsumed_ms
                .map(|ms| (now_ms - ms).max(0) as f64 / 1000.0)
        };
        PartitionLag {
            partition: reading.partition,
            committed_offset: reading.committed,
            low_watermark: reading.low_watermark,
            high_watermark: reading.high_watermark,
            lag,
            lag_seconds,
        }
    }
}

impl GroupLag {
    /// The figures of `reading` at `now_ms`, with the status the window gave it.
    pub fn new(reading: &GroupReading, status: GroupStatus, now_ms: i64) -> Self {
        let partition_lag: Vec<PartitionLag> = reading
            .partitions
            .iter()
            .flatten()
            .map(|p| PartitionLag::new(p, now_ms))
            .collect();
        let lag_seconds = partition_lag
            .iter()
            .filter_map(|p| p.lag_seconds)
            .reduce(f64::max);
        GroupLag {
            group: reading.target.group.clone(),
            topic: reading.target.topic.clone(),
            deployment: reading.target.deployment.clone(),
            topic_exists: reading.partitions.is_some(),
            committed: partition_lag.iter().any(|p| p.committed_offset.is_some()),
            lag: partition_lag.iter().map(|p| p.lag).sum(),
            lag_seconds,
            partitions: partition_lag.len(),
            members: reading.members,
            group_state: reading.group_state.clone(),
            status,
            error: reading.error.clone(),
            partition_lag,
        }
    }

    /// The labels this group's External Metrics carry and selectors match on.
    pub fn labels(&self) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            ("group".to_owned(), self.group.clone()),
            ("topic".to_owned(), self.topic.clone()),
        ]);
        if let Some(deployment) = &self.deployment {
            labels.insert("deployment".to_owned(), deployment.clone());
        }
        labels
    }

    /// A group whose offsets could not be read yet.
    pub fn pending(target: &GroupTarget) -> Self {
        GroupLag {
            group: target.group.clone(),
            topic: target.topic.clone(),
            deployment: target.deployment.clone(),
            topic_exists: false,
            committed: false,
            lag: 0,
            lag_seconds: None,
            partitions: 0,
            members: None,
            group_state: None,
            status: GroupStatus::Unknown,
            error: Some("not read yet".into()),
            partition_lag: Vec::new(),
        }
    }
}

impl LagSnapshot {
    pub fn group(&self, group: &str) -> Option<&GroupLag> {
        self.groups.iter().find(|g| g.group == group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_lag_is_the_oldest_lagging_partition_and_zero_when_caught_up() {
        let partition = |partition, committed, high, oldest| PartitionReading {
            partition,
            committed: Some(committed),
            low_watermark: 0,
            high_watermark: high,
            oldest_unconsumed_ms: oldest,
        };
        let reading = GroupReading {
            target: GroupTarget::new("g", "t", None),
            partitions: Some(vec![
                partition(0, 5, 5, None),
                partition(1, 2, 9, Some(10_000)),
                partition(2, 1, 4, Some(12_500)),
            ]),
            members: Some(2),
            group_state: Some("Stable".into()),
            error: None,
        };
        let group = GroupLag::new(&reading, GroupStatus::Ok, 14_000);
        assert_eq!(group.lag, 10);
        assert_eq!(group.lag_seconds, Some(4.0));
        assert_eq!(group.partition_lag[0].lag_seconds, Some(0.0));
        assert_eq!(group.partition_lag[2].lag_seconds, Some(1.5));
        assert!(group.committed && group.topic_exists);
    }
}
