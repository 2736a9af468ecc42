//! `livepage vm run --migrate-to ADDR`: the source of a test VM's live
//! migration. The VM runs on its own thread; the migration pauses it
//! between two instructions for the switchover (and resumes it here if the
//! migration is abandoned, in which case it runs to the end here).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use livepage_mem::Region;
use livepage_migrate::{
    Compression, Converge, Guest, HookError, Method, MigrateError, ProgressView, SourceOptions,
    SourceReport, TrackerFactory,
};
use livepage_testvm::{RunControl, RunOutcome, TestVm};

use crate::migration::{Bars, LinkArgs};

/// Migration method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Pre-copy rounds while they converge, then post-copy.
    Hybrid,
    /// Pre-copy rounds until the rest fits --downtime-target.
    Precopy,
    /// Pause at once and move every page after the guest resumed there.
    Postcopy,
    /// Pause, copy everything, resume there.
    StopAndCopy,
}

/// Compression of page chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    /// From measured bandwidth and compression speed.
    Auto,
    /// Never.
    None,
    /// lz4.
    Lz4,
    /// zstd.
    Zstd,
}

/// The source's migration options of `vm run`.
#[derive(Debug, Args, Default)]
pub struct MigrateArgs {
    /// Migrate the VM live to the destination listening here (`vm receive`).
    #[arg(long, conflicts_with_all = ["snapshot_at", "checkpoint_every"])]
    pub migrate_to: Option<SocketAddr>,
    /// Start the migration when every vCPU has done this many steps.
    #[arg(long, requires = "migrate_to")]
    pub migrate_at: Option<u64>,
    /// How (default hybrid).
    #[arg(long, value_enum, requires = "migrate_to")]
    pub migration: Option<MethodArg>,
    /// Longest pause pre-copy aims for, in ms (default 300).
    #[arg(long, value_name = "MS", requires = "migrate_to")]
    pub downtime_target: Option<u64>,
    /// Most pre-copy rounds (default 30).
    #[arg(long, requires = "migrate_to")]
    pub max_rounds: Option<u32>,
    /// Bulk connections (default 2).
    #[arg(long, requires = "migrate_to")]
    pub connections: Option<usize>,
    /// Compression of page chunks (default auto).
    #[arg(long, value_enum, requires = "migrate_to")]
    pub compress: Option<CompressArg>,
    /// Steps (writes) per second per vCPU once the migration starts (the
    /// guest runs free before); default: free.
    #[arg(long, requires = "migrate_to")]
    pub write_rate: Option<u64>,
    /// Let the post-copy push fill the network's queues (by default pushed
    /// data in flight stays near the bandwidth-delay product, so answers to
    /// faults do not wait behind it); for comparison.
    #[arg(long, requires = "migrate_to")]
    pub no_pacing: bool,
    /// The name the destination's certificate must carry (default livepage).
    #[arg(long, requires = "tls_creds")]
    pub tls_server_name: Option<String>,
    #[command(flatten)]
    pub link: LinkArgs,
}

impl MigrateArgs {
    /// Options given without --migrate-to are refused.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.migrate_to.is_none()
            && (self.link.tls_creds.is_some()
                || self.link.insecure
                || self.link.recovery_timeout.is_some())
        {
            bail!(
                "--tls-creds, --insecure and --recovery-timeout set up a migration: give --migrate-to ADDR"
            );
        }
        if self.migrate_to.is_some() && self.migrate_at.is_none() {
            bail!("--migrate-to needs --migrate-at STEP (when to start the migration)");
        }
        if self.connections.is_some_and(|n| !(1..=16).contains(&n)) {
            bail!("--connections must be 1 to 16");
        }
        if self.max_rounds == Some(0) {
            bail!("--max-rounds must be at least 1");
        }
        Ok(())
    }

    pub fn options(&self, progress: Arc<ProgressView>) -> anyhow::Result<SourceOptions> {
        let security = self.link.client(
            self.tls_server_name
                .as_deref()
                .unwrap_or(livepage_migrate::tls::DEFAULT_SERVER_NAME),
        )?;
        let method = match self.migration.unwrap_or(MethodArg::Hybrid) {
            MethodArg::Hybrid => Method::Hybrid,
            MethodArg::Precopy => Method::Precopy,
            MethodArg::Postcopy => Method::Postcopy,
            MethodArg::StopAndCopy => Method::StopAndCopy,
        };
        let compression = match self.compress.unwrap_or(CompressArg::Auto) {
            CompressArg::Auto => Compression::Auto,
            CompressArg::None => Compression::None,
            CompressArg::Lz4 => Compression::Lz4,
            CompressArg::Zstd => Compression::Zstd,
        };
        let defaults = Converge::default();
        Ok(SourceOptions::new(security)
            .converge(Converge {
                method,
                downtime_target: self
                    .downtime_target
                    .map_or(defaults.downtime_target, Duration::from_millis),
                max_rounds: self.max_rounds.unwrap_or(defaults.max_rounds),
            })
            .connections(self.connections.unwrap_or(2))
            .compression(compression)
            .recovery_timeout(self.link.recovery())
            .pace(!self.no_pacing)
            .progress(progress))
    }
}

