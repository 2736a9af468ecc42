//! `livepage vm run`: the test VM from the command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use livepage_mem::{MemoryKind, Region};
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{
    RunControl, RunOutcome, TestVm, VmOptions, VmSpec, Workload, checksum, prepare_memory,
};
use serde::Serialize;

use crate::table::Table;

/// Which guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Each vCPU writes every page of its slice once.
    Touch,
    /// Seeded read-modify-writes of random words.
    Dirty,
}

/// Guest memory type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MemoryArg {
    /// Private anonymous memory.
    Anon,
    /// Anonymous memory with transparent huge pages.
    Thp,
    /// memfd (shmem).
    Shmem,
    /// hugetlbfs memfd (2 MiB pages).
    Hugetlb,
}

impl From<MemoryArg> for MemoryKind {
    fn from(m: MemoryArg) -> MemoryKind {
        match m {
            MemoryArg::Anon => MemoryKind::Anon,
            MemoryArg::Thp => MemoryKind::Thp,
            MemoryArg::Shmem => MemoryKind::Shmem,
            MemoryArg::Hugetlb => MemoryKind::Hugetlb,
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM (e.g. 64M, 1G, 16G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Guest program.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Dirty)]
    pub workload: WorkloadKind,
    /// PRNG seed (dirty).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Writes per vCPU (dirty).
    #[arg(long, default_value_t = 200_000)]
    pub iterations: u64,
    /// Guest memory type.
    #[arg(long, value_enum, default_value_t = MemoryArg::Anon)]
    pub memory: MemoryArg,
    /// Take a live snapshot when every vCPU has done this many steps.
    #[arg(long, requires = "snapshot_out")]
    pub snapshot_at: Option<u64>,
    /// Where to write the snapshot image (must not exist).
    #[arg(long, requires = "snapshot_at")]
    pub snapshot_out: Option<std::path::PathBuf>,
    /// Copy-on-write buffer of the live snapshot (0: writers wait for the disk).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub buffer: u64,
    /// Write a checkpoint every this many steps per vCPU: a full image first,
    /// then deltas of the pages written since (async write-protect tracking).
    #[arg(long, requires = "checkpoint_dir", conflicts_with = "snapshot_at")]
    pub checkpoint_every: Option<u64>,
    /// Directory for the checkpoint chain (created; existing images are never overwritten).
    #[arg(long, requires = "checkpoint_every")]
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// How checkpoints find written pages.
    #[arg(long, value_enum, default_value_t = TrackerArg::Auto)]
    pub tracker: TrackerArg,
    /// Threads serving write-protect faults during the snapshot.
    #[arg(long, default_value_t = 1)]
    pub snapshot_handlers: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Background prefetch policy of a lazy restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrefetchArg {
    /// Only demand faults place pages.
    None,
    /// Fill untouched pages in address order, following the latest fault.
    Sequential,
    /// Replay the working set recorded on an earlier restore first
    /// (--working-set), then as sequential.
    Recorded,
}

/// How a lazy restore resolves faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// UFFDIO_COPY into empty memory (any memory type).
    Missing,
    /// Fill the page cache through a second mapping, map with UFFDIO_CONTINUE
    /// (shmem, hugetlb).
    Minor,
}

/// Dirty-tracking backend for checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrackerArg {
    /// The best userfaultfd backend the kernel offers (WP_ASYNC + PAGEMAP_SCAN).
    Auto,
    /// Async write-protect with PAGEMAP_SCAN.
    WpAsync,
    /// Synchronous write-protect with a handler thread.
    SyncWp,
    /// KVM's dirty log (KVM_GET_DIRTY_LOG), what VMMs use today.
    KvmDirtyLog,
}

impl TrackerArg {
    fn backend(self) -> Option<livepage_track::Backend> {
        match self {
            TrackerArg::WpAsync => Some(livepage_track::Backend::WpAsync),
            TrackerArg::SyncWp => Some(livepage_track::Backend::SyncWp),
            _ => None,
        }
    }
}

