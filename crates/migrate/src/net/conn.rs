//! One connection of a migration, plain TCP or TLS, carrying frames both
//! ways at once: one thread reads while others write. TLS keeps the
//! socket blocking and never holds the TLS state across a socket call: a
//! reader reads ciphertext, then decrypts under the lock; a writer
//! encrypts under the lock, then writes (one writer at a time, so records
//! leave in sequence). `shutdown` wakes both.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::proto::frame::{FrameError, HEADER_LEN, Header};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The socket failed, or the peer closed or reset it.
    #[error("connection to {peer}: {source}")]
    Io {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS failed (a bad certificate, a forged record).
    #[error("TLS with {peer}: {source}")]
    Tls {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: rustls::Error,
    },
    /// The bytes are not a valid frame.
    #[error("bad frame from {peer}: {source}")]
    Frame {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: FrameError,
    },
}

struct Tls {
    conn: Mutex<rustls::Connection>,
}

/// A connection: frames out from any thread, in from one.
pub struct Conn {
    sock: TcpStream,
    tls: Option<Tls>,
    peer: SocketAddr,
    /// Serialises writers (one frame at a time, records in order); holds
    /// the ciphertext scratch buffer.
    send: Mutex<Vec<u8>>,
    /// The reader's buffers: ciphertext read, plaintext not yet consumed.
    recv: Mutex<RecvBuf>,
    sent: AtomicU64,
    received: AtomicU64,
    shut: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct RecvBuf {
    /// Ciphertext read from the socket.
    raw: Vec<u8>,
    /// Plaintext decrypted and not yet handed out, from `at`.
    plain: Vec<u8>,
    at: usize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Socket options every migration connection gets.
pub(crate) fn tune(sock: &TcpStream, user_timeout: Duration, demand: bool) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let s = socket2::SockRef::from(sock);
    // Unacknowledged data for this long means the link is gone.
    s.set_tcp_user_timeout(Some(user_timeout))?;
    // Keepalive counts whole seconds: probes a quiet link every second.
    let second = Duration::from_secs(1);
    s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(second)
            .with_interval(second)
            .with_retries(2),
    )?;
    if demand {
        // Expedited forwarding, where the network honours DSCP; and the
        // host's own queues take it first.
        let _ = s.set_tos_v4(0xb8);
        let _ = s.set_priority(6);
    }
    Ok(())
}

impl Conn {
    /// A plain TCP connection.
    pub(crate) fn plain(sock: TcpStream, peer: SocketAddr) -> Conn {
        Conn::new(sock, None, peer)
    }

    /// A TLS connection whose handshake is complete.
    pub(crate) fn tls(sock: TcpStream, conn: rustls::Connection, peer: SocketAddr) -> Conn {
        Conn::new(
            sock,
            Some(Tls {
                conn: Mutex::new(conn),
            }),
            peer,
        )
    }

