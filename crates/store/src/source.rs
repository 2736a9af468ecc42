//! A lazy restore's page source reading an image straight from a store:
//! a fault's pages come from the chunk that holds them, found in memory
//! (the last few chunks decoded), in the host's chunk cache, or fetched
//! from the store (one fetch per chunk however many threads want it), and
//! verified against its name every time. A store unreachable past its
//! deadline fails the read fatally: the restore core fails closed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use livepage_restore::{Lane, PageSource, SourceError, SourceRegion};
use serde::Serialize;

use crate::cache::ChunkCache;
use crate::chunk::ChunkId;
use crate::error::StoreError;
use crate::image::{StoreImage, part};

/// Decoded chunks kept in memory (32 MiB of 512 KiB chunks): what the
/// read-ahead fetched stays until the prefetcher gets there.
const MEMORY_CHUNKS: usize = 64;
/// Chunks fetched ahead of the background reads.
const AHEAD: usize = 16;
/// Threads fetching ahead.
const AHEAD_THREADS: usize = 4;

/// Where a source's chunks came from.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceStats {
    /// Chunks fetched from the store.
    pub from_store: u64,
    /// Chunks read from the host's cache.
    pub from_cache: u64,
    /// Reads served from chunks already decoded.
    pub from_memory: u64,
    /// Bytes fetched from the store (as stored).
    pub fetched_bytes: u64,
    /// Cached chunks that failed verification (dropped and fetched again).
    pub cache_bad: u64,
    /// Milliseconds spent fetching from the store, summed.
    pub fetch_ms: f64,
}

/// A decoded chunk to place: region, first page, bytes.
type Decoded = (usize, u64, Arc<Vec<u8>>);

type Slot = Arc<(
    Mutex<Option<Result<Arc<Vec<u8>>, Arc<StoreError>>>>,
    Condvar,
)>;

/// Pages of a store image for a lazy restore. Background reads (the
/// restore's prefetch) start fetches of the chunks after theirs on a few
/// threads, so the store is read in parallel; a fault's read goes to the
/// store at once, never behind them.
pub struct StoreSource {
    inner: Arc<Inner>,
    ahead: Mutex<Option<std::sync::mpsc::Sender<(usize, usize)>>>,
    /// Per region: the chunk the read-ahead has been asked up to.
    mark: Vec<AtomicU64>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Per region, per span: its chunk (`None`: zeros).
type Spans = Vec<Vec<Option<ChunkId>>>;

struct Inner {
    /// The span list, fetched once (in the background from the start, or
    /// by the first read that needs it, whichever comes first).
    spans: std::sync::OnceLock<Result<Spans, Arc<StoreError>>>,
    /// Where decoded chunks go to be placed whole (see [`StoreSource::attach`]).
    placer: std::sync::OnceLock<Mutex<std::sync::mpsc::SyncSender<Decoded>>>,
    img: StoreImage,
    cache: Option<Arc<ChunkCache>>,
    shapes: Vec<SourceRegion>,
    memory: Mutex<VecDeque<(ChunkId, Arc<Vec<u8>>)>>,
    inflight: Mutex<HashMap<ChunkId, Slot>>,
    from_store: AtomicU64,
    from_cache: AtomicU64,
    from_memory: AtomicU64,
    fetched_bytes: AtomicU64,
    cache_bad: AtomicU64,
    fetch_us: AtomicU64,
}

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource")
            .field("image", &self.inner.img.url())
            .finish()
    }
}

