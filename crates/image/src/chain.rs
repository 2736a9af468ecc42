//! Chains: a delta and its ancestors, found by id in the head's directory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::io;
use crate::le::u32_at;
use crate::{
    HEADER_SIZE, Image, ImageError, ImageId, ImageWriter, MAGIC, PageState, STANDS_FOR_AT,
};

/// What the header of a file says, read without opening the whole image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peek {
    /// Not a livepage image (or unreadable).
    Other,
    /// An intact header with this id (and, for a folded image, the id of
    /// the delta it stands for).
    Intact(ImageId, Option<ImageId>),
    /// A livepage header that fails its checksum; the id it claims.
    Damaged(ImageId),
}

fn peek(path: &Path) -> Peek {
    let Ok(f) = File::open(path) else {
        return Peek::Other;
    };
    let mut h = vec![0u8; HEADER_SIZE as usize];
    if f.read_exact_at(&mut h[..40], 0).is_err() || &h[..8] != MAGIC {
        return Peek::Other;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[24..40]);
    let intact = f.read_exact_at(&mut h, 0).is_ok()
        && u32_at(&h, HEADER_SIZE as usize - 4) == crc32c::crc32c(&h[..HEADER_SIZE as usize - 4]);
    if intact {
        let mut s = [0u8; 16];
        s.copy_from_slice(&h[STANDS_FOR_AT..STANDS_FOR_AT + 16]);
        let s = (u32_at(&h, 8) >= 2 && s != [0; 16]).then_some(ImageId(s));
        Peek::Intact(ImageId(id), s)
    } else {
        Peek::Damaged(ImageId(id))
    }
}

/// Reads only the header of `path` and returns its id if it is an intact
/// livepage image header (used to find a delta's parent).
pub fn peek_id(path: &Path) -> Option<ImageId> {
    match peek(path) {
        Peek::Intact(id, _) => Some(id),
        _ => None,
    }
}

/// An image and its ancestors, newest first: a full image at the end and the
/// deltas above it. Parents are found by id in the head's directory.
#[derive(Debug)]
pub struct Chain {
    images: Vec<Image>,
}

