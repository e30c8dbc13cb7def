//! Configuration of inference-worker; see `triage_runtime::config` for how it is loaded.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use triage_runtime::{
    config::{AdminConfig, KafkaConfig, Secret, TelemetryConfig, TopicsConfig, Validate},
    kafka::consumer::ConsumerConfig,
    service::ServiceConfig,
};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Brokers and security.
    pub kafka: KafkaConfig,
    /// The pipeline's topic names.
    pub topics: TopicsConfig,
    /// Group, in-flight window (default 64) and commit cadence.
    pub consumer: ConsumerConfig,
    /// The OpenAI-compatible endpoint.
    pub llm: LlmConfig,
    /// Requests and tokens per minute shared by every replica through Redis.
    pub rate_limit: RateLimitConfig,
    /// How long and how often retryable failures are retried.
    pub retry: RetryConfig,
    /// When the provider keeps failing, stop calling it for a while.
    pub circuit: CircuitConfig,
    /// Redis: the result cache and in-flight leases that make sure nobody pays twice.
    pub cache: CacheConfig,
    /// USD per million tokens, by model, for the `cost_usd` of each result.
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
            consumer: ConsumerConfig::for_group("inference-worker"),
            llm: LlmConfig::default(),
            rate_limit: RateLimitConfig::default(),
            retry: RetryConfig::default(),
            circuit: CircuitConfig::default(),
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
    pub redis_url: Secret,
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
        if self.cache.lease_ttl < Duration::from_secs(1) {
            problems.push("cache.lease_ttl must be at least 1s".into());
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
}
