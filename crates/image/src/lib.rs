//! The livepage image format (version 1); the layout is documented in
//! `docs/FORMAT.md`.
//!
//! An image holds the pages of one or more memory regions. Each page lives at
//! a computable file offset (`region.data_offset + page * page_size`), so a
//! page can be read or mapped directly; zero pages are never written and stay
//! holes in a sparse file. An index records each page's state (zero, data, or
//! "in the parent image" for deltas) and its crc32c. An optional section
//! carries the test VM's vCPU state. A delta names its parent by the parent's
//! content hash ([`ImageId`]).
//!
//! [`ImageWriter`] writes crash-safely (a temporary file in the destination
//! directory, fsync, rename, fsync of the directory) and never replaces an
//! existing file; [`Image`] validates everything it reads and reports
//! corruption with the page and file offset.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// File magic.
pub const MAGIC: &[u8; 8] = b"LIVEPAGE";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_SIZE: u64 = 4096;
const REGION_TABLE_AT: usize = 120;
const REGION_ENTRY: usize = 48;
/// Most regions an image can describe.
pub const MAX_REGIONS: usize = (HEADER_SIZE as usize - 4 - REGION_TABLE_AT) / REGION_ENTRY;
const INDEX_ENTRY: u64 = 8;

/// Memory type codes stored per region.
pub mod kind {
    /// Private anonymous memory.
    pub const ANON: u32 = 0;
    /// Anonymous memory with THP.
    pub const THP: u32 = 1;
    /// memfd / shmem.
    pub const SHMEM: u32 = 2;
    /// hugetlbfs.
    pub const HUGETLB: u32 = 3;
    /// The code of a memory type.
    pub fn of(k: livepage_mem::MemoryKind) -> u32 {
        use livepage_mem::MemoryKind;
        match k {
            MemoryKind::Anon => ANON,
            MemoryKind::Thp => THP,
            MemoryKind::Shmem => SHMEM,
            MemoryKind::Hugetlb => HUGETLB,
        }
    }
    /// The memory type of a code, if known.
    pub fn memory(k: u32) -> Option<livepage_mem::MemoryKind> {
        use livepage_mem::MemoryKind;
        match k {
            ANON => Some(MemoryKind::Anon),
            THP => Some(MemoryKind::Thp),
            SHMEM => Some(MemoryKind::Shmem),
            HUGETLB => Some(MemoryKind::Hugetlb),
            _ => None,
        }
    }
    /// The lower-case name of a code.
    pub fn name(k: u32) -> &'static str {
        match k {
            ANON => "anon",
            THP => "thp",
            SHMEM => "shmem",
            HUGETLB => "hugetlb",
            _ => "unknown",
        }
    }
}

/// A 128-bit content hash identifying an image (xxh3-128 of its region
/// table, index, VM state and parent id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ImageId(pub [u8; 16]);

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for ImageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One region as the image describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RegionDesc {
    /// Address the region had when the image was taken.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Page size (4 KiB, or 2 MiB for hugetlb).
    pub page_size: u64,
    /// Memory type ([`kind`]).
    pub kind: u32,
}

impl RegionDesc {
    /// Describes a region as it is now.
    pub fn of(r: &livepage_mem::Region) -> RegionDesc {
        RegionDesc {
            base: r.addr() as u64,
            len: r.len() as u64,
            page_size: r.page_size() as u64,
            kind: kind::of(r.kind()),
        }
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size
    }
}

/// What the index says about a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PageState {
    /// All zeros; a hole in the file.
    Zero,
    /// Stored in this image.
    Data,
    /// Unchanged since the parent image (deltas only).
    Parent,
}

impl PageState {
    fn code(self) -> u32 {
        match self {
            PageState::Zero => 0,
            PageState::Data => 1,
            PageState::Parent => 2,
        }
    }
    fn from_code(c: u32) -> Option<PageState> {
        match c {
            0 => Some(PageState::Zero),
            1 => Some(PageState::Data),
            2 => Some(PageState::Parent),
            _ => None,
        }
    }
}

