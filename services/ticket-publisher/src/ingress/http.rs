//! The HTTP API: `POST /v1/tickets`, `POST /v1/tickets:batch` and `GET /openapi.json`.

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use opentelemetry::propagation::Extractor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};

use super::{Accepted, Ingress};
use crate::{
    auth,
    error::{ApiError, FieldError, Problem},
    idempotency::{StoredAnswer, fingerprint},
    ticket::{self, BatchBody, CreateTicketBody, CustomerBody},
};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
const TRANSPORT: &str = "http";

/// The OpenAPI document, generated from the handlers and types below.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ticket-publisher",
        description = "Ticket ingress of the triage pipeline: each accepted ticket is on events.tickets.created, acknowledged by the broker, before the answer."
    ),
    paths(create_ticket, create_tickets_batch),
    components(schemas(
        CreateTicketBody,
        CustomerBody,
        BatchBody,
        Accepted,
        Problem,
        FieldError,
        BatchResponse,
        BatchItem
    )),
    modifiers(&BearerAuth),
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// One item of a batch answer: `status` 202 with where the ticket was stored, or the problem.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    pub status: u16,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Accepted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// The answer to a batch: one item per submitted ticket, in order.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub results: Vec<BatchItem>,
}

/// The HTTP API on `ingress`.
pub fn router(ingress: Ingress) -> Router {
    Router::new()
        .route("/v1/tickets", post(create_ticket))
        .route("/v1/tickets:batch", post(create_tickets_batch))
        .route("/openapi.json", get(openapi_json))
        .with_state(ingress)
}

