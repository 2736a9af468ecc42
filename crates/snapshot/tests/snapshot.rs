//! Point-in-time consistency of live snapshots under concurrent writers, for
//! every memory type, several writer and handler threads, and buffers from
//! plenty to none; discards during the snapshot; clean failures.
#![allow(
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    clippy::needless_range_loop
)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use livepage_image::{Image, PageState};
use livepage_mem::{MemoryKind, Region};
use livepage_snapshot::{SnapshotError, SnapshotOptions, start};

fn caps_ok(test: &str) -> bool {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() {
        livepage_testutil::skip(test, "no full userfaultfd");
        return false;
    }
    let need = livepage_uffd::Features::PAGEFAULT_FLAG_WP
        | livepage_uffd::Features::WP_UNPOPULATED
        | livepage_uffd::Features::WP_HUGETLBFS_SHMEM;
    if !c.features.contains(need) {
        livepage_testutil::skip(
            test,
            &format!("kernel lacks {:?}", need.difference(c.features)),
        );
        return false;
    }
    true
}

fn region(test: &str, kind: MemoryKind, bytes: usize) -> Option<Arc<Region>> {
    match Region::new(kind, bytes) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) if kind == MemoryKind::Hugetlb => {
            livepage_testutil::skip(test, &e.to_string());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Writers own disjoint pages (page % writers == w), so each page's history is
/// in program order. Every write stamps the first and last word of its page
/// with a global sequence number (a torn copy shows two different stamps).
struct Workload {
    region: Arc<Region>,
    writers: usize,
    seq: AtomicU64,
    pause: AtomicBool,
    paused: AtomicUsize,
    stop: AtomicBool,
    logs: Vec<std::sync::Mutex<Vec<(u64, usize)>>>,
}

fn page_mix(s: u64) -> u64 {
    let mut x = s.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x
}

impl Workload {
    fn run(self: &Arc<Self>, w: usize) {
        let ps = self.region.page_size();
        let pages = self.region.pages();
        let mut log = Vec::new();
        let mut local = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            if self.pause.load(Ordering::SeqCst) {
                self.paused.fetch_add(1, Ordering::SeqCst);
                while self.pause.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                self.paused.fetch_sub(1, Ordering::SeqCst);
            }
            local += 1;
            // Pages of this writer only; the first eighth of pages is never written
            // (they stay zero: holes) and the sequence decides which page.
            let mine = (pages - pages / 8) / self.writers;
            if mine == 0 {
                break;
            }
            let k = (page_mix(local * 31 + w as u64) % mine as u64) as usize;
            let page = pages / 8 + k * self.writers + w;
            if page >= pages {
                continue;
            }
            let s = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            self.region.write_u64(page * ps, s).unwrap();
            self.region.write_u64(page * ps + ps - 8, s).unwrap();
            log.push((s, page));
        }
        *self.logs[w].lock().unwrap() = log;
    }
}