/// Why an image could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// An I/O error, with what was being done.
    #[error("{what} {path}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The destination exists; images are never overwritten.
    #[error(
        "{0} already exists; livepage never writes over an existing image (choose another name or remove it)"
    )]
    Exists(PathBuf),
    /// Not a livepage image.
    #[error("{0} is not a livepage image (bad magic)")]
    NotAnImage(PathBuf),
    /// A format version this build cannot read.
    #[error("{path} is image format version {found}; this build reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// The file is shorter than its header says.
    #[error("{path} is truncated: {what} ends at byte {need} but the file has {have} bytes")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The section.
        what: &'static str,
        /// Where it should end.
        need: u64,
        /// File length.
        have: u64,
    },
    /// A section failed its checksum or is inconsistent.
    #[error("{path}: the {what} is corrupt ({detail})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The section.
        what: &'static str,
        /// Details.
        detail: String,
    },
    /// A page failed its checksum.
    #[error(
        "{path}: page {page} of region {region} (address {addr:#x}) at file offset {offset:#x} is corrupt (crc32c {found:#010x}, index says {want:#010x})"
    )]
    PageCorrupt {
        /// The file.
        path: PathBuf,
        /// Region index.
        region: usize,
        /// Page within the region.
        page: u64,
        /// The page's original address.
        addr: u64,
        /// File offset of the page.
        offset: u64,
        /// crc found.
        found: u32,
        /// crc expected.
        want: u32,
    },
    /// A delta's parent is not in its directory.
    #[error(
        "{child}: its parent image {parent} is missing (looked for an image with that id in {dir}); restore the parent or merge the chain where it is complete"
    )]
    MissingParent {
        /// The delta.
        child: PathBuf,
        /// The parent's id.
        parent: ImageId,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A delta's parent describes other regions.
    #[error("{child}: its parent {parent} has a different region layout ({detail})")]
    ParentMismatch {
        /// The delta.
        child: PathBuf,
        /// The parent file.
        parent: PathBuf,
        /// What differs.
        detail: String,
    },
    /// A bad request (too many regions, a page out of range, a wrong length).
    #[error("{0}")]
    Invalid(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The layout both the writer and the reader compute from the region table.
#[derive(Debug, Clone)]
struct Layout {
    regions: Vec<RegionDesc>,
    data_offsets: Vec<u64>,
    first_page: Vec<u64>,
    pages: u64,
    data_end: u64,
}

impl Layout {
    fn new(regions: &[RegionDesc]) -> Result<Layout, ImageError> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(ImageError::Invalid(format!(
                "an image holds 1 to {MAX_REGIONS} regions, not {}",
                regions.len()
            )));
        }
        let mut off = HEADER_SIZE;
        let (mut data_offsets, mut first_page, mut pages) = (Vec::new(), Vec::new(), 0u64);
        for (i, r) in regions.iter().enumerate() {
            if !r.page_size.is_power_of_two()
                || r.page_size < 4096
                || r.len == 0
                || r.len % r.page_size != 0
            {
                return Err(ImageError::Invalid(format!(
                    "region {i}: length {:#x} and page size {:#x} do not fit",
                    r.len, r.page_size
                )));
            }
            off = off.next_multiple_of(r.page_size);
            data_offsets.push(off);
            first_page.push(pages);
            off = off
                .checked_add(r.len)
                .ok_or_else(|| ImageError::Invalid("regions too large".into()))?;
            pages += r.pages();
        }
        Ok(Layout {
            regions: regions.to_vec(),
            data_offsets,
            first_page,
            pages,
            data_end: off,
        })
    }

    /// (region, page in region) of a global page number.
    fn locate(&self, global: u64) -> Option<(usize, u64)> {
        if global >= self.pages {
            return None;
        }
        let r = self.first_page.partition_point(|f| *f <= global) - 1;
        Some((r, global - self.first_page[r]))
    }

    fn offset(&self, region: usize, page: u64) -> u64 {
        self.data_offsets[region] + page * self.regions[region].page_size
    }

    fn table_bytes(&self) -> Vec<u8> {
        let mut t = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            t.extend_from_slice(&r.base.to_le_bytes());
            t.extend_from_slice(&r.len.to_le_bytes());
            t.extend_from_slice(&r.page_size.to_le_bytes());
            t.extend_from_slice(&r.kind.to_le_bytes());
            t.extend_from_slice(&0u32.to_le_bytes());
            t.extend_from_slice(&self.data_offsets[i].to_le_bytes());
            t.extend_from_slice(&self.first_page[i].to_le_bytes());
        }
        t
    }
}

