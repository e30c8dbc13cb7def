//! The dispatch stage: `events.tickets.created` → `tasks.llm.inference`, exactly once.
//!
//! This is the one file that decides when the stage's offsets are committed. Each batch is one
//! Kafka transaction:
//!
//! ```text
//!   idle ──first record──▶ filling (≤ batch_max_records, ≤ batch_max_wait)
//!        ──▶ begin_transaction ─▶ produce every task / dead letter
//!        ──▶ while they are in flight: send_offsets_to_transaction(next offset per partition,
//!                                                                   group metadata)
//!        ──▶ await acknowledgements ──▶ commit_transaction ──▶ idle
//!   any error ──▶ abort_transaction ─▶ seek every partition back to its committed offset ─▶ idle
//!   abort impossible (broker restarted mid-transaction) ──▶ new producer, init_transactions, seek back
//!   fenced by a newer replica with the same transactional.id ──▶ stop with an error
//! ```
//!
//! The tasks and the consumer offsets become visible together, so a read-committed consumer of
//! `tasks.llm.inference` sees exactly one task per event whatever crashes in between: a replica
//! killed mid-batch leaves an open transaction that its successor (same `transactional.id`)
//! aborts in `init_transactions`, and the successor resumes from the last committed offsets.
//!
//! Records that cannot be decoded, or that break the contract, become `DeadLetter`s on
//! `topics.dead_letters` inside the same transaction; the stage never stops on them.

pub mod render;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
    message::{OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord, Producer},
    types::RDKafkaErrorCode,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use triage_proto::{
    ContentType,
    v1::{DeadLetter, ErrorClass, InferenceTask, TicketCreated},
};
use triage_runtime::{
    kafka::{
        dead_letter::{self, Failure},
        headers,
    },
    shutdown::Shutdown,
};

use crate::{SERVICE, config::Config};

