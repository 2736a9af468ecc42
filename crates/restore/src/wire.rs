//! The page protocol's framing (docs/PROTOCOL.md, version 1), free of I/O:
//! the server's hello, requests, response headers. Every parser takes
//! untrusted bytes and is fuzzed (`fuzz/fuzz_targets/restore_untrusted.rs`).

use crate::source::SourceRegion;
use livepage_image::le::{u32_at, u64_at};

/// Magic of the server's hello.
pub const HELLO_MAGIC: &[u8; 8] = b"LPWIRE\0\0";
/// Protocol version.
pub const VERSION: u32 = 1;
/// Magic of each request ("LPRQ").
pub const REQUEST_MAGIC: u32 = 0x5152_504c;
/// Request size in bytes.
pub const REQUEST_LEN: usize = 32;
/// Response header size in bytes.
pub const RESPONSE_LEN: usize = 16;
/// Largest run one request may ask for.
pub const MAX_RUN_BYTES: u64 = 64 << 20;
/// Most regions a hello may describe.
pub const MAX_REGIONS: u32 = 4096;

pub(crate) const OP_READ: u32 = 1;
/// Response status: the payload holds the pages.
pub const STATUS_DATA: u32 = 0;
/// Response status: every page is zero (no payload).
pub const STATUS_ZERO: u32 = 1;
/// Response status: the payload is an error message.
pub const STATUS_ERROR: u32 = 2;

/// What is wrong with bytes received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not our protocol.
    #[error("the peer is not a livepage page server (bad hello magic)")]
    BadMagic,
    /// Another protocol version.
    #[error("the peer speaks protocol version {theirs}, this build speaks {ours}")]
    Version {
        /// The peer's version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// A region count out of bounds.
    #[error("the hello describes {0} regions (1..=4096)")]
    RegionCount(u32),
    /// Fewer or more bytes than the frame needs.
    #[error("a frame of {have} bytes where {want} are needed")]
    Length {
        /// Bytes there.
        have: usize,
        /// Bytes needed.
        want: usize,
    },
    /// A frame's checksum does not match.
    #[error("the hello's checksum does not match")]
    Checksum,
    /// A page size we cannot use.
    #[error("region {region} has a page size of {page_size} bytes")]
    PageSize {
        /// Region.
        region: usize,
        /// Its page size.
        page_size: u64,
    },
    /// A region whose size overflows.
    #[error("region {0}'s size overflows")]
    RegionSize(usize),
    /// A request without the request magic.
    #[error("bad request magic")]
    RequestMagic,
    /// An unknown operation.
    #[error("unknown request op {0}")]
    UnknownOp(u32),
    /// A reserved field that is not zero.
    #[error("a reserved field is not zero")]
    Reserved,
    /// A request for no pages or too many bytes.
    #[error("{count} pages of {page_size} bytes: a request asks for 1 page up to 64 MiB")]
    Count {
        /// Pages asked for.
        count: u32,
        /// Their size.
        page_size: usize,
    },
    /// A request for a region the server does not have.
    #[error("no region {0}")]
    NoRegion(u32),
    /// A request outside its region.
    #[error("pages {first}+{count} lie outside region {region} ({pages} pages)")]
    Outside {
        /// Region.
        region: u32,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
        /// Pages the region has.
        pages: u64,
    },
    /// A malformed response header.
    #[error("malformed response header (status {0})")]
    ResponseHeader(u32),
    /// A response payload over the limit.
    #[error("a response of {0} bytes is over the limit")]
    ResponseTooLarge(usize),
    /// A response that does not answer the request.
    #[error("a response of {got} bytes with status {status} for a request of {asked} bytes")]
    Mismatch {
        /// Status.
        status: u32,
        /// Payload bytes.
        got: usize,
        /// Bytes asked for.
        asked: usize,
    },
    /// Pages that arrived corrupt.
    #[error("pages {first}+{count} of region {region} arrived corrupt (checksum mismatch)")]
    PageChecksum {
        /// Region.
        region: u32,
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// Two connections to one server described different regions.
    #[error("two connections described different regions")]
    DifferentRegions,
}

/// The hello's bytes.
pub fn encode_hello(regions: &[SourceRegion]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + regions.len() * 16 + 4);
    b.extend_from_slice(HELLO_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        b.extend_from_slice(&(r.page_size as u64).to_le_bytes());
        b.extend_from_slice(&r.pages.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Length of the hello whose first 16 bytes are `head`, or why it is refused.
pub fn hello_len(head: &[u8; 16]) -> Result<usize, WireError> {
    if &head[..8] != HELLO_MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u32_at(head, 8);
    if version != VERSION {
        return Err(WireError::Version {
            theirs: version,
            ours: VERSION,
        });
    }
    let n = u32_at(head, 12);
    if n == 0 || n > MAX_REGIONS {
        return Err(WireError::RegionCount(n));
    }
    Ok(16 + n as usize * 16 + 4)
}

/// Parses a whole hello (untrusted bytes).
pub fn decode_hello(b: &[u8]) -> Result<Vec<SourceRegion>, WireError> {
    let head: &[u8; 16] = b
        .get(..16)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Length {
            have: b.len(),
            want: 16,
        })?;
    let len = hello_len(head)?;
    if b.len() != len {
        return Err(WireError::Length {
            have: b.len(),
            want: len,
        });
    }
    if u32_at(b, len - 4) != crc32c::crc32c(&b[..len - 4]) {
        return Err(WireError::Checksum);
    }
    let n = u32_at(b, 12) as usize;
    let mut regions = Vec::with_capacity(n);
    for region in 0..n {
        let ps = u64_at(b, 16 + region * 16);
        let pages = u64_at(b, 24 + region * 16);
        if !ps.is_power_of_two() || !(4096..=1 << 30).contains(&ps) {
            return Err(WireError::PageSize {
                region,
                page_size: ps,
            });
        }
        if pages.checked_mul(ps).is_none() {
            return Err(WireError::RegionSize(region));
        }
        regions.push(SourceRegion {
            page_size: ps as usize,
            pages,
        });
    }
    Ok(regions)
}

/// A request for `count` pages of `region` from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Region.
    pub region: u32,
    /// First page.
    pub first: u64,
    /// Pages.
    pub count: u32,
}

impl Request {
    /// Its bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&OP_READ.to_le_bytes());
        b[8..12].copy_from_slice(&self.region.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b
    }

    /// Parses a request (untrusted bytes). `Err` means the stream is not
    /// speaking this protocol and the connection should be closed.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        if u32_at(b, 0) != REQUEST_MAGIC {
            return Err(WireError::RequestMagic);
        }
        let op = u32_at(b, 4);
        if op != OP_READ {
            return Err(WireError::UnknownOp(op));
        }
        if u64_at(b, 24) != 0 {
            return Err(WireError::Reserved);
        }
        Ok(Request {
            region: u32_at(b, 8),
            count: u32_at(b, 12),
            first: u64_at(b, 16),
        })
    }

    /// The bytes this request asks for, or why `regions` cannot serve it.
    pub fn check(&self, regions: &[SourceRegion]) -> Result<usize, WireError> {
        let r = regions
            .get(self.region as usize)
            .ok_or(WireError::NoRegion(self.region))?;
        let bytes = u64::from(self.count) * r.page_size as u64;
        if self.count == 0 || bytes > MAX_RUN_BYTES {
            return Err(WireError::Count {
                count: self.count,
                page_size: r.page_size,
            });
        }
        if self
            .first
            .checked_add(u64::from(self.count))
            .is_none_or(|e| e > r.pages)
        {
            return Err(WireError::Outside {
                region: self.region,
                first: self.first,
                count: self.count,
                pages: r.pages,
            });
        }
        Ok(bytes as usize)
    }
}

