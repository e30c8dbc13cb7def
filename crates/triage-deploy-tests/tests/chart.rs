//! The Helm chart, rendered by the real `helm template` for every value set under
//! `helm/ticket-triage/ci/`, checked for what matters in a cluster: each consumer scales on its
//! own group's lag, the aggregation layer reaches lag-autoscaler, replicas stop at the partition
//! count, no secret lands in a ConfigMap (nor, for the passwords the services read from files, in
//! an environment variable), every container is locked down and probed, every rendered
//! config.toml loads into its service's real `Config`, and every file it names is mounted.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::Value;
use triage_deploy_tests::{Rendered, load_config, render, value_sets};

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
        ("triage-db/db-password", "db-file-password-6f5e4d"),
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
    for values in value_sets() {
        let values = values.as_str();
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
    for values in value_sets() {
        let values = values.as_str();
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
                    if values == "secrets-values.yaml" {
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
            // Every file the config names (secrets, CAs, client certificates and keys) is in a
            // volume mounted read-only at that path.
            for path in paths_named(toml) {
                file_source(&rendered, deployment, &path)
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
            }
            // The SASL password reaches every Kafka client as a mounted file, never a variable.
            let shared: SharedSections =
                load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
            if shared.kafka.security_protocol.starts_with("sasl") {
                assert!(shared.kafka.sasl_password.is_none(), "{context}");
                assert_eq!(
                    shared.kafka.sasl_password_file.as_deref(),
                    Some(Path::new("/etc/triage/secrets/kafka-sasl-password")),
                    "{context}"
                );
            }
            assert!(
                env.iter().all(|(name, _)| !name.contains("SASL")),
                "{context}: a SASL variable"
            );
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
    kafka: triage_runtime::config::KafkaConfig,
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

/// Every absolute path a config.toml names, at any depth (`ca_file`, `keys_file`, ...).
fn paths_named(toml: &str) -> Vec<PathBuf> {
    use figment::providers::{Format, Toml};
    fn walk(value: &Value, paths: &mut Vec<PathBuf>) {
        match value {
            Value::String(text) if text.starts_with('/') => paths.push(PathBuf::from(text)),
            Value::Array(items) => items.iter().for_each(|item| walk(item, paths)),
            Value::Object(table) => table.values().for_each(|item| walk(item, paths)),
            _ => {}
        }
    }
    let value: Value = figment::Figment::from(Toml::string(toml))
        .extract()
        .expect("a rendered config.toml parses");
    let mut paths = Vec::new();
    walk(&value, &mut paths);
    paths
}

/// Where the file at `path` in a workload's first container comes from: `(Secret, key)` (or
/// `(ConfigMap, key)`), found through the read-only mount that holds it and its volume's items.
/// A Secret the chart renders must hold that key.
fn file_source(
    rendered: &Rendered,
    workload: &Value,
    path: &Path,
) -> Result<(String, String), String> {
    let pod = &workload["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|dir| path.starts_with(dir))
        })
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        .ok_or_else(|| format!("{} is not on a mounted volume", path.display()))?;
    if mount["readOnly"] != true {
        return Err(format!("{} is on a writable mount", path.display()));
    }
    let relative = path
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .ok_or_else(|| format!("no volume {}", mount["name"]))?;
    // (Secret name, its items) of each secret source of the volume.
    let sources: Vec<(&Value, &Value)> = if volume["secret"].is_object() {
        vec![(&volume["secret"]["secretName"], &volume["secret"]["items"])]
    } else if let Some(sources) = volume["projected"]["sources"].as_array() {
        sources
            .iter()
            .map(|source| (&source["secret"]["name"], &source["secret"]["items"]))
            .collect()
    } else if volume["configMap"].is_object() {
        let name = volume["configMap"]["name"].as_str().unwrap_or_default();
        let config_map = rendered
            .get("ConfigMap", name)
            .ok_or_else(|| format!("no ConfigMap {name}"))?;
        return if config_map["data"][relative.as_str()].is_string() {
            Ok((name.to_owned(), relative))
        } else {
            Err(format!("ConfigMap {name} has no {relative}"))
        };
    } else {
        return Err(format!("{} is on a volume without files", path.display()));
    };
    for (name, items) in sources {
        let name = name.as_str().unwrap_or_default().to_owned();
        let key = match items.as_array() {
            Some(items) => items
                .iter()
                .find(|item| item["path"] == relative.as_str())
                .and_then(|item| item["key"].as_str())
                .map(str::to_owned),
            // Without items every key of the Secret is a file of that name.
            None => Some(relative.clone()),
        };
        let Some(key) = key else { continue };
        if let Some(data) = rendered.secret_data(&name)
            && !data.contains_key(&key)
        {
            return Err(format!("the chart's Secret {name} has no key {key}"));
        }
        return Ok((name, key));
    }
    Err(format!(
        "no volume item puts a file at {} (volume {})",
        path.display(),
        mount["name"]
    ))
}

/// `path` is set and its file comes from `secret`'s `key`.
fn assert_file_from(
    rendered: &Rendered,
    workload: &Value,
    path: Option<&Path>,
    (secret, key): (&str, &str),
    context: &str,
) {
    let path = path.unwrap_or_else(|| panic!("{context}: no file for {secret}/{key}"));
    let source = file_source(rendered, workload, path).unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_eq!(
        (source.0.as_str(), source.1.as_str()),
        (secret, key),
        "{context}: {}",
        path.display()
    );
}

/// With every TLS option of `tls-values.yaml` on, each service reads the CA, client certificate,
/// key and password of each of its dependencies from the Secret and key the values name.
#[test]
fn with_every_tls_option_each_service_reads_its_files_from_the_named_secrets() {
    use triage_runtime::tls::TlsConfig;
    let rendered = render_ok(&["tls-values.yaml"], &[]);
    let existing = existing_secrets();
    let tls_from = |workload: &Value,
                    tls: &TlsConfig,
                    ca: (&str, &str),
                    client: (&str, &str, &str),
                    context: &str| {
        assert!(tls.enabled, "{context}");
        assert_file_from(&rendered, workload, tls.ca_file.as_deref(), ca, context);
        let (secret, cert, key) = client;
        let cert_file = tls.cert_file.as_deref();
        assert_file_from(&rendered, workload, cert_file, (secret, cert), context);
        let key_file = tls.key_file.as_deref();
        assert_file_from(&rendered, workload, key_file, (secret, key), context);
    };
    let redis_ca = ("redis-ca", "ca.pem");
    let redis_client = ("triage-redis-client", "tls.crt", "tls.key");
    let mut checked = Vec::new();
    for workload in rendered.workloads() {
        let component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .unwrap();
        let context = format!("tls-values.yaml: {component}");
        let toml = config_toml(&rendered, component);
        let env = rendered
            .container_env(workload, &existing)
            .unwrap_or_else(|e| panic!("{context}: {e}"));
        let shared: SharedSections =
            load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
        let kafka = &shared.kafka;
        assert_eq!(kafka.security_protocol, "sasl_ssl", "{context}");
        for (path, source) in [
            (&kafka.ssl_ca_location, ("kafka-cluster-ca", "ca.crt")),
            (
                &kafka.ssl_certificate_location,
                ("triage-kafka-client", "tls.crt"),
            ),
            (&kafka.ssl_key_location, ("triage-kafka-client", "tls.key")),
            (&kafka.sasl_password_file, ("kafka-credentials", "password")),
        ] {
            assert_file_from(&rendered, workload, path.as_deref(), source, &context);
        }
        match component {
            "ticket-publisher" => {
                let config: ticket_publisher::config::Config =
                    load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_rediss(&env, "TRIAGE_REDIS__URL", &context);
                tls_from(
                    workload,
                    &config.redis.tls,
                    redis_ca,
                    redis_client,
                    &context,
                );
            }
            "inference-worker" => {
                let config: inference_worker::config::Config =
                    load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_rediss(&env, "TRIAGE_CACHE__REDIS_URL", &context);
                tls_from(
                    workload,
                    &config.cache.tls,
                    redis_ca,
                    redis_client,
                    &context,
                );
            }
            "result-writer" => {
                let config: result_writer::config::Config =
                    load_config(toml, &env).unwrap_or_else(|e| panic!("{context}: {e}"));
                let database = &config.database;
                let client = ("triage-db-client", "client.crt", "client.key");
                tls_from(
                    workload,
                    &database.tls,
                    ("postgres-ca", "ca.crt"),
                    client,
                    &context,
                );
                let password = database.password_file.as_deref();
                let source = ("triage-db", "db-password");
                assert_file_from(&rendered, workload, password, source, &context);
            }
            // The dispatch stage, dlq-alerter and lag-autoscaler do not talk to Redis: no Redis
            // files are mounted in their pods.
            _ => {
                let mounts = workload["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                    .to_string();
                assert!(!mounts.contains("redis"), "{context}: {mounts}");
            }
        }
        checked.push(component.to_owned());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "dlq-alerter",
            "inference-worker",
            "lag-autoscaler",
            "result-writer",
            "ticket-dispatcher",
            "ticket-publisher"
        ]
    );
}

/// The Redis URL the environment gives (load_config falls back to the file alone when only
/// pod files are missing, so the URL is read here) is a `rediss://` one, as TLS needs.
fn assert_rediss(env: &[(String, String)], variable: &str, context: &str) {
    let url = env
        .iter()
        .find(|(name, _)| name == variable)
        .map(|(_, value)| value.as_str());
    assert!(
        url.is_some_and(|url| url.starts_with("rediss://")),
        "{context}: {variable} is not a rediss:// URL"
    );
}

/// TLS settings the services would refuse at start fail the render instead.
#[test]
fn tls_without_a_ca_or_with_a_plain_redis_url_fails_the_render() {
    for (set, wanted) in [
        (
            vec!["redis.url=rediss://redis:6380", "redis.tls.enabled=true"],
            "redis.tls.enabled needs redis.tls.caSecret",
        ),
        (
            vec!["redis.tls.enabled=true", "redis.tls.caSecret=redis-ca"],
            "needs a rediss:// redis.url",
        ),
        (
            vec!["resultWriter.database.tls.enabled=true"],
            "resultWriter.database.tls.enabled needs resultWriter.database.tls.caSecret",
        ),
    ] {
        let error = render(&[], &set).expect_err(&format!("{set:?}"));
        assert!(error.contains(wanted), "{set:?}: {error}");
    }
    for typo in [
        "redis.tls.enable=true",
        "resultWriter.database.tls.caSecretkey=x",
        "resultWriter.database.passwordSecrets=x",
    ] {
        let error = render(&[], &[typo]).expect_err(typo);
        assert!(
            error.contains("values don't meet the specifications of the schema"),
            "{typo}: {error}"
        );
    }
}

/// The Kafka SASL password and the database password file reach no environment variable, in
/// any workload or the topics Job, whether the chart holds them or a Secret of the operator's.
#[test]
fn no_password_of_a_mounted_file_reaches_an_environment_variable() {
    let existing = existing_secrets();
    for (values, passwords) in [
        ("secrets-values.yaml", vec!["kafka-password-0f9e8d"]),
        (
            "tls-values.yaml",
            vec!["existing-kafka-password", "db-file-password-6f5e4d"],
        ),
        (
            "existing-secrets-values.yaml",
            vec!["existing-kafka-password"],
        ),
    ] {
        let rendered = render_ok(&[values], &[]);
        let workloads: Vec<&Value> = rendered
            .workloads()
            .chain(rendered.of_kind("Job"))
            .collect();
        assert!(workloads.len() >= 6, "{values}");
        for workload in workloads {
            let context = format!("{values}: {}", workload["metadata"]["name"]);
            let env = rendered
                .container_env(workload, &existing)
                .unwrap_or_else(|e| panic!("{context}: {e}"));
            for (name, value) in &env {
                for password in &passwords {
                    assert!(!value.contains(password), "{context}: {name} holds it");
                }
            }
            let text = workload.to_string();
            for password in &passwords {
                assert!(!text.contains(password), "{context}");
            }
        }
        for config_map in rendered.of_kind("ConfigMap") {
            let text = config_map.to_string();
            for password in &passwords {
                assert!(
                    !text.contains(password),
                    "{values}: {}",
                    config_map["metadata"]
                );
            }
        }
    }
}

/// The topics Job with SASL and mutual TLS: it mounts the client certificate and the password
/// file, and its script, run against those files, writes client properties that give Kafka's
/// PEM key store the certificate and key and give JAAS the password, however it is quoted.
#[test]
fn the_topics_job_presents_the_client_certificate_and_the_mounted_password() {
    let rendered = render_ok(&["tls-values.yaml"], &[]);
    let job = rendered
        .get("Job", "triage-topics")
        .expect("the topics Job");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["valueFrom"].is_null()),
        "no variable from a Secret: {}",
        container["env"]
    );
    let script = container["args"][0].as_str().unwrap();
    let cert = "/etc/triage/kafka-client/tls.crt";
    let key = "/etc/triage/kafka-client/tls.key";
    let password_file = "/etc/triage/secrets/kafka-sasl-password";
    for (path, source) in [
        (cert, ("triage-kafka-client", "tls.crt")),
        (key, ("triage-kafka-client", "tls.key")),
        (password_file, ("kafka-credentials", "password")),
        (
            "/etc/triage/kafka-ca/ca.crt",
            ("kafka-cluster-ca", "ca.crt"),
        ),
    ] {
        assert!(script.contains(path), "the script reads {path}");
        assert_file_from(&rendered, job, Some(Path::new(path)), source, "topics Job");
    }
    // /tmp holds the password and the key while the Job runs: memory, not the node's disk.
    let tmp = job["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tmp")
        .unwrap();
    assert_eq!(tmp["emptyDir"]["medium"], "Memory");

    // Run the script with sh, the mounts under a temporary directory, kafka-topics.sh a stub
    // that keeps the --command-config file.
    let dir = std::env::temp_dir().join(format!("triage-topics-job-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    let write = |path: &str, contents: &str| {
        let file = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, contents).unwrap();
    };
    let cert_pem =
        "-----BEGIN CERTIFICATE-----\nMIIBcert0\nMIIBcert1==\n-----END CERTIFICATE-----\n";
    let key_pem =
        "-----BEGIN PRIVATE KEY-----\r\nMIIEkey0\r\nMIIEkey1=\r\n-----END PRIVATE KEY-----\r\n";
    let password = r#"p"w\d$x`y 'z"#;
    write(cert, cert_pem);
    write(key, key_pem);
    write(password_file, &format!("{password}\n"));
    write("/etc/triage/kafka-ca/ca.crt", cert_pem);
    let stub = dir.join("kafka-topics.sh");
    let properties = dir.join("client.properties");
    let kept = dir.join("kept.properties");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\ncp \"$4\" '{}'\n", kept.display()),
    )
    .unwrap();
    assert_eq!(
        script.matches("/tmp").count(),
        script.matches("/tmp/client.properties").count(),
        "the script writes nothing but its properties to /tmp"
    );
    let run = |script: &str| {
        let script = script
            .replace("/etc/triage/", &format!("{}/etc/triage/", root.display()))
            .replace("/tmp/client.properties", &properties.display().to_string())
            .replace(
                "/opt/kafka/bin/kafka-topics.sh",
                &format!("sh {}", stub.display()),
            );
        std::process::Command::new("sh")
            .args(["-ec", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("SASL_USERNAME", "triage")
            .env("BOOTSTRAP", "kafka:9093")
            .output()
            .expect("sh runs")
    };
    let output = run(script);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written = java_properties(&std::fs::read_to_string(&kept).unwrap());
    assert_eq!(written["security.protocol"], "SASL_SSL");
    assert_eq!(written["ssl.keystore.type"], "PEM");
    assert_eq!(written["ssl.keystore.certificate.chain"], cert_pem);
    assert_eq!(written["ssl.keystore.key"], key_pem.replace('\r', ""));
    assert_eq!(written["ssl.truststore.type"], "PEM");
    assert_eq!(
        written["sasl.jaas.config"],
        r#"org.apache.kafka.common.security.scram.ScramLoginModule required username="triage" password="p\"w\\d$x`y 'z";"#
    );

    // A PKCS#1 key, which Kafka's PEM key store cannot read, stops the Job with a reason.
    write(
        key,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEkey0\n-----END RSA PRIVATE KEY-----\n",
    );
    let output = run(script);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not an unencrypted PKCS#8 key"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();

    // Without a client certificate the Job mounts none and sets no key store.
    let sasl_only = render_ok(&["existing-secrets-values.yaml"], &[]);
    let job = sasl_only.get("Job", "triage-topics").unwrap();
    let text = job.to_string();
    assert!(!text.contains("kafka-client") && !text.contains("ssl.keystore"));
    assert!(text.contains("/etc/triage/secrets/kafka-sasl-password"));
}

/// `key=value` lines of a Java properties file as `java.util.Properties.load` reads them (the
/// escapes the Job writes: `\n`, `\\`, and `\` before any other character).
fn java_properties(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, raw) = line.split_once('=').expect("key=value");
            let mut value = String::new();
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    value.push(c);
                    continue;
                }
                match chars.next() {
                    Some('n') => value.push('\n'),
                    Some('r') => value.push('\r'),
                    Some('t') => value.push('\t'),
                    Some(other) => value.push(other),
                    None => {}
                }
            }
            (key.to_owned(), value)
        })
        .collect()
}
