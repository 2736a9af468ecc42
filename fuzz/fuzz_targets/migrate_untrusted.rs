//! Every parser of bytes a migration takes from its peer: the frame header
//! and its payload check, hello, welcome, switchover, range lists and the
//! chunk decompressors. None may panic; what parses must re-encode, ranges
//! must stay sorted and inside their limit, a decompressed chunk fills its
//! pages exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepage_migrate::codec::{decompress, Codec};
use livepage_migrate::proto::frame::{Header, HEADER_LEN};
use livepage_migrate::proto::msg::{decode_ranges, Hello, Switchover, Welcome};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 6 {
        0 => {
            if rest.len() >= HEADER_LEN {
                let (h, payload) = rest.split_at(HEADER_LEN);
                let b: &[u8; HEADER_LEN] = h.try_into().expect("split at HEADER_LEN");
                if let Ok(h) = Header::decode(b) {
                    if h.check_payload(payload).is_ok() {
                        assert_eq!(&h.encode(payload), b);
                    }
                }
            }
        }
        1 => {
            if let Ok(m) = Hello::decode(rest) {
                assert_eq!(Hello::decode(&m.encode()).ok(), Some(m));
            }
        }
        2 => {
            if let Ok(m) = Welcome::decode(rest) {
                assert_eq!(Welcome::decode(&m.encode()).ok(), Some(m));
            }
        }
        3 => {
            if let Ok(m) = Switchover::decode(rest) {
                assert_eq!(Switchover::decode(&m.encode()).ok(), Some(m));
            }
        }
        4 => {
            let limit = 1 << 20;
            if let Ok(ranges) = decode_ranges(rest, limit) {
                let mut last = 0;
                for (a, b) in ranges {
                    assert!(a >= last && a < b && b <= limit);
                    last = b;
                }
            }
        }
        _ => {
            let Some((&c, payload)) = rest.split_first() else { return };
            let codec = [Codec::None, Codec::Lz4, Codec::Zstd][usize::from(c % 3)];
            let mut out = vec![0u8; 4096 * (1 + usize::from(c / 3 % 4))];
            let _ = decompress(codec, payload, &mut out);
        }
    }
});
