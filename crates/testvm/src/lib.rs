//! A tiny KVM test VM whose memory livepage manages.
//!
//! The guest is set up directly in 64-bit long mode (identity-mapped page
//! tables with 2 MiB pages, a three-entry GDT, no IDT, no firmware, no
//! devices): it talks to the host only through port I/O for progress and
//! completion. Guest programs are generated with iced-x86 ([`guest`]); the
//! final state of the data area is a pure function of (workload, seed,
//! iterations, vCPU count), computed on the host by [`mod@reference`].
//!
//! Guest RAM is any livepage [`Region`] (anon, THP, memfd/shmem, hugetlbfs);
//! the caller may register it with a userfaultfd before the vCPUs run, which
//! is how the engines serve a guest's faults. vCPUs pause at progress reports
//! (every [`guest::PROGRESS_EVERY`] steps), their state can be saved
//! ([`state::VmState`]) and restored into a new VM, in this process or
//! another, over the same memory contents.
//!
//! On a host with hardware virtualization the same VM runs at native speed;
//! on this project's machine KVM has no hardware assists and a long-mode
//! guest runs about a million instructions per second, so the programs spend
//! a few instructions per page.
//!
//! `unsafe` is denied here and allowed only in the modules that need it
//! (`kvm`: the guest RAM slot and XSAVE; `state`: KVM's state structs).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod control;
pub mod guest;
mod kvm;
pub mod layout;
pub mod reference;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_regs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use livepage_mem::{MemoryKind, Region};
use livepage_uffd::{Categories, Pagemap, ScanRequest};

use control::Throttle;
pub use control::{RunControl, RunOutcome};
pub use guest::Workload;
pub use state::{StateError, VcpuState, VmState};

use layout::{CODE, DATA_START, MIN_RAM};

/// What a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSpec {
    /// Guest RAM in bytes (a multiple of 2 MiB).
    pub ram: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The program.
    pub workload: Workload,
}

/// Why the VM could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error(
        "KVM is not available: /dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd or use a host that offers virtualization)"
    )]
    NoKvm,
    /// /dev/kvm cannot be opened.
    #[error(
        "KVM is not available: cannot open /dev/kvm: {0} (add this user to the `kvm` group or run as root)"
    )]
    KvmAccess(#[source] std::io::Error),
    /// A bad spec.
    #[error("invalid VM spec: {0}")]
    Spec(#[from] SpecError),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The guest stopped in a way it never does when healthy.
    #[error("vCPU {vcpu} crashed: {reason}\n{registers}")]
    GuestCrashed {
        /// Which vCPU.
        vcpu: u32,
        /// The exit.
        reason: String,
        /// A register dump.
        registers: String,
    },
    /// Guest code could not be assembled.
    #[error("assembling the guest program failed")]
    Assemble(#[source] iced_x86::IcedError),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] livepage_mem::RegionError),
    /// Restoring from a state that does not match.
    #[error("VM state does not match this VM: {0}")]
    StateMismatch(#[from] StateMismatch),
    /// A vCPU thread panicked.
    #[error("a vCPU thread panicked")]
    VcpuPanicked,
}

/// What is wrong with a VM spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// vCPUs out of range.
    #[error("{0} vCPUs: use 1 to 64")]
    Vcpus(u32),
    /// RAM not a multiple of 2 MiB, or too little.
    #[error("RAM {ram} bytes: use a multiple of 2 MiB of at least {min_mib} MiB")]
    Ram {
        /// Bytes asked for.
        ram: u64,
        /// The least.
        min_mib: u64,
    },
    /// More RAM than the layout maps.
    #[error("RAM {gib} GiB exceeds the layout's {max_gib} GiB")]
    TooMuchRam {
        /// GiB asked for.
        gib: u64,
        /// The most.
        max_gib: u64,
    },
    /// Too little RAM for that many vCPUs.
    #[error("too little RAM for {0} vCPUs")]
    RamPerVcpu(u32),
    /// Iterations that do not fit in 32 bits.
    #[error("{0} iterations: they must fit in 32 bits (progress is reported in eax)")]
    Iterations(u64),
    /// A region smaller than guest RAM.
    #[error("region of {region} bytes is smaller than RAM {ram}")]
    RegionTooSmall {
        /// The region's bytes.
        region: u64,
        /// RAM.
        ram: u64,
    },
}

/// How a saved VM state differs from the VM it is loaded into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateMismatch {
    /// vCPU ids not in order.
    #[error("vCPU ids out of order ({id} at {index})")]
    VcpuOrder {
        /// The id found.
        id: u32,
        /// Where.
        index: usize,
    },
    /// An XSAVE area of another size.
    #[error("XSAVE area of {0} words")]
    Xsave(usize),
    /// KVM took fewer MSRs than given.
    #[error("KVM accepted {accepted} of {given} MSRs")]
    Msrs {
        /// Taken.
        accepted: usize,
        /// Given.
        given: usize,
    },
    /// The MSR list could not be built.
    #[error("the MSR list of {0} entries is too long for KVM")]
    MsrList(usize),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The MSRs saved and restored with each vCPU.
pub const SAVED_MSRS: [u32; 11] = [
    0x0000_0010, // TSC
    0x0000_0174, // SYSENTER_CS
    0x0000_0175, // SYSENTER_ESP
    0x0000_0176, // SYSENTER_EIP
    0x0000_0277, // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0102, // KERNEL_GS_BASE
];

/// Checks that /dev/kvm can be used.
pub fn check_host() -> Result<(), VmError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VmError::NoKvm),
        Err(e) => Err(VmError::KvmAccess(e)),
    }
}

