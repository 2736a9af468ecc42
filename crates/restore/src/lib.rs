//! Lazy restore: memory is usable at once; a page arrives when it is first
//! touched while a background prefetcher fills the rest, demand first.
//!
//! The core, [`serve()`], serves userfaultfds it is given, over memory it may
//! not own (another process's, like a Firecracker guest's RAM: the ioctls
//! act on the fd's process), described by an [`AddressMap`] from host
//! ranges to source pages. It takes a resident set (pages already correct,
//! never fetched), pushed pages ([`Pusher`]), two read paths (demand reads
//! never wait behind background ones, [`Lane`]) and a source that can be
//! replaced while serving ([`Restore::replace_source`], [`OnSourceLoss`]).
//! [`start`] creates and registers userfaultfds over regions of ours and
//! calls it. Faults are read by the one fault runtime (`livepage-runtime`);
//! this crate is its policy.
//!
//! - **Missing mode** (any memory): a fault is resolved with UFFDIO_COPY,
//!   or UFFDIO_ZEROPAGE for a zero page.
//! - **Minor mode** (shmem, hugetlbfs): pages are written into the page
//!   cache and mapped with UFFDIO_CONTINUE; registered MISSING|MINOR.
//! - Zero runs the source knows of are left to the kernel (unregistered).
//!
//! Every page is placed once: the page-state core (claim, done, discarded,
//! resident) decides between handlers, the prefetcher and pushes. REMOVE
//! events are honoured: a discarded page is answered with zeros afterwards,
//! never with stale data.
//!
//! Failing closed: a page the source cannot give is poisoned (SIGBUS for the
//! toucher, at once), and only that page; a source that is gone, or a
//! handler thread that panics, poisons every page not yet placed; a watchdog
//! reports placements that take too long. A `Restore` dropped before
//! [`Restore::wait`] does the same.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod engine;
mod error;
pub mod firecracker;
mod handler;
pub mod load;
mod map;
mod options;
mod place;
mod prefetch;
mod serve;
mod source;
mod states;
mod stats;
mod supply;
pub mod tcp;
mod watchdog;
pub mod wire;
mod working_set;
mod zero_runs;

pub use error::RestoreError;
pub use map::{AddressMap, MapError, MappedRange};
pub use options::{Mode, Notice, NoticeReporter, OnSourceLoss, Prefetch, RestoreOptions, Stall};
pub use serve::{Observer, Pushed, Pusher, Restore, Target, serve, start};
pub use source::memory::MemorySourceError;
pub use source::raw_file::RawFileError;
pub use source::{
    ChainSource, Lane, MemorySource, PageSource, RawFileSource, SourceError, SourceRegion,
};
pub use stats::{Bucket, RestoreStats};
pub use working_set::{FormatError as WorkingSetFormatError, WorkingSet, WorkingSetError};
