//! Live checkpoints: the workload stops only for the harvest; the delta is
//! saved while it runs.
//!
//! At a checkpoint the workload is paused, the tracker harvests what was
//! written since the previous one, and the live snapshot engine is armed
//! over exactly those pages, with the parent named in the image. The
//! workload then runs on: a write to a page not yet saved faults, its
//! original goes into the bounded buffer (or to the image when the buffer
//! is full) and the write proceeds, as in a live snapshot.
//!
//! How writers are held depends on the tracker ([`LiveSupport`]):
//!
//! - **Hand-over** (WP_ASYNC): the harvest leaves every tracked page
//!   write-protected, but an async userfaultfd cannot hold a writer. So the
//!   tracker lends its protection: its registration ends without clearing
//!   the uffd-wp bits (`Uffd::unregister_keeping_protection`) and the
//!   snapshot's synchronous userfaultfd registers the regions and finds
//!   them protected: no page-table walk, tens of microseconds where
//!   unregistering and protecting again cost two walks (about 11 ms per
//!   128 MiB here). Saved pages stay protected, so every first write after
//!   the instant still faults once and stays visible to the tracker. When
//!   the delta is written, a second pause of the same few microseconds
//!   hands the protection back ([`LiveCheckpoints::hand_back`]); until
//!   then first writes cost a fault instead of nothing.
//! - **Independent** (KVM's dirty log): tracking needs no userfaultfd, so
//!   the snapshot write-protects the delta's runs itself (one walk of the
//!   regions when they are many).
//! - **None** (the synchronous tracker): the workload stays paused while
//!   the delta is written, as before.
//!
//! A checkpoint that fails leaves no image, and its pages are carried into
//! the next one, whose parent stays the last good image.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::num::NonZeroUsize;

use livepage_image::{FoldReport, ImageError, ImageId, Retainer};
use livepage_mem::{RangeSet, Region};
use livepage_snapshot::{Protection, Scope, Snapshot, SnapshotOptions, Watch};
use serde::Serialize;

use crate::{CheckpointStats, DirtyRegion, LiveSupport, TrackError, Tracker};

/// Options of [`LiveCheckpoints`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LiveOptions {
    /// Save deltas live when the tracker allows it (false: always paused).
    pub live: bool,
    /// The snapshot engine's options (buffer bound, handler threads, …);
    /// the parent, VM state and protection are set per checkpoint.
    pub snapshot: SnapshotOptions,
    /// Keep only the last N checkpoints resumable, folding older deltas
    /// into their parents in the background (`None`: keep all).
    pub keep: Option<NonZeroUsize>,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            live: true,
            snapshot: SnapshotOptions::default(),
            keep: None,
        }
    }
}

impl LiveOptions {
    /// Sets whether deltas are saved live.
    pub fn live(mut self, on: bool) -> Self {
        self.live = on;
        self
    }
    /// Keeps the last `n` checkpoints (see [`LiveOptions::keep`]).
    pub fn keep(mut self, n: Option<NonZeroUsize>) -> Self {
        self.keep = n;
        self
    }
    /// Sets the snapshot engine's options.
    pub fn snapshot(mut self, opts: SnapshotOptions) -> Self {
        self.snapshot = opts;
        self
    }
}

/// One finished checkpoint. Durations in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LiveReport {
    /// The image file.
    pub image: PathBuf,
    /// The parent image, for a delta.
    pub parent: Option<String>,
    /// "live" (saved while the workload ran) or "paused".
    pub mode: &'static str,
    /// The tracker's name.
    pub tracker: &'static str,
    /// Bytes the tracker reported written since the previous checkpoint.
    pub dirty_bytes: u64,
    /// The harvest.
    pub collect_ms: f64,
    /// The workload's pause inside [`LiveCheckpoints::checkpoint`]: waiting
    /// for the previous delta, harvest, hand-over and arming (or the whole
    /// write, when paused). A caller's own pause adds its state save.
    pub pause_ms: f64,
    /// Of that pause, waiting for the previous delta to be written.
    pub waited_ms: f64,
    /// Arming (the hand-over, or the protection of the delta's pages).
    pub arm_ms: f64,
    /// From the instant to the image complete.
    pub write_ms: f64,
    /// The second pause that gave tracking back (hand-over only).
    pub handback_ms: f64,
    /// The image.
    pub stats: CheckpointStats,
}

