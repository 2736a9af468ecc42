//! An in-memory key-value store that checkpoints itself every 200 ms with
//! livepage live checkpoints: a full image first, then deltas of the pages
//! written since, each saved while the store keeps serving writes.
//!
//! The table lives in a livepage `Region` (open addressing, 64-byte slots,
//! 64 MiB), tracked with WP_ASYNC. At each checkpoint the writer is parked
//! only for the harvest; once the delta's pages are saved it is parked again
//! for the few microseconds that give tracking back. At the end every
//! checkpoint is read back through its chain of parents and compared, key by
//! key, with the store's log replayed to that checkpoint's instant.
//!
//! Run: `cargo run --release -p livepage-track --example kvstore_checkpoints`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livepage_image::Chain;
use livepage_mem::{MemoryKind, Region};
use livepage_snapshot::SnapshotOptions;
use livepage_track::{Backend, DirtyTracker, LiveCheckpoints, LiveOptions};

const SLOTS: usize = 1 << 20; // 64 MiB table
const SLOT: usize = 64;
const KEYS: u64 = 400_000;
const CHECKPOINTS: usize = 6;

struct Store {
    table: Arc<Region>,
    pause: AtomicBool,
    parked: AtomicBool,
    ops: AtomicU64,
}

fn hash(k: u64) -> u64 {
    let mut x = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x
}

/// The workload: op n puts key (n * 7919) % KEYS with value n.
fn op(n: u64) -> (u64, u64) {
    ((n * 7919) % KEYS, n)
}

impl Store {
    fn put(&self, key: u64, value: u64) -> Result<(), Box<dyn std::error::Error>> {
        let mut i = hash(key) as usize % SLOTS;
        loop {
            let k = self.table.read_u64(i * SLOT)?;
            if k == 0 || k == key + 1 {
                self.table.write_u64(i * SLOT, key + 1)?;
                self.table.write_u64(i * SLOT + 8, value)?;
                return Ok(());
            }
            i = (i + 1) % SLOTS;
        }
    }

    fn get_in(bytes: &[u8], key: u64) -> Option<u64> {
        let word =
            |off: usize| u64::from_ne_bytes(bytes[off..off + 8].try_into().unwrap_or([0; 8]));
        let mut i = hash(key) as usize % SLOTS;
        loop {
            match word(i * SLOT) {
                0 => return None,
                k if k == key + 1 => return Some(word(i * SLOT + 8)),
                _ => i = (i + 1) % SLOTS,
            }
        }
    }

    /// Parks the writer between two operations; returns the ops done.
    fn hold(&self) -> u64 {
        self.pause.store(true, Ordering::SeqCst);
        while !self.parked.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        self.ops.load(Ordering::SeqCst)
    }

    fn go(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let table = Arc::new(Region::new(MemoryKind::Anon, SLOTS * SLOT)?);
    let store = Arc::new(Store {
        table: table.clone(),
        pause: AtomicBool::new(false),
        parked: AtomicBool::new(false),
        ops: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if store.pause.load(Ordering::SeqCst) {
                    store.parked.store(true, Ordering::SeqCst);
                    while store.pause.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                    store.parked.store(false, Ordering::SeqCst);
                }
                let (k, v) = op(n);
                store.put(k, v).map_err(|e| e.to_string())?;
                n += 1;
                store.ops.store(n, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let dir = std::env::temp_dir().join(format!("livepage-kvcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut tracker = DirtyTracker::start(vec![table.clone()], Some(Backend::WpAsync))?;
    let mut cps = LiveCheckpoints::new(
        vec![table.clone()],
        LiveOptions::default().snapshot(SnapshotOptions::default().buffer_bytes(8 << 20)),
    );
    println!(
        "checkpointing a {} MiB table every 200 ms ({} checkpoints)",
        (SLOTS * SLOT) >> 20,
        cps.mode(&tracker)
    );
    let mut instants = Vec::new();
    for k in 0..CHECKPOINTS {
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let at = store.hold();
        let path = dir.join(format!("store-{k}.img"));
        cps.checkpoint(&mut tracker, &path, None)?;
        store.go();
        let pause = t.elapsed();
        instants.push((path, at, pause));
        // Give tracking back as soon as the delta is saved.
        while cps.writing() && !cps.ready_to_hand_back() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if cps.ready_to_hand_back() {
            store.hold();
            cps.hand_back(&mut tracker)?;
            store.go();
        }
    }
    store.hold();
    cps.finish(&mut tracker)?;
    stop.store(true, Ordering::SeqCst);
    store.go();
    writer.join().map_err(|_| "writer panicked")??;

    // Check every checkpoint against the log replayed to its instant.
    let reports = cps.take_reports();
    let mut bytes = vec![0u8; SLOTS * SLOT];
    let mut failed = 0;
    for ((path, at, pause), r) in instants.iter().zip(&reports) {
        let chain = Chain::open(path)?;
        chain.verify()?;
        for (p, page) in bytes.chunks_mut(4096).enumerate() {
            chain.read_page(0, p as u64, page)?;
        }
        let mut expected = std::collections::HashMap::new();
        for n in 0..*at {
            let (k, v) = op(n);
            expected.insert(k, v);
        }
        let wrong = (0..KEYS)
            .filter(|k| Store::get_in(&bytes, *k) != expected.get(k).copied())
            .count();
        println!(
            "  {} at op {at:>9}: {:>5} ({}), writer paused {:.2} ms, delta {:>6} pages written live in {:.0} ms, {} faults; {} of {} keys differ",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            if r.parent.is_some() { "delta" } else { "base" },
            r.mode,
            pause.as_secs_f64() * 1e3,
            r.stats.data_pages,
            r.write_ms,
            r.stats.faults,
            wrong,
            expected.len(),
        );
        failed += wrong;
    }
    std::fs::remove_dir_all(&dir)?;
    if failed != 0 || reports.len() != CHECKPOINTS {
        return Err("a checkpoint does not match the store at its instant".into());
    }
    println!("  consistent: every checkpoint equals the store as it was at its instant");
    Ok(())
}
