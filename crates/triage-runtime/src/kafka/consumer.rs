//! The consumer runtime every at-least-once stage shares (inference-worker, result-writer,
//! dlq-alerter): many records in flight, per-key ordering, offsets committed only past finished
//! work, back-pressure by pausing fetches, cooperative rebalances and a bounded drain.
//!
//! # How it runs
//! A dedicated OS thread owns the librdkafka consumer, so that polling, rebalance callbacks and
//! synchronous commits never block the async runtime. It hands records to the async dispatcher
//! through a bounded channel and receives completions back. The dispatcher runs each record's
//! handler as a task, one at a time per ordering key.
//!
//! # When an offset is committed
//! Only here and in [`offsets`](super::offsets): when a handler reports a record finished, the
//! consumer thread marks it in the [`OffsetTracker`]; if the partition's lowest unfinished offset
//! moved, that offset is stored (`store_offsets`) and librdkafka's auto-commit sends it with the
//! next commit (every `commit_interval`), on revoke and on close. Nothing is ever stored past a
//! record whose handler has not said it is durably done.
//!
//! # States of the consumer thread
//! - consuming: poll; when `max_in_flight + readahead` records are unfinished, pause the
//!   partitions that fill that window and let the others fetch on ([`flow`](super::flow) has the
//!   rule and its bound); pause every assigned partition while the [`FetchGate`] is closed
//!   (provider 429, open circuit). The dispatcher runs at most `max_in_flight` handlers; the
//!   read-ahead waits for a slot. librdkafka's own prefetch per partition is bounded by
//!   `prefetch_kbytes`.
//! - draining (shutdown fired): all partitions paused; read-ahead records are dropped
//!   uncommitted, running ones finish and are stored until none is left or `drain_timeout`
//!   passed.
//! - done: a final synchronous commit, then the consumer is closed, which leaves the group.
//!   Records still unfinished are not committed and will be consumed again.
//!
//! # Failures, classed once
//! A handler classes its own failures: it waits out transient ones, and dead-letters a record
//! that can never succeed ([`Disposition::Done`] once the dead letter is acknowledged). What it
//! cannot class is left to the runtime, which never lets one record stop the stage:
//! - a handler (or `prepare`) that panics is run again on a fresh copy of the record, with
//!   backoff, up to `handler_attempts` times; then the record is handed to
//!   [`RecordHandler::unprocessable`] and handled as one the stage rejects, so it becomes a
//!   dead letter rather than a gap that holds the partition's commit point forever;
//! - [`Disposition::Fatal`] (credentials, ACLs: nothing any record can fix) stops the
//!   consumer without committing that record, and [`run`] returns the reason, which the
//!   service turns into one line and a non-zero exit;
//! - a commit point that has not moved for `commit_stall_warning` while records wait is a WARN
//!   naming the offset, and `consumer_commit_stalled_seconds` shows it all along.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use futures::FutureExt;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    error::KafkaResult,
    message::OwnedMessage,
    types::RDKafkaErrorCode,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinSet};

use super::{
    flow::FlowControl,
    offsets::{InFlight, OffsetTracker},
};
use crate::{
    config::{KafkaConfig, Validate},
    shutdown::Shutdown,
};

/// How a stage consumes its topic.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// The consumer group; replicas of one service share it.
    pub group_id: String,
    /// Records being handled at once, over all partitions.
    pub max_in_flight: usize,
    /// Records fetched ahead of the handlers, waiting for a free slot. When
    /// `max_in_flight + readahead` records are unfinished, the partitions holding them pause,
    /// which bounds memory whatever the backlog (at most 1.5 times that, see `flow`). The
    /// read-ahead keeps the handlers busy while fetching resumes.
    pub readahead: usize,
    /// What librdkafka may prefetch and hold before the runtime takes it, per partition
    /// (`queued.max.messages.kbytes`); librdkafka's default, 64 MiB, is far more than a
    /// window of tasks.
    pub prefetch_kbytes: usize,
    /// How often stored offsets are committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Static membership (`group.instance.id`), e.g. the pod name of a StatefulSet: a restart
    /// within the session timeout keeps the assignment and triggers no rebalance.
    pub group_instance_id: Option<String>,
    /// How long the broker waits for a consumer's heartbeat before giving its partitions away.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Times a handler may panic on one record before the record is given up as
    /// unprocessable (dead-lettered by the stage).
    pub handler_attempts: u32,
    /// A commit point standing still this long while records wait is logged as a WARN.
    #[serde(with = "humantime_serde")]
    pub commit_stall_warning: Duration,
}

