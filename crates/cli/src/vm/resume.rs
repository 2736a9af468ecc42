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
    /// With a store address and --lazy: the host's chunk cache, shared by
    /// every restore on it (default $LIVEPAGE_CHUNK_CACHE, else
    /// ~/.cache/livepage/chunks).
    #[arg(long, requires = "lazy")]
    pub chunk_cache: Option<std::path::PathBuf>,
    /// With a store address and --lazy: no chunk cache.
    #[arg(long, requires = "lazy", conflicts_with = "chunk_cache")]
    pub no_chunk_cache: bool,
    /// With a store address: the chunk cache's bound in MiB (least recently
    /// used chunks go; default 4096).
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
    pub chunk_cache_mib: Option<u64>,
    #[command(flatten)]
    pub store: crate::store::StoreArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where the image comes from.
enum Opened {
    Local(livepage_image::Chain),
    Store(livepage_store::StoreImage),
}

impl Opened {
    fn regions(&self) -> Vec<(u64, u32)> {
        match self {
            Opened::Local(c) => c.head().regions().iter().map(|r| (r.len, r.kind)).collect(),
            Opened::Store(i) => i
                .manifest()
                .regions
                .iter()
                .map(|r| (r.len, r.kind))
                .collect(),
        }
    }

    fn pages(&self) -> u64 {
        match self {
            Opened::Local(c) => c.head().pages(),
            Opened::Store(i) => i.manifest().pages(),
        }
    }
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
    let remote = crate::store::is_store_image(&args.image);
    if !remote
        && (args.chunk_cache.is_some() || args.no_chunk_cache || args.chunk_cache_mib.is_some())
    {
        bail!(
            "--chunk-cache, --no-chunk-cache and --chunk-cache-mib apply to an image in a store (dir:// or s3://)"
        );
    }
    args.store.only_for_stores(&args.image)?;
    if remote
        && args.working_set.is_none()
        && (args.record_working_set || args.prefetch == Some(PrefetchArg::Recorded))
    {
        bail!(
            "an image in a store has no file beside it for the working set: name one with --working-set"
        );
    }
    livepage_testvm::check_host()?;
    // The clock runs from before the image is opened: for a store, the
    // manifest and VM state fetches count.
    let t_load = Instant::now();
    let opened = if remote {
        if args.lazy {
            Opened::Store(crate::store::open_image_manifest(&args.image, &args.store)?)
        } else {
            Opened::Store(crate::store::open_image(&args.image, &args.store)?)
        }
    } else {
        Opened::Local(livepage_image::Chain::open(&args.image)?)
    };
    let state_bytes = match &opened {
        Opened::Local(c) => c.head().vm_state().map(<[u8]>::to_vec),
        Opened::Store(i) => i.vm_state()?,
    };
    let Some(state_bytes) = state_bytes else {
        bail!(
            "{} holds no VM state (it is not a snapshot of the test VM)",
            args.image.display()
        );
    };
    let state =
        livepage_testvm::VmState::from_bytes(&state_bytes).context("the image's VM state")?;
    let regions = opened.regions();
    if regions.len() != 1 || regions[0].0 < state.ram {
        bail!(
            "{} does not hold one region of guest RAM of {} bytes",
            args.image.display(),
            state.ram
        );
    }
    let kind = match args.memory {
        Some(m) => MemoryKind::from(m),
        None => livepage_image::kind::memory(regions[0].1).ok_or_else(|| {
            anyhow::anyhow!("the image records an unknown memory type {}", regions[0].1)
        })?,
    };
    let spec = VmSpec {
        ram: state.ram,
        vcpus: state.vcpus.len() as u32,
        workload: state.workload,
    };
    check_memory(&spec, kind)?;
    let mut lazy = None;
    let mut wset_out = None;
    let mut from_store = None;
    let region = if args.lazy {
        let region = Arc::new(Region::new(kind, regions[0].0 as usize)?);
        let wset_path = args.working_set.clone().unwrap_or_else(|| {
            let mut p = args.image.clone().into_os_string();
            p.push(".wset");
            p.into()
        });
        let prefetch = match args.prefetch.unwrap_or(PrefetchArg::Sequential) {
            PrefetchArg::None => livepage_restore::Prefetch::None,
            PrefetchArg::Sequential => livepage_restore::Prefetch::Sequential,
            PrefetchArg::Recorded => livepage_restore::Prefetch::Recorded(
                livepage_restore::WorkingSet::load(&wset_path, opened.pages())
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
        let source: Arc<dyn livepage_restore::PageSource> = match opened {
            Opened::Local(chain) => Arc::new(livepage_restore::ChainSource::new(chain)),
            Opened::Store(img) => {
                let cache = if args.no_chunk_cache {
                    None
                } else {
                    Some(crate::store::cache(
                        args.chunk_cache.as_deref(),
                        args.chunk_cache_mib.unwrap_or(4096),
                    )?)
                };
                let s = Arc::new(livepage_store::StoreSource::new(img, cache));
                from_store = Some(s.clone());
                s
            }
        };
        let restore = livepage_restore::start(vec![region.clone()], source, opts)
            .context("starting the lazy restore")?;
        if let Some(s) = &from_store {
            s.attach(restore.pusher());
        }
        lazy = Some(restore);
        region
    } else {
        let bar = crate::progress::bar(opened.pages(), "loading");
        let region = match &opened {
            Opened::Local(chain) => {
                livepage_restore::load::load(chain, kind, |done, _| bar.set_position(done))?
                    .into_iter()
                    .next()
                    .context("the image holds no region")?
            }
            Opened::Store(img) => crate::store::load(img, kind, |done| bar.set_position(done))?,
        };
        bar.finish_and_clear();
        region
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
        "store": from_store.as_ref().map(|s| s.stats()),
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
            if let Some(s) = &from_store {
                let st = s.stats();
                t.row([
                    "chunks".to_string(),
                    format!(
                        "{} from the store ({:.1} MiB, {:.0} ms), {} from the host cache",
                        st.from_store,
                        st.fetched_bytes as f64 / (1 << 20) as f64,
                        st.fetch_ms,
                        st.from_cache
                    ),
                ]);
            }
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