fn check_point_in_time(
    kind: MemoryKind,
    bytes: usize,
    writers: usize,
    handlers: usize,
    buffer: usize,
) {
    let test = "snapshot_point_in_time";
    if !caps_ok(test) {
        return;
    }
    let Some(r) = region(test, kind, bytes) else {
        return;
    };
    let ps = r.page_size();
    // Initial content: a pattern in the second eighth, zeros elsewhere.
    for p in r.pages() / 8..r.pages() / 4 {
        r.fill(p * ps, ps, (p % 251) as u8 + 1).unwrap();
    }
    let wl = Arc::new(Workload {
        region: r.clone(),
        writers,
        seq: AtomicU64::new(0),
        pause: AtomicBool::new(false),
        paused: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        logs: (0..writers)
            .map(|_| std::sync::Mutex::new(Vec::new()))
            .collect(),
    });
    let go = Arc::new(Barrier::new(writers + 1));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (wl, go) = (wl.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                wl.run(w)
            })
        })
        .collect();
    go.wait();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Pause the writers just for arming: the snapshot's instant.
    wl.pause.store(true, Ordering::SeqCst);
    while wl.paused.load(Ordering::SeqCst) < writers {
        std::hint::spin_loop();
    }
    let cut = wl.seq.load(Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.img");
    let snap = start(
        vec![r.clone()],
        &path,
        SnapshotOptions::default()
            .buffer_bytes(buffer)
            .handler_threads(handlers)
            .chunk_pages(64),
    )
    .unwrap();
    wl.pause.store(false, Ordering::SeqCst);
    let stats = snap.wait().unwrap();
    wl.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    // Rebuild memory at the cut from the logs.
    let mut expect: Vec<Option<u64>> = vec![None; r.pages()];
    let mut after = 0;
    for log in &wl.logs {
        for &(s, page) in log.lock().unwrap().iter() {
            if s <= cut {
                expect[page] = Some(s);
            } else {
                after += 1;
            }
        }
    }
    let img = Image::open(&path).unwrap();
    img.verify().unwrap();
    let mut buf = vec![0u8; ps];
    for p in 0..r.pages() {
        let state = img.read_page(0, p as u64, &mut buf).unwrap();
        let mut want = vec![0u8; ps];
        if (r.pages() / 8..r.pages() / 4).contains(&p) {
            want.fill((p % 251) as u8 + 1);
        }
        if let Some(s) = expect[p] {
            want[..8].copy_from_slice(&s.to_ne_bytes());
            want[ps - 8..].copy_from_slice(&s.to_ne_bytes());
        }
        assert!(
            buf == want,
            "{kind} w{writers} h{handlers} buf{buffer}: page {p} differs from memory at the instant (first word {:?}, want {:?})",
            &buf[..8],
            &want[..8]
        );
        if want.iter().all(|b| *b == 0) {
            assert_eq!(state, PageState::Zero, "zero page {p} must be a hole");
        }
    }
    assert_eq!(stats.pages, r.pages() as u64);
    assert_eq!(
        stats.by_writer
            + stats.by_fault_buffered
            + stats.by_fault_sync
            + stats.by_fault_zero
            + stats.remove_saves
            + stats.late_remove_saves,
        stats.pages
    );
    assert!(
        stats.peak_buffer_bytes <= buffer as u64,
        "buffer bound exceeded"
    );
    eprintln!("{kind} w{writers} h{handlers} buf{buffer}: {stats:?}; {after} writes after the cut");
}

#[test]
fn point_in_time_anon_large_buffer() {
    check_point_in_time(MemoryKind::Anon, 16 << 20, 1, 1, 64 << 20);
    check_point_in_time(MemoryKind::Anon, 16 << 20, 3, 3, 64 << 20);
}

#[test]
fn point_in_time_anon_small_and_no_buffer() {
    check_point_in_time(MemoryKind::Anon, 16 << 20, 2, 2, 8 * 4096);
    check_point_in_time(MemoryKind::Anon, 16 << 20, 2, 1, 0);
}

#[test]
fn point_in_time_thp() {
    check_point_in_time(MemoryKind::Thp, 16 << 20, 2, 2, 64 << 20);
    check_point_in_time(MemoryKind::Thp, 16 << 20, 1, 1, 0);
}

#[test]
fn point_in_time_shmem() {
    check_point_in_time(MemoryKind::Shmem, 16 << 20, 2, 2, 64 << 20);
    check_point_in_time(MemoryKind::Shmem, 16 << 20, 3, 1, 4 * 4096);
}

#[test]
fn point_in_time_hugetlb() {
    check_point_in_time(MemoryKind::Hugetlb, 16 << 20, 2, 2, 8 << 20);
    check_point_in_time(MemoryKind::Hugetlb, 16 << 20, 1, 1, 0);
}

