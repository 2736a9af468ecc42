//! `livepage bench track`: the cost of dirty tracking per backend.
//!
//! For each region (populated sizes, and a large MAP_NORESERVE reservation
//! with little populated) and each backend, a writer dirties a fraction of
//! the pages (one write to each, spread over the region), then a collect
//! harvests and re-arms them. Reported: the cost of a tracked first write
//! (the same writes timed again right after, untracked, are subtracted), the
//! collect's duration, and the arming time.

use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use livepage_mem::{MemoryKind, Region};
use livepage_track::{Backend, DirtyTracker, Tracker};
use serde::Serialize;

use crate::table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// WP_ASYNC + PAGEMAP_SCAN.
    WpAsync,
    /// Synchronous write-protect with a handler thread.
    SyncWp,
    /// The old way: mprotect read-only and a SIGSEGV handler (reference).
    Mprotect,
}

impl BackendArg {
    fn backend(self) -> Option<Backend> {
        match self {
            BackendArg::WpAsync => Some(Backend::WpAsync),
            BackendArg::SyncWp => Some(Backend::SyncWp),
            BackendArg::Mprotect => None,
        }
    }
}

/// Either tracker behind one collect call.
enum AnyTracker {
    Uffd(DirtyTracker),
    Mprotect(livepage_uffd::reference::MprotectTracker),
}

impl AnyTracker {
    fn collect(&mut self) -> anyhow::Result<u64> {
        Ok(match self {
            AnyTracker::Uffd(t) => t.collect()?.1.dirty_bytes / 4096,
            AnyTracker::Mprotect(t) => t
                .collect()
                .map_err(|e| {
                    anyhow::anyhow!("mprotect collect failed: {e} (out of VMAs: vm.max_map_count)")
                })?
                .len() as u64,
        })
    }
}

#[derive(Debug, Args)]
pub struct TrackArgs {
    /// Fully populated region sizes.
    #[arg(long, value_delimiter = ',', value_parser = crate::args::parse_size, default_values_t = [1u64 << 30, 4 << 30])]
    pub sizes: Vec<u64>,
    /// A MAP_NORESERVE reservation of this size ...
    #[arg(long, value_parser = crate::args::parse_size, default_value = "1T")]
    pub sparse: u64,
    /// ... with this much populated (spread over it).
    #[arg(long, value_parser = crate::args::parse_size, default_value = "2G")]
    pub sparse_populated: u64,
    /// Spread the sparse region's populated memory in 2 MiB chunks (worst case).
    #[arg(long)]
    pub scatter: bool,
    /// Fractions of the populated pages dirtied between collects.
    #[arg(long, value_delimiter = ',', default_values_t = [0.001f64, 0.01, 0.1])]
    pub fractions: Vec<f64>,
    /// Backends.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [BackendArg::WpAsync, BackendArg::SyncWp, BackendArg::Mprotect])]
    pub backends: Vec<BackendArg>,
    /// Skip the test-VM comparison (which includes KVM's dirty log).
    #[arg(long)]
    pub no_vm: bool,
    /// Region of the checkpoint rows (live delta, paused delta, fork()).
    #[arg(long, value_parser = crate::args::parse_size, default_value = "512M")]
    pub checkpoint_size: u64,
    /// Fractions of that region written between two checkpoints.
    #[arg(long, value_delimiter = ',', default_values_t = [0.01f64, 0.1, 0.5])]
    pub checkpoint_dirty: Vec<f64>,
    /// Skip the checkpoint rows.
    #[arg(long)]
    pub no_checkpoints: bool,
    /// Directory for the checkpoint rows' images (deleted after each row).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: std::path::PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrackRow {
    pub reserved: u64,
    pub populated: u64,
    pub backend: String,
    pub fraction: f64,
    pub pages_dirtied: u64,
    pub arm_ms: f64,
    /// Extra cost of a tracked first write, in µs.
    pub write_cost_us: f64,
    pub collect_ms: f64,
    pub pages_reported: u64,
    /// Why the collect failed, if it did (mprotect runs out of VMAs).
    pub error: Option<String>,
}

/// Offsets of the populated 4 KiB pages: contiguous for a full region, or
/// 1 GiB blocks spread evenly over a sparse one (guest RAM in a large
/// reservation). The walk's cost follows the page-table pages that exist, so
/// `--scatter` instead spreads 2 MiB chunks as widely as possible: the worst case.
fn populated_pages(reserved: u64, populated: u64, scatter: bool) -> Vec<usize> {
    let chunk = if scatter {
        2u64 << 20
    } else {
        (1u64 << 30).min(populated)
    };
    let chunks = populated / chunk;
    let stride = (reserved / chunks.max(1)) / chunk * chunk;
    (0..chunks)
        .flat_map(|c| (0..chunk / 4096).map(move |p| (c * stride + p * 4096) as usize))
        .collect()
}

