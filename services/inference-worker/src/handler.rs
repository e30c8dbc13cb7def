//! One inference task, from record to acknowledged result or dead letter.
//!
//! # The path of a task
//! 1. Decode (protobuf or JSON by content type); a record that does not decode is dead-lettered.
//! 2. Cached result for its idempotency key? Produce it, no call.
//! 3. Take the in-flight lease (Redis `SET NX PX`). Held by another worker: wait for its result
//!    (or for the lease to expire, when that worker died) instead of calling.
//! 4. Call the LLM within the shared rate limit and the circuit breaker; retry retryable
//!    failures with backoff until the retry deadline; one repair request for an invalid answer.
//! 5. Cache the result, then produce it and wait for the broker's acknowledgement; only then is
//!    the task done and its offset committable. Non-retryable failures become dead letters,
//!    also acknowledged before done.
//!
//! The only way to pay twice is a worker dying between a paid answer and caching it.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime},
};

use backon::BackoffBuilder;
use opentelemetry::trace::TraceContextExt;
use rand::Rng;
use rdkafka::{Message, message::OwnedMessage};
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use triage_proto::{
    DecodeError,
    v1::{ErrorClass, InferenceResult, InferenceTask, TokenUsage},
};
use triage_runtime::{
    kafka::{
        consumer::{Disposition, FetchGate, RecordHandler},
        dead_letter::{DeadLetterTarget, Failure},
        headers,
        producer::{ContractProducer, RetryDelays, Unsent},
    },
    shutdown::Shutdown,
};

use crate::{
    SERVICE,
    circuit::{Admission, CircuitBreaker, CircuitState},
    config::{Config, RedisUnavailable},
    fairness::{Entry, Fairness, Standing},
    llm::{ChatRequest, Completion, FailureAction, LlmClient, LlmError},
    metrics::{CallLabels, ClassLabels, ReasonLabels, TokenLabels, UsageLabels, WorkerMetrics},
    redis_store::{self, BudgetRequest, RedisStore, StoreError},
    triage::{self, Triage},
};

/// A record as the worker sees it.
pub enum Item {
    Task {
        record: OwnedMessage,
        task: Box<InferenceTask>,
    },
    Undecodable {
        record: OwnedMessage,
        error: String,
        class: ErrorClass,
    },
}

/// Everything a task needs, shared by all tasks.
pub struct WorkerHandler {
    pub config: Config,
    pub client: LlmClient,
    pub store: RedisStore,
    pub producer: ContractProducer,
    pub circuit: CircuitBreaker,
    pub gate: FetchGate,
    pub metrics: WorkerMetrics,
    pub shutdown: Shutdown,
    /// Owner value of the leases this process takes.
    pub worker_id: String,
    /// Where tasks of this process wait their turn for rate-limit budget while it is short.
    pub budget_queue: tokio::sync::Mutex<()>,
    /// Set while the shared budget is exhausted: tasks then queue instead of each asking Redis.
    pub budget_short: std::sync::atomic::AtomicBool,
    /// The call window shared between tenants.
    pub fairness: Fairness,
}

/// How a task ended before producing.
enum Outcome {
    Answered {
        triage: Triage,
        completion: Completion,
        attempts: u32,
        llm_latency: Duration,
        /// Waited for the shared budget and provider 429s, over all attempts.
        rate_limit_wait: Duration,
    },
    Failed(Failure),
    /// Shutdown came first; the task is abandoned and will be consumed again.
    Interrupted,
}

impl RecordHandler for WorkerHandler {
    type Item = Item;

    fn prepare(&self, record: OwnedMessage) -> Item {
        let content_type =
            headers::get_str(record.headers(), headers::CONTENT_TYPE).map(str::to_owned);
        let decoded: Result<InferenceTask, DecodeError> = triage_proto::decode(
            record.payload().unwrap_or_default(),
            content_type.as_deref(),
        );
        match decoded {
            Ok(task)
                if task.ticket_id.is_empty()
                    || task.tenant_id.is_empty()
                    || task.messages.is_empty() =>
            {
                Item::Undecodable {
                    record,
                    error: "task has no ticket_id, no tenant_id or no messages".into(),
                    class: ErrorClass::InvalidEvent,
                }
            }
            Ok(task) => match check_task(&task) {
                Ok(()) => Item::Task {
                    record,
                    task: Box::new(task),
                },
                Err(error) => Item::Undecodable {
                    record,
                    error,
                    class: ErrorClass::InvalidEvent,
                },
            },
            Err(error) => Item::Undecodable {
                record,
                error: error.to_string(),
                class: ErrorClass::Decode,
            },
        }
    }

    fn unprocessable(&self, record: OwnedMessage, reason: String) -> Item {
        Item::Undecodable {
            record,
            error: reason,
            class: ErrorClass::Unprocessable,
        }
    }

