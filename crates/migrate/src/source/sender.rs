//! The source's bulk senders: one thread per bulk connection reads the
//! pages it is given from guest memory, sends zero runs without payload,
//! compresses the rest (per chunk, by the policy) and writes the frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::Region;

use crate::codec::{AutoPolicy, Codec, Compressor};
use crate::error::{MigrateError, spawn_err};
use crate::link::Link;
use crate::net::Conn;
use crate::proto::frame::{Header, Kind, pages};
use crate::stats::{Bytes, add};

/// Which phase bytes are counted in.
pub(crate) const PHASE_PRECOPY: u8 = 0;
pub(crate) const PHASE_SWITCHOVER: u8 = 1;
pub(crate) const PHASE_POSTCOPY: u8 = 2;

/// Work for a sender.
pub(crate) enum Job {
    /// Read, split into zero and data runs, send.
    Pages {
        region: usize,
        first: u64,
        count: u32,
    },
    /// Post-copy push: send the pages of the run still to send, claiming
    /// each now (a fault's request may have taken some meanwhile).
    Push {
        post: Arc<super::postcopy::Post>,
        region: usize,
        first: u64,
        count: u32,
    },
    /// This connection's bulk data up to here is done (id: which end).
    End(u64),
    /// Answer once every job before is on the wire.
    Flush(std::sync::mpsc::Sender<()>),
}

/// A sending thread's compressor and read buffer.
#[derive(Default)]
pub(crate) struct Scratch {
    comp: Compressor,
    buf: Vec<u8>,
}

/// What every sender shares.
pub(crate) struct Shared {
    pub(crate) regions: Arc<Vec<Arc<Region>>>,
    pub(crate) policy: Arc<AutoPolicy>,
    pub(crate) bytes: Arc<Bytes>,
    pub(crate) phase: Arc<AtomicU8>,
    /// Post-copy's bound on pushed data in flight.
    pub(crate) window: Arc<crate::window::Window>,
    pub(crate) rtt: Arc<crate::link::Rtt>,
    /// Whether post-copy pushes are paced by the window.
    pub(crate) pace: bool,
    /// Whether pre-copy is paced too (hybrid: its queue must be empty at
    /// the switchover; pure pre-copy keeps every byte of throughput).
    pub(crate) pace_precopy: bool,
}

impl Shared {
    pub(crate) fn count(&self, n: u64) {
        let b = &self.bytes;
        add(
            match self.phase.load(Ordering::Relaxed) {
                PHASE_PRECOPY => &b.precopy,
                PHASE_SWITCHOVER => &b.switchover,
                _ => &b.postcopy,
            },
            n,
        );
    }

    /// Sends pages `[first, first+count)` of `region` on `conn`: zero runs
    /// as ranges, data runs as (compressed) chunks. `reply` is the request
    /// id a demand answer carries. Returns the pages sent with data.
    pub(crate) fn send_pages(
        &self,
        conn: &Conn,
        scratch: &mut Scratch,
        region: usize,
        first: u64,
        count: u32,
        reply: Option<u64>,
    ) -> Result<u64, MigrateError> {
        let Scratch { comp, buf } = scratch;
        let r = &self.regions[region];
        let ps = r.page_size();
        let n = count as usize;
        buf.resize(n * ps, 0);
        r.read(first as usize * ps, buf)?;
        let is_zero = |p: usize| {
            buf[p * ps..(p + 1) * ps]
                .chunks_exact(8)
                .all(|w| w == [0u8; 8])
        };
        let mut data_pages = 0;
        let mut p = 0;
        while p < n {
            let zero = is_zero(p);
            let mut e = p + 1;
            while e < n && is_zero(e) == zero {
                e += 1;
            }
            let mut h = Header::new(Kind::Pages);
            h.region = region as u16;
            h.first = first + p as u64;
            h.count = (e - p) as u32;
            // Bulk data is paced by the window: the link stays full and its
            // queue near empty, so neither a demand answer in post-copy nor
            // (in hybrid, with pre-copy paced too) the first ones after the
            // switchover wait behind it.
            let bulk = reply.is_none();
            let pushed = bulk && self.phase.load(Ordering::Relaxed) == PHASE_POSTCOPY;
            if let Some(id) = reply {
                h.id = id;
                h.flags |= pages::REPLY;
            } else if pushed {
                // Pushed: placed through the restore core, never written
                // over what the guest already uses.
                h.id = crate::proto::frame::PUSHED;
            }
            let paced = if pushed { self.pace } else { self.pace_precopy };
            if bulk && paced {
                let rtt = self.rtt.min().unwrap_or(Duration::from_millis(1));
                // Pre-copy may keep 4 ms of the link queued (its throughput
                // decides when hybrid switches over; a 100 Mbit/s link's
                // window is its round trip anyway); post-copy 1 ms.
                let least = Duration::from_millis(if pushed { 1 } else { 4 });
                self.window.wait_room(rtt, least, || link_down(conn));
            }
            if zero {
                h.flags |= pages::ZERO;
                conn.send(h, &[])?;
                self.count(crate::proto::frame::HEADER_LEN as u64);
                if bulk {
                    self.window.on_sent(crate::proto::frame::HEADER_LEN as u64);
                }
                add(&self.bytes.zero_pages, (e - p) as u64);
            } else {
                let raw = &buf[p * ps..e * ps];
                let (codec, others) = self.policy.choose();
                for &o in others {
                    let t = Instant::now();
                    let len = comp.compress(o, raw).1.len();
                    self.policy.observe(o, raw.len(), len, t.elapsed());
                }
                let t = Instant::now();
                let (used, payload) = comp.compress(codec, raw);
                if codec != Codec::None {
                    self.policy
                        .observe(codec, raw.len(), payload.len(), t.elapsed());
                }
                h.flags |= used.flags();
                conn.send(h, payload)?;
                self.count((crate::proto::frame::HEADER_LEN + payload.len()) as u64);
                if bulk {
                    self.window
                        .on_sent((crate::proto::frame::HEADER_LEN + payload.len()) as u64);
                }
                add(&self.bytes.raw, raw.len() as u64);
                add(&self.bytes.compressed, payload.len() as u64);
                add(&self.bytes.data_pages, (e - p) as u64);
                data_pages += (e - p) as u64;
            }
            p = e;
        }
        Ok(data_pages)
    }
}

