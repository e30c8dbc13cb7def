//! Direct mode's decision for one Deployment: a pure state machine over explicit timestamps.
//!
//! At every poll, [`Scaler::evaluate`] turns the group's lag into a *recommendation*,
//! `ceil(lag / target_lag_per_replica)` clamped to `[min, min(max, partitions)]` (a consumer
//! beyond the partition count gets no partition), and then stabilises it the way the
//! HorizontalPodAutoscaler's `behavior` does:
//! - recommendations are kept for the longer of the two windows;
//! - scaling up goes to the *lowest* recommendation within the scale-up window, so only lag that
//!   lasted the whole window adds replicas;
//! - scaling down goes to the *highest* recommendation within the scale-down window, so replicas
//!   go only once lag stayed low for the whole window;
//! - after a change, nothing changes again until the cooldown passed: every change rebalances
//!   the group, and a rebalance storm costs more than a little lag.
//!
//! Transitions, given the current replica count:
//! - stabilised ≠ current and the cooldown passed → **scale** (up or down); the cooldown starts;
//! - stabilised ≠ current within the cooldown → **hold** (reason `cooldown`);
//! - stabilised = current ≠ recommendation → **hold** (reason `stabilization_window`);
//! - recommendation = current → steady, no decision.
//!
//! A hold is reported once when it starts (or its recommendation or reason changes), not at
//! every poll, so each reported decision is one log line and one counted metric.

use std::{collections::VecDeque, time::Duration, time::Instant};

/// The bounds and pacing of one Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePolicy {
    pub target_lag_per_replica: u64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub scale_up_stabilization: Duration,
    pub scale_down_stabilization: Duration,
    pub cooldown: Duration,
}

/// What the scaler sees at one poll.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub now: Instant,
    pub lag: i64,
    pub partitions: u32,
    pub current_replicas: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
    Hold,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Hold => "hold",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Lag asks for this many replicas.
    Lag,
    /// Lag asks for more replicas than the topic has partitions.
    CappedAtPartitions,
    /// Lag asks for more replicas than `max_replicas`.
    CappedAtMaximum,
    /// The replica count is outside `[min, max]` (or above the partitions) whatever the lag.
    Bounds,
    /// A different count is recommended but has not lasted its stabilisation window.
    StabilizationWindow,
    /// A change is due but the previous one was too recent.
    Cooldown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Lag => "lag",
            Reason::CappedAtPartitions => "capped_at_partitions",
            Reason::CappedAtMaximum => "capped_at_max_replicas",
            Reason::Bounds => "bounds",
            Reason::StabilizationWindow => "stabilization_window",
            Reason::Cooldown => "cooldown",
        }
    }
}

/// One reported decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub direction: Direction,
    pub current: u32,
    /// The replica count to set (for a hold: the count that stays).
    pub desired: u32,
    /// The count lag alone asks for, within bounds, before stabilisation.
    pub recommended: u32,
    pub lag: i64,
    pub reason: Reason,
}

#[derive(Debug)]
pub struct Scaler {
    policy: ScalePolicy,
    /// (time, recommendation), oldest first.
    recommendations: VecDeque<(Instant, u32)>,
    last_change: Option<Instant>,
    /// The hold last reported, so that it is reported once.
    reported_hold: Option<(u32, Reason)>,
}

impl Scaler {
    pub fn new(policy: ScalePolicy) -> Self {
        Scaler {
            policy,
            recommendations: VecDeque::new(),
            last_change: None,
            reported_hold: None,
        }
    }

    pub fn policy(&self) -> &ScalePolicy {
        &self.policy
    }

    /// Decides for one poll. `None`: nothing to report (steady, or a hold already reported).
    pub fn evaluate(&mut self, observation: Observation) -> Option<Decision> {
        let Observation {
            now,
            lag,
            partitions,
            current_replicas: current,
        } = observation;
        let (recommended, bound_reason) = self.recommend(lag, partitions);
        self.remember(now, recommended);
        let stabilized = self.stabilize(now, current, recommended);

        if stabilized == current {
            if recommended == current {
                self.reported_hold = None;
                return None;
            }
            return self.hold(current, recommended, lag, Reason::StabilizationWindow);
        }
        if let Some(changed_at) = self.last_change
            && now.duration_since(changed_at) < self.policy.cooldown
        {
            return self.hold(current, recommended, lag, Reason::Cooldown);
        }
        self.last_change = Some(now);
        self.reported_hold = None;
        let direction = if stabilized > current {
            Direction::Up
        } else {
            Direction::Down
        };
        let reason = if stabilized == recommended {
            bound_reason
        } else {
            Reason::Lag
        };
        Some(Decision {
            direction,
            current,
            desired: stabilized,
            recommended,
            lag,
            reason,
        })
    }

