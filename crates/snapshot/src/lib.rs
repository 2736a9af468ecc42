//! Live snapshots (async savevm): a point-in-time image of memory taken while
//! the workload keeps running.
//!
//! [`start`] arms userfaultfd write-protection over the regions (that instant
//! is the snapshot's instant) and returns. From then on:
//!
//! - a **background writer** streams pages to the image in address order,
//!   un-protecting runs of pages as soon as they are saved;
//! - a write to a page not yet saved raises a write-protect fault; a
//!   **handler** thread copies the original page into a *bounded* buffer,
//!   lifts the protection and wakes the writer at once. The writer never waits
//!   for the disk while the buffer has room;
//! - when the buffer is full the handler writes the page to the image itself
//!   before waking the writer: the snapshot degrades to synchronous saving,
//!   never to unbounded memory. A buffer of 0 is QEMU's behaviour;
//! - zero pages are stored as holes; never-touched pages are caught too
//!   (WP_UNPOPULATED markers); granularity is 4 KiB even on THP.
//!
//! Every page is saved exactly once: a claim bit per page decides between the
//! writer and the handlers, and a done bit tells a handler when a page claimed
//! by the writer may be released.
//!
//! Discards: while a REMOVE event (MADV_DONTNEED, a balloon) is pending, the
//! discarding thread is blocked and every resolving ioctl fails with EAGAIN.
//! Before reading events a handler probes for that state (a no-op
//! write-protect of a private canary page); if an event is pending it saves
//! every page not yet saved, synchronously, and only then reads the event, so
//! the discarded memory keeps its contents from the snapshot instant. An
//! event that arrives in the few microseconds between the probe and the read
//! is caught by the saves that follow immediately; such cases are counted in
//! [`SnapshotStats::late_remove_saves`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_image::{ImageError, ImageId, ImageWriter, RegionDesc};
use livepage_mem::{MemoryKind, PageBitmap, Region, RegionError, RegionTable};
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::{
    CreateError, Event, EventBuffer, Features, RangeError, RegisterMode, Resolved, Uffd,
    UffdBuilder,
};
use serde::Serialize;

/// Options of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Bytes of copy-on-write buffer (0: every write to an unsaved page waits
    /// for the disk).
    pub buffer_bytes: usize,
    /// Threads serving write-protect faults (at least 1).
    pub handler_threads: usize,
    /// Pages the background writer claims and saves per step.
    pub chunk_pages: usize,
    /// The VM state section of the image.
    pub vm_state: Option<Vec<u8>>,
    /// Threads that write-protect pieces of the regions at the instant
    /// (0: one per online CPU).
    pub arm_threads: usize,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            buffer_bytes: 64 << 20,
            handler_threads: 1,
            chunk_pages: 256,
            vm_state: None,
            arm_threads: 0,
        }
    }
}

