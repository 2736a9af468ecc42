//! `livepage bench snapshot`: live snapshots against fork() and stop-the-world
//! while writer threads dirty new pages at fixed rates.
//!
//! For every write rate (new pages per second per writer; 0 = unthrottled)
//! and every method, the writers first run undisturbed for a second (their
//! baseline rate), then the snapshot is taken while they keep writing:
//! - `livepage N`: writers paused just to arm write-protection, a buffer of N;
//! - `fork`: writers paused for fork(); the child writes the image while the
//!   parent keeps writing (copy-on-write in the kernel);
//! - `stop-the-world`: writers paused while the region is written out.
//!
//! Reported: the pause to arm, the writers' rate during the snapshot relative
//! to undisturbed, per-write stall p50/p99/max (the pause included), peak extra
//! anonymous memory (system-wide AnonPages above the level before), the
//! snapshot's duration (and its ratio to fork's at the same rate) and the
//! bytes it wrote.
//!
//! Before the first row the region is written to a file once, untimed: on
//! this kind of host the first use of that much page cache is slow (the
//! hypervisor backs guest memory on first touch), which otherwise charged
//! whichever method ran first with seconds (13.7 s, then 10.7 and 9.8 s for
//! three identical live rows in one run).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use livepage_mem::{MemoryKind, Region};
use serde::Serialize;

use crate::table::{Table, si, us};

#[derive(Debug, Args)]
pub struct SnapshotBenchArgs {
    /// Region size.
    #[arg(long, default_value = "4G", value_parser = crate::args::parse_size)]
    pub size: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// New pages per second per writer (0 = unthrottled).
    #[arg(long, value_delimiter = ',', default_values_t = [5_000u64, 20_000, 0])]
    pub rates: Vec<u64>,
    /// livepage buffer sizes.
    #[arg(long, value_delimiter = ',', value_parser = crate::args::parse_size, default_values_t = [0u64, 16 << 20, 64 << 20, 256 << 20])]
    pub buffers: Vec<u64>,
    /// Memory type of the region (thp: transparent huge pages, as VMMs back
    /// guest RAM; anon: 4 KiB pages only).
    #[arg(long, value_enum, default_value_t = crate::args::MemoryArg::Thp)]
    pub memory: crate::args::MemoryArg,
    /// Threads arming write-protection (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub arm_threads: usize,
    /// Runs of every method per rate, in rotating order; each row is the
    /// run with the median duration (the disk's pace varies from run to run
    /// on a virtual machine).
    #[arg(long, default_value_t = 1, value_parser = crate::args::at_least_one)]
    pub repeat: usize,
    /// Skip the fork() and stop-the-world peers.
    #[arg(long)]
    pub no_peers: bool,
    /// Directory for the images (each is deleted after its row).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    pub method: String,
    pub rate_per_writer: u64,
    pub pause_ms: f64,
    pub throughput_vs_undisturbed: f64,
    pub undisturbed_pages_per_sec: f64,
    pub stall_p50_us: f64,
    pub stall_p99_us: f64,
    pub stall_max_ms: f64,
    pub peak_extra_mib: f64,
    pub duration_s: f64,
    /// The duration over fork()'s at the same rate (when fork() ran).
    pub duration_vs_fork: Option<f64>,
    pub bytes_written: u64,
    /// Runs of this method at this rate; the row is the median one.
    pub runs: usize,
}

struct Writers {
    region: Arc<Region>,
    n: usize,
    rate: u64,
    pause: AtomicBool,
    paused: AtomicUsize,
    stop: AtomicBool,
    record: AtomicBool,
    count: AtomicU64,
    lat: Mutex<Histogram>,
}

/// Latencies in log-linear buckets (32 per power of two, about 2% wide): a
/// constant amount of memory however many writes are recorded, so the
/// measurement does not inflate the memory it measures.
#[derive(Clone)]
struct Histogram {
    buckets: Vec<u64>,
    max: u64,
    count: u64,
}

