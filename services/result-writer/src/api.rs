//! The read API: a tenant's triages by ticket, as a filtered keyset-paginated list, and as a
//! live server-sent-event stream of rows as they are committed (resumed after `Last-Event-ID`);
//! agents' corrections of triages and the agreement they add up to; plus `/openapi.json`.
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
    auth::{ApiKeys, Identity},
    db::{After, AgreementCell, Correction, Feedback, ListFilter, ReplyUse, Store},
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
    paths(get_ticket_triage, list_triage, stream_triage, put_feedback, get_feedback, agreement),
    components(schemas(Triage, TriagePage, Problem, Feedback, FeedbackBody, ReplyUse, Agreement, AgreementRow, ConfusionCell)),
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
        .route(
            "/v1/tickets/{id}/feedback",
            get(get_feedback).put(put_feedback),
        )
        .route("/v1/feedback/agreement", get(agreement))
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

/// States whose requests are authenticated by the tenants' API keys.
pub trait HasKeys {
    fn keys(&self) -> &ApiKeys;
}

impl HasKeys for ApiState {
    fn keys(&self) -> &ApiKeys {
        &self.keys
    }
}

impl<S: HasKeys + Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Caller(identity) = Caller::from_request_parts(parts, state).await?;
        Ok(Tenant(identity.tenant))
    }
}

/// The tenant and role of the request's API key.
pub struct Caller(pub Identity);

