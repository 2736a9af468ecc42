//! The two KVM calls whose safety rests on memory: the guest RAM slot and
//! a vCPU's XSAVE area.
//!
//! # Safety
//!
//! A memory slot makes KVM access the region's mapping for as long as the
//! VM lives. [`GuestVm`] owns the VM fd and an `Arc` of the region
//! together, the fd declared first so it is closed before the region can be
//! unmapped; whoever holds a `GuestVm` (the test VM, a dirty-log reader)
//! keeps both.
#![allow(unsafe_code)]

use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region, kvm_xsave};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use livepage_mem::Region;

use crate::{VmError, kvm_err};

/// A VM with its guest RAM in slot 0, tied to the region it maps.
pub(crate) struct GuestVm {
    /// Declared first: closed before the region may be unmapped.
    pub(crate) fd: VmFd,
    /// Kept alive, not used: the slot points into it.
    _region: Arc<Region>,
}

impl GuestVm {
    /// A new VM whose first `ram` bytes of guest-physical memory are the
    /// first `ram` bytes of `region` (which must hold that many).
    pub(crate) fn new(
        kvm: &Kvm,
        region: Arc<Region>,
        ram: u64,
        dirty_log: bool,
    ) -> Result<GuestVm, VmError> {
        if (region.len() as u64) < ram {
            return Err(crate::SpecError::RegionTooSmall {
                region: region.len() as u64,
                ram,
            }
            .into());
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: ram,
            userspace_addr: region.addr() as u64,
        };
        // SAFETY: the slot covers `ram` bytes of the region's mapping (checked
        // above); the returned GuestVm owns both the fd and an Arc of the
        // region, and drops the fd first, so the mapping outlives the slot;
        // it is the only slot, so nothing overlaps.
        unsafe { fd.set_user_memory_region(slot) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(GuestVm {
            fd,
            _region: region,
        })
    }
}

/// KVM_SET_XSAVE with a full legacy-size area.
pub(crate) fn set_xsave(fd: &VcpuFd, xsave: &kvm_xsave) -> Result<(), VmError> {
    // SAFETY: `xsave` is a full legacy-size kvm_xsave; this VM enables no
    // dynamic xfeatures, so KVM copies no more than those 4096 bytes.
    unsafe { fd.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
}

/// The signal that kicks a vCPU thread out of KVM_RUN (KVM_RUN returns
/// EINTR; its handler does nothing).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| VmError::Kvm {
            what: "installing the vCPU kick signal handler",
            source: kvm_ioctls::Error::new(errno),
        })
}

/// A vCPU thread that can be kicked while it runs.
#[derive(Debug)]
pub(crate) struct Kickable(libc::pthread_t);

impl Kickable {
    /// The calling thread.
    pub(crate) fn current() -> Kickable {
        // SAFETY: pthread_self has no preconditions and cannot fail.
        Kickable(unsafe { libc::pthread_self() })
    }

    /// Sends the kick signal. The caller guarantees the thread is still
    /// alive: threads deregister (under the same lock the kicker holds)
    /// before they end.
    pub(crate) fn kick(&self) {
        // SAFETY: the thread id is live (see above); the signal has a
        // handler installed by `install_kick_handler` before any vCPU ran,
        // so delivery only interrupts KVM_RUN or a syscall with EINTR.
        unsafe {
            libc::pthread_kill(self.0, kick_signal());
        }
    }
}
