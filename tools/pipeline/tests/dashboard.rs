//! The Grafana dashboard (deploy/grafana) charts only metrics the services register. Families
//! without samples yet are not exported, so the check reads the registrations in the source.

use std::{collections::HashSet, path::Path};

use serde_json::Value;
use triage_test_support::workspace_root;

fn dashboard_metrics() -> HashSet<String> {
    let path = workspace_root().join("deploy/grafana/triage-pipeline.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (start, _) in expr.match_indices("triage_") {
                let name: String = expr[start + "triage_".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(family(&name));
            }
        }
    }
    names
}

/// The metric family of a sample name (`x_bucket`, `x_total` → `x`).
fn family(name: &str) -> String {
    ["_bucket", "_total", "_count", "_sum"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
        .to_owned()
}

/// Every name passed to a prometheus-client `register` call under `dir`.
fn registered(dir: &Path, names: &mut HashSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() && !path.ends_with("target") {
            registered(&path, names);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).unwrap();
            for (start, _) in source.match_indices(".register") {
                let rest = &source[start..];
                let Some(open) = rest.find('"') else { continue };
                // The name is the first string literal of the call.
                if rest[..open].contains(';') {
                    continue;
                }
                let name: String = rest[open + 1..].chars().take_while(|c| *c != '"').collect();
                names.insert(name);
            }
        }
    }
}

#[test]
fn every_metric_on_the_dashboard_is_registered_by_a_service() {
    let mut names = HashSet::new();
    for dir in ["services", "crates"] {
        registered(&workspace_root().join(dir), &mut names);
    }
    let missing: Vec<_> = dashboard_metrics()
        .into_iter()
        .filter(|name| !names.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard charts metrics nobody registers: {missing:?}"
    );
}
