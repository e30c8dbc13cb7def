//! Configuration of inference-worker; see `triage_runtime::config` for how it is loaded.

use serde::{Deserialize, Serialize};
use triage_runtime::{
    config::{AdminConfig, KafkaConfig, TelemetryConfig, TopicsConfig, Validate},
    service::ServiceConfig,
};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Brokers and security.
    pub kafka: KafkaConfig,
    /// The pipeline's topic names.
    pub topics: TopicsConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// `/healthz`, `/readyz`, `/metrics` and the drain deadline.
    pub admin: AdminConfig,
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.kafka.validate(problems);
        self.topics.validate(problems);
        self.telemetry.validate(problems);
        self.admin.validate(problems);
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
}
