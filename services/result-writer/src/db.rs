//! PostgreSQL: the connection pool, the embedded migrations, the batched idempotent upsert and the
//! read queries.
//!
//! # Idempotency
//! The table's key is (tenant_id, ticket_id, prompt_version): ticket ids are the helpdesk's, so
//! two tenants may share one. A batch is one `INSERT ... SELECT FROM UNNEST`
//! with `ON CONFLICT DO UPDATE ... WHERE EXCLUDED.triaged_at > triage_results.triaged_at`: a
//! replayed result changes nothing, a newer one replaces the row, an older one never does.
//! `RETURNING` names exactly the rows that changed, which are the ones announced on the live
//! stream and to webhooks.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Row, types::ToSql};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    config::{DatabaseConfig, is_plain_identifier},
    throughput,
    triage::{NewTriage, Triage},
};

/// The schema's migrations, in order. Each runs once per schema, all in one transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "triage_results",
        include_str!("../migrations/0001_triage_results.sql"),
    ),
    (
        2,
        "tenant_in_primary_key",
        include_str!("../migrations/0002_tenant_in_primary_key.sql"),
    ),
    (
        3,
        "triage_feedback",
        include_str!("../migrations/0003_triage_feedback.sql"),
    ),
    (
        4,
        "ticket_text_and_trace",
        include_str!("../migrations/0004_ticket_text_and_trace.sql"),
    ),
    (
        5,
        "rate_limit_wait",
        include_str!("../migrations/0005_rate_limit_wait.sql"),
    ),
];

/// Why a database operation failed; [`DbError::failure`] says what that means for the rows.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot build the PostgreSQL pool: {0}")]
    Build(String),
    #[error("cannot set up TLS for PostgreSQL: {0}")]
    Tls(#[from] triage_runtime::tls::TlsError),
    #[error("no PostgreSQL connection: {}", describe_pool(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("database.schema {0:?} is not a plain identifier")]
    Schema(String),
}

/// What a database failure means, decided here once for the writer and the read API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbFailure {
    /// Unreachable, restarting, overloaded, timed out, a serialization conflict: try again.
    Transient,
    /// PostgreSQL refused the data itself (SQLSTATE class 22 data exception, 23 integrity
    /// constraint, 54 program limit exceeded, e.g. an id too long for its index): the same rows
    /// will be refused forever, so the row that causes it is
    /// dead-lettered and the rest are written.
    RowRejected,
    /// Credentials, permissions, a missing database or schema: no row can be written until an
    /// operator acts, so the process exits.
    Fatal,
}

impl DbError {
    pub fn failure(&self) -> DbFailure {
        match self {
            DbError::Build(_) | DbError::Tls(_) | DbError::Schema(_) => DbFailure::Fatal,
            DbError::Pool(deadpool_postgres::PoolError::Backend(error)) | DbError::Query(error) => {
                classify(error)
            }
            DbError::Pool(_) => DbFailure::Transient,
        }
    }
}

fn classify(error: &tokio_postgres::Error) -> DbFailure {
    // A certificate refused either way fails again on every retry until an operator acts.
    if triage_runtime::tls::is_certificate_rejection(error) {
        return DbFailure::Fatal;
    }
    let Some(code) = error.code().map(tokio_postgres::error::SqlState::code) else {
        // No SQLSTATE: the connection broke or never opened.
        return DbFailure::Transient;
    };
    match (code.get(..2), code) {
        (Some("22" | "23" | "54"), _) => DbFailure::RowRejected,
        // invalid authorization, invalid catalog (database), invalid schema name.
        (Some("28" | "3D" | "3F"), _) => DbFailure::Fatal,
        // insufficient privilege; the table is gone.
        (_, "42501" | "42P01") => DbFailure::Fatal,
        _ => DbFailure::Transient,
    }
}

/// The server's own words (SQLSTATE, message, detail): tokio-postgres' `Display` says only
/// "db error", which tells an operator at 3 a.m. nothing.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            text
        }
        // tokio-postgres' own text hides the cause ("error performing TLS handshake"); the
        // cause is what says which certificate was refused or which host did not answer.
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

fn describe_pool(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(error) => describe(error),
        other => other.to_string(),
    }
}

