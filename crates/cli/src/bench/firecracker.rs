//! `livepage bench firecracker`: serving a Firecracker VM's memory. The same
//! client, written from Firecracker's documented handshake (regions as JSON,
//! the userfaultfd as SCM_RIGHTS, registered MISSING with EVENT_REMOVE),
//! runs against each server in turn, in one process run:
//!
//! - **fault_all**: Firecracker's example strategy: the memory file read in
//!   at start (its MAP_POPULATE, reported as setup), then one UFFDIO_COPY per
//!   region on the first fault; zero pages after a discard;
//! - **on_demand**: livepage's server without prefetch (one page per fault,
//!   Firecracker's other example strategy);
//! - **livepage**: the server with prefetch, from the memory file (zeros
//!   found by reading) and from the same memory imported as an image (zero
//!   runs known from its index, left to the kernel).
//!
//! The client touches every page in address order, then a balloon discards
//! 256 KiB (those pages must read as zeros after), and every page is
//! checked against the snapshot. Reported: the time from the handshake
//! until every page is resident (the touch sweep done), and its ratio to
//! fault_all.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use livepage_mem::{MemoryKind, Region};
use livepage_restore::firecracker::{Backing, PrefetchPolicy, Server, ServerOptions, handshake};
use livepage_uffd::fdpass::send_with_fd;
use livepage_uffd::poll::poll_readable;
use livepage_uffd::{CopyMode, Event, EventBuffer, Features, RegisterMode, Resolved, UffdBuilder};
use serde::Serialize;

use crate::args::parse_size;
use crate::table::Table;

#[derive(Debug, Args)]
pub struct FirecrackerBenchArgs {
    /// Guest memory (two regions: 3/4 and 1/4).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Percent of pages holding data (in runs of 16 pages); the rest are zeros.
    #[arg(long, default_value_t = 25)]
    pub data_percent: u64,
    /// Fault handler threads of livepage's server.
    #[arg(long, default_value_t = 1)]
    pub handlers: usize,
    /// Timed runs per method (the best is kept), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FcRow {
    pub method: String,
    pub backing: String,
    /// Best time from the handshake until every page was resident, ms.
    pub resident_ms: f64,
    /// That time over fault_all's.
    pub vs_fault_all: f64,
    /// The server's work before the VM connected (fault_all reads the file), ms.
    pub setup_ms: f64,
    /// Faults that placed a page (livepage's servers).
    pub faults: u64,
    /// Pages placed in the background.
    pub prefetched: u64,
    /// Pages of zero runs left to the kernel.
    pub left_to_kernel: u64,
    /// Every page equalled the snapshot and the discarded ones read as zeros.
    pub verified: bool,
}

#[derive(Debug, Serialize)]
pub struct FcReport {
    pub size_mib: u64,
    pub data_percent: u64,
    pub handlers: usize,
    pub rows: Vec<FcRow>,
}

/// The snapshot's bytes: runs of 16 pages hold data with the given odds.
fn snapshot(size: u64, percent: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (run, chunk) in v.chunks_mut(16 * 4096).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 100 < percent {
            for (i, w) in chunk.chunks_mut(8).enumerate() {
                w.copy_from_slice(&((run as u64) << 32 | i as u64 | 1).to_ne_bytes());
            }
        }
    }
    v
}

fn mapping(base: usize, size: u64, offset: u64) -> String {
    format!(r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096}}"#)
}

/// One VM from the client's side: map, register, hand over, touch every
/// page; returns the time until resident and whether everything checked out.
fn client(socket: &Path, sizes: [u64; 2], want: &[u8]) -> anyhow::Result<(Duration, bool)> {
    let regions: Vec<Region> = sizes
        .iter()
        .map(|s| Region::new(MemoryKind::Anon, *s as usize))
        .collect::<Result<_, _>>()?;
    let uffd = UffdBuilder::new()
        .non_blocking(true)
        .features(Features::EVENT_REMOVE)
        .create()?;
    for r in &regions {
        r.register(&uffd, RegisterMode::MISSING)?;
    }
    let body = format!(
        "[{},{}]",
        mapping(regions[0].addr(), sizes[0], 0),
        mapping(regions[1].addr(), sizes[1], sizes[0])
    );
    let stream = UnixStream::connect(socket).context("connecting to the server")?;
    let t0 = Instant::now();
    send_with_fd(stream.as_fd(), body.as_bytes(), uffd.as_fd())?;
    for r in &regions {
        for p in 0..r.pages() {
            r.read_u64(p * 4096)?;
        }
    }
    let resident = t0.elapsed();
    let mut ok = true;
    let mut off = 0usize;
    let mut got = vec![0u8; sizes[0] as usize];
    for r in &regions {
        r.read(0, &mut got[..r.len()])?;
        ok &= got[..r.len()] == want[off..off + r.len()];
        off += r.len();
    }
    // A balloon takes 64 pages of the second region: zeros after, not snapshot data.
    regions[1].discard(4096 * 100, 64 * 4096)?;
    for p in 100..164 {
        ok &= regions[1].read_u64(p * 4096 + 8)? == 0;
    }
    drop(stream);
    Ok((resident, ok))
}

