//! loadgen: drives the ticket ingress over HTTP or gRPC and reports accepted tickets per second
//! and latency percentiles, as one JSON object and one markdown table row.
//!
//! Two modes:
//! - open loop (`--rate R`): a request is due every 1/R s whatever the answers do; latency is
//!   measured from when it was due, so a stalled server shows up in the percentiles instead of
//!   slowing the generator down (no coordinated omission).
//! - closed loop (no `--rate`): `--concurrency N` clients each send their next request as soon
//!   as the previous one is answered; this measures the most the server accepts.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use triage_proto::v1::{CreateTicketRequest, Customer, ticket_ingest_client::TicketIngestClient};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load generator for the triage pipeline's ingress"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// `POST /v1/tickets` over HTTP/1.1.
    Http {
        /// Base URL of the ingress.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// `TicketIngest/CreateTicket` over gRPC (HTTP/2).
    Grpc {
        /// Address of the gRPC ingress.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// HTTP/2 connections to spread requests over.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
}

#[derive(Args, Debug, Clone)]
struct LoadArgs {
    /// API key sent as `Authorization: Bearer`.
    #[arg(long)]
    api_key: String,
    /// Requests per second (open loop). Absent: closed loop with `--concurrency` clients.
    #[arg(long)]
    rate: Option<u64>,
    /// Clients in closed loop; most requests in flight in open loop.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to measure, e.g. `20s`.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load sent before measuring starts (connections, caches, JIT of the broker).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Bytes of ticket description.
    #[arg(long, default_value_t = 400)]
    description_bytes: usize,
    /// A label for the report (e.g. the commit or the machine).
    #[arg(long, default_value = "")]
    label: String,
}

/// What one request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Accepted,
    /// HTTP status or gRPC code of a refusal; 0 for a transport error.
    Refused(u16),
}

#[derive(Serialize, Debug)]
struct Report {
    transport: &'static str,
    mode: &'static str,
    label: String,
    target_rate: Option<u64>,
    concurrency: usize,
    duration_s: f64,
    sent: u64,
    accepted: u64,
    accepted_per_s: f64,
    refused: BTreeMap<String, u64>,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Report {
    fn markdown_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            self.transport,
            self.mode,
            self.target_rate.map_or_else(
                || format!("max, {} clients", self.concurrency),
                |r| format!("{r}/s")
            ),
            self.accepted,
            self.accepted_per_s,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            if self.refused.is_empty() {
                "none".to_owned()
            } else {
                format!("{:?}", self.refused)
            },
        )
    }
}

/// A request sender for one transport.
#[derive(Clone)]
enum Target {
    Http {
        client: reqwest::Client,
        url: String,
        auth: String,
    },
    Grpc {
        channels: Vec<TicketIngestClient<tonic::transport::Channel>>,
        auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        next: Arc<AtomicU64>,
    },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Http { .. } => "http",
            Target::Grpc { .. } => "grpc",
        }
    }

    async fn send(&self, sequence: u64, description: &str) -> Outcome {
        match self {
            Target::Http { client, url, auth } => {
                let body = serde_json::json!({
                    "subject": format!("load test ticket {sequence}"),
                    "description": description,
                    "customer": {"id": format!("c-{}", sequence % 1000), "tier": "pro"},
                    "channel": "web",
                    "language": "en",
                });
                match client
                    .post(url)
                    .header("authorization", auth)
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(response) if response.status().as_u16() == 202 => {
                        // Read the body so the connection is reused.
                        let _ = response.bytes().await;
                        Outcome::Accepted
                    }
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        Outcome::Refused(status)
                    }
                    Err(_) => Outcome::Refused(0),
                }
            }
            Target::Grpc {
                channels,
                auth,
                next,
            } => {
                let index = next.fetch_add(1, Ordering::Relaxed) as usize % channels.len();
                let mut client = channels[index].clone();
                let mut request = tonic::Request::new(CreateTicketRequest {
                    subject: format!("load test ticket {sequence}"),
                    description: description.to_owned(),
                    customer: Some(Customer {
                        id: format!("c-{}", sequence % 1000),
                        email: None,
                        tier: Some("pro".into()),
                    }),
                    channel: "web".into(),
                    language: "en".into(),
                    ..Default::default()
                });
                request.metadata_mut().insert("authorization", auth.clone());
                match client.create_ticket(request).await {
                    Ok(_) => Outcome::Accepted,
                    Err(status) => Outcome::Refused(status.code() as u16),
                }
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    histogram: Option<Histogram<u64>>,
    sent: u64,
    accepted: u64,
    refused: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            histogram: Some(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")),
            ..Default::default()
        }
    }

    fn record(&mut self, transport: &str, outcome: Outcome, latency: Duration) {
        self.sent += 1;
        if let Some(histogram) = self.histogram.as_mut() {
            let _ = histogram.record((latency.as_micros() as u64).clamp(1, 60_000_000));
        }
        match outcome {
            Outcome::Accepted => self.accepted += 1,
            Outcome::Refused(code) => {
                let label = match (transport, code) {
                    (_, 0) => "transport_error".to_owned(),
                    ("grpc", code) => format!("grpc_{:?}", tonic::Code::from(code as i32)),
                    (_, status) => status.to_string(),
                };
                *self.refused.entry(label).or_default() += 1;
            }
        }
    }
}