/// A pool whose connections all use `config.schema` as their `search_path`.
pub fn connect(config: &DatabaseConfig) -> Result<Pool, DbError> {
    if !is_plain_identifier(&config.schema) {
        return Err(DbError::Schema(config.schema.clone()));
    }
    let mut pg_config: tokio_postgres::Config = config
        .url
        .expose()
        .parse()
        .map_err(|_| DbError::Build("database.url is not a valid PostgreSQL URL".into()))?;
    pg_config
        .options(format!("-c search_path={}", config.schema))
        .application_name(crate::SERVICE)
        .connect_timeout(config.connect_timeout);
    if let Some(path) = &config.password_file {
        let password = triage_runtime::tls::read_secret_file("database.password_file", path)?;
        pg_config.password(password.expose());
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = if config.tls.enabled {
        // rustls checks the chain and the host name: libpq's sslmode=verify-full.
        let tls = config.tls.rustls_client_config()?;
        pg_config.ssl_mode(tokio_postgres::config::SslMode::Require);
        Manager::from_config(pg_config, MakeRustlsConnect::new(tls), manager_config)
    } else {
        Manager::from_config(pg_config, NoTls, manager_config)
    };
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.connect_timeout))
        .create_timeout(Some(config.connect_timeout))
        .build()
        .map_err(|error| DbError::Build(error.to_string()))
}

/// Applies the migrations `schema` lacks, creating the schema if needed. Safe when several
/// replicas start at once: a transaction-scoped advisory lock per schema lets one migrate while
/// the others wait, then find nothing left to do. Returns how many migrations were applied.
pub async fn migrate(pool: &Pool, schema: &str) -> Result<usize, DbError> {
    if !is_plain_identifier(schema) {
        return Err(DbError::Schema(schema.to_owned()));
    }
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('result-writer migrations ' || $1::text))",
            &[&schema],
        )
        .await?;
    transaction
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             SET LOCAL search_path TO {schema};
             CREATE TABLE IF NOT EXISTS result_writer_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let applied: Vec<i32> = transaction
        .query("SELECT version FROM result_writer_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut count = 0;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        transaction.batch_execute(sql).await?;
        transaction
            .execute(
                "INSERT INTO result_writer_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
        tracing::info!(schema, version, name, "migration applied");
        count += 1;
    }
    transaction.commit().await?;
    Ok(count)
}

const UPSERT: &str = "
INSERT INTO triage_results (
    ticket_id, tenant_id, prompt_version, category, priority, suggested_reply, confidence, model,
    prompt_tokens, completion_tokens, cost_usd, ticket_created_at, accepted_at, triaged_at,
    source_partition, source_offset, provider_note, subject, excerpt, trace_id,
    rate_limit_wait_ms, written_at)
SELECT batch.*, now() FROM UNNEST(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::float8[],
    $8::text[], $9::int8[], $10::int8[], $11::float8[], $12::timestamptz[], $13::timestamptz[],
    $14::timestamptz[], $15::int4[], $16::int8[], $17::text[], $18::text[], $19::text[],
    $20::text[], $21::int4[]) AS batch
ON CONFLICT (tenant_id, ticket_id, prompt_version) DO UPDATE SET
    category = EXCLUDED.category,
    priority = EXCLUDED.priority,
    suggested_reply = EXCLUDED.suggested_reply,
    confidence = EXCLUDED.confidence,
    model = EXCLUDED.model,
    prompt_tokens = EXCLUDED.prompt_tokens,
    completion_tokens = EXCLUDED.completion_tokens,
    cost_usd = EXCLUDED.cost_usd,
    ticket_created_at = EXCLUDED.ticket_created_at,
    accepted_at = EXCLUDED.accepted_at,
    triaged_at = EXCLUDED.triaged_at,
    source_partition = EXCLUDED.source_partition,
    source_offset = EXCLUDED.source_offset,
    provider_note = EXCLUDED.provider_note,
    subject = EXCLUDED.subject,
    excerpt = EXCLUDED.excerpt,
    trace_id = EXCLUDED.trace_id,
    rate_limit_wait_ms = EXCLUDED.rate_limit_wait_ms,
    written_at = EXCLUDED.written_at
WHERE EXCLUDED.triaged_at > triage_results.triaged_at
RETURNING tenant_id, ticket_id, prompt_version, written_at";

const COLUMNS: &str = "ticket_id, tenant_id, prompt_version, category, priority, suggested_reply, \
    confidence, model, prompt_tokens, completion_tokens, cost_usd, ticket_created_at, \
    accepted_at, triaged_at, source_partition, source_offset, provider_note, subject, excerpt, \
    trace_id, rate_limit_wait_ms, written_at";

