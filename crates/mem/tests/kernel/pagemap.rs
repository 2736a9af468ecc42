//! PAGEMAP_SCAN with async write-protect: more than 512 regions (the stale
//! `walk_end` defect), small output buffers, max_pages, CHECK_WPASYNC, THP
//! at 4 KiB granularity, and the transact case (writers racing harvests).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livepage_mem::{MemoryKind, Region};
use livepage_testutil::require;
use livepage_uffd::{
    Categories, Features, PageRegion, Pagemap, RegisterMode, Resolved, ScanError, ScanRequest, Uffd,
};

use crate::common::*;

fn tracked(test: &str, kind: MemoryKind, pages: usize) -> Option<(Uffd, Region)> {
    require_scan(test)?;
    let u = uffd(test, Features::WP_ASYNC)?;
    let r = region(test, kind, pages)?;
    r.register(&u, RegisterMode::WP).unwrap();
    assert_eq!(
        u.write_protect(r.addr(), r.len(), true, false).unwrap(),
        Resolved::All
    );
    Some((u, r))
}

fn require_scan(test: &str) -> Option<()> {
    if Pagemap::is_supported() {
        Some(())
    } else {
        livepage_testutil::skip(test, "PAGEMAP_SCAN unavailable (Linux < 6.7)");
        None
    }
}

fn collect(pm: &mut Pagemap, req: ScanRequest) -> Vec<PageRegion> {
    pm.scan(req).collect::<Result<Vec<_>, _>>().unwrap()
}

#[test]
fn more_than_512_regions_no_duplicates() {
    const PAGES: usize = 4096;
    let Some((_u, r)) = tracked("scan_512", MemoryKind::Anon, PAGES) else {
        return;
    };
    // Write every other page: 2048 separate written regions.
    for p in (0..PAGES).step_by(2) {
        r.write_u64(p * 4096, p as u64 + 1).unwrap();
    }
    let want: Vec<u64> = (0..PAGES)
        .step_by(2)
        .map(|p| (r.addr() + p * 4096) as u64)
        .collect();
    let (s, e) = (r.addr() as u64, (r.addr() + r.len()) as u64);
    for vec_len in [1024usize, 600, 100, 1] {
        let mut pm = Pagemap::open_self().unwrap();
        pm.set_vec_len(vec_len);
        let got = collect(&mut pm, ScanRequest::written(s, e));
        let starts: Vec<u64> = got.iter().map(|g| g.start).collect();
        assert_eq!(
            starts, want,
            "vec_len {vec_len}: regions must be exact, without duplicates"
        );
        assert!(
            got.iter()
                .all(|g| g.len() == 4096 && g.categories == Categories::WRITTEN)
        );
    }
    // Harvest (report + re-protect), then nothing is left.
    let mut pm = Pagemap::open_self().unwrap();
    pm.set_vec_len(700);
    assert_eq!(
        collect(&mut pm, ScanRequest::harvest_written(s, e)).len(),
        want.len()
    );
    assert!(collect(&mut pm, ScanRequest::written(s, e)).is_empty());
    // Adjacent written pages merge into one region, across output buffers too.
    r.fill(0, 64 * 4096, 1).unwrap();
    pm.set_vec_len(3);
    let got = collect(&mut pm, ScanRequest::written(s, e));
    assert_eq!(
        got,
        vec![PageRegion {
            start: s,
            end: s + 64 * 4096,
            categories: Categories::WRITTEN
        }]
    );
}

#[test]
fn max_pages_is_a_total_budget() {
    let Some((_u, r)) = tracked("scan_max_pages", MemoryKind::Anon, 64) else {
        return;
    };
    for p in (0..64).step_by(3) {
        r.write_u64(p * 4096, 1).unwrap();
    }
    let mut pm = Pagemap::open_self().unwrap();
    pm.set_vec_len(1);
    let req = ScanRequest {
        max_pages: 5,
        ..ScanRequest::written(r.addr() as u64, (r.addr() + r.len()) as u64)
    };
    let got = collect(&mut pm, req);
    let pages: u64 = got.iter().map(|g| g.len() / 4096).sum();
    assert_eq!(pages, 5);
    assert_eq!(got[4].start, (r.addr() + 12 * 4096) as u64);
}

#[test]
fn check_wpasync_rejects_untracked_memory() {
    require!(Pagemap::is_supported(), "PAGEMAP_SCAN unavailable");
    let r = Region::new(MemoryKind::Anon, 16 * 4096).unwrap();
    r.fill(0, r.len(), 1).unwrap();
    let mut pm = Pagemap::open_self().unwrap();
    let res: Result<Vec<_>, _> = pm
        .scan(ScanRequest::harvest_written(
            r.addr() as u64,
            (r.addr() + r.len()) as u64,
        ))
        .collect();
    assert!(matches!(res, Err(ScanError::NotWpAsync { .. })), "{res:?}");
    // A bad request is refused before the kernel.
    let res: Result<Vec<_>, _> = pm
        .scan(ScanRequest::written(
            r.addr() as u64 + 1,
            r.addr() as u64 + 4096,
        ))
        .collect();
    assert!(matches!(res, Err(ScanError::BadRequest { .. })), "{res:?}");
}

