//! A TCP relay inside a network namespace: every connection it accepts is
//! forwarded to one target, each direction through a delay line (latency
//! without netem), and the link can be cut three ways and healed:
//!
//! - [`Cut::Drop`]: silence both ways (nothing read, nothing written, no
//!   FIN, no RST): only heartbeats or TCP's user timeout notice;
//! - [`Cut::Reset`]: every connection is reset both ways, new ones too;
//! - [`Cut::HalfOpen`]: the target's side is reset, the client's side stays
//!   open and silent (it learns nothing until its own timers fire).
//!
//! A delay line in user space is only as faithful as its threads are
//! punctual. The pump threads ask for real-time scheduling (SCHED_FIFO,
//! when allowed) so that a busy machine does not add its wake-up latency to
//! the path, and the relay measures how late each chunk left against its
//! due time ([`RelayStats::late_p99_us`]): the part of a measured latency
//! that is the lab's, not the software under test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::LabError;

/// How the link is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Silence both ways; connections stay open.
    Drop,
    /// Every connection reset, both ways.
    Reset,
    /// The target's side reset, the client's side silent and open.
    HalfOpen,
}

/// What the relay saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Connections accepted.
    pub connections: u64,
    /// Bytes client → target.
    pub up: u64,
    /// Bytes target → client.
    pub down: u64,
    /// How late chunks that waited in the delay line left it against their
    /// due time, in microseconds (the line's own punctuality; chunks held
    /// up by the link behind them are not counted): median, 99th
    /// percentile, maximum.
    pub late_p50_us: u64,
    /// See `late_p50_us`.
    pub late_p99_us: u64,
    /// See `late_p50_us`.
    pub late_max_us: u64,
    /// Whether the pump threads got real-time scheduling.
    pub realtime: bool,
}

struct Pair {
    client: TcpStream,
    upstream: TcpStream,
    dead: AtomicBool,
}

struct Inner {
    target: SocketAddr,
    delay: Duration,
    cut: Mutex<Option<Cut>>,
    cv: Condvar,
    pairs: Mutex<Vec<Arc<Pair>>>,
    /// Client sockets kept open and silent (half-open, or accepted during a drop).
    held: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    connections: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    /// Lateness of each chunk, in microseconds (at most `MAX_SAMPLES`).
    late: Mutex<Vec<u32>>,
    realtime: AtomicBool,
}

const MAX_SAMPLES: usize = 1 << 21;

/// Asks for SCHED_FIFO for the calling thread; whether it got it.
fn realtime() -> bool {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let Ok(prio) = ThreadPriorityValue::try_from(20u8) else {
        return false;
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Crossplatform(prio),
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    )
    .is_ok()
}

