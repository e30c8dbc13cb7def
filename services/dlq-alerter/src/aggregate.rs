//! Folding an incident's dead letters into a handful of messages.
//!
//! # Windows
//! Per error class:
//! - no window open → the dead letter is alerted in full at once, and a window of
//!   `aggregation.window` opens;
//! - window open → the dead letter is folded into the window's summary;
//! - window closes → if anything was folded, one summary goes out ("37 more invalid_output
//!   failures in the last 5 minutes"); the next dead letter of the class opens a new window.
//!
//! A dead letter completes (its offset may be committed) only when the message that covers it,
//! its alert or its window's summary, has been delivered by every output.
//!
//! On shutdown every open window closes at once and later windows last at most
//! [`DRAIN_WINDOW`], so that folded dead letters are delivered within the drain deadline
//! instead of being consumed (and alerted) again by the next owner of their partitions.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use triage_runtime::shutdown::Shutdown;

use crate::{
    alert::{DeadLetterAlert, Message, Summary, format_time},
    config::AggregationConfig,
    metrics::{AlerterMetrics, ClassLabels},
    output::{Completion, Delivery},
};

/// The longest window once shutdown has begun.
pub const DRAIN_WINDOW: Duration = Duration::from_millis(100);

/// A dead letter handed over by the consumer, with the signal it waits for.
pub struct Entry {
    pub alert: DeadLetterAlert,
    /// Fired once the alert or summary covering this dead letter is delivered.
    pub delivered: oneshot::Sender<()>,
}

struct Window {
    closes_at: Instant,
    folded: Folded,
}

#[derive(Default)]
struct Folded {
    count: usize,
    ticket_ids: Vec<String>,
    tenants: BTreeSet<String>,
    first_failure_at: Option<DateTime<Utc>>,
    last_failure_at: Option<DateTime<Utc>>,
    waiters: Vec<oneshot::Sender<()>>,
}

pub struct Aggregator {
    config: AggregationConfig,
    replay_command: String,
    outputs: Vec<mpsc::UnboundedSender<Delivery>>,
    windows: HashMap<String, Window>,
    metrics: AlerterMetrics,
    draining: bool,
}

impl Aggregator {
    pub fn new(
        config: AggregationConfig,
        replay_command: String,
        outputs: Vec<mpsc::UnboundedSender<Delivery>>,
        metrics: AlerterMetrics,
    ) -> Self {
        Aggregator {
            config,
            replay_command,
            outputs,
            windows: HashMap::new(),
            metrics,
            draining: false,
        }
    }

    /// Folds entries until `entries_rx` closes; then sends what is still folded.
    pub async fn run(mut self, mut entries_rx: mpsc::Receiver<Entry>, mut shutdown: Shutdown) {
        loop {
            let next_close = self.windows.values().map(|w| w.closes_at).min();
            tokio::select! {
                entry = entries_rx.recv() => match entry {
                    Some(entry) => self.accept(entry),
                    None => break,
                },
                () = tokio::time::sleep_until(next_close.unwrap_or_else(Instant::now)), if next_close.is_some() => {
                    self.close_due(Instant::now());
                }
                () = shutdown.wait(), if !self.draining => {
                    self.draining = true;
                    let open = self.windows.len();
                    self.close_all();
                    tracing::info!(windows_closed = open, "shutdown: open windows summarised now");
                }
            }
        }
        self.close_all();
    }

    fn window_length(&self) -> Duration {
        if self.draining {
            self.config.window.min(DRAIN_WINDOW)
        } else {
            self.config.window
        }
    }

    fn accept(&mut self, entry: Entry) {
        let now = Instant::now();
        let class = entry.alert.error_class.clone();
        self.metrics
            .dead_letters
            .get_or_create(&ClassLabels {
                class: class.clone(),
            })
            .inc();
        self.metrics.pending.inc();
        if self.windows.get(&class).is_some_and(|w| w.closes_at <= now) {
            self.close(&class);
        }
        match self.windows.get_mut(&class) {
            Some(window) => window.folded.add(entry, &self.config),
            None => {
                self.windows.insert(
                    class,
                    Window {
                        closes_at: now + self.window_length(),
                        folded: Folded::default(),
                    },
                );
                tracing::debug!(class = %entry.alert.error_class, dead_letter_id = %entry.alert.dead_letter_id, "first failure of its class in this window; alerting");
                self.send(Message::Alert(Box::new(entry.alert)), vec![entry.delivered]);
            }
        }
    }

