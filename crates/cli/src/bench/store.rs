//! `livepage bench store`: images in a real object store (Garage, started
//! here) over loopback and over a 1 Gbit/s shaped link between two network
//! namespaces. A chain of live checkpoints of the test VM is pushed (stored
//! bytes against its distinct chunks and against the images), ten clones
//! of one checkpoint are pushed (stored once), and the newest checkpoint is
//! resumed lazily from the store with a cold and a warm chunk cache, beside
//! the same chain resumed lazily from local files and beside copying it
//! first (a pull) then resuming. Every resume must end at the uninterrupted
//! run's checksum.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use livepage_netlab::Lab;
use livepage_netlab::garage::{self, Garage, NodeSpec};
use serde::Serialize;

use crate::args::parse_size;
use crate::table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum LinkArg {
    /// The store on loopback.
    Loopback,
    /// The store in another namespace behind 1 Gbit/s (tc tbf).
    #[value(name = "1g")]
    Gbit,
}

#[derive(Debug, Args)]
pub struct StoreBenchArgs {
    /// Guest RAM of the test VM (2 vCPUs, shmem).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub mem: u64,
    /// Checkpoints in the chain.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=20))]
    pub checkpoints: u32,
    /// Links.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["loopback", "1g"])]
    pub links: Vec<LinkArg>,
    /// Resumes per row (a cold row gets a fresh cache each time); each
    /// figure is the median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub repeat: u32,
    /// JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The median of each figure of `rows` (one resume each).
fn median_row(rows: &[ResumeRow]) -> ResumeRow {
    let f = |g: &dyn Fn(&ResumeRow) -> Option<f64>| median(rows.iter().filter_map(g).collect());
    let u = |g: &dyn Fn(&ResumeRow) -> Option<u64>| {
        median(rows.iter().filter_map(g).map(|x| x as f64).collect()).map(|x| x as u64)
    };
    let mut r = rows[0].clone();
    r.until_vcpus_run_ms = f(&|x| Some(x.until_vcpus_run_ms)).unwrap_or(0.0);
    r.until_resident_ms = f(&|x| x.until_resident_ms);
    r.fault_p50_us = f(&|x| x.fault_p50_us);
    r.fault_p99_us = f(&|x| x.fault_p99_us);
    r.chunks_from_store = u(&|x| x.chunks_from_store);
    r.chunks_from_cache = u(&|x| x.chunks_from_cache);
    r
}

/// One resume.
#[derive(Debug, Clone, Serialize)]
pub struct ResumeRow {
    pub link: LinkArg,
    pub how: String,
    pub until_vcpus_run_ms: f64,
    pub until_resident_ms: Option<f64>,
    /// Until resident ÷ the local-file lazy restore's.
    pub vs_local_file: Option<f64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub chunks_from_store: Option<u64>,
    pub chunks_from_cache: Option<u64>,
}

/// What the store holds.
#[derive(Debug, Clone, Serialize)]
pub struct StorageRow {
    pub link: LinkArg,
    pub images: u64,
    pub push_ms: f64,
    /// Bytes of the local image files (allocated).
    pub local_files_bytes: u64,
    /// Guest data in the images as full images (data pages × 4 KiB, summed).
    pub full_images_bytes: u64,
    /// Chunk objects and manifests stored.
    pub stored_bytes: u64,
    /// Stored ÷ the distinct chunks' bytes.
    pub vs_distinct_chunks: f64,
    /// One checkpoint pushed, then ten clones of it (under ten names):
    /// chunk bytes stored after one and after all ten.
    pub clone_one_bytes: u64,
    pub clone_ten_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mem_mib: u64,
    pub repeat: u32,
    pub checkpoints: u32,
    pub storage: Vec<StorageRow>,
    pub resumes: Vec<ResumeRow>,
}

/// Runs `livepage ARGS` (in a namespace if given) and returns its JSON.
fn run_json(
    lab: Option<&Lab>,
    env: &[(String, String)],
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut c = match lab {
        Some(l) => l.command(&l.a, &exe),
        None => Command::new(&exe),
    };
    let out = c
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .arg("--json")
        .output()
        .with_context(|| format!("running livepage {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "livepage {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the output of livepage {}", args.join(" ")))
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

fn resume_row(link: LinkArg, how: &str, r: &serde_json::Value) -> anyhow::Result<ResumeRow> {
    if r["matches_reference"] != true {
        bail!("{how}: the resumed guest does not match the uninterrupted run: {r}");
    }
    let st = &r["restore"];
    Ok(ResumeRow {
        link,
        how: how.into(),
        until_vcpus_run_ms: r["seconds_until_vcpus_run"].as_f64().unwrap_or(0.0) * 1e3,
        until_resident_ms: st["until_resident_ms"].as_f64(),
        vs_local_file: None,
        fault_p50_us: st["fault_p50_us"].as_f64(),
        fault_p99_us: st["fault_p99_us"].as_f64(),
        chunks_from_store: r["store"]["from_store"].as_u64(),
        chunks_from_cache: r["store"]["from_cache"].as_u64(),
    })
}

fn stored(lab: Option<&Lab>, env: &[(String, String)], url: &str) -> anyhow::Result<(u64, u64)> {
    let ls = run_json(lab, env, &["ls", url])?;
    let chunks = ls["chunk_bytes"].as_u64().unwrap_or(0);
    let manifests: u64 = ls["images"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["manifest_bytes"].as_u64()).sum())
        .unwrap_or(0);
    Ok((chunks + manifests, chunks))
}

pub fn run(args: &StoreBenchArgs) -> anyhow::Result<Report> {
    if garage::binary().is_none() {
        bail!("bench store needs Garage: cargo install garage --locked (or set $GARAGE)");
    }
    if args.links.contains(&LinkArg::Gbit) {
        if let Some(why) = Lab::available() {
            bail!("the 1g link needs network namespaces: {why} (or give --links loopback)");
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("livepage-bench-store")
        .tempdir_in("/var/tmp")?;
    let ck = dir.path().join("ck");
    let every = 10_000u64;
    eprintln!(
        "making {} live checkpoints of a {} MiB test VM...",
        args.checkpoints,
        args.mem >> 20
    );
    let mem = format!("{}M", args.mem >> 20);
    let iterations = (every * (u64::from(args.checkpoints) + 1)).to_string();
    let ck_s = ck.to_str().context("a UTF-8 temporary path")?;
    run_json(
        None,
        &[],
        &[
            "vm",
            "run",
            "--mem",
            &mem,
            "--vcpus",
            "2",
            "--workload",
            "dirty",
            "--memory",
            "shmem",
            "--iterations",
            &iterations,
            "--checkpoint-every",
            &every.to_string(),
            "--checkpoint-dir",
            ck_s,
        ],
    )?;
    let mut images: Vec<PathBuf> = std::fs::read_dir(&ck)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    images.sort();
    let head = images.last().context("no checkpoint was written")?.clone();
    let head_s = head.to_str().context("UTF-8")?.to_string();
    let head_name = head
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let local_files: u64 = images.iter().map(|p| allocated(p)).sum();
    let full: u64 = images
        .iter()
        .map(|p| {
            livepage_image::Chain::open(p).map_or(0, |c| {
                let r = c.head().regions()[0];
                (0..r.pages())
                    .filter(|&pg| matches!(c.locate(0, pg), Some((_, true))))
                    .count() as u64
                    * r.page_size
            })
        })
        .sum();
    let mut report = Report {
        mem_mib: args.mem >> 20,
        repeat: args.repeat,
        checkpoints: args.checkpoints,
        storage: Vec::new(),
        resumes: Vec::new(),
    };
    eprintln!("resuming from the local files...");
    let mut locals = Vec::new();
    for _ in 0..args.repeat {
        let local = run_json(None, &[], &["vm", "resume", &head_s, "--lazy"])?;
        locals.push(resume_row(LinkArg::Loopback, "local file, lazy", &local)?);
    }
    let local_row = median_row(&locals);
    let local_resident = local_row.until_resident_ms.unwrap_or(f64::NAN);
    report.resumes.push(local_row);
    for &link in &args.links {
        eprintln!("{link:?}: starting Garage, pushing, resuming...");
        let gdir = dir.path().join(format!("garage-{link:?}"));
        let lab = match link {
            LinkArg::Loopback => None,
            LinkArg::Gbit => {
                let l = Lab::new()?;
                l.shape(1000, 20)?;
                Some(l)
            }
        };
        let g = match &lab {
            None => Garage::single(&gdir)?,
            Some(l) => Garage::start(
                &gdir,
                &[NodeSpec {
                    netns: Some(l.b.clone()),
                    ip: std::net::IpAddr::V4(l.addr_b),
                    port: 3900,
                }],
                1,
                0,
            )?,
        };
        let env = g.env();
        let lab = lab.as_ref();
        let url = format!("s3://{}/bench", g.bucket);
        let p = run_json(lab, &env, &["push", &head_s, &url])?;
        let (stored_bytes, chunk_bytes) = stored(lab, &env, &url)?;
        let base = images[0].to_str().context("UTF-8")?;
        let clones = format!("s3://{}/clones", g.bucket);
        run_json(lab, &env, &["push", base, &clones, "--name", "clone-0"])?;
        let (_, one) = stored(lab, &env, &clones)?;
        for i in 1..10 {
            let name = format!("clone-{i}");
            run_json(lab, &env, &["push", base, &clones, "--name", &name])?;
        }
        let (_, ten) = stored(lab, &env, &clones)?;
        report.storage.push(StorageRow {
            link,
            images: images.len() as u64,
            push_ms: p["duration_ms"].as_f64().unwrap_or(0.0),
            local_files_bytes: local_files,
            full_images_bytes: full,
            stored_bytes,
            vs_distinct_chunks: stored_bytes as f64 / chunk_bytes.max(1) as f64,
            clone_one_bytes: one,
            clone_ten_bytes: ten,
        });
        let img = format!("{url}/{head_name}");
        let warm = dir.path().join(format!("cache-{link:?}"));
        for (how, cold, minor) in [
            ("store, cold cache", true, false),
            ("store, warm cache", false, false),
            ("store, warm cache, minor", false, true),
        ] {
            let mut rows = Vec::new();
            for rep in 0..args.repeat {
                // A cold row starts from an empty cache each time; the
                // first one leaves the cache the warm rows use.
                let cache = if cold && rep > 0 {
                    dir.path().join(format!("cache-{link:?}-{rep}"))
                } else {
                    warm.clone()
                };
                let cache_s = cache.to_str().context("UTF-8")?;
                let mut a = vec![
                    "vm",
                    "resume",
                    img.as_str(),
                    "--lazy",
                    "--chunk-cache",
                    cache_s,
                ];
                if minor {
                    a.extend(["--mode", "minor", "--memory", "shmem"]);
                }
                let r = run_json(lab, &env, &a)?;
                rows.push(resume_row(link, how, &r)?);
            }
            let mut row = median_row(&rows);
            row.vs_local_file = row.until_resident_ms.map(|m| m / local_resident);
            report.resumes.push(row);
        }
        // The copy-first baseline: the whole image pulled, then resumed.
        let pulled = dir.path().join(format!("pulled-{link:?}.img"));
        let pl = run_json(
            lab,
            &env,
            &["pull", &img, pulled.to_str().context("UTF-8")?],
        )?;
        let r = run_json(
            None,
            &[],
            &["vm", "resume", pulled.to_str().context("UTF-8")?, "--lazy"],
        )?;
        let mut row = resume_row(link, "pull (copy), then lazy from the file", &r)?;
        row.until_vcpus_run_ms += pl["duration_ms"].as_f64().unwrap_or(0.0);
        report.resumes.push(row);
        drop(g);
    }
    Ok(report)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn opt(v: Option<f64>, d: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.d$}"))
}

pub fn render(r: &Report) -> String {
    let mut t = Table::new([
        "link",
        "images",
        "push ms",
        "local files MiB",
        "as full images MiB",
        "stored MiB",
        "÷ distinct chunks",
        "1 clone MiB",
        "10 clones MiB",
    ]);
    for s in &r.storage {
        t.row([
            format!("{:?}", s.link),
            s.images.to_string(),
            format!("{:.0}", s.push_ms),
            mib(s.local_files_bytes),
            mib(s.full_images_bytes),
            mib(s.stored_bytes),
            format!("{:.3}x", s.vs_distinct_chunks),
            mib(s.clone_one_bytes),
            mib(s.clone_ten_bytes),
        ]);
    }
    let mut u = Table::new([
        "link",
        "resume",
        "until vCPUs run ms",
        "until resident ms",
        "÷ local file",
        "fault p50 µs",
        "fault p99 µs",
        "chunks from store",
        "from cache",
    ]);
    for x in &r.resumes {
        u.row([
            format!("{:?}", x.link),
            x.how.clone(),
            format!("{:.1}", x.until_vcpus_run_ms),
            opt(x.until_resident_ms, 0),
            x.vs_local_file.map_or("-".into(), |v| format!("{v:.2}x")),
            opt(x.fault_p50_us, 0),
            opt(x.fault_p99_us, 0),
            x.chunks_from_store.map_or("-".into(), |v| v.to_string()),
            x.chunks_from_cache.map_or("-".into(), |v| v.to_string()),
        ]);
    }
    format!(
        "{} MiB test VM, a chain of {} live checkpoints; resumes: the median of {}\n{}\n{}",
        r.mem_mib,
        r.checkpoints,
        r.repeat,
        t.render(),
        u.render()
    )
}
