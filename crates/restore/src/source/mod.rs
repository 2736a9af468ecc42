//! Where pages come from: one trait for a local image chain, memory, a raw
//! memory file (Firecracker's snapshot format) and a peer over TCP.

mod chain;
pub(crate) mod memory;
pub(crate) mod raw_file;

use std::path::PathBuf;
use std::sync::Arc;

pub use chain::ChainSource;
pub use memory::MemorySource;
pub use raw_file::RawFileSource;

use crate::wire::WireError;

/// The shape of one region as a source sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SourceRegion {
    /// Page size in bytes.
    pub page_size: usize,
    /// Number of pages.
    pub pages: u64,
}

/// Which path a read takes. A source with separate channels (a remote
/// peer) keeps demand reads off the background ones, so a faulting thread
/// never waits behind bulk data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A page a thread is waiting for.
    Demand,
    /// Prefetch, fills, zero runs.
    Background,
}

/// A source of pages for a lazy restore. Implementations are called from
/// several threads at once.
pub trait PageSource: Send + Sync {
    /// The regions this source holds.
    fn regions(&self) -> Vec<SourceRegion>;

    /// Fills `buf` (a whole number of pages of `region`, starting at page
    /// `first`). Returns whether any page holds data: `false` means every page
    /// is zero (and `buf` may have been left as it was).
    fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
        lane: Lane,
    ) -> Result<bool, SourceError>;

    /// Runs of pages `[start, end)` of `region` known to be zero, if the source
    /// knows them without reading (an image's index, a file's holes). The
    /// engine leaves large ones to the kernel.
    fn zero_runs(&self, _region: usize) -> Option<Vec<(u64, u64)>> {
        None
    }
}

/// Why a source could not give pages.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source has no such region.
    #[error("the source has no region {region}")]
    NoRegion {
        /// The region asked for.
        region: usize,
    },
    /// The pages asked for lie outside the region.
    #[error("pages {first}+{count} lie outside region {region} of the source ({pages} pages)")]
    OutOfRange {
        /// Region.
        region: usize,
        /// First page asked for.
        first: u64,
        /// Pages asked for.
        count: u64,
        /// Pages the region has.
        pages: u64,
    },
    /// A stored page failed its checksum.
    #[error("{cause}")]
    Corrupt {
        /// Region of the page.
        region: usize,
        /// The page.
        page: u64,
        /// The image's report (file, file offset, checksums).
        cause: Arc<livepage_image::ImageError>,
    },
    /// An image could not be read.
    #[error("reading pages {first}+{count} of region {region}: {cause}")]
    Image {
        /// Region.
        region: usize,
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
        /// Why.
        cause: Arc<livepage_image::ImageError>,
    },
    /// Reading a file failed.
    #[error("reading {len} bytes at offset {offset} of {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: usize,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The peer is gone (the connection broke).
    #[error("the page server {peer} vanished ({doing}: {source})")]
    PeerGone {
        /// The peer.
        peer: String,
        /// What was being done.
        doing: &'static str,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The peer did not answer in time.
    #[error("the page server {peer} did not answer within {timeout_ms} ms ({doing})")]
    Timeout {
        /// The peer.
        peer: String,
        /// What was being done.
        doing: &'static str,
        /// The limit.
        timeout_ms: u64,
    },
    /// The peer spoke something else, or pages arrived corrupt.
    #[error("the page server {peer}: {detail}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        #[source]
        detail: WireError,
    },
    /// The peer refused the request (its answer is quoted).
    #[error("the page server {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its message.
        reason: String,
    },
    /// An image store (object store, chunk cache) could not give the pages:
    /// unreachable past its deadline (`fatal`), or a chunk missing or
    /// failing its hash. The cause names the store, image and chunk.
    #[error("pages {first}+{count} of region {region}: {cause}")]
    Store {
        /// Region.
        region: usize,
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
        /// The store is gone: stop asking.
        fatal: bool,
        /// The store's error.
        #[source]
        cause: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl SourceError {
    /// The source is gone for good (a peer that vanished): every page still
    /// missing is lost, so the engine stops asking it (fails closed, or
    /// waits for a replacement) instead of failing page by page.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            SourceError::PeerGone { .. }
                | SourceError::Timeout { .. }
                | SourceError::Protocol { .. }
                | SourceError::Store { fatal: true, .. }
        )
    }
}

/// Checks that `len` bytes from page `first` fit region `region`.
pub(crate) fn check_run(
    regions: &[SourceRegion],
    region: usize,
    first: u64,
    len: usize,
) -> Result<SourceRegion, SourceError> {
    let r = *regions
        .get(region)
        .ok_or(SourceError::NoRegion { region })?;
    let count = (len / r.page_size) as u64;
    if len % r.page_size != 0 || first.checked_add(count).is_none_or(|e| e > r.pages) {
        return Err(SourceError::OutOfRange {
            region,
            first,
            count,
            pages: r.pages,
        });
    }
    Ok(r)
}
