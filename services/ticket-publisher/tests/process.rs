//! The ticket-publisher binary against the local stack: it becomes ready, and stops cleanly on SIGTERM.

use std::time::{Duration, Instant};

use triage_test_support::{
    ServiceProcess, TestContext, assert_bad_config_fails_with_one_line_naming_the_key,
    assert_starts_ready_and_exits_zero_on_sigterm, free_port, workspace_binary,
};

const BINARY: &str = env!("CARGO_BIN_EXE_ticket-publisher");

#[tokio::test]
async fn starts_ready_and_exits_zero_on_sigterm() {
    let ctx = TestContext::new("ticket_publisher");
    let mut env = ctx.provisioning_service_env();
    // Ephemeral ports, so that parallel tests and other services on this machine do not collide.
    env.extend([
        ("TRIAGE_INGRESS__HTTP_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIAGE_INGRESS__GRPC_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIAGE_REDIS__KEY_PREFIX".into(), ctx.redis_prefix.clone()),
        ("TRIAGE_DISPATCH__GROUP_ID".into(), ctx.group("dispatch")),
        ("TRIAGE_DISPATCH__TRANSACTIONAL_ID".into(), ctx.group("tx")),
        ("TRIAGE_TOPIC_PROVISIONING__PARTITIONS".into(), "1".into()),
    ]);
    assert_starts_ready_and_exits_zero_on_sigterm(BINARY, ticket_publisher::SERVICE, &env).await;
}

#[test]
fn a_bad_configuration_value_fails_with_one_line_naming_the_key() {
    assert_bad_config_fails_with_one_line_naming_the_key(BINARY);
}

/// Redis is shared by every replica: were readiness to follow it, one Redis outage would take
/// every publisher out of the Service. With Redis unreachable the publisher stays ready, and
/// says what is down on `/healthz?verbose` and in `triage_dependency_up`.
#[tokio::test]
async fn stays_ready_with_redis_unreachable_and_reports_it_on_healthz_and_metrics() {
    let ctx = TestContext::new("tp_redis_down");
    let mut env = ctx.provisioning_service_env();
    // A port nothing listens on: every Redis connection is refused.
    let closed_redis = format!("redis://127.0.0.1:{}", free_port());
    env.retain(|(key, _)| key != "TRIAGE_REDIS__URL");
    env.extend([
        ("TRIAGE_REDIS__URL".into(), closed_redis),
        ("TRIAGE_INGRESS__HTTP_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIAGE_INGRESS__GRPC_LISTEN".into(), "127.0.0.1:0".into()),
        ("TRIAGE_DISPATCH__GROUP_ID".into(), ctx.group("dispatch")),
        ("TRIAGE_DISPATCH__TRANSACTIONAL_ID".into(), ctx.group("tx")),
        ("TRIAGE_TOPIC_PROVISIONING__PARTITIONS".into(), "1".into()),
    ]);
    let process = ServiceProcess::spawn(&workspace_binary("ticket-publisher"), &[], &env);
    process.wait_ready(Duration::from_secs(30)).await;

    let verbose: serde_json::Value = reqwest::get(process.admin_url("/healthz?verbose"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verbose["status"], "degraded", "{verbose}");
    assert_eq!(
        verbose["dependencies"]["redis"]["status"], "down",
        "{verbose}"
    );
    assert_eq!(
        verbose["dependencies"]["kafka"]["status"], "up",
        "{verbose}"
    );
    let metrics = process.metrics().await;
    assert!(
        metrics.contains("triage_dependency_up{dependency=\"redis\"} 0"),
        "{metrics}"
    );

    // Still ready after the background checks have seen Redis down, several times over.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let readyz = reqwest::get(process.admin_url("/readyz")).await.unwrap();
        assert_eq!(readyz.status(), reqwest::StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = process.metrics().await;
    assert!(
        metrics.contains("triage_dependency_up{dependency=\"kafka\"} 1"),
        "{metrics}"
    );
}
