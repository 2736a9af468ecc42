//! `livepage bench ...`: benchmarks that measure livepage beside a peer in the same run.

pub mod checkpoint;
pub mod demand;
pub mod faults;
pub mod firecracker;
pub mod migrate;
pub mod restore;
pub mod snapshot;
pub mod store;
pub mod track;

/// The value at quantile `q` of sorted samples (0 when empty).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
