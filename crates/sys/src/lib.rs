//! Mirrors of the Linux uapi for userfaultfd (`linux/userfaultfd.h`) and
//! PAGEMAP_SCAN (`linux/fs.h`), x86-64 and aarch64 layout.
//!
//! This crate holds data only: `#[repr(C)]` structs, constants and ioctl
//! opcodes. The safe wrappers live in `livepage-uffd`. Layouts are checked at
//! compile time against the sizes the kernel expects.
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![allow(non_camel_case_types)]

use core::mem::size_of;

/// `UFFD_API`: the only API version the kernel accepts in `uffdio_api.api`.
pub const UFFD_API: u64 = 0xAA;
/// ioctl type byte of every userfaultfd ioctl.
pub const UFFDIO: u32 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: flag of userfaultfd(2) and `USERFAULTFD_IOC_NEW`.
pub const UFFD_USER_MODE_ONLY: u32 = 1;

// _IOC encoding (asm-generic): nr | type << 8 | size << 16 | dir << 30.
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

/// `_IO(0xAA, 0x00)`: ioctl on `/dev/userfaultfd` that returns a new userfaultfd.
pub const USERFAULTFD_IOC_NEW: u32 = ioc(0, UFFDIO, 0x00, 0);
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u32 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<uffdio_register>(),
);
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<uffdio_range>());
/// `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: u32 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<uffdio_range>());
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<uffdio_copy>());
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x04,
    size_of::<uffdio_zeropage>(),
);
/// `UFFDIO_MOVE` (6.8+).
pub const UFFDIO_MOVE: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x05, size_of::<uffdio_move>());
/// `UFFDIO_WRITEPROTECT` (5.7+).
pub const UFFDIO_WRITEPROTECT: u32 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    size_of::<uffdio_writeprotect>(),
);
/// `UFFDIO_CONTINUE` (5.13+).
pub const UFFDIO_CONTINUE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x07,
    size_of::<uffdio_continue>(),
);
/// `UFFDIO_POISON` (6.6+).
pub const UFFDIO_POISON: u32 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x08,
    size_of::<uffdio_poison>(),
);
/// `UFFDIO_API`.
pub const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<uffdio_api>());
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` on `/proc/PID/pagemap` (6.7+).
pub const PAGEMAP_SCAN: u32 = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u32,
    16,
    size_of::<pm_scan_arg>(),
);

/// ioctl numbers (bit positions in the `ioctls` masks the kernel returns).
pub mod ioctl_nr {
    /// `_UFFDIO_REGISTER`
    pub const REGISTER: u32 = 0x00;
    /// `_UFFDIO_UNREGISTER`
    pub const UNREGISTER: u32 = 0x01;
    /// `_UFFDIO_WAKE`
    pub const WAKE: u32 = 0x02;
    /// `_UFFDIO_COPY`
    pub const COPY: u32 = 0x03;
    /// `_UFFDIO_ZEROPAGE`
    pub const ZEROPAGE: u32 = 0x04;
    /// `_UFFDIO_MOVE`
    pub const MOVE: u32 = 0x05;
    /// `_UFFDIO_WRITEPROTECT`
    pub const WRITEPROTECT: u32 = 0x06;
    /// `_UFFDIO_CONTINUE`
    pub const CONTINUE: u32 = 0x07;
    /// `_UFFDIO_POISON`
    pub const POISON: u32 = 0x08;
    /// `_UFFDIO_API`
    pub const API: u32 = 0x3F;
}

/// `uffdio_api.features` bits.
pub mod feature {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFD_FEATURE_EVENT_FORK` (needs CAP_SYS_PTRACE)
    pub const EVENT_FORK: u64 = 1 << 1;
    /// `UFFD_FEATURE_EVENT_REMAP`
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// `UFFD_FEATURE_EVENT_REMOVE`
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    /// `UFFD_FEATURE_MISSING_SHMEM`
    pub const MISSING_SHMEM: u64 = 1 << 5;
    /// `UFFD_FEATURE_EVENT_UNMAP`
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// `UFFD_FEATURE_SIGBUS`
    pub const SIGBUS: u64 = 1 << 7;
    /// `UFFD_FEATURE_THREAD_ID`
    pub const THREAD_ID: u64 = 1 << 8;
    /// `UFFD_FEATURE_MINOR_HUGETLBFS`
    pub const MINOR_HUGETLBFS: u64 = 1 << 9;
    /// `UFFD_FEATURE_MINOR_SHMEM`
    pub const MINOR_SHMEM: u64 = 1 << 10;
    /// `UFFD_FEATURE_EXACT_ADDRESS`
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// `UFFD_FEATURE_WP_UNPOPULATED` (6.4)
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// `UFFD_FEATURE_POISON` (6.6)
    pub const POISON: u64 = 1 << 14;
    /// `UFFD_FEATURE_WP_ASYNC` (6.7)
    pub const WP_ASYNC: u64 = 1 << 15;
    /// `UFFD_FEATURE_MOVE` (6.8)
    pub const MOVE: u64 = 1 << 16;
}

