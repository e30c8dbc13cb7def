//! The ticket-publisher binary against the local stack: it becomes ready, and stops cleanly on SIGTERM.

use triage_test_support::{
    TestContext, assert_bad_config_fails_with_one_line_naming_the_key,
    assert_starts_ready_and_exits_zero_on_sigterm,
};

const BINARY: &str = env!("CARGO_BIN_EXE_ticket-publisher");

#[tokio::test]
async fn starts_ready_and_exits_zero_on_sigterm() {
    let ctx = TestContext::new("ticket_publisher");
    let mut env = ctx.service_env();
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
