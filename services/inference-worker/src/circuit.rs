//! A circuit breaker around the provider: after `failure_threshold` consecutive failures it
//! opens, and calls wait instead of hammering a provider that is down.
//!
//! # States
//! - closed: calls go through; a retryable failure counts, a success resets the count.
//! - open (until a deadline): no call goes through; the fetch gate is closed so no new tasks
//!   are fetched. At the deadline it becomes half-open.
//! - half-open: exactly one probe call goes through. Success closes the circuit; failure opens
//!   it again for twice as long (capped at 8 × `open_for`).

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;
use triage_runtime::kafka::consumer::FetchGate;

use crate::config::CircuitConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// 0 closed, 1 half-open, 2 open: the value of the circuit-state gauge.
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { consecutive_failures: u32 },
    Open { until: Instant, open_for: Duration },
    HalfOpen { probing: bool, open_for: Duration },
}

pub struct CircuitBreaker {
    inner: Mutex<Inner>,
    config: CircuitConfig,
    gate: FetchGate,
}

/// Whether a call may go now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Try again after this long.
    Wait(Duration),
}

impl CircuitBreaker {
    pub fn new(config: CircuitConfig, gate: FetchGate) -> Self {
        CircuitBreaker {
            inner: Mutex::new(Inner::Closed {
                consecutive_failures: 0,
            }),
            config,
            gate,
        }
    }

    pub fn state(&self) -> CircuitState {
        match *self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { .. } => CircuitState::Open,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    pub fn admit(&self) -> Admission {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match *inner {
            Inner::Closed { .. } => Admission::Go,
            Inner::Open { until, open_for } if now >= until => {
                *inner = Inner::HalfOpen {
                    probing: true,
                    open_for,
                };
                tracing::info!("circuit half-open: sending one probe");
                Admission::Go
            }
            Inner::Open { until, .. } => Admission::Wait(until - now),
            Inner::HalfOpen {
                probing: false,
                open_for,
            } => {
                *inner = Inner::HalfOpen {
                    probing: true,
                    open_for,
                };
                Admission::Go
            }
            Inner::HalfOpen { probing: true, .. } => Admission::Wait(Duration::from_millis(100)),
        }
    }

    pub fn record_success(&self) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !matches!(*inner, Inner::Closed { .. }) {
            tracing::info!("circuit closed: the provider answers again");
            self.gate.open();
        }
        *inner = Inner::Closed {
            consecutive_failures: 0,
        };
    }

    pub fn record_failure(&self) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open_for = match *inner {
            Inner::Closed {
                consecutive_failures,
            } if consecutive_failures + 1 < self.config.failure_threshold => {
                *inner = Inner::Closed {
                    consecutive_failures: consecutive_failures + 1,
                };
                return;
            }
            Inner::Closed { .. } => self.config.open_for,
            Inner::HalfOpen { open_for, .. } => (open_for * 2).min(self.config.open_for * 8),
            // Calls admitted before it opened keep failing; the deadline stands.
            Inner::Open { .. } => return,
        };
        tracing::warn!(open_for = ?open_for, "circuit open: the provider keeps failing");
        *inner = Inner::Open {
            until: Instant::now() + open_for,
            open_for,
        };
        self.gate.close();
    }

    /// A probe that ended without an answer either way (e.g. a 429) frees the probe slot.
    pub fn release_probe(&self) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Inner::HalfOpen { open_for, .. } = *inner {
            *inner = Inner::HalfOpen {
                probing: false,
                open_for,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (CircuitBreaker, FetchGate) {
        let gate = FetchGate::default();
        let config = CircuitConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(10),
        };
        (CircuitBreaker::new(config, gate.clone()), gate)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_probes_then_closes() {
        let (circuit, gate) = breaker();
        circuit.record_failure();
        circuit.record_success();
        circuit.record_failure();
        circuit.record_failure();
        assert_eq!(
            circuit.state(),
            CircuitState::Closed,
            "a success resets the count"
        );
        circuit.record_failure();
        assert_eq!(circuit.state(), CircuitState::Open);
        assert!(!gate.is_open());
        assert_eq!(circuit.admit(), Admission::Wait(Duration::from_secs(10)));

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(circuit.admit(), Admission::Go, "one probe");
        assert!(
            matches!(circuit.admit(), Admission::Wait(_)),
            "only one probe at a time"
        );
        circuit.record_success();
        assert_eq!(circuit.state(), CircuitState::Closed);
        assert!(gate.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_for_longer() {
        let (circuit, _) = breaker();
        for _ in 0..3 {
            circuit.record_failure();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(circuit.admit(), Admission::Go);
        circuit.record_failure();
        assert_eq!(circuit.admit(), Admission::Wait(Duration::from_secs(20)));
    }
}