/// Checks a spec against the layout and the region.
pub fn validate(spec: &VmSpec) -> Result<(), VmError> {
    if spec.vcpus == 0 || spec.vcpus > 64 {
        return Err(SpecError::Vcpus(spec.vcpus).into());
    }
    if spec.ram < MIN_RAM || spec.ram % (2 << 20) != 0 {
        return Err(SpecError::Ram {
            ram: spec.ram,
            min_mib: MIN_RAM >> 20,
        }
        .into());
    }
    if spec.ram > layout::MAX_GIB << 30 {
        return Err(SpecError::TooMuchRam {
            gib: spec.ram >> 30,
            max_gib: layout::MAX_GIB,
        }
        .into());
    }
    let (_, pages) = layout::slice(spec.ram, spec.vcpus, 0);
    if pages == 0 {
        return Err(SpecError::RamPerVcpu(spec.vcpus).into());
    }
    if let Workload::Dirty { iterations, .. } = spec.workload {
        if iterations > u64::from(u32::MAX) {
            return Err(SpecError::Iterations(iterations).into());
        }
    }
    Ok(())
}

/// Writes the page tables, GDT and program into guest memory. Call before
/// registering the region with a userfaultfd (or fill these pages some other way).
pub fn prepare_memory(region: &Region, spec: &VmSpec) -> Result<(), VmError> {
    validate(spec)?;
    if (region.len() as u64) < spec.ram {
        return Err(SpecError::RegionTooSmall {
            region: region.len() as u64,
            ram: spec.ram,
        }
        .into());
    }
    for (gpa, bytes) in layout::boot_structures(spec.ram) {
        region.write(gpa as usize, &bytes)?;
    }
    let code = guest::assemble(spec.workload, CODE).map_err(VmError::Assemble)?;
    region.write(CODE as usize, &code)?;
    Ok(())
}

/// The bytes [`prepare_memory`] writes below the data area, as one block
/// (for a restore source that must serve them).
pub fn boot_block(spec: &VmSpec) -> Result<Vec<u8>, VmError> {
    validate(spec)?;
    let mut block = vec![0u8; DATA_START as usize];
    for (gpa, bytes) in layout::boot_structures(spec.ram) {
        block[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(&bytes);
    }
    let code = guest::assemble(spec.workload, CODE).map_err(VmError::Assemble)?;
    block[CODE as usize..CODE as usize + code.len()].copy_from_slice(&code);
    Ok(block)
}

/// Options for a VM.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmOptions {
    /// Enable KVM_MEM_LOG_DIRTY_PAGES on the memory slot.
    pub dirty_log: bool,
}

struct Vcpu {
    fd: VcpuFd,
    id: u32,
    progress: u64,
    finished: bool,
}

