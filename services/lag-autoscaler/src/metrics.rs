//! The service's Prometheus metrics, named after kafka-exporter's and Burrow's so that existing
//! dashboards and alerts carry over (with the pipeline's `triage_` prefix).

use std::{collections::HashMap, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{snapshot::GroupLag, status::GroupStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    group: String,
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupTopicLabels {
    group: String,
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    group: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    deployment: String,
    direction: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the service exports; cheap to clone (families are shared handles).
#[derive(Clone)]
pub struct Metrics {
    lag: Family<PartitionLabels, Gauge>,
    lag_sum: Family<GroupTopicLabels, Gauge>,
    lag_seconds: Family<PartitionLabels, FloatGauge>,
    current_offset: Family<PartitionLabels, Gauge>,
    partition_high_watermark: Family<PartitionLabels, Gauge>,
    topic_partitions: Family<TopicLabels, Gauge>,
    members: Family<GroupLabels, Gauge>,
    status: Family<StatusLabels, Gauge>,
    poll_errors: Counter,
    decisions: Family<DecisionLabels, Counter>,
    desired_replicas: Family<DeploymentLabels, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            lag: Family::default(),
            lag_sum: Family::default(),
            lag_seconds: Family::default(),
            current_offset: Family::default(),
            partition_high_watermark: Family::default(),
            topic_partitions: Family::default(),
            members: Family::default(),
            status: Family::default(),
            poll_errors: Counter::default(),
            decisions: Family::default(),
            desired_replicas: Family::default(),
        };
        registry.register(
            "kafka_consumergroup_lag",
            "Records of the partition the group has not consumed (high watermark minus committed offset)",
            metrics.lag.clone(),
        );
        registry.register(
            "kafka_consumergroup_lag_sum",
            "Records of the topic the group has not consumed, over all partitions",
            metrics.lag_sum.clone(),
        );
        registry.register(
            "kafka_consumergroup_lag_seconds",
            "Age of the oldest record of the partition the group has not consumed; 0 when caught up",
            metrics.lag_seconds.clone(),
        );
        registry.register(
            "kafka_consumergroup_current_offset",
            "The group's committed offset of the partition",
            metrics.current_offset.clone(),
        );
        registry.register(
            "kafka_topic_partition_current_offset",
            "High watermark (last stable offset) of the partition the group reads",
            metrics.partition_high_watermark.clone(),
        );
        registry.register(
            "kafka_topic_partitions",
            "Partitions of the topic",
            metrics.topic_partitions.clone(),
        );
        registry.register(
            "kafka_consumergroup_members",
            "Members of the consumer group",
            metrics.members.clone(),
        );
        registry.register(
            "kafka_consumergroup_status",
            "1 for the group's current status (ok, lagging, stalled, unknown), 0 for the others",
            metrics.status.clone(),
        );
        registry.register(
            "lag_autoscaler_poll_errors",
            "Polls that could not read offsets from the brokers",
            metrics.poll_errors.clone(),
        );
        registry.register(
            "autoscaler_decisions",
            "Scaling decisions of direct mode by direction (up, down, hold)",
            metrics.decisions.clone(),
        );
        registry.register(
            "autoscaler_desired_replicas",
            "Replicas direct mode wants for the Deployment",
            metrics.desired_replicas.clone(),
        );
        metrics
    }

    /// Sets a group's series from one poll. `reported` holds the partitions last reported per
    /// group, so series of vanished partitions (or a deleted topic) are removed rather than
    /// left frozen at their last value.
    pub fn record_group(&self, group: &GroupLag, reported: &mut HashMap<String, Vec<i32>>) {
        let partitions_now: Vec<i32> = group.partition_lag.iter().map(|p| p.partition).collect();
        let previous = reported
            .insert(group.group.clone(), partitions_now.clone())
            .unwrap_or_default();
        let labels = |partition: i32| PartitionLabels {
            group: group.group.clone(),
            topic: group.topic.clone(),
            partition,
        };
        for partition in previous.iter().filter(|p| !partitions_now.contains(p)) {
            let gone = labels(*partition);
            self.lag.remove(&gone);
            self.lag_seconds.remove(&gone);
            self.current_offset.remove(&gone);
            self.partition_high_watermark.remove(&gone);
        }
        let group_topic = GroupTopicLabels {
            group: group.group.clone(),
            topic: group.topic.clone(),
        };
        let topic = TopicLabels {
            topic: group.topic.clone(),
        };
        if group.topic_exists {
            for partition in &group.partition_lag {
                let series = labels(partition.partition);
                self.lag.get_or_create(&series).set(partition.lag);
                match partition.lag_seconds {
                    Some(seconds) => {
                        self.lag_seconds.get_or_create(&series).set(seconds);
                    }
                    None => {
                        self.lag_seconds.remove(&series);
                    }
                }
                match partition.committed_offset {
                    Some(offset) => {
                        self.current_offset.get_or_create(&series).set(offset);
                    }
                    None => {
                        self.current_offset.remove(&series);
                    }
                }
                self.partition_high_watermark
                    .get_or_create(&series)
                    .set(partition.high_watermark);
            }
            self.lag_sum.get_or_create(&group_topic).set(group.lag);
            self.topic_partitions
                .get_or_create(&topic)
                .set(group.partitions as i64);
        } else {
            self.lag_sum.remove(&group_topic);
            self.topic_partitions.remove(&topic);
        }
        if let Some(members) = group.members {
            self.members
                .get_or_create(&GroupLabels {
                    group: group.group.clone(),
                })
                .set(members as i64);
        }
        for status in GroupStatus::ALL {
            self.status
                .get_or_create(&StatusLabels {
                    group: group.group.clone(),
                    status: status.as_str(),
                })
                .set(i64::from(status == group.status));
        }
    }

    pub fn poll_failed(&self) {
        self.poll_errors.inc();
    }

    pub fn decision(&self, deployment: &str, direction: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                deployment: deployment.to_owned(),
                direction,
            })
            .inc();
    }

    pub fn desired_replicas(&self, deployment: &str, replicas: u32) {
        self.desired_replicas
            .get_or_create(&DeploymentLabels {
                deployment: deployment.to_owned(),
            })
            .set(i64::from(replicas));
    }
}
