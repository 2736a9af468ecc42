//! Manifests: what an image is made of. One small object per image whose
//! size does not grow with the image: a first line `livepage-manifest 1
//! <BLAKE3 of the rest>` and a zstd-compressed JSON body with the regions,
//! the VM state's chunk, and the chunk holding the *span list*: per region,
//! the chunk of each span of pages (`null` for an all-zero span). A lazy
//! restore starts the guest from the manifest alone and fetches the span
//! list beside its first faults. A manifest is self-contained (a delta's
//! span list names every chunk of the checkpoint it stands for; unchanged
//! spans name the parent's chunks), so reading an image never walks a
//! chain.
//! Kernel-free; docs/FORMAT.md "Chunked images".

use serde::{Deserialize, Serialize};

use crate::chunk::{CHUNK_BYTES, ChunkId, MAX_RAW};

/// First word of a manifest object.
pub const MAGIC: &str = "livepage-manifest";
/// Manifest version this build writes and reads.
pub const VERSION: u32 = 1;
/// Most regions a manifest may list.
pub const MAX_REGIONS: usize = 64;
/// The largest uncompressed body a reader accepts (a body is well under
/// a kilobyte per region).
pub const MAX_BODY: usize = 1 << 20;

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
    /// Per span, its chunk (`None`: all zeros). Stored in the span list,
    /// not in the manifest object: empty until the span list is loaded
    /// ([`Manifest::set_spans`]).
    #[serde(skip)]
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
    /// The chunk holding the span list (JSON: per region, per span, a
    /// chunk id or null).
    pub spans: String,
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
    /// The span list's bytes (the chunk [`Manifest::spans`] names).
    pub fn spans_bytes(&self) -> Vec<u8> {
        let lists: Vec<&Vec<Option<String>>> = self.regions.iter().map(|r| &r.chunks).collect();
        serde_json::to_vec(&lists).unwrap_or_default()
    }

    /// Fills every region's chunks from a span list's bytes, checked
    /// against the regions.
    pub fn set_spans(&mut self, bytes: &[u8]) -> Result<(), ManifestError> {
        let lists: Vec<Vec<Option<String>>> = serde_json::from_slice(bytes)?;
        if lists.len() != self.regions.len() {
            return Err(ManifestError::Invalid(format!(
                "the span list has {} regions, the manifest {}",
                lists.len(),
                self.regions.len()
            )));
        }
        let old: Vec<_> = self.regions.iter().map(|r| r.chunks.clone()).collect();
        for (r, l) in self.regions.iter_mut().zip(lists) {
            r.chunks = l;
        }
        if let Err(e) = self.check_spans() {
            for (r, o) in self.regions.iter_mut().zip(old) {
                r.chunks = o;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Whether the span list is loaded.
    pub fn has_spans(&self) -> bool {
        self.regions.iter().all(|r| !r.chunks.is_empty())
    }

    /// The manifest object's bytes (the span list goes in its own chunk,
    /// [`Manifest::spans`]).
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
        }
        if let Some(v) = &self.vm_state {
            if ChunkId::parse(v).is_none() {
                return bad(format!("VM state chunk id {v:?} is not 64 hex digits"));
            }
        }
        if ChunkId::parse(&self.spans).is_none() {
            return bad(format!(
                "span list chunk id {:?} is not 64 hex digits",
                self.spans
            ));
        }
        Ok(())
    }

    /// Checks the span list against the regions.
    pub fn check_spans(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Invalid(s));
        for (i, r) in self.regions.iter().enumerate() {
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
        Ok(())
    }

    /// Every chunk it names (VM state and span list included; the spans'
    /// chunks once loaded), with repeats.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.regions
            .iter()
            .flat_map(|r| r.chunks.iter().flatten())
            .chain(self.vm_state.iter())
            .chain(std::iter::once(&self.spans))
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
            spans: ChunkId::of(b"spans").to_string(),
        }
    }

    #[test]
    fn round_trips_and_names_its_chunks() {
        let m = sample(1000, 128);
        let mut back = Manifest::decode(&m.encode()).unwrap();
        assert!(!back.has_spans());
        back.set_spans(&m.spans_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.regions[0].span(7), (896, 1000));
        assert_eq!(m.chunk_ids().count(), 5 + 1 + 1);
        // The object does not grow with the image.
        assert!(sample(1 << 20, 128).encode().len() < 400);
    }

    #[test]
    fn inconsistent_span_lists_are_refused() {
        let m = sample(1000, 128);
        let mut short = m.clone();
        short.regions[0].chunks.pop();
        let mut back = Manifest::decode(&m.encode()).unwrap();
        assert!(matches!(
            back.set_spans(&short.spans_bytes()),
            Err(ManifestError::Invalid(_))
        ));
        assert!(!back.has_spans(), "a refused list leaves none");
        let mut bad = sample(10, 128);
        bad.regions[0].chunks[0] = Some("xyz".into());
        let mut back = Manifest::decode(&bad.encode()).unwrap();
        assert!(back.set_spans(&bad.spans_bytes()).is_err());
        assert!(back.set_spans(b"[[null]]x").is_err());
        let mut two = Manifest::decode(&m.encode()).unwrap();
        assert!(two.set_spans(b"[[],[]]").is_err());
    }

    #[test]
    fn inconsistent_bodies_are_refused() {
        let mut m = sample(10, 128);
        m.spans = "nope".into();
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::Invalid(_))
        ));
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
            let mut m = sample(10, 128);
            let _ = m.set_spans(&o);
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
