//! The real `llm-sim` binary: flags, the start-up line, serving, and exit on SIGTERM.

use std::{path::Path, time::Duration};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;
use triage_test_support::{ServiceProcess, free_port, wait_until};

const BINARY: &str = env!("CARGO_BIN_EXE_llm-sim");

#[tokio::test]
async fn binary_serves_its_flags_and_says_it_is_a_simulator() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let process = ServiceProcess::spawn(
        Path::new(BINARY),
        &[
            "--listen",
            &listen,
            "--model",
            "demo-model",
            "--rpm",
            "2",
            "--tpm",
            "50000",
            "--latency-ms",
            "150",
            "--fault",
            "content_filter:p=0,duration_ms=60000",
        ],
        &[],
    );
    let client = reqwest::Client::new();
    let base = format!("http://{listen}");
    let models: Value = wait_until("llm-sim to listen", Duration::from_secs(10), || async {
        let response = client.get(format!("{base}/v1/models")).send().await.ok()?;
        response.json().await.ok()
    })
    .await;
    assert_eq!(models["data"][0]["id"], "demo-model");
    let log = process.log();
    assert!(
        log.contains("this is a simulator, not a language model"),
        "{log}"
    );

    let config: Value = client
        .get(format!("{base}/_sim/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["latency"], json!({"kind": "fixed", "ms": 150}));
    assert_eq!(config["rate_limits"]["rpm"], 2);
    assert_eq!(config["rate_limits"]["tpm"], 50000);
    assert_eq!(config["faults"][0]["fault"], "content_filter");
    assert_eq!(config["faults"][0]["probability"], 0.0);

    let request = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "<ticket>The API is down, 503 everywhere</ticket>"}],
        "response_format": {"type": "json_object"}
    });
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-test")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "1");
    assert_eq!(response.headers()["x-ratelimit-reset-requests"], "30s");
    let body: Value = response.json().await.unwrap();
    let answer: Value =
        serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(answer["category"], "outage");
    // The key must not leak into the log.
    assert!(!process.log().contains("sk-test"));

    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status}: {}", process.log());
}

#[test]
fn bad_flags_fail_with_one_line() {
    let output = ServiceProcess::run_to_exit(Path::new(BINARY), &["--rpm", "0"], &[]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("rate_limits.rpm"), "{stderr}");

    let output = ServiceProcess::run_to_exit(Path::new(BINARY), &["--latency", "gaussian:5"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown latency kind"));
}
