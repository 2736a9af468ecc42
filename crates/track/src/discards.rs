//! Discards seen by the async tracker.
//!
//! WP_ASYNC reports writes; a discard (MADV_DONTNEED or MADV_REMOVE, a
//! balloon) is no write. On private memory the zap drops the page with its
//! protection and the next collect finds it gone. On shared memory
//! (shmem, hugetlbfs) it leaves a protected marker, and a *read* afterwards
//! maps a fresh zero page that inherits the protection: the page is present
//! and protected again, nothing in the page tables says its contents
//! changed, and a checkpoint would keep the old contents. So the async
//! tracker also subscribes to EVENT_REMOVE: one thread reads the events (the
//! discarding thread waits only for that read) and logs the ranges, which
//! the next collects report.
//!
//! The kernel wakes the discarding thread when the event is *read*, before
//! the log has it: a collect right after the discard returns would miss it.
//! So the event thread holds a guard from before each read until its events
//! are logged ([`Policy::before_read`]), and [`DiscardLog::take`] takes that
//! guard first: any discard that has returned is in the log it takes.

use std::sync::{Mutex, MutexGuard};

use livepage_mem::RangeSet;
use livepage_runtime::{Cx, Fault, Policy};
use livepage_uffd::{Event, Uffd};

/// The policy of the async tracker's event thread.
pub(crate) struct DiscardLog {
    fds: [Uffd; 1],
    /// (start, end) of each region.
    spans: Vec<(u64, u64)>,
    /// Discarded byte ranges per region, relative to its start, since the
    /// last [`DiscardLog::take`].
    log: Mutex<Vec<RangeSet>>,
    /// Held across each read of events and their logging.
    reading: Mutex<()>,
}

impl DiscardLog {
    pub(crate) fn new(uffd: Uffd, spans: Vec<(u64, u64)>) -> DiscardLog {
        let n = spans.len();
        DiscardLog {
            fds: [uffd],
            spans,
            log: Mutex::new(vec![RangeSet::new(); n]),
            reading: Mutex::new(()),
        }
    }

    pub(crate) fn uffd(&self) -> &Uffd {
        &self.fds[0]
    }

    /// Logs a discard of `[start, end)` (absolute addresses).
    pub(crate) fn record(&self, start: u64, end: u64) {
        let mut log = lock(&self.log);
        for (i, &(a, b)) in self.spans.iter().enumerate() {
            let (lo, hi) = (start.max(a), end.min(b));
            if lo < hi {
                log[i].insert(lo - a, hi - a);
            }
        }
    }

    /// The ranges logged since the previous call, per region.
    pub(crate) fn take(&self) -> Vec<RangeSet> {
        // Events read but not logged yet are logged before this returns.
        let _reading = lock(&self.reading);
        let mut log = lock(&self.log);
        let n = log.len();
        std::mem::replace(&mut *log, vec![RangeSet::new(); n])
    }
}

impl Policy for DiscardLog {
    type Local = ();

    fn fds(&self) -> &[Uffd] {
        &self.fds
    }

    fn local(&self) {}

    /// Async write-protect raises no faults; a MISSING one can only come
    /// from the instant a tracker lends its protection (writers paused).
    fn fault(&self, _: &mut Cx<'_, Self>, _: &mut (), _: Fault) {}

    fn before_read(&self, _fd: usize) -> Option<MutexGuard<'_, ()>> {
        Some(lock(&self.reading))
    }

    fn event(&self, _fd: usize, event: Event) {
        if let Event::Remove { start, end } = event {
            self.record(start, end);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
