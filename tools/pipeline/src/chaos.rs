//! `make chaos`: tickets flow while workers are killed with SIGKILL, the broker, Redis and
//! PostgreSQL restart and the LLM has an outage; then every accepted ticket must be exactly one
//! triage row or one dead letter, no dead letter may come from the faults, and paid duplicates
//! may not exceed the calls in flight at the kills.
//!
//! It restarts the shared broker, Redis and PostgreSQL: run it alone (make chaos, or the
//! `serial_` phase of make test), never beside other tests.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rand::Rng;
use rdkafka::Message;
use serde_json::json;
use triage_proto::v1::DeadLetter;
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
    Outage,
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
    if options.restart_broker {
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
        match fault {
            Fault::KillWorker(index) => {
                pipeline.kill_worker(index).await;
                let stats = pipeline.sim_stats().await?;
                let calls = stats["requests_total"].as_u64().unwrap_or(0);
                let cached = cached_results(&pipeline.names.redis_prefix).await?;
                in_flight_at_kills += calls.saturating_sub(cached);
                pipeline.restart_worker(index).await;
            }
            Fault::RestartRedis => stack("restart", "redis")?,
            Fault::RestartPostgres => stack("restart", "postgres")?,
            Fault::RestartBroker => stack("restart", "kafka")?,
            Fault::Outage => {
                pipeline
                    .sim_config(&json!({"faults": [{"fault": "status_503", "duration_ms": options.outage.as_millis() as u64}]}))
                    .await?;
            }
        }
        let event = format!(
            "{fault:?} at {:.0} % of the submission, took {:.1} s",
            at * 100.0,
            started.elapsed().as_secs_f64()
        );
        println!("chaos: {event}");
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
        if !remaining.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let dead_letters = dead_letter_tickets(&pipeline.names.dead_letters).await;
    let stats = pipeline.sim_stats().await?;
    let paid_duplicates = llm_sim::stats::paid_duplicates(&stats);
    pipeline.stop().await?;
    Ok(ChaosReport {
        accepted: accepted.len(),
        triaged,
        dead_letters: dead_letters.len(),
        lost: remaining.into_iter().collect(),
        paid_duplicates,
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

fn stack(action: &str, component: &str) -> anyhow::Result<()> {
    let status = Command::new(workspace_root().join("deploy/stack.sh"))
        .args([action, component])
        .status()
        .context("run deploy/stack.sh")?;
    anyhow::ensure!(
        status.success(),
        "deploy/stack.sh {action} {component} failed"
    );
    Ok(())
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
