//! Configuration of dlq-alerter; see `triage_runtime::config` for how it is loaded.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use triage_runtime::{
    auth::AuthConfig,
    config::{
        AdminConfig, KafkaConfig, Secret, TelemetryConfig, TopicProvisioning, TopicsConfig,
        Validate,
    },
    kafka::consumer::ConsumerConfig,
    service::ServiceConfig,
};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Brokers and security.
    pub kafka: KafkaConfig,
    /// The pipeline's topic names: `dead_letters` is consumed, `inference_tasks` is where
    /// `replay` re-publishes.
    pub topics: TopicsConfig,
    /// Whether the dead-letter topic is created at start when missing.
    pub topic_provisioning: TopicProvisioning,
    /// The consumer group and its in-flight window.
    pub consumer: ConsumerConfig,
    /// The Slack incoming webhook.
    pub slack: SlackConfig,
    /// The generic JSON webhook, for chat or paging tools other than Slack.
    pub webhook: WebhookConfig,
    /// How alerts of one error class are folded together.
    pub aggregation: AggregationConfig,
    /// What an alert shows.
    pub alerts: AlertsConfig,
    /// How a refused or failed post is retried.
    pub delivery: DeliveryConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// `/healthz`, `/readyz`, `/metrics` and the drain deadline.
    pub admin: AdminConfig,
    /// The dead-letter API (recent dead letters, replay), which the triage console calls.
    pub api: DeadLetterApiConfig,
    /// API keys and the tenants they belong to, as the read API has them; replay needs a key
    /// with the `admin` role.
    pub auth: AuthConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterApiConfig {
    /// Address of `GET /v1/dead-letters` and `POST /v1/dead-letters/{id}/replay`; off when unset.
    pub listen: Option<SocketAddr>,
    /// How many records at the end of each partition of the dead-letter topic a listing reads:
    /// "recent" dead letters, at a bounded cost per request whatever the topic's retention.
    pub recent_per_partition: i64,
    /// Most dead letters one listing returns (newest first).
    pub max_items: usize,
}

