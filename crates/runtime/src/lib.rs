//! The fault runtime: the one place where livepage reads userfaultfd events.
//!
//! Every engine (the live snapshot's write-protect handlers, the synchronous
//! dirty tracker, lazy restore, the Firecracker page server) hands the
//! runtime its userfaultfds and a [`Policy`]: what to do with a page fault,
//! a discard, an unmap, a remap or a fork. The runtime owns everything else:
//!
//! - **Threads.** [`Runtime::start`] runs named handler threads, each
//!   polling its share of the userfaultfds and a stop signal. Engine threads
//!   that also place pages (a prefetcher, a writer) run through
//!   [`Runtime::spawn_worker`] under the same supervision.
//! - **Reads.** Batched `read(2)` into a buffer allocated once per thread:
//!   nothing on the event path allocates (a reader that allocates can
//!   deadlock against glibc's `fork()`, docs/kernel.md).
//! - **One EAGAIN contract.** An ioctl that finds an event pending
//!   (`Resolved::EventPending`) makes its caller drain the events itself
//!   ([`Cx::drain`]): discards and unmaps reach the policy at once, and the
//!   faults read on the way are kept and served right after the current one,
//!   by the same thread. [`Cx::resolve`] runs a resolving ioctl to the end
//!   under that contract: partial progress continues, EEXIST is answered by
//!   a wake, EAGAIN drains and retries.
//! - **Supervision.** A policy that panics is reported to the owner as a
//!   [`RuntimeError`] and told to fail closed ([`Policy::fail`]); the thread
//!   then keeps reading events, so no faulting thread and no thread blocked
//!   in `munmap` or `madvise` waits forever.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cx;
mod error;
mod policy;
mod runtime;

pub use cx::{Cx, Fault, ResolveError};
pub use error::RuntimeError;
pub use policy::Policy;
pub use runtime::{Runtime, RuntimeOptions, Worker};
