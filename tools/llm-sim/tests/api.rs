//! The simulator over real HTTP: each test starts its own in-process server on 127.0.0.1:0 and
//! talks to it with reqwest, as the worker will.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use llm_sim::{SimConfig, config::LatencyConfig, config::RateLimitConfig};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{Mutex, oneshot},
    task::JoinHandle,
    time::Instant,
};
use triage_test_support::wait_until;

struct Sim {
    base: String,
    client: Client,
    stop_tx: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), llm_sim::ServeError>>,
}

impl Sim {
    async fn start(config: SimConfig) -> Sim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(llm_sim::serve(listener, config, async move {
            let _ = stop_rx.await;
        }));
        Sim {
            base: format!("http://{address}"),
            client: Client::new(),
            stop_tx: Some(stop_tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn chat(&self, body: &Value) -> Response {
        self.chat_as(None, None, body).await
    }

    async fn chat_as(
        &self,
        key: Option<&str>,
        idempotency_key: Option<&str>,
        body: &Value,
    ) -> Response {
        let mut request = self
            .client
            .post(self.url("/v1/chat/completions"))
            .json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(idempotency_key) = idempotency_key {
            request = request.header("Idempotency-Key", idempotency_key);
        }
        request.send().await.expect("chat request")
    }

    async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn configure(&self, patch: Value) -> Value {
        let response = self
            .client
            .post(self.url("/_sim/config"))
            .json(&patch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "config {patch}");
        response.json().await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop_tx.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

fn config() -> SimConfig {
    SimConfig::default()
}

fn triage_schema() -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "triage",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {
                    "category": {"type": "string", "enum": ["billing", "outage", "login", "bug", "feature_request", "other"]},
                    "priority": {"type": "string", "enum": ["urgent", "high", "normal", "low"]},
                    "suggested_reply": {"type": "string"},
                    "confidence": {"type": "number"}
                },
                "required": ["category", "priority", "suggested_reply", "confidence"],
                "additionalProperties": false
            }
        }
    })
}

fn ticket_request(ticket: &str) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You triage support tickets. Answer with JSON."},
            {"role": "user", "content": format!("Triage this ticket:\n<ticket>{ticket}</ticket>")}
        ],
        "response_format": triage_schema(),
        "max_tokens": 300
    })
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn header_u64(response: &Response, name: &str) -> u64 {
    header(response, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

/// Go's duration form as OpenAI sends it: `120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3.5s`.
fn is_go_duration(text: &str) -> bool {
    if let Some(millis) = text.strip_suffix("ms") {
        return !millis.is_empty() && millis.chars().all(|c| c.is_ascii_digit());
    }
    let Some(rest) = text.strip_suffix('s') else {
        return false;
    };
    let rest = rest.split_once('h').map_or(rest, |(hours, rest)| {
        if hours.chars().all(|c| c.is_ascii_digit()) {
            rest
        } else {
            "x"
        }
    });
    let rest = rest.split_once('m').map_or(rest, |(minutes, rest)| {
        if minutes.chars().all(|c| c.is_ascii_digit()) {
            rest
        } else {
            "x"
        }
    });
    let (whole, fraction) = rest.split_once('.').unwrap_or((rest, "0"));
    !whole.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.chars().all(|c| c.is_ascii_digit())
}

fn assert_rate_headers(response: &Response) {
    for name in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
    ] {
        header_u64(response, name);
    }
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        let value = header(response, name);
        assert!(is_go_duration(value), "{name}: {value:?}");
    }
    assert_eq!(
        header(response, "x-llm-simulator"),
        llm_sim::SIMULATOR_VERSION
    );
}

fn answer_of(body: &Value) -> Value {
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    serde_json::from_str(content).unwrap_or_else(|e| panic!("content is not JSON ({e}): {content}"))
}

