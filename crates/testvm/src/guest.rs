//! Guest programs, generated with iced-x86's code assembler.
//!
//! Register contract at entry (set by the host per vCPU):
//! `rdi` = slice base, `rsi` = slice pages, `r8` = vCPU id << 48,
//! `r11` = PRNG state (dirty), `rcx` = iterations (dirty).
//! Progress: `out 0x10, eax` with the count done so far every
//! [`PROGRESS_EVERY`] steps; at the end `out 0x11, eax` (the final count), then `hlt`.

use iced_x86::code_asm::*;

/// Port the guest reports progress on.
pub const PORT_PROGRESS: u16 = 0x10;
/// Port the guest reports completion on.
pub const PORT_DONE: u16 = 0x11;
/// Steps between two progress reports.
pub const PROGRESS_EVERY: u32 = 1024;

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Workload {
    /// Each vCPU writes one word into every page of its slice, once.
    Touch,
    /// Each vCPU does `iterations` read-modify-writes of pseudo-random words of
    /// its slice, stamped with (vCPU, sequence number).
    Dirty {
        /// PRNG seed.
        seed: u64,
        /// Writes per vCPU.
        iterations: u64,
    },
    /// Reads a non-canonical address with no IDT: a triple fault, for tests.
    Crash,
}

impl Workload {
    /// The steps vCPU `vcpu` performs (pages for touch, iterations for dirty).
    pub fn steps(&self, slice_pages: u64) -> u64 {
        match self {
            Workload::Touch => slice_pages,
            Workload::Dirty { iterations, .. } => *iterations,
            Workload::Crash => 0,
        }
    }
}

/// The PRNG state vCPU `vcpu` starts from.
pub fn initial_state(seed: u64, vcpu: u32) -> u64 {
    let s = seed ^ (u64::from(vcpu) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if s == 0 { 0x2545_f491_4f6c_dd1d } else { s }
}

/// Assembles `workload` for loading at [`crate::layout::CODE`].
pub fn assemble(workload: Workload, at: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    match workload {
        Workload::Touch => touch(&mut a)?,
        Workload::Dirty { .. } => dirty(&mut a)?,
        Workload::Crash => {
            // A load from a non-canonical address: #GP, and with no IDT the
            // CPU escalates to a triple fault (KVM_EXIT_SHUTDOWN).
            a.mov(rax, 0x8000_0000_0000_0000u64)?;
            a.mov(rbx, qword_ptr(rax))?;
            a.hlt()?;
        }
    }
    a.assemble(at)
}

fn report(a: &mut CodeAssembler, port: u16, count: AsmRegister64) -> Result<(), IcedError> {
    a.mov(rax, count)?;
    a.mov(edx, u32::from(port))?;
    a.out(dx, eax)?;
    Ok(())
}

/// The common loop tail: counts the step in r10, reports progress every
/// [`PROGRESS_EVERY`] steps, jumps back to `top`; at `done` reports the final
/// count and halts.
fn step_and_loop(
    a: &mut CodeAssembler,
    top: CodeLabel,
    mut done: CodeLabel,
) -> Result<(), IcedError> {
    let mut skip = a.create_label();
    a.inc(r10)?;
    a.test(r10d, PROGRESS_EVERY - 1)?;
    a.jnz(skip)?;
    report(a, PORT_PROGRESS, r10)?;
    a.set_label(&mut skip)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    report(a, PORT_DONE, r10)?;
    a.hlt()?;
    Ok(())
}

/// for i in 0..pages: [base + i*4096] = i | vcpu<<48
fn touch(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let done = a.create_label();
    a.xor(r10, r10)?;
    a.mov(rbx, rdi)?;
    a.set_label(&mut top)?;
    a.cmp(r10, rsi)?;
    a.jae(done)?;
    a.mov(rax, r10)?;
    a.or(rax, r8)?;
    a.mov(qword_ptr(rbx), rax)?;
    a.add(rbx, 4096)?;
    step_and_loop(a, top, done)
}

/// for seq in 0..iterations:
///   state = xorshift64(state)
///   page = ((state >> 32) * pages) >> 32; word = state & 511
///   w = [base + page*4096 + word*8]
///   [..] = rol(w, 13) ^ (vcpu<<48 | seq) + state
fn dirty(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let done = a.create_label();
    a.xor(r10, r10)?;
    a.set_label(&mut top)?;
    a.cmp(r10, rcx)?;
    a.jae(done)?;
    // xorshift64
    a.mov(rax, r11)?;
    a.shl(rax, 13)?;
    a.xor(r11, rax)?;
    a.mov(rax, r11)?;
    a.shr(rax, 7)?;
    a.xor(r11, rax)?;
    a.mov(rax, r11)?;
    a.shl(rax, 17)?;
    a.xor(r11, rax)?;
    // page index and word offset
    a.mov(rax, r11)?;
    a.shr(rax, 32)?;
    a.imul_2(rax, rsi)?;
    a.shr(rax, 32)?;
    a.shl(rax, 12)?;
    a.mov(rbx, r11)?;
    a.and(rbx, 511)?;
    a.lea(rbx, ptr(rax + rbx * 8))?;
    a.add(rbx, rdi)?;
    // read-modify-write
    a.mov(rax, qword_ptr(rbx))?;
    a.rol(rax, 13)?;
    a.mov(r12, r8)?;
    a.or(r12, r10)?;
    a.xor(rax, r12)?;
    a.add(rax, r11)?;
    a.mov(qword_ptr(rbx), rax)?;
    step_and_loop(a, top, done)
}
