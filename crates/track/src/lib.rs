//! Incremental dirty tracking: which pages were written since the last
//! [`DirtyTracker::collect`].
//!
//! Backends (chosen by probing, overridable):
//! - [`Backend::WpAsync`] (default on Linux 6.7+): an async write-protect
//!   userfaultfd. The kernel resolves write faults itself and only clears the
//!   page's uffd-wp bit: no message, no handler thread. `collect` harvests
//!   written pages with PAGEMAP_SCAN and re-protects exactly those in the same
//!   walk (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`), under the page-table
//!   lock, so a racing write is either reported now or faults afterwards and is
//!   reported next time: never lost (it may be reported twice).
//! - [`Backend::SyncWp`] (Linux 5.7 to 6.6): a handler thread receives each
//!   first write as a fault, marks the page in a bitmap and un-protects it.
//!   `collect` swaps the bitmap and re-protects the pages it reports before
//!   returning, so a write after the report faults again.
//!
//! Reported ranges are merged and page aligned (4 KiB, or 2 MiB on hugetlb).
//!
//! Known limit of the sync backend: MADV_DONTNEED on tracked *anonymous*
//! memory drops the page together with its protection, so a later write there
//! is not seen (the async backend reports a zapped page as written).
//!
//! [`write_checkpoint`] turns a collect into a delta image (or writes a full
//! base image); [`DirtyTracker::precopy_round`] hands out dirty ranges with
//! their contents, the building block of pre-copy migration.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{PageBitmap, RangeSet, Region, RegionError};
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::{
    Categories, CreateError, Event, EventBuffer, Features, Pagemap, RangeError, RegisterMode,
    Resolved, ScanError, ScanRequest, Uffd, UffdBuilder,
};
use serde::Serialize;

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
}

