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
mod discards;
mod kvm;
mod live;
mod sync;
mod tracker;

use std::time::Duration;

use livepage_mem::{RangeSet, RegionError};
use livepage_uffd::{CreateError, Features, RangeError, ScanError};
use serde::Serialize;

pub use checkpoint::{CheckpointStats, precopy_round, write_checkpoint};
pub use kvm::KvmDirtyLog;
pub use live::{LiveCheckpoints, LiveOptions, LiveReport};
pub use tracker::{Backend, DirtyTracker, TrackOptions};

/// Finds the pages written since the previous collect.
pub trait Tracker: Send {
    /// Returns the pages written since the previous collect (per region) and
    /// re-arms exactly those. A write racing the collect is reported now or
    /// next time, never lost.
    fn collect(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError>;

    /// A short name for tables ("wp-async", "sync-wp", "kvm-dirty-log").
    fn name(&self) -> &'static str;

    /// How a live checkpoint can hold the writers of the pages this tracker
    /// harvests (see [`LiveCheckpoints`]).
    fn live_support(&self) -> LiveSupport {
        LiveSupport::None
    }

    /// Collects like [`Tracker::collect`], then lends the regions'
    /// write-protection to a live checkpoint: tracking stops until
    /// [`Tracker::take_back`]. The workload is paused across both this call
    /// and the checkpoint's arming. Only for [`LiveSupport::HandOver`].
    fn collect_and_lend(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        Err(TrackError::NoLiveSupport(self.name()))
    }

    /// Registers the regions again after a live checkpoint handed the
    /// protection back (the workload still paused), and takes the ranges
    /// discarded meanwhile (absolute addresses) as changed; a no-op when
    /// nothing is lent.
    fn take_back(&mut self, discarded: &[(u64, u64)]) -> Result<(), TrackError> {
        let _ = discarded;
        Ok(())
    }
}

/// How a live checkpoint holds writers while the delta is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LiveSupport {
    /// Tracking does not use userfaultfd on the regions (KVM's dirty log):
    /// the checkpoint write-protects the delta's pages with its own.
    Independent,
    /// The tracker's async write-protection is handed over to a synchronous
    /// userfaultfd for the save and back after it, without walking page
    /// tables (probed: `Capabilities::wp_handover`).
    HandOver,
    /// No live checkpoints: the workload stays paused while the delta is
    /// written (the synchronous tracker, whose userfaultfd holds the regions).
    None,
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
    /// Tracking is lent to a live checkpoint still being saved.
    #[error("tracking is lent to a live checkpoint; hand it back before collecting")]
    Lent,
    /// The tracker cannot lend its protection to a live checkpoint.
    #[error("the {0} tracker cannot hold writers for a live checkpoint")]
    NoLiveSupport(&'static str),
    /// A live checkpoint failed.
    #[error("the live checkpoint failed")]
    Live(#[from] livepage_snapshot::SnapshotError),
}

/// The pages of one region written since the previous collect.
#[derive(Debug, Clone, Default)]
pub struct DirtyRegion {
    /// Byte ranges, relative to the region start, merged.
    pub ranges: RangeSet,
    /// Those of them known to read as zeros (discarded since the previous
    /// collect, with no page left behind).
    pub zeros: RangeSet,
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