async fn run(target: Target, load: LoadArgs) -> anyhow::Result<Report> {
    let description: Arc<str> = Arc::from(
        "My invoice shows a second charge for the same month and I cannot find a way to get it refunded. "
            .repeat(load.description_bytes / 96 + 1)
            .chars()
            .take(load.description_bytes)
            .collect::<String>(),
    );
    let (result_tx, mut result_rx) = mpsc::unbounded_channel::<(Instant, Outcome, Duration)>();
    let started = Instant::now();
    let measure_from = started + load.warmup;
    let stop_at = measure_from + load.duration;
    let sequence = Arc::new(AtomicU64::new(0));

    let generator = {
        let target = target.clone();
        let load = load.clone();
        let description = Arc::clone(&description);
        let sequence = Arc::clone(&sequence);
        tokio::spawn(async move {
            match load.rate {
                Some(rate) => {
                    // Open loop: one request due every 1/rate; `concurrency` bounds in-flight
                    // requests only as a safety net (it is reported if it was hit).
                    let in_flight = Arc::new(Semaphore::new(load.concurrency.max(1) * 64));
                    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                    let mut due = Instant::now();
                    while due < stop_at {
                        tokio::time::sleep_until(due.into()).await;
                        let permit = Arc::clone(&in_flight).acquire_owned().await.expect("open");
                        let (target, description, result_tx) =
                            (target.clone(), Arc::clone(&description), result_tx.clone());
                        let number = sequence.fetch_add(1, Ordering::Relaxed);
                        let due_at = due;
                        tokio::spawn(async move {
                            let outcome = target.send(number, &description).await;
                            let _ = result_tx.send((due_at, outcome, due_at.elapsed()));
                            drop(permit);
                        });
                        due += period;
                    }
                }
                None => {
                    let mut clients = Vec::with_capacity(load.concurrency);
                    for _ in 0..load.concurrency.max(1) {
                        let (target, description, result_tx, sequence) = (
                            target.clone(),
                            Arc::clone(&description),
                            result_tx.clone(),
                            Arc::clone(&sequence),
                        );
                        clients.push(tokio::spawn(async move {
                            while Instant::now() < stop_at {
                                let number = sequence.fetch_add(1, Ordering::Relaxed);
                                let sent_at = Instant::now();
                                let outcome = target.send(number, &description).await;
                                let _ = result_tx.send((sent_at, outcome, sent_at.elapsed()));
                            }
                        }));
                    }
                    for client in clients {
                        let _ = client.await;
                    }
                }
            }
        })
    };

    let transport = target.name();
    let mut tally = Tally::new();
    let collector = async {
        while let Some((sent_at, outcome, latency)) = result_rx.recv().await {
            // Only requests due inside the measured window count.
            if sent_at >= measure_from && sent_at < stop_at {
                tally.record(transport, outcome, latency);
            }
        }
    };
    drop(target);
    let (generated, ()) = tokio::join!(generator, async {
        // The collector ends when every sender (generator and in-flight requests) is gone.
        collector.await;
    });
    generated.context("generator task failed")?;

    let histogram = tally.histogram.take().expect("histogram");
    let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    let duration_s = load.duration.as_secs_f64();
    Ok(Report {
        transport,
        mode: if load.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        label: load.label,
        target_rate: load.rate,
        concurrency: load.concurrency,
        duration_s,
        sent: tally.sent,
        accepted: tally.accepted,
        accepted_per_s: tally.accepted as f64 / duration_s,
        refused: tally.refused,
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (target, load) = match cli.command {
        Command::Http { url, load } => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(load.concurrency.max(1) * 4)
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()
                .context("failed to build the HTTP client")?;
            let target = Target::Http {
                client,
                url: format!("{}/v1/tickets", url.trim_end_matches('/')),
                auth: format!("Bearer {}", load.api_key),
            };
            (target, load)
        }
        Command::Grpc {
            addr,
            connections,
            load,
        } => {
            let mut channels = Vec::with_capacity(connections.max(1));
            for _ in 0..connections.max(1) {
                let channel = tonic::transport::Endpoint::from_shared(addr.clone())
                    .context("invalid --addr")?
                    .tcp_nodelay(true)
                    .timeout(Duration::from_secs(30))
                    .connect()
                    .await
                    .with_context(|| format!("failed to connect to {addr}"))?;
                channels.push(TicketIngestClient::new(channel));
            }
            let auth = format!("Bearer {}", load.api_key)
                .parse()
                .context("the API key is not valid metadata")?;
            let target = Target::Grpc {
                channels,
                auth,
                next: Arc::new(AtomicU64::new(0)),
            };
            (target, load)
        }
    };
    let report = run(target, load).await?;
    println!("{}", serde_json::to_string(&report)?);
    println!("{}", report.markdown_row());
    Ok(())
}
