//! Fairness between tenants inside one worker: who gets the next call slot, and who may dig into
//! the shared rate budget's reserve.
//!
//! # Policy
//! - **Call window.** At most `tenants.call_window` tasks are past admission at once (cache read,
//!   lease, rate-limit wait, LLM call). A tenant alone may use all of it: the policy is
//!   work-conserving.
//! - **Weighted shares.** While tenants compete, a freed slot goes to the waiting tenant with the
//!   fewest calls in flight per unit of weight (`tenants.known.<id>.weight`, else
//!   `tenants.default_weight`); between tenants in the same position, the oldest waiter first.
//!   Within one tenant, tasks are admitted in arrival order.
//! - **Reserved slots.** While the window is full, a tenant below its weighted share of it takes
//!   one of `tenants.reserved_calls` extra slots at once, so a small tenant's ticket does not
//!   wait for a big tenant's call (seconds) to finish.
//! - **Budget reserve.** A tenant holding more than its weighted share of the calls in flight
//!   takes shared rate budget only while the bucket keeps `tenants.budget_reserve` of its
//!   capacity; the others take it down to zero and skip the worker's budget queue. At the limit
//!   the big tenant still gets every token the bucket refills: the reserve costs it one burst,
//!   once, not a share of the rate.
//!
//! # Limits
//! - Fairness acts on tasks the worker has read. A tenant's task behind another tenant's backlog
//!   in the same partition is seen once the consumer has read past that backlog, so the worker
//!   reads far ahead (`consumer.max_in_flight`, default 16,384 tasks of a few KiB each): a
//!   backlog larger than all workers' read-ahead delays other tenants by the excess divided by
//!   the provider's rate.
//! - Shares are per worker process; replicas share the provider's limit through Redis, and a
//!   big tenant is over its share on every replica that sees a small one.
//!
//! Metric labels name known tenants (configured, or from the API key file) and `other` for the
//! rest, so that a producer cannot create unbounded series.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::oneshot;
use triage_runtime::auth::KeysFileError;

use crate::{
    config::{TenantConfig, TenantsConfig},
    metrics::{TenantLabels, WorkerMetrics},
};

/// The metric label of every tenant that is not known from configuration.
pub const OTHER: &str = "other";

/// The worker's call window, shared between tenants by weight.
pub struct Fairness {
    call_window: usize,
    reserved_calls: usize,
    default_weight: u32,
    configured: HashMap<String, TenantConfig>,
    /// Tenants with their own metric label.
    labelled: HashSet<String>,
    metrics: WorkerMetrics,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Slots taken, over all tenants (reserved ones included).
    admitted: usize,
    /// Waiters queued, over all tenants (a cancelled one counts until it is popped).
    waiting: usize,
    /// Sum of the weights of the tenants in `tenants`.
    total_weight: u64,
    next_seq: u64,
    /// Tenants with at least one task entered and not finished.
    tenants: HashMap<String, TenantState>,
}

struct TenantState {
    weight: u32,
    present: usize,
    admitted: usize,
    queue: VecDeque<Waiter>,
    quota_turn: Arc<tokio::sync::Mutex<()>>,
}

struct Waiter {
    seq: u64,
    grant_tx: oneshot::Sender<()>,
}

impl State {
    /// Whether `tenant` holds fewer than its weighted share of `pool` slots.
    fn below_share(&self, tenant: &TenantState, pool: usize) -> bool {
        (tenant.admitted as u128) * u128::from(self.total_weight)
            < (pool as u128) * u128::from(tenant.weight)
    }

    /// Hands free slots of the window to waiters, the tenant furthest below its share first.
    fn dispatch(&mut self, fairness: &Fairness) {
        while self.admitted < fairness.call_window && self.waiting > 0 {
            let chosen = self
                .tenants
                .iter()
                .filter_map(|(name, tenant)| Some((name, tenant, tenant.queue.front()?.seq)))
                .min_by(|(_, a, a_seq), (_, b, b_seq)| {
                    let a_load = (a.admitted as u128) * u128::from(b.weight);
                    let b_load = (b.admitted as u128) * u128::from(a.weight);
                    a_load.cmp(&b_load).then(a_seq.cmp(b_seq))
                })
                .map(|(name, _, _)| name.clone());
            let Some(name) = chosen else {
                // Only possible if the count drifted; resynchronise rather than spin.
                self.waiting = self.tenants.values().map(|t| t.queue.len()).sum();
                break;
            };
            let Some(tenant) = self.tenants.get_mut(&name) else {
                break;
            };
            let Some(waiter) = tenant.queue.pop_front() else {
                break;
            };
            self.waiting -= 1;
            // A waiter whose task was abandoned is gone: the slot goes to the next one.
            if waiter.grant_tx.send(()).is_ok() {
                tenant.admitted += 1;
                self.admitted += 1;
                fairness.in_flight_changed(&name, 1);
            }
        }
    }
}

