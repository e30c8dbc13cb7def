//! The Kubernetes External Metrics API over TLS, against real lag on the real broker. Answers
//! are read with k8s-openapi's types where they exist (discovery, `Status`) and otherwise with
//! structs that mirror `k8s.io/metrics/pkg/apis/external_metrics/v1beta1` field for field and
//! refuse unknown fields.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Running, config, consume_and_commit, produce, start, wait_for_group};
use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{APIGroup, APIGroupList, APIResourceList, ListMeta, Status, Time},
};
use lag_autoscaler::config::GroupTarget;
use serde::{Deserialize, de::DeserializeOwned};
use triage_test_support::{TestContext, create_topics};

/// `ExternalMetricValueList` as the upstream Go type serialises it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExternalMetricValueList {
    api_version: String,
    kind: String,
    metadata: ListMeta,
    items: Vec<ExternalMetricValue>,
}

/// `ExternalMetricValue`: its `TypeMeta` is inline and empty in lists, `window` optional.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExternalMetricValue {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    metric_name: String,
    metric_labels: BTreeMap<String, String>,
    timestamp: Time,
    #[serde(default)]
    window: Option<i64>,
    value: Quantity,
}

/// A quantity as a number: plain, or milli-units (`1500m`).
fn number(quantity: &Quantity) -> f64 {
    match quantity.0.strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().unwrap() / 1000.0,
        None => quantity.0.parse().unwrap(),
    }
}

fn https() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get<T: DeserializeOwned>(
    client: &reqwest::Client,
    running: &Running,
    path: &str,
) -> (u16, T) {
    let response = client
        .get(format!("https://127.0.0.1:{}{path}", running.tls_port))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} over TLS: {e}"));
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    let parsed =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e} in {body}"));
    (status, parsed)
}

