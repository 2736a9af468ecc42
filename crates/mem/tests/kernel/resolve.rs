//! Resolving ioctls: zeropage, move (4 KiB and PMD), poison, sigbus, and
//! mmap-changing (every resolving ioctl reports EAGAIN while an event is pending).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use livepage_mem::{MemoryKind, Region};
use livepage_uffd::mm::Advice;
use livepage_uffd::poll::poll_readable;
use livepage_uffd::{
    CopyMode, Errno, Event, EventBuffer, Features, Ioctls, RangeError, RegisterMode, Resolved,
};

use crate::common::*;

#[test]
fn zeropage() {
    for kind in KINDS {
        let Some(r) = region("zeropage", kind, 2) else {
            continue;
        };
        let Some(u) = uffd("zeropage", kind_features(kind)) else {
            return;
        };
        let ioctls = r.register(&u, RegisterMode::MISSING).unwrap();
        let page = r.page_size();
        if ioctls.contains(Ioctls::ZEROPAGE) {
            assert_eq!(
                u.zeropage(r.addr(), page, false).unwrap(),
                Resolved::All,
                "{kind}"
            );
            let mut buf = vec![0xffu8; page];
            r.read(0, &mut buf).unwrap();
            assert!(
                buf.iter().all(|b| *b == 0),
                "{kind}: zeropage must read as zeros"
            );
            assert_eq!(
                u.zeropage(r.addr(), page, false).unwrap(),
                Resolved::AlreadyPresent,
                "{kind}"
            );
        } else {
            assert_eq!(kind, MemoryKind::Hugetlb, "only hugetlb lacks ZEROPAGE");
            let e = u.zeropage(r.addr(), page, false).unwrap_err();
            assert_eq!(e.errno(), Errno::INVAL);
        }
    }
}

/// MISSING faults on dst resolved by moving source pages (selftest "move").
#[test]
fn move_4k_pages() {
    const PAGES: usize = 64;
    let Some(u) = uffd("move", Features::MOVE) else {
        return;
    };
    let dst = Region::new(MemoryKind::Anon, PAGES * 4096).unwrap();
    let src = Region::new(MemoryKind::Anon, PAGES * 4096).unwrap();
    src.advise(0, src.len(), Advice::DontFork).unwrap();
    for p in 0..PAGES {
        src.write(p * 4096, &pattern(p, 4096)).unwrap();
    }
    dst.register(&u, RegisterMode::MISSING).unwrap();
    let u = Arc::new(u);
    let faults = Arc::new(AtomicUsize::new(0));
    let (f2, dst_base, src_base) = (faults.clone(), dst.addr(), src.addr());
    let server = Server::start(u.clone(), move |u, ev| {
        if let Event::PageFault(pf) = ev {
            f2.fetch_add(1, Ordering::SeqCst);
            let off = pf.address as usize - dst_base;
            // SAFETY (test): `src` is a private anon Region only accessed via raw copies.
            let r =
                unsafe { u.move_pages(pf.address as usize, src_base + off, 4096, false, false) };
            assert_eq!(r.unwrap(), Resolved::All);
        }
    });
    let dst = Arc::new(dst);
    let d2 = dst.clone();
    within(20, "move faults", move || {
        for p in 0..PAGES {
            let mut buf = vec![0u8; 4096];
            d2.read(p * 4096, &mut buf).unwrap();
            assert_eq!(buf, pattern(p, 4096), "page {p}");
        }
    });
    server.stop();
    assert_eq!(
        faults.load(Ordering::SeqCst),
        PAGES,
        "exactly one fault per page"
    );
    // The source pages are gone.
    for p in 0..PAGES {
        let e = livepage_uffd::mm::pagemap_entry(src.addr() + p * 4096).unwrap();
        assert_eq!(
            e & livepage_uffd::sys::pagemap_entry::PRESENT,
            0,
            "src page {p} still present"
        );
    }
    // A source hole: ENOENT, unless holes are allowed.
    let dst2 = Region::new(MemoryKind::Anon, 4096).unwrap();
    dst2.register(&u, RegisterMode::MISSING).unwrap();
    let r = unsafe { u.move_pages(dst2.addr(), src.addr(), 4096, false, false) };
    assert!(matches!(r, Err(RangeError::NotRegistered { .. })), "{r:?}");
    let r = unsafe { u.move_pages(dst2.addr(), src.addr(), 4096, false, true) };
    assert_eq!(r.unwrap(), Resolved::All);
}

