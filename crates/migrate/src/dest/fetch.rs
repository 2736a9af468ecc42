//! The destination's page source for post-copy: a fault's read asks the
//! source on the demand connection (pipelined, by request id) and waits
//! for the answer, or for the page to arrive from the background push,
//! whichever comes first. Pages the push brings while a fault holds them
//! are handed to that fault's read. While the link is down a read fails
//! fatally: the restore core parks the fault until the link is back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use livepage_mem::Region;
use livepage_restore::{Lane, PageSource, SourceError, SourceRegion};

use crate::link::Link;
use crate::proto::frame::{Header, Kind, request};

struct Pending {
    region: usize,
    first: u64,
    buf: Vec<u8>,
    filled: Vec<bool>,
    left: usize,
    failed: bool,
    /// When the source first said pages of this read come on a bulk
    /// connection.
    promised: Option<std::time::Instant>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// (region, page) → the request waiting for it.
    index: HashMap<(usize, u64), u64>,
    /// Pages pushed while a placer held them, before its read asked.
    orphans: HashMap<(usize, u64), Vec<u8>>,
}

/// What an answer says about its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer<'a> {
    /// Their contents.
    Data(&'a [u8]),
    /// Zeros.
    Zero,
    /// The copy already here is current.
    Current,
    /// They come on a bulk connection.
    Sent,
}

/// The post-copy page source.
pub(crate) struct Fetcher {
    shapes: Vec<SourceRegion>,
    regions: Vec<Arc<Region>>,
    /// Ask "send if stale" (minor mode, until the stale set is applied).
    if_stale: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    link: RwLock<Option<Arc<Link>>>,
    pub(crate) kept_current: AtomicU64,
    /// Reads that asked again for pages promised and not come.
    pub(crate) asked_again: AtomicU64,
}

impl Fetcher {
    pub(crate) fn new(regions: Vec<Arc<Region>>, if_stale: bool) -> Fetcher {
        Fetcher {
            shapes: regions
                .iter()
                .map(|r| SourceRegion {
                    page_size: r.page_size(),
                    pages: r.pages() as u64,
                })
                .collect(),
            regions,
            if_stale: AtomicBool::new(if_stale),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            link: RwLock::new(None),
            kept_current: AtomicU64::new(0),
            asked_again: AtomicU64::new(0),
        }
    }

    /// Reads go to this link from now on.
    pub(crate) fn set_link(&self, link: Option<Arc<Link>>) {
        let down = link.is_none();
        if let Ok(mut l) = self.link.write() {
            *l = link;
        }
        if down {
            // Every read waiting on the old link fails (and is parked by
            // the restore core, then asked again on the new one).
            if let Ok(mut s) = self.state.lock() {
                for p in s.pending.values_mut() {
                    p.failed = true;
                }
                s.index.clear();
            }
            self.cv.notify_all();
        }
    }

    /// The stale set is applied: pages not resident are stale; no more
    /// "send if stale".
    pub(crate) fn stale_known(&self) {
        self.if_stale.store(false, Ordering::SeqCst);
    }

    fn gone(&self, why: &str) -> SourceError {
        SourceError::PeerGone {
            peer: "migration source".into(),
            doing: "asking for pages",
            source: Arc::new(std::io::Error::other(why.to_string())),
        }
    }

    /// Applies an answer (or pushed data) for pages `[first, first+count)`
    /// of `region` to the reads waiting for them; `id` None: by page.
    pub(crate) fn answer(
        &self,
        id: Option<u64>,
        region: usize,
        first: u64,
        count: u64,
        a: Answer<'_>,
    ) {
        let Some(shape) = self.shapes.get(region) else {
            return;
        };
        let ps = shape.page_size;
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let mut any = false;
        for k in 0..count {
            let page = first + k;
            let rid = match id {
                Some(i) => i,
                None => match s.index.get(&(region, page)) {
                    Some(i) => *i,
                    None => {
                        // Pushed while held by a placer whose read has not
                        // asked yet: kept for it.
                        if let Answer::Data(d) = a {
                            let off = k as usize * ps;
                            s.orphans.insert((region, page), d[off..off + ps].to_vec());
                        } else if a == Answer::Zero {
                            s.orphans.insert((region, page), vec![0; ps]);
                        }
                        continue;
                    }
                },
            };
            let Some(p) = s.pending.get_mut(&rid) else {
                continue;
            };
            if p.region != region || page < p.first {
                continue;
            }
            let i = (page - p.first) as usize;
            if i >= p.filled.len() || p.filled[i] {
                continue;
            }
            let dst = &mut p.buf[i * ps..(i + 1) * ps];
            match a {
                Answer::Data(d) => dst.copy_from_slice(&d[k as usize * ps..(k as usize + 1) * ps]),
                Answer::Zero => dst.fill(0),
                Answer::Current => {
                    // What was pre-copied here is current: keep it.
                    let r = &self.regions[region];
                    let off = page as usize * ps;
                    let ok = if r.alias_addr().is_some() {
                        r.read_alias(off, dst).is_ok()
                    } else {
                        r.read(off, dst).is_ok()
                    };
                    if !ok {
                        p.failed = true;
                    }
                    self.kept_current.fetch_add(1, Ordering::Relaxed);
                }
                Answer::Sent => {
                    p.promised.get_or_insert_with(std::time::Instant::now);
                    continue;
                }
            }
            p.filled[i] = true;
            p.left -= 1;
            s.index.remove(&(region, page));
            any = true;
        }
        drop(s);
        if any {
            self.cv.notify_all();
        }
    }
}

