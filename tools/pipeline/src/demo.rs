//! `make demo`: the pipeline on the local stack, sample tickets in, triages, dead letters, the
//! alert and the lag figures out, as they happen.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use triage_test_support::workspace_root;

use crate::{Llm, Options, Pipeline};

/// What a demo run showed.
#[derive(Debug)]
pub struct Summary {
    pub accepted: usize,
    pub triaged: usize,
    pub rejected: usize,
    pub alerts: usize,
    pub categories: BTreeMap<String, usize>,
}

pub struct DemoOptions {
    /// Stop once every ticket is triaged and an alert arrived (tests), instead of waiting for Ctrl-C.
    pub once: bool,
    pub pipeline: Options,
    pub tickets_file: PathBuf,
    pub timeout: Duration,
    /// Time to open the console before the sample tickets are sent, so that a newcomer watches
    /// them arrive (`TRIAGE_DEMO_CONSOLE_WAIT`, seconds; none for tests).
    pub console_wait: Duration,
}

impl DemoOptions {
    /// The LLM from `TRIAGE_DEMO_LLM_BASE_URL` / `TRIAGE_DEMO_LLM_API_KEY` / `TRIAGE_DEMO_LLM_MODEL`
    /// when set, else llm-sim.
    pub fn from_env(once: bool) -> Self {
        let mut pipeline = Options::new(None);
        if let (Ok(base_url), Ok(api_key)) = (
            std::env::var("TRIAGE_DEMO_LLM_BASE_URL"),
            std::env::var("TRIAGE_DEMO_LLM_API_KEY"),
        ) {
            pipeline.llm = Llm::External {
                base_url,
                api_key,
                model: std::env::var("TRIAGE_DEMO_LLM_MODEL")
                    .unwrap_or_else(|_| "gpt-4o-mini".into()),
                rpm: 500,
            };
        }
        pipeline.otlp_endpoint = std::env::var("TRIAGE_DEMO_OTLP_ENDPOINT").ok();
        // The console links each trace id here, e.g. http://localhost:16686/trace/{trace_id}
        // for a Jaeger beside the collector.
        pipeline.trace_url = std::env::var("TRIAGE_DEMO_TRACE_URL").ok();
        DemoOptions {
            once,
            pipeline,
            tickets_file: workspace_root().join("deploy/demo/tickets.jsonl"),
            timeout: Duration::from_secs(300),
            console_wait: if once {
                Duration::ZERO
            } else {
                Duration::from_secs(
                    std::env::var("TRIAGE_DEMO_CONSOLE_WAIT")
                        .ok()
                        .and_then(|text| text.parse().ok())
                        .unwrap_or(20),
                )
            },
        }
    }
}

