//! The HTTP server: routes, the chat-completion handler, and the accept loop that can reset a
//! connection on purpose.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::StreamExt as _;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc, watch},
    time::{Duration, Instant},
};
use tower::ServiceExt as _;

use crate::{
    config::{ConfigError, ConfigPatch, SimConfig},
    faults::{ActiveFaults, FaultKind},
    latency,
    openai::{self, ChatRequest, ResponseFormat},
    ratelimit::{RateLimiter, Refusal, Snapshot, format_duration},
    stats::Stats,
    triage,
};

/// `x-llm-simulator: llm-sim/<version>` on every response.
pub const SIMULATOR_HEADER: &str = "x-llm-simulator";
pub const SIMULATOR_VERSION: &str = concat!("llm-sim/", env!("CARGO_PKG_VERSION"));
/// The `system_fingerprint` of every completion.
pub const SYSTEM_FINGERPRINT: &str = "llm-sim";
/// Requests without an `Authorization: Bearer` key share this rate-limit bucket.
const ANONYMOUS_KEY: &str = "anonymous";
/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters per streamed content chunk (about four tokens).
const STREAM_CHUNK_CHARS: usize = 16;

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The latency the simulator applied to an answer, in whole milliseconds (OpenAI sends the same
/// header with its processing time).
const PROCESSING_MS: HeaderName = HeaderName::from_static("openai-processing-ms");
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The configuration in force, swapped whole on `POST /_sim/config`.
#[derive(Debug)]
struct Current {
    config: SimConfig,
    faults: ActiveFaults,
}

#[derive(Debug)]
struct Shared {
    current: RwLock<Arc<Current>>,
    limiter: RateLimiter,
    stats: Stats,
    closing_tx: watch::Sender<bool>,
    next_id: AtomicU64,
}

/// The simulator's state, shared by every request.
#[derive(Clone, Debug)]
pub struct SimState {
    shared: Arc<Shared>,
}

impl SimState {
    pub fn new(config: SimConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let faults = ActiveFaults::open(&config.faults, Instant::now());
        let (closing_tx, _) = watch::channel(false);
        Ok(SimState {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(Current { config, faults })),
                limiter: RateLimiter::default(),
                stats: Stats::default(),
                closing_tx,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    fn current(&self) -> Arc<Current> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The configuration as `GET /_sim/config` shows it: windows with the time they have left.
    pub fn config(&self) -> SimConfig {
        let current = self.current();
        SimConfig {
            faults: current.faults.remaining(Instant::now()),
            ..current.config.clone()
        }
    }

    /// Applies `patch`; a new `rate_limits` section starts every key's buckets afresh, a new
    /// `faults` list opens its windows now.
    pub fn apply(&self, patch: ConfigPatch) -> Result<SimConfig, ConfigError> {
        let now = Instant::now();
        let mut current = self
            .shared
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let limits_changed = patch.rate_limits.is_some();
        let faults_opt = patch.faults.clone();
        let config = current.config.patched(patch);
        config.validate()?;
        let faults = match faults_opt {
            Some(specs) => ActiveFaults::open(&specs, now),
            None => current.faults.clone(),
        };
        *current = Arc::new(Current { config, faults });
        drop(current);
        if limits_changed {
            self.shared.limiter.clear();
        }
        Ok(self.config())
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Clears the stats and every rate-limit bucket.
    pub fn reset(&self) {
        self.shared.stats.reset();
        self.shared.limiter.clear();
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Relaxed)
    }

    async fn closing(&self) {
        let mut closing_rx = self.shared.closing_tx.subscribe();
        let _ = closing_rx.wait_for(|closing| *closing).await;
    }
}

/// The routes: the OpenAI API under `/v1`, the simulator's controls under `/_sim`.
pub fn router(state: SimState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/_sim/config", get(get_config).post(set_config))
        .route("/_sim/stats", get(get_stats))
        .route("/_sim/reset", post(reset))
        .fallback(not_found)
        .layer(middleware::map_response(mark_simulator))
        .with_state(state)
}

/// Serves `config` on `listener` until `shutdown` resolves, then lets open connections finish
/// (hung requests are released) for up to five seconds.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let state = SimState::new(config)?;
    serve_state(listener, state, shutdown).await;
    Ok(())
}

/// [`serve`] with a state the caller keeps (to read stats or change the configuration directly).
pub async fn serve_state(
    listener: TcpListener,
    state: SimState,
    shutdown: impl Future<Output = ()> + Send,
) {
    let app = router(state.clone());
    // Every connection task holds a sender; when all are dropped, the drain is done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let closing_rx = state.shared.closing_tx.subscribe();
                    tokio::spawn(connection(stream, app.clone(), closing_rx, done_tx.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    let _ = state.shared.closing_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(DRAIN_TIMEOUT, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "connections still open after the drain timeout");
    }
}

/// Lets a handler close its own connection with a TCP reset (the `reset` fault).
#[derive(Clone, Debug)]
struct ConnectionKill(Arc<Notify>);

async fn connection(
    stream: TcpStream,
    app: Router,
    mut closing_rx: watch::Receiver<bool>,
    _done_tx: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    // A second descriptor for the same socket, kept to set SO_LINGER=0 when a handler asks for
    // a reset: hyper owns the stream, and closing with zero linger is what sends the RST.
    let (stream, reset_handle) = match duplicate(stream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(error = %error, "failed to prepare a connection");
            return;
        }
    };
    let kill = Arc::new(Notify::new());
    let service = {
        let kill = kill.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request
                .extensions_mut()
                .insert(ConnectionKill(kill.clone()));
            app.clone().oneshot(request)
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let killed = kill.notified();
    tokio::pin!(killed);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "connection ended with an error");
                }
                return;
            }
            () = &mut killed => {
                if let Ok(handle) = TcpStream::from_std(reset_handle) {
                    let _ = handle.set_zero_linger();
                }
                // Returning drops both descriptors: the peer sees a reset, no response.
                return;
            }
            _ = closing_rx.wait_for(|closing| *closing), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

fn duplicate(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let handle = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, handle))
}

