//! The one place that decides which offset may be committed.
//!
//! Records of a partition finish out of order when many are in flight. The committed offset of
//! a partition must never pass a record whose work is not durable yet, so for each partition we
//! keep the set of offsets handed out and not finished; the commit point is the lowest of them,
//! or one past the highest offset seen when none is pending. Finished work above a gap is
//! remembered only by its absence from the set and is covered once the gap closes.
//!
//! Memory: one entry per record in flight, and the consumer runtime never has more than
//! `max_in_flight` records in flight, whatever the backlog.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

/// A partition of a topic.
pub type PartitionKey = (String, i32);

/// Offsets in flight for one partition, during one assignment of it.
#[derive(Debug)]
pub struct PartitionOffsets {
    pending: BTreeSet<i64>,
    /// One past the highest offset ever handed out; the commit point when nothing is pending.
    next_offset: Option<i64>,
    /// The last commit point handed to `store_offsets`, so it is stored only when it moves.
    stored: Option<i64>,
    /// When the commit point last moved, or records began waiting while it stood still: how
    /// long a record has held the partition is `now - moved_at` while any is pending.
    moved_at: Instant,
}

impl PartitionOffsets {
    fn new() -> Self {
        PartitionOffsets {
            pending: BTreeSet::new(),
            next_offset: None,
            stored: None,
            moved_at: Instant::now(),
        }
    }

    fn begin(&mut self, offset: i64) {
        if self.pending.is_empty() {
            self.moved_at = Instant::now();
        }
        // The first record handed out is where the group already stands: nothing to store yet.
        self.stored.get_or_insert(offset);
        self.pending.insert(offset);
        self.next_offset = Some(
            self.next_offset
                .map_or(offset + 1, |next| next.max(offset + 1)),
        );
    }

    /// Marks `offset` finished. Returns the new commit point if it moved forward.
    fn finish(&mut self, offset: i64) -> Option<i64> {
        if !self.pending.remove(&offset) {
            return None;
        }
        let commit_point = self.commit_point()?;
        if self.stored.is_some_and(|stored| stored >= commit_point) {
            return None;
        }
        self.stored = Some(commit_point);
        self.moved_at = Instant::now();
        Some(commit_point)
    }

    /// The offset the group may resume from: the lowest unfinished one.
    pub fn commit_point(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next_offset)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The offsets of every partition currently assigned to this consumer.
///
/// Each assignment of a partition gets a new generation: a record that finishes after its
/// partition was revoked (and possibly assigned again) belongs to an old generation and is
/// ignored, because its partition is now someone else's, or re-read from the committed offset.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<PartitionKey, (u64, PartitionOffsets)>,
    next_generation: u64,
}

/// A partition whose commit point is held by an unfinished record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub topic: String,
    pub partition: i32,
    /// The unfinished offset holding it.
    pub offset: i64,
    pub for_: Duration,
}

/// A record handed out, to be reported back to [`OffsetTracker::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub generation: u64,
}

