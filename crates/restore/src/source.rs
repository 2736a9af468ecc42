//! Where pages come from: one trait for a local image chain, memory, a raw
//! memory file (Firecracker's snapshot format) and a remote peer over TCP.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The shape of one region as a source sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SourceRegion {
    /// Page size in bytes.
    pub page_size: usize,
    /// Number of pages.
    pub pages: u64,
}

/// A source of pages for a lazy restore. Implementations are called from
/// several handler threads at once.
pub trait PageSource: Send + Sync {
    /// The regions this source holds.
    fn regions(&self) -> Vec<SourceRegion>;

    /// Fills `buf` (a whole number of pages of `region`, starting at page
    /// `first`). Returns whether any page holds data: `false` means every page
    /// is zero (and `buf` may have been left as it was).
    fn read_pages(&self, region: usize, first: u64, buf: &mut [u8]) -> Result<bool, SourceError>;

    /// Runs of pages `[start, end)` of `region` known to be zero, if the source
    /// knows them without reading (an image's index does). The engine leaves
    /// large ones to the kernel.
    fn zero_runs(&self, _region: usize) -> Option<Vec<(u64, u64)>> {
        None
    }
}

/// A source's failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// What went wrong, naming the page or the peer.
    pub message: String,
    /// The source is gone for good (a peer that vanished): every page still
    /// missing is lost, so the engine fails closed at once instead of page by page.
    pub fatal: bool,
}

impl SourceError {
    /// A failure of some pages only.
    pub fn pages(message: impl Into<String>) -> SourceError {
        SourceError {
            message: message.into(),
            fatal: false,
        }
    }
    /// The source is gone.
    pub fn gone(message: impl Into<String>) -> SourceError {
        SourceError {
            message: message.into(),
            fatal: true,
        }
    }
}

fn check_run(
    regions: &[SourceRegion],
    region: usize,
    first: u64,
    len: usize,
) -> Result<SourceRegion, SourceError> {
    let r = *regions
        .get(region)
        .ok_or_else(|| SourceError::pages(format!("the source has no region {region}")))?;
    let n = (len / r.page_size) as u64;
    if len % r.page_size != 0 || first.checked_add(n).is_none_or(|e| e > r.pages) {
        return Err(SourceError::pages(format!(
            "pages {first}+{n} lie outside region {region} ({} pages)",
            r.pages
        )));
    }
    Ok(r)
}

/// An image (or a chain of base + deltas) on local disk.
#[derive(Debug)]
pub struct ChainSource {
    chain: livepage_image::Chain,
    regions: Vec<SourceRegion>,
}

impl ChainSource {
    /// Serves `chain`.
    pub fn new(chain: livepage_image::Chain) -> ChainSource {
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
    pub fn open(path: &Path) -> Result<ChainSource, livepage_image::ImageError> {
        Ok(ChainSource::new(livepage_image::Chain::open(path)?))
    }

    /// The chain.
    pub fn chain(&self) -> &livepage_image::Chain {
        &self.chain
    }
}

impl PageSource for ChainSource {
    fn regions(&self) -> Vec<SourceRegion> {
        self.regions.clone()
    }

    fn read_pages(&self, region: usize, first: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        check_run(&self.regions, region, first, buf.len())?;
        self.chain
            .read_pages(region, first, buf)
            .map_err(|e| SourceError::pages(e.to_string()))
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

/// Pages held in memory, one buffer per region.
#[derive(Debug)]
pub struct MemorySource {
    data: Vec<Vec<u8>>,
    regions: Vec<SourceRegion>,
}

impl MemorySource {
    /// Serves `data[i]` as region `i` with pages of `page_size[i]` bytes.
    pub fn new(data: Vec<Vec<u8>>, page_size: &[usize]) -> Result<MemorySource, SourceError> {
        if data.len() != page_size.len() {
            return Err(SourceError::pages(
                "one page size per region buffer is needed",
            ));
        }
        let mut regions = Vec::new();
        for (d, ps) in data.iter().zip(page_size) {
            if *ps == 0 || d.len() % ps != 0 {
                return Err(SourceError::pages(format!(
                    "a buffer of {} bytes is not a whole number of {ps}-byte pages",
                    d.len()
                )));
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

    fn read_pages(&self, region: usize, first: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
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

/// A raw memory file: region `i`'s bytes start at file offset `offsets[i]`
/// (Firecracker's guest memory snapshot file is laid out this way).
#[derive(Debug)]
pub struct RawFileSource {
    file: File,
    offsets: Vec<u64>,
    regions: Vec<SourceRegion>,
}

impl RawFileSource {
    /// Serves `file` with one region per `(offset, len, page_size)`. Fails if a
    /// region reaches past the end of the file.
    pub fn new(file: File, layout: &[(u64, u64, usize)]) -> Result<RawFileSource, SourceError> {
        let file_len = file
            .metadata()
            .map_err(|e| SourceError::gone(format!("the memory file: {e}")))?
            .len();
        let mut regions = Vec::new();
        for (i, (off, len, ps)) in layout.iter().enumerate() {
            if *ps == 0 || len % *ps as u64 != 0 {
                return Err(SourceError::pages(format!(
                    "region {i}: {len} bytes is not a whole number of {ps}-byte pages"
                )));
            }
            if off.checked_add(*len).is_none_or(|e| e > file_len) {
                return Err(SourceError::pages(format!(
                    "region {i} ({len} bytes at offset {off}) reaches past the end of the \
                     {file_len}-byte memory file"
                )));
            }
            regions.push(SourceRegion {
                page_size: *ps,
                pages: len / *ps as u64,
            });
        }
        Ok(RawFileSource {
            file,
            offsets: layout.iter().map(|l| l.0).collect(),
            regions,
        })
    }
}

impl PageSource for RawFileSource {
    fn regions(&self) -> Vec<SourceRegion> {
        self.regions.clone()
    }

    fn read_pages(&self, region: usize, first: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        let r = check_run(&self.regions, region, first, buf.len())?;
        let off = self.offsets[region] + first * r.page_size as u64;
        self.file.read_exact_at(buf, off).map_err(|e| {
            SourceError::pages(format!(
                "reading {} bytes at offset {off} of the memory file: {e}",
                buf.len()
            ))
        })?;
        Ok(buf.iter().any(|b| *b != 0))
    }
}
