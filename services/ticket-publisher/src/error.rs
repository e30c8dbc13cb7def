//! The one error type of the ingress, and how it looks on each transport: an RFC 9457
//! `application/problem+json` answer over HTTP, a `tonic::Status` over gRPC. Both come from the
//! same [`ApiError::http_status`] / [`ApiError::grpc_code`] pair, so the two front doors cannot
//! disagree about what a failure means.

use std::time::Duration;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

/// One problem with one request field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `customer.id` or `metadata`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a request was not accepted.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid API key is required (Authorization: Bearer <key>)")]
    Unauthenticated,
    #[error("the tenant's ticket rate limit is exceeded; retry after {} s", retry_after_secs(*.retry_after))]
    RateLimited { retry_after: Duration },
    #[error("unsupported content type {content_type:?}; send application/json")]
    UnsupportedMediaType { content_type: String },
    #[error("the request is too large")]
    TooLarge { errors: Vec<FieldError> },
    #[error("the request is not well-formed: {detail}")]
    Malformed {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("the ticket is invalid")]
    Invalid { errors: Vec<FieldError> },
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInProgress,
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("the broker did not acknowledge the ticket in time; it was not accepted")]
    BrokerUnavailable { retry_after: Duration },
    #[error("the idempotency store is unavailable; retry later or send without Idempotency-Key")]
    IdempotencyStoreUnavailable { retry_after: Duration },
    #[error("internal error")]
    Internal,
}

fn retry_after_secs(duration: Duration) -> u64 {
    duration.as_secs_f64().ceil().max(1.0) as u64
}

/// The RFC 9457 body, with the `errors` extension naming the fields.
#[derive(Clone, Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl ApiError {
    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Malformed { .. } => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::IdempotencyInProgress => StatusCode::CONFLICT,
            ApiError::BrokerUnavailable { .. } | ApiError::IdempotencyStoreUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ApiError::Unauthenticated => tonic::Code::Unauthenticated,
            ApiError::RateLimited { .. } => tonic::Code::ResourceExhausted,
            ApiError::UnsupportedMediaType { .. }
            | ApiError::TooLarge { .. }
            | ApiError::Malformed { .. }
            | ApiError::Invalid { .. }
            | ApiError::IdempotencyKeyReused => tonic::Code::InvalidArgument,
            ApiError::IdempotencyInProgress => tonic::Code::Aborted,
            ApiError::BrokerUnavailable { .. } | ApiError::IdempotencyStoreUnavailable { .. } => {
                tonic::Code::Unavailable
            }
            ApiError::Internal => tonic::Code::Internal,
        }
    }

    /// The short name in the problem `type` and in metrics labels.
    pub fn slug(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::UnsupportedMediaType { .. } => "unsupported-media-type",
            ApiError::TooLarge { .. } => "too-large",
            ApiError::Malformed { .. } => "malformed",
            ApiError::Invalid { .. } => "invalid",
            ApiError::IdempotencyInProgress => "idempotency-in-progress",
            ApiError::IdempotencyKeyReused => "idempotency-key-reused",
            ApiError::BrokerUnavailable { .. } => "broker-unavailable",
            ApiError::IdempotencyStoreUnavailable { .. } => "idempotency-store-unavailable",
            ApiError::Internal => "internal",
        }
    }

    /// When the caller may try again, for `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after }
            | ApiError::BrokerUnavailable { retry_after }
            | ApiError::IdempotencyStoreUnavailable { retry_after } => Some(*retry_after),
            ApiError::IdempotencyInProgress => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ApiError::TooLarge { errors }
            | ApiError::Malformed { errors, .. }
            | ApiError::Invalid { errors } => errors,
            _ => &[],
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.http_status();
        Problem {
            kind: format!("urn:triage:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            errors: self.field_errors().to_vec(),
        }
    }

    pub fn into_status(self) -> tonic::Status {
        let problem = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut status = tonic::Status::with_details(
            self.grpc_code(),
            detail_with_fields(&self),
            problem.into(),
        );
        if let Some(retry_after) = self.retry_after()
            && let Ok(value) = retry_after_secs(retry_after).to_string().parse()
        {
            status.metadata_mut().insert("retry-after", value);
        }
        status
    }
}

/// The detail line plus the failing fields, for transports without a structured body.
fn detail_with_fields(error: &ApiError) -> String {
    let fields = error.field_errors();
    if fields.is_empty() {
        return error.to_string();
    }
    let listed: Vec<String> = fields
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    format!("{} ({})", error, listed.join("; "))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(retry_after) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(retry_after)),
            );
        }
        if matches!(self, ApiError::Unauthenticated) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_one_status_and_one_code() {
        let cases = [
            (ApiError::Unauthenticated, 401, tonic::Code::Unauthenticated),
            (
                ApiError::RateLimited {
                    retry_after: Duration::from_millis(10),
                },
                429,
                tonic::Code::ResourceExhausted,
            ),
            (
                ApiError::Invalid {
                    errors: vec![FieldError::new("subject", "required")],
                },
                422,
                tonic::Code::InvalidArgument,
            ),
            (
                ApiError::BrokerUnavailable {
                    retry_after: Duration::from_secs(2),
                },
                503,
                tonic::Code::Unavailable,
            ),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.http_status().as_u16(), status);
            assert_eq!(error.grpc_code(), code);
            let grpc = error.clone().into_status();
            assert_eq!(grpc.code(), code);
            let problem: Problem = serde_json::from_slice(grpc.details()).unwrap();
            assert_eq!(problem.status, status);
            assert_eq!(problem.errors, error.field_errors());
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let status = ApiError::RateLimited {
            retry_after: Duration::from_millis(1),
        }
        .into_status();
        assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
    }
}
