//! The source's driver: connect, pre-copy rounds, the switchover, and
//! either the rest while paused (stop-and-copy, pre-copy) or post-copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{PageBitmap, RangeSet, Region};
use livepage_track::Tracker;

use super::control::{self, Dial, Event};
use super::postcopy::Post;
use super::sender::{Job, PHASE_POSTCOPY, PHASE_PRECOPY, PHASE_SWITCHOVER, Senders, Shared};
use super::{Guest, SourceOptions, TrackerFactory};
use crate::codec::{AutoPolicy, Compression};
use crate::converge::{Convergence, Decision, Method};
use crate::error::{FailedIn, MigrateError};
use crate::link::{Link, Rtt};
use crate::plan::{CHUNK_BYTES, pieces};
use crate::progress::{ProgressView, Stage};
use crate::proto::frame::{Header, Kind, list};
use crate::proto::msg::{Caps, DestMode, MigrationId, RegionShape, Switchover};
use crate::stats::{Bytes, PhaseBytes, SourceReport, get};

/// One migration's source side.
pub(super) struct Run {
    pub(super) dial: Dial,
    pub(super) opts: SourceOptions,
    pub(super) regions: Arc<Vec<Arc<Region>>>,
    pub(super) shared: Arc<Shared>,
    pub(super) link: Arc<Link>,
    pub(super) mode: DestMode,
    pub(super) events: Receiver<Event>,
    pub(super) ev_tx: Sender<Event>,
    pub(super) senders: Option<Arc<Senders>>,
    pub(super) threads: Vec<JoinHandle<()>>,
    /// Pages whose destination copy (or its zeros) is current.
    current: Vec<PageBitmap>,
    /// Pages ever handed to a sender (the destination may hold a copy).
    ever_sent: Vec<PageBitmap>,
    pub(super) report: SourceReport,
    t_start: Instant,
    pub(super) progress: Arc<ProgressView>,
    bytes: Arc<Bytes>,
    phase: Arc<AtomicU8>,
    pub(super) rtt: Arc<Rtt>,
    /// When the guest stopped here.
    pub(super) t_paused: Option<Instant>,
    /// The same, Unix time in ns.
    pub(super) paused_unix_ns: Option<u64>,
    /// The destination's report, from its "resident".
    pub(super) dest_report: Option<crate::stats::DestReport>,
    /// The tracker after its last collect (dropped after the switchover).
    pub(super) retired: Option<Box<dyn Tracker>>,
}

fn lost(peer: SocketAddr, phase: FailedIn, here: bool, why: String) -> MigrateError {
    MigrateError::LinkLost {
        peer,
        phase,
        guest_runs_here: here,
        source: Box::new(MigrateError::Aborted { peer, reason: why }),
    }
}

