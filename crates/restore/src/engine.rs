//! The state every thread of one restore shares, and the operations that
//! touch all of it: accounting, discards, failing closed, statistics.
//! Placement is in `place.rs`, fault handling in `handler.rs`, background
//! work in `prefetch.rs` and `zero_runs.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livepage_uffd::{Event, Uffd};

use crate::error::RestoreError;
use crate::map::AddressMap;
use crate::options::{Mode, Notice, NoticeReporter};
use crate::states::PageStates;
use crate::stats::{Counters, RestoreStats, log2_buckets, quantile_us};
use crate::supply::Supply;
use crate::watchdog::{Slot, Slots};
use crate::working_set::WorkingSet;

/// Fault-service latencies and first touches, merged from each thread's
/// own lists when the thread ends.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub(crate) touches_on: bool,
    pub(crate) latencies: Mutex<Vec<u64>>,
    pub(crate) touches: Mutex<Vec<(u64, u64)>>,
    /// Live log2-µs histogram of demand-fault service times.
    live: [AtomicU64; 24],
}

impl Recorder {
    pub(crate) fn new(touches_on: bool) -> Recorder {
        Recorder {
            touches_on,
            ..Recorder::default()
        }
    }

    /// Counts one demand fault served in `ns`.
    pub(crate) fn observe(&self, ns: u64) {
        let b = (64 - (ns / 1000).leading_zeros()) as usize;
        self.live[b.min(23)].fetch_add(1, Ordering::Relaxed);
    }

    /// The live histogram's counts.
    pub(crate) fn live_buckets(&self) -> Vec<u64> {
        self.live
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// Where demand is: the prefetcher yields to it and follows it.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    /// Faults being served right now.
    pub(crate) active: AtomicU64,
    /// When the latest fault came (ns since the epoch).
    pub(crate) last_ns: AtomicU64,
    /// The page after the latest fault (global + 1; 0: none).
    pub(crate) hint: AtomicU64,
}

/// One restore's shared state; the runtime's [`livepage_runtime::Policy`].
pub(crate) struct Engine {
    pub(crate) fds: Vec<Uffd>,
    /// Held across each read of events and its dispatch: a discard read by
    /// one thread is recorded before another reads the faults that follow
    /// it (the discarding thread runs on as soon as its event is read).
    pub(crate) read_lock: Mutex<()>,
    /// Held while a done page missing from the page cache is filled again
    /// (minor mode): two duplicate fault messages must not both fill it.
    pub(crate) refill_lock: Mutex<()>,
    pub(crate) map: AddressMap,
    pub(crate) states: PageStates,
    pub(crate) mode: Mode,
    pub(crate) supply: Supply,
    /// The kernel has UFFDIO_POISON (else failing closed unregisters).
    pub(crate) poison: bool,
    pub(crate) counters: Counters,
    pub(crate) error: Mutex<Option<RestoreError>>,
    /// Background work (prefetch, zero runs) stops.
    pub(crate) background_stop: AtomicBool,
    pub(crate) failed: AtomicBool,
    pub(crate) demand: Demand,
    pub(crate) epoch: Instant,
    pub(crate) resident_ns: AtomicU64,
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) slots: Arc<Slots>,
    pub(crate) max_chunk: usize,
    pub(crate) zero_runs_done: AtomicBool,
    pub(crate) notice: Option<NoticeReporter>,
    pub(crate) handlers: usize,
    /// First source-global page of each source region (working sets
    /// number the source's pages end to end).
    pub(crate) source_offsets: Vec<u64>,
}

/// What one thread keeps for itself.
pub(crate) struct Local {
    /// Its watchdog slot.
    pub(crate) slot: Option<SlotRef>,
    /// Pages read from the source.
    pub(crate) buf: Vec<u8>,
    /// Ranges resolved with DONTWAKE: (fd, start, len).
    pub(crate) wakes: Vec<(usize, usize, usize)>,
    /// Faults left to another placer: (fd, global page), re-checked until done.
    pub(crate) waiting: Vec<(usize, u64)>,
    pub(crate) latencies: Vec<u64>,
    pub(crate) touches: Vec<(u64, u64)>,
    recorder: Arc<Recorder>,
}

/// A watchdog slot held by one thread.
pub(crate) struct SlotRef {
    pub(crate) slots: Arc<Slots>,
    pub(crate) index: usize,
}

impl SlotRef {
    pub(crate) fn get(&self) -> &Slot {
        &self.slots.slots[self.index]
    }
}

impl Drop for SlotRef {
    fn drop(&mut self) {
        self.slots.release(self.index);
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Ok(mut l) = self.recorder.latencies.lock() {
            l.append(&mut self.latencies);
        }
        if let Ok(mut t) = self.recorder.touches.lock() {
            t.append(&mut self.touches);
        }
    }
}