/// Firecracker's fault_all strategy for one VM: the file in memory before
/// the VM comes; at the first fault every region in one UFFDIO_COPY.
fn fault_all(listener: UnixListener, file: Arc<Vec<u8>>) -> anyhow::Result<()> {
    let (stream, _) = listener.accept()?;
    let (uffd, maps) = handshake(&stream, file.len() as u64).map_err(|r| r.error)?;
    let mut events = EventBuffer::new(64);
    let mut copied = false;
    loop {
        let ready = poll_readable([uffd.as_fd(), stream.as_fd()], 1000)?;
        if ready[1] {
            let mut b = [0u8; 64];
            if matches!(std::io::Read::read(&mut &stream, &mut b), Ok(0) | Err(_)) {
                return Ok(());
            }
        }
        if !ready[0] {
            continue;
        }
        let faults: Vec<u64> = uffd
            .read_events(&mut events)?
            .filter_map(|e| match e {
                Event::PageFault(pf) => Some(pf.address),
                _ => None,
            })
            .collect();
        for addr in faults {
            if !copied {
                copied = true;
                for m in &maps {
                    let (base, off) = (m.base_host_virt_addr as usize, m.offset as usize);
                    let src = &file[off..off + m.size as usize];
                    let mut done = 0;
                    while done < src.len() {
                        match uffd.copy(base + done, &src[done..], CopyMode::default())? {
                            Resolved::All => break,
                            Resolved::Partial { bytes } => done += bytes as usize,
                            Resolved::AlreadyPresent => {
                                uffd.wake(base + done, 4096)?;
                                done += 4096;
                            }
                            Resolved::EventPending => {
                                let _ = uffd.read_events(&mut events)?.count();
                            }
                        }
                    }
                }
                continue;
            }
            // After a discard: zeros.
            let page = addr as usize & !4095;
            if uffd.zeropage(page, 4096, false)? == Resolved::AlreadyPresent {
                uffd.wake(page, 4096)?;
            }
        }
    }
}

struct Method {
    name: &'static str,
    backing: &'static str,
    prefetch: Option<PrefetchPolicy>,
}

fn run_one(
    m: &Method,
    dir: &Path,
    mem: &Path,
    image: &Path,
    sizes: [u64; 2],
    want: &Arc<Vec<u8>>,
    handlers: usize,
) -> anyhow::Result<FcRow> {
    let socket = dir.join(format!("{}-{}.sock", m.name, m.backing));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let t_setup = Instant::now();
    let mut row = FcRow {
        method: m.name.into(),
        backing: m.backing.into(),
        resident_ms: 0.0,
        vs_fault_all: 0.0,
        setup_ms: 0.0,
        faults: 0,
        prefetched: 0,
        left_to_kernel: 0,
        verified: false,
    };
    let (resident, ok) = match m.prefetch {
        None => {
            // The file is read at the handler's start, before the VM comes.
            let file = Arc::new(std::fs::read(mem)?);
            row.setup_ms = t_setup.elapsed().as_secs_f64() * 1e3;
            let server = std::thread::spawn(move || fault_all(listener, file));
            let r = client(&socket, sizes, want)?;
            server
                .join()
                .map_err(|_| anyhow::anyhow!("the fault_all peer panicked"))??;
            r
        }
        Some(prefetch) => {
            let backing = if m.backing == "image" {
                Backing::image(image)?
            } else {
                Backing::mem_file(mem)?
            };
            let opts = ServerOptions::default()
                .handlers(handlers)
                .prefetch(prefetch)
                .max_vms(Some(1));
            let server = Arc::new(Server::new(backing, opts)?);
            row.setup_ms = t_setup.elapsed().as_secs_f64() * 1e3;
            let finished = Arc::new(std::sync::Mutex::new(None));
            let f2 = finished.clone();
            let report: livepage_restore::firecracker::Reporter = Arc::new(move |ev| {
                if let livepage_restore::firecracker::ServerEvent::Finished(st) = ev {
                    if let Ok(mut f) = f2.lock() {
                        *f = Some(st);
                    }
                }
            });
            let s2 = server.clone();
            let t = std::thread::spawn(move || s2.run(listener, report));
            let r = client(&socket, sizes, want)?;
            let summary = t
                .join()
                .map_err(|_| anyhow::anyhow!("the server panicked"))??;
            ensure!(summary.failed == 0, "livepage's server failed the VM");
            if let Some(st) = finished.lock().ok().and_then(|f| f.clone()) {
                row.faults = st.faults;
                row.prefetched = st.prefetched;
                row.left_to_kernel = st.left_to_kernel;
            }
            r
        }
    };
    let _ = std::fs::remove_file(&socket);
    row.resident_ms = resident.as_secs_f64() * 1e3;
    row.verified = ok;
    Ok(row)
}

