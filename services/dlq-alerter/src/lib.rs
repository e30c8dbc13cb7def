//! dlq-alerter: turns `dlq.llm.failed` into Slack alerts people can act on, and replays dead letters.
//!
//! # Layout
//! - [`config`]: the service's configuration (`slack`, `webhook`, `aggregation`, `alerts`,
//!   `delivery`, `consumer`).
//! - [`alert`]: a dead letter as an alert shows it, and the window summary.
//! - [`redact`]: e-mail, phone and card redaction, and cutting excerpts.
//! - [`aggregate`]: one full alert per error class and window, the rest folded into a summary.
//! - [`output`]: Slack Block Kit and JSON bodies, and delivery that never gives up.
//! - [`replay`]: the `replay` subcommand: list dead letters and re-publish their tasks.
//! - [`api`]: the same listing and replay over HTTP for the triage console, per tenant.
//! - [`metrics`]: the `triage_dlq_*` metrics.
//!
//! # When an offset is committed
//! The shared consumer runtime commits a record only once [`AlertHandler::handle`] returns
//! `Done`, and it returns `Done` only once the alert or summary that covers the dead letter was
//! accepted (2xx) by every configured output.

// Outside input (records, headers, provider answers, database rows, configuration) must never
// panic a service, so the ways to panic are denied in service code. The few that remain guard
// invariants of the service's own data (a constant pattern, a serialiser of our own types) and
// each says so where it is allowed.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod alert;
pub mod api;
pub mod config;
pub mod metrics;
pub mod output;
pub mod redact;
pub mod replay;

use std::sync::Arc;

use anyhow::Context as _;
use rdkafka::message::OwnedMessage;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use triage_runtime::{
    kafka::{
        admin::{TopicSpec, ensure_topics},
        consumer::{self, ConsumerMetrics, ConsumerRun, Disposition, FetchGate, RecordHandler},
    },
    metrics::MetricsRegistry,
    service,
    shutdown::Shutdown,
};

pub use config::Config;

use crate::{
    aggregate::{Aggregator, Entry},
    alert::{AlertSettings, DeadLetterAlert},
    metrics::AlerterMetrics,
    output::{Output, OutputHealth, OutputKind, run_output},
};

pub const SERVICE: &str = "dlq-alerter";

/// The consumer's per-record logic: hand the dead letter to the aggregator and wait until the
/// message that covers it was delivered.
pub struct AlertHandler {
    settings: AlertSettings,
    entries_tx: mpsc::Sender<Entry>,
}

impl RecordHandler for AlertHandler {
    type Item = DeadLetterAlert;

    fn prepare(&self, record: OwnedMessage) -> DeadLetterAlert {
        DeadLetterAlert::from_record(&record, &self.settings)
    }

    fn unprocessable(&self, record: OwnedMessage, reason: String) -> DeadLetterAlert {
        DeadLetterAlert::unprocessable(&record, reason, &self.settings)
    }

    fn ordering_key(&self, _alert: &DeadLetterAlert) -> Option<Vec<u8>> {
        // Alerts of one ticket need no order: each is delivered on its own or in a summary.
        None
    }

    async fn handle(&self, alert: DeadLetterAlert) -> Disposition {
        let (delivered, delivered_rx) = oneshot::channel();
        if self
            .entries_tx
            .send(Entry { alert, delivered })
            .await
            .is_err()
        {
            return Disposition::Abandon;
        }
        match delivered_rx.await {
            Ok(()) => Disposition::Done,
            // Dropped undelivered at shutdown: the record is consumed again later.
            Err(_) => Disposition::Abandon,
        }
    }
}

impl AlertSettings {
    pub fn from_config(config: &Config) -> Self {
        AlertSettings {
            excerpt_chars: config.alerts.excerpt_chars,
            replay_command: config.alerts.replay_command.clone(),
            tickets_topic: config.topics.tickets_created.clone(),
            inference_topic: config.topics.inference_tasks.clone(),
        }
    }
}

