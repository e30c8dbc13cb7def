//! Integration-test harness: the local stack's endpoints, names no other test uses, waits on
//! conditions with deadlines, and service binaries run as real processes.
//!
//! Tests share one broker, Redis and PostgreSQL (started by `make stack-up`); isolation comes
//! from names: every [`TestContext`] has its own topics, consumer groups, Redis key prefix and
//! database schema.

#![forbid(unsafe_code)]

pub mod poison;

use std::{
    collections::HashMap,
    future::Future,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, StreamConsumer},
    error::KafkaError,
    message::OwnedMessage,
    types::RDKafkaErrorCode,
};

/// Endpoints of the running local stack.
#[derive(Clone, Debug)]
pub struct Stack {
    pub kafka_bootstrap: String,
    pub redis_url: String,
    pub database_url: String,
    /// Brokers in the cluster (`KAFKA_BROKERS`, 1 when unset): more than one means
    /// `deploy/stack.sh --brokers N`, whose nodes the chaos run kills one at a time.
    pub kafka_brokers: usize,
    /// Replication factor of the topics tests create (`KAFKA_REPLICATION_FACTOR`, 1 when unset).
    pub replication_factor: i32,
}

impl Stack {
    /// Reads `.local/stack.env` (written by `deploy/stack.sh up`), or the file
    /// `STACK_ENV_FILE` names (`.local/cluster.env` for the three-broker cluster); `KAFKA_BOOTSTRAP`,
    /// `REDIS_URL`, `DATABASE_URL`, `KAFKA_BROKERS` and `KAFKA_REPLICATION_FACTOR` in the
    /// environment take precedence.
    ///
    /// A file rather than exported endpoints: build scripts that watch `DATABASE_URL` would
    /// rebuild their crates whenever the test harness runs `cargo build` under another value.
    pub fn get() -> &'static Stack {
        static STACK: OnceLock<Stack> = OnceLock::new();
        STACK.get_or_init(|| {
            let env_file = match std::env::var_os("STACK_ENV_FILE") {
                Some(path) => workspace_root().join(path),
                None => workspace_root().join(".local/stack.env"),
            };
            let mut values = parse_env(&std::fs::read_to_string(&env_file).unwrap_or_default());
            for key in [
                "KAFKA_BOOTSTRAP",
                "REDIS_URL",
                "DATABASE_URL",
                "KAFKA_BROKERS",
                "KAFKA_REPLICATION_FACTOR",
            ] {
                if let Ok(value) = std::env::var(key) {
                    values.insert(key.to_owned(), value);
                }
            }
            let take = |key: &str| {
                values.get(key).cloned().unwrap_or_else(|| {
                    panic!(
                        "{key} is unknown: run `make stack-up` (it writes {})",
                        env_file.display()
                    )
                })
            };
            Stack {
                kafka_bootstrap: take("KAFKA_BOOTSTRAP"),
                redis_url: take("REDIS_URL"),
                database_url: take("DATABASE_URL"),
                kafka_brokers: values
                    .get("KAFKA_BROKERS")
                    .map(|brokers| brokers.parse().expect("KAFKA_BROKERS is a number"))
                    .unwrap_or(1),
                replication_factor: values
                    .get("KAFKA_REPLICATION_FACTOR")
                    .map(|factor| {
                        factor
                            .parse()
                            .expect("KAFKA_REPLICATION_FACTOR is a number")
                    })
                    .unwrap_or(1),
            }
        })
    }
}

/// `KEY=value` lines, as the stack scripts write them.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Endpoints and certificates of the TLS stack (`deploy/tls-stack.sh up`, which `make test`
/// runs): Kafka SASL_SSL (SCRAM-SHA-512) and mTLS listeners, Redis over TLS only, PostgreSQL
/// accepting the `triage` role only over TLS.
#[derive(Clone, Debug)]
pub struct TlsStack {
    /// Folder of `ca.crt`, `wrong-ca.crt`, `client.crt`/`client.key`, `kafka-password` and
    /// `postgres-password`.
    pub certs: PathBuf,
    pub kafka_sasl_bootstrap: String,
    pub kafka_mtls_bootstrap: String,
    pub kafka_sasl_username: String,
    pub redis_url: String,
    /// Without the password: that is in `postgres-password`.
    pub database_url: String,
}