impl Default for DeadLetterApiConfig {
    fn default() -> Self {
        DeadLetterApiConfig {
            listen: None,
            recent_per_partition: 500,
            max_items: 100,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kafka: KafkaConfig::default(),
            topics: TopicsConfig::default(),
            topic_provisioning: TopicProvisioning::default(),
            consumer: ConsumerConfig {
                // Every dead letter of a window waits, uncommitted, until its summary is
                // delivered: the window must hold a whole incident, or fetching pauses until
                // the window ends. A waiting dead letter costs its envelope's bytes.
                max_in_flight: 10_000,
                ..ConsumerConfig::for_group(crate::SERVICE)
            },
            slack: SlackConfig::default(),
            webhook: WebhookConfig::default(),
            aggregation: AggregationConfig::default(),
            alerts: AlertsConfig::default(),
            delivery: DeliveryConfig::default(),
            telemetry: TelemetryConfig::default(),
            admin: AdminConfig::default(),
            api: DeadLetterApiConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// A Slack incoming webhook (`https://hooks.slack.com/services/...`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlackConfig {
    /// The webhook URL. It is a credential: it is never logged, nor put in errors or metrics.
    pub webhook_url: Option<Secret>,
    /// A file holding the webhook URL (e.g. a mounted Kubernetes Secret), read at start;
    /// used when `webhook_url` is not set.
    pub webhook_url_file: Option<PathBuf>,
}

/// A generic webhook that receives each alert and summary as plain JSON.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// The URL to POST to. Treated as a credential, like the Slack URL.
    pub url: Option<Secret>,
    /// A file holding the URL; used when `url` is not set.
    pub url_file: Option<PathBuf>,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer_token: Option<Secret>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// The first failure of an error class opens a window of this length and is alerted at
    /// once; later failures of that class within it are folded into one summary sent when the
    /// window closes.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How many ticket ids a summary lists.
    pub summary_ticket_ids: usize,
    /// How many tenants a summary lists (the count is always complete).
    pub summary_tenants: usize,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            window: Duration::from_secs(5 * 60),
            summary_ticket_ids: 10,
            summary_tenants: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Length, in characters, of the redacted ticket excerpt.
    pub excerpt_chars: usize,
    /// How operators run the replay tool, e.g. `kubectl exec deploy/dlq-alerter -- dlq-alerter
    /// replay`; alerts show it followed by the filter that replays exactly what they cover.
    pub replay_command: String,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            excerpt_chars: 200,
            replay_command: "dlq-alerter replay".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// How long one POST may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First delay after a 5xx or connection error; it doubles (with jitter) up to
    /// `max_backoff`. A 429's `Retry-After` replaces it. Delivery never gives up.
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            request_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// The Slack webhook URL, from `slack.webhook_url` or `slack.webhook_url_file`.
    pub fn slack_url(&self) -> Result<Option<Secret>, String> {
        secret_or_file(
            &self.slack.webhook_url,
            &self.slack.webhook_url_file,
            "slack.webhook_url_file",
        )
    }

    /// The generic webhook URL, from `webhook.url` or `webhook.url_file`.
    pub fn webhook_url(&self) -> Result<Option<Secret>, String> {
        secret_or_file(
            &self.webhook.url,
            &self.webhook.url_file,
            "webhook.url_file",
        )
    }
}

fn secret_or_file(
    value: &Option<Secret>,
    file: &Option<PathBuf>,
    file_key: &str,
) -> Result<Option<Secret>, String> {
    if let Some(secret) = value.as_ref().filter(|s| !s.is_empty()) {
        return Ok(Some(secret.clone()));
    }
    let Some(path) = file else { return Ok(None) };
    // The error names the file, never its content.
    let content = std::fs::read_to_string(path)
        .map_err(|e| format!("{file_key}: cannot read {}: {e}", path.display()))?;
    let trimmed = content.trim();
    if trimmed.is_empty() {
        return Err(format!("{file_key}: {} is empty", path.display()));
    }
    Ok(Some(Secret::new(trimmed)))
}

fn check_url(key: &str, url: &Result<Option<Secret>, String>, problems: &mut Vec<String>) {
    match url {
        Err(problem) => problems.push(problem.clone()),
        Ok(Some(secret)) => {
            let scheme_ok = reqwest::Url::parse(secret.expose())
                .map(|url| matches!(url.scheme(), "http" | "https"))
                .unwrap_or(false);
            if !scheme_ok {
                // The value itself is a credential and stays out of the message.
                problems.push(format!("{key} is not an http(s) URL"));
            }
        }
        Ok(None) => {}
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.kafka.validate(problems);
        self.topics.validate(problems);
        self.topic_provisioning.validate(problems);
        self.consumer.validate(problems);
        self.telemetry.validate(problems);
        self.admin.validate(problems);
        self.auth.validate(problems);
        if self.api.listen.is_some() && self.auth.keys.is_empty() && self.auth.keys_file.is_none() {
            problems.push(
                "api.listen is set but no API key is configured (auth.keys or auth.keys_file)"
                    .into(),
            );
        }
        if self.api.recent_per_partition < 1 || self.api.max_items == 0 {
            problems.push("api.recent_per_partition and api.max_items must be at least 1".into());
        }
        let slack = self.slack_url();
        let webhook = self.webhook_url();
        check_url("slack.webhook_url", &slack, problems);
        check_url("webhook.url", &webhook, problems);
        // "No output at all" is refused by `run`, not here: `replay` needs no output.
        if self.aggregation.window.is_zero() {
            problems.push("aggregation.window must be longer than zero".into());
        }
        if self.alerts.excerpt_chars == 0 {
            problems.push("alerts.excerpt_chars must be at least 1".into());
        }
        if self.delivery.min_backoff.is_zero()
            || self.delivery.min_backoff > self.delivery.max_backoff
        {
            problems.push(
                "delivery.min_backoff must be longer than zero and at most delivery.max_backoff"
                    .into(),
            );
        }
        if self.delivery.request_timeout.is_zero() {
            problems.push("delivery.request_timeout must be longer than zero".into());
        }
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }

    fn kafka(&self) -> &KafkaConfig {
        &self.kafka
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_for_replay_which_needs_no_output() {
        let mut problems = Vec::new();
        Config::default().validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_bad_url_is_named_by_key_without_its_value() {
        let config = Config {
            slack: SlackConfig {
                webhook_url: Some(Secret::new("not a url/T0/B0/s3cr3t")),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert_eq!(problems, vec!["slack.webhook_url is not an http(s) URL"]);
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }

    #[test]
    fn the_url_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("dlq-alerter-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("slack-url");
        std::fs::write(&path, "https://hooks.example/T0/B0/abc\n").unwrap();
        let config = Config {
            slack: SlackConfig {
                webhook_url_file: Some(path),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            config.slack_url().unwrap().unwrap().expose(),
            "https://hooks.example/T0/B0/abc"
        );
    }
}