/// Pages discarded with MADV_DONTNEED right after the instant keep their
/// contents from the instant in the image.
#[test]
fn discarded_memory_keeps_its_snapshot_contents() {
    if !caps_ok("snapshot_discard") {
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Anon, 32 << 20).unwrap());
    let pages = r.pages();
    for p in 0..pages {
        r.write_u64(p * 4096, p as u64 + 1).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.img");
    // A tiny chunk keeps the writer slow so the discard races it.
    let snap = start(
        vec![r.clone()],
        &path,
        SnapshotOptions::default()
            .buffer_bytes(1 << 20)
            .handler_threads(1)
            .chunk_pages(1),
    )
    .unwrap();
    r.discard((pages / 2) * 4096, (pages / 2) * 4096).unwrap();
    let stats = snap.wait().unwrap();
    let img = Image::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    for p in 0..pages {
        img.read_page(0, p as u64, &mut buf).unwrap();
        assert_eq!(
            u64::from_ne_bytes(buf[..8].try_into().unwrap()),
            p as u64 + 1,
            "page {p}"
        );
    }
    assert!(
        stats.remove_saves + stats.late_remove_saves > 0,
        "{stats:?}"
    );
    // Memory itself was discarded.
    assert_eq!(r.read_u64((pages - 1) * 4096).unwrap(), 0);
}

/// A cancel lifts all protection, leaves no file, and the writers go on.
#[test]
fn cancel_is_clean() {
    if !caps_ok("snapshot_cancel") {
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Anon, 64 << 20).unwrap());
    r.fill(0, r.len(), 7).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.img");
    let snap = start(
        vec![r.clone()],
        &path,
        SnapshotOptions::default()
            .buffer_bytes(0)
            .handler_threads(1)
            .chunk_pages(1),
    )
    .unwrap();
    let writer = {
        let r = r.clone();
        std::thread::spawn(move || {
            for p in (0..r.pages()).rev() {
                r.write_u64(p * 4096, 9).unwrap();
            }
        })
    };
    snap.cancel();
    assert!(matches!(snap.wait(), Err(SnapshotError::Cancelled)));
    writer.join().unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no image or temporary file left"
    );
    assert_eq!(
        livepage_uffd::mm::pagemap_entry(r.addr()).unwrap() & (1 << 57),
        0,
        "uffd-wp bit left set"
    );
    // Protection is gone: writes from this thread do not block.
    r.fill(0, r.len(), 1).unwrap();
}

/// A destination that fills up aborts the snapshot cleanly.
#[test]
fn full_destination_aborts_cleanly() {
    if !caps_ok("snapshot_full") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        livepage_testutil::skip("snapshot_full", "cannot mount a small tmpfs (needs root)");
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Anon, 16 << 20).unwrap());
    r.fill(0, r.len(), 3).unwrap();
    let snap = start(
        vec![r.clone()],
        &mnt.join("snap.img"),
        SnapshotOptions::default(),
    )
    .unwrap();
    let res = snap.wait();
    let left = std::fs::read_dir(&mnt).unwrap().count();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert!(matches!(res, Err(SnapshotError::Image(_))), "{res:?}");
    assert_eq!(left, 0, "no partial image");
    r.fill(0, r.len(), 4).unwrap();
}

#[test]
fn unwritable_destination_fails_before_arming() {
    if !caps_ok("snapshot_unwritable") {
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Anon, 1 << 20).unwrap());
    let res = start(
        vec![r.clone()],
        std::path::Path::new("/nonexistent-dir/snap.img"),
        SnapshotOptions::default(),
    );
    assert!(matches!(res, Err(SnapshotError::Image(_))));
    r.fill(0, r.len(), 1).unwrap();
}

/// Unmapping part of a region mid-snapshot aborts it and releases the rest.
#[test]
fn unmapped_region_aborts() {
    if !caps_ok("snapshot_unmap") {
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Anon, 64 << 20).unwrap());
    r.fill(0, r.len(), 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.img");
    let snap = start(
        vec![r.clone()],
        &path,
        SnapshotOptions::default()
            .buffer_bytes(0)
            .handler_threads(1)
            .chunk_pages(1),
    )
    .unwrap();
    let last = r.addr() + r.len() - (1 << 20);
    assert_eq!(
        unsafe { libc::munmap(last as *mut libc::c_void, 1 << 20) },
        0
    );
    let res = snap.wait();
    assert!(
        matches!(
            res,
            Err(SnapshotError::RegionUnmapped { .. })
                | Err(SnapshotError::Region(_))
                | Err(SnapshotError::Kernel(_))
        ),
        "{res:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    r.fill(0, r.len() - (1 << 20), 6).unwrap();
    // The region's tail is gone; never drop it (its Drop would unmap the hole again).
    std::mem::forget(r);
}
