//! `livepage demo`: the main scenario on embedded defaults.

use std::process::ExitCode;

use crate::args::{MemoryArg, ModeArg, PrefetchArg, WorkloadKind};
use crate::bench::demand::{self, DemandArgs, Layout};
use crate::bench::faults::{self, FaultsArgs, Path, Strategy};
use crate::vm::resume::ResumeArgs;
use crate::vm::run::RunArgs;

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let section = |title: &str| {
        if !json {
            println!("\n== {title} ==");
        }
    };
    section("livepage probe");
    let code = crate::probe::run(json)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }

    section("fault serving: livepage kernel layer vs a raw libc loop");
    let args = FaultsArgs {
        threads: vec![1, 4],
        handlers: vec![1, 2],
        strategies: vec![Strategy::Read, Strategy::SameCpu],
        paths: vec![Path::AnonCopy, Path::ShmemContinue],
        pages: 2048,
        reps: 8,
        json,
    };
    let rows = faults::run(&args)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", faults::render(&rows));
    }

    if let Err(e) = livepage_testvm::check_host() {
        if !json {
            println!("\n(skipping the test VM: {e})");
        }
        return Ok(ExitCode::SUCCESS);
    }
    section(
        "test VM: 2 vCPUs, 256 MiB of shmem, seeded read-modify-writes, live snapshot at step 40960",
    );
    let dir = std::env::temp_dir().join(format!("livepage-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("vm.img");
    let code = crate::vm::run::run(&RunArgs {
        mem: 256 << 20,
        vcpus: 2,
        workload: WorkloadKind::Dirty,
        seed: 7,
        iterations: 100_000,
        memory: MemoryArg::Shmem,
        snapshot_at: Some(40_000),
        snapshot_out: Some(image.clone()),
        buffer: Some(16 << 20),
        snapshot_handlers: None,
        checkpoint_every: None,
        checkpoint_mode: crate::vm::run::CheckpointMode::Live,
        checkpoint_dir: None,
        keep: None,
        tracker: None,
        migrate: Default::default(),
        json,
    })?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    section(
        "the live snapshot, verified and resumed lazily in a new VM (minor mode: page cache filled through a second mapping, UFFDIO_CONTINUE): same checksum as the uninterrupted run",
    );
    crate::verify::verify(&image, json)?;
    let code = crate::vm::resume::resume(&lazy_resume(image.clone(), ModeArg::Minor, None, json))?;

    if code != ExitCode::SUCCESS {
        return Ok(code);
    }

    section(
        "live incremental checkpoints of the running VM (WP_ASYNC + PAGEMAP_SCAN; the vCPUs pause for the harvest, the delta is saved while they run; --keep 2 folds older deltas into their parents in the background), then a resume from the older kept one",
    );
    let ck = dir.join("checkpoints");
    let code = crate::vm::run::run(&RunArgs {
        mem: 128 << 20,
        vcpus: 2,
        workload: WorkloadKind::Dirty,
        seed: 11,
        iterations: 60_000,
        memory: MemoryArg::Anon,
        snapshot_at: None,
        snapshot_out: None,
        buffer: None,
        snapshot_handlers: None,
        checkpoint_every: Some(15_000),
        checkpoint_mode: crate::vm::run::CheckpointMode::Live,
        checkpoint_dir: Some(ck.clone()),
        keep: std::num::NonZeroUsize::new(2),
        tracker: None,
        migrate: Default::default(),
        json,
    })?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    crate::verify::verify(&ck.join("checkpoint-0003.img"), json)?;
    let code = crate::vm::resume::resume(&lazy_resume(
        ck.join("checkpoint-0002.img"),
        ModeArg::Missing,
        Some(2),
        json,
    ))?;

    if code != ExitCode::SUCCESS {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(code);
    }

    section(
        "the checkpoint chain pushed to a chunk store (dir://; s3:// works the same): 512 KiB chunks named by their BLAKE3 hash, zstd-compressed, each stored once; then a lazy resume straight from the store through a chunk cache",
    );
    let store_url = format!("dir://{}", dir.join("store").display());
    crate::store::push(&crate::store::PushArgs {
        image: ck.join("checkpoint-0003.img"),
        url: store_url.clone(),
        name: None,
        level: 3,
        threads: 2,
        store: crate::store::StoreArgs {
            store_deadline: None,
        },
        json,
    })?;
    let code = crate::vm::resume::resume(&ResumeArgs {
        chunk_cache: Some(dir.join("chunk-cache")),
        chunk_cache_mib: Some(256),
        ..lazy_resume(
            format!("{store_url}/checkpoint-0003.img").into(),
            ModeArg::Missing,
            None,
            json,
        )
    })?;

    if code != ExitCode::SUCCESS {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(code);
    }

    section(
        "live migration over loopback with mutual TLS 1.3: hybrid (pre-copy rounds, then post-copy in minor mode: the destination resumes before the stale set arrives)",
    );
    let code = migrate(&dir, json);
    let _ = std::fs::remove_dir_all(&dir);
    if code? != ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }

    section("KVM demand paging through userfaultfd (guest faults served by livepage)");
    let rows = demand::run(&DemandArgs {
        vcpus: vec![1, 2],
        mem_per_vcpu: 16 << 20,
        handlers: vec![1],
        paths: vec![Path::AnonCopy, Path::ShmemContinue],
        layouts: vec![Layout::Shared, Layout::PerVcpu],
        json,
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", demand::render(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// A short migration of the test VM to a `vm receive` child on loopback;
/// the destination's report follows the source's.
fn migrate(dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    let creds = dir.join("creds");
    livepage_migrate::tls::generate(&creds, &[])?;
    // A free port on loopback, then the destination listening on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut dest = Command::new(std::env::current_exe()?)
        .args(["vm", "receive", "--memory", "shmem", "--mode", "minor"])
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--tls-creds")
        .arg(&creds)
        .args(if json { &["--json"][..] } else { &[][..] })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(dest.stderr.take().expect("piped"));
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            let _ = dest.wait();
            anyhow::bail!("the destination (vm receive) did not start");
        }
    }
    // Its later progress lines are not shown; its report is.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let code = crate::vm::run::run(&RunArgs {
        mem: 128 << 20,
        vcpus: 2,
        workload: WorkloadKind::Dirty,
        seed: 5,
        iterations: 60_000,
        memory: MemoryArg::Shmem,
        snapshot_at: None,
        snapshot_out: None,
        buffer: None,
        snapshot_handlers: None,
        checkpoint_every: None,
        checkpoint_mode: crate::vm::run::CheckpointMode::Live,
        checkpoint_dir: None,
        keep: None,
        tracker: None,
        migrate: crate::vm::migrate::MigrateArgs {
            migrate_to: Some(addr),
            migrate_at: Some(20_000),
            migration: Some(crate::vm::migrate::MethodArg::Hybrid),
            write_rate: Some(4_000),
            link: crate::migration::LinkArgs {
                tls_creds: Some(creds),
                ..Default::default()
            },
            ..Default::default()
        },
        json,
    });
    // A source that failed before connecting leaves the destination
    // waiting for one: it gets a minute to finish, then is stopped.
    let mut out = dest.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut report = String::new();
        let _ = out.read_to_string(&mut report);
        report
    });
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = dest.try_wait()? {
            break st;
        }
        if code.is_err() || t0.elapsed() > std::time::Duration::from_secs(60) {
            let _ = dest.kill();
            break dest.wait()?;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let report = reader.join().unwrap_or_default();
    if !json {
        println!("\ndestination (vm receive):");
    }
    print!("{report}");
    let code = code?;
    if code != ExitCode::SUCCESS || !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// A lazy `vm resume` of `image` in `mode` with two handlers and
/// sequential prefetch (the demo's resumes differ only there).
fn lazy_resume(
    image: std::path::PathBuf,
    mode: ModeArg,
    uffds: Option<usize>,
    json: bool,
) -> ResumeArgs {
    ResumeArgs {
        image,
        memory: None,
        lazy: true,
        mode: Some(mode),
        prefetch: Some(PrefetchArg::Sequential),
        handlers: Some(2),
        uffds,
        working_set: None,
        record_working_set: false,
        chunk_cache: None,
        no_chunk_cache: false,
        chunk_cache_mib: None,
        store: crate::store::StoreArgs {
            store_deadline: None,
        },
        json,
    }
}