/// The sender threads of one link generation.
pub(crate) struct Senders {
    queues: Vec<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Senders {
    /// One thread per bulk connection of `link`.
    pub(crate) fn start(link: &Arc<Link>, shared: Arc<Shared>) -> Result<Senders, MigrateError> {
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for (i, conn) in link.bulk.iter().enumerate() {
            let (tx, rx) = sync_channel::<Job>(8);
            let (link, conn, shared) = (link.clone(), conn.clone(), shared.clone());
            let name = format!("lp-send-{i}");
            threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || run(&link, &conn, &shared, rx))
                    .map_err(spawn_err(&name))?,
            );
            queues.push(tx);
        }
        Ok(Senders { queues, threads })
    }

    /// Bulk connections.
    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }

    /// Queues a job on connection `i` (blocks while its queue is full).
    /// False if the sender is gone (the link died).
    pub(crate) fn send(&self, i: usize, job: Job) -> bool {
        self.queues[i].send(job).is_ok()
    }

    /// Waits until every job queued so far is on the wire.
    pub(crate) fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut asked = 0;
        for q in &self.queues {
            if q.send(Job::Flush(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        for _ in 0..asked {
            if rx.recv().is_err() {
                break;
            }
        }
    }

    /// Sends an end marker on every connection.
    pub(crate) fn end(&self, id: u64) -> bool {
        (0..self.queues.len()).all(|i| self.send(i, Job::End(id)))
    }

    /// Stops the threads (after the queued jobs, or at once if the link died).
    pub(crate) fn stop(self) {
        drop(self.queues);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A shut connection (the link died): a pacing wait gives up.
fn link_down(conn: &Conn) -> bool {
    conn.is_shut()
}

/// Claims the pages of a push run still to send, sends them in runs.
fn push_run(
    shared: &Shared,
    conn: &Conn,
    scratch: &mut Scratch,
    post: &super::postcopy::Post,
    region: usize,
    first: u64,
    count: u32,
) -> Result<(), MigrateError> {
    let todo = &post.todo[region];
    let end = first + u64::from(count);
    let mut p = first;
    while p < end {
        if !todo.clear(p as usize) {
            p += 1;
            continue;
        }
        post.pushing[region].set(p as usize);
        let mut e = p + 1;
        while e < end && todo.clear(e as usize) {
            post.pushing[region].set(e as usize);
            e += 1;
        }
        post.pushed.fetch_add(e - p, Ordering::Relaxed);

        shared.send_pages(conn, scratch, region, p, (e - p) as u32, None)?;
        p = e;
    }
    Ok(())
}

fn run(link: &Link, conn: &Conn, shared: &Shared, rx: Receiver<Job>) {
    let mut scratch = Scratch::default();
    let mut broken = false;
    // A stretch of back-to-back jobs: the link (or this thread) is the
    // bottleneck, so bytes over time measure it.
    let mut stretch: Option<(Instant, u64)> = None;
    let mut last_end = Instant::now();
    for job in rx {
        if broken || link.is_down() {
            // Drain: producers never block on a dead sender.
            if let Job::Flush(done) = job {
                let _ = done.send(());
            }
            continue;
        }
        if last_end.elapsed().as_micros() > 500 {
            stretch = None;
        }
        let (t0, b0) = *stretch.get_or_insert((Instant::now(), conn.counts().0));
        let res = match job {
            Job::Pages {
                region,
                first,
                count,
            } => shared
                .send_pages(conn, &mut scratch, region, first, count, None)
                .map(|_| ()),
            Job::Push {
                post,
                region,
                first,
                count,
            } => push_run(shared, conn, &mut scratch, &post, region, first, count),
            Job::End(id) => {
                let mut h = Header::new(Kind::BulkEnd);
                h.id = id;
                conn.send(h, &[]).map_err(MigrateError::from)
            }
            Job::Flush(done) => {
                let _ = done.send(());
                Ok(())
            }
        };
        if let Err(e) = res {
            broken = true;
            link.fail(format!("bulk connection: {e}"));
        }
        last_end = Instant::now();
        if t0.elapsed().as_millis() >= 100 {
            let sent = conn.counts().0 - b0;
            shared
                .policy
                .observe_link(sent * link.bulk.len() as u64, t0.elapsed());
            stretch = None;
        }
    }
}
