//! Owned memory regions of each type the engines support.
//!
//! # Safety
//!
//! A region's memory may be changed by the kernel at any time once it is
//! registered with a userfaultfd, so it is never exposed as a Rust reference.
//! All access goes through the copy helpers here, which use raw pointer copies
//! bounded by the region's length.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsFd;

use livepage_uffd::mm::{self, Advice, AnonOptions, HugePageSize, Mapping};
use livepage_uffd::{Errno, Ioctls, RangeError, RegisterMode, Uffd};
use serde::{Deserialize, Serialize};

use crate::hugetlb;

/// The memory types livepage handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryKind {
    /// Private anonymous memory, THP disabled (4 KiB pages).
    Anon,
    /// Private anonymous memory, 2 MiB aligned with MADV_HUGEPAGE.
    Thp,
    /// A memfd (shmem) mapped shared, with an alias mapping.
    Shmem,
    /// A hugetlbfs memfd (2 MiB pages) mapped shared, with an alias mapping.
    Hugetlb,
}

impl MemoryKind {
    /// Every kind.
    pub const ALL: [MemoryKind; 4] = [
        MemoryKind::Anon,
        MemoryKind::Thp,
        MemoryKind::Shmem,
        MemoryKind::Hugetlb,
    ];

    /// The page size faults and resolutions work in.
    pub fn page_size(self) -> usize {
        match self {
            MemoryKind::Hugetlb => hugetlb::HUGE_PAGE,
            _ => livepage_uffd::BASE_PAGE,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Anon => "anon",
            MemoryKind::Thp => "thp",
            MemoryKind::Shmem => "shmem",
            MemoryKind::Hugetlb => "hugetlb",
        }
    }

    /// Whether the memory is file-backed with an alias (MINOR mode possible).
    pub fn has_page_cache(self) -> bool {
        matches!(self, MemoryKind::Shmem | MemoryKind::Hugetlb)
    }
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A memory type name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown memory type `{0}` (expected anon, thp, shmem or hugetlb)")]
pub struct UnknownKind(pub String);

impl std::str::FromStr for MemoryKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        match s {
            "anon" => Ok(MemoryKind::Anon),
            "thp" => Ok(MemoryKind::Thp),
            "shmem" | "memfd" => Ok(MemoryKind::Shmem),
            "hugetlb" | "hugetlbfs" => Ok(MemoryKind::Hugetlb),
            other => Err(UnknownKind(other.to_string())),
        }
    }
}

/// Why a region could not be created or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The length is zero or not a multiple of the page size.
    #[error("{kind} region length {len:#x} must be a non-zero multiple of {page:#x}")]
    BadLength {
        /// Memory type.
        kind: MemoryKind,
        /// Requested length.
        len: usize,
        /// Required multiple.
        page: usize,
    },
    /// mmap/memfd failed.
    #[error("cannot create a {len:#x}-byte {kind} region: {what} failed: {errno}")]
    Create {
        /// Memory type.
        kind: MemoryKind,
        /// Requested length.
        len: usize,
        /// The failing step.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// Not enough huge pages could be reserved.
    #[error("cannot reserve {pages} huge pages of 2 MiB for a hugetlb region")]
    HugePages {
        /// Pages needed.
        pages: u64,
        /// Why.
        source: std::io::Error,
    },
    /// An access outside the region.
    #[error("access {offset:#x}+{len:#x} is outside the {size:#x}-byte region")]
    OutOfBounds {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// Region size.
        size: usize,
    },
    /// madvise failed.
    #[error("madvise({advice:?}) on {offset:#x}+{len:#x} failed: {errno}")]
    Advise {
        /// Advice.
        advice: Advice,
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// The errno.
        errno: Errno,
    },
    /// Registration with a userfaultfd failed.
    #[error("userfaultfd (un)registration of the {kind} region failed")]
    Register {
        /// Memory type.
        kind: MemoryKind,
        /// Cause.
        source: RangeError,
    },
    /// The memory could not be read (it was unmapped).
    #[error("reading {offset:#x}+{len:#x} of the region failed ({errno}): was it unmapped?")]
    Unmapped {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// The errno (EFAULT).
        errno: Errno,
    },
    /// Reading a file into the region failed.
    #[error("reading {len:#x} bytes of a file at {file_offset:#x} into the region failed: {errno}")]
    ReadFile {
        /// File offset.
        file_offset: u64,
        /// Length.
        len: usize,
        /// The errno (EIO at end of file).
        errno: Errno,
    },
    /// Writing the page cache failed (ENOSPC: the tmpfs or memory cgroup is full).
    #[error("writing {len:#x} bytes of page cache at {offset:#x} failed: {errno}")]
    PageCache {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// The errno.
        errno: Errno,
    },
    /// The region has no memfd or alias (anon/THP).
    #[error("a {0} region has no page cache alias")]
    NoAlias(MemoryKind),
    /// Finding the memfd's data extents failed (SEEK_DATA/SEEK_HOLE).
    #[error("finding the data extents of the {kind} region's memfd failed: {errno}")]
    Extents {
        /// Memory type.
        kind: MemoryKind,
        /// The errno.
        errno: Errno,
    },
    /// Finding the present pages failed (PAGEMAP_SCAN).
    #[error("finding the present pages of the {kind} region failed")]
    Present {
        /// Memory type.
        kind: MemoryKind,
        /// Cause.
        source: livepage_uffd::ScanError,
    },
}

