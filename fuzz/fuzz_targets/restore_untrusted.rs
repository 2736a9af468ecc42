//! Every parser of bytes a lazy restore takes from outside: the TCP page
//! protocol (hello, request, response header), working-set files and
//! Firecracker's handshake JSON. None may panic; what parses must re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepage_restore::firecracker::parse_mappings;
use livepage_restore::wire::{decode_hello, decode_response, encode_hello, Request, REQUEST_LEN, RESPONSE_LEN};
use livepage_restore::WorkingSet;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 5 {
        0 => {
            if let Ok(regions) = decode_hello(rest) {
                assert_eq!(encode_hello(&regions), rest);
            }
        }
        1 => {
            if let Ok(b) = <&[u8; REQUEST_LEN]>::try_from(&rest[..rest.len().min(REQUEST_LEN)]) {
                if let Ok(r) = Request::decode(b) {
                    assert_eq!(&r.encode(), b);
                }
            }
        }
        2 => {
            if let Ok(b) = <&[u8; RESPONSE_LEN]>::try_from(&rest[..rest.len().min(RESPONSE_LEN)]) {
                let _ = decode_response(b);
            }
        }
        3 => {
            if let Ok(w) = WorkingSet::from_bytes(rest) {
                assert_eq!(w.to_bytes(), rest);
            }
        }
        _ => {
            if let Ok(maps) = parse_mappings(rest, 1 << 30) {
                assert!(!maps.is_empty());
                for m in maps {
                    assert!(m.offset + m.size <= 1 << 30);
                }
            }
        }
    }
});
