//! PAGEMAP_SCAN over `/proc/PID/pagemap`, as an iterator of merged regions.
//!
//! # Safety
//!
//! The only unsafe operation is the PAGEMAP_SCAN ioctl itself: it reads a
//! `pm_scan_arg` on our stack and writes at most `vec_len` `page_region`s into
//! a buffer this module owns and sized.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

use livepage_sys as sys;

use crate::errno::Errno;
use crate::flags::{Categories, ScanFlags};
use crate::uffd::BASE_PAGE;

/// One run of pages with equal reported categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Categories, masked by the request's `return_mask`.
    pub categories: Categories,
}

impl PageRegion {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Whether the region is empty (never returned by a scan).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// What to scan and what to select; see `admin-guide/mm/pagemap.rst`.
///
/// A page is selected when `(cats ^ inverted) & mask == mask` and, if
/// `anyof_mask` is non-empty, `(cats ^ inverted) & anyof_mask != 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    /// Start address (page aligned).
    pub start: u64,
    /// End address (exclusive; page aligned).
    pub end: u64,
    /// WP_MATCHING / CHECK_WPASYNC.
    pub flags: ScanFlags,
    /// Categories to invert before matching.
    pub category_inverted: Categories,
    /// All of these.
    pub category_mask: Categories,
    /// Any of these (empty: no condition).
    pub category_anyof_mask: Categories,
    /// What to report.
    pub return_mask: Categories,
    /// Stop after this many (4 KiB) pages in total; 0 = no limit.
    pub max_pages: u64,
}

impl ScanRequest {
    /// Pages written since they were last protected, reported and re-protected
    /// in the same walk (the incremental-tracking harvest). Uses only the fast-path
    /// masks and CHECK_WPASYNC, as the kernel reference advises.
    pub fn harvest_written(start: u64, end: u64) -> Self {
        ScanRequest {
            start,
            end,
            flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
            category_inverted: Categories::empty(),
            category_mask: Categories::WRITTEN,
            category_anyof_mask: Categories::empty(),
            return_mask: Categories::WRITTEN,
            max_pages: 0,
        }
    }

    /// Pages written since they were last protected, without re-protecting.
    pub fn written(start: u64, end: u64) -> Self {
        ScanRequest {
            flags: ScanFlags::CHECK_WPASYNC,
            ..Self::harvest_written(start, end)
        }
    }

    /// Every page matching any of `anyof`, reporting `report`.
    pub fn any_of(start: u64, end: u64, anyof: Categories, report: Categories) -> Self {
        ScanRequest {
            start,
            end,
            flags: ScanFlags::empty(),
            category_inverted: Categories::empty(),
            category_mask: Categories::empty(),
            category_anyof_mask: anyof,
            return_mask: report,
            max_pages: 0,
        }
    }
}

/// Why a scan failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// The kernel has no PAGEMAP_SCAN (before 6.7).
    #[error("PAGEMAP_SCAN is not available on this kernel (ENOTTY; needs Linux 6.7+)")]
    NotSupported,
    /// CHECK_WPASYNC found a VMA that is not registered WP with a WP_ASYNC context.
    #[error(
        "PAGEMAP_SCAN: {start:#x}..{end:#x} touches memory not registered for async write-protect (EPERM from PM_SCAN_CHECK_WPASYNC)"
    )]
    NotWpAsync {
        /// Start of the request.
        start: u64,
        /// End of the request.
        end: u64,
    },
    /// The request was rejected before the call.
    #[error("PAGEMAP_SCAN: bad request {start:#x}..{end:#x}: {why}")]
    BadRequest {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Why.
        why: &'static str,
    },
    /// Any other errno.
    #[error("PAGEMAP_SCAN on {start:#x}..{end:#x} failed: {errno}")]
    Kernel {
        /// Start of the call that failed.
        start: u64,
        /// End.
        end: u64,
        /// The errno.
        errno: Errno,
    },
    /// The pagemap file could not be opened.
    #[error("cannot open {path}: {errno}")]
    Open {
        /// The path.
        path: String,
        /// The errno.
        errno: Errno,
    },
}

/// An open `/proc/PID/pagemap` with a reusable output buffer.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    buf: Vec<sys::page_region>,
}

/// Default output buffer length (regions per ioctl).
pub const DEFAULT_VEC_LEN: usize = 1024;

impl Pagemap {
    /// This process's pagemap.
    pub fn open_self() -> Result<Pagemap, ScanError> {
        Self::open_path("/proc/self/pagemap".into())
    }

    /// Another process's pagemap (needs PTRACE_MODE_READ on it; WP_MATCHING
    /// then re-protects *its* memory).
    pub fn open_pid(pid: i32) -> Result<Pagemap, ScanError> {
        Self::open_path(format!("/proc/{pid}/pagemap"))
    }

    fn open_path(path: String) -> Result<Pagemap, ScanError> {
        let file = File::open(&path).map_err(|e| ScanError::Open {
            path,
            errno: e.into(),
        })?;
        Ok(Pagemap {
            file,
            buf: vec![sys::page_region::default(); DEFAULT_VEC_LEN],
        })
    }

    /// Sets how many regions one ioctl may return (at least 1).
    pub fn set_vec_len(&mut self, len: usize) {
        self.buf = vec![sys::page_region::default(); len.max(1)];
    }

