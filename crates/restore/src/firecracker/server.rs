//! The server: accept, handshake, one restore engine per VM, watch the VM's
//! socket, report, count.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use livepage_mem::MemoryKind;
use livepage_uffd::poll::{EventFd, PollSet};
use serde::Serialize;

use super::handshake::{GuestRegionUffdMapping, HandshakeError, Refusal, handshake};
use crate::map::{AddressMap, MappedRange};
use crate::options::{Notice, Prefetch, RestoreOptions};
use crate::serve::{Observer, Target, serve};
use crate::source::{ChainSource, PageSource, RawFileSource};
use crate::stats::RestoreStats;
use crate::working_set::WorkingSet;

/// What the VMs' pages are read from.
pub enum Backing {
    /// Firecracker's raw memory snapshot file.
    MemFile {
        /// The file.
        file: Arc<File>,
        /// Its path.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A livepage image (a chain on disk, or an image in a store), its
    /// regions end to end.
    Image {
        /// Its pages.
        source: Arc<dyn PageSource>,
        /// The head's path or address.
        path: PathBuf,
    },
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::MemFile { path, len, .. } => f
                .debug_struct("MemFile")
                .field("path", path)
                .field("len", len)
                .finish(),
            Backing::Image { path, .. } => f.debug_struct("Image").field("path", path).finish(),
        }
    }
}