impl TlsStack {
    /// Reads `.local/tls/tls-stack.env`; panics with what to run when it is missing.
    pub fn get() -> &'static TlsStack {
        static STACK: OnceLock<TlsStack> = OnceLock::new();
        STACK.get_or_init(|| {
            let env_file = workspace_root().join(".local/tls/tls-stack.env");
            let values = parse_env(&std::fs::read_to_string(&env_file).unwrap_or_else(|_| {
                panic!(
                    "the TLS stack is not running: run `deploy/tls-stack.sh up` (it writes {})",
                    env_file.display()
                )
            }));
            let take = |key: &str| {
                values
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| panic!("{key} missing from {}", env_file.display()))
            };
            TlsStack {
                certs: PathBuf::from(take("TLS_CERTS")),
                kafka_sasl_bootstrap: take("TLS_KAFKA_SASL_BOOTSTRAP"),
                kafka_mtls_bootstrap: take("TLS_KAFKA_MTLS_BOOTSTRAP"),
                kafka_sasl_username: take("TLS_KAFKA_SASL_USERNAME"),
                redis_url: take("TLS_REDIS_URL"),
                database_url: take("TLS_DATABASE_URL"),
            }
        })
    }

    /// A file in the certificate folder (`ca.crt`, `wrong-ca.crt`, `client.key`, ...).
    pub fn file(&self, name: &str) -> PathBuf {
        self.certs.join(name)
    }

    /// The content of a password file, for asserting it never shows up in output.
    pub fn password(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).expect("password file")
    }
}

/// Starts the service binary `service` with `env` and expects it to refuse to start: exit code 78
/// (EX_CONFIG) and exactly one plain line, which is returned. Besides that line only JSON log
/// lines are allowed (a health watcher may have logged a dependency as down once), none at ERROR,
/// no panic, no line containing `no_retry` (the log of a retry loop, or of a start that got
/// further than it should) and none of `secrets`.
pub async fn expect_exit_78_with_one_line(
    service: &str,
    env: &[(String, String)],
    no_retry: &str,
    secrets: &[String],
) -> String {
    let process = ServiceProcess::spawn(&workspace_binary(service), &[], env);
    let status = process.wait_exit(Duration::from_secs(30)).await;
    let log = process.log();
    assert_eq!(status.code(), Some(78), "{log}");
    let plain_lines: Vec<&str> = log
        .lines()
        .filter(|line| !line.starts_with('{') && !line.trim().is_empty())
        .collect();
    assert_eq!(plain_lines.len(), 1, "{log}");
    assert!(!log.contains("\"level\":\"ERROR\""), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains(no_retry), "{log}");
    for secret in secrets {
        assert!(!log.contains(secret.trim()), "a secret in the log:\n{log}");
    }
    plain_lines[0].to_owned()
}

/// One transactional id as its coordinator sees it, from Kafka's own `kafka-transactions`
/// tool (librdkafka has no DescribeTransactions): e.g. `Ongoing`, `PrepareAbort`,
/// `CompleteAbort`, `CompleteCommit`, `Empty`, with the producer epoch. `None` while the
/// coordinator does not know the id or the tool cannot reach it.
pub fn describe_transaction(transactional_id: &str) -> Option<(String, i32)> {
    let libs = std::fs::read_dir(workspace_root().join(".local/kafka"))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libs-"))
        })?;
    let output = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .args([
            "org.apache.kafka.tools.TransactionsCommand",
            "--bootstrap-server",
            &Stack::get().kafka_bootstrap,
            "describe",
            "--transactional-id",
            transactional_id,
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let row: Vec<&str> = lines.next()?.split_whitespace().collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|heading| *heading == name)
            .and_then(|index| row.get(index))
    };
    let state = column("TransactionState")?.to_string();
    let epoch = column("ProducerEpoch")?.parse().ok()?;
    Some((state, epoch))
}

