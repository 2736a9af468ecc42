//! Waiting on several fds (a userfaultfd and a stop signal) with poll(2).
//!
//! # Safety
//!
//! poll(2) reads and writes a `pollfd` array that lives on the caller's stack
//! for the duration of the call.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::errno::Errno;

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1: forever).
/// Returns, per fd, whether it is readable (or hung up / in error).
pub fn poll_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout_ms: i32,
) -> Result<[bool; N], Errno> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `pfds` is a live array of N pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            break;
        }
        let e = Errno::last();
        if e != Errno::INTR {
            return Err(e);
        }
    }
    Ok(pfds.map(|p| p.revents != 0))
}

/// An eventfd used to stop threads blocked in poll.
#[derive(Debug)]
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> Result<EventFd, Errno> {
        // SAFETY: eventfd takes integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: the kernel just returned this fresh fd.
        Ok(EventFd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }
    /// Makes the eventfd readable (wakes every poller).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    /// The fd to poll.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
}