impl ConsumerConfig {
    pub fn for_group(group_id: &str) -> Self {
        ConsumerConfig {
            group_id: group_id.to_owned(),
            ..Default::default()
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group_id: String::new(),
            max_in_flight: 64,
            readahead: 64,
            prefetch_kbytes: 4096,
            commit_interval: Duration::from_secs(1),
            group_instance_id: None,
            session_timeout: Duration::from_secs(10),
            handler_attempts: 3,
            commit_stall_warning: Duration::from_secs(120),
        }
    }
}

impl Validate for ConsumerConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.group_id.trim().is_empty() {
            problems.push("consumer.group_id must not be empty".into());
        }
        if self.max_in_flight == 0 {
            problems.push("consumer.max_in_flight must be at least 1".into());
        }
        if self.commit_interval.is_zero() {
            problems.push("consumer.commit_interval must be longer than zero".into());
        }
        if self.prefetch_kbytes == 0 {
            problems.push("consumer.prefetch_kbytes must be at least 1".into());
        }
        if self.handler_attempts == 0 {
            problems.push("consumer.handler_attempts must be at least 1".into());
        }
        if self.commit_stall_warning.is_zero() {
            problems.push("consumer.commit_stall_warning must be longer than zero".into());
        }
    }
}

/// What a handler did with a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The work is durable downstream (result produced and acknowledged, row committed, alert
    /// delivered, or dead letter acknowledged): the offset may be committed past it.
    Done,
    /// The work was given up without a durable outcome (shutdown in the middle of a retry): the
    /// record stays uncommitted and is consumed again by whoever owns the partition next.
    Abandon,
    /// Nothing this process does can succeed (credentials refused, no permission to write):
    /// stop consuming, commit nothing past this record, and exit with this reason.
    Fatal(String),
}

/// A stage's per-record logic.
pub trait RecordHandler: Send + Sync + 'static {
    /// The record after decoding, as the handler wants it.
    type Item: Send + 'static;

    /// Turns a raw record into an item; cheap and infallible (a record that does not decode is
    /// an item too, which `handle` dead-letters).
    fn prepare(&self, record: OwnedMessage) -> Self::Item;

    /// Items with the same key are handled one after the other in offset order; `None` means
    /// no ordering constraint.
    fn ordering_key(&self, item: &Self::Item) -> Option<Vec<u8>>;

    /// Does the work. Returns [`Disposition::Done`] only once the outcome is durable.
    fn handle(&self, item: Self::Item) -> impl Future<Output = Disposition> + Send;

    /// The item for a record this stage failed on `handler_attempts` times (it panicked):
    /// handled like a record the stage rejects, so that it ends as a dead letter with its raw
    /// bytes and `reason`, and the partition moves on.
    fn unprocessable(&self, record: OwnedMessage, reason: String) -> Self::Item;
}

/// A switch the handler closes to stop fetching (no rate-limit budget, circuit open) and opens
/// again when capacity returns. Records in flight continue either way.
#[derive(Clone, Debug, Default)]
pub struct FetchGate(Arc<AtomicBool>);

