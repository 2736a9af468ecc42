//! What an engine tells the runtime: its userfaultfds and what to do with
//! each kind of event.

use std::sync::MutexGuard;
use std::time::Duration;

use livepage_uffd::{BASE_PAGE, Event, Uffd};

use crate::cx::{Cx, Fault};
use crate::error::RuntimeError;

/// An engine's answer to userfaultfd events. One policy value is shared by
/// every thread serving it, so methods take `&self`; what a thread needs for
/// itself (page buffers, deferred wakes) lives in [`Policy::Local`], made
/// once per thread so the event path allocates nothing.
pub trait Policy: Send + Sync + Sized + 'static {
    /// Per-thread state.
    type Local: Send + 'static;

    /// The userfaultfds served, indexed by the `fd` numbers of [`Fault`]
    /// and [`Policy::event`].
    fn fds(&self) -> &[Uffd];

    /// A new thread's state.
    fn local(&self) -> Self::Local;

    /// Serves one page fault. An ioctl that returns `EventPending` is
    /// answered with [`Cx::drain`] (or use [`Cx::resolve`], which does it).
    fn fault(&self, cx: &mut Cx<'_, Self>, local: &mut Self::Local, fault: Fault);

    /// A discard, unmap, remap or fork on userfaultfd `fd`. It may arrive
    /// while a fault of this thread is half served (a drain), so it gets no
    /// thread state. Dropping a fork's userfaultfd unregisters the child.
    fn event(&self, fd: usize, event: Event) {
        let _ = (fd, event);
    }

    /// Called before every read of `fd`'s events, by a handler or a drain.
    /// A returned guard is held until the events read are dispatched: a
    /// policy that must act before anyone reads a pending event (the live
    /// snapshot saves what a discard would destroy) serializes reads so.
    fn before_read(&self, fd: usize) -> Option<MutexGuard<'_, ()>> {
        let _ = fd;
        None
    }

    /// After a batch of faults (and the faults its drains read) was served:
    /// wake deferred ranges and the like.
    fn batch_done(&self, cx: &mut Cx<'_, Self>, local: &mut Self::Local) {
        let _ = (cx, local);
    }

    /// Before each wait for events: periodic work. Returns how long the wait
    /// may last (`None`: until an event comes).
    fn idle(&self, local: &mut Self::Local) -> Option<Duration> {
        let _ = local;
        None
    }

    /// Serving failed (the policy panicked): fail closed, so that no thread
    /// waits on a page that will never come. Called once per failure.
    fn fail(&self, error: &RuntimeError) {
        let _ = error;
    }

    /// A fault read after the policy failed: it must not wait forever. The
    /// default wakes the page (the thread retries; after [`Policy::fail`]
    /// it finds a poisoned page, or no registration at all).
    fn fault_after_failure(&self, fault: &Fault) {
        if let Some(u) = self.fds().get(fault.fd) {
            let addr = fault.fault.address as usize & !(BASE_PAGE - 1);
            let _ = u.wake(addr, BASE_PAGE);
        }
    }
}