fn time_writes(r: &Region, offs: &[usize], v: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    for &o in offs {
        r.write_u64(o, v)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(args: &TrackArgs) -> anyhow::Result<Vec<TrackRow>> {
    let caps = livepage_uffd::probe::capabilities();
    if !caps.access.full() {
        anyhow::bail!(
            "no userfaultfd available: {}",
            caps.access.advice().join("; ")
        );
    }
    let mut cases: Vec<(u64, u64)> = args.sizes.iter().map(|s| (*s, *s)).collect();
    if args.sparse > 0 {
        cases.push((args.sparse, args.sparse_populated));
    }
    let bar = crate::progress::bar(
        (cases.len() * args.backends.len() * args.fractions.len()) as u64,
        "track",
    );
    let mut rows = Vec::new();
    for (reserved, populated) in cases {
        let region = Arc::new(Region::new(MemoryKind::Anon, reserved as usize)?);
        let pages = populated_pages(reserved, populated, args.scatter && reserved != populated);
        for &o in &pages {
            region.write_u64(o, 1)?;
        }
        for &b in &args.backends {
            let t = Instant::now();
            let mut tracker = match b.backend() {
                Some(backend) => {
                    AnyTracker::Uffd(DirtyTracker::start(vec![region.clone()], Some(backend))?)
                }
                None => AnyTracker::Mprotect(
                    region
                        .mprotect_tracker()
                        .map_err(|e| anyhow::anyhow!("mprotect tracking: {e}"))?,
                ),
            };
            let arm_ms = t.elapsed().as_secs_f64() * 1e3;
            for &f in &args.fractions {
                let n = ((pages.len() as f64 * f) as usize).max(1);
                let step = pages.len() / n;
                let dirty: Vec<usize> =
                    pages.iter().step_by(step.max(1)).take(n).copied().collect();
                let tracked = time_writes(&region, &dirty, 2)?;
                let again = time_writes(&region, &dirty, 3)?;
                let t = Instant::now();
                let (reported, error) = match tracker.collect() {
                    Ok(n) => (n, None),
                    Err(e) => (0, Some(e.to_string())),
                };
                let collect = t.elapsed().as_secs_f64();
                rows.push(TrackRow {
                    reserved,
                    populated,
                    backend: format!("{b:?}"),
                    fraction: f,
                    pages_dirtied: dirty.len() as u64,
                    arm_ms,
                    write_cost_us: (tracked - again).max(0.0) / dirty.len() as f64 * 1e6,
                    collect_ms: collect * 1e3,
                    pages_reported: reported,
                    error,
                });
                bar.inc(1);
                if rows.last().is_some_and(|r| r.error.is_some()) {
                    // The range is left partly read-only: later fractions would not mean much.
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

fn gib(b: u64) -> String {
    if b >= 1 << 40 {
        format!("{} TiB", b >> 40)
    } else {
        format!("{} GiB", b >> 30)
    }
}

pub fn render(rows: &[TrackRow]) -> String {
    let mut t = Table::new([
        "reserved",
        "populated",
        "backend",
        "dirty",
        "pages",
        "arm ms",
        "µs per tracked write",
        "collect ms",
        "reported",
    ]);
    for r in rows {
        t.row([
            gib(r.reserved),
            gib(r.populated),
            r.backend.clone(),
            format!("{}%", r.fraction * 100.0),
            r.pages_dirtied.to_string(),
            format!("{:.1}", r.arm_ms),
            format!("{:.2}", r.write_cost_us),
            format!("{:.2}", r.collect_ms),
            r.error
                .clone()
                .map_or(r.pages_reported.to_string(), |e| format!("FAILED: {e}")),
        ]);
    }
    t.render()
}

/// One row of the test-VM comparison: the guest's run time with collects
/// every `every` steps through one tracker, against no tracking.
#[derive(Debug, Clone, Serialize)]
pub struct VmTrackRow {
    pub tracker: String,
    pub run_seconds: f64,
    pub slowdown: f64,
    pub collects: usize,
    pub mean_collect_ms: f64,
    pub mean_dirty_kib: f64,
}

/// The guest dirties memory through KVM; every tracker, KVM's dirty log
/// included, sees the same writes.
pub fn run_vm(json: bool) -> anyhow::Result<Vec<VmTrackRow>> {
    use livepage_testvm::{RunControl, RunOutcome, TestVm, VmOptions, VmSpec, Workload};
    livepage_testvm::check_host()?;
    let spec = VmSpec {
        ram: 256 << 20,
        vcpus: 2,
        workload: Workload::Dirty {
            seed: 3,
            iterations: 60_000,
        },
    };
    let every = 6_000;
    let mut rows: Vec<VmTrackRow> = Vec::new();
    // The first run of a process pays for fresh host memory: warm up untimed.
    // Each tracker then runs twice (in turn, so drift spreads) and keeps its best.
    let order = [
        "warm-up",
        "none",
        "wp-async",
        "sync-wp",
        "kvm-dirty-log",
        "none",
        "wp-async",
        "sync-wp",
        "kvm-dirty-log",
    ];
    for tracker in order {
        let region = Arc::new(Region::new(MemoryKind::Anon, spec.ram as usize)?);
        livepage_testvm::prepare_memory(&region, &spec)?;
        let mut vm = TestVm::new(
            region.clone(),
            spec,
            VmOptions {
                dirty_log: tracker == "kvm-dirty-log",
            },
        )?;
        // Every tracker behind the one trait.
        let mut tracking: Option<Box<dyn Tracker>> = match tracker {
            "wp-async" => Some(Box::new(DirtyTracker::start(
                vec![region.clone()],
                Some(Backend::WpAsync),
            )?)),
            "sync-wp" => Some(Box::new(DirtyTracker::start(
                vec![region.clone()],
                Some(Backend::SyncWp),
            )?)),
            "kvm-dirty-log" => Some(Box::new(livepage_track::KvmDirtyLog::start(Box::new(
                vm.dirty_log_reader(),
            ))?)),
            _ => None,
        };
        let (mut collect_s, mut dirty, mut n) = (0.0, 0u64, 0usize);
        let t0 = Instant::now();
        let mut k = 1;
        loop {
            let stop = (tracker != "none" && tracker != "warm-up").then_some(k * every);
            if vm.run(&RunControl::new(spec.vcpus, stop))? == RunOutcome::Finished {
                break;
            }
            let t = Instant::now();
            if let Some(t) = tracking.as_mut() {
                dirty += t.collect()?.1.dirty_bytes;
            }
            collect_s += t.elapsed().as_secs_f64();
            n += 1;
            k += 1;
        }
        let run = t0.elapsed().as_secs_f64();
        if tracker == "warm-up" {
            continue;
        }
        if let Some(prev) = rows.iter_mut().find(|r| r.tracker == tracker) {
            if run < prev.run_seconds {
                prev.run_seconds = run;
            }
            continue;
        }
        rows.push(VmTrackRow {
            tracker: tracker.into(),
            run_seconds: run,
            slowdown: 0.0,
            collects: n,
            mean_collect_ms: if n > 0 {
                collect_s / n as f64 * 1e3
            } else {
                0.0
            },
            mean_dirty_kib: if n > 0 {
                dirty as f64 / n as f64 / 1024.0
            } else {
                0.0
            },
        });
    }
    let _ = json;
    let base = rows.first().map_or(1.0, |r| r.run_seconds);
    for r in &mut rows {
        r.slowdown = r.run_seconds / base;
    }
    Ok(rows)
}

/// `livepage bench track`: the region rows, then (unless `--no-vm`) the
/// test VM's rows, as tables or one JSON document.
pub fn main(args: &TrackArgs) -> anyhow::Result<std::process::ExitCode> {
    let rows = run(args)?;
    let vm_rows = if args.no_vm {
        Vec::new()
    } else {
        run_vm(args.json)?
    };
    if args
        .checkpoint_dirty
        .iter()
        .any(|f| !(*f > 0.0 && *f <= 1.0))
    {
        anyhow::bail!("--checkpoint-dirty takes fractions in (0, 1], e.g. 0.01,0.1,0.5");
    }
    let cp_rows = if args.no_checkpoints {
        Vec::new()
    } else {
        super::checkpoint::rows(args.checkpoint_size, &args.checkpoint_dirty, &args.dir)?
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"regions": rows, "test_vm": vm_rows, "checkpoints": cp_rows})
            )?
        );
    } else {
        print!("{}", render(&rows));
        if !vm_rows.is_empty() {
            print!("\n{}", render_vm(&vm_rows));
        }
        if !cp_rows.is_empty() {
            print!("\n{}", super::checkpoint::render(&cp_rows));
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub fn render_vm(rows: &[VmTrackRow]) -> String {
    let mut t = Table::new([
        "tracker (test VM, 2 vCPUs, 256 MiB)",
        "guest run s",
        "vs untracked",
        "collects",
        "mean collect ms",
        "mean dirty KiB",
    ]);
    for r in rows {
        t.row([
            r.tracker.clone(),
            format!("{:.2}", r.run_seconds),
            format!("{:.2}x", r.slowdown),
            r.collects.to_string(),
            format!("{:.2}", r.mean_collect_ms),
            format!("{:.0}", r.mean_dirty_kib),
        ]);
    }
    t.render()
}
