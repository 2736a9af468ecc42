//! The livepage kernel layer: a safe, documented API over Linux userfaultfd,
//! PAGEMAP_SCAN and the memory syscalls, negotiated at run time.
//!
//! This is the only livepage crate that issues raw syscalls and ioctls.
//!
//! - [`UffdBuilder`] creates a userfaultfd through `/dev/userfaultfd` or the
//!   syscall and performs the UFFDIO_API handshake; [`Uffd`] wraps every
//!   ioctl. Resolving ioctls return [`Resolved`]: EAGAIN and EEXIST are
//!   outcomes, ENOENT and ESRCH distinct errors ([`RangeError`]).
//! - [`Uffd::read_events`] reads many messages per `read(2)` into typed
//!   [`Event`]s; [`event::decode`] is the pure decoder.
//! - [`Pagemap::scan`] iterates PAGEMAP_SCAN results and copes with a full
//!   output buffer and the kernel's stale `walk_end`.
//! - [`mm`] holds RAII mappings, memfd and madvise; [`probe`] learns once per
//!   process what the kernel and this process may do.
//!
//! ```no_run
//! use livepage_uffd::{mm, CopyMode, Event, EventBuffer, RegisterMode, Resolved, UffdBuilder};
//! let uffd = UffdBuilder::new().create()?;
//! let region = mm::Mapping::anonymous(1 << 20, Default::default())?;
//! // SAFETY: `region` is only ever accessed through raw pointers.
//! unsafe { uffd.register(region.addr(), region.len(), RegisterMode::MISSING)? };
//! let page = vec![0xabu8; 4096];
//! let mut buf = EventBuffer::new(16);
//! for event in uffd.read_events(&mut buf)? {
//!     if let Event::PageFault(pf) = event {
//!         match uffd.copy(pf.address as usize, &page, CopyMode::default())? {
//!             Resolved::AlreadyPresent => uffd.wake(pf.address as usize, 4096)?,
//!             _ => {}
//!         }
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # References
//! userfaultfd(2), ioctl_userfaultfd(2), the kernel's
//! `admin-guide/mm/userfaultfd.rst` and `admin-guide/mm/pagemap.rst`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod errno;
mod error;
pub mod event;
pub mod fdpass;
mod flags;
pub mod mm;
pub mod pagemap;
pub mod poll;
pub mod probe;
pub mod reference;
mod uffd;

pub use builder::{Source, UffdBuilder};
pub use errno::Errno;
pub use error::{CreateError, Op, RangeError, ReadError};
pub use event::{Event, EventBuffer, PageFault};
pub use flags::{Categories, FaultFlags, Features, Ioctls, RegisterMode, ScanFlags};
pub use livepage_sys as sys;
pub use pagemap::{PageRegion, Pagemap, Scan, ScanError, ScanRequest};
pub use uffd::{BASE_PAGE, CopyMode, Resolved, Uffd};
