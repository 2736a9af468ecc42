//! Firecracker's page-fault handshake (`mem_backend: {backend_type: "Uffd"}`):
//! Firecracker connects to our Unix socket and sends one message whose body
//! is a JSON array of guest region mappings
//! `{base_host_virt_addr, size, offset, page_size}` with its guest memory's
//! userfaultfd (registered MISSING, with EVENT_REMOVE) attached as
//! SCM_RIGHTS. We then serve that VM's faults from Firecracker's raw memory
//! file (region bytes at `offset`) or from a livepage image (its regions laid
//! end to end, the same flat layout), for as many VMs as connect.
//!
//! Unlike Firecracker's example handlers, a malformed handshake is answered
//! with one line of text naming the problem and the connection is closed;
//! the server keeps serving everyone else. Discarded ranges (balloon,
//! MADV_DONTNEED) stay registered and are answered with zeros.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livepage_mem::RangeSet;
use livepage_uffd::fdpass::{is_userfaultfd, recv_with_fd};
use livepage_uffd::poll::poll_readable;
use livepage_uffd::{CopyMode, Event, EventBuffer, Features, RangeError, Resolved, Uffd};
use serde::{Deserialize, Serialize};

/// The most bytes a handshake message may have.
pub const MAX_HANDSHAKE: usize = 64 << 10;

/// One guest memory region as Firecracker describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address of the region in Firecracker.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region's bytes in the memory file.
    pub offset: u64,
    /// Page size in bytes (4096, or 2 MiB on hugetlbfs).
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Deprecated name of the same (bytes, despite the name).
    #[serde(default)]
    pub page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// The page size, whichever field carried it.
    pub fn page_bytes(&self) -> u64 {
        self.page_size.or(self.page_size_kib).unwrap_or(0)
    }
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr - self.base_host_virt_addr < self.size
    }
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket failed or closed before a message came.
    #[error("the handshake could not be read: {0}")]
    Io(String),
    /// No fd came with the message.
    #[error(
        "the handshake message carried no file descriptor (the userfaultfd must come as SCM_RIGHTS)"
    )]
    NoFd,
    /// The fd is not a userfaultfd.
    #[error("the file descriptor sent is not a userfaultfd")]
    NotUffd,
    /// Not the JSON expected.
    #[error(
        "the handshake is not a JSON array of {{base_host_virt_addr, size, offset, page_size}}: {0}"
    )]
    Json(String),
    /// No regions.
    #[error("the handshake lists no guest regions")]
    Empty,
    /// A page size we cannot serve.
    #[error("region {index}: page size {page_size} is not 4096 or 2097152")]
    PageSize {
        /// Region index.
        index: usize,
        /// The page size given.
        page_size: u64,
    },
    /// Zero-sized or overflowing.
    #[error("region {index}: size {size} at {base:#x} is empty or overflows")]
    Size {
        /// Region index.
        index: usize,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// Not page aligned.
    #[error("region {index}: {field} {value:#x} is not aligned to its {page_size}-byte pages")]
    Misaligned {
        /// Region index.
        index: usize,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The page size.
        page_size: u64,
    },
    /// Two regions overlap in Firecracker's address space.
    #[error("regions {a} and {b} overlap in the VMM's address space")]
    Overlap {
        /// One.
        a: usize,
        /// The other.
        b: usize,
    },
    /// A region reaches past the memory file or image.
    #[error(
        "region {index} ends at byte {end} of the memory snapshot, which has {have} bytes \
         (a snapshot of another VM?)"
    )]
    BeyondBacking {
        /// Region index.
        index: usize,
        /// Its end offset.
        end: u64,
        /// The backing's length.
        have: u64,
    },
}

/// Parses and checks a handshake body against a backing of `backing_len` bytes.
pub fn parse_mappings(
    body: &[u8],
    backing_len: u64,
) -> Result<Vec<GuestRegionUffdMapping>, HandshakeError> {
    let maps: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(body).map_err(|e| HandshakeError::Json(e.to_string()))?;
    if maps.is_empty() {
        return Err(HandshakeError::Empty);
    }
    for (i, m) in maps.iter().enumerate() {
        let ps = m.page_bytes();
        if ps != 4096 && ps != 2 << 20 {
            return Err(HandshakeError::PageSize {
                index: i,
                page_size: ps,
            });
        }
        if m.size == 0 || m.base_host_virt_addr.checked_add(m.size).is_none() {
            return Err(HandshakeError::Size {
                index: i,
                base: m.base_host_virt_addr,
                size: m.size,
            });
        }
        for (field, value) in [
            ("base_host_virt_addr", m.base_host_virt_addr),
            ("size", m.size),
            ("offset", m.offset),
        ] {
            if value % ps != 0 {
                return Err(HandshakeError::Misaligned {
                    index: i,
                    field,
                    value,
                    page_size: ps,
                });
            }
        }
        let end = m.offset.saturating_add(m.size);
        if end > backing_len {
            return Err(HandshakeError::BeyondBacking {
                index: i,
                end,
                have: backing_len,
            });
        }
    }
    for a in 0..maps.len() {
        for b in a + 1..maps.len() {
            let (x, y) = (&maps[a], &maps[b]);
            if x.base_host_virt_addr < y.base_host_virt_addr + y.size
                && y.base_host_virt_addr < x.base_host_virt_addr + x.size
            {
                return Err(HandshakeError::Overlap { a, b });
            }
        }
    }
    Ok(maps)
}

