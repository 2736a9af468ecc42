//! Shared helpers: probing, regions, a poll-driven fault server, fork children.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_uffd::poll::{EventFd, poll_readable};
use livepage_uffd::probe::capabilities;
use livepage_uffd::{Event, EventBuffer, Features, Uffd, UffdBuilder};

/// The memory types the selftests run on.
pub const KINDS: [MemoryKind; 3] = [MemoryKind::Anon, MemoryKind::Shmem, MemoryKind::Hugetlb];

/// A non-blocking uffd with `features`, or None (after a printed skip).
pub fn uffd(test: &str, features: Features) -> Option<Uffd> {
    let caps = capabilities();
    if !caps.access.full() {
        livepage_testutil::skip(
            test,
            &format!("no full userfaultfd: {:?}", caps.access.advice()),
        );
        return None;
    }
    if !caps.features.contains(features) {
        livepage_testutil::skip(
            test,
            &format!("kernel lacks {:?}", features.difference(caps.features)),
        );
        return None;
    }
    if features.contains(Features::EVENT_FORK) && !caps.access.cap_sys_ptrace {
        livepage_testutil::skip(test, "EVENT_FORK needs CAP_SYS_PTRACE");
        return None;
    }
    Some(
        UffdBuilder::new()
            .non_blocking(true)
            .features(features)
            .create()
            .expect("create uffd"),
    )
}

/// A region of `pages` pages of `kind`, or None (after a printed skip).
pub fn region(test: &str, kind: MemoryKind, pages: usize) -> Option<Region> {
    match Region::new(kind, pages * kind.page_size()) {
        Ok(r) => Some(r),
        Err(e) if kind == MemoryKind::Hugetlb => {
            livepage_testutil::skip(test, &format!("no hugetlb memory: {e}"));
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The features a minor/missing registration of `kind` needs.
pub fn kind_features(kind: MemoryKind) -> Features {
    match kind {
        MemoryKind::Shmem => Features::MISSING_SHMEM,
        MemoryKind::Hugetlb => Features::MISSING_HUGETLBFS,
        _ => Features::empty(),
    }
}

/// A deterministic pattern for page `index`.
pub fn pattern(index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(index as u64 * 7 + 1) as u8
        })
        .collect()
}

/// A thread serving events of one uffd until stopped.
pub struct Server {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `uffd` with `f` on a new thread.
    pub fn start<F>(uffd: Arc<Uffd>, mut f: F) -> Server
    where
        F: FnMut(&Uffd, Event) + Send + 'static,
    {
        let stop = Arc::new(EventFd::new().unwrap());
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = EventBuffer::new(32);
            loop {
                let ready = poll_readable([uffd.as_ref().as_fd_ref(), stop2.as_fd()], -1).unwrap();
                if ready[1] {
                    return;
                }
                // No allocation here: a thread inside glibc's fork() holds the malloc
                // locks until this reader has read its FORK event.
                for ev in uffd.read_events(&mut buf).unwrap() {
                    f(&uffd, ev);
                }
            }
        });
        Server {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the thread and waits for it (propagating its panic).
    pub fn stop(mut self) {
        self.stop.signal();
        if let Some(h) = self.handle.take() {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.signal();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Borrowing a Uffd as an fd for poll.
pub trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}
impl AsFdRef for Uffd {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// Runs `f` on a thread and fails if it does not finish within `secs`.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let h = std::thread::spawn(f);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {secs}s (a fault was never resolved?)"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The uffd-wp bit (57) of `addr`'s pagemap entry.
pub fn wp_bit(addr: usize) -> bool {
    livepage_uffd::mm::pagemap_entry(addr).unwrap() & livepage_uffd::sys::pagemap_entry::UFFD_WP
        != 0
}

/// Forks; the child runs `child` (which must not allocate or take locks: the
/// parent is multi-threaded) and `_exit`s with its return value. Returns the
/// child's wait status.
///
/// Uses the raw fork syscall, not glibc's fork(): glibc takes every malloc lock
/// around the clone, and with EVENT_FORK the clone waits until a uffd reader has
/// read the event, so a reader that allocates would deadlock.
pub fn fork_child(child: impl FnOnce() -> i32) -> i32 {
    let pid = unsafe { libc::syscall(libc::SYS_fork) } as i32;
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = child();
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINTR),
            "waitpid failed"
        );
    }
}

/// Child-side: reads the uffd-wp bit of `addr` from an already-open pagemap fd
/// without allocating. Returns 1 if set, 0 if clear, 2 on error.
pub fn child_wp_bit(pagemap_fd: i32, addr: usize) -> i32 {
    let mut entry = 0u64;
    let off = (addr / 4096 * 8) as i64;
    let n = unsafe { libc::pread(pagemap_fd, (&mut entry as *mut u64).cast(), 8, off) };
    if n != 8 {
        return 2;
    }
    i32::from(entry & (1 << 57) != 0)
}

/// Child-side: reads one byte at `addr` (may fault).
pub fn child_read(addr: usize) -> u8 {
    unsafe { (addr as *const u8).read_volatile() }
}

/// Child-side: writes one byte at `addr` (may fault).
pub fn child_write(addr: usize, value: u8) {
    unsafe { (addr as *mut u8).write_volatile(value) }
}

/// Copies `len` bytes at `addr` into a pipe: a kernel-mode read of the memory.
/// Returns the errno (0 on success). EFAULT means the access was refused
/// (SIGBUS-mode fault or a poisoned page).
pub fn kernel_read(addr: usize, len: usize) -> i32 {
    let mut fds = [0i32; 2];
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
        0
    );
    // Make the pipe big enough for one huge page.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4 << 20) };
    let n = unsafe { libc::write(fds[1], addr as *const libc::c_void, len) };
    let err = if n < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    };
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    err
}

/// Whether `status` says the child was killed by `sig`.
pub fn killed_by(status: i32, sig: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == sig
}

/// Whether `status` says the child exited with `code`.
pub fn exited(status: i32, code: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == code
}
