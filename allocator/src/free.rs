//! The free addresses of one pool in one family, as disjoint intervals.
//!
//! Every operation is logarithmic in the number of intervals, which grows with the
//! number of holes punched by allocation, never with the size of the pool: a /64 costs
//! what a /24 costs.

use std::collections::BTreeMap;

use ferrolb_api::Family;
use ferrolb_api::address::is_buggy;

#[derive(Clone, Debug, Default)]
pub(crate) struct FreeSpace {
    /// start -> end (inclusive) of each free interval; intervals never touch.
    intervals: BTreeMap<u128, u128>,
}

impl FreeSpace {
    /// Free space covering `ranges` (inclusive pairs, in any order, may overlap).
    pub(crate) fn new(mut ranges: Vec<(u128, u128)>) -> FreeSpace {
        ranges.sort();
        let mut intervals: BTreeMap<u128, u128> = BTreeMap::new();
        let mut current: Option<(u128, u128)> = None;
        for (first, last) in ranges {
            current = match current {
                Some((s, e)) if first <= e.saturating_add(1) => Some((s, e.max(last))),
                Some((s, e)) => {
                    intervals.insert(s, e);
                    Some((first, last))
                }
                None => Some((first, last)),
            };
        }
        if let Some((s, e)) = current {
            intervals.insert(s, e);
        }
        FreeSpace { intervals }
    }

    /// The disjoint, sorted intervals (for totals).
    pub(crate) fn intervals(&self) -> impl Iterator<Item = (u128, u128)> + '_ {
        self.intervals.iter().map(|(s, e)| (*s, *e))
    }

    #[cfg(test)]
    pub(crate) fn is_free(&self, n: u128) -> bool {
        self.intervals
            .range(..=n)
            .next_back()
            .is_some_and(|(_, &end)| n <= end)
    }

    /// The first free address at or after `start`, wrapping around to the lowest;
    /// skipping `.0`/`.255` when `avoid_buggy` (IPv4).
    pub(crate) fn first_from(
        &self,
        start: u128,
        family: Family,
        avoid_buggy: bool,
    ) -> Option<u128> {
        let containing = self
            .intervals
            .range(..=start)
            .next_back()
            .filter(|(_, end)| **end >= start)
            .map(|(_, end)| (start, *end));
        let after = self
            .intervals
            .range(start.saturating_add(1)..)
            .map(|(s, e)| (*s, *e));
        let before = self
            .intervals
            .range(..start)
            .map(|(s, e)| (*s, (*e).min(start.saturating_sub(1))));
        containing
            .into_iter()
            .chain(after)
            .chain(before)
            .find_map(|(from, to)| usable_in(from, to, family, avoid_buggy))
    }

    /// Marks `n` used; false when it was not free.
    pub(crate) fn take(&mut self, n: u128) -> bool {
        let Some((&start, &end)) = self.intervals.range(..=n).next_back() else {
            return false;
        };
        if n > end {
            return false;
        }
        self.intervals.remove(&start);
        if start < n {
            self.intervals.insert(start, n - 1);
        }
        if n < end {
            self.intervals.insert(n + 1, end);
        }
        true
    }

    /// Returns `n` to the free space, merging with its neighbours. The caller only gives
    /// back what it took, so `n` lies inside the pool and is not free yet.
    pub(crate) fn give_back(&mut self, n: u128) {
        let mut start = n;
        let mut end = n;
        if let Some((&s, &e)) = self.intervals.range(..n).next_back()
            && e.checked_add(1) == Some(n)
        {
            self.intervals.remove(&s);
            start = s;
        }
        if let Some(next) = n.checked_add(1)
            && let Some(e) = self.intervals.remove(&next)
        {
            end = e;
        }
        self.intervals.insert(start, end);
    }
}

/// The first address of `[from, to]` that may be handed out.
fn usable_in(from: u128, to: u128, family: Family, avoid_buggy: bool) -> Option<u128> {
    let mut n = from;
    while avoid_buggy && is_buggy(family, n) {
        if n == to {
            return None;
        }
        n += 1;
    }
    (n <= to).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn overlapping_and_adjacent_ranges_coalesce() {
        let f = FreeSpace::new(vec![(10, 20), (15, 30), (31, 40), (50, 50)]);
        assert_eq!(f.intervals().collect::<Vec<_>>(), vec![(10, 40), (50, 50)]);
    }

    #[test]
    fn lowest_skips_buggy_addresses_across_blocks() {
        // 10.0.0.255 and 10.0.1.0 are the only free addresses besides 10.0.1.1.
        let base = 0x0a00_0000u128;
        let f = FreeSpace::new(vec![(base + 255, base + 257)]);
        assert_eq!(f.first_from(0, Family::V4, true), Some(base + 257));
        assert_eq!(f.first_from(0, Family::V4, false), Some(base + 255));
        let only_buggy = FreeSpace::new(vec![(base + 255, base + 256)]);
        assert_eq!(only_buggy.first_from(0, Family::V4, true), None);
        assert_eq!(only_buggy.first_from(0, Family::V6, true), Some(base + 255));
    }

    #[test]
    fn the_top_of_the_v6_space_is_handled() {
        let mut f = FreeSpace::new(vec![(u128::MAX - 1, u128::MAX)]);
        assert!(f.take(u128::MAX));
        f.give_back(u128::MAX);
        assert_eq!(
            f.intervals().collect::<Vec<_>>(),
            vec![(u128::MAX - 1, u128::MAX)]
        );
    }

    proptest! {
        /// Against a plain set of addresses: same membership, same lowest, after any
        /// sequence of takes and give-backs.
        #[test]
        fn behaves_like_a_set(ops in prop::collection::vec((any::<bool>(), 0u128..64), 0..200), start in 0u128..70) {
            let mut f = FreeSpace::new(vec![(0, 20), (30, 63)]);
            let mut model: BTreeSet<u128> = (0..=20).chain(30..=63).collect();
            for (take, n) in ops {
                if take {
                    prop_assert_eq!(f.take(n), model.remove(&n));
                } else if !model.contains(&n) && (n <= 20 || n >= 30) {
                    f.give_back(n);
                    model.insert(n);
                }
                let wrapped = model.range(start..).next().or_else(|| model.first()).copied();
                prop_assert_eq!(f.first_from(start, Family::V6, false), wrapped);
                for n in 0..64 {
                    prop_assert_eq!(f.is_free(n), model.contains(&n));
                }
                let ivs: Vec<_> = f.intervals().collect();
                for w in ivs.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0, "intervals touch: {:?}", ivs);
                }
            }
        }
    }
}
