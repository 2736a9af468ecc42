//! How a restore runs: mode, threads, prefetch policy, what to do when the
//! source is lost, and who hears about trouble.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::working_set::WorkingSet;

/// How faults are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// MISSING faults, UFFDIO_COPY / UFFDIO_ZEROPAGE (any memory).
    #[default]
    Missing,
    /// Page cache filled through the alias mapping, UFFDIO_CONTINUE (shmem, hugetlbfs).
    Minor,
}

/// What the background prefetcher does.
#[derive(Debug, Clone, Default)]
pub enum Prefetch {
    /// Nothing: only demand faults (and pushed pages) place pages, until
    /// [`crate::Restore::wait`].
    None,
    /// Untouched pages in address order, following the latest fault.
    #[default]
    Sequential,
    /// A recorded working set first, then as `Sequential`.
    Recorded(WorkingSet),
}

/// What happens when the source is gone (a peer that vanished).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnSourceLoss {
    /// Poison every page not yet placed, at once: touching one raises
    /// SIGBUS (EFAULT for a kernel access) instead of waiting.
    #[default]
    FailClosed,
    /// Wait up to this long for [`crate::Restore::replace_source`]: faults
    /// on missing pages wait (placed pages keep working), then are served
    /// from the new source; past the deadline, fail closed.
    WaitFor(Duration),
}

/// A placement the watchdog found slow.
#[derive(Debug, Clone, Serialize)]
pub struct Stall {
    /// Start of the run being placed.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// How long it had been outstanding when reported.
    pub waited_ms: u64,
    /// Which thread.
    pub worker: String,
}

/// Something an operator should hear about while a restore runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Notice {
    /// A placement is taking long.
    Stall(Stall),
    /// A fault outside every mapped range was failed closed (poisoned).
    FaultOutsideMap {
        /// The address.
        addr: u64,
    },
    /// The source is gone; faults on missing pages wait for a new one.
    SourceLost {
        /// Why.
        cause: crate::SourceError,
    },
    /// A new source took over.
    SourceReplaced,
}

/// A callback for notices (e.g. print a warning).
pub type NoticeReporter = Arc<dyn Fn(&Notice) + Send + Sync>;

/// Options of a restore. Start from [`RestoreOptions::default`] and set
/// what differs; fields can be read, new ones will come.
#[derive(Clone)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// Missing or minor mode.
    pub mode: Mode,
    /// Fault handler threads (at least 1).
    pub handlers: usize,
    /// Userfaultfds [`crate::start`] creates: each region is cut into this
    /// many slices, one per fd (at least 1).
    pub uffds: usize,
    /// Background prefetch policy.
    pub prefetch: Prefetch,
    /// Record the order pages are first faulted (see
    /// [`crate::RestoreStats::working_set`]).
    pub record_working_set: bool,
    /// Leave zero runs of at least this many bytes to the kernel
    /// (unregistered, filled with no round trip); `None` places every page.
    pub zero_runs_to_kernel: Option<usize>,
    /// Largest prefetch chunk in bytes (chunks start small after a fault and
    /// double while no fault comes).
    pub max_chunk: usize,
    /// Report placements outstanding for longer than this.
    pub watchdog: Duration,
    /// What to do when the source is gone.
    pub on_source_loss: OnSourceLoss,
    /// Called for each notice (stalls are also listed in the statistics).
    pub on_notice: Option<NoticeReporter>,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("mode", &self.mode)
            .field("handlers", &self.handlers)
            .field("uffds", &self.uffds)
            .field("prefetch", &self.prefetch)
            .field("max_chunk", &self.max_chunk)
            .field("watchdog", &self.watchdog)
            .field("on_source_loss", &self.on_source_loss)
            .finish_non_exhaustive()
    }
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            mode: Mode::Missing,
            handlers: 1,
            uffds: 1,
            prefetch: Prefetch::Sequential,
            record_working_set: false,
            zero_runs_to_kernel: Some(2 << 20),
            max_chunk: 4 << 20,
            watchdog: Duration::from_secs(2),
            on_source_loss: OnSourceLoss::FailClosed,
            on_notice: None,
        }
    }
}

impl RestoreOptions {
    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// Sets the handler threads.
    pub fn handlers(mut self, n: usize) -> Self {
        self.handlers = n;
        self
    }
    /// Sets the userfaultfds.
    pub fn uffds(mut self, n: usize) -> Self {
        self.uffds = n;
        self
    }
    /// Sets the prefetch policy.
    pub fn prefetch(mut self, p: Prefetch) -> Self {
        self.prefetch = p;
        self
    }
    /// Records the working set.
    pub fn record_working_set(mut self, on: bool) -> Self {
        self.record_working_set = on;
        self
    }
    /// Sets the smallest zero run left to the kernel (`None`: none).
    pub fn zero_runs_to_kernel(mut self, min_bytes: Option<usize>) -> Self {
        self.zero_runs_to_kernel = min_bytes;
        self
    }
    /// Sets the largest prefetch chunk.
    pub fn max_chunk(mut self, bytes: usize) -> Self {
        self.max_chunk = bytes;
        self
    }
    /// Sets the watchdog's limit.
    pub fn watchdog(mut self, limit: Duration) -> Self {
        self.watchdog = limit;
        self
    }
    /// Sets what happens when the source is lost.
    pub fn on_source_loss(mut self, p: OnSourceLoss) -> Self {
        self.on_source_loss = p;
        self
    }
    /// Sets the notice callback.
    pub fn on_notice(mut self, f: NoticeReporter) -> Self {
        self.on_notice = Some(f);
        self
    }
}