#[tokio::test]
async fn completion_has_the_openai_shape_and_says_it_is_a_simulator() {
    let sim = Sim::start(config()).await;
    let response = sim
        .chat(&ticket_request(
            "I was charged twice this month, please refund me ASAP",
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_rate_headers(&response);
    assert!(header(&response, "content-type").starts_with("application/json"));
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["system_fingerprint"], "llm-sim");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let answer = answer_of(&body);
    assert_eq!(answer["category"], "billing");
    assert_eq!(answer["priority"], "urgent");
    assert!(
        answer["suggested_reply"]
            .as_str()
            .unwrap()
            .starts_with("[llm-sim] ")
    );
    let confidence = answer["confidence"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&confidence));
    let usage = &body["usage"];
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        usage["completion_tokens"],
        (content.chars().count() as u64).div_ceil(4)
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    sim.stop().await;
}

#[tokio::test]
async fn triage_is_deterministic_and_follows_the_keyword_rules() {
    let sim = Sim::start(config()).await;
    let cases = [
        (
            "The whole site is down, every page returns 503",
            "outage",
            "high",
        ),
        (
            "I cannot log in, my password reset link is broken. Production down, urgent!",
            "login",
            "urgent",
        ),
        (
            "The app crashes with an error when I export",
            "bug",
            "normal",
        ),
        (
            "It would be nice to have dark mode, please add it",
            "feature_request",
            "low",
        ),
        (
            "Ich habe eine falsche Rechnung bekommen",
            "billing",
            "normal",
        ),
        ("Quelle est votre adresse ?", "other", "normal"),
    ];
    for (ticket, category, priority) in cases {
        let first = answer_of(
            &sim.chat(&ticket_request(ticket))
                .await
                .json()
                .await
                .unwrap(),
        );
        let second = answer_of(
            &sim.chat(&ticket_request(ticket))
                .await
                .json()
                .await
                .unwrap(),
        );
        assert_eq!(first, second, "{ticket}");
        assert_eq!(first["category"], category, "{ticket}");
        assert_eq!(first["priority"], priority, "{ticket}");
    }
    // Without delimiters the whole last user message is the ticket.
    let plain = json!({
        "messages": [{"role": "user", "content": "refund my invoice"}],
        "response_format": {"type": "json_object"}
    });
    let answer = answer_of(&sim.chat(&plain).await.json().await.unwrap());
    assert_eq!(answer["category"], "billing");
    sim.stop().await;
}

#[tokio::test]
async fn response_format_json_schema_enums_are_honoured() {
    let sim = Sim::start(config()).await;
    let mut request = ticket_request("Please add an API for exports, that feature would be nice");
    request["response_format"]["json_schema"]["schema"]["properties"]["category"]["enum"] =
        json!(["Billing", "Technical", "Other"]);
    request["response_format"]["json_schema"]["schema"]["properties"]["priority"]["enum"] =
        json!(["P1", "P2", "P3"]);
    let answer = answer_of(&sim.chat(&request).await.json().await.unwrap());
    // feature_request is not in the enum and has no synonym there: "Other".
    assert_eq!(answer["category"], "Other");
    // low has no counterpart: the first value.
    assert_eq!(answer["priority"], "P1");
    // json_object: valid JSON with the four fields.
    let request = json!({
        "messages": [{"role": "user", "content": "my 2fa code never arrives"}],
        "response_format": {"type": "json_object"}
    });
    let answer = answer_of(&sim.chat(&request).await.json().await.unwrap());
    assert_eq!(answer["category"], "login");
    let mut keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["category", "confidence", "priority", "suggested_reply"]
    );
    // No JSON asked for: a plain-text answer that says what it is.
    let request = json!({"messages": [{"role": "user", "content": "hello there"}]});
    let body: Value = sim.chat(&request).await.json().await.unwrap();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("[llm-sim] ") && content.contains("simulator"),
        "{content}"
    );
    sim.stop().await;
}

