//! `livepage bench faults`: the demand-paging rate of the kernel layer.
//!
//! Faulting threads write to every page of their slice of a registered region
//! once; handler threads resolve the faults (MISSING + UFFDIO_COPY on anon,
//! MINOR + UFFDIO_CONTINUE on shmem). Each configuration runs twice over the
//! same region: once with the handler loop written against `livepage_uffd::Uffd`
//! and once with the same loop over naked `read(2)`/`ioctl(2)` calls
//! (`livepage_uffd::reference`). The ratio is the cost of the safe layer.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use livepage_mem::{MemoryKind, Region};
use livepage_uffd::mm::{Advice, pin_current_thread};
use livepage_uffd::poll::poll_readable;
use livepage_uffd::{
    CopyMode, Event, EventBuffer, Features, RegisterMode, Resolved, Uffd, UffdBuilder, reference,
    sys,
};
use serde::Serialize;

use super::percentile;
use crate::table::{Table, si, us};

const PAGE: usize = 4096;

/// How handler threads wait for faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Blocking read(2) on a blocking fd (handlers start on another CPU than the faulting thread).
    Read,
    /// poll(2), then a non-blocking read.
    Poll,
    /// Non-blocking reads in a spin loop.
    Busy,
    /// Blocking read, handlers and faulting threads pinned to one CPU.
    SameCpu,
}

/// Which fault path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Private anon, MISSING mode, UFFDIO_COPY of a prototype page.
    AnonCopy,
    /// memfd/shmem filled through an alias, MINOR mode, UFFDIO_CONTINUE.
    ShmemContinue,
}

#[derive(Debug, Args)]
pub struct FaultsArgs {
    /// Faulting thread counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4, 8])]
    pub threads: Vec<usize>,
    /// Handler thread counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub handlers: Vec<usize>,
    /// Handler strategies.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Strategy::Read, Strategy::Poll, Strategy::Busy, Strategy::SameCpu])]
    pub strategies: Vec<Strategy>,
    /// Fault paths.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Path::AnonCopy, Path::ShmemContinue])]
    pub paths: Vec<Path>,
    /// Pages faulted per run (split across faulting threads).
    #[arg(long, default_value_t = 2048)]
    pub pages: usize,
    /// Runs of each implementation per configuration, in alternating order (the median counts).
    #[arg(long, default_value_t = 12)]
    pub reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RunStats {
    pub pages_per_sec: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub path: Path,
    pub strategy: Strategy,
    pub faulting_threads: usize,
    pub handler_threads: usize,
    pub livepage: RunStats,
    pub raw_libc: RunStats,
    /// livepage pages/s divided by raw-libc pages/s.
    pub ratio: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Safe,
    Raw,
}

/// One configuration's region and userfaultfd, reused by every run.
struct Setup {
    region: Region,
    uffd: Uffd,
    path: Path,
    strategy: Strategy,
    pages: usize,
    sentinels: usize,
    proto: Vec<u8>,
}

fn fatal(msg: String) -> ! {
    eprintln!("error: bench faults: {msg}");
    std::process::exit(1)
}

impl Setup {
    fn new(path: Path, strategy: Strategy, pages: usize, handlers: usize) -> anyhow::Result<Setup> {
        let nonblocking = matches!(strategy, Strategy::Poll | Strategy::Busy);
        let (kind, features, mode) = match path {
            Path::AnonCopy => (MemoryKind::Anon, Features::empty(), RegisterMode::MISSING),
            Path::ShmemContinue => (
                MemoryKind::Shmem,
                Features::MINOR_SHMEM,
                RegisterMode::MINOR,
            ),
        };
        let uffd = UffdBuilder::new()
            .non_blocking(nonblocking)
            .features(features)
            .create()?;
        let region = Region::new(kind, (pages + handlers) * PAGE)?;
        if path == Path::ShmemContinue {
            // The page cache holds every page; only the mapping is missing.
            let chunk = vec![0xabu8; 1 << 20];
            let mut off = 0;
            while off < region.len() {
                let n = chunk.len().min(region.len() - off);
                region.write_alias(off, &chunk[..n])?;
                off += n;
            }
        }
        region.register(&uffd, mode)?;
        Ok(Setup {
            region,
            uffd,
            path,
            strategy,
            pages,
            sentinels: handlers,
            proto: vec![0xabu8; PAGE],
        })
    }

    fn sentinel_start(&self) -> usize {
        self.region.addr() + self.pages * PAGE
    }

