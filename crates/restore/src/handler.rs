//! The restore's policy for the fault runtime: serve a fault (claim and
//! place its page, or leave it to the placer that claimed it), honour
//! discards and unmaps, wake deferred ranges, fail closed.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use livepage_runtime::{Cx, Fault, Policy, ResolveError, RuntimeError};
use livepage_uffd::{BASE_PAGE, Errno, Event, RangeError, Uffd};

use crate::engine::{Engine, Local};
use crate::error::RestoreError;
use crate::options::{Mode, Notice};
use crate::place::How;
use crate::stats::Counters;

impl Policy for Engine {
    type Local = Local;

    fn fds(&self) -> &[Uffd] {
        &self.fds
    }

    fn local(&self) -> Local {
        self.new_local()
    }

    fn fault(&self, cx: &mut Cx<'_, Self>, local: &mut Local, f: Fault) {
        self.serve_fault(cx, local, f);
    }

    fn event(&self, _fd: usize, event: Event) {
        match event {
            Event::Remove { start, end } => self.on_remove(start, end),
            Event::Unmap { start, end } => self.on_unmap(start, end),
            // REMAP and FORK are not enabled on restore userfaultfds; a fork's
            // fd, should one come, is dropped (which unregisters the child).
            _ => {}
        }
    }

    fn before_read(&self, _fd: usize) -> Option<MutexGuard<'_, ()>> {
        self.read_lock.lock().ok()
    }

    fn batch_done(&self, _cx: &mut Cx<'_, Self>, local: &mut Local) {
        self.flush_wakes(local);
    }

    fn idle(&self, local: &mut Local) -> Option<Duration> {
        self.wake_waiting(local);
        // Faults left to other placers are re-checked every few ms.
        (!local.waiting.is_empty()).then(|| Duration::from_millis(5))
    }

    fn fail(&self, error: &RuntimeError) {
        self.set_error(RestoreError::HandlerDied(error.clone()));
        self.fail_closed();
    }

    fn fault_after_failure(&self, f: &Fault) {
        // Every page not placed was poisoned; a page placed and discarded
        // since faults again and gets the same.
        let ps = self
            .map
            .locate(f.fault.address)
            .map_or(BASE_PAGE, |(r, _)| self.map[r].page_size);
        let addr = f.fault.address as usize & !(ps - 1);
        if let Some(u) = self.fds.get(f.fd) {
            let _ = u.poison(addr, ps, true);
            let _ = u.wake(addr, ps);
        }
    }
}

