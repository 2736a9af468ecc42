//! Where the pages of a restore live: host address ranges (in the address
//! space of the userfaultfd's process, which need not be ours) mapped to
//! pages of the source, with the userfaultfd serving each range.

use std::sync::Arc;

use livepage_mem::{MemoryKind, Region};

/// One host range of a restore.
#[derive(Debug, Clone)]
pub struct MappedRange {
    /// Address of the range's first page, in the userfaultfd's process.
    pub addr: u64,
    /// Pages in the range.
    pub pages: u64,
    /// Page size in bytes (4 KiB, or 2 MiB on hugetlbfs).
    pub page_size: usize,
    /// The memory type (decides how zeros are placed).
    pub kind: MemoryKind,
    /// Which userfaultfd serves the range (index into the target's fds).
    pub fd: usize,
    /// The source region its pages come from.
    pub source_region: usize,
    /// The source page of the range's first page.
    pub source_first: u64,
    /// For minor mode: the region whose page cache backs the range, and
    /// the range's byte offset in it (pages are written there, then
    /// mapped with UFFDIO_CONTINUE).
    pub page_cache: Option<(Arc<Region>, usize)>,
}

impl MappedRange {
    /// Bytes in the range.
    pub fn len(&self) -> u64 {
        self.pages * self.page_size as u64
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.len()
    }
}

/// The ranges of a restore, numbered as one page space (range `i`'s pages
/// follow range `i-1`'s), with lookup by address and by source page.
#[derive(Debug, Clone, Default)]
pub struct AddressMap {
    ranges: Vec<MappedRange>,
    first: Vec<u64>,
    by_addr: Vec<usize>,
    total: u64,
}

/// Why a set of ranges cannot be an address map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// A range is empty, misaligned or overflows.
    #[error(
        "range {index} ({addr:#x}, {pages} pages of {page_size} bytes) is empty, misaligned or overflows"
    )]
    BadRange {
        /// Range index.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its pages.
        pages: u64,
        /// Its page size.
        page_size: usize,
    },
    /// Two ranges overlap.
    #[error("ranges {a} and {b} overlap")]
    Overlap {
        /// One.
        a: usize,
        /// The other.
        b: usize,
    },
}

impl AddressMap {
    /// Numbers `ranges` in order; they must be page aligned and disjoint.
    pub fn new(ranges: Vec<MappedRange>) -> Result<AddressMap, MapError> {
        let mut first = Vec::with_capacity(ranges.len());
        let mut total = 0u64;
        for (i, r) in ranges.iter().enumerate() {
            let ps = r.page_size as u64;
            if r.pages == 0
                || !ps.is_power_of_two()
                || ps < 4096
                || r.addr % ps != 0
                || r.pages
                    .checked_mul(ps)
                    .and_then(|l| r.addr.checked_add(l))
                    .is_none()
            {
                return Err(MapError::BadRange {
                    index: i,
                    addr: r.addr,
                    pages: r.pages,
                    page_size: r.page_size,
                });
            }
            first.push(total);
            total += r.pages;
        }
        let mut by_addr: Vec<usize> = (0..ranges.len()).collect();
        by_addr.sort_by_key(|&i| ranges[i].addr);
        for w in by_addr.windows(2) {
            let (a, b) = (&ranges[w[0]], &ranges[w[1]]);
            if a.addr + a.len() > b.addr {
                return Err(MapError::Overlap {
                    a: w[0].min(w[1]),
                    b: w[0].max(w[1]),
                });
            }
        }
        Ok(AddressMap {
            ranges,
            first,
            by_addr,
            total,
        })
    }

    /// Pages in all ranges.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The ranges, in numbering order.
    pub fn ranges(&self) -> &[MappedRange] {
        &self.ranges
    }

    /// Global number of range `r`'s first page.
    pub fn first(&self, r: usize) -> u64 {
        self.first[r]
    }

    /// (range, page in range) of an address inside a range.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let k = self
            .by_addr
            .partition_point(|&i| self.ranges[i].addr <= addr);
        let i = *self.by_addr.get(k.checked_sub(1)?)?;
        let r = &self.ranges[i];
        r.contains(addr)
            .then(|| (i, (addr - r.addr) / r.page_size as u64))
    }

    /// (range, page in range) of a global page number.
    pub fn locate_global(&self, g: u64) -> Option<(usize, u64)> {
        if g >= self.total {
            return None;
        }
        let i = self.first.partition_point(|f| *f <= g) - 1;
        Some((i, g - self.first[i]))
    }

    /// The global page holding page `page` of source region `region`, if a
    /// range maps it.
    pub fn global_of_source(&self, region: usize, page: u64) -> Option<u64> {
        self.ranges.iter().enumerate().find_map(|(i, r)| {
            (r.source_region == region && page >= r.source_first && page - r.source_first < r.pages)
                .then(|| self.first[i] + page - r.source_first)
        })
    }

    /// The address of page `p` of range `r`.
    pub fn page_addr(&self, r: usize, p: u64) -> usize {
        (self.ranges[r].addr + p * self.ranges[r].page_size as u64) as usize
    }

    /// The largest page size.
    pub fn max_page_size(&self) -> usize {
        self.ranges
            .iter()
            .map(|r| r.page_size)
            .max()
            .unwrap_or(4096)
    }

    /// The first address above `addr` where a range starts.
    pub fn next_start(&self, addr: u64) -> Option<u64> {
        let k = self
            .by_addr
            .partition_point(|&i| self.ranges[i].addr <= addr);
        self.by_addr.get(k).map(|&i| self.ranges[i].addr)
    }
}

impl std::ops::Index<usize> for AddressMap {
    type Output = MappedRange;
    fn index(&self, r: usize) -> &MappedRange {
        &self.ranges[r]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(addr: u64, pages: u64, region: usize, first: u64) -> MappedRange {
        MappedRange {
            addr,
            pages,
            page_size: 4096,
            kind: MemoryKind::Anon,
            fd: 0,
            source_region: region,
            source_first: first,
            page_cache: None,
        }
    }

    #[test]
    fn lookups_agree() {
        // Numbering order is not address order.
        let m = AddressMap::new(vec![
            range(0x20_0000, 4, 1, 0),
            range(0x10_0000, 8, 0, 0),
            range(0x30_0000, 2, 0, 8),
        ])
        .unwrap();
        assert_eq!(m.total(), 14);
        for g in 0..14 {
            let (r, p) = m.locate_global(g).unwrap();
            let addr = m.page_addr(r, p) as u64;
            assert_eq!(m.locate(addr + 100), Some((r, p)));
            let rr = &m[r];
            assert_eq!(
                m.global_of_source(rr.source_region, rr.source_first + p),
                Some(g)
            );
        }
        assert_eq!(m.locate(0x10_0000 - 1), None);
        assert_eq!(m.locate(0x10_0000 + 8 * 4096), None);
        assert_eq!(m.global_of_source(1, 4), None);
        assert_eq!(m.next_start(0x10_8000), Some(0x20_0000));
        assert_eq!(m.next_start(0x30_0000), None);
    }

    #[test]
    fn bad_maps_are_refused() {
        assert!(matches!(
            AddressMap::new(vec![range(0x1001, 1, 0, 0)]),
            Err(MapError::BadRange { .. })
        ));
        assert!(matches!(
            AddressMap::new(vec![range(0x1000, 0, 0, 0)]),
            Err(MapError::BadRange { .. })
        ));
        assert_eq!(
            AddressMap::new(vec![range(0x10000, 4, 0, 0), range(0x12000, 4, 0, 4)]).unwrap_err(),
            MapError::Overlap { a: 0, b: 1 }
        );
    }
}
