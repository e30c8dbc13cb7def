//! The read API: a tenant's triages by ticket, as a filtered keyset-paginated list, and as a
//! live server-sent-event stream of rows as they are committed; plus `/openapi.json`.
//!
//! # Tenants
//! Every `/v1` request needs an API key (`Authorization: Bearer <key>` or `X-API-Key`), which
//! names one tenant; every query is limited to that tenant's rows. Another tenant's ticket answers
//! 404, exactly like a missing one, so that the API never confirms it exists.

use std::{convert::Infallible, sync::Arc};

use axum::{
    Json, Router,
    extract::{FromRequestParts, Path, Query, State, rejection::QueryRejection},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use triage_runtime::shutdown::Shutdown;
use utoipa::{
    IntoParams, Modify, OpenApi, ToSchema,
    openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme},
};

use crate::{
    auth::{self, ApiKeys},
    db::{After, ListFilter, Store},
    metrics::WriterMetrics,
    triage::Triage,
};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub keys: ApiKeys,
    /// Every committed triage, all tenants; each stream filters its own.
    pub published_tx: broadcast::Sender<Arc<Triage>>,
    pub max_page_size: u32,
    pub metrics: WriterMetrics,
    /// Ends the live streams, so that the server can stop.
    pub shutdown: Shutdown,
}

/// The OpenAPI document, generated from the handlers and types below.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "result-writer",
        description = "Read API of the triage pipeline: each tenant reads its own tickets' triages, as they are committed to PostgreSQL."
    ),
    paths(get_ticket_triage, list_triage, stream_triage),
    components(schemas(Triage, TriagePage, Problem)),
    modifiers(&KeyAuth),
    security(("bearer" = []), ("api_key" = []))
)]
pub struct ApiDoc;

struct KeyAuth;

impl Modify for KeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/tickets/{id}/triage", get(get_ticket_triage))
        .route("/v1/triage", get(list_triage))
        .route("/v1/triage/stream", get(stream_triage))
        .route("/openapi.json", get(openapi_json))
        .with_state(state)
}

async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// An RFC 9457 problem.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Why a request was not answered with data.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")]
    Unauthenticated,
    #[error("no triage for this ticket")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("the database is unavailable; retry later")]
    Unavailable,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::NotFound => "not-found",
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unavailable => "unavailable",
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status();
        Problem {
            kind: format!("urn:triage:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.problem())).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if matches!(self, ApiError::Unauthenticated) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self, ApiError::Unavailable) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(error: crate::db::DbError) -> Self {
        tracing::warn!(error = %error, "read query failed");
        ApiError::Unavailable
    }
}

/// The tenant whose API key came with the request.
pub struct Tenant(pub Arc<str>);

impl FromRequestParts<ApiState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(auth::bearer_token);
        let presented = bearer.or_else(|| {
            parts
                .headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|key| !key.is_empty())
        });
        presented
            .and_then(|key| state.keys.tenant_of(key))
            .map(Tenant)
            .ok_or(ApiError::Unauthenticated)
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct TicketParams {
    /// Only this prompt version; by default the latest triage of any version.
    pub prompt_version: Option<String>,
}

/// The latest triage of one of the tenant's tickets.
#[utoipa::path(
    get,
    path = "/v1/tickets/{id}/triage",
    params(("id" = String, Path, description = "Ticket id"), TicketParams),
    responses(
        (status = 200, description = "The ticket's latest triage", body = Triage),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No triage of this ticket for this tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_ticket_triage(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(ticket_id): Path<String>,
    params: Result<Query<TicketParams>, QueryRejection>,
) -> Result<Json<Triage>, ApiError> {
    let Query(params) = params.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    state
        .store
        .ticket(&tenant, &ticket_id, params.prompt_version.as_deref())
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct ListParams {
    pub category: Option<String>,
    pub priority: Option<String>,
    /// RFC 3339; triaged at or after.
    pub since: Option<String>,
    /// RFC 3339; triaged before.
    pub until: Option<String>,
    /// Page size, 1 to `api.max_page_size` (default 50).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of triages, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TriagePage {
    pub items: Vec<Triage>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

const DEFAULT_PAGE_SIZE: u32 = 50;

/// The tenant's triages, newest first (by `triaged_at`), filtered and paginated by cursor.
#[utoipa::path(
    get,
    path = "/v1/triage",
    params(ListParams),
    responses(
        (status = 200, description = "One page", body = TriagePage),
        (status = 400, description = "A parameter is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_triage(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<TriagePage>, ApiError> {
    let Query(params) = params.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let filter = list_filter(params, state.max_page_size)?;
    let mut items = state.store.list(&tenant, &filter).await?;
    let next_cursor = if items.len() > filter.limit as usize {
        items.truncate(filter.limit as usize);
        items.last().map(|last| {
            encode_cursor(&After {
                triaged_at: last.triaged_at,
                ticket_id: last.ticket_id.clone(),
                prompt_version: last.prompt_version.clone(),
            })
        })
    } else {
        None
    };
    Ok(Json(TriagePage { items, next_cursor }))
}

fn list_filter(params: ListParams, max_page_size: u32) -> Result<ListFilter, ApiError> {
    let time = |name: &str, value: Option<String>| -> Result<Option<DateTime<Utc>>, ApiError> {
        value
            .map(|text| {
                DateTime::parse_from_rfc3339(&text)
                    .map(|time| time.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::BadRequest(format!("{name} must be an RFC 3339 timestamp"))
                    })
            })
            .transpose()
    };
    let limit = match params.limit {
        None => DEFAULT_PAGE_SIZE.min(max_page_size),
        Some(text) => match text.parse::<u32>() {
            Ok(0) | Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be a number from 1 to {max_page_size}"
                )));
            }
            Ok(limit) => limit.min(max_page_size),
        },
    };
    Ok(ListFilter {
        category: params.category,
        priority: params.priority,
        since: time("since", params.since)?,
        until: time("until", params.until)?,
        after: params
            .cursor
            .map(|cursor| {
                decode_cursor(&cursor)
                    .ok_or_else(|| ApiError::BadRequest("cursor is not one this API gave".into()))
            })
            .transpose()?,
        limit,
    })
}

