//! How much pushed data may be on its way during post-copy. A fault's
//! answer shares the path with the bulk push; if the push fills the
//! network's queues, every answer waits behind them. So the source keeps
//! pushed-but-unapplied bytes (sent minus what the destination acknowledged
//! applying) under a window of delivery rate x base round trip (the
//! bandwidth-delay product, as delay-based congestion control aims for):
//! the link stays nearly full and its queue near empty. (1.25 x kept a
//! quarter of a round trip queued: 2.5 ms more per remote fault at 10 ms,
//! for 3% less total time.)
//! The rate is the fastest delivery seen in the last second; the round
//! trip the fastest heartbeat. Kernel-free apart from the clock.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The window's state.
#[derive(Debug)]
struct State {
    sent: u64,
    acked: u64,
    /// (when, acked) samples of the last second.
    samples: VecDeque<(Instant, u64)>,
    /// Fastest delivery seen over 100 ms steps in the last second, B/s.
    rate: Option<f64>,
    last_progress: Instant,
}

impl State {
    /// Records that `total` bytes were applied at `now`, and the fastest
    /// delivery over samples at least 100 ms apart within the last second.
    fn sample(&mut self, now: Instant, total: u64) {
        self.samples.push_back((now, total));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            self.samples.pop_front();
        }
        let mut best = self.rate.unwrap_or(0.0) * 0.98;
        let v = self.samples.make_contiguous();
        let mut j = 0;
        for i in 0..v.len() {
            while j < i && v[i].0.duration_since(v[j].0) > Duration::from_millis(100) {
                j += 1;
            }
            if j > 0 {
                let (t0, b0) = v[j - 1];
                let dt = v[i].0.duration_since(t0).as_secs_f64();
                if dt > 0.0 {
                    best = best.max((v[i].1 - b0) as f64 / dt);
                }
            }
        }
        if best > 0.0 {
            self.rate = Some(best);
        }
    }
}

/// Pushed bytes in flight, bounded.
#[derive(Debug)]
pub(crate) struct Window {
    state: Mutex<State>,
    cv: Condvar,
}

/// The floor of the window.
const FLOOR: u64 = 32 << 10;
/// Without an acknowledgement for this long, a sender goes on anyway (the
/// link may be dying; heartbeats decide that).
const STALL: Duration = Duration::from_millis(250);

impl Default for Window {
    fn default() -> Self {
        Window {
            state: Mutex::new(State {
                sent: 0,
                acked: 0,
                samples: VecDeque::new(),
                rate: None,
                last_progress: Instant::now(),
            }),
            cv: Condvar::new(),
        }
    }
}

impl Window {
    /// A new link generation: counts start again.
    pub(crate) fn reset(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.sent = 0;
            s.acked = 0;
            s.samples.clear();
            s.last_progress = Instant::now();
        }
        self.cv.notify_all();
    }

    /// `n` bytes were handed to a bulk connection.
    pub(crate) fn on_sent(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.sent += n;
        }
    }

    /// The destination applied `total` bytes of this generation.
    pub(crate) fn on_ack(&self, total: u64) {
        if let Ok(mut s) = self.state.lock() {
            if total <= s.acked {
                return;
            }
            s.acked = total;
            let now = Instant::now();
            s.last_progress = now;
            // One sample per 5 ms is plenty for rates over 100 ms steps
            // (and keeps the rate's loop short at thousands of acks a second).
            let fresh = s
                .samples
                .back()
                .is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_millis(5));
            if !fresh {
                s.sample(now, total);
            }
        }
        self.cv.notify_all();
    }

    /// Waits until there is room in the window (or acknowledgements
    /// stalled, or `give_up` says stop). `rtt` is the base round trip;
    /// the window holds at least `least` of the link's time (on a fast
    /// link the round trip is shorter than the time to apply a chunk).
    pub(crate) fn wait_room(&self, rtt: Duration, least: Duration, give_up: impl Fn() -> bool) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        loop {
            let cap = limit(s.rate, rtt, least);
            if s.sent.saturating_sub(s.acked) < cap
                || s.last_progress.elapsed() > STALL
                || give_up()
            {
                return;
            }
            s = match self.cv.wait_timeout(s, Duration::from_millis(5)) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }
}

fn limit(rate: Option<f64>, rtt: Duration, least: Duration) -> u64 {
    match rate {
        // Until delivery is measured: a modest start (1 MiB filled a
        // 100 Mbit/s link's 20 ms queue and put 3-8 ms on the first remote
        // faults' p99), still a bandwidth-delay product of 100 Mbit/s at
        // 10 ms or 1 Gbit/s at 1 ms, so the first measurement is the
        // link's rate.
        None => START,
        Some(r) => {
            let bdp = r * rtt.as_secs_f64();
            ((1.0 * bdp) as u64)
                .max((r * least.as_secs_f64()) as u64)
                .max(FLOOR)
        }
    }
}

/// The window before delivery is measured.
const START: u64 = 128 << 10;

/// The size of a pushed chunk: a millisecond of the link (16 KiB to
/// `max`), so one chunk never holds an answer up for long.
fn chunk(rate: Option<f64>, max: u64) -> u64 {
    rate.map_or(max, |r| {
        ((r * 0.001) as u64).clamp(16 << 10, max.max(16 << 10))
    })
}

