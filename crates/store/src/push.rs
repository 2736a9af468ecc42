//! `push`: a local image (or a chain of checkpoints) into a store, each
//! image as a self-contained manifest, uploading only the chunks the store
//! lacks. Spans a delta left unchanged name its parent's chunks without
//! being read; chunks go up before the manifest naming them, so a manifest
//! never names a chunk that is not there.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use livepage_image::Chain;
use serde::Serialize;

use crate::chunk::{self, ChunkId};
use crate::error::StoreError;
use crate::manifest::{self, Manifest};
use crate::store::Store;

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The name of the newest image in the store (default: its file name;
    /// parents always keep their file names).
    pub name: Option<String>,
    /// zstd level.
    pub level: i32,
    /// Threads reading, compressing and uploading.
    pub threads: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            name: None,
            level: 3,
            threads: 4,
        }
    }
}

/// One image of a push.
#[derive(Debug, Clone, Serialize)]
pub struct PushedImage {
    /// Its name in the store.
    pub name: String,
    /// Its local id.
    pub image_id: String,
    /// Already there with the same contents: nothing sent.
    pub already_there: bool,
    /// Chunks uploaded.
    pub chunks_new: u64,
    /// Chunks the store already held (or this push uploaded for an
    /// earlier span).
    pub chunks_shared: u64,
    /// All-zero spans (no chunk).
    pub chunks_zero: u64,
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// The store.
    pub store: String,
    /// Oldest first.
    pub images: Vec<PushedImage>,
    /// Chunks uploaded.
    pub chunks_new: u64,
    /// Chunks shared with what the store held.
    pub chunks_shared: u64,
    /// Zero spans.
    pub chunks_zero: u64,
    /// Uncompressed bytes of the uploaded chunks.
    pub new_bytes: u64,
    /// Bytes uploaded (chunk objects and manifests).
    pub bytes_sent: u64,
    /// Uncompressed ÷ uploaded bytes of the new chunks.
    pub compression_ratio: f64,
    /// Guest memory the pushed images describe, summed.
    pub guest_bytes: u64,
    /// Wall time.
    pub duration_ms: f64,
}

/// Every chunk the store's readable manifests name (what a push may
/// share; chunks nothing names are uploaded again, which keeps them out of
/// a concurrent `gc`'s reach).
pub(crate) fn referenced(store: &Store) -> Result<HashSet<ChunkId>, StoreError> {
    let mut set = HashSet::new();
    for l in store.list("images")? {
        let name = l.key.strip_prefix("images/").unwrap_or(&l.key);
        // Unreadable or deleted meanwhile: its chunks are not shared.
        if let Ok(m) = crate::image::read_manifest(store, name) {
            set.extend(m.chunk_ids());
        }
    }
    Ok(set)
}

struct Shared<'a> {
    store: &'a Store,
    known: &'a HashSet<ChunkId>,
    claimed: Mutex<HashSet<ChunkId>>,
    level: i32,
    new: AtomicU64,
    shared: AtomicU64,
    zero: AtomicU64,
    new_bytes: AtomicU64,
    sent: AtomicU64,
}