pub fn run(args: &FirecrackerBenchArgs) -> anyhow::Result<FcReport> {
    if args.size < 64 << 20 || args.size % (4 << 20) != 0 {
        bail!("--size must be a multiple of 4 MiB, at least 64 MiB");
    }
    if args.data_percent > 100 {
        bail!("--data-percent is at most 100");
    }
    let sizes = [args.size / 4 * 3, args.size / 4];
    let dir = tempfile::tempdir()?;
    let mem = dir.path().join("mem");
    let image = dir.path().join("mem.img");
    let want = Arc::new(snapshot(args.size, args.data_percent));
    std::fs::write(&mem, &*want)?;
    crate::import::import(&mem, &image, 4096).context("importing the memory file")?;
    let methods = [
        Method {
            name: "fault_all",
            backing: "mem-file",
            prefetch: None,
        },
        Method {
            name: "on_demand",
            backing: "mem-file",
            prefetch: Some(PrefetchPolicy::None),
        },
        Method {
            name: "livepage",
            backing: "mem-file",
            prefetch: Some(PrefetchPolicy::Sequential),
        },
        Method {
            name: "livepage",
            backing: "image",
            prefetch: Some(PrefetchPolicy::Sequential),
        },
    ];
    let bar = crate::progress::bar((methods.len() * (args.reps + 1)) as u64, "runs");
    let mut best: Vec<Option<FcRow>> = vec![None; methods.len()];
    for rep in 0..=args.reps {
        for (i, m) in methods.iter().enumerate() {
            let row = run_one(m, dir.path(), &mem, &image, sizes, &want, args.handlers)?;
            bar.inc(1);
            if rep == 0 {
                continue; // warm-up
            }
            ensure!(
                row.verified,
                "{} from the {}: served memory differs from the snapshot",
                m.name,
                m.backing
            );
            if best[i]
                .as_ref()
                .is_none_or(|b| row.resident_ms < b.resident_ms)
            {
                best[i] = Some(row);
            }
        }
    }
    bar.finish_and_clear();
    let mut rows: Vec<FcRow> = best.into_iter().flatten().collect();
    let base = rows.first().map_or(1.0, |r| r.resident_ms);
    for r in &mut rows {
        r.vs_fault_all = r.resident_ms / base;
    }
    Ok(FcReport {
        size_mib: args.size >> 20,
        data_percent: args.data_percent,
        handlers: args.handlers,
        rows,
    })
}

pub fn render(r: &FcReport) -> String {
    let mut t = Table::new([
        "server (Firecracker protocol)",
        "backing",
        "until resident",
        "vs fault_all",
        "setup",
        "faults",
        "prefetched",
        "left to kernel",
    ]);
    for row in &r.rows {
        t.row([
            row.method.clone(),
            row.backing.clone(),
            format!("{:.1} ms", row.resident_ms),
            format!("{:.2}x", row.vs_fault_all),
            format!("{:.1} ms", row.setup_ms),
            row.faults.to_string(),
            row.prefetched.to_string(),
            row.left_to_kernel.to_string(),
        ]);
    }
    format!(
        "{} MiB in two regions, {}% of pages data, {} handler thread(s); every page verified, a discard read back as zeros\n{}",
        r.size_mib,
        r.data_percent,
        r.handlers,
        t.render()
    )
}
