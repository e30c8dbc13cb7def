//! The admin HTTP server of every service: `/healthz` (the process is alive), `/readyz` (this
//! pod can serve) and `/metrics`.
//!
//! # Readiness is about this pod, not its dependencies
//! Kubernetes takes a pod that fails `/readyz` out of its Services. Were readiness to follow a
//! shared dependency (the Kafka cluster, Redis, PostgreSQL), one hiccup of that dependency would
//! fail every replica at once and empty the Service: callers would get connection errors from
//! the load balancer instead of the ingress' own 503 with `Retry-After`. So `/readyz` answers 200
//! from the moment the service has finished starting ([`Readiness::mark_ready`]: its listeners
//! are bound, its migrations applied) until shutdown begins (then 503, so that no new request is
//! routed to a draining pod). Readiness decides nothing about Kafka partitions: the
//! consumer group assigns them to every member that polls, ready or not.
//!
//! Dependency health is still watched, where it informs without taking pods out: every
//! [`DependencyCheck`] runs every [`CHECK_INTERVAL`] and sets the gauge
//! `triage_dependency_up{dependency}` (1 answering, 0 not), and `/healthz?verbose` runs them on
//! the spot and answers each one's status in words. `/healthz` itself stays 200, so a liveness
//! probe never restarts a pod because something else is down.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use rdkafka::consumer::BaseConsumer;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::{kafka, metrics::MetricsHandle, shutdown::Shutdown};

/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the dependency gauges are refreshed in the background.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One dependency whose health is reported on `/healthz?verbose` and as a gauge. The error is
/// shown in the response; it must not contain secrets.
pub trait DependencyCheck: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn check(&self) -> CheckFuture<'_>;
}

/// The brokers answer when a metadata request for one small topic comes back
/// ([`kafka::probe_brokers`]).
pub struct KafkaHealth {
    client: Arc<BaseConsumer>,
}

impl KafkaHealth {
    pub fn new(client: BaseConsumer) -> Self {
        KafkaHealth {
            client: Arc::new(client),
        }
    }
}

impl DependencyCheck for KafkaHealth {
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabels {
    dependency: String,
}

/// The dependency checks of one service and the gauge they set.
#[derive(Clone)]
pub struct Dependencies {
    checks: Arc<Vec<Box<dyn DependencyCheck>>>,
    up: Family<DependencyLabels, Gauge>,
}

impl Dependencies {
    /// Registers `triage_dependency_up` in `registry`; every check starts as down until it has
    /// answered once.
    pub fn register(registry: &mut Registry, checks: Vec<Box<dyn DependencyCheck>>) -> Self {
        let up = Family::<DependencyLabels, Gauge>::default();
        registry.register(
            "dependency_up",
            "1 while the dependency answers its health check, 0 while it does not; never affects /readyz",
            up.clone(),
        );
        for check in &checks {
            up.get_or_create(&DependencyLabels {
                dependency: check.name().to_owned(),
            })
            .set(0);
        }
        Dependencies {
            checks: Arc::new(checks),
            up,
        }
    }

    /// Runs every check at once, sets the gauges, and returns each outcome.
    pub async fn check_all(&self) -> Vec<(&'static str, Result<(), String>)> {
        let results = futures::future::join_all(self.checks.iter().map(|check| async move {
            let outcome =
                match tokio::time::timeout(CHECK_TIMEOUT + Duration::from_secs(1), check.check())
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
            (check.name(), outcome)
        }))
        .await;
        for (name, outcome) in &results {
            self.up
                .get_or_create(&DependencyLabels {
                    dependency: (*name).to_owned(),
                })
                .set(i64::from(outcome.is_ok()));
        }
        results
    }

