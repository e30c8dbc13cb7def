//! The Helm chart installed into a real kube-apiserver (v1.37.2, on loopback, no kubelet; see
//! deploy/k8s/control-plane.sh) with the real lag-autoscaler binary behind its APIService and
//! real lag on the real broker: the HPA raises the inference-worker Deployment's replicas and
//! brings them back down; direct mode patches `deployments/scale` with the chart's RBAC; the
//! External Metrics API refuses anonymous and unauthorised callers; `helm upgrade` and
//! `helm uninstall` leave nothing behind.
//!
//! `make k8s-test` starts the control plane and sets `K8S_TEST_KUBECONFIG` and `K8S_TEST_PKI`;
//! without them these tests say so and pass, so that `cargo test --workspace` does not need a
//! control plane. Run them one at a time: the APIService `v1beta1.external.metrics.k8s.io` is
//! one per cluster.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{consume_and_commit, produce};
use k8s_openapi::api::{
    apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::Secret,
};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::GroupVersionKind,
    discovery::{self, Scope},
};
use serde_json::{Value, json};
use triage_test_support::{ServiceProcess, Stack, TestContext, free_port, wait_until};

const BINARY: &str = env!("CARGO_BIN_EXE_lag-autoscaler");
const PARTITIONS: i32 = 6;
const TARGET_LAG_PER_REPLICA: i64 = 100;
/// Records put on each partition: 6 × 200 = 1200, twelve replicas' worth, capped at six.
const RECORDS_PER_PARTITION: usize = 200;
const HPA_SA: &str = "system:serviceaccount:kube-system:horizontal-pod-autoscaler";

/// The loopback control plane `make k8s-test` started.
struct ControlPlane {
    kubeconfig: PathBuf,
    pki: PathBuf,
    client: Client,
    server: String,
}

impl ControlPlane {
    async fn from_env(test: &str) -> Option<Self> {
        let (Ok(kubeconfig), Ok(pki)) = (
            std::env::var("K8S_TEST_KUBECONFIG"),
            std::env::var("K8S_TEST_PKI"),
        ) else {
            eprintln!("{test}: skipped, no control plane (make k8s-test runs it)");
            return None;
        };
        let kubeconfig = PathBuf::from(kubeconfig);
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).expect("admin kubeconfig"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("admin kubeconfig loads");
        let server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        Some(ControlPlane {
            kubeconfig,
            pki: PathBuf::from(pki),
            client: Client::try_from(config).expect("client"),
            server,
        })
    }

    fn pki(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.pki.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// `helm` against this API server; panics with helm's output when it fails.
    fn helm(&self, args: &[&str]) -> String {
        let output = Command::new(triage_deploy_tests::helm_binary())
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .output()
            .expect("run helm");
        assert!(
            output.status.success(),
            "helm {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A kubeconfig holding a fresh token of `namespace/service_account`, so that a local
    /// process has exactly the rights the chart gives the pod.
    async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        service_account: &str,
        dir: &Path,
    ) -> PathBuf {
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), namespace);
        let request = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600}
        });
        let answer: Value = accounts
            .create_subresource("token", service_account, &PostParams::default(), &request)
            .await
            .expect("a token for the service account");
        let token = answer["status"]["token"]
            .as_str()
            .expect("token")
            .to_owned();
        let path = dir.join(format!("{service_account}.kubeconfig"));
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k8s-test", "cluster": {
                "server": self.server,
                "certificate-authority": self.pki.join("ca.crt"),
            }}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "k8s-test", "context": {
                "cluster": "k8s-test", "user": service_account, "namespace": namespace
            }}],
            "current-context": "k8s-test",
        });
        // JSON is YAML; the token stays in this file, never in a log.
        std::fs::write(&path, kubeconfig.to_string()).unwrap();
        path
    }

    /// The object a manifest describes, if the API server has it.
    async fn get(&self, manifest: &Value, namespace: &str) -> Option<DynamicObject> {
        let (group, version) = match manifest["apiVersion"].as_str().unwrap().split_once('/') {
            Some((group, version)) => (group.to_owned(), version.to_owned()),
            None => (
                String::new(),
                manifest["apiVersion"].as_str().unwrap().to_owned(),
            ),
        };
        let kind = manifest["kind"].as_str().unwrap();
        let name = manifest["metadata"]["name"].as_str().unwrap();
        let gvk = GroupVersionKind::gvk(&group, &version, kind);
        let (resource, capabilities) = discovery::pinned_kind(&self.client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("the API server does not serve {kind}: {e}"));
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Cluster => Api::all_with(self.client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(
                self.client.clone(),
                manifest["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(namespace),
                &resource,
            ),
        };
        api.get_opt(name).await.expect("get")
    }
}