    fn close_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .windows
            .iter()
            .filter(|(_, w)| w.closes_at <= now)
            .map(|(class, _)| class.clone())
            .collect();
        for class in due {
            self.close(&class);
        }
    }

    fn close_all(&mut self) {
        let classes: Vec<String> = self.windows.keys().cloned().collect();
        for class in classes {
            self.close(&class);
        }
    }

    fn close(&mut self, class: &str) {
        let Some(window) = self.windows.remove(class) else {
            return;
        };
        let folded = window.folded;
        if folded.count == 0 {
            return;
        }
        let replay_command = match (folded.first_failure_at, folded.last_failure_at) {
            (Some(first), Some(last)) => Some(format!(
                "{} --class {class} --since {} --until {} --execute",
                self.replay_command,
                format_time(Some(first)),
                format_time(Some(last)),
            )),
            _ => None,
        };
        let summary = Summary {
            error_class: class.to_owned(),
            count: folded.count,
            window_seconds: self.config.window.as_secs_f64(),
            headline: Summary::headline(folded.count, class, self.config.window),
            ticket_ids: folded.ticket_ids,
            num_tenants: folded.tenants.len(),
            tenants: folded
                .tenants
                .into_iter()
                .take(self.config.summary_tenants)
                .collect(),
            first_failure_at: folded.first_failure_at,
            last_failure_at: folded.last_failure_at,
            replay_command,
        };
        tracing::debug!(
            class,
            count = summary.count,
            "window closed; sending its summary"
        );
        self.send(Message::Summary(summary), folded.waiters);
    }

    fn send(&self, message: Message, waiters: Vec<oneshot::Sender<()>>) {
        let message = Arc::new(message);
        let completion = Arc::new(Completion::new(
            self.outputs.len(),
            waiters,
            self.metrics.clone(),
        ));
        for output in &self.outputs {
            // A closed output channel means the service is stopping; the waiters then see
            // their sender dropped and leave their records uncommitted.
            let _ = output.send(Delivery {
                message: Arc::clone(&message),
                completion: Arc::clone(&completion),
            });
        }
    }
}