async fn mark_simulator(mut response: Response) -> Response {
    response.headers_mut().insert(
        HeaderName::from_static(SIMULATOR_HEADER),
        HeaderValue::from_static(SIMULATOR_VERSION),
    );
    response
}

async fn not_found(
    State(state): State<SimState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let body = openai::error_body(
        &format!("Invalid URL ({method} {})", uri.path()),
        "invalid_request_error",
        None,
        None,
    );
    let current = state.current();
    let snapshot = state.shared.limiter.peek(
        api_key(&headers),
        &current.config.rate_limits,
        Instant::now(),
    );
    respond(StatusCode::NOT_FOUND, &body, &snapshot, state.next_id())
}

/// The rate-limit bucket's name: the bearer token, or one shared bucket without one.
fn api_key(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .unwrap_or(ANONYMOUS_KEY)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn number(value: u64) -> HeaderValue {
    HeaderValue::from(value)
}

fn text(value: String) -> HeaderValue {
    HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// A JSON response with the rate-limit headers and a request id.
fn respond(status: StatusCode, body: &Value, snapshot: &Snapshot, request_id: u64) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert_rate_headers(headers, snapshot);
    headers.insert(REQUEST_ID, text(format!("req_sim{request_id:012x}")));
    response
}

fn insert_rate_headers(headers: &mut HeaderMap, snapshot: &Snapshot) {
    headers.insert(LIMIT_REQUESTS, number(snapshot.limit_requests));
    headers.insert(LIMIT_TOKENS, number(snapshot.limit_tokens));
    headers.insert(REMAINING_REQUESTS, number(snapshot.remaining_requests));
    headers.insert(REMAINING_TOKENS, number(snapshot.remaining_tokens));
    headers.insert(
        RESET_REQUESTS,
        text(format_duration(snapshot.reset_requests)),
    );
    headers.insert(RESET_TOKENS, text(format_duration(snapshot.reset_tokens)));
}

async fn list_models(State(state): State<SimState>, headers: HeaderMap) -> Response {
    let current = state.current();
    let snapshot = state.shared.limiter.peek(
        api_key(&headers),
        &current.config.rate_limits,
        Instant::now(),
    );
    let body = json!({
        "object": "list",
        "data": [{
            "id": current.config.model,
            "object": "model",
            "created": 1_700_000_000,
            "owned_by": "llm-sim",
        }],
    });
    respond(StatusCode::OK, &body, &snapshot, state.next_id())
}

async fn get_config(State(state): State<SimState>) -> Json<SimConfig> {
    Json(state.config())
}

async fn set_config(State(state): State<SimState>, body: Bytes) -> Response {
    let patch: ConfigPatch = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(error) => {
            let body = openai::error_body(
                &format!("invalid configuration: {error}"),
                "invalid_request_error",
                None,
                None,
            );
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    match state.apply(patch) {
        Ok(config) => {
            tracing::info!(
                config = %serde_json::to_string(&config).unwrap_or_default(),
                "configuration changed"
            );
            Json(config).into_response()
        }
        Err(error) => {
            let body = openai::error_body(&error.to_string(), "invalid_request_error", None, None);
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}

async fn get_stats(State(state): State<SimState>) -> Response {
    Json(state.stats().report()).into_response()
}

async fn reset(State(state): State<SimState>) -> Response {
    state.reset();
    Json(state.stats().report()).into_response()
}

/// What the simulator answers to one request.
struct Answer {
    content: String,
    finish_reason: &'static str,
    completion_tokens: u64,
}

fn compose(request: &ChatRequest) -> Answer {
    let message = request.last_user_text();
    let triage = triage::classify(triage::ticket_text(&message));
    let (json_mode, schema_opt) = match &request.response_format {
        Some(ResponseFormat::JsonObject) => (true, None),
        Some(ResponseFormat::JsonSchema { json_schema }) => (true, json_schema.schema.as_ref()),
        Some(ResponseFormat::Text) | None => (
            message.contains("<ticket>") || request.mentions_json(),
            None,
        ),
    };
    let content = if json_mode {
        triage::answer_json(&triage, schema_opt).to_string()
    } else {
        format!(
            "{}This answer comes from llm-sim, a simulator, not a language model. \
             Category: {}. Priority: {}. Suggested reply: {}",
            triage::SIMULATOR_NOTE,
            triage.category.as_str(),
            triage.priority.as_str(),
            triage::suggested_reply(&triage),
        )
    };
    let completion_tokens = openai::estimate_tokens(&content);
    match request.max_tokens() {
        Some(max_tokens) if completion_tokens > max_tokens => {
            let cut: String = content.chars().take(max_tokens as usize * 4).collect();
            Answer {
                completion_tokens: openai::estimate_tokens(&cut),
                content: cut,
                finish_reason: "length",
            }
        }
        _ => Answer {
            content,
            finish_reason: "stop",
            completion_tokens,
        },
    }
}

/// The first half of the content: no longer valid JSON.
fn malformed(content: &str) -> String {
    let half = content.chars().count() / 2;
    content.chars().take(half).collect()
}

async fn chat_completions(
    State(state): State<SimState>,
    kill_opt: Option<Extension<ConnectionKill>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = Instant::now();
    let current = state.current();
    let config = &current.config;
    let key = api_key(&headers);
    let idempotency_key_opt = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|value| value.to_str().ok());
    let stats = state.stats();
    stats.request_received(idempotency_key_opt);
    let request_id = state.next_id();
    let reject = |status: StatusCode, body: Value| {
        stats.responded(status.as_u16());
        let snapshot = state.shared.limiter.peek(key, &config.rate_limits, now);
        respond(status, &body, &snapshot, request_id)
    };

    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            let message = format!("We could not parse the JSON body of your request: {error}");
            return reject(
                StatusCode::BAD_REQUEST,
                openai::error_body(&message, "invalid_request_error", None, None),
            );
        }
    };
    if request.messages.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            openai::error_body(
                "[] is too short - 'messages'",
                "invalid_request_error",
                Some("messages"),
                None,
            ),
        );
    }
    let prompt_tokens = request.prompt_tokens();
    if prompt_tokens > config.context_window {
        return reject(
            StatusCode::BAD_REQUEST,
            context_length_body(config.context_window, prompt_tokens),
        );
    }
    let model = request
        .model
        .clone()
        .unwrap_or_else(|| config.model.clone());
    let answer = compose(&request);
    // OpenAI reserves max_tokens against the tokens-per-minute limit before it answers.
    let charge = prompt_tokens + request.max_tokens().unwrap_or(answer.completion_tokens);

    let snapshot = match state
        .shared
        .limiter
        .admit(key, charge, &config.rate_limits, now)
    {
        Ok(snapshot) => snapshot,
        Err((refusal, snapshot)) => {
            stats.responded(StatusCode::TOO_MANY_REQUESTS.as_u16());
            return too_many_requests(&refusal, &snapshot, &model, request_id);
        }
    };

    let fault_opt = if current.faults.is_empty() {
        None
    } else {
        current.faults.pick(now, &mut rand::rng())
    };
    if let Some(fault) = fault_opt {
        stats.fault_injected(fault);
    }
    let error_opt = match fault_opt {
        Some(FaultKind::Status500) => Some((
            StatusCode::INTERNAL_SERVER_ERROR,
            openai::error_body(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
        )),
        Some(FaultKind::Status502) => Some((
            StatusCode::BAD_GATEWAY,
            json!({"error": {"code": 502, "message": "Bad gateway.", "param": null, "type": "cf_bad_gateway"}}),
        )),
        Some(FaultKind::Status503) => Some((
            StatusCode::SERVICE_UNAVAILABLE,
            openai::error_body(
                "The server is overloaded or not ready yet.",
                "server_error",
                None,
                None,
            ),
        )),
        Some(FaultKind::ContentFilter) => Some((
            StatusCode::BAD_REQUEST,
            openai::error_body(
                "The response was filtered due to the prompt triggering the content management \
                 policy. Please modify your prompt and retry.",
                "invalid_request_error",
                Some("prompt"),
                Some("content_filter"),
            ),
        )),
        Some(FaultKind::ContextLength) => Some((
            StatusCode::BAD_REQUEST,
            context_length_body(
                config.context_window,
                prompt_tokens.max(config.context_window + 1),
            ),
        )),
        Some(FaultKind::Reset) => {
            if let Some(Extension(kill)) = kill_opt {
                kill.0.notify_one();
            }
            // The connection task drops this future with the connection; served without one
            // (e.g. through `oneshot`), a reset degrades to a hang.
            state.closing().await;
            return shutting_down(&snapshot, request_id);
        }
        Some(FaultKind::Hang) => {
            state.closing().await;
            return shutting_down(&snapshot, request_id);
        }
        Some(FaultKind::MalformedJson) | None => None,
    };
    if let Some((status, body)) = error_opt {
        stats.responded(status.as_u16());
        return respond(status, &body, &snapshot, request_id);
    }

    let content = if fault_opt == Some(FaultKind::MalformedJson) {
        malformed(&answer.content)
    } else {
        answer.content
    };
    let delay = latency::sample(&config.latency, &mut rand::rng());
    let completion = Completion {
        id: format!("chatcmpl-sim{request_id:012x}"),
        created: unix_now(),
        model,
        content,
        finish_reason: answer.finish_reason,
        prompt_tokens,
        completion_tokens: answer.completion_tokens,
    };
    stats.responded(StatusCode::OK.as_u16());
    stats.paid(idempotency_key_opt, prompt_tokens, answer.completion_tokens);
    if request.stream {
        let include_usage = request
            .stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage);
        return stream(completion, include_usage, delay, &snapshot, request_id).await;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = respond(StatusCode::OK, &completion.body(), &snapshot, request_id);
    response
        .headers_mut()
        .insert(PROCESSING_MS, number(delay.as_millis() as u64));
    response
}