    fn ordering_key(&self, item: &Item) -> Option<Vec<u8>> {
        match item {
            // Ticket ids are the helpdesk's: two tenants' tickets `42` are unrelated and may run
            // at once.
            Item::Task { task, .. } => Some(triage_proto::ticket_ordering_key(
                &task.tenant_id,
                &task.ticket_id,
            )),
            Item::Undecodable { .. } => None,
        }
    }

    async fn handle(&self, item: Item) -> Disposition {
        match item {
            Item::Undecodable {
                record,
                error,
                class,
            } => {
                self.dead_letter(
                    &record,
                    Failure::immediate(class, error),
                    &opentelemetry::Context::new(),
                )
                .await
            }
            Item::Task { record, task } => {
                let span = tracing::info_span!(
                    "process inference task",
                    otel.kind = "consumer",
                    messaging.system = "kafka",
                    messaging.operation.type = "process",
                    messaging.destination.name = record.topic(),
                    messaging.destination.partition.id = record.partition(),
                    messaging.kafka.offset = record.offset(),
                    ticket.id = %task.ticket_id,
                    tenant.id = %task.tenant_id,
                );
                let _ = span.set_parent(headers::extract_trace_context(record.headers()));
                self.process(record, *task).instrument(span).await
            }
        }
    }
}

impl WorkerHandler {
    async fn process(&self, record: OwnedMessage, mut task: InferenceTask) -> Disposition {
        let model = self.client.model_for(&task.model).to_owned();
        // Always derived here, never taken from the record: a key computed without the tenant
        // (an older dispatcher) or by a careless producer must not reach another tenant's cache.
        task.idempotency_key = triage_proto::idempotency_key(
            &task.tenant_id,
            &task.ticket_id,
            &task.prompt_version,
            &model,
        );
        let key = task.idempotency_key.clone();
        let trace = tracing::Span::current().context();
        // Providers count `max_tokens` against the token budget before the answer exists.
        let estimated_tokens =
            estimate_tokens(&task.messages) + u64::from(self.config.llm.max_tokens);

        // 1. The tenant's own quota, then a call slot by the tenants' shares (crate::fairness).
        let mut entry = self.fairness.enter(&task.tenant_id);
        let Ok(quota_wait) = self
            .wait_for_quota(&entry, &task.tenant_id, estimated_tokens)
            .await
        else {
            return Disposition::Abandon;
        };
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = entry.admit() => {}
            () = shutdown.wait() => return Disposition::Abandon,
        }

        // 2 and 3. A paid answer already exists: reuse it. Else take the lease, or wait for
        // whoever holds it.
        let (claim, prepaid) = match self
            .claim_or_wait(&task, &entry, &key, &model, estimated_tokens)
            .await
        {
            ClaimOutcome::Cached(result) => {
                self.metrics.cache_hits.inc();
                tracing::debug!(key = %key, "result cache hit");
                return self
                    .produce_result(
                        &record,
                        &task,
                        *result,
                        Provenance::Cache { quota_wait },
                        &trace,
                    )
                    .await;
            }
            ClaimOutcome::ResultAppeared(result) => {
                self.metrics.duplicates_avoided.inc();
                return self
                    .produce_result(
                        &record,
                        &task,
                        *result,
                        Provenance::Cache { quota_wait },
                        &trace,
                    )
                    .await;
            }
            ClaimOutcome::Interrupted => return Disposition::Abandon,
            ClaimOutcome::Call { claim, prepaid } => (claim, prepaid),
        };
        let leased = claim == Claim::Leased;
        let protected = claim != Claim::Unprotected;

        // 4. Call, keeping the lease alive meanwhile.
        let lease = leased.then(|| self.hold_lease(&key));
        let outcome = self
            .call_with_retries(&task, &entry, &model, estimated_tokens, protected, prepaid)
            .await;

