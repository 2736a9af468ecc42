//! The restore core's entry: [`serve`] serves userfaultfds it is given (of
//! this process or another's) over an [`AddressMap`], with a resident set,
//! pushed pages, a replaceable source; [`start`] creates and registers
//! userfaultfds over regions of ours and calls it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_runtime::{Runtime, RuntimeOptions, Worker};
use livepage_uffd::{Features, RegisterMode, Uffd, UffdBuilder};

use crate::engine::{Demand, Engine, Recorder};
use crate::error::RestoreError;
use crate::map::{AddressMap, MappedRange};
use crate::options::{Mode, Notice, Prefetch, RestoreOptions};
use crate::place::How;
use crate::source::PageSource;
use crate::states::PageStates;
use crate::stats::{Counters, RestoreStats};
use crate::supply::Supply;
use crate::watchdog::Slots;

/// What the core serves: userfaultfds (created here or received from
/// another process) and where their pages come from.
#[derive(Debug)]
pub struct Target {
    fds: Vec<Uffd>,
    map: AddressMap,
    resident: Vec<(usize, u64, u64)>,
    release_when_done: bool,
    keep: Vec<Arc<Region>>,
}

impl Target {
    /// `fds` serve the ranges of `map` (each range names its fd by index).
    pub fn new(fds: Vec<Uffd>, map: AddressMap) -> Target {
        Target {
            fds,
            map,
            resident: Vec::new(),
            release_when_done: false,
            keep: Vec::new(),
        }
    }

    /// Source pages `[first, first+count)` of `region` are already correct
    /// in memory (pre-copied): they are never fetched and never overwritten.
    pub fn resident(mut self, region: usize, first: u64, count: u64) -> Target {
        self.resident.push((region, first, count));
        self
    }

    /// Unregister every range once all pages are resident (memory this
    /// process owns; a VMM's memory stays registered for its discards).
    pub fn release_when_done(mut self, on: bool) -> Target {
        self.release_when_done = on;
        self
    }

    /// Keeps regions alive as long as the restore.
    pub fn keep(mut self, regions: Vec<Arc<Region>>) -> Target {
        self.keep = regions;
        self
    }
}

/// A running restore. Dropping it before [`Restore::wait`] fails closed:
/// untouched pages fault with SIGBUS, never with zeros.
pub struct Restore {
    rt: Runtime<Engine>,
    background: Vec<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    halt: Arc<AtomicBool>,
    release_when_done: bool,
    _keep: Vec<Arc<Region>>,
    finished: bool,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.engine();
        f.debug_struct("Restore")
            .field("pages", &e.map.total())
            .field("done", &e.states.done_count())
            .field("mode", &e.mode)
            .finish_non_exhaustive()
    }
}

