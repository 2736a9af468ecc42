//! An image in a store: its manifest, and its chunks read and verified.

use std::sync::Arc;

use crate::chunk::{self, ChunkId};
use crate::error::StoreError;
use crate::manifest::Manifest;
use crate::store::Store;

/// An image opened from a store.
#[derive(Debug, Clone)]
pub struct StoreImage {
    store: Arc<Store>,
    manifest: Manifest,
}

/// What part of an image a chunk holds, for error messages.
pub(crate) fn part(m: &Manifest, region: usize, c: usize) -> String {
    match m.regions.get(region) {
        Some(r) => {
            let (a, b) = r.span(c);
            format!("region {region}, pages {a}..{b}")
        }
        None => "VM state".into(),
    }
}

/// Reads and checks the manifest object of image `name` (no span list).
pub(crate) fn read_root(store: &Store, name: &str) -> Result<Manifest, StoreError> {
    let obj = store
        .get(&Manifest::key(name))?
        .ok_or_else(|| StoreError::NoImage {
            url: store.url().to_string(),
            name: name.to_string(),
        })?;
    Manifest::decode(&obj).map_err(|problem| StoreError::BadManifest {
        url: store.url().to_string(),
        name: name.to_string(),
        problem,
    })
}

/// Fetches, verifies and applies the span list of `m`.
pub(crate) fn load_spans(store: &Store, m: &mut Manifest) -> Result<(), StoreError> {
    let id = ChunkId::parse(&m.spans).ok_or_else(|| StoreError::BadManifest {
        url: store.url().to_string(),
        name: m.name.clone(),
        problem: crate::manifest::ManifestError::Invalid("no span list".into()),
    })?;
    let part = "span list";
    let obj = store
        .get(&id.key())?
        .ok_or_else(|| StoreError::MissingChunk {
            url: store.url().to_string(),
            id,
            image: m.name.clone(),
            part: part.into(),
        })?;
    let raw = chunk::decode(&obj, &id).map_err(|problem| StoreError::BadChunk {
        url: store.url().to_string(),
        id,
        image: m.name.clone(),
        part: part.into(),
        problem: Box::new(problem),
    })?;
    m.set_spans(&raw)
        .map_err(|problem| StoreError::BadManifest {
            url: store.url().to_string(),
            name: m.name.clone(),
            problem,
        })
}

/// The whole manifest of image `name`, span list included.
pub(crate) fn read_manifest(store: &Store, name: &str) -> Result<Manifest, StoreError> {
    let mut m = read_root(store, name)?;
    load_spans(store, &mut m)?;
    Ok(m)
}

impl StoreImage {
    /// Reads and checks the manifest of image `name` and its span list.
    pub fn open(store: Arc<Store>, name: &str) -> Result<StoreImage, StoreError> {
        let manifest = read_manifest(&store, name)?;
        Ok(StoreImage { store, manifest })
    }

    /// Reads and checks the manifest of image `name` only: what a restore
    /// needs to start (regions, VM state). [`StoreSource`] fetches the span
    /// list beside the first faults.
    ///
    /// [`StoreSource`]: crate::StoreSource
    pub fn open_manifest(store: Arc<Store>, name: &str) -> Result<StoreImage, StoreError> {
        let manifest = read_root(&store, name)?;
        Ok(StoreImage { store, manifest })
    }

    /// Loads the span list if it is not loaded yet.
    pub fn load_spans(&mut self) -> Result<(), StoreError> {
        if self.manifest.has_spans() {
            return Ok(());
        }
        load_spans(&self.store, &mut self.manifest)
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The image's address.
    pub fn url(&self) -> String {
        format!("{}/{}", self.store.url(), self.manifest.name)
    }

    /// Fetches a chunk object (not decoded).
    pub(crate) fn fetch(&self, id: &ChunkId, part: &str) -> Result<bytes::Bytes, StoreError> {
        self.store
            .get(&id.key())?
            .ok_or_else(|| StoreError::MissingChunk {
                url: self.store.url().to_string(),
                id: *id,
                image: self.manifest.name.clone(),
                part: part.to_string(),
            })
    }

    /// Decodes and verifies a chunk object.
    pub(crate) fn decode(
        &self,
        obj: &[u8],
        id: &ChunkId,
        part: &str,
    ) -> Result<Vec<u8>, StoreError> {
        chunk::decode(obj, id).map_err(|problem| StoreError::BadChunk {
            url: self.store.url().to_string(),
            id: *id,
            image: self.manifest.name.clone(),
            part: part.to_string(),
            problem: Box::new(problem),
        })
    }

    /// The bytes of span `c` of `region` (`None`: zeros), from the store.
    pub fn read_span(&self, region: usize, c: usize) -> Result<Option<Vec<u8>>, StoreError> {
        if !self.manifest.has_spans() {
            return Err(StoreError::Unsupported(format!(
                "{}: the span list is not loaded (StoreImage::load_spans)",
                self.url()
            )));
        }
        let Some(id) = self.manifest.regions.get(region).and_then(|r| r.chunk(c)) else {
            return Ok(None);
        };
        let p = part(&self.manifest, region, c);
        let obj = self.fetch(&id, &p)?;
        let raw = self.decode(&obj, &id, &p)?;
        let r = &self.manifest.regions[region];
        let (a, b) = r.span(c);
        if raw.len() as u64 != (b - a) * r.page_size {
            return Err(StoreError::BadChunk {
                url: self.store.url().to_string(),
                id,
                image: self.manifest.name.clone(),
                part: p,
                problem: Box::new(chunk::ChunkError::Length {
                    want: ((b - a) * r.page_size) as u32,
                    got: raw.len(),
                }),
            });
        }
        Ok(Some(raw))
    }

    /// The VM state, if the image has one.
    pub fn vm_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(id) = self.manifest.vm_state.as_deref().and_then(ChunkId::parse) else {
            return Ok(None);
        };
        let obj = self.fetch(&id, "VM state")?;
        self.decode(&obj, &id, "VM state").map(Some)
    }
}

impl StoreImage {
    /// Fetches and verifies every chunk (VM state included) with `threads`
    /// at once; returns how many. Stops at the first bad one.
    pub fn verify(&self, threads: usize) -> Result<u64, StoreError> {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        self.vm_state()?;
        let jobs: Vec<(usize, usize)> = self
            .manifest
            .regions
            .iter()
            .enumerate()
            .flat_map(|(r, reg)| (0..reg.chunks.len()).map(move |c| (r, c)))
            .collect();
        let (next, n) = (AtomicUsize::new(0), AtomicU64::new(0));
        let failed: Mutex<Option<StoreError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    while let Some(&(r, c)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        match self.read_span(r, c) {
                            Ok(Some(_)) => {
                                n.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                if let Ok(mut f) = failed.lock() {
                                    f.get_or_insert(e);
                                }
                                break;
                            }
                        }
                    }
                });
            }
        });
        match failed.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(n.load(Ordering::Relaxed) + u64::from(self.manifest.vm_state.is_some())),
        }
    }
}
