//! A recorded working set: the source's page numbers (its regions' pages
//! numbered end to end) in the order they were first faulted during one
//! restore. A later restore of the same image prefetches them first.
//! Format in `docs/FORMAT.md` ("Working set").

use std::path::{Path, PathBuf};

use livepage_image::le::{u32_at, u64_at};

const MAGIC: &[u8; 8] = b"LPWSET\0\0";
const VERSION: u32 = 1;
const HEADER: usize = 32;

/// Pages in first-touch order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkingSet {
    /// Total pages of the image it was recorded on (all regions).
    pub total_pages: u64,
    /// Global page numbers, first touched first.
    pub pages: Vec<u64>,
}

/// Why a working set file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkingSetError {
    /// I/O.
    #[error("{what} working set file {path}: {source}")]
    Io {
        /// Reading or writing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a working set, a newer version, truncated or corrupt.
    #[error("{path} is not a usable working set: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: FormatError,
    },
    /// Recorded on an image of another size.
    #[error(
        "{path} was recorded on an image of {recorded} pages, this one has {actual}; \
         record it again (vm resume --lazy --record-working-set)"
    )]
    OtherImage {
        /// The file.
        path: PathBuf,
        /// Its total.
        recorded: u64,
        /// The image's total.
        actual: u64,
    },
}

/// What is wrong with a working set's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// No magic.
    #[error("no working set header (magic LPWSET)")]
    Magic,
    /// Another version.
    #[error("version {0}, this build reads version 1")]
    Version(u32),
    /// The page count overflows.
    #[error("the page count overflows")]
    Overflow,
    /// The length does not fit the page count.
    #[error("{count} pages need {want} bytes, the file has {have}")]
    Length {
        /// Pages recorded.
        count: u64,
        /// Bytes they need.
        want: u64,
        /// Bytes there.
        have: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch (corrupt)")]
    Checksum,
    /// A page beyond the recorded total.
    #[error("page {page} is beyond the recorded {total} pages")]
    Beyond {
        /// The page.
        page: u64,
        /// The total.
        total: u64,
    },
}

impl WorkingSet {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.pages.len() * 8 + 4);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.total_pages.to_le_bytes());
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a working set (untrusted bytes): magic, version, length, crc,
    /// and every page below the recorded total.
    pub fn from_bytes(b: &[u8]) -> Result<WorkingSet, FormatError> {
        if b.len() < HEADER + 4 || &b[..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let total_pages = u64_at(b, 16);
        let count = u64_at(b, 24);
        let want = count
            .checked_mul(8)
            .and_then(|n| n.checked_add((HEADER + 4) as u64))
            .ok_or(FormatError::Overflow)?;
        if want != b.len() as u64 {
            return Err(FormatError::Length {
                count,
                want,
                have: b.len(),
            });
        }
        let body = b.len() - 4;
        if u32_at(b, body) != crc32c::crc32c(&b[..body]) {
            return Err(FormatError::Checksum);
        }
        let pages: Vec<u64> = (0..count as usize)
            .map(|i| u64_at(b, HEADER + i * 8))
            .collect();
        if let Some(p) = pages.iter().find(|p| **p >= total_pages) {
            return Err(FormatError::Beyond {
                page: *p,
                total: total_pages,
            });
        }
        Ok(WorkingSet { total_pages, pages })
    }

    /// Writes the file (replacing an older recording).
    pub fn save(&self, path: &Path) -> Result<(), WorkingSetError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| WorkingSetError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and checks the file against an image of `total_pages` pages.
    pub fn load(path: &Path, total_pages: u64) -> Result<WorkingSet, WorkingSetError> {
        let b = std::fs::read(path).map_err(|source| WorkingSetError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        let w = WorkingSet::from_bytes(&b).map_err(|detail| WorkingSetError::Invalid {
            path: path.to_path_buf(),
            detail,
        })?;
        if w.total_pages != total_pages {
            return Err(WorkingSetError::OtherImage {
                path: path.to_path_buf(),
                recorded: w.total_pages,
                actual: total_pages,
            });
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(total in 1u64..1_000_000, pages in proptest::collection::vec(any::<u64>(), 0..200)) {
            let w = WorkingSet { total_pages: total, pages: pages.into_iter().map(|p| p % total).collect() };
            prop_assert_eq!(WorkingSet::from_bytes(&w.to_bytes()).unwrap(), w);
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = WorkingSet::from_bytes(&b);
        }

        #[test]
        fn any_flipped_byte_is_refused(flip in 0usize..60, bit in 0u8..8) {
            let w = WorkingSet { total_pages: 100, pages: vec![5, 7, 9] };
            let mut b = w.to_bytes();
            let i = flip % b.len();
            b[i] ^= 1 << bit;
            prop_assert!(WorkingSet::from_bytes(&b).is_err());
        }
    }
}
