//! The payloads of protocol version 2's structured frames: the hello and
//! its answer, the switchover, and range lists (stale sets, what a
//! destination holds). Free of I/O; every parser takes untrusted bytes.

use livepage_image::le::{u32_at, u64_at};

use super::frame::{Kind, MAX_PAYLOAD};

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// Most regions a hello may describe.
pub const MAX_REGIONS: usize = 256;
/// Most bulk connections.
pub const MAX_BULK: u8 = 16;

/// Which connection of a migration this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Role {
    /// Phases, heartbeats, the switchover, the stale set.
    Control,
    /// Pages a faulting vCPU waits for, and nothing else.
    Demand,
    /// Bulk data: pre-copy rounds and the post-copy push (index 0..N).
    Bulk(u8),
}

impl Role {
    fn to_bytes(self) -> [u8; 2] {
        match self {
            Role::Control => [0, 0],
            Role::Demand => [1, 0],
            Role::Bulk(i) => [2, i],
        }
    }
}

bitflags::bitflags! {
    /// What a peer can do.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Caps: u32 {
        /// lz4 block compression.
        const LZ4 = 1;
        /// zstd compression.
        const ZSTD = 2;
    }
}

/// The shape of one region, as the source declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RegionShape {
    /// Page size in bytes (4 KiB .. 1 GiB, a power of two).
    pub page_size: u64,
    /// Pages.
    pub pages: u64,
}

impl RegionShape {
    /// Bytes.
    pub fn bytes(&self) -> u64 {
        self.page_size * self.pages
    }
}

/// A migration's identity: a random id and a secret only its two ends know
/// (sent inside TLS). A reconnect must present both.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MigrationId {
    /// Public id (logged).
    pub id: [u8; 16],
    /// Secret.
    pub token: [u8; 32],
}

impl std::fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MigrationId({})", self.hex())
    }
}

impl MigrationId {
    /// A new random identity.
    pub fn random() -> Result<MigrationId, std::io::Error> {
        let mut id = [0u8; 16];
        let mut token = [0u8; 32];
        let err = |e: getrandom::Error| std::io::Error::other(e.to_string());
        getrandom::fill(&mut id).map_err(err)?;
        getrandom::fill(&mut token).map_err(err)?;
        Ok(MigrationId { id, token })
    }

    /// The public id in hex.
    pub fn hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The first frame on every connection, source → destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Which connection this is.
    pub role: Role,
    /// Bulk connections the source opens.
    pub bulk: u8,
    /// Compression the source can do.
    pub caps: Caps,
    /// The migration this connection belongs to.
    pub migration: MigrationId,
    /// 0 for the first set of connections; incremented at each reconnect.
    pub generation: u32,
    /// The regions being migrated.
    pub regions: Vec<RegionShape>,
}

/// Whether the destination takes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Taken.
    Ok,
    /// Refused; the reason follows.
    Refused,
}

/// How the destination places the pages of the post-copy phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DestMode {
    /// UFFDIO_COPY: the stale set must arrive before the guest resumes.
    Missing,
    /// UFFDIO_CONTINUE over the page cache: the guest resumes first.
    Minor,
}

/// Where the destination is (sent in its welcome, so a reconnecting source
/// knows what to resend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Receiving pre-copy rounds.
    Precopy,
    /// The guest runs at the destination; pages still arrive.
    Postcopy,
    /// Every page is resident.
    Complete,
}

/// The destination's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Taken or refused.
    pub status: Status,
    /// Compression both ends can do.
    pub caps: Caps,
    /// How the destination places post-copy pages.
    pub mode: DestMode,
    /// Where the destination is.
    pub phase: Phase,
    /// Why it refused (empty when taken).
    pub reason: String,
}

/// What is wrong with a payload received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MsgError {
    /// Fewer bytes than the fields need.
    #[error("a {kind:?} payload of {have} bytes is too short")]
    Short {
        /// The frame kind.
        kind: Kind,
        /// Bytes there.
        have: usize,
    },
    /// Another protocol version.
    #[error("the peer speaks migration protocol version {0}; this build speaks {VERSION}")]
    Version(u32),
    /// A field out of its range.
    #[error("a {kind:?} payload has a bad {field}: {value}")]
    Field {
        /// The frame kind.
        kind: Kind,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A range list that is not sorted, overlaps, or runs past the region.
    #[error("a range list runs past {limit} pages or is not in order")]
    Ranges {
        /// The region's pages.
        limit: u64,
    },
}

fn short(kind: Kind, have: usize) -> MsgError {
    MsgError::Short { kind, have }
}

