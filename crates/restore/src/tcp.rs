//! Pages over TCP: a [`PageServer`] serves any [`PageSource`], a
//! [`TcpSource`] is the page source of a restore (or a migration's post-copy
//! phase) on another host. The wire format is in `docs/PROTOCOL.md`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::le::{u32_at, u64_at};
use crate::source::{PageSource, SourceError, SourceRegion};

/// Magic of the server's hello.
pub const HELLO_MAGIC: &[u8; 8] = b"LPWIRE\0\0";
/// Protocol version.
pub const VERSION: u32 = 1;
/// Magic of each request ("LPRQ").
pub const REQUEST_MAGIC: u32 = 0x5152_504c;
/// Request size in bytes.
pub const REQUEST_LEN: usize = 32;
/// Response header size in bytes.
pub const RESPONSE_LEN: usize = 16;
/// Largest run one request may ask for.
pub const MAX_RUN_BYTES: u64 = 64 << 20;
/// Most regions a hello may describe.
pub const MAX_REGIONS: u32 = 4096;

const OP_READ: u32 = 1;
const STATUS_DATA: u32 = 0;
const STATUS_ZERO: u32 = 1;
const STATUS_ERROR: u32 = 2;

/// The hello's bytes.
pub fn encode_hello(regions: &[SourceRegion]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + regions.len() * 16 + 4);
    b.extend_from_slice(HELLO_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        b.extend_from_slice(&(r.page_size as u64).to_le_bytes());
        b.extend_from_slice(&r.pages.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Length of the hello whose first 16 bytes are `head`, or why it is refused.
pub fn hello_len(head: &[u8; 16]) -> Result<usize, String> {
    if &head[..8] != HELLO_MAGIC {
        return Err("the peer is not a livepage page server (bad hello magic)".into());
    }
    let version = u32_at(head, 8);
    if version != VERSION {
        return Err(format!(
            "the page server speaks protocol version {version}, this build speaks {VERSION}"
        ));
    }
    let n = u32_at(head, 12);
    if n == 0 || n > MAX_REGIONS {
        return Err(format!(
            "the hello describes {n} regions (1..={MAX_REGIONS})"
        ));
    }
    Ok(16 + n as usize * 16 + 4)
}

/// Parses a whole hello (untrusted bytes).
pub fn decode_hello(b: &[u8]) -> Result<Vec<SourceRegion>, String> {
    let head: &[u8; 16] = b
        .get(..16)
        .and_then(|h| h.try_into().ok())
        .ok_or("the hello is truncated")?;
    let len = hello_len(head)?;
    if b.len() != len {
        return Err(format!("the hello has {} bytes, {len} expected", b.len()));
    }
    if u32_at(b, len - 4) != crc32c::crc32c(&b[..len - 4]) {
        return Err("the hello's checksum does not match".into());
    }
    let n = u32_at(b, 12) as usize;
    let mut regions = Vec::with_capacity(n);
    for i in 0..n {
        let ps = u64_at(b, 16 + i * 16);
        let pages = u64_at(b, 24 + i * 16);
        if !ps.is_power_of_two() || !(4096..=1 << 30).contains(&ps) {
            return Err(format!("region {i} has a page size of {ps} bytes"));
        }
        if pages.checked_mul(ps).is_none() {
            return Err(format!("region {i}'s size overflows"));
        }
        regions.push(SourceRegion {
            page_size: ps as usize,
            pages,
        });
    }
    Ok(regions)
}

/// A request for `count` pages of `region` from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Region.
    pub region: u32,
    /// First page.
    pub first: u64,
    /// Pages.
    pub count: u32,
}

impl Request {
    /// Its bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&OP_READ.to_le_bytes());
        b[8..12].copy_from_slice(&self.region.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b
    }

    /// Parses a request (untrusted bytes). `Err` means the stream is not
    /// speaking this protocol and the connection should be closed.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
        if u32_at(b, 0) != REQUEST_MAGIC {
            return Err("bad request magic".into());
        }
        let op = u32_at(b, 4);
        if op != OP_READ {
            return Err(format!("unknown request op {op}"));
        }
        if u64_at(b, 24) != 0 {
            return Err("reserved request field is not zero".into());
        }
        Ok(Request {
            region: u32_at(b, 8),
            count: u32_at(b, 12),
            first: u64_at(b, 16),
        })
    }

    /// Why this request cannot be served from `regions`, if it cannot.
    pub fn check(&self, regions: &[SourceRegion]) -> Result<usize, String> {
        let r = regions
            .get(self.region as usize)
            .ok_or_else(|| format!("no region {}", self.region))?;
        let bytes = u64::from(self.count) * r.page_size as u64;
        if self.count == 0 || bytes > MAX_RUN_BYTES {
            return Err(format!(
                "{} pages of {} bytes: a request asks for 1 page up to {MAX_RUN_BYTES} bytes",
                self.count, r.page_size
            ));
        }
        if self
            .first
            .checked_add(u64::from(self.count))
            .is_none_or(|e| e > r.pages)
        {
            return Err(format!(
                "pages {}+{} lie outside region {} ({} pages)",
                self.first, self.count, self.region, r.pages
            ));
        }
        Ok(bytes as usize)
    }
}

