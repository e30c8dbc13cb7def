//! Configuration of inference-worker; see `triage_runtime::config` for how it is loaded.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use triage_runtime::{
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
    /// The pipeline's topic names.
    pub topics: TopicsConfig,
    /// Group, commit cadence and how many tasks are held at once (`max_in_flight`, default
    /// 16,384; a task is a few KiB): tasks are read past a big tenant's backlog so that another tenant's ticket is
    /// seen, and wait in the worker for a call slot (`tenants.call_window`).
    pub consumer: ConsumerConfig,
    /// The OpenAI-compatible endpoint.
    pub llm: LlmConfig,
    /// Requests and tokens per minute shared by every replica through Redis.
    pub rate_limit: RateLimitConfig,
    /// How long and how often retryable failures are retried.
    pub retry: RetryConfig,
    /// When the provider keeps failing, stop calling it for a while.
    pub circuit: CircuitConfig,
    /// Fairness between tenants: the call window, its per-tenant shares, weights and quotas.
    pub tenants: TenantsConfig,
    /// Redis: the result cache and in-flight leases that make sure nobody pays twice.
    pub cache: CacheConfig,
    /// USD per million tokens, by model, for the `cost_usd` of each result. Providers answer with
    /// dated snapshot names (`gpt-4o-mini-2024-07-18` for `gpt-4o-mini`); see
    /// [`Config::price_of`] for how a name finds its price.
    pub pricing: BTreeMap<String, ModelPrice>,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// `/healthz`, `/readyz`, `/metrics` and the drain deadline.
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kafka: KafkaConfig::default(),
            topics: TopicsConfig::default(),
            consumer: ConsumerConfig {
                max_in_flight: 16_384,
                ..ConsumerConfig::for_group("inference-worker")
            },
            llm: LlmConfig::default(),
            rate_limit: RateLimitConfig::default(),
            retry: RetryConfig::default(),
            circuit: CircuitConfig::default(),
            tenants: TenantsConfig::default(),
            cache: CacheConfig::default(),
            pricing: [
                (
                    "gpt-4o-mini".to_owned(),
                    ModelPrice {
                        input: 0.15,
                        output: 0.60,
                    },
                ),
                (
                    "gpt-4o".to_owned(),
                    ModelPrice {
                        input: 2.50,
                        output: 10.0,
                    },
                ),
                (
                    "gpt-4.1-mini".to_owned(),
                    ModelPrice {
                        input: 0.40,
                        output: 1.60,
                    },
                ),
            ]
            .into(),
            telemetry: TelemetryConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

/// An OpenAI-compatible chat-completions endpoint: OpenAI, Azure OpenAI, vLLM, Ollama,
/// llama.cpp's server or llm-sim.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Base URL up to and including the API version path, e.g. `https://api.openai.com/v1`,
    /// `http://localhost:11434/v1` (Ollama), `http://127.0.0.1:8089/v1` (llm-sim). For Azure:
    /// `https://{resource}.openai.azure.com/openai/deployments/{deployment}`.
    pub base_url: String,
    /// Overrides the model named in each task; unset: use the task's model.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer` (or `api-key` for Azure).
    pub api_key: Option<Secret>,
    /// A file holding the API key (a mounted Kubernetes Secret); wins over `api_key`.
    pub api_key_file: Option<PathBuf>,
    /// `OpenAI-Organization` header.
    pub organization: Option<String>,
    /// Azure OpenAI: the `api-version` query parameter; setting it switches to Azure's
    /// `api-key` header.
    pub azure_api_version: Option<String>,
    /// Extra request headers, e.g. for a gateway.
    pub extra_headers: BTreeMap<String, String>,
    /// Ask for JSON matching the triage schema (`json_schema`); off: `json_object`, for servers
    /// that support only that.
    pub structured_output: bool,
    /// Upper bound of the answer's length.
    pub max_tokens: u32,
    pub temperature: f32,
    /// One HTTP request, connection to last byte.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            base_url: "http://127.0.0.1:8089/v1".into(),
            model: None,
            api_key: None,
            api_key_file: None,
            organization: None,
            azure_api_version: None,
            extra_headers: BTreeMap::new(),
            structured_output: true,
            max_tokens: 400,
            temperature: 0.0,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per minute the provider allows this API key; 0 disables the request budget.
    pub requests_per_minute: u32,
    /// Tokens per minute; 0 disables the token budget.
    pub tokens_per_minute: u32,
    /// How much of a minute's budget may be spent at once. Small values spread calls evenly,
    /// which every provider's limiter accepts; the sustained rate is the same.
    #[serde(with = "humantime_serde")]
    pub burst: Duration,
    /// Share of the limit to aim for, leaving room for clock skew between replicas and provider.
    pub target_utilisation: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            requests_per_minute: 500,
            tokens_per_minute: 200_000,
            burst: Duration::from_secs(1),
            target_utilisation: 0.97,
        }
    }
}

