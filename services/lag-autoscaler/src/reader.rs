//! Reads what lag is made of from the brokers: partitions, watermarks, committed offsets, group
//! members and the timestamps of the oldest unconsumed records.
//!
//! Every call here blocks on librdkafka; [`OffsetReader::read`] runs on `spawn_blocking`.
//!
//! # How offsets are read
//! - Partitions come from one metadata request for all topics (a request naming a topic could
//!   create it on brokers with `auto.create.topics.enable`); a topic absent from it is missing.
//! - Watermarks come from `ListOffsets`; the clients read committed records only, so the high
//!   watermark is the last stable offset, what a `read_committed` consumer can reach.
//! - Committed offsets come from an `OffsetFetch` by a client configured with the group's id
//!   that never subscribes, never joins and never commits, so watching a group cannot trigger
//!   its rebalance.
//!
//! # How time lag is measured
//! The age of the oldest unconsumed record: one client `assign()`s each lagging partition at the
//! group's committed offset (without a group), reads the first record there and keeps its
//! timestamp; time lag is now minus that timestamp. The timestamp is the producer's create time
//! (or the broker's append time on topics with `message.timestamp.type=LogAppendTime`), so
//! clock skew between producers and this service shifts the figure by the skew. A timestamp is
//! read once per committed offset and reused while the offset does not move, so a stuck group
//! costs one record read, and its time lag grows by the wall clock between polls.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::Timestamp,
};
use triage_runtime::config::KafkaConfig;

use crate::config::{GroupTarget, LagConfig};

/// Why a whole poll failed. A failure that concerns one group is reported in its
/// [`GroupReading::error`] instead, and the other groups are read as usual.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("could not create the Kafka {role} client: {source}")]
    Client {
        role: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("the brokers did not answer a metadata request: {0}")]
    Metadata(#[source] rdkafka::error::KafkaError),
}

/// One group's offsets at one poll.
#[derive(Clone, Debug)]
pub struct GroupReading {
    pub target: GroupTarget,
    /// `None`: the topic does not exist (deleted, or not created yet).
    pub partitions: Option<Vec<PartitionReading>>,
    /// Members of the group and its state (`Stable`, `Empty`, ...), when the broker answered
    /// (`None` when describing the group failed this poll).
    pub members: Option<usize>,
    pub group_state: Option<String>,
    /// Reading the group's offsets failed; its figures are not from this poll.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionReading {
    pub partition: i32,
    /// The group's committed offset; `None` when it never committed on this partition.
    pub committed: Option<i64>,
    /// Oldest retained offset.
    pub low_watermark: i64,
    /// Next offset a `read_committed` consumer would get (the last stable offset).
    pub high_watermark: i64,
    /// Create (or append) time, in Unix milliseconds, of the first record the group has not
    /// consumed; `None` when the group is caught up or the record was not read in time.
    pub oldest_unconsumed_ms: Option<i64>,
}

impl PartitionReading {
    /// Where the group resumes: its committed offset, or the oldest retained record when it has
    /// none or retention already deleted the records at its committed offset.
    pub fn resume_offset(&self) -> i64 {
        self.committed
            .unwrap_or(self.low_watermark)
            .max(self.low_watermark)
    }

    /// Records the group has not consumed. Without commits, everything retained counts.
    pub fn lag(&self) -> i64 {
        (self.high_watermark - self.resume_offset()).max(0)
    }
}

/// The clients that read offsets, one per watched group plus one for metadata and one for
/// record timestamps.
pub struct OffsetReader {
    kafka: KafkaConfig,
    timeout: Duration,
    fetch_timeout: Duration,
    metadata: BaseConsumer,
    records: BaseConsumer,
    group_clients: HashMap<String, BaseConsumer>,
    /// (topic, partition, offset) → timestamp of the record at that offset.
    timestamps: HashMap<(String, i32, i64), i64>,
}

