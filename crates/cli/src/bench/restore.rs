//! `livepage bench restore`: restoring a large image, in one run:
//! - eager read (pread straight into guest memory: the VM waits for all of it),
//! - a MAP_PRIVATE mapping of the image (kernel paging, Firecracker's File
//!   backend), made resident with MADV_POPULATE_READ,
//! - livepage lazy restore in missing mode (anon) and minor mode (shmem) with
//!   each prefetch policy, while a "guest" thread touches a working set;
//!
//! then the test VM's demand paging through the restore engine against
//! handler-thread count. Every restored region is checked against the image.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Args;
use livepage_mem::{MemoryKind, Region};
use livepage_restore::{ChainSource, Mode, PageSource, Prefetch, RestoreOptions, WorkingSet};
use livepage_testvm::layout::DATA_START;
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{RunControl, TestVm, VmOptions, VmSpec, Workload, checksum, prepare_memory};
use livepage_uffd::mm::{Advice, Mapping};
use serde::Serialize;

use crate::table::{Table, si};

#[derive(Debug, Args)]
pub struct RestoreBenchArgs {
    /// Image size (guest RAM).
    #[arg(long, default_value = "4G", value_parser = crate::args::parse_size)]
    pub size: u64,
    /// Use this single-region image instead of generating one.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Pages the guest thread touches (a random working set) during each lazy restore.
    #[arg(long, default_value_t = 8192)]
    pub touch_pages: usize,
    /// Fault handler threads of the lazy restores.
    #[arg(long, default_value_t = 1)]
    pub handlers: usize,
    /// Skip the test VM's demand-paging table.
    #[arg(long)]
    pub no_vm: bool,
    /// vCPU counts of the demand-paging table.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 2, 4])]
    pub vcpus: Vec<u32>,
    /// Handler-thread counts of the demand-paging table.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    pub demand_handlers: Vec<usize>,
    /// Guest RAM per vCPU in the demand-paging table.
    #[arg(long, default_value = "32M", value_parser = crate::args::parse_size)]
    pub mem_per_vcpu: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreRow {
    pub method: String,
    /// Time until the memory can be used (the VM could run).
    pub resume_ms: f64,
    /// Time until every page is resident.
    pub resident_ms: f64,
    /// Resident time over eager read's.
    pub vs_eager: f64,
    /// Demand faults served while the prefetch ran.
    pub faults: u64,
    /// Fault service time (read to resolved), µs.
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    /// The guest thread's touch time over the working set, µs (p99).
    pub touch_p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemandRow {
    pub mode: Mode,
    pub vcpus: u32,
    /// "no uffd", "raw loop" or "livepage-restore".
    pub server: String,
    pub handlers: usize,
    pub uffds: usize,
    pub pages: u64,
    pub seconds: f64,
    pub pages_per_sec: f64,
    /// Over the same guest run without userfaultfd.
    pub vs_no_uffd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub size: u64,
    pub data_pages: u64,
    pub restore: Vec<RestoreRow>,
    pub demand: Vec<DemandRow>,
}

/// A data page's bytes: a pattern from its number, cheap to make and to check.
fn page_pattern(p: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
}

/// Writes an image of `size` bytes: every eighth 2 MiB block zero, every
/// sixteenth page of the others zero, the rest data.
fn make_image(path: &std::path::Path, size: u64) -> anyhow::Result<u64> {
    let desc = livepage_image::RegionDesc {
        base: 0x7f00_0000_0000,
        len: size,
        page_size: 4096,
        kind: livepage_image::kind::of(MemoryKind::Anon),
    };
    let w = livepage_image::ImageWriter::create(path, &[desc], None)?;
    let pages = size / 4096;
    let bar = crate::progress::bar(pages, "image");
    let mut buf = vec![0u8; 4096];
    let mut data = 0;
    for p in 0..pages {
        if (p / 512) % 8 == 7 || p % 16 == 15 {
            w.mark_zero(p);
        } else {
            page_pattern(p, &mut buf);
            w.write_page(p, &buf)?;
            data += 1;
        }
        if p % 8192 == 0 {
            bar.set_position(p);
        }
    }
    bar.finish_and_clear();
    w.finish()?;
    Ok(data)
}

fn region_crc(r: &Region) -> anyhow::Result<u32> {
    let mut buf = vec![0u8; 4 << 20];
    let mut crc = 0u32;
    let mut off = 0;
    while off < r.len() {
        let n = buf.len().min(r.len() - off);
        r.read(off, &mut buf[..n])?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        off += n;
    }
    Ok(crc)
}

/// Touch order of the guest thread: random pages (a fixed seed).
fn touch_list(pages: u64, n: usize) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        })
        .collect()
}

