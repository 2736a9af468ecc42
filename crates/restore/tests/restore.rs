//! Lazy restore: memory equals the source on every memory type and mode, with
//! faulting threads racing the prefetcher, several handlers and several
//! userfaultfds; discards read back as zeros; failing or vanishing sources
//! and dying handlers poison instead of hanging; a recorded working set is
//! replayed first; pages over TCP.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_restore::tcp::{PageServer, TcpSource};
use livepage_restore::{
    ChainSource, Lane, MemorySource, Mode, PageSource, Prefetch, RestoreError, RestoreOptions,
    SourceError, SourceRegion, WorkingSet, start,
};

fn ok(test: &str) -> bool {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() {
        livepage_testutil::skip(test, "no full userfaultfd");
        return false;
    }
    if !c.features.contains(livepage_uffd::Features::POISON) {
        livepage_testutil::skip(test, "no UFFD_FEATURE_POISON (Linux 6.6)");
        return false;
    }
    true
}

/// Page contents: every fifth page zero, the others distinct.
fn content(pages: usize, ps: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * ps];
    for p in 0..pages {
        if p % 5 != 0 {
            v[p * ps..(p + 1) * ps]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (p * 31 + i / 8) as u8 | 1);
        }
    }
    v
}

fn region(kind: MemoryKind, pages: usize, test: &str) -> Option<Arc<Region>> {
    match Region::new(kind, pages * kind.page_size()) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            livepage_testutil::skip(test, &format!("{kind}: {e}"));
            None
        }
    }
}

fn whole(r: &Region) -> Vec<u8> {
    let mut now = vec![0u8; r.len()];
    r.read(0, &mut now).unwrap();
    now
}

fn page_of(data: &[u8], p: usize, ps: usize) -> u64 {
    u64::from_ne_bytes(data[p * ps + 8..p * ps + 16].try_into().unwrap())
}

/// Touches every page from three threads in different orders.
fn touch_all(r: &Arc<Region>) {
    let (pages, ps) = (r.pages(), r.page_size());
    let threads: Vec<_> = (0..3usize)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64];
                for i in 0..pages {
                    let p = (i * (2 * t + 1) + t * 7) % pages;
                    r.read(p * ps, &mut buf).unwrap();
                }
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
}

#[test]
fn restored_memory_equals_the_source_in_every_mode() {
    if !ok("restore_equal") {
        return;
    }
    let kinds = [
        (MemoryKind::Anon, Mode::Missing),
        (MemoryKind::Thp, Mode::Missing),
        (MemoryKind::Shmem, Mode::Missing),
        (MemoryKind::Shmem, Mode::Minor),
        (MemoryKind::Hugetlb, Mode::Missing),
        (MemoryKind::Hugetlb, Mode::Minor),
    ];
    for (kind, mode) in kinds {
        for (prefetch, handlers, uffds) in [
            (Prefetch::Sequential, 2, 1),
            (Prefetch::None, 1, 1),
            (Prefetch::Sequential, 3, 2),
        ] {
            let pages = if kind == MemoryKind::Hugetlb { 8 } else { 2048 };
            let Some(r) = region(kind, pages, "restore_equal") else {
                continue;
            };
            let ps = r.page_size();
            let data = content(pages, ps);
            let source = Arc::new(MemorySource::new(vec![data.clone()], &[ps]).unwrap());
            let what = format!("{kind} {mode:?} {prefetch:?} handlers={handlers} uffds={uffds}");
            let restore = start(
                vec![r.clone()],
                source,
                RestoreOptions::default()
                    .mode(mode)
                    .handlers(handlers)
                    .uffds(uffds)
                    .prefetch(prefetch)
                    .max_chunk(64 << 10),
            )
            .unwrap();
            touch_all(&r);
            let stats = restore.wait().unwrap();
            assert!(whole(&r) == data, "{what}: memory differs from the source");
            assert_eq!(
                stats.faults_served + stats.prefetched + stats.left_to_kernel,
                pages as u64,
                "{what}: every page placed once: {stats:?}"
            );
            // Zero pages alone in their run are zero-filled; inside a run of
            // data they are copied with it.
            assert!(stats.zero_filled <= pages.div_ceil(5) as u64, "{what}");
        }
    }
}