        match outcome {
            Outcome::Answered {
                triage,
                completion,
                attempts,
                llm_latency,
                rate_limit_wait,
            } => {
                let result = self.build_result(
                    &task,
                    triage,
                    &completion,
                    attempts,
                    llm_latency,
                    quota_wait + rate_limit_wait,
                );
                // 5. Cache (releasing the lease) before producing: a crash after this point
                // costs nothing to redo.
                if protected && self.store_result(&key, &result).await.is_err() {
                    return Disposition::Abandon;
                }
                // Storing the result gave the lease back.
                if let Some(lease) = lease {
                    lease.forget();
                }
                self.produce_result(&record, &task, result, Provenance::Paid, &trace)
                    .await
            }
            Outcome::Failed(failure) => {
                if let Some(lease) = lease {
                    lease.release().await;
                }
                let failure = failure.for_ticket(&task.ticket_id, &task.tenant_id);
                self.dead_letter(&record, failure, &trace).await
            }
            Outcome::Interrupted => {
                if let Some(lease) = lease {
                    lease.release().await;
                }
                Disposition::Abandon
            }
        }
    }

    /// A cached result usable for `task`: it decodes and is the same tenant's same ticket. The
    /// key already includes both; checking again costs nothing and keeps a cache written by an
    /// older worker (whose keys lacked the tenant) from answering another tenant.
    fn decode_cached(task: &InferenceTask, key: &str, bytes: &[u8]) -> Option<InferenceResult> {
        match triage_proto::decode::<InferenceResult>(
            bytes,
            Some(triage_proto::ContentType::PROTOBUF_MIME),
        ) {
            Ok(result)
                if result.tenant_id == task.tenant_id && result.ticket_id == task.ticket_id =>
            {
                Some(result)
            }
            Ok(_) => {
                tracing::warn!(key, "ignoring a cached result of another tenant or ticket");
                None
            }
            Err(error) => {
                tracing::warn!(key, error = %error, "ignoring an undecodable cached result");
                None
            }
        }
    }

    /// Runs a Redis operation under the configured policy. `Ok(None)`: Redis is down and the
    /// policy is to proceed without it.
    async fn with_redis<T, F, Fut>(&self, operation: F) -> Result<Option<T>, Interrupted>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        loop {
            match operation().await {
                Ok(value) => return Ok(Some(value)),
                Err(error) => {
                    self.metrics.redis_errors.inc();
                    if self.config.cache.on_unavailable == RedisUnavailable::Proceed {
                        tracing::warn!(error = %error, "redis unavailable; calling without cache, lease or shared limit");
                        return Ok(None);
                    }
                    tracing::warn!(error = %error, "redis unavailable; task waits");
                    self.gate.close();
                    if !self.sleep(Duration::from_secs(1)).await {
                        return Err(Interrupted);
                    }
                }
            }
        }
    }

    /// One round trip in the common case (no cached result, nobody else calling, budget to
    /// spare): the cache read, the lease and the call's budget are a single Redis script. While
    /// the budget is short, tasks take it in turn in [`Self::take_budget`] instead.
    async fn claim_or_wait(
        &self,
        task: &InferenceTask,
        entry: &Entry<'_>,
        key: &str,
        model: &str,
        estimated_tokens: u64,
    ) -> ClaimOutcome {
        let lease_ttl = self.config.cache.lease_ttl;
        let mut waited = false;
        loop {
            let standing = entry.standing();
            let budget = (!self.budget_short.load(Ordering::Relaxed)
                || standing == Standing::Under)
                .then(|| (model, self.budget_request(estimated_tokens, standing)));
            let claim = match self
                .with_redis(|| self.store.claim(key, &self.worker_id, lease_ttl, budget))
                .await
            {
                Ok(Some(claim)) => claim,
                Ok(None) => {
                    return ClaimOutcome::Call {
                        claim: Claim::Unprotected,
                        prepaid: false,
                    };
                }
                Err(Interrupted) => return ClaimOutcome::Interrupted,
            };
            match claim {
                redis_store::Claim::Cached(bytes) => {
                    return match Self::decode_cached(task, key, &bytes) {
                        Some(result) if waited => ClaimOutcome::ResultAppeared(Box::new(result)),
                        Some(result) => ClaimOutcome::Cached(Box::new(result)),
                        // Overwritten by this task's answer.
                        None => ClaimOutcome::Call {
                            claim: Claim::Unleased,
                            prepaid: false,
                        },
                    };
                }
                redis_store::Claim::Leased { budget_taken } => {
                    return ClaimOutcome::Call {
                        claim: Claim::Leased,
                        prepaid: budget_taken,
                    };
                }
                redis_store::Claim::HeldElsewhere => {}
            }
            tracing::debug!(
                key,
                "another worker holds the lease; waiting for its result"
            );
            waited = true;
            if !self.sleep(Duration::from_millis(200)).await {
                return ClaimOutcome::Interrupted;
            }
        }
    }

    /// Keeps our lease on `key` alive (renewed every third of its TTL) until the guard goes.
    fn hold_lease(&self, key: &str) -> LeaseGuard {
        let store = self.store.clone();
        let owner = self.worker_id.clone();
        let ttl = self.config.cache.lease_ttl;
        let renewed_key = key.to_owned();
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match store.renew_lease(&renewed_key, &owner, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(key = %renewed_key, "lost the in-flight lease; another worker may call too");
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(key = %renewed_key, error = %error, "failed to renew lease")
                    }
                }
            }
        });
        LeaseGuard {
            renewal,
            release: Some((self.store.clone(), key.to_owned(), self.worker_id.clone())),
        }
    }

    async fn call_with_retries(
        &self,
        task: &InferenceTask,
        entry: &Entry<'_>,
        model: &str,
        estimated_tokens: u64,
        protected: bool,
        mut prepaid: bool,
    ) -> Outcome {
        let taxonomy = task.taxonomy.clone().unwrap_or_default();
        let response_format = triage::response_format(&taxonomy, self.config.llm.structured_output);
        let mut messages = task.messages.clone();
        let mut repaired = false;
        let mut attempts = 0u32;
        let mut rate_limit_wait = Duration::ZERO;
        let mut first_failure: Option<(Instant, SystemTime)> = None;
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.config.retry.initial_backoff)
            .with_max_delay(self.config.retry.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();

        loop {
            if let Admission::Wait(wait) = self.circuit.admit() {
                self.metrics
                    .circuit_state
                    .set(self.circuit.state().gauge_value());
                if let Some(exhausted) =
                    self.retry_deadline_passed(first_failure, attempts, "circuit open")
                {
                    return Outcome::Failed(exhausted);
                }
                if !self.sleep(wait.min(Duration::from_secs(1))).await {
                    return Outcome::Interrupted;
                }
                continue;
            }
            if protected && !std::mem::take(&mut prepaid) {
                match self.take_budget(entry, model, estimated_tokens).await {
                    Ok(waited) => rate_limit_wait += waited,
                    Err(Interrupted) => {
                        self.circuit.release_probe();
                        return Outcome::Interrupted;
                    }
                }
            } else {
                self.metrics.unprotected_calls.inc();
            }
            if self.circuit.state() == CircuitState::Closed {
                self.gate.open();
            }

            if attempts == 0
                && let Some(accepted) = task
                    .accepted_at
                    .as_ref()
                    .and_then(triage_proto::to_system_time)
            {
                let waited = SystemTime::now()
                    .duration_since(accepted)
                    .unwrap_or_default();
                self.metrics
                    .accepted_to_request_seconds
                    .observe(waited.as_secs_f64());
            }
            attempts += 1;
            let call_span = tracing::info_span!(
                "chat",
                otel.name = field::Empty,
                otel.kind = "client",
                gen_ai.system = "openai",
                gen_ai.operation.name = "chat",
                gen_ai.request.model = model,
                gen_ai.response.model = field::Empty,
                gen_ai.usage.input_tokens = field::Empty,
                gen_ai.usage.output_tokens = field::Empty,
                error.type = field::Empty,
            );
            call_span.record("otel.name", format!("chat {model}"));
            let started = Instant::now();
            let result = self
                .client
                .complete(ChatRequest {
                    model,
                    messages: &messages,
                    response_format: &response_format,
                    idempotency_key: &task.idempotency_key,
                })
                .instrument(call_span.clone())
                .await;
            let llm_latency = started.elapsed();
            let outcome_label = result.as_ref().map_or_else(|e| e.label(), |_| "ok");
            let labels = CallLabels {
                model: model.to_owned(),
                outcome: outcome_label,
            };
            self.metrics
                .llm_request_seconds
                .get_or_create(&labels)
                .observe(llm_latency.as_secs_f64());
            self.metrics.llm_requests.get_or_create(&labels).inc();

            match result {
                Ok(completion) => {
                    call_span.record("gen_ai.response.model", completion.model.as_str());
                    call_span.record("gen_ai.usage.input_tokens", completion.prompt_tokens);
                    call_span.record("gen_ai.usage.output_tokens", completion.completion_tokens);
                    self.circuit.record_success();
                    self.metrics
                        .circuit_state
                        .set(CircuitState::Closed.gauge_value());
                    self.account_usage(task, &completion, model, protected)
                        .await;
                    match triage::validate(&completion.content, &taxonomy) {
                        Ok(triage) => {
                            return Outcome::Answered {
                                triage,
                                completion,
                                attempts,
                                llm_latency,
                                rate_limit_wait,
                            };
                        }
                        Err(problem) if !repaired => {
                            tracing::debug!(problem = %problem, "invalid answer; asking for one repair");
                            self.metrics.repairs.inc();
                            messages = triage::repair_messages(
                                &task.messages,
                                &completion.content,
                                &problem,
                            );
                            repaired = true;
                        }
                        Err(problem) => {
                            return Outcome::Failed(Failure {
                                class: ErrorClass::InvalidOutput,
                                message: format!("invalid answer after one repair: {problem}"),
                                attempts,
                                first_failure_at: first_failure
                                    .map_or_else(SystemTime::now, |(_, at)| at),
                                ticket_id: None,
                                tenant_id: None,
                            });
                        }
                    }
                }
                Err(error) => {
                    call_span.record("error.type", error.label());
                    let provider_limited = matches!(error, LlmError::RateLimited { .. });
                    match error.action() {
                        FailureAction::DeadLetter(class) => {
                            // The provider answered: it is healthy, the request is the problem.
                            self.circuit.record_success();
                            return Outcome::Failed(Failure {
                                class,
                                message: error.to_string(),
                                attempts,
                                first_failure_at: first_failure
                                    .map_or_else(SystemTime::now, |(_, at)| at),
                                ticket_id: None,
                                tenant_id: None,
                            });
                        }
                        FailureAction::Retry {
                            wait,
                            trips_circuit,
                        } => {
                            first_failure
                                .get_or_insert_with(|| (Instant::now(), SystemTime::now()));
                            if trips_circuit {
                                self.circuit.record_failure();
                            } else {
                                self.circuit.release_probe();
                            }
                            self.metrics
                                .circuit_state
                                .set(self.circuit.state().gauge_value());
                            tracing::debug!(error = %error, attempts, "retryable failure");
                            if let Some(exhausted) = self.retry_deadline_passed(
                                first_failure,
                                attempts,
                                &error.to_string(),
                            ) {
                                return Outcome::Failed(exhausted);
                            }
                            let delay = match wait {
                                Some(wait) => {
                                    // Past max_provider_wait a gateway's header is not believed;
                                    // past the deadline it would only end in a dead letter.
                                    let wait = wait
                                        .min(self.config.retry.max_provider_wait)
                                        .min(self.config.retry.deadline);
                                    // Tell every replica, then wait what the provider asked, plus
                                    // jitter so that the waiters do not return all at once.
                                    self.note_provider_limit(model, wait, protected).await;
                                    wait + jitter(wait / 10)
                                }
                                None => backoff.next().unwrap_or(self.config.retry.max_backoff),
                            };
                            // A 429 without a retry-after waits out a backoff: still the
                            // provider's limit.
                            if provider_limited {
                                rate_limit_wait += delay;
                            }
                            if !self.sleep(delay).await {
                                return Outcome::Interrupted;
                            }
                        }
                    }
                }
            }
        }
    }

    fn retry_deadline_passed(
        &self,
        first_failure: Option<(Instant, SystemTime)>,
        attempts: u32,
        last_error: &str,
    ) -> Option<Failure> {
        let (since, at) = first_failure?;
        (since.elapsed() >= self.config.retry.deadline).then(|| Failure {
            class: ErrorClass::RetriesExhausted,
            message: format!(
                "still failing after {:?} ({attempts} attempts); last error: {last_error}",
                self.config.retry.deadline
            ),
            attempts,
            first_failure_at: at,
            ticket_id: None,
            tenant_id: None,
        })
    }

    /// One call's share of the configured limits; a tenant over its share of the calls in flight
    /// leaves the reserve to the others (see [`crate::fairness`]).
    fn budget_request(&self, tokens: u64, standing: Standing) -> BudgetRequest {
        let limits = &self.config.rate_limit;
        let reserve = match standing {
            Standing::Over => self.config.tenants.budget_reserve,
            Standing::Even | Standing::Under => 0.0,
        };
        BudgetRequest::per_minute(
            f64::from(limits.requests_per_minute) * limits.target_utilisation,
            f64::from(limits.tokens_per_minute) * limits.target_utilisation,
            limits.burst,
            tokens,
            reserve,
        )
    }

    /// Waits until the tenant's own quota (if it has one) allows this call. One task per tenant
    /// asks Redis at a time; the others wait their turn in the process. Over quota is never a
    /// failure: the task waits, however long. Returns how long it waited (see [`RateLimitWait`]).
    async fn wait_for_quota(
        &self,
        entry: &Entry<'_>,
        tenant: &str,
        tokens: u64,
    ) -> Result<Duration, Interrupted> {
        let Some((requests_per_minute, tokens_per_minute)) = self.fairness.quota(tenant) else {
            return Ok(Duration::ZERO);
        };
        let mut waited = RateLimitWait::start();
        let request = BudgetRequest::per_minute(
            f64::from(requests_per_minute),
            f64::from(tokens_per_minute),
            self.config.rate_limit.burst,
            tokens,
            0.0,
        );
        let turn = entry.quota_turn();
        let mut shutdown = self.shutdown.clone();
        let _turn = match turn.try_lock() {
            Ok(guard) => guard,
            // Another task of the tenant is at its quota: queuing behind it is waiting for it.
            Err(_) => {
                waited.queued();
                tokio::select! {
                    guard = turn.lock() => guard,
                    () = shutdown.wait() => return Err(Interrupted),
                }
            }
        };
        loop {
            let wait = match self
                .with_redis(|| self.store.take_quota(tenant, request))
                .await?
            {
                Some(Some(wait)) => wait,
                // Taken, or Redis is down and the policy is to proceed.
                Some(None) | None => return Ok(waited.total()),
            };
            self.metrics
                .tenant_quota_waits
                .get_or_create(entry.labels())
                .inc();
            waited.queued();
            if !self.sleep(wait).await {
                return Err(Interrupted);
            }
        }
    }

    /// Waits for shared rate-limit budget; fetching pauses while there is none. While budget is
    /// plentiful every task takes its share at once; once it runs short, tasks of this process
    /// queue here in arrival order, so only one of them at a time asks Redis: the budget is
    /// shared across replicas without every waiting task polling Redis.
    ///
    /// A tenant below its share while another is over it (see [`crate::fairness`]) skips the
    /// queue: the queue holds the big tenant's calls, and the small one takes from the reserve
    /// they leave.
    ///
    /// Returns how long the task waited (see [`RateLimitWait`]).
    async fn take_budget(
        &self,
        entry: &Entry<'_>,
        model: &str,
        tokens: u64,
    ) -> Result<Duration, Interrupted> {
        let mut waited = RateLimitWait::start();
        let mut turn = None;
        loop {
            let standing = entry.standing();
            if turn.is_none()
                && standing != Standing::Under
                && self.budget_short.load(Ordering::Relaxed)
            {
                turn = Some(match self.budget_queue.try_lock() {
                    Ok(guard) => guard,
                    Err(_) => {
                        waited.queued();
                        self.budget_queue.lock().await
                    }
                });
            }
            let request = self.budget_request(tokens, standing);
            let wait = match self
                .with_redis(|| self.store.take_budget(model, request))
                .await?
            {
                Some(Some(wait)) => wait,
                // Taken, or Redis is down and the policy is to proceed.
                Some(None) | None => {
                    self.budget_short.store(false, Ordering::Relaxed);
                    return Ok(waited.total());
                }
            };
            self.budget_short.store(true, Ordering::Relaxed);
            // Short waits are the steady state at the limit, and the in-flight window already
            // holds fetching back; only a long block (a shared 429) stops fetching.
            if wait >= LONG_WAIT {
                self.gate.close();
            }
            let reason = ReasonLabels { reason: "budget" };
            self.metrics.rate_limit_waits.get_or_create(&reason).inc();
            self.metrics
                .rate_limit_wait_seconds
                .get_or_create(&reason)
                .inc_by(wait.as_secs_f64());
            waited.queued();
            if !self.sleep(wait).await {
                return Err(Interrupted);
            }
        }
    }

    async fn note_provider_limit(&self, model: &str, wait: Duration, protected: bool) {
        let reason = ReasonLabels {
            reason: "provider_429",
        };
        self.metrics.rate_limit_waits.get_or_create(&reason).inc();
        self.metrics
            .rate_limit_wait_seconds
            .get_or_create(&reason)
            .inc_by(wait.as_secs_f64());
        self.gate.close();
        if protected && let Err(error) = self.store.block_budget(model, wait).await {
            tracing::debug!(error = %error, "failed to share the provider's retry-after");
        }
    }

    /// Honours a budget the provider reports exhausted, and counts tokens and cost.
    async fn account_usage(
        &self,
        task: &InferenceTask,
        completion: &Completion,
        bucket: &str,
        protected: bool,
    ) {
        if protected
            && let Some(exhausted) = completion.rate_limits.next_capacity_in()
            && let Err(error) = self.store.block_budget(bucket, exhausted).await
        {
            tracing::debug!(error = %error, "failed to share an exhausted budget");
        }
        for (kind, count) in [
            ("input", completion.prompt_tokens),
            ("output", completion.completion_tokens),
        ] {
            self.metrics
                .tokens
                .get_or_create(&TokenLabels {
                    tenant: self.fairness.label(&task.tenant_id).tenant,
                    model: completion.model.clone(),
                    kind,
                })
                .inc_by(u64::from(count));
        }
        self.metrics
            .cost_usd
            .get_or_create(&UsageLabels {
                tenant: self.fairness.label(&task.tenant_id).tenant,
                model: completion.model.clone(),
            })
            .inc_by(self.cost(bucket, completion));
    }

    fn cost(&self, requested_model: &str, completion: &Completion) -> f64 {
        self.config
            .price_of(requested_model, &completion.model)
            .map(|price| {
                (f64::from(completion.prompt_tokens) * price.input
                    + f64::from(completion.completion_tokens) * price.output)
                    / 1_000_000.0
            })
            .unwrap_or(0.0)
    }

    fn build_result(
        &self,
        task: &InferenceTask,
        triage: Triage,
        completion: &Completion,
        attempts: u32,
        llm_latency: Duration,
        rate_limit_wait: Duration,
    ) -> InferenceResult {
        InferenceResult {
            ticket_id: task.ticket_id.clone(),
            tenant_id: task.tenant_id.clone(),
            task_id: task.task_id.clone(),
            category: triage.category,
            priority: triage.priority,
            suggested_reply: triage.suggested_reply,
            confidence: triage.confidence,
            model: completion.model.clone(),
            prompt_version: task.prompt_version.clone(),
            usage: Some(TokenUsage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
                total_tokens: completion.prompt_tokens + completion.completion_tokens,
            }),
            cost_usd: self.cost(self.client.model_for(&task.model), completion),
            llm_latency_ms: millis(llm_latency),
            attempts,
            idempotency_key: task.idempotency_key.clone(),
            from_cache: false,
            ticket_created_at: task.ticket_created_at,
            accepted_at: task.accepted_at,
            triaged_at: Some(triage_proto::timestamp(SystemTime::now())),
            provider_note: completion
                .simulator
                .as_ref()
                .map(|sim| format!("answered by {sim}, a simulator, not a language model"))
                .unwrap_or_default(),
            subject: task.subject.clone(),
            excerpt: task.excerpt.clone(),
            rate_limit_wait_ms: millis(rate_limit_wait),
        }
    }

    /// Caches the paid result and releases our lease on its key.
    async fn store_result(&self, key: &str, result: &InferenceResult) -> Result<(), Interrupted> {
        let bytes = triage_proto::encode(result, triage_proto::ContentType::Protobuf);
        let ttl = self.config.cache.result_ttl;
        self.with_redis(|| self.store.finish(key, &self.worker_id, &bytes, ttl))
            .await
            .map(|_| ())
    }

    /// Produces the result for this task (a cached one is re-addressed to it) and waits for the
    /// acknowledgement, retrying until it comes or shutdown.
    async fn produce_result(
        &self,
        record: &OwnedMessage,
        task: &InferenceTask,
        mut result: InferenceResult,
        provenance: Provenance,
        trace: &opentelemetry::Context,
    ) -> Disposition {
        if let Provenance::Cache { quota_wait } = provenance {
            result.from_cache = true;
            result.task_id = task.task_id.clone();
            // A result cached before the task carried them has none; this task's are current.
            result.subject = task.subject.clone();
            result.excerpt = task.excerpt.clone();
            // The cached wait is the paying task's; this one made no call.
            result.rate_limit_wait_ms = millis(quota_wait);
        }
        let sent = self
            .producer
            .send_until_acknowledged(
                &self.config.topics.results,
                &task.ticket_id,
                &result,
                trace,
                PRODUCE_RETRY,
                &self.shutdown,
            )
            .await;
        match sent {
            Ok(_) => {
                self.metrics.results.inc();
                Disposition::Done
            }
            Err(Unsent::ShutDown) => Disposition::Abandon,
            Err(Unsent::Rejected(error)) => {
                let failure = Failure::immediate(
                    ErrorClass::InvalidOutput,
                    format!("the result cannot be produced: {error}"),
                )
                .for_ticket(&task.ticket_id, &task.tenant_id);
                self.dead_letter(record, failure, trace).await
            }
            Err(Unsent::Fatal(error)) => Disposition::Fatal(error.to_string()),
        }
    }

    async fn dead_letter(
        &self,
        record: &OwnedMessage,
        failure: Failure,
        trace: &opentelemetry::Context,
    ) -> Disposition {
        let class = failure.class;
        tracing::debug!(class = class.label(), error = %failure.message, "dead-lettering task");
        let trace = if trace.span().span_context().is_valid() {
            trace.clone()
        } else {
            headers::extract_trace_context(record.headers())
        };
        let target = DeadLetterTarget {
            producer: &self.producer,
            topic: &self.config.topics.dead_letters,
            service: SERVICE,
            delays: PRODUCE_RETRY,
            shutdown: &self.shutdown,
        };
        let disposition = target.produce(record, failure, &trace).await;
        if disposition != Disposition::Done {
            return disposition;
        }
        self.metrics
            .dead_letters
            .get_or_create(&ClassLabels {
                class: class.label(),
            })
            .inc();
        Disposition::Done
    }

    /// Sleeps unless shutdown comes first; false when it did.
    async fn sleep(&self, duration: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            () = shutdown.wait() => false,
        }
    }
}

