//! The userfaultfd handle and its ioctls.
//!
//! # Safety
//!
//! This module issues raw `open`, `syscall(SYS_userfaultfd)`, `ioctl` and
//! `read` calls. Every kernel struct passed by pointer lives on the caller's
//! stack for the duration of the call; the kernel never keeps the pointer.
//! The one contract callers must keep is stated on [`Uffd::register`]: once a
//! range is registered, this fd may change its contents at any time.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use livepage_sys as sys;

use crate::errno::Errno;
use crate::event::{Event, EventBuffer, RawEvent, decode};
use crate::flags::{Features, Ioctls, RegisterMode};

/// The base page size the resolving ioctls check alignment against.
pub const BASE_PAGE: usize = 4096;

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

/// Why a userfaultfd could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// Neither the device nor the syscall would hand out a full (kernel-mode) userfaultfd.
    #[error(
        "permission denied creating a userfaultfd (device: {device}; syscall: {syscall}). \
         Fix one of: give this user read/write access to /dev/userfaultfd (e.g. a group and \
         `chmod 660`, or `setfacl -m u:$USER:rw /dev/userfaultfd`), set the sysctl \
         `vm.unprivileged_userfaultfd=1`, or run with CAP_SYS_PTRACE. A user-mode-only \
         userfaultfd needs no privilege but cannot serve faults taken in the kernel, such as \
         KVM guest memory accesses"
    )]
    PermissionDenied {
        /// What opening `/dev/userfaultfd` returned.
        device: Errno,
        /// What `userfaultfd(2)` returned.
        syscall: Errno,
    },
    /// The kernel has no userfaultfd at all.
    #[error("this kernel has no userfaultfd (ENOSYS): CONFIG_USERFAULTFD is off")]
    NotSupported,
    /// Any other failure of the device or syscall.
    #[error("creating a userfaultfd via {via} failed: {errno}")]
    Create {
        /// "/dev/userfaultfd" or "userfaultfd(2)".
        via: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// The kernel lacks requested features.
    #[error(
        "the kernel does not support userfaultfd features {missing:?} (it supports {supported:?})"
    )]
    UnsupportedFeatures {
        /// Requested but not supported.
        missing: Features,
        /// What the kernel supports.
        supported: Features,
    },
    /// EVENT_FORK needs CAP_SYS_PTRACE at handshake time.
    #[error(
        "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE (EPERM at UFFDIO_API); run as root or grant the capability"
    )]
    ForkEventNeedsPtrace,
    /// UFFDIO_API failed otherwise.
    #[error("UFFDIO_API handshake failed: {0}")]
    Handshake(Errno),
}

impl CreateError {
    /// The errno behind the failure, when there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            CreateError::PermissionDenied { syscall, .. } => Some(*syscall),
            CreateError::NotSupported => Some(Errno::NOSYS),
            CreateError::Create { errno, .. } | CreateError::Handshake(errno) => Some(*errno),
            CreateError::ForkEventNeedsPtrace => Some(Errno::PERM),
            CreateError::UnsupportedFeatures { .. } => Some(Errno::INVAL),
        }
    }
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

/// What a resolving ioctl did. EAGAIN and EEXIST are outcomes here, not errors:
/// a fault server acts on each of them differently.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The whole range was handled.
    All,
    /// The kernel stopped after `bytes` (EAGAIN with progress, e.g. a signal or
    /// an EEXIST further on): continue at `start + bytes`.
    Partial {
        /// Bytes handled before the stop.
        bytes: u64,
    },
    /// EAGAIN with no progress: a non-cooperative event (remove, unmap, remap,
    /// fork) is pending. Read events first, then retry.
    EventPending,
    /// EEXIST: the page is already there (another resolver won). Wake the range
    /// if faulting threads may be waiting on it.
    AlreadyPresent,
}