pub async fn run(options: DemoOptions) -> anyhow::Result<Summary> {
    let simulated = matches!(options.pipeline.llm, Llm::Simulator { .. });
    if simulated {
        println!(
            "demo: the answers below come from llm-sim, a SIMULATOR with keyword rules, not a language model."
        );
        println!(
            "demo: set TRIAGE_DEMO_LLM_BASE_URL and TRIAGE_DEMO_LLM_API_KEY to use a real OpenAI-compatible endpoint."
        );
    } else {
        println!("demo: the answers below come from the configured LLM endpoint.");
    }
    println!("demo: starting llm-sim and the five services on the local stack...");
    let pipeline = Pipeline::start(options.pipeline.clone()).await?;
    println!(
        "demo: ticket ingress  HTTP {}  (OpenAPI {}/openapi.json)  gRPC {}",
        pipeline.http_url, pipeline.http_url, pipeline.grpc_url
    );
    println!(
        "demo: triage read API {}/v1/triage  (stream: /v1/triage/stream)  API key: {}",
        pipeline.results_url, pipeline.api_key
    );
    println!(
        "demo: triage console  {}  sign in with API key: {}  (tenant {}, admin)",
        pipeline.console_url, pipeline.api_key, pipeline.tenant
    );
    for (service, url) in pipeline.admin_urls() {
        println!("demo: {service:<17} {url}/metrics  {url}/readyz");
    }
    println!(
        "demo: Slack stand-in   {}/slack (alerts are printed below)",
        pipeline.sink.url
    );
    match &options.pipeline.otlp_endpoint {
        Some(endpoint) => println!("demo: traces exported to {endpoint}"),
        None => println!(
            "demo: traces: set TRIAGE_DEMO_OTLP_ENDPOINT to an OTLP/HTTP collector to export them"
        ),
    }
    match &options.pipeline.trace_url {
        Some(template) => println!("demo: the console links trace ids to {template}"),
        None => println!(
            "demo: set TRIAGE_DEMO_TRACE_URL (e.g. http://localhost:16686/trace/{{trace_id}}) to link trace ids in the console"
        ),
    }
    println!(
        "demo: service logs in {}, configs in {}",
        pipeline.log_hint(),
        pipeline.run_dir().display()
    );

    if !options.console_wait.is_zero() {
        println!(
            "demo: open {} now and sign in; the sample tickets are sent in {} s",
            pipeline.console_url,
            options.console_wait.as_secs()
        );
        tokio::time::sleep(options.console_wait).await;
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    let tickets = std::fs::read_to_string(&options.tickets_file)?;
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut rejected = 0;
    for line in tickets.lines().filter(|l| !l.trim().is_empty()) {
        let mut ticket: Value = serde_json::from_str(line)?;
        let ticket_id = format!(
            "{}-{run_id}",
            ticket["ticket_id"].as_str().unwrap_or("ticket")
        );
        ticket["ticket_id"] = json!(ticket_id);
        let subject = ticket["subject"].as_str().unwrap_or_default().to_owned();
        let (status, body) = pipeline
            .submit(&ticket, Some(&format!("demo-{ticket_id}")))
            .await?;
        if status == 202 {
            pending.push((ticket_id, subject));
        } else {
            println!("demo: ticket {ticket_id} refused with {status}: {body}");
            rejected += 1;
        }
    }
    println!(
        "demo: {} sample tickets accepted (202 after the broker acknowledged each)",
        pending.len()
    );

    // Requests that are wrong at the door: a clear problem+json answer, nothing reaches Kafka.
    for bad in [
        json!({"subject": "No text", "customer": {"id": "c-9001"}}),
        json!({"subject": "Hello", "description": "Anyone there?", "tenant_id": "someone-else"}),
    ] {
        let (status, problem) = pipeline.submit(&bad, None).await?;
        println!(
            "demo: bad request -> {status} {}: {}",
            problem["title"].as_str().unwrap_or_default(),
            problem["detail"].as_str().unwrap_or_default()
        );
        rejected += 1;
    }
    // Events another application publishes straight to Kafka, broken: they end as dead letters.
    triage_test_support::produce(
        &pipeline.names.tickets_created,
        None,
        &[
            (
                format!("poison-1-{run_id}"),
                b"{\"subject\": \"half a JSON".to_vec(),
            ),
            (format!("poison-2-{run_id}"), vec![0xde, 0xad, 0xbe, 0xef]),
        ],
    )
    .await;
    println!(
        "demo: 2 broken events published straight to {}: watch them become dead letters and one alert",
        pipeline.names.tickets_created
    );
    println!();

    let accepted = pending.len();
    let started = Instant::now();
    let mut triaged = 0;
    let mut categories = BTreeMap::new();
    let mut alerts_shown = 0;
    let mut last_lag = Instant::now();
    let mut done: HashSet<String> = HashSet::new();
    loop {
        pipeline.ensure_running()?;
        for (ticket_id, subject) in &pending {
            if done.contains(ticket_id) {
                continue;
            }
            if let Some(triage) = pipeline.triage(ticket_id).await? {
                done.insert(ticket_id.clone());
                triaged += 1;
                let category = triage["category"].as_str().unwrap_or("?").to_owned();
                *categories.entry(category.clone()).or_insert(0) += 1;
                println!(
                    "triaged  {:<16} {:<16} {:<7} {:<40.40} -> {}",
                    ticket_id,
                    category,
                    triage["priority"].as_str().unwrap_or("?"),
                    subject,
                    triage["suggested_reply"]
                        .as_str()
                        .unwrap_or_default()
                        .chars()
                        .take(90)
                        .collect::<String>()
                );
            }
        }
        let posts = pipeline.sink.posts();
        for post in posts.iter().skip(alerts_shown) {
            println!(
                "alert    Slack received: {}",
                post["text"].as_str().unwrap_or(&post.to_string())
            );
        }
        alerts_shown = posts.len();
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            if let Ok(lag) = pipeline.lag().await {
                println!("lag      {}", lag_line(&lag));
            }
        }
        if triaged == accepted && alerts_shown > 0 {
            break;
        }
        if started.elapsed() > options.timeout {
            anyhow::bail!(
                "only {triaged} of {accepted} tickets triaged and {alerts_shown} alerts within {:?}",
                options.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!();
    println!(
        "demo: {triaged}/{accepted} tickets triaged in {:.1} s, {rejected} bad requests refused, {alerts_shown} alert(s); categories {categories:?}",
        started.elapsed().as_secs_f64()
    );
    if let Ok(stats) = pipeline.sim_stats().await {
        println!(
            "demo: llm-sim served {} requests ({} paid); every answer above is simulated",
            stats["requests_total"], stats["by_status"]["200"]
        );
    }
    let summary = Summary {
        accepted,
        triaged,
        rejected,
        alerts: alerts_shown,
        categories,
    };
    if !options.once {
        println!("demo: the pipeline keeps running; send your own tickets:");
        println!(
            "  curl -X POST {}/v1/tickets -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \\\n    -d '{{\"subject\":\"Refund\",\"description\":\"I was charged twice\",\"customer\":{{\"id\":\"c-1\"}}}}'",
            pipeline.http_url, pipeline.api_key
        );
        println!("demo: Ctrl-C stops everything it started.");
        tokio::signal::ctrl_c().await?;
        println!();
    }
    println!("demo: stopping");
    pipeline.stop().await?;
    Ok(summary)
}

fn lag_line(lag: &Value) -> String {
    let Some(groups) = lag["groups"].as_object() else {
        return lag.to_string();
    };
    groups
        .iter()
        .map(|(group, figures)| format!("{group}={}", figures["lag"]))
        .collect::<Vec<_>>()
        .join("  ")
}
