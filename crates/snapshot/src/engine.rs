//! The state a snapshot's threads share, and saving pages: straight to the
//! image, or into the copy-on-write buffer on a write fault.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livepage_image::ImageWriter;
use livepage_mem::{PageBitmap, Region, RegionError, RegionTable};
use livepage_runtime::Cx;
use livepage_uffd::{Resolved, Uffd};

use crate::SnapshotError;
use crate::buffer::CowBuffer;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) by_writer: AtomicU64,
    pub(crate) by_fault_buffered: AtomicU64,
    pub(crate) by_fault_sync: AtomicU64,
    pub(crate) by_fault_zero: AtomicU64,
    pub(crate) remove_saves: AtomicU64,
    pub(crate) late_remove_saves: AtomicU64,
    pub(crate) zero: AtomicU64,
    pub(crate) faults: AtomicU64,
}

/// One snapshot's shared state; the fault runtime's policy.
pub(crate) struct Engine {
    pub(crate) fds: [Uffd; 1],
    pub(crate) canary: Region,
    pub(crate) regions: RegionTable,
    pub(crate) claimed: PageBitmap,
    pub(crate) done: PageBitmap,
    pub(crate) done_count: AtomicU64,
    pub(crate) image: ImageWriter,
    pub(crate) buffer: CowBuffer,
    pub(crate) counters: Counters,
    pub(crate) abort: AtomicBool,
    pub(crate) error: Mutex<Option<SnapshotError>>,
    pub(crate) released: AtomicBool,
    /// Held across each read of events and its dispatch (see `before_read`).
    pub(crate) read_lock: Mutex<()>,
    /// A page buffer for saves made while reading events (under `read_lock`).
    pub(crate) event_page: Mutex<Vec<u8>>,
    pub(crate) chunk_pages: usize,
    /// Asks the writer to stop touching region memory (an event is pending:
    /// perhaps an unmap, which proceeds as soon as the event is read).
    pub(crate) hold_writer: AtomicBool,
    /// The writer is parked at a chunk boundary or past all region memory.
    pub(crate) writer_parked: AtomicBool,
    /// Saved pages keep their protection (it belongs to a tracker too).
    pub(crate) keep_protection: bool,
    /// Pages outside a delta's scope (marked claimed and done at arming).
    pub(crate) outside: AtomicU64,
    /// Every page is saved (the image may still be being finished).
    pub(crate) pages_saved: AtomicBool,
    /// When the image was complete.
    pub(crate) written_at: Mutex<Option<std::time::Instant>>,
    /// The finished image's id (the writer finishes it: index, sync, rename).
    pub(crate) image_id: Mutex<Option<livepage_image::ImageId>>,
    /// Ranges discarded while the snapshot ran (for a tracker taking its
    /// protection back: their contents changed without a write).
    pub(crate) discarded: Mutex<Vec<(u64, u64)>>,
}

impl Engine {
    pub(crate) fn uffd(&self) -> &Uffd {
        &self.fds[0]
    }

