//! What the simulator has served, for tests that count calls (`GET /_sim/stats`).
//!
//! Counters are atomics; only the per-`Idempotency-Key` map takes a lock, for one map update.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use serde::Serialize;

use crate::faults::FaultKind;

const STATUS_SLOTS: usize = 600;

#[derive(Debug, Default, Clone, Copy)]
struct KeyCounts {
    requests: u64,
    paid: u64,
}

#[derive(Debug)]
pub struct Stats {
    requests_total: AtomicU64,
    by_status: Vec<AtomicU64>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    faults: [AtomicU64; FaultKind::ALL.len()],
    by_key: Mutex<HashMap<String, KeyCounts>>,
}

/// The JSON of `GET /_sim/stats`.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// Chat-completion requests received (whatever became of them).
    pub requests_total: u64,
    /// Responses sent, by HTTP status ("200", "429", ...); hangs and resets send none.
    pub by_status: BTreeMap<String, u64>,
    /// Tokens of answered (200) requests.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// How many requests carried each `Idempotency-Key`.
    pub requests_by_key: BTreeMap<String, u64>,
    /// How many of those were answered 200, i.e. paid for; more than 1 is a paid duplicate.
    pub paid_requests_by_key: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub faults_injected: BTreeMap<&'static str, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests_total: AtomicU64::new(0),
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            faults: Default::default(),
            by_key: Mutex::new(HashMap::new()),
        }
    }
}

impl Stats {
    pub fn request_received(&self, idempotency_key_opt: Option<&str>) {
        self.requests_total.fetch_add(1, Relaxed);
        if let Some(key) = idempotency_key_opt {
            self.lock_keys().entry(key.to_owned()).or_default().requests += 1;
        }
    }

    pub fn responded(&self, status: u16) {
        if let Some(slot) = self.by_status.get(status as usize) {
            slot.fetch_add(1, Relaxed);
        }
    }

    /// A 200 answer: its tokens and its idempotency key's paid count.
    pub fn paid(
        &self,
        idempotency_key_opt: Option<&str>,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) {
        self.prompt_tokens.fetch_add(prompt_tokens, Relaxed);
        self.completion_tokens.fetch_add(completion_tokens, Relaxed);
        if let Some(key) = idempotency_key_opt {
            self.lock_keys().entry(key.to_owned()).or_default().paid += 1;
        }
    }

    pub fn fault_injected(&self, fault: FaultKind) {
        self.faults[fault.index()].fetch_add(1, Relaxed);
    }

    pub fn reset(&self) {
        self.requests_total.store(0, Relaxed);
        self.by_status
            .iter()
            .for_each(|slot| slot.store(0, Relaxed));
        self.prompt_tokens.store(0, Relaxed);
        self.completion_tokens.store(0, Relaxed);
        self.faults.iter().for_each(|slot| slot.store(0, Relaxed));
        self.lock_keys().clear();
    }

    pub fn report(&self) -> StatsReport {
        let by_status = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(status, slot)| {
                let count = slot.load(Relaxed);
                (count > 0).then(|| (status.to_string(), count))
            })
            .collect();
        let keys = self.lock_keys().clone();
        StatsReport {
            requests_total: self.requests_total.load(Relaxed),
            by_status,
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            requests_by_key: keys
                .iter()
                .map(|(key, counts)| (key.clone(), counts.requests))
                .collect(),
            paid_requests_by_key: keys
                .iter()
                .filter(|(_, counts)| counts.paid > 0)
                .map(|(key, counts)| (key.clone(), counts.paid))
                .collect(),
            faults_injected: FaultKind::ALL
                .iter()
                .map(|fault| (fault.as_str(), self.faults[fault.index()].load(Relaxed)))
                .filter(|(_, count)| *count > 0)
                .collect(),
        }
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyCounts>> {
        self.by_key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Inferences paid more than once, from a `GET /_sim/stats` answer: for every idempotency key
/// answered 200 n times, n - 1.
pub fn paid_duplicates(stats: &serde_json::Value) -> u64 {
    stats["paid_requests_by_key"]
        .as_object()
        .map(|keys| {
            keys.values()
                .filter_map(serde_json::Value::as_u64)
                .map(|paid| paid.saturating_sub(1))
                .sum()
        })
        .unwrap_or(0)
}