/// What the VMs' pages are read from.
#[derive(Debug)]
pub enum Backing {
    /// Firecracker's raw memory snapshot file.
    MemFile {
        /// The file.
        file: File,
        /// Its length.
        len: u64,
    },
    /// A livepage image (or chain), its regions end to end.
    Image(livepage_image::Chain),
}

impl Backing {
    /// Opens a raw memory file.
    pub fn mem_file(path: &Path) -> std::io::Result<Backing> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Backing::MemFile { file, len })
    }

    /// Opens an image chain.
    pub fn image(path: &Path) -> Result<Backing, livepage_image::ImageError> {
        Ok(Backing::Image(livepage_image::Chain::open(path)?))
    }

    /// Bytes of guest memory it holds.
    pub fn len(&self) -> u64 {
        match self {
            Backing::MemFile { len, .. } => *len,
            Backing::Image(c) => c.head().regions().iter().map(|r| r.len).sum(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at flat offset `off`; returns whether any is non-zero.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<bool, String> {
        match self {
            Backing::MemFile { file, .. } => {
                file.read_exact_at(buf, off).map_err(|e| {
                    format!(
                        "reading {} bytes at {off} of the memory file: {e}",
                        buf.len()
                    )
                })?;
                Ok(buf.iter().any(|b| *b != 0))
            }
            Backing::Image(chain) => {
                let mut any = false;
                let (mut off, mut done) = (off, 0usize);
                let mut base = 0u64;
                for (ri, r) in chain.head().regions().iter().enumerate() {
                    while done < buf.len() && off >= base && off < base + r.len {
                        let in_region = off - base;
                        if in_region % r.page_size != 0 {
                            return Err(format!(
                                "offset {off} is not aligned to the image's {}-byte pages",
                                r.page_size
                            ));
                        }
                        let n = ((base + r.len - off) as usize).min(buf.len() - done);
                        let n = n - n % r.page_size as usize;
                        if n == 0 {
                            return Err("a request smaller than the image's page size".into());
                        }
                        any |= chain
                            .read_pages(ri, in_region / r.page_size, &mut buf[done..done + n])
                            .map_err(|e| e.to_string())?;
                        done += n;
                        off += n as u64;
                    }
                    base += r.len;
                }
                if done < buf.len() {
                    return Err(format!("offset {off} lies beyond the image"));
                }
                Ok(any)
            }
        }
    }
}

/// What one served VM did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmStats {
    /// Connection number.
    pub vm: u64,
    /// Regions mapped.
    pub regions: usize,
    /// Guest bytes.
    pub bytes: u64,
    /// Faults served with data.
    pub faults: u64,
    /// Faults answered with zeros (zero in the snapshot, or discarded).
    pub zero_faults: u64,
    /// Bytes discarded (REMOVE events).
    pub removed_bytes: u64,
    /// Seconds connected.
    pub seconds: f64,
    /// Why serving ended.
    pub ended: String,
    /// Serving failed and every page not yet served was poisoned.
    pub failed_closed: bool,
}

/// Poisons every page of `maps` that is not mapped yet. Returns whether the
/// kernel accepted it (UFFDIO_POISON, Linux 6.6).
pub fn poison_all(uffd: &Uffd, maps: &[GuestRegionUffdMapping]) -> bool {
    // Every region, even after one failed.
    let mut ok = true;
    for m in maps {
        let base = m.base_host_virt_addr as usize;
        // Serving has ended: a pending discard only needs to be read.
        ok &= uffd
            .poison_holes(base, m.size as usize, m.page_bytes() as usize, |_| {})
            .is_ok();
    }
    ok
}

/// What the server reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    /// A VM's handshake was accepted.
    Accepted {
        /// Connection number.
        vm: u64,
        /// Its regions.
        regions: Vec<GuestRegionUffdMapping>,
    },
    /// A handshake was refused (the server goes on).
    Rejected {
        /// Connection number.
        vm: u64,
        /// Why.
        reason: String,
    },
    /// A VM is gone.
    Finished(VmStats),
}

