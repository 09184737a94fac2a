//! Flap damping: how long a node that keeps being cut off waits before it takes IPs back.
//!
//! Moving IPs *away* from a node that fails is never delayed; damping only decides when a
//! returning node may take them back (it declares itself unsettled until then, see
//! `crate::cluster`). Each cut-off within [`Damping::window`] of the last ones doubles
//! the wait, from the hold-down up to [`Damping::max_hold`], as BGP damps a flapping
//! route. So a link that drops now and then costs one hold-down per drop, and a flaky
//! one moves its IPs away once and leaves them there until it has been quiet.
//!
//! A node learns it was cut off from its own link going down, or from its peers
//! declaring it down. The second also happens to every node when a partition heals, so
//! [`cut_off`] decides which side was cut off: the side that saw fewer of the declared
//! nodes. The other side stays settled and keeps its IPs. (Had both sides waited, the
//! first node to settle would briefly be the only settled one and take every IP.)

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// The cut-offs of one node that still count, and what they cost.
#[derive(Debug)]
pub struct Damping {
    hold: Duration,
    cut_offs: VecDeque<Instant>,
}

impl Damping {
    /// The wait doubles with each cut-off up to this many hold-downs.
    pub const MAX_HOLDS: u32 = 16;
    /// A cut-off counts for this many hold-downs.
    pub const WINDOW_HOLDS: u32 = 20;

    /// Damping around a hold-down of `hold`: a node cut off once waits `hold`.
    pub fn new(hold: Duration) -> Damping {
        Damping {
            hold,
            cut_offs: VecDeque::new(),
        }
    }

    /// The longest a node waits after its last cut-off: 16 hold-downs (48 s by default).
    pub fn max_hold(&self) -> Duration {
        self.hold * Self::MAX_HOLDS
    }

    /// How long a cut-off is remembered: 20 hold-downs (60 s by default).
    pub fn window(&self) -> Duration {
        self.hold * Self::WINDOW_HOLDS
    }

    /// The node was cut off at `now`: how long it waits, from now, before it takes IPs
    /// back. The n-th cut-off within the window waits `hold × 2^(n−1)`, at most
    /// [`Damping::max_hold`].
    pub fn cut_off(&mut self, now: Instant) -> Duration {
        let window = self.window();
        while self
            .cut_offs
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.cut_offs.pop_front();
        }
        // The doubling stops at the cap, so older entries change nothing: memory stays
        // bounded however fast cut-offs come.
        if self.cut_offs.len() >= Self::MAX_HOLDS as usize {
            self.cut_offs.pop_front();
        }
        self.cut_offs.push_back(now);
        let doublings = (self.cut_offs.len() as u32 - 1).min(Self::MAX_HOLDS.ilog2());
        self.hold * (1 << doublings)
    }

    /// How many cut-offs still count at `now`.
    pub fn recent(&self, now: Instant) -> usize {
        let window = self.window();
        self.cut_offs
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < window)
            .count()
    }
}

