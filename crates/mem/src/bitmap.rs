//! A lock-free bitmap with one bit per page.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page, set and cleared atomically from many threads.
#[derive(Debug)]
pub struct PageBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
}

impl PageBitmap {
    /// A cleared bitmap for `pages` pages.
    pub fn new(pages: usize) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        PageBitmap { words, pages }
    }

    /// A copy of what is set now.
    pub fn snapshot(&self) -> Self {
        self.map_words(|w, _| w)
    }

    /// The pages clear here set, and the other way round.
    pub fn inverted(&self) -> Self {
        self.map_words(|w, _| !w)
    }

    /// The pages set both here and in `other` (same length).
    pub fn and(&self, other: &PageBitmap) -> Self {
        self.map_words(|w, i| w & other.words.get(i).map_or(0, |o| o.load(Ordering::Acquire)))
    }

    /// A bitmap of the same length whose word `i` is `f(word i, i)`, the
    /// bits past the end kept clear.
    fn map_words(&self, f: impl Fn(u64, usize) -> u64) -> Self {
        let n = self.words.len();
        let words = self
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut v = f(w.load(Ordering::Acquire), i);
                if i + 1 == n && self.pages % 64 != 0 {
                    v &= (1u64 << (self.pages % 64)) - 1;
                }
                AtomicU64::new(v)
            })
            .collect();
        PageBitmap {
            words,
            pages: self.pages,
        }
    }

    /// Number of pages covered.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether the bitmap covers no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Whether `page` is set (false when out of range).
    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Sets `page`; returns true if this call changed it (false if it was already
    /// set or out of range). Exactly one of several racing setters gets true.
    pub fn set(&self, page: usize) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1 << (page % 64);
        self.words[page / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Clears `page`; returns true if it was set.
    pub fn clear(&self, page: usize) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1 << (page % 64);
        self.words[page / 64].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Sets every page in `[start, end)` (clamped to the bitmap), a word at a time.
    pub fn set_range(&self, start: usize, end: usize) {
        self.update_range(start, end, true);
    }

    /// Clears every page in `[start, end)` (clamped to the bitmap), a word at a time.
    pub fn clear_range(&self, start: usize, end: usize) {
        self.update_range(start, end, false);
    }

    fn update_range(&self, start: usize, end: usize, set: bool) {
        let end = end.min(self.pages);
        let mut p = start;
        while p < end {
            let lo = p % 64;
            let n = (64 - lo).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            let w = &self.words[p / 64];
            if set {
                w.fetch_or(mask, Ordering::AcqRel);
            } else {
                w.fetch_and(!mask, Ordering::AcqRel);
            }
            p += n;
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }

    /// The first clear page at or after `from`, if any.
    pub fn next_clear(&self, from: usize) -> Option<usize> {
        let mut p = from;
        while p < self.pages {
            let w = self.words[p / 64].load(Ordering::Acquire) | ((1u64 << (p % 64)) - 1);
            if w != u64::MAX {
                let q = (p / 64) * 64 + (!w).trailing_zeros() as usize;
                return (q < self.pages).then_some(q);
            }
            p = (p / 64 + 1) * 64;
        }
        None
    }

    /// The first set page at or after `from`, if any (skips clear words).
    pub fn next_set(&self, from: usize) -> Option<usize> {
        let mut p = from;
        while p < self.pages {
            let w = self.words[p / 64].load(Ordering::Acquire) & !((1u64 << (p % 64)) - 1);
            if w != 0 {
                let q = (p / 64) * 64 + w.trailing_zeros() as usize;
                return (q < self.pages).then_some(q);
            }
            p = (p / 64 + 1) * 64;
        }
        None
    }

    /// Clears every set page and returns them, in order. Skips clear words, so
    /// the cost is one atomic per 64 pages plus one per set page.
    pub fn take_set(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let bits = w.swap(0, Ordering::AcqRel);
            let mut b = bits;
            while b != 0 {
                let t = b.trailing_zeros() as usize;
                out.push(i * 64 + t);
                b &= b - 1;
            }
        }
        out
    }

    /// Set pages as maximal runs `[start, end)` (skips clear and full words).
    pub fn runs(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut p = 0;
        while let Some(s) = self.next_set(p) {
            let e = self.next_clear(s).unwrap_or(self.pages);
            out.push((s, e));
            p = e;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn inverted_and_and_keep_the_tail_clear() {
        let a = PageBitmap::new(70);
        a.set(3);
        a.set(69);
        let b = a.inverted();
        assert_eq!(b.count(), 68);
        assert!(!b.get(3) && !b.get(69) && b.get(68));
        let c = a.snapshot();
        c.set(10);
        assert_eq!(b.and(&c).runs(), vec![(10, 11)]);
        assert_eq!(a.count(), 2);
    }

    #[test]
    fn edges() {
        let b = PageBitmap::new(0);
        assert!(!b.set(0));
        assert_eq!(b.next_clear(0), None);
        let b = PageBitmap::new(65);
        assert!(b.set(64));
        assert!(!b.set(64));
        assert!(!b.set(65));
        assert_eq!(b.count(), 1);
        b.set_range(0, 64);
        assert_eq!(b.next_clear(0), None);
        assert!(b.clear(3));
        assert_eq!(b.next_clear(0), Some(3));
        assert_eq!(b.runs(), vec![(0, 3), (4, 65)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_vec_bool_oracle(pages in 0usize..300, ops in proptest::collection::vec((any::<bool>(), 0usize..320), 0..200),
                ranges in proptest::collection::vec((any::<bool>(), 0usize..320, 0usize..200), 0..8)) {
            let b = PageBitmap::new(pages);
            let mut oracle = vec![false; pages];
            for (set, p) in ops {
                let changed = if set { b.set(p) } else { b.clear(p) };
                if p < pages {
                    prop_assert_eq!(changed, oracle[p] != set);
                    oracle[p] = set;
                } else {
                    prop_assert!(!changed);
                }
            }
            for (set, a, n) in ranges {
                if set { b.set_range(a, a + n) } else { b.clear_range(a, a + n) }
                for o in oracle.iter_mut().take((a + n).min(pages)).skip(a) {
                    *o = set;
                }
            }
            prop_assert_eq!(b.count(), oracle.iter().filter(|x| **x).count());
            for from in 0..pages + 2 {
                let want = (from..pages).find(|&p| !oracle[p]);
                prop_assert_eq!(b.next_clear(from), want);
                let want = (from..pages).find(|&p| oracle[p]);
                prop_assert_eq!(b.next_set(from), want);
            }
            let mut runs_oracle = Vec::new();
            let mut p = 0;
            while p < pages {
                if oracle[p] {
                    let s = p;
                    while p < pages && oracle[p] { p += 1; }
                    runs_oracle.push((s, p));
                } else { p += 1; }
            }
            prop_assert_eq!(b.runs(), runs_oracle);
            let taken = b.take_set();
            let want: Vec<usize> = (0..pages).filter(|&p| oracle[p]).collect();
            prop_assert_eq!(taken, want);
            prop_assert_eq!(b.count(), 0);
        }
    }
}
