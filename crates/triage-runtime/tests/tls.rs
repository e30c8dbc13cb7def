//! Kafka and Redis over TLS against the real servers of the TLS stack (`deploy/tls-stack.sh up`):
//! Kafka's SASL_SSL listener with SCRAM-SHA-512, its SSL listener that requires a client
//! certificate, and Redis with TLS only. Each also meets a CA that did not sign the server's
//! certificate, and must be refused with an error that says so.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext, Message,
    consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer},
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
};
use triage_runtime::{
    config::{KafkaConfig, Secret},
    kafka::admin::{TopicSpec, ensure_topics},
    tls::{TlsConfig, redis_client},
};
use triage_test_support::{TestContext, TlsStack, expect_exit_78_with_one_line, free_port};

fn sasl_ssl(ca: &str) -> KafkaConfig {
    let stack = TlsStack::get();
    KafkaConfig {
        bootstrap_servers: stack.kafka_sasl_bootstrap.clone(),
        security_protocol: "sasl_ssl".into(),
        sasl_mechanism: Some("SCRAM-SHA-512".into()),
        sasl_username: Some(stack.kafka_sasl_username.clone()),
        sasl_password_file: Some(stack.file("kafka-password")),
        ssl_ca_location: Some(stack.file(ca)),
        ..Default::default()
    }
}

fn mtls(ca: &str, client_certificate: bool) -> KafkaConfig {
    let stack = TlsStack::get();
    KafkaConfig {
        bootstrap_servers: stack.kafka_mtls_bootstrap.clone(),
        security_protocol: "ssl".into(),
        ssl_ca_location: Some(stack.file(ca)),
        ssl_certificate_location: client_certificate.then(|| stack.file("client.crt")),
        ssl_key_location: client_certificate.then(|| stack.file("client.key")),
        ..Default::default()
    }
}

/// Creates a topic through `kafka`, produces one record per tenant and reads them all back with a
/// consumer group: every kind of request a service makes goes over the secured listener.
async fn round_trip(kafka: &KafkaConfig, test: &str) {
    let context = TestContext::new(test);
    let topic = context.topics.results.clone();
    ensure_topics(
        kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 2,
            replication_factor: 1,
            min_insync_replicas: 1,
            retention: Duration::from_secs(3600),
        }],
    )
    .await
    .unwrap();
    let producer: FutureProducer = kafka.producer_config("tls-test").create().unwrap();
    let tenants = ["tenant-a", "tenant-b", "tenant-c"];
    for tenant in tenants {
        producer
            .send(
                FutureRecord::to(&topic).key(tenant).payload(tenant),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }
    let consumer: StreamConsumer = kafka
        .consumer_config("tls-test", &context.group("tls"))
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < tenants.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} read back over TLS"))
            .unwrap();
        seen.push(String::from_utf8(message.payload().unwrap().to_vec()).unwrap());
    }
    seen.sort();
    assert_eq!(seen, tenants);
}

/// Keeps every error librdkafka reports, so a test can read why a client cannot connect.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl ClientContext for Errors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap().push(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Errors {}

/// Asks for metadata with `kafka` and returns librdkafka's reported errors once one contains
/// `expected`; panics if the request succeeds or no such error comes within 20 s.
fn refused_with(kafka: &KafkaConfig, expected: &str) -> String {
    let errors = Errors::default();
    let client: BaseConsumer<Errors> = kafka
        .client_config("tls-refused")
        .create_with_context(errors.clone())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            client
                .fetch_metadata(None, Duration::from_millis(500))
                .is_err(),
            "the broker answered a client that should have been refused"
        );
        // Errors reach the context from poll.
        let _ = client.poll(Duration::from_millis(100));
        let reported = errors.0.lock().unwrap().join("\n");
        if reported.contains(expected) {
            return reported;
        }
        assert!(
            Instant::now() < deadline,
            "no error containing {expected:?} within 20 s; reported:\n{reported}"
        );
    }
}

#[tokio::test]
async fn tls_kafka_sasl_ssl_scram_round_trip() {
    round_trip(&sasl_ssl("ca.crt"), "tls_kafka_sasl_ssl_scram_round_trip").await;
}

#[test]
fn tls_kafka_sasl_ssl_refuses_a_broker_of_another_ca_and_a_wrong_password() {
    let reported = refused_with(&sasl_ssl("wrong-ca.crt"), "certificate verify failed");
    let password = TlsStack::get().password("kafka-password");
    assert!(!reported.contains(&password), "{reported}");

    let wrong_password = KafkaConfig {
        sasl_password_file: None,
        sasl_password: Some(Secret::new("not-the-password")),
        ..sasl_ssl("ca.crt")
    };
    refused_with(&wrong_password, "Authentication failed");
}

