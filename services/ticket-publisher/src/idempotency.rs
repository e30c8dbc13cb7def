//! The `Idempotency-Key` store in Redis.
//!
//! A request with a key first claims it with `SET NX` of an in-progress marker (so a concurrent
//! duplicate cannot write a second record), then replaces the marker with its answer, kept for
//! the configured TTL. A retry finds the answer and gets it back without touching Kafka. A claim
//! whose request failed retryably (503) is released, so the retry may try again. The claim
//! expires on its own if the process dies between claim and answer.
//!
//! Each stored value carries a fingerprint of the request, so a key reused for a different
//! request is refused rather than answered with someone else's ticket.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::config::RedisConfig;

/// How long an in-progress claim lives: longer than any request may take.
const CLAIM_TTL: Duration = Duration::from_secs(60);
/// Longest key a caller may send (it becomes part of a Redis key).
pub const MAX_KEY_CHARS: usize = 255;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored answer is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// The first answer to a key: HTTP status and JSON body, plus the request's fingerprint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredAnswer {
    pub fingerprint: String,
    pub status: u16,
    pub body: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Entry {
    InProgress { fingerprint: String },
    Done(StoredAnswer),
}

/// What claiming a key found.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// The key is ours; answer, then [`IdempotencyStore::complete`] or
    /// [`IdempotencyStore::release`].
    Claimed,
    /// Another request with this key is still running.
    InProgress,
    /// The key was answered before; here is that answer.
    Answered(StoredAnswer),
    /// The key was used for a different request.
    Mismatch,
}

/// A lazily connected, self-reconnecting Redis handle. The ingress starts and serves requests
/// without an `Idempotency-Key` while Redis is down.
#[derive(Clone)]
pub struct IdempotencyStore {
    client: redis::Client,
    connection: Arc<Mutex<Option<ConnectionManager>>>,
    prefix: String,
    rate_prefix: String,
    timeout: Duration,
    ttl: Duration,
}

/// One tenant's ingress token bucket: ARGV rate per ms, capacity, cost. 0: taken; -1: the cost
/// exceeds the capacity; else milliseconds until it fits. Nothing is taken unless it fits.
static TAKE_RATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, cap, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if cost > cap then return -1 end
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or tostring(cap))
local last = tonumber(redis.call('HGET', KEYS[1], 'at') or tostring(now))
level = math.min(cap, level + math.max(0, now - last) * rate)
if level < cost then return math.ceil((cost - level) / rate) end
redis.call('HSET', KEYS[1], 'level', level - cost, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate) + 1000)
return 0",
    )
});

impl IdempotencyStore {
    pub fn new(
        config: &RedisConfig,
        ttl: Duration,
    ) -> Result<Self, triage_runtime::tls::RedisClientError> {
        Ok(IdempotencyStore {
            client: triage_runtime::tls::redis_client(&config.url, &config.tls)?,
            connection: Arc::new(Mutex::new(None)),
            prefix: format!("{}idem:", config.key_prefix),
            rate_prefix: format!("{}ratelimit:", config.key_prefix),
            timeout: config.timeout,
            ttl,
        })
    }