impl Engine {
    pub(crate) fn new_local(&self) -> Local {
        Local {
            slot: self.slots.acquire().map(|index| SlotRef {
                slots: self.slots.clone(),
                index,
            }),
            buf: vec![0u8; self.max_chunk],
            wakes: Vec::with_capacity(64),
            waiting: Vec::new(),
            latencies: Vec::with_capacity(4096),
            touches: Vec::new(),
            recorder: self.recorder.clone(),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    pub(crate) fn tell(&self, n: Notice) {
        if let Some(f) = &self.notice {
            f(&n);
        }
    }

    pub(crate) fn set_error(&self, e: RestoreError) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    /// Marks pages done and notes when the last one is.
    pub(crate) fn finish(&self, g: u64, n: u64) {
        self.states.finish(g, n);
        self.note_progress();
    }

    pub(crate) fn note_progress(&self) {
        if self.states.all_done() {
            let _ = self.resident_ns.compare_exchange(
                0,
                self.now_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// The source-global page of page `p` of range `r`.
    pub(crate) fn source_global(&self, r: usize, p: u64) -> u64 {
        let t = &self.map[r];
        self.source_offsets[t.source_region] + t.source_first + p
    }

    /// Fails closed: poisons every page not yet placed (whoever touches one
    /// gets SIGBUS at once, nobody waits forever) and wakes what was parked.
    pub(crate) fn fail_closed(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.background_stop.store(true, Ordering::SeqCst);
        for (r, t) in self.map.ranges().iter().enumerate() {
            let first = self.map.first(r);
            let mut p = 0;
            while p < t.pages {
                if self.states.is_done(first + p) {
                    p += 1;
                    continue;
                }
                let mut e = p;
                while e < t.pages && !self.states.is_done(first + e) {
                    self.states.claim(first + e);
                    e += 1;
                }
                let addr = self.map.page_addr(r, p);
                let len = (e - p) as usize * t.page_size;
                let uffd = &self.fds[t.fd];
                if self.poison {
                    // Reads a pending discard itself: this may be the only reader.
                    let _ = uffd.poison_holes(addr, len, t.page_size, |ev| {
                        if let Event::Remove { start, end } = ev {
                            self.on_remove(start, end);
                        }
                    });
                } else {
                    // No UFFDIO_POISON (Linux < 6.6): unregister so nobody hangs.
                    let _ = uffd.unregister(addr, len);
                }
                Counters::add(&self.counters.lost, e - p);
                self.finish(first + p, e - p);
                p = e;
            }
        }
        for (fd, addr, len) in self.supply.take_parked() {
            let _ = self.fds[fd].wake(addr, len);
        }
    }

    /// Calls `f(range, first page, end page)` for each range's part of the
    /// address span `[start, end)`.
    fn for_each_part(&self, start: u64, end: u64, mut f: impl FnMut(usize, u64, u64)) {
        let mut a = start;
        while a < end {
            let Some((r, p)) = self.map.locate(a) else {
                match self.map.next_start(a) {
                    Some(next) if next < end => a = next,
                    _ => break,
                }
                continue;
            };
            let t = &self.map[r];
            let last = ((end - t.addr).div_ceil(t.page_size as u64)).min(t.pages);
            f(r, p, last);
            a = t.addr + last * t.page_size as u64;
        }
    }

    /// A REMOVE: the range reads as zeros from now on. Pages never placed
    /// are done (zeros when first touched).
    pub(crate) fn on_remove(&self, start: u64, end: u64) {
        self.for_each_part(start, end, |r, p, last| {
            let g = self.map.first(r);
            let zeroed = self.states.discard(g + p, g + last);
            Counters::add(&self.counters.zero, zeroed);
            Counters::add(&self.counters.discarded, last - p);
        });
        self.note_progress();
    }

    /// An UNMAP: the range is gone; nothing is left to place there.
    pub(crate) fn on_unmap(&self, start: u64, end: u64) {
        self.for_each_part(start, end, |r, p, last| {
            let g = self.map.first(r);
            for q in p..last {
                if self.states.claim(g + q) {
                    self.finish(g + q, 1);
                }
            }
        });
    }

    /// Declares source pages `[first, first+count)` of `region` resident:
    /// done without being fetched. Returns how many were missing.
    pub(crate) fn mark_resident(&self, region: usize, first: u64, count: u64) -> u64 {
        let mut n = 0;
        for (r, t) in self.map.ranges().iter().enumerate() {
            if t.source_region != region {
                continue;
            }
            let a = first.max(t.source_first);
            let b = first.saturating_add(count).min(t.source_first + t.pages);
            if b > a {
                n += self
                    .states
                    .resident(self.map.first(r) + a - t.source_first, b - a);
            }
        }
        Counters::add(&self.counters.resident, n);
        self.note_progress();
        n
    }

    /// The statistics so far.
    pub(crate) fn stats(&self) -> RestoreStats {
        let mut lat = self
            .recorder
            .latencies
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        lat.sort_unstable();
        let working_set = self.recorder.touches_on.then(|| {
            let mut t = self
                .recorder
                .touches
                .lock()
                .map(|t| t.clone())
                .unwrap_or_default();
            t.sort_unstable();
            WorkingSet {
                total_pages: self.source_offsets.last().copied().unwrap_or(0),
                pages: t.into_iter().map(|(_, g)| g).collect(),
            }
        });
        let c = &self.counters;
        RestoreStats {
            mode: self.mode,
            handlers: self.handlers,
            uffds: self.fds.len(),
            pages: self.map.total(),
            resident: Counters::get(&c.resident),
            faults_served: Counters::get(&c.faults),
            prefetched: Counters::get(&c.prefetched),
            pushed: Counters::get(&c.pushed),
            zero_filled: Counters::get(&c.zero),
            left_to_kernel: Counters::get(&c.kernel_zero),
            discarded: Counters::get(&c.discarded),
            lost: Counters::get(&c.lost),
            outside_faults: Counters::get(&c.outside),
            source_replacements: Counters::get(&c.replacements),
            until_resident_ms: self.resident_ns.load(Ordering::Relaxed) as f64 / 1e6,
            fault_p50_us: quantile_us(&lat, 0.5),
            fault_p99_us: quantile_us(&lat, 0.99),
            fault_max_us: quantile_us(&lat, 1.0),
            fault_total_ms: lat.iter().sum::<u64>() as f64 / 1e6,
            histogram: log2_buckets(&lat),
            stalls: self.slots.stalls(),
            working_set,
        }
    }

    /// Blocks until the zero runs went to the kernel (or the restore failed).
    pub(crate) fn await_zero_runs(&self) {
        while !self.zero_runs_done.load(Ordering::Acquire) && !self.failed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
