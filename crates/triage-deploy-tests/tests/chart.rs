//! The Helm chart, rendered by the real `helm template` for every value set under
//! `helm/ticket-triage/ci/`, checked for what matters in a cluster: each consumer scales on its
//! own group's lag, the aggregation layer reaches lag-autoscaler, replicas stop at the partition
//! count, no secret lands in a ConfigMap, every container is locked down and probed, and every
//! rendered config.toml loads into its service's real `Config`.

use std::collections::BTreeMap;

use serde_json::Value;
use triage_deploy_tests::{Rendered, VALUE_SETS, load_config, render};

/// The consumer Deployments and the group each one must scale on (the services' default groups).
const CONSUMERS: &[(&str, &str)] = &[
    ("ticket-dispatcher", "ticket-dispatcher"),
    ("inference-worker", "inference-worker"),
    ("result-writer", "result-writer"),
    ("dlq-alerter", "dlq-alerter"),
];

/// Values of the Secrets `existing-secrets-values.yaml` names but the chart does not create.
fn existing_secrets() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("kafka-credentials/password", "existing-kafka-password"),
        ("triage-backends/redis-url", "redis://redis.existing:6379"),
        (
            "triage-backends/database-url",
            "postgres://triage:pw@pg.existing:5432/triage",
        ),
    ])
}

fn render_ok(values_files: &[&str], set: &[&str]) -> Rendered {
    render(values_files, set).unwrap_or_else(|e| panic!("helm template {values_files:?}: {e}"))
}

/// The dispatcher is a StatefulSet (stable pod names, so stable transactional ids).
fn workload_kind(component: &str) -> &'static str {
    if component == "ticket-dispatcher" {
        "StatefulSet"
    } else {
        "Deployment"
    }
}

fn deployment_name(component: &str) -> String {
    format!("triage-{component}")
}

/// `config.toml` of a component's ConfigMap.
fn config_toml<'a>(rendered: &'a Rendered, component: &str) -> &'a str {
    rendered
        .get("ConfigMap", &deployment_name(component))
        .and_then(|c| c["data"]["config.toml"].as_str())
        .unwrap_or_else(|| panic!("no config.toml for {component}"))
}

fn hpa_of<'a>(rendered: &'a Rendered, component: &str) -> &'a Value {
    rendered
        .get("HorizontalPodAutoscaler", &deployment_name(component))
        .unwrap_or_else(|| panic!("no HPA for {component}"))
}

#[test]
fn every_consumer_has_an_hpa_on_its_own_groups_lag() {
    let rendered = render_ok(&[], &["inferenceWorker.groupId=workers-blue"]);
    let expected: Vec<(&str, &str)> = CONSUMERS
        .iter()
        .map(|(component, group)| {
            let group = if *component == "inference-worker" {
                "workers-blue"
            } else {
                group
            };
            (*component, group)
        })
        .collect();
    assert_eq!(
        rendered.of_kind("HorizontalPodAutoscaler").count(),
        expected.len(),
        "one HPA per consumer and none for the ingress or lag-autoscaler"
    );
    for (component, group) in expected {
        let hpa = hpa_of(&rendered, component);
        let target = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(target["kind"], workload_kind(component));
        assert_eq!(target["name"], deployment_name(component));
        assert!(
            rendered
                .get(workload_kind(component), target["name"].as_str().unwrap())
                .is_some()
        );
        let metrics = hpa["spec"]["metrics"].as_array().unwrap();
        assert_eq!(metrics.len(), 1, "{component}: {metrics:?}");
        let external = &metrics[0]["external"];
        assert_eq!(metrics[0]["type"], "External");
        assert_eq!(external["metric"]["name"], "kafka_consumergroup_lag");
        assert_eq!(
            external["metric"]["selector"]["matchLabels"],
            serde_json::json!({ "group": group }),
            "{component} must scale on its own group's lag"
        );
        assert_eq!(external["target"]["type"], "AverageValue");
    }
    // lag-autoscaler watches exactly those groups, each named with its Deployment.
    let autoscaler: lag_autoscaler::config::Config =
        load_config(config_toml(&rendered, "lag-autoscaler"), &[]).unwrap();
    let mut watched: Vec<(String, Option<String>)> = autoscaler
        .targets()
        .into_iter()
        .map(|t| (t.group, t.deployment))
        .collect();
    watched.sort();
    let mut wanted: Vec<(String, Option<String>)> = [
        ("dlq-alerter", "dlq-alerter"),
        ("result-writer", "result-writer"),
        ("ticket-dispatcher", "ticket-dispatcher"),
        ("workers-blue", "inference-worker"),
    ]
    .iter()
    .map(|(group, component)| (group.to_string(), Some(deployment_name(component))))
    .collect();
    wanted.sort();
    assert_eq!(watched, wanted);
}

