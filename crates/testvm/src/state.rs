//! Serialized vCPU state: everything needed to continue a paused test VM in
//! another process from the same memory. Layout (all integers little-endian):
//!
//! ```text
//! header   "LPVMSTAT" | version u32 (=1) | vcpus u32 | ram u64
//!          | workload tag u32 (0 touch, 1 dirty, 2 crash) | seed u64 | iterations u64
//! per vCPU id u32 | flags u32 (bit 0: finished) | progress u64 | sections u32
//!          then `sections` times: tag u32 | len u32 | bytes
//!          tags: 1 regs, 2 sregs, 3 fpu, 4 xsave, 5 xcrs, 6 msrs, 7 events, 8 mp_state
//!          (msrs: count u32, then count x (index u32, reserved u32, data u64))
//! trailer  crc32c u32 of every byte before it
//! ```
//! Each fixed-size section's length must equal the kernel struct's size, so a
//! state written on a kernel with a different layout is refused, not misread.
//!
//! # Safety
//!
//! The kvm structs are plain `#[repr(C)]` integer aggregates; they are copied
//! to and from bytes with `ptr::copy_nonoverlapping` after the lengths match.
#![allow(unsafe_code)]

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use crate::guest::Workload;

/// File magic.
pub const MAGIC: &[u8; 8] = b"LPVMSTAT";
/// Current version.
pub const VERSION: u32 = 1;

/// The state of one vCPU.
#[derive(Clone)]
pub struct VcpuState {
    /// vCPU id.
    pub id: u32,
    /// The guest reached its final `hlt`.
    pub finished: bool,
    /// Steps completed (the last progress report).
    pub progress: u64,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU state.
    pub fpu: kvm_fpu,
    /// XSAVE area (`kvm_xsave.region`, 4096 bytes).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The MSRs in use.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions/interrupts/NMIs.
    pub events: kvm_vcpu_events,
    /// Run state.
    pub mp_state: kvm_mp_state,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("finished", &self.finished)
            .field("progress", &self.progress)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The state of a whole test VM (memory excluded).
#[derive(Debug, Clone)]
pub struct VmState {
    /// Guest RAM bytes.
    pub ram: u64,
    /// The workload running.
    pub workload: Workload,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
}

/// Why a serialized state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Not a vCPU state.
    #[error("not a livepage VM state (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("VM state version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// The bytes end early.
    #[error("VM state truncated at byte {0}")]
    Truncated(usize),
    /// Checksum mismatch.
    #[error(
        "VM state checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the state is corrupt"
    )]
    Checksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// A section has the wrong size or is missing.
    #[error("VM state of vCPU {vcpu}: section {tag} {problem}")]
    Section {
        /// vCPU.
        vcpu: u32,
        /// Section tag.
        tag: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// Some other field is out of range.
    #[error("VM state field {0} is invalid")]
    Invalid(&'static str),
}

fn pod_bytes<T>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; std::mem::size_of::<T>()];
    // SAFETY: T is a plain-old-data kvm struct (integers and arrays of integers);
    // `out` has exactly size_of::<T>() bytes and does not overlap `v`.
    unsafe {
        std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), out.len())
    };
    out
}

fn pod_from<T: Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: the length matches (checked); every bit pattern is valid for these
    // integer-only kvm structs; the destination is a distinct local.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), bytes.len())
    };
    Some(v)
}

