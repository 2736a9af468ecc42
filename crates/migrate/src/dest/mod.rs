//! The destination of a migration: [`Listening::bind`] and
//! [`Listening::accept`] wait for a source (peers that cannot authenticate,
//! or belong to no migration, are refused and the wait goes on);
//! [`Incoming::receive`] takes the pages into fresh regions of the same
//! shape; [`Receiving::switchover`] returns the device state when the guest
//! may run here; [`Receiving::finish`] returns once every page is resident.

mod fetch;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use livepage_mem::{RangeSet, Region};
use livepage_restore::{Mode, OnSourceLoss, Prefetch, RestoreOptions};

use session::{Event, Session};

use crate::error::{FailedIn, MigrateError};
use crate::link::Liveness;
use crate::net::{Conn, Listener, Security};
use crate::progress::{ProgressView, Stage};
use crate::proto::frame::{Header, Kind};
use crate::proto::msg::{Caps, DestMode, Hello, Phase, RegionShape, Role, Status, Welcome};
use crate::stats::{DestReport, PhaseBytes, get};

/// A callback for peers refused while waiting (e.g. log a line).
pub type OnRefused = Arc<dyn Fn(&MigrateError) + Send + Sync>;

/// How to receive.
#[derive(Clone)]
#[non_exhaustive]
pub struct DestOptions {
    /// How post-copy pages are placed.
    pub mode: DestMode,
    /// Fault handler threads.
    pub handlers: usize,
    /// TLS or plain TCP.
    pub security: Security,
    /// How long post-copy waits for a lost link before failing closed.
    pub recovery_timeout: Duration,
    /// Heartbeats and dead-link detection.
    pub liveness: Liveness,
    /// Called for each peer refused.
    pub on_refused: Option<OnRefused>,
    /// A live view for progress bars.
    pub progress: Option<Arc<ProgressView>>,
}

impl std::fmt::Debug for DestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestOptions")
            .field("mode", &self.mode)
            .field("handlers", &self.handlers)
            .field("security", &self.security)
            .field("recovery_timeout", &self.recovery_timeout)
            .finish_non_exhaustive()
    }
}

impl DestOptions {
    /// Defaults (missing mode, 2 handlers, 60 s recovery) over `security`.
    pub fn new(security: Security) -> DestOptions {
        DestOptions {
            mode: DestMode::Missing,
            handlers: 2,
            security,
            recovery_timeout: Duration::from_secs(60),
            liveness: Liveness::default(),
            on_refused: None,
            progress: None,
        }
    }
    /// Sets the mode.
    pub fn mode(mut self, m: DestMode) -> Self {
        self.mode = m;
        self
    }
    /// Sets the handler threads.
    pub fn handlers(mut self, n: usize) -> Self {
        self.handlers = n;
        self
    }
    /// Sets the recovery timeout.
    pub fn recovery_timeout(mut self, t: Duration) -> Self {
        self.recovery_timeout = t;
        self
    }
    /// Sets the liveness settings.
    pub fn liveness(mut self, l: Liveness) -> Self {
        self.liveness = l;
        self
    }
    /// Sets the refusal callback.
    pub fn on_refused(mut self, f: OnRefused) -> Self {
        self.on_refused = Some(f);
        self
    }
    /// Sets the progress view.
    pub fn progress(mut self, p: Arc<ProgressView>) -> Self {
        self.progress = Some(p);
        self
    }
}

/// A listening destination.
#[derive(Debug)]
pub struct Listening {
    listener: Arc<Listener>,
    opts: DestOptions,
}