/// Serves `target` from `source`. The memory is usable as soon as this
/// returns; pages arrive on first touch and in the background.
pub fn serve(
    target: Target,
    source: Arc<dyn PageSource>,
    opts: RestoreOptions,
) -> Result<Restore, RestoreError> {
    if opts.handlers == 0 {
        return Err(RestoreError::Zero { option: "handlers" });
    }
    let Target {
        fds,
        map,
        resident,
        release_when_done,
        keep,
    } = target;
    let src = source.regions();
    for (i, t) in map.ranges().iter().enumerate() {
        if t.fd >= fds.len() {
            return Err(RestoreError::NoSuchFd {
                range: i,
                fd: t.fd,
                fds: fds.len(),
            });
        }
        let fits = src.get(t.source_region).is_some_and(|s| {
            s.page_size == t.page_size
                && t.source_first
                    .checked_add(t.pages)
                    .is_some_and(|e| e <= s.pages)
        });
        if !fits {
            return Err(RestoreError::RangeOutsideSource {
                range: i,
                region: t.source_region,
                first: t.source_first,
                pages: t.pages,
                page_size: t.page_size,
            });
        }
        if opts.mode == Mode::Minor && t.page_cache.is_none() {
            return Err(RestoreError::MinorNeedsPageCache {
                range: i,
                kind: t.kind,
            });
        }
    }
    let mut source_offsets = vec![0u64];
    for s in &src {
        source_offsets.push(source_offsets[source_offsets.len() - 1] + s.pages);
    }
    let max_chunk = opts.max_chunk.max(map.max_page_size());
    let states = PageStates::new(map.total());
    let threads = opts.handlers + 8 + std::thread::available_parallelism().map_or(1, |n| n.get());
    let engine = Arc::new(Engine {
        poison: livepage_uffd::probe::capabilities()
            .features
            .contains(Features::POISON),
        fds,
        read_lock: Mutex::new(()),
        refill_lock: Mutex::new(()),
        states,
        mode: opts.mode,
        supply: Supply::new(source, opts.on_source_loss),
        counters: Counters::default(),
        error: Default::default(),
        background_stop: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        demand: Demand::default(),
        epoch: Instant::now(),
        resident_ns: AtomicU64::new(0),
        recorder: Arc::new(Recorder::new(opts.record_working_set)),
        slots: Arc::new(Slots::new(threads)),
        max_chunk,
        zero_runs_done: AtomicBool::new(opts.zero_runs_to_kernel.is_none()),
        notice: opts.on_notice.clone(),
        handlers: opts.handlers,
        source_offsets,
        map,
    });
    for (region, first, count) in resident {
        engine.mark_resident(region, first, count);
    }
    engine.note_progress();
    let rt = Runtime::start(
        engine.clone(),
        RuntimeOptions::new("lp-fault", opts.handlers),
    )
    .map_err(RestoreError::Runtime)?;
    // Built first so that a failure to start a thread drops it: Drop stops
    // what was started and fails the rest closed.
    let mut restore = Restore {
        rt,
        background: Vec::new(),
        watchdog: None,
        halt: Arc::new(AtomicBool::new(false)),
        release_when_done,
        _keep: keep,
        finished: false,
    };
    let zero_min = opts.zero_runs_to_kernel;
    let policy = opts.prefetch.clone();
    let background = match (&policy, zero_min) {
        (Prefetch::None, None) => None,
        _ => Some(
            restore
                .rt
                .spawn_worker("lp-prefetch", move |e: &Engine, w| {
                    // Zero runs first: cheap, and then nobody copies them.
                    if let Some(min) = zero_min {
                        e.hand_zero_runs_to_kernel(min, w);
                    }
                    if !matches!(policy, Prefetch::None) {
                        e.prefetch(w, &policy);
                    }
                })
                .map_err(RestoreError::Runtime)?,
        ),
    };
    restore.background.extend(background);
    let (e, halt, limit) = (engine.clone(), restore.halt.clone(), opts.watchdog);
    restore.watchdog = Some(
        std::thread::Builder::new()
            .name("lp-watchdog".into())
            .spawn(move || e.watch(limit, &halt))
            .map_err(|err| {
                RestoreError::Runtime(livepage_runtime::RuntimeError::Spawn {
                    thread: "lp-watchdog".into(),
                    source: Arc::new(err),
                })
            })?,
    );
    Ok(restore)
}

