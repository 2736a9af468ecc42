//! The snapshot's policy for the fault runtime.
//!
//! Discards: while a REMOVE event (MADV_DONTNEED, a balloon) is pending,
//! the discarding thread is blocked and every resolving ioctl fails with
//! EAGAIN. Before every read of events ([`Policy::before_read`], under a
//! lock that serializes readers) a no-op write-protect of a private canary
//! page probes for that state; if an event is pending, the writer is parked
//! and every page not yet saved is saved, synchronously, so the discarded
//! memory keeps its contents from the snapshot instant. An event that
//! arrives between the probe and the read is caught by the saves that
//! follow at once ([`crate::SnapshotStats::late_remove_saves`]).

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use livepage_runtime::{Cx, Fault, Policy, RuntimeError};
use livepage_uffd::{Event, Resolved, Uffd};

use crate::SnapshotError;
use crate::engine::Engine;

impl Policy for Engine {
    /// A page buffer for synchronous saves.
    type Local = Vec<u8>;

    fn fds(&self) -> &[Uffd] {
        &self.fds
    }

    fn local(&self) -> Vec<u8> {
        vec![0u8; self.buffer.slot_size()]
    }

    fn fault(&self, cx: &mut Cx<'_, Self>, page: &mut Vec<u8>, f: Fault) {
        if self.aborted() {
            // Protection is lifted; the writer was woken by the release.
            return;
        }
        if let Err(e) = self.handle_fault(cx, f.fault.address, page) {
            self.fail(e);
        }
    }

    fn event(&self, _fd: usize, event: Event) {
        let res = match event {
            Event::Remove { start, end } => {
                if let Ok(mut d) = self.discarded.lock() {
                    d.push((start, end));
                }
                let r = self.late_remove(start, end);
                // The discard is read: the writer may read region memory again.
                if r.is_ok() {
                    self.hold_writer.store(false, Ordering::SeqCst);
                }
                r
            }
            Event::Unmap { start, end } => {
                if self.regions.locate(start).is_some()
                    || self.regions.locate(end.saturating_sub(1)).is_some()
                {
                    // The writer stays parked: the snapshot is over.
                    Err(SnapshotError::RegionUnmapped { start, end })
                } else {
                    Ok(())
                }
            }
            Event::Remap { from, len, .. } => Err(SnapshotError::RegionUnmapped {
                start: from,
                end: from + len,
            }),
            Event::Fork { .. } | Event::PageFault(_) => Ok(()),
        };
        if let Err(e) = res {
            self.fail(e);
        }
    }

    fn before_read(&self, _fd: usize) -> Option<MutexGuard<'_, ()>> {
        let guard = self.read_lock.lock().ok()?;
        if self.released.load(Ordering::SeqCst) || self.aborted() {
            return Some(guard);
        }
        let canary = self.canary.addr();
        if let Ok(Resolved::EventPending) = self.uffd().write_protect(canary, 4096, true, false) {
            // A discard or an unmap is waiting for us to read its event. Park
            // the writer (an unmapped range must not be read once the event is
            // read), then save everything still unsaved while memory is intact.
            self.hold_writer.store(true, Ordering::SeqCst);
            while !self.writer_parked.load(Ordering::SeqCst) && !self.aborted() {
                std::thread::yield_now();
            }
            let saved = match self.event_page.lock() {
                Ok(mut page) => self.save_everything(&mut page),
                Err(_) => Err(SnapshotError::Cancelled),
            };
            match saved {
                Ok(n) => {
                    self.counters.remove_saves.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => self.fail(e),
            }
        }
        Some(guard)
    }

    fn fail(&self, error: &RuntimeError) {
        Engine::fail(self, SnapshotError::Thread(error.clone()));
    }
}
