//! Configuration of lag-autoscaler; see `triage_runtime::config` for how it is loaded.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

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
    /// The pipeline's topic names; the default groups read these topics.
    pub topics: TopicsConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// `/healthz`, `/readyz`, `/metrics`, `/api/v1/lag` and the drain deadline.
    pub admin: AdminConfig,
    /// Which groups are watched and how often.
    pub lag: LagConfig,
    /// The Kubernetes External Metrics API (`external.metrics.k8s.io/v1beta1`) over TLS.
    pub external_metrics: ExternalMetricsConfig,
    /// Scaling Deployments directly, without an HPA.
    pub direct: DirectConfig,
}

/// How consumer lag is read.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LagConfig {
    /// How often committed offsets and watermarks are read.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The groups to watch. Unset: the pipeline's four groups on the topics of the `topics`
    /// section (see [`Config::targets`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupTarget>>,
    /// Samples a group's status is judged on (Burrow's `intervals`): `interval × status_window`
    /// is how long lag must keep growing before a group counts as lagging or stalled.
    pub status_window: usize,
    /// Deadline of one broker request (metadata, watermarks, committed offsets, group list).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long one poll may spend reading the records at the committed offsets, for time lag.
    /// Partitions whose record did not arrive in time report no time lag for that poll.
    #[serde(with = "humantime_serde")]
    pub time_lag_fetch_timeout: Duration,
}

impl Default for LagConfig {
    fn default() -> Self {
        LagConfig {
            interval: Duration::from_secs(5),
            groups: None,
            status_window: 10,
            request_timeout: Duration::from_secs(5),
            time_lag_fetch_timeout: Duration::from_secs(2),
        }
    }
}

/// One consumer group, the topic it reads and the Deployment whose pods are its members.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupTarget {
    /// The consumer group id.
    pub group: String,
    /// The topic the group consumes.
    pub topic: String,
    /// The workload running the group's consumers: a metric label, and what direct mode scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// What kind of workload `deployment` names: the transactional dispatcher runs as a
    /// StatefulSet, so that each replica keeps its `transactional.id` across restarts.
    #[serde(default)]
    pub kind: WorkloadKind,
    /// Overrides `direct.target_lag_per_replica` for this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_lag_per_replica: Option<u64>,
    /// Overrides `direct.min_replicas` for this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    /// Overrides `direct.max_replicas` for this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
}

/// The workloads direct mode scales through their `scale` subresource.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
        }
    }
}

impl GroupTarget {
    pub fn new(group: &str, topic: &str, deployment: Option<&str>) -> Self {
        GroupTarget {
            group: group.to_owned(),
            topic: topic.to_owned(),
            deployment: deployment.map(str::to_owned),
            kind: WorkloadKind::Deployment,
            target_lag_per_replica: None,
            min_replicas: None,
            max_replicas: None,
        }
    }
}

/// The External Metrics API listener.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalMetricsConfig {
    /// Serve the API at all.
    pub enabled: bool,
    /// Address of the TLS listener the APIService points at.
    pub listen: SocketAddr,
    /// PEM certificate chain. With `tls_key`; unset: a self-signed certificate is generated at
    /// start (the APIService then needs `insecureSkipTLSVerify: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// DNS names and IP addresses the self-signed certificate is issued for.
    pub self_signed_names: Vec<String>,
    /// Who may call the API: see `aggregator_auth`.
    pub authentication: ExternalMetricsAuthConfig,
}

/// Whether the External Metrics API checks who is calling.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Only the aggregation layer (a client certificate from the request-header CA with an
    /// allowed name), for a user the API server's RBAC allows (SubjectAccessReview).
    #[default]
    Delegated,
    /// Anyone who reaches the port is answered: for a local run without a Kubernetes API.
    None,
}