/// Where `GET /v1/triage` continues: the last row of the previous page, in keyset order.
#[derive(Clone, Debug, PartialEq)]
pub struct After {
    pub triaged_at: DateTime<Utc>,
    pub ticket_id: String,
    pub prompt_version: String,
}

/// The filters of `GET /v1/triage`, always within one tenant.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub category: Option<String>,
    pub priority: Option<String>,
    /// `triaged_at >= since`
    pub since: Option<DateTime<Utc>>,
    /// `triaged_at < until`
    pub until: Option<DateTime<Utc>>,
    /// `confidence < confidence_below`
    pub confidence_below: Option<f64>,
    pub after: Option<After>,
    pub limit: u32,
}

/// The table, behind a pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Store { pool }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Writes `rows` in one transaction. `rows` must hold each key at most once (PostgreSQL
    /// refuses to update one row twice in a statement). Returns, for each row that was inserted
    /// or replaced, its index in `rows` and its `written_at`.
    pub async fn upsert<R: std::borrow::Borrow<NewTriage>>(
        &self,
        rows: &[R],
    ) -> Result<Vec<(usize, DateTime<Utc>)>, DbError> {
        let mut client = self.pool.get().await?;
        let statement = client.prepare_cached(UPSERT).await?;
        let columns = Columns::of(rows);
        let transaction = client.transaction().await?;
        let changed = transaction.query(&statement, &columns.params()).await?;
        transaction.commit().await?;
        let index: HashMap<(&str, &str, &str), usize> = rows
            .iter()
            .enumerate()
            .map(|(position, row)| (row.borrow().key(), position))
            .collect();
        Ok(changed
            .iter()
            .filter_map(|row| {
                // A database answer is outside input: a row that does not read as expected is
                // skipped (it is committed; it only misses the live stream), never a panic.
                let tenant_id: &str = row.try_get(0).ok()?;
                let ticket_id: &str = row.try_get(1).ok()?;
                let prompt_version: &str = row.try_get(2).ok()?;
                let position = *index.get(&(tenant_id, ticket_id, prompt_version))?;
                Some((position, row.try_get::<_, DateTime<Utc>>(3).ok()?))
            })
            .collect())
    }

    /// The tenant's latest triage of `ticket_id` (of `prompt_version` when given). Another
    /// tenant's ticket is indistinguishable from a missing one.
    pub async fn ticket(
        &self,
        tenant_id: &str,
        ticket_id: &str,
        prompt_version: Option<&str>,
    ) -> Result<Option<Triage>, DbError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM triage_results
                 WHERE ticket_id = $1 AND tenant_id = $2 AND ($3::text IS NULL OR prompt_version = $3)
                 ORDER BY triaged_at DESC, prompt_version DESC LIMIT 1"
            ))
            .await?;
        let row = client
            .query_opt(&statement, &[&ticket_id, &tenant_id, &prompt_version])
            .await?;
        Ok(row.as_ref().map(triage_from_row))
    }

    /// One page of the tenant's triages, newest first; `filter.limit + 1` rows are asked for so
    /// that the caller knows whether another page follows.
    pub async fn list(&self, tenant_id: &str, filter: &ListFilter) -> Result<Vec<Triage>, DbError> {
        let mut conditions = vec!["tenant_id = $1".to_owned()];
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(tenant_id.to_owned())];
        let mut push = |condition: &str, param: Box<dyn ToSql + Sync + Send>| {
            params.push(param);
            conditions.push(condition.replace('#', &format!("${}", params.len())));
        };
        if let Some(category) = &filter.category {
            push("category = #", Box::new(category.clone()));
        }
        if let Some(priority) = &filter.priority {
            push("priority = #", Box::new(priority.clone()));
        }
        if let Some(since) = filter.since {
            push("triaged_at >= #", Box::new(since));
        }
        if let Some(until) = filter.until {
            push("triaged_at < #", Box::new(until));
        }
        if let Some(below) = filter.confidence_below {
            push("confidence < #", Box::new(below));
        }
        if let Some(after) = &filter.after {
            params.push(Box::new(after.triaged_at));
            params.push(Box::new(after.ticket_id.clone()));
            params.push(Box::new(after.prompt_version.clone()));
            let n = params.len();
            conditions.push(format!(
                "(triaged_at, ticket_id, prompt_version) < (${}, ${}, ${n})",
                n - 2,
                n - 1
            ));
        }
        params.push(Box::new(i64::from(filter.limit) + 1));
        let sql = format!(
            "SELECT {COLUMNS} FROM triage_results WHERE {}
             ORDER BY triaged_at DESC, ticket_id DESC, prompt_version DESC LIMIT ${}",
            conditions.join(" AND "),
            params.len()
        );
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&sql).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|param| param.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client.query(&statement, &refs).await?;
        Ok(rows.iter().map(triage_from_row).collect())
    }

    /// The tenant's rows written after `after` (by `written_at`, then key), oldest first, at most
    /// `limit`: what a live stream missed while its client was away (`Last-Event-ID`).
    pub async fn written_after(
        &self,
        tenant_id: &str,
        after: &After,
        limit: u32,
    ) -> Result<Vec<Triage>, DbError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM triage_results
                 WHERE tenant_id = $1 AND (written_at, ticket_id, prompt_version) > ($2, $3, $4)
                 ORDER BY written_at, ticket_id, prompt_version LIMIT $5"
            ))
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &tenant_id,
                    &after.triaged_at,
                    &after.ticket_id,
                    &after.prompt_version,
                    &i64::from(limit),
                ],
            )
            .await?;
        Ok(rows.iter().map(triage_from_row).collect())
    }

    /// Records an agent's correction of one of the tenant's triages, replacing an earlier one.
    /// `None` when the tenant has no such triage.
    pub async fn put_feedback(
        &self,
        tenant_id: &str,
        ticket_id: &str,
        correction: &Correction,
    ) -> Result<Option<Feedback>, DbError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO triage_feedback (tenant_id, ticket_id, prompt_version,
                     predicted_category, predicted_priority, category, priority, reply, corrected_at)
                 SELECT tenant_id, ticket_id, prompt_version, category, priority, $4, $5, $6, now()
                 FROM triage_results
                 WHERE tenant_id = $1 AND ticket_id = $2 AND prompt_version = $3
                 ON CONFLICT (tenant_id, ticket_id, prompt_version) DO UPDATE SET
                     predicted_category = EXCLUDED.predicted_category,
                     predicted_priority = EXCLUDED.predicted_priority,
                     category = EXCLUDED.category,
                     priority = EXCLUDED.priority,
                     reply = EXCLUDED.reply,
                     corrected_at = EXCLUDED.corrected_at
                 RETURNING ticket_id, prompt_version, predicted_category, predicted_priority,
                     category, priority, reply, corrected_at",
            )
            .await?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &tenant_id,
                    &ticket_id,
                    &correction.prompt_version,
                    &correction.category,
                    &correction.priority,
                    &correction.reply.as_str(),
                ],
            )
            .await?;
        Ok(row.as_ref().and_then(feedback_from_row))
    }

    /// The tenant's corrections of one ticket, newest first (one per prompt version).
    pub async fn feedback(
        &self,
        tenant_id: &str,
        ticket_id: &str,
    ) -> Result<Vec<Feedback>, DbError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT ticket_id, prompt_version, predicted_category, predicted_priority,
                     category, priority, reply, corrected_at
                 FROM triage_feedback WHERE tenant_id = $1 AND ticket_id = $2
                 ORDER BY corrected_at DESC",
            )
            .await?;
        let rows = client.query(&statement, &[&tenant_id, &ticket_id]).await?;
        Ok(rows.iter().filter_map(feedback_from_row).collect())
    }

    /// Counts of the tenant's corrections in `[since, until)`, per prompt version and
    /// (predicted, corrected) category, and how many kept the predicted priority.
    pub async fn agreement_cells(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<AgreementCell>, DbError> {
        let rows = self
            .tenant_span(
                "SELECT prompt_version, predicted_category, category, count(*),
                     count(*) FILTER (WHERE predicted_priority = priority)
                 FROM triage_feedback
                 WHERE tenant_id = $1 AND corrected_at >= $2 AND corrected_at < $3
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                tenant_id,
                since,
                until,
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                Some(AgreementCell {
                    prompt_version: row.try_get(0).ok()?,
                    predicted: row.try_get(1).ok()?,
                    corrected: row.try_get(2).ok()?,
                    count: row.try_get(3).ok()?,
                    priority_kept: row.try_get(4).ok()?,
                })
            })
            .collect())
    }

    /// The tenant's triages in `[since, until)` counted per minute of `triaged_at` and over the
    /// whole span (the row whose minute is `None`), in one pass over the tenant's rows of the
    /// span by `triage_results_by_tenant_time`. The p95 is `percentile_disc`: a wait that really
    /// happened, never one interpolated between two.
    pub async fn throughput(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<throughput::Counts>, DbError> {
        // date_bin from the epoch, unlike date_trunc, does not depend on the session's time zone.
        let rows = self
            .tenant_span(
                "SELECT date_bin('1 minute', triaged_at, TIMESTAMPTZ 'epoch') AS minute,
                     count(*),
                     count(*) FILTER (WHERE rate_limit_wait_ms > 0),
                     coalesce(sum(rate_limit_wait_ms), 0)::int8,
                     coalesce(percentile_disc(0.95) WITHIN GROUP (ORDER BY rate_limit_wait_ms), 0)::int8
                 FROM triage_results
                 WHERE tenant_id = $1 AND triaged_at >= $2 AND triaged_at < $3
                 GROUP BY GROUPING SETS ((1), ())
                 ORDER BY 1 NULLS LAST",
                tenant_id,
                since,
                until,
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                Some(throughput::Counts {
                    minute: row.try_get(0).ok()?,
                    triaged: row.try_get(1).ok()?,
                    waited: row.try_get(2).ok()?,
                    wait_ms_total: row.try_get(3).ok()?,
                    wait_ms_p95: row.try_get(4).ok()?,
                })
            })
            .collect())
    }

    /// The rows of `sql`, a statement over one tenant's rows in `[since, until)` with exactly
    /// those three parameters, in that order.
    async fn tenant_span(
        &self,
        sql: &str,
        tenant_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Row>, DbError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client
            .query(&statement, &[&tenant_id, &since, &until])
            .await?)
    }

    /// One round trip, for the dependency health check.
    pub async fn ping(&self, timeout: Duration) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        let query = client.simple_query("SELECT 1");
        match tokio::time::timeout(timeout, query).await {
            Ok(result) => result.map(|_| ()).map_err(DbError::from),
            Err(_) => Err(DbError::Build(format!("no answer within {timeout:?}"))),
        }
    }
}

