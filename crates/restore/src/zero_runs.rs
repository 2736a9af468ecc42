//! Zero runs the source knows of (an image's index, a memory file's holes)
//! are left to the kernel: the range is unregistered, so a touch there gets
//! a zeroed page with no round trip.

use std::sync::atomic::Ordering;

use livepage_runtime::Worker;

use crate::engine::Engine;
use crate::place::How;
use crate::stats::Counters;

/// Each run left to the kernel splits a VMA: keep the count far from
/// `vm.max_map_count`.
const MAX_RUNS: usize = 1024;

impl Engine {
    /// Hands the large zero runs to the kernel, then says so.
    pub(crate) fn hand_zero_runs_to_kernel(&self, min_bytes: usize, w: &mut Worker<Engine>) {
        self.zero_runs_to_kernel(min_bytes, w);
        self.zero_runs_done.store(true, Ordering::Release);
    }

    fn zero_runs_to_kernel(&self, min_bytes: usize, w: &mut Worker<Engine>) {
        let (source, _) = self.supply.get();
        // The runs of every range, largest first, within the budget.
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        for (r, t) in self.map.ranges().iter().enumerate() {
            let min_pages = (min_bytes / t.page_size).max(1) as u64;
            let Some(src_runs) = source.zero_runs(t.source_region) else {
                continue;
            };
            for (s, e) in src_runs {
                // The part inside this range, in range pages.
                let s = s.max(t.source_first);
                let e = e.min(t.source_first + t.pages);
                if e >= s + min_pages {
                    runs.push((r, s - t.source_first, e - t.source_first));
                }
            }
        }
        runs.sort_by_key(|&(_, s, e)| std::cmp::Reverse(e - s));
        runs.truncate(MAX_RUNS);
        for (r, s, e) in runs {
            let t = &self.map[r];
            let mut p = s;
            while p < e {
                if self.background_stop.load(Ordering::Relaxed) {
                    return;
                }
                let g = self.map.first(r) + p;
                let Some((_, q, n)) = self.claim_run(g, e - p) else {
                    p += 1;
                    continue;
                };
                let addr = self.map.page_addr(r, q);
                let len = n as usize * t.page_size;
                if self.fds[t.fd].unregister(addr, len).is_ok() {
                    Counters::add(&self.counters.kernel_zero, n);
                    self.finish(self.map.first(r) + q, n);
                } else {
                    let (mut cx, local) = w.split(self);
                    if self.place(&mut cx, local, r, q, n, How::BACKGROUND) {
                        Counters::add(&self.counters.prefetched, n);
                    }
                }
                w.serve_pending(self);
                p = q + n;
            }
        }
    }
}
