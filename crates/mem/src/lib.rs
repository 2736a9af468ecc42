//! Memory regions the livepage engines work on, plus the pure bookkeeping
//! types they share ([`PageBitmap`], [`RangeSet`]).
//!
//! A [`Region`] owns its mapping (unmapped on drop), knows its memory type and
//! page size, and for shmem and hugetlbfs keeps the memfd and a second,
//! unregistered *alias* mapping through which pages can be filled without
//! faulting (the MINOR-mode restore path).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod bitmap;
pub mod hugetlb;
mod rangeset;
mod reference;
mod region;
mod table;

pub use bitmap::PageBitmap;
pub use rangeset::RangeSet;
pub use region::{MemoryKind, Region, RegionError, UnknownKind};
pub use table::{PagedRegion, RegionTable};
