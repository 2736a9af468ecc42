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

/// The fork()-based snapshot peer (what Redis and Valkey do): forks, and the
/// child writes `[addr, addr+len)` of its copy-on-write view to `fd` at the
/// same offsets (zero pages skipped), then exits. Returns the child's pid and
/// how long `fork()` itself took (the parent's pause). The child only makes
/// raw syscalls, so it is safe to fork from a multi-threaded process.
pub fn fork_dump(
    addr: usize,
    len: usize,
    fd: BorrowedFd<'_>,
) -> Result<(i32, std::time::Duration), crate::Errno> {
    let raw = fd.as_raw_fd();
    let t0 = std::time::Instant::now();
    // SAFETY: the child below touches no lock, allocator or Rust runtime state: it
    // reads memory it inherited, calls pwrite and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(crate::Errno::last());
    }
    if pid == 0 {
        let mut off = 0usize;
        let mut code = 0;
        while off < len {
            // One run of non-zero pages, up to 1 MiB.
            let mut end = off;
            while end < len && end - off < (1 << 20) {
                // SAFETY: `addr+end .. +4096` lies inside the caller's mapping, which
                // the child inherited.
                let page = unsafe { std::slice::from_raw_parts((addr + end) as *const u64, 512) };
                if page.iter().all(|w| *w == 0) {
                    break;
                }
                end += 4096;
            }
            if end > off {
                // SAFETY: the run lies inside the inherited mapping; pwrite only reads it.
                let n = unsafe {
                    libc::pwrite(
                        raw,
                        (addr + off) as *const libc::c_void,
                        end - off,
                        off as i64,
                    )
                };
                if n != (end - off) as isize {
                    code = 1;
                    break;
                }
                off = end;
            } else {
                off += 4096;
            }
        }
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    Ok((pid, t0.elapsed()))
}

/// Waits for a child; returns whether it exited with status 0.
pub fn wait_child(pid: i32) -> Result<bool, crate::Errno> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
        let e = crate::Errno::last();
        if e != crate::Errno::INTR {
            return Err(e);
        }
    }
}
