//! The writer's metrics, named once and registered once (prefix `triage_`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// A correction: did the agent keep the triage, and what became of the reply.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedbackLabels {
    pub agreed: &'static str,
    pub reply: &'static str,
}

#[derive(Clone)]
pub struct WriterMetrics {
    /// Corrections stored, by agreement and reply use.
    pub feedback: Family<FeedbackLabels, Counter>,
    /// Rows inserted or replaced.
    pub rows_written: Counter,
    /// Results that changed nothing (a replay, or older than the stored triage).
    pub results_unchanged: Counter,
    pub batch_rows: Histogram,
    pub batch_seconds: Histogram,
    pub db_errors: Counter,
    /// From the ticket's acceptance by ticket-publisher to its row being committed.
    pub e2e_seconds: Histogram,
    pub dead_letters: Counter,
    pub webhook_deliveries: Family<OutcomeLabels, Counter>,
    pub webhook_dropped: Counter,
    pub stream_clients: Gauge,
}

impl WriterMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = WriterMetrics {
            feedback: Family::default(),
            rows_written: Counter::default(),
            results_unchanged: Counter::default(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            batch_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            db_errors: Counter::default(),
            e2e_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            dead_letters: Counter::default(),
            webhook_deliveries: Family::default(),
            webhook_dropped: Counter::default(),
            stream_clients: Gauge::default(),
        };
        registry.register(
            "result_writer_feedback",
            "Corrections of triages by agents: agreed (category and priority kept) and reply use",
            metrics.feedback.clone(),
        );
        registry.register(
            "result_writer_rows_written",
            "Triage rows inserted or replaced",
            metrics.rows_written.clone(),
        );
        registry.register(
            "result_writer_results_unchanged",
            "Results that changed no row: replays, or older than the stored triage",
            metrics.results_unchanged.clone(),
        );
        registry.register(
            "result_writer_batch_rows",
            "Results per database transaction",
            metrics.batch_rows.clone(),
        );
        registry.register(
            "result_writer_batch_seconds",
            "Time to commit one batch, retries included",
            metrics.batch_seconds.clone(),
        );
        registry.register(
            "result_writer_db_errors",
            "Failed batch transactions (each is retried)",
            metrics.db_errors.clone(),
        );
        registry.register(
            "result_e2e_seconds",
            "From the ticket accepted by ticket-publisher to its triage committed in PostgreSQL",
            metrics.e2e_seconds.clone(),
        );
        registry.register(
            "result_writer_dead_letters",
            "Result records dead-lettered (undecodable or invalid)",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "result_writer_webhook_deliveries",
            "Webhook deliveries by outcome (delivered, failed, rejected)",
            metrics.webhook_deliveries.clone(),
        );
        registry.register(
            "result_writer_webhook_dropped",
            "Webhook deliveries dropped because the queue was full",
            metrics.webhook_dropped.clone(),
        );
        registry.register(
            "result_writer_stream_clients",
            "Open GET /v1/triage/stream connections",
            metrics.stream_clients.clone(),
        );
        metrics
    }
}

impl WriterMetrics {
    /// Counts one stored correction.
    pub fn feedback(&self, stored: &crate::db::Feedback) {
        self.feedback
            .get_or_create(&FeedbackLabels {
                agreed: if stored.agreed() { "true" } else { "false" },
                reply: stored.reply.as_str(),
            })
            .inc();
    }
}