/// How the worker shares its call window and the provider's rate limit between tenants; see
/// [`crate::fairness`] for the policy.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// Tasks past admission at once (cache read, lease, rate-limit wait, LLM call), over all
    /// tenants: the worker's call window. One tenant alone may use all of it.
    pub call_window: usize,
    /// Extra slots above `call_window`, taken only by a tenant using less than its weighted share
    /// of the window while the window is full, so that a small tenant's ticket starts at once
    /// instead of waiting for a big tenant's call to finish.
    pub reserved_calls: usize,
    /// Share of the shared rate-limit bucket that a tenant using more than its weighted share of
    /// the limit may not take: kept for tenants within their share, so that their calls start at
    /// once even while a big tenant keeps the provider at its limit. 0 disables it.
    pub budget_reserve: f64,
    /// Weight of a tenant not listed in `known`.
    pub default_weight: u32,
    /// Tenants by id: weight, and optional quotas.
    pub known: BTreeMap<String, TenantConfig>,
    /// An API key file (`tenant:sha256hex` lines, the one the ingress uses): its tenants are
    /// known too, with `default_weight` unless listed in `known`. Known tenants get their own
    /// metric labels; every other tenant is counted as `other`, so that a producer cannot create
    /// unbounded series.
    pub keys_file: Option<PathBuf>,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        TenantsConfig {
            call_window: 64,
            reserved_calls: 8,
            budget_reserve: 0.1,
            default_weight: 1,
            known: BTreeMap::new(),
            keys_file: None,
        }
    }
}

/// One known tenant.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Relative share of the call window and of the rate limit while tenants compete.
    pub weight: u32,
    /// The tenant's own limit, shared by every replica through Redis; 0: none. Over it, the
    /// tenant's tasks wait (never dead-lettered) and `triage_tenant_quota_waits` counts it.
    pub requests_per_minute: u32,
    /// The tenant's own tokens per minute; 0: none.
    pub tokens_per_minute: u32,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            weight: 1,
            requests_per_minute: 0,
            tokens_per_minute: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// How long a task keeps being retried after its first failure (429, 5xx, timeouts,
    /// connection errors, an open circuit) before it is dead-lettered as `retries_exhausted`.
    /// A provider outage shorter than this produces no dead letters.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// The longest a 429's `retry-after` / `x-ratelimit-reset-*` is honoured. A gateway that
    /// asks for hours (or sends nonsense) is read as asking for this long, then asked again.
    #[serde(with = "humantime_serde")]
    pub max_provider_wait: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            deadline: Duration::from_secs(3600),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            max_provider_wait: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive retryable failures (not 429s) that open the circuit.
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe request is let through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

/// What to do when Redis (cache, leases, shared rate limit) cannot be reached.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RedisUnavailable {
    /// Wait for Redis; tickets queue up, nothing is paid twice. The default.
    Pause,
    /// Call the LLM without the cache, lease and shared limit, and count every such call in
    /// `triage_worker_unprotected_calls_total`: availability over cost.
    Proceed,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `redis://` or `rediss://` (TLS) URL; may hold a password, so it is never printed.
    pub redis_url: Secret,
    /// TLS with verify-full towards Redis (`rediss://` URL, CA file, optional client
    /// certificate). A refused certificate stops the worker with exit code 78.
    pub tls: TlsConfig,
    /// Prefix of every key, so that several pipelines can share one Redis.
    pub key_prefix: String,
    /// How long a paid result is kept for replays and duplicates.
    #[serde(with = "humantime_serde")]
    pub result_ttl: Duration,
    /// How long an in-flight lease lives without renewal; renewed every third of it while the
    /// call runs, so a dead worker's lease frees its task within this time.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    pub on_unavailable: RedisUnavailable,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            tls: TlsConfig::default(),
            key_prefix: "triage:".into(),
            result_ttl: Duration::from_secs(7 * 24 * 3600),
            lease_ttl: Duration::from_secs(15),
            on_unavailable: RedisUnavailable::Pause,
        }
    }
}