impl FetchGate {
    pub fn close(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn open(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    pub fn is_open(&self) -> bool {
        !self.0.load(Ordering::Relaxed)
    }
}

/// Why the consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("could not create the Kafka consumer for group {group}: {source}")]
    Create {
        group: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("could not subscribe group {group} to {topics:?}: {source}")]
    Subscribe {
        group: String,
        topics: Vec<String>,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot start the consumer thread of group {group}: {source}")]
    Thread {
        group: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the consumer thread of group {group} stopped unexpectedly")]
    ThreadLost { group: String },
    #[error("group {group} stopped: {reason}")]
    Fatal { group: String, reason: String },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PauseLabels {
    group: String,
    reason: &'static str,
}

/// The runtime's metrics, registered once per process and shared by its consumers.
#[derive(Clone, Default)]
pub struct ConsumerMetrics {
    in_flight: Family<GroupLabels, Gauge>,
    paused: Family<GroupLabels, Gauge>,
    held: Family<GroupLabels, Gauge>,
    records: Family<GroupLabels, Counter>,
    pauses: Family<PauseLabels, Counter>,
    commit_failures: Family<GroupLabels, Counter>,
    abandoned: Family<GroupLabels, Counter>,
    handler_panics: Family<GroupLabels, Counter>,
    unprocessable: Family<GroupLabels, Counter>,
    commit_stalled: Family<GroupLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl ConsumerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ConsumerMetrics::default();
        registry.register(
            "consumer_in_flight",
            "Records fetched and not finished: running, read ahead, or waiting behind their key",
            metrics.in_flight.clone(),
        );
        registry.register(
            "consumer_paused",
            "1 while every assigned partition is paused (gate closed, or draining)",
            metrics.paused.clone(),
        );
        registry.register(
            "consumer_partitions_held",
            "Partitions paused because their records fill the in-flight window",
            metrics.held.clone(),
        );
        registry.register(
            "consumer_records",
            "Records consumed",
            metrics.records.clone(),
        );
        registry.register(
            "consumer_pauses",
            "Pauses by reason: a partition held for filling the window (window_full), every partition for a closed gate (gate_closed)",
            metrics.pauses.clone(),
        );
        registry.register(
            "consumer_commit_failures",
            "Offset commits the broker refused",
            metrics.commit_failures.clone(),
        );
        registry.register(
            "consumer_abandoned",
            "Records given up without a durable outcome (consumed again later)",
            metrics.abandoned.clone(),
        );
        registry.register(
            "consumer_handler_panics",
            "Times a record handler panicked (the record is retried, then given up as unprocessable)",
            metrics.handler_panics.clone(),
        );
        registry.register(
            "consumer_unprocessable",
            "Records given up after handler_attempts panics and handled as rejected (dead-lettered)",
            metrics.unprocessable.clone(),
        );
        registry.register(
            "consumer_commit_stalled_seconds",
            "How long the longest-held commit point has not moved while records wait (0: none waits)",
            metrics.commit_stalled.clone(),
        );
        metrics
    }
}

/// Reports from the dispatcher to the consumer thread.
enum Report {
    Finished(InFlight),
    Abandoned,
}

struct RuntimeContext {
    group: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Every partition paused (gate closed, draining): a newly assigned one is paused too.
    paused: Arc<AtomicBool>,
    flow: Arc<Mutex<FlowControl>>,
    metrics: ConsumerMetrics,
}

impl ClientContext for RuntimeContext {}

impl ConsumerContext for RuntimeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(partitions) = rebalance else {
            return;
        };
        // Hand over what is finished before the partitions are someone else's.
        commit_stored(consumer, &self.group, &self.metrics);
        let mut tracker = self
            .tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut flow = lock(&self.flow);
        for element in partitions.elements() {
            flow.forget(&(element.topic().to_owned(), element.partition()));
            let abandoned = tracker.revoke(element.topic(), element.partition());
            tracing::info!(
                group = %self.group,
                topic = element.topic(),
                partition = element.partition(),
                in_flight_not_committed = abandoned,
                "partition revoked"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(partitions) = rebalance else {
            return;
        };
        {
            let mut tracker = self
                .tracker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A newly assigned partition fetches, whatever an earlier assignment of it did.
            let mut flow = lock(&self.flow);
            for element in partitions.elements() {
                flow.forget(&(element.topic().to_owned(), element.partition()));
                tracker.assign(element.topic(), element.partition());
                tracing::info!(
                    group = %self.group,
                    topic = element.topic(),
                    partition = element.partition(),
                    "partition assigned"
                );
            }
        }
        if self.paused.load(Ordering::Relaxed)
            && let Err(error) = consumer.pause(partitions)
        {
            tracing::warn!(group = %self.group, error = %error, "failed to pause newly assigned partitions");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                tracing::debug!(group = %self.group, partitions = offsets.count(), "offsets committed")
            }
            Err(rdkafka::error::KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => {
                self.metrics
                    .commit_failures
                    .get_or_create(&GroupLabels {
                        group: self.group.clone(),
                    })
                    .inc();
                tracing::warn!(group = %self.group, error = %error, "offset commit failed");
            }
        }
    }
}

fn commit_stored(consumer: &BaseConsumer<RuntimeContext>, group: &str, metrics: &ConsumerMetrics) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(rdkafka::error::KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => {
            metrics
                .commit_failures
                .get_or_create(&GroupLabels {
                    group: group.to_owned(),
                })
                .inc();
            tracing::warn!(group, error = %error, "offset commit failed");
        }
    }
}

/// Everything [`run`] needs besides the handler.
pub struct ConsumerRun<'a> {
    pub kafka: &'a KafkaConfig,
    pub config: &'a ConsumerConfig,
    pub topics: Vec<String>,
    pub gate: FetchGate,
    pub metrics: ConsumerMetrics,
    /// After shutdown fires, how long in-flight records may take to finish.
    pub drain_timeout: Duration,
}

/// Consumes `run.topics` with `handler` until `shutdown` fires and the drain completes.
pub async fn run<H: RecordHandler>(
    run: ConsumerRun<'_>,
    handler: Arc<H>,
    mut shutdown: Shutdown,
) -> Result<(), ConsumerError> {
    let group = run.config.group_id.clone();
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let dispatcher_tracker = Arc::clone(&tracker);
    let paused = Arc::new(AtomicBool::new(false));
    let max_unfinished = run.config.max_in_flight + run.config.readahead;
    let flow = Arc::new(Mutex::new(FlowControl::new(max_unfinished)));
    let context = RuntimeContext {
        group: group.clone(),
        tracker: Arc::clone(&tracker),
        paused: Arc::clone(&paused),
        flow: Arc::clone(&flow),
        metrics: run.metrics.clone(),
    };
    let mut client_config = run.kafka.consumer_config("consumer", &group);
    // Auto-commit only ever sends what was stored, and the tracker stores nothing past
    // unfinished work; librdkafka then also commits on revoke and on close.
    client_config
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            run.config.commit_interval.as_millis().to_string(),
        )
        .set(
            "session.timeout.ms",
            run.config.session_timeout.as_millis().to_string(),
        )
        // After a resume the next records come with the next fetch response; librdkafka's
        // default long poll (500 ms) made every resume cost half a second of idle window.
        .set("fetch.wait.max.ms", "50")
        .set(
            "queued.max.messages.kbytes",
            run.config.prefetch_kbytes.to_string(),
        );
    if let Some(instance_id) = &run.config.group_instance_id {
        client_config.set("group.instance.id", instance_id);
    }
    let consumer: BaseConsumer<RuntimeContext> = client_config
        .create_with_context(context)
        .map_err(|source| ConsumerError::Create {
            group: group.clone(),
            source,
        })?;
    let topic_refs: Vec<&str> = run.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|source| ConsumerError::Subscribe {
            group: group.clone(),
            topics: run.topics.clone(),
            source,
        })?;
    tracing::info!(group = %group, topics = ?run.topics, max_in_flight = run.config.max_in_flight, "consumer started");

    let (fetched_tx, fetched_rx) =
        mpsc::channel((run.config.max_in_flight + run.config.readahead).max(1));
    let (report_tx, report_rx) = std_mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_done_tx, thread_done_rx) = tokio::sync::oneshot::channel();
    let draining = Arc::clone(&stop);
    let poll_loop = PollLoop {
        consumer,
        group: group.clone(),
        tracker,
        paused,
        flow,
        gate: run.gate,
        drain_timeout: run.drain_timeout,
        stall_warning: run.config.commit_stall_warning,
        stop: Arc::clone(&stop),
        metrics: run.metrics.clone(),
    };
    std::thread::Builder::new()
        .name(format!("consumer-{group}"))
        .spawn(move || {
            poll_loop.run(fetched_tx, report_rx);
            let _ = thread_done_tx.send(());
        })
        .map_err(|source| ConsumerError::Thread {
            group: group.clone(),
            source,
        })?;

    let stopper = tokio::spawn(async move {
        shutdown.wait().await;
        stop.store(true, Ordering::Relaxed);
    });
    let mut dispatcher = Dispatcher {
        handler,
        running: JoinSet::new(),
        max_running: run.config.max_in_flight.max(1),
        handler_attempts: run.config.handler_attempts.max(1),
        fatal: None,
        ready: VecDeque::new(),
        waiting: HashMap::new(),
        tracker: dispatcher_tracker,
        draining,
        report_tx,
        metrics: run.metrics,
        group: group.clone(),
    };
    dispatcher.run(fetched_rx).await;
    stopper.abort();
    thread_done_rx
        .await
        .map_err(|_| ConsumerError::ThreadLost {
            group: group.clone(),
        })?;
    if let Some(reason) = dispatcher.fatal {
        return Err(ConsumerError::Fatal { group, reason });
    }
    tracing::info!(group = %group, "consumer stopped");
    Ok(())
}

