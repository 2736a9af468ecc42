//! MINOR mode: pages filled through the alias, faults resolved with CONTINUE
//! (selftests "minor", "minor-wp").

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use livepage_mem::MemoryKind;
use livepage_uffd::{Event, Features, RegisterMode, Resolved};

use crate::common::*;

fn flipped(p: usize, len: usize) -> Vec<u8> {
    pattern(p, len).into_iter().map(|b| !b).collect()
}

fn minor(with_wp: bool) {
    let test = if with_wp { "minor_wp" } else { "minor" };
    for kind in [MemoryKind::Shmem, MemoryKind::Hugetlb] {
        const PAGES: usize = 4;
        let Some(r) = region(test, kind, PAGES) else {
            continue;
        };
        let minor_feat = if kind == MemoryKind::Shmem {
            Features::MINOR_SHMEM
        } else {
            Features::MINOR_HUGETLBFS
        };
        let mut feats = minor_feat;
        if with_wp {
            feats |= Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM;
        }
        let Some(u) = uffd(test, feats) else { return };
        let ps = r.page_size();
        // Populate the page cache through the unregistered alias: no fault.
        for p in 0..PAGES {
            r.write_alias(p * ps, &pattern(p, ps)).unwrap();
        }
        let mode = if with_wp {
            RegisterMode::MINOR | RegisterMode::WP
        } else {
            RegisterMode::MINOR
        };
        r.register(&u, mode).unwrap();
        let r = Arc::new(r);
        let u = Arc::new(u);
        let (minor_faults, wp_faults) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (m2, w2, r2) = (minor_faults.clone(), wp_faults.clone(), r.clone());
        let server = Server::start(u.clone(), move |u, ev| {
            let Event::PageFault(pf) = ev else { return };
            let page = (pf.address as usize - r2.addr()) / ps * ps;
            if pf.is_minor() {
                m2.fetch_add(1, Ordering::SeqCst);
                // Change the contents through the alias before mapping them.
                r2.write_alias(page, &flipped(page / ps, ps)).unwrap();
                let res = u
                    .continue_range(r2.addr() + page, ps, false, with_wp)
                    .unwrap();
                assert_eq!(res, Resolved::All);
            } else if pf.is_wp() {
                w2.fetch_add(1, Ordering::SeqCst);
                assert_eq!(
                    u.write_protect(r2.addr() + page, ps, false, false).unwrap(),
                    Resolved::All
                );
            }
        });
        let r3 = r.clone();
        within(20, "minor faults", move || {
            for p in 0..PAGES {
                let mut buf = vec![0u8; ps];
                r3.read(p * ps, &mut buf).unwrap();
                assert_eq!(buf, flipped(p, ps), "page {p}");
                if with_wp {
                    r3.write_u64(p * ps, 0xdead).unwrap();
                }
            }
        });
        server.stop();
        assert_eq!(
            minor_faults.load(Ordering::SeqCst),
            PAGES,
            "{kind}: one minor fault per page"
        );
        assert_eq!(
            wp_faults.load(Ordering::SeqCst),
            if with_wp { PAGES } else { 0 },
            "{kind}"
        );
        // A second CONTINUE of a mapped page is EEXIST.
        assert_eq!(
            u.continue_range(r.addr(), ps, false, false).unwrap(),
            Resolved::AlreadyPresent
        );
    }
}

#[test]
fn minor_continue() {
    minor(false);
}

#[test]
fn minor_wp_continue() {
    minor(true);
}
