//! Decoding `uffd_msg` into typed events.
//!
//! [`decode`] is pure (no fds are touched), so it can be fuzzed and property
//! tested; [`crate::Uffd::read_events`] turns a decoded fork into an owned fd.

use crate::Uffd;
use crate::flags::FaultFlags;
use livepage_sys as sys;

/// Size of one `uffd_msg` on the wire.
pub const MSG_SIZE: usize = std::mem::size_of::<sys::uffd_msg>();

/// A decoded message, with the fork fd still a bare number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEvent {
    /// A page fault.
    PageFault(PageFault),
    /// `UFFD_EVENT_FORK`: the kernel installed `ufd` in the reader's fd table.
    Fork {
        /// The child's userfaultfd number.
        ufd: u32,
    },
    /// `UFFD_EVENT_REMAP`: a registered VMA moved.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `UFFD_EVENT_REMOVE`: the range is about to be discarded (MADV_DONTNEED & co).
    Remove {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// `UFFD_EVENT_UNMAP`: the range was unmapped and is no longer registered.
    Unmap {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
}

/// A page fault message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// Faulting address (page aligned unless EXACT_ADDRESS was enabled).
    pub address: u64,
    /// WRITE / WP / MINOR.
    pub flags: FaultFlags,
    /// The faulting thread's id, when the context enabled THREAD_ID.
    pub thread_id: Option<u32>,
}

impl PageFault {
    /// A write to a write-protected page.
    pub fn is_wp(&self) -> bool {
        self.flags.contains(FaultFlags::WP)
    }
    /// A minor fault.
    pub fn is_minor(&self) -> bool {
        self.flags.contains(FaultFlags::MINOR)
    }
    /// The access was a write.
    pub fn is_write(&self) -> bool {
        self.flags.contains(FaultFlags::WRITE)
    }
}

/// A decoded event that owns what the kernel handed over.
#[derive(Debug)]
pub enum Event {
    /// A page fault.
    PageFault(PageFault),
    /// A forked child's context. Serve it or drop it (dropping unregisters the child).
    Fork {
        /// The child's userfaultfd.
        uffd: Uffd,
    },
    /// A registered VMA moved from `from` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `[start, end)` is being discarded; later faults there must read as zeros.
    Remove {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Start.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer than 32 bytes.
    #[error("uffd message truncated: {0} bytes, need {MSG_SIZE}")]
    Truncated(usize),
    /// An event code this crate does not know.
    #[error("unknown uffd event code {0:#x}")]
    UnknownEvent(u8),
    /// A range whose end lies before its start.
    #[error("uffd event range is inverted: start {start:#x} > end {end:#x}")]
    InvertedRange {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
}

/// Decodes one message. `thread_ids` says whether the context enabled
/// `UFFD_FEATURE_THREAD_ID` (otherwise the ptid word is not meaningful).
pub fn decode(msg: &sys::uffd_msg, thread_ids: bool) -> Result<RawEvent, DecodeError> {
    let [a0, a1, a2] = msg.arg;
    match msg.event {
        sys::event::PAGEFAULT => Ok(RawEvent::PageFault(PageFault {
            flags: FaultFlags::from_bits_retain(a0),
            address: a1,
            thread_id: thread_ids.then_some(a2 as u32),
        })),
        sys::event::FORK => Ok(RawEvent::Fork { ufd: a0 as u32 }),
        sys::event::REMAP => Ok(RawEvent::Remap {
            from: a0,
            to: a1,
            len: a2,
        }),
        sys::event::REMOVE | sys::event::UNMAP => {
            if a0 > a1 {
                return Err(DecodeError::InvertedRange { start: a0, end: a1 });
            }
            Ok(if msg.event == sys::event::REMOVE {
                RawEvent::Remove { start: a0, end: a1 }
            } else {
                RawEvent::Unmap { start: a0, end: a1 }
            })
        }
        other => Err(DecodeError::UnknownEvent(other)),
    }
}

/// Parses the native-endian wire form of a message (what `read(2)` returns).
pub fn msg_from_bytes(bytes: &[u8]) -> Result<sys::uffd_msg, DecodeError> {
    let b: &[u8; MSG_SIZE] = bytes
        .get(..MSG_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::Truncated(bytes.len()))?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8 + 8 * i..16 + 8 * i]);
        u64::from_ne_bytes(w)
    };
    Ok(sys::uffd_msg {
        event: b[0],
        reserved1: b[1],
        reserved2: u16::from_ne_bytes([b[2], b[3]]),
        reserved3: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        arg: [word(0), word(1), word(2)],
    })
}

