//! The destination's shared state and its threads: the acceptor (every
//! connection after the first, reconnects included: checked against the
//! migration's id and secret), the control reader, the bulk receivers
//! (pre-copy pages written straight into memory; pushed pages placed
//! through the restore core) and the demand receiver (answers to faults).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use livepage_mem::{PageBitmap, RangeSet, Region};
use livepage_restore::{Pusher, Restore};

use super::fetch::{Answer, Fetcher};
use crate::codec::{Codec, decompress};
use crate::error::{MigrateError, spawn_err};
use crate::link::{Link, Liveness, Rtt};
use crate::net::{Conn, Listener};
use crate::proto::frame::{HEADER_LEN, Header, Kind, PUSHED, list, pages, switchover};
use crate::proto::msg::{
    Caps, DestMode, Hello, MigrationId, Phase, RegionShape, Role, Status, Welcome, decode_ranges,
    encode_ranges,
};
use crate::stats::{Bytes, SourceReport, add};

/// What the threads tell the main thread.
#[derive(Debug)]
pub(crate) enum Event {
    /// The vCPUs are paused at the source: the device state, and whether
    /// every page is here already.
    Switchover(Vec<u8>, bool),
    /// The stale set is complete.
    StaleDone,
    /// The source pushed every stale page.
    PushDone,
    /// The source's report.
    Report(Box<Option<SourceReport>>),
    /// The source gave up.
    Abort(String),
    /// A generation's link died.
    Down(u32, String),
    /// A new generation's link works.
    Up(u32),
}

/// Connections of a generation being assembled by the acceptor.
#[derive(Default)]
struct Pending {
    generation: u32,
    control: Option<Conn>,
    demand: Option<Conn>,
    bulk: Vec<Option<Conn>>,
}

