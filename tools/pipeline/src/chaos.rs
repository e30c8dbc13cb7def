//! `make chaos`: tickets flow while workers are killed with SIGKILL, the broker, Redis and
//! PostgreSQL restart and the LLM has an outage; then every accepted ticket must be exactly one
//! triage row or one dead letter, no dead letter may come from the faults, and paid duplicates
//! may not exceed the calls in flight at the kills.
//!
//! It restarts the shared broker, Redis and PostgreSQL: run it alone (make chaos, or the
//! `serial_` phase of make test), never beside other tests.
//!
//! On a cluster (`deploy/stack.sh up --brokers 3`, `KAFKA_BROKERS` > 1) the broker restart
//! becomes four faults: kill -9 of the node leading most partitions of the task topic, then of
//! the results topic, then of the transaction coordinator of the dispatch stage's transactional
//! ids, each brought back once the cluster has elected new leaders; and a rolling restart, one
//! node at a time, each back and fully replicated before the next stops. Every task is then
//! counted: dispatch may write none twice.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rand::Rng;
use rdkafka::{
    Message,
    consumer::{BaseConsumer, Consumer as _},
};
use serde_json::json;
use triage_proto::v1::{DeadLetter, InferenceTask, TicketCreated};
use triage_test_support::{Stack, workspace_root};

use crate::{Llm, Options, Pipeline};

pub struct ChaosOptions {
    pub tickets: usize,
    /// Tickets submitted per second.
    pub rate: f64,
    /// How many times a worker is killed with SIGKILL (and restarted).
    pub worker_kills: usize,
    pub restart_broker: bool,
    pub restart_redis: bool,
    pub restart_postgres: bool,
    /// Length of the LLM outage window (every call answered 503).
    pub outage: Duration,
    pub pipeline: Options,
}

impl ChaosOptions {
    pub fn new(tickets: usize, rate: f64) -> Self {
        let mut pipeline = Options::new(Some("chaos"));
        pipeline.workers = 2;
        pipeline.llm = Llm::Simulator {
            rpm: 30_000,
            latency: "uniform:20-300".into(),
        };
        ChaosOptions {
            tickets,
            rate,
            worker_kills: 3,
            restart_broker: true,
            restart_redis: true,
            restart_postgres: true,
            outage: Duration::from_secs(10),
            pipeline,
        }
    }
}

#[derive(Debug)]
pub struct ChaosReport {
    pub accepted: usize,
    pub triaged: usize,
    pub dead_letters: usize,
    pub lost: Vec<String>,
    pub paid_duplicates: u64,
    /// Committed task records beyond one per committed ticket event: tasks dispatch wrote
    /// twice (must be 0; its transactions make it exactly once).
    pub dispatch_duplicates: usize,
    /// Committed records of the task topic.
    pub tasks: usize,
    /// Committed records of the ticket-event topic: more than `accepted` when the ingress wrote
    /// a ticket again for a client's retry whose first answer was lost in a fault (the worker
    /// then finds the triage cached; nothing is paid twice).
    pub ticket_events: usize,
    /// Brokers in the cluster the run ran on.
    pub brokers: usize,
    /// Upper bound of the calls in flight at the kills (calls started minus results cached,
    /// right after each kill; the surviving worker's calls are counted too).
    pub in_flight_at_kills: u64,
    pub events: Vec<String>,
}

/// One fault at a point of the submission (0.0 to 1.0).
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillWorker(usize),
    RestartRedis,
    RestartPostgres,
    RestartBroker,
    /// kill -9 of the node leading most partitions of this topic; restarted once others lead.
    KillLeader(Stage),
    /// kill -9 of the node coordinating the dispatch stage's transactions.
    KillTransactionCoordinator,
    /// Every node in turn: controlled stop, start, wait until fully replicated.
    RollingRestart,
    Outage,
}

/// The topics whose leaders a cluster run kills.
#[derive(Clone, Copy, Debug)]
enum Stage {
    Tasks,
    Results,
}