impl Fairness {
    /// The worker's tenants: weights and quotas from configuration; the API key file's tenants
    /// are known too (for labels), with the default weight.
    pub fn new(config: &TenantsConfig, metrics: WorkerMetrics) -> Result<Self, KeysFileError> {
        let mut labelled: HashSet<String> = config.known.keys().cloned().collect();
        if let Some(path) = &config.keys_file {
            for (tenant, _, _) in triage_runtime::auth::read_keys_file(path)? {
                labelled.insert(tenant);
            }
        }
        labelled.remove(OTHER);
        Ok(Fairness {
            call_window: config.call_window.max(1),
            reserved_calls: config.reserved_calls,
            default_weight: config.default_weight.max(1),
            configured: config.known.clone().into_iter().collect(),
            labelled,
            metrics,
            state: Mutex::new(State::default()),
        })
    }

    /// The bounded metric label of `tenant`.
    pub fn label(&self, tenant: &str) -> TenantLabels {
        TenantLabels {
            tenant: if self.labelled.contains(tenant) {
                tenant.to_owned()
            } else {
                OTHER.to_owned()
            },
        }
    }

    /// The tenant's own quota, (requests, tokens) per minute with 0 for none; `None` when it has
    /// none at all.
    pub fn quota(&self, tenant: &str) -> Option<(u32, u32)> {
        self.configured
            .get(tenant)
            .map(|known| (known.requests_per_minute, known.tokens_per_minute))
            .filter(|&(requests, tokens)| requests > 0 || tokens > 0)
    }

    /// Counts a task of `tenant` in; it waits for a slot with [`Entry::admit`] and gives it
    /// back when the entry is dropped.
    pub fn enter(&self, tenant: &str) -> Entry<'_> {
        let weight = self
            .configured
            .get(tenant)
            .map_or(self.default_weight, |known| known.weight.max(1));
        let mut state = self.lock();
        let state = &mut *state;
        let tenant_state = match state.tenants.get_mut(tenant) {
            Some(existing) => existing,
            None => {
                state.total_weight += u64::from(weight);
                state
                    .tenants
                    .entry(tenant.to_owned())
                    .or_insert_with(|| TenantState {
                        weight,
                        present: 0,
                        admitted: 0,
                        queue: VecDeque::new(),
                        quota_turn: Arc::new(tokio::sync::Mutex::new(())),
                    })
            }
        };
        tenant_state.present += 1;
        let quota_turn = tenant_state.quota_turn.clone();
        let labels = self.label(tenant);
        self.metrics.tenant_waiting.get_or_create(&labels).inc();
        Entry {
            fairness: self,
            tenant: tenant.to_owned(),
            labels,
            quota_turn,
            grant_rx: None,
            admitted: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every await-free step; a panic elsewhere must not stop
        // every later task.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn in_flight_changed(&self, tenant: &str, delta: i64) {
        self.metrics
            .tenant_in_flight
            .get_or_create(&self.label(tenant))
            .inc_by(delta);
    }

    /// Gives back one of `tenant`'s slots and hands free ones to waiters.
    fn release(&self, state: &mut State, tenant: &str) {
        if let Some(tenant_state) = state.tenants.get_mut(tenant) {
            tenant_state.admitted = tenant_state.admitted.saturating_sub(1);
        }
        state.admitted = state.admitted.saturating_sub(1);
        self.in_flight_changed(tenant, -1);
        state.dispatch(self);
    }
}

/// A tenant's position against its weighted share of the calls in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// More than its share while another tenant is present: leaves the budget reserve.
    Over,
    /// At its share, or alone: the budget as usual.
    Even,
    /// Less than its share while another tenant is present: may take the reserve, skips the
    /// worker's budget queue.
    Under,
}

/// One task of one tenant, from arrival until it finishes: waiting, then holding a slot.
pub struct Entry<'a> {
    fairness: &'a Fairness,
    tenant: String,
    labels: TenantLabels,
    quota_turn: Arc<tokio::sync::Mutex<()>>,
    grant_rx: Option<oneshot::Receiver<()>>,
    admitted: bool,
}

