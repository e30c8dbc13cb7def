//! The triage console: a page for support agents and leads, served under `/console` beside the
//! read API it calls. Its HTML, CSS and JavaScript are compiled into the binary (no build step,
//! no CDN), and every response carries a Content-Security-Policy that lets the page load only
//! its own files and talk only to its own origin.
//!
//! The page authenticates every call with the same API key as the read API (kept in the tab's
//! session storage). The dead-letter page and the health page are forwarded to dlq-alerter's
//! dead-letter API and lag-autoscaler's lag report, so that the browser needs one origin and
//! one key; dlq-alerter checks the key (and the admin role for a replay) again itself. The
//! health page's throughput and rate-limit waits are the tenant's own rows of `triage_results`
//! (see [`crate::throughput`]), answered here.

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, Request, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::{
    api::{ApiError, Caller, HasKeys, PROBLEM_JSON, Problem, Tenant},
    auth::{ApiKeys, Role},
    config::ConsoleConfig,
    db::Store,
    throughput::{self, DEFAULT_MINUTES, MAX_MINUTES, Throughput, Window},
};

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");
const ICON_SVG: &str = include_str!("../console/icon.svg");

/// Only the console's own files and origin; no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'none'; \
    frame-ancestors 'none'; base-uri 'none'";

#[derive(Clone)]
pub struct ConsoleState {
    pub store: Store,
    pub keys: ApiKeys,
    pub config: ConsoleConfig,
    pub http: reqwest::Client,
}

impl HasKeys for ConsoleState {
    fn keys(&self) -> &ApiKeys {
        &self.keys
    }
}

pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/console/icon.svg",
            get(|| async { asset(ICON_SVG, "image/svg+xml") }),
        )
        .route("/console/settings.json", get(settings))
        .route("/console/api/whoami", get(whoami))
        .route("/console/api/dead-letters", get(dead_letters))
        .route("/console/api/dead-letters/{id}/replay", post(replay))
        .route("/console/api/lag", get(lag))
        .route("/console/api/throughput", get(throughput))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// What the page needs to know about this deployment; no secret in it.
#[derive(Serialize)]
struct Settings<'a> {
    trace_url: Option<&'a str>,
    /// The pipeline's default taxonomy, offered when correcting a triage.
    categories: &'static [&'static str],
    priorities: &'static [&'static str],
    dead_letters: bool,
    health: bool,
}

async fn settings(State(state): State<ConsoleState>) -> Response {
    Json(Settings {
        trace_url: state.config.trace_url.as_deref(),
        categories: &triage_proto::DEFAULT_CATEGORIES,
        priorities: &triage_proto::DEFAULT_PRIORITIES,
        dead_letters: state.config.dead_letters_url.is_some(),
        health: state.config.lag_url.is_some(),
    })
    .into_response()
}

/// The tenant and role of the key, so the page can say whose data it shows.
async fn whoami(Caller(identity): Caller) -> Response {
    Json(serde_json::json!({
        "tenant": &*identity.tenant,
        "admin": identity.role == Role::Admin,
    }))
    .into_response()
}

/// A console page whose upstream is not configured or not answering.
fn upstream_problem(status: StatusCode, detail: &str) -> Response {
    let problem = Problem {
        kind: "urn:triage:problem:upstream".into(),
        title: status.canonical_reason().unwrap_or("Error").into(),
        status: status.as_u16(),
        detail: detail.into(),
    };
    let mut response = (status, Json(problem)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

/// Forwards a request with the caller's key and answers with what came back, status included.
async fn forward(
    state: &ConsoleState,
    request: reqwest::RequestBuilder,
    headers: &HeaderMap,
    what: &str,
) -> Response {
    let mut request = request.timeout(state.config.upstream_timeout);
    for name in [header::AUTHORIZATION, HeaderName::from_static("x-api-key")] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(upstream = what, error = %error.without_url(), "console upstream unreachable");
            return upstream_problem(
                StatusCode::BAD_GATEWAY,
                &format!("{what} does not answer; retry later"),
            );
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok())
        .unwrap_or(HeaderValue::from_static("application/json"));
    match answer.bytes().await {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, content_type)],
            Body::from(body),
        )
            .into_response(),
        Err(_) => upstream_problem(
            StatusCode::BAD_GATEWAY,
            &format!("{what} broke off its answer; retry later"),
        ),
    }
}

async fn dead_letters(
    State(state): State<ConsoleState>,
    _tenant: Tenant,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let Some(base) = &state.config.dead_letters_url else {
        return upstream_problem(
            StatusCode::NOT_FOUND,
            "the dead-letter page is not configured (console.dead_letters_url)",
        );
    };
    let mut url = format!("{}/v1/dead-letters", base.trim_end_matches('/'));
    if let Some(query) = query {
        url.push('?');
        url.push_str(&query);
    }
    forward(&state, state.http.get(url), &headers, "dlq-alerter").await
}

