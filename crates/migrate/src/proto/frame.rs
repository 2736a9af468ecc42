//! Protocol version 2's frame (docs/PROTOCOL.md): a 40-byte header with its
//! own checksum, then a payload with another. Free of I/O; every parser
//! takes untrusted bytes (fuzzed: `fuzz/fuzz_targets/migrate_untrusted.rs`).

use livepage_image::le::{u32_at, u64_at};

/// The first four bytes of every frame: "LPM2".
pub const MAGIC: [u8; 4] = *b"LPM2";
/// Header size in bytes.
pub const HEADER_LEN: usize = 40;
/// The largest payload a frame may carry (a 4 MiB chunk, or a part of a
/// range list or device state).
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// The most pages one frame may describe (a zero or untouched range: no
/// payload, so it may be long; 1 TiB of 4 KiB pages).
pub const MAX_PAGES: u32 = 1 << 28;

/// The id of a bulk pages frame of the post-copy push (pre-copy frames
/// carry 0).
pub const PUSHED: u64 = 1;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination, first on every connection.
    Hello = 1,
    /// Destination → source: the answer to a hello.
    Welcome = 2,
    /// Pages: data, zeros, or an answer without data.
    Pages = 3,
    /// Destination → source on the demand connection: pages a fault waits for.
    Request = 4,
    /// Source → destination on each bulk connection: pre-copy is over on it.
    BulkEnd = 5,
    /// Destination → source: every bulk connection's pre-copy data is applied.
    Drained = 6,
    /// Source → destination: the vCPUs are paused; the device state.
    Switchover = 7,
    /// Source → destination: part of the stale set (pages the destination's
    /// copy of which is out of date or missing).
    Stale = 8,
    /// Destination → source: the guest runs here now.
    Resumed = 9,
    /// Source → destination: every stale page has been sent.
    PushDone = 10,
    /// Destination → source: every page is resident; the source may let go.
    Resident = 11,
    /// Both ways on the control connection: liveness and round-trip time.
    Heartbeat = 12,
    /// Both ways: the migration is abandoned, with a reason.
    Abort = 13,
    /// Destination → source after a reconnect: part of the pages it holds.
    Have = 14,
    /// Source → destination: statistics of the source's side (JSON).
    Report = 15,
    /// Destination → source: bulk bytes applied so far on this generation
    /// (`id`); the source keeps at most a window of pushed data unapplied.
    Ack = 16,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Pages,
            4 => Kind::Request,
            5 => Kind::BulkEnd,
            6 => Kind::Drained,
            7 => Kind::Switchover,
            8 => Kind::Stale,
            9 => Kind::Resumed,
            10 => Kind::PushDone,
            11 => Kind::Resident,
            12 => Kind::Heartbeat,
            13 => Kind::Abort,
            14 => Kind::Have,
            15 => Kind::Report,
            16 => Kind::Ack,
            _ => return None,
        })
    }
}

/// Flags of a [`Kind::Pages`] frame: what the pages are (bits 0-1), how
/// the payload is compressed (bits 2-3), whether it answers a request (bit 4).
pub mod pages {
    /// The payload holds the pages.
    pub const DATA: u8 = 0;
    /// Every page is zero (or was never touched); no payload.
    pub const ZERO: u8 = 1;
    /// An answer to a request with [`super::request::IF_STALE`]: the copy
    /// the destination holds is current; no payload.
    pub const CURRENT: u8 = 2;
    /// An answer to a request: the pages went out on a bulk connection
    /// already (they arrive there); no payload.
    pub const SENT: u8 = 3;
    /// Mask of the content bits.
    pub const CONTENT: u8 = 0b11;
    /// Codec: lz4 block.
    pub const LZ4: u8 = 1 << 2;
    /// Codec: zstd frame.
    pub const ZSTD: u8 = 2 << 2;
    /// Mask of the codec bits.
    pub const CODEC: u8 = 0b11 << 2;
    /// The frame answers the request whose id it carries.
    pub const REPLY: u8 = 1 << 4;
    /// Every flag bit defined.
    pub const ALL: u8 = CONTENT | CODEC | REPLY;
}

