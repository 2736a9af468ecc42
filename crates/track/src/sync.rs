//! The synchronous write-protect backend, a policy on the fault runtime.
//!
//! A write to a protected page is a fault: the handler marks the page and
//! lets the write through (un-protects and wakes), both under a lock a
//! collect also holds while it takes the marks and re-protects what they
//! report. So either the handler goes first (the collect sees the mark, and
//! its re-protect makes the next write fault again) or the collect does (the
//! mark stays for the next collect): a write that returned before a collect
//! began is reported by it, and none is ever lost. Without the lock, marking
//! first loses a write whose mark a collect takes before the un-protect, and
//! marking after misses a write that returned before its mark.
//!
//! Discards: the regions are registered MISSING|WP with EVENT_REMOVE. The
//! discarding thread is released when its REMOVE is *read*, and zaps the
//! pages after that, at a moment nobody sees. So a REMOVE makes its pages
//! *pending*: every collect reports them (their contents are, or are about
//! to be, zeros) until the collect finds them gone from the page tables,
//! which proves the zap is done. Events read before a collect are
//! dispatched before it takes the marks (reads and dispatch hold a lock the
//! collect takes too). On anonymous memory a zap drops the page together
//! with its protection: the next touch is a MISSING fault, answered with a
//! zeroed page installed *write-protected*, so a write after a discard
//! faults again and is marked.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use livepage_mem::{MemoryKind, PageBitmap, RangeSet, Region};
use livepage_runtime::{Cx, Fault, Policy, Runtime, RuntimeError, RuntimeOptions};
use livepage_uffd::{CopyMode, Event, Features, RegisterMode, Resolved, Uffd, UffdBuilder};

use crate::tracker::register_all;
use crate::{CollectStats, DirtyRegion, TrackError};

/// The features the sync backend needs on `regions`.
pub(crate) fn features(regions: &[Arc<Region>]) -> Features {
    let mut f = Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED | Features::EVENT_REMOVE;
    for r in regions {
        f |= match r.kind() {
            MemoryKind::Shmem => Features::WP_HUGETLBFS_SHMEM | Features::MISSING_SHMEM,
            MemoryKind::Hugetlb => Features::WP_HUGETLBFS_SHMEM | Features::MISSING_HUGETLBFS,
            _ => Features::empty(),
        };
    }
    f
}

/// One tracked region as the handler sees it.
struct Span {
    base: usize,
    len: usize,
    page_size: usize,
}

/// The policy: marks pages written or discarded.
pub(crate) struct SyncPolicy {
    fds: [Uffd; 1],
    spans: Vec<Span>,
    dirty: Vec<PageBitmap>,
    /// Discarded pages whose zap is not seen done yet.
    pending: Vec<PageBitmap>,
    /// Held across each read of events and its dispatch.
    read_lock: Mutex<()>,
    /// Held by a handler across mark + un-protect, and by a collect across
    /// take + re-protect.
    mark_lock: Mutex<()>,
    /// Zeros to install, one largest page.
    zeros: Vec<u8>,
    failure: Mutex<Option<TrackError>>,
}

impl SyncPolicy {
    fn locate(&self, addr: u64) -> Option<(usize, usize)> {
        let a = addr as usize;
        self.spans
            .iter()
            .position(|s| a >= s.base && a - s.base < s.len)
            .map(|i| (i, (a - self.spans[i].base) / self.spans[i].page_size))
    }

    fn fail(&self, e: TrackError) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
    }
}

impl SyncPolicy {
    /// Drops from `pending` the pages of `[a, b)` of region `i` that are no
    /// longer present: their zap is done (they stay zeros until touched,
    /// and a touch faults).
    fn confirm_zapped(&self, i: usize, r: &Region, a: usize, b: usize) {
        let per = r.page_size() / livepage_uffd::BASE_PAGE;
        let Ok(entries) =
            livepage_uffd::mm::pagemap_entries(r.addr() + a * r.page_size(), (b - a) * per)
        else {
            return;
        };
        for (k, e) in entries.chunks(per).enumerate() {
            if e.iter().all(|e| e & (3 << 62) == 0) {
                self.pending[i].clear(a + k);
            }
        }
    }
}

impl Policy for SyncPolicy {
    type Local = ();

    fn fds(&self) -> &[Uffd] {
        &self.fds
    }

    fn local(&self) {}

    fn fault(&self, cx: &mut Cx<'_, Self>, _: &mut (), f: Fault) {
        let Some((i, p)) = self.locate(f.fault.address) else {
            return;
        };
        let ps = self.spans[i].page_size;
        let addr = self.spans[i].base + p * ps;
        let res = if f.fault.is_wp() {
            let _marking = self.mark_lock.lock();
            self.dirty[i].set(p);
            cx.resolve(
                0,
                addr,
                ps,
                ps,
                |u, _| u.write_protect(addr, ps, false, false),
                |_| {},
            )
        } else {
            // A page with no page-table entry: zapped by a discard, or never
            // populated. Zeros go in protected, so the next write faults.
            let zeros = &self.zeros[..ps];
            let mode = CopyMode {
                dont_wake: false,
                write_protect: true,
            };
            cx.resolve(0, addr, ps, ps, |u, _| u.copy(addr, zeros, mode), |_| {})
        };
        match res {
            // A missing page goes in as zeros, protected: its contents
            // (zeros since a discard that a collect reports) are unchanged.
            Ok(()) => {}
            Err(source) => self.fail(TrackError::Fault {
                addr: addr as u64,
                source,
            }),
        }
    }