pub async fn run(options: ChaosOptions) -> anyhow::Result<ChaosReport> {
    let mut pipeline = Pipeline::start(options.pipeline.clone()).await?;
    let mut rng = rand::rng();
    let mut schedule: Vec<(f64, Fault)> = (0..options.worker_kills)
        .map(|i| {
            (
                rng.random_range(0.1..0.9),
                Fault::KillWorker(i % pipeline.worker_count()),
            )
        })
        .collect();
    if options.restart_redis {
        schedule.push((rng.random_range(0.2..0.3), Fault::RestartRedis));
    }
    if options.restart_postgres {
        schedule.push((rng.random_range(0.4..0.5), Fault::RestartPostgres));
    }
    let brokers = Stack::get().kafka_brokers;
    if options.restart_broker && brokers > 1 {
        schedule.extend([
            (rng.random_range(0.1..0.2), Fault::KillLeader(Stage::Tasks)),
            (
                rng.random_range(0.3..0.4),
                Fault::KillLeader(Stage::Results),
            ),
            (
                rng.random_range(0.5..0.6),
                Fault::KillTransactionCoordinator,
            ),
            (rng.random_range(0.6..0.7), Fault::RollingRestart),
        ]);
    } else if options.restart_broker {
        schedule.push((rng.random_range(0.6..0.7), Fault::RestartBroker));
    }
    if !options.outage.is_zero() {
        schedule.push((0.8, Fault::Outage));
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let submitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refusals = Arc::new(Mutex::new(HashMap::new()));
    let submitter = {
        let client = SubmitClient {
            http_url: pipeline.http_url.clone(),
            api_key: pipeline.api_key.clone(),
            http: reqwest::Client::new(),
            refusals: Arc::clone(&refusals),
        };
        let accepted = Arc::clone(&accepted);
        let submitted = Arc::clone(&submitted);
        let tickets = options.tickets;
        let interval = Duration::from_secs_f64(1.0 / options.rate);
        let run_id = pipeline.names.group_prefix.clone();
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            for i in 0..tickets {
                next += interval;
                tokio::time::sleep_until(next).await;
                let ticket_id = format!("{run_id}chaos-{i}");
                let client = client.clone();
                let accepted = Arc::clone(&accepted);
                let submitted = Arc::clone(&submitted);
                tokio::spawn(async move {
                    client.submit_until_accepted(&ticket_id).await;
                    accepted.lock().expect("accepted lock").push(ticket_id);
                    submitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                });
            }
        })
    };

    let mut events = Vec::new();
    let mut in_flight_at_kills = 0;
    for (at, fault) in schedule {
        let target = (at * options.tickets as f64) as usize;
        while submitted.load(std::sync::atomic::Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let mut detail = String::new();
        match fault {
            Fault::KillWorker(index) => {
                pipeline.kill_worker(index).await;
                let stats = pipeline.sim_stats().await?;
                let calls = stats["requests_total"].as_u64().unwrap_or(0);
                let cached = cached_results(&pipeline.names.redis_prefix).await?;
                in_flight_at_kills += calls.saturating_sub(cached);
                pipeline.restart_worker(index).await;
            }
            Fault::RestartRedis => stack(&["restart", "redis"])?,
            Fault::RestartPostgres => stack(&["restart", "postgres"])?,
            Fault::RestartBroker => stack(&["restart", "kafka"])?,
            Fault::KillLeader(stage) => {
                let topic = match stage {
                    Stage::Tasks => &pipeline.names.inference_tasks,
                    Stage::Results => &pipeline.names.results,
                };
                let (node, led) = busiest_leader(topic).await?;
                detail = format!(" (node {node}, leader of {led} partitions of {topic})");
                kill_and_restore(node, topic).await?;
            }
            Fault::KillTransactionCoordinator => {
                let node = transaction_coordinator(&pipeline.transactional_id)?;
                detail = format!(" (node {node})");
                kill_and_restore(node, &pipeline.names.inference_tasks).await?;
            }
            Fault::RollingRestart => cluster(&["rolling-restart"])?,
            Fault::Outage => {
                pipeline
                    .sim_config(&json!({"faults": [{"fault": "status_503", "duration_ms": options.outage.as_millis() as u64}]}))
                    .await?;
            }
        }
        let event = format!(
            "{fault:?}{detail} at {:.0} % of the submission, took {:.1} s",
            at * 100.0,
            started.elapsed().as_secs_f64()
        );
        println!("chaos: {event}");
        // A service that stopped is restarted by nothing here (Kubernetes would): say which
        // fault it did not survive rather than finding out at the end.
        pipeline
            .ensure_running()
            .with_context(|| format!("a service stopped by the time {event}"))?;
        events.push(event);
    }
    submitter.await?;
    wait_for(&submitted, options.tickets, Duration::from_secs(600))
        .await
        .with_context(|| {
            format!(
                "last answers to the tickets still refused: {}",
                refusal_summary(&refusals.lock().expect("refusals lock"))
            )
        })?;
    let accepted: Vec<String> = accepted.lock().expect("accepted lock").clone();

    // Every accepted ticket must end as a triage row or a dead letter.
    let dead_letters = dead_letter_tickets(&pipeline.names.dead_letters).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut remaining: HashSet<String> = accepted.iter().cloned().collect();
    let mut triaged = 0;
    while !remaining.is_empty() && Instant::now() < deadline {
        let mut found = Vec::new();
        for ticket_id in &remaining {
            if pipeline.triage(ticket_id).await.ok().flatten().is_some() {
                found.push(ticket_id.clone());
            }
        }
        triaged += found.len();
        for ticket_id in found {
            remaining.remove(&ticket_id);
        }
        remaining.retain(|ticket_id| !dead_letters.contains(ticket_id));
        pipeline
            .ensure_running()
            .context("a service stopped while the accepted tickets were awaited")?;
        if !remaining.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let dead_letters = dead_letter_tickets(&pipeline.names.dead_letters).await;
    let (ticket_events, tasks, dispatch_duplicates) = dispatch_duplicates(&pipeline.names).await;
    let stats = pipeline.sim_stats().await?;
    let paid_duplicates = llm_sim::stats::paid_duplicates(&stats);
    pipeline.stop().await?;
    Ok(ChaosReport {
        accepted: accepted.len(),
        triaged,
        dead_letters: dead_letters.len(),
        lost: remaining.into_iter().collect(),
        paid_duplicates,
        dispatch_duplicates,
        tasks,
        ticket_events,
        brokers,
        in_flight_at_kills,
        events,
    })
}

impl ChaosReport {
    /// The guarantees of DESIGN.md, checked.
    pub fn verify(&self) -> anyhow::Result<()> {
        if !self.lost.is_empty() {
            bail!(
                "{} accepted tickets are neither a row nor a dead letter: {:?}",
                self.lost.len(),
                &self.lost[..self.lost.len().min(10)]
            );
        }
        if self.dead_letters > 0 {
            bail!(
                "{} dead letters: the faults must not dead-letter valid tickets",
                self.dead_letters
            );
        }
        if self.dispatch_duplicates > 0 {
            bail!(
                "{} tasks dispatched twice: dispatch is transactional, there must be none",
                self.dispatch_duplicates
            );
        }
        if self.triaged != self.accepted {
            bail!("{} triaged of {} accepted", self.triaged, self.accepted);
        }
        if self.paid_duplicates > self.in_flight_at_kills {
            bail!(
                "{} paid duplicates, more than the {} calls in flight at the kills",
                self.paid_duplicates,
                self.in_flight_at_kills
            );
        }
        Ok(())
    }

    /// The figures as a markdown table (docs/BENCHMARKS.md, Chaos).
    pub fn markdown(&self) -> String {
        let mut table = String::from("| figure | value |\n| --- | --- |\n");
        for (figure, value) in [
            ("brokers", self.brokers.to_string()),
            ("tickets accepted", self.accepted.to_string()),
            ("triaged", self.triaged.to_string()),
            ("lost", self.lost.len().to_string()),
            ("dead letters", self.dead_letters.to_string()),
            ("committed ticket events", self.ticket_events.to_string()),
            ("committed tasks", self.tasks.to_string()),
            (
                "tasks duplicated by dispatch",
                self.dispatch_duplicates.to_string(),
            ),
            ("paid (LLM) duplicates", self.paid_duplicates.to_string()),
            (
                "bound: LLM calls in flight at the worker kills",
                self.in_flight_at_kills.to_string(),
            ),
        ] {
            table.push_str(&format!("| {figure} | {value} |\n"));
        }
        table.push_str("\nFaults, in order:\n");
        for event in &self.events {
            table.push_str(&format!("- {event}\n"));
        }
        table
    }
}

#[derive(Clone)]
struct SubmitClient {
    http_url: String,
    api_key: String,
    http: reqwest::Client,
    /// The last answer other than 202, by ticket still waiting for one: what a stalled
    /// submission reports.
    refusals: Arc<Mutex<HashMap<String, String>>>,
}

/// "503 ×40, connection refused ×1": how many waiting tickets got which last answer.
fn refusal_summary(refusals: &HashMap<String, String>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for answer in refusals.values() {
        *counts.entry(answer).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(answer, count)| format!("{answer} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SubmitClient {
    /// Submits with an Idempotency-Key until a 202: a 503 while the broker or Redis restarts
    /// means "not accepted, try again", and the key makes the retry safe.
    async fn submit_until_accepted(&self, ticket_id: &str) {
        let body = json!({
            "ticket_id": ticket_id,
            "subject": "Charged twice",
            "description": format!("Ticket {ticket_id}: my card was charged twice for the last invoice."),
            "customer": {"id": "c-chaos", "tier": "pro"},
        });
        loop {
            let sent = self
                .http
                .post(format!("{}/v1/tickets", self.http_url))
                .bearer_auth(&self.api_key)
                .header("Idempotency-Key", ticket_id)
                .timeout(Duration::from_secs(30))
                .json(&body)
                .send()
                .await;
            let refusal = match sent {
                Ok(response) if response.status().as_u16() == 202 => {
                    self.refusals
                        .lock()
                        .expect("refusals lock")
                        .remove(ticket_id);
                    return;
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    let title = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|problem| problem["title"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    format!("{status} {title}")
                }
                Err(error) if error.is_timeout() => "timed out".to_owned(),
                Err(error) if error.is_connect() => "connection refused".to_owned(),
                Err(_) => "transport error".to_owned(),
            };
            self.refusals
                .lock()
                .expect("refusals lock")
                .insert(ticket_id.to_owned(), refusal);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn wait_for(
    counter: &std::sync::atomic::AtomicUsize,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while counter.load(std::sync::atomic::Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!(
                "only {} of {count} tickets accepted",
                counter.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `deploy/stack.sh ARGS...`, told the ports of the stack this run uses (the one in
/// `STACK_ENV_FILE` may not be on the default ports), so it restarts that one.
fn stack_command(args: &[&str]) -> Command {
    let stack = Stack::get();
    let mut command = Command::new(workspace_root().join("deploy/stack.sh"));
    command.args(args);
    for (key, endpoint) in [
        ("REDIS_PORT", stack.redis_url.as_str()),
        ("POSTGRES_PORT", stack.database_url.as_str()),
        ("KAFKA_CLUSTER_PORT", stack.kafka_bootstrap.as_str()),
    ] {
        if let Some(port) = port_of(endpoint) {
            command.env(key, port);
        }
    }
    command
}

/// The port of `scheme://user@host:PORT/path` or of the first `host:PORT` of a list.
fn port_of(endpoint: &str) -> Option<&str> {
    let first = endpoint.split(',').next()?;
    let authority = first.split("://").last()?.split('/').next()?;
    let port = authority.rsplit_once(':')?.1;
    port.bytes().all(|b| b.is_ascii_digit()).then_some(port)
}

fn stack(args: &[&str]) -> anyhow::Result<()> {
    let status = stack_command(args)
        .status()
        .context("run deploy/stack.sh")?;
    anyhow::ensure!(status.success(), "deploy/stack.sh {args:?} failed");
    Ok(())
}

/// `deploy/stack.sh --brokers N ARGS...` for the cluster the run is on.
fn cluster(args: &[&str]) -> anyhow::Result<()> {
    let brokers = Stack::get().kafka_brokers.to_string();
    let mut all = vec!["--brokers", brokers.as_str()];
    all.extend_from_slice(args);
    stack(&all)
}

/// Per node, the partitions of `topic` it leads; the node leading most (and how many).
fn leaders(topic: &str) -> anyhow::Result<BTreeMap<i32, usize>> {
    let client: BaseConsumer = triage_test_support::client_config().create()?;
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut led = BTreeMap::new();
    for topic_metadata in metadata.topics() {
        for partition in topic_metadata.partitions() {
            if partition.leader() >= 0 {
                *led.entry(partition.leader()).or_default() += 1;
            }
        }
    }
    Ok(led)
}

async fn busiest_leader(topic: &str) -> anyhow::Result<(i32, usize)> {
    let topic_name = topic.to_owned();
    let led = tokio::task::spawn_blocking(move || leaders(&topic_name)).await??;
    led.into_iter()
        .max_by_key(|(_, count)| *count)
        .context("no partition of the topic has a leader")
}

/// The node coordinating most of the dispatch stage's transactional ids (each lane has one;
/// FindCoordinator through the Kafka tools, as librdkafka does not expose it).
fn transaction_coordinator(prefix: &str) -> anyhow::Result<i32> {
    let output = stack_command(&[
        "--brokers",
        &Stack::get().kafka_brokers.to_string(),
        "tx-coordinator",
        prefix,
    ])
    .output()
    .context("run deploy/stack.sh tx-coordinator")?;
    let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(node) = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()) {
            *counts.entry(node).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .map(|(node, _)| node)
        .with_context(|| format!("no transactional id {prefix}* has a coordinator"))
}

/// kill -9 of `node`; once no partition of `topic` names it leader any more (the cluster moved
/// on without it), it starts again and the cluster is fully replicated before the run goes on.
async fn kill_and_restore(node: i32, topic: &str) -> anyhow::Result<()> {
    let node_arg = node.to_string();
    cluster(&["kill-broker", &node_arg])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let topic_name = topic.to_owned();
        let led = tokio::task::spawn_blocking(move || leaders(&topic_name)).await?;
        if led.is_ok_and(|led| !led.contains_key(&node)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("node {node} still leads partitions of {topic} 60 s after its kill");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Tickets flow a while on two nodes before the third comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(move || cluster(&["restart-broker", &node_arg])).await?
}

/// Committed ticket events, committed task records, and how many tasks are beyond one per
/// committed ticket event (an event the ingress wrote twice may have two tasks: that is not
/// dispatch's duplicate).
async fn dispatch_duplicates(names: &crate::Names) -> (usize, usize, usize) {
    let mut event_records = 0;
    let mut events: HashMap<String, usize> = HashMap::new();
    for record in read_all(&names.tickets_created).await {
        event_records += 1;
        let content_type =
            triage_runtime::kafka::headers::get_str(record.headers(), "content-type");
        if let Some(event) = record
            .payload()
            .and_then(|payload| triage_proto::decode::<TicketCreated>(payload, content_type).ok())
        {
            *events.entry(event.ticket_id).or_default() += 1;
        }
    }
    let mut tasks: HashMap<String, usize> = HashMap::new();
    let mut task_records = 0;
    for record in read_all(&names.inference_tasks).await {
        task_records += 1;
        let content_type =
            triage_runtime::kafka::headers::get_str(record.headers(), "content-type");
        if let Some(task) = record
            .payload()
            .and_then(|payload| triage_proto::decode::<InferenceTask>(payload, content_type).ok())
        {
            *tasks.entry(task.ticket_id).or_default() += 1;
        }
    }
    let duplicates = tasks
        .iter()
        .map(|(ticket_id, count)| count.saturating_sub(events.get(ticket_id).copied().unwrap_or(1)))
        .sum();
    (event_records, task_records, duplicates)
}

/// Every committed record of `topic`: reads until nothing more came for 3 s.
async fn read_all(topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer = triage_test_support::consumer(topic);
    let mut records = Vec::new();
    loop {
        let more = triage_test_support::read_for(&consumer, Duration::from_secs(3)).await;
        if more.is_empty() && !records.is_empty() {
            return records;
        }
        if more.is_empty() {
            // The first read also waits out the group's join; a second empty window ends it.
            let again = triage_test_support::read_for(&consumer, Duration::from_secs(3)).await;
            if again.is_empty() {
                return records;
            }
            records.extend(again);
            continue;
        }
        records.extend(more);
    }
}

async fn cached_results(prefix: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(Stack::get().redis_url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}result:*"))
        .query_async(&mut connection)
        .await?;
    Ok(keys.len() as u64)
}

async fn dead_letter_tickets(topic: &str) -> HashSet<String> {
    let consumer = triage_test_support::consumer(topic);
    triage_test_support::read_for(&consumer, Duration::from_secs(3))
        .await
        .iter()
        .filter_map(|record| {
            let content_type =
                triage_runtime::kafka::headers::get_str(record.headers(), "content-type");
            triage_proto::decode::<DeadLetter>(record.payload()?, content_type).ok()
        })
        .map(|dead_letter| dead_letter.ticket_id)
        .collect()
}
