//! Direct mode, the lag-autoscaler binary against the real broker and a stand-in Kubernetes API:
//! a local HTTP server speaking the real `apps/v1` Deployment `scale` subresource
//! (`autoscaling/v1` Scale, JSON merge patches), reached through a kubeconfig file.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::{
    api::autoscaling::v1::{Scale, ScaleSpec, ScaleStatus},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status},
};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;
use triage_test_support::{ServiceProcess, TestContext, client_config, create_topics, wait_until};

const BINARY: &str = env!("CARGO_BIN_EXE_lag-autoscaler");
const NAMESPACE: &str = "pipeline";

#[derive(Clone, Debug)]
struct Patch {
    at: Instant,
    deployment: String,
    replicas: i32,
}

#[derive(Default)]
struct Cluster {
    replicas: HashMap<String, i32>,
    patches: Vec<Patch>,
    /// Requests that were not what a Kubernetes API server accepts.
    refused: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

fn scale(namespace: &str, name: &str, replicas: i32) -> Scale {
    Scale {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: Some(ScaleSpec {
            replicas: Some(replicas),
        }),
        status: Some(ScaleStatus {
            replicas,
            selector: Some(format!("app={name}")),
        }),
    }
}

fn not_found(name: &str) -> Response {
    let status = Status {
        code: Some(404),
        message: Some(format!("deployments.apps \"{name}\" not found")),
        reason: Some("NotFound".into()),
        status: Some("Failure".into()),
        ..Default::default()
    };
    (StatusCode::NOT_FOUND, Json(status)).into_response()
}

async fn get_scale(
    State(cluster): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let cluster = cluster.lock().unwrap();
    match cluster.replicas.get(&name) {
        Some(&replicas) if namespace == NAMESPACE => {
            Json(scale(&namespace, &name, replicas)).into_response()
        }
        _ => not_found(&name),
    }
}

async fn patch_scale(
    State(cluster): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut cluster = cluster.lock().unwrap();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(replicas) = patch["spec"]["replicas"].as_i64() else {
        cluster
            .refused
            .push(format!("patch without spec.replicas: {patch}"));
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    };
    if content_type != "application/merge-patch+json" {
        cluster
            .refused
            .push(format!("patch of type {content_type}"));
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    if namespace != NAMESPACE || !cluster.replicas.contains_key(&name) {
        return not_found(&name);
    }
    let replicas = replicas as i32;
    cluster.replicas.insert(name.clone(), replicas);
    cluster.patches.push(Patch {
        at: Instant::now(),
        deployment: name.clone(),
        replicas,
    });
    Json(scale(&namespace, &name, replicas)).into_response()
}

/// Serves the scale subresource on a free loopback port; returns its address.
async fn fake_kubernetes(cluster: Shared) -> String {
    let router = Router::new()
        .route(
            "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
            get(get_scale).patch(patch_scale),
        )
        .with_state(cluster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server}
users:
- name: test
  user: {{}}
contexts:
- name: test
  context:
    cluster: test
    user: test
    namespace: {NAMESPACE}
current-context: test
"
    )
}

/// Queues every record before awaiting any delivery, so that they land together and a poll
/// rarely sees only part of them.
async fn produce(topic: &str, partitions: i32, per_partition: usize) {
    let producer: FutureProducer = client_config().create().unwrap();
    let payloads: Vec<(i32, String)> = (0..partitions)
        .flat_map(|p| (0..per_partition).map(move |i| (p, format!("record-{i}"))))
        .collect();
    let deliveries: Vec<_> = payloads
        .iter()
        .map(|(partition, payload)| {
            producer
                .send_result(
                    FutureRecord::<(), _>::to(topic)
                        .partition(*partition)
                        .payload(payload),
                )
                .map_err(|(error, _)| error)
                .expect("record queued")
        })
        .collect();
    for delivery in deliveries {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Commits `offset` on every partition, as a group that consumed everything would.
fn commit(group: &str, topic: &str, partitions: i32, offset: i64) {
    let consumer: BaseConsumer = client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut offsets = TopicPartitionList::new();
    for partition in 0..partitions {
        offsets
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .unwrap();
    }
    consumer.commit(&offsets, CommitMode::Sync).unwrap();
}

async fn lag(process: &ServiceProcess, group: &str) -> Option<i64> {
    let report: Value = reqwest::get(process.admin_url(&format!("/api/v1/lag/{group}")))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    (report["topic_exists"] == true).then(|| report["lag"].as_i64())?
}

fn decisions(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| entry["message"] == "scaling decision")
        .collect()
}

/// The scale-down stabilisation window of these tests.
const SCALE_DOWN_WINDOW: Duration = Duration::from_secs(3);

/// One test's world: its topic, the stand-in API with Deployment `worker` at one replica, and
/// the binary in direct mode (after its first poll), configured through a file and a kubeconfig.
struct Setup {
    topic: String,
    group: String,
    cluster: Shared,
    process: ServiceProcess,
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

async fn setup(name: &str, partitions: i32, dry_run: bool) -> Setup {
    let context = TestContext::new(name);
    let topic = context.topics.inference_tasks.clone();
    let group = context.group("worker");
    create_topics(&[&topic], partitions).await;

    let cluster: Shared = Arc::default();
    cluster.lock().unwrap().replicas.insert("worker".into(), 1);
    let server = fake_kubernetes(Arc::clone(&cluster)).await;
    let dir = std::env::temp_dir().join(format!("lag-autoscaler-{}", context.id));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig_path = dir.join("kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig(&server)).unwrap();
    let config_path = dir.join("lag-autoscaler.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[lag]
interval = "200ms"
status_window = 3

[[lag.groups]]
group = "{group}"
topic = "{topic}"
deployment = "worker"

[external_metrics]
enabled = false

[direct]
enabled = true
dry_run = {dry_run}
kubeconfig = "{kubeconfig}"
target_lag_per_replica = 10
min_replicas = 1
max_replicas = 10
scale_up_stabilization = "1s"
scale_down_stabilization = "{down}ms"
cooldown = "1s"
"#,
            kubeconfig = kubeconfig_path.display(),
            down = SCALE_DOWN_WINDOW.as_millis(),
        ),
    )
    .unwrap();

    let process = ServiceProcess::spawn(
        BINARY.as_ref(),
        &["--config", config_path.to_str().unwrap()],
        &[
            context.service_env(),
            vec![(
                "TRIAGE_TELEMETRY__LOG_LEVEL".into(),
                "info,lag_autoscaler=debug".into(),
            )],
        ]
        .concat(),
    );
    process.wait_ready(Duration::from_secs(30)).await;
    wait_until("the first poll", Duration::from_secs(10), || {
        lag(&process, &group)
    })
    .await;
    Setup {
        topic,
        group,
        cluster,
        process,
        dir,
    }
}

#[tokio::test]
async fn scales_up_on_lag_capped_at_partitions_and_down_after_the_stabilisation_window() {
    let partitions = 4;
    let setup = setup("lag-direct", partitions, false).await;
    let Setup {
        topic,
        group,
        cluster,
        process,
        ..
    } = &setup;
    let scale_down_window = SCALE_DOWN_WINDOW;

    // 100 records over 4 partitions: lag asks for 10 replicas, the partitions allow 4.
    produce(topic, partitions, 25).await;
    // Records that arrive across polls may take the count up in steps; it ends at 4.
    wait_until(
        "the scale-up to 4 replicas",
        Duration::from_secs(15),
        || async { (cluster.lock().unwrap().replicas["worker"] == 4).then_some(()) },
    )
    .await;
    let ups = cluster.lock().unwrap().patches.clone();
    assert!(
        ups.windows(2).all(|w| w[0].replicas < w[1].replicas)
            && ups.iter().all(|p| p.deployment == "worker"),
        "{ups:?}"
    );

    // The group catches up; one scale-down follows, only after the window.
    commit(group, topic, partitions, 25);
    let caught_up = Instant::now();
    let down = wait_until(
        "a scale-down",
        scale_down_window + Duration::from_secs(10),
        || async { cluster.lock().unwrap().patches.get(ups.len()).cloned() },
    )
    .await;
    assert_eq!(down.replicas, 1);
    // Lag was last seen above zero about one poll before the commit; without the window the
    // scale-down would follow within a poll or two, well under a second.
    let held_for = down.at.duration_since(caught_up);
    assert!(
        held_for >= scale_down_window - Duration::from_secs(1),
        "scaled down {held_for:?} after the lag went, within the {scale_down_window:?} window"
    );

    let log = process.log();
    let decided = decisions(&log);
    let summary: Vec<(String, String, i64)> = decided
        .iter()
        .map(|d| {
            (
                d["direction"].as_str().unwrap().to_owned(),
                d["reason"].as_str().unwrap().to_owned(),
                d["desired"].as_i64().unwrap(),
            )
        })
        .collect();
    let find = |direction: &str, reason: &str, after: Option<usize>| {
        summary
            .iter()
            .enumerate()
            .position(|(i, (d, r, _))| after.is_none_or(|a| i > a) && d == direction && r == reason)
            .unwrap_or_else(|| panic!("no {direction}/{reason} decision in {summary:?}\n{log}"))
    };
    // Lag appeared after a poll without it: the scale-up window holds first.
    let up_held = find("hold", "stabilization_window", None);
    let scaled_up = find("up", "capped_at_partitions", None);
    let down_held = find("hold", "stabilization_window", Some(scaled_up));
    let scaled_down = find("down", "bounds", None);
    assert!(
        up_held < scaled_up && scaled_up < down_held && down_held < scaled_down,
        "{summary:?}"
    );
    assert_eq!(summary[scaled_up].2, 4);
    assert_eq!(summary[scaled_down].2, 1);
    let up_decisions = summary.iter().filter(|(d, _, _)| d == "up").count();
    assert_eq!(up_decisions, ups.len(), "{summary:?}");
    for decision in &decided {
        for field in ["deployment", "current", "desired", "lag", "reason"] {
            assert!(!decision[field].is_null(), "{field} missing in {decision}");
        }
    }
    // More lag than 4 replicas absorb.
    let lag_at_scale_up = decided[scaled_up]["lag"].as_i64().unwrap();
    assert!((41..=100).contains(&lag_at_scale_up), "{lag_at_scale_up}");

    let metrics = reqwest::get(process.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |direction: &str| {
        let prefix = format!(
            "triage_autoscaler_decisions_total{{deployment=\"worker\",direction=\"{direction}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse::<f64>().unwrap())
    };
    assert_eq!(count("up"), Some(ups.len() as f64), "{metrics}");
    assert_eq!(count("down"), Some(1.0), "{metrics}");
    let holds = decided.iter().filter(|d| d["direction"] == "hold").count();
    assert_eq!(count("hold"), Some(holds as f64), "{metrics}");
    assert!(
        metrics.contains("triage_autoscaler_desired_replicas{deployment=\"worker\"} 1"),
        "{metrics}"
    );

    {
        let cluster = cluster.lock().unwrap();
        assert!(cluster.refused.is_empty(), "{:?}", cluster.refused);
        assert_eq!(
            cluster.patches.len(),
            ups.len() + 1,
            "{:?}",
            cluster.patches
        );
        assert!(cluster.patches.iter().all(|p| p.replicas <= partitions));
    }
    stop(setup).await;
}

async fn stop(setup: Setup) {
    setup.process.signal("TERM");
    let status = setup.process.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{}", setup.process.log());
}

#[tokio::test]
async fn a_dry_run_logs_and_counts_decisions_and_patches_nothing() {
    let partitions = 2;
    let setup = setup("lag-direct-dry", partitions, true).await;
    produce(&setup.topic, partitions, 15).await;
    let decided = wait_until(
        "a dry-run scale-up decision",
        Duration::from_secs(15),
        || async {
            decisions(&setup.process.log())
                .into_iter()
                .find(|d| d["direction"] == "up")
        },
    )
    .await;
    assert_eq!(decided["dry_run"], true);
    assert_eq!(decided["desired"], 2, "{decided}");
    assert_eq!(decided["reason"], "capped_at_partitions");
    let metrics = reqwest::get(setup.process.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "triage_autoscaler_decisions_total{deployment=\"worker\",direction=\"up\"} 1"
        ),
        "{metrics}"
    );
    // The scale was read, never written.
    {
        let cluster = setup.cluster.lock().unwrap();
        assert!(cluster.patches.is_empty(), "{:?}", cluster.patches);
        assert_eq!(cluster.replicas["worker"], 1);
    }
    stop(setup).await;
}
