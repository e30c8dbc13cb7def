//! The OpenAI-compatible chat-completions client, and what each failure means for the task:
//! retry (and how long to wait), or give up into the dead-letter queue.

use std::time::Duration;

use reqwest::{StatusCode, header::HeaderMap};
use serde::{Deserialize, Serialize};
use triage_proto::v1::{ChatMessage, ErrorClass};

use crate::{config::LlmConfig, triage::ResponseFormat};

/// Response header by which llm-sim says it is a simulator.
pub const SIMULATOR_HEADER: &str = "x-llm-simulator";

/// Why one call failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("rate limited by the provider (429){}", retry_after_text(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error("the provider failed with HTTP {status}")]
    Server { status: u16 },
    #[error("the provider refused the credentials (HTTP {status}); check llm.api_key")]
    Unauthorized { status: u16 },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the provider: {0}")]
    Connect(String),
    #[error("the provider's answer is not a chat completion: {0}")]
    MalformedResponse(String),
    #[error("the provider's content filter refused the ticket: {0}")]
    ContentFilter(String),
    #[error("the ticket does not fit the model's context: {0}")]
    ContextLength(String),
    #[error("the provider rejected the request (HTTP {status}): {message}")]
    InvalidRequest { status: u16, message: String },
}

fn retry_after_text(retry_after: &Option<Duration>) -> String {
    retry_after
        .map(|d| format!(", retry after {d:?}"))
        .unwrap_or_default()
}

/// What a failure means for the task. Written once, here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Try again later; `wait` is what the provider asked for, if anything. `trips_circuit`:
    /// counts towards opening the circuit (a 429 does not: the provider is healthy, just full).
    Retry {
        wait: Option<Duration>,
        trips_circuit: bool,
    },
    /// Retrying cannot help: dead-letter at once with this class.
    DeadLetter(ErrorClass),
}

impl LlmError {
    pub fn action(&self) -> FailureAction {
        match self {
            LlmError::RateLimited { retry_after } => FailureAction::Retry {
                wait: *retry_after,
                trips_circuit: false,
            },
            // Credentials are an operator's problem, not the ticket's: keep the tickets waiting.
            LlmError::Server { .. }
            | LlmError::Unauthorized { .. }
            | LlmError::Timeout(_)
            | LlmError::Connect(_)
            | LlmError::MalformedResponse(_) => FailureAction::Retry {
                wait: None,
                trips_circuit: true,
            },
            LlmError::ContentFilter(_) => FailureAction::DeadLetter(ErrorClass::ContentFilter),
            LlmError::ContextLength(_) => FailureAction::DeadLetter(ErrorClass::ContextLength),
            LlmError::InvalidRequest { .. } => {
                FailureAction::DeadLetter(ErrorClass::InvalidRequest)
            }
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::Server { .. } => "server_error",
            LlmError::Unauthorized { .. } => "unauthorized",
            LlmError::Timeout(_) => "timeout",
            LlmError::Connect(_) => "connect",
            LlmError::MalformedResponse(_) => "malformed_response",
            LlmError::ContentFilter(_) => "content_filter",
            LlmError::ContextLength(_) => "context_length",
            LlmError::InvalidRequest { .. } => "invalid_request",
        }
    }
}

/// What the provider said about its limits on a response, from the `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateLimitHeaders {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

impl RateLimitHeaders {
    pub fn parse(headers: &HeaderMap) -> Self {
        let number = |name: &str| header_str(headers, name).and_then(|v| v.trim().parse().ok());
        let duration = |name: &str| header_str(headers, name).and_then(parse_duration);
        RateLimitHeaders {
            limit_requests: number("x-ratelimit-limit-requests"),
            limit_tokens: number("x-ratelimit-limit-tokens"),
            remaining_requests: number("x-ratelimit-remaining-requests"),
            remaining_tokens: number("x-ratelimit-remaining-tokens"),
            reset_requests: duration("x-ratelimit-reset-requests"),
            reset_tokens: duration("x-ratelimit-reset-tokens"),
        }
    }