fn lazy_run(
    chain_path: &std::path::Path,
    mode: Mode,
    prefetch: Prefetch,
    record: bool,
    args: &RestoreBenchArgs,
    touches: &[u64],
) -> anyhow::Result<(RestoreRow, Arc<Region>, Option<WorkingSet>)> {
    let source: Arc<dyn PageSource> = Arc::new(ChainSource::open(chain_path)?);
    let len = source.regions()[0].pages as usize * 4096;
    let kind = match mode {
        Mode::Missing => MemoryKind::Anon,
        Mode::Minor => MemoryKind::Shmem,
    };
    let policy = match &prefetch {
        Prefetch::None => "none",
        Prefetch::Sequential => "sequential",
        Prefetch::Recorded(_) => "recorded",
    };
    let region = Arc::new(Region::new(kind, len)?);
    let opts = RestoreOptions::default()
        .mode(mode)
        .handlers(args.handlers)
        .prefetch(prefetch)
        .record_working_set(record);
    let t0 = Instant::now();
    let restore = livepage_restore::start(vec![region.clone()], source, opts)?;
    let resume = t0.elapsed();
    let mut lat = Vec::with_capacity(touches.len());
    for p in touches {
        let t = Instant::now();
        region.read_u64(*p as usize * 4096)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let stats = restore.wait()?;
    lat.sort_unstable();
    let row = RestoreRow {
        method: format!("lazy {mode:?}, prefetch {policy}").to_lowercase(),
        resume_ms: resume.as_secs_f64() * 1e3,
        resident_ms: stats.until_resident_ms + resume.as_secs_f64() * 1e3,
        vs_eager: 0.0,
        faults: stats.faults_served,
        fault_p50_us: stats.fault_p50_us,
        fault_p99_us: stats.fault_p99_us,
        touch_p99_us: super::percentile(&lat, 0.99) as f64 / 1e3,
    };
    Ok((row, region, stats.working_set))
}

fn demand_run(
    mode: Mode,
    vcpus: u32,
    mem_per_vcpu: u64,
    handlers: Option<(usize, usize)>,
) -> anyhow::Result<(u64, f64)> {
    let ram = (DATA_START + u64::from(vcpus) * mem_per_vcpu).next_multiple_of(2 << 20);
    let spec = VmSpec {
        ram,
        vcpus,
        workload: Workload::Touch,
    };
    let kind = match mode {
        Mode::Missing => MemoryKind::Anon,
        Mode::Minor => MemoryKind::Shmem,
    };
    // The guest's memory as a snapshot would hold it: page tables and program
    // prepared, data pages zero.
    let prepared = Region::new(MemoryKind::Anon, ram as usize)?;
    prepare_memory(&prepared, &spec)?;
    let mut bytes = vec![0u8; ram as usize];
    prepared.read(0, &mut bytes)?;
    drop(prepared);
    let region = Arc::new(Region::new(kind, ram as usize)?);
    let restore = match handlers {
        Some((h, uffds)) => {
            let source = Arc::new(livepage_restore::MemorySource::new(vec![bytes], &[4096])?);
            let opts = RestoreOptions::default()
                .mode(mode)
                .handlers(h)
                .uffds(uffds)
                .prefetch(Prefetch::None)
                .zero_runs_to_kernel(None);
            Some(livepage_restore::start(vec![region.clone()], source, opts)?)
        }
        None => {
            region.write(0, &bytes)?;
            None
        }
    };
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default())?;
    let control = RunControl::new(vcpus, None);
    let t0 = Instant::now();
    vm.run(&control)?;
    let seconds = t0.elapsed().as_secs_f64();
    drop(vm);
    if let Some(r) = restore {
        r.wait()?;
    }
    ensure!(
        checksum(&region, ram)? == expected_checksum(spec.workload, ram, vcpus),
        "guest memory does not match the reference after a demand-paged run"
    );
    let pages = u64::from(vcpus) * livepage_testvm::layout::slice(ram, vcpus, 0).1;
    Ok((pages, seconds))
}