/// Moving whole 2 MiB blocks between THP regions (selftest "move-pmd").
#[test]
fn move_pmd() {
    const HUGE: usize = 2 << 20;
    let Some(u) = uffd("move_pmd", Features::MOVE) else {
        return;
    };
    let dst = Region::new(MemoryKind::Thp, 2 * HUGE).unwrap();
    let src = Region::new(MemoryKind::Thp, 2 * HUGE).unwrap();
    src.advise(0, src.len(), Advice::DontFork).unwrap();
    for p in 0..(2 * HUGE / 4096) {
        src.write(p * 4096, &pattern(p, 4096)).unwrap();
    }
    dst.register(&u, RegisterMode::MISSING).unwrap();
    let u = Arc::new(u);
    let faults = Arc::new(AtomicUsize::new(0));
    let (f2, db, sb) = (faults.clone(), dst.addr(), src.addr());
    let server = Server::start(u.clone(), move |u, ev| {
        if let Event::PageFault(pf) = ev {
            f2.fetch_add(1, Ordering::SeqCst);
            let block = (pf.address as usize - db) / HUGE * HUGE;
            let r = unsafe { u.move_pages(db + block, sb + block, HUGE, false, false) };
            assert!(matches!(
                r.unwrap(),
                Resolved::All | Resolved::AlreadyPresent
            ));
        }
    });
    let dst = Arc::new(dst);
    let d2 = dst.clone();
    within(20, "move-pmd faults", move || {
        for p in 0..(2 * HUGE / 4096) {
            let mut buf = vec![0u8; 4096];
            d2.read(p * 4096, &mut buf).unwrap();
            assert_eq!(buf, pattern(p, 4096), "page {p}");
        }
    });
    server.stop();
    assert_eq!(
        faults.load(Ordering::SeqCst),
        2,
        "one fault per 2 MiB block"
    );
}

/// Even pages poisoned, odd pages zero-filled: accesses to poisoned pages fail
/// (EFAULT in the kernel, SIGBUS in user mode) (selftest "poison").
#[test]
fn poison() {
    const PAGES: usize = 8;
    for kind in KINDS {
        let Some(r) = region("poison", kind, PAGES) else {
            continue;
        };
        let Some(u) = uffd("poison", Features::POISON | kind_features(kind)) else {
            return;
        };
        r.register(&u, RegisterMode::MISSING).unwrap();
        let ps = r.page_size();
        let zeros = vec![0u8; ps];
        for p in 0..PAGES {
            let addr = r.addr() + p * ps;
            let res = if p % 2 == 0 {
                u.poison(addr, ps, false)
            } else {
                u.copy(addr, &zeros, CopyMode::default())
            };
            assert_eq!(res.unwrap(), Resolved::All, "{kind} page {p}");
        }
        // Poison refuses to overwrite a present page.
        assert_eq!(
            u.poison(r.addr() + ps, ps, false).unwrap(),
            Resolved::AlreadyPresent
        );
        let failed = (0..PAGES)
            .filter(|p| kernel_read(r.addr() + p * ps, 4096) == libc::EFAULT)
            .count();
        assert_eq!(failed, PAGES / 2, "{kind}: accesses refused");
        // Poison markers of private anon memory are copied to a forked child, where
        // a user-mode touch raises SIGBUS. (Shared mappings' page tables are not
        // copied at fork: the child would fault the page from the page cache.)
        if kind != MemoryKind::Anon {
            continue;
        }
        let addr = r.addr();
        let status = fork_child(|| i32::from(child_read(addr)));
        assert!(
            killed_by(status, libc::SIGBUS),
            "{kind}: touching a poisoned page must raise SIGBUS (status {status:#x})"
        );
        let status = fork_child(|| i32::from(child_read(addr + ps)));
        assert!(
            exited(status, 0),
            "{kind}: odd page reads zero (status {status:#x})"
        );
    }
}

