//! What a restore did: counters kept while it runs, and the statistics
//! made from them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::options::{Mode, Stall};
use crate::working_set::WorkingSet;

/// One bucket of the fault-latency histogram.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bucket {
    /// Upper bound (exclusive) in µs.
    pub below_us: u64,
    /// Faults in the bucket.
    pub count: u64,
}

/// Statistics of a restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreStats {
    /// Missing or minor.
    pub mode: Mode,
    /// Handler threads.
    pub handlers: usize,
    /// Userfaultfds.
    pub uffds: usize,
    /// Total pages.
    pub pages: u64,
    /// Pages already correct in memory at the start (never fetched).
    pub resident: u64,
    /// Faults that placed a page.
    pub faults_served: u64,
    /// Pages placed by the prefetcher (or by `wait`).
    pub prefetched: u64,
    /// Pages placed from data pushed by a producer.
    pub pushed: u64,
    /// Pages answered with zeros (zero in the source, or discarded).
    pub zero_filled: u64,
    /// Pages in zero runs left to the kernel (unregistered).
    pub left_to_kernel: u64,
    /// Pages discarded (REMOVE events) during the restore.
    pub discarded: u64,
    /// Pages lost to source errors (poisoned).
    pub lost: u64,
    /// Faults outside every mapped range (poisoned).
    pub outside_faults: u64,
    /// Times the source was replaced.
    pub source_replacements: u64,
    /// Milliseconds from start until every page was resident.
    pub until_resident_ms: f64,
    /// Demand-fault service time p50 (µs, read to resolved).
    pub fault_p50_us: f64,
    /// p99.
    pub fault_p99_us: f64,
    /// Slowest.
    pub fault_max_us: f64,
    /// Sum of demand-fault service times, in milliseconds: how long
    /// faulting threads waited in all.
    pub fault_total_ms: f64,
    /// Demand-fault service times, log2 buckets.
    pub histogram: Vec<Bucket>,
    /// Placements the watchdog reported.
    pub stalls: Vec<Stall>,
    /// Source pages in first-fault order (when recording).
    #[serde(skip)]
    pub working_set: Option<WorkingSet>,
}

/// Counters updated while the restore runs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) faults: AtomicU64,
    pub(crate) prefetched: AtomicU64,
    pub(crate) pushed: AtomicU64,
    pub(crate) zero: AtomicU64,
    pub(crate) kernel_zero: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) outside: AtomicU64,
    pub(crate) resident: AtomicU64,
    pub(crate) replacements: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Log2 buckets of latencies given in ns.
pub(crate) fn log2_buckets(lat_ns: &[u64]) -> Vec<Bucket> {
    let mut counts = [0u64; 24];
    for l in lat_ns {
        let us = l / 1000;
        let b = (64 - us.leading_zeros()) as usize;
        counts[b.min(23)] += 1;
    }
    let last = counts.iter().rposition(|c| *c > 0).map_or(0, |i| i + 1);
    counts[..last]
        .iter()
        .enumerate()
        .map(|(i, c)| Bucket {
            below_us: 1u64 << i,
            count: *c,
        })
        .collect()
}

/// The `f` quantile (0..=1) of sorted latencies, in µs.
pub(crate) fn quantile_us(sorted_ns: &[u64], f: f64) -> f64 {
    sorted_ns
        .get(((sorted_ns.len().max(1) - 1) as f64 * f) as usize)
        .copied()
        .unwrap_or(0) as f64
        / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_log2() {
        let b = log2_buckets(&[500, 1_500, 3_000, 3_500, 1_000_000]);
        assert_eq!(b[0].below_us, 1);
        assert_eq!(b[0].count, 1); // 0 µs
        assert_eq!(b[1].count, 1); // 1 µs
        assert_eq!(b[2].count, 2); // 3 µs
        assert_eq!(b.last().map(|b| b.below_us), Some(1024));
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 5);
        let s = [1_000, 2_000, 3_000, 4_000];
        assert_eq!(quantile_us(&s, 0.5), 2.0);
        assert_eq!(quantile_us(&s, 1.0), 4.0);
        assert_eq!(quantile_us(&[], 0.5), 0.0);
    }
}
