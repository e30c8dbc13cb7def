//! The result-writer binary against the local stack: it becomes ready, and stops cleanly on SIGTERM.

use triage_test_support::{
    TestContext, assert_bad_config_fails_with_one_line_naming_the_key,
    assert_starts_ready_and_exits_zero_on_sigterm, free_port,
};

mod common;

const BINARY: &str = env!("CARGO_BIN_EXE_result-writer");

#[tokio::test]
async fn starts_ready_and_exits_zero_on_sigterm() {
    let ctx = TestContext::new("result_writer");
    let mut env = ctx.service_env();
    // Its own schema and API port, so that parallel tests and other services are unaffected.
    env.push(("TRIAGE_DATABASE__SCHEMA".into(), ctx.db_schema.clone()));
    env.push((
        "TRIAGE_API__LISTEN".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    env.push(("TRIAGE_CONSUMER__GROUP_ID".into(), ctx.group("writer")));
    assert_starts_ready_and_exits_zero_on_sigterm(BINARY, result_writer::SERVICE, &env).await;
    common::Db::connect(&ctx.db_schema)
        .await
        .drop_schema()
        .await;
}

#[test]
fn a_bad_configuration_value_fails_with_one_line_naming_the_key() {
    assert_bad_config_fails_with_one_line_naming_the_key(BINARY);
}
