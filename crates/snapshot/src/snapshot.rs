//! Preparing, arming and finishing a snapshot.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_image::{ImageWriter, RegionDesc};
use livepage_mem::{MemoryKind, PageBitmap, RangeSet, Region, RegionTable};
use livepage_runtime::{Runtime, RuntimeOptions};
use livepage_uffd::{Features, RangeError, RegisterMode, Resolved, UffdBuilder};

use crate::buffer::CowBuffer;
use crate::engine::{Counters, Engine};
use crate::{Progress, Protection, Scope, SnapshotError, SnapshotOptions, SnapshotStats};

/// A running snapshot. Dropping it without [`Snapshot::wait`] cancels it.
pub struct Snapshot {
    shared: Arc<Engine>,
    writer: Option<JoinHandle<()>>,
    rt: Option<Runtime<Engine>>,
    arm: Duration,
    started: Instant,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("progress", &self.progress())
            .finish_non_exhaustive()
    }
}

/// The features a snapshot needs, for the memory types in `regions`.
pub fn required_features(regions: &[Arc<Region>]) -> Features {
    let mut f = Features::PAGEFAULT_FLAG_WP
        | Features::WP_UNPOPULATED
        | Features::EVENT_REMOVE
        | Features::EVENT_UNMAP;
    if regions.iter().any(|r| r.kind().has_page_cache()) {
        f |= Features::WP_HUGETLBFS_SHMEM;
    }
    f
}

/// Prepares and arms a snapshot in one call; see [`prepare`] and
/// [`Prepared::arm`]. The snapshot's instant is when this returns.
pub fn start(
    regions: Vec<Arc<Region>>,
    output: &Path,
    opts: SnapshotOptions,
) -> Result<Snapshot, SnapshotError> {
    prepare(regions, output, opts)?.arm()
}

/// Everything a snapshot needs before its instant: the image file (an
/// unwritable destination fails here, before anything is armed), the
/// userfaultfd, the buffer, the regions registered for write-protect, and the
/// handler threads. Arming is then one write-protect per region, so a caller
/// pauses its workload only around [`Prepared::arm`].
pub struct Prepared {
    shared: Arc<Engine>,
    rt: Option<Runtime<Engine>>,
    arm_threads: usize,
    protection: Protection,
}

/// Runs of more than this many ranges are protected with one walk of the
/// whole regions instead of one ioctl each.
const MAX_RANGE_IOCTLS: usize = 256;

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("pages", &self.shared.regions.total())
            .finish_non_exhaustive()
    }
}

/// Prepares a snapshot of `regions` into `output` (which must not exist).
pub fn prepare(
    regions: Vec<Arc<Region>>,
    output: &Path,
    opts: SnapshotOptions,
) -> Result<Prepared, SnapshotError> {
    if regions.is_empty() {
        return Err(SnapshotError::NoRegions);
    }
    // The buffer can never hold more than the memory it copies; what it can
    // grow to must fit in what the machine has free, or saving could fail
    // half way. Refused before anything is created or armed.
    let memory: u64 = regions.iter().map(|r| r.len() as u64).sum();
    let bound = (opts.buffer_bytes as u64).min(memory);
    if let Some(available) = livepage_uffd::mm::mem_available() {
        if bound > available {
            return Err(SnapshotError::BufferTooLarge {
                requested: opts.buffer_bytes as u64,
                can_grow_to: bound,
                available,
            });
        }
    }
    let descs: Vec<RegionDesc> = regions.iter().map(|r| RegionDesc::of(r)).collect();
    let image = ImageWriter::create(output, &descs, opts.parent)?;
    if let Some(v) = &opts.vm_state {
        image.set_vm_state(v.clone());
    }
    let needed = required_features(&regions);
    let supported = livepage_uffd::probe::capabilities().features;
    if !supported.contains(needed) {
        return Err(SnapshotError::MissingFeatures(needed.difference(supported)));
    }
    let uffd = UffdBuilder::new()
        .non_blocking(true)
        .features(needed)
        .create()?;
    let canary = Region::new(MemoryKind::Anon, 4096)?;
    canary.fill(0, 4096, 1)?;
    canary.register(&uffd, RegisterMode::WP)?;
    let table = RegionTable::new(&regions);
    let total = table.total();
    let slot_size = table.max_page_size();
    let buffer = CowBuffer::new(bound as usize, slot_size);
    // Registering changes nothing for the workload until pages are protected.
    // Regions a tracker still holds are registered at arming, once handed over.
    let handed_over = matches!(opts.protection, Protection::HandedOver { .. });
    let mut registered: Vec<&Arc<Region>> = Vec::new();
    for r in regions.iter().filter(|_| !handed_over) {
        if let Err(e) = r.register(&uffd, RegisterMode::WP) {
            for done in registered {
                let _ = done.unregister(&uffd);
            }
            return Err(e.into());
        }
        registered.push(r);
    }
    let shared = Arc::new(Engine {
        fds: [uffd],
        canary,
        regions: table,
        claimed: PageBitmap::new(total as usize),
        done: PageBitmap::new(total as usize),
        done_count: AtomicU64::new(0),
        image,
        buffer,
        counters: Counters::default(),
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        released: AtomicBool::new(false),
        read_lock: Mutex::new(()),
        event_page: Mutex::new(vec![0u8; slot_size]),
        chunk_pages: opts.chunk_pages.max(1),
        hold_writer: AtomicBool::new(false),
        writer_parked: AtomicBool::new(false),
        keep_protection: handed_over,
        outside: AtomicU64::new(0),
        pages_saved: AtomicBool::new(false),
        written_at: Mutex::new(None),
        image_id: Mutex::new(None),
        discarded: Mutex::new(Vec::new()),
    });
    let rt = match Runtime::start(
        shared.clone(),
        RuntimeOptions::new("lp-snap", opts.handler_threads.max(1)),
    ) {
        Ok(rt) => rt,
        Err(e) => {
            shared.release();
            return Err(SnapshotError::Thread(e));
        }
    };
    Ok(Prepared {
        shared,
        rt: Some(rt),
        arm_threads: opts.arm_threads,
        protection: opts.protection,
    })
}