/// What became of a suggested reply.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ReplyUse {
    /// Not said (yet).
    Unset,
    Used,
    Edited,
    Rejected,
}

impl ReplyUse {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyUse::Unset => "unset",
            ReplyUse::Used => "used",
            ReplyUse::Edited => "edited",
            ReplyUse::Rejected => "rejected",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "unset" => Some(ReplyUse::Unset),
            "used" => Some(ReplyUse::Used),
            "edited" => Some(ReplyUse::Edited),
            "rejected" => Some(ReplyUse::Rejected),
            _ => None,
        }
    }
}

/// An agent's correction, as submitted.
#[derive(Clone, Debug)]
pub struct Correction {
    pub prompt_version: String,
    pub category: String,
    pub priority: String,
    pub reply: ReplyUse,
}

/// A stored correction.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Feedback {
    pub ticket_id: String,
    pub prompt_version: String,
    /// The triage's category when it was corrected.
    pub predicted_category: String,
    pub predicted_priority: String,
    /// The category the agent settled on (the predicted one when accepted).
    pub category: String,
    pub priority: String,
    pub reply: ReplyUse,
    pub corrected_at: DateTime<Utc>,
}

impl Feedback {
    /// True when the agent kept both the category and the priority.
    pub fn agreed(&self) -> bool {
        self.category == self.predicted_category && self.priority == self.predicted_priority
    }
}

