//! What a migration did, on each side: a table and `--json` (milliseconds
//! and bytes as plain numbers).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::converge::Round;

/// Byte counts of one side, by phase (frames on the wire, headers included).
#[derive(Debug, Default)]
pub(crate) struct Bytes {
    pub(crate) precopy: AtomicU64,
    pub(crate) switchover: AtomicU64,
    pub(crate) postcopy: AtomicU64,
    /// Page bytes before compression, and after (data pages only).
    pub(crate) raw: AtomicU64,
    pub(crate) compressed: AtomicU64,
    /// Pages sent with data, and as zero ranges (no payload).
    pub(crate) data_pages: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Bytes per phase.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PhaseBytes {
    /// Pre-copy rounds.
    pub precopy: u64,
    /// While the guest was paused (stop-and-copy's copy, pre-copy's last round).
    pub switchover: u64,
    /// Post-copy: pushed and demanded pages, the stale set.
    pub postcopy: u64,
    /// All of it.
    pub total: u64,
}

/// One lost link, as seen by the source.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RecoveryEvent {
    /// When the loss was found (Unix time, ms).
    pub detected_unix_ms: f64,
    /// When the new connections worked (Unix time, ms).
    pub recovered_unix_ms: f64,
    /// Connection attempts it took.
    pub attempts: u32,
}

/// Unix time now, in ms.
pub(crate) fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Where the downtime went, in ms.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DowntimeParts {
    /// The last collect of the dirty tracker.
    pub collect_ms: f64,
    /// Pages sent while paused (stop-and-copy, pre-copy's rest; the
    /// discard list in missing-mode post-copy), until applied there.
    pub copy_ms: f64,
    /// The device state, its restore there, and the "resumed" coming back
    /// (half a round trip taken off).
    pub resume_ms: f64,
}

/// The source's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourceReport {
    /// "stop-and-copy", "precopy", "postcopy" or "hybrid".
    pub method: String,
    /// How the destination placed post-copy pages ("missing" or "minor").
    pub dest_mode: String,
    /// Whether TLS protected the link.
    pub tls: bool,
    /// Bulk connections.
    pub connections: usize,
    /// Guest RAM (all regions), bytes.
    pub ram_bytes: u64,
    /// Pages that held data when the migration started, bytes.
    pub touched_bytes: u64,
    /// Start to the destination reporting every page resident, in ms.
    pub total_ms: f64,
    /// vCPUs paused here to running there, in ms, on this side's clock
    /// (the destination's "resumed" arrives half a round trip late; that
    /// half is taken off).
    pub downtime_ms: f64,
    /// The pause hook's own time, in ms.
    pub pause_ms: f64,
    /// Where the downtime went.
    pub downtime_parts: DowntimeParts,
    /// Bytes per phase.
    pub bytes: PhaseBytes,
    /// Total bytes ÷ guest RAM.
    pub bytes_per_ram: f64,
    /// Post-copy bytes ÷ the post-copy set's bytes (1.0: each page once).
    pub postcopy_bytes_per_page_bytes: f64,
    /// Pre-copy rounds.
    pub rounds: Vec<Round>,
    /// Why pre-copy stopped.
    pub switch_reason: String,
    /// Pages the destination lacked or held stale at the switchover.
    pub postcopy_pages: u64,
    /// Of which pages were pushed in the background.
    pub pushed_pages: u64,
    /// Pages sent because the destination asked (remote faults).
    pub demanded_pages: u64,
    /// Requests answered.
    pub requests: u64,
    /// Pages sent twice because the destination asked for them again (it
    /// gave up a copy, or one promised on a bulk connection had not come
    /// within 250 ms).
    pub asked_again_pages: u64,
    /// Times the link was lost and came back.
    pub recoveries: u64,
    /// Pages sent again after a recovery (lost in flight).
    pub resent_pages: u64,
    /// Milliseconds from each loss to the link working again.
    pub recovery_ms: Vec<f64>,
    /// When each loss was seen and the link worked again (Unix time, ms).
    pub recovery_events: Vec<RecoveryEvent>,
    /// Pages sent with data, and as zero/untouched ranges without payload.
    pub data_pages: u64,
    /// See `data_pages`.
    pub zero_pages: u64,
    /// Compressed ÷ raw bytes of the data pages (1.0: no compression).
    pub compression_ratio: f64,
    /// Link round trip measured by heartbeats, in ms (median).
    pub rtt_ms: f64,
    /// Its 99th percentile, in ms: what the path itself adds to a remote
    /// fault's tail.
    pub rtt_p99_ms: f64,
    /// Measured bandwidth, bytes per second.
    pub bandwidth: f64,
    /// The destination's report, as it sent it with "resident".
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dest: Option<Box<DestReport>>,
}

/// The destination's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DestReport {
    /// "missing" or "minor".
    pub mode: String,
    /// Whether TLS protected the link.
    pub tls: bool,
    /// Bytes received per phase.
    pub bytes: PhaseBytes,
    /// Pages received in pre-copy rounds.
    pub precopy_pages: u64,
    /// The stale set (pages to come in post-copy).
    pub postcopy_pages: u64,
    /// First connection to the switchover frame, in ms.
    pub until_switchover_ms: f64,
    /// The switchover frame to "resumed", in ms (discarding stale pages in
    /// missing mode; registering; restoring the vCPUs).
    pub switchover_ms: f64,
    /// The switchover frame to every page resident, in ms.
    pub postcopy_ms: f64,
    /// Faults served from the source (remote faults).
    pub remote_faults: u64,
    /// Remote-fault latency p50, µs.
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
    /// Slowest.
    pub fault_max_us: f64,
    /// Log2 histogram of remote-fault latencies (µs upper bound, count).
    pub fault_histogram: Vec<(u64, u64)>,
    /// Sum of the time faulting threads waited, in ms.
    pub blocked_ms: f64,
    /// Pages placed from the background push.
    pub pushed_pages: u64,
    /// Pages answered "current" (minor mode: the pre-copied copy was kept).
    pub kept_current: u64,
    /// Reads that asked again (AGAIN) for pages promised on a bulk
    /// connection that had not come within 250 ms.
    pub asked_again: u64,
    /// Times the link was lost and came back.
    pub recoveries: u64,
    /// The source's report, as it sent it.
    pub source: Option<SourceReport>,
}