/// Why a snapshot could not start or did not complete. After any error the
/// protection is lifted, the workload runs on, and no image is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No userfaultfd.
    #[error("cannot create a userfaultfd for the snapshot")]
    Uffd(#[from] CreateError),
    /// The kernel lacks a feature the snapshot needs.
    #[error("the kernel lacks userfaultfd features {0:?} needed for live snapshots")]
    MissingFeatures(Features),
    /// A region could not be registered or protected.
    #[error("arming write-protection failed")]
    Region(#[from] RegionError),
    /// A resolving ioctl failed.
    #[error("userfaultfd ioctl failed")]
    Kernel(#[from] RangeError),
    /// Writing the image failed (unwritable or full destination, …).
    #[error("writing the image failed")]
    Image(#[from] ImageError),
    /// The snapshot was cancelled.
    #[error("the snapshot was cancelled")]
    Cancelled,
    /// A region was unmapped while the snapshot ran.
    #[error("a snapshotted region was unmapped during the snapshot ({start:#x}..{end:#x})")]
    RegionUnmapped {
        /// Start of the unmapped range.
        start: u64,
        /// End.
        end: u64,
    },
    /// Reading userfaultfd events failed.
    #[error("reading userfaultfd events failed")]
    Read(#[from] livepage_uffd::ReadError),
    /// Invalid options.
    #[error("invalid snapshot request: {0}")]
    Invalid(String),
}

/// Final statistics.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    /// The image's content hash.
    #[serde(serialize_with = "ser_id")]
    pub image_id: ImageId,
    /// Pages in all regions.
    pub pages: u64,
    /// Pages stored with data.
    pub data_pages: u64,
    /// Pages stored as holes.
    pub zero_pages: u64,
    /// Pages saved by the background writer.
    pub by_writer: u64,
    /// Pages copied into the buffer on a write fault.
    pub by_fault_buffered: u64,
    /// Pages written to the image on a write fault because the buffer was full.
    pub by_fault_sync: u64,
    /// Pages found all-zero on a write fault (stored as holes, no buffer used).
    pub by_fault_zero: u64,
    /// Pages saved synchronously because a discard (REMOVE) was pending.
    pub remove_saves: u64,
    /// Pages of a REMOVE read before its probe (see the crate docs).
    pub late_remove_saves: u64,
    /// Write-protect faults served.
    pub faults: u64,
    /// Data bytes written.
    pub bytes_written: u64,
    /// Most buffer bytes in use at once.
    pub peak_buffer_bytes: u64,
    /// Time to register and arm protection (the workload's pause).
    pub arm: Duration,
    /// Time from arming to the image being complete.
    pub duration: Duration,
}

fn ser_id<S: serde::Serializer>(id: &ImageId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_string())
}

/// A snapshot's progress.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Progress {
    /// Pages in all regions.
    pub pages: u64,
    /// Pages saved (to the image or the buffer).
    pub saved: u64,
    /// Buffer bytes in use now.
    pub buffered_bytes: u64,
    /// Write-protect faults served so far.
    pub faults: u64,
}

#[derive(Default)]
struct Counters {
    by_writer: AtomicU64,
    by_fault_buffered: AtomicU64,
    by_fault_sync: AtomicU64,
    by_fault_zero: AtomicU64,
    remove_saves: AtomicU64,
    late_remove_saves: AtomicU64,
    zero: AtomicU64,
    faults: AtomicU64,
    buffered: AtomicU64,
    peak_buffered: AtomicU64,
}

struct Buffer {
    slot_size: usize,
    slots: Vec<Mutex<Vec<u8>>>,
    free: Mutex<Vec<usize>>,
    filled: Mutex<VecDeque<(u64, usize)>>,
}

/// A handler's reusable buffers: one page, the event buffer, the faults read.
struct Scratch {
    page: Vec<u8>,
    events: EventBuffer,
    faults: Vec<u64>,
}

impl Scratch {
    fn new(page_size: usize) -> Scratch {
        Scratch {
            page: vec![0u8; page_size],
            events: EventBuffer::new(64),
            faults: Vec::with_capacity(64),
        }
    }
}

struct Shared {
    uffd: Uffd,
    canary: Region,
    regions: RegionTable,
    claimed: PageBitmap,
    done: PageBitmap,
    done_count: AtomicU64,
    image: ImageWriter,
    buffer: Buffer,
    counters: Counters,
    abort: AtomicBool,
    error: Mutex<Option<SnapshotError>>,
    released: AtomicBool,
    read_lock: Mutex<()>,
    chunk_pages: usize,
    /// Asks the writer to stop touching region memory (an event is pending:
    /// perhaps an unmap, which proceeds as soon as the event is read).
    hold_writer: AtomicBool,
    /// The writer is parked at a chunk boundary or past all region memory.
    writer_parked: AtomicBool,
}

/// A running snapshot. Dropping it without [`Snapshot::wait`] cancels it.
pub struct Snapshot {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    handlers: Vec<JoinHandle<()>>,
    stop: Arc<EventFd>,
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
    shared: Arc<Shared>,
    handlers: Vec<JoinHandle<()>>,
    stop: Arc<EventFd>,
    arm_threads: usize,
}

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
        return Err(SnapshotError::Invalid("no regions to snapshot".into()));
    }
    let descs: Vec<RegionDesc> = regions.iter().map(|r| RegionDesc::of(r)).collect();
    let image = ImageWriter::create(output, &descs, None)?;
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
    let nslots = opts.buffer_bytes / slot_size;
    let buffer = Buffer {
        slot_size,
        slots: (0..nslots).map(|_| Mutex::new(Vec::new())).collect(),
        free: Mutex::new((0..nslots).rev().collect()),
        filled: Mutex::new(VecDeque::new()),
    };
    // Registering changes nothing for the workload until pages are protected.
    let mut registered: Vec<&Arc<Region>> = Vec::new();
    for r in &regions {
        if let Err(e) = r.register(&uffd, RegisterMode::WP) {
            for done in registered {
                let _ = done.unregister(&uffd);
            }
            return Err(e.into());
        }
        registered.push(r);
    }
    let shared = Arc::new(Shared {
        uffd,
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
        chunk_pages: opts.chunk_pages.max(1),
        hold_writer: AtomicBool::new(false),
        writer_parked: AtomicBool::new(false),
    });
    let stop = match EventFd::new() {
        Ok(e) => Arc::new(e),
        Err(e) => {
            shared.release();
            return Err(SnapshotError::Invalid(format!("eventfd: {e}")));
        }
    };
    let handlers = (0..opts.handler_threads.max(1))
        .map(|_| {
            let (s, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || s.handler_loop(&stop))
        })
        .collect();
    Ok(Prepared {
        shared,
        handlers,
        stop,
        arm_threads: opts.arm_threads,
    })
}

