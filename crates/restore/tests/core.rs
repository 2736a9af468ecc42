//! The restore core (`serve`) on userfaultfds it did not create: a resident
//! set is never fetched nor overwritten; pushed pages race faults and
//! discards and every page ends right; a source swapped mid-restore serves
//! the faults that waited for it; without a new source the deadline fails
//! closed.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_restore::tcp::{PageServer, TcpSource};
use livepage_restore::{
    AddressMap, Lane, MappedRange, MemorySource, OnSourceLoss, PageSource, Prefetch, RestoreError,
    RestoreOptions, SourceError, SourceRegion, Target, serve,
};
use livepage_uffd::{Features, RegisterMode, Uffd, UffdBuilder};

fn ok(test: &str) -> bool {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() || !c.features.contains(Features::POISON) {
        livepage_testutil::skip(test, "no full userfaultfd with UFFDIO_POISON");
        return false;
    }
    true
}

/// Every page distinct and non-zero.
fn content(pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * 4096];
    for (p, page) in v.chunks_mut(4096).enumerate() {
        for (i, w) in page.chunks_mut(8).enumerate() {
            w.copy_from_slice(&((p as u64) << 32 | i as u64 | 1).to_ne_bytes());
        }
    }
    v
}

/// A region registered MISSING on a userfaultfd made here, as a VMM would
/// hand it over, and the one-range map of it.
fn target(pages: usize) -> (Arc<Region>, Uffd, AddressMap) {
    let r = Arc::new(Region::new(MemoryKind::Anon, pages * 4096).unwrap());
    let u = UffdBuilder::new()
        .non_blocking(true)
        .features(Features::EVENT_REMOVE)
        .create()
        .unwrap();
    let map = AddressMap::new(vec![MappedRange {
        addr: r.addr() as u64,
        pages: pages as u64,
        page_size: 4096,
        kind: MemoryKind::Anon,
        fd: 0,
        source_region: 0,
        source_first: 0,
        page_cache: None,
    }])
    .unwrap();
    (r, u, map)
}

/// Counts which pages were read.
struct Counting {
    inner: MemorySource,
    read: Mutex<HashSet<u64>>,
    delay: Duration,
}

impl PageSource for Counting {
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
        std::thread::sleep(self.delay);
        let n = (buf.len() / 4096) as u64;
        self.read.lock().unwrap().extend(first..first + n);
        self.inner.read_pages(r, first, buf, lane)
    }
}

fn whole(r: &Region) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    r.read(0, &mut v).unwrap();
    v
}

#[test]
fn a_resident_set_is_never_fetched_nor_overwritten() {
    if !ok("core_resident") {
        return;
    }
    let pages = 1024;
    let data = content(pages);
    let (r, u, map) = target(pages);
    // Pages 100..300 were pre-copied: in memory before registration, with
    // contents that differ from the source's (a newer version, say).
    let mine = vec![0xa5u8; 200 * 4096];
    r.write(100 * 4096, &mine).unwrap();
    r.register(&u, RegisterMode::MISSING).unwrap();
    let src = Arc::new(Counting {
        inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
        read: Mutex::new(HashSet::new()),
        delay: Duration::ZERO,
    });
    let restore = serve(
        Target::new(vec![u], map).resident(0, 100, 200),
        src.clone(),
        RestoreOptions::default().handlers(2).max_chunk(64 << 10),
    )
    .unwrap();
    let touchers: Vec<_> = (0..3)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..pages {
                    r.read_u64(((i * (2 * t + 1) + t) % pages) * 4096).unwrap();
                }
            })
        })
        .collect();
    for t in touchers {
        t.join().unwrap();
    }
    let stats = restore.wait().unwrap();
    let mut want = data.clone();
    want[100 * 4096..300 * 4096].copy_from_slice(&mine);
    assert!(
        whole(&r) == want,
        "a resident page was overwritten, or a page is wrong"
    );
    let read = src.read.lock().unwrap();
    assert!(
        (100..300).all(|p| !read.contains(&p)),
        "a resident page was fetched"
    );
    assert_eq!(stats.resident, 200, "{stats:?}");
    assert_eq!(
        stats.faults_served + stats.prefetched + stats.resident,
        pages as u64,
        "{stats:?}"
    );
}

