//! deploy/docker-compose.yml, checked without a Docker engine: every pipeline service's
//! `TRIAGE_*` environment loads into its real `Config` (unknown keys and bad values would stop
//! the container at start), and the wiring between containers is consistent.

use triage_deploy_tests::{compose_file as compose, load_config};

/// A service's environment, with `${VAR:-default}` resolved to its default (what a user who sets
/// nothing gets).
fn environment(document: &serde_norway::Value, service: &str) -> Vec<(String, String)> {
    let mapping = document["services"][service]["environment"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{service} has no environment mapping"));
    mapping
        .iter()
        .map(|(key, value)| {
            let value = match value {
                serde_norway::Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_owned(),
            };
            let value = match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                Some(expression) => expression
                    .split_once(":-")
                    .map(|(_, default)| default.to_owned())
                    .unwrap_or_default(),
                None => value,
            };
            (key.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

#[test]
fn every_service_environment_loads_into_its_config() {
    let document = compose();
    let env = |service| environment(&document, service);

    let publisher: ticket_publisher::config::Config =
        load_config("", &env("ticket-publisher")).unwrap();
    assert_eq!(publisher.kafka.bootstrap_servers, "kafka:9092");
    assert_eq!(publisher.auth.keys.len(), 1, "the demo key");
    assert_eq!(
        publisher.auth.keys[0].key_sha256.expose(),
        "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c",
        "sha256 of demo-key, the key the comments tell users to send"
    );
    let worker: inference_worker::config::Config =
        load_config("", &env("inference-worker")).unwrap();
    assert_eq!(worker.llm.base_url, "http://llm-sim:8089/v1");
    assert_eq!(worker.cache.redis_url.expose(), "redis://redis:6379");
    let writer: result_writer::config::Config = load_config("", &env("result-writer")).unwrap();
    assert_eq!(writer.auth.keys.len(), 1);
    assert!(writer.database.url.expose().contains("@postgres:5432/"));
    let alerter: dlq_alerter::config::Config = load_config("", &env("dlq-alerter")).unwrap();
    assert_eq!(alerter.topic_provisioning.replication_factor, 1);
    assert_eq!(alerter.topic_provisioning.min_insync_replicas, 1);
    let autoscaler: lag_autoscaler::config::Config =
        load_config("", &env("lag-autoscaler")).unwrap();
    assert!(!autoscaler.external_metrics.enabled);
}

#[test]
fn containers_are_wired_to_each_other() {
    let document = compose();
    let services = document["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for wanted in [
        "kafka",
        "redis",
        "postgres",
        "llm-sim",
        "ticket-publisher",
        "inference-worker",
        "result-writer",
        "dlq-alerter",
        "lag-autoscaler",
    ] {
        assert!(names.contains(&wanted), "{wanted} is missing");
    }
    // What each container runs, and as whom, is compared with the Dockerfile by
    // tests/image_agreement.rs.
    for (name, service) in services {
        let name = name.as_str().unwrap();
        for dependency in service["depends_on"]
            .as_mapping()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            assert!(
                names.contains(&dependency.as_str().unwrap()),
                "{name} depends on {dependency:?}"
            );
        }
    }
    // llm-sim listens where the worker calls it.
    let llm_sim = &services["llm-sim"]["command"];
    let args: Vec<&str> = llm_sim
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:8089"]));
}