impl OffsetTracker {
    /// Starts tracking a newly assigned partition.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.next_generation += 1;
        self.partitions.insert(
            (topic.to_owned(), partition),
            (self.next_generation, PartitionOffsets::new()),
        );
    }

    /// Forgets a revoked partition; its records still in flight will be ignored when they finish.
    /// Returns how many were in flight.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> usize {
        self.partitions
            .remove(&(topic.to_owned(), partition))
            .map_or(0, |(_, offsets)| offsets.pending())
    }

    /// Records that `offset` was handed out for processing. A partition that was never assigned
    /// (a consumer without group management) is assigned on first use.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) -> InFlight {
        let key = (topic.to_owned(), partition);
        let next_generation = &mut self.next_generation;
        let (generation, offsets) = self.partitions.entry(key).or_insert_with(|| {
            *next_generation += 1;
            (*next_generation, PartitionOffsets::new())
        });
        offsets.begin(offset);
        InFlight {
            topic: topic.to_owned(),
            partition,
            offset,
            generation: *generation,
        }
    }

    /// Marks a record finished. Returns the partition's new commit point when it moved, which
    /// the caller stores for the next commit.
    pub fn finish(&mut self, record: &InFlight) -> Option<i64> {
        let (generation, offsets) = self
            .partitions
            .get_mut(&(record.topic.clone(), record.partition))?;
        if *generation != record.generation {
            return None;
        }
        offsets.finish(record.offset)
    }

    /// Whether the record's partition is still assigned in the generation it was read in.
    pub fn is_current(&self, record: &InFlight) -> bool {
        self.partitions
            .get(&(record.topic.clone(), record.partition))
            .is_some_and(|(generation, _)| *generation == record.generation)
    }

    /// Records handed out and not finished, over all partitions.
    pub fn pending(&self) -> usize {
        self.partitions
            .values()
            .map(|(_, offsets)| offsets.pending())
            .sum()
    }

    /// Records handed out and not finished, per assigned partition.
    pub fn pending_by_partition(&self) -> Vec<(PartitionKey, usize)> {
        self.partitions
            .iter()
            .map(|(partition, (_, offsets))| (partition.clone(), offsets.pending()))
            .collect()
    }

    /// How many partitions are assigned.
    pub fn assigned(&self) -> usize {
        self.partitions.len()
    }

    /// The partition whose commit point has stood still longest while records wait, and for how
    /// long: a record that never finishes (a handler stuck or lost) shows here, not only as
    /// lag that looks like ordinary load.
    pub fn longest_stall(&self, now: Instant) -> Option<Stall> {
        self.partitions
            .iter()
            .filter(|(_, (_, offsets))| offsets.pending() > 0)
            .filter_map(|((topic, partition), (_, offsets))| {
                Some(Stall {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: offsets.commit_point()?,
                    for_: now.saturating_duration_since(offsets.moved_at),
                })
            })
            .max_by_key(|stall| stall.for_)
    }

    pub fn commit_point(&self, topic: &str, partition: i32) -> Option<i64> {
        self.partitions
            .get(&(topic.to_owned(), partition))
            .and_then(|(_, offsets)| offsets.commit_point())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_is_the_lowest_unfinished_offset() {
        let mut tracker = OffsetTracker::default();
        tracker.assign("t", 0);
        let records: Vec<_> = (10..15)
            .map(|offset| tracker.begin("t", 0, offset))
            .collect();
        assert_eq!(tracker.commit_point("t", 0), Some(10));

        // 11, 12 and 14 finish first: 10 is still running, nothing may be committed past it.
        assert_eq!(tracker.finish(&records[1]), None);
        assert_eq!(tracker.finish(&records[2]), None);
        assert_eq!(tracker.finish(&records[4]), None);
        assert_eq!(tracker.commit_point("t", 0), Some(10));

        // 10 finishes: the commit point jumps over the finished 11 and 12 to the unfinished 13.
        assert_eq!(tracker.finish(&records[0]), Some(13));
        // 13 finishes: everything handed out is done; resume after the highest, 14.
        assert_eq!(tracker.finish(&records[3]), Some(15));
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn finishing_twice_or_unknown_offsets_changes_nothing() {
        let mut tracker = OffsetTracker::default();
        let first = tracker.begin("t", 1, 0);
        let second = tracker.begin("t", 1, 1);
        assert_eq!(tracker.finish(&second), None);
        assert_eq!(tracker.finish(&second), None);
        assert_eq!(tracker.finish(&first), Some(2));
        assert_eq!(tracker.finish(&first), None);
    }

    #[test]
    fn work_of_a_revoked_partition_is_never_committed_by_this_consumer() {
        let mut tracker = OffsetTracker::default();
        tracker.assign("t", 0);
        let old = tracker.begin("t", 0, 5);
        assert_eq!(tracker.revoke("t", 0), 1);
        assert_eq!(tracker.finish(&old), None);

        // Assigned again: the old generation's completion still must not count.
        tracker.assign("t", 0);
        let new = tracker.begin("t", 0, 5);
        assert_eq!(tracker.finish(&old), None);
        assert_eq!(tracker.commit_point("t", 0), Some(5));
        assert_eq!(tracker.finish(&new), Some(6));
    }

    #[test]
    fn a_stall_names_the_partition_and_offset_that_hold_the_commit_point() {
        let mut tracker = OffsetTracker::default();
        assert_eq!(tracker.longest_stall(Instant::now()), None);
        let stuck = tracker.begin("t", 0, 7);
        let moving = tracker.begin("t", 1, 3);
        let later = Instant::now() + Duration::from_secs(90);
        assert_eq!(tracker.finish(&moving), Some(4));
        let stall = tracker.longest_stall(later).unwrap();
        assert_eq!(
            (stall.topic.as_str(), stall.partition, stall.offset),
            ("t", 0, 7)
        );
        assert!(stall.for_ >= Duration::from_secs(90));
        // Once it finishes nothing waits, so nothing is stalled.
        assert_eq!(tracker.finish(&stuck), Some(8));
        assert_eq!(tracker.longest_stall(later), None);
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::default();
        let slow = tracker.begin("t", 0, 0);
        let fast = tracker.begin("t", 1, 0);
        assert_eq!(tracker.finish(&fast), Some(1));
        assert_eq!(tracker.commit_point("t", 0), Some(0));
        assert_eq!(tracker.finish(&slow), Some(1));
    }
}
