//! Placing pages: read a run from the source (unless discarded), install it
//! with UFFDIO_COPY / UFFDIO_ZEROPAGE, or through the page cache and
//! UFFDIO_CONTINUE in minor mode, and account for it. Source failures
//! poison only the pages that failed.

use livepage_mem::MemoryKind;
use livepage_runtime::{Cx, ResolveError};
use livepage_uffd::{CopyMode, Errno, RangeError};

use crate::engine::{Engine, Local};
use crate::error::RestoreError;
use crate::options::{Mode, Notice};
use crate::source::{Lane, SourceError};
use crate::stats::Counters;
use crate::supply::AfterLoss;

/// How a run is installed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct How {
    /// Resolve without waking (the handler wakes merged ranges after its batch).
    pub(crate) dont_wake: bool,
    /// For a write fault (zeros then need a real page, not the zero page).
    pub(crate) write: bool,
    /// Which source path the read takes.
    pub(crate) lane: Lane,
}

impl How {
    pub(crate) const BACKGROUND: How = How {
        dont_wake: false,
        write: false,
        lane: Lane::Background,
    };

    /// A fault of a batch of `batch`: only a real batch defers its wakes
    /// (one fault is woken by its own ioctl, saving a syscall).
    pub(crate) fn fault(write: bool, batch: usize) -> How {
        How {
            dont_wake: batch > 1,
            write,
            lane: Lane::Demand,
        }
    }
}

/// What filling a run came to.
pub(crate) enum Filled {
    /// Placed with data.
    Data,
    /// Placed as zeros.
    Zero,
    /// The source is lost: the run's range was parked, its claim is to be
    /// given back.
    Parked,
    /// The source is gone and the restore failed closed.
    Lost,
    /// The source could not give (some of) these pages.
    Failed(SourceError),
}

impl Engine {
    /// Places claimed pages `[p0, p0+n)` of range `r` and accounts for them.
    /// Returns whether they were placed (with data or zeros).
    pub(crate) fn place(
        &self,
        cx: &mut Cx<'_, Engine>,
        local: &mut Local,
        r: usize,
        p0: u64,
        n: u64,
        how: How,
    ) -> bool {
        let g = self.map.first(r) + p0;
        match self.fill(cx, local, r, p0, n, how) {
            Ok(Filled::Data) => {
                self.finish(g, n);
                true
            }
            Ok(Filled::Zero) => {
                Counters::add(&self.counters.zero, n);
                self.finish(g, n);
                true
            }
            Ok(Filled::Parked) => {
                self.states.release(g, n);
                false
            }
            Ok(Filled::Lost) => false,
            Ok(Filled::Failed(_)) if n > 1 => {
                // Poison only the pages that fail: try each on its own.
                let mut placed = true;
                for k in 0..n {
                    placed &= self.place(cx, local, r, p0 + k, 1, how);
                }
                placed
            }
            Ok(Filled::Failed(e)) => {
                self.lose(r, p0, n, e);
                false
            }
            Err(e) => {
                self.set_error(e);
                self.fail_closed();
                false
            }
        }
    }

    /// Reads pages `[p0, p0+n)` of range `r` (zeros where discarded) and
    /// installs them.
    pub(crate) fn fill(
        &self,
        cx: &mut Cx<'_, Engine>,
        local: &mut Local,
        r: usize,
        p0: u64,
        n: u64,
        how: How,
    ) -> Result<Filled, RestoreError> {
        let t = &self.map[r];
        let len = n as usize * t.page_size;
        let g = self.map.first(r) + p0;
        let addr = self.map.page_addr(r, p0);
        if let Some(s) = &local.slot {
            s.get().start(addr as u64, len as u64, self.now_ns());
        }
        let result = (|| {
            let data = if self.states.discarded_in(g, n).0 {
                false
            } else {
                loop {
                    if self.supply.is_lost() && self.supply.park((t.fd, addr, len)) {
                        return Ok(Filled::Parked);
                    }
                    let (source, generation) = self.supply.get();
                    let buf = &mut local.buf[..len];
                    match source.read_pages(t.source_region, t.source_first + p0, buf, how.lane) {
                        Ok(d) => break d,
                        Err(e) if e.is_fatal() => match self.supply.lose(generation, &e) {
                            AfterLoss::Retry => continue,
                            AfterLoss::Wait => {
                                self.tell(Notice::SourceLost { cause: e });
                                if self.supply.park((t.fd, addr, len)) {
                                    return Ok(Filled::Parked);
                                }
                            }
                            AfterLoss::FailClosed => {
                                self.set_error(RestoreError::Source { pages: 0, first: e });
                                self.fail_closed();
                                return Ok(Filled::Lost);
                            }
                        },
                        Err(e) => return Ok(Filled::Failed(e)),
                    }
                }
            };
            // Checked again after the (maybe slow) read: a discard that came
            // meanwhile must not be answered with the data read before it.
            if data {
                self.zero_discarded(g, &mut local.buf[..len], t.page_size);
            }
            self.install(cx, local, r, p0, n, data, how)?;
            Ok(if data { Filled::Data } else { Filled::Zero })
        })();
        if let Some(s) = &local.slot {
            s.get().stop();
        }
        result
    }

