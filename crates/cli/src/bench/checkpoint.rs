//! `livepage bench track`'s checkpoint rows: one delta checkpoint of a region
//! while a writer keeps writing random pages, three ways:
//!
//! - `live`: the writer pauses for the harvest (and for the hand-back); the
//!   delta is saved while it runs ([`livepage_track::LiveCheckpoints`]);
//! - `paused`: the writer waits until the delta is written (what livepage
//!   did before, and what a tracker without write-protect hand-over does);
//! - `fork()`: the writer pauses for the harvest and fork(); the child
//!   writes the delta's pages while copy-on-write keeps its view.
//!
//! Before each row `--checkpoint-dirty` of the region's pages are written
//! (the delta), with the writer paused. Reported: the writer's longest pause,
//! the time to the delta on disk, the writer's progress from the instant to
//! the delta on disk against its undisturbed rate, and extra memory (the
//! buffer's peak plus bookkeeping for live; the pages copied on write for
//! fork: those the writer touched while the child lived).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, PageBitmap, Region};
use livepage_track::{Backend, DirtyTracker, LiveCheckpoints, LiveOptions, Tracker};
use serde::Serialize;

use crate::table::Table;

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRow {
    pub method: &'static str,
    pub region_bytes: u64,
    pub dirty_fraction: f64,
    pub delta_pages: u64,
    /// The harvest of the pages written since the base.
    pub harvest_ms: f64,
    /// The writer's longest pause.
    pub pause_ms: f64,
    /// From the instant to the delta on disk.
    pub write_ms: f64,
    /// The writer's rate from the instant to the delta on disk, over its
    /// undisturbed rate.
    pub progress_vs_undisturbed: f64,
    pub extra_memory_bytes: u64,
}

/// Random page writes, pausable, with a record of the pages touched.
struct Writer {
    region: Arc<Region>,
    pause: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
    ops: AtomicU64,
    /// Pages written while recording (fork's copies on write).
    touched: PageBitmap,
    record: AtomicBool,
}

