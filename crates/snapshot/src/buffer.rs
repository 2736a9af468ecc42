//! The bounded copy-on-write buffer: original pages copied out by a write
//! fault wait here until the writer stores them. Kernel-free.
//!
//! The bound is a number of slots of one page each. Slots are allocated as
//! they are first needed and reused after, so a large bound costs nothing
//! until it is used, and taking a slot never allocates beyond the bound.
//! When every slot is in use, [`CowBuffer::take`] says so and the faulting
//! writer saves its page to the image synchronously instead.

use std::collections::VecDeque;
use std::sync::Mutex;

/// A copied page waiting for the writer: (global page, bytes).
pub(crate) type Filled = (u64, Vec<u8>);

#[derive(Debug, Default)]
struct Inner {
    /// Slots allocated and free again.
    free: Vec<Vec<u8>>,
    /// Slots holding a page (taken, or filled and queued).
    in_use: usize,
    /// Most slots in use at once.
    peak: usize,
    filled: VecDeque<Filled>,
}

/// At most `capacity` pages of `slot_size` bytes.
#[derive(Debug)]
pub(crate) struct CowBuffer {
    slot_size: usize,
    capacity: usize,
    inner: Mutex<Inner>,
}

impl CowBuffer {
    /// A buffer of `bytes` (rounded down to whole slots of `slot_size`).
    pub(crate) fn new(bytes: usize, slot_size: usize) -> CowBuffer {
        CowBuffer {
            slot_size,
            capacity: bytes / slot_size.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A slot of `slot_size` bytes to copy a page into, or `None` when the
    /// bound is reached.
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        let mut g = self.lock();
        let slot = match g.free.pop() {
            Some(s) => s,
            None if g.in_use < self.capacity => Vec::new(),
            None => return None,
        };
        g.in_use += 1;
        g.peak = g.peak.max(g.in_use);
        drop(g);
        let mut slot = slot;
        slot.resize(self.slot_size, 0);
        Some(slot)
    }

    /// Gives back a slot that was not filled.
    pub(crate) fn give_back(&self, slot: Vec<u8>) {
        let mut g = self.lock();
        g.in_use -= 1;
        g.free.push(slot);
    }

    /// Queues a filled slot for the writer.
    pub(crate) fn push(&self, page: u64, slot: Vec<u8>) {
        self.lock().filled.push_back((page, slot));
    }

    /// The oldest filled slot, if any. Release it with [`CowBuffer::release`]
    /// once stored.
    pub(crate) fn pop(&self) -> Option<Filled> {
        self.lock().filled.pop_front()
    }

    /// Frees a slot the writer has stored.
    pub(crate) fn release(&self, slot: Vec<u8>) {
        self.give_back(slot);
    }

    /// Slots in use now.
    pub(crate) fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// Most slots in use at once.
    pub(crate) fn peak(&self) -> usize {
        self.lock().peak
    }

    /// Bytes per slot.
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A fault copies page n (if a slot is free).
        Fault(u64),
        /// The writer stores the oldest filled page.
        Drain,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Against a model: slots in use never pass the bound, a fault gets
        /// a slot exactly when fewer than `capacity` are in use, and every
        /// page queued is stored once, in order.
        #[test]
        fn bounded_and_loses_no_page(cap in 0usize..6, ops in proptest::collection::vec(
            prop_oneof![(0u64..1000).prop_map(Op::Fault), Just(Op::Drain)], 0..200)) {
            let b = CowBuffer::new(cap * 4096 + 17, 4096);
            let mut queued = std::collections::VecDeque::new();
            let mut stored = Vec::new();
            for op in ops {
                match op {
                    Op::Fault(page) => {
                        let want = queued.len() < cap;
                        match b.take() {
                            Some(mut slot) => {
                                prop_assert!(want);
                                prop_assert_eq!(slot.len(), 4096);
                                slot[0] = page as u8;
                                b.push(page, slot);
                                queued.push_back(page);
                            }
                            None => prop_assert!(!want, "refused with {} of {cap} in use", queued.len()),
                        }
                    }
                    Op::Drain => {
                        let got = b.pop();
                        prop_assert_eq!(got.as_ref().map(|g| g.0), queued.pop_front());
                        if let Some((page, slot)) = got {
                            prop_assert_eq!(slot[0], page as u8);
                            stored.push(page);
                            b.release(slot);
                        }
                    }
                }
                prop_assert!(b.in_use() <= cap);
                prop_assert_eq!(b.in_use(), queued.len());
            }
            prop_assert!(b.peak() <= cap);
        }
    }

    #[test]
    fn a_huge_bound_costs_nothing_until_used() {
        // 1 TiB of bound: nothing is reserved up front.
        let b = CowBuffer::new(1 << 40, 4096);
        assert_eq!(b.in_use(), 0);
        let s = b.take().unwrap();
        b.give_back(s);
        assert_eq!(b.peak(), 1);
    }
}
