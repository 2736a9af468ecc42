//! Images at fleet scale: an image kept in a store as a manifest and
//! content-addressed chunks (docs/FORMAT.md "Chunked images").
//!
//! A chunk spans 512 KiB of guest pages, is named by the BLAKE3 hash of its
//! bytes, stored zstd-compressed (raw when that does not pay) and verified
//! against its name on every read, so images, deltas and clones that share
//! a span share its chunk. A [`Store`] is a local directory (`dir:///path`)
//! or any S3-compatible store (`s3://bucket/prefix`) through the
//! `object_store` crate. [`push()`] uploads a local image chain (only what
//! the store lacks), [`pull()`] writes a local image back, [`gc()`] deletes
//! what no manifest names, and [`StoreSource`] lets a lazy restore run
//! straight from the store through a shared on-disk [`ChunkCache`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod chunk;
mod error;
mod gc;
mod image;
pub mod manifest;
mod pull;
mod push;
mod source;
mod store;
mod url;

pub use cache::ChunkCache;
pub use chunk::ChunkId;
pub use error::StoreError;
pub use gc::{GcReport, gc};
pub use image::StoreImage;
pub use manifest::Manifest;
pub use pull::{PullReport, pull};
pub use push::{PushOptions, PushReport, PushedImage, push};
pub use source::{SourceStats, StoreSource};
pub use store::{Listed, Store, StoreOptions};
pub use url::{StoreUrl, check_name, is_url};
