//! `pipeline demo` (make demo), `pipeline chaos` (make chaos), `pipeline bench` (make bench)
//! and `pipeline topics grow` (an operator's explicit partition growth).

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pipeline",
    about = "Runs the whole ticket-triage pipeline on the local stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start everything, publish the sample tickets, show triages, dead letters, alerts and lag.
    Demo {
        /// Exit once every sample ticket is triaged instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Tickets at a fixed rate through the whole pipeline (release binaries); reports JSON, a
    /// markdown row and bench/pipeline.svg in the target directory.
    Bench {
        #[arg(long, default_value_t = 3000)]
        tickets: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// The LLM's requests-per-minute limit.
        #[arg(long, default_value_t = 6000)]
        rpm: u64,
        #[arg(long, default_value = "lognormal:p50=300,p99=1200")]
        latency: String,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// ticket-publisher's dispatch lanes.
        #[arg(long, default_value_t = 2)]
        dispatch_lanes: usize,
    },
    /// Tickets under worker kills, broker/Redis/PostgreSQL restarts and an LLM outage; checks
    /// that nothing is lost and nothing is paid twice beyond what was in flight.
    Chaos {
        #[arg(long, default_value_t = 3000)]
        tickets: usize,
        /// Tickets submitted per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 4)]
        worker_kills: usize,
        #[arg(long, default_value_t = 20)]
        outage_seconds: u64,
    },
    /// Operator commands on the pipeline's topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Adds partitions to a topic. The services never do it on their own: Kafka maps a key to
    /// hash(key) % partitions, so afterwards a ticket's new records can land on another
    /// partition than its earlier ones and be handled before them. Drain the pipeline first.
    Grow {
        #[arg(long)]
        topic: String,
        /// The new partition count (more than the topic has).
        #[arg(long)]
        partitions: i32,
        /// The broker list; the local stack's when omitted.
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Required: says the per-ticket ordering warning above was read.
        #[arg(long)]
        i_understand_ordering: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Demo { once } => pipeline::demo::run(pipeline::demo::DemoOptions::from_env(once)).await.map(|_| ()),
            Command::Bench {
                tickets,
                rate,
                rpm,
                latency,
                workers,
                dispatch_lanes,
            } => {
                let report = pipeline::bench::run(pipeline::bench::BenchOptions {
                    tickets,
                    rate,
                    rpm,
                    latency,
                    workers,
                    dispatch_lanes,
                })
                .await?;
                println!("{report}");
                println!("{}", pipeline::bench::markdown(&report));
                Ok(())
            }
            Command::Topics(TopicsCommand::Grow {
                topic,
                partitions,
                bootstrap_servers,
                i_understand_ordering,
            }) => {
                anyhow::ensure!(
                    i_understand_ordering,
                    "growing {topic} remaps ticket keys to other partitions, so a ticket's new records \
                     may be handled before its older ones; drain the pipeline, then pass \
                     --i-understand-ordering"
                );
                pipeline::grow_topic(bootstrap_servers, &topic, partitions).await
            }
            Command::Chaos {
                tickets,
                rate,
                worker_kills,
                outage_seconds,
            } => {
                let mut options = pipeline::chaos::ChaosOptions::new(tickets, rate);
                options.worker_kills = worker_kills;
                options.outage = Duration::from_secs(outage_seconds);
                let report = pipeline::chaos::run(options).await?;
                println!("{report:#?}");
                println!("{}", report.markdown());
                report.verify()?;
                println!(
                    "chaos: ok on {} broker(s): {} accepted, {} triaged, {} lost, {} dead letters, {} tasks duplicated by dispatch; paid duplicates {} <= in flight at the kills {}",
                    report.brokers,
                    report.accepted,
                    report.triaged,
                    report.lost.len(),
                    report.dead_letters,
                    report.dispatch_duplicates,
                    report.paid_duplicates,
                    report.in_flight_at_kills
                );
                Ok(())
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pipeline: {error:#}");
            ExitCode::FAILURE
        }
    }
}