    /// Zeroes the pages of `buf` (pages from global `g`) that were discarded.
    pub(crate) fn zero_discarded(&self, g: u64, buf: &mut [u8], page_size: usize) {
        let n = (buf.len() / page_size) as u64;
        for p in self.states.discarded_pages(g, n) {
            let k = (p - g) as usize;
            buf[k * page_size..(k + 1) * page_size].fill(0);
        }
    }

    /// Installs `n` pages at page `p0` of range `r` from `local.buf`
    /// (`data`) or as zeros, under the runtime's EAGAIN contract.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn install(
        &self,
        cx: &mut Cx<'_, Engine>,
        local: &mut Local,
        r: usize,
        p0: u64,
        n: u64,
        data: bool,
        how: How,
    ) -> Result<(), RestoreError> {
        let t = &self.map[r];
        let ps = t.page_size;
        let len = n as usize * ps;
        let addr = self.map.page_addr(r, p0);
        let g = self.map.first(r) + p0;
        // Zeropage where the kernel can; a write fault on private anonymous
        // memory gets a real zeroed page (the shared zero page would cost it
        // a copy-on-write fault at once).
        let anon_write = how.write && !t.kind.has_page_cache();
        let zeropage = !data && t.kind != MemoryKind::Hugetlb && !anon_write;
        if !data && !zeropage {
            local.buf[..len].fill(0);
        }
        let via_cache = self.mode == Mode::Minor && !zeropage;
        if via_cache {
            if let Some((region, off)) = &t.page_cache {
                region.write_page_cache(off + p0 as usize * ps, &local.buf[..len])?;
            }
        }
        let dont_wake = how.dont_wake;
        let mut from = 0usize;
        while from < len {
            let buf = &mut local.buf;
            // Set when events were drained: a discard among them may cover
            // pages of this run, which then go in as zeros.
            let drained = std::cell::Cell::new(false);
            let res = cx.resolve(
                t.fd,
                addr + from,
                len - from,
                ps,
                |u, off| {
                    let at = addr + from + off;
                    if drained.replace(false) && !zeropage && !via_cache {
                        let k = (from + off) / ps;
                        let pages = (len - from - off) / ps;
                        for p in self.states.discarded_pages(g + k as u64, pages as u64) {
                            let i = (p - g) as usize;
                            buf[i * ps..(i + 1) * ps].fill(0);
                        }
                    }
                    if zeropage {
                        u.zeropage(at, len - from - off, dont_wake)
                    } else if via_cache {
                        u.continue_range(at, len - from - off, dont_wake, false)
                    } else {
                        let mode = CopyMode {
                            dont_wake,
                            write_protect: false,
                        };
                        u.copy(at, &buf[from + off..len], mode)
                    }
                },
                |_| drained.set(true),
            );
            match res {
                Ok(()) => break,
                // CONTINUE finds no page: the hole was punched (discarded) meanwhile.
                Err(ResolveError::Kernel {
                    offset,
                    source:
                        RangeError::Kernel {
                            errno: Errno::FAULT,
                            ..
                        },
                }) if via_cache => from += offset + ps,
                // The memory's owner is gone (a served process exited): nothing to do.
                Err(ResolveError::Kernel {
                    source: RangeError::TargetGone { .. },
                    ..
                }) => return Ok(()),
                // Unregistered meanwhile (a zero run handed to the kernel, or the
                // restore finishing): the kernel serves the range now.
                Err(ResolveError::Kernel {
                    source: RangeError::NotRegistered { .. },
                    ..
                }) => return Ok(()),
                Err(source) => {
                    return Err(RestoreError::Place {
                        addr: addr as u64,
                        len: len as u64,
                        source,
                    });
                }
            }
        }
        if dont_wake {
            local.wakes.push((t.fd, addr, len));
        }
        Ok(())
    }

    /// The source could not give these pages: poison them (SIGBUS for whoever
    /// touches one, at once) and record why.
    pub(crate) fn lose(&self, r: usize, p0: u64, n: u64, e: SourceError) {
        self.set_error(RestoreError::Source { pages: 0, first: e });
        let t = &self.map[r];
        let addr = self.map.page_addr(r, p0);
        let len = n as usize * t.page_size;
        let uffd = &self.fds[t.fd];
        if self.poison {
            let _ = uffd.poison(addr, len, false);
        } else {
            let _ = uffd.unregister(addr, len);
        }
        Counters::add(&self.counters.lost, n);
        self.finish(self.map.first(r) + p0, n);
    }
}