impl Prepared {
    /// The instant: write-protects every region and starts the writer.
    pub fn arm(mut self) -> Result<Snapshot, SnapshotError> {
        let t0 = Instant::now();
        // Write-protect in parallel pieces: the kernel walks page tables under
        // the mmap read lock, so the pieces proceed side by side.
        let cpus = if self.arm_threads == 0 {
            livepage_uffd::mm::online_cpus().max(1)
        } else {
            self.arm_threads
        };
        let mut pieces = Vec::new();
        for t in &self.shared.regions {
            let align = t.page_size.max(2 << 20);
            let step = (t.region.len() / cpus).next_multiple_of(align).max(align);
            let mut off = 0;
            while off < t.region.len() {
                let len = step.min(t.region.len() - off);
                pieces.push((t.region.addr() + off, len));
                off += len;
            }
        }
        let uffd = &self.shared.uffd;
        let results: Vec<Result<Resolved, RangeError>> = std::thread::scope(|s| {
            if pieces.len() == 1 {
                return vec![uffd.write_protect(pieces[0].0, pieces[0].1, true, false)];
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
                Ok(other) => SnapshotError::Invalid(format!("arming returned {other:?}")),
                Err(e) => e.into(),
            };
            self.shared.fail(e);
            return Err(self.shared.take_error().unwrap_or(SnapshotError::Cancelled));
        }
        let arm = t0.elapsed();
        let started = Instant::now();
        let s = self.shared.clone();
        let writer = Some(std::thread::spawn(move || s.writer_loop()));
        Ok(Snapshot {
            shared: self.shared.clone(),
            writer,
            handlers: std::mem::take(&mut self.handlers),
            stop: self.stop.clone(),
            arm,
            started,
        })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.handlers.is_empty() {
            // Never armed (or arming failed): undo the registration, stop the handlers.
            self.shared.fail(SnapshotError::Cancelled);
            self.stop.signal();
            for h in self.handlers.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Snapshot {
    /// Current progress.
    pub fn progress(&self) -> Progress {
        let c = &self.shared.counters;
        Progress {
            pages: self.shared.regions.total(),
            saved: self.shared.done_count.load(Ordering::Relaxed),
            buffered_bytes: c.buffered.load(Ordering::Relaxed)
                * self.shared.buffer.slot_size as u64,
            faults: c.faults.load(Ordering::Relaxed),
        }
    }

    /// How long arming took.
    pub fn arm_duration(&self) -> Duration {
        self.arm
    }

    /// Aborts the snapshot: protection is lifted and no image is written.
    pub fn cancel(&self) {
        self.shared.fail(SnapshotError::Cancelled);
    }

    /// Waits for the image to be complete and returns the statistics.
    pub fn wait(mut self) -> Result<SnapshotStats, SnapshotError> {
        if let Some(w) = self.writer.take() {
            if w.join().is_err() {
                self.shared
                    .fail(SnapshotError::Invalid("the writer thread panicked".into()));
            }
        }
        // Lifts all protection (wakes anything still blocked) before the handlers stop.
        self.shared.release();
        self.stop.signal();
        for h in self.handlers.drain(..) {
            let _ = h.join();
        }
        let duration = self.started.elapsed();
        if let Some(e) = self.shared.take_error() {
            return Err(e);
        }
        let shared = &self.shared;
        let c = &shared.counters;
        let zero = c.zero.load(Ordering::Relaxed);
        let bytes_written = shared.image.bytes_written();
        let stats = SnapshotStats {
            image_id: ImageId::default(),
            pages: shared.regions.total(),
            data_pages: shared.regions.total() - zero,
            zero_pages: zero,
            by_writer: c.by_writer.load(Ordering::Relaxed),
            by_fault_buffered: c.by_fault_buffered.load(Ordering::Relaxed),
            by_fault_sync: c.by_fault_sync.load(Ordering::Relaxed),
            by_fault_zero: c.by_fault_zero.load(Ordering::Relaxed),
            remove_saves: c.remove_saves.load(Ordering::Relaxed),
            late_remove_saves: c.late_remove_saves.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            bytes_written,
            peak_buffer_bytes: c.peak_buffered.load(Ordering::Relaxed)
                * shared.buffer.slot_size as u64,
            arm: self.arm,
            duration,
        };
        let id = shared.image.finish()?;
        Ok(SnapshotStats {
            image_id: id,
            ..stats
        })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.writer.is_some() || !self.handlers.is_empty() {
            self.shared.fail(SnapshotError::Cancelled);
            if let Some(w) = self.writer.take() {
                let _ = w.join();
            }
            self.shared.release();
            self.stop.signal();
            for h in self.handlers.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Shared {
    fn fail(&self, e: SnapshotError) {
        // An EFAULT reading region memory means it was unmapped under us.
        let e = match e {
            SnapshotError::Region(RegionError::Unmapped { offset, len, .. }) => {
                SnapshotError::RegionUnmapped {
                    start: offset as u64,
                    end: (offset + len) as u64,
                }
            }
            e => e,
        };
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.abort.store(true, Ordering::SeqCst);
        // Nobody may stay blocked on a protected page once the snapshot is dead.
        self.release();
    }

    fn take_error(&self) -> Option<SnapshotError> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// Unregisters every region (clearing all protection and waking waiters). Once.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for t in &self.regions {
            if t.region.unregister(&self.uffd).is_err() {
                // Part of it was unmapped: release what is left piece by piece.
                let step = t.page_size.max(2 << 20);
                let mut off = 0;
                while off < t.region.len() {
                    let len = step.min(t.region.len() - off);
                    let _ = t.region.unregister_range(&self.uffd, off, len);
                    off += len;
                }
            }
        }
        let _ = self.canary.unregister(&self.uffd);
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions.locate(addr)
    }

    fn mark_done(&self, g: u64) {
        if self.done.set(g as usize) {
            self.done_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn page_addr(&self, r: usize, p: u64) -> usize {
        self.regions.page_addr(r, p)
    }

    /// Writes one claimed page straight to the image (or as a hole).
    fn save_direct(&self, r: usize, p: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let t = &self.regions[r];
        let g = t.first + p;
        t.region.read_checked(p as usize * t.page_size, buf)?;
        if buf.iter().all(|b| *b == 0) {
            self.image.mark_zero(g);
            self.counters.zero.fetch_add(1, Ordering::Relaxed);
        } else {
            self.image.write_page(g, buf)?;
        }
        self.mark_done(g);
        Ok(())
    }

    /// Lifts protection of one page; if an event is pending, handles it first.
    fn unprotect(&self, r: usize, p: u64) -> Result<(), SnapshotError> {
        let (addr, len) = (self.page_addr(r, p), self.regions[r].page_size);
        loop {
            if self.released.load(Ordering::SeqCst) {
                return Ok(());
            }
            match self.uffd.write_protect(addr, len, false, false) {
                Ok(Resolved::EventPending) => self.drain_events()?,
                Ok(_) => return Ok(()),
                // Unregistered meanwhile (completion or abort): nothing left to lift.
                Err(_) if self.released.load(Ordering::SeqCst) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn handle_fault(&self, addr: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let Some((r, p)) = self.locate(addr) else {
            // The canary or an address outside our regions: nothing to save.
            return Ok(());
        };
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let g = self.regions[r].first + p;
        if !self.claimed.set(g as usize) {
            // Saved, or being saved by someone else: wait until the copy is safe.
            while !self.done.get(g as usize) && !self.aborted() {
                std::thread::yield_now();
            }
            return self.unprotect(r, p);
        }
        let t = &self.regions[r];
        let slot = self.buffer.free.lock().ok().and_then(|mut f| f.pop());
        match slot {
            Some(s) => {
                {
                    let mut data = self.buffer.slots[s]
                        .lock()
                        .map_err(|_| SnapshotError::Invalid("buffer poisoned".into()))?;
                    data.resize(self.buffer.slot_size, 0);
                    t.region
                        .read_checked(p as usize * t.page_size, &mut data[..t.page_size])?;
                    if data[..t.page_size].iter().all(|b| *b == 0) {
                        drop(data);
                        self.image.mark_zero(g);
                        self.counters.zero.fetch_add(1, Ordering::Relaxed);
                        self.counters.by_fault_zero.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = self.buffer.free.lock() {
                            f.push(s);
                        }
                        self.mark_done(g);
                        return self.unprotect(r, p);
                    }
                }
                let used = self.counters.buffered.fetch_add(1, Ordering::Relaxed) + 1;
                self.counters
                    .peak_buffered
                    .fetch_max(used, Ordering::Relaxed);
                if let Ok(mut q) = self.buffer.filled.lock() {
                    q.push_back((g, s));
                }
                self.counters
                    .by_fault_buffered
                    .fetch_add(1, Ordering::Relaxed);
            }
            None => {
                // Buffer full: the writer waits for the disk (synchronous saving).
                self.save_direct(r, p, &mut buf[..t.page_size])?;
                self.counters.by_fault_sync.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.mark_done(g);
        self.unprotect(r, p)
    }

    /// Saves every page nobody has claimed yet, synchronously. Used while a
    /// discard is pending (its thread is blocked until we read the event).
    fn save_everything(&self, buf: &mut [u8]) -> Result<u64, SnapshotError> {
        let mut saved = 0;
        for (r, t) in self.regions.iter().enumerate() {
            for p in 0..t.pages {
                let g = t.first + p;
                if self.claimed.set(g as usize) {
                    self.save_direct(r, p, &mut buf[..t.page_size])?;
                    saved += 1;
                }
            }
        }
        Ok(saved)
    }

    /// Handles a pending event found by a failed un-protect: reads events
    /// (safely) and serves the faults that came with them.
    fn drain_events(&self) -> Result<(), SnapshotError> {
        let mut sc = Scratch::new(self.buffer.slot_size);
        self.read_events_safely(&mut sc)?;
        let Scratch { page, faults, .. } = &mut sc;
        for addr in faults.drain(..) {
            self.handle_fault(addr, page)?;
        }
        Ok(())
    }

    /// Reads events under the read lock, after probing for a pending discard
    /// or unmap; handles non-fault events and leaves the faults in `sc.faults`.
    fn read_events_safely(&self, sc: &mut Scratch) -> Result<(), SnapshotError> {
        let _guard = self
            .read_lock
            .lock()
            .map_err(|_| SnapshotError::Invalid("read lock poisoned".into()))?;
        let mut held = false;
        if !self.released.load(Ordering::SeqCst) {
            if let Ok(Resolved::EventPending) =
                self.uffd
                    .write_protect(self.canary.addr(), 4096, true, false)
            {
                // A discard or an unmap is waiting for us to read its event. Park the
                // writer (an unmapped range must not be read once the event is read),
                // then save everything still unsaved while the memory is intact.
                self.hold_writer.store(true, Ordering::SeqCst);
                held = true;
                while !self.writer_parked.load(Ordering::SeqCst) && !self.aborted() {
                    std::thread::yield_now();
                }
                let n = self.save_everything(&mut sc.page)?;
                self.counters.remove_saves.fetch_add(n, Ordering::Relaxed);
            }
        }
        let result = self.read_and_sort(sc);
        // After an unmap the writer must stay parked: the snapshot is over.
        if held && result.is_ok() {
            self.hold_writer.store(false, Ordering::SeqCst);
        }
        result
    }

    fn read_and_sort(&self, sc: &mut Scratch) -> Result<(), SnapshotError> {
        let Scratch {
            page,
            events,
            faults,
        } = sc;
        for ev in self.uffd.read_events(events)? {
            match ev {
                Event::PageFault(pf) => faults.push(pf.address),
                Event::Remove { start, end } => {
                    // Read without a positive probe (it arrived after the probe):
                    // save what is still unsaved right away.
                    let mut a = start;
                    while a < end {
                        let Some((r, p)) = self.locate(a) else { break };
                        let t = &self.regions[r];
                        let g = t.first + p;
                        if self.claimed.set(g as usize) {
                            self.save_direct(r, p, &mut page[..t.page_size])?;
                            self.counters
                                .late_remove_saves
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        a = self.page_addr(r, p) as u64 + t.page_size as u64;
                    }
                }
                Event::Unmap { start, end } => {
                    if self.locate(start).is_some() || self.locate(end.saturating_sub(1)).is_some()
                    {
                        return Err(SnapshotError::RegionUnmapped { start, end });
                    }
                }
                Event::Remap { from, len, .. } => {
                    return Err(SnapshotError::RegionUnmapped {
                        start: from,
                        end: from + len,
                    });
                }
                Event::Fork { .. } => {}
            }
        }
        Ok(())
    }

    fn handler_loop(&self, stop: &EventFd) {
        // Everything the fault path needs is allocated once, here.
        let mut sc = Scratch::new(self.buffer.slot_size);
        loop {
            let ready =
                match poll_readable([std::os::fd::AsFd::as_fd(&self.uffd), stop.as_fd()], -1) {
                    Ok(r) => r,
                    Err(e) => {
                        self.fail(SnapshotError::Invalid(format!("poll: {e}")));
                        return;
                    }
                };
            if ready[1] {
                return;
            }
            if self.aborted() {
                // Dead snapshot: protection is lifted, but threads that raised an
                // event (munmap, madvise) stay blocked until it is read. Keep reading.
                if self.uffd.read_events(&mut sc.events).is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            if let Err(e) = self.read_events_safely(&mut sc) {
                self.fail(e);
                continue;
            }
            let Scratch { page, faults, .. } = &mut sc;
            for addr in faults.drain(..) {
                if let Err(e) = self.handle_fault(addr, page) {
                    self.fail(e);
                    break;
                }
            }
            sc.faults.clear();
        }
    }

    fn drain_buffer(&self) -> Result<(), SnapshotError> {
        loop {
            let next = self
                .buffer
                .filled
                .lock()
                .ok()
                .and_then(|mut q| q.pop_front());
            let Some((g, s)) = next else { return Ok(()) };
            let Some((r, _)) = self.regions.locate_global(g) else {
                continue;
            };
            let ps = self.regions[r].page_size;
            {
                let data = self.buffer.slots[s]
                    .lock()
                    .map_err(|_| SnapshotError::Invalid("buffer poisoned".into()))?;
                self.image.write_page(g, &data[..ps])?;
            }
            self.counters.buffered.fetch_sub(1, Ordering::Relaxed);
            if let Ok(mut f) = self.buffer.free.lock() {
                f.push(s);
            }
        }
    }

    fn writer_loop(&self) {
        if let Err(e) = self.write_all() {
            self.fail(e);
        }
    }

    fn write_all(&self) -> Result<(), SnapshotError> {
        let mut bounce = Vec::new();
        for (r, t) in self.regions.iter().enumerate() {
            let chunk = self.chunk_pages.max(1) as u64;
            let mut p = 0;
            while p < t.pages {
                while self.hold_writer.load(Ordering::SeqCst) && !self.aborted() {
                    self.writer_parked.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(50));
                }
                self.writer_parked.store(false, Ordering::SeqCst);
                if self.aborted() {
                    return Ok(());
                }
                self.drain_buffer()?;
                let end = (p + chunk).min(t.pages);
                // Claim what nobody has, copy it while it is still protected, save it,
                // then release runs of our own pages.
                let mine: Vec<u64> = (p..end)
                    .filter(|q| self.claimed.set((t.first + q) as usize))
                    .collect();
                if !mine.is_empty() {
                    let (lo, hi) = (mine[0], mine[mine.len() - 1] + 1);
                    bounce.resize((hi - lo) as usize * t.page_size, 0);
                    // Holes of a memfd are zeros; reading them would allocate pages.
                    if t.region.is_hole(lo as usize * t.page_size, bounce.len()) {
                        bounce.fill(0);
                    } else {
                        t.region
                            .read_checked(lo as usize * t.page_size, &mut bounce)?;
                    }
                    for &q in &mine {
                        let data = &bounce
                            [(q - lo) as usize * t.page_size..(q - lo + 1) as usize * t.page_size];
                        let g = t.first + q;
                        if data.iter().all(|b| *b == 0) {
                            self.image.mark_zero(g);
                            self.counters.zero.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.image.write_page(g, data)?;
                        }
                        self.mark_done(g);
                    }
                    self.counters
                        .by_writer
                        .fetch_add(mine.len() as u64, Ordering::Relaxed);
                    let mut i = 0;
                    while i < mine.len() {
                        let mut j = i + 1;
                        while j < mine.len() && mine[j] == mine[j - 1] + 1 {
                            j += 1;
                        }
                        let addr = self.page_addr(r, mine[i]);
                        let len = (j - i) * t.page_size;
                        // A pending event makes this EAGAIN: leave those pages protected;
                        // a later write faults and finds them done.
                        match self.uffd.write_protect(addr, len, false, false) {
                            Ok(_) => {}
                            Err(_) if self.released.load(Ordering::SeqCst) => return Ok(()),
                            Err(RangeError::NotRegistered { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                        i = j;
                    }
                }
                p = end;
            }
        }
        // From here on the writer never reads region memory.
        self.writer_parked.store(true, Ordering::SeqCst);
        // Wait for pages still being copied by handlers, then flush the buffer.
        while self.done_count.load(Ordering::Relaxed) < self.regions.total() {
            if self.aborted() {
                return Ok(());
            }
            self.drain_buffer()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        self.drain_buffer()
    }
}
