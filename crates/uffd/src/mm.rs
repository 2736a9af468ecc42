//! Memory syscalls the regions are built from: RAII mappings, memfd,
//! madvise, hole punching, CPU affinity and thread ids.
//!
//! # Safety
//!
//! A [`Mapping`] owns a range of this process's address space obtained from
//! mmap and returns it in `Drop`. It never hands out references into the
//! range: callers get raw pointers only, because the range may be changed by
//! the kernel (userfaultfd, madvise) at any time.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::errno::Errno;

/// Size of a huge page for `MAP_HUGETLB` / `MFD_HUGETLB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePageSize {
    /// 2 MiB.
    Size2M,
    /// 1 GiB.
    Size1G,
}

impl HugePageSize {
    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }
    fn shift_flag(self) -> i32 {
        let shift = self.bytes().trailing_zeros() as i32;
        shift << libc::MAP_HUGE_SHIFT
    }
}

/// How to map anonymous memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnonOptions {
    /// MAP_SHARED (shmem-backed) instead of MAP_PRIVATE.
    pub shared: bool,
    /// MAP_HUGETLB with this page size.
    pub hugetlb: Option<HugePageSize>,
    /// MAP_NORESERVE: no swap/commit accounting (huge sparse regions).
    pub no_reserve: bool,
    /// Align the start to this power of two (e.g. 2 MiB for THP).
    pub align: Option<usize>,
}

/// An mmap'ed range, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range plus its length; it holds no thread-bound
// state and all access to the memory goes through raw pointers whose users keep
// their own synchronisation.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the address and madvise-style calls
// that the kernel serialises.
unsafe impl Sync for Mapping {}