/// UFFD_FEATURE_SIGBUS: missing (and WP) faults raise SIGBUS instead of
/// queueing a message, also in a forked child that inherited the context
/// through EVENT_FORK; the monitor sees no fault (selftests "sigbus", "sigbus-wp").
#[test]
fn sigbus_and_sigbus_wp() {
    for kind in KINDS {
        let Some(r) = region("sigbus", kind, 2) else {
            continue;
        };
        let feats = Features::SIGBUS
            | Features::EVENT_FORK
            | Features::PAGEFAULT_FLAG_WP
            | kind_features(kind);
        let Some(u) = uffd("sigbus", feats) else {
            return;
        };
        r.register(&u, RegisterMode::MISSING | RegisterMode::WP)
            .unwrap();
        let (addr, ps) = (r.addr(), r.page_size());
        // Kernel-mode access to a missing page: refused, not reported.
        assert_eq!(kernel_read(addr, 4096), libc::EFAULT, "{kind}");
        let u = Arc::new(u);
        let faults = Arc::new(AtomicUsize::new(0));
        let children = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f2, c2) = (faults.clone(), children.clone());
        let server = Server::start(u.clone(), move |_, ev| match ev {
            Event::PageFault(_) => {
                f2.fetch_add(1, Ordering::SeqCst);
            }
            // Keep the child's context alive until the test ends.
            Event::Fork { uffd } => c2.lock().unwrap().push(uffd),
            _ => {}
        });
        // User-mode access to a missing page in the child: SIGBUS.
        let status = fork_child(|| i32::from(child_read(addr + ps)));
        assert!(
            killed_by(status, libc::SIGBUS),
            "{kind}: missing page in child ({status:#x})"
        );
        // Resolve page 0 write-protected: a read works, a write raises SIGBUS.
        let page = pattern(0, ps);
        let mode = CopyMode {
            write_protect: true,
            ..Default::default()
        };
        assert_eq!(u.copy(addr, &page, mode).unwrap(), Resolved::All);
        assert_eq!(kernel_read(addr, 4096), 0, "{kind}: a present page reads");
        let status = fork_child(|| i32::from(child_read(addr) != page[0]));
        assert!(
            exited(status, 0),
            "{kind}: child reads the copied page ({status:#x})"
        );
        let status = fork_child(|| {
            child_write(addr, 1);
            0
        });
        assert!(
            killed_by(status, libc::SIGBUS),
            "{kind}: write to a WP page in child ({status:#x})"
        );
        // Un-protect: now the write goes through, in the child and here.
        assert_eq!(
            u.write_protect(addr, ps, false, false).unwrap(),
            Resolved::All
        );
        let status = fork_child(|| {
            child_write(addr + 8, 1);
            0
        });
        assert!(
            exited(status, 0),
            "{kind}: write after un-protect ({status:#x})"
        );
        r.write_u64(0, 7).unwrap();
        assert_eq!(r.read_u64(0).unwrap(), 7);
        server.stop();
        assert_eq!(
            faults.load(Ordering::SeqCst),
            0,
            "{kind}: SIGBUS mode must report no fault"
        );
        assert_eq!(
            children.lock().unwrap().len(),
            4,
            "{kind}: one fork event per child"
        );
    }
}

/// While a REMOVE event is unread, every resolving ioctl reports EAGAIN as
/// `EventPending` (selftest "mmap-changing").
#[test]
fn mmap_changing_reports_event_pending() {
    let feats = Features::EVENT_REMOVE
        | Features::MISSING_SHMEM
        | Features::MINOR_SHMEM
        | Features::POISON
        | Features::MOVE;
    let Some(u) = uffd("mmap_changing", feats) else {
        return;
    };
    let r = Arc::new(Region::new(MemoryKind::Shmem, 8 * 4096).unwrap());
    r.register(
        &u,
        RegisterMode::MISSING | RegisterMode::WP | RegisterMode::MINOR,
    )
    .unwrap();
    let r2 = r.clone();
    // This thread blocks inside madvise until the REMOVE event is read.
    let remover = std::thread::spawn(move || r2.discard(0, 4096).unwrap());
    let ready = poll_readable([std::os::fd::AsFd::as_fd(&u)], 5000).unwrap();
    assert!(ready[0], "no REMOVE event queued");
    let page = vec![1u8; 4096];
    let a = r.addr() + 4 * 4096;
    assert_eq!(
        u.copy(a, &page, CopyMode::default()).unwrap(),
        Resolved::EventPending
    );
    assert_eq!(u.zeropage(a, 4096, false).unwrap(), Resolved::EventPending);
    assert_eq!(
        u.continue_range(a, 4096, false, false).unwrap(),
        Resolved::EventPending
    );
    assert_eq!(u.poison(a, 4096, false).unwrap(), Resolved::EventPending);
    assert_eq!(
        u.write_protect(a, 4096, true, false).unwrap(),
        Resolved::EventPending
    );
    let staging = Region::new(MemoryKind::Anon, 4096).unwrap();
    staging.fill(0, 4096, 9).unwrap();
    let mv = unsafe { u.move_pages(a, staging.addr(), 4096, false, false) };
    assert_eq!(mv.unwrap(), Resolved::EventPending);
    assert!(
        !remover.is_finished(),
        "madvise returned before its event was read"
    );
    let mut buf = EventBuffer::new(4);
    let events: Vec<Event> = u.read_events(&mut buf).unwrap().collect();
    assert!(
        matches!(events.as_slice(), [Event::Remove { start, end }] if *start == r.addr() as u64 && *end == r.addr() as u64 + 4096),
        "{events:?}"
    );
    remover.join().unwrap();
    // Now the same copy goes through.
    assert_eq!(
        u.copy(a, &page, CopyMode::default()).unwrap(),
        Resolved::All
    );
}
