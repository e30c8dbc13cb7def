//! Everything the worker keeps in Redis: the result cache, in-flight leases, and the shared
//! rate-limit buckets. Shared by every replica, so that they behave as one client.

use std::{sync::LazyLock, time::Duration};

use redis::{Script, aio::ConnectionManager};
use triage_runtime::{config::Secret, tls::TlsConfig};

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    /// The URL or the TLS settings cannot be used.
    #[error("cannot build the Redis client: {0}")]
    Client(#[source] triage_runtime::tls::RedisClientError),
    /// Redis' certificate was refused (or ours was): no retry helps until an operator acts.
    #[error("redis refused the TLS handshake: {0}")]
    CertificateRefused(#[source] redis::RedisError),
}

impl From<triage_runtime::tls::RedisClientError> for StoreError {
    fn from(error: triage_runtime::tls::RedisClientError) -> Self {
        StoreError::Client(error)
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(error: redis::RedisError) -> Self {
        // RedisError's Display has no credentials: the URL is never part of it.
        StoreError::Unavailable(error.to_string())
    }
}

/// A reconnecting connection with bounded timeouts, so that a Redis outage is an error after a
/// second, not a hang.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
}

/// The scripts are hashed once: `EVALSHA` sends 40 bytes instead of the script, and hashing
/// per call showed up in the worker's profile.
static RELEASE_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

static RENEW_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0",
    )
});

/// Cache read, lease and (when KEYS[3] is given) the call's rate-limit budget in one round
/// trip: the cached result if there is one, else whether the lease (KEYS[2]) was taken and, with
/// it, what the budget said (-1 not asked, 0 taken, else milliseconds to wait; nothing is taken
/// then). Atomic, so no result can appear between the read and the lease; budget is only taken
/// for a call that will happen, never for a cache hit.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{BUDGET_FN}
local cached = redis.call('GET', KEYS[1])
if cached then return {{1, cached}} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {{0, false}} end
if KEYS[3] then return {{2, take_budget(KEYS[3], 2)}} end
return {{2, -1}}"
    ))
});

/// Stores the result (KEYS[1]) and releases our lease (KEYS[2]) in one round trip.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1",
    )
});

/// What [`RedisStore::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// A result is cached for the key: reuse it.
    Cached(Vec<u8>),
    /// Nobody had the key; the lease is ours. `budget_taken`: the call's rate-limit budget was
    /// taken with it (only when asked for and available).
    Leased { budget_taken: bool },
    /// Another worker holds the lease.
    HeldElsewhere,
}

/// Two token buckets (requests, tokens) refilled continuously, plus a shared `blocked_until` set
/// from 429s and exhausted-budget headers. Time is Redis' own clock, so replicas with skewed
/// clocks still share one budget. `take_budget(key, a)` reads its seven arguments from
/// ARGV[a+1..a+7] and returns 0 when both budgets were taken, else how many milliseconds to
/// wait before asking again. The seventh is the share of each bucket's capacity the caller must
/// leave in it (a tenant over its share leaves a reserve for the others; see
/// [`crate::fairness`]).
const BUDGET_FN: &str = r"
local function take_budget(key, a)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local blocked = tonumber(redis.call('HGET', key, 'blocked_until') or '0')
  if blocked > now then return blocked - now end
  local function level(field, rate, capacity)
    local value = tonumber(redis.call('HGET', key, field) or tostring(capacity))
    local last = tonumber(redis.call('HGET', key, field .. '_at') or tostring(now))
    return math.min(capacity, value + math.max(0, now - last) * rate)
  end
  local req_rate, req_cap, req_cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tok_rate, tok_cap, tok_cost = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local reserve = tonumber(ARGV[a + 7])
  local wait = 0
  local req = 0
  local tok = 0
  if req_rate > 0 then
    req = level('req', req_rate, req_cap)
    local need = math.min(math.min(req_cost, req_cap) + reserve * req_cap, req_cap)
    if req < need then wait = math.max(wait, math.ceil((need - req) / req_rate)) end
  end
  if tok_rate > 0 then
    tok = level('tok', tok_rate, tok_cap)
    local need = math.min(math.min(tok_cost, tok_cap) + reserve * tok_cap, tok_cap)
    if tok < need then wait = math.max(wait, math.ceil((need - tok) / tok_rate)) end
  end
  if wait > 0 then return wait end
  if req_rate > 0 then redis.call('HSET', key, 'req', req - req_cost, 'req_at', now) end
  if tok_rate > 0 then redis.call('HSET', key, 'tok', tok - tok_cost, 'tok_at', now) end
  redis.call('PEXPIRE', key, 600000)
  return 0
end";

static TAKE_BUDGET: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{BUDGET_FN}\nreturn take_budget(KEYS[1], 0)")));

/// Moves `blocked_until` to now + ARGV[1] ms unless it is already later.
static BLOCK_BUDGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked_until') or '0')
if until_ms > blocked then redis.call('HSET', KEYS[1], 'blocked_until', until_ms) end
redis.call('PEXPIRE', KEYS[1], 600000)
return 0",
    )
});

/// The two budgets of one call, as rates per millisecond and bucket capacities.
#[derive(Clone, Copy, Debug)]
pub struct BudgetRequest {
    pub requests_per_ms: f64,
    pub request_capacity: f64,
    pub tokens_per_ms: f64,
    pub token_capacity: f64,
    pub tokens: u64,
    /// Share of each bucket's capacity to leave in it (0: take it down to empty).
    pub reserve: f64,
}

