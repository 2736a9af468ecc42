//! `livepage serve-firecracker`: a page server for Firecracker's UFFD memory
//! backend (`mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`),
//! on the full restore engine, with metrics and clean shutdown.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use livepage_restore::firecracker::{Backing, PrefetchPolicy, Server, ServerEvent, ServerOptions};

use crate::args::at_least_one;

/// Background prefetch for each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FcPrefetch {
    /// Faults only.
    None,
    /// Untouched pages in address order, following the latest fault.
    Sequential,
    /// The working set recorded for this snapshot first (--record-working-set),
    /// then sequential.
    Recorded,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("backing").required(true).args(["mem_file", "image"])))]
pub struct FirecrackerArgs {
    /// The Unix socket to listen on (Firecracker's `backend_path`). A stale
    /// socket nobody listens on is replaced.
    #[arg(long)]
    pub socket: PathBuf,
    /// Firecracker's memory snapshot file (raw; each region's bytes at its offset).
    #[arg(long)]
    pub mem_file: Option<PathBuf>,
    /// A livepage image (or delta chain) whose regions, end to end, are the
    /// guest memory (`livepage import-firecracker` makes one); or an image
    /// in a store (dir:///path/NAME, s3://bucket/prefix/NAME), its chunks
    /// fetched on demand through the host's chunk cache and shared by every
    /// VM served.
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub store: crate::store::StoreArgs,
    /// With an image in a store: the host's chunk cache (default
    /// $LIVEPAGE_CHUNK_CACHE, else ~/.cache/livepage/chunks).
    #[arg(long)]
    pub chunk_cache: Option<PathBuf>,
    /// Fault handler threads per VM.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub handlers: usize,
    /// Background prefetch per VM.
    #[arg(long, value_enum, default_value_t = FcPrefetch::Sequential)]
    pub prefetch: FcPrefetch,
    /// Record each VM's first-fault order as the snapshot's working set.
    #[arg(long)]
    pub record_working_set: bool,
    /// The working set file (default: the memory file's or image's path + `.wset`).
    #[arg(long)]
    pub working_set: Option<PathBuf>,
    /// Accept this many VMs, serve them to the end, then exit (default:
    /// serve until stopped).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_vms: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// One JSON object per event instead of text lines.
    #[arg(long)]
    pub json: bool,
}

/// Binds `path`, replacing a stale socket file nobody listens on.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: remove it or choose another --socket",
                path.display()
            );
        }
        match UnixStream::connect(path) {
            Ok(_) => bail!(
                "another server is listening on {}: stop it or choose another --socket",
                path.display()
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("removing the stale socket {}", path.display())
                        });
                    }
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("checking the socket {}", path.display()));
            }
        }
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

fn line(ev: &ServerEvent) -> String {
    match ev {
        ServerEvent::Accepted { vm, regions } => format!(
            "vm {vm}: accepted, {} region(s), {} MiB",
            regions.len(),
            regions.iter().map(|r| r.size).sum::<u64>() >> 20
        ),
        ServerEvent::Rejected {
            vm,
            reason,
            failed_closed,
        } => format!(
            "vm {vm}: handshake rejected: {reason}{}",
            if *failed_closed {
                " (its regions were poisoned so it fails at once)"
            } else {
                ""
            }
        ),
        ServerEvent::Notice { vm, message } => format!("vm {vm}: {message}"),
        ServerEvent::Finished(st) => format!(
            "vm {}: done after {:.2} s ({}): {} faults, {} prefetched, {} zero-filled, {} left to the kernel, {} discarded{}{}",
            st.vm,
            st.seconds,
            st.ended,
            st.faults,
            st.prefetched,
            st.zero_filled,
            st.left_to_kernel,
            st.discarded,
            if st.failed { "; FAILED" } else { "" },
            st.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    }
}

pub fn run(args: &FirecrackerArgs) -> anyhow::Result<ExitCode> {
    if args.prefetch == FcPrefetch::Recorded && args.record_working_set {
        bail!("--prefetch recorded replays a working set; record it in an earlier run");
    }
    if args.working_set.is_some()
        && args.prefetch != FcPrefetch::Recorded
        && !args.record_working_set
    {
        bail!(
            "--working-set names the file --prefetch recorded reads or --record-working-set writes; give one of them"
        );
    }
    let backing = match (&args.mem_file, &args.image) {
        (Some(f), None) => {
            args.store.only_for_stores(f)?;
            if args.chunk_cache.is_some() {
                bail!("--chunk-cache applies to an image in a store (dir:// or s3://)");
            }
            Backing::mem_file(f)
                .with_context(|| format!("opening the memory file {}", f.display()))?
        }
        (None, Some(i)) if crate::store::is_store_image(i) => {
            if args.working_set.is_none()
                && (args.record_working_set || args.prefetch == FcPrefetch::Recorded)
            {
                bail!(
                    "an image in a store has no file beside it for the working set: name one with --working-set"
                );
            }
            let img = crate::store::open_image_manifest(i, &args.store)?;
            let cache = crate::store::cache(args.chunk_cache.as_deref(), 4096)?;
            let name = img.url();
            Backing::source(
                &name,
                Arc::new(livepage_store::StoreSource::new(img, Some(cache))),
            )
        }
        (None, Some(i)) => {
            args.store.only_for_stores(i)?;
            if args.chunk_cache.is_some() {
                bail!("--chunk-cache applies to an image in a store (dir:// or s3://)");
            }
            Backing::image(i)?
        }
        _ => bail!("give exactly one of --mem-file and --image"),
    };
    let listener = bind(&args.socket)?;
    let opts = ServerOptions::default()
        .handlers(args.handlers)
        .prefetch(match args.prefetch {
            FcPrefetch::None => PrefetchPolicy::None,
            FcPrefetch::Sequential => PrefetchPolicy::Sequential,
            FcPrefetch::Recorded => PrefetchPolicy::Recorded,
        })
        .record_working_set(args.record_working_set)
        .working_set(args.working_set.clone())
        .max_vms(args.max_vms);
    let server = Server::new(backing, opts).context("starting the server")?;
    // SIGINT/SIGTERM: stop accepting, fail the VMs closed, clean up, exit.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    let (stopper, handle) = (server.stopper(), signals.handle());
    let signal_thread = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("signal {sig}: stopping; connected VMs are failed closed");
            stopper.stop();
        }
    });
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, server.metrics())?),
        None => None,
    };
    eprintln!(
        "serving {} MiB of guest memory on {} ({}; Ctrl-C to stop)",
        server.backing().len() >> 20,
        args.socket.display(),
        metrics
            .as_ref()
            .map(|m| format!("metrics on http://{}/metrics", m.addr()))
            .unwrap_or_else(|| "no metrics endpoint".into())
    );
    let json = args.json;
    let report: livepage_restore::firecracker::Reporter = Arc::new(move |ev: ServerEvent| {
        if json {
            if let Ok(l) = serde_json::to_string(&ev) {
                println!("{l}");
            }
        } else {
            println!("{}", line(&ev));
        }
    });
    let summary = server.run(listener, report);
    let _ = std::fs::remove_file(&args.socket);
    handle.close();
    let _ = signal_thread.join();
    drop(metrics);
    let summary = summary.context("serving")?;
    if summary.failed > 0 {
        eprintln!(
            "error: serving failed for {} of {} VM(s)",
            summary.failed, summary.accepted
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