/// How long one transactional call (init, commit, abort, offsets) may block.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("could not create the Kafka {role} client: {source}")]
    Client {
        role: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("could not subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("could not initialise transactions (transactional.id {transactional_id}): {source}")]
    Init {
        transactional_id: String,
        #[source]
        source: KafkaError,
    },
    #[error("transactional producer failed fatally (fenced by a newer replica?): {0}")]
    Fatal(#[source] KafkaError),
    #[error("could not abort a failed transaction: {0}")]
    Abort(#[source] KafkaError),
    #[error("could not rewind to the committed offsets: {0}")]
    Rewind(#[source] KafkaError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Dispatch metrics, named once here.
#[derive(Clone)]
pub struct DispatchMetrics {
    records: Family<OutcomeLabels, Counter>,
    transactions: Family<OutcomeLabels, Counter>,
    /// Begin to commit of a batch's transaction: what every ticket waits for between being
    /// accepted and its task becoming visible to the workers.
    transaction_seconds: Histogram,
}

impl Default for DispatchMetrics {
    fn default() -> Self {
        DispatchMetrics {
            records: Family::default(),
            transactions: Family::default(),
            transaction_seconds: Histogram::new([
                0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
                0.25, 0.5, 1.0, 5.0,
            ]),
        }
    }
}

impl DispatchMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = DispatchMetrics::default();
        registry.register(
            "dispatch_transaction_duration_seconds",
            "Begin to commit of committed dispatch transactions",
            metrics.transaction_seconds.clone(),
        );
        registry.register(
            "dispatch_records",
            "Ticket events handled by the dispatch stage, by outcome (task, dead_letter), counted when their transaction committed",
            metrics.records.clone(),
        );
        registry.register(
            "dispatch_transactions",
            "Dispatch transactions, by outcome (committed, aborted)",
            metrics.transactions.clone(),
        );
        metrics
    }
}

/// One record to produce inside the batch's transaction.
struct Outbound {
    topic: String,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: OwnedHeaders,
    is_task: bool,
}

/// Creates the transactional producer and runs `init_transactions`, which fences any previous
/// producer with the same `transactional.id` and aborts its open transaction.
async fn transactional_producer(
    config: &Config,
    lane: usize,
) -> Result<FutureProducer, DispatchError> {
    let dispatch = &config.dispatch;
    let transactional_id = dispatch.full_transactional_id(lane);
    let producer: FutureProducer = config
        .kafka
        .producer_config(&format!("dispatch-producer-{lane}"))
        .set("transactional.id", &transactional_id)
        .set(
            "transaction.timeout.ms",
            dispatch.transaction_timeout.as_millis().to_string(),
        )
        // Every record of a batch is queued before any acknowledgement is awaited, so they
        // share requests anyway; lingering would only delay the commit.
        .set("linger.ms", "0")
        // AddOffsetsToTxn can reach the coordinator while the previous transaction is still
        // being completed there (CONCURRENT_TRANSACTIONS). librdkafka retries it after
        // retry.backoff.ms, 100 ms by default: seen in its debug log as 120 ms transactions,
        // which set the p99 once the offsets overlapped the records. 2 ms (doubling to
        // retry.backoff.max.ms) is a few round trips.
        .set("retry.backoff.ms", "2")
        .create()
        .map_err(|source| DispatchError::Client {
            role: "dispatch producer",
            source,
        })?;
    let init_producer = producer.clone();
    blocking(move || init_producer.init_transactions(TXN_CALL_TIMEOUT))
        .await
        .map_err(|source| DispatchError::Init {
            transactional_id: transactional_id.clone(),
            source,
        })?;
    Ok(producer)
}

/// Only another replica with the same id makes an error final; any other fatal or abort error
/// is cured by a new producer (e.g. after a broker restart). "Another replica" shows as the
/// broker's ProducerFenced / InvalidProducerEpoch, as librdkafka's local `_FENCED` once the
/// producer knows (a frozen replica thawed after its replacement started: tests/fencing.rs),
/// and as FencedInstanceId on the consumer of a static member. A new producer here would
/// fence the replacement in turn, and the two would take the id from each other.
fn is_fenced(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::FencedInstanceId
        )
    )
}

/// One lane of the running stage: its clients and settings.
pub struct Dispatcher {
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    lane: usize,
    config: Arc<Config>,
    metrics: DispatchMetrics,
}

impl Dispatcher {
    /// Creates lane `lane`'s clients, subscribes, and fences any previous incarnation of this
    /// replica's lane (`init_transactions` aborts its open transaction).
    pub async fn start(
        config: Arc<Config>,
        metrics: DispatchMetrics,
        lane: usize,
    ) -> Result<Self, DispatchError> {
        let dispatch = &config.dispatch;
        let transactional_id = dispatch.full_transactional_id(lane);
        let mut consumer_config = config
            .kafka
            .consumer_config(&format!("dispatch-consumer-{lane}"), &dispatch.group_id);
        if dispatch.static_membership {
            consumer_config.set("group.instance.id", dispatch.group_instance_id(lane));
        }
        let consumer: StreamConsumer =
            consumer_config
                .create()
                .map_err(|source| DispatchError::Client {
                    role: "dispatch consumer",
                    source,
                })?;
        consumer
            .subscribe(&[&config.topics.tickets_created])
            .map_err(|source| DispatchError::Subscribe {
                topic: config.topics.tickets_created.clone(),
                source,
            })?;
        let producer = transactional_producer(&config, lane).await?;
        tracing::info!(
            lane,
            transactional_id = %transactional_id,
            group_id = %dispatch.group_id,
            topic = %config.topics.tickets_created,
            "dispatch stage started"
        );
        Ok(Dispatcher {
            consumer: Arc::new(consumer),
            producer,
            lane,
            config,
            metrics,
        })
    }

    /// Dispatches batches until `shutdown`; a batch in progress is finished first.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), DispatchError> {
        let max_records = self.config.dispatch.batch_max_records;
        let max_wait = self.config.dispatch.batch_max_wait;
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.wait() => break,
                received = self.consumer.recv() => received,
            };
            let first = match first {
                Ok(message) => message.detach(),
                Err(error) if is_fenced(&error) => return Err(DispatchError::Fatal(error)),
                Err(error) => {
                    tracing::warn!(lane = self.lane, error = %error, "dispatch consumer error");
                    continue;
                }
            };
            let mut batch = Vec::with_capacity(max_records.min(1024));
            batch.push(first);
            let deadline = tokio::time::Instant::now() + max_wait;
            while batch.len() < max_records {
                let received = if max_wait.is_zero() {
                    // Only what has already arrived joins the batch. An elapsed `timeout_at`
                    // would not say so at once: tokio's timer fires on its next 1 ms tick, and
                    // every ticket waited for it (about 1.3 ms between fetch and transaction
                    // in librdkafka's debug log).
                    match self.consumer.recv().now_or_never() {
                        Some(received) => received,
                        None => break,
                    }
                } else {
                    match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                        Ok(received) => received,
                        Err(_) => break,
                    }
                };
                match received {
                    Ok(message) => batch.push(message.detach()),
                    Err(error) => {
                        tracing::warn!(lane = self.lane, error = %error, "dispatch consumer error");
                        break;
                    }
                }
            }
            self.handle(batch).await?;
        }
        tracing::info!(lane = self.lane, "dispatch stage stopped");
        Ok(())
    }

    /// Runs one batch as a transaction; on failure aborts and rewinds so the batch is read again.
    async fn handle(&mut self, batch: Vec<OwnedMessage>) -> Result<(), DispatchError> {
        let started = Instant::now();
        match self.transact(&batch).await {
            Ok((tasks, dead_letters)) => {
                self.count("committed", tasks, dead_letters);
                self.metrics
                    .transaction_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(
                    lane = self.lane,
                    records = batch.len(),
                    tasks,
                    dead_letters,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "dispatch transaction committed"
                );
                Ok(())
            }
            Err(error) => {
                self.metrics
                    .transactions
                    .get_or_create(&OutcomeLabels { outcome: "aborted" })
                    .inc();
                if is_fenced(&error) && !self.timed_out(started) {
                    return Err(DispatchError::Fatal(error));
                }
                tracing::warn!(lane = self.lane, error = %error, records = batch.len(), "dispatch transaction failed; aborting and rewinding");
                let producer = self.producer.clone();
                let aborted = if is_fatal(&error) {
                    Err(error)
                } else {
                    blocking(move || producer.abort_transaction(TXN_CALL_TIMEOUT)).await
                };
                if let Err(abort_error) = aborted {
                    if is_fenced(&abort_error) && !self.timed_out(started) {
                        return Err(DispatchError::Abort(abort_error));
                    }
                    self.replace_producer(abort_error).await?;
                }
                self.rewind().await
            }
        }
    }

    /// Whether the transaction begun at `started` has been open longer than
    /// `transaction.timeout`. The coordinator then aborts it on its own and bumps the producer's
    /// epoch, so that a late write of the old transaction cannot land: the producer's next request
    /// is refused exactly as if another replica had fenced it. Such a fence says nothing about
    /// another replica (a broker kill or a coordinator move can hold one transaction that long),
    /// so it is cured by a new producer, like any other broken transaction state. A real
    /// successor fences a transaction younger than that; and if one came while this transaction
    /// was also that old, the new producer takes the id back once, its next transaction is
    /// young, and the next fence between the two ends one of them.
    fn timed_out(&self, started: Instant) -> bool {
        started.elapsed() >= self.config.dispatch.transaction_timeout
    }

    /// A producer that cannot abort (its transaction state is broken, typically after the
    /// broker restarted mid-transaction) is replaced; the new one's `init_transactions` aborts
    /// what was open. Retried with backoff while the brokers are unreachable.
    async fn replace_producer(&mut self, cause: KafkaError) -> Result<(), DispatchError> {
        tracing::warn!(lane = self.lane, error = %cause, "transactional producer unusable; starting a new one");
        let (config, lane) = (&self.config, self.lane);
        let producer = (|| transactional_producer(config, lane))
            .retry(while_brokers_recover())
            .when(|error| !matches!(error, DispatchError::Init { source, .. } if is_fenced(source)))
            .notify(|error, delay| {
                tracing::warn!(lane = self.lane, error = %error, retry_in = ?delay, "cannot start a new transactional producer yet");
            })
            .await
            .map_err(|error| match error {
                DispatchError::Init { source, .. } => DispatchError::Fatal(source),
                other => other,
            })?;
        self.producer = producer;
        tracing::info!(lane = self.lane, "new transactional producer ready");
        Ok(())
    }

    fn count(&self, outcome: &'static str, tasks: u64, dead_letters: u64) {
        self.metrics
            .transactions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.metrics
            .records
            .get_or_create(&OutcomeLabels { outcome: "task" })
            .inc_by(tasks);
        self.metrics
            .records
            .get_or_create(&OutcomeLabels {
                outcome: "dead_letter",
            })
            .inc_by(dead_letters);
    }

    async fn transact(&self, batch: &[OwnedMessage]) -> Result<(u64, u64), KafkaError> {
        // A local state change in librdkafka (tens of microseconds, no broker request), so it is
        // called here rather than paying a blocking-pool hand-off on every batch.
        self.producer.begin_transaction()?;
        let mut deliveries = Vec::with_capacity(batch.len());
        let (mut tasks, mut dead_letters) = (0u64, 0u64);
        let mut next_offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for message in batch {
            let outbound = route(message, &self.config);
            if outbound.is_task {
                tasks += 1;
            } else {
                dead_letters += 1;
            }
            let record = FutureRecord::to(&outbound.topic)
                .key(&outbound.key)
                .payload(&outbound.payload)
                .headers(outbound.headers);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(error, _)| error)?;
            deliveries.push(delivery);
            let next = next_offsets
                .entry((message.topic(), message.partition()))
                .or_insert(0);
            *next = (*next).max(message.offset() + 1);
        }
        // The offsets travel while the records are in flight: AddOffsetsToTxn and
        // TxnOffsetCommit overlap the AddPartitionsToTxn/Produce round trips instead of
        // following them (pipeline bench p50 about 1 ms better). Nothing is visible before
        // the commit, and the commit waits for both, so the order changes no guarantee.
        // One blocking-pool thread sends the offsets, waits for the acknowledgements and
        // commits: handing the acknowledgements back to this task and the commit to another
        // blocking call cost two more thread wake-ups per batch.
        let mut offsets = TopicPartitionList::with_capacity(next_offsets.len());
        for ((topic, partition), next) in next_offsets {
            offsets.add_partition_offset(topic, partition, Offset::Offset(next))?;
        }
        let group = self
            .consumer
            .group_metadata()
            .ok_or(KafkaError::Global(rdkafka::types::RDKafkaErrorCode::State))?;
        let producer = self.producer.clone();
        blocking(move || {
            producer.send_offsets_to_transaction(&offsets, &group, TXN_CALL_TIMEOUT)?;
            for delivery in deliveries {
                match futures::executor::block_on(delivery) {
                    Ok(Ok(_)) => {}
                    Ok(Err((error, _))) => return Err(error),
                    Err(_) => return Err(KafkaError::Canceled),
                }
            }
            wait_for_released_deliveries(&producer);
            producer.commit_transaction(TXN_CALL_TIMEOUT)
        })
        .await?;
        Ok((tasks, dead_letters))
    }

    /// Seeks every assigned partition back to its committed offset, so the aborted batch is
    /// read again (prefetched records of those partitions are dropped by the seek). Reading the
    /// committed offsets needs the group coordinator, which may be moving or restarting; that is
    /// retried with backoff rather than ending the stage.
    async fn rewind(&self) -> Result<(), DispatchError> {
        (|| {
            let consumer = Arc::clone(&self.consumer);
            blocking(move || seek_to_committed(&consumer))
        })
        .retry(while_brokers_recover())
        .when(|error| !is_fatal(error))
        .notify(|error, delay| {
            tracing::warn!(lane = self.lane, error = %error, retry_in = ?delay, "cannot rewind to the committed offsets yet");
        })
        .await
        .map_err(DispatchError::Rewind)
    }
}

