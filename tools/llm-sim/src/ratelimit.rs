//! Per-API-key rate limits: a requests bucket and a tokens bucket per key, refilled continuously.
//!
//! Each bucket holds at most `limit × burst_ms / 60 000` units and refills at `limit / 60 s`.
//! A request is admitted only when both buckets can pay for it, and then both are charged in the
//! same critical section, so over any window of length T a key gets at most
//! `capacity + rate × T` requests (and tokens): the limit holds exactly, not approximately.
//! The values reported in the `x-ratelimit-*` headers come from the same state.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use tokio::time::{Duration, Instant};

use crate::config::RateLimitConfig;

/// Which limit refused a request; the names are OpenAI's error `type`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Requests => "requests",
            Dimension::Tokens => "tokens",
        }
    }
}

/// What the `x-ratelimit-*` headers report for a key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub limit_requests: u64,
    pub limit_tokens: u64,
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
    /// Time until the requests bucket is full again.
    pub reset_requests: Duration,
    /// Time until the tokens bucket is full again.
    pub reset_tokens: Duration,
}

/// A refusal, with what OpenAI's 429 message reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refusal {
    pub dimension: Dimension,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    /// Time until the request could be admitted; `None` when it never can (larger than the
    /// bucket).
    pub retry_after: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: f64,
    updated: Instant,
}

/// A bucket's shape for one limit.
#[derive(Clone, Copy, Debug)]
struct Shape {
    limit: u64,
    capacity: f64,
    per_second: f64,
}

impl Shape {
    fn new(limit: u64, burst_ms: u64) -> Self {
        let capacity = (limit as f64 * burst_ms as f64 / 60_000.0).max(1.0);
        Shape {
            limit,
            capacity,
            per_second: limit as f64 / 60.0,
        }
    }

    fn time_for(&self, units: f64) -> Duration {
        Duration::from_secs_f64((units / self.per_second).max(0.0))
    }
}

impl Bucket {
    fn full(shape: &Shape, now: Instant) -> Self {
        Bucket {
            level: shape.capacity,
            updated: now,
        }
    }

    fn refill(&mut self, shape: &Shape, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * shape.per_second).min(shape.capacity);
        self.updated = now.max(self.updated);
    }

    fn remaining(&self) -> u64 {
        self.level.floor().max(0.0) as u64
    }

    fn reset(&self, shape: &Shape) -> Duration {
        shape.time_for(shape.capacity - self.level)
    }

    fn refusal(&self, shape: &Shape, dimension: Dimension, requested: u64) -> Refusal {
        let retry_after = (requested as f64 <= shape.capacity)
            .then(|| shape.time_for(requested as f64 - self.level));
        Refusal {
            dimension,
            limit: shape.limit,
            used: shape.limit.saturating_sub(self.remaining()),
            requested,
            retry_after,
        }
    }
}

#[derive(Debug)]
struct KeyBuckets {
    requests: Bucket,
    tokens: Bucket,
}

/// All keys' buckets. The map lock is held only to find or insert a key; each key's buckets
/// have their own lock, held for a few arithmetic operations and never across an await.
#[derive(Debug, Default)]
pub struct RateLimiter {
    keys: RwLock<HashMap<Arc<str>, Arc<Mutex<KeyBuckets>>>>,
}

impl RateLimiter {
    /// Charges one request and `tokens` tokens to `key` if both buckets allow it.
    pub fn admit(
        &self,
        key: &str,
        tokens: u64,
        limits: &RateLimitConfig,
        now: Instant,
    ) -> Result<Snapshot, (Refusal, Snapshot)> {
        let (requests_shape, tokens_shape) = shapes(limits);
        let buckets = self.buckets(key, &requests_shape, &tokens_shape, now);
        let mut buckets = buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        buckets.requests.refill(&requests_shape, now);
        buckets.tokens.refill(&tokens_shape, now);
        let refusal = if buckets.requests.level < 1.0 {
            Some(
                buckets
                    .requests
                    .refusal(&requests_shape, Dimension::Requests, 1),
            )
        } else if buckets.tokens.level < tokens as f64 {
            Some(
                buckets
                    .tokens
                    .refusal(&tokens_shape, Dimension::Tokens, tokens),
            )
        } else {
            buckets.requests.level -= 1.0;
            buckets.tokens.level -= tokens as f64;
            None
        };
        let snapshot = snapshot(&buckets, &requests_shape, &tokens_shape);
        match refusal {
            None => Ok(snapshot),
            Some(refusal) => Err((refusal, snapshot)),
        }
    }

    /// The key's state without charging anything (for responses that cost nothing).
    pub fn peek(&self, key: &str, limits: &RateLimitConfig, now: Instant) -> Snapshot {
        let (requests_shape, tokens_shape) = shapes(limits);
        let existing = self.read_map().get(key).cloned();
        match existing {
            None => snapshot(
                &KeyBuckets {
                    requests: Bucket::full(&requests_shape, now),
                    tokens: Bucket::full(&tokens_shape, now),
                },
                &requests_shape,
                &tokens_shape,
            ),
            Some(buckets) => {
                let mut buckets = buckets
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                buckets.requests.refill(&requests_shape, now);
                buckets.tokens.refill(&tokens_shape, now);
                snapshot(&buckets, &requests_shape, &tokens_shape)
            }
        }
    }

