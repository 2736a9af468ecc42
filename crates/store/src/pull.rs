//! `pull`: an image from a store into a local full image file, every chunk
//! verified against its name.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use livepage_image::{ImageWriter, RegionDesc};
use serde::Serialize;

use crate::error::StoreError;
use crate::image::StoreImage;

/// What a pull did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// The image's address.
    pub image: String,
    /// The file written.
    pub path: String,
    /// Its local id (a full image: the id differs from a pushed delta's).
    pub image_id: String,
    /// Chunks fetched.
    pub chunks: u64,
    /// Uncompressed bytes of the chunks fetched.
    pub bytes: u64,
    /// Wall time.
    pub duration_ms: f64,
}

/// Writes image `img` to `out` (which must not exist) with `threads`
/// fetching at once. `progress` gets (guest bytes done, in all).
pub fn pull(
    img: &StoreImage,
    out: &Path,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PullReport, StoreError> {
    let t0 = Instant::now();
    let m = img.manifest();
    let descs: Vec<RegionDesc> = m
        .regions
        .iter()
        .map(|r| RegionDesc {
            base: r.base,
            len: r.len,
            page_size: r.page_size,
            kind: r.kind,
        })
        .collect();
    // The VM state first: a missing chunk fails before any file exists.
    let state = img.vm_state()?;
    let w = ImageWriter::create(out, &descs, None)?;
    let jobs: Vec<(usize, usize)> = m
        .regions
        .iter()
        .enumerate()
        .flat_map(|(r, reg)| (0..reg.chunks.len()).map(move |c| (r, c)))
        .collect();
    let total = m.bytes();
    let (next, done, chunks, bytes) = (
        AtomicUsize::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let failed: Mutex<Option<StoreError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(r, c)) = jobs.get(j) else { break };
                    if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    let reg = &m.regions[r];
                    let (a, b) = reg.span(c);
                    let res = img.read_span(r, c).and_then(|raw| match raw {
                        Some(raw) => {
                            chunks.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(raw.len() as u64, Ordering::Relaxed);
                            w.store_run(w.global_page(r, a), &raw, reg.page_size as usize)
                                .map(|_| ())
                                .map_err(StoreError::from)
                        }
                        None => Ok(()),
                    });
                    done.fetch_add((b - a) * reg.page_size, Ordering::Relaxed);
                    progress(done.load(Ordering::Relaxed), total);
                    if let Err(e) = res {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        // The writer's unnamed file goes with it: nothing is left behind.
        return Err(e);
    }
    if let Some(s) = state {
        w.set_vm_state(s);
    }
    let id = w.finish()?;
    Ok(PullReport {
        image: img.url(),
        path: out.display().to_string(),
        image_id: id.to_string(),
        chunks: chunks.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
        duration_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}
