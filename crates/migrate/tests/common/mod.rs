//! A guest for migration tests: threads doing a deterministic stream of
//! writes into a region (op n writes n+1 into a word chosen by n), which
//! can be paused (its state: the next op) and continued elsewhere. After
//! every op ran, the memory equals the reference whatever ran where.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use livepage_mem::{MemoryKind, Region};
use livepage_migrate::{Guest, HookError};

/// Where op `n` writes, in a region of `pages` 4 KiB pages; a hot set of
/// `hot` pages takes most writes, like a real working set.
pub fn op(n: u64, pages: u64, hot: u64) -> usize {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    let page = if x % 4 == 0 {
        (x >> 8) % pages
    } else {
        (x >> 8) % hot.min(pages)
    };
    (page * 4096 + (n % 512) * 8) as usize
}

/// The memory after ops `[0, n)`.
pub fn reference(n: u64, pages: u64, hot: u64) -> Vec<u8> {
    let mut v = vec![0u8; (pages * 4096) as usize];
    for i in 0..n {
        let o = op(i, pages, hot);
        v[o..o + 8].copy_from_slice(&(i + 1).to_ne_bytes());
    }
    v
}

/// Ops run on a region by one thread, at most `rate` per second (0: free).
pub struct Writer {
    pub region: Arc<Region>,
    pub next: Arc<AtomicU64>,
    pub total: u64,
    pub pages: u64,
    pub hot: u64,
    pub rate: u64,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    pub fn new(region: Arc<Region>, start: u64, total: u64, hot: u64, rate: u64) -> Arc<Writer> {
        let pages = (region.len() / 4096) as u64;
        Arc::new(Writer {
            region,
            next: Arc::new(AtomicU64::new(start)),
            total,
            pages,
            hot,
            rate,
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
        })
    }

    pub fn run(self: &Arc<Self>) {
        self.stop.store(false, Ordering::SeqCst);
        let w = self.clone();
        let t = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let n0 = w.next.load(Ordering::SeqCst);
            loop {
                let n = w.next.load(Ordering::SeqCst);
                if n >= w.total || w.stop.load(Ordering::SeqCst) {
                    break;
                }
                let o = op(n, w.pages, w.hot);
                w.region.write_u64(o, n + 1).unwrap();
                w.next.store(n + 1, Ordering::SeqCst);
                if w.rate > 0 && n % 64 == 0 {
                    let due = Duration::from_secs_f64((n + 1 - n0) as f64 / w.rate as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        });
        *self.thread.lock().unwrap() = Some(t);
    }

    pub fn pause(&self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().unwrap();
        }
        self.next.load(Ordering::SeqCst)
    }

    pub fn wait(&self) {
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().unwrap();
        }
    }
}

/// The source's guest hooks over a writer.
pub struct Hooks(pub Arc<Writer>);

impl Guest for Hooks {
    fn pause(&mut self) -> Result<Vec<u8>, HookError> {
        Ok(self.0.pause().to_le_bytes().to_vec())
    }
    fn resume(&mut self) -> Result<(), HookError> {
        self.0.run();
        Ok(())
    }
}

pub fn whole(r: &Region) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    r.read(0, &mut v).unwrap();
    v
}

pub fn region(kind: MemoryKind, pages: u64) -> Arc<Region> {
    Arc::new(Region::new(kind, (pages * 4096) as usize).unwrap())
}

/// The first page where `a` and `b` differ.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y)
}
