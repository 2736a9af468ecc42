//! The fault runtime with small policies on real userfaultfds: faults are
//! served by several threads over several fds (each toucher sees its page), a discard pending during an
//! ioctl is drained and the faults read on the way are served, and a policy
//! that panics is reported and fails closed instead of leaving a thread
//! asleep.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_runtime::{Cx, Fault, Policy, Runtime, RuntimeError, RuntimeOptions};
use livepage_uffd::{CopyMode, Event, Features, RegisterMode, Uffd, UffdBuilder};

fn ok(test: &str) -> bool {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() {
        livepage_testutil::skip(test, "no full userfaultfd");
        return false;
    }
    true
}

/// Serves each missing page with its page number in every word; panics on
/// page `panic_at`; on failure poisons the whole region.
struct Numbered {
    fds: Vec<Uffd>,
    region: Arc<Region>,
    slice: usize,
    panic_at: Option<usize>,
    served: AtomicU64,
    removed: Mutex<Vec<(u64, u64)>>,
    failures: AtomicU64,
}

impl Policy for Numbered {
    type Local = Vec<u8>;
    fn fds(&self) -> &[Uffd] {
        &self.fds
    }
    fn local(&self) -> Vec<u8> {
        vec![0u8; 4096]
    }
    fn fault(&self, cx: &mut Cx<'_, Self>, page: &mut Vec<u8>, f: Fault) {
        let addr = f.fault.address as usize & !4095;
        let p = (addr - self.region.addr()) / 4096;
        if Some(p) == self.panic_at {
            panic!("page {p} is cursed");
        }
        for w in page.chunks_mut(8) {
            w.copy_from_slice(&(p as u64).to_ne_bytes());
        }
        cx.resolve(
            f.fd,
            addr,
            4096,
            4096,
            |u, off| u.copy(addr + off, &page[off..], CopyMode::default()),
            |_| {},
        )
        .unwrap();
        self.served.fetch_add(1, Ordering::Relaxed);
    }
    fn event(&self, _fd: usize, ev: Event) {
        if let Event::Remove { start, end } = ev {
            self.removed.lock().unwrap().push((start, end));
        }
    }
    fn fail(&self, _e: &RuntimeError) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        for (i, u) in self.fds.iter().enumerate() {
            let start = self.region.addr() + i * self.slice;
            let _ = u.poison_holes(start, self.slice, 4096, |_| {});
        }
    }
}

fn policy(pages: usize, nfds: usize, panic_at: Option<usize>) -> Arc<Numbered> {
    let region = Arc::new(Region::new(MemoryKind::Anon, pages * 4096).unwrap());
    let slice = pages / nfds * 4096;
    let fds: Vec<Uffd> = (0..nfds)
        .map(|i| {
            let u = UffdBuilder::new()
                .non_blocking(true)
                .features(Features::EVENT_REMOVE)
                .create()
                .unwrap();
            region
                .register_range(&u, i * slice, slice, RegisterMode::MISSING)
                .unwrap();
            u
        })
        .collect();
    Arc::new(Numbered {
        fds,
        region,
        slice,
        panic_at,
        served: AtomicU64::new(0),
        removed: Mutex::new(Vec::new()),
        failures: AtomicU64::new(0),
    })
}

#[test]
fn threads_over_fds_serve_every_page() {
    if !ok("runtime_serves") {
        return;
    }
    for (nfds, threads) in [(1, 1), (1, 3), (4, 2), (2, 2)] {
        let p = policy(1024, nfds, None);
        let mut rt = Runtime::start(p.clone(), RuntimeOptions::new("lp-test", threads)).unwrap();
        let r = p.region.clone();
        let touchers: Vec<_> = (0..3)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..1024 {
                        let pg = (i * (2 * t + 1) + t) % 1024;
                        assert_eq!(r.read_u64(pg * 4096 + 8).unwrap(), pg as u64);
                    }
                })
            })
            .collect();
        for t in touchers {
            t.join().unwrap();
        }
        rt.stop().unwrap();
        // Racing touchers fault the same page more than once; each fault was answered.
        assert!(
            p.served.load(Ordering::Relaxed) >= 1024,
            "{nfds} fds, {threads} threads"
        );
    }
}

#[test]
fn a_discard_pending_during_an_ioctl_is_drained() {
    if !ok("runtime_drain") {
        return;
    }
    let p = policy(256, 1, None);
    let rt = Runtime::start(p.clone(), RuntimeOptions::new("lp-test", 1)).unwrap();
    let r = p.region.clone();
    // Discards of served pages race faults on new ones: the discarding
    // thread blocks until its REMOVE is read, and the placing ioctls meet
    // EAGAIN meanwhile. Every page still ends served, nobody hangs.
    let d = {
        let r = r.clone();
        std::thread::spawn(move || {
            for round in 0..50 {
                let pg = round % 64;
                let _ = r.read_u64(pg * 4096);
                r.discard(pg * 4096, 4096).unwrap();
            }
        })
    };
    for pg in 64..256 {
        assert_eq!(r.read_u64(pg * 4096).unwrap(), pg as u64);
    }
    d.join().unwrap();
    assert_eq!(p.removed.lock().unwrap().len(), 50);
    drop(rt);
}

#[test]
fn a_panicking_policy_fails_closed_and_is_reported() {
    if !ok("runtime_panic") {
        return;
    }
    let p = policy(64, 2, Some(40));
    let mut rt = Runtime::start(p.clone(), RuntimeOptions::new("lp-test", 2)).unwrap();
    let r = p.region.clone();
    assert_eq!(r.read_u64(8).unwrap(), 0);
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    // The cursed page: the policy panics, fails closed, and the read
    // returns with an error instead of sleeping forever.
    assert!(r.read_checked(40 * 4096, &mut b).is_err());
    assert!(r.read_checked(10 * 4096, &mut b).is_err());
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Page 0 was served before and stays.
    assert_eq!(r.read_u64(8).unwrap(), 0);
    let e = rt.stop().unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Panicked { thread, message } if thread.starts_with("lp-test") && message.contains("cursed")),
        "{e}"
    );
    assert_eq!(p.failures.load(Ordering::SeqCst), 1);
}

#[test]
fn a_worker_drains_and_serves_what_it_read() {
    if !ok("runtime_worker") {
        return;
    }
    // No handler threads poll this fd's faults but the worker's own drain:
    // a fault read while draining is served by the worker before it ends.
    let p = policy(16, 1, None);
    let rt = Runtime::start(p.clone(), RuntimeOptions::new("lp-test", 1)).unwrap();
    let r = p.region.clone();
    let toucher = std::thread::spawn(move || r.read_u64(3 * 4096).unwrap());
    let h = rt
        .spawn_worker("lp-worker", |policy: &Numbered, w| {
            let t0 = Instant::now();
            while policy.served.load(Ordering::Relaxed) == 0
                && t0.elapsed() < Duration::from_secs(5)
            {
                let _ = w.split(policy).0.drain(0);
                w.serve_pending(policy);
            }
        })
        .unwrap();
    h.join().unwrap();
    assert_eq!(toucher.join().unwrap(), 3);
    assert!(rt.failure().is_none());
}
