//! When to stop pre-copying: bandwidth and dirty rate are measured every
//! round; switch over when the predicted stop time fits the downtime
//! target; in hybrid mode go to post-copy when the remaining set stops
//! shrinking or the dirty rate approaches the bandwidth. Kernel-free.

use std::time::Duration;

/// How the memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Pause, copy everything, resume there: the baseline.
    StopAndCopy,
    /// Rounds until the rest fits the downtime target; every page arrives
    /// before the guest resumes.
    Precopy,
    /// Pause at once; the guest resumes there and pages follow on demand
    /// and in the background.
    Postcopy,
    /// Pre-copy rounds while they converge, then post-copy.
    #[default]
    Hybrid,
}

/// Convergence settings.
#[derive(Debug, Clone, Copy)]
pub struct Converge {
    /// The method.
    pub method: Method,
    /// The longest pause the guest may see (pre-copy's goal).
    pub downtime_target: Duration,
    /// The most pre-copy rounds (the first full pass counts as one).
    pub max_rounds: u32,
}

impl Default for Converge {
    fn default() -> Self {
        Converge {
            method: Method::Hybrid,
            downtime_target: Duration::from_millis(300),
            max_rounds: 30,
        }
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Another round.
    Continue,
    /// Pause and send the rest before the guest resumes (it fits the target).
    StopAndCopy,
    /// Pause and go to post-copy.
    Postcopy,
    /// Pre-copy alone cannot finish: give up (the guest runs on here).
    NotConverging,
}

/// One pre-copy round, as measured.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Round {
    /// 1-based.
    pub round: u32,
    /// Bytes of pages sent (as data).
    pub sent_bytes: u64,
    /// Bytes of the round's pages (data, zero and untouched alike).
    pub pages_bytes: u64,
    /// Time the round took to send, in milliseconds.
    pub send_ms: f64,
    /// Bytes found written since the previous collect (what the next round sends).
    pub dirty_bytes: u64,
    /// Time since the previous collect, in milliseconds.
    pub interval_ms: f64,
    /// Measured link bandwidth (bytes per second) after this round.
    pub bandwidth: f64,
    /// Measured dirty rate (bytes per second).
    pub dirty_rate: f64,
    /// Predicted stop time if we switched over now, in milliseconds.
    pub predicted_ms: f64,
    /// What was decided.
    pub decision: Decision,
}

/// The convergence state of one migration.
#[derive(Debug)]
pub struct Convergence {
    cfg: Converge,
    bandwidth: Option<f64>,
    rounds: Vec<Round>,
}

impl Convergence {
    /// A new migration's state.
    pub fn new(cfg: Converge) -> Convergence {
        Convergence {
            cfg,
            bandwidth: None,
            rounds: Vec::new(),
        }
    }

    /// The rounds so far.
    pub fn rounds(&self) -> &[Round] {
        &self.rounds
    }

