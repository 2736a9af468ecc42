//! Several regions numbered as one page space, as the engines and the image
//! format see them: region `i`'s pages follow region `i-1`'s.

use std::sync::Arc;

use crate::Region;

/// One region of a [`RegionTable`].
#[derive(Debug)]
pub struct PagedRegion {
    /// The region.
    pub region: Arc<Region>,
    /// Global number of its first page.
    pub first: u64,
    /// Its pages.
    pub pages: u64,
    /// Its page size.
    pub page_size: usize,
}

/// Regions in the caller's order, with global page numbers and lookup by
/// address (whatever order the regions lie in memory).
#[derive(Debug)]
pub struct RegionTable {
    entries: Vec<PagedRegion>,
    /// Entry indexes sorted by address.
    by_addr: Vec<usize>,
    total: u64,
}

impl RegionTable {
    /// Numbers the pages of `regions` in order.
    pub fn new(regions: &[Arc<Region>]) -> RegionTable {
        let mut entries = Vec::with_capacity(regions.len());
        let mut total = 0;
        for r in regions {
            let pages = r.pages() as u64;
            entries.push(PagedRegion {
                region: r.clone(),
                first: total,
                pages,
                page_size: r.page_size(),
            });
            total += pages;
        }
        let mut by_addr: Vec<usize> = (0..entries.len()).collect();
        by_addr.sort_by_key(|&i| entries[i].region.addr());
        RegionTable {
            entries,
            by_addr,
            total,
        }
    }

    /// Pages in all regions.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// (region index, page in region) of an address inside a region.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let k = self
            .by_addr
            .partition_point(|&i| self.entries[i].region.addr() as u64 <= addr);
        let i = *self.by_addr.get(k.checked_sub(1)?)?;
        let t = &self.entries[i];
        let off = addr - t.region.addr() as u64;
        (off < t.region.len() as u64).then(|| (i, off / t.page_size as u64))
    }

    /// (region index, page in region) of a global page number.
    pub fn locate_global(&self, g: u64) -> Option<(usize, u64)> {
        if g >= self.total {
            return None;
        }
        let i = self.entries.partition_point(|t| t.first <= g) - 1;
        Some((i, g - self.entries[i].first))
    }

    /// The address of page `p` of region `r`.
    pub fn page_addr(&self, r: usize, p: u64) -> usize {
        self.entries[r].region.addr() + p as usize * self.entries[r].page_size
    }

    /// The largest page size.
    pub fn max_page_size(&self) -> usize {
        self.entries
            .iter()
            .map(|t| t.page_size)
            .max()
            .unwrap_or(4096)
    }
}

impl std::ops::Deref for RegionTable {
    type Target = [PagedRegion];
    fn deref(&self) -> &[PagedRegion] {
        &self.entries
    }
}

impl<'a> IntoIterator for &'a RegionTable {
    type Item = &'a PagedRegion;
    type IntoIter = std::slice::Iter<'a, PagedRegion>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryKind;

    #[test]
    fn lookup_by_address_and_global_page() {
        let a = Arc::new(Region::new(MemoryKind::Anon, 8 * 4096).unwrap());
        let b = Arc::new(Region::new(MemoryKind::Anon, 4 * 4096).unwrap());
        // The caller's order need not be address order.
        let t = if a.addr() < b.addr() {
            RegionTable::new(&[b.clone(), a.clone()])
        } else {
            RegionTable::new(&[a.clone(), b.clone()])
        };
        assert_eq!(t.total(), 12);
        for (i, e) in t.iter().enumerate() {
            for p in 0..e.pages {
                let addr = t.page_addr(i, p) as u64 + 17;
                assert_eq!(t.locate(addr), Some((i, p)));
                assert_eq!(t.locate_global(e.first + p), Some((i, p)));
            }
        }
        assert_eq!(t.locate_global(12), None);
        let end = (a.addr().max(b.addr()) + 64 * 4096) as u64;
        assert_eq!(t.locate(end), None);
    }
}
