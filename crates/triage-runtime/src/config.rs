//! Typed configuration: defaults, then an optional TOML file, then environment overrides.
//!
//! Every service has one config struct made of the shared sections below plus its own. It is
//! loaded by [`load`] from, in order of precedence (last wins):
//! 1. the struct's `Default`,
//! 2. the TOML file named by `--config PATH` or [`CONFIG_FILE_ENV`],
//! 3. environment variables with the [`ENV_PREFIX`] prefix, nested keys joined by `__`
//!    (`TRIAGE_KAFKA__BOOTSTRAP_SERVERS=broker:9092` sets `kafka.bootstrap_servers`).
//!
//! A wrong value fails start-up with one line that names the key and where it came from, and
//! [`Validate`] reports every semantic problem at once rather than the first.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "TRIAGE_";
/// Environment variable naming the TOML config file, when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "TRIAGE_CONFIG";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value has the wrong type or shape, or the file cannot be read. figment names the key
    /// and the source (file path or environment variable).
    #[error("invalid configuration: {0}")]
    Load(String),
    /// Values parse but make no sense together; every problem is listed.
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        // One line per start-up failure, naming the key in config-file form and the exact place
        // it came from, so the operator knows what to fix without reading figment's internals.
        let message = error
            .into_iter()
            .map(|e| describe(&e))
            .collect::<Vec<_>>()
            .join("; ");
        ConfigError::Load(message)
    }
}

fn describe(error: &figment::Error) -> String {
    let kind = error.kind.to_string().replace('\n', " ");
    if error.path.is_empty() {
        return kind;
    }
    let key = error.path.join(".").to_ascii_lowercase();
    let source = match error.metadata.as_ref().and_then(|m| m.source.as_ref()) {
        Some(figment::Source::File(path)) => format!(" in {}", path.display()),
        _ if error
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment")) =>
        {
            format!(
                " from {ENV_PREFIX}{}",
                error.path.join("__").to_ascii_uppercase()
            )
        }
        _ => String::new(),
    };
    format!("{key}: {kind}{source}")
}

/// Semantic checks that serde cannot express. Push one readable line per problem, naming the key.
pub trait Validate {
    fn validate(&self, problems: &mut Vec<String>);
}

/// Loads a service's configuration from defaults, the config file (from `--config PATH` in
/// `args` or [`CONFIG_FILE_ENV`]) and the environment, then validates it.
pub fn load<C>(args: impl IntoIterator<Item = String>) -> Result<C, ConfigError>
where
    C: Default + Serialize + DeserializeOwned + Validate,
{
    let config_file = config_file_from_args(args)
        .or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(path) = config_file {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["CONFIG"]));
    let config: C = figment.extract()?;
    let mut problems = Vec::new();
    config.validate(&mut problems);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn config_file_from_args(args: impl IntoIterator<Item = String>) -> Option<PathBuf> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// A value that must never be printed: API keys, passwords, webhook URLs.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is handed to the peer that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        })
    }
}

