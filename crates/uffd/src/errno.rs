//! A kernel error number that survives unknown values.

use std::fmt;

/// An errno as the kernel returned it. A newtype rather than an enum so an
/// unexpected value can never be undefined behaviour.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// `EPERM`
    pub const PERM: Errno = Errno(libc::EPERM);
    /// `ENOENT`
    pub const NOENT: Errno = Errno(libc::ENOENT);
    /// `ESRCH`
    pub const SRCH: Errno = Errno(libc::ESRCH);
    /// `EINTR`
    pub const INTR: Errno = Errno(libc::EINTR);
    /// `EAGAIN`
    pub const AGAIN: Errno = Errno(libc::EAGAIN);
    /// `ENOMEM`
    pub const NOMEM: Errno = Errno(libc::ENOMEM);
    /// `EACCES`
    pub const ACCES: Errno = Errno(libc::EACCES);
    /// `EFAULT`
    pub const FAULT: Errno = Errno(libc::EFAULT);
    /// `EBUSY`
    pub const BUSY: Errno = Errno(libc::EBUSY);
    /// `EEXIST`
    pub const EXIST: Errno = Errno(libc::EEXIST);
    /// `EINVAL`
    pub const INVAL: Errno = Errno(libc::EINVAL);
    /// `ENOSPC` (older kernels' spelling of "target mm gone")
    pub const NOSPC: Errno = Errno(libc::ENOSPC);
    /// `ENOSYS`
    pub const NOSYS: Errno = Errno(libc::ENOSYS);
    /// `ENOTTY`: the ioctl does not exist on this kernel.
    pub const NOTTY: Errno = Errno(libc::ENOTTY);
    /// `EIO`
    pub const IO: Errno = Errno(libc::EIO);
    /// `EOPNOTSUPP`
    pub const OPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);

    /// The calling thread's `errno` after a failed call.
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    /// The symbolic name (`EAGAIN`), or `E?` for a value this crate does not name.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::ESRCH => "ESRCH",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::ENOSYS => "ENOSYS",
            libc::ENOTTY => "ENOTTY",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EBADF => "EBADF",
            libc::ENODEV => "ENODEV",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // io::Error's Display carries the libc text followed by "(os error N)".
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        let text = text.split(" (os error").next().unwrap_or("");
        write!(f, "{}: {text}", self.name())
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}
