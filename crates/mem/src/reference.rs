//! Safe entry points to the kernel layer's bare benchmark peers
//! (`livepage_uffd::reference`) for memory a [`Region`] owns: a region never
//! hands out references into its memory, which is what those raw calls
//! need of their caller.
//!
//! # Safety
//!
//! Every call below checks that the addresses lie inside the region first.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;
use std::time::Duration;

use livepage_uffd::Errno;
use livepage_uffd::reference::{self, MprotectTracker};

use crate::Region;

impl Region {
    fn spans(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr() as u64
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= (self.addr() + self.len()) as u64)
    }

    /// The bare `UFFDIO_COPY` of the benchmarks' C-like peer loop, into this
    /// region: `(ret, copy)` as the kernel gives them; `(-1, -EINVAL)` when
    /// `dst` is not inside the region.
    #[inline]
    pub fn bare_copy(&self, fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> (i32, i64) {
        if !self.spans(dst, src.len() as u64) {
            return (-1, -i64::from(Errno::INVAL.0));
        }
        // SAFETY: the range lies inside this region (checked), whose memory no
        // Rust reference points into.
        unsafe { reference::copy(fd, dst, src) }
    }

    /// The bare `UFFDIO_CONTINUE` of the peer loop, in this region.
    #[inline]
    pub fn bare_continue(&self, fd: BorrowedFd<'_>, start: u64, len: u64) -> (i32, i64) {
        if !self.spans(start, len) {
            return (-1, -i64::from(Errno::INVAL.0));
        }
        // SAFETY: as in `bare_copy`.
        unsafe { reference::continue_range(fd, start, len) }
    }

    /// The fork() snapshot peer over this region (see
    /// `livepage_uffd::reference::fork_dump`): (child pid, fork's pause).
    pub fn fork_dump(&self, fd: BorrowedFd<'_>) -> Result<(i32, Duration), Errno> {
        // SAFETY: the whole region is a readable mapping of ours.
        unsafe { reference::fork_dump(self.addr(), self.len(), fd) }
    }

    /// The fork() peer writing only `ranges` (byte offset, length; page
    /// aligned, inside the region) of this region.
    pub fn fork_dump_ranges(
        &self,
        fd: BorrowedFd<'_>,
        ranges: &[(usize, usize)],
    ) -> Result<(i32, Duration), Errno> {
        if ranges
            .iter()
            .any(|&(o, l)| o % 4096 != 0 || l % 4096 != 0 || o + l > self.len())
        {
            return Err(Errno::INVAL);
        }
        // SAFETY: every range lies inside the region (checked), a readable mapping of ours.
        unsafe { reference::fork_dump_ranges(self.addr(), ranges, fd) }
    }

    /// The mprotect + SIGSEGV tracking peer over this region.
    pub fn mprotect_tracker(&self) -> Result<MprotectTracker, Errno> {
        // SAFETY: the region is a page-aligned mapping of ours, only ever
        // accessed through raw pointers.
        unsafe { MprotectTracker::start(self.addr(), self.len()) }
    }
}