impl Histogram {
    const SUB: u32 = 32;
    fn new() -> Self {
        Histogram {
            buckets: vec![0; 64 * Self::SUB as usize],
            max: 0,
            count: 0,
        }
    }
    fn index(ns: u64) -> usize {
        if ns < u64::from(Self::SUB) {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros();
        let shift = exp - Self::SUB.trailing_zeros();
        let sub = (ns >> shift) as u32 - Self::SUB;
        ((shift + 1) * Self::SUB + sub) as usize
    }
    fn lower(i: usize) -> u64 {
        let (i, sub) = (i as u32 / Self::SUB, i as u32 % Self::SUB);
        if i == 0 {
            return u64::from(sub);
        }
        u64::from(Self::SUB + sub) << (i - 1)
    }
    fn add(&mut self, ns: u64) {
        let i = Self::index(ns).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.max = self.max.max(ns);
        self.count += 1;
    }
    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.max = self.max.max(o.max);
        self.count += o.count;
    }
    fn quantile(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::lower(i).min(self.max);
            }
        }
        self.max
    }
}

impl Writers {
    fn run(&self, w: usize) {
        let pages = self.region.pages() / self.n;
        let base = w * pages;
        let mut i = 0usize;
        let mut next = Instant::now();
        let gap = (self.rate > 0).then(|| Duration::from_secs_f64(1.0 / self.rate as f64));
        let mut lat = Histogram::new();
        let mut v = 1u64;
        while !self.stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            let recording = self.record.load(Ordering::Relaxed);
            if self.pause.load(Ordering::SeqCst) {
                self.paused.fetch_add(1, Ordering::SeqCst);
                while self.pause.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                self.paused.fetch_sub(1, Ordering::SeqCst);
            }
            let off = (base + i % pages) * 4096 + 8 * (v as usize % 512);
            v += 1;
            if self.region.write_u64(off & !7, v).is_err() {
                return;
            }
            let stall = t0.elapsed();
            if recording {
                lat.add(stall.as_nanos() as u64);
            } else if lat.count > 0 {
                self.flush(&mut lat);
            }
            self.count.fetch_add(1, Ordering::Relaxed);
            i += 1;
            if let Some(gap) = gap {
                next += gap;
                let now = Instant::now();
                // Behind schedule (a stall, or the host took the CPU): catch up, as a
                // real workload with queued work would, but forget backlog older than 1 s.
                if now.saturating_duration_since(next) > Duration::from_secs(1) {
                    next = now - Duration::from_secs(1);
                }
                while Instant::now() < next {
                    std::hint::spin_loop();
                }
            }
        }
        self.flush(&mut lat);
    }

    fn flush(&self, lat: &mut Histogram) {
        if let Ok(mut l) = self.lat.lock() {
            l.merge(lat);
        }
        *lat = Histogram::new();
    }

    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) < self.n {
            std::hint::spin_loop();
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

fn anon_pages_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("AnonPages:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb << 10)
}

enum Method {
    Livepage(u64),
    Fork,
    StopTheWorld,
}

impl Method {
    fn name(&self) -> String {
        match self {
            Method::Livepage(b) => format!(
                "livepage buffer {}",
                if *b == 0 {
                    "0 (sync)".to_string()
                } else {
                    format!("{} MiB", b >> 20)
                }
            ),
            Method::Fork => "fork()".into(),
            Method::StopTheWorld => "stop-the-world".into(),
        }
    }
}

fn stop_the_world(region: &Region, path: &std::path::Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.set_len(region.len() as u64)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    let mut off = 0;
    while off < region.len() {
        let n = buf.len().min(region.len() - off);
        region.read(off, &mut buf[..n])?;
        for (i, page) in buf[..n].chunks(4096).enumerate() {
            if page.iter().any(|b| *b != 0) {
                f.write_all_at(page, (off + i * 4096) as u64)?;
                written += page.len() as u64;
            }
        }
        off += n;
    }
    f.sync_all()?;
    Ok(written)
}

fn one(
    region: &Arc<Region>,
    args: &SnapshotBenchArgs,
    rate: u64,
    method: &Method,
    path: &std::path::Path,
) -> anyhow::Result<SnapshotRow> {
    let w = Arc::new(Writers {
        region: region.clone(),
        n: args.writers,
        rate,
        pause: AtomicBool::new(false),
        paused: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        record: AtomicBool::new(false),
        count: AtomicU64::new(0),
        lat: Mutex::new(Histogram::new()),
    });
    let threads: Vec<_> = (0..args.writers)
        .map(|i| {
            let w = w.clone();
            std::thread::spawn(move || w.run(i))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (c0, t0) = (w.count.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let base_rate = (w.count.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();

    let base_anon = anon_pages_bytes();
    let peak = Arc::new(AtomicU64::new(base_anon));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(anon_pages_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    w.record.store(true, Ordering::SeqCst);
    let (c_start, t_start) = (w.count.load(Ordering::Relaxed), Instant::now());
    let (pause, bytes) = match method {
        Method::Livepage(buffer) => {
            let prepared = livepage_snapshot::prepare(
                vec![region.clone()],
                path,
                livepage_snapshot::SnapshotOptions::default()
                    .buffer_bytes(*buffer as usize)
                    .arm_threads(args.arm_threads),
            )?;
            w.pause();
            let t = Instant::now();
            let snap = prepared.arm();
            let pause = t.elapsed();
            w.resume();
            let stats = snap?.wait()?;
            (pause, stats.bytes_written)
        }
        Method::Fork => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            f.set_len(region.len() as u64)?;
            w.pause();
            let (pid, pause) = region.fork_dump(std::os::fd::AsFd::as_fd(&f))?;
            w.resume();
            anyhow::ensure!(
                livepage_uffd::reference::wait_child(pid)?,
                "the fork child failed to write the image"
            );
            f.sync_all()?;
            (pause, f.metadata()?.blocks() * 512)
        }
        Method::StopTheWorld => {
            w.pause();
            let t = Instant::now();
            let r = stop_the_world(region, path);
            let pause = t.elapsed();
            w.resume();
            (pause, r?)
        }
    };
    let duration = t_start.elapsed();
    let c_end = w.count.load(Ordering::Relaxed);
    w.record.store(false, Ordering::SeqCst);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    w.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(path);
    let lat = w
        .lat
        .lock()
        .map_err(|_| anyhow::anyhow!("latency log poisoned"))?
        .clone();
    let rate_during = (c_end - c_start) as f64 / duration.as_secs_f64();
    Ok(SnapshotRow {
        method: method.name(),
        rate_per_writer: rate,
        pause_ms: pause.as_secs_f64() * 1e3,
        throughput_vs_undisturbed: rate_during / base_rate.max(1.0),
        undisturbed_pages_per_sec: base_rate,
        stall_p50_us: lat.quantile(0.5) as f64 / 1e3,
        stall_p99_us: lat.quantile(0.99) as f64 / 1e3,
        stall_max_ms: lat.max as f64 / 1e6,
        peak_extra_mib: peak.load(Ordering::Relaxed).saturating_sub(base_anon) as f64
            / (1u64 << 20) as f64,
        duration_s: duration.as_secs_f64(),
        duration_vs_fork: None,
        bytes_written: bytes,
        runs: 1,
    })
}

pub fn run(args: &SnapshotBenchArgs) -> anyhow::Result<Vec<SnapshotRow>> {
    if args.writers == 0 || args.size < (1 << 20) || args.size % 4096 != 0 {
        anyhow::bail!("--writers must be at least 1 and --size at least 1M, a multiple of 4 KiB");
    }
    let caps = livepage_uffd::probe::capabilities();
    if !caps.access.full() {
        anyhow::bail!(
            "no userfaultfd available: {}",
            caps.access.advice().join("; ")
        );
    }
    std::fs::create_dir_all(&args.dir)?;
    let region = Arc::new(Region::new(
        MemoryKind::from(args.memory),
        args.size as usize,
    )?);
    // Populate every page (first touch is slow on this kind of host; not timed).
    let bar = crate::progress::bar(args.size >> 20, "populating");
    let chunk = vec![0x5au8; 1 << 20];
    let mut off = 0;
    while off < region.len() {
        let n = chunk.len().min(region.len() - off);
        region.write(off, &chunk[..n])?;
        off += n;
        bar.set_position((off >> 20) as u64);
    }
    bar.finish_and_clear();
    let warm = args
        .dir
        .join(format!("livepage-bench-warm-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&warm);
    eprintln!(
        "warming the page cache: the region written once to {}, untimed",
        warm.display()
    );
    let warmed = stop_the_world(&region, &warm);
    let _ = std::fs::remove_file(&warm);
    warmed?;
    let mut methods: Vec<Method> = args.buffers.iter().map(|b| Method::Livepage(*b)).collect();
    if !args.no_peers {
        methods.push(Method::Fork);
        methods.push(Method::StopTheWorld);
    }
    let bar = crate::progress::bar(
        (args.rates.len() * methods.len() * args.repeat) as u64,
        "snapshots",
    );
    let mut rows = Vec::new();
    for &rate in &args.rates {
        let mut runs: Vec<Vec<SnapshotRow>> = methods.iter().map(|_| Vec::new()).collect();
        for rep in 0..args.repeat {
            // Rotate the order so that no method always runs first.
            for k in 0..methods.len() {
                let i = (k + rep) % methods.len();
                let path = args
                    .dir
                    .join(format!("livepage-bench-{}.img", std::process::id()));
                let _ = std::fs::remove_file(&path);
                runs[i].push(one(&region, args, rate, &methods[i], &path)?);
                bar.inc(1);
            }
        }
        for mut r in runs {
            r.sort_by(|a, b| a.duration_s.total_cmp(&b.duration_s));
            let n = r.len();
            let mut median = r.swap_remove(n / 2);
            median.runs = n;
            rows.push(median);
        }
    }
    bar.finish_and_clear();
    let fork: Vec<(u64, f64)> = rows
        .iter()
        .filter(|r| r.method == "fork()")
        .map(|r| (r.rate_per_writer, r.duration_s))
        .collect();
    for r in &mut rows {
        r.duration_vs_fork = fork
            .iter()
            .find(|(rate, _)| *rate == r.rate_per_writer)
            .map(|(_, d)| r.duration_s / d);
    }
    Ok(rows)
}

pub fn render(rows: &[SnapshotRow], writers: usize) -> String {
    let mut t = Table::new([
        "rate/writer",
        "method",
        "pause ms",
        "throughput",
        "stall p50 µs",
        "p99 µs",
        "max ms",
        "extra MiB",
        "duration s",
        "vs fork",
        "written",
    ]);
    for r in rows {
        t.row([
            if r.rate_per_writer == 0 {
                "unthrottled".to_string()
            } else {
                format!("{}/s", si(r.rate_per_writer as f64))
            },
            r.method.clone(),
            format!("{:.2}", r.pause_ms),
            format!(
                "{:.0}% of {}/s",
                r.throughput_vs_undisturbed * 100.0,
                si(r.undisturbed_pages_per_sec)
            ),
            format!("{:.1}", r.stall_p50_us),
            format!("{:.1}", r.stall_p99_us),
            format!("{:.2}", r.stall_max_ms),
            format!("{:.0}", r.peak_extra_mib),
            format!("{:.2}", r.duration_s),
            r.duration_vs_fork
                .map_or_else(|| "-".into(), |x| format!("{x:.2}x")),
            format!("{} MiB", r.bytes_written >> 20),
        ]);
    }
    let _ = us;
    format!(
        "{}\n{writers} writer thread(s); throughput = pages/s during the snapshot (pause included) over undisturbed; each row the median-duration run of {}\n",
        t.render(),
        rows.first().map_or(1, |r| r.runs)
    )
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_quantiles_are_within_a_bucket() {
        let mut h = Histogram::new();
        for ns in 1..=100_000u64 {
            h.add(ns);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.04, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max, 100_000);
        assert!(Histogram::lower(Histogram::index(123_456)) <= 123_456);
    }
}