/// How to reach the Kafka cluster. Shared by every client a service creates.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers.
    pub bootstrap_servers: String,
    /// Prefix of every client id; the service appends its role (`-producer`, `-consumer`).
    pub client_id: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` when SASL is used.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// The SASL password itself. Prefer `sasl_password_file` outside a developer's machine.
    pub sasl_password: Option<Secret>,
    /// A file holding the SASL password (a mounted Kubernetes Secret); wins over `sasl_password`.
    pub sasl_password_file: Option<PathBuf>,
    /// CA bundle (PEM) to verify the brokers' certificates with `ssl` and `sasl_ssl`. librdkafka
    /// also checks that the certificate names the broker's host (`ssl.endpoint.identification.algorithm=https`).
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that require mutual TLS (`ssl.client.auth=required`).
    pub ssl_certificate_location: Option<PathBuf>,
    /// Private key (PEM, unencrypted) of `ssl_certificate_location`.
    pub ssl_key_location: Option<PathBuf>,
    /// Extra librdkafka properties, passed through as they are (e.g. `"socket.keepalive.enable" = "true"`).
    /// They override the producer and consumer defaults (`linger.ms`, `compression.type`, ...),
    /// not the settings a stage's correctness rests on (offset commits, transactions).
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            client_id: "triage".into(),
            security_protocol: "plaintext".into(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            extra: BTreeMap::new(),
        }
    }
}

impl Validate for KafkaConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.bootstrap_servers.trim().is_empty() {
            problems.push("kafka.bootstrap_servers must not be empty".into());
        }
        let protocol = self.security_protocol.to_ascii_lowercase();
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
            problems.push(format!(
                "kafka.security_protocol must be plaintext, ssl, sasl_plaintext or sasl_ssl, not {:?}",
                self.security_protocol
            ));
        }
        if protocol.starts_with("sasl")
            && (self.sasl_username.is_none()
                || (self.sasl_password.is_none() && self.sasl_password_file.is_none()))
        {
            problems.push("kafka.sasl_username and kafka.sasl_password (or kafka.sasl_password_file) are required with a sasl_* security_protocol".into());
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            problems.push(
                "kafka.ssl_certificate_location and kafka.ssl_key_location must be set together"
                    .into(),
            );
        }
        for (key, path) in [
            ("kafka.sasl_password_file", &self.sasl_password_file),
            ("kafka.ssl_ca_location", &self.ssl_ca_location),
            (
                "kafka.ssl_certificate_location",
                &self.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &self.ssl_key_location),
        ] {
            if let Some(path) = path
                && let Err(error) = std::fs::metadata(path)
            {
                problems.push(format!("{key} {}: {error}", path.display()));
            }
        }
    }
}

/// The pipeline's topic names. Defaults are the ones of DESIGN.md.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// New tickets, keyed by ticket id.
    pub tickets_created: String,
    /// Rendered LLM calls, keyed by ticket id.
    pub inference_tasks: String,
    /// Completed triages, keyed by ticket id.
    pub results: String,
    /// Dead letters of every stage, keyed by ticket id when known.
    pub dead_letters: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            tickets_created: "events.tickets.created".into(),
            inference_tasks: "tasks.llm.inference".into(),
            results: "tasks.llm.results".into(),
            dead_letters: "dlq.llm.failed".into(),
        }
    }
}

impl TopicsConfig {
    pub fn all(&self) -> [&str; 4] {
        [
            &self.tickets_created,
            &self.inference_tasks,
            &self.results,
            &self.dead_letters,
        ]
    }
}

impl Validate for TopicsConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        for (key, name) in [
            ("topics.tickets_created", &self.tickets_created),
            ("topics.inference_tasks", &self.inference_tasks),
            ("topics.results", &self.results),
            ("topics.dead_letters", &self.dead_letters),
        ] {
            let valid = !name.is_empty()
                && name.len() <= 249
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                problems.push(format!("{key} {name:?} is not a valid Kafka topic name"));
            }
        }
    }
}

/// How the pipeline's topics are created when a service provisions them at start.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicProvisioning {
    /// Create missing topics at start. Off where a platform team owns topic creation. An
    /// existing topic is never changed: one with fewer partitions than `partitions` is only
    /// warned about, since growing it remaps keys to partitions and breaks per-ticket order
    /// (`pipeline topics grow` does it on an operator's explicit word).
    pub enabled: bool,
    /// Partitions of every pipeline topic; also the ceiling for consumer replicas.
    pub partitions: i32,
    /// Copies of every partition. 3 (with `min_insync_replicas` 2) survives one broker down
    /// without refusing writes or losing acknowledged ones; a one-broker dev stack sets 1.
    pub replication_factor: i32,
    /// `min.insync.replicas` of every pipeline topic: how many copies an acks=all write needs.
    pub min_insync_replicas: i32,
    /// `retention.ms` of the work topics.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// `retention.ms` of the dead-letter topic, longer so that people can replay.
    #[serde(with = "humantime_serde")]
    pub dead_letter_retention: Duration,
}

impl Default for TopicProvisioning {
    fn default() -> Self {
        TopicProvisioning {
            enabled: true,
            partitions: 12,
            replication_factor: 3,
            min_insync_replicas: 2,
            retention: Duration::from_secs(7 * 24 * 3600),
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Validate for TopicProvisioning {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.partitions < 1 {
            problems.push(format!(
                "topic_provisioning.partitions must be at least 1, not {}",
                self.partitions
            ));
        }
        if self.replication_factor < 1 {
            problems.push(format!(
                "topic_provisioning.replication_factor must be at least 1, not {}",
                self.replication_factor
            ));
        }
        if self.min_insync_replicas < 1 || self.min_insync_replicas > self.replication_factor {
            problems.push(format!(
                "topic_provisioning.min_insync_replicas must be between 1 and replication_factor ({}), not {}",
                self.replication_factor, self.min_insync_replicas
            ));
        }
    }
}

/// Logs and traces.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `json` (one object per line, for log pipelines) or `pretty` (for people).
    pub log_format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,inference_worker=debug`. `RUST_LOG` overrides it.
    pub log_level: String,
    /// OTLP/HTTP traces endpoint (e.g. `http://collector:4318/v1/traces`). Unset: spans are still
    /// created and propagated through Kafka headers, just not exported.
    pub otlp_endpoint: Option<String>,
    /// Share of new root traces that are sampled (0.0 to 1.0); child spans follow their parent.
    pub trace_sample_ratio: f64,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            otlp_endpoint: None,
            trace_sample_ratio: 1.0,
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            problems.push(format!(
                "telemetry.trace_sample_ratio must be between 0 and 1, not {}",
                self.trace_sample_ratio
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            problems.push(format!(
                "telemetry.log_level {:?} is not a valid filter: {e}",
                self.log_level
            ));
        }
    }
}