impl Listening {
    /// Listens on `addr`.
    pub fn bind(addr: SocketAddr, opts: DestOptions) -> Result<Listening, MigrateError> {
        if opts.handlers == 0 {
            return Err(MigrateError::Option("handlers must be at least 1"));
        }
        let listener = Listener::bind(addr, opts.security.clone(), opts.liveness.dead_after)?;
        Ok(Listening {
            listener: Arc::new(listener),
            opts,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr()
    }

    fn refused(&self, e: MigrateError) {
        if let Some(f) = &self.opts.on_refused {
            f(&e);
        }
    }

    /// Waits for a source's first connection (until `stop` is set, if
    /// given: then `Ok(None)`). Peers that fail TLS or do not open a
    /// migration are refused (and reported) and the wait goes on.
    pub fn accept(&self, stop: Option<&AtomicBool>) -> Result<Option<Incoming>, MigrateError> {
        loop {
            if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                return Ok(None);
            }
            let conn = match self.listener.accept(Some(Duration::from_millis(100))) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    self.refused(e.into());
                    continue;
                }
            };
            let peer = conn.peer();
            let mut payload = Vec::new();
            let h = match conn.recv(&mut payload) {
                Ok(h) => h,
                Err(e) => {
                    self.refused(e.into());
                    continue;
                }
            };
            let hello = match (h.kind, Hello::decode(&payload)) {
                (Kind::Hello, Ok(hello))
                    if hello.role == Role::Control && hello.generation == 0 =>
                {
                    hello
                }
                (Kind::Hello, Err(source)) => {
                    self.refused(MigrateError::Message { peer, source });
                    continue;
                }
                (kind, _) => {
                    let w = Welcome {
                        status: Status::Refused,
                        caps: Caps::empty(),
                        mode: self.opts.mode,
                        phase: Phase::Precopy,
                        reason: "no migration in progress here: open one with a control connection"
                            .into(),
                    };
                    let _ = conn.send(Header::new(Kind::Welcome), &w.encode());
                    self.refused(MigrateError::Unexpected {
                        peer,
                        kind,
                        why: "did not open a migration",
                    });
                    continue;
                }
            };
            return Ok(Some(Incoming {
                listener: self.listener.clone(),
                opts: self.opts.clone(),
                control: conn,
                hello,
            }));
        }
    }
}

/// A source that opened a migration, not answered yet.
pub struct Incoming {
    listener: Arc<Listener>,
    opts: DestOptions,
    control: Conn,
    hello: Hello,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("peer", &self.control.peer())
            .field("regions", &self.hello.regions)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The regions the source migrates.
    pub fn regions(&self) -> &[RegionShape] {
        &self.hello.regions
    }

    /// The source's address.
    pub fn peer(&self) -> SocketAddr {
        self.control.peer()
    }

    /// The migration's public id.
    pub fn migration_id(&self) -> String {
        self.hello.migration.hex()
    }

    /// Refuses the migration with `reason`.
    pub fn refuse(self, reason: &str) {
        let w = Welcome {
            status: Status::Refused,
            caps: Caps::empty(),
            mode: self.opts.mode,
            phase: Phase::Precopy,
            reason: reason.into(),
        };
        let _ = self.control.send(Header::new(Kind::Welcome), &w.encode());
    }