/// An owned region of memory of one [`MemoryKind`].
#[derive(Debug)]
pub struct Region {
    kind: MemoryKind,
    map: Mapping,
    alias: Option<Mapping>,
    file: Option<File>,
    // Declared last: fields drop in order, so the pages go back to the hugetlb
    // pool only after the mappings and the memfd released them.
    _pool: hugetlb::PoolGrowth,
}

impl Region {
    /// Creates a region of `len` bytes (a multiple of the kind's page size).
    /// Hugetlb regions reserve pages in the pool when too few are free.
    pub fn new(kind: MemoryKind, len: usize) -> Result<Region, RegionError> {
        let page = kind.page_size();
        if len == 0 || len % page != 0 {
            return Err(RegionError::BadLength { kind, len, page });
        }
        let err = |what, errno| RegionError::Create {
            kind,
            len,
            what,
            errno,
        };
        match kind {
            MemoryKind::Anon => {
                let map = Mapping::anonymous(
                    len,
                    AnonOptions {
                        no_reserve: true,
                        ..Default::default()
                    },
                )
                .map_err(|e| err("mmap", e))?;
                // Keep 4 KiB pages even where THP is "always".
                map.advise(0, len, Advice::NoHugePage)
                    .map_err(|e| err("madvise(NOHUGEPAGE)", e))?;
                Ok(Region {
                    kind,
                    map,
                    alias: None,
                    file: None,
                    _pool: Default::default(),
                })
            }
            MemoryKind::Thp => {
                let map = Mapping::anonymous(
                    len,
                    AnonOptions {
                        no_reserve: true,
                        align: Some(hugetlb::HUGE_PAGE),
                        ..Default::default()
                    },
                )
                .map_err(|e| err("mmap", e))?;
                map.advise(0, len, Advice::HugePage)
                    .map_err(|e| err("madvise(HUGEPAGE)", e))?;
                Ok(Region {
                    kind,
                    map,
                    alias: None,
                    file: None,
                    _pool: Default::default(),
                })
            }
            MemoryKind::Shmem | MemoryKind::Hugetlb => {
                let huge = (kind == MemoryKind::Hugetlb).then_some(HugePageSize::Size2M);
                let mut pool = hugetlb::PoolGrowth::default();
                if huge.is_some() {
                    let pages = (len / page) as u64;
                    pool = hugetlb::ensure_free(pages)
                        .map_err(|source| RegionError::HugePages { pages, source })?;
                }
                let file = mm::memfd_create(&format!("livepage-{kind}"), huge)
                    .map_err(|e| err("memfd_create", e))?;
                file.set_len(len as u64)
                    .map_err(|e| err("ftruncate", e.into()))?;
                // Hugetlb pages are reserved at mmap time; another process (or test)
                // may take the free pages between the check above and here.
                let mut tries = 0;
                let map = loop {
                    match Mapping::file(file.as_fd(), 0, len, true) {
                        Err(Errno::NOMEM) if huge.is_some() && tries < 3 => {
                            tries += 1;
                            let pages = (len / page) as u64;
                            pool.grow(pages)
                                .map_err(|source| RegionError::HugePages { pages, source })?;
                        }
                        other => break other.map_err(|e| err("mmap", e))?,
                    }
                };
                let alias = Mapping::file(file.as_fd(), 0, len, true)
                    .map_err(|e| err("mmap (alias)", e))?;
                Ok(Region {
                    kind,
                    map,
                    alias: Some(alias),
                    file: Some(file),
                    _pool: pool,
                })
            }
        }
    }

