//! Live migration of a running VM's guest RAM (or a process's memory)
//! between hosts.
//!
//! - **Pre-copy rounds**: a dirty tracker (async write-protect, or KVM's
//!   dirty log) finds what was written since the last round; pages never
//!   touched are never sent (the destination's fresh memory already reads
//!   zeros) and zero pages travel as ranges without payload.
//! - **Convergence** ([`converge`]): bandwidth and dirty rate measured per
//!   round; switch over when the rest fits the downtime target, go to
//!   post-copy (hybrid) when it stops shrinking.
//! - **Switchover**: the embedder's [`Guest`] pauses its vCPUs and hands
//!   over an opaque device state.
//! - **Post-copy** on the restore core (`livepage_restore::serve`): in
//!   missing mode stale copies are dropped before the guest resumes; in
//!   minor mode (shmem, hugetlbfs) the guest resumes before the stale set
//!   has arrived and a fault asks "send if stale". Faults travel on their
//!   own connection that bulk data never delays; each page is sent once.
//! - **Recovery without an operator**: heartbeats and TCP_USER_TIMEOUT
//!   find a dead link; the source reconnects, the destination says what it
//!   holds, exactly the rest is sent again.
//! - **Transport**: protocol version 2 ([`proto`]), mutual TLS 1.3
//!   ([`tls`]), lz4/zstd per chunk ([`codec`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod converge;
pub mod dest;
mod error;
mod link;
pub mod net;
mod plan;
pub mod progress;
pub mod proto;
mod source;
mod stats;
pub mod tls;
mod window;

pub use codec::Compression;
pub use converge::{Converge, Decision, Method, Round};
pub use error::{FailedIn, HookError, MigrateError};
pub use link::Liveness;
pub use net::Security;
pub use progress::{Progress, ProgressView, Stage};
pub use proto::msg::{DestMode, RegionShape};
pub use source::{Guest, SourceOptions, TrackerFactory, migrate};
pub use stats::{DestReport, DowntimeParts, PhaseBytes, RecoveryEvent, SourceReport};