/// An ioctl that resolves, protects or inspects a registered range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// UFFDIO_REGISTER
    Register,
    /// UFFDIO_UNREGISTER
    Unregister,
    /// UFFDIO_WAKE
    Wake,
    /// UFFDIO_COPY
    Copy,
    /// UFFDIO_ZEROPAGE
    ZeroPage,
    /// UFFDIO_WRITEPROTECT
    WriteProtect,
    /// UFFDIO_CONTINUE
    Continue,
    /// UFFDIO_POISON
    Poison,
    /// UFFDIO_MOVE
    Move,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Wake => "UFFDIO_WAKE",
            Op::Copy => "UFFDIO_COPY",
            Op::ZeroPage => "UFFDIO_ZEROPAGE",
            Op::WriteProtect => "UFFDIO_WRITEPROTECT",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Poison => "UFFDIO_POISON",
            Op::Move => "UFFDIO_MOVE",
        })
    }
}

/// Why an ioctl on a range failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RangeError {
    /// Rejected before the kernel was asked: unaligned, empty or overflowing.
    #[error("{op}: range {start:#x}+{len:#x} is not page aligned, empty, or overflows")]
    BadRange {
        /// The ioctl.
        op: Op,
        /// Start.
        start: u64,
        /// Length.
        len: u64,
    },
    /// ENOENT: no VMA registered with this context (or, for MOVE, a hole in the source).
    #[error("{op}: {start:#x}+{len:#x} is not registered with this userfaultfd (ENOENT)")]
    NotRegistered {
        /// The ioctl.
        op: Op,
        /// Start.
        start: u64,
        /// Length.
        len: u64,
    },
    /// ESRCH (ENOSPC on older kernels): the process owning the memory has exited.
    #[error("{op}: the target process is gone ({errno})")]
    TargetGone {
        /// The ioctl.
        op: Op,
        /// ESRCH or ENOSPC.
        errno: Errno,
    },
    /// Any other errno (EINVAL, EFAULT, EBUSY, EPERM, ENOMEM, EIO …).
    #[error("{op} on {start:#x}+{len:#x} failed: {errno}")]
    Kernel {
        /// The ioctl.
        op: Op,
        /// Start.
        start: u64,
        /// Length.
        len: u64,
        /// The errno.
        errno: Errno,
    },
}

impl RangeError {
    /// The errno (EINVAL for ranges rejected before the call).
    pub fn errno(&self) -> Errno {
        match self {
            RangeError::BadRange { .. } => Errno::INVAL,
            RangeError::NotRegistered { .. } => Errno::NOENT,
            RangeError::TargetGone { errno, .. } | RangeError::Kernel { errno, .. } => *errno,
        }
    }
}

/// Why reading events failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// read(2) failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(Errno),
    /// The kernel returned a message this crate cannot decode.
    #[error("undecodable userfaultfd message: {0}")]
    Decode(#[from] crate::event::DecodeError),
}

fn check_range(op: Op, start: usize, len: usize) -> Result<(), RangeError> {
    let bad = || RangeError::BadRange {
        op,
        start: start as u64,
        len: len as u64,
    };
    if len == 0 || start % BASE_PAGE != 0 || len % BASE_PAGE != 0 {
        return Err(bad());
    }
    start.checked_add(len).map(|_| ()).ok_or_else(bad)
}

fn classify(op: Op, start: usize, len: usize, errno: Errno) -> RangeError {
    match errno {
        Errno::NOENT => RangeError::NotRegistered {
            op,
            start: start as u64,
            len: len as u64,
        },
        Errno::SRCH | Errno::NOSPC => RangeError::TargetGone { op, errno },
        errno => RangeError::Kernel {
            op,
            start: start as u64,
            len: len as u64,
            errno,
        },
    }
}

/// Turns the (return value, out-field) pair of a resolving ioctl into an outcome.
/// The out-field is signed: a negative errno there is never read as a length.
fn outcome(op: Op, start: usize, len: usize, ret: i32, out: i64) -> Result<Resolved, RangeError> {
    if ret >= 0 {
        return Ok(Resolved::All);
    }
    match Errno::last() {
        Errno::AGAIN if out > 0 => Ok(Resolved::Partial { bytes: out as u64 }),
        Errno::AGAIN => Ok(Resolved::EventPending),
        Errno::EXIST => Ok(Resolved::AlreadyPresent),
        errno => Err(classify(op, start, len, errno)),
    }
}