#[test]
fn pushed_pages_race_faults_and_discards() {
    if !ok("core_push") {
        return;
    }
    let pages = 2048;
    let data = content(pages);
    let (r, u, map) = target(pages);
    r.register(&u, RegisterMode::MISSING).unwrap();
    // A slow source: pushes and faults overtake its reads.
    let src = Arc::new(Counting {
        inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
        read: Mutex::new(HashSet::new()),
        delay: Duration::from_micros(300),
    });
    let restore = serve(
        Target::new(vec![u], map),
        src,
        RestoreOptions::default()
            .handlers(2)
            .prefetch(Prefetch::None),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let discarded: Arc<Mutex<HashSet<usize>>> = Arc::default();
    // A producer pushes every page, in an order that crosses the others'.
    let mut pusher = restore.pusher();
    let d2 = data.clone();
    let push = std::thread::spawn(move || {
        let mut placed = 0;
        for k in 0..pages {
            let p = (k * 1237) % pages;
            placed += pusher
                .push(0, p as u64, &d2[p * 4096..(p + 1) * 4096])
                .unwrap()
                .placed;
        }
        placed
    });
    // Two threads fault pages in.
    let faulters: Vec<_> = (0..2)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..pages {
                    r.read_u64(((i * 7 + t * 501) % pages) * 4096 + 8).unwrap();
                }
            })
        })
        .collect();
    // A balloon discards pages meanwhile: they must end as zeros, whatever
    // raced them.
    let balloon = {
        let (r, stop, discarded) = (r.clone(), stop.clone(), discarded.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && i < 200 {
                let p = (i * 389 + 11) % pages;
                r.discard(p * 4096, 4096).unwrap();
                discarded.lock().unwrap().insert(p);
                i += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    for f in faulters {
        f.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    balloon.join().unwrap();
    let pushed = push.join().unwrap();
    let stats = restore.wait().unwrap();
    let mut want = data.clone();
    for &p in discarded.lock().unwrap().iter() {
        want[p * 4096..(p + 1) * 4096].fill(0);
    }
    let got = whole(&r);
    let bad: Vec<usize> = (0..pages)
        .filter(|p| got[p * 4096..(p + 1) * 4096] != want[p * 4096..(p + 1) * 4096])
        .collect();
    assert!(
        bad.is_empty(),
        "pages wrong after pushes, faults and discards: {bad:?}"
    );
    assert!(pushed > 0, "no push won a page");
    assert_eq!(stats.pushed, pushed, "{stats:?}");
    // No page placed twice outside discards: pushes skip what is there.
    assert!(
        stats.pushed + stats.faults_served <= pages as u64,
        "{stats:?}"
    );
}

fn tcp_source(server: &PageServer) -> Arc<dyn PageSource> {
    Arc::new(TcpSource::connect(server.addr(), 2, Duration::from_secs(5)).unwrap())
}

#[test]
fn a_source_swapped_mid_restore_serves_the_waiting_faults() {
    if !ok("core_swap") {
        return;
    }
    let pages = 512;
    let data = content(pages);
    let mem: Arc<dyn PageSource> =
        Arc::new(MemorySource::new(vec![data.clone()], &[4096]).unwrap());
    let mut first = PageServer::spawn(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        mem.clone(),
    )
    .unwrap();
    let (r, u, map) = target(pages);
    r.register(&u, RegisterMode::MISSING).unwrap();
    let restore = serve(
        Target::new(vec![u], map),
        tcp_source(&first),
        RestoreOptions::default()
            .prefetch(Prefetch::None)
            .on_source_loss(OnSourceLoss::WaitFor(Duration::from_secs(30))),
    )
    .unwrap();
    for p in 0..10 {
        assert_eq!(r.read(p * 4096, &mut [0u8; 8]).ok(), Some(()));
    }
    // The source host goes away. A fault on a missing page now waits...
    first.shutdown();
    let (r2, d2) = (r.clone(), data.clone());
    let waiter = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        r2.read(300 * 4096, &mut b).unwrap();
        b == d2[300 * 4096..301 * 4096]
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "the fault should wait for a new source"
    );
    // ...while placed pages keep working.
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    r.read(5 * 4096, &mut b).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    // It comes back (another address): the waiting fault is served from it.
    let second =
        PageServer::spawn(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), mem).unwrap();
    restore.replace_source(tcp_source(&second)).unwrap();
    assert!(waiter.join().unwrap(), "the waiting fault got wrong data");
    let stats = restore.wait().unwrap();
    assert!(whole(&r) == data);
    assert_eq!(stats.source_replacements, 1);
    assert_eq!(stats.lost, 0, "{stats:?}");
}

#[test]
fn without_a_new_source_the_deadline_fails_closed() {
    if !ok("core_deadline") {
        return;
    }
    let pages = 256;
    let data = content(pages);
    let mem: Arc<dyn PageSource> = Arc::new(MemorySource::new(vec![data], &[4096]).unwrap());
    let mut server =
        PageServer::spawn(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), mem).unwrap();
    let (r, u, map) = target(pages);
    r.register(&u, RegisterMode::MISSING).unwrap();
    let restore = serve(
        Target::new(vec![u], map),
        tcp_source(&server),
        RestoreOptions::default()
            .prefetch(Prefetch::None)
            .on_source_loss(OnSourceLoss::WaitFor(Duration::from_millis(400))),
    )
    .unwrap();
    r.read(0, &mut [0u8; 8]).unwrap();
    server.shutdown();
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    // Waits for the deadline, then the page is poisoned: an error, not a hang.
    assert!(r.read_checked(100 * 4096, &mut b).is_err());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "failed before the deadline: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Pages placed before stay.
    r.read_checked(0, &mut b).unwrap();
    let res = restore.wait();
    assert!(
        matches!(res, Err(RestoreError::SourceLost { .. })),
        "{res:?}"
    );
}

