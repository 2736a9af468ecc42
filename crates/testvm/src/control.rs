//! Run controls shared with the vCPU threads: pause requests (at the next
//! progress report, or at once by kicking the threads out of KVM_RUN), a
//! per-vCPU rate limit, and progress for monitors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::kvm;

/// Shared run controls: pause requests, a write-rate throttle and per-vCPU
/// progress for monitors.
#[derive(Debug)]
pub struct RunControl {
    /// Stop each vCPU at its first progress report at or past this step.
    pub stop_at: Option<u64>,
    /// Set to pause every vCPU at its next progress report (or at once, with
    /// [`RunControl::pause_now`]).
    pub pause: AtomicBool,
    /// Steps done per vCPU, updated at each report.
    pub progress: Vec<AtomicU64>,
    /// Steps per second per vCPU (0: as fast as the vCPU goes). Enforced at
    /// progress reports, so over [`crate::guest::PROGRESS_EVERY`] steps.
    rate: AtomicU64,
    /// vCPU threads inside [`crate::TestVm::run`], to kick out of KVM_RUN.
    running: std::sync::Mutex<Vec<Option<kvm::Kickable>>>,
}

impl RunControl {
    /// Controls for `vcpus` vCPUs.
    pub fn new(vcpus: u32, stop_at: Option<u64>) -> Arc<RunControl> {
        Arc::new(RunControl {
            stop_at,
            pause: AtomicBool::new(false),
            progress: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            rate: AtomicU64::new(0),
            running: std::sync::Mutex::new((0..vcpus).map(|_| None).collect()),
        })
    }
    /// Total steps done.
    pub fn total(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }

    /// Limits each vCPU to `steps_per_sec` steps (writes, for the dirty
    /// workload) per second; 0 lifts the limit.
    pub fn set_rate(&self, steps_per_sec: u64) {
        self.rate.store(steps_per_sec, Ordering::Relaxed);
    }

    /// Pauses every vCPU now, between two guest instructions, rather than
    /// at its next progress report: running vCPUs are kicked out of
    /// KVM_RUN. Returns once none is inside the guest any more; the run
    /// then returns [`RunOutcome::Paused`] (unless every vCPU finished).
    pub fn pause_now(&self) {
        self.pause.store(true, Ordering::SeqCst);
        // A kick that lands just before a vCPU enters KVM_RUN is lost, so
        // kick until every thread has left.
        loop {
            let Ok(running) = self.running.lock() else {
                return;
            };
            let mut any = false;
            for k in running.iter().flatten() {
                k.kick();
                any = true;
            }
            drop(running);
            if !any {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    pub(crate) fn enter(&self, vcpu: u32) {
        if let Ok(mut r) = self.running.lock() {
            if let Some(slot) = r.get_mut(vcpu as usize) {
                *slot = Some(kvm::Kickable::current());
            }
        }
    }

    pub(crate) fn leave(&self, vcpu: u32) {
        if let Ok(mut r) = self.running.lock() {
            if let Some(slot) = r.get_mut(vcpu as usize) {
                *slot = None;
            }
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every vCPU halted after its last step.
    Finished,
    /// Every vCPU stopped at a progress report (stop_at or pause).
    Paused,
}

/// Holds a vCPU to the control's rate, checked at each progress report.
#[derive(Default)]
pub(crate) struct Throttle {
    base: Option<(std::time::Instant, u64, u64)>,
}

impl Throttle {
    pub(crate) fn wait(&mut self, count: u64, control: &RunControl, abort: &AtomicBool) {
        let rate = control.rate.load(Ordering::Relaxed);
        if rate == 0 {
            self.base = None;
            return;
        }
        let (t0, c0, r0) = *self
            .base
            .get_or_insert((std::time::Instant::now(), count, rate));
        if r0 != rate {
            self.base = Some((std::time::Instant::now(), count, rate));
            return;
        }
        let due =
            t0 + std::time::Duration::from_secs_f64(count.saturating_sub(c0) as f64 / rate as f64);
        // Sleeps in slices so that a pause is not held up.
        while std::time::Instant::now() < due
            && !control.pause.load(Ordering::SeqCst)
            && !abort.load(Ordering::SeqCst)
        {
            let left = due.saturating_duration_since(std::time::Instant::now());
            std::thread::sleep(left.min(std::time::Duration::from_millis(5)));
        }
    }
}