/// The most prompt text a task may carry. Dispatch cuts tickets to `max_ticket_chars` (about
/// 24 kB by default); a task far past that was published by someone else, and would be paid for
/// (or refused by the provider) at any size.
const MAX_PROMPT_BYTES: usize = 512 * 1024;

/// The contract rules a decoded task must meet before it costs anything: a result it could
/// never store (a timestamp out of range) or a prompt no model should be sent is the
/// producer's mistake, dead-lettered as `invalid_event`.
fn check_task(task: &InferenceTask) -> Result<(), String> {
    triage_proto::check_timestamps(task).map_err(|error| error.to_string())?;
    let prompt_bytes: usize = task.messages.iter().map(|m| m.content.len()).sum();
    if prompt_bytes > MAX_PROMPT_BYTES {
        return Err(format!(
            "the prompt is {prompt_bytes} bytes; a task may carry at most {MAX_PROMPT_BYTES}"
        ));
    }
    Ok(())
}

/// Our in-flight lease while a task calls the provider. However the task ends (an answer, a
/// dead letter, shutdown, or a panic unwinding through it), the renewal stops with the guard
/// and the lease is given back, so no lease outlives its task by more than a round trip, and a
/// second consumer never waits out the TTL behind a task that is gone.
struct LeaseGuard {
    renewal: tokio::task::JoinHandle<()>,
    /// (store, key, owner) while the lease is still ours to give back.
    release: Option<(RedisStore, String, String)>,
}