impl Prepared {
    /// The instant: write-protects every region and starts the writer.
    pub fn arm(self) -> Result<Snapshot, SnapshotError> {
        self.arm_inner(None)
    }

    /// The instant of a delta: saves only `scope`'s pages (the image names
    /// [`SnapshotOptions::parent`]); every other page is left to the parent.
    /// With [`Protection::Arm`] only the scope is protected (or everything,
    /// when it is many runs); with [`Protection::HandedOver`] the tracker's
    /// protection is taken over as it is.
    pub fn arm_scope(self, scope: &Scope) -> Result<Snapshot, SnapshotError> {
        self.arm_inner(Some(scope))
    }

    /// Marks every page outside `scope` saved, and its zero pages stored.
    fn apply_scope(&self, scope: &Scope) -> Result<(), SnapshotError> {
        let sh = &self.shared;
        let n = sh.regions.iter().count();
        if scope.pages.len() != n || !(scope.zeros.is_empty() || scope.zeros.len() == n) {
            return Err(SnapshotError::ScopeMismatch {
                expected: n,
                got: scope.pages.len(),
            });
        }
        let total = sh.regions.total() as usize;
        sh.claimed.set_range(0, total);
        sh.done.set_range(0, total);
        for (t, ranges) in sh.regions.iter().zip(&scope.pages) {
            let ps = t.page_size as u64;
            for (s, e) in ranges.iter() {
                // Rounded out to whole pages: a 4 KiB range of a 2 MiB page
                // (KVM's dirty log on hugetlbfs) saves the huge page.
                let (a, b) = (s / ps, e.div_ceil(ps).min(t.pages));
                if a < b {
                    sh.claimed
                        .clear_range((t.first + a) as usize, (t.first + b) as usize);
                    sh.done
                        .clear_range((t.first + a) as usize, (t.first + b) as usize);
                }
            }
        }
        // Counted from the bitmap: several ranges may share a page.
        let outside = sh.claimed.count() as u64;
        sh.outside.store(outside, Ordering::Relaxed);
        sh.done_count.store(outside, Ordering::Relaxed);
        for (t, zeros) in sh.regions.iter().zip(&scope.zeros) {
            let ps = t.page_size as u64;
            for (s, e) in zeros.iter() {
                for p in s / ps..e.div_ceil(ps).min(t.pages) {
                    let g = t.first + p;
                    if sh.claimed.set(g as usize) {
                        sh.image.mark_zero(g);
                        sh.counters.zero.fetch_add(1, Ordering::Relaxed);
                        sh.mark_done(g);
                    }
                }
            }
        }
        Ok(())
    }

