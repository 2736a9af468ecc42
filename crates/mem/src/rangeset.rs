//! A set of disjoint half-open `u64` ranges, merged on insert.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent `[start, end)` ranges keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[start, end)`, merging with overlapping or adjacent ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Ranges mostly come in order (a bitmap's runs, a scan): appending
        // after the last one needs neither a search nor an allocation.
        match self.map.last_key_value() {
            None => {
                self.map.insert(start, end);
                return;
            }
            Some((&ls, &le)) if ls <= start && le >= start => {
                if end > le {
                    self.map.insert(ls, end);
                }
                return;
            }
            Some((_, &le)) if le < start => {
                self.map.insert(start, end);
                return;
            }
            _ => {}
        }
        let (mut s, mut e) = (start, end);
        // A range starting at or before `start` that reaches it.
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let absorbed: Vec<u64> = self.map.range(s..=e).map(|(&k, _)| k).collect();
        for k in absorbed {
            if let Some(v) = self.map.remove(&k) {
                e = e.max(v);
            }
        }
        self.map.insert(s, e);
    }

    /// Removes `[start, end)`, splitting ranges as needed.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let touched: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touched {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start);
            }
            if e > end {
                self.map.insert(end, e);
            }
        }
    }

    /// Whether `x` lies in a range.
    pub fn contains(&self, x: u64) -> bool {
        self.map
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| x < e)
    }

    /// Whether `[start, end)` is wholly covered.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .map
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| end <= e)
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total length covered.
    pub fn total(&self) -> u64 {
        self.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        #[test]
        fn matches_per_unit_oracle(ops in proptest::collection::vec((any::<bool>(), 0u64..100, 0u64..30), 0..60)) {
            let mut set = RangeSet::new();
            let mut oracle = [false; 140];
            for (ins, s, l) in ops {
                if ins { set.insert(s, s + l) } else { set.remove(s, s + l) }
                for x in s..s + l { oracle[x as usize] = ins; }
            }
            for x in 0..140u64 {
                prop_assert_eq!(set.contains(x), oracle[x as usize]);
            }
            // Canonical form: sorted, disjoint and not adjacent.
            let v: Vec<_> = set.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
            prop_assert_eq!(set.total(), oracle.iter().filter(|b| **b).count() as u64);
            for s in 0..130u64 {
                let want = (s..s + 10).all(|x| oracle[x as usize]);
                prop_assert_eq!(set.covers(s, s + 10), want);
            }
        }
    }
}
