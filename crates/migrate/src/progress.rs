//! A live view of a migration for progress bars and metrics: which phase,
//! which round, how far (bytes of pages covered of those to cover), bytes
//! on the wire. Updated by the migration, read from any thread.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Connecting.
    Connecting,
    /// Pre-copy rounds.
    Precopy,
    /// The guest is paused.
    Switchover,
    /// The guest runs at the destination; pages still move.
    Postcopy,
    /// The link was lost; reconnecting.
    Recovering,
    /// Over.
    Done,
}

impl Stage {
    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Connecting,
            1 => Stage::Precopy,
            2 => Stage::Switchover,
            3 => Stage::Postcopy,
            4 => Stage::Recovering,
            _ => Stage::Done,
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connecting => "connecting",
            Stage::Precopy => "pre-copy",
            Stage::Switchover => "switchover",
            Stage::Postcopy => "post-copy",
            Stage::Recovering => "recovering",
            Stage::Done => "done",
        }
    }
}

/// The live view (share it in an `Arc`).
#[derive(Debug, Default)]
pub struct ProgressView {
    stage: AtomicU8,
    round: AtomicU32,
    done: AtomicU64,
    total: AtomicU64,
    wire: AtomicU64,
}

/// A reading of the view.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Progress {
    /// The stage.
    pub stage: Stage,
    /// Pre-copy round (1-based; 0 before the first).
    pub round: u32,
    /// Bytes of pages covered in this stage (or round).
    pub done_bytes: u64,
    /// Bytes of pages to cover in it.
    pub total_bytes: u64,
    /// Bytes on the wire so far, all stages.
    pub wire_bytes: u64,
}

impl ProgressView {
    /// Reads the view.
    pub fn get(&self) -> Progress {
        Progress {
            stage: Stage::from_u8(self.stage.load(Ordering::Relaxed)),
            round: self.round.load(Ordering::Relaxed),
            done_bytes: self.done.load(Ordering::Relaxed),
            total_bytes: self.total.load(Ordering::Relaxed),
            wire_bytes: self.wire.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn stage(&self, s: Stage, round: u32, total: u64) {
        self.round.store(round, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.stage.store(s as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_stage(&self, s: Stage) {
        self.stage.store(s as u8, Ordering::Relaxed);
    }

    pub(crate) fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_done(&self, bytes: u64) {
        self.done.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_wire(&self, bytes: u64) {
        self.wire.store(bytes, Ordering::Relaxed);
    }
}
