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

/// A reusable set of fds to wait on with poll(2): any number of them, with
/// no allocation per wait.
#[derive(Debug)]
pub struct PollSet<'a> {
    fds: Vec<libc::pollfd>,
    _borrow: std::marker::PhantomData<BorrowedFd<'a>>,
}

impl<'a> PollSet<'a> {
    /// A set over `fds`, waited on for readability.
    pub fn new(fds: impl IntoIterator<Item = BorrowedFd<'a>>) -> PollSet<'a> {
        PollSet {
            fds: fds
                .into_iter()
                .map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Waits until one fd is readable (or hung up, or in error) or
    /// `timeout_ms` passes (-1: forever). Returns how many are ready.
    pub fn wait(&mut self, timeout_ms: i32) -> Result<usize, Errno> {
        loop {
            // SAFETY: `self.fds` is a live array of pollfd structs of the length passed.
            let r = unsafe {
                libc::poll(
                    self.fds.as_mut_ptr(),
                    self.fds.len() as libc::nfds_t,
                    timeout_ms,
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = Errno::last();
            if e != Errno::INTR {
                return Err(e);
            }
        }
    }

    /// Whether fd `i` (in the order given) was ready at the last wait.
    pub fn ready(&self, i: usize) -> bool {
        self.fds.get(i).is_some_and(|p| p.revents != 0)
    }

    /// Number of fds in the set.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_set_reports_the_ready_fd() {
        let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        let mut set = PollSet::new([a.as_fd(), b.as_fd()]);
        assert_eq!(set.wait(0).unwrap(), 0);
        b.signal();
        assert_eq!(set.wait(1000).unwrap(), 1);
        assert!(!set.ready(0) && set.ready(1));
        assert!(!set.ready(7));
    }
}