impl Chain {
    /// Opens `path` and every parent it needs, checking that all describe the
    /// same regions.
    pub fn open(path: &Path) -> Result<Chain, ImageError> {
        let head = Image::open(path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut images = vec![head];
        while let Some(pid) = images.last().and_then(Image::parent) {
            if images.len() > 10_000 {
                return Err(ImageError::ChainTooLong(10_000));
            }
            let child = images.last().map(|i| i.path.clone()).unwrap_or_default();
            let files: Vec<(PathBuf, Peek)> = std::fs::read_dir(&dir)
                .map_err(io("listing", &dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .map(|p| {
                    let k = peek(&p);
                    (p, k)
                })
                .collect();
            // A folded image standing for the parent is preferred to the
            // parent itself, if both are there (a fold stopped before it
            // removed what it replaced): it needs no ancestors.
            let found = files
                .iter()
                .find(|(_, k)| matches!(k, Peek::Intact(_, Some(s)) if *s == pid))
                .or_else(|| {
                    files
                        .iter()
                        .find(|(_, k)| matches!(k, Peek::Intact(id, _) if *id == pid))
                })
                .map(|(p, _)| p.clone());
            let Some(ppath) = found else {
                // The parent may be there with a damaged header: say so.
                let damaged: Vec<&PathBuf> = files
                    .iter()
                    .filter(|(_, k)| matches!(k, Peek::Damaged(_)))
                    .map(|(p, _)| p)
                    .collect();
                if let Some((p, _)) = files.iter().find(|(_, k)| *k == Peek::Damaged(pid)) {
                    return Err(ImageError::CorruptParent {
                        child,
                        parent: pid,
                        path: p.clone(),
                    });
                }
                return Err(ImageError::MissingParent {
                    child,
                    parent: pid,
                    dir,
                    damaged: damaged.into_iter().cloned().collect(),
                });
            };
            let parent = Image::open(&ppath)?;
            let (a, b) = (images[0].regions(), parent.regions());
            if a.len() != b.len()
                || a.iter()
                    .zip(b)
                    .any(|(x, y)| x.len != y.len || x.page_size != y.page_size)
            {
                return Err(ImageError::ParentMismatch {
                    child,
                    parent: ppath,
                    detail: format!("{} regions against {}", a.len(), b.len()),
                });
            }
            images.push(parent);
        }
        Ok(Chain { images })
    }

    /// The newest image.
    pub fn head(&self) -> &Image {
        &self.images[0]
    }

    /// All images, newest first.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// Reads a page as the head image sees it (following parents).
    pub fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        for img in &self.images {
            if img.read_page(region, page, buf)? != PageState::Parent {
                return Ok(());
            }
        }
        Err(ImageError::Corrupt {
            path: self.images[self.images.len() - 1].path.clone(),
            what: "chain",
            detail: format!("page {page} of region {region} is in no image"),
        })
    }

    /// Which image of the chain holds page `page` of `region`, and whether it
    /// is data (`Some((image, true))`) or zeros (`Some((image, false))`).
    pub fn locate(&self, region: usize, page: u64) -> Option<(usize, bool)> {
        let first = *self.head().layout.first_page.get(region)?;
        for (i, img) in self.images.iter().enumerate() {
            match img.index.get((first + page) as usize)?.0 {
                PageState::Zero => return Some((i, false)),
                PageState::Data => return Some((i, true)),
                PageState::Parent => {}
            }
        }
        None
    }

    /// Reads `buf.len() / page_size` consecutive pages of `region` starting at
    /// `first`, as the head sees them, with one read per run of pages stored
    /// together, and checks every page's crc. Returns whether any page holds
    /// data (if not, `buf` was only zeroed).
    pub fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
    ) -> Result<bool, ImageError> {
        let head = self.head();
        let r = *head
            .layout
            .regions
            .get(region)
            .ok_or(ImageError::OutOfRange {
                region,
                first,
                count: 0,
                bytes: buf.len(),
            })?;
        let ps = r.page_size as usize;
        let n = (buf.len() / ps) as u64;
        if buf.len() % ps != 0 || first.checked_add(n).is_none_or(|e| e > r.pages()) {
            return Err(ImageError::OutOfRange {
                region,
                first,
                count: n,
                bytes: buf.len(),
            });
        }
        let mut any = false;
        let mut i = 0u64;
        while i < n {
            let (img, data) =
                self.locate(region, first + i)
                    .ok_or_else(|| ImageError::Corrupt {
                        path: self.images[self.images.len() - 1].path.clone(),
                        what: "chain",
                        detail: format!("page {} of region {region} is in no image", first + i),
                    })?;
            // Extend the run while the next page lives in the same image in the same state.
            let mut j = i + 1;
            while j < n && self.locate(region, first + j) == Some((img, data)) {
                j += 1;
            }
            let slice = &mut buf[i as usize * ps..j as usize * ps];
            if data {
                any = true;
                self.images[img].read_data_run(region, first + i, slice)?;
            } else {
                slice.fill(0);
            }
            i = j;
        }
        Ok(any)
    }

    /// Verifies every image of the chain.
    pub fn verify(&self) -> Result<u64, ImageError> {
        let mut n = 0;
        for img in &self.images {
            n += img.verify()?;
        }
        Ok(n)
    }

    /// Writes the chain as one full image at `out` (which must not exist).
    pub fn merge(&self, out: &Path) -> Result<ImageId, ImageError> {
        let head = self.head();
        let w = ImageWriter::create(out, head.regions(), None)?;
        if let Some(v) = head.vm_state() {
            w.set_vm_state(v.to_vec());
        }
        for (ri, r) in head.regions().iter().enumerate() {
            let mut buf = vec![0u8; r.page_size as usize];
            for p in 0..r.pages() {
                self.read_page(ri, p, &mut buf)?;
                let g = w.global_page(ri, p);
                if buf.iter().all(|b| *b == 0) {
                    w.mark_zero(g);
                } else {
                    w.write_page(g, &buf)?;
                }
            }
        }
        w.finish()
    }
}
