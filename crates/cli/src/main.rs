//! The livepage command line: one module per command, argument types shared
//! in `args`, the domain code in the libraries.
#![forbid(unsafe_code)]

mod args;
mod bench;
mod demo;
mod import;
mod inspect;
mod merge;
mod metrics;
mod migration;
mod probe;
mod progress;
mod prune;
mod serve_firecracker;
mod store;
mod table;
mod verify;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// livepage: live snapshots, incremental checkpoints and lazy restore of
/// process and VM memory with Linux userfaultfd.
#[derive(Debug, Parser)]
#[command(name = "livepage", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this kernel and this process can do (userfaultfd features,
    /// PAGEMAP_SCAN, huge pages, THP, /dev/kvm, permissions).
    Probe {
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks, each beside a peer measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The test VM.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Describe an image: regions, page counts, parent, VM state.
    Inspect {
        /// The image: a file, or a store address (dir:///path/NAME, s3://bucket/prefix/NAME).
        image: std::path::PathBuf,
        #[command(flatten)]
        store: store::StoreArgs,
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Compact an image and its parents into one full image.
    Merge {
        /// The newest image of the chain.
        image: std::path::PathBuf,
        /// The merged image (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Keep the last N checkpoints of a chain resumable: fold its oldest
    /// deltas into their parents (write, fsync, rename; never in place) and
    /// sweep what an interrupted fold left.
    Prune {
        /// The newest image of the chain.
        image: std::path::PathBuf,
        /// Checkpoints to keep (at least 1).
        #[arg(long)]
        keep: std::num::NonZeroUsize,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum of an image (and of its parents); on corruption name
    /// the page and file offset, on a broken chain the missing or corrupt parent.
    Verify {
        /// The image: a file, or a store address (every chunk is fetched
        /// and checked against its name).
        image: std::path::PathBuf,
        #[command(flatten)]
        store: store::StoreArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Upload an image and its parents to a store (dir:///path or
    /// s3://bucket/prefix), as content-addressed compressed chunks: only the
    /// chunks the store lacks are sent.
    Push(store::PushArgs),
    /// Write an image from a store to a local (full) image file.
    Pull(store::PullArgs),
    /// List the images in a store.
    Ls(store::LsArgs),
    /// Delete the chunks of a store that no image names.
    Gc(store::GcArgs),
    /// Serve Firecracker VMs' page faults (its UFFD handshake) from its memory
    /// file or a livepage image, for as many VMs as connect: prefetch, zero
    /// runs, several handler threads per VM, metrics.
    ServeFirecracker(serve_firecracker::FirecrackerArgs),
    /// Turn Firecracker's raw memory file into a livepage image (zero pages
    /// recorded, every page checksummed).
    ImportFirecracker(import::ImportArgs),
    /// Make a test CA and a destination (server) and source (client)
    /// certificate signed by it, for migrations with --tls-creds DIR.
    TlsCreds {
        /// Directory to write ca-cert.pem, server-cert.pem, server-key.pem,
        /// client-cert.pem and client-key.pem into (created; files replaced).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Further names (DNS names or IP addresses) the destination's
        /// certificate carries besides "livepage".
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// The main scenario on embedded defaults: probe, then a short fault benchmark.
    Demo {
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Demand-paging rate of the kernel layer against a raw-libc handler loop.
    Faults(bench::faults::FaultsArgs),
    /// KVM demand paging with the test VM: pages/s against vCPUs, userfaultfd
    /// layout and handler threads, beside the same guest without userfaultfd.
    DemandPaging(bench::demand::DemandArgs),
    /// Live snapshots (buffer 0 to 256 MiB) against fork() and stop-the-world
    /// while writers dirty new pages at fixed rates.
    Snapshot(bench::snapshot::SnapshotBenchArgs),
    /// Dirty tracking: collect-and-re-arm cost against region size and dirty
    /// fraction, and the cost of a tracked write, per backend.
    Track(bench::track::TrackArgs),
    /// Restoring a large image: eager read, a MAP_PRIVATE mapping, and lazy
    /// restore in missing and minor mode with each prefetch policy; then the
    /// test VM's demand paging against handler threads.
    Restore(bench::restore::RestoreBenchArgs),
    /// Serving Firecracker VMs: time until every page is resident, livepage's
    /// server (prefetch, zero runs) against Firecracker's fault_all strategy.
    Firecracker(bench::firecracker::FirecrackerBenchArgs),
    /// Live migration of the test VM between two network namespaces: every
    /// method at several write rates over 1 Gbit/s and 100 Mbit/s + 10 ms,
    /// beside stop-and-copy and the physical limit.
    Migrate(bench::migrate::MigrateBenchArgs),
    /// Images in an object store (Garage, started here) over loopback and a
    /// 1 Gbit/s link: push (dedup, compression, clones) and lazy resume with
    /// a cold and a warm chunk cache, beside local files and copy-first.
    Store(bench::store::StoreBenchArgs),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Run the test VM to completion and check its memory against the host
    /// reference; optionally take a live snapshot on the way.
    Run(Box<vm::run::RunArgs>),
    /// Continue the test VM from a snapshot image (loaded eagerly, or lazily
    /// with --lazy) and check that it ends with the same memory as an
    /// uninterrupted run.
    Resume(vm::resume::ResumeArgs),
    /// Receive a test VM migrated live from `vm run --migrate-to`, run it to
    /// the end here and check its memory against the host reference.
    Receive(vm::receive::ReceiveArgs),
}

fn tls_creds(out: &std::path::Path, names: &[String]) -> anyhow::Result<ExitCode> {
    let files = livepage_migrate::tls::generate(out, names)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints benchmark rows as JSON or as the table `render` makes.
fn report<T: serde::Serialize>(
    json: bool,
    rows: &T,
    render: impl FnOnce() -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        print!("{}", render());
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe { json } => probe::run(json),
        Command::Bench(BenchCommand::Faults(args)) => bench::faults::run(&args)
            .and_then(|rows| report(args.json, &rows, || bench::faults::render(&rows))),
        Command::Bench(BenchCommand::DemandPaging(args)) => bench::demand::run(&args)
            .and_then(|rows| report(args.json, &rows, || bench::demand::render(&rows))),
        Command::Bench(BenchCommand::Restore(args)) => bench::restore::run(&args)
            .and_then(|r| report(args.json, &r, || bench::restore::render(&r))),
        Command::Bench(BenchCommand::Migrate(args)) => bench::migrate::run(&args)
            .and_then(|r| report(args.json, &r, || bench::migrate::render(&r))),
        Command::Bench(BenchCommand::Store(args)) => bench::store::run(&args)
            .and_then(|r| report(args.json, &r, || bench::store::render(&r))),
        Command::Bench(BenchCommand::Firecracker(args)) => bench::firecracker::run(&args)
            .and_then(|r| report(args.json, &r, || bench::firecracker::render(&r))),
        Command::Bench(BenchCommand::Snapshot(args)) => {
            bench::snapshot::run(&args).and_then(|rows| {
                report(args.json, &rows, || {
                    bench::snapshot::render(&rows, args.writers)
                })
            })
        }
        Command::Bench(BenchCommand::Track(args)) => bench::track::main(&args),
        Command::Vm(VmCommand::Run(args)) => vm::run::run(&args),
        Command::Vm(VmCommand::Resume(args)) => vm::resume::resume(&args),
        Command::Vm(VmCommand::Receive(args)) => vm::receive::receive(&args),
        Command::TlsCreds { out, names } => tls_creds(&out, &names),
        Command::Inspect { image, store, json } if store::is_store_image(&image) => {
            store::inspect(&image, &store, json)
        }
        Command::Inspect { image, store, json } => store
            .only_for_stores(&image)
            .and_then(|()| inspect::inspect(&image, json)),
        Command::Verify { image, store, json } if store::is_store_image(&image) => {
            store::verify(&image, &store, json)
        }
        Command::Verify { image, store, json } => store
            .only_for_stores(&image)
            .and_then(|()| verify::verify(&image, json)),
        Command::Push(a) => store::push(&a),
        Command::Pull(a) => store::pull(&a),
        Command::Ls(a) => store::ls(&a),
        Command::Gc(a) => store::gc(&a),
        Command::Merge { image, out, json } => merge::merge(&image, &out, json),
        Command::Prune { image, keep, json } => prune::prune(&image, keep, json),
        Command::ServeFirecracker(args) => serve_firecracker::run(&args),
        Command::ImportFirecracker(args) => import::run(&args),
        Command::Demo { json } => demo::run(json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
