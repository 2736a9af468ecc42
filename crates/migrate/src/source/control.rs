//! The source's side of the connections: dialing a generation (control,
//! demand, bulk, each with a hello answered by a welcome), and the control
//! reader that turns the destination's frames into events for the driver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use livepage_mem::RangeSet;

use crate::error::{MigrateError, spawn_err};
use crate::link::{Link, Liveness, Rtt};
use crate::net::{self, Conn, Security};
use crate::proto::frame::{Header, Kind, list};
use crate::proto::msg::{Caps, Hello, MigrationId, RegionShape, Role, Status, Welcome};
use crate::stats::DestReport;

/// What the destination said.
#[derive(Debug)]
pub(crate) enum Event {
    /// Every bulk connection's data up to end marker `id` is applied.
    Drained(u64),
    /// The guest runs at the destination (since its Unix time in ns).
    Resumed(u64),
    /// Every page is resident there (its report, if it sent one).
    Resident(Box<Option<DestReport>>),
    /// It gave up.
    Abort(String),
    /// Part of what it holds (after a reconnect).
    Have {
        region: usize,
        ranges: Vec<(u64, u64)>,
        last: bool,
    },
    /// The link died.
    Down(String),
}

/// Settings for dialing.
#[derive(Clone, Debug)]
pub(crate) struct Dial {
    pub(crate) to: SocketAddr,
    pub(crate) security: Security,
    pub(crate) live: Liveness,
    pub(crate) id: MigrationId,
    pub(crate) shapes: Vec<RegionShape>,
    pub(crate) bulk: u8,
    pub(crate) caps: Caps,
    pub(crate) rtt: Arc<Rtt>,
}

fn open(d: &Dial, role: Role, generation: u32) -> Result<(Conn, Welcome), MigrateError> {
    let conn = net::dial(d.to, &d.security, d.live.dead_after, role == Role::Demand)?;
    let hello = Hello {
        role,
        bulk: d.bulk,
        caps: d.caps,
        migration: d.id,
        generation,
        regions: d.shapes.clone(),
    };
    conn.send(Header::new(Kind::Hello), &hello.encode())?;
    let mut payload = Vec::new();
    let h = conn.recv(&mut payload)?;
    if h.kind != Kind::Welcome {
        return Err(MigrateError::Unexpected {
            peer: d.to,
            kind: h.kind,
            why: "came where a welcome was expected",
        });
    }
    let w =
        Welcome::decode(&payload).map_err(|source| MigrateError::Message { peer: d.to, source })?;
    if w.status == Status::Refused {
        return Err(MigrateError::Refused {
            peer: d.to,
            reason: w.reason,
        });
    }
    Ok((conn, w))
}

/// Dials generation `generation`: control first (its welcome says where
/// the destination is), then demand and bulk.
pub(crate) fn connect(d: &Dial, generation: u32) -> Result<(Arc<Link>, Welcome), MigrateError> {
    let (control, welcome) = open(d, Role::Control, generation)?;
    let (demand, _) = open(d, Role::Demand, generation)?;
    let mut bulk = Vec::new();
    for i in 0..d.bulk {
        bulk.push(Arc::new(open(d, Role::Bulk(i), generation)?.0));
    }
    // Silence on control for dead_after is a dead link; data connections
    // wait as long as they must (heartbeats and the user timeout watch).
    control.set_timeouts(Some(d.live.dead_after), None);
    demand.set_timeouts(None, None);
    for b in &bulk {
        b.set_timeouts(None, None);
    }
    let link = Link::new(
        Arc::new(control),
        Arc::new(demand),
        bulk,
        generation,
        d.rtt.clone(),
    );
    Ok((link, welcome))
}

/// Reads the control connection until the link dies; every frame becomes
/// an event (heartbeats are answered here).
pub(crate) fn spawn_reader(
    link: &Arc<Link>,
    shapes: Vec<RegionShape>,
    events: Sender<Event>,
    window: Arc<crate::window::Window>,
) -> Result<JoinHandle<()>, MigrateError> {
    let link = link.clone();
    std::thread::Builder::new()
        .name("lp-control".into())
        .spawn(move || {
            let why = match read(&link, &shapes, &events, &window) {
                Ok(()) => "closed by the destination".to_string(),
                Err(e) => e.to_string(),
            };
            link.fail(&why);
            let _ = events.send(Event::Down(link.cause()));
        })
        .map_err(spawn_err("lp-control"))
}

fn read(
    link: &Link,
    shapes: &[RegionShape],
    events: &Sender<Event>,
    window: &crate::window::Window,
) -> Result<(), MigrateError> {
    let conn = &link.control;
    let peer = conn.peer();
    let mut payload = Vec::new();
    loop {
        let h = conn.recv(&mut payload)?;
        link.touch();
        let ev = match h.kind {
            Kind::Heartbeat => {
                link.on_heartbeat(&h);
                continue;
            }
            Kind::Ack => {
                window.on_ack(h.id);
                continue;
            }
            Kind::Drained => Event::Drained(h.id),
            Kind::Resumed => Event::Resumed(h.first),
            Kind::Resident => Event::Resident(Box::new(serde_json::from_slice(&payload).ok())),
            Kind::Abort => Event::Abort(String::from_utf8_lossy(&payload).into_owned()),
            Kind::Have => {
                let region = h.region as usize;
                let Some(shape) = shapes.get(region) else {
                    return Err(MigrateError::Unexpected {
                        peer,
                        kind: h.kind,
                        why: "names a region that does not exist",
                    });
                };
                let ranges = crate::proto::msg::decode_ranges(&payload, shape.pages)
                    .map_err(|source| MigrateError::Message { peer, source })?;
                Event::Have {
                    region,
                    ranges,
                    last: h.flags & list::LAST != 0,
                }
            }
            kind => {
                return Err(MigrateError::Unexpected {
                    peer,
                    kind,
                    why: "is not one a destination sends on the control connection",
                });
            }
        };
        if events.send(ev).is_err() {
            return Ok(());
        }
    }
}

/// Sends page ranges as a list of `kind` frames for each region, the last
/// frame flagged (plus `extra` flags on every frame). With `paced` (the
/// window and the base round trip) it goes in 16 KiB frames under the bulk
/// window, which the destination's acknowledgements open: a stale list of
/// tens of thousands of runs is milliseconds of a slow link, and unpaced it
/// would queue the first demand answers behind it.
pub(crate) fn send_list(
    conn: &Conn,
    kind: Kind,
    extra: u8,
    sets: &[RangeSet],
    paced: Option<(&crate::window::Window, std::time::Duration)>,
) -> Result<u64, MigrateError> {
    let mut bytes = 0;
    let n = sets.len();
    let max = if paced.is_some() { 16 << 10 } else { 256 << 10 };
    for (r, set) in sets.iter().enumerate() {
        let payloads = crate::proto::msg::encode_ranges(set.iter(), max);
        let k = payloads.len();
        for (i, p) in payloads.into_iter().enumerate() {
            let mut h = Header::new(kind);
            h.region = r as u16;
            h.flags = extra;
            if r + 1 == n && i + 1 == k {
                h.flags |= list::LAST;
            }
            let len = (crate::proto::frame::HEADER_LEN + p.len()) as u64;
            if let Some((w, rtt)) = paced {
                w.wait_room(rtt, std::time::Duration::from_millis(1), || conn.is_shut());
            }
            conn.send(h, &p)?;
            if let Some((w, _)) = paced {
                w.on_sent(len);
            }
            bytes += len;
        }
    }
    Ok(bytes)
}