fn image_id(table: &[u8], index: &[u8], vmstate: &[u8], parent: &ImageId) -> ImageId {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(table);
    h.update(index);
    h.update(vmstate);
    h.update(&parent.0);
    ImageId(h.digest128().to_le_bytes())
}

/// Writes an image. Methods take `&self` so that several threads can store
/// pages at once; the file only appears under its name after [`ImageWriter::finish`].
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    layout: Layout,
    parent: Option<ImageId>,
    /// Per page: state << 32 | crc32c.
    index: Vec<AtomicU64>,
    vm_state: std::sync::Mutex<Vec<u8>>,
    bytes: AtomicU64,
    finished: std::sync::atomic::AtomicBool,
}

impl ImageWriter {
    /// Starts an image of `regions` at `path` (which must not exist). With a
    /// parent every page starts as [`PageState::Parent`], otherwise as zero.
    pub fn create(
        path: &Path,
        regions: &[RegionDesc],
        parent: Option<ImageId>,
    ) -> Result<ImageWriter, ImageError> {
        let layout = Layout::new(regions)?;
        if path.exists() {
            return Err(ImageError::Exists(path.to_path_buf()));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| ImageError::Invalid(format!("{} is not a file path", path.display())))?;
        let tmp = dir.join(format!(
            ".{}.tmp.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        let initial = if parent.is_some() {
            PageState::Parent
        } else {
            PageState::Zero
        };
        let index = (0..layout.pages)
            .map(|_| AtomicU64::new(u64::from(initial.code()) << 32))
            .collect();
        let w = ImageWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            layout,
            parent,
            index,
            vm_state: std::sync::Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            finished: std::sync::atomic::AtomicBool::new(false),
        };
        w.file
            .set_len(w.layout.data_end)
            .map_err(io("sizing", &w.tmp))?;
        Ok(w)
    }

    /// Total pages (all regions).
    pub fn pages(&self) -> u64 {
        self.layout.pages
    }

    /// The global page number of page `page` of region `region`.
    pub fn global_page(&self, region: usize, page: u64) -> u64 {
        self.layout.first_page[region] + page
    }

