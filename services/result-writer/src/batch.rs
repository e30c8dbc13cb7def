//! The batcher: collects decoded results from the record handlers, writes them to PostgreSQL in
//! one transaction per batch, and only then tells each handler its record is durable.
//!
//! # When a batch is written
//! As soon as it holds `batch.max_rows` results, or `batch.max_delay` after its first result
//! arrived, whichever comes first. The next batch fills while one is being written.
//!
//! # When PostgreSQL refuses
//! Each failure is classed once ([`DbFailure`]):
//! - transient (unreachable, restarting, timed out): the transaction is retried with
//!   exponential backoff, forever, and the consumer's [`FetchGate`] is closed meanwhile so that
//!   no more records are fetched. Nothing is skipped: the handlers of the batch keep waiting and
//!   their offsets stay uncommitted. Only a shutdown ends the retries; the batch's records are
//!   then abandoned and consumed again later.
//! - a row PostgreSQL refuses (SQLSTATE classes 22, 23 and 54): the batch is split in halves until
//!   the refused rows stand alone; every other row is written, and each refused one is handed
//!   back to its handler as [`Written::Refused`] with the server's words, to be dead-lettered.
//!   A batch of n rows with one bad row costs about 2·log2(n) extra transactions.
//! - fatal (credentials, permissions, missing schema): every handler of the batch hears
//!   [`Written::Fatal`], and the consumer stops the process.
//!
//! # After the commit
//! Handlers are released first (their offsets may be committed), then the rows that actually
//! changed are announced on the live stream and offered to the tenant's webhook.

use std::{collections::HashMap, sync::Arc, time::Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::{broadcast, mpsc, oneshot};
use triage_runtime::{kafka::consumer::FetchGate, shutdown::Shutdown};

use crate::{
    config::{BatchConfig, DatabaseConfig},
    db::{DbFailure, Store},
    metrics::WriterMetrics,
    triage::{NewTriage, Triage},
    webhook::Webhooks,
};

/// One result waiting for its batch; `written_tx` says what became of it. Dropping it unsent
/// means "not durable".
pub struct Pending {
    pub triage: NewTriage,
    pub written_tx: oneshot::Sender<Written>,
}

/// What became of a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Committed, or the table already held a newer result of its key.
    Stored,
    /// PostgreSQL refuses this row itself (the server's words); it will never be stored.
    Refused(String),
    /// No row can be written (credentials, permissions, schema).
    Fatal(String),
}

/// One row of a batch and the handlers waiting for it.
struct Row {
    triage: NewTriage,
    waiters: Vec<oneshot::Sender<Written>>,
}

/// How one transaction attempt ended, after transient failures were retried.
enum Attempt {
    Committed(Vec<(usize, chrono::DateTime<Utc>)>),
    Refused(String),
    Fatal(String),
    ShutDown,
}

pub struct BatchWriter {
    pub store: Store,
    pub batch: BatchConfig,
    pub database: DatabaseConfig,
    pub gate: FetchGate,
    pub metrics: WriterMetrics,
    pub published_tx: broadcast::Sender<Arc<Triage>>,
    pub webhooks: Webhooks,
}

