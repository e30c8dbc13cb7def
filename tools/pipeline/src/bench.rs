//! The pipeline benchmark of `make bench`: tickets at a fixed rate through the HTTP ingress into
//! the whole pipeline (release binaries, llm-sim with a rate limit), until every accepted ticket
//! is a row or a dead letter. Reports JSON, a markdown row and an SVG plot over time.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::{Value, json};
use triage_test_support::{MachineCpu, steal_share_since, target_dir};

use crate::{Llm, Options, Pipeline};

pub struct BenchOptions {
    pub tickets: usize,
    /// Tickets submitted per second.
    pub rate: f64,
    /// The LLM's requests-per-minute limit (llm-sim's and the worker's).
    pub rpm: u64,
    pub latency: String,
    pub workers: usize,
    pub dispatch_lanes: usize,
}

/// Runs the benchmark and returns its report (also written to bench/pipeline.{json,svg} in the target directory).
pub async fn run(options: BenchOptions) -> anyhow::Result<Value> {
    let mut pipeline_options = Options::new(Some("bench"));
    pipeline_options.workers = options.workers;
    pipeline_options.dispatch_lanes = options.dispatch_lanes;
    pipeline_options.partitions = 12;
    pipeline_options.llm = Llm::Simulator {
        rpm: options.rpm,
        latency: options.latency.clone(),
    };
    let pipeline = Arc::new(Pipeline::start(pipeline_options).await?);
    // The second worker's join would otherwise rebalance the first seconds of the run.
    pipeline
        .wait_for_settled_groups(Duration::from_secs(120))
        .await;
    let started = Instant::now();
    let machine_at_start = MachineCpu::sample();
    let accepted: Arc<Mutex<Vec<(String, f64)>>> = Arc::default();
    let mut submissions = Vec::with_capacity(options.tickets);
    let interval = Duration::from_secs_f64(1.0 / options.rate);
    let mut next = tokio::time::Instant::now();
    for i in 0..options.tickets {
        next += interval;
        tokio::time::sleep_until(next).await;
        let pipeline = Arc::clone(&pipeline);
        let accepted = Arc::clone(&accepted);
        submissions.push(tokio::spawn(async move {
            let ticket_id = format!("{}bench-{i}", pipeline.names.group_prefix);
            let ticket = json!({
                "ticket_id": ticket_id,
                "subject": "Charged twice",
                "description": "My card was charged twice for the March invoice, please refund.",
                "customer": {"id": format!("c-{}", i % 97), "tier": "pro"},
            });
            if let Ok((202, _)) = pipeline.submit(&ticket, None).await {
                accepted
                    .lock()
                    .expect("accepted lock")
                    .push((ticket_id, started.elapsed().as_secs_f64()));
            }
        }));
    }
    for submission in submissions {
        submission.await?;
    }
    let submit_seconds = started.elapsed().as_secs_f64();
    let accepted = accepted.lock().expect("accepted lock").clone();

    // Wait until every accepted ticket is a row. Times come from the rows (`triaged_at`), not
    // from when this loop noticed them.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        - started.elapsed().as_secs_f64();
    let mut done: BTreeMap<String, f64> = BTreeMap::new();
    while done.len() < accepted.len() {
        pipeline.ensure_running()?;
        if Instant::now() > deadline {
            bail!("only {} of {} tickets triaged", done.len(), accepted.len());
        }
        for (ticket_id, _) in &accepted {
            if done.contains_key(ticket_id) {
                continue;
            }
            if let Some(triage) = pipeline.triage(ticket_id).await? {
                let triaged_at = triage["triaged_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.timestamp_micros() as f64 / 1e6 - started_unix)
                    .unwrap_or_else(|| started.elapsed().as_secs_f64());
                done.insert(ticket_id.clone(), triaged_at);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total_seconds = started.elapsed().as_secs_f64();
    let steal_share = steal_share_since(machine_at_start);
    let metrics = scrape_all(&pipeline).await;
    let stats = pipeline.sim_stats().await?;
    let accepted_to_request = quantiles(&metrics, "triage_accepted_to_llm_request_seconds");
    let end_to_end = quantiles(&metrics, "triage_result_e2e_seconds");
    // What every ticket waits for between the ingress and a worker; the largest part of the
    // accepted -> LLM request latency.
    let dispatch_transaction = quantiles(&metrics, "triage_dispatch_transaction_duration_seconds");
    let paid_duplicates = llm_sim::stats::paid_duplicates(&stats);
    let dead_letters = sum_samples(&metrics, "triage_worker_dead_letters_total").round() as u64;
    let mut triage_times: Vec<f64> = done.values().copied().collect();
    triage_times.sort_by(f64::total_cmp);
    let triage_span =
        triage_times.last().copied().unwrap_or(0.0) - triage_times.first().copied().unwrap_or(0.0);
    let triaged_rate = triage_times.len().saturating_sub(1) as f64 / triage_span.max(1e-9);
    let report = json!({
        "tickets": options.tickets,
        "rate": options.rate,
        "workers": options.workers,
        "dispatch_lanes": options.dispatch_lanes,
        "accepted": accepted.len(),
        "accepted_per_s": accepted.len() as f64 / submit_seconds,
        "accepted_to_llm_request_p50_ms": accepted_to_request.0 * 1000.0,
        "accepted_to_llm_request_p99_ms": accepted_to_request.1 * 1000.0,
        "dispatch_transaction_p50_ms": dispatch_transaction.0 * 1000.0,
        "dispatch_transaction_p99_ms": dispatch_transaction.1 * 1000.0,
        "end_to_end_p50_ms": end_to_end.0 * 1000.0,
        "end_to_end_p99_ms": end_to_end.1 * 1000.0,
        "llm_rpm_limit": options.rpm,
        "triaged_per_s": triaged_rate,
        "throughput_share_of_limit": triaged_rate / (options.rpm as f64 / 60.0),
        "dead_letters": dead_letters,
        "paid_duplicates": paid_duplicates,
        "lost": accepted.len() - done.len(),
        "seconds": total_seconds,
        "cpu_steal_share": steal_share,
    });
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("pipeline.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("pipeline.svg"), plot(&accepted, &done))?;
    match Arc::try_unwrap(pipeline) {
        Ok(pipeline) => pipeline.stop().await?,
        Err(_) => bail!("pipeline still shared"),
    }
    Ok(report)
}

/// The report as a markdown table row (with its header).
pub fn markdown(report: &Value) -> String {
    format!(
        "| accepted/s | accepted→LLM request p50 / p99 | end to end p50 / p99 | share of LLM limit | dead letters | paid duplicates | lost | CPU steal |\n\
         |---|---|---|---|---|---|---|---|\n\
         | {:.0} | {:.1} ms / {:.1} ms | {:.0} ms / {:.0} ms | {:.1} % | {} | {} | {} | {} |",
        report["accepted_per_s"].as_f64().unwrap_or(0.0),
        report["accepted_to_llm_request_p50_ms"]
            .as_f64()
            .unwrap_or(0.0),
        report["accepted_to_llm_request_p99_ms"]
            .as_f64()
            .unwrap_or(0.0),
        report["end_to_end_p50_ms"].as_f64().unwrap_or(0.0),
        report["end_to_end_p99_ms"].as_f64().unwrap_or(0.0),
        report["throughput_share_of_limit"].as_f64().unwrap_or(0.0) * 100.0,
        report["dead_letters"],
        report["paid_duplicates"],
        report["lost"],
        report["cpu_steal_share"].as_f64().map_or_else(
            || "unknown".to_owned(),
            |share| format!("{:.1} %", share * 100.0)
        ),
    )
}

async fn scrape_all(pipeline: &Pipeline) -> String {
    let mut text = String::new();
    for (_, url) in pipeline.admin_urls() {
        if let Ok(response) = reqwest::get(format!("{url}/metrics")).await
            && let Ok(body) = response.text().await
        {
            text.push_str(&body);
        }
    }
    text
}

fn sum_samples(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// p50 and p99 of a Prometheus histogram (summed over label sets), interpolated within buckets
/// as `histogram_quantile` does.
fn quantiles(metrics: &str, histogram: &str) -> (f64, f64) {
    let prefix = format!("{histogram}_bucket{{");
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in metrics.lines().filter(|line| line.starts_with(&prefix)) {
        let Some(le_start) = line.find("le=\"") else {
            continue;
        };
        let le_text: String = line[le_start + 4..]
            .chars()
            .take_while(|c| *c != '"')
            .collect();
        let le = if le_text == "+Inf" {
            f64::INFINITY
        } else {
            le_text.parse().unwrap_or(f64::INFINITY)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let entry = buckets.entry(le.to_bits()).or_insert((le, 0.0));
        entry.1 += count;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last().map_or(0.0, |(_, count)| *count);
    let quantile = |q: f64| {
        let rank = q * total;
        let mut previous = (0.0, 0.0);
        for (le, count) in &sorted {
            if *count >= rank {
                if le.is_infinite() {
                    return previous.0;
                }
                let within = if count - previous.1 > 0.0 {
                    (rank - previous.1) / (count - previous.1)
                } else {
                    0.0
                };
                return previous.0 + (le - previous.0) * within;
            }
            previous = (*le, *count);
        }
        previous.0
    };
    (quantile(0.5), quantile(0.99))
}

/// Tickets accepted and triaged per second over the run, as an SVG line chart.
fn plot(accepted: &[(String, f64)], done: &BTreeMap<String, f64>) -> String {
    let per_second = |times: &mut dyn Iterator<Item = f64>| {
        let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
        for time in times {
            *counts.entry(time as u64).or_insert(0) += 1;
        }
        counts
    };
    let accepted_rate = per_second(&mut accepted.iter().map(|(_, t)| *t));
    let triaged_rate = per_second(&mut done.values().copied());
    let seconds = accepted_rate
        .keys()
        .chain(triaged_rate.keys())
        .max()
        .copied()
        .unwrap_or(1)
        .max(1);
    let peak = accepted_rate
        .values()
        .chain(triaged_rate.values())
        .max()
        .copied()
        .unwrap_or(1)
        .max(1);
    let (width, height) = (800.0, 300.0);
    let line = |counts: &BTreeMap<u64, u64>| {
        (0..=seconds)
            .map(|s| {
                let x = 40.0 + s as f64 / seconds as f64 * (width - 60.0);
                let y = height
                    - 30.0
                    - *counts.get(&s).unwrap_or(&0) as f64 / peak as f64 * (height - 60.0);
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="40" y="18">tickets per second over {seconds} s (peak {peak}/s): accepted (blue), triaged (green)</text>
<line x1="40" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="40" y1="30" x2="40" y2="{b}" stroke="black"/>
<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{accepted}"/>
<polyline fill="none" stroke="seagreen" stroke-width="1.5" points="{triaged}"/>
</svg>
"#,
        b = height - 30.0,
        r = width - 20.0,
        accepted = line(&accepted_rate),
        triaged = line(&triaged_rate),
    )
}
