//! The dlq-alerter binary against the local stack: it becomes ready, and stops cleanly on SIGTERM.

use triage_test_support::{
    TestContext, assert_bad_config_fails_with_one_line_naming_the_key,
    assert_starts_ready_and_exits_zero_on_sigterm,
};

const BINARY: &str = env!("CARGO_BIN_EXE_dlq-alerter");

#[tokio::test]
async fn starts_ready_and_exits_zero_on_sigterm() {
    let mut env = TestContext::new("dlq_alerter").provisioning_service_env();
    // An output is required; nothing is posted, as the test's dead-letter topic stays empty.
    env.push((
        "TRIAGE_WEBHOOK__URL".into(),
        format!("http://127.0.0.1:{}/hook", triage_test_support::free_port()),
    ));
    assert_starts_ready_and_exits_zero_on_sigterm(BINARY, dlq_alerter::SERVICE, &env).await;
}

#[test]
fn a_bad_configuration_value_fails_with_one_line_naming_the_key() {
    assert_bad_config_fails_with_one_line_naming_the_key(BINARY);
}