/// Options of UFFDIO_COPY.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyMode {
    /// Do not wake the faulting threads (batch, then [`Uffd::wake`]).
    pub dont_wake: bool,
    /// Map the page write-protected (needs a WP registration).
    pub write_protect: bool,
}

/// A userfaultfd after its UFFDIO_API handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    enabled: Features,
    supported: Features,
    api_ioctls: Ioctls,
    non_blocking: bool,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Uffd {
    /// Wraps a userfaultfd whose handshake another process (or the kernel, for a
    /// fork event) already made, e.g. one received over SCM_RIGHTS.
    /// `enabled` is what the sender enabled, as far as the caller knows.
    pub fn from_handshaken_fd(fd: OwnedFd, enabled: Features) -> Uffd {
        // SAFETY: F_GETFL on a valid fd only reads its status flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        Uffd {
            fd,
            enabled,
            supported: Features::empty(),
            api_ioctls: Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER,
            non_blocking: flags >= 0 && flags & libc::O_NONBLOCK != 0,
        }
    }

    /// The features enabled on this context.
    pub fn features(&self) -> Features {
        self.enabled
    }
    /// Every feature the kernel reported at the handshake (empty for received fds).
    pub fn supported_features(&self) -> Features {
        self.supported
    }
    /// The fd-level ioctls the kernel reported.
    pub fn api_ioctls(&self) -> Ioctls {
        self.api_ioctls
    }
    /// Whether the fd is O_NONBLOCK.
    pub fn is_non_blocking(&self) -> bool {
        self.non_blocking
    }

    #[inline]
    fn ioctl<T>(&self, request: u32, arg: &mut T) -> i32 {
        // SAFETY: `arg` points to a live, properly sized uapi struct for `request`
        // (each caller pairs the opcode with its struct); the kernel reads and writes
        // it only during the call.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) }
    }

    /// `UFFDIO_REGISTER`: starts reporting faults of `mode` on `[start, start+len)`;
    /// returns the ioctls the range supports.
    ///
    /// # Safety
    /// From now until it is unregistered (or the fd is closed), the range's
    /// contents and protection may change at any moment through this fd, from
    /// any thread, and accesses may block until a handler resolves them. The
    /// caller must not hold Rust references (`&[u8]`, `&mut T`) into the range
    /// and must access it only through raw pointers or volatile operations.
    /// The range must not be memory the handling threads themselves need to
    /// run (their stacks, heap, this process's code).
    pub unsafe fn register(
        &self,
        start: usize,
        len: usize,
        mode: RegisterMode,
    ) -> Result<Ioctls, RangeError> {
        check_range(Op::Register, start, len)?;
        let mut reg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        if self.ioctl(sys::UFFDIO_REGISTER, &mut reg) < 0 {
            return Err(classify(Op::Register, start, len, Errno::last()));
        }
        Ok(Ioctls::from_bits_retain(reg.ioctls))
    }

    /// `UFFDIO_UNREGISTER`. Threads waiting on faults in the range are woken.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), RangeError> {
        check_range(Op::Unregister, start, len)?;
        let mut range = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        if self.ioctl(sys::UFFDIO_UNREGISTER, &mut range) < 0 {
            return Err(classify(Op::Unregister, start, len, Errno::last()));
        }
        Ok(())
    }

    /// `UFFDIO_WAKE`: wakes threads blocked on faults in the range.
    pub fn wake(&self, start: usize, len: usize) -> Result<(), RangeError> {
        check_range(Op::Wake, start, len)?;
        let mut range = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        if self.ioctl(sys::UFFDIO_WAKE, &mut range) < 0 {
            return Err(classify(Op::Wake, start, len, Errno::last()));
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: atomically installs `src.len()` bytes at `dst` (registered).
    #[inline]
    pub fn copy(&self, dst: usize, src: &[u8], mode: CopyMode) -> Result<Resolved, RangeError> {
        let len = src.len();
        check_range(Op::Copy, dst, len)?;
        let mut m = 0;
        if mode.dont_wake {
            m |= sys::mode::COPY_DONTWAKE;
        }
        if mode.write_protect {
            m |= sys::mode::COPY_WP;
        }
        let mut arg = sys::uffdio_copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: len as u64,
            mode: m,
            copy: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_COPY, &mut arg);
        outcome(Op::Copy, dst, len, ret, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE`: maps zeros (the shared zero page on private anon).
    pub fn zeropage(
        &self,
        start: usize,
        len: usize,
        dont_wake: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::ZeroPage, start, len)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: if dont_wake {
                sys::mode::ZEROPAGE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_ZEROPAGE, &mut arg);
        outcome(Op::ZeroPage, start, len, ret, arg.zeropage)
    }

    /// `UFFDIO_WRITEPROTECT`: `protect` sets uffd-wp on the range; clearing it
    /// wakes writers unless `dont_wake`. (The kernel refuses WP together with DONTWAKE.)
    pub fn write_protect(
        &self,
        start: usize,
        len: usize,
        protect: bool,
        dont_wake: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::WriteProtect, start, len)?;
        let mode = match (protect, dont_wake) {
            (true, _) => sys::mode::WRITEPROTECT_WP,
            (false, true) => sys::mode::WRITEPROTECT_DONTWAKE,
            (false, false) => 0,
        };
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
        };
        let ret = self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut arg);
        outcome(Op::WriteProtect, start, len, ret, 0)
    }

    /// `UFFDIO_CONTINUE` (MINOR mode): maps the page-cache pages of the range.
    /// `write_protect` maps them write-protected (needs a WP registration).
    #[inline]
    pub fn continue_range(
        &self,
        start: usize,
        len: usize,
        dont_wake: bool,
        write_protect: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::Continue, start, len)?;
        let mut mode = 0;
        if dont_wake {
            mode |= sys::mode::CONTINUE_DONTWAKE;
        }
        if write_protect {
            mode |= sys::mode::CONTINUE_WP;
        }
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            mapped: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_CONTINUE, &mut arg);
        outcome(Op::Continue, start, len, ret, arg.mapped)
    }

    /// `UFFDIO_POISON`: later accesses to the range raise SIGBUS.
    pub fn poison(
        &self,
        start: usize,
        len: usize,
        dont_wake: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::Poison, start, len)?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: if dont_wake {
                sys::mode::POISON_DONTWAKE
            } else {
                0
            },
            updated: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_POISON, &mut arg);
        outcome(Op::Poison, start, len, ret, arg.updated)
    }

    /// Fails a range closed: poisons every page of `[start, start+len)` that
    /// is not mapped (mapped pages, EEXIST, are skipped), in `page_size` steps
    /// past them. Events pending in the way (EAGAIN) are read and handed to
    /// `on_event` (their senders wait for that); the page faults among them
    /// are not answered one by one: the range is woken at the end, so their
    /// threads retry and find a page or a poison marker.
    pub fn poison_holes(
        &self,
        start: usize,
        len: usize,
        page_size: usize,
        mut on_event: impl FnMut(Event),
    ) -> Result<(), RangeError> {
        let mut events = EventBuffer::new(16);
        let mut off = 0;
        while off < len {
            match self.poison(start + off, len - off, false)? {
                Resolved::All => break,
                Resolved::Partial { bytes } => off += bytes as usize,
                Resolved::AlreadyPresent => off += page_size,
                Resolved::EventPending => {
                    for ev in self
                        .read_events(&mut events)
                        .map_err(|_| RangeError::Kernel {
                            op: Op::Poison,
                            start: (start + off) as u64,
                            len: (len - off) as u64,
                            errno: Errno::AGAIN,
                        })?
                    {
                        on_event(ev);
                    }
                }
            }
        }
        self.wake(start, len)
    }

    /// `UFFDIO_MOVE`: remaps the pages of `[src, src+len)` to `dst` (registered)
    /// without copying. Source holes count as moved with `allow_src_holes`;
    /// otherwise they fail with ENOENT.
    ///
    /// # Safety
    /// `[src, src+len)` is private anonymous memory of this process that no Rust
    /// reference points into; after the call its pages are gone (they read as zeros
    /// or fault).
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        dont_wake: bool,
        allow_src_holes: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::Move, dst, len)?;
        check_range(Op::Move, src, len)?;
        let mut mode = 0;
        if dont_wake {
            mode |= sys::mode::MOVE_DONTWAKE;
        }
        if allow_src_holes {
            mode |= sys::mode::MOVE_ALLOW_SRC_HOLES;
        }
        let mut arg = sys::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            moved: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_MOVE, &mut arg);
        outcome(Op::Move, dst, len, ret, arg.moved)
    }

    /// Reads as many messages as are queued (blocking for the first one unless the
    /// fd is O_NONBLOCK) and decodes them into `buf`. Returns the decoded events;
    /// an empty drain means nothing was queued on a non-blocking fd.
    /// A fork event's fd is owned by the returned [`Event::Fork`].
    pub fn read_events<'b>(
        &self,
        buf: &'b mut EventBuffer,
    ) -> Result<std::vec::Drain<'b, Event>, ReadError> {
        buf.events.clear();
        let bytes = loop {
            // SAFETY: `buf.raw` is a live, writable array of uffd_msg; the length passed
            // is its size in bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.raw.as_mut_ptr().cast(),
                    buf.raw.len() * std::mem::size_of::<sys::uffd_msg>(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            match Errno::last() {
                Errno::INTR => continue,
                Errno::AGAIN => return Ok(buf.events.drain(..)),
                e => return Err(ReadError::Read(e)),
            }
        };
        let count = bytes / std::mem::size_of::<sys::uffd_msg>();
        let tid = self.enabled.contains(Features::THREAD_ID);
        let mut first_err = None;
        for msg in &buf.raw[..count] {
            match decode(msg, tid) {
                Ok(RawEvent::PageFault(pf)) => buf.events.push(Event::PageFault(pf)),
                Ok(RawEvent::Fork { ufd }) => {
                    // SAFETY: the kernel installed `ufd` in our fd table for this message
                    // and hands its ownership to the reader.
                    let fd = unsafe { OwnedFd::from_raw_fd(ufd as RawFd) };
                    buf.events.push(Event::Fork {
                        uffd: Uffd::from_handshaken_fd(fd, self.enabled),
                    })
                }
                Ok(RawEvent::Remap { from, to, len }) => {
                    buf.events.push(Event::Remap { from, to, len })
                }
                Ok(RawEvent::Remove { start, end }) => {
                    buf.events.push(Event::Remove { start, end })
                }
                Ok(RawEvent::Unmap { start, end }) => buf.events.push(Event::Unmap { start, end }),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        buf.undecodable = first_err;
        match first_err {
            Some(e) if buf.events.is_empty() => Err(ReadError::Decode(e)),
            // Keep what decoded (fork fds are owned by then); the bad message stays
            // visible through `EventBuffer::undecodable`.
            _ => Ok(buf.events.drain(..)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_validated_before_the_kernel() {
        assert!(check_range(Op::Copy, 0x1000, 0x1000).is_ok());
        assert!(matches!(
            check_range(Op::Copy, 0x1001, 0x1000),
            Err(RangeError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, 0x1000, 0),
            Err(RangeError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, 0x1000, 0x800),
            Err(RangeError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, usize::MAX & !0xfff, 0x2000),
            Err(RangeError::BadRange { .. })
        ));
    }

    #[test]
    fn classify_keeps_errno() {
        assert_eq!(
            classify(Op::Copy, 0, 4096, Errno::NOENT).errno(),
            Errno::NOENT
        );
        assert!(matches!(
            classify(Op::Copy, 0, 4096, Errno::NOSPC),
            RangeError::TargetGone { .. }
        ));
        assert_eq!(
            classify(Op::Move, 0, 4096, Errno::BUSY).errno(),
            Errno::BUSY
        );
    }
}