/// One cell of the agreement counts.
#[derive(Clone, Debug, PartialEq)]
pub struct AgreementCell {
    pub prompt_version: String,
    pub predicted: String,
    pub corrected: String,
    pub count: i64,
    /// Of `count`, how many kept the predicted priority.
    pub priority_kept: i64,
}

fn feedback_from_row(row: &Row) -> Option<Feedback> {
    Some(Feedback {
        ticket_id: row.try_get(0).ok()?,
        prompt_version: row.try_get(1).ok()?,
        predicted_category: row.try_get(2).ok()?,
        predicted_priority: row.try_get(3).ok()?,
        category: row.try_get(4).ok()?,
        priority: row.try_get(5).ok()?,
        reply: ReplyUse::parse(row.try_get(6).ok()?)?,
        corrected_at: row.try_get(7).ok()?,
    })
}

fn triage_from_row(row: &Row) -> Triage {
    Triage {
        ticket_id: row.get("ticket_id"),
        tenant_id: row.get("tenant_id"),
        prompt_version: row.get("prompt_version"),
        category: row.get("category"),
        priority: row.get("priority"),
        suggested_reply: row.get("suggested_reply"),
        confidence: row.get("confidence"),
        model: row.get("model"),
        prompt_tokens: row.get("prompt_tokens"),
        completion_tokens: row.get("completion_tokens"),
        cost_usd: row.get("cost_usd"),
        ticket_created_at: row.get("ticket_created_at"),
        accepted_at: row.get("accepted_at"),
        triaged_at: row.get("triaged_at"),
        source_partition: row.get("source_partition"),
        source_offset: row.get("source_offset"),
        provider_note: row.get("provider_note"),
        subject: row.get("subject"),
        excerpt: row.get("excerpt"),
        trace_id: row.get("trace_id"),
        rate_limit_wait_ms: row.get("rate_limit_wait_ms"),
        written_at: row.get("written_at"),
    }
}