    /// The bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    /// Records a round: `wire_bytes` went over the link in `send` while
    /// pages of `pages_bytes` were covered; the collect after it found
    /// `dirty_bytes` written over `interval`. `fixed` is the switchover's
    /// cost beyond the pages (device state, round trips). Decides.
    pub fn after_round(
        &mut self,
        wire_bytes: u64,
        pages_bytes: u64,
        send: Duration,
        dirty_bytes: u64,
        interval: Duration,
        fixed: Duration,
    ) -> Decision {
        // Short rounds say little about the link: weigh by time.
        if wire_bytes >= 256 << 10 && send >= Duration::from_millis(5) {
            let bw = wire_bytes as f64 / send.as_secs_f64();
            self.bandwidth = Some(match self.bandwidth {
                Some(old) => old * 0.5 + bw * 0.5,
                None => bw,
            });
        }
        let bw = self.bandwidth.unwrap_or(f64::INFINITY);
        let rate = dirty_bytes as f64 / interval.as_secs_f64().max(1e-3);
        let predicted = Duration::from_secs_f64((dirty_bytes as f64 / bw).min(1e6)) + fixed;
        let n = self.rounds.len() as u32 + 1;
        let shrinking = self
            .rounds
            .last()
            .is_none_or(|prev| (dirty_bytes as f64) < prev.dirty_bytes as f64 * 0.9);
        let fits = predicted <= self.cfg.downtime_target;
        let decision = match self.cfg.method {
            Method::StopAndCopy | Method::Postcopy => Decision::StopAndCopy,
            Method::Precopy if fits => Decision::StopAndCopy,
            Method::Precopy if n >= self.cfg.max_rounds => Decision::NotConverging,
            Method::Precopy => Decision::Continue,
            // Hybrid always ends in post-copy: the pause is the last
            // collect and the device state, whatever is left.
            Method::Hybrid
                if fits
                    || n >= self.cfg.max_rounds
                    || (n >= 2 && !shrinking)
                    || rate >= 0.8 * bw =>
            {
                Decision::Postcopy
            }
            Method::Hybrid => Decision::Continue,
        };
        self.rounds.push(Round {
            round: n,
            sent_bytes: wire_bytes,
            pages_bytes,
            send_ms: send.as_secs_f64() * 1e3,
            dirty_bytes,
            interval_ms: interval.as_secs_f64() * 1e3,
            bandwidth: if bw.is_finite() { bw } else { 0.0 },
            dirty_rate: rate,
            predicted_ms: predicted.as_secs_f64() * 1e3,
            decision,
        });
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn conv(method: Method) -> Convergence {
        Convergence::new(Converge {
            method,
            downtime_target: 300 * MS,
            max_rounds: 5,
        })
    }

    #[test]
    fn a_rest_that_fits_the_target_switches_over() {
        let mut c = conv(Method::Precopy);
        // 100 MB/s; 64 MiB dirty: 670 ms, too long.
        let d = c.after_round(100_000_000, 1 << 30, 1000 * MS, 64 << 20, 1000 * MS, 5 * MS);
        assert_eq!(d, Decision::Continue);
        // 8 MiB dirty: 84 ms.
        let d = c.after_round(64 << 20, 64 << 20, 671 * MS, 8 << 20, 671 * MS, 5 * MS);
        assert_eq!(d, Decision::StopAndCopy);
        assert!((c.bandwidth().unwrap() - 100e6).abs() < 1e6);
    }

    #[test]
    fn precopy_gives_up_after_max_rounds_and_hybrid_goes_to_postcopy() {
        // Dirtying at twice the bandwidth: never fits.
        let mut pre = conv(Method::Precopy);
        let mut hy = conv(Method::Hybrid);
        let mut pre_d = Decision::Continue;
        for _ in 0..5 {
            pre_d = pre.after_round(10_000_000, 10_000_000, 1000 * MS, 20_000_000, 1000 * MS, MS);
        }
        assert_eq!(pre_d, Decision::NotConverging);
        assert_eq!(pre.rounds().len(), 5);
        let d = hy.after_round(10_000_000, 10_000_000, 1000 * MS, 20_000_000, 1000 * MS, MS);
        assert_eq!(d, Decision::Postcopy, "dirty rate above the bandwidth");
    }

    #[test]
    fn hybrid_goes_to_postcopy_when_the_rest_stops_shrinking() {
        let mut c = conv(Method::Hybrid);
        let d = c.after_round(100_000_000, 1 << 30, 1000 * MS, 60 << 20, 2000 * MS, MS);
        assert_eq!(d, Decision::Continue);
        let d = c.after_round(60 << 20, 60 << 20, 630 * MS, 58 << 20, 1500 * MS, MS);
        assert_eq!(d, Decision::Postcopy);
    }

    #[test]
    fn hybrid_ends_in_postcopy_even_when_the_rest_fits() {
        let mut c = conv(Method::Hybrid);
        let d = c.after_round(100_000_000, 1 << 30, 1000 * MS, 1 << 20, 1000 * MS, MS);
        assert_eq!(d, Decision::Postcopy);
    }

    #[test]
    fn postcopy_and_stop_and_copy_never_iterate() {
        for m in [Method::Postcopy, Method::StopAndCopy] {
            let mut c = conv(m);
            let d = c.after_round(1 << 30, 1 << 30, 1000 * MS, 1 << 30, 1000 * MS, MS);
            assert_eq!(d, Decision::StopAndCopy);
        }
    }
}