fn response_header(status: u32, payload: &[u8]) -> [u8; RESPONSE_LEN] {
    let mut h = [0u8; RESPONSE_LEN];
    h[0..4].copy_from_slice(&status.to_le_bytes());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h
}

/// A response header: (status, payload length, payload crc).
pub fn decode_response(h: &[u8; RESPONSE_LEN]) -> Result<(u32, usize, u32), String> {
    let status = u32_at(h, 0);
    let len = u32_at(h, 4) as usize;
    if status > STATUS_ERROR || u32_at(h, 12) != 0 {
        return Err(format!("malformed response header (status {status})"));
    }
    if len as u64 > MAX_RUN_BYTES {
        return Err(format!("a response of {len} bytes is over the limit"));
    }
    Ok((status, len, u32_at(h, 8)))
}

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
                    std::thread::spawn(move || {
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
        let bytes = match r.check(&regions) {
            Ok(b) => b,
            Err(msg) => {
                let m = msg.into_bytes();
                s.write_all(&response_header(STATUS_ERROR, &m))?;
                s.write_all(&m)?;
                continue;
            }
        };
        buf.resize(bytes, 0);
        match source.read_pages(r.region as usize, r.first, &mut buf) {
            Ok(true) => {
                s.write_all(&response_header(STATUS_DATA, &buf))?;
                s.write_all(&buf)?;
            }
            Ok(false) => s.write_all(&response_header(STATUS_ZERO, &[]))?,
            Err(e) => {
                let m = e.message.into_bytes();
                s.write_all(&response_header(STATUS_ERROR, &m))?;
                s.write_all(&m)?;
            }
        }
        served.fetch_add(1, Ordering::Relaxed);
    }
}

/// A page source on another host (a [`PageServer`]), over a small pool of
/// connections so that several handler threads can wait on it at once.
#[derive(Debug)]
pub struct TcpSource {
    peer: String,
    pool: Vec<Mutex<TcpStream>>,
    next: AtomicUsize,
    regions: Vec<SourceRegion>,
}