#[test]
fn the_apiservice_points_at_lag_autoscaler_with_its_ca() {
    let rendered = render_ok(&[], &[]);
    let api_service = rendered
        .get("APIService", "v1beta1.external.metrics.k8s.io")
        .expect("APIService");
    let spec = &api_service["spec"];
    assert_eq!(spec["group"], "external.metrics.k8s.io");
    assert_eq!(spec["version"], "v1beta1");
    assert_eq!(spec["service"]["name"], "triage-lag-autoscaler");
    assert_eq!(spec["service"]["namespace"], rendered.namespace.as_str());
    assert!(spec["insecureSkipTLSVerify"].is_null());

    // The Service port the APIService names leads to the container's External Metrics port,
    // which is the port lag-autoscaler's configuration listens on.
    let service = rendered
        .get("Service", "triage-lag-autoscaler")
        .expect("Service");
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == spec["service"]["port"])
        .expect("the APIService's port exists on the Service");
    let deployment = rendered.get("Deployment", "triage-lag-autoscaler").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let container_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .expect("the Service's targetPort is a named container port");
    let config: lag_autoscaler::config::Config =
        load_config(config_toml(&rendered, "lag-autoscaler"), &[]).unwrap();
    assert!(config.external_metrics.enabled);
    assert_eq!(
        Value::from(config.external_metrics.listen.port()),
        container_port["containerPort"]
    );

    // The caBundle is the CA of the certificate lag-autoscaler serves, mounted where its
    // configuration reads it.
    let tls = rendered
        .secret_data("triage-lag-autoscaler-tls")
        .expect("TLS Secret");
    let ca_bundle = base64_decode(spec["caBundle"].as_str().expect("caBundle"));
    assert!(ca_bundle.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(ca_bundle, tls["ca.crt"]);
    assert!(tls["tls.crt"].starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(tls["tls.key"].contains("PRIVATE KEY"));
    assert_eq!(
        config.external_metrics.tls_cert.as_deref(),
        Some(std::path::Path::new("/etc/triage/tls/tls.crt"))
    );
    let mounts = container["volumeMounts"].as_array().unwrap();
    let tls_mount = mounts.iter().find(|m| m["name"] == "tls").unwrap();
    assert_eq!(tls_mount["mountPath"], "/etc/triage/tls");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "tls" && v["secret"]["secretName"] == "triage-lag-autoscaler-tls")
    );

    // RBAC the aggregation layer needs, bound to the ServiceAccount lag-autoscaler runs as.
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"].clone();
    let bound_to_account = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == account && s["namespace"] == "triage")
    };
    assert!(
        rendered
            .of_kind("ClusterRoleBinding")
            .any(|b| { b["roleRef"]["name"] == "system:auth-delegator" && bound_to_account(b) })
    );
    assert!(rendered.of_kind("RoleBinding").any(|b| {
        b["metadata"]["namespace"] == "kube-system"
            && b["roleRef"]["name"] == "extension-apiserver-authentication-reader"
            && bound_to_account(b)
    }));
    let reader = rendered
        .of_kind("ClusterRole")
        .find(|r| r["rules"][0]["apiGroups"][0] == "external.metrics.k8s.io")
        .expect("a ClusterRole on external.metrics.k8s.io");
    assert!(rendered.of_kind("ClusterRoleBinding").any(|b| {
        b["roleRef"]["name"] == reader["metadata"]["name"]
            && b["subjects"][0]["name"] == "horizontal-pod-autoscaler"
            && b["subjects"][0]["namespace"] == "kube-system"
    }));

    // With tls=insecure the APIService trusts lag-autoscaler's self-signed certificate.
    let insecure = render_ok(&["existing-secrets-values.yaml"], &[]);
    let spec = &insecure
        .get("APIService", "v1beta1.external.metrics.k8s.io")
        .unwrap()["spec"];
    assert_eq!(spec["insecureSkipTLSVerify"], true);
    assert!(spec["caBundle"].is_null());
}

