//! `gc`: deletes the chunks no manifest names. Safe against a concurrent
//! push: chunks are listed before the manifests are read, only chunks
//! older than `min_age` go, and a push uploads again (refreshing) any
//! chunk no manifest named when it started.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::chunk::ChunkId;
use crate::error::StoreError;
use crate::store::Store;

/// What a gc run did.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// The store.
    pub store: String,
    /// Images (manifests) read.
    pub images: u64,
    /// Chunks listed.
    pub chunks: u64,
    /// Chunks some manifest names.
    pub referenced: u64,
    /// Chunks deleted (or, with a dry run, that would be).
    pub deleted: u64,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// Unnamed chunks younger than the minimum age, kept.
    pub young_kept: u64,
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Wall time.
    pub duration_ms: f64,
}

/// Deletes unnamed chunks older than `min_age` (with `dry_run`, only
/// counts them). Refuses if a manifest cannot be read: its chunks are
/// unknown.
pub fn gc(store: &Store, min_age: Duration, dry_run: bool) -> Result<GcReport, StoreError> {
    let t0 = Instant::now();
    let chunks = store.list("chunks")?;
    let manifests = store.list("images")?;
    let mut named = HashSet::new();
    for l in &manifests {
        let name = l.key.strip_prefix("images/").unwrap_or(&l.key);
        let m = match crate::image::read_manifest(store, name) {
            Ok(m) => m,
            Err(StoreError::NoImage { .. }) => continue, // deleted meanwhile
            // Its chunks are unknown: delete nothing.
            Err(e) => return Err(e),
        };
        named.extend(m.chunk_ids());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut r = GcReport {
        store: store.url().to_string(),
        images: manifests.len() as u64,
        chunks: chunks.len() as u64,
        referenced: 0,
        deleted: 0,
        deleted_bytes: 0,
        young_kept: 0,
        dry_run,
        duration_ms: 0.0,
    };
    for l in &chunks {
        let id = l.key.rsplit('/').next().and_then(ChunkId::parse);
        if id.is_some_and(|id| named.contains(&id)) {
            r.referenced += 1;
            continue;
        }
        if now - l.modified < min_age.as_secs() as i64 {
            r.young_kept += 1;
            continue;
        }
        if !dry_run {
            store.delete(&l.key)?;
        }
        r.deleted += 1;
        r.deleted_bytes += l.size;
    }
    r.duration_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(r)
}