/// The destination's state, shared by its threads.
pub(crate) struct Session {
    pub(crate) id: MigrationId,
    pub(crate) shapes: Vec<RegionShape>,
    pub(crate) bulk: u8,
    pub(crate) caps: Caps,
    pub(crate) mode: DestMode,
    pub(crate) regions: Vec<Arc<Region>>,
    pub(crate) live: Liveness,
    /// Pages holding pre-copied data here.
    has_data: Vec<PageBitmap>,
    pub(crate) phase: Mutex<Phase>,
    /// Set once post-copy serving runs (pushed frames wait for it).
    ready: Mutex<bool>,
    ready_cv: Condvar,
    pub(crate) failed: AtomicBool,
    pub(crate) fetcher: Arc<Fetcher>,
    pub(crate) restore: Mutex<Option<Restore>>,
    pub(crate) link: RwLock<Option<Arc<Link>>>,
    pub(crate) generation: AtomicU32,
    pending: Mutex<Pending>,
    /// DISCARD lists (missing mode) and the stale set, per region.
    pub(crate) discard: Mutex<Vec<RangeSet>>,
    pub(crate) stale: Mutex<Vec<RangeSet>>,
    /// Bulk end markers seen, per id, in this generation.
    ends: Mutex<Vec<(u64, u8)>>,
    pub(crate) bytes: Bytes,
    pub(crate) precopy_pages: AtomicU64,
    pub(crate) pushed_pages: AtomicU64,
    /// Pushed bytes applied on the current generation, and the last ack.
    acks: crate::window::Acks,
    pub(crate) events: Mutex<Sender<Event>>,
    pub(crate) rtt: Arc<Rtt>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) stop: AtomicBool,
    pub(crate) on_refused: Option<super::OnRefused>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        hello: &Hello,
        caps: Caps,
        mode: DestMode,
        regions: Vec<Arc<Region>>,
        live: Liveness,
        events: Sender<Event>,
        on_refused: Option<super::OnRefused>,
    ) -> Session {
        let fetcher = Arc::new(Fetcher::new(regions.clone(), mode == DestMode::Minor));
        Session {
            id: hello.migration,
            shapes: hello.regions.clone(),
            bulk: hello.bulk,
            caps,
            mode,
            has_data: regions.iter().map(|r| PageBitmap::new(r.pages())).collect(),
            regions,
            live,
            phase: Mutex::new(Phase::Precopy),
            ready: Mutex::new(false),
            ready_cv: Condvar::new(),
            failed: AtomicBool::new(false),
            fetcher,
            restore: Mutex::new(None),
            link: RwLock::new(None),
            generation: AtomicU32::new(0),
            pending: Mutex::new(Pending::default()),
            discard: Mutex::new(hello.regions.iter().map(|_| RangeSet::new()).collect()),
            stale: Mutex::new(hello.regions.iter().map(|_| RangeSet::new()).collect()),
            ends: Mutex::new(Vec::new()),
            bytes: Bytes::default(),
            precopy_pages: AtomicU64::new(0),
            pushed_pages: AtomicU64::new(0),
            acks: crate::window::Acks::default(),
            events: Mutex::new(events),
            rtt: Arc::new(Rtt::default()),
            threads: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            on_refused,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase.lock().map(|p| *p).unwrap_or(Phase::Precopy)
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        if let Ok(mut g) = self.phase.lock() {
            *g = p;
        }
    }

    pub(crate) fn tell(&self, e: Event) {
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send(e);
        }
    }

    pub(crate) fn welcome(&self, status: Status, reason: &str) -> Welcome {
        Welcome {
            status,
            caps: self.caps,
            mode: self.mode,
            phase: self.phase(),
            reason: reason.into(),
        }
    }

    /// Post-copy serving runs: pushed frames may be placed.
    pub(crate) fn set_ready(&self) {
        if let Ok(mut r) = self.ready.lock() {
            *r = true;
        }
        self.ready_cv.notify_all();
    }

    fn wait_ready(&self, link: &Link) -> bool {
        let Ok(mut r) = self.ready.lock() else {
            return false;
        };
        while !*r {
            if link.is_down() || self.failed.load(Ordering::SeqCst) {
                return false;
            }
            r = match self.ready_cv.wait_timeout(r, Duration::from_millis(20)) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
        true
    }

    fn count(&self, n: u64) {
        let c = match self.phase() {
            Phase::Precopy => &self.bytes.precopy,
            _ => &self.bytes.postcopy,
        };
        add(c, n);
    }

    /// Stops every thread (the acceptor and the current link's).
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.ready_cv.notify_all();
        if let Ok(l) = self.link.read() {
            if let Some(l) = l.as_ref() {
                l.fail("the migration is over");
            }
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }

    fn spawn(
        self: &Arc<Self>,
        name: &str,
        f: impl FnOnce(Arc<Session>) + Send + 'static,
    ) -> Result<(), MigrateError> {
        let s = self.clone();
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(s))
            .map_err(spawn_err(name))?;
        if let Ok(mut t) = self.threads.lock() {
            t.push(h);
        }
        Ok(())
    }

    /// Starts the acceptor, with the first generation's control connection
    /// already taken.
    pub(crate) fn start(
        self: &Arc<Self>,
        listener: Arc<Listener>,
        control: Conn,
    ) -> Result<(), MigrateError> {
        if let Ok(mut p) = self.pending.lock() {
            *p = Pending {
                generation: 0,
                control: Some(control),
                demand: None,
                bulk: (0..self.bulk).map(|_| None).collect(),
            };
        }
        self.spawn("lp-accept", move |s| s.accept_loop(&listener))
    }

    fn refused(&self, e: MigrateError) {
        if let Some(f) = &self.on_refused {
            f(&e);
        }
    }

    fn accept_loop(self: &Arc<Self>, listener: &Listener) {
        while !self.stop.load(Ordering::SeqCst) {
            let conn = match listener.accept(Some(Duration::from_millis(100))) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    self.refused(e.into());
                    continue;
                }
            };
            if let Err(e) = self.admit(conn) {
                self.refused(e);
            }
        }
    }

    /// Checks a new connection's hello and files it in its generation.
    fn admit(self: &Arc<Self>, conn: Conn) -> Result<(), MigrateError> {
        let peer = conn.peer();
        let mut payload = Vec::new();
        let h = conn.recv(&mut payload)?;
        if h.kind != Kind::Hello {
            return Err(MigrateError::Unexpected {
                peer,
                kind: h.kind,
                why: "came where a hello was expected",
            });
        }
        let hello =
            Hello::decode(&payload).map_err(|source| MigrateError::Message { peer, source })?;
        let refuse = |reason: &str| -> Result<(), MigrateError> {
            let w = self.welcome(Status::Refused, reason);
            let _ = conn.send(Header::new(Kind::Welcome), &w.encode());
            Err(MigrateError::Refused {
                peer,
                reason: reason.into(),
            })
        };
        if hello.migration != self.id {
            return refuse("another migration is in progress here");
        }
        if hello.regions != self.shapes || hello.bulk != self.bulk {
            return refuse("the reconnect describes other regions or connections");
        }
        if self.failed.load(Ordering::SeqCst) {
            return refuse("the destination gave up on this migration");
        }
        let current = self.generation.load(Ordering::SeqCst);
        let mut p = self
            .pending
            .lock()
            .map_err(|_| MigrateError::Option("acceptor state poisoned"))?;
        match hello.role {
            Role::Control => {
                if hello.generation <= current {
                    drop(p);
                    return refuse("a stale generation");
                }
                if self.phase() == Phase::Precopy {
                    drop(p);
                    return refuse(
                        "the link was lost before the switchover: the migration was abandoned",
                    );
                }
                let w = self.welcome(Status::Ok, "");
                conn.send(Header::new(Kind::Welcome), &w.encode())?;
                // Tell the source what is here, so it sends exactly the rest.
                self.send_have(&conn)?;
                *p = Pending {
                    generation: hello.generation,
                    control: Some(conn),
                    demand: None,
                    bulk: (0..self.bulk).map(|_| None).collect(),
                };
            }
            Role::Demand | Role::Bulk(_) => {
                if hello.generation != p.generation || p.control.is_none() {
                    drop(p);
                    return refuse("no control connection of this generation");
                }
                let w = self.welcome(Status::Ok, "");
                conn.send(Header::new(Kind::Welcome), &w.encode())?;
                match hello.role {
                    Role::Demand => p.demand = Some(conn),
                    Role::Bulk(i) => p.bulk[i as usize] = Some(conn),
                    Role::Control => {}
                }
            }
        }
        let complete =
            p.control.is_some() && p.demand.is_some() && p.bulk.iter().all(Option::is_some);
        if complete {
            let taken = std::mem::take(&mut *p);
            drop(p);
            self.install(taken)?;
        }
        Ok(())
    }

    fn send_have(&self, conn: &Conn) -> Result<(), MigrateError> {
        let sets: Vec<RangeSet> = match self
            .restore
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(Restore::observer))
        {
            Some(o) => (0..self.shapes.len()).map(|r| o.done_ranges(r)).collect(),
            None => self.shapes.iter().map(|_| RangeSet::new()).collect(),
        };
        let n = sets.len();
        for (r, set) in sets.iter().enumerate() {
            let payloads = encode_ranges(set.iter(), 256 << 10);
            let k = payloads.len();
            for (i, pl) in payloads.into_iter().enumerate() {
                let mut h = Header::new(Kind::Have);
                h.region = r as u16;
                if r + 1 == n && i + 1 == k {
                    h.flags = list::LAST;
                }
                conn.send(h, &pl)?;
            }
        }
        Ok(())
    }

    /// A generation's connections are all here: start its threads.
    fn install(self: &Arc<Self>, p: Pending) -> Result<(), MigrateError> {
        let (Some(control), Some(demand)) = (p.control, p.demand) else {
            return Ok(());
        };
        control.set_timeouts(Some(self.live.dead_after), None);
        demand.set_timeouts(None, None);
        let bulk: Vec<Arc<Conn>> = p
            .bulk
            .into_iter()
            .flatten()
            .map(|c| {
                c.set_timeouts(None, None);
                Arc::new(c)
            })
            .collect();
        let link = Link::new(
            Arc::new(control),
            Arc::new(demand),
            bulk,
            p.generation,
            self.rtt.clone(),
        );
        if let Ok(mut e) = self.ends.lock() {
            e.clear();
        }
        self.acks.reset();
        let old = self
            .link
            .write()
            .ok()
            .and_then(|mut l| l.replace(link.clone()));
        if let Some(old) = old {
            old.fail("replaced by a new generation");
        }
        self.generation.store(p.generation, Ordering::SeqCst);
        let hb = link.spawn_heartbeat(self.live, "lp-heartbeat")?;
        if let Ok(mut t) = self.threads.lock() {
            t.push(hb);
        }
        let l = link.clone();
        self.spawn("lp-control", move |s| {
            let why = match s.read_control(&l) {
                Ok(()) => "closed by the source".to_string(),
                Err(e) => e.to_string(),
            };
            l.fail(&why);
            s.tell(Event::Down(l.generation, l.cause()));
        })?;
        for (i, conn) in link.bulk.iter().enumerate() {
            let (l, c) = (link.clone(), conn.clone());
            self.spawn(&format!("lp-recv-{i}"), move |s| {
                if let Err(e) = s.read_bulk(&l, &c) {
                    l.fail(format!("bulk connection: {e}"));
                }
            })?;
        }
        let l = link.clone();
        self.spawn("lp-answers", move |s| {
            if let Err(e) = s.read_answers(&l) {
                l.fail(format!("demand connection: {e}"));
            }
        })?;
        self.fetcher.set_link(Some(link.clone()));
        if let Ok(r) = self.restore.lock() {
            if let Some(r) = r.as_ref() {
                // Faults parked while the link was down are asked again.
                let _ = r.replace_source(self.fetcher.clone());
            }
        }
        self.tell(Event::Up(p.generation));
        Ok(())
    }

    fn read_control(&self, link: &Link) -> Result<(), MigrateError> {
        let conn = &link.control;
        let peer = conn.peer();
        let mut payload = Vec::new();
        loop {
            let h = conn.recv(&mut payload)?;
            link.touch();
            if h.kind != Kind::Switchover {
                self.count((HEADER_LEN + payload.len()) as u64);
            }
            match h.kind {
                Kind::Heartbeat => link.on_heartbeat(&h),
                Kind::Switchover => {
                    self.set_phase(Phase::Postcopy);
                    add(&self.bytes.switchover, (HEADER_LEN + payload.len()) as u64);
                    self.tell(Event::Switchover(
                        payload.clone(),
                        h.flags & switchover::COMPLETE != 0,
                    ));
                }
                Kind::Stale => {
                    let region = h.region as usize;
                    let shape = self.shapes.get(region).ok_or(MigrateError::Unexpected {
                        peer,
                        kind: h.kind,
                        why: "names a region that does not exist",
                    })?;
                    let ranges = decode_ranges(&payload, shape.pages)
                        .map_err(|source| MigrateError::Message { peer, source })?;
                    let target = if h.flags & list::DISCARD != 0 {
                        &self.discard
                    } else {
                        &self.stale
                    };
                    if let Ok(mut sets) = target.lock() {
                        for (a, b) in ranges {
                            sets[region].insert(a, b);
                        }
                    }
                    if h.flags & list::LAST != 0 && h.flags & list::DISCARD == 0 {
                        self.tell(Event::StaleDone);
                    }
                    if h.flags & list::DISCARD == 0 {
                        // Paced by the source's bulk window.
                        self.applied(link, (HEADER_LEN + payload.len()) as u64)?;
                    }
                }
                Kind::PushDone => self.tell(Event::PushDone),
                Kind::Abort => {
                    self.tell(Event::Abort(String::from_utf8_lossy(&payload).into_owned()))
                }
                Kind::Report => self.tell(Event::Report(Box::new(
                    serde_json::from_slice(&payload).ok(),
                ))),
                kind => {
                    return Err(MigrateError::Unexpected {
                        peer,
                        kind,
                        why: "is not one a source sends on the control connection",
                    });
                }
            }
        }
    }

    /// Checks a pages frame against the regions; its page size.
    fn check_pages(&self, peer: std::net::SocketAddr, h: &Header) -> Result<usize, MigrateError> {
        let shape = self.shapes.get(h.region as usize);
        let ok = shape.is_some_and(|s| {
            h.first
                .checked_add(u64::from(h.count))
                .is_some_and(|e| e <= s.pages)
                && u64::from(h.count) * s.page_size <= 4 << 20
        });
        match (ok, shape) {
            (true, Some(s)) => Ok(s.page_size as usize),
            _ => Err(MigrateError::Unexpected {
                peer,
                kind: h.kind,
                why: "describes pages outside the regions, or too many",
            }),
        }
    }

    fn unpack<'a>(
        &self,
        peer: std::net::SocketAddr,
        h: &Header,
        payload: &[u8],
        buf: &'a mut Vec<u8>,
        ps: usize,
    ) -> Result<&'a [u8], MigrateError> {
        buf.resize(h.count as usize * ps, 0);
        decompress(Codec::of_flags(h.flags), payload, buf)
            .map_err(|source| MigrateError::Chunk { peer, source })?;
        Ok(&buf[..])
    }

    fn read_bulk(&self, link: &Link, conn: &Conn) -> Result<(), MigrateError> {
        let peer = conn.peer();
        let (mut payload, mut buf) = (Vec::new(), Vec::new());
        let mut pusher: Option<Pusher> = None;
        loop {
            let h = conn.recv(&mut payload)?;
            match h.kind {
                Kind::BulkEnd => {
                    self.bulk_end(link, h.id)?;
                    continue;
                }
                Kind::Pages if h.flags & pages::REPLY == 0 => {}
                kind => {
                    return Err(MigrateError::Unexpected {
                        peer,
                        kind,
                        why: "came on a bulk connection",
                    });
                }
            }
            let ps = self.check_pages(peer, &h)?;
            let region = h.region as usize;
            let content = h.flags & pages::CONTENT;
            if content != pages::DATA && content != pages::ZERO {
                return Err(MigrateError::Unexpected {
                    peer,
                    kind: h.kind,
                    why: "is an answer on a bulk connection",
                });
            }
            let n = u64::from(h.count);
            add(
                self.bytes.postcopy_or_precopy(h.id),
                (HEADER_LEN + payload.len()) as u64,
            );
            if h.id != PUSHED {
                // Pre-copy: straight into memory (nobody runs on it yet).
                self.precopy_pages.fetch_add(n, Ordering::Relaxed);
                let r = &self.regions[region];
                let off = h.first as usize * ps;
                if content == pages::ZERO {
                    for p in h.first..h.first + n {
                        if self.has_data[region].clear(p as usize) {
                            r.discard(p as usize * ps, ps)?;
                        }
                    }
                } else {
                    let data = self.unpack(peer, &h, &payload, &mut buf, ps)?;
                    match self.mode {
                        DestMode::Missing => r.write(off, data)?,
                        DestMode::Minor => r.write_page_cache(off, data)?,
                    }
                    for p in h.first..h.first + n {
                        self.has_data[region].set(p as usize);
                    }
                }
                self.applied(link, (HEADER_LEN + payload.len()) as u64)?;
                continue;
            }
            // Post-copy: placed through the restore core.
            if !self.wait_ready(link) {
                return Ok(());
            }
            if content == pages::ZERO {
                buf.clear();
                buf.resize(n as usize * ps, 0);
            } else {
                self.unpack(peer, &h, &payload, &mut buf, ps)?;
            }
            if pusher.is_none() {
                pusher = self
                    .restore
                    .lock()
                    .ok()
                    .and_then(|r| r.as_ref().map(Restore::pusher));
            }
            let Some(pu) = pusher.as_mut() else {
                return Ok(());
            };
            let out = pu.push(region, h.first, &buf)?;

            self.pushed_pages.fetch_add(out.placed, Ordering::Relaxed);
            self.applied(link, (HEADER_LEN + payload.len()) as u64)?;
            for p in out.busy {
                let k = (p - h.first) as usize;
                let a = if content == pages::ZERO {
                    Answer::Zero
                } else {
                    Answer::Data(&buf[k * ps..(k + 1) * ps])
                };
                self.fetcher.answer(None, region, p, 1, a);
            }
        }
    }

    /// `bytes` of bulk data (pre-copy or pushed) are applied: the source
    /// may send that much more (acknowledged every 8 KiB).
    fn applied(&self, link: &Link, bytes: u64) -> Result<(), MigrateError> {
        if let Some(done) = self.acks.add(bytes) {
            let mut a = Header::new(Kind::Ack);
            a.id = done;
            link.control.send(a, &[])?;
        }
        Ok(())
    }

    fn bulk_end(&self, link: &Link, id: u64) -> Result<(), MigrateError> {
        let all = {
            let Ok(mut ends) = self.ends.lock() else {
                return Ok(());
            };
            match ends.iter_mut().find(|(i, _)| *i == id) {
                Some(e) => e.1 += 1,
                None => ends.push((id, 1)),
            }
            ends.iter().any(|(i, n)| *i == id && *n == self.bulk)
        };
        if all {
            let mut h = Header::new(Kind::Drained);
            h.id = id;
            link.control.send(h, &[])?;
        }
        Ok(())
    }

    fn read_answers(&self, link: &Link) -> Result<(), MigrateError> {
        let conn = &link.demand;
        let peer = conn.peer();
        let (mut payload, mut buf) = (Vec::new(), Vec::new());
        loop {
            let h = conn.recv(&mut payload)?;
            if h.kind != Kind::Pages || h.flags & pages::REPLY == 0 {
                return Err(MigrateError::Unexpected {
                    peer,
                    kind: h.kind,
                    why: "came on the demand connection",
                });
            }
            add(&self.bytes.postcopy, (HEADER_LEN + payload.len()) as u64);
            let ps = self.check_pages(peer, &h)?;
            let (region, n) = (h.region as usize, u64::from(h.count));
            let a = match h.flags & pages::CONTENT {
                pages::DATA => Answer::Data(self.unpack(peer, &h, &payload, &mut buf, ps)?),
                pages::ZERO => Answer::Zero,
                pages::CURRENT => Answer::Current,
                _ => Answer::Sent,
            };
            self.fetcher.answer(Some(h.id), region, h.first, n, a);
        }
    }
}

impl Bytes {
    fn postcopy_or_precopy(&self, id: u64) -> &AtomicU64 {
        if id == PUSHED {
            &self.postcopy
        } else {
            &self.precopy
        }
    }
}