    /// Refreshes the gauges every `interval` until `shutdown` fires, logging each change of a
    /// dependency's state once (not every failed check).
    pub async fn watch(self, interval: Duration, mut shutdown: Shutdown) {
        let mut last: Vec<(&'static str, bool)> = Vec::new();
        loop {
            let results = self.check_all().await;
            for (name, outcome) in &results {
                let up = outcome.is_ok();
                let before = last
                    .iter()
                    .find(|(seen, _)| seen == name)
                    .map(|(_, up)| *up);
                if before != Some(up) {
                    match outcome {
                        Ok(()) => tracing::info!(dependency = name, "dependency answers"),
                        Err(error) => {
                            tracing::warn!(dependency = name, error = %error, "dependency does not answer")
                        }
                    }
                }
            }
            last = results
                .iter()
                .map(|(name, outcome)| (*name, outcome.is_ok()))
                .collect();
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.wait() => return,
            }
        }
    }
}

/// Whether this pod has finished starting. Set once by the service; shutdown is read from the
/// [`Shutdown`] beside it.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn mark_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub service: &'static str,
    pub metrics: MetricsHandle,
    pub dependencies: Dependencies,
    /// `/readyz` is 503 until the service marks it ready.
    pub readiness: Readiness,
    /// `/readyz` turns 503 once this fires: a draining pod takes no new requests.
    pub shutdown: Shutdown,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct HealthQuery {
    /// Present (`?verbose`, any value) to check and report every dependency.
    verbose: Option<String>,
}

async fn healthz(
    State(state): State<AdminState>,
    Query(query): Query<HealthQuery>,
) -> impl IntoResponse {
    if query.verbose.is_none() {
        return Json(json!({ "status": "ok", "service": state.service }));
    }
    let results = state.dependencies.check_all().await;
    let all_up = results.iter().all(|(_, outcome)| outcome.is_ok());
    let dependencies: serde_json::Map<String, serde_json::Value> = results
        .into_iter()
        .map(|(name, outcome)| {
            let value = match outcome {
                Ok(()) => json!({ "status": "up" }),
                Err(error) => json!({ "status": "down", "error": error }),
            };
            (name.to_owned(), value)
        })
        .collect();
    // Still 200: the process is alive; "degraded" tells a person which dependency is not.
    Json(json!({
        "status": if all_up { "ok" } else { "degraded" },
        "service": state.service,
        "dependencies": dependencies,
    }))
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.shutdown.is_triggered() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining", "service": state.service })),
        );
    }
    if !state.readiness.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting", "service": state.service })),
        );
    }
    (
        StatusCode::OK,
        Json(json!({ "status": "ready", "service": state.service })),
    )
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
    use crate::{metrics::MetricsRegistry, shutdown};

    struct Fixed(Result<(), String>);

    impl DependencyCheck for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn check(&self) -> CheckFuture<'_> {
            let outcome = self.0.clone();
            Box::pin(async move { outcome })
        }
    }

    fn app(outcome: Result<(), String>, shutdown: Shutdown) -> Router {
        let readiness = Readiness::default();
        readiness.mark_ready();
        let mut registry = MetricsRegistry::new("test");
        let dependencies =
            Dependencies::register(registry.registry_mut(), vec![Box::new(Fixed(outcome))]);
        router(AdminState {
            service: "test",
            metrics: registry.freeze(),
            dependencies,
            readiness,
            shutdown,
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
    async fn readyz_ignores_dependencies_and_fails_while_starting_and_draining() {
        let down = || app(Err("broker down".into()), Shutdown::never());
        assert_eq!(get(down(), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(down(), "/healthz").await.0, StatusCode::OK);

        let mut registry = MetricsRegistry::new("test");
        let starting = router(AdminState {
            service: "test",
            dependencies: Dependencies::register(registry.registry_mut(), Vec::new()),
            metrics: registry.freeze(),
            readiness: Readiness::default(),
            shutdown: Shutdown::never(),
        });
        let (status, body) = get(starting, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("starting"), "{body}");

        let (trigger, draining) = shutdown::channel();
        trigger.fire();
        let (status, body) = get(app(Ok(()), draining), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("draining"), "{body}");
    }

    #[tokio::test]
    async fn healthz_verbose_names_each_dependency_and_sets_its_gauge() {
        let down = app(Err("broker down".into()), Shutdown::never());
        let (status, body) = get(down.clone(), "/healthz?verbose").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "degraded");
        assert_eq!(body["dependencies"]["fixed"]["status"], "down");
        assert_eq!(body["dependencies"]["fixed"]["error"], "broker down");
        let metrics = get(down, "/metrics").await.1;
        assert!(
            metrics.contains("triage_dependency_up{dependency=\"fixed\"} 0"),
            "{metrics}"
        );

        let up = app(Ok(()), Shutdown::never());
        let body = get(up.clone(), "/healthz?verbose").await.1;
        assert!(body.contains("\"up\""), "{body}");
        let metrics = get(up, "/metrics").await.1;
        assert!(
            metrics.contains("triage_dependency_up{dependency=\"fixed\"} 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn metrics_are_exposed() {
        let (status, body) = get(app(Ok(()), Shutdown::never()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("triage_build_info{service=\"test\""),
            "{body}"
        );
    }
}
