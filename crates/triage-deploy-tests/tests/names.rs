//! Names the API server refuses although `helm lint`, `helm template` and decoding into the typed
//! API all accept them: the API server's validation (k8s.io/apimachinery's `validation`
//! package) is not in the OpenAPI schema. The chart once named a port `external-metrics`
//! (16 characters): rendered and schema-checked cleanly, refused at install with
//! "must be no more than 15 characters". These rules are the API server's, written once here.

use regex::Regex;
use serde_json::Value;
use triage_deploy_tests::{render, value_sets};

/// `IsValidPortName` (IANA_SVC_NAME): at most 15 characters of [a-z0-9-], at least one letter,
/// no hyphen at either end, no two hyphens in a row.
fn port_name_problem(name: &str) -> Option<String> {
    if name.len() > 15 {
        return Some(format!("{name:?} is longer than 15 characters"));
    }
    if !Regex::new("^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
        .unwrap()
        .is_match(name)
    {
        return Some(format!(
            "{name:?} must be lowercase letters, digits and inner hyphens"
        ));
    }
    if name.contains("--") {
        return Some(format!("{name:?} has two hyphens in a row"));
    }
    if !name.chars().any(|c| c.is_ascii_lowercase()) {
        return Some(format!("{name:?} has no letter"));
    }
    None
}

/// `IsDNS1123Label`: container, volume and (DNS-1035, also starting with a letter) Service names.
fn label_problem(name: &str, must_start_with_letter: bool) -> Option<String> {
    let pattern = if must_start_with_letter {
        "^[a-z]([-a-z0-9]*[a-z0-9])?$"
    } else {
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    };
    if name.len() > 63 || !Regex::new(pattern).unwrap().is_match(name) {
        return Some(format!("{name:?} is not a DNS label"));
    }
    None
}

/// `IsDNS1123Subdomain`: most object names.
fn subdomain_problem(name: &str) -> Option<String> {
    let pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    if name.len() > 253 || !Regex::new(pattern).unwrap().is_match(name) {
        return Some(format!("{name:?} is not a DNS subdomain"));
    }
    None
}

/// `IsValidLabelValue`.
fn label_value_problem(value: &str) -> Option<String> {
    let pattern = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
    if value.len() > 63 || !Regex::new(pattern).unwrap().is_match(value) {
        return Some(format!("label value {value:?} is invalid"));
    }
    None
}

/// A named port reference (`targetPort`, a probe's `port`) must be a valid port name.
fn port_reference_problem(reference: &Value) -> Option<String> {
    reference.as_str().and_then(port_name_problem)
}

fn pod_spec_problems(pod: &Value, problems: &mut Vec<String>) {
    for container in pod["containers"].as_array().into_iter().flatten() {
        let name = container["name"].as_str().unwrap_or_default();
        problems.extend(label_problem(name, false));
        for port in container["ports"].as_array().into_iter().flatten() {
            if let Some(port_name) = port["name"].as_str() {
                problems.extend(
                    port_name_problem(port_name).map(|p| format!("container {name} port {p}")),
                );
            }
        }
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let reference = &container[probe]["httpGet"]["port"];
            problems.extend(port_reference_problem(reference).map(|p| format!("{probe} {p}")));
        }
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        problems.extend(label_problem(
            volume["name"].as_str().unwrap_or_default(),
            false,
        ));
    }
}

/// Every name in one object that the API server would refuse.
fn problems(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut problems = Vec::new();
    match kind {
        "Service" => problems.extend(label_problem(name, true)),
        // The controller-revision-hash label of a StatefulSet's pods is `<name>-<hash>`, a
        // label value: names longer than 52 characters leave no room for the hash.
        "StatefulSet" if name.len() > 52 => {
            problems.push(format!("StatefulSet {name:?} is longer than 52 characters"));
        }
        // RBAC names are path segments, ':' allowed; everything else a DNS subdomain.
        "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" => {}
        _ => problems.extend(subdomain_problem(name)),
    }
    for (_, value) in object["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        problems.extend(label_value_problem(value.as_str().unwrap_or_default()));
    }
    if kind == "Service" {
        for port in object["spec"]["ports"].as_array().into_iter().flatten() {
            problems.extend(port["name"].as_str().and_then(port_name_problem));
            problems.extend(port_reference_problem(&port["targetPort"]));
        }
    }
    let pod = &object["spec"]["template"]["spec"];
    if !pod.is_null() {
        pod_spec_problems(pod, &mut problems);
    }
    problems
        .into_iter()
        .map(|p| format!("{kind} {name}: {p}"))
        .collect()
}

#[test]
fn the_rules_refuse_what_the_api_server_refused() {
    assert!(port_name_problem("external-metrics").is_some());
    assert!(port_name_problem("ext-metrics").is_none());
    assert!(port_name_problem("8080").is_some());
    assert!(port_name_problem("a--b").is_some());
    assert!(label_problem("Admin", false).is_some());
    assert!(label_problem("1abc", true).is_some());
    let service = serde_json::json!({
        "kind": "Service", "metadata": {"name": "tt-lag-autoscaler"},
        "spec": {"ports": [{"name": "external-metrics", "targetPort": "external-metrics"}]}
    });
    assert_eq!(problems(&service).len(), 2, "{:?}", problems(&service));
}

#[test]
fn every_rendered_name_is_one_the_api_server_accepts() {
    let mut found = Vec::new();
    let extra: &[&[&str]] = &[
        &[],
        // The loopback control-plane test's values: lag-autoscaler outside the cluster.
        &[
            "lagAutoscaler.service.externalName=localhost",
            "lagAutoscaler.service.port=16444",
        ],
        // A release name longer than the chart keeps (tt.fullname truncates it).
        &["fullnameOverride=a-very-long-release-name-that-gets-truncated-somewhere"],
    ];
    for values in value_sets() {
        for set in extra {
            let rendered = render(&[values.as_str()], set)
                .unwrap_or_else(|e| panic!("helm template {values} {set:?}: {e}"));
            for object in &rendered.manifests {
                found.extend(
                    problems(object)
                        .into_iter()
                        .map(|p| format!("{values} {set:?}: {p}")),
                );
            }
        }
    }
    assert!(
        found.is_empty(),
        "names the API server refuses:\n{}",
        found.join("\n")
    );
}