/// The workspace's root folder (the one holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() {
        if !dir.pop() {
            panic!("no Cargo.lock above {}", env!("CARGO_MANIFEST_DIR"));
        }
    }
    dir
}

/// The folder of the running executable's cargo profile (`<target dir>/debug`,
/// `<target dir>/release`, ...), wherever `CARGO_TARGET_DIR` or `build.target-dir` put it.
///
/// Tests run from `<profile>/deps/`, examples from `<profile>/examples/` and binaries from
/// `<profile>/`, so the executable's own path names the one build its sibling binaries belong
/// to; a spelled-out path names whatever an older build left in `./target`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable's path");
    let mut dir = exe
        .parent()
        .expect("the executable lives in a folder")
        .to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

/// Cargo's target directory: where builds, test logs (`test-logs/`) and benchmark reports
/// (`bench/`) go.
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().map(Path::to_path_buf).unwrap_or(profile)
}

/// The path of a workspace binary built with the running executable's profile, built first.
///
/// The first call in a process runs `cargo build --workspace --bins` for that profile (a no-op
/// when nothing changed), so a test or tool never starts a binary older than its sources: an
/// end-to-end test that passes on a stale binary proves nothing.
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let profile = profile_dir();
    BUILT.get_or_init(|| build_workspace_binaries(&profile));
    profile.join(name)
}

fn build_workspace_binaries(profile_dir: &Path) {
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--workspace", "--bins", "--profile"])
        .arg(&profile)
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        // Cargo's own target directory, even when the caller's environment names none.
        .env("CARGO_TARGET_DIR", target_dir())
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    assert!(
        status.success(),
        "`cargo build --workspace --bins --profile {profile}` failed ({status}); the binaries \
         in {} would be stale",
        profile_dir.display()
    );
}

/// Names that belong to one test only.
#[derive(Clone, Debug)]
pub struct TestContext {
    /// Short unique id, e.g. `roundtrip-3f9a1c`.
    pub id: String,
    pub topics: TestTopics,
    pub redis_prefix: String,
    /// A PostgreSQL schema name (lowercase, safe to interpolate).
    pub db_schema: String,
}

/// The four pipeline topics, named for one test.
#[derive(Clone, Debug)]
pub struct TestTopics {
    pub tickets_created: String,
    pub inference_tasks: String,
    pub results: String,
    pub dead_letters: String,
}

impl TestTopics {
    pub fn all(&self) -> [&str; 4] {
        [
            &self.tickets_created,
            &self.inference_tasks,
            &self.results,
            &self.dead_letters,
        ]
    }
}

impl TestContext {
    pub fn new(test_name: &str) -> Self {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let id = format!("{test_name}-{suffix}");
        let topic = |stage: &str| format!("test.{id}.{stage}");
        TestContext {
            topics: TestTopics {
                tickets_created: topic("tickets-created"),
                inference_tasks: topic("inference"),
                results: topic("results"),
                dead_letters: topic("dlq"),
            },
            redis_prefix: format!("test:{id}:"),
            db_schema: format!("test_{}", id.replace('-', "_").to_ascii_lowercase()),
            id,
        }
    }

    /// A consumer group name no other test uses.
    pub fn group(&self, role: &str) -> String {
        format!("test-{}-{role}", self.id)
    }

    /// Creates the four topics with `partitions` each; existing ones are left alone.
    pub async fn create_topics(&self, partitions: i32) {
        create_topics(&self.topics.all(), partitions).await;
    }