    fn event(&self, _fd: usize, event: Event) {
        if let Event::Remove { start, end } = event {
            for (i, s) in self.spans.iter().enumerate() {
                let (a, b) = (s.base as u64, (s.base + s.len) as u64);
                let (lo, hi) = (start.max(a), end.min(b));
                if lo >= hi {
                    continue;
                }
                let ps = s.page_size as u64;
                for p in (lo - a) / ps..(hi - a).div_ceil(ps) {
                    self.pending[i].set(p as usize);
                }
            }
        }
    }

    fn before_read(&self, _fd: usize) -> Option<MutexGuard<'_, ()>> {
        self.read_lock.lock().ok()
    }

    fn fail(&self, error: &RuntimeError) {
        self.fail(TrackError::Handler(error.clone()));
        // Tracking is broken: let every writer through.
        for s in &self.spans {
            let _ = self.fds[0].unregister(s.base, s.len);
        }
    }
}

/// The sync backend's running parts.
pub(crate) struct SyncState {
    rt: Runtime<SyncPolicy>,
}

impl SyncState {
    pub(crate) fn start(
        regions: &[Arc<Region>],
        features: Features,
    ) -> Result<SyncState, TrackError> {
        let uffd = UffdBuilder::new()
            .non_blocking(true)
            .features(features)
            .create()?;
        register_all(regions, &uffd, RegisterMode::MISSING | RegisterMode::WP)?;
        // WP_UNPOPULATED markers make first writes to untouched pages fault too.
        for r in regions {
            let _ = uffd.write_protect(r.addr(), r.len(), true, false)?;
        }
        let policy = Arc::new(SyncPolicy {
            fds: [uffd],
            spans: regions
                .iter()
                .map(|r| Span {
                    base: r.addr(),
                    len: r.len(),
                    page_size: r.page_size(),
                })
                .collect(),
            dirty: regions.iter().map(|r| PageBitmap::new(r.pages())).collect(),
            pending: regions.iter().map(|r| PageBitmap::new(r.pages())).collect(),
            read_lock: Mutex::new(()),
            mark_lock: Mutex::new(()),
            zeros: vec![0u8; regions.iter().map(|r| r.page_size()).max().unwrap_or(4096)],
            failure: Mutex::new(None),
        });
        let rt = Runtime::start(policy, RuntimeOptions::new("lp-track", 1))
            .map_err(TrackError::Handler)?;
        Ok(SyncState { rt })
    }

    /// Takes the marks and re-protects what they report before returning.
    pub(crate) fn collect(
        &mut self,
        regions: &[Arc<Region>],
    ) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        let t0 = Instant::now();
        let policy = self.rt.policy().clone();
        if let Some(e) = policy.failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        let mut out = Vec::with_capacity(regions.len());
        let result = self
            .rt
            .run_worker(|p: &SyncPolicy, w| -> Result<(), TrackError> {
                for (i, r) in regions.iter().enumerate() {
                    let ps = r.page_size() as u64;
                    let mut set = RangeSet::new();
                    // Every event read so far has been dispatched once the
                    // read lock was ours for a moment (a discard read later
                    // zaps later).
                    drop(p.read_lock.lock());
                    // Take the marks and re-protect what they report under
                    // the lock handlers hold across mark + un-protect.
                    let marking = p.mark_lock.lock();
                    for pg in p.dirty[i].take_set() {
                        set.insert(pg as u64 * ps, (pg as u64 + 1) * ps);
                    }
                    let pending = p.pending[i].runs();
                    for &(a, b) in &pending {
                        set.insert(a as u64 * ps, b as u64 * ps);
                    }
                    for (s, e) in set.iter() {
                        let (addr, len) = (r.addr() + s as usize, (e - s) as usize);
                        // A pending discard is read here (not waited for): its
                        // thread is blocked until someone reads it. Faults read
                        // on the way are served after this body, unlocked.
                        let (mut cx, _) = w.split(p);
                        cx.resolve(
                            0,
                            addr,
                            len,
                            len,
                            |u, _| match u.write_protect(addr, len, true, false) {
                                Ok(Resolved::EventPending) => Ok(Resolved::EventPending),
                                Ok(_) => Ok(Resolved::All),
                                Err(e) => Err(e),
                            },
                            |_| {},
                        )
                        .map_err(|source| TrackError::Fault {
                            addr: addr as u64,
                            source,
                        })?;
                    }
                    drop(marking);
                    for (a, b) in pending {
                        p.confirm_zapped(i, r, a, b);
                    }
                    out.push(DirtyRegion {
                        ranges: set,
                        ..Default::default()
                    });
                }
                Ok(())
            });
        match result {
            Some(r) => r?,
            None => {
                return Err(TrackError::Handler(self.rt.failure().unwrap_or(
                    RuntimeError::Panicked {
                        thread: "collect".into(),
                        message: "unknown".into(),
                    },
                )));
            }
        }
        let stats = CollectStats::tally(&out, t0.elapsed(), 0);
        Ok((out, stats))
    }

    /// Unregisters and stops the handler.
    pub(crate) fn stop(&mut self, regions: &[Arc<Region>]) {
        for r in regions {
            let _ = r.unregister(&self.rt.policy().fds[0]);
        }
        let _ = self.rt.stop();
    }
}