    /// After a successful call that used a budget up: how long until the provider has room for
    /// one more request. `x-ratelimit-reset-*` is the time until the budget is full again, and
    /// providers refill continuously, so one request's worth of it is `reset / limit`. Waiting
    /// the whole reset (as for a 429) would throttle a worker running at the limit to a fraction
    /// of it.
    pub fn next_capacity_in(&self) -> Option<Duration> {
        let per_unit = |remaining: Option<u64>, reset: Option<Duration>, limit: Option<u64>| {
            (remaining == Some(0))
                .then_some(reset)
                .flatten()
                .map(|reset| reset.div_f64(limit.unwrap_or(1).max(1) as f64))
        };
        let requests = per_unit(
            self.remaining_requests,
            self.reset_requests,
            self.limit_requests,
        );
        let tokens = per_unit(self.remaining_tokens, self.reset_tokens, self.limit_tokens);
        requests.into_iter().chain(tokens).max()
    }

    /// How long nothing may be sent after a 429 that gave no Retry-After: until the exhausted
    /// budget resets.
    pub fn exhausted_for(&self) -> Option<Duration> {
        let requests = (self.remaining_requests == Some(0))
            .then_some(self.reset_requests)
            .flatten();
        let tokens = (self.remaining_tokens == Some(0))
            .then_some(self.reset_tokens)
            .flatten();
        requests.into_iter().chain(tokens).max()
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The longest wait a provider's header can say. Headers come from whatever gateway sits in
/// front of the model; a value of years (or infinity) is no rate limit, so anything past a day
/// (the longest window providers limit, requests per day) is read as a day. What the worker then
/// honours is bounded again by `retry.max_provider_wait` and the task's retry deadline.
pub const MAX_PROVIDER_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Seconds from a provider's header as a wait. Negative and NaN values say nothing usable
/// (`None`: the caller falls back to its own backoff); large and infinite ones are capped at
/// [`MAX_PROVIDER_WAIT`]. Never panics, whatever the header held.
pub fn wait_from_secs(seconds: f64) -> Option<Duration> {
    if seconds.is_nan() || seconds < 0.0 {
        return None;
    }
    Some(
        Duration::try_from_secs_f64(seconds)
            .unwrap_or(MAX_PROVIDER_WAIT)
            .min(MAX_PROVIDER_WAIT),
    )
}

/// Parses OpenAI's reset durations (`1s`, `6m0s`, `120ms`, `1m30.5s`, `2h0m0s`), which follow Go's
/// `time.Duration` format.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    wait_from_secs(total)
}

/// How long a 429 asks the caller to wait: `retry-after-ms`, `Retry-After` (seconds), then the
/// reset of whichever budget is exhausted.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |name: &str, per_second: f64| {
        header_str(headers, name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|value| wait_from_secs(value / per_second))
    };
    seconds("retry-after-ms", 1000.0)
        .or_else(|| seconds("retry-after", 1.0))
        .or_else(|| RateLimitHeaders::parse(headers).exhausted_for())
}

/// A successful completion.
#[derive(Clone, Debug)]
pub struct Completion {
    pub content: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub model: String,
    pub rate_limits: RateLimitHeaders,
    /// Set when the provider says it is not a real model.
    pub simulator: Option<String>,
}

/// One chat-completions request.
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [ChatMessage],
    pub response_format: &'a ResponseFormat<'a>,
    pub idempotency_key: &'a str,
}

/// The request body, serialized straight from borrowed task data.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    max_tokens: u32,
    temperature: f32,
    response_format: &'a ResponseFormat<'a>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Deserialize)]
struct WireCompletion {
    model: Option<String>,
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireChoiceMessage,
}

#[derive(Deserialize)]
struct WireChoiceMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