    /// The pieces to write-protect at the instant: whole regions split for
    /// parallel walks, or a delta's runs when they are few.
    fn pieces(&self, scope: Option<&Scope>, cpus: usize) -> Vec<(usize, usize)> {
        let sh = &self.shared;
        match (self.protection, scope) {
            (Protection::HandedOver { protect_all: false }, _) => return Vec::new(),
            (Protection::Arm, Some(sc)) => {
                let runs: usize = sc.pages.iter().map(RangeSet::len).sum();
                if runs <= MAX_RANGE_IOCTLS {
                    let mut out = Vec::with_capacity(runs);
                    for (t, ranges) in sh.regions.iter().zip(&sc.pages) {
                        let ps = t.page_size as u64;
                        for (s, e) in ranges.iter() {
                            // Whole pages (a 4 KiB range of a huge page protects it).
                            let s = s / ps * ps;
                            let e = e.div_ceil(ps).saturating_mul(ps).min(t.region.len() as u64);
                            if s < e {
                                out.push((t.region.addr() + s as usize, (e - s) as usize));
                            }
                        }
                    }
                    return out;
                }
            }
            _ => {}
        }
        let mut pieces = Vec::new();
        for t in &sh.regions {
            let align = t.page_size.max(2 << 20);
            let step = (t.region.len() / cpus).next_multiple_of(align).max(align);
            let mut off = 0;
            while off < t.region.len() {
                let len = step.min(t.region.len() - off);
                pieces.push((t.region.addr() + off, len));
                off += len;
            }
        }
        pieces
    }

    fn arm_inner(mut self, scope: Option<&Scope>) -> Result<Snapshot, SnapshotError> {
        let t0 = Instant::now();
        if let Some(sc) = scope {
            if let Err(e) = self.apply_scope(sc) {
                self.shared.fail(SnapshotError::Cancelled);
                return Err(e);
            }
        }
        if matches!(self.protection, Protection::HandedOver { .. }) {
            // The tracker has let go of the regions: take them with its bits.
            for t in &self.shared.regions {
                if let Err(e) = t.region.register(self.shared.uffd(), RegisterMode::WP) {
                    self.shared.fail(e.into());
                    return Err(self.shared.take_error().unwrap_or(SnapshotError::Cancelled));
                }
            }
        }
        // Write-protect in parallel pieces: the kernel walks page tables under
        // the mmap read lock, so the pieces proceed side by side.
        let cpus = if self.arm_threads == 0 {
            livepage_uffd::mm::online_cpus().max(1)
        } else {
            self.arm_threads
        };
        let pieces = self.pieces(scope, cpus);
        let uffd = self.shared.uffd();
        let results: Vec<Result<Resolved, RangeError>> = std::thread::scope(|s| {
            if pieces.len() <= 1 || pieces.len() > cpus * 4 {
                return pieces
                    .iter()
                    .map(|&(a, l)| uffd.write_protect(a, l, true, false))
                    .collect();
            }
            let handles: Vec<_> = pieces
                .iter()
                .map(|&(a, l)| s.spawn(move || uffd.write_protect(a, l, true, false)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Ok(Resolved::EventPending)))
                .collect()
        });
        for r in results {
            let e = match r {
                Ok(Resolved::All) => continue,
                Ok(other) => SnapshotError::ArmIncomplete(other),
                Err(e) => e.into(),
            };
            self.shared.fail(e);
            return Err(self.shared.take_error().unwrap_or(SnapshotError::Cancelled));
        }
        let arm = t0.elapsed();
        let started = Instant::now();
        let Some(rt) = self.rt.take() else {
            return Err(SnapshotError::Cancelled);
        };
        let writer = match rt.spawn_worker("lp-snap-write", |e: &Engine, _| e.writer_loop()) {
            Ok(w) => w,
            Err(e) => {
                self.shared.fail(SnapshotError::Thread(e));
                return Err(self.shared.take_error().unwrap_or(SnapshotError::Cancelled));
            }
        };
        Ok(Snapshot {
            shared: self.shared.clone(),
            writer: Some(writer),
            rt: Some(rt),
            arm,
            started,
        })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(mut rt) = self.rt.take() {
            // Never armed (or arming failed): undo the registration, stop the handlers.
            self.shared.fail(SnapshotError::Cancelled);
            let _ = rt.stop();
        }
    }
}

impl Snapshot {
    /// Current progress.
    pub fn progress(&self) -> Progress {
        let c = &self.shared.counters;
        let outside = self.shared.outside.load(Ordering::Relaxed);
        Progress {
            pages: self.shared.scope_pages(),
            saved: self.shared.done_count.load(Ordering::Relaxed) - outside,
            buffered_bytes: (self.shared.buffer.in_use() * self.shared.buffer.slot_size()) as u64,
            faults: c.faults.load(Ordering::Relaxed),
        }
    }

