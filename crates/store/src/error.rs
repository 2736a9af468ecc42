//! What can go wrong with a store, an image in it, or a chunk.

use crate::chunk::{ChunkError, ChunkId};
use crate::manifest::ManifestError;

/// Errors of store operations: each names the store, and the object, image,
/// region and pages where it applies.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An address that names no store.
    #[error("{url}: {problem}")]
    BadUrl {
        /// The address given.
        url: String,
        /// What is wrong and how to write it.
        problem: &'static str,
    },
    /// The store could not be set up (configuration, environment).
    #[error("opening the store {url}: {source}")]
    Open {
        /// The store.
        url: String,
        /// The cause.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A local store's directory does not exist.
    #[error("there is no store at {url} (a `livepage push` there creates one)")]
    NoStore {
        /// The store.
        url: String,
    },
    /// Reading, writing, listing or deleting an object failed (after the
    /// client's retries, within the deadline).
    #[error("{op} {key} in {url}: {source}")]
    Object {
        /// The store.
        url: String,
        /// The object.
        key: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: Box<object_store::Error>,
    },
    /// No image of that name.
    #[error("{url} holds no image {name} (`livepage ls {url}` lists what it holds)")]
    NoImage {
        /// The store.
        url: String,
        /// The name asked for.
        name: String,
    },
    /// An image's manifest is unreadable.
    #[error("the manifest of image {name} in {url}: {problem}")]
    BadManifest {
        /// The store.
        url: String,
        /// The image.
        name: String,
        /// What is wrong.
        #[source]
        problem: ManifestError,
    },
    /// A chunk is missing or not what its name says.
    #[error("chunk {id} in {url} (image {image}, {part}): {problem}")]
    BadChunk {
        /// The store.
        url: String,
        /// The chunk.
        id: ChunkId,
        /// The image read.
        image: String,
        /// Which pages it holds ("region 0, pages 128..256", "VM state").
        part: String,
        /// What is wrong.
        #[source]
        problem: Box<ChunkError>,
    },
    /// A chunk the manifest names is not in the store.
    #[error(
        "chunk {id} of image {image} ({part}) is missing from {url} (deleted by a gc run while nothing referenced it?)"
    )]
    MissingChunk {
        /// The store.
        url: String,
        /// The chunk.
        id: ChunkId,
        /// The image read.
        image: String,
        /// Which pages it holds.
        part: String,
    },
    /// Pushing would replace a different image of the same name.
    #[error(
        "{url} already holds a different image named {name}; push under another name with --name"
    )]
    NameTaken {
        /// The store.
        url: String,
        /// The name.
        name: String,
    },
    /// An image this layout cannot hold.
    #[error("{0}")]
    Unsupported(String),
    /// A local image could not be read or written.
    #[error(transparent)]
    Image(#[from] livepage_image::ImageError),
    /// A local file (the chunk cache) could not be used.
    #[error("{what} {path}: {source}")]
    Local {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The client's runtime could not start.
    #[error("starting the object store client: {0}")]
    Runtime(#[source] std::io::Error),
}

impl StoreError {
    /// Whether the store itself failed (unreachable, refusing), as opposed
    /// to a bad object in it.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::Object { .. } | StoreError::Open { .. })
    }
}

pub(crate) fn local(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Local { what, path, source }
}