fn manifests(text: &str) -> Vec<Value> {
    triage_deploy_tests::parse_manifests(text).expect("helm's manifest is YAML")
}

fn describe(manifest: &Value) -> String {
    format!(
        "{} {}",
        manifest["kind"].as_str().unwrap_or("?"),
        manifest["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// A release of the chart in a namespace of its own, uninstalled (and checked for orphans)
/// by [`Release::uninstall`].
struct Release {
    name: String,
    namespace: String,
    values: PathBuf,
    dir: PathBuf,
}

impl Release {
    fn install(plane: &ControlPlane, name: &str, ctx: &TestContext, values: Value) -> Self {
        let dir = std::env::temp_dir().join(format!("k8s-test-{}", ctx.id));
        std::fs::create_dir_all(&dir).unwrap();
        let values_path = dir.join("values.json");
        std::fs::write(&values_path, values.to_string()).unwrap();
        let namespace = format!("tt-{}", ctx.id.to_ascii_lowercase().replace('_', "-"));
        let started = Instant::now();
        plane.helm(&[
            "install",
            name,
            triage_deploy_tests::chart_dir().to_str().unwrap(),
            "--namespace",
            &namespace,
            "--create-namespace",
            "--values",
            values_path.to_str().unwrap(),
            "--wait=false",
            "--timeout",
            "2m",
        ]);
        eprintln!(
            "helm install {name}: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Release {
            name: name.to_owned(),
            namespace,
            values: values_path,
            dir,
        }
    }

    fn manifest(&self, plane: &ControlPlane) -> Vec<Value> {
        manifests(&plane.helm(&[
            "get",
            "manifest",
            &self.name,
            "--namespace",
            &self.namespace,
        ]))
    }

    fn object_name(&self, component: &str) -> String {
        format!("{}-{component}", self.name)
    }

    /// Every object of the release's manifest exists in the API server.
    async fn assert_all_accepted(&self, plane: &ControlPlane) -> usize {
        let manifest = self.manifest(plane);
        assert!(!manifest.is_empty(), "the release has no objects");
        for object in &manifest {
            assert!(
                plane.get(object, &self.namespace).await.is_some(),
                "{} is missing from the API server",
                describe(object)
            );
        }
        manifest.len()
    }

    /// `helm uninstall`, then no object of any manifest the release ever had remains, nor a
    /// ReplicaSet or Pod of its Deployments (the garbage collector removes those).
    async fn uninstall(self, plane: &ControlPlane, also_seen: &[Value]) {
        let mut every = self.manifest(plane);
        every.extend_from_slice(also_seen);
        plane.helm(&[
            "uninstall",
            &self.name,
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "2m",
        ]);
        for object in &every {
            let what = format!("{} to be deleted", describe(object));
            wait_until(&what, Duration::from_secs(30), || async {
                plane
                    .get(object, &self.namespace)
                    .await
                    .is_none()
                    .then_some(())
            })
            .await;
        }
        let selector = format!("app.kubernetes.io/instance={}", self.name);
        let replica_sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
            Api::namespaced(plane.client.clone(), &self.namespace);
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(plane.client.clone(), &self.namespace);
        wait_until(
            "the release's ReplicaSets and Pods to be collected",
            Duration::from_secs(60),
            || async {
                let params = ListParams::default().labels(&selector);
                let sets = replica_sets.list(&params).await.ok()?.items.len();
                let pods = pods.list(&params).await.ok()?.items.len();
                (sets + pods == 0).then_some(())
            },
        )
        .await;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(plane.client.clone());
        let _ = namespaces
            .delete(&self.namespace, &Default::default())
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Chart values pointing at this test's topics and groups on the stack's broker. Topics are
/// the test's own (the broker is shared), made by the test (`provisioning: none`).
fn values(ctx: &TestContext, mode: &str, metrics_port: u16) -> Value {
    json!({
        "kafka": {"bootstrapServers": Stack::get().kafka_bootstrap},
        "topics": {
            "ticketsCreated": ctx.topics.tickets_created,
            "inferenceTasks": ctx.topics.inference_tasks,
            "results": ctx.topics.results,
            "deadLetters": ctx.topics.dead_letters,
            "partitions": PARTITIONS,
            "replicationFactor": 1,
            "minInsyncReplicas": 1,
            "provisioning": "none",
        },
        "ticketDispatcher": {"groupId": ctx.group("ticket-dispatcher")},
        "inferenceWorker": {
            "groupId": ctx.group("inference-worker"),
            "autoscaling": {"minReplicas": 1, "maxReplicas": 0, "targetLagPerReplica": TARGET_LAG_PER_REPLICA},
        },
        "resultWriter": {"groupId": ctx.group("result-writer")},
        "dlqAlerter": {"groupId": ctx.group("dlq-alerter")},
        "lagAutoscaler": {
            "interval": "1s",
            "service": {"externalName": "localhost", "port": metrics_port},
        },
        "autoscaling": {
            "mode": mode,
            "behavior": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 10},
            "direct": {"cooldown": "1s"},
        },
    })
}

/// Starts the real lag-autoscaler binary with the configuration the chart rendered into its
/// ConfigMap, the credentials of the chart's ServiceAccount, and the listener on loopback.
async fn start_lag_autoscaler(
    plane: &ControlPlane,
    release: &Release,
    metrics_port: u16,
    tls: Option<(&Path, &Path)>,
) -> ServiceProcess {
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(plane.client.clone(), &release.namespace);
    let config_map = config_maps
        .get(&release.object_name("lag-autoscaler"))
        .await
        .expect("lag-autoscaler's ConfigMap");
    let config_path = release.dir.join("lag-autoscaler.toml");
    std::fs::write(&config_path, &config_map.data.unwrap()["config.toml"]).unwrap();
    let kubeconfig = plane
        .service_account_kubeconfig(
            &release.namespace,
            &release.object_name("lag-autoscaler"),
            &release.dir,
        )
        .await;
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
    let mut env = vec![
        (
            "TRIAGE_EXTERNAL_METRICS__LISTEN".to_owned(),
            format!("127.0.0.1:{metrics_port}"),
        ),
        (
            "TRIAGE_EXTERNAL_METRICS__AUTHENTICATION__KUBECONFIG".into(),
            kubeconfig.clone(),
        ),
        ("TRIAGE_DIRECT__KUBECONFIG".into(), kubeconfig),
        ("TRIAGE_TELEMETRY__LOG_FORMAT".into(), "pretty".into()),
    ];
    if let Some((cert, key)) = tls {
        env.push((
            "TRIAGE_EXTERNAL_METRICS__TLS_CERT".into(),
            cert.display().to_string(),
        ));
        env.push((
            "TRIAGE_EXTERNAL_METRICS__TLS_KEY".into(),
            key.display().to_string(),
        ));
    }
    let config_arg = config_path.display().to_string();
    let process = ServiceProcess::spawn(BINARY.as_ref(), &["--config", &config_arg], &env);
    process.wait_ready(Duration::from_secs(30)).await;
    process
}

/// Lag of `RECORDS_PER_PARTITION` on every partition: the group committed offset 0.
async fn create_lag(ctx: &TestContext, group: &str) {
    for partition in 0..PARTITIONS {
        produce(
            &ctx.topics.inference_tasks,
            partition,
            RECORDS_PER_PARTITION,
            None,
        )
        .await;
    }
    let none: Vec<(i32, i64)> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    consume_and_commit(group, &ctx.topics.inference_tasks, &none).await;
}

/// The group consumes everything: lag 0.
async fn drain_lag(ctx: &TestContext, group: &str) {
    let all: Vec<(i32, i64)> = (0..PARTITIONS)
        .map(|p| (p, RECORDS_PER_PARTITION as i64))
        .collect();
    consume_and_commit(group, &ctx.topics.inference_tasks, &all).await;
}

async fn replicas(plane: &ControlPlane, namespace: &str, deployment: &str) -> i32 {
    let api: Api<Deployment> = Api::namespaced(plane.client.clone(), namespace);
    api.get_scale(deployment)
        .await
        .expect("scale")
        .spec
        .and_then(|spec| spec.replicas)
        .unwrap_or(0)
}

/// Waits until the Deployment's desired replicas satisfy `condition`; returns them.
async fn wait_replicas(
    plane: &ControlPlane,
    namespace: &str,
    deployment: &str,
    what: &str,
    timeout: Duration,
    condition: impl Fn(i32) -> bool,
) -> i32 {
    wait_until(what, timeout, || async {
        let now = replicas(plane, namespace, deployment).await;
        condition(now).then_some(now)
    })
    .await
}

fn status_of(object: &Value, kind: &str) -> Option<String> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// Creates lag on the inference topic for `group`, waits until the worker's replicas reach the
/// partition count, drains the lag, waits until they are back at 1: the seconds of each leg.
async fn lag_up_then_drain(
    plane: &ControlPlane,
    release: &Release,
    ctx: &TestContext,
    who: &str,
) -> (Duration, Duration) {
    let group = ctx.group("inference-worker");
    let worker = release.object_name("inference-worker");
    assert_eq!(replicas(plane, &release.namespace, &worker).await, 1);
    let started = Instant::now();
    create_lag(ctx, &group).await;
    wait_replicas(
        plane,
        &release.namespace,
        &worker,
        &format!("{who} to raise {worker} to {PARTITIONS} replicas on real lag"),
        Duration::from_secs(90),
        |n| n == PARTITIONS,
    )
    .await;
    let up = started.elapsed();
    let drained = Instant::now();
    drain_lag(ctx, &group).await;
    wait_replicas(
        plane,
        &release.namespace,
        &worker,
        &format!("{who} to bring {worker} back to 1 replica once the lag drained"),
        Duration::from_secs(120),
        |n| n == 1,
    )
    .await;
    (up, drained.elapsed())
}

#[tokio::test]
async fn serial_k8s_hpa_scales_the_worker_on_real_lag_through_the_charts_apiservice() {
    let Some(plane) = ControlPlane::from_env("k8s hpa").await else {
        return;
    };
    let ctx = TestContext::new("k8s_hpa");
    ctx.create_topics(PARTITIONS).await;
    let metrics_port = free_port();
    let release = Release::install(&plane, "tt", &ctx, values(&ctx, "external", metrics_port));
    let objects = release.assert_all_accepted(&plane).await;
    eprintln!("all {objects} objects of the release are accepted by the API server");
    let install_manifest = release.manifest(&plane);

    // The chart made the serving certificate (for <service>.<namespace>.svc) and put its CA in
    // the APIService's caBundle; the local process serves with that certificate.
    let secrets: Api<Secret> = Api::namespaced(plane.client.clone(), &release.namespace);
    let tls = secrets
        .get(&release.object_name("lag-autoscaler-tls"))
        .await
        .expect("the chart's TLS Secret")
        .data
        .unwrap();
    let cert_path = release.dir.join("tls.crt");
    let key_path = release.dir.join("tls.key");
    std::fs::write(&cert_path, &tls["tls.crt"].0).unwrap();
    std::fs::write(&key_path, &tls["tls.key"].0).unwrap();
    let ca_pem = tls["ca.crt"].0.clone();

    let started = Instant::now();
    let autoscaler = start_lag_autoscaler(
        &plane,
        &release,
        metrics_port,
        Some((&cert_path, &key_path)),
    )
    .await;
    let apiservice = json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1beta1.external.metrics.k8s.io"}
    });
    wait_until(
        "the APIService to be Available",
        Duration::from_secs(60),
        || async {
            let object = plane.get(&apiservice, &release.namespace).await?;
            let object = serde_json::to_value(object).unwrap();
            (status_of(&object, "Available").as_deref() == Some("True")).then_some(())
        },
    )
    .await;
    eprintln!(
        "APIService Available {:.1} s after lag-autoscaler started",
        started.elapsed().as_secs_f64()
    );

    // Authentication, straight at the listener. The certificate's name is the Service's, so
    // the client connects to it by that name on loopback.
    let host = format!(
        "{}.{}.svc",
        release.object_name("lag-autoscaler"),
        release.namespace
    );
    let url = format!(
        "https://{host}:{metrics_port}/apis/external.metrics.k8s.io/v1beta1/namespaces/{}/kafka_consumergroup_lag",
        release.namespace
    );
    let ask = |identity: Option<Vec<u8>>, user: Option<&str>| {
        let url = url.clone();
        let host = host.clone();
        let ca_pem = ca_pem.clone();
        let user = user.map(str::to_owned);
        async move {
            let mut builder = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
                .resolve(&host, ([127, 0, 0, 1], metrics_port).into())
                .timeout(Duration::from_secs(10));
            if let Some(identity) = identity {
                builder = builder.identity(reqwest::Identity::from_pem(&identity).unwrap());
            }
            let mut request = builder.build().unwrap().get(&url);
            if let Some(user) = user {
                request = request
                    .header("X-Remote-User", user)
                    .header("X-Remote-Group", "system:serviceaccounts")
                    .header("X-Remote-Group", "system:authenticated");
            }
            request.send().await.map(|r| r.status().as_u16())
        }
    };
    let pem_pair = |name: &str| {
        [
            plane.pki(&format!("{name}.crt")),
            plane.pki(&format!("{name}.key")),
        ]
        .concat()
    };
    let anonymous = ask(None, Some(HPA_SA)).await.expect("an answer");
    assert_eq!(anonymous, 401, "a request without a client certificate");
    let stranger = ask(Some(pem_pair("front-proxy-stranger")), Some(HPA_SA))
        .await
        .expect("an answer");
    assert_eq!(
        stranger, 401,
        "a front-proxy certificate with a name not allowed"
    );
    let nobody = ask(Some(pem_pair("front-proxy-client")), Some("nobody"))
        .await
        .expect("an answer");
    assert_eq!(nobody, 403, "a user RBAC does not allow");
    let no_user = ask(Some(pem_pair("front-proxy-client")), None)
        .await
        .expect("an answer");
    assert_eq!(no_user, 401, "the aggregator's certificate without a user");
    let hpa_controller = ask(Some(pem_pair("front-proxy-client")), Some(HPA_SA))
        .await
        .expect("an answer");
    assert_eq!(hpa_controller, 200, "the HPA controller's service account");
    // A client certificate from another CA (the cluster's admin) fails the handshake.
    let foreign = ask(Some(pem_pair("admin")), Some(HPA_SA)).await;
    assert!(
        !matches!(foreign, Ok(200)),
        "a certificate from another CA was answered: {foreign:?}"
    );
    eprintln!(
        "external metrics api: anonymous 401, unknown name 401, no user 401, user nobody 403, hpa controller 200, foreign CA {}",
        match foreign {
            Ok(code) => code.to_string(),
            Err(_) => "refused in the handshake".into(),
        }
    );

    // Real lag: the HPA reads it through the aggregation layer, raises the worker's replicas,
    // and lowers them once the lag drained (scaleDown stabilization 10 s).
    let group = ctx.group("inference-worker");
    let worker = release.object_name("inference-worker");
    let hpas: Api<HorizontalPodAutoscaler> =
        Api::namespaced(plane.client.clone(), &release.namespace);
    let lag_total = RECORDS_PER_PARTITION as i64 * i64::from(PARTITIONS);
    let group_for_check = group.clone();
    let checks = async {
        // While the lag stands: through the API server, as the admin, the aggregator reaches
        // the process; and every consumer's HPA is active on its own group.
        let path = format!(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{}/kafka_consumergroup_lag?labelSelector=group%3D{group_for_check}",
            release.namespace
        );
        let through_apiserver: Value = wait_until(
            "the lag to show through the aggregator",
            Duration::from_secs(60),
            || async {
                let answer: Value = plane
                    .client
                    .request(http::Request::get(&path).body(Vec::new()).unwrap())
                    .await
                    .ok()?;
                let value = answer["items"][0]["value"].as_str()?.parse::<i64>().ok()?;
                (value == lag_total).then_some(answer)
            },
        )
        .await;
        eprintln!(
            "through the API server: {}",
            through_apiserver["items"][0]["value"]
        );
        for component in [
            "ticket-dispatcher",
            "inference-worker",
            "result-writer",
            "dlq-alerter",
        ] {
            let name = release.object_name(component);
            let hpa = wait_until(
                &format!("the HPA of {component} to be ScalingActive"),
                Duration::from_secs(60),
                || async {
                    let hpa = serde_json::to_value(hpas.get(&name).await.ok()?).unwrap();
                    (status_of(&hpa, "ScalingActive").as_deref() == Some("True")).then_some(hpa)
                },
            )
            .await;
            eprintln!(
                "HPA {name}: ScalingActive, external metric averageValue {}",
                hpa["status"]["currentMetrics"][0]["external"]["current"]["averageValue"]
            );
        }
    };
    let (legs, ()) = tokio::join!(lag_up_then_drain(&plane, &release, &ctx, "the HPA"), checks);
    eprintln!(
        "HPA on real lag ({lag_total} records, target {TARGET_LAG_PER_REPLICA}/replica): \
         {worker} 1 -> {PARTITIONS} in {:.1} s; drained, {PARTITIONS} -> 1 in {:.1} s",
        legs.0.as_secs_f64(),
        legs.1.as_secs_f64()
    );

    // helm upgrade changes the HPA in place and keeps the replica count the HPA owns.
    let mut upgraded = values(&ctx, "external", metrics_port);
    upgraded["inferenceWorker"]["autoscaling"]["targetLagPerReplica"] = json!(250);
    std::fs::write(&release.values, upgraded.to_string()).unwrap();
    plane.helm(&[
        "upgrade",
        &release.name,
        triage_deploy_tests::chart_dir().to_str().unwrap(),
        "--namespace",
        &release.namespace,
        "--values",
        release.values.to_str().unwrap(),
        "--wait=false",
    ]);
    let hpa = serde_json::to_value(hpas.get(&worker).await.unwrap()).unwrap();
    assert_eq!(
        hpa["spec"]["metrics"][0]["external"]["target"]["averageValue"], "250",
        "{hpa}"
    );
    release.assert_all_accepted(&plane).await;

    autoscaler.signal("TERM");
    assert!(
        autoscaler
            .wait_exit(Duration::from_secs(10))
            .await
            .success(),
        "{}",
        autoscaler.log()
    );
    release.uninstall(&plane, &install_manifest).await;
}

#[tokio::test]
async fn serial_k8s_direct_mode_scales_the_worker_with_the_charts_rbac() {
    let Some(plane) = ControlPlane::from_env("k8s direct").await else {
        return;
    };
    let ctx = TestContext::new("k8s_direct");
    ctx.create_topics(PARTITIONS).await;
    let release = Release::install(&plane, "td", &ctx, values(&ctx, "direct", free_port()));
    let objects = release.assert_all_accepted(&plane).await;
    eprintln!("direct mode: all {objects} objects accepted");
    let autoscaler = start_lag_autoscaler(&plane, &release, free_port(), None).await;

    let (up, down) = lag_up_then_drain(&plane, &release, &ctx, "direct mode").await;
    eprintln!(
        "direct mode on real lag: 1 -> {PARTITIONS} in {:.1} s; drained, {PARTITIONS} -> 1 in {:.1} s",
        up.as_secs_f64(),
        down.as_secs_f64()
    );
    autoscaler
        .ensure_running()
        .expect("lag-autoscaler still runs");
    assert!(
        !autoscaler.log().contains("cannot patch"),
        "a patch was refused:\n{}",
        autoscaler.log()
    );
    autoscaler.signal("TERM");
    autoscaler.wait_exit(Duration::from_secs(10)).await;
    release.uninstall(&plane, &[]).await;
}
