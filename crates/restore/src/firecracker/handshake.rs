//! Firecracker's page-fault handshake (`mem_backend: {backend_type:
//! "Uffd"}`): Firecracker connects to our Unix socket and sends one message
//! whose body is a JSON array of guest region mappings
//! `{base_host_virt_addr, size, offset, page_size}` with its guest memory's
//! userfaultfd (registered MISSING, with EVENT_REMOVE) attached as
//! SCM_RIGHTS. Every field is checked; a refusal names the problem.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use livepage_uffd::fdpass::{is_api_done, is_userfaultfd, recv_with_fd};
use livepage_uffd::{Features, Uffd};
use serde::{Deserialize, Serialize};

/// The most bytes a handshake message may have.
pub const MAX_HANDSHAKE: usize = 64 << 10;

/// One guest memory region as Firecracker describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address of the region in Firecracker.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region's bytes in the memory file.
    pub offset: u64,
    /// Page size in bytes (4096, or 2 MiB on hugetlbfs).
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Deprecated name of the same (bytes, despite the name).
    #[serde(default)]
    pub page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// The page size, whichever field carried it.
    pub fn page_bytes(&self) -> u64 {
        self.page_size.or(self.page_size_kib).unwrap_or(0)
    }
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket failed or closed before a message came.
    #[error("the handshake could not be read: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// No fd came with the message.
    #[error(
        "the handshake message carried no file descriptor (the userfaultfd must come as SCM_RIGHTS)"
    )]
    NoFd,
    /// The fd is not a userfaultfd.
    #[error("the file descriptor sent is not a userfaultfd")]
    NotUffd,
    /// The userfaultfd's UFFDIO_API handshake was not done.
    #[error(
        "the userfaultfd sent has not had its UFFDIO_API handshake (the VMM must make it before \
         sending the fd)"
    )]
    NotHandshaken,
    /// Not the JSON expected.
    #[error(
        "the handshake is not a JSON array of {{base_host_virt_addr, size, offset, page_size}}: {0}"
    )]
    Json(#[source] Arc<serde_json::Error>),
    /// No regions.
    #[error("the handshake lists no guest regions")]
    Empty,
    /// A page size we cannot serve.
    #[error("region {index}: page size {page_size} is not 4096 or 2097152")]
    PageSize {
        /// Region index.
        index: usize,
        /// The page size given.
        page_size: u64,
    },
    /// Zero-sized or overflowing.
    #[error("region {index}: size {size} at {base:#x} is empty or overflows")]
    Size {
        /// Region index.
        index: usize,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// Not page aligned.
    #[error("region {index}: {field} {value:#x} is not aligned to its {page_size}-byte pages")]
    Misaligned {
        /// Region index.
        index: usize,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The page size.
        page_size: u64,
    },
    /// Two regions overlap in Firecracker's address space.
    #[error("regions {a} and {b} overlap in the VMM's address space")]
    Overlap {
        /// One.
        a: usize,
        /// The other.
        b: usize,
    },
    /// The backing cannot serve these regions.
    #[error(transparent)]
    Backing(#[from] super::server::BackingError),
    /// The restore engine could not start.
    #[error("the restore engine could not start: {0}")]
    Engine(#[source] Arc<crate::RestoreError>),
    /// A region reaches past the memory file or image.
    #[error(
        "region {index} ends at byte {end} of the memory snapshot, which has {have} bytes \
         (a snapshot of another VM?)"
    )]
    BeyondBacking {
        /// Region index.
        index: usize,
        /// Its end offset.
        end: u64,
        /// The backing's length.
        have: u64,
    },
}

/// Parses and checks a handshake body against a backing of `backing_len` bytes.
pub fn parse_mappings(
    body: &[u8],
    backing_len: u64,
) -> Result<Vec<GuestRegionUffdMapping>, HandshakeError> {
    let maps: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(body).map_err(|e| HandshakeError::Json(Arc::new(e)))?;
    check_mappings(&maps, backing_len)?;
    Ok(maps)
}

/// Checks mappings against a backing of `backing_len` bytes.
pub fn check_mappings(
    maps: &[GuestRegionUffdMapping],
    backing_len: u64,
) -> Result<(), HandshakeError> {
    if maps.is_empty() {
        return Err(HandshakeError::Empty);
    }
    for (i, m) in maps.iter().enumerate() {
        let ps = m.page_bytes();
        if ps != 4096 && ps != 2 << 20 {
            return Err(HandshakeError::PageSize {
                index: i,
                page_size: ps,
            });
        }
        if m.size == 0 || m.base_host_virt_addr.checked_add(m.size).is_none() {
            return Err(HandshakeError::Size {
                index: i,
                base: m.base_host_virt_addr,
                size: m.size,
            });
        }
        for (field, value) in [
            ("base_host_virt_addr", m.base_host_virt_addr),
            ("size", m.size),
            ("offset", m.offset),
        ] {
            if value % ps != 0 {
                return Err(HandshakeError::Misaligned {
                    index: i,
                    field,
                    value,
                    page_size: ps,
                });
            }
        }
        let end = m.offset.saturating_add(m.size);
        if end > backing_len {
            return Err(HandshakeError::BeyondBacking {
                index: i,
                end,
                have: backing_len,
            });
        }
    }
    for a in 0..maps.len() {
        for b in a + 1..maps.len() {
            let (x, y) = (&maps[a], &maps[b]);
            if x.base_host_virt_addr < y.base_host_virt_addr + y.size
                && y.base_host_virt_addr < x.base_host_virt_addr + x.size
            {
                return Err(HandshakeError::Overlap { a, b });
            }
        }
    }
    Ok(())
}

/// A refused handshake, with what came of it: the userfaultfd (when one
/// came and is usable) and the regions announced (when the JSON parsed), so
/// the VM can be failed closed instead of left waiting for pages.
#[derive(Debug)]
pub struct Refusal {
    /// Why.
    pub error: HandshakeError,
    /// The userfaultfd sent, if usable.
    pub uffd: Option<Uffd>,
    /// The regions announced, valid or not.
    pub announced: Vec<GuestRegionUffdMapping>,
}

impl Refusal {
    fn bare(error: HandshakeError) -> Refusal {
        Refusal {
            error,
            uffd: None,
            announced: Vec::new(),
        }
    }

    /// Poisons every announced region that is page aligned: the VM's vCPUs
    /// get SIGBUS at their first touch and its snapshot load fails at once,
    /// instead of hanging on pages nobody will serve (Firecracker never
    /// reads our reply). Returns whether anything was poisoned.
    pub fn fail_closed(&self) -> bool {
        let Some(u) = &self.uffd else { return false };
        let mut any = false;
        for m in &self.announced {
            let ps = match m.page_bytes() {
                p @ (4096 | 0x20_0000) => p,
                _ => 4096,
            };
            if m.size > 0 && m.base_host_virt_addr % ps == 0 && m.size % ps == 0 {
                any |= u
                    .poison_holes(
                        m.base_host_virt_addr as usize,
                        m.size as usize,
                        ps as usize,
                        |_| {},
                    )
                    .is_ok();
            }
        }
        any
    }
}

/// Reads and checks one handshake from `stream` against a backing of
/// `backing_len` bytes.
pub fn handshake(
    stream: &UnixStream,
    backing_len: u64,
) -> Result<(Uffd, Vec<GuestRegionUffdMapping>), Refusal> {
    let io = |e: std::io::Error| Refusal::bare(HandshakeError::Io(Arc::new(e)));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut body = Vec::new();
    let mut fd: Option<OwnedFd> = None;
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    // One sendmsg, but a stream socket may hand it over in pieces.
    loop {
        let (n, got) = recv_with_fd(stream.as_fd(), &mut buf).map_err(|e| io(e.into()))?;
        if fd.is_none() {
            fd = got;
        }
        if n == 0 {
            if body.is_empty() {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a message",
                )));
            }
            break;
        }
        body.extend_from_slice(&buf[..n]);
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Err(e) if e.is_eof() && body.len() < MAX_HANDSHAKE => continue,
            _ => break,
        }
    }
    let announced: Vec<GuestRegionUffdMapping> = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => return Err(Refusal::bare(HandshakeError::Json(Arc::new(e)))),
    };
    let refuse = |error, uffd| Refusal {
        error,
        uffd,
        announced: announced.clone(),
    };
    let Some(fd) = fd else {
        return Err(refuse(HandshakeError::NoFd, None));
    };
    if !is_userfaultfd(fd.as_fd()) {
        return Err(refuse(HandshakeError::NotUffd, None));
    }
    if !is_api_done(fd.as_fd()) {
        return Err(refuse(HandshakeError::NotHandshaken, None));
    }
    let uffd = Uffd::from_handshaken_fd(fd, Features::EVENT_REMOVE);
    if let Err(e) = check_mappings(&announced, backing_len) {
        return Err(refuse(e, Some(uffd)));
    }
    if let Err(e) = stream.set_read_timeout(None) {
        return Err(refuse(HandshakeError::Io(Arc::new(e)), Some(uffd)));
    }
    Ok((uffd, announced))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(base: u64, size: u64, offset: u64, ps: u64) -> String {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{ps}}}"#
        )
    }

    #[test]
    fn good_mappings_parse() {
        let body = format!(
            "[{},{}]",
            m(0x10000, 8192, 0, 4096),
            m(0x40000, 4096, 8192, 4096)
        );
        let maps = parse_mappings(body.as_bytes(), 12288).unwrap();
        assert_eq!(maps.len(), 2);
        // The deprecated field name is accepted too.
        let old = r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#;
        assert_eq!(
            parse_mappings(old.as_bytes(), 4096).unwrap()[0].page_bytes(),
            4096
        );
    }

    #[test]
    fn bad_mappings_are_named() {
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not a JSON array"),
            ("[]".into(), "no guest regions"),
            (format!("[{}]", m(0x10000, 4096, 0, 1000)), "page size 1000"),
            (
                format!("[{}]", m(0x10001, 4096, 0, 4096)),
                "base_host_virt_addr",
            ),
            (format!("[{}]", m(0x10000, 4096, 10, 4096)), "offset"),
            (format!("[{}]", m(0x10000, 0, 0, 4096)), "empty"),
            (
                format!(
                    "[{},{}]",
                    m(0x10000, 8192, 0, 4096),
                    m(0x11000, 4096, 0, 4096)
                ),
                "overlap",
            ),
            (
                format!("[{}]", m(0x10000, 16384, 0, 4096)),
                "ends at byte 16384",
            ),
        ];
        for (body, want) in cases {
            let e = parse_mappings(body.as_bytes(), 8192)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }
}
