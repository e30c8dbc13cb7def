//! Idempotent provisioning of the pipeline's topics, and the one explicit way to grow one.

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
    pub min_insync_replicas: i32,
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
            min_insync_replicas: provisioning.min_insync_replicas,
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
    /// Existed with fewer partitions than configured and was left alone (a warning is logged):
    /// growing a topic remaps keys to partitions, and a ticket's records would then be read
    /// out of order. [`grow_partitions`] does it when an operator asks.
    Undersized {
        partitions: i32,
    },
}

fn admin_client(kafka: &KafkaConfig) -> Result<Arc<AdminClient<DefaultClientContext>>, KafkaError> {
    kafka
        .client_config("admin")
        .create()
        .map(Arc::new)
        .map_err(|source| KafkaError::Client {
            role: "admin",
            source,
        })
}

/// Creates the missing topics; never changes an existing one. Running it again changes nothing,
/// so every replica of every service may call it at start.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<Vec<(String, TopicOutcome)>, KafkaError> {
    let admin = admin_client(kafka)?;
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
    let min_insync_values: Vec<String> = specs
        .iter()
        .map(|s| s.min_insync_replicas.to_string())
        .collect();
    let new_topics: Vec<NewTopic<'_>> = new_topics
        .into_iter()
        .zip(&min_insync_values)
        .map(|(topic, min_insync)| topic.set("min.insync.replicas", min_insync))
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

    for spec in existing {
        let current = partition_count(&admin, &spec.name).await?;
        if current < spec.partitions {
            tracing::warn!(
                topic = %spec.name,
                partitions = current,
                configured = spec.partitions,
                "topic has fewer partitions than configured and is left as it is: growing it \
                 would reorder each ticket's records; `pipeline topics grow` does it on purpose"
            );
            outcomes.push((
                spec.name.clone(),
                TopicOutcome::Undersized {
                    partitions: current,
                },
            ));
        } else {
            outcomes.push((spec.name.clone(), TopicOutcome::Existing));
        }
    }
    Ok(outcomes)
}

/// Grows `topic` to `partitions`, on an operator's explicit word; returns the count before.
///
/// Kafka maps a key to `hash(key) % partitions`: after growing, new records of a ticket may go
/// to another partition than its earlier ones, and a consumer can handle them out of order
/// while the old partition still holds a backlog. Drain the pipeline first.
pub async fn grow_partitions(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<i32, KafkaError> {
    let admin = admin_client(kafka)?;
    let current = partition_count(&admin, topic).await?;
    if current == 0 {
        return Err(KafkaError::Topic {
            action: "grow",
            topic: topic.to_owned(),
            reason: "it does not exist".into(),
        });
    }
    if current >= partitions {
        return Err(KafkaError::Topic {
            action: "grow",
            topic: topic.to_owned(),
            reason: format!("it has {current} partitions already; Kafka cannot remove any"),
        });
    }
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_partitions(&[NewPartitions::new(topic, partitions as usize)], &options)
        .await
        .map_err(KafkaError::Admin)?;
    for result in results {
        if let Err((topic, code)) = result {
            return Err(KafkaError::Topic {
                action: "add partitions to",
                topic,
                reason: code.to_string(),
            });
        }
    }
    tracing::warn!(
        topic,
        from = current,
        to = partitions,
        "grew topic partitions: keys now map to other partitions, per-key order holds only for new records"
    );
    Ok(current)
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
