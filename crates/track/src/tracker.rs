//! [`DirtyTracker`]: userfaultfd write-protect tracking, async (WP_ASYNC +
//! PAGEMAP_SCAN) or synchronous (a handler on the fault runtime).

use std::sync::Arc;
use std::time::Instant;

use livepage_mem::{RangeSet, Region};
use livepage_runtime::{Runtime, RuntimeOptions};
use livepage_uffd::{Categories, Features, Pagemap, RegisterMode, ScanRequest, Uffd, UffdBuilder};
use serde::Serialize;

use crate::discards::DiscardLog;
use crate::sync::SyncState;
use crate::{CollectStats, DirtyRegion, LiveSupport, TrackError, Tracker};

/// How writes are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// WP_ASYNC + PAGEMAP_SCAN (no fault round trip).
    WpAsync,
    /// Synchronous write-protect with a handler thread.
    SyncWp,
}

impl Backend {
    /// The best backend this kernel offers.
    pub fn probe() -> Option<Backend> {
        let caps = livepage_uffd::probe::capabilities();
        if !caps.access.full() && caps.features.is_empty() {
            return None;
        }
        if caps.features.contains(Features::WP_ASYNC) && caps.pagemap_scan {
            Some(Backend::WpAsync)
        } else if caps.features.contains(Features::PAGEFAULT_FLAG_WP) {
            Some(Backend::SyncWp)
        } else {
            None
        }
    }

    /// The features this backend needs on `regions`.
    fn features(self, regions: &[Arc<Region>]) -> Features {
        match self {
            Backend::WpAsync => Features::WP_ASYNC | Features::EVENT_REMOVE,
            Backend::SyncWp => crate::sync::features(regions),
        }
    }
}

/// Options of a [`DirtyTracker`]. Start from [`TrackOptions::default`];
/// new options will come.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TrackOptions {
    /// The backend (`None`: the best this kernel offers).
    pub backend: Option<Backend>,
}

impl TrackOptions {
    /// Sets the backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }
}

/// Tracks writes to a set of regions with userfaultfd write-protect.
pub struct DirtyTracker {
    backend: Backend,
    regions: Vec<Arc<Region>>,
    pagemap: Option<Pagemap>,
    /// The async backend's userfaultfd and the thread logging its discards
    /// (the sync backend's lives in its policy).
    discards: Option<Runtime<DiscardLog>>,
    /// Discards reported by the previous collect, reported once more: a
    /// discard's zap follows the read of its event.
    last_discards: Vec<RangeSet>,
    /// The async backend's present pages at the previous collect, per
    /// region (absolute addresses): a page present then and not now was
    /// zapped by a discard, and reads as zeros.
    present: Vec<RangeSet>,
    sync: Option<SyncState>,
    stopped: bool,
    /// The regions' protection is lent to a live checkpoint.
    lent: bool,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("backend", &self.backend)
            .field("regions", &self.regions.len())
            .finish_non_exhaustive()
    }
}

impl DirtyTracker {
    /// Starts tracking: every page of `regions` counts as clean from now on.
    /// `backend` None picks the best one the kernel offers.
    pub fn start(
        regions: Vec<Arc<Region>>,
        backend: Option<Backend>,
    ) -> Result<DirtyTracker, TrackError> {
        DirtyTracker::with_options(regions, TrackOptions { backend })
    }

