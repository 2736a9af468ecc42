//! Reading an image: the header, region table and index are validated on
//! open, every page's checksum on read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::io;
use crate::format::{Layout, image_id};
use crate::le::{u32_at, u64_at};
use crate::{
    FOLDED_FROM_AT, HEADER_SIZE, INDEX_ENTRY, ImageError, ImageId, MAGIC, MAX_REGIONS,
    OLDEST_VERSION, PageState, REGION_ENTRY, REGION_TABLE_AT, RegionDesc, STANDS_FOR_AT, VERSION,
};

/// An image opened for reading; the header, region table and index are
/// validated on open, pages on read.
#[derive(Debug)]
pub struct Image {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) layout: Layout,
    id: ImageId,
    parent: Option<ImageId>,
    stands_for: Option<ImageId>,
    folded_from: Option<ImageId>,
    created: u64,
    pub(crate) index: Vec<(PageState, u32)>,
    vm_state: Option<Vec<u8>>,
    file_len: u64,
}

impl Image {
    /// Opens and validates an image.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let file = File::open(path).map_err(io("opening", path))?;
        let file_len = file
            .metadata()
            .map_err(io("reading metadata of", path))?
            .len();
        let corrupt = |what: &'static str, detail: String| ImageError::Corrupt {
            path: path.to_path_buf(),
            what,
            detail,
        };
        let mut h = vec![0u8; HEADER_SIZE as usize];
        if file_len < 8 {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                what: "header",
                need: HEADER_SIZE,
                have: file_len,
            });
        }
        let n = (file_len.min(HEADER_SIZE)) as usize;
        file.read_exact_at(&mut h[..n], 0)
            .map_err(io("reading the header of", path))?;
        if &h[..8] != MAGIC {
            return Err(ImageError::NotAnImage(path.to_path_buf()));
        }
        if file_len < HEADER_SIZE {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                what: "header",
                need: HEADER_SIZE,
                have: file_len,
            });
        }
        let version = u32_at(&h, 8);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let stored = u32_at(&h, HEADER_SIZE as usize - 4);
        let computed = crc32c::crc32c(&h[..HEADER_SIZE as usize - 4]);
        if stored != computed {
            return Err(corrupt(
                "header",
                format!("crc32c {computed:#010x}, stored {stored:#010x}"),
            ));
        }
        let count = u32_at(&h, 16) as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(corrupt("header", format!("{count} regions")));
        }
        let mut regions = Vec::new();
        for i in 0..count {
            let at = REGION_TABLE_AT + i * REGION_ENTRY;
            regions.push(RegionDesc {
                base: u64_at(&h, at),
                len: u64_at(&h, at + 8),
                page_size: u64_at(&h, at + 16),
                kind: u32_at(&h, at + 24),
            });
        }
        let layout = Layout::new(&regions).map_err(|e| corrupt("region table", e.to_string()))?;
        if layout.table_bytes() != h[REGION_TABLE_AT..REGION_TABLE_AT + count * REGION_ENTRY] {
            return Err(corrupt(
                "region table",
                "data offsets do not follow the documented layout".into(),
            ));
        }
        let (index_offset, index_len, vm_offset, vm_len) = (
            u64_at(&h, 64),
            u64_at(&h, 72),
            u64_at(&h, 80),
            u64_at(&h, 88),
        );
        if u64_at(&h, 112) != layout.pages
            || index_len != layout.pages * INDEX_ENTRY + 4
            || index_offset != layout.data_end
        {
            return Err(corrupt(
                "header",
                "index position or size does not match the region table".into(),
            ));
        }
        let index_end = index_offset
            .checked_add(index_len)
            .ok_or_else(|| corrupt("header", "index size overflows".into()))?;
        if vm_offset != index_end {
            return Err(corrupt(
                "header",
                "VM state does not follow the index".into(),
            ));
        }
        let end = vm_offset
            .checked_add(vm_len)
            .ok_or_else(|| corrupt("header", "VM state size overflows".into()))?;
        if file_len < end {
            return Err(ImageError::Truncated {
                path: path.to_path_buf(),
                what: "index and VM state",
                need: end,
                have: file_len,
            });
        }
        let mut idx = vec![0u8; index_len as usize];
        file.read_exact_at(&mut idx, index_offset)
            .map_err(io("reading the index of", path))?;
        let (body, crc) = idx.split_at(idx.len() - 4);
        let (stored, computed) = (u32_at(crc, 0), crc32c::crc32c(body));
        if stored != computed {
            return Err(corrupt(
                "index",
                format!("crc32c {computed:#010x}, stored {stored:#010x}"),
            ));
        }
        let mut index = Vec::with_capacity(layout.pages as usize);
        for (i, e) in body.chunks_exact(INDEX_ENTRY as usize).enumerate() {
            let state = PageState::from_code(u32_at(e, 0))
                .ok_or_else(|| corrupt("index", format!("page {i} has state {}", u32_at(e, 0))))?;
            index.push((state, u32_at(e, 4)));
        }
        let parent_id = ImageId(
            h[40..56]
                .try_into()
                .map_err(|_| corrupt("header", "parent".into()))?,
        );
        let is_delta = u32_at(&h, 12) == 1;
        // Version 1 left these bytes zero.
        let stands_for = ImageId(
            h[STANDS_FOR_AT..STANDS_FOR_AT + 16]
                .try_into()
                .map_err(|_| corrupt("header", "stands-for id".into()))?,
        );
        let stands_for = (version >= 2 && stands_for != ImageId::default()).then_some(stands_for);
        let folded_from = ImageId(
            h[FOLDED_FROM_AT..FOLDED_FROM_AT + 16]
                .try_into()
                .map_err(|_| corrupt("header", "folded-from id".into()))?,
        );
        let folded_from = stands_for.and(Some(folded_from));
        if stands_for.is_some() && is_delta {
            return Err(corrupt(
                "header",
                "a delta claims to stand for a folded image".into(),
            ));
        }
        if !is_delta && index.iter().any(|(s, _)| *s == PageState::Parent) {
            return Err(corrupt("index", "a full image refers to a parent".into()));
        }
        let vm_state = if vm_len > 0 {
            if vm_len < 4 {
                return Err(corrupt("VM state", "section too short".into()));
            }
            let mut v = vec![0u8; vm_len as usize];
            file.read_exact_at(&mut v, vm_offset)
                .map_err(io("reading the VM state of", path))?;
            let (body, crc) = v.split_at(v.len() - 4);
            if u32_at(crc, 0) != crc32c::crc32c(body) {
                return Err(corrupt("VM state", "crc32c mismatch".into()));
            }
            Some(body.to_vec())
        } else {
            None
        };
        let id = ImageId(
            h[24..40]
                .try_into()
                .map_err(|_| corrupt("header", "id".into()))?,
        );
        let table = layout.table_bytes();
        let computed = image_id(&table, body, vm_state.as_deref().unwrap_or(&[]), &parent_id);
        if computed != id {
            return Err(corrupt(
                "header",
                format!("image id {id} does not match the contents ({computed})"),
            ));
        }
        Ok(Image {
            path: path.to_path_buf(),
            file,
            layout,
            id,
            parent: is_delta.then_some(parent_id),
            stands_for,
            folded_from,
            created: u64_at(&h, 56),
            index,
            vm_state,
            file_len,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The content hash.
    pub fn id(&self) -> ImageId {
        self.id
    }
    /// The parent's id, for a delta.
    pub fn parent(&self) -> Option<ImageId> {
        self.parent
    }
    /// For a full image folded from a chain: the id of the delta it
    /// replaced, which that delta's children name as their parent.
    pub fn stands_for(&self) -> Option<ImageId> {
        self.stands_for
    }
    /// For a folded image: the id of the parent it was folded from (removed
    /// by the fold; a copy left by an interrupted fold is swept).
    pub fn folded_from(&self) -> Option<ImageId> {
        self.folded_from
    }
    /// Whether a delta naming `id` as its parent can use this image.
    pub fn answers_to(&self, id: ImageId) -> bool {
        self.id == id || self.stands_for == Some(id)
    }
    /// Creation time (Unix seconds).
    pub fn created(&self) -> u64 {
        self.created
    }
    /// The regions.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.layout.regions
    }
    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.layout.pages
    }
    /// The VM state section.
    pub fn vm_state(&self) -> Option<&[u8]> {
        self.vm_state.as_deref()
    }
    /// The file length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// Global page number of page `page` of region `region`.
    pub fn global_page(&self, region: usize, page: u64) -> u64 {
        self.layout.first_page[region] + page
    }
    /// State and crc of a global page.
    pub fn page_state(&self, global: u64) -> Option<(PageState, u32)> {
        self.index.get(global as usize).copied()
    }
    /// File offset of page `page` of region `region`.
    pub fn page_offset(&self, region: usize, page: u64) -> u64 {
        self.layout.offset(region, page)
    }
    /// Counts of pages by state.
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for (s, _) in &self.index {
            match s {
                PageState::Zero => c.0 += 1,
                PageState::Data => c.1 += 1,
                PageState::Parent => c.2 += 1,
            }
        }
        c
    }

    /// Reads page `page` of region `region` into `buf` (its page size) and
    /// checks its crc. Returns the page's state; for `Parent` the buffer is
    /// left untouched (the caller reads the parent).
    pub fn read_page(
        &self,
        region: usize,
        page: u64,
        buf: &mut [u8],
    ) -> Result<PageState, ImageError> {
        let r = self
            .layout
            .regions
            .get(region)
            .ok_or(ImageError::OutOfRange {
                region,
                first: page,
                count: 1,
                bytes: buf.len(),
            })?;
        if page >= r.pages() || buf.len() as u64 != r.page_size {
            return Err(ImageError::OutOfRange {
                region,
                first: page,
                count: 1,
                bytes: buf.len(),
            });
        }
        let (state, want) = self.index[(self.layout.first_page[region] + page) as usize];
        match state {
            PageState::Zero => buf.fill(0),
            PageState::Parent => {}
            PageState::Data => {
                let offset = self.layout.offset(region, page);
                self.file.read_exact_at(buf, offset).map_err(|source| {
                    if source.kind() == std::io::ErrorKind::UnexpectedEof {
                        ImageError::Truncated {
                            path: self.path.clone(),
                            what: "page data",
                            need: offset + r.page_size,
                            have: self.file_len,
                        }
                    } else {
                        ImageError::Io {
                            what: "reading a page of",
                            path: self.path.clone(),
                            source,
                        }
                    }
                })?;
                let found = crc32c::crc32c(buf);
                if found != want {
                    return Err(ImageError::PageCorrupt {
                        path: self.path.clone(),
                        region,
                        page,
                        addr: r.base + page * r.page_size,
                        offset,
                        found,
                        want,
                    });
                }
            }
        }
        Ok(state)
    }

    /// Reads consecutive data pages (all stored in this image) with one read
    /// and checks each page's crc.
    pub(crate) fn read_data_run(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), ImageError> {
        let r = self.layout.regions[region];
        let offset = self.layout.offset(region, first);
        self.file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                ImageError::Truncated {
                    path: self.path.clone(),
                    what: "page data",
                    need: offset + buf.len() as u64,
                    have: self.file_len,
                }
            } else {
                ImageError::Io {
                    what: "reading pages of",
                    path: self.path.clone(),
                    source,
                }
            }
        })?;
        let g0 = self.layout.first_page[region] + first;
        for (k, page) in buf.chunks(r.page_size as usize).enumerate() {
            let want = self.index[g0 as usize + k].1;
            let found = crc32c::crc32c(page);
            if found != want {
                let p = first + k as u64;
                return Err(ImageError::PageCorrupt {
                    path: self.path.clone(),
                    region,
                    page: p,
                    addr: r.base + p * r.page_size,
                    offset: self.layout.offset(region, p),
                    found,
                    want,
                });
            }
        }
        Ok(())
    }

    /// Checks every stored page's crc. Stops at the first corrupt page.
    pub fn verify(&self) -> Result<u64, ImageError> {
        let mut checked = 0;
        for (ri, r) in self.layout.regions.iter().enumerate() {
            let mut buf = vec![0u8; r.page_size as usize];
            for p in 0..r.pages() {
                if self.index[(self.layout.first_page[ri] + p) as usize].0 == PageState::Data {
                    self.read_page(ri, p, &mut buf)?;
                    checked += 1;
                }
            }
        }
        Ok(checked)
    }
}