    /// The `TRIAGE_*` environment that points a service binary at this test's stack and topics.
    pub fn service_env(&self) -> Vec<(String, String)> {
        let stack = Stack::get();
        vec![
            (
                "TRIAGE_KAFKA__BOOTSTRAP_SERVERS".into(),
                stack.kafka_bootstrap.clone(),
            ),
            (
                "TRIAGE_TOPICS__TICKETS_CREATED".into(),
                self.topics.tickets_created.clone(),
            ),
            (
                "TRIAGE_TOPICS__INFERENCE_TASKS".into(),
                self.topics.inference_tasks.clone(),
            ),
            ("TRIAGE_TOPICS__RESULTS".into(), self.topics.results.clone()),
            (
                "TRIAGE_TOPICS__DEAD_LETTERS".into(),
                self.topics.dead_letters.clone(),
            ),
        ]
    }

    /// [`service_env`](Self::service_env) plus the topic-provisioning settings, for the
    /// services that create topics (ticket-publisher, dlq-alerter): the production defaults
    /// (3 copies, 2 in sync) lowered to what the stack has. The other services refuse the keys.
    pub fn provisioning_service_env(&self) -> Vec<(String, String)> {
        let stack = Stack::get();
        let mut env = self.service_env();
        env.extend([
            (
                "TRIAGE_TOPIC_PROVISIONING__REPLICATION_FACTOR".into(),
                stack.replication_factor.to_string(),
            ),
            (
                "TRIAGE_TOPIC_PROVISIONING__MIN_INSYNC_REPLICAS".into(),
                stack.replication_factor.min(2).to_string(),
            ),
        ]);
        env
    }
}

/// Creates topics on the stack's broker (replication factor from [`Stack`]), tolerating
/// existing ones.
pub async fn create_topics(names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config().create().expect("admin client");
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                partitions,
                TopicReplication::Fixed(Stack::get().replication_factor),
            )
        })
        .collect();
    let results = admin
        .create_topics(
            &new_topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create topics");
    for result in results {
        if let Err((topic, code)) = result
            && code != RDKafkaErrorCode::TopicAlreadyExists
        {
            panic!("cannot create test topic {topic}: {code}");
        }
    }
    wait_for_topic_leaders(names).await;
}

/// Deletes topics a run created and no longer needs, best effort: a broker left with thousands
/// of partitions from earlier runs is slower to answer and to restart, and later measurements
/// would depend on how many runs came before.
pub async fn delete_topics(names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = client_config().create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    match admin.delete_topics(names, &options).await {
        Ok(results) => {
            for result in results {
                if let Err((topic, code)) = result
                    && code != RDKafkaErrorCode::UnknownTopicOrPartition
                {
                    eprintln!("could not delete topic {topic}: {code}");
                }
            }
        }
        Err(error) => eprintln!("could not delete topics {names:?}: {error}"),
    }
}

/// Waits until the broker's metadata shows every partition of `names` with a leader.
///
/// CreateTopics is answered once the controller accepted the topics, before the broker's own
/// metadata cache knows them; a consumer subscribing in that gap is told
/// `UnknownTopicOrPartition`, and a test would fail on a race it did not mean to test.
async fn wait_for_topic_leaders(names: &[&str]) {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = client_config().create().expect("metadata client");
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in &names {
            loop {
                let ready = client
                    .fetch_metadata(Some(name), Duration::from_secs(5))
                    .is_ok_and(|metadata| {
                        metadata.topics().first().is_some_and(|topic| {
                            topic.error().is_none()
                                && !topic.partitions().is_empty()
                                && topic.partitions().iter().all(|partition| {
                                    partition.error().is_none() && partition.leader() >= 0
                                })
                        })
                    });
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "topic {name} has no leader on every partition after 30 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .await
    .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
}

/// Client settings for the stack's broker.
pub fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &Stack::get().kafka_bootstrap);
    config
}