/// Registers `regions` (new, never touched) for lazy restore from `source`
/// and serves them: each region is cut into `opts.uffds` slices, one
/// userfaultfd each. The regions can be used as soon as this returns.
pub fn start(
    regions: Vec<Arc<Region>>,
    source: Arc<dyn PageSource>,
    opts: RestoreOptions,
) -> Result<Restore, RestoreError> {
    if opts.uffds == 0 {
        return Err(RestoreError::Zero { option: "uffds" });
    }
    let src = source.regions();
    if src.len() != regions.len() {
        return Err(RestoreError::RegionCount {
            source_regions: src.len(),
            given: regions.len(),
        });
    }
    for (i, (r, s)) in regions.iter().zip(&src).enumerate() {
        if r.page_size() != s.page_size || r.pages() as u64 != s.pages {
            return Err(RestoreError::RegionShape {
                region: i,
                source_pages: s.pages,
                source_page_size: s.page_size,
                kind: r.kind(),
                pages: r.pages() as u64,
                page_size: r.page_size(),
            });
        }
    }
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
    let n = opts.uffds;
    let mut ranges = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        if opts.mode == Mode::Minor && r.alias_addr().is_none() {
            return Err(RestoreError::MinorNeedsPageCache {
                range: i,
                kind: r.kind(),
            });
        }
        let pages = r.pages() as u64;
        let slice = pages.div_ceil(n as u64).max(1);
        for k in 0..n as u64 {
            let (a, b) = ((k * slice).min(pages), ((k + 1) * slice).min(pages));
            if b > a {
                let ps = r.page_size();
                ranges.push(MappedRange {
                    addr: (r.addr() + a as usize * ps) as u64,
                    pages: b - a,
                    page_size: ps,
                    kind: r.kind(),
                    fd: k as usize,
                    source_region: i,
                    source_first: a,
                    page_cache: (opts.mode == Mode::Minor).then(|| (r.clone(), a as usize * ps)),
                });
            }
        }
    }
    let map = AddressMap::new(ranges)?;
    let fds = (0..n)
        .map(|_| {
            UffdBuilder::new()
                .non_blocking(true)
                .features(features)
                .create()
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Minor mode registers MISSING|MINOR: a page whose page cache is still a
    // hole would otherwise be allocated as zeros by the kernel, unasked.
    // Registration is O(1) in the size; on error the fds are dropped, which
    // unregisters what was registered.
    let mode = match opts.mode {
        Mode::Missing => RegisterMode::MISSING,
        Mode::Minor => RegisterMode::MISSING | RegisterMode::MINOR,
    };
    for t in map.ranges() {
        let region = &regions[t.source_region];
        let off = t.source_first as usize * t.page_size;
        region.register_range(&fds[t.fd], off, t.len() as usize, mode)?;
    }
    serve(
        Target::new(fds, map).release_when_done(true).keep(regions),
        source,
        opts,
    )
}

impl Restore {
    fn engine(&self) -> &Arc<Engine> {
        self.rt.policy()
    }

    /// Pages resident (placed, zero-filled, left to the kernel, resident
    /// from the start or lost) so far, of the total.
    pub fn progress(&self) -> (u64, u64) {
        let e = self.engine();
        (e.states.done_count(), e.map.total())
    }

    /// Demand faults served so far.
    pub fn faults_served(&self) -> u64 {
        Counters::get(&self.engine().counters.faults)
    }

    /// The statistics so far (fault latencies count threads that ended).
    pub fn stats(&self) -> RestoreStats {
        self.engine().stats()
    }

    /// Whether serving failed: a page was lost or the restore failed closed.
    pub fn failed(&self) -> bool {
        self.observer().failed()
    }

    /// A cheap view of the counters, readable from any thread (metrics).
    /// It keeps the restore's userfaultfds open: drop it with the restore.
    pub fn observer(&self) -> Observer {
        Observer(self.engine().clone())
    }

    /// Replaces the source (a peer that came back, or another copy). Faults
    /// waiting for a lost source are served from the new one.
    pub fn replace_source(&self, source: Arc<dyn PageSource>) -> Result<(), RestoreError> {
        let e = self.engine();
        if source.regions() != e.supply.get().0.regions() {
            return Err(RestoreError::SourceMismatch);
        }
        for (fd, addr, len) in e.supply.replace(source) {
            let _ = e.fds[fd].wake(addr, len);
        }
        Counters::add(&e.counters.replacements, 1);
        e.tell(Notice::SourceReplaced);
        Ok(())
    }

    /// The pages of source region `region` that are done (placed, resident,
    /// discarded or lost), as ranges of source page numbers: what a
    /// migration destination reports it holds when the link comes back.
    pub fn done_ranges(&self, region: usize) -> livepage_mem::RangeSet {
        self.observer().done_ranges(region)
    }

    /// Declares source pages already correct in memory (resident) while
    /// serving: they are never fetched. Returns how many were missing.
    pub fn mark_resident(&self, region: usize, first: u64, count: u64) -> u64 {
        self.engine().mark_resident(region, first, count)
    }

    /// A handle to offer pages unasked (a migration source pushing them).
    pub fn pusher(&self) -> Pusher {
        let e = self.engine().clone();
        let worker = Worker::new(&*e);
        Pusher { engine: e, worker }
    }

    /// Makes every page resident (pages nobody touched are placed now, by
    /// this thread and one more per idle CPU), stops serving, and returns
    /// the statistics.
    pub fn wait(mut self) -> Result<RestoreStats, RestoreError> {
        let e = self.engine().clone();
        // The zero runs go to the kernel before anyone sweeps over them.
        e.await_zero_runs();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = 1 + self.background.len();
        let helpers: Vec<_> = (0..cpus.saturating_sub(busy).min(3))
            .filter_map(|i| {
                self.rt
                    .spawn_worker(format!("lp-fill-{i}"), |e: &Engine, w| {
                        e.prefetch(w, &Prefetch::Sequential)
                    })
                    .ok()
            })
            .collect();
        self.rt
            .run_worker(|e: &Engine, w| e.prefetch(w, &Prefetch::Sequential));
        for h in helpers {
            let _ = h.join();
        }
        // Others may still be placing pages they claimed (or waiting for a
        // lost source, until it is replaced or its deadline passes).
        while !e.states.all_done() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let (stats, error) = self.finish(None);
        match error {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// Stops serving now. Pages not placed yet are failed closed (whoever
    /// touches one gets SIGBUS rather than waiting). Returns the statistics
    /// and the first error, if any.
    pub fn stop(mut self) -> (RestoreStats, Option<RestoreError>) {
        let e = self.engine().clone();
        e.background_stop.store(true, Ordering::SeqCst);
        for t in self.background.drain(..) {
            let _ = t.join();
        }
        // An error reports the pages lost while serving, not those failed
        // closed by this stop.
        let lost = Counters::get(&e.counters.lost);
        if !e.states.all_done() {
            e.fail_closed();
        }
        self.finish(Some(lost))
    }

    /// Stops everything; `lost` overrides the lost-page count in a source error.
    fn finish(&mut self, lost: Option<u64>) -> (RestoreStats, Option<RestoreError>) {
        self.finished = true;
        let e = self.engine().clone();
        e.background_stop.store(true, Ordering::SeqCst);
        for t in self.background.drain(..) {
            let _ = t.join();
        }
        let _ = self.rt.stop();
        self.halt.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        if self.release_when_done || e.failed.load(Ordering::SeqCst) {
            for (r, t) in e.map.ranges().iter().enumerate() {
                let _ = e.fds[t.fd].unregister(e.map.page_addr(r, 0), t.len() as usize);
            }
        }
        let lost = lost.unwrap_or_else(|| Counters::get(&e.counters.lost));
        let error = e
            .error
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .map(|mut err| {
                if let RestoreError::Source { pages, .. } = &mut err {
                    *pages = lost;
                }
                err
            });
        (e.stats(), error)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let e = self.engine().clone();
        e.background_stop.store(true, Ordering::SeqCst);
        for t in self.background.drain(..) {
            let _ = t.join();
        }
        if !e.states.all_done() {
            e.fail_closed();
        }
        let _ = self.finish(None);
    }
}

/// A view of a running restore's counters (see [`Restore::observer`]).
#[derive(Clone)]
pub struct Observer(Arc<Engine>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

impl Observer {
    /// See [`Restore::done_ranges`].
    pub fn done_ranges(&self, region: usize) -> livepage_mem::RangeSet {
        let e = &self.0;
        let mut set = livepage_mem::RangeSet::new();
        for (r, t) in e.map.ranges().iter().enumerate() {
            if t.source_region != region {
                continue;
            }
            let g = e.map.first(r);
            let mut p = 0;
            while p < t.pages {
                if !e.states.is_done(g + p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < t.pages && e.states.is_done(g + p) {
                    p += 1;
                }
                set.insert(t.source_first + start, t.source_first + p);
            }
        }
        set
    }

    /// The statistics so far.
    pub fn stats(&self) -> RestoreStats {
        self.0.stats()
    }

    /// Live counts of demand-fault service times in log2 µs buckets
    /// (bucket `i` counts faults below `2^i` µs).
    pub fn latency_buckets(&self) -> Vec<u64> {
        self.0.recorder.live_buckets()
    }

    /// Whether serving failed: a page was lost or the restore failed closed.
    pub fn failed(&self) -> bool {
        self.0.failed.load(Ordering::SeqCst)
            || Counters::get(&self.0.counters.lost) > 0
            || self.0.error.lock().map(|e| e.is_some()).unwrap_or(true)
    }
}

/// Offers pages a producer has (a migration source pushing them unasked).
/// A page is placed through the same claim as faults and the prefetcher,
/// unless it is present, being placed, or was discarded.
pub struct Pusher {
    engine: Arc<Engine>,
    worker: Worker<Engine>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").finish_non_exhaustive()
    }
}

/// What became of a push.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Pages placed by this push.
    pub placed: u64,
    /// Pages (source page numbers) being placed by someone else right now,
    /// typically a fault whose read is still waiting: the push did not
    /// place them, and the producer may hand their data to that read.
    pub busy: Vec<u64>,
}

impl Pusher {
    /// Whether every page is done (or the restore failed): nothing more to
    /// offer.
    pub fn finished(&self) -> bool {
        self.engine.states.all_done()
            || self.engine.failed.load(Ordering::Acquire)
            || self.engine.background_stop.load(Ordering::Acquire)
    }

    /// Offers source pages `[first, first + data.len()/page_size)` of
    /// `region` with their contents. Pages done already (placed, resident,
    /// discarded) are skipped; pages another placer holds are listed as busy.
    pub fn push(&mut self, region: usize, first: u64, data: &[u8]) -> Result<Pushed, RestoreError> {
        let e = self.engine.clone();
        let mut out = Pushed::default();
        let Some(ps) = e
            .map
            .ranges()
            .iter()
            .find(|t| t.source_region == region)
            .map(|t| t.page_size)
        else {
            return Ok(out);
        };
        let n = (data.len() / ps) as u64;
        let mut k = 0;
        while k < n {
            let Some(g) = e.map.global_of_source(region, first + k) else {
                k += 1;
                continue;
            };
            let Some((r, p)) = e.map.locate_global(g) else {
                k += 1;
                continue;
            };
            // A run of pages this push claims, within one range.
            let max = (e.map[r].pages - p)
                .min(n - k)
                .min((e.max_chunk / ps) as u64);
            let got = e.states.claim_run(g, g + max);
            if got == 0 {
                if !e.states.is_done(g) {
                    out.busy.push(first + k);
                }
                k += 1;
                continue;
            }
            let bytes = &data[k as usize * ps..(k + got) as usize * ps];
            let (mut cx, local) = self.worker.split(&e);
            local.buf[..bytes.len()].copy_from_slice(bytes);
            let has_data = bytes.iter().any(|b| *b != 0);
            // The run may have been discarded since the producer read it.
            e.zero_discarded(g, &mut local.buf[..bytes.len()], ps);
            let res = e.install(&mut cx, local, r, p, got, has_data, How::BACKGROUND);
            if let Err(err) = res {
                e.set_error(RestoreError::PushFailed);
                e.fail_closed();
                return Err(err);
            }
            if !has_data {
                Counters::add(&e.counters.zero, got);
            }
            Counters::add(&e.counters.pushed, got);
            e.finish(g, got);
            out.placed += got;
            k += got;
            self.worker.serve_pending(&e);
        }
        Ok(out)
    }
}
