//! KVM's dirty log as a [`Tracker`]: what VMMs use today. It sees guest
//! writes only (not the VMM's), and the VM must be paused while it is read.

use std::time::Instant;

use livepage_mem::RangeSet;

use crate::{CollectStats, DirtyRegion, TrackError, Tracker};

/// A source of KVM dirty bitmaps: returns the bitmap since the previous
/// call (one bit per 4 KiB page of guest RAM) and clears it, as
/// `KVM_GET_DIRTY_LOG` does.
pub type DirtyLogFetch = Box<dyn FnMut() -> std::io::Result<Vec<u64>> + Send>;

/// Tracking through KVM's dirty log of one memory slot.
pub struct KvmDirtyLog {
    fetch: DirtyLogFetch,
}

impl std::fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyLog").finish_non_exhaustive()
    }
}

impl KvmDirtyLog {
    /// Starts from now: the log is read once and forgotten (a base image
    /// covers what came before).
    pub fn start(mut fetch: DirtyLogFetch) -> Result<KvmDirtyLog, TrackError> {
        fetch().map_err(TrackError::DirtyLog)?;
        Ok(KvmDirtyLog { fetch })
    }
}

impl Tracker for KvmDirtyLog {
    fn collect(&mut self) -> Result<(Vec<DirtyRegion>, CollectStats), TrackError> {
        let t0 = Instant::now();
        let bitmap = (self.fetch)().map_err(TrackError::DirtyLog)?;
        let mut ranges = RangeSet::new();
        for (i, w) in bitmap.iter().enumerate() {
            let mut b = *w;
            while b != 0 {
                let page = i as u64 * 64 + u64::from(b.trailing_zeros());
                ranges.insert(page * 4096, (page + 1) * 4096);
                b &= b - 1;
            }
        }
        let out = vec![DirtyRegion {
            ranges,
            ..Default::default()
        }];
        let stats = CollectStats::tally(&out, t0.elapsed(), 1);
        Ok((out, stats))
    }

    fn name(&self) -> &'static str {
        "kvm-dirty-log"
    }

    fn live_support(&self) -> crate::LiveSupport {
        crate::LiveSupport::Independent
    }
}
