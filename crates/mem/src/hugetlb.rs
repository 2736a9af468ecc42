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

fn set_total(pages: u64) -> std::io::Result<()> {
    fs::write(format!("{POOL}/nr_hugepages"), pages.to_string())
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

/// Pages a caller added to the pool; they are given back on drop.
#[derive(Debug, Default)]
pub struct PoolGrowth(u64);

impl PoolGrowth {
    /// Pages added.
    pub fn pages(&self) -> u64 {
        self.0
    }

    /// Grows the pool by `pages` more (a racing mapping may have taken the pages
    /// [`ensure_free`] found free).
    pub fn grow(&mut self, pages: u64) -> std::io::Result<()> {
        let before = total_pages();
        set_total(before + pages)?;
        self.0 += total_pages().saturating_sub(before);
        Ok(())
    }
}

impl Drop for PoolGrowth {
    fn drop(&mut self) {
        if self.0 > 0 {
            // Best effort: pages still in use elsewhere become surplus until freed.
            let _ = set_total(total_pages().saturating_sub(self.0));
        }
    }
}

/// Makes sure at least `pages` 2 MiB pages are free and unreserved, growing
/// the pool if needed (needs root). The growth goes back to the pool when the
/// returned guard drops.
pub fn ensure_free(pages: u64) -> std::io::Result<PoolGrowth> {
    let mut growth = PoolGrowth::default();
    let have = free_pages();
    if have >= pages {
        return Ok(growth);
    }
    growth.grow(pages - have)?;
    let now = free_pages();
    if now < pages {
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!(
                "the pool has only {now} free huge pages of the {pages} needed after growing it to {} \
                 (memory too fragmented or too little RAM)",
                total_pages()
            ),
        ));
    }
    Ok(growth)
}
