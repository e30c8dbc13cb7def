//! PostgreSQL over TLS with verify-full, against the TLS stack's real server
//! (`deploy/tls-stack.sh up`), which accepts the `triage` role only over TLS and with the password
//! of a file. A server whose certificate another CA signed is refused, and the service binary
//! then stops with one line and exit code 78 instead of retrying forever.

use std::time::Duration;

use result_writer::{
    config::DatabaseConfig,
    db::{self, DbFailure},
};
use triage_runtime::{config::Secret, tls::TlsConfig};
use triage_test_support::{TestContext, TlsStack, expect_exit_78_with_one_line, free_port};

fn database(ctx: &TestContext, ca: &str) -> DatabaseConfig {
    let stack = TlsStack::get();
    DatabaseConfig {
        url: Secret::new(stack.database_url.clone()),
        password_file: Some(stack.file("postgres-password")),
        tls: TlsConfig {
            enabled: true,
            ca_file: Some(stack.file(ca)),
            ..Default::default()
        },
        schema: ctx.db_schema.clone(),
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_postgres_verify_full_migrates_and_the_session_is_encrypted() {
    let ctx = TestContext::new("tls_postgres_verify_full");
    let pool = db::connect(&database(&ctx, "ca.crt")).unwrap();
    db::migrate(&pool, &ctx.db_schema).await.unwrap();
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session is not encrypted");
    let version: String = row.get(1);
    assert!(version.starts_with("TLSv1."), "{version}");
    client
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", ctx.db_schema))
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_postgres_refuses_a_server_of_another_ca_as_fatal() {
    let ctx = TestContext::new("tls_postgres_wrong_ca");
    let pool = db::connect(&database(&ctx, "wrong-ca.crt")).unwrap();
    let error = db::migrate(&pool, &ctx.db_schema).await.unwrap_err();
    assert_eq!(error.failure(), DbFailure::Fatal, "{error}");
    assert!(error.to_string().contains("certificate"), "{error}");
}

/// The service binary with a PostgreSQL CA that did not sign the server's certificate: one line
/// naming the refused certificate, exit code 78 (EX_CONFIG), no retry loop, no panic, no password.
#[tokio::test]
async fn tls_result_writer_with_a_wrong_ca_exits_78_with_one_clear_line() {
    let ctx = TestContext::new("tls_result_writer_wrong_ca");
    let stack = TlsStack::get();
    let line = exits_78_with_one_line(
        &ctx,
        &[
            (
                "TRIAGE_DATABASE__PASSWORD_FILE",
                stack.file("postgres-password").display().to_string(),
            ),
            ("TRIAGE_DATABASE__TLS__ENABLED", "true".into()),
            (
                "TRIAGE_DATABASE__TLS__CA_FILE",
                stack.file("wrong-ca.crt").display().to_string(),
            ),
        ],
        "cannot migrate the database yet",
    )
    .await;
    assert!(
        line.starts_with("result-writer: failed to migrate the database: ")
            && line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
}

/// The same for Kafka, which librdkafka would otherwise retry forever: a CA that did not sign the
/// brokers' certificates (mTLS listener), and a wrong SASL password (SASL_SSL listener). The check
/// runs before any stage starts, so it is the same for every service.
#[tokio::test]
async fn tls_result_writer_with_a_wrong_kafka_ca_or_password_exits_78_with_one_clear_line() {
    let ctx = TestContext::new("tls_result_writer_wrong_kafka_ca");
    let stack = TlsStack::get();
    let file = |name: &str| stack.file(name).display().to_string();
    let line = exits_78_with_one_line(
        &ctx,
        &[
            (
                "TRIAGE_KAFKA__BOOTSTRAP_SERVERS",
                stack.kafka_mtls_bootstrap.clone(),
            ),
            ("TRIAGE_KAFKA__SECURITY_PROTOCOL", "ssl".into()),
            ("TRIAGE_KAFKA__SSL_CA_LOCATION", file("wrong-ca.crt")),
            ("TRIAGE_KAFKA__SSL_CERTIFICATE_LOCATION", file("client.crt")),
            ("TRIAGE_KAFKA__SSL_KEY_LOCATION", file("client.key")),
        ],
        "admin server listening",
    )
    .await;
    assert!(
        line.starts_with(
            "result-writer: the Kafka brokers refused this client's security settings: "
        ) && line.contains("certificate verify failed"),
        "{line}"
    );

    let line = exits_78_with_one_line(
        &ctx,
        &[
            (
                "TRIAGE_KAFKA__BOOTSTRAP_SERVERS",
                stack.kafka_sasl_bootstrap.clone(),
            ),
            ("TRIAGE_KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("TRIAGE_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512".into()),
            (
                "TRIAGE_KAFKA__SASL_USERNAME",
                stack.kafka_sasl_username.clone(),
            ),
            ("TRIAGE_KAFKA__SASL_PASSWORD", "not-the-password".into()),
            ("TRIAGE_KAFKA__SSL_CA_LOCATION", file("ca.crt")),
        ],
        "admin server listening",
    )
    .await;
    assert!(
        line.contains("refused this client's security settings")
            && line.contains("Authentication failed"),
        "{line}"
    );
    assert!(!line.contains("not-the-password"), "{line}");
}

/// Starts result-writer against the TLS stack's PostgreSQL with `overrides` and returns the one
/// plain line it printed before exiting 78 (see [`expect_exit_78_with_one_line`]).
async fn exits_78_with_one_line(
    ctx: &TestContext,
    overrides: &[(&str, String)],
    no_retry: &str,
) -> String {
    let stack = TlsStack::get();
    let mut env = ctx.service_env();
    env.extend(
        [
            ("TRIAGE_DATABASE__URL", stack.database_url.clone()),
            ("TRIAGE_DATABASE__SCHEMA", ctx.db_schema.clone()),
            ("TRIAGE_API__LISTEN", format!("127.0.0.1:{}", free_port())),
            ("TRIAGE_CONSUMER__GROUP_ID", ctx.group("writer")),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    env.extend(
        overrides
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone())),
    );
    let secrets = ["postgres-password", "kafka-password"].map(|name| stack.password(name));
    expect_exit_78_with_one_line("result-writer", &env, no_retry, &secrets).await
}