impl Window {
    /// The size of the next pushed chunk, at most `max` bytes.
    pub(crate) fn chunk(&self, max: u64) -> u64 {
        chunk(self.state.lock().ok().and_then(|s| s.rate), max)
    }
}

/// The destination's side of the window: bytes applied, acknowledged in
/// steps of at least [`Acks::STEP`]. Several threads (bulk readers, the
/// control reader for stale-list frames) apply bytes at once.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    applied: std::sync::atomic::AtomicU64,
    last: std::sync::atomic::AtomicU64,
}

impl Acks {
    /// Bytes between two acknowledgements.
    pub(crate) const STEP: u64 = 8 << 10;

    /// `bytes` more are applied; returns the total to acknowledge, if one
    /// is due. Totals returned only grow, though two threads may send
    /// theirs out of order (the source ignores one below what it has).
    pub(crate) fn add(&self, bytes: u64) -> Option<u64> {
        let done = self
            .applied
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst)
            + bytes;
        let last = self.last.load(std::sync::atomic::Ordering::SeqCst);
        (done.saturating_sub(last) >= Self::STEP
            && self
                .last
                .compare_exchange(
                    last,
                    done,
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                )
                .is_ok())
        .then_some(done)
    }

    /// A new link generation starts from zero.
    pub(crate) fn reset(&self) {
        self.applied.store(0, std::sync::atomic::Ordering::SeqCst);
        self.last.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn acks_from_racing_threads_never_go_back_or_fall_behind() {
        let a = std::sync::Arc::new(super::Acks::default());
        let sent = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (a, sent) = (a.clone(), &sent);
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        if let Some(n) = a.add(100 + (i * 7 + t) % 5000) {
                            sent.lock().unwrap().push(n);
                        }
                    }
                });
            }
        });
        let sent = sent.into_inner().unwrap();
        let total: u64 = (0..4u64)
            .map(|t| {
                (0..20_000u64)
                    .map(|i| 100 + (i * 7 + t) % 5000)
                    .sum::<u64>()
            })
            .sum();
        let max = sent.iter().copied().max().unwrap();
        assert!(
            max <= total && total - max < super::Acks::STEP + 5100,
            "{max} of {total}"
        );
        let mut sorted = sent.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), sent.len(), "each total acknowledged once");
    }

    use super::*;

    #[test]
    fn the_window_is_the_bandwidth_delay_product() {
        // 12.5 MB/s and 10 ms: a window of 125 KB.
        let ms = Duration::from_millis(1);
        let w = limit(Some(12.5e6), Duration::from_millis(10), ms);
        assert_eq!(w, 125_000);
        // A fast link with a short round trip: at least `least` of data.
        let w = limit(Some(125e6), Duration::from_micros(300), ms);
        assert_eq!(w, 125_000);
        let w = limit(Some(125e6), Duration::from_micros(300), 4 * ms);
        assert_eq!(w, 500_000);
        // Slow and short: the floor.
        assert_eq!(limit(Some(1e6), ms, ms), FLOOR);
        assert_eq!(limit(None, ms, ms), START);
        // Chunks: a millisecond of the link.
        assert_eq!(chunk(Some(12.5e6), 256 << 10), 16 << 10);
        assert_eq!(chunk(Some(125e6), 256 << 10), 125_000);
        assert_eq!(chunk(Some(10e9), 256 << 10), 256 << 10);
        assert_eq!(chunk(None, 256 << 10), 256 << 10);
    }

    #[test]
    fn acks_measure_delivery_and_open_the_window() {
        let w = Window::default();
        w.on_sent(4_000_000);
        // 1 MB every 100 ms: 10 MB/s.
        let t0 = Instant::now();
        for k in 1..=4u64 {
            while t0.elapsed() < Duration::from_millis(105 * k) {
                std::thread::sleep(Duration::from_millis(5));
            }
            w.on_ack(k * 1_000_000);
        }
        let rate = w
            .state
            .lock()
            .map(|s| s.rate)
            .unwrap_or(None)
            .unwrap_or(0.0);
        assert!((8e6..10.5e6).contains(&rate), "{rate}");
        // All acknowledged: room, no wait.
        let t = Instant::now();
        w.wait_room(Duration::from_millis(10), Duration::from_millis(1), || {
            false
        });
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn a_full_window_waits_until_acks_or_a_stall() {
        let w = Window::default();
        w.on_sent(8 << 20);
        let t = Instant::now();
        w.wait_room(Duration::from_millis(10), Duration::from_millis(1), || {
            false
        });
        // No acknowledgement at all: it goes on after the stall limit.
        assert!(
            t.elapsed() >= STALL - Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
        let stop = std::sync::atomic::AtomicBool::new(true);
        let t = Instant::now();
        w.reset();
        w.on_sent(8 << 20);
        w.wait_room(Duration::from_millis(10), Duration::from_millis(1), || {
            stop.load(std::sync::atomic::Ordering::SeqCst)
        });
        assert!(t.elapsed() < Duration::from_millis(50));
    }
}
