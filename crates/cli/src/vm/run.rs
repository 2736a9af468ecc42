//! `livepage vm run`: runs the test VM to the end and checks its memory
//! against the host reference; optionally takes a live snapshot or
//! incremental checkpoints on the way.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use livepage_mem::{MemoryKind, Region};
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{
    RunControl, RunOutcome, TestVm, VmOptions, VmSpec, Workload, checksum, prepare_memory,
};
use livepage_track::Tracker;
use serde::Serialize;

use super::{check_memory, run_with_bar};
use crate::args::{MemoryArg, TrackerArg, WorkloadKind, at_least_one, parse_size};
use crate::table::Table;

/// The live snapshot's buffer when `--buffer` is not given.
pub const DEFAULT_BUFFER: u64 = 64 << 20;

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
    /// Copy-on-write buffer of the live snapshot or of each live checkpoint
    /// (default 64M; 0: writers wait for the disk). Taken as it is used.
    #[arg(long, value_parser = parse_size)]
    pub buffer: Option<u64>,
    /// Write a checkpoint every this many steps per vCPU: a full image first,
    /// then deltas of the pages written since (async write-protect tracking).
    #[arg(long, requires = "checkpoint_dir", conflicts_with = "snapshot_at")]
    pub checkpoint_every: Option<u64>,
    /// How checkpoints are saved: `live` (the vCPUs pause only for the
    /// harvest; the delta is written while they run) or `paused` (they wait
    /// for the whole write).
    #[arg(long, value_enum, default_value_t = CheckpointMode::Live, requires = "checkpoint_every")]
    pub checkpoint_mode: CheckpointMode,
    /// Directory for the checkpoint chain (created; existing images are never overwritten).
    #[arg(long, requires = "checkpoint_every")]
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Keep only the last N checkpoints resumable: older deltas are folded
    /// into their parents in the background (write, fsync, rename).
    #[arg(long, requires = "checkpoint_every")]
    pub keep: Option<std::num::NonZeroUsize>,
    /// How checkpoints and migration rounds find written pages (default: auto).
    #[arg(long, value_enum)]
    pub tracker: Option<TrackerArg>,
    /// Threads serving write-protect faults during the snapshot or a live
    /// checkpoint (default 1).
    #[arg(long, value_parser = at_least_one)]
    pub snapshot_handlers: Option<usize>,
    #[command(flatten)]
    pub migrate: super::migrate::MigrateArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
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
    pub checkpoints: Vec<super::checkpoint::CheckpointReport>,
    /// Folds made to keep `--keep N` checkpoints.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<livepage_image::FoldReport>,
    /// Folds that failed (each left every checkpoint intact).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retention_errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationReport>,
}

#[derive(Debug, Serialize)]
pub struct MigrationReport {
    pub to: String,
    pub at_steps: Vec<u64>,
    /// Steps per vCPU when the guest paused for the switchover.
    pub paused_at_steps: Vec<u64>,
    /// Whether the VM now runs at the destination.
    pub migrated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<livepage_migrate::SourceReport>,
}

