//! Preparing, arming and finishing a snapshot.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_image::{ImageId, ImageWriter, RegionDesc};
use livepage_mem::{MemoryKind, PageBitmap, Region, RegionTable};
use livepage_runtime::{Runtime, RuntimeOptions};
use livepage_uffd::{Features, RangeError, RegisterMode, Resolved, UffdBuilder};

use crate::buffer::CowBuffer;
use crate::engine::{Counters, Engine};
use crate::{Progress, SnapshotError, SnapshotOptions, SnapshotStats};

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
        return Err(SnapshotError::NoRegions);
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
    let buffer = CowBuffer::new(opts.buffer_bytes, slot_size);
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
        let uffd = self.shared.uffd();
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
        Progress {
            pages: self.shared.regions.total(),
            saved: self.shared.done_count.load(Ordering::Relaxed),
            buffered_bytes: (self.shared.buffer.in_use() * self.shared.buffer.slot_size()) as u64,
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
            let _ = w.join();
        }
        // Lifts all protection (wakes anything still blocked) before the handlers stop.
        self.shared.release();
        if let Some(mut rt) = self.rt.take() {
            let _ = rt.stop();
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
            peak_buffer_bytes: (shared.buffer.peak() * shared.buffer.slot_size()) as u64,
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
