//! The Kubernetes External Metrics API (`external.metrics.k8s.io/v1beta1`), so that an HPA of
//! `type: External` scales a Deployment on its group's lag with no Prometheus adapter and no
//! KEDA. The kube-apiserver's aggregation layer reaches it through an `APIService` over TLS.
//!
//! - `GET /apis`, `GET /apis/external.metrics.k8s.io`, `GET /apis/external.metrics.k8s.io/v1beta1`:
//!   discovery (`APIGroupList`, `APIGroup`, `APIResourceList`).
//! - `GET /apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector=...`:
//!   an `ExternalMetricValueList` with one item per matching group.
//!   - `kafka_consumergroup_lag`: records the group has not consumed, summed over partitions.
//!   - `kafka_consumergroup_lag_seconds`: age of its oldest unconsumed record, max over partitions.
//!
//! Groups are not namespaced, so `{ns}` is accepted whatever it is. Errors answer a `Status`
//! object as the API server does.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::{
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{
            APIGroup, APIGroupList, APIResource, APIResourceList, GroupVersionForDiscovery,
            ListMeta, Status, Time,
        },
    },
    jiff::Timestamp,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use triage_runtime::shutdown::Shutdown;

use crate::{
    aggregator_auth::{self, RequestHeaderAuth},
    config::ExternalMetricsConfig,
    selector::Selector,
    snapshot::{GroupLag, LagSnapshot},
};

pub const API_GROUP: &str = "external.metrics.k8s.io";
pub const API_VERSION: &str = "v1beta1";
pub const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";
pub const LAG_METRIC: &str = "kafka_consumergroup_lag";
pub const LAG_SECONDS_METRIC: &str = "kafka_consumergroup_lag_seconds";
const METRICS: [&str; 2] = [LAG_METRIC, LAG_SECONDS_METRIC];

/// `k8s.io/metrics/pkg/apis/external_metrics/v1beta1.ExternalMetricValueList`; k8s-openapi has
/// no type for it (it is not part of the core API).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalMetricValueList {
    api_version: &'static str,
    kind: &'static str,
    metadata: ListMeta,
    items: Vec<ExternalMetricValue>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalMetricValue {
    metric_name: String,
    metric_labels: BTreeMap<String, String>,
    timestamp: Time,
    value: Quantity,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetricQuery {
    #[serde(default)]
    label_selector: String,
}

pub fn router(snapshot: watch::Receiver<Arc<LagSnapshot>>) -> Router {
    Router::new()
        .route("/apis", get(api_group_list))
        .route("/apis/external.metrics.k8s.io", get(api_group))
        .route(
            "/apis/external.metrics.k8s.io/v1beta1",
            get(api_resource_list),
        )
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}",
            get(metric_values),
        )
        .fallback(not_found)
        .with_state(snapshot)
}

fn group_version() -> GroupVersionForDiscovery {
    GroupVersionForDiscovery {
        group_version: GROUP_VERSION.into(),
        version: API_VERSION.into(),
    }
}

fn group() -> APIGroup {
    APIGroup {
        name: API_GROUP.into(),
        preferred_version: Some(group_version()),
        server_address_by_client_cidrs: None,
        versions: vec![group_version()],
    }
}

async fn api_group_list() -> Json<APIGroupList> {
    Json(APIGroupList {
        groups: vec![group()],
    })
}

async fn api_group() -> Json<APIGroup> {
    Json(group())
}

async fn api_resource_list() -> Json<APIResourceList> {
    let resources = METRICS
        .iter()
        .map(|name| APIResource {
            name: (*name).into(),
            singular_name: String::new(),
            namespaced: true,
            kind: "ExternalMetricValueList".into(),
            verbs: vec!["get".into()],
            ..Default::default()
        })
        .collect();
    Json(APIResourceList {
        group_version: GROUP_VERSION.into(),
        resources,
    })
}

async fn metric_values(
    State(snapshot): State<watch::Receiver<Arc<LagSnapshot>>>,
    Path((_namespace, metric)): Path<(String, String)>,
    Query(query): Query<MetricQuery>,
) -> Response {
    let metric = metric.to_ascii_lowercase();
    if !METRICS.contains(&metric.as_str()) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "no external metric {metric}; this server serves {}",
                METRICS.join(", ")
            ),
        );
    }
    let selector = match Selector::parse(&query.label_selector) {
        Ok(selector) => selector,
        Err(error) => return status(StatusCode::BAD_REQUEST, "BadRequest", error.to_string()),
    };
    let snapshot = Arc::clone(&snapshot.borrow());
    let timestamp = Time(Timestamp::from_millisecond(snapshot.taken_at_ms).unwrap_or_default());
    let items = snapshot
        .groups
        .iter()
        .filter(|group| group.topic_exists && selector.matches(&group.labels()))
        .filter_map(|group| {
            Some(ExternalMetricValue {
                metric_name: metric.clone(),
                metric_labels: group.labels().into_iter().collect(),
                timestamp: timestamp.clone(),
                value: value_of(&metric, group)?,
            })
        })
        .collect();
    Json(ExternalMetricValueList {
        api_version: GROUP_VERSION,
        kind: "ExternalMetricValueList",
        metadata: ListMeta::default(),
        items,
    })
    .into_response()
}

fn value_of(metric: &str, group: &GroupLag) -> Option<Quantity> {
    match metric {
        LAG_METRIC => Some(Quantity(group.lag.to_string())),
        LAG_SECONDS_METRIC => group.lag_seconds.map(seconds_quantity),
        _ => None,
    }
}

