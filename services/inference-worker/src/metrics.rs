//! The worker's metrics, named once. Prefix `triage_` comes from the registry.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub tenant: String,
    pub model: String,
    pub kind: &'static str,
}

/// One tenant, as a bounded label: a known tenant's id or `other` (see [`crate::fairness`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

/// Fine below 25 ms, where the pipeline's target for ticket accepted → LLM request lies
/// (p50 ≤ 5 ms, p99 ≤ 25 ms), so quantiles read from the histogram are not bucket-wide guesses.
fn wait_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03,
        0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub llm_request_seconds: Family<CallLabels, Histogram>,
    pub llm_requests: Family<CallLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost_usd: Family<UsageLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub rate_limit_waits: Family<ReasonLabels, Counter>,
    pub rate_limit_wait_seconds: Family<ReasonLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub circuit_state: Gauge,
    /// Tasks of a tenant waiting for a call slot or for the tenant's quota.
    pub tenant_waiting: Family<TenantLabels, Gauge>,
    /// Tasks of a tenant holding a call slot.
    pub tenant_in_flight: Family<TenantLabels, Gauge>,
    /// Times a tenant's task waited because the tenant was over its own quota.
    pub tenant_quota_waits: Family<TenantLabels, Counter>,
    pub cache_hits: Counter,
    pub duplicates_avoided: Counter,
    pub dead_letters: Family<ClassLabels, Counter>,
    pub results: Counter,
    pub accepted_to_request_seconds: Histogram,
    pub unprotected_calls: Counter,
    pub redis_errors: Counter,
    pub repairs: Counter,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = WorkerMetrics {
            llm_request_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            llm_requests: Family::default(),
            tokens: Family::default(),
            cost_usd: Family::default(),
            rate_limit_waits: Family::default(),
            rate_limit_wait_seconds: Family::default(),
            circuit_state: Gauge::default(),
            tenant_waiting: Family::default(),
            tenant_in_flight: Family::default(),
            tenant_quota_waits: Family::default(),
            cache_hits: Counter::default(),
            duplicates_avoided: Counter::default(),
            dead_letters: Family::default(),
            results: Counter::default(),
            accepted_to_request_seconds: Histogram::new(wait_buckets()),
            unprotected_calls: Counter::default(),
            redis_errors: Counter::default(),
            repairs: Counter::default(),
        };
        registry.register(
            "llm_request_duration_seconds",
            "LLM call latency by model and outcome",
            metrics.llm_request_seconds.clone(),
        );
        registry.register(
            "llm_requests",
            "LLM calls by model and outcome",
            metrics.llm_requests.clone(),
        );
        registry.register(
            "llm_tokens",
            "Tokens paid for, by tenant, model and kind",
            metrics.tokens.clone(),
        );
        registry.register(
            "llm_cost_usd",
            "Cost of LLM calls in USD, by tenant and model",
            metrics.cost_usd.clone(),
        );
        registry.register(
            "rate_limit_waits",
            "Times a call waited for rate-limit budget (budget) or a provider 429 (provider_429)",
            metrics.rate_limit_waits.clone(),
        );
        registry.register(
            "rate_limit_wait_seconds",
            "Time spent waiting for rate-limit budget",
            metrics.rate_limit_wait_seconds.clone(),
        );
        registry.register(
            "tenant_waiting",
            "Tasks waiting for a call slot or their tenant's quota, by tenant (known tenants, else other)",
            metrics.tenant_waiting.clone(),
        );
        registry.register(
            "tenant_in_flight",
            "Tasks holding a call slot, by tenant (known tenants, else other)",
            metrics.tenant_in_flight.clone(),
        );
        registry.register(
            "tenant_quota_waits",
            "Waits of a tenant's tasks for the tenant's own quota (known tenants, else other)",
            metrics.tenant_quota_waits.clone(),
        );
        registry.register(
            "circuit_state",
            "Provider circuit: 0 closed, 1 half-open, 2 open",
            metrics.circuit_state.clone(),
        );
        registry.register(
            "cache_hits",
            "Tasks answered from the result cache, no call paid",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "duplicates_avoided",
            "Tasks that waited on another worker's lease and reused its result",
            metrics.duplicates_avoided.clone(),
        );
        registry.register(
            "worker_dead_letters",
            "Tasks dead-lettered, by error class",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "worker_results",
            "Results produced and acknowledged",
            metrics.results.clone(),
        );
        registry.register(
            "accepted_to_llm_request_seconds",
            "From ticket accepted to its first LLM request started",
            metrics.accepted_to_request_seconds.clone(),
        );
        registry.register(
            "worker_unprotected_calls",
            "LLM calls made without cache, lease or shared limit because Redis was down (on_unavailable = proceed)",
            metrics.unprotected_calls.clone(),
        );
        registry.register(
            "worker_redis_errors",
            "Failed Redis operations",
            metrics.redis_errors.clone(),
        );
        registry.register(
            "worker_output_repairs",
            "Invalid answers sent back for one repair",
            metrics.repairs.clone(),
        );
        metrics
    }
}