    /// Forgets every key: all buckets start full again.
    pub fn clear(&self) {
        self.keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    fn read_map(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Mutex<KeyBuckets>>>> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn buckets(
        &self,
        key: &str,
        requests_shape: &Shape,
        tokens_shape: &Shape,
        now: Instant,
    ) -> Arc<Mutex<KeyBuckets>> {
        if let Some(buckets) = self.read_map().get(key) {
            return buckets.clone();
        }
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        keys.entry(Arc::from(key))
            .or_insert_with(|| {
                Arc::new(Mutex::new(KeyBuckets {
                    requests: Bucket::full(requests_shape, now),
                    tokens: Bucket::full(tokens_shape, now),
                }))
            })
            .clone()
    }
}

fn shapes(limits: &RateLimitConfig) -> (Shape, Shape) {
    (
        Shape::new(limits.rpm, limits.burst_ms),
        Shape::new(limits.tpm, limits.burst_ms),
    )
}

fn snapshot(buckets: &KeyBuckets, requests_shape: &Shape, tokens_shape: &Shape) -> Snapshot {
    Snapshot {
        limit_requests: requests_shape.limit,
        limit_tokens: tokens_shape.limit,
        remaining_requests: buckets.requests.remaining(),
        remaining_tokens: buckets.tokens.remaining(),
        reset_requests: buckets.requests.reset(requests_shape),
        reset_tokens: buckets.tokens.reset(tokens_shape),
    }
}

/// Formats a duration as OpenAI's headers and messages do (Go's `time.Duration` form) at
/// millisecond precision, rounding up so a non-zero wait never reads as zero:
/// `0s`, `120ms`, `1s`, `1.2s`, `1m30s`, `6m0s`, `4h36m54.72s`.
pub fn format_duration(duration: Duration) -> String {
    let total_ms = duration.as_nanos().div_ceil(1_000_000) as u64;
    if total_ms == 0 {
        return "0s".to_owned();
    }
    if total_ms < 1000 {
        return format!("{total_ms}ms");
    }
    let hours = total_ms / 3_600_000;
    let minutes = total_ms / 60_000 % 60;
    let seconds = total_ms / 1000 % 60;
    let millis = total_ms % 1000;
    let mut text = String::new();
    if hours > 0 {
        text.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        text.push_str(&format!("{minutes}m"));
    }
    text.push_str(&seconds.to_string());
    if millis > 0 {
        let fraction = format!("{millis:03}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('s');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: u64, tpm: u64, burst_ms: u64) -> RateLimitConfig {
        RateLimitConfig { rpm, tpm, burst_ms }
    }

    #[test]
    fn durations_read_like_openai_headers() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(10), "1ms"),
            (Duration::from_millis(120), "120ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1200), "1.2s"),
            (Duration::from_millis(7560), "7.56s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(16_614_720), "4h36m54.72s"),
        ];
        for (duration, expected) in cases {
            assert_eq!(format_duration(duration), expected, "{duration:?}");
        }
    }

    #[test]
    fn burst_then_steady_rate() {
        let limiter = RateLimiter::default();
        let config = limits(600, 1_000_000, 1000); // 10/s, bucket of 10
        let start = Instant::now();
        let admitted_at_start = (0..50)
            .filter(|_| limiter.admit("k", 1, &config, start).is_ok())
            .count();
        assert_eq!(admitted_at_start, 10);
        // Ten seconds later, at 1 ms steps: 100 more, never more.
        let mut admitted = 0;
        for step in 1..=10_000u64 {
            let now = start + Duration::from_millis(step);
            if limiter.admit("k", 1, &config, now).is_ok() {
                admitted += 1;
            }
        }
        // Floating-point refill may land the 100th a millisecond after the window.
        assert!((99..=100).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn refusal_reports_what_openai_reports() {
        let limiter = RateLimiter::default();
        let config = limits(60, 1000, 60_000);
        let now = Instant::now();
        for _ in 0..60 {
            limiter.admit("k", 1, &config, now).unwrap();
        }
        let (refusal, snapshot) = limiter.admit("k", 1, &config, now).unwrap_err();
        assert_eq!(refusal.dimension, Dimension::Requests);
        assert_eq!(
            (refusal.limit, refusal.used, refusal.requested),
            (60, 60, 1)
        );
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(snapshot.remaining_requests, 0);
        assert_eq!(snapshot.reset_requests, Duration::from_secs(60));
        // Another key has its own buckets.
        assert!(limiter.admit("other", 1, &config, now).is_ok());
    }

    #[test]
    fn tokens_refuse_without_charging_requests() {
        let limiter = RateLimiter::default();
        let config = limits(100, 1000, 60_000);
        let now = Instant::now();
        limiter.admit("k", 900, &config, now).unwrap();
        let (refusal, snapshot) = limiter.admit("k", 200, &config, now).unwrap_err();
        assert_eq!(refusal.dimension, Dimension::Tokens);
        assert_eq!((refusal.used, refusal.requested), (900, 200));
        // 100 tokens short at 1000/60 s per second: 6 s.
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(6)));
        assert_eq!(snapshot.remaining_requests, 99);
        assert_eq!(snapshot.remaining_tokens, 100);
        let too_large = limiter.admit("k", 5000, &config, now).unwrap_err().0;
        assert_eq!(too_large.retry_after, None);
    }

    #[test]
    fn peek_does_not_charge() {
        let limiter = RateLimiter::default();
        let config = limits(100, 1000, 60_000);
        let now = Instant::now();
        assert_eq!(limiter.peek("k", &config, now).remaining_requests, 100);
        limiter.admit("k", 10, &config, now).unwrap();
        let snapshot = limiter.peek("k", &config, now);
        assert_eq!(
            (snapshot.remaining_requests, snapshot.remaining_tokens),
            (99, 990)
        );
        limiter.clear();
        assert_eq!(limiter.peek("k", &config, now).remaining_tokens, 1000);
    }
}
