//! `livepage vm ...`: the test VM from the command line. Shared parts of
//! `vm run` ([`run`]) and `vm resume` ([`resume`]).

pub mod checkpoint;
pub mod migrate;
pub mod receive;
pub mod resume;
pub mod run;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use livepage_mem::MemoryKind;
use livepage_testvm::{RunControl, RunOutcome, TestVm, VmSpec, Workload};

use crate::table::Table;

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
}

/// Refuses requests this host cannot hold, with the numbers.
pub fn check_memory(spec: &VmSpec, kind: MemoryKind) -> anyhow::Result<()> {
    let total = meminfo("MemTotal:").unwrap_or(u64::MAX);
    let avail = meminfo("MemAvailable:").unwrap_or(u64::MAX);
    // What the guest will really touch: every page for touch, at most one page
    // per write for dirty; shmem and hugetlb need the whole size up front.
    let touched = match spec.workload {
        Workload::Dirty { iterations, .. }
            if matches!(kind, MemoryKind::Anon | MemoryKind::Thp) =>
        {
            (iterations * u64::from(spec.vcpus) * 4096).min(spec.ram)
        }
        _ => spec.ram,
    };
    if spec.ram > total && !matches!(kind, MemoryKind::Anon | MemoryKind::Thp) {
        bail!(
            "guest RAM of {} MiB exceeds this host's {} MiB of memory; ask for less with --mem",
            spec.ram >> 20,
            total >> 20
        );
    }
    if touched > avail {
        bail!(
            "this run would use about {} MiB but only {} MiB are available; ask for less with --mem (or fewer --iterations)",
            touched >> 20,
            avail >> 20
        );
    }
    Ok(())
}

/// Runs the VM while a progress bar follows the vCPUs' reports.
pub fn run_with_bar(
    vm: &mut TestVm,
    control: &Arc<RunControl>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<RunOutcome> {
    let done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        let monitor = s.spawn(|| {
            let mut n = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if n % 10 == 0 {
                    bar.set_position(control.total());
                }
                n = n.wrapping_add(1);
                // Short naps: the run returns as soon as the guest pauses.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let r = vm.run(control);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = monitor.join();
        r
    })?;
    Ok(outcome)
}

/// The rows of a lazy restore's statistics.
pub fn restore_rows(t: &mut Table, st: &livepage_restore::RestoreStats) {
    t.row([
        "restore".to_string(),
        format!(
            "{:?} mode, {} handler(s) on {} userfaultfd(s)",
            st.mode, st.handlers, st.uffds
        ),
    ]);
    t.row([
        "faults served".to_string(),
        format!(
            "{} (p50 {:.1} µs, p99 {:.1} µs)",
            st.faults_served, st.fault_p50_us, st.fault_p99_us
        ),
    ]);
    t.row([
        "prefetched / zero-filled".to_string(),
        format!("{} / {}", st.prefetched, st.zero_filled),
    ]);
    t.row([
        "zero runs left to the kernel".to_string(),
        format!("{} pages", st.left_to_kernel),
    ]);
    if st.discarded > 0 {
        t.row(["discarded".to_string(), format!("{} pages", st.discarded)]);
    }
    t.row([
        "until fully resident".to_string(),
        format!("{:.1} ms", st.until_resident_ms),
    ]);
    let total: u64 = st.histogram.iter().map(|b| b.count).sum();
    for b in st.histogram.iter().filter(|b| b.count > 0) {
        let bar = "#".repeat(((b.count * 30).div_ceil(total.max(1))) as usize);
        t.row([
            format!("  fault < {} µs", b.below_us),
            format!("{:>7} {bar}", b.count),
        ]);
    }
    if !st.stalls.is_empty() {
        t.row(["stalls (watchdog)".to_string(), st.stalls.len().to_string()]);
    }
}
