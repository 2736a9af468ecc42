//! The naked libc calls that the `livepage bench faults` reference loop uses.
//!
//! They do what a C fault handler does: a bare `read(2)` into an array of
//! `uffd_msg` and a bare `ioctl(2)` with a stack struct, with no validation,
//! decoding or outcome classification. Benchmarks run the same handler loop
//! once over these and once over [`crate::Uffd`], so the difference is the
//! cost of the safe layer. Not meant for anything else.
//!
//! # Safety
//!
//! The functions take a registered userfaultfd and addresses the caller
//! registered through [`crate::Uffd::register`] (whose contract covers what
//! the ioctls do to that memory). Structs passed by pointer live on the stack
//! for the duration of each call.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use livepage_sys as sys;

/// `read(fd, msgs, sizeof msgs)`; returns the raw result (bytes or -1).
#[inline]
pub fn read_msgs(fd: BorrowedFd<'_>, msgs: &mut [sys::uffd_msg]) -> isize {
    // SAFETY: `msgs` is a live, writable slice; its byte size is passed.
    unsafe {
        libc::read(
            fd.as_raw_fd(),
            msgs.as_mut_ptr().cast(),
            std::mem::size_of_val(msgs),
        )
    }
}

/// `ioctl(fd, UFFDIO_COPY, {dst, src, len, 0})`; returns (ret, copy).
#[inline]
pub fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> (i32, i64) {
    let mut c = sys::uffdio_copy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `c` is a valid uffdio_copy on our stack; `src` is readable for its length.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut c) };
    (r, c.copy)
}

/// `ioctl(fd, UFFDIO_CONTINUE, {start, len, 0})`; returns (ret, mapped).
#[inline]
pub fn continue_range(fd: BorrowedFd<'_>, start: u64, len: u64) -> (i32, i64) {
    let mut c = sys::uffdio_continue {
        range: sys::uffdio_range { start, len },
        mode: 0,
        mapped: 0,
    };
    // SAFETY: `c` is a valid uffdio_continue on our stack.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_CONTINUE as _, &mut c) };
    (r, c.mapped)
}

/// `ioctl(fd, UFFDIO_WAKE, {start, len})`.
#[inline]
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> i32 {
    let mut r = sys::uffdio_range { start, len };
    // SAFETY: `r` is a valid uffdio_range on our stack.
    unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_WAKE as _, &mut r) }
}

/// The calling thread's errno.
#[inline]
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `ioctl(fd, UFFDIO_API, {api, features})`; returns (ret, the struct after the call).
/// Lets tests check the handshake rules (wrong api, a second handshake).
pub fn api(fd: BorrowedFd<'_>, api: u64, features: u64) -> (i32, sys::uffdio_api) {
    let mut a = sys::uffdio_api {
        api,
        features,
        ioctls: 0,
    };
    // SAFETY: `a` is a valid uffdio_api on our stack.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut a) };
    (r, a)
}
