//! The page-state core of a restore, free of the kernel: which pages are
//! missing, being placed, done, discarded. Every placer (fault handlers,
//! the prefetcher, pushed pages, the zero-run task, `wait`) goes through it,
//! so each page is placed once.
//!
//! A page is **missing** until someone *claims* it; the claimer places it
//! and marks it **done** (or *releases* it, when the source is lost and
//! the placement is given up). Pages already correct in memory are
//! **resident**: done from the start, never fetched. A **discard** (a
//! REMOVE event) records the pages as zeros from now on; pages nobody
//! claimed yet become done at once (they read as zeros when touched), and
//! a placer must not install data it read before the discard.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livepage_mem::{PageBitmap, RangeSet};

/// Claim and done bits per page, the discarded pages, and a count of done
/// pages. Page numbers are global (the restore's own numbering).
#[derive(Debug)]
pub struct PageStates {
    claimed: PageBitmap,
    done: PageBitmap,
    done_count: AtomicU64,
    total: u64,
    discarded: Mutex<RangeSet>,
    any_discarded: AtomicBool,
}

impl PageStates {
    /// `total` missing pages.
    pub fn new(total: u64) -> PageStates {
        PageStates {
            claimed: PageBitmap::new(total as usize),
            done: PageBitmap::new(total as usize),
            done_count: AtomicU64::new(0),
            total,
            discarded: Mutex::new(RangeSet::new()),
            any_discarded: AtomicBool::new(false),
        }
    }

    /// Pages done.
    pub fn done_count(&self) -> u64 {
        self.done_count.load(Ordering::Acquire)
    }

    /// Whether every page is done.
    pub fn all_done(&self) -> bool {
        self.done_count() >= self.total
    }

    /// Claims page `g`: true for exactly one of several racing claimers,
    /// false if it was claimed (or is done) already or is out of range.
    pub fn claim(&self, g: u64) -> bool {
        self.claimed.set(g as usize)
    }

    /// Claims `g` and the pages after it up to `limit` (exclusive), stopping
    /// at the first page claimed by someone else. Returns how many were
    /// claimed (0 if `g` itself was taken).
    pub fn claim_run(&self, g: u64, limit: u64) -> u64 {
        let limit = limit.min(self.total);
        let mut n = 0;
        while g + n < limit && self.claimed.set((g + n) as usize) {
            n += 1;
        }
        n
    }

    /// Gives claimed, unplaced pages back (their placement was given up):
    /// they are missing again.
    pub fn release(&self, g: u64, n: u64) {
        for p in g..(g + n).min(self.total) {
            if !self.done.get(p as usize) {
                self.claimed.clear(p as usize);
            }
        }
    }

    /// Marks claimed pages done; returns how many were not done before.
    pub fn finish(&self, g: u64, n: u64) -> u64 {
        let mut added = 0;
        for p in g..(g + n).min(self.total) {
            self.claimed.set(p as usize);
            if self.done.set(p as usize) {
                added += 1;
            }
        }
        self.done_count.fetch_add(added, Ordering::AcqRel);
        added
    }

    /// Marks pages already correct in memory: done without being placed.
    /// Returns how many were missing (pages claimed or done are left alone).
    pub fn resident(&self, g: u64, n: u64) -> u64 {
        let mut added = 0;
        for p in g..(g + n).min(self.total) {
            if self.claimed.set(p as usize) && self.done.set(p as usize) {
                added += 1;
            }
        }
        self.done_count.fetch_add(added, Ordering::AcqRel);
        added
    }

    /// Whether page `g` is claimed (being placed, or done).
    pub fn is_claimed(&self, g: u64) -> bool {
        self.claimed.get(g as usize)
    }

    /// Whether page `g` is done.
    pub fn is_done(&self, g: u64) -> bool {
        self.done.get(g as usize)
    }

    /// The first unclaimed page at or after `from`.
    pub fn next_unclaimed(&self, from: u64) -> Option<u64> {
        self.claimed.next_clear(from as usize).map(|g| g as u64)
    }

    /// Records a discard of pages `[g0, g1)`: they read as zeros from now
    /// on. Pages nobody claimed become done (zeros when touched); returns
    /// how many did.
    pub fn discard(&self, g0: u64, g1: u64) -> u64 {
        let g1 = g1.min(self.total);
        if g0 >= g1 {
            return 0;
        }
        if let Ok(mut d) = self.discarded.lock() {
            d.insert(g0, g1);
        }
        self.any_discarded.store(true, Ordering::Release);
        let mut zeroed = 0;
        for p in g0..g1 {
            if self.claimed.set(p as usize) && self.done.set(p as usize) {
                zeroed += 1;
            }
        }
        self.done_count.fetch_add(zeroed, Ordering::AcqRel);
        zeroed
    }

    /// Whether pages `[g, g+n)` were discarded: (all of them, any of them).
    pub fn discarded_in(&self, g: u64, n: u64) -> (bool, bool) {
        if !self.any_discarded.load(Ordering::Acquire) {
            return (false, false);
        }
        let Ok(d) = self.discarded.lock() else {
            return (false, false);
        };
        let all = d.covers(g, g + n);
        let any = all || d.iter().any(|(s, e)| s < g + n && e > g);
        (all, any)
    }