async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// Submit one ticket.
///
/// Answers 202 only once the broker acknowledged the record; the body says where it is.
#[utoipa::path(
    post,
    path = "/v1/tickets",
    request_body(content = CreateTicketBody, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key get the first answer and write nothing new")),
    responses(
        (status = 202, description = "On the topic, acknowledged by the broker", body = Accepted),
        (status = 400, description = "Not UTF-8, not JSON, or nested too deep", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The same Idempotency-Key is still in progress", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or a field over its size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content type is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing or invalid", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Tenant rate limit; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Broker or idempotency store unavailable; nothing was accepted; see Retry-After", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_ticket(
    State(ingress): State<Ingress>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (span, trace) = request_span("create_ticket", &headers);
    let outcome = async {
        let tenant = ingress.authenticate(api_key(&headers))?;
        ingress.admit(&tenant, 1).await?;
        ticket::check_json_content_type(content_type(&headers))?;
        let bytes = read_body(body, ingress.max_body_bytes()).await?;
        let valid = ticket::decode_http(content_type(&headers), &bytes, ingress.limits())?;
        let key = idempotency_key(&headers)?;
        ingress
            .idempotent(&tenant, key, &fingerprint(&[b"single", &bytes]), || async {
                let accepted = ingress.publish(&tenant, valid, &trace).await?;
                Ok((202, serde_json::to_value(accepted).unwrap_or(Value::Null)))
            })
            .await
    }
    .instrument(span)
    .await;
    respond(&ingress, outcome)
}

/// Submit many tickets; each is answered on its own.
///
/// The answer is 200 with one item per ticket, in order: 202 and where it is stored, or the
/// problem with that ticket. An `Idempotency-Key` covers the whole batch.
#[utoipa::path(
    post,
    path = "/v1/tickets:batch",
    request_body(content = BatchBody, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key get the first answer and write nothing new")),
    responses(
        (status = 200, description = "One result per ticket", body = BatchResponse),
        (status = 400, description = "Not UTF-8, not JSON, or nested too deep", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over its size limit or too many tickets", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content type is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a batch", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Tenant rate limit; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Idempotency store unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_tickets_batch(
    State(ingress): State<Ingress>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (span, trace) = request_span("create_tickets_batch", &headers);
    let outcome = async {
        let tenant = ingress.authenticate(api_key(&headers))?;
        ticket::check_json_content_type(content_type(&headers))?;
        let bytes = read_body(body, ingress.max_body_bytes()).await?;
        let value = ticket::parse_json(&bytes, ingress.limits())?;
        let Some(items) = value.get("tickets").and_then(Value::as_array) else {
            return Err(ApiError::Invalid {
                errors: vec![FieldError::new(
                    "tickets",
                    "is required and must be an array",
                )],
            });
        };
        if items.len() > ingress.max_batch_items() {
            return Err(ApiError::TooLarge {
                errors: vec![FieldError::new(
                    "tickets",
                    format!(
                        "has {} tickets; the limit is {}",
                        items.len(),
                        ingress.max_batch_items()
                    ),
                )],
            });
        }
        ingress.admit(&tenant, items.len()).await?;
        let key = idempotency_key(&headers)?;
        ingress
            .idempotent(&tenant, key, &fingerprint(&[b"batch", &bytes]), || async {
                let results =
                    futures::future::join_all(items.iter().enumerate().map(|(index, item)| {
                        let (ingress, tenant, trace) = (&ingress, &tenant, &trace);
                        async move {
                            let prefix = format!("tickets[{index}].");
                            let outcome = match ticket::from_json(item, &prefix, ingress.limits()) {
                                Ok(valid) => ingress.publish(tenant, valid, trace).await,
                                Err(error) => Err(error),
                            };
                            match outcome {
                                Ok(accepted) => {
                                    ingress.metrics().record(TRANSPORT, "accepted");
                                    BatchItem {
                                        status: 202,
                                        accepted: Some(accepted),
                                        problem: None,
                                    }
                                }
                                Err(error) => {
                                    ingress.metrics().record(TRANSPORT, error.slug());
                                    BatchItem {
                                        status: error.http_status().as_u16(),
                                        accepted: None,
                                        problem: Some(error.problem()),
                                    }
                                }
                            }
                        }
                    }))
                    .await;
                let response = BatchResponse { results };
                Ok((200, serde_json::to_value(response).unwrap_or(Value::Null)))
            })
            .await
    }
    .instrument(span)
    .await;
    match outcome {
        Ok(answer) => stored_response(answer),
        Err(error) => {
            ingress.metrics().record(TRANSPORT, error.slug());
            error.into_response()
        }
    }
}

fn respond(ingress: &Ingress, outcome: Result<StoredAnswer, ApiError>) -> Response {
    match outcome {
        Ok(answer) => {
            ingress.metrics().record(TRANSPORT, "accepted");
            stored_response(answer)
        }
        Err(error) => {
            ingress.metrics().record(TRANSPORT, error.slug());
            error.into_response()
        }
    }
}

fn stored_response(answer: StoredAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    (status, Json(answer.body)).into_response()
}

/// The request's span, continuing the caller's `traceparent` when it sent one, and the trace
/// context to put on the record.
fn request_span(
    name: &'static str,
    headers: &HeaderMap,
) -> (tracing::Span, opentelemetry::Context) {
    let span = tracing::info_span!("ingress", otel.name = name, transport = TRANSPORT);
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    let _ = span.set_parent(parent.clone());
    let trace = super::record_trace(&span, parent);
    (span, trace)
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// `Authorization: Bearer <key>`, or `X-API-Key: <key>`.
fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        return value.to_str().ok().and_then(auth::bearer_token);
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty())
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    match headers.get(IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(value) => value.to_str().map(Some).map_err(|_| ApiError::Malformed {
            detail: "Idempotency-Key must be printable ASCII".into(),
            errors: vec![FieldError::new(
                "Idempotency-Key",
                "must be printable ASCII",
            )],
        }),
    }
}

/// Reads the body, refusing more than `limit` bytes without buffering them.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
            || error.to_string().contains("length limit");
        if too_large {
            ApiError::TooLarge {
                errors: vec![FieldError::new(
                    "$",
                    format!("the body is over {limit} bytes"),
                )],
            }
        } else {
            ApiError::Malformed {
                detail: "the body could not be read".into(),
                errors: Vec::new(),
            }
        }
    })
}