#[derive(Deserialize)]
struct WireErrorBody {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    message: Option<String>,
    code: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// A pooled client for one endpoint.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    url: String,
    config: LlmConfig,
    api_key: Option<String>,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read llm.api_key_file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl LlmClient {
    pub fn new(config: &LlmConfig) -> Result<Self, ClientError> {
        let api_key = match &config.api_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ClientError::KeyFile {
                        path: path.display().to_string(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => config.api_key.as_ref().map(|key| key.expose().to_owned()),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let base = config.base_url.trim_end_matches('/');
        let url = match &config.azure_api_version {
            Some(version) => format!("{base}/chat/completions?api-version={version}"),
            None => format!("{base}/chat/completions"),
        };
        Ok(LlmClient {
            http,
            url,
            config: config.clone(),
            api_key,
        })
    }

    /// The model to call for a task that names `task_model`.
    pub fn model_for<'a>(&'a self, task_model: &'a str) -> &'a str {
        self.config.model.as_deref().unwrap_or(task_model)
    }

    pub async fn complete(&self, request: ChatRequest<'_>) -> Result<Completion, LlmError> {
        let messages: Vec<WireMessage<'_>> = request
            .messages
            .iter()
            .map(|m| WireMessage {
                role: &m.role,
                content: &m.content,
            })
            .collect();
        let body = WireRequest {
            model: request.model,
            messages,
            max_tokens: self.config.max_tokens,
            temperature: self.config.temperature,
            response_format: request.response_format,
        };
        let mut builder = self
            .http
            .post(&self.url)
            .header("Idempotency-Key", request.idempotency_key)
            .json(&body);
        if let Some(key) = &self.api_key {
            builder = if self.config.azure_api_version.is_some() {
                builder.header("api-key", key)
            } else {
                builder.bearer_auth(key)
            };
        }
        if let Some(organization) = &self.config.organization {
            builder = builder.header("OpenAI-Organization", organization);
        }
        for (name, value) in &self.config.extra_headers {
            builder = builder.header(name, value);
        }
        let response = builder.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            return Err(classify_failure(status, &headers, &bytes));
        }
        let completion: WireCompletion = serde_json::from_slice(&bytes)
            .map_err(|e| LlmError::MalformedResponse(e.to_string()))?;
        let content = completion
            .choices
            .into_iter()
            .next()
            .and_then(|choice| choice.message.content)
            .ok_or_else(|| LlmError::MalformedResponse("no choices[0].message.content".into()))?;
        let usage = completion.usage.unwrap_or(WireUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
        });
        Ok(Completion {
            content,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            model: completion.model.unwrap_or_else(|| request.model.to_owned()),
            rate_limits: RateLimitHeaders::parse(&headers),
            simulator: header_str(&headers, SIMULATOR_HEADER).map(str::to_owned),
        })
    }

    fn transport_error(&self, error: reqwest::Error) -> LlmError {
        if error.is_timeout() {
            LlmError::Timeout(self.config.request_timeout)
        } else {
            // reqwest's Display never includes headers, so the API key cannot leak here.
            LlmError::Connect(without_url(&error))
        }
    }
}

fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<llm endpoint>");
    }
    text
}