/// Splits an SSE body into its `data:` payloads, checking the framing on the way.
fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "unterminated stream: {body:?}");
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {event:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn streaming_sends_chunks_usage_and_done() {
    let sim = Sim::start(config()).await;
    let whole: Value = sim
        .chat(&ticket_request("refund please"))
        .await
        .json()
        .await
        .unwrap();
    let mut request = ticket_request("refund please");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = sim.chat(&request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    assert_rate_headers(&response);
    let events = sse_events(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["object"] == "chat.completion.chunk")
    );
    assert!(chunks.iter().all(|chunk| chunk["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(finish["usage"].is_null());
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    assert!(chunks.len() > 4, "content is spread over several chunks");

    // Without include_usage: no usage chunk and no usage field.
    request["stream_options"] = json!(null);
    let events = sse_events(&sim.chat(&request).await.text().await.unwrap());
    let last_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "stop");
    assert!(events.iter().all(|event| !event.contains("\"usage\"")));
    sim.stop().await;
}

#[tokio::test]
async fn rate_limit_headers_and_429_match_openai() {
    let sim = Sim::start(SimConfig {
        rate_limits: RateLimitConfig {
            rpm: 1,
            tpm: 60_000,
            burst_ms: 60_000,
        },
        ..config()
    })
    .await;
    let request = ticket_request("refund please");
    let first = sim.chat_as(Some("sk-one"), None, &request).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), "1");
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "60000");
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&first, "x-ratelimit-reset-requests"), "1m0s");
    let first_body: Value = first.json().await.unwrap();
    let charged = first_body["usage"]["prompt_tokens"].as_u64().unwrap() + 300;
    // tokens refill at 1000/s: `charged` tokens take `charged` ms.
    let second = sim.chat_as(Some("sk-one"), None, &request).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_rate_headers(&second);
    assert!(header_u64(&second, "x-ratelimit-remaining-tokens") >= 60_000 - charged);
    let retry_after = header_u64(&second, "retry-after");
    let retry_after_ms = header_u64(&second, "retry-after-ms");
    assert!(
        (59_000..=60_000).contains(&retry_after_ms),
        "{retry_after_ms}"
    );
    assert_eq!(retry_after, retry_after_ms.div_ceil(1000));
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["param"].is_null());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for gpt-4o-mini in organization org-llm-sim on requests per min (RPM): Limit 1, Used 1, Requested 1. Please try again in "
        ),
        "{message}"
    );
    // Another key has its own buckets, and so do requests without a key.
    assert_eq!(
        sim.chat_as(Some("sk-two"), None, &request).await.status(),
        StatusCode::OK
    );
    assert_eq!(sim.chat(&request).await.status(), StatusCode::OK);
    assert_eq!(
        sim.chat(&request).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // GET /v1/models carries the headers too, without being charged.
    let models = sim
        .client
        .get(sim.url("/v1/models"))
        .bearer_auth("sk-three")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&models, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&models, "x-ratelimit-reset-requests"), "0s");
    sim.stop().await;
}

#[tokio::test]
async fn token_limit_refuses_with_type_tokens() {
    let sim = Sim::start(SimConfig {
        rate_limits: RateLimitConfig {
            rpm: 10_000,
            tpm: 60_000,
            burst_ms: 1_000,
        },
        ..config()
    })
    .await;
    // Bucket of 1 000 tokens, 1 000 tokens/s; each request reserves prompt + 300.
    let request = ticket_request("refund please");
    let first = sim.chat_as(Some("sk-t"), None, &request).await;
    assert_eq!(first.status(), StatusCode::OK);
    let remaining = header_u64(&first, "x-ratelimit-remaining-tokens");
    let body: Value = first.json().await.unwrap();
    let charged = body["usage"]["prompt_tokens"].as_u64().unwrap() + 300;
    assert_eq!(remaining, 1_000 - charged);
    let mut refused_opt = None;
    for _ in 0..5 {
        let response = sim.chat_as(Some("sk-t"), None, &request).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refused_opt = Some(response);
            break;
        }
    }
    let refused = refused_opt.expect("a token-limit refusal");
    assert!(header_u64(&refused, "retry-after-ms") <= charged);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("on tokens per min (TPM): Limit 60000, Used "),
        "{message}"
    );
    assert!(
        message.contains(&format!("Requested {charged}. Please try again in ")),
        "{message}"
    );
    // Larger than the bucket: never admissible, no Retry-After.
    let mut huge = request.clone();
    huge["max_tokens"] = json!(5_000);
    let too_large = sim.chat_as(Some("sk-t"), None, &huge).await;
    assert_eq!(too_large.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(too_large.headers().get("retry-after").is_none());
    let body: Value = too_large.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request too large")
    );
    sim.stop().await;
}