impl<S: HasKeys + Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        state
            .keys()
            .identify_request(&parts.headers)
            .map(Caller)
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
    /// Only triages whose confidence is below this (0 to 1): the ones to check first.
    pub confidence_below: Option<String>,
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
    let time = parse_time;
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
    let confidence_below = params
        .confidence_below
        .map(|text| match text.parse::<f64>() {
            Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
            _ => Err(ApiError::BadRequest(
                "confidence_below must be a number from 0 to 1".into(),
            )),
        })
        .transpose()?;
    Ok(ListFilter {
        confidence_below,
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

/// The `id:` of a stream event: where the row stands in write order, so that a client that
/// reconnects with `Last-Event-ID` gets the rows written since.
fn event_id(triage: &Triage) -> String {
    encode_cursor(&After {
        triaged_at: triage.written_at,
        ticket_id: triage.ticket_id.clone(),
        prompt_version: triage.prompt_version.clone(),
    })
}

/// The position of a row in write order, to compare with a resume point.
fn write_position(triage: &Triage) -> (DateTime<Utc>, &str, &str) {
    (triage.written_at, &triage.ticket_id, &triage.prompt_version)
}

// Serialising a triage (strings, numbers, timestamps) cannot fail.
#[allow(clippy::expect_used)]
fn triage_event(triage: &Triage) -> Event {
    Event::default()
        .event("triage")
        .id(event_id(triage))
        .json_data(triage)
        .expect("a triage serialises")
}

/// Server-sent events: one `triage` event (JSON of the triage) per row of the tenant committed
/// after the client connected. A client that reconnects with the `Last-Event-ID` header first
/// gets the rows written since that event (up to `api.max_page_size`; beyond that a `lagged`
/// event says so), then the live ones. A `Last-Event-ID` this API never gave is refused with
/// 400 rather than silently ignored. A client too slow to keep up gets a `lagged` event with the
/// number of triages it missed (read them with `GET /v1/triage`).
#[utoipa::path(
    get,
    path = "/v1/triage/stream",
    params(("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "text/event-stream of `triage` events", body = Triage, content_type = "text/event-stream"),
        (status = 400, description = "Last-Event-ID is not one this API gave", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable (for a resume)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn stream_triage(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
    request_headers: axum::http::HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let resume = request_headers
        .get("last-event-id")
        .map(|value| {
            value.to_str().ok().and_then(decode_cursor).ok_or_else(|| {
                ApiError::BadRequest("Last-Event-ID is not one this API gave".into())
            })
        })
        .transpose()?;
    // Subscribe before reading the backlog, so that no row falls between the two.
    let published_rx = state.published_tx.subscribe();
    let mut backlog: Vec<Event> = Vec::new();
    let mut resumed_to = None;
    if let Some(after) = resume {
        let rows = state
            .store
            .written_after(&tenant, &after, state.max_page_size.saturating_add(1))
            .await?;
        let complete = rows.len() <= state.max_page_size as usize;
        for triage in rows.iter().take(state.max_page_size as usize) {
            backlog.push(triage_event(triage));
        }
        if !complete {
            backlog.push(
                Event::default()
                    .event("lagged")
                    .data("resume backlog truncated"),
            );
        }
        resumed_to = Some(
            rows.iter()
                .take(state.max_page_size as usize)
                .next_back()
                .map(|last| {
                    (
                        last.written_at,
                        last.ticket_id.clone(),
                        last.prompt_version.clone(),
                    )
                })
                .unwrap_or((after.triaged_at, after.ticket_id, after.prompt_version)),
        );
    }
    let client = StreamClient::open(state.metrics.clone());
    let mut shutdown = state.shutdown.clone();
    let live = futures::stream::unfold(
        (published_rx, tenant, client, resumed_to),
        |(mut published_rx, tenant, client, resumed_to)| async move {
            loop {
                let event = match published_rx.recv().await {
                    Ok(triage) if *triage.tenant_id == *tenant => {
                        // Already sent from the backlog.
                        if let Some((at, ticket, version)) = &resumed_to
                            && write_position(&triage) <= (*at, ticket.as_str(), version.as_str())
                        {
                            continue;
                        }
                        triage_event(&triage)
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Event::default().event("lagged").data(missed.to_string())
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((Ok(event), (published_rx, tenant, client, resumed_to)));
            }
        },
    );
    let events = futures::stream::iter(backlog.into_iter().map(Ok))
        .chain(live)
        .take_until(async move { shutdown.wait().await });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// A correction as an agent submits it. Accepting the triage is sending its own category and
/// priority.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    /// The triage's prompt version (a ticket has one triage per version).
    pub prompt_version: String,
    pub category: String,
    pub priority: String,
    /// What became of the suggested reply; `unset` when not said.
    #[serde(default = "reply_unset")]
    pub reply: ReplyUse,
}

fn reply_unset() -> ReplyUse {
    ReplyUse::Unset
}

const MAX_LABEL_CHARS: usize = 64;

/// Records an agent's correction of one of the tenant's triages (replacing an earlier one).
#[utoipa::path(
    put,
    path = "/v1/tickets/{id}/feedback",
    params(("id" = String, Path, description = "Ticket id")),
    request_body = FeedbackBody,
    responses(
        (status = 200, description = "The stored correction", body = Feedback),
        (status = 400, description = "The body is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No triage of this ticket and prompt version for this tenant", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_feedback(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(ticket_id): Path<String>,
    body: Result<Json<FeedbackBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Feedback>, ApiError> {
    let Json(body) = body.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    for (field, value) in [
        ("category", &body.category),
        ("priority", &body.priority),
        ("prompt_version", &body.prompt_version),
    ] {
        let chars = value.chars().count();
        if chars == 0 || chars > MAX_LABEL_CHARS || value.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "{field} must be 1 to {MAX_LABEL_CHARS} characters"
            )));
        }
    }
    let correction = Correction {
        prompt_version: body.prompt_version,
        category: body.category,
        priority: body.priority,
        reply: body.reply,
    };
    let stored = state
        .store
        .put_feedback(&tenant, &ticket_id, &correction)
        .await?
        .ok_or(ApiError::NotFound)?;
    state.metrics.feedback(&stored);
    tracing::debug!(ticket_id, prompt_version = %stored.prompt_version, "triage corrected");
    Ok(Json(stored))
}

/// The tenant's corrections of one ticket, one per prompt version, newest first.
#[utoipa::path(
    get,
    path = "/v1/tickets/{id}/feedback",
    params(("id" = String, Path, description = "Ticket id")),
    responses(
        (status = 200, description = "Corrections (empty when none)", body = [Feedback]),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_feedback(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(ticket_id): Path<String>,
) -> Result<Json<Vec<Feedback>>, ApiError> {
    Ok(Json(state.store.feedback(&tenant, &ticket_id).await?))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct AgreementParams {
    /// RFC 3339; corrections at or after (default: 7 days ago).
    pub since: Option<String>,
    /// RFC 3339; corrections before (default: now).
    pub until: Option<String>,
}

/// Agreement of agents with the triages over a window: accuracy of the category per prompt
/// version and per predicted category, and the confusion of predicted against corrected.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Agreement {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub corrections: i64,
    pub by_prompt_version: Vec<AgreementRow>,
    pub by_category: Vec<AgreementRow>,
    /// Non-zero cells only.
    pub confusion: Vec<ConfusionCell>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AgreementRow {
    /// The prompt version, or the predicted category.
    pub key: String,
    pub corrections: i64,
    /// Corrections that kept the predicted category.
    pub category_agreed: i64,
    /// `category_agreed / corrections`.
    pub accuracy: f64,
    /// Share of corrections that kept the predicted priority.
    pub priority_accuracy: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfusionCell {
    pub prompt_version: String,
    pub predicted: String,
    pub corrected: String,
    pub count: i64,
}

const DEFAULT_AGREEMENT_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// How well the triages agreed with the agents' corrections over a window.
#[utoipa::path(
    get,
    path = "/v1/feedback/agreement",
    params(AgreementParams),
    responses(
        (status = 200, description = "Accuracy and confusion", body = Agreement),
        (status = 400, description = "A parameter is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn agreement(
    State(state): State<ApiState>,
    Tenant(tenant): Tenant,
    params: Result<Query<AgreementParams>, QueryRejection>,
) -> Result<Json<Agreement>, ApiError> {
    let Query(params) = params.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let until = parse_time("until", params.until)?.unwrap_or_else(Utc::now);
    let since = parse_time("since", params.since)?.unwrap_or(until - DEFAULT_AGREEMENT_WINDOW);
    let cells = state.store.agreement_cells(&tenant, since, until).await?;
    Ok(Json(summarise(since, until, &cells)))
}

/// Accuracy rows and confusion cells from the counts.
pub fn summarise(since: DateTime<Utc>, until: DateTime<Utc>, cells: &[AgreementCell]) -> Agreement {
    use std::collections::BTreeMap;
    let mut by_version: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    let mut by_category: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    for cell in cells {
        let agreed = if cell.predicted == cell.corrected {
            cell.count
        } else {
            0
        };
        for entry in [
            by_version.entry(&cell.prompt_version).or_default(),
            by_category.entry(&cell.predicted).or_default(),
        ] {
            entry.0 += cell.count;
            entry.1 += agreed;
            entry.2 += cell.priority_kept;
        }
    }
    let rows = |map: BTreeMap<&str, (i64, i64, i64)>| -> Vec<AgreementRow> {
        map.into_iter()
            .map(|(key, (total, agreed, priority_kept))| AgreementRow {
                key: key.to_owned(),
                corrections: total,
                category_agreed: agreed,
                accuracy: ratio(agreed, total),
                priority_accuracy: ratio(priority_kept, total),
            })
            .collect()
    };
    Agreement {
        since,
        until,
        corrections: cells.iter().map(|cell| cell.count).sum(),
        by_prompt_version: rows(by_version),
        by_category: rows(by_category),
        confusion: cells
            .iter()
            .map(|cell| ConfusionCell {
                prompt_version: cell.prompt_version.clone(),
                predicted: cell.predicted.clone(),
                corrected: cell.corrected.clone(),
                count: cell.count,
            })
            .collect(),
    }
}

#[allow(clippy::cast_precision_loss)]
fn ratio(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn parse_time(name: &str, value: Option<String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|text| {
            DateTime::parse_from_rfc3339(&text)
                .map(|time| time.with_timezone(&Utc))
                .map_err(|_| ApiError::BadRequest(format!("{name} must be an RFC 3339 timestamp")))
        })
        .transpose()
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
    fn agreement_counts_become_accuracy_and_confusion() {
        let cell = |version: &str, predicted: &str, corrected: &str, count, kept| AgreementCell {
            prompt_version: version.into(),
            predicted: predicted.into(),
            corrected: corrected.into(),
            count,
            priority_kept: kept,
        };
        let now = Utc::now();
        let agreement = summarise(
            now,
            now,
            &[
                cell("v1", "billing", "billing", 3, 3),
                cell("v1", "login", "billing", 1, 0),
                cell("v2", "login", "login", 4, 2),
            ],
        );
        assert_eq!(agreement.corrections, 8);
        let v1 = &agreement.by_prompt_version[0];
        assert_eq!(
            (v1.key.as_str(), v1.corrections, v1.category_agreed),
            ("v1", 4, 3)
        );
        assert!((v1.accuracy - 0.75).abs() < 1e-9);
        let login = agreement
            .by_category
            .iter()
            .find(|r| r.key == "login")
            .unwrap();
        assert_eq!((login.corrections, login.category_agreed), (5, 4));
        assert!((login.priority_accuracy - 0.4).abs() < 1e-9);
        assert_eq!(agreement.confusion.len(), 3);
        assert!(summarise(now, now, &[]).by_prompt_version.is_empty());
    }

    #[test]
    fn problems_follow_rfc_9457() {
        let response = ApiError::Unauthenticated.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
