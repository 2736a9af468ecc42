//! Non-cooperative events: remap, remove, unmap and fork (selftest "events").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use livepage_mem::{MemoryKind, RangeSet};
use livepage_uffd::mm::{Advice, Mapping, memfd_create};
use livepage_uffd::{CopyMode, Event, Features, RegisterMode, Resolved};

use crate::common::*;

#[derive(Default)]
struct Seen {
    faults: usize,
    remaps: usize,
    removes: usize,
    unmaps: Vec<(u64, u64)>,
    zero_filled: usize,
}

/// A monitor serving a region that a worker mremap()s, discards and unmaps.
/// Faults are answered with the page's pattern relative to the region's
/// current base; after REMOVE, with zeros.
fn events_on(kind: MemoryKind) {
    const PAGES: usize = 32;
    const PS: usize = 4096;
    let feats = Features::EVENT_REMAP
        | Features::EVENT_REMOVE
        | Features::EVENT_UNMAP
        | kind_features(kind);
    let Some(u) = uffd("events", feats) else {
        return;
    };
    let len = PAGES * PS;
    let (map, _file) = match kind {
        MemoryKind::Anon => (Mapping::anonymous(len, Default::default()).unwrap(), None),
        _ => {
            let f = memfd_create("events", None).unwrap();
            f.set_len(len as u64).unwrap();
            (
                Mapping::file(std::os::fd::AsFd::as_fd(&f), 0, len, true).unwrap(),
                Some(f),
            )
        }
    };
    map.advise(0, len, Advice::NoHugePage).ok();
    // SAFETY (test): the mapping is only touched through raw pointers below.
    unsafe { u.register(map.addr(), len, RegisterMode::MISSING) }.unwrap();
    let (old_base, _) = map.leak();
    let base = Arc::new(AtomicUsize::new(old_base));
    let removed = Arc::new(Mutex::new(RangeSet::new()));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let u = Arc::new(u);
    let (b2, rm2, s2) = (base.clone(), removed.clone(), seen.clone());
    let server = Server::start(u.clone(), move |u, ev| {
        let mut s = s2.lock().unwrap();
        match ev {
            Event::PageFault(pf) => {
                s.faults += 1;
                let off = pf.address as usize - b2.load(Ordering::SeqCst);
                let res = if rm2.lock().unwrap().contains(off as u64) {
                    s.zero_filled += 1;
                    u.zeropage(pf.address as usize, PS, false)
                } else {
                    u.copy(
                        pf.address as usize,
                        &pattern(off / PS, PS),
                        CopyMode::default(),
                    )
                };
                assert!(matches!(
                    res.unwrap(),
                    Resolved::All | Resolved::AlreadyPresent
                ));
            }
            Event::Remap { from, to, len: l } => {
                assert_eq!(
                    (from as usize, l as usize),
                    (b2.load(Ordering::SeqCst), len)
                );
                b2.store(to as usize, Ordering::SeqCst);
                s.remaps += 1;
            }
            Event::Remove { start, end } => {
                let b = b2.load(Ordering::SeqCst) as u64;
                rm2.lock().unwrap().insert(start - b, end - b);
                s.removes += 1;
            }
            Event::Unmap { start, end } => s.unmaps.push((start, end)),
            Event::Fork { .. } => panic!("no fork expected"),
        }
    });
    // A placeholder the area is moved onto (mremap to the same size would not move).
    let (target, _) = Mapping::anonymous(len, Default::default()).unwrap().leak();
    let discard_advice = if kind == MemoryKind::Anon {
        libc::MADV_DONTNEED
    } else {
        libc::MADV_REMOVE
    };
    within(20, "events worker", move || {
        let check = |base: usize, p: usize, want: &[u8]| {
            let got =
                unsafe { std::slice::from_raw_parts((base + p * PS) as *const u8, PS) }.to_vec();
            assert_eq!(got, want, "page {p}");
        };
        for p in 0..PAGES / 2 {
            check(old_base, p, &pattern(p, PS));
        }
        // Move the registered area: the registration and our view follow it.
        let new = unsafe {
            libc::mremap(
                old_base as *mut _,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target as *mut libc::c_void,
            )
        };
        assert_ne!(new, libc::MAP_FAILED);
        let new = new as usize;
        assert_eq!(new, target);
        for p in 0..PAGES {
            check(new, p, &pattern(p, PS));
        }
        // Discard four pages: afterwards they must read as zeros, not stale data.
        assert_eq!(
            unsafe { libc::madvise((new + 4 * PS) as *mut _, 4 * PS, discard_advice) },
            0
        );
        for p in 4..8 {
            check(new, p, &[0u8; PS]);
        }
        assert_eq!(unsafe { libc::munmap(new as *mut _, len) }, 0);
    });
    // munmap's event is read asynchronously; wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let final_unmap = (target as u64, (target + len) as u64);
    while !seen.lock().unwrap().unmaps.contains(&final_unmap)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    server.stop();
    let s = seen.lock().unwrap();
    assert_eq!(s.remaps, 1, "{kind}: remap");
    assert_eq!(s.removes, 1, "{kind}: remove");
    // mremap over the placeholder may report an unmap too; the final munmap must be there.
    assert!(
        s.unmaps.contains(&final_unmap),
        "{kind}: unmap events {:x?}",
        s.unmaps
    );
    assert_eq!(
        s.faults,
        PAGES + 4,
        "{kind}: one fault per page, plus the discarded ones again"
    );
    assert_eq!(s.zero_filled, 4, "{kind}");
}

#[test]
fn events_remap_remove_unmap_anon() {
    events_on(MemoryKind::Anon);
}

#[test]
fn events_remap_remove_unmap_shmem() {
    events_on(MemoryKind::Shmem);
}

/// With EVENT_FORK the child's missing pages fault to the child's context,
/// which the monitor receives as a new fd and serves.
#[test]
fn events_fork_child_served_through_new_fd() {
    let Some(u) = uffd("events_fork", Features::EVENT_FORK) else {
        return;
    };
    let r = livepage_mem::Region::new(MemoryKind::Anon, 4 * 4096).unwrap();
    r.register(&u, RegisterMode::MISSING).unwrap();
    let u = Arc::new(u);
    let child_servers: Arc<Mutex<Vec<Server>>> = Arc::default();
    let parent_faults = Arc::new(AtomicUsize::new(0));
    let (cs, pf2) = (child_servers.clone(), parent_faults.clone());
    let server = Server::start(u.clone(), move |_, ev| match ev {
        Event::Fork { uffd } => {
            assert!(uffd.features().contains(Features::EVENT_FORK));
            let child = Server::start(Arc::new(uffd), |u, ev| {
                if let Event::PageFault(pf) = ev {
                    let page = vec![0xc5u8; 4096];
                    let _ = u.copy(pf.address as usize, &page, CopyMode::default());
                }
            });
            cs.lock().unwrap().push(child);
        }
        Event::PageFault(_) => {
            pf2.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    });
    let addr = r.addr();
    let status = fork_child(|| i32::from(child_read(addr + 4096) != 0xc5));
    assert!(
        exited(status, 0),
        "child must read the page its monitor served (status {status:#x})"
    );
    server.stop();
    for s in child_servers.lock().unwrap().drain(..) {
        s.stop();
    }
    assert_eq!(
        parent_faults.load(Ordering::SeqCst),
        0,
        "the child's fault must not reach the parent's context"
    );
}