#[test]
fn max_replicas_follow_the_partition_count() {
    for (set, partitions) in [(vec![], 12), (vec!["topics.partitions=30"], 30)] {
        let rendered = render_ok(&[], &set);
        for (component, _) in CONSUMERS {
            assert_eq!(
                hpa_of(&rendered, component)["spec"]["maxReplicas"],
                partitions,
                "{component} with {set:?}"
            );
        }
        let config: lag_autoscaler::config::Config =
            load_config(config_toml(&rendered, "lag-autoscaler"), &[]).unwrap();
        for target in config.targets() {
            assert_eq!(target.max_replicas, Some(partitions), "{}", target.group);
        }
        let publisher: ticket_publisher::config::Config =
            load_config(config_toml(&rendered, "ticket-publisher"), &[]).unwrap();
        assert_eq!(publisher.topic_provisioning.partitions, partitions as i32);
    }
    // An explicit ceiling wins for that service only.
    let rendered = render_ok(&[], &["inferenceWorker.autoscaling.maxReplicas=5"]);
    assert_eq!(
        hpa_of(&rendered, "inference-worker")["spec"]["maxReplicas"],
        5
    );
    assert_eq!(
        hpa_of(&rendered, "result-writer")["spec"]["maxReplicas"],
        12
    );
    // KEDA's ScaledObjects follow the same rule.
    let keda = render_ok(&["keda-values.yaml"], &["topics.partitions=7"]);
    for (component, _) in CONSUMERS {
        let scaled = keda
            .get("ScaledObject", &deployment_name(component))
            .unwrap();
        assert_eq!(scaled["spec"]["maxReplicaCount"], 7, "{component}");
    }
}

#[test]
fn no_secret_value_appears_in_a_config_map() {
    let rendered = render_ok(&["secrets-values.yaml"], &[]);
    let plain_api_key = "api-key-plain-3e2d1c";
    let stored = [
        "kafka-password-0f9e8d",
        "redis-password-7c6b5a",
        // The API keys' hashes (one computed by the chart, one given): hashes are secrets too.
        &sha256_hex(plain_api_key),
        "8d969eef6ecad3c29a3a629280e686cf0c3f5d5a86aff3ca12020c923adc6c92",
        "sk-llm-key-4b3a29",
        "db-password-1a2b3c",
        "slack-token-5d4c3b",
    ];
    // They are in the Secret (so the search below is not vacuous) ...
    let in_secret: String = rendered
        .secret_data("triage-secrets")
        .expect("the chart's Secret")
        .into_values()
        .collect();
    for secret in &stored {
        assert!(in_secret.contains(secret), "{secret} is not in the Secret");
    }
    // ... a plain API key is not even there (only its hash) ...
    let everything = serde_json::to_string(&rendered.manifests).unwrap();
    assert!(!everything.contains(plain_api_key));
    let secrets: Vec<&str> = stored.iter().copied().chain([plain_api_key]).collect();
    // ... and nowhere in a ConfigMap, nor in a Deployment (env values, args, annotations).
    let config_maps: Vec<&Value> = rendered.of_kind("ConfigMap").collect();
    assert_eq!(config_maps.len(), 6);
    for object in config_maps.iter().chain(
        rendered
            .of_kind("Deployment")
            .chain(rendered.of_kind("StatefulSet"))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let text = object.to_string();
        for secret in &secrets {
            assert!(
                !text.contains(secret),
                "{} {} contains a secret",
                object["kind"],
                object["metadata"]["name"]
            );
        }
    }
}