/// Backoff for calls that wait on the brokers coming back: 0.5 s doubling to 10 s, for as long
/// as it takes. The stage has nothing better to do; each retry logs why, `/healthz?verbose` and
/// `triage_dependency_up{dependency="kafka"}` show the brokers unreachable, and a shutdown still
/// ends at the drain deadline.
fn while_brokers_recover() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times()
}

/// Errors no retry or abort can cure: this producer must go (fenced) or be replaced (fatal).
fn is_fatal(error: &KafkaError) -> bool {
    is_fenced(error) || matches!(error, KafkaError::Transaction(rd_error) if rd_error.is_fatal())
}

fn seek_to_committed(consumer: &StreamConsumer) -> Result<(), KafkaError> {
    let committed = consumer.committed(TXN_CALL_TIMEOUT)?;
    let mut positions = TopicPartitionList::with_capacity(committed.count());
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(offset) => Offset::Offset(offset),
            _ => Offset::Beginning,
        };
        positions.add_partition_offset(element.topic(), element.partition(), offset)?;
    }
    if positions.count() > 0 {
        consumer.seek_partitions(positions, TXN_CALL_TIMEOUT)?;
    }
    Ok(())
}

/// Decides what one event becomes: a task or a dead letter, both keyed by ticket. Keying tasks by
/// ticket (not tenant) spreads one tenant over every partition, so a single busy tenant uses every
/// worker, while the tasks of one ticket stay in one partition, in order.
fn route(message: &OwnedMessage, config: &Config) -> Outbound {
    let record_headers = message.headers();
    let parent = headers::extract_trace_context(record_headers);
    let span = tracing::info_span!(
        "dispatch",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = message.topic(),
        messaging.destination.partition.id = message.partition(),
        messaging.kafka.offset = message.offset(),
    );
    let _ = span.set_parent(parent.clone());
    let _entered = span.enter();
    let trace = headers::context_to_propagate(&span, &parent);
    let content_type = headers::get_str(record_headers, headers::CONTENT_TYPE);
    let payload = message.payload().unwrap_or_default();
    let event = match triage_proto::decode::<TicketCreated>(payload, content_type) {
        Ok(event) => event,
        Err(error) => {
            tracing::debug!(error = %error, "undecodable ticket event");
            return dead_letter(
                message,
                config,
                ErrorClass::Decode,
                error.to_string(),
                None,
                &trace,
            );
        }
    };
    // Checked here, at the edge: a timestamp no later stage can store or compute with is the
    // event's fault, and would otherwise fail three stages further on.
    let checked = render::check(&event)
        .map_err(|error| error.to_string())
        .and_then(|()| triage_proto::check_timestamps(&event).map_err(|error| error.to_string()));
    if let Err(error) = checked {
        tracing::debug!(error = %error, "invalid ticket event");
        return dead_letter(
            message,
            config,
            ErrorClass::InvalidEvent,
            error,
            Some(&event),
            &trace,
        );
    }
    let record_time = message
        .timestamp()
        .to_millis()
        .and_then(|millis| u64::try_from(millis).ok())
        .filter(|millis| *millis > 0)
        .and_then(|millis| UNIX_EPOCH.checked_add(Duration::from_millis(millis)));
    let task: InferenceTask = render::render(&event, &config.dispatch.prompt, record_time);
    let payload = triage_proto::encode(&task, ContentType::Protobuf);
    if payload.len() > MAX_TASK_BYTES {
        return dead_letter(
            message,
            config,
            ErrorClass::InvalidEvent,
            format!(
                "the ticket's task would be {} bytes, over the {MAX_TASK_BYTES} a record may have",
                payload.len()
            ),
            Some(&event),
            &trace,
        );
    }
    Outbound {
        topic: config.topics.inference_tasks.clone(),
        key: task.ticket_id.clone().into_bytes(),
        payload,
        headers: headers::for_message::<InferenceTask>(SERVICE, ContentType::Protobuf, &trace),
        is_task: true,
    }
}

