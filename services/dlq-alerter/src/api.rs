//! The dead-letter API, which the triage console calls: a tenant's recent dead letters as the
//! Slack alerts show them (same [`DeadLetterAlert`], same redaction), and the replay of one of
//! them, which is exactly `dlq-alerter replay --tenant <key's tenant> --id <id> --execute`.
//!
//! # Where the dead letters come from
//! The dead-letter topic itself, read by assignment from the last
//! `api.recent_per_partition` records of each partition (see [`replay::read_matches`]): no
//! second copy to keep in step, nothing written on the alerting path, and the listing is what
//! replay will find. Dead letters older than that window (or than the topic's retention) are
//! not listed; the `replay` command reaches all of them.
//!
//! # Who may do what
//! Every request needs an API key (as the read API: `Authorization: Bearer` or `X-API-Key`)
//! and sees only its tenant's dead letters. Replay needs the key's `admin` role; each replay is
//! logged with the key's tenant and the dead letter's id.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use triage_runtime::auth::{ApiKeys, Identity, Role};

use crate::{
    Config,
    alert::{AlertSettings, DeadLetterAlert, Position},
    replay::{self, ReplayArgs},
};

#[derive(Clone)]
pub struct DeadLetterApi {
    pub config: Arc<Config>,
    pub keys: ApiKeys,
}

pub fn router(state: DeadLetterApi) -> Router {
    Router::new()
        .route("/v1/dead-letters", get(list))
        .route("/v1/dead-letters/{id}/replay", post(replay_one))
        .with_state(state)
}

/// Why a request was not answered with data; an RFC 9457 problem.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterApiError {
    #[error("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")]
    Unauthenticated,
    #[error("replaying dead letters needs an API key with the admin role")]
    Forbidden,
    #[error("no dead letter with this id for this tenant")]
    NotFound,
    #[error("the dead letter cannot be replayed: {0}")]
    NotReplayable(String),
    #[error("limit must be a number from 1 to {0}")]
    BadLimit(usize),
    #[error("the dead-letter topic cannot be read or written now; retry later")]
    Unavailable,
}

impl DeadLetterApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::NotReplayable(_) => StatusCode::CONFLICT,
            Self::BadLimit(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::NotReplayable(_) => "not-replayable",
            Self::BadLimit(_) => "bad-request",
            Self::Unavailable => "unavailable",
        }
    }
}

impl IntoResponse for DeadLetterApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({
            "type": format!("urn:triage:problem:{}", self.slug()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let mut response = (status, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

fn caller(state: &DeadLetterApi, headers: &HeaderMap) -> Result<Identity, DeadLetterApiError> {
    state
        .keys
        .identify_request(headers)
        .ok_or(DeadLetterApiError::Unauthenticated)
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub limit: Option<String>,
}

/// Recent dead letters, newest first.
#[derive(Debug, Serialize)]
pub struct DeadLetterList {
    pub items: Vec<DeadLetterAlert>,
    /// How many records at the end of each partition were read.
    pub recent_per_partition: i64,
}

async fn list(
    State(state): State<DeadLetterApi>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Json<DeadLetterList>, DeadLetterApiError> {
    let identity = caller(&state, &headers)?;
    let max_items = state.config.api.max_items;
    let limit = match params.limit.as_deref() {
        None => max_items,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=max_items).contains(&limit) => limit,
            _ => return Err(DeadLetterApiError::BadLimit(max_items)),
        },
    };
    let filter = ReplayArgs {
        tenant: Some(identity.tenant.to_string()),
        ..Default::default()
    };
    let config = Arc::clone(&state.config);
    let tail = config.api.recent_per_partition;
    let (mut matches, _, _) = tokio::task::spawn_blocking(move || {
        replay::read_matches(
            &config.kafka,
            &config.topics.dead_letters,
            &filter,
            Some(tail),
        )
    })
    .await
    .map_err(|_| DeadLetterApiError::Unavailable)?
    .map_err(|error| {
        tracing::warn!(error = %error, "cannot read the dead-letter topic for the API");
        DeadLetterApiError::Unavailable
    })?;
    matches.sort_by(|a, b| {
        b.dead_letter
            .last_failure_at
            .as_ref()
            .map(|t| (t.seconds, t.nanos))
            .cmp(
                &a.dead_letter
                    .last_failure_at
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos)),
            )
    });
    let settings = AlertSettings::from_config(&state.config);
    let items = matches
        .iter()
        .take(limit)
        .map(|listed| {
            DeadLetterAlert::from_dead_letter(
                &listed.dead_letter,
                Position {
                    topic: state.config.topics.dead_letters.clone(),
                    partition: listed.partition,
                    offset: listed.offset,
                },
                &settings,
            )
        })
        .collect();
    Ok(Json(DeadLetterList {
        items,
        recent_per_partition: tail,
    }))
}

/// What a replay did.
#[derive(Debug, Serialize)]
pub struct ReplayOutcome {
    pub dead_letter_id: String,
    pub replayed: bool,
}

async fn replay_one(
    State(state): State<DeadLetterApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ReplayOutcome>, DeadLetterApiError> {
    let identity = caller(&state, &headers)?;
    if identity.role != Role::Admin {
        tracing::warn!(tenant = %identity.tenant, dead_letter_id = %id, "replay refused: the key has no admin role");
        return Err(DeadLetterApiError::Forbidden);
    }
    let args = ReplayArgs {
        tenant: Some(identity.tenant.to_string()),
        id: Some(id.clone()),
        execute: true,
        ..Default::default()
    };
    let mut listing = Vec::new();
    let report = replay::replay(&state.config, &args, &mut listing)
        .await
        .map_err(|error| {
            tracing::warn!(tenant = %identity.tenant, dead_letter_id = %id, error = %error, "replay from the API failed");
            DeadLetterApiError::Unavailable
        })?;
    if let Some((_, reason)) = report.skipped.first() {
        return Err(DeadLetterApiError::NotReplayable(reason.clone()));
    }
    if report.replayed.is_empty() {
        return Err(DeadLetterApiError::NotFound);
    }
    tracing::info!(tenant = %identity.tenant, dead_letter_id = %id, "dead letter replayed from the API");
    Ok(Json(ReplayOutcome {
        dead_letter_id: id,
        replayed: true,
    }))
}