/// Seconds as a Kubernetes quantity: whole seconds plain (`"42"`), otherwise milli-units
/// (`"1500m"` is 1.5), which the HPA compares exactly.
pub fn seconds_quantity(seconds: f64) -> Quantity {
    let millis = (seconds * 1000.0).round() as i64;
    if millis % 1000 == 0 {
        Quantity((millis / 1000).to_string())
    } else {
        Quantity(format!("{millis}m"))
    }
}

async fn not_found() -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource".into(),
    )
}

pub(crate) fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = Status {
        code: Some(i32::from(code.as_u16())),
        message: Some(message),
        reason: Some(reason.into()),
        status: Some("Failure".into()),
        ..Default::default()
    };
    (code, Json(body)).into_response()
}

/// A running TLS listener.
pub struct TlsServer {
    pub local_addr: SocketAddr,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// Binds `config.listen` and serves `router` over TLS until `shutdown` fires, with the
/// configured certificate or a self-signed one made now. With `auth`, every request is
/// authenticated and authorised first (see [`crate::aggregator_auth`]).
pub async fn serve_tls(
    config: &ExternalMetricsConfig,
    router: Router,
    auth: Option<RequestHeaderAuth>,
    mut shutdown: Shutdown,
) -> anyhow::Result<TlsServer> {
    let (cert_pem, key_pem) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => (
            aggregator_auth::read_pem(cert)?,
            aggregator_auth::read_pem(key)?,
        ),
        _ => {
            let generated = rcgen::generate_simple_self_signed(config.self_signed_names.clone())
                .context("failed to generate a self-signed certificate")?;
            tracing::info!(
                names = ?config.self_signed_names,
                "external metrics api uses a self-signed certificate"
            );
            (
                generated.cert.pem().into_bytes(),
                generated.signing_key.serialize_pem().into_bytes(),
            )
        }
    };
    let (tls, router) = match auth {
        Some(auth) => (
            RustlsConfig::from_config(Arc::new(auth.tls_config(&cert_pem, &key_pem)?)),
            router.layer(axum::middleware::from_fn_with_state(
                auth,
                aggregator_auth::authenticate,
            )),
        ),
        None => {
            tracing::warn!(
                "external metrics api answers every caller (external_metrics.authentication.mode = none)"
            );
            (
                RustlsConfig::from_pem(cert_pem, key_pem)
                    .await
                    .context("failed to load the TLS certificate and key")?,
                router,
            )
        }
    };
    let listener = std::net::TcpListener::bind(config.listen).with_context(|| {
        format!(
            "failed to bind the external metrics api to {}",
            config.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)?.handle(handle.clone());
    tokio::spawn(async move {
        shutdown.wait().await;
        handle.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    tracing::info!(address = %local_addr, "external metrics api listening (tls)");
    let task = tokio::spawn(server.serve(router.into_make_service()));
    Ok(TlsServer { local_addr, task })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::{config::GroupTarget, status::GroupStatus};

    fn group(name: &str, lag: i64, lag_seconds: Option<f64>, topic_exists: bool) -> GroupLag {
        GroupLag {
            lag,
            lag_seconds,
            topic_exists,
            partitions: 3,
            error: None,
            status: GroupStatus::Ok,
            ..GroupLag::pending(&GroupTarget::new(name, "topic", Some(name)))
        }
    }

    async fn get_json(path: &str) -> (StatusCode, Value) {
        let snapshot = LagSnapshot {
            taken_at_ms: 1_700_000_000_000,
            offsets_read_at: None,
            groups: vec![
                group("a", 7, Some(2.25), true),
                group("b", 3, None, true),
                group("gone", 0, None, false),
            ],
        };
        let (_tx, rx) = watch::channel(Arc::new(snapshot));
        let response = router(rx)
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    const BASE: &str = "/apis/external.metrics.k8s.io/v1beta1/namespaces/ns";

    #[tokio::test]
    async fn one_item_per_matching_group_whose_topic_exists() {
        let (status, list) = get_json(&format!("{BASE}/kafka_consumergroup_lag")).await;
        assert_eq!(status, StatusCode::OK);
        let values: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["value"].as_str().unwrap())
            .collect();
        assert_eq!(values, ["7", "3"]);
        assert_eq!(list["items"][0]["timestamp"], "2023-11-14T22:13:20Z");
    }

    #[tokio::test]
    async fn a_group_without_a_known_time_lag_has_no_item() {
        let (_, list) = get_json(&format!("{BASE}/kafka_consumergroup_lag_seconds")).await;
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{list}");
        assert_eq!(items[0]["value"], "2250m");
        assert_eq!(items[0]["metricLabels"]["group"], "a");
    }

    #[tokio::test]
    async fn metric_names_are_matched_case_insensitively_and_unknown_paths_are_status_404() {
        let (status, list) = get_json(&format!(
            "{BASE}/Kafka_ConsumerGroup_Lag?labelSelector=group%3Db"
        ))
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["items"][0]["value"], "3");
        let (status, body) = get_json("/apis/custom.metrics.k8s.io/v1beta2").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["reason"], "NotFound");
    }

    #[test]
    fn seconds_become_exact_quantities() {
        assert_eq!(seconds_quantity(42.0).0, "42");
        assert_eq!(seconds_quantity(1.5).0, "1500m");
        assert_eq!(seconds_quantity(0.0).0, "0");
        assert_eq!(seconds_quantity(0.0004).0, "0");
    }
}