    pub(crate) fn fail(&self, e: SnapshotError) {
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

    pub(crate) fn take_error(&self) -> Option<SnapshotError> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// Pages the snapshot saves.
    pub(crate) fn scope_pages(&self) -> u64 {
        self.regions.total() - self.outside.load(Ordering::Relaxed)
    }

    /// Ends the registration of every region but leaves the uffd-wp bits for
    /// the tracker that registers next (see `Protection::HandedOver`). The
    /// workload must be paused. Once; false if already released.
    pub(crate) fn hand_back(&self) -> Result<bool, SnapshotError> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(false);
        }
        for t in &self.regions {
            if let Err(e) = self
                .uffd()
                .unregister_keeping_protection(t.region.addr(), t.region.len())
            {
                // Lift what is left the ordinary way: nobody may stay blocked.
                self.released.store(false, Ordering::SeqCst);
                self.release();
                return Err(e.into());
            }
        }
        let _ = self.canary.unregister(self.uffd());
        Ok(true)
    }

    /// Unregisters every region (clearing all protection and waking waiters). Once.
    pub(crate) fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for t in &self.regions {
            if t.region.unregister(self.uffd()).is_err() {
                // Part of it was unmapped: release what is left piece by piece.
                let step = t.page_size.max(2 << 20);
                let mut off = 0;
                while off < t.region.len() {
                    let len = step.min(t.region.len() - off);
                    let _ = t.region.unregister_range(self.uffd(), off, len);
                    off += len;
                }
            }
            // Unregistering wakes waiters only in MISSING mode: a writer whose
            // write-protect fault was read but not yet answered would sleep
            // forever. Wake the whole range (the faults retry unregistered).
            let _ = self.uffd().wake(t.region.addr(), t.region.len());
        }
        let _ = self.canary.unregister(self.uffd());
    }

    pub(crate) fn mark_done(&self, g: u64) {
        if self.done.set(g as usize) {
            self.done_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stores one page's bytes: a hole when all zero.
    pub(crate) fn store(&self, g: u64, data: &[u8]) -> Result<(), SnapshotError> {
        if data.iter().all(|b| *b == 0) {
            self.image.mark_zero(g);
            self.counters.zero.fetch_add(1, Ordering::Relaxed);
        } else {
            self.image.write_page(g, data)?;
        }
        Ok(())
    }

    /// Writes one claimed page straight to the image (or as a hole).
    pub(crate) fn save_direct(
        &self,
        r: usize,
        p: u64,
        buf: &mut [u8],
    ) -> Result<(), SnapshotError> {
        let t = &self.regions[r];
        let g = t.first + p;
        t.region.read_checked(p as usize * t.page_size, buf)?;
        self.store(g, buf)?;
        self.mark_done(g);
        Ok(())
    }

    /// Lifts protection of one page; a pending event is drained first.
    pub(crate) fn unprotect(
        &self,
        cx: &mut Cx<'_, Engine>,
        r: usize,
        p: u64,
    ) -> Result<(), SnapshotError> {
        let (addr, len) = (self.regions.page_addr(r, p), self.regions[r].page_size);
        loop {
            if self.released.load(Ordering::SeqCst) {
                return Ok(());
            }
            match self.uffd().write_protect(addr, len, false, false) {
                Ok(Resolved::EventPending) => {
                    cx.drain(0)?;
                }
                Ok(_) => return Ok(()),
                // Unregistered meanwhile (completion or abort): nothing left to lift.
                Err(_) if self.released.load(Ordering::SeqCst) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A write to a protected page: save the original (into the buffer, or
    /// to the image when the buffer is full), then let the writer go.
    pub(crate) fn handle_fault(
        &self,
        cx: &mut Cx<'_, Engine>,
        addr: u64,
        buf: &mut [u8],
    ) -> Result<(), SnapshotError> {
        let Some((r, p)) = self.regions.locate(addr) else {
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
            return self.unprotect(cx, r, p);
        }
        let t = &self.regions[r];
        match self.buffer.take() {
            Some(mut slot) => {
                let page = &mut slot[..t.page_size];
                t.region.read_checked(p as usize * t.page_size, page)?;
                if page.iter().all(|b| *b == 0) {
                    self.buffer.give_back(slot);
                    self.image.mark_zero(g);
                    self.counters.zero.fetch_add(1, Ordering::Relaxed);
                    self.counters.by_fault_zero.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.buffer.push(g, slot);
                    self.counters
                        .by_fault_buffered
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                // Buffer full: the writer waits for the disk (synchronous saving).
                self.save_direct(r, p, &mut buf[..t.page_size])?;
                self.counters.by_fault_sync.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.mark_done(g);
        self.unprotect(cx, r, p)
    }

    /// Saves every page nobody has claimed yet, synchronously. Used while a
    /// discard is pending (its thread is blocked until we read the event).
    pub(crate) fn save_everything(&self, buf: &mut [u8]) -> Result<u64, SnapshotError> {
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

    /// A REMOVE read without a positive probe (it came after the probe):
    /// save what is still unsaved in its range right away.
    pub(crate) fn late_remove(&self, start: u64, end: u64) -> Result<(), SnapshotError> {
        let mut page = self
            .event_page
            .lock()
            .map_err(|_| SnapshotError::Cancelled)?;
        let mut a = start;
        while a < end {
            let Some((r, p)) = self.regions.locate(a) else {
                break;
            };
            let t = &self.regions[r];
            let g = t.first + p;
            if self.claimed.set(g as usize) {
                self.save_direct(r, p, &mut page[..t.page_size])?;
                self.counters
                    .late_remove_saves
                    .fetch_add(1, Ordering::Relaxed);
            }
            a = self.regions.page_addr(r, p) as u64 + t.page_size as u64;
        }
        Ok(())
    }
}
