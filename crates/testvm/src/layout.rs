//! Guest physical memory layout and the boot structures in it.
//!
//! ```text
//! 0x0000_1000  PML4
//! 0x0000_2000  PDPT (one page: up to 512 GiB)
//! 0x0000_3000  page directories, one per GiB, 2 MiB pages, identity mapped
//! 0x0008_0000  GDT (null, 64-bit code, data)
//! 0x0008_1000  guest code
//! 0x0020_0000  data area: split into one slice per vCPU, page aligned
//! ```

/// Guest physical address of the PML4.
pub const PML4: u64 = 0x1000;
/// Guest physical address of the PDPT.
pub const PDPT: u64 = 0x2000;
/// Guest physical address of the first page directory.
pub const PD_BASE: u64 = 0x3000;
/// Most page directories (GiB of RAM) the layout has room for.
pub const MAX_GIB: u64 = (GDT - PD_BASE) / 0x1000;
/// Guest physical address of the GDT.
pub const GDT: u64 = 0x8_0000;
/// Guest physical address of the code.
pub const CODE: u64 = 0x8_1000;
/// Start of the data area the workloads write.
pub const DATA_START: u64 = 0x20_0000;
/// Smallest supported RAM.
pub const MIN_RAM: u64 = 4 << 20;
/// Guest page size the workloads think in.
pub const GUEST_PAGE: u64 = 4096;

/// GDT entries: null, code (selector 0x8), data (selector 0x10).
pub const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// The boot structures for `ram` bytes: (guest address, bytes) pairs.
pub fn boot_structures(ram: u64) -> Vec<(u64, Vec<u8>)> {
    let gib = ram.div_ceil(1 << 30);
    let mut out = Vec::new();
    out.push((PML4, entry_page(&[PDPT | 0x3])));
    let pdpt: Vec<u64> = (0..gib).map(|i| (PD_BASE + i * 0x1000) | 0x3).collect();
    out.push((PDPT, entry_page(&pdpt)));
    for g in 0..gib {
        // 2 MiB pages: present | writable | PS.
        let pd: Vec<u64> = (0..512u64)
            .map(|i| ((g << 30) + (i << 21)) | 0x83)
            .collect();
        out.push((PD_BASE + g * 0x1000, entry_page(&pd)));
    }
    out.push((
        GDT,
        GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect(),
    ));
    out
}

fn entry_page(entries: &[u64]) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    for (i, e) in entries.iter().enumerate() {
        page[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    page
}

/// The data-area slice of vCPU `vcpu` of `vcpus`: (guest address, pages).
pub fn slice(ram: u64, vcpus: u32, vcpu: u32) -> (u64, u64) {
    let pages = (ram - DATA_START) / GUEST_PAGE / u64::from(vcpus);
    (DATA_START + u64::from(vcpu) * pages * GUEST_PAGE, pages)
}
