//! Incremental dirty tracking: which pages were written since the last
//! collect. One [`Tracker`] trait, three backends:
//!
//! - [`DirtyTracker`] with [`Backend::WpAsync`] (default on Linux 6.7+): an
//!   async write-protect userfaultfd. The kernel resolves write faults
//!   itself and only clears the page's uffd-wp bit: no message, no handler
//!   thread. A collect harvests written pages with PAGEMAP_SCAN and
//!   re-protects exactly those in the same walk (`PM_SCAN_WP_MATCHING |
//!   PM_SCAN_CHECK_WPASYNC`), under the page-table lock, so a racing write is
//!   reported now or faults afterwards and is reported next time: never
//!   lost (it may be reported twice). Pages present at the previous collect
//!   and gone now were zapped by a discard: they are reported too (their
//!   contents became zeros, and no harvest would see them).
//! - [`DirtyTracker`] with [`Backend::SyncWp`] (Linux 5.7 to 6.6): each
//!   first write is a fault served on the fault runtime: the write is let
//!   through, then the page is marked. A collect swaps the bitmap and
//!   re-protects what it reports before returning. The regions are
//!   registered MISSING|WP and discards are followed (EVENT_REMOVE): a
//!   discarded range is reported dirty, and a page zapped with its
//!   protection faults as missing at its next touch, is installed
//!   protected again and reported, so a discard followed by writes is never
//!   invisible.
//! - [`KvmDirtyLog`]: KVM's dirty log (guest writes only, the VM paused).
//!
//! Reported ranges are merged and page aligned (4 KiB, or 2 MiB on
//! hugetlb). [`write_checkpoint`] turns a collect into a delta image (or
//! writes a full base image); [`precopy_round`] hands out dirty ranges with
//! their contents, the building block of pre-copy migration.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod checkpoint;
mod kvm;
mod sync;
mod tracker;

use std::time::Duration;

use livepage_mem::{RangeSet, RegionError};
use livepage_uffd::{CreateError, Features, RangeError, ScanError};
use serde::Serialize;

pub use checkpoint::{CheckpointStats, precopy_round, write_checkpoint};
pub use kvm::KvmDirtyLog;
pub use tracker::{Backend, DirtyTracker, TrackOptions};

/// Finds the pages written since the previous collect.
pub trait Tracker: Send {
    /// Returns the pages written since the previous collect (per region) and
    /// re-arms exactly those. A write racing the collect is reported now or
    /// next time, never lost.
    fn collect(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError>;

    /// A short name for tables ("wp-async", "sync-wp", "kvm-dirty-log").
    fn name(&self) -> &'static str;
}

/// Why tracking could not start or a collect failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// No userfaultfd.
    #[error("cannot create the tracking userfaultfd")]
    Uffd(#[from] CreateError),
    /// The requested backend needs features this kernel lacks.
    #[error("the {backend:?} backend needs userfaultfd features {missing:?} this kernel lacks")]
    Unsupported {
        /// Backend.
        backend: Backend,
        /// Missing features.
        missing: Features,
    },
    /// Registration or protection failed.
    #[error("registering or protecting a region failed")]
    Region(#[from] RegionError),
    /// An ioctl failed.
    #[error("write-protect ioctl failed")]
    Kernel(#[from] RangeError),
    /// PAGEMAP_SCAN failed.
    #[error("PAGEMAP_SCAN failed")]
    Scan(#[from] ScanError),
    /// Writing a checkpoint image failed.
    #[error("writing the checkpoint image failed")]
    Image(#[from] livepage_image::ImageError),
    /// The synchronous backend's fault handling failed: writes since may
    /// have gone unseen, so tracking cannot go on.
    #[error("the write-protect fault handler failed")]
    Handler(#[source] livepage_runtime::RuntimeError),
    /// A write-protect fault could not be resolved.
    #[error("resolving a write-protect fault at {addr:#x} failed")]
    Fault {
        /// The page.
        addr: u64,
        /// The cause.
        #[source]
        source: livepage_runtime::ResolveError,
    },
    /// Reading KVM's dirty log failed.
    #[error("reading KVM's dirty log failed")]
    DirtyLog(#[source] std::io::Error),
    /// The tracker was stopped.
    #[error("the tracker was stopped")]
    Stopped,
}

/// The pages of one region written since the previous collect.
#[derive(Debug, Clone, Default)]
pub struct DirtyRegion {
    /// Byte ranges, relative to the region start, merged.
    pub ranges: RangeSet,
}

/// Statistics of one collect.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CollectStats {
    /// Bytes reported dirty.
    pub dirty_bytes: u64,
    /// Disjoint ranges reported.
    pub ranges: usize,
    /// PAGEMAP_SCAN ioctls issued (async backend).
    pub scan_calls: u64,
    /// How long the collect took (harvest and re-protect), in milliseconds.
    #[serde(rename = "duration_ms", serialize_with = "ser_ms")]
    pub duration: Duration,
}

/// Serializes a duration as a number of milliseconds.
pub fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl CollectStats {
    pub(crate) fn tally(dirty: &[DirtyRegion], duration: Duration, scan_calls: u64) -> Self {
        CollectStats {
            dirty_bytes: dirty.iter().map(|d| d.ranges.total()).sum(),
            ranges: dirty.iter().map(|d| d.ranges.len()).sum(),
            scan_calls,
            duration,
        }
    }
}
