//! Lazy restore (first part of issue #6): a restored region is usable at
//! once; a page arrives when it is first touched (userfaultfd MISSING mode,
//! resolved with UFFDIO_COPY, or ZEROPAGE for zero pages) while a background
//! prefetcher fills the rest in address order.
//!
//! Every page is placed once: a claim bit per page decides between the fault
//! handlers and the prefetcher. A fault on a page someone else is placing is
//! left alone: that UFFDIO_COPY wakes the waiting thread when it lands. EEXIST
//! (the page is already there) is followed by a wake. Discards (REMOVE events)
//! are honoured: a discarded page is answered with zeros afterwards, never
//! with stale image data. If the source fails, the page is poisoned so the
//! thread touching it gets SIGBUS at once instead of hanging, and the restore
//! reports the error.
//!
//! Still to come for #6: MINOR mode (CONTINUE on shmem/hugetlbfs), demand
//! priority and adaptive prefetch chunks, a recorded working set, several
//! userfaultfds, the TCP source, a watchdog and the Firecracker handshake.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{PageBitmap, RangeSet, Region, RegionError, RegionTable};
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::{
    CopyMode, CreateError, Event, EventBuffer, Features, RangeError, RegisterMode, Resolved, Uffd,
    UffdBuilder,
};
use serde::Serialize;

/// Where pages come from. One small trait so that an image chain, memory, or
/// (later) a remote peer can serve a restore.
pub trait PageSource: Send + Sync {
    /// Reads page `page` of region `region` into `buf` (the region's page
    /// size). Returns false when the page is all zeros (buf untouched).
    fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<bool, SourceError>;
}

/// A source's failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("page source failed: {0}")]
pub struct SourceError(pub String);

/// An image (or chain) as a page source.
#[derive(Debug)]
pub struct ChainSource(pub livepage_image::Chain);

impl PageSource for ChainSource {
    fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        self.0
            .read_page(region, page, buf)
            .map_err(|e| SourceError(e.to_string()))?;
        Ok(buf.iter().any(|b| *b != 0))
    }
}

/// Pages held in memory (one buffer per region).
#[derive(Debug)]
pub struct MemorySource {
    /// Region contents.
    pub regions: Vec<Vec<u8>>,
    /// Page size of each region.
    pub page_size: Vec<usize>,
}

impl PageSource for MemorySource {
    fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        let ps = *self
            .page_size
            .get(region)
            .ok_or_else(|| SourceError(format!("no region {region}")))?;
        let off = page as usize * ps;
        let src = self.regions[region]
            .get(off..off + ps)
            .ok_or_else(|| SourceError(format!("page {page} out of range")))?;
        if src.iter().all(|b| *b == 0) {
            return Ok(false);
        }
        buf.copy_from_slice(src);
        Ok(true)
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
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// Options.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Fault handler threads.
    pub handlers: usize,
    /// Fill pages nobody touched in the background.
    pub prefetch: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            handlers: 1,
            prefetch: true,
        }
    }
}

/// Statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreStats {
    /// Faults served (pages placed on demand).
    pub faults_served: u64,
    /// Pages placed by the prefetcher.
    pub prefetched: u64,
    /// Pages answered with zeros (zero in the image, or discarded).
    pub zero_filled: u64,
    /// Time from start until every page was resident.
    pub until_resident: Duration,
    /// Demand-fault latency percentiles in µs (p50, p99).
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
}

struct Shared {
    uffd: Uffd,
    regions: RegionTable,
    claimed: PageBitmap,
    placed: AtomicU64,
    removed: Mutex<Vec<RangeSet>>,
    source: Arc<dyn PageSource>,
    faults: AtomicU64,
    prefetched: AtomicU64,
    zero: AtomicU64,
    lost: AtomicU64,
    error: Mutex<Option<RestoreError>>,
    latencies: Mutex<Vec<u64>>,
    stop_prefetch: AtomicBool,
}

/// A running lazy restore.
pub struct Restore {
    shared: Arc<Shared>,
    handlers: Vec<JoinHandle<()>>,
    prefetcher: Option<JoinHandle<()>>,
    stop: Arc<EventFd>,
    started: Instant,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("pages", &self.shared.regions.total())
            .finish_non_exhaustive()
    }
}

