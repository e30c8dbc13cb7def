//! `GET /api/v1/lag` (every group, keyed by group id) and `GET /api/v1/lag/{group}` on the
//! admin port: plain JSON for KEDA's `metrics-api` scaler and for people.
//!
//! A KEDA trigger reads one number with a GJSON `valueLocation`, e.g.
//! `url: http://lag-autoscaler:9090/api/v1/lag`, `valueLocation: groups.inference-worker.lag`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::snapshot::{GroupLag, LagSnapshot};

#[derive(Serialize)]
struct LagReport<'a> {
    /// When the offsets were read (RFC 3339); absent before the first poll.
    taken_at: Option<String>,
    groups: BTreeMap<&'a str, &'a GroupLag>,
}

pub fn router(snapshot: watch::Receiver<Arc<LagSnapshot>>) -> Router {
    Router::new()
        .route("/api/v1/lag", get(all_groups))
        .route("/api/v1/lag/{group}", get(one_group))
        .with_state(snapshot)
}

async fn all_groups(State(snapshot): State<watch::Receiver<Arc<LagSnapshot>>>) -> Response {
    let snapshot = Arc::clone(&snapshot.borrow());
    let taken_at = (snapshot.taken_at_ms > 0)
        .then(|| Timestamp::from_millisecond(snapshot.taken_at_ms).ok())
        .flatten()
        .map(|t| t.to_string());
    let report = LagReport {
        taken_at,
        groups: snapshot
            .groups
            .iter()
            .map(|g| (g.group.as_str(), g))
            .collect(),
    };
    Json(report).into_response()
}

async fn one_group(
    State(snapshot): State<watch::Receiver<Arc<LagSnapshot>>>,
    Path(group): Path<String>,
) -> Response {
    let snapshot = Arc::clone(&snapshot.borrow());
    match snapshot.group(&group) {
        Some(found) => Json(found).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
            Json(json!({
                "type": "about:blank",
                "title": "unknown consumer group",
                "status": 404,
                "detail": format!("group {group} is not watched by lag-autoscaler"),
            })),
        )
            .into_response(),
    }
}