/// A collect through KVM's dirty log (guest writes only; the VM is paused).
fn kvm_collect(
    vm: &TestVm,
) -> anyhow::Result<(
    Vec<livepage_track::DirtyRegion>,
    livepage_track::CollectStats,
)> {
    let t0 = Instant::now();
    let bitmap = vm.dirty_log()?;
    let mut ranges = livepage_mem::RangeSet::new();
    for (i, w) in bitmap.iter().enumerate() {
        let mut b = *w;
        while b != 0 {
            let bit = b.trailing_zeros() as u64;
            let page = i as u64 * 64 + bit;
            ranges.insert(page * 4096, (page + 1) * 4096);
            b &= b - 1;
        }
    }
    let stats = livepage_track::CollectStats {
        dirty_bytes: ranges.total(),
        ranges: ranges.len(),
        scan_calls: 1,
        duration: t0.elapsed(),
    };
    Ok((vec![livepage_track::DirtyRegion { ranges }], stats))
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The image (with VM state) to continue from.
    pub image: std::path::PathBuf,
    /// Guest memory type (default: the one the image records).
    #[arg(long, value_enum)]
    pub memory: Option<MemoryArg>,
    /// Restore lazily: the vCPUs start at once and pages arrive on first touch
    /// (userfaultfd MISSING mode) while a background stream fills the rest.
    #[arg(long)]
    pub lazy: bool,
    /// With --lazy: missing (any memory) or minor (shmem/hugetlb) faults.
    #[arg(long, value_enum, default_value_t = ModeArg::Missing)]
    pub mode: ModeArg,
    /// With --lazy: prefetch untouched pages in the background.
    #[arg(long, value_enum, default_value_t = PrefetchArg::Sequential)]
    pub prefetch: PrefetchArg,
    /// With --lazy: fault handler threads.
    #[arg(long, default_value_t = 1)]
    pub handlers: usize,
    /// With --lazy: userfaultfds (guest RAM is cut into this many slices).
    #[arg(long, default_value_t = 1)]
    pub uffds: usize,
    /// The working set file read by --prefetch recorded and written by
    /// --record-working-set (default: IMAGE.wset).
    #[arg(long)]
    pub working_set: Option<std::path::PathBuf>,
    /// With --lazy: record the order pages are first faulted into the working set file.
    #[arg(long)]
    pub record_working_set: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `64M`, `1G`, `512MiB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 64M or 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
}

/// Refuses requests this host cannot hold, with the numbers.
pub fn check_memory(spec: &VmSpec, kind: MemoryKind) -> anyhow::Result<()> {
    let total = meminfo("MemTotal:").unwrap_or(u64::MAX);
    let avail = meminfo("MemAvailable:").unwrap_or(u64::MAX);
    // What the guest will really touch: every page for touch, at most one page
    // per write for dirty; shmem and hugetlb need the whole size up front.
    let touched = match spec.workload {
        Workload::Dirty { iterations, .. }
            if matches!(kind, MemoryKind::Anon | MemoryKind::Thp) =>
        {
            (iterations * u64::from(spec.vcpus) * 4096).min(spec.ram)
        }
        _ => spec.ram,
    };
    if spec.ram > total && !matches!(kind, MemoryKind::Anon | MemoryKind::Thp) {
        bail!(
            "guest RAM of {} MiB exceeds this host's {} MiB of memory; ask for less with --mem",
            spec.ram >> 20,
            total >> 20
        );
    }
    if touched > avail {
        bail!(
            "this run would use about {} MiB but only {} MiB are available; ask for less with --mem (or fewer --iterations)",
            touched >> 20,
            avail >> 20
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub mem: u64,
    pub vcpus: u32,
    pub memory: MemoryKind,
    pub workload: String,
    pub seed: Option<u64>,
    pub iterations: Option<u64>,
    pub seconds: f64,
    pub checksum: String,
    pub expected_checksum: String,
    pub matches_reference: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointReport>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointReport {
    pub image: String,
    pub at_steps: Vec<u64>,
    pub parent: Option<String>,
    pub dirty_bytes: u64,
    pub collect_ms: f64,
    /// vCPUs paused: collect, then write the image.
    pub pause_ms: f64,
    pub stats: livepage_track::CheckpointStats,
}

#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub image: String,
    pub at_steps: Vec<u64>,
    /// vCPUs paused: saving their state and arming write-protection.
    pub vcpu_pause_ms: f64,
    pub stats: livepage_snapshot::SnapshotStats,
}

pub fn workload_of(args: &RunArgs) -> Workload {
    match args.workload {
        WorkloadKind::Touch => Workload::Touch,
        WorkloadKind::Dirty => Workload::Dirty {
            seed: args.seed,
            iterations: args.iterations,
        },
    }
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    livepage_testvm::check_host()?;
    let spec = VmSpec {
        ram: args.mem,
        vcpus: args.vcpus,
        workload: workload_of(args),
    };
    livepage_testvm::validate(&spec)?;
    let kind = MemoryKind::from(args.memory);
    check_memory(&spec, kind)?;
    let region =
        Arc::new(Region::new(kind, spec.ram as usize).with_context(|| {
            format!("allocating {} MiB of {kind} guest memory", spec.ram >> 20)
        })?);
    prepare_memory(&region, &spec)?;
    let kvm_log = args.checkpoint_every.is_some() && args.tracker == TrackerArg::KvmDirtyLog;
    let mut vm = TestVm::new(region.clone(), spec, VmOptions { dirty_log: kvm_log })?;
    let slice_pages = livepage_testvm::layout::slice(spec.ram, spec.vcpus, 0).1;
    let total_steps = spec.workload.steps(slice_pages) * u64::from(spec.vcpus);
    let bar = crate::bench::progress(total_steps, "guest steps");
    let t0 = Instant::now();
    let mut snapshot_report = None;
    let mut snapshot = None;
    if let (Some(at), Some(out)) = (args.snapshot_at, &args.snapshot_out) {
        if out.exists() {
            bail!(
                "{} already exists; livepage never writes over an existing image",
                out.display()
            );
        }
        let control = RunControl::new(spec.vcpus, Some(at));
        if run_with_bar(&mut vm, &control, &bar)? == RunOutcome::Paused {
            let paused = Instant::now();
            let state = vm.save()?;
            let opts = livepage_snapshot::SnapshotOptions {
                buffer_bytes: args.buffer as usize,
                handler_threads: args.snapshot_handlers,
                vm_state: Some(state.to_bytes()),
                ..Default::default()
            };
            let snap = livepage_snapshot::start(vec![region.clone()], out, opts)
                .context("starting the live snapshot")?;
            let pause = paused.elapsed();
            snapshot = Some((snap, pause, vm.progress()));
        }
    }
    let mut checkpoints = Vec::new();
    let mut outcome = RunOutcome::Paused;
    if let (Some(every), Some(dir)) = (args.checkpoint_every, &args.checkpoint_dir) {
        if every == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tracker = match args.tracker {
            TrackerArg::KvmDirtyLog => {
                // Start the log from now: the base image covers everything before.
                vm.dirty_log()?;
                None
            }
            t => Some(
                livepage_track::DirtyTracker::start(vec![region.clone()], t.backend())
                    .context("starting dirty tracking")?,
            ),
        };
        let mut parent: Option<livepage_image::ImageId> = None;
        let mut k = 1;
        loop {
            let control = RunControl::new(spec.vcpus, Some(k * every));
            outcome = run_with_bar(&mut vm, &control, &bar)?;
            if outcome == RunOutcome::Finished {
                break;
            }
            let paused = Instant::now();
            let state = vm.save()?.to_bytes();
            let (dirty, cstats) = match tracker.as_mut() {
                Some(t) => t.collect()?,
                None => kvm_collect(&vm)?,
            };
            let path = dir.join(format!("checkpoint-{k:04}.img"));
            let delta = parent.map(|p| (dirty.as_slice(), p));
            let (id, stats) = livepage_track::write_checkpoint(
                std::slice::from_ref(&region),
                delta,
                &path,
                Some(state),
            )
            .with_context(|| format!("writing {}", path.display()))?;
            checkpoints.push(CheckpointReport {
                image: path.display().to_string(),
                at_steps: vm.progress(),
                parent: parent.map(|p| p.to_string()),
                dirty_bytes: cstats.dirty_bytes,
                collect_ms: cstats.duration.as_secs_f64() * 1e3,
                pause_ms: paused.elapsed().as_secs_f64() * 1e3,
                stats,
            });
            parent = Some(id);
            k += 1;
        }
    }
    if outcome != RunOutcome::Finished {
        let control = RunControl::new(spec.vcpus, None);
        outcome = run_with_bar(&mut vm, &control, &bar)?;
    }
    if let Some((snap, pause, at_steps)) = snapshot {
        let stats = snap.wait().context("the live snapshot failed")?;
        snapshot_report = Some(SnapshotReport {
            image: args
                .snapshot_out
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            at_steps,
            vcpu_pause_ms: pause.as_secs_f64() * 1e3,
            stats,
        });
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    if outcome != RunOutcome::Finished {
        bail!("the guest stopped before finishing");
    }
    let sum = checksum(&region, spec.ram)?;
    let want = expected_checksum(spec.workload, spec.ram, spec.vcpus);
    let (seed, iterations) = match spec.workload {
        Workload::Dirty { seed, iterations } => (Some(seed), Some(iterations)),
        _ => (None, None),
    };
    let report = RunReport {
        mem: spec.ram,
        vcpus: spec.vcpus,
        memory: kind,
        workload: format!("{:?}", args.workload).to_lowercase(),
        seed,
        iterations,
        seconds,
        checksum: format!("{sum:016x}"),
        expected_checksum: format!("{want:016x}"),
        matches_reference: sum == want,
        snapshot: snapshot_report,
        checkpoints,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut t = Table::new(["vm run", "value"]);
        t.row([
            "guest RAM".to_string(),
            format!("{} MiB ({kind})", spec.ram >> 20),
        ]);
        t.row(["vCPUs".to_string(), spec.vcpus.to_string()]);
        t.row(["workload".to_string(), report.workload.clone()]);
        if let (Some(s), Some(i)) = (seed, iterations) {
            t.row([
                "seed / iterations".to_string(),
                format!("{s} / {i} per vCPU"),
            ]);
        }
        t.row(["run time".to_string(), format!("{seconds:.2} s")]);
        t.row(["checksum".to_string(), report.checksum.clone()]);
        t.row([
            "host reference".to_string(),
            format!(
                "{} ({})",
                report.expected_checksum,
                if report.matches_reference {
                    "match"
                } else {
                    "MISMATCH"
                }
            ),
        ]);
        if let Some(sr) = &report.snapshot {
            let st = &sr.stats;
            t.row([
                "snapshot".to_string(),
                format!("{} (id {})", sr.image, st.image_id),
            ]);
            t.row(["  taken at steps".to_string(), format!("{:?}", sr.at_steps)]);
            t.row([
                "  vCPU pause".to_string(),
                format!(
                    "{:.2} ms (save state + arm {:.2} ms)",
                    sr.vcpu_pause_ms,
                    st.arm.as_secs_f64() * 1e3
                ),
            ]);
            t.row([
                "  pages".to_string(),
                format!("{} data, {} zero (holes)", st.data_pages, st.zero_pages),
            ]);
            t.row([
                "  saved by".to_string(),
                format!(
                    "writer {}, fault+buffer {}, fault sync {}, fault zero {}",
                    st.by_writer, st.by_fault_buffered, st.by_fault_sync, st.by_fault_zero
                ),
            ]);
            t.row([
                "  peak buffer".to_string(),
                format!(
                    "{} KiB of {} KiB",
                    st.peak_buffer_bytes >> 10,
                    args.buffer >> 10
                ),
            ]);
            t.row([
                "  duration".to_string(),
                format!("{:.2} s", st.duration.as_secs_f64()),
            ]);
        }
        print!("{}", t.render());
        if !report.checkpoints.is_empty() {
            let mut c = Table::new([
                "checkpoint",
                "kind",
                "at steps",
                "dirty",
                "data pages",
                "collect ms",
                "pause ms",
            ]);
            for cp in &report.checkpoints {
                c.row([
                    cp.image.clone(),
                    if cp.parent.is_some() {
                        "delta".to_string()
                    } else {
                        "base".to_string()
                    },
                    format!("{:?}", cp.at_steps),
                    format!("{} KiB", cp.dirty_bytes >> 10),
                    cp.stats.data_pages.to_string(),
                    format!("{:.2}", cp.collect_ms),
                    format!("{:.1}", cp.pause_ms),
                ]);
            }
            print!("\n{}", c.render());
        }
    }
    if !report.matches_reference {
        eprintln!("error: the guest's memory does not match the host reference");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the VM while a progress bar follows the vCPUs' reports.
pub fn run_with_bar(
    vm: &mut TestVm,
    control: &Arc<RunControl>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<RunOutcome> {
    let done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        let monitor = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                bar.set_position(control.total());
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = vm.run(control);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = monitor.join();
        r
    })?;
    Ok(outcome)
}

/// Loads every page of region 0 of the chain into a new region (eager restore).
pub fn load_eager(chain: &livepage_image::Chain, kind: MemoryKind) -> anyhow::Result<Arc<Region>> {
    let desc = chain.head().regions()[0];
    let region = Region::new(kind, desc.len as usize)
        .with_context(|| format!("allocating {} MiB of {kind} memory", desc.len >> 20))?;
    if desc.page_size % region.page_size() as u64 != 0 {
        bail!(
            "the image's {}-byte pages cannot be loaded into {kind} memory",
            desc.page_size
        );
    }
    let mut buf = vec![0u8; desc.page_size as usize];
    let bar = crate::bench::progress(desc.pages(), "loading");
    for p in 0..desc.pages() {
        chain.read_page(0, p, &mut buf)?;
        if buf.iter().any(|b| *b != 0) {
            region.write((p * desc.page_size) as usize, &buf)?;
        }
        if p % 4096 == 0 {
            bar.set_position(p);
        }
    }
    bar.finish_and_clear();
    Ok(Arc::new(region))
}

pub fn resume(args: &ResumeArgs) -> anyhow::Result<ExitCode> {
    livepage_testvm::check_host()?;
    let chain = livepage_image::Chain::open(&args.image)?;
    let img = chain.head();
    let Some(state_bytes) = img.vm_state() else {
        bail!(
            "{} holds no VM state (it is not a snapshot of the test VM)",
            args.image.display()
        );
    };
    let state =
        livepage_testvm::VmState::from_bytes(state_bytes).context("the image's VM state")?;
    if img.regions().len() != 1 || img.regions()[0].len < state.ram {
        bail!(
            "{} does not hold one region of guest RAM of {} bytes",
            args.image.display(),
            state.ram
        );
    }
    let kind = match args.memory {
        Some(m) => MemoryKind::from(m),
        None => livepage_image::kind::memory(img.regions()[0].kind).ok_or_else(|| {
            anyhow::anyhow!(
                "the image records an unknown memory type {}",
                img.regions()[0].kind
            )
        })?,
    };
    let spec = VmSpec {
        ram: state.ram,
        vcpus: state.vcpus.len() as u32,
        workload: state.workload,
    };
    check_memory(&spec, kind)?;
    let t_load = Instant::now();
    let mut lazy = None;
    let mut wset_out = None;
    if !args.lazy && (args.record_working_set || args.prefetch == PrefetchArg::Recorded) {
        bail!("--record-working-set and --prefetch recorded need --lazy");
    }
    let region = if args.lazy {
        let desc = chain.head().regions()[0];
        let region = Arc::new(Region::new(kind, desc.len as usize)?);
        let wset_path = args.working_set.clone().unwrap_or_else(|| {
            let mut p = args.image.clone().into_os_string();
            p.push(".wset");
            p.into()
        });
        let prefetch = match args.prefetch {
            PrefetchArg::None => livepage_restore::Prefetch::None,
            PrefetchArg::Sequential => livepage_restore::Prefetch::Sequential,
            PrefetchArg::Recorded => livepage_restore::Prefetch::Recorded(
                livepage_restore::WorkingSet::load(&wset_path, chain.head().pages())
                    .context("--prefetch recorded")?,
            ),
        };
        let opts = livepage_restore::RestoreOptions {
            mode: match args.mode {
                ModeArg::Missing => livepage_restore::Mode::Missing,
                ModeArg::Minor => livepage_restore::Mode::Minor,
            },
            handlers: args.handlers,
            uffds: args.uffds,
            prefetch,
            record_working_set: args.record_working_set,
            on_stall: Some(Arc::new(|s: &livepage_restore::Stall| {
                eprintln!(
                    "warning: placing {:#x}+{} has taken {} ms ({})",
                    s.addr, s.len, s.waited_ms, s.worker
                )
            })),
            ..Default::default()
        };
        wset_out = args.record_working_set.then_some(wset_path);
        let source: Arc<dyn livepage_restore::PageSource> =
            Arc::new(livepage_restore::ChainSource::new(chain));
        lazy = Some(
            livepage_restore::start(vec![region.clone()], source, opts)
                .context("starting the lazy restore")?,
        );
        region
    } else {
        load_eager(&chain, kind)?
    };
    let load = t_load.elapsed();
    let mut vm = TestVm::restore(region.clone(), &state, VmOptions::default())?;
    let to_run = t_load.elapsed();
    let from = vm.progress();
    let slice_pages = livepage_testvm::layout::slice(spec.ram, spec.vcpus, 0).1;
    let bar = crate::bench::progress(
        spec.workload.steps(slice_pages) * u64::from(spec.vcpus),
        "guest steps",
    );
    let t0 = Instant::now();
    let control = RunControl::new(spec.vcpus, None);
    let ran = run_with_bar(&mut vm, &control, &bar);
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    // A failed restore is the root cause of a guest that then crashed on a
    // lost (poisoned) page: report it first.
    let restore_stats = match lazy {
        Some(r) => match (r.wait(), &ran) {
            (Ok(st), _) => Some(st),
            (Err(e), Err(run)) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the lazy restore failed, and the guest stopped on a page it could not get ({run})"
                )));
            }
            (Err(e), Ok(_)) => return Err(anyhow::Error::new(e).context("the lazy restore failed")),
        },
        None => None,
    };
    if ran? != RunOutcome::Finished {
        bail!("the guest stopped before finishing");
    }
    if let (Some(path), Some(ws)) = (
        &wset_out,
        restore_stats.as_ref().and_then(|s| s.working_set.as_ref()),
    ) {
        ws.save(path)?;
        eprintln!(
            "recorded a working set of {} pages in {}",
            ws.pages.len(),
            path.display()
        );
    }
    let sum = checksum(&region, spec.ram)?;
    let want = expected_checksum(spec.workload, spec.ram, spec.vcpus);
    let out = serde_json::json!({
        "image": args.image.display().to_string(),
        "memory": kind,
        "resumed_from_steps": from,
        "load_seconds": load.as_secs_f64(),
        "lazy": args.lazy,
        "seconds_until_vcpus_run": to_run.as_secs_f64(),
        "restore": restore_stats,
        "run_seconds": seconds,
        "checksum": format!("{sum:016x}"),
        "expected_checksum": format!("{want:016x}"),
        "matches_reference": sum == want,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut t = Table::new(["vm resume", "value"]);
        t.row(["image".to_string(), args.image.display().to_string()]);
        t.row([
            "guest RAM".to_string(),
            format!("{} MiB ({kind}), {} vCPUs", spec.ram >> 20, spec.vcpus),
        ]);
        t.row(["resumed at steps".to_string(), format!("{from:?}")]);
        if let Some(st) = &restore_stats {
            t.row([
                "until the vCPUs run".to_string(),
                format!(
                    "{:.2} ms (memory usable after {:.2} ms, then the VM is created)",
                    to_run.as_secs_f64() * 1e3,
                    load.as_secs_f64() * 1e3
                ),
            ]);
            restore_rows(&mut t, st);
        } else {
            t.row([
                "eager load".to_string(),
                format!("{:.2} s", load.as_secs_f64()),
            ]);
        }
        t.row(["run time".to_string(), format!("{seconds:.2} s")]);
        t.row(["checksum".to_string(), format!("{sum:016x}")]);
        t.row([
            "uninterrupted run".to_string(),
            format!(
                "{want:016x} ({})",
                if sum == want { "match" } else { "MISMATCH" }
            ),
        ]);
        print!("{}", t.render());
    }
    if sum != want {
        eprintln!("error: the resumed guest's memory does not match an uninterrupted run");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The rows of a lazy restore's statistics.
pub fn restore_rows(t: &mut Table, st: &livepage_restore::RestoreStats) {
    t.row([
        "restore".to_string(),
        format!(
            "{:?} mode, {} handler(s) on {} userfaultfd(s)",
            st.mode, st.handlers, st.uffds
        ),
    ]);
    t.row([
        "faults served".to_string(),
        format!(
            "{} (p50 {:.1} µs, p99 {:.1} µs)",
            st.faults_served, st.fault_p50_us, st.fault_p99_us
        ),
    ]);
    t.row([
        "prefetched / zero-filled".to_string(),
        format!("{} / {}", st.prefetched, st.zero_filled),
    ]);
    t.row([
        "zero runs left to the kernel".to_string(),
        format!("{} pages", st.left_to_kernel),
    ]);
    if st.discarded > 0 {
        t.row(["discarded".to_string(), format!("{} pages", st.discarded)]);
    }
    t.row([
        "until fully resident".to_string(),
        format!("{:.1} ms", st.until_resident_ms),
    ]);
    let total: u64 = st.histogram.iter().map(|b| b.count).sum();
    for b in st.histogram.iter().filter(|b| b.count > 0) {
        let bar = "#".repeat(((b.count * 30).div_ceil(total.max(1))) as usize);
        t.row([
            format!("  fault < {} µs", b.below_us),
            format!("{:>7} {bar}", b.count),
        ]);
    }
    if !st.stalls.is_empty() {
        t.row(["stalls (watchdog)".to_string(), st.stalls.len().to_string()]);
    }
}
