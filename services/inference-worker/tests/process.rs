//! The inference-worker binary against the local stack: it becomes ready, and stops cleanly on SIGTERM.

use triage_test_support::{
    TestContext, assert_bad_config_fails_with_one_line_naming_the_key,
    assert_starts_ready_and_exits_zero_on_sigterm,
};

const BINARY: &str = env!("CARGO_BIN_EXE_inference-worker");

#[tokio::test]
async fn starts_ready_and_exits_zero_on_sigterm() {
    let env = TestContext::new("inference_worker").service_env();
    assert_starts_ready_and_exits_zero_on_sigterm(BINARY, inference_worker::SERVICE, &env).await;
}

#[test]
fn a_bad_configuration_value_fails_with_one_line_naming_the_key() {
    assert_bad_config_fails_with_one_line_naming_the_key(BINARY);
}
