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
//! The functions that take raw addresses are `unsafe fn`: the caller
//! promises the memory is its own and accessed only through raw pointers
//! (`livepage_mem::Region` wraps them for its own memory). Structs passed
//! by pointer live on the stack for the duration of each call.
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
///
/// # Safety
/// `[dst, dst+src.len())` is memory registered on `fd` that no Rust
/// reference points into: the kernel fills it.
#[inline]
pub unsafe fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> (i32, i64) {
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
///
/// # Safety
/// `[start, start+len)` is memory registered on `fd` that no Rust reference
/// points into: the kernel maps page-cache pages there.
#[inline]
pub unsafe fn continue_range(fd: BorrowedFd<'_>, start: u64, len: u64) -> (i32, i64) {
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
///
/// # Safety
/// `[addr, addr+len)` is a readable, page-aligned mapping of the caller's.
pub unsafe fn fork_dump(
    addr: usize,
    len: usize,
    fd: BorrowedFd<'_>,
) -> Result<(i32, std::time::Duration), crate::Errno> {
    // SAFETY: forwarded from the caller.
    unsafe { fork_dump_ranges(addr, &[(0, len)], fd) }
}

/// [`fork_dump`] of some byte ranges `(offset, len)` of the mapping at
/// `addr` only (a delta checkpoint written by fork's child).
///
/// # Safety
/// Every range lies inside a readable, page-aligned mapping of the caller's
/// at `addr`, and is page aligned.
pub unsafe fn fork_dump_ranges(
    addr: usize,
    ranges: &[(usize, usize)],
    fd: BorrowedFd<'_>,
) -> Result<(i32, std::time::Duration), crate::Errno> {
    let raw = fd.as_raw_fd();
    let t0 = std::time::Instant::now();
    // SAFETY: the child below touches no lock, allocator or Rust runtime state: it
    // reads memory it inherited (and `ranges`, allocated before), calls pwrite
    // and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(crate::Errno::last());
    }
    if pid == 0 {
        let mut code = 0;
        'ranges: for &(start, len) in ranges {
            let (mut off, stop) = (start, start + len);
            while off < stop {
                // One run of non-zero pages, up to 1 MiB.
                let mut end = off;
                while end < stop && end - off < (1 << 20) {
                    // SAFETY: `addr+end .. +4096` lies inside the caller's mapping,
                    // which the child inherited.
                    let page =
                        unsafe { std::slice::from_raw_parts((addr + end) as *const u64, 512) };
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
                        break 'ranges;
                    }
                    off = end;
                } else {
                    off += 4096;
                }
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

/// The mprotect + SIGSEGV dirty-tracking peer (what userspace did before
/// userfaultfd write-protect): the range is made read-only; the first write
/// to a page raises SIGSEGV, whose handler records the page and makes it
/// writable again. Each re-protected page run is its own VMA, so collects fail
/// with ENOMEM once `vm.max_map_count` is reached. One tracker per process.
#[derive(Debug)]
pub struct MprotectTracker {
    base: usize,
    len: usize,
    _bits: Box<[std::sync::atomic::AtomicU64]>,
    old: libc::sigaction,
}

static MP_BASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static MP_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static MP_BITS: std::sync::atomic::AtomicPtr<std::sync::atomic::AtomicU64> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

static MP_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn mp_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    use std::sync::atomic::Ordering;
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (base, len) = (
        MP_BASE.load(Ordering::Acquire),
        MP_LEN.load(Ordering::Acquire),
    );
    let bits = MP_BITS.load(Ordering::Acquire);
    if bits.is_null() || addr < base || addr >= base + len {
        // Not ours: restore the default action; returning re-executes the access
        // and the process dies as it would have.
        // SAFETY: signal() is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    let page = (addr - base) / 4096;
    // SAFETY: mprotect is async-signal-safe; the page lies inside the tracked range.
    let r = unsafe {
        libc::mprotect(
            (base + page * 4096) as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if r < 0 {
        // Out of VMAs (vm.max_map_count): tracking cannot go on. Make the whole
        // range writable (one VMA again) so the program continues, and say so.
        MP_FAILED.store(true, Ordering::Release);
        // SAFETY: as above, over the whole tracked range.
        unsafe {
            libc::mprotect(
                base as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
    }
    // SAFETY: `bits` points to len/4096/64 words that live while the tracker does.
    unsafe { (*bits.add(page / 64)).fetch_or(1 << (page % 64), Ordering::AcqRel) };
}

impl MprotectTracker {
    /// Starts tracking `[base, base+len)`.
    ///
    /// # Safety
    /// The range is a page-aligned mapping of the caller's that is only
    /// accessed through raw pointers: it becomes read-only, and a write to
    /// it is let through by the SIGSEGV handler.
    pub unsafe fn start(base: usize, len: usize) -> Result<MprotectTracker, crate::Errno> {
        use std::sync::atomic::Ordering;
        if !MP_BITS.load(Ordering::Acquire).is_null() {
            return Err(crate::Errno::BUSY);
        }
        let words = (len / 4096).div_ceil(64);
        let mut bits: Box<[std::sync::atomic::AtomicU64]> = (0..words)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        MP_BASE.store(base, Ordering::Release);
        MP_LEN.store(len, Ordering::Release);
        MP_FAILED.store(false, Ordering::Release);
        MP_BITS.store(bits.as_mut_ptr(), Ordering::Release);
        // SAFETY: zeroed sigaction is a valid starting point; the handler is an
        // `extern "C"` fn of the SA_SIGINFO signature.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = mp_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: zeroed is a valid value for the out-parameter.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both structs are valid for the call.
        if unsafe { libc::sigaction(libc::SIGSEGV, &act, &mut old) } < 0 {
            MP_BITS.store(std::ptr::null_mut(), Ordering::Release);
            return Err(crate::Errno::last());
        }
        let t = MprotectTracker {
            base,
            len,
            _bits: bits,
            old,
        };
        // SAFETY: the caller's range; read-only only turns its writes into the
        // faults the handler resolves.
        if unsafe { libc::mprotect(base as *mut libc::c_void, len, libc::PROT_READ) } < 0 {
            return Err(crate::Errno::last());
        }
        Ok(t)
    }

    /// Returns the pages written since the previous collect and makes them
    /// read-only again (runs of pages in one call each). Fails with ENOMEM when
    /// the re-protected runs need more VMAs than `vm.max_map_count` allows.
    pub fn collect(&self) -> Result<Vec<usize>, crate::Errno> {
        use std::sync::atomic::Ordering;
        if MP_FAILED.load(Ordering::Acquire) {
            return Err(crate::Errno::NOMEM);
        }
        let bits = MP_BITS.load(Ordering::Acquire);
        let words = (self.len / 4096).div_ceil(64);
        let mut pages = Vec::new();
        for i in 0..words {
            // SAFETY: `bits` has `words` entries (allocated in start).
            let mut w = unsafe { (*bits.add(i)).swap(0, Ordering::AcqRel) };
            while w != 0 {
                pages.push(i * 64 + w.trailing_zeros() as usize);
                w &= w - 1;
            }
        }
        let mut k = 0;
        while k < pages.len() {
            let mut e = k + 1;
            while e < pages.len() && pages[e] == pages[e - 1] + 1 {
                e += 1;
            }
            // SAFETY: a run of pages inside the tracked range.
            let r = unsafe {
                libc::mprotect(
                    (self.base + pages[k] * 4096) as *mut libc::c_void,
                    (e - k) * 4096,
                    libc::PROT_READ,
                )
            };
            if r < 0 {
                let e = crate::Errno::last();
                MP_FAILED.store(true, Ordering::Release);
                // SAFETY: the tracked range, back to one writable VMA.
                unsafe {
                    libc::mprotect(
                        self.base as *mut libc::c_void,
                        self.len,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                return Err(e);
            }
            k = e;
        }
        Ok(pages)
    }
}

impl Drop for MprotectTracker {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        // SAFETY: restores the range's protection and the previous handler.
        unsafe {
            libc::mprotect(
                self.base as *mut libc::c_void,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
            );
            libc::sigaction(libc::SIGSEGV, &self.old, std::ptr::null_mut());
        }
        MP_BITS.store(std::ptr::null_mut(), Ordering::Release);
    }
}
