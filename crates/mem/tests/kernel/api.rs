//! UFFDIO_API handshake rules (selftest "UFFDIO_API", syscall and /dev/userfaultfd).

use std::os::fd::AsFd;

use livepage_testutil::require;
use livepage_uffd::probe::capabilities;
use livepage_uffd::{CreateError, Features, Ioctls, Source, UffdBuilder, reference, sys};

fn errno() -> i32 {
    reference::errno()
}

#[test]
fn handshake_rules_device_and_syscall() {
    require!(
        capabilities().access.full(),
        "no full userfaultfd: {:?}",
        capabilities().access.advice()
    );
    for source in [Source::Device, Source::Syscall] {
        let b = UffdBuilder::new().source(source);
        let open = || {
            b.open_unhandshaken()
                .unwrap_or_else(|e| panic!("{source:?}: {e}"))
        };

        // Nothing but UFFDIO_API works before the handshake.
        let fd = open();
        let mut msgs = [sys::uffd_msg::default(); 1];
        assert_eq!(reference::read_msgs(fd.as_fd(), &mut msgs), -1);
        assert_eq!(errno(), libc::EINVAL, "{source:?}: read before UFFDIO_API");

        // A wrong api version is rejected.
        let (r, _) = reference::api(open().as_fd(), 0xAB, 0);
        assert_eq!((r, errno()), (-1, libc::EINVAL), "{source:?}: wrong api");

        // An unknown feature bit is rejected and the struct zeroed.
        let (r, a) = reference::api(open().as_fd(), sys::UFFD_API, 1 << 63);
        assert_eq!(
            (r, errno()),
            (-1, libc::EINVAL),
            "{source:?}: feature bit 63"
        );
        assert_eq!(a.features, 0);

        // A normal handshake reports every feature and the fd-level ioctls...
        let fd = open();
        let (r, a) = reference::api(fd.as_fd(), sys::UFFD_API, 0);
        assert_eq!(r, 0, "{source:?}: normal handshake");
        let ioctls = Ioctls::from_bits_retain(a.ioctls);
        assert!(ioctls.contains(Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER));
        assert_eq!(
            Features::from_bits_retain(a.features),
            capabilities().features
        );
        // ...and succeeds only once per fd.
        let (r, _) = reference::api(fd.as_fd(), sys::UFFD_API, 0);
        assert_eq!(
            (r, errno()),
            (-1, libc::EINVAL),
            "{source:?}: second UFFDIO_API"
        );
    }
}

#[test]
fn builder_reports_unsupported_features() {
    require!(capabilities().access.full(), "no full userfaultfd");
    let bogus = Features::from_bits_retain(1 << 63);
    match UffdBuilder::new()
        .features(Features::MISSING_SHMEM | bogus)
        .create()
    {
        Err(CreateError::UnsupportedFeatures { missing, supported }) => {
            assert_eq!(missing, bogus);
            assert!(supported.contains(Features::MISSING_SHMEM));
        }
        other => panic!("expected UnsupportedFeatures, got {other:?}"),
    }
    // WP_ASYNC turns WP_UNPOPULATED on.
    if capabilities().features.contains(Features::WP_ASYNC) {
        let u = UffdBuilder::new()
            .features(Features::WP_ASYNC)
            .create()
            .unwrap();
        assert!(u.features().contains(Features::WP_UNPOPULATED));
    }
}

#[test]
fn user_mode_only_refuses_kernel_faults() {
    use livepage_mem::{MemoryKind, Region};
    use livepage_uffd::RegisterMode;
    let u = UffdBuilder::new().user_mode_only(true).create();
    require!(
        u.is_ok(),
        "user-mode-only userfaultfd unavailable: {:?}",
        u.err()
    );
    let u = u.unwrap();
    let r = Region::new(MemoryKind::Anon, 4096).unwrap();
    r.register(&u, RegisterMode::MISSING).unwrap();
    // A syscall reading the missing page takes a kernel-mode fault: refused with
    // EFAULT instead of being reported (why KVM guests need a full uffd).
    assert_eq!(crate::common::kernel_read(r.addr(), 4096), libc::EFAULT);
}