    /// The memory type.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// Start address of the main mapping.
    pub fn addr(&self) -> usize {
        self.map.addr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Page size (2 MiB for hugetlb, else 4 KiB).
    pub fn page_size(&self) -> usize {
        self.kind.page_size()
    }
    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len() / self.page_size()
    }
    /// Start address of the alias mapping (shmem/hugetlb).
    pub fn alias_addr(&self) -> Option<usize> {
        self.alias.as_ref().map(Mapping::addr)
    }
    /// The backing memfd (shmem/hugetlb).
    pub fn memfd(&self) -> Option<&File> {
        self.file.as_ref()
    }
    /// The main mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }
    /// Whether `addr` lies inside the main mapping.
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.addr() && addr - self.addr() < self.len()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), RegionError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(RegionError::OutOfBounds {
                offset,
                len,
                size: self.len(),
            }),
        }
    }

    fn base(&self, via_alias: bool) -> Result<*mut u8, RegionError> {
        if via_alias {
            self.alias
                .as_ref()
                .map(Mapping::as_ptr)
                .ok_or(RegionError::NoAlias(self.kind))
        } else {
            Ok(self.map.as_ptr())
        }
    }

    fn read_impl(&self, offset: usize, buf: &mut [u8], via_alias: bool) -> Result<(), RegionError> {
        self.check(offset, buf.len())?;
        let base = self.base(via_alias)?;
        // SAFETY: `offset + buf.len()` lies inside the mapping (checked); `buf` is a
        // distinct Rust buffer, so the ranges cannot overlap. The source may be changed
        // concurrently by the kernel or other threads; a torn read is the caller's
        // concern and no reference into the mapping is created.
        unsafe { std::ptr::copy_nonoverlapping(base.add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write_impl(&self, offset: usize, data: &[u8], via_alias: bool) -> Result<(), RegionError> {
        self.check(offset, data.len())?;
        let base = self.base(via_alias)?;
        // SAFETY: as in `read_impl`, with the roles swapped; the mapping is writable.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(offset), data.len()) };
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out of the region (may fault).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), RegionError> {
        self.read_impl(offset, buf, false)
    }
    /// Like [`Region::read`], but through the kernel: if the memory was unmapped
    /// behind the region's back the result is an error, never a crash.
    pub fn read_checked(&self, offset: usize, buf: &mut [u8]) -> Result<(), RegionError> {
        self.check(offset, buf.len())?;
        mm::read_own_memory(self.addr() + offset, buf).map_err(|errno| RegionError::Unmapped {
            offset,
            len: buf.len(),
            errno,
        })
    }

    /// Reads `len` bytes of `file` at `file_offset` straight into the region
    /// at `offset` (one copy, as an eager restore would).
    pub fn read_file(
        &self,
        file: &File,
        file_offset: u64,
        offset: usize,
        len: usize,
    ) -> Result<(), RegionError> {
        self.check(offset, len)?;
        // SAFETY: the range lies inside the region (checked), whose memory no Rust
        // reference points into.
        unsafe {
            mm::pread_into(
                std::os::fd::AsFd::as_fd(file),
                file_offset,
                self.addr() + offset,
                len,
            )
        }
        .map_err(|errno| RegionError::ReadFile {
            file_offset,
            len,
            errno,
        })
    }

    /// Copies `data` into the region at `offset` (may fault).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), RegionError> {
        self.write_impl(offset, data, false)
    }
    /// Reads through the alias mapping (never raises a userfault).
    pub fn read_alias(&self, offset: usize, buf: &mut [u8]) -> Result<(), RegionError> {
        self.read_impl(offset, buf, true)
    }
    /// Writes through the alias mapping: fills the page cache without a userfault.
    pub fn write_alias(&self, offset: usize, data: &[u8]) -> Result<(), RegionError> {
        self.write_impl(offset, data, true)
    }

    /// Fills the page cache at `offset`: pwrite(2) on the shmem memfd (no
    /// page-table faults), the alias mapping on hugetlbfs (which has no write(2)).
    pub fn write_page_cache(&self, offset: usize, data: &[u8]) -> Result<(), RegionError> {
        self.check(offset, data.len())?;
        match (&self.file, self.kind) {
            (Some(f), MemoryKind::Shmem) => {
                std::os::unix::fs::FileExt::write_all_at(f, data, offset as u64).map_err(|e| {
                    RegionError::PageCache {
                        offset,
                        len: data.len(),
                        errno: Errno::from(e),
                    }
                })
            }
            _ => self.write_alias(offset, data),
        }
    }

    /// Reads the aligned u64 at `offset` with one volatile load.
    pub fn read_u64(&self, offset: usize) -> Result<u64, RegionError> {
        self.check(offset, 8)?;
        if offset % 8 != 0 {
            return Err(RegionError::OutOfBounds {
                offset,
                len: 8,
                size: self.len(),
            });
        }
        // SAFETY: in bounds and 8-byte aligned (checked; the mapping is page aligned).
        Ok(unsafe { self.map.as_ptr().add(offset).cast::<u64>().read_volatile() })
    }

    /// Writes the aligned u64 at `offset` with one volatile store.
    pub fn write_u64(&self, offset: usize, value: u64) -> Result<(), RegionError> {
        self.check(offset, 8)?;
        if offset % 8 != 0 {
            return Err(RegionError::OutOfBounds {
                offset,
                len: 8,
                size: self.len(),
            });
        }
        // SAFETY: in bounds and 8-byte aligned (checked); the mapping is writable.
        unsafe {
            self.map
                .as_ptr()
                .add(offset)
                .cast::<u64>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Fills `[offset, offset+len)` with `byte` (faulting pages in).
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), RegionError> {
        self.check(offset, len)?;
        // SAFETY: in bounds (checked); the mapping is writable and never referenced.
        unsafe { std::ptr::write_bytes(self.map.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// Whether `[offset, offset+len)` is certainly all holes in the backing
    /// memfd (shmem/hugetlb: never written, reads as zeros without allocating).
    /// Always false for anonymous memory.
    pub fn is_hole(&self, offset: usize, len: usize) -> bool {
        let Some(f) = &self.file else { return false };
        match mm::seek_data(f, offset as u64) {
            Ok(None) => true,
            Ok(Some(next)) => next >= (offset + len) as u64,
            Err(_) => false,
        }
    }

    /// Byte ranges that may hold data: pages present or swapped in this
    /// mapping (anon, THP; PAGEMAP_SCAN), the memfd's data extents (shmem;
    /// SEEK_DATA/SEEK_HOLE), or pages present in either mapping (hugetlbfs,
    /// which has no SEEK_DATA). Everything outside reads as
    /// zeros without ever having been written, so a copy can skip it.
    pub fn data_ranges(&self) -> Result<crate::RangeSet, RegionError> {
        let mut set = crate::RangeSet::new();
        let err = |errno| RegionError::Extents {
            kind: self.kind,
            errno,
        };
        let scan_err = |source| RegionError::Present {
            kind: self.kind,
            source,
        };
        match (&self.file, self.kind) {
            (Some(f), MemoryKind::Shmem) => {
                let mut off = 0u64;
                let end = self.len() as u64;
                while off < end {
                    let Some(start) = mm::seek_data(f, off).map_err(err)? else {
                        break;
                    };
                    if start >= end {
                        break;
                    }
                    let stop = mm::seek_hole(f, start)
                        .map_err(err)?
                        .unwrap_or(end)
                        .min(end);
                    set.insert(start, stop);
                    off = stop;
                }
            }
            // hugetlbfs has no SEEK_DATA (every offset is data to it): a page
            // is in its file once mapped through either of the mappings.
            _ => {
                let mut pm = livepage_uffd::Pagemap::open_self().map_err(scan_err)?;
                let bases = std::iter::once(self.addr()).chain(self.alias_addr());
                for base in bases {
                    let base = base as u64;
                    let req = livepage_uffd::ScanRequest::any_of(
                        base,
                        base + self.len() as u64,
                        livepage_uffd::Categories::PRESENT | livepage_uffd::Categories::SWAPPED,
                        livepage_uffd::Categories::empty(),
                    );
                    for r in pm.scan(req) {
                        let r = r.map_err(scan_err)?;
                        set.insert(r.start - base, r.end - base);
                    }
                }
            }
        }
        Ok(set)
    }

    /// madvise on part of the main mapping.
    pub fn advise(&self, offset: usize, len: usize, advice: Advice) -> Result<(), RegionError> {
        self.map
            .advise(offset, len, advice)
            .map_err(|errno| RegionError::Advise {
                advice,
                offset,
                len,
                errno,
            })
    }

    /// Discards `[offset, offset+len)`: the next read returns zeros. For
    /// shmem/hugetlb the page cache is freed too (MADV_REMOVE).
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), RegionError> {
        let advice = if self.kind.has_page_cache() {
            Advice::Remove
        } else {
            Advice::DontNeed
        };
        self.advise(offset, len, advice)
    }

    /// Registers the whole region with `uffd` in `mode`; returns the ioctls the
    /// range supports.
    pub fn register(&self, uffd: &Uffd, mode: RegisterMode) -> Result<Ioctls, RegionError> {
        // SAFETY: a Region never hands out references into its memory; every access
        // goes through the raw copies above, so the kernel changing it under us
        // breaks no aliasing rule. The region is not the handler's stack or heap.
        unsafe { uffd.register(self.addr(), self.len(), mode) }.map_err(|source| {
            RegionError::Register {
                kind: self.kind,
                source,
            }
        })
    }

    /// Registers `[offset, offset+len)` of the region with `uffd` in `mode`
    /// (for example one userfaultfd per vCPU slice of guest RAM).
    pub fn register_range(
        &self,
        uffd: &Uffd,
        offset: usize,
        len: usize,
        mode: RegisterMode,
    ) -> Result<Ioctls, RegionError> {
        self.check(offset, len)?;
        // SAFETY: as in `register`; the range lies inside the region (checked).
        unsafe { uffd.register(self.addr() + offset, len, mode) }.map_err(|source| {
            RegionError::Register {
                kind: self.kind,
                source,
            }
        })
    }

    /// Unregisters `[offset, offset+len)` from `uffd`.
    pub fn unregister_range(
        &self,
        uffd: &Uffd,
        offset: usize,
        len: usize,
    ) -> Result<(), RegionError> {
        self.check(offset, len)?;
        uffd.unregister(self.addr() + offset, len)
            .map_err(|source| RegionError::Register {
                kind: self.kind,
                source,
            })
    }

    /// Unregisters the whole region from `uffd`.
    pub fn unregister(&self, uffd: &Uffd) -> Result<(), RegionError> {
        uffd.unregister(self.addr(), self.len())
            .map_err(|source| RegionError::Register {
                kind: self.kind,
                source,
            })
    }
}