impl Writer {
    fn run(&self) -> anyhow::Result<()> {
        let pages = (self.region.len() / 4096) as u64;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while !self.stop.load(Ordering::Relaxed) {
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
            let page = x % pages;
            self.region.write_u64(page as usize * 4096 + 8, x)?;
            if self.record.load(Ordering::Relaxed) {
                self.touched.set(page as usize);
            }
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn hold(&self) -> Instant {
        self.pause.store(true, Ordering::SeqCst);
        while !self.parked.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        Instant::now()
    }

    fn go(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Ops per second over `d`, undisturbed.
    fn rate(&self, d: Duration) -> f64 {
        let a = self.ops.load(Ordering::Relaxed);
        std::thread::sleep(d);
        (self.ops.load(Ordering::Relaxed) - a) as f64 / d.as_secs_f64()
    }
}

/// Writes one word into `fraction` of the pages, spread evenly.
fn dirty(r: &Region, fraction: f64, v: u64) -> anyhow::Result<u64> {
    let pages = r.len() / 4096;
    let n = ((pages as f64 * fraction) as usize).max(1);
    let step = pages as f64 / n as f64;
    for i in 0..n {
        r.write_u64((i as f64 * step) as usize * 4096 + 16, v ^ i as u64)?;
    }
    Ok(n as u64)
}

pub fn rows(
    size: u64,
    fractions: &[f64],
    dir: &std::path::Path,
) -> anyhow::Result<Vec<CheckpointRow>> {
    let mut out = Vec::new();
    for &fraction in fractions {
        for method in ["live", "paused", "fork()"] {
            out.push(one(size, fraction, method, dir)?);
        }
    }
    Ok(out)
}

fn one(
    size: u64,
    fraction: f64,
    method: &'static str,
    dir: &std::path::Path,
) -> anyhow::Result<CheckpointRow> {
    let region = Arc::new(Region::new(MemoryKind::Anon, size as usize)?);
    region.fill(0, region.len(), 1)?;
    let w = Arc::new(Writer {
        region: region.clone(),
        pause: AtomicBool::new(true),
        parked: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        touched: PageBitmap::new(region.len() / 4096),
        record: AtomicBool::new(false),
    });
    let thread = {
        let w = w.clone();
        std::thread::spawn(move || w.run())
    };
    let work = tempfile::tempdir_in(dir)?;
    let result = (|| -> anyhow::Result<CheckpointRow> {
        // Undisturbed: no tracking, no checkpoint, every page populated.
        w.go();
        let undisturbed = w.rate(Duration::from_millis(300));
        w.hold();
        let mut tracker = DirtyTracker::start(vec![region.clone()], Some(Backend::WpAsync))?;
        let live = method == "live";
        let mut cps = LiveCheckpoints::new(
            vec![region.clone()],
            LiveOptions::default()
                .live(live)
                .snapshot(livepage_snapshot::SnapshotOptions::default().buffer_bytes(64 << 20)),
        );
        // The base, then the delta this row measures.
        cps.checkpoint(&mut tracker, &work.path().join("base.img"), None)?;
        cps.finish(&mut tracker)?;
        let delta_pages = dirty(&region, fraction, 7)?;
        let t0 = Instant::now();
        let ops0 = w.ops.load(Ordering::Relaxed);
        let path = work.path().join("delta.img");
        let (pause, extra, written_at, harvest) = if method == "fork()" {
            let (dirty_set, cstats) = tracker.collect()?;
            let ranges: Vec<(usize, usize)> = dirty_set[0]
                .ranges
                .iter()
                .map(|(s, e)| (s as usize, (e - s) as usize))
                .collect();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.set_len(region.len() as u64)?;
            w.record.store(true, Ordering::SeqCst);
            let (pid, _) = region.fork_dump_ranges(std::os::fd::AsFd::as_fd(&f), &ranges)?;
            let pause = t0.elapsed();
            w.go();
            anyhow::ensure!(
                livepage_uffd::reference::wait_child(pid)?,
                "the fork child failed to write the delta"
            );
            f.sync_all()?;
            let done = Instant::now();
            w.record.store(false, Ordering::SeqCst);
            (
                pause,
                w.touched.count() as u64 * 4096,
                done,
                cstats.duration.as_secs_f64() * 1e3,
            )
        } else {
            cps.checkpoint(&mut tracker, &path, None)?;
            let mut pause = t0.elapsed();
            w.go();
            if live {
                while !cps.ready_to_hand_back() {
                    std::thread::sleep(Duration::from_micros(200));
                }
                let t = w.hold();
                cps.hand_back(&mut tracker)?;
                pause = pause.max(t.elapsed());
                w.go();
            }
            cps.finish(&mut tracker)?;
            let done = Instant::now();
            let r = cps
                .take_reports()
                .pop()
                .ok_or_else(|| anyhow::anyhow!("no report"))?;
            // Bookkeeping: two bits per page (claimed, done) and the index's
            // eight bytes per page, besides the buffer's peak.
            let pages = region.len() as u64 / 4096;
            let extra = if live {
                r.stats.peak_buffer_bytes + pages / 4 + pages * 8
            } else {
                pages * 8
            };
            (pause, extra, done, r.collect_ms)
        };
        let elapsed = written_at - t0;
        let ops = w.ops.load(Ordering::Relaxed) - ops0;
        Ok(CheckpointRow {
            method,
            region_bytes: size,
            dirty_fraction: fraction,
            delta_pages,
            harvest_ms: harvest,
            pause_ms: pause.as_secs_f64() * 1e3,
            write_ms: elapsed.as_secs_f64() * 1e3,
            progress_vs_undisturbed: ops as f64 / elapsed.as_secs_f64() / undisturbed.max(1.0),
            extra_memory_bytes: extra,
        })
    })();
    w.stop.store(true, Ordering::SeqCst);
    w.go();
    let _ = thread.join();
    result
}

pub fn render(rows: &[CheckpointRow]) -> String {
    let mut t = Table::new([
        "checkpoint (anon, random writer)",
        "dirty",
        "delta pages",
        "harvest ms",
        "writer pause ms",
        "delta on disk ms",
        "writer progress",
        "extra MiB",
    ]);
    for r in rows {
        t.row([
            format!("{} {} MiB", r.method, r.region_bytes >> 20),
            format!("{:.0}%", r.dirty_fraction * 100.0),
            r.delta_pages.to_string(),
            format!("{:.2}", r.harvest_ms),
            format!("{:.2}", r.pause_ms),
            format!("{:.0}", r.write_ms),
            format!("{:.0}%", r.progress_vs_undisturbed * 100.0),
            format!("{:.1}", r.extra_memory_bytes as f64 / (1 << 20) as f64),
        ]);
    }
    t.render()
}
