//! Kafka clients built from [`KafkaConfig`](crate::config::KafkaConfig): topic provisioning
//! ([`admin`]), record headers and trace context ([`headers`]), the contract producer
//! ([`producer`]), the at-least-once consumer runtime ([`consumer`]) with its per-partition flow
//! control ([`flow`]), the one place that decides which offset may be committed ([`offsets`]),
//! and the start-up check that stops a service whose TLS or SASL settings the brokers refuse
//! ([`credentials`]).

pub mod admin;
pub mod consumer;
pub mod credentials;
pub mod dead_letter;
mod flow;
pub mod headers;
pub mod offsets;
pub mod producer;

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
};

use crate::config::KafkaConfig;

/// Why talking to Kafka failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("could not create the Kafka {role} client: {source}")]
    Client {
        role: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("the broker did not answer a metadata request within {timeout:?}: {source}")]
    Unreachable {
        timeout: Duration,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("could not {action} topic {topic}: {reason}")]
    Topic {
        action: &'static str,
        topic: String,
        reason: String,
    },
    #[error("Kafka admin request failed: {0}")]
    Admin(#[source] rdkafka::error::KafkaError),
    /// The brokers refused this client's certificate, CA or SASL credentials. librdkafka only
    /// says so in its error callback; `reason` is its text (it names no secret).
    #[error("the Kafka brokers refused this client's security settings: {reason}")]
    Refused { reason: String },
}

impl KafkaConfig {
    /// The settings every client shares: brokers, client id, security. `role` ends the client
    /// id, so broker logs and quotas tell the clients of one service apart.
    pub fn client_config(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", format!("{}-{role}", self.client_id))
            .set("security.protocol", &self.security_protocol)
            // librdkafka leaves Nagle's algorithm on. Every client here sends small requests,
            // several at once on its one connection per broker (a transaction's AddOffsetsToTxn,
            // AddPartitionsToTxn and Produce; a consumer's Fetch and commits), and Nagle holds
            // each behind the previous one's acknowledgement: pipeline bench p50 0.3-0.4 ms
            // better without it.
            .set("socket.nagle.disable", "true");
        if let Some(mechanism) = &self.sasl_mechanism {
            config.set("sasl.mechanism", mechanism);
        }
        if let Some(username) = &self.sasl_username {
            config.set("sasl.username", username);
        }
        if let Some(password) = self.sasl_password() {
            config.set("sasl.password", password.expose());
        }
        if let Some(ca) = &self.ssl_ca_location {
            config.set("ssl.ca.location", ca.display().to_string());
        }
        if let Some(certificate) = &self.ssl_certificate_location {
            config.set(
                "ssl.certificate.location",
                certificate.display().to_string(),
            );
        }
        if let Some(key) = &self.ssl_key_location {
            config.set("ssl.key.location", key.display().to_string());
        }
        self.apply_extra(&mut config);
        config
    }

    /// The SASL password: the file's content when `sasl_password_file` is set (read at each
    /// client's creation, so a rotated Secret reaches the next client), else `sasl_password`.
    /// An unreadable file was reported by `validate`; should it vanish later, no password is
    /// set and the broker's refusal says so.
    fn sasl_password(&self) -> Option<crate::config::Secret> {
        match &self.sasl_password_file {
            Some(path) => match crate::tls::read_secret_file("kafka.sasl_password_file", path) {
                Ok(password) => Some(password),
                Err(error) => {
                    tracing::error!(error = %error, "cannot read the Kafka SASL password");
                    None
                }
            },
            None => self.sasl_password.clone(),
        }
    }

    /// Applied after our defaults, so an operator's librdkafka setting wins over them.
    fn apply_extra(&self, config: &mut ClientConfig) {
        for (key, value) in &self.extra {
            config.set(key, value);
        }
    }

    /// An idempotent producer that waits for every in-sync replica: a send that succeeds is
    /// durable and never duplicated by the client's own retries. `kafka.extra` may change the
    /// batching defaults, not those two guarantees.
    pub fn producer_config(&self, role: &str) -> ClientConfig {
        let mut config = self.client_config(role);
        config.set("linger.ms", "1").set("compression.type", "lz4");
        self.apply_extra(&mut config);
        config.set("enable.idempotence", "true").set("acks", "all");
        config
    }

    /// A consumer in `group_id` that commits nothing on its own: the offset tracker stores the
    /// lowest unfinished offset and the runtime commits it. Only committed transactions are read.
    /// `kafka.extra` may change the reset policy and the assignor, not the commit discipline.
    pub fn consumer_config(&self, role: &str, group_id: &str) -> ClientConfig {
        let mut config = self.client_config(role);
        config
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky");
        self.apply_extra(&mut config);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed");
        config
    }
}

/// The topic [`probe_brokers`] asks about. One small topic, not the whole cluster's metadata: on
/// a cluster with thousands of partitions that request is heavy, and every replica of every
/// service sends it (on each health check, and once at start). `__consumer_offsets` exists on
/// every cluster that has seen a consumer group; an unknown topic still returns the brokers.
pub const PROBE_TOPIC: &str = "__consumer_offsets";

/// Asks the cluster for the metadata of [`PROBE_TOPIC`]: proof that the brokers answer, and
/// that they accept this client's TLS and SASL settings. Blocking; call it from
/// `spawn_blocking`.
pub fn probe_brokers<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    timeout: Duration,
) -> Result<usize, KafkaError> {
    client
        .fetch_metadata(Some(PROBE_TOPIC), timeout)
        .map(|metadata| metadata.brokers().len())
        .map_err(|source| KafkaError::Unreachable { timeout, source })
}

/// A client kept only to probe broker reachability for the dependency health checks.
pub fn probe_client(config: &KafkaConfig, service: &str) -> Result<BaseConsumer, KafkaError> {
    config
        .client_config(&format!("{service}-probe"))
        .create()
        .map_err(|source| KafkaError::Client {
            role: "probe",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_settings_override_defaults_but_not_guarantees() {
        let mut kafka = KafkaConfig::default();
        kafka.extra.insert("linger.ms".into(), "0".into());
        kafka.extra.insert("acks".into(), "1".into());
        kafka
            .extra
            .insert("isolation.level".into(), "read_uncommitted".into());
        kafka
            .extra
            .insert("auto.offset.reset".into(), "latest".into());

        let producer = kafka.producer_config("p");
        assert_eq!(producer.get("linger.ms"), Some("0"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));

        let consumer = kafka.consumer_config("c", "group");
        assert_eq!(consumer.get("auto.offset.reset"), Some("latest"));
        assert_eq!(consumer.get("isolation.level"), Some("read_committed"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
    }
}