/// A discard read by the prefetcher (draining events on EAGAIN) must be
/// recorded before the handler serves the faults that follow it: the
/// discarding thread runs on as soon as its event is read, and touches the
/// page again. Every discarded page reads back as zeros.
#[test]
fn a_discard_read_by_the_prefetcher_is_seen_by_the_handler() {
    if !ok("core_discard_drain") {
        return;
    }
    let pages = 8192;
    let data = content(pages);
    for round in 0..4 {
        let (r, u, map) = target(pages);
        r.register(&u, RegisterMode::MISSING).unwrap();
        let src = Arc::new(Counting {
            inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
            read: Mutex::new(HashSet::new()),
            delay: Duration::from_micros(20),
        });
        let restore = serve(
            Target::new(vec![u], map),
            src,
            RestoreOptions::default().max_chunk(64 << 10),
        )
        .unwrap();
        // While the prefetcher sweeps, place a page, discard it, read it.
        for i in 0..400usize {
            let p = (i * 2749 + round * 7) % pages;
            r.read_u64(p * 4096).unwrap();
            r.discard(p * 4096, 4096).unwrap();
            assert_eq!(
                r.read_u64(p * 4096 + 8).unwrap(),
                0,
                "round {round}: page {p} came back with stale data after its discard"
            );
        }
        restore.wait().unwrap();
    }
}

/// A source whose demand reads wait until the test lets them go.
struct Gated {
    inner: MemorySource,
    gate: Mutex<bool>,
    open: std::sync::Condvar,
    entered: AtomicBool,
}

impl PageSource for Gated {
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
        self.entered.store(true, Ordering::SeqCst);
        let mut g = self.gate.lock().unwrap();
        while !*g {
            g = self.open.wait(g).unwrap();
        }
        drop(g);
        self.inner.read_pages(r, first, buf, lane)
    }
}

#[test]
fn a_push_reports_pages_a_waiting_fault_holds_and_done_ranges_follow() {
    if !ok("core_push_busy") {
        return;
    }
    let pages = 64;
    let data = content(pages);
    let (r, u, map) = target(pages);
    r.register(&u, RegisterMode::MISSING).unwrap();
    let src = Arc::new(Gated {
        inner: MemorySource::new(vec![data.clone()], &[4096]).unwrap(),
        gate: Mutex::new(false),
        open: std::sync::Condvar::new(),
        entered: AtomicBool::new(false),
    });
    let restore = serve(
        Target::new(vec![u], map).resident(0, 40, 8),
        src.clone(),
        RestoreOptions::default().prefetch(Prefetch::None),
    )
    .unwrap();
    // A fault on page 5 claims it and waits in the source.
    let faulter = {
        let r = r.clone();
        std::thread::spawn(move || r.read_u64(5 * 4096 + 8).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !src.entered.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the fault never reached the source"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut pusher = restore.pusher();
    let out = pusher.push(0, 4, &data[4 * 4096..7 * 4096]).unwrap();
    assert_eq!(out.placed, 2, "pages 4 and 6 are placed");
    assert_eq!(out.busy, vec![5], "page 5 is held by the waiting fault");
    let done: Vec<_> = restore.done_ranges(0).iter().collect();
    assert_eq!(done, vec![(4, 5), (6, 7), (40, 48)]);
    *src.gate.lock().unwrap() = true;
    src.open.notify_all();
    assert_eq!(
        faulter.join().unwrap(),
        u64::from_ne_bytes(data[5 * 4096 + 8..5 * 4096 + 16].try_into().unwrap())
    );
    let done: Vec<_> = restore.done_ranges(0).iter().collect();
    assert_eq!(done, vec![(4, 7), (40, 48)]);
    // The pusher holds the userfaultfd open: dropped with the restore.
    drop(pusher);
    restore.wait().unwrap();
    // The resident pages were never fetched: never written here, they read
    // as zeros.
    let mut want = data.clone();
    want[40 * 4096..48 * 4096].fill(0);
    assert!(whole(&r) == want);
}
