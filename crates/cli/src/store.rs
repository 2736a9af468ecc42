//! `livepage push | pull | ls | gc`, and opening an image by its store
//! address for the commands that read images.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use livepage_store::{ChunkCache, PushOptions, Store, StoreImage, StoreOptions, StoreUrl, is_url};

use crate::table::{Table, mib};

/// Options for reaching a store (every command that takes an address).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// With a store address: seconds a store request is retried (with
    /// backoff) before the store counts as unreachable (default 30).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub store_deadline: Option<u64>,
}

impl StoreArgs {
    pub fn options(&self, create: bool) -> StoreOptions {
        StoreOptions {
            deadline: Duration::from_secs(self.store_deadline.unwrap_or(30)),
            create,
        }
    }

    /// Refuses the store options for a local image.
    pub fn only_for_stores(&self, image: &Path) -> anyhow::Result<()> {
        if self.store_deadline.is_some() && !is_store_image(image) {
            bail!(
                "--store-deadline applies to an image in a store (dir:// or s3://), not to {}",
                image.display()
            );
        }
        Ok(())
    }
}

/// Whether a command-line image argument is a store address.
pub fn is_store_image(p: &Path) -> bool {
    p.to_str().is_some_and(is_url)
}

/// Opens the image at a store address (`dir:///path/NAME`,
/// `s3://bucket/prefix/NAME`), its span list included.
pub fn open_image(url: &Path, args: &StoreArgs) -> anyhow::Result<StoreImage> {
    let (store, name) = open_store(url, args)?;
    Ok(StoreImage::open(store, &name)?)
}

/// Opens the image at a store address with its manifest only: what a lazy
/// restore needs to start (its page source fetches the span list).
pub fn open_image_manifest(url: &Path, args: &StoreArgs) -> anyhow::Result<StoreImage> {
    let (store, name) = open_store(url, args)?;
    Ok(StoreImage::open_manifest(store, &name)?)
}