fn context_length_body(window: u64, prompt_tokens: u64) -> Value {
    openai::error_body(
        &format!(
            "This model's maximum context length is {window} tokens. However, your messages \
             resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        ),
        "invalid_request_error",
        Some("messages"),
        Some("context_length_exceeded"),
    )
}

fn shutting_down(snapshot: &Snapshot, request_id: u64) -> Response {
    let body = openai::error_body(
        "The simulator is shutting down.",
        "server_error",
        None,
        None,
    );
    respond(StatusCode::SERVICE_UNAVAILABLE, &body, snapshot, request_id)
}

/// OpenAI's 429: the message names the limit, usage and wait; `Retry-After` (whole seconds,
/// rounded up) and `retry-after-ms` say when to come back.
fn too_many_requests(
    refusal: &Refusal,
    snapshot: &Snapshot,
    model: &str,
    request_id: u64,
) -> Response {
    let dimension = refusal.dimension.as_str();
    let per_minute = match refusal.dimension {
        crate::ratelimit::Dimension::Requests => "requests per min (RPM)",
        crate::ratelimit::Dimension::Tokens => "tokens per min (TPM)",
    };
    let message = match refusal.retry_after {
        Some(wait) => format!(
            "Rate limit reached for {model} in organization org-llm-sim on {per_minute}: \
             Limit {}, Used {}, Requested {}. Please try again in {}. Visit \
             https://platform.openai.com/account/rate-limits to learn more.",
            refusal.limit,
            refusal.used,
            refusal.requested,
            format_duration(wait)
        ),
        None => format!(
            "Request too large for {model} in organization org-llm-sim on {per_minute}: \
             Limit {}, Requested {}. The input or output tokens must be reduced in order to \
             run successfully.",
            refusal.limit, refusal.requested
        ),
    };
    let body = openai::error_body(&message, dimension, None, Some("rate_limit_exceeded"));
    let mut response = respond(StatusCode::TOO_MANY_REQUESTS, &body, snapshot, request_id);
    if let Some(wait) = refusal.retry_after {
        let millis = wait.as_nanos().div_ceil(1_000_000) as u64;
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, number(millis.div_ceil(1000)));
        headers.insert(RETRY_AFTER_MS, number(millis));
    }
    response
}