fn build_outputs(
    config: &Config,
    metrics: &AlerterMetrics,
    health: &OutputHealth,
) -> anyhow::Result<Vec<Output>> {
    let mut outputs = Vec::new();
    let slack_url = config.slack_url().map_err(anyhow::Error::msg)?;
    let webhook_url = config.webhook_url().map_err(anyhow::Error::msg)?;
    if let Some(url) = slack_url {
        outputs.push(Output::new(
            OutputKind::Slack,
            url,
            None,
            &config.delivery,
            metrics.clone(),
            health.clone(),
        )?);
    }
    if let Some(url) = webhook_url {
        outputs.push(Output::new(
            OutputKind::Webhook,
            url,
            config.webhook.bearer_token.clone(),
            &config.delivery,
            metrics.clone(),
            health.clone(),
        )?);
    }
    if outputs.is_empty() {
        anyhow::bail!(
            "no output configured: set slack.webhook_url (or slack.webhook_url_file) and/or webhook.url"
        );
    }
    Ok(outputs)
}

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut registry = MetricsRegistry::new(SERVICE);
    let metrics = AlerterMetrics::register(registry.registry_mut());
    let consumer_metrics = ConsumerMetrics::register(registry.registry_mut());
    let gate = FetchGate::default();
    let health = OutputHealth::new(gate.clone());
    let outputs = build_outputs(&config, &metrics, &health)?;
    if config.topic_provisioning.enabled {
        let specs: Vec<TopicSpec> = TopicSpec::pipeline(&config.topics, &config.topic_provisioning)
            .into_iter()
            .filter(|spec| spec.name == config.topics.dead_letters)
            .collect();
        ensure_topics(&config.kafka, &specs)
            .await
            .context("failed to provision the dead-letter topic")?;
    }

    let mut tasks = JoinSet::new();
    let mut output_txs = Vec::with_capacity(outputs.len());
    let output_names: Vec<&str> = outputs.iter().map(|o| o.kind().label()).collect();
    for output in outputs {
        let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
        output_txs.push(deliveries_tx);
        tasks.spawn(run_output(Arc::new(output), deliveries_rx));
    }
    let (entries_tx, entries_rx) = mpsc::channel(config.consumer.max_in_flight.max(1));
    let aggregator = Aggregator::new(
        config.aggregation.clone(),
        config.alerts.replay_command.clone(),
        output_txs,
        metrics,
    );
    tasks.spawn(aggregator.run(entries_rx, shutdown.clone()));
    let handler = Arc::new(AlertHandler {
        settings: AlertSettings::from_config(&config),
        entries_tx,
    });

    let admin = service::start_admin(
        SERVICE,
        &config.admin,
        &config.kafka,
        registry,
        Vec::new(),
        shutdown.clone(),
    )
    .await?;
    let api_task = match config.api.listen {
        Some(listen) => {
            let keys = triage_runtime::auth::ApiKeys::load(&config.auth)
                .context("failed to load the API keys")?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("failed to bind the dead-letter API to {listen}"))?;
            tracing::info!(address = %listener.local_addr()?, "dead-letter API listening");
            let router = api::router(api::DeadLetterApi {
                config: Arc::new(config.clone()),
                keys,
            });
            Some(tokio::spawn(triage_runtime::admin_http::serve(
                listener,
                router,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    admin.readiness.mark_ready();
    tracing::info!(
        service = SERVICE,
        outputs = ?output_names,
        window = ?config.aggregation.window,
        topic = %config.topics.dead_letters,
        "started"
    );
    let consumed = consumer::run(
        ConsumerRun {
            kafka: &config.kafka,
            config: &config.consumer,
            topics: vec![config.topics.dead_letters.clone()],
            gate,
            metrics: consumer_metrics,
            drain_timeout: config.admin.drain_timeout,
        },
        handler,
        shutdown,
    )
    .await;
    // The consumer has drained (or given up at the deadline): whatever is still being
    // delivered covers records that stay uncommitted and will be alerted again.
    tasks.abort_all();
    consumed.context("the dead-letter consumer failed")?;
    if let Some(task) = api_task {
        task.await??;
    }
    admin.task.await??;
    Ok(())
}