    /// One run; returns (pages/s, per-fault latencies in ns).
    fn run(self: &Arc<Self>, threads: usize, handlers: usize, imp: Impl) -> (f64, Vec<u64>) {
        // Make every page fault again (the registration stays).
        if let Err(e) = self.region.advise(0, self.region.len(), Advice::DontNeed) {
            fatal(e.to_string());
        }
        // Placement is part of the strategy: same-cpu puts everything on CPU 0;
        // the others spread faulting threads over the CPUs and start the handlers
        // on the next CPU, so a run does not depend on where the scheduler happened
        // to put the threads.
        let cpus = livepage_uffd::mm::online_cpus();
        let same = self.strategy == Strategy::SameCpu;
        let handler_cpu = move |h: usize| if same { 0 } else { (h + 1) % cpus };
        let faulter_cpu = move |t: usize| if same { 0 } else { t % cpus };
        let handler_threads: Vec<_> = (0..handlers)
            .map(|h| {
                let s = self.clone();
                std::thread::spawn(move || {
                    let _ = pin_current_thread(handler_cpu(h));
                    match imp {
                        Impl::Safe => s.serve_safe(),
                        Impl::Raw => s.serve_raw(),
                    }
                })
            })
            .collect();
        let start = Arc::new(Barrier::new(threads + 1));
        let per = self.pages / threads;
        let faulters: Vec<_> = (0..threads)
            .map(|t| {
                let (s, start) = (self.clone(), start.clone());
                std::thread::spawn(move || {
                    let _ = pin_current_thread(faulter_cpu(t));
                    let mut lat = Vec::with_capacity(per);
                    start.wait();
                    for p in t * per..(t + 1) * per {
                        let t0 = Instant::now();
                        if let Err(e) = s.region.write_u64(p * PAGE, p as u64) {
                            fatal(e.to_string());
                        }
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    lat
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let mut lat: Vec<u64> = Vec::with_capacity(self.pages);
        for f in faulters {
            lat.extend(
                f.join()
                    .unwrap_or_else(|_| fatal("a faulting thread died".into())),
            );
        }
        let elapsed = t0.elapsed();
        // Each sentinel fault stops exactly one handler.
        for i in 0..self.sentinels {
            if let Err(e) = self.region.write_u64((self.pages + i) * PAGE, 1) {
                fatal(e.to_string());
            }
        }
        for h in handler_threads {
            if h.join().is_err() {
                fatal("a handler thread died".into());
            }
        }
        (
            (per * threads) as f64 / elapsed.as_secs_f64().max(1e-9),
            lat,
        )
    }

    /// The handler loop over the safe layer.
    fn serve_safe(&self) {
        let u = &self.uffd;
        let sentinel = self.sentinel_start();
        let mut buf = EventBuffer::new(32);
        loop {
            if self.strategy == Strategy::Poll {
                if let Err(e) = poll_readable([std::os::fd::AsFd::as_fd(u)], -1) {
                    fatal(format!("poll: {e}"));
                }
            }
            let events = u
                .read_events(&mut buf)
                .unwrap_or_else(|e| fatal(e.to_string()));
            let mut any = false;
            let mut stop = false;
            for ev in events {
                any = true;
                let Event::PageFault(pf) = ev else { continue };
                let addr = pf.address as usize & !(PAGE - 1);
                let r = match self.path {
                    Path::AnonCopy => u.copy(addr, &self.proto, CopyMode::default()),
                    Path::ShmemContinue => u.continue_range(addr, PAGE, false, false),
                };
                match r {
                    Ok(Resolved::All) => {}
                    Ok(Resolved::AlreadyPresent) => {
                        if let Err(e) = u.wake(addr, PAGE) {
                            fatal(e.to_string());
                        }
                    }
                    Ok(other) => fatal(format!("unexpected outcome {other:?} at {addr:#x}")),
                    Err(e) => fatal(e.to_string()),
                }
                stop |= addr >= sentinel;
            }
            if stop {
                return;
            }
            if !any && self.strategy == Strategy::Busy {
                std::hint::spin_loop();
            }
        }
    }

    /// The same loop as C would write it.
    fn serve_raw(&self) {
        let fd = std::os::fd::AsFd::as_fd(&self.uffd);
        let sentinel = self.sentinel_start() as u64;
        let mut msgs = [sys::uffd_msg::default(); 32];
        loop {
            if self.strategy == Strategy::Poll {
                let _ = poll_readable([fd], -1);
            }
            let n = reference::read_msgs(fd, &mut msgs);
            if n < 0 {
                let e = reference::errno();
                if e == libc_eagain() || e == libc_eintr() {
                    if self.strategy == Strategy::Busy {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                fatal(format!("read: errno {e}"));
            }
            let mut stop = false;
            for m in &msgs[..n as usize / std::mem::size_of::<sys::uffd_msg>()] {
                if m.event != sys::event::PAGEFAULT {
                    continue;
                }
                let addr = m.arg[1] & !(PAGE as u64 - 1);
                let (r, _) = match self.path {
                    Path::AnonCopy => self.region.bare_copy(fd, addr, &self.proto),
                    Path::ShmemContinue => self.region.bare_continue(fd, addr, PAGE as u64),
                };
                if r < 0 {
                    let e = reference::errno();
                    if e != libc_eexist() {
                        fatal(format!("ioctl: errno {e}"));
                    }
                    reference::wake(fd, addr, PAGE as u64);
                }
                stop |= addr >= sentinel;
            }
            if stop {
                return;
            }
        }
    }
}

// errno values, named without a libc dependency in the CLI.
fn libc_eagain() -> i32 {
    livepage_uffd::Errno::AGAIN.0
}
fn libc_eintr() -> i32 {
    livepage_uffd::Errno::INTR.0
}
fn libc_eexist() -> i32 {
    livepage_uffd::Errno::EXIST.0
}

/// Rates and latencies of both implementations for one configuration.
#[derive(Default)]
struct Samples {
    rates: [Vec<f64>; 2],
    lats: [Vec<u64>; 2],
}

impl Samples {
    fn measure(
        &mut self,
        setup: &Arc<Setup>,
        threads: usize,
        handlers: usize,
        reps: usize,
        bar: &indicatif::ProgressBar,
    ) {
        for rep in 0..reps {
            let order = if rep % 2 == 0 {
                [Impl::Raw, Impl::Safe]
            } else {
                [Impl::Safe, Impl::Raw]
            };
            for imp in order {
                let (rate, lat) = setup.run(threads, handlers, imp);
                let i = usize::from(imp == Impl::Safe);
                self.rates[i].push(rate);
                self.lats[i].extend(lat);
                bar.inc(1);
            }
        }
    }

    /// (raw, safe) statistics.
    fn stats(&mut self) -> (RunStats, RunStats) {
        let mut one = |i: usize| {
            self.rates[i].sort_by(f64::total_cmp);
            self.lats[i].sort_unstable();
            RunStats {
                pages_per_sec: self.rates[i][self.rates[i].len() / 2],
                p50_ns: percentile(&self.lats[i], 0.5),
                p99_ns: percentile(&self.lats[i], 0.99),
            }
        };
        (one(0), one(1))
    }
}

pub fn run(args: &FaultsArgs) -> anyhow::Result<Vec<Row>> {
    if args.threads.iter().chain(&args.handlers).any(|n| *n == 0)
        || args.pages == 0
        || args.reps == 0
    {
        anyhow::bail!("thread counts, --pages and --reps must be at least 1");
    }
    let caps = livepage_uffd::probe::capabilities();
    if !caps.access.full() {
        anyhow::bail!(
            "no userfaultfd available: {}",
            caps.access.advice().join("; ")
        );
    }
    let mut configs = Vec::new();
    for &path in &args.paths {
        for &strategy in &args.strategies {
            for &h in &args.handlers {
                for &t in &args.threads {
                    configs.push((path, strategy, h, t));
                }
            }
        }
    }
    let bar = crate::progress::bar((configs.len() * args.reps * 2) as u64, "faults");
    let mut rows = Vec::new();
    for (path, strategy, handlers, threads) in configs {
        let pages = args.pages / threads * threads;
        let setup = Arc::new(Setup::new(path, strategy, pages, handlers)?);
        // Warm up: first touch of fresh memory is slow on this kind of host.
        setup.run(threads, handlers, Impl::Raw);
        // Many short runs in alternating order; the median rate and the latency
        // percentiles over every fault, so neither drift nor the odd lucky or
        // unlucky run decides a row. A row whose ratio lands outside ±5% is
        // measured again with three times the runs (in both directions, so the
        // re-measurement cannot only ever help one side), all samples pooled.
        let mut samples = Samples::default();
        samples.measure(&setup, threads, handlers, args.reps, &bar);
        let (mut raw, mut safe) = samples.stats();
        let ratio = safe.pages_per_sec / raw.pages_per_sec.max(1e-9);
        if !(0.95..=1.05).contains(&ratio) {
            bar.inc_length((6 * args.reps) as u64);
            samples.measure(&setup, threads, handlers, 3 * args.reps, &bar);
            (raw, safe) = samples.stats();
        }
        rows.push(Row {
            path,
            strategy,
            faulting_threads: threads,
            handler_threads: handlers,
            livepage: safe,
            raw_libc: raw,
            ratio: safe.pages_per_sec / raw.pages_per_sec.max(1e-9),
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    bar.finish_and_clear();
    Ok(rows)
}

pub fn render(rows: &[Row]) -> String {
    let mut t = Table::new([
        "path",
        "strategy",
        "faulting",
        "handlers",
        "livepage pages/s",
        "p50 µs",
        "p99 µs",
        "raw libc pages/s",
        "p50 µs",
        "p99 µs",
        "ratio",
    ]);
    for r in rows {
        t.row([
            format!("{:?}", r.path).to_lowercase(),
            format!("{:?}", r.strategy).to_lowercase(),
            r.faulting_threads.to_string(),
            r.handler_threads.to_string(),
            si(r.livepage.pages_per_sec),
            us(r.livepage.p50_ns),
            us(r.livepage.p99_ns),
            si(r.raw_libc.pages_per_sec),
            us(r.raw_libc.p50_ns),
            us(r.raw_libc.p99_ns),
            format!("{:.2}", r.ratio),
        ]);
    }
    let min = rows.iter().map(|r| r.ratio).fold(f64::INFINITY, f64::min);
    let geo = (rows.iter().map(|r| r.ratio.ln()).sum::<f64>() / rows.len().max(1) as f64).exp();
    format!(
        "{}\nratio = livepage / raw libc pages/s; min {min:.2}, geometric mean {geo:.2}\n",
        t.render()
    )
}