fn write_image(path: &Path, data: &[u8], ps: usize, kind: MemoryKind) {
    let desc = livepage_image::RegionDesc {
        base: 0x1000_0000,
        len: data.len() as u64,
        page_size: ps as u64,
        kind: livepage_image::kind::of(kind),
    };
    let w = livepage_image::ImageWriter::create(path, &[desc], None).unwrap();
    for (p, page) in data.chunks(ps).enumerate() {
        if page.iter().any(|b| *b != 0) {
            w.write_page(p as u64, page).unwrap();
        } else {
            w.mark_zero(p as u64);
        }
    }
    w.finish().unwrap();
}

#[test]
fn an_image_restores_lazily_with_zero_runs_left_to_the_kernel() {
    if !ok("restore_image") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pages = 4096;
    let mut data = content(pages, 4096);
    // 4 MiB of zeros in the middle: never registered, served by the kernel.
    data[1024 * 4096..2048 * 4096].fill(0);
    let path = dir.path().join("img");
    write_image(&path, &data, 4096, MemoryKind::Anon);
    let source = Arc::new(ChainSource::open(&path).unwrap());
    for prefetch in [Prefetch::None, Prefetch::Sequential] {
        let r = region(MemoryKind::Anon, pages, "restore_image").unwrap();
        let opts = RestoreOptions::default().prefetch(prefetch);
        let restore = start(vec![r.clone()], source.clone(), opts).unwrap();
        // Touch the pages around the zero run; the run itself is left to the kernel.
        for p in (0..1024).chain(2048..pages) {
            assert_eq!(r.read_u64(p * 4096 + 8).unwrap(), page_of(&data, p, 4096));
        }
        let stats = restore.wait().unwrap();
        assert!(whole(&r) == data);
        assert_eq!(stats.left_to_kernel, 1024, "{stats:?}");
        assert!(stats.until_resident_ms > 0.0);
    }
}

#[test]
fn discards_mid_restore_read_back_as_zeros() {
    if !ok("restore_remove") {
        return;
    }
    for (kind, mode, prefetch) in [
        (MemoryKind::Anon, Mode::Missing, Prefetch::None),
        (MemoryKind::Anon, Mode::Missing, Prefetch::Sequential),
        (MemoryKind::Shmem, Mode::Missing, Prefetch::None),
        (MemoryKind::Shmem, Mode::Minor, Prefetch::Sequential),
    ] {
        let pages = 1024;
        let Some(r) = region(kind, pages, "restore_remove") else {
            continue;
        };
        let data = content(pages, 4096);
        let slow = Arc::new(Slow {
            inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
            delay: Duration::from_micros(200),
            slow_page: u64::MAX,
        });
        let what = format!("{kind} {mode:?} {prefetch:?}");
        let restore = start(
            vec![r.clone()],
            slow,
            RestoreOptions::default()
                .mode(mode)
                .prefetch(prefetch)
                .max_chunk(4096),
        )
        .unwrap();
        // Touch pages 1..=8 (placed), then a balloon takes pages 1..4 (placed)
        // and 900..910 (not yet placed).
        for p in 1..=8 {
            assert_eq!(
                r.read_u64(p * 4096 + 8).unwrap(),
                page_of(&data, p, 4096),
                "{what}"
            );
        }
        r.discard(4096, 3 * 4096).unwrap();
        r.discard(900 * 4096, 10 * 4096).unwrap();
        for p in (1..4).chain(900..910) {
            assert_eq!(r.read_u64(p * 4096 + 8).unwrap(), 0, "{what}: page {p}");
        }
        // Untouched pages still come from the source.
        assert_eq!(r.read_u64(10 * 4096 + 8).unwrap(), page_of(&data, 10, 4096));
        let stats = restore.wait().unwrap();
        let mut want = data.clone();
        want[4096..4 * 4096].fill(0);
        want[900 * 4096..910 * 4096].fill(0);
        assert!(whole(&r) == want, "{what}: discarded pages came back");
        assert_eq!(stats.discarded, 13, "{what}: {stats:?}");
    }
}

/// A source that is slow on one page (or on all).
struct Slow {
    inner: MemorySource,
    delay: Duration,
    slow_page: u64,
}
impl PageSource for Slow {
    fn regions(&self) -> Vec<SourceRegion> {
        self.inner.regions()
    }
    fn read_pages(
        &self,
        r: usize,
        first: u64,
        buf: &mut [u8],
        lane: Lane,
    ) -> Result<bool, SourceError> {
        let n = (buf.len() / 4096) as u64;
        if self.slow_page == u64::MAX || (first..first + n).contains(&self.slow_page) {
            std::thread::sleep(self.delay);
        }
        self.inner.read_pages(r, first, buf, lane)
    }
}

