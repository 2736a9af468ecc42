//! Write-protect: markers on unpopulated anon memory and uffd-wp bits across
//! fork, with and without EVENT_FORK (selftests "wp-unpopulated", "wp-fork",
//! "wp-fork-with-event").

use std::sync::{Arc, Mutex};

use livepage_mem::{MemoryKind, Region};
use livepage_uffd::mm::Advice;
use livepage_uffd::{Event, Features, RegisterMode, Resolved, Uffd};

use crate::common::*;

#[test]
fn wp_unpopulated() {
    let Some(u) = uffd(
        "wp_unpopulated",
        Features::WP_UNPOPULATED | Features::PAGEFAULT_FLAG_WP,
    ) else {
        return;
    };
    let r = Arc::new(Region::new(MemoryKind::Anon, 4 * 4096).unwrap());
    r.register(&u, RegisterMode::WP).unwrap();
    let a = r.addr();
    // WP on an empty PTE installs a marker...
    assert_eq!(
        u.write_protect(a, 4096, true, false).unwrap(),
        Resolved::All
    );
    assert!(wp_bit(a), "marker expected on an unpopulated page");
    // ...which un-protect removes.
    assert_eq!(
        u.write_protect(a, 4096, false, false).unwrap(),
        Resolved::All
    );
    assert!(!wp_bit(a));
    // DONTNEED drops a marker; the page then faults in unprotected.
    assert_eq!(
        u.write_protect(a, 4096, true, false).unwrap(),
        Resolved::All
    );
    r.advise(0, 4096, Advice::DontNeed).unwrap();
    assert!(!wp_bit(a), "DONTNEED must drop the marker");
    let r2 = r.clone();
    within(5, "write after the marker was dropped", move || {
        r2.write_u64(0, 1).unwrap()
    });
    assert!(!wp_bit(a));
    // A read of a marker maps the zero page and keeps the protection.
    assert_eq!(
        u.write_protect(a + 4096, 4096, true, false).unwrap(),
        Resolved::All
    );
    assert_eq!(r.read_u64(4096).unwrap(), 0);
    assert!(wp_bit(a + 4096), "a read must keep the marker's protection");
    // The first write to a never-touched protected page is reported as a WP fault.
    assert_eq!(
        u.write_protect(a + 2 * 4096, 4096, true, false).unwrap(),
        Resolved::All
    );
    let u = Arc::new(u);
    let wp_faults = Arc::new(Mutex::new(Vec::new()));
    let w2 = wp_faults.clone();
    let server = Server::start(u.clone(), move |u, ev| {
        if let Event::PageFault(pf) = ev {
            w2.lock()
                .unwrap()
                .push((pf.address, pf.is_wp(), pf.is_write()));
            assert_eq!(
                u.write_protect(pf.address as usize, 4096, false, false)
                    .unwrap(),
                Resolved::All
            );
        }
    });
    let r3 = r.clone();
    within(5, "write to a protected unpopulated page", move || {
        r3.write_u64(2 * 4096, 5).unwrap()
    });
    server.stop();
    assert_eq!(
        *wp_faults.lock().unwrap(),
        vec![((a + 2 * 4096) as u64, true, true)]
    );
    assert_eq!(r.read_u64(2 * 4096).unwrap(), 5);
}

fn wp_fork(with_event: bool) {
    let test = if with_event {
        "wp_fork_with_event"
    } else {
        "wp_fork"
    };
    for kind in KINDS {
        let Some(r) = region(test, kind, 1) else {
            continue;
        };
        let mut feats = Features::PAGEFAULT_FLAG_WP | kind_features(kind);
        if with_event {
            feats |= Features::EVENT_FORK;
        }
        if kind == MemoryKind::Anon {
            feats |= Features::WP_UNPOPULATED;
        } else {
            feats |= Features::WP_HUGETLBFS_SHMEM;
        }
        let Some(u) = uffd(test, feats) else { return };
        r.fill(0, r.page_size(), 0x5a).unwrap();
        r.register(&u, RegisterMode::WP).unwrap();
        let a = r.addr();
        assert_eq!(
            u.write_protect(a, r.page_size(), true, false).unwrap(),
            Resolved::All
        );
        assert!(wp_bit(a), "{kind}: parent protected");
        let u = Arc::new(u);
        let children: Arc<Mutex<Vec<Uffd>>> = Arc::default();
        let c2 = children.clone();
        let server = Server::start(u.clone(), move |_, ev| {
            if let Event::Fork { uffd } = ev {
                c2.lock().unwrap().push(uffd);
            }
        });
        let status = fork_child(|| {
            // The child's own pagemap, opened by path (no allocation).
            let fd = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY) };
            child_wp_bit(fd, a)
        });
        let want = i32::from(with_event);
        assert!(
            exited(status, want),
            "{kind}: child uffd-wp bit should be {want} (status {status:#x})"
        );
        // Zapping a shared page keeps its protection as a marker.
        if kind == MemoryKind::Shmem {
            r.advise(0, r.page_size(), Advice::DontNeed).unwrap();
            assert!(wp_bit(a), "{kind}: marker after zap");
            let status = fork_child(|| {
                let fd = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY) };
                child_wp_bit(fd, a)
            });
            assert!(
                exited(status, want),
                "{kind}: child after zap (status {status:#x})"
            );
        }
        // Un-protect, and the parent's page faults back in writable.
        assert_eq!(
            u.write_protect(a, r.page_size(), false, false).unwrap(),
            Resolved::All
        );
        r.write_u64(0, 1).unwrap();
        server.stop();
        assert_eq!(
            children.lock().unwrap().len(),
            usize::from(with_event) * (1 + usize::from(kind == MemoryKind::Shmem))
        );
    }
}

#[test]
fn wp_fork_without_event_drops_protection() {
    wp_fork(false);
}

#[test]
fn wp_fork_with_event_inherits_protection() {
    wp_fork(true);
}
