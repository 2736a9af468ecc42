//! The on-disk layout both the writer and the reader compute from the
//! region table (docs/FORMAT.md), and the content id.

use crate::{HEADER_SIZE, ImageError, ImageId, MAX_REGIONS, RegionDesc};

/// The layout both the writer and the reader compute from the region table.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) regions: Vec<RegionDesc>,
    pub(crate) data_offsets: Vec<u64>,
    pub(crate) first_page: Vec<u64>,
    pub(crate) pages: u64,
    pub(crate) data_end: u64,
}

impl Layout {
    pub(crate) fn new(regions: &[RegionDesc]) -> Result<Layout, ImageError> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(ImageError::RegionCount {
                count: regions.len(),
                max: MAX_REGIONS,
            });
        }
        let mut off = HEADER_SIZE;
        let (mut data_offsets, mut first_page, mut pages) = (Vec::new(), Vec::new(), 0u64);
        for (i, r) in regions.iter().enumerate() {
            if !r.page_size.is_power_of_two()
                || r.page_size < 4096
                || r.len == 0
                || r.len % r.page_size != 0
            {
                return Err(ImageError::RegionShape {
                    region: i,
                    len: r.len,
                    page_size: r.page_size,
                });
            }
            off = off.next_multiple_of(r.page_size);
            data_offsets.push(off);
            first_page.push(pages);
            off = off.checked_add(r.len).ok_or(ImageError::TooLarge)?;
            pages += r.pages();
        }
        Ok(Layout {
            regions: regions.to_vec(),
            data_offsets,
            first_page,
            pages,
            data_end: off,
        })
    }

    /// (region, page in region) of a global page number.
    pub(crate) fn locate(&self, global: u64) -> Option<(usize, u64)> {
        if global >= self.pages {
            return None;
        }
        let r = self.first_page.partition_point(|f| *f <= global) - 1;
        Some((r, global - self.first_page[r]))
    }

    pub(crate) fn offset(&self, region: usize, page: u64) -> u64 {
        self.data_offsets[region] + page * self.regions[region].page_size
    }

    pub(crate) fn table_bytes(&self) -> Vec<u8> {
        let mut t = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            t.extend_from_slice(&r.base.to_le_bytes());
            t.extend_from_slice(&r.len.to_le_bytes());
            t.extend_from_slice(&r.page_size.to_le_bytes());
            t.extend_from_slice(&r.kind.to_le_bytes());
            t.extend_from_slice(&0u32.to_le_bytes());
            t.extend_from_slice(&self.data_offsets[i].to_le_bytes());
            t.extend_from_slice(&self.first_page[i].to_le_bytes());
        }
        t
    }
}

pub(crate) fn image_id(table: &[u8], index: &[u8], vmstate: &[u8], parent: &ImageId) -> ImageId {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(table);
    h.update(index);
    h.update(vmstate);
    h.update(&parent.0);
    ImageId(h.digest128().to_le_bytes())
}
