//! A raw memory file: Firecracker's guest memory snapshot.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Lane, PageSource, SourceError, SourceRegion, check_run};

/// A raw memory file: region `i`'s bytes start at file offset `offsets[i]`
/// (Firecracker's guest memory snapshot file is laid out this way). Holes
/// of a sparse file are zero runs, found with SEEK_HOLE/SEEK_DATA.
#[derive(Debug)]
pub struct RawFileSource {
    file: Arc<File>,
    path: PathBuf,
    offsets: Vec<u64>,
    regions: Vec<SourceRegion>,
}

/// Why a layout does not fit a memory file.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RawFileError {
    /// The file's size could not be read.
    #[error("{path}: {source}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A region is not a whole number of pages.
    #[error("region {index}: {len} bytes is not a whole number of {page_size}-byte pages")]
    NotPages {
        /// Region.
        index: usize,
        /// Its length.
        len: u64,
        /// Its page size.
        page_size: usize,
    },
    /// A region reaches past the end of the file.
    #[error(
        "region {index} ({len} bytes at offset {offset}) reaches past the end of the {file_len}-byte memory file {path}"
    )]
    PastEnd {
        /// Region.
        index: usize,
        /// Its length.
        len: u64,
        /// Its offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
        /// The file.
        path: PathBuf,
    },
}

impl RawFileSource {
    /// Serves `file` with one region per `(offset, len, page_size)`. Fails if a
    /// region reaches past the end of the file.
    pub fn new(
        file: Arc<File>,
        path: &Path,
        layout: &[(u64, u64, usize)],
    ) -> Result<RawFileSource, RawFileError> {
        let file_len = file
            .metadata()
            .map_err(|e| RawFileError::Metadata {
                path: path.to_path_buf(),
                source: Arc::new(e),
            })?
            .len();
        let mut regions = Vec::new();
        for (index, &(offset, len, page_size)) in layout.iter().enumerate() {
            if page_size == 0 || len % page_size as u64 != 0 {
                return Err(RawFileError::NotPages {
                    index,
                    len,
                    page_size,
                });
            }
            if offset.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(RawFileError::PastEnd {
                    index,
                    len,
                    offset,
                    file_len,
                    path: path.to_path_buf(),
                });
            }
            regions.push(SourceRegion {
                page_size,
                pages: len / page_size as u64,
            });
        }
        Ok(RawFileSource {
            file,
            path: path.to_path_buf(),
            offsets: layout.iter().map(|l| l.0).collect(),
            regions,
        })
    }
}

impl PageSource for RawFileSource {
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
        let offset = self.offsets[region] + first * r.page_size as u64;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| SourceError::Io {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                source: Arc::new(e),
            })?;
        Ok(buf.iter().any(|b| *b != 0))
    }

    /// The file's holes inside the region, in whole pages.
    fn zero_runs(&self, region: usize) -> Option<Vec<(u64, u64)>> {
        let r = self.regions.get(region)?;
        let ps = r.page_size as u64;
        // Past the end of the file (a truncated snapshot) is missing data,
        // not zeros: only holes before it count.
        let file_len = self.file.metadata().ok()?.len();
        let (start, end) = (
            self.offsets[region],
            (self.offsets[region] + r.pages * ps).min(file_len),
        );
        let mut runs = Vec::new();
        let mut at = start;
        while at < end {
            let hole = livepage_uffd::mm::seek_hole(&self.file, at).ok()??;
            if hole >= end {
                break;
            }
            let data = livepage_uffd::mm::seek_data(&self.file, hole)
                .ok()?
                .unwrap_or(end)
                .min(end);
            // Whole pages inside [hole, data).
            let first = (hole - start).div_ceil(ps);
            let last = (data - start) / ps;
            if last > first {
                runs.push((first, last));
            }
            at = data.max(hole + 1);
        }
        Some(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_zero_runs_and_reads_check_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let f = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // 64 pages: data in pages 0-1 and 40; the rest is a hole.
        f.set_len(64 * 4096).unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        f.write_all_at(&[9u8; 4096], 40 * 4096).unwrap();
        let s = RawFileSource::new(
            Arc::new(f),
            &path,
            &[(0, 32 * 4096, 4096), (32 * 4096, 32 * 4096, 4096)],
        )
        .unwrap();
        let runs0 = s.zero_runs(0).unwrap();
        let runs1 = s.zero_runs(1).unwrap();
        // Filesystems may keep a little more allocated than written: holes
        // are at most the pages never written.
        assert!(runs0.iter().all(|&(a, b)| a >= 2 && b <= 32), "{runs0:?}");
        assert!(
            runs1.iter().all(|&(a, b)| (b <= 8 || a >= 9) && b <= 32),
            "{runs1:?}"
        );
        let mut buf = vec![0u8; 4096];
        assert!(s.read_pages(1, 8, &mut buf, Lane::Demand).unwrap());
        assert_eq!(buf[0], 9);
        assert!(!s.read_pages(1, 9, &mut buf, Lane::Demand).unwrap());
        assert!(matches!(
            s.read_pages(1, 32, &mut buf, Lane::Demand),
            Err(SourceError::OutOfRange { .. })
        ));
        let f = Arc::new(File::open(&path).unwrap());
        assert!(matches!(
            RawFileSource::new(f, &path, &[(60 * 4096, 8 * 4096, 4096)]),
            Err(RawFileError::PastEnd { .. })
        ));
    }
}