impl OffsetReader {
    pub fn new(kafka: &KafkaConfig, lag: &LagConfig) -> Result<Self, ReadError> {
        let metadata = read_committed(kafka.client_config("lag-autoscaler-metadata"))
            .create()
            .map_err(|source| ReadError::Client {
                role: "metadata".into(),
                source,
            })?;
        let mut records_config = read_committed(kafka.client_config("lag-autoscaler-records"));
        // A group id is required to assign partitions; this one never joins nor commits.
        records_config
            .set(
                "group.id",
                format!("{}-lag-autoscaler-records", kafka.client_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // One record per partition is needed: keep fetches small.
            .set("fetch.max.bytes", "1048576")
            .set("max.partition.fetch.bytes", "65536")
            .set("queued.max.messages.kbytes", "1024")
            .set("fetch.wait.max.ms", "100");
        let records = records_config
            .create()
            .map_err(|source| ReadError::Client {
                role: "records".into(),
                source,
            })?;
        Ok(OffsetReader {
            kafka: kafka.clone(),
            timeout: lag.request_timeout,
            fetch_timeout: lag.time_lag_fetch_timeout,
            metadata,
            records,
            group_clients: HashMap::new(),
            timestamps: HashMap::new(),
        })
    }

    /// Reads every target once; also returns when the offsets were read (before the record
    /// timestamps, which may take longer). Blocking.
    pub fn read(
        &mut self,
        targets: &[GroupTarget],
    ) -> Result<(Vec<GroupReading>, Instant), ReadError> {
        let metadata = self
            .metadata
            .fetch_metadata(None, self.timeout)
            .map_err(ReadError::Metadata)?;
        let partition_ids: HashMap<&str, Vec<i32>> = metadata
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none())
            .map(|topic| {
                let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
                ids.sort_unstable();
                (topic.name(), ids)
            })
            .collect();

        let mut watermarks: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        let mut readings = Vec::with_capacity(targets.len());
        for target in targets {
            let mut reading = GroupReading {
                target: target.clone(),
                partitions: None,
                members: None,
                group_state: None,
                error: None,
            };
            match self
                .metadata
                .fetch_group_list(Some(&target.group), self.timeout)
            {
                Ok(list) => {
                    // A group the coordinator does not know has no members.
                    let found = list.groups().iter().find(|g| g.name() == target.group);
                    reading.members = Some(found.map_or(0, |g| g.members().len()));
                    reading.group_state = found.map(|g| g.state().to_owned());
                }
                // Members are a detail: their absence must not hold back fresh offsets.
                Err(error) => {
                    tracing::debug!(group = %target.group, error = %error, "cannot describe the group")
                }
            }
            if let Some(ids) = partition_ids.get(target.topic.as_str()) {
                match self.read_partitions(target, ids, &mut watermarks) {
                    Ok(partitions) => reading.partitions = Some(partitions),
                    Err(error) => reading.error = Some(error),
                }
            }
            readings.push(reading);
        }
        let offsets_read_at = Instant::now();
        self.read_timestamps(&mut readings);
        tracing::debug!(elapsed = ?offsets_read_at.elapsed(), "record timestamps read");
        Ok((readings, offsets_read_at))
    }

    fn read_partitions(
        &mut self,
        target: &GroupTarget,
        ids: &[i32],
        watermarks: &mut HashMap<(String, i32), (i64, i64)>,
    ) -> Result<Vec<PartitionReading>, String> {
        let mut wanted = TopicPartitionList::new();
        for &partition in ids {
            wanted.add_partition(&target.topic, partition);
        }
        let timeout = self.timeout;
        let group_client = self.group_client(&target.group)?;
        let committed = group_client
            .committed_offsets(wanted, timeout)
            .map_err(|e| format!("committed offsets: {e}"))?;
        // Serve the client's queue (errors, logs); it holds no messages since it never consumes.
        let _ = group_client.poll(Duration::ZERO);
        let mut partitions = Vec::with_capacity(ids.len());
        for &partition in ids {
            let key = (target.topic.clone(), partition);
            let (low, high) = match watermarks.get(&key) {
                Some(&known) => known,
                None => {
                    let fetched = self
                        .metadata
                        .fetch_watermarks(&target.topic, partition, self.timeout)
                        .map_err(|e| format!("watermarks of partition {partition}: {e}"))?;
                    watermarks.insert(key, fetched);
                    fetched
                }
            };
            let committed_offset =
                committed
                    .find_partition(&target.topic, partition)
                    .and_then(|elem| match elem.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
            partitions.push(PartitionReading {
                partition,
                committed: committed_offset,
                low_watermark: low,
                high_watermark: high,
                oldest_unconsumed_ms: None,
            });
        }
        Ok(partitions)
    }

    fn group_client(&mut self, group: &str) -> Result<&BaseConsumer, String> {
        if !self.group_clients.contains_key(group) {
            let mut config = read_committed(self.kafka.client_config("lag-autoscaler-offsets"));
            config
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false");
            let client: BaseConsumer = config
                .create()
                .map_err(|e| format!("offsets client for group {group}: {e}"))?;
            self.group_clients.insert(group.to_owned(), client);
        }
        self.group_clients
            .get(group)
            .ok_or_else(|| format!("no offsets client for group {group}"))
    }

    /// Fills `oldest_unconsumed_ms` of every lagging partition: from the cache when the resume
    /// offset did not move, else by reading the record there.
    fn read_timestamps(&mut self, readings: &mut [GroupReading]) {
        let mut wanted: HashSet<(String, i32, i64)> = HashSet::new();
        for reading in readings.iter() {
            for partition in reading.partitions.iter().flatten() {
                if partition.lag() > 0 {
                    wanted.insert((
                        reading.target.topic.clone(),
                        partition.partition,
                        partition.resume_offset(),
                    ));
                }
            }
        }
        self.timestamps.retain(|key, _| wanted.contains(key));
        let missing: Vec<(String, i32, i64)> = wanted
            .into_iter()
            .filter(|key| !self.timestamps.contains_key(key))
            .collect();
        if !missing.is_empty() {
            self.fetch_timestamps(&missing);
        }
        for reading in readings.iter_mut() {
            let topic = reading.target.topic.clone();
            for partition in reading.partitions.iter_mut().flatten() {
                if partition.lag() > 0 {
                    let key = (
                        topic.clone(),
                        partition.partition,
                        partition.resume_offset(),
                    );
                    partition.oldest_unconsumed_ms = self.timestamps.get(&key).copied();
                }
            }
        }
    }

    fn fetch_timestamps(&mut self, missing: &[(String, i32, i64)]) {
        let mut assignment = TopicPartitionList::new();
        for (topic, partition, offset) in missing {
            if let Err(error) =
                assignment.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            {
                tracing::warn!(topic, partition, error = %error, "cannot ask for a record");
            }
        }
        if let Err(error) = self.records.assign(&assignment) {
            tracing::warn!(error = %error, "cannot assign partitions to read record timestamps");
            return;
        }
        // The first record at or after the resume offset; later ones (the fetch brings a batch)
        // are ignored. Transaction markers and aborted records are skipped by read_committed.
        let mut pending: HashMap<(String, i32), i64> = missing
            .iter()
            .map(|(topic, partition, offset)| ((topic.clone(), *partition), *offset))
            .collect();
        let deadline = Instant::now() + self.fetch_timeout;
        while !pending.is_empty() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.records.poll(remaining.min(Duration::from_millis(100))) {
                Some(Ok(message)) => {
                    let key = (message.topic().to_owned(), message.partition());
                    if let Some(offset) = pending.remove(&key) {
                        let timestamp = match message.timestamp() {
                            Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => Some(ms),
                            Timestamp::NotAvailable => None,
                        };
                        if let Some(ms) = timestamp {
                            self.timestamps.insert((key.0, key.1, offset), ms);
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(error = %error, "error while reading record timestamps");
                }
                None => {}
            }
        }
        if !pending.is_empty() {
            tracing::debug!(
                partitions = pending.len(),
                "records at committed offsets not read in time; their time lag is unknown this poll"
            );
        }
        if let Err(error) = self.records.unassign() {
            tracing::warn!(error = %error, "cannot unassign the timestamp reader");
        }
    }
}

fn read_committed(mut config: rdkafka::ClientConfig) -> rdkafka::ClientConfig {
    config.set("isolation.level", "read_committed");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(committed: Option<i64>, low: i64, high: i64) -> PartitionReading {
        PartitionReading {
            partition: 0,
            committed,
            low_watermark: low,
            high_watermark: high,
            oldest_unconsumed_ms: None,
        }
    }

    #[test]
    fn lag_is_high_watermark_minus_committed() {
        assert_eq!(reading(Some(7), 0, 10).lag(), 3);
        assert_eq!(reading(Some(10), 0, 10).lag(), 0);
    }

    #[test]
    fn without_commits_everything_retained_is_lag() {
        assert_eq!(reading(None, 4, 10).lag(), 6);
    }

    #[test]
    fn records_deleted_by_retention_are_not_lag() {
        assert_eq!(reading(Some(2), 5, 10).lag(), 5);
        assert_eq!(reading(Some(2), 5, 10).resume_offset(), 5);
    }

    #[test]
    fn a_committed_offset_beyond_the_end_is_no_lag() {
        assert_eq!(reading(Some(12), 0, 10).lag(), 0);
    }
}
