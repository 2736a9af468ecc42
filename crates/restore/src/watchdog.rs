//! The watchdog: every thread that places pages holds a slot saying what it
//! places since when; placements outstanding past a limit are reported.
//! It also enforces the deadline for a lost source.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::Engine;
use crate::error::RestoreError;
use crate::options::{Notice, Stall};

/// What one thread is placing, since when.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    in_use: AtomicBool,
    name: Mutex<String>,
    since_ns: AtomicU64,
    addr: AtomicU64,
    len: AtomicU64,
    reported: AtomicBool,
}

impl Slot {
    pub(crate) fn start(&self, addr: u64, len: u64, now_ns: u64) {
        self.addr.store(addr, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.since_ns.store(now_ns, Ordering::Release);
    }

    pub(crate) fn stop(&self) {
        self.since_ns.store(0, Ordering::Release);
    }
}

/// The slots, and the stalls reported.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    pub(crate) slots: Vec<Slot>,
    stalls: Mutex<Vec<Stall>>,
}

impl Slots {
    pub(crate) fn new(n: usize) -> Slots {
        Slots {
            slots: (0..n).map(|_| Slot::default()).collect(),
            stalls: Mutex::new(Vec::new()),
        }
    }

    /// A free slot for the calling thread (None when all are taken: that
    /// thread goes unwatched).
    pub(crate) fn acquire(&self) -> Option<usize> {
        let i = self.slots.iter().position(|s| {
            s.in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        if let Ok(mut n) = self.slots[i].name.lock() {
            *n = std::thread::current()
                .name()
                .unwrap_or("a thread")
                .to_string();
        }
        Some(i)
    }

    pub(crate) fn release(&self, i: usize) {
        self.slots[i].stop();
        self.slots[i].in_use.store(false, Ordering::Release);
    }

    pub(crate) fn stalls(&self) -> Vec<Stall> {
        self.stalls.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Engine {
    /// Runs until `halt`: reports placements outstanding longer than
    /// `limit`, and fails closed once a lost source is past its deadline.
    pub(crate) fn watch(&self, limit: Duration, halt: &AtomicBool) {
        let limit_ns = limit.as_nanos() as u64;
        while !halt.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            if let Some((cause, waited)) = self.supply.past_deadline() {
                self.set_error(RestoreError::SourceLost {
                    cause,
                    waited_ms: waited.as_millis() as u64,
                });
                self.fail_closed();
            }
            let now = self.now_ns();
            for s in &self.slots.slots {
                let since = s.since_ns.load(Ordering::Acquire);
                if since == 0 {
                    s.reported.store(false, Ordering::Relaxed);
                    continue;
                }
                let waited = now.saturating_sub(since);
                if waited > limit_ns && !s.reported.swap(true, Ordering::Relaxed) {
                    let stall = Stall {
                        addr: s.addr.load(Ordering::Relaxed),
                        len: s.len.load(Ordering::Relaxed),
                        waited_ms: waited / 1_000_000,
                        worker: s.name.lock().map(|n| n.clone()).unwrap_or_default(),
                    };
                    self.tell(Notice::Stall(stall.clone()));
                    if let Ok(mut v) = self.slots.stalls.lock() {
                        v.push(stall);
                    }
                }
            }
        }
    }
}