    /// `ceil(lag / target)` within `[min, min(max, partitions)]`, and why it is bounded.
    fn recommend(&self, lag: i64, partitions: u32) -> (u32, Reason) {
        let policy = &self.policy;
        let lag = u64::try_from(lag).unwrap_or(0);
        let wanted = lag.div_ceil(policy.target_lag_per_replica);
        // `min` wins over the partition count: an operator who asks for a floor gets it.
        let ceiling = policy.max_replicas.min(partitions).max(policy.min_replicas);
        let wanted_u32 = u32::try_from(wanted).unwrap_or(u32::MAX);
        if wanted_u32 > ceiling {
            let reason = if ceiling < policy.max_replicas {
                Reason::CappedAtPartitions
            } else {
                Reason::CappedAtMaximum
            };
            return (ceiling, reason);
        }
        if wanted_u32 < policy.min_replicas {
            return (policy.min_replicas, Reason::Bounds);
        }
        (wanted_u32, Reason::Lag)
    }

    fn remember(&mut self, now: Instant, recommended: u32) {
        self.recommendations.push_back((now, recommended));
        let keep = self
            .policy
            .scale_up_stabilization
            .max(self.policy.scale_down_stabilization);
        while let Some(&(at, _)) = self.recommendations.front() {
            if now.duration_since(at) > keep {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }

    /// The HPA's `stabilizeRecommendationWithBehaviors`: the lowest recommendation of the
    /// scale-up window bounds a scale-up, the highest of the scale-down window a scale-down.
    fn stabilize(&self, now: Instant, current: u32, recommended: u32) -> u32 {
        let within = |window: Duration| {
            self.recommendations
                .iter()
                .filter(move |(at, _)| now.duration_since(*at) <= window)
                .map(|&(_, replicas)| replicas)
        };
        let up = within(self.policy.scale_up_stabilization)
            .min()
            .unwrap_or(recommended);
        let down = within(self.policy.scale_down_stabilization)
            .max()
            .unwrap_or(recommended);
        let mut stabilized = current;
        if stabilized < up {
            stabilized = up;
        }
        if stabilized > down {
            stabilized = down;
        }
        stabilized
    }

    fn hold(
        &mut self,
        current: u32,
        recommended: u32,
        lag: i64,
        reason: Reason,
    ) -> Option<Decision> {
        if self.reported_hold == Some((recommended, reason)) {
            return None;
        }
        self.reported_hold = Some((recommended, reason));
        Some(Decision {
            direction: Direction::Hold,
            current,
            desired: current,
            recommended,
            lag,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ScalePolicy {
        ScalePolicy {
            target_lag_per_replica: 100,
            min_replicas: 1,
            max_replicas: 10,
            scale_up_stabilization: Duration::from_secs(10),
            scale_down_stabilization: Duration::from_secs(60),
            cooldown: Duration::from_secs(20),
        }
    }

    struct Clock {
        start: Instant,
    }

    impl Clock {
        fn at(&self, seconds: u64) -> Instant {
            self.start + Duration::from_secs(seconds)
        }
    }

    fn observe(at: Instant, lag: i64, current: u32) -> Observation {
        Observation {
            now: at,
            lag,
            partitions: 6,
            current_replicas: current,
        }
    }

    #[test]
    fn desired_is_lag_over_target_rounded_up_within_bounds() {
        let mut scaler = Scaler::new(ScalePolicy {
            scale_up_stabilization: Duration::ZERO,
            ..policy()
        });
        let clock = Clock {
            start: Instant::now(),
        };
        let decision = scaler.evaluate(observe(clock.at(0), 250, 1)).unwrap();
        assert_eq!(decision.direction, Direction::Up);
        assert_eq!((decision.current, decision.desired), (1, 3));
        assert_eq!(decision.reason, Reason::Lag);
    }

    #[test]
    fn replicas_never_exceed_the_partitions() {
        let mut scaler = Scaler::new(ScalePolicy {
            scale_up_stabilization: Duration::ZERO,
            ..policy()
        });
        let clock = Clock {
            start: Instant::now(),
        };
        let decision = scaler.evaluate(observe(clock.at(0), 5_000, 2)).unwrap();
        assert_eq!(decision.desired, 6);
        assert_eq!(decision.reason, Reason::CappedAtPartitions);
    }

    #[test]
    fn a_scale_up_waits_until_the_lag_lasted_the_whole_window() {
        let mut scaler = Scaler::new(policy());
        let clock = Clock {
            start: Instant::now(),
        };
        // No lag at t=0, lag from t=1: the recommendation of 1 at t=0 holds the count at 1
        // until it leaves the 10 s scale-up window.
        assert_eq!(scaler.evaluate(observe(clock.at(0), 0, 1)), None);
        let hold = scaler.evaluate(observe(clock.at(1), 400, 1)).unwrap();
        assert_eq!(hold.direction, Direction::Hold);
        assert_eq!(hold.reason, Reason::StabilizationWindow);
        assert_eq!(hold.recommended, 4);
        // The same hold is reported once.
        assert_eq!(scaler.evaluate(observe(clock.at(5), 400, 1)), None);
        // t=11: the zero-lag sample of t=0 left the 10 s window.
        let up = scaler.evaluate(observe(clock.at(11), 400, 1)).unwrap();
        assert_eq!((up.direction, up.desired), (Direction::Up, 4));
    }

    #[test]
    fn a_scale_down_waits_for_the_down_window_and_the_cooldown() {
        let mut scaler = Scaler::new(policy());
        let clock = Clock {
            start: Instant::now(),
        };
        assert_eq!(scaler.evaluate(observe(clock.at(0), 500, 5)), None);
        // Lag gone at t=10: the recommendation of 5 at t=0 keeps 5 replicas for 60 s.
        let hold = scaler.evaluate(observe(clock.at(10), 0, 5)).unwrap();
        assert_eq!(
            (hold.direction, hold.reason, hold.desired),
            (Direction::Hold, Reason::StabilizationWindow, 5)
        );
        assert_eq!(scaler.evaluate(observe(clock.at(59), 0, 5)), None);
        let down = scaler.evaluate(observe(clock.at(61), 0, 5)).unwrap();
        assert_eq!((down.direction, down.desired), (Direction::Down, 1));
        assert_eq!(down.reason, Reason::Bounds);
    }

    #[test]
    fn no_change_within_the_cooldown_of_the_previous_one() {
        let mut scaler = Scaler::new(ScalePolicy {
            scale_up_stabilization: Duration::ZERO,
            scale_down_stabilization: Duration::ZERO,
            ..policy()
        });
        let clock = Clock {
            start: Instant::now(),
        };
        let up = scaler.evaluate(observe(clock.at(0), 300, 1)).unwrap();
        assert_eq!(up.desired, 3);
        let hold = scaler.evaluate(observe(clock.at(5), 600, 3)).unwrap();
        assert_eq!(
            (hold.direction, hold.reason),
            (Direction::Hold, Reason::Cooldown)
        );
        let up_again = scaler.evaluate(observe(clock.at(21), 600, 3)).unwrap();
        assert_eq!((up_again.direction, up_again.desired), (Direction::Up, 6));
    }

    #[test]
    fn the_minimum_wins_over_a_small_partition_count() {
        let mut scaler = Scaler::new(ScalePolicy {
            min_replicas: 3,
            scale_up_stabilization: Duration::ZERO,
            ..policy()
        });
        let decision = scaler
            .evaluate(Observation {
                now: Instant::now(),
                lag: 10_000,
                partitions: 2,
                current_replicas: 1,
            })
            .unwrap();
        assert_eq!(decision.desired, 3);
    }

    #[test]
    fn steady_state_reports_nothing() {
        let mut scaler = Scaler::new(policy());
        let clock = Clock {
            start: Instant::now(),
        };
        for second in 0..100 {
            assert_eq!(scaler.evaluate(observe(clock.at(second), 150, 2)), None);
        }
    }
}
