//! Retention: keeping the last N checkpoints of a chain resumable by
//! folding its oldest delta into its parent, now ([`retain`]) or in the
//! background as checkpoints complete ([`Retainer`]).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::{Chain, FoldProgress, FoldReport, ImageError, fold};

/// What a retention pass did.
#[derive(Debug, Clone, Serialize)]
pub struct RetainReport {
    /// The folds, in order.
    pub folds: Vec<FoldReport>,
    /// Leftovers of interrupted writes or folds that were removed.
    pub swept: Vec<PathBuf>,
    /// Images with the id of a parent that a fold replaced, left where a
    /// fold was interrupted between replacing the delta and removing the
    /// parent. The chain no longer needs them; they are not removed, since
    /// a byte-identical copy that somebody keeps looks the same.
    pub strays: Vec<PathBuf>,
    /// The chain's images after the pass, newest first.
    pub kept: Vec<PathBuf>,
}

/// Folds the chain ending at `head` until it holds at most `keep` images
/// (the newest: each one a resumable checkpoint), after sweeping what an
/// interrupted fold or write left in the directory. `progress` gets the
/// image being folded and how far it is.
pub fn retain(
    head: &Path,
    keep: NonZeroUsize,
    progress: &mut dyn FnMut(&Path, FoldProgress),
) -> Result<RetainReport, ImageError> {
    let dir = match head.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let swept = sweep(&dir)?;
    let mut strays = Vec::new();
    let mut folds = Vec::new();
    loop {
        let chain = Chain::open(head)?;
        let images = chain.images();
        let n = images.len();
        // A fold killed after its rename left the parent it folded.
        if let Some(from) = images[n - 1].folded_from() {
            for p in find_images(&dir, from, images)? {
                if !strays.contains(&p) {
                    strays.push(p);
                }
            }
        }
        if n <= keep.get() {
            let kept = images.iter().map(|i| i.path().to_path_buf()).collect();
            return Ok(RetainReport {
                folds,
                swept,
                strays,
                kept,
            });
        }
        let (base, child) = (
            images[n - 1].path().to_path_buf(),
            images[n - 2].path().to_path_buf(),
        );
        drop(chain);
        folds.push(fold(&base, &child, &mut |p| progress(&child, p))?);
    }
}

/// Removes what interrupted work left in `dir`: `.NAME.fold` (a fold killed
/// between publishing its image and renaming it over the delta; the chain
/// is whole without it) and `.NAME.tmp.PID` of processes that are gone
/// (file systems without `O_TMPFILE`).
fn sweep(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let mut swept = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(crate::error::io("listing", dir))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let stale = if name.ends_with(".fold") {
            true
        } else if let Some((_, pid)) = name.rsplit_once(".tmp.") {
            pid.parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        } else {
            false
        };
        if stale && std::fs::remove_file(e.path()).is_ok() {
            swept.push(e.path());
        }
    }
    Ok(swept)
}

/// The images of `dir` with id `id` that are not in `chain`.
fn find_images(
    dir: &Path,
    id: crate::ImageId,
    chain: &[crate::Image],
) -> Result<Vec<PathBuf>, ImageError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(crate::error::io("listing", dir))?;
    for e in entries.flatten() {
        let p = e.path();
        if !chain.iter().any(|i| i.path() == p) && crate::peek_id(&p) == Some(id) {
            found.push(p);
        }
    }
    Ok(found)
}

/// Keeps the last N checkpoints of a chain in the background: each
/// [`Retainer::submit`]ted head is retained on a thread of its own while
/// the next checkpoints are taken. A fold that fails (a full disk) leaves
/// the chain whole and is reported; the next submission tries again.
#[derive(Debug)]
pub struct Retainer {
    tx: Option<Sender<PathBuf>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The fold in progress: the delta and how far it is.
    progress: Mutex<Option<(PathBuf, FoldProgress)>>,
    folds: Mutex<Vec<FoldReport>>,
    failures: Mutex<Vec<ImageError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Retainer {
    /// Starts the retention thread, keeping `keep` checkpoints.
    pub fn start(keep: NonZeroUsize) -> Result<Retainer, ImageError> {
        let (tx, rx) = channel::<PathBuf>();
        let shared = Arc::new(Shared::default());
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("retain".into())
            .spawn(move || run(&rx, keep, &s2))
            .map_err(|e| ImageError::Io {
                what: "starting the retention thread for",
                path: PathBuf::from("checkpoints"),
                source: e,
            })?;
        Ok(Retainer {
            tx: Some(tx),
            thread: Some(thread),
            shared,
        })
    }

    /// A checkpoint at `head` is complete: retain its chain.
    pub fn submit(&self, head: &Path) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(head.to_path_buf());
        }
    }

    /// The fold in progress, if any: the delta being folded and how far.
    pub fn progress(&self) -> Option<(PathBuf, FoldProgress)> {
        lock(&self.shared.progress).clone()
    }

    /// Folds finished since the last call.
    pub fn take_folds(&self) -> Vec<FoldReport> {
        std::mem::take(&mut *lock(&self.shared.folds))
    }

    /// Failures since the last call (each left the chain whole).
    pub fn take_failures(&self) -> Vec<ImageError> {
        std::mem::take(&mut *lock(&self.shared.failures))
    }

    /// Waits for the submitted heads to be retained.
    pub fn finish(mut self) -> (Vec<FoldReport>, Vec<ImageError>) {
        self.stop();
        (self.take_folds(), self.take_failures())
    }

    fn stop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Retainer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(rx: &Receiver<PathBuf>, keep: NonZeroUsize, shared: &Shared) {
    while let Ok(mut head) = rx.recv() {
        // Only the newest head matters: its chain holds the older ones.
        while let Ok(h) = rx.try_recv() {
            head = h;
        }
        let r = retain(&head, keep, &mut |p, f| {
            *lock(&shared.progress) = Some((p.to_path_buf(), f));
        });
        *lock(&shared.progress) = None;
        match r {
            Ok(rep) => lock(&shared.folds).extend(rep.folds),
            Err(e) => lock(&shared.failures).push(e),
        }
    }
}
