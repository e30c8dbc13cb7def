//! Configuration of result-writer; see `triage_runtime::config` for how it is loaded.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use triage_runtime::{
    auth::AuthConfig,
    config::{AdminConfig, KafkaConfig, Secret, TelemetryConfig, TopicsConfig, Validate},
    kafka::consumer::ConsumerConfig,
    service::ServiceConfig,
    tls::TlsConfig,
};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Brokers and security.
    pub kafka: KafkaConfig,
    /// The pipeline's topic names; results are read from `topics.results`, undecodable ones go
    /// to `topics.dead_letters`.
    pub topics: TopicsConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// `/healthz`, `/readyz`, `/metrics` and the drain deadline.
    pub admin: AdminConfig,
    /// The consumer group and its in-flight window.
    pub consumer: ConsumerConfig,
    /// Where the triages are written.
    pub database: DatabaseConfig,
    /// How results are grouped into one transaction.
    pub batch: BatchConfig,
    /// The read API (`/v1/...`, `/openapi.json`).
    pub api: ApiConfig,
    /// API keys and the tenants they belong to.
    pub auth: AuthConfig,
    /// Outbound webhooks, at most one per tenant.
    pub webhooks: WebhooksConfig,
    /// The triage console (`/console`) on the read API's address.
    pub console: ConsoleConfig,
    /// Longest wait for the broker to acknowledge a dead letter.
    #[serde(with = "humantime_serde")]
    pub dead_letter_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kafka: KafkaConfig::default(),
            topics: TopicsConfig::default(),
            telemetry: TelemetryConfig::default(),
            admin: AdminConfig::default(),
            consumer: ConsumerConfig {
                // One row is small (about 1 KiB in memory); a window of four full batches keeps
                // the next ones filling while one commits. With 500-row batches and a 2048
                // window the benchmark wrote about 3,000 rows/s; with these, about 13,000.
                max_in_flight: 8192,
                ..ConsumerConfig::for_group(crate::SERVICE)
            },
            database: DatabaseConfig::default(),
            batch: BatchConfig::default(),
            api: ApiConfig::default(),
            auth: AuthConfig::default(),
            webhooks: WebhooksConfig::default(),
            console: ConsoleConfig::default(),
            dead_letter_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user[:password]@host:port/db`; may hold a password, so it is never printed.
    pub url: Secret,
    /// A file holding the password (a mounted Kubernetes Secret); wins over one in `url`.
    pub password_file: Option<PathBuf>,
    /// TLS with verify-full: the server's certificate must chain to `tls.ca_file` and name the
    /// URL's host. A refused certificate stops the service with exit code 78.
    pub tls: TlsConfig,
    /// The schema the table and migrations live in; created when missing.
    pub schema: String,
    /// Connections in the pool (the batch writer uses one, the read API the others).
    pub pool_size: usize,
    /// Longest wait to open a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest one batch transaction may take before it counts as failed and is retried.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// First wait before retrying a failed batch; doubles up to `retry_max_delay`.
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("postgres://triage@127.0.0.1:5432/triage"),
            password_file: None,
            tls: TlsConfig::default(),
            schema: "public".into(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(5),
        }
    }
}

/// True for a plain lowercase SQL identifier, safe to put in a statement unquoted.
pub fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch is written as soon as it holds this many results.
    pub max_rows: usize,
    /// ... or when its first result has waited this long.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: 2000,
            max_delay: Duration::from_millis(20),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address of the read API.
    pub listen: SocketAddr,
    /// Largest `limit` of `GET /v1/triage`.
    pub max_page_size: u32,
    /// New results kept for slow `GET /v1/triage/stream` clients; a client further behind
    /// misses results and is told so with a `lagged` event.
    pub stream_buffer: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            max_page_size: 500,
            stream_buffer: 4096,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console under `/console`.
    pub enabled: bool,
    /// Link of a trace id in the ticket view, `{trace_id}` replaced, e.g.
    /// `http://jaeger:16686/trace/{trace_id}`; no link when unset.
    pub trace_url: Option<String>,
    /// Base URL of dlq-alerter's dead-letter API (its `api.listen`), e.g.
    /// `http://dlq-alerter:8082`; the dead-letter page is off when unset.
    pub dead_letters_url: Option<String>,
    /// lag-autoscaler's lag report, e.g. `http://lag-autoscaler:9090/api/v1/lag`; the health
    /// page is off when unset.
    pub lag_url: Option<String>,
    /// Longest wait for dlq-alerter or lag-autoscaler.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: true,
            trace_url: None,
            dead_letters_url: None,
            lag_url: None,
            upstream_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where each tenant's triages are POSTed.
    pub endpoints: Vec<WebhookEndpoint>,
    /// Deliveries waiting or being retried; when full, new ones are dropped (and counted)
    /// rather than slowing the database path.
    pub queue_capacity: usize,
    /// Deliveries in progress at once.
    pub concurrency: usize,
    /// Attempts per delivery before it is dropped.
    pub max_attempts: usize,
    /// Longest wait for one attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First wait before retrying; doubles up to `retry_max_delay`.
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            endpoints: Vec::new(),
            queue_capacity: 10_000,
            concurrency: 16,
            max_attempts: 8,
            timeout: Duration::from_secs(5),
            retry_min_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(30),
        }
    }
}