struct PollLoop {
    consumer: BaseConsumer<RuntimeContext>,
    group: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    paused: Arc<AtomicBool>,
    flow: Arc<Mutex<FlowControl>>,
    gate: FetchGate,
    drain_timeout: Duration,
    stall_warning: Duration,
    stop: Arc<AtomicBool>,
    metrics: ConsumerMetrics,
}

impl PollLoop {
    fn run(
        self,
        fetched_tx: mpsc::Sender<(OwnedMessage, InFlight)>,
        report_rx: std_mpsc::Receiver<Report>,
    ) {
        let labels = GroupLabels {
            group: self.group.clone(),
        };
        let mut in_flight = 0usize;
        let mut draining_since: Option<Instant> = None;
        let mut stall_checked = Instant::now();
        let mut stall_warned: Option<Instant> = None;
        loop {
            in_flight -= self.apply_reports(&report_rx, in_flight);
            self.metrics
                .in_flight
                .get_or_create(&labels)
                .set(in_flight as i64);
            if stall_checked.elapsed() >= Duration::from_secs(1) {
                stall_checked = Instant::now();
                self.check_stall(&labels, &mut stall_warned);
            }

            if self.stop.load(Ordering::Relaxed) && draining_since.is_none() {
                tracing::info!(group = %self.group, in_flight, drain_timeout = ?self.drain_timeout, "draining");
                draining_since = Some(Instant::now());
                self.set_paused(true, None);
            }
            if let Some(since) = draining_since {
                if in_flight == 0 {
                    break;
                }
                if since.elapsed() >= self.drain_timeout {
                    tracing::warn!(group = %self.group, in_flight, "drain timed out; unfinished records will be consumed again");
                    break;
                }
            } else {
                let gate_closed = !self.gate.is_open();
                self.set_paused(gate_closed, gate_closed.then_some("gate_closed"));
                self.regulate(in_flight);
            }

            let (paused, held, assigned) = {
                let held = lock(&self.flow).held();
                let assigned = lock(&self.tracker).assigned();
                (self.paused.load(Ordering::Relaxed), held, assigned)
            };
            if paused || (held > 0 && held >= assigned) {
                // Nothing to fetch: wake on the next completion, and keep serving callbacks.
                if let Ok(report) = report_rx.recv_timeout(Duration::from_millis(10)) {
                    in_flight -= self.apply_report(report);
                }
            }
            // While partitions are held, completions that release them are applied between
            // polls: poll briefly so that a held partition resumes soon after it may.
            let poll_timeout = if paused {
                Duration::ZERO
            } else if held > 0 {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(50)
            };
            match self.consumer.poll(poll_timeout) {
                None => {}
                Some(Ok(message)) => {
                    let record = self
                        .tracker
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .begin(message.topic(), message.partition(), message.offset());
                    in_flight += 1;
                    self.metrics.records.get_or_create(&labels).inc();
                    if fetched_tx
                        .blocking_send((message.detach(), record))
                        .is_err()
                    {
                        break;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(group = %self.group, error = %error, "consumer error");
                }
            }
        }
        self.set_paused(true, None);
        // Completions that raced the exit still count.
        self.apply_reports(&report_rx, in_flight);
        commit_stored(&self.consumer, &self.group, &self.metrics);
        self.metrics.in_flight.get_or_create(&labels).set(0);
        drop(fetched_tx);
        // Dropping the consumer closes it: it leaves the group so partitions move at once.
    }

    /// Publishes how long the longest-held commit point has stood still, and warns (once per
    /// `stall_warning`) when that is longer than `stall_warning`.
    fn check_stall(&self, labels: &GroupLabels, warned: &mut Option<Instant>) {
        let now = Instant::now();
        let stall = self
            .tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .longest_stall(now);
        let seconds = stall.as_ref().map_or(0.0, |stall| stall.for_.as_secs_f64());
        self.metrics
            .commit_stalled
            .get_or_create(labels)
            .set(seconds);
        let Some(stall) = stall.filter(|stall| stall.for_ >= self.stall_warning) else {
            return;
        };
        if warned.is_some_and(|at| now.duration_since(at) < self.stall_warning) {
            return;
        }
        *warned = Some(now);
        tracing::warn!(
            group = %self.group,
            topic = %stall.topic,
            partition = stall.partition,
            offset = stall.offset,
            stalled_for = ?stall.for_,
            "commit point has not moved while records wait; the record at this offset is not finishing"
        );
    }

    /// Holds the partitions that fill the window and releases those that may fetch again
    /// ([`FlowControl`]). While every partition is paused, only the bookkeeping changes: the
    /// held ones stay paused when the rest resume.
    fn regulate(&self, in_flight: usize) {
        if !lock(&self.flow).needs_decision(in_flight) {
            return;
        }
        // Locks in the order the rebalance callbacks take them: tracker, then flow.
        let assigned = lock(&self.tracker).pending_by_partition();
        let mut flow = lock(&self.flow);
        let changes = flow.decide(in_flight, &assigned);
        let held = flow.held();
        drop(flow);
        if changes.is_empty() {
            return;
        }
        let labels = GroupLabels {
            group: self.group.clone(),
        };
        self.metrics.held.get_or_create(&labels).set(held as i64);
        if !changes.hold.is_empty() {
            self.metrics
                .pauses
                .get_or_create(&PauseLabels {
                    group: self.group.clone(),
                    reason: "window_full",
                })
                .inc_by(changes.hold.len() as u64);
        }
        if self.paused.load(Ordering::Relaxed) {
            return;
        }
        for (partitions, pause) in [(&changes.hold, true), (&changes.release, false)] {
            if partitions.is_empty() {
                continue;
            }
            let mut list = TopicPartitionList::with_capacity(partitions.len());
            for (topic, partition) in partitions {
                list.add_partition(topic, *partition);
            }
            let result = if pause {
                self.consumer.pause(&list)
            } else {
                self.consumer.resume(&list)
            };
            if let Err(error) = result {
                tracing::warn!(group = %self.group, error = %error, pause, "failed to pause or resume partitions");
            }
        }
        tracing::debug!(group = %self.group, held = ?changes.hold, released = ?changes.release, in_flight, "partitions held or released");
    }

    /// Applies every queued report; returns how many records left the in-flight window.
    fn apply_reports(&self, report_rx: &std_mpsc::Receiver<Report>, in_flight: usize) -> usize {
        let mut left = 0;
        while left < in_flight {
            match report_rx.try_recv() {
                Ok(report) => left += self.apply_report(report),
                Err(_) => break,
            }
        }
        left
    }

    fn apply_report(&self, report: Report) -> usize {
        if let Report::Finished(record) = report {
            let commit_point = self
                .tracker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .finish(&record);
            if let Some(offset) = commit_point {
                let mut offsets = TopicPartitionList::with_capacity(1);
                let stored = offsets
                    .add_partition_offset(&record.topic, record.partition, Offset::Offset(offset))
                    .and_then(|()| self.consumer.store_offsets(&offsets));
                if let Err(error) = stored {
                    // The partition was revoked meanwhile; its new owner resumes from the last commit.
                    tracing::debug!(group = %self.group, topic = %record.topic, partition = record.partition, error = %error, "failed to store offset");
                }
            }
        }
        1
    }

    fn set_paused(&self, pause: bool, reason: Option<&'static str>) {
        if self.paused.load(Ordering::Relaxed) == pause {
            return;
        }
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(error) => {
                tracing::warn!(group = %self.group, error = %error, "cannot read the assignment to pause or resume");
                return;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            // Partitions held for filling the window stay paused.
            let flow = lock(&self.flow);
            let mut fetchable = TopicPartitionList::with_capacity(assignment.count());
            for element in assignment.elements() {
                if !flow.is_held(&(element.topic().to_owned(), element.partition())) {
                    fetchable.add_partition(element.topic(), element.partition());
                }
            }
            drop(flow);
            self.consumer.resume(&fetchable)
        };
        if let Err(error) = result {
            tracing::warn!(group = %self.group, error = %error, pause, "failed to pause or resume fetching");
            return;
        }
        self.paused.store(pause, Ordering::Relaxed);
        let labels = GroupLabels {
            group: self.group.clone(),
        };
        self.metrics
            .paused
            .get_or_create(&labels)
            .set(i64::from(pause));
        if let Some(reason) = reason {
            self.metrics
                .pauses
                .get_or_create(&PauseLabels {
                    group: self.group.clone(),
                    reason,
                })
                .inc();
        }
        tracing::debug!(group = %self.group, pause, reason, "fetching paused or resumed");
    }
}

type Finished = (Option<Vec<u8>>, InFlight, Disposition);

/// A fetched record on its way to a handler: the prepared item (`None` when `prepare`
/// panicked) and a copy of the raw record, from which a panicked attempt starts afresh.
struct Fetched<I> {
    /// The ordering key; `None` for records without one.
    key: Option<Vec<u8>>,
    item: Option<I>,
    raw: OwnedMessage,
    record: InFlight,
}

struct Dispatcher<H: RecordHandler> {
    handler: Arc<H>,
    running: JoinSet<Finished>,
    max_running: usize,
    handler_attempts: u32,
    /// Set by the first [`Disposition::Fatal`]: nothing new starts and [`run`] reports it.
    fatal: Option<String>,
    /// Items free to run (first of their key, or without one), waiting for a running slot.
    ready: VecDeque<Fetched<H::Item>>,
    /// Items waiting behind a running or ready item with the same ordering key. A key present
    /// here (even with an empty queue) is running or ready.
    waiting: HashMap<Vec<u8>, VecDeque<Fetched<H::Item>>>,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Set at shutdown: nothing new starts.
    draining: Arc<AtomicBool>,
    report_tx: std_mpsc::Sender<Report>,
    metrics: ConsumerMetrics,
    group: String,
}

impl<H: RecordHandler> Dispatcher<H> {
    async fn run(&mut self, mut fetched_rx: mpsc::Receiver<(OwnedMessage, InFlight)>) {
        loop {
            tokio::select! {
                fetched = fetched_rx.recv() => match fetched {
                    Some((message, record)) => self.accept(message, record),
                    // The consumer thread exited: after a drain, or at the drain deadline, when
                    // whatever still runs is abandoned uncommitted.
                    None => break,
                },
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                    match joined {
                        Ok((key, record, disposition)) => self.finish(key, record, disposition),
                        // Only an abort ends a task without its result, and aborts happen
                        // after this loop; the record stays uncommitted either way.
                        Err(error) => tracing::error!(group = %self.group, error = %error, "record task ended without a result"),
                    }
                }
            }
        }
        self.running.abort_all();
    }

