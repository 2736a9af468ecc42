//! What the command-line tests that play Firecracker share: a client
//! written from Firecracker's documented handshake, and the server process.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use livepage_mem::{MemoryKind, Region};
use livepage_uffd::fdpass::send_with_fd;
use livepage_uffd::{Features, RegisterMode, Uffd, UffdBuilder};

pub const SIZES: [usize; 2] = [8 << 20, 4 << 20];

pub fn ok() -> bool {
    if !livepage_uffd::probe::capabilities().access.full() {
        livepage_testutil::skip("serve_firecracker", "no full userfaultfd");
        return false;
    }
    true
}

/// The snapshot's memory: both regions end to end, every seventh page zero.
pub fn memory() -> Vec<u8> {
    let total: usize = SIZES.iter().sum();
    let mut v = vec![0u8; total];
    for (p, page) in v.chunks_mut(4096).enumerate() {
        if p % 7 != 0 {
            for (i, b) in page.iter_mut().enumerate() {
                *b = (p as u32 * 13 + i as u32 / 16) as u8 | 1;
            }
        }
    }
    v
}

pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub stderr: std::sync::mpsc::Receiver<String>,
    /// The line the server printed once listening.
    pub banner: String,
}

pub fn server(dir: &Path, backing: &[&str], max_vms: u32) -> Server {
    server_with(dir, backing, &["--max-vms", &max_vms.to_string()])
}

/// Starts `serve-firecracker` with `args` beside the socket, backing and --json.
pub fn server_with(dir: &Path, backing: &[&str], args: &[&str]) -> Server {
    let socket = dir.join("fc.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_livepage"))
        .arg("serve-firecracker")
        .arg("--socket")
        .arg(&socket)
        .args(backing)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let err = child.stderr.take().unwrap();
    let (etx, stderr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("server: {l}");
            let _ = etx.send(l);
        }
    });
    // Listening once it says so (the file alone may be a stale one, or
    // exist a moment before listen(2)).
    let banner = loop {
        let l = stderr
            .recv_timeout(Duration::from_secs(20))
            .expect("the server did not start");
        if l.starts_with("serving ") {
            break l;
        }
    };
    Server {
        child,
        socket,
        lines,
        stderr,
        banner,
    }
}

pub fn uffd() -> Uffd {
    // As Firecracker creates it: EVENT_REMOVE, non-blocking, kernel faults too.
    UffdBuilder::new()
        .non_blocking(true)
        .user_mode_only(false)
        .features(Features::EVENT_REMOVE)
        .create()
        .unwrap()
}

pub fn mapping(base: usize, size: usize, offset: usize, ps: usize) -> String {
    format!(r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{ps}}}"#)
}

pub fn events(srv: &Server, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|_| {
            let l = srv.lines.recv_timeout(Duration::from_secs(60)).unwrap();
            serde_json::from_str(&l).unwrap()
        })
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server a test did not stop itself goes with the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the server process to exit; its status.
pub fn exit_status(srv: &mut Server, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < within, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` in a thread and fails (instead of hanging) if it takes longer
/// than `limit`: a fault nobody answers would otherwise hang the test.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let h = std::thread::spawn(f);
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(
            t0.elapsed() < limit,
            "still waiting after {limit:?}: a thread hangs"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().unwrap()
}

/// A VM as Firecracker makes one: anonymous regions of `(size, declared,
/// offset)` registered MISSING on one userfaultfd, handed over with the
/// first `declared` bytes of each announced at `offset` of the snapshot.
/// The socket is kept open, as Firecracker does.
pub fn vm(
    socket: &Path,
    regions: &[(usize, usize, usize)],
) -> (Vec<Arc<Region>>, Uffd, UnixStream) {
    let u = uffd();
    let rs: Vec<Arc<Region>> = regions
        .iter()
        .map(|&(size, _, _)| {
            let r = Arc::new(Region::new(MemoryKind::Anon, size).unwrap());
            r.register(&u, RegisterMode::MISSING).unwrap();
            r
        })
        .collect();
    let body: Vec<String> = rs
        .iter()
        .zip(regions)
        .map(|(r, &(_, declared, offset))| mapping(r.addr(), declared, offset, 4096))
        .collect();
    let s = UnixStream::connect(socket).unwrap();
    send_with_fd(
        s.as_fd(),
        format!("[{}]", body.join(",")).as_bytes(),
        u.as_fd(),
    )
    .unwrap();
    (rs, u, s)
}

/// The snapshot written as a memory file in `dir`; its path and bytes.
pub fn mem_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let want = memory();
    let mem = dir.join("mem");
    std::fs::write(&mem, &want).unwrap();
    (mem, want)
}