/// The largest task dispatch produces: under librdkafka's `message.max.bytes` (1,000,000) and
/// the broker's `max.message.bytes` (1 MiB) with room for headers. A larger one would be
/// refused inside the transaction, which would abort and rewind the same batch forever; the
/// ingress's field limits keep real tickets far below it.
const MAX_TASK_BYTES: usize = 900_000;

fn dead_letter(
    message: &OwnedMessage,
    config: &Config,
    error_class: ErrorClass,
    error_message: String,
    event: Option<&TicketCreated>,
    trace: &opentelemetry::Context,
) -> Outbound {
    let mut failure = Failure::immediate(error_class, error_message);
    if let Some(event) = event {
        failure = failure.for_ticket(&event.ticket_id, &event.tenant_id);
    }
    let envelope = dead_letter::envelope(message, failure, SERVICE);
    let key = dead_letter::record_key(&envelope).into_bytes();
    Outbound {
        topic: config.topics.dead_letters.clone(),
        key,
        payload: triage_proto::encode(&envelope, ContentType::Protobuf),
        headers: headers::for_message::<DeadLetter>(SERVICE, ContentType::Protobuf, trace),
        is_task: false,
    }
}

/// Waits (briefly) until librdkafka has released the batch's delivery reports.
///
/// rust-rdkafka's `commit_transaction` flushes first, and its flush, finding anything still
/// counted as outstanding, polls for a full 100 ms while the producer's own thread takes the
/// events. The acknowledgements were already awaited, so what can remain is the moment between
/// a report resolving its future and librdkafka counting the record as gone. librdkafka's
/// debug log showed batches losing exactly 100 ms there, between the last ProduceResponse and
/// `commit_transaction`, whenever the offsets were done before the acknowledgements.
fn wait_for_released_deliveries(producer: &FutureProducer) {
    let deadline = Instant::now() + Duration::from_millis(20);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Runs a blocking librdkafka call off the async workers.
async fn blocking<T, F>(call: F) -> Result<T, KafkaError>
where
    F: FnOnce() -> Result<T, KafkaError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}
