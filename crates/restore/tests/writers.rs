//! Writes racing a lazy restore are never lost, in every mode: threads
//! increment a word of random pages while the prefetcher and the handlers
//! place them, and every page ends as the source's plus its increments.
//! (Minor mode once lost one in ~10 restores: a duplicate MISSING fault
//! message for a page already placed made the handler write the source's
//! copy into the page cache again, over what the writer had written since.)
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use livepage_mem::{MemoryKind, Region};
use livepage_restore::{
    Lane, MemorySource, Mode, PageSource, Prefetch, RestoreOptions, SourceError, SourceRegion,
    start,
};

/// A memory source that takes a while per read (as a store or a network
/// does), which widens every race between faults and placements.
struct Slowish(MemorySource);

impl PageSource for Slowish {
    fn regions(&self) -> Vec<SourceRegion> {
        self.0.regions()
    }
    fn read_pages(
        &self,
        r: usize,
        first: u64,
        buf: &mut [u8],
        lane: Lane,
    ) -> Result<bool, SourceError> {
        std::thread::sleep(Duration::from_micros(100));
        self.0.read_pages(r, first, buf, lane)
    }
}

fn content(pages: usize, ps: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * ps];
    for p in 0..pages {
        if p % 7 != 3 {
            v[p * ps..(p + 1) * ps]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (p * 13 + i / 8) as u8 | 1);
        }
    }
    v
}

#[test]
fn no_write_is_lost_while_pages_arrive() {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() || !c.features.contains(livepage_uffd::Features::MINOR_SHMEM) {
        livepage_testutil::skip("restore_writers", "no full userfaultfd with MINOR_SHMEM");
        return;
    }
    let cases = [
        (MemoryKind::Shmem, Mode::Minor, 8192),
        (MemoryKind::Shmem, Mode::Missing, 8192),
        (MemoryKind::Anon, Mode::Missing, 8192),
        (MemoryKind::Hugetlb, Mode::Minor, 16),
    ];
    for (kind, mode, pages) in cases {
        let runs = if kind == MemoryKind::Hugetlb { 4 } else { 8 };
        for run in 0..runs {
            let r = match Region::new(kind, pages * kind.page_size()) {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    livepage_testutil::skip("restore_writers", &format!("{kind}: {e}"));
                    break;
                }
            };
            let ps = r.page_size();
            let data = content(pages, ps);
            let source = MemorySource::new(vec![data.clone()], &[ps]).unwrap();
            let restore = start(
                vec![r.clone()],
                Arc::new(Slowish(source)),
                RestoreOptions::default()
                    .mode(mode)
                    .handlers(1 + run % 2)
                    .prefetch(Prefetch::Sequential),
            )
            .unwrap();
            let counts: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let (r, counts) = (&r, &counts);
                    s.spawn(move || {
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t * 7 + run as u64 * 131);
                        for _ in 0..pages * 2 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // Each thread its own pages: increments do not race.
                            let p = (x % pages as u64) & !1 | t;
                            let off = p as usize * ps + 40;
                            let v = r.read_u64(off).unwrap();
                            r.write_u64(off, v.wrapping_add(1)).unwrap();
                            counts[p as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
            restore.wait().unwrap();
            let mut got = vec![0u8; pages * ps];
            r.read(0, &mut got).unwrap();
            for p in 0..pages {
                let mut want = data[p * ps..(p + 1) * ps].to_vec();
                let w0 = u64::from_le_bytes(want[40..48].try_into().unwrap());
                let n = counts[p].load(Ordering::Relaxed);
                want[40..48].copy_from_slice(&w0.wrapping_add(n).to_le_bytes());
                if got[p * ps..(p + 1) * ps] != want[..] {
                    let g = u64::from_le_bytes(got[p * ps + 40..p * ps + 48].try_into().unwrap());
                    panic!(
                        "{kind} {mode:?} run {run}: page {p} written {n} times holds {} increments",
                        g.wrapping_sub(w0)
                    );
                }
            }
        }
    }
}