#[tokio::test]
async fn discovery_and_metric_values_match_the_kubernetes_types_over_tls() {
    let context = TestContext::new("lag-external");
    let worker_topic = context.topics.inference_tasks.clone();
    let writer_topic = context.topics.results.clone();
    let worker = context.group("worker");
    let writer = context.group("writer");
    create_topics(&[&worker_topic, &writer_topic], 2).await;
    produce(&worker_topic, 0, 6, None).await;
    produce(&worker_topic, 1, 4, None).await;
    consume_and_commit(&worker, &worker_topic, &[(0, 3), (1, 2)]).await;
    produce(&writer_topic, 0, 3, None).await;

    let running = start(config(vec![
        GroupTarget::new(&worker, &worker_topic, Some("inference-worker")),
        GroupTarget::new(&writer, &writer_topic, Some("result-writer")),
    ]))
    .await;
    wait_for_group(&running, &worker, "the worker's lag", |g| g["lag"] == 5).await;
    wait_for_group(&running, &writer, "the writer's lag", |g| {
        g["lag"] == 3 && g["lag_seconds"].is_number()
    })
    .await;
    let client = https();

    let (status, groups): (_, APIGroupList) = get(&client, &running, "/apis").await;
    assert_eq!(status, 200);
    let group = groups
        .groups
        .iter()
        .find(|g| g.name == "external.metrics.k8s.io")
        .expect("the external metrics group is listed");
    assert_eq!(
        group.preferred_version.as_ref().unwrap().group_version,
        "external.metrics.k8s.io/v1beta1"
    );
    let (_, group): (_, APIGroup) = get(&client, &running, "/apis/external.metrics.k8s.io").await;
    assert_eq!(group.versions[0].version, "v1beta1");
    let (_, resources): (_, APIResourceList) =
        get(&client, &running, "/apis/external.metrics.k8s.io/v1beta1").await;
    assert_eq!(resources.group_version, "external.metrics.k8s.io/v1beta1");
    let names: Vec<&str> = resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["kafka_consumergroup_lag", "kafka_consumergroup_lag_seconds"]
    );
    assert!(
        resources
            .resources
            .iter()
            .all(|r| r.namespaced && r.kind == "ExternalMetricValueList" && r.verbs == ["get"])
    );

    // What an HPA with `selector: {matchLabels: {group: <worker>}}` asks for.
    let path = format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/pipeline/kafka_consumergroup_lag?labelSelector=group%3D{worker}"
    );
    let (status, list): (_, ExternalMetricValueList) = get(&client, &running, &path).await;
    assert_eq!(status, 200);
    assert_eq!(list.api_version, "external.metrics.k8s.io/v1beta1");
    assert_eq!(list.kind, "ExternalMetricValueList");
    assert_eq!(list.metadata, ListMeta::default());
    assert_eq!(list.items.len(), 1, "{list:?}");
    let item = &list.items[0];
    assert_eq!(item.metric_name, "kafka_consumergroup_lag");
    assert_eq!(item.metric_labels["group"], worker);
    assert_eq!(item.metric_labels["topic"], worker_topic);
    assert_eq!(item.metric_labels["deployment"], "inference-worker");
    assert_eq!(item.value, Quantity("5".into()));
    assert!((item.api_version.is_none() && item.kind.is_none() && item.window.is_none()));
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(item.timestamp.0);
    assert!(age.as_secs() < 10, "timestamp {:?}", item.timestamp);

    let path = "/apis/external.metrics.k8s.io/v1beta1/namespaces/pipeline/kafka_consumergroup_lag_seconds?labelSelector=deployment%3Dresult-writer";
    let (_, list): (_, ExternalMetricValueList) = get(&client, &running, path).await;
    assert_eq!(list.items.len(), 1, "{list:?}");
    assert_eq!(list.items[0].metric_labels["group"], writer);
    assert!(number(&list.items[0].value) > 0.0, "{list:?}");

    // A set-based selector, and no selector at all: one item per group.
    let path = format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/kafka_consumergroup_lag?labelSelector=group+in+%28{worker}%2C{writer}%29"
    );
    let (_, list): (_, ExternalMetricValueList) = get(&client, &running, &path).await;
    let total: f64 = list.items.iter().map(|i| number(&i.value)).sum();
    assert_eq!((list.items.len(), total), (2, 8.0), "{list:?}");
    let (_, list): (_, ExternalMetricValueList) = get(
        &client,
        &running,
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/kafka_consumergroup_lag",
    )
    .await;
    assert_eq!(list.items.len(), 2);

    // Errors are `Status` objects, as the API server answers them.
    let (status, error): (_, Status) = get(
        &client,
        &running,
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_depth",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(error.reason.as_deref(), Some("NotFound"));
    assert_eq!(error.code, Some(404));
    let (status, error): (_, Status) = get(
        &client,
        &running,
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/kafka_consumergroup_lag?labelSelector=group+in+broken",
    )
    .await;
    assert_eq!((status, error.reason.as_deref()), (400, Some("BadRequest")));

    // Only TLS is served there.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/apis", running.tls_port)).await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP must not be served on the TLS port"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_configured_certificate_is_served_and_verifies() {
    let context = TestContext::new("lag-external-cert");
    let topic = context.topics.results.clone();
    let group = context.group("writer");
    create_topics(&[&topic], 1).await;

    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("lag-autoscaler-{}", context.id));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();

    let mut config = config(vec![GroupTarget::new(&group, &topic, None)]);
    config.external_metrics.tls_cert = Some(cert_path);
    config.external_metrics.tls_key = Some(key_path);
    let running = start(config).await;

    // A client that trusts only this certificate, reaching it by the name it was issued for.
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(generated.cert.pem().as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    let response = client
        .get(format!(
            "https://localhost:{}/apis/external.metrics.k8s.io/v1beta1",
            running.tls_port
        ))
        .send()
        .await
        .expect("the configured certificate verifies");
    assert_eq!(response.status(), 200);
    let resources: APIResourceList = response.json().await.unwrap();
    assert_eq!(resources.resources.len(), 2);
    std::fs::remove_dir_all(&dir).ok();
    running.stop().await;
}
