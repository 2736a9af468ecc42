//! Live checkpoints are point-in-time images: a writer thread keeps
//! stamping pages (and discarding some) while deltas are saved, and every
//! checkpoint of the chain, read back through its parents, equals a copy of
//! memory taken at its instant. With the buffer forced to zero every early
//! write waits for the disk instead. A property test cuts chains at random
//! instants.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use livepage_image::Chain;
use livepage_mem::{MemoryKind, Region};
use livepage_snapshot::SnapshotOptions;
use livepage_track::{Backend, DirtyTracker, LiveCheckpoints, LiveOptions};
use proptest::prelude::*;

/// A writer thread that can be held still for an instant.
struct Workload {
    region: Arc<Region>,
    pause: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
    writes: AtomicU64,
}

impl Workload {
    fn run(&self, seed: u64, discard_every: u64) {
        let ps = self.region.page_size();
        let pages = (self.region.len() / ps) as u64;
        let mut x = seed | 1;
        let mut n = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            if self.pause.load(Ordering::SeqCst) {
                self.parked.store(true, Ordering::SeqCst);
                while self.pause.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                self.parked.store(false, Ordering::SeqCst);
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly a hot quarter, sometimes anywhere.
            let page = if x % 4 == 0 {
                x % pages
            } else {
                x % pages.div_ceil(4)
            };
            n += 1;
            if discard_every > 0 && n % discard_every == 0 {
                let len = ps * (1 + (x >> 20) as usize % 4);
                let off = (page as usize * ps).min(self.region.len() - len);
                self.region.discard(off, len).unwrap();
            } else {
                let word = (x >> 32) as usize % (ps / 8);
                self.region
                    .write_u64(page as usize * ps + word * 8, n ^ seed)
                    .unwrap();
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn hold(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while !self.parked.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    }

    fn go(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

fn usable(test: &str) -> bool {
    let caps = livepage_uffd::probe::capabilities();
    let ok = caps.access.full() && caps.wp_handover;
    if !ok {
        livepage_testutil::skip(
            test,
            "WP_ASYNC hand-over unavailable (see `livepage probe`)",
        );
    }
    ok
}

struct Plan {
    kind: MemoryKind,
    pages: usize,
    checkpoints: usize,
    buffer_pages: usize,
    discard_every: u64,
    seed: u64,
    /// Microseconds the writer runs between checkpoints.
    gap_us: u64,
}

/// Runs a chain and checks every checkpoint against memory at its instant.
fn chain(plan: &Plan) -> Result<(), TestCaseError> {
    let kind = plan.kind;
    let region = match Region::new(kind, plan.pages * kind.page_size()) {
        Ok(r) => Arc::new(r),
        Err(e) if kind == MemoryKind::Hugetlb => {
            livepage_testutil::skip("live_chain_hugetlb", &e.to_string());
            return Ok(());
        }
        Err(e) => panic!("{e}"),
    };
    region.fill(0, region.len() / 2, 0x5a).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let w = Arc::new(Workload {
        region: region.clone(),
        pause: AtomicBool::new(true),
        parked: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
    });
    let (seed, discard_every) = (plan.seed, plan.discard_every);
    let writer = {
        let w = w.clone();
        std::thread::spawn(move || w.run(seed, discard_every))
    };
    w.hold();
    let mut tracker = DirtyTracker::start(vec![region.clone()], Some(Backend::WpAsync)).unwrap();
    let opts = LiveOptions::default()
        .snapshot(SnapshotOptions::default().buffer_bytes(plan.buffer_pages * kind.page_size()));
    let mut cps = LiveCheckpoints::new(vec![region.clone()], opts);
    prop_assert_eq!(cps.mode(&tracker), "live");
    let mut instants: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for k in 0..plan.checkpoints {
        // The instant: memory as the checkpoint must record it.
        let mut copy = vec![0u8; region.len()];
        region.read(0, &mut copy).unwrap();
        let path = dir.path().join(format!("cp-{k:02}.img"));
        cps.checkpoint(&mut tracker, &path, None).unwrap();
        instants.push((path, copy));
        w.go();
        // Let the writer race the save; hand tracking back once written.
        let until = std::time::Instant::now() + Duration::from_micros(plan.gap_us);
        while std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
            if cps.ready_to_hand_back() {
                w.hold();
                cps.hand_back(&mut tracker).unwrap();
                w.go();
            }
        }
        w.hold();
    }
    cps.finish(&mut tracker).unwrap();
    w.stop.store(true, Ordering::SeqCst);
    w.go();
    writer.join().unwrap();
    let reports = cps.take_reports();
    prop_assert_eq!(reports.len(), plan.checkpoints);
    prop_assert!(w.writes.load(Ordering::Relaxed) > 0);
    let ps = kind.page_size();
    let mut page = vec![0u8; ps];
    for (k, (path, copy)) in instants.iter().enumerate() {
        let chain = Chain::open(path).unwrap();
        prop_assert_eq!(chain.images().len(), k + 1);
        for p in 0..plan.pages {
            chain.read_page(0, p as u64, &mut page).unwrap();
            prop_assert!(
                page[..] == copy[p * ps..(p + 1) * ps],
                "{:?}: checkpoint {} page {} differs from memory at its instant (image {:?}.., memory {:?}..; {:?})",
                kind,
                k,
                p,
                &page[..16],
                &copy[p * ps..p * ps + 16],
                reports[k]
            );
        }
    }
    // Deltas hold what was written, not everything.
    for r in &reports[1..] {
        prop_assert!(r.stats.data_pages + r.stats.zero_pages <= plan.pages as u64);
    }
    Ok(())
}

fn run(kind: MemoryKind, buffer_pages: usize, discard_every: u64) {
    if !usable("live_chain") {
        return;
    }
    let pages = if kind == MemoryKind::Hugetlb { 8 } else { 2048 };
    chain(&Plan {
        kind,
        pages,
        checkpoints: 5,
        buffer_pages,
        discard_every,
        seed: 0x9e37_79b9,
        gap_us: 20_000,
    })
    .unwrap();
}

#[test]
fn live_chain_anon() {
    run(MemoryKind::Anon, 64, 0);
}

#[test]
fn live_chain_thp() {
    run(MemoryKind::Thp, 64, 0);
}

#[test]
fn live_chain_shmem() {
    run(MemoryKind::Shmem, 64, 0);
}

#[test]
fn live_chain_hugetlb() {
    run(MemoryKind::Hugetlb, 2, 0);
}

#[test]
fn live_chain_buffer_full_saves_synchronously() {
    run(MemoryKind::Anon, 0, 0);
}

#[test]
fn live_chain_with_discards_between_checkpoints() {
    run(MemoryKind::Anon, 64, 97);
    run(MemoryKind::Shmem, 64, 97);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// Chains cut at random instants, random buffers, with and without
    /// discards: every delta equals memory at its instant.
    #[test]
    fn chains_cut_at_random_instants(
        seed in any::<u64>(),
        checkpoints in 2usize..6,
        buffer_pages in prop_oneof![Just(0usize), 1usize..8, Just(256)],
        discard_every in prop_oneof![Just(0u64), 50u64..500],
        gap_us in 0u64..15_000,
        kind in prop_oneof![Just(MemoryKind::Anon), Just(MemoryKind::Shmem), Just(MemoryKind::Thp)],
    ) {
        if !usable("chains_cut_at_random_instants") {
            return Ok(());
        }
        chain(&Plan { kind, pages: 512, checkpoints, buffer_pages, discard_every, seed, gap_us })?;
    }
}