/// How `vm run` saves checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointMode {
    /// The vCPUs pause only for the harvest; the delta is written while they run.
    Live,
    /// The vCPUs wait until the delta is written.
    Paused,
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
    let slice_pages = livepage_testvm::layout::slice(spec.ram, spec.vcpus, 0).1;
    let steps = spec.workload.steps(slice_pages);
    if let Some(at) = args.snapshot_at {
        if at == 0 || at >= steps {
            bail!(
                "--snapshot-at {at} is never reached: each vCPU runs {steps} steps (give 1 to {})",
                steps - 1
            );
        }
    }
    args.migrate.check()?;
    if args.tracker.is_some()
        && args.checkpoint_every.is_none()
        && args.migrate.migrate_to.is_none()
    {
        bail!(
            "--tracker chooses how --checkpoint-every or --migrate-to find written pages; give one of them"
        );
    }
    if let Some(at) = args.migrate.migrate_at {
        if at == 0 || at >= steps {
            bail!(
                "--migrate-at {at} is never reached: each vCPU runs {steps} steps (give 1 to {})",
                steps - 1
            );
        }
    }
    if (args.buffer.is_some() || args.snapshot_handlers.is_some())
        && args.snapshot_at.is_none()
        && args.checkpoint_every.is_none()
    {
        bail!(
            "--buffer and --snapshot-handlers apply to --snapshot-at or --checkpoint-every; give one of them"
        );
    }
    if let Some(every) = args.checkpoint_every {
        if every == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
        if every >= steps {
            bail!(
                "--checkpoint-every {every} takes no checkpoint: each vCPU runs {steps} steps (give 1 to {})",
                steps - 1
            );
        }
    }
    let region =
        Arc::new(Region::new(kind, spec.ram as usize).with_context(|| {
            format!("allocating {} MiB of {kind} guest memory", spec.ram >> 20)
        })?);
    prepare_memory(&region, &spec)?;
    let tracker_arg = args.tracker.unwrap_or(TrackerArg::Auto);
    // Migration rounds of the test VM use KVM's dirty log unless told
    // otherwise: every write is the guest's, and it costs the guest least.
    let migrating = args.migrate.migrate_to.is_some();
    let kvm_log = (args.checkpoint_every.is_some() && tracker_arg == TrackerArg::KvmDirtyLog)
        || (migrating && matches!(tracker_arg, TrackerArg::KvmDirtyLog | TrackerArg::Auto));
    let mut vm = TestVm::new(region.clone(), spec, VmOptions { dirty_log: kvm_log })?;
    let total_steps = steps * u64::from(spec.vcpus);
    let bar = crate::progress::bar(total_steps, "guest steps");
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
        if run_with_bar(&mut vm, &control, &bar)? == RunOutcome::Finished {
            bail!(
                "the guest finished before --snapshot-at {at}: vCPUs report progress every {} steps, so give a step that is reached before the end",
                livepage_testvm::guest::PROGRESS_EVERY
            );
        }
        {
            let paused = Instant::now();
            let state = vm.save()?;
            let opts = livepage_snapshot::SnapshotOptions::default()
                .buffer_bytes(args.buffer.unwrap_or(DEFAULT_BUFFER) as usize)
                .handler_threads(args.snapshot_handlers.unwrap_or(1))
                .vm_state(Some(state.to_bytes()));
            let snap = livepage_snapshot::start(vec![region.clone()], out, opts)
                .context("starting the live snapshot")?;
            let pause = paused.elapsed();
            snapshot = Some((snap, pause, vm.progress()));
        }
    }
    if let (Some(to), Some(at)) = (args.migrate.migrate_to, args.migrate.migrate_at) {
        let control = RunControl::new(spec.vcpus, Some(at));
        if run_with_bar(&mut vm, &control, &bar)? == RunOutcome::Finished {
            bail!("the guest finished before --migrate-at {at}");
        }
        bar.finish_and_clear();
        let at_steps = vm.progress();
        let track: livepage_migrate::TrackerFactory = match tracker_arg {
            TrackerArg::KvmDirtyLog | TrackerArg::Auto => {
                let reader = vm.dirty_log_reader();
                Box::new(move || {
                    Ok(
                        Box::new(livepage_track::KvmDirtyLog::start(Box::new(reader))?)
                            as Box<dyn Tracker>,
                    )
                })
            }
            t => {
                let r = region.clone();
                Box::new(move || {
                    Ok(
                        Box::new(livepage_track::DirtyTracker::start(vec![r], t.backend())?)
                            as Box<dyn Tracker>,
                    )
                })
            }
        };
        let out = super::migrate::migrate(vm, region.clone(), track, &args.migrate)?;
        let migrated = out.result.is_ok();
        let (error, report) = match out.result {
            Ok(r) => (None, Some(r)),
            Err(e) => (Some(format!("{:#}", anyhow::Error::from(e))), None),
        };
        let m = MigrationReport {
            to: to.to_string(),
            at_steps,
            paused_at_steps: out.paused_at.clone(),
            migrated,
            error,
            report,
        };
        return super::migrate::report(args, spec, &region, t0, m, out.finished_here.is_some());
    }
    let mut checkpoints = super::checkpoint::Checkpoints::default();
    let mut outcome = RunOutcome::Paused;
    if let (Some(every), Some(dir)) = (args.checkpoint_every, &args.checkpoint_dir) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // The log (or the tracker) starts from now: the base image covers before.
        let mut tracker: Box<dyn Tracker> = match tracker_arg {
            TrackerArg::KvmDirtyLog => Box::new(livepage_track::KvmDirtyLog::start(Box::new(
                vm.dirty_log_reader(),
            ))?),
            t => Box::new(
                livepage_track::DirtyTracker::start(vec![region.clone()], t.backend())
                    .context("starting dirty tracking")?,
            ),
        };
        let plan = super::checkpoint::Plan {
            every,
            dir,
            live: args.checkpoint_mode == CheckpointMode::Live,
            buffer: args.buffer.unwrap_or(DEFAULT_BUFFER),
            handlers: args.snapshot_handlers.unwrap_or(1),
            keep: args.keep,
        };
        let (o, cps) = super::checkpoint::run(&mut vm, &region, tracker.as_mut(), &plan, &bar)?;
        outcome = o;
        checkpoints = cps;
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
        checkpoints: checkpoints.list,
        folds: checkpoints.folds,
        retention_errors: checkpoints.retention_errors,
        migration: None,
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
                    args.buffer.unwrap_or(DEFAULT_BUFFER) >> 10
                ),
            ]);
            t.row([
                "  duration".to_string(),
                format!("{:.2} s", st.duration.as_secs_f64()),
            ]);
        }
        print!("{}", t.render());
        if !report.checkpoints.is_empty() {
            print!("\n{}", super::checkpoint::table(&report.checkpoints));
        }
        if !report.folds.is_empty() {
            print!("\n{}", super::checkpoint::folds_table(&report.folds));
        }
    }
    if let Some(e) = report.retention_errors.first() {
        eprintln!(
            "error: {} fold(s) failed, so more than --keep checkpoints remain (each one intact): {e}",
            report.retention_errors.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if !report.matches_reference {
        eprintln!("error: the guest's memory does not match the host reference");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
