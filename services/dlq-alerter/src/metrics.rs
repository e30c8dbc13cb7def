//! dlq-alerter's metrics, named once. Registered under the pipeline prefix, so they are
//! exported as `triage_dlq_*`. No label ever carries a URL or any other secret.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabels {
    pub output: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub output: &'static str,
    /// The HTTP status, or `connect`, `timeout`, `transport`.
    pub status: String,
}

#[derive(Clone, Default)]
pub struct AlerterMetrics {
    pub dead_letters: Family<ClassLabels, Counter>,
    pub alerts_sent: Family<OutputLabels, Counter>,
    pub summaries_sent: Family<OutputLabels, Counter>,
    pub delivery_failures: Family<FailureLabels, Counter>,
    pub pending: Gauge,
}

impl AlerterMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AlerterMetrics::default();
        registry.register(
            "dlq_dead_letters",
            "Dead letters consumed, by error class",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "dlq_alerts_sent",
            "Full alerts accepted by an output",
            metrics.alerts_sent.clone(),
        );
        registry.register(
            "dlq_summaries_sent",
            "Window summaries accepted by an output",
            metrics.summaries_sent.clone(),
        );
        registry.register(
            "dlq_delivery_failures",
            "Posts an output did not accept, by status (HTTP status, connect, timeout)",
            metrics.delivery_failures.clone(),
        );
        registry.register(
            "dlq_pending_alerts",
            "Dead letters whose alert or summary is not delivered yet (their offsets stay uncommitted)",
            metrics.pending.clone(),
        );
        metrics
    }

    pub fn alert_sent(&self, output: &'static str) {
        self.alerts_sent
            .get_or_create(&OutputLabels { output })
            .inc();
    }

    pub fn summary_sent(&self, output: &'static str) {
        self.summaries_sent
            .get_or_create(&OutputLabels { output })
            .inc();
    }

    pub fn delivery_failure(&self, output: &'static str, status: &str) {
        self.delivery_failures
            .get_or_create(&FailureLabels {
                output,
                status: status.to_owned(),
            })
            .inc();
    }
}
