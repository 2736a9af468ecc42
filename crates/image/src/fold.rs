//! Folding the oldest delta of a chain into its parent: a new full image
//! that stands for the delta (its children name the delta's id, which the
//! new image answers to), written beside the two, synced, renamed over the
//! delta; then the parent is removed. No image is ever changed in place:
//! at every instant, a crash or a full disk leaves every checkpoint of the
//! chain resumable.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::writer::sync_dir;
use crate::{Image, ImageError, ImageId, ImageWriter, PageState};

/// Progress of a fold, reported after each run of pages.
#[derive(Debug, Clone, Copy)]
pub struct FoldProgress {
    /// Data bytes placed so far.
    pub done: u64,
    /// Data bytes the folded image holds.
    pub total: u64,
}

/// What a fold did. Durations in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct FoldReport {
    /// The parent, removed.
    pub base: PathBuf,
    /// The delta, replaced by the folded full image.
    pub image: PathBuf,
    /// The folded image's own id.
    pub id: ImageId,
    /// The delta's id, which the folded image stands for.
    pub stands_for: ImageId,
    /// Data pages taken from the parent.
    pub base_pages: u64,
    /// Data pages taken from the delta.
    pub delta_pages: u64,
    /// Data bytes of the folded image.
    pub bytes: u64,
    /// How long it took.
    pub duration_ms: f64,
}

/// Where a run of the folded image's pages comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Zero,
    Base,
    Delta,
}

/// Folds the delta at `child` into its parent, the full image at `base`:
/// the delta's path then holds a full image equal to the delta as its
/// chain reads it, and `base` is gone. Pages are copied between the files
/// in the kernel (`copy_file_range`, a reflink where the file system has
/// them) with their checksums carried over, so a page damaged on disk
/// stays detectable. `progress` is called after every run of pages.
pub fn fold(
    base: &Path,
    child: &Path,
    progress: &mut dyn FnMut(FoldProgress),
) -> Result<FoldReport, ImageError> {
    let t0 = Instant::now();
    let b = Image::open(base)?;
    let c = Image::open(child)?;
    let refuse = |why| ImageError::NotFoldable {
        base: base.to_path_buf(),
        child: child.to_path_buf(),
        why,
    };
    if b.parent().is_some() {
        return Err(refuse(
            "the parent is itself a delta: fold the chain from its full image up",
        ));
    }
    let Some(pid) = c.parent() else {
        return Err(refuse("the child is a full image already"));
    };
    if !b.answers_to(pid) {
        return Err(refuse("the child is not a delta of this parent"));
    }
    if b.layout.regions.len() != c.layout.regions.len()
        || b.layout
            .regions
            .iter()
            .zip(&c.layout.regions)
            .any(|(x, y)| x.len != y.len || x.page_size != y.page_size)
    {
        return Err(refuse("the two describe different regions"));
    }
    let w =
        ImageWriter::create_replacement(child, c.regions())?.folded(c.id(), b.id(), c.created());
    if let Some(v) = c.vm_state() {
        w.set_vm_state(v.to_vec());
    }
    let source = |g: usize| match c.index[g].0 {
        PageState::Data => From::Delta,
        PageState::Zero => From::Zero,
        PageState::Parent => match b.index[g].0 {
            PageState::Data => From::Base,
            _ => From::Zero,
        },
    };
    let pages = c.layout.pages as usize;
    let page_bytes = |g: usize| {
        c.layout
            .locate(g as u64)
            .map_or(0, |(r, _)| c.layout.regions[r].page_size)
    };
    let total: u64 = (0..pages)
        .filter(|&g| source(g) != From::Zero)
        .map(page_bytes)
        .sum();
    let (mut done, mut base_pages, mut delta_pages) = (0u64, 0u64, 0u64);
    let mut g = 0usize;
    while g < pages {
        let from = source(g);
        let Some((region, _)) = c.layout.locate(g as u64) else {
            break;
        };
        // A run: same source, same region, at most 64 MiB.
        let ps = c.layout.regions[region].page_size;
        let mut end = g + 1;
        while end < pages
            && source(end) == from
            && c.layout.locate(end as u64).map(|(r, _)| r) == Some(region)
            && (end - g) as u64 * ps < 64 << 20
        {
            end += 1;
        }
        let (img, what) = match from {
            From::Zero => {
                g = end;
                continue;
            }
            From::Base => {
                base_pages += (end - g) as u64;
                (&b, &b.index)
            }
            From::Delta => {
                delta_pages += (end - g) as u64;
                (&c, &c.index)
            }
        };
        let offset = c
            .layout
            .offset(region, g as u64 - c.layout.first_page[region]);
        let len = (end - g) as u64 * ps;
        copy(img, &w, offset, len)?;
        for (k, e) in what[g..end].iter().enumerate() {
            w.mark_data((g + k) as u64, e.1, ps);
        }
        done += len;
        progress(FoldProgress { done, total });
        g = end;
    }
    let id = w.finish_replacing()?;
    drop(w);
    std::fs::remove_file(base).map_err(crate::error::io("removing the folded parent", base))?;
    if let Some(d) = base.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(d);
    }
    Ok(FoldReport {
        base: base.to_path_buf(),
        image: child.to_path_buf(),
        id,
        stands_for: c.id(),
        base_pages,
        delta_pages,
        bytes: total,
        duration_ms: ms(t0.elapsed()),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `w`'s file:
/// in the kernel, or through a buffer where the file systems cannot.
fn copy(src: &Image, w: &ImageWriter, offset: u64, len: u64) -> Result<(), ImageError> {
    let (mut from, mut to, mut left) = (offset, offset, len);
    while left > 0 {
        match rustix::fs::copy_file_range(
            &src.file,
            Some(&mut from),
            &w.file,
            Some(&mut to),
            left as usize,
        ) {
            Ok(0) => {
                return Err(ImageError::Truncated {
                    path: src.path.clone(),
                    what: "page data",
                    need: offset + len,
                    have: src.file_len(),
                });
            }
            Ok(n) => left -= n as u64,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::NOSYS,
            ) => return copy_through_buffer(src, w, from, left),
            Err(e) => {
                let e = std::io::Error::from(e);
                if e.kind() == std::io::ErrorKind::StorageFull {
                    return Err(w.err("copying pages")(e));
                }
                return Err(ImageError::Io {
                    what: "copying pages from",
                    path: src.path.clone(),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

fn copy_through_buffer(
    src: &Image,
    w: &ImageWriter,
    mut at: u64,
    mut left: u64,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; left.min(4 << 20) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.file
            .read_exact_at(&mut buf[..n], at)
            .map_err(crate::error::io("reading pages of", &src.path))?;
        w.file
            .write_all_at(&buf[..n], at)
            .map_err(w.err("writing"))?;
        at += n as u64;
        left -= n as u64;
    }
    Ok(())
}
