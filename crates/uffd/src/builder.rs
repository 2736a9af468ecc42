//! Creating a userfaultfd: `/dev/userfaultfd` or the syscall, then the one
//! UFFDIO_API handshake.
//!
//! # Safety
//!
//! This module issues raw `open`, `syscall(SYS_userfaultfd)` and `ioctl`
//! calls; every struct passed by pointer lives on the caller's stack for the
//! duration of the call, and every fd the kernel returns is owned at once.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use livepage_sys as sys;

use crate::errno::Errno;
use crate::error::CreateError;
use crate::flags::{Features, Ioctls};
use crate::uffd::Uffd;

/// Where a new userfaultfd comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `/dev/userfaultfd` first, the syscall when the device is absent or denied.
    #[default]
    Auto,
    /// Only `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`).
    Device,
    /// Only `userfaultfd(2)`.
    Syscall,
}

/// Builds a [`Uffd`]: opens it, then performs the one UFFDIO_API handshake.
#[derive(Debug, Clone)]
pub struct UffdBuilder {
    close_on_exec: bool,
    non_blocking: bool,
    user_mode_only: bool,
    features: Features,
    source: Source,
}

impl Default for UffdBuilder {
    fn default() -> Self {
        UffdBuilder {
            close_on_exec: true,
            non_blocking: false,
            user_mode_only: false,
            features: Features::empty(),
            source: Source::Auto,
        }
    }
}

impl UffdBuilder {
    /// A builder for a close-on-exec, blocking, full (kernel-mode) userfaultfd.
    pub fn new() -> Self {
        Self::default()
    }
    /// O_CLOEXEC (default on).
    pub fn close_on_exec(mut self, on: bool) -> Self {
        self.close_on_exec = on;
        self
    }
    /// O_NONBLOCK. Required to poll/epoll the fd: a blocking uffd always polls EPOLLERR.
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }
    /// UFFD_USER_MODE_ONLY: needs no privilege, but faults taken in kernel mode
    /// (syscalls, KVM guests) fail with EFAULT instead of being reported.
    pub fn user_mode_only(mut self, on: bool) -> Self {
        self.user_mode_only = on;
        self
    }
    /// Features to enable at the handshake.
    pub fn features(mut self, features: Features) -> Self {
        self.features = features;
        self
    }
    /// Where to get the fd.
    pub fn source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    fn flags(&self) -> i32 {
        let mut flags = 0;
        if self.close_on_exec {
            flags |= libc::O_CLOEXEC;
        }
        if self.non_blocking {
            flags |= libc::O_NONBLOCK;
        }
        if self.user_mode_only {
            flags |= sys::UFFD_USER_MODE_ONLY as i32;
        }
        flags
    }

    /// Opens the fd without the UFFDIO_API handshake (for tests of the
    /// handshake itself; every other ioctl fails with EINVAL on such an fd).
    pub fn open_unhandshaken(&self) -> Result<OwnedFd, CreateError> {
        self.open_raw()
    }

    /// Opens the fd without the handshake.
    pub(crate) fn open_raw(&self) -> Result<OwnedFd, CreateError> {
        let flags = self.flags();
        let device = match self.source {
            Source::Syscall => None,
            _ => Some(open_via_device(flags)),
        };
        let device_errno = match device {
            Some(Ok(fd)) => return Ok(fd),
            Some(Err(e)) => e,
            None => Errno::NOENT,
        };
        if self.source == Source::Device {
            return Err(match device_errno {
                Errno::ACCES | Errno::PERM => CreateError::PermissionDenied {
                    device: device_errno,
                    syscall: Errno::PERM,
                },
                errno => CreateError::Create {
                    via: "/dev/userfaultfd",
                    errno,
                },
            });
        }
        match open_via_syscall(flags) {
            Ok(fd) => Ok(fd),
            Err(Errno::NOSYS) => Err(CreateError::NotSupported),
            Err(Errno::PERM) => Err(CreateError::PermissionDenied {
                device: device_errno,
                syscall: Errno::PERM,
            }),
            Err(errno) => Err(CreateError::Create {
                via: "userfaultfd(2)",
                errno,
            }),
        }
    }

    /// Creates the userfaultfd and performs the UFFDIO_API handshake.
    ///
    /// # Errors
    /// [`CreateError`] names what is missing: a permission (and how to grant
    /// it), the syscall, or a feature the kernel lacks.
    pub fn create(&self) -> Result<Uffd, CreateError> {
        let fd = self.open_raw()?;
        let mut api = sys::uffdio_api {
            api: sys::UFFD_API,
            features: self.features.bits(),
            ioctls: 0,
        };
        // SAFETY: `fd` is a fresh userfaultfd we own; `api` is a valid uffdio_api that
        // outlives the call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) };
        if ret < 0 {
            let errno = Errno::last();
            return Err(match errno {
                Errno::PERM if self.features.contains(Features::EVENT_FORK) => {
                    CreateError::ForkEventNeedsPtrace
                }
                Errno::INVAL => {
                    // The struct is zeroed on failure: learn the supported set on a scratch fd.
                    let supported = UffdBuilder::new()
                        .source(self.source)
                        .user_mode_only(self.user_mode_only)
                        .create()
                        .map(|u| u.supported_features())
                        .unwrap_or_default();
                    CreateError::UnsupportedFeatures {
                        missing: self.features.difference(supported),
                        supported,
                    }
                }
                e => CreateError::Handshake(e),
            });
        }
        let mut enabled = self.features;
        if enabled.contains(Features::WP_ASYNC) {
            // The kernel turns WP_UNPOPULATED on with WP_ASYNC.
            enabled |= Features::WP_UNPOPULATED;
        }
        Ok(Uffd {
            fd,
            enabled,
            supported: Features::from_bits_retain(api.features),
            api_ioctls: Ioctls::from_bits_retain(api.ioctls),
            non_blocking: self.non_blocking,
        })
    }
}

fn open_via_device(flags: i32) -> Result<OwnedFd, Errno> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
        .map_err(Errno::from)?;
    // SAFETY: `dev` is an open /dev/userfaultfd; USERFAULTFD_IOC_NEW takes its flags by
    // value and returns a new fd or -1.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
    if ret < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just installed `ret` as a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

fn open_via_syscall(flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd(2) takes its flags by value and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(ret).map_err(|_| Errno::INVAL)?;
    // SAFETY: the kernel just installed `fd` as a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
