//! A multi-threaded stress in the spirit of uffd-stress: several faulting
//! threads increment per-page counters in random order (the first touch of a
//! missing page happens inside an atomic read-modify-write), two handler
//! threads resolve faults from one uffd with COPY, and a background copier
//! races them copying every page. EEXIST is success followed by a wake. At
//! the end every page's counters and filler bytes are verified.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use livepage_mem::MemoryKind;
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::{CopyMode, Event, EventBuffer, RegisterMode, Resolved, Uffd};

use crate::common::*;

const WORKERS: usize = 4;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn resolve(u: &Uffd, addr: usize, src: &[u8]) {
    match u.copy(addr, src, CopyMode::default()).unwrap() {
        Resolved::All => {}
        Resolved::AlreadyPresent => u.wake(addr, src.len()).unwrap(),
        other => panic!("unexpected {other:?}"),
    }
}

fn stress(kind: MemoryKind, pages: usize, iterations: usize) {
    let Some(r) = region("stress", kind, pages) else {
        return;
    };
    let Some(u) = uffd("stress", kind_features(kind)) else {
        return;
    };
    let ps = r.page_size();
    // Source pages: counters zero, filler bytes a pattern.
    let src: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..pages)
            .map(|p| {
                let mut v = pattern(p, ps);
                v[..8 * WORKERS].fill(0);
                v
            })
            .collect(),
    );
    r.register(&u, RegisterMode::MISSING).unwrap();
    let (u, r) = (Arc::new(u), Arc::new(r));
    let stop = Arc::new(EventFd::new().unwrap());
    let mut handlers = Vec::new();
    for _ in 0..2 {
        let (u, r, src, stop) = (u.clone(), r.clone(), src.clone(), stop.clone());
        handlers.push(std::thread::spawn(move || {
            let mut buf = EventBuffer::new(16);
            let mut served = 0u64;
            loop {
                let ready = poll_readable([std::os::fd::AsFd::as_fd(u.as_ref()), stop.as_fd()], -1)
                    .unwrap();
                if ready[1] {
                    return served;
                }
                for ev in u.read_events(&mut buf).unwrap() {
                    if let Event::PageFault(pf) = ev {
                        let p = (pf.address as usize - r.addr()) / ps;
                        resolve(&u, r.addr() + p * ps, &src[p]);
                        served += 1;
                    }
                }
            }
        }));
    }
    let copier = {
        let (u, r, src) = (u.clone(), r.clone(), src.clone());
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut order: Vec<usize> = (0..pages).collect();
            for i in (1..pages).rev() {
                order.swap(i, xorshift(&mut seed) as usize % (i + 1));
            }
            for p in order {
                resolve(&u, r.addr() + p * ps, &src[p]);
            }
        })
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut seed = 0x1234_5678 + w as u64 * 7919;
                let mut counts = vec![0u64; pages];
                for _ in 0..iterations {
                    let p = xorshift(&mut seed) as usize % pages;
                    let word = (r.addr() + p * ps + 8 * w) as *mut u64;
                    // SAFETY (test): an aligned word inside the region; the region is
                    // only accessed through raw pointers and atomics.
                    let atomic = unsafe { AtomicU64::from_ptr(word) };
                    atomic.fetch_add(1, Ordering::SeqCst);
                    counts[p] += 1;
                }
                counts
            })
        })
        .collect();
    let counts: Vec<Vec<u64>> = within(120, "stress workers", move || {
        workers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    copier.join().unwrap();
    stop.signal();
    let served: u64 = handlers.into_iter().map(|h| h.join().unwrap()).sum();
    let mut buf = vec![0u8; ps];
    for p in 0..pages {
        r.read(p * ps, &mut buf).unwrap();
        for (w, c) in counts.iter().enumerate() {
            let got = u64::from_ne_bytes(buf[8 * w..8 * w + 8].try_into().unwrap());
            assert_eq!(got, c[p], "{kind}: page {p} counter of worker {w}");
        }
        assert_eq!(
            buf[8 * WORKERS..],
            src[p][8 * WORKERS..],
            "{kind}: page {p} filler"
        );
    }
    eprintln!(
        "stress {kind}: {pages} pages, {served} faults served by handlers, the copier did the rest"
    );
}

#[test]
fn stress_anon() {
    stress(MemoryKind::Anon, 2048, 50_000);
}

#[test]
fn stress_shmem() {
    stress(MemoryKind::Shmem, 2048, 50_000);
}

#[test]
fn stress_hugetlb() {
    stress(MemoryKind::Hugetlb, 8, 20_000);
}