/// A test VM over a region.
pub struct TestVm {
    spec: VmSpec,
    _kvm: Kvm,
    vm: Arc<kvm::GuestVm>,
    vcpus: Vec<Vcpu>,
    region: Arc<Region>,
}

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestVm")
            .field("spec", &self.spec)
            .field("memory", &self.region.kind())
            .finish_non_exhaustive()
    }
}

impl TestVm {
    /// Creates the VM with fresh vCPUs at the program's entry. The region must
    /// already hold [`prepare_memory`]'s contents (or be able to fault them in).
    pub fn new(region: Arc<Region>, spec: VmSpec, opts: VmOptions) -> Result<TestVm, VmError> {
        let mut vm = Self::create(region, spec, opts)?;
        for v in 0..spec.vcpus {
            vm.set_initial(v)?;
        }
        Ok(vm)
    }

    /// Creates the VM and loads every vCPU from `state`.
    pub fn restore(
        region: Arc<Region>,
        state: &VmState,
        opts: VmOptions,
    ) -> Result<TestVm, VmError> {
        let spec = VmSpec {
            ram: state.ram,
            vcpus: state.vcpus.len() as u32,
            workload: state.workload,
        };
        let mut vm = Self::create(region, spec, opts)?;
        for (i, s) in state.vcpus.iter().enumerate() {
            if s.id as usize != i {
                return Err(StateMismatch::VcpuOrder { id: s.id, index: i }.into());
            }
            vm.load(i, s)?;
        }
        Ok(vm)
    }

    fn create(region: Arc<Region>, spec: VmSpec, opts: VmOptions) -> Result<TestVm, VmError> {
        check_host()?;
        validate(&spec)?;
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm::GuestVm::new(&kvm, region.clone(), spec.ram, opts.dirty_log)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..spec.vcpus {
            let fd = vm
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            vcpus.push(Vcpu {
                fd,
                id,
                progress: 0,
                finished: false,
            });
        }
        Ok(TestVm {
            spec,
            _kvm: kvm,
            vm: Arc::new(vm),
            vcpus,
            region,
        })
    }