/// Fails page 3, panics on page 7 when asked to.
struct Failing {
    panic: bool,
}
impl PageSource for Failing {
    fn regions(&self) -> Vec<SourceRegion> {
        vec![SourceRegion {
            page_size: 4096,
            pages: 16,
        }]
    }
    fn read_pages(
        &self,
        _r: usize,
        first: u64,
        buf: &mut [u8],
        _lane: Lane,
    ) -> Result<bool, SourceError> {
        let n = (buf.len() / 4096) as u64;
        if (first..first + n).contains(&3) {
            return Err(SourceError::Io {
                path: "pages.bin".into(),
                offset: 3 * 4096,
                len: 4096,
                source: Arc::new(std::io::Error::other("page 3 is unreadable")),
            });
        }
        if self.panic && (first..first + n).contains(&7) {
            panic!("the source blew up on page 7");
        }
        buf.fill(1);
        Ok(true)
    }
}

fn is_poisoned(r: &Region, page: usize) -> bool {
    let mut b = [0u8; 8];
    r.read_checked(page * 4096, &mut b).is_err()
}

#[test]
fn a_failing_source_poisons_and_hangs_nobody() {
    if !ok("restore_failing") {
        return;
    }
    let r = region(MemoryKind::Anon, 16, "restore_failing").unwrap();
    // Runs of many pages: only page 3 is lost, its neighbours are placed.
    let opts = RestoreOptions::default().max_chunk(16 * 4096);
    let restore = start(vec![r.clone()], Arc::new(Failing { panic: false }), opts).unwrap();
    let res = restore.wait();
    assert!(
        matches!(res, Err(RestoreError::Source { pages: 1, .. })),
        "{res:?}"
    );
    // The lost page faults at once (EFAULT through the kernel, SIGBUS for a
    // user-mode touch); the others are there.
    assert!(is_poisoned(&r, 3));
    assert_eq!(r.read_u64(0).unwrap(), u64::from_ne_bytes([1; 8]));
}

#[test]
fn a_dying_handler_fails_closed() {
    if !ok("restore_panic") {
        return;
    }
    let r = region(MemoryKind::Anon, 16, "restore_panic").unwrap();
    let opts = RestoreOptions::default().prefetch(Prefetch::None);
    let restore = start(vec![r.clone()], Arc::new(Failing { panic: true }), opts).unwrap();
    assert_eq!(r.read_u64(4096).unwrap(), u64::from_ne_bytes([1; 8]));
    // This fault kills the only handler: every page not placed is poisoned,
    // including the one being faulted, so this read returns instead of hanging.
    let t0 = Instant::now();
    assert!(is_poisoned(&r, 7));
    assert!(is_poisoned(&r, 12));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let res = restore.wait();
    assert!(matches!(res, Err(RestoreError::HandlerDied(_))), "{res:?}");
}

#[test]
fn the_watchdog_reports_a_stuck_placement() {
    if !ok("restore_watchdog") {
        return;
    }
    let data = content(64, 4096);
    let src = Slow {
        inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
        delay: Duration::from_millis(400),
        slow_page: 20,
    };
    let r = region(MemoryKind::Anon, 64, "restore_watchdog").unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let opts = RestoreOptions::default()
        .watchdog(Duration::from_millis(100))
        .on_notice(Arc::new(move |n| {
            if matches!(n, livepage_restore::Notice::Stall(_)) {
                s2.fetch_add(1, Ordering::SeqCst);
            }
        }));
    let restore = start(vec![r.clone()], Arc::new(src), opts).unwrap();
    assert_eq!(r.read_u64(20 * 4096 + 8).unwrap(), page_of(&data, 20, 4096));
    let stats = restore.wait().unwrap();
    assert!(!stats.stalls.is_empty(), "{stats:?}");
    assert_eq!(seen.load(Ordering::SeqCst), stats.stalls.len());
    let (st, page20) = (&stats.stalls[0], (r.addr() + 20 * 4096) as u64);
    assert!(st.addr <= page20 && page20 < st.addr + st.len, "{st:?}");
}