    /// How long arming took.
    pub fn arm_duration(&self) -> Duration {
        self.arm
    }

    /// A handle another thread can ask whether every page is saved.
    pub fn watch(&self) -> Watch {
        Watch {
            shared: self.shared.clone(),
        }
    }

    /// Aborts the snapshot: protection is lifted and no image is written.
    pub fn cancel(&self) {
        self.shared.fail(SnapshotError::Cancelled);
    }

    /// Whether every page is saved (the image may still be being synced):
    /// the moment [`Snapshot::hand_back`] may be called.
    pub fn saved(&self) -> bool {
        self.shared.pages_saved.load(Ordering::SeqCst)
    }

    /// With [`Protection::HandedOver`], once [`Snapshot::saved`]: ends the
    /// registration, leaving the protection
    /// in the page tables for the tracker, which registers the regions
    /// again right after. The workload must be paused from this call until
    /// the tracker has registered: a write in between would be seen by
    /// nobody. The image is finished in the background; [`Snapshot::wait`]
    /// returns it. Returns the ranges discarded since the instant (their
    /// contents changed without a write).
    pub fn hand_back(&mut self) -> Result<Vec<(u64, u64)>, SnapshotError> {
        if !self.saved() || !self.shared.keep_protection {
            return Err(SnapshotError::NotSaved);
        }
        // The handler threads have nothing left to serve; they are stopped
        // by `wait`, outside the caller's pause.
        self.shared.hand_back()?;
        Ok(self
            .shared
            .discarded
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default())
    }

    /// Waits for the image to be complete and returns the statistics. What
    /// protection is left is lifted (with [`Protection::HandedOver`] and no
    /// [`Snapshot::hand_back`] before, the tracker then finds every page
    /// written: safe, not cheap).
    pub fn wait(mut self) -> Result<SnapshotStats, SnapshotError> {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.shared.release();
        if let Some(mut rt) = self.rt.take() {
            let _ = rt.stop();
        }
        if let Some(e) = self.shared.take_error() {
            return Err(e);
        }
        let shared = &self.shared;
        let Some(id) = shared.image_id.lock().ok().and_then(|mut i| i.take()) else {
            return Err(SnapshotError::Cancelled);
        };
        // From the instant to the image complete (not to this call).
        let duration = match shared.written_at.lock().ok().and_then(|t| *t) {
            Some(t) => t.saturating_duration_since(self.started),
            None => self.started.elapsed(),
        };
        let c = &shared.counters;
        let zero = c.zero.load(Ordering::Relaxed);
        let pages = shared.scope_pages();
        Ok(SnapshotStats {
            image_id: id,
            pages,
            data_pages: pages - zero,
            zero_pages: zero,
            by_writer: c.by_writer.load(Ordering::Relaxed),
            by_fault_buffered: c.by_fault_buffered.load(Ordering::Relaxed),
            by_fault_sync: c.by_fault_sync.load(Ordering::Relaxed),
            by_fault_zero: c.by_fault_zero.load(Ordering::Relaxed),
            remove_saves: c.remove_saves.load(Ordering::Relaxed),
            late_remove_saves: c.late_remove_saves.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            bytes_written: shared.image.bytes_written(),
            peak_buffer_bytes: (shared.buffer.peak() * shared.buffer.slot_size()) as u64,
            arm: self.arm,
            duration,
        })
    }
}

/// Tells whether a snapshot's pages are all saved (see [`Snapshot::watch`]).
#[derive(Clone)]
pub struct Watch {
    shared: Arc<Engine>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("saved", &self.is_saved())
            .finish()
    }
}

impl Watch {
    /// Every page is saved, or the snapshot failed: the moment to pause the
    /// workload for [`Snapshot::hand_back`] (or to call [`Snapshot::wait`]).
    pub fn is_saved(&self) -> bool {
        self.shared.pages_saved.load(Ordering::SeqCst) || self.shared.aborted()
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.writer.is_some() || self.rt.is_some() {
            self.shared.fail(SnapshotError::Cancelled);
            if let Some(w) = self.writer.take() {
                let _ = w.join();
            }
            self.shared.release();
            if let Some(mut rt) = self.rt.take() {
                let _ = rt.stop();
            }
        }
    }
}