#[test]
fn every_container_runs_non_root_with_probes_and_drains_before_sigkill() {
    for values in VALUE_SETS {
        let rendered = render_ok(&[values], &[]);
        let pods: Vec<&Value> = rendered
            .of_kind("Deployment")
            .chain(rendered.of_kind("StatefulSet"))
            .chain(rendered.of_kind("Job"))
            .collect();
        assert!(pods.len() >= 6, "{values}: {} workloads", pods.len());
        for workload in pods {
            let name = format!("{values}: {}", workload["metadata"]["name"]);
            let pod = &workload["spec"]["template"]["spec"];
            let containers = pod["containers"].as_array().unwrap();
            for container in containers
                .iter()
                .chain(pod["initContainers"].as_array().into_iter().flatten())
            {
                let context = &container["securityContext"];
                let non_root = context["runAsNonRoot"] == true
                    || (context["runAsNonRoot"].is_null()
                        && pod["securityContext"]["runAsNonRoot"] == true);
                assert!(non_root, "{name}: runAsNonRoot");
                let user = context["runAsUser"]
                    .as_i64()
                    .or(pod["securityContext"]["runAsUser"].as_i64());
                assert!(user.is_some_and(|u| u > 0), "{name}: a non-zero runAsUser");
                assert_eq!(context["readOnlyRootFilesystem"], true, "{name}");
                assert_eq!(context["allowPrivilegeEscalation"], false, "{name}");
                assert_eq!(
                    context["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{name}"
                );
                assert!(
                    context["privileged"].is_null() || context["privileged"] == false,
                    "{name}"
                );
            }
            if workload["kind"] == "Job" {
                continue;
            }
            let container = &containers[0];
            assert_eq!(
                container["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{name}"
            );
            assert_eq!(
                container["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{name}"
            );
            for probe in ["livenessProbe", "readinessProbe"] {
                assert_eq!(container[probe]["httpGet"]["port"], "admin", "{name}");
            }
            let admin = container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "admin")
                .expect("an admin port");
            // The probed port is the one the service's config listens on; the grace period is
            // longer than its drain deadline.
            let component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap();
            let toml = config_toml(&rendered, component);
            let shared: SharedSections =
                load_config(toml, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                Value::from(shared.admin.listen.port()),
                admin["containerPort"],
                "{name}"
            );
            let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
            assert!(
                grace > shared.admin.drain_timeout.as_secs(),
                "{name}: grace {grace}s, drain {:?}",
                shared.admin.drain_timeout
            );
            assert!(
                container["resources"]["requests"].is_object(),
                "{name}: resources"
            );
        }
    }
}

#[test]
fn every_config_toml_loads_into_its_service_config() {
    let existing = existing_secrets();
    for values in VALUE_SETS {
        let rendered = render_ok(&[values], &[]);
        let mut loaded = 0;
        for config_map in rendered.of_kind("ConfigMap") {
            let name = config_map["metadata"]["name"].as_str().unwrap();
            let component = config_map["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap();
            let toml = config_map["data"]["config.toml"].as_str().unwrap();
            let deployment = rendered
                .get("Deployment", name)
                .or_else(|| rendered.get("StatefulSet", name))
                .expect("its Deployment or StatefulSet");
            let env = rendered
                .container_env(deployment, &existing)
                .unwrap_or_else(|e| panic!("{values}: {name}: {e}"));
            let context = format!("{values}: {component}");
            match component {
                "ticket-publisher" => {
                    let config: ticket_publisher::config::Config =
                        load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                    assert!(
                        config.ingress.enabled && !config.dispatch.enabled,
                        "{context}"
                    );
                    assert_eq!(config.ingress.http_listen.port(), 8080);
                    assert_eq!(config.ingress.grpc_listen.port(), 50051);
                    check_keys_file(
                        &rendered,
                        &existing,
                        deployment,
                        &config.auth.keys_file,
                        &context,
                    );
                }
                "ticket-dispatcher" => {
                    let config: ticket_publisher::config::Config =
                        load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                    assert!(
                        !config.ingress.enabled && config.dispatch.enabled,
                        "{context}"
                    );
                    assert_eq!(config.dispatch.group_id, "ticket-dispatcher");
                }
                "inference-worker" => {
                    let config: inference_worker::config::Config =
                        load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                    assert_eq!(config.consumer.group_id, "inference-worker");
                    assert!(config.llm.api_key.is_none(), "{context}: the key is a file");
                    if let Some(path) = &config.llm.api_key_file {
                        assert_mounted(deployment, path, &context);
                    }
                    // The worker knows the tenants of the API keys (their metric labels) and
                    // those given weights and quotas in values.
                    check_keys_file(
                        &rendered,
                        &existing,
                        deployment,
                        &config.tenants.keys_file,
                        &context,
                    );
                    if *values == "secrets-values.yaml" {
                        let acme = &config.tenants.known["acme"];
                        assert_eq!(
                            (
                                acme.weight,
                                acme.requests_per_minute,
                                acme.tokens_per_minute
                            ),
                            (4, 300, 100_000),
                            "{context}"
                        );
                        assert_eq!(config.tenants.known["globex.eu"].weight, 2, "{context}");
                    }
                }
                "result-writer" => {
                    let config: result_writer::config::Config =
                        load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                    assert_eq!(config.consumer.group_id, "result-writer");
                    assert!(
                        config.database.url.expose().starts_with("postgres"),
                        "{context}: the database URL comes from the Secret"
                    );
                    check_keys_file(
                        &rendered,
                        &existing,
                        deployment,
                        &config.auth.keys_file,
                        &context,
                    );
                    // The console forwards to Services that exist, on ports they serve.
                    assert!(config.console.enabled, "{context}");
                    for url in [&config.console.dead_letters_url, &config.console.lag_url]
                        .into_iter()
                        .flatten()
                    {
                        assert_service_serves(&rendered, url, &context);
                    }
                    if values.contains("secrets") {
                        assert!(
                            config.console.dead_letters_url.is_some(),
                            "{context}: with API keys the dead-letter page is wired"
                        );
                    }
                }
                "dlq-alerter" => {
                    let config: dlq_alerter::config::Config =
                        load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                    assert_eq!(config.consumer.group_id, "dlq-alerter");
                    if let Some(path) = &config.slack.webhook_url_file {
                        assert_mounted(deployment, path, &context);
                    }
                    // The dead-letter API runs only with keys, and has them mounted.
                    assert_eq!(
                        config.api.listen.is_some(),
                        config.auth.keys_file.is_some(),
                        "{context}"
                    );
                    check_keys_file(
                        &rendered,
                        &existing,
                        deployment,
                        &config.auth.keys_file,
                        &context,
                    );
                }
                "lag-autoscaler" => {
                    let config: lag_autoscaler::config::Config =
                        load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                    // Direct mode scales workloads by kind and name: they must exist.
                    for target in config.targets() {
                        let deployment = target.deployment.expect("a workload per group");
                        assert!(
                            rendered.get(target.kind.as_str(), &deployment).is_some(),
                            "{context}: {} {deployment}",
                            target.kind.as_str()
                        );
                    }
                }
                other => panic!("{context}: a ConfigMap for an unknown component {other}"),
            }
            // The SASL password reaches every Kafka client, from the environment.
            if toml.contains("sasl_ssl") || toml.contains("sasl_plaintext") {
                assert!(
                    env.iter()
                        .any(|(k, v)| k == "TRIAGE_KAFKA__SASL_PASSWORD" && !v.is_empty()),
                    "{context}"
                );
            }
            loaded += 1;
        }
        assert_eq!(loaded, 6, "{values}");
    }
}

#[test]
fn direct_mode_patches_deployments_scale_instead_of_hpas() {
    let rendered = render_ok(&["direct-values.yaml"], &[]);
    assert_eq!(rendered.of_kind("HorizontalPodAutoscaler").count(), 0);
    assert!(
        rendered
            .get("APIService", "v1beta1.external.metrics.k8s.io")
            .is_none()
    );
    let config: lag_autoscaler::config::Config =
        load_config(config_toml(&rendered, "lag-autoscaler"), &[]).unwrap();
    assert!(config.direct.enabled && !config.external_metrics.enabled);
    assert_eq!(config.direct.namespace.as_deref(), Some("triage"));
    let worker = config
        .targets()
        .into_iter()
        .find(|t| t.group == "inference-worker")
        .unwrap();
    assert_eq!(
        (worker.min_replicas, worker.max_replicas),
        (Some(2), Some(8))
    );
    assert_eq!(worker.target_lag_per_replica, Some(200));

    let role = rendered
        .get("Role", "triage-lag-autoscaler-scaler")
        .expect("Role");
    let mut names: Vec<String> = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        assert_eq!(rule["apiGroups"], serde_json::json!(["apps"]));
        assert_eq!(rule["verbs"], serde_json::json!(["get", "patch"]));
        let resource = rule["resources"][0].as_str().unwrap();
        for name in rule["resourceNames"].as_array().unwrap() {
            names.push(format!("{resource} {}", name.as_str().unwrap()));
        }
    }
    names.sort();
    let mut scaled: Vec<String> = config
        .targets()
        .into_iter()
        .filter_map(|t| {
            let resource = match t.kind {
                lag_autoscaler::config::WorkloadKind::Deployment => "deployments/scale",
                lag_autoscaler::config::WorkloadKind::StatefulSet => "statefulsets/scale",
            };
            Some(format!("{resource} {}", t.deployment?))
        })
        .collect();
    scaled.sort();
    assert_eq!(names, scaled);
    let deployment = rendered.get("Deployment", "triage-lag-autoscaler").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "direct mode talks to the API"
    );
    let binding = rendered
        .get("RoleBinding", "triage-lag-autoscaler-scaler")
        .unwrap();
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    // The consumers' replica counts belong to lag-autoscaler: the chart does not set them.
    for (component, _) in CONSUMERS {
        let consumer = rendered
            .get(workload_kind(component), &deployment_name(component))
            .unwrap();
        assert!(consumer["spec"]["replicas"].is_null(), "{component}");
    }
}

#[test]
fn keda_mode_scales_on_the_lag_api() {
    let rendered = render_ok(&["keda-values.yaml"], &[]);
    assert_eq!(rendered.of_kind("HorizontalPodAutoscaler").count(), 0);
    assert!(
        rendered
            .get("APIService", "v1beta1.external.metrics.k8s.io")
            .is_none()
    );
    for (component, group) in CONSUMERS {
        let scaled = rendered
            .get("ScaledObject", &deployment_name(component))
            .unwrap_or_else(|| panic!("{component}"));
        assert_eq!(
            scaled["spec"]["scaleTargetRef"]["name"],
            deployment_name(component)
        );
        let trigger = &scaled["spec"]["triggers"][0];
        assert_eq!(trigger["type"], "metrics-api");
        assert_eq!(
            trigger["metadata"]["url"],
            "http://triage-lag-autoscaler.triage.svc:9090/api/v1/lag"
        );
        assert_eq!(
            trigger["metadata"]["valueLocation"],
            format!("groups.{group}.lag")
        );
    }
    assert!(rendered.get("ServiceMonitor", "triage").is_some());
}

#[test]
fn a_typo_in_values_fails_before_anything_is_rendered() {
    for typo in [
        "inferenceWorker.llm.baseURL=https://x",
        "topics.partitons=3",
        "autoscaling.mode=hpa",
        "admin.drainTimeout=soon",
    ] {
        let error = render(&[], &[typo]).expect_err(typo);
        assert!(
            error.contains("values don't meet the specifications of the schema"),
            "{typo}: {error}"
        );
    }
}

/// The shared sections every service has; unknown keys of the service's own sections are
/// ignored here (the per-service test checks those).
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
struct SharedSections {
    admin: triage_runtime::config::AdminConfig,
}

impl triage_runtime::config::Validate for SharedSections {
    fn validate(&self, problems: &mut Vec<String>) {
        self.admin.validate(problems);
    }
}

fn assert_mounted(deployment: &Value, path: &std::path::Path, context: &str) {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mounted = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|dir| path.starts_with(dir))
        });
    assert!(
        mounted,
        "{context}: {} is not on a mounted volume",
        path.display()
    );
}

