//! The background writer: saves pages in address order, un-protects its own
//! runs as soon as they are saved, and drains the copy-on-write buffer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use livepage_uffd::RangeError;

use crate::SnapshotError;
use crate::engine::Engine;

impl Engine {
    /// Stores the pages waiting in the buffer.
    pub(crate) fn drain_buffer(&self) -> Result<(), SnapshotError> {
        while let Some((g, slot)) = self.buffer.pop() {
            let Some((r, _)) = self.regions.locate_global(g) else {
                self.buffer.release(slot);
                continue;
            };
            let ps = self.regions[r].page_size;
            let res = self.image.write_page(g, &slot[..ps]);
            self.buffer.release(slot);
            res?;
        }
        Ok(())
    }

    pub(crate) fn writer_loop(&self) {
        match self.write_all() {
            // Every page is saved: a tracker may take its protection back
            // now, while the image is completed (index, sync, rename) here.
            Ok(()) if !self.aborted() => {
                if !self.keep_protection {
                    // Nothing left to hold: lift what protection remains now,
                    // not in whoever waits for the image.
                    self.release();
                }
                self.pages_saved.store(true, Ordering::SeqCst);
                match self.image.finish() {
                    Ok(id) => {
                        if let Ok(mut t) = self.written_at.lock() {
                            *t = Some(std::time::Instant::now());
                        }
                        if let Ok(mut slot) = self.image_id.lock() {
                            *slot = Some(id);
                        }
                    }
                    Err(e) => self.fail(e.into()),
                }
            }
            Ok(()) => {}
            Err(e) => self.fail(e),
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
                // Skip what is claimed already (outside a delta, or saved by a fault).
                match self.claimed.next_clear((t.first + p) as usize) {
                    Some(g) if (g as u64) < t.first + t.pages => p = g as u64 - t.first,
                    _ => break,
                }
                let end = (p + chunk).min(t.pages);
                // Claim what nobody has, copy it while it is still protected, save it,
                // then release runs of our own pages.
                let mine: Vec<u64> = (p..end)
                    .filter(|q| self.claimed.set((t.first + q) as usize))
                    .collect();
                // Runs of our pages: each read once, saved, then released (a
                // delta's pages can be sparse: the gaps are not read).
                let mut i = 0;
                while i < mine.len() {
                    let mut j = i + 1;
                    while j < mine.len() && mine[j] == mine[j - 1] + 1 {
                        j += 1;
                    }
                    let lo = mine[i];
                    bounce.resize((j - i) * t.page_size, 0);
                    // Holes of a memfd are zeros; reading them would allocate pages.
                    if t.region.is_hole(lo as usize * t.page_size, bounce.len()) {
                        bounce.fill(0);
                    } else {
                        // A plain copy (not `read_checked`, whose kernel copy pins
                        // every page and took a third of the writer's time): the
                        // memory cannot be unmapped under it, because an unmap
                        // waits until its event is read, and no event is read
                        // before this writer has parked at a chunk boundary
                        // (`hold_writer`, set by the handlers' `before_read`).
                        t.region.read(lo as usize * t.page_size, &mut bounce)?;
                    }
                    let zeros = self.image.store_run(t.first + lo, &bounce, t.page_size)?;
                    self.counters.zero.fetch_add(zeros, Ordering::Relaxed);
                    for k in 0..(j - i) as u64 {
                        self.mark_done(t.first + lo + k);
                    }
                    self.counters
                        .by_writer
                        .fetch_add((j - i) as u64, Ordering::Relaxed);
                    // With protection handed over by a tracker, saved pages stay
                    // protected: their next write is the tracker's to see.
                    if !self.keep_protection {
                        let addr = self.regions.page_addr(r, lo);
                        // A pending event makes this EAGAIN: leave those pages
                        // protected; a later write faults and finds them done.
                        match self.uffd().write_protect(addr, bounce.len(), false, false) {
                            Ok(_) => {}
                            Err(_) if self.released.load(Ordering::SeqCst) => return Ok(()),
                            Err(RangeError::NotRegistered { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    i = j;
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