    /// Takes the migration into `regions`: fresh memory (never written)
    /// of the shapes [`Incoming::regions`] gives, shmem or hugetlbfs in
    /// minor mode. Pre-copy starts.
    pub fn receive(self, regions: Vec<Arc<Region>>) -> Result<Receiving, MigrateError> {
        let want = self.hello.regions.clone();
        for i in 0..want.len().max(regions.len()) {
            let have = regions.get(i).map(|r| RegionShape {
                page_size: r.page_size() as u64,
                pages: r.pages() as u64,
            });
            if have.as_ref() != want.get(i) {
                let reason = format!(
                    "region {i} is {have:?} here, {:?} at the source",
                    want.get(i)
                );
                self.refuse(&reason);
                return Err(MigrateError::Shape {
                    region: i,
                    have,
                    want: want.get(i).copied(),
                });
            }
        }
        for r in &regions {
            if self.opts.mode == DestMode::Minor && r.alias_addr().is_none() {
                self.refuse("the destination's memory has no page cache for minor mode");
                return Err(MigrateError::Option(
                    "minor mode needs shmem or hugetlbfs memory (it places pages in the page cache)",
                ));
            }
            if !r.data_ranges()?.is_empty() {
                self.refuse("the destination's memory is not fresh");
                return Err(MigrateError::Option(
                    "the destination's regions must be fresh (never written): pages the source never touched are not sent",
                ));
            }
        }
        let caps = self.hello.caps & (Caps::LZ4 | Caps::ZSTD);
        let (tx, events) = channel();
        let session = Arc::new(Session::new(
            &self.hello,
            caps,
            self.opts.mode,
            regions,
            self.opts.liveness,
            tx,
            self.opts.on_refused.clone(),
        ));
        let w = session.welcome(Status::Ok, "");
        self.control.send(Header::new(Kind::Welcome), &w.encode())?;
        session.start(self.listener.clone(), self.control)?;
        let progress = self.opts.progress.clone().unwrap_or_default();
        let ram: u64 = want.iter().map(RegionShape::bytes).sum();
        progress.stage(Stage::Precopy, 0, ram);
        Ok(Receiving {
            session,
            events,
            opts: self.opts,
            t0: Instant::now(),
            t_switch: None,
            complete: false,
            stale_applied: false,
            report: DestReport::default(),
            progress,
            loss: None,
        })
    }
}

/// A migration being received.
pub struct Receiving {
    session: Arc<Session>,
    events: Receiver<Event>,
    opts: DestOptions,
    t0: Instant,
    t_switch: Option<Instant>,
    complete: bool,
    stale_applied: bool,
    report: DestReport,
    progress: Arc<ProgressView>,
    loss: Option<Instant>,
}

impl std::fmt::Debug for Receiving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiving")
            .field("mode", &self.opts.mode)
            .finish_non_exhaustive()
    }
}

