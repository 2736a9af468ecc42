//! The host's chunk cache: chunk objects as the store holds them, in a
//! directory every restore on the host shares (files written whole and
//! renamed into place, so concurrent processes never see half a chunk),
//! bounded in size by evicting the least recently used. A cached chunk is
//! verified on every read like one from the store; a bad one is dropped.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunk::ChunkId;
use crate::error::{StoreError, local};

/// A bounded on-disk chunk cache.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    used: std::sync::Arc<AtomicU64>,
    /// The files already there are counted once, on the first store.
    counting: std::sync::Once,
    evicting: Mutex<()>,
}

impl ChunkCache {
    /// The default directory: `$LIVEPAGE_CHUNK_CACHE`, else
    /// `$XDG_CACHE_HOME/livepage/chunks`, else `~/.cache/livepage/chunks`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("LIVEPAGE_CHUNK_CACHE") {
            return d.into();
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        base.join("livepage").join("chunks")
    }

    /// Opens (creating) the cache at `dir`, holding at most `max_bytes`.
    /// What it holds already is counted in the background when the first
    /// chunk is stored (a large cache takes a while to list: a restore
    /// that only reads from it never waits for that).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<ChunkCache, StoreError> {
        std::fs::create_dir_all(dir).map_err(local("creating the chunk cache", dir))?;
        let c = ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            used: std::sync::Arc::new(AtomicU64::new(0)),
            counting: std::sync::Once::new(),
            evicting: Mutex::new(()),
        };
        Ok(c)
    }

    /// Starts counting what the cache held when opened (once).
    fn count(&self) {
        self.counting.call_once(|| {
            let (d, used) = (self.dir.clone(), self.used.clone());
            let count = move || {
                let n: u64 = files_of(&d).iter().map(|f| f.1).sum();
                used.fetch_add(n, Ordering::Relaxed);
            };
            if std::thread::Builder::new()
                .name("lp-cache-count".into())
                .spawn(count.clone())
                .is_err()
            {
                count();
            }
        });
    }

    /// Counts what the cache holds and waits for it (tests).
    #[cfg(test)]
    fn counted(&self) {
        self.count();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held (as of the last count).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_string();
        self.dir.join(&h[..2]).join(h)
    }

    /// Every cached file: (path, bytes, last use).
    fn files(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        files_of(&self.dir)
    }
    /// The cached object of `id`, if any (its use time refreshed).
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let p = self.path(id);
        let bytes = std::fs::read(&p).ok()?;
        if let Ok(f) = std::fs::File::options().write(true).open(&p) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(bytes)
    }

    /// Drops a cached object (it failed verification).
    pub fn remove(&self, id: &ChunkId) {
        if let Ok(m) = std::fs::metadata(self.path(id)) {
            if std::fs::remove_file(self.path(id)).is_ok() {
                self.used
                    .fetch_sub(m.len().min(self.used()), Ordering::Relaxed);
            }
        }
    }

    /// Stores the object of `id` (best effort: a full disk only costs
    /// the next read a fetch).
    pub fn put(&self, id: &ChunkId, obj: &[u8]) {
        self.count();
        let p = self.path(id);
        if p.exists() {
            return;
        }
        let Some(parent) = p.parent() else { return };
        if std::fs::create_dir_all(parent).is_err() {
            return;
        }
        let tmp = parent.join(format!(
            ".{}.{}.{:?}",
            id,
            std::process::id(),
            std::thread::current().id()
        ));
        let ok = std::fs::write(&tmp, obj).is_ok() && std::fs::rename(&tmp, &p).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let used = self.used.fetch_add(obj.len() as u64, Ordering::Relaxed) + obj.len() as u64;
        if used > self.max_bytes {
            self.evict();
        }
    }

    /// Evicts the least recently used files down to 90% of the bound.
    fn evict(&self) {
        let Ok(_g) = self.evicting.try_lock() else {
            return; // another thread is at it
        };
        let mut files = self.files();
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.2);
        let target = self.max_bytes / 10 * 9;
        for (p, n, _) in files {
            if used <= target {
                break;
            }
            if std::fs::remove_file(&p).is_ok() {
                used -= n;
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }
}

/// Every file of the cache at `dir`: (path, bytes, last use).
fn files_of(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let Ok(top) = std::fs::read_dir(dir) else {
        return out;
    };
    for d in top.flatten() {
        let Ok(inner) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in inner.flatten() {
            if let Ok(m) = f.metadata() {
                if m.is_file() && !f.file_name().to_string_lossy().starts_with('.') {
                    let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                    out.push((f.path(), m.len(), t));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_bound_and_keeps_the_recent() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(d.path(), 10_000).unwrap();
        let ids: Vec<ChunkId> = (0..30u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        for (i, id) in ids.iter().enumerate() {
            c.put(id, &vec![i as u8; 1000]);
            // Keep the first one in use.
            assert!(c.get(&ids[0]).is_some(), "after {i}");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(c.used() <= 10_000, "{}", c.used());
        assert_eq!(c.get(&ids[29]).unwrap(), vec![29u8; 1000]);
        assert!(c.get(&ids[1]).is_none());
        // A second handle (another process) sees the same contents.
        let c2 = ChunkCache::open(d.path(), 10_000).unwrap();
        c2.counted();
        assert_eq!(c2.used(), c.used());
        c2.remove(&ids[29]);
        assert!(c.get(&ids[29]).is_none());
    }
}
