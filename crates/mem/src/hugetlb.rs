//! The hugetlb page pool: how many 2 MiB pages are free, and reserving more.

use std::fs;

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Size of the huge pages this module manages.
pub const HUGE_PAGE: usize = 2 << 20;

fn read_u64(name: &str) -> Option<u64> {
    fs::read_to_string(format!("{POOL}/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Total 2 MiB pages in the pool.
pub fn total_pages() -> u64 {
    read_u64("nr_hugepages").unwrap_or(0)
}

/// Free 2 MiB pages not yet reserved by a mapping.
pub fn free_pages() -> u64 {
    let free = read_u64("free_hugepages").unwrap_or(0);
    let resv = read_u64("resv_hugepages").unwrap_or(0);
    free.saturating_sub(resv)
}

/// Makes sure at least `pages` 2 MiB pages are free and unreserved, growing
/// the pool if needed (needs root). Returns the number of pages now available.
pub fn ensure_free(pages: u64) -> std::io::Result<u64> {
    let have = free_pages();
    if have >= pages {
        return Ok(have);
    }
    let want = total_pages() + (pages - have);
    fs::write(format!("{POOL}/nr_hugepages"), want.to_string())?;
    let now = free_pages();
    if now < pages {
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!(
                "asked the kernel for {want} huge pages but only {now} of the {pages} needed are free \
                 (memory too fragmented or too little RAM)"
            ),
        ));
    }
    Ok(now)
}

/// Grows the pool by `pages` unconditionally (used to retry when a racing
/// mapping took the pages [`ensure_free`] found free).
pub fn grow(pages: u64) -> std::io::Result<()> {
    fs::write(
        format!("{POOL}/nr_hugepages"),
        (total_pages() + pages).to_string(),
    )
}
