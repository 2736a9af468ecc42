//! Why userfaultfd operations fail: creating the fd, an ioctl on a range,
//! reading events. Each keeps the errno.

use crate::errno::Errno;
use crate::flags::Features;

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

pub(crate) fn classify(op: Op, start: usize, len: usize, errno: Errno) -> RangeError {
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