/// Tracking is at 4 KiB even on THP and shmem: one written word is one page.
#[test]
fn four_kib_granularity_on_thp_shmem_hugetlb() {
    for kind in [MemoryKind::Thp, MemoryKind::Shmem, MemoryKind::Hugetlb] {
        let pages = if kind == MemoryKind::Hugetlb { 2 } else { 1024 };
        let Some(r) = region("scan_granularity", kind, pages) else {
            continue;
        };
        // Populate first so THP has a PMD to split.
        r.fill(0, r.len(), 3).unwrap();
        let Some(u) = uffd("scan_granularity", Features::WP_ASYNC) else {
            return;
        };
        r.register(&u, RegisterMode::WP).unwrap();
        assert_eq!(
            u.write_protect(r.addr(), r.len(), true, false).unwrap(),
            Resolved::All
        );
        let mut pm = Pagemap::open_self().unwrap();
        let (s, e) = (r.addr() as u64, (r.addr() + r.len()) as u64);
        assert!(
            collect(&mut pm, ScanRequest::written(s, e)).is_empty(),
            "{kind}: clean after protect"
        );
        r.write_u64(513 * 4096 % r.len() + 8, 9).unwrap();
        let got = collect(&mut pm, ScanRequest::harvest_written(s, e));
        let unit = r.page_size() as u64;
        let at = s + (513 * 4096 % r.len()) as u64 / unit * unit;
        assert_eq!(
            got,
            vec![PageRegion {
                start: at,
                end: at + unit,
                categories: Categories::WRITTEN
            }],
            "{kind}"
        );
    }
}

/// Writers stamp pages with increasing sequence numbers and wait until a
/// harvest has observed their stamp; a lost write would leave its writer
/// waiting forever (caught by the time limit) (pagemap_ioctl "transact").
#[test]
fn transact_no_write_is_lost() {
    for kind in [
        MemoryKind::Anon,
        MemoryKind::Thp,
        MemoryKind::Shmem,
        MemoryKind::Hugetlb,
    ] {
        let pages = if kind == MemoryKind::Hugetlb { 4 } else { 256 };
        let Some((u, r)) = tracked("transact", kind, pages) else {
            continue;
        };
        let ps = r.page_size();
        let r = Arc::new(r);
        let seen: Arc<Vec<AtomicU64>> = Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
        let done = Arc::new(AtomicBool::new(false));
        let scanner = {
            let (r, seen, done) = (r.clone(), seen.clone(), done.clone());
            std::thread::spawn(move || {
                let mut pm = Pagemap::open_self().unwrap();
                pm.set_vec_len(16);
                let (s, e) = (r.addr() as u64, (r.addr() + r.len()) as u64);
                let mut harvests = 0u64;
                while !done.load(Ordering::SeqCst) {
                    for reg in pm.scan(ScanRequest::harvest_written(s, e)) {
                        let reg = reg.unwrap();
                        for a in (reg.start..reg.end).step_by(ps) {
                            let p = (a - s) as usize / ps;
                            let stamp = r.read_u64(p * ps).unwrap();
                            seen[p].fetch_max(stamp, Ordering::SeqCst);
                        }
                    }
                    harvests += 1;
                }
                harvests
            })
        };
        let writers: Vec<_> = (0..2usize)
            .map(|w| {
                let (r, seen) = (r.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut seq = 0u64;
                    for round in 0..200u64 {
                        for p in (w..pages).step_by(2).skip(round as usize % 3).step_by(3) {
                            seq += 1;
                            let stamp = (seq << 8) | w as u64;
                            r.write_u64(p * ps, stamp).unwrap();
                            while seen[p].load(Ordering::SeqCst) < stamp {
                                std::thread::yield_now();
                            }
                        }
                    }
                    seq
                })
            })
            .collect();
        let writes: u64 = within(60, "transact writers", move || {
            writers.into_iter().map(|h| h.join().unwrap()).sum()
        });
        done.store(true, Ordering::SeqCst);
        let harvests = scanner.join().unwrap();
        assert!(writes > 0 && harvests > 0);
        drop(u);
    }
}

/// `Region::data_ranges`: exactly the pages written (anon, THP at 4 KiB
/// granularity of presence, shmem and hugetlbfs extents), and nothing after
/// a discard.
#[test]
fn data_ranges_are_the_written_pages_of_every_kind() {
    for kind in [MemoryKind::Anon, MemoryKind::Shmem, MemoryKind::Hugetlb] {
        let test = "data_ranges_are_the_written_pages_of_every_kind";
        if kind == MemoryKind::Anon && require_scan(test).is_none() {
            continue;
        }
        let ps = kind.page_size();
        let Some(r) = region(test, kind, 8) else {
            continue;
        };
        assert!(r.data_ranges().unwrap().is_empty(), "{kind}: fresh");
        for p in [1usize, 2, 5] {
            r.write_u64(p * ps + 8, 0x55).unwrap();
        }
        let got: Vec<_> = r.data_ranges().unwrap().iter().collect();
        let ps = ps as u64;
        assert_eq!(got, vec![(ps, 3 * ps), (5 * ps, 6 * ps)], "{kind}");
        r.discard(2 * ps as usize, ps as usize).unwrap();
        let got: Vec<_> = r.data_ranges().unwrap().iter().collect();
        assert_eq!(got, vec![(ps, 2 * ps), (5 * ps, 6 * ps)], "{kind}");
    }
}
