//! The source of a migration: [`migrate`] moves regions of this process
//! (a VM's guest RAM, a store's table) to a destination that listens,
//! while the embedder's guest runs; it pauses the guest through [`Guest`]
//! for the switchover and returns once the destination holds every page.

mod control;
mod postcopy;
mod recover;
mod run;
mod sender;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use livepage_mem::Region;
use livepage_track::{TrackError, Tracker};

use crate::codec::Compression;
use crate::converge::Converge;
use crate::error::{HookError, MigrateError};
use crate::link::Liveness;
use crate::net::Security;
use crate::progress::ProgressView;
use crate::stats::SourceReport;

/// The embedder's guest: livepage pauses it for the switchover, and
/// resumes it here if the migration is abandoned after that.
pub trait Guest: Send {
    /// Stops every vCPU (or writer) and returns the device state to hand
    /// to the destination (opaque to livepage).
    fn pause(&mut self) -> Result<Vec<u8>, HookError>;
    /// Runs the guest here again: the migration was abandoned after the
    /// pause and the destination never ran it (or gave up on it).
    fn resume(&mut self) -> Result<(), HookError>;
}

/// Makes the dirty tracker when the first pre-copy round starts.
pub type TrackerFactory = Box<dyn FnOnce() -> Result<Box<dyn Tracker>, TrackError> + Send>;

/// How to migrate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SourceOptions {
    /// Method, downtime target, pre-copy rounds.
    pub converge: Converge,
    /// Bulk connections (1..=16).
    pub connections: usize,
    /// Compression of page chunks.
    pub compression: Compression,
    /// TLS or plain TCP.
    pub security: Security,
    /// How long post-copy waits for a lost link before giving up (the
    /// destination fails closed after this; the source resumes the guest
    /// after this plus a margin, if the destination cannot have finished).
    pub recovery_timeout: Duration,
    /// Heartbeats and dead-link detection.
    pub liveness: Liveness,
    /// A live view for progress bars.
    pub progress: Option<Arc<ProgressView>>,
    /// Post-copy keeps pushed data in flight to a little over the link's
    /// bandwidth-delay product, so answers to faults never wait in a
    /// queue of bulk data (on by default).
    pub pace: bool,
}

impl SourceOptions {
    /// Defaults (hybrid, 300 ms target, 30 rounds, 2 connections, auto
    /// compression, 60 s recovery) over `security`.
    pub fn new(security: Security) -> SourceOptions {
        SourceOptions {
            converge: Converge::default(),
            connections: 2,
            compression: Compression::Auto,
            security,
            recovery_timeout: Duration::from_secs(60),
            liveness: Liveness::default(),
            progress: None,
            pace: true,
        }
    }

    /// Sets post-copy pacing.
    pub fn pace(mut self, on: bool) -> Self {
        self.pace = on;
        self
    }

    /// Sets the convergence settings.
    pub fn converge(mut self, c: Converge) -> Self {
        self.converge = c;
        self
    }
    /// Sets the bulk connections.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }
    /// Sets the compression.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }
    /// Sets the recovery timeout.
    pub fn recovery_timeout(mut self, t: Duration) -> Self {
        self.recovery_timeout = t;
        self
    }
    /// Sets the liveness settings.
    pub fn liveness(mut self, l: Liveness) -> Self {
        self.liveness = l;
        self
    }
    /// Sets the progress view.
    pub fn progress(mut self, p: Arc<ProgressView>) -> Self {
        self.progress = Some(p);
        self
    }
}

/// Migrates `regions` to the destination listening at `to`. The guest
/// runs on while pre-copy rounds go (pages written are found by the
/// tracker `track` makes); `guest.pause()` is called once for the
/// switchover. Returns when the destination holds every page (the regions
/// may be freed then). On error, [`MigrateError::guest_runs_at_source`]
/// says whether the guest runs here.
pub fn migrate(
    to: SocketAddr,
    regions: Vec<Arc<Region>>,
    track: TrackerFactory,
    guest: &mut dyn Guest,
    opts: SourceOptions,
) -> Result<SourceReport, MigrateError> {
    if !(1..=usize::from(crate::proto::msg::MAX_BULK)).contains(&opts.connections) {
        return Err(MigrateError::Option("connections must be 1 to 16"));
    }
    if regions.is_empty() || regions.len() > crate::proto::msg::MAX_REGIONS {
        return Err(MigrateError::Option("migrate 1 to 256 regions"));
    }
    if opts.converge.max_rounds == 0 {
        return Err(MigrateError::Option("max rounds must be at least 1"));
    }
    let run = run::Run::start(to, regions, opts).map_err(|e| MigrateError::Abandoned {
        phase: crate::error::FailedIn::Setup,
        source: Box::new(e),
    })?;
    run.go(track, guest)
}