fn mmap_raw(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> Result<NonNull<u8>, Errno> {
    // SAFETY: without MAP_FIXED (callers only pass MAP_FIXED over a range they
    // reserved and own) mmap picks fresh address space and cannot clobber
    // existing mappings.
    let p = unsafe { libc::mmap(addr, len, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    NonNull::new(p.cast()).ok_or(Errno::NOMEM)
}

fn munmap_raw(ptr: *mut u8, len: usize) {
    // SAFETY: callers pass a range they own exclusively (a Mapping being dropped
    // or trimmed); nothing refers to it afterwards.
    unsafe { libc::munmap(ptr.cast(), len) };
}

impl Mapping {
    /// Maps `len` bytes of anonymous memory (read/write).
    pub fn anonymous(len: usize, opts: AnonOptions) -> Result<Mapping, Errno> {
        if len == 0 {
            return Err(Errno::INVAL);
        }
        let mut flags = libc::MAP_ANONYMOUS
            | if opts.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        if let Some(h) = opts.hugetlb {
            flags |= libc::MAP_HUGETLB | h.shift_flag();
        }
        if opts.no_reserve {
            flags |= libc::MAP_NORESERVE;
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        match opts.align {
            None => Ok(Mapping {
                ptr: mmap_raw(std::ptr::null_mut(), len, prot, flags, -1, 0)?,
                len,
            }),
            Some(align) => {
                if !align.is_power_of_two() {
                    return Err(Errno::INVAL);
                }
                // Over-map, then trim both ends to the aligned window.
                let total = len.checked_add(align).ok_or(Errno::NOMEM)?;
                let base = mmap_raw(
                    std::ptr::null_mut(),
                    total,
                    prot,
                    flags | libc::MAP_NORESERVE,
                    -1,
                    0,
                )?;
                let start = (base.as_ptr() as usize).next_multiple_of(align);
                let head = start - base.as_ptr() as usize;
                if head > 0 {
                    munmap_raw(base.as_ptr(), head);
                }
                let tail = total - head - len;
                if tail > 0 {
                    munmap_raw((start + len) as *mut u8, tail);
                }
                let ptr = NonNull::new(start as *mut u8).ok_or(Errno::NOMEM)?;
                Ok(Mapping { ptr, len })
            }
        }
    }

    /// Maps `len` bytes of `fd` at `offset`, shared or private (read/write).
    pub fn file(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        shared: bool,
    ) -> Result<Mapping, Errno> {
        if len == 0 {
            return Err(Errno::INVAL);
        }
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let off = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        let ptr = mmap_raw(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.as_raw_fd(),
            off,
        )?;
        Ok(Mapping { ptr, len })
    }

    /// Maps `fd` read-only, private (for reading an image or file).
    pub fn file_read_only(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Mapping, Errno> {
        if len == 0 {
            return Err(Errno::INVAL);
        }
        let off = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        let ptr = mmap_raw(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            off,
        )?;
        Ok(Mapping { ptr, len })
    }

    /// The start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The start address as an integer.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true: an empty mapping cannot be created.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Errno::INVAL),
        }
    }

    /// madvise(2) on `[offset, offset+len)` of this mapping.
    pub fn advise(&self, offset: usize, len: usize, advice: Advice) -> Result<(), Errno> {
        self.check(offset, len)?;
        // SAFETY: the range lies inside this mapping (checked above); the advice values
        // offered by `Advice` only discard or hint, and the mapping is never exposed
        // as Rust references, so discarded contents break no aliasing rule.
        let r = unsafe { libc::madvise(self.as_ptr().add(offset).cast(), len, advice.raw()) };
        if r < 0 { Err(Errno::last()) } else { Ok(()) }
    }

    /// mprotect(2) on `[offset, offset+len)`: `writable` false makes it read-only.
    pub fn protect(
        &self,
        offset: usize,
        len: usize,
        readable: bool,
        writable: bool,
    ) -> Result<(), Errno> {
        self.check(offset, len)?;
        let mut prot = libc::PROT_NONE;
        if readable {
            prot |= libc::PROT_READ;
        }
        if writable {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: the range lies inside this mapping; changing protection cannot
        // invalidate Rust references because none point into it.
        let r = unsafe { libc::mprotect(self.as_ptr().add(offset).cast(), len, prot) };
        if r < 0 { Err(Errno::last()) } else { Ok(()) }
    }

    /// Consumes the mapping without unmapping it; returns (address, length).
    /// Used when the kernel moved or removed the range (mremap, munmap by a test).
    pub fn leak(self) -> (usize, usize) {
        let me = std::mem::ManuallyDrop::new(self);
        (me.addr(), me.len)
    }

    /// Takes ownership of a range that was mapped elsewhere.
    ///
    /// # Safety
    /// `[addr, addr+len)` must be a live mapping that nothing else owns or unmaps,
    /// and no Rust reference may point into it.
    pub unsafe fn from_raw(addr: usize, len: usize) -> Option<Mapping> {
        NonNull::new(addr as *mut u8).map(|ptr| Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        munmap_raw(self.ptr.as_ptr(), self.len);
    }
}

/// madvise(2) advice that keeps memory safety intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// MADV_DONTNEED: drop pages; private anon reads back zeros.
    DontNeed,
    /// MADV_REMOVE: free the backing (shmem/hugetlbfs) of the range.
    Remove,
    /// MADV_HUGEPAGE: allow THP.
    HugePage,
    /// MADV_NOHUGEPAGE: forbid THP.
    NoHugePage,
    /// MADV_DONTFORK: not inherited by children (MOVE staging buffers).
    DontFork,
    /// MADV_POPULATE_WRITE: fault the range in writable.
    PopulateWrite,
    /// MADV_POPULATE_READ: fault the range in readable.
    PopulateRead,
    /// MADV_PAGEOUT: reclaim (swap out) the range.
    PageOut,
    /// MADV_COLLAPSE: synchronously collapse into THPs.
    Collapse,
}

impl Advice {
    fn raw(self) -> i32 {
        match self {
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Remove => libc::MADV_REMOVE,
            Advice::HugePage => libc::MADV_HUGEPAGE,
            Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
            Advice::DontFork => libc::MADV_DONTFORK,
            Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
            Advice::PopulateRead => libc::MADV_POPULATE_READ,
            Advice::PageOut => libc::MADV_PAGEOUT,
            Advice::Collapse => 25, // MADV_COLLAPSE (6.1)
        }
    }
}

/// memfd_create(2), close-on-exec; `hugetlb` backs it with huge pages.
pub fn memfd_create(name: &str, hugetlb: Option<HugePageSize>) -> Result<File, Errno> {
    let cname = std::ffi::CString::new(name).map_err(|_| Errno::INVAL)?;
    let mut flags = libc::MFD_CLOEXEC;
    if let Some(h) = hugetlb {
        flags |= libc::MFD_HUGETLB | h.shift_flag() as u32;
    }
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: memfd_create returned a fresh fd we now own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE): frees `[offset, offset+len)` of a file.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> Result<(), Errno> {
    let off = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
    let l = i64::try_from(len).map_err(|_| Errno::INVAL)?;
    // SAFETY: fallocate takes plain integers and an fd we borrow for the call.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<(), Errno> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(Errno::INVAL);
    }
    // SAFETY: `cpu` < CPU_SETSIZE (checked), so the bit lies inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and its size is passed; pid 0 = this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Lets the calling thread run on every CPU again.
pub fn unpin_current_thread() -> Result<(), Errno> {
    // SAFETY: as in `pin_current_thread`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..online_cpus().min(libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` < CPU_SETSIZE, so the bit lies inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: as in `pin_current_thread`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// The calling thread's kernel id.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// The number of online CPUs.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The system's base page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes a constant and reads no memory of ours.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(r).unwrap_or(4096)
}

/// Memory the kernel thinks can be allocated without swapping
/// (`MemAvailable` in /proc/meminfo), in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
}

/// Resident set size of this process in bytes (from /proc/self/statm).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page_size() as u64)
}

/// Reads the 64-bit `/proc/self/pagemap` entry of `addr`.
pub fn pagemap_entry(addr: usize) -> Result<u64, Errno> {
    use std::os::unix::fs::FileExt;
    let f = File::open("/proc/self/pagemap").map_err(Errno::from)?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / page_size()) as u64 * 8)
        .map_err(Errno::from)?;
    Ok(u64::from_ne_bytes(b))
}