/// A consumer of `topic` from the beginning, in a fresh group, reading committed records only.
pub fn consumer(topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = client_config()
        .set(
            "group.id",
            format!("test-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Reads records from `consumer` until `count` arrived; panics after `timeout` with what it got.
pub async fn read_records(
    consumer: &StreamConsumer,
    count: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let deadline = Instant::now() + timeout;
    let mut records = Vec::with_capacity(count);
    while records.len() < count {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(message)) => records.push(message.detach()),
            // Informational: the subscription's metadata is not there yet; it will be.
            Ok(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition))) => {}
            Ok(Err(error)) => panic!("consumer error: {error}"),
            Err(_) => panic!(
                "only {} of {count} records arrived within {timeout:?}",
                records.len()
            ),
        }
    }
    records
}

/// Reads whatever arrives on `consumer` for `window`; for asserting that nothing more comes.
pub async fn read_for(consumer: &StreamConsumer, window: Duration) -> Vec<OwnedMessage> {
    let deadline = Instant::now() + window;
    let mut records = Vec::new();
    // A consumer error must not end the window early: "nothing came" would then prove nothing.
    while let Ok(received) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        consumer.recv(),
    )
    .await
    {
        match received {
            Ok(message) => records.push(message.detach()),
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err(error) => panic!("consumer error: {error}"),
        }
    }
    records
}

/// Polls `condition` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port that nothing listens on, for a child process to bind.
///
/// Not port 0's answer: the kernel picks that from its ephemeral range, the same range it hands
/// out to outgoing connections, and every Kafka, Redis and PostgreSQL client in a test opens
/// dozens of those. Between this check and the child's own bind, one of them can take the port
/// (CI saw "Address already in use" from exactly that). Ports just below the ephemeral range are
/// only ever taken by an explicit bind, so they are chosen from there: a counter keeps one
/// process from handing a port out twice, and the start depends on the process id so that two
/// harnesses running side by side walk different stretches.
pub fn free_port() -> u16 {
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_start < SPAN + 1024 {
        return ephemeral_port();
    }
    let base = ephemeral_start - SPAN;
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = (base + offset) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    ephemeral_port()
}

fn ephemeral_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A service binary running as a child process, killed when dropped.
pub struct ServiceProcess {
    name: String,
    /// Behind a lock so that a pipeline shared between tasks can still ask whether its
    /// services are alive (`try_wait` needs `&mut`); never held across an await.
    child: std::sync::Mutex<Child>,
    pub admin_port: u16,
    log_path: PathBuf,
}