/// Whether this node, declared down by its peers while it saw `seen` (itself included)
/// of the `declared` nodes alive, was the one cut off, rather than the other side of a
/// partition that healed.
///
/// * It saw every declared node: nobody looked down to it, yet they declared it down, so
///   its own datagrams were lost (a one-way loss on its link).
/// * It saw fewer than half: it was on the small side.
/// * Exactly half: the side without the first declared node (by name) was cut off, so
///   the two halves decide the same way.
pub fn cut_off(seen: &BTreeSet<String>, declared: &BTreeSet<String>) -> bool {
    let seen_declared = declared.iter().filter(|n| seen.contains(*n)).count();
    if seen_declared == declared.len() {
        return true;
    }
    match (2 * seen_declared).cmp(&declared.len()) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => declared.first().is_some_and(|first| !seen.contains(first)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &[&str]) -> BTreeSet<String> {
        ns.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn each_cut_off_within_the_window_doubles_the_wait_up_to_the_cap() {
        let hold = Duration::from_secs(3);
        let mut d = Damping::new(hold);
        let t0 = Instant::now();
        let waits: Vec<u64> = (0..8)
            .map(|i| d.cut_off(t0 + Duration::from_secs(5 * i)).as_secs())
            .collect();
        assert_eq!(waits, [3, 6, 12, 24, 48, 48, 48, 48]);
        assert_eq!(d.max_hold(), Duration::from_secs(48));
    }

    #[test]
    fn cut_offs_older_than_the_window_are_forgotten() {
        let hold = Duration::from_secs(3);
        let mut d = Damping::new(hold);
        let t0 = Instant::now();
        assert_eq!(d.cut_off(t0), hold);
        assert_eq!(d.cut_off(t0 + Duration::from_secs(10)), hold * 2);
        // 60 s after the first, only the second still counts.
        assert_eq!(d.cut_off(t0 + Duration::from_secs(60)), hold * 2);
        assert_eq!(d.recent(t0 + Duration::from_secs(60)), 2);
        assert_eq!(d.recent(t0 + Duration::from_secs(70)), 1);
        // Quiet for a whole window: back to one hold-down.
        assert_eq!(d.cut_off(t0 + Duration::from_secs(200)), hold);
    }

    #[test]
    fn memory_stays_bounded_however_fast_cut_offs_come() {
        let mut d = Damping::new(Duration::from_millis(10));
        let t0 = Instant::now();
        for i in 0..10_000 {
            let wait = d.cut_off(t0 + Duration::from_micros(i));
            assert!(wait <= d.max_hold());
        }
        assert!(d.recent(t0) <= Damping::MAX_HOLDS as usize);
    }

    #[test]
    fn the_side_of_a_partition_that_saw_fewer_nodes_was_cut_off() {
        let three = names(&["a", "b", "c"]);
        // One node alone; the two others together.
        assert!(cut_off(&names(&["c"]), &three));
        assert!(!cut_off(&names(&["a", "b"]), &three));
        // Declared down while seeing everyone: its own datagrams were lost.
        assert!(cut_off(&three, &three));
        // Two halves: exactly one of them counts as cut off, whichever asks.
        let four = names(&["a", "b", "c", "d"]);
        for (left, right) in [(["a", "b"], ["c", "d"]), (["a", "c"], ["b", "d"])] {
            let (l, r) = (
                cut_off(&names(&left), &four),
                cut_off(&names(&right), &four),
            );
            assert_ne!(l, r, "{left:?} | {right:?}");
            assert!(r, "the half without the first node by name: {right:?}");
        }
        // Two nodes: the first by name keeps its IPs.
        let two = names(&["a", "b"]);
        assert!(!cut_off(&names(&["a"]), &two));
        assert!(cut_off(&names(&["b"]), &two));
        // Members not (or no longer) declared do not count.
        assert!(!cut_off(&names(&["a", "b", "zz"]), &three));
    }

    #[test]
    fn every_split_has_exactly_one_side_cut_off() {
        // Exhaustive over the splits of up to 7 nodes into two non-empty sides.
        for n in 2..=7usize {
            let all: Vec<String> = (0..n).map(|i| format!("node{i}")).collect();
            let declared: BTreeSet<String> = all.iter().cloned().collect();
            for mask in 1..(1u32 << n) - 1 {
                let (left, right): (Vec<_>, Vec<_>) = all
                    .iter()
                    .enumerate()
                    .partition(|(i, _)| mask & (1 << i) != 0);
                let side = |s: Vec<(usize, &String)>| -> BTreeSet<String> {
                    s.into_iter().map(|(_, n)| n.clone()).collect()
                };
                let (l, r) = (side(left), side(right));
                assert_ne!(
                    cut_off(&l, &declared),
                    cut_off(&r, &declared),
                    "{l:?} | {r:?}"
                );
            }
        }
    }
}