/// Reads the `/proc/self/pagemap` entries of the `n` base pages from `addr`
/// with one read. Bit 63: present; bit 62: swapped.
pub fn pagemap_entries(addr: usize, n: usize) -> Result<Vec<u64>, Errno> {
    use std::os::unix::fs::FileExt;
    let f = File::open("/proc/self/pagemap").map_err(Errno::from)?;
    let mut b = vec![0u8; n * 8];
    f.read_exact_at(&mut b, (addr / page_size()) as u64 * 8)
        .map_err(Errno::from)?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// lseek(SEEK_DATA): the first offset at or after `offset` that holds data, or
/// None when only a hole follows (ENXIO).
pub fn seek_data(file: &File, offset: u64) -> Result<Option<u64>, Errno> {
    let off = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
    // SAFETY: lseek takes an fd we borrow for the call and integers.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        let e = Errno::last();
        return if e.0 == libc::ENXIO { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// `lseek(SEEK_HOLE)`: the start of the first hole at or after `offset`
/// (the end of the file counts as a hole); `None` past the end.
pub fn seek_hole(file: &File, offset: u64) -> Result<Option<u64>, Errno> {
    let off = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
    // SAFETY: lseek takes an fd we borrow for the call and integers.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_HOLE) };
    if r < 0 {
        let e = Errno::last();
        return if e.0 == libc::ENXIO { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// Copies `buf.len()` bytes at `addr` of this process into `buf` through the
/// kernel (process_vm_readv on ourselves). Unlike a plain load it cannot
/// crash: memory unmapped meanwhile fails with EFAULT instead of SIGSEGV.
pub fn read_own_memory(addr: usize, buf: &mut [u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` describes the live, writable rest of `buf`; `remote` is only
        // read by the kernel, which validates it and fails with EFAULT if unmapped.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n < 0 {
            let e = Errno::last();
            if e == Errno::INTR {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(Errno::FAULT);
        }
        done += n as usize;
    }
    Ok(())
}

/// pread(2) of `len` bytes at `offset` of `fd` straight into memory at
/// `addr`, looping over short reads. Fails with EIO at end of file.
///
/// # Safety
/// `[addr, addr+len)` is mapped writable memory of this process that no Rust
/// reference points into.
pub unsafe fn pread_into(
    fd: BorrowedFd<'_>,
    offset: u64,
    addr: usize,
    len: usize,
) -> Result<(), Errno> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the caller guarantees the destination range is ours to write.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                (addr + done) as *mut libc::c_void,
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(Errno::IO),
            _ => {
                let e = Errno::last();
                if e != Errno::INTR {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