impl Run {
    /// Connects (generation 0) and starts the link's threads.
    pub(super) fn start(
        to: SocketAddr,
        regions: Vec<Arc<Region>>,
        opts: SourceOptions,
    ) -> Result<Run, MigrateError> {
        let progress = opts.progress.clone().unwrap_or_default();
        progress.stage(Stage::Connecting, 0, 0);
        let shapes: Vec<RegionShape> = regions
            .iter()
            .map(|r| RegionShape {
                page_size: r.page_size() as u64,
                pages: r.pages() as u64,
            })
            .collect();
        let caps = match opts.compression {
            Compression::None => Caps::empty(),
            _ => Caps::LZ4 | Caps::ZSTD,
        };
        let rtt = Arc::new(Rtt::default());
        let dial = Dial {
            to,
            security: opts.security.clone(),
            live: opts.liveness,
            id: MigrationId::random().map_err(|e| MigrateError::Spawn {
                thread: "random migration id".into(),
                source: e,
            })?,
            shapes: shapes.clone(),
            bulk: opts.connections as u8,
            caps,
            rtt: rtt.clone(),
        };
        let (link, welcome) = control::connect(&dial, 0)?;
        let compression = if welcome.caps.is_empty() {
            Compression::None
        } else {
            opts.compression
        };
        let regions = Arc::new(regions);
        let bytes = Arc::new(Bytes::default());
        let phase = Arc::new(AtomicU8::new(PHASE_PRECOPY));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            regions: regions.clone(),
            policy: Arc::new(AutoPolicy::new(compression, opts.connections.min(cpus))),
            bytes: bytes.clone(),
            phase: phase.clone(),
            window: Arc::new(crate::window::Window::default()),
            rtt: rtt.clone(),
            pace: opts.pace,
            // Post-copy follows pre-copy only in hybrid: there a pre-copy
            // queue left at the switchover would hold the first answers up.
            pace_precopy: opts.pace && opts.converge.method == crate::converge::Method::Hybrid,
        });
        let (ev_tx, events) = channel();
        let current = regions.iter().map(|r| PageBitmap::new(r.pages())).collect();
        let ever_sent = regions.iter().map(|r| PageBitmap::new(r.pages())).collect();
        let report = SourceReport {
            method: format!("{:?}", opts.converge.method),
            dest_mode: format!("{:?}", welcome.mode).to_lowercase(),
            tls: opts.security.is_tls(),
            connections: opts.connections,
            ram_bytes: regions.iter().map(|r| r.len() as u64).sum(),
            ..SourceReport::default()
        };
        let mut run = Run {
            dial,
            opts,
            regions,
            shared,
            link,
            mode: welcome.mode,
            events,
            ev_tx,
            senders: None,
            threads: Vec::new(),
            current,
            ever_sent,
            report,
            t_start: Instant::now(),
            progress,
            bytes,
            phase,
            rtt,
            t_paused: None,
            paused_unix_ns: None,
            dest_report: None,
            retired: None,
        };
        run.report.method = serde_json::to_value(run.opts.converge.method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        run.start_threads()?;
        Ok(run)
    }

    pub(super) fn start_threads(&mut self) -> Result<(), MigrateError> {
        let shapes = self.dial.shapes.clone();
        self.shared.window.reset();
        self.threads.push(control::spawn_reader(
            &self.link,
            shapes,
            self.ev_tx.clone(),
            self.shared.window.clone(),
        )?);
        self.threads.push(
            self.link
                .spawn_heartbeat(self.opts.liveness, "lp-heartbeat")?,
        );
        self.senders = Some(Arc::new(Senders::start(&self.link, self.shared.clone())?));
        Ok(())
    }

    pub(super) fn senders_arc(&self) -> Arc<Senders> {
        self.senders
            .clone()
            .expect("senders run while the link is up")
    }

    /// Stops this generation's threads (the link is shut if it was not).
    pub(super) fn stop_threads(&mut self) {
        self.link.fail("stopping");
        if let Some(s) = self.senders.take() {
            // Whoever else held them (the push) has been joined.
            if let Ok(s) = Arc::try_unwrap(s) {
                s.stop();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Events of the old generation are stale now.
        while self.events.try_recv().is_ok() {}
    }

    fn senders(&self) -> &Senders {
        self.senders
            .as_ref()
            .expect("senders run while the link is up")
    }

    fn peer(&self) -> SocketAddr {
        self.dial.to
    }

    /// Queues page ranges (per region) on the senders; marks them current
    /// and sent. Returns the bytes of pages covered, or None if the link died.
    fn send_sets(&self, sets: &[RangeSet]) -> Option<u64> {
        let n = self.senders().len();
        let mut covered = 0;
        for (r, set) in sets.iter().enumerate() {
            let ps = self.regions[r].page_size() as u64;
            for (s, e) in set.iter() {
                for (first, count, conn) in pieces(r, s, e, ps, CHUNK_BYTES, n) {
                    if self.link.is_down() {
                        return None;
                    }
                    for p in first..first + u64::from(count) {
                        self.current[r].set(p as usize);
                        self.ever_sent[r].set(p as usize);
                    }
                    let job = Job::Pages {
                        region: r,
                        first,
                        count,
                    };
                    if !self.senders().send(conn, job) {
                        return None;
                    }
                    let b = u64::from(count) * ps;
                    covered += b;
                    self.progress.advance(b);
                    self.progress.set_wire(self.wire());
                }
            }
        }
        Some(covered)
    }

    fn wire(&self) -> u64 {
        get(&self.bytes.precopy) + get(&self.bytes.switchover) + get(&self.bytes.postcopy)
    }

    /// Pages not current, per region, as page ranges.
    fn not_current(&self) -> Vec<RangeSet> {
        self.current
            .iter()
            .map(|c| {
                let mut set = RangeSet::new();
                let mut p = 0;
                while let Some(s) = c.next_clear(p) {
                    let e = c.next_set(s).unwrap_or(c.len());
                    set.insert(s as u64, e as u64);
                    p = e;
                }
                set
            })
            .collect()
    }

    fn bytes_of(&self, sets: &[RangeSet]) -> u64 {
        sets.iter()
            .enumerate()
            .map(|(r, s)| s.total() * self.regions[r].page_size() as u64)
            .sum()
    }

    /// Waits for an event `pick` accepts; a dead link or an abort is an error.
    pub(super) fn wait_for(
        &mut self,
        phase: FailedIn,
        here: bool,
        mut pick: impl FnMut(&Event) -> bool,
    ) -> Result<Event, MigrateError> {
        loop {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Down(why)) => return Err(lost(self.peer(), phase, here, why)),
                Ok(Event::Abort(reason)) => {
                    return Err(MigrateError::Aborted {
                        peer: self.peer(),
                        reason,
                    });
                }
                Ok(ev) if pick(&ev) => return Ok(ev),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    self.progress.set_wire(self.wire());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(lost(self.peer(), phase, here, self.link.cause()));
                }
            }
        }
    }

    /// End marker `id` on every bulk connection; waits until the
    /// destination applied everything before it.
    fn drain(&mut self, id: u64, phase: FailedIn, here: bool) -> Result<(), MigrateError> {
        if !self.senders().end(id) {
            return Err(lost(self.peer(), phase, here, self.link.cause()));
        }
        self.wait_for(phase, here, |e| matches!(e, Event::Drained(d) if *d == id))?;
        Ok(())
    }

    fn abort(&mut self, reason: &str) {
        let _ = self
            .link
            .control
            .send(Header::new(Kind::Abort), reason.as_bytes());
        self.stop_threads();
    }

    /// The whole migration.
    pub(super) fn go(
        mut self,
        track: TrackerFactory,
        guest: &mut dyn Guest,
    ) -> Result<SourceReport, MigrateError> {
        let method = self.opts.converge.method;
        let mut tracker: Option<Box<dyn Tracker>> = None;
        let mut decision = Decision::StopAndCopy;
        if matches!(method, Method::Precopy | Method::Hybrid) {
            match self.precopy(track, &mut tracker) {
                Ok(d) => decision = d,
                Err(e) => {
                    let reason = e.to_string();
                    self.abort(&reason);
                    return Err(before_pause(e));
                }
            }
            self.report.switch_reason = match decision {
                Decision::StopAndCopy => "the rest fits the downtime target".into(),
                _ => {
                    let last = self.report.rounds.last();
                    if self.report.rounds.len() as u32 >= self.opts.converge.max_rounds {
                        "max rounds reached: post-copy".into()
                    } else if last.is_some_and(|r| r.dirty_rate >= 0.8 * r.bandwidth) {
                        "dirty rate near the bandwidth: post-copy".into()
                    } else {
                        "the dirty set stopped shrinking: post-copy".into()
                    }
                }
            };
            // Everything in flight lands before the pause.
            if let Err(e) = self.drain(1, FailedIn::Precopy, true) {
                self.abort(&e.to_string());
                return Err(before_pause(e));
            }
        } else {
            self.report.switch_reason = "method".into();
            // The tracker runs from before the scan to the pause, so the
            // scan (slow on a fragmented memfd) is not downtime.
            match track().map_err(MigrateError::from).and_then(|t| {
                tracker = Some(t);
                self.scan_touched()
            }) {
                Ok(()) => {}
                Err(e) => {
                    self.abort(&e.to_string());
                    return Err(before_pause(e));
                }
            }
        }
        // The switchover: the guest stops here.
        self.progress.set_stage(Stage::Switchover);
        let t_pause = Instant::now();
        let device_state = match guest.pause() {
            Ok(s) => s,
            Err(source) => {
                self.abort("the source could not pause its guest");
                return Err(MigrateError::Hook {
                    op: "pause",
                    source,
                });
            }
        };
        let t_paused = Instant::now();
        self.paused_unix_ns = Some(crate::link::unix_ns());
        self.report.pause_ms = ms(t_paused - t_pause);
        self.phase.store(PHASE_SWITCHOVER, Ordering::Relaxed);
        let result = self.after_pause(tracker.take(), decision, device_state, t_paused, guest);
        self.progress.set_stage(Stage::Done);
        match result {
            Ok(()) => {
                self.finish_report();
                let _ = self.link.control.send(
                    Header::new(Kind::Report),
                    &serde_json::to_vec(&self.report).unwrap_or_default(),
                );
                self.stop_threads();
                self.report.dest = self.dest_report.take().map(Box::new);
                Ok(self.report)
            }
            Err(e) => {
                self.stop_threads();
                Err(e)
            }
        }
    }

    /// Marks current every page that holds no data now (the destination's
    /// fresh memory reads zeros there), the rest not current.
    fn scan_touched(&mut self) -> Result<(), MigrateError> {
        let mut touched = 0;
        for (r, region) in self.regions.iter().enumerate() {
            let ps = region.page_size() as u64;
            let c = &self.current[r];
            c.set_range(0, c.len());
            for (a, b) in region.data_ranges()?.iter() {
                touched += b - a;
                for p in a / ps..b.div_ceil(ps) {
                    c.clear(p as usize);
                }
            }
        }
        self.report.touched_bytes = touched;
        Ok(())
    }

    /// Pre-copy rounds until the policy says switch over (or gives up).
    fn precopy(
        &mut self,
        track: TrackerFactory,
        tracker: &mut Option<Box<dyn Tracker>>,
    ) -> Result<Decision, MigrateError> {
        let mut conv = Convergence::new(self.opts.converge);
        // The tracker first: a page first written after the scan is then
        // reported, never missed.
        let t = track()?;
        let mut last_collect = Instant::now();
        *tracker = Some(t);
        self.scan_touched()?;
        let mut round = 1u32;
        loop {
            let sets = self.not_current();
            let total = self.bytes_of(&sets);
            self.progress.stage(Stage::Precopy, round, total);
            let wire0 = get(&self.bytes.precopy);
            let t0 = Instant::now();
            let Some(covered) = self.send_sets(&sets) else {
                return Err(lost(
                    self.peer(),
                    FailedIn::Precopy,
                    true,
                    self.link.cause(),
                ));
            };
            self.senders().flush();
            if self.link.is_down() {
                return Err(lost(
                    self.peer(),
                    FailedIn::Precopy,
                    true,
                    self.link.cause(),
                ));
            }
            let send = t0.elapsed();
            let wire = get(&self.bytes.precopy) - wire0;
            let (dirty, _) = tracker.as_mut().expect("tracker set above").collect()?;
            let interval = last_collect.elapsed();
            last_collect = Instant::now();
            for (r, d) in dirty.iter().enumerate() {
                let ps = self.regions[r].page_size() as u64;
                for (a, b) in d.ranges.iter() {
                    for p in a / ps..b.div_ceil(ps) {
                        self.current[r].clear(p as usize);
                    }
                }
            }
            let remaining = self.bytes_of(&self.not_current());
            let fixed =
                Duration::from_millis(5) + Duration::from_secs_f64(self.rtt.median_ms() / 1e3);
            let d = conv.after_round(wire, covered, send, remaining, interval, fixed);
            if let Some(bw) = conv.bandwidth() {
                self.shared
                    .policy
                    .observe_link(bw as u64, Duration::from_secs(1));
            }
            self.report.rounds = conv.rounds().to_vec();
            match d {
                Decision::Continue => round += 1,
                Decision::NotConverging => {
                    let last = conv.rounds().last().copied();
                    return Err(MigrateError::NotConverging {
                        rounds: round,
                        remaining_bytes: remaining,
                        dirty_rate: last.map_or(0.0, |r| r.dirty_rate),
                        bandwidth: last.map_or(0.0, |r| r.bandwidth),
                    });
                }
                d => return Ok(d),
            }
        }
    }

    /// After the pause: the last dirty pages, then the rest while paused
    /// (stop-and-copy) or post-copy.
    fn after_pause(
        &mut self,
        tracker: Option<Box<dyn Tracker>>,
        decision: Decision,
        device_state: Vec<u8>,
        t_paused: Instant,
        guest: &mut dyn Guest,
    ) -> Result<(), MigrateError> {
        if tracker.is_none() {
            // No rounds: what holds data now is what the destination lacks.
            if let Err(e) = self.scan_touched() {
                return self.give_back(guest, e);
            }
        }
        let t0 = Instant::now();
        if let Some(mut t) = tracker {
            let collected = t.collect();
            // Dropping it un-protects every page: after the switchover,
            // not while the guest is paused.
            self.retired = Some(t);
            match collected {
                Ok((dirty, _)) => {
                    for (r, d) in dirty.iter().enumerate() {
                        let ps = self.regions[r].page_size() as u64;
                        for (a, b) in d.ranges.iter() {
                            for p in a / ps..b.div_ceil(ps) {
                                self.current[r].clear(p as usize);
                            }
                        }
                    }
                }
                Err(e) => return self.give_back(guest, e.into()),
            }
        }
        self.report.downtime_parts.collect_ms = ms(t0.elapsed());
        let method = self.opts.converge.method;
        let postcopy = method == Method::Postcopy
            || (method == Method::Hybrid && decision == Decision::Postcopy);
        let t1 = Instant::now();
        if !postcopy {
            // Everything before the guest resumes.
            let stale = self.not_current();
            let total = self.bytes_of(&stale);
            self.progress.stage(Stage::Switchover, 0, total);
            if self.send_sets(&stale).is_none() {
                let e = lost(self.peer(), FailedIn::Switchover, true, self.link.cause());
                return self.give_back(guest, e);
            }
            if let Err(e) = self.drain(2, FailedIn::Switchover, true) {
                return self.give_back(guest, e);
            }
            self.report.downtime_parts.copy_ms = ms(t1.elapsed());
            if !self.switchover(&device_state, t_paused, true)? {
                // It may or may not have arrived: recovery finds out.
                let seen = lost(self.peer(), FailedIn::Switchover, false, self.link.cause());
                if self.recover_switchover(seen, guest)? {
                    return Ok(());
                }
            }
            return self.wait_resident(None, true, guest);
        }
        // Post-copy: in missing mode the destination drops its stale copies
        // before resuming; in minor mode it resumes at once and asks. Word
        // operations on bitmaps: this runs while the guest is paused.
        let post = Arc::new(Post::new(
            self.current.iter().map(PageBitmap::inverted).collect(),
        ));
        self.report.postcopy_pages = post.stale_count();
        if self.mode == DestMode::Missing {
            // Only pages that were ever sent have a copy there to drop.
            let discard: Vec<RangeSet> = post
                .stale
                .iter()
                .zip(&self.ever_sent)
                .map(|(s, e)| {
                    let mut d = RangeSet::new();
                    for (a, b) in s.and(e).runs() {
                        d.insert(a as u64, b as u64);
                    }
                    d
                })
                .collect();
            // While the guest is paused: no pacing.
            match control::send_list(
                &self.link.control,
                Kind::Stale,
                list::DISCARD,
                &discard,
                None,
            ) {
                Ok(b) => self.shared.count(b),
                Err(e) => return self.give_back(guest, e),
            }
            self.report.downtime_parts.copy_ms = ms(t1.elapsed());
        }
        self.phase.store(PHASE_POSTCOPY, Ordering::Relaxed);
        let sent = self.switchover(&device_state, t_paused, false)?;
        self.wait_resident(Some(post), sent, guest)
    }

    /// Sends the device state; from here the guest may run there. False
    /// if sending failed (it may have arrived or not).
    fn switchover(
        &mut self,
        device_state: &[u8],
        t_paused: Instant,
        complete: bool,
    ) -> Result<bool, MigrateError> {
        let payload = Switchover {
            device_state: device_state.to_vec(),
        }
        .encode();
        let mut h = Header::new(Kind::Switchover);
        if complete {
            h.flags = crate::proto::frame::switchover::COMPLETE;
        }
        self.t_paused = Some(t_paused);
        if let Err(e) = self.link.control.send(h, &payload) {
            self.link.fail(e);
            return Ok(false);
        }
        self.shared
            .count((crate::proto::frame::HEADER_LEN + payload.len()) as u64);
        Ok(true)
    }

    /// Resumes the guest here after a failure before the destination could
    /// have run it; returns the error.
    pub(super) fn give_back(
        &mut self,
        guest: &mut dyn Guest,
        e: MigrateError,
    ) -> Result<(), MigrateError> {
        self.abort(&e.to_string());
        guest.resume().map_err(|source| MigrateError::Hook {
            op: "resume",
            source,
        })?;
        Err(match e {
            MigrateError::LinkLost {
                peer,
                phase,
                source,
                ..
            } => MigrateError::LinkLost {
                peer,
                phase,
                guest_runs_here: true,
                source,
            },
            e => e,
        })
    }

    fn finish_report(&mut self) {
        let b = &self.bytes;
        let bytes = PhaseBytes {
            precopy: get(&b.precopy),
            switchover: get(&b.switchover),
            postcopy: get(&b.postcopy),
            total: get(&b.precopy) + get(&b.switchover) + get(&b.postcopy),
        };
        let r = &mut self.report;
        r.total_ms = ms(self.t_start.elapsed());
        r.bytes = bytes;
        r.bytes_per_ram = bytes.total as f64 / r.ram_bytes.max(1) as f64;
        r.data_pages = get(&b.data_pages);
        r.zero_pages = get(&b.zero_pages);
        r.compression_ratio = get(&b.compressed) as f64 / get(&b.raw).max(1) as f64;
        r.rtt_ms = self.rtt.median_ms();
        r.rtt_p99_ms = self.rtt.quantile_ms(0.99);
        r.bandwidth = self.shared.policy.link().unwrap_or(0.0);
        let ps_bytes: u64 = self.regions.first().map_or(4096, |x| x.page_size() as u64);
        r.postcopy_bytes_per_page_bytes =
            bytes.postcopy as f64 / (r.postcopy_pages * ps_bytes).max(1) as f64;
    }
}

/// An error before the pause: the guest never left.
fn before_pause(e: MigrateError) -> MigrateError {
    if e.guest_runs_at_source() {
        e
    } else {
        MigrateError::Abandoned {
            phase: FailedIn::Precopy,
            source: Box::new(e),
        }
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
