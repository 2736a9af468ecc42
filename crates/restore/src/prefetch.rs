//! Background placement, demand first: a recorded working set, then the
//! untouched pages in address order, following the latest fault, in chunks
//! that start small after a fault and grow while none comes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use livepage_runtime::Worker;

use crate::engine::Engine;
use crate::options::Prefetch;
use crate::place::How;
use crate::stats::Counters;

impl Engine {
    /// Claims up to `max` unclaimed pages from global page `g` (which must
    /// be unclaimed), within one range. Returns (range, page, count).
    pub(crate) fn claim_run(&self, g: u64, max: u64) -> Option<(usize, u64, u64)> {
        let (r, p) = self.map.locate_global(g)?;
        let end = self.map.first(r) + self.map[r].pages;
        let n = self.states.claim_run(g, end.min(g + max));
        (n > 0).then_some((r, p, n))
    }

    /// Demand first: yields while faults are being served (bounded).
    fn yield_to_demand(&self) {
        let mut spins = 0;
        while self.demand.active.load(Ordering::Acquire) > 0 && spins < 64 {
            std::thread::yield_now();
            spins += 1;
        }
    }

    /// Places a claimed run in the background and counts it.
    fn prefetch_run(&self, w: &mut Worker<Engine>, r: usize, p: u64, n: u64) {
        let (mut cx, local) = w.split(self);
        if self.place(&mut cx, local, r, p, n, How::BACKGROUND) {
            Counters::add(&self.counters.prefetched, n);
        }
    }

    /// Whether background work should pause (the source is lost) or stop.
    fn background_paused(&self) -> bool {
        if self.supply.is_lost() {
            std::thread::sleep(Duration::from_millis(1));
            return true;
        }
        false
    }

    /// Runs the prefetch policy until every page is claimed or background
    /// work is stopped.
    pub(crate) fn prefetch(&self, w: &mut Worker<Engine>, policy: &Prefetch) {
        let total = self.map.total();
        let ps = self.map.max_page_size() as u64;
        let max_pages = (self.max_chunk as u64 / ps).max(1);
        let min_pages = ((64 << 10) / ps).clamp(1, max_pages);
        let mut chunk = min_pages;
        if let Prefetch::Recorded(ws) = policy {
            let mut i = 0;
            while i < ws.pages.len() {
                if self.background_stop.load(Ordering::Relaxed) {
                    return;
                }
                if self.background_paused() {
                    continue;
                }
                w.serve_pending(self);
                // Consecutive recorded pages go as one run.
                let s = ws.pages[i];
                let mut j = i + 1;
                while j < ws.pages.len() && ws.pages[j] == ws.pages[j - 1] + 1 {
                    j += 1;
                }
                let run = (j - i) as u64;
                i = j;
                let Some(g) = self.global_of_source(s) else {
                    continue;
                };
                if self.states.is_claimed(g) {
                    continue;
                }
                if let Some((r, p, n)) = self.claim_run(g, run) {
                    self.prefetch_run(w, r, p, n);
                }
            }
        }
        let mut cursor = 0u64;
        loop {
            if self.background_stop.load(Ordering::Relaxed) {
                return;
            }
            if self.background_paused() {
                continue;
            }
            w.serve_pending(self);
            self.yield_to_demand();
            // Adapt: small chunks right after a fault, doubling while idle.
            let since = self
                .now_ns()
                .saturating_sub(self.demand.last_ns.load(Ordering::Relaxed));
            chunk = if since < 2_000_000 {
                min_pages
            } else {
                (chunk * 2).min(max_pages)
            };
            // Follow the latest fault (its neighbours are likely next), else sweep.
            let hint = self.demand.hint.swap(0, Ordering::Relaxed);
            let from = if hint > 0 && hint < total && !self.states.is_claimed(hint) {
                hint
            } else {
                match self.states.next_unclaimed(cursor) {
                    Some(g) => {
                        cursor = g;
                        g
                    }
                    None => match self.states.next_unclaimed(0) {
                        Some(g) => g,
                        None => return,
                    },
                }
            };
            if let Some((r, p, n)) = self.claim_run(from, chunk) {
                self.prefetch_run(w, r, p, n);
            }
        }
    }

    /// The global page of a source-global page, if mapped.
    fn global_of_source(&self, s: u64) -> Option<u64> {
        let region = self
            .source_offsets
            .partition_point(|o| *o <= s)
            .checked_sub(1)?;
        self.map
            .global_of_source(region, s - self.source_offsets[region])
    }
}