/// Flags of a [`Kind::Request`].
pub mod request {
    /// Answer [`super::pages::CURRENT`] without data if the destination's
    /// pre-copied page is current (minor mode, before the stale set came).
    pub const IF_STALE: u8 = 1;
    /// Send the data whatever was sent before: the destination asked
    /// already and what it was promised has not come (or it gave up a
    /// copy it received, and asks again).
    pub const AGAIN: u8 = 2;
    /// Every flag bit defined.
    pub const ALL: u8 = IF_STALE | AGAIN;
}

/// Flags of list frames ([`Kind::Stale`], [`Kind::Have`]).
pub mod list {
    /// The last frame of the list.
    pub const LAST: u8 = 1;
    /// A stale list to discard before the guest resumes (missing mode: the
    /// destination's copies of these pages are out of date).
    pub const DISCARD: u8 = 2;
    /// Every flag bit defined.
    pub const ALL: u8 = LAST | DISCARD;
}

/// Flags of a [`Kind::Switchover`].
pub mod switchover {
    /// Every page is at the destination already: nothing follows in
    /// post-copy (stop-and-copy, pre-copy).
    pub const COMPLETE: u8 = 1;
    /// Every flag bit defined.
    pub const ALL: u8 = COMPLETE;
}

/// Flags of a [`Kind::Heartbeat`].
pub mod heartbeat {
    /// An echo of the peer's heartbeat (its `first` is the peer's clock).
    pub const ECHO: u8 = 1;
    /// Every flag bit defined.
    pub const ALL: u8 = ECHO;
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Region the pages belong to.
    pub region: u16,
    /// Request id, round, or sequence number (by kind).
    pub id: u64,
    /// First page (or a timestamp, for heartbeats).
    pub first: u64,
    /// Pages described.
    pub count: u32,
    /// Payload bytes that follow the header.
    pub len: u32,
    /// crc32c of the payload.
    pub crc: u32,
}

/// What is wrong with a frame received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Not this protocol.
    #[error(
        "not a livepage migration frame (bad magic {0:02x?}): is the peer a livepage migration peer of protocol version 2?"
    )]
    Magic([u8; 4]),
    /// The header's checksum does not match.
    #[error("a frame header's checksum does not match (corrupted in transit)")]
    HeaderChecksum,
    /// A kind this build does not know.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Flag bits not defined for the kind.
    #[error("flags {flags:#04x} are not defined for a {kind:?} frame")]
    Flags {
        /// The kind.
        kind: Kind,
        /// The flags.
        flags: u8,
    },
    /// A payload longer than any frame may carry.
    #[error("a frame announces a {0}-byte payload (at most {MAX_PAYLOAD})")]
    PayloadTooLong(u32),
    /// A page count out of bounds.
    #[error("a frame describes {0} pages (1..={MAX_PAGES})")]
    Count(u32),
    /// The payload's checksum does not match.
    #[error("a {kind:?} frame's payload checksum does not match (corrupted in transit)")]
    PayloadChecksum {
        /// The kind.
        kind: Kind,
    },
    /// A frame whose shape its kind forbids.
    #[error("malformed {kind:?} frame: {why}")]
    Shape {
        /// The kind.
        kind: Kind,
        /// What is wrong.
        why: &'static str,
    },
}