/// Why tracking could not start or a collect failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// No usable backend or userfaultfd.
    #[error("cannot create the tracking userfaultfd")]
    Uffd(#[from] CreateError),
    /// The requested backend needs features this kernel lacks.
    #[error("the {backend:?} backend needs userfaultfd features {missing:?} this kernel lacks")]
    Unsupported {
        /// Backend.
        backend: Backend,
        /// Missing features.
        missing: Features,
    },
    /// Registration or protection failed.
    #[error("registering or protecting a region failed")]
    Region(#[from] RegionError),
    /// An ioctl failed.
    #[error("write-protect ioctl failed")]
    Kernel(#[from] RangeError),
    /// PAGEMAP_SCAN failed.
    #[error("PAGEMAP_SCAN failed")]
    Scan(#[from] ScanError),
    /// Writing a checkpoint image failed.
    #[error("writing the checkpoint image failed")]
    Image(#[from] livepage_image::ImageError),
    /// The handler thread failed (sync backend).
    #[error("the write-protect handler failed: {0}")]
    Handler(String),
}

/// The pages of one region written since the previous collect.
#[derive(Debug, Clone, Default)]
pub struct DirtyRegion {
    /// Byte ranges, relative to the region start, merged.
    pub ranges: RangeSet,
}

/// Statistics of one collect.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CollectStats {
    /// Bytes reported dirty.
    pub dirty_bytes: u64,
    /// Disjoint ranges reported.
    pub ranges: usize,
    /// PAGEMAP_SCAN ioctls issued (async backend).
    pub scan_calls: u64,
    /// How long the collect took (harvest and re-protect).
    pub duration: Duration,
}

struct SyncState {
    dirty: Vec<PageBitmap>,
    stop: EventFd,
    failed: std::sync::Mutex<Option<String>>,
}

/// Tracks writes to a set of regions.
pub struct DirtyTracker {
    backend: Backend,
    regions: Vec<Arc<Region>>,
    uffd: Arc<Uffd>,
    pagemap: Option<Pagemap>,
    sync: Option<Arc<SyncState>>,
    handler: Option<JoinHandle<()>>,
    released: AtomicBool,
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
        let backend = match backend.or_else(Backend::probe) {
            Some(b) => b,
            None => {
                return Err(TrackError::Unsupported {
                    backend: Backend::SyncWp,
                    missing: Features::PAGEFAULT_FLAG_WP,
                });
            }
        };
        let mut features = match backend {
            Backend::WpAsync => Features::WP_ASYNC,
            Backend::SyncWp => Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED,
        };
        if backend == Backend::SyncWp && regions.iter().any(|r| r.kind().has_page_cache()) {
            features |= Features::WP_HUGETLBFS_SHMEM;
        }
        let supported = livepage_uffd::probe::capabilities().features;
        if !supported.contains(features) {
            return Err(TrackError::Unsupported {
                backend,
                missing: features.difference(supported),
            });
        }
        let uffd = Arc::new(
            UffdBuilder::new()
                .non_blocking(true)
                .features(features)
                .create()?,
        );
        for (i, r) in regions.iter().enumerate() {
            if let Err(e) = r.register(&uffd, RegisterMode::WP) {
                for done in &regions[..i] {
                    let _ = done.unregister(&uffd);
                }
                return Err(e.into());
            }
        }
        let mut t = DirtyTracker {
            backend,
            regions,
            uffd,
            pagemap: None,
            sync: None,
            handler: None,
            released: AtomicBool::new(false),
        };
        match backend {
            Backend::WpAsync => {
                // Arm with one harvest: it protects what is populated. A page that
                // appears later has no uffd-wp bit, so it reads as written anyway;
                // arming costs what is populated, not the reserved size.
                t.pagemap = Some(Pagemap::open_self()?);
                t.collect()?;
            }
            Backend::SyncWp => {
                // WP_UNPOPULATED markers make first writes to untouched pages fault too.
                for r in &t.regions {
                    let _ = t.uffd.write_protect(r.addr(), r.len(), true, false)?;
                }
                let state = Arc::new(SyncState {
                    dirty: t
                        .regions
                        .iter()
                        .map(|r| PageBitmap::new(r.pages()))
                        .collect(),
                    stop: EventFd::new().map_err(|e| TrackError::Handler(e.to_string()))?,
                    failed: std::sync::Mutex::new(None),
                });
                let (u, s) = (t.uffd.clone(), state.clone());
                let spans: Vec<(usize, usize, usize)> = t
                    .regions
                    .iter()
                    .map(|r| (r.addr(), r.len(), r.page_size()))
                    .collect();
                t.handler = Some(std::thread::spawn(move || sync_handler(&u, &s, &spans)));
                t.sync = Some(state);
            }
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

    /// Returns the pages written since the previous collect (per region) and
    /// re-arms exactly those. A write racing the collect is reported now or next
    /// time, never lost.
    pub fn collect(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(self.regions.len());
        let mut stats = CollectStats::default();
        match self.backend {
            Backend::WpAsync => {
                let pm = self
                    .pagemap
                    .as_mut()
                    .ok_or_else(|| TrackError::Handler("no pagemap".into()))?;
                for r in &self.regions {
                    let base = r.addr() as u64;
                    let end = base + r.len() as u64;
                    // First the populated runs (a read-only walk), then the harvest on
                    // those runs only. A harvest (WP_MATCHING) over holes would
                    // protect the holes too, filling page tables with markers across a
                    // large sparse reservation and making every later walk cost its
                    // reserved size. A page populated later has no uffd-wp bit, so
                    // the next collect finds it present and reports it as written.
                    let mut populated = Vec::new();
                    let present = Categories::PRESENT | Categories::SWAPPED;
                    let mut scan =
                        pm.scan(ScanRequest::any_of(base, end, present, Categories::empty()));
                    for reg in scan.by_ref() {
                        let reg = reg?;
                        populated.push((reg.start, reg.end));
                    }
                    stats.scan_calls += scan.calls();
                    let mut set = RangeSet::new();
                    for (s, e) in populated {
                        let mut scan = pm.scan(ScanRequest::harvest_written(s, e));
                        for reg in scan.by_ref() {
                            let reg = reg?;
                            set.insert(reg.start - base, reg.end - base);
                        }
                        stats.scan_calls += scan.calls();
                    }
                    out.push(DirtyRegion { ranges: set });
                }
            }
            Backend::SyncWp => {
                let state = self
                    .sync
                    .as_ref()
                    .ok_or_else(|| TrackError::Handler("no handler state".into()))?;
                if let Some(e) = state.failed.lock().ok().and_then(|f| f.clone()) {
                    return Err(TrackError::Handler(e));
                }
                for (r, bitmap) in self.regions.iter().zip(&state.dirty) {
                    let ps = r.page_size() as u64;
                    let mut set = RangeSet::new();
                    // Clear, then re-protect below before reporting: a write after
                    // the re-protect faults again and is marked anew.
                    for p in bitmap.take_set() {
                        set.insert(p as u64 * ps, (p as u64 + 1) * ps);
                    }
                    for (s, e) in set.iter() {
                        // EAGAIN: an event (a discard) is pending; the handler reads it.
                        while self.uffd.write_protect(
                            r.addr() + s as usize,
                            (e - s) as usize,
                            true,
                            false,
                        )? == Resolved::EventPending
                        {
                            std::thread::yield_now();
                        }
                    }
                    out.push(DirtyRegion { ranges: set });
                }
            }
        }
        for d in &out {
            stats.dirty_bytes += d.ranges.total();
            stats.ranges += d.ranges.len();
        }
        stats.duration = t0.elapsed();
        Ok((out, stats))
    }

    /// Stops tracking (also on drop): unregisters every region.
    pub fn stop(&mut self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for r in &self.regions {
            let _ = r.unregister(&self.uffd);
        }
        if let Some(s) = &self.sync {
            s.stop.signal();
        }
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

impl DirtyTracker {
    /// One pre-copy round: collects the pages written since the previous
    /// round and hands each dirty range to `sink` with its current contents
    /// (region index, byte offset in the region, bytes), in address order.
    /// Contents are read after the range was re-armed, so a write racing the
    /// read is sent again next round. This is what migration builds on.
    pub fn precopy_round<F>(&mut self, mut sink: F) -> Result<CollectStats, TrackError>
    where
        F: FnMut(usize, u64, &[u8]) -> Result<(), TrackError>,
    {
        let (dirty, stats) = self.collect()?;
        let mut buf = Vec::new();
        for (i, d) in dirty.iter().enumerate() {
            let r = &self.regions[i];
            for (s, e) in d.ranges.iter() {
                let mut off = s;
                while off < e {
                    let n = (e - off).min(1 << 20) as usize;
                    buf.resize(n, 0);
                    r.read_checked(off as usize, &mut buf)?;
                    sink(i, off, &buf)?;
                    off += n as u64;
                }
            }
        }
        Ok(stats)
    }
}

/// Statistics of a checkpoint image.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointStats {
    /// The image's content hash.
    pub id: String,
    /// Pages stored with data.
    pub data_pages: u64,
    /// Dirty pages found all-zero (holes).
    pub zero_pages: u64,
    /// Data bytes written.
    pub bytes: u64,
    /// Time to write the image.
    pub duration: Duration,
}

/// Writes a checkpoint of `regions` to `path`: a full image when `delta` is
/// None, otherwise a delta of the dirty pages naming `parent`. The caller keeps
/// the memory still while this runs (a brief pause) so the image is one instant.
pub fn write_checkpoint(
    regions: &[Arc<Region>],
    delta: Option<(&[DirtyRegion], livepage_image::ImageId)>,
    path: &std::path::Path,
    vm_state: Option<Vec<u8>>,
) -> Result<(livepage_image::ImageId, CheckpointStats), TrackError> {
    let t0 = Instant::now();
    let descs: Vec<livepage_image::RegionDesc> = regions
        .iter()
        .map(|r| livepage_image::RegionDesc::of(r))
        .collect();
    let w = livepage_image::ImageWriter::create(path, &descs, delta.map(|d| d.1))?;
    if let Some(v) = vm_state {
        w.set_vm_state(v);
    }
    let (mut data, mut zero) = (0u64, 0u64);
    for (i, r) in regions.iter().enumerate() {
        let ps = r.page_size();
        let whole;
        let ranges: &RangeSet = match delta {
            Some((dirty, _)) => &dirty[i].ranges,
            None => {
                let mut all = RangeSet::new();
                all.insert(0, r.len() as u64);
                whole = all;
                &whole
            }
        };
        let mut buf = Vec::new();
        for (s, e) in ranges.iter() {
            let mut off = s;
            while off < e {
                let n = ((e - off).min(1 << 20) as usize).max(ps);
                buf.resize(n, 0);
                if r.is_hole(off as usize, n) {
                    buf.fill(0);
                } else {
                    r.read_checked(off as usize, &mut buf)?;
                }
                for (k, page) in buf.chunks(ps).enumerate() {
                    let g = w.global_page(i, off / ps as u64 + k as u64);
                    if page.iter().all(|b| *b == 0) {
                        w.mark_zero(g);
                        zero += 1;
                    } else {
                        w.write_page(g, page)?;
                        data += 1;
                    }
                }
                off += n as u64;
            }
        }
    }
    let bytes = w.bytes_written();
    let id = w.finish()?;
    Ok((
        id,
        CheckpointStats {
            id: id.to_string(),
            data_pages: data,
            zero_pages: zero,
            bytes,
            duration: t0.elapsed(),
        },
    ))
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sync backend's handler: let the write through, then mark the page.
/// In this order a collect either sees the mark (and re-protects the page) or
/// runs before it, in which case the next collect reports the page; marking
/// first could let a collect clear the mark and re-protect before the write
/// lands, losing it.
fn sync_handler(uffd: &Uffd, state: &SyncState, spans: &[(usize, usize, usize)]) {
    let mut events = EventBuffer::new(64);
    loop {
        match poll_readable([std::os::fd::AsFd::as_fd(uffd), state.stop.as_fd()], -1) {
            Ok(r) if r[1] => return,
            Ok(_) => {}
            Err(e) => {
                if let Ok(mut f) = state.failed.lock() {
                    f.get_or_insert(format!("poll: {e}"));
                }
                return;
            }
        }
        let evs = match uffd.read_events(&mut events) {
            Ok(evs) => evs,
            Err(e) => {
                if let Ok(mut f) = state.failed.lock() {
                    f.get_or_insert(e.to_string());
                }
                return;
            }
        };
        for ev in evs {
            let Event::PageFault(pf) = ev else { continue };
            let addr = pf.address as usize;
            let Some((i, &(base, _, ps))) = spans
                .iter()
                .enumerate()
                .find(|(_, (b, l, _))| addr >= *b && addr < b + l)
            else {
                continue;
            };
            let page = (addr - base) / ps;
            loop {
                match uffd.write_protect(base + page * ps, ps, false, false) {
                    Ok(Resolved::EventPending) => std::thread::yield_now(),
                    Ok(_) => break,
                    Err(e) => {
                        if let Ok(mut f) = state.failed.lock() {
                            f.get_or_insert(e.to_string());
                        }
                        break;
                    }
                }
            }
            state.dirty[i].set(page);
        }
    }
}
