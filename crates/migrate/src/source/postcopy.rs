//! The source's post-copy: the stale set (pages the destination lacks or
//! holds stale), sent at most once each (outside recovery): by the demand
//! server when a fault asks, or by the background push, which restarts
//! near each requested page.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use livepage_mem::PageBitmap;

use super::sender::{Job, Scratch, Senders, Shared};
use crate::error::{MigrateError, spawn_err};
use crate::link::Link;
use crate::plan::{CHUNK_BYTES, conn_of, pieces};
use crate::proto::frame::{Header, Kind, pages, request};

/// Post-copy's page sets, per region.
pub(crate) struct Post {
    /// Stale pages: the destination's copy (or its zeros) is wrong.
    pub(crate) stale: Vec<PageBitmap>,
    /// Stale pages not handed to a connection yet (cleared by whoever
    /// claims one: the push or a demand answer).
    pub(crate) todo: Vec<PageBitmap>,
    /// Where the push goes on: (region, page) packed as region << 48 | page.
    cursor: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) demanded: AtomicU64,
    pub(crate) pushed: AtomicU64,
}

fn pack(region: usize, page: u64) -> u64 {
    (region as u64) << 48 | page
}

fn unpack(c: u64) -> (usize, u64) {
    ((c >> 48) as usize, c & ((1 << 48) - 1))
}

impl Post {
    /// A post-copy whose stale pages are `stale`.
    pub(crate) fn new(stale: Vec<PageBitmap>) -> Post {
        let todo = stale
            .iter()
            .map(|s| {
                let t = PageBitmap::new(s.len());
                for (a, b) in s.runs() {
                    t.set_range(a, b);
                }
                t
            })
            .collect();
        Post {
            stale,
            todo,
            cursor: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            demanded: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
        }
    }

    /// Stale pages in all.
    pub(crate) fn stale_count(&self) -> u64 {
        self.stale.iter().map(|s| s.count() as u64).sum()
    }

    /// Stale pages not sent yet.
    pub(crate) fn unsent(&self) -> u64 {
        self.todo.iter().map(|s| s.count() as u64).sum()
    }

    /// After a reconnect: every stale page the destination does not hold is
    /// to be sent again. Returns how many had been sent (lost in flight).
    pub(crate) fn resend_missing(&self, have: &[livepage_mem::RangeSet]) -> u64 {
        let mut resent = 0;
        for (r, stale) in self.stale.iter().enumerate() {
            let held = have.get(r);
            for (a, b) in stale.runs() {
                for p in a..b {
                    if held.is_some_and(|h| h.contains(p as u64)) {
                        self.todo[r].clear(p);
                    } else if self.todo[r].set(p) {
                        resent += 1;
                    }
                }
            }
        }
        self.cursor.store(0, Ordering::Relaxed);
        resent
    }
}

/// Serves demand requests on `link.demand` until the link dies or closes.
pub(crate) fn spawn_demand(
    link: &Arc<Link>,
    shared: Arc<Shared>,
    post: Arc<Post>,
) -> Result<JoinHandle<()>, MigrateError> {
    let link = link.clone();
    std::thread::Builder::new()
        .name("lp-demand".into())
        .spawn(move || {
            if let Err(e) = serve_demand(&link, &shared, &post) {
                link.fail(format!("demand connection: {e}"));
            }
        })
        .map_err(spawn_err("lp-demand"))
}