impl Shared<'_> {
    /// Uploads `raw` unless the store has it; returns its id.
    fn upload(&self, raw: &[u8]) -> Result<ChunkId, StoreError> {
        let id = ChunkId::of(raw);
        let mine = !self.known.contains(&id)
            && self
                .claimed
                .lock()
                .map(|mut c| c.insert(id))
                .unwrap_or(true);
        if !mine {
            self.shared.fetch_add(1, Ordering::Relaxed);
            return Ok(id);
        }
        let obj = chunk::encode(raw, self.level);
        let n = obj.len() as u64;
        self.store.put(&id.key(), obj)?;
        self.new.fetch_add(1, Ordering::Relaxed);
        self.new_bytes
            .fetch_add(raw.len() as u64, Ordering::Relaxed);
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(id)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Pushes the image at `path` and every parent it has. `progress` gets
/// (guest bytes done, guest bytes in all).
pub fn push(
    path: &Path,
    store: &Store,
    opts: &PushOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PushReport, StoreError> {
    let t0 = Instant::now();
    let chain = Chain::open(path)?;
    let n = chain.images().len();
    let total: u64 = chain
        .images()
        .iter()
        .map(|i| i.regions().iter().map(|r| r.len).sum::<u64>())
        .sum();
    let mut known = referenced(store)?;
    let done = AtomicU64::new(0);
    let mut prev: Option<Manifest> = None;
    let mut report = PushReport {
        store: store.url().to_string(),
        images: Vec::new(),
        chunks_new: 0,
        chunks_shared: 0,
        chunks_zero: 0,
        new_bytes: 0,
        bytes_sent: 0,
        compression_ratio: 1.0,
        guest_bytes: total,
        duration_ms: 0.0,
    };
    for k in (0..n).rev() {
        let img = &chain.images()[k];
        let name = match (&opts.name, k) {
            (Some(nm), 0) => nm.clone(),
            _ => file_name(img.path()),
        };
        crate::url::check_name(&format!("{}/{name}", store.url()), &name)?;
        let id = img.id().to_string();
        let bytes: u64 = img.regions().iter().map(|r| r.len).sum();
        if store.get(&Manifest::key(&name))?.is_some() {
            match crate::image::read_manifest(store, &name) {
                Ok(m) if m.image_id == id => {
                    done.fetch_add(bytes, Ordering::Relaxed);
                    progress(done.load(Ordering::Relaxed), total);
                    report.images.push(PushedImage {
                        name,
                        image_id: id,
                        already_there: true,
                        chunks_new: 0,
                        chunks_shared: 0,
                        chunks_zero: 0,
                    });
                    prev = Some(m);
                    continue;
                }
                _ => {
                    return Err(StoreError::NameTaken {
                        url: store.url().to_string(),
                        name,
                    });
                }
            }
        }
        let sub = if k == 0 {
            None
        } else {
            Some(Chain::open(img.path())?)
        };
        let sub = sub.as_ref().unwrap_or(&chain);
        let sh = Shared {
            store,
            known: &known,
            claimed: Mutex::new(HashSet::new()),
            level: opts.level,
            new: AtomicU64::new(0),
            shared: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        };
        let mut regions = Vec::new();
        let mut jobs = Vec::new();
        for (r, d) in img.regions().iter().enumerate() {
            if d.page_size > u64::from(chunk::MAX_RAW) {
                return Err(StoreError::Unsupported(format!(
                    "region {r} of {} has {} byte pages; a store holds pages up to {} bytes",
                    img.path().display(),
                    d.page_size,
                    chunk::MAX_RAW
                )));
            }
            let span = manifest::Region::span_for(d.page_size);
            let spans = d.pages().div_ceil(span) as usize;
            regions.push(manifest::Region {
                base: d.base,
                len: d.len,
                page_size: d.page_size,
                kind: d.kind,
                chunk_pages: span,
                chunks: vec![None; spans],
            });
            jobs.extend((0..spans).map(|c| (r, c)));
        }
        let results: Vec<Mutex<Option<String>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<StoreError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..opts.threads.max(1) {
                s.spawn(|| {
                    let mut buf = Vec::new();
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(r, c)) = jobs.get(j) else { break };
                        if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                            break;
                        }
                        let out = span(sub, prev.as_ref(), &regions[r], r, c, &sh, &mut buf);
                        let (a, b) = regions[r].span(c);
                        done.fetch_add((b - a) * regions[r].page_size, Ordering::Relaxed);
                        progress(done.load(Ordering::Relaxed), total);
                        match out {
                            Ok(id) => {
                                if let Ok(mut slot) = results[j].lock() {
                                    *slot = id;
                                }
                            }
                            Err(e) => {
                                if let Ok(mut f) = failed.lock() {
                                    f.get_or_insert(e);
                                }
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().ok().flatten() {
            return Err(e);
        }
        for (j, &(r, c)) in jobs.iter().enumerate() {
            regions[r].chunks[c] = results[j].lock().ok().and_then(|s| s.clone());
        }
        let vm_state = match img.vm_state() {
            Some(s) => Some(sh.upload(s)?.to_string()),
            None => None,
        };
        let mut m = Manifest {
            name: name.clone(),
            image_id: id.clone(),
            parent: prev.as_ref().map(|p| p.name.clone()),
            created: img.created(),
            pushed: now(),
            regions,
            vm_state,
            spans: String::new(),
        };
        m.spans = sh.upload(&m.spans_bytes())?.to_string();
        let obj = m.encode();
        sh.sent.fetch_add(obj.len() as u64, Ordering::Relaxed);
        store.put(&Manifest::key(&name), obj)?;
        let pi = PushedImage {
            name,
            image_id: id,
            already_there: false,
            chunks_new: sh.new.load(Ordering::Relaxed),
            chunks_shared: sh.shared.load(Ordering::Relaxed),
            chunks_zero: sh.zero.load(Ordering::Relaxed),
        };
        report.chunks_new += pi.chunks_new;
        report.chunks_shared += pi.chunks_shared;
        report.chunks_zero += pi.chunks_zero;
        report.new_bytes += sh.new_bytes.load(Ordering::Relaxed);
        report.bytes_sent += sh.sent.load(Ordering::Relaxed);
        report.images.push(pi);
        drop(sh);
        known.extend(m.chunk_ids());
        prev = Some(m);
    }
    let chunk_bytes_sent = report.bytes_sent.max(1);
    report.compression_ratio = report.new_bytes as f64 / chunk_bytes_sent as f64;
    report.duration_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// The chunk of span `c` of region `r` of the image `sub` heads.
fn span(
    sub: &Chain,
    prev: Option<&Manifest>,
    region: &manifest::Region,
    r: usize,
    c: usize,
    sh: &Shared<'_>,
    buf: &mut Vec<u8>,
) -> Result<Option<String>, StoreError> {
    let (a, b) = region.span(c);
    // Unchanged since the parent: the parent's chunk, unread.
    if let Some(p) = prev {
        if (a..b).all(|pg| sub.locate(r, pg).is_some_and(|(i, _)| i >= 1)) {
            let id = p
                .regions
                .get(r)
                .and_then(|pr| pr.chunks.get(c))
                .cloned()
                .flatten();
            if id.is_some() {
                sh.shared.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.zero.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(id);
        }
    }
    if (a..b).all(|pg| matches!(sub.locate(r, pg), Some((_, false)))) {
        sh.zero.fetch_add(1, Ordering::Relaxed);
        return Ok(None);
    }
    buf.clear();
    buf.resize(((b - a) * region.page_size) as usize, 0);
    if !sub.read_pages(r, a, buf)? || buf.iter().all(|x| *x == 0) {
        sh.zero.fetch_add(1, Ordering::Relaxed);
        return Ok(None);
    }
    Ok(Some(sh.upload(buf)?.to_string()))
}