impl PageSource for Fetcher {
    fn regions(&self) -> Vec<SourceRegion> {
        self.shapes.clone()
    }

    fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
        _lane: Lane,
    ) -> Result<bool, SourceError> {
        let shape = *self
            .shapes
            .get(region)
            .ok_or(SourceError::NoRegion { region })?;
        let ps = shape.page_size;
        let n = buf.len() / ps;
        let link = self
            .link
            .read()
            .ok()
            .and_then(|l| l.clone())
            .ok_or_else(|| self.gone("the link is down"))?;
        let mut s = self.state.lock().map_err(|_| self.gone("state poisoned"))?;
        let id = s.next_id;
        s.next_id += 1;
        let mut p = Pending {
            region,
            first,
            buf: vec![0; n * ps],
            filled: vec![false; n],
            left: n,
            failed: false,
            promised: None,
        };
        for i in 0..n {
            if let Some(d) = s.orphans.remove(&(region, first + i as u64)) {
                p.buf[i * ps..(i + 1) * ps].copy_from_slice(&d);
                p.filled[i] = true;
                p.left -= 1;
            } else {
                s.index.insert((region, first + i as u64), id);
            }
        }
        // The runs still missing, asked in one pipelined burst.
        let runs = missing_runs(first, &p.filled);
        s.pending.insert(id, p);
        drop(s);
        let flags = if self.if_stale.load(Ordering::SeqCst) {
            request::IF_STALE
        } else {
            0
        };
        Self::ask(&link, id, region, &runs, flags);
        let mut s = self.state.lock().map_err(|_| self.gone("state poisoned"))?;
        loop {
            let Some(p) = s.pending.get_mut(&id) else {
                return Err(self.gone("the request was dropped"));
            };
            if p.left == 0 {
                break;
            }
            if p.failed || link.is_down() {
                let p = s.pending.remove(&id);
                if p.is_some() {
                    for i in 0..n {
                        if s.index.get(&(region, first + i as u64)) == Some(&id) {
                            s.index.remove(&(region, first + i as u64));
                        }
                    }
                }
                return Err(self.gone(&link.cause()));
            }
            // Promised on a bulk connection and not come: ask again for
            // the data itself (the source sends it whatever it sent before).
            if p.promised.is_some_and(|t| t.elapsed() > AGAIN_AFTER) {
                p.promised = None;
                let missing = missing_runs(first, &p.filled);
                self.asked_again.fetch_add(1, Ordering::Relaxed);
                Self::ask(&link, id, region, &missing, request::AGAIN);
            }
            let (g, _) = self
                .cv
                .wait_timeout(s, std::time::Duration::from_millis(50))
                .map_err(|_| self.gone("state poisoned"))?;
            s = g;
        }
        let p = s.pending.remove(&id).expect("checked above");
        drop(s);
        buf.copy_from_slice(&p.buf);
        Ok(buf.iter().any(|b| *b != 0))
    }
}

/// How long a read waits for pages promised on a bulk connection before it
/// asks for them again.
const AGAIN_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// The runs of pages not filled yet, as (first page, count).
fn missing_runs(first: u64, filled: &[bool]) -> Vec<(u64, u32)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < filled.len() {
        if filled[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < filled.len() && !filled[i] {
            i += 1;
        }
        runs.push((first + start as u64, (i - start) as u32));
    }
    runs
}

impl Fetcher {
    /// Sends requests for `runs` of `region` under request `id`.
    fn ask(link: &Link, id: u64, region: usize, runs: &[(u64, u32)], flags: u8) {
        for &(f, c) in runs {
            let mut h = Header::new(Kind::Request);
            h.id = id;
            h.region = region as u16;
            h.first = f;
            h.count = c;
            h.flags = flags;
            if let Err(e) = link.demand.send(h, &[]) {
                link.fail(format!("demand connection: {e}"));
            }
        }
    }
}