impl Engine {
    fn serve_fault(&self, cx: &mut Cx<'_, Engine>, local: &mut Local, f: Fault) {
        let t0 = Instant::now();
        let Some((r, p)) = self.map.locate(f.fault.address) else {
            self.fault_outside(f);
            return;
        };
        let g = self.map.first(r) + p;
        self.demand.active.fetch_add(1, Ordering::AcqRel);
        let now = t0.duration_since(self.epoch).as_nanos() as u64 + 1;
        self.demand.last_ns.store(now, Ordering::Relaxed);
        self.demand.hint.store(g + 1, Ordering::Relaxed);
        let how = How::fault(f.fault.is_write(), f.batch);
        if self.states.claim(g) {
            if self.recorder.touches_on {
                local.touches.push((now, self.source_global(r, p)));
            }
            if self.place(cx, local, r, p, 1, how) {
                Counters::add(&self.counters.faults, 1);
                let ns = t0.elapsed().as_nanos() as u64;
                local.latencies.push(ns);
                self.recorder.observe(ns);
            }
        } else if self.states.is_done(g) {
            // Placed (or resident) before and unmapped since (a discard), or
            // resident in the page cache with no page-table entry yet, or a
            // duplicate message of a fault a placement already resolved.
            let res = if f.fault.is_minor() {
                self.continue_page(cx, local, f.fd, r, p, how)
            } else if self.mode == Mode::Minor {
                self.refill_minor(cx, local, f.fd, r, p, how)
            } else {
                // COPY finds a duplicate's page mapped (EEXIST): harmless.
                self.fill(cx, local, r, p, 1, how).map(|_| ())
            };
            if let Err(e) = res {
                self.set_error(e);
            }
        } else {
            // Someone else is placing it: their ioctl wakes this fault. It is
            // kept and woken again once done, in case that wake came first.
            local.waiting.push((f.fd, g));
        }
        self.demand.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// UFFDIO_CONTINUE of page `p` of range `r` (a page already mapped is
    /// fine: EEXIST).
    fn continue_page(
        &self,
        cx: &mut Cx<'_, Engine>,
        local: &mut Local,
        fd: usize,
        r: usize,
        p: u64,
        how: How,
    ) -> Result<(), RestoreError> {
        let (addr, ps) = (self.map.page_addr(r, p), self.map[r].page_size);
        cx.resolve(
            fd,
            addr,
            ps,
            ps,
            |u, _| u.continue_range(addr, ps, how.dont_wake, false),
            |_| {},
        )
        .map(|()| {
            if how.dont_wake {
                local.wakes.push((fd, addr, ps));
            }
        })
        .map_err(|source| RestoreError::Place {
            addr: addr as u64,
            len: ps as u64,
            source,
        })
    }

    /// A MISSING fault on a done page in minor mode. Mostly a duplicate
    /// message of a fault some placement already resolved: the page is in
    /// the page cache (and maybe mapped and written since), so it is only
    /// continued; filling it (a write into the page cache) would clobber
    /// what the guest wrote. Only a page really gone from the page cache (a
    /// discard: CONTINUE finds none) is filled again, under a lock so two
    /// duplicates cannot both fill it.
    fn refill_minor(
        &self,
        cx: &mut Cx<'_, Engine>,
        local: &mut Local,
        fd: usize,
        r: usize,
        p: u64,
        how: How,
    ) -> Result<(), RestoreError> {
        let no_page = |e: &RestoreError| {
            matches!(
                e,
                RestoreError::Place {
                    source: ResolveError::Kernel {
                        source: RangeError::Kernel {
                            errno: Errno::FAULT,
                            ..
                        },
                        ..
                    },
                    ..
                }
            )
        };
        match self.continue_page(cx, local, fd, r, p, how) {
            Err(e) if no_page(&e) => {
                let _g = self.refill_lock.lock();
                match self.continue_page(cx, local, fd, r, p, how) {
                    Err(e) if no_page(&e) => self.fill(cx, local, r, p, 1, how).map(|_| ()),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// A fault on no mapped range (memory the handshake did not declare):
    /// nobody will ever serve it, so it is failed closed and reported.
    fn fault_outside(&self, f: Fault) {
        Counters::add(&self.counters.outside, 1);
        self.tell(Notice::FaultOutsideMap {
            addr: f.fault.address,
        });
        if let Some(u) = self.fds.get(f.fd) {
            for ps in [BASE_PAGE, 2 << 20] {
                let addr = f.fault.address as usize & !(ps - 1);
                if u.poison(addr, ps, true).is_ok() {
                    break;
                }
            }
            let _ = u.wake(f.fault.address as usize & !(BASE_PAGE - 1), BASE_PAGE);
        }
    }

    /// Wakes the faults this thread left to another placer whose pages are
    /// now done. Normally the placer's ioctl already woke them and this is a
    /// no-op; it makes sure no ordering of the two leaves a thread asleep.
    pub(crate) fn wake_waiting(&self, local: &mut Local) {
        local.waiting.retain(|&(fd, g)| {
            if !self.states.is_done(g) {
                return true;
            }
            if let Some((r, p)) = self.map.locate_global(g) {
                let _ = self.fds[fd].wake(self.map.page_addr(r, p), self.map[r].page_size);
            }
            false
        });
    }

    /// Wakes the ranges resolved with DONTWAKE, merged.
    pub(crate) fn flush_wakes(&self, local: &mut Local) {
        if local.wakes.is_empty() {
            return;
        }
        local.wakes.sort_unstable();
        let mut cur = local.wakes[0];
        for &(fd, a, l) in &local.wakes[1..] {
            if fd == cur.0 && a == cur.1 + cur.2 {
                cur.2 += l;
            } else {
                let _ = self.fds[cur.0].wake(cur.1, cur.2);
                cur = (fd, a, l);
            }
        }
        let _ = self.fds[cur.0].wake(cur.1, cur.2);
        local.wakes.clear();
    }
}