impl BatchWriter {
    /// Runs until every sender of `pending_rx` is gone (the consumer stopped), so that results
    /// still arriving during the drain are written.
    pub async fn run(self, mut pending_rx: mpsc::Receiver<Pending>, shutdown: Shutdown) {
        let mut batch = Vec::with_capacity(self.batch.max_rows);
        loop {
            if pending_rx.recv_many(&mut batch, self.batch.max_rows).await == 0 {
                break;
            }
            let deadline = tokio::time::Instant::now() + self.batch.max_delay;
            while batch.len() < self.batch.max_rows {
                let room = self.batch.max_rows - batch.len();
                match tokio::time::timeout_at(deadline, pending_rx.recv_many(&mut batch, room))
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            self.write(std::mem::take(&mut batch), &shutdown).await;
        }
        tracing::debug!("batch writer stopped");
    }

    async fn write(&self, batch: Vec<Pending>, shutdown: &Shutdown) {
        let started = Instant::now();
        let results = batch.len();
        // Slices of the batch still to write; a refused slice is split in halves until the
        // refused rows stand alone.
        let mut todo = vec![newest_per_key(batch)];
        let mut written: Vec<(NewTriage, chrono::DateTime<Utc>)> = Vec::new();
        let mut rows_refused = 0usize;
        while let Some(mut slice) = todo.pop() {
            let attempt = {
                let triages: Vec<&NewTriage> = slice.iter().map(|row| &row.triage).collect();
                self.commit(&triages, shutdown).await
            };
            match attempt {
                Attempt::Committed(changed) => {
                    let mut rows: Vec<Option<NewTriage>> = slice
                        .into_iter()
                        .map(|row| {
                            for waiter in row.waiters {
                                let _ = waiter.send(Written::Stored);
                            }
                            Some(row.triage)
                        })
                        .collect();
                    written.extend(changed.into_iter().filter_map(|(index, written_at)| {
                        Some((rows.get_mut(index)?.take()?, written_at))
                    }));
                }
                Attempt::Refused(reason) if slice.len() > 1 => {
                    tracing::info!(
                        rows = slice.len(),
                        reason,
                        "PostgreSQL refused a row of the batch; isolating it"
                    );
                    let second = slice.split_off(slice.len() / 2);
                    todo.push(second);
                    todo.push(slice);
                }
                Attempt::Refused(reason) => {
                    rows_refused += 1;
                    let row = slice.pop();
                    tracing::warn!(
                        ticket_id = row.as_ref().map(|row| row.triage.ticket_id.as_str()),
                        reason,
                        "PostgreSQL refuses the row; its result is dead-lettered"
                    );
                    for waiter in row.into_iter().flat_map(|row| row.waiters) {
                        let _ = waiter.send(Written::Refused(reason.clone()));
                    }
                }
                Attempt::Fatal(reason) => {
                    tracing::error!(reason, "PostgreSQL refuses every write; stopping");
                    let rest = todo.drain(..).flatten();
                    for row in slice.into_iter().chain(rest) {
                        for waiter in row.waiters {
                            let _ = waiter.send(Written::Fatal(reason.clone()));
                        }
                    }
                    return;
                }
                Attempt::ShutDown => {
                    tracing::warn!(
                        results,
                        "batch not written before shutdown; its records stay uncommitted and will be consumed again"
                    );
                    return;
                }
            }
        }
        let committed_at = Utc::now();
        self.metrics.rows_written.inc_by(written.len() as u64);
        self.metrics
            .results_unchanged
            .inc_by(results.saturating_sub(written.len() + rows_refused) as u64);
        self.metrics.batch_rows.observe(results as f64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        for (row, written_at) in written {
            if let Some(accepted_at) = row.accepted_at {
                let latency = (committed_at - accepted_at).to_std().unwrap_or_default();
                self.metrics.e2e_seconds.observe(latency.as_secs_f64());
            }
            let triage = Arc::new(Triage::written(row, written_at));
            self.webhooks.offer(&triage);
            // No subscriber is fine: the stream only shows what happens while one listens.
            let _ = self.published_tx.send(triage);
        }
    }

    /// One transaction of `rows`, retried while its failure is transient, with fetching paused.
    async fn commit(&self, rows: &[&NewTriage], shutdown: &Shutdown) -> Attempt {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.database.retry_min_delay)
            .with_max_delay(self.database.retry_max_delay)
            .without_max_times()
            .with_jitter()
            .build();
        let mut failed = false;
        let attempt = loop {
            let error =
                match tokio::time::timeout(self.database.write_timeout, self.store.upsert(rows))
                    .await
                {
                    Ok(Ok(changed)) => break Attempt::Committed(changed),
                    Ok(Err(error)) => match error.failure() {
                        DbFailure::Transient => error.to_string(),
                        DbFailure::RowRejected => break Attempt::Refused(error.to_string()),
                        DbFailure::Fatal => break Attempt::Fatal(error.to_string()),
                    },
                    Err(_) => format!("no commit within {:?}", self.database.write_timeout),
                };
            self.metrics.db_errors.inc();
            self.gate.close();
            failed = true;
            if shutdown.is_triggered() {
                break Attempt::ShutDown;
            }
            let delay = delays.next().unwrap_or(self.database.retry_max_delay);
            tracing::warn!(rows = rows.len(), retry_in = ?delay, error, "failed to write a batch; fetching paused until it succeeds");
            let mut shutdown_wait = shutdown.clone();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown_wait.wait() => {}
            }
        };
        if failed {
            self.gate.open();
            tracing::info!(
                rows = rows.len(),
                "database answered again; fetching resumed"
            );
        }
        attempt
    }
}