#[tokio::test]
async fn tls_kafka_mtls_round_trip() {
    round_trip(&mtls("ca.crt", true), "tls_kafka_mtls_round_trip").await;
}

#[test]
fn tls_kafka_mtls_refuses_a_broker_of_another_ca_and_a_client_without_certificate() {
    refused_with(&mtls("wrong-ca.crt", true), "certificate verify failed");
    // The broker requires a client certificate and answers its absence with a TLS alert.
    refused_with(&mtls("ca.crt", false), "alert bad certificate");
}

fn redis_tls(ca: &str) -> TlsConfig {
    TlsConfig {
        enabled: true,
        ca_file: Some(TlsStack::get().file(ca)),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_redis_rediss_round_trip_per_tenant() {
    let url = Secret::new(TlsStack::get().redis_url.clone());
    let client = redis_client(&url, &redis_tls("ca.crt")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = format!("tls-test:{}:", std::process::id());
    for tenant in ["tenant-a", "tenant-b"] {
        let key = format!("{prefix}{tenant}");
        redis::cmd("SET")
            .arg(&key)
            .arg(tenant)
            .query_async::<()>(&mut connection)
            .await
            .unwrap();
        let value: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(value, tenant);
    }
}

#[tokio::test]
async fn tls_redis_refuses_a_server_of_another_ca() {
    let url = Secret::new(TlsStack::get().redis_url.clone());
    let client = redis_client(&url, &redis_tls("wrong-ca.crt")).unwrap();
    let Err(error) = client.get_multiplexed_async_connection().await else {
        panic!("a server of another CA must be refused");
    };
    assert!(
        triage_runtime::tls::is_certificate_rejection(&error),
        "not classed as a refused certificate: {error}"
    );
    assert!(error.to_string().contains("certificate"), "{error}");
}

#[test]
fn tls_redis_plain_url_with_tls_enabled_is_refused() {
    let url = Secret::new("redis://127.0.0.1:1");
    let error = redis_client(&url, &redis_tls("ca.crt")).unwrap_err();
    assert!(error.to_string().contains("rediss://"), "{error}");
}

/// Both services that talk to Redis, given a CA that did not sign its certificate, stop at start
/// with one line and exit code 78: the worker needs Redis before it takes a task, and the ingress,
/// which serves without Redis while Redis is down, does not take a refused certificate for an
/// outage.
#[tokio::test]
async fn tls_services_with_a_wrong_redis_ca_exit_78_with_one_clear_line() {
    let stack = TlsStack::get();
    let ctx = TestContext::new("tls_wrong_redis_ca");
    let wrong_ca = stack.file("wrong-ca.crt").display().to_string();
    let mut publisher = ctx.provisioning_service_env();
    publisher.extend(
        [
            ("TRIAGE_REDIS__URL", stack.redis_url.clone()),
            ("TRIAGE_REDIS__TLS__ENABLED", "true".into()),
            ("TRIAGE_REDIS__TLS__CA_FILE", wrong_ca.clone()),
            ("TRIAGE_REDIS__KEY_PREFIX", ctx.redis_prefix.clone()),
            (
                "TRIAGE_INGRESS__HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "TRIAGE_INGRESS__GRPC_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
            ("TRIAGE_DISPATCH__ENABLED", "false".into()),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    let line =
        expect_exit_78_with_one_line("ticket-publisher", &publisher, "ingress listening", &[])
            .await;
    assert!(
        line.starts_with("ticket-publisher: redis refused the TLS handshake (redis.tls): ")
            && line.contains("UnknownIssuer"),
        "{line}"
    );

    let mut worker = ctx.service_env();
    worker.extend(
        [
            ("TRIAGE_CACHE__REDIS_URL", stack.redis_url.clone()),
            ("TRIAGE_CACHE__TLS__ENABLED", "true".into()),
            ("TRIAGE_CACHE__TLS__CA_FILE", wrong_ca),
            ("TRIAGE_CACHE__KEY_PREFIX", ctx.redis_prefix.clone()),
            ("TRIAGE_CONSUMER__GROUP_ID", ctx.group("worker")),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    let line =
        expect_exit_78_with_one_line("inference-worker", &worker, "admin server listening", &[])
            .await;
    assert!(
        line.starts_with("inference-worker: failed to connect to redis (cache.redis_url): ")
            && line.contains("UnknownIssuer"),
        "{line}"
    );
}
