//! The admin HTTP server of every service: `/healthz` (the process is alive), `/readyz` (every
//! dependency answers, so traffic and partitions may be given to it) and `/metrics`.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use rdkafka::consumer::BaseConsumer;
use serde_json::json;
use tokio::net::TcpListener;

use crate::{kafka, metrics::MetricsHandle, shutdown::Shutdown};

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One dependency `/readyz` asks about. The error is shown in the response; it must not contain
/// secrets.
pub trait ReadinessCheck: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn check(&self) -> CheckFuture<'_>;
}

/// Ready when the Kafka cluster answers a metadata request.
pub struct KafkaReadiness {
    client: Arc<BaseConsumer>,
}

impl KafkaReadiness {
    pub fn new(client: BaseConsumer) -> Self {
        KafkaReadiness {
            client: Arc::new(client),
        }
    }
}

impl ReadinessCheck for KafkaReadiness {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn check(&self) -> CheckFuture<'_> {
        let client = Arc::clone(&self.client);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || kafka::probe_brokers(&client, CHECK_TIMEOUT))
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub service: &'static str,
    pub metrics: MetricsHandle,
    pub checks: Arc<Vec<Box<dyn ReadinessCheck>>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(state): State<AdminState>) -> impl IntoResponse {
    Json(json!({ "status": "ok", "service": state.service }))
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let results = futures::future::join_all(state.checks.iter().map(|check| async move {
        let outcome =
            match tokio::time::timeout(CHECK_TIMEOUT + Duration::from_secs(1), check.check()).await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
        (check.name(), outcome)
    }))
    .await;
    let ready = results.iter().all(|(_, outcome)| outcome.is_ok());
    let checks: serde_json::Map<String, serde_json::Value> = results
        .into_iter()
        .map(|(name, outcome)| {
            let value = match outcome {
                Ok(()) => json!({ "status": "ok" }),
                Err(error) => json!({ "status": "failing", "error": error }),
            };
            (name.to_owned(), value)
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if ready { "ready" } else { "not_ready" }, "service": state.service, "checks": checks });
    (status, Json(body))
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::metrics::MetricsRegistry;

    struct Fixed(Result<(), String>);

    impl ReadinessCheck for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn check(&self) -> CheckFuture<'_> {
            let outcome = self.0.clone();
            Box::pin(async move { outcome })
        }
    }

    fn app(outcome: Result<(), String>) -> Router {
        router(AdminState {
            service: "test",
            metrics: MetricsRegistry::new("test").freeze(),
            checks: Arc::new(vec![Box::new(Fixed(outcome))]),
        })
    }

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_follows_its_checks() {
        assert_eq!(get(app(Ok(())), "/readyz").await.0, StatusCode::OK);
        let (status, body) = get(app(Err("broker down".into())), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("broker down"), "{body}");
        assert_eq!(
            get(app(Err("x".into())), "/healthz").await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn metrics_are_exposed() {
        let (status, body) = get(app(Ok(())), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("triage_build_info{service=\"test\""),
            "{body}"
        );
    }
}
