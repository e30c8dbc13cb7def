//! The lag-autoscaler binary against the local stack: it becomes ready, and stops cleanly on SIGTERM.

use triage_test_support::{
    TestContext, assert_bad_config_fails_with_one_line_naming_the_key,
    assert_starts_ready_and_exits_zero_on_sigterm, free_port,
};

const BINARY: &str = env!("CARGO_BIN_EXE_lag-autoscaler");

#[tokio::test]
async fn starts_ready_and_exits_zero_on_sigterm() {
    let mut env = TestContext::new("lag_autoscaler").service_env();
    // Not the default 6443: tests run in parallel on one machine.
    env.push((
        "TRIAGE_EXTERNAL_METRICS__LISTEN".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    // No API server here to read the request-header CA from (tests/k8s.rs has one).
    env.push((
        "TRIAGE_EXTERNAL_METRICS__AUTHENTICATION__MODE".into(),
        "none".into(),
    ));
    assert_starts_ready_and_exits_zero_on_sigterm(BINARY, lag_autoscaler::SERVICE, &env).await;
}

#[test]
fn a_bad_configuration_value_fails_with_one_line_naming_the_key() {
    assert_bad_config_fails_with_one_line_naming_the_key(BINARY);
}