impl TcpSource {
    /// Connects `connections` times to `addr`. `timeout` bounds the connect
    /// and every later read or write: a peer silent for longer is gone, and
    /// the restore fails closed.
    pub fn connect(
        addr: impl ToSocketAddrs,
        connections: usize,
        timeout: Duration,
    ) -> Result<TcpSource, SourceError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| SourceError::gone(format!("resolving the page server: {e}")))?
            .collect();
        let Some(sa) = addrs.first().copied() else {
            return Err(SourceError::gone(
                "the page server address resolves to nothing",
            ));
        };
        let peer = sa.to_string();
        let mut pool = Vec::new();
        let mut regions: Option<Vec<SourceRegion>> = None;
        for _ in 0..connections.max(1) {
            let mut s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| {
                SourceError::gone(format!("connecting to the page server {peer}: {e}"))
            })?;
            let io = |e: std::io::Error| SourceError::gone(format!("page server {peer}: {e}"));
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            let mut head = [0u8; 16];
            s.read_exact(&mut head).map_err(io)?;
            let len = hello_len(&head).map_err(|m| SourceError::gone(format!("{peer}: {m}")))?;
            let mut hello = head.to_vec();
            hello.resize(len, 0);
            s.read_exact(&mut hello[16..]).map_err(io)?;
            let r = decode_hello(&hello).map_err(|m| SourceError::gone(format!("{peer}: {m}")))?;
            if regions.as_ref().is_some_and(|prev| *prev != r) {
                return Err(SourceError::gone(format!(
                    "{peer} described different regions on two connections"
                )));
            }
            regions = Some(r);
            pool.push(Mutex::new(s));
        }
        Ok(TcpSource {
            peer,
            pool,
            next: AtomicUsize::new(0),
            regions: regions.unwrap_or_default(),
        })
    }

    fn request(
        &self,
        s: &mut TcpStream,
        req: Request,
        buf: &mut [u8],
    ) -> Result<bool, SourceError> {
        let gone = |what: &str, e: std::io::Error| {
            SourceError::gone(format!(
                "the page server {} vanished ({what}: {e})",
                self.peer
            ))
        };
        s.write_all(&req.encode())
            .map_err(|e| gone("sending a request", e))?;
        let mut h = [0u8; RESPONSE_LEN];
        s.read_exact(&mut h)
            .map_err(|e| gone("awaiting pages", e))?;
        let (status, len, crc) =
            decode_response(&h).map_err(|m| SourceError::gone(format!("{}: {m}", self.peer)))?;
        match status {
            STATUS_DATA if len == buf.len() => {
                s.read_exact(buf).map_err(|e| gone("reading pages", e))?;
                if crc32c::crc32c(buf) != crc {
                    return Err(SourceError::gone(format!(
                        "{}: pages {}+{} of region {} arrived corrupt (checksum mismatch)",
                        self.peer, req.first, req.count, req.region
                    )));
                }
                Ok(true)
            }
            STATUS_ZERO if len == 0 => Ok(false),
            STATUS_ERROR => {
                let mut m = vec![0u8; len];
                s.read_exact(&mut m)
                    .map_err(|e| gone("reading an error", e))?;
                Err(SourceError::pages(format!(
                    "the page server {}: {}",
                    self.peer,
                    String::from_utf8_lossy(&m)
                )))
            }
            _ => Err(SourceError::gone(format!(
                "{}: a response of {len} bytes for a request of {} (protocol error)",
                self.peer,
                buf.len()
            ))),
        }
    }
}

impl PageSource for TcpSource {
    fn regions(&self) -> Vec<SourceRegion> {
        self.regions.clone()
    }

    fn read_pages(&self, region: usize, first: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        let r = self
            .regions
            .get(region)
            .ok_or_else(|| SourceError::pages(format!("the peer has no region {region}")))?;
        let req = Request {
            region: region as u32,
            first,
            count: (buf.len() / r.page_size) as u32,
        };
        // A free connection if there is one, else wait for one in turn.
        let n = self.pool.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            if let Ok(mut s) = self.pool[(start + k) % n].try_lock() {
                return self.request(&mut s, req, buf);
            }
        }
        let mut s = self.pool[start % n]
            .lock()
            .map_err(|_| SourceError::gone("a connection's lock was poisoned"))?;
        self.request(&mut s, req, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_round_trips(regs in proptest::collection::vec((12u32..22, 1u64..1 << 30), 1..8)) {
            let r: Vec<SourceRegion> = regs.iter().map(|(s, p)| SourceRegion { page_size: 1 << s, pages: *p }).collect();
            prop_assert_eq!(decode_hello(&encode_hello(&r)).unwrap(), r);
        }

        #[test]
        fn garbage_hello_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_hello(&b);
        }

        #[test]
        fn requests_round_trip(region in any::<u32>(), first in any::<u64>(), count in any::<u32>()) {
            let r = Request { region, first, count };
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn garbage_requests_and_responses_never_panic(b in proptest::array::uniform32(any::<u8>())) {
            let _ = Request::decode(&b);
            let h: [u8; RESPONSE_LEN] = b[..RESPONSE_LEN].try_into().unwrap();
            let _ = decode_response(&h);
        }

        #[test]
        fn out_of_range_requests_are_refused(first in any::<u64>(), count in any::<u32>()) {
            let regions = [SourceRegion { page_size: 4096, pages: 100 }];
            let r = Request { region: 0, first, count };
            let ok = count > 0 && first.checked_add(u64::from(count)).is_some_and(|e| e <= 100);
            prop_assert_eq!(r.check(&regions).is_ok(), ok);
        }
    }
}