/// Why a VM's regions cannot be served from the backing.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackingError {
    /// The image's pages differ in size from the VM's.
    #[error(
        "region {index} of the VM has {vm_page_size}-byte pages, the image's region {image_region} \
         {image_page_size}-byte pages (import the memory file with --page-size {vm_page_size})"
    )]
    PageSize {
        /// The VM's region.
        index: usize,
        /// Its page size.
        vm_page_size: u64,
        /// The image's region.
        image_region: usize,
        /// Its page size.
        image_page_size: u64,
    },
    /// A VM region starts inside an image page.
    #[error("region {index} of the VM starts inside a page of the image (offset {offset:#x})")]
    Misaligned {
        /// The VM's region.
        index: usize,
        /// Its offset.
        offset: u64,
    },
    /// The memory file's layout is refused.
    #[error(transparent)]
    MemFile(#[from] crate::source::raw_file::RawFileError),
    /// The ranges do not form a map.
    #[error(transparent)]
    Map(#[from] crate::map::MapError),
}

impl Backing {
    /// Opens a raw memory file.
    pub fn mem_file(path: &Path) -> std::io::Result<Backing> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Backing::MemFile {
            file: Arc::new(file),
            path: path.to_path_buf(),
            len,
        })
    }

    /// Opens an image chain.
    pub fn image(path: &Path) -> Result<Backing, livepage_image::ImageError> {
        Ok(Backing::Image {
            source: Arc::new(ChainSource::open(path)?),
            path: path.to_path_buf(),
        })
    }

    /// Serves an image from any page source (an image in a store), named
    /// `name` in reports.
    pub fn source(name: &str, source: Arc<dyn PageSource>) -> Backing {
        Backing::Image {
            source,
            path: PathBuf::from(name),
        }
    }

    /// Bytes of guest memory it holds.
    pub fn len(&self) -> u64 {
        match self {
            Backing::MemFile { len, .. } => *len,
            Backing::Image { source, .. } => source
                .regions()
                .iter()
                .map(|r| r.pages * r.page_size as u64)
                .sum(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The path of its recorded working set.
    pub fn working_set_path(&self) -> PathBuf {
        let p = match self {
            Backing::MemFile { path, .. } | Backing::Image { path, .. } => path,
        };
        let mut s = p.clone().into_os_string();
        s.push(".wset");
        s.into()
    }

    /// The source and address map serving a VM's mappings.
    fn serve_plan(
        &self,
        maps: &[GuestRegionUffdMapping],
    ) -> Result<(Arc<dyn PageSource>, AddressMap), BackingError> {
        let kind = |ps: u64| {
            if ps == 4096 {
                MemoryKind::Anon
            } else {
                MemoryKind::Hugetlb
            }
        };
        match self {
            Backing::MemFile { file, path, .. } => {
                // One source region per VM region: its bytes at its offset.
                let layout: Vec<(u64, u64, usize)> = maps
                    .iter()
                    .map(|m| (m.offset, m.size, m.page_bytes() as usize))
                    .collect();
                let source = RawFileSource::new(file.clone(), path, &layout)?;
                let ranges = maps
                    .iter()
                    .enumerate()
                    .map(|(i, m)| MappedRange {
                        addr: m.base_host_virt_addr,
                        pages: m.size / m.page_bytes(),
                        page_size: m.page_bytes() as usize,
                        kind: kind(m.page_bytes()),
                        fd: 0,
                        source_region: i,
                        source_first: 0,
                        page_cache: None,
                    })
                    .collect();
                Ok((Arc::new(source), AddressMap::new(ranges)?))
            }
            Backing::Image { source, .. } => {
                // The image's regions end to end; a VM region may span several.
                let regions: Vec<(u64, u64)> = source
                    .regions()
                    .iter()
                    .map(|r| (r.pages * r.page_size as u64, r.page_size as u64))
                    .collect();
                let mut ranges = Vec::new();
                for (i, m) in maps.iter().enumerate() {
                    let ps = m.page_bytes();
                    let (mut off, end) = (m.offset, m.offset + m.size);
                    let mut base = 0u64;
                    for (ri, &(len, page_size)) in regions.iter().enumerate() {
                        let (rs, re) = (base, base + len);
                        base = re;
                        if off >= re || off >= end || end <= rs {
                            continue;
                        }
                        if page_size != ps {
                            return Err(BackingError::PageSize {
                                index: i,
                                vm_page_size: ps,
                                image_region: ri,
                                image_page_size: page_size,
                            });
                        }
                        if (off - rs) % ps != 0 {
                            return Err(BackingError::Misaligned {
                                index: i,
                                offset: m.offset,
                            });
                        }
                        let stop = end.min(re);
                        ranges.push(MappedRange {
                            addr: m.base_host_virt_addr + (off - m.offset),
                            pages: (stop - off) / ps,
                            page_size: ps as usize,
                            kind: kind(ps),
                            fd: 0,
                            source_region: ri,
                            source_first: (off - rs) / ps,
                            page_cache: None,
                        });
                        off = stop;
                    }
                }
                Ok((source.clone(), AddressMap::new(ranges)?))
            }
        }
    }
}

/// What the background does for each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefetchPolicy {
    /// Faults only.
    None,
    /// Untouched pages in address order, following the latest fault.
    #[default]
    Sequential,
    /// The working set recorded for this snapshot first, then sequential.
    Recorded,
}

/// How the server runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Fault handler threads per VM.
    pub handlers: usize,
    /// Background prefetch per VM.
    pub prefetch: PrefetchPolicy,
    /// Record each VM's first-fault order as the snapshot's working set.
    pub record_working_set: bool,
    /// The working set file (default: the backing's path + `.wset`).
    pub working_set: Option<PathBuf>,
    /// Stop accepting after this many VMs were accepted, and return when
    /// they are gone.
    pub max_vms: Option<u64>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handlers: 1,
            prefetch: PrefetchPolicy::Sequential,
            record_working_set: false,
            working_set: None,
            max_vms: None,
        }
    }
}