/// The admin HTTP server every service runs: `/healthz`, `/readyz`, `/metrics`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// How long in-flight work may take to finish after SIGTERM before the service exits anyway.
    /// Kubernetes' `terminationGracePeriodSeconds` must be longer.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl Validate for AdminConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.drain_timeout.is_zero() {
            problems.push("admin.drain_timeout must be longer than zero".into());
        }
    }
}

#[cfg(test)]
// figment::Jail fixes the closures' error type to its own large `figment::Error`.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn topic_provisioning_defaults_survive_one_broker_down_and_min_insync_is_checked() {
        let defaults = TopicProvisioning::default();
        assert_eq!(
            (defaults.replication_factor, defaults.min_insync_replicas),
            (3, 2)
        );
        let mut problems = Vec::new();
        defaults.validate(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");

        let one_broker_forgot_min_insync = TopicProvisioning {
            replication_factor: 1,
            ..Default::default()
        };
        one_broker_forgot_min_insync.validate(&mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("topic_provisioning.min_insync_replicas"),
            "{problems:?}"
        );
    }

    #[derive(Default, Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct TestConfig {
        kafka: KafkaConfig,
        topics: TopicsConfig,
        admin: AdminConfig,
    }

    impl Validate for TestConfig {
        fn validate(&self, problems: &mut Vec<String>) {
            self.kafka.validate(problems);
            self.topics.validate(problems);
            self.admin.validate(problems);
        }
    }

    fn load_in_jail(
        jail: &mut figment::Jail,
        env: &[(&str, &str)],
    ) -> Result<TestConfig, ConfigError> {
        for (key, value) in env {
            jail.set_env(key, value);
        }
        load::<TestConfig>(Vec::new())
    }

    #[test]
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            let config = load_in_jail(
                jail,
                &[
                    ("TRIAGE_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9092"),
                    ("TRIAGE_ADMIN__DRAIN_TIMEOUT", "45s"),
                ],
            )
            .unwrap();
            assert_eq!(config.kafka.bootstrap_servers, "broker-1:9092");
            assert_eq!(config.admin.drain_timeout, Duration::from_secs(45));
            Ok(())
        });
    }

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "svc.toml",
                "[topics]\nresults = \"custom.results\"\n[kafka]\nclient_id = \"from-file\"\n",
            )?;
            jail.set_env("TRIAGE_KAFKA__CLIENT_ID", "from-env");
            let config =
                load::<TestConfig>(vec!["svc".into(), "--config".into(), "svc.toml".into()])
                    .unwrap();
            assert_eq!(config.topics.results, "custom.results");
            assert_eq!(config.kafka.client_id, "from-env");
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_its_key_and_source_in_one_line() {
        figment::Jail::expect_with(|jail| {
            let error =
                load_in_jail(jail, &[("TRIAGE_ADMIN__LISTEN", "not-an-address")]).unwrap_err();
            let line = error.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(line.contains("admin.listen"), "{line}");
            assert!(line.contains("TRIAGE_ADMIN__LISTEN"), "{line}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            let error =
                load_in_jail(jail, &[("TRIAGE_KAFKA__BOOTSTRAP_SERVER", "typo:9092")]).unwrap_err();
            assert!(error.to_string().contains("bootstrap_server"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn all_semantic_problems_are_reported_together() {
        figment::Jail::expect_with(|jail| {
            let error = load_in_jail(
                jail,
                &[
                    ("TRIAGE_KAFKA__SECURITY_PROTOCOL", "carrier-pigeon"),
                    ("TRIAGE_TOPICS__RESULTS", "bad topic!"),
                ],
            )
            .unwrap_err();
            let ConfigError::Invalid(problems) = error else {
                panic!("{error}")
            };
            assert_eq!(problems.len(), 2, "{problems:?}");
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        let config = KafkaConfig {
            sasl_password: Some(Secret::new("hunter2")),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