impl ServiceProcess {
    /// Starts `binary` with `env` (plus an admin port of its own); stdout and stderr go to a
    /// log file under the target directory's `test-logs/` that panics quote.
    pub fn spawn(binary: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        let name = binary.file_name().unwrap().to_string_lossy().into_owned();
        let admin_port = free_port();
        let log_dir = target_dir().join("test-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log_path = log_dir.join(format!("{name}-{admin_port}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("TRIAGE_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        ServiceProcess {
            name,
            child: std::sync::Mutex::new(child),
            admin_port,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.lock_child().id()
    }

    /// The binary's file name (`inference-worker`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How the process ended, if it has; `None` while it runs.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.lock_child().try_wait().ok().flatten()
    }

    /// An error naming the service, how it ended and its log, once it is no longer running.
    pub fn ensure_running(&self) -> Result<(), String> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(self.exit_report(status)),
        }
    }

    /// Why the service ended as it did, for a failed test: its plain lines and its last
    /// warnings and errors first (a test runner may show only the start of a long failure
    /// message, and a service that stops on an error says why in its last lines), then the
    /// whole log.
    pub fn exit_report(&self, status: ExitStatus) -> String {
        let log = self.log();
        let notable: Vec<&str> = log
            .lines()
            .filter(|line| {
                !line.starts_with('{')
                    || line.contains("\"level\":\"ERROR\"")
                    || line.contains("\"level\":\"WARN\"")
            })
            // librdkafka's reconnect noise would push the service's own lines out.
            .filter(|line| !line.contains("\"message\":\"librdkafka: "))
            .collect();
        let last_notable = &notable[notable.len().saturating_sub(12)..];
        format!(
            "{} exited with {status}; its last warnings and errors:\n{}\n--- whole log:\n{log}",
            self.name,
            last_notable.join("\n")
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// What the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The service's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("{} /metrics: {e}", self.name))
            .text()
            .await
            .unwrap_or_else(|e| panic!("{} /metrics: {e}", self.name))
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let client = reqwest::Client::new();
        let url = self.admin_url("/readyz");
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(death) = self.ensure_running() {
                panic!("before it was ready, {death}");
            }
            if let Ok(response) = client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                && response.status().is_success()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not ready within {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) with the system's `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for the process to exit, or panics after `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.lock_child().try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs the process to completion (for binaries expected to exit by themselves).
    pub fn run_to_exit(
        binary: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> std::process::Output {
        Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The value of `record`'s header `key` as text.
pub fn header<'a>(record: &'a OwnedMessage, key: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    record
        .headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The start-up contract every service binary keeps: with the stack up it reports ready, its
/// metrics name it, and SIGTERM makes it exit 0 within five seconds.
pub async fn assert_starts_ready_and_exits_zero_on_sigterm(
    binary: &str,
    service: &str,
    env: &[(String, String)],
) {
    let process = ServiceProcess::spawn(binary.as_ref(), &[], env);
    process.wait_ready(Duration::from_secs(30)).await;
    let metrics = process.metrics().await;
    assert!(
        metrics.contains(&format!("service=\"{service}\"")),
        "{metrics}"
    );
    process.signal("TERM");
    let status = process.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}:\n{}", process.log());
}

/// A bad configuration value stops the binary with exit code 78 and one line on stderr that
/// names the key and the environment variable it came from.
pub fn assert_bad_config_fails_with_one_line_naming_the_key(binary: &str) {
    let output = ServiceProcess::run_to_exit(
        binary.as_ref(),
        &[],
        &[("TRIAGE_ADMIN__DRAIN_TIMEOUT".into(), "soon".into())],
    );
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("admin.drain_timeout"), "{stderr}");
    assert!(stderr.contains("TRIAGE_ADMIN__DRAIN_TIMEOUT"), "{stderr}");
}

/// The offset `group` has committed for `topic`/`partition`, if any. Reads it without joining
/// the group.
///
/// On a fresh broker the first group to commit makes it create `__consumer_offsets`; until the
/// broker has loaded that partition it answers `NotCoordinator` or `CoordinatorLoadInProgress`.
/// Those are retried for up to 30 s, like a real consumer would; any other error fails the test.
pub fn committed_offset(group: &str, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::{Offset, TopicPartitionList, consumer::BaseConsumer};
    let client: BaseConsumer = client_config()
        .set("group.id", group)
        .create()
        .expect("offset reader");
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(topic, partition);
    let deadline = Instant::now() + Duration::from_secs(30);
    let committed = loop {
        match client.committed_offsets(partitions.clone(), Duration::from_secs(10)) {
            Ok(committed) => break committed,
            Err(error) if is_coordinator_settling(&error) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("committed offsets of {group} on {topic}/{partition}: {error}"),
        }
    };
    match committed.find_partition(topic, partition)?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// Whether `error` only says the group coordinator is still moving into place.
fn is_coordinator_settling(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
        )
    )
}

/// Waits until `group` is `Stable` with `members` members, each holding partitions: after it, no
/// join or rebalance is pending that would stall a measurement.
pub async fn wait_for_settled_group(group: &str, members: usize, timeout: Duration) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = client_config().create().expect("group reader");
    let client = std::sync::Arc::new(client);
    wait_until(
        &format!("consumer group {group} stable with {members} members"),
        timeout,
        || {
            let client = std::sync::Arc::clone(&client);
            let group = group.to_owned();
            async move {
                tokio::task::spawn_blocking(move || {
                    let groups = client
                        .fetch_group_list(Some(&group), Duration::from_secs(5))
                        .ok()?;
                    let info = groups.groups().first()?;
                    let settled = info.state() == "Stable"
                        && info.members().len() == members
                        && info
                            .members()
                            .iter()
                            .all(|m| m.assignment().is_some_and(holds_partitions));
                    settled.then_some(())
                })
                .await
                .ok()
                .flatten()
            }
        },
    )
    .await;
}