impl Folded {
    fn add(&mut self, entry: Entry, config: &AggregationConfig) {
        let alert = entry.alert;
        self.count += 1;
        if self.ticket_ids.len() < config.summary_ticket_ids && !alert.ticket_id.is_empty() {
            self.ticket_ids.push(alert.ticket_id);
        }
        if !alert.tenant_id.is_empty() {
            self.tenants.insert(alert.tenant_id);
        }
        if let Some(at) = alert.last_failure_at {
            self.first_failure_at = Some(self.first_failure_at.map_or(at, |t| t.min(at)));
            self.last_failure_at = Some(self.last_failure_at.map_or(at, |t| t.max(at)));
        }
        self.waiters.push(entry.delivered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Position;

    fn alert(class: &str, ticket: &str, tenant: &str) -> DeadLetterAlert {
        let position = Position {
            topic: "dlq".into(),
            partition: 0,
            offset: 0,
        };
        DeadLetterAlert {
            dead_letter_id: format!("dl-{ticket}"),
            error_class: class.into(),
            error_message: String::new(),
            ticket_id: ticket.into(),
            tenant_id: tenant.into(),
            source: position.clone(),
            attempts: 1,
            first_failure_at: None,
            last_failure_at: DateTime::from_timestamp(1_700_000_000, 0),
            failed_service: String::new(),
            trace_id: String::new(),
            excerpt: String::new(),
            replay_command: None,
            dead_letter_record: position,
            undecodable_size_bytes: None,
        }
    }

    struct Harness {
        entries_tx: mpsc::Sender<Entry>,
        deliveries_rx: mpsc::UnboundedReceiver<Delivery>,
        _trigger: triage_runtime::shutdown::Trigger,
    }

    fn start(window: Duration) -> Harness {
        let (entries_tx, entries_rx) = mpsc::channel(1024);
        let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
        let (trigger, shutdown) = triage_runtime::shutdown::channel();
        let aggregator = Aggregator::new(
            AggregationConfig {
                window,
                summary_ticket_ids: 3,
                summary_tenants: 10,
            },
            "dlq-alerter replay".into(),
            vec![deliveries_tx],
            AlerterMetrics::default(),
        );
        tokio::spawn(aggregator.run(entries_rx, shutdown));
        Harness {
            entries_tx,
            deliveries_rx,
            _trigger: trigger,
        }
    }

    async fn submit(harness: &Harness, alert: DeadLetterAlert) -> oneshot::Receiver<()> {
        let (delivered, delivered_rx) = oneshot::channel();
        harness
            .entries_tx
            .send(Entry { alert, delivered })
            .await
            .unwrap();
        delivered_rx
    }

    #[tokio::test(start_paused = true)]
    async fn one_alert_then_one_summary_per_class_and_window() {
        let mut harness = start(Duration::from_secs(300));
        let first = submit(&harness, alert("invalid_output", "t-0", "acme")).await;
        let mut folded = Vec::new();
        for n in 1..=37 {
            let tenant = if n % 2 == 0 { "acme" } else { "globex" };
            folded.push(submit(&harness, alert("invalid_output", &format!("t-{n}"), tenant)).await);
        }
        let other = submit(&harness, alert("context_length", "c-1", "acme")).await;

        let delivery = harness.deliveries_rx.recv().await.unwrap();
        let Message::Alert(alert_message) = delivery.message.as_ref() else {
            panic!("first message must be the full alert")
        };
        assert_eq!(alert_message.ticket_id, "t-0");
        delivery.completion.output_delivered();
        first.await.unwrap();
        let delivery = harness.deliveries_rx.recv().await.unwrap();
        assert!(
            matches!(delivery.message.as_ref(), Message::Alert(a) if a.error_class == "context_length")
        );
        delivery.completion.output_delivered();
        other.await.unwrap();

        // Nothing more until the window closes, 5 minutes later.
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert!(harness.deliveries_rx.try_recv().is_err());
        let before = Instant::now();
        let delivery = harness.deliveries_rx.recv().await.unwrap();
        assert!(Instant::now() - before <= Duration::from_secs(1));
        let Message::Summary(summary) = delivery.message.as_ref() else {
            panic!("then the summary")
        };
        assert_eq!(
            summary.headline,
            "37 more invalid_output failures in the last 5 minutes"
        );
        assert_eq!(summary.ticket_ids, vec!["t-1", "t-2", "t-3"]);
        assert_eq!(summary.tenants, vec!["acme", "globex"]);
        // Folded dead letters complete only with the summary's delivery.
        let mut waiting = folded.pop().unwrap();
        assert!(waiting.try_recv().is_err());
        delivery.completion.output_delivered();
        waiting.await.unwrap();
        for receiver in folded {
            receiver.await.unwrap();
        }

        // The next failure opens a new window with a full alert.
        let _next = submit(&harness, alert("invalid_output", "t-99", "acme")).await;
        let delivery = harness.deliveries_rx.recv().await.unwrap();
        assert!(matches!(delivery.message.as_ref(), Message::Alert(a) if a.ticket_id == "t-99"));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_summarises_open_windows_at_once() {
        let mut harness = start(Duration::from_secs(300));
        let _first = submit(&harness, alert("decode", "t-0", "acme")).await;
        let folded = submit(&harness, alert("decode", "t-1", "acme")).await;
        let delivery = harness.deliveries_rx.recv().await.unwrap();
        delivery.completion.output_delivered();
        let trigger =
            std::mem::replace(&mut harness._trigger, triage_runtime::shutdown::channel().0);
        trigger.fire();
        let delivery = tokio::time::timeout(Duration::from_secs(1), harness.deliveries_rx.recv())
            .await
            .expect("summary sent at shutdown, not at window end")
            .unwrap();
        assert!(matches!(delivery.message.as_ref(), Message::Summary(s) if s.count == 1));
        delivery.completion.output_delivered();
        folded.await.unwrap();
    }
}