async fn replay(
    State(state): State<ConsoleState>,
    _tenant: Tenant,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(base) = &state.config.dead_letters_url else {
        return upstream_problem(
            StatusCode::NOT_FOUND,
            "the dead-letter page is not configured (console.dead_letters_url)",
        );
    };
    let mut url = match reqwest::Url::parse(base) {
        Ok(url) => url,
        Err(_) => {
            return upstream_problem(
                StatusCode::BAD_GATEWAY,
                "console.dead_letters_url is invalid",
            );
        }
    };
    // The id is one path segment, escaped as such whatever it holds.
    if let Ok(mut segments) = url.path_segments_mut() {
        segments
            .pop_if_empty()
            .extend(["v1", "dead-letters", &id, "replay"]);
    }
    forward(&state, state.http.post(url), &headers, "dlq-alerter").await
}

async fn lag(State(state): State<ConsoleState>, tenant: Result<Tenant, ApiError>) -> Response {
    if let Err(error) = tenant {
        return error.into_response();
    }
    let Some(url) = &state.config.lag_url else {
        return upstream_problem(
            StatusCode::NOT_FOUND,
            "consumer lag is not configured (console.lag_url)",
        );
    };
    // The lag report holds no tenant data and needs no key.
    forward(
        &state,
        state.http.get(url),
        &HeaderMap::new(),
        "lag-autoscaler",
    )
    .await
}

#[derive(Debug, Default, Deserialize)]
struct ThroughputParams {
    /// The window, in minutes up to and including the current one.
    minutes: Option<String>,
}

/// The caller's tenant's triages per minute over the last `minutes` (1 to 1440, default 15), and
/// how many waited for rate limits and how long.
async fn throughput(
    State(state): State<ConsoleState>,
    Tenant(tenant): Tenant,
    params: Result<Query<ThroughputParams>, QueryRejection>,
) -> Result<Json<Throughput>, ApiError> {
    let Query(params) = params.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let minutes = window_minutes(params.minutes.as_deref())?;
    let window = Window::ending_at(Utc::now(), minutes);
    let counts = state
        .store
        .throughput(&tenant, window.since, window.until)
        .await?;
    Ok(Json(throughput::assemble(window, &counts)))
}

fn window_minutes(text: Option<&str>) -> Result<u32, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_MINUTES);
    };
    match text.parse::<u32>() {
        Ok(minutes) if (1..=MAX_MINUTES).contains(&minutes) => Ok(minutes),
        _ => Err(ApiError::BadRequest(format!(
            "minutes must be a whole number from 1 to {MAX_MINUTES}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;
    use tower::ServiceExt;

    use super::*;

    fn console() -> Router {
        // Never connected: these tests stop before any query.
        let database = crate::config::DatabaseConfig {
            url: triage_runtime::config::Secret::new("postgres://nobody@127.0.0.1:1/none"),
            ..Default::default()
        };
        router(ConsoleState {
            store: Store::new(crate::db::connect(&database).unwrap()),
            keys: ApiKeys::from_plain_with_roles(&[("acme", "k-admin", Role::Admin)]),
            config: ConsoleConfig::default(),
            http: reqwest::Client::new(),
        })
    }

    async fn get(path: &str, key: Option<&str>) -> Response {
        let mut request = axum::http::Request::get(path);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        console()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_page_is_served_with_a_strict_policy_and_no_outside_source() {
        let response = get("/console/", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("/console/app.js"));
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(!text.contains("https://"), "nothing from another origin");
        }
        assert!(!INDEX_HTML.contains("=\"http"), "no CDN");
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
        assert!(!INDEX_HTML.contains("style="), "no inline style");
    }

    #[tokio::test]
    async fn whoami_needs_a_key_and_names_tenant_and_role() {
        assert_eq!(
            get("/console/api/whoami", None).await.status(),
            StatusCode::UNAUTHORIZED
        );
        let response = get("/console/api/whoami", Some("k-admin")).await;
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let who: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(who, serde_json::json!({"tenant": "acme", "admin": true}));
    }

    #[tokio::test]
    async fn a_throughput_window_out_of_range_is_a_problem() {
        assert_eq!(
            get("/console/api/throughput", None).await.status(),
            StatusCode::UNAUTHORIZED
        );
        for bad in ["0", "1441", "-3", "ten", "1.5"] {
            let response = get(
                &format!("/console/api/throughput?minutes={bad}"),
                Some("k-admin"),
            )
            .await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert!(
                String::from_utf8_lossy(&body).contains("1 to 1440"),
                "{bad}"
            );
        }
        assert_eq!(window_minutes(None).unwrap(), DEFAULT_MINUTES);
        assert_eq!(window_minutes(Some("1440")).unwrap(), 1440);
    }

    #[tokio::test]
    async fn an_unconfigured_upstream_is_said_plainly() {
        let response = get("/console/api/dead-letters", Some("k-admin")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("console.dead_letters_url"));
    }
}
