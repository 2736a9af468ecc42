//! Lazy restore: a restored region is usable at once; a page arrives when it
//! is first touched while a background prefetcher fills the rest, demand
//! first.
//!
//! - **Missing mode** (any memory): a fault is resolved with UFFDIO_COPY, or
//!   UFFDIO_ZEROPAGE for a zero page.
//! - **Minor mode** (shmem, hugetlbfs): pages are written into the page cache
//!   through the region's second, unregistered mapping and mapped with
//!   UFFDIO_CONTINUE. The region is registered MISSING|MINOR: a page whose
//!   page cache is still a hole faults as missing and is filled the same way.
//! - Large zero runs the source knows of (an image's index) are not
//!   registered at all: the kernel serves them with no round trip.
//!
//! Every page is placed once: a claim bit per page decides between the
//! handlers and the prefetcher; a fault on a page someone else is placing is
//! left to that placer's ioctl, which wakes it. Handlers resolve a batch of
//! faults with DONTWAKE and wake merged ranges after. EEXIST is success
//! followed by a wake; EAGAIN (an event is pending) makes the placer read the
//! events first. REMOVE events are honoured: a discarded page is answered
//! with zeros afterwards, never with stale image data.
//!
//! Failing closed: a page the source cannot give is poisoned (SIGBUS for the
//! toucher, at once); a source that is gone, or a handler thread that
//! panics, poisons every page not yet placed; a watchdog reports placements
//! that take too long. A `Restore` dropped before [`Restore::wait`] does the
//! same: untouched pages fault with SIGBUS, never with zeros.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod firecracker;
mod le;
mod source;
pub mod tcp;
mod wset;

pub use source::{ChainSource, MemorySource, PageSource, RawFileSource, SourceError, SourceRegion};
pub use wset::{WorkingSet, WorkingSetError};

use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, PageBitmap, RangeSet, Region, RegionError, RegionTable};
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::{
    CopyMode, CreateError, Errno, Event, EventBuffer, Features, PageFault, RangeError,
    RegisterMode, Resolved, Uffd, UffdBuilder,
};
use serde::Serialize;

/// How faults are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// MISSING faults, UFFDIO_COPY / UFFDIO_ZEROPAGE (any memory).
    #[default]
    Missing,
    /// Page cache filled through the alias mapping, UFFDIO_CONTINUE (shmem, hugetlbfs).
    Minor,
}

/// What the background prefetcher does.
#[derive(Debug, Clone, Default)]
pub enum Prefetch {
    /// Nothing: only demand faults place pages (until [`Restore::wait`]).
    None,
    /// Untouched pages in address order, following the latest fault.
    #[default]
    Sequential,
    /// A recorded working set first, then as `Sequential`.
    Recorded(WorkingSet),
}

/// A placement the watchdog found slow.
#[derive(Debug, Clone, Serialize)]
pub struct Stall {
    /// Start of the run being placed.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// How long it had been outstanding when reported.
    pub waited_ms: u64,
    /// Which worker (handler index, or "prefetcher").
    pub worker: String,
}

/// A callback for stalls (e.g. print a warning).
pub type StallReporter = Arc<dyn Fn(&Stall) + Send + Sync>;

/// Options.
#[derive(Clone)]
pub struct RestoreOptions {
    /// Missing or minor mode.
    pub mode: Mode,
    /// Fault handler threads (at least one per userfaultfd).
    pub handlers: usize,
    /// Userfaultfds: each region is cut into this many slices, one per fd.
    pub uffds: usize,
    /// Background prefetch policy.
    pub prefetch: Prefetch,
    /// Record the order pages are first faulted (see [`RestoreStats::working_set`]).
    pub record_working_set: bool,
    /// Leave zero runs of at least this many bytes unregistered (the kernel
    /// fills them); `None` registers everything.
    pub zero_runs_to_kernel: Option<usize>,
    /// Largest prefetch chunk in bytes (chunks start small after a fault and
    /// double while no fault comes).
    pub max_chunk: usize,
    /// Report placements outstanding for longer than this.
    pub watchdog: Duration,
    /// Called for each stall (besides being listed in the statistics).
    pub on_stall: Option<StallReporter>,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("mode", &self.mode)
            .field("handlers", &self.handlers)
            .field("uffds", &self.uffds)
            .field("prefetch", &self.prefetch)
            .field("max_chunk", &self.max_chunk)
            .field("watchdog", &self.watchdog)
            .finish_non_exhaustive()
    }
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            mode: Mode::Missing,
            handlers: 1,
            uffds: 1,
            prefetch: Prefetch::Sequential,
            record_working_set: false,
            zero_runs_to_kernel: Some(2 << 20),
            max_chunk: 4 << 20,
            watchdog: Duration::from_secs(2),
            on_stall: None,
        }
    }
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// No userfaultfd.
    #[error("cannot create the restore userfaultfd")]
    Uffd(#[from] CreateError),
    /// Registration failed.
    #[error("registering a region for lazy restore failed")]
    Region(#[from] RegionError),
    /// A resolving ioctl failed.
    #[error("placing a page failed")]
    Kernel(#[from] RangeError),
    /// The regions do not match the source, or the mode does not fit the memory.
    #[error("{0}")]
    Mismatch(String),
    /// The source failed; the pages it could not give were poisoned.
    #[error(
        "the page source failed for {pages} page(s); they were poisoned (SIGBUS on access): {first}"
    )]
    Source {
        /// Pages lost.
        pages: u64,
        /// The first error.
        first: SourceError,
    },
    /// A handler thread panicked; pages not yet placed were poisoned.
    #[error("a fault handler thread died ({0}); pages not yet placed were poisoned")]
    HandlerDied(String),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// One bucket of the fault-latency histogram.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bucket {
    /// Upper bound (exclusive) in µs.
    pub below_us: u64,
    /// Faults in the bucket.
    pub count: u64,
}

