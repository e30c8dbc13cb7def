//! Which partitions may fetch while the in-flight window is full.
//!
//! Pausing a partition in librdkafka drops what it had prefetched for it, and the partition is
//! fetched again from the broker on resume. Pausing the whole assignment whenever the window
//! filled therefore threw away every partition's prefetch, and let one partition whose records
//! cannot finish (a key waiting out a long retry, a slow dependency behind one ticket) stop every
//! other partition of the consumer: its records fill the window, and the window is everyone's.
//!
//! # Policy
//! With `n` partitions assigned, each partition's share of the window is `max_unfinished / n`.
//! - While the window is full (`max_unfinished` records unfinished), a partition holding at
//!   least half its share is *held* (paused). Partitions below that keep fetching: they are not
//!   what fills the window.
//! - A held partition fetches again once it is down to a quarter of its share, or once the
//!   whole window is down to three quarters (the hysteresis keeps a steady stream of
//!   completions from pausing and resuming a partition per record).
//! - Memory stays bounded: partitions that keep fetching hold less than half their share each,
//!   so at most `1.5 × max_unfinished` records are unfinished (plus one fetch response).
//!
//! When every partition is equally busy this is the old behaviour: all of them are held and
//! all resume together. The gate (no rate budget, open circuit) and a drain still pause the
//! whole assignment, because then nothing may start anywhere.

use std::collections::HashSet;

use super::offsets::PartitionKey;

/// The partitions held for filling the window, and the rule that holds and releases them.
#[derive(Debug)]
pub(crate) struct FlowControl {
    max_unfinished: usize,
    held: HashSet<PartitionKey>,
}

/// Partitions to pause and to resume after a [`FlowControl::decide`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    pub hold: Vec<PartitionKey>,
    pub release: Vec<PartitionKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.hold.is_empty() && self.release.is_empty()
    }
}

impl FlowControl {
    pub fn new(max_unfinished: usize) -> Self {
        FlowControl {
            max_unfinished: max_unfinished.max(1),
            held: HashSet::new(),
        }
    }

    /// Whether `partition` is held for filling the window.
    pub fn is_held(&self, partition: &PartitionKey) -> bool {
        self.held.contains(partition)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A revoked partition is no longer ours to pause or resume.
    pub fn forget(&mut self, partition: &PartitionKey) {
        self.held.remove(partition);
    }

    /// Whether [`decide`](Self::decide) could change anything: cheap enough to ask per record.
    pub fn needs_decision(&self, total: usize) -> bool {
        !self.held.is_empty() || total >= self.max_unfinished
    }

    /// Given every unfinished record (`total`, which includes records of partitions revoked
    /// meanwhile) and the unfinished records of each assigned partition, which partitions to
    /// hold and which to release. The caller pauses and resumes them.
    pub fn decide(&mut self, total: usize, assigned: &[(PartitionKey, usize)]) -> Changes {
        let share = self.max_unfinished.div_ceil(assigned.len().max(1));
        let hold_at = (share / 2).max(1);
        let release_at = share / 4;
        let mut changes = Changes::default();
        let window_drained = total <= self.resume_below();
        self.held.retain(|held| {
            let pending = assigned
                .iter()
                .find(|(partition, _)| partition == held)
                .map_or(0, |(_, pending)| *pending);
            let release = window_drained || pending <= release_at;
            if release {
                changes.release.push(held.clone());
            }
            !release
        });
        if total >= self.max_unfinished {
            for (partition, pending) in assigned {
                if *pending >= hold_at
                    && !changes.release.contains(partition)
                    && self.held.insert(partition.clone())
                {
                    changes.hold.push(partition.clone());
                }
            }
        }
        changes
    }

    /// Once the whole window is down to this many, every held partition fetches again.
    fn resume_below(&self) -> usize {
        (self.max_unfinished * 3 / 4).min(self.max_unfinished.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn partition(number: i32) -> PartitionKey {
        ("tasks".to_owned(), number)
    }

    fn assigned(pending: &[usize]) -> Vec<(PartitionKey, usize)> {
        pending
            .iter()
            .enumerate()
            .map(|(number, pending)| (partition(number as i32), *pending))
            .collect()
    }

    #[test]
    fn below_the_window_nothing_is_held() {
        let mut flow = FlowControl::new(100);
        assert!(!flow.needs_decision(99));
        assert!(flow.decide(99, &assigned(&[99, 0, 0, 0])).is_empty());
    }

    #[test]
    fn only_the_partition_that_fills_the_window_is_held() {
        let mut flow = FlowControl::new(100);
        // Partition 0's records wait behind one key; 1 and 2 finish as fast as they come.
        let changes = flow.decide(100, &assigned(&[96, 2, 2]));
        assert_eq!(changes.hold, vec![partition(0)]);
        assert!(changes.release.is_empty());
        // Still full: nothing changes, partition 0 stays held.
        assert!(flow.decide(101, &assigned(&[96, 3, 2])).is_empty());
        assert!(flow.is_held(&partition(0)));
    }

    #[test]
    fn evenly_busy_partitions_are_all_held_and_resume_together() {
        let mut flow = FlowControl::new(120);
        let changes = flow.decide(120, &assigned(&[40, 40, 40]));
        assert_eq!(changes.hold.len(), 3);
        // Down to 3/4 of the window: everything fetches again at once.
        let changes = flow.decide(90, &assigned(&[30, 30, 30]));
        assert_eq!(changes.release.len(), 3);
        assert_eq!(flow.held(), 0);
    }

    #[test]
    fn a_held_partition_that_drained_fetches_again_while_others_stay_full() {
        let mut flow = FlowControl::new(100);
        flow.decide(100, &assigned(&[50, 50]));
        assert_eq!(flow.held(), 2);
        // Partition 1 is stuck at 80; partition 0 is down to 10 (a quarter of its share is 12).
        let changes = flow.decide(90, &assigned(&[10, 80]));
        assert_eq!(changes.release, vec![partition(0)]);
        assert!(flow.is_held(&partition(1)));
    }

    #[test]
    fn a_revoked_partition_is_forgotten() {
        let mut flow = FlowControl::new(10);
        flow.decide(10, &assigned(&[10]));
        flow.forget(&partition(0));
        assert_eq!(flow.held(), 0);
        assert!(!flow.needs_decision(5));
    }

    proptest! {
        /// Whatever the partitions hold, the ones left fetching while the window is full hold
        /// less than half their share each: unfinished records stay under 1.5 × the window.
        #[test]
        fn partitions_left_fetching_in_a_full_window_stay_below_half_their_share(
            max in 1usize..5_000,
            pending in proptest::collection::vec(0usize..3_000, 1..40),
            revoked in 0usize..2_000,
        ) {
            let mut flow = FlowControl::new(max);
            let assigned = assigned(&pending);
            let total = pending.iter().sum::<usize>() + revoked;
            flow.decide(total, &assigned);
            if total >= max {
                let share = max.div_ceil(assigned.len());
                let fetching: usize = assigned
                    .iter()
                    .filter(|(partition, _)| !flow.is_held(partition))
                    .map(|(_, pending)| *pending)
                    .sum();
                prop_assert!(fetching < assigned.len() * (share / 2).max(1));
                prop_assert!(fetching <= max / 2 + assigned.len());
            }
        }
    }
}
