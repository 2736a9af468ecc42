//! Manifests: what an image is made of. One small object per image: a
//! first line `livepage-manifest 1 <BLAKE3 of the rest>` and a
//! zstd-compressed JSON body
//! listing, per region, the chunk that holds each span of pages (`null`
//! for an all-zero span). A manifest is self-contained (a delta's manifest
//! lists every chunk of the checkpoint it stands for; unchanged spans name
//! the parent's chunks), so reading an image never walks a chain.
//! Kernel-free; docs/FORMAT.md "Chunked images".

use serde::{Deserialize, Serialize};

use crate::chunk::{CHUNK_BYTES, ChunkId, MAX_RAW};

/// First word of a manifest object.
pub const MAGIC: &str = "livepage-manifest";
/// Manifest version this build writes and reads.
pub const VERSION: u32 = 1;
/// Most regions a manifest may list.
pub const MAX_REGIONS: usize = 64;
/// The largest uncompressed body a reader accepts (a 1 TiB image's
/// manifest is about 140 MiB of JSON: 2 Mi spans).
pub const MAX_BODY: usize = 256 << 20;

/// One region of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Address the region had when the image was taken.
    pub base: u64,
    /// Bytes.
    pub len: u64,
    /// Page size.
    pub page_size: u64,
    /// Memory type code (`livepage_image::kind`).
    pub kind: u32,
    /// Pages each chunk spans (the last one may span fewer).
    pub chunk_pages: u64,
    /// Per span, its chunk (`None`: all zeros).
    pub chunks: Vec<Option<String>>,
}

impl Region {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size
    }

    /// Pages per chunk for a region of `page_size`.
    pub fn span_for(page_size: u64) -> u64 {
        (CHUNK_BYTES / page_size).max(1)
    }

    /// Pages `[first, end)` of span `c`.
    pub fn span(&self, c: usize) -> (u64, u64) {
        let a = c as u64 * self.chunk_pages;
        (a, (a + self.chunk_pages).min(self.pages()))
    }

    /// The chunk id of span `c` (`None`: zeros).
    pub fn chunk(&self, c: usize) -> Option<ChunkId> {
        self.chunks
            .get(c)
            .and_then(|s| s.as_deref())
            .and_then(ChunkId::parse)
    }
}

/// An image as a store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image's name in the store.
    pub name: String,
    /// The id of the local image it was pushed from (hex).
    pub image_id: String,
    /// The name of the image it was a delta of, when pushed as part of a
    /// chain (for listing; the manifest needs no parent to be read).
    pub parent: Option<String>,
    /// When the image was taken (Unix seconds).
    pub created: u64,
    /// When it was pushed (Unix seconds).
    pub pushed: u64,
    /// Regions.
    pub regions: Vec<Region>,
    /// The chunk holding the VM state, if any.
    pub vm_state: Option<String>,
}

/// Why bytes are not a manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// No `livepage-manifest` first line.
    #[error("not a livepage manifest")]
    NotManifest,
    /// A version this build does not read.
    #[error("manifest version {0}, this build reads {VERSION}")]
    Version(String),
    /// The body does not hash to the first line's checksum.
    #[error("its checksum does not match its contents (corrupt or truncated)")]
    Checksum,
    /// The body is not the JSON a manifest holds.
    #[error("unreadable body: {0}")]
    Json(#[from] serde_json::Error),
    /// The body is inconsistent.
    #[error("{0}")]
    Invalid(String),
}

