//! `livepage bench demand-paging`: the KVM demand_paging_test table with the
//! test VM. Each vCPU writes every page of its slice once (guest accesses
//! reach host memory through KVM's get_user_pages, i.e. kernel-mode faults);
//! userfaultfd handler threads resolve them (anon: MISSING + UFFDIO_COPY;
//! shmem: MINOR + UFFDIO_CONTINUE after the page cache was filled through the
//! alias), with one userfaultfd for all vCPUs or one per vCPU, beside the same
//! guest run with no userfaultfd.

use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use livepage_mem::{MemoryKind, Region};
use livepage_testvm::layout::{DATA_START, slice};
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{RunControl, TestVm, VmOptions, VmSpec, Workload, checksum, prepare_memory};
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::{
    CopyMode, Event, EventBuffer, Features, RegisterMode, Resolved, Uffd, UffdBuilder,
};
use serde::Serialize;

use super::faults::Path;

use crate::table::{Table, si};

/// How many userfaultfds serve the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One userfaultfd for all of guest RAM (demand_paging_test -a).
    Shared,
    /// One userfaultfd per vCPU slice.
    PerVcpu,
}

#[derive(Debug, Args)]
pub struct DemandArgs {
    /// vCPU counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 2, 4, 8])]
    pub vcpus: Vec<u32>,
    /// Guest RAM per vCPU (each vCPU touches every page of its slice).
    #[arg(long, default_value = "64M", value_parser = crate::args::parse_size)]
    pub mem_per_vcpu: u64,
    /// Handler (reader) threads per userfaultfd.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub handlers: Vec<usize>,
    /// Fault paths.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Path::AnonCopy, Path::ShmemContinue])]
    pub paths: Vec<Path>,
    /// Userfaultfd layouts.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Layout::Shared, Layout::PerVcpu])]
    pub layouts: Vec<Layout>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemandRow {
    pub path: Path,
    pub vcpus: u32,
    /// None: the baseline run without userfaultfd.
    pub layout: Option<Layout>,
    pub handlers_per_uffd: usize,
    pub pages: u64,
    pub seconds: f64,
    pub pages_per_sec: f64,
    pub pages_per_sec_per_vcpu: f64,
    /// Faults resolved by the handlers.
    pub faults_served: u64,
    /// This run's rate over the baseline's.
    pub vs_baseline: f64,
}

struct Served {
    stop: Arc<EventFd>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

fn serve(uffds: &[Arc<Uffd>], handlers: usize, path: Path) -> anyhow::Result<Served> {
    let stop = Arc::new(EventFd::new()?);
    let mut threads = Vec::new();
    for u in uffds {
        for _ in 0..handlers {
            let (u, stop) = (u.clone(), stop.clone());
            threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
                let zero = vec![0u8; 4096];
                let mut buf = EventBuffer::new(32);
                let mut served = 0;
                loop {
                    let ready =
                        poll_readable([std::os::fd::AsFd::as_fd(u.as_ref()), stop.as_fd()], -1)?;
                    if ready[1] {
                        return Ok(served);
                    }
                    for ev in u.read_events(&mut buf)? {
                        let Event::PageFault(pf) = ev else { continue };
                        let a = pf.address as usize & !4095;
                        let r = match path {
                            Path::AnonCopy => u.copy(a, &zero, CopyMode::default())?,
                            Path::ShmemContinue => u.continue_range(a, 4096, false, false)?,
                        };
                        match r {
                            Resolved::AlreadyPresent => u.wake(a, 4096)?,
                            Resolved::All => served += 1,
                            other => anyhow::bail!("unexpected outcome {other:?} at {a:#x}"),
                        }
                    }
                }
            }));
        }
    }
    Ok(Served { stop, threads })
}

