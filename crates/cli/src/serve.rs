//! `livepage serve-firecracker`: a page-fault server for Firecracker's UFFD
//! memory backend (`mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, bail};
use clap::Args;
use livepage_restore::firecracker::{Backing, ServerEvent, serve};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("backing").required(true).args(["mem_file", "image"])))]
pub struct FirecrackerArgs {
    /// The Unix socket to listen on (Firecracker's `backend_path`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Firecracker's memory snapshot file (raw; each region's bytes at its offset).
    #[arg(long)]
    pub mem_file: Option<PathBuf>,
    /// A livepage image (or delta chain) whose regions, end to end, are the guest memory.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Exit after this many VMs have come and gone (default: serve until killed).
    #[arg(long)]
    pub max_vms: Option<u64>,
    /// One JSON object per event instead of text lines.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &FirecrackerArgs) -> anyhow::Result<ExitCode> {
    let backing = match (&args.mem_file, &args.image) {
        (Some(f), None) => Backing::mem_file(f)
            .with_context(|| format!("opening the memory file {}", f.display()))?,
        (None, Some(i)) => Backing::image(i)?,
        _ => bail!("give exactly one of --mem-file and --image"),
    };
    if args.socket.exists() {
        bail!(
            "{} already exists: remove it or choose another --socket",
            args.socket.display()
        );
    }
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    eprintln!(
        "serving {} MiB of guest memory on {} (Ctrl-C to stop)",
        backing.len() >> 20,
        args.socket.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicU64::new(0));
    let (json, max, s2, f2) = (args.json, args.max_vms, stop.clone(), finished.clone());
    let report = Arc::new(move |ev: ServerEvent| {
        if json {
            if let Ok(line) = serde_json::to_string(&ev) {
                println!("{line}");
            }
        } else {
            match &ev {
                ServerEvent::Accepted { vm, regions } => println!(
                    "vm {vm}: accepted, {} region(s), {} MiB",
                    regions.len(),
                    regions.iter().map(|r| r.size).sum::<u64>() >> 20
                ),
                ServerEvent::Rejected { vm, reason } => {
                    println!("vm {vm}: handshake rejected: {reason}")
                }
                ServerEvent::Finished(st) => println!(
                    "vm {}: done after {:.2} s ({}): {} faults with data, {} zero, {} KiB discarded",
                    st.vm,
                    st.seconds,
                    st.ended,
                    st.faults,
                    st.zero_faults,
                    st.removed_bytes >> 10
                ),
            }
        }
        if matches!(ev, ServerEvent::Finished(_)) {
            let n = f2.fetch_add(1, Ordering::SeqCst) + 1;
            if max.is_some_and(|m| n >= m) {
                s2.store(true, Ordering::SeqCst);
            }
        }
    });
    let r = serve(listener, Arc::new(backing), stop, report);
    let _ = std::fs::remove_file(&args.socket);
    r.context("serving")?;
    Ok(ExitCode::SUCCESS)
}
