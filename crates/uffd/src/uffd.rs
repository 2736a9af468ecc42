//! The userfaultfd handle and its ioctls.
//!
//! # Safety
//!
//! This module issues raw `open`, `syscall(SYS_userfaultfd)`, `ioctl` and
//! `read` calls. Every kernel struct passed by pointer lives on the caller's
//! stack for the duration of the call; the kernel never keeps the pointer.
//! The one contract callers must keep is stated on [`Uffd::register`]: once a
//! range is registered, this fd may change its contents at any time.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use livepage_sys as sys;

use crate::errno::Errno;
use crate::error::{Op, RangeError, ReadError, classify};
use crate::event::{Event, EventBuffer, RawEvent, decode};
use crate::flags::{Features, Ioctls, RegisterMode};

/// The base page size the resolving ioctls check alignment against.
pub const BASE_PAGE: usize = 4096;

/// What a resolving ioctl did. EAGAIN and EEXIST are outcomes here, not errors:
/// a fault server acts on each of them differently.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The whole range was handled.
    All,
    /// The kernel stopped after `bytes` (EAGAIN with progress, e.g. a signal or
    /// an EEXIST further on): continue at `start + bytes`.
    Partial {
        /// Bytes handled before the stop.
        bytes: u64,
    },
    /// EAGAIN with no progress: a non-cooperative event (remove, unmap, remap,
    /// fork) is pending. Read events first, then retry.
    EventPending,
    /// EEXIST: the page is already there (another resolver won). Wake the range
    /// if faulting threads may be waiting on it.
    AlreadyPresent,
}

fn check_range(op: Op, start: usize, len: usize) -> Result<(), RangeError> {
    let bad = || RangeError::BadRange {
        op,
        start: start as u64,
        len: len as u64,
    };
    if len == 0 || start % BASE_PAGE != 0 || len % BASE_PAGE != 0 {
        return Err(bad());
    }
    start.checked_add(len).map(|_| ()).ok_or_else(bad)
}

/// Turns the (return value, out-field) pair of a resolving ioctl into an outcome.
/// The out-field is signed: a negative errno there is never read as a length.
fn outcome(op: Op, start: usize, len: usize, ret: i32, out: i64) -> Result<Resolved, RangeError> {
    if ret >= 0 {
        return Ok(Resolved::All);
    }
    match Errno::last() {
        Errno::AGAIN if out > 0 => Ok(Resolved::Partial { bytes: out as u64 }),
        Errno::AGAIN => Ok(Resolved::EventPending),
        Errno::EXIST => Ok(Resolved::AlreadyPresent),
        errno => Err(classify(op, start, len, errno)),
    }
}

/// Options of UFFDIO_COPY.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyMode {
    /// Do not wake the faulting threads (batch, then [`Uffd::wake`]).
    pub dont_wake: bool,
    /// Map the page write-protected (needs a WP registration).
    pub write_protect: bool,
}

/// A userfaultfd after its UFFDIO_API handshake.
#[derive(Debug)]
pub struct Uffd {
    pub(crate) fd: OwnedFd,
    pub(crate) enabled: Features,
    pub(crate) supported: Features,
    pub(crate) api_ioctls: Ioctls,
    pub(crate) non_blocking: bool,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Uffd {
    /// Wraps a userfaultfd whose handshake another process (or the kernel, for a
    /// fork event) already made, e.g. one received over SCM_RIGHTS.
    /// `enabled` is what the sender enabled, as far as the caller knows.
    pub fn from_handshaken_fd(fd: OwnedFd, enabled: Features) -> Uffd {
        // SAFETY: F_GETFL on a valid fd only reads its status flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        Uffd {
            fd,
            enabled,
            supported: Features::empty(),
            api_ioctls: Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER,
            non_blocking: flags >= 0 && flags & libc::O_NONBLOCK != 0,
        }
    }

    /// A second handle on the same userfaultfd (`dup`, close-on-exec).
    pub fn try_clone(&self) -> Result<Uffd, Errno> {
        Ok(Uffd {
            fd: self.fd.try_clone().map_err(Errno::from)?,
            enabled: self.enabled,
            supported: self.supported,
            api_ioctls: self.api_ioctls,
            non_blocking: self.non_blocking,
        })
    }

