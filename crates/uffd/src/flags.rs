//! Bit sets the kernel hands out. Every set keeps bits this crate does not
//! name (`const _ = !0`), so a newer kernel's answer survives a round trip.

use bitflags::bitflags;
use livepage_sys as sys;

bitflags! {
    /// `uffdio_api.features`: what a context may enable or what the kernel supports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct Features: u64 {
        /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`
        const PAGEFAULT_FLAG_WP = sys::feature::PAGEFAULT_FLAG_WP;
        /// `UFFD_FEATURE_EVENT_FORK` (needs CAP_SYS_PTRACE at handshake)
        const EVENT_FORK = sys::feature::EVENT_FORK;
        /// `UFFD_FEATURE_EVENT_REMAP`
        const EVENT_REMAP = sys::feature::EVENT_REMAP;
        /// `UFFD_FEATURE_EVENT_REMOVE`
        const EVENT_REMOVE = sys::feature::EVENT_REMOVE;
        /// `UFFD_FEATURE_MISSING_HUGETLBFS`
        const MISSING_HUGETLBFS = sys::feature::MISSING_HUGETLBFS;
        /// `UFFD_FEATURE_MISSING_SHMEM`
        const MISSING_SHMEM = sys::feature::MISSING_SHMEM;
        /// `UFFD_FEATURE_EVENT_UNMAP`
        const EVENT_UNMAP = sys::feature::EVENT_UNMAP;
        /// `UFFD_FEATURE_SIGBUS`
        const SIGBUS = sys::feature::SIGBUS;
        /// `UFFD_FEATURE_THREAD_ID`
        const THREAD_ID = sys::feature::THREAD_ID;
        /// `UFFD_FEATURE_MINOR_HUGETLBFS`
        const MINOR_HUGETLBFS = sys::feature::MINOR_HUGETLBFS;
        /// `UFFD_FEATURE_MINOR_SHMEM`
        const MINOR_SHMEM = sys::feature::MINOR_SHMEM;
        /// `UFFD_FEATURE_EXACT_ADDRESS`
        const EXACT_ADDRESS = sys::feature::EXACT_ADDRESS;
        /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`
        const WP_HUGETLBFS_SHMEM = sys::feature::WP_HUGETLBFS_SHMEM;
        /// `UFFD_FEATURE_WP_UNPOPULATED`
        const WP_UNPOPULATED = sys::feature::WP_UNPOPULATED;
        /// `UFFD_FEATURE_POISON`
        const POISON = sys::feature::POISON;
        /// `UFFD_FEATURE_WP_ASYNC`
        const WP_ASYNC = sys::feature::WP_ASYNC;
        /// `UFFD_FEATURE_MOVE`
        const MOVE = sys::feature::MOVE;
        const _ = !0;
    }
}

impl Features {
    /// The `UFFD_FEATURE_*` name of each known flag in the set, in bit order.
    pub fn names(self) -> Vec<&'static str> {
        self.iter_names().map(|(n, _)| n).collect()
    }
}

bitflags! {
    /// A mask of ioctls, as `1 << _UFFDIO_*` (`uffdio_api.ioctls`, `uffdio_register.ioctls`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`
        const REGISTER = 1 << sys::ioctl_nr::REGISTER;
        /// `UFFDIO_UNREGISTER`
        const UNREGISTER = 1 << sys::ioctl_nr::UNREGISTER;
        /// `UFFDIO_WAKE`
        const WAKE = 1 << sys::ioctl_nr::WAKE;
        /// `UFFDIO_COPY`
        const COPY = 1 << sys::ioctl_nr::COPY;
        /// `UFFDIO_ZEROPAGE`
        const ZEROPAGE = 1 << sys::ioctl_nr::ZEROPAGE;
        /// `UFFDIO_MOVE`
        const MOVE = 1 << sys::ioctl_nr::MOVE;
        /// `UFFDIO_WRITEPROTECT`
        const WRITEPROTECT = 1 << sys::ioctl_nr::WRITEPROTECT;
        /// `UFFDIO_CONTINUE`
        const CONTINUE = 1 << sys::ioctl_nr::CONTINUE;
        /// `UFFDIO_POISON`
        const POISON = 1 << sys::ioctl_nr::POISON;
        /// `UFFDIO_API`
        const API = 1 << sys::ioctl_nr::API;
        const _ = !0;
    }
}