impl Header {
    /// A header of `kind` with every other field zero.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            region: 0,
            id: 0,
            first: 0,
            count: 0,
            len: 0,
            crc: 0,
        }
    }

    /// The header's bytes for `payload` (its length and checksum filled in).
    pub fn encode(mut self, payload: &[u8]) -> [u8; HEADER_LEN] {
        self.len = payload.len() as u32;
        self.crc = crc32c::crc32c(payload);
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.region.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        b[28..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        let c = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Parses and checks a header (not its payload: see [`Header::check_payload`]).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        if crc32c::crc32c(&b[..36]) != u32_at(b, 36) {
            return Err(FrameError::HeaderChecksum);
        }
        let kind = Kind::from_u8(b[4]).ok_or(FrameError::Kind(b[4]))?;
        let h = Header {
            kind,
            flags: b[5],
            region: u16::from_le_bytes([b[6], b[7]]),
            id: u64_at(b, 8),
            first: u64_at(b, 16),
            count: u32_at(b, 24),
            len: u32_at(b, 28),
            crc: u32_at(b, 32),
        };
        if h.len > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLong(h.len));
        }
        let allowed = match kind {
            Kind::Pages => pages::ALL,
            Kind::Request => request::ALL,
            Kind::Stale | Kind::Have => list::ALL,
            Kind::Heartbeat => heartbeat::ALL,
            Kind::Switchover => switchover::ALL,
            _ => 0,
        };
        if h.flags & !allowed != 0 {
            return Err(FrameError::Flags {
                kind,
                flags: h.flags,
            });
        }
        if matches!(kind, Kind::Pages | Kind::Request) && (h.count == 0 || h.count > MAX_PAGES) {
            return Err(FrameError::Count(h.count));
        }
        if kind == Kind::Pages {
            let content = h.flags & pages::CONTENT;
            let codec = h.flags & pages::CODEC;
            if content != pages::DATA && (h.len != 0 || codec != 0) {
                return Err(FrameError::Shape {
                    kind,
                    why: "pages without data carry a payload or a codec",
                });
            }
            if content == pages::DATA && h.len == 0 {
                return Err(FrameError::Shape {
                    kind,
                    why: "data pages without a payload",
                });
            }
            if codec == pages::CODEC {
                return Err(FrameError::Shape {
                    kind,
                    why: "unknown codec 3",
                });
            }
        }
        Ok(h)
    }

    /// Checks a payload received after this header.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != self.len as usize {
            return Err(FrameError::Shape {
                kind: self.kind,
                why: "payload length differs from the header's",
            });
        }
        if crc32c::crc32c(payload) != self.crc {
            return Err(FrameError::PayloadChecksum { kind: self.kind });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds() -> impl Strategy<Value = Kind> {
        (1u8..=16).prop_map(|k| Kind::from_u8(k).unwrap_or(Kind::Hello))
    }

    proptest! {
        #[test]
        fn headers_round_trip(kind in kinds(), region: u16, id: u64, first: u64,
                              count in 1u32..=MAX_PAGES, payload in proptest::collection::vec(any::<u8>(), 1..64)) {
            let mut h = Header::new(kind);
            h.region = region;
            h.id = id;
            h.first = first;
            h.count = count;
            let b = h.encode(&payload);
            let d = Header::decode(&b).unwrap();
            prop_assert_eq!(d.kind, kind);
            prop_assert_eq!((d.region, d.id, d.first, d.count), (region, id, first, count));
            prop_assert_eq!(d.len as usize, payload.len());
            prop_assert!(d.check_payload(&payload).is_ok());
        }

        #[test]
        fn any_flipped_bit_is_caught(kind in kinds(), bit in 0usize..HEADER_LEN * 8) {
            let mut h = Header::new(kind);
            h.count = 1;
            let mut b = h.encode(&[1, 2, 3]);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Header::decode(&b).is_err());
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let a: [u8; HEADER_LEN] = b.try_into().unwrap_or([0; HEADER_LEN]);
            let _ = Header::decode(&a);
        }
    }

    #[test]
    fn payload_corruption_and_bad_shapes_are_refused() {
        let mut h = Header::new(Kind::Pages);
        h.count = 1;
        let b = h.encode(&[7; 16]);
        let d = Header::decode(&b).unwrap();
        assert!(d.check_payload(&[7; 16]).is_ok());
        assert_eq!(
            d.check_payload(&[8; 16]),
            Err(FrameError::PayloadChecksum { kind: Kind::Pages })
        );
        // Zero pages with a payload.
        h.flags = pages::ZERO;
        assert!(matches!(
            Header::decode(&h.encode(&[1])),
            Err(FrameError::Shape { .. })
        ));
        // Data without one.
        h.flags = pages::DATA;
        assert!(matches!(
            Header::decode(&h.encode(&[])),
            Err(FrameError::Shape { .. })
        ));
        // Flags a kind does not define.
        let mut r = Header::new(Kind::Resumed);
        r.flags = 1;
        assert!(matches!(
            Header::decode(&r.encode(&[])),
            Err(FrameError::Flags { .. })
        ));
        // A request for no pages.
        let q = Header::new(Kind::Request);
        assert_eq!(Header::decode(&q.encode(&[])), Err(FrameError::Count(0)));
        let mut bad = q.encode(&[]);
        bad[0] = b'X';
        assert!(matches!(Header::decode(&bad), Err(FrameError::Magic(_))));
    }
}