    /// Starts tracking with `opts`.
    pub fn with_options(
        regions: Vec<Arc<Region>>,
        opts: TrackOptions,
    ) -> Result<DirtyTracker, TrackError> {
        let backend = opts
            .backend
            .or_else(Backend::probe)
            .ok_or(TrackError::Unsupported {
                backend: Backend::SyncWp,
                missing: Features::PAGEFAULT_FLAG_WP,
            })?;
        let features = backend.features(&regions);
        let supported = livepage_uffd::probe::capabilities().features;
        if !supported.contains(features) {
            return Err(TrackError::Unsupported {
                backend,
                missing: features.difference(supported),
            });
        }
        let mut t = DirtyTracker {
            backend,
            regions,
            pagemap: None,
            discards: None,
            last_discards: Vec::new(),
            present: Vec::new(),
            sync: None,
            stopped: false,
            lent: false,
        };
        match backend {
            Backend::WpAsync => {
                let uffd = UffdBuilder::new()
                    .non_blocking(true)
                    .features(features)
                    .create()?;
                register_all(&t.regions, &uffd, RegisterMode::WP)?;
                let spans = t
                    .regions
                    .iter()
                    .map(|r| (r.addr() as u64, (r.addr() + r.len()) as u64))
                    .collect();
                let log = Arc::new(DiscardLog::new(uffd, spans));
                let rt = match Runtime::start(log.clone(), RuntimeOptions::new("lp-track-rm", 1)) {
                    Ok(rt) => rt,
                    Err(e) => {
                        for r in &t.regions {
                            let _ = r.unregister(log.uffd());
                        }
                        return Err(TrackError::Handler(e));
                    }
                };
                t.discards = Some(rt);
                // Arm with one harvest: it protects what is populated. A page
                // that appears later has no uffd-wp bit, so it reads as written
                // anyway; arming costs what is populated, not the reserved size.
                t.pagemap = Some(Pagemap::open_self()?);
                t.collect()?;
            }
            Backend::SyncWp => t.sync = Some(SyncState::start(&t.regions, features)?),
        }
        Ok(t)
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The tracked regions.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// One pre-copy round over the tracked regions (see [`crate::precopy_round`]).
    pub fn precopy_round<F>(&mut self, sink: F) -> Result<CollectStats, TrackError>
    where
        F: FnMut(usize, u64, &[u8]) -> Result<(), TrackError>,
    {
        let regions = self.regions.clone();
        crate::precopy_round(self, &regions, sink)
    }

    /// Stops tracking (also on drop): unregisters every region.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        if let Some(mut rt) = self.discards.take() {
            for r in &self.regions {
                let _ = r.unregister(rt.policy().uffd());
            }
            let _ = rt.stop();
        }
        if let Some(mut s) = self.sync.take() {
            s.stop(&self.regions);
        }
    }

    fn collect_async(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        let t0 = Instant::now();
        let pm = self.pagemap.as_mut().ok_or(TrackError::Stopped)?;
        let mut out = Vec::with_capacity(self.regions.len());
        let mut calls = 0;
        self.present.resize_with(self.regions.len(), RangeSet::new);
        let logged = match &self.discards {
            Some(rt) => rt.policy().take(),
            None => Vec::new(),
        };
        let discarded = std::mem::replace(&mut self.last_discards, logged);
        for (i, r) in self.regions.iter().enumerate() {
            let base = r.addr() as u64;
            let end = base + r.len() as u64;
            // First the populated runs (a read-only walk), then the harvest on
            // those runs only. A harvest (WP_MATCHING) over holes would protect
            // the holes too, filling page tables with markers across a large
            // sparse reservation and making every later walk cost its reserved
            // size. A page populated later has no uffd-wp bit, so the next
            // collect finds it present and reports it as written.
            let mut populated = Vec::new();
            let mut present = RangeSet::new();
            let mut swapped = RangeSet::new();
            let cats = Categories::PRESENT | Categories::SWAPPED;
            let mut scan = pm.scan(ScanRequest::any_of(base, end, cats, cats));
            for reg in scan.by_ref() {
                let reg = reg?;
                populated.push((reg.start, reg.end));
                if reg.categories.contains(Categories::PRESENT) {
                    present.insert(reg.start, reg.end);
                } else {
                    swapped.insert(reg.start, reg.end);
                }
            }
            calls += scan.calls();
            let mut set = RangeSet::new();
            // Present at the previous collect, not now: zapped by a discard,
            // which drops the page with its protection (anon) or leaves a
            // protected marker (shmem, hugetlbfs; the scan counts markers as
            // swapped), so no harvest would see it. A page swapped out
            // meanwhile is reported too: safe, and only once.
            let mut gone = std::mem::take(&mut self.present[i]);
            for (s, e) in present.iter() {
                gone.remove(s, e);
            }
            // Discards logged by the event thread (this collect's and the
            // previous one's): changed contents, even where a read since has
            // put a protected zero page back.
            for d in [discarded.get(i), self.last_discards.get(i)]
                .into_iter()
                .flatten()
            {
                for (s, e) in d.iter() {
                    set.insert(s, e);
                }
            }
            // Of those, zeros for sure: private memory with no page nor swap
            // entry left, or a hole of the memfd behind shared memory.
            let mut zeros = RangeSet::new();
            let mut unbacked = gone.clone();
            if !r.kind().has_page_cache() {
                for (a, b) in swapped.iter() {
                    unbacked.remove(a, b);
                }
            }
            for (s, e) in gone.iter() {
                set.insert(s - base, e - base);
            }
            for (s, e) in unbacked.iter() {
                let (off, len) = ((s - base) as usize, (e - s) as usize);
                if !r.kind().has_page_cache() || r.is_hole(off, len) {
                    zeros.insert(s - base, e - base);
                }
            }
            // What was reported gone stays in the baseline: it has no page to
            // protect, so a write the consumer reads after this collect and a
            // discard before the next one would leave no trace. It is
            // reported again while it stays gone (reading it, as a pre-copy
            // round does, maps the zero page and ends that).
            for (s, e) in gone.iter() {
                present.insert(s, e);
            }
            self.present[i] = present;
            for (s, e) in populated {
                let mut scan = pm.scan(ScanRequest::harvest_written(s, e));
                for reg in scan.by_ref() {
                    let reg = reg?;
                    set.insert(reg.start - base, reg.end - base);
                }
                calls += scan.calls();
            }
            out.push(DirtyRegion { ranges: set, zeros });
        }
        let stats = CollectStats::tally(&out, t0.elapsed(), calls);
        Ok((out, stats))
    }
}

