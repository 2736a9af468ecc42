//! Chunks: a fixed span of guest pages named by the BLAKE3 hash of its
//! uncompressed bytes, stored zstd-compressed (or raw when that does not
//! pay) behind a 12-byte header, and verified against its name on every
//! read. Kernel-free; docs/FORMAT.md "Chunked images" has the layout.

/// Bytes of guest memory a chunk spans (regions with larger pages: one page).
pub const CHUNK_BYTES: u64 = 512 << 10;
/// Chunk object magic.
pub const MAGIC: &[u8; 4] = b"LPCK";
/// Chunk object version.
pub const VERSION: u8 = 1;
/// Size of the chunk object header.
pub const HEADER_LEN: usize = 12;
/// The largest uncompressed chunk a reader accepts (a VM state blob, or
/// one 1 GiB page would not fit: such regions are refused at push).
pub const MAX_RAW: u32 = 64 << 20;

/// How a chunk's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As is.
    Raw = 0,
    /// zstd.
    Zstd = 1,
}

/// A chunk's name: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    /// Parses 64 lower-case hex digits.
    pub fn parse(s: &str) -> Option<ChunkId> {
        if s.len() != 64 {
            return None;
        }
        let mut id = [0u8; 32];
        for (i, b) in id.iter_mut().enumerate() {
            let hex = s.get(2 * i..2 * i + 2)?;
            if hex.bytes().any(|c| !matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            *b = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(ChunkId(id))
    }

    /// The object key below the store's prefix: `chunks/ab/abcd…`.
    pub fn key(&self) -> String {
        let h = self.to_string();
        format!("chunks/{}/{h}", &h[..2])
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// Why a chunk object is not what its name says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// Shorter than its header.
    #[error("{0} bytes, shorter than a chunk header")]
    Short(usize),
    /// Not a chunk.
    #[error("not a livepage chunk (bad magic)")]
    Magic,
    /// A version this build does not read.
    #[error("chunk version {0}, this build reads {VERSION}")]
    Version(u8),
    /// An unknown codec.
    #[error("unknown codec {0}")]
    Codec(u8),
    /// Claims more bytes than any chunk holds.
    #[error("claims {0} uncompressed bytes, more than {MAX_RAW}")]
    TooLarge(u32),
    /// The payload does not decompress.
    #[error("does not decompress: {0}")]
    Decompress(std::io::Error),
    /// Decompresses to the wrong length.
    #[error("holds {got} bytes, its header says {want}")]
    Length {
        /// From the header.
        want: u32,
        /// Found.
        got: usize,
    },
    /// Its bytes do not hash to its name.
    #[error("its bytes hash to {got}, not to its name (corrupt)")]
    Hash {
        /// What they hash to.
        got: ChunkId,
    },
}

/// Encodes `raw` as a chunk object: zstd at `level` unless that saves less
/// than 1/16, then raw.
pub fn encode(raw: &[u8], level: i32) -> Vec<u8> {
    let packed = zstd::bulk::compress(raw, level).ok();
    let (codec, payload) = match &packed {
        Some(p) if p.len() < raw.len() - raw.len() / 16 => (Codec::Zstd, p.as_slice()),
        _ => (Codec::Raw, raw),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(codec as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The uncompressed length a chunk object's header claims.
pub fn raw_len(obj: &[u8]) -> Result<u32, ChunkError> {
    if obj.len() < HEADER_LEN {
        return Err(ChunkError::Short(obj.len()));
    }
    if &obj[..4] != MAGIC {
        return Err(ChunkError::Magic);
    }
    if obj[4] != VERSION {
        return Err(ChunkError::Version(obj[4]));
    }
    let n = u32::from_le_bytes([obj[8], obj[9], obj[10], obj[11]]);
    if n > MAX_RAW {
        return Err(ChunkError::TooLarge(n));
    }
    Ok(n)
}

/// Decodes a chunk object and checks that its bytes hash to `id`.
pub fn decode(obj: &[u8], id: &ChunkId) -> Result<Vec<u8>, ChunkError> {
    let n = raw_len(obj)?;
    let payload = &obj[HEADER_LEN..];
    let raw = match obj[5] {
        0 => payload.to_vec(),
        // Bounded by the header's length: a chunk cannot inflate past it.
        1 => zstd::bulk::decompress(payload, n as usize).map_err(ChunkError::Decompress)?,
        c => return Err(ChunkError::Codec(c)),
    };
    if raw.len() != n as usize {
        return Err(ChunkError::Length {
            want: n,
            got: raw.len(),
        });
    }
    let got = ChunkId::of(&raw);
    if got != *id {
        return Err(ChunkError::Hash { got });
    }
    Ok(raw)
}

/// Whether the object is stored compressed.
pub fn is_compressed(obj: &[u8]) -> bool {
    obj.get(5) == Some(&(Codec::Zstd as u8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_and_random_chunks_round_trip() {
        let text = b"livepage ".repeat(50_000);
        let o = encode(&text, 3);
        assert!(is_compressed(&o) && o.len() < text.len() / 10);
        assert_eq!(decode(&o, &ChunkId::of(&text)).unwrap(), text);
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let o = encode(&noise, 3);
        assert!(!is_compressed(&o));
        assert_eq!(o.len(), HEADER_LEN + noise.len());
        assert_eq!(decode(&o, &ChunkId::of(&noise)).unwrap(), noise);
    }

    #[test]
    fn ids_print_and_parse() {
        let id = ChunkId::of(b"x");
        assert_eq!(ChunkId::parse(&id.to_string()), Some(id));
        assert!(
            id.key()
                .starts_with(&format!("chunks/{}/", &id.to_string()[..2]))
        );
        assert_eq!(ChunkId::parse("AB"), None);
        assert_eq!(ChunkId::parse(&"G".repeat(64)), None);
    }

    proptest! {
        /// Any flipped byte of a chunk object is caught (or decodes to the
        /// same bytes, when it hit an ignored reserved byte).
        #[test]
        fn corruption_is_detected(data in proptest::collection::vec(any::<u8>(), 1..3000),
                                   rep in 1usize..4, at in any::<usize>(), bit in 0u8..8) {
            let raw: Vec<u8> = data.iter().copied().cycle().take(data.len() * rep).collect();
            let id = ChunkId::of(&raw);
            let mut o = encode(&raw, 1);
            let i = at % o.len();
            o[i] ^= 1 << bit;
            if let Ok(back) = decode(&o, &id) {
                prop_assert!(i == 6 || i == 7);
                prop_assert_eq!(back, raw);
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_objects_do_not_panic(o in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&o, &ChunkId([0; 32]));
        }
    }
}