/// How the External Metrics API authenticates the aggregator and authorises its users.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalMetricsAuthConfig {
    pub mode: AuthMode,
    /// PEM of the request-header CA. Unset: `requestheader-client-ca-file` of the ConfigMap
    /// kube-system/extension-apiserver-authentication, with its allowed names and header names
    /// (the API server publishes its `--requestheader-*` flags there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: the common names the aggregator's certificate may have (its
    /// `--requestheader-allowed-names`); empty accepts any certificate the CA signed.
    pub allowed_names: Vec<String>,
    /// A kubeconfig for the ConfigMap and the SubjectAccessReviews. Unset: in-cluster
    /// configuration, then `KUBECONFIG` / `~/.kube/config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// How long an authorisation answer is reused: the HPA controller asks the same question
    /// every sync period (the API server's own webhook cache defaults to 10 s too).
    #[serde(with = "humantime_serde")]
    pub authorization_cache_ttl: Duration,
}

impl Default for ExternalMetricsAuthConfig {
    fn default() -> Self {
        ExternalMetricsAuthConfig {
            mode: AuthMode::Delegated,
            client_ca_file: None,
            allowed_names: Vec::new(),
            kubeconfig: None,
            authorization_cache_ttl: Duration::from_secs(10),
        }
    }
}

impl Default for ExternalMetricsConfig {
    fn default() -> Self {
        ExternalMetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 6443)),
            tls_cert: None,
            tls_key: None,
            self_signed_names: vec!["localhost".into(), "lag-autoscaler".into()],
            authentication: ExternalMetricsAuthConfig::default(),
        }
    }
}

/// Direct mode: lag-autoscaler patches each Deployment's `scale` subresource itself.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectConfig {
    pub enabled: bool,
    /// Log decisions (and count them) without patching anything.
    pub dry_run: bool,
    /// Namespace of the Deployments. Unset: the namespace of the kubeconfig context, or the
    /// pod's own namespace in-cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A kubeconfig file. Unset: in-cluster configuration, then `KUBECONFIG` / `~/.kube/config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Lag one replica is expected to absorb: desired = ceil(lag / target_lag_per_replica).
    pub target_lag_per_replica: u64,
    pub min_replicas: u32,
    /// Upper bound; the topic's partition count lowers it further (an idle consumer is waste).
    pub max_replicas: u32,
    /// A scale-up uses the lowest recommendation of this window, so a short burst does not
    /// trigger a rebalance (the HPA's `scaleUp.stabilizationWindowSeconds`).
    #[serde(with = "humantime_serde")]
    pub scale_up_stabilization: Duration,
    /// A scale-down uses the highest recommendation of this window (the HPA's
    /// `scaleDown.stabilizationWindowSeconds`).
    #[serde(with = "humantime_serde")]
    pub scale_down_stabilization: Duration,
    /// No change is made this soon after the previous one: every change rebalances the group.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            enabled: false,
            dry_run: false,
            namespace: None,
            kubeconfig: None,
            target_lag_per_replica: 1000,
            min_replicas: 1,
            max_replicas: 12,
            scale_up_stabilization: Duration::from_secs(15),
            scale_down_stabilization: Duration::from_secs(300),
            cooldown: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// The groups to watch: `lag.groups`, or the pipeline's groups on the configured topics.
    pub fn targets(&self) -> Vec<GroupTarget> {
        if let Some(groups) = &self.lag.groups {
            return groups.clone();
        }
        let topics = &self.topics;
        vec![
            GroupTarget::new(
                "ticket-dispatcher",
                &topics.tickets_created,
                Some("ticket-publisher"),
            ),
            GroupTarget::new(
                "inference-worker",
                &topics.inference_tasks,
                Some("inference-worker"),
            ),
            GroupTarget::new("result-writer", &topics.results, Some("result-writer")),
            GroupTarget::new("dlq-alerter", &topics.dead_letters, Some("dlq-alerter")),
        ]
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.kafka.validate(problems);
        self.topics.validate(problems);
        self.telemetry.validate(problems);
        self.admin.validate(problems);
        self.lag.validate(problems);
        self.external_metrics.validate(problems);
        self.direct.validate(problems);
        for target in self.targets() {
            let min = target.min_replicas.unwrap_or(self.direct.min_replicas);
            let max = target.max_replicas.unwrap_or(self.direct.max_replicas);
            if min > max {
                problems.push(format!(
                    "group {}: min_replicas {min} is above max_replicas {max}",
                    target.group
                ));
            }
            if target.target_lag_per_replica == Some(0) {
                problems.push(format!(
                    "group {}: target_lag_per_replica must be at least 1",
                    target.group
                ));
            }
        }
    }
}