/// One tenant's webhook.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    pub tenant: String,
    /// The receiver's URL; may carry a token, so it is never printed.
    pub url: Secret,
    /// The HMAC-SHA256 key the receiver verifies `X-Triage-Signature` with.
    pub secret: Secret,
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.kafka.validate(problems);
        self.topics.validate(problems);
        self.telemetry.validate(problems);
        self.admin.validate(problems);
        self.consumer.validate(problems);
        let database = &self.database;
        if !database.url.expose().starts_with("postgres://")
            && !database.url.expose().starts_with("postgresql://")
        {
            problems.push("database.url must be a postgres:// URL".into());
        } else if database
            .url
            .expose()
            .parse::<tokio_postgres::Config>()
            .is_err()
        {
            // The parser's message may quote the URL, password included: say only where.
            problems.push("database.url is not a valid PostgreSQL connection URL".into());
        }
        database.tls.validate_at("database.tls", problems);
        if let Some(path) = &database.password_file
            && let Err(error) = std::fs::metadata(path)
        {
            problems.push(format!(
                "database.password_file {}: {error}",
                path.display()
            ));
        }
        if !is_plain_identifier(&database.schema) {
            problems.push(format!(
                "database.schema {:?} must be a lowercase identifier ([a-z_][a-z0-9_]*)",
                database.schema
            ));
        }
        for (key, url) in [
            ("console.dead_letters_url", &self.console.dead_letters_url),
            ("console.lag_url", &self.console.lag_url),
            ("console.trace_url", &self.console.trace_url),
        ] {
            if let Some(url) = url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                problems.push(format!("{key} must be an http:// or https:// URL"));
            }
        }
        if database.pool_size < 2 {
            problems.push("database.pool_size must be at least 2 (writer and read API)".into());
        }
        for (key, value) in [
            ("database.connect_timeout", database.connect_timeout),
            ("database.write_timeout", database.write_timeout),
            ("database.retry_min_delay", database.retry_min_delay),
            ("batch.max_delay", self.batch.max_delay),
            ("webhooks.timeout", self.webhooks.timeout),
            ("console.upstream_timeout", self.console.upstream_timeout),
            ("dead_letter_timeout", self.dead_letter_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{key} must be longer than zero"));
            }
        }
        if database.retry_max_delay < database.retry_min_delay {
            problems
                .push("database.retry_max_delay must not be shorter than retry_min_delay".into());
        }
        if self.batch.max_rows == 0 || self.batch.max_rows > 10_000 {
            problems.push("batch.max_rows must be between 1 and 10000".into());
        }
        if self.api.max_page_size == 0 {
            problems.push("api.max_page_size must be at least 1".into());
        }
        if self.api.stream_buffer == 0 {
            problems.push("api.stream_buffer must be at least 1".into());
        }
        self.auth.validate(problems);
        let webhooks = &self.webhooks;
        let mut tenants = std::collections::HashSet::new();
        for (index, endpoint) in webhooks.endpoints.iter().enumerate() {
            if !tenants.insert(endpoint.tenant.as_str()) {
                problems.push(format!(
                    "webhooks.endpoints[{index}]: tenant {:?} has more than one webhook",
                    endpoint.tenant
                ));
            }
            if reqwest::Url::parse(endpoint.url.expose())
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https"))
                .is_none()
            {
                problems.push(format!(
                    "webhooks.endpoints[{index}].url must be an http(s) URL"
                ));
            }
            if endpoint.secret.is_empty() {
                problems.push(format!(
                    "webhooks.endpoints[{index}].secret must not be empty"
                ));
            }
        }
        if webhooks.queue_capacity == 0 || webhooks.concurrency == 0 || webhooks.max_attempts == 0 {
            problems.push(
                "webhooks.queue_capacity, concurrency and max_attempts must be at least 1".into(),
            );
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
    fn defaults_are_valid() {
        let mut problems = Vec::new();
        Config::default().validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(Config::default().consumer.group_id, "result-writer");
    }

    #[test]
    fn every_problem_is_reported_and_no_secret_is_quoted() {
        let mut config = Config::default();
        config.database.url = Secret::new("mysql://root:hunter2@db/x");
        config.database.schema = "Robert'); DROP".into();
        config.batch.max_rows = 0;
        config.webhooks.endpoints = vec![WebhookEndpoint {
            tenant: "acme".into(),
            url: Secret::new("ftp://token-s3cret@example"),
            secret: Secret::new(""),
        }];
        let mut problems = Vec::new();
        config.validate(&mut problems);
        assert_eq!(problems.len(), 5, "{problems:?}");
        let all = problems.join("\n");
        assert!(!all.contains("hunter2") && !all.contains("s3cret"), "{all}");
    }

    #[test]
    fn plain_identifiers_only() {
        assert!(is_plain_identifier("public"));
        assert!(is_plain_identifier("test_result_writer_3f9a"));
        assert!(!is_plain_identifier("Public"));
        assert!(!is_plain_identifier("a\"b"));
        assert!(!is_plain_identifier("9x"));
        assert!(!is_plain_identifier(""));
    }
}
