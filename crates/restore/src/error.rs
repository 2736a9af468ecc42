//! Why a restore failed, with the region, range or page and the cause.

use livepage_mem::{MemoryKind, RegionError};
use livepage_runtime::{ResolveError, RuntimeError};
use livepage_uffd::CreateError;

use crate::map::MapError;
use crate::source::SourceError;

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// No userfaultfd.
    #[error("cannot create the restore userfaultfd")]
    Uffd(#[from] CreateError),
    /// Registering or filling a region failed.
    #[error("a region of the restore failed")]
    Region(#[from] RegionError),
    /// A resolving ioctl failed.
    #[error("placing pages at {addr:#x}+{len:#x} failed")]
    Place {
        /// Start of the run.
        addr: u64,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: ResolveError,
    },
    /// The ranges do not form a map.
    #[error("the address map is invalid")]
    Map(#[from] MapError),
    /// Regions given and the source's differ in number.
    #[error("the source holds {source_regions} region(s), {given} were given to restore into")]
    RegionCount {
        /// The source's.
        source_regions: usize,
        /// Given.
        given: usize,
    },
    /// A region differs from the source's.
    #[error(
        "region {region}: the source has {source_pages} pages of {source_page_size} bytes, the \
         {kind} region {pages} pages of {page_size} bytes (restore into memory of the image's \
         type, or restore eagerly)"
    )]
    RegionShape {
        /// Region.
        region: usize,
        /// The source's pages.
        source_pages: u64,
        /// The source's page size.
        source_page_size: usize,
        /// The memory type given.
        kind: MemoryKind,
        /// Its pages.
        pages: u64,
        /// Its page size.
        page_size: usize,
    },
    /// Minor mode on memory without a page cache.
    #[error(
        "minor mode needs shmem or hugetlbfs memory; range {range} is {kind} (use missing mode, \
         or --memory shmem|hugetlb)"
    )]
    MinorNeedsPageCache {
        /// Range.
        range: usize,
        /// Its memory type.
        kind: MemoryKind,
    },
    /// A range maps pages the source does not have.
    #[error(
        "range {range} maps pages {first}+{pages} of source region {region} ({page_size}-byte \
         pages), which the source does not hold"
    )]
    RangeOutsideSource {
        /// Range.
        range: usize,
        /// Source region.
        region: usize,
        /// First source page.
        first: u64,
        /// Pages.
        pages: u64,
        /// The range's page size.
        page_size: usize,
    },
    /// A range names a userfaultfd that was not given.
    #[error("range {range} is served by userfaultfd {fd}, but {fds} were given")]
    NoSuchFd {
        /// Range.
        range: usize,
        /// Its fd.
        fd: usize,
        /// How many were given.
        fds: usize,
    },
    /// An option that must be at least 1 was 0.
    #[error("{option} must be at least 1")]
    Zero {
        /// Which.
        option: &'static str,
    },
    /// The source failed for some pages; they were poisoned.
    #[error("{first}; {pages} page(s) could not be read and were poisoned (SIGBUS on access)")]
    Source {
        /// Pages lost.
        pages: u64,
        /// The first error.
        first: SourceError,
    },
    /// The source was lost and no new one came in time.
    #[error(
        "the source was lost ({cause}) and no new one came within {waited_ms} ms; pages not yet \
         placed were poisoned"
    )]
    SourceLost {
        /// Why it was lost.
        cause: SourceError,
        /// How long the restore waited.
        waited_ms: u64,
    },
    /// A pushed page could not be placed; pages not yet placed were poisoned.
    #[error("placing pushed pages failed; pages not yet placed were poisoned")]
    PushFailed,
    /// A new source holds other regions.
    #[error("the new source holds other regions than the one it replaces")]
    SourceMismatch,
    /// A serving thread died; pages not yet placed were poisoned.
    #[error("a fault handler thread died; pages not yet placed were poisoned")]
    HandlerDied(#[source] RuntimeError),
    /// The fault runtime could not start.
    #[error("the fault runtime could not start")]
    Runtime(#[source] RuntimeError),
}
