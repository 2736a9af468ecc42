//! How page ranges become frames: pieces that never cross a 2 MiB block,
//! each block always on the same bulk connection, so two copies of a page
//! (rounds apart) travel one connection in order. Kernel-free.

/// The block a page keeps its connection by.
pub(crate) const BLOCK_BYTES: u64 = 2 << 20;
/// The largest data chunk of one frame.
pub(crate) const CHUNK_BYTES: u64 = 256 << 10;

/// The bulk connection of `page` of `region`.
pub(crate) fn conn_of(region: usize, page: u64, page_size: u64, conns: usize) -> usize {
    let block_pages = (BLOCK_BYTES / page_size).max(1);
    ((page / block_pages + region as u64 * 7919) % conns.max(1) as u64) as usize
}

/// Cuts pages `[start, end)` of `region` into pieces of at most
/// `max_bytes` that never cross a block: `(first, count, connection)`.
pub(crate) fn pieces(
    region: usize,
    start: u64,
    end: u64,
    page_size: u64,
    max_bytes: u64,
    conns: usize,
) -> impl Iterator<Item = (u64, u32, usize)> {
    let block_pages = (BLOCK_BYTES / page_size).max(1);
    let max_pages = (max_bytes / page_size).clamp(1, block_pages);
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let block_end = (at / block_pages + 1) * block_pages;
        let stop = end.min(block_end).min(at + max_pages);
        let piece = (
            at,
            (stop - at) as u32,
            conn_of(region, at, page_size, conns),
        );
        at = stop;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pieces_cover_exactly_and_keep_each_block_on_one_connection(
            region in 0usize..4, start in 0u64..5000, len in 0u64..5000,
            huge: bool, max in 1u64..2_000_000, conns in 1usize..6,
        ) {
            let ps = if huge { 2 << 20 } else { 4096 };
            let end = start + len;
            let mut at = start;
            for (first, count, conn) in pieces(region, start, end, ps, max, conns) {
                prop_assert_eq!(first, at);
                prop_assert!(count >= 1);
                prop_assert!(u64::from(count) * ps <= max.max(ps));
                let last = first + u64::from(count) - 1;
                prop_assert_eq!(first * ps / BLOCK_BYTES.max(ps), last * ps / BLOCK_BYTES.max(ps));
                prop_assert_eq!(conn, conn_of(region, last, ps, conns));
                prop_assert!(conn < conns);
                at += u64::from(count);
            }
            prop_assert_eq!(at, end.max(start));
        }
    }
}