impl Hello {
    /// The payload's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + 16 * self.regions.len());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.role.to_bytes());
        b.push(self.bulk);
        b.push(0);
        b.extend_from_slice(&self.caps.bits().to_le_bytes());
        b.extend_from_slice(&self.migration.id);
        b.extend_from_slice(&self.migration.token);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.page_size.to_le_bytes());
            b.extend_from_slice(&r.pages.to_le_bytes());
        }
        b
    }

    /// Parses a hello payload.
    pub fn decode(b: &[u8]) -> Result<Hello, MsgError> {
        const FIXED: usize = 4 + 2 + 2 + 4 + 16 + 32 + 4 + 4;
        let k = Kind::Hello;
        if b.len() < 4 {
            return Err(short(k, b.len()));
        }
        let version = u32_at(b, 0);
        if version != VERSION {
            return Err(MsgError::Version(version));
        }
        if b.len() < FIXED {
            return Err(short(k, b.len()));
        }
        let field = |field, value| MsgError::Field {
            kind: k,
            field,
            value,
        };
        let bulk = b[6];
        if bulk == 0 || bulk > MAX_BULK {
            return Err(field("bulk connection count", u64::from(bulk)));
        }
        let role = match (b[4], b[5]) {
            (0, 0) => Role::Control,
            (1, 0) => Role::Demand,
            (2, i) if i < bulk => Role::Bulk(i),
            (r, i) => return Err(field("role", u64::from(r) << 8 | u64::from(i))),
        };
        let caps =
            Caps::from_bits(u32_at(b, 8)).ok_or(field("capabilities", u64::from(u32_at(b, 8))))?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[12..28]);
        let mut token = [0u8; 32];
        token.copy_from_slice(&b[28..60]);
        let generation = u32_at(b, 60);
        let n = u32_at(b, 64) as usize;
        if n == 0 || n > MAX_REGIONS {
            return Err(field("region count", n as u64));
        }
        if b.len() != FIXED + 16 * n {
            return Err(short(k, b.len()));
        }
        let mut regions = Vec::with_capacity(n);
        for i in 0..n {
            let o = FIXED + 16 * i;
            let (page_size, pages) = (u64_at(b, o), u64_at(b, o + 8));
            if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
                return Err(field("page size", page_size));
            }
            if pages == 0 || page_size.checked_mul(pages).is_none_or(|x| x > 1 << 50) {
                return Err(field("page count", pages));
            }
            regions.push(RegionShape { page_size, pages });
        }
        Ok(Hello {
            role,
            bulk,
            caps,
            migration: MigrationId { id, token },
            generation,
            regions,
        })
    }
}

impl Welcome {
    /// The payload's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.reason.len());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.push(match self.status {
            Status::Ok => 0,
            Status::Refused => 1,
        });
        b.push(match self.mode {
            DestMode::Missing => 0,
            DestMode::Minor => 1,
        });
        b.push(match self.phase {
            Phase::Precopy => 0,
            Phase::Postcopy => 1,
            Phase::Complete => 2,
        });
        b.push(0);
        b.extend_from_slice(&self.caps.bits().to_le_bytes());
        b.extend_from_slice(self.reason.as_bytes());
        b
    }

    /// Parses a welcome payload.
    pub fn decode(b: &[u8]) -> Result<Welcome, MsgError> {
        let k = Kind::Welcome;
        if b.len() < 4 {
            return Err(short(k, b.len()));
        }
        let version = u32_at(b, 0);
        if version != VERSION {
            return Err(MsgError::Version(version));
        }
        if b.len() < 12 {
            return Err(short(k, b.len()));
        }
        let field = |field, value: u8| MsgError::Field {
            kind: k,
            field,
            value: u64::from(value),
        };
        let status = match b[4] {
            0 => Status::Ok,
            1 => Status::Refused,
            v => return Err(field("status", v)),
        };
        let mode = match b[5] {
            0 => DestMode::Missing,
            1 => DestMode::Minor,
            v => return Err(field("mode", v)),
        };
        let phase = match b[6] {
            0 => Phase::Precopy,
            1 => Phase::Postcopy,
            2 => Phase::Complete,
            v => return Err(field("phase", v)),
        };
        let caps = Caps::from_bits(u32_at(b, 8)).ok_or(MsgError::Field {
            kind: k,
            field: "capabilities",
            value: u64::from(u32_at(b, 8)),
        })?;
        Ok(Welcome {
            status,
            caps,
            mode,
            phase,
            reason: String::from_utf8_lossy(&b[12..]).into_owned(),
        })
    }
}

/// The switchover: the vCPUs are paused; what the destination needs to
/// run the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switchover {
    /// The embedder's device state (opaque to livepage).
    pub device_state: Vec<u8>,
}