    /// The features enabled on this context.
    pub fn features(&self) -> Features {
        self.enabled
    }
    /// Every feature the kernel reported at the handshake (empty for received fds).
    pub fn supported_features(&self) -> Features {
        self.supported
    }
    /// The fd-level ioctls the kernel reported.
    pub fn api_ioctls(&self) -> Ioctls {
        self.api_ioctls
    }
    /// Whether the fd is O_NONBLOCK.
    pub fn is_non_blocking(&self) -> bool {
        self.non_blocking
    }

    #[inline]
    fn ioctl<T>(&self, request: u32, arg: &mut T) -> i32 {
        // SAFETY: `arg` points to a live, properly sized uapi struct for `request`
        // (each caller pairs the opcode with its struct); the kernel reads and writes
        // it only during the call.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) }
    }

    /// `UFFDIO_REGISTER`: starts reporting faults of `mode` on `[start, start+len)`;
    /// returns the ioctls the range supports.
    ///
    /// # Safety
    /// From now until it is unregistered (or the fd is closed), the range's
    /// contents and protection may change at any moment through this fd, from
    /// any thread, and accesses may block until a handler resolves them. The
    /// caller must not hold Rust references (`&[u8]`, `&mut T`) into the range
    /// and must access it only through raw pointers or volatile operations.
    /// The range must not be memory the handling threads themselves need to
    /// run (their stacks, heap, this process's code).
    pub unsafe fn register(
        &self,
        start: usize,
        len: usize,
        mode: RegisterMode,
    ) -> Result<Ioctls, RangeError> {
        check_range(Op::Register, start, len)?;
        let mut reg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        if self.ioctl(sys::UFFDIO_REGISTER, &mut reg) < 0 {
            return Err(classify(Op::Register, start, len, Errno::last()));
        }
        Ok(Ioctls::from_bits_retain(reg.ioctls))
    }