/// A successful completion, rendered whole or as a stream of chunks.
struct Completion {
    id: String,
    created: u64,
    model: String,
    content: String,
    finish_reason: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Completion {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    fn body(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.content, "refusal": null},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>, include_usage: bool) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        sse(&chunk)
    }
}

fn sse(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Streams the completion as server-sent events. The latency is split evenly: one share before
/// the headers (the first byte), one before each content chunk.
async fn stream(
    completion: Completion,
    include_usage: bool,
    delay: Duration,
    snapshot: &Snapshot,
    request_id: u64,
) -> Response {
    let chars: Vec<char> = completion.content.chars().collect();
    let pieces: Vec<String> = chars
        .chunks(STREAM_CHUNK_CHARS)
        .map(|piece| piece.iter().collect())
        .collect();
    let step = delay / (pieces.len() as u32 + 1);
    let mut events: Vec<(Duration, Bytes)> = Vec::with_capacity(pieces.len() + 4);
    events.push((
        Duration::ZERO,
        completion.chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
            include_usage,
        ),
    ));
    for piece in &pieces {
        events.push((
            step,
            completion.chunk(json!({"content": piece}), None, include_usage),
        ));
    }
    events.push((
        Duration::ZERO,
        completion.chunk(json!({}), Some(completion.finish_reason), include_usage),
    ));
    if include_usage {
        let usage_chunk = json!({
            "id": completion.id,
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [],
            "usage": completion.usage(),
        });
        events.push((Duration::ZERO, sse(&usage_chunk)));
    }
    events.push((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));

    if !step.is_zero() {
        tokio::time::sleep(step).await;
    }
    let body = futures::stream::iter(events).then(|(wait, bytes)| async move {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok::<_, Infallible>(bytes)
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    insert_rate_headers(headers, snapshot);
    headers.insert(REQUEST_ID, text(format!("req_sim{request_id:012x}")));
    headers.insert(PROCESSING_MS, number(delay.as_millis() as u64));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_content_is_not_json() {
        let request: ChatRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "<ticket>refund please</ticket>"}],
            "response_format": {"type": "json_object"}
        }))
        .unwrap();
        let answer = compose(&request);
        assert!(serde_json::from_str::<Value>(&answer.content).is_ok());
        assert!(serde_json::from_str::<Value>(&malformed(&answer.content)).is_err());
    }

    #[tokio::test]
    async fn router_answers_without_a_socket() {
        let state = SimState::new(SimConfig::default()).unwrap();
        let request = axum::http::Request::post("/v1/chat/completions")
            .header(header::AUTHORIZATION, "Bearer sk-oneshot")
            .header(IDEMPOTENCY_KEY, "k")
            .body(Body::from(
                r#"{"messages":[{"role":"user","content":"<ticket>refund</ticket>"}]}"#,
            ))
            .unwrap();
        let response = router(state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[SIMULATOR_HEADER], SIMULATOR_VERSION);
        assert_eq!(response.headers()[REMAINING_REQUESTS], "29999");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let completion: Value = serde_json::from_slice(&body).unwrap();
        let content = completion["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        let answer: Value = serde_json::from_str(content).unwrap();
        assert_eq!(answer["category"], "billing");
        assert_eq!(state.stats().report().paid_requests_by_key["k"], 1);
    }

    #[test]
    fn max_tokens_cuts_the_answer() {
        let request: ChatRequest = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": "<ticket>refund please</ticket>"}],
            "max_tokens": 5
        }))
        .unwrap();
        let answer = compose(&request);
        assert_eq!(answer.finish_reason, "length");
        assert_eq!(answer.completion_tokens, 5);
        assert_eq!(answer.content.chars().count(), 20);
    }
}