impl Manifest {
    /// The manifest object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let body = zstd::bulk::compress(&json, 9).unwrap_or_default();
        let mut out = format!("{MAGIC} {VERSION} {}\n", blake3::hash(&body).to_hex()).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Parses and checks a manifest object.
    pub fn decode(obj: &[u8]) -> Result<Manifest, ManifestError> {
        let nl = obj
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(ManifestError::NotManifest)?;
        let first = std::str::from_utf8(&obj[..nl]).map_err(|_| ManifestError::NotManifest)?;
        let mut words = first.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(ManifestError::NotManifest);
        }
        let v = words.next().unwrap_or("");
        if v != VERSION.to_string() {
            return Err(ManifestError::Version(v.chars().take(16).collect()));
        }
        let sum = words.next().unwrap_or("");
        let body = &obj[nl + 1..];
        if words.next().is_some() || blake3::hash(body).to_hex().as_str() != sum {
            return Err(ManifestError::Checksum);
        }
        let json = zstd::bulk::decompress(body, MAX_BODY)
            .map_err(|e| ManifestError::Invalid(format!("the body does not decompress: {e}")))?;
        let m: Manifest = serde_json::from_slice(&json)?;
        m.check()?;
        Ok(m)
    }

    /// Checks the manifest is consistent (what a reader relies on).
    pub fn check(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Invalid(s));
        if self.regions.is_empty() || self.regions.len() > MAX_REGIONS {
            return bad(format!(
                "{} regions (1 to {MAX_REGIONS})",
                self.regions.len()
            ));
        }
        for (i, r) in self.regions.iter().enumerate() {
            if !r.page_size.is_power_of_two()
                || r.page_size < 4096
                || r.page_size > u64::from(MAX_RAW)
                || r.len == 0
                || r.len % r.page_size != 0
            {
                return bad(format!(
                    "region {i}: length {} and page size {} do not fit",
                    r.len, r.page_size
                ));
            }
            if r.chunk_pages == 0 || r.chunk_pages.saturating_mul(r.page_size) > u64::from(MAX_RAW)
            {
                return bad(format!("region {i}: {} pages per chunk", r.chunk_pages));
            }
            let want = r.pages().div_ceil(r.chunk_pages);
            if r.chunks.len() as u64 != want {
                return bad(format!(
                    "region {i}: {} chunks listed for {want} spans",
                    r.chunks.len()
                ));
            }
            if let Some(c) = r
                .chunks
                .iter()
                .flatten()
                .find(|c| ChunkId::parse(c).is_none())
            {
                return bad(format!("region {i}: chunk id {c:?} is not 64 hex digits"));
            }
        }
        if let Some(v) = &self.vm_state {
            if ChunkId::parse(v).is_none() {
                return bad(format!("VM state chunk id {v:?} is not 64 hex digits"));
            }
        }
        Ok(())
    }

    /// Every chunk it names (VM state included), with repeats.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.regions
            .iter()
            .flat_map(|r| r.chunks.iter().flatten())
            .chain(self.vm_state.iter())
            .filter_map(|c| ChunkId::parse(c))
    }

    /// Bytes of guest memory it describes.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Pages in all regions.
    pub fn pages(&self) -> u64 {
        self.regions.iter().map(Region::pages).sum()
    }

    /// The object key of image `name`: `images/NAME`.
    pub fn key(name: &str) -> String {
        format!("images/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(pages: u64, chunk_pages: u64) -> Manifest {
        let spans = pages.div_ceil(chunk_pages);
        Manifest {
            name: "vm".into(),
            image_id: "00".repeat(16),
            parent: None,
            created: 1,
            pushed: 2,
            regions: vec![Region {
                base: 0x1000_0000,
                len: pages * 4096,
                page_size: 4096,
                kind: 2,
                chunk_pages,
                chunks: (0..spans)
                    .map(|i| (i % 3 != 0).then(|| ChunkId::of(&i.to_le_bytes()).to_string()))
                    .collect(),
            }],
            vm_state: Some(ChunkId::of(b"state").to_string()),
        }
    }

    #[test]
    fn round_trips_and_names_its_chunks() {
        let m = sample(1000, 128);
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.regions[0].span(7), (896, 1000));
        assert_eq!(m.chunk_ids().count(), 5 + 1);
    }

    #[test]
    fn inconsistent_bodies_are_refused() {
        let mut m = sample(1000, 128);
        m.regions[0].chunks.pop();
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::Invalid(_))
        ));
        let mut m = sample(10, 128);
        m.regions[0].chunks[0] = Some("xyz".into());
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut o = sample(10, 128).encode();
        let n = o.len();
        o[n - 3] ^= 1;
        assert!(matches!(Manifest::decode(&o), Err(ManifestError::Checksum)));
        let mut o = sample(10, 128).encode();
        let at = o.iter().position(|b| *b == b' ').unwrap() + 1;
        o[at] = b'9';
        assert!(matches!(
            Manifest::decode(&o),
            Err(ManifestError::Version(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_do_not_panic(o in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&o);
        }

        #[test]
        fn a_flipped_byte_is_caught(pages in 1u64..3000, at in any::<usize>(), bit in 0u8..8) {
            let m = sample(pages, 128);
            let mut o = m.encode();
            let i = at % o.len();
            o[i] ^= 1 << bit;
            prop_assert!(Manifest::decode(&o).is_err());
        }
    }
}