impl Receiving {
    fn peer(&self) -> SocketAddr {
        self.session
            .link
            .read()
            .ok()
            .and_then(|l| l.as_ref().map(|l| l.control.peer()))
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Blocks until the source paused the guest and sent its device state;
    /// then the memory is ready to run (post-copy serving, if any, has
    /// started). Returns the device state.
    pub fn switchover(&mut self) -> Result<Vec<u8>, MigrateError> {
        let (device, complete) = loop {
            self.progress.set_done(get(&self.session.bytes.precopy));
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Switchover(d, c)) => break (d, c),
                Ok(Event::Down(_, why)) => {
                    return Err(MigrateError::LinkLost {
                        peer: self.peer(),
                        phase: FailedIn::Precopy,
                        guest_runs_here: false,
                        source: Box::new(MigrateError::Aborted {
                            peer: self.peer(),
                            reason: why,
                        }),
                    });
                }
                Ok(Event::Abort(reason)) => {
                    return Err(MigrateError::Aborted {
                        peer: self.peer(),
                        reason,
                    });
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::Option("the migration's threads ended"));
                }
            }
        };
        let t = Instant::now();
        self.t_switch = Some(t);
        self.report.until_switchover_ms = ms(t - self.t0);
        self.complete = complete;
        self.progress.set_stage(Stage::Switchover);
        if complete {
            self.session.set_phase(Phase::Complete);
            return Ok(device);
        }
        // Missing mode: stale copies go before anything can touch them.
        if self.opts.mode == DestMode::Missing {
            let discard = self
                .session
                .discard
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default();
            for (r, set) in discard.iter().enumerate() {
                let region = &self.session.regions[r];
                let ps = region.page_size();
                for (a, b) in set.iter() {
                    region.discard(a as usize * ps, (b - a) as usize * ps)?;
                }
            }
        }
        let mode = match self.opts.mode {
            DestMode::Missing => Mode::Missing,
            DestMode::Minor => Mode::Minor,
        };
        let restore = livepage_restore::start(
            self.session.regions.clone(),
            self.session.fetcher.clone(),
            RestoreOptions::default()
                .mode(mode)
                .handlers(self.opts.handlers)
                .prefetch(Prefetch::None)
                .on_source_loss(OnSourceLoss::WaitFor(self.opts.recovery_timeout)),
        )?;
        if let Ok(mut r) = self.session.restore.lock() {
            *r = Some(restore);
        }
        self.session.set_ready();
        self.drain_events()?;
        let total: u64 = self.session.shapes.iter().map(RegionShape::bytes).sum();
        self.progress.stage(Stage::Postcopy, 0, total);
        Ok(device)
    }

    /// Tells the source the guest runs here now (call right after the
    /// vCPUs resumed): it ends the downtime's clock.
    pub fn resumed(&mut self) {
        if let Some(t) = self.t_switch {
            self.report.switchover_ms = ms(t.elapsed());
        }
        if let Some(l) = self.session.link.read().ok().and_then(|l| l.clone()) {
            let mut h = Header::new(Kind::Resumed);
            h.first = crate::link::unix_ns();
            if let Err(e) = l.control.send(h, &[]) {
                l.fail(e);
            }
        }
    }

    /// Pages resident and the total, once post-copy runs.
    pub fn resident(&self) -> Option<(u64, u64)> {
        self.session
            .restore
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.progress()))
    }

    /// Applies the stale set if it is complete: pages not in it are current.
    fn apply_stale(&mut self) {
        if self.stale_applied {
            return;
        }
        let Ok(r) = self.session.restore.lock() else {
            return;
        };
        let Some(restore) = r.as_ref() else {
            return;
        };
        let stale = self
            .session
            .stale
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let mut postcopy = 0;
        for (i, shape) in self.session.shapes.iter().enumerate() {
            let set = stale.get(i).cloned().unwrap_or_else(RangeSet::new);
            postcopy += set.total();
            let mut at = 0;
            for (a, b) in set.iter() {
                if a > at {
                    restore.mark_resident(i, at, a - at);
                }
                at = b;
            }
            if shape.pages > at {
                restore.mark_resident(i, at, shape.pages - at);
            }
        }
        self.report.postcopy_pages = postcopy;
        self.session.fetcher.stale_known();
        self.stale_applied = true;
    }

    /// Handles what the threads said; errors end the migration.
    fn drain_events(&mut self) -> Result<(), MigrateError> {
        loop {
            match self.events.try_recv() {
                Ok(ev) => self.on_event(ev)?,
                Err(_) => return Ok(()),
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> Result<(), MigrateError> {
        match ev {
            Event::StaleDone => self.apply_stale(),
            Event::Down(g, _) if g == self.session.generation.load(Ordering::SeqCst) => {
                self.session.fetcher.set_link(None);
                self.loss.get_or_insert_with(Instant::now);
                self.progress.set_stage(Stage::Recovering);
            }
            Event::Up(g) if g > 0 => {
                if self.loss.take().is_some() {
                    self.report.recoveries += 1;
                }
                self.progress.set_stage(Stage::Postcopy);
            }
            Event::Abort(reason) => {
                return Err(MigrateError::Aborted {
                    peer: self.peer(),
                    reason,
                });
            }
            Event::Report(r) => self.report.source = *r,
            _ => {}
        }
        Ok(())
    }

    /// Waits until every page is resident (recovering lost links: faults
    /// on missing pages wait meanwhile), tells the source, and returns the
    /// report. Past the recovery timeout, pages still missing are failed
    /// closed (touching one raises SIGBUS) and the error says so.
    pub fn finish(self) -> Result<DestReport, MigrateError> {
        self.finish_then(|| {})
    }

    /// [`Receiving::finish`], calling `on_resident` the moment every page
    /// is resident (before the statistics are gathered and exchanged).
    pub fn finish_then(mut self, on_resident: impl FnOnce()) -> Result<DestReport, MigrateError> {
        if !self.complete {
            if self.t_switch.is_none() {
                return Err(MigrateError::Option("finish() before switchover()"));
            }
            loop {
                let (done, total) = self.resident().unwrap_or((0, 0));
                self.progress.set_done(done * self.page_bytes());
                if done >= total {
                    break;
                }
                if let Some(l) = self.loss {
                    if l.elapsed() > self.opts.recovery_timeout {
                        return Err(self.fail_closed(l.elapsed()));
                    }
                }
                match self.events.recv_timeout(Duration::from_millis(20)) {
                    Ok(ev) => {
                        if let Err(e) = self.on_event(ev) {
                            self.session.failed.store(true, Ordering::SeqCst);
                            if let Ok(mut r) = self.session.restore.lock() {
                                if let Some(r) = r.take() {
                                    let _ = r.stop();
                                }
                            }
                            return Err(e);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(MigrateError::Option("the migration's threads ended"));
                    }
                }
            }
        }
        on_resident();
        self.session.set_phase(Phase::Complete);
        self.progress.set_stage(Stage::Done);
        if let Some(t) = self.t_switch {
            self.report.postcopy_ms = ms(t.elapsed());
        }
        let restore = self.session.restore.lock().ok().and_then(|mut r| r.take());
        if let Some(r) = restore {
            let st = r.wait()?;
            self.report.remote_faults = st.faults_served;
            self.report.fault_p50_us = st.fault_p50_us;
            self.report.fault_p99_us = st.fault_p99_us;
            self.report.fault_max_us = st.fault_max_us;
            self.report.blocked_ms = st.fault_total_ms;
            self.report.fault_histogram =
                st.histogram.iter().map(|b| (b.below_us, b.count)).collect();
        }
        self.fill_report();
        // Every page is here: the source may let go.
        let link = self.session.link.read().ok().and_then(|l| l.clone());
        if let Some(l) = link {
            let _ = l.control.send(
                Header::new(Kind::Resident),
                &serde_json::to_vec(&self.report).unwrap_or_default(),
            );
            let until = Instant::now() + Duration::from_secs(3);
            while self.report.source.is_none() && Instant::now() < until {
                match self.events.recv_timeout(Duration::from_millis(20)) {
                    Ok(Event::Report(r)) => self.report.source = *r,
                    Ok(Event::Down(..)) => break,
                    _ => {}
                }
            }
        }
        self.session.shutdown();
        Ok(std::mem::take(&mut self.report))
    }

    fn page_bytes(&self) -> u64 {
        self.session.shapes.first().map_or(4096, |s| s.page_size)
    }

    fn fail_closed(&mut self, after: Duration) -> MigrateError {
        self.session.failed.store(true, Ordering::SeqCst);
        if let Ok(mut r) = self.session.restore.lock() {
            if let Some(r) = r.take() {
                let _ = r.stop();
            }
        }
        self.session.shutdown();
        MigrateError::RecoveryTimedOut {
            after,
            guest_resumed_here: false,
            at_destination: true,
        }
    }

    fn fill_report(&mut self) {
        let s = &self.session;
        let b = &s.bytes;
        self.report.mode = format!("{:?}", self.opts.mode).to_lowercase();
        self.report.tls = self.opts.security.is_tls();
        self.report.bytes = PhaseBytes {
            precopy: get(&b.precopy),
            switchover: get(&b.switchover),
            postcopy: get(&b.postcopy),
            total: get(&b.precopy) + get(&b.switchover) + get(&b.postcopy),
        };
        self.report.precopy_pages = s.precopy_pages.load(Ordering::Relaxed);
        self.report.pushed_pages = s.pushed_pages.load(Ordering::Relaxed);
        self.report.kept_current = s.fetcher.kept_current.load(Ordering::Relaxed);
        self.report.asked_again = s.fetcher.asked_again.load(Ordering::Relaxed);
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.session.shutdown();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