/// Reads and checks one handshake from `stream`.
pub fn handshake(
    stream: &UnixStream,
    backing_len: u64,
) -> Result<(Uffd, Vec<GuestRegionUffdMapping>), HandshakeError> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| HandshakeError::Io(e.to_string()))?;
    let mut body = Vec::new();
    let mut fd: Option<OwnedFd> = None;
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    // One sendmsg, but a stream socket may hand it over in pieces.
    loop {
        let (n, got) = recv_with_fd(stream.as_fd(), &mut buf)
            .map_err(|e| HandshakeError::Io(e.to_string()))?;
        if fd.is_none() {
            fd = got;
        }
        if n == 0 {
            if body.is_empty() {
                return Err(HandshakeError::Io(
                    "the peer closed the connection without a message".into(),
                ));
            }
            break;
        }
        body.extend_from_slice(&buf[..n]);
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Err(e) if e.is_eof() && body.len() < MAX_HANDSHAKE => continue,
            _ => break,
        }
    }
    let maps = parse_mappings(&body, backing_len)?;
    let fd = fd.ok_or(HandshakeError::NoFd)?;
    if !is_userfaultfd(fd.as_fd()) {
        return Err(HandshakeError::NotUffd);
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| HandshakeError::Io(e.to_string()))?;
    Ok((Uffd::from_handshaken_fd(fd, Features::EVENT_REMOVE), maps))
}

/// Serves one VM until it disconnects (its socket closes) or `stop` is set.
pub fn serve_vm(
    vm: u64,
    stream: &UnixStream,
    uffd: &Uffd,
    maps: &[GuestRegionUffdMapping],
    backing: &Backing,
    stop: &AtomicBool,
) -> VmStats {
    let t0 = Instant::now();
    let mut st = VmStats {
        vm,
        regions: maps.len(),
        bytes: maps.iter().map(|m| m.size).sum(),
        ..VmStats::default()
    };
    let max_ps = maps.iter().map(|m| m.page_bytes()).max().unwrap_or(4096) as usize;
    let mut page = vec![0u8; max_ps];
    let mut removed = RangeSet::new();
    let mut events = EventBuffer::new(64);
    let mut deferred: Vec<u64> = Vec::new();
    let (ended, fatal) = loop {
        if stop.load(Ordering::Relaxed) {
            break ("the server was stopped".into(), true);
        }
        let ready = match poll_readable([uffd.as_fd(), stream.as_fd()], 200) {
            Ok(r) => r,
            Err(e) => break (format!("poll failed: {e}"), true),
        };
        if ready[1] {
            // Firecracker sends nothing after the handshake: readable means closed.
            let mut sink = [0u8; 4096];
            match std::io::Read::read(&mut &*stream, &mut sink) {
                Ok(0) | Err(_) => break ("the VMM closed its socket".into(), false),
                Ok(_) => {}
            }
        }
        if !ready[0] && deferred.is_empty() {
            continue;
        }
        let evs: Vec<Event> = match uffd.read_events(&mut events) {
            Ok(e) => e.collect(),
            Err(e) => break (format!("reading events failed: {e}"), true),
        };
        // Removes first: a fault read in the same batch must see them.
        for ev in &evs {
            if let Event::Remove { start, end } = ev {
                removed.insert(*start, *end);
                st.removed_bytes += end - start;
            }
        }
        let mut faults: Vec<u64> = std::mem::take(&mut deferred);
        faults.extend(evs.iter().filter_map(|e| match e {
            Event::PageFault(pf) => Some(pf.address),
            _ => None,
        }));
        let mut gone = None;
        for addr in faults {
            let Some(m) = maps.iter().find(|m| m.contains(addr)) else {
                continue;
            };
            let ps = m.page_bytes();
            let start = addr - addr % ps;
            let buf = &mut page[..ps as usize];
            let data = if removed.covers(start, start + ps) {
                false
            } else {
                match backing.read(m.offset + (start - m.base_host_virt_addr), buf) {
                    Ok(d) => d,
                    Err(e) => {
                        gone = Some((format!("the snapshot cannot be read: {e}"), true));
                        break;
                    }
                }
            };
            let res = if !data && ps == 4096 {
                uffd.zeropage(start as usize, ps as usize, false)
            } else {
                if !data {
                    buf.fill(0);
                }
                uffd.copy(start as usize, buf, CopyMode::default())
            };
            match res {
                Ok(Resolved::All | Resolved::Partial { .. }) => {
                    if data {
                        st.faults += 1;
                    } else {
                        st.zero_faults += 1;
                    }
                }
                Ok(Resolved::AlreadyPresent) => {
                    let _ = uffd.wake(start as usize, ps as usize);
                }
                // A remove is pending: read it first, then serve this fault.
                Ok(Resolved::EventPending) => deferred.push(addr),
                Err(RangeError::TargetGone { .. }) => {
                    gone = Some(("the VMM exited".into(), false));
                    break;
                }
                Err(e) => {
                    gone = Some((format!("serving {addr:#x} failed: {e}"), true));
                    break;
                }
            }
        }
        if let Some(g) = gone {
            break g;
        }
    };
    st.ended = ended;
    if fatal {
        // Fail closed: the VM's vCPUs get SIGBUS on any page not yet served
        // instead of waiting forever on a server that stopped serving them.
        st.failed_closed = poison_all(uffd, maps);
    }
    st.seconds = t0.elapsed().as_secs_f64();
    st
}