    /// The pages of `[g, g+n)` that were discarded, in order.
    pub fn discarded_pages(&self, g: u64, n: u64) -> Vec<u64> {
        if !self.discarded_in(g, n).1 {
            return Vec::new();
        }
        match self.discarded.lock() {
            Ok(d) => (g..g + n).filter(|p| d.contains(*p)).collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lifecycle_of_a_page() {
        let s = PageStates::new(8);
        assert!(s.claim(2));
        assert!(!s.claim(2), "a page is claimed once");
        assert!(!s.is_done(2));
        s.release(2, 1);
        assert!(s.claim(2), "a released page is missing again");
        assert_eq!(s.finish(2, 1), 1);
        s.release(2, 1);
        assert!(
            s.is_claimed(2) && s.is_done(2),
            "a done page is never released"
        );
        assert_eq!(s.resident(0, 4), 3, "page 2 was done already");
        assert_eq!(s.done_count(), 4);
        assert_eq!(s.next_unclaimed(0), Some(4));
        assert_eq!(s.claim_run(4, 7), 3);
        assert_eq!(s.claim_run(4, 8), 0);
        assert_eq!(s.discard(5, 100), 1, "only page 7 was unclaimed");
        assert_eq!(s.discarded_in(5, 3), (true, true));
        assert_eq!(s.discarded_in(4, 2), (false, true));
        assert_eq!(s.discarded_pages(3, 4), vec![5, 6]);
        assert_eq!(s.finish(4, 3), 3);
        assert!(s.all_done());
        assert!(!s.claim(100), "out of range");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim(u64, u64),
        Finish,
        Release,
        Resident(u64, u64),
        Discard(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..70, 1u64..9).prop_map(|(g, n)| Op::Claim(g, n)),
            Just(Op::Finish),
            Just(Op::Release),
            (0u64..70, 1u64..9).prop_map(|(g, n)| Op::Resident(g, n)),
            (0u64..70, 1u64..9).prop_map(|(g, n)| Op::Discard(g, g + n)),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Model {
        Missing,
        Claimed,
        Done,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Against a per-page model: claims succeed only on missing pages,
        /// discards make missing pages done, released pages are missing
        /// again, and the done count is exact.
        #[test]
        fn matches_a_per_page_model(ops in proptest::collection::vec(op(), 0..80)) {
            let total = 64u64;
            let s = PageStates::new(total);
            let mut m = vec![Model::Missing; total as usize];
            let mut discarded = vec![false; total as usize];
            // Runs this "placer" holds, placed or given back in order.
            let mut held: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Claim(g, n) => {
                        let got = s.claim_run(g, g + n);
                        let want = (g..(g + n).min(total)).take_while(|p| m[*p as usize] == Model::Missing).count() as u64;
                        prop_assert_eq!(got, want);
                        for p in g..g + got { m[p as usize] = Model::Claimed; }
                        if got > 0 { held.push((g, got)); }
                    }
                    Op::Finish => if let Some((g, n)) = held.pop() {
                        let want = (g..g + n).filter(|p| m[*p as usize] != Model::Done).count() as u64;
                        prop_assert_eq!(s.finish(g, n), want);
                        for p in g..g + n { m[p as usize] = Model::Done; }
                    },
                    Op::Release => if let Some((g, n)) = held.pop() {
                        s.release(g, n);
                        for p in g..g + n {
                            if m[p as usize] == Model::Claimed { m[p as usize] = Model::Missing; }
                        }
                    },
                    Op::Resident(g, n) => {
                        let want = (g..(g + n).min(total)).filter(|p| m[*p as usize] == Model::Missing).count() as u64;
                        prop_assert_eq!(s.resident(g, n), want);
                        for p in g..(g + n).min(total) {
                            if m[p as usize] == Model::Missing { m[p as usize] = Model::Done; }
                        }
                    }
                    Op::Discard(g0, g1) => {
                        let want = (g0..g1.min(total)).filter(|p| m[*p as usize] == Model::Missing).count() as u64;
                        prop_assert_eq!(s.discard(g0, g1), want);
                        for p in g0..g1.min(total) {
                            discarded[p as usize] = true;
                            if m[p as usize] == Model::Missing { m[p as usize] = Model::Done; }
                        }
                    }
                }
                for p in 0..total {
                    let st = m[p as usize];
                    prop_assert_eq!(s.is_claimed(p), st != Model::Missing);
                    prop_assert_eq!(s.is_done(p), st == Model::Done);
                }
                prop_assert_eq!(s.done_count(), m.iter().filter(|x| **x == Model::Done).count() as u64);
                prop_assert_eq!(s.next_unclaimed(0), m.iter().position(|x| *x == Model::Missing).map(|p| p as u64));
                for g in (0..total).step_by(5) {
                    let run: Vec<bool> = (g..(g + 5).min(total)).map(|p| discarded[p as usize]).collect();
                    prop_assert_eq!(s.discarded_in(g, run.len() as u64), (run.iter().all(|d| *d), run.iter().any(|d| *d)));
                }
            }
        }
    }

    /// Placers racing over the same pages: every page is claimed exactly
    /// once, and the done count ends at the total.
    #[test]
    fn racing_claimers_place_each_page_once() {
        let s = std::sync::Arc::new(PageStates::new(100_000));
        let claimed: Vec<u64> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4u64)
                .map(|t| {
                    let s = s.clone();
                    sc.spawn(move || {
                        let mut mine = 0;
                        let mut g = t * 7919 % 100_000;
                        while let Some(next) = s.next_unclaimed(g).or_else(|| s.next_unclaimed(0)) {
                            let n = s.claim_run(next, next + 1 + t * 3);
                            s.finish(next, n);
                            mine += n;
                            g = next;
                        }
                        mine
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(claimed.iter().sum::<u64>(), 100_000);
        assert!(s.all_done());
    }
}
