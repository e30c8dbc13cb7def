//! A group's status from a sliding window of samples, evaluated the way Burrow does.
//!
//! Each poll adds one sample (committed offset, lag) per partition; a partition keeps the last
//! `window` samples. Per partition, in this order:
//! - lag is zero now, or anywhere in the window: **ok** (the group caught up recently);
//! - no committed offset: **unknown** (the group never committed; nothing to judge);
//! - fewer samples than the window: **unknown** (not enough history yet);
//! - the committed offset did not move across the window while lag stayed above zero:
//!   **stalled** (the consumers are gone or stuck);
//! - the committed offset moved but lag never fell and ends higher than it started:
//!   **lagging** (consuming, but slower than records arrive);
//! - otherwise **ok**.
//!
//! The group takes its worst partition's status: stalled, then lagging, then unknown, then ok.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupStatus {
    Ok,
    Unknown,
    Lagging,
    Stalled,
}

impl GroupStatus {
    pub const ALL: [GroupStatus; 4] = [
        GroupStatus::Ok,
        GroupStatus::Lagging,
        GroupStatus::Stalled,
        GroupStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GroupStatus::Ok => "ok",
            GroupStatus::Lagging => "lagging",
            GroupStatus::Stalled => "stalled",
            GroupStatus::Unknown => "unknown",
        }
    }
}

/// One partition's state at one poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionSample {
    pub partition: i32,
    /// `None` while the group has no committed offset for the partition.
    pub committed: Option<i64>,
    pub lag: i64,
}

/// The window of one group.
#[derive(Debug)]
pub struct StatusWindow {
    window: usize,
    partitions: BTreeMap<i32, VecDeque<PartitionSample>>,
}

impl StatusWindow {
    pub fn new(window: usize) -> Self {
        StatusWindow {
            window: window.max(2),
            partitions: BTreeMap::new(),
        }
    }

    /// Adds one poll's samples and returns the group's status. Partitions absent from
    /// `samples` (a deleted or shrunk topic) are forgotten.
    pub fn observe(&mut self, samples: &[PartitionSample]) -> GroupStatus {
        self.partitions
            .retain(|partition, _| samples.iter().any(|s| s.partition == *partition));
        let mut status = GroupStatus::Ok;
        for sample in samples {
            let history = self.partitions.entry(sample.partition).or_default();
            if history.len() == self.window {
                history.pop_front();
            }
            history.push_back(*sample);
            status = status.max(evaluate(self.window, history));
        }
        if samples.is_empty() {
            return GroupStatus::Unknown;
        }
        status
    }

    /// Forgets everything, e.g. when the group's topic disappeared.
    pub fn clear(&mut self) {
        self.partitions.clear();
    }
}

fn evaluate(window: usize, history: &VecDeque<PartitionSample>) -> GroupStatus {
    let (Some(first), Some(last)) = (history.front(), history.back()) else {
        return GroupStatus::Unknown;
    };
    if history.iter().any(|s| s.lag == 0) {
        return GroupStatus::Ok;
    }
    let (Some(first_committed), Some(last_committed)) = (first.committed, last.committed) else {
        return GroupStatus::Unknown;
    };
    if history.len() < window {
        return GroupStatus::Unknown;
    }
    if first_committed == last_committed {
        return GroupStatus::Stalled;
    }
    let never_fell = history
        .iter()
        .zip(history.iter().skip(1))
        .all(|(earlier, later)| later.lag >= earlier.lag);
    if never_fell && last.lag > first.lag {
        return GroupStatus::Lagging;
    }
    GroupStatus::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(committed: i64, lag: i64) -> [PartitionSample; 1] {
        [PartitionSample {
            partition: 0,
            committed: Some(committed),
            lag,
        }]
    }

    fn run(window: usize, samples: &[(i64, i64)]) -> Vec<GroupStatus> {
        let mut status = StatusWindow::new(window);
        samples
            .iter()
            .map(|&(committed, lag)| status.observe(&sample(committed, lag)))
            .collect()
    }

    #[test]
    fn a_caught_up_group_is_ok_at_once() {
        assert_eq!(run(3, &[(10, 0)]), vec![GroupStatus::Ok]);
    }

    #[test]
    fn lag_with_commits_that_do_not_move_is_stalled_once_the_window_is_full() {
        assert_eq!(
            run(3, &[(10, 5), (10, 6), (10, 6)]),
            vec![
                GroupStatus::Unknown,
                GroupStatus::Unknown,
                GroupStatus::Stalled
            ]
        );
    }

    #[test]
    fn growing_lag_while_commits_advance_is_lagging() {
        assert_eq!(
            run(3, &[(10, 5), (12, 7), (15, 9)]).last(),
            Some(&GroupStatus::Lagging)
        );
    }

    #[test]
    fn lag_that_falls_while_commits_advance_is_ok() {
        assert_eq!(
            run(3, &[(10, 9), (15, 7), (20, 4)]).last(),
            Some(&GroupStatus::Ok)
        );
    }

    #[test]
    fn a_zero_lag_anywhere_in_the_window_is_ok() {
        assert_eq!(
            run(3, &[(10, 0), (10, 3), (10, 3)]).last(),
            Some(&GroupStatus::Ok)
        );
        // Once the zero leaves the window, the stall shows.
        assert_eq!(
            run(3, &[(10, 0), (10, 3), (10, 3), (10, 3)]).last(),
            Some(&GroupStatus::Stalled)
        );
    }

    #[test]
    fn no_commits_is_unknown_and_the_worst_partition_wins() {
        let mut status = StatusWindow::new(2);
        let samples = |lag: i64| {
            [
                PartitionSample {
                    partition: 0,
                    committed: None,
                    lag: 4,
                },
                PartitionSample {
                    partition: 1,
                    committed: Some(3),
                    lag,
                },
            ]
        };
        assert_eq!(status.observe(&samples(0)), GroupStatus::Unknown);
        status.observe(&samples(2));
        assert_eq!(status.observe(&samples(2)), GroupStatus::Stalled);
    }
}
