//! One generation of a migration's connections (control, demand, bulk),
//! and its liveness: heartbeats both ways on the control connection, a
//! link declared dead when nothing arrives for `dead_after` (or any
//! connection fails); a dead link shuts every connection down so every
//! thread blocked on one returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{MigrateError, spawn_err};
use crate::net::Conn;
use crate::proto::frame::{Header, Kind, heartbeat};

/// Liveness settings.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Silence after which the link is dead (also the TCP user timeout).
    pub dead_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            heartbeat: Duration::from_millis(150),
            dead_after: Duration::from_millis(800),
        }
    }
}

/// Unix time in ns (the clock both ends put in frames).
pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Round-trip samples of a whole migration (all generations), in µs, and
/// the peer's clock offset taken from the fastest round trip (NTP's way:
/// the echo's time minus the midpoint of send and receive).
#[derive(Debug, Default)]
pub(crate) struct Rtt(Mutex<Vec<u64>>, Mutex<Option<(u64, i64)>>);

impl Rtt {
    /// The fastest round trip seen (the path without queues), or `None`.
    pub(crate) fn min(&self) -> Option<std::time::Duration> {
        self.1
            .lock()
            .ok()
            .and_then(|o| o.map(|(rtt, _)| std::time::Duration::from_nanos(rtt)))
    }

    /// The peer's clock minus ours, in ns, if measured.
    pub(crate) fn offset_ns(&self) -> Option<i64> {
        self.1.lock().ok().and_then(|o| o.map(|(_, off)| off))
    }

    fn sample(&self, sent: u64, echoed: u64, now: u64) {
        let rtt = now.saturating_sub(sent);
        if let Ok(mut v) = self.0.lock() {
            if v.len() < 100_000 {
                v.push(rtt / 1000);
            }
        }
        let mid = sent / 2 + now / 2;
        let off = echoed as i64 - mid as i64;
        if let Ok(mut o) = self.1.lock() {
            if o.is_none_or(|(best, _)| rtt < best) {
                *o = Some((rtt, off));
            }
        }
    }

    pub(crate) fn median_ms(&self) -> f64 {
        self.quantile_ms(0.5)
    }

    /// The `q` quantile of the round trips seen, in ms (0 without samples).
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        let Ok(mut v) = self.0.lock() else {
            return 0.0;
        };
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
        v[i] as f64 / 1e3
    }
}

/// One generation of connections.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) control: Arc<Conn>,
    pub(crate) demand: Arc<Conn>,
    pub(crate) bulk: Vec<Arc<Conn>>,
    pub(crate) generation: u32,
    down: AtomicBool,
    cause: Mutex<Option<String>>,
    last_rx_ns: AtomicU64,
    epoch: Instant,
    rtt: Arc<Rtt>,
}

impl Link {
    pub(crate) fn new(
        control: Arc<Conn>,
        demand: Arc<Conn>,
        bulk: Vec<Arc<Conn>>,
        generation: u32,
        rtt: Arc<Rtt>,
    ) -> Arc<Link> {
        Arc::new(Link {
            control,
            demand,
            bulk,
            generation,
            down: AtomicBool::new(false),
            cause: Mutex::new(None),
            last_rx_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            rtt,
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Declares the link dead (first cause kept) and shuts every connection.
    pub(crate) fn fail(&self, why: impl std::fmt::Display) {
        if let Ok(mut c) = self.cause.lock() {
            c.get_or_insert_with(|| why.to_string());
        }
        self.down.store(true, Ordering::SeqCst);
        self.control.shutdown();
        self.demand.shutdown();
        for b in &self.bulk {
            b.shutdown();
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Why the link died.
    pub(crate) fn cause(&self) -> String {
        self.cause
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .unwrap_or_else(|| "closed".into())
    }

    /// A frame arrived on the control connection.
    pub(crate) fn touch(&self) {
        self.last_rx_ns.store(self.now_ns(), Ordering::Relaxed);
    }

    /// Answers a heartbeat (with this side's clock), or records the round
    /// trip and clock offset of an echo.
    pub(crate) fn on_heartbeat(&self, h: &Header) {
        if h.flags & heartbeat::ECHO != 0 {
            self.rtt.sample(h.first, h.id, unix_ns());
        } else {
            let mut e = *h;
            e.flags = heartbeat::ECHO;
            e.id = unix_ns();
            if let Err(err) = self.control.send(e, &[]) {
                self.fail(err);
            }
        }
    }

    /// Starts the heartbeat: a beat every `live.heartbeat`; the link is
    /// declared dead after `live.dead_after` of silence.
    pub(crate) fn spawn_heartbeat(
        self: &Arc<Self>,
        live: Liveness,
        name: &str,
    ) -> Result<JoinHandle<()>, MigrateError> {
        let link = self.clone();
        self.touch();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut seq = 0u64;
                while !link.is_down() {
                    let mut h = Header::new(Kind::Heartbeat);
                    h.id = seq;
                    h.first = unix_ns();
                    seq += 1;
                    if let Err(e) = link.control.send(h, &[]) {
                        link.fail(e);
                        break;
                    }
                    let silent = link
                        .now_ns()
                        .saturating_sub(link.last_rx_ns.load(Ordering::Relaxed));
                    if silent > live.dead_after.as_nanos() as u64 {
                        link.fail(format!("nothing received for {} ms", silent / 1_000_000));
                        break;
                    }
                    // Sleep in slices so a dead link ends the thread soon.
                    let until = Instant::now() + live.heartbeat;
                    while Instant::now() < until && !link.is_down() {
                        std::thread::sleep(Duration::from_millis(10).min(live.heartbeat));
                    }
                }
            })
            .map_err(spawn_err(name))
    }
}