/// The inverse of [`msg_from_bytes`], for tests and fuzzing.
pub fn msg_to_bytes(msg: &sys::uffd_msg) -> [u8; MSG_SIZE] {
    let mut b = [0u8; MSG_SIZE];
    b[0] = msg.event;
    b[1] = msg.reserved1;
    b[2..4].copy_from_slice(&msg.reserved2.to_ne_bytes());
    b[4..8].copy_from_slice(&msg.reserved3.to_ne_bytes());
    for (i, w) in msg.arg.iter().enumerate() {
        b[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

/// A reusable buffer for batched reads: one `read(2)` returns up to
/// `capacity` messages without allocating on the fault path.
#[derive(Debug)]
pub struct EventBuffer {
    pub(crate) raw: Vec<sys::uffd_msg>,
    pub(crate) events: Vec<Event>,
    pub(crate) undecodable: Option<DecodeError>,
}

impl EventBuffer {
    /// A buffer for up to `capacity` messages per read (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        EventBuffer {
            raw: vec![sys::uffd_msg::default(); capacity],
            events: Vec::with_capacity(capacity),
            undecodable: None,
        }
    }

    /// The first message of the last read that could not be decoded, if any.
    pub fn undecodable(&self) -> Option<DecodeError> {
        self.undecodable
    }

    /// Messages per read.
    pub fn capacity(&self) -> usize {
        self.raw.len()
    }
}

impl Default for EventBuffer {
    fn default() -> Self {
        EventBuffer::new(64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(event: u8, arg: [u64; 3]) -> sys::uffd_msg {
        sys::uffd_msg {
            event,
            arg,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_each_kind() {
        let pf = decode(&msg(0x12, [3, 0x7000, 42]), true).unwrap();
        assert_eq!(
            pf,
            RawEvent::PageFault(PageFault {
                address: 0x7000,
                flags: FaultFlags::WRITE | FaultFlags::WP,
                thread_id: Some(42)
            })
        );
        assert_eq!(
            decode(&msg(0x12, [4, 0x1000, 42]), false).unwrap(),
            RawEvent::PageFault(PageFault {
                address: 0x1000,
                flags: FaultFlags::MINOR,
                thread_id: None
            })
        );
        assert_eq!(
            decode(&msg(0x13, [9, 0, 0]), false).unwrap(),
            RawEvent::Fork { ufd: 9 }
        );
        assert_eq!(
            decode(&msg(0x14, [1, 2, 3]), false).unwrap(),
            RawEvent::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        );
        assert_eq!(
            decode(&msg(0x15, [1, 2, 0]), false).unwrap(),
            RawEvent::Remove { start: 1, end: 2 }
        );
        assert_eq!(
            decode(&msg(0x16, [1, 2, 0]), false).unwrap(),
            RawEvent::Unmap { start: 1, end: 2 }
        );
        assert_eq!(
            decode(&msg(0x17, [0; 3]), false),
            Err(DecodeError::UnknownEvent(0x17))
        );
        assert_eq!(
            decode(&msg(0x15, [5, 2, 0]), false),
            Err(DecodeError::InvertedRange { start: 5, end: 2 })
        );
        assert_eq!(msg_from_bytes(&[0; 31]), Err(DecodeError::Truncated(31)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn bytes_round_trip_and_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), tid in any::<bool>()) {
            match msg_from_bytes(&bytes) {
                Ok(m) => {
                    prop_assert_eq!(&msg_to_bytes(&m)[..], &bytes[..MSG_SIZE]);
                    // A decoded pagefault keeps its address and flags bit for bit.
                    if let Ok(RawEvent::PageFault(pf)) = decode(&m, tid) {
                        prop_assert_eq!(pf.address, m.arg[1]);
                        prop_assert_eq!(pf.flags.bits(), m.arg[0]);
                    }
                }
                Err(e) => prop_assert_eq!(e, DecodeError::Truncated(bytes.len())),
            }
        }
    }
}
