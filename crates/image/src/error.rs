//! Why an image could not be written or read, with the file, section, page
//! and file offset.

use std::path::{Path, PathBuf};

use crate::{ImageId, OLDEST_VERSION, VERSION};

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
    #[error(
        "{path} is image format version {found}; this build reads versions {OLDEST_VERSION} to {VERSION} (a newer livepage wrote it: read it with that one)"
    )]
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
        "{child}: its parent image {parent} is missing (looked for an image with that id in {dir}{}); restore the parent or merge the chain where it is complete",
        damaged_note(damaged)
    )]
    MissingParent {
        /// The delta.
        child: PathBuf,
        /// The parent's id.
        parent: ImageId,
        /// Where it was looked for.
        dir: PathBuf,
        /// Images in that directory whose header is damaged (the parent may
        /// be one of them, with its id damaged too).
        damaged: Vec<PathBuf>,
    },
    /// A delta's parent is there, but its header is damaged.
    #[error(
        "{child}: its parent image {parent} is {path}, whose header is corrupt (its checksum does not match); restore that file from a copy, or merge the chain where it is complete"
    )]
    CorruptParent {
        /// The delta.
        child: PathBuf,
        /// The parent's id.
        parent: ImageId,
        /// The damaged parent.
        path: PathBuf,
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
    /// An image holds 1 to `MAX_REGIONS` regions.
    #[error("an image holds 1 to {max} regions, not {count}")]
    RegionCount {
        /// Regions given.
        count: usize,
        /// The most an image holds.
        max: usize,
    },
    /// A region's length and page size do not fit.
    #[error(
        "region {region}: length {len:#x} is not a non-zero number of {page_size:#x}-byte pages (4 KiB or larger, a power of two)"
    )]
    RegionShape {
        /// Region.
        region: usize,
        /// Its length.
        len: u64,
        /// Its page size.
        page_size: u64,
    },
    /// The regions add up to more than a file can hold.
    #[error("the regions add up to more than an image file can hold")]
    TooLarge,
    /// A request outside the image (no such region, pages beyond it, a
    /// buffer that is not a whole number of its pages).
    #[error("pages {first}+{count} ({bytes} bytes) do not fit region {region} of this image")]
    OutOfRange {
        /// Region asked for.
        region: usize,
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
        /// The buffer's length.
        bytes: usize,
    },
    /// A global page number beyond the image.
    #[error("page {page} is beyond the image's {pages} pages")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages the image has.
        pages: u64,
    },
    /// A page of the wrong length.
    #[error("a page of {len} bytes for a region of {page_size}-byte pages")]
    PageLength {
        /// Bytes given.
        len: usize,
        /// The region's page size.
        page_size: u64,
    },
    /// The path names no file.
    #[error("{0} is not a file path")]
    NotAFile(PathBuf),
    /// The writer was finished already.
    #[error("the image is already finished")]
    Finished,
    /// The disk filled up while writing an image; nothing was published.
    #[error(
        "the file system holding {path} is full ({what}; the image takes up to {need} bytes); every existing image is intact: free space there and try again (a fold needs room for one full image beside its chain)"
    )]
    NoSpace {
        /// The image being written.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// Bytes the image needed in all.
        need: u64,
    },
    /// Two images that cannot be folded together.
    #[error("cannot fold {child} into {base}: {why}")]
    NotFoldable {
        /// The parent.
        base: PathBuf,
        /// The delta.
        child: PathBuf,
        /// Why not.
        why: &'static str,
    },
    /// A chain too long to be anything but a cycle.
    #[error("image chain longer than {0} images (a cycle?)")]
    ChainTooLong(usize),
}

fn damaged_note(damaged: &[PathBuf]) -> String {
    match damaged {
        [] => String::new(),
        [one] => format!(
            "; {} there has a corrupt header and may be it",
            one.display()
        ),
        [first, rest @ ..] => format!(
            "; {} images there have corrupt headers, e.g. {}",
            rest.len() + 1,
            first.display()
        ),
    }
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