impl Tracker for DirtyTracker {
    fn collect(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        if self.stopped {
            return Err(TrackError::Stopped);
        }
        if self.lent {
            return Err(TrackError::Lent);
        }
        match (self.backend, &mut self.sync) {
            (Backend::WpAsync, _) => self.collect_async(),
            (Backend::SyncWp, Some(s)) => s.collect(&self.regions),
            (Backend::SyncWp, None) => Err(TrackError::Stopped),
        }
    }

    fn name(&self) -> &'static str {
        match self.backend {
            Backend::WpAsync => "wp-async",
            Backend::SyncWp => "sync-wp",
        }
    }

    fn live_support(&self) -> LiveSupport {
        if self.backend == Backend::WpAsync && livepage_uffd::probe::capabilities().wp_handover {
            LiveSupport::HandOver
        } else {
            LiveSupport::None
        }
    }

    fn collect_and_lend(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        if self.live_support() != LiveSupport::HandOver {
            return Err(TrackError::NoLiveSupport(self.name()));
        }
        let out = self.collect()?;
        let uffd = self
            .discards
            .as_ref()
            .ok_or(TrackError::Stopped)?
            .policy()
            .uffd();
        for (i, r) in self.regions.iter().enumerate() {
            if let Err(e) = uffd.unregister_keeping_protection(r.addr(), r.len()) {
                // Keep tracking what was let go (its bits are intact).
                for done in &self.regions[..i] {
                    let _ = done.register(uffd, RegisterMode::WP);
                }
                return Err(e.into());
            }
        }
        self.lent = true;
        Ok(out)
    }

    fn take_back(&mut self, discarded: &[(u64, u64)]) -> Result<(), TrackError> {
        if !self.lent {
            return Ok(());
        }
        let log = self.discards.as_ref().ok_or(TrackError::Stopped)?.policy();
        for &(s, e) in discarded {
            log.record(s, e);
        }
        register_all(&self.regions, log.uffd(), RegisterMode::WP)?;
        self.lent = false;
        Ok(())
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Registers every region, or none.
pub(crate) fn register_all(
    regions: &[Arc<Region>],
    uffd: &Uffd,
    mode: RegisterMode,
) -> Result<(), TrackError> {
    for (i, r) in regions.iter().enumerate() {
        if let Err(e) = r.register(uffd, mode) {
            for done in &regions[..i] {
                let _ = done.unregister(uffd);
            }
            return Err(e.into());
        }
    }
    Ok(())
}