pub fn one_run(
    path: Path,
    vcpus: u32,
    mem_per_vcpu: u64,
    layout: Option<Layout>,
    handlers: usize,
) -> anyhow::Result<(u64, f64, u64)> {
    let ram = (DATA_START + u64::from(vcpus) * mem_per_vcpu).next_multiple_of(2 << 20);
    let spec = VmSpec {
        ram,
        vcpus,
        workload: Workload::Touch,
    };
    let kind = match path {
        Path::AnonCopy => MemoryKind::Anon,
        Path::ShmemContinue => MemoryKind::Shmem,
    };
    let region = Arc::new(Region::new(kind, ram as usize)?);
    prepare_memory(&region, &spec)?;
    let data = DATA_START as usize;
    if path == Path::ShmemContinue {
        // Fill the page cache of the data area through the alias (no faults).
        let zeros = vec![0u8; 1 << 20];
        let mut off = data;
        while off < ram as usize {
            let n = zeros.len().min(ram as usize - off);
            region.write_alias(off, &zeros[..n])?;
            off += n;
        }
    }
    let mut uffds = Vec::new();
    if let Some(layout) = layout {
        let (features, mode) = match path {
            Path::AnonCopy => (Features::empty(), RegisterMode::MISSING),
            Path::ShmemContinue => (Features::MINOR_SHMEM, RegisterMode::MINOR),
        };
        let ranges: Vec<(usize, usize)> = match layout {
            Layout::Shared => vec![(data, ram as usize - data)],
            Layout::PerVcpu => (0..vcpus)
                .map(|v| {
                    let (base, pages) = slice(ram, vcpus, v);
                    (base as usize, pages as usize * 4096)
                })
                .collect(),
        };
        for (off, len) in ranges {
            let u = UffdBuilder::new()
                .non_blocking(true)
                .features(features)
                .create()?;
            region.register_range(&u, off, len, mode)?;
            uffds.push((Arc::new(u), off, len));
        }
    }
    let handles: Vec<Arc<Uffd>> = uffds.iter().map(|(u, _, _)| u.clone()).collect();
    let served = serve(&handles, handlers, path)?;
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default())?;
    let control = RunControl::new(vcpus, None);
    let t0 = Instant::now();
    let result = vm.run(&control);
    let seconds = t0.elapsed().as_secs_f64();
    served.stop.signal();
    let mut faults = 0;
    for t in served.threads {
        faults += t
            .join()
            .map_err(|_| anyhow::anyhow!("a handler thread panicked"))??;
    }
    result?;
    drop(vm);
    for (u, off, len) in &uffds {
        region.unregister_range(u, *off, *len)?;
    }
    let (_, pages) = slice(ram, vcpus, 0);
    let got = checksum(&region, ram)?;
    anyhow::ensure!(
        got == expected_checksum(spec.workload, ram, vcpus),
        "guest memory does not match the reference after the run"
    );
    Ok((pages * u64::from(vcpus), seconds, faults))
}

pub fn run(args: &DemandArgs) -> anyhow::Result<Vec<DemandRow>> {
    livepage_testvm::check_host()?;
    if args.vcpus.contains(&0) || args.handlers.contains(&0) {
        anyhow::bail!("vCPU and handler counts must be at least 1");
    }
    if args.mem_per_vcpu < 4096 {
        anyhow::bail!("--mem-per-vcpu must be at least one page");
    }
    let per_path = 1 + args.layouts.len() * args.handlers.len();
    let bar = crate::progress::bar(
        (args.paths.len() * args.vcpus.len() * per_path) as u64,
        "demand",
    );
    let mut rows = Vec::new();
    for &path in &args.paths {
        for &vcpus in &args.vcpus {
            // Warm up (first touch of fresh host memory is slow here), then the baseline.
            one_run(path, vcpus, args.mem_per_vcpu.min(4 << 20), None, 1)?;
            let (pages, seconds, _) = one_run(path, vcpus, args.mem_per_vcpu, None, 1)?;
            bar.inc(1);
            let base_rate = pages as f64 / seconds;
            let row = |layout, handlers, pages: u64, seconds: f64, faults| DemandRow {
                path,
                vcpus,
                layout,
                handlers_per_uffd: handlers,
                pages,
                seconds,
                pages_per_sec: pages as f64 / seconds,
                pages_per_sec_per_vcpu: pages as f64 / seconds / f64::from(vcpus),
                faults_served: faults,
                vs_baseline: pages as f64 / seconds / base_rate,
            };
            rows.push(row(None, 0, pages, seconds, 0));
            for &layout in &args.layouts {
                for &h in &args.handlers {
                    let (pages, seconds, faults) =
                        one_run(path, vcpus, args.mem_per_vcpu, Some(layout), h)?;
                    rows.push(row(Some(layout), h, pages, seconds, faults));
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

pub fn render(rows: &[DemandRow]) -> String {
    let mut t = Table::new([
        "path",
        "vCPUs",
        "userfaultfd",
        "readers/uffd",
        "pages",
        "faults served",
        "pages/s",
        "pages/s/vCPU",
        "vs no uffd",
    ]);
    for r in rows {
        t.row([
            format!("{:?}", r.path).to_lowercase(),
            r.vcpus.to_string(),
            r.layout.map_or("none (baseline)".to_string(), |l| {
                format!("{l:?}").to_lowercase()
            }),
            if r.layout.is_some() {
                r.handlers_per_uffd.to_string()
            } else {
                "-".into()
            },
            r.pages.to_string(),
            r.faults_served.to_string(),
            si(r.pages_per_sec),
            si(r.pages_per_sec_per_vcpu),
            format!("{:.2}", r.vs_baseline),
        ]);
    }
    t.render()
}
