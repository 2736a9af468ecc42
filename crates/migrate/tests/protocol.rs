//! The destination against a scripted source speaking protocol version 2
//! frame by frame: the cases a real source produces only by chance.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_migrate::dest::{DestOptions, Listening};
use livepage_migrate::proto::frame::{HEADER_LEN, Header, Kind, PUSHED, list, pages, request};
use livepage_migrate::proto::msg::{Caps, Hello, MigrationId, Role, Welcome, encode_ranges};
use livepage_migrate::{DestMode, RegionShape, Security};

const PAGES: u64 = 16;

fn send(s: &mut TcpStream, h: Header, payload: &[u8]) {
    s.write_all(&h.encode(payload)).unwrap();
    s.write_all(payload).unwrap();
}

fn recv(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).unwrap();
    let h = Header::decode(&b).unwrap();
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    h.check_payload(&p).unwrap();
    (h, p)
}

fn connect(to: SocketAddr, role: Role, id: MigrationId) -> TcpStream {
    let mut s = TcpStream::connect(to).unwrap();
    // A destination that stops talking fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = Hello {
        role,
        bulk: 1,
        caps: Caps::empty(),
        migration: id,
        generation: 0,
        regions: vec![RegionShape {
            page_size: 4096,
            pages: PAGES,
        }],
    };
    send(&mut s, Header::new(Kind::Hello), &hello.encode());
    let (h, p) = recv(&mut s);
    assert_eq!(h.kind, Kind::Welcome);
    Welcome::decode(&p).unwrap();
    s
}

/// Page `p`'s contents in this test.
fn page(p: u64) -> Vec<u8> {
    vec![p as u8 + 1; 4096]
}

/// A source may answer a request "on a bulk connection" (the push claimed
/// the pages) and the pushed copy may never be placed for that read (the
/// destination gave it up, or asked twice). The read must not wait forever:
/// it asks again with AGAIN and gets the data. (Found as a hang in `bench
/// migrate`: a page asked for twice was promised and never came.)
#[test]
fn pages_promised_and_not_come_are_asked_for_again() {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() {
        livepage_testutil::skip("asked_again", "no full userfaultfd");
        return;
    }
    let listening = Listening::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DestOptions::new(Security::Insecure).mode(DestMode::Missing),
    )
    .unwrap();
    let addr = listening.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let incoming = listening.accept(None).unwrap().unwrap();
        let region = Arc::new(Region::new(MemoryKind::Anon, (PAGES * 4096) as usize).unwrap());
        let mut rx = incoming.receive(vec![region.clone()]).unwrap();
        assert_eq!(rx.switchover().unwrap(), b"device");
        rx.resumed();
        // The guest touches page 3: a remote fault.
        let t = Instant::now();
        let got = region.read_u64(3 * 4096).unwrap();
        let waited = t.elapsed();
        let report = rx.finish().unwrap();
        (got, waited, report)
    });
    let id = MigrationId::random().unwrap();
    let control = Arc::new(Mutex::new(connect(addr, Role::Control, id)));
    let mut demand = connect(addr, Role::Demand, id);
    let mut bulk = connect(addr, Role::Bulk(0), id);
    // Heartbeats, so the link stays alive; the control reader drains the
    // destination's frames and waits for Resident.
    let beat = {
        let c = control.clone();
        std::thread::spawn(move || {
            for _ in 0..100 {
                let mut h = Header::new(Kind::Heartbeat);
                h.first = 1;
                if c.lock().unwrap().write_all(&h.encode(&[])).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut reader = control.lock().unwrap().try_clone().unwrap();
    let resident = std::thread::spawn(move || {
        loop {
            let (h, _) = recv(&mut reader);
            if h.kind == Kind::Resident {
                return;
            }
        }
    });
    send(
        &mut control.lock().unwrap(),
        Header::new(Kind::Switchover),
        b"device",
    );
    let mut h = Header::new(Kind::Stale);
    h.flags = list::LAST;
    let ranges = encode_ranges([(0, PAGES)], 4096);
    send(&mut control.lock().unwrap(), h, &ranges[0]);

    // The fault's request: answered "sent on a bulk connection", and the
    // push never comes.
    let (req, _) = recv(&mut demand);
    assert_eq!(req.kind, Kind::Request);
    assert!(req.first <= 3 && 3 < req.first + u64::from(req.count));
    assert_eq!(req.flags & request::AGAIN, 0);
    let mut a = Header::new(Kind::Pages);
    a.id = req.id;
    a.first = req.first;
    a.count = req.count;
    a.flags = pages::SENT | pages::REPLY;
    send(&mut demand, a, &[]);
    // Asked again, for the same pages, with AGAIN.
    let (again, _) = recv(&mut demand);
    assert_eq!(again.kind, Kind::Request);
    assert_eq!(again.flags & request::AGAIN, request::AGAIN);
    assert_eq!(
        (again.id, again.first, again.count),
        (req.id, req.first, req.count)
    );
    let data: Vec<u8> = (again.first..again.first + u64::from(again.count))
        .flat_map(page)
        .collect();
    let mut a = Header::new(Kind::Pages);
    a.id = again.id;
    a.first = again.first;
    a.count = again.count;
    a.flags = pages::DATA | pages::REPLY;
    send(&mut demand, a, &data);
    // The rest goes by the push; then the destination reports residency.
    let all: Vec<u8> = (0..PAGES).flat_map(page).collect();
    let mut p = Header::new(Kind::Pages);
    p.id = PUSHED;
    p.count = PAGES as u32;
    send(&mut bulk, p, &all);
    send(
        &mut control.lock().unwrap(),
        Header::new(Kind::PushDone),
        &[],
    );
    resident.join().unwrap();
    drop(demand);
    drop(bulk);
    control
        .lock()
        .unwrap()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    let (got, waited, report) = dest.join().unwrap();
    beat.join().unwrap();
    assert_eq!(got, u64::from_ne_bytes([4; 8]));
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(report.asked_again, 1);
}