impl StoreSource {
    /// Serves `img`, caching chunks in `cache` if given.
    pub fn new(img: StoreImage, cache: Option<Arc<ChunkCache>>) -> StoreSource {
        let regions = img.manifest().regions.len();
        let inner = Arc::new(Inner::new(img, cache));
        // The span list, fetched at once beside the guest's start (a no-op
        // if the image came with it).
        let loader = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("lp-span-list".into())
                .spawn(move || {
                    let _ = inner.spans();
                })
                .ok()
        };
        let (tx, rx) = std::sync::mpsc::channel::<(usize, usize)>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..AHEAD_THREADS)
            .filter_map(|i| {
                let (inner, rx) = (inner.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("lp-ahead-{i}"))
                    .spawn(move || {
                        loop {
                            let job = rx.lock().ok().and_then(|r| r.recv().ok());
                            let Some((region, c)) = job else { break };
                            if let Ok(Some(id)) = inner.chunk_of(region, c) {
                                // Failures show when a read needs it.
                                let _ = inner.span(region, c, id);
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        let mut threads: Vec<_> = threads;
        threads.extend(loader);
        StoreSource {
            inner,
            ahead: Mutex::new(Some(tx)),
            mark: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            threads: Mutex::new(threads),
        }
    }

    /// The image.
    pub fn image(&self) -> &StoreImage {
        &self.inner.img
    }

    /// Where chunks came from so far.
    pub fn stats(&self) -> SourceStats {
        self.inner.stats()
    }

    /// Places every chunk this source decodes whole, through `pusher`, so
    /// a chunk is fetched and decoded once however its pages are touched
    /// (faults then find most pages of a chunk placed). A thread does it
    /// until the restore is finished.
    pub fn attach(&self, mut pusher: livepage_restore::Pusher) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(64);
        if self.inner.placer.set(Mutex::new(tx)).is_err() {
            return;
        }
        let h = std::thread::Builder::new()
            .name("lp-place-chunks".into())
            .spawn(move || {
                while !pusher.finished() {
                    match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                        Ok((region, first, data)) => {
                            if pusher.push(region, first, &data).is_err() {
                                break;
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(_) => break,
                    }
                }
            });
        if let (Ok(h), Ok(mut t)) = (h, self.threads.lock()) {
            t.push(h);
        }
    }

    /// Asks the read-ahead for the chunks after `c` of `region`.
    fn read_ahead(&self, region: usize, c: usize) {
        let reg = &self.inner.img.manifest().regions[region];
        let spans = reg.pages().div_ceil(reg.chunk_pages) as usize;
        let want = (c + 1 + AHEAD).min(spans) as u64;
        let from = self.mark[region]
            .fetch_max(want, Ordering::Relaxed)
            .max(c as u64 + 1);
        if from >= want {
            return;
        }
        if let Ok(tx) = self.ahead.lock() {
            if let Some(tx) = tx.as_ref() {
                for k in from..want {
                    let _ = tx.send((region, k as usize));
                }
            }
        }
    }
}

impl Drop for StoreSource {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.ahead.lock() {
            tx.take();
        }
        if let Ok(mut t) = self.threads.lock() {
            for h in t.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Inner {
    fn new(img: StoreImage, cache: Option<Arc<ChunkCache>>) -> Inner {
        let shapes = img
            .manifest()
            .regions
            .iter()
            .map(|r| SourceRegion {
                page_size: r.page_size as usize,
                pages: r.pages(),
            })
            .collect();
        Inner {
            spans: std::sync::OnceLock::new(),
            placer: std::sync::OnceLock::new(),
            img,
            cache,
            shapes,
            memory: Mutex::new(VecDeque::new()),
            inflight: Mutex::new(HashMap::new()),
            from_store: AtomicU64::new(0),
            from_cache: AtomicU64::new(0),
            from_memory: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            cache_bad: AtomicU64::new(0),
            fetch_us: AtomicU64::new(0),
        }
    }

    /// The span list (fetched on first use if the image came without it).
    fn spans(&self) -> Result<&Spans, Arc<StoreError>> {
        self.spans
            .get_or_init(|| {
                let mut img = self.img.clone();
                img.load_spans().map_err(Arc::new)?;
                Ok(img
                    .manifest()
                    .regions
                    .iter()
                    .map(|r| (0..r.chunks.len()).map(|c| r.chunk(c)).collect())
                    .collect())
            })
            .as_ref()
            .map_err(Arc::clone)
    }

    /// The chunk of span `c` of `region` (`None`: zeros).
    fn chunk_of(&self, region: usize, c: usize) -> Result<Option<ChunkId>, Arc<StoreError>> {
        Ok(self
            .spans()?
            .get(region)
            .and_then(|r| r.get(c))
            .copied()
            .flatten())
    }

    fn stats(&self) -> SourceStats {
        SourceStats {
            from_store: self.from_store.load(Ordering::Relaxed),
            from_cache: self.from_cache.load(Ordering::Relaxed),
            from_memory: self.from_memory.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            cache_bad: self.cache_bad.load(Ordering::Relaxed),
            fetch_ms: self.fetch_us.load(Ordering::Relaxed) as f64 / 1e3,
        }
    }

    /// The decoded bytes of span `c` of `region`.
    fn span(&self, region: usize, c: usize, id: ChunkId) -> Result<Arc<Vec<u8>>, Arc<StoreError>> {
        if let Ok(m) = self.memory.lock() {
            if let Some((_, d)) = m.iter().find(|(i, _)| *i == id) {
                self.from_memory.fetch_add(1, Ordering::Relaxed);
                return Ok(d.clone());
            }
        }
        // One fetch per chunk: later askers wait for the first.
        let (slot, first) = {
            let mut f = self
                .inflight
                .lock()
                .map_err(|_| Arc::new(StoreError::Unsupported("poisoned".into())))?;
            match f.get(&id) {
                Some(s) => (s.clone(), false),
                None => {
                    let s: Slot = Arc::new((Mutex::new(None), Condvar::new()));
                    f.insert(id, s.clone());
                    (s, true)
                }
            }
        };
        if !first {
            let (m, cv) = &*slot;
            let mut g = m
                .lock()
                .map_err(|_| Arc::new(StoreError::Unsupported("poisoned".into())))?;
            while g.is_none() {
                g = cv
                    .wait(g)
                    .map_err(|_| Arc::new(StoreError::Unsupported("poisoned".into())))?;
            }
            return g
                .clone()
                .unwrap_or_else(|| Err(Arc::new(StoreError::Unsupported("lost".into()))));
        }
        let r = self.load(region, c, id).map(Arc::new).map_err(Arc::new);
        if let (Ok(d), Some(p)) = (&r, self.placer.get()) {
            let first = self.img.manifest().regions[region].span(c).0;
            if let Ok(tx) = p.lock() {
                // Full: the prefetcher places it instead.
                let _ = tx.try_send((region, first, d.clone()));
            }
        }
        if let Ok(d) = &r {
            if let Ok(mut m) = self.memory.lock() {
                m.push_back((id, d.clone()));
                if m.len() > MEMORY_CHUNKS {
                    m.pop_front();
                }
            }
        }
        let (m, cv) = &*slot;
        if let Ok(mut g) = m.lock() {
            *g = Some(r.clone());
        }
        cv.notify_all();
        if let Ok(mut f) = self.inflight.lock() {
            f.remove(&id);
        }
        r
    }

    fn load(&self, region: usize, c: usize, id: ChunkId) -> Result<Vec<u8>, StoreError> {
        let p = part(self.img.manifest(), region, c);
        if let Some(cache) = &self.cache {
            if let Some(obj) = cache.get(&id) {
                match self.img.decode(&obj, &id, &p) {
                    Ok(raw) => {
                        self.from_cache.fetch_add(1, Ordering::Relaxed);
                        return Ok(raw);
                    }
                    Err(_) => {
                        self.cache_bad.fetch_add(1, Ordering::Relaxed);
                        cache.remove(&id);
                    }
                }
            }
        }
        let t = std::time::Instant::now();
        let obj = self.img.fetch(&id, &p)?;
        self.fetch_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.from_store.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(obj.len() as u64, Ordering::Relaxed);
        let raw = self.img.decode(&obj, &id, &p)?;
        if let Some(cache) = &self.cache {
            cache.put(&id, &obj);
        }
        Ok(raw)
    }
}

impl PageSource for StoreSource {
    fn regions(&self) -> Vec<SourceRegion> {
        self.inner.shapes.clone()
    }

    fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
        lane: Lane,
    ) -> Result<bool, SourceError> {
        let shape = *self
            .inner
            .shapes
            .get(region)
            .ok_or(SourceError::NoRegion { region })?;
        let ps = shape.page_size;
        let n = (buf.len() / ps) as u64;
        if buf.len() % ps != 0 || first.checked_add(n).is_none_or(|e| e > shape.pages) {
            return Err(SourceError::OutOfRange {
                region,
                first,
                count: n,
                pages: shape.pages,
            });
        }
        let reg = &self.inner.img.manifest().regions[region];
        if lane == Lane::Background {
            self.read_ahead(
                region,
                ((first + n).saturating_sub(1) / reg.chunk_pages) as usize,
            );
        }
        let mut any = false;
        let mut p = first;
        while p < first + n {
            let c = (p / reg.chunk_pages) as usize;
            let (a, b) = reg.span(c);
            let e = b.min(first + n);
            let dst = &mut buf[((p - first) as usize) * ps..((e - first) as usize) * ps];
            let store_err = |e: Arc<StoreError>| SourceError::Store {
                region,
                first: p,
                count: e_count(p, b),
                fatal: e.is_unreachable(),
                cause: e,
            };
            match self.inner.chunk_of(region, c).map_err(store_err)? {
                None => dst.fill(0),
                Some(id) => {
                    let d = self.inner.span(region, c, id).map_err(store_err)?;
                    let off = ((p - a) as usize) * ps;
                    dst.copy_from_slice(&d[off..off + dst.len()]);
                    any = true;
                }
            }
            p = e;
        }
        Ok(any)
    }

    fn zero_runs(&self, region: usize) -> Option<Vec<(u64, u64)>> {
        let reg = self.inner.img.manifest().regions.get(region)?;
        let spans = self.inner.spans().ok()?.get(region)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (c, id) in spans.iter().enumerate() {
            if id.is_some() {
                continue;
            }
            let (a, b) = reg.span(c);
            match runs.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => runs.push((a, b)),
            }
        }
        Some(runs)
    }
}

fn e_count(p: u64, b: u64) -> u64 {
    b.saturating_sub(p)
}
