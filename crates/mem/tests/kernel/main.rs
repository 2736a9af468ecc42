//! Kernel-feature tests, written from the scenarios of the kernel's own
//! userfaultfd and pagemap selftests (see ../shared/docs/kernel-selftests.md).
//! Each probes for its feature and prints `SKIPPED` (or fails under
//! `LIVEPAGE_REQUIRE_ALL=1`) when the kernel lacks it.
#![allow(clippy::undocumented_unsafe_blocks, clippy::unwrap_used)]

mod common;

mod api;
mod events;
mod minor;
mod pagemap;
mod register;
mod resolve;
mod stress;
mod wp;