    fn accept(&mut self, message: OwnedMessage, record: InFlight) {
        let raw = message.clone();
        let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let item = self.handler.prepare(message);
            let key = self.handler.ordering_key(&item);
            (item, key)
        }));
        // A record `prepare` panics on runs without a key; its task prepares it again and,
        // failing that, hands it to `unprocessable`.
        let (item, key) = match prepared {
            Ok((item, key)) => (Some(item), key),
            Err(_) => (None, None),
        };
        if let Some(key) = &key {
            let fetched = Fetched {
                key: Some(key.clone()),
                item,
                raw,
                record,
            };
            if let Some(queue) = self.waiting.get_mut(key) {
                queue.push_back(fetched);
                return;
            }
            self.waiting.insert(key.clone(), VecDeque::new());
            self.ready.push_back(fetched);
        } else {
            self.ready.push_back(Fetched {
                key: None,
                item,
                raw,
                record,
            });
        }
        self.fill();
    }

    /// Starts ready items while running slots are free. An item whose partition was revoked
    /// before it started, or any item once shutdown began, is dropped uncommitted: it will be
    /// read again.
    fn fill(&mut self) {
        while self.running.len() < self.max_running {
            let Some(fetched) = self.ready.pop_front() else {
                return;
            };
            if !self.draining.load(Ordering::Relaxed)
                && self
                    .tracker
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_current(&fetched.record)
            {
                self.spawn(fetched);
            } else {
                self.report(Disposition::Abandon, fetched.record);
                self.next_of_key(fetched.key);
            }
        }
    }

    fn spawn(&mut self, fetched: Fetched<H::Item>) {
        let attempt = HandlerAttempts {
            handler: Arc::clone(&self.handler),
            group: self.group.clone(),
            attempts: self.handler_attempts,
            metrics: self.metrics.clone(),
        };
        self.running.spawn(async move {
            let record = fetched.record.clone();
            let key = fetched.key.clone();
            let disposition = attempt.run(fetched).await;
            (key, record, disposition)
        });
    }

    fn finish(&mut self, key: Option<Vec<u8>>, record: InFlight, disposition: Disposition) {
        if let Disposition::Fatal(reason) = &disposition
            && self.fatal.is_none()
        {
            tracing::error!(group = %self.group, topic = %record.topic, partition = record.partition, offset = record.offset, reason = %reason, "stopping: no record can succeed");
            self.fatal = Some(reason.clone());
            self.draining.store(true, Ordering::Relaxed);
        }
        self.report(disposition, record);
        self.next_of_key(key);
        self.fill();
    }

    fn report(&self, disposition: Disposition, record: InFlight) {
        let report = match disposition {
            Disposition::Done => Report::Finished(record),
            Disposition::Abandon | Disposition::Fatal(_) => {
                self.metrics
                    .abandoned
                    .get_or_create(&GroupLabels {
                        group: self.group.clone(),
                    })
                    .inc();
                Report::Abandoned
            }
        };
        let _ = self.report_tx.send(report);
    }

    /// The item of `key` that finished (or was dropped) lets the next one of that key run.
    fn next_of_key(&mut self, key: Option<Vec<u8>>) {
        let Some(key) = key else { return };
        let next = self.waiting.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some(fetched) => self.ready.push_back(fetched),
            None => {
                self.waiting.remove(&key);
            }
        }
    }
}