/// Statistics of a finished restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreStats {
    /// Missing or minor.
    pub mode: Mode,
    /// Handler threads.
    pub handlers: usize,
    /// Userfaultfds.
    pub uffds: usize,
    /// Total pages.
    pub pages: u64,
    /// Faults that placed a page.
    pub faults_served: u64,
    /// Pages placed by the prefetcher (or by `wait`).
    pub prefetched: u64,
    /// Pages answered with zeros (zero in the source, or discarded).
    pub zero_filled: u64,
    /// Pages in zero runs left to the kernel (never registered).
    pub left_to_kernel: u64,
    /// Pages discarded (REMOVE events) during the restore.
    pub discarded: u64,
    /// Pages lost to source errors (poisoned).
    pub lost: u64,
    /// Milliseconds from start until every page was resident.
    pub until_resident_ms: f64,
    /// Demand-fault service time p50 (µs, read to resolved).
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
    /// Demand-fault service times, log2 buckets.
    pub histogram: Vec<Bucket>,
    /// Placements the watchdog reported.
    pub stalls: Vec<Stall>,
    /// Pages in first-fault order (when recording).
    #[serde(skip)]
    pub working_set: Option<WorkingSet>,
}

/// A watchdog slot: what one worker is placing, since when.
#[derive(Default)]
struct Slot {
    since_ns: AtomicU64,
    addr: AtomicU64,
    len: AtomicU64,
    reported: AtomicBool,
}

struct Shared {
    uffds: Vec<Uffd>,
    mode: Mode,
    regions: RegionTable,
    /// Pages per userfaultfd slice, per region.
    slice_pages: Vec<u64>,
    claimed: PageBitmap,
    done: PageBitmap,
    done_count: AtomicU64,
    any_removed: AtomicBool,
    /// Set once the zero runs were handed to the kernel (or there are none to hand).
    zero_runs_done: AtomicBool,
    removed: Mutex<Vec<RangeSet>>,
    source: Arc<dyn PageSource>,
    poison: bool,
    faults: AtomicU64,
    prefetched: AtomicU64,
    zero: AtomicU64,
    kernel_zero: AtomicU64,
    discarded: AtomicU64,
    lost: AtomicU64,
    error: Mutex<Option<RestoreError>>,
    stop_prefetch: AtomicBool,
    failed: AtomicBool,
    demand: AtomicU64,
    last_fault_ns: AtomicU64,
    hint: AtomicU64,
    epoch: Instant,
    resident_ns: AtomicU64,
    latencies: Mutex<Vec<u64>>,
    record: bool,
    touches: Mutex<Vec<(u64, u64)>>,
    slots: Vec<Slot>,
    stalls: Mutex<Vec<Stall>>,
    max_chunk: usize,
}

/// How a run is installed.
#[derive(Debug, Clone, Copy)]
struct How {
    /// Resolve without waking (the handler wakes merged ranges after its batch).
    dont_wake: bool,
    /// For a write fault (zeros then need a real page, not the zero page).
    write: bool,
}

impl How {
    const PREFETCH: How = How {
        dont_wake: false,
        write: false,
    };
    /// A fault of a batch of `batch` faults: only a real batch defers its
    /// wakes (one fault is woken by its own ioctl, saving a syscall).
    fn fault(pf: &PageFault, batch: usize) -> How {
        How {
            dont_wake: batch > 1,
            write: pf.is_write(),
        }
    }
}

/// Per-thread state of a worker (handler, prefetcher or `wait`).
struct Worker {
    slot: usize,
    buf: Vec<u8>,
    events: EventBuffer,
    /// Faults read while draining events for an EAGAIN, served next.
    pending: Vec<(usize, PageFault)>,
    /// The handler's current batch of events (kept to spare an allocation per batch).
    batch: Vec<Event>,
    /// Ranges resolved with DONTWAKE: (uffd, start, len).
    wakes: Vec<(usize, usize, usize)>,
    /// Faults left to another placer: (uffd, global page), re-checked until done.
    waiting: Vec<(usize, u64)>,
    latencies: Vec<u64>,
    touches: Vec<(u64, u64)>,
}

impl Worker {
    fn new(slot: usize, buf_len: usize) -> Worker {
        Worker {
            slot,
            buf: vec![0u8; buf_len],
            events: EventBuffer::new(64),
            pending: Vec::new(),
            batch: Vec::with_capacity(64),
            wakes: Vec::new(),
            waiting: Vec::new(),
            latencies: Vec::with_capacity(4096),
            touches: Vec::new(),
        }
    }
}

/// A running lazy restore.
pub struct Restore {
    shared: Arc<Shared>,
    handlers: Vec<JoinHandle<()>>,
    prefetcher: Option<JoinHandle<()>>,
    zero_runs: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    stop: Arc<EventFd>,
    stop_watchdog: Arc<AtomicBool>,
    handler_count: usize,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("pages", &self.shared.regions.total())
            .field("mode", &self.shared.mode)
            .finish_non_exhaustive()
    }
}

fn check_layout(
    regions: &[Arc<Region>],
    source: &dyn PageSource,
    mode: Mode,
) -> Result<(), RestoreError> {
    let src = source.regions();
    if src.len() != regions.len() {
        return Err(RestoreError::Mismatch(format!(
            "the source holds {} region(s), {} were given to restore into",
            src.len(),
            regions.len()
        )));
    }
    for (i, (r, s)) in regions.iter().zip(&src).enumerate() {
        if r.page_size() != s.page_size || r.pages() as u64 != s.pages {
            return Err(RestoreError::Mismatch(format!(
                "region {i}: the source has {} pages of {} bytes, the {} region {} pages of {} \
                 bytes (restore into memory of the image's type, or restore eagerly)",
                s.pages,
                s.page_size,
                r.kind(),
                r.pages(),
                r.page_size()
            )));
        }
        if mode == Mode::Minor && r.alias_addr().is_none() {
            return Err(RestoreError::Mismatch(format!(
                "minor mode needs shmem or hugetlbfs memory; region {i} is {} (use missing mode, \
                 or --memory shmem|hugetlb)",
                r.kind()
            )));
        }
    }
    Ok(())
}