impl LeaseGuard {
    /// Gives the lease back now, so that the next consumer of the key may call at once.
    async fn release(mut self) {
        self.renewal.abort();
        if let Some((store, key, owner)) = self.release.take()
            && let Err(error) = store.release_lease(&key, &owner).await
        {
            tracing::debug!(error = %error, "failed to release lease; it expires by itself");
        }
    }

    /// Stops renewing a lease that is already given back (storing the result releases it).
    fn forget(mut self) {
        self.release = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renewal.abort();
        if let Some((store, key, owner)) = self.release.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(error) = store.release_lease(&key, &owner).await {
                    tracing::debug!(error = %error, "failed to release lease; it expires by itself");
                }
            });
        }
    }
}

/// Between attempts to produce a result or dead letter the broker did not acknowledge.
const PRODUCE_RETRY: RetryDelays = RetryDelays {
    min: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// A rate-limit wait at least this long closes the fetch gate.
const LONG_WAIT: Duration = Duration::from_secs(1);

/// Whether a result was paid for by this task or reused from an earlier one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Provenance {
    Paid,
    /// Reused; `quota_wait` is what this task waited for its tenant's quota before finding it.
    Cache {
        quota_wait: Duration,
    },
}

/// How long one wait for a rate limit (the tenant's quota, the shared budget) took. Only a task
/// that really waited counts, from the moment it asked: queued behind another task of this
/// process while the limit was reached, or told by Redis to come back later. A task that got its
/// share at once waited 0, not the Redis round trip, so that "triages that waited" counts only
/// those the limits held back.
struct RateLimitWait {
    started: Instant,
    held_back: bool,
}