/// One record's handling, panics included: a panicked attempt starts again from the raw record
/// after a backoff, and the last one hands it to [`RecordHandler::unprocessable`].
struct HandlerAttempts<H> {
    handler: Arc<H>,
    group: String,
    attempts: u32,
    metrics: ConsumerMetrics,
}

impl<H: RecordHandler> HandlerAttempts<H> {
    async fn run(self, mut fetched: Fetched<H::Item>) -> Disposition {
        let record = &fetched.record;
        let labels = GroupLabels {
            group: self.group.clone(),
        };
        let mut backoff = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
        );
        let mut last_panic = String::new();
        for attempt in 1..=self.attempts {
            let handler = &self.handler;
            let raw = &fetched.raw;
            let outcome = AssertUnwindSafe(async {
                let item = match fetched.item.take() {
                    Some(item) => item,
                    None => handler.prepare(raw.clone()),
                };
                handler.handle(item).await
            })
            .catch_unwind()
            .await;
            match outcome {
                Ok(disposition) => return disposition,
                Err(panic) => {
                    last_panic = panic_text(panic.as_ref());
                    self.metrics.handler_panics.get_or_create(&labels).inc();
                    tracing::error!(group = %self.group, topic = %record.topic, partition = record.partition, offset = record.offset, attempt, panic = %last_panic, "record handler panicked");
                }
            }
            if attempt < self.attempts {
                tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5))).await;
            }
        }
        self.metrics.unprocessable.get_or_create(&labels).inc();
        let reason = format!(
            "the stage failed on this record {} times (it panicked: {last_panic})",
            self.attempts
        );
        tracing::error!(group = %self.group, topic = %record.topic, partition = record.partition, offset = record.offset, "giving the record up as unprocessable");
        let handler = &self.handler;
        let raw = fetched.raw.clone();
        let given_up =
            AssertUnwindSafe(async { handler.handle(handler.unprocessable(raw, reason)).await })
                .catch_unwind()
                .await;
        given_up.unwrap_or_else(|_| {
            tracing::error!(group = %self.group, topic = %record.topic, partition = record.partition, offset = record.offset, "dead-lettering the unprocessable record panicked too; it stays uncommitted");
            Disposition::Abandon
        })
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned())
}

/// The runtime's locks guard bookkeeping that stays consistent through a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