impl Ioctls {
    /// The `UFFDIO_*` name of each known ioctl in the set.
    pub fn names(self) -> Vec<&'static str> {
        self.iter_names().map(|(n, _)| n).collect()
    }
}

bitflags! {
    /// `uffdio_register.mode`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct RegisterMode: u64 {
        /// Report faults on missing pages (resolve with COPY/ZEROPAGE/MOVE/POISON).
        const MISSING = sys::register_mode::MISSING;
        /// Report (or, with WP_ASYNC, record) writes to write-protected pages.
        const WP = sys::register_mode::WP;
        /// Report faults on pages present in the page cache but not mapped (resolve with CONTINUE).
        const MINOR = sys::register_mode::MINOR;
        const _ = !0;
    }
}

bitflags! {
    /// `uffd_msg.arg.pagefault.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct FaultFlags: u64 {
        /// The access was a write.
        const WRITE = sys::pagefault_flag::WRITE;
        /// A write to a write-protected page.
        const WP = sys::pagefault_flag::WP;
        /// A minor fault (page in the page cache, not mapped).
        const MINOR = sys::pagefault_flag::MINOR;
        const _ = !0;
    }
}

bitflags! {
    /// PAGEMAP_SCAN page categories (`PAGE_IS_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct Categories: u64 {
        /// `PAGE_IS_WPALLOWED`: in a VMA registered WP with a WP_ASYNC context.
        const WPALLOWED = sys::page_is::WPALLOWED;
        /// `PAGE_IS_WRITTEN`: the uffd-wp bit is clear (written since protected).
        const WRITTEN = sys::page_is::WRITTEN;
        /// `PAGE_IS_FILE`
        const FILE = sys::page_is::FILE;
        /// `PAGE_IS_PRESENT`
        const PRESENT = sys::page_is::PRESENT;
        /// `PAGE_IS_SWAPPED`
        const SWAPPED = sys::page_is::SWAPPED;
        /// `PAGE_IS_PFNZERO`
        const PFNZERO = sys::page_is::PFNZERO;
        /// `PAGE_IS_HUGE`
        const HUGE = sys::page_is::HUGE;
        /// `PAGE_IS_SOFT_DIRTY` (needs CONFIG_MEM_SOFT_DIRTY)
        const SOFT_DIRTY = sys::page_is::SOFT_DIRTY;
        /// `PAGE_IS_GUARD`
        const GUARD = sys::page_is::GUARD;
        const _ = !0;
    }
}

impl Categories {
    /// Every category this crate names.
    pub const KNOWN: Categories = Categories::from_bits_retain(0x1ff);
}

bitflags! {
    /// PAGEMAP_SCAN flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct ScanFlags: u64 {
        /// `PM_SCAN_WP_MATCHING`: write-protect the selected pages that are written.
        const WP_MATCHING = sys::pm_scan::WP_MATCHING;
        /// `PM_SCAN_CHECK_WPASYNC`: fail (EPERM) on any VMA that is not WP-async.
        const CHECK_WPASYNC = sys::pm_scan::CHECK_WPASYNC;
        const _ = !0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_bits_survive() {
        let f = Features::from_bits_retain(0x1ffff | (1 << 40));
        assert_eq!(f.bits(), 0x1ffff | (1 << 40));
        assert!(f.contains(Features::WP_ASYNC | Features::MOVE));
        assert_eq!(f.names().len(), 17);
        let i = Ioctls::from_bits_retain(0x8000_0000_0000_0003 | (1 << 20));
        assert!(i.contains(Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER));
        assert_eq!(i.bits() & (1 << 20), 1 << 20);
    }
}
