//! `livepage vm receive`: the destination of a test VM's live migration.
//! Waits for a source, receives the VM, runs it to the end here and checks
//! its final memory against the host reference.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use livepage_mem::{MemoryKind, Region};
use livepage_migrate::dest::{DestOptions, Listening};
use livepage_migrate::{DestMode, DestReport, ProgressView};
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{RunControl, RunOutcome, TestVm, VmOptions, VmState, checksum};
use serde::Serialize;

use crate::args::{MemoryArg, ModeArg, at_least_one};
use crate::migration::{Bars, LinkArgs, dest_rows, source_rows};
use crate::table::Table;

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to listen on (e.g. 10.0.0.2:7070; port 0 picks one, printed).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Guest memory type here.
    #[arg(long, value_enum, default_value_t = MemoryArg::Anon)]
    pub memory: MemoryArg,
    /// How post-copy pages are placed: missing (any memory; stale pages are
    /// dropped before the guest resumes) or minor (shmem/hugetlb: the guest
    /// resumes at once and stale pages are asked for as it touches them).
    #[arg(long, value_enum, default_value_t = ModeArg::Missing)]
    pub mode: ModeArg,
    /// Fault handler threads.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub handlers: usize,
    /// Steps (writes) per second per vCPU while pages still arrive (the
    /// guest runs free once every page is here); default: free.
    #[arg(long)]
    pub write_rate: Option<u64>,
    #[command(flatten)]
    pub link: LinkArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct ReceiveReport {
    migration: String,
    source: String,
    memory: MemoryKind,
    mem: u64,
    vcpus: usize,
    checksum: String,
    expected_checksum: String,
    matches_reference: bool,
    /// vCPUs running here until they finished, in ms.
    run_ms: f64,
    /// Steps (all vCPUs) when the guest resumed here, and when every page
    /// was resident.
    steps_at_resume: u64,
    steps_when_resident: u64,
    migration_report: DestReport,
}

pub fn receive(args: &ReceiveArgs) -> anyhow::Result<ExitCode> {
    livepage_testvm::check_host()?;
    let kind = MemoryKind::from(args.memory);
    let mode = match args.mode {
        ModeArg::Missing => DestMode::Missing,
        ModeArg::Minor => DestMode::Minor,
    };
    if mode == DestMode::Minor && !kind.has_page_cache() {
        bail!(
            "--mode minor places pages in the page cache: use --memory shmem or --memory hugetlb"
        );
    }
    let security = args.link.server()?;
    let progress = Arc::new(ProgressView::default());
    let opts = DestOptions::new(security)
        .mode(mode)
        .handlers(args.handlers)
        .recovery_timeout(args.link.recovery())
        .on_refused(Arc::new(|e| eprintln!("refused a peer: {e}")))
        .progress(progress.clone());
    let listening = Listening::bind(args.listen, opts)?;
    let addr = listening
        .local_addr()
        .context("the listening socket has no address")?;
    eprintln!("listening on {addr}");
    // SIGINT/SIGTERM while waiting: stop waiting and exit; later, the
    // migration is dropped (the source keeps or resumes the guest).
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let Some(incoming) = listening.accept(Some(&stop))? else {
        eprintln!("signal: stopped waiting for a source");
        return Ok(ExitCode::from(130));
    };
    let shapes = incoming.regions().to_vec();
    if shapes.len() != 1 {
        incoming.refuse("a test VM has one region of guest RAM");
        bail!(
            "the source migrates {} regions; a test VM has one",
            shapes.len()
        );
    }
    if shapes[0].page_size != kind.page_size() as u64 {
        let why = format!(
            "the source's pages are {} bytes; {kind} memory here has {}-byte pages",
            shapes[0].page_size,
            kind.page_size()
        );
        incoming.refuse(&why);
        bail!("{why}: use the same --memory type's page size on both sides");
    }
    let ram = shapes[0].bytes();
    let migration = incoming.migration_id();
    let source = incoming.peer().to_string();
    eprintln!(
        "receiving migration {migration} from {source}: {} MiB",
        ram >> 20
    );
    let region = Arc::new(
        Region::new(kind, ram as usize)
            .with_context(|| format!("allocating {} MiB of {kind} guest memory", ram >> 20))?,
    );
    let bars = Bars::start(progress);
    let mut rx = incoming.receive(vec![region.clone()])?;
    let state_bytes = rx.switchover()?;
    let state = VmState::from_bytes(&state_bytes).context("the VM state the source sent")?;
    let mut vm = TestVm::restore(region.clone(), &state, VmOptions::default())?;
    rx.resumed();
    eprintln!("resumed here; pages still missing arrive on first touch and in the background");
    let t0 = Instant::now();
    let steps_at_resume: u64 = state.vcpus.iter().map(|v| v.progress).sum();
    let control = RunControl::new(state.vcpus.len() as u32, None);
    control.set_rate(args.write_rate.unwrap_or(0));
    // Pages keep arriving while the guest runs; finish() returns once every
    // page is resident.
    let c = control.clone();
    let finisher = std::thread::spawn(move || {
        let mut steps = 0;
        let r = rx.finish_then(|| steps = c.total());
        c.set_rate(0);
        (r, steps)
    });
    let outcome = vm.run(&control);
    let run_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (report, steps_when_resident) = finisher
        .join()
        .map_err(|_| anyhow::anyhow!("the migration thread panicked"))?;
    // A guest that finished before the last page came did all its steps.
    let steps_when_resident = steps_when_resident.max(steps_at_resume);
    drop(bars);
    let report = report.context("the migration failed")?;
    if stop.load(Ordering::SeqCst) {
        eprintln!("signal received during the migration; it completed");
    }
    if outcome? != RunOutcome::Finished {
        bail!("the guest stopped before finishing");
    }
    drop(vm);
    let sum = checksum(&region, state.ram)?;
    let want = expected_checksum(state.workload, state.ram, state.vcpus.len() as u32);
    let out = ReceiveReport {
        migration,
        source,
        memory: kind,
        mem: state.ram,
        vcpus: state.vcpus.len(),
        checksum: format!("{sum:016x}"),
        expected_checksum: format!("{want:016x}"),
        matches_reference: sum == want,
        run_ms,
        steps_at_resume,
        steps_when_resident,
        migration_report: report,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut t = Table::new(["vm receive", "value"]);
        t.row([
            "migration".into(),
            format!("{} from {}", out.migration, out.source),
        ]);
        t.row([
            "guest RAM".into(),
            format!("{} MiB ({kind}), {} vCPUs", out.mem >> 20, out.vcpus),
        ]);
        dest_rows(&mut t, &out.migration_report);
        if let Some(s) = &out.migration_report.source {
            source_rows(&mut t, s);
        }
        t.row(["ran here".into(), format!("{run_ms:.0} ms")]);
        t.row(["checksum".into(), out.checksum.clone()]);
        t.row([
            "host reference".into(),
            format!(
                "{} ({})",
                out.expected_checksum,
                if out.matches_reference {
                    "match"
                } else {
                    "MISMATCH"
                }
            ),
        ]);
        print!("{}", t.render());
    }
    if !out.matches_reference {
        eprintln!("error: the migrated guest's memory does not match the host reference");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
