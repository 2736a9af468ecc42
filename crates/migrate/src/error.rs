//! Why a migration failed, and where the guest is afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use crate::codec::CodecError;
use crate::net::{ConnError, NetError};
use crate::proto::frame::Kind;
use crate::proto::msg::{MsgError, RegionShape};

/// An embedder's hook failed (pausing or resuming its vCPUs).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// The phase a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailedIn {
    /// Connecting and agreeing on the migration.
    Setup,
    /// Pre-copy rounds (the guest still ran at the source only).
    Precopy,
    /// Between pausing at the source and resuming at the destination.
    Switchover,
    /// Post-copy (the guest runs at the destination).
    Postcopy,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A connection could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The destination refused the migration.
    #[error("the destination {peer} refused the migration: {reason}")]
    Refused {
        /// The destination.
        peer: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// A frame came that the phase does not allow.
    #[error("protocol error from {peer}: a {kind:?} frame {why}")]
    Unexpected {
        /// The peer.
        peer: SocketAddr,
        /// The frame's kind.
        kind: Kind,
        /// What is wrong.
        why: &'static str,
    },
    /// A payload could not be parsed.
    #[error("bad message from {peer}: {source}")]
    Message {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: MsgError,
    },
    /// A chunk could not be decompressed.
    #[error("bad chunk from {peer}: {source}")]
    Chunk {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: CodecError,
    },
    /// The regions do not match the source's.
    #[error(
        "the destination's memory does not match the source's: region {region} is {have:?} here and {want:?} there"
    )]
    Shape {
        /// Region index.
        region: usize,
        /// Here.
        have: Option<RegionShape>,
        /// At the source.
        want: Option<RegionShape>,
    },
    /// Dirty tracking failed.
    #[error("dirty tracking failed")]
    Track(#[from] livepage_track::TrackError),
    /// Memory could not be read, written or registered.
    #[error("guest memory")]
    Region(#[from] livepage_mem::RegionError),
    /// Serving the post-copy phase failed.
    #[error("post-copy serving failed")]
    Restore(#[from] livepage_restore::RestoreError),
    /// The embedder's hook failed.
    #[error("the embedder could not {op} the guest")]
    Hook {
        /// "pause" or "resume".
        op: &'static str,
        /// Its error.
        source: HookError,
    },
    /// The link was lost where it cannot be recovered.
    #[error("the link to {peer} was lost during {phase:?}{}", if *.guest_runs_here { "; the guest runs on here" } else { "" })]
    LinkLost {
        /// The peer.
        peer: SocketAddr,
        /// When.
        phase: FailedIn,
        /// Whether the guest runs here (it never left, or was resumed).
        guest_runs_here: bool,
        /// What was seen.
        source: Box<MigrateError>,
    },
    /// Pre-copy could not converge within the rounds allowed.
    #[error(
        "pre-copy did not converge in {rounds} rounds: {remaining_bytes} bytes still dirty, dirtied at {dirty_rate:.0} B/s against {bandwidth:.0} B/s of link; the guest runs on here (try --migration hybrid, a larger --downtime-target or more --max-rounds)"
    )]
    NotConverging {
        /// Rounds done.
        rounds: u32,
        /// Bytes still to send.
        remaining_bytes: u64,
        /// Measured dirty rate.
        dirty_rate: f64,
        /// Measured bandwidth.
        bandwidth: f64,
    },
    /// The link did not come back within the recovery timeout.
    #[error(
        "the link did not come back within {after:?}{}",
        if *.guest_resumed_here { "; the guest was resumed here from the pages this side still holds" } else if *.at_destination { "; pages still missing were failed closed" } else { "; every page had been sent, so the destination may have finished: the guest was NOT resumed here" }
    )]
    RecoveryTimedOut {
        /// How long it waited.
        after: Duration,
        /// The source resumed the guest itself.
        guest_resumed_here: bool,
        /// Reported by the destination.
        at_destination: bool,
    },
    /// The peer abandoned the migration.
    #[error("the peer {peer} abandoned the migration: {reason}")]
    Aborted {
        /// The peer.
        peer: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start thread {thread}: {source}")]
    Spawn {
        /// The thread's name.
        thread: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A bad option.
    #[error("{0}")]
    Option(&'static str),
    /// The migration was abandoned before the guest paused: it runs on here.
    #[error(
        "the migration was abandoned before the guest paused ({phase:?}); the guest runs on here"
    )]
    Abandoned {
        /// When.
        phase: FailedIn,
        /// Why.
        source: Box<MigrateError>,
    },
}

impl MigrateError {
    /// Whether, after this error, the guest runs (or may be resumed) at the
    /// source: nothing ran at the destination, or recovery gave up and the
    /// source resumed it.
    pub fn guest_runs_at_source(&self) -> bool {
        match self {
            MigrateError::LinkLost {
                guest_runs_here, ..
            } => *guest_runs_here,
            MigrateError::NotConverging { .. } | MigrateError::Abandoned { .. } => true,
            MigrateError::RecoveryTimedOut {
                guest_resumed_here, ..
            } => *guest_resumed_here,
            _ => false,
        }
    }
}

pub(crate) fn spawn_err(thread: &str) -> impl FnOnce(std::io::Error) -> MigrateError + '_ {
    move |source| MigrateError::Spawn {
        thread: thread.into(),
        source,
    }
}