fn open_store(url: &Path, args: &StoreArgs) -> anyhow::Result<(Arc<Store>, String)> {
    let url = url.to_str().context("a store address is UTF-8")?;
    let (store, name) = StoreUrl::parse_image(url)?;
    Ok((Arc::new(Store::open(&store, args.options(false))?), name))
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The local image (its parents go too).
    pub image: std::path::PathBuf,
    /// The store: dir:///path or s3://bucket/prefix (endpoint and credentials
    /// from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    pub url: String,
    /// Name of the image in the store (default: its file name).
    #[arg(long)]
    pub name: Option<String>,
    /// zstd level for new chunks.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Uploads at once.
    #[arg(long, default_value_t = 4, value_parser = crate::args::at_least_one)]
    pub threads: usize,
    #[command(flatten)]
    pub store: StoreArgs,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

pub fn push(a: &PushArgs) -> anyhow::Result<ExitCode> {
    if is_store_image(&a.image) {
        bail!("push takes a local image; to copy between stores, pull then push");
    }
    let url = StoreUrl::parse(&a.url)?;
    let store = Store::open(&url, a.store.options(true))?;
    let bar = crate::progress::bar(0, "pushing");
    let opts = PushOptions {
        name: a.name.clone(),
        level: a.level,
        threads: a.threads,
    };
    let r = livepage_store::push(&a.image, &store, &opts, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("pushing {} to {}", a.image.display(), store.url()))?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(["image", "chunks new", "shared", "zero", "note"]);
    for i in &r.images {
        t.row([
            i.name.clone(),
            i.chunks_new.to_string(),
            i.chunks_shared.to_string(),
            i.chunks_zero.to_string(),
            if i.already_there {
                "already there".into()
            } else {
                String::new()
            },
        ]);
    }
    print!("{}", t.render());
    println!(
        "{}: {} of guest memory in {} image(s); {} new chunks ({} uncompressed) sent as {} (compression {:.2}x), {} shared, in {:.0} ms",
        r.store,
        mib(r.guest_bytes),
        r.images.len(),
        r.chunks_new,
        mib(r.new_bytes),
        mib(r.bytes_sent),
        r.compression_ratio,
        r.chunks_shared,
        r.duration_ms
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image's address: a store address then /NAME.
    pub url: std::path::PathBuf,
    /// The local image to write (must not exist); a full image.
    pub image: std::path::PathBuf,
    /// Downloads at once.
    #[arg(long, default_value_t = 4, value_parser = crate::args::at_least_one)]
    pub threads: usize,
    #[command(flatten)]
    pub store: StoreArgs,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

pub fn pull(a: &PullArgs) -> anyhow::Result<ExitCode> {
    if !is_store_image(&a.url) {
        bail!(
            "{} is not a store address (dir:///path/NAME or s3://bucket/prefix/NAME)",
            a.url.display()
        );
    }
    let img = open_image(&a.url, &a.store)?;
    let bar = crate::progress::bar(img.manifest().bytes(), "pulling");
    let r = livepage_store::pull(&img, &a.image, a.threads, &|done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} -> {}: {} chunks, {} in {:.0} ms (id {})",
            r.image,
            r.path,
            r.chunks,
            mib(r.bytes),
            r.duration_ms,
            r.image_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// The store.
    pub url: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

pub fn ls(a: &LsArgs) -> anyhow::Result<ExitCode> {
    let store = Arc::new(Store::open(
        &StoreUrl::parse(&a.url)?,
        a.store.options(false),
    )?);
    let mut rows = Vec::new();
    for l in store.list("images")? {
        let name = l.key.trim_start_matches("images/").to_string();
        let m = match StoreImage::open(store.clone(), &name) {
            Ok(i) => Some(Ok(i.manifest().clone())),
            // Deleted while listing.
            Err(livepage_store::StoreError::NoImage { .. }) => None,
            Err(e) => Some(Err(e.to_string())),
        };
        rows.push((name, l.size, m));
    }
    let chunks = store.list("chunks")?;
    let stored: u64 = chunks.iter().map(|c| c.size).sum();
    if a.json {
        let images: Vec<_> = rows
            .iter()
            .map(|(n, size, m)| match m {
                Some(Ok(m)) => serde_json::json!({
                    "name": n, "manifest_bytes": size, "guest_bytes": m.bytes(),
                    "chunks": m.chunk_ids().count(), "parent": m.parent,
                    "created_unix": m.created, "pushed_unix": m.pushed,
                    "image_id": m.image_id, "vm_state": m.vm_state.is_some(),
                }),
                Some(Err(e)) => serde_json::json!({"name": n, "error": e}),
                None => serde_json::json!({"name": n, "error": "deleted while listing"}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "store": store.url(), "images": images,
                "chunks": chunks.len(), "chunk_bytes": stored,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(["image", "guest memory", "chunks", "parent", "VM state"]);
    for (n, _, m) in &rows {
        match m {
            Some(Ok(m)) => t.row([
                n.clone(),
                mib(m.bytes()),
                m.chunk_ids().count().to_string(),
                m.parent.clone().unwrap_or_else(|| "-".into()),
                if m.vm_state.is_some() { "yes" } else { "no" }.into(),
            ]),
            Some(Err(e)) => t.row([n.clone(), format!("unreadable: {e}")]),
            None => {}
        }
    }
    print!("{}", t.render());
    println!(
        "{}: {} image(s), {} chunks stored in {}",
        store.url(),
        rows.len(),
        chunks.len(),
        mib(stored)
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The store.
    pub url: String,
    /// Keep unnamed chunks younger than this many seconds: a push running
    /// meanwhile may still name them.
    #[arg(long, default_value_t = 3600)]
    pub min_age: u64,
    /// Count what would go, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

pub fn gc(a: &GcArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(&StoreUrl::parse(&a.url)?, a.store.options(false))?;
    let r = livepage_store::gc(&store, Duration::from_secs(a.min_age), a.dry_run)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {} image(s), {} chunks, {} named; {} {} ({}), {} younger than {} s kept",
            r.store,
            r.images,
            r.chunks,
            r.referenced,
            if r.dry_run { "would delete" } else { "deleted" },
            r.deleted,
            mib(r.deleted_bytes),
            r.young_kept,
            a.min_age
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `inspect` of a store image.
pub fn inspect(url: &Path, args: &StoreArgs, json: bool) -> anyhow::Result<ExitCode> {
    let img = open_image(url, args)?;
    let m = img.manifest();
    if json {
        let mut v = serde_json::to_value(m)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("regions");
            o.insert("url".into(), img.url().into());
            o.insert("guest_bytes".into(), m.bytes().into());
            o.insert(
                "regions".into(),
                m.regions
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "base": format!("{:#x}", r.base), "len": r.len, "page_size": r.page_size,
                            "kind": livepage_image::kind::name(r.kind), "chunk_pages": r.chunk_pages,
                            "chunks": r.chunks.iter().filter(|c| c.is_some()).count(),
                            "zero_spans": r.chunks.iter().filter(|c| c.is_none()).count(),
                        })
                    })
                    .collect(),
            );
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new([
        "region",
        "base",
        "size",
        "page",
        "kind",
        "chunks",
        "zero spans",
    ]);
    for (i, r) in m.regions.iter().enumerate() {
        t.row([
            i.to_string(),
            format!("{:#x}", r.base),
            mib(r.len),
            r.page_size.to_string(),
            livepage_image::kind::name(r.kind).to_string(),
            r.chunks.iter().filter(|c| c.is_some()).count().to_string(),
            r.chunks.iter().filter(|c| c.is_none()).count().to_string(),
        ]);
    }
    println!(
        "{} (pushed from image {}{})",
        img.url(),
        m.image_id,
        m.parent
            .as_ref()
            .map(|p| format!(", a checkpoint after {p}"))
            .unwrap_or_default()
    );
    print!("{}", t.render());
    println!(
        "VM state: {}",
        if m.vm_state.is_some() { "yes" } else { "none" }
    );
    Ok(ExitCode::SUCCESS)
}

/// `verify` of a store image: every chunk fetched and checked.
pub fn verify(url: &Path, args: &StoreArgs, json: bool) -> anyhow::Result<ExitCode> {
    let img = open_image(url, args)?;
    let n = img.verify(4)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"url": img.url(), "ok": true, "chunks_checked": n})
        );
    } else {
        println!(
            "{}: ok ({n} chunks fetched, each hashing to its name)",
            img.url()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The host's chunk cache at `dir` (default: [`ChunkCache::default_dir`]).
pub fn cache(dir: Option<&Path>, max_mib: u64) -> anyhow::Result<Arc<ChunkCache>> {
    let d = dir.map_or_else(ChunkCache::default_dir, Path::to_path_buf);
    Ok(Arc::new(ChunkCache::open(&d, max_mib << 20)?))
}

/// Loads a store image's one region eagerly (chunks fetched and verified
/// four at a time). `progress` gets pages done.
pub fn load(
    img: &StoreImage,
    kind: livepage_mem::MemoryKind,
    progress: impl Fn(u64) + Sync,
) -> anyhow::Result<Arc<livepage_mem::Region>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let m = img.manifest();
    let reg = m.regions.first().context("the image holds no region")?;
    let region = Arc::new(livepage_mem::Region::new(kind, reg.len as usize)?);
    let (next, done) = (AtomicUsize::new(0), AtomicU64::new(0));
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while let Some(c) =
                    Some(next.fetch_add(1, Ordering::Relaxed)).filter(|c| *c < reg.chunks.len())
                {
                    let (a, b) = reg.span(c);
                    let r =
                        img.read_span(0, c)
                            .map_err(anyhow::Error::from)
                            .and_then(|d| match d {
                                Some(d) => region
                                    .write((a * reg.page_size) as usize, &d)
                                    .map_err(anyhow::Error::from),
                                None => Ok(()),
                            });
                    progress(done.fetch_add(b - a, Ordering::Relaxed) + b - a);
                    if let Err(e) = r {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(region),
    }
}