/// `uffdio_register.mode` bits.
pub mod register_mode {
    /// `UFFDIO_REGISTER_MODE_MISSING`
    pub const MISSING: u64 = 1 << 0;
    /// `UFFDIO_REGISTER_MODE_WP`
    pub const WP: u64 = 1 << 1;
    /// `UFFDIO_REGISTER_MODE_MINOR`
    pub const MINOR: u64 = 1 << 2;
}

/// Mode bits of the resolving ioctls.
pub mod mode {
    /// `UFFDIO_COPY_MODE_DONTWAKE`
    pub const COPY_DONTWAKE: u64 = 1 << 0;
    /// `UFFDIO_COPY_MODE_WP`
    pub const COPY_WP: u64 = 1 << 1;
    /// `UFFDIO_ZEROPAGE_MODE_DONTWAKE`
    pub const ZEROPAGE_DONTWAKE: u64 = 1 << 0;
    /// `UFFDIO_WRITEPROTECT_MODE_WP`
    pub const WRITEPROTECT_WP: u64 = 1 << 0;
    /// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`
    pub const WRITEPROTECT_DONTWAKE: u64 = 1 << 1;
    /// `UFFDIO_CONTINUE_MODE_DONTWAKE`
    pub const CONTINUE_DONTWAKE: u64 = 1 << 0;
    /// `UFFDIO_CONTINUE_MODE_WP`
    pub const CONTINUE_WP: u64 = 1 << 1;
    /// `UFFDIO_POISON_MODE_DONTWAKE`
    pub const POISON_DONTWAKE: u64 = 1 << 0;
    /// `UFFDIO_MOVE_MODE_DONTWAKE`
    pub const MOVE_DONTWAKE: u64 = 1 << 0;
    /// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`
    pub const MOVE_ALLOW_SRC_HOLES: u64 = 1 << 1;
}

/// `uffd_msg.event` values.
pub mod event {
    /// `UFFD_EVENT_PAGEFAULT`
    pub const PAGEFAULT: u8 = 0x12;
    /// `UFFD_EVENT_FORK`
    pub const FORK: u8 = 0x13;
    /// `UFFD_EVENT_REMAP`
    pub const REMAP: u8 = 0x14;
    /// `UFFD_EVENT_REMOVE`
    pub const REMOVE: u8 = 0x15;
    /// `UFFD_EVENT_UNMAP`
    pub const UNMAP: u8 = 0x16;
}

/// `uffd_msg.arg.pagefault.flags` bits.
pub mod pagefault_flag {
    /// `UFFD_PAGEFAULT_FLAG_WRITE`
    pub const WRITE: u64 = 1 << 0;
    /// `UFFD_PAGEFAULT_FLAG_WP`
    pub const WP: u64 = 1 << 1;
    /// `UFFD_PAGEFAULT_FLAG_MINOR`
    pub const MINOR: u64 = 1 << 2;
}

/// PAGEMAP_SCAN page categories (`PAGE_IS_*`).
pub mod page_is {
    /// `PAGE_IS_WPALLOWED`: the VMA is registered WP with a WP_ASYNC context.
    pub const WPALLOWED: u64 = 1 << 0;
    /// `PAGE_IS_WRITTEN`: the uffd-wp bit is clear.
    pub const WRITTEN: u64 = 1 << 1;
    /// `PAGE_IS_FILE`
    pub const FILE: u64 = 1 << 2;
    /// `PAGE_IS_PRESENT`
    pub const PRESENT: u64 = 1 << 3;
    /// `PAGE_IS_SWAPPED`
    pub const SWAPPED: u64 = 1 << 4;
    /// `PAGE_IS_PFNZERO`
    pub const PFNZERO: u64 = 1 << 5;
    /// `PAGE_IS_HUGE`
    pub const HUGE: u64 = 1 << 6;
    /// `PAGE_IS_SOFT_DIRTY`
    pub const SOFT_DIRTY: u64 = 1 << 7;
    /// `PAGE_IS_GUARD` (~6.14)
    pub const GUARD: u64 = 1 << 8;
}