/// Whether a consumer-protocol assignment (int16 version, then an int32 count of topics, each
/// with its partitions) names at least one topic.
fn holds_partitions(assignment: &[u8]) -> bool {
    assignment
        .get(2..6)
        .and_then(|count| <[u8; 4]>::try_from(count).ok())
        .is_some_and(|count| i32::from_be_bytes(count) > 0)
}

/// Produces `records` (key, value) to `topic`/`partition` and waits for each acknowledgement.
pub async fn produce(topic: &str, partition: Option<i32>, records: &[(String, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = client_config().create().expect("test producer");
    for (key, value) in records {
        let mut record = FutureRecord::to(topic).key(key).payload(value);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(error, _)| panic!("produce to {topic}: {error}"));
    }
}

/// The machine's CPU time counters (the `cpu` line of /proc/stat), so that a benchmark can
/// report how much CPU time the hypervisor kept for other guests during its run ("steal").
///
/// On the development VM the same binaries measured twice as slow while steal was 10–40 % under
/// load as while it was 0 %: a latency or CPU figure means little without it.
#[derive(Clone, Copy, Debug)]
pub struct MachineCpu {
    steal: u64,
    total: u64,
}

impl MachineCpu {
    /// `None` where /proc/stat does not exist or says something else.
    pub fn sample() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|line| line.starts_with("cpu "))?;
        // user nice system idle iowait irq softirq steal (guest time is already in user)
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        (ticks.len() == 8).then(|| MachineCpu {
            steal: ticks[7],
            total: ticks.iter().sum(),
        })
    }

    /// The share of all CPU time since `earlier` that was stolen, 0.0 to 1.0.
    pub fn steal_share_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| steal as f64 / total as f64)
    }
}

/// The steal share from `start` to now, for a benchmark report (`null` where unknown).
pub fn steal_share_since(start: Option<MachineCpu>) -> Option<f64> {
    MachineCpu::sample()?.steal_share_since(&start?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_service_that_died_is_named_with_how_it_ended_and_its_log() {
        let process = ServiceProcess::spawn(
            Path::new("/bin/sh"),
            &["-c", "echo 'about to fail'; exit 3"],
            &[],
        );
        wait_until("the process to exit", Duration::from_secs(10), || async {
            process.exit_status()
        })
        .await;
        let error = process.ensure_running().unwrap_err();
        assert!(
            error.starts_with("sh exited with exit status: 3"),
            "{error}"
        );
        assert!(error.contains("about to fail"), "{error}");
    }

    #[tokio::test]
    async fn a_running_service_passes() {
        let process = ServiceProcess::spawn(Path::new("/bin/sleep"), &["30"], &[]);
        assert_eq!(process.ensure_running(), Ok(()));
    }

    #[test]
    fn steal_share_is_the_stolen_part_of_all_cpu_time_between_samples() {
        let earlier = MachineCpu {
            steal: 10,
            total: 1_000,
        };
        let later = MachineCpu {
            steal: 60,
            total: 1_500,
        };
        assert_eq!(later.steal_share_since(&earlier), Some(0.1));
        assert_eq!(earlier.steal_share_since(&later), None);
        assert_eq!(earlier.steal_share_since(&earlier), None);
        assert!(
            MachineCpu::sample().is_some(),
            "/proc/stat is readable here"
        );
    }
}