/// Registers `regions` (empty, never touched) for lazy restore from `source`
/// and starts the handlers (and the prefetcher). The regions can be used as
/// soon as this returns.
pub fn start(
    regions: Vec<Arc<Region>>,
    source: Arc<dyn PageSource>,
    opts: RestoreOptions,
) -> Result<Restore, RestoreError> {
    let mut features = Features::EVENT_REMOVE;
    if regions
        .iter()
        .any(|r| r.kind() == livepage_mem::MemoryKind::Shmem)
    {
        features |= Features::MISSING_SHMEM;
    }
    if regions
        .iter()
        .any(|r| r.kind() == livepage_mem::MemoryKind::Hugetlb)
    {
        features |= Features::MISSING_HUGETLBFS;
    }
    if livepage_uffd::probe::capabilities()
        .features
        .contains(Features::POISON)
    {
        features |= Features::POISON;
    }
    let uffd = UffdBuilder::new()
        .non_blocking(true)
        .features(features)
        .create()?;
    // On error the uffd is dropped, which unregisters what was registered.
    for r in &regions {
        r.register(&uffd, RegisterMode::MISSING)?;
    }
    let table = RegionTable::new(&regions);
    let total = table.total();
    let shared = Arc::new(Shared {
        uffd,
        removed: Mutex::new(regions.iter().map(|_| RangeSet::new()).collect()),
        regions: table,
        claimed: PageBitmap::new(total as usize),
        placed: AtomicU64::new(0),
        source,
        faults: AtomicU64::new(0),
        prefetched: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        error: Mutex::new(None),
        latencies: Mutex::new(Vec::new()),
        stop_prefetch: AtomicBool::new(false),
    });
    let stop = Arc::new(EventFd::new().map_err(|e| RestoreError::Other(format!("eventfd: {e}")))?);
    let handlers = (0..opts.handlers.max(1))
        .map(|_| {
            let (s, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || s.handler_loop(&stop))
        })
        .collect();
    let prefetcher = opts.prefetch.then(|| {
        let s = shared.clone();
        std::thread::spawn(move || s.prefetch_all())
    });
    Ok(Restore {
        shared,
        handlers,
        prefetcher,
        stop,
        started: Instant::now(),
    })
}

impl Restore {
    /// Pages placed so far, of the total.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.placed.load(Ordering::Relaxed),
            self.shared.regions.total(),
        )
    }

    /// Makes every page resident (without prefetch, the pages nobody touched
    /// are filled now), unregisters, and returns the statistics.
    pub fn wait(mut self) -> Result<RestoreStats, RestoreError> {
        match self.prefetcher.take() {
            Some(p) => {
                let _ = p.join();
            }
            None => self.shared.prefetch_all(),
        }
        while self.shared.placed.load(Ordering::Relaxed) < self.shared.regions.total() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let until_resident = self.started.elapsed();
        self.finish();
        if let Some(e) = self.shared.error.lock().ok().and_then(|mut e| e.take()) {
            return Err(e);
        }
        let mut lat = self
            .shared
            .latencies
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        lat.sort_unstable();
        let q = |f: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * f) as usize)
                .copied()
                .unwrap_or(0) as f64
                / 1e3
        };
        Ok(RestoreStats {
            faults_served: self.shared.faults.load(Ordering::Relaxed),
            prefetched: self.shared.prefetched.load(Ordering::Relaxed),
            zero_filled: self.shared.zero.load(Ordering::Relaxed),
            until_resident,
            fault_p50_us: q(0.5),
            fault_p99_us: q(0.99),
        })
    }

    fn finish(&mut self) {
        self.shared.stop_prefetch.store(true, Ordering::SeqCst);
        for t in &self.shared.regions {
            let _ = t.region.unregister(&self.shared.uffd);
        }
        self.stop.signal();
        for h in self.handlers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !self.handlers.is_empty() {
            if let Some(p) = self.prefetcher.take() {
                self.shared.stop_prefetch.store(true, Ordering::SeqCst);
                let _ = p.join();
            }
            // Unregistering lets untouched pages fault in as zeros: never a hang.
            self.finish();
        }
    }
}