/// PAGEMAP_SCAN flags (`PM_SCAN_*`).
pub mod pm_scan {
    /// `PM_SCAN_WP_MATCHING`: write-protect the selected written pages.
    pub const WP_MATCHING: u64 = 1 << 0;
    /// `PM_SCAN_CHECK_WPASYNC`: fail with EPERM on a VMA that is not WP-async.
    pub const CHECK_WPASYNC: u64 = 1 << 1;
}

/// `/proc/PID/pagemap` entry bits.
pub mod pagemap_entry {
    /// bit 57: the PTE (or marker) is uffd-wp.
    pub const UFFD_WP: u64 = 1 << 57;
    /// bit 58: guard region.
    pub const GUARD: u64 = 1 << 58;
    /// bit 61: file page or shared anon.
    pub const FILE_SHARED: u64 = 1 << 61;
    /// bit 62: swapped.
    pub const SWAPPED: u64 = 1 << 62;
    /// bit 63: present.
    pub const PRESENT: u64 = 1 << 63;
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_api {
    /// Must be [`UFFD_API`].
    pub api: u64,
    /// In: features to enable. Out: every feature the kernel supports.
    pub features: u64,
    /// Out: fd-level ioctls.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_range {
    /// Page-aligned start address.
    pub start: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_register {
    /// The range to register.
    pub range: uffdio_range,
    /// OR of [`register_mode`] bits.
    pub mode: u64,
    /// Out: the ioctls the range supports.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_copy {
    /// Destination (registered) address.
    pub dst: u64,
    /// Source address in the caller's address space.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// [`mode`] bits.
    pub mode: u64,
    /// Out: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_zeropage {
    /// The range.
    pub range: uffdio_range,
    /// [`mode`] bits.
    pub mode: u64,
    /// Out: bytes zeroed, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_writeprotect {
    /// The range.
    pub range: uffdio_range,
    /// [`mode`] bits.
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_continue {
    /// The range.
    pub range: uffdio_range,
    /// [`mode`] bits.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub mapped: i64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_poison {
    /// The range.
    pub range: uffdio_range,
    /// [`mode`] bits.
    pub mode: u64,
    /// Out: bytes poisoned, or a negative errno.
    pub updated: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffdio_move {
    /// Destination (registered) address.
    pub dst: u64,
    /// Source address (private anon, same mm).
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// [`mode`] bits.
    pub mode: u64,
    /// Out: bytes moved, or a negative errno.
    pub moved: i64,
}

/// `struct uffd_msg`: 32 bytes, packed. The union is kept as raw bytes; see
/// `livepage-uffd` for the decoder.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct uffd_msg {
    /// One of [`event`].
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// The union `arg`, little-endian u64 words.
    pub arg: [u64; 3],
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pm_scan_arg {
    /// Must be `size_of::<pm_scan_arg>()` (96).
    pub size: u64,
    /// [`pm_scan`] flags.
    pub flags: u64,
    /// Start address (page aligned).
    pub start: u64,
    /// End address (rounded up).
    pub end: u64,
    /// Out: where the walk stopped.
    pub walk_end: u64,
    /// Address of a `page_region` array.
    pub vec: u64,
    /// Entries in `vec`.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// All of these must be set.
    pub category_mask: u64,
    /// At least one of these must be set (0: no condition).
    pub category_anyof_mask: u64,
    /// Categories reported in `page_region.categories`.
    pub return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct page_region {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Categories, masked by `return_mask`.
    pub categories: u64,
}

const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);
const _: () = assert!(size_of::<uffdio_poison>() == 32);
const _: () = assert!(size_of::<uffdio_move>() == 40);
const _: () = assert!(size_of::<uffd_msg>() == 32);
const _: () = assert!(size_of::<pm_scan_arg>() == 96);
const _: () = assert!(size_of::<page_region>() == 24);
// Values checked on x86-64 by the kernel-api reference.
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_CONTINUE == 0xc020_aa07);
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);
