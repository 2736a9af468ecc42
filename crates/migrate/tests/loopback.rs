//! Migrations over loopback inside one process: a writer thread keeps
//! writing into the source's memory, is paused for the switchover and goes
//! on in the destination's memory; the destination's final memory must
//! equal the reference, for every method, both post-copy modes, TLS and
//! compression. Each page crosses at most once in post-copy.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use livepage_mem::MemoryKind;
use livepage_migrate::dest::{DestOptions, Listening};
use livepage_migrate::{
    Compression, Converge, DestMode, DestReport, Method, Security, SourceOptions, SourceReport,
    migrate,
};
use livepage_track::{DirtyTracker, Tracker};

fn ok(test: &str) -> bool {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() || !livepage_uffd::Pagemap::is_supported() {
        livepage_testutil::skip(test, "no full userfaultfd or no PAGEMAP_SCAN");
        return false;
    }
    true
}

struct Case {
    method: Method,
    mode: DestMode,
    src: MemoryKind,
    dst: MemoryKind,
    tls: bool,
    compression: Compression,
    rate: u64,
}

impl Default for Case {
    fn default() -> Self {
        Case {
            method: Method::Hybrid,
            mode: DestMode::Missing,
            src: MemoryKind::Anon,
            dst: MemoryKind::Anon,
            tls: false,
            compression: Compression::None,
            rate: 100_000,
        }
    }
}

const PAGES: u64 = 4096;
const HOT: u64 = 256;
const TOTAL: u64 = 300_000;
const PREFILL: u64 = 60_000;

fn security(tls: bool, dir: &std::path::Path) -> (Security, Security) {
    if tls {
        (
            Security::tls_client(dir, "livepage").unwrap(),
            Security::tls_server(dir).unwrap(),
        )
    } else {
        (Security::Insecure, Security::Insecure)
    }
}

fn run(case: &Case) -> (SourceReport, DestReport) {
    let dir = tempfile::tempdir().unwrap();
    livepage_migrate::tls::generate(dir.path(), &[]).unwrap();
    let (client, server) = security(case.tls, dir.path());
    let listening = Listening::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DestOptions::new(server).mode(case.mode).handlers(2),
    )
    .unwrap();
    let addr = listening.local_addr().unwrap();
    let dst_kind = case.dst;
    let dest = std::thread::spawn(move || {
        let incoming = listening.accept(None).unwrap().unwrap();
        let pages = incoming.regions()[0].pages;
        let region = region(dst_kind, pages);
        let mut rx = incoming.receive(vec![region.clone()]).unwrap();
        let state = rx.switchover().unwrap();
        let next = u64::from_le_bytes(state.try_into().unwrap());
        let w = Writer::new(region.clone(), next, TOTAL, HOT, 0);
        w.run();
        rx.resumed();
        w.wait();
        let report = rx.finish().unwrap();
        (report, whole(&region))
    });
    let src = region(case.src, PAGES);
    let w = Writer::new(src.clone(), 0, PREFILL, HOT, 0);
    w.run();
    w.wait();
    let w = Writer::new(src.clone(), PREFILL, TOTAL, HOT, case.rate);
    w.run();
    let r = src.clone();
    let opts = SourceOptions::new(client)
        .converge(Converge {
            method: case.method,
            downtime_target: Duration::from_millis(50),
            max_rounds: 8,
        })
        .compression(case.compression)
        .connections(2);
    let report = migrate(
        addr,
        vec![src.clone()],
        Box::new(move || Ok(Box::new(DirtyTracker::start(vec![r], None)?) as Box<dyn Tracker>)),
        &mut Hooks(w.clone()),
        opts,
    )
    .unwrap();
    let (dest_report, got) = dest.join().unwrap();
    let want = reference(TOTAL, PAGES, HOT);
    assert_eq!(
        first_diff(&got, &want),
        None,
        "{:?} {:?}",
        case.method,
        case.mode
    );
    (report, dest_report)
}

#[test]
fn every_method_reaches_the_reference_in_missing_mode() {
    if !ok("every_method_missing") {
        return;
    }
    for method in [
        Method::StopAndCopy,
        Method::Precopy,
        Method::Postcopy,
        Method::Hybrid,
    ] {
        let (s, d) = run(&Case {
            method,
            ..Case::default()
        });
        eprintln!(
            "{method:?}: total {:.1} ms downtime {:.2} ms rounds {} postcopy pages {} remote faults {} bytes {:?}",
            s.total_ms,
            s.downtime_ms,
            s.rounds.len(),
            s.postcopy_pages,
            d.remote_faults,
            s.bytes
        );
        if matches!(method, Method::Postcopy | Method::Hybrid) {
            // Each stale page crossed once: pushed or demanded.
            assert!(
                s.pushed_pages + s.demanded_pages <= s.postcopy_pages,
                "{s:?}"
            );
        }
    }
}

#[test]
fn minor_mode_on_shmem_with_tls_and_compression() {
    if !ok("minor_mode_tls") {
        return;
    }
    // Raw chunks are larger than a TLS record: they must cross whole.
    for (method, compression) in [
        (Method::Postcopy, Compression::None),
        (Method::Hybrid, Compression::Lz4),
    ] {
        let (s, d) = run(&Case {
            method,
            mode: DestMode::Minor,
            src: MemoryKind::Shmem,
            dst: MemoryKind::Shmem,
            tls: true,
            compression,
            ..Case::default()
        });
        assert!(s.tls && d.tls);
        if compression == Compression::Lz4 {
            assert!(s.compression_ratio < 0.8, "{}", s.compression_ratio);
        }
    }
}