/// USD per million tokens.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: f64,
    pub output: f64,
}

impl Config {
    /// The price of a call that asked for `requested` and was answered by `answered`: the
    /// answering model's own entry (a dated snapshot priced on purpose), else the requested
    /// model's, else the longest configured name that `answered` (then `requested`) starts with,
    /// so `gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`, not as `gpt-4o`. `None`: unknown
    /// model, cost 0.
    pub fn price_of(&self, requested: &str, answered: &str) -> Option<ModelPrice> {
        let longest_prefix = |name: &str| {
            self.pricing
                .iter()
                .filter(|(model, _)| name.starts_with(model.as_str()))
                .max_by_key(|(model, _)| model.len())
                .map(|(_, price)| *price)
        };
        self.pricing
            .get(answered)
            .or_else(|| self.pricing.get(requested))
            .copied()
            .or_else(|| longest_prefix(answered))
            .or_else(|| longest_prefix(requested))
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.kafka.validate(problems);
        self.topics.validate(problems);
        self.consumer.validate(problems);
        self.telemetry.validate(problems);
        self.admin.validate(problems);
        if !(self.llm.base_url.starts_with("http://") || self.llm.base_url.starts_with("https://"))
        {
            problems.push(format!(
                "llm.base_url must be an http(s) URL, not {:?}",
                self.llm.base_url
            ));
        }
        if !(0.1..=1.0).contains(&self.rate_limit.target_utilisation) {
            problems.push("rate_limit.target_utilisation must be between 0.1 and 1".into());
        }
        if self.rate_limit.burst.is_zero() {
            problems.push("rate_limit.burst must be longer than zero".into());
        }
        self.cache.tls.validate_at("cache.tls", problems);
        if self.cache.lease_ttl < Duration::from_secs(1) {
            problems.push("cache.lease_ttl must be at least 1s".into());
        }
        if self.tenants.call_window == 0 {
            problems.push("tenants.call_window must be at least 1".into());
        }
        if !(0.0..0.9).contains(&self.tenants.budget_reserve) {
            problems.push("tenants.budget_reserve must be at least 0 and below 0.9".into());
        }
        if self.tenants.default_weight == 0 {
            problems.push("tenants.default_weight must be at least 1".into());
        }
        for (tenant, known) in &self.tenants.known {
            if known.weight == 0 {
                problems.push(format!("tenants.known.{tenant}.weight must be at least 1"));
            }
            if tenant == crate::fairness::OTHER {
                problems.push(format!(
                    "tenants.known: {tenant:?} is the label of unlisted tenants, not a tenant id"
                ));
            }
        }
        if let Some(path) = &self.tenants.keys_file
            && let Err(error) = triage_runtime::auth::read_keys_file(path)
        {
            problems.push(format!("tenants.keys_file: {error}"));
        }
        if self.circuit.failure_threshold == 0 {
            problems.push("circuit.failure_threshold must be at least 1".into());
        }
        if self.retry.initial_backoff.is_zero()
            || self.retry.max_backoff < self.retry.initial_backoff
        {
            problems.push("retry.initial_backoff must be > 0 and <= retry.max_backoff".into());
        }
        if self.retry.max_provider_wait.is_zero() {
            problems.push("retry.max_provider_wait must be longer than zero".into());
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
    fn dated_model_names_are_priced_as_their_model() {
        let config = Config::default();
        let price = |requested, answered| config.price_of(requested, answered).map(|p| p.input);
        // What OpenAI answers for a request for gpt-4o-mini.
        assert_eq!(price("gpt-4o-mini", "gpt-4o-mini-2024-07-18"), Some(0.15));
        // An Azure deployment name that says nothing: the answer's name decides, by the longest
        // prefix (gpt-4o-mini, not gpt-4o).
        assert_eq!(price("my-deployment", "gpt-4o-mini-2024-07-18"), Some(0.15));
        assert_eq!(price("my-deployment", "gpt-4o-2024-08-06"), Some(2.50));
        assert_eq!(price("gpt-4.1-mini", "llm-sim-1"), Some(0.40));
        assert_eq!(price("unknown", "llm-sim-1"), None);
    }
}
