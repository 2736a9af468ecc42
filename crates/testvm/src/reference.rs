//! The host-side oracle: the final data-area contents a workload produces,
//! computed without a VM, and the checksum both sides use.

use std::collections::HashMap;

use crate::guest::{Workload, initial_state};
use crate::layout::{DATA_START, GUEST_PAGE, slice};

/// Mixes one non-zero word at data-area word index `index`. Zero words
/// contribute nothing, so a sparse reference and a full scan agree.
#[inline]
pub fn mix(index: u64, word: u64) -> u64 {
    if word == 0 {
        return 0;
    }
    let mut x = word ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x | 1
}

/// Adds the words of `bytes` (starting at data-area byte offset `offset`) into `sum`.
pub fn accumulate(sum: &mut u64, offset: u64, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        *sum = sum.wrapping_add(mix(offset / 8 + i as u64, w));
    }
}

/// The checksum the workload must leave in the data area.
pub fn expected_checksum(workload: Workload, ram: u64, vcpus: u32) -> u64 {
    let mut words: HashMap<u64, u64> = HashMap::new();
    for v in 0..vcpus {
        let (base, pages) = slice(ram, vcpus, v);
        let base_word = (base - DATA_START) / 8;
        let tag = u64::from(v) << 48;
        match workload {
            Workload::Touch => {
                for i in 0..pages {
                    words.insert(base_word + i * GUEST_PAGE / 8, i | tag);
                }
            }
            Workload::Dirty { seed, iterations } => {
                let mut s = initial_state(seed, v);
                for seq in 0..iterations {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let page = ((s >> 32) * pages) >> 32;
                    let word = s & 511;
                    let idx = base_word + page * (GUEST_PAGE / 8) + word;
                    let old = words.get(&idx).copied().unwrap_or(0);
                    let new = (old.rotate_left(13) ^ (tag | seq)).wrapping_add(s);
                    words.insert(idx, new);
                }
            }
            Workload::Crash => {}
        }
    }
    words
        .iter()
        .fold(0u64, |acc, (i, w)| acc.wrapping_add(mix(*i, *w)))
}
