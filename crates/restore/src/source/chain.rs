//! An image (or a chain of base + deltas) on local disk.

use std::path::Path;
use std::sync::Arc;

use livepage_image::{Chain, ImageError};

use super::{Lane, PageSource, SourceError, SourceRegion, check_run};

/// Pages of an image chain, read with one `pread` per run of pages stored
/// together, every page's checksum verified.
#[derive(Debug)]
pub struct ChainSource {
    chain: Chain,
    regions: Vec<SourceRegion>,
}

impl ChainSource {
    /// Serves `chain`.
    pub fn new(chain: Chain) -> ChainSource {
        let regions = chain
            .head()
            .regions()
            .iter()
            .map(|r| SourceRegion {
                page_size: r.page_size as usize,
                pages: r.pages(),
            })
            .collect();
        ChainSource { chain, regions }
    }

    /// Opens the chain whose head is `path`.
    pub fn open(path: &Path) -> Result<ChainSource, ImageError> {
        Ok(ChainSource::new(Chain::open(path)?))
    }

    /// The chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }
}

impl PageSource for ChainSource {
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
        self.chain
            .read_pages(region, first, buf)
            .map_err(|e| match e {
                ImageError::PageCorrupt { region, page, .. } => SourceError::Corrupt {
                    region,
                    page,
                    cause: Arc::new(e),
                },
                e => SourceError::Image {
                    region,
                    first,
                    count: (buf.len() / r.page_size) as u64,
                    cause: Arc::new(e),
                },
            })
    }

    fn zero_runs(&self, region: usize) -> Option<Vec<(u64, u64)>> {
        let r = self.regions.get(region)?;
        let mut runs = Vec::new();
        let mut start = None;
        for p in 0..r.pages {
            let zero = matches!(self.chain.locate(region, p), Some((_, false)));
            match (zero, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    runs.push((s, p));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push((s, r.pages));
        }
        Some(runs)
    }
}