impl ServerOptions {
    /// Sets the handler threads per VM.
    pub fn handlers(mut self, n: usize) -> Self {
        self.handlers = n;
        self
    }
    /// Sets the prefetch policy.
    pub fn prefetch(mut self, p: PrefetchPolicy) -> Self {
        self.prefetch = p;
        self
    }
    /// Records working sets.
    pub fn record_working_set(mut self, on: bool) -> Self {
        self.record_working_set = on;
        self
    }
    /// Sets the working set file.
    pub fn working_set(mut self, path: Option<PathBuf>) -> Self {
        self.working_set = path;
        self
    }
    /// Sets the most VMs to accept.
    pub fn max_vms(mut self, n: Option<u64>) -> Self {
        self.max_vms = n;
        self
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
    /// Pages.
    pub pages: u64,
    /// Faults that placed a page.
    pub faults: u64,
    /// Pages placed in the background.
    pub prefetched: u64,
    /// Pages answered with zeros (placed as zeros, or discarded).
    pub zero_filled: u64,
    /// Pages of zero runs left to the kernel.
    pub left_to_kernel: u64,
    /// Pages discarded (REMOVE events).
    pub discarded: u64,
    /// Pages the snapshot could not give (poisoned).
    pub lost: u64,
    /// Faults outside the declared regions (poisoned).
    pub outside_faults: u64,
    /// Milliseconds until every page was resident (0: never).
    pub until_resident_ms: f64,
    /// Demand-fault service time p50 (µs).
    pub fault_p50_us: f64,
    /// p99 (µs).
    pub fault_p99_us: f64,
    /// Seconds connected.
    pub seconds: f64,
    /// Why serving ended.
    pub ended: String,
    /// Serving failed (a page was lost, or the VM was failed closed).
    pub failed: bool,
    /// The unserved pages were poisoned while the VM was connected.
    pub failed_closed: bool,
    /// The first error, if any.
    pub error: Option<String>,
}

impl VmStats {
    fn new(vm: u64, maps: &[GuestRegionUffdMapping], st: &RestoreStats) -> VmStats {
        VmStats {
            vm,
            regions: maps.len(),
            bytes: maps.iter().map(|m| m.size).sum(),
            pages: st.pages,
            faults: st.faults_served,
            prefetched: st.prefetched,
            zero_filled: st.zero_filled,
            left_to_kernel: st.left_to_kernel,
            discarded: st.discarded,
            lost: st.lost,
            outside_faults: st.outside_faults,
            until_resident_ms: st.until_resident_ms,
            fault_p50_us: st.fault_p50_us,
            fault_p99_us: st.fault_p99_us,
            ..VmStats::default()
        }
    }
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
        /// The announced regions were poisoned so the VM fails at once.
        failed_closed: bool,
    },
    /// Something worth a line while a VM is served.
    Notice {
        /// Connection number.
        vm: u64,
        /// What.
        message: String,
    },
    /// A VM is gone.
    Finished(VmStats),
}

/// Counters for a metrics endpoint, live.
#[derive(Default)]
pub struct Metrics {
    /// VMs being served now.
    pub connected: AtomicU64,
    /// VMs accepted since start.
    pub accepted: AtomicU64,
    /// Handshakes refused.
    pub rejected: AtomicU64,
    /// VMs whose serving failed.
    pub failed: AtomicU64,
    finished: Mutex<(RestoreStats, Vec<u64>)>,
    live: Mutex<Vec<(u64, Observer)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("connected", &self.connected)
            .field("accepted", &self.accepted)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Sums over every VM, finished and connected: the page counters of a
    /// [`RestoreStats`] and the fault-latency histogram (log2 µs buckets).
    pub fn totals(&self) -> (RestoreStats, Vec<u64>) {
        let (mut t, mut h) = self.finished.lock().map(|f| f.clone()).unwrap_or_default();
        if let Ok(live) = self.live.lock() {
            for (_, o) in live.iter() {
                add(&mut t, &mut h, &o.stats(), &o.latency_buckets());
            }
        }
        (t, h)
    }

    fn finish(&self, vm: u64, st: &RestoreStats, buckets: &[u64]) {
        if let Ok(mut live) = self.live.lock() {
            live.retain(|(v, _)| *v != vm);
        }
        if let Ok(mut f) = self.finished.lock() {
            let (t, h) = &mut *f;
            add(t, h, st, buckets);
        }
    }
}

fn add(t: &mut RestoreStats, h: &mut Vec<u64>, s: &RestoreStats, b: &[u64]) {
    t.pages += s.pages;
    t.faults_served += s.faults_served;
    t.prefetched += s.prefetched;
    t.zero_filled += s.zero_filled;
    t.left_to_kernel += s.left_to_kernel;
    t.discarded += s.discarded;
    t.lost += s.lost;
    t.outside_faults += s.outside_faults;
    if h.len() < b.len() {
        h.resize(b.len(), 0);
    }
    for (x, y) in h.iter_mut().zip(b) {
        *x += y;
    }
}

/// Where the server's events go.
pub type Reporter = Arc<dyn Fn(ServerEvent) + Send + Sync>;

/// Stops a running server from any thread (a signal handler's thread).
#[derive(Debug, Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    fd: Arc<EventFd>,
}

impl Stopper {
    /// Stops accepting; every VM still connected is failed closed.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.fd.signal();
    }
}

