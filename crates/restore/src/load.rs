//! Eager restore: every page of an image chain read into new regions before
//! anything runs (the baseline lazy restore is measured against).

use std::sync::Arc;

use livepage_image::{Chain, ImageError};
use livepage_mem::{MemoryKind, Region, RegionError};

/// Why an eager load failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The image's pages do not fit the memory type.
    #[error(
        "region {region}: the image's {image_page_size}-byte pages cannot be loaded into {kind} \
         memory ({page_size}-byte pages)"
    )]
    PageSize {
        /// Region.
        region: usize,
        /// The image's page size.
        image_page_size: u64,
        /// The memory type asked for.
        kind: MemoryKind,
        /// Its page size.
        page_size: usize,
    },
    /// A region could not be made or written.
    #[error("region {region}")]
    Region {
        /// Region.
        region: usize,
        /// Why.
        #[source]
        source: RegionError,
    },
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Reads every region of `chain` into a new region of `kind` (zero pages
/// are left untouched). `progress(done, total)` is called as pages load.
pub fn load(
    chain: &Chain,
    kind: MemoryKind,
    mut progress: impl FnMut(u64, u64),
) -> Result<Vec<Arc<Region>>, LoadError> {
    let descs = chain.head().regions();
    let total: u64 = descs.iter().map(|d| d.pages()).sum();
    let mut done = 0;
    let mut out = Vec::with_capacity(descs.len());
    for (i, desc) in descs.iter().enumerate() {
        let region = Region::new(kind, desc.len as usize)
            .map_err(|source| LoadError::Region { region: i, source })?;
        if desc.page_size % region.page_size() as u64 != 0 {
            return Err(LoadError::PageSize {
                region: i,
                image_page_size: desc.page_size,
                kind,
                page_size: region.page_size(),
            });
        }
        let ps = desc.page_size as usize;
        let run = (4 << 20).max(ps) / ps;
        let mut buf = vec![0u8; run * ps];
        let mut p = 0u64;
        while p < desc.pages() {
            let n = (desc.pages() - p).min(run as u64) as usize;
            let bytes = &mut buf[..n * ps];
            if chain.read_pages(i, p, bytes)? {
                for (k, page) in bytes.chunks(ps).enumerate() {
                    if page.iter().any(|b| *b != 0) {
                        region
                            .write((p as usize + k) * ps, page)
                            .map_err(|source| LoadError::Region { region: i, source })?;
                    }
                }
            }
            p += n as u64;
            done += n as u64;
            progress(done, total);
        }
        out.push(Arc::new(region));
    }
    Ok(out)
}