impl Entry<'_> {
    /// Waits for a call slot: at once while the window has room and nobody waits, or from the
    /// reserve while this tenant is below its share; else in the tenant's queue. Cancel-safe:
    /// a slot granted to a dropped entry is given back.
    pub async fn admit(&mut self) {
        while !self.admitted {
            let grant_rx = match self.grant_rx.as_mut() {
                Some(grant_rx) => grant_rx,
                None => {
                    if self.try_admit_or_queue() {
                        break;
                    }
                    match self.grant_rx.as_mut() {
                        Some(grant_rx) => grant_rx,
                        None => break,
                    }
                }
            };
            let granted = grant_rx.await.is_ok();
            self.grant_rx = None;
            if granted {
                self.admitted = true;
            }
        }
        if self.admitted {
            self.fairness
                .metrics
                .tenant_waiting
                .get_or_create(&self.labels)
                .dec();
        }
    }

    /// Takes a slot now (true) or queues for one (false, `grant_rx` set).
    fn try_admit_or_queue(&mut self) -> bool {
        let fairness = self.fairness;
        let mut state = fairness.lock();
        let state = &mut *state;
        let Some(tenant) = state.tenants.get(&self.tenant) else {
            // Cannot happen while the entry exists; admitting keeps the task moving.
            self.admitted = true;
            return true;
        };
        let free = state.admitted < fairness.call_window && state.waiting == 0;
        let reserved = state.admitted < fairness.call_window + fairness.reserved_calls
            && state.below_share(tenant, fairness.call_window);
        if free || reserved {
            if let Some(tenant) = state.tenants.get_mut(&self.tenant) {
                tenant.admitted += 1;
            }
            state.admitted += 1;
            fairness.in_flight_changed(&self.tenant, 1);
            self.admitted = true;
            return true;
        }
        let (grant_tx, grant_rx) = oneshot::channel();
        let seq = state.next_seq;
        state.next_seq += 1;
        if let Some(tenant) = state.tenants.get_mut(&self.tenant) {
            tenant.queue.push_back(Waiter { seq, grant_tx });
        }
        state.waiting += 1;
        self.grant_rx = Some(grant_rx);
        false
    }

    /// Where this tenant stands against its weighted share of the calls in flight, for the
    /// shared rate budget.
    pub fn standing(&self) -> Standing {
        let state = self.fairness.lock();
        let Some(tenant) = state.tenants.get(&self.tenant) else {
            return Standing::Even;
        };
        if state.tenants.len() < 2 {
            return Standing::Even;
        }
        let held = (tenant.admitted as u128) * u128::from(state.total_weight);
        let share = (state.admitted as u128) * u128::from(tenant.weight);
        match held.cmp(&share) {
            std::cmp::Ordering::Greater => Standing::Over,
            std::cmp::Ordering::Less => Standing::Under,
            std::cmp::Ordering::Equal => Standing::Even,
        }
    }

    /// The tenant's turn to ask Redis for its quota: one task per tenant at a time, so that a
    /// backlog waiting for quota does not poll Redis once per task.
    pub fn quota_turn(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.quota_turn.clone()
    }

    /// The tenant's bounded metric label.
    pub fn labels(&self) -> &TenantLabels {
        &self.labels
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let fairness = self.fairness;
        // A grant that arrived after the waiting future was dropped is a slot to give back.
        let granted_late = self
            .grant_rx
            .as_mut()
            .is_some_and(|grant_rx| grant_rx.try_recv().is_ok());
        if !self.admitted {
            fairness
                .metrics
                .tenant_waiting
                .get_or_create(&self.labels)
                .dec();
        }
        let mut state = fairness.lock();
        let state = &mut *state;
        if self.admitted || granted_late {
            fairness.release(state, &self.tenant);
        }
        let Some(tenant) = state.tenants.get_mut(&self.tenant) else {
            return;
        };
        tenant.present = tenant.present.saturating_sub(1);
        if tenant.present == 0 {
            let stale = tenant.queue.len();
            let weight = tenant.weight;
            state.tenants.remove(&self.tenant);
            state.waiting = state.waiting.saturating_sub(stale);
            state.total_weight = state.total_weight.saturating_sub(u64::from(weight));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;

    fn fairness(call_window: usize, reserved_calls: usize, weights: &[(&str, u32)]) -> Fairness {
        let config = TenantsConfig {
            call_window,
            reserved_calls,
            known: weights
                .iter()
                .map(|&(tenant, weight)| {
                    (
                        tenant.to_owned(),
                        TenantConfig {
                            weight,
                            ..TenantConfig::default()
                        },
                    )
                })
                .collect(),
            ..TenantsConfig::default()
        };
        Fairness::new(&config, WorkerMetrics::register(&mut Registry::default())).unwrap()
    }

    /// Whether `entry` is admitted within a moment (it never is, if it has to wait).
    async fn admitted_now(entry: &mut Entry<'_>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), entry.admit())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn one_tenant_alone_uses_the_whole_window_and_not_the_reserve() {
        let fairness = fairness(4, 2, &[]);
        let mut entries: Vec<_> = (0..5).map(|_| fairness.enter("acme")).collect();
        for entry in &mut entries[..4] {
            assert!(admitted_now(entry).await);
            assert_eq!(
                entry.standing(),
                Standing::Even,
                "alone, nobody is over its share"
            );
        }
        assert!(!admitted_now(&mut entries[4]).await, "the window is full");
        entries.remove(0);
        assert!(admitted_now(&mut entries[3]).await, "a freed slot is taken");
    }

    #[tokio::test]
    async fn a_small_tenant_starts_at_once_while_a_big_one_fills_the_window() {
        let fairness = fairness(4, 1, &[]);
        let mut big: Vec<_> = (0..6).map(|_| fairness.enter("acme")).collect();
        for entry in &mut big[..4] {
            assert!(admitted_now(entry).await);
        }
        let mut small = fairness.enter("globex");
        assert!(admitted_now(&mut small).await, "from the reserve");
        assert_eq!(big[0].standing(), Standing::Over);
        assert_eq!(small.standing(), Standing::Under);
        assert!(
            !admitted_now(&mut big[4]).await,
            "window and reserve are full"
        );
        let mut second_small = fairness.enter("globex");
        assert!(!admitted_now(&mut second_small).await);
        // Two of the big tenant's calls finish: one slot frees in the window, and it goes to the
        // tenant with fewer calls per weight, not to the big tenant's older waiter.
        big.drain(..2).for_each(drop);
        assert!(admitted_now(&mut second_small).await);
        assert!(!admitted_now(&mut big[2]).await);
    }

    #[tokio::test]
    async fn freed_slots_follow_the_weights() {
        let fairness = fairness(6, 0, &[("acme", 2), ("globex", 1)]);
        let mut filler: Vec<_> = (0..6).map(|_| fairness.enter("initech")).collect();
        for entry in &mut filler {
            assert!(admitted_now(entry).await);
        }
        let mut acme: Vec<_> = (0..6).map(|_| fairness.enter("acme")).collect();
        let mut globex: Vec<_> = (0..6).map(|_| fairness.enter("globex")).collect();
        {
            let waits = acme
                .iter_mut()
                .chain(globex.iter_mut())
                .map(|entry| entry.admit());
            let all = futures::future::join_all(waits);
            tokio::pin!(all);
            let poll = Duration::from_millis(50);
            assert!(
                tokio::time::timeout(poll, &mut all).await.is_err(),
                "all queued"
            );
            // Free the whole window: 6 slots for acme (weight 2) and globex (weight 1).
            filler.clear();
            assert!(tokio::time::timeout(poll, &mut all).await.is_err());
        }
        let admitted = |entries: &[Entry<'_>]| entries.iter().filter(|e| e.admitted).count();
        assert_eq!((admitted(&acme), admitted(&globex)), (4, 2));
    }

    #[tokio::test]
    async fn an_abandoned_waiter_does_not_keep_its_slot() {
        let fairness = fairness(1, 0, &[]);
        let mut first = fairness.enter("acme");
        assert!(admitted_now(&mut first).await);
        let mut abandoned = fairness.enter("globex");
        assert!(!admitted_now(&mut abandoned).await);
        let mut next = fairness.enter("globex");
        assert!(!admitted_now(&mut next).await);
        drop(first);
        drop(abandoned);
        assert!(admitted_now(&mut next).await, "the slot passed on");
        assert_eq!(fairness.lock().admitted, 1);
    }

    #[test]
    fn labels_are_bounded_to_known_tenants() {
        let fairness = fairness(1, 0, &[("acme", 1)]);
        assert_eq!(fairness.label("acme").tenant, "acme");
        assert_eq!(fairness.label("anything-a-producer-sends").tenant, OTHER);
    }
}