/// Registers `regions` (new, never touched) for lazy restore from `source`
/// and starts the handlers, the prefetcher and the watchdog. The regions can
/// be used as soon as this returns.
pub fn start(
    regions: Vec<Arc<Region>>,
    source: Arc<dyn PageSource>,
    opts: RestoreOptions,
) -> Result<Restore, RestoreError> {
    check_layout(&regions, source.as_ref(), opts.mode)?;
    let caps = livepage_uffd::probe::capabilities();
    let mut features = Features::EVENT_REMOVE;
    for r in &regions {
        features |= match (r.kind(), opts.mode) {
            (MemoryKind::Shmem, Mode::Missing) => Features::MISSING_SHMEM,
            (MemoryKind::Shmem, Mode::Minor) => Features::MISSING_SHMEM | Features::MINOR_SHMEM,
            (MemoryKind::Hugetlb, Mode::Missing) => Features::MISSING_HUGETLBFS,
            (MemoryKind::Hugetlb, Mode::Minor) => {
                Features::MISSING_HUGETLBFS | Features::MINOR_HUGETLBFS
            }
            _ => Features::empty(),
        };
    }
    let poison = caps.features.contains(Features::POISON);
    if poison {
        features |= Features::POISON;
    }
    let n_uffd = opts.uffds.max(1);
    let uffds = (0..n_uffd)
        .map(|_| {
            UffdBuilder::new()
                .non_blocking(true)
                .features(features)
                .create()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let table = RegionTable::new(&regions);
    let total = table.total();
    let claimed = PageBitmap::new(total as usize);
    let done = PageBitmap::new(total as usize);
    let slice_pages: Vec<u64> = table
        .iter()
        .map(|t| t.pages.div_ceil(n_uffd as u64).max(1))
        .collect();
    let mode = match opts.mode {
        Mode::Missing => RegisterMode::MISSING,
        Mode::Minor => RegisterMode::MISSING | RegisterMode::MINOR,
    };
    // Register every slice whole: O(1) in the image size. Zero runs are
    // handed to the kernel afterwards, in the background. On error the uffds
    // are dropped, which unregisters what was registered.
    for (t, &sp) in table.iter().zip(&slice_pages) {
        for (ui, uffd) in uffds.iter().enumerate() {
            let a = (ui as u64 * sp).min(t.pages);
            let b = ((ui as u64 + 1) * sp).min(t.pages);
            if b > a {
                let ps = t.page_size;
                t.region
                    .register_range(uffd, a as usize * ps, (b - a) as usize * ps, mode)?;
            }
        }
    }
    let handler_count = opts.handlers.max(n_uffd);
    let max_chunk = opts.max_chunk.max(table.max_page_size());
    let shared = Arc::new(Shared {
        uffds,
        mode: opts.mode,
        removed: Mutex::new(regions.iter().map(|_| RangeSet::new()).collect()),
        regions: table,
        slice_pages,
        claimed,
        done,
        done_count: AtomicU64::new(0),
        any_removed: AtomicBool::new(false),
        zero_runs_done: AtomicBool::new(opts.zero_runs_to_kernel.is_none()),
        source,
        poison,
        faults: AtomicU64::new(0),
        prefetched: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        kernel_zero: AtomicU64::new(0),
        discarded: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        error: Mutex::new(None),
        stop_prefetch: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        demand: AtomicU64::new(0),
        last_fault_ns: AtomicU64::new(0),
        hint: AtomicU64::new(0),
        epoch: Instant::now(),
        resident_ns: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
        record: opts.record_working_set,
        touches: Mutex::new(Vec::new()),
        // One slot per handler, then the prefetcher, `wait`, the zero-run task.
        slots: (0..handler_count + 3).map(|_| Slot::default()).collect(),
        stalls: Mutex::new(Vec::new()),
        max_chunk,
    });
    shared.note_done(0);
    let stop = Arc::new(EventFd::new().map_err(|e| RestoreError::Other(format!("eventfd: {e}")))?);
    // Built first so that a failure to start a thread drops it: Drop stops
    // what was started and fails the rest closed.
    let mut restore = Restore {
        shared: shared.clone(),
        handlers: Vec::new(),
        prefetcher: None,
        zero_runs: None,
        watchdog: None,
        stop: stop.clone(),
        stop_watchdog: Arc::new(AtomicBool::new(false)),
        handler_count,
    };
    let spawn_err =
        |what: &str, e: std::io::Error| RestoreError::Other(format!("spawning {what}: {e}"));
    for i in 0..handler_count {
        let (s, stop) = (shared.clone(), stop.clone());
        restore.handlers.push(
            std::thread::Builder::new()
                .name(format!("lp-fault-{i}"))
                .spawn(move || s.guarded(i, |s, w| s.handler_loop(i % s.uffds.len(), &stop, w)))
                .map_err(|e| spawn_err("a handler thread", e))?,
        );
    }
    let zero_min = opts.zero_runs_to_kernel;
    match opts.prefetch.clone() {
        Prefetch::None => {
            // Without a prefetcher the zero runs get a thread of their own.
            if let Some(min) = zero_min {
                let s = shared.clone();
                let slot = handler_count + 2;
                restore.zero_runs = Some(
                    std::thread::Builder::new()
                        .name("lp-zero-runs".into())
                        .spawn(move || s.guarded(slot, |s, w| s.hand_zero_runs_to_kernel(min, w)))
                        .map_err(|e| spawn_err("the zero-run task", e))?,
                );
            }
        }
        policy => {
            let s = shared.clone();
            let slot = handler_count;
            restore.prefetcher = Some(
                std::thread::Builder::new()
                    .name("lp-prefetch".into())
                    .spawn(move || {
                        s.guarded(slot, |s, w| {
                            // Zero runs first: cheap, and then nobody copies them.
                            if let Some(min) = zero_min {
                                s.hand_zero_runs_to_kernel(min, w);
                            }
                            s.prefetch(&policy, w)
                        })
                    })
                    .map_err(|e| spawn_err("the prefetcher", e))?,
            );
        }
    }
    let (s, halt) = (shared.clone(), restore.stop_watchdog.clone());
    let (limit, report) = (opts.watchdog, opts.on_stall.clone());
    restore.watchdog = Some(
        std::thread::Builder::new()
            .name("lp-watchdog".into())
            .spawn(move || s.watch(limit, report.as_ref(), &halt))
            .map_err(|e| spawn_err("the watchdog", e))?,
    );
    Ok(restore)
}

impl Restore {
    /// Pages resident (placed, zero-filled or left to the kernel) so far, of the total.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.done_count.load(Ordering::Relaxed),
            self.shared.regions.total(),
        )
    }

    /// Demand faults served so far.
    pub fn faults_served(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    /// Makes every page resident (without a prefetcher the pages nobody
    /// touched are placed now, in this thread), stops the handlers,
    /// unregisters, and returns the statistics.
    pub fn wait(mut self) -> Result<RestoreStats, RestoreError> {
        // This thread helps the prefetcher (or, without one, does its work),
        // with one more thread per otherwise idle CPU: claim bits keep them
        // from placing a page twice.
        // The zero runs go to the kernel before anyone sweeps over them.
        while !self.shared.zero_runs_done.load(Ordering::Acquire)
            && !self.shared.failed.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = 1 + usize::from(self.prefetcher.is_some());
        let helpers: Vec<_> = (0..cpus.saturating_sub(busy).min(3))
            .filter_map(|_| {
                let s = self.shared.clone();
                let slot = self.handler_count + 1;
                std::thread::Builder::new()
                    .name("lp-fill".into())
                    .spawn(move || s.guarded(slot, |s, w| s.prefetch(&Prefetch::Sequential, w)))
                    .ok()
            })
            .collect();
        let slot = self.handler_count + 1;
        self.shared
            .guarded(slot, |s, w| s.prefetch(&Prefetch::Sequential, w));
        for h in helpers {
            let _ = h.join();
        }
        if let Some(p) = self.prefetcher.take() {
            let _ = p.join();
        }
        // Others may still be placing the pages they claimed.
        while self.shared.done_count.load(Ordering::Acquire) < self.shared.regions.total() {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.stop_threads();
        self.unregister();
        let s = &self.shared;
        let lost = s.lost.load(Ordering::Relaxed);
        if let Some(mut e) = s.error.lock().ok().and_then(|mut e| e.take()) {
            if let RestoreError::Source { pages, .. } = &mut e {
                *pages = lost;
            }
            return Err(e);
        }
        Ok(s.stats(self.handler_count))
    }

    fn stop_threads(&mut self) {
        self.shared.stop_prefetch.store(true, Ordering::SeqCst);
        for t in [self.prefetcher.take(), self.zero_runs.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
        self.stop.signal();
        for h in self.handlers.drain(..) {
            let _ = h.join();
        }
        self.stop_watchdog.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }

    fn unregister(&self) {
        for t in self.shared.regions.iter() {
            for u in &self.shared.uffds {
                let _ = t.region.unregister(u);
            }
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !self.handlers.is_empty() {
            // Dropped before `wait`: fail closed, then let the handlers go.
            self.shared.stop_prefetch.store(true, Ordering::SeqCst);
            for t in [self.prefetcher.take(), self.zero_runs.take()]
                .into_iter()
                .flatten()
            {
                let _ = t.join();
            }
            if self.shared.done_count.load(Ordering::Acquire) < self.shared.regions.total() {
                self.shared.fail_closed();
            }
            self.stop_threads();
            if self.shared.poison {
                self.unregister();
            }
        }
    }
}

fn log2_buckets(lat_ns: &[u64]) -> Vec<Bucket> {
    let mut counts = [0u64; 18];
    for l in lat_ns {
        let us = l / 1000;
        let b = (64 - us.leading_zeros()) as usize;
        counts[b.min(17)] += 1;
    }
    let last = counts.iter().rposition(|c| *c > 0).map_or(0, |i| i + 1);
    counts[..last]
        .iter()
        .enumerate()
        .map(|(i, c)| Bucket {
            below_us: 1u64 << i,
            count: *c,
        })
        .collect()
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn stats(&self, handlers: usize) -> RestoreStats {
        let mut lat = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        lat.sort_unstable();
        let q = |f: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * f) as usize)
                .copied()
                .unwrap_or(0) as f64
                / 1e3
        };
        let working_set = self.record.then(|| {
            let mut t = self.touches.lock().map(|t| t.clone()).unwrap_or_default();
            t.sort_unstable();
            WorkingSet {
                total_pages: self.regions.total(),
                pages: t.into_iter().map(|(_, g)| g).collect(),
            }
        });
        RestoreStats {
            mode: self.mode,
            handlers,
            uffds: self.uffds.len(),
            pages: self.regions.total(),
            faults_served: self.faults.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            zero_filled: self.zero.load(Ordering::Relaxed),
            left_to_kernel: self.kernel_zero.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            until_resident_ms: self.resident_ns.load(Ordering::Relaxed) as f64 / 1e6,
            fault_p50_us: q(0.5),
            fault_p99_us: q(0.99),
            histogram: log2_buckets(&lat),
            stalls: self.stalls.lock().map(|s| s.clone()).unwrap_or_default(),
            working_set,
        }
    }

    fn set_error(&self, e: RestoreError) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    /// Runs a worker body; a panic fails the restore closed instead of
    /// leaving faulting threads to hang.
    fn guarded(self: &Arc<Self>, slot: usize, body: impl FnOnce(&Shared, &mut Worker)) {
        let mut w = Worker::new(slot, self.max_chunk);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            body(self, &mut w);
            // Faults this worker read while draining events for an EAGAIN
            // are served before it goes: nobody else will see them again.
            self.serve_pending(&mut w);
        }));
        if let Ok(mut l) = self.latencies.lock() {
            l.append(&mut w.latencies);
        }
        if let Ok(mut t) = self.touches.lock() {
            t.append(&mut w.touches);
        }
        if let Err(p) = r {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            self.set_error(RestoreError::HandlerDied(why));
            self.fail_closed();
        }
    }

    fn note_done(&self, added: u64) {
        let now = self.done_count.fetch_add(added, Ordering::AcqRel) + added;
        if now >= self.regions.total() {
            let _ = self.resident_ns.compare_exchange(
                0,
                self.now_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn mark_done(&self, g0: u64, n: u64) {
        let mut added = 0;
        for g in g0..g0 + n {
            if self.done.set(g as usize) {
                added += 1;
            }
        }
        self.note_done(added);
    }

    fn uffd_of(&self, r: usize, p: u64) -> usize {
        ((p / self.slice_pages[r]) as usize).min(self.uffds.len() - 1)
    }

    /// Poisons every page not yet placed: whoever touches one gets SIGBUS at
    /// once, nobody waits forever.
    fn fail_closed(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.stop_prefetch.store(true, Ordering::SeqCst);
        for (ri, t) in self.regions.iter().enumerate() {
            let mut p = 0;
            while p < t.pages {
                if self.done.get((t.first + p) as usize) {
                    p += 1;
                    continue;
                }
                let ui = self.uffd_of(ri, p);
                let slice_end = ((ui as u64 + 1) * self.slice_pages[ri]).min(t.pages);
                let mut e = p;
                while e < slice_end && !self.done.get((t.first + e) as usize) {
                    self.claimed.set((t.first + e) as usize);
                    e += 1;
                }
                let addr = self.regions.page_addr(ri, p);
                let len = (e - p) as usize * t.page_size;
                let lost = e - p;
                if self.poison {
                    // Reads a pending discard itself: this may be the only reader.
                    let _ = self.uffds[ui].poison_holes(addr, len, t.page_size, |ev| {
                        if let Event::Remove { start, end } = ev {
                            self.on_remove(start, end);
                        }
                    });
                } else {
                    // No UFFDIO_POISON (Linux < 6.6): unregister so nobody hangs.
                    let _ =
                        t.region
                            .unregister_range(&self.uffds[ui], p as usize * t.page_size, len);
                }
                self.lost.fetch_add(lost, Ordering::Relaxed);
                self.mark_done(t.first + p, e - p);
                p = e;
            }
        }
    }

    /// Whether `[off, off+len)` of region `r` was discarded: (all, any).
    fn removed_in(&self, r: usize, off: u64, len: u64) -> (bool, bool) {
        if !self.any_removed.load(Ordering::Acquire) {
            return (false, false);
        }
        let rm = match self.removed.lock() {
            Ok(rm) => rm,
            Err(_) => return (false, false),
        };
        let all = rm[r].covers(off, off + len);
        let any = all || rm[r].iter().any(|(s, e)| s < off + len && e > off);
        (all, any)
    }

    /// Handles a REMOVE: the range reads as zeros from now on. Pages never
    /// placed are done (as zeros, when first touched).
    fn on_remove(&self, start: u64, end: u64) {
        let mut a = start;
        let mut marked = false;
        while a < end {
            let Some((r, p)) = self.regions.locate(a) else {
                // Not ours: skip to the next region above, if any.
                match self
                    .regions
                    .iter()
                    .map(|t| t.region.addr() as u64)
                    .filter(|b| *b > a)
                    .min()
                {
                    Some(next) => a = next,
                    None => break,
                }
                continue;
            };
            let t = &self.regions[r];
            let last = ((end - t.region.addr() as u64).div_ceil(t.page_size as u64)).min(t.pages);
            if let Ok(mut rm) = self.removed.lock() {
                rm[r].insert(p * t.page_size as u64, last * t.page_size as u64);
                marked = true;
            }
            if marked {
                self.any_removed.store(true, Ordering::Release);
            }
            for q in p..last {
                let g = t.first + q;
                if self.claimed.set(g as usize) {
                    self.zero.fetch_add(1, Ordering::Relaxed);
                    self.mark_done(g, 1);
                }
            }
            self.discarded.fetch_add(last - p, Ordering::Relaxed);
            a = t.region.addr() as u64 + last * t.page_size as u64;
        }
    }

    /// Reads pending events of uffd `ui` without blocking: removes are applied
    /// now, faults queued for the worker. This is how an EAGAIN is answered.
    fn drain(&self, ui: usize, w: &mut Worker) {
        let evs: Vec<Event> = match self.uffds[ui].read_events(&mut w.events) {
            Ok(e) => e.collect(),
            Err(_) => return,
        };
        if evs.is_empty() {
            std::thread::yield_now();
        }
        for ev in evs {
            match ev {
                Event::PageFault(pf) => w.pending.push((ui, pf)),
                Event::Remove { start, end } => self.on_remove(start, end),
                _ => {}
            }
        }
    }

    /// Installs `n` pages at page `p0` of region `r` from `w.buf` (`data`) or
    /// as zeros. Handles partial progress, EEXIST and EAGAIN.
    fn install(
        &self,
        r: usize,
        p0: u64,
        n: u64,
        data: bool,
        how: How,
        w: &mut Worker,
    ) -> Result<(), RestoreError> {
        let How { dont_wake, write } = how;
        let t = &self.regions[r];
        let ps = t.page_size;
        let len = n as usize * ps;
        let addr = self.regions.page_addr(r, p0);
        let ui = self.uffd_of(r, p0);
        let uffd = &self.uffds[ui];
        let hugetlb = t.region.kind() == MemoryKind::Hugetlb;
        // How the pages get there: zeropage where the kernel can, else bytes.
        // A write fault on anonymous memory gets a real zeroed page: the shared
        // zero page would cost it a second (copy-on-write) fault at once.
        let anon_write = write && !t.region.kind().has_page_cache();
        let zeropage = !data && !hugetlb && !anon_write;
        if !data && !zeropage {
            w.buf[..len].fill(0);
        }
        let via_alias = self.mode == Mode::Minor && !zeropage;
        if via_alias {
            t.region.write_page_cache(p0 as usize * ps, &w.buf[..len])?;
        }
        let mut off = 0usize;
        while off < len {
            let res = if zeropage {
                uffd.zeropage(addr + off, len - off, dont_wake)
            } else if via_alias {
                uffd.continue_range(addr + off, len - off, dont_wake, false)
            } else {
                let mode = CopyMode {
                    dont_wake,
                    write_protect: false,
                };
                uffd.copy(addr + off, &w.buf[off..len], mode)
            };
            match res {
                Ok(Resolved::All) => break,
                Ok(Resolved::Partial { bytes }) => off += bytes as usize,
                Ok(Resolved::AlreadyPresent) => {
                    // Someone mapped this page (or it was poisoned): wake its waiters.
                    let _ = uffd.wake(addr + off, ps);
                    off += ps;
                }
                Ok(Resolved::EventPending) => {
                    self.drain(ui, w);
                    // The pending event may have discarded pages of this run.
                    if !zeropage && !via_alias {
                        let first = p0 + (off / ps) as u64;
                        self.zero_removed(r, first, &mut w.buf[off..len]);
                    }
                }
                // CONTINUE finds no page: the hole was punched (discarded) meanwhile.
                Err(RangeError::Kernel {
                    errno: Errno::FAULT,
                    ..
                }) if via_alias => off += ps,
                // The memory's owner is gone (a served process exited): nothing to do.
                Err(RangeError::TargetGone { .. }) => return Ok(()),
                // Unregistered meanwhile (a zero run handed to the kernel, or the
                // restore finishing): the kernel serves the range now.
                Err(RangeError::NotRegistered { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        if dont_wake {
            w.wakes.push((ui, addr, len));
        }
        Ok(())
    }

    /// Reads pages `[p0, p0+n)` of region `r` (zeros where discarded) and
    /// installs them. Returns whether they held data; a source failure
    /// poisons the pages and is recorded.
    fn fill(
        &self,
        r: usize,
        p0: u64,
        n: u64,
        how: How,
        w: &mut Worker,
    ) -> Result<bool, RestoreError> {
        let t = &self.regions[r];
        let ps = t.page_size as u64;
        let len = (n * ps) as usize;
        let slot = &self.slots[w.slot];
        slot.addr
            .store(self.regions.page_addr(r, p0) as u64, Ordering::Relaxed);
        slot.len.store(len as u64, Ordering::Relaxed);
        slot.since_ns.store(self.now_ns(), Ordering::Release);
        let (all_removed, _) = self.removed_in(r, p0 * ps, n * ps);
        let data = if all_removed {
            false
        } else {
            match self.source.read_pages(r, p0, &mut w.buf[..len]) {
                Ok(d) => d,
                Err(e) => {
                    slot.since_ns.store(0, Ordering::Release);
                    self.lose(r, p0, n, e);
                    return Ok(false);
                }
            }
        };
        // Checked again after the (maybe slow) read: a discard that came
        // meanwhile must not be answered with the data read before it.
        if data {
            self.zero_removed(r, p0, &mut w.buf[..len]);
        }
        let res = self.install(r, p0, n, data, how, w);
        slot.since_ns.store(0, Ordering::Release);
        res.map(|()| data)
    }

    /// Zeroes the pages of `buf` (pages from `p0` of region `r`) that were discarded.
    fn zero_removed(&self, r: usize, p0: u64, buf: &mut [u8]) {
        let ps = self.regions[r].page_size;
        if !self.removed_in(r, p0 * ps as u64, buf.len() as u64).1 {
            return;
        }
        if let Ok(rm) = self.removed.lock() {
            for (k, page) in buf.chunks_mut(ps).enumerate() {
                if rm[r].contains((p0 + k as u64) * ps as u64) {
                    page.fill(0);
                }
            }
        }
    }

    /// The source could not give these pages: poison them (or, if the source
    /// is gone, everything still missing).
    fn lose(&self, r: usize, p0: u64, n: u64, e: SourceError) {
        let fatal = e.fatal;
        self.set_error(RestoreError::Source { pages: 0, first: e });
        if fatal {
            self.fail_closed();
            return;
        }
        let t = &self.regions[r];
        let addr = self.regions.page_addr(r, p0);
        let uffd = &self.uffds[self.uffd_of(r, p0)];
        if self.poison {
            let _ = uffd.poison(addr, n as usize * t.page_size, false);
        } else {
            let _ = t.region.unregister_range(
                uffd,
                p0 as usize * t.page_size,
                n as usize * t.page_size,
            );
        }
        self.lost.fetch_add(n, Ordering::Relaxed);
        self.mark_done(t.first + p0, n);
    }

    /// Places claimed pages and accounts for them.
    fn place(&self, r: usize, p0: u64, n: u64, how: How, w: &mut Worker) -> bool {
        match self.fill(r, p0, n, how, w) {
            Ok(data) => {
                if !data {
                    self.zero.fetch_add(n, Ordering::Relaxed);
                }
                self.mark_done(self.regions[r].first + p0, n);
                true
            }
            Err(e) => {
                self.set_error(e);
                self.fail_closed();
                false
            }
        }
    }

    fn serve_fault(&self, ui: usize, pf: PageFault, batch: usize, w: &mut Worker) {
        let t0 = Instant::now();
        let Some((r, p)) = self.regions.locate(pf.address) else {
            return;
        };
        let g = self.regions[r].first + p;
        self.demand.fetch_add(1, Ordering::AcqRel);
        let now = t0.duration_since(self.epoch).as_nanos() as u64 + 1;
        self.last_fault_ns.store(now, Ordering::Relaxed);
        self.hint.store(g + 1, Ordering::Relaxed);
        if self.claimed.set(g as usize) {
            if self.record {
                w.touches.push((now, g));
            }
            if self.place(r, p, 1, How::fault(&pf, batch), w) {
                self.faults.fetch_add(1, Ordering::Relaxed);
                w.latencies.push(t0.elapsed().as_nanos() as u64);
            }
        } else if self.done.get(g as usize) {
            // Placed before and unmapped since (a discard): resolve again.
            let res = if pf.is_minor() {
                let addr = self.regions.page_addr(r, p);
                match self.uffds[ui].continue_range(addr, self.regions[r].page_size, true, false) {
                    Ok(_) => {
                        w.wakes.push((ui, addr, self.regions[r].page_size));
                        Ok(true)
                    }
                    Err(e) => Err(e.into()),
                }
            } else {
                self.fill(r, p, 1, How::fault(&pf, batch), w)
            };
            if let Err(e) = res {
                self.set_error(e);
            }
        } else {
            // Someone else is placing it: their ioctl wakes this fault. It is
            // kept and woken again once done, in case that wake came first.
            w.waiting.push((ui, g));
        }
        self.demand.fetch_sub(1, Ordering::AcqRel);
    }

    /// Wakes the faults this handler left to another placer whose pages are
    /// now done. Normally the placer's ioctl (or an unregister) already woke
    /// them and this is a no-op; it makes sure no ordering of the two leaves
    /// a thread asleep.
    fn wake_waiting(&self, w: &mut Worker) {
        w.waiting.retain(|&(ui, g)| {
            if !self.done.get(g as usize) {
                return true;
            }
            if let Some((r, p)) = self.regions.locate_global(g) {
                let _ =
                    self.uffds[ui].wake(self.regions.page_addr(r, p), self.regions[r].page_size);
            }
            false
        });
    }

    fn flush_wakes(&self, w: &mut Worker) {
        if w.wakes.is_empty() {
            return;
        }
        w.wakes.sort_unstable();
        let mut cur = w.wakes[0];
        for &(ui, a, l) in &w.wakes[1..] {
            if ui == cur.0 && a == cur.1 + cur.2 {
                cur.2 += l;
            } else {
                let _ = self.uffds[cur.0].wake(cur.1, cur.2);
                cur = (ui, a, l);
            }
        }
        let _ = self.uffds[cur.0].wake(cur.1, cur.2);
        w.wakes.clear();
    }

    fn serve_pending(&self, w: &mut Worker) {
        while let Some((ui, pf)) = w.pending.pop() {
            let batch = w.pending.len() + 1;
            self.serve_fault(ui, pf, batch, w);
        }
        self.flush_wakes(w);
    }

    fn handler_loop(&self, ui: usize, stop: &EventFd, w: &mut Worker) {
        let uffd = &self.uffds[ui];
        loop {
            // Faults left to other placers are re-checked every few ms.
            let timeout = if w.waiting.is_empty() { -1 } else { 5 };
            match poll_readable([uffd.as_fd(), stop.as_fd()], timeout) {
                Ok(r) if r[1] => return,
                Ok(_) => {}
                Err(_) => return,
            }
            self.wake_waiting(w);
            let mut evs = std::mem::take(&mut w.batch);
            match uffd.read_events(&mut w.events) {
                Ok(e) => evs.extend(e),
                Err(_) => return,
            }
            let batch = evs
                .iter()
                .filter(|e| matches!(e, Event::PageFault(_)))
                .count();
            for ev in evs.drain(..) {
                match ev {
                    Event::PageFault(pf) => self.serve_fault(ui, pf, batch, w),
                    Event::Remove { start, end } => self.on_remove(start, end),
                    _ => {}
                }
            }
            w.batch = evs;
            self.serve_pending(w);
        }
    }

    /// Claims up to `max` unclaimed pages from global page `g` (which must be
    /// unclaimed), within one region and one userfaultfd slice.
    fn claim_run(&self, g: u64, max: u64) -> Option<(usize, u64, u64)> {
        let (r, p) = self.regions.locate_global(g)?;
        if !self.claimed.set(g as usize) {
            return None;
        }
        let t = &self.regions[r];
        let ui = self.uffd_of(r, p);
        let limit = ((ui as u64 + 1) * self.slice_pages[r])
            .min(t.pages)
            .min(p + max);
        let mut n = 1;
        while p + n < limit && self.claimed.set((g + n) as usize) {
            n += 1;
        }
        Some((r, p, n))
    }

    /// Demand first: yields while faults are being served (bounded).
    fn yield_to_demand(&self) {
        let mut spins = 0;
        while self.demand.load(Ordering::Acquire) > 0 && spins < 64 {
            std::thread::yield_now();
            spins += 1;
        }
    }

    fn prefetch(&self, policy: &Prefetch, w: &mut Worker) {
        let total = self.regions.total();
        let ps = self.regions.max_page_size() as u64;
        let max_pages = (self.max_chunk as u64 / ps).max(1);
        let min_pages = ((64 << 10) / ps).clamp(1, max_pages);
        let mut chunk = min_pages;
        if let Prefetch::Recorded(ws) = policy {
            let mut i = 0;
            while i < ws.pages.len() {
                if self.stop_prefetch.load(Ordering::Relaxed) {
                    return;
                }
                self.serve_pending(w);
                // Consecutive recorded pages go as one run.
                let g = ws.pages[i];
                let mut j = i + 1;
                while j < ws.pages.len() && ws.pages[j] == ws.pages[j - 1] + 1 {
                    j += 1;
                }
                let run = (j - i) as u64;
                i = j;
                if g >= total || self.claimed.get(g as usize) {
                    continue;
                }
                if let Some((r, p, n)) = self.claim_run(g, run) {
                    if self.place(r, p, n, How::PREFETCH, w) {
                        self.prefetched.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
        let mut cursor = 0u64;
        loop {
            if self.stop_prefetch.load(Ordering::Relaxed) {
                return;
            }
            self.serve_pending(w);
            self.yield_to_demand();
            // Adapt: small chunks right after a fault, doubling while idle.
            let since = self
                .now_ns()
                .saturating_sub(self.last_fault_ns.load(Ordering::Relaxed));
            chunk = if since < 2_000_000 {
                min_pages
            } else {
                (chunk * 2).min(max_pages)
            };
            // Follow the latest fault (its neighbours are likely next), else sweep.
            let hint = self.hint.swap(0, Ordering::Relaxed);
            let from = if hint > 0 && hint < total && !self.claimed.get(hint as usize) {
                hint
            } else {
                match self.claimed.next_clear(cursor as usize) {
                    Some(g) => {
                        cursor = g as u64;
                        g as u64
                    }
                    None => match self.claimed.next_clear(0) {
                        Some(g) => g as u64,
                        None => return,
                    },
                }
            };
            if let Some((r, p, n)) = self.claim_run(from, chunk) {
                if self.place(r, p, n, How::PREFETCH, w) {
                    self.prefetched.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// Unregisters large zero runs the source knows of, so the kernel serves
    /// them with no round trip. Runs only over pages nobody claimed yet.
    fn hand_zero_runs_to_kernel(&self, min_bytes: usize, w: &mut Worker) {
        self.zero_runs_to_kernel(min_bytes, w);
        self.zero_runs_done.store(true, Ordering::Release);
    }

    fn zero_runs_to_kernel(&self, min_bytes: usize, w: &mut Worker) {
        // Each run splits a VMA: keep the count far from vm.max_map_count.
        let mut budget = 1024usize;
        for (ri, t) in self.regions.iter().enumerate() {
            let min_pages = (min_bytes / t.page_size).max(1) as u64;
            let Some(mut runs) = self.source.zero_runs(ri) else {
                continue;
            };
            runs.retain(|(s, e)| e - s >= min_pages);
            runs.sort_by_key(|(s, e)| std::cmp::Reverse(e - s));
            runs.truncate(budget);
            budget -= runs.len();
            for (s, e) in runs {
                let mut p = s;
                while p < e {
                    if self.stop_prefetch.load(Ordering::Relaxed) {
                        return;
                    }
                    let g = t.first + p;
                    let Some((r, q, n)) = self.claim_run(g, e - p) else {
                        p += 1;
                        continue;
                    };
                    let ui = self.uffd_of(r, q);
                    let (off, len) = (q as usize * t.page_size, n as usize * t.page_size);
                    if t.region.unregister_range(&self.uffds[ui], off, len).is_ok() {
                        self.kernel_zero.fetch_add(n, Ordering::Relaxed);
                        self.mark_done(t.first + q, n);
                    } else if self.place(r, q, n, How::PREFETCH, w) {
                        self.prefetched.fetch_add(n, Ordering::Relaxed);
                    }
                    self.serve_pending(w);
                    p = q + n;
                }
            }
        }
    }

    fn watch(&self, limit: Duration, report: Option<&StallReporter>, halt: &AtomicBool) {
        let limit_ns = limit.as_nanos() as u64;
        while !halt.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.now_ns();
            for (i, s) in self.slots.iter().enumerate() {
                let since = s.since_ns.load(Ordering::Acquire);
                if since == 0 {
                    s.reported.store(false, Ordering::Relaxed);
                    continue;
                }
                let waited = now.saturating_sub(since);
                if waited > limit_ns && !s.reported.swap(true, Ordering::Relaxed) {
                    let stall = Stall {
                        addr: s.addr.load(Ordering::Relaxed),
                        len: s.len.load(Ordering::Relaxed),
                        waited_ms: waited / 1_000_000,
                        worker: match self.slots.len() - i {
                            3 => "prefetcher".into(),
                            2 => "wait".into(),
                            1 => "zero runs".into(),
                            _ => format!("handler {i}"),
                        },
                    };
                    if let Some(f) = report {
                        f(&stall);
                    }
                    if let Ok(mut v) = self.stalls.lock() {
                        v.push(stall);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_log2() {
        let b = log2_buckets(&[500, 1_500, 3_000, 3_500, 1_000_000]);
        assert_eq!(b[0].below_us, 1);
        assert_eq!(b[0].count, 1); // 0 µs
        assert_eq!(b[1].count, 1); // 1 µs
        assert_eq!(b[2].count, 2); // 3 µs
        assert_eq!(b.last().map(|b| b.below_us), Some(1024));
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 5);
    }
}
