//! Checkpoint images from collects, and pre-copy rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livepage_mem::{RangeSet, Region};
use serde::Serialize;

use crate::{CollectStats, DirtyRegion, TrackError, Tracker};

/// One pre-copy round: collects the pages written since the previous
/// round and hands each dirty range to `sink` with its current contents
/// (region index, byte offset in the region, bytes), in address order.
/// Contents are read after the range was re-armed, so a write racing the
/// read is sent again next round. This is what migration builds on.
pub fn precopy_round<T, F>(
    tracker: &mut T,
    regions: &[Arc<Region>],
    mut sink: F,
) -> Result<CollectStats, TrackError>
where
    T: Tracker + ?Sized,
    F: FnMut(usize, u64, &[u8]) -> Result<(), TrackError>,
{
    let (dirty, stats) = tracker.collect()?;
    let mut buf = Vec::new();
    for (i, d) in dirty.iter().enumerate() {
        let r = &regions[i];
        for (s, e) in d.ranges.iter() {
            let mut off = s;
            while off < e {
                let n = (e - off).min(1 << 20) as usize;
                buf.resize(n, 0);
                r.read_checked(off as usize, &mut buf)?;
                sink(i, off, &buf)?;
                off += n as u64;
            }
        }
    }
    Ok(stats)
}

/// Statistics of a checkpoint image.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointStats {
    /// The image's content hash.
    pub id: String,
    /// Pages stored with data.
    pub data_pages: u64,
    /// Dirty pages found all-zero (holes).
    pub zero_pages: u64,
    /// Data bytes written.
    pub bytes: u64,
    /// Time to write the image, in milliseconds.
    #[serde(rename = "duration_ms", serialize_with = "crate::ser_ms")]
    pub duration: Duration,
    /// Write-protect faults while a live checkpoint was saved (0 when paused).
    pub faults: u64,
    /// Pages copied into the buffer because the workload wrote them first.
    pub buffered_pages: u64,
    /// Pages saved by the faulting writer itself (buffer full).
    pub sync_saved_pages: u64,
    /// Most buffer bytes in use at once.
    pub peak_buffer_bytes: u64,
}

/// Writes a checkpoint of `regions` to `path`: a full image when `delta` is
/// None, otherwise a delta of the dirty pages naming `parent`. The caller keeps
/// the memory still while this runs (a brief pause) so the image is one instant.
pub fn write_checkpoint(
    regions: &[Arc<Region>],
    delta: Option<(&[DirtyRegion], livepage_image::ImageId)>,
    path: &std::path::Path,
    vm_state: Option<Vec<u8>>,
) -> Result<(livepage_image::ImageId, CheckpointStats), TrackError> {
    let t0 = Instant::now();
    let descs: Vec<livepage_image::RegionDesc> = regions
        .iter()
        .map(|r| livepage_image::RegionDesc::of(r))
        .collect();
    let w = livepage_image::ImageWriter::create(path, &descs, delta.map(|d| d.1))?;
    if let Some(v) = vm_state {
        w.set_vm_state(v);
    }
    let (mut data, mut zero) = (0u64, 0u64);
    for (i, r) in regions.iter().enumerate() {
        let ps = r.page_size();
        let whole;
        let ranges: &RangeSet = match delta {
            Some((dirty, _)) => &dirty[i].ranges,
            None => {
                let mut all = RangeSet::new();
                all.insert(0, r.len() as u64);
                whole = all;
                &whole
            }
        };
        let mut buf = Vec::new();
        for (s, e) in ranges.iter() {
            let mut off = s;
            while off < e {
                let n = ((e - off).min(1 << 20) as usize).max(ps);
                buf.resize(n, 0);
                if r.is_hole(off as usize, n) {
                    buf.fill(0);
                } else {
                    r.read_checked(off as usize, &mut buf)?;
                }
                let z = w.store_run(w.global_page(i, off / ps as u64), &buf, ps)?;
                zero += z;
                data += (buf.len() / ps) as u64 - z;
                off += n as u64;
            }
        }
    }
    let bytes = w.bytes_written();
    let id = w.finish()?;
    Ok((
        id,
        CheckpointStats {
            id: id.to_string(),
            data_pages: data,
            zero_pages: zero,
            bytes,
            duration: t0.elapsed(),
            faults: 0,
            buffered_pages: 0,
            sync_saved_pages: 0,
            peak_buffer_bytes: 0,
        },
    ))
}