impl RateLimitWait {
    fn start() -> Self {
        RateLimitWait {
            started: Instant::now(),
            held_back: false,
        }
    }

    fn queued(&mut self) {
        self.held_back = true;
    }

    fn total(&self) -> Duration {
        if self.held_back {
            self.started.elapsed()
        } else {
            Duration::ZERO
        }
    }
}

/// Milliseconds in a result's `uint32` field, saturating (49 days) rather than wrapping.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Shutdown interrupted a wait.
struct Interrupted;

/// How a task may call the LLM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// With the lease: nobody else calls for this key meanwhile.
    Leased,
    /// Without the lease (the cached result did not decode); the answer replaces it.
    Unleased,
    /// Redis is down and the policy is to proceed: no cache, no lease, no shared limit.
    Unprotected,
}

enum ClaimOutcome {
    /// Call the model. `prepaid`: the first attempt's rate-limit budget is already taken.
    Call {
        claim: Claim,
        prepaid: bool,
    },
    /// A result was cached before this task started.
    Cached(Box<InferenceResult>),
    /// Another worker held the lease and its result appeared while this task waited.
    ResultAppeared(Box<InferenceResult>),
    Interrupted,
}

fn jitter(max: Duration) -> Duration {
    let micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
    if micros == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rand::rng().random_range(0..micros))
}

/// A rough count (4 characters a token) for the token reservation; corrected after the call.
fn estimate_tokens(messages: &[triage_proto::v1::ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| m.content.chars().count() as u64 / 4 + 4)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wait_that_held_the_task_back_counts() {
        let served_at_once = RateLimitWait::start();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            served_at_once.total(),
            Duration::ZERO,
            "a Redis round trip is no wait"
        );
        let mut held_back = RateLimitWait::start();
        held_back.queued();
        std::thread::sleep(Duration::from_millis(5));
        assert!(held_back.total() >= Duration::from_millis(5));
    }

    #[test]
    fn milliseconds_saturate_instead_of_wrapping() {
        assert_eq!(millis(Duration::from_micros(1_999)), 1);
        assert_eq!(millis(Duration::from_secs(60 * 24 * 3_600)), u32::MAX);
    }
}