fn classify_failure(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> LlmError {
    let error = serde_json::from_slice::<WireErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let message = error
        .as_ref()
        .and_then(|e| e.message.clone())
        .unwrap_or_else(|| String::from_utf8_lossy(body.get(..300).unwrap_or(body)).into_owned());
    let code = error
        .as_ref()
        .and_then(|e| e.code.as_ref())
        .map(|c| {
            c.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| c.to_string())
        })
        .unwrap_or_default();
    let kind = error
        .as_ref()
        .and_then(|e| e.kind.clone())
        .unwrap_or_default();
    match status.as_u16() {
        429 => LlmError::RateLimited {
            retry_after: retry_after(headers),
        },
        401 | 403 => LlmError::Unauthorized {
            status: status.as_u16(),
        },
        408 | 409 => LlmError::Server {
            status: status.as_u16(),
        },
        400..=499 => {
            if code == "content_filter"
                || code == "content_policy_violation"
                || kind == "content_filter"
            {
                LlmError::ContentFilter(message)
            } else if code == "context_length_exceeded"
                || message.contains("maximum context length")
            {
                LlmError::ContextLength(message)
            } else {
                LlmError::InvalidRequest {
                    status: status.as_u16(),
                    message,
                }
            }
        }
        _ => LlmError::Server {
            status: status.as_u16(),
        },
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    /// What a hostile or careless gateway puts in a header: numbers of every sign and size,
    /// NaN and infinities, Go durations, dates, garbage and non-ASCII text.
    fn header_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<f64>().prop_map(|value| value.to_string()),
            any::<i64>().prop_map(|value| value.to_string()),
            prop::sample::select(vec![
                "-5",
                "-0",
                "NaN",
                "nan",
                "inf",
                "-inf",
                "infinity",
                "1e400",
                "-1e400",
                "",
                " ",
                "0.0000001",
                "1e-300",
                "99999999999999999999999999",
                "6m0s",
                "1h1h1h",
                "0.5ms",
                "3µs",
                "1.2.3s",
                "ms",
                "Wed, 21 Oct 2015 07:28:00 GMT",
                "١٢",
            ])
            .prop_map(str::to_owned),
            "[0-9.hmsµun-]{0,24}",
            "\\PC{0,16}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(512),
            ..Default::default()
        })]

        #[test]
        fn no_provider_header_panics_or_asks_for_more_than_the_cap(
            values in proptest::collection::vec(header_text(), 8),
            status in 100u16..600,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
        ) {
            let names = [
                "retry-after", "retry-after-ms", "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ];
            let mut map = HeaderMap::new();
            for (name, value) in names.iter().zip(&values) {
                if let Ok(value) = HeaderValue::from_str(value) {
                    map.insert(*name, value);
                }
            }
            let limits = RateLimitHeaders::parse(&map);
            for wait in [
                retry_after(&map),
                limits.next_capacity_in(),
                limits.exhausted_for(),
                limits.reset_requests,
                limits.reset_tokens,
            ]
            .into_iter()
            .flatten()
            {
                proptest::prop_assert!(wait <= MAX_PROVIDER_WAIT, "{wait:?} from {values:?}");
            }
            let status = StatusCode::from_u16(status).unwrap();
            let error = classify_failure(status, &map, &body);
            let _ = (error.action(), error.label(), error.to_string());
            if status == StatusCode::TOO_MANY_REQUESTS {
                let is_retry = matches!(error.action(), FailureAction::Retry { .. });
                proptest::prop_assert!(is_retry);
            }
        }
    }

    #[test]
    fn hostile_retry_after_values_fall_back_or_are_capped() {
        for value in ["-5", "NaN", "-inf", "", "soon"] {
            assert_eq!(
                retry_after(&headers(&[("retry-after-ms", value)])),
                None,
                "{value}"
            );
        }
        for value in ["inf", "1e400", "99999999999999999999999"] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", value)])),
                Some(MAX_PROVIDER_WAIT),
                "{value}"
            );
        }
        // A negative milliseconds header does not hide a usable seconds one.
        let map = headers(&[("retry-after-ms", "-5"), ("retry-after", "2")]);
        assert_eq!(retry_after(&map), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("9999999999h"), Some(MAX_PROVIDER_WAIT));
    }

    #[test]
    fn openai_reset_durations_parse() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("120ms"), Some(Duration::from_millis(120)));
        assert_eq!(
            parse_duration("1m30.5s"),
            Some(Duration::from_millis(90_500))
        );
        assert_eq!(parse_duration("2h0m0s"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration(""), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_prefers_milliseconds_then_seconds_then_reset() {
        let map = headers(&[("retry-after-ms", "1500"), ("retry-after", "2")]);
        assert_eq!(retry_after(&map), Some(Duration::from_millis(1500)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        let map = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-remaining-tokens", "10"),
            ("x-ratelimit-reset-tokens", "9m0s"),
        ]);
        assert_eq!(retry_after(&map), Some(Duration::from_secs(360)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn a_used_up_budget_waits_for_one_request_not_the_whole_reset() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", "1200"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1m0s"),
        ]);
        let limits = RateLimitHeaders::parse(&map);
        assert_eq!(limits.next_capacity_in(), Some(Duration::from_millis(50)));
        assert_eq!(limits.exhausted_for(), Some(Duration::from_secs(60)));
        let room = headers(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "1s"),
        ]);
        assert_eq!(RateLimitHeaders::parse(&room).next_capacity_in(), None);
    }

    #[test]
    fn failures_are_classified_once() {
        let body = br#"{"error":{"message":"flagged","type":"invalid_request_error","code":"content_filter"}}"#;
        let error = classify_failure(StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert_eq!(
            error.action(),
            FailureAction::DeadLetter(ErrorClass::ContentFilter)
        );
        let body = br#"{"error":{"message":"This model's maximum context length is 8192 tokens","code":"context_length_exceeded"}}"#;
        let error = classify_failure(StatusCode::BAD_REQUEST, &HeaderMap::new(), body);
        assert_eq!(
            error.action(),
            FailureAction::DeadLetter(ErrorClass::ContextLength)
        );
        let error = classify_failure(StatusCode::BAD_REQUEST, &HeaderMap::new(), b"{}");
        assert_eq!(
            error.action(),
            FailureAction::DeadLetter(ErrorClass::InvalidRequest)
        );
        let error = classify_failure(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "3")]),
            b"{}",
        );
        assert_eq!(
            error.action(),
            FailureAction::Retry {
                wait: Some(Duration::from_secs(3)),
                trips_circuit: false
            }
        );
        for status in [500, 502, 503, 401] {
            let error = classify_failure(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                b"",
            );
            assert!(
                matches!(
                    error.action(),
                    FailureAction::Retry {
                        trips_circuit: true,
                        ..
                    }
                ),
                "{status}"
            );
        }
    }
}