/// What a run of the server came to.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// VMs accepted.
    pub accepted: u64,
    /// Handshakes refused.
    pub rejected: u64,
    /// VMs whose serving failed (including those failed closed at a stop).
    pub failed: u64,
}

/// Serves Firecracker VMs from one backing.
#[derive(Debug)]
pub struct Server {
    backing: Backing,
    opts: ServerOptions,
    stopper: Stopper,
    metrics: Arc<Metrics>,
    next: AtomicU64,
    /// Handshakes in progress (they count against `max_vms`).
    pending: AtomicU64,
}

impl Server {
    /// A server of `backing`.
    pub fn new(backing: Backing, opts: ServerOptions) -> std::io::Result<Server> {
        Ok(Server {
            backing,
            opts,
            stopper: Stopper {
                flag: Arc::new(AtomicBool::new(false)),
                fd: Arc::new(EventFd::new()?),
            },
            metrics: Arc::new(Metrics::default()),
            next: AtomicU64::new(1),
            pending: AtomicU64::new(0),
        })
    }

    /// The backing.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// A handle that stops the server.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The live counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    fn stopped(&self) -> bool {
        self.stopper.flag.load(Ordering::SeqCst)
    }

    /// Accepts VMs on `listener` until stopped, or until `max_vms` were
    /// accepted (the listener is then closed); returns once every VM is
    /// gone. Every event goes to `report`.
    pub fn run(&self, listener: UnixListener, report: Reporter) -> std::io::Result<Summary> {
        listener.set_nonblocking(true)?;
        std::thread::scope(|scope| -> std::io::Result<()> {
            let mut listener = Some(listener);
            while let Some(l) = &listener {
                let accepted = self.metrics.accepted.load(Ordering::SeqCst);
                let pending = self.pending.load(Ordering::SeqCst);
                if self.stopped() || self.opts.max_vms.is_some_and(|m| accepted >= m) {
                    // No more VMs: close the listener (a VMM that connects now
                    // is refused at once) and serve the ones here to the end.
                    listener = None;
                    continue;
                }
                PollSet::new([l.as_fd(), self.stopper.fd.as_fd()]).wait(200)?;
                if self.opts.max_vms.is_some_and(|m| accepted + pending >= m) {
                    // Full while handshakes are in flight: wait for them.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
                let Ok((stream, _)) = l.accept() else {
                    continue;
                };
                stream.set_nonblocking(false)?;
                let vm = self.next.fetch_add(1, Ordering::SeqCst);
                self.pending.fetch_add(1, Ordering::SeqCst);
                let report = report.clone();
                std::thread::Builder::new()
                    .name(format!("lp-fc-vm-{vm}"))
                    .spawn_scoped(scope, move || self.serve_vm(vm, stream, report))?;
            }
            Ok(())
        })?;
        Ok(Summary {
            accepted: self.metrics.accepted.load(Ordering::SeqCst),
            rejected: self.metrics.rejected.load(Ordering::SeqCst),
            failed: self.metrics.failed.load(Ordering::SeqCst),
        })
    }

    fn refuse(&self, vm: u64, stream: &UnixStream, r: &Refusal, report: &dyn Fn(ServerEvent)) {
        let failed_closed = r.fail_closed();
        let reason = r.error.to_string();
        let _ =
            (&*stream).write_all(format!("livepage: handshake rejected: {reason}\n").as_bytes());
        self.metrics.rejected.fetch_add(1, Ordering::SeqCst);
        report(ServerEvent::Rejected {
            vm,
            reason,
            failed_closed,
        });
    }

    /// One VM, from handshake to goodbye.
    fn serve_vm(&self, vm: u64, stream: UnixStream, report: Reporter) {
        let t0 = Instant::now();
        let released = || {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        };
        let (uffd, maps) = match handshake(&stream, self.backing.len()) {
            Ok(x) => x,
            Err(r) => {
                released();
                return self.refuse(vm, &stream, &r, &*report);
            }
        };
        // A second handle: the VM can be failed closed if its engine cannot start.
        let spare = uffd.try_clone().ok();
        let refuse_with = |error: HandshakeError, spare: Option<livepage_uffd::Uffd>| {
            released();
            self.refuse(
                vm,
                &stream,
                &Refusal {
                    error,
                    uffd: spare,
                    announced: maps.clone(),
                },
                &*report,
            );
        };
        let (source, map) = match self.backing.serve_plan(&maps) {
            Ok(x) => x,
            Err(e) => return refuse_with(HandshakeError::Backing(e), spare),
        };
        let wset_path = self
            .opts
            .working_set
            .clone()
            .unwrap_or_else(|| self.backing.working_set_path());
        let total: u64 = source.regions().iter().map(|r| r.pages).sum();
        let prefetch = match self.opts.prefetch {
            PrefetchPolicy::None => Prefetch::None,
            PrefetchPolicy::Sequential => Prefetch::Sequential,
            PrefetchPolicy::Recorded => match WorkingSet::load(&wset_path, total) {
                Ok(ws) => Prefetch::Recorded(ws),
                Err(e) => {
                    report(ServerEvent::Notice {
                        vm,
                        message: format!("no recorded working set, prefetching in order: {e}"),
                    });
                    Prefetch::Sequential
                }
            },
        };
        let tell = report.clone();
        let notice: crate::options::NoticeReporter = Arc::new(move |n: &Notice| {
            let message = match n {
                Notice::FaultOutsideMap { addr } => format!(
                    "a fault at {addr:#x} lies outside the regions the handshake declared: failed closed (poisoned)"
                ),
                Notice::Stall(s) => format!(
                    "placing {:#x}+{} has taken {} ms ({})",
                    s.addr, s.len, s.waited_ms, s.worker
                ),
                other => format!("{other:?}"),
            };
            tell(ServerEvent::Notice { vm, message });
        });
        let ropts = RestoreOptions::default()
            .handlers(self.opts.handlers)
            .prefetch(prefetch)
            .record_working_set(self.opts.record_working_set)
            .on_notice(notice);
        let restore = match serve(Target::new(vec![uffd], map), source, ropts) {
            Ok(r) => r,
            Err(e) => return refuse_with(HandshakeError::Engine(Arc::new(e)), spare),
        };
        drop(spare);
        self.metrics.accepted.fetch_add(1, Ordering::SeqCst);
        released();
        self.metrics.connected.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut live) = self.metrics.live.lock() {
            live.push((vm, restore.observer()));
        }
        report(ServerEvent::Accepted {
            vm,
            regions: maps.clone(),
        });
        // Firecracker sends nothing after the handshake: readable means closed.
        let mut set = PollSet::new([stream.as_fd(), self.stopper.fd.as_fd()]);
        let ended = loop {
            if self.stopped() {
                break "the server was stopped";
            }
            if set.wait(-1).is_err() {
                break "waiting on the VM's socket failed";
            }
            if set.ready(0) {
                let mut sink = [0u8; 4096];
                match std::io::Read::read(&mut &stream, &mut sink) {
                    Ok(0) | Err(_) => break "the VMM closed its socket",
                    Ok(_) => {}
                }
            }
        };
        let failed_before = restore.failed();
        let before = restore.stats();
        let buckets = restore.observer().latency_buckets();
        let stopped = self.stopped();
        let (after, error) = restore.stop();
        let mut st = VmStats::new(vm, &maps, if stopped { &after } else { &before });
        st.seconds = t0.elapsed().as_secs_f64();
        st.ended = ended.into();
        // A stop fails the connected VMs closed on purpose: that is a failure.
        st.failed_closed = stopped && after.lost > before.lost;
        st.failed = failed_before || st.failed_closed;
        st.error = error.map(|e| format!("{e:#}"));
        if self.opts.record_working_set {
            if let Some(ws) = &after.working_set {
                let msg = match ws.save(&wset_path) {
                    Ok(()) => format!(
                        "recorded a working set of {} pages in {}",
                        ws.pages.len(),
                        wset_path.display()
                    ),
                    Err(e) => format!("recording the working set failed: {e}"),
                };
                report(ServerEvent::Notice { vm, message: msg });
            }
        }
        self.metrics.finish(vm, &after, &buckets);
        self.metrics.connected.fetch_sub(1, Ordering::SeqCst);
        if st.failed {
            self.metrics.failed.fetch_add(1, Ordering::SeqCst);
        }
        report(ServerEvent::Finished(st));
    }
}