struct InFlight {
    snap: Snapshot,
    report: LiveReport,
    /// The tracker's protection is lent to the snapshot.
    lent: bool,
    /// The delta's pages, carried into the next one if this one fails.
    scope: Vec<RangeSet>,
}

/// Takes checkpoints of a set of regions: a base image, then deltas, each
/// saved while the workload runs (see the module docs).
pub struct LiveCheckpoints {
    regions: Vec<Arc<Region>>,
    opts: LiveOptions,
    parent: Option<ImageId>,
    inflight: Option<InFlight>,
    /// Pages of a failed checkpoint, owed to the next one.
    carry: Vec<RangeSet>,
    reports: Vec<LiveReport>,
    /// Folds older checkpoints away (with [`LiveOptions::keep`]).
    retainer: Option<Retainer>,
}

impl std::fmt::Debug for LiveCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCheckpoints")
            .field("parent", &self.parent)
            .field("writing", &self.inflight.is_some())
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl LiveCheckpoints {
    /// Checkpoints of `regions`; the first one is a full image.
    pub fn new(regions: Vec<Arc<Region>>, opts: LiveOptions) -> LiveCheckpoints {
        LiveCheckpoints {
            regions,
            opts,
            parent: None,
            inflight: None,
            carry: Vec::new(),
            reports: Vec::new(),
            retainer: None,
        }
    }

    /// "live" or "paused": how checkpoints with `tracker` are saved.
    pub fn mode(&self, tracker: &dyn Tracker) -> &'static str {
        if self.live_support(tracker) == LiveSupport::None {
            "paused"
        } else {
            "live"
        }
    }

    fn live_support(&self, tracker: &dyn Tracker) -> LiveSupport {
        if self.opts.live {
            tracker.live_support()
        } else {
            LiveSupport::None
        }
    }

    /// The last image written (the next delta's parent).
    pub fn parent(&self) -> Option<ImageId> {
        self.parent
    }

    /// Whether a checkpoint is being written.
    pub fn writing(&self) -> bool {
        self.inflight.is_some()
    }

    /// Whether tracking is lent to a checkpoint whose pages are all saved,
    /// waiting for [`LiveCheckpoints::hand_back`].
    pub fn ready_to_hand_back(&self) -> bool {
        self.inflight
            .as_ref()
            .is_some_and(|f| f.lent && f.snap.watch().is_saved())
    }

    /// While tracking is lent: a handle a monitor thread can poll to learn
    /// when every page is saved, and then pause the workload for
    /// [`LiveCheckpoints::hand_back`].
    pub fn watch(&self) -> Option<Watch> {
        self.inflight
            .as_ref()
            .filter(|f| f.lent)
            .map(|f| f.snap.watch())
    }

    /// A checkpoint is complete: report it and retain its chain.
    fn completed(&mut self, report: LiveReport) -> Result<(), TrackError> {
        if let Some(keep) = self.opts.keep {
            if self.retainer.is_none() {
                self.retainer = Some(Retainer::start(keep)?);
            }
            if let Some(r) = &self.retainer {
                r.submit(&report.image);
            }
        }
        self.reports.push(report);
        Ok(())
    }

    /// The background retention, with [`LiveOptions::keep`]: its progress,
    /// folds and failures (a failed fold leaves every checkpoint whole).
    pub fn retainer(&self) -> Option<&Retainer> {
        self.retainer.as_ref()
    }

    /// Waits for the background retention to catch up with the last
    /// checkpoint; returns its folds and failures not taken yet.
    pub fn finish_retention(&mut self) -> (Vec<FoldReport>, Vec<ImageError>) {
        match self.retainer.take() {
            Some(r) => r.finish(),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Reports of the checkpoints finished since the last call, oldest first.
    pub fn take_reports(&mut self) -> Vec<LiveReport> {
        std::mem::take(&mut self.reports)
    }

    /// Takes a checkpoint into `path` (which must not exist) with the
    /// workload paused; returns when it may run again. A checkpoint still
    /// being written is waited for first (its wait is counted in this one's
    /// pause). `vm_state` goes into the image.
    pub fn checkpoint(
        &mut self,
        tracker: &mut dyn Tracker,
        path: &Path,
        vm_state: Option<Vec<u8>>,
    ) -> Result<(), TrackError> {
        let t0 = Instant::now();
        let previous = self.finish(tracker);
        let waited = t0.elapsed();
        previous?;
        let support = self.live_support(tracker);
        if support == LiveSupport::None {
            return self.paused(tracker, path, vm_state, t0, waited);
        }
        let parent = self.parent;
        let opts = self
            .opts
            .snapshot
            .clone()
            .parent(parent)
            .vm_state(vm_state)
            .protection(match support {
                LiveSupport::HandOver => Protection::HandedOver {
                    protect_all: parent.is_none(),
                },
                _ => Protection::Arm,
            });
        // Everything but the instant itself: image file, userfaultfd, threads.
        let prepared = livepage_snapshot::prepare(self.regions.clone(), path, opts)?;
        let (dirty, cstats) = match support {
            LiveSupport::HandOver => tracker.collect_and_lend()?,
            _ => tracker.collect()?,
        };
        let scope = self.scope(dirty, parent.is_none());
        let armed = prepared.arm_scope(&scope);
        let snap = match armed {
            Ok(s) => s,
            Err(e) => {
                // Arming failed with the regions released: tracking resumes,
                // every page reads as written or is carried.
                self.carry = scope.pages;
                tracker.take_back(&[])?;
                return Err(e.into());
            }
        };
        let report = LiveReport {
            image: path.to_path_buf(),
            parent: parent.map(|p| p.to_string()),
            mode: "live",
            tracker: tracker.name(),
            dirty_bytes: cstats.dirty_bytes,
            collect_ms: ms(cstats.duration),
            pause_ms: ms(t0.elapsed()),
            waited_ms: ms(waited),
            arm_ms: ms(snap.arm_duration()),
            write_ms: 0.0,
            handback_ms: 0.0,
            stats: empty_stats(),
        };
        self.inflight = Some(InFlight {
            snap,
            report,
            lent: support == LiveSupport::HandOver,
            scope: scope.pages,
        });
        Ok(())
    }

    /// The pages to save: the harvest plus anything owed by a failed
    /// checkpoint, or everything for a base image. Takes the harvest's sets
    /// as they are (copying tens of thousands of runs would lengthen the
    /// pause).
    fn scope(&mut self, dirty: Vec<DirtyRegion>, base: bool) -> Scope {
        let carry = std::mem::take(&mut self.carry);
        let mut dirty = dirty.into_iter();
        let mut pages = Vec::with_capacity(self.regions.len());
        let mut zeros = Vec::with_capacity(self.regions.len());
        for (i, r) in self.regions.iter().enumerate() {
            let d = dirty.next().unwrap_or_default();
            let (mut set, mut z) = (d.ranges, d.zeros);
            if base {
                set = RangeSet::new();
                set.insert(0, r.len() as u64);
            }
            if let Some(c) = carry.get(i) {
                for (s, e) in c.iter() {
                    set.insert(s, e);
                    // Carried pages may have been written since: never zeros.
                    z.remove(s, e);
                }
            }
            pages.push(set);
            zeros.push(z);
        }
        Scope { pages, zeros }
    }

    /// The workload stays paused while the delta is written.
    fn paused(
        &mut self,
        tracker: &mut dyn Tracker,
        path: &Path,
        vm_state: Option<Vec<u8>>,
        t0: Instant,
        waited: Duration,
    ) -> Result<(), TrackError> {
        let (dirty, cstats) = tracker.collect()?;
        let base = self.parent.is_none();
        let scope = self.scope(dirty, base);
        let as_dirty: Vec<DirtyRegion> = scope
            .pages
            .iter()
            .map(|p| DirtyRegion {
                ranges: p.clone(),
                ..Default::default()
            })
            .collect();
        let delta = self.parent.map(|p| (as_dirty.as_slice(), p));
        let written = crate::write_checkpoint(&self.regions, delta, path, vm_state);
        let (id, stats) = match written {
            Ok(x) => x,
            Err(e) => {
                self.carry = scope.pages;
                return Err(e);
            }
        };
        let parent = self.parent.replace(id);
        self.completed(LiveReport {
            image: path.to_path_buf(),
            parent: parent.map(|p| p.to_string()),
            mode: "paused",
            tracker: tracker.name(),
            dirty_bytes: cstats.dirty_bytes,
            collect_ms: ms(cstats.duration),
            pause_ms: ms(t0.elapsed()),
            waited_ms: ms(waited),
            arm_ms: 0.0,
            write_ms: ms(stats.duration),
            handback_ms: 0.0,
            stats,
        })
    }

    /// With the workload paused: if the checkpoint in flight has saved every
    /// page, gives tracking back (microseconds); the image is finished in
    /// the background. Returns whether it did.
    pub fn hand_back(&mut self, tracker: &mut dyn Tracker) -> Result<bool, TrackError> {
        if !self.ready_to_hand_back() {
            return Ok(false);
        }
        self.give_back(tracker)?;
        Ok(true)
    }

    /// Gives the lent protection back, waiting for the pages to be saved.
    fn give_back(&mut self, tracker: &mut dyn Tracker) -> Result<(), TrackError> {
        let Some(f) = self.inflight.as_mut().filter(|f| f.lent) else {
            return Ok(());
        };
        let watch = f.snap.watch();
        while !watch.is_saved() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let t0 = Instant::now();
        f.lent = false;
        // A failed snapshot lifted its protection already: every page then
        // reads as written, and its pages are carried by `finish`.
        let discarded = f.snap.hand_back().unwrap_or_default();
        let res = tracker.take_back(&discarded);
        f.report.handback_ms = ms(t0.elapsed());
        res
    }

    /// Gives tracking back (the workload paused, if it is lent) and waits
    /// for the checkpoint in flight to be complete.
    pub fn finish(&mut self, tracker: &mut dyn Tracker) -> Result<(), TrackError> {
        self.give_back(tracker)?;
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let InFlight {
            snap,
            mut report,
            scope,
            ..
        } = f;
        let st = match snap.wait() {
            Ok(st) => st,
            Err(e) => {
                self.carry = scope;
                return Err(e.into());
            }
        };
        report.write_ms = ms(st.duration);
        report.stats = CheckpointStats {
            id: st.image_id.to_string(),
            data_pages: st.data_pages,
            zero_pages: st.zero_pages,
            bytes: st.bytes_written,
            duration: st.duration,
            faults: st.faults,
            buffered_pages: st.by_fault_buffered,
            sync_saved_pages: st.by_fault_sync,
            peak_buffer_bytes: st.peak_buffer_bytes,
        };
        self.parent = Some(st.image_id);
        self.completed(report)
    }
}

fn empty_stats() -> CheckpointStats {
    CheckpointStats {
        id: String::new(),
        data_pages: 0,
        zero_pages: 0,
        bytes: 0,
        duration: Duration::ZERO,
        faults: 0,
        buffered_pages: 0,
        sync_saved_pages: 0,
        peak_buffer_bytes: 0,
    }
}
