//! Lazy restore: memory equals the source with faulting threads racing the
//! prefetcher, on every memory type; discards read back as zeros; a failing
//! source poisons instead of hanging.
#![allow(clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_restore::{
    MemorySource, PageSource, RestoreError, RestoreOptions, SourceError, start,
};

fn ok(test: &str) -> bool {
    let c = livepage_uffd::probe::capabilities();
    if !c.access.full() {
        livepage_testutil::skip(test, "no full userfaultfd");
        return false;
    }
    true
}

fn content(pages: usize, ps: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * ps];
    for p in 0..pages {
        if p % 5 != 0 {
            // Every fifth page stays zero.
            v[p * ps..(p + 1) * ps]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (p * 31 + i / 8) as u8 | 1);
        }
    }
    v
}

#[test]
fn restored_memory_equals_the_source_under_racing_faults() {
    if !ok("restore_equal") {
        return;
    }
    for kind in [MemoryKind::Anon, MemoryKind::Shmem, MemoryKind::Hugetlb] {
        for prefetch in [true, false] {
            let pages = if kind == MemoryKind::Hugetlb { 8 } else { 2048 };
            let ps = kind.page_size();
            let r = match Region::new(kind, pages * ps) {
                Ok(r) => Arc::new(r),
                Err(e) if kind == MemoryKind::Hugetlb => {
                    livepage_testutil::skip("restore_equal", &e.to_string());
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            let data = content(pages, ps);
            let source = Arc::new(MemorySource {
                regions: vec![data.clone()],
                page_size: vec![ps],
            });
            let restore = start(
                vec![r.clone()],
                source,
                RestoreOptions {
                    handlers: 2,
                    prefetch,
                },
            )
            .unwrap();
            // Three threads touch pages in different orders while the prefetcher runs.
            let threads: Vec<_> = (0..3usize)
                .map(|t| {
                    let r = r.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; ps];
                        let mut sum = 0u64;
                        for i in 0..pages {
                            let p = (i * (2 * t + 1) + t * 7) % pages;
                            r.read(p * ps, &mut buf).unwrap();
                            sum = sum.wrapping_add(u64::from(buf[0]));
                        }
                        sum
                    })
                })
                .collect();
            let t0 = Instant::now();
            for h in threads {
                h.join().unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(60));
            let stats = restore.wait().unwrap();
            let mut now = vec![0u8; pages * ps];
            r.read(0, &mut now).unwrap();
            assert!(
                now == data,
                "{kind} prefetch={prefetch}: restored memory differs from the source"
            );
            assert_eq!(
                stats.faults_served + stats.prefetched,
                pages as u64,
                "{kind}: every page placed once: {stats:?}"
            );
            if !prefetch {
                assert_eq!(stats.prefetched, 0);
            }
        }
    }
}

#[test]
fn discarded_pages_read_back_as_zeros() {
    if !ok("restore_remove") {
        return;
    }
    let pages = 64;
    let r = Arc::new(Region::new(MemoryKind::Anon, pages * 4096).unwrap());
    let data = content(pages, 4096);
    let source = Arc::new(MemorySource {
        regions: vec![data.clone()],
        page_size: vec![4096],
    });
    let restore = start(
        vec![r.clone()],
        source,
        RestoreOptions {
            handlers: 1,
            prefetch: false,
        },
    )
    .unwrap();
    assert_eq!(
        r.read_u64(4096 + 8).unwrap(),
        u64::from_ne_bytes(data[4096 + 8..4096 + 16].try_into().unwrap())
    );
    // A balloon takes pages 1..4: afterwards they are zeros, not image data.
    r.discard(4096, 3 * 4096).unwrap();
    for p in 1..4 {
        assert_eq!(r.read_u64(p * 4096 + 8).unwrap(), 0, "page {p}");
    }
    // Untouched pages still come from the source.
    assert_eq!(
        r.read_u64(10 * 4096 + 8).unwrap(),
        u64::from_ne_bytes(data[10 * 4096 + 8..10 * 4096 + 16].try_into().unwrap())
    );
    drop(restore);
}

struct Failing;
impl PageSource for Failing {
    fn read_page(&self, _r: usize, page: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        if page == 3 {
            return Err(SourceError("the peer went away".into()));
        }
        buf.fill(1);
        Ok(true)
    }
}

#[test]
fn a_failing_source_does_not_hang_anyone() {
    if !ok("restore_failing")
        || !livepage_uffd::probe::capabilities()
            .features
            .contains(livepage_uffd::Features::POISON)
    {
        return;
    }
    let r = Arc::new(Region::new(MemoryKind::Anon, 16 * 4096).unwrap());
    let restore = start(
        vec![r.clone()],
        Arc::new(Failing),
        RestoreOptions {
            handlers: 1,
            prefetch: true,
        },
    )
    .unwrap();
    let res = restore.wait();
    assert!(matches!(res, Err(RestoreError::Source { .. })), "{res:?}");
    // The lost page is poisoned: a kernel-mode read fails at once (EFAULT), a
    // user-mode touch would raise SIGBUS; the other pages are there.
    assert_eq!(r.read_u64(0).unwrap(), u64::from_ne_bytes([1; 8]));
    let mut fds = [0i32; 2];
    // SAFETY (test): plain pipe syscalls on local fds.
    unsafe { libc::pipe(fds.as_mut_ptr()) };
    // SAFETY (test): write from the poisoned page: the kernel refuses with EFAULT.
    let n = unsafe { libc::write(fds[1], (r.addr() + 3 * 4096) as *const libc::c_void, 64) };
    assert_eq!(n, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EFAULT)
    );
}