    /// `UFFDIO_UNREGISTER`. Threads waiting on faults in the range are woken.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), RangeError> {
        check_range(Op::Unregister, start, len)?;
        let mut range = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        if self.ioctl(sys::UFFDIO_UNREGISTER, &mut range) < 0 {
            return Err(classify(Op::Unregister, start, len, Errno::last()));
        }
        Ok(())
    }

    /// Ends this userfaultfd's registration of the range but leaves the
    /// pages' uffd-wp bits in the page tables, so the next userfaultfd that
    /// registers the range in write-protect mode finds them protected: the
    /// hand-over between an async (WP_ASYNC) tracker and a synchronous
    /// write-protect context in microseconds, where unregistering (which
    /// clears every bit, a walk of the range) and protecting again (another)
    /// cost milliseconds per 100 MiB.
    ///
    /// How: re-registering the range MISSING-only drops VM_UFFD_WP without
    /// touching the page tables, and unregistering a range without it skips
    /// the clearing walk. Between this call and the next registration a
    /// write to a protected page is not reported to anyone and may leave its
    /// bit set, so the caller keeps writers away (paused) for that moment.
    /// Whether the kernel behaves so is probed once
    /// ([`crate::probe::Capabilities::wp_handover`]).
    pub fn unregister_keeping_protection(
        &self,
        start: usize,
        len: usize,
    ) -> Result<(), RangeError> {
        // SAFETY: the range is already registered with this userfaultfd (or the
        // kernel refuses); MISSING-only changes only which faults are reported,
        // and nothing faults on it before the unregister right after.
        unsafe { self.register(start, len, RegisterMode::MISSING) }?;
        self.unregister(start, len)
    }

    /// `UFFDIO_WAKE`: wakes threads blocked on faults in the range.
    pub fn wake(&self, start: usize, len: usize) -> Result<(), RangeError> {
        check_range(Op::Wake, start, len)?;
        let mut range = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        if self.ioctl(sys::UFFDIO_WAKE, &mut range) < 0 {
            return Err(classify(Op::Wake, start, len, Errno::last()));
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: atomically installs `src.len()` bytes at `dst` (registered).
    #[inline]
    pub fn copy(&self, dst: usize, src: &[u8], mode: CopyMode) -> Result<Resolved, RangeError> {
        let len = src.len();
        check_range(Op::Copy, dst, len)?;
        let mut m = 0;
        if mode.dont_wake {
            m |= sys::mode::COPY_DONTWAKE;
        }
        if mode.write_protect {
            m |= sys::mode::COPY_WP;
        }
        let mut arg = sys::uffdio_copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: len as u64,
            mode: m,
            copy: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_COPY, &mut arg);
        outcome(Op::Copy, dst, len, ret, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE`: maps zeros (the shared zero page on private anon).
    pub fn zeropage(
        &self,
        start: usize,
        len: usize,
        dont_wake: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::ZeroPage, start, len)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: if dont_wake {
                sys::mode::ZEROPAGE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_ZEROPAGE, &mut arg);
        outcome(Op::ZeroPage, start, len, ret, arg.zeropage)
    }

    /// `UFFDIO_WRITEPROTECT`: `protect` sets uffd-wp on the range; clearing it
    /// wakes writers unless `dont_wake`. (The kernel refuses WP together with DONTWAKE.)
    pub fn write_protect(
        &self,
        start: usize,
        len: usize,
        protect: bool,
        dont_wake: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::WriteProtect, start, len)?;
        let mode = match (protect, dont_wake) {
            (true, _) => sys::mode::WRITEPROTECT_WP,
            (false, true) => sys::mode::WRITEPROTECT_DONTWAKE,
            (false, false) => 0,
        };
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
        };
        let ret = self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut arg);
        outcome(Op::WriteProtect, start, len, ret, 0)
    }

    /// `UFFDIO_CONTINUE` (MINOR mode): maps the page-cache pages of the range.
    /// `write_protect` maps them write-protected (needs a WP registration).
    #[inline]
    pub fn continue_range(
        &self,
        start: usize,
        len: usize,
        dont_wake: bool,
        write_protect: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::Continue, start, len)?;
        let mut mode = 0;
        if dont_wake {
            mode |= sys::mode::CONTINUE_DONTWAKE;
        }
        if write_protect {
            mode |= sys::mode::CONTINUE_WP;
        }
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            mapped: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_CONTINUE, &mut arg);
        outcome(Op::Continue, start, len, ret, arg.mapped)
    }

    /// `UFFDIO_POISON`: later accesses to the range raise SIGBUS.
    pub fn poison(
        &self,
        start: usize,
        len: usize,
        dont_wake: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::Poison, start, len)?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: if dont_wake {
                sys::mode::POISON_DONTWAKE
            } else {
                0
            },
            updated: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_POISON, &mut arg);
        outcome(Op::Poison, start, len, ret, arg.updated)
    }

    /// Fails a range closed: poisons every page of `[start, start+len)` that
    /// is not mapped (mapped pages, EEXIST, are skipped), in `page_size` steps
    /// past them. Events pending in the way (EAGAIN) are read and handed to
    /// `on_event` (their senders wait for that); the page faults among them
    /// are not answered one by one: the range is woken at the end, so their
    /// threads retry and find a page or a poison marker.
    pub fn poison_holes(
        &self,
        start: usize,
        len: usize,
        page_size: usize,
        mut on_event: impl FnMut(Event),
    ) -> Result<(), RangeError> {
        let mut events = EventBuffer::new(16);
        let mut off = 0;
        while off < len {
            match self.poison(start + off, len - off, false)? {
                Resolved::All => break,
                Resolved::Partial { bytes } => off += bytes as usize,
                Resolved::AlreadyPresent => off += page_size,
                Resolved::EventPending => {
                    for ev in self
                        .read_events(&mut events)
                        .map_err(|_| RangeError::Kernel {
                            op: Op::Poison,
                            start: (start + off) as u64,
                            len: (len - off) as u64,
                            errno: Errno::AGAIN,
                        })?
                    {
                        on_event(ev);
                    }
                }
            }
        }
        self.wake(start, len)
    }

    /// `UFFDIO_MOVE`: remaps the pages of `[src, src+len)` to `dst` (registered)
    /// without copying. Source holes count as moved with `allow_src_holes`;
    /// otherwise they fail with ENOENT.
    ///
    /// # Safety
    /// `[src, src+len)` is private anonymous memory of this process that no Rust
    /// reference points into; after the call its pages are gone (they read as zeros
    /// or fault).
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        dont_wake: bool,
        allow_src_holes: bool,
    ) -> Result<Resolved, RangeError> {
        check_range(Op::Move, dst, len)?;
        check_range(Op::Move, src, len)?;
        let mut mode = 0;
        if dont_wake {
            mode |= sys::mode::MOVE_DONTWAKE;
        }
        if allow_src_holes {
            mode |= sys::mode::MOVE_ALLOW_SRC_HOLES;
        }
        let mut arg = sys::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            moved: 0,
        };
        let ret = self.ioctl(sys::UFFDIO_MOVE, &mut arg);
        outcome(Op::Move, dst, len, ret, arg.moved)
    }

    /// Reads as many messages as are queued (blocking for the first one unless the
    /// fd is O_NONBLOCK) and decodes them into `buf`. Returns the decoded events;
    /// an empty drain means nothing was queued on a non-blocking fd.
    /// A fork event's fd is owned by the returned [`Event::Fork`].
    pub fn read_events<'b>(
        &self,
        buf: &'b mut EventBuffer,
    ) -> Result<std::vec::Drain<'b, Event>, ReadError> {
        buf.events.clear();
        let bytes = loop {
            // SAFETY: `buf.raw` is a live, writable array of uffd_msg; the length passed
            // is its size in bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.raw.as_mut_ptr().cast(),
                    buf.raw.len() * std::mem::size_of::<sys::uffd_msg>(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            match Errno::last() {
                Errno::INTR => continue,
                Errno::AGAIN => return Ok(buf.events.drain(..)),
                e => return Err(ReadError::Read(e)),
            }
        };
        let count = bytes / std::mem::size_of::<sys::uffd_msg>();
        let tid = self.enabled.contains(Features::THREAD_ID);
        let mut first_err = None;
        for msg in &buf.raw[..count] {
            match decode(msg, tid) {
                Ok(RawEvent::PageFault(pf)) => buf.events.push(Event::PageFault(pf)),
                Ok(RawEvent::Fork { ufd }) => {
                    // SAFETY: the kernel installed `ufd` in our fd table for this message
                    // and hands its ownership to the reader.
                    let fd = unsafe { OwnedFd::from_raw_fd(ufd as RawFd) };
                    buf.events.push(Event::Fork {
                        uffd: Uffd::from_handshaken_fd(fd, self.enabled),
                    })
                }
                Ok(RawEvent::Remap { from, to, len }) => {
                    buf.events.push(Event::Remap { from, to, len })
                }
                Ok(RawEvent::Remove { start, end }) => {
                    buf.events.push(Event::Remove { start, end })
                }
                Ok(RawEvent::Unmap { start, end }) => buf.events.push(Event::Unmap { start, end }),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        buf.undecodable = first_err;
        match first_err {
            Some(e) if buf.events.is_empty() => Err(ReadError::Decode(e)),
            // Keep what decoded (fork fds are owned by then); the bad message stays
            // visible through `EventBuffer::undecodable`.
            _ => Ok(buf.events.drain(..)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_validated_before_the_kernel() {
        assert!(check_range(Op::Copy, 0x1000, 0x1000).is_ok());
        assert!(matches!(
            check_range(Op::Copy, 0x1001, 0x1000),
            Err(RangeError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, 0x1000, 0),
            Err(RangeError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, 0x1000, 0x800),
            Err(RangeError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, usize::MAX & !0xfff, 0x2000),
            Err(RangeError::BadRange { .. })
        ));
    }

    #[test]
    fn classify_keeps_errno() {
        assert_eq!(
            classify(Op::Copy, 0, 4096, Errno::NOENT).errno(),
            Errno::NOENT
        );
        assert!(matches!(
            classify(Op::Copy, 0, 4096, Errno::NOSPC),
            RangeError::TargetGone { .. }
        ));
        assert_eq!(
            classify(Op::Move, 0, 4096, Errno::BUSY).errno(),
            Errno::BUSY
        );
    }
}