    fn new(sock: TcpStream, tls: Option<Tls>, peer: SocketAddr) -> Conn {
        Conn {
            sock,
            tls,
            peer,
            send: Mutex::new(Vec::new()),
            recv: Mutex::new(RecvBuf::default()),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            shut: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Bytes of frames sent and received.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    fn io(&self, source: std::io::Error) -> ConnError {
        ConnError::Io {
            peer: self.peer,
            source,
        }
    }

    /// Sends one frame.
    pub fn send(&self, header: Header, payload: &[u8]) -> Result<(), ConnError> {
        let head = header.encode(payload);
        let mut scratch = self
            .send
            .lock()
            .map_err(|_| self.io(std::io::Error::other("a writer panicked")))?;
        match &self.tls {
            None => {
                // One write for small frames (one segment with NODELAY).
                if payload.len() <= 16 << 10 {
                    scratch.clear();
                    scratch.extend_from_slice(&head);
                    scratch.extend_from_slice(payload);
                    (&self.sock).write_all(&scratch).map_err(|e| self.io(e))?;
                } else {
                    (&self.sock).write_all(&head).map_err(|e| self.io(e))?;
                    (&self.sock).write_all(payload).map_err(|e| self.io(e))?;
                }
            }
            Some(tls) => {
                // Encrypt a piece under the lock, write it without: rustls
                // takes only so much plaintext at a time. A small frame
                // goes as one record.
                let small: Vec<u8>;
                let parts: [&[u8]; 2] = if payload.len() <= 16 << 10 {
                    small = [&head[..], payload].concat();
                    [&small, &[]]
                } else {
                    [&head, payload]
                };
                for part in parts {
                    let mut rest = part;
                    while !rest.is_empty() {
                        scratch.clear();
                        {
                            let mut c = tls.conn.lock().map_err(|_| {
                                self.io(std::io::Error::other("TLS state poisoned"))
                            })?;
                            let n = c.writer().write(rest).map_err(|e| self.io(e))?;
                            rest = &rest[n..];
                            while c.wants_write() {
                                c.write_tls(&mut *scratch).map_err(|e| self.io(e))?;
                            }
                        }
                        (&self.sock).write_all(&scratch).map_err(|e| self.io(e))?;
                    }
                }
            }
        }
        self.sent
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Receives one frame; its payload replaces `payload`'s contents. One
    /// thread at a time.
    pub fn recv(&self, payload: &mut Vec<u8>) -> Result<Header, ConnError> {
        let mut buf = self
            .recv
            .lock()
            .map_err(|_| self.io(std::io::Error::other("a reader panicked")))?;
        let mut head = [0u8; HEADER_LEN];
        self.read_exact(&mut buf, &mut head)?;
        let h = Header::decode(&head).map_err(|source| ConnError::Frame {
            peer: self.peer,
            source,
        })?;
        payload.resize(h.len as usize, 0);
        self.read_exact(&mut buf, payload)?;
        h.check_payload(payload)
            .map_err(|source| ConnError::Frame {
                peer: self.peer,
                source,
            })?;
        self.received
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        Ok(h)
    }

    fn read_exact(&self, rb: &mut RecvBuf, out: &mut [u8]) -> Result<(), ConnError> {
        let Some(tls) = &self.tls else {
            return (&self.sock).read_exact(out).map_err(|e| self.io(e));
        };
        let mut done = 0;
        while done < out.len() {
            if rb.at < rb.plain.len() {
                let n = (rb.plain.len() - rb.at).min(out.len() - done);
                out[done..done + n].copy_from_slice(&rb.plain[rb.at..rb.at + n]);
                rb.at += n;
                done += n;
                continue;
            }
            rb.plain.clear();
            rb.at = 0;
            // Plaintext rustls holds already (read with the handshake's
            // last flight, say).
            {
                let mut c = tls
                    .conn
                    .lock()
                    .map_err(|_| self.io(std::io::Error::other("TLS state poisoned")))?;
                let want = c
                    .process_new_packets()
                    .map_err(|source| ConnError::Tls {
                        peer: self.peer,
                        source,
                    })?
                    .plaintext_bytes_to_read();
                if want > 0 {
                    rb.plain.resize(want, 0);
                    c.reader()
                        .read_exact(&mut rb.plain)
                        .map_err(|e| self.io(e))?;
                    continue;
                }
            }
            // Ciphertext, read without the TLS lock (writers go on).
            rb.raw.resize(64 << 10, 0);
            let n = (&self.sock).read(&mut rb.raw).map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let mut c = tls
                .conn
                .lock()
                .map_err(|_| self.io(std::io::Error::other("TLS state poisoned")))?;
            let mut slice = &rb.raw[..n];
            while !slice.is_empty() {
                c.read_tls(&mut slice).map_err(|e| self.io(e))?;
                let state = c.process_new_packets().map_err(|source| ConnError::Tls {
                    peer: self.peer,
                    source,
                })?;
                // Take the plaintext out at once, so rustls's own buffer
                // never fills.
                let want = state.plaintext_bytes_to_read();
                if want > 0 {
                    let at = rb.plain.len();
                    rb.plain.resize(at + want, 0);
                    c.reader()
                        .read_exact(&mut rb.plain[at..])
                        .map_err(|e| self.io(e))?;
                }
                if state.peer_has_closed() && rb.plain.is_empty() {
                    return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
        Ok(())
    }

    /// Sets how long a read and a write may wait (None: for ever;
    /// heartbeats and the user timeout find a dead link instead).
    pub(crate) fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) {
        let _ = self.sock.set_read_timeout(read);
        let _ = self.sock.set_write_timeout(write);
    }

    /// Closes both directions: a thread blocked reading or writing returns.
    pub fn shutdown(&self) {
        self.shut.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// Whether [`Conn::shutdown`] was called.
    pub fn is_shut(&self) -> bool {
        self.shut.load(Ordering::SeqCst)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shutdown();
    }
}