impl VmState {
    /// Serializes to the documented layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.ram.to_le_bytes());
        let (tag, seed, iters) = match self.workload {
            Workload::Touch => (0u32, 0u64, 0u64),
            Workload::Dirty { seed, iterations } => (1, seed, iterations),
            Workload::Crash => (2, 0, 0),
        };
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&seed.to_le_bytes());
        b.extend_from_slice(&iters.to_le_bytes());
        for v in &self.vcpus {
            b.extend_from_slice(&v.id.to_le_bytes());
            b.extend_from_slice(&u32::from(v.finished).to_le_bytes());
            b.extend_from_slice(&v.progress.to_le_bytes());
            let mut msrs = (v.msrs.len() as u32).to_le_bytes().to_vec();
            for m in &v.msrs {
                msrs.extend_from_slice(&m.index.to_le_bytes());
                msrs.extend_from_slice(&0u32.to_le_bytes());
                msrs.extend_from_slice(&m.data.to_le_bytes());
            }
            let sections: [(u32, Vec<u8>); 8] = [
                (1, pod_bytes(&v.regs)),
                (2, pod_bytes(&v.sregs)),
                (3, pod_bytes(&v.fpu)),
                (4, v.xsave.iter().flat_map(|w| w.to_le_bytes()).collect()),
                (5, pod_bytes(&v.xcrs)),
                (6, msrs),
                (7, pod_bytes(&v.events)),
                (8, pod_bytes(&v.mp_state)),
            ];
            b.extend_from_slice(&(sections.len() as u32).to_le_bytes());
            for (tag, data) in sections {
                b.extend_from_slice(&tag.to_le_bytes());
                b.extend_from_slice(&(data.len() as u32).to_le_bytes());
                b.extend_from_slice(&data);
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates the documented layout.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, StateError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(if bytes.len() < 8 {
                StateError::Truncated(bytes.len())
            } else {
                StateError::BadMagic
            });
        }
        let mut r = Reader { b: bytes, pos: 8 };
        let version = r.u32()?;
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        if bytes.len() < 4 + 8 {
            return Err(StateError::Truncated(bytes.len()));
        }
        let body = &bytes[..bytes.len() - 4];
        let stored = u32::from_le_bytes(
            bytes[bytes.len() - 4..]
                .try_into()
                .map_err(|_| StateError::Truncated(bytes.len()))?,
        );
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(StateError::Checksum { stored, computed });
        }
        let mut r = Reader { b: body, pos: 12 };
        let n = r.u32()?;
        if n == 0 || n > 1024 {
            return Err(StateError::Invalid("vcpu count"));
        }
        let ram = r.u64()?;
        let workload = match (r.u32()?, r.u64()?, r.u64()?) {
            (0, _, _) => Workload::Touch,
            (1, seed, iterations) => Workload::Dirty { seed, iterations },
            (2, _, _) => Workload::Crash,
            _ => return Err(StateError::Invalid("workload")),
        };
        let mut vcpus = Vec::new();
        for _ in 0..n {
            let id = r.u32()?;
            let finished = r.u32()? & 1 != 0;
            let progress = r.u64()?;
            let count = r.u32()?;
            let mut parts: [Option<&[u8]>; 9] = [None; 9];
            for _ in 0..count {
                let tag = r.u32()?;
                let len = r.u32()? as usize;
                let data = r.take(len)?;
                if (1..=8).contains(&tag) {
                    parts[tag as usize] = Some(data);
                }
            }
            let need = |tag: u32| {
                parts[tag as usize].ok_or(StateError::Section {
                    vcpu: id,
                    tag,
                    problem: "is missing",
                })
            };
            let bad = |tag: u32| StateError::Section {
                vcpu: id,
                tag,
                problem: "has the wrong size for this kernel's struct",
            };
            let msr_bytes = need(6)?;
            let mut mr = Reader {
                b: msr_bytes,
                pos: 0,
            };
            let mcount = mr.u32()? as usize;
            if msr_bytes.len() != 4 + mcount * 16 {
                return Err(bad(6));
            }
            let mut msrs = Vec::with_capacity(mcount);
            for _ in 0..mcount {
                let index = mr.u32()?;
                let _ = mr.u32()?;
                let data = mr.u64()?;
                msrs.push(kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                });
            }
            vcpus.push(VcpuState {
                id,
                finished,
                progress,
                regs: pod_from(need(1)?).ok_or_else(|| bad(1))?,
                sregs: pod_from(need(2)?).ok_or_else(|| bad(2))?,
                fpu: pod_from(need(3)?).ok_or_else(|| bad(3))?,
                xsave: {
                    let x = need(4)?;
                    if x.len() != std::mem::size_of::<kvm_xsave>() {
                        return Err(bad(4));
                    }
                    x.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                },
                xcrs: pod_from(need(5)?).ok_or_else(|| bad(5))?,
                msrs,
                events: pod_from(need(7)?).ok_or_else(|| bad(7))?,
                mp_state: pod_from(need(8)?).ok_or_else(|| bad(8))?,
            });
        }
        if r.pos != body.len() {
            return Err(StateError::Invalid("trailing bytes"));
        }
        Ok(VmState {
            ram,
            workload,
            vcpus,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(StateError::Truncated(self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> VmState {
        let regs = kvm_regs {
            rip: 0x81000,
            rcx: 77,
            ..Default::default()
        };
        let v = VcpuState {
            id: 0,
            finished: false,
            progress: 4096,
            regs,
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            xsave: vec![0; 1024],
            xcrs: kvm_xcrs::default(),
            msrs: vec![kvm_msr_entry {
                index: 0xc000_0080,
                data: 0x500,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
        };
        VmState {
            ram: 64 << 20,
            workload: Workload::Dirty {
                seed: 7,
                iterations: 100,
            },
            vcpus: vec![v.clone(), VcpuState { id: 1, ..v }],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = s.to_bytes();
        let t = VmState::from_bytes(&b).unwrap();
        assert_eq!(t.to_bytes(), b);
        assert_eq!(t.vcpus[1].regs.rcx, 77);
        assert_eq!(t.workload, s.workload);
    }

    #[test]
    fn rejects_version_and_corruption() {
        let mut b = sample().to_bytes();
        b[8] = 9;
        assert_eq!(VmState::from_bytes(&b).unwrap_err(), StateError::Version(9));
        let mut b = sample().to_bytes();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        assert!(matches!(
            VmState::from_bytes(&b),
            Err(StateError::Checksum { .. })
        ));
        assert_eq!(
            VmState::from_bytes(b"LPVM").unwrap_err(),
            StateError::Truncated(4)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn truncated_or_flipped_never_panics(cut in 0usize..10_000, flip in 0usize..10_000, bit in 0u8..8) {
            let b = sample().to_bytes();
            let cut = cut % (b.len() + 1);
            prop_assert!(VmState::from_bytes(&b[..cut]).is_err() || cut == b.len());
            let mut c = b.clone();
            let i = flip % c.len();
            c[i] ^= 1 << bit;
            prop_assert!(VmState::from_bytes(&c).is_err());
        }
    }
}