/// A response header for `payload` with `status`.
pub fn response_header(status: u32, payload: &[u8]) -> [u8; RESPONSE_LEN] {
    let mut h = [0u8; RESPONSE_LEN];
    h[0..4].copy_from_slice(&status.to_le_bytes());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h
}

/// A response header: (status, payload length, payload crc).
pub fn decode_response(h: &[u8; RESPONSE_LEN]) -> Result<(u32, usize, u32), WireError> {
    let status = u32_at(h, 0);
    let len = u32_at(h, 4) as usize;
    if status > STATUS_ERROR || u32_at(h, 12) != 0 {
        return Err(WireError::ResponseHeader(status));
    }
    if len as u64 > MAX_RUN_BYTES {
        return Err(WireError::ResponseTooLarge(len));
    }
    Ok((status, len, u32_at(h, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_round_trips(regs in proptest::collection::vec((12u32..22, 1u64..1 << 30), 1..8)) {
            let r: Vec<SourceRegion> = regs.iter().map(|(s, p)| SourceRegion { page_size: 1 << s, pages: *p }).collect();
            prop_assert_eq!(decode_hello(&encode_hello(&r)).unwrap(), r);
        }

        #[test]
        fn garbage_hello_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_hello(&b);
        }

        #[test]
        fn requests_round_trip(region in any::<u32>(), first in any::<u64>(), count in any::<u32>()) {
            let r = Request { region, first, count };
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn garbage_requests_and_responses_never_panic(b in proptest::array::uniform32(any::<u8>())) {
            let _ = Request::decode(&b);
            let h: [u8; RESPONSE_LEN] = b[..RESPONSE_LEN].try_into().unwrap();
            let _ = decode_response(&h);
        }

        #[test]
        fn out_of_range_requests_are_refused(first in any::<u64>(), count in any::<u32>()) {
            let regions = [SourceRegion { page_size: 4096, pages: 100 }];
            let r = Request { region: 0, first, count };
            let ok = count > 0 && first.checked_add(u64::from(count)).is_some_and(|e| e <= 100);
            prop_assert_eq!(r.check(&regions).is_ok(), ok);
        }
    }
}