    /// Starts a scan. The iterator issues as many ioctls as needed, resumes
    /// correctly when the output buffer fills (including the kernel's stale
    /// `walk_end` after more than 512 regions), honours `max_pages` across calls,
    /// and merges adjacent regions with equal categories.
    pub fn scan(&mut self, req: ScanRequest) -> Scan<'_> {
        let bad = if req.start % BASE_PAGE as u64 != 0 {
            Some("start is not page aligned")
        } else if req.end < req.start {
            Some("end lies before start")
        } else {
            None
        };
        Scan {
            cursor: req.start,
            pages_left: req.max_pages,
            pos: 0,
            filled: 0,
            pending: None,
            finished: bad.is_none() && req.end == req.start,
            bad,
            calls: 0,
            pagemap: self,
            req,
        }
    }

    /// One raw PAGEMAP_SCAN call; returns (regions filled, walk_end).
    fn call(
        &mut self,
        req: &ScanRequest,
        start: u64,
        max_pages: u64,
    ) -> Result<(usize, u64), ScanError> {
        let mut arg = sys::pm_scan_arg {
            size: std::mem::size_of::<sys::pm_scan_arg>() as u64,
            flags: req.flags.bits(),
            start,
            end: req.end,
            walk_end: 0,
            vec: self.buf.as_mut_ptr() as u64,
            vec_len: self.buf.len() as u64,
            max_pages,
            category_inverted: req.category_inverted.bits(),
            category_mask: req.category_mask.bits(),
            category_anyof_mask: req.category_anyof_mask.bits(),
            return_mask: req.return_mask.bits(),
        };
        // SAFETY: `arg` is a valid pm_scan_arg of the size the kernel checks; `vec`
        // points to `vec_len` writable page_regions owned by `self.buf`, which is not
        // touched while the call runs.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), sys::PAGEMAP_SCAN as _, &mut arg) };
        if ret < 0 {
            return Err(match Errno::last() {
                Errno::NOTTY => ScanError::NotSupported,
                Errno::PERM if req.flags.contains(ScanFlags::CHECK_WPASYNC) => {
                    ScanError::NotWpAsync {
                        start: req.start,
                        end: req.end,
                    }
                }
                errno => ScanError::Kernel {
                    start,
                    end: req.end,
                    errno,
                },
            });
        }
        // `ret` is the count of regions written, never more than vec_len.
        let filled = usize::try_from(ret).unwrap_or(0).min(self.buf.len());
        Ok((filled, arg.walk_end))
    }

    /// Whether this kernel has PAGEMAP_SCAN (a zero-length scan on our own pagemap).
    pub fn is_supported() -> bool {
        match Pagemap::open_self() {
            Ok(mut pm) => {
                let here = pm.buf.as_ptr() as u64 & !(BASE_PAGE as u64 - 1);
                let req = ScanRequest::any_of(
                    here,
                    here + BASE_PAGE as u64,
                    Categories::PRESENT,
                    Categories::PRESENT,
                );
                !matches!(pm.call(&req, here, 0), Err(ScanError::NotSupported))
            }
            Err(_) => false,
        }
    }
}

/// An in-progress scan; yields merged regions in address order.
#[derive(Debug)]
pub struct Scan<'a> {
    pagemap: &'a mut Pagemap,
    req: ScanRequest,
    cursor: u64,
    pages_left: u64,
    pos: usize,
    filled: usize,
    pending: Option<PageRegion>,
    finished: bool,
    bad: Option<&'static str>,
    calls: u64,
}

impl Scan<'_> {
    /// How many ioctls the scan has issued so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    fn fetch(&mut self) -> Result<(), ScanError> {
        if self.cursor >= self.req.end {
            self.finished = true;
            return Ok(());
        }
        let limited = self.req.max_pages != 0;
        let (filled, walk_end) = self.pagemap.call(&self.req, self.cursor, self.pages_left)?;
        self.calls += 1;
        self.pos = 0;
        self.filled = filled;
        let mut pages = 0;
        for r in &self.pagemap.buf[..filled] {
            pages += r.end.saturating_sub(r.start) / BASE_PAGE as u64;
        }
        if limited {
            self.pages_left = self.pages_left.saturating_sub(pages);
        }
        // The walk is complete when the buffer did not fill and the page budget
        // was not reached. Otherwise resume after the last region: `walk_end` alone
        // is stale once a call returned more than 512 regions.
        let buffer_full = filled == self.pagemap.buf.len();
        let budget_hit = limited && self.pages_left == 0;
        if budget_hit || !buffer_full {
            self.finished = true;
        } else {
            let last_end = self.pagemap.buf[filled - 1].end;
            let next = walk_end.max(last_end);
            if next <= self.cursor {
                // No progress would loop forever; the kernel contract rules it out.
                self.finished = true;
            }
            self.cursor = next;
        }
        Ok(())
    }
}

impl Iterator for Scan<'_> {
    type Item = Result<PageRegion, ScanError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(why) = self.bad.take() {
            self.finished = true;
            return Some(Err(ScanError::BadRequest {
                start: self.req.start,
                end: self.req.end,
                why,
            }));
        }
        loop {
            if self.pos < self.filled {
                let raw = self.pagemap.buf[self.pos];
                self.pos += 1;
                let r = PageRegion {
                    start: raw.start,
                    end: raw.end,
                    categories: Categories::from_bits_retain(raw.categories),
                };
                match &mut self.pending {
                    Some(p) if p.end == r.start && p.categories == r.categories => p.end = r.end,
                    Some(p) => {
                        let out = *p;
                        *p = r;
                        return Some(Ok(out));
                    }
                    None => self.pending = Some(r),
                }
                continue;
            }
            if self.finished {
                return self.pending.take().map(Ok);
            }
            if let Err(e) = self.fetch() {
                self.finished = true;
                self.filled = 0;
                return Some(Err(e));
            }
        }
    }
}