pub fn run(args: &RestoreBenchArgs) -> anyhow::Result<RestoreReport> {
    if args.size < 64 << 20 || args.size % (2 << 20) != 0 {
        bail!("--size must be a multiple of 2 MiB, at least 64 MiB");
    }
    let dir = tempfile::tempdir_in(std::env::temp_dir())?;
    let (image, data_pages) = match &args.image {
        Some(p) => (p.clone(), 0),
        None => {
            let p = dir.path().join("bench.img");
            let n = make_image(&p, args.size)?;
            (p, n)
        }
    };
    let chain = livepage_image::Chain::open(&image)?;
    let head = chain.head();
    if head.regions().len() != 1 || head.regions()[0].page_size != 4096 {
        bail!("the image must hold one region of 4 KiB pages");
    }
    let desc = head.regions()[0];
    let len = desc.len as usize;
    let data_offset = head.page_offset(0, 0);
    let file = std::fs::File::open(&image)?;
    // The image is in the page cache (just written, or read here once), and
    // fresh host memory is slow to touch the first time: warm both up.
    {
        let warm = Region::new(MemoryKind::Anon, len)?;
        warm.read_file(&file, data_offset, 0, len)?;
    }
    let touches = touch_list(desc.pages(), args.touch_pages);
    let runs = 3 + 6;
    let bar = crate::progress::bar(runs, "restore");
    let mut rows = Vec::new();

    // Eager read: the guest waits for every byte. Two ways, the faster is the
    // reference: pread into fresh memory (a fault per page inside the copy),
    // or populate the memory first (MADV_POPULATE_WRITE) and then pread.
    let mut eager_ms = f64::MAX;
    let mut want = 0;
    for prefault in [false, true] {
        let t0 = Instant::now();
        let eager = Region::new(MemoryKind::Anon, len)?;
        if prefault {
            eager.advise(0, len, Advice::PopulateWrite)?;
        }
        let mut off = 0;
        while off < len {
            let n = (64usize << 20).min(len - off);
            eager.read_file(&file, data_offset + off as u64, off, n)?;
            off += n;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        eager_ms = eager_ms.min(ms);
        want = region_crc(&eager)?;
        drop(eager);
        rows.push(RestoreRow {
            method: if prefault {
                "eager: populate, then pread".into()
            } else {
                "eager: pread into memory".into()
            },
            resume_ms: ms,
            resident_ms: ms,
            vs_eager: 0.0,
            faults: 0,
            fault_p50_us: 0.0,
            fault_p99_us: 0.0,
            touch_p99_us: 0.0,
        });
        bar.inc(1);
    }
    for r in rows.iter_mut() {
        r.vs_eager = r.resident_ms / eager_ms;
    }

    // MAP_PRIVATE of the image, then the kernel pages it all in.
    let t0 = Instant::now();
    let map = Mapping::file_read_only(std::os::fd::AsFd::as_fd(&file), data_offset, len)
        .map_err(|e| anyhow::anyhow!("mmap of the image: {e}"))?;
    let resume = t0.elapsed();
    map.advise(0, len, Advice::PopulateRead)
        .map_err(|e| anyhow::anyhow!("MADV_POPULATE_READ: {e}"))?;
    let resident = t0.elapsed().as_secs_f64() * 1e3;
    drop(map);
    rows.push(RestoreRow {
        method: "MAP_PRIVATE mmap + populate".into(),
        resume_ms: resume.as_secs_f64() * 1e3,
        resident_ms: resident,
        vs_eager: resident / eager_ms,
        faults: 0,
        fault_p50_us: 0.0,
        fault_p99_us: 0.0,
        touch_p99_us: 0.0,
    });
    bar.inc(1);

    for mode in [Mode::Missing, Mode::Minor] {
        // "none" records the working set that "recorded" replays.
        let mut recorded = None;
        for policy in ["none", "sequential", "recorded"] {
            let prefetch = match policy {
                "none" => Prefetch::None,
                "sequential" => Prefetch::Sequential,
                _ => Prefetch::Recorded(recorded.clone().unwrap_or_default()),
            };
            let (mut row, region, ws) =
                lazy_run(&image, mode, prefetch, policy == "none", args, &touches)
                    .with_context(|| format!("lazy restore, {mode:?}, prefetch {policy}"))?;
            if ws.is_some() {
                recorded = ws;
            }
            ensure!(
                region_crc(&region)? == want,
                "{}: restored memory differs from the image",
                row.method
            );
            row.vs_eager = row.resident_ms / eager_ms;
            rows.push(row);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let mut demand = Vec::new();
    if !args.no_vm {
        livepage_testvm::check_host()?;
        let bar = crate::progress::bar(
            (args.vcpus.len() * (1 + args.demand_handlers.len()) * 2) as u64,
            "demand",
        );
        for mode in [Mode::Missing, Mode::Minor] {
            for &v in &args.vcpus {
                // Warm up, then the run without userfaultfd.
                demand_run(mode, v, args.mem_per_vcpu.min(4 << 20), None)?;
                let (pages, base) = demand_run(mode, v, args.mem_per_vcpu, None)?;
                bar.inc(1);
                let mut push = |server: &str, h: usize, uffds: usize, seconds: f64| {
                    demand.push(DemandRow {
                        mode,
                        vcpus: v,
                        server: server.into(),
                        handlers: h,
                        uffds,
                        pages,
                        seconds,
                        pages_per_sec: pages as f64 / seconds,
                        vs_no_uffd: base / seconds,
                    })
                };
                push("no uffd", 0, 0, base);
                // The peer: a bare poll/read/ioctl loop on one userfaultfd.
                let path = match mode {
                    Mode::Missing => super::faults::Path::AnonCopy,
                    Mode::Minor => super::faults::Path::ShmemContinue,
                };
                let (_, raw, _) = super::demand::one_run(
                    path,
                    v,
                    args.mem_per_vcpu,
                    Some(super::demand::Layout::Shared),
                    1,
                )?;
                push("raw loop", 1, 1, raw);
                for &h in &args.demand_handlers {
                    let mut layouts = vec![1usize];
                    if v > 1 {
                        layouts.push(v as usize);
                    }
                    for uffds in layouts {
                        let (_, s) = demand_run(mode, v, args.mem_per_vcpu, Some((h, uffds)))?;
                        push("livepage-restore", h, uffds, s);
                    }
                    bar.inc(1);
                }
            }
        }
        bar.finish_and_clear();
    }
    Ok(RestoreReport {
        size: desc.len,
        data_pages,
        restore: rows,
        demand,
    })
}

pub fn render(r: &RestoreReport) -> String {
    let mut out = format!(
        "image: {} MiB, {} data pages; guest thread touches a random working set during each lazy restore\n",
        r.size >> 20,
        r.data_pages
    );
    let mut t = Table::new([
        "method",
        "resume",
        "fully resident",
        "vs best eager",
        "demand faults",
        "fault p50",
        "fault p99",
        "touch p99",
    ]);
    for row in &r.restore {
        let lazy = row.method.starts_with("lazy");
        t.row([
            row.method.clone(),
            format!("{:.2} ms", row.resume_ms),
            format!("{:.0} ms", row.resident_ms),
            format!("{:.2}", row.vs_eager),
            if lazy {
                row.faults.to_string()
            } else {
                "-".into()
            },
            if lazy {
                format!("{:.1} µs", row.fault_p50_us)
            } else {
                "-".into()
            },
            if lazy {
                format!("{:.1} µs", row.fault_p99_us)
            } else {
                "-".into()
            },
            if lazy {
                format!("{:.1} µs", row.touch_p99_us)
            } else {
                "-".into()
            },
        ]);
    }
    out.push_str(&t.render());
    if !r.demand.is_empty() {
        out.push_str("\ntest VM demand paging through the restore engine (each vCPU writes every page of its slice once; prefetch off; the raw loop serves the same faults with bare ioctls: zero pages for missing, a page cache filled beforehand for minor)\n");
        let mut t = Table::new([
            "mode",
            "vCPUs",
            "served by",
            "handlers",
            "uffds",
            "pages",
            "pages/s",
            "vs no uffd",
        ]);
        for d in &r.demand {
            let n = |x: usize| {
                if x == 0 {
                    "-".to_string()
                } else {
                    x.to_string()
                }
            };
            t.row([
                format!("{:?}", d.mode).to_lowercase(),
                d.vcpus.to_string(),
                d.server.clone(),
                n(d.handlers),
                n(d.uffds),
                d.pages.to_string(),
                si(d.pages_per_sec),
                format!("{:.2}", d.vs_no_uffd),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}