/// One row per key (tenant, ticket, prompt version): PostgreSQL cannot update a row twice in one statement.
/// The newest `triaged_at` wins, as in the table; on a tie the first one stays, as in the table.
/// Every waiter is kept with its row: each result is durable once its row commits.
fn newest_per_key(batch: Vec<Pending>) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::with_capacity(batch.len());
    let mut positions: HashMap<(String, String, String), usize> =
        HashMap::with_capacity(batch.len());
    for pending in batch {
        let (tenant_id, ticket_id, prompt_version) = pending.triage.key();
        let key = (
            tenant_id.to_owned(),
            ticket_id.to_owned(),
            prompt_version.to_owned(),
        );
        match positions
            .get(&key)
            .and_then(|&position| rows.get_mut(position))
        {
            Some(row) => {
                row.waiters.push(pending.written_tx);
                if pending.triage.triaged_at > row.triage.triaged_at {
                    row.triage = pending.triage;
                }
            }
            None => {
                positions.insert(key, rows.len());
                rows.push(Row {
                    triage: pending.triage,
                    waiters: vec![pending.written_tx],
                });
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    fn pending(ticket: &str, version: &str, second: i64, category: &str) -> Pending {
        let (written_tx, _) = oneshot::channel();
        Pending {
            triage: NewTriage {
                ticket_id: ticket.into(),
                tenant_id: "acme".into(),
                prompt_version: version.into(),
                category: category.into(),
                priority: String::new(),
                suggested_reply: String::new(),
                confidence: 0.5,
                model: String::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.0,
                ticket_created_at: None,
                accepted_at: None,
                triaged_at: DateTime::from_timestamp(second, 0).unwrap(),
                source_partition: 0,
                source_offset: 0,
                provider_note: String::new(),
                subject: None,
                excerpt: None,
                trace_id: None,
                rate_limit_wait_ms: 0,
            },
            written_tx,
        }
    }

    #[test]
    fn two_tenants_sharing_a_ticket_id_are_two_rows() {
        let mut globex = pending("t-1", "v1", 20, "globex's");
        globex.triage.tenant_id = "globex".into();
        let rows = newest_per_key(vec![pending("t-1", "v1", 10, "acme's"), globex]);
        let tenants: Vec<_> = rows
            .iter()
            .map(|r| (r.triage.tenant_id.as_str(), r.triage.category.as_str()))
            .collect();
        assert_eq!(tenants, [("acme", "acme's"), ("globex", "globex's")]);
    }

    #[test]
    fn a_batch_keeps_the_newest_result_of_each_key_and_every_waiter() {
        let rows = newest_per_key(vec![
            pending("t-1", "v1", 10, "old"),
            pending("t-2", "v1", 10, "other"),
            pending("t-1", "v1", 20, "new"),
            pending("t-1", "v1", 15, "between"),
            pending("t-1", "v2", 5, "second version"),
            pending("t-1", "v1", 20, "tie"),
        ]);
        assert_eq!(rows.iter().map(|r| r.waiters.len()).sum::<usize>(), 6);
        let categories: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.triage.ticket_id.as_str(),
                    r.triage.prompt_version.as_str(),
                    r.triage.category.as_str(),
                )
            })
            .collect();
        assert_eq!(
            categories,
            [
                ("t-1", "v1", "new"),
                ("t-2", "v1", "other"),
                ("t-1", "v2", "second version")
            ]
        );
    }
}