impl BudgetRequest {
    /// One call of `tokens` against limits per minute (0: none), with a bucket of `burst`.
    pub fn per_minute(
        requests_per_minute: f64,
        tokens_per_minute: f64,
        burst: Duration,
        tokens: u64,
        reserve: f64,
    ) -> Self {
        let burst_ms = burst.as_secs_f64() * 1000.0;
        let requests_per_ms = requests_per_minute / 60_000.0;
        let tokens_per_ms = tokens_per_minute / 60_000.0;
        BudgetRequest {
            requests_per_ms,
            request_capacity: (requests_per_ms * burst_ms).max(1.0),
            tokens_per_ms,
            token_capacity: (tokens_per_ms * burst_ms).max(tokens as f64),
            tokens,
            reserve,
        }
    }

    /// The seven arguments `take_budget` reads, in its order.
    fn add_args(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .arg(self.requests_per_ms)
            .arg(self.request_capacity)
            .arg(1)
            .arg(self.tokens_per_ms)
            .arg(self.token_capacity)
            .arg(self.tokens)
            .arg(self.reserve);
    }
}

impl RedisStore {
    pub async fn connect(url: &Secret, tls: &TlsConfig, prefix: &str) -> Result<Self, StoreError> {
        let client = triage_runtime::tls::redis_client(url, tls)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|error| {
                if triage_runtime::tls::is_certificate_rejection(&error) {
                    StoreError::CertificateRefused(error)
                } else {
                    StoreError::from(error)
                }
            })?;
        Ok(RedisStore {
            connection,
            prefix: prefix.to_owned(),
        })
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok(())
    }

    /// Reads the cached result for a key or, when there is none, takes its in-flight lease if
    /// nobody holds it, and with the lease the call's budget from `budget` = (bucket, request)
    /// if that is available now.
    pub async fn claim(
        &self,
        idempotency_key: &str,
        owner: &str,
        lease_ttl: Duration,
        budget: Option<(&str, BudgetRequest)>,
    ) -> Result<Claim, StoreError> {
        let mut connection = self.connection.clone();
        let mut invocation = CLAIM.key(self.key("result", idempotency_key));
        invocation
            .key(self.key("lease", idempotency_key))
            .arg(owner)
            .arg(lease_ttl.as_millis() as u64);
        if let Some((bucket, request)) = budget {
            invocation.key(self.key("ratelimit", bucket));
            request.add_args(&mut invocation);
        }
        let (found, payload): (i64, redis::Value) =
            invocation.invoke_async(&mut connection).await?;
        Ok(match (found, payload) {
            (1, redis::Value::BulkString(bytes)) => Claim::Cached(bytes),
            (2, budget_wait) => Claim::Leased {
                budget_taken: budget_wait == redis::Value::Int(0),
            },
            _ => Claim::HeldElsewhere,
        })
    }

    /// Caches a result and releases our lease on its key.
    pub async fn finish(
        &self,
        idempotency_key: &str,
        owner: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = FINISH
            .key(self.key("result", idempotency_key))
            .key(self.key("lease", idempotency_key))
            .arg(bytes)
            .arg(ttl.as_millis() as u64)
            .arg(owner)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    /// Extends our lease; false when it expired and someone else may hold it now.
    pub async fn renew_lease(
        &self,
        idempotency_key: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let renewed: i64 = RENEW_LEASE
            .key(self.key("lease", idempotency_key))
            .arg(owner)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut connection)
            .await?;
        Ok(renewed == 1)
    }

    pub async fn release_lease(
        &self,
        idempotency_key: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = RELEASE_LEASE
            .key(self.key("lease", idempotency_key))
            .arg(owner)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    /// Takes one request and `tokens` tokens from the shared budget of `bucket`; `Ok(None)`
    /// when taken, else how long to wait.
    pub async fn take_budget(
        &self,
        bucket: &str,
        request: BudgetRequest,
    ) -> Result<Option<Duration>, StoreError> {
        self.take_from(self.key("ratelimit", bucket), request).await
    }

    /// Takes one request and `tokens` tokens from `tenant`'s own quota, shared by every replica;
    /// `Ok(None)` when taken, else how long to wait. Kept apart from the provider buckets
    /// (`quota:` keys), so no tenant id can name a model's bucket.
    pub async fn take_quota(
        &self,
        tenant: &str,
        request: BudgetRequest,
    ) -> Result<Option<Duration>, StoreError> {
        self.take_from(self.key("quota", tenant), request).await
    }

    async fn take_from(
        &self,
        key: String,
        request: BudgetRequest,
    ) -> Result<Option<Duration>, StoreError> {
        let mut connection = self.connection.clone();
        let mut invocation = TAKE_BUDGET.key(key);
        request.add_args(&mut invocation);
        let wait_ms: i64 = invocation.invoke_async(&mut connection).await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms as u64)))
    }

    /// Stops every replica from calling for `duration` (a 429's Retry-After, an exhausted budget).
    pub async fn block_budget(&self, bucket: &str, duration: Duration) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = BLOCK_BUDGET
            .key(self.key("ratelimit", bucket))
            .arg(duration.as_millis() as u64)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }
}