/// Accepts VMs on `listener` until `stop` is set, one thread each; every
/// accept, rejection and finish is passed to `report`.
pub fn serve(
    listener: UnixListener,
    backing: Arc<Backing>,
    stop: Arc<AtomicBool>,
    report: Arc<dyn Fn(ServerEvent) + Send + Sync>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let next = AtomicU64::new(1);
    let threads = Mutex::new(Vec::new());
    while !stop.load(Ordering::Relaxed) {
        match poll_readable([listener.as_fd()], 200) {
            Ok(r) if r[0] => {}
            _ => continue,
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let vm = next.fetch_add(1, Ordering::Relaxed);
        let (backing, stop, report) = (backing.clone(), stop.clone(), report.clone());
        let t = std::thread::Builder::new()
            .name(format!("lp-fc-vm-{vm}"))
            .spawn(move || match handshake(&stream, backing.len()) {
                Ok((uffd, maps)) => {
                    report(ServerEvent::Accepted {
                        vm,
                        regions: maps.clone(),
                    });
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serve_vm(vm, &stream, &uffd, &maps, &backing, &stop)
                    }));
                    let st = served.unwrap_or_else(|_| VmStats {
                        vm,
                        regions: maps.len(),
                        ended: "the serving thread panicked".into(),
                        // Fail closed rather than leave the vCPUs waiting.
                        failed_closed: poison_all(&uffd, &maps),
                        ..VmStats::default()
                    });
                    report(ServerEvent::Finished(st));
                }
                Err(e) => {
                    let reason = e.to_string();
                    let _ = (&stream)
                        .write_all(format!("livepage: handshake rejected: {reason}\n").as_bytes());
                    report(ServerEvent::Rejected { vm, reason });
                }
            })?;
        if let Ok(mut v) = threads.lock() {
            v.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
            v.push(t);
        }
    }
    if let Ok(mut v) = threads.lock() {
        for h in v.drain(..) {
            let _ = h.join();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(base: u64, size: u64, offset: u64, ps: u64) -> String {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{ps}}}"#
        )
    }

    #[test]
    fn good_mappings_parse() {
        let body = format!(
            "[{},{}]",
            m(0x10000, 8192, 0, 4096),
            m(0x40000, 4096, 8192, 4096)
        );
        let maps = parse_mappings(body.as_bytes(), 12288).unwrap();
        assert_eq!(maps.len(), 2);
        // The deprecated field name is accepted too.
        let old = r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#;
        assert_eq!(
            parse_mappings(old.as_bytes(), 4096).unwrap()[0].page_bytes(),
            4096
        );
    }

    #[test]
    fn bad_mappings_are_named() {
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not a JSON array"),
            ("[]".into(), "no guest regions"),
            (format!("[{}]", m(0x10000, 4096, 0, 1000)), "page size 1000"),
            (
                format!("[{}]", m(0x10001, 4096, 0, 4096)),
                "base_host_virt_addr",
            ),
            (format!("[{}]", m(0x10000, 4096, 10, 4096)), "offset"),
            (format!("[{}]", m(0x10000, 0, 0, 4096)), "empty"),
            (
                format!(
                    "[{},{}]",
                    m(0x10000, 8192, 0, 4096),
                    m(0x11000, 4096, 0, 4096)
                ),
                "overlap",
            ),
            (
                format!("[{}]", m(0x10000, 16384, 0, 4096)),
                "ends at byte 16384",
            ),
        ];
        for (body, want) in cases {
            let e = parse_mappings(body.as_bytes(), 8192)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }
}
