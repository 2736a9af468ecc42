//! Pages held in memory.

use super::{Lane, PageSource, SourceError, SourceRegion, check_run};

/// Pages held in memory, one buffer per region.
#[derive(Debug)]
pub struct MemorySource {
    data: Vec<Vec<u8>>,
    regions: Vec<SourceRegion>,
}

/// Why buffers cannot be a [`MemorySource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemorySourceError {
    /// One page size per buffer is needed.
    #[error(
        "{buffers} buffers but {page_sizes} page sizes: one page size per region buffer is needed"
    )]
    Count {
        /// Buffers given.
        buffers: usize,
        /// Page sizes given.
        page_sizes: usize,
    },
    /// A buffer is not a whole number of pages.
    #[error("buffer {index} of {len} bytes is not a whole number of {page_size}-byte pages")]
    NotPages {
        /// Which buffer.
        index: usize,
        /// Its length.
        len: usize,
        /// The page size.
        page_size: usize,
    },
}

impl MemorySource {
    /// Serves `data[i]` as region `i` with pages of `page_size[i]` bytes.
    pub fn new(data: Vec<Vec<u8>>, page_size: &[usize]) -> Result<MemorySource, MemorySourceError> {
        if data.len() != page_size.len() {
            return Err(MemorySourceError::Count {
                buffers: data.len(),
                page_sizes: page_size.len(),
            });
        }
        let mut regions = Vec::new();
        for (index, (d, ps)) in data.iter().zip(page_size).enumerate() {
            if *ps == 0 || d.len() % ps != 0 {
                return Err(MemorySourceError::NotPages {
                    index,
                    len: d.len(),
                    page_size: *ps,
                });
            }
            regions.push(SourceRegion {
                page_size: *ps,
                pages: (d.len() / ps) as u64,
            });
        }
        Ok(MemorySource { data, regions })
    }
}

impl PageSource for MemorySource {
    fn regions(&self) -> Vec<SourceRegion> {
        self.regions.clone()
    }

    fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
        _lane: Lane,
    ) -> Result<bool, SourceError> {
        let r = check_run(&self.regions, region, first, buf.len())?;
        let off = first as usize * r.page_size;
        let src = &self.data[region][off..off + buf.len()];
        if src.iter().all(|b| *b == 0) {
            return Ok(false);
        }
        buf.copy_from_slice(src);
        Ok(true)
    }
}
