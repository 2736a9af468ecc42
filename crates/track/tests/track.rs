//! No write is lost: writers stamp pages with increasing sequence numbers
//! while a collector harvests; each writer waits until a collect has reported
//! its page *and* a read after that collect saw its stamp (the pre-copy
//! pattern: report, then read). A lost write would leave its writer waiting.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_track::{Backend, DirtyTracker, Tracker};

fn usable(test: &str, backend: Backend) -> bool {
    let caps = livepage_uffd::probe::capabilities();
    let ok = caps.access.full()
        && match backend {
            Backend::WpAsync => {
                caps.features.contains(livepage_uffd::Features::WP_ASYNC) && caps.pagemap_scan
            }
            Backend::SyncWp => caps.features.contains(
                livepage_uffd::Features::PAGEFAULT_FLAG_WP
                    | livepage_uffd::Features::WP_UNPOPULATED,
            ),
        };
    if !ok {
        livepage_testutil::skip(test, &format!("{backend:?} unavailable"));
    }
    ok
}

fn transact(kind: MemoryKind, backend: Backend) {
    if !usable("track_transact", backend) {
        return;
    }
    let pages = if kind == MemoryKind::Hugetlb { 4 } else { 256 };
    let r = match Region::new(kind, pages * kind.page_size()) {
        Ok(r) => Arc::new(r),
        Err(e) if kind == MemoryKind::Hugetlb => {
            livepage_testutil::skip("track_transact", &e.to_string());
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // Half the pages populated before tracking starts, half never touched.
    r.fill(0, r.len() / 2, 1).unwrap();
    let ps = r.page_size();
    let mut tracker = DirtyTracker::start(vec![r.clone()], Some(backend)).unwrap();
    let (_, first) = tracker.collect().unwrap();
    assert_eq!(
        first.dirty_bytes, 0,
        "{kind} {backend:?}: nothing written yet"
    );
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2usize)
        .map(|w| {
            let (r, seen) = (r.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                for round in 0..60usize {
                    for p in (w..pages).step_by(2).skip(round % 3).step_by(3) {
                        seq += 1;
                        let stamp = (seq << 8) | w as u64;
                        r.write_u64(p * ps + 8 * (seq as usize % 512), stamp)
                            .unwrap();
                        r.write_u64(p * ps, stamp).unwrap();
                        let t0 = Instant::now();
                        while seen[p].load(Ordering::SeqCst) < stamp {
                            assert!(
                                t0.elapsed() < Duration::from_secs(20),
                                "page {p}: write {stamp:#x} never reported"
                            );
                            std::thread::yield_now();
                        }
                    }
                }
            })
        })
        .collect();
    let mut collects = 0;
    let mut reported = 0u64;
    while writers.iter().any(|h| !h.is_finished()) {
        let (dirty, stats) = tracker.collect().unwrap();
        collects += 1;
        reported += stats.dirty_bytes;
        for (s, e) in dirty[0].ranges.iter() {
            for off in (s..e).step_by(ps) {
                let p = off as usize / ps;
                let stamp = r.read_u64(p * ps).unwrap();
                seen[p].fetch_max(stamp, Ordering::SeqCst);
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    for h in writers {
        h.join().unwrap();
    }
    assert!(collects > 1 && reported > 0);
    // After the writers stop, two collects: the second reports nothing.
    tracker.collect().unwrap();
    let (_, last) = tracker.collect().unwrap();
    assert_eq!(last.dirty_bytes, 0, "{kind} {backend:?}");
}

#[test]
fn no_write_lost_wp_async() {
    for kind in MemoryKind::ALL {
        transact(kind, Backend::WpAsync);
    }
}

#[test]
fn no_write_lost_sync_wp() {
    for kind in MemoryKind::ALL {
        transact(kind, Backend::SyncWp);
    }
}

/// A collect reports exactly the pages written, at 4 KiB even on THP, and
/// costs what is populated: a 1 TiB reservation with a few MiB touched.
#[test]
fn exact_pages_and_sparse_reservations() {
    if !usable("track_exact", Backend::WpAsync) {
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Thp, 64 << 20).unwrap());
    r.fill(0, r.len(), 1).unwrap();
    let mut t = DirtyTracker::start(vec![r.clone()], Some(Backend::WpAsync)).unwrap();
    for p in [3usize, 4, 700, 16383] {
        r.write_u64(p * 4096, 9).unwrap();
    }
    let (d, _) = t.collect().unwrap();
    let got: Vec<(u64, u64)> = d[0].ranges.iter().collect();
    assert_eq!(
        got,
        vec![
            (3 * 4096, 5 * 4096),
            (700 * 4096, 701 * 4096),
            (16383 * 4096, 16384 * 4096)
        ]
    );
    drop(t);

    let big = Arc::new(Region::new(MemoryKind::Anon, 1 << 40).unwrap());
    big.fill(0, 8 << 20, 1).unwrap();
    big.fill(512 << 30, 4 << 20, 1).unwrap();
    let t0 = Instant::now();
    let mut t = DirtyTracker::start(vec![big.clone()], Some(Backend::WpAsync)).unwrap();
    big.write_u64(512 << 30, 5).unwrap();
    let (d, stats) = t.collect().unwrap();
    assert_eq!(
        d[0].ranges.iter().collect::<Vec<_>>(),
        vec![(512 << 30, (512 << 30) + 4096)]
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "arming and collecting 1 TiB took {:?}",
        t0.elapsed()
    );
    eprintln!(
        "1 TiB reservation, 12 MiB populated: start+collect {:?}, collect {:?}",
        t0.elapsed(),
        stats.duration
    );
}

/// Pre-copy rounds while a writer runs, then a final round with the writer
/// stopped: the copy built from the rounds equals memory (what migration
/// relies on).
#[test]
fn precopy_rounds_converge_to_memory() {
    if !usable("track_precopy", Backend::WpAsync) {
        return;
    }
    let pages = 512usize;
    let r = Arc::new(Region::new(MemoryKind::Anon, pages * 4096).unwrap());
    r.fill(0, r.len(), 7).unwrap();
    let mut t = DirtyTracker::start(vec![r.clone()], None).unwrap();
    let mut copy = vec![0u8; r.len()];
    r.read(0, &mut copy).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                r.write_u64((i as usize * 7919 % pages) * 4096 + 64, i)
                    .unwrap();
            }
        })
    };
    let mut sent = 0usize;
    for _ in 0..5 {
        t.precopy_round(|_, off, bytes| {
            copy[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            sent += bytes.len();
            Ok(())
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    t.precopy_round(|_, off, bytes| {
        copy[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    })
    .unwrap();
    let mut now = vec![0u8; r.len()];
    r.read(0, &mut now).unwrap();
    assert!(copy == now, "the pre-copied memory differs from memory");
    assert!(sent > 0);
}

/// A discard followed by writes is reported by every backend: the discard
/// itself (the contents became zeros) and the writes after it, even when a
/// collect runs between the discard's event and its zap, and even though
/// on anonymous memory the zap drops the page's write protection.
#[test]
fn writes_after_a_discard_are_never_lost() {
    for backend in [Backend::SyncWp, Backend::WpAsync] {
        if !usable("track_discard", backend) {
            continue;
        }
        for kind in [MemoryKind::Anon, MemoryKind::Shmem] {
            let pages = 64usize;
            let r = Arc::new(Region::new(kind, pages * 4096).unwrap());
            r.fill(0, r.len(), 3).unwrap();
            let mut t = DirtyTracker::start(vec![r.clone()], Some(backend)).unwrap();
            assert_eq!(t.collect().unwrap().1.dirty_bytes, 0);
            // A balloon takes pages 8..16; a collect reports them (zeros now).
            r.discard(8 * 4096, 8 * 4096).unwrap();
            let (d, _) = t.collect().unwrap();
            assert!(
                d[0].ranges.covers(8 * 4096, 16 * 4096),
                "{kind} {backend:?}: the discard is not reported: {:?}",
                d[0].ranges
            );
            // Then the guest writes into the discarded pages: reported too.
            for p in [9usize, 12, 15] {
                r.write_u64(p * 4096, 0x55).unwrap();
            }
            // And merely reads another: its contents (zeros) did not change
            // since the collect that reported the discard.
            assert_eq!(r.read_u64(10 * 4096).unwrap(), 0);
            let (d, _) = t.collect().unwrap();
            for p in [9u64, 12, 15] {
                assert!(
                    d[0].ranges.contains(p * 4096),
                    "{kind} {backend:?}: the write to discarded page {p} was lost: {:?}",
                    d[0].ranges
                );
            }
            // Writes after that collect fault again and are reported once more.
            r.write_u64(9 * 4096, 0x66).unwrap();
            let (d, _) = t.collect().unwrap();
            assert!(d[0].ranges.contains(9 * 4096), "{kind} {backend:?}");
        }
    }
}

/// Discards race writes and collects: a copy rebuilt from the collects
/// (reading each reported page after its collect) equals memory at the end.
#[test]
fn discards_racing_collects_lose_nothing() {
    for backend in [Backend::SyncWp, Backend::WpAsync] {
        if !usable("track_discard_race", backend) {
            continue;
        }
        let pages = 256usize;
        let r = Arc::new(Region::new(MemoryKind::Anon, pages * 4096).unwrap());
        r.fill(0, r.len(), 1).unwrap();
        let mut t = DirtyTracker::start(vec![r.clone()], Some(backend)).unwrap();
        let mut copy = vec![0u8; r.len()];
        r.read(0, &mut copy).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let p = i * 7919 % pages;
                    if i % 5 == 0 {
                        r.discard(p * 4096, 4096).unwrap();
                    } else {
                        r.write_u64(p * 4096 + 8 * (i % 512), i as u64).unwrap();
                    }
                }
            })
        };
        let round = |t: &mut DirtyTracker, copy: &mut Vec<u8>| {
            t.precopy_round(|_, off, bytes| {
                copy[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
                Ok(())
            })
            .unwrap();
        };
        for _ in 0..30 {
            round(&mut t, &mut copy);
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::SeqCst);
        worker.join().unwrap();
        round(&mut t, &mut copy);
        let mut now = vec![0u8; r.len()];
        r.read(0, &mut now).unwrap();
        let diff =
            (0..pages).find(|p| copy[p * 4096..(p + 1) * 4096] != now[p * 4096..(p + 1) * 4096]);
        assert_eq!(diff, None, "{backend:?}: a page differs from its copy");
    }
}

/// A discard on shared memory followed by a read (no write) changes the
/// page's contents to zeros while the page comes back protected: the
/// collect must still report it (it did not, before the tracker logged
/// EVENT_REMOVE).
#[test]
fn a_discard_read_back_is_reported() {
    if !usable("discard_read_back", Backend::WpAsync) {
        return;
    }
    for kind in [MemoryKind::Anon, MemoryKind::Shmem] {
        let r = Arc::new(Region::new(kind, 64 * 4096).unwrap());
        r.fill(0, r.len(), 7).unwrap();
        let mut t = DirtyTracker::start(vec![r.clone()], Some(Backend::WpAsync)).unwrap();
        let (d, _) = t.collect().unwrap();
        assert!(d[0].ranges.is_empty());
        r.discard(5 * 4096, 2 * 4096).unwrap();
        let mut page = vec![1u8; 4096];
        r.read(5 * 4096, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        let (d, _) = t.collect().unwrap();
        assert!(
            d[0].ranges.covers(5 * 4096, 7 * 4096),
            "{kind}: discarded pages not reported: {:?}",
            d[0].ranges
        );
    }
}