/// The keys file the config names is mounted, and when the chart renders it, the service reads
/// every line of it.
/// `url` (`http://<service>:<port>/...`) names a rendered Service with that port.
fn assert_service_serves(rendered: &Rendered, url: &str, context: &str) {
    let authority = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("{context}: {url} is not http://host:port/..."));
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{context}: {url} has no port"));
    let service = rendered
        .get("Service", host)
        .unwrap_or_else(|| panic!("{context}: no Service {host} for {url}"));
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["port"].as_i64().map(|n| n.to_string()).as_deref() == Some(port)),
        "{context}: Service {host} has no port {port}: {ports:?}"
    );
}

fn check_keys_file(
    rendered: &Rendered,
    _existing: &BTreeMap<&str, &str>,
    deployment: &Value,
    keys_file: &Option<std::path::PathBuf>,
    context: &str,
) {
    let Some(path) = keys_file else { return };
    assert_mounted(deployment, path, context);
    let Some(content) = rendered
        .secret_data("triage-secrets")
        .and_then(|data| data.get("api-keys").cloned())
    else {
        return;
    };
    let file = std::env::temp_dir().join(format!(
        "triage-deploy-tests-keys-{}-{}",
        std::process::id(),
        context.replace([':', ' ', '/'], "_")
    ));
    std::fs::write(&file, &content).unwrap();
    let keys = ticket_publisher::auth::read_keys_file(&file);
    std::fs::remove_file(&file).ok();
    let keys = keys.unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_eq!(
        keys.len(),
        content.lines().filter(|l| !l.starts_with('#')).count()
    );
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn base64_decode(text: &str) -> String {
    use base64::Engine;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn the_dispatcher_keeps_its_transactional_id_across_restarts() {
    let rendered = render_ok(&["default-values.yaml"], &[]);
    let dispatcher = rendered
        .get("StatefulSet", &deployment_name("ticket-dispatcher"))
        .expect("the dispatcher is a StatefulSet");
    assert!(
        rendered
            .get("Deployment", &deployment_name("ticket-dispatcher"))
            .is_none()
    );
    assert_eq!(dispatcher["spec"]["podManagementPolicy"], "Parallel");
    // The replica id is the pod name (StatefulSet: <name>-<ordinal>, the same after a restart).
    let env = dispatcher["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(
        env.iter().any(|v| v["name"] == "POD_NAME"
            && v["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name")
    );
    let config: ticket_publisher::config::Config =
        load_config(config_toml(&rendered, "ticket-dispatcher"), &[]).unwrap();
    assert!(
        config.dispatch.replica_id.is_empty(),
        "the replica id comes from POD_NAME"
    );
    assert!(config.dispatch.static_membership);
}

#[test]
fn lag_autoscaler_gets_a_token_to_check_the_aggregator_in_external_mode() {
    let rendered = render_ok(&["default-values.yaml"], &[]);
    let pod =
        &rendered.get("Deployment", "triage-lag-autoscaler").unwrap()["spec"]["template"]["spec"];
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "the request-header CA and SubjectAccessReviews come from the API"
    );
    let config: lag_autoscaler::config::Config =
        load_config(config_toml(&rendered, "lag-autoscaler"), &[]).unwrap();
    assert_eq!(
        config.external_metrics.authentication.mode,
        lag_autoscaler::config::AuthMode::Delegated
    );
}