#[derive(Serialize, Deserialize)]
struct CursorBody {
    t: DateTime<Utc>,
    i: String,
    v: String,
}

/// An opaque cursor: base64url of the last row's keyset position.
// Serialising a struct of a timestamp and two strings cannot fail.
#[allow(clippy::expect_used)]
pub fn encode_cursor(after: &After) -> String {
    let body = CursorBody {
        t: after.triaged_at,
        i: after.ticket_id.clone(),
        v: after.prompt_version.clone(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).expect("a cursor serialises"))
}

pub fn decode_cursor(cursor: &str) -> Option<After> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let body: CursorBody = serde_json::from_slice(&bytes).ok()?;
    Some(After {
        triaged_at: body.t,
        ticket_id: body.i,
        prompt_version: body.v,
    })
}

/// Server-sent events: one `triage` event (JSON of the triage) per row of the tenant committed
/// after the client connected. A client too slow to keep up gets a `lagged` event with the
/// number of triages it missed (read them with `GET /v1/triage`).
#[utoipa::path(
    get,
    path = "/v1/triage/stream",
    responses(
        (status = 200, description = "text/event-stream of `triage` events", body = Triage, content_type = "text/event-stream"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
    )
)]
// Serialising a triage (strings, numbers, timestamps) cannot fail.
#[allow(clippy::expect_used)]
pub async fn stream_triage(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let published_rx = state.published_tx.subscribe();
    let client = StreamClient::open(state.metrics.clone());
    let mut shutdown = state.shutdown.clone();
    let events = futures::stream::unfold(
        (published_rx, tenant, client),
        |(mut published_rx, tenant, client)| async move {
            loop {
                let event = match published_rx.recv().await {
                    Ok(triage) if *triage.tenant_id == *tenant => Event::default()
                        .event("triage")
                        .id(format!("{}/{}", triage.ticket_id, triage.prompt_version))
                        .json_data(&*triage)
                        .expect("a triage serialises"),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Event::default().event("lagged").data(missed.to_string())
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((Ok(event), (published_rx, tenant, client)));
            }
        },
    )
    .take_until(async move { shutdown.wait().await });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Counts an open stream for as long as it lives.
struct StreamClient(WriterMetrics);

impl StreamClient {
    fn open(metrics: WriterMetrics) -> Self {
        metrics.stream_clients.inc();
        StreamClient(metrics)
    }
}

impl Drop for StreamClient {
    fn drop(&mut self) {
        self.0.stream_clients.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let after = After {
            triaged_at: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
            ticket_id: "t-1/ü".into(),
            prompt_version: "v2".into(),
        };
        let cursor = encode_cursor(&after);
        assert!(!cursor.contains("t-1"), "opaque: {cursor}");
        assert_eq!(decode_cursor(&cursor), Some(after));
        assert_eq!(decode_cursor("not a cursor"), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode(b"{}")), None);
    }

    #[test]
    fn list_parameters_are_checked() {
        let filter = list_filter(
            ListParams {
                since: Some("2026-01-01T00:00:00Z".into()),
                limit: Some("9999".into()),
                ..Default::default()
            },
            500,
        )
        .unwrap();
        assert_eq!(filter.limit, 500);
        assert!(filter.since.is_some());
        for bad in [
            ListParams {
                limit: Some("0".into()),
                ..Default::default()
            },
            ListParams {
                until: Some("yesterday".into()),
                ..Default::default()
            },
            ListParams {
                cursor: Some("%%%".into()),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                list_filter(bad, 500),
                Err(ApiError::BadRequest(_))
            ));
        }
    }

    #[test]
    fn problems_follow_rfc_9457() {
        let response = ApiError::Unauthenticated.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