impl Shared {
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions.locate(addr)
    }

    /// Places one claimed page. Returns whether it was zero-filled.
    fn place(&self, r: usize, p: u64, buf: &mut [u8]) -> Result<bool, RestoreError> {
        let t = &self.regions[r];
        let addr = t.region.addr() + p as usize * t.page_size;
        let off = p * t.page_size as u64;
        let discarded = self
            .removed
            .lock()
            .map(|rm| rm[r].contains(off))
            .unwrap_or(false);
        let data = if discarded {
            false
        } else {
            match self.source.read_page(r, p, &mut buf[..t.page_size]) {
                Ok(d) => d,
                Err(e) => {
                    // Fail closed: the toucher gets SIGBUS now rather than waiting forever.
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut slot) = self.error.lock() {
                        slot.get_or_insert(RestoreError::Source { pages: 0, first: e });
                    }
                    let _ = self.uffd.poison(addr, t.page_size, false);
                    self.placed.fetch_add(1, Ordering::Relaxed);
                    return Ok(false);
                }
            }
        };
        let zero_ok = t.region.kind() != livepage_mem::MemoryKind::Hugetlb;
        loop {
            let res = if data {
                self.uffd
                    .copy(addr, &buf[..t.page_size], CopyMode::default())
            } else if zero_ok {
                self.uffd.zeropage(addr, t.page_size, false)
            } else {
                buf[..t.page_size].fill(0);
                self.uffd
                    .copy(addr, &buf[..t.page_size], CopyMode::default())
            };
            match res? {
                Resolved::All | Resolved::Partial { .. } => break,
                Resolved::AlreadyPresent => {
                    self.uffd.wake(addr, t.page_size)?;
                    break;
                }
                // A discard is pending: its handler thread reads it; retry after.
                Resolved::EventPending => std::thread::sleep(Duration::from_micros(50)),
            }
        }
        self.placed.fetch_add(1, Ordering::Relaxed);
        if !data {
            self.zero.fetch_add(1, Ordering::Relaxed);
        }
        Ok(!data)
    }

    fn handler_loop(&self, stop: &EventFd) {
        // Latencies stay thread-local on the fault path; merged when the handler stops.
        let mut lat = Vec::with_capacity(4096);
        self.serve(stop, &mut lat);
        if let Ok(mut l) = self.latencies.lock() {
            l.append(&mut lat);
        }
    }

    fn serve(&self, stop: &EventFd, lat: &mut Vec<u64>) {
        let ps = self.regions.max_page_size();
        let mut buf = vec![0u8; ps];
        let mut events = EventBuffer::new(64);
        loop {
            match poll_readable([std::os::fd::AsFd::as_fd(&self.uffd), stop.as_fd()], -1) {
                Ok(r) if r[1] => return,
                Ok(_) => {}
                Err(_) => return,
            }
            let evs = match self.uffd.read_events(&mut events) {
                Ok(e) => e,
                Err(_) => return,
            };
            for ev in evs {
                match ev {
                    Event::PageFault(pf) => {
                        let t0 = Instant::now();
                        let Some((r, p)) = self.locate(pf.address) else {
                            continue;
                        };
                        let g = self.regions[r].first + p;
                        if !self.claimed.set(g as usize) {
                            // Being placed by someone else; their COPY wakes this fault.
                            continue;
                        }
                        if let Err(e) = self.place(r, p, &mut buf) {
                            if let Ok(mut slot) = self.error.lock() {
                                slot.get_or_insert(e);
                            }
                            continue;
                        }
                        self.faults.fetch_add(1, Ordering::Relaxed);
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    Event::Remove { start, end } => {
                        // Discarded pages are answered with zeros from now on.
                        let mut a = start;
                        while a < end {
                            let Some((r, p)) = self.locate(a) else { break };
                            let t = &self.regions[r];
                            let off = p * t.page_size as u64;
                            if let Ok(mut rm) = self.removed.lock() {
                                rm[r].insert(off, off + t.page_size as u64);
                            }
                            // Placed before: it faults again after the discard.
                            if self.claimed.clear((t.first + p) as usize) {
                                self.placed.fetch_sub(1, Ordering::Relaxed);
                            }
                            a += t.page_size as u64;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn prefetch_all(&self) {
        let ps = self.regions.max_page_size();
        let mut buf = vec![0u8; ps];
        for (r, t) in self.regions.iter().enumerate() {
            for p in 0..t.pages {
                if self.stop_prefetch.load(Ordering::Relaxed) {
                    return;
                }
                if self.claimed.set((t.first + p) as usize) {
                    match self.place(r, p, &mut buf) {
                        Ok(_) => {
                            self.prefetched.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if let Ok(mut slot) = self.error.lock() {
                                slot.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            }
        }
        let lost = self.lost.load(Ordering::Relaxed);
        if lost > 0 {
            if let Ok(mut slot) = self.error.lock() {
                if let Some(RestoreError::Source { pages, .. }) = slot.as_mut() {
                    *pages = lost;
                }
            }
        }
    }
}
