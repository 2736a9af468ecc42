//! `vm run --checkpoint-every`: a chain of checkpoints taken while the
//! guest runs. The vCPUs stop for the vCPU state and the harvest; the delta
//! is saved live ([`livepage_track::LiveCheckpoints`]). As soon as it is
//! written a monitor pauses the vCPUs again for the few microseconds it
//! takes to hand tracking back.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use livepage_image::FoldReport;
use livepage_mem::Region;
use livepage_testvm::{RunControl, RunOutcome, TestVm};
use livepage_track::{LiveCheckpoints, LiveOptions, LiveReport, Tracker};
use serde::Serialize;

use crate::table::Table;

/// One checkpoint of `vm run`. Durations in milliseconds.
#[derive(Debug, Serialize)]
pub struct CheckpointReport {
    /// Steps per vCPU at the instant.
    pub at_steps: Vec<u64>,
    /// Saving the vCPU state.
    pub state_ms: f64,
    /// The checkpoint; its `pause_ms` is widened to the vCPUs' whole pause
    /// at the instant: the state save plus the checkpoint's own pause
    /// (harvest, hand-over, arming).
    #[serde(flatten)]
    pub live: LiveReport,
}

/// What a checkpoint run needs.
pub struct Plan<'a> {
    pub every: u64,
    pub dir: &'a Path,
    pub live: bool,
    pub buffer: u64,
    pub handlers: usize,
    pub keep: Option<std::num::NonZeroUsize>,
}

/// The checkpoints of a run and what retention did.
#[derive(Debug, Default)]
pub struct Checkpoints {
    /// In order.
    pub list: Vec<CheckpointReport>,
    /// Folds (`--keep`).
    pub folds: Vec<FoldReport>,
    /// Folds that failed, each leaving the chain whole.
    pub retention_errors: Vec<String>,
}

/// Runs the VM to the end, taking a checkpoint every `plan.every` steps per
/// vCPU. Returns how the run ended and the checkpoints, in order.
pub fn run(
    vm: &mut TestVm,
    region: &Arc<Region>,
    tracker: &mut dyn Tracker,
    plan: &Plan<'_>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(RunOutcome, Checkpoints)> {
    let opts = LiveOptions::default()
        .live(plan.live)
        .keep(plan.keep)
        .snapshot(
            livepage_snapshot::SnapshotOptions::default()
                .buffer_bytes(plan.buffer as usize)
                .handler_threads(plan.handlers),
        );
    let mut cps = LiveCheckpoints::new(vec![region.clone()], opts);
    let vcpus = vm.spec().vcpus;
    // (at steps, state ms, vCPU pause ms) of each checkpoint taken, in order.
    let mut taken: VecDeque<(Vec<u64>, f64, f64)> = VecDeque::new();
    let mut out = Checkpoints::default();
    let mut collect = |cps: &mut LiveCheckpoints, taken: &mut VecDeque<_>| {
        if let Some(r) = cps.retainer() {
            for f in r.take_folds() {
                bar.println(fold_line(&f));
                out.folds.push(f);
            }
            for e in r.take_failures() {
                bar.println(format!("warning: {e}"));
                out.retention_errors.push(e.to_string());
            }
            if let Some((image, p)) = r.progress() {
                let name = image.file_name().map(|n| n.to_string_lossy().into_owned());
                bar.set_message(format!(
                    "folding into {}: {}%",
                    name.unwrap_or_default(),
                    (p.done * 100).checked_div(p.total).unwrap_or(100)
                ));
            } else {
                bar.set_message("");
            }
        }
        for r in cps.take_reports() {
            let (at_steps, state_ms, pause_ms) = taken.pop_front().unwrap_or_default();
            out.list.push(CheckpointReport {
                at_steps,
                state_ms,
                live: LiveReport { pause_ms, ..r },
            });
        }
    };
    let mut k = 1;
    let outcome = loop {
        let control = RunControl::new(vcpus, Some(k * plan.every));
        let outcome = run_until_written(vm, &control, bar, cps.watch())?;
        if outcome == RunOutcome::Finished {
            break outcome;
        }
        if cps.ready_to_hand_back() && vm.progress().iter().any(|&p| p < k * plan.every) {
            // Paused by the monitor: the delta is written; tracking goes back.
            cps.hand_back(tracker).context("handing tracking back")?;
            collect(&mut cps, &mut taken);
            continue;
        }
        let paused = Instant::now();
        let state = vm.save()?.to_bytes();
        let state_ms = paused.elapsed().as_secs_f64() * 1e3;
        let path = plan.dir.join(format!("checkpoint-{k:04}.img"));
        cps.checkpoint(tracker, &path, Some(state))
            .with_context(|| format!("checkpoint {}", path.display()))?;
        taken.push_back((
            vm.progress(),
            state_ms,
            paused.elapsed().as_secs_f64() * 1e3,
        ));
        collect(&mut cps, &mut taken);
        k += 1;
    };
    // The guest is done: nothing writes any more.
    cps.finish(tracker)
        .context("finishing the last checkpoint")?;
    collect(&mut cps, &mut taken);
    let (folds, failures) = cps.finish_retention();
    for f in folds {
        bar.println(fold_line(&f));
        out.folds.push(f);
    }
    out.retention_errors
        .extend(failures.iter().map(ToString::to_string));
    Ok((outcome, out))
}

fn fold_line(f: &FoldReport) -> String {
    format!(
        "folded {} into {} ({:.1} MiB in {:.0} ms)",
        f.base.display(),
        f.image.display(),
        f.bytes as f64 / (1 << 20) as f64,
        f.duration_ms
    )
}

/// The folds as a table.
pub fn folds_table(folds: &[FoldReport]) -> String {
    let mut t = Table::new(["folded into", "removed", "MiB", "fold ms"]);
    for f in folds {
        t.row([
            f.image.display().to_string(),
            f.base.display().to_string(),
            format!("{:.1}", f.bytes as f64 / (1 << 20) as f64),
            format!("{:.1}", f.duration_ms),
        ]);
    }
    t.render()
}

/// Runs the VM until `control` stops it, pausing it as soon as `watch`
/// says the checkpoint in flight is written.
fn run_until_written(
    vm: &mut TestVm,
    control: &Arc<RunControl>,
    bar: &indicatif::ProgressBar,
    watch: Option<livepage_snapshot::Watch>,
) -> anyhow::Result<RunOutcome> {
    let Some(watch) = watch else {
        return super::run_with_bar(vm, control, bar);
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if watch.is_saved() {
                    control.pause_now();
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let r = super::run_with_bar(vm, control, bar);
        done.store(true, Ordering::SeqCst);
        r
    })
}

/// The checkpoints as a table.
pub fn table(checkpoints: &[CheckpointReport]) -> String {
    let mut c = Table::new([
        "checkpoint",
        "kind",
        "mode",
        "at steps",
        "dirty",
        "data pages",
        "collect ms",
        "pause ms",
        "write ms",
        "faults",
        "handback ms",
    ]);
    for cp in checkpoints {
        let l = &cp.live;
        c.row([
            l.image.display().to_string(),
            if l.parent.is_some() { "delta" } else { "base" }.to_string(),
            l.mode.to_string(),
            format!("{:?}", cp.at_steps),
            format!("{} KiB", l.dirty_bytes >> 10),
            l.stats.data_pages.to_string(),
            format!("{:.2}", l.collect_ms),
            format!("{:.2}", l.pause_ms),
            format!("{:.1}", l.write_ms),
            l.stats.faults.to_string(),
            format!("{:.3}", l.handback_ms),
        ]);
    }
    c.render()
}
