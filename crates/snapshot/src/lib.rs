//! Live snapshots (async savevm): a point-in-time image of memory taken while
//! the workload keeps running.
//!
//! [`start`] arms userfaultfd write-protection over the regions (that instant
//! is the snapshot's instant) and returns. From then on:
//!
//! - a **background writer** streams pages to the image in address order,
//!   un-protecting runs of pages as soon as they are saved;
//! - a write to a page not yet saved raises a write-protect fault; a
//!   **handler** thread copies the original page into a *bounded* buffer,
//!   lifts the protection and wakes the writer at once. The writer never waits
//!   for the disk while the buffer has room;
//! - when the buffer is full the handler writes the page to the image itself
//!   before waking the writer: the snapshot degrades to synchronous saving,
//!   never to unbounded memory. A buffer of 0 is QEMU's behaviour;
//! - zero pages are stored as holes; never-touched pages are caught too
//!   (WP_UNPOPULATED markers); granularity is 4 KiB even on THP.
//!
//! Every page is saved exactly once: a claim bit per page decides between the
//! writer and the handlers, and a done bit tells a handler when a page claimed
//! by the writer may be released.
//!
//! Discards: while a REMOVE event (MADV_DONTNEED, a balloon) is pending, the
//! discarding thread is blocked and every resolving ioctl fails with EAGAIN.
//! Before reading events a handler probes for that state (a no-op
//! write-protect of a private canary page); if an event is pending it saves
//! every page not yet saved, synchronously, and only then reads the event, so
//! the discarded memory keeps its contents from the snapshot instant. An
//! event that arrives in the few microseconds between the probe and the read
//! is caught by the saves that follow immediately; such cases are counted in
//! [`SnapshotStats::late_remove_saves`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buffer;
mod engine;
mod handler;
mod snapshot;
mod writer;

use std::time::Duration;

use livepage_image::{ImageError, ImageId};
use livepage_mem::{RangeSet, RegionError};
use livepage_uffd::{CreateError, Features, RangeError};
use serde::Serialize;

pub use snapshot::{Prepared, Snapshot, Watch, prepare, required_features, start};

/// How the pages a snapshot saves are write-protected at its instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protection {
    /// [`Prepared::arm`] registers and write-protects what the snapshot saves
    /// (the whole regions; or a delta's pages, or the whole regions when they
    /// are many runs). Saved pages are un-protected as they go; completion
    /// lifts the rest.
    #[default]
    Arm,
    /// A dirty tracker handed its write-protection over (see
    /// `livepage_uffd::Uffd::unregister_keeping_protection`): every page it
    /// tracks is protected already, so arming only registers the regions
    /// (microseconds), plus one protection walk when `protect_all` (a base
    /// image, whose never-touched pages carry no tracker bit). Saved pages
    /// stay protected, so each first write after the instant still faults,
    /// until [`Snapshot::hand_back`] gives the protection back to the tracker.
    HandedOver {
        /// Also protect every page at arming.
        protect_all: bool,
    },
}

/// What a delta saves: per region, byte ranges relative to the region start
/// (page aligned), and those of them known to be zeros at the instant (a
/// discard since the previous collect), stored as holes without reading.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The pages to save, per region.
    pub pages: Vec<RangeSet>,
    /// Pages among them that are zeros at the instant, per region (may be empty).
    pub zeros: Vec<RangeSet>,
}

/// Options of a snapshot. Start from [`SnapshotOptions::default`] and set
/// what differs; new options will come.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SnapshotOptions {
    /// Bytes of copy-on-write buffer (0: every write to an unsaved page waits
    /// for the disk).
    pub buffer_bytes: usize,
    /// Threads serving write-protect faults (at least 1).
    pub handler_threads: usize,
    /// Pages the background writer claims and saves per step.
    pub chunk_pages: usize,
    /// The VM state section of the image.
    pub vm_state: Option<Vec<u8>>,
    /// Threads that write-protect pieces of the regions at the instant
    /// (0: one per online CPU).
    pub arm_threads: usize,
    /// The image this one is a delta of (with [`Prepared::arm_scope`]).
    pub parent: Option<ImageId>,
    /// How pages are protected at the instant.
    pub protection: Protection,
}

impl SnapshotOptions {
    /// Sets the copy-on-write buffer's bound in bytes.
    pub fn buffer_bytes(mut self, n: usize) -> Self {
        self.buffer_bytes = n;
        self
    }
    /// Sets the fault handler threads.
    pub fn handler_threads(mut self, n: usize) -> Self {
        self.handler_threads = n;
        self
    }
    /// Sets the pages the writer saves per step.
    pub fn chunk_pages(mut self, n: usize) -> Self {
        self.chunk_pages = n;
        self
    }
    /// Sets the VM state section.
    pub fn vm_state(mut self, state: Option<Vec<u8>>) -> Self {
        self.vm_state = state;
        self
    }
    /// Sets the arming threads (0: one per CPU).
    pub fn arm_threads(mut self, n: usize) -> Self {
        self.arm_threads = n;
        self
    }
    /// Makes the image a delta of `parent`.
    pub fn parent(mut self, parent: Option<ImageId>) -> Self {
        self.parent = parent;
        self
    }
    /// Sets how pages are protected at the instant.
    pub fn protection(mut self, p: Protection) -> Self {
        self.protection = p;
        self
    }
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            buffer_bytes: 64 << 20,
            handler_threads: 1,
            chunk_pages: 1024,
            vm_state: None,
            arm_threads: 0,
            parent: None,
            protection: Protection::Arm,
        }
    }
}

