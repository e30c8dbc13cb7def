//! The console's throughput and rate-limit waits: a tenant's triages per minute over a recent
//! window, and how many of them waited for rate limits and how long (`rate_limit_wait_ms`, set
//! by inference-worker). One query counts the window's minutes and the window as a whole
//! ([`crate::db::Store::throughput`]); this module chooses the window and fills the minutes
//! without a triage with zeros, so that the page draws a time axis with no gaps.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// The most minutes a window may span: one day.
pub const MAX_MINUTES: u32 = 1440;
/// The window when the caller does not say.
pub const DEFAULT_MINUTES: u32 = 15;

/// The whole minutes a window covers: `minutes` of them, the last being the minute `now` is in
/// (still filling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Start of the first minute (inclusive).
    pub since: DateTime<Utc>,
    /// End of the last minute (exclusive).
    pub until: DateTime<Utc>,
    pub minutes: u32,
}

impl Window {
    /// The `minutes` minutes up to and including the current one. `minutes` must be 1 to
    /// [`MAX_MINUTES`]; the caller checks.
    pub fn ending_at(now: DateTime<Utc>, minutes: u32) -> Self {
        let current = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
        Window {
            since: current - TimeDelta::minutes(i64::from(minutes) - 1),
            until: current + TimeDelta::minutes(1),
            minutes,
        }
    }
}

/// Counts of triages over one minute, or over the whole window when `minute` is `None`, as the
/// database adds them up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub minute: Option<DateTime<Utc>>,
    pub triaged: i64,
    pub waited: i64,
    pub wait_ms_total: i64,
    pub wait_ms_p95: i64,
}

/// One minute of the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the minute.
    pub minute: DateTime<Utc>,
    /// Triages committed for this tenant with `triaged_at` in the minute.
    pub triaged: i64,
    /// Of those, how many waited for a rate limit (a wait above 0 ms).
    pub waited: i64,
    /// Their waits added up, in milliseconds.
    pub wait_ms_total: i64,
    /// The 95th percentile of the minute's waits (over all its triages, 0 included), in ms.
    pub wait_ms_p95: i64,
}

/// What `GET /console/api/throughput` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub minutes: u32,
    /// The whole window: triages, how many waited, total and p95 wait.
    pub triaged: i64,
    pub waited: i64,
    pub wait_ms_total: i64,
    pub wait_ms_p95: i64,
    /// One per minute, oldest first, `minutes` of them.
    pub buckets: Vec<Bucket>,
}

/// The window's buckets from the database's counts: every minute of the window once, in order,
/// zero where the database had no row. A row outside the window (which the query's bounds
/// exclude) is ignored rather than trusted.
pub fn assemble(window: Window, counts: &[Counts]) -> Throughput {
    let total = counts
        .iter()
        .find(|c| c.minute.is_none())
        .cloned()
        .unwrap_or_default();
    let buckets = (0..window.minutes)
        .map(|index| {
            let minute = window.since + TimeDelta::minutes(i64::from(index));
            let found = counts.iter().find(|c| c.minute == Some(minute));
            match found {
                Some(c) => Bucket {
                    minute,
                    triaged: c.triaged,
                    waited: c.waited,
                    wait_ms_total: c.wait_ms_total,
                    wait_ms_p95: c.wait_ms_p95,
                },
                None => Bucket {
                    minute,
                    triaged: 0,
                    waited: 0,
                    wait_ms_total: 0,
                    wait_ms_p95: 0,
                },
            }
        })
        .collect();
    Throughput {
        since: window.since,
        until: window.until,
        minutes: window.minutes,
        triaged: total.triaged,
        waited: total.waited,
        wait_ms_total: total.wait_ms_total,
        wait_ms_p95: total.wait_ms_p95,
        buckets,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    #[test]
    fn the_window_ends_with_the_current_minute() {
        let window = Window::ending_at(at(1_700_000_130) + TimeDelta::milliseconds(250), 15);
        // 30 s into the minute that starts at 1_700_000_100.
        assert_eq!(window.until, at(1_700_000_160));
        assert_eq!(window.since, at(1_700_000_160 - 15 * 60));
        let one = Window::ending_at(at(1_700_000_100), 1);
        assert_eq!(
            (one.since, one.until),
            (at(1_700_000_100), at(1_700_000_160))
        );
    }

    #[test]
    fn missing_minutes_are_zero_and_the_total_is_the_databases() {
        let window = Window::ending_at(at(1_700_000_100), 3);
        let counts = [
            Counts {
                minute: Some(at(1_700_000_040)),
                triaged: 4,
                waited: 1,
                wait_ms_total: 900,
                wait_ms_p95: 900,
            },
            Counts {
                minute: None,
                triaged: 4,
                waited: 1,
                wait_ms_total: 900,
                wait_ms_p95: 900,
            },
        ];
        let throughput = assemble(window, &counts);
        let triaged: Vec<i64> = throughput.buckets.iter().map(|b| b.triaged).collect();
        assert_eq!(triaged, [0, 4, 0]);
        assert_eq!((throughput.triaged, throughput.waited), (4, 1));
        assert_eq!(assemble(window, &[]).wait_ms_p95, 0);
    }

    proptest! {
        /// Whatever the clock and the rows, the buckets are the window's minutes exactly (as
        /// many as asked for, a minute apart, inside it) and keep every in-window row's counts.
        #[test]
        fn buckets_cover_the_window_and_keep_its_rows(
            now in 1_000_000_000i64..4_000_000_000,
            minutes in 1u32..=MAX_MINUTES,
            offsets in proptest::collection::btree_set(-1_500i64..5, 0..20),
        ) {
            let window = Window::ending_at(at(now), minutes);
            let counts: Vec<Counts> = offsets
                .iter()
                .map(|&offset| Counts {
                    minute: Some(window.until + TimeDelta::minutes(offset - 1)),
                    triaged: offset.abs() + 1,
                    waited: 1,
                    wait_ms_total: 10,
                    wait_ms_p95: 10,
                })
                .collect();
            let throughput = assemble(window, &counts);
            prop_assert_eq!(throughput.buckets.len(), minutes as usize);
            prop_assert_eq!(throughput.buckets[0].minute, window.since);
            prop_assert!(window.since <= at(now) && at(now) < window.until);
            prop_assert_eq!(window.until - window.since, TimeDelta::minutes(i64::from(minutes)));
            for pair in throughput.buckets.windows(2) {
                prop_assert_eq!(pair[1].minute - pair[0].minute, TimeDelta::minutes(1));
            }
            let inside: i64 = counts
                .iter()
                .filter(|c| c.minute.is_some_and(|m| m >= window.since && m < window.until))
                .map(|c| c.triaged)
                .sum();
            prop_assert_eq!(throughput.buckets.iter().map(|b| b.triaged).sum::<i64>(), inside);
        }
    }
}
