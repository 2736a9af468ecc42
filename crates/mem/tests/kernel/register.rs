//! Register ioctls per mode and memory type (selftest "register-ioctls").

use livepage_mem::MemoryKind;
use livepage_uffd::{Errno, Features, Ioctls, RegisterMode};

use crate::common::{KINDS, kind_features, region, uffd};

#[test]
fn register_ioctls_every_mode_combination() {
    for kind in KINDS {
        let Some(r) = region("register_ioctls", kind, 1) else {
            continue;
        };
        for bits in 0..8u64 {
            let mode = RegisterMode::from_bits_retain(bits);
            let feats = kind_features(kind)
                | match kind {
                    MemoryKind::Shmem => Features::MINOR_SHMEM,
                    MemoryKind::Hugetlb => Features::MINOR_HUGETLBFS,
                    _ => Features::empty(),
                };
            let Some(u) = uffd("register_ioctls", feats) else {
                return;
            };
            let res = r.register(&u, mode);
            let must_fail =
                mode.is_empty() || (kind == MemoryKind::Anon && mode.contains(RegisterMode::MINOR));
            if must_fail {
                let e = res.expect_err("mode must be rejected");
                match e {
                    livepage_mem::RegionError::Register { source, .. } => {
                        assert_eq!(source.errno(), Errno::INVAL, "{kind} {mode:?}")
                    }
                    other => panic!("{other}"),
                }
                continue;
            }
            let ioctls = res.unwrap_or_else(|e| panic!("{kind} {mode:?}: {e}"));
            assert!(ioctls.contains(Ioctls::WAKE), "{kind} {mode:?}: {ioctls:?}");
            if mode.contains(RegisterMode::MISSING) {
                assert!(ioctls.contains(Ioctls::COPY), "{kind} {mode:?}: {ioctls:?}");
            }
            if mode.contains(RegisterMode::WP) {
                assert!(
                    ioctls.contains(Ioctls::WRITEPROTECT),
                    "{kind} {mode:?}: {ioctls:?}"
                );
            }
            if mode.contains(RegisterMode::MINOR) {
                assert!(
                    ioctls.contains(Ioctls::CONTINUE),
                    "{kind} {mode:?}: {ioctls:?}"
                );
            }
            r.unregister(&u).unwrap();
        }
    }
}
