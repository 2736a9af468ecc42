//! Serving Firecracker VMs: its page-fault handshake ([`handshake()`]) and a
//! server ([`Server`]) that runs the full restore engine for each VM that
//! connects: several handler threads, background prefetch (sequential or a
//! recorded working set), zero runs left to the kernel (an image's index,
//! a memory file's holes), REMOVE as zeros, per-VM statistics, live
//! metrics. A VM whose serving breaks is failed closed (its unserved pages
//! poisoned, so its vCPUs get SIGBUS instead of hanging) while the server
//! goes on serving the others; a stopped server fails all of its VMs closed.

mod handshake;
mod server;

pub use handshake::{
    GuestRegionUffdMapping, HandshakeError, MAX_HANDSHAKE, Refusal, check_mappings, handshake,
    parse_mappings,
};
pub use server::{
    Backing, BackingError, Metrics, PrefetchPolicy, Reporter, Server, ServerEvent, ServerOptions,
    Stopper, Summary, VmStats,
};
