//! Writing an image crash-safely: an unnamed temporary file (`O_TMPFILE`)
//! in the destination directory, fsync, a link under its name, fsync of the
//! directory; never over an existing file. A process killed while writing
//! leaves nothing behind. Where the file system has no `O_TMPFILE`, a named
//! `.NAME.tmp.PID` file is renamed instead (and removed if abandoned).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::io;
use crate::format::{Layout, image_id};
use crate::{
    FOLDED_FROM_AT, HEADER_SIZE, INDEX_ENTRY, ImageError, ImageId, MAGIC, PageState,
    REGION_TABLE_AT, RegionDesc, STANDS_FOR_AT, VERSION,
};

/// Where the pages go until the image is published.
#[derive(Debug)]
enum Temp {
    /// An `O_TMPFILE` file: no name until it is linked.
    Unnamed,
    /// A named temporary file (no `O_TMPFILE` on this file system).
    Named(PathBuf),
}

/// Writes an image. Methods take `&self` so that several threads can store
/// pages at once; the file only appears under its name after [`ImageWriter::finish`].
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    dir: PathBuf,
    temp: Temp,
    pub(crate) file: File,
    pub(crate) layout: Layout,
    parent: Option<ImageId>,
    /// A folded image: the ids of the delta it stands for and of the
    /// parent it was folded from.
    folded: Option<(ImageId, ImageId)>,
    /// Creation time to record (default: when finished).
    created: Option<u64>,
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
        if path.exists() {
            return Err(ImageError::Exists(path.to_path_buf()));
        }
        ImageWriter::start(path, regions, parent)
    }

    /// Starts a full image that will replace the file at `path`
    /// ([`ImageWriter::finish_replacing`]).
    pub(crate) fn create_replacement(
        path: &Path,
        regions: &[RegionDesc],
    ) -> Result<ImageWriter, ImageError> {
        ImageWriter::start(path, regions, None)
    }

    fn start(
        path: &Path,
        regions: &[RegionDesc],
        parent: Option<ImageId>,
    ) -> Result<ImageWriter, ImageError> {
        let layout = Layout::new(regions)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if path.file_name().is_none() {
            return Err(ImageError::NotAFile(path.to_path_buf()));
        }
        let (file, temp) = open_temp(&dir, path)?;
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
            dir,
            temp,
            file,
            layout,
            parent,
            folded: None,
            created: None,
            index,
            vm_state: std::sync::Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            finished: std::sync::atomic::AtomicBool::new(false),
        };
        w.file.set_len(w.layout.data_end).map_err(w.err("sizing"))?;
        Ok(w)
    }

    /// Marks a full image folded from a chain as standing for the delta
    /// `id`, folded from the parent `from` (see [`crate::fold()`]), created
    /// at `created`.
    pub(crate) fn folded(mut self, id: ImageId, from: ImageId, created: u64) -> ImageWriter {
        self.folded = Some((id, from));
        self.created = Some(created);
        self
    }

    /// The error of step `what` on this image (a full disk said so).
    pub(crate) fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| {
            if source.kind() == std::io::ErrorKind::StorageFull {
                return ImageError::NoSpace {
                    path: self.path.clone(),
                    what,
                    need: self.layout.data_end,
                };
            }
            let path = match &self.temp {
                Temp::Named(t) => t.clone(),
                Temp::Unnamed => self.path.clone(),
            };
            ImageError::Io { what, path, source }
        }
    }

    /// Records page `global` as data already in the file with crc `crc`
    /// (pages copied into place by [`crate::fold()`]).
    pub(crate) fn mark_data(&self, global: u64, crc: u32, bytes: u64) {
        if let Some(e) = self.index.get(global as usize) {
            e.store(
                (u64::from(PageState::Data.code()) << 32) | u64::from(crc),
                Ordering::Release,
            );
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
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
            .map_err(self.err("writing"))?;
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
            .map_err(self.err("writing"))?;
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

    /// Writes the index, VM state and header, syncs, and links the file
    /// under its name (refusing if the name appeared meanwhile). Returns the
    /// new image's id. Call once, after every page is stored.
    pub fn finish(&self) -> Result<ImageId, ImageError> {
        let id = self.seal()?;
        self.publish(false)?;
        Ok(id)
    }

    /// As [`ImageWriter::finish`], but atomically replaces the file at the
    /// path (a fold replacing the delta it stands for).
    pub(crate) fn finish_replacing(&self) -> Result<ImageId, ImageError> {
        let id = self.seal()?;
        self.publish(true)?;
        Ok(id)
    }

    /// Writes the index, VM state and header and syncs the file.
    fn seal(&self) -> Result<ImageId, ImageError> {
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
            .map_err(self.err("writing the index"))?;

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
        h[56..64].copy_from_slice(&self.created.unwrap_or(now).to_le_bytes());
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
        if let Some((stands_for, from)) = self.folded {
            h[STANDS_FOR_AT..STANDS_FOR_AT + 16].copy_from_slice(&stands_for.0);
            h[FOLDED_FROM_AT..FOLDED_FROM_AT + 16].copy_from_slice(&from.0);
        }
        let crc = crc32c::crc32c(&h[..HEADER_SIZE as usize - 4]);
        h[HEADER_SIZE as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&h, 0)
            .map_err(self.err("writing the header"))?;
        self.file.sync_all().map_err(self.err("syncing"))?;
        Ok(id)
    }

    /// Gives the synced file its name: a link of the unnamed file (or a
    /// rename of the named one). `replace`: over the file at the path,
    /// through a transient `.NAME.fold` name, since a link cannot replace.
    fn publish(&self, replace: bool) -> Result<(), ImageError> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staged = self.dir.join(format!(".{name}.fold"));
        let target = if replace { &staged } else { &self.path };
        if replace {
            // Left by a fold killed between its link and its rename.
            let _ = std::fs::remove_file(&staged);
        }
        match &self.temp {
            Temp::Unnamed => {
                let proc = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc.as_str(),
                    rustix::fs::CWD,
                    target,
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                )
                .map_err(|e| match e {
                    rustix::io::Errno::EXIST => ImageError::Exists(target.clone()),
                    e => self.err("linking into place")(e.into()),
                })?;
            }
            Temp::Named(tmp) => {
                if target.exists() {
                    return Err(ImageError::Exists(target.clone()));
                }
                std::fs::rename(tmp, target).map_err(io("renaming into place", target))?;
            }
        }
        self.finished.store(true, Ordering::SeqCst);
        if replace {
            std::fs::rename(&staged, &self.path).map_err(io("renaming into place", &self.path))?;
        }
        sync_dir(&self.dir);
        Ok(())
    }
}

/// Opens the temporary file of `path` in `dir`: unnamed where the file
/// system allows it.
fn open_temp(dir: &Path, path: &Path) -> Result<(File, Temp), ImageError> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::openat(
        rustix::fs::CWD,
        dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    ) {
        Ok(fd) => return Ok((File::from(fd), Temp::Unnamed)),
        // No O_TMPFILE here (EOPNOTSUPP; EISDIR on kernels without it).
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR) => {}
        Err(e) => return Err(io("creating a temporary file in", dir)(e.into())),
    }
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
    Ok((file, Temp::Named(tmp)))
}

/// Makes a directory's entries durable (best effort).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if let Temp::Named(tmp) = &self.temp {
            if !self.finished.load(Ordering::SeqCst) {
                // An abandoned image leaves nothing behind.
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}