impl Validate for LagConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        for (key, value) in [
            ("lag.interval", self.interval),
            ("lag.request_timeout", self.request_timeout),
            ("lag.time_lag_fetch_timeout", self.time_lag_fetch_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{key} must be longer than zero"));
            }
        }
        if self.status_window < 2 {
            problems.push(format!(
                "lag.status_window must be at least 2 samples, not {}",
                self.status_window
            ));
        }
        let Some(groups) = &self.groups else { return };
        if groups.is_empty() {
            problems.push("lag.groups must name at least one group when set".into());
        }
        let mut seen = HashSet::new();
        for target in groups {
            if target.group.trim().is_empty() {
                problems.push("lag.groups: a group name is empty".into());
            }
            let valid_topic = !target.topic.is_empty()
                && target.topic.len() <= 249
                && target
                    .topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if target.topic.trim().is_empty() {
                problems.push(format!("lag.groups: group {} has no topic", target.group));
            } else if !valid_topic {
                problems.push(format!(
                    "lag.groups: group {} reads {:?}, which is not a valid Kafka topic name",
                    target.group, target.topic
                ));
            }
            if !seen.insert(&target.group) {
                problems.push(format!(
                    "lag.groups: group {} is listed twice",
                    target.group
                ));
            }
        }
    }
}

impl Validate for ExternalMetricsConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            problems.push(
                "external_metrics.tls_cert and external_metrics.tls_key must be set together"
                    .into(),
            );
        }
        if self.tls_cert.is_none() && self.self_signed_names.is_empty() {
            problems.push(
                "external_metrics.self_signed_names must name at least one host when no certificate is configured"
                    .into(),
            );
        }
        let auth = &self.authentication;
        if auth.mode == AuthMode::None
            && (auth.client_ca_file.is_some() || !auth.allowed_names.is_empty())
        {
            problems.push(
                "external_metrics.authentication: client_ca_file and allowed_names need mode = \"delegated\""
                    .into(),
            );
        }
        if !auth.allowed_names.is_empty() && auth.client_ca_file.is_none() {
            problems.push(
                "external_metrics.authentication.allowed_names comes from the extension-apiserver-authentication ConfigMap unless client_ca_file is set"
                    .into(),
            );
        }
    }
}

impl Validate for DirectConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.target_lag_per_replica == 0 {
            problems.push("direct.target_lag_per_replica must be at least 1".into());
        }
        if self.max_replicas == 0 {
            problems.push("direct.max_replicas must be at least 1".into());
        }
        if self.min_replicas > self.max_replicas {
            problems.push(format!(
                "direct.min_replicas {} is above direct.max_replicas {}",
                self.min_replicas, self.max_replicas
            ));
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

    fn problems(config: &Config) -> Vec<String> {
        let mut problems = Vec::new();
        config.validate(&mut problems);
        problems
    }

    #[test]
    fn the_default_groups_follow_the_topics_section() {
        let mut config = Config::default();
        config.topics.inference_tasks = "custom.inference".into();
        let targets = config.targets();
        assert_eq!(targets.len(), 4);
        let worker = targets
            .iter()
            .find(|t| t.group == "inference-worker")
            .unwrap();
        assert_eq!(worker.topic, "custom.inference");
        assert_eq!(targets[0].deployment.as_deref(), Some("ticket-publisher"));
        assert!(problems(&config).is_empty(), "{:?}", problems(&config));
    }

    #[test]
    fn every_problem_is_reported_together() {
        let mut config = Config::default();
        config.lag.groups = Some(vec![
            GroupTarget::new("a", "t", None),
            GroupTarget::new("a", "", None),
            GroupTarget::new("b", "bad topic!", None),
        ]);
        config.lag.status_window = 1;
        config.direct.min_replicas = 5;
        config.direct.max_replicas = 2;
        config.external_metrics.tls_cert = Some("cert.pem".into());
        let found = problems(&config);
        for expected in [
            "listed twice",
            "has no topic",
            "not a valid Kafka topic name",
            "status_window",
            "direct.min_replicas",
            "tls_key",
        ] {
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "{expected}: {found:?}"
            );
        }
    }
}