    /// Stores the page `global` (its bytes, of the region's page size).
    pub fn write_page(&self, global: u64, data: &[u8]) -> Result<(), ImageError> {
        let (r, p) = self
            .layout
            .locate(global)
            .ok_or_else(|| ImageError::Invalid(format!("page {global} out of range")))?;
        if data.len() as u64 != self.layout.regions[r].page_size {
            return Err(ImageError::Invalid(format!(
                "page of {} bytes for a region of {}-byte pages",
                data.len(),
                self.layout.regions[r].page_size
            )));
        }
        self.file
            .write_all_at(data, self.layout.offset(r, p))
            .map_err(io("writing", &self.tmp))?;
        let crc = crc32c::crc32c(data);
        self.index[global as usize].store(
            (u64::from(PageState::Data.code()) << 32) | u64::from(crc),
            Ordering::Release,
        );
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Records page `global` as all zeros (a hole).
    pub fn mark_zero(&self, global: u64) {
        if let Some(e) = self.index.get(global as usize) {
            e.store(u64::from(PageState::Zero.code()) << 32, Ordering::Release);
        }
    }

    /// Data bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Sets the VM state section.
    pub fn set_vm_state(&self, bytes: Vec<u8>) {
        if let Ok(mut v) = self.vm_state.lock() {
            *v = bytes;
        }
    }

    /// Writes the index, VM state and header, syncs, and renames the file into
    /// place. Returns the new image's id. Call once, after every page is stored.
    pub fn finish(&self) -> Result<ImageId, ImageError> {
        if self.finished.load(Ordering::SeqCst) {
            return Err(ImageError::Invalid("the image is already finished".into()));
        }
        let mut index = Vec::with_capacity(self.index.len() * INDEX_ENTRY as usize);
        for e in &self.index {
            let v = e.load(Ordering::Acquire);
            index.extend_from_slice(&((v >> 32) as u32).to_le_bytes());
            index.extend_from_slice(&(v as u32).to_le_bytes());
        }
        let index_crc = crc32c::crc32c(&index);
        let vm_state = self.vm_state.lock().map(|v| v.clone()).unwrap_or_default();
        let table = self.layout.table_bytes();
        let parent = self.parent.unwrap_or_default();
        let id = image_id(&table, &index, &vm_state, &parent);

        let index_offset = self.layout.data_end;
        let index_len = index.len() as u64 + 4;
        let vm_offset = index_offset + index_len;
        let vm_len = if vm_state.is_empty() {
            0
        } else {
            vm_state.len() as u64 + 4
        };
        let mut tail = index;
        tail.extend_from_slice(&index_crc.to_le_bytes());
        if vm_len > 0 {
            tail.extend_from_slice(&vm_state);
            tail.extend_from_slice(&crc32c::crc32c(&vm_state).to_le_bytes());
        }
        self.file
            .write_all_at(&tail, index_offset)
            .map_err(io("writing the index of", &self.tmp))?;

        let mut h = vec![0u8; HEADER_SIZE as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&u32::from(self.parent.is_some()).to_le_bytes());
        h[16..20].copy_from_slice(&(self.layout.regions.len() as u32).to_le_bytes());
        h[24..40].copy_from_slice(&id.0);
        h[40..56].copy_from_slice(&parent.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        h[56..64].copy_from_slice(&now.to_le_bytes());
        for (at, v) in [
            (64, index_offset),
            (72, index_len),
            (80, vm_offset),
            (88, vm_len),
            (96, self.layout.data_offsets[0]),
            (104, self.layout.data_end - self.layout.data_offsets[0]),
            (112, self.layout.pages),
        ] {
            h[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        h[REGION_TABLE_AT..REGION_TABLE_AT + table.len()].copy_from_slice(&table);
        let crc = crc32c::crc32c(&h[..HEADER_SIZE as usize - 4]);
        h[HEADER_SIZE as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&h, 0)
            .map_err(io("writing the header of", &self.tmp))?;
        self.file.sync_all().map_err(io("syncing", &self.tmp))?;
        if self.path.exists() {
            return Err(ImageError::Exists(self.path.clone()));
        }
        std::fs::rename(&self.tmp, &self.path).map_err(io("renaming into place", &self.path))?;
        self.finished.store(true, Ordering::SeqCst);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(id)
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::SeqCst) {
            // An abandoned image leaves nothing behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// An image opened for reading; the header, region table and index are
/// validated on open, pages on read.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    layout: Layout,
    id: ImageId,
    parent: Option<ImageId>,
    created: u64,
    index: Vec<(PageState, u32)>,
    vm_state: Option<Vec<u8>>,
    file_len: u64,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
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
        let version = le_u32(&h, 8);
        if version != VERSION {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let stored = le_u32(&h, HEADER_SIZE as usize - 4);
        let computed = crc32c::crc32c(&h[..HEADER_SIZE as usize - 4]);
        if stored != computed {
            return Err(corrupt(
                "header",
                format!("crc32c {computed:#010x}, stored {stored:#010x}"),
            ));
        }
        let count = le_u32(&h, 16) as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(corrupt("header", format!("{count} regions")));
        }
        let mut regions = Vec::new();
        for i in 0..count {
            let at = REGION_TABLE_AT + i * REGION_ENTRY;
            regions.push(RegionDesc {
                base: le_u64(&h, at),
                len: le_u64(&h, at + 8),
                page_size: le_u64(&h, at + 16),
                kind: le_u32(&h, at + 24),
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
            le_u64(&h, 64),
            le_u64(&h, 72),
            le_u64(&h, 80),
            le_u64(&h, 88),
        );
        if le_u64(&h, 112) != layout.pages
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
        let (stored, computed) = (le_u32(crc, 0), crc32c::crc32c(body));
        if stored != computed {
            return Err(corrupt(
                "index",
                format!("crc32c {computed:#010x}, stored {stored:#010x}"),
            ));
        }
        let mut index = Vec::with_capacity(layout.pages as usize);
        for (i, e) in body.chunks_exact(INDEX_ENTRY as usize).enumerate() {
            let state = PageState::from_code(le_u32(e, 0))
                .ok_or_else(|| corrupt("index", format!("page {i} has state {}", le_u32(e, 0))))?;
            index.push((state, le_u32(e, 4)));
        }
        let parent_id = ImageId(
            h[40..56]
                .try_into()
                .map_err(|_| corrupt("header", "parent".into()))?,
        );
        let is_delta = le_u32(&h, 12) == 1;
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
            if le_u32(crc, 0) != crc32c::crc32c(body) {
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
            created: le_u64(&h, 56),
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
            .ok_or_else(|| ImageError::Invalid(format!("no region {region}")))?;
        if page >= r.pages() || buf.len() as u64 != r.page_size {
            return Err(ImageError::Invalid(format!(
                "page {page} / buffer of {} bytes does not fit region {region}",
                buf.len()
            )));
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
    fn read_data_run(&self, region: usize, first: u64, buf: &mut [u8]) -> Result<(), ImageError> {
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

/// Reads only the header of `path` and returns its id if it is an intact
/// livepage image header (used to find a delta's parent).
pub fn peek_id(path: &Path) -> Option<ImageId> {
    let f = File::open(path).ok()?;
    let mut h = vec![0u8; HEADER_SIZE as usize];
    f.read_exact_at(&mut h, 0).ok()?;
    if &h[..8] != MAGIC
        || le_u32(&h, HEADER_SIZE as usize - 4) != crc32c::crc32c(&h[..HEADER_SIZE as usize - 4])
    {
        return None;
    }
    h[24..40].try_into().ok().map(ImageId)
}

/// An image and its ancestors, newest first: a full image at the end and the
/// deltas above it. Parents are found by id in the head's directory.
#[derive(Debug)]
pub struct Chain {
    images: Vec<Image>,
}

impl Chain {
    /// Opens `path` and every parent it needs, checking that all describe the
    /// same regions.
    pub fn open(path: &Path) -> Result<Chain, ImageError> {
        let head = Image::open(path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut images = vec![head];
        while let Some(pid) = images.last().and_then(Image::parent) {
            if images.len() > 10_000 {
                return Err(ImageError::Invalid(
                    "image chain longer than 10000 (a cycle?)".into(),
                ));
            }
            let child = images.last().map(|i| i.path.clone()).unwrap_or_default();
            let found = std::fs::read_dir(&dir)
                .map_err(io("listing", &dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.is_file() && peek_id(p) == Some(pid));
            let Some(ppath) = found else {
                return Err(ImageError::MissingParent {
                    child,
                    parent: pid,
                    dir,
                });
            };
            let parent = Image::open(&ppath)?;
            let (a, b) = (images[0].regions(), parent.regions());
            if a.len() != b.len()
                || a.iter()
                    .zip(b)
                    .any(|(x, y)| x.len != y.len || x.page_size != y.page_size)
            {
                return Err(ImageError::ParentMismatch {
                    child,
                    parent: ppath,
                    detail: format!("{} regions against {}", a.len(), b.len()),
                });
            }
            images.push(parent);
        }
        Ok(Chain { images })
    }

    /// The newest image.
    pub fn head(&self) -> &Image {
        &self.images[0]
    }

    /// All images, newest first.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// Reads a page as the head image sees it (following parents).
    pub fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        for img in &self.images {
            if img.read_page(region, page, buf)? != PageState::Parent {
                return Ok(());
            }
        }
        Err(ImageError::Corrupt {
            path: self.images[self.images.len() - 1].path.clone(),
            what: "chain",
            detail: format!("page {page} of region {region} is in no image"),
        })
    }

    /// Which image of the chain holds page `page` of `region`, and whether it
    /// is data (`Some((image, true))`) or zeros (`Some((image, false))`).
    pub fn locate(&self, region: usize, page: u64) -> Option<(usize, bool)> {
        let first = *self.head().layout.first_page.get(region)?;
        for (i, img) in self.images.iter().enumerate() {
            match img.index.get((first + page) as usize)?.0 {
                PageState::Zero => return Some((i, false)),
                PageState::Data => return Some((i, true)),
                PageState::Parent => {}
            }
        }
        None
    }

    /// Reads `buf.len() / page_size` consecutive pages of `region` starting at
    /// `first`, as the head sees them, with one read per run of pages stored
    /// together, and checks every page's crc. Returns whether any page holds
    /// data (if not, `buf` was only zeroed).
    pub fn read_pages(
        &self,
        region: usize,
        first: u64,
        buf: &mut [u8],
    ) -> Result<bool, ImageError> {
        let head = self.head();
        let r = *head
            .layout
            .regions
            .get(region)
            .ok_or_else(|| ImageError::Invalid(format!("no region {region}")))?;
        let ps = r.page_size as usize;
        let n = (buf.len() / ps) as u64;
        if buf.len() % ps != 0 || first.checked_add(n).is_none_or(|e| e > r.pages()) {
            return Err(ImageError::Invalid(format!(
                "pages {first}+{n} ({} bytes) do not fit region {region} of {} pages",
                buf.len(),
                r.pages()
            )));
        }
        let mut any = false;
        let mut i = 0u64;
        while i < n {
            let (img, data) =
                self.locate(region, first + i)
                    .ok_or_else(|| ImageError::Corrupt {
                        path: self.images[self.images.len() - 1].path.clone(),
                        what: "chain",
                        detail: format!("page {} of region {region} is in no image", first + i),
                    })?;
            // Extend the run while the next page lives in the same image in the same state.
            let mut j = i + 1;
            while j < n && self.locate(region, first + j) == Some((img, data)) {
                j += 1;
            }
            let slice = &mut buf[i as usize * ps..j as usize * ps];
            if data {
                any = true;
                self.images[img].read_data_run(region, first + i, slice)?;
            } else {
                slice.fill(0);
            }
            i = j;
        }
        Ok(any)
    }

    /// Verifies every image of the chain.
    pub fn verify(&self) -> Result<u64, ImageError> {
        let mut n = 0;
        for img in &self.images {
            n += img.verify()?;
        }
        Ok(n)
    }

    /// Writes the chain as one full image at `out` (which must not exist).
    pub fn merge(&self, out: &Path) -> Result<ImageId, ImageError> {
        let head = self.head();
        let w = ImageWriter::create(out, head.regions(), None)?;
        if let Some(v) = head.vm_state() {
            w.set_vm_state(v.to_vec());
        }
        for (ri, r) in head.regions().iter().enumerate() {
            let mut buf = vec![0u8; r.page_size as usize];
            for p in 0..r.pages() {
                self.read_page(ri, p, &mut buf)?;
                let g = w.global_page(ri, p);
                if buf.iter().all(|b| *b == 0) {
                    w.mark_zero(g);
                } else {
                    w.write_page(g, &buf)?;
                }
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<RegionDesc> {
        vec![
            RegionDesc {
                base: 0x7000_0000,
                len: 16 * 4096,
                page_size: 4096,
                kind: kind::ANON,
            },
            RegionDesc {
                base: 0x9000_0000,
                len: 4 << 20,
                page_size: 2 << 20,
                kind: kind::HUGETLB,
            },
        ]
    }

    fn write_sample(dir: &Path) -> (PathBuf, ImageId) {
        let path = dir.join("img");
        let w = ImageWriter::create(&path, &regions(), None).unwrap();
        for p in [0u64, 3, 15] {
            w.write_page(p, &vec![p as u8 + 1; 4096]).unwrap();
        }
        w.write_page(17, &vec![9u8; 2 << 20]).unwrap();
        w.set_vm_state(b"vcpus".to_vec());
        let id = w.finish().unwrap();
        (path, id)
    }

    #[test]
    fn round_trip_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (path, id) = write_sample(dir.path());
        let img = Image::open(&path).unwrap();
        assert_eq!(img.id(), id);
        assert_eq!(img.pages(), 18);
        assert_eq!(img.counts(), (14, 4, 0));
        assert_eq!(img.vm_state(), Some(&b"vcpus"[..]));
        let mut buf = vec![0u8; 4096];
        assert_eq!(img.read_page(0, 3, &mut buf).unwrap(), PageState::Data);
        assert!(buf.iter().all(|b| *b == 4));
        assert_eq!(img.read_page(0, 4, &mut buf).unwrap(), PageState::Zero);
        assert!(buf.iter().all(|b| *b == 0));
        // The hugetlb region's data is aligned to its page size.
        assert_eq!(img.page_offset(1, 0) % (2 << 20), 0);
        assert_eq!(img.verify().unwrap(), 4);
        // Never overwritten.
        assert!(matches!(
            ImageWriter::create(&path, &regions(), None),
            Err(ImageError::Exists(_))
        ));
    }

    #[test]
    fn corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_sample(dir.path());
        let img = Image::open(&path).unwrap();
        let off = img.page_offset(0, 3) + 100;
        drop(img);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xee], off).unwrap();
        let img = Image::open(&path).unwrap();
        match img.verify() {
            Err(ImageError::PageCorrupt {
                region: 0,
                page: 3,
                offset,
                ..
            }) => assert_eq!(offset, off - 100),
            other => panic!("{other:?}"),
        }
        // Truncation and a flipped header byte are refused on open.
        let len = std::fs::metadata(&path).unwrap().len();
        f.set_len(len - 10).unwrap();
        assert!(matches!(
            Image::open(&path),
            Err(ImageError::Truncated { .. })
        ));
        f.set_len(len).unwrap();
        f.write_all_at(&[0xff], 20).unwrap();
        assert!(matches!(
            Image::open(&path),
            Err(ImageError::Corrupt { what: "header", .. })
        ));
        f.write_all_at(b"NOTANIMG", 0).unwrap();
        assert!(matches!(Image::open(&path), Err(ImageError::NotAnImage(_))));
    }

    #[test]
    fn run_reads_equal_page_reads_across_a_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (_, base_id) = write_sample(dir.path());
        let delta = dir.path().join("delta");
        let w = ImageWriter::create(&delta, &regions(), Some(base_id)).unwrap();
        for p in [2u64, 3, 4] {
            w.write_page(p, &vec![0x70 + p as u8; 4096]).unwrap();
        }
        w.mark_zero(15);
        w.finish().unwrap();
        let chain = Chain::open(&delta).unwrap();
        // Every run of region 0 (pages from the base, the delta and holes).
        for first in 0..16u64 {
            for n in 1..=16 - first {
                let mut run = vec![0xaau8; n as usize * 4096];
                let any = chain.read_pages(0, first, &mut run).unwrap();
                let mut page = vec![0u8; 4096];
                let mut want_any = false;
                for k in 0..n {
                    chain.read_page(0, first + k, &mut page).unwrap();
                    want_any |= page.iter().any(|b| *b != 0);
                    assert!(run[k as usize * 4096..(k as usize + 1) * 4096] == page[..]);
                }
                assert_eq!(any, want_any, "pages {first}+{n}");
            }
        }
        let mut huge = vec![0u8; 4 << 20];
        assert!(chain.read_pages(1, 0, &mut huge).unwrap());
        assert!(huge[2 << 20..].iter().all(|b| *b == 9));
        // Runs past the region and partial pages are refused.
        assert!(chain.read_pages(0, 15, &mut [0u8; 8192]).is_err());
        assert!(chain.read_pages(0, 0, &mut [0u8; 100]).is_err());
        // A corrupt page inside a run is named.
        let off = chain.images()[0].page_offset(0, 3);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&delta)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0], off + 5).unwrap();
        let e = chain
            .read_pages(0, 2, &mut vec![0u8; 3 * 4096])
            .unwrap_err();
        assert!(matches!(e, ImageError::PageCorrupt { page: 3, .. }), "{e}");
    }

    #[test]
    fn chains_resolve_merge_and_name_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let (base, base_id) = write_sample(dir.path());
        let delta = dir.path().join("delta");
        let w = ImageWriter::create(&delta, &regions(), Some(base_id)).unwrap();
        w.write_page(3, &vec![0x77u8; 4096]).unwrap();
        w.mark_zero(15);
        let _ = w.finish().unwrap();
        let chain = Chain::open(&delta).unwrap();
        assert_eq!(chain.images().len(), 2);
        let mut buf = vec![0u8; 4096];
        chain.read_page(0, 3, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x77));
        chain.read_page(0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 1), "inherited from the base");
        chain.read_page(0, 15, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "zeroed in the delta");
        let merged = dir.path().join("merged");
        chain.merge(&merged).unwrap();
        let m = Chain::open(&merged).unwrap();
        assert_eq!(m.images().len(), 1);
        m.read_page(0, 3, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x77));
        std::fs::remove_file(&base).unwrap();
        assert!(matches!(
            Chain::open(&delta),
            Err(ImageError::MissingParent { .. })
        ));
        // A delta naming a parent with another region layout is refused.
        let other = dir.path().join("other");
        let w = ImageWriter::create(&other, &regions()[..1], None).unwrap();
        let other_id = w.finish().unwrap();
        let bad = dir.path().join("bad");
        let w = ImageWriter::create(&bad, &regions(), Some(other_id)).unwrap();
        w.finish().unwrap();
        assert!(matches!(
            Chain::open(&bad),
            Err(ImageError::ParentMismatch { .. })
        ));
    }

    #[test]
    fn abandoned_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let w = ImageWriter::create(&path, &regions(), None).unwrap();
        w.write_page(0, &[1u8; 4096]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn any_byte_flip_outside_holes_is_detected(pos in 0u64..u64::MAX, bit in 0u8..8) {
            let dir = tempfile::tempdir().unwrap();
            let (path, _) = write_sample(dir.path());
            let len = std::fs::metadata(&path).unwrap().len();
            let pos = pos % len;
            let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut b = [0u8];
            f.read_exact_at(&mut b, pos).unwrap();
            f.write_all_at(&[b[0] ^ (1 << bit)], pos).unwrap();
            let img = Image::open(&path);
            let detected = match img {
                Err(_) => true,
                Ok(img) => img.verify().is_err(),
            };
            // Every byte that is read must be covered: the used header bytes, the
            // stored pages, the index and the VM state. Padding and zero pages'
            // holes are never read.
            let img = Image::open(&path);
            let f2 = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            f2.write_all_at(&b, pos).unwrap();
            let clean = Image::open(&path).unwrap();
            let used_header = pos < (REGION_TABLE_AT + clean.regions().len() * REGION_ENTRY) as u64 || (HEADER_SIZE - 4..HEADER_SIZE).contains(&pos);
            let in_data_page = (0..clean.regions().len()).any(|r| {
                (0..clean.regions()[r].pages()).any(|p| {
                    let off = clean.page_offset(r, p);
                    pos >= off && pos < off + clean.regions()[r].page_size
                        && clean.page_state(clean.global_page(r, p)).map(|s| s.0) == Some(PageState::Data)
                })
            });
            let in_tail = pos >= clean.layout.data_end;
            if used_header || in_data_page || in_tail {
                proptest::prop_assert!(detected, "flip at {pos} undetected ({img:?})");
            }
        }
    }
}
