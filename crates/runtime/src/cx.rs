//! What a serving thread holds while it serves a fault: its event buffer,
//! the faults read while draining, and the EAGAIN contract.

use livepage_uffd::{Event, EventBuffer, PageFault, RangeError, ReadError, Resolved, Uffd};

use crate::policy::Policy;

/// A page fault as the runtime hands it to the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Which userfaultfd reported it (an index into [`Policy::fds`]).
    pub fd: usize,
    /// The fault.
    pub fault: PageFault,
    /// How many faults were read together with it (1 for a lone fault): a
    /// policy defers wakes (DONTWAKE) only for real batches.
    pub batch: usize,
}

/// Events read per `read(2)`.
pub(crate) const BATCH: usize = 64;

/// A thread's reading state, allocated once.
#[derive(Debug)]
pub(crate) struct Reader {
    pub(crate) events: EventBuffer,
    /// The faults of the read being served.
    pub(crate) batch: Vec<PageFault>,
    /// Faults read while draining, served after the current one.
    pub(crate) pending: Vec<(usize, PageFault)>,
}

impl Reader {
    pub(crate) fn new() -> Reader {
        Reader {
            events: EventBuffer::new(BATCH),
            batch: Vec::with_capacity(BATCH),
            pending: Vec::with_capacity(BATCH),
        }
    }

    /// Reads userfaultfd `fd`'s events (under the policy's read guard):
    /// discards and the like go to the policy at once, in the order read;
    /// the faults are left in `self.batch`. The one place livepage reads
    /// userfaultfd events, with [`Cx::drain`] and [`Reader::read_unserved`].
    pub(crate) fn read_batch<P: Policy>(&mut self, policy: &P, fd: usize) -> Result<(), ReadError> {
        let Some(uffd) = policy.fds().get(fd) else {
            return Ok(());
        };
        let guard = policy.before_read(fd);
        for ev in uffd.read_events(&mut self.events)? {
            match ev {
                Event::PageFault(pf) => self.batch.push(pf),
                other => policy.event(fd, other),
            }
        }
        drop(guard);
        Ok(())
    }

    /// After a failure: reads `fd`'s events without the policy's placement;
    /// each fault goes to `on_fault`, the rest are dropped (a fork's fd is
    /// closed), so no thread that raised one stays blocked.
    pub(crate) fn read_unserved(
        &mut self,
        uffd: &Uffd,
        mut on_fault: impl FnMut(PageFault),
    ) -> Result<(), ReadError> {
        for ev in uffd.read_events(&mut self.events)? {
            if let Event::PageFault(pf) = ev {
                on_fault(pf);
            }
        }
        Ok(())
    }
}

/// Why [`Cx::resolve`] stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The kernel refused the ioctl at `offset` bytes into the range.
    #[error("at offset {offset:#x} of the range: {source}")]
    Kernel {
        /// Bytes of the range done before the failure.
        offset: usize,
        /// The refusal.
        #[source]
        source: RangeError,
    },
    /// Reading the pending events failed.
    #[error("draining pending events failed: {0}")]
    Drain(#[from] ReadError),
}

/// The serving context of one thread: the policy and the thread's reader.
/// Handed to [`Policy::fault`]; worker threads get one from [`crate::Worker`].
#[derive(Debug)]
pub struct Cx<'a, P: Policy> {
    pub(crate) policy: &'a P,
    pub(crate) reader: &'a mut Reader,
}

impl<'a, P: Policy> Cx<'a, P> {
    /// The policy.
    pub fn policy(&self) -> &'a P {
        self.policy
    }

    /// Faults read by drains and not served yet.
    pub fn pending(&self) -> usize {
        self.reader.pending.len()
    }

    /// Answers an ioctl's `EventPending`: reads userfaultfd `fd`'s events
    /// now. Discards, unmaps, remaps and forks go to [`Policy::event`] at
    /// once; faults are kept and served after the current fault, by this
    /// thread. Returns how many events were read (0 when another reader
    /// took them first: this thread then yields once).
    pub fn drain(&mut self, fd: usize) -> Result<usize, ReadError> {
        let policy = self.policy;
        let Some(uffd) = policy.fds().get(fd) else {
            return Ok(0);
        };
        let guard = policy.before_read(fd);
        let mut n = 0;
        for ev in uffd.read_events(&mut self.reader.events)? {
            n += 1;
            match ev {
                Event::PageFault(pf) => self.reader.pending.push((fd, pf)),
                other => policy.event(fd, other),
            }
        }
        drop(guard);
        if n == 0 {
            std::thread::yield_now();
        }
        Ok(n)
    }

    /// Runs a resolving ioctl over `[start, start+len)` of userfaultfd `fd`
    /// to the end. `op(uffd, offset)` issues the ioctl for
    /// `[start+offset, start+len)`. Partial progress continues where the
    /// kernel stopped; EEXIST (the page is there already) wakes that page
    /// and skips it; EAGAIN (an event is pending) drains the events, calls
    /// `after_drain(offset)` so the caller can re-check what a drained
    /// event changed (a discard), and retries.
    pub fn resolve(
        &mut self,
        fd: usize,
        start: usize,
        len: usize,
        page_size: usize,
        mut op: impl FnMut(&Uffd, usize) -> Result<Resolved, RangeError>,
        mut after_drain: impl FnMut(usize),
    ) -> Result<(), ResolveError> {
        let policy = self.policy;
        let Some(uffd) = policy.fds().get(fd) else {
            return Ok(());
        };
        let mut off = 0;
        while off < len {
            match op(uffd, off) {
                Ok(Resolved::All) => break,
                Ok(Resolved::Partial { bytes }) => off += bytes as usize,
                Ok(Resolved::AlreadyPresent) => {
                    // Another placer won; it may have used DONTWAKE.
                    let _ = uffd.wake(start + off, page_size);
                    off += page_size;
                }
                Ok(Resolved::EventPending) => {
                    self.drain(fd)?;
                    after_drain(off);
                }
                Err(source) => {
                    return Err(ResolveError::Kernel {
                        offset: off,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}
