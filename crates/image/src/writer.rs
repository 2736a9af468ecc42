//! Writing an image crash-safely: a temporary file in the destination
//! directory, fsync, rename, fsync of the directory; never over an
//! existing file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::io;
use crate::format::{Layout, image_id};
use crate::{
    HEADER_SIZE, INDEX_ENTRY, ImageError, ImageId, MAGIC, PageState, REGION_TABLE_AT, RegionDesc,
    VERSION,
};

/// Writes an image. Methods take `&self` so that several threads can store
/// pages at once; the file only appears under its name after [`ImageWriter::finish`].
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    pub(crate) layout: Layout,
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
            .ok_or_else(|| ImageError::NotAFile(path.to_path_buf()))?;
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
        let (r, p) = self.layout.locate(global).ok_or(ImageError::OutOfRange {
            region: self.layout.regions.len(),
            first: global,
            count: 1,
            bytes: data.len(),
        })?;
        if data.len() as u64 != self.layout.regions[r].page_size {
            return Err(ImageError::PageLength {
                len: data.len(),
                page_size: self.layout.regions[r].page_size,
            });
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

    /// Stores `data.len() / page size` consecutive pages of one region,
    /// starting at page `global`, with one write: what a background writer
    /// saving runs of pages needs to keep up with a disk.
    pub fn write_run(&self, global: u64, data: &[u8]) -> Result<(), ImageError> {
        let out_of_range = || ImageError::OutOfRange {
            region: self.layout.regions.len(),
            first: global,
            count: 1,
            bytes: data.len(),
        };
        let (r, p) = self.layout.locate(global).ok_or_else(out_of_range)?;
        let ps = self.layout.regions[r].page_size;
        if data.is_empty() || data.len() as u64 % ps != 0 {
            return Err(ImageError::PageLength {
                len: data.len(),
                page_size: ps,
            });
        }
        let n = data.len() as u64 / ps;
        match self.layout.locate(global + n - 1) {
            Some((r2, _)) if r2 == r => {}
            _ => return Err(out_of_range()),
        }
        self.file
            .write_all_at(data, self.layout.offset(r, p))
            .map_err(io("writing", &self.tmp))?;
        for (k, page) in data.chunks(ps as usize).enumerate() {
            let crc = crc32c::crc32c(page);
            self.index[global as usize + k].store(
                (u64::from(PageState::Data.code()) << 32) | u64::from(crc),
                Ordering::Release,
            );
        }
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Stores consecutive pages of one region from page `global`: runs of
    /// data with one write each, all-zero pages as holes. Returns how many
    /// were zeros.
    pub fn store_run(&self, global: u64, data: &[u8], page_size: usize) -> Result<u64, ImageError> {
        let ps = page_size.max(1);
        let mut zeros = 0;
        let mut k = 0;
        let pages = data.len() / ps;
        while k < pages {
            let page = &data[k * ps..(k + 1) * ps];
            if page.iter().all(|b| *b == 0) {
                self.mark_zero(global + k as u64);
                zeros += 1;
                k += 1;
                continue;
            }
            let mut j = k + 1;
            while j < pages && data[j * ps..(j + 1) * ps].iter().any(|b| *b != 0) {
                j += 1;
            }
            self.write_run(global + k as u64, &data[k * ps..j * ps])?;
            k = j;
        }
        Ok(zeros)
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
            return Err(ImageError::Finished);
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
