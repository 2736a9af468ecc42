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
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default())?;
    let control = RunControl::new(spec.vcpus, None);
    let slice_pages = livepage_testvm::layout::slice(spec.ram, spec.vcpus, 0).1;
    let total_steps = spec.workload.steps(slice_pages) * u64::from(spec.vcpus);
    let bar = crate::bench::progress(total_steps, "guest steps");
    let t0 = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        let monitor = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                bar.set_position(control.total());
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = vm.run(&control);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = monitor.join();
        r
    })?;
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
        print!("{}", t.render());
    }
    if !report.matches_reference {
        eprintln!("error: the guest's memory does not match the host reference");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
