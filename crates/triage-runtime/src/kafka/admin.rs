//! Idempotent provisioning of the pipeline's topics.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};

use super::KafkaError;
use crate::config::{KafkaConfig, TopicProvisioning, TopicsConfig};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// One topic to provision.
#[derive(Clone, Debug)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub retention: Duration,
}

impl TopicSpec {
    /// The four pipeline topics with the configured partitions and retention; the dead-letter
    /// topic keeps its records longer so that people have time to replay them.
    pub fn pipeline(topics: &TopicsConfig, provisioning: &TopicProvisioning) -> Vec<TopicSpec> {
        let spec = |name: &str, retention| TopicSpec {
            name: name.to_owned(),
            partitions: provisioning.partitions,
            replication_factor: provisioning.replication_factor,
            retention,
        };
        vec![
            spec(&topics.tickets_created, provisioning.retention),
            spec(&topics.inference_tasks, provisioning.retention),
            spec(&topics.results, provisioning.retention),
            spec(&topics.dead_letters, provisioning.dead_letter_retention),
        ]
    }
}

/// What [`ensure_topics`] did to each topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    /// Existed with at least the configured partitions; left alone.
    Existing,
    /// Existed with fewer partitions and was grown. Partitions are never removed (Kafka can't).
    Grown {
        from: i32,
    },
}

/// Creates the missing topics and grows topics with fewer partitions than configured. Running it
/// again changes nothing, so every replica of every service may call it at start.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<Vec<(String, TopicOutcome)>, KafkaError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
        kafka
            .client_config("admin")
            .create()
            .map_err(|source| KafkaError::Client {
                role: "admin",
                source,
            })?,
    );
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));

    let retention_values: Vec<String> = specs
        .iter()
        .map(|s| s.retention.as_millis().to_string())
        .collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention_values)
        .map(|(spec, retention_ms)| {
            NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(spec.replication_factor),
            )
            .set("retention.ms", retention_ms)
        })
        .collect();
    let created = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(KafkaError::Admin)?;

    let mut outcomes = Vec::with_capacity(specs.len());
    let mut existing = Vec::new();
    for (spec, result) in specs.iter().zip(created) {
        match result {
            Ok(_) => outcomes.push((spec.name.clone(), TopicOutcome::Created)),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(spec),
            Err((topic, code)) => {
                return Err(KafkaError::Topic {
                    action: "create",
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    if existing.is_empty() {
        return Ok(outcomes);
    }

    let mut grow = Vec::new();
    for spec in existing {
        let current = partition_count(&admin, &spec.name).await?;
        if current < spec.partitions {
            grow.push((spec, current));
        } else {
            outcomes.push((spec.name.clone(), TopicOutcome::Existing));
        }
    }
    if !grow.is_empty() {
        let new_partitions: Vec<NewPartitions<'_>> = grow
            .iter()
            .map(|(spec, _)| NewPartitions::new(&spec.name, spec.partitions as usize))
            .collect();
        let results = admin
            .create_partitions(&new_partitions, &options)
            .await
            .map_err(KafkaError::Admin)?;
        for ((spec, from), result) in grow.into_iter().zip(results) {
            match result {
                Ok(_) => {}
                // Another replica grew it at the same moment: the topic is as configured.
                Err((_, RDKafkaErrorCode::InvalidPartitions))
                    if partition_count(&admin, &spec.name).await? >= spec.partitions =>
                {
                    outcomes.push((spec.name.clone(), TopicOutcome::Existing));
                    continue;
                }
                Err((topic, code)) => {
                    return Err(KafkaError::Topic {
                        action: "add partitions to",
                        topic,
                        reason: code.to_string(),
                    });
                }
            }
            tracing::info!(topic = %spec.name, from, to = spec.partitions, "grew topic partitions");
            outcomes.push((spec.name.clone(), TopicOutcome::Grown { from }));
        }
    }
    Ok(outcomes)
}

/// The partition count of `topic` as the cluster reports it now (0 when it does not exist).
async fn partition_count(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> Result<i32, KafkaError> {
    let metadata_admin = Arc::clone(admin);
    let topic_name = topic.to_owned();
    let metadata = tokio::task::spawn_blocking(move || {
        metadata_admin
            .inner()
            .fetch_metadata(Some(&topic_name), ADMIN_TIMEOUT)
    })
    .await
    .unwrap_or(Err(rdkafka::error::KafkaError::Canceled))
    .map_err(|source| KafkaError::Unreachable {
        timeout: ADMIN_TIMEOUT,
        source,
    })?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0))
}