#[test]
fn a_recorded_working_set_is_placed_first() {
    if !ok("restore_wset") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pages = 512;
    let data = content(pages, 4096);
    // First restore: record the order of faults (the last 16 pages, backwards).
    let r = region(MemoryKind::Anon, pages, "restore_wset").unwrap();
    let src = Arc::new(MemorySource::new(vec![data.clone()], &[4096]).unwrap());
    let opts = RestoreOptions::default()
        .prefetch(Prefetch::None)
        .record_working_set(true);
    let restore = start(vec![r.clone()], src, opts).unwrap();
    let order: Vec<u64> = (pages as u64 - 16..pages as u64).rev().collect();
    for p in &order {
        r.read_u64(*p as usize * 4096).unwrap();
    }
    let ws = restore.wait().unwrap().working_set.unwrap();
    assert_eq!(ws.pages, order);
    let file = dir.path().join("ws");
    ws.save(&file).unwrap();
    let ws = WorkingSet::load(&file, pages as u64).unwrap();
    assert!(WorkingSet::load(&file, 7).is_err());
    // Second restore from a slow source: the recorded pages arrive before the
    // sweep, which would reach them last.
    let r = region(MemoryKind::Anon, pages, "restore_wset").unwrap();
    let slow = Arc::new(Slow {
        inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
        delay: Duration::from_millis(2),
        slow_page: u64::MAX,
    });
    let opts = RestoreOptions::default()
        .prefetch(Prefetch::Recorded(ws))
        .max_chunk(4096);
    let restore = start(vec![r.clone()], slow, opts).unwrap();
    while restore.progress().0 < 16 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let present =
        |p: usize| livepage_uffd::mm::pagemap_entry(r.addr() + p * 4096).unwrap() & (1 << 63) != 0;
    assert!(order.iter().all(|p| present(*p as usize)));
    assert!(
        !present(300),
        "the sweep should not have reached page 300 yet"
    );
    restore.wait().unwrap();
    assert!(whole(&r) == data);
}

#[test]
fn pages_over_tcp_and_a_vanishing_peer() {
    if !ok("restore_tcp") {
        return;
    }
    let pages = 1024;
    let data = content(pages, 4096);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let src: Arc<dyn PageSource> =
        Arc::new(MemorySource::new(vec![data.clone()], &[4096]).unwrap());
    let mut server = PageServer::spawn(listener, src).unwrap();
    let tcp = TcpSource::connect(server.addr(), 2, Duration::from_secs(5)).unwrap();
    let r = region(MemoryKind::Anon, pages, "restore_tcp").unwrap();
    let opts = RestoreOptions::default().handlers(2);
    let restore = start(vec![r.clone()], Arc::new(tcp), opts).unwrap();
    touch_all(&r);
    restore.wait().unwrap();
    assert!(whole(&r) == data);
    assert!(server.requests_served() > 0);

    // The peer vanishes mid-restore: faults fail at once, nobody hangs.
    let tcp = TcpSource::connect(server.addr(), 1, Duration::from_secs(5)).unwrap();
    let r = region(MemoryKind::Anon, pages, "restore_tcp").unwrap();
    let opts = RestoreOptions::default().prefetch(Prefetch::None);
    let restore = start(vec![r.clone()], Arc::new(tcp), opts).unwrap();
    assert_eq!(r.read_u64(5 * 4096 + 8).unwrap(), page_of(&data, 5, 4096));
    server.shutdown();
    let t0 = Instant::now();
    assert!(is_poisoned(&r, 100));
    assert!(is_poisoned(&r, 700));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let res = restore.wait();
    assert!(
        matches!(
            &res,
            Err(RestoreError::Source {
                first: SourceError::PeerGone { .. },
                ..
            })
        ),
        "{res:?}"
    );
    // Page 5 arrived before the peer left and is intact.
    assert_eq!(r.read_u64(5 * 4096 + 8).unwrap(), page_of(&data, 5, 4096));
}

#[test]
fn a_mismatched_source_is_refused() {
    if !ok("restore_mismatch") {
        return;
    }
    let r = region(MemoryKind::Anon, 8, "restore_mismatch").unwrap();
    let src = Arc::new(MemorySource::new(vec![vec![0u8; 4 * 4096]], &[4096]).unwrap());
    let e = start(vec![r.clone()], src, RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("4 pages"), "{e}");
    let src = Arc::new(MemorySource::new(vec![vec![0u8; 8 * 4096]], &[4096]).unwrap());
    let opts = RestoreOptions::default().mode(Mode::Minor);
    let e = start(vec![r], src, opts).unwrap_err();
    assert!(e.to_string().contains("minor mode needs shmem"), "{e}");
}