fn serve_demand(link: &Link, shared: &Shared, post: &Post) -> Result<(), MigrateError> {
    let conn = &link.demand;
    let mut scratch = Scratch::default();
    let mut payload = Vec::new();
    loop {
        let h = conn.recv(&mut payload)?;
        if h.kind != Kind::Request {
            return Err(MigrateError::Unexpected {
                peer: conn.peer(),
                kind: h.kind,
                why: "came on the demand connection",
            });
        }
        let region = h.region as usize;
        let fits = shared.regions.get(region).is_some_and(|r| {
            h.first
                .checked_add(u64::from(h.count))
                .is_some_and(|e| e <= r.pages() as u64)
        });
        if !fits {
            return Err(MigrateError::Unexpected {
                peer: conn.peer(),
                kind: h.kind,
                why: "asks for pages outside the regions",
            });
        }
        post.requests.fetch_add(1, Ordering::Relaxed);
        // The push goes on right after what was asked for.
        post.cursor.store(
            pack(region, h.first + u64::from(h.count)),
            Ordering::Relaxed,
        );
        let if_stale = h.flags & request::IF_STALE != 0;
        // Classify each page: 0 send its contents, 1 current, 2 sent already.
        let class = |p: u64| -> u8 {
            let p = p as usize;
            if !post.stale[region].get(p) {
                if if_stale { 1 } else { 0 }
            } else if post.todo[region].clear(p) {
                post.demanded.fetch_add(1, Ordering::Relaxed);
                0
            } else {
                2
            }
        };
        let end = h.first + u64::from(h.count);
        let mut p = h.first;
        let mut c = class(p);
        while p < end {
            let mut e = p + 1;
            let mut next = None;
            while e < end {
                let k = class(e);
                if k != c {
                    next = Some(k);
                    break;
                }
                e += 1;
            }
            let n = (e - p) as u32;
            match c {
                0 => {
                    shared.send_pages(conn, &mut scratch, region, p, n, Some(h.id))?;
                }
                k => {
                    let mut r = Header::new(Kind::Pages);
                    r.region = h.region;
                    r.first = p;
                    r.count = n;
                    r.id = h.id;
                    r.flags = pages::REPLY | if k == 1 { pages::CURRENT } else { pages::SENT };
                    conn.send(r, &[])?;
                    shared.count(crate::proto::frame::HEADER_LEN as u64);
                }
            }
            p = e;
            if let Some(k) = next {
                c = k;
            }
        }
    }
}

/// Pushes every stale page not sent yet, from the cursor on (wrapping),
/// then waits for the senders and tells the destination. Returns whether
/// the push finished (false: the link died first).
pub(crate) fn push(link: &Link, senders: &Senders, shared: &Shared, post: &Post) -> bool {
    let n = senders.len();
    loop {
        if link.is_down() {
            return false;
        }
        let Some((region, first)) = next_unsent(post) else {
            break;
        };
        let ps = shared.regions[region].page_size() as u64;
        // Claim a run, within one block and one chunk.
        let (_, max, conn) = pieces(
            region,
            first,
            first + (CHUNK_BYTES / ps).max(1),
            ps,
            CHUNK_BYTES,
            n,
        )
        .next()
        .unwrap_or((first, 1, conn_of(region, first, ps, n)));
        let todo = &post.todo[region];
        let mut count = 0u32;
        while count < max && todo.clear((first + u64::from(count)) as usize) {
            count += 1;
        }
        if count == 0 {
            continue;
        }
        post.pushed.fetch_add(u64::from(count), Ordering::Relaxed);
        post.cursor
            .store(pack(region, first + u64::from(count)), Ordering::Relaxed);
        if !senders.send(
            conn,
            Job::Pages {
                region,
                first,
                count,
            },
        ) {
            return false;
        }
    }
    senders.flush();
    if link.is_down() {
        return false;
    }
    if let Err(e) = link.control.send(Header::new(Kind::PushDone), &[]) {
        link.fail(e);
        return false;
    }
    true
}

/// The next stale page not sent yet, from the cursor (wrapping once).
fn next_unsent(post: &Post) -> Option<(usize, u64)> {
    let (r0, p0) = unpack(post.cursor.load(Ordering::Relaxed));
    let regions = post.todo.len();
    for k in 0..=regions {
        let r = (r0 + k) % regions.max(1);
        let from = if k == 0 { p0 as usize } else { 0 };
        if let Some(p) = post.todo.get(r).and_then(|t| t.next_set(from)) {
            return Some((r, p as u64));
        }
    }
    None
}
