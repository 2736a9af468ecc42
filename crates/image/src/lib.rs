//! The livepage image format (version 2); the layout is documented in
//! `docs/FORMAT.md`.
//!
//! An image holds the pages of one or more memory regions. Each page lives at
//! a computable file offset (`region.data_offset + page * page_size`), so a
//! page can be read or mapped directly; zero pages are never written and stay
//! holes in a sparse file. An index records each page's state (zero, data, or
//! "in the parent image" for deltas) and its crc32c. An optional section
//! carries the test VM's vCPU state. A delta names its parent by the parent's
//! content hash ([`ImageId`]).
//!
//! [`ImageWriter`] writes crash-safely (an unnamed temporary file in the
//! destination directory, fsync, link under its name, fsync of the
//! directory) and never replaces an existing file; [`Image`] validates
//! everything it reads and reports corruption with the page and file offset.
//! [`fold()`] merges the oldest delta of a chain into its parent, and
//! [`Retainer`] keeps the last N checkpoints of a chain that way in the
//! background.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod chain;
mod error;
mod fold;
#[cfg(test)]
mod fold_tests;
mod format;
pub mod le;
mod reader;
mod retain;
#[cfg(test)]
mod tests;
mod writer;

use serde::Serialize;

pub use chain::{Chain, peek_id};
pub use error::ImageError;
pub use fold::{FoldProgress, FoldReport, fold};
pub use reader::Image;
pub use retain::{RetainReport, Retainer, retain};
pub use writer::ImageWriter;

/// File magic.
pub const MAGIC: &[u8; 8] = b"LIVEPAGE";
/// Format version this build writes (it reads [`OLDEST_VERSION`] to this).
pub const VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_SIZE: u64 = 4096;
pub(crate) const REGION_TABLE_AT: usize = 120;
pub(crate) const REGION_ENTRY: usize = 48;
/// Where a folded image keeps the id of the parent it was folded from
/// (version 2).
pub(crate) const FOLDED_FROM_AT: usize = 4056;
/// Where a folded image keeps the id of the delta it stands for (version 2).
pub(crate) const STANDS_FOR_AT: usize = 4072;
/// Most regions an image can describe.
pub const MAX_REGIONS: usize = (FOLDED_FROM_AT - REGION_TABLE_AT) / REGION_ENTRY;
pub(crate) const INDEX_ENTRY: u64 = 8;

/// Memory type codes stored per region.
pub mod kind {
    /// Private anonymous memory.
    pub const ANON: u32 = 0;
    /// Anonymous memory with THP.
    pub const THP: u32 = 1;
    /// memfd / shmem.
    pub const SHMEM: u32 = 2;
    /// hugetlbfs.
    pub const HUGETLB: u32 = 3;
    /// The code of a memory type.
    pub fn of(k: livepage_mem::MemoryKind) -> u32 {
        use livepage_mem::MemoryKind;
        match k {
            MemoryKind::Anon => ANON,
            MemoryKind::Thp => THP,
            MemoryKind::Shmem => SHMEM,
            MemoryKind::Hugetlb => HUGETLB,
        }
    }
    /// The memory type of a code, if known.
    pub fn memory(k: u32) -> Option<livepage_mem::MemoryKind> {
        use livepage_mem::MemoryKind;
        match k {
            ANON => Some(MemoryKind::Anon),
            THP => Some(MemoryKind::Thp),
            SHMEM => Some(MemoryKind::Shmem),
            HUGETLB => Some(MemoryKind::Hugetlb),
            _ => None,
        }
    }
    /// The lower-case name of a code.
    pub fn name(k: u32) -> &'static str {
        match k {
            ANON => "anon",
            THP => "thp",
            SHMEM => "shmem",
            HUGETLB => "hugetlb",
            _ => "unknown",
        }
    }
}

/// A 128-bit content hash identifying an image (xxh3-128 of its region
/// table, index, VM state and parent id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ImageId(pub [u8; 16]);

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for ImageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One region as the image describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RegionDesc {
    /// Address the region had when the image was taken.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Page size (4 KiB, or 2 MiB for hugetlb).
    pub page_size: u64,
    /// Memory type ([`kind`]).
    pub kind: u32,
}

impl RegionDesc {
    /// Describes a region as it is now.
    pub fn of(r: &livepage_mem::Region) -> RegionDesc {
        RegionDesc {
            base: r.addr() as u64,
            len: r.len() as u64,
            page_size: r.page_size() as u64,
            kind: kind::of(r.kind()),
        }
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size
    }
}

/// What the index says about a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PageState {
    /// All zeros; a hole in the file.
    Zero,
    /// Stored in this image.
    Data,
    /// Unchanged since the parent image (deltas only).
    Parent,
}

impl PageState {
    pub(crate) fn code(self) -> u32 {
        match self {
            PageState::Zero => 0,
            PageState::Data => 1,
            PageState::Parent => 2,
        }
    }
    pub(crate) fn from_code(c: u32) -> Option<PageState> {
        match c {
            0 => Some(PageState::Zero),
            1 => Some(PageState::Data),
            2 => Some(PageState::Parent),
            _ => None,
        }
    }
}