/// Why a snapshot could not start or did not complete. After any error the
/// protection is lifted, the workload runs on, and no image is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No userfaultfd.
    #[error("cannot create a userfaultfd for the snapshot")]
    Uffd(#[from] CreateError),
    /// The kernel lacks a feature the snapshot needs.
    #[error("the kernel lacks userfaultfd features {0:?} needed for live snapshots")]
    MissingFeatures(Features),
    /// A region could not be registered or protected.
    #[error("arming write-protection failed")]
    Region(#[from] RegionError),
    /// A resolving ioctl failed.
    #[error("userfaultfd ioctl failed")]
    Kernel(#[from] RangeError),
    /// Writing the image failed (unwritable or full destination, …).
    #[error("writing the image failed")]
    Image(#[from] ImageError),
    /// The snapshot was cancelled.
    #[error("the snapshot was cancelled")]
    Cancelled,
    /// A region was unmapped while the snapshot ran.
    #[error("a snapshotted region was unmapped during the snapshot ({start:#x}..{end:#x})")]
    RegionUnmapped {
        /// Start of the unmapped range.
        start: u64,
        /// End.
        end: u64,
    },
    /// Reading userfaultfd events failed.
    #[error("reading userfaultfd events failed")]
    Read(#[from] livepage_uffd::ReadError),
    /// Nothing to snapshot.
    #[error("no regions to snapshot")]
    NoRegions,
    /// Arming write-protection stopped part way (an event was pending).
    #[error("arming write-protection did not complete ({0:?}); try again")]
    ArmIncomplete(livepage_uffd::Resolved),
    /// A thread of the snapshot failed (a handler, the writer).
    #[error("a snapshot thread failed")]
    Thread(#[source] livepage_runtime::RuntimeError),
    /// Resolving a fault failed.
    #[error("resolving a write-protect fault failed")]
    Fault(#[from] livepage_runtime::ResolveError),
    /// [`Snapshot::hand_back`] before every page is saved, or without
    /// [`Protection::HandedOver`].
    #[error(
        "the protection can be handed back only by a handed-over snapshot whose pages are all saved"
    )]
    NotSaved,
    /// The buffer could grow beyond the memory this machine has available.
    #[error(
        "a copy-on-write buffer of {} MiB can grow to {} MiB here (the size of the memory it copies), more than the {} MiB available; give a smaller --buffer (0 makes early writers wait for the disk)",
        .requested >> 20, .can_grow_to >> 20, .available >> 20
    )]
    BufferTooLarge {
        /// The bound asked for.
        requested: u64,
        /// What it can really grow to (the bound, at most the regions' size).
        can_grow_to: u64,
        /// `MemAvailable`.
        available: u64,
    },
    /// A scope names a different number of regions than the snapshot has.
    #[error("the delta's scope covers {got} regions, the snapshot has {expected}")]
    ScopeMismatch {
        /// Regions of the snapshot.
        expected: usize,
        /// Regions in the scope.
        got: usize,
    },
}

/// Final statistics.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    /// The image's content hash.
    #[serde(serialize_with = "ser_id")]
    pub image_id: ImageId,
    /// Pages the image stores: every page of the regions, or a delta's pages.
    pub pages: u64,
    /// Pages stored with data.
    pub data_pages: u64,
    /// Pages stored as holes.
    pub zero_pages: u64,
    /// Pages saved by the background writer.
    pub by_writer: u64,
    /// Pages copied into the buffer on a write fault.
    pub by_fault_buffered: u64,
    /// Pages written to the image on a write fault because the buffer was full.
    pub by_fault_sync: u64,
    /// Pages found all-zero on a write fault (stored as holes, no buffer used).
    pub by_fault_zero: u64,
    /// Pages saved synchronously because a discard (REMOVE) was pending.
    pub remove_saves: u64,
    /// Pages of a REMOVE read before its probe (see the crate docs).
    pub late_remove_saves: u64,
    /// Write-protect faults served.
    pub faults: u64,
    /// Data bytes written.
    pub bytes_written: u64,
    /// Most buffer bytes in use at once.
    pub peak_buffer_bytes: u64,
    /// Time to register and arm protection (the workload's pause), in ms.
    #[serde(rename = "arm_ms", serialize_with = "ser_ms")]
    pub arm: Duration,
    /// Time from arming to the image being complete, in ms.
    #[serde(rename = "duration_ms", serialize_with = "ser_ms")]
    pub duration: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

fn ser_id<S: serde::Serializer>(id: &ImageId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_string())
}

/// A snapshot's progress.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Progress {
    /// Pages to save (all pages, or a delta's).
    pub pages: u64,
    /// Pages saved (to the image or the buffer).
    pub saved: u64,
    /// Buffer bytes in use now.
    pub buffered_bytes: u64,
    /// Write-protect faults served so far.
    pub faults: u64,
}
