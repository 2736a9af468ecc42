//! Passing a file descriptor over a Unix socket (SCM_RIGHTS), as Firecracker
//! hands its guest memory's userfaultfd to a page server.

#![allow(unsafe_code)]
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::Errno;

/// Room for one fd in a control message (CMSG_SPACE(sizeof(int)) is 24 on
/// 64-bit Linux; 64 leaves room for a sender that passes more than one).
const CMSG_BUF: usize = 64;

/// Receives up to `buf.len()` bytes from `sock` and, if the message carried
/// SCM_RIGHTS, the first fd in it (any further fds are closed). Returns
/// `(0, None)` at end of stream.
pub fn recv_with_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Option<OwnedFd>), Errno> {
    let mut cmsg = [0u64; CMSG_BUF / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF;
    let n = loop {
        // SAFETY: msg points at a live iovec over `buf` and a live control buffer of
        // msg_controllen bytes; MSG_CMSG_CLOEXEC makes received fds close-on-exec.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = Errno::last();
        if e != Errno::INTR {
            return Err(e);
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled,
    // bounded by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // The kernel installed each fd in our table for this message.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let first = if fds.is_empty() {
        None
    } else {
        Some(fds.remove(0))
    };
    Ok((n, first))
}

/// Sends `data` over `sock` with `fd` attached as SCM_RIGHTS.
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> Result<usize, Errno> {
    let mut cmsg = [0u64; CMSG_BUF / 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: plain data, zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // SAFETY: the control buffer is larger than CMSG_SPACE(sizeof(int)); the header
    // and its data slot lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
    }
    loop {
        // SAFETY: msg points at live buffers as set up above; the kernel only reads.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = Errno::last();
        if e != Errno::INTR {
            return Err(e);
        }
    }
}

/// Whether `fd` is a userfaultfd (its /proc link names the anon inode).
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}

/// Whether a userfaultfd has had its UFFDIO_API handshake: every other
/// ioctl fails with EINVAL before it. Probed with a UFFDIO_WAKE of a range
/// nobody waits on (harmless: it wakes no one).
pub fn is_api_done(fd: BorrowedFd<'_>) -> bool {
    let mut range = livepage_sys::uffdio_range {
        start: 1 << 30,
        len: 4096,
    };
    // SAFETY: `range` is a valid uffdio_range on our stack; UFFDIO_WAKE only
    // reads it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), livepage_sys::UFFDIO_WAKE as _, &mut range) };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fd_travels_with_the_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        send_with_fd(a.as_fd(), b"hello", f.as_fd()).unwrap();
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let fd = fd.expect("an fd");
        assert!(!is_userfaultfd(fd.as_fd()));
        // A message without SCM_RIGHTS gives no fd.
        use std::io::Write;
        (&a).write_all(b"x").unwrap();
        let (n, fd) = recv_with_fd(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fd.is_none()), (1, true));
        drop(a);
        assert_eq!(recv_with_fd(b.as_fd(), &mut buf).unwrap().0, 0);
    }

    #[test]
    fn a_userfaultfd_without_its_handshake_is_told_apart() {
        if !crate::probe::capabilities().access.full() {
            return;
        }
        let raw = crate::UffdBuilder::new().open_unhandshaken().unwrap();
        assert!(is_userfaultfd(raw.as_fd()));
        assert!(!is_api_done(raw.as_fd()));
        let u = crate::UffdBuilder::new().create().unwrap();
        assert!(is_api_done(u.as_fd()));
    }
}