    fn set_initial(&mut self, v: u32) -> Result<(), VmError> {
        let spec = self.spec;
        let fd = &self.vcpus[v as usize].fd;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_bindings::kvm_segment {
            selector: 0x10,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = layout::GDT;
        sregs.gdt.limit = (layout::GDT_ENTRIES.len() * 8 - 1) as u16;
        sregs.cr3 = layout::PML4;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 0x8000_0000 | 0x20 | 0x10 | 0x2 | 0x1; // PG, NE, ET, MP, PE
        sregs.efer = 0x500; // LME | LMA
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let (base, pages) = layout::slice(spec.ram, spec.vcpus, v);
        let (state, iterations) = match spec.workload {
            Workload::Dirty { seed, iterations } => (guest::initial_state(seed, v), iterations),
            _ => (0, 0),
        };
        let regs = kvm_regs {
            rip: CODE,
            rflags: 0x2,
            rdi: base,
            rsi: pages,
            r8: u64::from(v) << 48,
            r11: state,
            rcx: iterations,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    fn load(&mut self, i: usize, s: &VcpuState) -> Result<(), VmError> {
        let v = &mut self.vcpus[i];
        v.fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        v.fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        v.fd.set_fpu(&s.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        let mut xsave = kvm_bindings::kvm_xsave::default();
        if s.xsave.len() != xsave.region.len() {
            return Err(StateMismatch::Xsave(s.xsave.len()).into());
        }
        xsave.region.copy_from_slice(&s.xsave);
        kvm::set_xsave(&v.fd, &xsave)?;
        v.fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| StateMismatch::MsrList(s.msrs.len()))?;
        let set = v.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != s.msrs.len() {
            return Err(StateMismatch::Msrs {
                accepted: set,
                given: s.msrs.len(),
            }
            .into());
        }
        v.fd.set_vcpu_events(&s.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        v.fd.set_mp_state(s.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        v.progress = s.progress;
        v.finished = s.finished;
        Ok(())
    }

    /// The spec.
    pub fn spec(&self) -> VmSpec {
        self.spec
    }

    /// The guest memory.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Steps done per vCPU.
    pub fn progress(&self) -> Vec<u64> {
        self.vcpus.iter().map(|v| v.progress).collect()
    }

    /// Whether every vCPU has halted after its last step.
    pub fn finished(&self) -> bool {
        self.vcpus.iter().all(|v| v.finished)
    }

    /// Runs every vCPU on its own thread until all halt (Finished) or all stop at
    /// a progress report because of `control` (Paused). A crash of any vCPU is
    /// returned as [`VmError::GuestCrashed`] with its registers; the others are
    /// stopped at their next report.
    pub fn run(&mut self, control: &Arc<RunControl>) -> Result<RunOutcome, VmError> {
        for v in &self.vcpus {
            control.progress[v.id as usize].store(v.progress, Ordering::Relaxed);
        }
        kvm::install_kick_handler()?;
        let abort = AtomicBool::new(false);
        let results: Vec<Result<bool, VmError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .filter(|v| !v.finished)
                .map(|v| {
                    let abort = &abort;
                    s.spawn(move || {
                        control.enter(v.id);
                        let r = run_vcpu(v, control, abort);
                        control.leave(v.id);
                        if r.is_err() {
                            abort.store(true, Ordering::SeqCst);
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(VmError::VcpuPanicked)))
                .collect()
        });
        let mut paused = false;
        for r in results {
            paused |= !r?;
        }
        Ok(if paused {
            RunOutcome::Paused
        } else {
            RunOutcome::Finished
        })
    }

    /// Saves every vCPU's state. Call after [`TestVm::run`] returned.
    pub fn save(&self) -> Result<VmState, VmError> {
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let mut msrs = Msrs::from_entries(
                &SAVED_MSRS
                    .iter()
                    .map(|&index| kvm_msr_entry {
                        index,
                        ..Default::default()
                    })
                    .collect::<Vec<_>>(),
            )
            .map_err(|_| StateMismatch::MsrList(SAVED_MSRS.len()))?;
            let got = v.fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
            vcpus.push(VcpuState {
                id: v.id,
                finished: v.finished,
                progress: v.progress,
                regs: v.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                sregs: v.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
                fpu: v.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
                xsave: v
                    .fd
                    .get_xsave()
                    .map_err(kvm_err("KVM_GET_XSAVE"))?
                    .region
                    .to_vec(),
                xcrs: v.fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
                msrs: msrs.as_slice()[..got].to_vec(),
                events: v
                    .fd
                    .get_vcpu_events()
                    .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
                mp_state: v.fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            });
        }
        Ok(VmState {
            ram: self.spec.ram,
            workload: self.spec.workload,
            vcpus,
        })
    }

    /// KVM's dirty bitmap of guest RAM since the last call (one bit per 4 KiB
    /// page). Needs [`VmOptions::dirty_log`].
    pub fn dirty_log(&self) -> Result<Vec<u64>, VmError> {
        self.vm
            .fd
            .get_dirty_log(0, self.spec.ram as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }

    /// A reader of KVM's dirty log that does not borrow the VM (for a
    /// tracker that lives beside it): each call returns the bitmap since the
    /// previous one. Needs [`VmOptions::dirty_log`].
    pub fn dirty_log_reader(&self) -> impl FnMut() -> std::io::Result<Vec<u64>> + Send + 'static {
        // The reader holds the VM (and with it the region) alive.
        let (vm, ram) = (self.vm.clone(), self.spec.ram as usize);
        move || {
            vm.fd
                .get_dirty_log(0, ram)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        }
    }

    /// Whether this host offers KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING).
    pub fn dirty_ring_available(&self) -> bool {
        self.vm.fd.check_extension_raw(192) > 0
    }
}

/// Runs one vCPU; Ok(true) when it halted, Ok(false) when it stopped at a report.
fn run_vcpu(v: &mut Vcpu, control: &RunControl, abort: &AtomicBool) -> Result<bool, VmError> {
    let mut throttle = Throttle::default();
    // No I/O is pending completion (at the start, and after KVM_RUN was
    // interrupted): the vCPU may stop here with a consistent state.
    let mut clean = true;
    loop {
        if clean && (control.pause.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst)) {
            return Ok(false);
        }
        let exit = match v.fd.run() {
            Ok(e) => e,
            // Kicked (pause_now): KVM_RUN left the guest between two
            // instructions, after completing any pending I/O.
            Err(e) if e.errno() == libc_eintr() || e.errno() == libc_eagain() => {
                clean = true;
                continue;
            }
            Err(source) => {
                return Err(VmError::Kvm {
                    what: "KVM_RUN",
                    source,
                });
            }
        };
        clean = false;
        let report = match exit {
            VcpuExit::IoOut(port, data)
                if port == guest::PORT_PROGRESS || port == guest::PORT_DONE =>
            {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                Some((port, u64::from(u32::from_le_bytes(b))))
            }
            VcpuExit::Hlt => {
                v.finished = true;
                return Ok(true);
            }
            VcpuExit::Shutdown => return Err(crashed(v, "triple fault (KVM_EXIT_SHUTDOWN)")),
            other => {
                let reason = format!("unexpected exit {other:?}");
                return Err(crashed(v, &reason));
            }
        };
        if let Some((port, count)) = report {
            v.progress = count;
            control.progress[v.id as usize].store(count, Ordering::Relaxed);
            throttle.wait(count, control, abort);
            let stop = port == guest::PORT_PROGRESS
                && (control.stop_at.is_some_and(|s| count >= s)
                    || control.pause.load(Ordering::SeqCst)
                    || abort.load(Ordering::SeqCst));
            if stop {
                // Complete the pending OUT without running further guest code, so
                // the saved state is consistent.
                v.fd.set_kvm_immediate_exit(1);
                let r = v.fd.run().map(|_| ()).map_err(|e| e.errno());
                v.fd.set_kvm_immediate_exit(0);
                match r {
                    Ok(()) => {}
                    Err(e) if e == libc_eintr() => {}
                    Err(e) => {
                        return Err(VmError::Kvm {
                            what: "KVM_RUN (completing I/O)",
                            source: kvm_ioctls::Error::new(e),
                        });
                    }
                }
                return Ok(false);
            }
        }
    }
}

/// Holds a vCPU to the control's rate, measured from the first report
/// under the current rate.
fn libc_eintr() -> i32 {
    livepage_uffd::Errno::INTR.0
}
fn libc_eagain() -> i32 {
    livepage_uffd::Errno::AGAIN.0
}

fn crashed(v: &Vcpu, reason: &str) -> VmError {
    let registers = match (v.fd.get_regs(), v.fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rdi={:#x} rsi={:#x}\n\
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} progress={}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rdi,
            r.rsi,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            v.progress
        ),
        (Err(e), _) | (_, Err(e)) => format!("(registers unreadable: {e})"),
    };
    VmError::GuestCrashed {
        vcpu: v.id,
        reason: reason.to_string(),
        registers,
    }
}

/// The checksum of the data area of `region` (guest RAM `ram` bytes), the
/// value [`reference::expected_checksum`] predicts. Anonymous memory is
/// scanned with PAGEMAP_SCAN so never-touched pages cost nothing; the region
/// must not be registered with a userfaultfd that would block the reads.
pub fn checksum(region: &Region, ram: u64) -> Result<u64, VmError> {
    let mut sum = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let base = region.addr() as u64;
    let mut chunk = |sum: &mut u64, start: u64, end: u64| -> Result<(), VmError> {
        let mut off = start;
        while off < end {
            let n = (end - off).min(buf.len() as u64) as usize;
            region.read(off as usize, &mut buf[..n])?;
            reference::accumulate(sum, off - DATA_START, &buf[..n]);
            off += n as u64;
        }
        Ok(())
    };
    let sparse = matches!(region.kind(), MemoryKind::Anon | MemoryKind::Thp);
    let scanned = if sparse {
        Pagemap::open_self().ok().and_then(|mut pm| {
            let req = ScanRequest::any_of(
                base + DATA_START,
                base + ram,
                Categories::PRESENT | Categories::SWAPPED,
                Categories::empty(),
            );
            pm.scan(req).collect::<Result<Vec<_>, _>>().ok()
        })
    } else {
        None
    };
    match scanned {
        Some(regions) => {
            for r in regions {
                chunk(&mut sum, r.start - base, r.end - base)?;
            }
        }
        None => chunk(&mut sum, DATA_START, ram)?,
    }
    Ok(sum)
}