impl Switchover {
    /// The payload's bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.device_state.clone()
    }

    /// Parses a switchover payload (the device state's length bound is the
    /// frame's).
    pub fn decode(b: &[u8]) -> Result<Switchover, MsgError> {
        Ok(Switchover {
            device_state: b.to_vec(),
        })
    }
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes sorted, disjoint page ranges `[start, end)` as payloads of at
/// most `max` bytes each: (gap from the previous end, length) as LEB128
/// varints.
pub fn encode_ranges(ranges: impl IntoIterator<Item = (u64, u64)>, max: usize) -> Vec<Vec<u8>> {
    let max = max.clamp(32, MAX_PAYLOAD as usize);
    let mut out = vec![Vec::new()];
    let mut prev = 0u64;
    for (s, e) in ranges {
        let last = out.len() - 1;
        if out[last].len() + 20 > max {
            out.push(Vec::new());
            prev = 0;
        }
        let b = out.last_mut().expect("one payload at least");
        put_varint(b, s - prev);
        put_varint(b, e - s);
        prev = e;
    }
    out
}

/// Decodes one payload of [`encode_ranges`] for a region of `limit` pages.
pub fn decode_ranges(b: &[u8], limit: u64) -> Result<Vec<(u64, u64)>, MsgError> {
    let bad = MsgError::Ranges { limit };
    let mut out = Vec::new();
    let mut at = 0;
    let mut prev = 0u64;
    while at < b.len() {
        let gap = get_varint(b, &mut at).ok_or(bad.clone())?;
        let len = get_varint(b, &mut at).ok_or(bad.clone())?;
        let s = prev.checked_add(gap).ok_or(bad.clone())?;
        let e = s.checked_add(len).ok_or(bad.clone())?;
        if len == 0 || e > limit || (!out.is_empty() && gap == 0) {
            return Err(bad);
        }
        out.push((s, e));
        prev = e;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            role: Role::Bulk(2),
            bulk: 4,
            caps: Caps::LZ4 | Caps::ZSTD,
            migration: MigrationId {
                id: [3; 16],
                token: [9; 32],
            },
            generation: 1,
            regions: vec![
                RegionShape {
                    page_size: 4096,
                    pages: 1000,
                },
                RegionShape {
                    page_size: 2 << 20,
                    pages: 4,
                },
            ],
        }
    }

    #[test]
    fn hello_and_welcome_round_trip() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let w = Welcome {
            status: Status::Refused,
            caps: Caps::LZ4,
            mode: DestMode::Minor,
            phase: Phase::Postcopy,
            reason: "no".into(),
        };
        assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
    }

    #[test]
    fn bad_hellos_are_refused_with_the_field() {
        let mut b = hello().encode();
        b[0] = 1;
        assert_eq!(Hello::decode(&b), Err(MsgError::Version(1)));
        let mut b = hello().encode();
        b[5] = 9; // bulk index past the count
        assert!(matches!(
            Hello::decode(&b),
            Err(MsgError::Field { field: "role", .. })
        ));
        let mut b = hello().encode();
        b[68..76].copy_from_slice(&4095u64.to_le_bytes());
        assert!(matches!(
            Hello::decode(&b),
            Err(MsgError::Field {
                field: "page size",
                ..
            })
        ));
        let b = hello().encode();
        assert!(matches!(
            Hello::decode(&b[..b.len() - 1]),
            Err(MsgError::Short { .. })
        ));
    }

    proptest! {
        #[test]
        fn ranges_round_trip_across_payloads(
            cuts in proptest::collection::btree_set(0u64..1_000_000, 0..400),
            max in 32usize..400,
        ) {
            let cuts: Vec<u64> = cuts.into_iter().collect();
            let ranges: Vec<(u64, u64)> = cuts.chunks_exact(2).map(|c| (c[0], c[1])).collect();
            let payloads = encode_ranges(ranges.iter().copied(), max);
            let mut back = Vec::new();
            for p in &payloads {
                prop_assert!(p.len() <= max.max(32));
                back.extend(decode_ranges(p, 1_000_000).unwrap());
            }
            prop_assert_eq!(back, ranges);
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), limit: u64) {
            let _ = decode_ranges(&b, limit);
            let _ = Hello::decode(&b);
            let _ = Welcome::decode(&b);
        }
    }

    #[test]
    fn ranges_past_the_region_or_out_of_order_are_refused() {
        let p = encode_ranges([(5, 10)], 64);
        assert!(decode_ranges(&p[0], 9).is_err());
        assert_eq!(decode_ranges(&p[0], 10).unwrap(), vec![(5, 10)]);
        // Two ranges that touch would have been one: not what an encoder sends.
        let mut b = Vec::new();
        put_varint(&mut b, 0);
        put_varint(&mut b, 2);
        put_varint(&mut b, 0);
        put_varint(&mut b, 2);
        assert!(decode_ranges(&b, 100).is_err());
    }
}
