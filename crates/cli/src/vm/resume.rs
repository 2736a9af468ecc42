//! `livepage vm resume`: continues the test VM from an image, loaded eagerly
//! or lazily, and checks it ends with the same memory as an uninterrupted run.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use livepage_mem::{MemoryKind, Region};
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{RunControl, RunOutcome, TestVm, VmOptions, VmSpec, checksum};

use super::{check_memory, restore_rows, run_with_bar};
use crate::args::{MemoryArg, ModeArg, PrefetchArg, at_least_one};
use crate::table::Table;

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
    /// With --lazy: missing (any memory; the default) or minor
    /// (shmem/hugetlb) faults.
    #[arg(long, value_enum, requires = "lazy")]
    pub mode: Option<ModeArg>,
    /// With --lazy: prefetch untouched pages in the background (default sequential).
    #[arg(long, value_enum, requires = "lazy")]
    pub prefetch: Option<PrefetchArg>,
    /// With --lazy: fault handler threads (default 1).
    #[arg(long, value_parser = at_least_one, requires = "lazy")]
    pub handlers: Option<usize>,
    /// With --lazy: userfaultfds, guest RAM cut into this many slices (default 1).
    #[arg(long, value_parser = at_least_one, requires = "lazy")]
    pub uffds: Option<usize>,
    /// With --lazy: the working set file read by --prefetch recorded and
    /// written by --record-working-set (default: IMAGE.wset).
    #[arg(long, requires = "lazy")]
    pub working_set: Option<std::path::PathBuf>,
    /// With --lazy: record the order pages are first faulted into the working set file.
    #[arg(long, requires = "lazy")]
    pub record_working_set: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn resume(args: &ResumeArgs) -> anyhow::Result<ExitCode> {
    if args.working_set.is_some()
        && args.prefetch != Some(PrefetchArg::Recorded)
        && !args.record_working_set
    {
        bail!(
            "--working-set names the file --prefetch recorded reads or --record-working-set writes; give one of them"
        );
    }
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
    let region = if args.lazy {
        let desc = chain.head().regions()[0];
        let region = Arc::new(Region::new(kind, desc.len as usize)?);
        let wset_path = args.working_set.clone().unwrap_or_else(|| {
            let mut p = args.image.clone().into_os_string();
            p.push(".wset");
            p.into()
        });
        let prefetch = match args.prefetch.unwrap_or(PrefetchArg::Sequential) {
            PrefetchArg::None => livepage_restore::Prefetch::None,
            PrefetchArg::Sequential => livepage_restore::Prefetch::Sequential,
            PrefetchArg::Recorded => livepage_restore::Prefetch::Recorded(
                livepage_restore::WorkingSet::load(&wset_path, chain.head().pages())
                    .context("--prefetch recorded")?,
            ),
        };
        let opts = livepage_restore::RestoreOptions::default()
            .mode(args.mode.unwrap_or(ModeArg::Missing).into())
            .handlers(args.handlers.unwrap_or(1))
            .uffds(args.uffds.unwrap_or(1))
            .prefetch(prefetch)
            .record_working_set(args.record_working_set)
            .on_notice(Arc::new(|n: &livepage_restore::Notice| {
                if let livepage_restore::Notice::Stall(s) = n {
                    eprintln!(
                        "warning: placing {:#x}+{} has taken {} ms ({})",
                        s.addr, s.len, s.waited_ms, s.worker
                    )
                }
            }));
        wset_out = args.record_working_set.then_some(wset_path);
        let source: Arc<dyn livepage_restore::PageSource> =
            Arc::new(livepage_restore::ChainSource::new(chain));
        lazy = Some(
            livepage_restore::start(vec![region.clone()], source, opts)
                .context("starting the lazy restore")?,
        );
        region
    } else {
        let bar = crate::progress::bar(chain.head().pages(), "loading");
        let regions = livepage_restore::load::load(&chain, kind, |done, _| bar.set_position(done))?;
        bar.finish_and_clear();
        regions
            .into_iter()
            .next()
            .context("the image holds no region")?
    };
    let load = t_load.elapsed();
    let mut vm = TestVm::restore(region.clone(), &state, VmOptions::default())?;
    let to_run = t_load.elapsed();
    let from = vm.progress();
    let slice_pages = livepage_testvm::layout::slice(spec.ram, spec.vcpus, 0).1;
    let bar = crate::progress::bar(
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
    // The cause (which image, region, page and file offset) comes first.
    let restore_stats = match lazy {
        Some(r) => match (r.wait(), &ran) {
            (Ok(st), _) => Some(st),
            (Err(e), Err(run)) => {
                bail!("{e}; the guest then stopped on a page it could not get ({run})")
            }
            (Err(e), Ok(_)) => bail!("{e}"),
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
