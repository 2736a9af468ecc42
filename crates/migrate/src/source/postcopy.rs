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
    /// Stale pages the push claimed (a request for one is told it comes
    /// on a bulk connection; one answered on demand before is sent again).
    pub(crate) pushing: Vec<PageBitmap>,
    /// Where the push goes on: (region, page) packed as region << 48 | page.
    cursor: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) demanded: AtomicU64,
    pub(crate) pushed: AtomicU64,
    /// Pages asked for again and sent again.
    pub(crate) asked_again: AtomicU64,
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
        let todo = stale.iter().map(PageBitmap::snapshot).collect();
        let pushing = stale.iter().map(|s| PageBitmap::new(s.len())).collect();
        Post {
            stale,
            todo,
            pushing,
            cursor: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            demanded: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            asked_again: AtomicU64::new(0),
        }
    }

    /// The stale set as ranges (the list the destination is sent).
    pub(crate) fn stale_sets(&self) -> Vec<livepage_mem::RangeSet> {
        self.stale
            .iter()
            .map(|s| {
                let mut set = livepage_mem::RangeSet::new();
                for (a, b) in s.runs() {
                    set.insert(a as u64, b as u64);
                }
                set
            })
            .collect()
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
                        self.pushing[r].clear(p);
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
        let again = h.flags & request::AGAIN != 0;
        let if_stale = h.flags & request::IF_STALE != 0 && !again;
        // Classify each page: 0 send its contents, 1 current, 2 on its way
        // on a bulk connection.
        let class = |p: u64| -> u8 {
            let p = p as usize;
            if !post.stale[region].get(p) {
                if if_stale { 1 } else { 0 }
            } else if post.todo[region].clear(p) {
                post.demanded.fetch_add(1, Ordering::Relaxed);
                0
            } else if post.pushing[region].get(p) && !again {
                2
            } else {
                // Answered on demand before, or promised and not come: the
                // destination lost it (a placement given up, a recovery).
                post.asked_again.fetch_add(1, Ordering::Relaxed);
                0
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
/// then waits for the senders and tells the destination. The runs queued
/// are claimed by the senders only as they send them, so a page a fault
/// asked for meanwhile goes once, on the demand connection. Returns
/// whether the push finished (false: the link died first).
pub(crate) fn push(link: &Link, senders: &Senders, shared: &Shared, post: &Arc<Post>) -> bool {
    let n = senders.len();
    // The push's own position; a fault's request moves it (the hint).
    let mut hint = post.cursor.load(Ordering::Relaxed);
    let mut pos = unpack(hint);
    loop {
        if link.is_down() {
            return false;
        }
        let h = post.cursor.load(Ordering::Relaxed);
        if h != hint {
            hint = h;
            pos = unpack(h);
        }
        let Some((region, first)) = next_from(post, pos) else {
            // The end: what is queued may still be claimed by a fault, so
            // only an empty set after the senders drained is the end.
            senders.flush();
            if next_from(post, (0, 0)).is_none() {
                break;
            }
            pos = (0, 0);
            continue;
        };
        let ps = shared.regions[region].page_size() as u64;
        let todo = &post.todo[region];
        // A run still to send, within one block and one chunk (paced: a
        // millisecond of the link).
        let bytes = if shared.pace {
            shared.window.chunk(CHUNK_BYTES)
        } else {
            CHUNK_BYTES
        };
        let (_, max, conn) = pieces(region, first, first + (bytes / ps).max(1), ps, bytes, n)
            .next()
            .unwrap_or((first, 1, conn_of(region, first, ps, n)));
        let mut count = 1u32;
        while count < max && todo.get((first + u64::from(count)) as usize) {
            count += 1;
        }
        pos = (region, first + u64::from(count));
        if !senders.send(
            conn,
            Job::Push {
                post: post.clone(),
                region,
                first,
                count,
            },
        ) {
            return false;
        }
    }
    if link.is_down() {
        return false;
    }
    if let Err(e) = link.control.send(Header::new(Kind::PushDone), &[]) {
        link.fail(e);
        return false;
    }
    true
}

/// The next stale page not sent yet at or after `(region, page)`.
fn next_from(post: &Post, (r0, p0): (usize, u64)) -> Option<(usize, u64)> {
    (r0..post.todo.len()).find_map(|r| {
        let from = if r == r0 { p0 as usize } else { 0 };
        post.todo[r].next_set(from).map(|p| (r, p as u64))
    })
}