/// 6 000 RPM with a one-second burst: at most 100 at once, then 100 per second. Eight clients
/// push as hard as they can for four seconds. The limit allows exactly 100 + 100/s × the time
/// from the first request to the last answer, and the simulator must admit that many within a
/// few percent: never more (the limit holds), and no fewer than 95 % (the limit is not stricter
/// than advertised; a client stall wastes capacity only once the bucket is full, a whole second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limit_holds_over_a_measured_window() {
    let sim = Arc::new(
        Sim::start(SimConfig {
            rate_limits: RateLimitConfig {
                rpm: 6_000,
                tpm: 100_000_000,
                burst_ms: 1_000,
            },
            ..config()
        })
        .await,
    );
    let window = Duration::from_secs(4);
    let start = Instant::now();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let sim = sim.clone();
        let outcomes = outcomes.clone();
        clients.push(tokio::spawn(async move {
            let request =
                json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
            let mut mine = Vec::new();
            while start.elapsed() < window {
                let status = sim.chat_as(Some("sk-load"), None, &request).await.status();
                mine.push((start.elapsed(), status));
            }
            outcomes.lock().await.extend(mine);
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let outcomes = outcomes.lock().await;
    let admitted = outcomes
        .iter()
        .filter(|(_, status)| *status == StatusCode::OK)
        .count();
    let refused = outcomes
        .iter()
        .filter(|(_, status)| *status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(admitted + refused, outcomes.len());
    assert!(
        refused > admitted,
        "clients pushed past the limit ({refused} refused)"
    );
    let last_answer = outcomes.iter().map(|(done, _)| *done).max().unwrap();
    let allowed = 100.0 + 100.0 * last_answer.as_secs_f64();
    let admitted = admitted as f64;
    assert!(
        admitted <= allowed + 1.0,
        "admitted {admitted}, the limit allows {allowed:.1}"
    );
    assert!(
        admitted >= 0.95 * (100.0 + 100.0 * window.as_secs_f64()),
        "admitted {admitted}, the limit allows {allowed:.1}"
    );
    let stats = sim.get_json("/_sim/stats").await;
    assert_eq!(stats["by_status"]["200"], admitted as u64);
    assert_eq!(stats["by_status"]["429"], refused as u64);
}

#[tokio::test]
async fn stats_count_statuses_tokens_and_idempotency_keys() {
    let sim = Sim::start(config()).await;
    let request = ticket_request("the site is down");
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    for _ in 0..2 {
        let body: Value = sim
            .chat_as(None, Some("ticket-1"), &request)
            .await
            .json()
            .await
            .unwrap();
        prompt_tokens += body["usage"]["prompt_tokens"].as_u64().unwrap();
        completion_tokens += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    sim.configure(json!({"faults": [{"fault": "status_503"}]}))
        .await;
    assert_eq!(
        sim.chat_as(None, Some("ticket-2"), &request).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    sim.configure(json!({"faults": []})).await;
    assert_eq!(
        sim.chat_as(None, None, &request).await.status(),
        StatusCode::OK
    );
    let bad = sim
        .client
        .post(sim.url("/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let stats = sim.get_json("/_sim/stats").await;
    assert_eq!(stats["requests_total"], 5);
    assert_eq!(stats["by_status"], json!({"200": 3, "400": 1, "503": 1}));
    assert_eq!(
        stats["requests_by_key"],
        json!({"ticket-1": 2, "ticket-2": 1})
    );
    assert_eq!(stats["paid_requests_by_key"], json!({"ticket-1": 2}));
    assert_eq!(stats["faults_injected"], json!({"status_503": 1}));
    let third: u64 = stats["prompt_tokens"].as_u64().unwrap() - prompt_tokens;
    assert_eq!(third, prompt_tokens / 2);
    assert_eq!(
        stats["completion_tokens"].as_u64().unwrap(),
        completion_tokens * 3 / 2
    );

    let reset = sim
        .client
        .post(sim.url("/_sim/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::OK);
    let stats = sim.get_json("/_sim/stats").await;
    assert_eq!(stats["requests_total"], 0);
    assert_eq!(stats["by_status"], json!({}));
    assert_eq!(stats["requests_by_key"], json!({}));
    assert_eq!(stats["prompt_tokens"], 0);
    sim.stop().await;
}

#[tokio::test]
async fn outage_window_opens_and_closes_by_itself() {
    let sim = Sim::start(config()).await;
    let request = ticket_request("refund please");
    let opened_at = Instant::now();
    let shown = sim
        .configure(json!({"faults": [{"fault": "status_503", "duration_ms": 800}]}))
        .await;
    assert_eq!(shown["faults"][0]["fault"], "status_503");
    assert!(shown["faults"][0]["duration_ms"].as_u64().unwrap() <= 800);
    let response = sim.chat(&request).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_rate_headers(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    wait_until(
        "the outage window to close",
        Duration::from_secs(5),
        || async { (sim.chat(&request).await.status() == StatusCode::OK).then_some(()) },
    )
    .await;
    let open_for = opened_at.elapsed();
    assert!(
        open_for >= Duration::from_millis(750),
        "closed after {open_for:?}"
    );
    assert_eq!(sim.get_json("/_sim/config").await["faults"], json!([]));

    // A window without a duration stays open until the faults are replaced.
    sim.configure(json!({"faults": [{"fault": "status_502"}]}))
        .await;
    let response = sim.chat(&request).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": 502, "message": "Bad gateway.", "param": null, "type": "cf_bad_gateway"}})
    );
    sim.configure(json!({"faults": []})).await;
    assert_eq!(sim.chat(&request).await.status(), StatusCode::OK);
    sim.stop().await;
}

#[tokio::test]
async fn every_error_fault_has_openais_status_and_body() {
    let sim = Sim::start(config()).await;
    let request = ticket_request("refund please");
    let cases = [
        ("status_500", StatusCode::INTERNAL_SERVER_ERROR, Value::Null),
        (
            "content_filter",
            StatusCode::BAD_REQUEST,
            json!("content_filter"),
        ),
        (
            "context_length",
            StatusCode::BAD_REQUEST,
            json!("context_length_exceeded"),
        ),
    ];
    for (fault, status, code) in cases {
        sim.configure(json!({"faults": [{"fault": fault}]})).await;
        let response = sim.chat(&request).await;
        assert_eq!(response.status(), status, "{fault}");
        assert_rate_headers(&response);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{fault}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    sim.configure(json!({"faults": [{"fault": "malformed_json"}]}))
        .await;
    let body: Value = sim.chat(&request).await.json().await.unwrap();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(content).is_err(), "{content}");

    // A real context window: a long prompt is refused without any fault.
    sim.configure(json!({"faults": [], "context_window": 50}))
        .await;
    let long = ticket_request(&"word ".repeat(100));
    let response = sim.chat(&long).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(body["error"]["param"], "messages");
    sim.stop().await;
}

#[tokio::test]
async fn faults_fire_with_their_probability() {
    let sim = Sim::start(config()).await;
    sim.configure(json!({"faults": [{"fault": "status_503", "probability": 0.3}]}))
        .await;
    let request = json!({"messages": [{"role": "user", "content": "hi"}]});
    let mut unavailable = 0;
    for _ in 0..300 {
        if sim.chat(&request).await.status() == StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    // Binomial(300, 0.3): mean 90, sd 7.9; ±30 is nearly four sd.
    assert!((60..=120).contains(&unavailable), "{unavailable} of 300");
    sim.stop().await;
}

#[tokio::test]
async fn hang_never_answers_and_reset_closes_without_a_response() {
    let sim = Sim::start(config()).await;
    let request = ticket_request("refund please");
    sim.configure(json!({"faults": [{"fault": "hang"}]})).await;
    let started = Instant::now();
    let error = sim
        .client
        .post(sim.url("/v1/chat/completions"))
        .json(&request)
        .timeout(Duration::from_millis(400))
        .send()
        .await
        .expect_err("a hang has no answer");
    assert!(error.is_timeout(), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));

    sim.configure(json!({"faults": [{"fault": "reset"}]})).await;
    let started = Instant::now();
    let error = sim
        .client
        .post(sim.url("/v1/chat/completions"))
        .json(&request)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect_err("a reset has no answer");
    assert!(!error.is_timeout(), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let stats = sim.get_json("/_sim/stats").await;
    assert_eq!(stats["faults_injected"], json!({"hang": 1, "reset": 1}));
    assert_eq!(stats["by_status"], json!({}));
    sim.stop().await;
}

#[tokio::test]
async fn shutdown_releases_hung_requests() {
    let sim = Sim::start(SimConfig {
        faults: vec![llm_sim::faults::FaultSpec {
            fault: llm_sim::faults::FaultKind::Hang,
            probability: 1.0,
            duration_ms: None,
        }],
        ..config()
    })
    .await;
    let pending = {
        let client = sim.client.clone();
        let url = sim.url("/v1/chat/completions");
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
        })
    };
    wait_until(
        "the hung request to arrive",
        Duration::from_secs(5),
        || async { (sim.get_json("/_sim/stats").await["requests_total"] == 1).then_some(()) },
    )
    .await;
    let started = Instant::now();
    sim.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let response = pending.await.unwrap().expect("released with an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Wall time and the latency the server says it applied (`openai-processing-ms`), per request,
/// sorted by the latter.
async fn timed_requests(sim: &Arc<Sim>, count: usize, concurrency: usize) -> Vec<(f64, f64)> {
    let per_client = count / concurrency;
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let sim = sim.clone();
        clients.push(tokio::spawn(async move {
            let request = json!({"messages": [{"role": "user", "content": "hi"}]});
            let mut timings = Vec::new();
            for _ in 0..per_client {
                let started = Instant::now();
                let response = sim.chat(&request).await;
                assert_eq!(response.status(), StatusCode::OK);
                let applied = header_u64(&response, "openai-processing-ms") as f64;
                response.bytes().await.unwrap();
                timings.push((started.elapsed().as_secs_f64() * 1000.0, applied));
            }
            timings
        }));
    }
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.unwrap());
    }
    all.sort_by(|a, b| a.1.total_cmp(&b.1));
    // The latency was really spent: no answer came back sooner than its draw.
    for (wall, applied) in &all {
        assert!(
            *wall >= *applied - 1.0,
            "answered after {wall} ms, latency {applied} ms"
        );
    }
    all
}

fn applied(timings: &[(f64, f64)]) -> Vec<f64> {
    timings.iter().map(|(_, applied)| *applied).collect()
}

/// The draws are checked through `openai-processing-ms` (exact, whatever the machine's load);
/// `timed_requests` checks that each was really waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_follows_the_configured_distribution() {
    let sim = Arc::new(
        Sim::start(SimConfig {
            latency: LatencyConfig::Fixed { ms: 120 },
            ..config()
        })
        .await,
    );
    let fixed = applied(&timed_requests(&sim, 10, 5).await);
    assert!(fixed.iter().all(|ms| *ms == 120.0), "fixed: {fixed:?}");

    sim.configure(json!({"latency": {"kind": "uniform", "min_ms": 50, "max_ms": 100}}))
        .await;
    let uniform = applied(&timed_requests(&sim, 200, 20).await);
    let mean = uniform.iter().sum::<f64>() / uniform.len() as f64;
    assert!(
        uniform[0] >= 50.0 && uniform[uniform.len() - 1] <= 100.0,
        "uniform: {uniform:?}"
    );
    // Mean 75, sd of the mean 14.4/sqrt(200) = 1: ±4 is four sd.
    assert!((71.0..=79.0).contains(&mean), "uniform mean {mean}");

    // p50 40 ms, p99 120 ms: p90 is 73 ms. With 400 draws, ±12 % on p50 and ±16 % on p90
    // are four standard errors.
    sim.configure(json!({"latency": {"kind": "lognormal", "p50_ms": 40, "p99_ms": 120}}))
        .await;
    let lognormal = applied(&timed_requests(&sim, 400, 40).await);
    let p50 = percentile(&lognormal, 0.5);
    let p90 = percentile(&lognormal, 0.9);
    assert!((35.0..=45.0).contains(&p50), "lognormal p50 {p50}");
    assert!((62.0..=86.0).contains(&p90), "lognormal p90 {p90}");
}

#[tokio::test]
async fn streaming_spreads_the_latency_over_the_chunks() {
    let sim = Sim::start(SimConfig {
        latency: LatencyConfig::Fixed { ms: 400 },
        ..config()
    })
    .await;
    let mut request = ticket_request("refund please");
    request["stream"] = json!(true);
    let started = Instant::now();
    let mut response = sim.chat(&request).await;
    let first_byte = started.elapsed();
    assert_eq!(header(&response, "openai-processing-ms"), "400");
    let mut arrivals = Vec::new();
    while let Some(bytes) = response.chunk().await.unwrap() {
        arrivals.push((started.elapsed(), bytes.len()));
    }
    let total = started.elapsed();
    assert!(total >= Duration::from_millis(400), "total {total:?}");
    // The first byte comes after one share of the latency, not after all of it, and the body
    // arrives piece by piece over the rest.
    assert!(
        first_byte < total / 2,
        "first byte after {first_byte:?} of {total:?}"
    );
    let first_arrival = arrivals[0].0;
    let last_arrival = arrivals[arrivals.len() - 1].0;
    assert!(
        arrivals.len() >= 3 && last_arrival - first_arrival >= Duration::from_millis(200),
        "arrivals {arrivals:?}"
    );
}

#[tokio::test]
async fn models_config_and_errors_speak_openai() {
    let sim = Sim::start(SimConfig {
        model: "sim-model".into(),
        ..config()
    })
    .await;
    let models = sim.client.get(sim.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), StatusCode::OK);
    assert_rate_headers(&models);
    let body: Value = models.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "sim-model");
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "llm-sim");

    // A request without a model is answered as the configured one.
    let answer: Value = sim
        .chat(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "sim-model");

    let missing = sim.client.get(sim.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_rate_headers(&missing);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let empty = sim.chat(&json!({"messages": []})).await;
    assert_eq!(empty.status(), StatusCode::BAD_REQUEST);
    assert_rate_headers(&empty);

    // Bad configuration is refused whole, listing every problem; nothing changes.
    let refused = sim
        .client
        .post(sim.url("/_sim/config"))
        .json(&json!({"rate_limits": {"rpm": 0, "tpm": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let message = refused.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("rpm") && message.contains("tpm"),
        "{message}"
    );
    let unknown = sim
        .client
        .post(sim.url("/_sim/config"))
        .json(&json!({"latency_ms": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let shown: SimConfig = serde_json::from_value(sim.get_json("/_sim/config").await).unwrap();
    assert_eq!(
        shown,
        SimConfig {
            model: "sim-model".into(),
            ..config()
        }
    );

    // A patch changes only the sections it names.
    let changed = sim
        .configure(json!({"rate_limits": {"rpm": 600, "tpm": 1000}}))
        .await;
    assert_eq!(changed["model"], "sim-model");
    assert_eq!(
        changed["rate_limits"],
        json!({"rpm": 600, "tpm": 1000, "burst_ms": 60000})
    );
    let by_key: BTreeMap<String, Value> =
        serde_json::from_value(sim.get_json("/_sim/stats").await).unwrap();
    assert!(by_key.contains_key("paid_requests_by_key"));
    sim.stop().await;
}