/// A running relay.
pub struct Relay {
    addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("addr", &self.addr)
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

const POLL: Duration = Duration::from_millis(50);

fn reset(s: &TcpStream) {
    // Closing with a zero linger sends RST instead of FIN.
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

impl Relay {
    /// Listens on `listen` inside namespace `ns` and forwards to `target`
    /// with `delay` added each way.
    pub fn start(
        ns: &str,
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> Result<Relay, LabError> {
        let inner = Arc::new(Inner {
            target,
            delay,
            cut: Mutex::new(None),
            cv: Condvar::new(),
            pairs: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            late: Mutex::new(Vec::new()),
            realtime: AtomicBool::new(false),
        });
        let (tx, rx) = sync_channel(1);
        let (i, ns) = (inner.clone(), ns.to_string());
        let acceptor = std::thread::Builder::new()
            .name("lab-relay".into())
            .spawn(move || {
                let listener = match enter(&ns).and_then(|()| {
                    let l = TcpListener::bind(listen).map_err(|source| LabError::Io {
                        what: format!("binding {listen} in {ns}"),
                        source,
                    })?;
                    l.set_nonblocking(true).map_err(|source| LabError::Io {
                        what: "non-blocking listener".into(),
                        source,
                    })?;
                    Ok(l)
                }) {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr().map_err(|source| LabError::Io {
                            what: "listener address".into(),
                            source,
                        }));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                accept_loop(&i, &listener);
            })
            .map_err(|source| LabError::Io {
                what: "starting the relay thread".into(),
                source,
            })?;
        let addr = rx.recv().map_err(|_| LabError::Io {
            what: "the relay thread ended".into(),
            source: std::io::Error::other("no address"),
        })??;
        Ok(Relay {
            addr,
            inner,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link.
    pub fn cut(&self, how: Cut) {
        if let Ok(mut c) = self.inner.cut.lock() {
            *c = Some(how);
        }
        if matches!(how, Cut::Reset | Cut::HalfOpen) {
            let pairs: Vec<_> = self
                .inner
                .pairs
                .lock()
                .map(|mut p| p.drain(..).collect())
                .unwrap_or_default();
            for p in pairs {
                reset(&p.upstream);
                match how {
                    Cut::Reset => reset(&p.client),
                    _ => {
                        if let (Ok(c), Ok(mut held)) =
                            (p.client.try_clone(), self.inner.held.lock())
                        {
                            held.push(c);
                        }
                    }
                }
                p.dead.store(true, Ordering::SeqCst);
            }
        }
        self.inner.cv.notify_all();
    }

    /// Heals the link: new connections go through; silent ones resume;
    /// held half-open client sockets are reset.
    pub fn heal(&self) {
        if let Ok(mut c) = self.inner.cut.lock() {
            *c = None;
        }
        let held: Vec<_> = self
            .inner
            .held
            .lock()
            .map(|mut h| h.drain(..).collect())
            .unwrap_or_default();
        for s in held {
            reset(&s);
        }
        self.inner.cv.notify_all();
    }

    /// Counters.
    pub fn stats(&self) -> RelayStats {
        let mut late = self
            .inner
            .late
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        late.sort_unstable();
        let q = |f: f64| {
            late.get(((late.len() as f64 * f) as usize).min(late.len().saturating_sub(1)))
                .map_or(0, |v| u64::from(*v))
        };
        RelayStats {
            connections: self.inner.connections.load(Ordering::Relaxed),
            up: self.inner.up.load(Ordering::Relaxed),
            down: self.inner.down.load(Ordering::Relaxed),
            late_p50_us: q(0.5),
            late_p99_us: q(0.99),
            late_max_us: late.last().map_or(0, |v| u64::from(*v)),
            realtime: self.inner.realtime.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.heal();
        if let Ok(mut p) = self.inner.pairs.lock() {
            for pair in p.drain(..) {
                pair.dead.store(true, Ordering::SeqCst);
            }
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

pub(crate) fn enter(ns: &str) -> Result<(), LabError> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|source| LabError::Setns {
        ns: ns.into(),
        source,
    })?;
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| LabError::Setns {
        ns: ns.into(),
        source: e.into(),
    })
}

fn accept_loop(inner: &Arc<Inner>, listener: &TcpListener) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    while !inner.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                pumps.retain(|p| !p.is_finished());
                continue;
            }
            Err(_) => continue,
        };
        inner.connections.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nonblocking(false);
        match inner.cut.lock().map(|c| *c).unwrap_or(None) {
            Some(Cut::Reset) => {
                reset(&client);
                continue;
            }
            Some(Cut::Drop | Cut::HalfOpen) => {
                if let Ok(mut h) = inner.held.lock() {
                    h.push(client);
                }
                continue;
            }
            None => {}
        }
        let Ok(upstream) = TcpStream::connect_timeout(&inner.target, Duration::from_secs(2)) else {
            reset(&client);
            continue;
        };
        for s in [&client, &upstream] {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(POLL));
            let _ = s.set_write_timeout(Some(POLL));
        }
        let pair = Arc::new(Pair {
            client,
            upstream,
            dead: AtomicBool::new(false),
        });
        if let Ok(mut p) = inner.pairs.lock() {
            p.push(pair.clone());
        }
        for up in [true, false] {
            // A delay line of at most 32 reads of 16 KiB (512 KiB): room for
            // the delay at a gigabit, not a buffer that swallows bulk data.
            let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(32);
            let (i, p) = (inner.clone(), pair.clone());
            pumps.push(std::thread::spawn(move || {
                if realtime() {
                    i.realtime.store(true, Ordering::Relaxed);
                }
                read_side(&i, &p, up, &tx);
            }));
            let (i, p) = (inner.clone(), pair.clone());
            pumps.push(std::thread::spawn(move || {
                if realtime() {
                    i.realtime.store(true, Ordering::Relaxed);
                }
                write_side(&i, &p, up, &rx);
            }));
        }
    }
    for p in pumps {
        let _ = p.join();
    }
}

/// Blocks while the link is silent; false once the pair is dead.
fn wait_open(inner: &Inner, pair: &Pair) -> bool {
    let Ok(mut c) = inner.cut.lock() else {
        return false;
    };
    loop {
        if pair.dead.load(Ordering::SeqCst) || inner.stop.load(Ordering::SeqCst) {
            return false;
        }
        if c.is_none() {
            return true;
        }
        c = match inner.cv.wait_timeout(c, POLL) {
            Ok((g, _)) => g,
            Err(_) => return false,
        };
    }
}

fn read_side(inner: &Inner, pair: &Pair, up: bool, tx: &SyncSender<(Instant, Vec<u8>)>) {
    let mut src = if up { &pair.client } else { &pair.upstream };
    let mut buf = vec![0u8; 16 << 10];
    while wait_open(inner, pair) {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    // An end of stream goes on to the other side as one, once the data
    // before it is through (the writer sees the channel close).
}

fn write_side(inner: &Inner, pair: &Pair, up: bool, rx: &Receiver<(Instant, Vec<u8>)>) {
    let dst = if up { &pair.upstream } else { &pair.client };
    let counter = if up { &inner.up } else { &inner.down };
    loop {
        let (t, data) = match rx.recv_timeout(POLL) {
            Ok(x) => x,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if pair.dead.load(Ordering::SeqCst) || inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if !pair.dead.load(Ordering::SeqCst) {
                    let _ = dst.shutdown(std::net::Shutdown::Write);
                }
                return;
            }
        };
        let due = t + inner.delay;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
            // Only a chunk that waited for its time says how punctual the
            // line is; one taken late was queued behind the link.
            let late = Instant::now().saturating_duration_since(due);
            if let Ok(mut l) = inner.late.lock() {
                if l.len() < MAX_SAMPLES {
                    l.push(late.as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
        }
        let mut off = 0;
        while off < data.len() {
            if !wait_open(inner, pair) {
                return;
            }
            match (&*dst).write(&data[off..]) {
                Ok(n) => {
                    off += n;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    pair.dead.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}
