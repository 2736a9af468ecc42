//! Pages over TCP: a [`PageServer`] serves any [`PageSource`], a
//! [`TcpSource`] is the page source of a restore (or a migration's post-copy
//! phase) on another host. The framing is in [`crate::wire`] and
//! `docs/PROTOCOL.md`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::source::{Lane, PageSource, SourceError, SourceRegion};
use crate::wire::{
    REQUEST_LEN, RESPONSE_LEN, Request, STATUS_DATA, STATUS_ERROR, STATUS_ZERO, WireError,
    decode_hello, decode_response, encode_hello, hello_len, response_header,
};

/// Serves a [`PageSource`] on a TCP listener, one thread per connection.
pub struct PageServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    served: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PageServer {
    /// Starts serving `source` on `listener`.
    pub fn spawn(
        listener: TcpListener,
        source: Arc<dyn PageSource>,
    ) -> std::io::Result<PageServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let served = Arc::new(AtomicU64::new(0));
        let hello = Arc::new(encode_hello(&source.regions()));
        let (s2, c2, n2) = (stop.clone(), conns.clone(), served.clone());
        let accept = std::thread::Builder::new()
            .name("lp-page-server".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if s2.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    if let (Ok(mut list), Ok(c)) = (c2.lock(), stream.try_clone()) {
                        list.push(c);
                    }
                    let (src, hello, n) = (source.clone(), hello.clone(), n2.clone());
                    let _ = std::thread::Builder::new()
                        .name("lp-page-conn".into())
                        .spawn(move || {
                            let _ = serve_connection(stream, src.as_ref(), &hello, &n);
                        });
                }
            })?;
        Ok(PageServer {
            addr,
            stop,
            conns,
            served,
            accept: Some(accept),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops accepting and cuts every connection (as if the host vanished).
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(list) = self.conns.lock() {
            for c in list.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        // Unblock accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_connection(
    mut s: TcpStream,
    source: &dyn PageSource,
    hello: &[u8],
    served: &AtomicU64,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.write_all(hello)?;
    let regions = source.regions();
    let mut buf = Vec::new();
    let mut req = [0u8; REQUEST_LEN];
    loop {
        s.read_exact(&mut req)?;
        let Ok(r) = Request::decode(&req) else {
            // Not our protocol: the framing cannot be trusted, hang up.
            return Ok(());
        };
        let error = |s: &mut TcpStream, msg: String| -> std::io::Result<()> {
            let m = msg.into_bytes();
            s.write_all(&response_header(STATUS_ERROR, &m))?;
            s.write_all(&m)
        };
        let bytes = match r.check(&regions) {
            Ok(b) => b,
            Err(e) => {
                error(&mut s, e.to_string())?;
                continue;
            }
        };
        buf.resize(bytes, 0);
        match source.read_pages(r.region as usize, r.first, &mut buf, Lane::Background) {
            Ok(true) => {
                s.write_all(&response_header(STATUS_DATA, &buf))?;
                s.write_all(&buf)?;
            }
            Ok(false) => s.write_all(&response_header(STATUS_ZERO, &[]))?,
            Err(e) => error(&mut s, e.to_string())?,
        }
        served.fetch_add(1, Ordering::Relaxed);
    }
}

/// A page source on another host (a [`PageServer`]). With two or more
/// connections the first carries demand reads only, so a faulting thread
/// never waits behind a prefetch; the others are shared by background
/// reads.
#[derive(Debug)]
pub struct TcpSource {
    peer: String,
    pool: Vec<Mutex<TcpStream>>,
    next: AtomicUsize,
    regions: Vec<SourceRegion>,
    timeout: Duration,
}

impl TcpSource {
    /// Connects `connections` times to `addr`. `timeout` bounds the connect
    /// and every later read or write: a peer silent for longer is gone.
    pub fn connect(
        addr: impl ToSocketAddrs,
        connections: usize,
        timeout: Duration,
    ) -> Result<TcpSource, SourceError> {
        let gone = |peer: &str, doing, e: std::io::Error| SourceError::PeerGone {
            peer: peer.to_string(),
            doing,
            source: Arc::new(e),
        };
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| gone("(unresolved)", "resolving its address", e))?
            .next()
            .ok_or_else(|| {
                gone(
                    "(unresolved)",
                    "resolving its address",
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                )
            })?;
        let peer = sa.to_string();
        let mut pool = Vec::new();
        let mut regions: Option<Vec<SourceRegion>> = None;
        for _ in 0..connections.max(1) {
            let mut s = TcpStream::connect_timeout(&sa, timeout)
                .map_err(|e| gone(&peer, "connecting", e))?;
            let io = |e| gone(&peer, "greeting", e);
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            let proto = |detail| SourceError::Protocol {
                peer: peer.clone(),
                detail,
            };
            let mut head = [0u8; 16];
            s.read_exact(&mut head).map_err(io)?;
            let len = hello_len(&head).map_err(proto)?;
            let mut hello = head.to_vec();
            hello.resize(len, 0);
            s.read_exact(&mut hello[16..]).map_err(io)?;
            let r = decode_hello(&hello).map_err(proto)?;
            if regions.as_ref().is_some_and(|prev| *prev != r) {
                return Err(proto(WireError::DifferentRegions));
            }
            regions = Some(r);
            pool.push(Mutex::new(s));
        }
        Ok(TcpSource {
            peer,
            pool,
            next: AtomicUsize::new(0),
            regions: regions.unwrap_or_default(),
            timeout,
        })
    }

    fn request(
        &self,
        s: &mut TcpStream,
        req: Request,
        buf: &mut [u8],
    ) -> Result<bool, SourceError> {
        let io = |doing: &'static str, e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => SourceError::Timeout {
                peer: self.peer.clone(),
                doing,
                timeout_ms: self.timeout.as_millis() as u64,
            },
            _ => SourceError::PeerGone {
                peer: self.peer.clone(),
                doing,
                source: Arc::new(e),
            },
        };
        let proto = |detail| SourceError::Protocol {
            peer: self.peer.clone(),
            detail,
        };
        s.write_all(&req.encode())
            .map_err(|e| io("sending a request", e))?;
        let mut h = [0u8; RESPONSE_LEN];
        s.read_exact(&mut h).map_err(|e| io("awaiting pages", e))?;
        let (status, len, crc) = decode_response(&h).map_err(proto)?;
        match status {
            STATUS_DATA if len == buf.len() => {
                s.read_exact(buf).map_err(|e| io("reading pages", e))?;
                if crc32c::crc32c(buf) != crc {
                    return Err(proto(WireError::PageChecksum {
                        region: req.region,
                        first: req.first,
                        count: req.count,
                    }));
                }
                Ok(true)
            }
            STATUS_ZERO if len == 0 => Ok(false),
            STATUS_ERROR => {
                let mut m = vec![0u8; len];
                s.read_exact(&mut m)
                    .map_err(|e| io("reading an error", e))?;
                Err(SourceError::Refused {
                    peer: self.peer.clone(),
                    reason: String::from_utf8_lossy(&m).into_owned(),
                })
            }
            _ => Err(proto(WireError::Mismatch {
                status,
                got: len,
                asked: buf.len(),
            })),
        }
    }
}

impl PageSource for TcpSource {
    fn regions(&self) -> Vec<SourceRegion> {
        self.regions.clone()
    }

    fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
        lane: Lane,
    ) -> Result<bool, SourceError> {
        let r = crate::source::check_run(&self.regions, region, first, buf.len())?;
        let req = Request {
            region: region as u32,
            first,
            count: (buf.len() / r.page_size) as u32,
        };
        // Connection 0 is the demand lane when there are others for the background.
        let (lo, n) = match (lane, self.pool.len()) {
            (_, 1) => (0, 1),
            (Lane::Demand, _) => (0, 1),
            (Lane::Background, len) => (1, len - 1),
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            if let Ok(mut s) = self.pool[lo + (start + k) % n].try_lock() {
                return self.request(&mut s, req, buf);
            }
        }
        let poisoned = || SourceError::PeerGone {
            peer: self.peer.clone(),
            doing: "taking a connection",
            source: Arc::new(std::io::Error::other("a thread died holding it")),
        };
        let mut s = self.pool[lo + start % n].lock().map_err(|_| poisoned())?;
        self.request(&mut s, req, buf)
    }
}