enum Cmd {
    /// Run on after a pause.
    Resume,
    /// The guest left: stop.
    Stop,
    /// The guest stays: run to the end.
    Finish,
}

/// The VM behind the migration's hooks.
struct VmGuest {
    control: Arc<Mutex<Arc<RunControl>>>,
    pause_asked: Arc<AtomicBool>,
    states: Receiver<Result<Vec<u8>, String>>,
    cmds: Sender<Cmd>,
    /// Steps per vCPU when the guest paused for the switchover.
    paused_at: Vec<u64>,
}

impl Guest for VmGuest {
    fn pause(&mut self) -> Result<Vec<u8>, HookError> {
        self.pause_asked.store(true, Ordering::SeqCst);
        let c = self
            .control
            .lock()
            .map_err(|_| "VM control poisoned")?
            .clone();
        c.pause_now();
        match self.states.recv() {
            Ok(Ok(s)) => {
                if let Ok(st) = livepage_testvm::VmState::from_bytes(&s) {
                    self.paused_at = st.vcpus.iter().map(|v| v.progress).collect();
                }
                Ok(s)
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the VM thread ended".into()),
        }
    }

    fn resume(&mut self) -> Result<(), HookError> {
        self.cmds
            .send(Cmd::Resume)
            .map_err(|_| "the VM thread ended".into())
    }
}

/// How the source's run ended.
pub struct Outcome {
    /// The migration's report, or why it failed.
    pub result: Result<SourceReport, MigrateError>,
    /// The VM, when it finished here (the migration was abandoned).
    pub finished_here: Option<TestVm>,
    /// Steps per vCPU when the guest paused for the switchover.
    pub paused_at: Vec<u64>,
}

/// Runs `vm` (paused at --migrate-at) on while migrating it to `to`.
pub fn migrate(
    vm: TestVm,
    region: Arc<Region>,
    track: TrackerFactory,
    args: &MigrateArgs,
) -> anyhow::Result<Outcome> {
    let to = args.migrate_to.context("--migrate-to")?;
    let progress = Arc::new(ProgressView::default());
    let opts = args.options(progress.clone())?;
    let vcpus = vm.spec().vcpus;
    let rate = args.write_rate.unwrap_or(0);
    let control = Arc::new(Mutex::new(RunControl::new(vcpus, None)));
    let pause_asked = Arc::new(AtomicBool::new(false));
    let (state_tx, states) = channel();
    let (cmds, cmd_rx) = channel::<Cmd>();
    let (c2, asked) = (control.clone(), pause_asked.clone());
    let vm_thread = std::thread::Builder::new()
        .name("lp-vm".into())
        .spawn(move || run_vm(vm, vcpus, rate, &c2, &asked, &state_tx, &cmd_rx))
        .context("starting the VM thread")?;
    let mut guest = VmGuest {
        control,
        pause_asked,
        states,
        cmds: cmds.clone(),
        paused_at: Vec::new(),
    };
    let bars = Bars::start(progress);
    let result = livepage_migrate::migrate(to, vec![region], track, &mut guest, opts);
    drop(bars);
    let here = match &result {
        Ok(_) => false,
        Err(e) => e.guest_runs_at_source(),
    };
    let _ = cmds.send(if here { Cmd::Finish } else { Cmd::Stop });
    let (vm, outcome) = vm_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the VM thread panicked"))??;
    Ok(Outcome {
        result,
        finished_here: (here && outcome == RunOutcome::Finished).then_some(vm),
        paused_at: guest.paused_at,
    })
}

/// The VM's thread: runs, pauses when asked (sending its state), resumes
/// or stops or finishes on command.
fn run_vm(
    mut vm: TestVm,
    vcpus: u32,
    rate: u64,
    control: &Mutex<Arc<RunControl>>,
    pause_asked: &AtomicBool,
    states: &Sender<Result<Vec<u8>, String>>,
    cmds: &Receiver<Cmd>,
) -> anyhow::Result<(TestVm, RunOutcome)> {
    let mut finishing = false;
    loop {
        let c = RunControl::new(vcpus, None);
        c.set_rate(if finishing { 0 } else { rate });
        if let Ok(mut g) = control.lock() {
            *g = c.clone();
        }
        // A pause asked between two runs is honoured before running.
        if pause_asked.load(Ordering::SeqCst) {
            c.pause.store(true, Ordering::SeqCst);
        }
        let outcome = match vm.run(&c) {
            Ok(o) => o,
            Err(e) => {
                let _ = states.send(Err(e.to_string()));
                return Err(e.into());
            }
        };
        if finishing && outcome == RunOutcome::Finished {
            return Ok((vm, outcome));
        }
        // Wait for a pause request (the guest may have finished first).
        while !pause_asked.load(Ordering::SeqCst) {
            match cmds.recv_timeout(Duration::from_millis(1)) {
                Ok(Cmd::Stop) => return Ok((vm, outcome)),
                Ok(Cmd::Finish) if outcome == RunOutcome::Finished => return Ok((vm, outcome)),
                Ok(Cmd::Finish) => finishing = true,
                _ => {}
            }
            if finishing {
                break;
            }
        }
        if finishing && !pause_asked.load(Ordering::SeqCst) {
            continue;
        }
        pause_asked.store(false, Ordering::SeqCst);
        let _ = states.send(vm.save().map(|s| s.to_bytes()).map_err(|e| e.to_string()));
        match cmds.recv() {
            Ok(Cmd::Resume) => {}
            Ok(Cmd::Finish) => finishing = true,
            Ok(Cmd::Stop) | Err(_) => return Ok((vm, outcome)),
        }
    }
}

/// Prints the source's outcome: the migration's report, or why it failed
/// and, when the guest stayed, its checksum against the reference. Exit
/// status 0: migrated; 2: abandoned, the guest finished here (matching);
/// 1: failed.
pub fn report(
    args: &super::run::RunArgs,
    spec: livepage_testvm::VmSpec,
    region: &Region,
    t0: std::time::Instant,
    m: super::run::MigrationReport,
    finished_here: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let mut matches = None;
    let (mut sum, mut want) = (String::new(), String::new());
    if finished_here {
        let s = livepage_testvm::checksum(region, spec.ram)?;
        let w = livepage_testvm::reference::expected_checksum(spec.workload, spec.ram, spec.vcpus);
        matches = Some(s == w);
        sum = format!("{s:016x}");
        want = format!("{w:016x}");
    }
    let report = super::run::RunReport {
        mem: spec.ram,
        vcpus: spec.vcpus,
        memory: region.kind(),
        workload: format!("{:?}", args.workload).to_lowercase(),
        seed: Some(args.seed),
        iterations: Some(args.iterations),
        seconds: t0.elapsed().as_secs_f64(),
        checksum: sum.clone(),
        expected_checksum: want.clone(),
        matches_reference: matches.unwrap_or(false),
        snapshot: None,
        checkpoints: Vec::new(),
        folds: Vec::new(),
        retention_errors: Vec::new(),
        migration: Some(m),
    };
    let m = report
        .migration
        .as_ref()
        .context("the migration's report")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut t = crate::table::Table::new(["vm run --migrate-to", "value"]);
        t.row([
            "guest RAM".into(),
            format!(
                "{} MiB ({}), {} vCPUs",
                spec.ram >> 20,
                region.kind(),
                spec.vcpus
            ),
        ]);
        t.row([
            "migrated to".into(),
            format!("{} at steps {:?}", m.to, m.at_steps),
        ]);
        if let Some(r) = &m.report {
            crate::migration::source_rows(&mut t, r);
            if let Some(d) = &r.dest {
                crate::migration::dest_rows(&mut t, d);
            }
        }
        if let Some(e) = &m.error {
            t.row(["migration failed".into(), e.clone()]);
        }
        if finished_here {
            t.row(["guest".to_string(), "finished here".to_string()]);
            t.row(["checksum".to_string(), sum]);
            t.row([
                "host reference".into(),
                format!(
                    "{want} ({})",
                    if matches == Some(true) {
                        "match"
                    } else {
                        "MISMATCH"
                    }
                ),
            ]);
        }
        print!("{}", t.render());
    }
    Ok(match (m.migrated, finished_here, matches) {
        (true, _, _) => ExitCode::SUCCESS,
        (false, true, Some(true)) => {
            eprintln!(
                "the migration was abandoned; the guest finished here and matches the reference"
            );
            ExitCode::from(2)
        }
        (false, true, _) => {
            eprintln!("error: the guest's memory does not match the host reference");
            ExitCode::FAILURE
        }
        (false, false, _) => {
            eprintln!(
                "error: the migration failed: {}",
                m.error.as_deref().unwrap_or("unknown")
            );
            ExitCode::FAILURE
        }
    })
}
