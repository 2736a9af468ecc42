//! Decodes arbitrary bytes as a `uffd_msg`: must never panic, and a decoded
//! message must survive the byte round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepage_uffd::event::{decode, msg_from_bytes, msg_to_bytes, RawEvent};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = msg_from_bytes(data) else { return };
    assert_eq!(&msg_to_bytes(&msg)[..], &data[..32]);
    for thread_ids in [false, true] {
        if let Ok(RawEvent::Remove { start, end } | RawEvent::Unmap { start, end }) = decode(&msg, thread_ids) {
            assert!(start <= end);
        }
    }
});