    /// Connects once at start, so that a certificate Redis refuses (or that refuses ours) stops
    /// the service with exit code 78 instead of turning every idempotent request into a 503
    /// until an operator notices. Any other failure (Redis down, or not answering within 5 s)
    /// is left to the lazy connection: the ingress serves requests without an
    /// `Idempotency-Key` meanwhile. A plain connection, not the reconnecting manager, whose
    /// retries would outlast the wait and hide the handshake's error behind a timeout.
    pub async fn check_certificate(&self) -> Result<(), redis::RedisError> {
        let attempt = self.client.get_multiplexed_async_connection();
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Err(error)) if triage_runtime::tls::is_certificate_rejection(&error) => Err(error),
            _ => Ok(()),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        let connection = tokio::time::timeout(
            self.timeout * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.timeout))??;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn run<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection().await?;
        tokio::time::timeout(self.timeout, command.query_async(&mut connection))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(StoreError::from)
    }

    /// Takes `cost` tickets from `tenant`'s ingress budget, shared by every replica (a token
    /// bucket refilled at `per_second` up to `burst`, on Redis' clock). `Ok(None)` when taken,
    /// else how long to wait; `Duration::MAX` when `cost` exceeds the burst and never fits.
    pub async fn take_rate(
        &self,
        tenant: &str,
        per_second: u32,
        burst: u32,
        cost: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let mut connection = self.connection().await?;
        let mut invocation = TAKE_RATE.key(format!("{}{tenant}", self.rate_prefix));
        invocation
            .arg(f64::from(per_second) / 1000.0)
            .arg(burst)
            .arg(cost);
        let wait_ms: i64 =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))??;
        Ok(match wait_ms {
            0 => None,
            ms if ms < 0 => Some(Duration::MAX),
            ms => Some(Duration::from_millis(ms.unsigned_abs())),
        })
    }

    fn redis_key(&self, tenant: &str, key: &str) -> String {
        format!("{}{tenant}:{key}", self.prefix)
    }

    /// Claims `key` for `tenant`'s request with `fingerprint`.
    pub async fn claim(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Claim, StoreError> {
        let redis_key = self.redis_key(tenant, key);
        let marker = serde_json::to_string(&Entry::InProgress {
            fingerprint: fingerprint.to_owned(),
        })?;
        let mut set = redis::cmd("SET");
        set.arg(&redis_key)
            .arg(marker)
            .arg("NX")
            .arg("PX")
            .arg(CLAIM_TTL.as_millis() as u64);
        let claimed: Option<String> = self.run(set).await?;
        if claimed.is_some() {
            return Ok(Claim::Claimed);
        }
        let mut get = redis::cmd("GET");
        get.arg(&redis_key);
        let existing: Option<String> = self.run(get).await?;
        let Some(existing) = existing else {
            // Expired between SET and GET: nobody holds it now, so this request may have it.
            return Box::pin(self.claim(tenant, key, fingerprint)).await;
        };
        match serde_json::from_str::<Entry>(&existing)? {
            Entry::InProgress { fingerprint: other } if other == fingerprint => {
                Ok(Claim::InProgress)
            }
            Entry::Done(answer) if answer.fingerprint == fingerprint => Ok(Claim::Answered(answer)),
            _ => Ok(Claim::Mismatch),
        }
    }

    /// Replaces the claim with the answer, kept for the TTL.
    pub async fn complete(
        &self,
        tenant: &str,
        key: &str,
        answer: StoredAnswer,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_string(&Entry::Done(answer))?;
        let mut set = redis::cmd("SET");
        set.arg(self.redis_key(tenant, key))
            .arg(value)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64);
        self.run::<()>(set).await
    }

    /// Drops the claim after a failure the caller may retry.
    pub async fn release(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        let mut del = redis::cmd("DEL");
        del.arg(self.redis_key(tenant, key));
        self.run::<()>(del).await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run::<String>(redis::cmd("PING")).await.map(|_| ())
    }
}

/// The fingerprint of a request: SHA-256 of what identifies it.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Whether Redis answers, for `/healthz?verbose` and `triage_dependency_up`. Not for `/readyz`:
/// Redis is shared by every replica, so failing readiness on it would take them all out of the
/// Service at once. The ingress serves requests without a key meanwhile and answers those with
/// one 503 + `Retry-After` itself.
pub struct RedisHealth(pub IdempotencyStore);

impl triage_runtime::admin_http::DependencyCheck for RedisHealth {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn check(&self) -> triage_runtime::admin_http::CheckFuture<'_> {
        Box::pin(async move { self.0.ping().await.map_err(|e| e.to_string()) })
    }
}
