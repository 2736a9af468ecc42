//! An in-memory key-value store that persists itself with a livepage live
//! snapshot instead of fork().
//!
//! The table lives in a livepage `Region` (open addressing, 64-byte slots).
//! A writer thread keeps putting keys. To persist, the store:
//! 1. `prepare`s a snapshot (image file, userfaultfd, buffer) while writes go on;
//! 2. pauses the writer for the instant and `arm`s write-protection;
//! 3. lets the writer go on at once, while livepage streams the table to disk
//!    and copies pages the writer touches into a bounded buffer first.
//!
//! Unlike fork(), the extra memory is bounded by the buffer (here 8 MiB), and
//! the writer never stops for the disk while the buffer has room. At the end
//! the example loads the image back and checks it holds exactly the table as
//! it was at the instant.
//!
//! Run: `cargo run --release -p livepage-snapshot --example kvstore`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use livepage_image::Image;
use livepage_mem::{MemoryKind, Region};
use livepage_snapshot::{SnapshotOptions, prepare};

const SLOTS: usize = 1 << 20; // 64 MiB table
const SLOT: usize = 64;

/// The store: a region holding the table, and a pause switch for the instant.
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

impl Store {
    /// put(key, value): linear probing; a slot is (key+1, value, 6 spare words).
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
}

/// The workload: op n puts key (n * 7919) % 400_000 with value n.
fn op(n: u64) -> (u64, u64) {
    ((n * 7919) % 400_000, n)
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
    std::thread::sleep(std::time::Duration::from_millis(300));

    let dir = std::env::temp_dir().join(format!("livepage-kvstore-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("store.img");
    // 1. Prepare while the writer runs.
    let prepared = prepare(
        vec![table.clone()],
        &path,
        SnapshotOptions::default().buffer_bytes(8 << 20),
    )?;
    // 2. The instant: park the writer, arm, release it.
    store.pause.store(true, Ordering::SeqCst);
    while !store.parked.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let t = Instant::now();
    let instant_ops = store.ops.load(Ordering::SeqCst);
    let snapshot = prepared.arm()?;
    store.pause.store(false, Ordering::SeqCst);
    let pause = t.elapsed();
    // 3. Writes go on while the image is written.
    let stats = snapshot.wait()?;
    let after_ops = store.ops.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.join().map_err(|_| "writer panicked")??;

    println!(
        "snapshot of a {} MiB table at op {instant_ops}: writer paused {:.2} ms",
        (SLOTS * SLOT) >> 20,
        pause.as_secs_f64() * 1e3
    );
    println!(
        "  {} ops ran during the snapshot; {} pages saved by the writer, {} copied on write into the buffer (peak {} KiB of 8192), {} written synchronously",
        after_ops - instant_ops,
        stats.by_writer,
        stats.by_fault_buffered,
        stats.peak_buffer_bytes >> 10,
        stats.by_fault_sync
    );

    // Check: the image is exactly the table after `instant_ops` operations.
    let img = Image::open(&path)?;
    img.verify()?;
    let mut bytes = vec![0u8; SLOTS * SLOT];
    for (p, chunk) in bytes.chunks_mut(4096).enumerate() {
        img.read_page(0, p as u64, chunk)?;
    }
    let mut expected = std::collections::HashMap::new();
    for n in 0..instant_ops {
        let (k, v) = op(n);
        expected.insert(k, v);
    }
    let mut mismatches = 0;
    for k in 0..400_000u64 {
        if Store::get_in(&bytes, k) != expected.get(&k).copied() {
            mismatches += 1;
        }
    }
    println!(
        "  image {} holds {} keys; {} differ from the store at the instant",
        img.id(),
        expected.len(),
        mismatches
    );
    std::fs::remove_dir_all(&dir)?;
    if mismatches != 0 {
        return Err("the image does not match the store at the snapshot instant".into());
    }
    println!("  consistent: the image equals the store as it was at the instant");
    Ok(())
}