/// A batch turned column-wise, one array per column, for `UNNEST`.
struct Columns<'a> {
    ticket_id: Vec<&'a str>,
    tenant_id: Vec<&'a str>,
    prompt_version: Vec<&'a str>,
    category: Vec<&'a str>,
    priority: Vec<&'a str>,
    suggested_reply: Vec<&'a str>,
    confidence: Vec<f64>,
    model: Vec<&'a str>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost_usd: Vec<f64>,
    ticket_created_at: Vec<Option<DateTime<Utc>>>,
    accepted_at: Vec<Option<DateTime<Utc>>>,
    triaged_at: Vec<DateTime<Utc>>,
    source_partition: Vec<i32>,
    source_offset: Vec<i64>,
    provider_note: Vec<&'a str>,
    subject: Vec<Option<&'a str>>,
    excerpt: Vec<Option<&'a str>>,
    trace_id: Vec<Option<&'a str>>,
    rate_limit_wait_ms: Vec<i32>,
}

impl<'a> Columns<'a> {
    fn of<R: std::borrow::Borrow<NewTriage>>(rows: &'a [R]) -> Self {
        let rows: Vec<&'a NewTriage> = rows.iter().map(R::borrow).collect();
        Columns {
            ticket_id: rows.iter().map(|r| r.ticket_id.as_str()).collect(),
            tenant_id: rows.iter().map(|r| r.tenant_id.as_str()).collect(),
            prompt_version: rows.iter().map(|r| r.prompt_version.as_str()).collect(),
            category: rows.iter().map(|r| r.category.as_str()).collect(),
            priority: rows.iter().map(|r| r.priority.as_str()).collect(),
            suggested_reply: rows.iter().map(|r| r.suggested_reply.as_str()).collect(),
            confidence: rows.iter().map(|r| r.confidence).collect(),
            model: rows.iter().map(|r| r.model.as_str()).collect(),
            prompt_tokens: rows.iter().map(|r| r.prompt_tokens).collect(),
            completion_tokens: rows.iter().map(|r| r.completion_tokens).collect(),
            cost_usd: rows.iter().map(|r| r.cost_usd).collect(),
            ticket_created_at: rows.iter().map(|r| r.ticket_created_at).collect(),
            accepted_at: rows.iter().map(|r| r.accepted_at).collect(),
            triaged_at: rows.iter().map(|r| r.triaged_at).collect(),
            source_partition: rows.iter().map(|r| r.source_partition).collect(),
            source_offset: rows.iter().map(|r| r.source_offset).collect(),
            provider_note: rows.iter().map(|r| r.provider_note.as_str()).collect(),
            subject: rows.iter().map(|r| r.subject.as_deref()).collect(),
            excerpt: rows.iter().map(|r| r.excerpt.as_deref()).collect(),
            trace_id: rows.iter().map(|r| r.trace_id.as_deref()).collect(),
            rate_limit_wait_ms: rows.iter().map(|r| r.rate_limit_wait_ms).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 21] {
        [
            &self.ticket_id,
            &self.tenant_id,
            &self.prompt_version,
            &self.category,
            &self.priority,
            &self.suggested_reply,
            &self.confidence,
            &self.model,
            &self.prompt_tokens,
            &self.completion_tokens,
            &self.cost_usd,
            &self.ticket_created_at,
            &self.accepted_at,
            &self.triaged_at,
            &self.source_partition,
            &self.source_offset,
            &self.provider_note,
            &self.subject,
            &self.excerpt,
            &self.trace_id,
            &self.rate_limit_wait_ms,
        ]
    }
}
